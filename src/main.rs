//! The `oedit` command.

use std::process::ExitCode;

use clap::Parser;
use oedit::cli::{run, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = cli.threads;
    let result = oedit::threads::in_pool(threads, move || run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(oedit::exit_code(&e))
        }
    }
}
