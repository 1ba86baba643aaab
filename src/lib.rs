//! peft-burn: parameter-efficient fine-tuning of causal language models on burn.
//!
//! This facade re-exports the workspace's crates under one name, with [`AutoAdapter`] (an adapter
//! of any method, by `peft_type`), [`presets`] (the methods' named configurations), [`export`]
//! and [`info`] (an adapter's inference files and PEFT's parameter counts from a config alone),
//! and [`TemplateRenderer`] (a model's chat template rendering the data pipeline's chat rows).
//! The list of methods is one table, in `src/adapters.rs`. The `peft` command line is the
//! `peft-cli` crate; this library pulls in none of its dependencies. The backend is chosen at
//! compile time by this crate's features: `flex` (CPU, the default), `cuda` or `wgpu`, or `cubecl-cpu` (the GPU
//! backends' code path on CubeCL's CPU runtime, for testing it without a GPU); [`default_device`]
//! returns the device of the compiled backend.
//!
//! - [`core`]: the `CausalLm` / adapter contract, masks, generation.
//! - [`train`]: JSONL data, the training loop, AdamW, checkpoints.
//! - [`models`]: Qwen2, Llama 2 and 3.x, Qwen3, Mistral and BLOOM loading Hugging Face checkpoints.
//! - [`prompt`], [`ptuning`], [`prefix`], [`bitfit`]: the methods.
#![warn(missing_docs)]

pub mod adapters;
pub mod chat;
pub mod info;

pub use adapters::{
    AutoAdapter, AutoAdapterConfig, MethodPreset, PEFT_TYPES, export, preset, presets,
    read_peft_type,
};
pub use chat::TemplateRenderer;

pub use peft_bitfit as bitfit;
pub use peft_core as core;
pub use peft_models as models;
pub use peft_prefix as prefix;
pub use peft_prompt as prompt;
pub use peft_ptuning as ptuning;
pub use peft_train as train;

/// The device of the backend this crate was compiled for: the first CUDA GPU with the `cuda`
/// feature, the default wgpu adapter with `wgpu`, CubeCL's CPU runtime with `cubecl-cpu`, else the
/// Flex CPU backend. The `BURN_DEVICE` environment variable, when set, overrides the choice (see
/// burn's docs).
pub fn default_device() -> burn::prelude::Device {
    burn::prelude::Device::default()
}

/// The devices of a data-parallel run of `n` replicas: the first `n` CUDA GPUs with the `cuda`
/// feature (an error when the machine has fewer), else `n` times [`default_device`] (Flex,
/// wgpu and CubeCL's CPU runtime have one device: the replicas then take turns on it).
pub fn data_parallel_devices(n: usize) -> Result<Vec<burn::prelude::Device>, String> {
    if n == 0 {
        return Err("must be at least 1".into());
    }
    #[cfg(feature = "cuda")]
    {
        let found: Vec<burn::prelude::Device> =
            burn::prelude::Device::enumerate(burn::tensor::DeviceType::Cuda)
                .into_iter()
                .collect();
        if n > found.len() {
            return Err(format!(
                "asks for {n} CUDA devices; this machine has {}",
                found.len()
            ));
        }
        Ok(found.into_iter().take(n).collect())
    }
    #[cfg(not(feature = "cuda"))]
    Ok(vec![default_device(); n])
}

/// Whether `device` is a CUDA GPU: a CUDA build can still run on Flex (`BURN_DEVICE=flex`), so
/// what the binary was compiled for does not say where a tensor lives.
pub fn is_cuda(device: &burn::prelude::Device) -> bool {
    #[cfg(feature = "cuda")]
    {
        burn::prelude::Device::enumerate(burn::tensor::DeviceType::Cuda).contains(device)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        false
    }
}

/// Name of the backend this binary was compiled for.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "wgpu") {
        "wgpu"
    } else if cfg!(feature = "cubecl-cpu") {
        "cubecl-cpu"
    } else if cfg!(feature = "flex") {
        "flex"
    } else {
        "none"
    }
}
