//! The tokenizer rebuilt from GGUF metadata honours `tokenizer.ggml.pre`: a Llama-3-style
//! byte-level BPE (`llama-bpe`, numbers in runs of up to three digits) gives exactly the ids of
//! the `tokenizers` crate on the equivalent tokenizer.json, and so do `qwen2`, `gpt-2` and
//! `smollm`; unknown values fall back with a warning; SentencePiece GGUFs are refused clearly.

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
    let v = l3_tokens().len();
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

/// SentencePiece GGUFs (`tokenizer.ggml.model = "llama"`, Llama-2/Mistral) are refused with an
/// error naming the model type, as is any other non-BPE model.
#[test]
fn sentencepiece_gguf_is_refused_clearly() {
    let tmp = TempDir::new().unwrap();
    for (model, needle) in [("llama", "SentencePiece"), ("bert", "`bert`")] {
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
