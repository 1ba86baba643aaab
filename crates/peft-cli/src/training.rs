//! `peft train` and `peft eval`: data files in, an adapter directory out, progress on the
//! terminal, metrics and a loss curve beside the adapter.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use peft_core::{Adapter, PeftModel};
use peft_models::{
    AutoCausalLm, AutoConfig, ChatMessage, ChatTemplate, ModelError, SpecialTokens, Tokenizer,
    load_tokenizer, model_file,
};
use peft_train::data::{
    ALPACA_TEMPLATE, ChatOptions, DataOptions, Dataset, TextEncoder, TokenizeOptions,
    TokenizedDataset, TokenizedExample, TokenizerEncoder, TrainOn,
};
use peft_train::optim::AdamWConfig;
use peft_train::trainer::{
    EvalMetrics, EvalOptions, GradientSync, METRICS_FILE, StepMetrics, TrainingConfig,
    TrainingObserver, TrainingPlan, TrainingRun, evaluate, read_metrics, train,
};

use crate::cli::{CliError, Dtype, MethodArgs, adapter_init_error};
use crate::plot::write_loss_curve;
use peft::{AutoAdapter, AutoAdapterConfig};

/// Loss-curve image written beside the adapter.
pub const LOSS_CURVE: &str = "loss_curve.png";

/// How JSONL rows become training examples (shared by `train` and `eval`).
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Most real tokens per row (prompt + target + EOS). Longer prompts lose their first
    /// tokens; a target that does not fit is a bad row.
    #[arg(long, default_value_t = 256)]
    pub max_length: usize,
    /// Template of {"instruction", "input", "output"} rows.
    #[arg(long, default_value = ALPACA_TEMPLATE)]
    pub template: String,
    /// Skip (and count) bad rows instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Chat rows ({"messages": [...]}): which assistant turns the loss scores.
    #[arg(long, value_enum, default_value = "all")]
    pub train_on: TrainOnArg,
    /// Chat rows: a Jinja chat template file to use instead of the model's.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
}

/// `--train-on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainOnArg {
    /// Every assistant turn.
    All,
    /// The last assistant turn only.
    Last,
}

/// `--gradient-sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GradientSyncArg {
    /// Copy to the first device and add there.
    Gather,
    /// burn's collective all-reduce (NCCL on CUDA).
    AllReduce,
}

/// Arguments of `peft train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Hugging Face model directory (config.json, weights, tokenizer.json), a llama.cpp GGUF
    /// file, or a Hub id `ORG/NAME[@REVISION]` in the local Hugging Face cache.
    #[arg(long)]
    pub model: PathBuf,
    /// What the adapter records as its base model: the Hub id `--model` named, else the path.
    #[arg(skip)]
    pub base_model_name_or_path: Option<String>,
    /// The method and its options.
    #[command(flatten)]
    pub method: MethodArgs,
    /// Training data (JSONL).
    #[arg(long)]
    pub train: PathBuf,
    /// Held-out data (JSONL): loss, perplexity and exact match, before training and after
    /// each epoch (or every --eval-steps).
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Adapter directory; checkpoints, metrics.jsonl and loss_curve.png go there too.
    #[arg(long)]
    pub output: PathBuf,
    /// Row handling.
    #[command(flatten)]
    pub data: DataArgs,
    /// Peak learning rate [default: 3e-2 prompt tuning, 1e-2 P-tuning v2, 1e-3 prefix tuning,
    /// P-tuning and BitFit].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Passes over the training data.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// Steps of linear warmup (then linear decay to 0).
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Global gradient-norm clip; 0 disables clipping.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// AdamW weight decay (PyTorch's default).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// AdamW beta1.
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    /// AdamW beta2.
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    /// AdamW epsilon (PyTorch's default; burn's is 1e-5).
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    /// Seed of the adapter's initialization, the data order and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Batch rows of similar length (sorted within windows of 50 batches of a seeded shuffle,
    /// then the batches shuffled): less padding on ragged rows, so faster epochs.
    #[arg(long)]
    pub group_by_length: bool,
    /// Evaluate every N steps instead of after each epoch.
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// Checkpoint every N steps instead of after each epoch.
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Keep the newest N checkpoints (0: keep every one); resuming needs only the newest.
    #[arg(long, default_value_t = 1)]
    pub save_total_limit: usize,
    /// Write a training line to metrics.jsonl every N steps.
    #[arg(long, default_value_t = 1)]
    pub logging_steps: usize,
    /// Rows per evaluation batch.
    #[arg(long, default_value_t = 16)]
    pub eval_batch_size: usize,
    /// Skip the exact-match score (greedy generation) during evaluation.
    #[arg(long)]
    pub no_exact_match: bool,
    /// Continue from the newest checkpoint in --output (same data, seed and batch settings).
    #[arg(long)]
    pub resume: bool,
    /// Recompute activations in the backward pass instead of keeping them (less memory, more
    /// compute); works with every method, prefix tuning included.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Data-parallel replicas, one per device (the first N CUDA GPUs in a CUDA build): each
    /// takes --batch-size rows of every batch, so N devices train as one with a batch N times
    /// larger. On a single-device backend (Flex) the replicas take turns on it.
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
    /// With --devices on distinct GPUs: how the replicas' gradients are combined. `gather`
    /// copies them to the first device and adds them there (any backend); `all-reduce` sums them
    /// with burn's collective (NCCL on CUDA, which needs libnccl at run time).
    #[arg(long, value_enum, default_value = "gather")]
    pub gradient_sync: GradientSyncArg,
    /// Compute dtype of the frozen base.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dtype,
}

/// Arguments of `peft eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Hugging Face model directory, a GGUF file, or a Hub id in the local cache.
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter directory.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Data (JSONL).
    #[arg(long)]
    pub data: PathBuf,
    /// Row handling.
    #[command(flatten)]
    pub rows: DataArgs,
    /// Rows per batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Skip the exact-match score (greedy generation).
    #[arg(long)]
    pub no_exact_match: bool,
    /// Also write one JSON line per row to this file: its line, prompt, target, greedy
    /// continuation, exact match and loss (written as rows finish; the file appears whole).
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dtype,
}

/// A model directory's tokenizer and special ids, read once per command.
pub(crate) struct ModelText {
    dir: PathBuf,
    tokenizer: Tokenizer,
    /// The model's config.json, read once: its `vocab_size` bounds the ids the tokenizer makes,
    /// and the adapter is sized from it before any weight is read.
    pub(crate) config: AutoConfig,
    /// EOS and pad ids.
    pub(crate) special: SpecialTokens,
}

impl ModelText {
    /// Reads `model_dir/config.json`, `tokenizer.json` and the special ids (or all three from
    /// a GGUF file's metadata).
    pub(crate) fn read(model_dir: &Path) -> Result<Self, CliError> {
        Ok(Self {
            config: AutoConfig::from_model(model_dir)?,
            dir: model_dir.to_path_buf(),
            tokenizer: load_tokenizer(model_dir)?,
            special: SpecialTokens::from_dir(model_dir)?,
        })
    }

    /// The model's file `name` (`tokenizer.json`, `config.json`), or the GGUF file that holds
    /// them all.
    fn file(&self, name: &str) -> PathBuf {
        model_file(&self.dir, name)
    }

    /// Refuses an id the model has no embedding for: a tokenizer.json of another model would
    /// otherwise fail deep inside the embedding lookup. `what` says what was encoded.
    fn check_in_vocab(&self, ids: &[u32], what: impl FnOnce() -> String) -> Result<(), CliError> {
        let vocab_size = self.config.geometry().vocab_size;
        match ids.iter().find(|&&id| id as usize >= vocab_size) {
            None => Ok(()),
            Some(id) => Err(CliError::Input {
                path: self.file("tokenizer.json"),
                message: format!(
                    "{} encodes to token id {id}, but the model ({}) has vocab_size {}: is the \
                     tokenizer from another model?",
                    what(),
                    self.file("config.json").display(),
                    vocab_size
                ),
            }),
        }
    }

    /// `ids` as text, special tokens left out.
    fn decode(&self, ids: &[u32]) -> Result<String, CliError> {
        self.tokenizer.decode(ids, true).map_err(|e| {
            ModelError::Tokenizer {
                path: self.file("tokenizer.json"),
                message: e.to_string(),
            }
            .into()
        })
    }

    /// Ids of `text` with the tokenizer's special tokens.
    fn encode(&self, text: &str) -> Result<Vec<u32>, CliError> {
        self.encode_with(text, true)
    }

    /// Ids of `text` as a system message through the model's chat template (PEFT's
    /// `initialize_kv_prefix_from_text`: `apply_chat_template([{"role": "system", ...}])`, the
    /// rendered text encoded without adding special tokens), or of the text itself with the
    /// tokenizer's special tokens when `chat` is false or the model has no template.
    pub(crate) fn encode_as_system(&self, text: &str, chat: bool) -> Result<Vec<u32>, CliError> {
        let template = if chat {
            ChatTemplate::from_dir(&self.dir)?
        } else {
            None
        };
        match template {
            Some(template) => {
                let rendered = template.render(&[ChatMessage::new("system", text)], false)?;
                self.encode_with(&rendered, false)
            }
            None => self.encode(text),
        }
    }

    fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, CliError> {
        let ids = TokenizerEncoder(&self.tokenizer)
            .encode(text, add_special_tokens)
            .map_err(|message| -> CliError {
                ModelError::Tokenizer {
                    path: self.file("tokenizer.json"),
                    message,
                }
                .into()
            })?;
        self.check_in_vocab(&ids, || format!("the text {text:?}"))?;
        Ok(ids)
    }
}

/// Writes `peft eval --predictions`: one JSON object per row, streamed as batches finish (see
/// [`crate::cli::write_streamed`]).
fn write_predictions(
    path: &Path,
    text: &ModelText,
    model: &PeftModel<AutoCausalLm, AutoAdapter>,
    rows: &[TokenizedExample],
    options: &EvalOptions,
) -> Result<(), CliError> {
    crate::cli::write_streamed(path, "--predictions", |file| {
        let mut failure = None;
        peft_train::predict(model, rows, options, |row, p| {
            let line = (|| -> Result<(), CliError> {
                let (prompt, target) = (
                    text.decode(row.prompt_ids())?,
                    text.decode(row.target_ids())?,
                );
                let generated = p.generated.as_deref().map(|g| text.decode(g)).transpose()?;
                let json = serde_json::json!({
                    "line": row.line,
                    "prompt": prompt,
                    "target": target,
                    "generated": generated,
                    "exact_match": p.exact_match,
                    "loss": p.loss,
                    "scored_tokens": p.scored,
                });
                writeln!(file, "{json}").map_err(|source| CliError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            })();
            match line {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    failure = Some(e);
                    ControlFlow::Break(())
                }
            }
        })?;
        failure.map_or(Ok(()), Err)
    })
}

/// Refuses an adapter whose training state (f32 parameters, gradients and AdamW's two moments:
/// 16 bytes a parameter) cannot fit in the memory the system has available.
fn check_adapter_fits(config: &AutoConfig, adapter: &AutoAdapterConfig) -> Result<(), CliError> {
    let trainable = peft::info::trainable_parameters(config, adapter)
        .map_err(crate::cli::adapter_init_error)?
        .trainable;
    let bytes = (trainable as u128).saturating_mul(16);
    let Some(available) = crate::cli::available_memory() else {
        return Ok(());
    };
    if bytes <= u128::from(available) {
        return Ok(());
    }
    let gib = |b: u128| b as f64 / (1u128 << 30) as f64;
    Err(CliError::Argument {
        flag: "--num-virtual-tokens",
        message: format!(
            "the adapter would train {trainable} parameters, {:.1} GiB with their gradients and \
             AdamW's moments, more than the {:.1} GiB of memory available (lower \
             --num-virtual-tokens or --encoder-hidden-size)",
            gib(bytes),
            gib(u128::from(available))
        ),
    })
}

/// The tokenized rows of `path`.
pub(crate) fn read_data(
    text: &ModelText,
    path: &Path,
    args: &DataArgs,
) -> Result<TokenizedDataset, CliError> {
    if args.max_length == 0 {
        return Err(CliError::Argument {
            flag: "--max-length",
            message: "must be at least 1".into(),
        });
    }
    let dataset = Dataset::from_jsonl(
        path,
        &DataOptions {
            template: args.template.clone(),
            skip_bad_rows: args.skip_bad_rows,
        },
    )?;
    // The template is read only for data that has chat rows.
    let template = if dataset.examples.iter().any(|e| e.messages.is_some()) {
        let model_template = ChatTemplate::from_dir(&text.dir)?;
        match &args.chat_template {
            Some(file) => Some(ChatTemplate {
                source: std::fs::read_to_string(file).map_err(|source| CliError::Io {
                    path: file.clone(),
                    source,
                })?,
                path: file.clone(),
                special_tokens: model_template.map(|t| t.special_tokens).unwrap_or_default(),
            }),
            None => model_template,
        }
    } else {
        None
    };
    let renderer = template.map(peft::TemplateRenderer);
    let chat = renderer.as_ref().map(|renderer| ChatOptions {
        renderer,
        train_on: match args.train_on {
            TrainOnArg::All => TrainOn::AllAssistantTurns,
            TrainOnArg::Last => TrainOn::LastAssistantTurn,
        },
    });
    let data = TokenizedDataset::with_chat(
        dataset,
        &TokenizerEncoder(&text.tokenizer),
        &TokenizeOptions {
            max_length: args.max_length,
            eos_token_id: text.special.eos_token_ids.first().copied(),
            skip_bad_rows: args.skip_bad_rows,
        },
        chat.as_ref(),
    )?;
    for row in &data.examples {
        text.check_in_vocab(&row.input_ids, || {
            format!("line {} of {}", row.line, path.display())
        })?;
    }
    Ok(data)
}

pub(crate) fn io_error(source: std::io::Error) -> CliError {
    CliError::Io {
        path: "<stdout>".into(),
        source,
    }
}

pub(crate) fn describe_rows(data: &TokenizedDataset) -> String {
    let truncated = data.examples.iter().filter(|e| e.truncated).count();
    let mut text = format!("{} rows", data.examples.len());
    if truncated > 0 {
        text += &format!(", {truncated} truncated");
    }
    if !data.skipped.is_empty() {
        let lines: Vec<String> = data
            .skipped
            .iter()
            .take(5)
            .map(|s| s.line.to_string())
            .collect();
        text += &format!(
            ", {} bad rows skipped (lines {}{})",
            data.skipped.len(),
            lines.join(", "),
            if data.skipped.len() > 5 { ", ..." } else { "" }
        );
    }
    text
}

/// Draws a progress bar (loss, lr, tokens/s, ETA) and prints evaluations.
pub(crate) struct Progress<'a> {
    bar: ProgressBar,
    out: &'a mut dyn Write,
    print_evals: bool,
    failure: Option<std::io::Error>,
}

impl<'a> Progress<'a> {
    /// A bar on stderr (hidden when it is not a terminal); evaluations go to `out` if asked.
    pub(crate) fn new(out: &'a mut dyn Write, prefix: &str, print_evals: bool) -> Self {
        let bar = ProgressBar::new(0).with_style(
            ProgressStyle::with_template(
                "{prefix}{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .expect("valid progress template"),
        );
        bar.set_prefix(prefix.to_string());
        Self {
            bar,
            out,
            print_evals,
            failure: None,
        }
    }

    /// Clears the bar; the first write error met while printing, if any.
    pub(crate) fn finish(self) -> Result<&'a mut dyn Write, CliError> {
        self.bar.finish_and_clear();
        match self.failure {
            Some(e) => Err(io_error(e)),
            None => Ok(self.out),
        }
    }
}

impl TrainingObserver for Progress<'_> {
    fn on_start(&mut self, plan: &TrainingPlan) {
        self.bar.set_length(plan.total_steps as u64);
        self.bar.set_position(plan.start_step as u64);
        self.bar.reset_eta();
    }

    fn on_step(&mut self, m: &StepMetrics) -> ControlFlow<()> {
        self.bar.set_position(m.step as u64);
        self.bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s  epoch {:.2}",
            m.loss, m.lr, m.tokens_per_second, m.epoch
        ));
        ControlFlow::Continue(())
    }

    fn on_eval(&mut self, m: &EvalMetrics) {
        if !self.print_evals {
            return;
        }
        let line = format_eval(m);
        let out = &mut *self.out;
        if let Err(e) = self.bar.suspend(|| writeln!(out, "{line}")) {
            self.failure.get_or_insert(e);
        }
    }
}

fn format_eval(m: &EvalMetrics) -> String {
    let mut line = format!(
        "eval @ step {}: loss {:.4}  perplexity {:.3}",
        m.step, m.loss, m.perplexity
    );
    if let Some(em) = m.exact_match {
        line += &format!("  exact match {:.1}%", em * 100.0);
    }
    line
}

/// The replicas' devices of `--devices`: the training device first, then the others made alike
/// (autodiff, gradient checkpointing).
fn data_parallel_devices(args: &TrainArgs, train_device: &Device) -> Result<Vec<Device>, CliError> {
    let found =
        peft::data_parallel_devices(args.devices).map_err(|message| CliError::Argument {
            flag: "--devices",
            message,
        })?;
    let others = found.into_iter().skip(1).map(|device| {
        let device = device.autodiff();
        if args.gradient_checkpointing {
            device.gradient_checkpointing()
        } else {
            device
        }
    });
    Ok(std::iter::once(train_device.clone())
        .chain(others)
        .collect())
}

/// `peft train`.
pub fn train_command(
    args: &TrainArgs,
    device: &Device,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let text = ModelText::read(&args.model)?;
    let special = &text.special;
    let train_data = read_data(&text, &args.train, &args.data)?;
    let eval_data = match &args.eval {
        Some(path) => Some(read_data(&text, path, &args.data)?),
        None => None,
    };
    writeln!(
        out,
        "train: {} ({})",
        args.train.display(),
        describe_rows(&train_data)
    )
    .map_err(io_error)?;
    if let Some(eval) = &eval_data {
        writeln!(
            out,
            "eval: {} ({})",
            eval.path.display(),
            describe_rows(eval)
        )
        .map_err(io_error)?;
    }
    let config = TrainingConfig::new()
        .with_lr(args.lr.unwrap_or(args.method.method.preset.learning_rate))
        .with_epochs(args.epochs)
        .with_batch_size(args.batch_size)
        .with_gradient_accumulation_steps(args.gradient_accumulation_steps)
        .with_warmup_steps(args.warmup_steps)
        // 0 turns clipping off, as `max_grad_norm=0` does in Hugging Face's Trainer; a negative
        // or NaN value stays, for `validate` to refuse.
        .with_max_grad_norm((args.max_grad_norm != 0.0).then_some(args.max_grad_norm))
        .with_optimizer(
            AdamWConfig::new()
                .with_beta_1(args.adam_beta1)
                .with_beta_2(args.adam_beta2)
                .with_epsilon(args.adam_epsilon)
                .with_weight_decay(args.weight_decay),
        )
        .with_seed(args.seed)
        .with_group_by_length(args.group_by_length)
        .with_eval_steps(args.eval_steps)
        .with_save_steps(args.save_steps)
        .with_save_total_limit((args.save_total_limit > 0).then_some(args.save_total_limit))
        .with_logging_steps(args.logging_steps)
        .with_eval_batch_size(args.eval_batch_size)
        .with_eval_exact_match(!args.no_exact_match);
    config.validate()?;

    let mut train_device = device.clone().autodiff();
    if args.gradient_checkpointing {
        train_device = train_device.gradient_checkpointing();
    }
    let devices = data_parallel_devices(args, &train_device)?;
    // The adapter is sized from config.json before the base's weights are read: an adapter too
    // large for this machine (a model without a position limit takes any --num-virtual-tokens)
    // would abort the process on allocation.
    let adapter_config = args.method.config(&text.config.geometry())?;
    check_adapter_fits(&text.config, &adapter_config)?;
    let base = AutoCausalLm::from_pretrained(&args.model, &train_device, args.dtype.into())?;
    let init_text_ids = match adapter_config.init_text() {
        Some(init) if init.as_system_message => {
            text.encode_as_system(init.text, !args.method.prefix_init_plain)?
        }
        Some(init) => encode_init_text(&text, init.text)?,
        None => Vec::new(),
    };
    train_device.seed(args.seed);
    let adapter = adapter_config
        .init(&base, &init_text_ids)
        .map_err(adapter_init_error)?;
    let model = PeftModel::new(base, adapter);
    writeln!(out, "{}", model.trainable_parameters()).map_err(io_error)?;

    let run = TrainingRun {
        output_dir: args.output.clone(),
        pad_token_id: special.pad_token_id,
        eos_token_ids: special.eos_token_ids.clone(),
        base_model_name_or_path: args
            .base_model_name_or_path
            .clone()
            .or_else(|| args.model.to_str().map(str::to_string)),
        resume: args.resume,
        devices,
        gradient_sync: match args.gradient_sync {
            GradientSyncArg::Gather => GradientSync::Gather,
            GradientSyncArg::AllReduce => GradientSync::AllReduce,
        },
    };
    let started = Instant::now();
    let mut progress = Progress::new(out, "", true);
    let outcome = train(
        model,
        &train_data.examples,
        eval_data.as_ref().map(|d| d.examples.as_slice()),
        &config,
        &run,
        &mut progress,
    )?;
    let out = progress.finish()?;
    outcome
        .model
        .save_pretrained(&args.output, run.base_model_name_or_path.as_deref())?;
    let metrics = read_metrics(&args.output.join(METRICS_FILE))?;
    write_loss_curve(&args.output.join(LOSS_CURVE), &metrics)?;
    writeln!(
        out,
        "trained {} steps in {:.1}s; adapter, {METRICS_FILE} and {LOSS_CURVE} in {}",
        outcome.global_step,
        started.elapsed().as_secs_f64(),
        args.output.display()
    )
    .map_err(io_error)
}

fn encode_init_text(text: &ModelText, init_text: &str) -> Result<Vec<u32>, CliError> {
    let ids = text.encode(init_text)?;
    if ids.is_empty() {
        return Err(CliError::Argument {
            flag: "--prompt-tuning-init-text",
            message: "encodes to no tokens".into(),
        });
    }
    Ok(ids)
}

/// `peft eval`: loss, perplexity and exact match of an adapter on a data file.
pub fn eval_command(args: &EvalArgs, device: &Device, out: &mut dyn Write) -> Result<(), CliError> {
    let text = ModelText::read(&args.model)?;
    let data = read_data(&text, &args.data, &args.rows)?;
    let special = text.special.clone();
    // Checked before the model is read: a run should not end in a file it cannot write.
    if let Some(path) = &args.predictions {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !parent.is_dir() || path.is_dir() {
            return Err(CliError::Argument {
                flag: "--predictions",
                message: format!(
                    "{} cannot be written: {}",
                    path.display(),
                    if path.is_dir() {
                        "it is a directory".to_string()
                    } else {
                        format!("no directory {}", parent.display())
                    }
                ),
            });
        }
    }
    if args.batch_size == 0 {
        return Err(CliError::Argument {
            flag: "--batch-size",
            message: "must be at least 1".into(),
        });
    }
    let base = AutoCausalLm::from_pretrained(&args.model, device, args.dtype.into())?;
    let model: PeftModel<AutoCausalLm, AutoAdapter> =
        PeftModel::from_pretrained(base, &args.adapter)?;
    let model = PeftModel {
        adapter: model.adapter.into_inference(),
        base: model.base,
    };
    let options = EvalOptions {
        batch_size: args.batch_size,
        exact_match: !args.no_exact_match,
        pad_token_id: special.pad_token_id,
        eos_token_ids: special.eos_token_ids,
    };
    let metrics = evaluate(&model, &data.examples, &options, 0)?;
    if let Some(path) = &args.predictions {
        write_predictions(path, &text, &model, &data.examples, &options)?;
    }
    writeln!(
        out,
        "data: {} ({})",
        args.data.display(),
        describe_rows(&data)
    )
    .map_err(io_error)?;
    let mut line = format!(
        "loss {:.4}  perplexity {:.3}",
        metrics.loss, metrics.perplexity
    );
    if let Some(em) = metrics.exact_match {
        let rows = data.completions().count();
        line += &format!(
            "  exact match {:.1}% ({} of {rows})",
            em * 100.0,
            (em * rows as f64).round()
        );
    }
    writeln!(out, "{line}").map_err(io_error)
}
