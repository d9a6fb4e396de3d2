//! Hugging Face hub models through the standard cache (`HF_HUB_CACHE`, `HF_HOME`), honouring
//! `HF_HUB_OFFLINE`. Files already in the cache are used without touching the network.

use std::path::PathBuf;

use anyhow::{bail, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

/// The hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(h) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(h).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| !v.is_empty() && v != "0" && v.to_lowercase() != "false")
        .unwrap_or(false)
}

/// Splits `owner/name@revision` into repo id and revision.
fn split_revision(spec: &str) -> (&str, &str) {
    spec.split_once('@').unwrap_or((spec, "main"))
}

/// Whether a revision is a full commit hash (40 hexadecimal digits).
fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Files of a hub model, resolved to local paths.
pub struct HubFiles {
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub weights: Vec<PathBuf>,
}

/// Finds (or downloads, unless offline) config.json, tokenizer.json and the safetensors weights
/// of `spec` (`owner/name` or `owner/name@revision`).
pub fn fetch(spec: &str) -> Result<HubFiles> {
    let (repo_id, revision) = split_revision(spec);
    let dir = cache_dir();
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let cache = Cache::new(dir.clone()).repo(repo.clone());
    // A revision that is a commit hash has no `refs/` entry in the cache (huggingface_hub writes
    // none); its snapshot folder is looked up directly.
    let pinned =
        is_commit_hash(revision).then(|| dir.join(repo.folder_name()).join("snapshots").join(revision));
    let api = if offline() {
        Err("not in the cache and HF_HUB_OFFLINE is set".to_string())
    } else {
        ApiBuilder::from_env()
            .with_cache_dir(dir.clone())
            .with_progress(false)
            .build()
            .map(|a| a.repo(repo))
            .map_err(|e| format!("not in the cache, and the hub client could not start: {e}"))
    };
    let get = |file: &str| -> Result<PathBuf> {
        if let Some(p) = cache.get(file) {
            return Ok(p);
        }
        if let Some(p) = pinned.as_ref().map(|d| d.join(file)).filter(|p| p.is_file()) {
            return Ok(p);
        }
        match &api {
            Ok(api) => api.get(file).map_err(|e| anyhow::anyhow!("{e}")),
            Err(why) => bail!("{why}"),
        }
    };
    let missing_help = |file: &str, e: anyhow::Error| {
        anyhow::anyhow!(
            "hub model `{repo_id}` (revision {revision}): cannot get `{file}`: {e:#}. Looked in the cache {}. \
             Provide the model by downloading it into that cache (e.g. `huggingface-cli download {repo_id}`), \
             by setting HF_HUB_CACHE/HF_HOME to a cache that has it, or by passing a local folder with \
             config.json, tokenizer.json and model.safetensors to --model",
            dir.display()
        )
    };
    let config = get("config.json").map_err(|e| missing_help("config.json", e))?;
    let tokenizer = get("tokenizer.json").map_err(|e| missing_help("tokenizer.json", e))?;
    let weights = match get("model.safetensors") {
        Ok(p) => vec![p],
        Err(single_err) => {
            let index = get("model.safetensors.index.json").map_err(|_| {
                missing_help("model.safetensors (or model.safetensors.index.json)", single_err)
            })?;
            let shards = super::hf::shard_names(&index)?;
            shards.iter().map(|s| get(s).map_err(|e| missing_help(s, e))).collect::<Result<Vec<_>>>()?
        }
    };
    Ok(HubFiles { config, tokenizer, weights })
}
