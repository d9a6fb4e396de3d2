//! The real SmolLM2-135M-Instruct (Q4_1 GGUF, fetched by scripts/fetch-model.sh): tokenizer,
//! perplexity of a known paragraph (the rope-layout guard on a real model), greedy generation,
//! and export to a Hugging Face folder.

use std::sync::OnceLock;

use oedit::loader::LoadedModel;
use tempfile::TempDir;

use crate::common::*;

/// The model, loaded once for all tests; None when absent and skipping is allowed.
fn smollm2() -> Option<&'static LoadedModel> {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    let path = smollm2_gguf()?;
    Some(MODEL.get_or_init(|| load(&path)))
}

const PARIS: &str = "Paris is the capital and most populous city of France. Situated on the Seine River, in the north of the country, it is at the heart of the Ile-de-France region. The city is a major railway, highway and air-transport hub served by two international airports. Paris is known for its museums and architectural landmarks: the Louvre received 8.9 million visitors in 2023.";

#[test]
fn config_is_smollm2_135m() {
    let Some(lm) = smollm2() else { return };
    let c = lm.config();
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.kv_heads()),
        (576, 1536, 30, 9, 3)
    );
    assert_eq!(c.vocab_size, 49152);
    assert!(c.tie_word_embeddings);
    assert_eq!(lm.tok.vocab_size(), 49152);
}

#[test]
fn tokenizes_a_counterfact_prompt_exactly() {
    let Some(lm) = smollm2() else { return };
    let text = "The mother tongue of Danielle Darrieux is";
    let ids = lm.tok.encode_prompt(text).unwrap();
    assert_eq!(ids, vec![504, 3379, 10663, 282, 10789, 290, 9117, 3153, 4808, 314]);
    assert_eq!(lm.tok.decode(&ids).unwrap(), text);
}

#[test]
fn tokenizer_round_trips() {
    let Some(lm) = smollm2() else { return };
    for text in [
        "1995",
        "In 1995, 12345 people came.",
        "two  spaces   and three",
        "\n\t",
        "tab\tand\nnewline\n\n",
        "Café, naïve, Zürich, São Paulo, Ærø",
        "<|im_start|>user<|im_end|>",
        " leading space",
    ] {
        let ids = lm.tok.encode_prompt(text).unwrap();
        assert!(!ids.is_empty(), "{text:?}");
        assert_eq!(lm.tok.decode(&ids).unwrap(), text, "round trip of {text:?} ({ids:?})");
    }
    // Digits are split one by one, as SmolLM2's pre-tokenizer does.
    assert_eq!(lm.tok.encode_plain("1995").unwrap().len(), 4);
    // Chat markers are single special tokens.
    let ids = lm.tok.encode_prompt("<|im_start|>user<|im_end|>").unwrap();
    assert_eq!(ids.len(), 3, "{ids:?}");
}

#[test]
fn paragraph_nll_matches_reference() {
    let Some(lm) = smollm2() else { return };
    let s = oedit::infer::score_text(&lm.model, &lm.tok, PARIS).unwrap();
    assert_eq!(s.tokens, 86);
    assert!((s.mean_nll - 2.44859).abs() < 2e-3, "mean NLL {} (expected 2.44859)", s.mean_nll);
    assert!((s.perplexity - s.mean_nll.exp()).abs() < 1e-9);
}

#[test]
fn greedy_capital_of_france_is_paris() {
    let Some(lm) = smollm2() else { return };
    let out = oedit::infer::generate(&lm.model, &lm.tok, "The capital of France is", 5).unwrap();
    assert!(out.starts_with(" Paris"), "continuation {out:?}");
}

#[test]
fn export_to_hf_folder_reloads_identically() {
    let Some(lm) = smollm2() else { return };
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("smollm2-hf");
    oedit::export::export_hf(&lm.model, &lm.tok, &out).unwrap();
    let re = load(&out);
    assert_eq!(re.config().tie_word_embeddings, lm.config().tie_word_embeddings);
    let prompt = "The mother tongue of Danielle Darrieux is";
    let ids = lm.tok.encode_prompt(prompt).unwrap();
    assert_eq!(re.tok.encode_prompt(prompt).unwrap(), ids);
    assert_eq!(re.tok.encode_prompt(PARIS).unwrap(), lm.tok.encode_prompt(PARIS).unwrap());
    let d = max_abs_diff(&logits(&lm.model, &ids), &logits(&re.model, &ids));
    assert_eq!(d, 0.0, "exported model's logits differ by {d}");
}

#[test]
fn v_star_loss_trajectory_matches_the_plain_full_forward() {
    // The optimised v* path (prefix pass once, suffix-only steps on cached keys/values, fused
    // inference ops for the prefix, weight-gradient-free linears) against every step re-running
    // all 30 layers over the full prompts, on the first CounterFact edit.
    let Some(lm) = smollm2() else { return };
    let mut hp = oedit::presets::find("smollm2-135m").unwrap().unwrap().hparams;
    hp.v_steps = 6;
    hp.stop_loss = 0.0;
    let line = sample_lines("counterfact-sample.jsonl", 1).remove(0);
    let rec = oedit::data::parse_record(&line).unwrap();
    let templates: Vec<String> =
        ["{}", "The following is a story. {}", "I think that {}"].iter().map(|s| s.to_string()).collect();
    let p = oedit::edit::prompts::build(&lm.tok, &rec, &templates).unwrap();
    let fast = oedit::edit::target::compute_key_value(&lm.model, &p, &hp).unwrap().losses;
    let slow = crate::edit::reference_losses(&lm.model, &p, &hp);
    assert_eq!(fast.len(), 6);
    assert_eq!(fast.len(), slow.len());
    assert!(fast[5] < 0.5 * fast[0], "the loss did not fall: {fast:?}");
    for (s, (a, b)) in fast.iter().zip(&slow).enumerate() {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "step {s}: {a} vs {b} ({fast:?} vs {slow:?})");
    }
}
