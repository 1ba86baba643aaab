//! Rows of different adapters in one batch (`Injection::stack`): prompt tuning, P-tuning (MLP and
//! LSTM), prefix tuning and P-tuning v2 of different virtual-token and prefix lengths, and rows
//! without adapter, on left-padded prompts of different lengths. Every row's logits equal the row
//! served alone with its adapter (within 1e-5), and greedy generation of the mixed batch equals
//! each row generated alone: the groundwork of serving many adapters from one base.

use std::ops::ControlFlow;
use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::DType;
use peft::core::{Adapter, CausalLm, GenerationConfig, Injection, ModelInput, PeftModel, generate};
use peft::models::AutoCausalLm;
use peft::prefix::PrefixTuningConfig;
use peft::prompt::PromptTuningConfig;
use peft::ptuning::{EncoderType, PTuningConfig};
use peft::{AutoAdapter, AutoAdapterConfig};

fn model(name: &str) -> AutoCausalLm {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/models")
        .join(name);
    AutoCausalLm::from_pretrained(dir, &Device::default(), DType::F32).unwrap()
}

/// Five adapters of every prompt-learning method, of 2 to 6 virtual tokens or prefix positions,
/// and `None` for rows on the bare base.
fn adapters(base: &AutoCausalLm) -> Vec<Option<AutoAdapter>> {
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
    base.device().seed(7);
    let mut out: Vec<Option<AutoAdapter>> = configs
        .iter()
        .map(|c| Some(c.init(base, &[]).unwrap().into_inference()))
        .collect();
    out.insert(2, None);
    out
}

fn row_injection(adapter: &Option<AutoAdapter>) -> Injection {
    adapter
        .as_ref()
        .map_or_else(Injection::default, |a| a.inject(1))
}

#[test]
fn a_mixed_batch_gives_every_row_what_it_gives_alone() {
    for name in ["qwen2-gqa-tied", "llama-mqa-sharded", "bloom-6-heads"] {
        let base = model(name);
        let device = base.device();
        let adapters = adapters(&base);
        let vocab = base.geometry().vocab_size;
        // Prompts of 3 to 8 tokens, one per row.
        let prompts: Vec<Vec<u32>> = (0..adapters.len())
            .map(|r| {
                (0..3 + r)
                    .map(|t| ((r * 37 + t * 11) % 500 + 1) as u32)
                    .collect()
            })
            .collect();
        let longest = prompts.iter().map(Vec::len).max().unwrap();

        // One forward of the whole batch, left-padded, each row with its own adapter.
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        for p in &prompts {
            ids.extend(std::iter::repeat_n(0i64, longest - p.len()));
            ids.extend(p.iter().map(|&t| i64::from(t)));
            mask.extend(std::iter::repeat_n(0i64, longest - p.len()));
            mask.extend(std::iter::repeat_n(1i64, p.len()));
        }
        let batch = prompts.len();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, longest]), &device);
        let mask = Tensor::<2, Int>::from_data(TensorData::new(mask, [batch, longest]), &device);
        let injection = Injection::stack(adapters.iter().map(row_injection).collect());
        let input = injection.into_input(base.embed_tokens(ids), Some(mask));
        let (logits, _) = base.forward(input);
        let [_, total, _] = logits.dims();

        for (row, (adapter, prompt)) in adapters.iter().zip(&prompts).enumerate() {
            let alone_ids = Tensor::<2, Int>::from_data(
                TensorData::new(
                    prompt.iter().map(|&t| i64::from(t)).collect::<Vec<_>>(),
                    [1, prompt.len()],
                ),
                &device,
            );
            let embeds = base.embed_tokens(alone_ids);
            let alone = match adapter {
                Some(a) => base.forward(a.inject(1).into_input(embeds, None)).0,
                None => base.forward(ModelInput::new(embeds)).0,
            };
            let [_, alone_len, _] = alone.dims();
            // The row's real tokens are the last of both.
            let n = prompt.len();
            let mixed = logits
                .clone()
                .slice([row..row + 1, total - n..total, 0..vocab]);
            let alone = alone.slice([0..1, alone_len - n..alone_len, 0..vocab]);
            let diff = (mixed - alone).abs().max().into_scalar::<f32>();
            assert!(
                diff <= 1e-5,
                "{name}: row {row} differs from alone by {diff}"
            );
        }

        // Greedy generation of the mixed batch equals each row generated alone.
        let config = GenerationConfig::new()
            .with_max_new_tokens(6)
            .with_pad_token_id(0);
        let injection = Injection::stack(adapters.iter().map(row_injection).collect());
        let mixed = generate(&base, &prompts, injection, &config, |_| {
            ControlFlow::Continue(())
        })
        .unwrap()
        .new_tokens;
        for (row, (adapter, prompt)) in adapters.iter().zip(&prompts).enumerate() {
            let one = std::slice::from_ref(prompt);
            let alone = match adapter {
                Some(a) => PeftModel::new(base.clone(), a.clone())
                    .generate(one, &config, |_| ControlFlow::Continue(())),
                None => generate(&base, one, Injection::default(), &config, |_| {
                    ControlFlow::Continue(())
                }),
            }
            .unwrap()
            .new_tokens;
            assert_eq!(mixed[row], alone[0], "{name}: row {row}");
        }
    }
}

/// Rows of a BitFit adapter (trained biases) share a batch with base rows through per-row bias
/// deltas: at prefill and at every cached decode step, each BitFit row's logits equal those of the
/// base with the adapter's biases loaded, and each base row's those of the bare base.
#[test]
fn bitfit_rows_carry_their_bias_deltas_through_prefill_and_decode() {
    use peft::core::{BaseShape, BiasDeltas};
    for name in ["qwen2-gqa-tied", "bloom-6-heads"] {
        let base = model(name);
        let device = base.device();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/adapters")
            .join(name)
            .join("bitfit");
        let adapter = AutoAdapter::read(&dir, &BaseShape::of(&base), &device).unwrap();
        assert!(adapter.changes_base_weights());
        let deltas = adapter
            .bias_deltas(&base)
            .expect("a read BitFit adapter has deltas");
        // The fixture's trained biases differ from the base's: the test would be empty otherwise.
        let largest = deltas
            .iter()
            .map(|(_, t)| t.clone().abs().max().into_scalar::<f32>())
            .fold(0.0f32, f32::max);
        assert!(largest > 1e-3, "{name}: largest delta {largest}");
        let (trained, _) = AutoAdapter::load(&dir, base.clone()).unwrap();
        // Rows: BitFit, base, BitFit, with prompts of 3, 5 and 4 tokens (left-padded).
        let is_bitfit = [true, false, true];
        let prompts: Vec<Vec<i64>> = [3usize, 5, 4]
            .iter()
            .enumerate()
            .map(|(r, &n)| {
                (0..n)
                    .map(|t| ((r * 31 + t * 7) % 300 + 1) as i64)
                    .collect()
            })
            .collect();
        let longest = 5;
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for p in &prompts {
            ids.extend(std::iter::repeat_n(0, longest - p.len()));
            ids.extend(p);
            mask.extend(std::iter::repeat_n(0i64, longest - p.len()));
            mask.extend(std::iter::repeat_n(1i64, p.len()));
        }
        let rows: Vec<Option<&BiasDeltas>> =
            is_bitfit.iter().map(|&b| b.then_some(&deltas)).collect();
        let batch_deltas = BiasDeltas::stack(&rows, &device);
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [3, longest]), &device);
        let mask = Tensor::<2, Int>::from_data(TensorData::new(mask, [3, longest]), &device);
        let input = ModelInput::new(base.embed_tokens(ids))
            .with_attention_mask(Some(mask))
            .with_bias_deltas(batch_deltas.clone());
        let (mut mixed_logits, mut mixed_cache) = base.forward(input);
        // Each row alone, on the model it stands for.
        let mut alone: Vec<(Tensor<3>, peft::core::KvCache)> = prompts
            .iter()
            .zip(is_bitfit)
            .map(|(p, bitfit)| {
                let model = if bitfit { &trained } else { &base };
                let ids =
                    Tensor::<2, Int>::from_data(TensorData::new(p.clone(), [1, p.len()]), &device);
                model.forward(ModelInput::new(model.embed_tokens(ids)))
            })
            .collect();
        let vocab = base.geometry().vocab_size;
        for step in 0..4 {
            let [_, len, _] = mixed_logits.dims();
            let mut next = Vec::new();
            for (row, (logits, _)) in alone.iter().enumerate() {
                let [_, alone_len, _] = logits.dims();
                let mine = mixed_logits
                    .clone()
                    .slice([row..row + 1, len - 1..len, 0..vocab]);
                let theirs = logits
                    .clone()
                    .slice([0..1, alone_len - 1..alone_len, 0..vocab]);
                let diff = (mine - theirs.clone()).abs().max().into_scalar::<f32>();
                assert!(diff <= 1e-5, "{name}: step {step}, row {row}: {diff}");
                next.push(theirs.argmax(2).reshape([1]).into_scalar::<i64>());
            }
            // One decode step of every row, the mixed batch with its deltas again.
            let ids = Tensor::<2, Int>::from_data(TensorData::new(next.clone(), [3, 1]), &device);
            let input = ModelInput::new(base.embed_tokens(ids))
                .with_cache(Some(mixed_cache))
                .with_bias_deltas(batch_deltas.clone());
            (mixed_logits, mixed_cache) = base.forward(input);
            for (row, (logits, cache)) in alone.iter_mut().enumerate() {
                let model = if is_bitfit[row] { &trained } else { &base };
                let ids =
                    Tensor::<2, Int>::from_data(TensorData::new(vec![next[row]], [1, 1]), &device);
                let input =
                    ModelInput::new(model.embed_tokens(ids)).with_cache(Some(cache.clone()));
                (*logits, *cache) = model.forward(input);
            }
        }
    }
}
