//! `oedit score`: teacher-forced NLL and perplexity of a text.

use anyhow::{Context, Result};
use clap::Args;

use super::ModelArgs;
use crate::errors::InputError;
use crate::infer::score_text;

/// Arguments of `oedit score`.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score.
    #[arg(long, conflicts_with = "file")]
    pub text: Option<String>,
    /// Read the text from a file (`-` for standard input).
    #[arg(long)]
    pub file: Option<std::path::PathBuf>,
    /// Print a JSON object {"tokens", "mean_nll", "perplexity"}.
    #[arg(long)]
    pub json: bool,
}

/// Runs `oedit score`.
pub fn run(args: ScoreArgs) -> Result<()> {
    let text = match (&args.text, &args.file) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) if p.as_os_str() == "-" => {
            std::io::read_to_string(std::io::stdin()).context("reading standard input")?
        }
        (None, Some(p)) => {
            std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?
        }
        (None, None) => return Err(InputError("give the text with --text or --file".into()).into()),
    };
    let lm = args.model.load()?;
    let s = score_text(&lm.model, &lm.tok, &text)?;
    let text = if args.json {
        serde_json::to_string(&s)?
    } else {
        format!("tokens      {}\nmean_nll    {:.4}\nperplexity  {:.3}", s.tokens, s.mean_nll, s.perplexity)
    };
    crate::output::print_line(&text)
}
