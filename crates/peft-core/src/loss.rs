//! Next-token cross-entropy: over given logits, and fused with the output projection so that a
//! training step never holds the logits of a whole batch.

use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::{log_softmax, softmax};

/// Label value that contributes nothing to the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Bytes of f32 logits [`projected_cross_entropy`] holds at once: rows are projected in chunks of
/// `PROJECTION_CHUNK_BYTES / (4 * vocab)` (110 rows for a 151,936-token vocabulary). Big enough
/// for the matmuls to run at full speed (measured on Flex: 59 GFLOP/s from 128 rows, 44 at 32),
/// small enough that the loss costs a few chunks of memory whatever the batch.
const PROJECTION_CHUNK_BYTES: usize = 64 << 20;

/// Mean cross-entropy of `logits` `[b, s, v]` against `targets` `[b, s]`, skipping
/// [`IGNORE_INDEX`]; 0 when every target is ignored. Computed in f32.
pub fn cross_entropy_ignoring(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, s, _] = logits.dims();
    let keep = targets.clone().not_equal_elem(IGNORE_INDEX);
    let safe_targets = targets.mask_fill(keep.clone().bool_not(), 0);
    let log_probs = log_softmax(logits.cast(DType::F32), 2);
    let picked = log_probs
        .gather(2, safe_targets.reshape([b, s, 1]))
        .reshape([b, s]);
    let weights = keep.float();
    let count = weights.clone().sum().clamp_min(1.0);
    (picked * weights).sum().neg() / count
}

/// Mean cross-entropy of `hidden · output_embeddingsᵀ` against `targets`: `hidden` `[n, d]`,
/// `output_embeddings` `[vocab, d]` (not trained), `targets` `[n]` (none ignored). Equal in value
/// and in its gradient with respect to `hidden` to [`cross_entropy_ignoring`] over the projected
/// logits, but computed a chunk of rows at a time, with the gradient formed right away:
///
/// `∂loss/∂hidden = (softmax(logits) - onehot(targets)) · output_embeddings / n`
///
/// = `(softmax(logits) · output_embeddings - output_embeddings[targets]) / n`, so the one-hot term
/// is a row lookup and the full-vocabulary tensors of a chunk are freed before the next one. The
/// autodiff graph sees only `hidden` `[n, d]`, not `[n, vocab]` logits and their softmax: for a
/// 151,936-token vocabulary that is 0.6 MB of f32 per scored token less to keep until backward.
/// When `hidden` is not tracked by autodiff (evaluation), the gradient matmul is skipped.
///
/// The loss is f32; the projection runs in `output_embeddings`' dtype.
///
/// # Panics
///
/// If `output_embeddings` takes part in the autodiff graph: its own gradient is never formed here (call
/// [`cross_entropy_ignoring`] on the logits instead).
pub fn projected_cross_entropy(
    hidden: Tensor<2>,
    output_embeddings: Tensor<2>,
    targets: Tensor<1, Int>,
) -> Tensor<1> {
    let vocab = output_embeddings.dims()[0];
    let chunk_rows = (PROJECTION_CHUNK_BYTES / (4 * vocab)).max(1);
    projected_cross_entropy_in_chunks(hidden, output_embeddings, targets, chunk_rows)
}

/// [`projected_cross_entropy`], `chunk_rows` rows at a time.
fn projected_cross_entropy_in_chunks(
    hidden: Tensor<2>,
    output_embeddings: Tensor<2>,
    targets: Tensor<1, Int>,
    chunk_rows: usize,
) -> Tensor<1> {
    assert!(
        !output_embeddings.is_tracked(),
        "projected_cross_entropy forms no gradient for the output embeddings"
    );
    let [n, d] = hidden.dims();
    let device = hidden.device();
    if n == 0 {
        return Tensor::zeros([1], &device);
    }
    let hidden_dtype = hidden.dtype();
    let needs_grad = hidden.is_tracked();
    // Everything below runs outside autodiff: no graph nodes, no saved state. (`detach` would not
    // do: a detached leaf that requires grad is still tracked.)
    let constant = hidden.clone().without_autodiff();
    let embeddings = output_embeddings.without_autodiff();
    let targets = targets.without_autodiff();
    let head_dtype = embeddings.dtype();
    let mut loss_sum = Tensor::<1>::zeros([1], &constant.device());
    let mut grad_chunks = Vec::with_capacity(n.div_ceil(chunk_rows));
    for start in (0..n).step_by(chunk_rows) {
        let end = (start + chunk_rows).min(n);
        let rows = end - start;
        let h = constant.clone().slice([start..end, 0..d]).cast(head_dtype);
        let t = targets.clone().slice(start..end);
        // `h · Eᵀ` rather than `(E · hᵀ)ᵀ`: the row-wise passes below need the logits laid out
        // by rows (on Flex, a transposed view makes the softmax 2x and the max 20x slower).
        let logits = h.matmul(embeddings.clone().transpose()).cast(DType::F32); // [rows, vocab]
        // -ln softmax(x)[t] = lse(x) - x[t], and lse(x) = max(x) - ln(max(softmax(x))): the
        // largest probability is 1 / Σ exp(x - max(x)) >= 1 / vocab, so this never underflows,
        // however improbable the target. Backends with a fused softmax (Flex: one row-parallel
        // pass) run it that way outside autodiff; it is the whole elementwise cost of the loss.
        let probs = softmax(logits.clone(), 1);
        // Flex's fused softmax adds a row's exponentials one after the other in f32: once the
        // running sum nears 1 (a confident prediction), every later term under half an ulp
        // (3e-8) is dropped, so over a 49,152-token vocabulary the sum comes out low by up to
        // 1.5e-3 and the loss low by as much, on every row, always in the same direction
        // (SmolLM2 training: 1.4e-4 of the loss at every step, against PEFT's). The row sums of
        // `probs`, a blocked reduction (128 partial sums on AVX-512), measure that error:
        // `Σ probs = true sum / computed sum`. So `ln Σ probs` completes lse and dividing by it
        // completes the softmax (on the `[rows, d]` product, not the `[rows, vocab]` probs).
        // Backends that sum exactly get `Σ probs = 1` and lose nothing.
        let mass = probs.clone().sum_dim(1); // [rows, 1]
        let log_sum_exp =
            logits.clone().max_dim(1) - probs.clone().max_dim(1).log() + mass.clone().log();
        let picked = logits.gather(1, t.clone().reshape([rows, 1]));
        loss_sum = loss_sum + (log_sum_exp - picked).sum();
        if needs_grad {
            let target_rows = embeddings.clone().select(0, t);
            let expected_rows =
                probs.cast(head_dtype).matmul(embeddings.clone()) / mass.cast(head_dtype);
            grad_chunks.push(expected_rows - target_rows);
        }
    }
    let loss = loss_sum / n as f64;
    if !needs_grad {
        // Back on the caller's device kind (a no-op without autodiff).
        return if hidden.is_autodiff() {
            loss.autodiff()
        } else {
            loss
        };
    }
    let grad = (Tensor::cat(grad_chunks, 0) / n as f64).cast(hidden_dtype);
    // `hidden - constant` is exactly 0, so the value stays `loss`; its gradient is `grad`.
    ((hidden - constant) * grad).sum().cast(DType::F32) + loss
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance};

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

    /// Loss and `∂loss/∂hidden` through the logits, by autodiff.
    fn reference(hidden: &Tensor<2>, embeddings: &Tensor<2>, targets: &[i64]) -> (f32, TensorData) {
        let [n, d] = hidden.dims();
        let hidden = hidden.clone().require_grad();
        let logits = hidden.clone().matmul(embeddings.clone().transpose());
        let vocab = embeddings.dims()[0];
        let targets = Tensor::<2, Int>::from_data(
            TensorData::new(targets.to_vec(), [1, n]),
            &hidden.device(),
        );
        let loss = cross_entropy_ignoring(logits.reshape([1, n, vocab]), targets);
        let grads = loss.backward();
        let grad = hidden.grad(&grads).expect("hidden is tracked");
        assert_eq!(grad.dims(), [n, d]);
        (loss.into_scalar(), grad.into_data())
    }

    /// Runs [`projected_cross_entropy_in_chunks`] on random `[n, d]` hidden states against a
    /// random `[vocab, d]` head and checks its value and gradient against [`reference`], then its
    /// value without autodiff tracking (evaluation, where no gradient is formed).
    fn check_against_reference(n: usize, d: usize, vocab: usize, targets: Vec<i64>, rows: usize) {
        let device = Device::default().autodiff();
        let hidden = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 2.0), &device);
        let embeddings = Tensor::<2>::random([vocab, d], Distribution::Normal(0.0, 1.0), &device);
        let (expected_loss, expected_grad) = reference(&hidden, &embeddings, &targets);
        let ids = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &device);

        let tracked = hidden.clone().require_grad();
        let loss = projected_cross_entropy_in_chunks(
            tracked.clone(),
            embeddings.clone(),
            ids.clone(),
            rows,
        );
        let grads = loss.backward();
        let grad = tracked.grad(&grads).expect("hidden is tracked");
        let loss: f32 = loss.into_scalar();
        assert!(
            (loss - expected_loss).abs() < 1e-5,
            "{loss} vs {expected_loss}"
        );
        grad.into_data()
            .assert_approx_eq::<f32>(&expected_grad, Tolerance::absolute(1e-6));

        let loss: f32 =
            projected_cross_entropy_in_chunks(hidden, embeddings, ids, rows).into_scalar();
        assert!(
            (loss - expected_loss).abs() < 1e-5,
            "{loss} vs {expected_loss}"
        );
    }

    #[test]
    fn projected_cross_entropy_matches_the_loss_over_logits_in_value_and_gradient() {
        // One chunk.
        check_against_reference(7, 5, 11, vec![3, 0, 10, 7, 7, 1, 5], 64);
    }

    #[test]
    fn projected_cross_entropy_over_many_chunks_matches_the_loss_over_logits() {
        // Chunks of 2 rows: 5 rows make 3 chunks, the last one short. (A vocabulary big enough
        // to force such chunks through the public function would sum millions of f32 terms per
        // row, whose rounding, in both computations, swamps what this test checks.)
        check_against_reference(5, 3, 13, vec![0, 12, 5, 3, 5], 2);
    }

    #[test]
    fn projected_cross_entropy_keeps_the_tail_of_a_confident_prediction() {
        // SmolLM2's vocabulary; one logit at 0, all others at -20. Each tail term, e^-20 = 2e-9,
        // is under half an ulp of a running sum near 1, so a sum taken one term after the other
        // in f32 drops all of them: lse would come out 0 instead of ln(1 + 49,151 e^-20) = 1e-4,
        // and the loss low by as much.
        let vocab = 49_152;
        let tail_logit = -20.0f64;
        let device = Device::default().autodiff();
        let hidden = Tensor::<2>::from_data(TensorData::new(vec![1.0f32; 2], [2, 1]), &device);
        let mut head = vec![tail_logit as f32; vocab];
        head[0] = 0.0;
        let embeddings = Tensor::<2>::from_data(TensorData::new(head, [vocab, 1]), &device);
        // The confident target, then a tail one.
        let targets = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 7], [2]), &device);

        let tail_mass = (vocab - 1) as f64 * tail_logit.exp();
        let lse = tail_mass.ln_1p();
        let expected_loss = (lse + (lse - tail_logit)) / 2.0;
        // ∂/∂h of each row's loss: Σ p_i E_i - E_t; the tail holds probability tail/(1 + tail).
        let expected_row = tail_logit * tail_mass / (1.0 + tail_mass);
        let expected_grad = [expected_row / 2.0, (expected_row - tail_logit) / 2.0];

        let tracked = hidden.require_grad();
        let loss = projected_cross_entropy(tracked.clone(), embeddings, targets);
        let grads = loss.backward();
        let grad: Vec<f32> = tracked
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_to_vec()
            .unwrap();
        let loss = f64::from(loss.into_scalar::<f32>());
        // The dropped tail would be an error of 1e-4; what remains is the rounding of f32 sums.
        assert!(
            (loss - expected_loss).abs() < 1e-5,
            "{loss} vs {expected_loss}"
        );
        for (got, want) in grad.iter().zip(expected_grad) {
            assert!(
                (f64::from(*got) - want).abs() < 1e-5 * want.abs(),
                "{got} vs {want}"
            );
        }
    }

    #[test]
    fn projected_cross_entropy_stays_exact_for_targets_whose_probability_underflows() {
        let device = Device::default();
        // Logits [300, 0, -300]: softmax of the last is e^-600, 0 in f32, yet the loss is finite.
        let hidden = Tensor::<2>::from_data(TensorData::new(vec![300.0f32], [1, 1]), &device);
        let embeddings =
            Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 0.0, -1.0], [3, 1]), &device);
        let targets = Tensor::<1, Int>::from_data(TensorData::new(vec![2i64], [1]), &device);
        let loss: f32 = projected_cross_entropy(hidden, embeddings, targets).into_scalar();
        assert!((loss - 600.0).abs() < 1e-3, "{loss}");
    }
}
