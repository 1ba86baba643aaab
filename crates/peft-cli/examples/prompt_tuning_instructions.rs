//! Recipe: prompt tuning bloom-1b4-zh on instruction data, the loss on the answer only.
//!
//! Data: alpaca-style JSONL rows `{"instruction", "input", "output"}`, shown to the model as
//! `"Human: {instruction}\n{input}\n\nAssistant: "` (the default `--template`). Any `peft train`
//! flag after the required ones overrides a default.
//!
//! ```sh
//! cargo run --release --example prompt_tuning_instructions -- \
//!     --model path/to/bloom-1b4-zh --train alpaca_zh.jsonl --output out/prompt-zh
//! ```
//! Defaults: 10 virtual tokens started from the words of "下面是一段人与机器人的对话。" (TEXT
//! init), micro-batches of 1 with 8 accumulated per step, 1 epoch, max length 256, lr 3e-2.

use std::process::ExitCode;

fn main() -> ExitCode {
    let recipe = [
        "peft",
        "train",
        "--method",
        "prompt-tuning",
        "--num-virtual-tokens",
        "10",
        "--prompt-tuning-init",
        "text",
        "--prompt-tuning-init-text",
        "下面是一段人与机器人的对话。",
        "--batch-size",
        "1",
        "--gradient-accumulation-steps",
        "8",
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
