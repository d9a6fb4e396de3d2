//! Crash safety of `oedit edit`: a run killed mid-edit resumes to exactly the result of an
//! uninterrupted run, and a damaged checkpoint is refused instead of silently used.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::common::*;

const N: usize = 8;

/// Slow enough edits (30 steps each, no early stop) to kill the process between them.
fn slow_hparams() -> serde_json::Value {
    let mut hp = tiny_hparams();
    hp["v_steps"] = serde_json::json!(30);
    hp["stop_loss"] = serde_json::json!(0.0);
    hp
}

struct Fx {
    tmp: TempDir,
    model: PathBuf,
    hparams: PathBuf,
    edits: PathBuf,
    cache: PathBuf,
}

impl Fx {
    fn new(hp: serde_json::Value, n: usize) -> Self {
        let tmp = TempDir::new().unwrap();
        let model = tiny_model(&tmp.path().join("model"), TinyOpts::default());
        let hparams = write_json(&tmp.path().join("hparams.json"), &hp);
        let edits = write_lines(&tmp.path().join("edits.jsonl"), &minimal_lines(n));
        let cache = tmp.path().join("cache");
        Self { tmp, model, hparams, edits, cache }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn cmd(&self, run_dir: &Path) -> Command {
        edit_cmd(&self.model, &self.hparams, &self.edits, run_dir, &self.cache)
    }
}

fn log_lines(run_dir: &Path) -> usize {
    std::fs::read_to_string(run_dir.join("log.jsonl")).map(|t| t.lines().count()).unwrap_or(0)
}

/// Starts the edit run and SIGKILLs it once log.jsonl has at least `at` lines; returns the
/// number of logged edits after the kill.
fn kill_after(fx: &Fx, run_dir: &Path, at: usize) -> usize {
    let mut child = fx.cmd(run_dir).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while log_lines(run_dir) < at {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before it had {at} edits");
        }
        assert!(Instant::now() < deadline, "no progress within 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run finished before it was killed");
    let n = log_lines(run_dir);
    assert!(n < N, "the run completed all {N} edits before the kill; make the edits slower");
    n
}

/// The log lines without their timings and memory readings.
fn log_without_timings(run_dir: &Path) -> Vec<serde_json::Value> {
    read_jsonl(&run_dir.join("log.jsonl"))
        .into_iter()
        .map(|mut v| {
            let o = v.as_object_mut().unwrap();
            o.remove("seconds");
            o.remove("phases");
            o.remove("peak_rss_mb");
            v
        })
        .collect()
}

#[test]
fn killed_run_resumes_to_the_uninterrupted_result() {
    let fx = Fx::new(slow_hparams(), N);
    let reference = fx.path("reference");
    let o = run(fx.cmd(&reference));
    assert_ok(&o);
    assert_eq!(edit_summary(&o)["edits_total"], N);

    let killed = fx.path("killed");
    let first = kill_after(&fx, &killed, 2);
    // Kill the resumed run too, further on.
    let second = kill_after(&fx, &killed, first + 2);
    assert!(second >= first + 2);
    let o = run(fx.cmd(&killed));
    assert_ok(&o);
    let s = edit_summary(&o);
    let resumed = s["resumed_from"].as_u64().unwrap() as usize;
    assert!(resumed >= second && resumed < N, "resumed from {resumed} after {second} logged edits");
    assert_eq!(s["edits_total"], N);
    assert_eq!(s["edits_this_session"].as_u64().unwrap() as usize, N - resumed);

    let log = read_jsonl(&killed.join("log.jsonl"));
    let idx: Vec<(u64, u64)> =
        log.iter().map(|e| (e["index"].as_u64().unwrap(), e["line"].as_u64().unwrap())).collect();
    assert_eq!(idx, (0..N as u64).map(|i| (i, i + 1)).collect::<Vec<_>>());
    assert_eq!(log_without_timings(&killed), log_without_timings(&reference));

    // The same checkpoint, byte for byte where it holds no timings.
    assert!(update_files(&killed) == update_files(&reference), "updates differ");
    let (a, b) = (reference.join("subspace.safetensors"), killed.join("subspace.safetensors"));
    let (ta, tb) = (read_tensors(&a), read_tensors(&b));
    assert_eq!(ta.len(), tb.len());
    for (name, x) in &ta {
        let f64s = |t: &candle_core::Tensor| -> Vec<f64> {
            t.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1().unwrap()
        };
        let (x, y) = (f64s(x), f64s(&tb[name]));
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{name} differs");
    }
    // The basis the records rebuild, bit for bit.
    let bits = |d: &Path| {
        let (rows, energy) = run_basis(d, 1).unwrap();
        let rows: Vec<u64> = rows.iter().flatten().map(|x| x.to_bits()).collect();
        (rows, energy.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
    };
    assert!(bits(&reference) == bits(&killed), "the rebuilt bases differ");
    let (ma, mb) = (read_st_metadata(&a), read_st_metadata(&b));
    for key in ["n_edits", "last_line", "chain", "hash"] {
        assert_eq!(ma.get(key), mb.get(key), "subspace metadata `{key}`");
    }
    assert_eq!(ma["n_edits"], N.to_string());
    // And the exported models are identical files.
    let ea = export_run(&reference, &fx.path("export-reference"));
    let eb = export_run(&killed, &fx.path("export-killed"));
    assert!(
        std::fs::read(ea.join("model.safetensors")).unwrap()
            == std::fs::read(eb.join("model.safetensors")).unwrap(),
        "exported weights differ"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// Byte range of tensor `name`'s data inside a safetensors file.
fn tensor_range(path: &Path, name: &str) -> std::ops::Range<usize> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let off = &header[name]["data_offsets"];
    let (a, b) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
    8 + n + a..8 + n + b
}

fn flip(path: &Path, at: usize, mask: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= mask;
    std::fs::write(path, bytes).unwrap();
}

/// Asserts that resuming, exporting and evaluating the damaged run all fail naming `file`.
fn assert_refused(fx: &Fx, run_dir: &Path, file: &Path, what: &str) {
    let log_before = std::fs::read(run_dir.join("log.jsonl")).unwrap();
    let o = run(fx.cmd(run_dir));
    let line = assert_clean_failure(&o);
    assert!(line.contains(file.to_str().unwrap()), "{what}: file not named: {line}");
    assert!(line.contains("corrupt") || line.contains("truncated"), "{what}: {line}");
    assert_eq!(std::fs::read(run_dir.join("log.jsonl")).unwrap(), log_before, "{what}: log changed");
    let mut c = oedit_cmd();
    c.args(["export", "--run"]).arg(run_dir).arg("--out").arg(fx.path("never"));
    let line = assert_clean_failure(&run(c));
    assert!(line.contains(file.to_str().unwrap()) && line.contains("corrupt"), "{what}: export: {line}");
    assert!(!fx.path("never").join("model.safetensors").exists());
}

#[test]
fn damaged_checkpoint_is_refused() {
    let fx = Fx::new(tiny_hparams(), 4);
    let good = fx.path("good");
    let mut c = fx.cmd(&good);
    c.args(["--limit", "3"]);
    assert_ok(&run(c));
    assert_eq!(log_lines(&good), 3);

    let mut case = 0;
    let mut fresh = || {
        case += 1;
        let d = fx.path(&format!("damaged-{case}"));
        copy_dir(&good, &d);
        d
    };

    // Truncated state file.
    let len = std::fs::metadata(good.join("subspace.safetensors")).unwrap().len() as usize;
    for keep in [len - 1, len - 100, len / 2, 4] {
        let d = fresh();
        let st = d.join("subspace.safetensors");
        let bytes = std::fs::read(&st).unwrap();
        std::fs::write(&st, &bytes[..keep]).unwrap();
        assert_refused(&fx, &d, &st, &format!("subspace.safetensors truncated to {keep} bytes"));
    }
    // Truncated edit record.
    let d = fresh();
    let ch = edit_file(&d, 0);
    let bytes = std::fs::read(&ch).unwrap();
    std::fs::write(&ch, &bytes[..bytes.len() - 8]).unwrap();
    assert_refused(&fx, &d, &ch, "truncated chunk");

    // One flipped bit or byte inside each tensor's data.
    for (i, name, offset, mask) in [
        (0, "r", 5, 0x10),
        (1, "u", 17, 0x01),
        (2, "u", 0, 0xff),
        (0, "layer", 0, 0x01),
        (2, "layer", 0, 0x02),
        (0, "rows", 3, 0x04),
        (0, "rows", 500, 0x04),
        (0, "energy", 7, 0x04),
        (1, "rows", 3, 0x04),
        (2, "n_updates", 0, 0x01),
    ] {
        let d = fresh();
        let ch = edit_file(&d, i);
        let range = tensor_range(&ch, name);
        assert!(offset < range.len());
        flip(&ch, range.start + offset, mask);
        assert_refused(&fx, &d, &ch, &format!("edit {i} tensor {name} byte {offset} ^ {mask:#x}"));
    }
    // A record replaced by another well-formed one is refused.
    let d = fresh();
    std::fs::copy(edit_file(&d, 1), edit_file(&d, 2)).unwrap();
    assert_refused(&fx, &d, &edit_file(&d, 2), "edit 2 replaced by edit 1");
    // A missing record.
    let d = fresh();
    std::fs::remove_file(edit_file(&d, 1)).unwrap();
    let o = run(fx.cmd(&d));
    let line = assert_clean_failure(&o);
    assert!(line.contains(edit_file(&d, 1).to_str().unwrap()) && line.contains("missing"), "{line}");

    // The undamaged copy still resumes.
    let o = run(fx.cmd(&good));
    assert_ok(&o);
    assert_eq!(edit_summary(&o)["resumed_from"], 3);
    assert_eq!(log_lines(&good), 4);
}
