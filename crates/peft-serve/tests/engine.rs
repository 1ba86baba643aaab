//! The engine decodes requests of different adapters (every method, BitFit rows through their
//! bias deltas, prompt-learning ones of different lengths, and none) in shared batches, rows
//! joining and leaving between steps, and every request gets exactly the tokens it gets generated
//! alone, from logits within 1e-5 of its own at every step.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::DType;
use peft::core::{
    Adapter, BaseShape, CausalLm, GenerationConfig, Injection, ModelInput, PeftModel, generate,
};
use peft::models::AutoCausalLm;
use peft::prefix::PrefixTuningConfig;
use peft::prompt::PromptTuningConfig;
use peft::ptuning::{EncoderType, PTuningConfig};
use peft::{AutoAdapter, AutoAdapterConfig};
use peft_serve::{Engine, EngineError, Event, Request};

fn model(name: &str) -> AutoCausalLm {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name);
    AutoCausalLm::from_pretrained(dir, &Device::default(), DType::F32).unwrap()
}

fn bitfit_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/adapters")
        .join(name)
        .join("bitfit")
}

/// Every method, BitFit (the fixture's trained biases) included, and `None` for base rows.
fn adapters(base: &AutoCausalLm, name: &str) -> Vec<Option<Arc<AutoAdapter>>> {
    let g = base.geometry();
    let configs = [
        AutoAdapterConfig::PromptTuning(PromptTuningConfig::new(2, g.hidden_size)),
        AutoAdapterConfig::PTuning(PTuningConfig::for_model(5, &g)),
        AutoAdapterConfig::PTuning(
            PTuningConfig::for_model(3, &g).with_encoder_reparameterization_type(EncoderType::Lstm),
        ),
        AutoAdapterConfig::PrefixTuning(
            PrefixTuningConfig::for_model(3, &g).with_prefix_projection(true),
        ),
        AutoAdapterConfig::PrefixTuning(PrefixTuningConfig::for_model(6, &g)),
    ];
    base.device().seed(11);
    let mut out: Vec<Option<Arc<AutoAdapter>>> = configs
        .iter()
        .map(|c| Some(Arc::new(c.init(base, &[]).unwrap().into_inference())))
        .collect();
    let bitfit = AutoAdapter::read(&bitfit_dir(name), &BaseShape::of(base), &base.device());
    out.push(Some(Arc::new(bitfit.unwrap())));
    out.push(None);
    out
}

/// The tokens of `request` generated alone: with its adapter, a BitFit adapter's biases loaded
/// into the base.
fn alone(base: &AutoCausalLm, name: &str, request: &Request) -> Vec<u32> {
    let config = &request.config;
    let one = std::slice::from_ref(&request.prompt);
    match &request.adapter {
        Some(a) if a.changes_base_weights() => {
            let (trained, a) = AutoAdapter::load(&bitfit_dir(name), base.clone()).unwrap();
            PeftModel::new(trained, a).generate(one, config, |_| ControlFlow::Continue(()))
        }
        Some(a) => PeftModel::new(base.clone(), (**a).clone())
            .generate(one, config, |_| ControlFlow::Continue(())),
        None => generate(base, one, Injection::default(), config, |_| {
            ControlFlow::Continue(())
        }),
    }
    .unwrap()
    .new_tokens
    .remove(0)
}

/// The logits behind each of `tokens` (the continuation of `request`), computed with the request
/// alone: prefill, then one cached step per token, on the model its adapter stands for.
fn alone_logits(
    base: &AutoCausalLm,
    name: &str,
    request: &Request,
    tokens: &[u32],
) -> Vec<Vec<f32>> {
    let device = base.device();
    let (model, injection) = match &request.adapter {
        Some(a) if a.changes_base_weights() => (
            AutoAdapter::load(&bitfit_dir(name), base.clone())
                .unwrap()
                .0,
            Injection::default(),
        ),
        Some(a) => (base.clone(), a.inject(1)),
        None => (base.clone(), Injection::default()),
    };
    let last = |logits: Tensor<3>| {
        let [_, s, v] = logits.dims();
        logits
            .slice([0..1, s - 1..s, 0..v])
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let ids: Vec<i64> = request.prompt.iter().map(|&t| i64::from(t)).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, request.prompt.len()]), &device);
    let (logits, mut cache) = model.forward(injection.into_input(model.embed_tokens(ids), None));
    let mut out = vec![last(logits)];
    for &token in &tokens[..tokens.len() - 1] {
        let ids =
            Tensor::<2, Int>::from_data(TensorData::new(vec![i64::from(token)], [1, 1]), &device);
        let (logits, next) =
            model.forward(ModelInput::new(model.embed_tokens(ids)).with_cache(Some(cache)));
        cache = next;
        out.push(last(logits));
    }
    out
}

#[test]
fn continuous_batches_of_mixed_adapters_give_each_request_its_tokens_alone() {
    for name in ["qwen2-gqa-tied", "bloom-6-heads"] {
        let base = model(name);
        let adapters = adapters(&base, name);
        // 14 requests: prompts of 2-9 tokens, 2-7 new tokens, adapters in turn, every third
        // sampled (temperature, top-p, its own seed); one stops at a token it produces (its EOS
        // is its own first greedy token).
        let mut requests: Vec<Request> = (0..14u64)
            .map(|i| {
                let mut config =
                    GenerationConfig::new().with_max_new_tokens(2 + (i as usize * 5) % 6);
                if i % 3 == 2 {
                    config = config
                        .with_do_sample(true)
                        .with_temperature(0.9)
                        .with_top_p(Some(0.95))
                        .with_seed(100 + i);
                }
                Request {
                    id: i,
                    prompt: (0..2 + (i as usize * 3) % 8)
                        .map(|t| ((i as usize * 41 + t * 13) % 500 + 1) as u32)
                        .collect(),
                    adapter: adapters[i as usize % adapters.len()].clone(),
                    config,
                }
            })
            .collect();
        let first = alone(&base, name, &requests[4])[0];
        requests[4].config.eos_token_ids = vec![first];
        let expected: HashMap<u64, Vec<u32>> = requests
            .iter()
            .map(|r| (r.id, alone(&base, name, r)))
            .collect();
        assert_eq!(expected[&4], vec![first]);

        // At most 3 rows at once; half the requests arrive after the batch has started.
        let mut engine = Engine::new(base.clone(), 3, 16).with_logits(true);
        let (early, late) = requests.split_at(7);
        for r in early {
            engine.submit(r.clone()).unwrap();
        }
        let mut got: HashMap<u64, Vec<u32>> = HashMap::new();
        let mut got_logits: HashMap<u64, Vec<Vec<f32>>> = HashMap::new();
        let mut finished: HashMap<u64, Vec<u32>> = HashMap::new();
        let mut steps = 0;
        let mut most = 0;
        while !engine.is_idle() || steps < 3 {
            if steps == 2 {
                for r in late {
                    engine.submit(r.clone()).unwrap();
                }
            }
            for event in engine.step() {
                match event {
                    Event::Token { id, token, logits } => {
                        got.entry(id).or_default().push(token);
                        got_logits.entry(id).or_default().push(logits.unwrap());
                    }
                    Event::Finished { id, tokens } => {
                        assert!(finished.insert(id, tokens).is_none(), "{id} twice");
                    }
                }
            }
            most = most.max(engine.running());
            steps += 1;
            assert!(steps < 200, "{name}: the engine does not finish");
        }
        assert_eq!(most, 3, "{name}: the batch never filled");
        for r in &requests {
            assert_eq!(
                got[&r.id], expected[&r.id],
                "{name}: request {} streamed",
                r.id
            );
            assert_eq!(finished[&r.id], expected[&r.id], "{name}: request {}", r.id);
            // At every step, the logits behind the token equal the request's alone.
            let alone = alone_logits(&base, name, r, &expected[&r.id]);
            for (step, (mixed, alone)) in got_logits[&r.id].iter().zip(&alone).enumerate() {
                let diff = mixed
                    .iter()
                    .zip(alone)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    diff <= 1e-5,
                    "{name}: request {}, step {step}: {diff}",
                    r.id
                );
            }
            assert_eq!(got_logits[&r.id].len(), alone.len());
        }
    }
}

#[test]
fn bounded_queue_invalid_requests_and_cancellation() {
    let base = model("qwen2-gqa-tied");
    let mut engine = Engine::new(base, 1, 2);
    let request = |id: u64, prompt: Vec<u32>| Request {
        id,
        prompt,
        adapter: None,
        config: GenerationConfig::new().with_max_new_tokens(4),
    };
    engine.submit(request(1, vec![1, 2])).unwrap();
    engine.submit(request(2, vec![3])).unwrap();
    let err = engine.submit(request(3, vec![4])).unwrap_err();
    assert!(
        matches!(err, EngineError::QueueFull { max_queue: 2 }),
        "{err}"
    );
    engine.cancel(2);
    let err = engine.submit(request(4, vec![])).unwrap_err();
    assert!(err.to_string().starts_with("request 4: "), "{err}");
    let err = engine.submit(request(5, vec![9999])).unwrap_err();
    assert!(err.to_string().contains("9999"), "{err}");
    let err = engine.submit(request(6, vec![1; 200])).unwrap_err();
    assert!(err.to_string().starts_with("request 6: "), "{err}");
    let mut bad = request(7, vec![1]);
    bad.config = bad.config.with_do_sample(true).with_top_p(Some(2.0));
    let err = engine.submit(bad).unwrap_err();
    assert!(err.to_string().contains("top_p"), "{err}");
    // Request 1 runs; cancelled mid-way, it frees its row and emits nothing more.
    let events = engine.step();
    assert_eq!(events.len(), 1);
    engine.cancel(1);
    assert!(engine.is_idle());
    assert!(engine.step().is_empty());
}
