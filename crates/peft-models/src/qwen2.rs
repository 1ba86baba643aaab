//! Qwen2 in burn, and Llama: the same decoder without attention biases.
//!
//! Grouped-query attention, rotate-half RoPE (`rope_theta`), q/k/v biases (Qwen2; Llama's
//! `attention_bias` puts biases on q/k/v/o), RMSNorm, SwiGLU MLP, tied or untied `lm_head`.
//! Field names mirror transformers' `Qwen2ForCausalLM`, so parameter paths are the Hugging Face
//! tensor names (`model.layers.0.self_attn.q_proj.weight`).

use burn::nn::{Embedding, Linear, RmsNorm};
use burn::prelude::*;
use peft_core::{CausalLm, LayerKv, ModelGeometry, ModelInput, ModelOutput};

use crate::auto::ModelFamily;
use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::fused::silu_gate;
use crate::hf_config::HfConfig;
use crate::layers::{
    Past, Rows, apply_rope, causal_attention, linear_rows, merge_heads, split_heads, tied_lm_head,
};
use crate::rope::{Rope, RopeScaling};
use crate::weights::{RandomWeights, WeightSource, infallible};

/// Whether a layer attends to every earlier position or to a sliding window of them
/// (transformers' `layer_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionType {
    /// `full_attention`.
    FullAttention,
    /// `sliding_attention`: the last `sliding_window` positions, the query's own included.
    SlidingAttention,
}

/// Configuration of a Llama-style decoder: Qwen2, Llama (2 and 3.x), Qwen3 and Mistral, which
/// differ in biases, q/k norms, RoPE type and sliding windows (the fields of the Hugging Face
/// `config.json`).
#[derive(Config, Debug, PartialEq)]
pub struct Qwen2Config {
    /// Rows of the token embedding matrix (`vocab_size`).
    pub vocab_size: usize,
    /// Width of the residual stream (`hidden_size`).
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP (`intermediate_size`).
    pub intermediate_size: usize,
    /// Number of decoder layers (`num_hidden_layers`).
    pub num_hidden_layers: usize,
    /// Number of query heads (`num_attention_heads`).
    pub num_attention_heads: usize,
    /// Number of key/value heads (`num_key_value_heads`; defaults to the query heads).
    pub num_key_value_heads: usize,
    /// Size of a head (`head_dim`; defaults to `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// RMSNorm epsilon (`rms_norm_eps`).
    #[config(default = 1e-6)]
    pub rms_norm_eps: f64,
    /// RoPE base (`rope_theta`, or `rope_parameters.rope_theta` in transformers 5 configs).
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// RoPE type and its parameters (`rope_parameters` / `rope_scaling`).
    #[config(default = "RopeScaling::Default")]
    pub rope_scaling: RopeScaling,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3's `q_norm` / `k_norm`).
    #[config(default = false)]
    pub qk_norm: bool,
    /// Window of the sliding-attention layers (`sliding_window`, where the model uses it).
    pub sliding_window: Option<usize>,
    /// Attention of each layer (`layer_types`); empty: every layer attends fully.
    #[config(default = "Vec::new()")]
    pub layer_types: Vec<AttentionType>,
    /// Biases on q/k/v projections (always for Qwen2; Llama's `attention_bias`).
    #[config(default = true)]
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`; never for Qwen2).
    #[config(default = false)]
    pub o_proj_bias: bool,
    /// Biases on the MLP projections (Llama's `mlp_bias`).
    #[config(default = false)]
    pub mlp_bias: bool,
    /// Whether `lm_head` reuses the token embedding matrix (`tie_word_embeddings`).
    #[config(default = false)]
    pub tie_word_embeddings: bool,
    /// Longest sequence the model was built for (`max_position_embeddings`).
    pub max_position_embeddings: Option<usize>,
    /// Standard deviation of random weights (`initializer_range`; only [`Self::init`] reads it).
    #[config(default = 0.02)]
    pub initializer_range: f64,
}

impl Qwen2Config {
    /// Reads a `qwen2`, `llama`, `qwen3` or `mistral` config.json as transformers reads it.
    /// Unsupported variants (RoPE types other than default, linear, dynamic, yarn and llama3,
    /// activations other than SiLU) are rejected with the key named.
    pub fn from_hf(cfg: &HfConfig) -> Result<Self> {
        let model_type = cfg.opt_str("model_type")?.unwrap_or("qwen2");
        match model_type {
            "qwen2" | "llama" | "qwen3" | "mistral" => {}
            other => {
                return Err(ModelError::UnsupportedModelType {
                    path: cfg.path().to_path_buf(),
                    model_type: other.to_string(),
                    supported: Qwen2ForCausalLM::MODEL_TYPES.join(", "),
                });
            }
        }
        let hidden_size = cfg.usize(&["hidden_size"])?;
        let num_attention_heads = cfg.usize(&["num_attention_heads"])?;
        let num_key_value_heads = cfg
            .opt_usize(&["num_key_value_heads"])?
            .unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(cfg.unsupported(
                "num_key_value_heads",
                format!("({num_key_value_heads}) must divide num_attention_heads ({num_attention_heads})"),
            ).into());
        }
        let head_dim = match cfg.opt_usize(&["head_dim"])? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(cfg.unsupported(
                    "num_attention_heads",
                    format!("({num_attention_heads}) must divide hidden_size ({hidden_size}) when head_dim is absent"),
                ).into());
            }
        };
        if head_dim % 2 != 0 {
            return Err(cfg
                .unsupported(
                    "head_dim",
                    format!("must be even for RoPE, found {head_dim}"),
                )
                .into());
        }
        if let Some(act) = cfg.opt_str("hidden_act")?
            && act != "silu"
        {
            return Err(cfg
                .unsupported("hidden_act", format!("must be \"silu\", found {act:?}"))
                .into());
        }
        let num_hidden_layers = cfg.usize(&["num_hidden_layers"])?;
        let max_position_embeddings = cfg.opt_usize(&["max_position_embeddings"])?;
        let rope = Rope::from_hf(cfg, head_dim, max_position_embeddings)?;
        let (sliding_window, layer_types) =
            Self::sliding_windows(cfg, model_type, num_hidden_layers)?;
        // Biases: Qwen2 always has them on q/k/v (never on o); Llama and Qwen3 on all four
        // projections with `attention_bias`; Mistral never. Only Llama has `mlp_bias`.
        let attention_bias = match model_type {
            "llama" | "qwen3" => cfg.bool_or("attention_bias", false)?,
            _ => false,
        };
        Ok(Self {
            vocab_size: cfg.usize(&["vocab_size"])?,
            hidden_size,
            intermediate_size: cfg.usize(&["intermediate_size"])?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: cfg.opt_positive_f64(&["rms_norm_eps"])?.unwrap_or(1e-6),
            rope_theta: rope.theta,
            rope_scaling: rope.scaling,
            qk_norm: model_type == "qwen3",
            sliding_window,
            layer_types,
            qkv_bias: model_type == "qwen2" || attention_bias,
            o_proj_bias: attention_bias,
            mlp_bias: model_type == "llama" && cfg.bool_or("mlp_bias", false)?,
            tie_word_embeddings: cfg.bool_or("tie_word_embeddings", false)?,
            max_position_embeddings,
            initializer_range: cfg.opt_f64(&["initializer_range"])?.unwrap_or(0.02),
        })
    }

    /// The window and the attention of each layer, as transformers' configs set them: Mistral
    /// slides every layer when `sliding_window` is set; Qwen2 and Qwen3 only with
    /// `use_sliding_window`, on the layers `layer_types` names (by default those from
    /// `max_window_layers` on); Llama never.
    fn sliding_windows(
        cfg: &HfConfig,
        model_type: &str,
        layers: usize,
    ) -> Result<(Option<usize>, Vec<AttentionType>)> {
        let window = match model_type {
            "mistral" => cfg.opt_usize(&["sliding_window"])?,
            "qwen2" | "qwen3" if cfg.bool_or("use_sliding_window", false)? => {
                Some(cfg.opt_usize(&["sliding_window"])?.unwrap_or(4096))
            }
            _ => None,
        };
        let Some(window) = window else {
            return Ok((None, Vec::new()));
        };
        if window == 0 {
            return Err(cfg
                .unsupported("sliding_window", "must be at least 1, found 0")
                .into());
        }
        let types = if model_type == "mistral" {
            vec![AttentionType::SlidingAttention; layers]
        } else if let Some(types) = cfg.opt_str_list("layer_types")? {
            if types.len() != layers {
                return Err(cfg
                    .unsupported(
                        "layer_types",
                        format!(
                            "has {} entries for {layers} layers (num_hidden_layers)",
                            types.len()
                        ),
                    )
                    .into());
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(AttentionType::FullAttention),
                    "sliding_attention" => Ok(AttentionType::SlidingAttention),
                    other => Err(cfg
                        .unsupported(
                            "layer_types",
                            format!(
                                "has {other:?}; only \"full_attention\" and \"sliding_attention\" \
                                 are supported"
                            ),
                        )
                        .into()),
                })
                .collect::<Result<_>>()?
        } else {
            let first = cfg.opt_usize(&["max_window_layers"])?.unwrap_or(28);
            (0..layers)
                .map(|i| {
                    if i >= first {
                        AttentionType::SlidingAttention
                    } else {
                        AttentionType::FullAttention
                    }
                })
                .collect()
        };
        Ok((Some(window), types))
    }

    /// The model's RoPE.
    pub fn rope(&self) -> Rope {
        Rope {
            theta: self.rope_theta,
            head_dim: self.head_dim,
            scaling: self.rope_scaling.clone(),
        }
    }

    /// The attention window of layer `layer`, if it slides.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        match self.layer_types.get(layer) {
            Some(AttentionType::SlidingAttention) => self.sliding_window,
            _ => None,
        }
    }

    /// A model with random weights (for benchmarks and tests; real weights come from
    /// [`Qwen2ForCausalLM::load`]).
    pub fn init(&self, device: &Device) -> Qwen2ForCausalLM {
        infallible(Qwen2ForCausalLM::build(
            self,
            &mut RandomWeights::new(device, self.initializer_range),
        ))
    }

    /// Geometry adapters see.
    pub fn geometry(&self) -> ModelGeometry {
        ModelGeometry {
            num_layers: self.num_hidden_layers,
            hidden_size: self.hidden_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            vocab_size: self.vocab_size,
            max_positions: self.rope().max_positions(self.max_position_embeddings),
        }
    }
}

/// SwiGLU MLP: `down_proj(silu(gate_proj(x)) * up_proj(x))`.
#[derive(Module, Debug)]
pub struct Qwen2Mlp {
    /// Gate projection `hidden -> intermediate`.
    pub gate_proj: Linear,
    /// Up projection `hidden -> intermediate`.
    pub up_proj: Linear,
    /// Down projection `intermediate -> hidden`.
    pub down_proj: Linear,
}

impl Qwen2Mlp {
    /// `[b, s, hidden] -> [b, s, hidden]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_with(x, Rows::PLAIN)
    }

    /// [`Qwen2Mlp::forward`] over `rows` (packed, with per-row bias deltas).
    pub(crate) fn forward_with(&self, x: Tensor<3>, rows: Rows<'_>) -> Tensor<3> {
        let gate = rows.add(
            "mlp.gate_proj.bias",
            linear_rows(&self.gate_proj, x.clone()),
        );
        let up = rows.add("mlp.up_proj.bias", linear_rows(&self.up_proj, x));
        rows.add(
            "mlp.down_proj.bias",
            linear_rows(&self.down_proj, silu_gate(gate, up)),
        )
    }
}

/// Grouped-query self-attention with rotate-half RoPE.
#[derive(Module, Debug)]
pub struct Qwen2Attention {
    /// Query projection `hidden -> heads * head_dim`.
    pub q_proj: Linear,
    /// Key projection `hidden -> kv_heads * head_dim`.
    pub k_proj: Linear,
    /// Value projection `hidden -> kv_heads * head_dim`.
    pub v_proj: Linear,
    /// Output projection `heads * head_dim -> hidden`.
    pub o_proj: Linear,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Size of a head.
    pub head_dim: usize,
    /// Per-head RMSNorm of the queries before RoPE (Qwen3).
    pub q_norm: Option<RmsNorm>,
    /// Per-head RMSNorm of the keys before RoPE (Qwen3).
    pub k_norm: Option<RmsNorm>,
    /// The window, on a sliding-attention layer.
    pub sliding_window: Option<usize>,
}

impl Qwen2Attention {
    /// Attends `x` `[b, s, hidden]` over `past` (prefix or cache, already rotated as stored) and
    /// itself. Returns the output and this layer's keys/values including `past`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        past: Option<LayerKv>,
        key_mask: Option<Tensor<2, Int>>,
    ) -> (Tensor<3>, LayerKv) {
        self.forward_with(x, cos, sin, past, key_mask, Rows::PLAIN)
    }

    /// [`Qwen2Attention::forward`] over `rows` (packed, with per-row bias deltas): `x` and the
    /// output in `rows`' layout, keys and values `[b, kv_heads, s, head_dim]` as always.
    pub(crate) fn forward_with(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        past: Option<LayerKv>,
        key_mask: Option<Tensor<2, Int>>,
        rows: Rows<'_>,
    ) -> (Tensor<3>, LayerKv) {
        // The projections run over `rows` (tokens only where the batch is padded); attention
        // takes the rows apart.
        let q = split_heads(
            rows.unpack(rows.add(
                "self_attn.q_proj.bias",
                linear_rows(&self.q_proj, x.clone()),
            )),
            self.num_heads,
            self.head_dim,
        );
        let k = split_heads(
            rows.unpack(rows.add(
                "self_attn.k_proj.bias",
                linear_rows(&self.k_proj, x.clone()),
            )),
            self.num_key_value_heads,
            self.head_dim,
        );
        let v = split_heads(
            rows.unpack(rows.add("self_attn.v_proj.bias", linear_rows(&self.v_proj, x))),
            self.num_key_value_heads,
            self.head_dim,
        );
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(q_norm), Some(k_norm)) => (q_norm.forward(q), k_norm.forward(k)),
            _ => (q, k),
        };
        let q = apply_rope(q, cos.clone(), sin.clone());
        let k = apply_rope(k, cos.clone(), sin.clone());
        let kv = LayerKv::extend(past, k, v);
        let out = causal_attention(
            q,
            kv.key.clone(),
            kv.value.clone(),
            key_mask,
            None,
            self.sliding_window,
        );
        let out = linear_rows(&self.o_proj, rows.pack(merge_heads(out)));
        (rows.add("self_attn.o_proj.bias", out), kv)
    }
}

/// Pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct Qwen2DecoderLayer {
    /// Self-attention.
    pub self_attn: Qwen2Attention,
    /// SwiGLU MLP.
    pub mlp: Qwen2Mlp,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
}

impl Qwen2DecoderLayer {
    /// One layer: `x + attn(norm(x))`, then `+ mlp(norm(.))`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        past: Option<LayerKv>,
        key_mask: Option<Tensor<2, Int>>,
    ) -> (Tensor<3>, LayerKv) {
        self.forward_with(x, cos, sin, past, key_mask, Rows::PLAIN)
    }

    /// [`Qwen2DecoderLayer::forward`] over `rows` (packed, with per-row bias deltas).
    pub(crate) fn forward_with(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        past: Option<LayerKv>,
        key_mask: Option<Tensor<2, Int>>,
        rows: Rows<'_>,
    ) -> (Tensor<3>, LayerKv) {
        let (attn, kv) = self.self_attn.forward_with(
            self.input_layernorm.forward(x.clone()),
            cos,
            sin,
            past,
            key_mask,
            rows,
        );
        let x = x + attn;
        let mlp = self
            .mlp
            .forward_with(self.post_attention_layernorm.forward(x.clone()), rows);
        (x + mlp, kv)
    }
}

/// The decoder stack (`model.*` in Hugging Face checkpoints).
#[derive(Module, Debug)]
pub struct Qwen2Model {
    /// Token embeddings.
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: Vec<Qwen2DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
}

/// Qwen2 (or Llama) with its language-model head.
#[derive(Module, Debug)]
pub struct Qwen2ForCausalLM {
    /// The decoder stack.
    pub model: Qwen2Model,
    /// Output projection; `None` when tied to `model.embed_tokens`.
    pub lm_head: Option<Linear>,
    /// The configuration the model was built from.
    #[module(skip)]
    pub config: Qwen2Config,
}

impl Qwen2ForCausalLM {
    /// Builds the model from the tensors of `ckpt` (Hugging Face names), checking every shape
    /// against `config`. Tensors left unread are reported by [`Checkpoint::finish`].
    pub fn load(config: &Qwen2Config, ckpt: &mut Checkpoint) -> Result<Self> {
        Self::build(config, ckpt)
    }

    /// Lays out the model, taking each layer from `src` under its Hugging Face name.
    pub fn build<S: WeightSource>(config: &Qwen2Config, src: &mut S) -> Result<Self, S::Error> {
        let c = config;
        let (d, h, kv, hd) = (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        );
        let (inter, eps) = (c.intermediate_size, c.rms_norm_eps);
        let embed_tokens = src.embedding("model.embed_tokens", c.vocab_size, d)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Qwen2DecoderLayer {
                self_attn: Qwen2Attention {
                    q_proj: src.linear(&format!("{p}.self_attn.q_proj"), d, h * hd, c.qkv_bias)?,
                    k_proj: src.linear(&format!("{p}.self_attn.k_proj"), d, kv * hd, c.qkv_bias)?,
                    v_proj: src.linear(&format!("{p}.self_attn.v_proj"), d, kv * hd, c.qkv_bias)?,
                    o_proj: src.linear(
                        &format!("{p}.self_attn.o_proj"),
                        h * hd,
                        d,
                        c.o_proj_bias,
                    )?,
                    num_heads: h,
                    num_key_value_heads: kv,
                    head_dim: hd,
                    q_norm: if c.qk_norm {
                        Some(src.rms_norm(&format!("{p}.self_attn.q_norm"), hd, eps)?)
                    } else {
                        None
                    },
                    k_norm: if c.qk_norm {
                        Some(src.rms_norm(&format!("{p}.self_attn.k_norm"), hd, eps)?)
                    } else {
                        None
                    },
                    sliding_window: c.window_of(i),
                },
                mlp: Qwen2Mlp {
                    gate_proj: src.linear(&format!("{p}.mlp.gate_proj"), d, inter, c.mlp_bias)?,
                    up_proj: src.linear(&format!("{p}.mlp.up_proj"), d, inter, c.mlp_bias)?,
                    down_proj: src.linear(&format!("{p}.mlp.down_proj"), inter, d, c.mlp_bias)?,
                },
                input_layernorm: src.rms_norm(&format!("{p}.input_layernorm"), d, eps)?,
                post_attention_layernorm: src.rms_norm(
                    &format!("{p}.post_attention_layernorm"),
                    d,
                    eps,
                )?,
            });
        }
        let norm = src.rms_norm("model.norm", d, eps)?;
        let lm_head = if c.tie_word_embeddings {
            // Some tied checkpoints still store a copy of the embedding as lm_head.weight.
            src.skip("lm_head.weight");
            None
        } else {
            Some(src.linear("lm_head", d, c.vocab_size, false)?)
        };
        Ok(Self {
            model: Qwen2Model {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
            config: config.clone(),
        })
    }
}

impl ModelFamily for Qwen2ForCausalLM {
    const MODEL_TYPES: &'static [&'static str] = &["qwen2", "llama", "qwen3", "mistral"];
    type Config = Qwen2Config;

    fn read_config(cfg: &HfConfig) -> Result<Qwen2Config> {
        Qwen2Config::from_hf(cfg)
    }

    fn config_geometry(config: &Qwen2Config) -> ModelGeometry {
        config.geometry()
    }

    fn build<S: WeightSource>(config: &Qwen2Config, src: &mut S) -> Result<Self, S::Error> {
        Self::build(config, src)
    }

    fn init(config: &Qwen2Config, device: &Device) -> Self {
        config.init(device)
    }
}

impl CausalLm for Qwen2ForCausalLM {
    fn geometry(&self) -> ModelGeometry {
        self.config.geometry()
    }

    fn device(&self) -> Device {
        self.model.embed_tokens.weight.device()
    }

    fn embed_tokens(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        self.model.embed_tokens.forward(input_ids)
    }

    fn word_embeddings(&self) -> Tensor<2> {
        self.model.embed_tokens.weight.val()
    }

    fn forward_hidden(&self, input: ModelInput) -> ModelOutput {
        let dtype = input.inputs_embeds.dtype();
        let (x, past) = Past::resolve(input, &self.geometry());
        let positions = past.query_positions();
        let (cos, sin) = self.config.rope().cos_sin(positions, dtype);
        let (x, cache) = past.run(
            &self.model.layers,
            "model.layers",
            x,
            |layer, x, kv, mask, rows| layer.forward_with(x, &cos, &sin, kv, mask, rows),
        );
        ModelOutput {
            hidden_states: self.model.norm.forward(x),
            cache,
        }
    }

    fn lm_head(&self, hidden_states: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden_states),
            None => tied_lm_head(hidden_states, &self.model.embed_tokens),
        }
    }

    fn output_embeddings(&self) -> Option<Tensor<2>> {
        match &self.lm_head {
            // A Linear stores `[hidden, vocab]`; the transpose is a view.
            Some(head) if head.bias.is_none() => Some(head.weight.val().transpose()),
            Some(_) => None,
            None => Some(self.model.embed_tokens.weight.val()),
        }
    }
}
