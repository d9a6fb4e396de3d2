//! Resolving `--model` and loading the model: short names from `configs/`, local Hugging Face
//! folders, `.gguf` files and hub repo ids, in that order.

pub mod gguf;
pub mod hf;
pub mod hub;
pub mod reader;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::device::{default_dtype, DeviceSpec};
use crate::errors::InputError;
use crate::model::{HfConfig, Llama};
use crate::presets::{self, Preset};
use crate::tokenizer::Tok;

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A Hugging Face model folder.
    Dir(PathBuf),
    /// A GGUF file.
    Gguf(PathBuf),
    /// A hub repo id (optionally `@revision`).
    Hub(String),
}

impl ModelSource {
    /// A human-readable description.
    pub fn describe(&self) -> String {
        match self {
            ModelSource::Dir(p) => format!("folder {}", p.display()),
            ModelSource::Gguf(p) => format!("gguf {}", p.display()),
            ModelSource::Hub(id) => format!("hub {id}"),
        }
    }
}

/// The resolved `--model` argument.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// What the user typed.
    pub arg: String,
    /// Where the weights are.
    pub source: ModelSource,
    /// The preset, when `arg` was a short name.
    pub preset: Option<Preset>,
}

fn models_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("OEDIT_MODELS").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("models"));
    dirs
}

fn looks_like_repo_id(s: &str) -> bool {
    let id = s.split('@').next().unwrap_or(s);
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Resolves `--model`: short name, then local folder, then `.gguf` file, then hub repo id.
pub fn resolve(arg: &str) -> Result<ModelSpec> {
    if let Some(preset) = presets::find(arg)? {
        let local = preset
            .local_gguf
            .as_ref()
            .and_then(|f| models_dirs().into_iter().map(|d| d.join(f)).find(|p| p.is_file()));
        let source = match local {
            Some(p) => ModelSource::Gguf(p),
            None => ModelSource::Hub(preset.repo_id.clone()),
        };
        return Ok(ModelSpec { arg: arg.to_string(), source, preset: Some(preset) });
    }
    let path = Path::new(arg);
    if path.is_dir() {
        return Ok(ModelSpec { arg: arg.into(), source: ModelSource::Dir(path.to_path_buf()), preset: None });
    }
    if arg.to_lowercase().ends_with(".gguf") {
        if !path.is_file() {
            bail!("{arg}: no such GGUF file");
        }
        return Ok(ModelSpec {
            arg: arg.into(),
            source: ModelSource::Gguf(path.to_path_buf()),
            preset: None,
        });
    }
    if path.exists() {
        bail!("{arg}: not a model folder or a .gguf file");
    }
    if let Some((_, revision)) = arg.split_once('@').filter(|(id, _)| looks_like_repo_id(id)) {
        if revision.is_empty() || revision.contains('@') {
            return Err(InputError(format!(
                "--model {arg}: a hub model with a revision is owner/name@revision, with one `@` \
                 and a revision after it (a branch, tag or commit); leave out `@` for main"
            ))
            .into());
        }
    }
    if looks_like_repo_id(arg) && !arg.starts_with("./") && !arg.starts_with('/') {
        return Ok(ModelSpec { arg: arg.into(), source: ModelSource::Hub(arg.into()), preset: None });
    }
    bail!(
        "unknown model `{arg}`: not a short name (known: {}), not an existing folder or .gguf file, \
         and not a hub repo id (owner/name)",
        presets::names().join(", ")
    )
}

/// A loaded model with its tokenizer.
pub struct LoadedModel {
    pub model: Llama,
    pub tok: Tok,
    pub spec: ModelSpec,
    pub device: Device,
    pub dtype: DType,
}

impl LoadedModel {
    /// The model's configuration.
    pub fn config(&self) -> &HfConfig {
        self.model.config()
    }
}

/// Loads `spec` on `device` with `dtype` (None: the preset's dtype, else f32 for models that fit
/// comfortably on CPU and bf16 for 7B-class ones).
pub fn load(spec: &ModelSpec, device: &DeviceSpec, dtype: Option<DType>) -> Result<LoadedModel> {
    let dev = device.to_device()?;
    let preset_dtype = spec.preset.as_ref().map(|p| crate::device::parse_dtype(&p.dtype)).transpose()?;
    let (model, tok, dtype) = match &spec.source {
        ModelSource::Gguf(path) => {
            let dtype = dtype.or(preset_dtype).unwrap_or(DType::F32);
            let g = gguf::load_gguf(path, &dev, dtype)?;
            let vb = VarBuilder::from_tensors(g.tensors, dtype, &dev);
            let model =
                Llama::load(vb, &g.config).with_context(|| format!("{}: incomplete GGUF", path.display()))?;
            (model, g.tokenizer, dtype)
        }
        ModelSource::Dir(dir) => {
            let cfg = hf::read_config(&dir.join("config.json"))?;
            let dtype = dtype.or(preset_dtype).unwrap_or_else(|| default_dtype(&cfg, &dev));
            let (m, t) = hf::load_dir(dir, &dev, dtype)?;
            (m, t, dtype)
        }
        ModelSource::Hub(id) => {
            let files = hub::fetch(id)?;
            let cfg = hf::read_config(&files.config)?;
            let dtype = dtype.or(preset_dtype).unwrap_or_else(|| default_dtype(&cfg, &dev));
            let (m, t) = hf::load_files(&files.config, &files.weights, &files.tokenizer, &dev, dtype)?;
            (m, t, dtype)
        }
    };
    Ok(LoadedModel { model, tok, spec: spec.clone(), device: dev, dtype })
}

/// Resolves and loads `arg` in one step.
pub fn load_model(arg: &str, device: &DeviceSpec, dtype: Option<DType>) -> Result<LoadedModel> {
    let spec = resolve(arg)?;
    load(&spec, device, dtype).with_context(|| format!("loading model `{arg}` ({})", spec.source.describe()))
}
