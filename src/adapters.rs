//! Any adapter of the workspace, chosen by `peft_type` in `adapter_config.json` or by a preset's
//! name. The table at the end of this file is the one place that lists the methods: everything
//! here (and `peft`'s `--method`, `info`, `export`, `train`, `quickstart` and the bench) derives
//! from it.

use std::path::Path;

use burn::prelude::*;
use peft_core::adapter_config::{ADAPTER_CONFIG, AdapterError, peft_type};
use peft_core::json_config::JsonConfig;
use peft_core::{
    Adapter, BaseShape, CausalLm, InitText, Injection, Method, MethodConfig, ModelGeometry, Preset,
    TrainableParameters,
};
use serde_json::{Map, Value};

/// A preset of some method: what `--method NAME` names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MethodPreset {
    /// The method's `peft_type`.
    pub peft_type: &'static str,
    /// The preset.
    pub preset: &'static Preset,
}

impl MethodPreset {
    /// The preset's configuration for a base of `geometry`: the preset's options, overridden by
    /// `options` (the method's config keys, as in its `adapter_config.json`).
    ///
    /// # Errors
    ///
    /// An option of the wrong type or value, naming its key.
    pub fn config(
        &self,
        options: &Map<String, Value>,
        geometry: &ModelGeometry,
    ) -> Result<AutoAdapterConfig, AdapterError> {
        let mut merged = self.preset.option_map();
        merged.extend(options.iter().map(|(k, v)| (k.clone(), v.clone())));
        AutoAdapterConfig::from_options(self.peft_type, &merged, geometry)
    }
}

/// The preset named `name` (`prompt-tuning`, `p-tuning-v2`, ...), if any method offers it.
pub fn preset(name: &str) -> Option<MethodPreset> {
    presets().into_iter().find(|p| p.preset.name == name)
}

/// Reads `dir/adapter_config.json` and its `peft_type`, which must be one of [`PEFT_TYPES`].
///
/// # Errors
///
/// A missing or malformed file, or a `peft_type` no crate of the workspace implements.
pub fn read_peft_type(dir: &Path) -> Result<(JsonConfig, &'static str), AdapterError> {
    let cfg = JsonConfig::from_file(
        dir.join(ADAPTER_CONFIG),
        "the adapter's adapter_config.json",
    )?;
    let found = peft_type(&cfg)?;
    match PEFT_TYPES.iter().find(|known| **known == found) {
        Some(known) => Ok((cfg, known)),
        None => Err(cfg
            .unsupported(
                "peft_type",
                format!("{found:?} is not supported ({})", PEFT_TYPES.join(", ")),
            )
            .into()),
    }
}

/// The adapter of `dir`, made for a base of shape `base`, written to `out` in its inference form
/// (an encoder folded into its output, as PEFT's files hold it): what `peft export` does, from the
/// base's config alone.
///
/// # Errors
///
/// As [`AutoAdapter::read`], or a file that cannot be written.
pub fn export(
    dir: &Path,
    base: &BaseShape,
    device: &Device,
    out: &Path,
) -> Result<(), AdapterError> {
    let (cfg, _) = read_peft_type(dir)?;
    let base_model_name_or_path = cfg.opt_str("base_model_name_or_path")?;
    AutoAdapter::read(dir, base, device)?
        .into_inference()
        .write(out, base, base_model_name_or_path)
}

/// Declares [`AutoAdapter`], [`AutoAdapterConfig`], [`PEFT_TYPES`] and [`presets`] over the
/// methods of the table below.
macro_rules! methods {
    ($($(#[$doc:meta])* $variant:ident($adapter:ty),)+) => {
        /// The configuration of an adapter of any method.
        #[derive(Debug, Clone)]
        pub enum AutoAdapterConfig {
            $($(#[$doc])* $variant(<$adapter as Method>::Config),)+
        }

        /// An adapter of any method.
        #[derive(Module, Debug)]
        pub enum AutoAdapter {
            $($(#[$doc])* $variant($adapter),)+
        }

        /// Every method of the workspace by PEFT's `peft_type`, in table order.
        pub const PEFT_TYPES: &[&str] = &[$(<$adapter as Method>::PEFT_TYPE),+];

        /// Every preset of every method, in table order: the values of `peft train --method`.
        pub fn presets() -> Vec<MethodPreset> {
            let mut out = Vec::new();
            $(
                out.extend(<$adapter as Method>::PRESETS.iter().map(|preset| MethodPreset {
                    peft_type: <$adapter as Method>::PEFT_TYPE,
                    preset,
                }));
            )+
            out
        }

        /// Calls `$body` with `$c` bound to the configuration inside any variant.
        macro_rules! each_config {
            ($self_:expr, $c:ident => $body:expr) => {
                match $self_ {
                    $(AutoAdapterConfig::$variant($c) => $body,)+
                }
            };
        }

        /// Calls `$body` with `$a` bound to the adapter inside any variant.
        macro_rules! each {
            ($self_:expr, $a:ident => $body:expr) => {
                match $self_ {
                    $(AutoAdapter::$variant($a) => $body,)+
                }
            };
        }

        impl AutoAdapterConfig {
            /// The configuration of method `peft_type` for a base of `geometry`, from `options`
            /// (the method's config keys, as in its `adapter_config.json`).
            ///
            /// # Errors
            ///
            /// An unknown `peft_type`, or an option of the wrong type or value, naming the key.
            pub fn from_options(
                peft_type: &str,
                options: &Map<String, Value>,
                geometry: &ModelGeometry,
            ) -> Result<Self, AdapterError> {
                $(
                    if peft_type == <$adapter as Method>::PEFT_TYPE {
                        return Ok(Self::$variant(
                            <<$adapter as Method>::Config as MethodConfig>::from_options(
                                options, geometry,
                            )?,
                        ));
                    }
                )+
                Err(AdapterError::Init {
                    field: "peft_type",
                    message: format!(
                        "{peft_type:?} is not supported ({})",
                        PEFT_TYPES.join(", ")
                    ),
                })
            }

            /// The method's `peft_type`.
            pub fn peft_type(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => <$adapter as Method>::PEFT_TYPE,)+
                }
            }

            /// A fresh adapter for `base`, on its device: see [`MethodConfig::init`].
            ///
            /// # Errors
            ///
            /// As [`MethodConfig::init`].
            pub fn init<M: CausalLm>(
                &self,
                base: &M,
                init_text_ids: &[u32],
            ) -> Result<AutoAdapter, AdapterError> {
                Ok(match self {
                    $(Self::$variant(c) => AutoAdapter::$variant(MethodConfig::init(c, base, init_text_ids)?),)+
                })
            }
        }

        impl AutoAdapter {
            /// The method's `peft_type`.
            pub fn peft_type(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => <$adapter as Method>::PEFT_TYPE,)+
                }
            }

            /// Reads the adapter directory `dir`, of the method its `peft_type` names, made for a
            /// base of shape `base`, onto `device`: see [`Method::read`].
            ///
            /// # Errors
            ///
            /// An unknown `peft_type`, or as [`Method::read`].
            pub fn read(dir: &Path, base: &BaseShape, device: &Device) -> Result<Self, AdapterError> {
                let (_, peft_type) = read_peft_type(dir)?;
                $(
                    if peft_type == <$adapter as Method>::PEFT_TYPE {
                        return Ok(Self::$variant(<$adapter as Method>::read(dir, base, device)?));
                    }
                )+
                unreachable!("read_peft_type returns one of PEFT_TYPES")
            }

            /// Writes the adapter's files: see [`Method::write`].
            ///
            /// # Errors
            ///
            /// As [`Method::write`].
            pub fn write(
                &self,
                dir: &Path,
                base: &BaseShape,
                base_model_name_or_path: Option<&str>,
            ) -> Result<(), AdapterError> {
                each!(self, a => a.write(dir, base, base_model_name_or_path))
            }
        }

        impl Adapter for AutoAdapter {
            fn num_virtual_tokens(&self) -> usize {
                each!(self, a => a.num_virtual_tokens())
            }

            fn num_prefix_positions(&self) -> usize {
                each!(self, a => a.num_prefix_positions())
            }

            fn inject(&self, batch: usize) -> Injection {
                each!(self, a => a.inject(batch))
            }

            fn changes_base_weights(&self) -> bool {
                each!(self, a => a.changes_base_weights())
            }

            fn bias_deltas<M: CausalLm>(&self, base: &M) -> Option<peft_core::BiasDeltas> {
                each!(self, a => a.bias_deltas(base))
            }

            fn prepare_base<M: Module>(&self, base: M) -> M {
                each!(self, a => a.prepare_base(base))
            }

            fn save<M: CausalLm>(
                &self,
                dir: &Path,
                base: &M,
                base_model_name_or_path: Option<&str>,
            ) -> Result<(), AdapterError> {
                each!(self, a => Adapter::save(a, dir, base, base_model_name_or_path))
            }

            /// Reads `peft_type` from `dir/adapter_config.json` and loads that method.
            fn load<M: CausalLm>(dir: &Path, base: M) -> Result<(M, Self), AdapterError> {
                let (_, peft_type) = read_peft_type(dir)?;
                $(
                    if peft_type == <$adapter as Method>::PEFT_TYPE {
                        let (base, a) = <$adapter as Adapter>::load(dir, base)?;
                        return Ok((base, Self::$variant(a)));
                    }
                )+
                unreachable!("read_peft_type returns one of PEFT_TYPES")
            }

            fn into_inference(self) -> Self {
                match self {
                    $(Self::$variant(a) => Self::$variant(a.into_inference()),)+
                }
            }
        }
    };
}

// The methods, one line each (their crates' `Method` impls say the rest).
methods! {
    /// Prompt tuning (`PROMPT_TUNING`).
    PromptTuning(peft_prompt::PromptEmbedding),
    /// P-tuning (`P_TUNING`), an MLP or LSTM encoder.
    PTuning(peft_ptuning::PromptEncoder),
    /// Prefix tuning with or without projection (`PREFIX_TUNING`).
    PrefixTuning(peft_prefix::PrefixEncoder),
    /// BitFit (`BITFIT`).
    BitFit(peft_bitfit::BitFit),
}

impl AutoAdapterConfig {
    /// Checks the configuration fits a base model of `geometry` before anything is allocated.
    ///
    /// # Errors
    ///
    /// [`AdapterError::Init`] naming the configuration field.
    pub fn validate(&self, geometry: &ModelGeometry) -> Result<(), AdapterError> {
        each_config!(self, c => c.validate(geometry))
    }

    /// Text the adapter starts from, if any: see [`MethodConfig::init_text`].
    pub fn init_text(&self) -> Option<InitText<'_>> {
        each_config!(self, c => c.init_text())
    }

    /// PEFT's trainable-parameter numbers on a base of shape `base`, from shapes alone.
    ///
    /// # Errors
    ///
    /// A configuration that cannot be applied to `base`, naming the field.
    pub fn trainable_parameters(
        &self,
        base: &BaseShape,
    ) -> Result<TrainableParameters, AdapterError> {
        each_config!(self, c => c.trainable_parameters(base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_names_are_unique() {
        let presets = presets();
        let geometry = ModelGeometry {
            num_layers: 2,
            hidden_size: 8,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            vocab_size: 16,
            max_positions: Some(64),
        };
        let mut options = Map::new();
        options.insert("num_virtual_tokens".into(), 3.into());
        for (i, p) in presets.iter().enumerate() {
            assert!(
                presets[..i].iter().all(|q| q.preset.name != p.preset.name),
                "{} twice",
                p.preset.name
            );
            let config = p.config(&options, &geometry).unwrap();
            assert_eq!(config.peft_type(), p.peft_type);
            config.validate(&geometry).unwrap();
        }
        assert_eq!(presets.len(), 5);
        let AutoAdapterConfig::PrefixTuning(v2) = preset("p-tuning-v2")
            .unwrap()
            .config(&options, &geometry)
            .unwrap()
        else {
            panic!()
        };
        assert!(!v2.prefix_projection);
    }
}
