//! Scoring answers after prompts under teacher forcing: the log-probabilities that the edit log
//! and the evaluation metrics are built from.
//!
//! The pairs are scored in packed rows: each distinct prompt is computed once, its answers
//! follow it as branches that see the prompt and themselves only (with the rotary positions they
//! have after the prompt), several such trees share one row without padding between them, and the
//! final norm and LM head run only at the positions that predict an answer token. Every answer
//! token sees exactly the context it has in its own `prompt + answer` sequence, so the scores are
//! those of one forward pass per pair, up to floating-point summation order.

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

use crate::infer::log_softmax;
use crate::model::{Batch, Captured, LayerCtx, Llama, Mode, Padding, Taps};
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

/// Tokens per packed row (a tree longer than this gets a row of its own length). Attention costs
/// grow with the row length squared; at 64 they are a few percent of the linear layers'.
const ROW_TOKENS: usize = 64;

/// Tokens per forward pass (rows × row length), bounding the activations held at once.
const FORWARD_TOKENS: usize = 1024;

/// One prompt and its distinct answers.
struct Tree {
    prompt: Vec<u32>,
    answers: Vec<Vec<u32>>,
}

impl Tree {
    /// Tokens the tree occupies: the prompt, then each answer but its last token.
    fn len(&self) -> usize {
        self.prompt.len() + self.answers.iter().map(|a| a.len().saturating_sub(1)).sum::<usize>()
    }
}

/// Where a tree's answer tokens are predicted: per answer, the flat index (into rows × row
/// length) of the position predicting each of its tokens.
struct Placed {
    rows: Vec<Vec<usize>>,
}

/// Scores each (prompt, answer) pair; identical prompts are computed once.
pub fn score_answers(model: &Llama, tok: &Tok, pairs: &[(&str, &str)]) -> Result<Vec<AnswerScore>> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    // Group the pairs into trees: one per distinct prompt, one branch per distinct answer.
    let mut trees: Vec<Tree> = Vec::new();
    let mut by_prompt: HashMap<Vec<u32>, usize> = HashMap::new();
    let mut at: Vec<(usize, usize)> = Vec::with_capacity(pairs.len());
    for (prompt, answer) in pairs {
        let p = tok.encode_prompt(prompt)?;
        let a = tok.encode_continuation(prompt, answer)?;
        if p.is_empty() && !a.is_empty() {
            bail!("prompt {prompt:?} has no tokens to score an answer after");
        }
        let t = *by_prompt.entry(p.clone()).or_insert_with(|| {
            trees.push(Tree { prompt: p, answers: Vec::new() });
            trees.len() - 1
        });
        let tree = &mut trees[t];
        let b = match tree.answers.iter().position(|x| *x == a) {
            Some(b) => b,
            None => {
                tree.answers.push(a);
                tree.answers.len() - 1
            }
        };
        at.push((t, b));
    }
    // Results per tree and answer: log-probabilities and argmax tokens.
    let mut results: Vec<Vec<Option<AnswerScore>>> =
        trees.iter().map(|t| vec![None; t.answers.len()]).collect();
    // Pack trees into rows, longest first, each into the first row with room.
    let mut order: Vec<usize> = (0..trees.len()).filter(|&t| trees[t].len() > 0).collect();
    order.sort_by_key(|&t| std::cmp::Reverse(trees[t].len()));
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new(); // (used tokens, trees)
    for &t in &order {
        let n = trees[t].len();
        match rows.iter_mut().find(|(used, _)| used + n <= ROW_TOKENS) {
            Some((used, ts)) => {
                *used += n;
                ts.push(t);
            }
            None => rows.push((n, vec![t])),
        }
    }
    // Rows in groups of at most FORWARD_TOKENS tokens (rows sorted by length, so that a group's
    // rows are of similar lengths).
    rows.sort_by_key(|(used, _)| std::cmp::Reverse(*used));
    let mut start = 0;
    while start < rows.len() {
        let width = rows[start].0;
        let count = (FORWARD_TOKENS / width).max(1).min(rows.len() - start);
        let group = &rows[start..start + count];
        for (t, placed) in score_rows(model, tok, &trees, group, width)? {
            for (b, lp_am) in placed.into_iter().enumerate() {
                results[t][b] = Some(lp_am);
            }
        }
        start += count;
    }
    let empty = |a: &[u32]| AnswerScore::new(a, &[], Vec::new());
    Ok(at
        .into_iter()
        .map(|(t, b)| results[t][b].clone().unwrap_or_else(|| empty(&trees[t].answers[b])))
        .collect())
}

/// One forward pass over `rows` (each a list of trees packed in `width` tokens); the scores of
/// every answer of every tree in them.
fn score_rows(
    model: &Llama,
    tok: &Tok,
    trees: &[Tree],
    rows: &[(usize, Vec<usize>)],
    width: usize,
) -> Result<Vec<(usize, Vec<AnswerScore>)>> {
    let window = model.config().sliding_window;
    let mut seqs = Vec::with_capacity(rows.len());
    let mut positions = Vec::with_capacity(rows.len());
    let mut bias = vec![-1e9f32; rows.len() * width * width];
    let mut placed: Vec<(usize, Placed)> = Vec::new();
    for (r, (_, ts)) in rows.iter().enumerate() {
        let mut ids = Vec::with_capacity(width);
        let mut pos = Vec::with_capacity(width);
        // Per index of the row: its tree's first index and its branch (0 = the prompt).
        let mut tree_start = Vec::with_capacity(width);
        let mut branch = Vec::with_capacity(width);
        for &t in ts {
            let tree = &trees[t];
            let o = ids.len();
            let plen = tree.prompt.len();
            ids.extend_from_slice(&tree.prompt);
            pos.extend(0..plen);
            tree_start.extend(std::iter::repeat_n(o, plen));
            branch.extend(std::iter::repeat_n(0, plen));
            let mut flat = Vec::with_capacity(tree.answers.len());
            for (b, a) in tree.answers.iter().enumerate() {
                let s = ids.len();
                let body = &a[..a.len().saturating_sub(1)];
                ids.extend_from_slice(body);
                pos.extend(plen..plen + body.len());
                tree_start.extend(std::iter::repeat_n(o, body.len()));
                branch.extend(std::iter::repeat_n(b + 1, body.len()));
                // Token 0 is predicted at the prompt's last position, token j at branch index j-1.
                let idx = (0..a.len()).map(|j| r * width + if j == 0 { o + plen - 1 } else { s + j - 1 });
                flat.push(idx.collect());
            }
            placed.push((t, Placed { rows: flat }));
        }
        let used = ids.len();
        for i in 0..width {
            let row_bias = &mut bias[(r * width + i) * width..(r * width + i + 1) * width];
            if i >= used {
                row_bias[i] = 0.0; // padding sees itself only
                continue;
            }
            for k in tree_start[i]..=i {
                let same_branch = branch[k] == 0 || branch[k] == branch[i];
                let in_window = window.is_none_or(|w| pos[i] - pos[k] < w);
                if same_branch && in_window {
                    row_bias[k] = 0.0;
                }
            }
        }
        pos.resize(width, 0);
        seqs.push(ids);
        positions.push(pos);
    }
    let mut batch = Batch::new(seqs, Padding::Right, tok.pad_id)?;
    if batch.seq_len() < width {
        // Every row is shorter than the width: pad one so that the batch has the full width.
        let mut seqs = batch.seqs().to_vec();
        seqs[0].resize(width, tok.pad_id);
        batch = Batch::new(seqs, Padding::Right, tok.pad_id)?;
    }
    let ctx = LayerCtx::custom(model, &positions, bias, Mode::Inference)?;
    let h = model.run_layers(
        model.embed(&batch)?,
        0..model.num_layers(),
        &ctx,
        &Taps::default(),
        &mut Captured::default(),
    )?;
    let mut flat_rows: Vec<u32> = Vec::new();
    let mut ids: Vec<u32> = Vec::new();
    for (t, p) in &placed {
        for (a, idx) in trees[*t].answers.iter().zip(&p.rows) {
            flat_rows.extend(idx.iter().map(|&i| i as u32));
            ids.extend_from_slice(a);
        }
    }
    let mut out = Vec::with_capacity(placed.len());
    if flat_rows.is_empty() {
        for (t, _) in &placed {
            out.push((*t, trees[*t].answers.iter().map(|a| AnswerScore::new(a, &[], Vec::new())).collect()));
        }
        return Ok(out);
    }
    let dev = model.device();
    let logits = model.logits_at(&h, &Tensor::new(flat_rows.as_slice(), dev)?, Mode::Inference)?;
    let lp = log_softmax(&logits)?;
    let picked: Vec<f32> =
        lp.gather(&Tensor::new(ids.as_slice(), dev)?.unsqueeze(1)?, 1)?.squeeze(1)?.to_vec1()?;
    let argmax: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    let mut at = 0;
    for (t, _) in &placed {
        let scores = trees[*t]
            .answers
            .iter()
            .map(|a| {
                let n = a.len();
                let s = AnswerScore::new(a, &picked[at..at + n], argmax[at..at + n].to_vec());
                at += n;
                s
            })
            .collect();
        out.push((*t, scores));
    }
    Ok(out)
}
