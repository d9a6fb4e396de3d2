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

/// Whether `OEDIT_TIMINGS` asks for the one-off phase timings on standard error.
pub fn timings_enabled() -> bool {
    std::env::var_os("OEDIT_TIMINGS").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Prints `timing: WHAT S s (peak RSS M MiB)` on standard error when [`timings_enabled`]: the
/// one-off costs of a session (model load, key statistics, the method's factorisations), which
/// the per-edit log does not hold.
pub fn report_timing(what: &str, start: std::time::Instant) {
    if timings_enabled() {
        let rss = peak_rss_mib().map(|m| format!(" (peak RSS {m:.0} MiB)")).unwrap_or_default();
        eprintln!("timing: {what} {:.1} s{rss}", start.elapsed().as_secs_f64());
    }
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`), when known.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 =
        status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
