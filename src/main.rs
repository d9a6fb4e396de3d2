//! The `oedit` command.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use oedit::cli::{run, Cli};

fn main() -> ExitCode {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // Errors are reported on one line; keep library backtraces (candle captures them when
        // RUST_BACKTRACE is set) out of them. Panics still honour RUST_BACKTRACE.
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    let cli = Cli::parse();
    let threads = cli.threads;
    let result = oedit::threads::in_pool(threads, move || run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed stderr must not turn the error into a panic (exit 101): the exit code is
            // what a script reads.
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::from(oedit::exit_code(&e))
        }
    }
}
