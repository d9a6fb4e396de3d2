//! Batched incremental decoding against plain one-prompt decoding (a full forward pass per
//! token, no cache), and the generation-based metrics (gen_efficacy, gen_generalization,
//! gen_locality) against an independent greedy decode, including a record where they and the
//! teacher-forced metric disagree.

use std::path::Path;

use oedit::data::EditReader;
use oedit::decode::{decode, greedy_pick, Request};
use oedit::eval::generation::{verdict, Verdict, SLACK_TOKENS};
use oedit::infer::greedy_ids;
use oedit::loader::LoadedModel;
use oedit::scoring::score_answers;
use serde_json::Value;

use crate::common::*;

/// Greedy continuation of `prompt` without batching or cache: a full forward pass per token.
fn plain_greedy(lm: &LoadedModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let l = logits(&lm.model, &seq).squeeze(0).unwrap();
        let next = l.get(seq.len() - 1).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
        if Some(next) == lm.tok.eos_id {
            break;
        }
        out.push(next);
        seq.push(next);
    }
    out
}

/// Checks batched decoding of `texts` (with and without drafts, and with a stop rule) against
/// plain decoding, `n` tokens each.
fn check_batched_equals_plain(lm: &LoadedModel, texts: &[&str], n: usize) {
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| lm.tok.encode_prompt(t).unwrap()).collect();
    let lens: std::collections::BTreeSet<usize> = prompts.iter().map(Vec::len).collect();
    assert!(lens.len() >= 3, "prompts of different lengths: {lens:?}");
    let plain: Vec<Vec<u32>> = prompts.iter().map(|p| plain_greedy(lm, p, n)).collect();
    assert!(plain.iter().any(|p| p.len() == n), "{plain:?}");
    assert_eq!(greedy_ids(&lm.model, &lm.tok, &prompts, n).unwrap(), plain, "batched vs plain");
    // Drafts (right, wrong, right then wrong, longer than the budget) change nothing.
    let mut reqs = Vec::new();
    for (p, g) in prompts.iter().zip(&plain) {
        let wrong: Vec<u32> = g.iter().map(|&t| (t + 1) % 200).collect();
        let half = [&g[..g.len() / 2], &wrong[g.len() / 2..]].concat();
        let long = [g.as_slice(), g.as_slice()].concat();
        for draft in [Vec::new(), g.clone(), wrong, half, long] {
            reqs.push(Request { prompt: p.clone(), draft, max_new: n });
        }
    }
    let got = decode(&lm.model, &lm.tok, &reqs, &mut greedy_pick, &mut |_, _| false).unwrap();
    for (k, g) in got.iter().enumerate() {
        assert_eq!(g, &plain[k / 5], "request {k} (draft {:?})", reqs[k].draft);
    }
    // A stop rule ends a continuation where it says so, the others go on.
    let got = decode(&lm.model, &lm.tok, &reqs[..10], &mut greedy_pick, &mut |i, t| i == 0 && t.len() == 2)
        .unwrap();
    assert_eq!(got[0], plain[0][..2.min(plain[0].len())]);
    assert_eq!(got[5], plain[1]);
}

fn generate_cli(model: &Path, prompt: &str, n: usize) -> String {
    let mut c = oedit_cmd();
    c.args(["--threads", "1", "generate", "--model"]).arg(model);
    c.args(["--prompt", prompt, "--max-tokens", &n.to_string(), "--json"]);
    let o = run(c);
    assert_ok(&o);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    v["completion"].as_str().unwrap().to_string()
}

#[test]
fn batched_decoding_equals_plain_decoding_on_the_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path(), TinyOpts::default());
    let lm = load(&path);
    let texts =
        ["the cat", "in the tin at the cat sat", "a", "hat", "the hat is in the tin at the", "cat in"];
    check_batched_equals_plain(&lm, &texts, 10);
    // `oedit generate` (one prompt) says the same as the batch.
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| lm.tok.encode_prompt(t).unwrap()).collect();
    let batch = greedy_ids(&lm.model, &lm.tok, &prompts, 10).unwrap();
    for (t, ids) in texts.iter().zip(&batch).take(3) {
        assert_eq!(generate_cli(&path, t, 10), lm.tok.decode(ids).unwrap(), "{t:?}");
    }
}

#[test]
fn batched_decoding_equals_plain_decoding_on_smollm2() {
    let Some(path) = smollm2_gguf() else { return };
    let lm = load(&path);
    let texts = [
        "The mother tongue of Danielle Darrieux is",
        "Paris is the capital of",
        "Toko Yasuda, the",
        "The official religion of Edwin of Northumbria is",
        "Autonomous University of Madrid, which is located in",
    ];
    check_batched_equals_plain(&lm, &texts, 8);
    let batch = greedy_ids(&lm.model, &lm.tok, &[lm.tok.encode_prompt(texts[1]).unwrap()], 8).unwrap();
    assert_eq!(generate_cli(&path, texts[1], 8), lm.tok.decode(&batch[0]).unwrap());
}

fn eval_report(model: &Path, edits: &Path, out: &Path, extra: &[&str]) -> Value {
    let mut c = oedit_cmd();
    c.env("OEDIT_CACHE", model.parent().unwrap().join("cache"));
    c.args(["--threads", "1", "eval", "--model"]).arg(model).arg("--edits").arg(edits);
    c.args(["--per-record", "--json"]).arg(out).args(extra);
    let o = run(c);
    assert_ok(&o);
    let table = stderr(&o);
    assert!(
        table.contains("protocol") && table.contains("gen_efficacy") && table.contains("generation"),
        "{table}"
    );
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

#[test]
fn generation_and_teacher_forcing_disagree_on_a_hand_made_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(&dir.path().join("model"), TinyOpts::default());
    let lm = load(&path);
    let prompt = "the cat sat in the";
    // Teacher forcing ranks one-letter answers; the greedy continuation starts with none of
    // the best ones.
    let letters: Vec<String> = ('a'..='z').map(String::from).collect();
    let pairs: Vec<(&str, &str)> = letters.iter().map(|l| (prompt, l.as_str())).collect();
    let scores = score_answers(&lm.model, &lm.tok, &pairs).unwrap();
    let greedy =
        lm.tok.decode(&plain_greedy(&lm, &lm.tok.encode_prompt(prompt).unwrap(), 1 + SLACK_TOKENS)).unwrap();
    let mut by_nll: Vec<usize> = (0..letters.len()).collect();
    by_nll.sort_by(|&a, &b| scores[a].mean_nll.total_cmp(&scores[b].mean_nll));
    let target = *by_nll.iter().find(|&&i| verdict(&greedy, &letters[i], true) == Verdict::Miss).unwrap();
    let truth = *by_nll.last().unwrap();
    assert!(scores[target].mean_nll < scores[truth].mean_nll);
    let rec = serde_json::json!({
        "case_id": 0, "prompt": prompt, "subject": "the cat", "target_new": letters[target], "ground_truth": letters[truth],
        "rephrase_prompt": prompt, "locality_prompt": "the hat", "locality_ground_truth": "a",
    });
    let edits = write_lines(&dir.path().join("r.jsonl"), &[rec.to_string()]);
    let r =
        eval_report(&path, &edits, &dir.path().join("r.json"), &["--metrics", "efficacy,generalization,gen"]);
    let m = &r["metrics"]["edited"];
    // Teacher forcing says the edit holds; the model's own greedy answer says it does not.
    assert_eq!(m["efficacy"]["mean"], 1.0, "{m}");
    assert_eq!(m["generalization"]["mean"], 1.0, "{m}");
    assert_eq!(m["gen_efficacy"]["mean"], 0.0, "{m}");
    assert_eq!(m["gen_generalization"]["mean"], 0.0, "{m}");
    assert_eq!(m["efficacy"]["protocol"], "teacher-forced");
    assert_eq!(m["gen_efficacy"]["protocol"], "generation");
    assert_eq!(r["per_record"][0]["edited"]["gen_efficacy"], 0.0);
    assert_eq!(r["protocol"]["metric_protocols"]["gen_generalization"], "generation");
    assert_eq!(r["protocol"]["metric_protocols"]["locality"], "teacher-forced");
    assert!(r["protocol"]["gen_efficacy"].as_str().unwrap().contains("greedy"));
    // A record without paraphrases has null for both kinds of generalization, not a missing key.
    let rec = serde_json::json!({
        "case_id": 2, "prompt": prompt, "subject": "the cat", "target_new": "a", "ground_truth": "b",
    });
    let edits = write_lines(&dir.path().join("p.jsonl"), &[rec.to_string()]);
    let r = eval_report(&path, &edits, &dir.path().join("p.json"), &["--metrics", "generalization,gen"]);
    let got = r["per_record"][0]["edited"].as_object().unwrap();
    for key in ["generalization", "gen_generalization", "gen_efficacy"] {
        assert!(got.contains_key(key), "{key} missing: {got:?}");
    }
    assert!(got["generalization"].is_null() && got["gen_generalization"].is_null(), "{got:?}");
    assert!(got["gen_efficacy"].is_number(), "{got:?}");

    // The other way round: the target is the greedy answer's first word, the "ground truth" an
    // answer teacher forcing prefers (a shorter one with a lower mean NLL, when there is one).
    let word: String = greedy.trim_start().chars().take_while(|c| c.is_alphanumeric()).collect();
    if !word.is_empty() && verdict(&greedy, &word, true) == Verdict::Match {
        let w = score_answers(&lm.model, &lm.tok, &[(prompt, word.as_str())]).unwrap()[0].mean_nll;
        if scores[by_nll[0]].mean_nll < w && letters[by_nll[0]] != word {
            let rec = serde_json::json!({
                "case_id": 1, "prompt": prompt, "subject": "the cat", "target_new": word, "ground_truth": letters[by_nll[0]],
            });
            let edits = write_lines(&dir.path().join("w.jsonl"), &[rec.to_string()]);
            let r = eval_report(
                &path,
                &edits,
                &dir.path().join("w.json"),
                &["--metrics", "efficacy,gen_efficacy"],
            );
            assert_eq!(r["metrics"]["edited"]["efficacy"]["mean"], 0.0);
            assert_eq!(r["metrics"]["edited"]["gen_efficacy"]["mean"], 1.0);
            eprintln!("reverse case checked: target {word:?}, greedy {greedy:?}");
        }
    }
}

/// gen_efficacy / gen_generalization of one record from plain greedy decoding.
fn expected_target_scores(
    lm: &LoadedModel,
    prompt: &str,
    paraphrases: &[String],
    target: &str,
) -> (f64, f64) {
    let hit = |p: &str| {
        let n = lm.tok.encode_continuation(p, target).unwrap().len() + SLACK_TOKENS;
        let text = lm.tok.decode(&plain_greedy(lm, &lm.tok.encode_prompt(p).unwrap(), n)).unwrap();
        (verdict(&text, target, true) == Verdict::Match) as u8 as f64
    };
    let para = paraphrases.iter().map(|p| hit(p)).sum::<f64>() / paraphrases.len().max(1) as f64;
    (hit(prompt), para)
}

#[test]
fn generation_metrics_match_plain_greedy_decoding_after_edits() {
    let fx = EditFx::new();
    let lines = sample_lines("counterfact-sample.jsonl", 4);
    let edits = fx.edits("cf.jsonl", &lines);
    let run_dir = fx.path("run");
    fx.edit_ok(&edits, &run_dir, &[]);
    let out = fx.path("r.json");
    let mut c = oedit_cmd();
    c.env("OEDIT_CACHE", &fx.cache);
    c.args(["--threads", "1", "eval", "--model"]).arg(&fx.model).arg("--edits").arg(&edits);
    c.args(["--run"])
        .arg(&run_dir)
        .args(["--metrics", "efficacy,locality,gen", "--per-record", "--json"])
        .arg(&out);
    assert_ok(&run(c));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let base = load(&fx.model);
    let edited = load(&export_run(&run_dir, &fx.path("edited")));
    let records: Vec<_> = EditReader::open(&edits).unwrap().map(|r| r.unwrap().1).collect();
    let mut differs = 0;
    for (i, rec) in records.iter().enumerate() {
        let pr = &r["per_record"][i];
        for (side, lm) in [("edited", &edited), ("unedited", &base)] {
            let (e, g) = expected_target_scores(lm, &rec.prompt, &rec.rephrase_prompts, &rec.target_new);
            assert_eq!(pr[side]["gen_efficacy"].as_f64(), Some(e), "record {i} {side}");
            assert_eq!(pr[side]["gen_generalization"].as_f64(), Some(g), "record {i} {side}");
        }
        // gen_locality: the edited model's greedy answers against the unedited model's.
        let mut same = 0.0;
        for l in &rec.locality {
            let n = base.tok.encode_continuation(&l.prompt, &l.answer).unwrap().len();
            let p = base.tok.encode_prompt(&l.prompt).unwrap();
            let eq = plain_greedy(&edited, &p, n) == plain_greedy(&base, &p, n);
            differs += !eq as usize;
            same += eq as u8 as f64;
        }
        let want = same / rec.locality.len() as f64;
        assert_eq!(pr["edited"]["gen_locality"].as_f64(), Some(want), "record {i}");
        assert_eq!(pr["unedited"]["gen_locality"].as_f64(), Some(1.0));
    }
    assert_eq!(r["metrics"]["unedited"]["gen_locality"]["mean"], 1.0);
    assert_eq!(r["metrics"]["edited"]["gen_locality"]["protocol"], "generation");
    assert_eq!(r["metrics"]["edited"]["locality"]["protocol"], "teacher-forced");
    eprintln!("neighbourhood answers changed by the edits: {differs}");
}
