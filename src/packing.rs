//! Token sequences packed into token tries, several tries per row, without padding between them.
//!
//! Sequences that share their first tokens (the same prompt with several answers, or prompts
//! built from one template) are merged where they agree: each shared token is computed once.
//! Every token attends to its ancestors in the trie and itself, with its depth as rotary
//! position, so it sees exactly the context it has in its own sequence. Used by teacher-forced
//! scoring ([`crate::scoring`]) and by the prefill of batched decoding ([`crate::decode`]).

use std::ops::Range;

use anyhow::Result;

use crate::model::{Batch, LayerCtx, Llama, Mode, Padding};

/// Tokens per packed row (a sequence longer than this gets a row of its own length). Attention
/// costs grow with the row length squared; at this length they are a few percent of the linear
/// layers' (on 300 CounterFact records, 64 and 96 ran at the same speed, 160 5% slower).
pub const ROW_TOKENS: usize = 64;

/// Tokens per forward pass (rows × row length), bounding the activations held at once.
pub const FORWARD_TOKENS: usize = 1536;

/// A packed row: a token trie of sequences (each token sees its ancestors and itself).
#[derive(Debug, Default)]
pub struct Row {
    /// Token ids, in trie order.
    pub ids: Vec<u32>,
    /// Parent of each token in the trie (None at a sequence start).
    pub parent: Vec<Option<usize>>,
    /// Rotary position of each token (its depth in the trie).
    pub depth: Vec<usize>,
    /// The sequences in the row (their ids as given to [`pack`]), with the row index of each of
    /// their tokens.
    pub members: Vec<(usize, Vec<usize>)>,
}

/// Packs the sequences `(id, tokens)` (each non-empty) into rows of at most [`ROW_TOKENS`]
/// tokens (a longer sequence gets a row of its own).
pub fn pack<'a>(seqs: impl IntoIterator<Item = (usize, &'a [u32])>) -> Vec<Row> {
    // Sorted, sequences sharing a prefix are neighbours, and the longest prefix a sequence shares
    // with any earlier one in its row is the one it shares with the previous sequence.
    let mut order: Vec<(usize, &[u32])> = seqs.into_iter().collect();
    order.sort_by(|x, y| x.1.cmp(y.1));
    let mut rows: Vec<Row> = Vec::new();
    let mut prev: Option<&[u32]> = None;
    for (s, ids) in order {
        let mut lcp = match (prev, rows.last()) {
            (Some(q), Some(_)) => ids.iter().zip(q).take_while(|(x, y)| x == y).count(),
            _ => 0,
        };
        if rows.is_empty() || rows.last().is_some_and(|r| r.ids.len() + ids.len() - lcp > ROW_TOKENS) {
            rows.push(Row::default());
            lcp = 0;
        }
        let row = rows.last_mut().expect("a row");
        let mut path: Vec<usize> = match row.members.last() {
            Some((_, p)) => p[..lcp].to_vec(),
            None => Vec::new(),
        };
        for (d, &t) in ids.iter().enumerate().skip(lcp) {
            row.parent.push(path.last().copied());
            row.depth.push(d);
            row.ids.push(t);
            path.push(row.ids.len() - 1);
        }
        row.members.push((s, path));
        prev = Some(ids);
    }
    rows
}

/// Sorts `rows` longest first and splits them into forward passes of at most
/// [`FORWARD_TOKENS`] tokens (rows × the longest row of the pass), so that a pass's rows are of
/// similar lengths. Returns each pass's rows and width.
pub fn passes(rows: &mut [Row]) -> Vec<(Range<usize>, usize)> {
    rows.sort_by_key(|r| std::cmp::Reverse(r.ids.len()));
    let mut out = Vec::new();
    let mut start = 0;
    while start < rows.len() {
        let width = rows[start].ids.len();
        let count = (FORWARD_TOKENS / width).max(1).min(rows.len() - start);
        out.push((start..start + count, width));
        start += count;
    }
    out
}

/// The batch (rows right-padded to `width` with `pad_id`) and the layer context (trie
/// attention, depth positions, sliding window) of one forward pass over `rows`.
pub fn row_batch(model: &Llama, rows: &[Row], width: usize, pad_id: u32) -> Result<(Batch, LayerCtx)> {
    let window = model.config().sliding_window;
    let mut bias = vec![-1e9f32; rows.len() * width * width];
    let mut positions = Vec::with_capacity(rows.len());
    let mut ids = Vec::with_capacity(rows.len());
    for (r, row) in rows.iter().enumerate() {
        for i in 0..width {
            let row_bias = &mut bias[(r * width + i) * width..(r * width + i + 1) * width];
            if i >= row.ids.len() {
                row_bias[i] = 0.0; // padding sees itself only
                continue;
            }
            let mut k = Some(i);
            while let Some(j) = k {
                if window.is_some_and(|w| row.depth[i] - row.depth[j] >= w) {
                    break;
                }
                row_bias[j] = 0.0;
                k = row.parent[j];
            }
        }
        let mut pos = row.depth.clone();
        pos.resize(width, 0);
        positions.push(pos);
        let mut t = row.ids.clone();
        t.resize(width, pad_id);
        ids.push(t);
    }
    let batch = Batch::new(ids, Padding::Right, pad_id)?;
    let ctx = LayerCtx::custom(model, &positions, bias, Mode::Inference)?;
    Ok((batch, ctx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefixes_are_stored_once() {
        let a: &[u32] = &[1, 2, 3];
        let b: &[u32] = &[1, 2, 4, 5];
        let c: &[u32] = &[7];
        let rows = pack([(0, a), (1, b), (2, c), (3, a)]);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        // 1 2 3 | 4 5 (after 1 2) | 7; the repeated sequence adds nothing.
        assert_eq!(r.ids, vec![1, 2, 3, 4, 5, 7]);
        assert_eq!(r.parent, vec![None, Some(0), Some(1), Some(1), Some(3), None]);
        assert_eq!(r.depth, vec![0, 1, 2, 2, 3, 0]);
        let path = |s: usize| r.members.iter().find(|(m, _)| *m == s).unwrap().1.clone();
        assert_eq!(path(0), vec![0, 1, 2]);
        assert_eq!(path(3), vec![0, 1, 2]);
        assert_eq!(path(1), vec![0, 1, 3, 4]);
        assert_eq!(path(2), vec![5]);
    }

    #[test]
    fn passes_bound_the_tokens_per_forward() {
        let long = vec![1u32; ROW_TOKENS];
        let seqs: Vec<Vec<u32>> = (0..40u32).map(|i| [vec![i + 2], long.clone()].concat()).collect();
        let mut rows = pack(seqs.iter().enumerate().map(|(i, s)| (i, s.as_slice())));
        assert_eq!(rows.len(), 40);
        let p = passes(&mut rows);
        assert!(p.iter().all(|(r, w)| r.len() * w <= FORWARD_TOKENS || r.len() == 1));
        assert_eq!(p.iter().map(|(r, _)| r.len()).sum::<usize>(), 40);
    }
}
