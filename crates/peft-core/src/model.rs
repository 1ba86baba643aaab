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
}

/// What an adapter adds to a batch: virtual input embeddings to prepend and/or per-layer
/// prefix key/values. Row `i` of each tensor belongs to row `i` of the batch.
#[derive(Debug, Clone, Default)]
pub struct Injection {
    /// `[batch, num_virtual_tokens, hidden_size]`, prepended to the input embeddings
    /// (soft-prompt methods). The attention mask gains ones for them.
    pub virtual_embeds: Option<Tensor<3>>,
    /// One [`LayerKv`] of `[batch, num_key_value_heads, num_virtual_tokens, head_dim]` per layer
    /// (prefix methods).
    pub prefix: Option<Vec<LayerKv>>,
}

impl Injection {
    /// Virtual embeddings `[num_virtual_tokens, hidden]`, computed once, broadcast over a batch of
    /// `batch` rows (soft-prompt methods).
    pub fn virtual_tokens(embeddings: Tensor<2>, batch: usize) -> Self {
        let [n, d] = embeddings.dims();
        Self {
            virtual_embeds: Some(embeddings.unsqueeze::<3>().expand([batch, n, d])),
            prefix: None,
        }
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
                let device = embeds.device();
                let mask = attention_mask
                    .map(|m| Tensor::cat(vec![Tensor::ones([batch, n], &device), m], 1));
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
    /// Positions computed so far. Positions are padding-aware: a real token sits at
    /// (number of real cached and prefix positions before it) + (number of real tokens before it
    /// in this input).
    pub cache: Option<KvCache>,
}

impl ModelInput {
    /// Input of token embeddings without mask, prefix or cache.
    pub fn new(inputs_embeds: Tensor<3>) -> Self {
        Self {
            inputs_embeds,
            attention_mask: None,
            prefix: None,
            cache: None,
        }
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
