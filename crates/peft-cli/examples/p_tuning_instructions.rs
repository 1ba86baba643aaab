//! Recipe: P-tuning bloom-1b4-zh on instruction data, the loss on the answer only.
//!
//! Data: alpaca-style JSONL rows `{"instruction", "input", "output"}`, shown to the model as
//! `"Human: {instruction}\n{input}\n\nAssistant: "`. Any `peft train` flag after the required
//! ones overrides a default.
//!
//! ```sh
//! cargo run --release --example p_tuning_instructions -- \
//!     --model path/to/bloom-1b4-zh --train alpaca_zh.jsonl --output out/ptuning-zh
//! ```
//! Defaults: 10 virtual tokens through a bidirectional-LSTM encoder of width 1024 (dropout 0.1),
//! micro-batches of 1 with 8 accumulated per step, 1 epoch, max length 256, lr 1e-3.

use std::process::ExitCode;

fn main() -> ExitCode {
    let recipe = [
        "peft",
        "train",
        "--method",
        "p-tuning",
        "--num-virtual-tokens",
        "10",
        "--encoder-reparameterization-type",
        "lstm",
        "--encoder-hidden-size",
        "1024",
        "--encoder-dropout",
        "0.1",
        "--batch-size",
        "1",
        "--gradient-accumulation-steps",
        "8",
        "--epochs",
        "1",
        "--max-length",
        "256",
        "--lr",
        "1e-3",
    ];
    let args = recipe
        .map(String::from)
        .into_iter()
        .chain(std::env::args().skip(1));
    peft_cli::cli::main_with(args)
}
