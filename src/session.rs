//! A sequential editing session: opens or resumes a run directory, streams edit records, applies
//! them one by one and checkpoints after every edit.

mod input;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::data::{EditRecord, RecordError};
use crate::edit::{templates::templates_for, Editor, Method};
use crate::errors::InputError;
use crate::eval::{locality_agreement, score_records, MetricSet};
use crate::factor_cache::FactorCache;
use crate::fingerprint::model_fingerprint;
use crate::hparams::Hparams;
use crate::linalg::with_factor_memo;
use crate::loader::LoadedModel;
use crate::progress::report_timing;
use crate::progress::Progress;
use crate::run::log::by_line;
use crate::run::{
    replay, LogEntry, Manifest, ModelIdentity, Phases, RejectedLine, RunDir, State, StatsIdentity,
    FORMAT_VERSION,
};
use crate::stats::{load_or_compute, Corpus};

/// What to do with a bad input line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnInvalid {
    /// Stop with a non-zero exit (after checkpointing everything done so far).
    Stop,
    /// Record the line in DIR/rejected.jsonl and go on.
    Skip,
}

pub use input::{EditInput, STDIN_AHEAD};

/// Options of a session.
pub struct SessionOptions {
    pub run_dir: PathBuf,
    /// The edits file as given (`-`: standard input).
    pub edits: PathBuf,
    /// The edits, already opened, checked and validated ahead by [`EditInput::prepare`]; the
    /// session opens `edits` itself when None.
    pub input: Option<EditInput>,
    pub method: Method,
    pub hparams: Hparams,
    pub corpus: Corpus,
    /// Total edits the run should hold (including those of earlier sessions).
    pub limit: Option<usize>,
    pub on_invalid: OnInvalid,
    /// Print one JSON line per edit on standard output.
    pub json_lines: bool,
    /// Score each record right before and right after its own edit and record it in the log
    /// (`eval`), for `oedit eval --timing after-each`.
    pub eval_each: bool,
    /// Limits on input lines and on the tokens of prompts and answers.
    pub limits: crate::limits::InputLimits,
    /// Edits solved jointly per update and per commit (`--batch-size`, at least 1; recorded in
    /// the manifest, a resume must give the same).
    pub batch_size: usize,
}

/// Summary of a session.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionSummary {
    pub run_dir: String,
    pub edits_total: usize,
    pub edits_this_session: usize,
    pub resumed_from: usize,
    pub rejected: usize,
    /// Share of the run's edits whose target won; `None` when the run holds no edit.
    pub target_wins_rate: Option<f64>,
    pub seconds: f64,
}

fn reject_line(rd: &RunDir, e: &RecordError) -> Result<()> {
    let line = serde_json::to_string(&RejectedLine::from(e))?;
    rd.append_line(&rd.rejected_path(), &line)
}

/// Runs (or resumes) the session on `lm`.
pub fn run(lm: &mut LoadedModel, mut opts: SessionOptions) -> Result<SessionSummary> {
    let t_start = Instant::now();
    let hp = opts.hparams.clone();
    hp.validate(lm.model.num_layers()).map_err(|e| InputError(format!("invalid hyper-parameters: {e:#}")))?;
    let mut input = match opts.input.take() {
        Some(i) => i,
        None => EditInput::open(&opts.edits, opts.limits.max_line_bytes)?,
    };
    let fingerprint = model_fingerprint(&lm.model)?;
    let rd = RunDir::create(&opts.run_dir)?;
    crate::fsutil::remove_stale_temps(&rd.path);
    let existing = rd.read_manifest()?;
    let stats_id = StatsIdentity {
        corpus: opts.corpus.name.clone(),
        corpus_hash: format!("{:016x}", opts.corpus.hash()),
        tokens: hp.cov_tokens,
    };
    let identity = ModelIdentity {
        arg: lm.spec.arg.clone(),
        source: lm.spec.source.describe(),
        fingerprint: fingerprint.clone(),
    };
    let dtype = crate::device::dtype_name(lm.dtype).to_string();
    // The manifest this command would write, with the given context templates.
    let batch_size = opts.batch_size.max(1);
    let fresh = |templates: Vec<String>| Manifest {
        batch_size,
        ..new_manifest(identity.clone(), opts.method, &hp, templates, stats_id.clone(), &opts.edits, &dtype)
    };
    let manifest = match existing.map(|m| {
        let why = m.incompatibility(&fresh(m.templates.clone()));
        (m, why)
    }) {
        Some((m, None)) => m,
        // A run that has committed no edit (a first session that failed before its first
        // commit, e.g. on a corpus too small for cov_tokens) binds nothing: it starts afresh.
        Some((_, Some(why))) if rd.committed()?.is_none() => {
            eprintln!(
                "note: {} holds no committed edit; starting it afresh with this command's settings ({why})",
                opts.run_dir.display()
            );
            start_manifest(&rd, lm, &hp, fresh)?
        }
        Some((_, Some(why))) => {
            return Err(InputError(format!(
                "run directory {} cannot be continued: {why}; use another --run directory",
                opts.run_dir.display()
            ))
            .into());
        }
        None => start_manifest(&rd, lm, &hp, fresh)?,
    };
    input.set_check(crate::limits::record_check(&lm.tok, lm.config(), &manifest.templates, opts.limits)?);
    let f = lm.config().intermediate_size;
    let mut state = rd.read_state(f).with_context(|| format!("resuming {}", opts.run_dir.display()))?;
    if manifest.format_version != state.format {
        // A run created by an earlier version that committed nothing: it is written in this
        // version's layout from its first commit on.
        rd.write_manifest(&Manifest { format_version: state.format, ..manifest.clone() })?;
    }
    rd.tidy(&state);
    let log = rd.reconcile(&state)?;
    if input.checked_through() > state.last_line {
        anyhow::bail!(
            "{}: the run changed while this session started (it now ends at input line {}, not {}); run the command again",
            opts.run_dir.display(),
            state.last_line,
            input.checked_through()
        );
    }
    let logged = by_line(&log);
    let edited_layers = opts.method.layers(&hp);
    let t = Instant::now();
    let stats =
        load_or_compute(&lm.model, &lm.tok, &fingerprint, &edited_layers, hp.cov_tokens, &opts.corpus)?;
    report_timing("key statistics (computed or read)", t);
    // The method's factorisations of C (Cholesky, eigendecomposition) come from the factor
    // cache beside the statistics when an earlier session computed them.
    let t = Instant::now();
    let mut editor = with_factor_memo(FactorCache::beside_stats().into_memo(), || {
        Editor::new(opts.method, hp.clone(), manifest.templates.clone(), &stats)
    })?;
    report_timing("method state (factorisations computed or read)", t);
    // The rule holds what it needs; C itself (f²·8 bytes) is not used again.
    drop(stats);
    editor.restore(&state.subspaces, &state.updates)?;
    state.track(&editor.subspaces());
    replay(&mut lm.model, &state.updates)?;
    let resumed_from = state.n_edits;

    // Total for the bar: --limit, else the number of non-blank lines of a file (a streaming
    // count, nothing kept); unknown for standard input.
    let total_hint = match opts.limit {
        Some(l) => l as u64,
        None if std::io::stderr().is_terminal() && !crate::data::is_stream(&opts.edits) => {
            count_lines(&opts.edits)
        }
        None => 0,
    };
    let bar = Progress::new(total_hint, "editing", "edits");
    bar.set_position(state.n_edits as u64);
    let json_lines = opts.json_lines || !std::io::stdout().is_terminal();
    let mut wins = log.iter().filter(|e| e.target_wins).count();
    let mut rejected = 0usize;
    let mut this_session = 0usize;
    let mut stopped_by_limit = false;
    let mut next_batch = next_batch_number(&state);
    let source = input.source().to_string();
    loop {
        // Gather up to --batch-size good records (fewer at --limit or at the end of the input).
        let mut batch: Vec<(usize, EditRecord)> = Vec::with_capacity(batch_size);
        let mut bad: Option<RecordError> = None;
        let mut ended = true;
        loop {
            // At --limit nothing more is read: a pipe that stays open must not hold the run.
            if opts.limit.is_some_and(|l| state.n_edits + batch.len() >= l) {
                stopped_by_limit = true;
                break;
            }
            let Some(item) = input.next() else { break };
            // Lines an earlier session consumed: skipped, after checking that they are the
            // facts the run edited there.
            let consumed = match &item {
                Ok((line, _)) => *line <= state.last_line,
                Err(e) => e.line <= state.last_line,
            };
            if consumed {
                input.check_consumed(&logged, &item)?;
                continue;
            }
            match item {
                Ok(x) => batch.push(x),
                Err(e) => match opts.on_invalid {
                    // An input that cannot be read stops the run whatever --on-invalid says:
                    // its line is not consumed, so a resume reads it again.
                    _ if e.io => {
                        bad = Some(e);
                        break;
                    }
                    OnInvalid::Stop => {
                        bad = Some(e);
                        break;
                    }
                    OnInvalid::Skip => {
                        reject_line(&rd, &e)?;
                        state.last_line = state.last_line.max(e.line);
                        rejected += 1;
                        continue;
                    }
                },
            }
            if batch.len() == batch_size {
                ended = false;
                break;
            }
        }
        if !batch.is_empty() {
            let ctx =
                BatchRun { rd: &rd, source: &source, opts: &opts, edited_layers: &edited_layers, json_lines };
            let number = (batch_size > 1).then_some(next_batch);
            wins += ctx.apply(lm, &mut editor, &mut state, &batch, number)?;
            next_batch += 1;
            this_session += batch.len();
            bar.set_position(state.n_edits as u64);
            bar.set_message(format!("target wins {:.1}%", 100.0 * wins as f64 / state.n_edits as f64));
        }
        if let Some(e) = bad {
            // The records before the bad line are applied and checkpointed above.
            return Err(InputError(format!(
                "{e} (stopped; {} edits are checkpointed in {})",
                state.n_edits,
                opts.run_dir.display()
            ))
            .into());
        }
        if stopped_by_limit || ended {
            break;
        }
    }
    bar.finish();
    if !stopped_by_limit {
        input.check_complete(&logged)?;
    }
    // Persist a trailing run of rejected lines as consumed.
    if rejected > 0 {
        rd.commit(&mut state, &editor.subspaces())?;
    }
    Ok(SessionSummary {
        run_dir: opts.run_dir.display().to_string(),
        edits_total: state.n_edits,
        edits_this_session: this_session,
        resumed_from,
        rejected,
        target_wins_rate: (state.n_edits > 0).then(|| wins as f64 / state.n_edits as f64),
        seconds: t_start.elapsed().as_secs_f64(),
    })
}

/// The number of the run's next batch: one more than the last logged edit's batch (its index
/// when it was not batched).
fn next_batch_number(state: &State) -> usize {
    state.last_log.as_ref().map_or(0, |l| l.batch.unwrap_or(l.index) + 1)
}

/// What applying one batch needs besides the model, the editor and the state.
struct BatchRun<'a> {
    rd: &'a RunDir,
    /// The input's name in errors (file name or `<stdin>`).
    source: &'a str,
    opts: &'a SessionOptions,
    edited_layers: &'a [usize],
    json_lines: bool,
}

impl BatchRun<'_> {
    /// Edits `batch` (one joint update; a batch of one is a plain edit), commits it, appends
    /// one log line per record; returns how many targets won. `number` is the batch's number
    /// for the log (None: unbatched run).
    fn apply(
        &self,
        lm: &mut LoadedModel,
        editor: &mut Editor,
        state: &mut State,
        batch: &[(usize, EditRecord)],
        number: Option<usize>,
    ) -> Result<usize> {
        let opts = self.opts;
        let t = Instant::now();
        let recs: Vec<EditRecord> = batch.iter().map(|(_, r)| r.clone()).collect();
        let all = MetricSet { efficacy: true, generalization: true, locality: true, ..MetricSet::default() };
        let before = if opts.eval_each { Some(score_records(&lm.model, &lm.tok, &recs, all)?) } else { None };
        let (first, last) = (batch[0].0, batch[batch.len() - 1].0);
        let edited = editor.edit_batch(&mut lm.model, &lm.tok, &recs).with_context(|| match batch.len() {
            1 => format!("{}:{first}: edit failed", self.source),
            n => format!("{}:{first}-{last}: edit of a batch of {n} failed", self.source),
        })?;
        let evals: Vec<Option<crate::eval::RecordScores>> = match &before {
            Some(before) => {
                let mut after = score_records(&lm.model, &lm.tok, &recs, all)?;
                locality_agreement(&mut after, before);
                after.into_iter().map(Some).collect()
            }
            None => vec![None; recs.len()],
        };
        let mut entries = Vec::with_capacity(batch.len());
        let mut wins = 0;
        for (((line, rec), (outcome, applied)), eval) in batch.iter().zip(edited).zip(evals) {
            let index = state.n_edits;
            state.push_edit(applied);
            state.last_line = state.last_line.max(*line);
            wins += outcome.target_wins as usize;
            entries.push(LogEntry {
                index,
                line: *line,
                case_id: rec.case_id,
                subject: rec.subject.clone(),
                target_new: rec.target_new.clone(),
                ground_truth: rec.ground_truth.clone(),
                method: opts.method.name().to_string(),
                layer: self.edited_layers.last().copied(),
                layers: self.edited_layers.to_vec(),
                seconds: t.elapsed().as_secs_f64(),
                phases: Phases {
                    key: outcome.key_seconds,
                    value: outcome.value_seconds,
                    update: outcome.update_seconds,
                    checkpoint: 0.0,
                    checkpoint_bytes: None,
                },
                steps: outcome.steps,
                loss_first: outcome.loss_first,
                loss_last: outcome.loss_last,
                basis_size: outcome.basis_size,
                update_norm: outcome.update_norm,
                retained: outcome.retained,
                p_target_before: outcome.p_target_before,
                p_target_after: outcome.p_target_after,
                target_wins: outcome.target_wins,
                subspace_added: outcome.subspace.added,
                subspace_compressed_away: outcome.subspace.compressed_away,
                subspace_released: outcome.subspace.released,
                attempts: outcome.attempts,
                margin: outcome.margin,
                landing: outcome.landing.clone(),
                peak_rss_mb: crate::progress::peak_rss_mib(),
                batch: number,
                eval,
            });
        }
        // The checkpoint keeps the batch's entries (timed up to the commit), so that a crash
        // between the commit and the appends below loses no log line.
        let seconds = t.elapsed().as_secs_f64();
        for e in entries.iter_mut() {
            e.seconds = seconds;
        }
        state.last_log = entries.last().cloned();
        state.batch_log = entries[..entries.len() - 1].to_vec();
        let tc = Instant::now();
        let stats = self.rd.commit(state, &editor.subspaces())?;
        let checkpoint = tc.elapsed().as_secs_f64();
        let seconds = t.elapsed().as_secs_f64();
        let mut lines = Vec::with_capacity(entries.len());
        for entry in entries.iter_mut() {
            entry.phases.checkpoint = checkpoint;
            entry.phases.checkpoint_bytes = Some(stats.bytes_written);
            entry.seconds = seconds;
            let line_text = entry.to_line();
            self.rd.append_line(&self.rd.log_path(), &line_text)?;
            lines.push(line_text);
        }
        state.last_log = entries.pop();
        state.batch_log = entries;
        // Printed once the whole batch is in the log: a closed standard output stops the run
        // after a complete commit.
        if self.json_lines {
            for line_text in &lines {
                crate::output::print_line(line_text)?;
            }
        }
        Ok(wins)
    }
}

/// Draws the context templates and writes the manifest of a run that starts afresh.
fn start_manifest(
    rd: &RunDir,
    lm: &LoadedModel,
    hp: &Hparams,
    fresh: impl Fn(Vec<String>) -> Manifest,
) -> Result<Manifest> {
    let t = Instant::now();
    let templates = templates_for(&lm.model, &lm.tok, hp)?;
    report_timing("context templates", t);
    let m = fresh(templates);
    rd.write_manifest(&m)?;
    Ok(m)
}

fn new_manifest(
    model: ModelIdentity,
    method: Method,
    hp: &Hparams,
    templates: Vec<String>,
    stats: StatsIdentity,
    edits: &std::path::Path,
    dtype: &str,
) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        oedit_version: env!("CARGO_PKG_VERSION").to_string(),
        model,
        method,
        hparams: hp.clone(),
        templates,
        stats,
        edits: Some(edits.display().to_string()),
        dtype: dtype.to_string(),
        batch_size: 1,
    }
}

fn count_lines(path: &std::path::Path) -> u64 {
    crate::data::count_nonblank_lines(path)
}
