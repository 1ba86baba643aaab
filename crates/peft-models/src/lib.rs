//! Base models for peft-burn: Qwen2, Llama 2 and 3.x, Qwen3, Mistral and BLOOM in burn, loading
//! Hugging Face checkpoints.
//!
//! Each model implements [`peft_core::CausalLm`], so every adapter and the generation loop of
//! peft-core work on it unchanged. Outputs match transformers (see the parity tests in
//! `tests/parity.rs`).
//!
//! ```no_run
//! use burn::prelude::*;
//! use burn::tensor::DType;
//! use peft_models::AutoCausalLm;
//!
//! let device = Device::default();
//! let model = AutoCausalLm::from_pretrained("path/to/model", &device, DType::F32)?;
//! # Ok::<(), peft_models::ModelError>(())
//! ```
#![warn(missing_docs)]

pub mod auto;
pub mod bloom;
pub mod chat;
pub mod checkpoint;
pub mod error;
pub mod fused;
pub mod gguf;
pub mod gguf_model;
pub mod hf_config;
pub mod hub;
pub mod layers;
pub mod qwen2;
pub mod rope;
pub mod weights;

pub use auto::{
    AutoCausalLm, AutoConfig, ModelFamily, SpecialTokens, load_tokenizer, model_file, model_types,
};
pub use bloom::{BloomConfig, BloomForCausalLM};
pub use chat::{ChatMessage, ChatTemplate};
pub use checkpoint::Checkpoint;
pub use error::{ModelError, Result};
pub use gguf_model::{GgufModel, is_gguf_file};
pub use hf_config::HfConfig;
pub use hub::{HubId, hub_cache_dir, resolve_model};
pub use qwen2::{AttentionType, Qwen2Config, Qwen2ForCausalLM};
pub use rope::{Rope, RopeScaling};
pub use tokenizers::Tokenizer;
pub use weights::{ParameterShapes, RandomWeights, WeightSource};
