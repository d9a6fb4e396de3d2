//! The run directory of `oedit edit`: the one place that holds a run's state.
//!
//! Format 2 (this version writes it):
//! ```text
//! DIR/manifest.json          model identity, dtype, method, hyper-parameters, templates, statistics inputs
//! DIR/subspace.safetensors   the commit point of every edit: metadata only (n_edits, last_line,
//!                            n_updates, the chained hash of the edit records, the last log line)
//! DIR/updates/edit-NNNNNNNN.safetensors  one edit's record (see [`journal`]): its rank-one factors
//!                            and the change it made to each layer's basis (rows removed, rows
//!                            appended with their energies), while its chunk is not complete
//! DIR/updates/chunk-NNNNN.safetensors    the records of edits 256·N .. 256·N+255, written once
//!                            when the chunk completes (the per-edit files are then deleted)
//! DIR/log.jsonl              one JSON line per edit
//! DIR/rejected.jsonl         rejected input lines (with --on-invalid skip)
//! DIR/lock                   held (an OS file lock) by the `oedit edit` editing the run, see [`guard`]
//! ```
//! A commit writes the edit's record (O(f) bytes: its factors and the few basis rows it appended),
//! then the small commit point; once every 256 edits, the chunk file. Resuming rebuilds each
//! basis by replaying the records' changes in order. Format 1 (earlier versions: the whole basis
//! in `subspace.safetensors`, factor chunks `chunk-NNNNN` by update index, the unfinished one
//! rewritten on every commit) is still read, and a format-1 run keeps being written in format 1.
//!
//! Every file is written atomically (temp file, fsync, rename). An edit is committed when
//! `subspace.safetensors` records it; on resume, anything written after the last commit is
//! dropped and the weights are rebuilt by replaying the stored factors on the base model.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::edit::methods::REGISTRY;
use crate::edit::{apply_rank_one, subspace::Subspace, AppliedUpdate, Method};
use crate::errors::InputError;
use crate::fingerprint::Fnv;
use crate::fsutil::{atomic_write, atomic_write_with};
use crate::hparams::Hparams;
use crate::loader::hf::check_safetensors;
use crate::model::Llama;

pub mod guard;
pub mod journal;
pub mod log;

pub use log::{read_log, LogEntry, Phases, RejectedLine};

/// Version of the run-directory layout this version writes for new runs (it reads 1 and 2).
pub const FORMAT_VERSION: u32 = 2;
/// Edits per updates chunk file.
pub const CHUNK: usize = 256;

/// Identity of the model a run edits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelIdentity {
    /// The `--model` argument.
    pub arg: String,
    /// Where the weights came from.
    pub source: String,
    /// Fingerprint of configuration and weights.
    pub fingerprint: String,
}

/// Inputs of the key statistics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatsIdentity {
    /// The corpus as named when the run started (informative only).
    pub corpus: String,
    pub corpus_hash: String,
    pub tokens: usize,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub oedit_version: String,
    pub model: ModelIdentity,
    pub method: Method,
    pub hparams: Hparams,
    pub templates: Vec<String>,
    pub stats: StatsIdentity,
    /// The edits file the run was started with, as given (`-` for standard input); informative
    /// only: resuming checks the records at the edited lines, not the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edits: Option<String>,
    /// The dtype the model was loaded in (`f32`, `bf16`, `f16`); manifests written before it was
    /// recorded read as `f32`, what those versions loaded local models in by default.
    #[serde(default = "default_dtype_name")]
    pub dtype: String,
    /// `--batch-size`: edits solved jointly per update and per commit. Absent (written only when
    /// not 1) reads as 1, so the manifests of runs without batching are unchanged.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub batch_size: usize,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

fn default_dtype_name() -> String {
    "f32".to_string()
}

impl Manifest {
    /// Checks that the model loaded as `arg`, with `fingerprint`, is the model this run edits.
    pub fn check_model(&self, run_dir: &Path, arg: &str, fingerprint: &str) -> Result<(), InputError> {
        if self.model.fingerprint == fingerprint {
            return Ok(());
        }
        Err(InputError(format!(
            "run {} was made on model `{}` (fingerprint {}), not on `{arg}` (fingerprint {fingerprint})",
            run_dir.display(),
            self.model.arg,
            self.model.fingerprint
        )))
    }

    /// Explains why `other` (the current invocation) cannot continue this run, if it cannot.
    pub fn incompatibility(&self, other: &Manifest) -> Option<String> {
        // The dtype first: weights loaded in another dtype usually fingerprint differently too.
        if self.dtype != other.dtype {
            return Some(format!(
                "it was made with the model in {}, not {} (resume it with --dtype {})",
                self.dtype, other.dtype, self.dtype
            ));
        }
        if self.model.fingerprint != other.model.fingerprint {
            return Some(format!(
                "it was created for model `{}` (fingerprint {}), not `{}` (fingerprint {})",
                self.model.arg, self.model.fingerprint, other.model.arg, other.model.fingerprint
            ));
        }
        if self.batch_size != other.batch_size {
            return Some(format!(
                "it was made with --batch-size {}, not {} (resume it with --batch-size {})",
                self.batch_size, other.batch_size, self.batch_size
            ));
        }
        if self.method != other.method {
            return Some(format!("it uses method {}, not {}", self.method.name(), other.method.name()));
        }
        let a = hparams_used_by(&self.hparams, self.method)?;
        let b = hparams_used_by(&other.hparams, other.method)?;
        if a != b {
            let diff: Vec<String> = a
                .as_object()?
                .iter()
                .filter(|(k, v)| b.get(k.as_str()) != Some(v))
                .map(|(k, v)| {
                    format!("{k}: run has {v}, now {}", b.get(k.as_str()).cloned().unwrap_or_default())
                })
                .collect();
            return Some(format!("its hyper-parameters differ ({})", diff.join("; ")));
        }
        // The statistics are identified by their content; the corpus path is informative only
        // (the same text under another name or from another folder resumes).
        if (&self.stats.corpus_hash, self.stats.tokens) != (&other.stats.corpus_hash, other.stats.tokens) {
            return Some(format!(
                "its key statistics came from corpus `{}` (content {}, {} tokens), not `{}` (content {}, {} tokens)",
                self.stats.corpus,
                self.stats.corpus_hash,
                self.stats.tokens,
                other.stats.corpus,
                other.stats.corpus_hash,
                other.stats.tokens
            ));
        }
        None
    }
}

/// The hyper-parameters `method` reads, as JSON: the sections of the other methods are left out,
/// so changing them (or their defaults) does not block resuming a run that never used them.
fn hparams_used_by(hp: &Hparams, method: Method) -> Option<serde_json::Value> {
    let mut v = serde_json::to_value(hp).ok()?;
    let obj = v.as_object_mut()?;
    let keep = method.hparam_sections();
    for section in REGISTRY.iter().flat_map(|m| m.hparam_sections()) {
        if !keep.contains(section) {
            obj.remove(*section);
        }
    }
    Some(v)
}

/// The committed progress of a run.
#[derive(Debug, Clone)]
pub struct State {
    /// Edits committed.
    pub n_edits: usize,
    /// Last input line consumed (edited or rejected).
    pub last_line: usize,
    /// Basis per edited layer.
    pub subspaces: HashMap<usize, Subspace>,
    /// Factors of every edit (one or more per edit), in order.
    pub updates: Vec<AppliedUpdate>,
    /// Where each edit's updates end in `updates` (cumulative counts, one per edit), when known:
    /// read from a format-2 run's edit records and kept by [`State::push_edit`]. An edit holds
    /// one update per edited layer and landing attempt, so the counts vary.
    pub edit_ends: Vec<usize>,
    /// How many of `updates` are already on disk.
    pub persisted_updates: usize,
    /// The log entry of the last committed edit (also kept in the checkpoint's metadata).
    pub last_log: Option<LogEntry>,
    /// The log entries of the edits of the last commit before its last one, when one commit
    /// held several edits (a batch); kept in the checkpoint's metadata with `last_log`, so that
    /// a crash between the commit and the log appends loses no line.
    pub batch_log: Vec<LogEntry>,
    /// Updates of each edit added since the last commit (see [`State::push_edit`]).
    pending: Vec<usize>,
    /// Layout version of the run directory (see the module documentation).
    pub format: u32,
    /// Edits whose records are on disk.
    persisted_edits: usize,
    /// Format 2: the chained hash of the committed edit records.
    chain: u64,
    /// Format 2: per layer, the identities of the committed basis rows (see [`journal::diff`]).
    base: HashMap<usize, Vec<u64>>,
}

impl State {
    /// The state of a run with no edit, written in the current format.
    pub fn new() -> Self {
        Self {
            n_edits: 0,
            last_line: 0,
            subspaces: HashMap::new(),
            updates: Vec::new(),
            edit_ends: Vec::new(),
            persisted_updates: 0,
            last_log: None,
            batch_log: Vec::new(),
            pending: Vec::new(),
            format: FORMAT_VERSION,
            persisted_edits: 0,
            chain: 0,
            base: HashMap::new(),
        }
    }

    /// Adds one edit's updates to the state (not committed yet). Several edits may be added
    /// before one commit (a batch); adding to `updates` and `n_edits` directly also works for
    /// one edit per commit.
    pub fn push_edit(&mut self, updates: Vec<AppliedUpdate>) {
        self.pending.push(updates.len());
        self.updates.extend(updates);
        if self.edit_ends.len() == self.n_edits {
            self.edit_ends.push(self.updates.len());
        }
        self.n_edits += 1;
    }

    /// Takes the identities of the rule's live subspaces as those of the committed rows, where
    /// they hold exactly the committed rows (after [`crate::edit::Editor::restore`]): the next
    /// commit then records only what the next edit changes. In format 2 the saved subspaces are
    /// dropped afterwards (the rule holds them), so the basis is not kept twice.
    pub fn track(&mut self, live: &[(usize, &Subspace)]) {
        for (l, s) in live {
            let Some(saved) = self.subspaces.get(l) else { continue };
            let same = saved.len() == s.len()
                && saved.energy.iter().zip(&s.energy).all(|(a, b)| a.to_bits() == b.to_bits())
                && saved
                    .basis
                    .rows()
                    .iter()
                    .zip(s.basis.rows())
                    .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
            if let (true, Some(ids)) = (same, s.ids()) {
                self.base.insert(*l, ids.to_vec());
            }
        }
        if self.format != 1 {
            // Format 2 commits only what each edit changes in the live subspaces: the saved copy
            // read from the checkpoint is not needed again (format 1 rewrites it every commit).
            self.subspaces.clear();
        }
    }
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

/// What a commit wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Bytes written to the run directory (every file the commit wrote, whole).
    pub bytes_written: u64,
}

/// What a run directory has committed, read from the checkpoint's header alone (no tensors, no
/// model): enough to check an edits file against the run before the model loads.
#[derive(Debug, Clone)]
pub struct Committed {
    /// Edits committed.
    pub n_edits: usize,
    /// Last input line consumed (edited or rejected).
    pub last_line: usize,
    /// The log entries of the committed edits.
    pub log: Vec<LogEntry>,
}

/// A run directory.
pub struct RunDir {
    pub path: PathBuf,
    /// The exclusive lock of an editing session ([`RunDir::create`]); `None` when opened to read.
    _lock: Option<std::fs::File>,
}

pub(crate) fn hash_f32(h: &mut Fnv, v: &[f32]) {
    for x in v {
        h.write(&x.to_le_bytes());
    }
}

pub(crate) fn hash_f64(h: &mut Fnv, v: &[f64]) {
    for x in v {
        h.write(&x.to_le_bytes());
    }
}

fn hash_counters(h: &mut Fnv, n_edits: usize, last_line: usize, n_updates: usize) {
    for x in [n_edits, last_line, n_updates] {
        h.write(&(x as u64).to_le_bytes());
    }
}

pub(crate) fn hash_update(h: &mut Fnv, r: &[f32], u: &[f32], key: &[f32], layer: u32) {
    hash_f32(h, r);
    hash_f32(h, u);
    hash_f32(h, key);
    h.write(&layer.to_le_bytes());
}

fn meta_usize(meta: &HashMap<String, String>, key: &str, file: &Path) -> Result<usize> {
    meta.get(key)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{}: corrupt checkpoint (metadata `{key}` missing)", file.display()))
}

/// The log entries of a commit that held several edits, all but its last (metadata `batch_log`,
/// a JSON array of log lines; absent: none).
fn parse_batch_log(meta: &HashMap<String, String>, file: &Path) -> Result<Vec<LogEntry>> {
    let Some(text) = meta.get("batch_log") else { return Ok(Vec::new()) };
    let corrupt = || {
        format!("{}: corrupt checkpoint (metadata `batch_log` is not a list of log entries)", file.display())
    };
    let lines: Vec<String> = serde_json::from_str(text).with_context(corrupt)?;
    lines.iter().map(|l| LogEntry::from_line(l).with_context(corrupt)).collect()
}

/// Writes the log entries of the last commit into the checkpoint's metadata.
fn put_logs(meta: &mut HashMap<String, String>, state: &State) -> Result<()> {
    if let Some(l) = &state.last_log {
        meta.insert("last_log".to_string(), l.to_line());
    }
    if !state.batch_log.is_empty() {
        let lines: Vec<String> = state.batch_log.iter().map(LogEntry::to_line).collect();
        meta.insert("batch_log".to_string(), serde_json::to_string(&lines)?);
    }
    Ok(())
}

impl State {
    /// The log entries of the last commit, in order (`batch_log`, then `last_log`).
    pub fn last_commit_log(&self) -> Vec<LogEntry> {
        self.batch_log.iter().cloned().chain(self.last_log.clone()).collect()
    }
}

fn parse_last_log(meta: &HashMap<String, String>, file: &Path) -> Result<Option<LogEntry>> {
    meta.get("last_log").map(|l| LogEntry::from_line(l)).transpose().with_context(|| {
        format!("{}: corrupt checkpoint (metadata `last_log` is not a log entry)", file.display())
    })
}

/// The `__metadata__` of a safetensors file, read from its header only.
fn read_header_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).with_context(|| format!("{}: corrupt checkpoint header", path.display()))?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata()?.len();
    if n > size.saturating_sub(8) || n > 100 << 20 {
        bail!("{}: corrupt checkpoint header", path.display());
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).with_context(|| format!("{}: corrupt checkpoint header", path.display()))?;
    #[derive(Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: HashMap<String, String>,
    }
    let h: Header = serde_json::from_slice(&header)
        .with_context(|| format!("{}: corrupt checkpoint header", path.display()))?;
    Ok(h.metadata)
}

fn read_safetensors(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    check_safetensors(path).context("corrupt checkpoint")?;
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{}: corrupt checkpoint header", path.display()))?;
    let m = meta.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("{}: corrupt checkpoint tensors", path.display()))?;
    Ok((tensors, m))
}

/// Writes a safetensors file atomically; returns its size.
fn write_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    meta: HashMap<String, String>,
) -> Result<u64> {
    atomic_write_with(path, |p| {
        safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta), p)
            .map_err(anyhow::Error::from)
    })?;
    Ok(std::fs::metadata(path).with_context(|| format!("{}: cannot stat", path.display()))?.len())
}

impl RunDir {
    /// Opens the run directory to edit it, creating it if needed, and takes its exclusive lock
    /// (held while the value lives). A path that cannot hold a run (a file, a directory that is
    /// neither empty nor a run) or a run another process is editing is an [`InputError`], with
    /// nothing written ([`guard::check_run_path`]).
    pub fn create(path: &Path) -> Result<Self> {
        guard::check_run_path(path)?;
        std::fs::create_dir_all(path.join("updates"))
            .with_context(|| format!("{}: cannot create run directory", path.display()))?;
        let lock = guard::lock_run_dir(path)?;
        Ok(Self { path: path.to_path_buf(), _lock: Some(lock) })
    }

    /// A handle to read what `path` may hold (no check, no lock): e.g. [`RunDir::committed`] of a
    /// run directory that may not exist yet.
    pub fn peek(path: &Path) -> Self {
        Self { path: path.to_path_buf(), _lock: None }
    }

    /// Opens an existing run directory to read it (no lock: a run can be read while it edits).
    pub fn open(path: &Path) -> Result<Self> {
        if !path.join("manifest.json").is_file() {
            bail!("{}: not an oedit run directory (no manifest.json)", path.display());
        }
        Ok(Self { path: path.to_path_buf(), _lock: None })
    }

    fn manifest_path(&self) -> PathBuf {
        self.path.join("manifest.json")
    }
    fn state_path(&self) -> PathBuf {
        self.path.join("subspace.safetensors")
    }
    fn chunk_path(&self, chunk: usize) -> PathBuf {
        self.path.join("updates").join(format!("chunk-{chunk:05}.safetensors"))
    }
    /// Path of log.jsonl.
    pub fn log_path(&self) -> PathBuf {
        self.path.join("log.jsonl")
    }
    /// Path of rejected.jsonl.
    pub fn rejected_path(&self) -> PathBuf {
        self.path.join("rejected.jsonl")
    }

    /// Reads manifest.json, if present.
    pub fn read_manifest(&self) -> Result<Option<Manifest>> {
        let p = self.manifest_path();
        if !p.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        let m: Manifest =
            serde_json::from_str(&text).with_context(|| format!("{}: corrupt run manifest", p.display()))?;
        crate::edit::templates::check_templates(&m.templates)
            .map_err(|e| anyhow::anyhow!("{}: corrupt run manifest: field `templates`: {e}", p.display()))?;
        Ok(Some(m))
    }

    /// Fails when the directory no longer holds its manifest (moved or deleted while the run was
    /// going), so that a commit never starts a partial run where the run used to be.
    fn check_still_in_place(&self) -> Result<()> {
        if !self.manifest_path().is_file() {
            bail!(
                "{}: the run directory was moved or deleted while editing (no manifest.json); \
                 this edit was not written, the edits committed before it are wherever the directory went",
                self.path.display()
            );
        }
        Ok(())
    }

    /// Writes manifest.json.
    pub fn write_manifest(&self, m: &Manifest) -> Result<()> {
        atomic_write(&self.manifest_path(), serde_json::to_string_pretty(m)?.as_bytes())
    }

    /// Reads the committed state (an empty state when no edit was committed yet).
    pub fn read_state(&self, key_dim: usize) -> Result<State> {
        let path = self.state_path();
        let mut state = State::new();
        if !path.exists() {
            return Ok(state);
        }
        let (tensors, meta) = read_safetensors(&path)?;
        state.n_edits = meta_usize(&meta, "n_edits", &path)?;
        state.last_line = meta_usize(&meta, "last_line", &path)?;
        state.last_log = parse_last_log(&meta, &path)?;
        state.batch_log = parse_batch_log(&meta, &path)?;
        match meta.get("format").map(String::as_str) {
            None | Some("1") => self.read_state_v1(state, &path, tensors, meta, key_dim),
            Some("2") => self.read_state_v2(state, &path, meta, key_dim),
            Some(v) => bail!(
                "{}: checkpoint format {v} is newer than this oedit reads (1 and 2); use a newer oedit",
                path.display()
            ),
        }
    }

    fn edit_path(&self, edit: usize) -> PathBuf {
        self.path.join("updates").join(format!("edit-{edit:08}.safetensors"))
    }

    fn read_state_v2(
        &self,
        mut state: State,
        path: &Path,
        meta: HashMap<String, String>,
        key_dim: usize,
    ) -> Result<State> {
        let n_updates = meta_usize(&meta, "n_updates", path)?;
        let want_chain = meta
            .get("chain")
            .and_then(|c| u64::from_str_radix(c, 16).ok())
            .with_context(|| format!("{}: corrupt checkpoint (metadata `chain` missing)", path.display()))?;
        let mut h = Fnv::new();
        hash_counters(&mut h, state.n_edits, state.last_line, n_updates);
        h.write(&want_chain.to_le_bytes());
        if meta.get("hash") != Some(&format!("{:016x}", h.finish())) {
            bail!("{}: corrupt checkpoint (content hash mismatch)", path.display());
        }
        let mut chain = 0u64;
        let mut layers: HashMap<usize, journal::Rebuild> = HashMap::new();
        let mut edit = 0;
        while edit < state.n_edits {
            let (file, records) = self.committed_records(edit, state.n_edits, key_dim)?;
            for (rec, hash) in records {
                for c in &rec.changes {
                    layers
                        .entry(c.layer as usize)
                        .or_default()
                        .apply(c, key_dim)
                        .with_context(|| format!("{}: corrupt checkpoint", file.display()))?;
                }
                state.updates.extend(rec.updates);
                state.edit_ends.push(state.updates.len());
                chain = journal::chain(chain, hash);
                edit += 1;
            }
        }
        if chain != want_chain {
            bail!(
                "{}: corrupt checkpoint (the edit records in {} are not the committed ones)",
                path.display(),
                self.path.join("updates").display()
            );
        }
        if state.updates.len() != n_updates {
            bail!(
                "{}: corrupt checkpoint (it records {n_updates} updates, the edit records hold {})",
                path.display(),
                state.updates.len()
            );
        }
        for (l, r) in layers {
            let s = r.finish(key_dim);
            state.base.insert(l, s.ids().map(<[u64]>::to_vec).unwrap_or_default());
            state.subspaces.insert(l, s);
        }
        state.format = 2;
        state.chain = chain;
        state.persisted_edits = state.n_edits;
        state.persisted_updates = n_updates;
        Ok(state)
    }

    /// The committed records from edit `edit` on that one file holds (a full chunk's file, or
    /// the edit's own file before its chunk is full), below `n_edits`, with the file.
    ///
    /// A writer that fills the chunk after this reader read the commit point replaces the
    /// chunk's edit files with the chunk file; a missing edit file is then read from there, so
    /// `eval` and `export` run while `edit` goes on.
    fn committed_records(
        &self,
        edit: usize,
        n_edits: usize,
        key_dim: usize,
    ) -> Result<(PathBuf, Vec<(journal::EditRecord, u64)>)> {
        let chunk = edit / CHUNK;
        let chunk_file = self.chunk_path(chunk);
        let from_chunk = || -> Result<(PathBuf, Vec<(journal::EditRecord, u64)>)> {
            let mut records = self.read_records(&chunk_file, chunk * CHUNK, CHUNK, n_edits, key_dim)?;
            records.drain(..edit - chunk * CHUNK);
            Ok((chunk_file.clone(), records))
        };
        if n_edits >= (chunk + 1) * CHUNK {
            return from_chunk();
        }
        let single = self.edit_path(edit);
        match self.read_records(&single, edit, 1, n_edits, key_dim) {
            Ok(records) => Ok((single, records)),
            Err(_) if !single.is_file() && chunk_file.is_file() => from_chunk(),
            Err(e) => Err(e),
        }
    }

    /// Reads `count` records from `file` starting at edit `first`, the ones below `n_edits`.
    fn read_records(
        &self,
        file: &Path,
        first: usize,
        count: usize,
        n_edits: usize,
        key_dim: usize,
    ) -> Result<Vec<(journal::EditRecord, u64)>> {
        if !file.is_file() {
            bail!("{}: missing update file; the checkpoint records {n_edits} edits", file.display());
        }
        let (t, meta) = read_safetensors(file)?;
        let mut records = journal::decode(file, &t, &meta, first, key_dim)?;
        if records.len() != count {
            bail!("{}: corrupt checkpoint (it holds {} edits, not {count})", file.display(), records.len());
        }
        records.truncate(n_edits - first);
        Ok(records)
    }

    fn read_state_v1(
        &self,
        mut state: State,
        path: &Path,
        tensors: HashMap<String, Tensor>,
        meta: HashMap<String, String>,
        key_dim: usize,
    ) -> Result<State> {
        let path = path.to_path_buf();
        state.format = 1;
        let n_updates = meta_usize(&meta, "n_updates", &path)?;
        let mut h = Fnv::new();
        hash_counters(&mut h, state.n_edits, state.last_line, n_updates);
        let mut layers: Vec<usize> = tensors
            .keys()
            .filter_map(|k| k.strip_prefix("layer")?.strip_suffix(".basis")?.parse().ok())
            .collect();
        layers.sort_unstable();
        for l in layers {
            let b = &tensors[&format!("layer{l}.basis")];
            let e = tensors.get(&format!("layer{l}.energy")).with_context(|| {
                format!("{}: corrupt checkpoint (no energy for layer {l})", path.display())
            })?;
            let (m, f) = b.dims2()?;
            if f != key_dim {
                bail!(
                    "{}: basis of layer {l} has width {f}, the model's keys have {key_dim}",
                    path.display()
                );
            }
            let flat: Vec<f64> = b.flatten_all()?.to_vec1()?;
            let energy: Vec<f64> = e.to_vec1()?;
            hash_f64(&mut h, &flat);
            hash_f64(&mut h, &energy);
            let rows = flat.chunks(f).map(|c| c.to_vec()).collect::<Vec<_>>();
            if rows.len() != m || energy.len() != m {
                bail!("{}: corrupt checkpoint (layer {l} sizes disagree)", path.display());
            }
            state.subspaces.insert(l, Subspace::from_parts(f, rows, energy));
        }
        let want =
            meta.get("hash").with_context(|| format!("{}: corrupt checkpoint (no hash)", path.display()))?;
        if *want != format!("{:016x}", h.finish()) {
            bail!("{}: corrupt checkpoint (content hash mismatch)", path.display());
        }
        state.updates = self.read_updates(n_updates)?;
        state.persisted_updates = n_updates;
        state.persisted_edits = state.n_edits;
        Ok(state)
    }

    fn read_updates(&self, n: usize) -> Result<Vec<AppliedUpdate>> {
        let mut out = Vec::with_capacity(n);
        let mut chunk = 0;
        while out.len() < n {
            let path = self.chunk_path(chunk);
            if !path.is_file() {
                bail!("{}: missing update file; the checkpoint records {n} updates", path.display());
            }
            let (t, meta) = read_safetensors(&path)?;
            let get = |k: &str| {
                t.get(k).with_context(|| format!("{}: corrupt checkpoint (no `{k}`)", path.display()))
            };
            let r: Vec<Vec<f32>> = get("r")?.to_vec2()?;
            let u: Vec<Vec<f32>> = get("u")?.to_vec2()?;
            let keys: Vec<Vec<f32>> = get("key")?.to_vec2()?;
            let layers: Vec<u32> = get("layer")?.to_vec1()?;
            if r.len() != u.len() || r.len() != layers.len() || r.len() != keys.len() {
                bail!("{}: corrupt checkpoint (tensor sizes disagree)", path.display());
            }
            let mut h = Fnv::new();
            for (((a, b), k), l) in r.iter().zip(&u).zip(&keys).zip(&layers) {
                hash_update(&mut h, a, b, k, *l);
            }
            if meta.get("hash") != Some(&format!("{:016x}", h.finish())) {
                bail!("{}: corrupt checkpoint (content hash mismatch)", path.display());
            }
            for (((r, u), key), l) in r.into_iter().zip(u).zip(keys).zip(layers) {
                if out.len() == n {
                    break;
                }
                out.push(AppliedUpdate { layer: l as usize, r, u, key });
            }
            chunk += 1;
        }
        Ok(out)
    }

    /// Commits the state after an edit (or after rejected lines only): writes what the edit
    /// added (format 2: its record; format 1: the unfinished factor chunk and the whole basis),
    /// then the commit point. `live` are the rule's subspaces after the edit.
    pub fn commit(&self, state: &mut State, live: &[(usize, &Subspace)]) -> Result<CommitStats> {
        self.check_still_in_place()?;
        if state.format == 1 {
            return self.commit_v1(state, live);
        }
        let new_edits = state.n_edits - state.persisted_edits;
        // Updates per new edit: as pushed (a batch), or all of them for a single edit.
        let counts = if state.pending.len() == new_edits {
            state.pending.clone()
        } else if new_edits <= 1 {
            vec![state.updates.len() - state.persisted_updates; new_edits]
        } else {
            bail!("internal error: {new_edits} edits to commit without their update counts");
        };
        if counts.iter().sum::<usize>() != state.updates.len() - state.persisted_updates {
            bail!("internal error: the uncommitted updates do not match their edits");
        }
        std::fs::create_dir_all(self.path.join("updates"))
            .with_context(|| format!("{}: cannot create", self.path.join("updates").display()))?;
        let mut bytes = 0;
        let mut chain = state.chain;
        let mut base = HashMap::new();
        let mut packed = Vec::new();
        let mut next_update = state.persisted_updates;
        for (j, &count) in counts.iter().enumerate() {
            let edit = state.persisted_edits + j;
            // The basis changes of a commit are those of its last edit's record (a batch appends
            // its keys together, after its joint update).
            let mut changes = Vec::new();
            let key_dim = live.first().map(|(_, s)| s.basis.dim());
            if j + 1 == new_edits {
                let mut layers: Vec<&(usize, &Subspace)> = live.iter().collect();
                layers.sort_by_key(|(l, _)| *l);
                for (l, s) in layers {
                    let empty = Vec::new();
                    let (change, ids) = journal::diff(*l, state.base.get(l).unwrap_or(&empty), s);
                    changes.extend(change);
                    base.insert(*l, ids);
                }
            }
            let updates = state.updates[next_update..next_update + count].to_vec();
            next_update += count;
            let key_dim = key_dim.or(updates.first().map(|u| u.u.len())).unwrap_or(0);
            let rec = journal::EditRecord { updates, changes };
            chain = journal::chain(chain, rec.hash());
            let (t, meta) = journal::encode(edit, std::slice::from_ref(&rec), key_dim)?;
            bytes += write_safetensors(&self.edit_path(edit), &t, meta)?;
            if (edit + 1).is_multiple_of(CHUNK) {
                let chunk = edit / CHUNK;
                let first = chunk * CHUNK;
                let mut records = Vec::with_capacity(CHUNK);
                for e in first..edit {
                    let recs = self.read_records(&self.edit_path(e), e, 1, e + 1, key_dim)?;
                    records.extend(recs.into_iter().map(|(r, _)| r));
                }
                records.push(rec);
                let (t, meta) = journal::encode(first, &records, key_dim)?;
                bytes += write_safetensors(&self.chunk_path(chunk), &t, meta)?;
                packed.push(first..edit + 1);
            }
        }
        bytes += self.write_state_v2(state, chain)?;
        for e in packed.into_iter().flatten() {
            let _ = std::fs::remove_file(self.edit_path(e));
        }
        state.chain = chain;
        state.pending.clear();
        state.base.extend(base);
        state.persisted_updates = state.updates.len();
        state.persisted_edits = state.n_edits;
        Ok(CommitStats { bytes_written: bytes })
    }

    fn write_state_v2(&self, state: &State, chain: u64) -> Result<u64> {
        let mut h = Fnv::new();
        hash_counters(&mut h, state.n_edits, state.last_line, state.updates.len());
        h.write(&chain.to_le_bytes());
        let mut meta = HashMap::from([
            ("format".to_string(), "2".to_string()),
            ("n_edits".to_string(), state.n_edits.to_string()),
            ("last_line".to_string(), state.last_line.to_string()),
            ("n_updates".to_string(), state.updates.len().to_string()),
            ("chain".to_string(), format!("{chain:016x}")),
            ("hash".to_string(), format!("{:016x}", h.finish())),
        ]);
        put_logs(&mut meta, state)?;
        // safetensors needs at least one tensor to carry metadata portably.
        let tensors = HashMap::from([("empty".to_string(), Tensor::zeros(1, DType::F32, &Device::Cpu)?)]);
        write_safetensors(&self.state_path(), &tensors, meta)
    }

    /// Deletes per-edit record files that a complete chunk holds (left by a crash between a
    /// chunk's commit and their deletion) or that no commit covers.
    pub fn tidy(&self, state: &State) {
        if state.format != 2 {
            return;
        }
        let Ok(dir) = std::fs::read_dir(self.path.join("updates")) else { return };
        let packed = state.n_edits / CHUNK * CHUNK;
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(n) = name.strip_prefix("edit-").and_then(|n| n.strip_suffix(".safetensors")) else {
                continue;
            };
            if n.parse::<usize>().is_ok_and(|n| n < packed || n >= state.n_edits) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    fn commit_v1(&self, state: &mut State, live: &[(usize, &Subspace)]) -> Result<CommitStats> {
        for (l, s) in live {
            if !s.is_empty() {
                state.subspaces.insert(*l, (*s).clone());
            }
        }
        let mut bytes = 0;
        let n = state.updates.len();
        if n > state.persisted_updates {
            for chunk in state.persisted_updates / CHUNK..=(n - 1) / CHUNK {
                bytes +=
                    self.write_chunk(chunk, &state.updates[chunk * CHUNK..n.min((chunk + 1) * CHUNK)])?;
            }
        }
        bytes += self.write_state(state)?;
        state.persisted_updates = n;
        state.persisted_edits = state.n_edits;
        state.pending.clear();
        Ok(CommitStats { bytes_written: bytes })
    }

    fn write_chunk(&self, chunk: usize, items: &[AppliedUpdate]) -> Result<u64> {
        let (d, f) = (items[0].r.len(), items[0].u.len());
        let mut h = Fnv::new();
        let (mut r, mut u, mut k) = (Vec::new(), Vec::new(), Vec::new());
        for it in items {
            if it.r.len() != d || it.u.len() != f || it.key.len() != f {
                bail!("updates of different shapes cannot share a checkpoint chunk");
            }
            hash_update(&mut h, &it.r, &it.u, &it.key, it.layer as u32);
            r.extend_from_slice(&it.r);
            u.extend_from_slice(&it.u);
            k.extend_from_slice(&it.key);
        }
        let layers: Vec<u32> = items.iter().map(|i| i.layer as u32).collect();
        let n = items.len();
        let tensors = HashMap::from([
            ("r".to_string(), Tensor::from_vec(r, (n, d), &Device::Cpu)?),
            ("u".to_string(), Tensor::from_vec(u, (n, f), &Device::Cpu)?),
            ("key".to_string(), Tensor::from_vec(k, (n, f), &Device::Cpu)?),
            ("layer".to_string(), Tensor::from_vec(layers, n, &Device::Cpu)?),
        ]);
        let meta = HashMap::from([("hash".to_string(), format!("{:016x}", h.finish()))]);
        write_safetensors(&self.chunk_path(chunk), &tensors, meta)
    }

    fn write_state(&self, state: &State) -> Result<u64> {
        let mut tensors = HashMap::new();
        let mut h = Fnv::new();
        hash_counters(&mut h, state.n_edits, state.last_line, state.updates.len());
        let mut layers: Vec<&usize> = state.subspaces.keys().collect();
        layers.sort_unstable();
        for l in layers {
            let s = &state.subspaces[l];
            if s.is_empty() {
                continue;
            }
            let flat: Vec<f64> = s.basis.rows().iter().flatten().copied().collect();
            hash_f64(&mut h, &flat);
            hash_f64(&mut h, &s.energy);
            tensors.insert(
                format!("layer{l}.basis"),
                Tensor::from_vec(flat, (s.len(), s.basis.dim()), &Device::Cpu)?,
            );
            tensors.insert(
                format!("layer{l}.energy"),
                Tensor::from_vec(s.energy.clone(), s.len(), &Device::Cpu)?,
            );
        }
        let mut meta = HashMap::from([
            ("n_edits".to_string(), state.n_edits.to_string()),
            ("last_line".to_string(), state.last_line.to_string()),
            ("n_updates".to_string(), state.updates.len().to_string()),
            ("hash".to_string(), format!("{:016x}", h.finish())),
        ]);
        put_logs(&mut meta, state)?;
        if tensors.is_empty() {
            // safetensors needs at least one tensor to carry metadata portably.
            tensors.insert("empty".to_string(), Tensor::zeros(1, DType::F32, &Device::Cpu)?);
        }
        write_safetensors(&self.state_path(), &tensors, meta)
    }

    /// Appends one line to a JSONL file of the run (fsynced).
    pub fn append_line(&self, path: &Path, line: &str) -> Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open for appending", path.display()))?;
        // One write of the whole line, so that a crash leaves at most one torn last line.
        let mut buf = String::with_capacity(line.len() + 1);
        buf.push_str(line);
        buf.push('\n');
        f.write_all(buf.as_bytes()).with_context(|| format!("{}: cannot append", path.display()))?;
        f.sync_data()?;
        Ok(())
    }

    /// Reads `log.jsonl` (see [`log::read_jsonl`] for the error policy).
    pub fn read_log(&self) -> Result<Vec<LogEntry>> {
        read_log(&self.log_path())
    }

    /// What the run has committed, from the checkpoint's header and the log, without loading
    /// tensors or a model; None when the directory holds no run yet. Errors only for a damaged
    /// checkpoint header or log.
    pub fn committed(&self) -> Result<Option<Committed>> {
        let path = self.state_path();
        if !path.is_file() {
            return Ok(None);
        }
        let meta = read_header_metadata(&path)?;
        let n_edits = meta_usize(&meta, "n_edits", &path)?;
        let last_line = meta_usize(&meta, "last_line", &path)?;
        let tail: Vec<LogEntry> =
            parse_batch_log(&meta, &path)?.into_iter().chain(parse_last_log(&meta, &path)?).collect();
        let log = log::committed(log::read_jsonl(&self.log_path())?, n_edits, &tail);
        Ok(Some(Committed { n_edits, last_line, log: log.into_iter().map(|(e, _)| e).collect() }))
    }

    /// Makes log.jsonl and rejected.jsonl agree with the committed state: drops lines written
    /// after the last commit (and a torn last line, see [`log::read_jsonl`]), restores the last
    /// committed log line if it is missing, and returns the committed log entries. A line that
    /// does not parse (other than a torn last one) is a corrupt-log error naming file and line.
    pub fn reconcile(&self, state: &State) -> Result<Vec<LogEntry>> {
        let log = log::committed(log::read_jsonl(&self.log_path())?, state.n_edits, &state.last_commit_log());
        let text: String = log.iter().map(|(_, l)| format!("{l}\n")).collect();
        atomic_write(&self.log_path(), text.as_bytes())?;
        if self.rejected_path().is_file() {
            let rej = log::read_jsonl::<RejectedLine>(&self.rejected_path())?;
            let text: String = rej
                .items
                .iter()
                .zip(&rej.raw)
                .filter(|(r, _)| r.line <= state.last_line)
                .map(|(_, l)| format!("{l}\n"))
                .collect();
            atomic_write(&self.rejected_path(), text.as_bytes())?;
        }
        Ok(log.into_iter().map(|(e, _)| e).collect())
    }
}

/// Replays the committed updates on the base model (same ops as the live run: identical bytes).
pub fn replay(model: &mut Llama, updates: &[AppliedUpdate]) -> Result<()> {
    for up in updates {
        if up.layer >= model.num_layers() {
            bail!("checkpoint edits layer {}, the model has {}", up.layer, model.num_layers());
        }
        apply_rank_one(model, up.layer, &up.r, &up.u)?;
    }
    Ok(())
}
