//! `oedit export`: write a model as a Hugging Face folder.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::ModelArgs;
use crate::export::export_hf;

/// Arguments of `oedit export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output folder (created if missing; existing model files in it are replaced).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `oedit export`.
pub fn run(args: ExportArgs) -> Result<()> {
    let lm = args.model.load()?;
    export_hf(&lm.model, &lm.tok, &args.out)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
