//! Command-line interface: argument definitions and dispatch to one module per subcommand.

pub mod edit;
pub mod eval;
pub mod export;
pub mod generate;
pub mod score;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use candle_core::DType;

use crate::device::{parse_dtype, DeviceSpec};
use crate::errors::InputError;
use crate::loader::{load_model, LoadedModel};

/// Sequential knowledge editing of Llama-family LLMs with orthogonal subspace updates (O-Edit).
#[derive(Debug, Parser)]
#[command(name = "oedit", version, about, long_about = None)]
pub struct Cli {
    /// Worker threads for the numeric kernels (default: RAYON_NUM_THREADS or the number of cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a greedy continuation of a prompt.
    Generate(generate::GenerateArgs),
    /// Print the token count, mean NLL and perplexity of a text (teacher-forced).
    Score(score::ScoreArgs),
    /// Apply edits sequentially (alphaedit, oedit-plus, oedit-soft, oedit, rome, memit, oedit-spread or alphaedit-single), checkpointing after every edit; resumable.
    #[command(args_override_self = true)]
    Edit(edit::EditArgs),
    /// Measure efficacy, generalization, locality and fluency of edits (edited vs unedited).
    Eval(eval::EvalArgs),
    /// Write a model, or the edited model of a run, as a Hugging Face folder.
    Export(export::ExportArgs),
}

/// Options shared by every command that loads a model.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// Model: a short name from configs/ (smollm2-135m, llama-2-7b, llama-3-8b, mistral-7b),
    /// a Hugging Face model folder, a .gguf file, or a hub repo id (owner/name[@revision]).
    #[arg(long, short = 'm')]
    pub model: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight dtype: f32, bf16 or f16 (default: the preset's for a short name, f32 for a .gguf
    /// file, else f32 on CPU for models under 3B parameters and bf16 otherwise).
    #[arg(long)]
    pub dtype: Option<String>,
}

impl ModelArgs {
    /// Validates the flags and loads the model.
    pub fn load(&self) -> Result<LoadedModel> {
        self.load_for_run(None)
    }

    /// Loads the model of a run: in the run's dtype (from its manifest) unless `--dtype` names
    /// another, which is refused (bad input, exit code 2).
    pub fn load_for_run(
        &self,
        run: Option<(&std::path::Path, &crate::run::Manifest)>,
    ) -> Result<LoadedModel> {
        let (device, dtype) = parse_device_flags(&self.device, self.dtype.as_deref())?;
        load_model(&self.model, &device, run_dtype(dtype, run)?)
    }
}

/// The dtype to load a run's model in: the one the run recorded, unless `--dtype` (`flag`)
/// names another, which is an input error naming both.
pub fn run_dtype(
    flag: Option<DType>,
    run: Option<(&std::path::Path, &crate::run::Manifest)>,
) -> Result<Option<DType>> {
    let Some((dir, m)) = run else { return Ok(flag) };
    let recorded =
        parse_dtype(&m.dtype).map_err(|e| InputError(format!("{}: manifest dtype: {e:#}", dir.display())))?;
    match flag {
        Some(t) if t != recorded => Err(InputError(format!(
            "--dtype {}: run {} was made with the model in {}; load it in {} (omit --dtype)",
            crate::device::dtype_name(t),
            dir.display(),
            m.dtype,
            m.dtype
        ))
        .into()),
        _ => Ok(Some(recorded)),
    }
}

/// Parses `--device` and `--dtype`; a bad value is bad input (exit code 2), reported on one line.
pub fn parse_device_flags(device: &str, dtype: Option<&str>) -> Result<(DeviceSpec, Option<DType>)> {
    let d: DeviceSpec = device.parse().map_err(|e| InputError(format!("--device: {e:#}")))?;
    let t = dtype.map(parse_dtype).transpose().map_err(|e| InputError(format!("--dtype: {e:#}")))?;
    Ok((d, t))
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Score(a) => score::run(a),
        Command::Edit(a) => edit::run_cmd(a),
        Command::Eval(a) => eval::run(a),
        Command::Export(a) => export::run(a),
    }
}
