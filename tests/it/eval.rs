//! `oedit eval`: the JSON report, the metrics recomputed independently from the model's
//! logits, bad input, skipped records, and efficacy on the real SmolLM2 model.

use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::DType;
use oedit::data::{EditReader, EditRecord};
use oedit::model::Llama;
use oedit::tokenizer::Tok;
use serde_json::Value;
use tempfile::TempDir;

use crate::common::*;

/// The tiny model edited with the first `n` CounterFact records.
struct Fx {
    tmp: TempDir,
    model: PathBuf,
    edits: PathBuf,
    run_dir: PathBuf,
}

impl Fx {
    fn new(n: usize) -> Self {
        Self::with(n, &[])
    }

    /// The first `n` records edited with `extra` arguments to `oedit edit`.
    fn with(n: usize, extra: &[&str]) -> Self {
        let tmp = TempDir::new().unwrap();
        let model = tiny_model(&tmp.path().join("model"), TinyOpts::default());
        let hparams = write_json(&tmp.path().join("hparams.json"), &tiny_hparams());
        let edits = write_lines(&tmp.path().join("cf.jsonl"), &sample_lines("counterfact-sample.jsonl", 5));
        let run_dir = tmp.path().join("run");
        let mut c = edit_cmd(&model, &hparams, &edits, &run_dir, &tmp.path().join("cache"));
        c.args(["--limit", &n.to_string()]).args(extra);
        assert_ok(&run(c));
        Self { tmp, model, edits, run_dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

fn eval(model: &Path, edits: &Path, extra: &[&str]) -> Output {
    let mut c = oedit_cmd();
    // The cache of unedited scores lives beside the test's model, never in the user's home.
    c.env("OEDIT_CACHE", model.parent().unwrap().join("cache"));
    c.args(["eval", "--model"]).arg(model).arg("--edits").arg(edits).args(extra);
    run(c)
}

fn eval_json(model: &Path, edits: &Path, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["--json", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = eval(model, edits, &args);
    assert_ok(&o);
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn mean(v: &Value) -> f64 {
    v["mean"].as_f64().unwrap_or_else(|| panic!("no mean in {v}"))
}

#[test]
fn report_has_edited_and_unedited_metrics() {
    let fx = Fx::new(3);
    let out = fx.path("report.json");
    let r = eval_json(&fx.model, &fx.edits, &out, &["--run", fx.run_dir.to_str().unwrap(), "--per-record"]);
    assert_eq!(r["protocol"]["timing"], "after-all");
    // Only the 3 edited lines of the 5-line file are evaluated.
    assert_eq!(r["records"]["evaluated"], 3);
    assert_eq!(r["records"]["skipped"], serde_json::json!([]));
    assert_eq!(r["run"]["n_edits"], 3);
    assert_eq!(r["run"]["method"], "oedit-plus");
    assert_eq!(r["run"]["layer"], 1);
    for side in ["edited", "unedited"] {
        let m = &r["metrics"][side];
        for name in [
            "efficacy",
            "efficacy_token_acc",
            "generalization",
            "generalization_token_acc",
            "locality",
            "locality_agreement",
        ] {
            let x = mean(&m[name]);
            assert!((0.0..=1.0).contains(&x), "{side}.{name} = {x}");
            assert_eq!(m[name]["count"], 3, "{side}.{name}");
        }
        assert!(m.get("fluency").is_none(), "fluency was not asked for: {m}");
    }
    assert_eq!(mean(&r["metrics"]["unedited"]["locality_agreement"]), 1.0);
    let per = r["per_record"].as_array().unwrap();
    let lines: Vec<u64> = per.iter().map(|p| p["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, vec![1, 2, 3]);
    let ids: Vec<u64> = per.iter().map(|p| p["case_id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![0, 1, 2]);
    // The summary is the mean of the per-record scores.
    for side in ["edited", "unedited"] {
        let avg = per.iter().map(|p| p[side]["efficacy"].as_f64().unwrap()).sum::<f64>() / 3.0;
        assert!((avg - mean(&r["metrics"][side]["efficacy"])).abs() < 1e-12, "{side}");
    }

    // `--json -` prints the same report on standard output; fluency is measured when asked for.
    let o = eval(
        &fx.model,
        &fx.edits,
        &[
            "--run",
            fx.run_dir.to_str().unwrap(),
            "--json",
            "-",
            "--metrics",
            "efficacy,fluency",
            "--gen-tokens",
            "8",
        ],
    );
    assert_ok(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["metrics"]["edited"]["efficacy"], r["metrics"]["edited"]["efficacy"]);
    assert!(mean(&v["metrics"]["edited"]["fluency"]) >= 0.0);
    assert!(v["metrics"]["edited"].get("locality").is_none());
}

#[test]
fn after_each_reports_the_logged_scores_of_the_metrics_asked_for() {
    let fx = Fx::with(2, &["--eval-each"]);
    let (model, edits, run_dir) = (&fx.model, &fx.edits, &fx.run_dir);
    let log: Vec<Value> = std::fs::read_to_string(run_dir.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    let out = fx.path("report.json");
    let dir = run_dir.to_str().unwrap();
    let args = ["--run", dir, "--timing", "after-each", "--metrics", "efficacy,locality", "--per-record"];
    let r = eval_json(model, edits, &out, &args);
    assert_eq!(r["protocol"]["timing"], "after-each");
    assert!(r["protocol"]["locality_agreement"].as_str().unwrap().contains("right before the record's edit"));
    let edited = &r["metrics"]["edited"];
    assert_eq!(edited["efficacy"]["count"], 2, "{edited}");
    assert_eq!(edited["locality_agreement"]["count"], 2, "{edited}");
    // The log holds generalization too; it was not asked for, so neither side reports it.
    assert!(edited.get("generalization").is_none(), "{edited}");
    assert!(r["metrics"]["unedited"].get("generalization").is_none());
    let per = r["per_record"].as_array().unwrap();
    for (p, l) in per.iter().zip(&log) {
        assert_eq!(p["edited"]["efficacy"], l["eval"]["efficacy"], "{p}");
        assert_eq!(p["edited"]["locality_agreement"], l["eval"]["locality_agreement"], "{p}");
        assert!(p["edited"]["generalization"].is_null(), "{p}");
    }
    // Metrics the log cannot hold are refused before the model loads.
    for m in ["fluency", "gen", "efficacy,gen-locality"] {
        let o = eval(model, edits, &["--run", dir, "--timing", "after-each", "--metrics", m]);
        let line = assert_clean_failure(&o);
        assert_eq!(o.status.code(), Some(2), "{m}: {line}");
        assert!(line.contains("--timing after-each") && line.contains("--timing after-all"), "{line}");
    }
}

#[test]
fn eval_at_n_is_the_run_as_it_stood_after_n_edits() {
    let fx = Fx::new(3);
    let short = fx.path("run-2");
    let mut c = edit_cmd(&fx.model, &fx.path("hparams.json"), &fx.edits, &short, &fx.path("cache"));
    c.args(["--limit", "2"]);
    assert_ok(&run(c));
    let long = fx.run_dir.to_str().unwrap();
    let at2 =
        eval_json(&fx.model, &fx.edits, &fx.path("at2.json"), &["--run", long, "--at", "2", "--per-record"]);
    let short_run = short.to_str().unwrap();
    let full2 =
        eval_json(&fx.model, &fx.edits, &fx.path("full2.json"), &["--run", short_run, "--per-record"]);
    assert_eq!(at2["run"]["n_edits"], 2);
    assert_eq!(at2["records"]["evaluated"], 2);
    assert_eq!(at2["metrics"], full2["metrics"]);
    assert_eq!(at2["per_record"], full2["per_record"]);
    let all3 = eval_json(&fx.model, &fx.edits, &fx.path("all3.json"), &["--run", long, "--per-record"]);
    assert_eq!(all3["records"]["evaluated"], 3);
    // The first two records score differently once the third edit is on the model.
    let first_two = |r: &Value| r["per_record"].as_array().unwrap()[..2].to_vec();
    assert_ne!(first_two(&all3), first_two(&at2));

    for (args, want) in [
        (vec!["--run", long, "--at", "4"], "only 3 committed edits"),
        (vec!["--run", long, "--at", "0"], "at least 1"),
        (vec!["--at", "2"], "--at needs --run"),
    ] {
        let err = assert_clean_failure(&eval(&fx.model, &fx.edits, &args));
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn eval_at_n_replays_every_landing_attempt_of_the_first_n_edits() {
    // A margin no edit reaches: every edit makes all three attempts (three updates each), so
    // the first N edits' updates are not N × (layers) of them.
    let fx = Fx::new(1);
    let mut hp = tiny_hparams();
    hp["landing"] = serde_json::json!({ "max_attempts": 3, "min_margin": 1000.0, "max_gain": 10.0 });
    let hparams = write_json(&fx.path("hparams-landing.json"), &hp);
    let (long, short) = (fx.path("landing-3"), fx.path("landing-2"));
    for (dir, n) in [(&long, "3"), (&short, "2")] {
        let mut c = edit_cmd(&fx.model, &hparams, &fx.edits, dir, &fx.path("cache"));
        c.args(["--limit", n]);
        assert_ok(&run(c));
    }
    let attempts: Vec<u64> =
        read_jsonl(&long.join("log.jsonl")).iter().map(|l| l["attempts"].as_u64().unwrap()).collect();
    assert_eq!(attempts, vec![3, 3, 3]);
    let at2 = eval_json(
        &fx.model,
        &fx.edits,
        &fx.path("l-at2.json"),
        &["--run", long.to_str().unwrap(), "--at", "2", "--per-record"],
    );
    let full2 = eval_json(
        &fx.model,
        &fx.edits,
        &fx.path("l-full2.json"),
        &["--run", short.to_str().unwrap(), "--per-record"],
    );
    assert_eq!(at2["records"]["evaluated"], 2);
    assert_eq!(at2["metrics"], full2["metrics"]);
    assert_eq!(at2["per_record"], full2["per_record"]);
}

#[test]
fn unedited_scores_are_cached_per_model_and_record() {
    let fx = Fx::new(2);
    let run_dir = fx.run_dir.to_str().unwrap();
    let args = ["--run", run_dir, "--per-record"];
    let first = eval_json(&fx.model, &fx.edits, &fx.path("a.json"), &args);
    let cache_dir = fx.path("cache").join("eval");
    let files: Vec<PathBuf> = std::fs::read_dir(&cache_dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert_eq!(text.lines().count(), 2);
    let again = eval_json(&fx.model, &fx.edits, &fx.path("b.json"), &args);
    assert_eq!(again["per_record"], first["per_record"]);

    // The second report really reads the cache: a planted value comes back, and --no-cache
    // recomputes the true one.
    let planted: Vec<String> = text
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v["scores"]["efficacy"] = serde_json::json!(0.25);
            v.to_string()
        })
        .collect();
    std::fs::write(&files[0], planted.join("\n")).unwrap();
    let cached = eval_json(&fx.model, &fx.edits, &fx.path("c.json"), &args);
    assert_eq!(mean(&cached["metrics"]["unedited"]["efficacy"]), 0.25);
    // Without --run the model is scored as it stands, through the same cache.
    let plain = eval_json(&fx.model, &fx.edits, &fx.path("plain.json"), &["--limit", "2"]);
    assert_eq!(mean(&plain["metrics"]["edited"]["efficacy"]), 0.25);
    let mut no_cache = args.to_vec();
    no_cache.push("--no-cache");
    let fresh = eval_json(&fx.model, &fx.edits, &fx.path("d.json"), &no_cache);
    assert_eq!(fresh["per_record"], first["per_record"]);

    // A damaged cache is ignored, recomputed and rewritten.
    std::fs::write(&files[0], "{not json\n").unwrap();
    let repaired = eval_json(&fx.model, &fx.edits, &fx.path("e.json"), &args);
    assert_eq!(repaired["per_record"], first["per_record"]);
    assert_eq!(std::fs::read_to_string(&files[0]).unwrap(), text);
}

/// Teacher-forced (mean NLL, token accuracy) of `answer` after `prompt`, computed from the
/// logits of one unbatched forward pass.
fn answer_score(model: &Llama, tok: &Tok, prompt: &str, answer: &str) -> (f64, f64) {
    let p = tok.encode_prompt(prompt).unwrap();
    let a = tok.encode_continuation(prompt, answer).unwrap();
    assert!(!a.is_empty());
    let mut ids = p.clone();
    ids.extend_from_slice(&a[..a.len() - 1]);
    let lg = logits(model, &ids).squeeze(0).unwrap().to_dtype(DType::F64).unwrap();
    let rows: Vec<Vec<f64>> = lg.to_vec2().unwrap();
    let (mut nll, mut hits) = (0.0, 0usize);
    for (j, &t) in a.iter().enumerate() {
        let row = &rows[p.len() - 1 + j];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        nll -= row[t as usize] - lse;
        let argmax = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        hits += (argmax == t as usize) as usize;
    }
    (nll / a.len() as f64, hits as f64 / a.len() as f64)
}

/// Asserts `got` (a per-record score) is the indicator 1[a < b], unless a and b are too close
/// to call.
fn check_preference(what: &str, got: &Value, a: f64, b: f64) {
    if (a - b).abs() < 1e-4 {
        return;
    }
    assert_eq!(got.as_f64(), Some((a < b) as u8 as f64), "{what}: NLLs {a} vs {b}");
}

fn check_record(what: &str, model: &Llama, tok: &Tok, rec: &EditRecord, got: &Value) {
    let truth = rec.ground_truth.as_deref().unwrap();
    let (new, acc) = answer_score(model, tok, &rec.prompt, &rec.target_new);
    let (old, _) = answer_score(model, tok, &rec.prompt, truth);
    check_preference(&format!("{what} efficacy"), &got["efficacy"], new, old);
    let got_acc = got["efficacy_token_acc"].as_f64().unwrap();
    assert!((got_acc - acc).abs() < 1e-12, "{what}: token accuracy {got_acc} vs {acc}");
    let para = &rec.rephrase_prompts[0];
    let (pn, pacc) = answer_score(model, tok, para, &rec.target_new);
    let (po, _) = answer_score(model, tok, para, truth);
    check_preference(&format!("{what} generalization"), &got["generalization"], pn, po);
    assert!((got["generalization_token_acc"].as_f64().unwrap() - pacc).abs() < 1e-12, "{what}");
    let loc = &rec.locality[0];
    let (lt, _) = answer_score(model, tok, &loc.prompt, &loc.answer);
    let (ln, _) = answer_score(model, tok, &loc.prompt, &rec.target_new);
    check_preference(&format!("{what} locality"), &got["locality"], lt, ln);
}

#[test]
fn per_record_scores_match_an_independent_computation() {
    let fx = Fx::new(3);
    let r = eval_json(
        &fx.model,
        &fx.edits,
        &fx.path("report.json"),
        &["--run", fx.run_dir.to_str().unwrap(), "--per-record"],
    );
    let records: Vec<EditRecord> =
        EditReader::open(&fx.edits).unwrap().take(3).map(|i| i.unwrap().1).collect();
    let per = r["per_record"].as_array().unwrap();
    let mut lm = load(&fx.model);
    for (i, rec) in records.iter().enumerate() {
        check_record(&format!("unedited record {i}"), &lm.model, &lm.tok, rec, &per[i]["unedited"]);
    }
    let state = oedit::run::RunDir::open(&fx.run_dir).unwrap().read_state(INTERMEDIATE).unwrap();
    assert_eq!(state.n_edits, 3);
    oedit::run::replay(&mut lm.model, &state.updates).unwrap();
    for (i, rec) in records.iter().enumerate() {
        check_record(&format!("edited record {i}"), &lm.model, &lm.tok, rec, &per[i]["edited"]);
    }
}

#[test]
fn bad_eval_input_is_reported() {
    let fx = Fx::new(1);
    let run_dir = fx.run_dir.to_str().unwrap();
    let o = eval(&fx.model, &fx.edits, &["--run", run_dir, "--metrics", "efficacy,bogus"]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains("bogus") && line.contains("--metrics"), "{line}");

    let missing = fx.path("no-such-edits.jsonl");
    let o = eval(&fx.model, &missing, &["--run", run_dir]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains(missing.to_str().unwrap()), "{line}");

    let missing_run = fx.path("no-such-run");
    let o = eval(&fx.model, &fx.edits, &["--run", missing_run.to_str().unwrap()]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains(missing_run.to_str().unwrap()), "{line}");

    let other = tiny_model(&fx.path("other"), TinyOpts { seed: 8, ..Default::default() });
    let o = eval(&other, &fx.edits, &["--run", run_dir]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains("fingerprint") && line.contains(fx.model.to_str().unwrap()), "{line}");

    // A metric below its threshold: exit code 3 after the report (the table stays on stderr).
    let o = eval(&fx.model, &fx.edits, &["--run", run_dir, "--fail-under", "efficacy=1.01"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let err = stderr(&o);
    let last = err.trim_end().lines().last().unwrap();
    assert!(last.starts_with("error: below threshold") && last.contains("efficacy"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let o = eval(&fx.model, &fx.edits, &["--run", run_dir, "--fail-under", "efficacy=0"]);
    assert_ok(&o);
    // A threshold on a metric --metrics leaves out is a usage error, found before any scoring.
    let o = eval(&fx.model, &fx.edits, &["--run", run_dir, "--fail-under", "fluency=0.5"]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains("--fail-under fluency") && line.contains("add `fluency` to --metrics"), "{line}");
    let args =
        ["--run", run_dir, "--metrics", "gen-efficacy,locality", "--fail-under", "efficacy_token_acc=0.1"];
    let line = assert_clean_failure(&eval(&fx.model, &fx.edits, &args));
    assert!(line.contains("add `efficacy` to --metrics"), "{line}");
    // A report column is accepted by --metrics as the family that computes it.
    let args = ["--run", run_dir, "--metrics", "efficacy_token_acc,locality_agreement"];
    let o = eval(&fx.model, &fx.edits, &[&args[..], &["--fail-under", "locality_agreement=0"]].concat());
    assert_ok(&o);
    // Without --run or --base nothing is compared with the unedited model.
    let o = eval(&fx.model, &fx.edits, &["--fail-under", "locality_agreement=0.5"]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains("give --run or --base"), "{line}");
    let o = eval(&fx.model, &fx.edits, &["--run", run_dir, "--fail-under", "bogus=0.5"]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains("bogus"), "{line}");
    // A threshold that is not a finite number is bad input, not a missed threshold.
    for v in ["nan", "inf", "-inf", "x"] {
        let o = eval(&fx.model, &fx.edits, &["--run", run_dir, "--fail-under", &format!("efficacy={v}")]);
        let line = assert_clean_failure(&o);
        assert_eq!(o.status.code(), Some(2), "{v}: {line}");
        assert!(line.contains("not a finite number"), "{line}");
    }
    // Fluency generations past the model's context (128 positions) are refused, naming what fits.
    let o = eval(&fx.model, &fx.edits, &["--run", run_dir, "--metrics", "fluency", "--gen-tokens", "200"]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains("--gen-tokens 200") && line.contains("context of 128"), "{line}");
    let fits: usize =
        line.rsplit("--gen-tokens ").next().unwrap().split(' ').next().unwrap().parse().unwrap();
    let o = eval(
        &fx.model,
        &fx.edits,
        &["--run", run_dir, "--metrics", "fluency", "--gen-tokens", &fits.to_string()],
    );
    assert_ok(&o);
    // Names are spelt as --metrics accepts them (`-` for `_`).
    let o = eval(&fx.model, &fx.edits, &["--run", run_dir, "--fail-under", "efficacy-token-acc=0"]);
    assert_ok(&o);
}

#[test]
fn a_report_into_a_missing_folder_is_refused_before_the_evaluation() {
    let fx = Fx::new(1);
    let run_dir = fx.run_dir.to_str().unwrap();
    let out = fx.path("no-such-folder").join("report.json");
    let o = eval(&fx.model, &fx.edits, &["--run", run_dir, "--json", out.to_str().unwrap()]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains("no-such-folder") && line.contains("does not exist"), "{line}");
    // Nothing was scored: no unedited scores were cached.
    assert!(!fx.path("cache").join("eval").exists());
    let o = eval(&fx.model, &fx.edits, &["--run", run_dir, "--json", fx.tmp.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn eval_counts_the_edit_whose_log_line_only_the_checkpoint_kept() {
    let fx = Fx::new(3);
    // A crash between the commit of the third edit and its log line: the log has two lines.
    let log = fx.run_dir.join("log.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let two: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&log, two).unwrap();
    let r = eval_json(&fx.model, &fx.edits, &fx.path("r.json"), &["--run", fx.run_dir.to_str().unwrap()]);
    assert_eq!(r["run"]["n_edits"], 3);
    assert_eq!(r["records"]["evaluated"], 3);
    let o = eval(&fx.model, &fx.edits, &["--run", fx.run_dir.to_str().unwrap(), "--at", "4"]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains("--at 4") && line.contains("only 3 committed edits"), "{line}");
}

#[test]
fn zsre_records_with_empty_targets_are_skipped() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(&tmp.path().join("model"), TinyOpts::default());
    let zsre = repo_root().join("data").join("zsre-sample.jsonl");
    let text = std::fs::read_to_string(&zsre).unwrap();
    let empty: Vec<u64> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| serde_json::from_str::<Value>(l).unwrap()["alt"] == "")
        .map(|(i, _)| i as u64 + 1)
        .collect();
    assert_eq!(empty.len(), 2);
    let total = text.lines().count();
    // The tiny tokenizer is nearly one token per byte: two zsRE questions pass the default
    // 64-token cap there (not on real tokenizers).
    let r = eval_json(
        &model,
        &zsre,
        &tmp.path().join("r.json"),
        &["--metrics", "efficacy", "--max-prompt-tokens", "100"],
    );
    assert_eq!(r["records"]["evaluated"].as_u64(), Some(total as u64 - 2), "{}", r["records"]["skipped"]);
    let skipped = r["records"]["skipped"].as_array().unwrap();
    let lines: Vec<u64> = skipped.iter().map(|s| s["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, empty);
    for s in skipped {
        assert_eq!((s["field"].as_str(), s["reason"].as_str()), (Some("alt"), Some("empty target")), "{s}");
    }
    // Without --run there is no unedited side.
    assert!(r["metrics"]["unedited"].is_null());
    assert_eq!(r["metrics"]["edited"]["efficacy"]["count"].as_u64(), Some(total as u64 - 2));
}

#[test]
fn smollm2_edits_raise_efficacy() {
    let Some(gguf) = smollm2_gguf() else { return };
    let tmp = TempDir::new().unwrap();
    let edits = write_lines(&tmp.path().join("cf10.jsonl"), &sample_lines("counterfact-sample.jsonl", 10));
    // Unedited efficacy on the first 10 records: the model mostly prefers the true answers.
    let before = eval_json(&gguf, &edits, &tmp.path().join("before.json"), &["--metrics", "efficacy"]);
    assert_eq!(before["records"]["evaluated"], 10);
    let e0 = mean(&before["metrics"]["edited"]["efficacy"]);
    assert!(e0 < 0.6, "unedited efficacy {e0}");

    let preset: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("configs/smollm2-135m.json")).unwrap(),
    )
    .unwrap();
    let mut hp = preset["hparams"].clone();
    hp["cov_tokens"] = serde_json::json!(20000);
    let hparams = write_json(&tmp.path().join("hparams.json"), &hp);
    let run_dir = tmp.path().join("run");
    let mut c = oedit_cmd();
    c.env("OEDIT_CACHE", tmp.path().join("cache")).args(["--threads", "2", "edit", "--model"]).arg(&gguf);
    c.arg("--hparams").arg(&hparams).arg("--edits").arg(&edits).arg("--run").arg(&run_dir);
    c.args(["--limit", "3", "--json"]);
    let o = run(c);
    assert_ok(&o);
    assert_eq!(edit_summary(&o)["edits_total"], 3);

    let after = eval_json(
        &gguf,
        &edits,
        &tmp.path().join("after.json"),
        &["--metrics", "efficacy", "--run", run_dir.to_str().unwrap()],
    );
    assert_eq!(after["records"]["evaluated"], 3);
    let edited = &after["metrics"]["edited"]["efficacy"];
    let unedited = mean(&after["metrics"]["unedited"]["efficacy"]);
    assert_eq!(edited["count"], 3);
    assert_eq!(mean(edited), 1.0, "edited efficacy {edited}");
    assert!(unedited < 1.0, "unedited efficacy on the edited records is already {unedited}");
}

/// The 256-record chunks of an evaluation are scored concurrently: more records than one chunk,
/// on one thread and on three, give the same per-record scores (teacher-forced, generation and
/// fluency), since the chunks depend on the record count only.
#[test]
fn concurrent_chunks_score_as_one_thread_does() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(&tmp.path().join("model"), TinyOpts::default());
    let edits = write_lines(&tmp.path().join("cf.jsonl"), &sample_lines("counterfact-sample.jsonl", 300));
    let report = |threads: &str| {
        let out = tmp.path().join(format!("t{threads}.json"));
        let mut c = oedit_cmd();
        c.env("OEDIT_CACHE", tmp.path().join("cache"));
        c.args(["--threads", threads, "eval", "--model"]).arg(&model).arg("--edits").arg(&edits);
        c.args(["--no-cache", "--per-record", "--gen-tokens", "8", "--json"]).arg(&out);
        c.args(["--metrics", "efficacy,generalization,locality,fluency,gen"]);
        assert_ok(&run(c));
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(r["records"]["evaluated"], 300);
        (r["metrics"].clone(), r["per_record"].clone())
    };
    let one = report("1");
    let three = report("3");
    assert_eq!(one.0, three.0);
    assert_eq!(one.1, three.1);
}

#[test]
fn eval_bounds_records_like_edit_skipping_those_past_the_caps() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(&tmp.path().join("model"), TinyOpts::default());
    let rec = |prompt: &str| {
        serde_json::json!({ "prompt": prompt, "subject": "The cat", "target": "mat" }).to_string()
    };
    let lines = vec![
        rec("The cat sat on the"),
        rec(&format!("The cat {}sat on the", "zq ".repeat(60))),
        format!(
            "{{\"prompt\": \"The cat {}\", \"subject\": \"The cat\", \"target\": \"mat\"}}",
            "a".repeat(300)
        ),
        rec("The cat lay on the"),
    ];
    let edits = write_lines(&tmp.path().join("e.jsonl"), &lines);
    let r = eval_json(
        &model,
        &edits,
        &tmp.path().join("r.json"),
        &["--metrics", "efficacy", "--max-line-bytes", "300"],
    );
    assert_eq!(r["records"]["evaluated"].as_u64(), Some(2));
    let skipped = r["records"]["skipped"].as_array().unwrap();
    let got: Vec<(u64, Option<&str>)> =
        skipped.iter().map(|s| (s["line"].as_u64().unwrap(), s["field"].as_str())).collect();
    assert_eq!(got, vec![(2, Some("prompt")), (3, None)], "{skipped:?}");
    assert!(skipped[0]["reason"].as_str().unwrap().contains("(--max-prompt-tokens)"), "{}", skipped[0]);
    assert!(skipped[1]["reason"].as_str().unwrap().contains("longer than 300 bytes"), "{}", skipped[1]);

    // A record a run edited must pass them: an error naming the line and the flag.
    let fx = Fx::new(2);
    let o = eval(&fx.model, &fx.edits, &["--run", fx.run_dir.to_str().unwrap(), "--max-prompt-tokens", "2"]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains(&format!("{}:1: field `", fx.edits.display())), "{line}");
    assert!(line.contains("give eval the --max-prompt-tokens its edit had"), "{line}");
    // --base applies without --run only.
    let o = eval(&fx.model, &fx.edits, &["--run", fx.run_dir.to_str().unwrap(), "--base", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
}
