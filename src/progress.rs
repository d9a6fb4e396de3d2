//! Progress reporting: an indicatif bar on a terminal, nothing otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar that is hidden when standard error is not a terminal.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar for `total` items of `unit`, labelled `what`; with `total` 0 (unknown, e.g. a
    /// stream) a counter with the rate and no ETA.
    pub fn new(total: u64, what: &str, unit: &str) -> Self {
        let bar = if std::io::stderr().is_terminal() {
            let (b, template) = if total > 0 {
                (
                    ProgressBar::new(total),
                    format!("{what} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{per_sec}}, ETA {{eta}}) {{msg}}"),
                )
            } else {
                (
                    ProgressBar::no_length(),
                    format!("{what} {{pos}} {unit} ({{per_sec}}, {{elapsed}}) {{msg}}"),
                )
            };
            b.set_style(
                ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        } else {
            ProgressBar::hidden()
        };
        Self { bar }
    }
    /// Advances by `n`.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }
    /// Sets the message shown before the bar.
    pub fn set_message(&self, m: String) {
        self.bar.set_message(m);
    }
    /// Sets the position.
    pub fn set_position(&self, p: u64) {
        self.bar.set_position(p);
    }
    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
