//! The `oedit` binary: clean one-line errors for bad input, and generate/score/export on the
//! tiny model.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::common::*;

fn cmd_in(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut c = oedit_cmd();
    c.current_dir(dir).args(args);
    run(c)
}

fn score_fails(dir: &Path, model: &Path) -> String {
    assert_clean_failure(&cmd_in(dir, &["score", "--model", model.to_str().unwrap(), "--text", "the cat"]))
}

fn tiny_in(tmp: &TempDir, name: &str) -> PathBuf {
    tiny_model(&tmp.path().join(name), TinyOpts::default())
}

#[test]
fn missing_gguf_file() {
    let tmp = TempDir::new().unwrap();
    let line = score_fails(tmp.path(), Path::new("/nope/model.gguf"));
    assert!(line.contains("/nope/model.gguf") && line.contains("no such"), "{line}");
}

#[test]
fn folder_without_tokenizer() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_in(&tmp, "m");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let line = score_fails(tmp.path(), &dir);
    assert!(line.contains(dir.to_str().unwrap()) && line.contains("no tokenizer.json"), "{line}");
}

#[test]
fn folder_without_weights_or_config() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_in(&tmp, "m");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let line = score_fails(tmp.path(), &dir);
    assert!(line.contains(dir.to_str().unwrap()) && line.contains("model.safetensors"), "{line}");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let line = score_fails(tmp.path(), &dir);
    assert!(line.contains("config.json"), "{line}");
}

#[test]
fn sharded_folder_with_missing_shard() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_model(&tmp.path().join("m"), TinyOpts { sharded: true, ..Default::default() });
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let line = score_fails(tmp.path(), &dir);
    assert!(line.contains("model-00002-of-00002.safetensors") && line.contains("missing"), "{line}");
}

#[test]
fn truncated_safetensors() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_in(&tmp, "m");
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    for keep in [bytes.len() - 100, bytes.len() / 2, 5] {
        std::fs::write(&st, &bytes[..keep]).unwrap();
        let line = score_fails(tmp.path(), &dir);
        assert!(line.contains(st.to_str().unwrap()), "keep {keep}: {line}");
        assert!(line.contains("corrupt") || line.contains("truncated"), "keep {keep}: {line}");
    }
}

#[test]
fn garbage_safetensors_header() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_in(&tmp, "m");
    let st = dir.join("model.safetensors");
    // A plausible header length followed by bytes that are not JSON.
    let mut bad = 40u64.to_le_bytes().to_vec();
    bad.extend(b"\x00\x01garbage garbage garbage garbage garbag");
    bad.extend(vec![0u8; 256]);
    std::fs::write(&st, &bad).unwrap();
    let line = score_fails(tmp.path(), &dir);
    assert!(line.contains(st.to_str().unwrap()) && line.contains("corrupt"), "{line}");
    // Random bytes: an absurd header length.
    let mut rng = Rng::new(1);
    let junk: Vec<u8> = (0..4096).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(&st, &junk).unwrap();
    let line = score_fails(tmp.path(), &dir);
    assert!(line.contains(st.to_str().unwrap()) && line.contains("corrupt"), "{line}");
    // Valid JSON header whose tensor has no data.
    let header = br#"{"model.norm.weight":{"dtype":"F32","shape":[32],"data_offsets":[0,128]}}"#;
    let mut bad = (header.len() as u64).to_le_bytes().to_vec();
    bad.extend(header);
    std::fs::write(&st, &bad).unwrap();
    let line = score_fails(tmp.path(), &dir);
    assert!(line.contains(st.to_str().unwrap()) && line.contains("truncated"), "{line}");
    // A shape whose byte count wraps around u64 to the empty range it claims, and an end offset
    // past 2^64 - 8: refused, not taken at their wrapped values.
    for header in [
        br#"{"model.norm.weight":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#
            .to_vec(),
        br#"{"model.norm.weight":{"dtype":"F32","shape":[32],"data_offsets":[0,18446744073709551615]}}"#
            .to_vec(),
    ] {
        let mut bad = (header.len() as u64).to_le_bytes().to_vec();
        bad.extend(&header);
        std::fs::write(&st, &bad).unwrap();
        let line = score_fails(tmp.path(), &dir);
        assert!(line.contains(st.to_str().unwrap()), "{line}");
        assert!(line.contains("does not match its shape") || line.contains("truncated"), "{line}");
    }
}

#[test]
fn weights_missing_a_tensor() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_in(&tmp, "m");
    let st = dir.join("model.safetensors");
    let mut map = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).unwrap();
    map.remove("model.layers.2.mlp.up_proj.weight").unwrap();
    candle_core::safetensors::save(&map, &st).unwrap();
    let line = score_fails(tmp.path(), &dir);
    assert!(line.contains(dir.to_str().unwrap()), "{line}");
    assert!(line.contains("model.layers.2.mlp.up_proj.weight"), "{line}");
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> PathBuf {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&path, v.to_string()).unwrap();
    path
}

#[test]
fn config_missing_hidden_size() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_in(&tmp, "m");
    let cfg = edit_config(&dir, |m| {
        m.remove("hidden_size");
    });
    let line = score_fails(tmp.path(), &dir);
    assert!(line.contains(cfg.to_str().unwrap()) && line.contains("hidden_size"), "{line}");
}

#[test]
fn config_not_json() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_in(&tmp, "m");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let line = score_fails(tmp.path(), &dir);
    assert!(line.contains(dir.join("config.json").to_str().unwrap()), "{line}");
}

#[test]
fn unsupported_architecture() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_in(&tmp, "m");
    let cfg = edit_config(&dir, |m| {
        m.insert("architectures".into(), serde_json::json!(["GPT2LMHeadModel"]));
    });
    let line = score_fails(tmp.path(), &dir);
    assert!(line.contains("GPT2LMHeadModel") && line.contains("not supported"), "{line}");
    assert!(line.contains(cfg.to_str().unwrap()), "{line}");
    assert!(line.contains("LlamaForCausalLM"), "supported architectures not listed: {line}");
}

#[test]
fn unknown_short_name_lists_known_names() {
    let tmp = TempDir::new().unwrap();
    let line =
        assert_clean_failure(&cmd_in(tmp.path(), &["score", "--model", "not-a-model", "--text", "x y"]));
    assert!(line.contains("not-a-model"), "{line}");
    for name in ["smollm2-135m", "llama-2-7b", "llama-3-8b", "mistral-7b"] {
        assert!(line.contains(name), "known name {name} not listed: {line}");
    }
}

#[test]
fn existing_file_that_is_not_a_model() {
    let tmp = TempDir::new().unwrap();
    let f = tmp.path().join("weights.bin");
    std::fs::write(&f, b"hello").unwrap();
    let line = score_fails(tmp.path(), &f);
    assert!(line.contains(f.to_str().unwrap()), "{line}");
    // A .gguf file that is not GGUF.
    let g = tmp.path().join("fake.gguf");
    std::fs::write(&g, vec![7u8; 100]).unwrap();
    let line = score_fails(tmp.path(), &g);
    assert!(line.contains(g.to_str().unwrap()) && line.contains("GGUF"), "{line}");
}

#[test]
fn cuda_device_in_cpu_build() {
    if cfg!(feature = "cuda") {
        eprintln!("note: built with the cuda feature; the CPU-build error cannot be checked");
        return;
    }
    let tmp = TempDir::new().unwrap();
    let dir = tiny_in(&tmp, "m");
    for dev in ["cuda", "cuda:1"] {
        let out = cmd_in(
            tmp.path(),
            &["score", "--model", dir.to_str().unwrap(), "--device", dev, "--text", "the cat"],
        );
        let line = assert_clean_failure(&out);
        assert!(line.contains("--features cuda"), "{line}");
        // A device this build cannot use is a bad flag (exit 2), as the README's table says.
        assert_eq!(out.status.code(), Some(2), "{line}");
    }
    let line = assert_clean_failure(&cmd_in(
        tmp.path(),
        &["score", "--model", dir.to_str().unwrap(), "--device", "tpu", "--text", "the cat"],
    ));
    assert!(line.contains("tpu"), "{line}");
}

#[test]
fn invalid_dtype() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_in(&tmp, "m");
    let line = assert_clean_failure(&cmd_in(
        tmp.path(),
        &["score", "--model", dir.to_str().unwrap(), "--dtype", "f64", "--text", "the cat"],
    ));
    assert!(line.contains("f64") && line.contains("f32, bf16 or f16"), "{line}");
}

#[test]
fn score_needs_text_and_two_tokens() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_in(&tmp, "m");
    let line = assert_clean_failure(&cmd_in(tmp.path(), &["score", "--model", dir.to_str().unwrap()]));
    assert!(line.contains("--text") && line.contains("--file"), "{line}");
    let line = assert_clean_failure(&cmd_in(
        tmp.path(),
        &["score", "--model", dir.to_str().unwrap(), "--text", "a"],
    ));
    assert!(line.contains("at least 2"), "{line}");
    let missing = tmp.path().join("absent.txt");
    let line = assert_clean_failure(&cmd_in(
        tmp.path(),
        &["score", "--model", dir.to_str().unwrap(), "--file", missing.to_str().unwrap()],
    ));
    assert!(line.contains(missing.to_str().unwrap()), "{line}");
}

#[test]
fn score_json_and_text_output() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_in(&tmp, "m");
    let text = "the cat at the hat";
    let o = cmd_in(tmp.path(), &["score", "--model", dir.to_str().unwrap(), "--text", text, "--json"]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let tokens = v["tokens"].as_u64().unwrap() as usize;
    let nll = v["mean_nll"].as_f64().unwrap();
    let ppl = v["perplexity"].as_f64().unwrap();
    let lm = load(&dir);
    assert_eq!(tokens, lm.tok.encode_prompt(text).unwrap().len() - 1);
    assert!(nll > 0.0 && nll.is_finite());
    assert!((ppl - nll.exp()).abs() <= 1e-9 * ppl, "perplexity {ppl} != exp({nll})");
    let lib = oedit::infer::score_text(&lm.model, &lm.tok, text).unwrap();
    assert_eq!(lib.tokens, tokens);
    assert!((lib.mean_nll - nll).abs() < 1e-6, "{} vs {nll}", lib.mean_nll);

    // --file gives the same numbers; plain output has the three fields.
    let f = tmp.path().join("t.txt");
    std::fs::write(&f, text).unwrap();
    let o = cmd_in(
        tmp.path(),
        &["score", "--model", dir.to_str().unwrap(), "--file", f.to_str().unwrap(), "--json"],
    );
    assert_ok(&o);
    let w: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v, w);
    let o = cmd_in(tmp.path(), &["score", "--model", dir.to_str().unwrap(), "--text", text]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.contains("tokens") && out.contains("mean_nll") && out.contains("perplexity"), "{out}");
    assert!(out.contains(&format!("{}", tokens)), "{out}");
}

#[test]
fn generate_plain_and_json() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_in(&tmp, "m");
    let prompt = "the cat";
    let lm = load(&dir);
    let expect = oedit::infer::generate(&lm.model, &lm.tok, prompt, 6).unwrap();
    let gen_ids =
        oedit::infer::greedy_ids(&lm.model, &lm.tok, &[lm.tok.encode_prompt(prompt).unwrap()], 6).unwrap();
    assert!(!gen_ids[0].is_empty() && gen_ids[0].len() <= 6);

    let o = cmd_in(
        tmp.path(),
        &["generate", "--model", dir.to_str().unwrap(), "--prompt", prompt, "--max-tokens", "6"],
    );
    assert_ok(&o);
    assert_eq!(stdout(&o), format!("{prompt}{expect}\n"));
    let o = cmd_in(
        tmp.path(),
        &[
            "generate",
            "-m",
            dir.to_str().unwrap(),
            "-p",
            prompt,
            "--max-tokens",
            "6",
            "--json",
            "--threads",
            "2",
        ],
    );
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["prompt"], prompt);
    assert_eq!(v["completion"].as_str().unwrap(), expect);
}

#[test]
fn generate_greedy_matches_manual_argmax() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_in(&tmp, "m");
    let lm = load(&dir);
    let prompt = lm.tok.encode_prompt("the hat").unwrap();
    let got = oedit::infer::greedy_ids(&lm.model, &lm.tok, std::slice::from_ref(&prompt), 4).unwrap();
    let mut seq = prompt.clone();
    let mut manual = Vec::new();
    for _ in 0..4 {
        let l = logits(&lm.model, &seq);
        let last = l.squeeze(0).unwrap().get(seq.len() - 1).unwrap();
        let next = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        if next == eos_id() {
            break;
        }
        manual.push(next);
        seq.push(next);
    }
    assert_eq!(got[0], manual);
    // Batched prompts of different lengths give the same continuations as one at a time.
    let other = lm.tok.encode_prompt("in the tin at the cat").unwrap();
    let both = oedit::infer::greedy_ids(&lm.model, &lm.tok, &[prompt.clone(), other.clone()], 4).unwrap();
    let alone = oedit::infer::greedy_ids(&lm.model, &lm.tok, &[other], 4).unwrap();
    assert_eq!(both[0], manual);
    assert_eq!(both[1], alone[0]);
}

fn check_export_roundtrip(src: &Path, out: &Path) {
    let a = load(src);
    let b = load(out);
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(out.join(f).is_file(), "{f} not written");
    }
    assert_eq!(a.config().tie_word_embeddings, b.config().tie_word_embeddings);
    let text = "the cat at the hat <s> in 1995";
    assert_eq!(a.tok.encode_prompt(text).unwrap(), b.tok.encode_prompt(text).unwrap());
    let ids = sample_ids(11, 6);
    assert_eq!(max_abs_diff(&logits(&a.model, &ids), &logits(&b.model, &ids)), 0.0, "exported logits differ");
}

#[test]
fn export_cli_roundtrip_is_bit_exact() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_in(&tmp, "m");
    let out = tmp.path().join("exported");
    let o = cmd_in(tmp.path(), &["export", "--model", dir.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_ok(&o);
    check_export_roundtrip(&dir, &out);
    assert!(load(&out).model.named_weights().iter().any(|(n, _)| n == "lm_head.weight"));
    // Exporting again over the same folder works (files are replaced).
    let o = cmd_in(tmp.path(), &["export", "--model", dir.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_ok(&o);
    check_export_roundtrip(&dir, &out);
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    // The temporary copy of a killed export (its process gone) is swept by the next export.
    let stale = out.join(".model.safetensors.tmp-999999999");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), b"half").unwrap();
    assert_ok(&cmd_in(
        tmp.path(),
        &["export", "--model", dir.to_str().unwrap(), "--out", out.to_str().unwrap()],
    ));
    if cfg!(target_os = "linux") {
        assert!(!stale.exists());
    }
    // Exporting into the model's own folder would replace the weights it is read from.
    let before = std::fs::read(dir.join("model.safetensors")).unwrap();
    let same = tmp.path().join("m").join(".");
    let o =
        cmd_in(tmp.path(), &["export", "--model", dir.to_str().unwrap(), "--out", same.to_str().unwrap()]);
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains("--out") && line.contains("is the folder of the model"), "{line}");
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), before);
}

#[test]
fn export_tied_and_sharded_and_gguf_roundtrip() {
    let tmp = TempDir::new().unwrap();
    let tied = tiny_model(&tmp.path().join("tied"), TinyOpts { tied: true, ..Default::default() });
    let out = tmp.path().join("tied-out");
    let lm = load(&tied);
    oedit::export::export_hf(&lm.model, &lm.tok, &out).unwrap();
    check_export_roundtrip(&tied, &out);
    assert!(!load(&out).model.named_weights().iter().any(|(n, _)| n == "lm_head.weight"));

    let sharded = tiny_model(&tmp.path().join("sharded"), TinyOpts { sharded: true, ..Default::default() });
    let out = tmp.path().join("sharded-out");
    assert_ok(&cmd_in(
        tmp.path(),
        &["export", "--model", sharded.to_str().unwrap(), "--out", out.to_str().unwrap()],
    ));
    check_export_roundtrip(&sharded, &out);

    let gguf = tmp.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, &tiny_weights(false, 7), true);
    let out = tmp.path().join("gguf-out");
    assert_ok(&cmd_in(
        tmp.path(),
        &["export", "--model", gguf.to_str().unwrap(), "--out", out.to_str().unwrap()],
    ));
    let (g, e) = (load(&gguf), load(&out));
    let ids = sample_ids(11, 6);
    assert_eq!(max_abs_diff(&logits(&g.model, &ids), &logits(&e.model, &ids)), 0.0);
    let text = "the cat at the hat";
    assert_eq!(g.tok.encode_prompt(text).unwrap(), e.tok.encode_prompt(text).unwrap());
}

#[test]
fn bad_flag_values_are_input_errors() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_in(&tmp, "m");
    let m = model.to_str().unwrap();
    // Past the tiny model's context of 128 positions.
    let long_prompt = "the cat ".repeat(100);
    for (args, needle) in [
        (vec!["score", "--model", m, "--device", "gpu", "--text", "a"], "invalid device `gpu`"),
        (vec!["score", "--model", m, "--dtype", "f8", "--text", "a"], "invalid dtype `f8`"),
        (vec!["score", "--model", m], "--text"),
        (vec!["export", "--model", m, "--device", "cuda:x", "--out", "o"], "invalid device `cuda:x`"),
        (vec!["score", "--model", m, "--file", "."], "--file"),
        (vec!["score", "--model", m, "--text", ""], "at least 2 are needed"),
        (vec!["generate", "--model", m, "--prompt", ""], "--prompt: the prompt is empty"),
        (vec!["generate", "--model", m, "--prompt", "a", "--temperature", "1e-45"], "--temperature"),
        (vec!["generate", "--model", m, "--prompt", &long_prompt], "the model's context of 128"),
        (vec!["generate", "--model", m, "--prompt", "a", "--max-tokens", "500"], "--max-tokens 500: "),
        (vec!["score", "--model", "tiny/llama@", "--text", "a b"], "owner/name@revision"),
        (vec!["score", "--model", "tiny/llama@v1@v2", "--text", "a b"], "owner/name@revision"),
    ] {
        let o = cmd_in(tmp.path(), &args);
        let line = assert_clean_failure(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {line}");
        assert!(line.contains(needle), "{args:?}: {line}");
    }
}

#[test]
fn missing_edit_file_and_bad_hparams_fail_before_the_run_directory_exists() {
    let tmp = TempDir::new().unwrap();
    let model = tiny_in(&tmp, "m");
    let m = model.to_str().unwrap();
    let run = tmp.path().join("run");
    let o = cmd_in(
        tmp.path(),
        &["edit", "--model", m, "--edits", "missing.jsonl", "--run", run.to_str().unwrap()],
    );
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains("missing.jsonl") && line.contains("cannot open edit file"), "{line}");
    assert!(!run.exists());
    // A misspelt field inside a section is named with its line, in a bare file and in a preset.
    let edits = tmp.path().join("e.jsonl");
    std::fs::write(&edits, "{\"prompt\": \"Bob plays the\", \"subject\": \"Bob\", \"target\": \"harp\"}\n")
        .unwrap();
    for (name, text) in [
        ("bare.json", "{\"layer\": 1,\n \"v_steps\": 3,\n \"subspace\": {\"energy\": 0.9, \"bogus\": 1}}"),
        ("preset.json", "{\"name\": \"x\",\n \"hparams\": {\"layer\": 1,\n \"subspace\": {\"energy\": 0.9, \"bogus\": 1}}}"),
    ] {
        let hp = tmp.path().join(name);
        std::fs::write(&hp, text).unwrap();
        let args = ["edit", "--model", m, "--edits", edits.to_str().unwrap(), "--run", run.to_str().unwrap()];
        let o = cmd_in(tmp.path(), &[&args[..], &["--hparams", hp.to_str().unwrap()]].concat());
        let line = assert_clean_failure(&o);
        assert_eq!(o.status.code(), Some(2), "{line}");
        assert!(line.contains(hp.to_str().unwrap()) && line.contains("unknown field `bogus`"), "{line}");
        assert!(line.contains("line 3"), "{name}: {line}");
        assert!(!run.exists());
    }
    // A value out of range is named with its file before the model loads (the model path here
    // does not exist: its error would come first otherwise).
    let hp = tmp.path().join("zero-lr.json");
    let mut v = tiny_hparams();
    v["v_lr"] = serde_json::json!(0.0);
    std::fs::write(&hp, v.to_string()).unwrap();
    let args = ["edit", "--model", "no/such/model-folder", "--edits", edits.to_str().unwrap()];
    let o = cmd_in(
        tmp.path(),
        &[&args[..], &["--run", run.to_str().unwrap(), "--hparams", hp.to_str().unwrap()]].concat(),
    );
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains(hp.to_str().unwrap()) && line.contains("v_lr"), "{line}");
    assert!(!run.exists());
    // A layer the model does not have is found once the model is loaded, named with its file,
    // before the run directory is made.
    let hp = tmp.path().join("layer.json");
    let mut v = tiny_hparams();
    v["layer"] = serde_json::json!(40);
    std::fs::write(&hp, v.to_string()).unwrap();
    let args = ["edit", "--model", m, "--edits", edits.to_str().unwrap(), "--run", run.to_str().unwrap()];
    let o = cmd_in(tmp.path(), &[&args[..], &["--hparams", hp.to_str().unwrap()]].concat());
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains(hp.to_str().unwrap()) && line.contains("layer 40 out of range"), "{line}");
    assert!(!run.exists());
}

/// An error reported while stderr is a closed pipe still exits with its own code, not a panic's
/// 101 (`oedit … 2>&1 | head -1` closes both).
#[test]
fn error_with_closed_stderr_keeps_its_exit_code() {
    let tmp = TempDir::new().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut c = oedit_cmd();
    c.current_dir(tmp.path())
        .args(["score", "--model", "no-such-model", "--text", "the cat"])
        .stderr(writer)
        .stdout(std::process::Stdio::null());
    let status = c.status().unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}");
}

/// A sharded folder whose index lists no shard is refused with the index named, not a panic.
#[test]
fn index_without_shards_is_refused() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_in(&tmp, "m");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors.index.json"), r#"{"weight_map":{}}"#).unwrap();
    let line = score_fails(tmp.path(), &dir);
    assert!(line.contains("model.safetensors.index.json") && line.contains("no shard"), "{line}");
}
