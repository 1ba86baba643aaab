//! Recipe: prompt tuning (default) or prefix tuning Qwen2.5-1.5B on instruction data, the loss
//! on the answer only.
//!
//! Data: alpaca-style JSONL rows `{"instruction", "input", "output"}`, shown to the model as
//! `"Human: {instruction}\n{input}\n\nAssistant: "`. Any `peft train` flag after the required
//! ones overrides a default; `--method prefix-tuning` switches method (its default lr then is
//! still 3e-2 unless `--lr` is given: pass `--lr 1e-2` for the prefix recipe).
//!
//! ```sh
//! cargo run --release --example qwen_instructions -- \
//!     --model path/to/Qwen2.5-1.5B --train alpaca.jsonl --output out/qwen-prompt
//! cargo run --release --example qwen_instructions -- \
//!     --model path/to/Qwen2.5-1.5B --train alpaca.jsonl --output out/qwen-prefix \
//!     --method prefix-tuning --lr 1e-2
//! ```
//! Defaults: 10 virtual tokens (prefix: 10 positions with projection), micro-batches of 4 with 4
//! accumulated per step, 1 epoch, max length 256, lr 3e-2.

use std::process::ExitCode;

fn main() -> ExitCode {
    let recipe = [
        "peft",
        "train",
        "--method",
        "prompt-tuning",
        "--num-virtual-tokens",
        "10",
        "--batch-size",
        "4",
        "--gradient-accumulation-steps",
        "4",
        "--epochs",
        "1",
        "--max-length",
        "256",
        "--lr",
        "3e-2",
    ];
    let args = recipe
        .map(String::from)
        .into_iter()
        .chain(std::env::args().skip(1));
    peft_cli::cli::main_with(args)
}
