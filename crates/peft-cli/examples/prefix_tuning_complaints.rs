//! Recipe: prefix tuning bloomz-560m to label tweets as complaints, classification as
//! generation with the loss on the label only (the setting of PEFT's `peft_prefix_tuning_clm`
//! example on RAFT's twitter_complaints).
//!
//! Data: JSONL rows `{"prompt": "Tweet text : <tweet> Label : ", "completion": "complaint"}` (or
//! `"no complaint"`). Any `peft train` flag after the required ones overrides a default.
//!
//! ```sh
//! cargo run --release --example prefix_tuning_complaints -- \
//!     --model path/to/bloomz-560m --train train.jsonl --eval test.jsonl --output out/complaints
//! ```
//! Defaults: 30 prefix positions without projection (PEFT's `PrefixTuningConfig` default),
//! lr 1e-2, 50 epochs, batch 8, max length 64.

use std::process::ExitCode;

fn main() -> ExitCode {
    let recipe = [
        "peft",
        "train",
        "--method",
        "prefix-tuning",
        "--prefix-projection",
        "false",
        "--num-virtual-tokens",
        "30",
        "--lr",
        "1e-2",
        "--epochs",
        "50",
        "--batch-size",
        "8",
        "--max-length",
        "64",
    ];
    let args = recipe
        .map(String::from)
        .into_iter()
        .chain(std::env::args().skip(1));
    peft_cli::cli::main_with(args)
}
