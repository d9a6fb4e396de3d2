//! Fluency (ROME's generation entropy) against values computed by hand and by an independent
//! count of the greedy generations' word n-grams.

use std::collections::BTreeMap;

use oedit::data::parse_record;
use oedit::eval::{fluency_batch, ngram_entropy};
use oedit::infer::generate;

use crate::common::*;

/// Entropy (bits) of the word `n`-grams of `text`, counted independently of the crate.
fn entropy_by_count(text: &str, n: usize) -> f64 {
    let words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
    let mut counts: BTreeMap<Vec<String>, f64> = BTreeMap::new();
    let mut total = 0.0;
    for i in 0..words.len().saturating_sub(n - 1) {
        *counts.entry(words[i..i + n].to_vec()).or_default() += 1.0;
        total += 1.0;
    }
    counts.values().map(|c| -(c / total) * (c / total).log2()).sum()
}

#[test]
fn ngram_entropy_matches_hand_computed_values() {
    // "a b a b a": bigrams ab, ba, ab, ba → H₂ = 1 bit; trigrams aba, bab, aba → H₃ = h(1/3).
    let h3 = -(2.0f64 / 3.0 * (2.0f64 / 3.0).log2() + 1.0 / 3.0 * (1.0f64 / 3.0).log2());
    let want = (2.0 / 3.0 * 1.0 + 4.0 / 3.0 * h3) / 2.0;
    assert!((ngram_entropy("a b a b a") - want).abs() < 1e-12, "{} vs {want}", ngram_entropy("a b a b a"));
    assert!((want - 0.945_530_556_036).abs() < 1e-9);
    // Four distinct words: 3 equiprobable bigrams (log₂3) and 2 trigrams (1 bit).
    let want = (2.0 / 3.0 * 3f64.log2() + 4.0 / 3.0 * 1.0) / 2.0;
    assert!((ngram_entropy("w x y z") - want).abs() < 1e-12);
    // A degenerate repetition has no entropy, and too short a text has none either.
    assert_eq!(ngram_entropy("the the the the the"), 0.0);
    assert_eq!(ngram_entropy("one"), 0.0);
    // Whitespace of any kind separates words.
    assert_eq!(ngram_entropy("a\tb\na  b a"), ngram_entropy("a b a b a"));
}

#[test]
fn fluency_is_the_entropy_of_the_greedy_generation_from_each_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let lm = load(&tiny_model(dir.path(), TinyOpts::default()));
    let records: Vec<_> = minimal_lines(3).iter().map(|l| parse_record(l).unwrap()).collect();
    let gen_tokens = 12;
    let got = fluency_batch(&lm.model, &lm.tok, &records, gen_tokens).unwrap();
    assert_eq!(got.len(), records.len());
    for (rec, f) in records.iter().zip(&got) {
        // Minimal records have no generation prompts: the edit prompt is continued.
        let text =
            format!("{}{}", rec.prompt, generate(&lm.model, &lm.tok, &rec.prompt, gen_tokens).unwrap());
        let want = (2.0 / 3.0 * entropy_by_count(&text, 2) + 4.0 / 3.0 * entropy_by_count(&text, 3)) / 2.0;
        assert!((f - want).abs() < 1e-9, "{:?}: fluency {f}, by hand {want} ({text:?})", rec.prompt);
    }
}
