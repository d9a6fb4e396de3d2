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
use candle_core::{DType, Device, Storage, Tensor, D};
use rayon::prelude::*;

use crate::decode::{greedy_pick, no_stop, Decoder, Request, Stop};
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

    /// Every answer token is the argmax under teacher forcing: how an answer without a ground
    /// truth to beat is judged (the landing check and binary efficacy alike).
    pub fn greedy_correct(&self) -> bool {
        self.token_accuracy == 1.0
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
    let mut scored = vec![false; unique.len()];
    for &u in &which {
        scored[u as usize] = true;
    }
    let stats = RowStats::of(&logits, &scored)?;
    let best = &stats.argmax;
    if decoding {
        let choices: Vec<u32> = choose.iter().map(|&u| best[u as usize]).collect();
        dec.after_pass(model, tok, (rows, width, offset), &choices, &cap.kv, &mut greedy_pick, stop)?;
    }
    if which.is_empty() {
        return Ok(Vec::new());
    }
    let picked = stats.log_probs(&which, &targets)?;
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

/// Per row of logits `[rows, vocab]`: the argmax token and, for the rows that score answer
/// tokens, the log-sum-exp, from which the log-probability of any token is its logit minus the
/// row's log-sum-exp (the log-softmax without materialising it: on the CPU one parallel pass
/// over the logits; rows only decoded from need just their argmax).
struct RowStats {
    /// The logits in f32.
    logits: Tensor,
    argmax: Vec<u32>,
    /// NaN at the rows not asked for.
    log_sum_exp: Vec<f32>,
}

impl RowStats {
    /// The statistics of `logits`, with the log-sum-exp of the rows `scored` marks.
    fn of(logits: &Tensor, scored: &[bool]) -> Result<Self> {
        let logits = logits.to_dtype(DType::F32)?.contiguous()?;
        let (rows, vocab) = logits.dims2()?;
        if scored.len() != rows {
            bail!("row statistics: {} row flags for {rows} rows", scored.len());
        }
        if let Device::Cpu = logits.device() {
            let (argmax, log_sum_exp) = {
                let (storage, layout) = logits.storage_and_layout();
                let Storage::Cpu(cpu) = &*storage else { bail!("CPU logits not in CPU storage") };
                let all = &cpu.as_slice::<f32>()?[layout.start_offset()..][..rows * vocab];
                all.par_chunks(vocab.max(1)).zip(scored).map(|(row, &lse)| row_argmax_lse(row, lse)).unzip()
            };
            return Ok(Self { logits, argmax, log_sum_exp });
        }
        let argmax = logits.argmax(D::Minus1)?.to_vec1()?;
        let log_sum_exp = logits.log_sum_exp(D::Minus1)?.to_vec1()?;
        Ok(Self { logits, argmax, log_sum_exp })
    }

    /// log P(targets[i]) at row which[i] (a row marked as scored).
    fn log_probs(&self, which: &[u32], targets: &[u32]) -> Result<Vec<f32>> {
        let vocab = self.logits.dim(D::Minus1)? as u32;
        let flat: Vec<u32> = which.iter().zip(targets).map(|(&r, &t)| r * vocab + t).collect();
        let picked: Vec<f32> = self
            .logits
            .flatten_all()?
            .index_select(&Tensor::new(flat.as_slice(), self.logits.device())?, 0)?
            .to_vec1()?;
        Ok(picked.iter().zip(which).map(|(&x, &r)| x - self.log_sum_exp[r as usize]).collect())
    }
}

/// The first index of the largest value of `row` and, with `lse`, log Σ exp(row) (else NaN).
fn row_argmax_lse(row: &[f32], lse: bool) -> (u32, f32) {
    let (mut best, mut max) = (0usize, f32::NEG_INFINITY);
    for (i, &x) in row.iter().enumerate() {
        if x > max {
            (best, max) = (i, x);
        }
    }
    if !lse {
        return (best as u32, f32::NAN);
    }
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    (best as u32, max + sum.ln())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::log_softmax;

    #[test]
    fn row_stats_give_the_log_softmax_and_argmax() {
        let dev = Device::Cpu;
        // Rows of mixed scales, and a row whose largest value appears twice (the first wins).
        let mut v: Vec<f32> = (0..5 * 333).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0).collect();
        v[4 * 333 + 10] = 100.0;
        v[4 * 333 + 20] = 100.0;
        let logits = Tensor::from_vec(v, (5, 333), &dev).unwrap();
        let stats = RowStats::of(&logits, &[true, false, true, true, true]).unwrap();
        let want: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        assert_eq!(stats.argmax, want);
        assert_eq!(stats.argmax[4], 10);
        let which = [0u32, 3, 3, 4, 2];
        let targets = [5u32, 0, 332, 10, 17];
        assert!(stats.log_sum_exp[1].is_nan(), "row 1 was not asked for");
        let got = stats.log_probs(&which, &targets).unwrap();
        let lp: Vec<Vec<f32>> = log_softmax(&logits).unwrap().to_vec2().unwrap();
        for ((&r, &t), g) in which.iter().zip(&targets).zip(&got) {
            let w = lp[r as usize][t as usize];
            assert!((g - w).abs() < 1e-5 * (1.0 + w.abs()), "row {r} token {t}: {g} vs {w}");
        }
    }
}
