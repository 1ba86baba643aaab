//! Parity with transformers 5.23.0 on the tiny checkpoints of `fixtures/` (made by
//! `scripts/make_fixtures.py`; expected outputs are what transformers computed on them).

use std::ops::ControlFlow;
use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::DType;
use peft_core::{CausalLm, GenerationConfig, Injection, KvCache, LayerKv, ModelInput, generate};
use peft_models::{AutoCausalLm, SpecialTokens};
use serde_json::Value;

const FIXTURES: [&str; 15] = [
    "qwen2-gqa-tied",
    "qwen2-gqa-untied",
    "llama-mqa-sharded",
    "bloom-6-heads",
    "bloom-legacy-5-heads",
    "qwen2-bf16",
    "llama-f16",
    "llama-biases",
    // Issue 20: Qwen3 (q/k norms, explicit head_dim), Llama 3.x, linear and YaRN RoPE, sliding
    // windows (Qwen2 and Qwen3 on some layers, Mistral on all) shorter than the rows, the prefix
    // and the generated continuations.
    "qwen3-tied",
    "qwen3-window",
    "llama3-rope",
    "llama-linear",
    "qwen2-yarn",
    "qwen2-window",
    "mistral-window",
];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

struct Expected {
    input_ids: Vec<Vec<i64>>,
    logits: Vec<f32>,
    vocab: usize,
    meta: Value,
    /// Per-layer prefix keys/values `[layers, batch, kv_heads, p, head_dim]` and what transformers
    /// computed with them in its cache.
    prefix_key: (Vec<usize>, Vec<f32>),
    prefix_value: (Vec<usize>, Vec<f32>),
    prefix_logits: Vec<f32>,
    /// Row 1 left-padded by 2 after its prefix, as transformers computes it (`[1, seq, vocab]`);
    /// absent from the fixtures made before issue 20, whose models have no window.
    prefix_padded_logits: Option<Vec<f32>>,
}

/// Fixtures whose layers slide over a window shorter than the rows.
const WINDOWED: [&str; 3] = ["qwen3-window", "qwen2-window", "mistral-window"];

fn f32_tensor(st: &safetensors::SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    let values = t
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), values)
}

fn expected(name: &str) -> Expected {
    let bytes = std::fs::read(
        fixtures()
            .join("expected")
            .join(format!("{name}.safetensors")),
    )
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    let [b, s] = [ids.shape()[0], ids.shape()[1]];
    let flat: Vec<i64> = ids
        .data()
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let (shape, logits) = f32_tensor(&st, "logits");
    let vocab = shape[2];
    let meta = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("expected").join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    Expected {
        input_ids: (0..b).map(|r| flat[r * s..(r + 1) * s].to_vec()).collect(),
        logits,
        vocab,
        meta,
        prefix_key: f32_tensor(&st, "prefix_key"),
        prefix_value: f32_tensor(&st, "prefix_value"),
        prefix_logits: f32_tensor(&st, "prefix_logits").1,
        prefix_padded_logits: st
            .names()
            .contains(&"prefix_padded_logits")
            .then(|| f32_tensor(&st, "prefix_padded_logits").1),
    }
}

/// The fixture's prefix as one [`LayerKv`] per layer, rows `rows` of the batch.
fn prefix(exp: &Expected, rows: std::ops::Range<usize>) -> Vec<LayerKv> {
    let device = Device::default();
    let to_tensor = |(shape, values): &(Vec<usize>, Vec<f32>)| {
        Tensor::<5>::from_data(TensorData::new(values.clone(), shape.clone()), &device)
    };
    let (keys, values) = (to_tensor(&exp.prefix_key), to_tensor(&exp.prefix_value));
    let [layers, _, h, p, d] = keys.dims();
    (0..layers)
        .map(|l| {
            let pick = |t: &Tensor<5>| {
                t.clone()
                    .slice([l..l + 1, rows.clone(), 0..h, 0..p, 0..d])
                    .reshape([rows.len(), h, p, d])
            };
            LayerKv {
                key: pick(&keys),
                value: pick(&values),
            }
        })
        .collect()
}

fn load(name: &str, dtype: DType) -> AutoCausalLm {
    AutoCausalLm::from_pretrained(model_dir(name), &Device::default(), dtype)
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

fn ints(rows: &[Vec<i64>]) -> Tensor<2, Int> {
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(
        TensorData::new(flat, [rows.len(), rows[0].len()]),
        &Device::default(),
    )
}

fn logits_of(model: &AutoCausalLm, ids: &[Vec<i64>], mask: Option<&[Vec<i64>]>) -> Vec<f32> {
    let logits = model.forward_ids(ints(ids), mask.map(ints));
    logits
        .cast(DType::F32)
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits of positions `from..to` of row `row` in a `[batch, seq, vocab]` buffer.
fn rows(logits: &[f32], seq: usize, vocab: usize, row: usize, from: usize, to: usize) -> &[f32] {
    &logits[(row * seq + from) * vocab..(row * seq + to) * vocab]
}

#[test]
fn f32_logits_match_transformers_within_1e_4() {
    for name in FIXTURES {
        let exp = expected(name);
        let model = load(name, DType::F32);
        let ours = logits_of(&model, &exp.input_ids, None);
        let diff = max_abs_diff(&ours, &exp.logits);
        eprintln!("{name}: max |ours - transformers| = {diff:e}");
        assert!(diff <= 1e-4, "{name}: max |ours - transformers| = {diff}");
    }
}

#[test]
fn padded_rows_equal_the_same_rows_unpadded() {
    for name in FIXTURES {
        let exp = expected(name);
        let model = load(name, DType::F32);
        let (a, b) = (&exp.input_ids[0], &exp.input_ids[1][..7]);
        let (left_pad, right_pad) = (3, a.len() + 3 - b.len());
        // Row 0 left-padded by 3, row 1 (first 7 tokens) right-padded to the same length.
        let mut row0 = vec![0; left_pad];
        row0.extend_from_slice(a);
        let mut row1 = b.to_vec();
        row1.extend(std::iter::repeat_n(0, right_pad));
        let mut mask0 = vec![0; left_pad];
        mask0.extend(std::iter::repeat_n(1, a.len()));
        let mut mask1 = vec![1; b.len()];
        mask1.extend(std::iter::repeat_n(0, right_pad));
        let seq = row0.len();
        let padded = logits_of(&model, &[row0, row1], Some(&[mask0, mask1]));
        let alone_b = logits_of(&model, &[b.to_vec()], None);
        let v = exp.vocab;
        // Row 0 against transformers' unpadded logits, row 1 against our own unpadded run.
        let hf_row0 = rows(&exp.logits, a.len(), v, 0, 0, a.len());
        let diff0 = max_abs_diff(rows(&padded, seq, v, 0, left_pad, seq), hf_row0);
        let diff1 = max_abs_diff(rows(&padded, seq, v, 1, 0, b.len()), &alone_b);
        eprintln!(
            "{name}: left-padded vs transformers {diff0:e}, right-padded vs unpadded {diff1:e}"
        );
        assert!(
            diff0 <= 1e-4,
            "{name}: left-padded row differs from transformers' unpadded by {diff0}"
        );
        assert!(
            diff1 <= 1e-5,
            "{name}: right-padded row differs from itself unpadded by {diff1}"
        );
    }
}

#[test]
fn cached_forward_matches_uncached_within_1e_5() {
    for name in FIXTURES {
        let exp = expected(name);
        let model = load(name, DType::F32);
        let ids = &exp.input_ids;
        let seq = ids[0].len();
        let full = logits_of(&model, ids, None);
        // Left-pad row 1 by one token (masked) so the cache carries a padding mask too.
        let split = 6;
        let head: Vec<Vec<i64>> = ids.iter().map(|r| r[..split].to_vec()).collect();
        let embeds = model.embed_tokens(ints(&head));
        let out = model.forward_hidden(ModelInput::new(embeds));
        let mut cache: KvCache = out.cache;
        let mut pieces = vec![model.lm_head(out.hidden_states)];
        // Then one token at a time.
        for t in split..seq {
            let step: Vec<Vec<i64>> = ids.iter().map(|r| vec![r[t]]).collect();
            let (logits, next) = model
                .forward(ModelInput::new(model.embed_tokens(ints(&step))).with_cache(Some(cache)));
            cache = next;
            pieces.push(logits);
        }
        assert_eq!(cache.len(), seq);
        let cached: Vec<f32> = Tensor::cat(pieces, 1)
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        let diff = max_abs_diff(&cached, &full);
        eprintln!("{name}: cached vs uncached {diff:e}");
        assert!(diff <= 1e-5, "{name}: cached vs uncached differ by {diff}");
    }
}

#[test]
fn cache_keeps_the_padding_mask_of_left_padded_prompts() {
    let name = "qwen2-gqa-untied";
    let exp = expected(name);
    let model = load(name, DType::F32);
    let a = exp.input_ids[0].clone();
    let v = exp.vocab;
    // Prefill a left-padded prompt (first 8 tokens after 2 pads), then decode the last 3 tokens.
    let mut row = vec![0, 0];
    row.extend_from_slice(&a[..8]);
    let mask = vec![0, 0, 1, 1, 1, 1, 1, 1, 1, 1];
    let embeds = model.embed_tokens(ints(&[row]));
    let (_, mut cache) =
        model.forward(ModelInput::new(embeds).with_attention_mask(Some(ints(&[mask]))));
    let mut steps = Vec::new();
    for &t in &a[8..] {
        let (logits, next) = model
            .forward(ModelInput::new(model.embed_tokens(ints(&[vec![t]]))).with_cache(Some(cache)));
        cache = next;
        steps.extend(logits.into_data().try_into_vec_as::<f32>().unwrap());
    }
    let diff = max_abs_diff(&steps, rows(&exp.logits, a.len(), v, 0, 8, a.len()));
    assert!(
        diff <= 1e-4,
        "decode after a left-padded prefill differs from transformers by {diff}"
    );
}

fn prompts(meta: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(meta["prompt_ids"].clone()).unwrap()
}

#[test]
fn greedy_generation_is_token_identical_to_transformers() {
    for name in FIXTURES {
        let exp = expected(name);
        let model = load(name, DType::F32);
        let special = SpecialTokens::from_dir(model_dir(name)).unwrap();
        let config = GenerationConfig::new()
            .with_max_new_tokens(exp.meta["max_new_tokens"].as_u64().unwrap() as usize)
            .with_eos_token_ids(special.eos_token_ids)
            .with_pad_token_id(special.pad_token_id);
        let prompts = prompts(&exp.meta);
        let single: Vec<Vec<u32>> =
            serde_json::from_value(exp.meta["greedy_single"].clone()).unwrap();
        let batched: Vec<Vec<u32>> =
            serde_json::from_value(exp.meta["greedy_batched"].clone()).unwrap();
        for (prompt, want) in prompts.iter().zip(&single) {
            let out = generate(
                &model,
                std::slice::from_ref(prompt),
                Injection::default(),
                &config,
                |_| ControlFlow::Continue(()),
            )
            .unwrap();
            assert_eq!(&out.new_tokens[0], want, "{name}: greedy on {prompt:?}");
        }
        let mut streamed: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        let out = generate(&model, &prompts, Injection::default(), &config, |step| {
            for (row, token) in step.tokens.iter().enumerate() {
                streamed[row].extend(token);
            }
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(
            out.new_tokens, batched,
            "{name}: batched left-padded greedy"
        );
        assert_eq!(
            streamed, out.new_tokens,
            "{name}: the callback saw every token"
        );
    }
}

#[test]
fn generation_stops_at_eos_and_on_request() {
    let name = "qwen2-gqa-tied";
    let exp = expected(name);
    let model = load(name, DType::F32);
    let prompt = prompts(&exp.meta)[0].clone();
    let greedy: Vec<Vec<u32>> = serde_json::from_value(exp.meta["greedy_single"].clone()).unwrap();
    // Declare the 4th greedy token an EOS: generation must stop right after it, keeping it.
    let eos = greedy[0][3];
    let config = GenerationConfig::new()
        .with_max_new_tokens(16)
        .with_eos_token_ids(vec![eos]);
    let out = generate(
        &model,
        std::slice::from_ref(&prompt),
        Injection::default(),
        &config,
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    let first = greedy[0].iter().position(|&t| t == eos).unwrap();
    assert_eq!(out.new_tokens[0], greedy[0][..=first].to_vec());
    // A callback that breaks after 2 steps ends generation there.
    let config = GenerationConfig::new().with_max_new_tokens(16);
    let out = generate(&model, &[prompt], Injection::default(), &config, |step| {
        if step.step == 1 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(out.new_tokens[0], greedy[0][..2].to_vec());
}

#[test]
fn sampling_is_reproducible_per_seed_and_batched_rows_match_single_rows() {
    let name = "llama-mqa-sharded";
    let exp = expected(name);
    let model = load(name, DType::F32);
    let prompts = prompts(&exp.meta);
    let sample = |seed, top_p, prompts: &[Vec<u32>]| {
        let config = GenerationConfig::new()
            .with_max_new_tokens(12)
            .with_do_sample(true)
            .with_temperature(0.8)
            .with_top_k(Some(50))
            .with_top_p(top_p)
            .with_seed(seed);
        generate(&model, prompts, Injection::default(), &config, |_| {
            ControlFlow::Continue(())
        })
        .unwrap()
        .new_tokens
    };
    let a = sample(11, Some(0.9), &prompts);
    assert_eq!(a, sample(11, Some(0.9), &prompts), "same seed, same tokens");
    assert_ne!(
        a,
        sample(12, Some(0.9), &prompts),
        "another seed, other tokens"
    );
    assert!(a.iter().all(|row| row.len() == 12));
    // top_p that keeps only the most likely token is greedy.
    let greedy: Vec<Vec<u32>> = serde_json::from_value(exp.meta["greedy_batched"].clone()).unwrap();
    let nucleus = sample(5, Some(1e-9), &prompts);
    for (row, want) in nucleus.iter().zip(&greedy) {
        assert_eq!(&row[..], &want[..12.min(want.len())]);
    }
}

#[test]
fn bf16_checkpoint_loads_in_f32_exactly_and_runs_in_bf16() {
    let name = "qwen2-bf16";
    let exp = expected(name);
    // F32 compute on bf16 weights: parity is covered by the f32 test (upcasting is exact).
    let model = load(name, DType::BF16);
    let ours = logits_of(&model, &exp.input_ids, None);
    assert!(ours.iter().all(|x| x.is_finite()));
    // bf16 keeps 8 bits of mantissa (relative step 2^-8): per-op rounding of ~0.4% compounds
    // over two layers, so compare against the scale of the logits, not absolutely.
    let scale = exp.logits.iter().map(|x| x.abs()).sum::<f32>() / exp.logits.len() as f32;
    let mean_err = ours
        .iter()
        .zip(&exp.logits)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / ours.len() as f32;
    eprintln!("bf16 compute: mean |error| {mean_err:e}, mean |logit| {scale:e}");
    assert!(
        mean_err <= 0.02 * scale,
        "bf16 mean error {mean_err} vs logit scale {scale}"
    );
    // f16 compute loads too.
    let model = load(name, DType::F16);
    assert!(
        logits_of(&model, &exp.input_ids, None)
            .iter()
            .all(|x| x.is_finite())
    );
}

#[test]
fn prefix_key_values_match_transformers_past_key_values() {
    for name in FIXTURES {
        let exp = expected(name);
        let model = load(name, DType::F32);
        let v = exp.vocab;
        let seq = exp.input_ids[0].len();
        // Whole batch, no padding: transformers with the prefix in its DynamicCache.
        let input = ModelInput::new(model.embed_tokens(ints(&exp.input_ids)))
            .with_prefix(Some(prefix(&exp, 0..2)));
        let (logits, cache) = model.forward(input);
        assert_eq!(
            cache.len(),
            3 + seq,
            "{name}: the cache starts with the prefix"
        );
        let ours: Vec<f32> = logits.into_data().try_into_vec_as::<f32>().unwrap();
        let diff = max_abs_diff(&ours, &exp.prefix_logits);
        eprintln!("{name}: prefix max |ours - transformers| = {diff:e}");
        assert!(
            diff <= 1e-4,
            "{name}: prefix logits differ from transformers by {diff}"
        );

        // Row 1 left-padded by 2: positions stay p + (real tokens before), so it matches the row
        // unpadded; with a window, which counts cache slots (padding included, as transformers
        // counts them), it matches what transformers computes for the padded row.
        let mut row = vec![0, 0];
        row.extend(&exp.input_ids[1]);
        let mut mask = vec![0, 0];
        mask.extend(std::iter::repeat_n(1, seq));
        let input = ModelInput::new(model.embed_tokens(ints(&[row])))
            .with_attention_mask(Some(ints(&[mask])))
            .with_prefix(Some(prefix(&exp, 1..2)));
        let (logits, _) = model.forward(input);
        let ours: Vec<f32> = logits.into_data().try_into_vec_as::<f32>().unwrap();
        let reference = match &exp.prefix_padded_logits {
            Some(padded) => &padded[..],
            None => rows(&exp.prefix_logits, seq, v, 1, 0, seq),
        };
        assert!(
            exp.prefix_padded_logits.is_some() || !WINDOWED.contains(&name),
            "{name}: a windowed fixture needs transformers' padded prefix row"
        );
        let diff = max_abs_diff(&ours[2 * v..], reference);
        assert!(
            diff <= 1e-4,
            "{name}: left-padded prefix row differs by {diff}"
        );

        // Prefill with the prefix, then decode token by token from the cache alone.
        let split = 5;
        let head: Vec<Vec<i64>> = exp.input_ids.iter().map(|r| r[..split].to_vec()).collect();
        let input =
            ModelInput::new(model.embed_tokens(ints(&head))).with_prefix(Some(prefix(&exp, 0..2)));
        let (first, mut cache) = model.forward(input);
        let mut pieces = vec![first];
        for t in split..seq {
            let step: Vec<Vec<i64>> = exp.input_ids.iter().map(|r| vec![r[t]]).collect();
            let (logits, next) = model
                .forward(ModelInput::new(model.embed_tokens(ints(&step))).with_cache(Some(cache)));
            cache = next;
            pieces.push(logits);
        }
        let ours: Vec<f32> = Tensor::cat(pieces, 1)
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        let diff = max_abs_diff(&ours, &exp.prefix_logits);
        assert!(
            diff <= 1e-4,
            "{name}: prefix + cached decoding differs by {diff}"
        );
    }
}

#[test]
fn injected_virtual_embeddings_act_like_the_prompt_tokens_they_embed() {
    // Virtual embeddings that are exactly the embeddings of each prompt's first two tokens must
    // give transformers' greedy continuation of the whole prompt (left padding included).
    for name in ["qwen2-gqa-untied", "bloom-6-heads", "llama-mqa-sharded"] {
        let exp = expected(name);
        let model = load(name, DType::F32);
        let prompts = prompts(&exp.meta);
        let heads: Vec<Vec<i64>> = prompts
            .iter()
            .map(|p| p[..2].iter().map(|&t| t as i64).collect())
            .collect();
        let tails: Vec<Vec<u32>> = prompts.iter().map(|p| p[2..].to_vec()).collect();
        let injection = Injection {
            virtual_embeds: Some(model.embed_tokens(ints(&heads))),
            ..Injection::default()
        };
        let special = SpecialTokens::from_dir(model_dir(name)).unwrap();
        let config = GenerationConfig::new()
            .with_max_new_tokens(16)
            .with_eos_token_ids(special.eos_token_ids)
            .with_pad_token_id(special.pad_token_id);
        let out = generate(&model, &tails, injection, &config, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
        let batched: Vec<Vec<u32>> =
            serde_json::from_value(exp.meta["greedy_batched"].clone()).unwrap();
        assert_eq!(out.new_tokens, batched, "{name}");
    }
}

#[test]
fn injected_prefix_is_applied_at_prefill() {
    for name in ["qwen2-gqa-tied", "bloom-legacy-5-heads"] {
        let exp = expected(name);
        let model = load(name, DType::F32);
        let v = exp.vocab;
        let seq = exp.input_ids[0].len();
        let prompts: Vec<Vec<u32>> = exp
            .input_ids
            .iter()
            .map(|r| r.iter().map(|&t| t as u32).collect())
            .collect();
        let injection = Injection::prefix(prefix(&exp, 0..2));
        let config = GenerationConfig::new().with_max_new_tokens(1);
        let out = generate(&model, &prompts, injection, &config, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
        for (row, tokens) in out.new_tokens.iter().enumerate() {
            let last = rows(&exp.prefix_logits, seq, v, row, seq - 1, seq);
            let argmax = last
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            assert_eq!(tokens, &vec![argmax as u32], "{name}, row {row}");
        }
    }
}

#[test]
fn generate_rejects_inputs_that_do_not_fit() {
    let model = load("qwen2-gqa-tied", DType::F32);
    let config = GenerationConfig::new().with_max_new_tokens(2);
    let run = |prompts: &[Vec<u32>], injection| {
        generate(&model, prompts, injection, &config, |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err()
        .to_string()
    };
    assert!(run(&[], Injection::default()).contains("need at least one prompt"));
    assert!(run(&[vec![1], vec![]], Injection::default()).contains("each of at least one token"));
    assert!(run(&[vec![1, 999]], Injection::default()).contains("token id 999"));
    let wrong_width = Injection {
        virtual_embeds: Some(Tensor::zeros([1, 2, 7], &Device::default())),
        ..Injection::default()
    };
    assert!(
        run(&[vec![1]], wrong_width).contains("virtual_embeds: is [1, _, 7], expected [1, _, 64]")
    );
}

#[test]
fn parameter_shapes_from_the_config_name_every_parameter_of_the_model() {
    use std::collections::BTreeMap;
    for name in FIXTURES {
        let config =
            peft_models::AutoConfig::from_file(model_dir(name).join("config.json")).unwrap();
        let from_config: BTreeMap<String, Vec<usize>> =
            config.parameter_shapes().into_iter().collect();
        let model = load(name, DType::F32);
        let built: BTreeMap<String, Vec<usize>> = peft_core::params::param_infos(&model)
            .into_iter()
            .map(|p| (p.name, p.shape))
            .collect();
        assert_eq!(
            from_config, built,
            "{name}: config-derived shapes vs the built model's HF names"
        );
        assert_eq!(
            from_config
                .values()
                .map(|s| s.iter().product::<usize>())
                .sum::<usize>(),
            model.num_params(),
            "{name}"
        );
    }
}

#[test]
fn dynamic_rope_past_the_configured_length_matches_transformers_on_a_fresh_model() {
    // max_position_embeddings 8, rows of 11 tokens (and 14 with the prefix): the NTK base grows
    // with the longest row of the forward, as transformers' `dynamic_frequency_update` does on a
    // model that has seen nothing longer. (Its later outputs depend on what it saw before, so
    // padding, caching and generation are not compared.)
    let name = "qwen2-dynamic";
    let exp = expected(name);
    let model = load(name, DType::F32);
    assert_eq!(
        model.geometry().max_positions,
        None,
        "dynamic RoPE has no length limit"
    );
    let ours = logits_of(&model, &exp.input_ids, None);
    let diff = max_abs_diff(&ours, &exp.logits);
    assert!(
        diff <= 1e-4,
        "{name}: logits differ from transformers by {diff}"
    );
    let input = ModelInput::new(model.embed_tokens(ints(&exp.input_ids)))
        .with_prefix(Some(prefix(&exp, 0..2)));
    let ours: Vec<f32> = model
        .forward(input)
        .0
        .into_data()
        .try_into_vec_as()
        .unwrap();
    let diff = max_abs_diff(&ours, &exp.prefix_logits);
    assert!(
        diff <= 1e-4,
        "{name}: prefix logits differ from transformers by {diff}"
    );
    // Within the configured length it is plain RoPE: the first 8 positions equal the default.
    let plain = peft_models::Rope::new(10000.0, 16).inv_freq(0);
    let peft_models::AutoConfig::Qwen2(config) =
        peft_models::AutoConfig::from_file(model_dir(name).join("config.json")).unwrap()
    else {
        panic!("qwen2")
    };
    assert_eq!(config.rope().inv_freq(7), plain);
    assert_ne!(config.rope().inv_freq(10).0, plain.0);
}
