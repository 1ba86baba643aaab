//! Pieces shared by the model files: rotate-half RoPE, grouped-query attention over a padding
//! mask and an optional sliding window, the tied head, and `Past` (prefix / cache / mask / positions of one forward).

use crate::fused::{FusedBackend, MASKED_SCORE, fused_backend, grouped_attention};
use burn::nn::{Embedding, Linear};
use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use peft_core::mask::{join_masks, key_positions, padding_attention_mask, query_positions};
use peft_core::{BiasDeltas, KvCache, LayerKv, ModelGeometry, ModelInput};

/// Applies rotate-half RoPE to `x` `[batch, heads, seq, head_dim]`.
pub fn apply_rope(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    let [b, h, s, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
    let x2 = x.clone().slice([0..b, 0..h, 0..s, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos + rotated * sin
}

/// Repeats key/value heads `n_rep` times (`[b, kvh, t, d] -> [b, kvh * n_rep, t, d]`), in the
/// order of transformers' `repeat_kv`.
pub fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, h, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, h, n_rep, t, d])
        .reshape([b, h * n_rep, t, d])
}

/// Causal attention of queries `[b, heads, s, d]` over keys/values `[b, kv_heads, t, d]`
/// (the queries being the last `s` of the `t` keys), with an optional padding mask of all keys
/// `[b, t]`, an optional additive bias (ALiBi) and an optional sliding window (a query sees the
/// last `window` keys up to itself, counted by key index as transformers counts cache positions,
/// prefix and padding included). Returns `[b, heads, s, d]`.
pub fn causal_attention(
    query: Tensor<4>,
    key: Tensor<4>,
    value: Tensor<4>,
    key_mask: Option<Tensor<2, Int>>,
    bias: Option<Tensor<4>>,
    window: Option<usize>,
) -> Tensor<4> {
    let [batch, heads, seq, _] = query.dims();
    let kv_heads = key.dims()[1];
    let keys = key.dims()[2];
    // Only a window that hides some key needs a mask.
    let window = window.filter(|w| keys > *w);
    if query.is_autodiff() {
        // Training: one autodiff node with a fused backward instead of burn's decomposed
        // attention (see `fused`).
        let mut mask = attention_bias(key_mask, &query, &key, window);
        if let Some(bias) = bias {
            mask = mask + bias;
        }
        return grouped_attention(query, key, value, mask);
    }
    let n_rep = heads / kv_heads;
    if seq == 1 && n_rep > 1 {
        // Decoding: the `n_rep` query heads of a key head become the rows of one head
        // (`[b, kv_heads, n_rep, d]`, a view), so the cache is read as stored instead of copied
        // `n_rep` times every step, on every backend. One query sees every key: only padding is
        // masked. One layer on Flex, 14 heads over 2, 138 and 522 keys: 2.2-2.4x faster than
        // over repeated heads and 1.3-1.4x faster than Flex's kernel given the unrepeated heads.
        let [batch, _, _, head_dim] = query.dims();
        let keys = key.dims()[2];
        // The grouped rows stand where the queries were: `[b, kv_heads, n_rep, keys]`.
        let mask = with_window(
            padding_attention_mask(key_mask, kv_heads, n_rep),
            window_mask(1, keys, window, &query.device()),
            [batch, kv_heads, n_rep, keys],
        );
        let bias = bias.map(|bias| bias.reshape([batch, kv_heads, n_rep, keys]));
        let query = query.reshape([batch, kv_heads, n_rep, head_dim]);
        return attention(query, key, value, mask, bias, attention_options(false))
            .reshape([batch, heads, 1, head_dim]);
    }
    // Several queries: causal. Flex's kernel takes fewer key/value heads than query heads as they
    // are. Grouping the rows as above would need an explicit causal mask instead of `is_causal`:
    // measured 0-17% slower at 138 and 522 tokens. CubeCL's flash kernel indexes keys by the
    // query's head and its fallback multiplies head by head, so there the heads are repeated (once
    // per forward, not per decoding step).
    let (key, value) = if attention_takes_grouped_heads(&query.device()) {
        (key, value)
    } else {
        (repeat_kv(key, n_rep), repeat_kv(value, n_rep))
    };
    let mask = with_window(
        padding_attention_mask(key_mask, heads, seq),
        window_mask(seq, keys, window, &query.device()),
        [batch, heads, seq, keys],
    );
    attention(query, key, value, mask, bias, attention_options(true))
}

/// `[1, 1, seq, keys]`, `true` on the keys a sliding window hides from queries that are the last
/// `seq` of `keys`: those `window` or more positions before the query (transformers'
/// `kv_idx > q_idx - sliding_window`). `None` without a window.
fn window_mask(
    seq: usize,
    keys: usize,
    window: Option<usize>,
    device: &Device,
) -> Option<Tensor<4, Bool>> {
    let window = window?;
    let rows = Tensor::<1, Int>::arange(0..seq as i64, device).reshape([seq, 1]);
    let cols = Tensor::<1, Int>::arange(0..keys as i64, device).reshape([1, keys]);
    // Query row r sits at key index r + keys - seq; key c is hidden when c <= that - window.
    let hidden = cols.lower_equal(rows + (keys - seq) as i64 - window as i64);
    Some(hidden.reshape([1, 1, seq, keys]))
}

/// A padding mask and a window mask joined, `shape`.
fn with_window(
    padding: Option<Tensor<4, Bool>>,
    window: Option<Tensor<4, Bool>>,
    shape: [usize; 4],
) -> Option<Tensor<4, Bool>> {
    match (padding, window) {
        (padding, None) => padding,
        (None, Some(window)) => Some(window.expand(shape)),
        (Some(padding), Some(window)) => Some(padding.bool_or(window.expand(shape))),
    }
}

/// burn's attention options as every call here sets them: the default `1/√d` scale, no softcap.
fn attention_options(is_causal: bool) -> AttentionModuleOptions {
    AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal,
    }
}

/// Whether burn's `attention` on `device`'s backend accepts fewer key/value heads than query
/// heads (Flex's kernel maps each query head to its key head).
fn attention_takes_grouped_heads(device: &Device) -> bool {
    fused_backend(device) == Some(FusedBackend::Flex)
}

/// The additive attention bias of queries `[b, _, s, _]` that are the last `s` of keys
/// `[b, _, t, _]`: [`MASKED_SCORE`] on future keys, on keys whose `key_mask` is 0 and on keys a
/// sliding `window` hides, else 0. `[b, 1, s, t]`.
fn attention_bias(
    key_mask: Option<Tensor<2, Int>>,
    query: &Tensor<4>,
    key: &Tensor<4>,
    window: Option<usize>,
) -> Tensor<4> {
    let [batch, _, seq, _] = query.dims();
    let keys = key.dims()[2];
    let device = query.device().without_autodiff();
    let rows = Tensor::<1, Int>::arange(0..seq as i64, &device).reshape([seq, 1]);
    let cols = Tensor::<1, Int>::arange(0..keys as i64, &device).reshape([1, keys]);
    let future = cols
        .greater(rows + (keys - seq) as i64)
        .reshape([1, 1, seq, keys])
        .expand([batch, 1, seq, keys]);
    let padding = padding_attention_mask(key_mask.map(|mask| mask.to_device(&device)), 1, seq);
    let masked = match padding {
        Some(padding) => future.bool_or(padding),
        None => future,
    };
    let masked = match window_mask(seq, keys, window, &device) {
        Some(window) => masked.bool_or(window.expand([batch, 1, seq, keys])),
        None => masked,
    };
    Tensor::<4>::zeros([batch, 1, seq, keys], &device)
        .mask_fill(masked, MASKED_SCORE)
        .to_device(&query.device())
}

/// `linear` over the rows of `x` `[b, s, d_in]` as one `[b * s, d_in]` matrix.
///
/// burn's `Linear` keeps a 3-D input batched when `s` is a multiple of 32, and Flex then runs one
/// single-threaded GEMM per batch row; one matrix uses every core (measured: an MLP forward and
/// backward at 4x128 takes 15% less time, `down_proj`'s backward 37% less).
pub fn linear_rows(linear: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [b, s, d] = x.dims();
    let y = linear.forward(x.reshape([b * s, d]));
    let out = y.dims()[1];
    y.reshape([b, s, out])
}

/// `[b, s, heads * d] -> [b, heads, s, d]`.
pub fn split_heads(x: Tensor<3>, heads: usize, head_dim: usize) -> Tensor<4> {
    let [b, s, _] = x.dims();
    x.reshape([b, s, heads, head_dim]).swap_dims(1, 2)
}

/// `[b, heads, s, d] -> [b, s, heads * d]`.
pub fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, s, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, s, h * d])
}

/// Logits against a tied embedding matrix `[vocab, d]`: `hidden [b, s, d] -> [b, s, vocab]`.
///
/// Computed as `(weight @ hidden^T)^T` so the large matrix is read in its stored row-major
/// layout: multiplying by `weight^T` instead makes backends materialize a transposed copy of the
/// whole embedding on every call (measured on Flex: 7x slower decoding for a 151,936-token vocab).
pub fn tied_lm_head(hidden: Tensor<3>, embedding: &Embedding) -> Tensor<3> {
    let [b, s, d] = hidden.dims();
    let weight = embedding.weight.val(); // [vocab, d]
    let vocab = weight.dims()[0];
    let logits = weight.matmul(hidden.reshape([b * s, d]).transpose()); // [vocab, b * s]
    logits.transpose().reshape([b, s, vocab])
}

/// What the current input attends to before itself (an injected prefix or a cache), with the
/// padding mask of every key and the positions that follow from it. Shared by every model so that
/// prefix, cache and padding behave the same everywhere.
pub(crate) struct Past {
    bias_deltas: Option<BiasDeltas>,
    packing: Option<Packing>,
    layers: Vec<Option<LayerKv>>,
    key_mask: Option<Tensor<2, Int>>,
    len: usize,
    batch: usize,
    seq: usize,
    device: Device,
}

impl Past {
    /// Splits a model input into its embeddings and what they attend to before themselves.
    ///
    /// # Panics
    ///
    /// If both a prefix and a non-empty cache are given (the cache already holds the prefix), or
    /// their shapes do not fit the model.
    pub(crate) fn resolve(input: ModelInput, geometry: &ModelGeometry) -> (Tensor<3>, Self) {
        let [batch, seq, _] = input.inputs_embeds.dims();
        let device = input.inputs_embeds.device();
        let cache = input.cache.filter(|c| !c.is_empty());
        let (past, past_mask) = match (input.prefix, cache) {
            (Some(_), Some(_)) => panic!(
                "a prefix cannot be combined with a non-empty cache: the cache already holds the prefix"
            ),
            (Some(prefix), None) => (Some(prefix), input.prefix_mask),
            (None, Some(cache)) => (Some(cache.layers), cache.attention_mask),
            (None, None) => (None, None),
        };
        let len = past
            .as_ref()
            .and_then(|p| p.first())
            .map_or(0, LayerKv::len);
        if let Some(past) = &past {
            assert_eq!(
                past.len(),
                geometry.num_layers,
                "prefix/cache has {} layers, the model {}",
                past.len(),
                geometry.num_layers
            );
            let [b, h, _, d] = past[0].key.dims();
            assert!(
                b == batch && h == geometry.num_key_value_heads && d == geometry.head_dim,
                "prefix/cache keys are [{b}, {h}, _, {d}], expected [{batch}, {}, _, {}]",
                geometry.num_key_value_heads,
                geometry.head_dim
            );
        }
        let layers = match past {
            Some(past) => past.into_iter().map(Some).collect(),
            None => vec![None; geometry.num_layers],
        };
        let packing = input
            .attention_mask
            .as_ref()
            .and_then(|mask| Packing::of_padding(mask, &device));
        let key_mask = join_masks(past_mask, len, input.attention_mask, batch, seq, &device);
        let past = Self {
            bias_deltas: input.bias_deltas.filter(|d| !d.is_empty()),
            packing,
            layers,
            key_mask,
            len,
            batch,
            seq,
            device,
        };
        (input.inputs_embeds, past)
    }

    /// Positions of the current input's tokens, `[batch, seq]`.
    pub(crate) fn query_positions(&self) -> Tensor<2, Int> {
        query_positions(
            self.key_mask.clone(),
            self.batch,
            self.len + self.seq,
            self.seq,
            &self.device,
        )
    }

    /// Positions of every key, past and current, `[batch, past + seq]`.
    pub(crate) fn key_positions(&self) -> Tensor<2, Int> {
        key_positions(
            self.key_mask.clone(),
            self.batch,
            self.len + self.seq,
            &self.device,
        )
    }

    /// The input's per-row bias deltas (for the biases outside the layers).
    pub(crate) fn bias_deltas(&self) -> Option<BiasDeltas> {
        self.bias_deltas.clone()
    }

    /// Runs `layers` in order over `x` `[batch, seq, hidden]`, each through `forward(layer, x,
    /// its past, key mask, its rows)`, and collects the cache of every layer. `layer_names` is the
    /// layers' Hugging Face path (`model.layers`): layer `i`'s biases are named
    /// `{layer_names}.{i}.…`.
    ///
    /// When the input carries padding, the layers see only its tokens: `x` is packed to
    /// `[1, tokens, hidden]` before the first layer and unpacked after the last (zeros at the
    /// padding), and each layer unpacks what its attention needs ([`Rows`]).
    pub(crate) fn run<L>(
        self,
        layers: &[L],
        layer_names: &str,
        x: Tensor<3>,
        mut forward: impl FnMut(
            &L,
            Tensor<3>,
            Option<LayerKv>,
            Option<Tensor<2, Int>>,
            Rows<'_>,
        ) -> (Tensor<3>, LayerKv),
    ) -> (Tensor<3>, KvCache) {
        let packing = self.packing.as_ref();
        // The stream between the layers: packed like the layers' rows, without deltas.
        let stream = Rows::new(None, "", packing);
        let mut x = stream.pack(x);
        let mut cache = Vec::with_capacity(layers.len());
        for (i, (layer, past)) in layers.iter().zip(self.layers).enumerate() {
            // The names are built only for inputs that carry deltas.
            let prefix = match &self.bias_deltas {
                Some(_) => format!("{layer_names}.{i}."),
                None => String::new(),
            };
            let rows = Rows::new(self.bias_deltas.as_ref(), &prefix, packing);
            let (y, kv) = forward(layer, x, past, self.key_mask.clone(), rows);
            x = y;
            cache.push(kv);
        }
        let x = stream.unpack(x);
        let cache = KvCache {
            layers: cache,
            attention_mask: self.key_mask,
        };
        (x, cache)
    }
}

/// Where the tokens of a padded batch `[batch, seq]` stand, so that the work done per token
/// (norms, projections, MLPs: nearly all of a forward and backward) is done for tokens only.
///
/// A fine-tuning batch is padded to its longest row: 8 rows of 10-80 tokens are about half
/// padding, and a padded position costs every matrix product what a token costs. transformers
/// computes them all; here the residual stream of such a batch is packed to `[1, tokens, hidden]`
/// and only attention, which needs the rows apart, sees the padded layout. A padded position's
/// output never reaches a token (its key is masked), so packing changes no token's result.
#[derive(Debug, Clone)]
pub(crate) struct Packing {
    /// `row * seq + position` of every token, row by row: `[tokens]`.
    flat: Tensor<1, Int>,
    /// The batch row of every token: `[tokens]`.
    rows: Tensor<1, Int>,
    batch: usize,
    seq: usize,
}

impl Packing {
    /// The packing of a batch of several positions with padding mask `mask` `[batch, seq]` (1 = a
    /// token), or `None` where there is nothing to leave out: no padding, or one position per row
    /// (a decoding step, whose mask is not read back from the device).
    fn of_padding(mask: &Tensor<2, Int>, device: &Device) -> Option<Self> {
        let [batch, seq] = mask.dims();
        if seq < 2 {
            return None;
        }
        let values = mask.to_data().convert::<i64>();
        let values = values.as_slice::<i64>().ok()?;
        let flat: Vec<i64> = (0..batch * seq)
            .filter(|&i| values[i] != 0)
            .map(|i| i as i64)
            .collect();
        if flat.len() == batch * seq || flat.is_empty() {
            return None;
        }
        let rows: Vec<i64> = flat.iter().map(|&i| i / seq as i64).collect();
        let tokens = flat.len();
        Some(Self {
            flat: Tensor::from_data(TensorData::new(flat, [tokens]), device),
            rows: Tensor::from_data(TensorData::new(rows, [tokens]), device),
            batch,
            seq,
        })
    }

    /// `[batch, seq, n] -> [1, tokens, n]`.
    fn pack(&self, x: Tensor<3>) -> Tensor<3> {
        let n = x.dims()[2];
        let tokens = self.flat.dims()[0];
        x.reshape([self.batch * self.seq, n])
            .select(0, self.flat.clone())
            .reshape([1, tokens, n])
    }

    /// `[1, tokens, n] -> [batch, seq, n]`, zeros at the padding.
    fn unpack(&self, x: Tensor<3>) -> Tensor<3> {
        let [_, tokens, n] = x.dims();
        Tensor::<2>::zeros([self.batch * self.seq, n], (&x.device(), x.dtype()))
            .select_assign(
                0,
                self.flat.clone(),
                x.reshape([tokens, n]),
                IndexingUpdateOp::Add,
            )
            .reshape([self.batch, self.seq, n])
    }
}

/// The rows of one scope of the model (a layer, or the top level) as its per-token operations see
/// them: packed to `[1, tokens, size]` where the batch carries padding ([`Packing`]), else
/// `[batch, seq, size]`; with the per-row bias deltas that each biased operation adds.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    deltas: Option<&'a BiasDeltas>,
    prefix: &'a str,
    packing: Option<&'a Packing>,
}

impl<'a> Rows<'a> {
    /// Unpacked rows without deltas.
    pub(crate) const PLAIN: Rows<'static> = Rows {
        deltas: None,
        prefix: "",
        packing: None,
    };

    /// The deltas of `deltas` whose names start with `prefix`, over rows packed by `packing`.
    pub(crate) fn new(
        deltas: Option<&'a BiasDeltas>,
        prefix: &'a str,
        packing: Option<&'a Packing>,
    ) -> Self {
        Self {
            deltas,
            prefix,
            packing,
        }
    }

    /// `x` plus the delta of the bias `{prefix}{name}`, if the input has one: each token gets its
    /// row's delta.
    pub(crate) fn add(&self, name: &str, x: Tensor<3>) -> Tensor<3> {
        let Some(deltas) = self.deltas else {
            return x;
        };
        let name = format!("{}{name}", self.prefix);
        match (self.packing, deltas.get(&name)) {
            (Some(packing), Some(delta)) => {
                let delta = delta
                    .clone()
                    .select(0, packing.rows.clone())
                    .cast(x.dtype());
                x + delta.unsqueeze_dim::<3>(0)
            }
            _ => deltas.add(&name, x),
        }
    }

    /// Per-token values `[batch, seq, n]` in this scope's layout.
    pub(crate) fn pack(&self, x: Tensor<3>) -> Tensor<3> {
        match self.packing {
            Some(packing) => packing.pack(x),
            None => x,
        }
    }

    /// Per-token values in this scope's layout as `[batch, seq, n]` (zeros at the padding), for
    /// attention.
    pub(crate) fn unpack(&self, x: Tensor<3>) -> Tensor<3> {
        match self.packing {
            Some(packing) => packing.unpack(x),
            None => x,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rope::Rope;
    use burn::tensor::Tolerance;

    #[test]
    fn rope_at_position_zero_is_identity_and_rotates_halves() {
        let device = Device::default();
        let x = Tensor::<4>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 1, 1, 4]),
            &device,
        );
        let pos = Tensor::<2, Int>::from_data(TensorData::new(vec![0i64], [1, 1]), &device);
        let (cos, sin) = Rope::new(10000.0, 4).cos_sin(pos, burn::tensor::DType::F32);
        apply_rope(x.clone(), cos, sin)
            .into_data()
            .assert_approx_eq::<f32>(&x.to_data(), Tolerance::default());
        // Position 1, theta 1: every frequency is 1 rad. Pairs are (x0, x2) and (x1, x3).
        let pos = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64], [1, 1]), &device);
        let (cos, sin) = Rope::new(1.0, 4).cos_sin(pos, burn::tensor::DType::F32);
        let (c, s) = (1f32.cos(), 1f32.sin());
        let expected = TensorData::new(
            vec![
                1.0 * c - 3.0 * s,
                2.0 * c - 4.0 * s,
                3.0 * c + 1.0 * s,
                4.0 * c + 2.0 * s,
            ],
            [1, 1, 1, 4],
        );
        apply_rope(x, cos, sin)
            .into_data()
            .assert_approx_eq::<f32>(&expected, Tolerance::default());
    }

    #[test]
    fn training_attention_matches_inference_attention() {
        // Grouped heads, 3 past keys (a prefix), a padded key in row 1 and no fully masked row,
        // with and without a sliding window of 3 that hides the prefix from the later queries:
        // the fused training path and burn's attention must agree.
        let device = Device::default();
        let (b, heads, kv_heads, s, past, d) = (2, 4, 2, 5, 3, 8);
        let random = |shape: [usize; 4]| {
            Tensor::<4>::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), &device)
        };
        let (q, k, v) = (
            random([b, heads, s, d]),
            random([b, kv_heads, past + s, d]),
            random([b, kv_heads, past + s, d]),
        );
        let mut mask = vec![1i64; b * (past + s)];
        mask[past + s + 4] = 0;
        let mask = Tensor::<2, Int>::from_data(TensorData::new(mask, [b, past + s]), &device);
        let mut outputs = Vec::new();
        for window in [None, Some(3)] {
            let inference = causal_attention(
                q.clone(),
                k.clone(),
                v.clone(),
                Some(mask.clone()),
                None,
                window,
            );
            let autodiff = device.clone().autodiff();
            let [q, k, v] = [q.clone(), k.clone(), v.clone()]
                .map(|x| Tensor::<4>::from_data(x.into_data(), &autodiff).require_grad());
            let training = causal_attention(
                q,
                k,
                v,
                Some(Tensor::from_data(mask.clone().into_data(), &autodiff)),
                None,
                window,
            );
            training
                .into_data()
                .assert_approx_eq::<f32>(&inference.to_data(), Tolerance::absolute(1e-5));
            outputs.push(inference);
        }
        // The window changes the output (it hides keys), and one query decoding over the same
        // keys sees exactly what the last row of the prefill saw.
        let diff = (outputs[0].clone() - outputs[1].clone())
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(diff > 1e-3, "the window hid nothing ({diff})");
        let last = q.clone().slice([0..b, 0..heads, s - 1..s, 0..d]);
        let decoded = causal_attention(last, k, v, Some(mask), None, Some(3));
        decoded.into_data().assert_approx_eq::<f32>(
            &outputs[1]
                .clone()
                .slice([0..b, 0..heads, s - 1..s, 0..d])
                .into_data(),
            Tolerance::absolute(1e-5),
        );
    }

    #[test]
    fn grouped_inference_attention_matches_attention_over_repeated_heads() {
        // The inference path groups query heads when decoding and, on Flex, passes unrepeated
        // keys and values otherwise; it must agree with burn's attention over repeated heads for
        // prefill (causal), decoding (one query), padding, a past (cache or prefix) and an
        // additive bias.
        let device = Device::default();
        let (b, heads, kv_heads, d) = (2, 6, 2, 8);
        let random = |shape: [usize; 4]| {
            Tensor::<4>::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), &device)
        };
        for (seq, past, padded, biased) in [
            (5, 3, true, false),
            (5, 0, false, true),
            (4, 3, false, false),
            (1, 7, false, false),
            (1, 7, true, true),
        ] {
            let keys = past + seq;
            let (q, k, v) = (
                random([b, heads, seq, d]),
                random([b, kv_heads, keys, d]),
                random([b, kv_heads, keys, d]),
            );
            // Row 1 starts with two padding keys (left padding, as generation pads).
            let key_mask = padded.then(|| {
                let mut mask = vec![1i64; b * keys];
                mask[keys] = 0;
                mask[keys + 1] = 0;
                Tensor::<2, Int>::from_data(TensorData::new(mask, [b, keys]), &device)
            });
            let bias = biased.then(|| random([b, heads, seq, keys]));
            let grouped = causal_attention(
                q.clone(),
                k.clone(),
                v.clone(),
                key_mask.clone(),
                bias.clone(),
                None,
            );
            let repeated = attention(
                q,
                repeat_kv(k, heads / kv_heads),
                repeat_kv(v, heads / kv_heads),
                padding_attention_mask(key_mask, heads, seq),
                bias,
                attention_options(true),
            );
            assert_eq!(grouped.dims(), [b, heads, seq, d]);
            grouped
                .into_data()
                .assert_approx_eq::<f32>(&repeated.into_data(), Tolerance::absolute(1e-5));
        }
    }

    #[test]
    fn packing_keeps_the_tokens_of_a_padded_batch_in_order() {
        let device = Device::default();
        let mask = |values: Vec<i64>, shape: [usize; 2]| {
            Tensor::<2, Int>::from_data(TensorData::new(values, shape), &device)
        };
        // Nothing to leave out: no padding, or one position per row (decoding).
        assert!(Packing::of_padding(&mask(vec![1; 6], [2, 3]), &device).is_none());
        assert!(Packing::of_padding(&mask(vec![1, 0], [2, 1]), &device).is_none());
        // Row 0 right-padded by 1, row 1 left-padded by 2.
        let packing = Packing::of_padding(&mask(vec![1, 1, 0, 0, 0, 1], [2, 3]), &device)
            .expect("a padded batch is packed");
        let x = Tensor::<3>::from_data(
            TensorData::new((1..=12).map(|v| v as f32).collect(), [2, 3, 2]),
            &device,
        );
        let packed = packing.pack(x);
        assert_eq!(
            packed.to_data().try_to_vec::<f32>().unwrap(),
            vec![1.0, 2.0, 3.0, 4.0, 11.0, 12.0]
        );
        assert_eq!(
            packing
                .rows
                .to_data()
                .convert::<i64>()
                .try_to_vec::<i64>()
                .unwrap(),
            vec![0, 0, 1]
        );
        // Unpacked, the padding reads zero.
        assert_eq!(
            packing
                .unpack(packed)
                .to_data()
                .try_to_vec::<f32>()
                .unwrap(),
            vec![1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 11.0, 12.0]
        );
        // Each token gets its own row's bias delta.
        let deltas = BiasDeltas::new([(
            "b".to_string(),
            Tensor::<2>::from_data(TensorData::new(vec![10.0f32, 20.0], [2, 1]), &device),
        )]);
        let rows = Rows::new(Some(&deltas), "", Some(&packing));
        let tokens = Tensor::<3>::zeros([1, 3, 1], &device);
        assert_eq!(
            rows.add("b", tokens).to_data().try_to_vec::<f32>().unwrap(),
            vec![10.0, 10.0, 20.0]
        );
    }

    #[test]
    fn repeat_kv_repeats_each_head_in_place() {
        let device = Device::default();
        let x = Tensor::<4>::from_data(TensorData::new(vec![1.0f32, 2.0], [1, 2, 1, 1]), &device);
        let r = repeat_kv(x, 2)
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        assert_eq!(r, vec![1.0, 1.0, 2.0, 2.0]);
    }
}
