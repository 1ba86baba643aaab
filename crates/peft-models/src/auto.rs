//! Loading any supported model from a Hugging Face model directory.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::DType;
use peft_core::{BaseShape, CausalLm, ModelGeometry, ModelInput, ModelOutput};

use crate::bloom::BloomForCausalLM;
use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::gguf_model::{GgufModel, is_gguf_file};
use crate::hf_config::{ConfigError, HfConfig};
use crate::qwen2::Qwen2ForCausalLM;
use crate::weights::{ParameterShapes, WeightSource, infallible};

/// A model family: how it reads `config.json` and lays out its layers. [`AutoConfig`] and
/// [`AutoCausalLm`] dispatch over the families listed once in this file's table, so a new family
/// is its file (a config, a model implementing [`CausalLm`] and this trait) plus one table line.
pub trait ModelFamily: CausalLm + Sized {
    /// The `model_type` values of `config.json` this family reads.
    const MODEL_TYPES: &'static [&'static str];
    /// The family's configuration, as read from `config.json`.
    type Config: Clone + std::fmt::Debug + PartialEq;

    /// Reads the configuration from a parsed `config.json` whose `model_type` is one of
    /// [`ModelFamily::MODEL_TYPES`].
    ///
    /// # Errors
    ///
    /// A key missing, of the wrong type or of a value the family does not support, named.
    fn read_config(cfg: &HfConfig) -> Result<Self::Config>;

    /// Geometry adapters see, from the configuration alone.
    fn config_geometry(config: &Self::Config) -> ModelGeometry;

    /// Lays out the model, taking each layer from `src` under its Hugging Face name: the one
    /// function behind loading a checkpoint, random initialization and listing the parameters.
    ///
    /// # Errors
    ///
    /// Whatever `src` fails with (a missing tensor, a wrong shape).
    fn build<S: WeightSource>(config: &Self::Config, src: &mut S) -> Result<Self, S::Error>;

    /// A model with random weights, drawn as transformers draws them.
    fn init(config: &Self::Config, device: &Device) -> Self;
}

/// Declares [`AutoCausalLm`] and [`AutoConfig`] over the families of the table below.
macro_rules! families {
    ($($(#[$doc:meta])* $variant:ident($model:ty),)+) => {
        /// Any causal LM this crate implements, chosen by `model_type` in `config.json`.
        #[derive(Module, Debug)]
        pub enum AutoCausalLm {
            $($(#[$doc])* $variant($model),)+
        }

        /// Architecture and sizes read from a `config.json`, before any weight is touched.
        #[derive(Debug, Clone, PartialEq)]
        pub enum AutoConfig {
            $($(#[$doc])* $variant(<$model as ModelFamily>::Config),)+
        }

        /// Every `model_type` this crate reads, in table order.
        pub fn model_types() -> Vec<&'static str> {
            [$(<$model as ModelFamily>::MODEL_TYPES),+].concat()
        }

        impl AutoConfig {
            /// Picks the architecture of a parsed config by its `model_type`.
            pub fn from_hf(cfg: &HfConfig) -> Result<Self> {
                let Some(model_type) = cfg.opt_str("model_type")? else {
                    return Err(ConfigError::MissingKey {
                        path: cfg.path().to_path_buf(),
                        key: "model_type".into(),
                    }
                    .into());
                };
                $(
                    if <$model as ModelFamily>::MODEL_TYPES.contains(&model_type) {
                        return Ok(Self::$variant(<$model as ModelFamily>::read_config(cfg)?));
                    }
                )+
                Err(ModelError::UnsupportedModelType {
                    path: cfg.path().to_path_buf(),
                    model_type: model_type.to_string(),
                    supported: model_types().join(", "),
                })
            }

            /// Geometry adapters see.
            pub fn geometry(&self) -> ModelGeometry {
                match self {
                    $(Self::$variant(c) => <$model as ModelFamily>::config_geometry(c),)+
                }
            }

            /// Lays out the model of this config from `src`.
            ///
            /// # Errors
            ///
            /// Whatever `src` fails with.
            pub fn build<S: WeightSource>(&self, src: &mut S) -> Result<AutoCausalLm, S::Error> {
                Ok(match self {
                    $(Self::$variant(c) => {
                        AutoCausalLm::$variant(<$model as ModelFamily>::build(c, src)?)
                    })+
                })
            }

            /// A model of this shape with random weights.
            pub fn init(&self, device: &Device) -> AutoCausalLm {
                match self {
                    $(Self::$variant(c) => {
                        AutoCausalLm::$variant(<$model as ModelFamily>::init(c, device))
                    })+
                }
            }
        }

        /// Calls `$body` with `$m` bound to the model inside any variant.
        macro_rules! each_model {
            ($self_:expr, $m:ident => $body:expr) => {
                match $self_ {
                    $(AutoCausalLm::$variant($m) => $body,)+
                }
            };
        }
    };
}

// The families, one line each.
families! {
    /// `qwen2`, `llama`, `qwen3` or `mistral`.
    Qwen2(Qwen2ForCausalLM),
    /// `bloom`.
    Bloom(BloomForCausalLM),
}

impl AutoConfig {
    /// Reads `config.json` (a file) and picks the architecture from `model_type`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_hf(&HfConfig::from_file(path, "the model's config.json")?)
    }

    /// The configuration of a model: a Hugging Face directory (its `config.json`), a
    /// `config.json` itself, or a GGUF file (its metadata).
    pub fn from_model(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if is_gguf_file(path) {
            GgufModel::open(path)?.config()
        } else if path.is_dir() {
            Self::from_file(path.join("config.json"))
        } else {
            Self::from_file(path)
        }
    }

    /// Every parameter as (Hugging Face name, shape as the model holds it), from the config
    /// alone: the model's own `build` run over a source that records shapes and allocates
    /// nothing. A tied `lm_head` is the embedding, listed once, as PEFT counts it.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut shapes = ParameterShapes::new(&Device::default());
        infallible(self.build(&mut shapes));
        shapes.into_shapes()
    }

    /// What a model of this config offers adapters, from the config alone: geometry and
    /// [`AutoConfig::parameter_shapes`].
    pub fn base_shape(&self) -> BaseShape {
        BaseShape::new(self.geometry(), self.parameter_shapes())
    }
}

impl AutoCausalLm {
    /// Loads `dir/config.json` and the weights (`model.safetensors` or a sharded index) onto
    /// `device`, converting them to `dtype` (F32, F16 or BF16). Every tensor of the checkpoint must
    /// be used and have the shape the config implies.
    ///
    /// `dir` may also be a llama.cpp GGUF file ([`GgufModel`]): its metadata is the config, its
    /// tensors are dequantized into `dtype`.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &Device, dtype: DType) -> Result<Self> {
        let dir = dir.as_ref();
        if is_gguf_file(dir) {
            return GgufModel::open(dir)?.load(device, dtype);
        }
        let config = AutoConfig::from_file(dir.join("config.json"))?;
        let mut ckpt = Checkpoint::open_dir(dir, device, dtype)?;
        let model = config.build(&mut ckpt)?;
        ckpt.finish()?;
        Ok(model)
    }
}

impl CausalLm for AutoCausalLm {
    fn geometry(&self) -> ModelGeometry {
        each_model!(self, m => m.geometry())
    }

    fn device(&self) -> Device {
        each_model!(self, m => m.device())
    }

    fn embed_tokens(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        each_model!(self, m => m.embed_tokens(input_ids))
    }

    fn word_embeddings(&self) -> Tensor<2> {
        each_model!(self, m => m.word_embeddings())
    }

    fn forward_hidden(&self, input: ModelInput) -> ModelOutput {
        each_model!(self, m => m.forward_hidden(input))
    }

    fn lm_head(&self, hidden_states: Tensor<3>) -> Tensor<3> {
        each_model!(self, m => m.lm_head(hidden_states))
    }

    fn output_embeddings(&self) -> Option<Tensor<2>> {
        each_model!(self, m => m.output_embeddings())
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
    /// Reads the special ids of a model directory (or of a GGUF file's metadata).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if is_gguf_file(dir) {
            return GgufModel::open(dir)?.special_tokens();
        }
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

/// Where errors about a model's file `name` (`tokenizer.json`, `config.json`) should point:
/// `model/name`, or the GGUF file `model` that holds them all.
pub fn model_file(model: &Path, name: &str) -> std::path::PathBuf {
    if is_gguf_file(model) {
        model.to_path_buf()
    } else {
        model.join(name)
    }
}

/// Loads `dir/tokenizer.json`, or rebuilds the tokenizer of a GGUF file from its metadata.
pub fn load_tokenizer(dir: impl AsRef<Path>) -> Result<tokenizers::Tokenizer> {
    if is_gguf_file(dir.as_ref()) {
        return GgufModel::open(dir.as_ref())?.tokenizer();
    }
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
        assert_eq!(c.rope_scaling, crate::RopeScaling::Default);
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
    fn parameter_shapes_come_from_the_layout_and_allocate_nothing() {
        // Llama-3.1-405B's sizes (its `rope_scaling` left out): 405,853,388,800 parameters,
        // 1.6 TB of f32, listed from the layout alone.
        let config = AutoConfig::from_hf(
            &HfConfig::from_str(
                r#"{"model_type": "llama", "vocab_size": 128256, "hidden_size": 16384,
                    "intermediate_size": 53248, "num_hidden_layers": 126,
                    "num_attention_heads": 128, "num_key_value_heads": 8}"#,
                "config.json",
            )
            .unwrap(),
        )
        .unwrap();
        let shapes = config.parameter_shapes();
        let total: usize = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(total, 405_853_388_800);
        assert_eq!(config.base_shape().num_params(), total);
        // 9 tensors a layer, the embedding, the final norm and the untied head; Linear weights
        // in burn's `[in, out]`.
        assert_eq!(shapes.len(), 126 * 9 + 3);
        assert!(shapes.contains(&(
            "model.layers.125.self_attn.k_proj.weight".into(),
            vec![16384, 1024]
        )));
        assert_eq!(shapes.last().unwrap().0, "lm_head.weight");
        assert_eq!(
            model_types(),
            ["qwen2", "llama", "qwen3", "mistral", "bloom"]
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
