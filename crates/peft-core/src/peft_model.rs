//! A base model joined with an adapter: forward, loss and generation as PEFT computes them.

use std::ops::ControlFlow;
use std::path::Path;

use burn::prelude::*;

use crate::adapter::Adapter;
use crate::adapter_config::AdapterError;
use crate::error::CoreError;
use crate::generation::{GenerationConfig, GenerationOutput, GenerationStep, generate};
use crate::loss::{IGNORE_INDEX, cross_entropy_ignoring, projected_cross_entropy};
use crate::model::CausalLm;
use crate::params::TrainableParameters;

/// A base causal LM with an adapter.
#[derive(Module, Debug)]
pub struct PeftModel<M: Module, A: Module> {
    /// The base model, made trainable (usually frozen) by [`Adapter::prepare_base`].
    pub base: M,
    /// The adapter's parameters.
    pub adapter: A,
}

impl<M: CausalLm, A: Adapter> PeftModel<M, A> {
    /// Joins `base` and `adapter`, letting the adapter freeze (or partly unfreeze) the base.
    pub fn new(base: M, adapter: A) -> Self {
        Self {
            base: adapter.prepare_base(base),
            adapter,
        }
    }

    /// Loads the adapter directory `dir` onto `base` (as PEFT's `PeftModel.from_pretrained`).
    ///
    /// # Errors
    ///
    /// Those of [`Adapter::load`].
    pub fn from_pretrained(base: M, dir: &Path) -> Result<Self, AdapterError> {
        let (base, adapter) = A::load(dir, base)?;
        Ok(Self::new(base, adapter))
    }

    /// Writes the adapter directory (see [`Adapter::save`]).
    pub fn save_pretrained(
        &self,
        dir: &Path,
        base_model_name_or_path: Option<&str>,
    ) -> Result<(), AdapterError> {
        self.adapter.save(dir, &self.base, base_model_name_or_path)
    }

    /// PEFT's `print_trainable_parameters` numbers (print them with `{}`). Trainable means
    /// "receives gradients": build on `device.autodiff()` to count what training would update.
    pub fn trainable_parameters(&self) -> TrainableParameters {
        let (base, adapter) = (
            TrainableParameters::of(&self.base),
            TrainableParameters::of(&self.adapter),
        );
        TrainableParameters {
            trainable: base.trainable + adapter.trainable,
            all: base.all + adapter.all,
        }
    }

    /// Hidden states of every position, virtual tokens first: `[batch, n_virtual + seq, hidden]`.
    fn hidden_with_virtual(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Tensor<3> {
        let [batch, _] = input_ids.dims();
        let input = self
            .adapter
            .inject(batch)
            .into_input(self.base.embed_tokens(input_ids), attention_mask);
        self.base.forward_hidden(input).hidden_states
    }

    /// Logits of the real tokens, `[batch, seq, vocab]` (PEFT also returns logits for the virtual
    /// positions; they are dropped here so shapes match the input).
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Tensor<3> {
        let [batch, seq] = input_ids.dims();
        let hidden = self.hidden_with_virtual(input_ids, attention_mask);
        let [_, total, d] = hidden.dims();
        self.base
            .lm_head(hidden.slice([0..batch, total - seq..total, 0..d]))
    }

    /// Mean next-token cross-entropy over labels other than [`IGNORE_INDEX`], counted exactly as
    /// PEFT does: labels gain `IGNORE_INDEX` for the virtual tokens, so the first real token is
    /// predicted from the last virtual one; logits `[:, :-1]` are scored against labels `[:, 1:]`.
    ///
    /// Only scored positions are projected, and with a frozen linear output layer
    /// ([`CausalLm::output_embeddings`]) the projection is fused with the loss
    /// ([`projected_cross_entropy`]): no `[tokens, vocab]` logits are kept for backward.
    pub fn loss(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        labels: Tensor<2, Int>,
    ) -> Tensor<1> {
        let [batch, seq] = input_ids.dims();
        let hidden = self.hidden_with_virtual(input_ids, attention_mask);
        let [_, total, d] = hidden.dims();
        let n = total - seq;
        // Position t predicts label t + 1 of the joined sequence; the first n - 1 virtual positions
        // predict virtual tokens (ignored), so scoring starts at position max(n, 1) - 1.
        let start = n.saturating_sub(1);
        let first_label = if n == 0 { 1 } else { 0 };
        if total - 1 == start {
            // A single real token and no virtual one: nothing to predict.
            return Tensor::zeros([1], &hidden.device());
        }
        let len = total - 1 - start;
        let hidden = hidden.slice([0..batch, start..total - 1, 0..d]);
        let targets = labels.slice([0..batch, first_label..seq]);
        // Only the scored positions are projected (on prompt/completion data, a fraction of
        // them). Reading the labels back is a small transfer; the mean is over the same tokens.
        let flat: Vec<i64> = targets
            .clone()
            .into_data()
            .try_to_vec_as::<i64>()
            .expect("labels are integers");
        let scored: Vec<i64> = flat
            .iter()
            .enumerate()
            .filter(|&(_, &label)| label != IGNORE_INDEX)
            .map(|(i, _)| i as i64)
            .collect();
        if scored.is_empty() {
            // A 0 that still backpropagates.
            return cross_entropy_ignoring(self.base.lm_head(hidden), targets);
        }
        let count = scored.len();
        let mut hidden = hidden.reshape([batch * len, d]);
        let mut targets = targets.reshape([batch * len]);
        if count < flat.len() {
            let rows = TensorData::new(scored, [count]);
            let rows = Tensor::<1, Int>::from_data(rows, &hidden.device());
            hidden = hidden.select(0, rows.clone());
            targets = targets.select(0, rows);
        }
        // A frozen linear head fuses with the loss, a chunk of rows at a time; a trainable or
        // non-linear one goes through the logits.
        let head = self
            .base
            .output_embeddings()
            .filter(|head| !head.is_tracked());
        match head {
            Some(head) => projected_cross_entropy(hidden, head, targets),
            None => cross_entropy_ignoring(
                self.base.lm_head(hidden.reshape([1, count, d])),
                targets.reshape([1, count]),
            ),
        }
    }

    /// Generates after each prompt with the adapter injected at prefill (see [`generate`]).
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
        on_step: impl FnMut(GenerationStep<'_>) -> ControlFlow<()>,
    ) -> Result<GenerationOutput, CoreError> {
        let injection = self.adapter.inject(prompts.len());
        generate(&self.base, prompts, injection, config, on_step)
    }
}
