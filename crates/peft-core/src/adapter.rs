//! The adapter side of the contract.

use std::path::Path;

use burn::prelude::*;

use crate::adapter_config::AdapterError;
use crate::model::{CausalLm, Injection};

/// A parameter-efficient fine-tuning method: a burn [`Module`] holding the trainable parameters
/// that, for a batch, yields the [`Injection`] the base model receives, says how the base is made
/// trainable, and reads and writes its adapter directory.
///
/// Methods that inject nothing (one that trains the base's biases) return `Injection::default()` and unfreeze part of the
/// base in [`Adapter::prepare_base`] instead.
pub trait Adapter: Module {
    /// Virtual tokens this adapter prepends to every row (0 for prefix-only and bias methods).
    fn num_virtual_tokens(&self) -> usize;

    /// Prefix key/value positions this adapter gives every layer (0 for methods without a
    /// prefix): with [`Adapter::num_virtual_tokens`], what it adds to a row's context.
    fn num_prefix_positions(&self) -> usize {
        0
    }

    /// Positions this adapter adds to every row's context (virtual tokens and prefix positions):
    /// what a length check must count beside the row.
    fn added_positions(&self) -> usize {
        self.num_virtual_tokens() + self.num_prefix_positions()
    }

    /// What a batch of `batch` rows receives. The encoder runs once per call and its output is
    /// broadcast over the rows.
    fn inject(&self, batch: usize) -> Injection;

    /// Whether [`Adapter::load`] puts trained values into the base's own parameters (a method that
    /// trains base weights) rather than injecting per row: such an adapter cannot share a batch
    /// with rows of other adapters, whose base must stay as it is. `false` by default.
    fn changes_base_weights(&self) -> bool {
        false
    }

    /// For an adapter that changes the base's weights: the per-row deltas (its trained biases
    /// minus `base`'s own, `[1, size]` each, by Hugging Face name) that make one row of the
    /// unchanged `base` behave as the base this adapter trained, so that its rows can share a
    /// batch with rows of other adapters. `None` (the default) when the adapter's changes are not
    /// expressible as bias deltas, or it holds no trained values of its own.
    fn bias_deltas<M: CausalLm>(&self, base: &M) -> Option<crate::model::BiasDeltas> {
        let _ = base;
        None
    }

    /// Makes the base model trainable the way the method needs: by default fully frozen.
    fn prepare_base<M: Module>(&self, base: M) -> M {
        base.freeze()
    }

    /// Writes the adapter directory for `base` (PEFT's files where PEFT has the method, plus our
    /// trainable checkpoint where the method has an encoder), each file atomically.
    fn save<M: CausalLm>(
        &self,
        dir: &Path,
        base: &M,
        base_model_name_or_path: Option<&str>,
    ) -> Result<(), AdapterError>;

    /// Reads the adapter directory `dir` made for `base`, returning the base (a method that trains
    /// base parameters puts the trained values into it) and the adapter.
    ///
    /// # Errors
    ///
    /// A missing or malformed file, another method, or an adapter that does not fit `base`; each
    /// names the file and the key or tensor.
    fn load<M: CausalLm>(dir: &Path, base: M) -> Result<(M, Self), AdapterError>
    where
        Self: Sized;

    /// The inference form: an encoder folded into its output, as PEFT's files hold it (the
    /// identity for methods without an encoder).
    fn into_inference(self) -> Self
    where
        Self: Sized,
    {
        self
    }
}
