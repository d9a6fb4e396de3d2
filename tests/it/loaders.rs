//! Loading the tiny model from a Hugging Face folder (single file, shards, tied or not), from a
//! hub-style cache through the CLI, and from a GGUF file in llama.cpp's layout.

use std::path::Path;

use candle_core::DType;
use tempfile::TempDir;

use crate::common::*;

const TEXT: &str = "the cat at the hat in the tin";

fn weight_names(lm: &oedit::loader::LoadedModel) -> Vec<String> {
    lm.model.named_weights().into_iter().map(|(n, _)| n).collect()
}

#[test]
fn hf_folder_single_file_untied_loads_and_runs() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_model(&tmp.path().join("m"), TinyOpts::default());
    let lm = load(&dir);
    let cfg = lm.config();
    assert_eq!(
        (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size),
        (HIDDEN, INTERMEDIATE, LAYERS, vocab_size())
    );
    assert_eq!((cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim()), (HEADS, KV_HEADS, HEAD_DIM));
    assert_eq!(lm.model.num_layers(), LAYERS);
    assert_eq!(lm.dtype, DType::F32);
    assert_eq!(lm.tok.bos_id, Some(bos_id()));
    assert_eq!(lm.tok.eos_id, Some(eos_id()));
    assert_eq!(lm.tok.vocab_size(), vocab_size());
    let names = weight_names(&lm);
    assert_eq!(names.len(), 2 + 9 * LAYERS + 1);
    assert!(names.contains(&"lm_head.weight".to_string()));

    let ids = lm.tok.encode_prompt(TEXT).unwrap();
    assert!(ids.len() >= 8, "{ids:?}");
    assert!(ids.contains(&256) && ids.contains(&258), "merges not applied: {ids:?}");
    assert_eq!(lm.tok.decode(&ids).unwrap(), TEXT);
    let l = logits(&lm.model, &ids);
    assert_eq!(l.dims(), &[1, ids.len(), vocab_size()]);
    let v: Vec<f32> = l.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    let spread = v.iter().cloned().fold(f32::MIN, f32::max) - v.iter().cloned().fold(f32::MAX, f32::min);
    assert!(spread > 1.0, "logits are nearly constant: spread {spread}");
}

#[test]
fn hf_folder_tied_has_no_lm_head_and_uses_embeddings() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_model(&tmp.path().join("m"), TinyOpts { tied: true, ..Default::default() });
    let lm = load(&dir);
    assert!(lm.config().tie_word_embeddings);
    let names = weight_names(&lm);
    assert!(!names.contains(&"lm_head.weight".to_string()));
    assert_eq!(names.len(), 1 + 9 * LAYERS + 1);

    // Tied head: logits = rms_norm(h) · Eᵀ, checked against a hand computation on the last
    // hidden state.
    let ids = sample_ids(6, 3);
    let batch = oedit::model::Batch::new(vec![ids.clone()], oedit::model::Padding::Right, 0).unwrap();
    let h = hidden_states(&lm.model, &batch);
    let w = lm.model.named_weights();
    let get = |n: &str| w.iter().find(|(k, _)| k == n).unwrap().1.clone();
    let norm = candle_nn::ops::rms_norm_slow(&h, &get("model.norm.weight"), RMS_EPS as f32).unwrap();
    let expect = norm.squeeze(0).unwrap().matmul(&get("model.embed_tokens.weight").t().unwrap()).unwrap();
    let got = logits(&lm.model, &ids).squeeze(0).unwrap();
    assert!(max_abs_diff(&got, &expect) < 1e-4);
}

#[test]
fn sharded_folder_matches_single_file() {
    let tmp = TempDir::new().unwrap();
    for tied in [false, true] {
        let single =
            tiny_model(&tmp.path().join(format!("single-{tied}")), TinyOpts { tied, ..Default::default() });
        let sharded = tiny_model(
            &tmp.path().join(format!("sharded-{tied}")),
            TinyOpts { tied, sharded: true, ..Default::default() },
        );
        assert!(!sharded.join("model.safetensors").exists());
        assert!(sharded.join("model-00002-of-00002.safetensors").is_file());
        let (a, b) = (load(&single), load(&sharded));
        let ids = sample_ids(9, 11);
        assert_eq!(max_abs_diff(&logits(&a.model, &ids), &logits(&b.model, &ids)), 0.0);
    }
}

#[test]
fn different_seeds_give_different_models() {
    let tmp = TempDir::new().unwrap();
    let a = load(&tiny_model(&tmp.path().join("a"), TinyOpts::default()));
    let b = load(&tiny_model(&tmp.path().join("b"), TinyOpts { seed: 8, ..Default::default() }));
    let ids = sample_ids(5, 1);
    assert!(max_abs_diff(&logits(&a.model, &ids), &logits(&b.model, &ids)) > 1e-2);
}

fn score_json(mut cmd: std::process::Command, model: &str, cwd: &Path) -> String {
    cmd.current_dir(cwd).args(["score", "--model", model, "--text", TEXT, "--json"]);
    let o = run(cmd);
    assert_ok(&o);
    let out = stdout(&o);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(v["mean_nll"].as_f64().unwrap() > 0.0);
    out
}

#[test]
fn hub_cache_via_hf_hub_cache_matches_folder() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_model(&tmp.path().join("m"), TinyOpts::default());
    let cache = tmp.path().join("cache");
    hub_cache(&cache, "tiny/llama", &dir);
    let from_folder = score_json(oedit_cmd(), dir.to_str().unwrap(), tmp.path());
    let mut cmd = oedit_cmd();
    cmd.env("HF_HUB_CACHE", &cache).env("HF_HUB_OFFLINE", "1");
    let from_hub = score_json(cmd, "tiny/llama", tmp.path());
    assert_eq!(from_hub, from_folder);
    // An explicit revision that the cache has under refs/ works too.
    let mut cmd = oedit_cmd();
    cmd.env("HF_HUB_CACHE", &cache).env("HF_HUB_OFFLINE", "1");
    assert_eq!(score_json(cmd, "tiny/llama@main", tmp.path()), from_folder);
    // A revision pinned to a commit hash has no refs/ entry (huggingface_hub writes none): its
    // snapshot folder is found directly.
    let mut cmd = oedit_cmd();
    cmd.env("HF_HUB_CACHE", &cache).env("HF_HUB_OFFLINE", "1");
    assert_eq!(score_json(cmd, &format!("tiny/llama@{FAKE_COMMIT}"), tmp.path()), from_folder);
    // A commit the cache does not have is missing, offline.
    let mut cmd = oedit_cmd();
    cmd.env("HF_HUB_CACHE", &cache).env("HF_HUB_OFFLINE", "1");
    cmd.current_dir(tmp.path()).args(["score", "--model", &format!("tiny/llama@{}", "f".repeat(40))]);
    cmd.args(["--text", TEXT]);
    let line = assert_clean_failure(&run(cmd));
    assert!(line.contains("HF_HUB_OFFLINE"), "{line}");
}

#[test]
fn hub_cache_with_shards_matches_folder() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_model(&tmp.path().join("m"), TinyOpts { sharded: true, ..Default::default() });
    let cache = tmp.path().join("cache");
    hub_cache(&cache, "tiny/sharded", &dir);
    let from_folder = score_json(oedit_cmd(), dir.to_str().unwrap(), tmp.path());
    let mut cmd = oedit_cmd();
    cmd.env("HF_HUB_CACHE", &cache).env("HF_HUB_OFFLINE", "1");
    assert_eq!(score_json(cmd, "tiny/sharded", tmp.path()), from_folder);
}

#[test]
fn hub_cache_via_hf_home_matches_folder() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_model(&tmp.path().join("m"), TinyOpts { tied: true, ..Default::default() });
    let home = tmp.path().join("hf-home");
    hub_cache(&home.join("hub"), "tiny/llama", &dir);
    let from_folder = score_json(oedit_cmd(), dir.to_str().unwrap(), tmp.path());
    let mut cmd = oedit_cmd();
    cmd.env("HF_HOME", &home).env("HF_HUB_OFFLINE", "1");
    assert_eq!(score_json(cmd, "tiny/llama", tmp.path()), from_folder);
}

#[test]
fn hub_repo_missing_offline_fails_with_instructions() {
    let tmp = TempDir::new().unwrap();
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let mut cmd = oedit_cmd();
    cmd.current_dir(tmp.path()).env("HF_HUB_CACHE", &cache).env("HF_HUB_OFFLINE", "1").args([
        "score",
        "--model",
        "nobody/absent-model",
        "--text",
        TEXT,
    ]);
    let line = assert_clean_failure(&run(cmd));
    assert!(line.contains("nobody/absent-model"), "{line}");
    assert!(line.contains("config.json"), "{line}");
    assert!(line.contains("HF_HUB_OFFLINE"), "{line}");
    assert!(line.contains(cache.to_str().unwrap()), "the cache searched is not named: {line}");
    assert!(line.contains("huggingface-cli download") && line.contains("--model"), "no instructions: {line}");
}

#[test]
fn hub_repo_missing_weights_offline_names_the_file() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_model(&tmp.path().join("m"), TinyOpts::default());
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let cache = tmp.path().join("cache");
    hub_cache(&cache, "tiny/noweights", &dir);
    let mut cmd = oedit_cmd();
    cmd.current_dir(tmp.path()).env("HF_HUB_CACHE", &cache).env("HF_HUB_OFFLINE", "1").args([
        "score",
        "--model",
        "tiny/noweights",
        "--text",
        TEXT,
    ]);
    let line = assert_clean_failure(&run(cmd));
    assert!(line.contains("tiny/noweights") && line.contains("model.safetensors"), "{line}");
}

fn gguf_vs_hf(tied: bool) {
    let tmp = TempDir::new().unwrap();
    let opts = TinyOpts { tied, seed: 21, ..Default::default() };
    let dir = tiny_model(&tmp.path().join("m"), opts);
    let gguf = tmp.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, &tiny_weights(tied, opts.seed), true);
    let hf = load(&dir);
    let gg = load(&gguf);

    let (a, b) = (hf.config(), gg.config());
    assert_eq!(
        (b.hidden_size, b.intermediate_size, b.num_hidden_layers, b.num_attention_heads, b.kv_heads()),
        (a.hidden_size, a.intermediate_size, a.num_hidden_layers, a.num_attention_heads, a.kv_heads())
    );
    assert_eq!(b.vocab_size, a.vocab_size);
    assert_eq!(b.tie_word_embeddings, tied);
    assert!((b.rope_theta - ROPE_THETA).abs() < 1e-6 && (b.rms_norm_eps - RMS_EPS).abs() < 1e-9);
    assert_eq!((gg.tok.bos_id, gg.tok.eos_id), (Some(bos_id()), Some(eos_id())));

    // The tokenizer rebuilt from GGUF metadata agrees with tokenizer.json.
    let ids = hf.tok.encode_prompt(TEXT).unwrap();
    assert_eq!(gg.tok.encode_prompt(TEXT).unwrap(), ids);
    assert_eq!(gg.tok.decode(&ids).unwrap(), TEXT);
    assert_eq!(gg.tok.encode_plain("<s>the</s>").unwrap(), hf.tok.encode_plain("<s>the</s>").unwrap());

    // Same weights after un-permuting Q/K, hence the same logits.
    let hw = hf.model.named_weights();
    for (name, t) in gg.model.named_weights() {
        let h = &hw.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("{name} missing")).1;
        assert_eq!(max_abs_diff(&t, h), 0.0, "{name} differs");
    }
    let ids = sample_ids(12, 5);
    let d = max_abs_diff(&logits(&gg.model, &ids), &logits(&hf.model, &ids));
    assert!(d < 1e-4, "GGUF and HF logits differ by {d}");
}

#[test]
fn gguf_untied_matches_hf_folder() {
    gguf_vs_hf(false);
}

#[test]
fn gguf_tied_matches_hf_folder() {
    gguf_vs_hf(true);
}

/// The rope-layout guard can fail: a GGUF whose Q/K rows were not permuted the llama.cpp way
/// loads into a different model.
#[test]
fn gguf_without_llama_cpp_permutation_differs() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_model(&tmp.path().join("m"), TinyOpts { seed: 21, ..Default::default() });
    let gguf = tmp.path().join("wrong.gguf");
    write_tiny_gguf(&gguf, &tiny_weights(false, 21), false);
    let (hf, gg) = (load(&dir), load(&gguf));
    let ids = sample_ids(12, 5);
    let d = max_abs_diff(&logits(&gg.model, &ids), &logits(&hf.model, &ids));
    assert!(d > 1e-3, "a wrong rope layout went unnoticed (diff {d})");
}

#[test]
fn gguf_cli_score_matches_folder() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_model(&tmp.path().join("m"), TinyOpts { seed: 4, ..Default::default() });
    let gguf = tmp.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, &tiny_weights(false, 4), true);
    let a: serde_json::Value =
        serde_json::from_str(&score_json(oedit_cmd(), dir.to_str().unwrap(), tmp.path())).unwrap();
    let b: serde_json::Value =
        serde_json::from_str(&score_json(oedit_cmd(), gguf.to_str().unwrap(), tmp.path())).unwrap();
    assert_eq!(a["tokens"], b["tokens"]);
    let (x, y) = (a["mean_nll"].as_f64().unwrap(), b["mean_nll"].as_f64().unwrap());
    assert!((x - y).abs() < 1e-5, "{x} vs {y}");
}
