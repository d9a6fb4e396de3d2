//! `oedit generate`: greedy continuation of a prompt.

use anyhow::Result;
use clap::Args;

use super::ModelArgs;
use crate::infer::generate;

/// Arguments of `oedit generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt to continue.
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 20)]
    pub max_tokens: usize,
    /// Print a JSON object {"prompt", "completion"} instead of plain text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `oedit generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let lm = args.model.load()?;
    let completion = generate(&lm.model, &lm.tok, &args.prompt, args.max_tokens)?;
    if args.json {
        println!("{}", serde_json::json!({ "prompt": args.prompt, "completion": completion }));
    } else {
        println!("{}{}", args.prompt, completion);
    }
    Ok(())
}
