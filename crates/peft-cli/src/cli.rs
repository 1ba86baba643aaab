//! The `peft` command line: argument types and the commands behind them.
//!
//! The binary (`src/main.rs`) parses [`Cli`] and calls [`run`]; the commands live here so
//! tests can call them directly. Commands write files atomically (a temporary file renamed into
//! place), so a failure never leaves a half-written output.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand, ValueEnum};
use peft_core::adapter_config::AdapterError;
use peft_core::adapter_file::write_tensors;
use peft_core::json_config::ConfigError;
use peft_core::{
    Adapter, CausalLm, CoreError, GenerationConfig, GenerationStep, Injection, ModelGeometry,
    PeftModel, generate,
};
use peft_models::{AutoCausalLm, AutoConfig, ModelError, SpecialTokens, load_tokenizer};
use serde_json::{Map, Value, json};

use peft::info::trainable_parameters;
use peft::{AutoAdapter, AutoAdapterConfig, MethodPreset};

/// Errors of the command line, each naming the file (and field) at fault.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The adapter directory cannot be used with this model.
    #[error(transparent)]
    Adapter(#[from] peft_core::adapter_config::AdapterError),
    /// An output file could not be written (nothing is left half-written).
    #[error(transparent)]
    Output(#[from] peft_core::adapter_file::AdapterFileError),
    /// The input file is not what the command expects.
    #[error("{path}: {message}")]
    Input {
        /// The input file.
        path: PathBuf,
        /// What is wrong (names the field).
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system error.
        source: std::io::Error,
    },
    /// Generation rejected its settings or the prompt (names the setting).
    #[error("generate: {0}")]
    Generate(peft_core::CoreError),
    /// A data file has a bad row, or none.
    #[error("{}", data_message(.0))]
    Data(#[from] peft_train::data::DataError),
    /// Training stopped with an error.
    #[error("{}", train_message(.0))]
    Train(Box<peft_train::trainer::TrainError>),
    /// Evaluation failed.
    #[error("evaluation: {0}")]
    Eval(#[from] peft_core::CoreError),
    /// A Hub id that could not be downloaded into the cache.
    #[error(
        "`{id}` is not a directory, and as a Hub id could not be downloaded (revision \
         {revision}) into {cache}: {why}"
    )]
    Download {
        /// `ORG/NAME`.
        id: String,
        /// The revision asked for.
        revision: String,
        /// The repository's folder in the Hub cache.
        cache: PathBuf,
        /// What failed.
        why: String,
    },
    /// A command-line flag has a value the command cannot use.
    #[error("{flag}: {message}")]
    Argument {
        /// The flag.
        flag: &'static str,
        /// Why its value is rejected.
        message: String,
    },
}

impl From<peft_train::trainer::TrainError> for CliError {
    fn from(error: peft_train::trainer::TrainError) -> Self {
        // Boxed: a training error is large, and every command returns a CliError.
        Self::Train(Box::new(error))
    }
}

/// Compute dtype of the model weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    /// 32-bit float (exact parity with transformers in f32).
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
}

impl From<Dtype> for DType {
    fn from(value: Dtype) -> Self {
        match value {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::Bf16 => DType::BF16,
        }
    }
}

/// Parameter-efficient fine-tuning of causal language models on burn.
#[derive(Debug, Parser)]
#[command(name = "peft", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
// Parsed once per process: the size of the largest variant's arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one forward pass and write the logits of every input token to a safetensors file.
    Forward(ForwardArgs),
    /// Generate a continuation of a prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Print PEFT's trainable-parameter line for a method on a model, from its config.json alone.
    Info(InfoArgs),
    /// Fold a trainable adapter (our encoder checkpoint) into PEFT's inference files.
    Export(ExportArgs),
    /// Train an adapter on a JSONL file (prompt/completion, instruction or text rows).
    /// A flag given twice takes its last value (recipes put their defaults first).
    #[command(args_override_self = true)]
    Train(crate::training::TrainArgs),
    /// Loss, perplexity and exact-match accuracy of an adapter on a JSONL file.
    Eval(crate::training::EvalArgs),
    /// Train every method on the embedded tiny model and print held-out accuracy before/after.
    Quickstart(crate::quickstart::QuickstartArgs),
    /// Serve the model and a folder of adapters, mixed in one batch, behind an OpenAI-compatible
    /// HTTP API.
    Serve(crate::serve::ServeArgs),
}

/// A method, as `peft info` and `peft train` name it: one of the presets of the facade's method
/// table ([`peft::presets`]).
pub type Method = MethodPreset;

/// `--method`'s parser: the names of [`peft::presets`], each with its summary as help.
pub fn method_parser() -> impl TypedValueParser<Value = Method> {
    PossibleValuesParser::new(
        peft::presets()
            .into_iter()
            .map(|p| PossibleValue::new(p.preset.name).help(p.preset.summary)),
    )
    .map(|name| peft::preset(&name).expect("clap accepts only the presets' names"))
}

/// P-tuning's encoder, as PEFT's `encoder_reparameterization_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EncoderArg {
    /// `MLP`.
    Mlp,
    /// `LSTM`.
    Lstm,
}

/// Prompt tuning's start, as PEFT's `prompt_tuning_init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InitArg {
    /// `RANDOM`: N(0, 1).
    Random,
    /// `TEXT`: word embeddings of `--prompt-tuning-init-text`.
    Text,
    /// `SAMPLE_VOCAB`: word embeddings of random tokens.
    SampleVocab,
}

/// A method and its options, named as PEFT's config fields (`peft info`, `peft train`).
#[derive(Debug, Clone, clap::Args)]
pub struct MethodArgs {
    /// The method.
    #[arg(long, value_parser = method_parser())]
    pub method: Method,
    /// Virtual tokens (prompt methods) or prefix positions (prefix methods).
    #[arg(long, default_value_t = 10)]
    pub num_virtual_tokens: usize,
    /// Prompt tuning: how the prompt starts.
    #[arg(long, value_enum, default_value = "random")]
    pub prompt_tuning_init: InitArg,
    /// Prompt tuning: the text whose word embeddings start the prompt (with `text` init).
    #[arg(long)]
    pub prompt_tuning_init_text: Option<String>,
    /// P-tuning's encoder.
    #[arg(long, value_enum, default_value = "mlp")]
    pub encoder_reparameterization_type: EncoderArg,
    /// Encoder width (P-tuning: default hidden size; prefix tuning: default the key/value width).
    #[arg(long)]
    pub encoder_hidden_size: Option<usize>,
    /// P-tuning LSTM layers.
    #[arg(long, default_value_t = 2)]
    pub encoder_num_layers: usize,
    /// P-tuning encoder dropout (training only).
    #[arg(long, default_value_t = 0.0)]
    pub encoder_dropout: f64,
    /// Prefix methods: override the projection (`prefix-tuning` has it, `p-tuning-v2` not).
    #[arg(long)]
    pub prefix_projection: Option<bool>,
    /// Prefix methods: start from an all-zero prefix (the projection's last layer, or the prefix
    /// itself, zeroed) instead of PEFT's random one, so training starts from the base model's
    /// output. Random prefixes can swamp a pretrained model's attention (docs/smollm2.md).
    #[arg(long)]
    pub prefix_zero_init: bool,
    /// Prefix methods: start the prefix from the base model's own keys and values for this text
    /// (PEFT's `initialize_kv_prefix_from_text`): rendered as a system message through the
    /// model's chat template when it has one, and at least --num-virtual-tokens tokens long.
    /// With a projection (prefix-tuning; PEFT refuses it) the projection is fitted to output them.
    #[arg(long)]
    pub prefix_init_text: Option<String>,
    /// With --prefix-init-text: tokenize the text as it is, without the chat template (PEFT's
    /// `use_chat_template=False`).
    #[arg(long)]
    pub prefix_init_plain: bool,
    /// BitFit: a regular expression over Hugging Face names narrowing which biases train.
    #[arg(long)]
    pub bias_pattern: Option<String>,
    /// Any key of the method's adapter_config.json, as KEY=VALUE (VALUE in JSON, or a bare
    /// string); repeatable, and taken over the flags above. Sets keys no flag has, including
    /// those of a method added to the table.
    #[arg(long = "option", value_name = "KEY=VALUE", value_parser = parse_option)]
    pub options: Vec<(String, Value)>,
}

/// Parses `--option KEY=VALUE`: VALUE as JSON when it parses, else as a string.
fn parse_option(text: &str) -> Result<(String, Value), String> {
    let (key, value) = text
        .split_once('=')
        .filter(|(key, _)| !key.is_empty())
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.into()));
    Ok((key.to_string(), value))
}

impl MethodArgs {
    /// The adapter configuration for a model of `geometry`.
    pub fn config(&self, geometry: &ModelGeometry) -> Result<AutoAdapterConfig, CliError> {
        if !(0.0..1.0).contains(&self.encoder_dropout) {
            return Err(CliError::Argument {
                flag: "--encoder-dropout",
                message: format!("must be in [0, 1), found {}", self.encoder_dropout),
            });
        }
        if self.prefix_init_plain && self.prefix_init_text.is_none() {
            return Err(CliError::Argument {
                flag: "--prefix-init-plain",
                message: "needs --prefix-init-text".into(),
            });
        }
        if let Some(text) = &self.prefix_init_text {
            let problem = if self.method.peft_type != peft_prefix::PEFT_TYPE {
                Some("applies to prefix-tuning and p-tuning-v2 only")
            } else if self.prefix_zero_init {
                Some("contradicts --prefix-zero-init")
            } else if text.is_empty() {
                Some("is empty")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(CliError::Argument {
                    flag: "--prefix-init-text",
                    message: problem.into(),
                });
            }
        }
        if self.prompt_tuning_init == InitArg::Text {
            match &self.prompt_tuning_init_text {
                None => {
                    return Err(CliError::Argument {
                        flag: "--prompt-tuning-init-text",
                        message: "is required with --prompt-tuning-init text".into(),
                    });
                }
                Some(text) if text.is_empty() => {
                    return Err(CliError::Argument {
                        flag: "--prompt-tuning-init-text",
                        message: "is empty".into(),
                    });
                }
                Some(_) => {}
            }
        }
        let config = self
            .method
            .config(&self.options(), geometry)
            .map_err(adapter_init_error)?;
        config.validate(geometry).map_err(adapter_init_error)?;
        Ok(config)
    }

    /// The flags as the method's config keys (PEFT's names; each method reads its own and
    /// ignores the rest), `--option`s last.
    fn options(&self) -> Map<String, Value> {
        let mut options = Map::new();
        let mut set = |key: &str, value: Value| {
            options.insert(key.to_string(), value);
        };
        set("num_virtual_tokens", json!(self.num_virtual_tokens));
        set(
            "prompt_tuning_init",
            json!(match self.prompt_tuning_init {
                InitArg::Random => "RANDOM",
                InitArg::Text => "TEXT",
                InitArg::SampleVocab => "SAMPLE_VOCAB",
            }),
        );
        set(
            "prompt_tuning_init_text",
            json!(self.prompt_tuning_init_text),
        );
        set(
            "encoder_reparameterization_type",
            json!(match self.encoder_reparameterization_type {
                EncoderArg::Mlp => "MLP",
                EncoderArg::Lstm => "LSTM",
            }),
        );
        set("encoder_hidden_size", json!(self.encoder_hidden_size));
        set("encoder_num_layers", json!(self.encoder_num_layers));
        set("encoder_dropout", json!(self.encoder_dropout));
        if let Some(projection) = self.prefix_projection {
            set("prefix_projection", json!(projection));
        }
        if self.prefix_zero_init {
            set("init_weights", json!("zero"));
        }
        set("init_text", json!(self.prefix_init_text));
        set("bias_pattern", json!(self.bias_pattern));
        for (key, value) in &self.options {
            set(key, value.clone());
        }
        options
    }
}

/// The flag of a training setting (a [`peft_train::trainer::TrainingConfig`] or `TrainingRun` field,
/// as the library's errors name them).
pub fn flag_of_training_field(field: &str) -> &'static str {
    match field {
        "epochs" => "--epochs",
        "batch_size" => "--batch-size",
        "gradient_accumulation_steps" => "--gradient-accumulation-steps",
        "logging_steps" => "--logging-steps",
        "eval_batch_size" => "--eval-batch-size",
        "eval_steps" => "--eval-steps",
        "save_steps" => "--save-steps",
        "save_total_limit" => "--save-total-limit",
        "lr" => "--lr",
        "max_grad_norm" => "--max-grad-norm",
        "optimizer.beta_1" => "--adam-beta1",
        "optimizer.beta_2" => "--adam-beta2",
        "optimizer.epsilon" => "--adam-epsilon",
        "optimizer.weight_decay" => "--weight-decay",
        "seed" => "--seed",
        "group_by_length" => "--group-by-length",
        "output_dir" => "--output",
        "resume" => "--resume",
        "train" => "--train",
        _ => "--method",
    }
}

/// A training error in the CLI's words: the library names config fields, the CLI its flags.
fn train_message(error: &peft_train::trainer::TrainError) -> String {
    use peft_train::trainer::TrainError;
    match error {
        TrainError::Config { key, message } => {
            format!("{}: {message}", flag_of_training_field(key))
        }
        TrainError::DifferentRun { path, key, was, is } => {
            let flag = if *key == "train" {
                "training data"
            } else {
                flag_of_training_field(key)
            };
            format!(
                "{}: the checkpoint was made with {flag} {was}, this run has {is}; resuming would \
                 change the data order (use the same settings, or another --output)",
                path.display()
            )
        }
        TrainError::NonFinite {
            step,
            what,
            value,
            lines,
        } => format!(
            "step {step}: {what} is {value}; training stopped (lower --lr, or check the rows at \
             lines {lines:?})"
        ),
        other => other.to_string(),
    }
}

/// A data error in the CLI's words (its flags for the library's `max_length` and `skip_bad_rows`).
fn data_message(error: &peft_train::data::DataError) -> String {
    use peft_train::data::DataError;
    match error {
        DataError::Row {
            path,
            line,
            message,
        } => format!(
            "{}:{line}: {} (pass --skip-bad-rows to skip such rows)",
            path.display(),
            // The library's own phrase for a target past `TokenizeOptions::max_length`.
            message.replace("more than max_length ", "more than --max-length ")
        ),
        other => other.to_string(),
    }
}

/// The flag of an adapter configuration field, for the CLI's messages (library errors name the
/// field).
pub fn flag_of_adapter_field(field: &str) -> &'static str {
    match field {
        "num_virtual_tokens" => "--num-virtual-tokens",
        "encoder_hidden_size" => "--encoder-hidden-size",
        "encoder_num_layers" => "--encoder-num-layers",
        "encoder_dropout" => "--encoder-dropout",
        "prompt_tuning_init_text" => "--prompt-tuning-init-text",
        "init_text" => "--prefix-init-text",
        "bias_pattern" => "--bias-pattern",
        "prompt_tuning_init" => "--prompt-tuning-init",
        "encoder_reparameterization_type" => "--encoder-reparameterization-type",
        "prefix_projection" => "--prefix-projection",
        "init_weights" => "--prefix-zero-init",
        "peft_type" => "--method",
        _ => "--option",
    }
}

/// An adapter that cannot be built from the flags, as the flag's error.
pub fn adapter_init_error(error: AdapterError) -> CliError {
    let (flag, message) = match &error {
        AdapterError::Init { field, .. } => (flag_of_adapter_field(field), error.to_string()),
        // A flag's value the method's config keys refuse: the key's flag, and what is wrong.
        AdapterError::Config(ConfigError::InvalidValue { key, message, .. }) => {
            (flag_of_adapter_field(key), format!("{key}: {message}"))
        }
        _ => ("--method", error.to_string()),
    };
    CliError::Argument { flag, message }
}

/// Arguments of `peft info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Hugging Face model directory, GGUF file or Hub id in the local cache, or a config.json (weights
    /// are not read).
    #[arg(long)]
    pub model: PathBuf,
    /// The method and its options.
    #[command(flatten)]
    pub method: MethodArgs,
}

/// Arguments of `peft export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The base model's directory or Hub id in the local cache, or its config.json (weights are
    /// not read).
    #[arg(long)]
    pub model: PathBuf,
    /// The adapter directory to export (trainable or already inference form).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where PEFT's inference files go (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub output: PathBuf,
}

/// Arguments of `peft forward`.
#[derive(Debug, clap::Args)]
pub struct ForwardArgs {
    /// Hugging Face model directory (config.json + model.safetensors or a sharded index), a GGUF file, or a
    /// Hub id `ORG/NAME[@REVISION]` in the local Hugging Face cache.
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter directory (adapter_config.json + adapter_model.safetensors, as PEFT writes them);
    /// the logits are those of the real tokens only.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSON file: {"input_ids": [[...], ...], "attention_mask": [[...], ...]} (mask optional,
    /// 1 = real token, 0 = padding, left or right).
    #[arg(long)]
    pub input: PathBuf,
    /// Output safetensors file; holds one F32 tensor `logits` of shape [batch, seq, vocab].
    #[arg(long)]
    pub output: PathBuf,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dtype,
}

/// Arguments of `peft generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Hugging Face model directory (with tokenizer.json), a GGUF file, or a Hub id in the local cache.
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter directory (injected at prefill).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt text (or `--input`).
    #[arg(long, required_unless_present = "input", conflicts_with = "input")]
    pub prompt: Option<String>,
    /// Many prompts: a JSONL file of `{"prompt": ...}` or `{"messages": [...]}` rows (chat rows
    /// through the model's chat template), generated in batches into `--output`.
    #[arg(long, requires = "output")]
    pub input: Option<PathBuf>,
    /// With `--input`: the JSONL file of continuations (one row per prompt, in input order).
    #[arg(long, requires = "input")]
    pub output: Option<PathBuf>,
    /// With `--input`: prompts per batch (left-padded).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (sampling only).
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens (sampling only).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dtype,
}

/// Parses `argv` (program name first), runs it on the compiled backend's device with stdout as
/// output, and reports an error on stderr: the `peft` binary, and the recipes in `examples/`.
pub fn main_with<I, T>(argv: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(argv);
    let device = peft::default_device();
    let stdout = std::io::stdout();
    match run(cli, &device, &mut stdout.lock()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command line on `device`, writing generated text to `out`.
pub fn run(cli: Cli, device: &Device, out: &mut dyn Write) -> Result<(), CliError> {
    let mut command = cli.command;
    resolve_hub_ids(&mut command)?;
    match command {
        Command::Forward(args) => forward(&args, device),
        Command::Generate(args) => generate_text(&args, device, out),
        Command::Info(args) => info(&args, out),
        Command::Export(args) => export(&args, device),
        Command::Train(args) => crate::training::train_command(&args, device, out),
        Command::Eval(args) => crate::training::eval_command(&args, device, out),
        Command::Quickstart(args) => crate::quickstart::quickstart(&args, device, out).map(|_| ()),
        Command::Serve(args) => crate::serve::serve(&args, device, out),
    }
}

/// Replaces a `--model` that is a Hub id (`ORG/NAME[@REVISION]`, not an existing path) by its
/// snapshot in the local Hugging Face cache, downloading the files the command reads unless
/// offline; training records the id as the adapter's base model.
fn resolve_hub_ids(command: &mut Command) -> Result<(), CliError> {
    use crate::hub::ModelFiles;
    let cache = peft_models::hub_cache_dir();
    let resolve = |model: &mut PathBuf, files| -> Result<Option<String>, CliError> {
        let (resolved, id) = crate::hub::resolve(model, &cache, files)?;
        let name = id.map(|_| model.to_string_lossy().into_owned());
        *model = resolved;
        Ok(name)
    };
    match command {
        Command::Forward(args) => resolve(&mut args.model, ModelFiles::Everything).map(drop),
        Command::Generate(args) => resolve(&mut args.model, ModelFiles::Everything).map(drop),
        Command::Info(args) => resolve(&mut args.model, ModelFiles::Config).map(drop),
        Command::Export(args) => resolve(&mut args.model, ModelFiles::Config).map(drop),
        Command::Eval(args) => resolve(&mut args.model, ModelFiles::Everything).map(drop),
        Command::Serve(args) => resolve(&mut args.model, ModelFiles::Everything).map(drop),
        Command::Train(args) => {
            args.base_model_name_or_path = resolve(&mut args.model, ModelFiles::Everything)?;
            Ok(())
        }
        Command::Quickstart(args) => match &mut args.model {
            Some(model) => resolve(model, ModelFiles::Everything).map(drop),
            None => Ok(()),
        },
    }
}

/// Writes `path` through a temporary file beside it, streamed by `fill` (rows can go out as they
/// are made) and renamed over `path` once `fill` has written everything; on any failure the
/// temporary file is removed, so a failed run leaves nothing half-written. `flag` names the
/// option that gave `path`.
pub(crate) fn write_streamed(
    path: &Path,
    flag: &'static str,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), CliError>,
) -> Result<(), CliError> {
    let io = |source| CliError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().ok_or_else(|| CliError::Argument {
        flag,
        message: format!("{} names no file", path.display()),
    })?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> Result<(), CliError> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        fill(&mut file)?;
        file.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The model of `model_dir`, with the adapter of `adapter_dir` loaded onto it if given.
fn load_model(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    device: &Device,
    dtype: DType,
) -> Result<(AutoCausalLm, Option<AutoAdapter>), CliError> {
    let model = AutoCausalLm::from_pretrained(model_dir, device, dtype)?;
    match adapter_dir {
        None => Ok((model, None)),
        Some(dir) => {
            let (model, adapter) = AutoAdapter::load(dir, model)?;
            Ok((model, Some(adapter)))
        }
    }
}

/// The config of `path`: a model directory, a config.json or a GGUF file.
fn read_config(path: &Path) -> Result<AutoConfig, CliError> {
    Ok(AutoConfig::from_model(path)?)
}

/// `peft info`: PEFT's `print_trainable_parameters` line, from the config alone.
pub fn info(args: &InfoArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let config = read_config(&args.model)?;
    let adapter = args.method.config(&config.geometry())?;
    let counts = trainable_parameters(&config, &adapter).map_err(adapter_init_error)?;
    writeln!(out, "{counts}").map_err(|source| CliError::Io {
        path: "<stdout>".into(),
        source,
    })
}

/// `peft export`: the adapter in `args.adapter` written to `args.output` in PEFT's inference form
/// (encoders folded into `prompt_embeddings`; BitFit's biases are final already), checked against
/// the model's config alone.
pub fn export(args: &ExportArgs, device: &Device) -> Result<(), CliError> {
    let config = read_config(&args.model)?;
    peft::export(&args.adapter, &config.base_shape(), device, &args.output)?;
    Ok(())
}

/// The `{"input_ids", "attention_mask"}` input of `peft forward`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardInput {
    /// `[batch][seq]` token ids.
    pub input_ids: Vec<Vec<i64>>,
    /// `[batch][seq]` 0/1 mask, if given.
    pub attention_mask: Option<Vec<Vec<i64>>>,
}

impl ForwardInput {
    /// Reads and checks the JSON input file (shapes and values are checked against the model
    /// later, by [`CausalLm::check_input`]).
    pub fn from_file(path: &Path) -> Result<Self, CliError> {
        let text = std::fs::read_to_string(path).map_err(|source| CliError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |message: String| CliError::Input {
            path: path.to_path_buf(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("malformed JSON: {e}")))?;
        let matrix = |key: &str| -> Result<Option<Vec<Vec<i64>>>, CliError> {
            let Some(v) = value.get(key).filter(|v| !v.is_null()) else {
                return Ok(None);
            };
            let rows = v
                .as_array()
                .ok_or_else(|| bad(format!("`{key}` must be a list of lists of integers")))?;
            rows.iter()
                .enumerate()
                .map(|(r, row)| {
                    row.as_array()
                        .ok_or_else(|| bad(format!("`{key}[{r}]` must be a list of integers")))?
                        .iter()
                        .enumerate()
                        .map(|(c, x)| {
                            x.as_i64().ok_or_else(|| {
                                bad(format!("`{key}[{r}][{c}]` must be an integer, found {x}"))
                            })
                        })
                        .collect()
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        };
        if !value.is_object() {
            return Err(bad("must be a JSON object with an `input_ids` field".into()));
        }
        let input_ids =
            matrix("input_ids")?.ok_or_else(|| bad("missing field `input_ids`".into()))?;
        let attention_mask = matrix("attention_mask")?;
        Ok(Self {
            input_ids,
            attention_mask,
        })
    }
}

fn int_tensor(rows: &[Vec<i64>], device: &Device) -> Tensor<2, Int> {
    let shape = [rows.len(), rows[0].len()];
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, shape), device)
}

/// `peft forward`: logits of every input token, written atomically to `args.output`.
pub fn forward(args: &ForwardArgs, device: &Device) -> Result<(), CliError> {
    let input = ForwardInput::from_file(&args.input)?;
    let (model, adapter) = load_model(
        &args.model,
        args.adapter.as_deref(),
        device,
        args.dtype.into(),
    )?;
    // The context holds the adapter's virtual tokens and prefix; the logits only the former.
    let virtual_tokens = adapter.as_ref().map_or(0, Adapter::num_virtual_tokens);
    model
        .check_input(
            &input.input_ids,
            input.attention_mask.as_deref(),
            adapter.as_ref().map_or(0, Adapter::added_positions),
        )
        .map_err(|e| CliError::Input {
            path: args.input.clone(),
            message: e.to_string(),
        })?;
    check_logits_fit(
        &args.input,
        &input,
        virtual_tokens,
        model.geometry().vocab_size,
    )?;
    let ids = int_tensor(&input.input_ids, device);
    let mask = input.attention_mask.as_ref().map(|m| int_tensor(m, device));
    let logits = match adapter {
        Some(adapter) => PeftModel::new(model, adapter).forward(ids, mask),
        None => model.forward_ids(ids, mask),
    };
    write_logits(&args.output, logits.cast(DType::F32))
}

/// Refuses an input whose logits (`rows x (virtual tokens + length) x vocab_size` f32 values,
/// held in memory before they are written) cannot fit in the memory the system has available,
/// before the model allocates them: an allocation that large aborts the process instead of
/// returning an error.
fn check_logits_fit(
    path: &Path,
    input: &ForwardInput,
    virtual_tokens: usize,
    vocab_size: usize,
) -> Result<(), CliError> {
    let rows = input.input_ids.len();
    let length = input.input_ids.first().map_or(0, Vec::len) + virtual_tokens;
    let bytes = [rows, length, vocab_size, 4]
        .into_iter()
        .try_fold(1u128, |n, d| n.checked_mul(d as u128));
    let available = available_memory();
    let fits = match (bytes, available) {
        (Some(bytes), Some(available)) => bytes <= u128::from(available),
        (Some(bytes), None) => bytes <= isize::MAX as u128,
        (None, _) => false,
    };
    if fits {
        return Ok(());
    }
    let gib = |b: u128| b as f64 / (1u128 << 30) as f64;
    Err(CliError::Input {
        path: path.to_path_buf(),
        message: format!(
            "`input_ids` of {rows} rows x {length} positions make logits of {rows} x {length} x \
             vocab_size {vocab_size} f32 values ({:.1} GiB){}; send fewer or shorter rows",
            bytes.map_or(f64::INFINITY, gib),
            available.map_or(String::new(), |a| format!(
                ", more than the {:.1} GiB of memory available",
                gib(u128::from(a))
            )),
        ),
    })
}

/// Memory the system can still give this process (`MemAvailable` of /proc/meminfo, Linux), in
/// bytes; `None` elsewhere. One number from one file: no crate is worth it.
pub(crate) fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Writes `logits` as the single F32 tensor `logits` of a safetensors file, atomically.
pub fn write_logits(path: &Path, logits: Tensor<3>) -> Result<(), CliError> {
    Ok(write_tensors(path, vec![("logits", logits.into_data())])?)
}

/// `peft generate`: streams the continuation of `args.prompt` to `out`.
pub fn generate_text(
    args: &GenerateArgs,
    device: &Device,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let tokenizer = load_tokenizer(&args.model)?;
    let tokenizer_path = peft_models::model_file(&args.model, "tokenizer.json");
    let special = SpecialTokens::from_dir(&args.model)?;
    if args.temperature.is_nan() || args.temperature < 0.0 {
        return Err(CliError::Argument {
            flag: "--temperature",
            message: format!(
                "must be >= 0 (0 decodes greedily), found {}",
                args.temperature
            ),
        });
    }
    let config = GenerationConfig::new()
        .with_max_new_tokens(args.max_new_tokens)
        .with_do_sample(args.temperature > 0.0)
        .with_temperature(if args.temperature > 0.0 {
            args.temperature
        } else {
            1.0
        })
        .with_top_k(args.top_k)
        .with_top_p(args.top_p)
        .with_seed(args.seed)
        .with_eos_token_ids(special.eos_token_ids.clone())
        .with_pad_token_id(special.pad_token_id);
    config.validate().map_err(CliError::Generate)?;
    // Many prompts: every row is read and checked before the model is.
    let prompt_rows = match &args.input {
        Some(input) => {
            if args.batch_size == 0 {
                return Err(CliError::Argument {
                    flag: "--batch-size",
                    message: "must be at least 1".into(),
                });
            }
            crate::generate_file::read_prompts(input, &args.model, &tokenizer)?
        }
        None => Vec::new(),
    };
    let (model, adapter) = load_model(
        &args.model,
        args.adapter.as_deref(),
        device,
        args.dtype.into(),
    )?;
    if let (Some(input), Some(output)) = (&args.input, &args.output) {
        let rows = crate::generate_file::generate_file(
            &prompt_rows,
            input,
            output,
            args.batch_size,
            &args.model,
            &tokenizer,
            &config,
            model,
            adapter,
        )?;
        return writeln!(out, "{rows} prompts -> {}", output.display()).map_err(|source| {
            CliError::Io {
                path: "<stdout>".into(),
                source,
            }
        });
    }
    let prompt_text = args.prompt.as_deref().unwrap_or_default();
    let virtual_tokens = adapter.as_ref().map_or(0, Adapter::added_positions);
    let encoding = tokenizer
        .encode(prompt_text, true)
        .map_err(|e| ModelError::Tokenizer {
            path: tokenizer_path.clone(),
            message: e.to_string(),
        })?;
    let prompt: Vec<u32> = encoding.get_ids().to_vec();
    if prompt.is_empty() {
        return Err(CliError::Argument {
            flag: "--prompt",
            message: "encodes to no tokens".into(),
        });
    }

    let row: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
    model
        .check_input(&[row], None, virtual_tokens + args.max_new_tokens)
        .map_err(|e| match e {
            CoreError::TokenOutOfRange { id, vocab_size, .. } => CliError::Input {
                path: tokenizer_path.clone(),
                message: format!(
                    "--prompt encodes to token id {id}, but the model has vocab_size {vocab_size}: \
                     is the tokenizer from another model?"
                ),
            },
            other => CliError::Generate(other),
        })?;

    write!(out, "{prompt_text}").map_err(|source| CliError::Io {
        path: "<stdout>".into(),
        source,
    })?;
    // Decode the whole continuation each step and print what is new, holding back incomplete
    // UTF-8 (byte-level tokens can split a character).
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut failure = None;
    let prompts = [prompt];
    let on_step = |step: GenerationStep<'_>| {
        let Some(token) = step.tokens[0] else {
            return ControlFlow::Continue(());
        };
        if special.eos_token_ids.contains(&token) {
            return ControlFlow::Continue(());
        }
        generated.push(token);
        match tokenizer.decode(&generated, true) {
            Ok(text) if !text.ends_with('\u{FFFD}') && text.len() > printed => {
                let new = text.get(printed..).unwrap_or_default();
                if let Err(e) = write!(out, "{new}").and_then(|_| out.flush()) {
                    failure = Some(e);
                    return ControlFlow::Break(());
                }
                printed = text.len();
            }
            _ => {}
        }
        ControlFlow::Continue(())
    };
    let result = match adapter {
        Some(adapter) => PeftModel::new(model, adapter).generate(&prompts, &config, on_step),
        None => generate(&model, &prompts, Injection::default(), &config, on_step),
    };
    if let Some(source) = failure {
        return Err(CliError::Io {
            path: "<stdout>".into(),
            source,
        });
    }
    result.map_err(CliError::Generate)?;
    // Whatever was held back (an incomplete character that never completed) goes out at the end.
    let text = tokenizer
        .decode(&generated, true)
        .map_err(|e| ModelError::Tokenizer {
            path: tokenizer_path,
            message: e.to_string(),
        })?;
    let rest = text.get(printed..).unwrap_or_default();
    writeln!(out, "{rest}").map_err(|source| CliError::Io {
        path: "<stdout>".into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use peft_prefix::PrefixTuningConfig;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        method: MethodArgs,
    }

    fn prefix_config(args: &[&str]) -> PrefixTuningConfig {
        let parsed =
            Flags::try_parse_from(std::iter::once("peft").chain(args.iter().copied())).unwrap();
        let geometry = ModelGeometry {
            num_layers: 2,
            hidden_size: 16,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 4,
            vocab_size: 32,
            max_positions: None,
        };
        match parsed.method.config(&geometry).unwrap() {
            AutoAdapterConfig::PrefixTuning(config) => config,
            other => panic!("not a prefix config: {other:?}"),
        }
    }

    #[test]
    fn prefix_flags_reach_the_config() {
        let default = prefix_config(&["--method", "prefix-tuning"]);
        assert!(default.prefix_projection && !default.zero_init);
        let zero = prefix_config(&["--method", "p-tuning-v2", "--prefix-zero-init"]);
        assert!(!zero.prefix_projection && zero.zero_init);
        // Per-head key/value width, as PEFT shapes it for grouped-query attention.
        assert_eq!(zero.token_dim, 8);
        // --option sets any config key, over the flags.
        let set = prefix_config(&[
            "--method",
            "p-tuning-v2",
            "--encoder-hidden-size",
            "5",
            "--option",
            "prefix_projection=true",
            "--option",
            "encoder_hidden_size=7",
            "--option",
            "prefix_dropout=0.25",
        ]);
        assert!(set.prefix_projection);
        assert_eq!(set.encoder_hidden_size, Some(7));
        assert_eq!(set.prefix_dropout, 0.25);
    }

    #[test]
    fn options_of_the_wrong_type_or_value_name_their_flag_and_key() {
        let geometry = ModelGeometry {
            num_layers: 2,
            hidden_size: 16,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 4,
            vocab_size: 32,
            max_positions: Some(64),
        };
        let error = |args: &[&str]| {
            let parsed =
                Flags::try_parse_from(std::iter::once("peft").chain(args.iter().copied())).unwrap();
            parsed.method.config(&geometry).unwrap_err().to_string()
        };
        let err = error(&[
            "--method",
            "prompt-tuning",
            "--option",
            "prompt_tuning_init=WORDS",
        ]);
        assert!(
            err.starts_with("--prompt-tuning-init: prompt_tuning_init: must be \"RANDOM\""),
            "{err}"
        );
        let err = error(&["--method", "p-tuning", "--option", "encoder_num_layers=two"]);
        assert!(
            err.starts_with(
                "--encoder-num-layers: encoder_num_layers: invalid type: string \"two\""
            ),
            "{err}"
        );
        let err = error(&["--method", "p-tuning-v2", "--option", "prefix_dropout=1.5"]);
        assert!(
            err.starts_with("--option: prefix_dropout: must be in [0, 1), found 1.5"),
            "{err}"
        );
        let err = error(&["--method", "prefix-tuning", "--num-virtual-tokens", "64"]);
        assert!(
            err.starts_with("--num-virtual-tokens: num_virtual_tokens: is 64, but the base model"),
            "{err}"
        );
    }

    #[test]
    fn method_values_are_the_presets_of_the_facade_table() {
        let names: Vec<&str> = peft::presets().iter().map(|p| p.preset.name).collect();
        assert_eq!(
            names,
            [
                "prompt-tuning",
                "p-tuning",
                "prefix-tuning",
                "p-tuning-v2",
                "bitfit"
            ]
        );
        for name in names {
            let parsed = Flags::try_parse_from(["peft", "--method", name]).unwrap();
            assert_eq!(parsed.method.method.preset.name, name);
        }
        let err = Flags::try_parse_from(["peft", "--method", "lora"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("possible values: prompt-tuning, p-tuning"),
            "{err}"
        );
        let err = Flags::try_parse_from(["peft", "--method", "bitfit", "--option", "=1"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("is not KEY=VALUE"), "{err}");
    }

    #[test]
    fn logits_that_cannot_fit_in_memory_are_refused_before_the_forward() {
        let input = ForwardInput {
            input_ids: vec![vec![1; 4]; 2],
            attention_mask: None,
        };
        let path = Path::new("input.json");
        assert!(check_logits_fit(path, &input, 0, 512).is_ok());
        // 2 rows x 14 positions x 2^40 values: 112 TiB of f32.
        let err = check_logits_fit(path, &input, 10, 1 << 40)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "input.json: `input_ids` of 2 rows x 14 positions make logits of 2 x 14 x \
                 vocab_size 1099511627776 f32 values (114688.0 GiB)"
            ),
            "{err}"
        );
        assert!(err.ends_with("; send fewer or shorter rows"), "{err}");
    }
}
