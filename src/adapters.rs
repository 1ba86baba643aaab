//! Any adapter of the workspace, chosen by `peft_type` in `adapter_config.json`. The facade is the
//! one place that knows every method.

use std::path::Path;

use burn::prelude::*;
use peft_bitfit::{BitFit, BitFitConfig, PatternError};
use peft_core::adapter_config::{ADAPTER_CONFIG, AdapterError, peft_type};
use peft_core::json_config::JsonConfig;
use peft_core::{Adapter, CausalLm, Injection, ModelGeometry};
use peft_prefix::{PrefixEncoder, PrefixTuningConfig};
use peft_prompt::{PromptEmbedding, PromptTuningConfig, PromptTuningInit};
use peft_ptuning::{PTuningConfig, PromptEncoder};

/// The configuration of an adapter of any method.
#[derive(Debug, Clone)]
pub enum AutoAdapterConfig {
    /// Prompt tuning.
    PromptTuning(PromptTuningConfig),
    /// P-tuning (MLP or LSTM encoder).
    PTuning(PTuningConfig),
    /// Prefix tuning (with projection) or P-tuning v2 (without).
    PrefixTuning(PrefixTuningConfig),
    /// BitFit.
    BitFit(BitFitConfig),
}

/// Why an adapter could not be initialized from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum AdapterInitError {
    /// BitFit's `bias_pattern` is not a valid regular expression or selects nothing.
    #[error(transparent)]
    Pattern(#[from] PatternError),
    /// An initialization the configuration asks for cannot be done (a prefix from text).
    #[error(transparent)]
    Adapter(#[from] AdapterError),
}

impl AutoAdapterConfig {
    /// Checks the configuration fits a base model of `geometry` before anything is allocated
    /// (each method's `validate`; BitFit's pattern is checked against the base in
    /// [`AutoAdapterConfig::init`]).
    ///
    /// # Errors
    ///
    /// [`AdapterError::Init`] naming the configuration field.
    pub fn validate(&self, geometry: &ModelGeometry) -> Result<(), AdapterError> {
        match self {
            Self::PromptTuning(config) => config.validate(geometry),
            Self::PTuning(config) => config.validate(geometry),
            Self::PrefixTuning(config) => config.validate(geometry),
            Self::BitFit(_) => Ok(()),
        }
    }

    /// A fresh adapter for `base`, on its device. Random parameters draw from the device's
    /// generator (seed it for a reproducible start). `init_text_ids` are the token ids of the
    /// configuration's init text, if it has one: prompt tuning's `Text` init takes their rows of
    /// the base's word embeddings; a prefix with `init_text` starts as the base model's keys and
    /// values for them (see [`PrefixTuningConfig::init_from_text`]).
    ///
    /// # Errors
    ///
    /// A configuration [`AutoAdapterConfig::validate`] refuses; a BitFit bias pattern that is not
    /// a valid regular expression or selects no bias of `base`; a prefix from text that cannot be
    /// built (projection, too few tokens); prompt tuning's `Text` init with no ids.
    pub fn init<M: CausalLm>(
        &self,
        base: &M,
        init_text_ids: &[u32],
    ) -> Result<AutoAdapter, AdapterInitError> {
        self.validate(&base.geometry())?;
        if let Self::PromptTuning(config) = self
            && config.prompt_tuning_init == PromptTuningInit::Text
            && init_text_ids.is_empty()
        {
            return Err(AdapterError::Init {
                field: "prompt_tuning_init_text",
                message: "encodes to no tokens".into(),
            }
            .into());
        }
        let device = base.device();
        Ok(match self {
            Self::PromptTuning(config) => AutoAdapter::PromptTuning(
                if config.prompt_tuning_init == PromptTuningInit::Random {
                    config.init(&device)
                } else {
                    config.init_from_embeddings(base.word_embeddings(), init_text_ids)
                },
            ),
            Self::PTuning(config) => AutoAdapter::PTuning(config.init(&device)),
            Self::PrefixTuning(config) => AutoAdapter::PrefixTuning(match config.init_text {
                Some(_) => config.init_from_text(base, init_text_ids)?,
                None => config.init(&device),
            }),
            Self::BitFit(config) => {
                let bitfit = config.init()?;
                bitfit.check_base(base)?;
                AutoAdapter::BitFit(bitfit)
            }
        })
    }
}

/// An adapter of any method.
#[derive(Module, Debug)]
pub enum AutoAdapter {
    /// `PROMPT_TUNING`.
    PromptTuning(PromptEmbedding),
    /// `P_TUNING`.
    PTuning(PromptEncoder),
    /// `PREFIX_TUNING` (with or without projection).
    PrefixTuning(PrefixEncoder),
    /// `BITFIT`.
    BitFit(BitFit),
}

/// Calls `$body` with `$a` bound to the adapter inside any variant.
macro_rules! each {
    ($self:expr, $a:ident => $body:expr) => {
        match $self {
            AutoAdapter::PromptTuning($a) => $body,
            AutoAdapter::PTuning($a) => $body,
            AutoAdapter::PrefixTuning($a) => $body,
            AutoAdapter::BitFit($a) => $body,
        }
    };
}

/// Every method of the workspace by PEFT's `peft_type`: the list the facade dispatches on.
pub const PEFT_TYPES: [&str; 4] = [
    peft_prompt::PEFT_TYPE,
    peft_ptuning::PEFT_TYPE,
    peft_prefix::PEFT_TYPE,
    peft_bitfit::PEFT_TYPE,
];

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
    match PEFT_TYPES.into_iter().find(|known| *known == found) {
        Some(known) => Ok((cfg, known)),
        None => Err(cfg
            .unsupported(
                "peft_type",
                format!("{found:?} is not supported ({})", PEFT_TYPES.join(", ")),
            )
            .into()),
    }
}

impl AutoAdapter {
    /// The method's `peft_type`.
    pub fn peft_type(&self) -> &'static str {
        match self {
            Self::PromptTuning(_) => peft_prompt::PEFT_TYPE,
            Self::PTuning(_) => peft_ptuning::PEFT_TYPE,
            Self::PrefixTuning(_) => peft_prefix::PEFT_TYPE,
            Self::BitFit(_) => peft_bitfit::PEFT_TYPE,
        }
    }
}

impl Adapter for AutoAdapter {
    fn num_virtual_tokens(&self) -> usize {
        each!(self, a => a.num_virtual_tokens())
    }

    fn inject(&self, batch: usize) -> Injection {
        each!(self, a => a.inject(batch))
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
        Ok(match peft_type {
            peft_prompt::PEFT_TYPE => {
                let (base, a) = <PromptEmbedding as Adapter>::load(dir, base)?;
                (base, Self::PromptTuning(a))
            }
            peft_ptuning::PEFT_TYPE => {
                let (base, a) = <PromptEncoder as Adapter>::load(dir, base)?;
                (base, Self::PTuning(a))
            }
            peft_prefix::PEFT_TYPE => {
                let (base, a) = <PrefixEncoder as Adapter>::load(dir, base)?;
                (base, Self::PrefixTuning(a))
            }
            _ => {
                let (base, a) = <BitFit as Adapter>::load(dir, base)?;
                (base, Self::BitFit(a))
            }
        })
    }

    fn into_inference(self) -> Self {
        match self {
            Self::PromptTuning(a) => Self::PromptTuning(a),
            Self::PTuning(a) => Self::PTuning(a.into_inference()),
            Self::PrefixTuning(a) => Self::PrefixTuning(a.into_inference()),
            Self::BitFit(a) => Self::BitFit(a),
        }
    }
}
