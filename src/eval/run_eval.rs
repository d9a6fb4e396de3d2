//! `oedit eval` as a library: which records to evaluate (those a run edited, checked against
//! its log), the edited model (a run's updates replayed, or its after-each scores), the
//! unedited side, and the report.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};

use super::report::{
    summaries, AskedScores, Metrics, ModelInfo, PerRecord, Protocol, RecordsInfo, Report, RunInfo, Skipped,
    Timing,
};
use super::{generation_locality, locality_agreement, score_all, score_unedited, MetricSet, RecordScores};
use crate::data::{EditReader, EditRecord, RecordError};
use crate::edit::AppliedUpdate;
use crate::errors::InputError;
use crate::fingerprint::model_fingerprint;
use crate::limits::{check_record_limits, TokenLimits};
use crate::loader::LoadedModel;
use crate::model::Llama;
use crate::run::{replay, LogEntry, Manifest, RunDir, State};
use crate::tokenizer::Tok;

/// What to do about an edits file that is not the run's.
const EVAL_HINT: &str = "evaluate the run with the edits file it was made from";

/// The records to evaluate, with their input lines, and the invalid lines skipped.
#[derive(Debug, Clone)]
pub struct EvalRecords {
    /// The records, in file order.
    pub records: Vec<EditRecord>,
    /// 1-based input line of each record.
    pub lines: Vec<usize>,
    /// Invalid lines (not edited by the run).
    pub skipped: Vec<Skipped>,
}

/// The log entries of a run's first `at` edits (all without `at`).
pub fn edits_up_to(log: &[LogEntry], at: Option<usize>) -> Vec<&LogEntry> {
    log.iter().filter(|e| at.is_none_or(|n| e.index < n)).collect()
}

/// Reads the records of `edits` to evaluate, at most `limit`. With `edited` (the log entries of
/// the evaluated edits of a run) only the lines the run edited are kept, and each must hold the
/// fact the run edited there: a different subject or target_new, an invalid record, or a file
/// that ends before an edited line is an [`InputError`] naming the line. Invalid lines (not
/// edited) are listed as skipped; no record at all is an [`InputError`].
/// A line longer than `max_line_bytes` is an invalid line.
pub fn read_records(
    edits: &Path,
    edited: Option<&[&LogEntry]>,
    limit: Option<usize>,
    max_line_bytes: usize,
) -> Result<EvalRecords> {
    let by_line: Option<HashMap<usize, &LogEntry>> = edited.map(|e| e.iter().map(|e| (e.line, *e)).collect());
    let mut reader = EditReader::open(edits)?.with_max_line_bytes(max_line_bytes);
    let source = reader.source_name().to_string();
    let mismatch = |line: usize, why: String| InputError(format!("{source}:{line}: {why}; {EVAL_HINT}"));
    let mut out = EvalRecords { records: Vec::new(), lines: Vec::new(), skipped: Vec::new() };
    let mut last_seen = 0;
    let mut ended = true;
    loop {
        // At --limit nothing more is read (a pipe that stays open must not hold the command).
        if limit.is_some_and(|l| out.records.len() >= l) {
            ended = false;
            break;
        }
        let Some(item) = reader.next() else { break };
        match item {
            Ok((line, rec)) => {
                last_seen = line;
                if let Some(map) = &by_line {
                    let Some(entry) = map.get(&line) else { continue };
                    if let Some(why) = entry.mismatch(Ok(&rec)) {
                        return Err(mismatch(line, why).into());
                    }
                }
                out.lines.push(line);
                out.records.push(rec);
            }
            Err(e) if e.io => return Err(InputError(e.to_string()).into()),
            Err(e) => {
                last_seen = e.line;
                if let Some(entry) = by_line.as_ref().and_then(|m| m.get(&e.line)) {
                    return Err(mismatch(e.line, entry.mismatch(Err(&e)).unwrap_or_default()).into());
                }
                out.skipped.push(Skipped::from(&e));
            }
        }
    }
    if ended {
        if let Some(e) =
            by_line.iter().flat_map(|m| m.values()).filter(|e| e.line > last_seen).min_by_key(|e| e.line)
        {
            return Err(InputError(format!("{source}: {}; {EVAL_HINT}", e.missing(last_seen))).into());
        }
    }
    if out.records.is_empty() {
        return Err(InputError(format!("{}: no records to evaluate", edits.display())).into());
    }
    Ok(out)
}

/// Applies `oedit edit`'s token limits ([`check_record_limits`], `max_prompt_tokens` for the edit
/// prompt and answers, 4x for what is only scored, the edit prompt within the model's context)
/// to the records to evaluate, so that one long line cannot take memory without bound. Without
/// a run a record past them is skipped like an invalid line; a record the run edited
/// (`from_run`) must pass them: an [`InputError`] naming the line and field.
pub fn apply_token_limits(
    input: &mut EvalRecords,
    source: &Path,
    tok: &Tok,
    context: Option<usize>,
    max_prompt_tokens: usize,
    from_run: bool,
) -> Result<()> {
    let limits = TokenLimits::new(tok, &[], context, max_prompt_tokens)?;
    let records = std::mem::take(&mut input.records);
    let lines = std::mem::take(&mut input.lines);
    for (rec, line) in records.into_iter().zip(lines) {
        match check_record_limits(tok, &rec, &limits) {
            Ok(()) => {
                input.records.push(rec);
                input.lines.push(line);
            }
            Err((field, reason)) => {
                let e = RecordError { source: source.display().to_string(), line, field, reason, io: false };
                if from_run {
                    return Err(InputError(format!(
                        "{e}; the run edited this line: give eval the --max-prompt-tokens its edit had"
                    ))
                    .into());
                }
                input.skipped.push(Skipped::from(&e));
            }
        }
    }
    input.skipped.sort_by_key(|s| s.line);
    if input.records.is_empty() {
        return Err(InputError(format!("{}: no records to evaluate", source.display())).into());
    }
    Ok(())
}

/// Refuses a `--gen-tokens` that would decode the fluency generations past the model's context:
/// the longest generation prompt (the edit prompt for a record without one) plus `gen_tokens`
/// new tokens must fit, as `oedit generate` requires of its prompt.
pub fn check_gen_tokens(
    input: &EvalRecords,
    source: &Path,
    tok: &Tok,
    context: Option<usize>,
    gen_tokens: usize,
) -> Result<()> {
    let Some(context) = context else { return Ok(()) };
    let mut longest = (0usize, 0usize);
    for (rec, &line) in input.records.iter().zip(&input.lines) {
        let prompts: Vec<&str> = if rec.generation_prompts.is_empty() {
            vec![rec.prompt.as_str()]
        } else {
            rec.generation_prompts.iter().map(String::as_str).collect()
        };
        for p in prompts {
            let n = tok.encode_prompt(p)?.len();
            if n > longest.0 {
                longest = (n, line);
            }
        }
    }
    let (n, line) = longest;
    if n.saturating_add(gen_tokens) > context {
        return Err(InputError(format!(
            "--gen-tokens {gen_tokens}: the longest fluency prompt ({}:{line}) has {n} tokens, and with \
             {gen_tokens} new ones the generation passes the model's context of {context} \
             (max_position_embeddings); give --gen-tokens {} or less",
            source.display(),
            context.saturating_sub(n)
        ))
        .into());
    }
    Ok(())
}

/// The updates of the run's first `n` edits: up to where the n-th edit's updates end (an edit
/// stores one update per edited layer and landing attempt); runs that do not record the
/// boundaries (format 1, made before landing) hold one update per edited layer.
pub fn updates_of_first<'a>(
    rd: &RunDir,
    state: &'a State,
    n: usize,
    manifest: Option<&Manifest>,
) -> Result<&'a [AppliedUpdate]> {
    if n > state.n_edits {
        return Err(InputError(format!(
            "--at {n}: {} has only {} committed edits",
            rd.path.display(),
            state.n_edits
        ))
        .into());
    }
    if n == state.n_edits {
        return Ok(&state.updates);
    }
    if n == 0 {
        return Ok(&[]);
    }
    if state.edit_ends.len() == state.n_edits {
        return Ok(&state.updates[..state.edit_ends[n - 1]]);
    }
    let per_edit = manifest.map(|m| m.method.layers(&m.hparams).len()).unwrap_or(1);
    if state.updates.len() != state.n_edits * per_edit {
        bail!(
            "{}: {} updates for {} edits; expected {per_edit} per edit",
            rd.path.display(),
            state.updates.len(),
            state.n_edits
        );
    }
    Ok(&state.updates[..n * per_edit])
}

/// The scores each record got right after its own edit (`oedit edit --eval-each`), from the
/// run's log; a record without them is an [`InputError`].
pub fn after_each_scores(rd: &RunDir, log: &[LogEntry], lines: &[usize]) -> Result<Vec<RecordScores>> {
    let by_line: HashMap<usize, &RecordScores> =
        log.iter().filter_map(|e| e.eval.as_ref().map(|s| (e.line, s))).collect();
    lines
        .iter()
        .map(|l| {
            by_line.get(l).map(|s| (*s).clone()).ok_or_else(|| {
                InputError(format!(
                    "{}: no after-each scores for input line {l}: its edit was made without `oedit edit --eval-each`",
                    rd.log_path().display()
                ))
                .into()
            })
        })
        .collect()
}

/// A run to evaluate: its directory, manifest and log.
pub struct EvalRun<'a> {
    /// The run directory.
    pub dir: &'a RunDir,
    /// Its manifest, when it has one.
    pub manifest: Option<&'a Manifest>,
    /// Its log.
    pub log: &'a [LogEntry],
}

/// Options of [`evaluate`].
pub struct EvalOptions<'a> {
    /// The `--model` argument (named in the report and in errors).
    pub model_arg: &'a str,
    /// The edits file as given.
    pub edits_file: &'a Path,
    /// The run whose edits are evaluated.
    pub run: Option<EvalRun<'a>>,
    /// The metrics to compute.
    pub which: MetricSet,
    /// After all edits, or each record after its own edit.
    pub timing: Timing,
    /// Tokens generated per prompt for fluency.
    pub gen_tokens: usize,
    /// Evaluate the run after its first N edits.
    pub at: Option<usize>,
    /// Read and write the cache of unedited scores.
    pub use_cache: bool,
    /// Add per-record scores to the report.
    pub per_record: bool,
    /// When the command started (the report's `seconds`).
    pub started: Instant,
}

/// Scores `input` on the edited model and the unedited one and assembles the report.
///
/// With a run, `lm` is the run's base model: it must be the model the run edits, and it is
/// scored as the unedited side, then with the run's (first `at`) updates replayed (after-all),
/// or the run's after-each scores are read from its log. Without a run, `lm` is scored as it
/// stands and `base` (if any) is the unedited side.
pub fn evaluate(
    lm: &mut LoadedModel,
    base: Option<&LoadedModel>,
    input: &EvalRecords,
    opts: &EvalOptions,
) -> Result<Report> {
    let fingerprint = model_fingerprint(&lm.model)?;
    if let Some(EvalRun { dir, manifest: Some(m), .. }) = &opts.run {
        m.check_model(&dir.path, opts.model_arg, &fingerprint)?;
    }
    let records = &input.records;
    let (which, gen_tokens) = (opts.which, opts.gen_tokens);
    let unedited = |model: &Llama, tok: &Tok, fp: &str| {
        if opts.use_cache {
            score_unedited(model, tok, fp, records, which, gen_tokens)
        } else {
            score_all(model, tok, records, which, gen_tokens, "unedited", None)
        }
    };
    let (mut base_scores, mut edited_scores, n_edits) = match (&opts.run, opts.timing) {
        (Some(run), Timing::AfterAll) => {
            let base = unedited(&lm.model, &lm.tok, &fingerprint)?;
            let state = run.dir.read_state(lm.config().intermediate_size)?;
            let n = opts.at.unwrap_or(state.n_edits);
            let updates = updates_of_first(run.dir, &state, n, run.manifest)?;
            replay(&mut lm.model, updates)?;
            // The unedited greedy answers are the drafts of the edited model's gen_locality.
            let edited = score_all(&lm.model, &lm.tok, records, which, gen_tokens, "edited", Some(&base))?;
            (Some(base), edited, Some(n))
        }
        (Some(run), Timing::AfterEach) => {
            let base = unedited(&lm.model, &lm.tok, &fingerprint)?;
            let mut each = after_each_scores(run.dir, run.log, &input.lines)?;
            each.iter_mut().for_each(|s| which.keep_measured(s));
            (Some(base), each, Some(input.lines.len()))
        }
        (None, Timing::AfterEach) => {
            return Err(InputError("--timing after-each needs --run (it reads the run's log)".into()).into())
        }
        (None, Timing::AfterAll) => {
            // A model without a run is scored as it stands, so its scores are cached like an
            // unedited model's (keyed by its own weight fingerprint).
            let edited = unedited(&lm.model, &lm.tok, &fingerprint)?;
            let base = match base {
                Some(b) => Some(unedited(&b.model, &b.tok, &model_fingerprint(&b.model)?)?),
                None => None,
            };
            (base, edited, None)
        }
    };
    if let Some(base) = &base_scores {
        if opts.timing == Timing::AfterAll {
            locality_agreement(&mut edited_scores, base);
            generation_locality(&mut edited_scores, base);
        }
    }
    if let Some(b) = base_scores.as_mut() {
        let copy = b.clone();
        locality_agreement(b, &copy);
        generation_locality(b, &copy);
    }

    let per_record = opts.per_record.then(|| {
        input
            .lines
            .iter()
            .enumerate()
            .map(|(i, &line)| PerRecord {
                line,
                case_id: records[i].case_id,
                edited: AskedScores::new(edited_scores[i].clone(), which),
                unedited: base_scores.as_ref().map(|b| AskedScores::new(b[i].clone(), which)),
            })
            .collect()
    });
    Ok(Report {
        oedit_version: env!("CARGO_PKG_VERSION").to_string(),
        model: ModelInfo { arg: opts.model_arg.to_string(), fingerprint },
        run: opts.run.as_ref().map(|r| RunInfo {
            dir: r.dir.path.display().to_string(),
            n_edits,
            method: r.manifest.map(|m| m.method.name().to_string()),
            layer: r.manifest.map(|m| m.hparams.layer),
        }),
        edits_file: opts.edits_file.display().to_string(),
        records: RecordsInfo { evaluated: records.len(), skipped: input.skipped.clone() },
        protocol: Protocol::new(opts.timing, gen_tokens, lm.tok.prompt_starts_with_bos()),
        metrics: Metrics {
            edited: summaries(&edited_scores),
            unedited: base_scores.as_deref().map(summaries),
        },
        seconds: opts.started.elapsed().as_secs_f64(),
        per_record,
    })
}
