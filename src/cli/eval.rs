//! `oedit eval`: measure what the edits did, with the unedited model side by side.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use super::ModelArgs;
use crate::data::{EditReader, EditRecord};
use crate::edit::AppliedUpdate;
use crate::errors::{InputError, ThresholdError};
use crate::eval::{
    locality_agreement, metric_columns, score_all, score_unedited, summarize, MetricSet, RecordScores,
};
use crate::fingerprint::model_fingerprint;
use crate::fsutil::atomic_write;
use crate::loader::load_model;
use crate::model::Llama;
use crate::run::{replay, Manifest, RunDir, State};
use crate::tokenizer::Tok;

/// When each record is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Timing {
    /// Every record on the model after all edits (the sequential-editing setting).
    AfterAll,
    /// Every record right after its own edit (read from the run's log; needs `oedit edit --eval-each`).
    AfterEach,
}

/// Arguments of `oedit eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Run directory whose edits are evaluated (the edited model is the base model plus its updates).
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Unedited model to compare with when --model is itself an edited model (without --run).
    #[arg(long)]
    pub base: Option<String>,
    /// Edit records (JSONL, any supported format); with --run only the lines the run edited are used.
    #[arg(long)]
    pub edits: PathBuf,
    /// Metrics: efficacy, generalization, locality, fluency (comma-separated).
    #[arg(long, default_value = "efficacy,generalization,locality")]
    pub metrics: String,
    /// Evaluate at most this many records.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Protocol timing.
    #[arg(long, value_enum, default_value = "after-all")]
    pub timing: Timing,
    /// Tokens generated per prompt for fluency.
    #[arg(long, default_value_t = 50)]
    pub gen_tokens: usize,
    /// Write the JSON report to this file (`-` for standard output).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Include per-record scores in the JSON report.
    #[arg(long)]
    pub per_record: bool,
    /// Evaluate the run as it stood right after its N-th edit (its first N edited records, its
    /// first N edits' updates); default: all committed edits. Lets one run serve several
    /// checkpoints, also while it is still editing.
    #[arg(long, value_name = "N")]
    pub at: Option<usize>,
    /// Do not read or write the cache of unedited-model scores (`$OEDIT_CACHE/eval`; without
    /// --run, the model's own scores are cached there too).
    #[arg(long)]
    pub no_cache: bool,
    /// Exit with code 3 when an edited-model metric is below its threshold, e.g. `efficacy=0.9,locality=0.5`.
    #[arg(long)]
    pub fail_under: Option<String>,
}

fn parse_thresholds(s: &str) -> Result<Vec<(String, f64)>> {
    let known: Vec<&str> = metric_columns().iter().map(|(n, _)| *n).collect();
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| InputError(format!("--fail-under: `{p}` is not METRIC=VALUE")))?;
            let k = k.trim();
            if !known.contains(&k) {
                return Err(InputError(format!(
                    "--fail-under: unknown metric `{k}` (known: {})",
                    known.join(", ")
                ))
                .into());
            }
            let v: f64 =
                v.trim().parse().map_err(|_| InputError(format!("--fail-under: `{v}` is not a number")))?;
            Ok((k.to_string(), v))
        })
        .collect()
}

fn summaries(scores: &[RecordScores]) -> BTreeMap<&'static str, Value> {
    metric_columns()
        .into_iter()
        .filter_map(|(name, get)| summarize(scores.iter().map(get)).map(|s| (name, json!(s))))
        .collect()
}

/// Runs `oedit eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    let started = Instant::now();
    let which = MetricSet::parse(&args.metrics).map_err(|e| InputError(format!("--metrics: {e}")))?;
    let thresholds = args.fail_under.as_deref().map(parse_thresholds).transpose()?.unwrap_or_default();
    let run_dir =
        args.run.as_deref().map(RunDir::open).transpose().map_err(|e| InputError(format!("{e:#}")))?;
    let manifest = match &run_dir {
        Some(rd) => rd.read_manifest()?,
        None => None,
    };
    if args.at.is_some() && (run_dir.is_none() || args.timing != Timing::AfterAll) {
        return Err(InputError("--at needs --run and --timing after-all".into()).into());
    }
    if args.at == Some(0) {
        return Err(InputError("--at: N must be at least 1".into()).into());
    }
    let edited_lines: Option<HashSet<usize>> = match &run_dir {
        Some(rd) => Some(read_log_lines(rd, args.at)?),
        None => None,
    };

    // Records (skipping invalid ones, reported).
    let mut records = Vec::new();
    let mut lines = Vec::new();
    let mut skipped = Vec::new();
    for item in EditReader::open(&args.edits)? {
        if args.limit.is_some_and(|l| records.len() >= l) {
            break;
        }
        match item {
            Ok((line, rec)) => {
                if edited_lines.as_ref().is_some_and(|s| !s.contains(&line)) {
                    continue;
                }
                lines.push(line);
                records.push(rec);
            }
            Err(e) => skipped.push(json!({ "line": e.line, "field": e.field, "reason": e.reason })),
        }
    }
    if records.is_empty() {
        return Err(InputError(format!("{}: no records to evaluate", args.edits.display())).into());
    }

    let mut lm = args.model.load()?;
    let fingerprint = model_fingerprint(&lm.model)?;
    if let (Some(m), Some(rd)) = (&manifest, &run_dir) {
        m.check_model(&rd.path, &args.model.model, &fingerprint)?;
    }

    let unedited = |model: &Llama, tok: &Tok, fp: &str, records: &[EditRecord]| {
        if args.no_cache {
            score_all(model, tok, records, which, args.gen_tokens, "unedited")
        } else {
            score_unedited(model, tok, fp, records, which, args.gen_tokens)
        }
    };
    let (base_scores, mut edited_scores, n_edits) = match (&run_dir, args.timing) {
        (Some(rd), Timing::AfterAll) => {
            let base = unedited(&lm.model, &lm.tok, &fingerprint, &records)?;
            let state = rd.read_state(lm.config().intermediate_size)?;
            let n = args.at.unwrap_or(state.n_edits);
            let updates = updates_of_first(rd, &state, n, manifest.as_ref())?;
            replay(&mut lm.model, updates)?;
            let edited = score_all(&lm.model, &lm.tok, &records, which, args.gen_tokens, "edited")?;
            (Some(base), edited, Some(n))
        }
        (Some(rd), Timing::AfterEach) => {
            let base = unedited(&lm.model, &lm.tok, &fingerprint, &records)?;
            let each = read_after_each(rd, &lines)?;
            (Some(base), each, Some(lines.len()))
        }
        (None, Timing::AfterEach) => {
            return Err(InputError("--timing after-each needs --run (it reads the run's log)".into()).into())
        }
        (None, Timing::AfterAll) => {
            // A model without a run is scored as it stands, so its scores are cached like an
            // unedited model's (keyed by its own weight fingerprint).
            let edited = unedited(&lm.model, &lm.tok, &fingerprint, &records)?;
            let base = match &args.base {
                Some(b) => {
                    let base_lm = load_model(b, &args.model.device.parse()?, lm.dtype.into())?;
                    let base_fp = model_fingerprint(&base_lm.model)?;
                    Some(unedited(&base_lm.model, &base_lm.tok, &base_fp, &records)?)
                }
                None => None,
            };
            (base, edited, None)
        }
    };
    if let Some(base) = &base_scores {
        if args.timing == Timing::AfterAll {
            locality_agreement(&mut edited_scores, base);
        }
    }
    let mut base_scores = base_scores;
    if let Some(b) = base_scores.as_mut() {
        let copy = b.clone();
        locality_agreement(b, &copy);
    }

    let edited_summary = summaries(&edited_scores);
    let base_summary = base_scores.as_deref().map(summaries);
    let bos = lm
        .tok
        .bos_id
        .is_some_and(|b| lm.tok.encode_prompt("a").ok().and_then(|v| v.first().copied()) == Some(b));
    let mut report = json!({
        "oedit_version": env!("CARGO_PKG_VERSION"),
        "model": { "arg": args.model.model, "fingerprint": fingerprint },
        "run": args.run.as_ref().map(|p| json!({
            "dir": p.display().to_string(),
            "n_edits": n_edits,
            "method": manifest.as_ref().map(|m| m.method.name()),
            "layer": manifest.as_ref().map(|m| m.hparams.layer),
        })),
        "edits_file": args.edits.display().to_string(),
        "records": { "evaluated": records.len(), "skipped": skipped },
        "protocol": {
            "timing": match args.timing { Timing::AfterAll => "after-all", Timing::AfterEach => "after-each" },
            "efficacy": "binary: mean NLL(target_new) < mean NLL(ground_truth) on the edit prompt (length-normalised log-probabilities, CounterFact efficacy score)",
            "efficacy_token_acc": "fraction of target_new tokens that are the argmax under teacher forcing (ZsRE/EasyEdit reliability)",
            "generalization": "as efficacy, averaged over the paraphrase prompts",
            "generalization_token_acc": "as efficacy_token_acc, averaged over the paraphrase prompts",
            "locality": "binary: mean NLL(true answer) < mean NLL(target_new) on neighbourhood prompts (neighbourhood score)",
            "locality_agreement": "fraction of the locality answer's tokens whose teacher-forced argmax is unchanged from the unedited model",
            "fluency": format!("generation entropy: mean of (2/3)H2 and (4/3)H3 of word n-grams (bits) of {} greedy tokens per generation prompt (edit prompt when none)", args.gen_tokens),
            "prompt_form": { "bos": bos, "answer_leading_space": "a space is inserted between prompt and answer unless the prompt ends with whitespace; answer tokens are the suffix of the joint tokenisation" },
        },
        "metrics": { "edited": edited_summary, "unedited": base_summary },
        "seconds": started.elapsed().as_secs_f64(),
    });
    if args.per_record {
        let per: Vec<Value> = lines
            .iter()
            .enumerate()
            .map(|(i, line)| {
                json!({
                    "line": line,
                    "case_id": records[i].case_id,
                    "edited": edited_scores[i],
                    "unedited": base_scores.as_ref().map(|b| b[i].clone()),
                })
            })
            .collect();
        report["per_record"] = json!(per);
    }
    print_table(&edited_summary, base_summary.as_ref(), records.len(), started.elapsed().as_secs_f64());
    match &args.json {
        Some(p) if p.as_os_str() == "-" => println!("{}", serde_json::to_string_pretty(&report)?),
        Some(p) => atomic_write(p, serde_json::to_string_pretty(&report)?.as_bytes())?,
        None => {}
    }
    let failures: Vec<String> = thresholds
        .iter()
        .filter_map(|(k, min)| {
            let got = edited_summary.get(k.as_str()).and_then(|v| v["mean"].as_f64());
            match got {
                Some(g) if g >= *min => None,
                Some(g) => Some(format!("{k} = {g:.4} < {min}")),
                None => Some(format!("{k} was not measured")),
            }
        })
        .collect();
    if !failures.is_empty() {
        return Err(ThresholdError(failures.join("; ")).into());
    }
    Ok(())
}

fn print_table(edited: &BTreeMap<&str, Value>, base: Option<&BTreeMap<&str, Value>>, n: usize, secs: f64) {
    eprintln!("{:<26} {:>10} {:>10} {:>7}", "metric", "edited", "unedited", "count");
    for (name, _) in metric_columns() {
        let Some(e) = edited.get(name) else { continue };
        let b = base.and_then(|b| b.get(name)).and_then(|v| v["mean"].as_f64());
        eprintln!(
            "{:<26} {:>10.4} {:>10} {:>7}",
            name,
            e["mean"].as_f64().unwrap_or(f64::NAN),
            b.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into()),
            e["count"]
        );
    }
    eprintln!("{n} records in {secs:.1} s ({:.2} records/s)", n as f64 / secs.max(1e-9));
}

/// Input lines the run edited (only those of its first `at` edits when given).
fn read_log_lines(rd: &RunDir, at: Option<usize>) -> Result<HashSet<usize>> {
    let path = rd.log_path();
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let v = serde_json::from_str::<Value>(l).ok()?;
            let index = v.get("index")?.as_u64()? as usize;
            if at.is_some_and(|n| index >= n) {
                return None;
            }
            v.get("line")?.as_u64()
        })
        .map(|l| l as usize)
        .collect())
}

/// The updates of the run's first `n` edits (each edit stores one update per edited layer).
fn updates_of_first<'a>(
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

fn read_after_each(rd: &RunDir, lines: &[usize]) -> Result<Vec<RecordScores>> {
    let path = rd.log_path();
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut by_line = std::collections::HashMap::new();
    for l in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(l) else { continue };
        let (Some(line), Some(ev)) = (v.get("line").and_then(|x| x.as_u64()), v.get("eval")) else {
            continue;
        };
        let scores: RecordScores = serde_json::from_value(ev.clone()).unwrap_or_default();
        by_line.insert(line as usize, scores);
    }
    lines
        .iter()
        .map(|l| {
            by_line.get(l).cloned().ok_or_else(|| {
                InputError(format!(
                    "{}: no after-each scores for input line {l}; run `oedit edit --eval-each` to record them",
                    path.display()
                ))
                .into()
            })
        })
        .collect()
}
