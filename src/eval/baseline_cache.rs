//! Cache of the unedited model's per-record scores.
//!
//! Every report compares the edited model with the unedited one on the same records; the
//! unedited side is the same for every run, method and checkpoint on one model, and costs as much
//! as the edited side. It is computed once per (model fingerprint, record, metric set,
//! generation length) and kept in `$OEDIT_CACHE/eval/<fingerprint>.jsonl` (else
//! `~/.cache/oedit/eval`). A damaged cache line is ignored and recomputed, never trusted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::{score_all, MetricSet, RecordScores};
use crate::data::EditRecord;
use crate::fingerprint::Fnv;
use crate::fsutil::{atomic_write, cache_root};
use crate::model::Llama;
use crate::tokenizer::Tok;

/// Bumped whenever the scoring code changes what it computes, so stale entries are not reused.
const SCORING_VERSION: u32 = 2;

#[derive(Serialize, Deserialize)]
struct Entry {
    key: String,
    scores: RecordScores,
    locality_argmax: Vec<Vec<u32>>,
    /// Greedy neighbourhood answers (for gen_locality; absent in entries written before it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    locality_greedy: Vec<Vec<u32>>,
}

/// Where the cache of one model lives.
pub fn cache_path(fingerprint: &str) -> PathBuf {
    cache_root().join("eval").join(format!("{fingerprint}.jsonl"))
}

fn entry_key(rec: &EditRecord, which: MetricSet, gen_tokens: usize) -> Result<String> {
    let mut h = Fnv::new();
    h.write(&SCORING_VERSION.to_le_bytes());
    h.write(serde_json::to_string(rec)?.as_bytes());
    h.write(serde_json::to_string(&which)?.as_bytes());
    h.write(&(gen_tokens as u64).to_le_bytes());
    Ok(format!("{:016x}", h.finish()))
}

fn read_entries(path: &Path) -> HashMap<String, Entry> {
    let Ok(text) = std::fs::read_to_string(path) else { return HashMap::new() };
    text.lines().filter_map(|l| serde_json::from_str::<Entry>(l).ok()).map(|e| (e.key.clone(), e)).collect()
}

/// Scores `records` on the unedited `model`, reusing cached scores where the cache has them
/// and adding the rest to it. `fingerprint` must identify `model` exactly (weights included).
pub fn score_unedited(
    model: &Llama,
    tok: &Tok,
    fingerprint: &str,
    records: &[EditRecord],
    which: MetricSet,
    gen_tokens: usize,
) -> Result<Vec<RecordScores>> {
    let path = cache_path(fingerprint);
    let mut entries = read_entries(&path);
    let keys = records.iter().map(|r| entry_key(r, which, gen_tokens)).collect::<Result<Vec<_>>>()?;
    let missing: Vec<usize> = (0..records.len()).filter(|&i| !entries.contains_key(&keys[i])).collect();
    if !missing.is_empty() {
        let todo: Vec<EditRecord> = missing.iter().map(|&i| records[i].clone()).collect();
        let scored = score_all(model, tok, &todo, which, gen_tokens, "unedited", None)?;
        for (&i, mut s) in missing.iter().zip(scored) {
            let locality_argmax = std::mem::take(&mut s.locality_argmax);
            let locality_greedy = std::mem::take(&mut s.locality_greedy);
            let key = keys[i].clone();
            entries.insert(key.clone(), Entry { key, scores: s, locality_argmax, locality_greedy });
        }
        // A cache that cannot be written costs time, not results.
        if let Err(e) = write_entries(&path, &entries) {
            eprintln!("warning: unedited-score cache not saved: {e:#}");
        }
    }
    Ok(keys
        .iter()
        .map(|k| {
            let e = &entries[k];
            RecordScores {
                locality_argmax: e.locality_argmax.clone(),
                locality_greedy: e.locality_greedy.clone(),
                ..e.scores.clone()
            }
        })
        .collect())
}

fn write_entries(path: &Path, entries: &HashMap<String, Entry>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut sorted: Vec<&Entry> = entries.values().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    let mut text = String::new();
    for e in sorted {
        text.push_str(&serde_json::to_string(e)?);
        text.push('\n');
    }
    atomic_write(path, text.as_bytes())
}
