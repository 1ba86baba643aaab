//! `cargo xtask bench`: speed and memory of every method on a random-weight model.
//!
//! Workloads, per method (and the base model without adapter for the inference ones):
//! - **train**: one optimizer step (forward, loss on every real token, backward, global-norm
//!   clipping, AdamW on the trainable parameters) on `batch x seq-len` tokens; tokens/s and peak
//!   memory. With `--row-lengths MIN-MAX`, on rows of mixed lengths padded as `peft train` pads,
//!   the loss on each row's completion (last third) only; tokens/s counts the real tokens.
//! - **forward**: logits of `batch x seq-len` tokens without gradients; tokens/s.
//! - **generate**: greedy generation with the adapter, `gen-batch` prompts of `seq-len` tokens:
//!   prefill tokens/s (time of 1 new token) and decode tokens/s (`gen-batch * (N - 1)` over the time
//!   of N new tokens minus the prefill's).
//!
//! Each timing is the median of `--reps` runs after one warm-up; with `--rounds N` every method
//! runs N times, alternating ours and torch's, and each side reports its best round. Peak memory
//! is the process's resident high-water mark (`VmHWM`) over the workload, reset before it through
//! `/proc/self/clear_refs`, so it holds the model too (`*_peak_rss_mib`). On a backend with device
//! memory pools (CubeCL: CUDA, wgpu) the bench also reports what the pools held
//! (`*_peak_device_mib`, reserved bytes, against torch's `max_memory_reserved`) and the live bytes
//! (`*_peak_device_in_use_mib`, against `max_memory_allocated`). burn keeps no high-water mark of
//! its own, so ours are the largest readings taken during the warm-up run (see [`DevicePeak`]).
//! `--compare` runs the same workloads through torch + transformers + peft
//! (`scripts/bench_torch.py`) in the same invocation.

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::DType;
use clap::ValueEnum;
use peft::core::params::{cast_params, param_infos};
use peft::core::{CausalLm, GenerationConfig, IGNORE_INDEX, Injection, PeftModel, generate};
use peft::models::{AutoCausalLm, AutoConfig};
use peft::train::data::{Batch, TokenizedExample};
use peft::train::optim::{AdamWConfig, clip_coefficient, global_grad_norm};
use peft::{AutoAdapter, AutoAdapterConfig, MethodPreset};
use serde_json::{Value, json};

/// A benchmarked case: the base model alone (inference workloads only: nothing trains), or a
/// preset of the facade's method table (`peft::presets`) with options of the bench's own.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BenchMethod {
    /// The name in the bench's records and in `scripts/bench_torch.py`.
    pub name: &'static str,
    /// The method's preset; `None` for the base model.
    pub preset: Option<MethodPreset>,
    /// Options (a JSON object of config keys) over the preset's.
    pub options: &'static str,
}

/// The cases run by default: the base, then every preset of the method table, P-tuning once per
/// encoder (as PEFT's two `encoder_reparameterization_type`s, named as the torch side names them).
pub fn bench_methods() -> Vec<BenchMethod> {
    let mut out = vec![BenchMethod {
        name: "base",
        preset: None,
        options: "{}",
    }];
    for preset in peft::presets() {
        let case = |name, options| BenchMethod {
            name,
            preset: Some(preset),
            options,
        };
        if preset.peft_type == peft::ptuning::PEFT_TYPE {
            out.push(case(
                "p-tuning-mlp",
                r#"{"encoder_reparameterization_type": "MLP"}"#,
            ));
            out.push(case(
                "p-tuning-lstm",
                r#"{"encoder_reparameterization_type": "LSTM"}"#,
            ));
        } else {
            out.push(case(preset.preset.name, "{}"));
        }
    }
    out
}

impl BenchMethod {
    pub(crate) fn name(self) -> &'static str {
        self.name
    }
}

/// `--methods`' parser: the names of [`bench_methods`].
fn bench_method_parser() -> impl clap::builder::TypedValueParser<Value = BenchMethod> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(bench_methods().into_iter().map(|m| m.name)).map(
        |name| {
            bench_methods()
                .into_iter()
                .find(|m| m.name == name)
                .expect("clap accepts only the cases' names")
        },
    )
}

/// A benchmarked workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// One optimizer step.
    Train,
    /// Logits without gradients.
    Forward,
    /// Greedy generation (prefill + decode).
    Generate,
    /// `peft train` end to end on a real model and JSONL file (--model, --data) against a plain
    /// torch + PEFT loop on the same file (`scripts/peft_train.py`): seconds per epoch.
    Epoch,
    /// `peft serve` under the load generator: adapters of every prompt-learning method mixed in
    /// one batch, against the bare base and against serving one adapter at a time (`serve.rs`).
    Serve,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Forward => "forward",
            Self::Generate => "generate",
            Self::Epoch => "epoch",
            Self::Serve => "serve",
        }
    }
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Hugging Face config.json of the model shape (random weights); several, comma separated,
    /// run the train, forward and generate workloads on each shape in turn, in one invocation (the
    /// serve workload takes the first).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fixtures/configs/qwen2.5-0.5b/config.json"
    )]
    config: Vec<PathBuf>,
    /// Methods to run, comma separated (default: all of `bench_methods`).
    #[arg(long, value_parser = bench_method_parser(), value_delimiter = ',')]
    methods: Vec<BenchMethod>,
    /// Workloads to run, comma separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [
        Workload::Train, Workload::Forward, Workload::Generate,
    ])]
    workloads: Vec<Workload>,
    /// Rows per training/forward batch (default: 4 on the CPU, 8 on a GPU).
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens per row, and the generation prompts' length (default: 128 on the CPU, 512 on a GPU).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Train workload on rows of mixed lengths, as a real fine-tuning batch: `MIN-MAX` tokens
    /// (e.g. `10-80`), drawn per row (the same on every run and on both sides), padded on the
    /// right to the longest row as `peft train` pads, the loss on each row's last third only
    /// (its completion). Without it every row has --seq-len tokens, all scored.
    #[arg(long, value_parser = parse_row_lengths)]
    row_lengths: Option<(usize, usize)>,
    /// Prompts per generation batch.
    #[arg(long, default_value_t = 1)]
    gen_batch: usize,
    /// New tokens per prompt when generating (decode runs new_tokens - 1 steps).
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Virtual tokens (prompt methods) or prefix positions (prefix methods).
    #[arg(long, default_value_t = 10)]
    num_virtual_tokens: usize,
    /// Timed repetitions of each workload after one warm-up (the median is kept).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// dtype of the frozen base's weights and activations (bf16 is the GPU setting; on Flex its
    /// matmuls go through f32 copies). Adapter parameters are created in f32 and the loss is f32;
    /// BitFit's biases, being the base's, take the base dtype (as on the torch side).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: peft_cli::cli::Dtype,
    /// Train with activation checkpointing: burn's balanced strategy recomputes activations in
    /// backward instead of keeping them (torch: `gradient_checkpointing_enable`, non-reentrant).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Rounds per method, alternating ours and torch's (with --compare); each side reports its
    /// best round, which takes out most of a shared machine's drift (the JSON keeps every round).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Also run torch + transformers + peft on the same workloads and print ours/theirs.
    #[arg(long)]
    compare: bool,
    /// Python with torch, transformers and peft for --compare (default: .venv/bin/python, else
    /// python3).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Threads for torch (default: the cores available; Flex uses them all).
    #[arg(long)]
    threads: Option<usize>,
    /// Where to write the results.
    #[arg(long, default_value = "bench-results/bench.json")]
    json: PathBuf,
    /// Epoch workload: the Hugging Face model directory to train on (e.g. SmolLM2-135M,
    /// docs/smollm2.md).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Epoch workload: the training rows (prompt/completion JSONL).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Epoch workload: epochs per run.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Epoch workload: peak learning rate (default: `peft train`'s for the method).
    #[arg(long)]
    lr: Option<f64>,
    /// Serve workload: adapters, the prompt-learning methods in turn.
    #[arg(long, default_value_t = 16)]
    serve_adapters: usize,
    /// Serve workload: concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Serve workload: requests per run (default: one per client).
    #[arg(long)]
    requests: Option<usize>,
    /// Serve workload: rows decoded together (default: --clients).
    #[arg(long)]
    serve_batch: Option<usize>,
    /// Serve workload: prompt lengths, `MIN-MAX` tokens drawn per request.
    #[arg(long, value_parser = parse_row_lengths, default_value = "16-64")]
    prompt_lengths: (usize, usize),
    /// Serve workload: seconds after which no request is sent, nor waited for, per run.
    #[arg(long, default_value_t = 900)]
    time_limit: u64,
}

pub fn bench(args: &BenchArgs) -> Result<(), String> {
    let gpu = peft::backend_name() != "flex";
    let batch = args.batch.unwrap_or(if gpu { 8 } else { 4 });
    let seq_len = args.seq_len.unwrap_or(if gpu { 512 } else { 128 });
    if args.new_tokens < 2
        || batch == 0
        || seq_len < 2
        || args.reps == 0
        || args.rounds == 0
        || args.gen_batch == 0
        || args.epochs == 0
    {
        return Err(
            "--new-tokens must be >= 2, --seq-len >= 2; --batch, --gen-batch, --reps, --rounds and --epochs >= 1"
                .into(),
        );
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let device = peft::default_device();
    let dtype = DType::from(args.dtype);
    let commit = git_commit();
    let methods = if args.methods.is_empty() {
        bench_methods()
    } else {
        args.methods.clone()
    };
    let python = args.compare.then(|| find_python(args)).flatten();
    if args.compare && python.is_none() {
        println!("--compare: no Python with torch, transformers and peft found; skipping");
    }
    let shape_workloads = args
        .workloads
        .iter()
        .any(|w| !matches!(w, Workload::Epoch | Workload::Serve));
    let settings = ShapeSettings {
        batch,
        seq_len,
        threads,
        commit: &commit,
        methods: &methods,
        python: python.as_deref(),
        cuda: peft::is_cuda(&device),
    };
    let mut shapes = Vec::new();
    for config in args.config.iter().filter(|_| shape_workloads) {
        shapes.push(bench_shape(args, config, &settings, &device)?);
    }

    let epoch = if args.workloads.contains(&Workload::Epoch) {
        let (model, data) = crate::epoch::epoch_inputs(args.model.as_ref(), args.data.as_ref())?;
        let records = crate::epoch::bench_epoch(
            &crate::epoch::EpochSettings {
                model: &model,
                data: &data,
                epochs: args.epochs,
                batch: args.batch.unwrap_or(8),
                num_virtual_tokens: args.num_virtual_tokens,
                lr: args.lr,
                rounds: args.rounds,
                threads,
                python: python.as_deref(),
            },
            &methods,
        )?;
        Some(json!({ "model": model, "data": data, "epochs": args.epochs, "methods": records }))
    } else {
        None
    };

    let serve = if args.workloads.contains(&Workload::Serve) {
        let clients = args.clients;
        let (record, bad) = crate::serve::bench_serve(
            &crate::serve::ServeSettings {
                config: &args.config[0],
                dtype,
                adapters: args.serve_adapters,
                num_virtual_tokens: args.num_virtual_tokens,
                clients,
                requests: args.requests.unwrap_or(clients),
                max_batch_size: args.serve_batch.unwrap_or(clients),
                prompt_lengths: args.prompt_lengths,
                new_tokens: args.new_tokens,
                time_limit: std::time::Duration::from_secs(args.time_limit),
                rounds: args.rounds,
            },
            &device,
        )?;
        if bad > 0 {
            println!("serve: {bad} responses lost or wrong");
        }
        Some(record)
    } else {
        None
    };

    let record = json!({
        "commit": commit,
        "backend": peft::backend_name(),
        "dtype": torch_dtype_name(dtype),
        "gradient_checkpointing": args.gradient_checkpointing,
        "batch": batch,
        "seq_len": seq_len,
        "gen_batch": args.gen_batch,
        "new_tokens": args.new_tokens,
        "num_virtual_tokens": args.num_virtual_tokens,
        "reps": args.reps,
        "rounds": args.rounds,
        "threads": threads,
        "shapes": shapes,
        "epoch": epoch,
        "serve": serve,
    });
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&record).expect("JSON of plain values");
    std::fs::write(&args.json, text).map_err(|e| format!("{}: {e}", args.json.display()))?;
    println!("wrote {}", args.json.display());
    Ok(())
}

/// What every shape of one invocation shares.
struct ShapeSettings<'a> {
    batch: usize,
    seq_len: usize,
    threads: usize,
    commit: &'a str,
    methods: &'a [BenchMethod],
    python: Option<&'a Path>,
    /// Whether the device is a CUDA GPU (the torch side then runs on CUDA too).
    cuda: bool,
}

/// The train, forward and generate workloads of every method on one model shape, ours and (with
/// --compare) torch's, printed as a table: one record of the JSON's `shapes`.
fn bench_shape(
    args: &BenchArgs,
    config_path: &Path,
    settings: &ShapeSettings,
    device: &Device,
) -> Result<Value, String> {
    let &ShapeSettings {
        batch,
        seq_len,
        threads,
        commit,
        methods,
        python,
        cuda,
    } = settings;
    let dtype = DType::from(args.dtype);
    let config = AutoConfig::from_file(config_path).map_err(|e| e.to_string())?;
    let geometry = config.geometry();
    println!(
        "\nmodel {} (random weights), backend {}, base {dtype:?}{}, batch {batch} x {seq_len}, generation {} x {seq_len} + {} new, {} virtual tokens, {threads} threads, commit {}",
        config_path.display(),
        peft::backend_name(),
        if args.gradient_checkpointing {
            ", gradient checkpointing"
        } else {
            ""
        },
        args.gen_batch,
        args.new_tokens,
        args.num_virtual_tokens,
        commit,
    );
    let matmul_params = matmul_params(&config);
    let matmul_size = matmul_size(cuda);
    let peak = matmul_gflops(device, dtype, matmul_size);
    println!(
        "matmul parameters {matmul_params} (a frozen-base train step costs ~4 x that in FLOPs per token); {peak:.0} GFLOP/s on a {matmul_size}^3 {dtype:?} matmul"
    );
    let rows = pseudo_random_rows(batch, seq_len, geometry.vocab_size);
    let train_rows = match args.row_lengths {
        Some((min, max)) => TrainRows::ragged(batch, min, max, geometry.vocab_size),
        None => TrainRows::uniform(rows.clone()),
    };
    if args.row_lengths.is_some() {
        println!(
            "train rows of {} tokens ({} real, {} scored, padded to {})",
            train_rows
                .lengths()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            train_rows.real_tokens(),
            train_rows.scored_tokens(),
            train_rows.padded_len(),
        );
    }
    let prompts = pseudo_random_rows(args.gen_batch, seq_len, geometry.vocab_size);
    let mut ours = Vec::new();
    let mut torch_runs = Vec::new();
    for &method in methods {
        // Rounds alternate ours and torch, so that this machine's speed drift (it moves by tens of
        // percent over minutes on a shared host) lands on both sides; each keeps its best round.
        let mut our_rounds = Vec::with_capacity(args.rounds);
        let mut torch_rounds = Vec::with_capacity(args.rounds);
        for _ in 0..args.rounds {
            our_rounds.push(bench_method(
                method,
                args,
                &config,
                device,
                &Rows {
                    train: &train_rows,
                    forward: &rows,
                    prompts: &prompts,
                },
                peak,
            )?);
            // Torch runs each method right after ours, in a fresh process: a Python process
            // keeps the memory earlier models freed.
            if let Some(python) = python {
                torch_rounds.push(run_torch(
                    python,
                    args,
                    config_path,
                    method,
                    settings,
                    &train_rows,
                )?);
            }
        }
        ours.push(best_of_rounds(our_rounds));
        if !torch_rounds.is_empty() {
            torch_runs.push(torch_rounds);
        }
    }
    let mut theirs = match python {
        Some(_) => merge_torch_runs(torch_runs),
        None if args.compare => {
            Some(json!({ "skipped": "no Python with torch + transformers + peft" }))
        }
        None => None,
    };
    // The device's matmul rate is the faster of the two sides' measurements (cuBLAS may beat
    // CubeCL's matmul, or the reverse), so that neither side's fraction of it rests on its own
    // slow kernel.
    let their_methods = theirs
        .as_mut()
        .and_then(|t| t.get_mut("methods"))
        .and_then(Value::as_array_mut);
    let device_peak = their_methods
        .iter()
        .flat_map(|methods| methods.iter())
        .filter_map(|r| r["matmul_gflops"].as_f64())
        .fold(peak, f64::max);
    for record in ours.iter_mut().chain(
        their_methods
            .into_iter()
            .flat_map(|methods| methods.iter_mut()),
    ) {
        if let Some(tokens_per_s) = record["train_tokens_per_s"].as_f64() {
            record["train_fraction_of_device_peak"] =
                json!(4.0 * matmul_params as f64 * tokens_per_s / (device_peak * 1e9));
        }
    }
    print_table(&ours, theirs.as_ref());
    Ok(json!({
        "config": config_path,
        "train_row_lengths": args.row_lengths.map(|_| train_rows.lengths().collect::<Vec<_>>()),
        "train_scored_tokens": train_rows.scored_tokens(),
        "matmul_params": matmul_params,
        "matmul_gflops": peak,
        "matmul_size": matmul_size,
        "device_matmul_gflops": device_peak,
        "ours": ours,
        "torch": theirs,
    }))
}

/// The inputs of the workloads.
struct Rows<'a> {
    train: &'a TrainRows,
    /// `batch` rows of `seq_len` tokens.
    forward: &'a [Vec<u32>],
    /// Generation prompts.
    prompts: &'a [Vec<u32>],
}

/// Every workload of one method, ours: one record of the JSON.
fn bench_method(
    method: BenchMethod,
    args: &BenchArgs,
    config: &AutoConfig,
    device: &Device,
    inputs: &Rows<'_>,
    peak: f64,
) -> Result<Value, String> {
    let geometry = config.geometry();
    let (rows, prompts) = (inputs.forward, inputs.prompts);
    let (batch, seq_len) = (rows.len(), rows[0].len());
    let matmul_params = matmul_params(config);
    let adapter_config = adapter_config(method, args.num_virtual_tokens, &geometry);
    // Absent workloads stay absent (`null` in the table).
    let mut record = json!({ "method": method.name(), "trainable_params": null });
    eprint!("{:<14}", method.name());
    if args.workloads.contains(&Workload::Train)
        && let Some(adapter_config) = &adapter_config
    {
        let mut ad = device.clone().autodiff();
        if args.gradient_checkpointing {
            ad = ad.gradient_checkpointing();
        }
        reset_peak_rss();
        let mut pools = DevicePeak::start(device);
        let base = cast_params(config.init(&ad), args.dtype.into());
        let adapter = init_adapter(adapter_config, &base);
        let model = PeftModel::new(base, adapter);
        let trainable = model.trainable_parameters().trainable;
        let dtypes = trainable_dtypes(&model);
        let seconds = time_train(model, inputs.train, args.reps, &mut pools)?;
        // Real tokens: padding is work done, not work asked for.
        let tokens_per_s = inputs.train.real_tokens() as f64 / seconds;
        record["trainable_params"] = json!(trainable);
        record["trainable_dtypes"] = json!(dtypes);
        record["train_tokens_per_s"] = json!(tokens_per_s);
        record["train_step_s"] = json!(seconds);
        // Achieved FLOP/s of the 4 N FLOPs/token estimate, over the matmul peak.
        record["train_fraction_of_matmul_peak"] =
            json!(4.0 * matmul_params as f64 * tokens_per_s / (peak * 1e9));
        record["train_peak_rss_mib"] = json!(peak_rss_mib());
        pools.record(&mut record, "train");
        eprint!(" train {tokens_per_s:.1} tok/s");
    }
    if args.workloads.contains(&Workload::Forward) {
        reset_peak_rss();
        let mut pools = DevicePeak::start(device);
        let seconds = with_model(config, device, args, adapter_config.as_ref(), |model| {
            time_forward(model, rows, args.reps, &mut pools)
        })?;
        let tokens_per_s = (batch * seq_len) as f64 / seconds;
        record["forward_tokens_per_s"] = json!(tokens_per_s);
        record["forward_peak_rss_mib"] = json!(peak_rss_mib());
        pools.record(&mut record, "forward");
        eprint!(" forward {tokens_per_s:.1} tok/s");
    }
    if args.workloads.contains(&Workload::Generate) {
        reset_peak_rss();
        let mut pools = DevicePeak::start(device);
        let (prefill, full) = with_model(config, device, args, adapter_config.as_ref(), |model| {
            let timings = time_generate(model, prompts, args.new_tokens, args.reps);
            // Pages stay reserved until a cleanup: what the pools hold now is what generation
            // needed (the cache at its longest included); the model is still alive.
            pools.sample();
            timings
        })?;
        let gen_batch = prompts.len() as f64;
        record["prefill_tokens_per_s"] = json!(gen_batch * seq_len as f64 / prefill);
        // Noise can make a short decode look free; no rate then rather than a silly one.
        record["decode_tokens_per_s"] = json!(
            (full > prefill).then(|| gen_batch * (args.new_tokens - 1) as f64 / (full - prefill))
        );
        let tokens_per_s = gen_batch * args.new_tokens as f64 / full;
        record["generate_tokens_per_s"] = json!(tokens_per_s);
        record["generate_s"] = json!(full);
        record["generate_peak_rss_mib"] = json!(peak_rss_mib());
        pools.record(&mut record, "generate");
        eprint!(" generate {tokens_per_s:.2} tok/s");
    }
    eprintln!();
    Ok(record)
}

/// The adapter of `method`, shaped as PEFT shapes it for the model (`None` for the base).
pub(crate) fn adapter_config(
    method: BenchMethod,
    num_virtual_tokens: usize,
    geometry: &peft::core::ModelGeometry,
) -> Option<AutoAdapterConfig> {
    let preset = method.preset?;
    let mut options: serde_json::Map<String, Value> =
        serde_json::from_str(method.options).expect("a bench case's options are a JSON object");
    options.insert("num_virtual_tokens".into(), json!(num_virtual_tokens));
    Some(
        preset
            .config(&options, geometry)
            .expect("the bench's cases are valid configurations"),
    )
}

/// A fresh adapter for `base` (no init text: prompt tuning starts at random here).
pub(crate) fn init_adapter(config: &AutoAdapterConfig, base: &AutoCausalLm) -> AutoAdapter {
    config
        .init(base, &[])
        .expect("the default BitFit pattern is a valid regular expression")
}

/// Runs `f` on the inference model of `adapter` (or the bare base).
fn with_model<T>(
    config: &AutoConfig,
    device: &Device,
    args: &BenchArgs,
    adapter: Option<&AutoAdapterConfig>,
    f: impl FnOnce(Inference<'_>) -> Result<T, String>,
) -> Result<T, String> {
    let base = cast_params(config.init(device), args.dtype.into());
    match adapter {
        None => f(Inference::Base(&base)),
        Some(adapter) => {
            let adapter = init_adapter(adapter, &base);
            let model = PeftModel::new(base, adapter);
            f(Inference::Peft(&model))
        }
    }
}

enum Inference<'a> {
    Base(&'a AutoCausalLm),
    Peft(&'a PeftModel<AutoCausalLm, AutoAdapter>),
}

/// Parameters that take part in a matmul per token: everything but the input embedding (a
/// lookup), plus the output projection when it is tied to that embedding.
fn matmul_params(config: &AutoConfig) -> usize {
    let sizes: Vec<(String, usize)> = config
        .parameter_shapes()
        .into_iter()
        .map(|(name, shape)| (name, shape.iter().product()))
        .collect();
    let is_embedding =
        |name: &str| name.contains("embed_tokens") || name.contains("word_embeddings.");
    let body: usize = sizes
        .iter()
        .filter(|(name, _)| !is_embedding(name))
        .map(|(_, n)| n)
        .sum();
    let geometry = config.geometry();
    let untied = sizes.iter().any(|(name, _)| name.starts_with("lm_head"));
    body + if untied {
        0
    } else {
        geometry.vocab_size * geometry.hidden_size
    }
}

/// The dtypes of `module`'s trainable parameters, as torch names them (`["float32"]`).
fn trainable_dtypes<M: Module>(module: &M) -> Vec<String> {
    let dtypes: BTreeSet<&str> = param_infos(module)
        .into_iter()
        .filter(|p| p.trainable)
        .map(|p| torch_dtype_name(p.dtype))
        .collect();
    dtypes.into_iter().map(String::from).collect()
}

/// torch's name of a float dtype.
fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// The side of the square matmul whose rate stands for the device's peak: 8192 on a GPU, where
/// 2048^3 (17 GFLOP, some 25 microseconds on an H100) leaves the matrix units partly idle and would
/// make every fraction of it look better than it is; 2048 on a CPU, where that size is already at
/// the peak and 8192^3 would take minutes.
fn matmul_size(cuda: bool) -> usize {
    if cuda { 8192 } else { 2048 }
}

/// GFLOP/s of an `n` x `n` x `n` matmul in `dtype` on `device` (median of 3 after a warm-up): the
/// attainable peak that training fractions are quoted against.
fn matmul_gflops(device: &Device, dtype: DType, n: usize) -> f64 {
    let a = Tensor::<2>::random([n, n], burn::tensor::Distribution::Default, device).cast(dtype);
    let b = Tensor::<2>::random([n, n], burn::tensor::Distribution::Default, device).cast(dtype);
    let seconds = timed(3, || {
        let c = a.clone().matmul(b.clone());
        let _ = c.slice([0..1, 0..1]).into_data();
        Ok(())
    })
    .expect("a matmul does not fail");
    2.0 * (n as f64).powi(3) / seconds / 1e9
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Times `run` once to warm up, then `reps` times; the median in seconds.
fn timed(reps: usize, mut run: impl FnMut() -> Result<(), String>) -> Result<f64, String> {
    run()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        run()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

fn batch_tensors(rows: &[Vec<u32>], device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let (b, s) = (rows.len(), rows[0].len());
    let ids: Vec<i64> = rows.iter().flatten().map(|&t| i64::from(t)).collect();
    let input_ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, s]), device);
    let mask = Tensor::<2, Int>::ones([b, s], device);
    (input_ids, mask)
}

/// The peak of a device's memory pools over a workload, from readings at chosen points.
///
/// burn 0.22 reports what CubeCL's pools hold now (`Device::memory_pool_usage`) but keeps no
/// high-water mark, and a reading waits for the queued work, so the bench reads only during the
/// warm-up run, where the timing does not count: in a training step after the loss (the
/// activations saved for backward are live), after backward (the gradients too) and after the
/// optimizer step. Pages stay reserved until [`DevicePeak::start`]'s cleanup, except those an
/// outgrowing allocation retires, so the reserved peak is close to exact; the live bytes between
/// readings (inside backward) are not seen, so that one is a lower bound. `None` on backends
/// without pools (Flex).
struct DevicePeak {
    device: Device,
    reserved: Option<u64>,
    in_use: Option<u64>,
}

impl DevicePeak {
    /// Returns the pages earlier workloads left for reuse, then takes a first reading.
    fn start(device: &Device) -> Self {
        device.memory_cleanup();
        let mut peak = Self {
            device: device.clone(),
            reserved: None,
            in_use: None,
        };
        peak.sample();
        peak
    }

    fn sample(&mut self) {
        if let Some(usage) = self.device.memory_pool_usage() {
            self.reserved = self.reserved.max(Some(usage.bytes_reserved));
            self.in_use = self.in_use.max(Some(usage.bytes_in_use));
        }
    }

    /// `{workload}_peak_device_mib` and `{workload}_peak_device_in_use_mib`, when measured.
    fn record(&self, record: &mut Value, workload: &str) {
        let mib = |bytes: Option<u64>| bytes.map(|b| b as f64 / (1u64 << 20) as f64);
        if let Some(reserved) = mib(self.reserved) {
            record[format!("{workload}_peak_device_mib")] = json!(reserved);
        }
        if let Some(in_use) = mib(self.in_use) {
            record[format!("{workload}_peak_device_in_use_mib")] = json!(in_use);
        }
    }
}

fn time_train(
    model: PeftModel<AutoCausalLm, AutoAdapter>,
    rows: &TrainRows,
    reps: usize,
    pools: &mut DevicePeak,
) -> Result<f64, String> {
    let device = model.base.device();
    let mut optimizer = AdamWConfig::new().init();
    let mut model = Some(model);
    let mut warm_up = true;
    timed(reps, || {
        let current = model.take().expect("the model is put back after each step");
        let (input_ids, mask, labels) = rows.tensors(&device);
        let loss = current.loss(input_ids, Some(mask), labels);
        if warm_up {
            pools.sample();
        }
        let grads = GradientsParams::from_grads(loss.backward(), &current);
        if warm_up {
            pools.sample();
        }
        // Clipped as the training loop clips (torch's side calls clip_grad_norm_).
        let clip = clip_coefficient(global_grad_norm(&current, &grads), Some(1.0));
        let stepped = optimizer.step(current, grads, 1e-4, clip);
        device.sync().map_err(|e| format!("{e:?}"))?;
        if warm_up {
            pools.sample();
            warm_up = false;
        }
        model = Some(stepped);
        Ok(())
    })
}

fn time_forward(
    model: Inference<'_>,
    rows: &[Vec<u32>],
    reps: usize,
    pools: &mut DevicePeak,
) -> Result<f64, String> {
    let mut warm_up = true;
    timed(reps, || {
        let logits = match model {
            Inference::Base(base) => {
                let (input_ids, mask) = batch_tensors(rows, &base.device());
                base.forward_ids(input_ids, Some(mask))
            }
            Inference::Peft(peft) => {
                let (input_ids, mask) = batch_tensors(rows, &peft.base.device());
                peft.forward(input_ids, Some(mask))
            }
        };
        // Reading one value waits for the whole computation on every backend.
        let _ = logits.clone().slice([0..1, 0..1, 0..1]).into_data();
        if warm_up {
            // The logits are still live.
            pools.sample();
            warm_up = false;
        }
        Ok(())
    })
}

/// Median seconds of generating 1 token (prefill) and `new_tokens` tokens.
fn time_generate(
    model: Inference<'_>,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    reps: usize,
) -> Result<(f64, f64), String> {
    let run = |n: usize| -> Result<(), String> {
        let config = GenerationConfig::new().with_max_new_tokens(n);
        let out = match model {
            Inference::Base(base) => generate(base, prompts, Injection::default(), &config, |_| {
                ControlFlow::Continue(())
            }),
            Inference::Peft(peft) => peft.generate(prompts, &config, |_| ControlFlow::Continue(())),
        }
        .map_err(|e| e.to_string())?;
        debug_assert!(out.new_tokens.iter().all(|r| r.len() == n));
        Ok(())
    };
    let prefill = timed(reps, || run(1))?;
    let full = timed(reps, || run(new_tokens))?;
    Ok((prefill, full))
}

/// The train workload's batch: rows as `peft train` tokenizes them (ids, and labels that score
/// the completion only), padded into tensors by the trainer's own [`Batch::collate`].
struct TrainRows {
    rows: Vec<TokenizedExample>,
}

impl TrainRows {
    /// Rows of one length, every token scored: a causal-LM step on plain text (PEFT shifts the
    /// labels the same way).
    fn uniform(rows: Vec<Vec<u32>>) -> Self {
        Self {
            rows: rows.into_iter().map(|ids| example(ids, 0)).collect(),
        }
    }

    /// `batch` rows of `min..=max` tokens (pseudo-random, the same on every run), each a prompt
    /// and a completion of its last third (at least one token), which alone is scored.
    fn ragged(batch: usize, min: usize, max: usize, vocab: usize) -> Self {
        let lengths = pseudo_random_rows(1, batch, max - min + 1)
            .remove(0)
            .into_iter()
            .map(|offset| min + offset as usize);
        let rows = pseudo_random_rows(batch, max, vocab)
            .into_iter()
            .zip(lengths)
            .map(|(mut ids, len)| {
                ids.truncate(len);
                example(ids, prompt_len(len))
            })
            .collect();
        Self { rows }
    }

    fn lengths(&self) -> impl Iterator<Item = usize> + '_ {
        self.rows.iter().map(|row| row.input_ids.len())
    }

    fn padded_len(&self) -> usize {
        self.lengths().max().unwrap_or(0)
    }

    fn real_tokens(&self) -> usize {
        self.lengths().sum()
    }

    /// Tokens the loss scores without virtual tokens (a row's first token predicts nothing).
    fn scored_tokens(&self) -> usize {
        Batch::scored_labels(&self.rows.iter().collect::<Vec<_>>(), 0)
    }

    /// `input_ids`, `attention_mask` and `labels`, `[batch, longest]`, padded on the right with
    /// token 0 as the trainer pads a batch.
    fn tensors(&self, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>, Tensor<2, Int>) {
        // The virtual-token count only sets `Batch::scored`, which the bench does not read.
        let batch = Batch::collate(&self.rows.iter().collect::<Vec<_>>(), 0, 0, device);
        (batch.input_ids, batch.attention_mask, batch.labels)
    }
}

/// A training row of `ids` whose first `prompt_len` tokens are not scored.
fn example(ids: Vec<u32>, prompt_len: usize) -> TokenizedExample {
    let labels = ids
        .iter()
        .enumerate()
        .map(|(j, &t)| {
            if j < prompt_len {
                IGNORE_INDEX
            } else {
                i64::from(t)
            }
        })
        .collect();
    TokenizedExample {
        line: 0,
        input_ids: ids,
        labels,
        prompt_len,
        is_text: prompt_len == 0,
        truncated: false,
    }
}

/// Where the scored completion of a ragged row of `len` tokens starts: its last third, at least
/// one token (`scripts/bench_torch.py` splits rows the same way).
fn prompt_len(len: usize) -> usize {
    len - (len / 3).max(1)
}

/// `--row-lengths MIN-MAX`.
fn parse_row_lengths(text: &str) -> Result<(usize, usize), String> {
    let (min, max) = text
        .split_once('-')
        .ok_or_else(|| format!("expected MIN-MAX (e.g. 10-80), got {text:?}"))?;
    let parse = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|e| format!("--row-lengths {text:?}: {v:?}: {e}"))
    };
    let (min, max) = (parse(min)?, parse(max)?);
    if min < 2 || max < min || max > 1 << 20 {
        return Err(format!(
            "--row-lengths {text:?}: need 2 <= MIN <= MAX <= 1048576 (a row scores at least one token after its first)"
        ));
    }
    Ok((min, max))
}

/// Deterministic pseudo-random token rows (xorshift), the same on every run.
fn pseudo_random_rows(rows: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    let mut state = 0x2545F4914F6CDD1Du64;
    (0..rows)
        .map(|_| {
            (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}

/// Resets the resident-memory high-water mark (Linux: `5` into `clear_refs`).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory of this process in MiB since the last reset (Linux `VmHWM`).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The checked-out commit, `-dirty` when the working tree has uncommitted changes; where there is
/// no repository (the device tool sends the working tree
/// without `.git`), `PEFT_COMMIT`, which `scripts/gpu_session.sh` sets from the file the build
/// step wrote beside the binary.
fn git_commit() -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=7"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .or_else(|| std::env::var("PEFT_COMMIT").ok())
        .unwrap_or_else(|| "unknown".into())
}

fn find_python(args: &BenchArgs) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match &args.python {
        Some(p) => vec![p.clone()],
        None => vec![PathBuf::from(".venv/bin/python"), PathBuf::from("python3")],
    };
    candidates.into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import torch, transformers, peft"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// One method's workloads through `scripts/bench_torch.py`.
fn run_torch(
    python: &Path,
    args: &BenchArgs,
    config: &Path,
    method: BenchMethod,
    settings: &ShapeSettings,
    train_rows: &TrainRows,
) -> Result<Value, String> {
    let &ShapeSettings {
        batch,
        seq_len,
        threads,
        cuda,
        ..
    } = settings;
    let script = Path::new("scripts/bench_torch.py");
    let lengths = args.row_lengths.map(|_| {
        train_rows
            .lengths()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",")
    });
    // The torch side runs where ours does.
    let device = if cuda { "cuda" } else { "cpu" };
    let join = |names: Vec<&str>| names.join(",");
    let out = Command::new(python)
        .arg(script)
        .args(["--config", &config.to_string_lossy()])
        .args(["--methods", method.name()])
        .args([
            "--workloads",
            &join(
                args.workloads
                    .iter()
                    .filter(|w| **w != Workload::Epoch)
                    .map(|w| w.name())
                    .collect(),
            ),
        ])
        .args(["--batch", &batch.to_string()])
        .args(["--seq-len", &seq_len.to_string()])
        .args(["--gen-batch", &args.gen_batch.to_string()])
        .args(["--new-tokens", &args.new_tokens.to_string()])
        .args(["--num-virtual-tokens", &args.num_virtual_tokens.to_string()])
        .args(["--reps", &args.reps.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--device", device])
        .args(["--matmul-size", &matmul_size(cuda).to_string()])
        .args(["--dtype", torch_dtype_name(args.dtype.into())])
        .args(
            args.gradient_checkpointing
                .then_some("--gradient-checkpointing"),
        )
        .args(lengths.iter().flat_map(|l| ["--row-lengths", l.as_str()]))
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!("{} {} failed", python.display(), script.display()));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .map_err(|e| format!("unexpected output of {}: {e}: {stdout}", script.display()))
}

/// One record of the torch runs (per method, per round): the first run's engine fields and each
/// method's best round, every record with the matmul rate its own run measured.
fn merge_torch_runs(runs: Vec<Vec<Value>>) -> Option<Value> {
    let mut methods = Vec::new();
    for rounds in &runs {
        let records = rounds.iter().flat_map(|run| {
            run["methods"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|record| {
                    let mut record = record.clone();
                    record["matmul_gflops"] = run["matmul_gflops"].clone();
                    record
                })
        });
        methods.push(best_of_rounds(records.collect()));
    }
    let mut merged = runs.into_iter().flatten().next()?;
    merged["methods"] = Value::Array(methods);
    Some(merged)
}

/// One method's record from its rounds: each rate the highest, each duration and peak the
/// lowest; every round under `"rounds"` when there were several.
fn best_of_rounds(rounds: Vec<Value>) -> Value {
    let mut best = rounds.first().cloned().unwrap_or(Value::Null);
    if rounds.len() < 2 {
        return best;
    }
    let Some(fields) = best.as_object_mut() else {
        return best;
    };
    for (key, value) in fields.iter_mut() {
        let values = rounds
            .iter()
            .filter_map(|r| r.get(key).and_then(Value::as_f64));
        let higher_is_better =
            key.ends_with("_per_s") || key.ends_with("_gflops") || key.contains("fraction");
        let lower_is_better = key.ends_with("_s") || key.ends_with("_mib");
        let pick = if higher_is_better {
            values.reduce(f64::max)
        } else if lower_is_better {
            values.reduce(f64::min)
        } else {
            continue;
        };
        if let Some(x) = pick {
            *value = json!(x);
        }
    }
    best["rounds"] = Value::Array(rounds);
    best
}

const COLUMNS: [(&str, &str); 8] = [
    ("train_tokens_per_s", "train tok/s"),
    ("train_fraction_of_device_peak", "train %peak"),
    ("train_peak_rss_mib", "train MiB"),
    ("train_peak_device_mib", "train dev MiB"),
    ("forward_tokens_per_s", "forward tok/s"),
    ("prefill_tokens_per_s", "prefill tok/s"),
    ("decode_tokens_per_s", "decode tok/s"),
    ("generate_tokens_per_s", "gen tok/s"),
];

fn print_table(ours: &[Value], theirs: Option<&Value>) {
    print!("\n{}", format_table(ours, theirs));
}

/// The tables of a bench JSON (`bench --json`'s record), one per shape, as [`print_table`]
/// prints them.
pub fn table_of(record: &Value) -> String {
    let mut out = String::new();
    for shape in record["shapes"].as_array().into_iter().flatten() {
        let ours = shape["ours"].as_array().cloned().unwrap_or_default();
        out.push_str(&format!(
            "{}, {} base, batch {} x {}; {:.0} GFLOP/s on a {}^3 matmul (ours), {:.0} the \
             faster side's; train %peak: 4 x {} matmul parameters x tokens/s over the latter\n",
            shape["config"].as_str().unwrap_or("?"),
            record["dtype"].as_str().unwrap_or("?"),
            record["batch"],
            record["seq_len"],
            shape["matmul_gflops"].as_f64().unwrap_or(f64::NAN),
            shape["matmul_size"],
            shape["device_matmul_gflops"].as_f64().unwrap_or(f64::NAN),
            shape["matmul_params"],
        ));
        out.push_str(&format_table(&ours, shape.get("torch")));
    }
    out
}

/// Ours against torch's per method and column, and their ratio.
fn format_table(ours: &[Value], theirs: Option<&Value>) -> String {
    use std::fmt::Write;
    let theirs: Vec<Value> = theirs
        .and_then(|t| t.get("methods"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
    let cell = |key: &str, x: Option<f64>| match x {
        // A fraction of the matmul peak reads as a percentage.
        Some(x) if key.contains("fraction") => format!("{:.1}%", 100.0 * x),
        Some(x) => format!("{x:.1}"),
        None => "-".to_string(),
    };
    let mut out = String::new();
    let _ = write!(out, "{:<14} {:<8}", "method", "engine");
    for (_, title) in COLUMNS {
        let _ = write!(out, " {title:>14}");
    }
    out.push('\n');
    for record in ours {
        let method = record["method"].as_str().unwrap_or("?");
        let _ = write!(out, "{method:<14} {:<8}", "burn");
        for (key, _) in COLUMNS {
            let _ = write!(out, " {:>14}", cell(key, num(record, key)));
        }
        out.push('\n');
        let Some(other) = theirs.iter().find(|t| t["method"].as_str() == Some(method)) else {
            continue;
        };
        let _ = write!(out, "{:<14} {:<8}", "", "torch");
        for (key, _) in COLUMNS {
            let _ = write!(out, " {:>14}", cell(key, num(other, key)));
        }
        out.push('\n');
        let _ = write!(out, "{:<14} {:<8}", "", "ratio");
        for (key, _) in COLUMNS {
            let ratio = match (num(record, key), num(other, key)) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            let _ = write!(out, " {ratio:>14}");
        }
        out.push('\n');
    }
    out.push_str("(ratio = burn / torch: above 1 is faster for tok/s, lighter below 1 for MiB)\n");
    for other in &theirs {
        if let (Some(method), Some(error)) = (
            other["method"].as_str(),
            other.get("train_error").and_then(Value::as_str),
        ) {
            let _ = writeln!(out, "torch {method} train failed: {error}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ragged_rows_are_padded_on_the_right_and_score_their_completions_only() {
        let device = Device::default();
        let rows = TrainRows::ragged(8, 10, 80, 1000);
        let lengths: Vec<usize> = rows.lengths().collect();
        assert!(lengths.iter().all(|n| (10..=80).contains(n)), "{lengths:?}");
        assert!(lengths.iter().any(|&n| n != lengths[0]), "{lengths:?}");
        // The same rows on every run (the torch side gets these lengths).
        assert_eq!(TrainRows::ragged(8, 10, 80, 1000).rows, rows.rows);

        let (ids, mask, labels) = rows.tensors(&device);
        let s = rows.padded_len();
        assert_eq!(ids.dims(), [8, s]);
        let mask: Vec<i64> = mask.into_data().convert::<i64>().try_to_vec().unwrap();
        let labels: Vec<i64> = labels.into_data().convert::<i64>().try_to_vec().unwrap();
        let ids: Vec<i64> = ids.into_data().convert::<i64>().try_to_vec().unwrap();
        let mut scored = 0;
        for (i, &n) in lengths.iter().enumerate() {
            let prompt = n - (n / 3).max(1);
            for j in 0..s {
                let at = i * s + j;
                assert_eq!(mask[at], i64::from(j < n));
                let expected = if (prompt..n).contains(&j) {
                    ids[at]
                } else {
                    IGNORE_INDEX
                };
                assert_eq!(labels[at], expected, "row {i} position {j}");
                scored += usize::from(expected != IGNORE_INDEX);
            }
        }
        assert_eq!(rows.scored_tokens(), scored);
        assert_eq!(rows.real_tokens(), lengths.iter().sum::<usize>());
    }

    #[test]
    fn row_lengths_must_be_an_ordered_range_of_at_least_two_tokens() {
        assert_eq!(parse_row_lengths("10-80"), Ok((10, 80)));
        for bad in ["80-10", "1-5", "10", "a-b", "10-99999999"] {
            assert!(parse_row_lengths(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn device_peak_reads_the_pools_of_cubecl_and_nothing_on_flex() {
        let device = Device::default();
        let mut pools = DevicePeak::start(&device);
        // 4 MiB of f32, live while sampled.
        let tensor = Tensor::<2>::ones([1024, 1024], &device) * 2.0;
        let _ = tensor.clone().slice([0..1, 0..1]).into_data();
        pools.sample();
        let mut record = json!({});
        pools.record(&mut record, "train");
        if peft::backend_name() == "flex" {
            assert_eq!(record, json!({}));
            return;
        }
        let reserved = record["train_peak_device_mib"].as_f64().unwrap();
        let in_use = record["train_peak_device_in_use_mib"].as_f64().unwrap();
        assert!(in_use >= 4.0, "{record}");
        assert!(reserved >= in_use, "{record}");
        drop(tensor);
        // The peak stays when the tensor goes.
        pools.sample();
        let mut after = json!({});
        pools.record(&mut after, "train");
        assert_eq!(after, record);
    }

    #[test]
    fn best_of_rounds_takes_each_sides_best_and_keeps_every_round() {
        let rounds = vec![
            json!({ "method": "prompt-tuning", "trainable_params": 8960, "train_tokens_per_s": 20.0,
                    "train_step_s": 25.6, "train_peak_rss_mib": 2900.0, "decode_tokens_per_s": null }),
            json!({ "method": "prompt-tuning", "trainable_params": 8960, "train_tokens_per_s": 25.6,
                    "train_step_s": 20.0, "train_peak_rss_mib": 2800.0, "decode_tokens_per_s": 4.0 }),
        ];
        let best = best_of_rounds(rounds.clone());
        assert_eq!(best["train_tokens_per_s"], json!(25.6));
        assert_eq!(best["train_step_s"], json!(20.0));
        assert_eq!(best["train_peak_rss_mib"], json!(2800.0));
        assert_eq!(best["decode_tokens_per_s"], json!(4.0));
        assert_eq!(best["trainable_params"], json!(8960));
        assert_eq!(best["rounds"], Value::Array(rounds.clone()));
        // One round is reported as it is.
        assert_eq!(best_of_rounds(rounds[..1].to_vec()), rounds[0]);
    }
}
