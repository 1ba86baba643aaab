//! peft-burn: parameter-efficient fine-tuning of causal language models on burn.
//!
//! This facade re-exports the workspace's crates under one name and holds the `peft` command line
//! ([`cli`]) with its parameter counting ([`info`]). The backend is chosen at compile time by this
//! crate's features: `flex` (CPU, the default), `cuda` or `wgpu`, or `cubecl-cpu` (the GPU
//! backends' code path on CubeCL's CPU runtime, for testing it without a GPU); [`default_device`]
//! returns the device of the compiled backend.
//!
//! - [`core`]: the `CausalLm` / adapter contract, masks, generation.
//! - [`train`]: JSONL data, the training loop, AdamW, checkpoints.
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

pub use adapters::{AdapterInitError, AutoAdapter, AutoAdapterConfig};

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

/// Tells glibc's allocator to keep freed memory in the process rather than give large blocks back
/// to the kernel; a no-op off glibc. Call it first thing in a binary that trains on the CPU.
///
/// A training step allocates and frees hundreds of tensors of megabytes. With glibc's defaults
/// each one above the mmap threshold (up to 32 MiB) is a fresh `mmap`, whose pages the kernel
/// zeroes on first touch and unmaps on free: on Flex with 2 cores that page clearing was 7% of a
/// prompt-tuning step. With `M_MMAP_MAX = 0` every block comes from the heap, and a high
/// `M_TRIM_THRESHOLD` keeps the heap at its high-water mark, so later steps reuse warm pages. Peak
/// memory is unchanged (measured +1.4%); resident memory no longer shrinks between steps.
/// The `peft` CLI and `cargo xtask bench` call it.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; glibc serializes it with allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
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
