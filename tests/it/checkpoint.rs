//! The checkpoint of a run directory: what a commit writes stays O(f) bytes per edit however
//! many edits came before, the run records its model dtype and refuses another one, and a run
//! written by the format-1 layout (whole basis in `subspace.safetensors`) still resumes.

use std::path::{Path, PathBuf};
use std::process::Command;

use oedit::edit::subspace::Subspace;
use oedit::run::{RunDir, State};
use tempfile::TempDir;

use crate::common::*;

struct Fx {
    tmp: TempDir,
    model: PathBuf,
    hparams: PathBuf,
    edits: PathBuf,
    cache: PathBuf,
}

impl Fx {
    fn new(n: usize) -> Self {
        let tmp = TempDir::new().unwrap();
        let model = tiny_model(&tmp.path().join("model"), TinyOpts::default());
        let hparams = write_json(&tmp.path().join("hparams.json"), &tiny_hparams());
        let edits =
            write_lines(&tmp.path().join("edits.jsonl"), &sample_lines("counterfact-sample.jsonl", n));
        let cache = tmp.path().join("cache");
        Self { tmp, model, hparams, edits, cache }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn edit(&self, run_dir: &Path, args: &[&str]) -> Command {
        let mut c = edit_cmd(&self.model, &self.hparams, &self.edits, run_dir, &self.cache);
        c.args(args);
        c
    }

    fn eval(&self, run_dir: &Path, args: &[&str]) -> Command {
        let mut c = oedit_cmd();
        c.env("OEDIT_CACHE", &self.cache).args(["--threads", "1", "eval", "--model"]).arg(&self.model);
        c.arg("--edits").arg(&self.edits).arg("--run").arg(run_dir);
        c.args(["--metrics", "efficacy"]).arg("--json").arg(self.path("eval.json")).args(args);
        c
    }

    fn export(&self, run_dir: &Path, out: &str, args: &[&str]) -> Command {
        let mut c = oedit_cmd();
        c.args(["--threads", "1", "export", "--run"]).arg(run_dir).arg("--out").arg(self.path(out));
        c.args(args);
        c
    }
}

/// The committed checkpoint, without timings: the record files, the rebuilt basis as bits and
/// the commit point's counters and hashes.
type Checkpoint = (Vec<(String, Vec<u8>)>, Vec<u64>, Vec<Option<String>>);

fn checkpoint(run_dir: &Path) -> Checkpoint {
    let (rows, energy) = run_basis(run_dir, 1).unwrap();
    let bits = rows.iter().flatten().chain(&energy).map(|x| x.to_bits()).collect();
    let meta = read_st_metadata(&run_dir.join("subspace.safetensors"));
    let meta = ["format", "n_edits", "last_line", "n_updates", "chain", "hash"]
        .iter()
        .map(|k| meta.get(*k).cloned())
        .collect();
    (update_files(run_dir), bits, meta)
}

fn manifest(run_dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run_dir.join("manifest.json")).unwrap()).unwrap()
}

fn assert_input_error(o: &std::process::Output, words: &[&str]) {
    let line = assert_clean_failure(o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    for w in words {
        assert!(line.contains(w), "`{w}` not in: {line}");
    }
}

#[test]
fn bytes_written_per_edit_do_not_grow_with_the_number_of_edits() {
    let n = 40;
    let fx = Fx::new(n);
    let dir = fx.path("run");
    assert_ok(&run(fx.edit(&dir, &[])));
    let log = read_jsonl(&dir.join("log.jsonl"));
    assert_eq!(log.len(), n);
    let bytes: Vec<u64> = log.iter().map(|e| e["phases"]["checkpoint_bytes"].as_u64().unwrap()).collect();
    let basis: Vec<u64> = log.iter().map(|e| e["basis_size"].as_u64().unwrap()).collect();
    assert!(basis[n - 1] >= 4 * basis[1].max(1), "the basis did not grow: {basis:?}");
    // Commit 2 and commit 40 write about the same: the edit's factors, the row it appended and
    // the commit point (what format 1 wrote grew with the basis and the open chunk).
    assert!(bytes[n - 1] <= 2 * bytes[1], "checkpoint bytes grew: {bytes:?}");
    assert!(bytes.iter().all(|&b| b > 0));
    // Between the two, files are only added (one per edit) and the commit point replaced.
    let names: Vec<String> = update_files(&dir).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, (0..n).map(|i| format!("edit-{i:08}.safetensors")).collect::<Vec<_>>());
    assert_eq!(manifest(&dir)["format_version"], 2);
}

#[test]
fn a_bf16_run_records_its_dtype_resumes_to_the_same_bytes_and_refuses_another() {
    let fx = Fx::new(6);
    let reference = fx.path("reference");
    assert_ok(&run(fx.edit(&reference, &["--dtype", "bf16"])));
    assert_eq!(manifest(&reference)["dtype"], "bf16");

    let stopped = fx.path("stopped");
    assert_ok(&run(fx.edit(&stopped, &["--dtype", "bf16", "--limit", "3"])));
    // Resuming in another dtype (or the default f32) is bad input naming both.
    let before = checkpoint(&stopped);
    assert_input_error(&run(fx.edit(&stopped, &["--dtype", "f32"])), &["bf16", "f32"]);
    assert_input_error(&run(fx.edit(&stopped, &[])), &["bf16", "f32"]);
    assert!(checkpoint(&stopped) == before, "a refused resume changed the checkpoint");
    let o = run(fx.edit(&stopped, &["--dtype", "bf16"]));
    assert_ok(&o);
    assert_eq!(edit_summary(&o)["resumed_from"], 3);
    assert!(checkpoint(&stopped) == checkpoint(&reference), "the resumed bf16 run differs");

    // eval and export load the run's dtype by default and refuse another.
    assert_ok(&run(fx.eval(&stopped, &[])));
    assert_input_error(&run(fx.eval(&stopped, &["--dtype", "f32"])), &["--dtype f32", "bf16"]);
    assert_ok(&run(fx.eval(&stopped, &["--dtype", "bf16"])));
    assert_input_error(&run(fx.export(&stopped, "never", &["--dtype", "f16"])), &["--dtype f16", "bf16"]);
    assert!(!fx.path("never").exists());
    assert_ok(&run(fx.export(&reference, "a", &[])));
    assert_ok(&run(fx.export(&stopped, "b", &[])));
    let read = |d: &str| std::fs::read(fx.path(d).join("model.safetensors")).unwrap();
    assert!(read("a") == read("b"), "exported weights differ");
}

/// Rewrites a format-2 run directory as format 1 wrote it: every factor in `updates/chunk-NNNNN`
/// by update index, the whole basis in `subspace.safetensors`, no `dtype` in the manifest.
fn downgrade_to_format_1(dir: &Path) {
    let rd = RunDir::open(dir).unwrap();
    let v2 = rd.read_state(INTERMEDIATE).unwrap();
    for (name, _) in update_files(dir) {
        std::fs::remove_file(dir.join("updates").join(name)).unwrap();
    }
    std::fs::remove_file(dir.join("subspace.safetensors")).unwrap();
    let mut v1 = State::new();
    v1.format = 1;
    v1.n_edits = v2.n_edits;
    v1.last_line = v2.last_line;
    v1.updates = v2.updates.clone();
    v1.last_log = v2.last_log.clone();
    let live: Vec<(usize, &Subspace)> = v2.subspaces.iter().map(|(l, s)| (*l, s)).collect();
    rd.commit(&mut v1, &live).unwrap();
    let mut m = manifest(dir);
    m["format_version"] = 1.into();
    m.as_object_mut().unwrap().remove("dtype");
    write_json(&dir.join("manifest.json"), &m);
}

#[test]
fn a_format_1_run_resumes_in_format_1_to_the_same_result() {
    let fx = Fx::new(6);
    let reference = fx.path("reference");
    assert_ok(&run(fx.edit(&reference, &[])));

    let old = fx.path("old");
    assert_ok(&run(fx.edit(&old, &["--limit", "3"])));
    downgrade_to_format_1(&old);
    let meta = read_st_metadata(&old.join("subspace.safetensors"));
    assert!(!meta.contains_key("format") && meta["n_edits"] == "3");
    let o = run(fx.edit(&old, &[]));
    assert_ok(&o);
    assert_eq!(edit_summary(&o)["resumed_from"], 3);
    // Still format 1: one factor chunk by update index, the basis in the commit point.
    let names: Vec<String> = update_files(&old).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["chunk-00000.safetensors"]);
    assert!(read_tensors(&old.join("subspace.safetensors")).contains_key("layer1.basis"));
    assert_eq!(manifest(&old)["format_version"], 1);
    // The same edits, basis and weights as the format-2 run.
    let (a, b) = (run_basis(&reference, 1).unwrap(), run_basis(&old, 1).unwrap());
    let bits = |(rows, e): &(Vec<Vec<f64>>, Vec<f64>)| -> Vec<u64> {
        rows.iter().flatten().chain(e).map(|x| x.to_bits()).collect()
    };
    assert!(bits(&a) == bits(&b), "the format-1 run's basis differs");
    let (ua, ub) = (run_updates(&reference), run_updates(&old));
    for k in ["r", "u", "key"] {
        let (x, y) = (rows_f64(&ua[k]), rows_f64(&ub[k]));
        assert!(x == y, "{k} differs");
    }
    assert_ok(&run(fx.export(&reference, "a", &[])));
    assert_ok(&run(fx.export(&old, "b", &[])));
    let read = |d: &str| std::fs::read(fx.path(d).join("model.safetensors")).unwrap();
    assert!(read("a") == read("b"), "exported weights differ");
    // eval reads it (as f32: the manifest has no dtype).
    assert_ok(&run(fx.eval(&old, &[])));
}

#[test]
fn a_commit_after_the_run_directory_moved_fails_and_recreates_nothing() {
    let fx = Fx::new(2);
    let dir = fx.path("run");
    assert_ok(&run(fx.edit(&dir, &[])));
    let rd = RunDir::open(&dir).unwrap();
    let mut state = rd.read_state(INTERMEDIATE).unwrap();
    let live: Vec<(usize, &Subspace)> = Vec::new();
    let before = checkpoint(&dir);

    // Moved away while an edit is going: its commit must not start a partial run in its place.
    let moved = fx.path("moved");
    std::fs::rename(&dir, &moved).unwrap();
    let err = format!("{:#}", rd.commit(&mut state, &live).unwrap_err());
    assert!(err.contains("moved or deleted"), "{err}");
    assert!(!dir.exists(), "the commit recreated {}", dir.display());
    assert!(checkpoint(&moved) == before, "the moved run changed");
    // Where it went, the run resumes.
    let o = run(fx.edit(&moved, &[]));
    assert_ok(&o);
    assert_eq!(edit_summary(&o)["resumed_from"], 2);
}
