//! Inference helpers: teacher-forced scoring, greedy and sampled generation.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use candle_transformers::generation::LogitsProcessor;

use crate::model::{Batch, Captured, LayerCtx, Llama, Mode, Padding, Taps};
use crate::tokenizer::Tok;

/// The result of scoring a text.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TextScore {
    /// Number of predicted (scored) tokens.
    pub tokens: usize,
    /// Mean negative log-likelihood per scored token (nats).
    pub mean_nll: f64,
    /// exp(mean_nll).
    pub perplexity: f64,
}

/// Log-softmax over the last dimension, in f32.
pub fn log_softmax(logits: &Tensor) -> candle_core::Result<Tensor> {
    let l = logits.to_dtype(DType::F32)?;
    l.broadcast_sub(&l.log_sum_exp(D::Minus1)?.unsqueeze(D::Minus1)?)
}

/// Teacher-forced NLL of `text` (every token after the first is predicted from its prefix;
/// with a BOS token the first text token is scored too).
pub fn score_text(model: &Llama, tok: &Tok, text: &str) -> Result<TextScore> {
    let ids = tok.encode_prompt(text)?;
    if ids.len() < 2 {
        bail!("text has {} token(s); at least 2 are needed to score it", ids.len());
    }
    let batch = Batch::new(vec![ids.clone()], Padding::Right, tok.pad_id)?;
    let (logits, _) = model.forward(&batch, &Taps::default())?;
    let lp = log_softmax(&logits.squeeze(0)?)?;
    let n = ids.len() - 1;
    let targets = Tensor::new(&ids[1..], model.device())?.unsqueeze(1)?;
    let picked = lp.narrow(0, 0, n)?.gather(&targets, 1)?.squeeze(1)?;
    let sum: f32 = picked.sum_all()?.to_scalar()?;
    let mean_nll = -(sum as f64) / n as f64;
    Ok(TextScore { tokens: n, mean_nll, perplexity: mean_nll.exp() })
}

/// Greedy continuation of each prompt, up to `max_tokens` new tokens (stops at EOS).
/// Returns the generated token ids per prompt.
pub fn greedy_ids(
    model: &Llama,
    tok: &Tok,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    decode_ids(model, tok, prompts, max_tokens, &mut |logits| Ok(logits.argmax(D::Minus1)?.to_vec1()?))
}

/// Continuation of each prompt, up to `max_tokens` new tokens (stops at EOS), with the next
/// token of every row chosen by `pick` from the rows' last logits `[rows, vocab]`.
///
/// Incremental decoding: one full pass over the (left-padded) prompts, then one token per row
/// and step against the cached keys/values of every layer.
pub fn decode_ids(
    model: &Llama,
    tok: &Tok,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    pick: &mut dyn FnMut(&Tensor) -> Result<Vec<u32>>,
) -> Result<Vec<Vec<u32>>> {
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut out = vec![Vec::new(); prompts.len()];
    let mut done = vec![false; prompts.len()];
    if max_tokens == 0 {
        return Ok(out);
    }
    let n_layers = model.num_layers();
    let mut batch = Batch::new(seqs.clone(), Padding::Left, tok.pad_id)?;
    let ctx = LayerCtx::new(model, &batch, Mode::Inference)?;
    let mut cap = Captured::default();
    let taps = Taps { capture_kv: true, ..Default::default() };
    let h = model.run_layers(model.embed(&batch)?, 0..n_layers, &ctx, &taps, &mut cap)?;
    let mut cache = std::mem::take(&mut cap.kv);
    let mut last = h.narrow(1, batch.seq_len() - 1, 1)?;
    for step in 0..max_tokens {
        let next = pick(&model.logits(&last, Mode::Inference)?.squeeze(1)?)?;
        for (i, &t) in next.iter().enumerate() {
            if !done[i] && Some(t) == tok.eos_id {
                done[i] = true;
            }
            if !done[i] {
                out[i].push(t);
            }
            // Every row grows by one token so that left-padded indices stay put.
            seqs[i].push(t);
        }
        if step + 1 == max_tokens || done.iter().all(|d| *d) {
            break;
        }
        batch = Batch::new(seqs.clone(), Padding::Left, tok.pad_id)?;
        let starts: Vec<usize> = seqs.iter().map(|s| s.len() - 1).collect();
        let suffix = LayerCtx::suffix(model, &batch, &starts, Mode::Inference)?;
        for (k, v) in cache.iter_mut() {
            let pad = |x: &Tensor| -> Result<Tensor> {
                let (b, n, _, hd) = x.dims4()?;
                Ok(Tensor::cat(&[x, &Tensor::zeros((b, n, 1, hd), x.dtype(), x.device())?], 2)?)
            };
            *k = pad(k)?;
            *v = pad(v)?;
        }
        let d = model.config().hidden_size;
        let h_new = model.embed(&batch)?.reshape(((), d))?.index_select(&suffix.gather, 0)?.reshape((
            seqs.len(),
            1,
            d,
        ))?;
        let mut cap = Captured::default();
        let taps = Taps { capture_kv: true, kv_cache: Some(&cache), ..Default::default() };
        last = model.run_layers(h_new, 0..n_layers, &suffix.ctx, &taps, &mut cap)?;
        cache = cap.kv;
    }
    Ok(out)
}

/// Greedy continuation of one text prompt, decoded.
pub fn generate(model: &Llama, tok: &Tok, prompt: &str, max_tokens: usize) -> Result<String> {
    let ids = prompt_ids(tok, prompt)?;
    let gen = greedy_ids(model, tok, &[ids], max_tokens)?;
    tok.decode(&gen[0])
}

/// Sampled continuation of one text prompt, decoded: each token drawn by `sampler`
/// (candle-transformers' temperature / top-k / top-p sampler; the same seed gives the same text).
pub fn generate_sampled(
    model: &Llama,
    tok: &Tok,
    prompt: &str,
    max_tokens: usize,
    sampler: &mut LogitsProcessor,
) -> Result<String> {
    let ids = prompt_ids(tok, prompt)?;
    let gen = decode_ids(model, tok, &[ids], max_tokens, &mut |logits| {
        (0..logits.dim(0)?).map(|i| Ok(sampler.sample(&logits.get(i)?)?)).collect()
    })?;
    tok.decode(&gen[0])
}

fn prompt_ids(tok: &Tok, prompt: &str) -> Result<Vec<u32>> {
    let ids = tok.encode_prompt(prompt)?;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    Ok(ids)
}
