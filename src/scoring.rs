//! Scoring answers after prompts under teacher forcing: the log-probabilities that the edit log
//! and the evaluation metrics are built from.
//!
//! The pairs are scored in packed rows: the sequences `prompt + answer` are merged into token tries
//! (a prompt scored with two answers, or prompts sharing their first tokens, are computed once up
//! to where they differ), each token attending to its ancestors only, with its own position as
//! rotary position; several tries share one row without padding between them, and the final
//! norm and LM head run only at the positions that predict an answer token. Every token sees
//! exactly the context it has in its own sequence, so the scores are those of one forward pass per
//! pair, up to floating-point summation order.

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

use crate::decode::{greedy_pick, no_stop, Decoder, Request, Stop};
use crate::infer::log_softmax;
use crate::model::{Captured, Llama, Mode, Taps};
use crate::packing::{pack, passes, row_batch, Row};
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

impl AnswerScore {
    /// The score of `answer` from the log-probabilities of its tokens and the argmax tokens.
    fn new(answer: &[u32], logprobs: &[f32], argmax: Vec<u32>) -> Self {
        let n = answer.len();
        let sum_nll = -logprobs.iter().map(|&x| x as f64).sum::<f64>();
        let hits = argmax.iter().zip(answer).filter(|(x, y)| x == y).count();
        Self {
            tokens: n,
            sum_nll,
            mean_nll: sum_nll / n.max(1) as f64,
            token_accuracy: hits as f64 / n.max(1) as f64,
            argmax,
        }
    }
}

/// One distinct pair: the sequence `prompt + answer[..-1]` that scores it.
struct Seq {
    ids: Vec<u32>,
    prompt_len: usize,
    answer: Vec<u32>,
}

/// Scores each (prompt, answer) pair; tokens shared by several pairs' sequences from their start
/// (the same prompt, or a common prefix of prompts) are computed once.
pub fn score_answers(model: &Llama, tok: &Tok, pairs: &[(&str, &str)]) -> Result<Vec<AnswerScore>> {
    Ok(score_and_decode(model, tok, pairs, &[], &mut no_stop)?.0)
}

/// [`score_answers`] and greedy [`crate::decode::decode`] of `reqs` in the same packed passes:
/// a request's prompt (and draft) shares its tokens with the scored pairs' sequences, so a
/// prompt that is both scored and continued is computed once.
pub fn score_and_decode(
    model: &Llama,
    tok: &Tok,
    pairs: &[(&str, &str)],
    reqs: &[Request],
    stop: &mut Stop,
) -> Result<(Vec<AnswerScore>, Vec<Vec<u32>>)> {
    let mut seqs: Vec<Seq> = Vec::new();
    let mut distinct: HashMap<(Vec<u32>, Vec<u32>), usize> = HashMap::new();
    let mut at: Vec<usize> = Vec::with_capacity(pairs.len());
    for (prompt, answer) in pairs {
        let p = tok.encode_prompt(prompt)?;
        let a = tok.encode_continuation(prompt, answer)?;
        if p.is_empty() && !a.is_empty() {
            bail!("prompt {prompt:?} has no tokens to score an answer after");
        }
        let next = seqs.len();
        let s = *distinct.entry((p.clone(), a.clone())).or_insert(next);
        if s == next {
            let mut ids = p.clone();
            ids.extend_from_slice(&a[..a.len().saturating_sub(1)]);
            seqs.push(Seq { ids, prompt_len: p.len(), answer: a });
        }
        at.push(s);
    }
    // Members below seqs.len() are scored sequences, the others decoding requests.
    let mut dec = Decoder::new(reqs)?;
    let scored =
        seqs.iter().enumerate().filter(|(_, s)| !s.answer.is_empty()).map(|(i, s)| (i, s.ids.as_slice()));
    let mut rows = pack(scored.chain(dec.sequences(seqs.len())));
    let mut scores: Vec<Option<AnswerScore>> = vec![None; seqs.len()];
    for (range, width) in passes(&mut rows) {
        for (s, score) in score_rows(model, tok, &seqs, (&rows[range], width), &mut dec, stop)? {
            scores[s] = Some(score);
        }
    }
    let scores = at
        .into_iter()
        .map(|s| scores[s].clone().unwrap_or_else(|| AnswerScore::new(&seqs[s].answer, &[], Vec::new())))
        .collect();
    Ok((scores, dec.into_output()))
}

/// One forward pass over `rows` (padded to `width`); the score of every scored sequence in them
/// (members below `seqs.len()`), and the greedy decoding of the requests of `dec` in them.
fn score_rows(
    model: &Llama,
    tok: &Tok,
    seqs: &[Seq],
    (rows, width): (&[Row], usize),
    dec: &mut Decoder,
    stop: &mut Stop,
) -> Result<Vec<(usize, AnswerScore)>> {
    let offset = seqs.len();
    let decoding = rows.iter().any(|r| r.members.iter().any(|(s, _)| *s >= offset));
    let (batch, ctx) = row_batch(model, rows, width, tok.pad_id)?;
    let mut cap = Captured::default();
    let taps = Taps { capture_kv: decoding, ..Default::default() };
    let h = model.run_layers(model.embed(&batch)?, 0..model.num_layers(), &ctx, &taps, &mut cap)?;
    // Answer token j of a sequence is predicted at its token prompt_len - 1 + j; a position
    // predicting tokens of several answers (the prompt's last token) gets its logits once.
    let mut unique: Vec<u32> = Vec::new();
    let mut index: HashMap<usize, u32> = HashMap::new();
    let mut which: Vec<u32> = Vec::new();
    let mut targets: Vec<u32> = Vec::new();
    let mut unique_index = |flat: usize| -> u32 {
        *index.entry(flat).or_insert_with(|| {
            unique.push(flat as u32);
            unique.len() as u32 - 1
        })
    };
    for (r, row) in rows.iter().enumerate() {
        for (s, path) in row.members.iter().filter(|(s, _)| *s < offset) {
            let seq = &seqs[*s];
            for (j, &t) in seq.answer.iter().enumerate() {
                which.push(unique_index(r * width + path[seq.prompt_len - 1 + j]));
                targets.push(t);
            }
        }
    }
    // The decoder chooses its tokens greedily from the same logits.
    let choose: Vec<u32> = if decoding {
        dec.positions(rows, width, offset).into_iter().map(|f| unique_index(f as usize)).collect()
    } else {
        Vec::new()
    };
    let dev = model.device();
    let logits = model.logits_at(&h, &Tensor::new(unique.as_slice(), dev)?, Mode::Inference)?;
    let best: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    if decoding {
        let choices: Vec<u32> = choose.iter().map(|&u| best[u as usize]).collect();
        dec.after_pass(model, tok, (rows, width, offset), &choices, &cap.kv, &mut greedy_pick, stop)?;
    }
    if which.is_empty() {
        return Ok(Vec::new());
    }
    let lp = log_softmax(&logits)?.index_select(&Tensor::new(which.as_slice(), dev)?, 0)?;
    let picked: Vec<f32> =
        lp.gather(&Tensor::new(targets.as_slice(), dev)?.unsqueeze(1)?, 1)?.squeeze(1)?.to_vec1()?;
    let argmax: Vec<u32> = which.iter().map(|&u| best[u as usize]).collect();
    let mut out = Vec::new();
    let mut at = 0;
    for row in rows {
        for (s, _) in row.members.iter().filter(|(s, _)| *s < offset) {
            let a = &seqs[*s].answer;
            let n = a.len();
            out.push((*s, AnswerScore::new(a, &picked[at..at + n], argmax[at..at + n].to_vec())));
            at += n;
        }
    }
    Ok(out)
}
