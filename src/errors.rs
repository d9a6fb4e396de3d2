//! Typed errors that callers branch on.

/// Bad user input (a file, a field, a flag value): exit code 2.
#[derive(Debug)]
pub struct InputError(pub String);

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

/// A metric fell below its `--fail-under` threshold: exit code 3.
#[derive(Debug)]
pub struct ThresholdError(pub String);

impl std::fmt::Display for ThresholdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "below threshold: {}", self.0)
    }
}

impl std::error::Error for ThresholdError {}
