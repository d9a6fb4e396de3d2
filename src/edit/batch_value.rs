//! k\* and v\* of a batch of edits, computed together on the same weights.
//!
//! The prompts of every record go into one padded batch: one prefix pass gives every record's
//! keys and the cached keys/values, then the v\* optimisations run as one stacked
//! forward/backward per step. Each record has its own trainable δ (a row of one `[B, d]` Var), its
//! own loss (NLL + KL + weight decay, exactly the single-record loss of [`super::target`]), and
//! the step minimises the sum of the losses of the records still running: no record's loss
//! depends on another record's δ (the rows of different records never attend to each other), so
//! each δ gets the gradient of its own loss. Adam works element by element, so one stacked Var
//! evolves as B separate ones. A record whose target NLL falls below `stop_loss` (or, with
//! `stop_at_argmax`, whose targets are all the most probable tokens, leading by `argmax_margin`:
//! the single-record predicate [`super::target::targets_lead`]) is frozen at that step (its δ is
//! put back after the optimiser step) and leaves the stack: later steps run the rows of the
//! records still optimising only ([`View`]). Each record keeps its own step count and losses,
//! and each δ is clamped to its own norm bound. Records of equal suffix length are stacked
//! together, since a stack pads every row to its longest suffix. Per record the trajectory is
//! the one the single-record optimisation takes, up to float rounding (checked by a test).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use super::prompts::EditPrompts;
use super::target::{
    control_norm, decay, kl_position, kl_terms, regulariser_norm, targets_lead, KeyValue, StepShape,
};
use crate::hparams::Hparams;
use crate::infer::log_softmax;
use crate::model::{Batch, Captured, LayerCtx, Llama, Mode, Taps};

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
}

/// Per-record progress of the stacked optimisation.
#[derive(Debug, Clone, Default)]
struct Track {
    losses: Vec<f64>,
    nll_last: f64,
    steps: usize,
    running: bool,
}

/// What the loss reads of one record, in its own rows' coordinates.
struct Scored {
    /// Its first row in the whole stack, and its number of rows.
    first_row: usize,
    rows: usize,
    /// (row, suffix position, token id) of every target token.
    targets: Vec<(usize, usize, u32)>,
    /// (row, suffix position) of its KL position.
    kl: (usize, usize),
}

/// The tensors of the whole stack that a [`View`] selects from.
struct Whole<'a> {
    /// The first layer the suffix pass runs (the one after the edit layer).
    first_layer: usize,
    hs: &'a Tensor,
    mask: &'a Tensor,
    ctx: &'a LayerCtx,
    kv: &'a [(Tensor, Tensor)],
    s_len: usize,
    p_init: &'a Tensor,
    lp_init: &'a Tensor,
    wd_scale: &'a Tensor,
}

/// The stack as one optimisation step runs it: the rows of the records still running.
struct View {
    /// The records in it (ascending), and the same as an index.
    records: Vec<usize>,
    records_t: Tensor,
    /// Rows in it.
    rows: usize,
    /// The record (row of δ) of each of its rows.
    delta_rows: Tensor,
    hs: Tensor,
    mask: Tensor,
    ctx: LayerCtx,
    kv: Vec<(Tensor, Tensor)>,
    /// LM-head rows (every target token, then every record's KL position) as flat indices.
    rows_t: Tensor,
    logit_rows: usize,
    target_ids: Vec<u32>,
    ids_t: Tensor,
    /// Each record's span of `target_ids`.
    segments: Vec<(usize, usize)>,
    /// NLL of record a = −Σ over its span / its span's length: one product.
    seg: Tensor,
    p_init: Tensor,
    lp_init: Tensor,
    wd_scale: Tensor,
}

impl View {
    fn of(w: &Whole<'_>, scored: &[Scored], records: &[usize]) -> Result<Self> {
        let dev = w.hs.device();
        let mut rows = Vec::new();
        let mut delta_rows = Vec::new();
        let (mut flat, mut target_ids, mut segments, mut kl_flat) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &i in records {
            let sc = &scored[i];
            let base = rows.len();
            rows.extend((sc.first_row..sc.first_row + sc.rows).map(|r| r as u32));
            delta_rows.extend(std::iter::repeat_n(i as u32, sc.rows));
            let start = target_ids.len();
            for &(r, pos, id) in &sc.targets {
                flat.push(((base + r) * w.s_len + pos) as u32);
                target_ids.push(id);
            }
            segments.push((start, target_ids.len() - start));
            kl_flat.push(((base + sc.kl.0) * w.s_len + sc.kl.1) as u32);
        }
        let n_targets = target_ids.len();
        flat.extend(kl_flat);
        let mut seg = vec![0f32; records.len() * n_targets];
        for (a, &(start, len)) in segments.iter().enumerate() {
            seg[a * n_targets + start..a * n_targets + start + len].fill((-1.0 / len.max(1) as f64) as f32);
        }
        let rows_idx = Tensor::new(rows.as_slice(), dev)?;
        let rec: Vec<u32> = records.iter().map(|&i| i as u32).collect();
        let records_t = Tensor::new(rec.as_slice(), dev)?;
        // The whole stack's tensors are shared, not copied, while every record runs; the cached
        // keys/values of the layers up to the edit layer are never read by the suffix pass.
        let all = records.len() == scored.len();
        let sel = |t: &Tensor| if all { Ok(t.clone()) } else { t.index_select(&rows_idx, 0) };
        let kv =
            w.kv.iter()
                .enumerate()
                .map(
                    |(l, (k, v))| {
                        if l < w.first_layer {
                            Ok((k.clone(), v.clone()))
                        } else {
                            Ok((sel(k)?, sel(v)?))
                        }
                    },
                )
                .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(View {
            records: records.to_vec(),
            rows: rows.len(),
            delta_rows: Tensor::new(delta_rows.as_slice(), dev)?,
            hs: sel(w.hs)?,
            mask: sel(w.mask)?,
            ctx: w.ctx.select_rows(&rows_idx)?,
            kv,
            logit_rows: flat.len(),
            rows_t: Tensor::new(flat.as_slice(), dev)?,
            ids_t: Tensor::new(target_ids.as_slice(), dev)?.unsqueeze(1)?,
            target_ids,
            segments,
            seg: Tensor::from_vec(seg, (records.len(), n_targets), dev)?.to_dtype(w.lp_init.dtype())?,
            p_init: w.p_init.index_select(&records_t, 0)?,
            lp_init: w.lp_init.index_select(&records_t, 0)?,
            wd_scale: w.wd_scale.index_select(&records_t, 0)?,
            records_t,
        })
    }
}

/// Where each record's rows sit in the stacked batch.
struct Layout {
    /// First row of each record.
    offset: Vec<usize>,
    /// The subject's last token of every row.
    subject_last: Vec<usize>,
}

impl Layout {
    fn new(prompts: &[&EditPrompts]) -> Self {
        let mut offset = Vec::with_capacity(prompts.len());
        let mut rows = 0;
        for p in prompts {
            offset.push(rows);
            rows += p.batch.batch_size();
        }
        let subject_last = prompts.iter().flat_map(|p| p.subject_last.iter().copied()).collect();
        Self { offset, subject_last }
    }
}

/// Rows of `t: [rows, seq, n]` at the subject's last token of record `i`'s rewrite rows.
fn record_rows(t: &Tensor, batch: &Batch, p: &EditPrompts, offset: usize) -> Result<Tensor> {
    let idx: Vec<u32> =
        (0..p.rewrite_rows).map(|r| batch.flat_index(offset + r, p.subject_last[r]) as u32).collect();
    let idx = Tensor::new(idx.as_slice(), t.device())?;
    Ok(t.reshape(((), t.dim(D::Minus1)?))?.index_select(&idx, 0)?)
}

/// Most suffix positions (rows × padded suffix length) one stacked optimisation runs at once.
/// A stack's activations for the backward pass grow with it (measured on SmolLM2-135M, f32, 24
/// layers after the edit layer: peak memory 3.2 GB for a stack of 420 positions against 1.1 GB
/// for a single edit, about 5 MB per position), so a large batch is optimised in several stacks
/// of at most this size, one after another; each record's result is the same either way (no
/// record's loss depends on another's δ). 256 positions hold about 7 CounterFact records with
/// the SmolLM2 preset's 6 templates, at about 1.3 GB: the machine this was built on is shared
/// (24 GiB for several jobs).
pub const STACK_POSITIONS: usize = 256;

/// The stack bound on a GPU. There a v\* step is bound by kernel launches, not arithmetic, so
/// large stacks are what make batching pay: a Llama-2-7B-shaped batch of 100 records ran in 2
/// stacks of at most 4,096 positions on one H200 in 20.6 s of v\*, against 3.1 s for one record
/// alone (bench-results/cuda).
pub const GPU_STACK_POSITIONS: usize = 4096;

/// The stack bound for the device the model runs on.
pub fn stack_positions(device: &candle_core::Device) -> usize {
    if device.is_cpu() {
        STACK_POSITIONS
    } else {
        GPU_STACK_POSITIONS
    }
}

/// The longest suffix (from the subject's last token on) of record `p`'s rows.
fn suffix_extent(p: &EditPrompts) -> usize {
    (0..p.batch.batch_size())
        .map(|r| p.batch.len_of(r) - p.subject_last[r].min(p.batch.len_of(r) - 1))
        .max()
        .unwrap_or(1)
}

/// Splits the records into consecutive stacks of at most `budget` padded suffix positions (at
/// least one record each).
fn stacks(prompts: &[&EditPrompts], budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut rows, mut len) = (0, 0, 0);
    for (i, p) in prompts.iter().enumerate() {
        let (r, l) = (p.batch.batch_size(), suffix_extent(p));
        if i > start && (rows + r) * len.max(l) > budget {
            out.push(start..i);
            (start, rows, len) = (i, 0, 0);
        }
        rows += r;
        len = len.max(l);
    }
    if start < prompts.len() {
        out.push(start..prompts.len());
    }
    out
}

/// Computes k\* and v\* of every record of `prompts` at `hp.layer` on the current weights, the
/// v\* optimisations stacked (see the module documentation) in stacks of at most
/// [`stack_positions`] suffix positions, records of equal suffix length stacked together. A
/// record's `key_seconds`, `value_seconds` and `shape` are those of its stack, `stack` its
/// number.
pub fn compute_key_values(model: &Llama, prompts: &[&EditPrompts], hp: &Hparams) -> Result<Vec<KeyValue>> {
    compute_key_values_in(model, prompts, hp, stack_positions(model.device()))
}

/// [`compute_key_values`] with stacks of at most `budget` suffix positions.
pub fn compute_key_values_in(
    model: &Llama,
    prompts: &[&EditPrompts],
    hp: &Hparams,
    budget: usize,
) -> Result<Vec<KeyValue>> {
    // Records of equal suffix length share stacks: a stack pads every row to its longest
    // suffix, so mixing lengths would run padding positions at every step.
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| suffix_extent(prompts[i]));
    let sorted: Vec<&EditPrompts> = order.iter().map(|&i| prompts[i]).collect();
    let mut out: Vec<Option<KeyValue>> = (0..prompts.len()).map(|_| None).collect();
    for (n, range) in stacks(&sorted, budget).into_iter().enumerate() {
        let kvs = stacked(model, &sorted[range.clone()], hp)?;
        for (j, mut kv) in range.zip(kvs) {
            kv.stack = n;
            out[order[j]] = Some(kv);
        }
    }
    out.into_iter().map(|kv| kv.context("internal error: a record of the batch has no stack")).collect()
}

/// One stacked optimisation of all of `prompts`.
fn stacked(model: &Llama, prompts: &[&EditPrompts], hp: &Hparams) -> Result<Vec<KeyValue>> {
    let n = prompts.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let t0 = Instant::now();
    let layer = hp.layer;
    let dev = model.device();
    let n_layers = model.num_layers();
    let batch = Batch::concat(&prompts.iter().map(|p| &p.batch).collect::<Vec<_>>())?;
    let rows = batch.batch_size();
    let lay = Layout::new(prompts);

    // The prefix pass: keys, MLP outputs and every layer's keys/values for all records at once.
    let ctx = LayerCtx::new(model, &batch, Mode::Inference)?;
    let mut cap = Captured::default();
    let taps = Taps { capture_keys: Some(layer), capture_kv: true, ..Default::default() };
    let h_layer = model.run_layers(model.embed(&batch)?, 0..layer + 1, &ctx, &taps, &mut cap)?;
    let keys = cap.keys.take().context("key capture failed")?;
    let outs = cap.mlp_out.take().context("output capture failed")?;
    let d = outs.dim(D::Minus1)?;
    let form = hp.v_objective;
    let mut template_keys = Vec::with_capacity(n);
    let mut k_star = Vec::with_capacity(n);
    let mut v_orig = Vec::with_capacity(n);
    let mut base_norm = Vec::with_capacity(n);
    for (i, p) in prompts.iter().enumerate() {
        let k_rows = record_rows(&keys, &batch, p, lay.offset[i])?;
        let v_rows = record_rows(&outs, &batch, p, lay.offset[i])?;
        template_keys.push((0..p.rewrite_rows).map(|r| to_f64(&k_rows.get(r)?)).collect::<Result<Vec<_>>>()?);
        k_star.push(to_f64(&k_rows.mean(0)?)?);
        let v = to_f64(&v_rows.mean(0)?)?;
        base_norm.push(regulariser_norm(form, &v, &h_layer, &batch, lay.offset[i], p.subject_last[0])?);
        v_orig.push(v);
    }
    let h_final = model.run_layers(h_layer.clone(), layer + 1..n_layers, &ctx, &taps, &mut cap)?;
    let kv_cache = std::mem::take(&mut cap.kv);
    let key_seconds = t0.elapsed().as_secs_f64();

    // The stacked optimisation problem, in the coordinates of the whole stack.
    let t1 = Instant::now();
    let suffix = LayerCtx::suffix(model, &batch, &lay.subject_last, Mode::Differentiable)?;
    let s_len = suffix.len;
    let hs_layer = h_layer.reshape(((), d))?.index_select(&suffix.gather, 0)?.reshape((rows, s_len, d))?;
    let at_start: Vec<f32> = (0..rows * s_len).map(|i| (i % s_len == 0) as u8 as f32).collect();
    let mask = Tensor::from_vec(at_start, (rows, s_len, 1), dev)?.to_dtype(model.dtype())?;
    let mut scored = Vec::with_capacity(n);
    let mut kl_full_rows = Vec::with_capacity(n);
    for (i, p) in prompts.iter().enumerate() {
        let mut targets = Vec::new();
        for r in 0..p.rewrite_rows {
            for (j, &t) in p.target_ids.iter().enumerate() {
                targets.push((r, p.prompt_last[r] + j - p.subject_last[r], t));
            }
        }
        let kl_row = lay.offset[i] + p.batch.batch_size() - 1;
        let kl_pos = kl_position(form, lay.subject_last[kl_row], batch.len_of(kl_row) - 1);
        kl_full_rows.push(batch.flat_index(kl_row, kl_pos) as u32);
        let kl = (p.batch.batch_size() - 1, kl_pos - lay.subject_last[kl_row]);
        scored.push(Scored { first_row: lay.offset[i], rows: p.batch.batch_size(), targets, kl });
    }
    let kl_full = Tensor::new(kl_full_rows.as_slice(), dev)?;
    let lp_init = log_softmax(&model.logits_at(&h_final, &kl_full, Mode::Inference)?)?;
    let p_init = lp_init.exp()?;

    let max_norm: Vec<f64> = base_norm.iter().map(|v| hp.clamp_norm_factor * v).collect();
    let wd_scale: Vec<f32> = base_norm.iter().map(|v| (hp.weight_decay / (v * v)) as f32).collect();
    let wd_scale = Tensor::from_vec(wd_scale, n, dev)?;
    let whole = Whole {
        first_layer: layer + 1,
        hs: &hs_layer,
        mask: &mask,
        ctx: &suffix.ctx,
        kv: &kv_cache,
        s_len,
        p_init: &p_init,
        lp_init: &lp_init,
        wd_scale: &wd_scale,
    };
    let delta = Var::zeros((n, d), DType::F32, dev)?;
    let mut opt = AdamW::new(
        vec![delta.clone()],
        ParamsAdamW { lr: hp.v_lr, weight_decay: 0.0, ..Default::default() },
    )?;
    let mut track = vec![Track { running: true, nll_last: f64::NAN, ..Track::default() }; n];
    let mut saved = vec![0f32; n * d];
    let mut view = View::of(&whole, &scored, &(0..n).collect::<Vec<_>>())?;
    let mut shapes = Vec::new();
    for step in 0..hp.v_steps {
        shapes.push((view.rows, view.logit_rows));
        let dm = delta.as_tensor().to_dtype(model.dtype())?.index_select(&view.delta_rows, 0)?;
        let h = view.hs.broadcast_add(&view.mask.broadcast_mul(&dm.reshape((view.rows, 1, d))?)?)?;
        let taps = Taps { kv_cache: Some(&view.kv), ..Default::default() };
        let h = model.run_layers(h, layer + 1..n_layers, &view.ctx, &taps, &mut Captured::default())?;
        let lp = log_softmax(&model.logits_at(&h, &view.rows_t, Mode::Differentiable)?)?;
        let n_targets = view.target_ids.len();
        let picked = lp.narrow(0, 0, n_targets)?.gather(&view.ids_t, 1)?;
        let nll = view.seg.matmul(&picked)?.squeeze(1)?;
        let lp_kl = lp.narrow(0, n_targets, view.records.len())?;
        let kl = kl_terms(form, &view.lp_init, &view.p_init, &lp_kl)?.sum(1)?;
        let wd = (decay(form, delta.as_tensor().index_select(&view.records_t, 0)?.sqr()?.sum(1)?)?
            * &view.wd_scale)?;
        let loss = ((&nll + (kl * hp.kl_weight)?)? + wd)?;
        let loss_v: Vec<f32> = loss.to_dtype(DType::F32)?.to_vec1()?;
        let nll_v: Vec<f32> = nll.to_dtype(DType::F32)?.to_vec1()?;
        for (a, &i) in view.records.iter().enumerate() {
            let t = &mut track[i];
            t.losses.push(loss_v[a] as f64);
            t.nll_last = nll_v[a] as f64;
            let (start, len) = view.segments[a];
            let argmax = hp.stop_at_argmax
                && targets_lead(
                    &lp.narrow(0, start, len)?,
                    &view.target_ids[start..start + len],
                    hp.argmax_margin,
                )?;
            if (nll_v[a] as f64) < hp.stop_loss || argmax {
                t.running = false;
            }
        }
        if track.iter().all(|t| !t.running) {
            break;
        }
        let running: Vec<f32> = view.records.iter().map(|&i| track[i].running as u8 as f32).collect();
        let running = Tensor::from_vec(running, view.records.len(), dev)?.to_dtype(loss.dtype())?;
        let grads = (loss * running)?.sum_all()?.backward()?;
        opt.step(&grads)?;
        // Stopped records get their δ back; the others are clamped to their own norm bound.
        let mut now: Vec<f32> = delta.as_tensor().flatten_all()?.to_vec1()?;
        for (i, t) in track.iter_mut().enumerate() {
            let row = &mut now[i * d..(i + 1) * d];
            if !t.running {
                row.copy_from_slice(&saved[i * d..(i + 1) * d]);
                continue;
            }
            t.steps = step + 1;
            let norm = row.iter().map(|&x| x * x).sum::<f32>().sqrt();
            if norm as f64 > max_norm[i] {
                let s = max_norm[i] / norm as f64;
                row.iter_mut().for_each(|x| *x = (*x as f64 * s) as f32);
            }
        }
        delta.set(&Tensor::from_vec(now.clone(), (n, d), dev)?)?;
        saved = now;
        // Records that stopped leave the stack: the next steps run the others' rows only.
        if view.records.iter().any(|&i| !track[i].running) {
            let still: Vec<usize> = (0..n).filter(|&i| track[i].running).collect();
            view = View::of(&whole, &scored, &still)?;
        }
    }
    let value_seconds = t1.elapsed().as_secs_f64();
    let (first_rows, first_logits) = shapes.first().copied().unwrap_or((rows, 0));
    // Every pass but a last one that found all records stopped was followed by a backward pass.
    let backward_passes = track.iter().map(|t| t.steps).max().unwrap_or(0);
    let shape = StepShape {
        rows: first_rows,
        suffix_len: s_len,
        seq_len: batch.seq_len(),
        logit_rows: first_logits,
        layers: n_layers - layer - 1,
        passes: track.iter().map(|t| t.losses.len()).max().unwrap_or(0),
        backward: track.iter().map(|t| t.steps).max().unwrap_or(0),
        row_passes: shapes.iter().map(|s| s.0).sum(),
        row_backwards: shapes.iter().take(backward_passes).map(|s| s.0).sum(),
        logit_passes: shapes.iter().map(|s| s.1).sum(),
        logit_backwards: shapes.iter().take(backward_passes).map(|s| s.1).sum(),
    };
    let dv: Vec<f32> = delta.as_tensor().flatten_all()?.to_vec1()?;
    let mut out = Vec::with_capacity(n);
    for (i, t) in track.into_iter().enumerate() {
        if t.losses.is_empty() && hp.v_steps > 0 {
            bail!("internal error: record {i} of the batch has no loss");
        }
        let mut v_star: Vec<f64> =
            v_orig[i].iter().zip(&dv[i * d..(i + 1) * d]).map(|(a, &b)| a + b as f64).collect();
        control_norm(&mut v_star, &v_orig[i], hp.value_norm);
        out.push(KeyValue {
            k_star: std::mem::take(&mut k_star[i]),
            template_keys: std::mem::take(&mut template_keys[i]),
            v_orig: std::mem::take(&mut v_orig[i]),
            v_star,
            steps: t.steps,
            loss_first: t.losses.first().copied().unwrap_or(f64::NAN),
            loss_last: t.losses.last().copied().unwrap_or(f64::NAN),
            nll_last: t.nll_last,
            losses: t.losses,
            key_seconds,
            value_seconds,
            shape,
            stack: 0,
        });
    }
    Ok(out)
}
