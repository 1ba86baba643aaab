//! Prefix Tuning and P-Tuning v2 for peft-burn (PEFT `PREFIX_TUNING`).
//!
//! Every attention layer gets `num_virtual_tokens` trainable key/value pairs that every real
//! token attends to (prefix keys are not rotated by RoPE; BLOOM's ALiBi treats them as the first
//! positions). With `prefix_projection` (Prefix Tuning proper) they are the output of
//! `Embedding(n, token_dim) -> Linear(token_dim, h) -> Tanh -> Linear(h, layers * 2 * token_dim)`;
//! without it (P-Tuning v2, "deep prompts") they are an `Embedding(n, layers * 2 * token_dim)`
//! trained directly. Shapes follow PEFT exactly, including grouped-query attention, where the
//! prefix has the key/value heads: `token_dim = head_dim * num_key_value_heads`.
//!
//! Files: PEFT saves the encoder's output `prompt_embeddings` `[n, layers * 2 * token_dim]`; ours
//! load it (inference form) and write it, plus, with a projection, our trainable checkpoint
//! `adapter_encoder.safetensors` (the encoder under PEFT's state-dict names).
#![warn(missing_docs)]

use std::path::Path;

use burn::module::Param;
use burn::nn::{Dropout, DropoutConfig, Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::tanh;
use peft_core::adapter_config::{
    PromptLearningConfig, PromptLearningFile, check_dropout, check_hidden_size,
    check_num_virtual_tokens, write_adapter_dir,
};
use peft_core::adapter_file::{
    ADAPTER_ENCODER, PROMPT_EMBEDDINGS, TensorFile, linear_tensors, read_linear,
    read_prompt_embeddings,
};
use peft_core::json_config::JsonConfig;
use peft_core::json_config::fields;
use peft_core::method::parse_options;
use peft_core::params::initialize_now;
use peft_core::{
    Adapter, BaseShape, CausalLm, InitText, Injection, LayerKv, Method, MethodConfig,
    ModelGeometry, ModelInput, Preset, TrainableParameters,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use peft_core::adapter_config::AdapterError;

/// The method's `peft_type`, as PEFT spells it in `adapter_config.json`.
pub const PEFT_TYPE: &str = "PREFIX_TUNING";

/// Configuration of a prefix encoder.
#[derive(Config, Debug)]
pub struct PrefixTuningConfig {
    /// Number of prefix positions per layer.
    pub num_virtual_tokens: usize,
    /// Decoder layers of the base model.
    pub num_layers: usize,
    /// Width of one layer's keys (or values) per position: `head_dim * num_key_value_heads`.
    pub token_dim: usize,
    /// Heads of the prefix: the base model's key/value heads.
    pub num_attention_heads: usize,
    /// Prefix Tuning's reparameterization (`true`) or P-Tuning v2's direct prefix (`false`).
    #[config(default = false)]
    pub prefix_projection: bool,
    /// Hidden width of the projection; PEFT's default is `token_dim`.
    pub encoder_hidden_size: Option<usize>,
    /// Start at an all-zero prefix (PEFT's `init_weights: "zero"`): the projection's last Linear,
    /// or the embedding without projection, is zeroed.
    #[config(default = false)]
    pub zero_init: bool,
    /// Dropout on the prefix key/values while training (not in PEFT; 0 keeps PEFT's result).
    #[config(default = 0.0)]
    pub prefix_dropout: f64,
    /// Start the prefix from the base model's own keys and values for this text (PEFT's
    /// `initialize_kv_prefix_from_text`), built by [`PrefixTuningConfig::init_from_text`] from
    /// the text's token ids. With a projection (which PEFT refuses) the projection is fitted to
    /// output them. Not saved: the trained prefix is.
    pub init_text: Option<String>,
}

impl PrefixTuningConfig {
    /// A config shaped for a base model of `geometry`, as PEFT shapes it: with grouped-query
    /// attention, `token_dim = head_dim * num_key_value_heads` and the heads are the key/value heads.
    pub fn for_model(num_virtual_tokens: usize, geometry: &ModelGeometry) -> Self {
        Self::new(
            num_virtual_tokens,
            geometry.num_layers,
            geometry.head_dim * geometry.num_key_value_heads,
            geometry.num_key_value_heads,
        )
    }

    /// Checks the configuration fits a base model of `geometry` before anything is allocated.
    ///
    /// # Errors
    ///
    /// `num_virtual_tokens` of 0 or beyond the base's positions, `encoder_hidden_size` of 0, or
    /// `prefix_dropout` outside [0, 1); each names the field.
    pub fn validate(&self, geometry: &ModelGeometry) -> Result<(), AdapterError> {
        check_num_virtual_tokens(self.num_virtual_tokens, geometry)?;
        check_hidden_size("encoder_hidden_size", self.encoder_hidden_size)?;
        check_dropout("prefix_dropout", self.prefix_dropout)
    }

    /// The projection's hidden width.
    pub fn hidden_size(&self) -> usize {
        self.encoder_hidden_size.unwrap_or(self.token_dim)
    }

    /// Width of one row of `prompt_embeddings`: `num_layers * 2 * token_dim`.
    pub fn prefix_width(&self) -> usize {
        self.num_layers
            .saturating_mul(2)
            .saturating_mul(self.token_dim)
    }

    /// A trainable encoder with PyTorch's initialization (embedding N(0, 1), Linears uniform),
    /// zeroed as [`PrefixTuningConfig::zero_init`] asks, on `device`, drawn now from the device's
    /// generator.
    pub fn init(&self, device: &Device) -> PrefixEncoder {
        let n = self.num_virtual_tokens;
        let (embedding, transform) = if self.prefix_projection {
            let h = self.hidden_size();
            let mut last = LinearConfig::new(h, self.prefix_width()).init(device);
            if self.zero_init {
                last.weight = Param::from_tensor(Tensor::zeros([h, self.prefix_width()], device));
                last.bias = Some(Param::from_tensor(Tensor::zeros(
                    [self.prefix_width()],
                    device,
                )));
            }
            (
                EmbeddingConfig::new(n, self.token_dim).init(device),
                Some(vec![
                    LinearConfig::new(self.token_dim, h).init(device),
                    last,
                ]),
            )
        } else {
            let mut embedding = EmbeddingConfig::new(n, self.prefix_width()).init(device);
            if self.zero_init {
                embedding.weight =
                    Param::from_tensor(Tensor::zeros([n, self.prefix_width()], device));
            }
            (embedding, None)
        };
        initialize_now(PrefixEncoder {
            embedding,
            transform,
            dropout: DropoutConfig::new(self.prefix_dropout).init(),
            config: self.clone(),
        })
    }

    /// A trainable encoder that starts as the base model's own cached keys and values of the
    /// first `num_virtual_tokens` tokens of `text_ids`, keys as cached (rotated by their positions
    /// `0..n`, as RoPE models cache them). The prefix then makes the model see the text's
    /// beginning before every input, so training starts near the base model's loss instead of
    /// from a random or zero prefix that swamps attention.
    ///
    /// Without projection (P-Tuning v2) the prefix is those key/values: PEFT 0.21's
    /// `initialize_kv_prefix_from_text`, which prefills the text (by default rendered as a system
    /// message through the model's chat template) and copies the cache. PEFT refuses a
    /// projection; ours fits it instead (not in PEFT): the embedding and first Linear are drawn
    /// as [`PrefixTuningConfig::init`] draws them, and the last Linear is solved so that the
    /// projection's output is the text's key/values (exactly when `num_virtual_tokens <=` the
    /// hidden width, else in the least-squares sense).
    ///
    /// # Errors
    ///
    /// `zero_init` set, fewer than `num_virtual_tokens` text tokens, a token id outside the base's
    /// vocabulary, or a base whose geometry differs from this configuration's; each names
    /// `init_text`.
    pub fn init_from_text<M: CausalLm>(
        &self,
        base: &M,
        text_ids: &[u32],
    ) -> Result<PrefixEncoder, AdapterError> {
        if self.zero_init {
            return Err(AdapterError::Init {
                field: "init_text",
                message: "a prefix from text contradicts zero_init".into(),
            });
        }
        let prefix = self.text_key_values(base, text_ids)?;
        if !self.prefix_projection {
            return Ok(initialize_now(PrefixEncoder::from_prompt_embeddings(
                prefix,
                self.clone(),
            )));
        }
        let mut encoder = self.init(&base.device());
        if let Some([first, last]) = encoder.transform.as_deref_mut() {
            fit_last_linear(first, last, encoder.embedding.weight.val(), prefix);
        }
        Ok(initialize_now(encoder))
    }

    /// The base model's cached keys and values of the first `num_virtual_tokens` tokens of
    /// `text_ids`, packed as a prefix `[n, layers * 2 * token_dim]` (see
    /// [`PrefixTuningConfig::init_from_text`]).
    fn text_key_values<M: CausalLm>(
        &self,
        base: &M,
        text_ids: &[u32],
    ) -> Result<Tensor<2>, AdapterError> {
        let n = self.num_virtual_tokens;
        if text_ids.len() < n {
            return Err(AdapterError::Init {
                field: "init_text",
                message: format!(
                    "the text encodes to {} tokens, fewer than num_virtual_tokens {n}",
                    text_ids.len()
                ),
            });
        }
        let geometry = base.geometry();
        let expected = Self::for_model(n, &geometry);
        if (self.num_layers, self.token_dim, self.num_attention_heads)
            != (
                expected.num_layers,
                expected.token_dim,
                expected.num_attention_heads,
            )
        {
            return Err(AdapterError::Init {
                field: "init_text",
                message: format!(
                    "the base model has {} layers and key/values of {} x {}, the configuration \
                     {} layers of {} x {}",
                    expected.num_layers,
                    expected.num_attention_heads,
                    expected.token_dim / expected.num_attention_heads.max(1),
                    self.num_layers,
                    self.num_attention_heads,
                    self.token_dim / self.num_attention_heads.max(1)
                ),
            });
        }
        if let Some(&id) = text_ids[..n]
            .iter()
            .find(|&&id| id as usize >= geometry.vocab_size)
        {
            return Err(AdapterError::Init {
                field: "init_text",
                message: format!(
                    "token id {id} is outside the base model's vocabulary of {}",
                    geometry.vocab_size
                ),
            });
        }
        let device = base.device();
        // Only the first n positions reach the prefix, and causal attention makes them
        // independent of what follows: prefill just those.
        let ids: Vec<i64> = text_ids[..n].iter().map(|&t| i64::from(t)).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
        let cache = base
            .forward_hidden(ModelInput::new(base.embed_tokens(ids)))
            .cache;
        let (heads, head_dim) = (
            self.num_attention_heads,
            self.token_dim / self.num_attention_heads,
        );
        // PEFT's packing: row t of the prefix is [k_0, v_0, k_1, v_1, ...] of position t, each
        // [heads, head_dim].
        let chunks: Vec<Tensor<4>> = cache
            .layers
            .into_iter()
            .flat_map(|kv| [kv.key, kv.value])
            .map(|t| {
                t.slice([0..1, 0..heads, 0..n, 0..head_dim])
                    .reshape([heads, n, head_dim])
                    .swap_dims(0, 1)
                    .unsqueeze_dim::<4>(1)
                    .cast(burn::tensor::DType::F32)
            })
            .collect();
        Ok(Tensor::cat(chunks, 1)
            .reshape([n, self.prefix_width()])
            .detach())
    }

    /// Parameters of the trainable encoder, counted from the configuration alone.
    pub fn num_params(&self) -> usize {
        let n = self.num_virtual_tokens;
        if self.prefix_projection {
            // Saturating: absurd sizes are refused by their callers' memory checks, not by a panic.
            let (d, h, w) = (self.token_dim, self.hidden_size(), self.prefix_width());
            n.saturating_mul(d)
                .saturating_add(d.saturating_mul(h).saturating_add(h))
                .saturating_add(h.saturating_mul(w).saturating_add(w))
        } else {
            n.saturating_mul(self.prefix_width())
        }
    }

    fn check(&self, raw: &JsonConfig) -> Result<(), AdapterError> {
        if self.num_attention_heads == 0 || !self.token_dim.is_multiple_of(self.num_attention_heads)
        {
            return Err(raw
                .unsupported(
                    "num_attention_heads",
                    format!(
                        "{} does not divide token_dim {}",
                        self.num_attention_heads, self.token_dim
                    ),
                )
                .into());
        }
        Ok(())
    }
}

/// Sets the projection's last Linear so that `tanh(first(embedding)) · weight + bias` is
/// `target` `[n, width]`, with `H = tanh(first(embedding))` `[n, hidden]`. With `n <= hidden` (the
/// usual case: PEFT's default hidden width is `token_dim`, prefixes are tens of positions) a drawn
/// `H` has full row rank and the fit is exact up to rounding: the bias is the target's mean row
/// and the weight the minimum-norm solution of `H · weight = target - bias`, so the weight
/// carries only the positions' differences. With more positions than hidden units, weight and
/// bias are the least-squares fit. Near `n = hidden` a drawn `H` can be ill-conditioned: the fit
/// stays exact in f64, and its larger weights realize it in f32 to about 1e-4 of the prefix's
/// scale, which is plenty for a start.
///
/// The system is small (`min(n, hidden + 1)` unknowns per column) and solved once, so it runs on
/// the host in f64, through the normal equations and a Cholesky factorization written here: burn
/// 0.22's `linalg` (LU, QR and SVD, behind a feature this workspace does not build) has no solve,
/// and a linear-algebra crate for one small system is not worth its build.
fn fit_last_linear(first: &Linear, last: &mut Linear, embedding: Tensor<2>, target: Tensor<2>) {
    let device = target.device();
    let [n, width] = target.dims();
    let hidden = first.weight.dims()[1];
    let h = host_f64(tanh(first.forward(embedding)).detach());
    let target = host_f64(target);
    let (weight, bias) = if n <= hidden {
        let mut bias = vec![0.0; width];
        for row in target.chunks(width) {
            bias.iter_mut().zip(row).for_each(|(b, v)| *b += v);
        }
        bias.iter_mut().for_each(|b| *b /= n as f64);
        let residual: Vec<f64> = target
            .chunks(width)
            .flat_map(|row| row.iter().zip(&bias).map(|(v, b)| v - b))
            .collect();
        // weight = Hᵀ (H Hᵀ)⁻¹ R
        let gram: Vec<f64> = h
            .chunks(hidden)
            .flat_map(|a| h.chunks(hidden).map(move |b| dot(a, b)))
            .collect();
        let x = solve_positive_definite(gram, n, residual, width);
        (transpose_times(&h, hidden, &x, width), bias)
    } else {
        // [weight; bias] = (Aᵀ A)⁻¹ Aᵀ T with A = [H, 1]: least squares with the bias.
        let a: Vec<f64> = h
            .chunks(hidden)
            .flat_map(|row| row.iter().copied().chain([1.0]))
            .collect();
        let gram = transpose_times(&a, hidden + 1, &a, hidden + 1);
        let rhs = transpose_times(&a, hidden + 1, &target, width);
        let mut solution = solve_positive_definite(gram, hidden + 1, rhs, width);
        let bias = solution.split_off(hidden * width);
        (solution, bias)
    };
    let to_f32 = |values: Vec<f64>, shape: Vec<usize>| {
        let values: Vec<f32> = values.into_iter().map(|v| v as f32).collect();
        TensorData::new(values, shape)
    };
    last.weight = Param::from_tensor(Tensor::from_data(
        to_f32(weight, vec![hidden, width]),
        &device,
    ));
    last.bias = Some(Param::from_tensor(Tensor::from_data(
        to_f32(bias, vec![width]),
        &device,
    )));
}

fn host_f64(tensor: Tensor<2>) -> Vec<f64> {
    tensor
        .into_data()
        .convert::<f32>()
        .iter::<f32>()
        .map(f64::from)
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `aᵀ · b` for `a` `[rows, a_cols]` and `b` `[rows, b_cols]`, row-major: `[a_cols, b_cols]`.
fn transpose_times(a: &[f64], a_cols: usize, b: &[f64], b_cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; a_cols * b_cols];
    for (a_row, b_row) in a.chunks(a_cols).zip(b.chunks(b_cols)) {
        for (&x, out_row) in a_row.iter().zip(out.chunks_mut(b_cols)) {
            out_row.iter_mut().zip(b_row).for_each(|(o, y)| *o += x * y);
        }
    }
    out
}

/// Solves `a · x = b` for a symmetric positive (semi-)definite `a` `[m, m]` and `b` `[m, cols]`
/// by Cholesky. A ridge of 1e-12 of the mean diagonal keeps a numerically singular `a` (say, two
/// equal rows of `H`) factorizable; a well-conditioned solution moves by about that much.
fn solve_positive_definite(mut a: Vec<f64>, m: usize, mut b: Vec<f64>, cols: usize) -> Vec<f64> {
    let trace: f64 = (0..m).map(|i| a[i * m + i]).sum();
    let ridge = 1e-12 * trace / m.max(1) as f64 + f64::MIN_POSITIVE;
    // a = L Lᵀ, L written over a's lower triangle.
    for j in 0..m {
        let row_j = j * m;
        let diagonal = a[row_j + j] + ridge - dot(&a[row_j..row_j + j], &a[row_j..row_j + j]);
        let diagonal = diagonal.max(ridge).sqrt();
        a[row_j + j] = diagonal;
        for i in j + 1..m {
            let row_i = i * m;
            let s = a[row_i + j] - dot(&a[row_i..row_i + j], &a[row_j..row_j + j]);
            a[row_i + j] = s / diagonal;
        }
    }
    // L y = b, then Lᵀ x = y, every column of b at once.
    for i in 0..m {
        let (done, rest) = b.split_at_mut(i * cols);
        let row = &mut rest[..cols];
        for (k, solved) in done.chunks(cols).enumerate() {
            let l = a[i * m + k];
            row.iter_mut().zip(solved).for_each(|(x, y)| *x -= l * y);
        }
        row.iter_mut().for_each(|x| *x /= a[i * m + i]);
    }
    for i in (0..m).rev() {
        let (head, solved) = b.split_at_mut((i + 1) * cols);
        let row = &mut head[i * cols..];
        for (k, solved) in solved.chunks(cols).enumerate() {
            let l = a[(i + 1 + k) * m + i];
            row.iter_mut().zip(solved).for_each(|(x, y)| *x -= l * y);
        }
        row.iter_mut().for_each(|x| *x /= a[i * m + i]);
    }
    b
}

/// The keys of a prefix-tuning `adapter_config.json` beyond the shared ones, as PEFT writes them
/// (and `prefix_dropout`, ours, written only when set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefixTuningKeys {
    /// `prefix_projection`: Prefix Tuning (`true`) or P-Tuning v2 (`false`).
    #[serde(default)]
    pub prefix_projection: bool,
    /// `encoder_hidden_size`: the projection's width (PEFT's default: `token_dim`).
    #[serde(default, deserialize_with = "fields::opt_positive")]
    pub encoder_hidden_size: Option<usize>,
    /// `init_weights`: `null` (PEFT's random start) or `"zero"`.
    #[serde(default)]
    pub init_weights: Option<InitWeights>,
    /// `prefix_dropout` (not PEFT's; 0 when absent).
    #[serde(
        default,
        deserialize_with = "fields::dropout",
        skip_serializing_if = "is_zero"
    )]
    pub prefix_dropout: f64,
}

/// A prefix-tuning `adapter_config.json`.
pub type PrefixTuningFile = PromptLearningFile<PrefixTuningKeys>;

/// PEFT's `init_weights` of a prefix: how it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitWeights {
    /// `"zero"`: an all-zero prefix ([`PrefixTuningConfig::zero_init`]).
    Zero,
}

fn is_zero(p: &f64) -> bool {
    *p == 0.0
}

/// The prefix encoder. Trainable form: PEFT's `embedding` and, with a projection, `transform`
/// (`transform.0` and `transform.2` in PyTorch's names). Inference form (what PEFT's files hold):
/// only `embedding`, of `[n, layers * 2 * token_dim]`, holding the output.
#[derive(Module, Debug)]
pub struct PrefixEncoder {
    /// The prefix itself, or the projection's input.
    pub embedding: Embedding,
    /// The projection's two Linears (Tanh between); `None` without projection or in inference form.
    pub transform: Option<Vec<Linear>>,
    /// On the prefix key/values.
    pub dropout: Dropout,
    /// The configuration it was built from.
    #[module(skip)]
    pub config: PrefixTuningConfig,
}

impl PrefixEncoder {
    /// An inference-form encoder whose output is `prompt_embeddings` `[n, layers * 2 * token_dim]`.
    pub fn from_prompt_embeddings(
        prompt_embeddings: Tensor<2>,
        config: PrefixTuningConfig,
    ) -> Self {
        Self {
            embedding: Embedding {
                weight: Param::from_tensor(prompt_embeddings),
            },
            transform: None,
            dropout: DropoutConfig::new(config.prefix_dropout).init(),
            config,
        }
    }

    /// The flat prefix `[n, layers * 2 * token_dim]`, computed once: what PEFT saves as
    /// `prompt_embeddings`.
    pub fn prompt_embeddings(&self) -> Tensor<2> {
        let x = self.embedding.weight.val();
        match &self.transform {
            Some(transform) => transform[1].forward(tanh(transform[0].forward(x))),
            None => x,
        }
    }

    /// The inference form: the projection folded into its output (what PEFT's files hold).
    pub fn into_inference(self) -> Self {
        let output = self.prompt_embeddings().detach();
        Self::from_prompt_embeddings(output, self.config)
    }

    /// The per-layer key/values of a batch of `batch` rows, `[batch, heads, n, head_dim]` each,
    /// from the flat prefix viewed `[n, layers * 2, heads, head_dim]`: chunk `2l` holds the keys
    /// of layer `l`, chunk `2l + 1` its values (PEFT's layout).
    pub fn key_values(&self, batch: usize) -> Vec<LayerKv> {
        let c = &self.config;
        let (n, heads) = (c.num_virtual_tokens, c.num_attention_heads);
        let head_dim = c.token_dim / heads;
        let flat = self.dropout.forward(self.prompt_embeddings());
        // [n, 2L, heads, hd] -> [2L, heads, n, hd]
        let chunks = flat
            .reshape([n, 2 * c.num_layers, heads, head_dim])
            .permute([1, 2, 0, 3]);
        let expand = |t: Tensor<4>| t.expand([batch, heads, n, head_dim]);
        (0..c.num_layers)
            .map(|l| LayerKv {
                key: expand(chunks.clone().slice(2 * l..2 * l + 1)),
                value: expand(chunks.clone().slice(2 * l + 1..2 * l + 2)),
            })
            .collect()
    }

    /// The trainable encoder's tensors under PEFT's `prompt_encoder` state-dict names; `None`
    /// in inference form or without projection (the file then holds everything).
    pub fn encoder_tensors(&self) -> Option<Vec<(String, TensorData)>> {
        let transform = self.transform.as_ref()?;
        let mut out = vec![(
            "embedding.weight".to_string(),
            self.embedding.weight.val().into_data(),
        )];
        out.extend(linear_tensors("transform.0", &transform[0]));
        out.extend(linear_tensors("transform.2", &transform[1]));
        Some(out)
    }
}

impl Adapter for PrefixEncoder {
    fn num_virtual_tokens(&self) -> usize {
        // Prefix positions are key/values, not input tokens.
        0
    }

    fn num_prefix_positions(&self) -> usize {
        self.config.num_virtual_tokens
    }

    fn save<M: CausalLm>(
        &self,
        dir: &Path,
        base: &M,
        base_model_name_or_path: Option<&str>,
    ) -> Result<(), AdapterError> {
        peft_core::method::save_for(self, dir, base, base_model_name_or_path)
    }

    fn load<M: CausalLm>(dir: &Path, base: M) -> Result<(M, Self), AdapterError> {
        peft_core::method::load_for(dir, base)
    }

    fn into_inference(self) -> Self {
        PrefixEncoder::into_inference(self)
    }

    fn inject(&self, batch: usize) -> Injection {
        Injection::prefix(self.key_values(batch))
    }
}

/// The options `PrefixTuningConfig::from_options` reads: PEFT's keys and ours, sizes taken as
/// given so that [`PrefixTuningConfig::validate`] names what is wrong with them. (Not a `flatten`
/// of [`PrefixTuningKeys`]: serde's `flatten` loses the key path errors name.)
#[derive(Debug, Deserialize)]
struct PrefixTuningOptions {
    num_virtual_tokens: usize,
    #[serde(default)]
    prefix_projection: bool,
    #[serde(default)]
    encoder_hidden_size: Option<usize>,
    #[serde(default)]
    init_weights: Option<InitWeights>,
    #[serde(default)]
    prefix_dropout: f64,
    #[serde(default)]
    init_text: Option<String>,
}

impl MethodConfig for PrefixTuningConfig {
    type Method = PrefixEncoder;

    /// Keys: `num_virtual_tokens`, `prefix_projection`, `encoder_hidden_size`, `init_weights`
    /// (`"zero"` or null), and ours: `prefix_dropout`, `init_text` (see
    /// [`PrefixTuningConfig::init_text`]).
    fn from_options(
        options: &Map<String, Value>,
        geometry: &ModelGeometry,
    ) -> Result<Self, AdapterError> {
        let options: PrefixTuningOptions = parse_options(options)?;
        Ok(Self::for_model(options.num_virtual_tokens, geometry)
            .with_prefix_projection(options.prefix_projection)
            .with_encoder_hidden_size(options.encoder_hidden_size)
            .with_zero_init(options.init_weights == Some(InitWeights::Zero))
            .with_prefix_dropout(options.prefix_dropout)
            .with_init_text(options.init_text))
    }

    fn validate(&self, geometry: &ModelGeometry) -> Result<(), AdapterError> {
        PrefixTuningConfig::validate(self, geometry)
    }

    fn init_text(&self) -> Option<InitText<'_>> {
        self.init_text.as_deref().map(|text| InitText {
            text,
            as_system_message: true,
        })
    }

    fn init<M: CausalLm>(
        &self,
        base: &M,
        init_text_ids: &[u32],
    ) -> Result<PrefixEncoder, AdapterError> {
        PrefixTuningConfig::validate(self, &base.geometry())?;
        match self.init_text {
            Some(_) => self.init_from_text(base, init_text_ids),
            None => Ok(PrefixTuningConfig::init(self, &base.device())),
        }
    }

    fn trainable_parameters(&self, base: &BaseShape) -> Result<TrainableParameters, AdapterError> {
        Ok(base.with_adapter_params(self.num_params()))
    }
}

impl Method for PrefixEncoder {
    const PEFT_TYPE: &'static str = PEFT_TYPE;
    type Config = PrefixTuningConfig;
    const PRESETS: &'static [Preset] = &[
        Preset {
            name: "prefix-tuning",
            summary: "Prefix Tuning (PEFT PREFIX_TUNING, prefix_projection true)",
            options: r#"{"prefix_projection": true}"#,
            // Adam moves each of the projection's weights by about lr per step, and the output
            // by lr times the hidden width: on SmolLM2 1e-2 ends at 32% where 1e-3 ends at 92%,
            // on both sides of the PEFT comparison (docs/smollm2.md).
            learning_rate: 1e-3,
            tiny_model_learning_rate: 1e-2,
        },
        Preset {
            name: "p-tuning-v2",
            summary: "P-Tuning v2 (PEFT PREFIX_TUNING, prefix_projection false)",
            options: r#"{"prefix_projection": false}"#,
            learning_rate: 1e-2,
            tiny_model_learning_rate: 1e-1,
        },
    ];

    /// Reads a prefix-tuning adapter directory for a base model of shape `base`: trainable form when
    /// our `adapter_encoder.safetensors` is there (projection only), else from PEFT's
    /// `adapter_model.safetensors` (trainable without projection, where the file is the prefix;
    /// inference form with projection).
    ///
    /// # Errors
    ///
    /// A missing or malformed file, another method, an adapter made for another base model
    /// (`token_dim`, `num_layers`, `num_attention_heads`: GQA-reduced as PEFT writes them), or a
    /// tensor absent or of the wrong shape; each names the file and the key or tensor.
    fn read(dir: &Path, base: &BaseShape, device: &Device) -> Result<Self, AdapterError> {
        let geometry = &base.geometry;
        let (file, raw) = PrefixTuningFile::read(dir, PEFT_TYPE)?;
        let expected = PrefixTuningConfig::for_model(file.shared.num_virtual_tokens, geometry);
        file.shared.check_base(
            &raw,
            geometry,
            expected.token_dim,
            expected.num_attention_heads,
        )?;
        let keys = file.method;
        let config = expected
            .with_prefix_projection(keys.prefix_projection)
            .with_encoder_hidden_size(keys.encoder_hidden_size)
            .with_zero_init(keys.init_weights == Some(InitWeights::Zero))
            .with_prefix_dropout(keys.prefix_dropout);
        config.check(&raw)?;
        let encoder_path = dir.join(ADAPTER_ENCODER);
        if config.prefix_projection && encoder_path.exists() {
            let file = TensorFile::open(&encoder_path)?;
            let (n, d, h, w) = (
                config.num_virtual_tokens,
                config.token_dim,
                config.hidden_size(),
                config.prefix_width(),
            );
            let why = format!(
                "projection, num_virtual_tokens {n}, token_dim {d}, encoder_hidden_size {h}, {} layers",
                config.num_layers
            );
            let mut encoder = config.init(device);
            encoder.embedding.weight =
                Param::from_tensor(file.tensor("embedding.weight", [n, d], &why, device)?);
            encoder.transform = Some(vec![
                read_linear(&file, "transform.0", [d, h], &why, device)?,
                read_linear(&file, "transform.2", [h, w], &why, device)?,
            ]);
            return Ok(encoder);
        }
        let (n, w) = (config.num_virtual_tokens, config.prefix_width());
        let why = format!(
            "num_virtual_tokens {n} x num_layers {} x 2 x token_dim {}",
            config.num_layers, config.token_dim
        );
        let prefix = read_prompt_embeddings(dir, [n, w], &why, device)?;
        Ok(Self::from_prompt_embeddings(prefix, config))
    }

    /// Saves into `dir`: `adapter_config.json` with PEFT's keys, `adapter_model.safetensors` with
    /// `prompt_embeddings` (PEFT loads both), and with a trainable projection
    /// `adapter_encoder.safetensors`. Each file is written atomically.
    fn write(
        &self,
        dir: &Path,
        _base: &BaseShape,
        base_model_name_or_path: Option<&str>,
    ) -> Result<(), AdapterError> {
        let config = &self.config;
        let file = PrefixTuningFile {
            shared: PromptLearningConfig::new(
                PEFT_TYPE,
                config.num_virtual_tokens,
                config.token_dim,
                config.num_attention_heads,
                config.num_layers,
                base_model_name_or_path,
            ),
            method: PrefixTuningKeys {
                prefix_projection: config.prefix_projection,
                encoder_hidden_size: Some(config.hidden_size()),
                init_weights: config.zero_init.then_some(InitWeights::Zero),
                prefix_dropout: config.prefix_dropout,
            },
        };
        let json = file.to_json();
        write_adapter_dir(
            dir,
            &json,
            vec![(PROMPT_EMBEDDINGS, self.prompt_embeddings().into_data())],
            self.encoder_tensors(),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> ModelGeometry {
        ModelGeometry {
            num_layers: 3,
            hidden_size: 32,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            vocab_size: 10,
            max_positions: None,
        }
    }

    #[test]
    fn gqa_shapes_and_counts() {
        let device = Device::default();
        for projection in [false, true] {
            let config =
                PrefixTuningConfig::for_model(5, &geometry()).with_prefix_projection(projection);
            assert_eq!((config.token_dim, config.num_attention_heads), (16, 2));
            let encoder = config.init(&device);
            assert_eq!(encoder.num_params(), config.num_params());
            assert_eq!(encoder.prompt_embeddings().dims(), [5, 96]);
            let kv = encoder.key_values(3);
            assert_eq!(kv.len(), 3);
            assert_eq!(kv[2].key.dims(), [3, 2, 5, 8]);
        }
    }

    #[test]
    fn layout_is_layers_times_two_then_heads() {
        // One virtual token, 2 layers, 2 heads of 1: the row [k0h0 k0h1 v0h0 v0h1 k1h0 ...].
        let device = Device::default();
        let row = Tensor::<2>::from_data(
            TensorData::new((0..8).map(|v| v as f32).collect::<Vec<_>>(), [1, 8]),
            &device,
        );
        let encoder =
            PrefixEncoder::from_prompt_embeddings(row, PrefixTuningConfig::new(1, 2, 2, 2));
        let kv = encoder.key_values(1);
        let values = |t: Tensor<4>| t.into_data().try_into_vec_as::<f32>().unwrap();
        assert_eq!(values(kv[0].key.clone()), [0.0, 1.0]);
        assert_eq!(values(kv[0].value.clone()), [2.0, 3.0]);
        assert_eq!(values(kv[1].key.clone()), [4.0, 5.0]);
        assert_eq!(values(kv[1].value.clone()), [6.0, 7.0]);
    }

    #[test]
    fn prefix_dropout_acts_in_training_only() {
        let config = PrefixTuningConfig::for_model(4, &geometry()).with_prefix_dropout(0.5);
        let training = config.init(&Device::default().autodiff());
        let kept = training.prompt_embeddings();
        let dropped = training.key_values(1)[0].key.clone();
        let zeros = dropped
            .clone()
            .equal_elem(0.0)
            .int()
            .sum()
            .into_scalar::<i64>();
        assert!(zeros > 0, "no position was dropped");
        assert!(kept.equal_elem(0.0).int().sum().into_scalar::<i64>() == 0);
        // Inference (no autodiff) is deterministic and undropped.
        let inference = training.valid();
        let a = inference.key_values(1)[0].key.clone().into_data();
        let b = inference.key_values(1)[0].key.clone().into_data();
        assert_eq!(a, b);
        assert_eq!(
            inference.key_values(1)[0]
                .key
                .clone()
                .equal_elem(0.0)
                .int()
                .sum()
                .into_scalar::<i64>(),
            0
        );
    }

    /// The fitted projection of a prefix from text: exact with fewer positions than hidden units,
    /// least squares (the residual orthogonal to every hidden unit) with more. Not a square `H`:
    /// a random square matrix can be ill-conditioned, and then the exact fit's large weights lose
    /// digits when the projection runs in f32 (seen: 4e-5 of the scale at 16 x 16).
    #[test]
    fn the_last_linear_is_fitted_to_a_given_prefix() {
        let device = Device::default();
        for (n, hidden) in [(5, 16), (16, 48), (24, 6)] {
            let config = PrefixTuningConfig::for_model(n, &geometry())
                .with_prefix_projection(true)
                .with_encoder_hidden_size(Some(hidden));
            let mut encoder = config.init(&device);
            let target = Tensor::<2>::random(
                [n, config.prefix_width()],
                burn::tensor::Distribution::Normal(0.5, 3.0),
                &device,
            );
            let embedding = encoder.embedding.weight.val();
            let Some([first, last]) = encoder.transform.as_deref_mut() else {
                panic!("a projection")
            };
            fit_last_linear(first, last, embedding, target.clone());
            let residual = encoder.prompt_embeddings() - target.clone();
            let h = tanh(
                encoder.transform.as_ref().unwrap()[0].forward(encoder.embedding.weight.val()),
            );
            let scale = target.abs().max().into_scalar::<f32>();
            if n <= hidden {
                let worst = residual.abs().max().into_scalar::<f32>();
                assert!(worst < 1e-5 * scale, "{n} x {hidden}: residual {worst}");
            } else {
                let worst = residual.clone().abs().max().into_scalar::<f32>();
                assert!(
                    worst > 1e-2 * scale,
                    "{n} positions cannot fit {hidden} units"
                );
                // Normal equations: Hᵀ r = 0 for the weight, Σ r = 0 for the bias.
                let normal = h.transpose().matmul(residual.clone()).abs().max();
                let sum = residual.sum_dim(0).abs().max();
                for (what, value) in [("H^T r", normal), ("sum r", sum)] {
                    let value = value.into_scalar::<f32>();
                    assert!(value < 1e-4 * scale, "{what}: {value}");
                }
            }
        }
    }

    #[test]
    fn zero_init_gives_a_zero_prefix() {
        let device = Device::default();
        for projection in [false, true] {
            let prefix = PrefixTuningConfig::for_model(2, &geometry())
                .with_prefix_projection(projection)
                .with_zero_init(true)
                .init(&device)
                .prompt_embeddings();
            assert_eq!(prefix.abs().max().into_scalar::<f32>(), 0.0);
        }
    }
}
