//! The `peft` command line. See `peft --help` and the README.

use std::process::ExitCode;

fn main() -> ExitCode {
    peft_cli::keep_freed_memory();
    peft_cli::cli::main_with(std::env::args_os())
}
