//! Padded batches of token sequences, with position ids and the attention bias.

use candle_core::{Device, Result, Tensor};

/// Which side receives the padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Tokens start at index 0; padding follows.
    Right,
    /// Padding first; tokens end at the last index (for generation).
    Left,
}

/// Bias value for masked attention entries (finite, so fully masked rows stay NaN-free).
const MASKED: f32 = -1e9;

/// Most elements of one host buffer built from a batch (the attention bias is `batch × seq²`):
/// 2³¹ f32 values, 8 GiB. Inputs are capped long before this (`--max-prompt-tokens`); a larger
/// request comes from absurd input and is refused with an error instead of aborting the process.
pub const MAX_BUFFER_ELEMS: usize = 1 << 31;

/// A vector of `dims`' product copies of `value`, or an error when that product overflows,
/// exceeds [`MAX_BUFFER_ELEMS`] or cannot be allocated.
fn filled<T: Copy>(value: T, dims: &[usize], what: &str) -> Result<Vec<T>> {
    let n = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).filter(|&n| n <= MAX_BUFFER_ELEMS);
    let Some(n) = n else {
        candle_core::bail!("{what} of shape {dims:?} is too large (more than {MAX_BUFFER_ELEMS} elements)");
    };
    let mut v = Vec::new();
    if v.try_reserve_exact(n).is_err() {
        candle_core::bail!("{what} of shape {dims:?}: cannot allocate {n} elements");
    }
    v.resize(n, value);
    Ok(v)
}

/// A batch of token sequences padded to a common length.
#[derive(Debug, Clone)]
pub struct Batch {
    seqs: Vec<Vec<u32>>,
    seq_len: usize,
    padding: Padding,
    pad_id: u32,
}

impl Batch {
    /// Pads `seqs` to the longest one. Empty sequences are an error.
    pub fn new(seqs: Vec<Vec<u32>>, padding: Padding, pad_id: u32) -> Result<Self> {
        if seqs.is_empty() {
            candle_core::bail!("empty batch");
        }
        if seqs.iter().any(|s| s.is_empty()) {
            candle_core::bail!("a sequence in the batch has no tokens");
        }
        let seq_len = seqs.iter().map(Vec::len).max().unwrap_or(0);
        Ok(Self { seqs, seq_len, padding, pad_id })
    }

    /// The rows of `batches` one after another, padded to the longest (all must share padding
    /// side and pad id; the first one's are used).
    pub fn concat(batches: &[&Batch]) -> Result<Self> {
        let first = batches.first().ok_or_else(|| candle_core::Error::Msg("empty batch".into()))?;
        if batches.iter().any(|b| b.padding != first.padding || b.pad_id != first.pad_id) {
            candle_core::bail!("batches with different padding cannot be concatenated");
        }
        let seqs = batches.iter().flat_map(|b| b.seqs.iter().cloned()).collect();
        Self::new(seqs, first.padding, first.pad_id)
    }

    /// Number of sequences.
    pub fn batch_size(&self) -> usize {
        self.seqs.len()
    }

    /// Padded length.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The unpadded sequences.
    pub fn seqs(&self) -> &[Vec<u32>] {
        &self.seqs
    }

    /// Length of row `r` without padding.
    pub fn len_of(&self, r: usize) -> usize {
        self.seqs[r].len()
    }

    /// Index in the padded row `r` of its `i`-th real token.
    pub fn index_of(&self, r: usize, i: usize) -> usize {
        match self.padding {
            Padding::Right => i,
            Padding::Left => self.seq_len - self.seqs[r].len() + i,
        }
    }

    /// Flat index (into `batch * seq`) of the `i`-th real token of row `r`.
    pub fn flat_index(&self, r: usize, i: usize) -> usize {
        r * self.seq_len + self.index_of(r, i)
    }

    /// Whether padded index `j` of row `r` holds a real token.
    pub fn is_real(&self, r: usize, j: usize) -> bool {
        let len = self.seqs[r].len();
        match self.padding {
            Padding::Right => j < len,
            Padding::Left => j >= self.seq_len - len,
        }
    }

    /// Rotary position of padded index `j` of row `r` (0 for padding).
    pub fn position(&self, r: usize, j: usize) -> usize {
        match self.padding {
            Padding::Right => j,
            Padding::Left => j.saturating_sub(self.seq_len - self.seqs[r].len()),
        }
    }

    /// Token ids `[batch, seq]` (u32).
    pub fn ids(&self, device: &Device) -> Result<Tensor> {
        let mut flat = filled(self.pad_id, &[self.seqs.len(), self.seq_len], "token id batch")?;
        for (r, s) in self.seqs.iter().enumerate() {
            let start = r * self.seq_len + self.index_of(r, 0);
            flat[start..start + s.len()].copy_from_slice(s);
        }
        Tensor::from_vec(flat, (self.seqs.len(), self.seq_len), device)
    }

    /// Additive attention bias `[batch, 1, seq, seq]` (f32): causal, padding and optional sliding window.
    pub fn attention_bias(&self, sliding_window: Option<usize>, device: &Device) -> Result<Tensor> {
        let (b, t) = (self.seqs.len(), self.seq_len);
        let mut bias = filled(MASKED, &[b, t, t], "attention bias")?;
        for r in 0..b {
            for i in 0..t {
                for j in 0..=i {
                    let in_window = sliding_window.is_none_or(|w| i - j < w);
                    if self.is_real(r, j) && in_window {
                        bias[(r * t + i) * t + j] = 0.0;
                    }
                }
            }
        }
        Tensor::from_vec(bias, (b, 1, t, t), device)
    }

    /// `[batch, seq, 1]` mask with 1.0 at the given (row, real-token index) pairs.
    pub fn position_mask(
        &self,
        at: &[(usize, usize)],
        dtype: candle_core::DType,
        device: &Device,
    ) -> Result<Tensor> {
        let mut m = filled(0f32, &[self.seqs.len(), self.seq_len], "position mask")?;
        for &(r, i) in at {
            m[self.flat_index(r, i)] = 1.0;
        }
        Tensor::from_vec(m, (self.seqs.len(), self.seq_len, 1), device)?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_bias_match_the_padding() {
        let b = Batch::new(vec![vec![5, 6, 7], vec![8]], Padding::Left, 0).unwrap();
        let ids: Vec<Vec<u32>> = b.ids(&Device::Cpu).unwrap().to_vec2().unwrap();
        assert_eq!(ids, vec![vec![5, 6, 7], vec![0, 0, 8]]);
        let b = Batch::new(vec![vec![5, 6, 7], vec![8]], Padding::Right, 0).unwrap();
        let ids: Vec<Vec<u32>> = b.ids(&Device::Cpu).unwrap().to_vec2().unwrap();
        assert_eq!(ids, vec![vec![5, 6, 7], vec![8, 0, 0]]);
        let bias: Vec<f32> =
            b.attention_bias(Some(2), &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let row0 = [0.0, MASKED, MASKED, 0.0, 0.0, MASKED, MASKED, 0.0, 0.0];
        assert_eq!(&bias[..9], &row0);
        assert_eq!(&bias[9..], &[0.0, MASKED, MASKED, 0.0, MASKED, MASKED, MASKED, MASKED, MASKED]);
    }

    #[test]
    fn absurd_sizes_are_errors_not_aborts() {
        let b = Batch::new(vec![vec![1; 50_000]], Padding::Right, 0).unwrap();
        let e = b.attention_bias(None, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("attention bias") && e.contains("too large"), "{e}");
        assert!(filled(0u8, &[usize::MAX, 2], "x").unwrap_err().to_string().contains("too large"));
        assert_eq!(filled(1u8, &[2, 3], "x").unwrap(), vec![1; 6]);
    }
}
