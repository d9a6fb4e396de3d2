//! Packed answer scoring (`oedit::scoring::score_answers`: token tries of shared prompts and
//! prompt prefixes, several pairs per row, LM head at the answer positions only) against a plain reference: one pair per forward pass,
//! logits at every position.

use candle_core::{DType, IndexOp, D};
use oedit::data::parse_record;
use oedit::loader::LoadedModel;
use oedit::scoring::{score_answers, AnswerScore};
use tempfile::TempDir;

use crate::common::*;

/// The score of one pair from a forward pass over `prompt + answer[..-1]` alone.
fn reference(lm: &LoadedModel, prompt: &str, answer: &str) -> AnswerScore {
    let p = lm.tok.encode_prompt(prompt).unwrap();
    let a = lm.tok.encode_continuation(prompt, answer).unwrap();
    let mut row = p.clone();
    row.extend_from_slice(&a[..a.len().saturating_sub(1)]);
    let lg = logits(&lm.model, &row).i(0).unwrap().to_dtype(DType::F64).unwrap();
    let lse = lg.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap();
    let lp: Vec<Vec<f64>> = lg.broadcast_sub(&lse).unwrap().to_vec2().unwrap();
    let mut sum_nll = 0.0;
    let mut argmax = Vec::new();
    for (j, &t) in a.iter().enumerate() {
        let at = &lp[p.len() - 1 + j];
        sum_nll -= at[t as usize];
        let best = (0..at.len()).max_by(|&x, &y| at[x].total_cmp(&at[y])).unwrap();
        argmax.push(best as u32);
    }
    let n = a.len();
    let hits = argmax.iter().zip(&a).filter(|(x, y)| x == y).count();
    AnswerScore {
        tokens: n,
        sum_nll,
        mean_nll: sum_nll / n.max(1) as f64,
        token_accuracy: hits as f64 / n.max(1) as f64,
        argmax,
    }
}

fn assert_same(lm: &LoadedModel, pairs: &[(&str, &str)]) {
    let got = score_answers(&lm.model, &lm.tok, pairs).unwrap();
    assert_eq!(got.len(), pairs.len());
    for (g, (p, a)) in got.iter().zip(pairs) {
        let r = reference(lm, p, a);
        let what = format!("{p:?} → {a:?}: packed {g:?}, reference {r:?}");
        assert_eq!(g.tokens, r.tokens, "{what}");
        assert_eq!(g.argmax, r.argmax, "{what}");
        assert_eq!(g.token_accuracy, r.token_accuracy, "{what}");
        let tol = 1e-4 * r.sum_nll.abs().max(1e-2);
        assert!((g.sum_nll - r.sum_nll).abs() <= tol, "{what}");
        assert!((g.mean_nll - r.mean_nll).abs() <= tol, "{what}");
    }
}

#[test]
fn packed_scores_match_one_pair_per_forward_on_the_tiny_model() {
    let tmp = TempDir::new().unwrap();
    let lm = load(&tiny_model(&tmp.path().join("model"), TinyOpts::default()));
    let long = "A much longer prompt about the capital of a country, long enough to need a row of its own when packed";
    let pairs = [
        ("The capital of France is", " Paris"),
        ("The capital of France is", " Rome"),
        ("The capital of France is", " Paris"), // a repeated pair
        ("Danielle Darrieux speaks", "English"),
        ("Danielle Darrieux speaks", " French and also some English"),
        (long, " Berlin"),
        (long, " a city on a river"),
        ("x", " y"),
        ("Toko Yasuda plays the", " guitar"),
        ("The capital of France is", " Rome"),
        ("The capital of Spain is", " Madrid"), // shares its first tokens with the France prompt
        ("The capital of France is", " Parix"), // the same sequence as " Paris" but its last token
        ("The capital of France", " is Paris"), // a prefix of another prompt
    ];
    assert_same(&lm, &pairs);
    // The same pairs one at a time (a single tree per call).
    for pair in &pairs[..3] {
        assert_same(&lm, std::slice::from_ref(pair));
    }
}

#[test]
fn packed_scores_match_one_pair_per_forward_on_smollm2() {
    let Some(path) = smollm2_gguf() else { return };
    let lm = load(&path);
    let records: Vec<_> =
        sample_lines("counterfact-sample.jsonl", 8).iter().map(|l| parse_record(l).unwrap()).collect();
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for r in &records {
        let truth = r.ground_truth.as_deref().unwrap();
        for p in std::iter::once(&r.prompt).chain(&r.rephrase_prompts) {
            pairs.push((p, &r.target_new));
            pairs.push((p, truth));
        }
        for l in &r.locality {
            pairs.push((&l.prompt, &l.answer));
            pairs.push((&l.prompt, &r.target_new));
        }
    }
    assert_same(&lm, &pairs);
}
