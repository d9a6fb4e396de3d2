//! Model presets: short names (`smollm2-135m`, `llama-2-7b`, ...) defined by the JSON files in
//! `configs/`, embedded in the binary so that an installed `oedit` knows them.

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::hparams::Hparams;

/// One model preset.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// The short name users pass to `--model`.
    pub name: String,
    /// What the model is.
    pub description: String,
    /// Hugging Face hub repository id.
    pub repo_id: String,
    /// File name of a GGUF copy searched for in `$OEDIT_MODELS` and `./models` before the hub.
    #[serde(default)]
    pub local_gguf: Option<String>,
    /// Default dtype (`f32`, `bf16`, `f16`).
    pub dtype: String,
    /// Default editing hyper-parameters.
    pub hparams: Hparams,
}

const EMBEDDED: &[(&str, &str)] = &[
    ("smollm2-135m", include_str!("../configs/smollm2-135m.json")),
    ("llama-2-7b", include_str!("../configs/llama-2-7b.json")),
    ("llama-3-8b", include_str!("../configs/llama-3-8b.json")),
    ("mistral-7b", include_str!("../configs/mistral-7b.json")),
];

/// The short names that exist.
pub fn names() -> Vec<&'static str> {
    EMBEDDED.iter().map(|(n, _)| *n).collect()
}

/// The preset called `name`, if there is one.
pub fn find(name: &str) -> Result<Option<Preset>> {
    let Some((_, text)) = EMBEDDED.iter().find(|(n, _)| *n == name) else {
        return Ok(None);
    };
    let p: Preset =
        serde_json::from_str(text).with_context(|| format!("configs/{name}.json: invalid preset"))?;
    Ok(Some(p))
}
