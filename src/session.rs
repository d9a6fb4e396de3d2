//! A sequential editing session: opens or resumes a run directory, streams edit records, applies
//! them one by one and checkpoints after every edit.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;

use crate::data::{EditReader, RecordError};
use crate::edit::{templates::context_templates, Editor, Method};
use crate::errors::InputError;
use crate::eval::{locality_agreement, score_records, MetricSet};
use crate::fingerprint::model_fingerprint;
use crate::hparams::Hparams;
use crate::loader::LoadedModel;
use crate::progress::Progress;
use crate::run::{replay, Manifest, ModelIdentity, RunDir, StatsIdentity, FORMAT_VERSION};
use crate::stats::{load_or_compute, Corpus};

/// What to do with a bad input line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnInvalid {
    /// Stop with a non-zero exit (after checkpointing everything done so far).
    Stop,
    /// Record the line in DIR/rejected.jsonl and go on.
    Skip,
}

/// Options of a session.
pub struct SessionOptions {
    pub run_dir: PathBuf,
    pub edits: PathBuf,
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
    let line = json!({ "line": e.line, "source": e.source, "field": e.field, "reason": e.reason });
    rd.append_line(&rd.rejected_path(), &line.to_string())
}

/// Runs (or resumes) the session on `lm`.
pub fn run(lm: &mut LoadedModel, opts: SessionOptions) -> Result<SessionSummary> {
    let t_start = Instant::now();
    let hp = opts.hparams.clone();
    hp.validate(lm.model.num_layers()).map_err(|e| InputError(format!("invalid hyper-parameters: {e:#}")))?;
    let mut reader = EditReader::open(&opts.edits)?.with_max_line_bytes(opts.limits.max_line_bytes);
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
    let manifest = match existing {
        Some(m) => {
            let probe = Manifest {
                templates: m.templates.clone(),
                ..new_manifest(identity, opts.method, &hp, vec![], stats_id)
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
            let m = new_manifest(identity, opts.method, &hp, templates, stats_id);
            rd.write_manifest(&m)?;
            m
        }
    };
    reader.set_check(crate::limits::record_check(&lm.tok, lm.config(), &manifest.templates, opts.limits)?);
    let f = lm.config().intermediate_size;
    let mut state = rd.read_state(f).with_context(|| format!("resuming {}", opts.run_dir.display()))?;
    rd.reconcile(&state)?;
    let stats = load_or_compute(
        &lm.model,
        &lm.tok,
        &fingerprint,
        &opts.method.layers(&hp),
        hp.cov_tokens,
        &opts.corpus,
    )?;
    let edited_layers = opts.method.layers(&hp);
    let mut editor = Editor::new(opts.method, hp.clone(), manifest.templates.clone(), &stats)?;
    restore(&mut editor, &state)?;
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
    let mut wins = count_wins(&rd)?;
    let mut rejected = 0usize;
    let mut this_session = 0usize;
    let mut eval_entry: Option<serde_json::Value> = None;
    for item in reader {
        if opts.limit.is_some_and(|l| state.n_edits >= l) {
            break;
        }
        let (line, rec) = match item {
            Ok((line, _)) if line <= state.last_line => continue,
            Ok(x) => x,
            Err(e) if e.line <= state.last_line => continue,
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
        for (l, ls) in &editor.layers {
            if !ls.subspace.is_empty() {
                state.subspaces.insert(*l, ls.subspace.clone());
            }
        }
        if let Some(before) = &before {
            let mut after = score_records(&lm.model, &lm.tok, std::slice::from_ref(&rec), all)?;
            locality_agreement(&mut after, before);
            eval_entry = Some(serde_json::to_value(&after[0])?);
        }
        let before_ckpt = t.elapsed().as_secs_f64();
        let mut entry = json!({
            "index": index,
            "line": line,
            "case_id": rec.case_id,
            "subject": rec.subject,
            "target_new": rec.target_new,
            "method": opts.method.name(),
            "layer": edited_layers.last(),
            "layers": edited_layers,
            "steps": outcome.steps,
            "loss_first": outcome.loss_first,
            "loss_last": outcome.loss_last,
            "basis_size": outcome.basis_size,
            "update_norm": outcome.update_norm,
            "retained": outcome.retained,
            "p_target_before": outcome.p_target_before,
            "p_target_after": outcome.p_target_after,
            "target_wins": outcome.target_wins,
            "subspace_added": outcome.subspace.added,
            "subspace_compressed_away": outcome.subspace.compressed_away,
            "subspace_released": outcome.subspace.released,
            "peak_rss_mb": peak_rss_mb(),
        });
        let phases = |ckpt: f64| json!({ "key": outcome.key_seconds, "value": outcome.value_seconds, "update": outcome.update_seconds, "checkpoint": ckpt });
        if let Some(ev) = eval_entry.take() {
            entry["eval"] = ev;
        }
        entry["phases"] = phases(0.0);
        entry["seconds"] = json!(before_ckpt);
        state.last_log = Some(entry.to_string());
        let tc = Instant::now();
        rd.commit(&mut state)?;
        let ckpt = tc.elapsed().as_secs_f64();
        entry["phases"] = phases(ckpt);
        entry["seconds"] = json!(t.elapsed().as_secs_f64());
        let line_text = entry.to_string();
        rd.append_line(&rd.log_path(), &line_text)?;
        state.last_log = Some(line_text.clone());
        if json_lines {
            println!("{line_text}");
        }
        wins += outcome.target_wins as usize;
        this_session += 1;
        bar.set_position(state.n_edits as u64);
        bar.set_message(format!("target wins {:.1}%", 100.0 * wins as f64 / state.n_edits as f64));
    }
    bar.finish();
    // Persist a trailing run of rejected lines as consumed.
    if rejected > 0 {
        rd.commit(&mut state)?;
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

/// Brings a fresh editor to the committed state: stored subspaces, and the memory of past keys
/// (AlphaEdit, soft O-Edit) rebuilt from the stored updates in order.
fn restore(editor: &mut Editor, state: &crate::run::State) -> Result<()> {
    for (l, ls) in editor.layers.iter_mut() {
        if let Some(s) = state.subspaces.get(l) {
            if s.basis.dim() != ls.subspace.basis.dim() {
                anyhow::bail!("checkpoint subspace of layer {l} has the wrong width");
            }
            ls.subspace = s.clone();
        }
        for u in state.updates.iter().filter(|u| u.layer == *l) {
            ls.remember_key(&u.key);
        }
    }
    Ok(())
}

fn new_manifest(
    model: ModelIdentity,
    method: Method,
    hp: &Hparams,
    templates: Vec<String>,
    stats: StatsIdentity,
) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        oedit_version: env!("CARGO_PKG_VERSION").to_string(),
        model,
        method,
        hparams: hp.clone(),
        templates,
        stats,
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

fn count_wins(rd: &RunDir) -> Result<usize> {
    let path = rd.log_path();
    if !path.is_file() {
        return Ok(0);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<HashMap<String, serde_json::Value>>(l).ok())
        .filter(|m| m.get("target_wins").and_then(|v| v.as_bool()) == Some(true))
        .count())
}
