//! Rotary position embeddings as transformers computes them (`modeling_rope_utils.py`): the
//! inverse frequencies of each RoPE type (`default`, `linear`, `dynamic`, `yarn`, `llama3`), read
//! from `rope_parameters` or the older `rope_scaling`, and the rotate-half cosines and sines.
//!
//! Every frequency is computed in f32, operation for operation as transformers does on its f32
//! tensors, so the cosines agree to the last bits at the positions the tests reach.

use burn::prelude::*;
use burn::tensor::DType;

use crate::error::Result;
use crate::hf_config::HfConfig;

/// How a RoPE type rescales the default frequencies.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RopeScaling {
    /// `default`: `theta^(-2i/d)`.
    Default,
    /// `linear`: positions divided by `factor` (frequencies divided by it).
    Linear {
        /// `factor`.
        factor: f64,
    },
    /// `dynamic` (NTK): past `max_position_embeddings`, the base grows with the sequence.
    Dynamic {
        /// `factor`.
        factor: f64,
        /// The config's `max_position_embeddings`, where scaling starts.
        max_position_embeddings: usize,
    },
    /// `yarn`: interpolation blended with extrapolation by a ramp over the dimensions, and
    /// cosines and sines scaled by `attention_factor`.
    Yarn {
        /// `factor`.
        factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: usize,
        /// `beta_fast` (32 by default).
        beta_fast: f64,
        /// `beta_slow` (1 by default).
        beta_slow: f64,
        /// `attention_factor`, given or inferred from `factor` (and `mscale`, `mscale_all_dim`).
        attention_factor: f64,
        /// `truncate` the correction range to whole dimensions (true by default).
        truncate: bool,
    },
    /// `llama3`: long wavelengths divided by `factor`, short ones kept, the band between
    /// interpolated.
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: usize,
    },
}

/// RoPE of one model: base, rotated width and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// `rope_theta`.
    pub theta: f64,
    /// Rotated width: the head dimension.
    pub head_dim: usize,
    /// The RoPE type.
    pub scaling: RopeScaling,
}

impl Rope {
    /// Plain RoPE of base `theta` over `head_dim`.
    pub fn new(theta: f64, head_dim: usize) -> Self {
        Self {
            theta,
            head_dim,
            scaling: RopeScaling::Default,
        }
    }

    /// Reads `rope_theta` and `rope_parameters` (or the older `rope_scaling`) as transformers'
    /// `standardize_rope_params` does: the parameters' own `rope_theta` wins, `rope_type` (or
    /// `type`) names the kind, `original_max_position_embeddings` defaults to the top-level key,
    /// else `max_position_embeddings`.
    ///
    /// # Errors
    ///
    /// A RoPE type this crate does not compute (`longrope`, ...), a `partial_rotary_factor` other
    /// than 1, or a missing or non-positive parameter, naming the key and value.
    pub fn from_hf(
        cfg: &HfConfig,
        head_dim: usize,
        max_position_embeddings: Option<usize>,
    ) -> Result<Self> {
        let mut theta = cfg.opt_positive_f64(&["rope_theta"])?;
        let mut scaling = RopeScaling::Default;
        for key in ["rope_scaling", "rope_parameters"] {
            let Some(rope) = cfg.opt_object(key)? else {
                continue;
            };
            theta = rope.opt_positive_f64(&["rope_theta"])?.or(theta);
            if let Some(partial) = rope
                .opt_f64(&["partial_rotary_factor"])?
                .or(cfg.opt_f64(&["partial_rotary_factor"])?)
                && partial != 1.0
            {
                return Err(cfg
                    .unsupported(
                        key,
                        format!("has partial_rotary_factor {partial}; only 1 is supported"),
                    )
                    .into());
            }
            let kind = match rope.opt_str("rope_type")? {
                Some(kind) => Some(kind),
                None => rope.opt_str("type")?,
            };
            let factor = || -> Result<f64> {
                rope.opt_positive_f64(&["factor"])?.ok_or_else(|| {
                    cfg.unsupported(key, "needs a positive `factor` for its rope_type")
                        .into()
                })
            };
            let original = || -> Result<usize> {
                match rope.opt_usize(&["original_max_position_embeddings"])? {
                    Some(n) => Ok(n),
                    None => cfg
                        .opt_usize(&["original_max_position_embeddings"])?
                        .or(max_position_embeddings)
                        .ok_or_else(|| {
                            cfg.unsupported(
                                key,
                                "needs original_max_position_embeddings (or \
                                 max_position_embeddings) for its rope_type",
                            )
                            .into()
                        }),
                }
            };
            scaling = match kind.unwrap_or("default") {
                "default" => RopeScaling::Default,
                "linear" => RopeScaling::Linear { factor: factor()? },
                "dynamic" => RopeScaling::Dynamic {
                    factor: factor()?,
                    max_position_embeddings: max_position_embeddings.ok_or_else(|| {
                        cfg.unsupported(key, "dynamic RoPE needs max_position_embeddings")
                    })?,
                },
                "yarn" => {
                    let factor = factor()?;
                    let mscale = rope.opt_f64(&["mscale"])?;
                    let mscale_all_dim = rope.opt_f64(&["mscale_all_dim"])?;
                    let get_mscale = |scale: f64, mscale: f64| {
                        if scale <= 1.0 {
                            1.0
                        } else {
                            0.1 * mscale * scale.ln() + 1.0
                        }
                    };
                    let attention_factor = match rope.opt_f64(&["attention_factor"])? {
                        Some(given) => given,
                        None => match (mscale, mscale_all_dim) {
                            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                                get_mscale(factor, m) / get_mscale(factor, all)
                            }
                            _ => get_mscale(factor, 1.0),
                        },
                    };
                    RopeScaling::Yarn {
                        factor,
                        original_max_position_embeddings: original()?,
                        beta_fast: rope
                            .opt_f64(&["beta_fast"])?
                            .filter(|b| *b != 0.0)
                            .unwrap_or(32.0),
                        beta_slow: rope
                            .opt_f64(&["beta_slow"])?
                            .filter(|b| *b != 0.0)
                            .unwrap_or(1.0),
                        attention_factor,
                        truncate: rope.bool_or("truncate", true)?,
                    }
                }
                "llama3" => {
                    let low = rope.opt_positive_f64(&["low_freq_factor"])?;
                    let high = rope.opt_positive_f64(&["high_freq_factor"])?;
                    let (Some(low_freq_factor), Some(high_freq_factor)) = (low, high) else {
                        return Err(cfg
                            .unsupported(
                                key,
                                "llama3 RoPE needs positive low_freq_factor and high_freq_factor",
                            )
                            .into());
                    };
                    if high_freq_factor <= low_freq_factor {
                        return Err(cfg
                            .unsupported(
                                key,
                                format!(
                                    "high_freq_factor ({high_freq_factor}) must exceed \
                                     low_freq_factor ({low_freq_factor})"
                                ),
                            )
                            .into());
                    }
                    RopeScaling::Llama3 {
                        factor: factor()?,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings: original()?,
                    }
                }
                other => {
                    return Err(cfg
                        .unsupported(
                            key,
                            format!(
                                "has rope_type {other:?}, which is not supported (default, \
                                 linear, dynamic, yarn, llama3)"
                            ),
                        )
                        .into());
                }
            };
        }
        Ok(Self {
            theta: theta.unwrap_or(10000.0),
            head_dim,
            scaling,
        })
    }

    /// Longest sequence the model takes: `max_position_embeddings`, except for dynamic RoPE,
    /// which rescales past it without limit.
    pub fn max_positions(&self, max_position_embeddings: Option<usize>) -> Option<usize> {
        match self.scaling {
            RopeScaling::Dynamic { .. } => None,
            _ => max_position_embeddings,
        }
    }

    /// `theta^(-2i/d)` for a base `base`, in f32 as `1.0 / (base ** (arange(0, d, 2) / d))`.
    fn default_inv_freq(base: f64, dim: usize) -> Vec<f32> {
        (0..dim / 2)
            .map(|i| 1.0 / (base as f32).powf((2 * i) as f32 / dim as f32))
            .collect()
    }

    /// The inverse frequencies for a forward whose largest position is `max_position`, and the
    /// factor on the cosines and sines.
    pub fn inv_freq(&self, max_position: usize) -> (Vec<f32>, f32) {
        let dim = self.head_dim;
        match &self.scaling {
            RopeScaling::Default => (Self::default_inv_freq(self.theta, dim), 1.0),
            RopeScaling::Linear { factor } => (
                Self::default_inv_freq(self.theta, dim)
                    .into_iter()
                    .map(|f| f / *factor as f32)
                    .collect(),
                1.0,
            ),
            RopeScaling::Dynamic {
                factor,
                max_position_embeddings,
            } => {
                // transformers' `dynamic_frequency_update` on a fresh model: the sequence length
                // is the largest position + 1 of this forward, at least the configured maximum.
                let max = *max_position_embeddings as f64;
                let seq_len = ((max_position + 1) as f64).max(max);
                let exponent = dim as f64 / (dim as f64 - 2.0);
                let base = self.theta * ((factor * seq_len / max) - (factor - 1.0)).powf(exponent);
                (Self::default_inv_freq(base, dim), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => {
                let base = self.theta;
                let original = *original_max_position_embeddings as f64;
                let correction_dim = |rotations: f64| {
                    (dim as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln())
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
                if low == high {
                    high += 0.001;
                }
                let inv_freq = (0..dim / 2)
                    .map(|i| {
                        let pos_freq = (base as f32).powf((2 * i) as f32 / dim as f32);
                        let extrapolation = 1.0 / pos_freq;
                        let interpolation = 1.0 / (*factor as f32 * pos_freq);
                        let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        interpolation * (1.0 - extrapolation_factor)
                            + extrapolation * extrapolation_factor
                    })
                    .collect();
                (inv_freq, *attention_factor as f32)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_context_len = *original_max_position_embeddings as f64;
                let low_freq_wavelen = (old_context_len / low_freq_factor) as f32;
                let high_freq_wavelen = (old_context_len / high_freq_factor) as f32;
                let factor = *factor as f32;
                let inv_freq = Self::default_inv_freq(self.theta, dim)
                    .into_iter()
                    .map(|f| {
                        // torch's `scalar / tensor` is `tensor.reciprocal() * scalar`.
                        let wavelen = (1.0 / f) * (2.0 * std::f64::consts::PI) as f32;
                        let llama = if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            f
                        };
                        let smooth = ((1.0 / wavelen) * old_context_len as f32
                            - *low_freq_factor as f32)
                            / (high_freq_factor - low_freq_factor) as f32;
                        let smoothed = (1.0 - smooth) * llama / factor + smooth * llama;
                        // transformers' `~(w < high) * ~(w > low)`; wavelengths are finite.
                        let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                        if medium { smoothed } else { llama }
                    })
                    .collect();
                (inv_freq, 1.0)
            }
        }
    }

    /// Cosines and sines of rotate-half RoPE for per-row positions `[batch, seq]`, each
    /// `[batch, 1, seq, head_dim]` in `dtype`, computed in f32 and scaled as transformers does.
    pub fn cos_sin(&self, positions: Tensor<2, Int>, dtype: DType) -> (Tensor<4>, Tensor<4>) {
        let [batch, seq] = positions.dims();
        let device = positions.device();
        let max_position = match self.scaling {
            // Only dynamic RoPE depends on the length; reading the positions back costs a sync.
            RopeScaling::Dynamic { .. } => {
                positions.clone().max().into_scalar::<i64>().max(0) as usize
            }
            _ => 0,
        };
        let (inv_freq, scale) = self.inv_freq(max_position);
        let half = self.head_dim / 2;
        let inv_freq = Tensor::<1>::from_data(TensorData::new(inv_freq, [half]), &device);
        let freqs = positions.float().reshape([batch, seq, 1]) * inv_freq.reshape([1, 1, half]);
        let emb =
            Tensor::cat(vec![freqs.clone(), freqs], 2).reshape([batch, 1, seq, self.head_dim]);
        let (cos, sin) = (emb.clone().cos(), emb.sin());
        let (cos, sin) = if scale == 1.0 {
            (cos, sin)
        } else {
            (cos.mul_scalar(scale), sin.mul_scalar(scale))
        };
        (cos.cast(dtype), sin.cast(dtype))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(scaling: &str) -> Rope {
        let text = format!(
            r#"{{"rope_theta": 500000.0, "max_position_embeddings": 64, "rope_scaling": {scaling}}}"#
        );
        Rope::from_hf(
            &HfConfig::from_str(&text, "config.json").unwrap(),
            64,
            Some(64),
        )
        .unwrap()
    }

    #[test]
    fn llama3_keeps_short_wavelengths_and_divides_long_ones() {
        let plain = rope("null").inv_freq(0).0;
        let scaled = rope(
            r#"{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}"#,
        )
        .inv_freq(0)
        .0;
        // Wavelength 2π/f: under 16/4 = 4 positions kept, over 16 divided by 8, between smoothed.
        for (p, s) in plain.iter().zip(&scaled) {
            let wavelen = 2.0 * std::f32::consts::PI / p;
            if wavelen < 4.0 {
                assert_eq!(p, s);
            } else if wavelen > 16.0 {
                assert!((s * 8.0 / p - 1.0).abs() < 1e-6);
            } else {
                assert!(s < p && *s > p / 8.0);
            }
        }
    }

    #[test]
    fn unsupported_types_are_refused_by_key_and_value() {
        let text = r#"{"rope_scaling": {"type": "longrope", "factor": 2.0}}"#;
        let err = Rope::from_hf(
            &HfConfig::from_str(text, "config.json").unwrap(),
            8,
            Some(8),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("rope_scaling"), "{err}");
        assert!(
            err.contains("\"longrope\", which is not supported"),
            "{err}"
        );
        let text = r#"{"rope_parameters": {"rope_type": "linear"}}"#;
        let err = Rope::from_hf(
            &HfConfig::from_str(text, "config.json").unwrap(),
            8,
            Some(8),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("needs a positive `factor`"), "{err}");
    }

    #[test]
    fn dynamic_equals_default_within_the_configured_length() {
        let dynamic = rope(r#"{"type": "dynamic", "factor": 2.0}"#);
        let plain = rope("null");
        assert_eq!(dynamic.inv_freq(63), plain.inv_freq(0));
        assert_ne!(dynamic.inv_freq(64).0, plain.inv_freq(0).0);
        assert_eq!(dynamic.max_positions(Some(64)), None);
    }
}
