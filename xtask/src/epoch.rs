//! The `epoch` workload of `cargo xtask bench`: `peft train` end to end on a real model and a
//! JSONL file, against a plain torch + PEFT loop (`scripts/peft_train.py`) on the same file with
//! the same hyper-parameters, in one invocation.
//!
//! Both sides train `--epochs` epochs (no evaluation) and report seconds per epoch: the sum of
//! their optimizer steps' wall time (batching, forward, backward, update), which leaves out model
//! loading and our end-of-epoch checkpoint. Ours runs twice: padding each batch to its longest row
//! as the PEFT loop does, and with `--group-by-length` (rows of similar length batched together).
//! Rounds alternate the sides, each keeps its best round.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use serde_json::{Value, json};

use peft::MethodPreset;

use crate::bench::BenchMethod;

/// What the epoch workload needs besides the method list.
pub struct EpochSettings<'a> {
    /// Hugging Face model directory (weights, tokenizer.json).
    pub model: &'a Path,
    /// Training rows (prompt/completion JSONL).
    pub data: &'a Path,
    /// Epochs per run.
    pub epochs: usize,
    /// Rows per batch.
    pub batch: usize,
    /// Virtual tokens / prefix positions.
    pub num_virtual_tokens: usize,
    /// Peak learning rate (`None`: `peft train`'s default of the method).
    pub lr: Option<f64>,
    /// Rounds, alternating the sides.
    pub rounds: usize,
    /// Threads of the torch side.
    pub threads: usize,
    /// Python with torch + transformers + peft, if any.
    pub python: Option<&'a Path>,
}

/// The presets the PEFT loop (`scripts/peft_train.py --method`) implements, by name.
const PEFT_LOOP_METHODS: [&str; 4] = ["prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2"];

/// `peft train`'s method (its `--method` value, which the PEFT loop shares) for a benchmarked
/// case; `None` for those the PEFT loop lacks or that set options `peft train` has no flag for.
fn train_method(method: BenchMethod) -> Option<MethodPreset> {
    let preset = method.preset?;
    let plain = method.name == preset.preset.name || method.name == "p-tuning-mlp";
    (plain && PEFT_LOOP_METHODS.contains(&preset.preset.name)).then_some(preset)
}

/// Seconds of each epoch of a `peft train` run, from its metrics file.
fn our_epoch_seconds(output: &Path) -> Result<Vec<f64>, String> {
    let metrics =
        peft::train::trainer::read_metrics(&output.join(peft::train::trainer::METRICS_FILE))
            .map_err(|e| e.to_string())?;
    let mut epochs: Vec<f64> = Vec::new();
    for line in metrics {
        if let peft::train::trainer::MetricsLine::Train(step) = line {
            // Step k of epoch e reports epoch e + k / steps (the last one e + 1).
            let epoch = (step.epoch.ceil() as usize).max(1) - 1;
            if epochs.len() <= epoch {
                epochs.resize(epoch + 1, 0.0);
            }
            epochs[epoch] += step.seconds;
        }
    }
    Ok(epochs)
}

/// The flags both trainers take alike (`scripts/peft_train.py` mirrors `peft train`'s names):
/// the method, the data, the output and the hyper-parameters of the comparison.
fn shared_flags(settings: &EpochSettings, method: &str, lr: f64, output: &Path) -> Vec<String> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    [
        ("--model", path(settings.model)),
        ("--method", method.to_string()),
        ("--train", path(settings.data)),
        ("--output", path(output)),
        ("--epochs", settings.epochs.to_string()),
        ("--batch-size", settings.batch.to_string()),
        (
            "--num-virtual-tokens",
            settings.num_virtual_tokens.to_string(),
        ),
        ("--lr", lr.to_string()),
        ("--weight-decay", "0".into()),
        ("--max-grad-norm", "0".into()),
        ("--seed", "0".into()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect()
}

fn ours(
    settings: &EpochSettings,
    method: &str,
    lr: f64,
    grouped: bool,
    scratch: &Path,
) -> Result<Vec<f64>, String> {
    let output = scratch.join(format!(
        "{method}-{}",
        if grouped { "grouped" } else { "padded" }
    ));
    let _ = std::fs::remove_dir_all(&output);
    let mut argv = vec!["peft".to_string(), "train".to_string()];
    argv.extend(shared_flags(settings, method, lr, &output));
    if grouped {
        argv.push("--group-by-length".into());
    }
    let cli = peft_cli::cli::Cli::try_parse_from(&argv).map_err(|e| e.to_string())?;
    peft_cli::cli::run(cli, &peft::default_device(), &mut std::io::sink())
        .map_err(|e| format!("peft train: {e}"))?;
    let seconds = our_epoch_seconds(&output)?;
    let _ = std::fs::remove_dir_all(&output);
    Ok(seconds)
}

fn torch(
    settings: &EpochSettings,
    python: &Path,
    method: &str,
    lr: f64,
    scratch: &Path,
) -> Result<Vec<f64>, String> {
    let script = Path::new("scripts/peft_train.py");
    let output = scratch.join("peft.json");
    let status = Command::new(python)
        .arg(script)
        .args(shared_flags(settings, method, lr, &output))
        .args(["--threads", &settings.threads.to_string()])
        .arg("--no-eval-at-start")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    if !status.success() {
        return Err(format!("{} {} failed", python.display(), script.display()));
    }
    let text =
        std::fs::read_to_string(&output).map_err(|e| format!("{}: {e}", output.display()))?;
    let record: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", output.display()))?;
    Ok(record["epoch_seconds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect())
}

fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// The lowest mean over the rounds.
fn best(rounds: &[Vec<f64>]) -> Option<f64> {
    rounds.iter().filter_map(|r| mean(r)).min_by(f64::total_cmp)
}

/// Runs the epoch workload for `methods`, prints its table, and returns its JSON records.
pub fn bench_epoch(
    settings: &EpochSettings,
    methods: &[BenchMethod],
) -> Result<Vec<Value>, String> {
    let scratch = std::env::temp_dir().join(format!("peft-bench-epoch-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    println!(
        "epoch: {} on {}, batch {}, {} virtual tokens, {} epoch(s), AdamW without weight decay or clipping, linear decay",
        settings.data.display(),
        settings.model.display(),
        settings.batch,
        settings.num_virtual_tokens,
        settings.epochs,
    );
    let mut records = Vec::new();
    for &method in methods {
        let Some(train_method) = train_method(method) else {
            println!(
                "epoch: {} skipped (the PEFT loop has no such method)",
                method.name()
            );
            continue;
        };
        let name = train_method.preset.name;
        let lr = settings.lr.unwrap_or(train_method.preset.learning_rate);
        let (mut padded, mut grouped, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..settings.rounds {
            padded.push(ours(settings, name, lr, false, &scratch)?);
            grouped.push(ours(settings, name, lr, true, &scratch)?);
            if let Some(python) = settings.python {
                theirs.push(torch(settings, python, name, lr, &scratch)?);
            }
        }
        let record = json!({
            "method": method.name(),
            "lr": lr,
            "ours_padded_epoch_s": best(&padded),
            "ours_grouped_epoch_s": best(&grouped),
            "torch_epoch_s": best(&theirs),
            "rounds": { "ours_padded": padded, "ours_grouped": grouped, "torch": theirs },
        });
        records.push(record);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    print_epoch_table(&records);
    Ok(records)
}

fn print_epoch_table(records: &[Value]) {
    let cell = |v: &Value| v.as_f64().map_or("-".to_string(), |s| format!("{s:.1}"));
    let ratio = |ours: &Value, theirs: &Value| match (ours.as_f64(), theirs.as_f64()) {
        (Some(o), Some(t)) if t > 0.0 => format!("{:.2}x", o / t),
        _ => "-".into(),
    };
    println!(
        "| method | ours s/epoch (padded) | ours s/epoch (--group-by-length) | torch + PEFT s/epoch | time vs PEFT: padded | grouped |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in records {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r["method"].as_str().unwrap_or("?"),
            cell(&r["ours_padded_epoch_s"]),
            cell(&r["ours_grouped_epoch_s"]),
            cell(&r["torch_epoch_s"]),
            ratio(&r["ours_padded_epoch_s"], &r["torch_epoch_s"]),
            ratio(&r["ours_grouped_epoch_s"], &r["torch_epoch_s"]),
        );
    }
}

/// The model directory and data file the epoch workload needs.
pub fn epoch_inputs(
    model: Option<&PathBuf>,
    data: Option<&PathBuf>,
) -> Result<(PathBuf, PathBuf), String> {
    match (model, data) {
        (Some(m), Some(d)) => Ok((m.clone(), d.clone())),
        _ => Err("the epoch workload needs --model DIR (a Hugging Face model directory) and --data FILE (prompt/completion JSONL); see docs/smollm2.md".into()),
    }
}
