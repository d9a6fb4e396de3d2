//! Inference helpers: teacher-forced text scoring, greedy and sampled generation.

use anyhow::Result;
use candle_core::{DType, Tensor, D};
use candle_transformers::generation::LogitsProcessor;

use crate::decode::{decode, greedy_pick, no_stop, Pick, Request};
use crate::errors::InputError;
use crate::model::{Batch, Llama, Padding, Taps};
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
        return Err(InputError(format!(
            "text has {} token(s); at least 2 are needed to score it",
            ids.len()
        ))
        .into());
    }
    if let Some(context) = model.config().max_position_embeddings.filter(|&c| ids.len() > c) {
        return Err(InputError(format!(
            "text has {} tokens, more than the model's context of {context} (max_position_embeddings); \
             score a shorter text",
            ids.len()
        ))
        .into());
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
/// Returns the generated token ids per prompt (batched: [`crate::decode`]).
pub fn greedy_ids(
    model: &Llama,
    tok: &Tok,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    decode_ids(model, tok, prompts, max_tokens, &mut greedy_pick)
}

/// Continuation of each prompt, up to `max_tokens` new tokens (stops at EOS), with the next
/// token of every row chosen by `pick` from the rows' logits `[rows, vocab]`; all prompts
/// decoded together with a key/value cache ([`crate::decode::decode`]).
pub fn decode_ids(
    model: &Llama,
    tok: &Tok,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    pick: &mut Pick,
) -> Result<Vec<Vec<u32>>> {
    let reqs: Vec<Request> = prompts.iter().map(|p| Request::new(p.clone(), max_tokens)).collect();
    decode(model, tok, &reqs, pick, &mut no_stop)
}

/// Greedy continuation of one text prompt, decoded.
pub fn generate(model: &Llama, tok: &Tok, prompt: &str, max_tokens: usize) -> Result<String> {
    let ids = prompt_ids(model, tok, prompt, max_tokens)?;
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
    let ids = prompt_ids(model, tok, prompt, max_tokens)?;
    let gen = decode_ids(model, tok, &[ids], max_tokens, &mut |logits| {
        (0..logits.dim(0)?).map(|i| Ok(sampler.sample(&logits.get(i)?)?)).collect()
    })?;
    tok.decode(&gen[0])
}

/// The prompt's token ids, refused (an [`InputError`]) when empty or when the prompt and
/// `max_tokens` new tokens do not fit the model's context (`max_position_embeddings`): past it
/// the positions are ones the model was never trained on.
fn prompt_ids(model: &Llama, tok: &Tok, prompt: &str, max_tokens: usize) -> Result<Vec<u32>> {
    let ids = tok.encode_prompt(prompt)?;
    if ids.is_empty() {
        return Err(InputError("--prompt: the prompt is empty".into()).into());
    }
    if let Some(context) = model.config().max_position_embeddings {
        if ids.len() >= context {
            return Err(InputError(format!(
                "--prompt: the prompt has {} tokens, leaving no room in the model's context of \
                 {context} (max_position_embeddings); give a shorter prompt",
                ids.len()
            ))
            .into());
        }
        if ids.len().saturating_add(max_tokens) > context {
            return Err(InputError(format!(
                "--max-tokens {max_tokens}: the prompt's {} tokens and {max_tokens} new ones are more \
                 than the model's context of {context} (max_position_embeddings); give \
                 --max-tokens {} or less",
                ids.len(),
                context - ids.len()
            ))
            .into());
        }
    }
    Ok(ids)
}
