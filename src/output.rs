//! Lines for standard output. A reader that goes away (`oedit eval --json - | head -1`) is a
//! typed error, [`OutputClosed`], not a panic: the command stops after what it has committed.

use std::io::Write;

/// Standard output was closed by its reader (a broken pipe): exit code 141, as a process
/// killed by SIGPIPE reports in a shell.
#[derive(Debug)]
pub struct OutputClosed;

impl std::fmt::Display for OutputClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed by its reader (broken pipe)")
    }
}

impl std::error::Error for OutputClosed {}

/// Writes `text` and a newline to standard output and flushes it.
pub fn print_line(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|()| out.flush()).map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe => anyhow::Error::new(OutputClosed),
        _ => anyhow::Error::new(e).context("cannot write to standard output"),
    })
}
