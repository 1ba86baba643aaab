//! `peft quickstart`: every method learns a task on the embedded default model, in minutes on a
//! CPU, with held-out accuracy before and after.
//!
//! The model in `assets/tiny-qwen2` was pretrained by `cargo xtask pretrain` on the string tasks
//! of [`crate::tasks`], each introduced by its name ("reverse: abcd -> dcba"). Here the rows carry
//! no instruction ("abcd -> dcba"), so the untrained adapter leaves the model guessing which task
//! is meant; each method has to learn it from the examples alone. Held-out words never appear in
//! the training rows.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::DType;
use peft_core::{PeftModel, TrainableParameters};
use peft_models::AutoCausalLm;
use peft_train::data::ALPACA_TEMPLATE;
use peft_train::trainer::{METRICS_FILE, TrainingConfig, TrainingRun, read_metrics, train};
use rand::{SeedableRng, rngs::StdRng};

use crate::cli::{CliError, EncoderArg, InitArg, Method, MethodArgs};
use crate::plot::write_loss_curve;
use crate::tasks::{TASKS, bare_prompt, random_word, task};
use crate::training::{DataArgs, LOSS_CURVE, ModelText, Progress, io_error, read_data};

/// Arguments of `peft quickstart`.
#[derive(Debug, clap::Args)]
pub struct QuickstartArgs {
    /// Model directory [default: the embedded assets/tiny-qwen2].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The task to learn (one the model was pretrained on, with its instruction).
    #[arg(long, default_value = "sort")]
    pub task: String,
    /// Where data, adapters, metrics and loss curves go.
    #[arg(long, default_value = "target/quickstart")]
    pub output: PathBuf,
    /// Methods to train, comma-separated [default: every method's presets].
    #[arg(long, value_parser = crate::cli::method_parser(), value_delimiter = ',')]
    pub methods: Vec<Method>,
    /// Training rows.
    #[arg(long, default_value_t = 640)]
    pub train_rows: usize,
    /// Held-out rows.
    #[arg(long, default_value_t = 100)]
    pub eval_rows: usize,
    /// Passes over the training rows.
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    /// Seed of the data, the adapters' initialization and the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Learning rate of every method [default: per method, see docs/training.md].
    #[arg(long)]
    pub lr: Option<f64>,
}

/// The embedded default model's directory.
pub fn default_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/tiny-qwen2")
}

/// What one method achieved.
#[derive(Debug, Clone)]
pub struct MethodResult {
    /// The method.
    pub method: Method,
    /// Its trainable parameters.
    pub parameters: TrainableParameters,
    /// Held-out exact match of the untrained adapter.
    pub accuracy_before: f64,
    /// Held-out exact match after training.
    pub accuracy_after: f64,
    /// Held-out loss before and after.
    pub loss: (f64, f64),
    /// Mean training loss of the first and last epoch.
    pub train_loss: (f64, f64),
    /// Wall time of the training run (evaluations included).
    pub seconds: f64,
}

/// The method settings of the quickstart: PEFT's defaults but for a few virtual tokens.
fn method_args(method: Method) -> MethodArgs {
    MethodArgs {
        method,
        num_virtual_tokens: 8,
        // Rows of random words' embeddings: the prompt starts at the scale of real tokens.
        prompt_tuning_init: InitArg::SampleVocab,
        prompt_tuning_init_text: None,
        encoder_reparameterization_type: EncoderArg::Mlp,
        encoder_hidden_size: None,
        encoder_num_layers: 2,
        encoder_dropout: 0.0,
        prefix_projection: None,
        prefix_zero_init: false,
        prefix_init_text: None,
        prefix_init_plain: false,
        bias_pattern: None,
        options: Vec::new(),
    }
}

/// Writes `rows` (prompt, completion) as JSONL.
fn write_rows(path: &Path, rows: &[(String, String)]) -> Result<(), CliError> {
    let text: String = rows
        .iter()
        .map(|(prompt, completion)| {
            let row = serde_json::json!({"prompt": prompt, "completion": completion});
            format!("{row}\n")
        })
        .collect();
    peft_core::adapter_file::write_atomic(path, text.as_bytes()).map_err(|source| CliError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// (prompt, completion) rows.
type Rows = Vec<(String, String)>;

/// Train and held-out rows of `task`: distinct words, none shared between the two.
fn make_rows(
    task_name: &str,
    train_rows: usize,
    eval_rows: usize,
    seed: u64,
) -> Result<(Rows, Rows), CliError> {
    let task = task(task_name).ok_or_else(|| CliError::Argument {
        flag: "--task",
        message: format!(
            "unknown task {task_name:?}; one of {}",
            TASKS.map(|t| t.name).join(", ")
        ),
    })?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen = HashSet::new();
    let mut rows = Vec::new();
    while rows.len() < train_rows + eval_rows {
        let word = random_word(&mut rng);
        if seen.insert(word.clone()) {
            rows.push((bare_prompt(&word), (task.apply)(&word)));
        }
    }
    let eval = rows.split_off(train_rows);
    Ok((rows, eval))
}

/// The hyper-parameters of one method's run.
fn training_config(args: &QuickstartArgs, method: Method) -> TrainingConfig {
    TrainingConfig::new()
        .with_lr(args.lr.unwrap_or(method.preset.tiny_model_learning_rate))
        .with_epochs(args.epochs)
        .with_batch_size(16)
        .with_eval_batch_size(50)
        .with_seed(args.seed)
}

/// Runs the quickstart, printing progress and the final table to `out`.
pub fn quickstart(
    args: &QuickstartArgs,
    device: &Device,
    out: &mut dyn Write,
) -> Result<Vec<MethodResult>, CliError> {
    let model_dir = args.model.clone().unwrap_or_else(default_model_dir);
    if args.train_rows == 0 || args.eval_rows == 0 {
        return Err(CliError::Argument {
            flag: "--train-rows",
            message: "--train-rows and --eval-rows must be at least 1".into(),
        });
    }
    let methods = if args.methods.is_empty() {
        peft::presets()
    } else {
        args.methods.clone()
    };
    let (train_rows, eval_rows) =
        make_rows(&args.task, args.train_rows, args.eval_rows, args.seed)?;
    // Everything the flags and the model can get wrong is checked before a file is written.
    let text = ModelText::read(&model_dir)?;
    let geometry = text.config.geometry();
    for &method in &methods {
        method_args(method).config(&geometry)?;
        training_config(args, method).validate()?;
    }
    std::fs::create_dir_all(&args.output).map_err(|source| CliError::Io {
        path: args.output.clone(),
        source,
    })?;
    let (train_path, eval_path) = (
        args.output.join("train.jsonl"),
        args.output.join("eval.jsonl"),
    );
    write_rows(&train_path, &train_rows)?;
    write_rows(&eval_path, &eval_rows)?;

    let special = &text.special;
    let rows = DataArgs {
        max_length: 64,
        template: ALPACA_TEMPLATE.to_string(),
        skip_bad_rows: false,
        train_on: crate::training::TrainOnArg::All,
        chat_template: None,
    };
    let (train_data, eval_data) = (
        read_data(&text, &train_path, &rows)?,
        read_data(&text, &eval_path, &rows)?,
    );
    let example = &train_rows[0];
    writeln!(
        out,
        "quickstart: {} learns \"{}\" from {} examples like {:?} -> {:?} (no instruction); \
         {} held-out words\n",
        model_dir.display(),
        args.task,
        train_rows.len(),
        example.0,
        example.1,
        eval_rows.len()
    )
    .map_err(io_error)?;

    let train_device = device.clone().autodiff();
    let mut results = Vec::new();
    for method in methods {
        let started = Instant::now();
        let base = AutoCausalLm::from_pretrained(&model_dir, &train_device, DType::F32)?;
        let adapter_config = method_args(method).config(&peft_core::CausalLm::geometry(&base))?;
        train_device.seed(args.seed);
        let adapter = adapter_config
            .init(&base, &[])
            .map_err(crate::cli::adapter_init_error)?;
        let model = PeftModel::new(base, adapter);
        let parameters = model.trainable_parameters();
        let config = training_config(args, method);
        let dir = args.output.join(method_name(method));
        // A rerun starts over rather than resuming an older run.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|source| CliError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        let run = TrainingRun {
            output_dir: dir.clone(),
            pad_token_id: special.pad_token_id,
            eos_token_ids: special.eos_token_ids.clone(),
            base_model_name_or_path: model_dir.to_str().map(str::to_string),
            resume: false,
            devices: Vec::new(),
            gradient_sync: Default::default(),
        };
        let mut progress = Progress::new(out, &format!("{:<14}", method_name(method)), false);
        let outcome = train(
            model,
            &train_data.examples,
            Some(&eval_data.examples),
            &config,
            &run,
            &mut progress,
        )?;
        progress.finish()?;
        outcome
            .model
            .save_pretrained(&dir, run.base_model_name_or_path.as_deref())?;
        let metrics = read_metrics(&dir.join(METRICS_FILE))?;
        write_loss_curve(&dir.join(LOSS_CURVE), &metrics)?;
        let result = summarize(
            method,
            parameters,
            &metrics,
            config.steps_per_epoch(train_data.examples.len()),
            started,
        );
        writeln!(
            out,
            "{:<14} exact match {:>5.1}% -> {:>5.1}%  ({:.0}s)",
            method_name(method),
            result.accuracy_before * 100.0,
            result.accuracy_after * 100.0,
            result.seconds
        )
        .map_err(io_error)?;
        results.push(result);
    }
    write_table(out, &results, &args.output)?;
    Ok(results)
}

fn method_name(method: Method) -> &'static str {
    method.preset.name
}

fn summarize(
    method: Method,
    parameters: TrainableParameters,
    metrics: &[peft_train::trainer::MetricsLine],
    steps_per_epoch: usize,
    started: Instant,
) -> MethodResult {
    use peft_train::trainer::MetricsLine;
    let evals: Vec<_> = metrics
        .iter()
        .filter_map(|m| match m {
            MetricsLine::Eval(e) => Some(e),
            MetricsLine::Train(_) => None,
        })
        .collect();
    let train: Vec<f64> = metrics
        .iter()
        .filter_map(|m| match m {
            MetricsLine::Train(t) => Some(t.loss),
            MetricsLine::Eval(_) => None,
        })
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let first = evals.first().expect("evaluated before training");
    let last = evals.last().expect("evaluated after training");
    let epoch = steps_per_epoch.min(train.len());
    MethodResult {
        method,
        parameters,
        accuracy_before: first.exact_match.unwrap_or(0.0),
        accuracy_after: last.exact_match.unwrap_or(0.0),
        loss: (first.loss, last.loss),
        train_loss: (mean(&train[..epoch]), mean(&train[train.len() - epoch..])),
        seconds: started.elapsed().as_secs_f64(),
    }
}

fn write_table(
    out: &mut dyn Write,
    results: &[MethodResult],
    output: &Path,
) -> Result<(), CliError> {
    let mut table = String::from(
        "\n| method        | trainable params | held-out exact match: before -> after | held-out loss: before -> after | train loss: epoch 1 -> last | time |\n\
         |---|---:|---|---|---|---:|\n",
    );
    for r in results {
        table += &format!(
            "| {:<13} | {:>16} | {:>5.1}% -> {:>5.1}% | {:.3} -> {:.3} | {:.3} -> {:.3} | {:.0}s |\n",
            method_name(r.method),
            peft_core::params::thousands(r.parameters.trainable),
            r.accuracy_before * 100.0,
            r.accuracy_after * 100.0,
            r.loss.0,
            r.loss.1,
            r.train_loss.0,
            r.train_loss.1,
            r.seconds
        );
    }
    table += &format!(
        "\nAdapters, metrics.jsonl and loss_curve.png per method in {}/<method>/.\n",
        output.display()
    );
    write!(out, "{table}").map_err(io_error)
}
