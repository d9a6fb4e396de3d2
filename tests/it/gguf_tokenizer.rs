//! The tokenizer rebuilt from GGUF metadata honours `tokenizer.ggml.pre`: a Llama-3-style
//! byte-level BPE (`llama-bpe`, numbers in runs of up to three digits) gives exactly the ids of
//! the `tokenizers` crate on the equivalent tokenizer.json, and so do `qwen2`, `gpt-2`, `smollm`
//! and `tekken`; unknown values fall back with a warning. A SentencePiece GGUF (`llama`, with
//! scores and byte tokens) gives the ids of the Llama-2-style tokenizer.json (BPE with
//! `byte_fallback` and merges written by hand); other tokenizer models are refused clearly.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value;
use serde_json::json;
use tempfile::TempDir;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::Tokenizer;

use crate::common::*;

const BOT: &str = "<|begin_of_text|>";
const EOT: &str = "<|end_of_text|>";

/// Merges of the test vocabulary (byte-level symbols), including multi-digit number tokens.
const L3_MERGES: &[(&str, &str)] = &[
    ("1", "2"),
    ("12", "3"),
    ("4", "5"),
    ("45", "6"),
    ("2", "0"),
    ("20", "2"),
    ("9", "9"),
    ("99", "9"),
    ("1", "4"),
    ("14", "1"),
    ("5", "9"),
    ("6", "7"),
    ("0", "0"),
    ("00", "0"),
    ("I", "n"),
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("Ġ", "p"),
    ("e", "o"),
    ("l", "e"),
    ("p", "le"),
    ("'", "s"),
    ("'", "m"),
    ("l", "l"),
    ("'", "ll"),
    ("Ġ", "s"),
    ("u", "r"),
    ("Ġs", "ur"),
    ("Ċ", "Ċ"),
    ("Ġ", "Ġ"),
    ("Ã", "©"),
    ("c", "a"),
    ("ca", "t"),
    ("Ġ", "c"),
    ("Ġc", "at"),
    ("a", "t"),
    ("i", "n"),
    ("Ġ", "in"),
];

/// Tokens only reachable as whole pre-tokens (Llama-3's `ignore_merges` finds them).
const WHOLE: &[&str] = &["Ġpeople", "Ġworld"];

/// Texts with numbers, punctuation, contractions, newlines, unicode and a special token.
const TEXTS: &[&str] = &[
    "In 2024, 1234567 people",
    "3.14159",
    "x=99999",
    "   3 spaces 1000000 and 12.5%",
    "Hello, world! (yes) -- ok?!... [a]{b}",
    "I'm sure they'll say it's fine. DON'T YOU'LL",
    "line one\n\nline two\r\n  indented\tTab  \n",
    "café ñ 東京 🙂 naïve Ⅻ ١٢٣٤",
    "<|begin_of_text|>the 12 cats in 2024",
    "",
];

const NUMBERS: &str = "In 2024, 1234567 people";

/// Tokens in id order: the 256 byte-level characters (sorted), merge results, whole-word
/// tokens, then the two specials.
fn l3_tokens() -> Vec<String> {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let mut tokens: Vec<String> = alphabet.into_iter().map(String::from).collect();
    for (a, b) in L3_MERGES {
        let t = format!("{a}{b}");
        assert!(!tokens.contains(&t), "duplicate {t}");
        tokens.push(t);
    }
    tokens.extend(WHOLE.iter().map(|s| s.to_string()));
    tokens.push(BOT.into());
    tokens.push(EOT.into());
    tokens
}

/// The equivalent tokenizer.json: `pre_tokenizer` and `normalizer` as given, BPE with
/// `ignore_merges`, BOS added by a template, byte-level decoding.
fn reference(
    pre_tokenizer: serde_json::Value,
    normalizer: serde_json::Value,
    ignore_merges: bool,
) -> Tokenizer {
    let tokens = l3_tokens();
    let n = tokens.len();
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let merges: Vec<String> = L3_MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect();
    let added = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(n - 2, BOT), added(n - 1, EOT)],
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOT, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": BOT, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": BOT, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {BOT: {"id": BOT, "ids": [n - 2], "tokens": [BOT]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges
        }
    });
    Tokenizer::from_str(&tj.to_string()).unwrap()
}

/// Meta-Llama-3's tokenizer.json pre-tokenizer (copied here independently of the crate's).
fn llama3_reference() -> Tokenizer {
    let pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    reference(
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]}),
        serde_json::Value::Null,
        true,
    )
}

/// Qwen2's tokenizer.json normalizer and pre-tokenizer.
fn qwen2_reference() -> Tokenizer {
    let pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    reference(
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
        ]}),
        json!({"type": "NFC"}),
        false,
    )
}

/// GPT-2's tokenizer.json pre-tokenizer (ByteLevel with its own regex; digits grouped).
fn gpt2_reference() -> Tokenizer {
    reference(
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
        serde_json::Value::Null,
        false,
    )
}

/// SmolLM2's tokenizer.json pre-tokenizer (single digits, then ByteLevel with its regex).
fn smollm_reference() -> Tokenizer {
    reference(
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]}),
        serde_json::Value::Null,
        false,
    )
}

/// The tiny model's weights with the embedding and LM head resized to the test vocabulary.
fn l3_weights(seed: u64) -> Vec<(String, candle_core::Tensor)> {
    vocab_weights(l3_tokens().len(), seed)
}

/// The tiny model's weights with the embedding and LM head resized to `v` tokens.
fn vocab_weights(v: usize, seed: u64) -> Vec<(String, candle_core::Tensor)> {
    let mut rng = Rng::new(seed + 1000);
    tiny_weights(false, seed)
        .into_iter()
        .map(|(name, t)| match name.as_str() {
            "model.embed_tokens.weight" | "lm_head.weight" => {
                let t = rng.tensor(&[v, HIDDEN], 0.0, 0.5);
                (name, t)
            }
            _ => (name, t),
        })
        .collect()
}

/// Writes a GGUF with the test vocabulary and `tokenizer.ggml.pre = pre` (absent when None).
fn write_l3_gguf(path: &Path, pre: Option<&str>) -> PathBuf {
    let tokens = l3_tokens();
    let n = tokens.len();
    let token_type: Vec<Value> = (0..n).map(|i| Value::I32(if i >= n - 2 { 3 } else { 1 })).collect();
    let mut md = vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens.into_iter().map(Value::String).collect())),
        (
            "tokenizer.ggml.merges",
            Value::Array(L3_MERGES.iter().map(|(a, b)| Value::String(format!("{a} {b}"))).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(token_type)),
        ("tokenizer.ggml.bos_token_id", Value::U32((n - 2) as u32)),
        ("tokenizer.ggml.eos_token_id", Value::U32((n - 1) as u32)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
    ];
    if let Some(p) = pre {
        md.push(("tokenizer.ggml.pre", Value::String(p.into())));
    }
    write_tiny_gguf_with(path, &l3_weights(3), true, md);
    path.to_path_buf()
}

/// Loads a GGUF written with `pre` and checks every text against `reference`: same ids with and
/// without BOS, and decoding gives the text back.
fn assert_matches(pre: Option<&str>, reference: &Tokenizer) -> oedit::loader::LoadedModel {
    let tmp = TempDir::new().unwrap();
    let gg = load(&write_l3_gguf(&tmp.path().join("m.gguf"), pre));
    let n = l3_tokens().len() as u32;
    assert_eq!((gg.tok.bos_id, gg.tok.eos_id), (Some(n - 2), Some(n - 1)));
    assert_eq!(gg.config().vocab_size, n as usize);
    for text in TEXTS {
        let want = reference.encode(*text, true).unwrap().get_ids().to_vec();
        let got = gg.tok.encode_prompt(text).unwrap();
        assert_eq!(got, want, "pre {pre:?}, text {text:?}");
        let want_plain = reference.encode(*text, false).unwrap().get_ids().to_vec();
        assert_eq!(gg.tok.encode_plain(text).unwrap(), want_plain, "pre {pre:?}, plain {text:?}");
        assert_eq!(gg.tok.decode(&want_plain).unwrap(), *text, "pre {pre:?}, decoding {text:?}");
    }
    gg
}

fn token_strings(reference: &Tokenizer, text: &str) -> Vec<String> {
    reference.encode(text, false).unwrap().get_tokens().to_vec()
}

#[test]
fn llama_bpe_gguf_matches_llama3_tokenizer_json() {
    let reference = llama3_reference();
    // The reference really groups digits by three and uses the merges and whole-word tokens.
    assert_eq!(
        token_strings(&reference, NUMBERS),
        ["In", "Ġ", "202", "4", ",", "Ġ", "123", "456", "7", "Ġpeople"]
    );
    assert_eq!(token_strings(&reference, "x=99999"), ["x", "=", "999", "99"]);
    assert_eq!(token_strings(&reference, "3.14159"), ["3", ".", "141", "59"]);
    let gg = assert_matches(Some("llama-bpe"), &reference);
    // Some text actually exercises every rule (a sanity check of the test itself).
    let ids = gg.tok.encode_plain("I'm they'll café\n\n").unwrap();
    let toks: Vec<String> = ids.iter().map(|&i| l3_tokens()[i as usize].clone()).collect();
    assert_eq!(toks, ["I", "'m", "Ġthe", "y", "'ll", "Ġ", "ca", "f", "Ã©", "ĊĊ"]);
    // `llama3` is the same pre-tokenizer under another name.
    assert_matches(Some("llama3"), &reference);
}

/// The test can fail: the GPT-2-style paths (the old default, `smollm`, `gpt-2`) give other ids
/// for the number text than Llama-3's tokenizer.json.
#[test]
fn gpt2_style_split_differs_from_llama3_on_numbers() {
    let reference = llama3_reference();
    let want = reference.encode(NUMBERS, true).unwrap().get_ids().to_vec();
    let tmp = TempDir::new().unwrap();
    for pre in [None, Some("smollm"), Some("gpt-2")] {
        let gg = load(&write_l3_gguf(&tmp.path().join("g.gguf"), pre));
        let got = gg.tok.encode_prompt(NUMBERS).unwrap();
        assert_ne!(got, want, "pre {pre:?} agreed with Llama-3 on {NUMBERS:?}");
        assert_eq!(gg.tok.decode(&got).unwrap(), format!("{BOT}{NUMBERS}"));
    }
    // With single digits, "2024" is four tokens.
    let gg = load(&write_l3_gguf(&tmp.path().join("s.gguf"), Some("smollm")));
    assert_eq!(gg.tok.encode_plain("2024").unwrap().len(), 4);
}

#[test]
fn qwen2_gguf_matches_qwen2_tokenizer_json() {
    let reference = qwen2_reference();
    assert_eq!(token_strings(&reference, "x=99999"), ["x", "=", "9", "9", "9", "9", "9"]);
    assert_matches(Some("qwen2"), &reference);
}

#[test]
fn gpt2_and_smollm_ggufs_match_their_tokenizer_json() {
    let gpt2 = gpt2_reference();
    // GPT-2 keeps "99999" whole and merges it left to right: "99" + "999".
    assert_eq!(token_strings(&gpt2, "x=99999"), ["x", "=", "99", "999"]);
    assert_matches(Some("gpt-2"), &gpt2);
    let smollm = smollm_reference();
    assert_matches(Some("smollm"), &smollm);
    // No `pre` (older GGUFs) keeps the behaviour from before `pre` was read: SmolLM2's.
    assert_matches(None, &smollm);
}

/// An unknown `pre` loads with SmolLM2's split and a warning on stderr naming the value.
#[test]
fn unknown_pre_falls_back_with_a_warning() {
    let tmp = TempDir::new().unwrap();
    let gguf = tmp.path().join("u.gguf");
    write_tiny_gguf_with(
        &gguf,
        &tiny_weights(false, 5),
        true,
        vec![("tokenizer.ggml.pre", Value::String("made-up-pre".into()))],
    );
    let gg = load(&gguf);
    assert_eq!(gg.tok.encode_plain("2024").unwrap().len(), 4);
    let mut cmd = oedit_cmd();
    cmd.current_dir(tmp.path()).args([
        "score",
        "--model",
        gguf.to_str().unwrap(),
        "--text",
        "the cat",
        "--json",
    ]);
    let o = run(cmd);
    assert_ok(&o);
    let err = stderr(&o);
    assert!(err.contains("warning") && err.contains("`made-up-pre`"), "no warning naming the pre: {err}");
    // A known value gives no warning.
    let known = tmp.path().join("k.gguf");
    write_tiny_gguf_with(
        &known,
        &tiny_weights(false, 5),
        true,
        vec![("tokenizer.ggml.pre", Value::String("smollm".into()))],
    );
    let mut cmd = oedit_cmd();
    cmd.current_dir(tmp.path()).args([
        "score",
        "--model",
        known.to_str().unwrap(),
        "--text",
        "the cat",
        "--json",
    ]);
    let o = run(cmd);
    assert_ok(&o);
    assert!(!stderr(&o).contains("tokenizer.ggml.pre"), "{}", stderr(&o));
}

/// Tokenizer models other than byte-level BPE and SentencePiece are refused with an error naming
/// the model type.
#[test]
fn other_tokenizer_models_are_refused_clearly() {
    let tmp = TempDir::new().unwrap();
    for (model, needle) in [("bert", "SentencePiece"), ("t5", "`llama`")] {
        let gguf = tmp.path().join(format!("{model}.gguf"));
        write_tiny_gguf_with(
            &gguf,
            &tiny_weights(false, 6),
            true,
            vec![("tokenizer.ggml.model", Value::String(model.into()))],
        );
        let err = oedit::loader::load_model(gguf.to_str().unwrap(), &oedit::device::DeviceSpec::Cpu, None)
            .err()
            .unwrap_or_else(|| panic!("a `{model}` tokenizer loaded"));
        let msg = format!("{err:#}");
        assert!(msg.contains(&format!("`{model}`")) && msg.contains(needle), "{msg}");
        assert!(msg.contains("not supported"), "{msg}");
    }
}

/// Mistral-Nemo's tokenizer.json pre-tokenizer (tekken), copied here independently of the crate's.
fn tekken_reference() -> Tokenizer {
    let pattern = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    reference(
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]}),
        serde_json::Value::Null,
        true,
    )
}

#[test]
fn tekken_gguf_matches_mistral_nemo_tokenizer_json() {
    let reference = tekken_reference();
    // The reference splits single digits, case changes, and still finds whole-word tokens.
    assert_eq!(token_strings(&reference, "x=99999"), ["x", "=", "9", "9", "9", "9", "9"]);
    assert_eq!(token_strings(&reference, "InCa people"), ["In", "C", "a", "Ġpeople"]);
    assert_matches(Some("tekken"), &reference);
    // It really differs from Llama-3 (whose ids the `llama-bpe` GGUF gives).
    let tmp = TempDir::new().unwrap();
    let l3 = load(&write_l3_gguf(&tmp.path().join("l3.gguf"), Some("llama-bpe")));
    let want = reference.encode(NUMBERS, false).unwrap().get_ids().to_vec();
    assert_ne!(l3.tok.encode_plain(NUMBERS).unwrap(), want);
}

// ---- SentencePiece (`tokenizer.ggml.model = "llama"`) ----

const UNK: &str = "<unk>";
const S_BOS: &str = "<s>";
const S_EOS: &str = "</s>";
const SP: &str = "\u{2581}";

/// Multi-character pieces of the SentencePiece test vocabulary with their scores (the higher,
/// the earlier SentencePiece merges them), in id order after the 3 specials and 256 bytes.
const SPM_MERGED: &[(&str, f32)] = &[
    ("▁t", -1.0),
    ("he", -2.0),
    ("▁the", -3.0),
    ("in", -4.0),
    ("▁in", -5.0),
    ("at", -6.0),
    ("▁c", -7.0),
    ("▁cat", -8.0),
    ("▁▁", -9.0),
    ("▁▁▁▁", -10.0),
    ("on", -11.0),
    ("▁o", -12.0),
    ("▁on", -13.0),
];

/// Single characters of the test vocabulary (scores -100, -101, ...): no "ñ", CJK or emoji, so
/// those fall back to byte tokens.
const SPM_CHARS: &[&str] = &[
    "▁", "t", "h", "e", "i", "n", "a", "c", "o", "s", "r", "l", "d", "f", "é", "I", "T", "0", "1", "2", "3",
    "4", "5", "6", "7", "8", "9", ",", ".", "!", "'", "?",
];

/// The merges HF's converter derives from [`SPM_MERGED`]'s scores, written out by hand: every
/// split of a piece into two vocabulary pieces, highest score first; "▁on" splits two ways,
/// ordered by the ids of the halves ("▁o" comes before "▁" in the vocabulary).
const SPM_MERGES: &[(&str, &str)] = &[
    ("▁", "t"),
    ("h", "e"),
    ("▁t", "he"),
    ("i", "n"),
    ("▁", "in"),
    ("a", "t"),
    ("▁", "c"),
    ("▁c", "at"),
    ("▁", "▁"),
    ("▁▁", "▁▁"),
    ("o", "n"),
    ("▁", "o"),
    ("▁o", "n"),
    ("▁", "on"),
];

/// Texts with leading/inner runs of spaces, digits, punctuation, unicode outside the
/// vocabulary (byte fallback), newlines and tabs (bytes too), specials, and nothing.
const SPM_TEXTS: &[&str] = &[
    "the cat in the hat",
    "  the cat",
    "    on  and on",
    "In 2024, 1234567 cats!",
    "café ñ 東京 🙂",
    "line one\n\nline two\ttab ",
    "I'd say: the 3.14 cats?",
    " ",
    "",
];

/// Texts holding special tokens (after one, text gets its own "▁", as in llama.cpp).
const SPM_SPECIAL_TEXTS: &[&str] = &["<s>the cat</s>", "the<s> cat<unk>x"];

/// Tokens, scores and types in id order: `<unk>`, `<s>`, `</s>`, `<0x00>`…`<0xFF>`, the merged
/// pieces, the characters.
fn spm_vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens: Vec<String> = vec![UNK.into(), S_BOS.into(), S_EOS.into()];
    let mut scores = vec![0.0f32; 3];
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        scores.push(0.0);
        types.push(6);
    }
    for (p, s) in SPM_MERGED {
        tokens.push(p.to_string());
        scores.push(*s);
        types.push(1);
    }
    for (k, c) in SPM_CHARS.iter().enumerate() {
        tokens.push(c.to_string());
        scores.push(-100.0 - k as f32);
        types.push(1);
    }
    (tokens, scores, types)
}

/// The equivalent Llama-2-style tokenizer.json, written independently of the crate: BPE with
/// `byte_fallback`, `<unk>` fused, the hand-written merges; normalizer `Prepend("▁")` (when
/// `add_space_prefix`) + `Replace(" ", "▁")`; BOS by template; decoder `Replace("▁", " ")`,
/// `ByteFallback`, `Fuse`, `Strip(" ", 1, 0)` (when `add_space_prefix`).
fn spm_reference(add_space_prefix: bool, add_bos: bool) -> Tokenizer {
    let (tokens, _, _) = spm_vocab();
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let merges: Vec<String> = SPM_MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect();
    let added = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": SP});
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SP}, replace]})
    } else {
        json!({"type": "Sequence", "normalizers": [replace]})
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": SP}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let post = if add_bos {
        json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": S_BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": S_BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": S_BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {S_BOS: {"id": S_BOS, "ids": [1], "tokens": [S_BOS]}}
        })
    } else {
        serde_json::Value::Null
    };
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(0, UNK), added(1, S_BOS), added(2, S_EOS)],
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": UNK, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab, "merges": merges
        }
    });
    Tokenizer::from_str(&tj.to_string()).unwrap()
}

/// Writes a SentencePiece GGUF (no merges) with the test vocabulary. `add_bos` and
/// `add_space_prefix` are written only when given.
fn write_spm_gguf(path: &Path, add_bos: Option<bool>, add_space_prefix: Option<bool>) -> PathBuf {
    let (tokens, scores, types) = spm_vocab();
    let n = tokens.len();
    let mut md = vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.scores", Value::Array(scores.into_iter().map(Value::F32).collect())),
        ("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ];
    if let Some(b) = add_space_prefix {
        md.push(("tokenizer.ggml.add_space_prefix", Value::Bool(b)));
    }
    let mut remove = vec!["tokenizer.ggml.merges"];
    match add_bos {
        Some(b) => md.push(("tokenizer.ggml.add_bos_token", Value::Bool(b))),
        None => remove.push("tokenizer.ggml.add_bos_token"),
    }
    write_tiny_gguf_without(path, &vocab_weights(n, 11), true, md, &remove);
    path.to_path_buf()
}

/// Loads the SentencePiece GGUF and checks every text against `reference`: same ids with and
/// without special tokens, same decoding, and (texts without specials) decoding gives the text.
fn assert_spm_matches(gg: &oedit::loader::LoadedModel, reference: &Tokenizer) {
    for text in SPM_TEXTS.iter().chain(SPM_SPECIAL_TEXTS) {
        let want = reference.encode(*text, true).unwrap().get_ids().to_vec();
        assert_eq!(gg.tok.encode_prompt(text).unwrap(), want, "text {text:?}");
        let plain = reference.encode(*text, false).unwrap().get_ids().to_vec();
        assert_eq!(gg.tok.encode_plain(text).unwrap(), plain, "plain {text:?}");
        let decoded = reference.decode(&plain, false).unwrap();
        assert_eq!(gg.tok.decode(&plain).unwrap(), decoded, "decoding {text:?}");
        if !SPM_SPECIAL_TEXTS.contains(text) {
            assert_eq!(decoded, *text, "round trip of {text:?}");
        }
    }
}

#[test]
fn sentencepiece_gguf_matches_llama_tokenizer_json() {
    let reference = spm_reference(true, true);
    // The reference merges by score, falls back to bytes and keeps digits single.
    let toks = |t: &str| token_strings(&reference, t);
    assert_eq!(toks("the cat in the hat"), ["▁the", "▁cat", "▁in", "▁the", "▁", "h", "at"]);
    assert_eq!(toks("  the"), ["▁▁", "▁the"]);
    assert_eq!(toks("    on"), ["▁▁▁▁", "▁on"]);
    assert_eq!(toks("ñ 12"), ["▁", "<0xC3>", "<0xB1>", "▁", "1", "2"]);
    assert_eq!(toks("cat"), ["▁cat"]);
    let tmp = TempDir::new().unwrap();
    // No add_space_prefix key: llama.cpp's SentencePiece default (a space is prepended).
    let gg = load(&write_spm_gguf(&tmp.path().join("spm.gguf"), Some(true), None));
    let n = spm_vocab().0.len();
    assert_eq!((gg.tok.bos_id, gg.tok.eos_id), (Some(1), Some(2)));
    assert_eq!((gg.tok.vocab_size(), gg.config().vocab_size), (n, n));
    assert_spm_matches(&gg, &reference);
    assert_eq!(gg.tok.encode_prompt("the cat").unwrap(), [1, 259 + 2, 259 + 7]);
    // An answer continuing a prompt is its own "▁"-prefixed pieces.
    assert_eq!(gg.tok.encode_continuation("the", "cat").unwrap(), [259 + 7]);
    // The GGUF's tokenizer survives export as tokenizer.json.
    let saved = tmp.path().join("tokenizer.json");
    gg.tok.save(&saved).unwrap();
    let back = Tokenizer::from_file(&saved).unwrap();
    for text in SPM_TEXTS.iter().chain(SPM_SPECIAL_TEXTS) {
        let want = reference.encode(*text, true).unwrap().get_ids().to_vec();
        assert_eq!(back.encode(*text, true).unwrap().get_ids(), &want[..], "saved, {text:?}");
    }
}

/// Without `add_space_prefix` no "▁" is prepended (and none stripped when decoding): other ids
/// than with it, those of the reference without `Prepend`.
#[test]
fn sentencepiece_gguf_honours_add_space_prefix() {
    let tmp = TempDir::new().unwrap();
    let gg = load(&write_spm_gguf(&tmp.path().join("np.gguf"), Some(true), Some(false)));
    let reference = spm_reference(false, true);
    assert_eq!(token_strings(&reference, "the cat"), ["t", "he", "▁cat"]);
    assert_spm_matches(&gg, &reference);
    let with_prefix = spm_reference(true, true);
    assert_ne!(
        gg.tok.encode_plain("the cat").unwrap(),
        with_prefix.encode("the cat", false).unwrap().get_ids()
    );
}

/// `add_bos_token`: true or absent (llama.cpp's SentencePiece default) puts `<s>` first, false
/// does not; plain encodings never have it.
#[test]
fn sentencepiece_gguf_bos_handling() {
    let tmp = TempDir::new().unwrap();
    for (add_bos, want_bos) in [(Some(true), true), (None, true), (Some(false), false)] {
        let gg = load(&write_spm_gguf(&tmp.path().join("b.gguf"), add_bos, None));
        let reference = spm_reference(true, want_bos);
        assert_eq!(gg.tok.prompt_starts_with_bos(), want_bos, "add_bos_token {add_bos:?}");
        let ids = gg.tok.encode_prompt("the cat").unwrap();
        assert_eq!(ids.first() == Some(&1), want_bos, "add_bos_token {add_bos:?}: {ids:?}");
        assert_spm_matches(&gg, &reference);
        assert_eq!(gg.tok.encode_plain("the cat").unwrap(), [259 + 2, 259 + 7]);
    }
}

/// llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm`), written out for the test: a space
/// prepended, spaces as "▁", one symbol per character, then repeatedly merge the adjacent pair
/// whose concatenation is the vocabulary piece of highest score (leftmost on ties); a symbol not
/// in the vocabulary becomes its bytes' `<0xNN>` tokens.
fn llama_cpp_spm(tokens: &[String], scores: &[f32], text: &str) -> Vec<u32> {
    if text.is_empty() {
        return vec![];
    }
    let ids: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let text = format!(" {text}").replace(' ', SP);
    let mut syms: Vec<String> = text.chars().map(String::from).collect();
    loop {
        let mut best: Option<(usize, f32)> = None;
        for i in 0..syms.len().saturating_sub(1) {
            if let Some(&id) = ids.get(format!("{}{}", syms[i], syms[i + 1]).as_str()) {
                if best.is_none_or(|(_, s)| scores[id] > s) {
                    best = Some((i, scores[id]));
                }
            }
        }
        let Some((i, _)) = best else { break };
        let right = syms.remove(i + 1);
        syms[i].push_str(&right);
    }
    let mut out = Vec::new();
    for s in syms {
        match ids.get(s.as_str()) {
            Some(&id) => out.push(id as u32),
            None => out.extend(s.bytes().map(|b| ids[format!("<0x{b:02X}>").as_str()] as u32)),
        }
    }
    out
}

/// For a vocabulary whose merges follow its scores, the BPE-by-merge-rank tokenizer gives
/// llama.cpp's SentencePiece ids (texts without special tokens).
#[test]
fn sentencepiece_gguf_matches_llama_cpp_spm() {
    let (tokens, scores, _) = spm_vocab();
    // The reference implementation itself merges by score and falls back to bytes.
    let names = |ids: Vec<u32>| ids.iter().map(|&i| tokens[i as usize].clone()).collect::<Vec<_>>();
    assert_eq!(names(llama_cpp_spm(&tokens, &scores, "  the ñ")), ["▁▁", "▁the", "▁", "<0xC3>", "<0xB1>"]);
    let tmp = TempDir::new().unwrap();
    let gg = load(&write_spm_gguf(&tmp.path().join("cpp.gguf"), Some(true), None));
    for text in SPM_TEXTS {
        assert_eq!(gg.tok.encode_plain(text).unwrap(), llama_cpp_spm(&tokens, &scores, text), "{text:?}");
    }
}

/// A SentencePiece BPE vocabulary trained with Llama-2's settings (byte fallback, split digits)
/// and the ids SentencePiece itself gives for some texts (`scripts/spm_fixture.py`).
#[derive(serde::Deserialize)]
struct SpmFixture {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    cases: Vec<SpmCase>,
}

#[derive(serde::Deserialize)]
struct SpmCase {
    text: String,
    ids: Vec<u32>,
}

/// The GGUF tokenizer gives SentencePiece's own ids on a real trained vocabulary (1,000 pieces,
/// scores from training), and so does the written-out llama.cpp algorithm; decoding gives the
/// text back.
#[test]
fn sentencepiece_gguf_matches_real_sentencepiece() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/fixtures/spm-bpe.json");
    let fx: SpmFixture = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let n = fx.tokens.len();
    assert!(fx.cases.iter().any(|c| c.ids.iter().any(|&i| fx.types[i as usize] == 6)), "no byte fallback");
    let tmp = TempDir::new().unwrap();
    let gguf = tmp.path().join("real.gguf");
    let md = vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", Value::Array(fx.tokens.iter().cloned().map(Value::String).collect())),
        ("tokenizer.ggml.scores", Value::Array(fx.scores.iter().copied().map(Value::F32).collect())),
        ("tokenizer.ggml.token_type", Value::Array(fx.types.iter().copied().map(Value::I32).collect())),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
        ("tokenizer.ggml.add_space_prefix", Value::Bool(true)),
    ];
    write_tiny_gguf_without(&gguf, &vocab_weights(n, 12), true, md, &["tokenizer.ggml.merges"]);
    let gg = load(&gguf);
    for case in &fx.cases {
        let text = case.text.as_str();
        assert_eq!(gg.tok.encode_plain(text).unwrap(), case.ids, "{text:?}");
        assert_eq!(llama_cpp_spm(&fx.tokens, &fx.scores, text), case.ids, "llama.cpp form, {text:?}");
        let mut with_bos = vec![1];
        with_bos.extend(&case.ids);
        assert_eq!(gg.tok.encode_prompt(text).unwrap(), with_bos, "{text:?}");
        assert_eq!(gg.tok.decode(&case.ids).unwrap(), text, "decoding {text:?}");
    }
}

/// llama.cpp writes -1 for "no such token"; such ids, and ids past the vocabulary, are absent
/// (not wrapped to 4294967295), and a negative count in the metadata is refused clearly.
#[test]
fn negative_or_out_of_vocabulary_ids_are_absent_and_negative_counts_refused() {
    let tmp = TempDir::new().unwrap();
    let gguf = tmp.path().join("n.gguf");
    write_tiny_gguf_with(
        &gguf,
        &tiny_weights(false, 7),
        true,
        vec![
            ("tokenizer.ggml.eos_token_id", Value::I32(-1)),
            ("tokenizer.ggml.padding_token_id", Value::U32(1 << 20)),
        ],
    );
    let gg = load(&gguf);
    assert_eq!(gg.tok.eos_id, None);
    assert_eq!(gg.tok.bos_id, Some(bos_id()));
    assert_eq!(gg.tok.pad_id, bos_id());

    let bad = tmp.path().join("b.gguf");
    write_tiny_gguf_with(&bad, &tiny_weights(false, 7), true, vec![("llama.block_count", Value::I32(-1))]);
    let mut cmd = oedit_cmd();
    cmd.args(["score", "--model", bad.to_str().unwrap(), "--text", "the cat"]);
    let o = run(cmd);
    let line = assert_clean_failure(&o);
    assert!(line.contains("llama.block_count") && line.contains("not a non-negative integer"), "{line}");

    // The head dimension given explicitly (attention.key_length) loads the same model.
    let explicit = tmp.path().join("k.gguf");
    let key_length = vec![("llama.attention.key_length", Value::U32((HIDDEN / HEADS) as u32))];
    write_tiny_gguf_with(&explicit, &tiny_weights(false, 7), true, key_length);
    let plain = tmp.path().join("p.gguf");
    write_tiny_gguf(&plain, &tiny_weights(false, 7), true);
    let ids = sample_ids(7, 5);
    let (a, b) = (load(&explicit), load(&plain));
    assert_eq!(max_abs_diff(&logits(&a.model, &ids), &logits(&b.model, &ids)), 0.0);
    // Rope scaling stored as a frequency tensor is refused, not silently dropped.
    let scaled = tmp.path().join("r.gguf");
    let mut weights = tiny_weights(false, 7);
    weights.push((
        "rope_freqs.weight".into(),
        candle_core::Tensor::ones(HIDDEN / HEADS / 2, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap(),
    ));
    write_tiny_gguf(&scaled, &weights, true);
    let mut cmd = oedit_cmd();
    cmd.args(["score", "--model", scaled.to_str().unwrap(), "--text", "the cat"]);
    let line = assert_clean_failure(&run(cmd));
    assert!(line.contains("rope_freqs.weight") && line.contains("Hugging Face folder"), "{line}");
}
