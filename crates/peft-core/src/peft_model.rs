//! A base model joined with an adapter: forward, loss and generation as PEFT computes them.

use std::ops::ControlFlow;
use std::path::Path;

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

use crate::adapter::Adapter;
use crate::adapter_config::AdapterError;
use crate::error::CoreError;
use crate::generation::{GenerationConfig, GenerationOutput, GenerationStep, generate};
use crate::model::CausalLm;
use crate::params::TrainableParameters;

/// Label value that contributes nothing to the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

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
        // The output projection is the largest matmul of a step for big vocabularies: project only
        // the positions that are scored (on prompt/completion data, a fraction of them). Reading
        // the labels back is a small transfer; the mean is over the same tokens either way.
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
        if scored.is_empty() || scored.len() == flat.len() {
            return cross_entropy_ignoring(self.base.lm_head(hidden), targets);
        }
        let device = hidden.device();
        let count = scored.len();
        let rows = Tensor::<1, Int>::from_data(TensorData::new(scored, [count]), &device);
        let hidden = hidden.reshape([batch * len, d]).select(0, rows.clone());
        let targets = targets.reshape([batch * len]).select(0, rows);
        cross_entropy_ignoring(
            self.base.lm_head(hidden.reshape([1, count, d])),
            targets.reshape([1, count]),
        )
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

/// Mean cross-entropy of `logits` `[b, s, v]` against `targets` `[b, s]`, skipping
/// [`IGNORE_INDEX`]; 0 when every target is ignored. Computed in f32.
pub fn cross_entropy_ignoring(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, s, _] = logits.dims();
    let keep = targets.clone().not_equal_elem(IGNORE_INDEX);
    let safe_targets = targets.mask_fill(keep.clone().bool_not(), 0);
    let log_probs = log_softmax(logits.cast(burn::tensor::DType::F32), 2);
    let picked = log_probs
        .gather(2, safe_targets.reshape([b, s, 1]))
        .reshape([b, s]);
    let weights = keep.float();
    let count = weights.clone().sum().clamp_min(1.0);
    (picked * weights).sum().neg() / count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_skips_ignored_targets_and_averages_the_rest() {
        let device = Device::default();
        // Two positions over a 3-token vocabulary; the second target is ignored.
        let logits = Tensor::<3>::from_data(
            TensorData::new(vec![0.0f32, 1.0, 2.0, 5.0, 5.0, 5.0], [1, 2, 3]),
            &device,
        );
        let targets =
            Tensor::<2, Int>::from_data(TensorData::new(vec![2i64, IGNORE_INDEX], [1, 2]), &device);
        let loss: f32 = cross_entropy_ignoring(logits.clone(), targets).into_scalar();
        let expected = -(2.0f32 - (1.0f32 + 1f32.exp() + 2f32.exp()).ln());
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
        // Everything ignored: 0, not NaN.
        let none =
            Tensor::<2, Int>::from_data(TensorData::new(vec![IGNORE_INDEX; 2], [1, 2]), &device);
        let loss: f32 = cross_entropy_ignoring(logits, none).into_scalar();
        assert_eq!(loss, 0.0);
    }
}
