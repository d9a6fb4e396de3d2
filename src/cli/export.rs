//! `oedit export`: write a model, or the edited model of a run, as a Hugging Face folder.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::errors::InputError;
use crate::export::export_hf;
use crate::fingerprint::model_fingerprint;
use crate::loader::load_model;
use crate::run::{replay, RunDir};

/// Arguments of `oedit export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Model to export (with --run: the base model; default: the one recorded in the run).
    #[arg(long, short = 'm', required_unless_present = "run")]
    pub model: Option<String>,
    /// Export the edited model of this run directory.
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight dtype: f32, bf16 or f16.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Output folder (created if missing; existing model files in it are replaced).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `oedit export`.
pub fn run(args: ExportArgs) -> Result<()> {
    let (device, dtype) = super::parse_device_flags(&args.device, args.dtype.as_deref())?;
    let run_dir =
        args.run.as_deref().map(RunDir::open).transpose().map_err(|e| InputError(format!("{e:#}")))?;
    let manifest = match &run_dir {
        Some(rd) => rd.read_manifest()?,
        None => None,
    };
    let model_arg = match (&args.model, &manifest) {
        (Some(m), _) => m.clone(),
        (None, Some(m)) => m.model.arg.clone(),
        (None, None) => bail!("give --model or --run"),
    };
    let dtype =
        super::run_dtype(dtype, run_dir.as_ref().zip(manifest.as_ref()).map(|(d, m)| (d.path.as_path(), m)))?;
    let mut lm = load_model(&model_arg, &device, dtype)?;
    if let (Some(rd), Some(m)) = (&run_dir, &manifest) {
        m.check_model(&rd.path, &model_arg, &model_fingerprint(&lm.model)?)?;
        let state = rd.read_state(lm.config().intermediate_size)?;
        replay(&mut lm.model, &state.updates).context("replaying the run's updates")?;
        eprintln!("applied {} edits from {}", state.n_edits, rd.path.display());
    }
    export_hf(&lm.model, &lm.tok, &args.out)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
