//! Batched incremental decoding with a key/value cache, for many prompts at once.
//!
//! Two phases:
//! 1. **Prefill and draft check**: every request's prompt, followed by its draft (tokens the
//!    continuation is expected to start with, possibly none), is run in packed token tries
//!    ([`crate::packing`]: prompts sharing their first tokens are computed once). The next token
//!    is chosen at the prompt's last position and after every draft token; the continuation
//!    follows the draft as long as the chosen tokens equal it, so a correct draft costs no
//!    decoding step (speculative decoding with a given draft). The choice at each position only
//!    depends on the tokens before it, so the result is the same as without a draft.
//! 2. **Incremental steps**: the requests still going continue one token per step, batched,
//!    each row attending to its own cached keys/values (gathered from the tries and
//!    left-padded, the padding masked) and the tokens it generated, with its own rotary
//!    positions. Rows that finish (EOS, their token budget, or the caller's stop rule) leave the
//!    batch at once, and cache columns that only hold padding are dropped.

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

use crate::model::{Batch, Captured, LayerCtx, Llama, Mode, Padding, Taps};
use crate::packing::{pack, passes, row_batch, Row};
use crate::tokenizer::Tok;

/// One continuation to decode.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    /// The prompt's token ids (at least one when `max_new > 0`).
    pub prompt: Vec<u32>,
    /// Tokens the continuation is expected to start with (checked in the prefill; may be empty).
    pub draft: Vec<u32>,
    /// Most new tokens.
    pub max_new: usize,
}

impl Request {
    /// A request without a draft.
    pub fn new(prompt: Vec<u32>, max_new: usize) -> Self {
        Self { prompt, draft: Vec::new(), max_new }
    }
}

/// Chooses the next token of each row from its logits `[rows, vocab]` (f32).
pub type Pick<'a> = dyn FnMut(&Tensor) -> Result<Vec<u32>> + 'a;

/// Given a request's index and its tokens so far, says whether its continuation can stop here
/// (the caller has seen enough of it).
pub type Stop<'a> = dyn FnMut(usize, &[u32]) -> bool + 'a;

/// The greedy choice: the argmax of each row.
pub fn greedy_pick(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1()?)
}

/// A stop rule that never stops early.
pub fn no_stop(_: usize, _: &[u32]) -> bool {
    false
}

/// Decodes every request: its new tokens (EOS, which ends a continuation, not included), at
/// most `max_new`, fewer where `stop` said so. With [`greedy_pick`] each continuation is the
/// greedy one, whatever the batch, the drafts and the other requests.
pub fn decode(
    model: &Llama,
    tok: &Tok,
    reqs: &[Request],
    pick: &mut Pick,
    stop: &mut Stop,
) -> Result<Vec<Vec<u32>>> {
    let mut dec = Decoder::new(reqs)?;
    let mut rows = pack(dec.sequences(0));
    for (range, width) in passes(&mut rows) {
        let rows = &rows[range];
        let (batch, ctx) = row_batch(model, rows, width, tok.pad_id)?;
        let mut cap = Captured::default();
        let taps = Taps { capture_kv: true, ..Default::default() };
        let h = model.run_layers(model.embed(&batch)?, 0..model.num_layers(), &ctx, &taps, &mut cap)?;
        let at = dec.positions(rows, width, 0);
        let choices =
            pick(&model.logits_at(&h, &Tensor::new(at.as_slice(), model.device())?, Mode::Inference)?)?;
        dec.after_pass(model, tok, (rows, width, 0), &choices, &cap.kv, pick, stop)?;
    }
    Ok(dec.into_output())
}

/// The decoding of a set of requests whose prefill runs in packed passes that may also hold
/// other sequences (teacher-forced scoring shares them: [`crate::scoring::score_and_decode`]).
/// In a pass, the request `i` is the member `offset + i` of the rows.
pub struct Decoder<'r> {
    reqs: &'r [Request],
    /// The prefill sequence of each request: its prompt and the usable part of its draft.
    fed: Vec<Vec<u32>>,
    out: Vec<Vec<u32>>,
}

/// Rows of one packed pass, their width, and the member id of request 0 in them.
pub type PassRows<'a> = (&'a [Row], usize, usize);

impl<'r> Decoder<'r> {
    /// Checks the requests (a prompt with no tokens is an error).
    pub fn new(reqs: &'r [Request]) -> Result<Self> {
        if let Some(i) = reqs.iter().position(|r| r.prompt.is_empty() && r.max_new > 0) {
            bail!("decoding request {i}: the prompt has no tokens");
        }
        // Each request runs its prompt and the part of its draft that can still be followed by
        // a chosen token within its budget.
        let fed = reqs
            .iter()
            .map(|r| {
                let d = r.draft.len().min(r.max_new.saturating_sub(1));
                [r.prompt.as_slice(), &r.draft[..d]].concat()
            })
            .collect();
        Ok(Self { reqs, fed, out: vec![Vec::new(); reqs.len()] })
    }

    /// The prefill sequences to pack, as member ids `offset + request index`.
    pub fn sequences(&self, offset: usize) -> impl Iterator<Item = (usize, &[u32])> + '_ {
        self.fed
            .iter()
            .enumerate()
            .filter(|(i, _)| self.reqs[*i].max_new > 0)
            .map(move |(i, s)| (offset + i, s.as_slice()))
    }

    /// The flat positions (into rows × width) whose logits choose tokens: for each request in
    /// the rows, in member order, its prompt's last token and every draft token it ran.
    pub fn positions(&self, rows: &[Row], width: usize, offset: usize) -> Vec<u32> {
        let mut at = Vec::new();
        for (r, row) in rows.iter().enumerate() {
            for (s, path) in row.members.iter().filter(|(s, _)| *s >= offset) {
                let i = s - offset;
                let p = self.reqs[i].prompt.len();
                at.extend(path[p - 1..self.fed[i].len()].iter().map(|&j| (r * width + j) as u32));
            }
        }
        at
    }

    /// Continues the requests of one pass from the tokens chosen at [`Decoder::positions`]:
    /// follows each draft as far as the choices agree with it, then decodes the rest
    /// incrementally from the pass's keys/values `kv` (one `[rows, kv_heads, width, head_dim]`
    /// pair per layer).
    #[allow(clippy::too_many_arguments)]
    pub fn after_pass(
        &mut self,
        model: &Llama,
        tok: &Tok,
        (rows, width, offset): PassRows,
        choices: &[u32],
        kv: &[(Tensor, Tensor)],
        pick: &mut Pick,
        stop: &mut Stop,
    ) -> Result<()> {
        let mut live = Vec::new();
        let mut k = 0;
        for (r, row) in rows.iter().enumerate() {
            for (s, path) in row.members.iter().filter(|(s, _)| *s >= offset) {
                let s = s - offset;
                let req = &self.reqs[s];
                let out = &mut self.out[s];
                let p = req.prompt.len();
                let n = self.fed[s].len() - p + 1;
                let choices = &choices[k..k + n];
                k += n;
                let mut j = 0;
                let finished = loop {
                    let t = choices[j];
                    if Some(t) == tok.eos_id {
                        break true;
                    }
                    out.push(t);
                    if out.len() >= req.max_new || stop(s, out) {
                        break true;
                    }
                    if j + 1 < n && t == req.draft[j] {
                        j += 1;
                        continue;
                    }
                    break false;
                };
                if !finished {
                    // Cached: the prompt and the draft tokens followed; next: the last choice.
                    let cached = path[..p + j].iter().map(|&i| (r * width + i) as u32).collect();
                    live.push(Live { req: s, cached, next: choices[j] });
                }
            }
        }
        if k != choices.len() {
            bail!("decoding: {} choices for {k} positions", choices.len());
        }
        if !live.is_empty() {
            steps(model, tok, self.reqs, kv, live, &mut self.out, pick, stop)?;
        }
        Ok(())
    }

    /// The decoded tokens of every request.
    pub fn into_output(self) -> Vec<Vec<u32>> {
        self.out
    }
}

/// A continuation still going after the prefill.
struct Live {
    /// Its request.
    req: usize,
    /// Flat indices (into the pass's rows × width) of its cached tokens, in order.
    cached: Vec<u32>,
    /// The token to feed next.
    next: u32,
}

/// The incremental steps of the continuations in `live`, whose cached keys/values are in `kv`
/// (one `[rows, kv_heads, width, head_dim]` pair per layer, from the prefill pass).
#[allow(clippy::too_many_arguments)]
fn steps(
    model: &Llama,
    tok: &Tok,
    reqs: &[Request],
    kv: &[(Tensor, Tensor)],
    live: Vec<Live>,
    out: &mut [Vec<u32>],
    pick: &mut Pick,
    stop: &mut Stop,
) -> Result<()> {
    let dev = model.device();
    let n = live.len();
    let mut width = live.iter().map(|l| l.cached.len()).max().unwrap_or(0);
    let mut idx = Vec::with_capacity(n * width);
    for l in &live {
        idx.extend(std::iter::repeat_n(l.cached[0], width - l.cached.len()));
        idx.extend_from_slice(&l.cached);
    }
    let idx = Tensor::new(idx.as_slice(), dev)?;
    let gather = |x: &Tensor| -> Result<Tensor> {
        let (rows, heads, w, hd) = x.dims4()?;
        let flat = x.transpose(1, 2)?.contiguous()?.reshape((rows * w, heads * hd))?;
        Ok(flat.index_select(&idx, 0)?.reshape((n, width, heads, hd))?.transpose(1, 2)?.contiguous()?)
    };
    let mut cache: Vec<(Tensor, Tensor)> =
        kv.iter().map(|(k, v)| Ok((gather(k)?, gather(v)?))).collect::<Result<_>>()?;
    // Per row: request, real cached length (= rotary position of the next token), left padding.
    let mut req: Vec<usize> = live.iter().map(|l| l.req).collect();
    let mut len: Vec<usize> = live.iter().map(|l| l.cached.len()).collect();
    let mut pad: Vec<usize> = len.iter().map(|l| width - l).collect();
    let mut next: Vec<u32> = live.iter().map(|l| l.next).collect();
    let window = model.config().sliding_window;
    while !req.is_empty() {
        let b = req.len();
        let mut bias = vec![-1e9f32; b * (width + 1)];
        for r in 0..b {
            // The new token sits at column `width`: distance width - c to column c.
            for c in pad[r]..=width {
                if window.is_none_or(|w| width - c < w) {
                    bias[r * (width + 1) + c] = 0.0;
                }
            }
        }
        let ctx = LayerCtx::step(model, &len, bias, width)?;
        let batch = Batch::new(next.iter().map(|&t| vec![t]).collect(), Padding::Right, tok.pad_id)?;
        let mut cap = Captured::default();
        let taps = Taps { capture_kv: true, kv_cache: Some(&cache), ..Default::default() };
        let h = model.run_layers(model.embed(&batch)?, 0..model.num_layers(), &ctx, &taps, &mut cap)?;
        cache = cap.kv;
        width += 1;
        let picked = pick(&model.logits(&h, Mode::Inference)?.squeeze(1)?)?;
        let mut keep: Vec<usize> = Vec::with_capacity(b);
        for (r, &t) in picked.iter().enumerate() {
            let s = req[r];
            let done = Some(t) == tok.eos_id || {
                out[s].push(t);
                out[s].len() >= reqs[s].max_new || stop(s, &out[s])
            };
            if !done {
                keep.push(r);
                next[r] = t;
                len[r] += 1;
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < b {
            // Finished rows leave; columns that are padding in every remaining row go too.
            let trim = keep.iter().map(|&r| pad[r]).min().unwrap_or(0);
            let rows = Tensor::new(keep.iter().map(|&r| r as u32).collect::<Vec<_>>().as_slice(), dev)?;
            let shrink = |x: &Tensor| -> Result<Tensor> {
                Ok(x.index_select(&rows, 0)?.narrow(2, trim, width - trim)?.contiguous()?)
            };
            for (k, v) in cache.iter_mut() {
                *k = shrink(k)?;
                *v = shrink(v)?;
            }
            req = keep.iter().map(|&r| req[r]).collect();
            len = keep.iter().map(|&r| len[r]).collect();
            next = keep.iter().map(|&r| next[r]).collect();
            pad = keep.iter().map(|&r| pad[r] - trim).collect();
            width -= trim;
        }
    }
    Ok(())
}
