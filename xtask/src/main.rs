//! Project tasks: `cargo xtask bench`, `cargo xtask pretrain`.
//!
//! `bench` times prefill and decode of a model built from a config (default: the shape of
//! Qwen2.5-0.5B) with random weights on the compiled backend, prints a table, writes JSON, and with
//! `--compare` runs the same workloads through torch + transformers in the same invocation.
//! Another backend: `cargo run -p xtask --features cuda -- bench` (a GPU backend, when compiled in,
//! is preferred over the CPU).

mod pretrain;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use burn::module::Module;
use clap::{Parser, Subcommand};
use peft::core::{GenerationConfig, Injection, generate};
use peft::models::AutoConfig;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Prefill and decode tokens/s (and peak memory) of a random-weight model.
    Bench(BenchArgs),
    /// Build the embedded default model (assets/tiny-qwen2) from nothing.
    Pretrain(pretrain::PretrainArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Hugging Face config.json of the model shape.
    #[arg(long, default_value = "fixtures/configs/qwen2.5-0.5b/config.json")]
    config: PathBuf,
    /// Prompts per batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// New tokens per prompt (decode runs new_tokens - 1 steps after the prefill).
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Timed repetitions of each workload (the best is kept).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Also run torch + transformers on the same workloads and print ours/theirs.
    #[arg(long)]
    compare: bool,
    /// Python with torch and transformers for --compare (default: .venv/bin/python, else python3).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Where to write the results.
    #[arg(long, default_value = "bench-results/bench.json")]
    json: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    match cli.task {
        Task::Bench(args) => {
            if let Err(e) = bench(&args) {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
        Task::Pretrain(args) => {
            if let Err(e) = pretrain::pretrain(&args) {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
    }
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn bench(args: &BenchArgs) -> Result<(), String> {
    if args.new_tokens < 2 || args.batch == 0 || args.prompt_len == 0 || args.reps == 0 {
        return Err("--new-tokens must be >= 2; --batch, --prompt-len and --reps >= 1".into());
    }
    let config = AutoConfig::from_file(&args.config).map_err(|e| e.to_string())?;
    let device = peft::default_device();
    let vocab = config.geometry().vocab_size;
    let model = config.init(&device);
    let params = model.num_params();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "model {} ({params} params, random weights), backend {}, f32, batch {}, prompt {}, new tokens {}, {threads} threads",
        args.config.display(),
        peft::backend_name(),
        args.batch,
        args.prompt_len,
        args.new_tokens
    );

    // Deterministic pseudo-random prompts.
    let mut state = 0x2545F4914F6CDD1Du64;
    let prompts: Vec<Vec<u32>> = (0..args.batch)
        .map(|_| {
            (0..args.prompt_len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % vocab as u64) as u32
                })
                .collect()
        })
        .collect();
    let timed = |n: usize| -> Result<f64, String> {
        let config = GenerationConfig::new().with_max_new_tokens(n);
        let start = Instant::now();
        let out = generate(&model, &prompts, Injection::default(), &config, |_| {
            ControlFlow::Continue(())
        })
        .map_err(|e| e.to_string())?;
        debug_assert!(out.new_tokens.iter().all(|r| r.len() == n));
        Ok(start.elapsed().as_secs_f64())
    };
    timed(2)?; // warm-up: materializes the lazily initialized weights, autotunes kernels
    let best = |n| -> Result<f64, String> {
        (0..args.reps)
            .map(|_| timed(n))
            .try_fold(f64::INFINITY, |m, t| Ok(m.min(t?)))
    };
    let prefill = best(1)?;
    let full = best(args.new_tokens)?;
    let ours = json!({
        "engine": format!("peft-burn ({})", peft::backend_name()),
        "prefill_tokens_per_s": (args.batch * args.prompt_len) as f64 / prefill,
        "decode_tokens_per_s": (args.batch * (args.new_tokens - 1)) as f64 / (full - prefill).max(1e-9),
        "prefill_s": prefill,
        "generate_s": full,
        "peak_rss_mib": peak_rss_mib(),
    });
    drop(model);

    let theirs = if args.compare {
        Some(run_torch(args, threads)?)
    } else {
        None
    };

    print_table(&ours, theirs.as_ref());
    let record = json!({
        "commit": git_commit(),
        "backend": peft::backend_name(),
        "dtype": "f32",
        "config": args.config,
        "params": params,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "threads": threads,
        "ours": ours,
        "torch": theirs,
    });
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&record).expect("JSON of plain values");
    std::fs::write(&args.json, text).map_err(|e| format!("{}: {e}", args.json.display()))?;
    println!("wrote {}", args.json.display());
    Ok(())
}

fn find_python(args: &BenchArgs) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match &args.python {
        Some(p) => vec![p.clone()],
        None => vec![PathBuf::from(".venv/bin/python"), PathBuf::from("python3")],
    };
    candidates.into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import torch, transformers"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn run_torch(args: &BenchArgs, threads: usize) -> Result<Value, String> {
    let Some(python) = find_python(args) else {
        println!("--compare: no Python with torch and transformers found; skipping the comparison");
        return Ok(json!({ "skipped": "no Python with torch + transformers" }));
    };
    let script = Path::new("scripts/bench_torch.py");
    let device = if peft::backend_name() == "cuda" {
        "cuda"
    } else {
        "cpu"
    };
    let out = Command::new(&python)
        .arg(script)
        .args(["--config", &args.config.to_string_lossy()])
        .args(["--batch", &args.batch.to_string()])
        .args(["--prompt-len", &args.prompt_len.to_string()])
        .args(["--new-tokens", &args.new_tokens.to_string()])
        .args(["--reps", &args.reps.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--device", device])
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed:\n{}",
            python.display(),
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .map_err(|e| format!("unexpected output of {}: {e}: {stdout}", script.display()))
}

fn print_table(ours: &Value, theirs: Option<&Value>) {
    let cols = [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "peak_rss_mib",
    ];
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
    let cell = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.1}"));
    println!(
        "\n{:<44} {:>14} {:>14} {:>14}",
        "", "prefill tok/s", "decode tok/s", "peak RSS MiB"
    );
    let row = |v: &Value| {
        let name = v.get("engine").and_then(Value::as_str).unwrap_or("?");
        println!(
            "{:<44} {:>14} {:>14} {:>14}",
            name,
            cell(num(v, cols[0])),
            cell(num(v, cols[1])),
            cell(num(v, cols[2]))
        );
    };
    row(ours);
    if let Some(theirs) = theirs.filter(|t| t.get("skipped").is_none()) {
        row(theirs);
        let ratio = |k| match (num(ours, k), num(theirs, k)) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        println!(
            "{:<44} {:>14} {:>14} {:>14}",
            "ours / torch",
            ratio(cols[0]),
            ratio(cols[1]),
            ratio(cols[2])
        );
    }
}
