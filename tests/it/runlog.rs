//! The run's log as a typed file, and runs bound to their input: `LogEntry` round trips, a
//! corrupt log line named with its file and line, a torn last line dropped, resume and eval
//! refusing an edits file that is not the run's, and bad edit lines found before the model loads.

use std::path::Path;

use oedit::edit::landing::AttemptLog;
use oedit::eval::RecordScores;
use oedit::run::{LogEntry, Phases};

use crate::common::EditFx as Fx;
use crate::common::*;

fn log_lines(run_dir: &Path) -> Vec<serde_json::Value> {
    read_jsonl(&run_dir.join("log.jsonl"))
}

fn edited_lines(run_dir: &Path) -> Vec<u64> {
    log_lines(run_dir).iter().map(|e| e["line"].as_u64().unwrap()).collect()
}

/// A minimal-format line.
fn minimal(prompt: &str, subject: &str, target: &str) -> String {
    serde_json::json!({ "prompt": prompt, "subject": subject, "target": target }).to_string()
}

fn sample_entry() -> LogEntry {
    LogEntry {
        index: 3,
        line: 7,
        case_id: Some(12),
        subject: "Danielle Darrieux".into(),
        target_new: "English".into(),
        ground_truth: Some("French".into()),
        method: "oedit-plus".into(),
        layer: Some(5),
        layers: vec![5],
        seconds: 4.25,
        phases: Phases {
            key: 0.5,
            value: 3.5,
            update: 0.125,
            checkpoint: 0.0625,
            checkpoint_bytes: Some(4096),
        },
        steps: 17,
        loss_first: 6.5,
        loss_last: f64::NAN,
        basis_size: 4,
        update_norm: 1.5,
        retained: 0.75,
        p_target_before: 0.001,
        p_target_after: 0.9,
        target_wins: true,
        subspace_added: 1,
        subspace_compressed_away: 0,
        subspace_released: 2,
        attempts: 2,
        margin: Some(1.25),
        landing: vec![AttemptLog {
            steps: 4,
            loss_last: Some(0.5),
            gain: 2.0,
            retained: Some(0.5),
            update_norm: Some(3.0),
            p_target: Some(0.9),
            target_wins: true,
            margin: Some(1.25),
        }],
        peak_rss_mb: Some(1300.5),
        batch: None,
        eval: Some(RecordScores { efficacy: Some(1.0), locality_agreement: Some(0.5), ..Default::default() }),
    }
}

#[test]
fn log_entry_round_trips() {
    let e = sample_entry();
    let line = e.to_line();
    // JSON has no NaN: written as null, read back as NaN.
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(v["loss_last"].is_null(), "{line}");
    let back = LogEntry::from_line(&line).unwrap();
    assert!(back.loss_last.is_nan());
    assert_eq!(LogEntry { loss_last: 0.0, ..back.clone() }, LogEntry { loss_last: 0.0, ..e.clone() });
    assert_eq!(back.to_line(), line);
    // README's field names, no more and no fewer.
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = vec![
        "index",
        "line",
        "case_id",
        "subject",
        "target_new",
        "ground_truth",
        "method",
        "layer",
        "layers",
        "seconds",
        "phases",
        "steps",
        "loss_first",
        "loss_last",
        "basis_size",
        "update_norm",
        "retained",
        "p_target_before",
        "p_target_after",
        "target_wins",
        "subspace_added",
        "subspace_compressed_away",
        "subspace_released",
        "attempts",
        "margin",
        "landing",
        "peak_rss_mb",
        "eval",
    ];
    want.sort_unstable();
    assert_eq!(keys, want);
    // Without --eval-each there is no `eval` key.
    let plain = LogEntry { eval: None, ..e };
    assert!(serde_json::from_str::<serde_json::Value>(&plain.to_line()).unwrap().get("eval").is_none());

    // A line written before `ground_truth`, `layers`, `subspace_released` and `peak_rss_mb`
    // existed (keys sorted, as serde_json's json! wrote them) still reads.
    let old = r#"{"basis_size":1,"case_id":null,"index":0,"layer":1,"line":1,"loss_first":3.2,"loss_last":0.04,"method":"oedit","p_target_after":0.96,"p_target_before":0.01,"phases":{"checkpoint":0.001,"key":0.01,"update":0.002,"value":0.2},"retained":1.0,"seconds":0.25,"steps":6,"subject":"Bob","subspace_added":1,"subspace_compressed_away":0,"target_new":"piano","target_wins":true,"update_norm":0.7}"#;
    let o = LogEntry::from_line(old).unwrap();
    assert_eq!((o.index, o.line, o.subject.as_str(), o.layers.len(), o.ground_truth), (0, 1, "Bob", 0, None));
    // ... and one written before landing: one attempt, no margin.
    assert_eq!((o.attempts, o.margin, o.landing.len()), (1, None, 0));

    // The lines a real run writes (with --eval-each) parse, and write back to the same JSON.
    let fx = Fx::new();
    let edits = fx.edits("cf.jsonl", &sample_lines("counterfact-sample.jsonl", 2));
    let dir = fx.path("run");
    fx.edit_ok(&edits, &dir, &["--eval-each"]);
    let text = std::fs::read_to_string(dir.join("log.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 2);
    for (i, l) in text.lines().enumerate() {
        let e = LogEntry::from_line(l).unwrap_or_else(|err| panic!("line {}: {err}: {l}", i + 1));
        assert_eq!(e.index, i);
        assert!(e.eval.is_some() && e.ground_truth.is_some(), "{l}");
        let a: serde_json::Value = serde_json::from_str(l).unwrap();
        let b: serde_json::Value = serde_json::from_str(&e.to_line()).unwrap();
        assert_eq!(a, b);
    }
    // The copy of the last edit's entry in the checkpoint is a log entry too.
    let meta = read_st_metadata(&dir.join("subspace.safetensors"));
    let last = LogEntry::from_line(&meta["last_log"]).unwrap();
    assert_eq!((last.index, last.line), (1, 2));
    // And the library reads the whole log.
    let log = oedit::run::RunDir::open(&dir).unwrap().read_log().unwrap();
    assert_eq!(log.iter().map(|e| e.line).collect::<Vec<_>>(), vec![1, 2]);
}

#[test]
fn corrupt_log_line_is_named_and_a_torn_last_line_is_dropped() {
    let fx = Fx::new();
    let edits = fx.edits("e.jsonl", &minimal_lines(4));
    let good = fx.path("run");
    fx.edit_ok(&edits, &good, &["--limit", "3"]);
    let text = std::fs::read_to_string(good.join("log.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);

    // A middle line that is not JSON: resume, eval and the library all name file and line.
    let bad = fx.path("bad");
    std::fs::create_dir_all(&bad).unwrap();
    for e in std::fs::read_dir(&good).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, bad.join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::create_dir_all(bad.join("updates")).unwrap();
    for (name, bytes) in update_files(&good) {
        std::fs::write(bad.join("updates").join(name), bytes).unwrap();
    }
    let corrupt = format!("{}\n{{\"index\": 1, \"li\n{}\n", lines[0], lines[2]);
    std::fs::write(bad.join("log.jsonl"), &corrupt).unwrap();
    let log_path = bad.join("log.jsonl");
    let want = format!("{}:2: corrupt log line", log_path.display());
    let o = fx.edit(&edits, &bad, &[]);
    let line = assert_clean_failure(&o);
    assert!(line.contains(&want), "{line}");
    assert_eq!(std::fs::read_to_string(&log_path).unwrap(), corrupt, "the log was changed");
    let o = fx.eval(&edits, &bad, &[]);
    let line = assert_clean_failure(&o);
    assert!(line.contains(&want), "{line}");
    let err = oedit::run::RunDir::open(&bad).unwrap().read_log().unwrap_err();
    assert!(format!("{err:#}").contains(&want), "{err:#}");
    // A JSON line that is not a log entry is corrupt too.
    std::fs::write(&log_path, format!("{}\n{{\"index\": 1}}\n{}\n", lines[0], lines[2])).unwrap();
    let line = assert_clean_failure(&fx.edit(&edits, &bad, &[]));
    assert!(line.contains(&want), "{line}");

    // A torn last line (a crash in the middle of the append) is dropped on resume, and the
    // committed edit's entry is restored from the checkpoint.
    let torn = format!("{}\n{}\n{}", lines[0], lines[1], &lines[2][..lines[2].len() / 2]);
    std::fs::write(good.join("log.jsonl"), &torn).unwrap();
    let log = oedit::run::RunDir::open(&good).unwrap().read_log().unwrap();
    assert_eq!(log.len(), 2, "readers leave the torn line out");
    let s = fx.edit_ok(&edits, &good, &[]);
    assert_eq!((s["resumed_from"].as_u64(), s["edits_total"].as_u64()), (Some(3), Some(4)));
    let after = std::fs::read_to_string(good.join("log.jsonl")).unwrap();
    let after: Vec<&str> = after.lines().collect();
    assert_eq!(after.len(), 4);
    assert_eq!(&after[..2], &lines[..2]);
    let restored = LogEntry::from_line(after[2]).unwrap();
    let original = LogEntry::from_line(lines[2]).unwrap();
    assert_eq!((restored.index, restored.line, &restored.subject), (2, 3, &original.subject));
    assert_eq!(edited_lines(&good), vec![1, 2, 3, 4]);
}

#[test]
fn resume_with_another_edits_file_is_an_input_error() {
    let fx = Fx::new();
    let lines = minimal_lines(4);
    let edits = fx.edits("e.jsonl", &lines);
    let dir = fx.path("run");
    fx.edit_ok(&edits, &dir, &["--limit", "2"]);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["edits"].as_str(), Some(edits.to_str().unwrap()));
    let log_before = std::fs::read(dir.join("log.jsonl")).unwrap();
    let unchanged = || {
        assert_eq!(std::fs::read(dir.join("log.jsonl")).unwrap(), log_before, "the log was changed");
    };

    // Line 2 holds another fact: refused naming the line and both facts, for every reason the
    // records differ (another subject, another target, an invalid record, a shorter file).
    let (p, s, _) = MINIMAL_EDITS[1];
    let cases = [
        ("other-target", minimal(p, s, "barn"), "\"A dog\" → \"house\"", "\"A dog\" → \"barn\""),
        (
            "other-subject",
            minimal("A cat lives in the", "A cat", "house"),
            "at line 2",
            "\"A cat\" → \"house\"",
        ),
        ("invalid", minimal(p, "Nobody", "house"), "at line 2", "invalid record"),
    ];
    for (name, line2, edited, found) in cases {
        let mut other = lines.clone();
        other[1] = line2;
        let other = fx.edits(&format!("{name}.jsonl"), &other);
        for extra in [&[][..], &["--on-invalid", "skip"][..]] {
            let o = fx.edit(&other, &dir, extra);
            let line = assert_clean_failure(&o);
            assert_eq!(o.status.code(), Some(2), "{name}: {line}");
            assert!(
                line.contains(&format!("{}:2: this run edited subject", other.display())),
                "{name}: {line}"
            );
            assert!(line.contains(edited) && line.contains(found), "{name}: {line}");
            assert!(line.contains("original edits file"), "{name}: {line}");
            unchanged();
        }
        // The same records streamed on standard input are checked as they stream past.
        let mut streamed = lines.clone();
        streamed[1] = std::fs::read_to_string(&other).unwrap().lines().nth(1).unwrap().to_string();
        for extra in [&[][..], &["--on-invalid", "skip"][..]] {
            let o = fx.edit_stdin(&fx.model, &streamed, &dir, extra);
            let line = assert_clean_failure(&o);
            assert_eq!(o.status.code(), Some(2), "stdin {name} {extra:?}: {line}");
            assert!(line.contains("<stdin>:2: this run edited subject"), "stdin {name}: {line}");
            unchanged();
        }
    }
    let short = fx.edits("short.jsonl", &lines[..1]);
    let o = fx.edit(&short, &dir, &[]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains("at line 2") && line.contains("ends before it"), "{line}");
    unchanged();

    // The original records resume, from a file or from standard input.
    let s = fx.edit_ok(&edits, &dir, &["--limit", "3"]);
    assert_eq!(s["resumed_from"], 2);
    let o = fx.edit_stdin(&fx.model, &lines, &dir, &[]);
    assert_ok(&o);
    assert_eq!(edit_summary(&o)["resumed_from"], 3);
    assert_eq!(edited_lines(&dir), vec![1, 2, 3, 4]);
}

#[test]
fn eval_with_records_that_are_not_the_runs_is_an_input_error() {
    let fx = Fx::new();
    let lines = sample_lines("counterfact-sample.jsonl", 3);
    let edits = fx.edits("cf.jsonl", &lines);
    let dir = fx.path("run");
    fx.edit_ok(&edits, &dir, &["--limit", "2"]);
    let mut other = lines.clone();
    let mut rec: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    rec["target_new"] = serde_json::json!("Klingon");
    other[1] = rec.to_string();
    let other = fx.edits("other.jsonl", &other);
    let o = fx.eval(&other, &dir, &[]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains(&format!("{}:2: this run edited subject", other.display())), "{line}");
    assert!(line.contains("\"Klingon\""), "{line}");
    // --at 1 evaluates only the first edit, whose record is the same.
    let o = fx.eval(&other, &dir, &["--at", "1"]);
    assert_ok(&o);
    // A file that ends before an edited line.
    let short = fx.edits("short.jsonl", &lines[..1]);
    let o = fx.eval(&short, &dir, &[]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains("at line 2") && line.contains("ends before it"), "{line}");
    assert_ok(&fx.eval(&edits, &dir, &[]));
}

#[test]
fn bad_edit_lines_fail_before_the_model_loads() {
    let fx = Fx::new();
    // A model that cannot load: an error about the edits proves they were read first.
    let no_model = fx.path("no-such-model");
    let good = minimal_lines(4);
    let bad = minimal("Bob plays the", "Alice", "harp");
    let mut lines = good.clone();
    lines[2] = bad.clone();
    let edits = fx.edits("bad.jsonl", &lines);
    let dir = fx.path("run");
    let o = run(fx.cmd(&no_model, &edits, &dir, &[]));
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains(&format!("{}:3: field `subject`", edits.display())), "{line}");
    assert!(line.contains("before loading the model"), "{line}");
    assert!(!dir.exists(), "the run directory was created");
    assert!(!fx.cache.exists(), "statistics were computed");
    // The same on standard input (the first records are read ahead).
    let o = fx.edit_stdin(&no_model, &lines, &dir, &[]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains("<stdin>:3: field `subject`"), "{line}");
    assert!(!dir.exists());
    // Beyond --limit a bad line is never reached; with --on-invalid skip it is no error: the
    // model is loaded (and fails here).
    for extra in [&["--limit", "2"][..], &["--on-invalid", "skip"][..]] {
        let line = assert_clean_failure(&run(fx.cmd(&no_model, &edits, &dir, extra)));
        assert!(line.contains("no-such-model") && !line.contains(":3:"), "{extra:?}: {line}");
    }

    // Resuming: a bad line after the edited ones fails before the model loads too.
    fx.edit_ok(&edits, &dir, &["--limit", "2"]);
    let o = run(fx.cmd(&no_model, &edits, &dir, &[]));
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains(&format!("{}:3: field `subject`", edits.display())), "{line}");
    assert!(line.contains("2 edits are checkpointed"), "{line}");
    assert_eq!(edited_lines(&dir), vec![1, 2]);

    // Lines an earlier session consumed follow the rules they always did: a line rejected with
    // --on-invalid skip is not an error when a later session stops on bad lines.
    let mut lines = good.clone();
    lines[0] = bad;
    let edits = fx.edits("bad-first.jsonl", &lines);
    let dir = fx.path("run-skip");
    let s = fx.edit_ok(&edits, &dir, &["--on-invalid", "skip", "--limit", "1"]);
    assert_eq!((s["edits_total"].as_u64(), s["rejected"].as_u64()), (Some(1), Some(1)));
    let s = fx.edit_ok(&edits, &dir, &["--limit", "2"]);
    assert_eq!((s["resumed_from"].as_u64(), s["edits_total"].as_u64()), (Some(1), Some(2)));
    assert_eq!(edited_lines(&dir), vec![2, 3]);
}
