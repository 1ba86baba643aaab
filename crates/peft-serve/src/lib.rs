//! Serving for peft-burn: an [`Engine`] over one loaded base model that decodes rows of different
//! adapters, of every prompt-learning method and none, in the same forward, with continuous
//! batching: requests join the running batch between decode steps and leave it when they finish.
//!
//! Mixing works because the model contract injects per row: each row's adapter gives its own
//! virtual tokens or prefix ([`peft::core::Injection::stack`] pads them with masked slots), and
//! positions are padding-aware, so a row decodes in a batch exactly as it would alone (tested).
//! Each request decodes greedily or samples from its own seeded stream
//! ([`peft::core::TokenSampler`]), so a sampled request gets the tokens it gets alone too.
//! BitFit rows (per-row bias deltas), the adapter store and the HTTP server are not here yet.
#![warn(missing_docs)]

pub mod engine;

pub use engine::{Engine, EngineError, Event, Request};
