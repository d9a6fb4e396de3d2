//! `oedit export`: write a model, or the edited model of a run, as a Hugging Face folder.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::errors::InputError;
use crate::export::export_hf;
use crate::fingerprint::model_fingerprint;
use crate::loader::{load_model, resolve, ModelSource};
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
    refuse_overwriting_the_model(&model_arg, &args.out)?;
    let loaded = load_model(&model_arg, &device, dtype);
    let mut lm = match (&args.model, &run_dir) {
        // The run's own record of its model: a path is as the run's command gave it.
        (None, Some(rd)) => loaded.with_context(|| {
            format!(
                "the model `{model_arg}` recorded in {} (as given to the command that made the run, \
                 relative to its folder); give it with --model",
                rd.path.join("manifest.json").display()
            )
        })?,
        _ => loaded?,
    };
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

/// `--out` must not be the folder the model is read from: its weights would be replaced by the
/// export, and a run of that model could no longer be resumed, evaluated or exported (its base
/// model gone). Bad input (exit code 2), found before the model loads.
fn refuse_overwriting_the_model(model_arg: &str, out: &Path) -> Result<()> {
    let Ok(spec) = resolve(model_arg) else { return Ok(()) };
    let ModelSource::Dir(folder) = &spec.source else { return Ok(()) };
    let same = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y);
    if same(folder, out) {
        return Err(InputError(format!(
            "--out {}: is the folder of the model `{model_arg}`; exporting there would replace the \
             weights its runs are made on; give another folder",
            out.display()
        ))
        .into());
    }
    Ok(())
}
