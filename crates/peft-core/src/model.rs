//! The model side of the contract: what a base causal language model offers to adapters.
//!
//! A model implements [`CausalLm`]. Adapters never touch model internals: everything they
//! inject (virtual input embeddings, per-layer prefix key/values) goes in through
//! [`ModelInput`], so a model file knows nothing about any method.

use burn::prelude::*;

use crate::error::CoreError;

/// Sizes of a decoder-only transformer that adapters need to shape their parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelGeometry {
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Width of the residual stream (`hidden_size`).
    pub hidden_size: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (equal to `num_attention_heads` without GQA).
    pub num_key_value_heads: usize,
    /// Size of one attention head.
    pub head_dim: usize,
    /// Rows of the token embedding matrix.
    pub vocab_size: usize,
    /// Longest sequence (virtual tokens included) the model accepts, from `max_position_embeddings`;
    /// `None` where the model has no such limit (ALiBi).
    pub max_positions: Option<usize>,
}

/// Keys and values of one layer, `[batch, num_key_value_heads, len, head_dim]`.
///
/// Used both for prefix key/values an adapter injects and for the entries of a [`KvCache`].
/// Keys are stored as attention sees them: cached keys are already rotated (RoPE), prefix keys
/// are never rotated.
#[derive(Debug, Clone)]
pub struct LayerKv {
    /// Keys, `[batch, num_key_value_heads, len, head_dim]`.
    pub key: Tensor<4>,
    /// Values, `[batch, num_key_value_heads, len, head_dim]`.
    pub value: Tensor<4>,
}

impl LayerKv {
    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.key.dims()[2]
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `past` (if any) followed by new keys and values along the position axis.
    pub fn extend(past: Option<Self>, key: Tensor<4>, value: Tensor<4>) -> Self {
        match past {
            Some(past) => Self {
                key: Tensor::cat(vec![past.key, key], 2),
                value: Tensor::cat(vec![past.value, value], 2),
            },
            None => Self { key, value },
        }
    }
}

/// Key/value cache of every layer plus the padding mask of the cached positions.
///
/// A cache made from a prefix (see [`ModelInput::prefix`]) holds the prefix as its first
/// positions, as Hugging Face's `past_key_values` does, so decoding steps need not pass it again.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// One entry per layer.
    pub layers: Vec<LayerKv>,
    /// `[batch, cached_len]`, 1 for a real (or prefix) position, 0 for padding; `None` when
    /// every cached position is real.
    pub attention_mask: Option<Tensor<2, Int>>,
}

impl KvCache {
    /// Number of cached positions (the same in every layer).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::len)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cache seeded with per-layer prefix key/values, all positions real.
    pub fn from_prefix(prefix: Vec<LayerKv>) -> Self {
        Self {
            layers: prefix,
            attention_mask: None,
        }
    }

    /// Rows of this cache's batch (`[batch, ...]` -> `[rows.len(), ...]`), in the order given.
    ///
    /// # Panics
    ///
    /// If `rows` is empty or names a row outside the batch.
    pub fn select_rows(&self, rows: &[usize]) -> Self {
        let device = self.layers[0].key.device();
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(
                rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                [rows.len()],
            ),
            &device,
        );
        Self {
            layers: self
                .layers
                .iter()
                .map(|kv| LayerKv {
                    key: kv.key.clone().select(0, index.clone()),
                    value: kv.value.clone().select(0, index.clone()),
                })
                .collect(),
            attention_mask: self
                .attention_mask
                .clone()
                .map(|m| m.select(0, index.clone())),
        }
    }

    /// One cache of the rows of `caches`, in order: shorter caches are left-padded with masked
    /// zeros to the longest, so that with padding-aware positions every row decodes as it would
    /// alone (on models without a sliding window). How a running batch takes in new rows.
    ///
    /// # Panics
    ///
    /// If `caches` is empty or they disagree on layers, heads or head size.
    pub fn join_rows(caches: Vec<KvCache>) -> Self {
        let longest = caches.iter().map(KvCache::len).max().unwrap_or(0);
        let first = &caches[0].layers[0].key;
        let device = first.device();
        let dtype = first.dtype();
        let layers = caches[0].layers.len();
        let mut masks = Vec::with_capacity(caches.len());
        let mut keys: Vec<Vec<Tensor<4>>> = vec![Vec::new(); layers];
        let mut values: Vec<Vec<Tensor<4>>> = vec![Vec::new(); layers];
        for cache in caches {
            let len = cache.len();
            let pad = longest - len;
            let [batch, heads, _, head_dim] = cache.layers[0].key.dims();
            let mask = cache
                .attention_mask
                .unwrap_or_else(|| Tensor::ones([batch, len], &device));
            masks.push(if pad == 0 {
                mask
            } else {
                Tensor::cat(vec![Tensor::zeros([batch, pad], &device), mask], 1)
            });
            for (layer, kv) in cache.layers.into_iter().enumerate() {
                let padded = |t: Tensor<4>| {
                    if pad == 0 {
                        t
                    } else {
                        let zeros =
                            Tensor::<4>::zeros([batch, heads, pad, head_dim], &device).cast(dtype);
                        Tensor::cat(vec![zeros, t], 2)
                    }
                };
                keys[layer].push(padded(kv.key));
                values[layer].push(padded(kv.value));
            }
        }
        Self {
            layers: keys
                .into_iter()
                .zip(values)
                .map(|(k, v)| LayerKv {
                    key: Tensor::cat(k, 0),
                    value: Tensor::cat(v, 0),
                })
                .collect(),
            attention_mask: Some(Tensor::cat(masks, 0)),
        }
    }
}

/// What an adapter adds to a batch: virtual input embeddings to prepend and/or per-layer
/// prefix key/values. Row `i` of each tensor belongs to row `i` of the batch, so rows of one batch
/// may carry different adapters ([`Injection::stack`]).
#[derive(Debug, Clone, Default)]
pub struct Injection {
    /// `[batch, num_virtual_tokens, hidden_size]`, prepended to the input embeddings
    /// (soft-prompt methods). The attention mask gains `virtual_mask` (ones without it) for them.
    pub virtual_embeds: Option<Tensor<3>>,
    /// `[batch, num_virtual_tokens]`, 1 on a row's virtual tokens and 0 on the slots that pad a
    /// row with fewer; `None`: every slot is real.
    pub virtual_mask: Option<Tensor<2, Int>>,
    /// One [`LayerKv`] of `[batch, num_key_value_heads, num_virtual_tokens, head_dim]` per layer
    /// (prefix methods).
    pub prefix: Option<Vec<LayerKv>>,
    /// `[batch, prefix_len]`, 1 on a row's prefix positions and 0 on padding slots; `None`: all
    /// real.
    pub prefix_mask: Option<Tensor<2, Int>>,
}

impl Injection {
    /// Virtual embeddings `[num_virtual_tokens, hidden]`, computed once, broadcast over a batch of
    /// `batch` rows (soft-prompt methods).
    pub fn virtual_tokens(embeddings: Tensor<2>, batch: usize) -> Self {
        let [n, d] = embeddings.dims();
        Self {
            virtual_embeds: Some(embeddings.unsqueeze::<3>().expand([batch, n, d])),
            ..Self::default()
        }
    }

    /// Per-layer prefix key/values for the whole batch (prefix methods).
    pub fn prefix(layers: Vec<LayerKv>) -> Self {
        Self {
            prefix: Some(layers),
            ..Self::default()
        }
    }

    /// One batch from the injections of single rows (each made for a batch of 1), so that every
    /// row of a batch can carry its own adapter, of any method, or none (`Injection::default()`).
    /// Rows with fewer virtual tokens or prefix positions than the longest are padded on the left
    /// with zeros that the masks mark as padding: with padding-aware positions, each row then
    /// computes what it computes alone (on models without a sliding window, whose window would
    /// count the padding slots).
    ///
    /// # Panics
    ///
    /// If a row's tensors are not of batch 1, or rows disagree on hidden size, heads, head size or
    /// number of layers.
    pub fn stack(rows: Vec<Injection>) -> Self {
        let batch = rows.len();
        let widest = |len: &dyn Fn(&Injection) -> usize| rows.iter().map(len).max().unwrap_or(0);
        let n = widest(&|r| r.virtual_embeds.as_ref().map_or(0, |v| v.dims()[1]));
        let mask = |lens: Vec<usize>, width: usize, device: &Device| {
            let values: Vec<i64> = lens
                .iter()
                .flat_map(|&len| (0..width).map(move |i| i64::from(i >= width - len)))
                .collect();
            Tensor::<2, Int>::from_data(TensorData::new(values, [batch, width]), device)
        };
        let mut out = Injection::default();
        if let Some(template) = rows.iter().find_map(|r| r.virtual_embeds.clone()) {
            let [_, _, d] = template.dims();
            let device = template.device();
            let dtype = template.dtype();
            let mut lens = Vec::with_capacity(batch);
            let padded: Vec<Tensor<3>> = rows
                .iter()
                .map(|r| {
                    let v = r.virtual_embeds.clone();
                    let len = v.as_ref().map_or(0, |v| v.dims()[1]);
                    lens.push(len);
                    let pad = Tensor::<3>::zeros([1, n - len, d], &device).cast(dtype);
                    match v {
                        Some(v) if len == n => v,
                        Some(v) => Tensor::cat(vec![pad, v], 1),
                        None => pad,
                    }
                })
                .collect();
            out.virtual_embeds = Some(Tensor::cat(padded, 0));
            out.virtual_mask = Some(mask(lens, n, &device));
        }
        if let Some(template) = rows.iter().find_map(|r| r.prefix.clone()) {
            // A prefix is a cache of real positions, so rows join as caches do; a row without
            // one is a single masked slot, padded like the others.
            let caches = rows
                .iter()
                .map(|r| match &r.prefix {
                    Some(layers) => KvCache::from_prefix(layers.clone()),
                    None => {
                        let device = template[0].key.device();
                        KvCache {
                            layers: template
                                .iter()
                                .map(|kv| {
                                    let [_, h, _, hd] = kv.key.dims();
                                    let zeros = Tensor::<4>::zeros([1, h, 1, hd], &device)
                                        .cast(kv.key.dtype());
                                    LayerKv {
                                        key: zeros.clone(),
                                        value: zeros,
                                    }
                                })
                                .collect(),
                            attention_mask: Some(Tensor::zeros([1, 1], &device)),
                        }
                    }
                })
                .collect();
            let joined = KvCache::join_rows(caches);
            out.prefix = Some(joined.layers);
            out.prefix_mask = joined.attention_mask;
        }
        out
    }

    /// The model input for token embeddings `[batch, seq, hidden]` and their padding mask with this
    /// injection applied: virtual embeddings prepended (the mask, if any, gains ones for them) and
    /// the prefix attached, both cast to the embeddings' dtype.
    ///
    /// The cast is what lets f32 adapter parameters drive a bf16 (or f16) frozen base, as PEFT
    /// casts its prompts to `inputs_embeds.dtype`: the gradient flows back through it into the
    /// f32 parameters.
    pub fn into_input(
        self,
        embeds: Tensor<3>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> ModelInput {
        let dtype = embeds.dtype();
        let (embeds, attention_mask) = match self.virtual_embeds {
            Some(virtual_embeds) => {
                let [batch, n, _] = virtual_embeds.dims();
                let [_, seq, _] = embeds.dims();
                let device = embeds.device();
                let mask = match (self.virtual_mask, attention_mask) {
                    (None, None) => None,
                    (virtual_mask, mask) => Some(Tensor::cat(
                        vec![
                            virtual_mask.unwrap_or_else(|| Tensor::ones([batch, n], &device)),
                            mask.unwrap_or_else(|| Tensor::ones([batch, seq], &device)),
                        ],
                        1,
                    )),
                };
                (
                    Tensor::cat(vec![virtual_embeds.cast(dtype), embeds], 1),
                    mask,
                )
            }
            None => (embeds, attention_mask),
        };
        let prefix = self.prefix.map(|layers| {
            layers
                .into_iter()
                .map(|kv| LayerKv {
                    key: kv.key.cast(dtype),
                    value: kv.value.cast(dtype),
                })
                .collect()
        });
        ModelInput::new(embeds)
            .with_attention_mask(attention_mask)
            .with_prefix(prefix)
            .with_prefix_mask(self.prefix_mask)
    }
}

/// The input of one forward pass.
#[derive(Debug, Clone)]
pub struct ModelInput {
    /// `[batch, seq, hidden_size]`: token embeddings from [`CausalLm::embed_tokens`], possibly with
    /// virtual embeddings prepended. Models apply their own embedding-side normalization
    /// (BLOOM's `word_embeddings_layernorm`) to these, as Hugging Face does for `inputs_embeds`.
    pub inputs_embeds: Tensor<3>,
    /// `[batch, seq]`, 1 for a real token and 0 for padding (left or right); `None` means every
    /// position is real, which lets backends use their fastest attention kernel.
    pub attention_mask: Option<Tensor<2, Int>>,
    /// Per-layer prefix key/values `[batch, num_key_value_heads, p, head_dim]`, attended by every
    /// position, never rotated. Only allowed when `cache` is `None` or empty: the returned cache
    /// then starts with the prefix.
    pub prefix: Option<Vec<LayerKv>>,
    /// `[batch, prefix_len]`, 1 on real prefix positions and 0 on padding slots (rows of
    /// different prefix lengths in one batch); `None`: all real.
    pub prefix_mask: Option<Tensor<2, Int>>,
    /// Positions computed so far. Positions are padding-aware: a real token sits at
    /// (number of real cached and prefix positions before it) + (number of real tokens before it
    /// in this input).
    pub cache: Option<KvCache>,
    /// Per-row additions to the base's biases (rows of a bias-training adapter served beside
    /// others); unlike a prefix they are not cached, so every forward of those rows carries them.
    pub bias_deltas: Option<BiasDeltas>,
}

impl ModelInput {
    /// Input of token embeddings without mask, prefix or cache.
    pub fn new(inputs_embeds: Tensor<3>) -> Self {
        Self {
            inputs_embeds,
            attention_mask: None,
            prefix: None,
            prefix_mask: None,
            cache: None,
            bias_deltas: None,
        }
    }

    /// Sets per-row bias deltas (`[batch, size]` per Hugging Face bias name).
    pub fn with_bias_deltas(mut self, deltas: Option<BiasDeltas>) -> Self {
        self.bias_deltas = deltas;
        self
    }

    /// Sets the padding mask of the prefix positions (`[batch, prefix_len]`, 1 = real).
    pub fn with_prefix_mask(mut self, mask: Option<Tensor<2, Int>>) -> Self {
        self.prefix_mask = mask;
        self
    }

    /// Sets the padding mask (`[batch, seq]`, 1 = real).
    pub fn with_attention_mask(mut self, mask: Option<Tensor<2, Int>>) -> Self {
        self.attention_mask = mask;
        self
    }

    /// Sets per-layer prefix key/values.
    pub fn with_prefix(mut self, prefix: Option<Vec<LayerKv>>) -> Self {
        self.prefix = prefix;
        self
    }

    /// Sets the cache to extend.
    pub fn with_cache(mut self, cache: Option<KvCache>) -> Self {
        self.cache = cache;
        self
    }
}

/// Per-row additive deltas to a base model's biases, by Hugging Face parameter name (e.g.
/// `model.layers.0.self_attn.q_proj.bias`), each `[batch, size]`: the layer of that bias adds row
/// `r`'s delta to every position of row `r`. This is how rows of an adapter that trains the base's
/// biases (BitFit) share a batch with rows of other adapters: biases are additive, so a row adds
/// its own delta and no weight is swapped. Models add the deltas of the biases they have and
/// ignore other names.
#[derive(Debug, Clone, Default)]
pub struct BiasDeltas {
    deltas: std::collections::BTreeMap<String, Tensor<2>>,
}

impl BiasDeltas {
    /// Deltas from `(name, [batch, size])` pairs (every tensor with the same batch).
    pub fn new(deltas: impl IntoIterator<Item = (String, Tensor<2>)>) -> Self {
        Self {
            deltas: deltas.into_iter().collect(),
        }
    }

    /// Whether there is no delta.
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// The delta of bias `name`, `[batch, size]`.
    pub fn get(&self, name: &str) -> Option<&Tensor<2>> {
        self.deltas.get(name)
    }

    /// The biases that have a delta, with their deltas.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor<2>)> {
        self.deltas.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// `x` `[batch, seq, size]` plus the delta of `name` at every position (`x` itself when
    /// `name` has none).
    pub fn add(&self, name: &str, x: Tensor<3>) -> Tensor<3> {
        match self.deltas.get(name) {
            Some(delta) => {
                let dtype = x.dtype();
                x + delta.clone().cast(dtype).unsqueeze_dim::<3>(1)
            }
            None => x,
        }
    }

    /// The deltas of a batch whose row `r` has `rows[r]` (each `[1, size]`; `None`: a row without
    /// deltas); a row without a delta for a name gets zeros. `None` when no row has any.
    ///
    /// # Panics
    ///
    /// If two rows give the same name different sizes.
    pub fn stack(rows: &[Option<&BiasDeltas>], device: &Device) -> Option<Self> {
        let mut names: std::collections::BTreeMap<&str, (usize, burn::tensor::DType)> =
            Default::default();
        for deltas in rows.iter().flatten() {
            for (name, t) in deltas.iter() {
                let [_, size] = t.dims();
                let seen = names.insert(name, (size, t.dtype()));
                assert!(
                    seen.is_none_or(|(s, _)| s == size),
                    "bias {name} has two sizes in one batch"
                );
            }
        }
        if names.is_empty() {
            return None;
        }
        let deltas = names
            .into_iter()
            .map(|(name, (size, dtype))| {
                let parts: Vec<Tensor<2>> = rows
                    .iter()
                    .map(|row| match row.and_then(|d| d.get(name)) {
                        Some(t) => t.clone(),
                        None => Tensor::<2>::zeros([1, size], (device, dtype)),
                    })
                    .collect();
                (name.to_string(), Tensor::cat(parts, 0))
            })
            .collect();
        Some(Self { deltas })
    }
}

/// The output of [`CausalLm::forward_hidden`].
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// Final hidden states after the last norm, `[batch, seq, hidden_size]`.
    pub hidden_states: Tensor<3>,
    /// The cache extended with this input's keys and values.
    pub cache: KvCache,
}

/// A decoder-only causal language model, as adapters see it.
///
/// # Example
///
/// ```ignore
/// let embeds = model.embed_tokens(ids);
/// let out = model.forward_hidden(ModelInput::new(embeds).with_attention_mask(Some(mask)));
/// let logits = model.lm_head(out.hidden_states); // [batch, seq, vocab]
/// ```
pub trait CausalLm: Module {
    /// Sizes adapters shape themselves by.
    fn geometry(&self) -> ModelGeometry;

    /// The device the weights live on.
    fn device(&self) -> Device;

    /// Token embeddings `[batch, seq, hidden_size]` for ids `[batch, seq]` (no normalization).
    fn embed_tokens(&self, input_ids: Tensor<2, Int>) -> Tensor<3>;

    /// The input embedding matrix `[vocab_size, hidden_size]` (Hugging Face's
    /// `get_input_embeddings().weight`), e.g. to start a soft prompt from word embeddings.
    fn word_embeddings(&self) -> Tensor<2>;

    /// Runs the decoder stack and the final norm.
    fn forward_hidden(&self, input: ModelInput) -> ModelOutput;

    /// Projects hidden states `[batch, seq, hidden_size]` to logits `[batch, seq, vocab_size]`.
    fn lm_head(&self, hidden_states: Tensor<3>) -> Tensor<3>;

    /// The output projection as a matrix `[vocab_size, hidden_size]` when [`lm_head`] is exactly
    /// `hidden · matrixᵀ` (no bias, no scaling), else `None`. With it, the training loss projects
    /// a few rows at a time and never holds the logits of a whole batch
    /// (see [`crate::loss::projected_cross_entropy`]); without it, the loss calls [`lm_head`].
    ///
    /// [`lm_head`]: CausalLm::lm_head
    fn output_embeddings(&self) -> Option<Tensor<2>> {
        None
    }

    /// Logits for every position of `input`, `[batch, seq, vocab_size]`, and the extended cache.
    fn forward(&self, input: ModelInput) -> (Tensor<3>, KvCache) {
        let out = self.forward_hidden(input);
        (self.lm_head(out.hidden_states), out.cache)
    }

    /// Logits `[batch, seq, vocab_size]` for token ids `[batch, seq]` with an optional padding mask
    /// (`[batch, seq]`, 1 = real): the plain forward, without injection or cache.
    fn forward_ids(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Tensor<3> {
        let embeds = self.embed_tokens(input_ids);
        self.forward(ModelInput::new(embeds).with_attention_mask(attention_mask))
            .0
    }

    /// Checks ids (and an optional mask) from a user against the model before a forward:
    /// every id in the vocabulary, mask values 0/1 and of the same shape, length within
    /// `max_positions` once `extra` more positions (virtual tokens, new tokens) are added.
    fn check_input(
        &self,
        input_ids: &[Vec<i64>],
        attention_mask: Option<&[Vec<i64>]>,
        extra: usize,
    ) -> Result<(), CoreError> {
        crate::mask::check_batch(&self.geometry(), input_ids, attention_mask, extra)
    }
}
