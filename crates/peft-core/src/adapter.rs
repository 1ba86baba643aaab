//! The adapter side of the contract.

use burn::prelude::*;

use crate::model::Injection;

/// A parameter-efficient fine-tuning method: a burn [`Module`] holding the trainable parameters
/// that, for a batch, yields the [`Injection`] the base model receives, and says how the base is
/// made trainable.
///
/// Methods that inject nothing (BitFit) return `Injection::default()` and unfreeze part of the
/// base in [`Adapter::prepare_base`] instead.
pub trait Adapter: Module {
    /// Virtual tokens this adapter prepends to every row (0 for prefix-only and bias methods).
    fn num_virtual_tokens(&self) -> usize;

    /// What a batch of `batch` rows receives. The encoder runs once per call and its output is
    /// broadcast over the rows.
    fn inject(&self, batch: usize) -> Injection;

    /// Makes the base model trainable the way the method needs: by default fully frozen.
    fn prepare_base<M: Module>(&self, base: M) -> M {
        base.freeze()
    }
}
