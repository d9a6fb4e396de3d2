//! Writing a model as a Hugging Face folder (config.json, model.safetensors, tokenizer.json).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};

use crate::fsutil::{atomic_write, atomic_write_with};
use crate::model::Llama;
use crate::tokenizer::Tok;

/// Writes `model` and `tok` to `out` (created if needed). Tied embeddings stay tied.
pub fn export_hf(model: &Llama, tok: &Tok, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create folder", out.display()))?;
    let mut cfg = model.config().clone();
    cfg.torch_dtype = Some(
        match model.dtype() {
            candle_core::DType::BF16 => "bfloat16",
            candle_core::DType::F16 => "float16",
            _ => "float32",
        }
        .to_string(),
    );
    if cfg.model_type.is_none() {
        cfg.model_type = Some("llama".into());
    }
    let tensors: HashMap<String, candle_core::Tensor> = model
        .named_weights()
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(&candle_core::Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    atomic_write_with(&out.join("model.safetensors"), |path| {
        safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta.clone()), path)
            .map_err(anyhow::Error::from)
    })?;
    atomic_write(&out.join("config.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
    let tok_path = out.join("tokenizer.json");
    atomic_write_with(&tok_path, |p| tok.save(p))?;
    Ok(())
}
