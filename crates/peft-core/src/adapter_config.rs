//! PEFT's `adapter_config.json`: the method, and the fields every prompt-learning method shares.
//!
//! Unknown keys are tolerated (PEFT adds some every release); known keys with wrong values are
//! rejected with the key named, and so is an adapter made for another base model.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::adapter_file::{AdapterFileError, write_atomic};
use crate::json_config::{ConfigError, JsonConfig, fields};
use crate::model::ModelGeometry;

/// File name of PEFT's adapter configuration.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// Why an adapter directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// `adapter_config.json` is missing, malformed, or has a wrong value.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `adapter_model.safetensors` is missing, malformed, or does not fit.
    #[error(transparent)]
    File(#[from] AdapterFileError),
    /// The directory holds an adapter of another method.
    #[error("{path}: key `peft_type` is {found:?}, but a {expected} adapter was asked for")]
    WrongMethod {
        /// The config file.
        path: PathBuf,
        /// The method found.
        found: String,
        /// The method asked for.
        expected: &'static str,
    },
    /// An initialization the configuration asks for cannot be done (names the config field).
    #[error("{field}: {message}")]
    Init {
        /// The configuration field (e.g. `init_text`).
        field: &'static str,
        /// Why.
        message: String,
    },
}

/// The `peft_type` of an adapter config: the method's name as PEFT spells it. Core knows no
/// method: each method crate exports its own spelling as `PEFT_TYPE`, and the
/// facade holds the list of them.
pub fn peft_type(cfg: &JsonConfig) -> Result<&str, ConfigError> {
    cfg.opt_str("peft_type")?
        .ok_or_else(|| ConfigError::MissingKey {
            path: cfg.path().to_path_buf(),
            key: "peft_type".into(),
        })
}

/// Reads `dir/adapter_config.json` of an `expected` adapter, refusing another `peft_type` and a
/// `task_type` other than `CAUSAL_LM`; every method's loader starts here.
pub fn read_adapter_config(dir: &Path, expected: &'static str) -> Result<JsonConfig, AdapterError> {
    let cfg = JsonConfig::from_file(
        dir.join(ADAPTER_CONFIG),
        "the adapter's adapter_config.json",
    )?;
    let found = peft_type(&cfg)?;
    if found != expected {
        return Err(AdapterError::WrongMethod {
            path: cfg.path().to_path_buf(),
            found: found.to_string(),
            expected,
        });
    }
    if let Some(task) = cfg.opt_str("task_type")?
        && task != "CAUSAL_LM"
    {
        return Err(cfg
            .unsupported(
                "task_type",
                format!("must be \"CAUSAL_LM\", found {task:?}"),
            )
            .into());
    }
    Ok(cfg)
}

/// Checks a prompt-learning adapter's `num_virtual_tokens` before anything is allocated: at least
/// one, and (where the base has a position limit) room left in the context for a token of the row.
/// An absurd count would otherwise ask for terabytes and abort.
pub fn check_num_virtual_tokens(n: usize, geometry: &ModelGeometry) -> Result<(), AdapterError> {
    let error = |message: String| AdapterError::Init {
        field: "num_virtual_tokens",
        message,
    };
    if n == 0 {
        return Err(error("must be at least 1".into()));
    }
    if let Some(max) = geometry.max_positions
        && n >= max
    {
        return Err(error(format!(
            "is {n}, but the base model takes at most {max} positions (max_position_embeddings), \
             virtual tokens and the row together"
        )));
    }
    Ok(())
}

/// Checks an optional hidden width (`encoder_hidden_size`): `Some(0)` would build empty layers.
pub fn check_hidden_size(field: &'static str, size: Option<usize>) -> Result<(), AdapterError> {
    match size {
        Some(0) => Err(AdapterError::Init {
            field,
            message: "must be at least 1".into(),
        }),
        _ => Ok(()),
    }
}

/// Checks a dropout probability is in [0, 1).
pub fn check_dropout(field: &'static str, p: f64) -> Result<(), AdapterError> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(AdapterError::Init {
            field,
            message: format!("must be in [0, 1), found {p}"),
        })
    }
}

/// The fields PEFT's `PromptLearningConfig` gives every prompt-learning method, under PEFT's keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptLearningConfig {
    /// The method, as PEFT spells it (checked by [`read_adapter_config`]).
    pub peft_type: String,
    /// PEFT's task: `CAUSAL_LM` (checked by [`read_adapter_config`]).
    #[serde(default = "causal_lm")]
    pub task_type: String,
    /// Virtual tokens.
    #[serde(deserialize_with = "fields::positive")]
    pub num_virtual_tokens: usize,
    /// Width of one virtual token (hidden size; for prefix key/values: their width, GQA-reduced).
    #[serde(deserialize_with = "fields::positive")]
    pub token_dim: usize,
    /// Transformer stacks the prompt feeds: 1 for a decoder-only model (the only value read).
    #[serde(default, deserialize_with = "fields::opt_positive")]
    pub num_transformer_submodules: Option<usize>,
    /// Attention heads the adapter was shaped for (prefix key/values with GQA: key/value heads).
    #[serde(deserialize_with = "fields::positive")]
    pub num_attention_heads: usize,
    /// Decoder layers of the base model.
    #[serde(deserialize_with = "fields::positive")]
    pub num_layers: usize,
    /// The base model the adapter was trained on, as recorded.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// The base model's revision, as recorded.
    #[serde(default)]
    pub revision: Option<String>,
    /// Whether the adapter is saved for inference (PEFT writes `true`).
    #[serde(default = "yes")]
    pub inference_mode: bool,
    /// PEFT's auto-class mapping (kept as written).
    #[serde(default)]
    pub auto_mapping: Option<Value>,
    /// Extra trainable base modules (none for the methods here; kept as written).
    #[serde(default)]
    pub modules_to_save: Option<Value>,
    /// The PEFT version that wrote the file, when PEFT did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peft_version: Option<String>,
}

fn causal_lm() -> String {
    "CAUSAL_LM".into()
}

fn yes() -> bool {
    true
}

impl PromptLearningConfig {
    /// The shared fields of a new adapter, PEFT's defaults for the rest.
    pub fn new(
        peft_type: &str,
        num_virtual_tokens: usize,
        token_dim: usize,
        num_attention_heads: usize,
        num_layers: usize,
        base_model_name_or_path: Option<&str>,
    ) -> Self {
        Self {
            peft_type: peft_type.to_string(),
            task_type: causal_lm(),
            num_virtual_tokens,
            token_dim,
            num_transformer_submodules: Some(1),
            num_attention_heads,
            num_layers,
            base_model_name_or_path: base_model_name_or_path.map(str::to_string),
            revision: None,
            inference_mode: true,
            auto_mapping: None,
            modules_to_save: None,
            peft_version: None,
        }
    }

    /// Reads `dir/adapter_config.json` of an `expected` adapter (see [`read_adapter_config`]),
    /// returning the shared fields and the whole file (for the method's own keys). Also rejects
    /// `num_transformer_submodules` other than 1.
    pub fn read_method(
        dir: &Path,
        expected: &'static str,
    ) -> Result<(Self, JsonConfig), AdapterError> {
        let cfg = read_adapter_config(dir, expected)?;
        let config: Self = cfg.parse()?;
        if let Some(n) = config.num_transformer_submodules
            && n != 1
        {
            return Err(cfg
                .unsupported(
                    "num_transformer_submodules",
                    format!("must be 1 for a decoder-only model, found {n}"),
                )
                .into());
        }
        Ok((config, cfg))
    }

    /// Checks the adapter fits a base model of `geometry`, given the `token_dim` and heads the
    /// method derives from it; the error names the key that does not fit.
    pub fn check_base(
        &self,
        cfg: &JsonConfig,
        geometry: &ModelGeometry,
        token_dim: usize,
        heads: usize,
    ) -> Result<(), ConfigError> {
        let mismatch = |key: &str, found: usize, expected: usize| {
            cfg.unsupported(
                key,
                format!("is {found} but the base model needs {expected}: the adapter was made for another model"),
            )
        };
        if self.token_dim != token_dim {
            return Err(mismatch("token_dim", self.token_dim, token_dim));
        }
        if self.num_layers != geometry.num_layers {
            return Err(mismatch("num_layers", self.num_layers, geometry.num_layers));
        }
        if self.num_attention_heads != heads {
            return Err(mismatch(
                "num_attention_heads",
                self.num_attention_heads,
                heads,
            ));
        }
        Ok(())
    }
}

/// A prompt-learning method's `adapter_config.json`: the shared fields and the method's own keys
/// `K`, one JSON object. Read and written through the same two serde types, so every key written
/// is read back; keys neither knows are tolerated on reading.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptLearningFile<K> {
    /// The fields every prompt-learning method has.
    #[serde(flatten)]
    pub shared: PromptLearningConfig,
    /// The method's own keys.
    #[serde(flatten)]
    pub method: K,
}

impl<K: Serialize + DeserializeOwned> PromptLearningFile<K> {
    /// Reads `dir/adapter_config.json` of an `expected` adapter, returning it with the parsed file
    /// (for errors that name a key).
    ///
    /// # Errors
    ///
    /// A missing or malformed file, another method or task, a value that does not deserialize
    /// (naming its key), or `num_transformer_submodules` other than 1.
    pub fn read(dir: &Path, expected: &'static str) -> Result<(Self, JsonConfig), AdapterError> {
        let (shared, cfg) = PromptLearningConfig::read_method(dir, expected)?;
        // Parsed apart, not through serde's `flatten`, so that an error names its key.
        let method = cfg.parse()?;
        Ok((Self { shared, method }, cfg))
    }

    /// The JSON object written (sorted by [`write_config`]).
    pub fn to_json(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            _ => unreachable!("two structs of plain fields serialize to one object"),
        }
    }
}

/// Writes an `adapter_config.json` (sorted keys, as PEFT does) into `dir`, atomically.
pub fn write_config(dir: &Path, config: &Map<String, Value>) -> Result<(), AdapterFileError> {
    let path = dir.join(ADAPTER_CONFIG);
    let sorted: std::collections::BTreeMap<_, _> = config.iter().collect();
    let text = serde_json::to_string_pretty(&sorted).expect("JSON values serialize") + "\n";
    write_atomic(&path, text.as_bytes()).map_err(|source| AdapterFileError::Io { path, source })
}

/// Writes an adapter directory `dir` (created if needed): `adapter_model.safetensors` with
/// `weights` (PEFT's inference form), our trainable checkpoint `adapter_encoder.safetensors` with
/// `encoder` (or, when `None`, the removal of a stale one, so the directory never pairs new
/// weights with an old encoder), and last `adapter_config.json`. Each file is written atomically.
pub fn write_adapter_dir(
    dir: &Path,
    config: &Map<String, Value>,
    weights: Vec<(&str, burn::tensor::TensorData)>,
    encoder: Option<Vec<(String, burn::tensor::TensorData)>>,
) -> Result<(), AdapterFileError> {
    use crate::adapter_file::{ADAPTER_ENCODER, ADAPTER_WEIGHTS, write_tensors};
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AdapterFileError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    write_tensors(&dir.join(ADAPTER_WEIGHTS), weights)?;
    let encoder_path = dir.join(ADAPTER_ENCODER);
    match encoder {
        Some(tensors) => write_tensors(
            &encoder_path,
            tensors
                .iter()
                .map(|(n, d)| (n.as_str(), d.clone()))
                .collect(),
        )?,
        None if encoder_path.exists() => {
            std::fs::remove_file(&encoder_path).map_err(io(&encoder_path))?
        }
        None => {}
    }
    write_config(dir, config)
}
