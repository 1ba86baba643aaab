//! Any adapter of the workspace, chosen by `peft_type` in `adapter_config.json`. The facade is the
//! one place that knows every method.

use std::path::Path;

use burn::prelude::*;
use peft_core::adapter_config::{ADAPTER_CONFIG, AdapterError, PeftType};
use peft_core::json_config::JsonConfig;
use peft_core::{Adapter, Injection, ModelGeometry};
use peft_prompt::PromptEmbedding;

/// An adapter loaded from a directory.
#[derive(Module, Debug)]
pub enum AutoAdapter {
    /// `PROMPT_TUNING`.
    PromptTuning(PromptEmbedding),
}

impl AutoAdapter {
    /// Loads the adapter in `dir` for a base model of `geometry`.
    ///
    /// # Errors
    ///
    /// Those of each method's loader, and methods not implemented yet (named by `peft_type`).
    pub fn load(
        dir: &Path,
        geometry: &ModelGeometry,
        device: &Device,
    ) -> Result<Self, AdapterError> {
        let cfg = JsonConfig::from_file(
            dir.join(ADAPTER_CONFIG),
            "the adapter's adapter_config.json",
        )?;
        match PeftType::from_config(&cfg)? {
            PeftType::PromptTuning => Ok(Self::PromptTuning(PromptEmbedding::load(
                dir, geometry, device,
            )?)),
            other => Err(cfg
                .unsupported(
                    "peft_type",
                    format!("{:?}: this method is not implemented yet", other.as_str()),
                )
                .into()),
        }
    }
}

impl Adapter for AutoAdapter {
    fn num_virtual_tokens(&self) -> usize {
        match self {
            Self::PromptTuning(a) => a.num_virtual_tokens(),
        }
    }

    fn inject(&self, batch: usize) -> Injection {
        match self {
            Self::PromptTuning(a) => a.inject(batch),
        }
    }

    fn prepare_base<M: Module>(&self, base: M) -> M {
        match self {
            Self::PromptTuning(a) => a.prepare_base(base),
        }
    }
}
