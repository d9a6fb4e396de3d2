//! Bounded work on hostile input (`oedit edit`): line and token caps, thread counts, an edits
//! path that is a directory, an empty edits file, leftovers of killed runs, file permissions.

use std::path::Path;

use tempfile::TempDir;

use crate::common::EditFx as Fx;
use crate::common::*;

fn minimal(prompt: &str, subject: &str, target: &str) -> String {
    serde_json::json!({ "prompt": prompt, "subject": subject, "target": target }).to_string()
}

fn logged_lines(run_dir: &Path) -> Vec<u64> {
    read_jsonl(&run_dir.join("log.jsonl")).iter().map(|v| v["line"].as_u64().unwrap()).collect()
}

#[test]
fn ten_megabyte_line_stops_or_is_skipped_and_the_next_line_is_edited() {
    let fx = Fx::new();
    let huge = minimal(&format!("The cat {}", "zq ".repeat((10 << 20) / 3 + 1)), "The cat", "mat");
    assert!(huge.len() > 10 << 20);
    let lines = [minimal_lines(1), vec![huge], minimal_lines(2)[1..].to_vec()].concat();
    let edits = write_lines(&fx.path("e.jsonl"), &lines);
    let run_dir = fx.path("run");

    // Default: stop on the bad line, after checkpointing the edit before it (checked before the
    // model loads, once line 1 is edited).
    fx.edit_ok(&edits, &run_dir, &["--limit", "1"]);
    let o = fx.edit(&edits, &run_dir, &[]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains(&format!("{}:2: line is longer than 65536 bytes", edits.display())), "{line}");
    assert!(line.contains("1 edits are checkpointed"), "{line}");
    assert_eq!(logged_lines(&run_dir), vec![1]);

    // --on-invalid skip: the line is rejected and the next one edited.
    let o = fx.edit(&edits, &run_dir, &["--on-invalid", "skip"]);
    assert_ok(&o);
    let s = edit_summary(&o);
    assert_eq!((s["edits_total"].as_u64(), s["rejected"].as_u64()), (Some(2), Some(1)));
    assert_eq!(logged_lines(&run_dir), vec![1, 3]);
    let rejected = read_jsonl(&run_dir.join("rejected.jsonl"));
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0]["line"], 2);
    assert!(rejected[0]["field"].is_null());
    assert!(rejected[0]["reason"].as_str().unwrap().contains("--max-line-bytes"), "{}", rejected[0]);
    // The edits of this session stayed small: the 10 MB line was never held.
    let rss = read_jsonl(&run_dir.join("log.jsonl"))[1]["peak_rss_mb"].as_f64().unwrap_or(0.0);
    assert!(rss < 2048.0, "peak RSS {rss} MiB");
}

#[test]
fn line_cap_is_configurable() {
    let fx = Fx::new();
    let edits = write_lines(&fx.path("e.jsonl"), &minimal_lines(2));
    let o = fx.edit(&edits, &fx.path("run"), &["--max-line-bytes", "20"]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains(":1: line is longer than 20 bytes"), "{line}");
    let o = fx.edit(&edits, &fx.path("run"), &["--max-line-bytes", "0"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn over_long_prompts_and_answers_are_rejected_naming_file_line_and_field() {
    let fx = Fx::new();
    let run_dir = fx.path("run");
    // The tiny model's context is 128 positions; its tokenizer is nearly one token per byte.
    let long_prompt = minimal(&format!("The cat {}sat on the", "zq ".repeat(60)), "The cat", "mat");
    let edits = write_lines(&fx.path("e.jsonl"), &[minimal_lines(1), vec![long_prompt]].concat());
    let o = fx.edit(&edits, &run_dir, &[]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains(&format!("{}:2: field `prompt`: ", edits.display())), "{line}");
    assert!(line.contains("more than the limit of 64 (--max-prompt-tokens)"), "{line}");
    assert_eq!(logged_lines(&run_dir), vec![1]);
    // With a larger cap, the model's context still bounds the prompt.
    let o = fx.edit(&edits, &fx.path("run-context"), &["--max-prompt-tokens", "1000"]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains(&format!("{}:2: field `prompt`: ", edits.display())), "{line}");
    assert!(line.contains("max_position_embeddings") && line.contains("context of 128"), "{line}");

    // The cap: the answer of a CounterFact record, and (4 times the cap) a paraphrase, an item of a list.
    let flat = |target: &str, rephrase: &[&str]| {
        serde_json::json!({"prompt": "Bob plays the", "subject": "Bob", "target_new": target,
            "ground_truth": "harp", "rephrase_prompt": rephrase})
        .to_string()
    };
    let lines = vec![
        flat("piano", &["Bob is good at the"]),
        flat("grand piano of the big concert hall", &[]),
        flat(
            "piano",
            &[
                "Bob is good at the",
                "Bob, who is very good at playing all kinds of musical instruments, plays the",
            ],
        ),
    ];
    let edits = write_lines(&fx.path("f.jsonl"), &lines);
    let run_dir = fx.path("run-cap");
    let o = fx.edit(&edits, &run_dir, &["--max-prompt-tokens", "12", "--on-invalid", "skip"]);
    assert_ok(&o);
    assert_eq!(logged_lines(&run_dir), vec![1]);
    let rejected = read_jsonl(&run_dir.join("rejected.jsonl"));
    let got: Vec<(u64, &str)> =
        rejected.iter().map(|r| (r["line"].as_u64().unwrap(), r["field"].as_str().unwrap())).collect();
    assert_eq!(got, vec![(2, "target_new"), (3, "rephrase_prompt[1]")]);
    let reason = |i: usize| rejected[i]["reason"].as_str().unwrap().to_owned();
    assert!(reason(0).contains("more than the limit of 12 (--max-prompt-tokens)"), "{}", reason(0));
    assert!(
        reason(1).contains("more than the limit of 48 for prompts and answers only scored"),
        "{}",
        reason(1)
    );
}

#[test]
fn thread_counts_out_of_range_are_usage_errors() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(&tmp.path().join("m"), TinyOpts::default());
    for (threads, env, needle) in [
        (Some("100000"), None, "--threads 100000: at most"),
        (Some("0"), None, "--threads 0: the thread count must be at least 1"),
        (None, Some("100000"), "RAYON_NUM_THREADS=100000: at most"),
    ] {
        let mut c = oedit_cmd();
        if let Some(t) = threads {
            c.args(["--threads", t]);
        }
        if let Some(e) = env {
            c.env("RAYON_NUM_THREADS", e);
        }
        c.args(["score", "--text", "the cat", "--model"]).arg(&model);
        let o = run(c);
        let line = assert_clean_failure(&o);
        assert_eq!(o.status.code(), Some(2), "{line}");
        assert!(line.contains(needle), "{line}");
    }
}

#[test]
fn edits_directory_fails_before_anything_is_created() {
    let fx = Fx::new();
    let dir = fx.path("edits-dir");
    std::fs::create_dir(&dir).unwrap();
    let run_dir = fx.path("run");
    let o = fx.edit(&dir, &run_dir, &[]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains(dir.to_str().unwrap()) && line.contains("is a directory"), "{line}");
    assert!(!run_dir.exists());
}

#[test]
fn empty_edits_file_reports_no_edits_and_json_is_the_default_off_a_terminal() {
    let fx = Fx::new();
    let edits = write_lines(&fx.path("e.jsonl"), &[]);
    let run_dir = fx.path("run");
    // Without --json: standard output is a pipe here, so the summary line is JSON.
    let mut c = oedit_cmd();
    c.env("OEDIT_CACHE", &fx.cache).args(["--threads", "1", "edit", "--model"]).arg(&fx.model);
    c.arg("--hparams").arg(&fx.hparams).arg("--edits").arg(&edits).arg("--run").arg(&run_dir);
    c.arg("--stats-corpus").arg(corpus_file());
    let o = run(c);
    assert_ok(&o);
    let s = edit_summary(&o);
    assert_eq!(s["edits_total"], 0);
    assert!(s["target_wins_rate"].is_null(), "{s}");
    assert!(stderr(&o).contains("no edits made"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("target wins"), "{}", stderr(&o));
}

#[cfg(unix)]
#[test]
fn leftovers_of_killed_runs_are_removed_and_checkpoints_are_not_private() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fx::new();
    let run_dir = fx.path("run");
    std::fs::create_dir_all(run_dir.join("updates")).unwrap();
    // 999999999 is above Linux's largest PID: no live process has it.
    let stale_file = run_dir.join(".subspace.safetensors.tmp-999999999");
    let stale_dir = run_dir.join("updates").join(".chunk-00000.safetensors.tmp-999999999");
    std::fs::write(&stale_file, b"half").unwrap();
    std::fs::create_dir(&stale_dir).unwrap();
    std::fs::write(stale_dir.join("chunk-00000.safetensors"), b"half").unwrap();
    let edits = write_lines(&fx.path("e.jsonl"), &minimal_lines(1));
    assert_ok(&fx.edit(&edits, &run_dir, &[]));
    if cfg!(target_os = "linux") {
        assert!(!stale_file.exists() && !stale_dir.exists());
    }
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // log.jsonl is created the ordinary way (0666 less the umask); checkpoints match it.
    let ordinary = mode(&run_dir.join("log.jsonl"));
    for f in [run_dir.join("subspace.safetensors"), run_dir.join("manifest.json"), edit_file(&run_dir, 0)] {
        assert_eq!(mode(&f), ordinary, "{}", f.display());
    }
}

/// A named pipe is read once, as standard input is: opening it a second time (after validating
/// it) would wait for a writer that is gone.
#[test]
fn edits_from_a_named_pipe_are_read_once() {
    let fx = Fx::new();
    let fifo = fx.path("edits.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("mkfifo unavailable; skipped");
        return;
    }
    let lines = minimal_lines(2);
    let writer_path = fifo.clone();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        // Blocks until oedit opens the pipe; a reader that leaves early is not an error here.
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&writer_path) {
            let _ = f.write_all((lines.join("\n") + "\n").as_bytes());
        }
    });
    let run_dir = fx.path("run");
    let mut child =
        fx.cmd(&fx.model, &fifo, &run_dir, &[]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(120) {
            child.kill().unwrap();
            panic!("oedit did not finish reading a named pipe");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert_ok(&o);
    assert_eq!(logged_lines(&run_dir), vec![1, 2]);
}

/// `--layer` with a spread method whose hyper-parameters list its layers: the listed last
/// layer is where v* is optimised, so a different `--layer` is refused, not ignored.
#[test]
fn layer_flag_conflicting_with_a_listed_spread_is_refused() {
    let fx = Fx::new();
    let mut hp = tiny_hparams();
    hp["alphaedit"] = serde_json::json!({ "nullspace_threshold": 0.01, "min_nullspace_dim": 0, "l2": 10.0, "layers": [0, 1] });
    let hparams = write_json(&fx.path("hp.json"), &hp);
    let edits = write_lines(&fx.path("e.jsonl"), &minimal_lines(1));
    let run_dir = fx.path("run");
    let mut c = edit_cmd(&fx.model, &hparams, &edits, &run_dir, &fx.cache);
    c.args(["--method", "alphaedit", "--layer", "2"]);
    let o = run(c);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains("--layer 2: alphaedit edits the layers [0, 1]"), "{line}");
    assert!(!run_dir.join("log.jsonl").exists());
    // The listed target layer itself is accepted.
    let mut c = edit_cmd(&fx.model, &hparams, &edits, &run_dir, &fx.cache);
    c.args(["--method", "alphaedit", "--layer", "1"]);
    assert_ok(&run(c));
    assert_eq!(logged_lines(&run_dir), vec![1]);
}

/// A run manifest whose context templates were edited by hand is refused on resume (a template
/// without `{}` used to end in a panic while building the prompts).
#[test]
fn hand_edited_manifest_templates_are_refused_on_resume() {
    let fx = Fx::new();
    let edits = write_lines(&fx.path("e.jsonl"), &minimal_lines(2));
    let run_dir = fx.path("run");
    fx.edit_ok(&edits, &run_dir, &["--limit", "1"]);
    let path = run_dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for bad in [serde_json::json!(["{}", "Hello."]), serde_json::json!([])] {
        m["templates"] = bad;
        std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
        let o = fx.edit(&edits, &run_dir, &[]);
        let line = assert_clean_failure(&o);
        assert!(line.contains("manifest.json: corrupt run manifest: field `templates`"), "{line}");
        assert_eq!(logged_lines(&run_dir), vec![1]);
    }
}

/// A v* optimisation that diverges (a learning rate past f32's range) fails the edit with a clear
/// error before anything reaches the weights or the checkpoint.
#[test]
fn diverged_update_is_refused_and_nothing_is_committed() {
    let fx = Fx::new();
    let mut hp = tiny_hparams();
    hp["v_lr"] = serde_json::json!(1e39);
    let hparams = write_json(&fx.path("hp.json"), &hp);
    let edits = write_lines(&fx.path("e.jsonl"), &minimal_lines(1));
    let run_dir = fx.path("run");
    let o = run(edit_cmd(&fx.model, &hparams, &edits, &run_dir, &fx.cache));
    let line = assert_clean_failure(&o);
    assert!(line.contains("NaN or infinite entries"), "{line}");
    assert!(line.contains("e.jsonl:1: edit failed"), "{line}");
    assert!(logged_lines(&run_dir).is_empty());
    // On standard input the error names it as every other record error does.
    let mut c = edit_cmd(&fx.model, &hparams, std::path::Path::new("-"), &fx.path("run2"), &fx.cache);
    c.stdin(std::fs::File::open(&edits).unwrap());
    let line = assert_clean_failure(&run(c));
    assert!(line.contains("<stdin>:1: edit failed"), "{line}");
}

/// `oedit score` on a text longer than the model's context: a usage error, not an attention
/// buffer of the text's length squared.
#[test]
fn score_refuses_a_text_past_the_context() {
    let fx = Fx::new();
    let mut c = oedit_cmd();
    c.args(["score", "--model", fx.model.to_str().unwrap(), "--text", &"the cat ".repeat(100)]);
    let o = run(c);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains("more than the model's context of 128"), "{line}");
}
