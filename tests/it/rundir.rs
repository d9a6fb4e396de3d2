//! What `oedit edit --run DIR` accepts and protects: a folder that is not a run is refused and left
//! as it was, a run another process is editing is refused, a run that committed nothing takes new
//! settings, and a reader that closes standard output stops the run cleanly after a commit.

use std::io::Read;
use std::process::Stdio;

use crate::common::*;

fn assert_input_error(o: &std::process::Output, words: &[&str]) -> String {
    let line = assert_clean_failure(o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    for w in words {
        assert!(line.contains(w), "`{w}` not in: {line}");
    }
    line
}

#[test]
fn a_directory_that_is_not_a_run_is_refused_and_left_as_it_was() {
    let fx = EditFx::new();
    let edits = fx.edits("e.jsonl", &minimal_lines(2));
    let folder = fx.path("project");
    let stale = folder.join(".draft.tmp-999999999");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("draft.txt"), b"mine").unwrap();
    std::fs::write(folder.join("notes.txt"), b"keep").unwrap();
    let o = fx.edit(&edits, &folder, &[]);
    assert_input_error(&o, &["project", "not an oedit run directory", "`notes.txt`"]);
    let mut names: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [".draft.tmp-999999999", "notes.txt"]);
    assert_eq!(std::fs::read(stale.join("draft.txt")).unwrap(), b"mine");

    // A file is refused too; an empty directory is taken.
    let file = fx.path("notes.txt");
    std::fs::write(&file, b"x").unwrap();
    assert_input_error(&fx.edit(&edits, &file, &[]), &["not a directory"]);
    let empty = fx.path("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_eq!(fx.edit_ok(&edits, &empty, &[])["edits_total"], 2);
}

#[test]
fn a_run_being_edited_by_another_process_is_refused_and_unchanged() {
    let fx = EditFx::new();
    let edits = fx.edits("e.jsonl", &minimal_lines(3));
    let dir = fx.path("run");
    fx.edit_ok(&edits, &dir, &["--limit", "1"]);
    let before = update_files(&dir);
    let log_before = std::fs::read(dir.join("log.jsonl")).unwrap();
    // Another session holds the lock (taken here the way `oedit edit` takes it).
    let held = oedit::run::guard::lock_run_dir(&dir).unwrap();
    let o = fx.edit(&edits, &dir, &[]);
    assert_input_error(&o, &["another `oedit edit`", "run"]);
    assert_eq!(update_files(&dir), before);
    assert_eq!(std::fs::read(dir.join("log.jsonl")).unwrap(), log_before);
    drop(held);
    assert_eq!(fx.edit_ok(&edits, &dir, &[])["edits_total"], 3);
    // Each edit is in the log once.
    let indices: Vec<u64> =
        read_jsonl(&dir.join("log.jsonl")).iter().map(|e| e["index"].as_u64().unwrap()).collect();
    assert_eq!(indices, [0, 1, 2]);
}

#[test]
fn a_run_that_committed_nothing_takes_the_settings_of_the_next_command() {
    let fx = EditFx::new();
    let edits = fx.edits("e.jsonl", &minimal_lines(2));
    let dir = fx.path("run");
    // Far more statistics tokens than the corpus holds: bad input, found after the manifest is
    // written (the tokens are counted with the model's tokenizer).
    let mut hp = tiny_hparams();
    hp["cov_tokens"] = serde_json::json!(1_000_000_000u64);
    let big = write_json(&fx.path("big.json"), &hp);
    let o = run(edit_cmd(&fx.model, &big, &edits, &dir, &fx.cache));
    assert_input_error(&o, &["cov_tokens", "1000000000"]);
    assert!(dir.join("manifest.json").is_file());
    assert!(!dir.join("subspace.safetensors").exists());
    // The corrected command runs: the run had no edit to bind it.
    let o = fx.edit(&edits, &dir, &[]);
    assert_ok(&o);
    assert!(stderr(&o).contains("holds no committed edit"), "{}", stderr(&o));
    assert_eq!(edit_summary(&o)["edits_total"], 2);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["hparams"]["cov_tokens"], tiny_hparams()["cov_tokens"]);
    // Once it holds an edit, other settings are refused as before.
    let o = run(edit_cmd(&fx.model, &big, &edits, &dir, &fx.cache));
    assert_input_error(&o, &["cannot be continued", "cov_tokens"]);
}

#[test]
fn a_closed_standard_output_stops_the_run_after_a_commit_without_a_panic() {
    let fx = EditFx::new();
    let edits = fx.edits("e.jsonl", &minimal_lines(4));
    let dir = fx.path("run");
    let mut child =
        fx.cmd(&fx.model, &edits, &dir, &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // The reader goes away before the first line is written.
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("broken pipe"), "{err}");
    // The first edit was committed and logged before the line was printed; the run resumes.
    let logged = read_jsonl(&dir.join("log.jsonl")).len();
    assert_eq!(logged, 1);
    assert_eq!(fx.edit_ok(&edits, &dir, &[])["edits_total"], 4);
}

#[test]
fn a_resume_keeps_the_run_s_eval_each_setting_and_layer_flags_name_themselves() {
    let fx = EditFx::new();
    let edits = fx.edits("e.jsonl", &minimal_lines(3));
    let dir = fx.path("run");
    fx.edit_ok(&edits, &dir, &["--limit", "1", "--eval-each"]);
    let o = fx.edit(&edits, &dir, &["--limit", "2"]);
    assert_input_error(&o, &["cannot be continued without --eval-each", "resume it with --eval-each"]);
    fx.edit_ok(&edits, &dir, &["--limit", "2", "--eval-each"]);
    let plain = fx.path("plain");
    fx.edit_ok(&edits, &plain, &["--limit", "1"]);
    let o = fx.edit(&edits, &plain, &["--eval-each"]);
    assert_input_error(&o, &["cannot be continued with --eval-each"]);
    // --layer past the model's layers names the flag and the layer count.
    let o = fx.edit(&edits, &fx.path("other"), &["--layer", "99"]);
    assert_input_error(&o, &["--layer 99", "layers"]);
}

#[test]
fn a_run_resumes_with_its_corpus_under_another_path_but_not_with_other_text() {
    let fx = EditFx::new();
    let edits = fx.edits("e.jsonl", &minimal_lines(3));
    let dir = fx.path("run");
    fx.edit_ok(&edits, &dir, &["--limit", "1"]);
    let with_corpus = |corpus: &std::path::Path, limit: &str| {
        let mut c = oedit_cmd();
        c.env("OEDIT_CACHE", &fx.cache).args(["--threads", "1", "edit", "--method", "oedit-plus", "--model"]);
        c.arg(&fx.model).arg("--hparams").arg(&fx.hparams).arg("--edits").arg(&edits).arg("--run").arg(&dir);
        c.arg("--stats-corpus").arg(corpus).args(["--json", "--limit", limit]);
        run(c)
    };
    // The same text under another name: only the content identifies the statistics.
    let text = std::fs::read_to_string(corpus_file()).unwrap();
    std::fs::create_dir_all(fx.path("copy")).unwrap();
    let copy = fx.path("copy").join("corpus.txt");
    std::fs::write(&copy, &text).unwrap();
    let o = with_corpus(&copy, "2");
    assert_ok(&o);
    assert_eq!(edit_summary(&o)["edits_total"], 2);
    // Other text is other statistics: refused, naming both.
    let other = fx.path("other.txt");
    std::fs::write(&other, text.replacen("the", "a", 200)).unwrap();
    let line =
        assert_input_error(&with_corpus(&other, "3"), &["cannot be continued", "key statistics came from"]);
    assert!(line.contains("other.txt"), "{line}");
}

#[test]
fn at_its_limit_a_run_reads_no_further_from_a_pipe_that_stays_open() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let fx = EditFx::new();
    let dir = fx.path("run");
    let mut child = fx
        .cmd(&fx.model, std::path::Path::new("-"), &dir, &["--limit", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for l in minimal_lines(3) {
        writeln!(stdin, "{l}").unwrap();
    }
    stdin.flush().unwrap();
    // The writer keeps the pipe open (as `tail -f` would): the run must end on its own.
    let start = Instant::now();
    let ended = loop {
        if child.try_wait().unwrap().is_some() {
            break true;
        }
        if start.elapsed() > Duration::from_secs(120) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    assert!(ended, "still reading at its limit: {}", stderr(&o));
    assert_ok(&o);
    assert_eq!(edit_summary(&o)["edits_total"], 2);
}

#[cfg(target_os = "linux")]
#[test]
fn an_edits_file_that_cannot_be_read_stops_the_run_even_when_skipping_bad_lines() {
    let fx = EditFx::new();
    let dir = fx.path("run");
    // Reading a process's memory from offset 0 fails with EIO: an I/O error, not a bad line.
    let unreadable = std::path::Path::new("/proc/self/mem");
    for extra in [&["--on-invalid", "skip"][..], &[][..]] {
        let o = fx.edit(unreadable, &dir, extra);
        let line = assert_input_error(&o, &["/proc/self/mem"]);
        assert!(line.contains("I/O error") || line.contains("cannot"), "{extra:?}: {line}");
        assert!(!dir.join("rejected.jsonl").exists(), "{extra:?}: an unread line was recorded as rejected");
    }
}
