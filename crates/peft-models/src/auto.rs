//! Loading any supported model from a Hugging Face model directory.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::DType;
use peft_core::{CausalLm, ModelGeometry, ModelInput, ModelOutput};

use crate::bloom::{BloomConfig, BloomForCausalLM};
use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::hf_config::{ConfigError, HfConfig};
use crate::qwen2::{Qwen2Config, Qwen2ForCausalLM};

/// Any causal LM this crate implements, chosen by `model_type` in `config.json`.
#[derive(Module, Debug)]
pub enum AutoCausalLm {
    /// `qwen2` or `llama`.
    Qwen2(Qwen2ForCausalLM),
    /// `bloom`.
    Bloom(BloomForCausalLM),
}

/// Architecture and sizes read from a `config.json`, before any weight is touched.
#[derive(Debug, Clone, PartialEq)]
pub enum AutoConfig {
    /// `qwen2` or `llama`.
    Qwen2(Qwen2Config),
    /// `bloom`.
    Bloom(BloomConfig),
}

impl AutoConfig {
    /// Reads `config.json` (a file) and picks the architecture from `model_type`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_hf(&HfConfig::from_file(path, "the model's config.json")?)
    }

    /// Picks the architecture of a parsed config.
    pub fn from_hf(cfg: &HfConfig) -> Result<Self> {
        match cfg.opt_str("model_type")? {
            Some("qwen2" | "llama") => Ok(Self::Qwen2(Qwen2Config::from_hf(cfg)?)),
            Some("bloom") => Ok(Self::Bloom(BloomConfig::from_hf(cfg)?)),
            Some(other) => Err(ModelError::UnsupportedModelType {
                path: cfg.path().to_path_buf(),
                model_type: other.to_string(),
            }),
            None => Err(ConfigError::MissingKey {
                path: cfg.path().to_path_buf(),
                key: "model_type".into(),
            }
            .into()),
        }
    }

    /// Geometry adapters see.
    pub fn geometry(&self) -> ModelGeometry {
        match self {
            Self::Qwen2(c) => c.geometry(),
            Self::Bloom(c) => c.geometry(),
        }
    }

    /// Every parameter as (Hugging Face name, element count), from the config alone; their sum is
    /// the model's size with a tied `lm_head` counted once, as PEFT counts it.
    pub fn parameter_sizes(&self) -> Vec<(String, usize)> {
        match self {
            Self::Qwen2(c) => c.parameter_sizes(),
            Self::Bloom(c) => c.parameter_sizes(),
        }
    }

    /// A model of this shape with random weights.
    pub fn init(&self, device: &Device) -> AutoCausalLm {
        match self {
            Self::Qwen2(c) => AutoCausalLm::Qwen2(c.init(device)),
            Self::Bloom(c) => AutoCausalLm::Bloom(c.init(device)),
        }
    }
}

impl AutoCausalLm {
    /// Loads `dir/config.json` and the weights (`model.safetensors` or a sharded index) onto
    /// `device`, converting them to `dtype` (F32, F16 or BF16). Every tensor of the checkpoint must
    /// be used and have the shape the config implies.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &Device, dtype: DType) -> Result<Self> {
        let dir = dir.as_ref();
        let config = AutoConfig::from_file(dir.join("config.json"))?;
        let mut ckpt = Checkpoint::open_dir(dir, device, dtype)?;
        let model = match &config {
            AutoConfig::Qwen2(c) => Self::Qwen2(Qwen2ForCausalLM::load(c, &mut ckpt)?),
            AutoConfig::Bloom(c) => Self::Bloom(BloomForCausalLM::load(c, &mut ckpt)?),
        };
        ckpt.finish()?;
        Ok(model)
    }
}

impl CausalLm for AutoCausalLm {
    fn geometry(&self) -> ModelGeometry {
        match self {
            Self::Qwen2(m) => m.geometry(),
            Self::Bloom(m) => m.geometry(),
        }
    }

    fn device(&self) -> Device {
        match self {
            Self::Qwen2(m) => m.device(),
            Self::Bloom(m) => m.device(),
        }
    }

    fn embed_tokens(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        match self {
            Self::Qwen2(m) => m.embed_tokens(input_ids),
            Self::Bloom(m) => m.embed_tokens(input_ids),
        }
    }

    fn word_embeddings(&self) -> Tensor<2> {
        match self {
            Self::Qwen2(m) => m.word_embeddings(),
            Self::Bloom(m) => m.word_embeddings(),
        }
    }

    fn forward_hidden(&self, input: ModelInput) -> ModelOutput {
        match self {
            Self::Qwen2(m) => m.forward_hidden(input),
            Self::Bloom(m) => m.forward_hidden(input),
        }
    }

    fn lm_head(&self, hidden_states: Tensor<3>) -> Tensor<3> {
        match self {
            Self::Qwen2(m) => m.lm_head(hidden_states),
            Self::Bloom(m) => m.lm_head(hidden_states),
        }
    }

    fn output_embeddings(&self) -> Option<Tensor<2>> {
        match self {
            Self::Qwen2(m) => m.output_embeddings(),
            Self::Bloom(m) => m.output_embeddings(),
        }
    }
}

/// Special token ids generation needs, from `generation_config.json` when present (as
/// transformers' `generate` uses it), else `config.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Ids that end a sequence.
    pub eos_token_ids: Vec<u32>,
    /// Padding id (`pad_token_id`, else the first EOS, else 0).
    pub pad_token_id: u32,
    /// Beginning-of-sequence id, if any.
    pub bos_token_id: Option<u32>,
}

impl SpecialTokens {
    /// Reads the special ids of a model directory.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let generation = dir.join("generation_config.json");
        let cfg = if generation.is_file() {
            HfConfig::from_file(generation, "generation_config.json")?
        } else {
            HfConfig::from_file(dir.join("config.json"), "the model's config.json")?
        };
        // An id past the vocabulary would fail deep inside a gather (training's EOS, generation's
        // stop test): refuse it here, naming the file and the key.
        let config_json = dir.join("config.json");
        let vocab_size = if config_json.is_file() {
            HfConfig::from_file(config_json, "the model's config.json")?
                .opt_usize(&["vocab_size"])?
        } else {
            None
        };
        let ids = |key: &str| -> Result<Vec<u32>> {
            let ids = cfg.token_ids(key)?;
            if let Some(vocab) = vocab_size
                && let Some(id) = ids.iter().find(|&&id| id as usize >= vocab)
            {
                return Err(cfg
                    .unsupported(
                        key,
                        format!(
                            "holds id {id}, beyond the model's vocabulary (vocab_size {vocab})"
                        ),
                    )
                    .into());
            }
            Ok(ids)
        };
        let eos_token_ids = ids("eos_token_id")?;
        let pad = ids("pad_token_id")?;
        Ok(Self {
            pad_token_id: pad.first().or(eos_token_ids.first()).copied().unwrap_or(0),
            bos_token_id: ids("bos_token_id")?.first().copied(),
            eos_token_ids,
        })
    }
}

/// Loads `dir/tokenizer.json`.
pub fn load_tokenizer(dir: impl AsRef<Path>) -> Result<tokenizers::Tokenizer> {
    let path = dir.as_ref().join("tokenizer.json");
    if !path.is_file() {
        return Err(ModelError::MissingFile {
            path,
            what: "the tokenizer (tokenizer.json)",
        });
    }
    tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
        path,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
    }

    #[test]
    fn reads_the_qwen2_5_0_5b_config_with_its_legacy_rope_theta() {
        let config =
            AutoConfig::from_file(fixtures().join("configs/qwen2.5-0.5b/config.json")).unwrap();
        let AutoConfig::Qwen2(c) = &config else {
            panic!("{config:?}")
        };
        assert_eq!(c.rope_theta, 1_000_000.0);
        assert!(c.tie_word_embeddings && c.qkv_bias && !c.o_proj_bias);
        assert_eq!(
            config.geometry(),
            ModelGeometry {
                num_layers: 24,
                hidden_size: 896,
                num_attention_heads: 14,
                num_key_value_heads: 2,
                head_dim: 64,
                vocab_size: 151936,
                max_positions: Some(32768),
            }
        );
    }

    #[test]
    fn random_models_of_every_architecture_run() {
        let device = Device::default();
        for dir in [
            "qwen2-gqa-untied",
            "bloom-legacy-5-heads",
            "llama-mqa-sharded",
        ] {
            let config =
                AutoConfig::from_file(fixtures().join("models").join(dir).join("config.json"))
                    .unwrap();
            let model = config.init(&device);
            let ids = Tensor::<2, Int>::from_data(
                TensorData::new(vec![1i64, 2, 3, 4, 5, 6], [2, 3]),
                &device,
            );
            let logits = model.forward_ids(ids, None);
            assert_eq!(logits.dims(), [2, 3, config.geometry().vocab_size], "{dir}");
            // Same parameter count as the checkpoint it was configured from.
            let loaded = AutoCausalLm::from_pretrained(
                fixtures().join("models").join(dir),
                &device,
                DType::F32,
            )
            .unwrap();
            assert_eq!(model.num_params(), loaded.num_params(), "{dir}");
        }
    }
}
