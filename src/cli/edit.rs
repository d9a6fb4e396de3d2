//! `oedit edit`: apply a stream of edits sequentially, checkpointing after every edit.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::ModelArgs;
use crate::edit::Method;
use crate::errors::InputError;
use crate::hparams::Hparams;
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
    #[arg(long, value_enum, default_value = "oedit-plus")]
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
    /// Print one JSON line per edit on standard output (also the default when it is not a terminal),
    /// and a JSON summary at the end.
    #[arg(long)]
    pub json: bool,
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
    // The edits too: checked against the run they continue, and validated up to --limit (the
    // first records of standard input, kept for the session) when bad lines stop the run.
    let input = EditInput::prepare(&args.edits, &args.run, args.limit, args.on_invalid)?;
    let mut lm = args.model.load()?;
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
        hp.layer = l;
    }
    let corpus = match &args.stats_corpus {
        Some(p) => Corpus::from_path(p)?,
        None => Corpus::builtin(),
    };
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
            json_lines: args.json,
            eval_each: args.eval_each,
        },
    )?;
    if args.json {
        println!("{}", serde_json::json!({ "summary": summary }));
    } else {
        eprintln!(
            "{} edits in {} ({} this session, {} rejected); target wins {:.1}%; {:.1} s",
            summary.edits_total,
            summary.run_dir,
            summary.edits_this_session,
            summary.rejected,
            100.0 * summary.target_wins_rate,
            summary.seconds
        );
    }
    Ok(())
}
