//! The training loop end to end on a fixture model: only targets are scored, a run interrupted
//! and resumed ends where an uninterrupted one does (bit for bit), gradient checkpointing changes
//! nothing but memory, and a diverging run stops with a clear error.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::log_softmax;
use peft::core::params::read_params;
use peft::core::{CausalLm, PeftModel};
use peft::models::{AutoCausalLm, load_tokenizer};
use peft::prefix::PrefixTuningConfig;
use peft::prompt::PromptTuningConfig;
use peft::ptuning::{EncoderType, PTuningConfig};
use peft::train::data::{
    DataOptions, Dataset, TokenizeOptions, TokenizedDataset, TokenizedExample, TokenizerEncoder,
};
use peft::train::optim::AdamWConfig;
use peft::train::trainer::{
    METRICS_FILE, MetricsLine, StepMetrics, TrainError, TrainingConfig, TrainingObserver,
    TrainingRun, read_metrics, train,
};
use peft::{AutoAdapter, AutoAdapterConfig};

/// burn's CPU backend keeps one random generator per process (`Device::seed` sets it for every
/// thread), so tests that draw random numbers (initialization, dropout) run one at a time: a run
/// on another thread would take draws from this one's sequence.
static BACKEND_RNG: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    BACKEND_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/qwen2-gqa-tied")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("peft-training-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// 24 prompt/completion rows (the fixture's tokenizer is byte-level BPE).
fn rows() -> Vec<TokenizedExample> {
    let words = ["cat", "dog", "sun", "tree", "red", "blue"];
    let jsonl: String = (0..24)
        .map(|i| {
            let w = words[i % words.len()];
            let reversed: String = w.chars().rev().collect();
            format!("{{\"prompt\": \"Reverse {w} {i}: \", \"completion\": \"{reversed}\"}}\n")
        })
        .collect();
    let dataset =
        Dataset::from_jsonl_str(Path::new("rows.jsonl"), &jsonl, &DataOptions::default()).unwrap();
    let tokenizer = load_tokenizer(model_dir()).unwrap();
    TokenizedDataset::new(
        dataset,
        &TokenizerEncoder(&tokenizer),
        &TokenizeOptions {
            max_length: 32,
            eos_token_id: Some(0),
            skip_bad_rows: false,
        },
    )
    .unwrap()
    .examples
}

fn fresh_model(
    device: &Device,
    config: &AutoAdapterConfig,
) -> PeftModel<AutoCausalLm, AutoAdapter> {
    fresh_model_in(device, config, DType::F32)
}

/// [`fresh_model`] with the base in `dtype` (the adapter's own parameters are created in f32).
fn fresh_model_in(
    device: &Device,
    config: &AutoAdapterConfig,
    dtype: DType,
) -> PeftModel<AutoCausalLm, AutoAdapter> {
    let base = AutoCausalLm::from_pretrained(model_dir(), device, dtype).unwrap();
    device.seed(7);
    let adapter = config.init(&base, &[]).unwrap();
    PeftModel::new(base, adapter)
}

/// The fixture model's sizes, which adapters shape themselves by.
fn fixture_geometry() -> peft::core::ModelGeometry {
    AutoCausalLm::from_pretrained(model_dir(), &Device::default(), DType::F32)
        .unwrap()
        .geometry()
}

fn configs(geometry: &peft::core::ModelGeometry) -> Vec<(&'static str, AutoAdapterConfig)> {
    vec![
        (
            "prompt-tuning",
            AutoAdapterConfig::PromptTuning(PromptTuningConfig::new(4, geometry.hidden_size)),
        ),
        (
            // Dropout between the LSTM layers: a resumed run must draw the same masks.
            "p-tuning-lstm",
            AutoAdapterConfig::PTuning(
                PTuningConfig::for_model(4, geometry)
                    .with_encoder_reparameterization_type(EncoderType::Lstm)
                    .with_encoder_hidden_size(Some(16))
                    .with_encoder_dropout(0.1),
            ),
        ),
        (
            "prefix-tuning",
            AutoAdapterConfig::PrefixTuning(
                PrefixTuningConfig::for_model(4, geometry).with_prefix_projection(true),
            ),
        ),
        (
            "bitfit",
            AutoAdapterConfig::BitFit(peft::bitfit::BitFitConfig::new()),
        ),
    ]
}

/// [`configs`] and the remaining variants: P-tuning with its MLP encoder, P-tuning v2.
fn every_method(geometry: &peft::core::ModelGeometry) -> Vec<(&'static str, AutoAdapterConfig)> {
    let mut methods = configs(geometry);
    methods.push((
        "p-tuning-mlp",
        AutoAdapterConfig::PTuning(PTuningConfig::for_model(4, geometry)),
    ));
    methods.push((
        "p-tuning-v2",
        AutoAdapterConfig::PrefixTuning(PrefixTuningConfig::for_model(4, geometry)),
    ));
    methods
}

/// One epoch over [`rows`] (24) in batches of 8: three optimizer steps.
fn one_epoch_of_three_steps() -> TrainingConfig {
    TrainingConfig::new()
        .with_lr(1e-2)
        .with_batch_size(8)
        .with_epochs(1)
}

fn run_config(output_dir: &Path, resume: bool) -> TrainingRun {
    TrainingRun {
        output_dir: output_dir.to_path_buf(),
        pad_token_id: 0,
        eos_token_ids: vec![0],
        base_model_name_or_path: None,
        resume,
        devices: Vec::new(),
        gradient_sync: Default::default(),
    }
}

/// Stops the run after step `at`, as a crash would (no checkpoint for that step).
struct CrashAfter(usize);

impl TrainingObserver for CrashAfter {
    fn on_step(&mut self, m: &StepMetrics) -> ControlFlow<()> {
        if m.step == self.0 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// Every trainable value of the model, by name (adapter parameters and, for BitFit, biases).
fn trained_values(model: &PeftModel<AutoCausalLm, AutoAdapter>) -> Vec<(String, Vec<f32>)> {
    let trainable: Vec<String> = peft::core::params::param_infos(model)
        .into_iter()
        .filter(|p| p.trainable)
        .map(|p| p.name)
        .collect();
    assert!(!trainable.is_empty());
    read_params(model, |name| trainable.iter().any(|t| t == name))
        .into_iter()
        .map(|(name, data)| (name, data.convert::<f32>().try_to_vec_as::<f32>().unwrap()))
        .collect()
}

fn train_losses(dir: &Path) -> Vec<(usize, f64)> {
    read_metrics(&dir.join(METRICS_FILE))
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            MetricsLine::Train(t) => Some((t.step, t.loss)),
            MetricsLine::Eval(_) => None,
        })
        .collect()
}

/// The data lines of each logged training step.
fn train_lines(dir: &Path) -> Vec<Vec<usize>> {
    read_metrics(&dir.join(METRICS_FILE))
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            MetricsLine::Train(t) => Some(t.lines),
            MetricsLine::Eval(_) => None,
        })
        .collect()
}

/// Trains `model` on `rows` in a fresh temporary directory named after `label` (which also names
/// the run in a failure), removes the directory, and returns the trained model and its logged
/// `(step, loss)` pairs.
fn train_into_temp_dir(
    model: PeftModel<AutoCausalLm, AutoAdapter>,
    rows: &[TokenizedExample],
    config: &TrainingConfig,
    label: &str,
) -> (PeftModel<AutoCausalLm, AutoAdapter>, Vec<(usize, f64)>) {
    let dir = temp_dir(label);
    let outcome = train(model, rows, None, config, &run_config(&dir, false), &mut ())
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let losses = train_losses(&dir);
    std::fs::remove_dir_all(dir).unwrap();
    (outcome.model, losses)
}

#[test]
fn resuming_after_a_crash_ends_bit_identical_to_an_uninterrupted_run() {
    let _rng = one_at_a_time();
    let device = Device::default().autodiff();
    let rows = rows();
    // 24 rows, micro-batches of 4, 2 per step: 3 steps an epoch, 9 in all; checkpoints every 2.
    let config = TrainingConfig::new()
        .with_lr(1e-2)
        .with_epochs(3)
        .with_batch_size(4)
        .with_gradient_accumulation_steps(2)
        .with_warmup_steps(2)
        .with_save_steps(Some(2))
        .with_seed(3);
    let geometry = fixture_geometry();
    // Every method with the seeded shuffle, and one with the length-grouped sampler.
    let grouped = config.clone().with_group_by_length(true);
    let cases = configs(&geometry)
        .into_iter()
        .map(|(name, adapter)| (name, adapter, &config))
        .chain(
            configs(&geometry)
                .into_iter()
                .take(1)
                .map(|(name, adapter)| (name, adapter, &grouped)),
        );
    let mut orders = Vec::new();
    for (name, adapter, config) in cases {
        let name = if config.group_by_length {
            format!("{name}-grouped")
        } else {
            name.to_string()
        };
        let name = name.as_str();
        let whole = temp_dir(&format!("{name}-whole"));
        let outcome = train(
            fresh_model(&device, &adapter),
            &rows,
            Some(&rows[..4]),
            config,
            &run_config(&whole, false),
            &mut (),
        )
        .unwrap();
        assert!(outcome.completed);
        assert_eq!(outcome.global_step, 9);
        let expected = trained_values(&outcome.model);

        // Crash after step 5: the newest checkpoint is step 4's, so step 5 is redone.
        let crashed = temp_dir(&format!("{name}-crashed"));
        let outcome = train(
            fresh_model(&device, &adapter),
            &rows,
            Some(&rows[..4]),
            config,
            &run_config(&crashed, false),
            &mut CrashAfter(5),
        )
        .unwrap();
        assert!(!outcome.completed);
        assert_eq!(outcome.global_step, 5);
        assert!(crashed.join("checkpoint-4").is_dir());
        // The resumed run starts from a differently initialized adapter: the checkpoint wins.
        device.seed(99);
        let base = AutoCausalLm::from_pretrained(model_dir(), &device, DType::F32).unwrap();
        let other_start = PeftModel::new(base.clone(), adapter.init(&base, &[]).unwrap());
        let outcome = train(
            other_start,
            &rows,
            Some(&rows[..4]),
            config,
            &run_config(&crashed, true),
            &mut (),
        )
        .unwrap();
        assert!(outcome.completed);
        assert_eq!(outcome.global_step, 9);
        let resumed = trained_values(&outcome.model);
        assert_eq!(resumed.len(), expected.len(), "{name}");
        for ((n1, v1), (n2, v2)) in expected.iter().zip(&resumed) {
            assert_eq!(n1, n2);
            assert_eq!(v1, v2, "{name}: {n1} differs after resuming");
        }
        // The metrics file tells one story: steps 1..=9 once each, the same losses and rows.
        assert_eq!(train_losses(&whole), train_losses(&crashed), "{name}");
        assert_eq!(train_lines(&whole), train_lines(&crashed), "{name}");
        orders.push((config.group_by_length, train_lines(&whole)));
        let losses = train_losses(&whole);
        assert_eq!(
            losses.iter().map(|l| l.0).collect::<Vec<_>>(),
            (1..=9).collect::<Vec<_>>()
        );
        // Checkpoints hold the adapter and the optimizer state, never the base model: the
        // optimizer's tensors are the two moments of exactly the trainable parameters.
        let checkpoint = crashed.join("checkpoint-9");
        let mut files: Vec<String> = std::fs::read_dir(&checkpoint)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let mut expected_files = vec![
            "adapter_config.json",
            "adapter_model.safetensors",
            "optimizer.safetensors",
            "trainer_state.json",
        ];
        if name.starts_with("p-tuning-lstm") || name.starts_with("prefix-tuning") {
            expected_files.insert(1, "adapter_encoder.safetensors");
        }
        assert_eq!(files, expected_files, "{name}");
        let optimizer = std::fs::read(checkpoint.join("optimizer.safetensors")).unwrap();
        let optimizer = safetensors::SafeTensors::deserialize(&optimizer).unwrap();
        let mut moments: Vec<String> = optimizer.names().into_iter().map(str::to_string).collect();
        moments.sort();
        let mut trainable: Vec<String> = expected
            .iter()
            .flat_map(|(n, _)| [format!("{n}.exp_avg"), format!("{n}.exp_avg_sq")])
            .collect();
        trainable.sort();
        assert_eq!(moments, trainable, "{name}");
        std::fs::remove_dir_all(whole).unwrap();
        std::fs::remove_dir_all(crashed).unwrap();
    }
    // The sampler is what changed the order: every plain run visited the same rows.
    let (plain, grouped): (Vec<_>, Vec<_>) = orders.into_iter().partition(|(g, _)| !g);
    assert!(plain.windows(2).all(|w| w[0].1 == w[1].1));
    assert_ne!(plain[0].1, grouped[0].1);
}

#[test]
fn resuming_with_other_data_or_batch_settings_is_refused() {
    let _rng = one_at_a_time();
    let device = Device::default().autodiff();
    let rows = rows();
    let geometry = fixture_geometry();
    let adapter = &configs(&geometry)[0].1;
    let config = TrainingConfig::new().with_batch_size(8);
    let dir = temp_dir("refuse");
    // A fresh start on `rows` with `config`, into `dir`: the error message if it fails.
    let attempt = |rows: &[TokenizedExample], config: &TrainingConfig, resume: bool| {
        train(
            fresh_model(&device, adapter),
            rows,
            None,
            config,
            &run_config(&dir, resume),
            &mut (),
        )
        .err()
        .map(|e| e.to_string())
    };
    assert_eq!(attempt(&rows, &config, false), None);
    // Training again into the same directory without resuming would mix two runs.
    let err = attempt(&rows, &config, false).expect("trained over an earlier run's checkpoint");
    assert!(
        err.contains("holds checkpoint-3 of an earlier run"),
        "{err}"
    );
    let err = attempt(&rows, &config.clone().with_batch_size(4), true)
        .expect("resumed with another batch size");
    assert!(err.contains("batch_size 8, this run has 4"), "{err}");
    let err = attempt(&rows, &config.clone().with_group_by_length(true), true)
        .expect("resumed with another sampler");
    assert!(
        err.contains("group_by_length false, this run has true"),
        "{err}"
    );
    let err = attempt(&rows[1..], &config, true).expect("resumed on other data");
    assert!(err.contains("train 24 rows"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_loss_scores_target_tokens_only() {
    let _rng = one_at_a_time();
    let device = Device::default();
    let rows = rows();
    let geometry = fixture_geometry();
    for (name, adapter) in configs(&geometry) {
        let model = fresh_model(&device, &adapter);
        let refs: Vec<&TokenizedExample> = rows[..3].iter().collect();
        let n = peft::core::Adapter::num_virtual_tokens(&model.adapter);
        let batch = peft::train::data::Batch::collate(&refs, 0, n, &device);
        let loss: f32 = model
            .loss(
                batch.input_ids.clone(),
                Some(batch.attention_mask.clone()),
                batch.labels,
            )
            .into_scalar();
        // By hand: log-probabilities of each target token given what precedes it.
        let logits = model.forward(batch.input_ids, Some(batch.attention_mask));
        let log_probs = log_softmax(logits, 2);
        let mut picked = Vec::new();
        let mut every_token = Vec::new();
        for (b, row) in rows[..3].iter().enumerate() {
            for t in 1..row.input_ids.len() {
                let lp: f32 = log_probs
                    .clone()
                    .slice([
                        b..b + 1,
                        t - 1..t,
                        row.input_ids[t] as usize..row.input_ids[t] as usize + 1,
                    ])
                    .into_scalar();
                every_token.push(lp);
                if t >= row.prompt_len {
                    picked.push(lp);
                }
            }
        }
        // With virtual tokens the first real token is scored too; here every first token is
        // prompt, so neither count includes it.
        let mean = |v: &[f32]| -v.iter().sum::<f32>() / v.len() as f32;
        assert_eq!(picked.len(), batch.scored, "{name}");
        assert!(
            (loss - mean(&picked)).abs() < 1e-4,
            "{name}: {loss} vs {}",
            mean(&picked)
        );
        assert!(
            (loss - mean(&every_token)).abs() > 1e-2,
            "{name}: prompt tokens would not matter"
        );
    }
}

#[test]
fn two_replicas_of_batch_4_train_as_one_device_with_batch_8() {
    // Data parallelism on Flex: both replicas on its one device, taking turns. Every method;
    // dropout off (each replica draws its own masks, as each GPU of a data-parallel run does).
    let _rng = one_at_a_time();
    let rows = rows();
    let geometry = fixture_geometry();
    let device = Device::default().autodiff();
    let lr = 1e-2;
    let steps = 5;
    for (name, adapter) in every_method(&geometry) {
        let adapter = match adapter {
            AutoAdapterConfig::PTuning(c) => {
                AutoAdapterConfig::PTuning(c.with_encoder_dropout(0.0))
            }
            other => other,
        };
        let initial = trained_values(&fresh_model(&device, &adapter));
        // (replicas, rows per replica, accumulation): 1 x 8; 1 x 4 accumulated twice; 2 x 4.
        let runs: Vec<_> = [(1, 8, 1), (1, 4, 2), (2, 4, 1)]
            .into_iter()
            .map(|(replicas, batch_size, accumulation)| {
                let dir = temp_dir(&format!("dp-{name}-{replicas}-{batch_size}"));
                let mut run = run_config(&dir, false);
                run.devices = vec![device.clone(); replicas];
                let config = TrainingConfig::new()
                    .with_lr(lr)
                    .with_batch_size(batch_size)
                    .with_gradient_accumulation_steps(accumulation)
                    .with_epochs(2);
                let outcome = train(
                    fresh_model(&device, &adapter),
                    &rows,
                    None,
                    &config,
                    &run,
                    &mut CrashAfter(steps),
                )
                .unwrap_or_else(|e| panic!("{name} x{replicas}: {e}"));
                assert_eq!(outcome.global_step, steps, "{name}");
                let result = (
                    trained_values(&outcome.model),
                    train_losses(&dir),
                    train_lines(&dir),
                );
                std::fs::remove_dir_all(dir).unwrap();
                result
            })
            .collect();
        let (one, accumulated, replicated) = (&runs[0], &runs[1], &runs[2]);
        // Gathering the replicas' gradients is gradient accumulation over the same shards, to
        // the bit: the data-parallel path adds nothing of its own.
        assert_eq!(replicated.0, accumulated.0, "{name}: values");
        assert_eq!(replicated.1, accumulated.1, "{name}: losses");
        // Against one batch of 8: the same rows in every step and the same losses; the adapter
        // differs only by the rounding of summing a batch in two halves, which AdamW's
        // per-component normalization magnifies where a gradient is rounding residue (BitFit's
        // k_proj biases, whose gradient softmax's shift invariance nearly cancels; the LSTM's
        // hidden-to-hidden weights): measured at most 1.0e-5 at lr 1e-2 (1.0e-6 at 1e-3), so the
        // bound is 1e-3 of the steps' total size, lr x steps.
        assert_eq!(replicated.2, one.2, "{name}: rows");
        assert_eq!(one.1.len(), steps, "{name}");
        for (a, b) in one.1.iter().zip(&replicated.1) {
            assert!(
                (a.1 - b.1).abs() <= 1e-6 * a.1.abs(),
                "{name}: step {} loss {} vs {}",
                a.0,
                a.1,
                b.1
            );
        }
        let max_diff = |x: &[(String, Vec<f32>)], y: &[(String, Vec<f32>)]| {
            x.iter()
                .zip(y)
                .flat_map(|((_, a), (_, b))| a.iter().zip(b).map(|(p, q)| (p - q).abs()))
                .fold(0.0f32, f32::max)
        };
        let diff = max_diff(&one.0, &replicated.0);
        assert!(diff <= 1e-3 * lr as f32 * steps as f32, "{name}: {diff}");
        let moved = max_diff(&one.0, &initial);
        assert!(moved > 1e-3, "{name}: the adapter moved only {moved}");
    }
}

#[test]
fn a_data_parallel_run_resumes_bit_identical_and_only_on_as_many_devices() {
    let _rng = one_at_a_time();
    let device = Device::default().autodiff();
    let rows = rows();
    let adapter = every_method(&fixture_geometry()).remove(0).1;
    // 2 replicas x 4 rows: 3 steps an epoch, 6 in all; checkpoints every 2.
    let config = TrainingConfig::new()
        .with_lr(1e-2)
        .with_epochs(2)
        .with_batch_size(4)
        .with_save_steps(Some(2));
    let two = |dir: &Path, resume: bool| {
        let mut run = run_config(dir, resume);
        run.devices = vec![device.clone(); 2];
        run
    };
    let whole = temp_dir("dp-whole");
    let outcome = train(
        fresh_model(&device, &adapter),
        &rows,
        None,
        &config,
        &two(&whole, false),
        &mut (),
    )
    .unwrap();
    assert_eq!(outcome.global_step, 6);
    let expected = trained_values(&outcome.model);

    let crashed = temp_dir("dp-crashed");
    train(
        fresh_model(&device, &adapter),
        &rows,
        None,
        &config,
        &two(&crashed, false),
        &mut CrashAfter(3),
    )
    .unwrap();
    // Resuming on one device would change what a step is: refused, naming the field.
    let err = train(
        fresh_model(&device, &adapter),
        &rows,
        None,
        &config,
        &run_config(&crashed, true),
        &mut (),
    )
    .err()
    .expect("resumed on another number of devices");
    assert!(
        matches!(&err, TrainError::DifferentRun { key: "devices", .. }),
        "{err}"
    );
    let outcome = train(
        fresh_model(&device, &adapter),
        &rows,
        None,
        &config,
        &two(&crashed, true),
        &mut (),
    )
    .unwrap();
    assert_eq!(outcome.global_step, 6);
    assert_eq!(trained_values(&outcome.model), expected);
    assert_eq!(train_losses(&crashed), train_losses(&whole));
    for dir in [whole, crashed] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn gradient_checkpointing_changes_memory_not_results() {
    let _rng = one_at_a_time();
    let rows = rows();
    let config = one_epoch_of_three_steps();
    let mut results = Vec::new();
    for checkpointed in [false, true] {
        let mut device = Device::default().autodiff();
        if checkpointed {
            device = device.gradient_checkpointing();
        }
        let geometry = fixture_geometry();
        // Prefix tuning: the combination PEFT refuses.
        let adapter = configs(&geometry).remove(2).1;
        let (trained, losses) = train_into_temp_dir(
            fresh_model(&device, &adapter),
            &rows,
            &config,
            &format!("ckpt-{checkpointed}"),
        );
        results.push((trained_values(&trained), losses));
    }
    let ((values_a, losses_a), (values_b, losses_b)) = (&results[0], &results[1]);
    for ((_, a), (_, b)) in values_a.iter().zip(values_b) {
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-6, "{diff}");
    }
    for (a, b) in losses_a.iter().zip(losses_b) {
        assert!((a.1 - b.1).abs() < 1e-6);
    }
}

#[test]
fn a_bf16_base_trains_f32_adapters_with_the_losses_of_an_f32_base() {
    let _rng = one_at_a_time();
    let rows = rows();
    let config = one_epoch_of_three_steps();
    let device = Device::default().autodiff();
    let geometry = fixture_geometry();
    for (name, adapter) in configs(&geometry) {
        let mut losses = Vec::new();
        for dtype in [DType::F32, DType::BF16] {
            let model = fresh_model_in(&device, &adapter, dtype);
            let trainable_dtypes: Vec<DType> = peft::core::params::param_infos(&model)
                .into_iter()
                .filter(|p| p.trainable)
                .map(|p| p.dtype)
                .collect();
            // The adapter's parameters stay f32 over a bf16 base; BitFit's biases are the
            // base's own, so they take its dtype.
            let expected = if name == "bitfit" { dtype } else { DType::F32 };
            assert!(
                trainable_dtypes.iter().all(|&d| d == expected),
                "{name} over {dtype:?}: trainable {trainable_dtypes:?}"
            );
            let (trained, step_losses) =
                train_into_temp_dir(model, &rows, &config, &format!("dtype-{name}-{dtype:?}"));
            let after: Vec<DType> = peft::core::params::param_infos(&trained)
                .into_iter()
                .filter(|p| p.trainable)
                .map(|p| p.dtype)
                .collect();
            assert_eq!(
                after, trainable_dtypes,
                "{name}: the optimizer kept the dtypes"
            );
            losses.push(step_losses);
        }
        let (f32_losses, bf16_losses) = (&losses[0], &losses[1]);
        assert_eq!(f32_losses.len(), bf16_losses.len());
        for ((step, a), (_, b)) in f32_losses.iter().zip(bf16_losses) {
            // bf16 activations carry a relative error of ~2^-8 (0.4%) per op; the f32 loss over
            // bf16 logits measured within 0.2% of the f32 run's on this model, 1% bounds it.
            eprintln!("{name} step {step}: f32 base {a:.5}, bf16 base {b:.5}");
            assert!(
                b.is_finite() && (a - b).abs() <= 0.01 * a,
                "{name} step {step}: {a} vs {b}"
            );
        }
    }
}

/// An adapter's random initial values are drawn in `init`: the seed set just before decides them,
/// whatever the device draws afterwards. (burn's initializers are lazy; left so, the draw would
/// happen at the first forward, from the generator's state then, or on another backend after a
/// `to_device`.)
#[test]
fn the_seed_set_before_init_decides_an_adapters_initial_values() {
    let _rng = one_at_a_time();
    let device = Device::default().autodiff();
    let geometry = fixture_geometry();
    // BitFit draws nothing: its trainable parameters are the base model's biases.
    let adapters = every_method(&geometry)
        .into_iter()
        .filter(|(name, _)| *name != "bitfit");
    for (name, adapter) in adapters {
        let initial_values = |draw_after_init: bool| {
            let model = fresh_model_in(&device, &adapter, DType::F32);
            if draw_after_init {
                Tensor::<1>::random([64], burn::tensor::Distribution::Default, &device).into_data();
            }
            read_params(&model.adapter, |_| true)
        };
        let undisturbed = initial_values(false);
        assert!(!undisturbed.is_empty(), "{name}");
        assert_eq!(undisturbed, initial_values(true), "{name}");
    }
}

/// The CubeCL backend (CUDA's and wgpu's code path; here on CubeCL's CPU runtime) trains every
/// method to Flex's losses: the same adapter weights (drawn on Flex, then forked), the same rows,
/// three steps. Its fused attention and SwiGLU run as lazy Fusion operations instead of Flex's
/// kernels. `cargo test --features cubecl-cpu --test training cubecl` (9 minutes on 2 cores)
///
/// Not P-tuning's LSTM encoder: its backward multiplies `[h, 1]` by `[1, 4h]`, and CubeCL's
/// matmul fails on that runtime (see the test below).
#[cfg(feature = "cubecl-cpu")]
#[test]
fn every_method_trains_on_the_cubecl_backend_to_the_losses_of_flex() {
    let _rng = one_at_a_time();
    let rows = rows();
    let config = one_epoch_of_three_steps();
    let flex = Device::flex().autodiff();
    let cube = Device::cpu().autodiff();
    let geometry = fixture_geometry();
    let methods = every_method(&geometry)
        .into_iter()
        .filter(|(name, _)| *name != "p-tuning-lstm");
    for (name, adapter) in methods {
        // Dropout masks are drawn on the device, by each backend's own generator.
        let adapter = match adapter {
            AutoAdapterConfig::PTuning(config) => {
                AutoAdapterConfig::PTuning(config.with_encoder_dropout(0.0))
            }
            other => other,
        };
        let mut losses = Vec::new();
        for device in [&flex, &cube] {
            // `fork`, not `to_device`: a moved trainable parameter would stay a child of its Flex
            // leaf in the autodiff graph; a forked one is a leaf of its own on `device`.
            let model = fresh_model_in(&flex, &adapter, DType::F32).fork(device);
            let label = format!("cubecl-{name}-{}", losses.len());
            let (trained, step_losses) = train_into_temp_dir(model, &rows, &config, &label);
            assert_eq!(trained.devices(), vec![device.clone()], "{name}");
            losses.push(step_losses);
        }
        let (flex_losses, cube_losses) = (&losses[0], &losses[1]);
        assert_eq!(flex_losses.len(), 3);
        assert_eq!(flex_losses.len(), cube_losses.len());
        for ((step, a), (_, b)) in flex_losses.iter().zip(cube_losses) {
            eprintln!("{name} step {step}: flex {a:.6}, cubecl {b:.6}");
            // f32 on both: the kernels sum in different orders, nothing more.
            assert!((a - b).abs() <= 1e-4 * a, "{name} step {step}: {a} vs {b}");
        }
    }
}

/// CubeCL 0.11's matmul cannot take an inner dimension of 1 on its CPU runtime: it picks a kernel
/// asking for 66,560 bytes of shared memory where that runtime allows 32,768 (P-tuning's LSTM
/// backward needs such products). When this test fails, CubeCL has fixed it: put
/// `p-tuning-lstm` back into the test above.
#[cfg(feature = "cubecl-cpu")]
#[test]
fn cubecl_cpu_matmul_with_an_inner_dimension_of_one_still_fails() {
    let device = Device::cpu();
    let column = Tensor::<2>::ones([16, 1], &device);
    let row = Tensor::<2>::ones([1, 64], &device);
    let product = column.matmul(row).sum().try_into_scalar::<f32>();
    let Err(error) = product else {
        panic!("CubeCL multiplies [16, 1] by [1, 64] now: test p-tuning-lstm on it again");
    };
    assert!(
        format!("{error:?}").contains("Shared memory budget exceeded"),
        "{error:?}"
    );
}

#[test]
fn a_diverging_run_stops_with_the_step_and_rows() {
    let _rng = one_at_a_time();
    let device = Device::default().autodiff();
    let rows = rows();
    let geometry = fixture_geometry();
    let adapter = &configs(&geometry)[0].1;
    let config = TrainingConfig::new()
        .with_lr(1e30)
        .with_max_grad_norm(None)
        .with_batch_size(4);
    let dir = temp_dir("nan");
    let Err(err) = train(
        fresh_model(&device, adapter),
        &rows,
        None,
        &config,
        &run_config(&dir, false),
        &mut (),
    ) else {
        panic!("a learning rate of 1e30 trained");
    };
    assert!(
        matches!(err, TrainError::NonFinite { step, .. } if step >= 2),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("training stopped (lower the learning rate, or check the rows at lines"),
        "{message}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn settings_out_of_their_domain_name_the_config_field_and_write_nothing() {
    let _rng = one_at_a_time();
    let device = Device::default().autodiff();
    let rows = rows();
    let geometry = fixture_geometry();
    let adapter = &configs(&geometry)[0].1;
    let dir = temp_dir("domain");
    let base = one_epoch_of_three_steps();
    let adam = |edit: fn(AdamWConfig) -> AdamWConfig| {
        base.clone().with_optimizer(edit(AdamWConfig::new()))
    };
    let cases: Vec<(TrainingConfig, bool, &str)> = vec![
        (
            base.clone().with_lr(f64::NAN),
            false,
            "lr: must be a finite number >= 0, found NaN",
        ),
        (
            base.clone().with_max_grad_norm(Some(-1.0)),
            false,
            "max_grad_norm: must be a finite number > 0, found -1",
        ),
        (
            adam(|a| a.with_beta_1(1.0)),
            false,
            "optimizer.beta_1: must be in [0, 1), found 1",
        ),
        (
            adam(|a| a.with_beta_2(-0.1)),
            false,
            "optimizer.beta_2: must be in [0, 1)",
        ),
        (
            adam(|a| a.with_epsilon(0.0)),
            false,
            "optimizer.epsilon: must be a finite number > 0",
        ),
        (
            adam(|a| a.with_weight_decay(f64::NAN)),
            false,
            "optimizer.weight_decay: must be a finite number >= 0, found NaN",
        ),
        (base.clone(), true, "resume: "),
    ];
    for (config, resume, message) in cases {
        let err = train(
            fresh_model(&device, adapter),
            &rows,
            None,
            &config,
            &run_config(&dir, resume),
            &mut (),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| panic!("trained with {message}"));
        assert!(err.contains(message), "{err}");
        assert!(!dir.exists(), "{message}: left {}", dir.display());
    }
}

#[test]
fn an_adapter_with_nothing_to_train_is_refused_before_the_first_step() {
    let _rng = one_at_a_time();
    let device = Device::default().autodiff();
    let base = AutoCausalLm::from_pretrained(model_dir(), &device, DType::F32).unwrap();
    // The library path for a BitFit pattern that selects no bias: the config check refuses it...
    let bitfit = AutoAdapterConfig::BitFit(
        peft::bitfit::BitFitConfig::new().with_bias_pattern(Some("no_such_module".into())),
    );
    let Err(err) = bitfit.init(&base, &[]) else {
        panic!("a pattern matching no bias was accepted");
    };
    assert!(
        err.to_string()
            .starts_with("bias_pattern: \"no_such_module\" matches none of the base model's"),
        "{err}"
    );
    // ...and a model whose adapter trains nothing (every parameter frozen) stops with an error
    // instead of a panic in backward.
    let adapter = peft::bitfit::BitFitConfig::new()
        .with_bias_pattern(Some("no_such_module".into()))
        .init()
        .unwrap();
    let model = PeftModel::new(base, AutoAdapter::BitFit(adapter));
    let dir = temp_dir("nothing");
    let Err(err) = train(
        model,
        &rows(),
        None,
        &one_epoch_of_three_steps(),
        &run_config(&dir, false),
        &mut (),
    ) else {
        panic!("trained nothing without a word");
    };
    assert_eq!(
        err.to_string(),
        "adapter: has no trainable parameters: there is nothing to train"
    );
    assert!(!dir.exists());
}
