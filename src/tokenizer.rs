//! Tokenizers: loading `tokenizer.json`, building a byte-level BPE tokenizer from GGUF metadata,
//! and the encode/decode conventions the editor relies on (BOS handling, target spacing).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

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

fn meta_u32(ct: &gguf_file::Content, key: &str) -> Option<u32> {
    let v = ct.metadata.get(key)?;
    v.to_u32()
        .ok()
        .or_else(|| v.to_i32().ok().map(|x| x as u32))
        .or_else(|| v.to_u64().ok().map(|x| x as u32))
}

fn meta_strings(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>> {
    meta(ct, key)?
        .to_vec()
        .with_context(|| format!("GGUF metadata `{key}` is not an array"))?
        .iter()
        .map(|v| v.to_string().cloned().with_context(|| format!("GGUF metadata `{key}` holds a non-string")))
        .collect()
}

/// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
///
/// Supports byte-level BPE (`tokenizer.ggml.model = "gpt2"`, as SmolLM2, Llama-3 and most
/// recent models use). The pipeline honours `add_space_prefix` and `add_bos_token` (candle's
/// built-in GGUF tokenizer prepends a space and gets SmolLM2 wrong).
pub fn tokenizer_from_gguf(ct: &gguf_file::Content) -> Result<Tok> {
    let model = meta(ct, "tokenizer.ggml.model")?.to_string().map_err(|e| anyhow!("{e}"))?.clone();
    if model != "gpt2" {
        bail!(
            "GGUF tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`); \
             use a Hugging Face model folder with tokenizer.json instead"
        );
    }
    let tokens = meta_strings(ct, "tokenizer.ggml.tokens")?;
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
        .build()
        .map_err(|e| anyhow!("building BPE from GGUF: {e}"))?;
    let add_prefix_space =
        ct.metadata.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(false);
    let mut tk = Tokenizer::new(bpe);
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(add_prefix_space, true, true)),
    ]);
    tk.with_pre_tokenizer(Some(pre));
    tk.with_decoder(Some(ByteLevelDecoder::default()));

    if let Ok(types) =
        meta(ct, "tokenizer.ggml.token_type").and_then(|v| v.to_vec().map_err(|e| anyhow!("{e}")))
    {
        let specials: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| t.to_i32().map(|x| x != 1).unwrap_or(false))
            .filter_map(|(i, _)| tokens.get(i))
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        tk.add_special_tokens(specials).map_err(tk_err)?;
    }
    let bos = meta_u32(ct, "tokenizer.ggml.bos_token_id");
    let eos = meta_u32(ct, "tokenizer.ggml.eos_token_id");
    let add_bos =
        ct.metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
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
    if let Some(p) = meta_u32(ct, "tokenizer.ggml.padding_token_id") {
        t.pad_id = p;
    }
    Ok(t)
}
