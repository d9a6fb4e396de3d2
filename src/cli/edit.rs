//! `oedit edit`: apply a stream of edits sequentially, checkpointing after every edit.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::builder::RangedU64ValueParser;
use clap::Args;

use super::ModelArgs;
use crate::edit::Method;
use crate::errors::InputError;
use crate::hparams::Hparams;
use crate::limits::{InputLimits, DEFAULT_MAX_LINE_BYTES, DEFAULT_MAX_PROMPT_TOKENS};
use crate::run::{Committed, RunDir};
use crate::session::{run, EditInput, OnInvalid, SessionOptions};
use crate::stats::Corpus;

/// Arguments of `oedit edit`.
#[derive(Debug, Args)]
pub struct EditArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Edit records (JSONL: CounterFact, ROME-form CounterFact, ZsRE or minimal); `-` reads standard input.
    #[arg(long)]
    pub edits: PathBuf,
    /// Run directory holding the checkpoint; re-running with the same directory resumes.
    #[arg(long, default_value = "oedit-run")]
    pub run: PathBuf,
    /// Editing method.
    #[arg(long, value_enum, default_value = "alphaedit")]
    pub method: Method,
    /// Edited layer (overrides the hyper-parameters).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Hyper-parameters file (JSON; a model preset file from configs/ also works).
    #[arg(long)]
    pub hparams: Option<PathBuf>,
    /// Stop once the run holds this many edits.
    #[arg(long)]
    pub limit: Option<usize>,
    /// What to do with an invalid input line.
    #[arg(long, value_enum, default_value = "stop")]
    pub on_invalid: OnInvalid,
    /// Corpus for the key statistics (a .txt file or a folder of them; default: the built-in corpus).
    #[arg(long)]
    pub stats_corpus: Option<PathBuf>,
    /// Score each record right before and after its own edit (efficacy, generalization, locality)
    /// and record it in log.jsonl, for `oedit eval --timing after-each`.
    #[arg(long)]
    pub eval_each: bool,
    /// Edits solved together: B records are read, their k* and v* computed on the same weights
    /// (the v* optimisations stacked, up to 256 suffix positions per forward/backward), one
    /// joint update applied in the method's batch form, and the run checkpointed once per batch.
    /// 1 (default) edits one record at a time. A run keeps the batch size it was started with.
    #[arg(long, default_value_t = 1, value_parser = RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub batch_size: usize,
    /// Print one JSON line per edit on standard output (also the default when it is not a terminal),
    /// and a JSON summary at the end.
    #[arg(long)]
    pub json: bool,
    /// Longest input line in bytes; a longer line is a bad line (skipped unread with
    /// `--on-invalid skip`).
    #[arg(long, default_value_t = DEFAULT_MAX_LINE_BYTES, value_parser = RangedU64ValueParser::<usize>::new().range(1..=1 << 30))]
    pub max_line_bytes: usize,
    /// Most tokens in the edit prompt, the new target and the ground truth (4 times as many in the
    /// prompts and answers only scored; the edit prompt with its answers must also fit the model's
    /// context); a longer one makes the line a bad line. Bounds one edit's memory and time.
    #[arg(long, default_value_t = DEFAULT_MAX_PROMPT_TOKENS, value_parser = RangedU64ValueParser::<usize>::new().range(1..=1 << 20))]
    pub max_prompt_tokens: usize,
}

/// Runs `oedit edit`.
pub fn run_cmd(args: EditArgs) -> Result<()> {
    // Input files are checked before the model loads: a typo costs no waiting.
    let from_file = args
        .hparams
        .as_deref()
        .map(Hparams::from_file)
        .transpose()
        .map_err(|e| InputError(format!("{e:#}")))?;
    // The run directory: a new path, an empty directory or a run no other process is editing.
    crate::run::guard::check_run_path(&args.run)?;
    // The edits too: checked against the run they continue, and validated up to --limit (the
    // first records of standard input, kept for the session) when bad lines stop the run.
    let progress =
        RunDir::peek(&args.run).committed().with_context(|| format!("resuming {}", args.run.display()))?;
    let input = EditInput::prepare(
        &args.edits,
        &args.run,
        progress.as_ref(),
        args.limit,
        args.on_invalid,
        args.max_line_bytes,
    )?;
    check_eval_each(&args.run, progress.as_ref(), args.eval_each)?;
    // The statistics corpus too.
    let corpus = match &args.stats_corpus {
        Some(p) => Corpus::from_path(p).map_err(|e| InputError(format!("--stats-corpus: {e:#}")))?,
        None => Corpus::builtin(),
    };
    // JSON lines and the summary line go to standard output with --json or when it is not a terminal.
    let json = args.json || !std::io::stdout().is_terminal();
    let t = std::time::Instant::now();
    let mut lm = args.model.load()?;
    crate::progress::report_timing("model load", t);
    let mut hp = match (from_file, &lm.spec.preset) {
        (Some(hp), _) => hp,
        (None, Some(p)) => p.hparams.clone(),
        (None, None) => {
            return Err(InputError(format!(
                "model `{}` has no preset; give hyper-parameters with --hparams FILE (e.g. configs/smollm2-135m.json)",
                args.model.model
            ))
            .into())
        }
    };
    if let Some(l) = args.layer {
        let n = lm.model.num_layers();
        if l >= n {
            return Err(InputError(format!("--layer {l}: the model has {n} layers (0..{})", n - 1)).into());
        }
        hp.layer = l;
        // A spread method whose hyper-parameters list its layers optimises v* at the last of
        // them: --layer must not be silently ignored.
        let layers = args.method.layers(&hp);
        if layers.last() != Some(&l) {
            return Err(InputError(format!(
                "--layer {l}: {} edits the layers {layers:?} listed in its hyper-parameters (the last is \
                 the target layer); change that list or drop --layer",
                args.method.name()
            ))
            .into());
        }
    }
    // The layer numbers need the model's layer count; checked before any statistics are
    // computed, naming where the values came from.
    hp.validate(lm.model.num_layers()).map_err(|e| {
        let source = match &args.hparams {
            Some(p) => format!("--hparams {}", p.display()),
            None => format!("the preset of `{}`", args.model.model),
        };
        InputError(format!("{source}: invalid hyper-parameters: {e:#}"))
    })?;
    let summary = run(
        &mut lm,
        SessionOptions {
            run_dir: args.run.clone(),
            edits: args.edits.clone(),
            input: Some(input),
            method: args.method,
            hparams: hp,
            corpus,
            limit: args.limit,
            on_invalid: args.on_invalid,
            json_lines: json,
            eval_each: args.eval_each,
            limits: InputLimits {
                max_line_bytes: args.max_line_bytes,
                max_prompt_tokens: args.max_prompt_tokens,
            },
            batch_size: args.batch_size,
        },
    )?;
    if json {
        crate::output::print_line(&serde_json::json!({ "summary": summary }).to_string())?;
    }
    if !args.json {
        let wins = match summary.target_wins_rate {
            Some(rate) => format!("target wins {:.1}%", 100.0 * rate),
            None => "no edits made".to_owned(),
        };
        eprintln!(
            "{} edits in {} ({} this session, {} rejected); {wins}; {:.1} s",
            summary.edits_total,
            summary.run_dir,
            summary.edits_this_session,
            summary.rejected,
            summary.seconds
        );
    }
    Ok(())
}

/// A run scored right after each edit (`--eval-each`) continues so, and one that was not
/// continues without: a mixed log could never give the after-each report
/// (`oedit eval --timing after-each`). Read from the run's last committed log line.
fn check_eval_each(run: &std::path::Path, progress: Option<&Committed>, eval_each: bool) -> Result<()> {
    let Some(last) = progress.and_then(|c| c.log.last()) else { return Ok(()) };
    let had = last.eval.is_some();
    if had != eval_each {
        let (was, now) = if had { ("with", "without") } else { ("without", "with") };
        return Err(InputError(format!(
            "run directory {} cannot be continued {now} --eval-each: its edits were made {was} it \
             (resume it {was} --eval-each, or use another --run directory)",
            run.display()
        ))
        .into());
    }
    Ok(())
}
