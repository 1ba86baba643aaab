//! Every method against HF PEFT 0.21.2 (BitFit: against PyTorch with only biases trainable), on
//! Qwen2 GQA, Llama, BLOOM, Qwen3, Llama 3.x and Mistral: PEFT's own files, the same batch, the same logits, loss, SGD step
//! and greedy generation; our files back to bit-identical state. Fixtures from
//! `scripts/make_adapter_fixtures.py`.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::optim::{GradientsParams, SgdConfig};
use burn::prelude::*;
use burn::tensor::DType;
use peft::AutoAdapter;
use peft::core::adapter_config::ADAPTER_CONFIG;
use peft::core::adapter_file::{ADAPTER_ENCODER, ADAPTER_WEIGHTS};
use peft::core::{Adapter, GenerationConfig, PeftModel};
use peft::models::AutoCausalLm;

const PROMPT_METHODS: [&str; 4] = [
    "p-tuning-mlp",
    "p-tuning-lstm",
    "prefix-tuning",
    "p-tuning-v2",
];
const PROMPT_MODELS: [&str; 6] = [
    "qwen2-gqa-tied",
    "llama-mqa-sharded",
    "bloom-6-heads",
    // Issue 20: Qwen3 (explicit head_dim), Llama 3.x RoPE, Mistral (sliding window of 5, shorter
    // than the virtual tokens plus the rows).
    "qwen3-tied",
    "llama3-rope",
    "mistral-window",
];
/// The models `prefix_from_text_equals_peft_initialize_kv_prefix_from_text` has PEFT's prefix for.
const PREFIX_TEXT_MODELS: [&str; 3] = ["qwen2-gqa-tied", "llama-mqa-sharded", "bloom-6-heads"];
/// Llama 3 and Mistral checkpoints have no biases: Qwen3 with `attention_bias` stands for the new
/// families.
const BITFIT_MODELS: [&str; 4] = [
    "qwen2-gqa-tied",
    "llama-biases",
    "bloom-6-heads",
    "qwen3-window",
];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The fixture adapter directory of `method` on `model`.
fn adapter_dir(model: &str, method: &str) -> PathBuf {
    fixtures().join("adapters").join(model).join(method)
}

/// Every (model, method) pair with a PEFT (or PyTorch) fixture.
fn cases() -> Vec<(&'static str, &'static str)> {
    let mut cases: Vec<_> = PROMPT_MODELS
        .iter()
        .flat_map(|m| PROMPT_METHODS.iter().map(move |a| (*m, *a)))
        .collect();
    cases.extend(BITFIT_MODELS.iter().map(|m| (*m, "bitfit")));
    cases
}

struct Expected(HashMap<String, (Vec<usize>, TensorData)>);

impl Expected {
    fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        Self(
            st.tensors()
                .into_iter()
                .map(|(name, view)| {
                    let dtype = match view.dtype() {
                        safetensors::Dtype::F32 => DType::F32,
                        safetensors::Dtype::I64 => DType::I64,
                        other => panic!("{name}: {other:?}"),
                    };
                    let shape = view.shape().to_vec();
                    let data =
                        TensorData::from_bytes_vec(view.data().to_vec(), shape.clone(), dtype);
                    (name, (shape, data))
                })
                .collect(),
        )
    }

    fn floats(&self, name: &str) -> Vec<f32> {
        self.0[name].1.clone().try_into_vec_as().unwrap()
    }

    fn rows(&self, name: &str) -> Vec<Vec<i64>> {
        let (shape, data) = &self.0[name];
        let flat: Vec<i64> = data.clone().try_into_vec_as().unwrap();
        flat.chunks(shape[1]).map(<[i64]>::to_vec).collect()
    }

    fn ints(&self, name: &str, device: &Device) -> Tensor<2, Int> {
        Tensor::from_data(self.0[name].1.clone(), device)
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn load(model: &str, adapter_dir: &Path, device: &Device) -> PeftModel<AutoCausalLm, AutoAdapter> {
    let base =
        AutoCausalLm::from_pretrained(fixtures().join("models").join(model), device, DType::F32)
            .unwrap();
    PeftModel::from_pretrained(base, adapter_dir).unwrap()
}

/// Max |diff| between our logits and PEFT's over the real (mask 1) positions.
fn logits_diff(
    peft: &PeftModel<AutoCausalLm, AutoAdapter>,
    expected: &Expected,
    device: &Device,
) -> f32 {
    let mask = expected.ints("attention_mask", device);
    let ours = values(peft.forward(expected.ints("input_ids", device), Some(mask.clone())));
    let theirs = expected.floats("logits");
    let real: Vec<i64> = mask.into_data().try_into_vec_as().unwrap();
    let vocab = ours.len() / real.len();
    real.iter()
        .enumerate()
        .filter(|(_, m)| **m == 1)
        .map(|(i, _)| {
            max_diff(
                &ours[i * vocab..(i + 1) * vocab],
                &theirs[i * vocab..(i + 1) * vocab],
            )
        })
        .fold(0.0, f32::max)
}

/// The trainable tensors by the names the fixture uses after `after_sgd.`: PEFT's encoder names, or
/// BitFit's Hugging Face bias names.
fn trainable_tensors(peft: &PeftModel<AutoCausalLm, AutoAdapter>) -> Vec<(String, TensorData)> {
    match &peft.adapter {
        AutoAdapter::PTuning(a) => a.encoder_tensors().unwrap(),
        AutoAdapter::PrefixTuning(a) => a.encoder_tensors().unwrap_or_else(|| {
            vec![(
                "embedding.weight".into(),
                a.embedding.weight.val().into_data(),
            )]
        }),
        AutoAdapter::BitFit(a) => a.biases(&peft.base),
        AutoAdapter::PromptTuning(_) => unreachable!("covered by peft-prompt's tests"),
    }
}

fn prompt_embeddings(adapter: &AutoAdapter) -> Option<Vec<f32>> {
    match adapter {
        AutoAdapter::PTuning(a) => Some(values(a.prompt_embeddings())),
        AutoAdapter::PrefixTuning(a) => Some(values(a.prompt_embeddings())),
        _ => None,
    }
}

#[test]
fn every_method_matches_peft_forward_loss_and_sgd_step() {
    for (model, method) in cases() {
        let device = Device::default().autodiff();
        let case = format!("{model}/{method}");
        let expected = Expected::read(
            &fixtures().join(format!("expected/adapters/{model}-{method}.safetensors")),
        );
        let peft = load(model, &adapter_dir(model, method), &device);

        let diff = logits_diff(&peft, &expected, &device);
        eprintln!("{case}: logits max diff {diff:e}");
        assert!(diff <= 1e-4, "{case}: logits differ from PEFT by {diff}");

        let loss = peft.loss(
            expected.ints("input_ids", &device),
            Some(expected.ints("attention_mask", &device)),
            expected.ints("labels", &device),
        );
        let (ours, theirs) = (values(loss.clone())[0], expected.floats("loss")[0]);
        assert!(
            (ours - theirs).abs() <= 1e-5,
            "{case}: loss {ours} vs PEFT {theirs}"
        );

        // One plain SGD step (lr 0.1) on what trains; nothing else gets a gradient.
        let grads = GradientsParams::from_grads(loss.backward(), &peft);
        let trainable = trainable_tensors(&peft);
        assert_eq!(
            grads.len(),
            trainable.len(),
            "{case}: exactly the adapter's tensors train"
        );
        let stepped = SgdConfig::new().init().step(0.1, peft, grads);
        let mut worst = 0.0f32;
        for (name, data) in trainable_tensors(&stepped) {
            let ours: Vec<f32> = data.try_into_vec_as().unwrap();
            let theirs = expected.floats(&format!("after_sgd.{name}"));
            worst = worst.max(max_diff(&ours, &theirs));
        }
        if let Some(ours) = prompt_embeddings(&stepped.adapter) {
            worst = worst.max(max_diff(
                &ours,
                &expected.floats("prompt_embeddings_after_sgd"),
            ));
        }
        eprintln!("{case}: after one SGD step max diff {worst:e}");
        assert!(
            worst <= 1e-5,
            "{case}: updated weights differ from PEFT by {worst}"
        );
        // The step was not vacuous.
        let moved = trainable
            .iter()
            .map(|(name, before)| {
                let before: Vec<f32> = before.clone().try_into_vec_as().unwrap();
                max_diff(&before, &expected.floats(&format!("after_sgd.{name}")))
            })
            .fold(0.0f32, f32::max);
        assert!(
            moved > 1e-4,
            "{case}: the step barely moved anything ({moved})"
        );
    }
}

#[test]
fn peft_inference_files_alone_give_peft_logits() {
    // PEFT's directory without our encoder checkpoint: what `PeftModel.save_pretrained` writes.
    for (model, method) in cases().into_iter().filter(|(_, m)| *m != "bitfit") {
        let device = Device::default();
        let case = format!("{model}/{method}");
        let dir = tempfile::tempdir().unwrap();
        let source = fixtures().join(format!("adapters/{model}/{method}"));
        for name in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
            std::fs::copy(source.join(name), dir.path().join(name)).unwrap();
        }
        let peft = load(model, dir.path(), &device);
        let expected = Expected::read(
            &fixtures().join(format!("expected/adapters/{model}-{method}.safetensors")),
        );
        let diff = logits_diff(&peft, &expected, &device);
        eprintln!("{case}: inference form, logits max diff {diff:e}");
        assert!(diff <= 1e-4, "{case}: {diff}");
    }
}

#[test]
fn greedy_generation_is_token_identical_to_peft() {
    let mut all = cases();
    all.extend(PROMPT_MODELS.iter().map(|m| (*m, "prompt-tuning")));
    for (model, method) in all {
        let device = Device::default();
        let case = format!("{model}/{method}");
        let peft = load(model, &adapter_dir(model, method), &device);
        let file = if method == "prompt-tuning" {
            format!("expected/adapters/{model}-prompt-tuning-greedy.safetensors")
        } else {
            format!("expected/adapters/{model}-{method}.safetensors")
        };
        let expected = Expected::read(&fixtures().join(file));
        let theirs = expected.rows("greedy_tokens");
        let config = GenerationConfig::new().with_max_new_tokens(theirs[0].len());
        for (prompt, theirs) in expected.rows("greedy_prompts").iter().zip(&theirs) {
            let prompt: Vec<u32> = prompt.iter().map(|&t| t as u32).collect();
            let out = peft
                .generate(std::slice::from_ref(&prompt), &config, |_| {
                    ControlFlow::Continue(())
                })
                .unwrap();
            let ours: Vec<i64> = out.new_tokens[0].iter().map(|&t| i64::from(t)).collect();
            assert_eq!(&ours, theirs, "{case}: greedy continuation of {prompt:?}");
        }
    }
}

#[test]
fn padded_rows_equal_the_same_rows_unpadded() {
    for (model, method) in cases() {
        let device = Device::default();
        let case = format!("{model}/{method}");
        let peft = load(model, &adapter_dir(model, method), &device);
        let expected = Expected::read(
            &fixtures().join(format!("expected/adapters/{model}-{method}.safetensors")),
        );
        let row = expected.rows("input_ids")[0][..6].to_vec();
        let ids = |rows: Vec<Vec<i64>>| {
            let shape = [rows.len(), rows[0].len()];
            Tensor::<2, Int>::from_data(TensorData::new(rows.concat(), shape), &device)
        };
        let alone = values(peft.forward(ids(vec![row.clone()]), None));
        let vocab = alone.len() / row.len();
        // Left-padded by 3 and right-padded by 3, in one batch.
        let left = [vec![0; 3], row.clone()].concat();
        let right = [row.clone(), vec![0; 3]].concat();
        let mask = [
            [vec![0i64; 3], vec![1; 6]].concat(),
            [vec![1i64; 6], vec![0; 3]].concat(),
        ];
        let both = values(peft.forward(ids(vec![left, right]), Some(ids(mask.to_vec()))));
        let seq = 9;
        let left_real = &both[3 * vocab..seq * vocab];
        let right_real = &both[seq * vocab..(seq + 6) * vocab];
        // A sliding window counts cache slots, so left padding between the virtual tokens (or
        // prefix) and the row moves them out of the window sooner, in PEFT as here (the model's
        // parity test compares such a row with transformers): only right padding leaves a
        // windowed row unchanged.
        let diff = if model == "mistral-window" {
            max_diff(right_real, &alone)
        } else {
            max_diff(left_real, &alone).max(max_diff(right_real, &alone))
        };
        eprintln!("{case}: padded vs alone {diff:e}");
        assert!(
            diff <= 1e-5,
            "{case}: padding changed a row's logits by {diff}"
        );
    }
}

#[test]
fn trainable_checkpoint_round_trips_bit_identical_and_exports_to_peft_form() {
    for (model, method) in cases() {
        let device = Device::default();
        let case = format!("{model}/{method}");
        let peft = load(model, &adapter_dir(model, method), &device);
        let dir = tempfile::tempdir().unwrap();
        peft.save_pretrained(dir.path(), Some(model)).unwrap();
        let again = load(model, dir.path(), &device);
        let (a, b) = (trainable_tensors(&peft), trainable_tensors(&again));
        assert_eq!(a.len(), b.len(), "{case}");
        for ((na, da), (nb, db)) in a.into_iter().zip(b) {
            assert_eq!(na, nb, "{case}");
            assert_eq!(
                da.as_bytes(),
                db.as_bytes(),
                "{case}: {na} not bit-identical after save/load"
            );
        }
        // Folded to PEFT's inference form: no encoder file, same output.
        let exported = tempfile::tempdir().unwrap();
        peft.adapter
            .clone()
            .into_inference()
            .save(exported.path(), &peft.base, Some(model))
            .unwrap();
        assert!(!exported.path().join(ADAPTER_ENCODER).exists(), "{case}");
        let folded = load(model, exported.path(), &device);
        if let (Some(x), Some(y)) = (
            prompt_embeddings(&peft.adapter),
            prompt_embeddings(&folded.adapter),
        ) {
            assert_eq!(x, y, "{case}: export changed the prompt");
        }
        let ids =
            Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 2], [1, 4]), &device);
        assert_eq!(
            values(peft.forward(ids.clone(), None)),
            values(folded.forward(ids, None)),
            "{case}: exported adapter gives other logits"
        );
    }
}

#[test]
fn trainable_parameter_report_counts_what_trains() {
    // The built model's report (autodiff device) equals `peft info`'s count from config.json alone.
    for (model, method) in cases() {
        let device = Device::default().autodiff();
        let peft = load(model, &adapter_dir(model, method), &device);
        let report = peft.trainable_parameters();
        let trainable: usize = trainable_tensors(&peft)
            .iter()
            .map(|(_, d)| d.num_elements())
            .sum();
        assert_eq!(report.trainable, trainable, "{model}/{method}");
        let base = peft.base.num_params();
        let adapter = if method == "bitfit" { 0 } else { trainable };
        assert_eq!(report.all, base + adapter, "{model}/{method}");
    }
}

/// P-tuning v2 started from a text (`--prefix-init-text`) equals PEFT 0.21's
/// `initialize_kv_prefix_from_text`: the same token ids through a chat template (the text as a
/// system message) or plainly, and the same prefix within 1e-5, on Qwen2 GQA, Llama MQA and BLOOM.
/// Fixtures from `scripts/make_prefix_text_fixtures.py`.
#[test]
fn prefix_from_text_equals_peft_initialize_kv_prefix_from_text() {
    use peft::models::{ChatMessage, ChatTemplate, load_tokenizer};
    use peft::prefix::PrefixTuningConfig;
    use peft::train::data::TokenizerEncoder;

    const TEXT: &str = "  You sort the letters of a word.  ";
    let device = Device::default().autodiff();
    let dir = fixtures().join("expected/prefix-init-text");
    let template_path = dir.join("chat_template.jinja");
    let template = ChatTemplate {
        source: std::fs::read_to_string(&template_path).unwrap(),
        path: template_path,
        special_tokens: Vec::new(),
    };
    for model in PREFIX_TEXT_MODELS {
        let expected = Expected::read(&dir.join(format!("{model}.safetensors")));
        let model_dir = fixtures().join("models").join(model);
        let tokenizer = load_tokenizer(&model_dir).unwrap();
        let encode = |text: &str, special: bool| -> Vec<u32> {
            use peft::train::data::TextEncoder;
            TokenizerEncoder(&tokenizer).encode(text, special).unwrap()
        };
        let rendered = template
            .render(&[ChatMessage::new("system", TEXT)], false)
            .unwrap();
        let base = AutoCausalLm::from_pretrained(&model_dir, &device, DType::F32).unwrap();
        let config = PrefixTuningConfig::for_model(4, &peft::core::CausalLm::geometry(&base))
            .with_init_text(Some(TEXT.into()));
        for (kind, ids) in [
            ("chat", encode(&rendered, false)),
            ("plain", encode(TEXT, true)),
        ] {
            let as_i64: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
            assert_eq!(
                vec![as_i64],
                expected.rows(&format!("{kind}_input_ids")),
                "{model} {kind}: token ids"
            );
            let encoder = config.init_from_text(&base, &ids).unwrap();
            let ours = values(encoder.prompt_embeddings());
            let diff = max_diff(
                &ours,
                &expected.floats(&format!("{kind}_prompt_embeddings")),
            );
            assert!(diff < 1e-5, "{model} {kind}: prefix differs by {diff}");
            // It trains: the prefix is a parameter that receives a gradient.
            let trainable = PeftModel::new(base.clone(), AutoAdapter::PrefixTuning(encoder));
            assert_eq!(
                trainable.trainable_parameters().trainable,
                config.num_params()
            );
        }
        // With a projection (PEFT refuses it) the projection is fitted to output the same prefix;
        // the embedding and first Linear stay as drawn, and all of it trains.
        let projected = config.clone().with_prefix_projection(true);
        let fitted = projected
            .init_from_text(&base, &encode(TEXT, true))
            .unwrap();
        let diff = max_diff(
            &values(fitted.prompt_embeddings()),
            &expected.floats("plain_prompt_embeddings"),
        );
        assert!(diff < 1e-4, "{model}: fitted projection differs by {diff}");
        let trainable = PeftModel::new(base.clone(), AutoAdapter::PrefixTuning(fitted));
        assert_eq!(
            trainable.trainable_parameters().trainable,
            projected.num_params()
        );
        // Refusals, as errors naming the config field.
        let err = config
            .clone()
            .with_zero_init(true)
            .init_from_text(&base, &encode(TEXT, true));
        assert!(err.unwrap_err().to_string().starts_with("init_text:"));
        let err = config.init_from_text(&base, &encode(TEXT, true)[..3]);
        assert!(
            err.unwrap_err()
                .to_string()
                .contains("fewer than num_virtual_tokens 4")
        );
        let err = config.init_from_text(&base, &[0, 1, 2, u32::MAX]);
        assert!(
            err.unwrap_err()
                .to_string()
                .contains("outside the base model's vocabulary")
        );
    }
}
