//! Core of peft-burn: the contract between base models and adapters, and the plumbing every
//! method shares.
//!
//! - [`model`]: the [`CausalLm`] trait a base model implements (geometry, `embed_tokens`, one
//!   forward over input embeddings with a padding mask, per-layer prefix key/values and a KV cache).
//! - [`mask`]: padding-aware positions and attention masks, shared by every model.
//! - [`generation`]: batched generation (greedy or sampled) over any [`CausalLm`], with an optional
//!   [`Injection`] applied at prefill.
#![warn(missing_docs)]

pub mod error;
pub mod generation;
pub mod mask;
pub mod model;

pub use error::CoreError;
pub use generation::{GenerationConfig, GenerationOutput, GenerationStep, generate};
pub use model::{CausalLm, Injection, KvCache, LayerKv, ModelGeometry, ModelInput, ModelOutput};
