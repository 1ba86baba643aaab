//! Core of peft-burn: the contract between base models and adapters, and the plumbing every
//! method shares.
//!
//! - [`model`]: the [`CausalLm`] trait a base model implements (geometry, `embed_tokens`, one
//!   forward over input embeddings with a padding mask, per-layer prefix key/values and a KV cache).
//! - [`mask`]: padding-aware positions and attention masks, shared by every model.
//! - [`method`]: what joins a method to a list of methods (PEFT type, config, presets, files
//!   read from a base's shape alone).
//! - [`adapter`] and [`peft_model`]: the [`Adapter`] trait and [`PeftModel`], a base joined with an
//!   adapter (forward, PEFT's loss, generation).
//! - [`adapter_config`]: PEFT's `adapter_config.json` (method, shared prompt-learning fields, base checks).
//! - [`adapter_file`]: PEFT's `adapter_model.safetensors` (`prompt_embeddings`), atomic writes.
//! - [`params`]: parameters by Hugging Face name, and PEFT's trainable-parameter report.
//! - [`json_config`]: JSON config files read key by key, errors naming file and key.
//! - [`generation`]: batched generation (greedy or sampled) over any [`CausalLm`], with an optional
//!   [`Injection`] applied at prefill.
#![warn(missing_docs)]

pub mod adapter;
pub mod adapter_config;
pub mod adapter_file;
pub mod error;
pub mod generation;
pub mod json_config;
pub mod loss;
pub mod mask;
pub mod method;
pub mod model;
pub mod params;
pub mod peft_model;

pub use adapter::Adapter;
pub use error::CoreError;
pub use generation::{GenerationConfig, GenerationOutput, GenerationStep, TokenSampler, generate};
pub use loss::{IGNORE_INDEX, cross_entropy_ignoring, projected_cross_entropy};
pub use method::{BaseShape, InitText, Method, MethodConfig, Preset};
pub use model::{
    BiasDeltas, CausalLm, Injection, KvCache, LayerKv, ModelGeometry, ModelInput, ModelOutput,
};
pub use params::TrainableParameters;
pub use peft_model::PeftModel;
