//! Loading a Hugging Face model folder: config.json, model.safetensors (or shards listed in
//! model.safetensors.index.json) and tokenizer.json.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::reader::TensorFiles;
use crate::model::{HfConfig, Llama};
use crate::tokenizer::Tok;

/// The safetensors files of a model folder (single file or shards from the index).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        bail!(
            "{}: no model.safetensors or model.safetensors.index.json (safetensors weights are required)",
            dir.display()
        );
    }
    let files = shard_names(&index)?;
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        bail!("{}: shard {} listed in the index is missing", dir.display(), missing.display());
    }
    Ok(paths)
}

/// The shard file names listed in a `model.safetensors.index.json` (sorted, unique).
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("{}: cannot read", index.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: field `weight_map` is missing or not an object", index.display()))?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        bail!("{}: `weight_map` names no shard file", index.display());
    }
    Ok(files)
}

/// Reads and validates `config.json`.
pub fn read_config(path: &Path) -> Result<HfConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    HfConfig::from_json(&text, &path.display().to_string())
}

/// Loads config, weights and tokenizer from explicit file paths.
pub fn load_files(
    config: &Path,
    weights: &[PathBuf],
    tokenizer: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(Llama, Tok)> {
    let cfg = read_config(config)?;
    for w in weights {
        check_safetensors(w)?;
    }
    // Tensors are read one at a time (no memory map), so loading peaks at the model plus one
    // tensor rather than at the model plus every mapped page (see `reader`).
    let files = TensorFiles::open(weights)?;
    let vb = VarBuilder::from_backend(Box::new(files), dtype, device.clone());
    let model = Llama::load(vb, &cfg).with_context(|| {
        format!(
            "{}: weights do not match config.json",
            weights.first().and_then(|w| w.parent()).unwrap_or(Path::new(".")).display()
        )
    })?;
    let tok = Tok::from_file(
        tokenizer,
        cfg.bos_token_id.as_ref().and_then(|t| t.first()),
        cfg.eos_token_id.as_ref().and_then(|t| t.first()),
    )?;
    Ok((model, tok))
}

/// Checks that a safetensors file has a readable header and that its size matches it,
/// so truncated or corrupt files get a clear error naming the file.
pub fn check_safetensors(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let size = f.metadata()?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: corrupt safetensors (file shorter than its header)", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > size.saturating_sub(8) || n > 100_000_000 {
        bail!("{}: corrupt safetensors (header length {n} exceeds the file size {size})", path.display());
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .with_context(|| format!("{}: corrupt safetensors (header is not JSON)", path.display()))?;
    let mut end = 0u64;
    if let Some(obj) = v.as_object() {
        for (k, t) in obj {
            if k == "__metadata__" {
                continue;
            }
            if let Some(e) = t.get("data_offsets").and_then(|o| o.get(1)).and_then(|e| e.as_u64()) {
                end = end.max(e);
            }
        }
    }
    // Offsets near u64::MAX (a corrupt header) must not overflow the sum.
    let expected = (8 + n).checked_add(end);
    if expected != Some(size) {
        bail!(
            "{}: corrupt or truncated safetensors (expected {} bytes, found {size})",
            path.display(),
            expected.map_or_else(|| "more than 2^64".to_owned(), |e| e.to_string())
        );
    }
    Ok(())
}

/// Loads a model folder.
pub fn load_dir(dir: &Path, device: &Device, dtype: DType) -> Result<(Llama, Tok)> {
    let config = dir.join("config.json");
    if !config.is_file() {
        bail!("{}: no config.json in the model folder", dir.display());
    }
    let tokenizer = dir.join("tokenizer.json");
    if !tokenizer.is_file() {
        bail!("{}: no tokenizer.json in the model folder", dir.display());
    }
    let weights = weight_files(dir)?;
    load_files(&config, &weights, &tokenizer, device, dtype)
}
