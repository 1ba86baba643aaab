//! BitFit for peft-burn: only bias terms train (Ben Zaken et al., 2022).
//!
//! The adapter holds no parameters of its own: it freezes the base model and unfreezes its
//! biases — every parameter whose Hugging Face name ends in `.bias`, or the subset a regular
//! expression selects (e.g. `query_key_value|dense_h_to_4h` for the paper's ablation). On Qwen2
//! that is the q/k/v projection biases; on BLOOM every Linear and LayerNorm bias, the embedding
//! LayerNorm and `ln_f` included; on Llama the attention/MLP biases when the config has them.
//!
//! PEFT has no BitFit, so the file format is ours, in PEFT's spirit: `adapter_config.json` with
//! `"peft_type": "BITFIT"` and `bias_pattern`, and `adapter_model.safetensors` holding the trained
//! biases under their Hugging Face tensor names, so merging into a checkpoint is a key overwrite.
#![warn(missing_docs)]

use std::path::Path;

use burn::prelude::*;
use peft_core::adapter_config::{AdapterError, read_adapter_config, write_adapter_dir};
use peft_core::adapter_file::{ADAPTER_WEIGHTS, AdapterFileError, TensorFile};
use peft_core::method::parse_options;
use peft_core::params::{read_params, unfreeze_params, write_params};
use peft_core::{
    Adapter, BaseShape, BiasDeltas, CausalLm, Injection, Method, MethodConfig, ModelGeometry,
    Preset, TrainableParameters,
};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The method's `peft_type`, as PEFT spells it in `adapter_config.json` (ours: PEFT has no BitFit).
pub const PEFT_TYPE: &str = "BITFIT";

/// A `bias_pattern` that is not a valid regular expression.
#[derive(Debug, thiserror::Error)]
#[error("bias_pattern {pattern:?} is not a valid regular expression: {message}")]
pub struct PatternError {
    /// The pattern given.
    pub pattern: String,
    /// What is wrong with it.
    pub message: String,
}

/// A BitFit `adapter_config.json` (ours: PEFT has no BitFit), in PEFT's style.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BitFitFile {
    /// `BITFIT`.
    pub peft_type: String,
    /// `CAUSAL_LM`.
    #[serde(default = "causal_lm")]
    pub task_type: String,
    /// [`BitFitConfig::bias_pattern`].
    #[serde(default)]
    pub bias_pattern: Option<String>,
    /// The base model the adapter was trained on, as recorded.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Whether the adapter is saved for inference.
    #[serde(default)]
    pub inference_mode: bool,
}

fn causal_lm() -> String {
    "CAUSAL_LM".into()
}

/// Which biases train.
#[derive(Config, Debug)]
pub struct BitFitConfig {
    /// A regular expression over Hugging Face parameter names: only the biases it matches (searched
    /// anywhere in the name) train. `None`: every bias.
    pub bias_pattern: Option<String>,
}

impl BitFitConfig {
    /// The adapter.
    ///
    /// # Errors
    ///
    /// If `bias_pattern` is not a valid regular expression.
    pub fn init(&self) -> Result<BitFit, PatternError> {
        let pattern = self
            .bias_pattern
            .as_deref()
            .map(|p| {
                Regex::new(p).map_err(|e| PatternError {
                    pattern: p.to_string(),
                    message: e.to_string(),
                })
            })
            .transpose()?;
        Ok(BitFit {
            pattern,
            biases: Vec::new(),
        })
    }
}

/// The options `BitFitConfig::from_options` reads.
#[derive(Debug, Deserialize)]
struct BitFitOptions {
    #[serde(default)]
    bias_pattern: Option<String>,
}

impl MethodConfig for BitFitConfig {
    type Method = BitFit;

    /// Keys: `bias_pattern`.
    fn from_options(options: &Map<String, Value>, _: &ModelGeometry) -> Result<Self, AdapterError> {
        let options: BitFitOptions = parse_options(options)?;
        Ok(Self::new().with_bias_pattern(options.bias_pattern))
    }

    /// Nothing to check before the base is known: the pattern is checked against its biases.
    fn validate(&self, _: &ModelGeometry) -> Result<(), AdapterError> {
        Ok(())
    }

    fn init<M: CausalLm>(&self, base: &M, _: &[u32]) -> Result<BitFit, AdapterError> {
        let bitfit = self.checked()?;
        bitfit.check_base(&BaseShape::of(base))?;
        Ok(bitfit)
    }

    /// The selected biases train; they are the base's own, so the total is the base's.
    fn trainable_parameters(&self, base: &BaseShape) -> Result<TrainableParameters, AdapterError> {
        let bitfit = self.checked()?;
        Ok(TrainableParameters {
            trainable: bitfit.count(
                base.parameters
                    .iter()
                    .map(|(name, shape)| (name.as_str(), shape.iter().product())),
            ),
            all: base.num_params(),
        })
    }
}

impl BitFitConfig {
    /// [`BitFitConfig::init`] with the pattern's error as the field's.
    fn checked(&self) -> Result<BitFit, AdapterError> {
        self.init().map_err(|e| AdapterError::Init {
            field: "bias_pattern",
            message: format!(
                "{:?} is not a valid regular expression: {}",
                e.pattern, e.message
            ),
        })
    }
}

/// The BitFit adapter: which of the base model's biases train.
#[derive(Module, Debug)]
pub struct BitFit {
    #[module(skip)]
    pattern: Option<Regex>,
    /// Biases read from an adapter directory by [`Method::read`], by Hugging Face name, until
    /// [`Adapter::load`] puts them into the model or [`Method::write`] writes them out. Empty for
    /// an adapter made by `init`: its biases live in the model it trains.
    #[module(skip)]
    biases: Vec<(String, TensorData)>,
}

impl BitFit {
    /// Whether the parameter of Hugging Face name `name` trains.
    pub fn selects(&self, name: &str) -> bool {
        name.ends_with(".bias") && self.pattern.as_ref().is_none_or(|p| p.is_match(name))
    }

    /// The pattern, as written in `adapter_config.json`.
    pub fn bias_pattern(&self) -> Option<&str> {
        self.pattern.as_ref().map(Regex::as_str)
    }

    /// Checks the adapter has something to train in `base`: a base model without biases, or a
    /// `bias_pattern` that matches none of them, would train nothing.
    ///
    /// # Errors
    ///
    /// [`AdapterError::Init`] naming `bias_pattern`.
    pub fn check_base(&self, base: &BaseShape) -> Result<(), AdapterError> {
        let biases: Vec<&String> = base
            .parameters
            .iter()
            .map(|(name, _)| name)
            .filter(|name| name.ends_with(".bias"))
            .collect();
        if biases.iter().any(|name| self.selects(name)) {
            return Ok(());
        }
        let message = match (self.bias_pattern(), biases.first()) {
            (_, None) => "the base model has no biases, so BitFit has nothing to train".to_string(),
            (Some(pattern), Some(example)) => format!(
                "{pattern:?} matches none of the base model's {} biases (e.g. `{example}`)",
                biases.len()
            ),
            (None, Some(_)) => unreachable!("without a pattern every bias is selected"),
        };
        Err(AdapterError::Init {
            field: "bias_pattern",
            message,
        })
    }

    /// Trainable parameters among `params` (Hugging Face name, element count): what PEFT's report
    /// would count, from names and shapes alone.
    pub fn count<'a>(&self, params: impl IntoIterator<Item = (&'a str, usize)>) -> usize {
        params
            .into_iter()
            .filter(|(name, _)| self.selects(name))
            .map(|(_, n)| n)
            .sum()
    }

    /// The selected biases of `base`, by Hugging Face name.
    pub fn biases<M: Module>(&self, base: &M) -> Vec<(String, TensorData)> {
        read_params(base, |name| self.selects(name))
    }

    /// Writes `biases` into `dir` (created if needed): `adapter_model.safetensors` (Hugging Face
    /// names, F32) and `adapter_config.json`, each atomically.
    fn write_biases(
        &self,
        dir: &Path,
        biases: &[(String, TensorData)],
        base_model_name_or_path: Option<&str>,
    ) -> Result<(), AdapterError> {
        let file = BitFitFile {
            peft_type: PEFT_TYPE.into(),
            task_type: "CAUSAL_LM".into(),
            bias_pattern: self.bias_pattern().map(str::to_string),
            base_model_name_or_path: base_model_name_or_path.map(str::to_string),
            inference_mode: true,
        };
        let Ok(serde_json::Value::Object(map)) = serde_json::to_value(&file) else {
            unreachable!("a struct of plain fields serializes to an object")
        };
        write_adapter_dir(
            dir,
            &map,
            biases
                .iter()
                .map(|(n, d)| (n.as_str(), d.clone()))
                .collect(),
            None,
        )?;
        Ok(())
    }
}

impl Adapter for BitFit {
    fn num_virtual_tokens(&self) -> usize {
        0
    }

    fn inject(&self, _batch: usize) -> Injection {
        Injection::default()
    }

    /// Writes the selected biases of `base`, where training left them.
    fn save<M: CausalLm>(
        &self,
        dir: &Path,
        base: &M,
        base_model_name_or_path: Option<&str>,
    ) -> Result<(), AdapterError> {
        self.write_biases(dir, &self.biases(base), base_model_name_or_path)
    }

    /// Reads the directory and puts its biases into `base`, replacing the model's.
    fn load<M: CausalLm>(dir: &Path, base: M) -> Result<(M, Self), AdapterError> {
        let mut adapter = Self::read(dir, &BaseShape::of(&base), &base.device())?;
        let mut values = std::mem::take(&mut adapter.biases).into_iter().collect();
        Ok((write_params(base, &mut values), adapter))
    }

    fn changes_base_weights(&self) -> bool {
        true
    }

    /// The biases read from the adapter directory minus `base`'s own (`None` for an adapter made
    /// by `init`, whose biases live in the model it trains).
    fn bias_deltas<M: CausalLm>(&self, base: &M) -> Option<BiasDeltas> {
        if self.biases.is_empty() {
            return None;
        }
        let device = base.device();
        let mut own: std::collections::HashMap<String, TensorData> =
            read_params(base, |name| self.biases.iter().any(|(n, _)| n == name))
                .into_iter()
                .collect();
        let mut deltas = Vec::with_capacity(self.biases.len());
        for (name, trained) in &self.biases {
            // `read` checked every name against the base's shape.
            let own = own.remove(name)?;
            let dtype = own.dtype();
            let size = trained.num_elements();
            let trained = Tensor::<1>::from_data(trained.clone().convert::<f32>(), &device);
            let own = Tensor::<1>::from_data(own.convert::<f32>(), &device);
            deltas.push((name.clone(), (trained - own).reshape([1, size]).cast(dtype)));
        }
        Some(BiasDeltas::new(deltas))
    }

    /// Freezes the base, then unfreezes the selected biases.
    fn prepare_base<M: Module>(&self, base: M) -> M {
        unfreeze_params(base.freeze(), |name| self.selects(name))
    }
}

impl Method for BitFit {
    const PEFT_TYPE: &'static str = PEFT_TYPE;
    type Config = BitFitConfig;
    const PRESETS: &'static [Preset] = &[Preset {
        name: "bitfit",
        summary: "BitFit: the base model's biases only",
        options: "{}",
        learning_rate: 1e-3,
        tiny_model_learning_rate: 1e-1,
    }];

    /// Reads a BitFit adapter directory made for a model of shape `base`, checking every tensor
    /// fits; the adapter holds the biases until [`Adapter::load`] puts them into a model.
    ///
    /// # Errors
    ///
    /// A missing or malformed file, another method, an invalid `bias_pattern`, or an adapter that
    /// does not fit `base`: a tensor the model has no bias of that name for, one of the wrong
    /// shape, or a selected bias missing from the file; each names the file and the key or tensor.
    fn read(dir: &Path, base: &BaseShape, _device: &Device) -> Result<Self, AdapterError> {
        let cfg = read_adapter_config(dir, PEFT_TYPE)?;
        let file: BitFitFile = cfg.parse()?;
        let mut adapter = BitFitConfig::new()
            .with_bias_pattern(file.bias_pattern)
            .init()
            .map_err(|e| cfg.unsupported("bias_pattern", e.to_string()))?;

        let path = dir.join(ADAPTER_WEIGHTS);
        let file = TensorFile::open(&path)?;
        let shapes: std::collections::HashMap<&str, &Vec<usize>> = base
            .parameters
            .iter()
            .map(|(name, shape)| (name.as_str(), shape))
            .collect();
        let mut biases = Vec::new();
        for name in file.names() {
            let shape = shapes
                .get(name.as_str())
                .filter(|_| adapter.selects(&name))
                .ok_or_else(|| AdapterFileError::UnexpectedTensor {
                    path: path.clone(),
                    name: name.clone(),
                    why: "is not a bias the adapter trains in this base model: the adapter was made for another model or another bias_pattern".into(),
                })?;
            let data = file.data(&name, shape, "the base model's bias of that name")?;
            biases.push((name, data));
        }
        let read: std::collections::HashSet<&str> =
            biases.iter().map(|(name, _)| name.as_str()).collect();
        if let Some(missing) = base
            .parameters
            .iter()
            .map(|(name, _)| name)
            .filter(|name| adapter.selects(name) && !read.contains(name.as_str()))
            .min()
        {
            return Err(AdapterFileError::MissingTensor {
                path,
                name: missing.clone(),
            }
            .into());
        }
        adapter.biases = biases;
        Ok(adapter)
    }

    /// Writes the biases [`Method::read`] read (a BitFit made by `init` holds none: its biases
    /// are in the model, which [`Adapter::save`] reads).
    fn write(
        &self,
        dir: &Path,
        _base: &BaseShape,
        base_model_name_or_path: Option<&str>,
    ) -> Result<(), AdapterError> {
        if self.biases.is_empty() {
            return Err(AdapterError::Init {
                field: "bias_pattern",
                message: "this BitFit adapter holds no biases (they are in the model it trains): \
                          save it with its model"
                    .into(),
            });
        }
        self.write_biases(dir, &self.biases, base_model_name_or_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_biases_and_the_pattern_narrows_them() {
        let all = BitFitConfig::new().init().unwrap();
        assert!(all.selects("transformer.h.0.input_layernorm.bias"));
        assert!(!all.selects("transformer.h.0.input_layernorm.weight"));
        assert!(!all.selects("model.bias_free.weight"));
        let some = BitFitConfig::new()
            .with_bias_pattern(Some("query_key_value|dense_h_to_4h".into()))
            .init()
            .unwrap();
        assert!(some.selects("transformer.h.3.self_attention.query_key_value.bias"));
        assert!(!some.selects("transformer.h.3.self_attention.dense.bias"));
        assert_eq!(
            some.count([
                ("a.query_key_value.bias", 3),
                ("a.dense.bias", 5),
                ("a.dense_h_to_4h.bias", 7)
            ]),
            10
        );
        let err = BitFitConfig::new()
            .with_bias_pattern(Some("(".into()))
            .init()
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("bias_pattern \"(\" is not a valid regular expression"),
            "{err}"
        );
    }

    #[test]
    fn counts_and_checks_from_the_base_shape_and_refuses_to_write_biases_it_does_not_hold() {
        let geometry = ModelGeometry {
            num_layers: 1,
            hidden_size: 4,
            num_attention_heads: 1,
            num_key_value_heads: 1,
            head_dim: 4,
            vocab_size: 8,
            max_positions: None,
        };
        let base = BaseShape::new(
            geometry,
            vec![
                ("h.0.attn.weight".into(), vec![4, 12]),
                ("h.0.attn.bias".into(), vec![12]),
                ("h.0.mlp.bias".into(), vec![4]),
            ],
        );
        let config = BitFitConfig::new().with_bias_pattern(Some("attn".into()));
        let counts = config.trainable_parameters(&base).unwrap();
        assert_eq!((counts.trainable, counts.all), (12, 48 + 12 + 4));
        let none = BitFitConfig::new().with_bias_pattern(Some("lm_head".into()));
        let err = none
            .init()
            .unwrap()
            .check_base(&base)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("matches none of the base model's 2 biases (e.g. `h.0.attn.bias`)"),
            "{err}"
        );
        let bad = BitFitConfig::new().with_bias_pattern(Some("(".into()));
        let err = bad.trainable_parameters(&base).unwrap_err().to_string();
        assert!(
            err.starts_with("bias_pattern: \"(\" is not a valid regular expression"),
            "{err}"
        );
        // Made by init, the adapter's biases are in the model: only Adapter::save can write them.
        let dir = std::env::temp_dir().join("peft-bitfit-never-written");
        let err = config
            .init()
            .unwrap()
            .write(&dir, &base, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds no biases"), "{err}");
        assert!(!dir.exists());
    }
}
