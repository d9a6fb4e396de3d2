//! A run that crosses the 256-edit boundary of the update chunk files: stopped at the boundary
//! and resumed across it, it ends with the bytes of an uninterrupted run, `eval --at` on either
//! side of the boundary scores what the run scored when it stood there, and a reader whose
//! commit point predates the chunk file finds its records there.

use std::path::Path;

use oedit::run::CHUNK;
use serde_json::Value;

use crate::common::*;

const N: usize = CHUNK + 2;

fn eval_report(
    model: &Path,
    edits: &Path,
    run_dir: &Path,
    cache: &Path,
    out: &Path,
    at: Option<usize>,
) -> Value {
    let mut c = oedit_cmd();
    c.env("OEDIT_CACHE", cache).args(["--threads", "1", "eval", "--model"]).arg(model);
    c.arg("--edits").arg(edits).arg("--run").arg(run_dir).arg("--json").arg(out);
    c.args(["--per-record", "--metrics", "efficacy,generalization"]);
    if let Some(n) = at {
        c.args(["--at", &n.to_string()]);
    }
    assert_ok(&run(c));
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

/// The update chunk files by name, and the subspace checkpoint's tensors (as bits) and the
/// metadata that holds no timings.
type Checkpoint = (Vec<(String, Vec<u8>)>, Vec<(String, Vec<u64>)>, Vec<Option<String>>);

fn checkpoint(run_dir: &Path) -> Checkpoint {
    let mut chunks: Vec<_> =
        std::fs::read_dir(run_dir.join("updates")).unwrap().map(|e| e.unwrap().path()).collect();
    chunks.sort();
    let chunks = chunks
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    let st = run_dir.join("subspace.safetensors");
    let mut tensors: Vec<(String, Vec<u64>)> = read_tensors(&st)
        .into_iter()
        .map(|(name, t)| {
            let v: Vec<f64> =
                t.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1().unwrap();
            (name, v.iter().map(|x| x.to_bits()).collect())
        })
        .collect();
    tensors.sort();
    let meta = read_st_metadata(&st);
    let meta = ["n_edits", "last_line", "n_updates", "hash"].iter().map(|k| meta.get(*k).cloned()).collect();
    (chunks, tensors, meta)
}

#[test]
fn a_run_across_the_chunk_boundary_resumes_and_evaluates_on_both_sides() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"), TinyOpts::default());
    let hparams = write_json(&tmp.path().join("hparams.json"), &tiny_hparams());
    let edits = write_lines(&tmp.path().join("cf.jsonl"), &sample_lines("counterfact-sample.jsonl", N));
    let cache = tmp.path().join("cache");
    let edit_to = |dir: &Path, n: usize| {
        let mut c = edit_cmd(&model, &hparams, &edits, dir, &cache);
        c.args(["--limit", &n.to_string()]);
        assert_ok(&run(c));
    };

    let full = tmp.path().join("full");
    edit_to(&full, N);
    let reference = checkpoint(&full);
    let names: Vec<&str> = reference.0.iter().map(|(n, _)| n.as_str()).collect();
    // The first chunk is complete; the edits of the second are one file each until it is.
    assert_eq!(names, ["chunk-00000.safetensors", "edit-00000256.safetensors", "edit-00000257.safetensors"]);
    assert_eq!(reference.2[0].as_deref(), Some(N.to_string().as_str()));

    // Stopped one edit short of the boundary, with the first chunk exactly full, then one edit
    // into the second chunk, then on.
    let part = tmp.path().join("part");
    edit_to(&part, CHUNK - 1);
    // A reader that read the commit point there while the writer went on to fill the chunk:
    // the chunk's edit files it expects have been replaced by the chunk file.
    let stale = tmp.path().join("stale");
    std::fs::create_dir_all(stale.join("updates")).unwrap();
    for f in ["manifest.json", "subspace.safetensors", "log.jsonl"] {
        std::fs::copy(part.join(f), stale.join(f)).unwrap();
    }
    let mut at_stop = Vec::new();
    for (i, n) in [CHUNK, CHUNK + 1].into_iter().enumerate() {
        edit_to(&part, n);
        if n == CHUNK {
            let chunk = "chunk-00000.safetensors";
            std::fs::copy(part.join("updates").join(chunk), stale.join("updates").join(chunk)).unwrap();
        }
        let chunks = std::fs::read_dir(part.join("updates")).unwrap().count();
        assert_eq!(chunks, if n == CHUNK { 1 } else { 2 }, "after {n} edits");
        at_stop.push(eval_report(
            &model,
            &edits,
            &part,
            &cache,
            &tmp.path().join(format!("part{i}.json")),
            None,
        ));
    }
    edit_to(&part, N);
    let resumed = checkpoint(&part);
    assert!(resumed.0 == reference.0, "the resumed run's update chunks differ");
    assert!(resumed.1 == reference.1, "the resumed run's subspace differs");
    assert_eq!(resumed.2, reference.2, "the resumed run's checkpoint metadata differs");

    for (i, n) in [CHUNK, CHUNK + 1].into_iter().enumerate() {
        let at = eval_report(&model, &edits, &full, &cache, &tmp.path().join(format!("at{i}.json")), Some(n));
        assert_eq!(at["run"]["n_edits"], n);
        assert_eq!(at["records"]["evaluated"], n);
        assert_eq!(at["metrics"], at_stop[i]["metrics"], "--at {n}");
        assert_eq!(at["per_record"], at_stop[i]["per_record"], "--at {n}");
    }
    // The stale reader's view is the run as it stood after CHUNK - 1 edits.
    let at = eval_report(&model, &edits, &full, &cache, &tmp.path().join("at-short.json"), Some(CHUNK - 1));
    let seen = eval_report(&model, &edits, &stale, &cache, &tmp.path().join("stale.json"), None);
    assert_eq!(seen["run"]["n_edits"], CHUNK - 1);
    assert_eq!(seen["metrics"], at["metrics"]);
    assert_eq!(seen["per_record"], at["per_record"]);
    // The 257th edit changed the model: the first 256 records do not all score the same.
    let scores = |r: &Value| r["per_record"].as_array().unwrap()[..CHUNK].to_vec();
    assert_ne!(scores(&at_stop[0]), scores(&at_stop[1]));
}
