//! The `peft` command line. See `peft --help` and the README.

use std::process::ExitCode;

fn main() -> ExitCode {
    peft::keep_freed_memory();
    peft::cli::main_with(std::env::args_os())
}
