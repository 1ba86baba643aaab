//! The `peft` command line. See `peft --help` and the README.

use std::process::ExitCode;

use clap::Parser;
use peft::cli::{Cli, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let device = peft::default_device();
    let stdout = std::io::stdout();
    match run(cli, &device, &mut stdout.lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
