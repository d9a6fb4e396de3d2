//! A sequential editing session: opens or resumes a run directory, streams edit records, applies
//! them one by one and checkpoints after every edit.

mod input;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::data::RecordError;
use crate::edit::{templates::context_templates, Editor, Method};
use crate::errors::InputError;
use crate::eval::{locality_agreement, score_records, MetricSet};
use crate::fingerprint::model_fingerprint;
use crate::hparams::Hparams;
use crate::loader::LoadedModel;
use crate::progress::Progress;
use crate::run::log::by_line;
use crate::run::{
    replay, LogEntry, Manifest, ModelIdentity, Phases, RejectedLine, RunDir, StatsIdentity, FORMAT_VERSION,
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
pub fn run(lm: &mut LoadedModel, opts: SessionOptions) -> Result<SessionSummary> {
    let t_start = Instant::now();
    let hp = opts.hparams.clone();
    hp.validate(lm.model.num_layers()).map_err(|e| InputError(format!("invalid hyper-parameters: {e:#}")))?;
    let mut input = match opts.input {
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
    let manifest = match existing {
        Some(m) => {
            let probe = Manifest {
                templates: m.templates.clone(),
                ..new_manifest(identity, opts.method, &hp, vec![], stats_id, &opts.edits, &dtype)
            };
            if let Some(why) = m.incompatibility(&probe) {
                return Err(InputError(format!(
                    "run directory {} cannot be continued: {why}; use another --run directory",
                    opts.run_dir.display()
                ))
                .into());
            }
            m
        }
        None => {
            let templates = context_templates(&lm.model, &lm.tok, hp.context_templates, hp.template_length)?;
            let m = new_manifest(identity, opts.method, &hp, templates, stats_id, &opts.edits, &dtype);
            rd.write_manifest(&m)?;
            m
        }
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
    let stats =
        load_or_compute(&lm.model, &lm.tok, &fingerprint, &edited_layers, hp.cov_tokens, &opts.corpus)?;
    let mut editor = Editor::new(opts.method, hp.clone(), manifest.templates.clone(), &stats)?;
    editor.restore(&state.subspaces, &state.updates)?;
    state.track(&editor.subspaces());
    replay(&mut lm.model, &state.updates)?;
    let resumed_from = state.n_edits;

    // Total for the bar: --limit, else the number of non-blank lines of a file (a streaming
    // count, nothing kept); unknown for standard input.
    let total_hint = match opts.limit {
        Some(l) => l as u64,
        None if std::io::stderr().is_terminal() && opts.edits.as_os_str() != "-" => count_lines(&opts.edits),
        None => 0,
    };
    let bar = Progress::new(total_hint, "editing", "edits");
    bar.set_position(state.n_edits as u64);
    let json_lines = opts.json_lines || !std::io::stdout().is_terminal();
    let mut wins = log.iter().filter(|e| e.target_wins).count();
    let mut rejected = 0usize;
    let mut this_session = 0usize;
    let mut stopped_by_limit = false;
    while let Some(item) = input.next() {
        if opts.limit.is_some_and(|l| state.n_edits >= l) {
            stopped_by_limit = true;
            break;
        }
        // Lines an earlier session consumed: skipped, after checking that they are the facts
        // the run edited there.
        let consumed = match &item {
            Ok((line, _)) => *line <= state.last_line,
            Err(e) => e.line <= state.last_line,
        };
        if consumed {
            input.check_consumed(&logged, &item)?;
            continue;
        }
        let (line, rec) = match item {
            Ok(x) => x,
            Err(e) => match opts.on_invalid {
                OnInvalid::Stop => {
                    return Err(InputError(format!(
                        "{e} (stopped; {} edits are checkpointed in {})",
                        state.n_edits,
                        opts.run_dir.display()
                    ))
                    .into())
                }
                OnInvalid::Skip => {
                    reject_line(&rd, &e)?;
                    state.last_line = e.line;
                    rejected += 1;
                    continue;
                }
            },
        };
        let t = Instant::now();
        let all = MetricSet { efficacy: true, generalization: true, locality: true, fluency: false };
        let before = if opts.eval_each {
            Some(score_records(&lm.model, &lm.tok, std::slice::from_ref(&rec), all)?)
        } else {
            None
        };
        let (outcome, applied) = editor
            .edit(&mut lm.model, &lm.tok, &rec)
            .with_context(|| format!("{}:{line}: edit failed", opts.edits.display()))?;
        let index = state.n_edits;
        state.updates.extend(applied);
        state.n_edits += 1;
        state.last_line = line;
        let eval = match &before {
            Some(before) => {
                let mut after = score_records(&lm.model, &lm.tok, std::slice::from_ref(&rec), all)?;
                locality_agreement(&mut after, before);
                after.into_iter().next()
            }
            None => None,
        };
        let mut entry = LogEntry {
            index,
            line,
            case_id: rec.case_id,
            subject: rec.subject.clone(),
            target_new: rec.target_new.clone(),
            ground_truth: rec.ground_truth.clone(),
            method: opts.method.name().to_string(),
            layer: edited_layers.last().copied(),
            layers: edited_layers.clone(),
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
            peak_rss_mb: peak_rss_mb(),
            eval,
        };
        // The checkpoint keeps this edit's entry (timed up to the commit), so that a crash
        // between the commit and the append below loses no log line.
        state.last_log = Some(entry.clone());
        let tc = Instant::now();
        let stats = rd.commit(&mut state, &editor.subspaces())?;
        entry.phases.checkpoint = tc.elapsed().as_secs_f64();
        entry.phases.checkpoint_bytes = Some(stats.bytes_written);
        entry.seconds = t.elapsed().as_secs_f64();
        let line_text = entry.to_line();
        rd.append_line(&rd.log_path(), &line_text)?;
        state.last_log = Some(entry);
        if json_lines {
            println!("{line_text}");
        }
        wins += outcome.target_wins as usize;
        this_session += 1;
        bar.set_position(state.n_edits as u64);
        bar.set_message(format!("target wins {:.1}%", 100.0 * wins as f64 / state.n_edits as f64));
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
    }
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`), when known.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 =
        status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn count_lines(path: &std::path::Path) -> u64 {
    crate::data::count_nonblank_lines(path)
}
