//! BLOOM in burn.
//!
//! ALiBi position biases (any head count, powers of two or not), the fused `query_key_value`
//! projection split per head as transformers does (`[.., heads, 3, head_dim]`),
//! `word_embeddings_layernorm`, tanh-GELU MLP, and an `lm_head` tied to the word embeddings.
//! Field names mirror transformers' `BloomForCausalLM` (`transformer.h.0.self_attention...`);
//! checkpoints with or without the `transformer.` prefix load.

use burn::nn::{Embedding, LayerNorm, Linear};
use burn::prelude::*;
use peft_core::{CausalLm, LayerKv, ModelGeometry, ModelInput, ModelOutput};

use crate::auto::ModelFamily;
use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::hf_config::HfConfig;
use crate::layers::{Past, Rows, causal_attention, linear_rows, merge_heads, tied_lm_head};
use crate::weights::{RandomWeights, WeightSource, infallible};

/// Configuration of a BLOOM model (the fields of its Hugging Face `config.json`).
#[derive(Config, Debug, PartialEq)]
pub struct BloomConfig {
    /// Rows of the token embedding matrix (`vocab_size`).
    pub vocab_size: usize,
    /// Width of the residual stream (`hidden_size`, or the legacy `n_embed`).
    pub hidden_size: usize,
    /// Number of blocks (`n_layer` or `num_hidden_layers`).
    pub n_layer: usize,
    /// Number of attention heads (`n_head` or `num_attention_heads`).
    pub n_head: usize,
    /// LayerNorm epsilon (`layer_norm_epsilon`).
    #[config(default = 1e-5)]
    pub layer_norm_epsilon: f64,
    /// Residual taken after the layer norm instead of before
    /// (`apply_residual_connection_post_layernorm`).
    #[config(default = false)]
    pub apply_residual_connection_post_layernorm: bool,
    /// Standard deviation of random weights (`initializer_range`; only [`Self::init`] reads it).
    #[config(default = 0.02)]
    pub initializer_range: f64,
}

impl BloomConfig {
    /// Reads a `bloom` config.json, accepting both key styles
    /// (`n_embed`/`hidden_size`, `n_head`/`num_attention_heads`, `n_layer`/`num_hidden_layers`).
    pub fn from_hf(cfg: &HfConfig) -> Result<Self> {
        if let Some(model_type) = cfg.opt_str("model_type")?
            && model_type != "bloom"
        {
            return Err(ModelError::UnsupportedModelType {
                path: cfg.path().to_path_buf(),
                model_type: model_type.to_string(),
                supported: BloomForCausalLM::MODEL_TYPES.join(", "),
            });
        }
        let hidden_size = cfg.usize(&["hidden_size", "n_embed"])?;
        let n_head = cfg.usize(&["n_head", "num_attention_heads"])?;
        if hidden_size % n_head != 0 {
            return Err(cfg
                .unsupported(
                    "n_head",
                    format!("({n_head}) must divide hidden_size ({hidden_size})"),
                )
                .into());
        }
        Ok(Self {
            vocab_size: cfg.usize(&["vocab_size"])?,
            hidden_size,
            n_layer: cfg.usize(&["n_layer", "num_hidden_layers"])?,
            n_head,
            layer_norm_epsilon: cfg
                .opt_positive_f64(&["layer_norm_epsilon"])?
                .unwrap_or(1e-5),
            apply_residual_connection_post_layernorm: cfg
                .bool_or("apply_residual_connection_post_layernorm", false)?,
            initializer_range: cfg.opt_f64(&["initializer_range"])?.unwrap_or(0.02),
        })
    }

    /// Size of a head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.n_head
    }

    /// Geometry adapters see (no GQA: key/value heads = heads; ALiBi has no length limit).
    pub fn geometry(&self) -> ModelGeometry {
        ModelGeometry {
            num_layers: self.n_layer,
            hidden_size: self.hidden_size,
            num_attention_heads: self.n_head,
            num_key_value_heads: self.n_head,
            head_dim: self.head_dim(),
            vocab_size: self.vocab_size,
            max_positions: None,
        }
    }

    /// A model with random weights (for benchmarks and tests).
    pub fn init(&self, device: &Device) -> BloomForCausalLM {
        infallible(BloomForCausalLM::build(
            self,
            &mut RandomWeights::new(device, self.initializer_range),
        ))
    }
}

/// ALiBi slopes of transformers' `_get_alibi_slopes`, for any head count.
pub fn alibi_slopes(num_heads: usize) -> Vec<f32> {
    let closest = 1usize << num_heads.ilog2();
    let slope_base = |n: usize| 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
    let base = slope_base(closest);
    let mut slopes: Vec<f32> = (1..=closest).map(|p| base.powi(p as i32) as f32).collect();
    if closest != num_heads {
        let extra = slope_base(2 * closest);
        let remaining = closest.min(num_heads - closest);
        slopes.extend((0..remaining).map(|i| extra.powi((2 * i + 1) as i32) as f32));
    }
    slopes
}

/// Tanh approximation of GELU, with BLOOM's constants.
fn bloom_gelu(x: Tensor<3>) -> Tensor<3> {
    let inner = (x.clone() * 0.79788456) * ((x.clone() * x.clone()) * 0.044715 + 1.0);
    x * 0.5 * (inner.tanh() + 1.0)
}

/// Self-attention with a fused query/key/value projection and ALiBi.
#[derive(Module, Debug)]
pub struct BloomAttention {
    /// Fused projection `hidden -> 3 * hidden`, laid out `[heads, 3, head_dim]`.
    pub query_key_value: Linear,
    /// Output projection.
    pub dense: Linear,
    /// Heads.
    pub num_heads: usize,
    /// Size of a head.
    pub head_dim: usize,
}

impl BloomAttention {
    /// Attends `x` `[b, s, hidden]` over `past` and itself, with ALiBi bias `[b, heads, 1, t]`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        alibi: &Tensor<4>,
        past: Option<LayerKv>,
        key_mask: Option<Tensor<2, Int>>,
    ) -> (Tensor<3>, LayerKv) {
        self.forward_with(x, alibi, past, key_mask, Rows::PLAIN)
    }

    /// [`BloomAttention::forward`] over `rows` (packed, with per-row bias deltas): `x` and the
    /// output in `rows`' layout.
    pub(crate) fn forward_with(
        &self,
        x: Tensor<3>,
        alibi: &Tensor<4>,
        past: Option<LayerKv>,
        key_mask: Option<Tensor<2, Int>>,
        rows: Rows<'_>,
    ) -> (Tensor<3>, LayerKv) {
        let (h, d) = (self.num_heads, self.head_dim);
        // The projection runs over `rows` (tokens only where the batch is padded); attention
        // takes the rows apart.
        let fused = rows.unpack(rows.add(
            "self_attention.query_key_value.bias",
            linear_rows(&self.query_key_value, x),
        ));
        let [b, s, _] = fused.dims();
        let fused = fused.reshape([b, s, h, 3, d]);
        let part = |i: usize| {
            fused
                .clone()
                .slice([0..b, 0..s, 0..h, i..i + 1, 0..d])
                .reshape([b, s, h, d])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let kv = LayerKv::extend(past, k, v);
        let bias = alibi.clone().expand([b, h, s, kv.len()]);
        let out = causal_attention(
            q,
            kv.key.clone(),
            kv.value.clone(),
            key_mask,
            Some(bias),
            None,
        );
        let out = linear_rows(&self.dense, rows.pack(merge_heads(out)));
        (rows.add("self_attention.dense.bias", out), kv)
    }
}

/// MLP `dense_4h_to_h(gelu(dense_h_to_4h(x)))`.
#[derive(Module, Debug)]
pub struct BloomMlp {
    /// `hidden -> 4 * hidden`.
    pub dense_h_to_4h: Linear,
    /// `4 * hidden -> hidden`.
    pub dense_4h_to_h: Linear,
}

/// One BLOOM block.
#[derive(Module, Debug)]
pub struct BloomBlock {
    /// Norm before attention.
    pub input_layernorm: LayerNorm,
    /// Self-attention.
    pub self_attention: BloomAttention,
    /// Norm before the MLP.
    pub post_attention_layernorm: LayerNorm,
    /// MLP.
    pub mlp: BloomMlp,
    /// `apply_residual_connection_post_layernorm`.
    pub residual_post_layernorm: bool,
}

impl BloomBlock {
    fn forward(
        &self,
        x: Tensor<3>,
        alibi: &Tensor<4>,
        past: Option<LayerKv>,
        key_mask: Option<Tensor<2, Int>>,
        rows: Rows<'_>,
    ) -> (Tensor<3>, LayerKv) {
        let normed = rows.add(
            "input_layernorm.bias",
            self.input_layernorm.forward(x.clone()),
        );
        let residual = if self.residual_post_layernorm {
            normed.clone()
        } else {
            x
        };
        let (attn, kv) = self
            .self_attention
            .forward_with(normed, alibi, past, key_mask, rows);
        let attn = attn + residual;
        let normed = rows.add(
            "post_attention_layernorm.bias",
            self.post_attention_layernorm.forward(attn.clone()),
        );
        let residual = if self.residual_post_layernorm {
            normed.clone()
        } else {
            attn
        };
        let up = rows.add(
            "mlp.dense_h_to_4h.bias",
            linear_rows(&self.mlp.dense_h_to_4h, normed),
        );
        let mlp = rows.add(
            "mlp.dense_4h_to_h.bias",
            linear_rows(&self.mlp.dense_4h_to_h, bloom_gelu(up)),
        );
        (mlp + residual, kv)
    }
}

/// The BLOOM stack (`transformer.*` in Hugging Face checkpoints).
#[derive(Module, Debug)]
pub struct BloomModel {
    /// Token embeddings (also the tied `lm_head`).
    pub word_embeddings: Embedding,
    /// Norm applied to the input embeddings.
    pub word_embeddings_layernorm: LayerNorm,
    /// Blocks.
    pub h: Vec<BloomBlock>,
    /// Final norm.
    pub ln_f: LayerNorm,
}

/// BLOOM with its (tied) language-model head.
#[derive(Module, Debug)]
pub struct BloomForCausalLM {
    /// The stack.
    pub transformer: BloomModel,
    /// The configuration the model was built from.
    #[module(skip)]
    pub config: BloomConfig,
}

impl BloomForCausalLM {
    /// Builds the model from the tensors of `ckpt`, with or without the `transformer.` prefix.
    pub fn load(config: &BloomConfig, ckpt: &mut Checkpoint) -> Result<Self> {
        Self::build(config, ckpt)
    }

    /// Lays out the model, taking each layer from `src` under its Hugging Face name: with the
    /// `transformer.` prefix of `BloomForCausalLM` checkpoints, or without it where the source
    /// holds a bare `BloomModel`'s tensors.
    pub fn build<S: WeightSource>(config: &BloomConfig, src: &mut S) -> Result<Self, S::Error> {
        let root = if src.contains("transformer.word_embeddings.weight") {
            "transformer."
        } else {
            ""
        };
        let c = config;
        let (d, eps) = (c.hidden_size, c.layer_norm_epsilon);
        let word_embeddings = src.embedding(&format!("{root}word_embeddings"), c.vocab_size, d)?;
        let word_embeddings_layernorm =
            src.layer_norm(&format!("{root}word_embeddings_layernorm"), d, eps)?;
        let mut h = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = format!("{root}h.{i}");
            h.push(BloomBlock {
                input_layernorm: src.layer_norm(&format!("{p}.input_layernorm"), d, eps)?,
                self_attention: BloomAttention {
                    query_key_value: src.linear(
                        &format!("{p}.self_attention.query_key_value"),
                        d,
                        3 * d,
                        true,
                    )?,
                    dense: src.linear(&format!("{p}.self_attention.dense"), d, d, true)?,
                    num_heads: c.n_head,
                    head_dim: c.head_dim(),
                },
                post_attention_layernorm: src.layer_norm(
                    &format!("{p}.post_attention_layernorm"),
                    d,
                    eps,
                )?,
                mlp: BloomMlp {
                    dense_h_to_4h: src.linear(&format!("{p}.mlp.dense_h_to_4h"), d, 4 * d, true)?,
                    dense_4h_to_h: src.linear(&format!("{p}.mlp.dense_4h_to_h"), 4 * d, d, true)?,
                },
                residual_post_layernorm: c.apply_residual_connection_post_layernorm,
            });
        }
        let ln_f = src.layer_norm(&format!("{root}ln_f"), d, eps)?;
        // BLOOM's head is always tied; some checkpoints store the copy anyway.
        src.skip("lm_head.weight");
        Ok(Self {
            transformer: BloomModel {
                word_embeddings,
                word_embeddings_layernorm,
                h,
                ln_f,
            },
            config: config.clone(),
        })
    }
}

impl ModelFamily for BloomForCausalLM {
    const MODEL_TYPES: &'static [&'static str] = &["bloom"];
    type Config = BloomConfig;

    fn read_config(cfg: &HfConfig) -> Result<BloomConfig> {
        BloomConfig::from_hf(cfg)
    }

    fn config_geometry(config: &BloomConfig) -> ModelGeometry {
        config.geometry()
    }

    fn build<S: WeightSource>(config: &BloomConfig, src: &mut S) -> Result<Self, S::Error> {
        Self::build(config, src)
    }

    fn init(config: &BloomConfig, device: &Device) -> Self {
        config.init(device)
    }
}

impl CausalLm for BloomForCausalLM {
    fn geometry(&self) -> ModelGeometry {
        self.config.geometry()
    }

    fn device(&self) -> Device {
        self.transformer.word_embeddings.weight.device()
    }

    fn embed_tokens(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        self.transformer.word_embeddings.forward(input_ids)
    }

    fn word_embeddings(&self) -> Tensor<2> {
        self.transformer.word_embeddings.weight.val()
    }

    fn forward_hidden(&self, input: ModelInput) -> ModelOutput {
        let dtype = input.inputs_embeds.dtype();
        let (embeds, past) = Past::resolve(input, &self.geometry());
        // ALiBi depends on key positions only (softmax is shift-invariant per query).
        let positions = past.key_positions().float();
        let [batch, keys] = positions.dims();
        let heads = self.config.n_head;
        let slopes = Tensor::<1>::from_data(
            TensorData::new(alibi_slopes(heads), [heads]),
            &positions.device(),
        );
        let alibi =
            (slopes.reshape([1, heads, 1, 1]) * positions.reshape([batch, 1, 1, keys])).cast(dtype);
        // Outside the blocks the biases are the model's own, named under `transformer.`.
        let deltas = past.bias_deltas();
        let top = Rows::new(deltas.as_ref(), "transformer.", None);
        let x = top.add(
            "word_embeddings_layernorm.bias",
            self.transformer.word_embeddings_layernorm.forward(embeds),
        );
        let (x, cache) = past.run(
            &self.transformer.h,
            "transformer.h",
            x,
            |block, x, kv, mask, rows| block.forward(x, &alibi, kv, mask, rows),
        );
        ModelOutput {
            hidden_states: top.add("ln_f.bias", self.transformer.ln_f.forward(x)),
            cache,
        }
    }

    fn lm_head(&self, hidden_states: Tensor<3>) -> Tensor<3> {
        tied_lm_head(hidden_states, &self.transformer.word_embeddings)
    }

    fn output_embeddings(&self) -> Option<Tensor<2>> {
        Some(self.transformer.word_embeddings.weight.val())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alibi_slopes_match_transformers() {
        // torch: _get_alibi_slopes(8) and (6) from transformers 5.23.
        let s8 = alibi_slopes(8);
        let expected8: Vec<f32> = (1..=8).map(|p| 0.5f32.powi(p)).collect();
        assert_eq!(s8, expected8);
        let s6 = alibi_slopes(6);
        let b4 = 2f64.powf(-(2f64.powf(-(2.0 - 3.0)))); // 0.25
        let b8 = 0.5f64;
        let expected6: Vec<f32> = vec![b4, b4.powi(2), b4.powi(3), b4.powi(4), b8, b8.powi(3)]
            .into_iter()
            .map(|v| v as f32)
            .collect();
        assert_eq!(s6, expected6);
    }
}
