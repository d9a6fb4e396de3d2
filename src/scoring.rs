//! Scoring answers after prompts under teacher forcing: the log-probabilities that the edit log
//! and the evaluation metrics are built from.

use anyhow::Result;
use candle_core::{Tensor, D};

use crate::infer::log_softmax;
use crate::model::{Batch, Llama, Padding, Taps};
use crate::tokenizer::Tok;

/// How a model scores one answer after one prompt.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AnswerScore {
    /// Number of answer tokens.
    pub tokens: usize,
    /// −Σ log P(a_i | p, a_<i).
    pub sum_nll: f64,
    /// sum_nll / tokens (ROME/MEMIT compare these).
    pub mean_nll: f64,
    /// Fraction of answer tokens that are the argmax under teacher forcing.
    pub token_accuracy: f64,
    /// The argmax token at each answer position.
    pub argmax: Vec<u32>,
}

/// Scores each (prompt, answer) pair in one batched forward pass.
pub fn score_answers(model: &Llama, tok: &Tok, pairs: &[(&str, &str)]) -> Result<Vec<AnswerScore>> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let mut seqs = Vec::with_capacity(pairs.len());
    let mut spans = Vec::with_capacity(pairs.len());
    for (prompt, answer) in pairs {
        let p = tok.encode_prompt(prompt)?;
        let a = tok.encode_continuation(prompt, answer)?;
        let mut row = p.clone();
        row.extend_from_slice(&a[..a.len().saturating_sub(1)]);
        spans.push((p.len(), a));
        seqs.push(row);
    }
    let batch = Batch::new(seqs, Padding::Right, tok.pad_id)?;
    let (logits, _) = model.forward(&batch, &Taps::default())?;
    let vocab = logits.dim(D::Minus1)?;
    let flat = logits.reshape(((), vocab))?;
    let mut rows = Vec::new();
    let mut ids = Vec::new();
    for (r, (plen, a)) in spans.iter().enumerate() {
        for (j, &t) in a.iter().enumerate() {
            rows.push(batch.flat_index(r, plen - 1 + j) as u32);
            ids.push(t);
        }
    }
    let dev = model.device();
    let sel = flat.index_select(&Tensor::new(rows.as_slice(), dev)?, 0)?;
    let lp = log_softmax(&sel)?;
    let picked: Vec<f32> =
        lp.gather(&Tensor::new(ids.as_slice(), dev)?.unsqueeze(1)?, 1)?.squeeze(1)?.to_vec1()?;
    let argmax: Vec<u32> = sel.argmax(D::Minus1)?.to_vec1()?;
    let mut out = Vec::with_capacity(pairs.len());
    let mut at = 0;
    for (_, a) in &spans {
        let n = a.len();
        let sum_nll = -picked[at..at + n].iter().map(|&x| x as f64).sum::<f64>();
        let am = argmax[at..at + n].to_vec();
        let hits = am.iter().zip(a).filter(|(x, y)| x == y).count();
        out.push(AnswerScore {
            tokens: n,
            sum_nll,
            mean_nll: sum_nll / n.max(1) as f64,
            token_accuracy: hits as f64 / n.max(1) as f64,
            argmax: am,
        });
        at += n;
    }
    Ok(out)
}
