//! Project tasks: `cargo xtask bench`, `cargo xtask gpu-check`, `cargo xtask load`,
//! `cargo xtask pretrain`.
//!
//! `bench` times training steps, forwards and generation of every method on a model built from a
//! config (default: the shape of Qwen2.5-0.5B) with random weights on the compiled backend, prints
//! a table, writes JSON, and with `--compare` runs the same workloads through torch + transformers +
//! peft in the same invocation (see `bench.rs`). Another backend:
//! `cargo run -p xtask --no-default-features --features cuda -- bench`.

mod bench;
mod epoch;
mod gpu_check;
mod load;
mod pretrain;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

// Parsed once per process: the size of the largest variant's arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Task {
    /// Training, forward and generation speed and memory of every method on a random-weight model.
    Bench(bench::BenchArgs),
    /// Everything a lent GPU should be asked, in one call: model and PEFT parity on the fixtures,
    /// greedy generation, training against Flex, the bench; JSON and a table to `$OUT`.
    GpuCheck(gpu_check::GpuCheckArgs),
    /// Build the embedded default model (assets/tiny-qwen2) from nothing.
    Pretrain(pretrain::PretrainArgs),
    /// A bounded load (fixed requests, clients and time limit) against a `peft serve` on this
    /// machine (loopback only): throughput, latency, lost requests.
    Load(load::LoadArgs),
}

fn main() {
    peft_cli::keep_freed_memory();
    let cli = Cli::parse();
    match cli.task {
        Task::Bench(args) => {
            if let Err(e) = bench::bench(&args) {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
        Task::GpuCheck(args) => match gpu_check::gpu_check(&args) {
            Ok(summary) if summary.failed > 0 => std::process::exit(2),
            Ok(summary) if summary.skipped_for_budget > 0 => std::process::exit(3),
            Ok(_) => {}
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        },
        Task::Load(args) => {
            if let Err(e) = load::load(&args) {
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
