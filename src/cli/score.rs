//! `oedit score`: teacher-forced NLL and perplexity of a text.

use anyhow::Result;
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
        (None, Some(p)) if p.as_os_str() == "-" => read_text(std::io::stdin(), "standard input")?,
        (None, Some(p)) => {
            let f = std::fs::File::open(p)
                .map_err(|e| InputError(format!("--file {}: cannot open: {e}", p.display())))?;
            read_text(f, &p.display().to_string())?
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

/// Most bytes of text `score` reads: far above any model's context (a text longer than the
/// context is refused once tokenised), and a bound on what `--file /dev/zero` can take.
const MAX_TEXT_BYTES: u64 = 16 << 20;

/// Reads UTF-8 text of at most [`MAX_TEXT_BYTES`]; anything else is an [`InputError`] naming `what`.
fn read_text(r: impl std::io::Read, what: &str) -> Result<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    r.take(MAX_TEXT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| InputError(format!("--file {what}: cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_TEXT_BYTES {
        return Err(InputError(format!(
            "--file {what}: more than {MAX_TEXT_BYTES} bytes; score a shorter text"
        ))
        .into());
    }
    String::from_utf8(bytes).map_err(|e| InputError(format!("--file {what}: not UTF-8 text: {e}")).into())
}
