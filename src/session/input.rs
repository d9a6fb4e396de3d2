//! The edit records of a session: checked against the run they continue and validated ahead,
//! before the model loads, so that a wrong or bad edits file fails in a second.

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use anyhow::Result;

use super::OnInvalid;
use crate::data::{EditReader, EditRecord, RecordCheck, RecordError};
use crate::errors::InputError;
use crate::run::log::by_line;
use crate::run::{Committed, LogEntry};

/// Records of standard input read (and kept) ahead of the session at most.
pub const STDIN_AHEAD: usize = 1000;

type Item = Result<(usize, EditRecord), RecordError>;

/// What to do about a wrong edits file on resume.
const RESUME_HINT: &str = "resume with the original edits file or use another --run directory";

/// The edit records of a session, streamed: records read ahead first, then the rest of the
/// input. Tracks the last record it yielded, to tell when the input ended before a line the
/// run edited.
pub struct EditInput {
    reader: EditReader,
    ahead: VecDeque<Item>,
    /// Lines up to here were already read, checked against the run's log and dropped.
    checked_through: usize,
    /// Line of the last item read from the input.
    last_seen: usize,
    exhausted: bool,
}

impl EditInput {
    /// Opens the edits file (`-`: standard input) without reading anything; a line longer than
    /// `max_line_bytes` is a bad line (see [`EditReader::with_max_line_bytes`]).
    pub fn open(path: &Path, max_line_bytes: usize) -> Result<Self> {
        Ok(Self {
            reader: EditReader::open(path)?.with_max_line_bytes(max_line_bytes),
            ahead: VecDeque::new(),
            checked_through: 0,
            last_seen: 0,
            exhausted: false,
        })
    }

    /// Opens the edits file and, before any model is loaded, checks it against the run in
    /// `run_dir` (`progress`: what it has committed, if anything): the records at the lines the
    /// run edited must be the facts it edited (else an [`InputError`] naming the line). With
    /// `OnInvalid::Stop` it then validates the records the session will edit, up to `limit`
    /// edits in all (a file: up to its end without a limit; standard input or a pipe: at most
    /// [`STDIN_AHEAD`] records, kept for the session): a bad one is an [`InputError`] naming
    /// file, line and field. Lines the run already consumed (edited or rejected) are not
    /// validated again, as when they are skipped.
    pub fn prepare(
        path: &Path,
        run_dir: &Path,
        progress: Option<&Committed>,
        limit: Option<usize>,
        on_invalid: OnInvalid,
        max_line_bytes: usize,
    ) -> Result<Self> {
        let mut input = Self::open(path, max_line_bytes)?;
        let (n_edits, last_line, log) = match progress {
            Some(p) => (p.n_edits, p.last_line, p.log.as_slice()),
            None => (0, 0, &[][..]),
        };
        let remaining = limit.map(|l| l.saturating_sub(n_edits));
        if remaining == Some(0) {
            return Ok(input);
        }
        let stream = crate::data::is_stream(path);
        if stream && on_invalid == OnInvalid::Skip {
            // Nothing to validate; the session checks the consumed lines as they stream past.
            return Ok(input);
        }
        let logged = by_line(log);
        let mut good = 0usize;
        while let Some(item) = input.read() {
            let line = item_line(&item);
            if line <= last_line {
                input.check_consumed(&logged, &item)?;
                input.checked_through = line;
                continue;
            }
            if on_invalid == OnInvalid::Skip {
                // Only the consumed lines needed checking (a file; it is read again).
                break;
            }
            match &item {
                Ok(_) => good += 1,
                Err(e) => {
                    let kept = match n_edits {
                        0 => "nothing was edited".to_string(),
                        n => format!("{n} edits are checkpointed in {}", run_dir.display()),
                    };
                    return Err(InputError(format!("{e} (stopped before loading the model; {kept})")).into());
                }
            }
            if stream {
                input.ahead.push_back(item);
                if input.ahead.len() >= STDIN_AHEAD {
                    break;
                }
            }
            if remaining.is_some_and(|r| good >= r) {
                break;
            }
        }
        input.check_complete(&logged)?;
        if !stream {
            // The file is read again by the session, from its start (memory does not grow).
            input = Self::open(path, max_line_bytes)?;
        }
        Ok(input)
    }

    /// Runs `check` on every record from now on, including those already read ahead (a failure
    /// turns the record into a bad line, as if the parser had refused it). The model-dependent
    /// limits (prompt lengths in tokens) can only be checked once the tokenizer is loaded.
    pub fn set_check(&mut self, check: RecordCheck) {
        let source = self.reader.source_name().to_string();
        for item in self.ahead.iter_mut() {
            if let Ok((line, rec)) = item {
                if let Err((field, reason)) = check(rec) {
                    *item =
                        Err(RecordError { source: source.clone(), line: *line, field, reason, io: false });
                }
            }
        }
        self.reader.set_check(check);
    }

    /// The input's name in errors (file name or `<stdin>`).
    pub fn source(&self) -> &str {
        self.reader.source_name()
    }

    /// Lines already read, checked against the run's log and dropped by [`EditInput::prepare`].
    pub fn checked_through(&self) -> usize {
        self.checked_through
    }

    /// The next item read ahead, else from the input.
    fn next_raw(&mut self) -> Option<Item> {
        match self.ahead.pop_front() {
            Some(item) => Some(item),
            None => self.read(),
        }
    }

    /// The next item from the input itself (past the items read ahead).
    fn read(&mut self) -> Option<Item> {
        let item = self.reader.next();
        match &item {
            Some(i) => self.last_seen = item_line(i),
            None => self.exhausted = true,
        }
        item
    }

    /// Checks an item at a line the run already consumed against the edit logged there.
    pub fn check_consumed(&self, logged: &HashMap<usize, &LogEntry>, item: &Item) -> Result<()> {
        let line = item_line(item);
        let Some(entry) = logged.get(&line) else { return Ok(()) };
        match entry.mismatch(item.as_ref().map(|(_, r)| r)) {
            None => Ok(()),
            Some(why) => Err(InputError(format!("{}:{line}: {why}; {RESUME_HINT}", self.source())).into()),
        }
    }

    /// After the input ended: every line the run edited must have been in it.
    pub fn check_complete(&self, logged: &HashMap<usize, &LogEntry>) -> Result<()> {
        if !self.exhausted {
            return Ok(());
        }
        let missing = logged.values().filter(|e| e.line > self.last_seen).min_by_key(|e| e.line);
        match missing {
            None => Ok(()),
            Some(e) => {
                Err(InputError(format!("{}: {}; {RESUME_HINT}", self.source(), e.missing(self.last_seen)))
                    .into())
            }
        }
    }
}

impl Iterator for EditInput {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        self.next_raw()
    }
}

fn item_line(item: &Item) -> usize {
    match item {
        Ok((line, _)) => *line,
        Err(e) => e.line,
    }
}
