//! Tokenizers: loading `tokenizer.json`, building a byte-level BPE or SentencePiece tokenizer
//! from GGUF metadata, and the encode/decode conventions the editor relies on (BOS handling,
//! target spacing).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// A tokenizer plus the special ids the model uses.
#[derive(Clone)]
pub struct Tok {
    inner: Tokenizer,
    /// Beginning-of-sequence id, when the model has one.
    pub bos_id: Option<u32>,
    /// End-of-sequence id (generation stops there).
    pub eos_id: Option<u32>,
    /// Id used to pad batches.
    pub pad_id: u32,
}

fn tk_err(e: tokenizers::Error) -> anyhow::Error {
    anyhow!("{e}")
}

impl Tok {
    /// Wraps a `tokenizers` tokenizer.
    pub fn new(inner: Tokenizer, bos_id: Option<u32>, eos_id: Option<u32>) -> Self {
        let pad_id = eos_id.or(bos_id).unwrap_or(0);
        Self { inner, bos_id, eos_id, pad_id }
    }

    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path, bos_id: Option<u32>, eos_id: Option<u32>) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(tk_err)
            .with_context(|| format!("{}: not a valid tokenizer.json", path.display()))?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos = bos_id.or_else(|| find(&["<s>", "<|begin_of_text|>"]));
        let eos = eos_id.or_else(|| find(&["</s>", "<|end_of_text|>", "<|endoftext|>"]));
        Ok(Self::new(inner, bos, eos))
    }

    /// The underlying tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Writes `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(tk_err).with_context(|| format!("writing {}", path.display()))
    }

    /// Encodes a prompt, with the model's special tokens (e.g. BOS) as its tokenizer adds them.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, true).map_err(tk_err)?.get_ids().to_vec())
    }

    /// Whether [`Tok::encode_prompt`] puts the model's BOS token first (prompts are scored with
    /// it; text without it). The one place this is decided.
    pub fn prompt_starts_with_bos(&self) -> bool {
        self.bos_id.is_some_and(|b| self.encode_prompt("a").ok().and_then(|v| v.first().copied()) == Some(b))
    }

    /// Encodes text with no special tokens.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false).map_err(tk_err)?.get_ids().to_vec())
    }

    /// Tokens of `answer` as it continues `prompt` (a space is inserted between them unless the
    /// prompt ends with whitespace): the suffix of `encode(prompt + " " + answer)` after the
    /// prompt's own tokens, so that SentencePiece and byte-level tokenizers both get it right.
    pub fn encode_continuation(&self, prompt: &str, answer: &str) -> Result<Vec<u32>> {
        let sep = if prompt.is_empty() || prompt.ends_with(char::is_whitespace) { "" } else { " " };
        let answer = answer.trim();
        let p = self.encode_prompt(prompt)?;
        let full = self.encode_prompt(&format!("{prompt}{sep}{answer}"))?;
        if full.len() > p.len() && full[..p.len()] == p[..] {
            return Ok(full[p.len()..].to_vec());
        }
        self.encode_plain(&format!("{sep}{answer}"))
    }

    /// Decodes ids to text (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tk_err)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn meta<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata.get(key).with_context(|| format!("GGUF metadata key `{key}` is missing"))
}

/// A token id from the metadata; a negative value (llama.cpp's -1 for "none") or one past u32
/// is absent.
fn meta_u32(ct: &gguf_file::Content, key: &str) -> Option<u32> {
    let v = ct.metadata.get(key)?;
    v.to_u32()
        .ok()
        .or_else(|| v.to_i32().ok().and_then(|x| u32::try_from(x).ok()))
        .or_else(|| v.to_u64().ok().and_then(|x| u32::try_from(x).ok()))
}

fn meta_strings(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>> {
    meta(ct, key)?
        .to_vec()
        .with_context(|| format!("GGUF metadata `{key}` is not an array"))?
        .iter()
        .map(|v| v.to_string().cloned().with_context(|| format!("GGUF metadata `{key}` holds a non-string")))
        .collect()
}

/// Llama-3's split regex: the `Split` pre-tokenizer pattern of Meta-Llama-3's `tokenizer.json`
/// (also llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3`). Numbers go in runs of up to three digits.
pub const LLAMA3_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split regex: the `Split` pattern of Qwen2's `tokenizer.json` (llama.cpp's
/// `LLAMA_VOCAB_PRE_TYPE_QWEN2`): Llama-3's pattern with single digits (`\p{N}`).
pub const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Tekken's split regex (Mistral-Nemo and newer Mistral models): the `Split` pattern of their
/// `tokenizer.json`, quoted in llama.cpp's `LLAMA_VOCAB_PRE_TYPE_TEKKEN` (which runs an ASCII
/// rewrite of it). Words split at case changes (`HelloWorld` → `Hello`, `World`), single digits,
/// no contraction rule, `/` kept with a punctuation run.
pub const TEKKEN_SPLIT_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a byte-level BPE GGUF splits text before BPE, chosen from `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreSplit {
    /// GPT-2: `ByteLevel` with its built-in regex, digits grouped (GPT-2's `tokenizer.json`).
    Gpt2,
    /// Single digits, then GPT-2's `ByteLevel` regex: `Digits(individual)` + `ByteLevel`, as
    /// SmolLM2's and StarCoder's `tokenizer.json` (llama.cpp's `smollm`/`starcoder`). Also the
    /// behaviour when `tokenizer.ggml.pre` is absent, `default` or unknown.
    DigitsGpt2,
    /// Llama-3: `Split(LLAMA3_SPLIT_REGEX, Isolated)` + `ByteLevel` without its regex, and BPE
    /// with `ignore_merges` (a pre-token that is itself in the vocabulary is one token).
    Llama3,
    /// Qwen2: NFC, `Split(QWEN2_SPLIT_REGEX, Isolated)` + `ByteLevel` without its regex.
    Qwen2,
    /// Tekken (Mistral-Nemo): `Split(TEKKEN_SPLIT_REGEX, Isolated)` + `ByteLevel` without its
    /// regex, and BPE with `ignore_merges` (llama.cpp sets it for `tekken`, as for Llama-3).
    Tekken,
}

impl PreSplit {
    /// The split for a `tokenizer.ggml.pre` value (llama.cpp's names), or `None` when the value
    /// is not one of those this crate knows the exact rules of.
    ///
    /// - `llama-bpe`, `llama3`, `llama-v3`: [`PreSplit::Llama3`]
    /// - `qwen2`: [`PreSplit::Qwen2`]
    /// - `tekken`: [`PreSplit::Tekken`]
    /// - `gpt-2`, `gpt2`, `phi-2`: [`PreSplit::Gpt2`]
    /// - `smollm`, `starcoder`: [`PreSplit::DigitsGpt2`]
    pub fn from_pre(pre: &str) -> Option<Self> {
        Some(match pre {
            "llama-bpe" | "llama3" | "llama-v3" => Self::Llama3,
            "qwen2" => Self::Qwen2,
            "tekken" => Self::Tekken,
            "gpt-2" | "gpt2" | "phi-2" => Self::Gpt2,
            "smollm" | "starcoder" => Self::DigitsGpt2,
            _ => return None,
        })
    }

    /// The split for a GGUF's optional `tokenizer.ggml.pre`. An absent value, or `default` (what
    /// llama.cpp calls a missing value), gives [`PreSplit::DigitsGpt2`] silently: this crate's
    /// behaviour before it read `pre` (not llama.cpp's own `default` rules). An unknown value falls back to the same with a warning on stderr naming it,
    /// rather than refusing: the file still loads, and most byte-level BPE families differ only
    /// in how they group digits and punctuation.
    pub fn from_gguf_pre(pre: Option<&str>) -> Self {
        match pre {
            None | Some("default") => Self::DigitsGpt2,
            Some(p) => Self::from_pre(p).unwrap_or_else(|| {
                eprintln!(
                    "warning: GGUF tokenizer.ggml.pre `{p}` is not known to oedit; splitting text \
                     like SmolLM2 (single digits, GPT-2 regex), which may differ from the model's \
                     own tokenizer"
                );
                Self::DigitsGpt2
            }),
        }
    }

    /// Whether BPE looks a whole pre-token up in the vocabulary before merging.
    fn ignore_merges(self) -> bool {
        matches!(self, Self::Llama3 | Self::Tekken)
    }

    /// Whether llama.cpp adds BOS when the GGUF has no `tokenizer.ggml.add_bos_token` (it sets
    /// `add_bos` for `tekken`). Only the new `tekken` path follows it; the older splits keep
    /// this crate's earlier default (no BOS unless the file says so).
    fn adds_bos_by_default(self) -> bool {
        matches!(self, Self::Tekken)
    }

    /// Installs this split's normalizer and pre-tokenizer on `tk`.
    fn install(self, tk: &mut Tokenizer, add_prefix_space: bool) -> Result<()> {
        let split = |re: &str| -> Result<PreTokenizerWrapper> {
            let s = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| anyhow!("pre-tokenizer regex: {e}"))?;
            Ok(PreTokenizerWrapper::Split(s))
        };
        let byte_level =
            |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(add_prefix_space, true, use_regex));
        let seq = match self {
            Self::Gpt2 => vec![byte_level(true)],
            Self::DigitsGpt2 => vec![PreTokenizerWrapper::Digits(Digits::new(true)), byte_level(true)],
            Self::Llama3 => vec![split(LLAMA3_SPLIT_REGEX)?, byte_level(false)],
            Self::Qwen2 => {
                tk.with_normalizer(Some(NFC)).map_err(tk_err)?;
                vec![split(QWEN2_SPLIT_REGEX)?, byte_level(false)]
            }
            Self::Tekken => vec![split(TEKKEN_SPLIT_REGEX)?, byte_level(false)],
        };
        tk.with_pre_tokenizer(Some(Sequence::new(seq)));
        Ok(())
    }
}

/// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
///
/// - `tokenizer.ggml.model = "gpt2"`: byte-level BPE (SmolLM2, Llama-3, Qwen2, Mistral-Nemo and
///   most recent models), splitting text as `tokenizer.ggml.pre` says (see [`PreSplit`]) and
///   honouring `add_space_prefix` (candle's built-in GGUF tokenizer prepends a space and gets
///   SmolLM2 wrong).
/// - `tokenizer.ggml.model = "llama"`: SentencePiece BPE (Llama-2, Mistral-7B v0.1–v0.3), built
///   as Hugging Face's `LlamaConverter` writes it in `tokenizer.json` (see [`spm_tokenizer`]).
///
/// Both honour `add_bos_token`. The other llama.cpp models (`bert`, `t5`, `rwkv`, ...) are
/// refused with an error naming the model.
pub fn tokenizer_from_gguf(ct: &gguf_file::Content) -> Result<Tok> {
    let model = meta(ct, "tokenizer.ggml.model")?.to_string().map_err(|e| anyhow!("{e}"))?.clone();
    let tokens = || meta_strings(ct, "tokenizer.ggml.tokens");
    let (tk, tokens, add_bos_default) = match model.as_str() {
        "gpt2" => {
            let tokens = tokens()?;
            let (tk, add_bos_default) = byte_level_tokenizer(ct, &tokens)?;
            (tk, tokens, add_bos_default)
        }
        "llama" => {
            let tokens = tokens()?;
            (spm_tokenizer(ct, &tokens)?, tokens, true)
        }
        _ => bail!(
            "GGUF tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`, and \
             SentencePiece BPE, `llama`); use a Hugging Face model folder with tokenizer.json instead"
        ),
    };
    finish(ct, tk, &tokens, add_bos_default)
}

/// `tokenizer.ggml.token_type` (llama.cpp's types: normal 1, unknown 2, control 3,
/// user-defined 4, unused 5, byte 6), when the file has it.
fn token_types(ct: &gguf_file::Content, n: usize) -> Result<Option<Vec<i32>>> {
    let Some(v) = ct.metadata.get("tokenizer.ggml.token_type") else { return Ok(None) };
    let types = v
        .to_vec()
        .map_err(|e| anyhow!("GGUF metadata `tokenizer.ggml.token_type`: {e}"))?
        .iter()
        .map(|t| t.to_i32().or_else(|_| t.to_u32().map(|x| x as i32)).map_err(|e| anyhow!("{e}")))
        .collect::<Result<Vec<i32>>>()
        .context("GGUF metadata `tokenizer.ggml.token_type` holds a non-integer")?;
    if types.len() != n {
        bail!("GGUF has {} token types for {n} tokens", types.len());
    }
    Ok(Some(types))
}

fn meta_bool(ct: &gguf_file::Content, key: &str) -> Option<bool> {
    ct.metadata.get(key).and_then(|v| v.to_bool().ok())
}

/// Byte-level BPE (`gpt2`): the tokenizer and whether llama.cpp adds BOS when the file does not
/// say (`tekken`).
fn byte_level_tokenizer(ct: &gguf_file::Content, tokens: &[String]) -> Result<(Tokenizer, bool)> {
    let pre = match ct.metadata.get("tokenizer.ggml.pre") {
        Some(v) => {
            Some(v.to_string().map_err(|e| anyhow!("GGUF metadata `tokenizer.ggml.pre`: {e}"))?.clone())
        }
        None => None,
    };
    let split = PreSplit::from_gguf_pre(pre.as_deref());
    let merges_raw = meta_strings(ct, "tokenizer.ggml.merges")?;
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges = merges_raw
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').with_context(|| format!("GGUF merge `{m}` is not `a b`"))?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(split.ignore_merges())
        .build()
        .map_err(|e| anyhow!("building BPE from GGUF: {e}"))?;
    let add_prefix_space = meta_bool(ct, "tokenizer.ggml.add_space_prefix").unwrap_or(false);
    let mut tk = Tokenizer::new(bpe);
    split.install(&mut tk, add_prefix_space)?;
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    if let Some(types) = token_types(ct, tokens.len())? {
        let specials: Vec<AddedToken> = types
            .iter()
            .zip(tokens)
            .filter(|(t, _)| **t != 1)
            .map(|(_, t)| AddedToken::from(t.clone(), true))
            .collect();
        tk.add_special_tokens(specials).map_err(tk_err)?;
    }
    Ok((tk, split.adds_bos_by_default()))
}

/// The word-boundary mark of SentencePiece vocabularies (U+2581), standing for a space.
pub const SPM_SPACE: &str = "\u{2581}";

/// The merges of a SentencePiece BPE vocabulary, derived from its scores as Hugging Face's
/// converter (`SentencePieceExtractor`) does: every split of a piece into two pieces that are
/// both in the vocabulary is a merge; merges are ranked by the merged piece's score, highest
/// first, ties in vocabulary order, and a piece's own splits by the ids of their (left, right)
/// halves. Merging by these ranks is llama.cpp's `llm_tokenizer_spm` (merge the adjacent pair
/// whose concatenation has the highest score), up to the order of equal scores.
pub fn spm_merges(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    // A repeated piece (rare) is handled as the converter's Python dicts
    // do: it keeps its last id and score, at the place of its first occurrence.
    let mut ids: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        ids.insert(t.as_str(), i);
    }
    let mut seen = std::collections::HashSet::new();
    let mut merges: Vec<(usize, usize, f32)> = Vec::new();
    for piece in tokens {
        if !seen.insert(piece.as_str()) {
            continue;
        }
        let i = ids[piece.as_str()];
        let mut local: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(k, _)| Some((*ids.get(&piece[..k])?, *ids.get(&piece[k..])?)))
            .collect();
        local.sort_unstable();
        let score = scores.get(i).copied().unwrap_or(0.0);
        merges.extend(local.into_iter().map(|(l, r)| (l, r, score)));
    }
    merges.sort_by(|a, b| b.2.total_cmp(&a.2)); // stable: ties keep vocabulary order
    merges.into_iter().map(|(l, r, _)| (tokens[l].clone(), tokens[r].clone())).collect()
}

/// SentencePiece BPE (`tokenizer.ggml.model = "llama"`), as Hugging Face's `LlamaConverter`
/// writes it (the "legacy" Llama-2 `tokenizer.json`):
///
/// - model: BPE over `tokenizer.ggml.tokens` with the merges of [`spm_merges`] (from
///   `tokenizer.ggml.scores`; all 0 when absent), `byte_fallback` (a character not in the
///   vocabulary becomes its UTF-8 bytes as `<0xNN>` tokens) and `<unk>`
///   (`tokenizer.ggml.unknown_token_id`) for what has no byte tokens, fused;
/// - normalizer: `Prepend("▁")` when `tokenizer.ggml.add_space_prefix` (default true, as in
///   llama.cpp), then `Replace(" ", "▁")`; no pre-tokenizer;
/// - decoder: `Replace("▁", " ")`, `ByteFallback`, `Fuse`, then `Strip(" ", 1, 0)` when a space
///   is prepended;
/// - control and unknown tokens are special added tokens, user-defined ones plain added tokens
///   (both matched in the raw text before normalisation).
///
/// Text after a special token gets its own `▁` prefix, as in llama.cpp (and HF's legacy mode,
/// unlike the `Metaspace(prepend_scheme = "first")` form of newer tokenizer.json files).
pub fn spm_tokenizer(ct: &gguf_file::Content, tokens: &[String]) -> Result<Tokenizer> {
    let n = tokens.len();
    let scores: Vec<f32> = match ct.metadata.get("tokenizer.ggml.scores") {
        Some(v) => v
            .to_vec()
            .map_err(|e| anyhow!("GGUF metadata `tokenizer.ggml.scores`: {e}"))?
            .iter()
            .map(|s| s.to_f32().or_else(|_| s.to_f64().map(|x| x as f32)).map_err(|e| anyhow!("{e}")))
            .collect::<Result<_>>()
            .context("GGUF metadata `tokenizer.ggml.scores` holds a non-number")?,
        None => vec![0.0; n],
    };
    if scores.len() != n {
        bail!("GGUF has {} token scores for {n} tokens", scores.len());
    }
    let types = token_types(ct, n)?;
    let merges = spm_merges(tokens, &scores);
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let unk = match meta_u32(ct, "tokenizer.ggml.unknown_token_id") {
        Some(id) => Some(tokens.get(id as usize).context("unknown_token_id out of range")?.clone()),
        None => tokens.iter().find(|t| *t == "<unk>").cloned(),
    };
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(u) = unk {
        builder = builder.unk_token(u);
    }
    let bpe = builder.build().map_err(|e| anyhow!("building SentencePiece BPE from GGUF: {e}"))?;
    let add_space_prefix = meta_bool(ct, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
    let mut tk = Tokenizer::new(bpe);
    let replace = |from: &str, to: &str| Replace::new(from, to).map_err(|e| anyhow!("{e}"));
    let mut norm: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        norm.push(Prepend::new(SPM_SPACE.to_string()).into());
    }
    norm.push(replace(" ", SPM_SPACE)?.into());
    tk.with_normalizer(Some(NormalizerSequence::new(norm))).map_err(tk_err)?;
    let mut dec: Vec<DecoderWrapper> =
        vec![replace(SPM_SPACE, " ")?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        dec.push(Strip::new(' ', 1, 0).into());
    }
    tk.with_decoder(Some(DecoderSequence::new(dec)));
    if let Some(types) = types {
        let added: Vec<AddedToken> = types
            .iter()
            .zip(tokens)
            .filter_map(|(&ty, t)| match ty {
                2 | 3 => Some(AddedToken::from(t.clone(), true).normalized(false)),
                4 => Some(AddedToken::from(t.clone(), false).normalized(false)),
                _ => None,
            })
            .collect();
        tk.add_tokens(added).map_err(tk_err)?;
    }
    Ok(tk)
}

/// BOS template, special ids and padding, shared by both GGUF tokenizer kinds. `add_bos_default`
/// applies when the file has no `tokenizer.ggml.add_bos_token`.
fn finish(
    ct: &gguf_file::Content,
    mut tk: Tokenizer,
    tokens: &[String],
    add_bos_default: bool,
) -> Result<Tok> {
    // Ids past the vocabulary are treated as absent (they could never be generated or embedded).
    let in_vocab = |key: &str| meta_u32(ct, key).filter(|&id| (id as usize) < tokens.len());
    let bos = in_vocab("tokenizer.ggml.bos_token_id");
    let eos = in_vocab("tokenizer.ggml.eos_token_id");
    let add_bos = meta_bool(ct, "tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default && bos.is_some());
    if add_bos {
        let bos_id = bos.context("GGUF says add_bos_token but has no bos_token_id")?;
        let bos_tok = tokens.get(bos_id as usize).context("bos_token_id out of range")?.clone();
        let tp = TemplateProcessing::builder()
            .try_single(format!("{bos_tok}:0 $A:0"))
            .map_err(|e| anyhow!("{e}"))?
            .try_pair(format!("{bos_tok}:0 $A:0 {bos_tok}:1 $B:1"))
            .map_err(|e| anyhow!("{e}"))?
            .special_tokens(vec![(bos_tok, bos_id)])
            .build()
            .map_err(|e| anyhow!("{e}"))?;
        tk.with_post_processor(Some(tp));
    }
    let mut t = Tok::new(tk, bos, eos);
    if let Some(p) = in_vocab("tokenizer.ggml.padding_token_id") {
        t.pad_id = p;
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn pieces(split: PreSplit, text: &str) -> Vec<String> {
        let mut tk = Tokenizer::new(BPE::default());
        split.install(&mut tk, false).unwrap();
        let mut p = PreTokenizedString::from(text);
        tk.get_pre_tokenizer().unwrap().pre_tokenize(&mut p).unwrap();
        p.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_string())
            .collect()
    }

    #[test]
    fn pre_values_map_to_their_split() {
        for (pre, want) in [
            ("llama-bpe", PreSplit::Llama3),
            ("llama3", PreSplit::Llama3),
            ("qwen2", PreSplit::Qwen2),
            ("gpt-2", PreSplit::Gpt2),
            ("smollm", PreSplit::DigitsGpt2),
            ("starcoder", PreSplit::DigitsGpt2),
        ] {
            assert_eq!(PreSplit::from_pre(pre), Some(want), "{pre}");
        }
        assert_eq!(PreSplit::from_pre("tekken"), Some(PreSplit::Tekken));
        assert_eq!(PreSplit::from_pre("mistral-v7"), None);
        assert_eq!(PreSplit::from_gguf_pre(None), PreSplit::DigitsGpt2);
        assert_eq!(PreSplit::from_gguf_pre(Some("default")), PreSplit::DigitsGpt2);
        assert_eq!(PreSplit::from_gguf_pre(Some("no-such-pre")), PreSplit::DigitsGpt2);
    }

    #[test]
    fn llama3_groups_digits_by_three_and_others_do_not() {
        assert_eq!(pieces(PreSplit::Llama3, "x=1234567"), ["x", "=", "123", "456", "7"]);
        assert_eq!(pieces(PreSplit::Llama3, "I'M ok\n\n"), ["I", "'M", "Ġok", "ĊĊ"]);
        assert_eq!(pieces(PreSplit::Qwen2, "x=123"), ["x", "=", "1", "2", "3"]);
        assert_eq!(pieces(PreSplit::DigitsGpt2, " 123"), ["Ġ", "1", "2", "3"]);
        assert_eq!(pieces(PreSplit::Gpt2, "x=123"), ["x", "=", "123"]);
    }

    #[test]
    fn tekken_splits_case_changes_and_single_digits() {
        assert_eq!(pieces(PreSplit::Tekken, "HelloWorld x=12"), ["Hello", "World", "Ġx", "=", "1", "2"]);
        assert_eq!(pieces(PreSplit::Tekken, "I'm ECOLE a/b//\n"), ["I", "'m", "ĠECOLE", "Ġa", "/b", "//Ċ"]);
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn spm_merges_rank_by_score_then_vocabulary_order() {
        let tokens = strings(&["a", "b", "c", "ab", "bc", "abc", "ca"]);
        // "ab" and "bc" tie; "abc" splits two ways (both halves in the vocabulary), "ca" scores best.
        let scores = [0.0, 0.0, 0.0, -1.0, -1.0, -2.0, 5.0];
        let got = spm_merges(&tokens, &scores);
        let want = [("c", "a"), ("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")];
        let want: Vec<(String, String)> = want.iter().map(|(l, r)| (l.to_string(), r.to_string())).collect();
        assert_eq!(got, want);
    }
}
