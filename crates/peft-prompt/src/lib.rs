//! Prompt Tuning for peft-burn (PEFT `PROMPT_TUNING`).
//!
//! A soft prompt of `num_virtual_tokens` trainable embeddings is prepended to every row's input
//! embeddings; the base model stays frozen. Equal to PEFT's `PromptEmbedding`: same forward,
//! same loss, same gradients (see `tests/peft_parity.rs`).
//!
//! Files are PEFT's: [`Method::read`] reads a directory PEFT's `save_pretrained` wrote, and
//! [`Method::write`] writes one PEFT's `PeftModel.from_pretrained` reads.
#![warn(missing_docs)]

use std::path::Path;

use burn::module::Param;
use burn::nn::{Embedding, EmbeddingConfig};
use burn::prelude::*;
use peft_core::adapter_config::{
    PromptLearningConfig, PromptLearningFile, check_num_virtual_tokens, write_adapter_dir,
};
use peft_core::adapter_file::{PROMPT_EMBEDDINGS, read_prompt_embeddings};
use peft_core::method::parse_options;
use peft_core::params::initialize_now;
use peft_core::{
    Adapter, BaseShape, CausalLm, InitText, Injection, Method, MethodConfig, ModelGeometry, Preset,
    TrainableParameters,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use peft_core::adapter_config::AdapterError;

/// The method's `peft_type`, as PEFT spells it in `adapter_config.json`.
pub const PEFT_TYPE: &str = "PROMPT_TUNING";
use rand::{RngExt, SeedableRng, rngs::StdRng};

/// How the soft prompt starts (PEFT's `prompt_tuning_init`).
#[derive(Config, Debug, PartialEq, Eq)]
pub enum PromptTuningInit {
    /// N(0, 1), as `nn.Embedding` initializes (`RANDOM`).
    Random,
    /// Rows of the word embeddings of the tokenized init text, repeated then cut to
    /// `num_virtual_tokens` (`TEXT`).
    Text,
    /// Rows of the word embeddings of random token ids (`SAMPLE_VOCAB`).
    SampleVocab,
}

/// Configuration of a soft prompt.
#[derive(Config, Debug)]
pub struct PromptTuningConfig {
    /// Number of virtual tokens prepended to every row.
    pub num_virtual_tokens: usize,
    /// Width of one virtual token: the base model's `hidden_size`.
    pub token_dim: usize,
    /// How the prompt starts.
    #[config(default = "PromptTuningInit::Random")]
    pub prompt_tuning_init: PromptTuningInit,
    /// The init text (`prompt_tuning_init_text`), recorded in the saved config; its ids go to
    /// [`PromptTuningConfig::init_from_embeddings`].
    pub prompt_tuning_init_text: Option<String>,
    /// Seed of `SampleVocab`'s token draw.
    #[config(default = 0)]
    pub seed: u64,
}

impl PromptTuningInit {
    /// PEFT's spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Random => "RANDOM",
            Self::Text => "TEXT",
            Self::SampleVocab => "SAMPLE_VOCAB",
        }
    }
}

/// The keys of a prompt-tuning `adapter_config.json` beyond the shared ones, as PEFT writes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptTuningKeys {
    /// `prompt_tuning_init`: `RANDOM`, `TEXT` or `SAMPLE_VOCAB`.
    #[serde(default = "random_init", with = "init_spelling")]
    pub prompt_tuning_init: PromptTuningInit,
    /// `prompt_tuning_init_text`.
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    /// `tokenizer_name_or_path` (PEFT's `TEXT` init loads the tokenizer from it).
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
    /// `tokenizer_kwargs` (kept as written).
    #[serde(default)]
    pub tokenizer_kwargs: Option<serde_json::Value>,
}

/// A prompt-tuning `adapter_config.json`.
pub type PromptTuningFile = PromptLearningFile<PromptTuningKeys>;

fn random_init() -> PromptTuningInit {
    PromptTuningInit::Random
}

/// PEFT's spelling of [`PromptTuningInit`] (burn's `Config` derive spells it `Random`).
mod init_spelling {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use super::PromptTuningInit;

    pub fn serialize<S: Serializer>(init: &PromptTuningInit, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(init.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PromptTuningInit, D::Error> {
        let found = Option::<String>::deserialize(d)?;
        match found.as_deref() {
            None | Some("RANDOM") => Ok(PromptTuningInit::Random),
            Some("TEXT") => Ok(PromptTuningInit::Text),
            Some("SAMPLE_VOCAB") => Ok(PromptTuningInit::SampleVocab),
            Some(other) => Err(D::Error::custom(format!(
                "must be \"RANDOM\", \"TEXT\" or \"SAMPLE_VOCAB\", found {other:?}"
            ))),
        }
    }
}

/// The soft prompt: `num_virtual_tokens` trainable embeddings.
#[derive(Module, Debug)]
pub struct PromptEmbedding {
    /// `[num_virtual_tokens, token_dim]`; its weight is PEFT's `prompt_embeddings` tensor.
    pub embedding: Embedding,
    /// How it was made (recorded in the saved `adapter_config.json`).
    #[module(skip)]
    pub config: PromptTuningConfig,
}

impl PromptTuningConfig {
    /// Checks the configuration fits a base model of `geometry` before anything is allocated.
    ///
    /// # Errors
    ///
    /// `num_virtual_tokens` of 0 or beyond the base's positions, a `token_dim` other than the
    /// base's `hidden_size`, or `TEXT` init without `prompt_tuning_init_text`; each names the field.
    pub fn validate(&self, geometry: &ModelGeometry) -> Result<(), AdapterError> {
        check_num_virtual_tokens(self.num_virtual_tokens, geometry)?;
        if self.token_dim != geometry.hidden_size {
            return Err(AdapterError::Init {
                field: "token_dim",
                message: format!(
                    "is {}, but the base model's hidden_size is {}",
                    self.token_dim, geometry.hidden_size
                ),
            });
        }
        if self.prompt_tuning_init == PromptTuningInit::Text
            && self
                .prompt_tuning_init_text
                .as_deref()
                .is_none_or(str::is_empty)
        {
            return Err(AdapterError::Init {
                field: "prompt_tuning_init_text",
                message: "is required (and not empty) with prompt_tuning_init TEXT".into(),
            });
        }
        Ok(())
    }

    /// A `Random` prompt (N(0, 1)) on `device`, drawn now from the device's generator.
    pub fn init(&self, device: &Device) -> PromptEmbedding {
        initialize_now(PromptEmbedding {
            embedding: EmbeddingConfig::new(self.num_virtual_tokens, self.token_dim).init(device),
            config: self.clone(),
        })
    }

    /// Parameters of the prompt: `num_virtual_tokens * token_dim`.
    pub fn num_params(&self) -> usize {
        // Saturating: absurd sizes are refused by their callers' memory checks, not by a panic.
        self.num_virtual_tokens.saturating_mul(self.token_dim)
    }

    /// A prompt initialized from the base model's word embeddings `[vocab, token_dim]`:
    /// `Text` takes the rows of `text_ids` (the tokenized init text, special tokens included),
    /// repeated then cut to `num_virtual_tokens`; `SampleVocab` takes rows of seeded random ids;
    /// `Random` ignores both.
    ///
    /// # Panics
    ///
    /// If `Text` is asked for with no ids.
    pub fn init_from_embeddings(
        &self,
        word_embeddings: Tensor<2>,
        text_ids: &[u32],
    ) -> PromptEmbedding {
        let device = word_embeddings.device();
        let [vocab, _] = word_embeddings.dims();
        let n = self.num_virtual_tokens;
        let ids: Vec<i64> = match self.prompt_tuning_init {
            PromptTuningInit::Random => return self.init(&device),
            PromptTuningInit::Text => {
                assert!(
                    !text_ids.is_empty(),
                    "TEXT init needs the ids of a non-empty init text"
                );
                text_ids
                    .iter()
                    .cycle()
                    .take(n)
                    .map(|&t| i64::from(t))
                    .collect()
            }
            PromptTuningInit::SampleVocab => {
                let mut rng = StdRng::seed_from_u64(self.seed);
                (0..n).map(|_| rng.random_range(0..vocab as i64)).collect()
            }
        };
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), &device);
        let mut prompt =
            PromptEmbedding::from_prompt_embeddings(word_embeddings.select(0, ids).detach());
        prompt.config = self.clone();
        prompt
    }
}

impl PromptEmbedding {
    /// A prompt holding `prompt_embeddings` `[num_virtual_tokens, token_dim]` (PEFT's saved tensor),
    /// recorded as `Random` init.
    pub fn from_prompt_embeddings(prompt_embeddings: Tensor<2>) -> Self {
        let [n, d] = prompt_embeddings.dims();
        Self {
            embedding: Embedding {
                weight: Param::from_tensor(prompt_embeddings),
            },
            config: PromptTuningConfig::new(n, d),
        }
    }

    /// The inference form PEFT saves as `prompt_embeddings`: `[num_virtual_tokens, token_dim]`.
    pub fn prompt_embeddings(&self) -> Tensor<2> {
        self.embedding.weight.val()
    }
}

impl Adapter for PromptEmbedding {
    fn num_virtual_tokens(&self) -> usize {
        self.embedding.weight.dims()[0]
    }

    fn save<M: CausalLm>(
        &self,
        dir: &Path,
        base: &M,
        base_model_name_or_path: Option<&str>,
    ) -> Result<(), AdapterError> {
        peft_core::method::save_for(self, dir, base, base_model_name_or_path)
    }

    fn load<M: CausalLm>(dir: &Path, base: M) -> Result<(M, Self), AdapterError> {
        peft_core::method::load_for(dir, base)
    }

    fn inject(&self, batch: usize) -> Injection {
        Injection::virtual_tokens(self.prompt_embeddings(), batch)
    }
}

/// The options `PromptTuningConfig::from_options` reads: PEFT's keys. (Not a `flatten` of
/// [`PromptTuningKeys`]: serde's `flatten` loses the key path errors name.)
#[derive(Debug, Deserialize)]
struct PromptTuningOptions {
    num_virtual_tokens: usize,
    #[serde(default = "random_init", with = "init_spelling")]
    prompt_tuning_init: PromptTuningInit,
    #[serde(default)]
    prompt_tuning_init_text: Option<String>,
}

impl MethodConfig for PromptTuningConfig {
    type Method = PromptEmbedding;

    /// Keys: `num_virtual_tokens`, `prompt_tuning_init`, `prompt_tuning_init_text`.
    fn from_options(
        options: &Map<String, Value>,
        geometry: &ModelGeometry,
    ) -> Result<Self, AdapterError> {
        let options: PromptTuningOptions = parse_options(options)?;
        Ok(Self::new(options.num_virtual_tokens, geometry.hidden_size)
            .with_prompt_tuning_init(options.prompt_tuning_init)
            .with_prompt_tuning_init_text(options.prompt_tuning_init_text))
    }

    fn validate(&self, geometry: &ModelGeometry) -> Result<(), AdapterError> {
        PromptTuningConfig::validate(self, geometry)
    }

    fn init_text(&self) -> Option<InitText<'_>> {
        (self.prompt_tuning_init == PromptTuningInit::Text)
            .then_some(self.prompt_tuning_init_text.as_deref())
            .flatten()
            .map(|text| InitText {
                text,
                as_system_message: false,
            })
    }

    fn init<M: CausalLm>(
        &self,
        base: &M,
        init_text_ids: &[u32],
    ) -> Result<PromptEmbedding, AdapterError> {
        PromptTuningConfig::validate(self, &base.geometry())?;
        Ok(match self.prompt_tuning_init {
            PromptTuningInit::Random => PromptTuningConfig::init(self, &base.device()),
            PromptTuningInit::Text if init_text_ids.is_empty() => {
                return Err(AdapterError::Init {
                    field: "prompt_tuning_init_text",
                    message: "encodes to no tokens".into(),
                });
            }
            _ => self.init_from_embeddings(base.word_embeddings(), init_text_ids),
        })
    }

    fn trainable_parameters(&self, base: &BaseShape) -> Result<TrainableParameters, AdapterError> {
        Ok(base.with_adapter_params(self.num_params()))
    }
}

impl Method for PromptEmbedding {
    const PEFT_TYPE: &'static str = PEFT_TYPE;
    type Config = PromptTuningConfig;
    const PRESETS: &'static [Preset] = &[Preset {
        name: "prompt-tuning",
        summary: "Prompt Tuning (PEFT PROMPT_TUNING)",
        options: "{}",
        learning_rate: 3e-2,
        tiny_model_learning_rate: 1e-1,
    }];

    /// Reads a prompt-tuning adapter directory (`adapter_config.json` +
    /// `adapter_model.safetensors`, as PEFT writes them) for a base model of shape `base`.
    ///
    /// # Errors
    ///
    /// A missing or malformed file, another method, an adapter made for another base model
    /// (`token_dim`, `num_layers`, `num_attention_heads`), or a `prompt_embeddings` tensor absent
    /// or of the wrong shape; each names the file and the key or tensor.
    fn read(dir: &Path, base: &BaseShape, device: &Device) -> Result<Self, AdapterError> {
        let geometry = &base.geometry;
        let (file, raw) = PromptTuningFile::read(dir, PEFT_TYPE)?;
        file.shared.check_base(
            &raw,
            geometry,
            geometry.hidden_size,
            geometry.num_attention_heads,
        )?;
        let n = file.shared.num_virtual_tokens;
        let why = format!(
            "num_virtual_tokens {n} x the base model's hidden_size {}",
            geometry.hidden_size
        );
        let weights = read_prompt_embeddings(dir, [n, geometry.hidden_size], &why, device)?;
        let mut prompt = Self::from_prompt_embeddings(weights);
        prompt.config.prompt_tuning_init = file.method.prompt_tuning_init;
        prompt.config.prompt_tuning_init_text = file.method.prompt_tuning_init_text;
        Ok(prompt)
    }

    /// Saves in PEFT's format into `dir` (created if needed): `adapter_config.json` with PEFT's
    /// keys and `adapter_model.safetensors` with `prompt_embeddings`. Each file is written
    /// atomically.
    fn write(
        &self,
        dir: &Path,
        base: &BaseShape,
        base_model_name_or_path: Option<&str>,
    ) -> Result<(), AdapterError> {
        let geometry = &base.geometry;
        let config = &self.config;
        let file = PromptTuningFile {
            shared: PromptLearningConfig::new(
                PEFT_TYPE,
                self.num_virtual_tokens(),
                geometry.hidden_size,
                geometry.num_attention_heads,
                geometry.num_layers,
                base_model_name_or_path,
            ),
            method: PromptTuningKeys {
                prompt_tuning_init: config.prompt_tuning_init.clone(),
                prompt_tuning_init_text: config.prompt_tuning_init_text.clone(),
                tokenizer_name_or_path: base_model_name_or_path.map(str::to_string),
                tokenizer_kwargs: None,
            },
        };
        let json = file.to_json();
        write_adapter_dir(
            dir,
            &json,
            vec![(PROMPT_EMBEDDINGS, self.prompt_embeddings().into_data())],
            None,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_init_repeats_then_cuts_the_ids() {
        let device = Device::default();
        let words = Tensor::<2>::from_data(
            TensorData::new((0..12).map(|v| v as f32).collect::<Vec<_>>(), [6, 2]),
            &device,
        );
        let prompt = PromptTuningConfig::new(5, 2)
            .with_prompt_tuning_init(PromptTuningInit::Text)
            .init_from_embeddings(words, &[4, 1]);
        let rows: Vec<f32> = prompt
            .prompt_embeddings()
            .into_data()
            .try_into_vec_as()
            .unwrap();
        // ids 4, 1, 4, 1, 4 -> rows [8, 9], [2, 3], ...
        assert_eq!(rows, vec![8., 9., 2., 3., 8., 9., 2., 3., 8., 9.]);
        assert_eq!(prompt.num_virtual_tokens(), 5);
    }

    #[test]
    fn sample_vocab_takes_rows_of_the_vocabulary_and_is_seeded() {
        let device = Device::default();
        let words = Tensor::<2>::from_data(
            TensorData::new((0..40).map(|v| v as f32).collect::<Vec<_>>(), [20, 2]),
            &device,
        );
        let init = |seed| {
            PromptTuningConfig::new(4, 2)
                .with_prompt_tuning_init(PromptTuningInit::SampleVocab)
                .with_seed(seed)
                .init_from_embeddings(words.clone(), &[])
                .prompt_embeddings()
                .into_data()
                .try_into_vec_as::<f32>()
                .unwrap()
        };
        let rows = init(3);
        assert_eq!(rows, init(3));
        for pair in rows.chunks(2) {
            assert!(
                (pair[0] as usize).is_multiple_of(2) && pair[1] == pair[0] + 1.0,
                "{pair:?} is not a vocabulary row"
            );
        }
    }
}
