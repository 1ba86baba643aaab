//! Training operations with hand-written backward passes: grouped-query attention and SwiGLU's gate.
//!
//! burn's autodiff records every primitive of a composed operation and replays each one's
//! backward: attention becomes a dozen nodes (the `[b, heads, s, t]` scores, mask, softmax and
//! their gradients, plus a materialized repeat of the key/value heads for grouped-query
//! attention), SwiGLU's `silu(gate) * up` five. Each operation here is one autodiff node that
//! keeps only what its backward needs (attention: the probabilities, never the repeated keys and
//! values, whose gradients it sums per key head in the same product).
//!
//! - On Flex (CPU) the kernels are multi-threaded: Flex's matmul and softmax, or a rayon loop of
//!   their own. Flex runs the composed elementwise passes on one thread; they were about a third
//!   of a decoder layer's training step at Qwen2.5-0.5B's shape (docs/performance.md).
//! - On the CubeCL backend (CUDA, wgpu, CubeCL's CPU runtime) the kernels are the default bodies
//!   of [`FusedKernels`], composed from lazy Fusion operations that burn's fusion compiles into
//!   its own kernels; the gain there is the graph and the memory, not the kernels.
//!
//! They are reached through burn's backend-extension mechanism; [`grouped_attention`] and
//! [`silu_gate`] decide at run time whether the tensor lives on one of those backends and
//! otherwise compose the same result from ordinary tensor operations, so every backend computes
//! the same function.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

use crate::layers::repeat_kv;

/// The value masked attention scores are filled with: finite, so that a fully masked row (a
/// left-padded query) gets a uniform softmax instead of NaN, as in transformers' eager attention.
pub const MASKED_SCORE: f32 = f32::MIN;

/// The kernels the fused operations are built from. The default bodies compose backend
/// primitives (the CubeCL backend's Fusion fuses them); Flex overrides them with multi-threaded
/// loops.
pub trait FusedKernels: Backend {
    /// `softmax(scores + bias)` over the last dimension of `scores` `[b, heads, s, t]`, `bias`
    /// `[b, 1 | heads, s, t]`.
    fn biased_softmax(scores: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_biased_softmax::<Self>(scores, bias)
    }

    /// The gradient of the softmax input from its output `probs` and the gradient of the output,
    /// both `[.., t]`: `probs ⊙ (grad - rowsum(probs ⊙ grad))`.
    fn softmax_backward(probs: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_softmax_backward::<Self>(probs, grad)
    }

    /// `silu(gate) * up`, elementwise.
    fn silu_gate_forward(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_silu_gate::<Self>(gate, up)
    }

    /// The gradients of `gate` and `up` in [`silu_gate_forward`](Self::silu_gate_forward) given
    /// the output's: with `σ = sigmoid(gate)`, `grad · up · σ · (1 + gate · (1 - σ))` and
    /// `grad · gate · σ`.
    fn silu_gate_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed_silu_gate_backward::<Self>(gate, up, grad)
    }
}

fn composed_silu_gate<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let silu = B::float_mul(gate.clone(), B::sigmoid(gate));
    B::float_mul(silu, up)
}

fn composed_silu_gate_backward<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let sigmoid = B::sigmoid(gate.clone());
    let grad_up = B::float_mul(grad.clone(), B::float_mul(gate.clone(), sigmoid.clone()));
    // σ · (1 + g · (1 - σ)) = σ + g·σ - g·σ²
    let g_sigmoid = B::float_mul(gate, sigmoid.clone());
    let dsilu = B::float_sub(
        B::float_add(sigmoid.clone(), g_sigmoid.clone()),
        B::float_mul(g_sigmoid, sigmoid),
    );
    let grad_gate = B::float_mul(B::float_mul(grad, up), dsilu);
    (grad_gate, grad_up)
}

/// `softmax(scores + bias)` over the last axis, computed in f32 and returned in the scores'
/// dtype, as transformers' eager attention does (`softmax(..., dtype=torch.float32)`): in bf16
/// or f16 the masked score rounds to -inf and the row sums lose precision.
fn composed_biased_softmax<B: Backend>(
    scores: FloatTensor<B>,
    bias: FloatTensor<B>,
) -> FloatTensor<B> {
    let dtype = scores.dtype();
    let scores = B::float_add(cast::<B>(scores, DType::F32), cast::<B>(bias, DType::F32));
    cast::<B>(B::softmax(scores, 3), dtype)
}

/// The softmax backward in f32, returned in `probs`' dtype: in bf16 the row sum of `probs ⊙ grad`
/// over a few hundred keys would keep 8 bits. (transformers' eager attention keeps the f32
/// softmax output for its backward.)
fn composed_softmax_backward<B: Backend>(
    probs: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let dtype = probs.dtype();
    let (probs, grad) = (cast::<B>(probs, DType::F32), cast::<B>(grad, DType::F32));
    let last = probs.shape().num_dims() - 1;
    let row_dot = B::float_sum_dim(B::float_mul(probs.clone(), grad.clone()), last);
    cast::<B>(B::float_mul(probs, B::float_sub(grad, row_dot)), dtype)
}

/// `tensor` in `dtype`, untouched when it already is.
fn cast<B: Backend>(tensor: FloatTensor<B>, dtype: DType) -> FloatTensor<B> {
    if tensor.dtype() == dtype {
        return tensor;
    }
    B::float_cast(tensor, FloatDType::from(dtype))
}

impl FusedKernels for Dispatch {}

/// Operations with a fused backward, selected per backend at run time.
#[backend_extension(Flex: cfg(feature = "flex"), Cube: cfg(feature = "cube"), Autodiff)]
pub trait FusedOps: FusedKernels {
    /// Scaled dot-product attention of queries `[b, heads, s, d]` over keys and values
    /// `[b, kv_heads, t, d]` (`heads` a multiple of `kv_heads`, query head `i` reading key head
    /// `i / (heads / kv_heads)`), with an additive `bias` `[b, 1 | heads, s, t]` that carries the
    /// masks ([`MASKED_SCORE`] where masked). Returns `[b, heads, s, d]`.
    fn grouped_attention(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        attention_forward::<Self>(query, key, value, bias).output
    }

    /// SwiGLU's `silu(gate) * up`, elementwise over two tensors of one shape.
    fn silu_gate(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::silu_gate_forward(gate, up)
    }
}

#[cfg(feature = "flex")]
impl FusedOps for burn::backend::Flex {}

// The CubeCL backend is `Fusion<CubeBackend>` (the `cube` feature turns fusion on): the default
// bodies record lazy operations, which Fusion fuses and runs as its own kernels.
#[cfg(feature = "cube")]
impl<B: burn::backend::fusion::FusionBackend> FusedKernels for burn::backend::fusion::Fusion<B> {}

#[cfg(feature = "cube")]
impl<B: burn::backend::fusion::FusionBackend> FusedOps for burn::backend::fusion::Fusion<B> {}

impl<B: Backend, C: CheckpointStrategy> FusedKernels for Autodiff<B, C> {}

/// What the attention forward keeps for its backward.
#[derive(Debug, Clone)]
struct AttentionState<B: FusedKernels> {
    /// Scaled queries grouped by key head, `[b, kv_heads, n_rep * s, d]`.
    query: FloatTensor<B>,
    key: FloatTensor<B>,
    value: FloatTensor<B>,
    /// Softmax of the scores, `[b, kv_heads, n_rep * s, t]`.
    probs: FloatTensor<B>,
    scale: f32,
    query_shape: Shape,
}

struct AttentionForward<B: FusedKernels> {
    output: FloatTensor<B>,
    state: AttentionState<B>,
}

/// Grouping the query heads of one key head as consecutive rows, `[b, kv_heads, n_rep * s, d]`,
/// makes every product a plain batched matmul against the unrepeated keys and values: the score
/// rows of the `n_rep` heads of a group are stacked, and `Pᵀ · dO` sums their value gradients in
/// the same product.
fn attention_forward<B: FusedKernels>(
    query: FloatTensor<B>,
    key: FloatTensor<B>,
    value: FloatTensor<B>,
    bias: FloatTensor<B>,
) -> AttentionForward<B> {
    let query_shape = query.shape();
    let [b, heads, s, d] = query_shape.dims::<4>();
    let [_, kv_heads, t, _] = key.shape().dims::<4>();
    let n_rep = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let grouped = B::float_reshape(
        B::float_mul_scalar(query, scale.into()),
        Shape::new([b, kv_heads, n_rep * s, d]),
    );
    let scores = B::float_matmul(grouped.clone(), B::float_swap_dims(key.clone(), 2, 3));
    let probs = B::float_reshape(
        B::biased_softmax(B::float_reshape(scores, Shape::new([b, heads, s, t])), bias),
        Shape::new([b, kv_heads, n_rep * s, t]),
    );
    let output = B::float_reshape(
        B::float_matmul(probs.clone(), value.clone()),
        query_shape.clone(),
    );
    AttentionForward {
        output,
        state: AttentionState {
            query: grouped,
            key,
            value,
            probs,
            scale,
            query_shape,
        },
    }
}

/// Gradients of the queries, keys and values given the output's.
fn attention_backward<B: FusedKernels>(
    state: AttentionState<B>,
    grad_output: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let grad_output = B::float_reshape(grad_output, state.query.shape());
    // dV = Pᵀ · dO (summed over the heads of a group by the stacked rows).
    let grad_value = B::float_matmul(
        B::float_swap_dims(state.probs.clone(), 2, 3),
        grad_output.clone(),
    );
    // dP = dO · Vᵀ, then through the softmax (the bias is constant).
    let grad_probs = B::float_matmul(grad_output, B::float_swap_dims(state.value, 2, 3));
    let grad_scores = B::softmax_backward(state.probs, grad_probs);
    // S = (scale · Q) · Kᵀ.
    let grad_query = B::float_mul_scalar(
        B::float_matmul(grad_scores.clone(), state.key),
        state.scale.into(),
    );
    let grad_key = B::float_matmul(B::float_swap_dims(grad_scores, 2, 3), state.query);
    (
        B::float_reshape(grad_query, state.query_shape),
        grad_key,
        grad_value,
    )
}

/// Registers each gradient for its parent node when that parent takes part in the graph (a macro:
/// burn-autodiff does not export the node type a function would name).
macro_rules! register_grads {
    ($backend:ty, $grads:expr, $parents:expr, $values:expr) => {
        for (node, grad) in $parents.into_iter().zip($values) {
            if let Some(node) = node {
                $grads.register::<$backend>(node.id, grad);
            }
        }
    };
}

impl<B: FusedKernels, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn grouped_attention(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GroupedAttention;

        impl<B: FusedKernels> Backward<B, 3> for GroupedAttention {
            type State = AttentionState<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let (grad_query, grad_key, grad_value) = attention_backward::<B>(ops.state, grad);
                register_grads!(B, grads, ops.parents, [grad_query, grad_key, grad_value]);
            }
        }

        // The bias is a constant: masks and ALiBi slopes never train.
        let bias = bias.into_primitive();
        let (query, query_node) = query.into_parts();
        let (key, key_node) = key.into_parts();
        let (value, value_node) = value.into_parts();
        match GroupedAttention
            .prepare::<C>([query_node, key_node, value_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let forward = attention_forward::<B>(query, key, value, bias);
                prep.finish(forward.state, forward.output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(attention_forward::<B>(query, key, value, bias).output)
            }
        }
    }

    fn silu_gate(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SiluGate;

        impl<B: FusedKernels> Backward<B, 2> for SiluGate {
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let (gate, up) = ops.state;
                let (grad_gate, grad_up) = B::silu_gate_backward(gate, up, grad);
                register_grads!(B, grads, ops.parents, [grad_gate, grad_up]);
            }
        }

        let (gate, gate_node) = gate.into_parts();
        let (up, up_node) = up.into_parts();
        match SiluGate
            .prepare::<C>([gate_node, up_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::silu_gate_forward(gate.clone(), up.clone());
                prep.finish((gate, up), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::silu_gate_forward(gate, up)),
        }
    }
}

#[cfg(feature = "flex")]
mod flex {
    use super::{FusedKernels, MASKED_SCORE, composed_biased_softmax, composed_softmax_backward};
    use super::{composed_silu_gate, composed_silu_gate_backward};
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Flex, TensorMetadata};
    use burn::tensor::{DType, TensorData};
    use rayon::prelude::*;

    /// Rows per rayon task: a few hundred kilobytes of work each.
    const ROWS_PER_TASK: usize = 64;

    /// Below this, `e^x` is not a normal f32: such scores get probability 0.
    const EXP_UNDERFLOW: f32 = -87.0;

    fn contiguous_f32(tensor: &FlexTensor) -> Option<FlexTensor> {
        (tensor.dtype() == DType::F32).then(|| tensor.to_contiguous())
    }

    impl FusedKernels for Flex {
        fn biased_softmax(scores: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
            let (Some(scores_c), Some(bias_c)) = (contiguous_f32(&scores), contiguous_f32(&bias))
            else {
                return composed_biased_softmax::<Self>(scores, bias);
            };
            let shape = scores.shape();
            let [_, heads, seq, keys] = shape.dims::<4>();
            let bias_heads = bias.shape().dims::<4>()[1];
            let x: &[f32] = scores_c.as_slice().expect("contiguous");
            let m: &[f32] = bias_c.as_slice().expect("contiguous");
            let mut out = vec![0.0f32; x.len()];
            out.par_chunks_mut(ROWS_PER_TASK * keys)
                .enumerate()
                .for_each(|(task, rows)| {
                    for (k, out_row) in rows.chunks_mut(keys).enumerate() {
                        let row = task * ROWS_PER_TASK + k;
                        let bias_row = if bias_heads == 1 {
                            // Row `row` is (batch, head, query): drop the head.
                            (row / (heads * seq)) * seq + row % seq
                        } else {
                            row
                        };
                        softmax_row(
                            &x[row * keys..][..keys],
                            &m[bias_row * keys..][..keys],
                            out_row,
                        );
                    }
                });
            FlexTensor::from_data(TensorData::new(out, shape))
        }

        fn softmax_backward(
            probs: FloatTensor<Self>,
            grad: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            let (Some(p), Some(g)) = (contiguous_f32(&probs), contiguous_f32(&grad)) else {
                return composed_softmax_backward::<Self>(probs, grad);
            };
            let shape = probs.shape();
            let keys = shape[shape.num_dims() - 1];
            let (p, g): (&[f32], &[f32]) = (
                p.as_slice().expect("contiguous"),
                g.as_slice().expect("contiguous"),
            );
            let mut out = vec![0.0f32; p.len()];
            out.par_chunks_mut(ROWS_PER_TASK * keys)
                .zip(
                    p.par_chunks(ROWS_PER_TASK * keys)
                        .zip(g.par_chunks(ROWS_PER_TASK * keys)),
                )
                .for_each(|(out, (p, g))| {
                    for ((out, p), g) in
                        out.chunks_mut(keys).zip(p.chunks(keys)).zip(g.chunks(keys))
                    {
                        let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
                        for ((o, p), g) in out.iter_mut().zip(p).zip(g) {
                            *o = p * (g - dot);
                        }
                    }
                });
            FlexTensor::from_data(TensorData::new(out, shape))
        }

        fn silu_gate_forward(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
            let (Some(g), Some(u)) = (contiguous_f32(&gate), contiguous_f32(&up)) else {
                return composed_silu_gate::<Self>(gate, up);
            };
            let shape = gate.shape();
            let (g, u): (&[f32], &[f32]) = (
                g.as_slice().expect("contiguous"),
                u.as_slice().expect("contiguous"),
            );
            let mut out = vec![0.0f32; g.len()];
            out.par_chunks_mut(ELEMENTS_PER_TASK)
                .zip(
                    g.par_chunks(ELEMENTS_PER_TASK)
                        .zip(u.par_chunks(ELEMENTS_PER_TASK)),
                )
                .for_each(|(out, (g, u))| {
                    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                        *o = g * sigmoid(g) * u;
                    }
                });
            FlexTensor::from_data(TensorData::new(out, shape))
        }

        fn silu_gate_backward(
            gate: FloatTensor<Self>,
            up: FloatTensor<Self>,
            grad: FloatTensor<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            let (Some(gc), Some(uc), Some(dc)) = (
                contiguous_f32(&gate),
                contiguous_f32(&up),
                contiguous_f32(&grad),
            ) else {
                return composed_silu_gate_backward::<Self>(gate, up, grad);
            };
            let shape = gate.shape();
            let g: &[f32] = gc.as_slice().expect("contiguous");
            let u: &[f32] = uc.as_slice().expect("contiguous");
            let d: &[f32] = dc.as_slice().expect("contiguous");
            let mut grad_gate = vec![0.0f32; g.len()];
            let mut grad_up = vec![0.0f32; g.len()];
            grad_gate
                .par_chunks_mut(ELEMENTS_PER_TASK)
                .zip(grad_up.par_chunks_mut(ELEMENTS_PER_TASK))
                .zip(
                    g.par_chunks(ELEMENTS_PER_TASK)
                        .zip(u.par_chunks(ELEMENTS_PER_TASK)),
                )
                .zip(d.par_chunks(ELEMENTS_PER_TASK))
                .for_each(|(((dg, du), (g, u)), d)| {
                    for ((((dg, du), &g), &u), &d) in dg.iter_mut().zip(du).zip(g).zip(u).zip(d) {
                        let s = sigmoid(g);
                        *du = d * g * s;
                        *dg = d * u * s * (1.0 + g * (1.0 - s));
                    }
                });
            (
                FlexTensor::from_data(TensorData::new(grad_gate, shape.clone())),
                FlexTensor::from_data(TensorData::new(grad_up, shape)),
            )
        }
    }

    /// Elements per rayon task of the elementwise kernels.
    const ELEMENTS_PER_TASK: usize = 1 << 15;

    fn sigmoid(x: f32) -> f32 {
        1.0 / (1.0 + exp(-x))
    }

    /// `e^x` in f32 within 2 ulp over the normal range (Cephes' `expf`: `2^n · p(r)` with
    /// `x = n ln 2 + r`), written without branches or calls so that loops over it vectorize;
    /// glibc's `expf` is a call per element, and a slow one for arguments that underflow. Inputs
    /// are clamped to `[-87.3, 88]`: results below `f32::MIN_POSITIVE` come out as about 1e-38
    /// instead of a subnormal or 0, and `e^88` is the largest.
    #[inline(always)]
    pub(super) fn exp(x: f32) -> f32 {
        let x = x.clamp(-87.336_54, 88.0);
        // Round to nearest through the float adder (1.5 · 2^23): vectorizes without SSE4.1.
        const ROUND: f32 = 12_582_912.0;
        let n = (x * core::f32::consts::LOG2_E + ROUND) - ROUND;
        let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
        let mut p = 1.987_569_1e-4f32;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 1.666_666_5e-1;
        #[allow(clippy::excessive_precision)] // Cephes' coefficient, as printed there
        let half = 5.000_000_1e-1;
        p = p * r + half;
        let y = p * r * r + r + 1.0;
        y * f32::from_bits(((n as i32 + 127) << 23) as u32)
    }

    /// One row of `softmax(x + bias)`. Masked keys (bias at [`MASKED_SCORE`]) get exactly 0 without
    /// an `exp`; a row with every key masked gets the uniform distribution, as the composed
    /// `softmax(x + MASKED_SCORE)` does.
    fn softmax_row(x: &[f32], bias: &[f32], out: &mut [f32]) {
        const MASKED: f32 = MASKED_SCORE / 2.0;
        let mut max = f32::NEG_INFINITY;
        for ((o, &x), &b) in out.iter_mut().zip(x).zip(bias) {
            let v = if b < MASKED { f32::NEG_INFINITY } else { x + b };
            *o = v;
            max = max.max(v);
        }
        if max == f32::NEG_INFINITY {
            out.fill(1.0 / out.len() as f32);
            return;
        }
        let mut sum = 0.0f32;
        for o in out.iter_mut() {
            let d = *o - max;
            let e = exp(d);
            *o = if d > EXP_UNDERFLOW { e } else { 0.0 };
            sum += *o;
        }
        let inv = 1.0 / sum;
        out.iter_mut().for_each(|o| *o *= inv);
    }
}

/// A backend [`FusedOps`] is implemented for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)] // A backend's variant is never built when its feature is off.
pub(crate) enum FusedBackend {
    /// Flex (CPU).
    Flex,
    /// The CubeCL backend (CUDA, wgpu, CubeCL's CPU runtime).
    Cube,
}

/// The backend with fused operations that `device` (autodiff or not) runs on, if any.
pub(crate) fn fused_backend(device: &Device) -> Option<FusedBackend> {
    #[allow(unreachable_patterns)] // Flex and Cube may be the only backends compiled in.
    match device.clone().without_autodiff().as_dispatch() {
        #[cfg(feature = "flex")]
        burn::backend::DispatchDevice::Flex(_) => Some(FusedBackend::Flex),
        #[cfg(feature = "cube")]
        burn::backend::DispatchDevice::Cube(_) => Some(FusedBackend::Cube),
        _ => None,
    }
}

/// Attention as [`FusedOps::grouped_attention`] describes it: one autodiff node on Flex and on
/// the CubeCL backend; on other backends the same function composed of tensor operations.
pub fn grouped_attention(
    query: Tensor<4>,
    key: Tensor<4>,
    value: Tensor<4>,
    bias: Tensor<4>,
) -> Tensor<4> {
    if fused_backend(&query.device()).is_some() {
        let output = <Dispatch as FusedOps>::grouped_attention(
            query.into_dispatch(),
            key.into_dispatch(),
            value.into_dispatch(),
            bias.into_dispatch(),
        );
        return Tensor::from_dispatch(output);
    }
    composed_attention(query, key, value, bias)
}

/// `silu(gate) * up` as [`FusedOps::silu_gate`] describes it: one autodiff node on Flex (one
/// multi-threaded pass) and on the CubeCL backend; on other backends composed of tensor
/// operations.
pub fn silu_gate<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if fused_backend(&gate.device()).is_some() {
        let output = <Dispatch as FusedOps>::silu_gate(gate.into_dispatch(), up.into_dispatch());
        return Tensor::from_dispatch(output);
    }
    burn::tensor::activation::silu(gate) * up
}

/// [`grouped_attention`] from ordinary tensor operations (the reference the fused op is tested
/// against, and the path of other backends).
pub fn composed_attention(
    query: Tensor<4>,
    key: Tensor<4>,
    value: Tensor<4>,
    bias: Tensor<4>,
) -> Tensor<4> {
    let [_, heads, _, d] = query.dims();
    let n_rep = heads / key.dims()[1];
    let scores = query.matmul(repeat_kv(key, n_rep).swap_dims(2, 3)) / (d as f64).sqrt();
    // The fused op's own fallback: f32 softmax, result in the scores' dtype (a bf16 base meets
    // the f32 mask here), recorded op by op under autodiff.
    let probs = composed_biased_softmax::<Dispatch>(scores.into_dispatch(), bias.into_dispatch());
    Tensor::<4>::from_dispatch(probs).matmul(repeat_kv(value, n_rep))
}

#[cfg(all(test, any(feature = "flex", feature = "cubecl-cpu", feature = "cuda")))]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance};

    /// The autodiff devices of the backends with fused operations that this build has:
    /// `cargo test -p peft-models --features flex,cubecl-cpu` runs every test on both, and
    /// `--features cuda` on the first GPU.
    fn devices() -> Vec<Device> {
        vec![
            #[cfg(feature = "flex")]
            Device::flex().autodiff(),
            #[cfg(feature = "cubecl-cpu")]
            Device::cpu().autodiff(),
            #[cfg(feature = "cuda")]
            Device::cuda(0).autodiff(),
        ]
    }

    fn random(shape: [usize; 4], device: &Device) -> Tensor<4> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
    }

    /// A causal mask over `past` earlier keys with the first key of row 1 padded, `[b, 1, s, t]`.
    fn causal_bias(b: usize, s: usize, past: usize, device: &Device) -> Tensor<4> {
        let t = past + s;
        let mut bias = vec![0.0f32; b * s * t];
        for row in 0..b {
            for i in 0..s {
                for j in 0..t {
                    if j > past + i || (row == 1 && j == 0) {
                        bias[(row * s + i) * t + j] = MASKED_SCORE;
                    }
                }
            }
        }
        Tensor::from_data(TensorData::new(bias, [b, 1, s, t]), device)
    }

    /// Output and the gradients of queries, keys and values under `sum(output * weights)`.
    fn run(
        attention: fn(Tensor<4>, Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>,
        inputs: &[Tensor<4>; 4],
        weights: &Tensor<4>,
    ) -> Vec<TensorData> {
        let [q, k, v, bias] = inputs.clone().map(|x| x.require_grad());
        let bias = bias.set_require_grad(false);
        let out = attention(q.clone(), k.clone(), v.clone(), bias);
        let grads = (out.clone() * weights.clone()).sum().backward();
        let mut result = vec![out.into_data()];
        result.extend(
            [q, k, v]
                .iter()
                .map(|x| x.grad(&grads).unwrap().into_data()),
        );
        result
    }

    fn check(heads: usize, kv_heads: usize, bias_heads: usize) {
        for device in devices() {
            check_on(heads, kv_heads, bias_heads, &device);
        }
    }

    fn check_on(heads: usize, kv_heads: usize, bias_heads: usize, device: &Device) {
        // 3 x 6 x 7 = 126 score rows: more than one task of the Flex kernels.
        let (b, s, past, d) = (3, 7, 3, 8);
        let t = past + s;
        let mut bias = causal_bias(b, s, past, device);
        if bias_heads > 1 {
            bias = bias + random([b, bias_heads, s, t], device);
        }
        let inputs = [
            random([b, heads, s, d], device),
            random([b, kv_heads, t, d], device),
            random([b, kv_heads, t, d], device),
            bias,
        ];
        let weights = random([b, heads, s, d], device);
        let fused = run(grouped_attention, &inputs, &weights);
        let composed = run(composed_attention, &inputs, &weights);
        for (name, (a, e)) in ["output", "dq", "dk", "dv"]
            .iter()
            .zip(fused.iter().zip(&composed))
        {
            let (a, e) = (
                a.try_to_vec_as::<f32>().unwrap(),
                e.try_to_vec_as::<f32>().unwrap(),
            );
            let worst = a
                .iter()
                .zip(&e)
                .map(|(a, e)| (a - e).abs())
                .fold(0.0, f32::max);
            assert!(worst < 1e-5, "{device:?} {name}: max difference {worst}");
        }
    }

    #[test]
    fn every_tested_backend_takes_the_fused_path() {
        // Otherwise `grouped_attention` would be `composed_attention` and the comparisons below
        // would compare a function with itself.
        let devices = devices();
        assert!(!devices.is_empty());
        for device in devices {
            assert!(fused_backend(&device).is_some(), "{device:?}");
        }
    }

    #[cfg(feature = "flex")]
    #[test]
    fn fast_exp_is_within_two_ulp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (flex::exp(x), (x as f64).exp());
            let ulp = (want as f32).abs() * f32::EPSILON;
            assert!(
                ((got as f64) - want).abs() <= 2.0 * ulp as f64,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.001_3;
        }
        assert_eq!(flex::exp(0.0), 1.0);
        assert!(flex::exp(-1e30) < 1.2e-38 && flex::exp(1e30).is_finite());
    }

    #[test]
    fn fused_silu_gate_matches_composed() {
        for device in devices() {
            // More elements than one task of the Flex kernel, and values where σ saturates.
            let shape = [3, 70_000];
            let gate = (Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device) * 8.0)
                .require_grad();
            let up =
                Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device).require_grad();
            let weights = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let results = [true, false].map(|fused| {
                let out = if fused {
                    silu_gate(gate.clone(), up.clone())
                } else {
                    burn::tensor::activation::silu(gate.clone()) * up.clone()
                };
                let grads = (out.clone() * weights.clone()).sum().backward();
                [out, gate.grad(&grads).unwrap(), up.grad(&grads).unwrap()]
                    .map(|x| x.into_data().try_to_vec_as::<f32>().unwrap())
            });
            for (name, (a, e)) in ["output", "d gate", "d up"]
                .iter()
                .zip(results[0].iter().zip(&results[1]))
            {
                let worst = a
                    .iter()
                    .zip(e)
                    .map(|(a, e)| (a - e).abs() / (1.0 + e.abs()))
                    .fold(0.0, f32::max);
                assert!(
                    worst < 1e-5,
                    "{device:?} {name}: max relative difference {worst}"
                );
            }
        }
    }

    #[test]
    fn fused_attention_matches_composed_with_grouped_heads() {
        check(6, 2, 1);
    }

    #[test]
    fn fused_attention_matches_composed_with_per_head_bias() {
        check(4, 4, 4);
    }

    #[test]
    fn bf16_attention_takes_an_f32_bias_and_stays_bf16() {
        // A bf16 base in training: bf16 queries, keys and values, the f32 mask of `layers`.
        for device in devices() {
            let (q, k, v) = (
                random([2, 4, 5, 8], &device),
                random([2, 2, 7, 8], &device),
                random([2, 2, 7, 8], &device),
            );
            let bias = causal_bias(2, 5, 2, &device);
            let reference = composed_attention(q.clone(), k.clone(), v.clone(), bias.clone());
            // CubeCL 0.11's CPU runtime claims bf16 but fails to build bf16 kernels ("kernel
            // symbol not found"); f16 takes the same path there.
            let half = match device.clone().without_autodiff().as_dispatch() {
                #[cfg(feature = "cubecl-cpu")]
                burn::backend::DispatchDevice::Cube(burn::backend::CubeDevice::Cpu(_)) => {
                    DType::F16
                }
                _ => DType::BF16,
            };
            let [q, k, v] =
                [q, k, v].map(|t| t.without_autodiff().cast(half).autodiff().require_grad());
            for out in [
                grouped_attention(q.clone(), k.clone(), v.clone(), bias.clone()),
                composed_attention(q.clone(), k.clone(), v.clone(), bias.clone()),
            ] {
                assert_eq!(out.dtype(), half);
                // bf16 inputs and products: a relative step of 2^-8 on values of order 1.
                out.clone()
                    .cast(DType::F32)
                    .into_data()
                    .assert_approx_eq::<f32>(
                        &reference.clone().into_data(),
                        Tolerance::absolute(0.05),
                    );
                let grads = out.sum().backward();
                assert_eq!(q.grad(&grads).unwrap().dtype(), half);
            }
        }
    }

    #[test]
    fn fully_masked_rows_get_the_uniform_softmax() {
        // A fully masked row (a left-padded query) averages the values, and its gradient is finite.
        for device in devices() {
            let q = random([1, 2, 2, 4], &device).require_grad();
            let k = random([1, 1, 2, 4], &device);
            let v = random([1, 1, 2, 4], &device);
            let bias = Tensor::<4>::from_data(
                TensorData::new(vec![MASKED_SCORE, MASKED_SCORE, 0.0, 0.0], [1, 1, 2, 2]),
                &device,
            );
            let out = grouped_attention(q.clone(), k, v.clone(), bias);
            let mean = v.clone().slice([0..1, 0..1, 0..2, 0..4]).mean_dim(2);
            out.clone()
                .slice([0..1, 0..1, 0..1, 0..4])
                .into_data()
                .assert_approx_eq::<f32>(&mean.into_data(), Tolerance::absolute(1e-6));
            let grads = out.sum().backward();
            let dq: Vec<f32> = q
                .grad(&grads)
                .unwrap()
                .into_data()
                .try_to_vec_as::<f32>()
                .unwrap();
            assert!(dq.iter().all(|x| x.is_finite()));
        }
    }
}
