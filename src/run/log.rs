//! Typed lines of a run's `log.jsonl` and `rejected.jsonl`, and the one function that reads them.
//!
//! The JSON field names and their meaning are those of README's `log.jsonl` table; the python
//! scripts under `scripts/` and the bench tooling read them.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use crate::data::{EditRecord, RecordError};
use crate::edit::landing::AttemptLog;
use crate::eval::RecordScores;

/// Seconds spent in each phase of one edit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Phases {
    /// k*: one full forward pass.
    #[serde(deserialize_with = "nullable_f64")]
    pub key: f64,
    /// v* optimisation.
    #[serde(deserialize_with = "nullable_f64")]
    pub value: f64,
    /// Solve, projection, apply, subspace.
    #[serde(deserialize_with = "nullable_f64")]
    pub update: f64,
    /// Writing the checkpoint (0 in the copy stored inside the checkpoint itself).
    #[serde(deserialize_with = "nullable_f64")]
    pub checkpoint: f64,
    /// Bytes the checkpoint of this edit wrote to the run directory (absent in the copy stored
    /// inside the checkpoint itself, and in logs of earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_bytes: Option<u64>,
}

/// One line of `DIR/log.jsonl`: one committed edit.
///
/// Non-finite numbers are written as `null` (JSON has no NaN) and read back as NaN. Fields that
/// older versions did not write (`ground_truth`, `layers`, `subspace_released`, `peak_rss_mb`)
/// default when missing; `eval` is written only with `--eval-each`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// 0-based edit number in the run.
    pub index: usize,
    /// 1-based input line.
    pub line: usize,
    /// The record's case id.
    pub case_id: Option<u64>,
    /// The edited subject.
    pub subject: String,
    /// The new answer.
    pub target_new: String,
    /// The record's true answer, when it has one.
    #[serde(default)]
    pub ground_truth: Option<String>,
    /// The editing method's name.
    pub method: String,
    /// The edited layer (the last one for methods that edit several).
    pub layer: Option<usize>,
    /// Every layer the edit changed.
    #[serde(default)]
    pub layers: Vec<usize>,
    /// Wall time of the whole edit.
    #[serde(deserialize_with = "nullable_f64")]
    pub seconds: f64,
    /// Seconds per phase.
    pub phases: Phases,
    /// v* optimisation steps taken.
    pub steps: usize,
    /// v* loss at the first step.
    #[serde(deserialize_with = "nullable_f64")]
    pub loss_first: f64,
    /// v* loss at the last step.
    #[serde(deserialize_with = "nullable_f64")]
    pub loss_last: f64,
    /// Directions in the stored subspace after this edit.
    pub basis_size: usize,
    /// ‖ΔW‖_F of this edit.
    #[serde(deserialize_with = "nullable_f64")]
    pub update_norm: f64,
    /// How much of the key's update direction survives the projection.
    #[serde(deserialize_with = "nullable_f64")]
    pub retained: f64,
    /// Probability of the whole target on the edit prompt before the edit.
    #[serde(deserialize_with = "nullable_f64")]
    pub p_target_before: f64,
    /// The same after the edit.
    #[serde(deserialize_with = "nullable_f64")]
    pub p_target_after: f64,
    /// After the edit, target_new beats ground_truth (greedy-correct without a ground truth).
    pub target_wins: bool,
    /// Directions appended to the subspace.
    pub subspace_added: usize,
    /// Directions dropped by the saturation policy.
    pub subspace_compressed_away: usize,
    /// Directions released by the conflict policy before this edit's update.
    #[serde(default)]
    pub subspace_released: usize,
    /// Updates made for this edit: 1, plus the further attempts of closed-loop landing (1 in
    /// logs of earlier versions).
    #[serde(default = "one")]
    pub attempts: usize,
    /// mean NLL(ground_truth) − mean NLL(target_new) on the edit prompt after the edit (null
    /// without a ground truth; absent in logs of earlier versions).
    #[serde(default)]
    pub margin: Option<f64>,
    /// Every landing attempt (the first included), when there was more than one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub landing: Vec<AttemptLog>,
    /// Peak resident memory of the process so far, MiB.
    #[serde(default)]
    pub peak_rss_mb: Option<f64>,
    /// With `--batch-size` above 1: the 0-based number (in the run) of the batch this edit was
    /// applied in; the edits of one batch share it (absent for unbatched runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    /// With `--eval-each`: the record's scores right after its edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<RecordScores>,
}

impl LogEntry {
    /// The JSON line (no newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a log entry always serialises")
    }

    /// Parses one JSON line.
    pub fn from_line(line: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(line)
    }

    /// Says how the input read at this entry's line differs from what this edit recorded
    /// (subject and target_new; an invalid record always differs), or None when it is the same
    /// fact.
    pub fn mismatch(&self, found: Result<&EditRecord, &RecordError>) -> Option<String> {
        let edited = format!(
            "this run edited subject {:?} → {:?} at line {}",
            self.subject, self.target_new, self.line
        );
        match found {
            Ok(rec) if rec.subject == self.subject && rec.target_new == self.target_new => None,
            Ok(rec) => {
                Some(format!("{edited}, the file has subject {:?} → {:?}", rec.subject, rec.target_new))
            }
            Err(e) => {
                let field = e.field.as_deref().map(|f| format!("field `{f}`: ")).unwrap_or_default();
                Some(format!("{edited}, the file has an invalid record there ({field}{})", e.reason))
            }
        }
    }

    /// Says that the input ended (its last record at line `last`) before this edit's line.
    pub fn missing(&self, last: usize) -> String {
        format!(
            "this run edited subject {:?} → {:?} at line {}, the file ends before it (last record at line {last})",
            self.subject, self.target_new, self.line
        )
    }
}

/// One line of `DIR/rejected.jsonl` (`--on-invalid skip`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectedLine {
    /// 1-based input line.
    pub line: usize,
    /// The input's name (file name or `<stdin>`).
    pub source: String,
    /// The offending field, when one applies.
    pub field: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl From<&RecordError> for RejectedLine {
    fn from(e: &RecordError) -> Self {
        Self { line: e.line, source: e.source.clone(), field: e.field.clone(), reason: e.reason.clone() }
    }
}

fn one() -> usize {
    1
}

/// `null` (how serde_json writes NaN and infinities) reads back as NaN.
fn nullable_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The lines of a JSONL file of the run, typed.
#[derive(Debug, Clone)]
pub struct Lines<T> {
    /// Every complete line, in file order.
    pub items: Vec<T>,
    /// The text of each of `items`' lines, as in the file (without the newline).
    pub raw: Vec<String>,
    /// True when the file ended in a torn line that was left out (see [`read_jsonl`]).
    pub torn_tail: bool,
}

/// Reads a JSONL file of the run (`log.jsonl`, `rejected.jsonl`); a missing file has no lines.
///
/// The one error policy of every reader: a line that does not parse as a `T` is a corrupt-log
/// error naming the file and the line, with one exception. The last line, when it is not
/// terminated by a newline and does not parse, was torn by a crash in the middle of an append
/// (or is still being written by a running `oedit edit`): it is left out and `torn_tail` is set.
/// Nothing was committed by it (lines are appended after the commit point), so
/// [`RunDir::reconcile`](super::RunDir::reconcile) drops it from the file. Blank lines are
/// skipped.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Lines<T>> {
    let mut text = String::new();
    match std::fs::File::open(path) {
        Ok(mut f) => {
            f.read_to_string(&mut text).with_context(|| format!("{}: cannot read", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Lines { items: Vec::new(), raw: Vec::new(), torn_tail: false })
        }
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
    let unterminated = !text.is_empty() && !text.ends_with('\n');
    let lines: Vec<&str> = text.split('\n').collect();
    let last = lines.iter().rposition(|l| !l.trim().is_empty());
    let mut items = Vec::new();
    let mut raw = Vec::new();
    let mut torn_tail = false;
    for (i, l) in lines.iter().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<T>(l) {
            Ok(v) => {
                items.push(v);
                raw.push(l.to_string());
            }
            Err(_) if unterminated && Some(i) == last => torn_tail = true,
            Err(e) => anyhow::bail!("{}:{}: corrupt log line: {e}", path.display(), i + 1),
        }
    }
    Ok(Lines { items, raw, torn_tail })
}

/// Reads `log.jsonl` (see [`read_jsonl`] for the error policy).
pub fn read_log(path: &Path) -> Result<Vec<LogEntry>> {
    Ok(read_jsonl(path)?.items)
}

/// The log of the committed edits, each entry with its line's text: the lines of edits
/// `0..n_edits`, plus the copies of the last commit's entries kept in the checkpoint (`tail`, in
/// order: one entry, or a batch's) for those a crash between the commit and the appends left
/// out.
pub fn committed(log: Lines<LogEntry>, n_edits: usize, tail: &[LogEntry]) -> Vec<(LogEntry, String)> {
    let mut out: Vec<(LogEntry, String)> =
        log.items.into_iter().zip(log.raw).filter(|(e, _)| e.index < n_edits).collect();
    for e in tail {
        if e.index == out.len() && e.index < n_edits {
            out.push((e.clone(), e.to_line()));
        }
    }
    out
}

/// The committed edits by input line, for checking that an edits file is the one a run edited.
pub fn by_line(log: &[LogEntry]) -> HashMap<usize, &LogEntry> {
    log.iter().map(|e| (e.line, e)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: usize) -> LogEntry {
        LogEntry {
            index,
            line: index + 1,
            case_id: None,
            subject: "Bob".into(),
            target_new: "piano".into(),
            ground_truth: None,
            method: "rome".into(),
            layer: Some(1),
            layers: vec![1],
            seconds: 0.5,
            phases: Phases::default(),
            steps: 3,
            loss_first: 2.0,
            loss_last: 0.1,
            basis_size: 0,
            update_norm: 1.0,
            retained: 1.0,
            p_target_before: 0.1,
            p_target_after: 0.9,
            target_wins: true,
            subspace_added: 0,
            subspace_compressed_away: 0,
            subspace_released: 0,
            attempts: 1,
            margin: Some(0.5),
            landing: Vec::new(),
            peak_rss_mb: None,
            batch: None,
            eval: None,
        }
    }

    fn read(text: &str) -> Result<Lines<LogEntry>> {
        let dir = std::env::temp_dir().join(format!("oedit-log-test-{}-{}", std::process::id(), text.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.jsonl");
        std::fs::write(&path, text).unwrap();
        let out = read_jsonl(&path);
        std::fs::remove_dir_all(&dir).ok();
        out
    }

    #[test]
    fn one_error_policy_with_a_torn_tail() {
        let (a, b) = (entry(0).to_line(), entry(1).to_line());
        // Complete lines, blank lines skipped.
        let l = read(&format!("{a}\n\n{b}\n")).unwrap();
        assert_eq!((l.items.len(), l.torn_tail), (2, false));
        assert_eq!(l.raw, vec![a.clone(), b.clone()]);
        // An unterminated last line that parses is complete; one that does not is torn.
        let l = read(&format!("{a}\n{b}")).unwrap();
        assert_eq!((l.items.len(), l.torn_tail), (2, false));
        let l = read(&format!("{a}\n{}", &b[..b.len() / 2])).unwrap();
        assert_eq!((l.items.len(), l.torn_tail), (1, true));
        // A line of an earlier version, without the landing fields, reads with one attempt.
        let mut old: serde_json::Value = serde_json::from_str(&a).unwrap();
        for k in ["attempts", "margin", "landing"] {
            old.as_object_mut().unwrap().remove(k);
        }
        let l = read(&format!("{old}\n")).unwrap();
        assert_eq!((l.items[0].attempts, l.items[0].margin), (1, None));
        // A terminated bad line, last or not, is corrupt, named by its line.
        for text in [format!("{a}\n{{\"index\": 1}}\n"), format!("not json\n{a}\n")] {
            let err = format!("{:#}", read(&text).unwrap_err());
            let n = if text.starts_with("not") { 1 } else { 2 };
            assert!(err.contains(&format!("log.jsonl:{n}: corrupt log line")), "{err}");
        }
        // The committed entries: lines past the commit dropped, the checkpoint's copy restored.
        let lines = read(&format!("{a}\n{b}\n")).unwrap();
        assert_eq!(committed(lines.clone(), 1, &[]).len(), 1);
        let c = committed(read(&format!("{a}\n")).unwrap(), 2, &[entry(1)]);
        assert_eq!(
            c.iter().map(|(e, l)| (e.index, l.clone())).collect::<Vec<_>>(),
            vec![(0, a.clone()), (1, b.clone())]
        );
        // A batch's entries kept in the checkpoint: those missing from the file come back, in
        // order, and the ones present are not doubled.
        let c = committed(read(&format!("{a}\n{b}\n")).unwrap(), 4, &[entry(1), entry(2), entry(3)]);
        assert_eq!(c.iter().map(|(e, _)| e.index).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        let c = committed(read("").unwrap(), 3, &[entry(1), entry(2)]);
        assert!(c.is_empty(), "entries after a gap are not restored");
    }
}
