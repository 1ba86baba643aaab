//! Serving for peft-burn: an [`Engine`] over one loaded base model that decodes rows of different
//! adapters, of every method and none, in the same forward, with continuous
//! batching: requests join the running batch between decode steps and leave it when they finish.
//!
//! Mixing works because the model contract injects per row: each row's adapter gives its own
//! virtual tokens or prefix ([`peft::core::Injection::stack`] pads them with masked slots), and
//! positions are padding-aware, so a row decodes in a batch exactly as it would alone (tested).
//! Each request decodes greedily or samples from its own seeded stream
//! ([`peft::core::TokenSampler`]), so a sampled request gets the tokens it gets alone too.
//! Adapters come by name from an [`AdapterStore`]: the subdirectories of one folder, read on
//! first use for the served base (an adapter for another base is refused with its reason), kept
//! in a bounded LRU, names that would leave the folder refused. Rows of an adapter that trains the
//! base's biases (BitFit) carry their own bias deltas ([`peft::core::BiasDeltas`]): biases are
//! additive, so a row adds its delta after each biased layer and no weight is swapped.
//!
//! With the `http` feature (on by default), [`http::Server`] serves the engine behind an
//! OpenAI-compatible HTTP API (`peft serve`).
#![warn(missing_docs)]

pub mod engine;
#[cfg(feature = "http")]
pub mod http;
pub mod store;

pub use engine::{Engine, EngineError, Event, Request};
pub use store::{AdapterStore, StoreError};
