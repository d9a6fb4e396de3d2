//! `oedit eval`: measure what the edits did, with the unedited model side by side. Parses the
//! arguments, loads the models and prints; the work is in [`crate::eval`].

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::builder::RangedU64ValueParser;
use clap::Args;

use super::ModelArgs;
use crate::errors::{InputError, ThresholdError};
use crate::eval::metrics::family_of;
use crate::eval::report::Summaries;
use crate::eval::run_eval::{apply_token_limits, check_gen_tokens, edits_up_to};
use crate::eval::{
    evaluate, metric_columns, parse_thresholds, read_records, EvalOptions, EvalRun, MetricSet, Report,
    Threshold,
};
use crate::fsutil::atomic_write;
use crate::limits::{DEFAULT_MAX_LINE_BYTES, DEFAULT_MAX_PROMPT_TOKENS};
use crate::loader::load_model;
use crate::run::RunDir;

pub use crate::eval::Timing;

/// Arguments of `oedit eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Run directory whose edits are evaluated (the edited model is the base model plus its updates).
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Unedited model to compare with when --model is itself an edited model (without --run).
    #[arg(long, conflicts_with = "run")]
    pub base: Option<String>,
    /// Edit records (JSONL, any supported format); with --run only the lines the run edited are used.
    #[arg(long)]
    pub edits: PathBuf,
    /// Metrics (comma-separated): teacher-forced efficacy, generalization, locality; generation-based
    /// gen_efficacy, gen_generalization, gen_locality (`gen` for all three) and fluency.
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
    /// Longest input line in bytes; a longer line is an invalid line (skipped; an error if the run
    /// edited it: give the value its `oedit edit` had).
    #[arg(long, default_value_t = DEFAULT_MAX_LINE_BYTES, value_parser = RangedU64ValueParser::<usize>::new().range(1..=1 << 30))]
    pub max_line_bytes: usize,
    /// Most tokens in an edit prompt or answer (4x that in a prompt or answer only scored), as
    /// for `oedit edit`; a record past it is skipped (an error if the run edited it).
    #[arg(long, default_value_t = DEFAULT_MAX_PROMPT_TOKENS, value_parser = RangedU64ValueParser::<usize>::new().range(1..=1 << 20))]
    pub max_prompt_tokens: usize,
    /// Exit with code 3 when an edited-model metric is below its threshold, e.g. `efficacy=0.9,locality=0.5`.
    #[arg(long)]
    pub fail_under: Option<String>,
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
    if run_dir.is_none() && args.timing == Timing::AfterEach {
        return Err(InputError("--timing after-each needs --run (it reads the run's log)".into()).into());
    }
    if args.timing == Timing::AfterEach && (which.fluency || which.generation()) {
        return Err(InputError(
            "--timing after-each reads the scores `oedit edit --eval-each` logged (efficacy, \
             generalization, locality); fluency and the gen metrics are measured after all edits \
             only (leave them out of --metrics, or use --timing after-all)"
                .into(),
        )
        .into());
    }
    if args.at == Some(0) {
        return Err(InputError("--at: N must be at least 1".into()).into());
    }
    // The run as committed (its log with the lines a crash may have kept only in the
    // checkpoint), pinned at its N-th edit: a run still editing gains edits after this read.
    let committed = run_dir.as_ref().map(RunDir::committed).transpose()?;
    let at = match &committed {
        None => args.at,
        Some(c) => {
            let n_edits = c.as_ref().map_or(0, |c| c.n_edits);
            if let Some(n) = args.at.filter(|&n| n > n_edits) {
                return Err(InputError(format!(
                    "--at {n}: {} has only {n_edits} committed edits",
                    run_dir.as_ref().map(|d| d.path.display().to_string()).unwrap_or_default()
                ))
                .into());
            }
            Some(args.at.unwrap_or(n_edits))
        }
    };
    let log = committed.map(|c| c.map(|c| c.log).unwrap_or_default());
    let edited = log.as_deref().map(|l| edits_up_to(l, at));
    let has_unedited = args.run.is_some() || args.base.is_some();
    unmeasured_thresholds(&thresholds, which, has_unedited)?;
    if which.gen_locality && !has_unedited {
        eprintln!(
            "note: gen_locality compares with the unedited model; without --run or --base it is left out"
        );
    }
    check_output_path(args.json.as_deref())?;
    // Records (invalid ones skipped and reported), checked against the run before the model loads.
    let mut input = read_records(&args.edits, edited.as_deref(), args.limit, args.max_line_bytes)?;

    let mut lm = args
        .model
        .load_for_run(run_dir.as_ref().zip(manifest.as_ref()).map(|(d, m)| (d.path.as_path(), m)))?;
    let context = lm.config().max_position_embeddings;
    apply_token_limits(&mut input, &args.edits, &lm.tok, context, args.max_prompt_tokens, run_dir.is_some())?;
    if which.fluency {
        check_gen_tokens(&input, &args.edits, &lm.tok, context, args.gen_tokens)?;
    }
    let base = match (&args.base, &run_dir, args.timing) {
        (Some(b), None, Timing::AfterAll) => {
            Some(load_model(b, &args.model.device.parse()?, lm.dtype.into())?)
        }
        _ => None,
    };
    let opts = EvalOptions {
        model_arg: &args.model.model,
        edits_file: &args.edits,
        run: run_dir.as_ref().map(|dir| EvalRun {
            dir,
            manifest: manifest.as_ref(),
            log: log.as_deref().unwrap_or_default(),
        }),
        which,
        timing: args.timing,
        gen_tokens: args.gen_tokens,
        at,
        use_cache: !args.no_cache,
        per_record: args.per_record,
        started,
    };
    let report = evaluate(&mut lm, base.as_ref(), &input, &opts)?;
    print_table(&report, started.elapsed().as_secs_f64());
    let json = || serde_json::to_string_pretty(&report);
    match &args.json {
        Some(p) if p.as_os_str() == "-" => crate::output::print_line(&json()?)?,
        Some(p) => atomic_write(p, json()?.as_bytes())?,
        None => {}
    }
    // A threshold on a metric none of the records could give (e.g. generalization on records
    // without paraphrases) is bad input, not a score below it.
    if let Some(t) = thresholds.iter().find(|t| !report.metrics.edited.contains_key(&t.metric)) {
        return Err(InputError(format!(
            "--fail-under {}: no evaluated record gives that metric (e.g. no paraphrase or neighbourhood prompt)",
            t.metric
        ))
        .into());
    }
    let failures = report.failures(&thresholds);
    if !failures.is_empty() {
        return Err(ThresholdError(failures.join("; ")).into());
    }
    Ok(())
}

/// The metrics that compare the edited model with the unedited one; without `--run` or
/// `--base` there is no unedited model to compare with.
const COMPARED_WITH_UNEDITED: [&str; 2] = ["locality_agreement", "gen_locality"];

/// A `--fail-under` threshold on a metric this evaluation cannot give (not in `--metrics`, or
/// a comparison with the unedited model when there is none) is a usage error.
fn unmeasured_thresholds(thresholds: &[Threshold], which: MetricSet, has_unedited: bool) -> Result<()> {
    for t in thresholds {
        if !which.measures(&t.metric) {
            let family = family_of(&t.metric).unwrap_or(t.metric.as_str());
            return Err(InputError(format!(
                "--fail-under {}: that metric is not measured; add `{family}` to --metrics",
                t.metric
            ))
            .into());
        }
        if !has_unedited && COMPARED_WITH_UNEDITED.contains(&t.metric.as_str()) {
            return Err(InputError(format!(
                "--fail-under {}: that metric compares with the unedited model; give --run or --base",
                t.metric
            ))
            .into());
        }
    }
    Ok(())
}

/// The folder of the `--json` report must exist before the evaluation spends its time.
fn check_output_path(json: Option<&std::path::Path>) -> Result<()> {
    let Some(p) = json.filter(|p| p.as_os_str() != "-") else { return Ok(()) };
    if p.is_dir() {
        return Err(InputError(format!("--json {}: is a directory; give a file name", p.display())).into());
    }
    let parent = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    if !parent.is_dir() {
        return Err(InputError(format!(
            "--json {}: the folder {} does not exist",
            p.display(),
            parent.display()
        ))
        .into());
    }
    Ok(())
}

fn print_table(report: &Report, secs: f64) {
    let (edited, base): (&Summaries, Option<&Summaries>) =
        (&report.metrics.edited, report.metrics.unedited.as_ref());
    eprintln!("{:<26} {:<14} {:>10} {:>10} {:>7}", "metric", "protocol", "edited", "unedited", "count");
    for c in metric_columns() {
        let Some(e) = edited.get(c.name) else { continue };
        let b = base.and_then(|b| b.get(c.name)).map(|s| s.mean);
        eprintln!(
            "{:<26} {:<14} {:>10.4} {:>10} {:>7}",
            c.name,
            c.protocol,
            e.mean,
            b.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into()),
            e.count
        );
    }
    let n = report.records.evaluated;
    eprintln!("{n} records in {secs:.1} s ({:.2} records/s)", n as f64 / secs.max(1e-9));
}
