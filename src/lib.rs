//! peft-burn: parameter-efficient fine-tuning of causal language models on burn.
//!
//! This facade re-exports the workspace's crates under one name and holds the `peft` command line
//! ([`cli`]) with its parameter counting ([`info`]). The backend is chosen at compile time by this crate's features: `flex` (CPU, the
//! default), `cuda` or `wgpu`; [`default_device`] returns the device of the compiled backend.
//!
//! - [`core`]: the `CausalLm` / adapter contract, masks, generation.
//! - [`models`]: Qwen2, Llama and BLOOM loading Hugging Face checkpoints.
//! - [`prompt`], [`ptuning`], [`prefix`], [`bitfit`]: the methods.
#![warn(missing_docs)]

pub mod adapters;
pub mod cli;
pub mod info;
pub mod plot;
pub mod quickstart;
pub mod tasks;
pub mod training;

pub use adapters::{AutoAdapter, AutoAdapterConfig};

pub use peft_bitfit as bitfit;
pub use peft_core as core;
pub use peft_models as models;
pub use peft_prefix as prefix;
pub use peft_prompt as prompt;
pub use peft_ptuning as ptuning;

/// The device of the backend this crate was compiled for: the first CUDA GPU with the `cuda`
/// feature, the default wgpu adapter with `wgpu`, else the Flex CPU backend. The `BURN_DEVICE`
/// environment variable, when set, overrides the choice (see burn's docs).
pub fn default_device() -> burn::prelude::Device {
    burn::prelude::Device::default()
}

/// Name of the backend this binary was compiled for.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "wgpu") {
        "wgpu"
    } else if cfg!(feature = "flex") {
        "flex"
    } else {
        "none"
    }
}
