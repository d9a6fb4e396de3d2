//! Writing a model as a Hugging Face folder (config.json, model.safetensors, tokenizer.json).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};

use crate::fsutil::{atomic_write_all, bytes_writer};
use crate::model::Llama;
use crate::tokenizer::Tok;

/// Writes `model` and `tok` to `out` (created if needed). Tied embeddings stay tied.
pub fn export_hf(model: &Llama, tok: &Tok, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create folder", out.display()))?;
    // An export killed earlier left its temporary copy of the weights here.
    crate::fsutil::remove_stale_temps(out);
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
        // Edited layers hold f32 master weights; the file is written in the model's one dtype.
        .map(|(n, t)| Ok((n, t.to_dtype(model.dtype())?.to_device(&candle_core::Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let config = serde_json::to_string_pretty(&cfg)?;
    let tok_config = tokenizer_config(tok).to_string();
    // Every file is written in full before any is put in place: an export killed while writing
    // the weights (minutes at 7B) leaves the folder as it was, not new weights beside an old
    // config.
    atomic_write_all(vec![
        (
            out.join("model.safetensors"),
            Box::new(|path: &Path| {
                safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta), path)
                    .map_err(anyhow::Error::from)
            }),
        ),
        (out.join("config.json"), bytes_writer(config.as_bytes())),
        (out.join("tokenizer.json"), Box::new(|p: &Path| tok.save(p))),
        (out.join("tokenizer_config.json"), bytes_writer(tok_config.as_bytes())),
    ])?;
    for name in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"] {
        make_readable(&out.join(name))?;
    }
    Ok(())
}

/// `tokenizer_config.json` for transformers 4 and 5: a generic fast tokenizer over
/// tokenizer.json with the model's special tokens (without it transformers 4 picks a Llama
/// tokenizer class by `model_type` that adds tokens the model does not have).
fn tokenizer_config(tok: &Tok) -> serde_json::Value {
    let name = |id: Option<u32>| id.and_then(|i| tok.inner().id_to_token(i));
    let mut cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
        "model_input_names": ["input_ids", "attention_mask"],
    });
    if let Some(b) = name(tok.bos_id) {
        cfg["bos_token"] = b.into();
    }
    if let Some(e) = name(tok.eos_id) {
        cfg["eos_token"] = e.into();
    }
    if let Some(p) = name(Some(tok.pad_id)) {
        cfg["pad_token"] = p.into();
    }
    cfg
}

/// Files of an exported model are readable by everyone (the temporary file they come from may
/// have been created private).
fn make_readable(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("{}: cannot set permissions", path.display()))?;
    }
    Ok(())
}
