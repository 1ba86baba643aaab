//! Batched autoregressive generation over any [`CausalLm`].
//!
//! Prompts of different lengths are left-padded into one batch; positions are padding-aware, so
//! each row continues exactly as it would alone. An [`Injection`] (virtual tokens, prefix
//! key/values) is applied at prefill only: prefix key/values enter the KV cache, virtual tokens
//! are computed once, so decoding steps cost the same as without an adapter.

use std::ops::ControlFlow;

use burn::prelude::*;
use rand::{RngExt, SeedableRng, rngs::StdRng};

use crate::error::CoreError;
use crate::model::{CausalLm, Injection, LayerKv, ModelInput, ModelOutput};

/// How to pick tokens and when to stop.
#[derive(Config, Debug)]
pub struct GenerationConfig {
    /// Most tokens to generate per row.
    #[config(default = 32)]
    pub max_new_tokens: usize,
    /// Sample from the distribution (`true`) or take the most likely token (`false`, greedy).
    #[config(default = false)]
    pub do_sample: bool,
    /// Logits are divided by this before sampling; must be > 0. Ignored when greedy.
    #[config(default = 1.0)]
    pub temperature: f64,
    /// Keep only the `k` most likely tokens before sampling (ties at the boundary kept).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability adds up to `top_p` (0, 1].
    pub top_p: Option<f64>,
    /// Seed of the sampler: the same seed, prompts and model give the same tokens.
    #[config(default = 0)]
    pub seed: u64,
    /// A row stops after producing any of these ids (the id is kept in its output).
    #[config(default = "Vec::new()")]
    pub eos_token_ids: Vec<u32>,
    /// Id used to left-pad prompts and to fill rows that already stopped.
    #[config(default = 0)]
    pub pad_token_id: u32,
}

/// What the per-token callback of [`generate`] sees after each step.
#[derive(Debug)]
pub struct GenerationStep<'a> {
    /// 0 for the first new token.
    pub step: usize,
    /// The token each row produced at this step; `None` for rows that had already stopped.
    pub tokens: &'a [Option<u32>],
}

/// The result of [`generate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationOutput {
    /// New tokens per row (prompt excluded, EOS included when one was produced).
    pub new_tokens: Vec<Vec<u32>>,
}

impl GenerationConfig {
    /// Checks every setting is in its domain ([`generate`] does this too).
    pub fn validate(&self) -> Result<(), CoreError> {
        let bad = |key, message: &str| {
            Err(CoreError::BadGenerationConfig {
                key,
                message: message.to_string(),
            })
        };
        if self.do_sample && !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad("temperature", "must be a finite number > 0 when sampling");
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return bad("top_p", "must be in (0, 1]");
        }
        if self.top_k == Some(0) {
            return bad("top_k", "must be at least 1");
        }
        Ok(())
    }
}

/// Generates up to `config.max_new_tokens` tokens after each prompt, as one batch.
///
/// `injection` is applied at prefill (its tensors must have one row per prompt); pass
/// `Injection::default()` for the bare model. `on_step` is called after every step with the new
/// token of each row (streaming); returning `ControlFlow::Break(())` stops generation.
///
/// # Errors
///
/// Empty prompts, ids outside the vocabulary, a total length over the model's limit, or a
/// generation setting out of its domain.
pub fn generate<M: CausalLm>(
    model: &M,
    prompts: &[Vec<u32>],
    injection: Injection,
    config: &GenerationConfig,
    mut on_step: impl FnMut(GenerationStep<'_>) -> ControlFlow<()>,
) -> Result<GenerationOutput, CoreError> {
    config.validate()?;
    let device = model.device();
    let batch = prompts.len();
    let prompt_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if batch == 0 || prompts.iter().any(Vec::is_empty) {
        return Err(CoreError::Shape {
            what: "prompts",
            message: "need at least one prompt, each of at least one token".into(),
        });
    }
    let geometry = model.geometry();
    let virtual_dims = injection.virtual_embeds.as_ref().map(|t| t.dims());
    let first_prefix = injection.prefix.as_ref().and_then(|p| p.first());
    let virtual_len = virtual_dims.map_or(0, |[_, n, _]| n);
    let prefix_len = first_prefix.map_or(0, LayerKv::len);
    if let Some([rows, _, hidden]) = virtual_dims
        && (rows != batch || hidden != geometry.hidden_size)
    {
        return Err(CoreError::Shape {
            what: "virtual_embeds",
            message: format!(
                "is [{rows}, _, {hidden}], expected [{batch}, _, {}] for {batch} prompts",
                geometry.hidden_size
            ),
        });
    }
    if let Some(rows) = first_prefix.map(|kv| kv.key.dims()[0])
        && rows != batch
    {
        return Err(CoreError::Shape {
            what: "prefix",
            message: format!("has {rows} rows for {batch} prompts"),
        });
    }

    // Left-pad into one batch.
    let mut ids = Vec::with_capacity(batch * prompt_len);
    let mut mask = Vec::with_capacity(batch * prompt_len);
    for prompt in prompts {
        let pad = prompt_len - prompt.len();
        ids.extend(std::iter::repeat_n(config.pad_token_id as i64, pad));
        ids.extend(prompt.iter().map(|&t| t as i64));
        mask.extend(std::iter::repeat_n(0i64, pad));
        mask.extend(std::iter::repeat_n(1i64, prompt.len()));
    }
    let rows: Vec<Vec<i64>> = ids.chunks(prompt_len).map(<[i64]>::to_vec).collect();
    model.check_input(
        &rows,
        None,
        virtual_len + prefix_len + config.max_new_tokens,
    )?;

    let padded = prompts.iter().any(|p| p.len() != prompt_len);
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, prompt_len]), &device);
    let attention_mask = padded
        .then(|| Tensor::<2, Int>::from_data(TensorData::new(mask, [batch, prompt_len]), &device));

    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut new_tokens = vec![Vec::new(); batch];
    let mut finished = vec![false; batch];
    let mut input = injection.into_input(model.embed_tokens(ids), attention_mask);
    let vocab = geometry.vocab_size;
    for step in 0..config.max_new_tokens {
        let ModelOutput {
            hidden_states,
            cache,
        } = model.forward_hidden(input);
        let [b, s, d] = hidden_states.dims();
        // Logits of the last position only: the rest are never used.
        let last = hidden_states.slice([0..b, s - 1..s, 0..d]);
        let logits = model.lm_head(last).reshape([b, vocab]);
        let chosen = next_tokens(logits, config, &mut rng);

        let mut tokens = vec![None; batch];
        for row in 0..batch {
            if finished[row] {
                continue;
            }
            let token = chosen[row];
            tokens[row] = Some(token);
            new_tokens[row].push(token);
            if config.eos_token_ids.contains(&token) {
                finished[row] = true;
            }
        }
        let flow = on_step(GenerationStep {
            step,
            tokens: &tokens,
        });
        if flow.is_break() || finished.iter().all(|&f| f) {
            break;
        }
        let next: Vec<i64> = tokens
            .iter()
            .map(|t| t.unwrap_or(config.pad_token_id) as i64)
            .collect();
        let next = Tensor::<2, Int>::from_data(TensorData::new(next, [batch, 1]), &device);
        input = ModelInput::new(model.embed_tokens(next)).with_cache(Some(cache));
    }
    Ok(GenerationOutput { new_tokens })
}

/// Picks one token per row from logits `[batch, vocab]`.
/// One sequence's sampled choices with its own seeded stream: the draws [`generate`] makes for a
/// batch of one, so that a row sampled among others (a serving batch) gets the tokens it gets
/// alone.
#[derive(Debug)]
pub struct TokenSampler {
    config: GenerationConfig,
    rng: StdRng,
}

impl TokenSampler {
    /// A sampler for `config` (its temperature, top-k, top-p and seed).
    pub fn new(config: &GenerationConfig) -> Self {
        Self {
            config: config.clone(),
            rng: StdRng::seed_from_u64(config.seed),
        }
    }

    /// The next token from one row's logits `[vocab]`: a draw when the config samples, else the
    /// first largest logit.
    pub fn choose(&mut self, logits: &[f32]) -> u32 {
        if self.config.do_sample {
            sample_row(logits, &self.config, &mut self.rng)
        } else {
            let mut best = 0;
            for (i, &l) in logits.iter().enumerate() {
                if l > logits[best] {
                    best = i;
                }
            }
            best as u32
        }
    }
}

fn next_tokens(logits: Tensor<2>, config: &GenerationConfig, rng: &mut StdRng) -> Vec<u32> {
    if !config.do_sample {
        return logits
            .argmax(1)
            .into_data()
            .try_into_vec_as::<i64>()
            .expect("argmax yields integers")
            .into_iter()
            .map(|t| t as u32)
            .collect();
    }
    let [batch, vocab] = logits.dims();
    let values = logits
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("logits are floats");
    (0..batch)
        .map(|row| sample_row(&values[row * vocab..(row + 1) * vocab], config, rng))
        .collect()
}

/// Temperature, then top-k, then top-p, then a draw: the order of Hugging Face's processors.
fn sample_row(logits: &[f32], config: &GenerationConfig, rng: &mut StdRng) -> u32 {
    let mut scores: Vec<f64> = logits
        .iter()
        .map(|&l| l as f64 / config.temperature)
        .collect();
    if let Some(k) = config.top_k
        && k < scores.len()
    {
        let mut sorted = scores.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        for s in scores.iter_mut().filter(|s| **s < kth) {
            *s = f64::NEG_INFINITY;
        }
    }
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = config.top_p {
        // Drop the least likely tokens while their cumulative mass stays <= 1 - top_p,
        // always keeping the most likely one.
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]));
        let mut cumulative = 0.0;
        for &i in &order[..order.len() - 1] {
            cumulative += probs[i];
            if cumulative > 1.0 - top_p {
                break;
            }
            probs[i] = 0.0;
        }
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let draw: f64 = rng.random();
    let mut cumulative = 0.0;
    let mut last_nonzero = 0;
    for (i, p) in probs.iter().enumerate() {
        if *p > 0.0 {
            last_nonzero = i;
            cumulative += p;
            if draw < cumulative {
                return i as u32;
            }
        }
    }
    last_nonzero as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GenerationConfig {
        GenerationConfig::new().with_do_sample(true)
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut rng = StdRng::seed_from_u64(1);
        let cfg = config().with_top_k(Some(1));
        for _ in 0..20 {
            assert_eq!(sample_row(&[0.1, 2.0, 1.9, -3.0], &cfg, &mut rng), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probabilities ~ [0.6, 0.3, 0.1]: top_p 0.5 keeps only the first.
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let mut rng = StdRng::seed_from_u64(7);
        let cfg = config().with_top_p(Some(0.5));
        for _ in 0..50 {
            assert_eq!(sample_row(&logits, &cfg, &mut rng), 0);
        }
        // top_p 0.85 keeps the first two, never the third.
        let cfg = config().with_top_p(Some(0.85));
        let draws: Vec<u32> = (0..200)
            .map(|_| sample_row(&logits, &cfg, &mut rng))
            .collect();
        assert!(draws.contains(&0) && draws.contains(&1) && !draws.contains(&2));
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_distribution() {
        let logits = [0.0f32, 0.0, (2.0f32).ln()]; // probabilities 1/4, 1/4, 1/2
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..4000)
                .map(|_| sample_row(&logits, &config(), &mut rng))
                .collect::<Vec<_>>()
        };
        let a = draw(3);
        assert_eq!(a, draw(3));
        let share = a.iter().filter(|&&t| t == 2).count() as f64 / a.len() as f64;
        assert!((share - 0.5).abs() < 0.03, "share of token 2: {share}");
    }

    #[test]
    fn bad_settings_are_rejected_by_name() {
        let err = config().with_temperature(0.0).validate().unwrap_err();
        assert!(err.to_string().contains("temperature"));
        let err = config().with_top_p(Some(1.5)).validate().unwrap_err();
        assert!(err.to_string().contains("top_p"));
        let err = config().with_top_k(Some(0)).validate().unwrap_err();
        assert!(err.to_string().contains("top_k"));
    }
}
