//! The key k* and the target value v* of one edit at one layer (ROME's compute_u / compute_v
//! inputs): one prefix pass gives the keys and the layer's output; v* is then optimised by Adam
//! on a vector added to the MLP output, re-running only the layers after the edit layer.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use super::prompts::EditPrompts;
use crate::hparams::{Hparams, VObjective, ValueNorm};
use crate::infer::log_softmax;
use crate::model::{Batch, Captured, LayerCtx, Llama, Mode, Taps};

/// Result of the key/value computation of one edit.
#[derive(Debug, Clone)]
pub struct KeyValue {
    /// Template-averaged key at the subject's last token.
    pub k_star: Vec<f64>,
    /// The key under each template.
    pub template_keys: Vec<Vec<f64>>,
    /// Template-averaged MLP output at the subject's last token, before the edit.
    pub v_orig: Vec<f64>,
    /// The optimised target value v_orig + δ.
    pub v_star: Vec<f64>,
    /// Optimisation steps taken.
    pub steps: usize,
    /// Loss at the first and the last step.
    pub loss_first: f64,
    pub loss_last: f64,
    /// Target NLL at the last step.
    pub nll_last: f64,
    /// The loss at every step (the last one is where it stopped).
    pub losses: Vec<f64>,
    /// Seconds spent on the keys (prefix pass) and on the v* optimisation (for a batch: the
    /// whole batch's).
    pub key_seconds: f64,
    pub value_seconds: f64,
    /// The shapes of one optimisation step (for a batch: the whole stacked step).
    pub shape: StepShape,
    /// For a batch: the number of the stack the record was optimised in (0 otherwise).
    pub stack: usize,
}

/// The shapes of one v\* optimisation step, from which its floating-point work is counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StepShape {
    /// Rows of the step (every prompt of every record in it).
    pub rows: usize,
    /// Positions recomputed per row (the padded suffix from the subject's last token).
    pub suffix_len: usize,
    /// Full (padded) length of the rows: the attention span of the suffix positions.
    pub seq_len: usize,
    /// Rows of the LM head (target tokens and the KL position of every record).
    pub logit_rows: usize,
    /// The layers re-run per step (those after the edit layer).
    pub layers: usize,
    /// Forward passes of the optimisation (for a stack: while any record ran).
    pub passes: usize,
    /// Backward passes (optimiser steps) of the optimisation.
    pub backward: usize,
    /// Rows summed over the forward passes (`rows × passes` unless records left a stack as they
    /// stopped).
    pub row_passes: usize,
    /// Rows summed over the backward passes.
    pub row_backwards: usize,
    /// LM-head rows summed over the forward passes.
    pub logit_passes: usize,
    /// LM-head rows summed over the backward passes.
    pub logit_backwards: usize,
}

/// Rows of `t: [batch, seq, n]` at the subject's last token of each rewrite row: `[rows, n]`.
fn at_subject(t: &Tensor, p: &EditPrompts) -> Result<Tensor> {
    let rows: Vec<u32> =
        (0..p.rewrite_rows).map(|r| p.batch.flat_index(r, p.subject_last[r]) as u32).collect();
    let idx = Tensor::new(rows.as_slice(), t.device())?;
    Ok(t.reshape(((), t.dim(D::Minus1)?))?.index_select(&idx, 0)?)
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
}

/// ‖x‖ summed in order (not `linalg::norm`, whose blocked sum would change the last bits of
/// every v\* optimisation made before).
fn norm_of(x: &[f64]) -> f64 {
    x.iter().map(|a| a * a).sum::<f64>().sqrt()
}

/// The norm the clamp and the weight decay of `form` are relative to: ‖v_orig‖ (the
/// template-averaged MLP output) for oedit's form; for MEMIT's, ‖h‖ with h the row `row`,
/// position `pos` of `h_layer: [batch, seq, d]`, the hidden state after the layer (the bare
/// prompt's subject token).
pub(crate) fn regulariser_norm(
    form: VObjective,
    v_orig: &[f64],
    h_layer: &Tensor,
    batch: &Batch,
    row: usize,
    pos: usize,
) -> Result<f64> {
    let n = match form {
        VObjective::Oedit => norm_of(v_orig),
        VObjective::Memit => {
            let d = h_layer.dim(D::Minus1)?;
            norm_of(&to_f64(&h_layer.reshape(((), d))?.get(batch.flat_index(row, pos))?)?)
        }
    };
    Ok(n.max(1e-12))
}

/// The position of the KL term in the essence row "{subject} is a" (`subject_last`: its
/// subject's last token, `last`: its last token).
pub(crate) fn kl_position(form: VObjective, subject_last: usize, last: usize) -> usize {
    match form {
        VObjective::Oedit => last,
        VObjective::Memit => subject_last,
    }
}

/// The terms of the KL divergence of `lp` (log-probabilities now) from `lp_init`/`p_init`
/// (before), to be summed over the vocabulary: KL(initial ‖ current) for oedit's form,
/// KL(current ‖ initial) for MEMIT's.
pub(crate) fn kl_terms(form: VObjective, lp_init: &Tensor, p_init: &Tensor, lp: &Tensor) -> Result<Tensor> {
    Ok(match form {
        VObjective::Oedit => (p_init * (lp_init - lp)?)?,
        VObjective::Memit => (lp.exp()? * (lp - lp_init)?)?,
    })
}

/// The weight-decay magnitude from ‖δ‖² (`sq_norm`, any shape): ‖δ‖² itself for oedit's form,
/// ‖δ‖ for MEMIT's (its gradient taken as 0 at δ = 0, as PyTorch's norm does).
pub(crate) fn decay(form: VObjective, sq_norm: Tensor) -> Result<Tensor> {
    Ok(match form {
        VObjective::Oedit => sq_norm,
        VObjective::Memit => (sq_norm + 1e-24)?.sqrt()?,
    })
}

/// Computes k* and v* for the edit described by `p` at `hp.layer`.
///
/// One full pass (all layers) gives the keys, the MLP outputs and every layer's attention
/// keys/values. δ only affects positions from the subject's last token on, so each optimisation
/// step re-runs the layers after the edit layer on that suffix alone, against the cached
/// keys/values of the prefix (identical results, a fraction of the work).
pub fn compute_key_value(model: &Llama, p: &EditPrompts, hp: &Hparams) -> Result<KeyValue> {
    let t0 = Instant::now();
    let layer = hp.layer;
    let dev = model.device();
    let batch = &p.batch;
    let rows = batch.batch_size();
    let n_layers = model.num_layers();
    let ctx = LayerCtx::new(model, batch, Mode::Inference)?;
    let mut cap = Captured::default();
    let taps = Taps { capture_keys: Some(layer), capture_kv: true, ..Default::default() };
    let h_layer = model.run_layers(model.embed(batch)?, 0..layer + 1, &ctx, &taps, &mut cap)?;
    let keys = cap.keys.take().context("key capture failed")?;
    let outs = cap.mlp_out.take().context("output capture failed")?;
    let d = outs.dim(D::Minus1)?;
    let k_rows = at_subject(&keys, p)?;
    let v_rows = at_subject(&outs, p)?;
    let template_keys: Vec<Vec<f64>> =
        (0..p.rewrite_rows).map(|i| to_f64(&k_rows.get(i)?)).collect::<Result<_>>()?;
    let k_star = to_f64(&k_rows.mean(0)?)?;
    let v_orig = to_f64(&v_rows.mean(0)?)?;
    let form = hp.v_objective;
    let base_norm = regulariser_norm(form, &v_orig, &h_layer, batch, 0, p.subject_last[0])?;
    // The rest of the unedited pass: the cache of all layers and the initial essence distribution.
    let h_final = model.run_layers(h_layer.clone(), layer + 1..n_layers, &ctx, &taps, &mut cap)?;
    let kv_cache = std::mem::take(&mut cap.kv);
    let key_seconds = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let suffix = LayerCtx::suffix(model, batch, &p.subject_last, Mode::Differentiable)?;
    let s_len = suffix.len;
    let hs_layer = h_layer.reshape(((), d))?.index_select(&suffix.gather, 0)?.reshape((rows, s_len, d))?;
    let at_start: Vec<f32> = (0..rows * s_len).map(|i| (i % s_len == 0) as u8 as f32).collect();
    let mask = Tensor::from_vec(at_start, (rows, s_len, 1), dev)?.to_dtype(model.dtype())?;
    let n_t = p.target_ids.len();
    let mut target_rows = Vec::new();
    let mut target_ids = Vec::new();
    for r in 0..p.rewrite_rows {
        for (j, &t) in p.target_ids.iter().enumerate() {
            target_rows.push((r * s_len + p.prompt_last[r] + j - p.subject_last[r]) as u32);
            target_ids.push(t);
        }
    }
    let kl_row = rows - 1;
    let kl_pos = kl_position(form, p.subject_last[kl_row], batch.len_of(kl_row) - 1);
    target_rows.push((kl_row * s_len + kl_pos - p.subject_last[kl_row]) as u32);
    let n_target_rows = target_ids.len();
    let rows_t = Tensor::new(target_rows.as_slice(), dev)?;
    let ids_t = Tensor::new(target_ids.as_slice(), dev)?.unsqueeze(1)?;
    let nll_weight = 1.0 / (n_t * p.rewrite_rows) as f64;
    let kl_full_row = Tensor::new(&[batch.flat_index(kl_row, kl_pos) as u32], dev)?;
    let lp_init = log_softmax(&model.logits_at(&h_final, &kl_full_row, Mode::Inference)?)?;
    let p_init = lp_init.exp()?;

    let max_norm = hp.clamp_norm_factor * base_norm;
    let delta = Var::zeros(d, DType::F32, dev)?;
    let mut opt = AdamW::new(
        vec![delta.clone()],
        ParamsAdamW { lr: hp.v_lr, weight_decay: 0.0, ..Default::default() },
    )?;
    let (mut loss_first, mut loss_last, mut nll_last) = (f64::NAN, f64::NAN, f64::NAN);
    let mut losses = Vec::with_capacity(hp.v_steps);
    let mut steps = 0;
    let suffix_taps = Taps { kv_cache: Some(&kv_cache), ..Default::default() };
    for step in 0..hp.v_steps {
        let dm = delta.as_tensor().to_dtype(model.dtype())?;
        let h = hs_layer.broadcast_add(&mask.broadcast_mul(&dm.reshape((1, 1, d))?)?)?;
        let h =
            model.run_layers(h, layer + 1..n_layers, &suffix.ctx, &suffix_taps, &mut Captured::default())?;
        let lp = log_softmax(&model.logits_at(&h, &rows_t, Mode::Differentiable)?)?;
        let picked = lp.narrow(0, 0, n_target_rows)?.gather(&ids_t, 1)?;
        let nll = (picked.sum_all()? * (-nll_weight))?;
        let lp_kl = lp.narrow(0, n_target_rows, 1)?;
        let kl = kl_terms(form, &lp_init, &p_init, &lp_kl)?.sum_all()?;
        let wd = (decay(form, delta.as_tensor().sqr()?.sum_all()?)?
            * (hp.weight_decay / (base_norm * base_norm)))?;
        let loss = ((&nll + (kl * hp.kl_weight)?)? + wd)?;
        let loss_v: f32 = loss.to_scalar()?;
        let nll_v: f32 = nll.to_scalar()?;
        if step == 0 {
            loss_first = loss_v as f64;
        }
        loss_last = loss_v as f64;
        nll_last = nll_v as f64;
        losses.push(loss_last);
        if (nll_v as f64) < hp.stop_loss
            || (hp.stop_at_argmax
                && targets_lead(&lp.narrow(0, 0, n_target_rows)?, &target_ids, hp.argmax_margin)?)
        {
            break;
        }
        let grads = loss.backward()?;
        opt.step(&grads)?;
        steps = step + 1;
        // Clamp ‖δ‖ ≤ clamp_norm_factor · ‖v‖ (‖h‖ in MEMIT's form).
        let norm: f32 = delta.as_tensor().sqr()?.sum_all()?.sqrt()?.to_scalar()?;
        if norm as f64 > max_norm {
            let scaled = (delta.as_tensor() * (max_norm / norm as f64))?;
            delta.set(&scaled)?;
        }
    }
    let dv = to_f64(delta.as_tensor())?;
    let mut v_star: Vec<f64> = v_orig.iter().zip(&dv).map(|(a, b)| a + b).collect();
    control_norm(&mut v_star, &v_orig, hp.value_norm);
    let passes = losses.len();
    Ok(KeyValue {
        k_star,
        template_keys,
        v_orig,
        v_star,
        steps,
        loss_first,
        loss_last,
        nll_last,
        losses,
        key_seconds,
        value_seconds: t1.elapsed().as_secs_f64(),
        shape: StepShape {
            rows,
            suffix_len: s_len,
            seq_len: batch.seq_len(),
            logit_rows: n_target_rows + 1,
            layers: n_layers - layer - 1,
            passes,
            backward: steps,
            row_passes: rows * passes,
            row_backwards: rows * steps,
            logit_passes: (n_target_rows + 1) * passes,
            logit_backwards: (n_target_rows + 1) * steps,
        },
        stack: 0,
    })
}

/// Whether `ids[i]` is the most probable token of row `i` of the log-probabilities `lp`
/// (`[ids.len(), vocab]`) for every row: the most-probable early stop of the v\* optimisation.
fn all_argmax(lp: &Tensor, ids: &[u32]) -> Result<bool> {
    let best: Vec<u32> = lp.argmax(D::Minus1)?.to_vec1()?;
    Ok(best.len() == ids.len() && best.iter().zip(ids).all(|(a, b)| a == b))
}

/// Whether every `ids[i]` is the most probable token of row `i` of `lp` and, when `margin` > 0,
/// leads the next most probable token of its row by at least `margin` nats: the stop of the v\*
/// optimisation with `stop_at_argmax` and `argmax_margin`.
pub fn targets_lead(lp: &Tensor, ids: &[u32], margin: f64) -> Result<bool> {
    if !all_argmax(lp, ids)? {
        return Ok(false);
    }
    Ok(margin <= 0.0 || row_leads(lp, ids)?.iter().all(|&l| l >= margin))
}

/// For each row `i` of the log-probabilities `lp` (`[ids.len(), vocab]`), how far `ids[i]` leads
/// the most probable other token of the row, in nats (negative where another token is ahead).
fn row_leads(lp: &Tensor, ids: &[u32]) -> Result<Vec<f64>> {
    let rows: Vec<Vec<f32>> = lp.to_dtype(DType::F32)?.to_vec2()?;
    if rows.len() != ids.len() {
        bail!("{} rows of log-probabilities for {} targets", rows.len(), ids.len());
    }
    rows.iter()
        .zip(ids)
        .map(|(row, &id)| {
            let own = *row.get(id as usize).context("target id outside the vocabulary")?;
            let rival = row
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != id as usize)
                .map(|(_, &x)| x)
                .fold(f32::NEG_INFINITY, f32::max);
            Ok(own as f64 - rival as f64)
        })
        .collect()
}

/// Applies the norm control `mode` to an optimised value: with [`ValueNorm::Original`], v\* is
/// rescaled to ‖v_orig‖ (a zero v\* is left alone).
pub fn control_norm(v_star: &mut [f64], v_orig: &[f64], mode: ValueNorm) {
    if mode == ValueNorm::Original {
        let (now, want) = (norm_of(v_star), norm_of(v_orig));
        if now > 0.0 && now.is_finite() {
            v_star.iter_mut().for_each(|x| *x *= want / now);
        }
    }
}

/// Template-averaged key at `key_layer` and residual stream after `out_layer` (both at the
/// subject's last token), for the current weights. MEMIT re-reads both after each layer's update.
pub fn subject_state(
    model: &Llama,
    p: &EditPrompts,
    key_layer: usize,
    out_layer: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let batch = &p.batch;
    let ctx = LayerCtx::new(model, batch, Mode::Inference)?;
    let mut cap = Captured::default();
    let taps = Taps { capture_keys: Some(key_layer), ..Default::default() };
    let h = model.run_layers(model.embed(batch)?, 0..out_layer.max(key_layer) + 1, &ctx, &taps, &mut cap)?;
    let keys = cap.keys.context("key capture failed")?;
    let k = to_f64(&at_subject(&keys, p)?.mean(0)?)?;
    let z = to_f64(&at_subject(&h, p)?.mean(0)?)?;
    Ok((k, z))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn all_argmax_needs_every_row_on_its_target() {
        let lp = Tensor::new(&[[-3.0f32, -0.1, -2.0], [-0.2, -1.0, -4.0]], &Device::Cpu).unwrap();
        assert!(all_argmax(&lp, &[1, 0]).unwrap());
        assert!(!all_argmax(&lp, &[1, 1]).unwrap());
        assert!(!all_argmax(&lp, &[2, 0]).unwrap());
        assert!(!all_argmax(&lp, &[1]).unwrap());
    }

    #[test]
    fn targets_lead_by_the_margin_on_every_row() {
        let lp = Tensor::new(&[[-3.0f32, -0.1, -2.0], [-0.2, -1.0, -4.0]], &Device::Cpu).unwrap();
        let leads = row_leads(&lp, &[1, 0]).unwrap();
        assert!((leads[0] - 1.9).abs() < 1e-6 && (leads[1] - 0.8).abs() < 1e-6, "{leads:?}");
        assert!((row_leads(&lp, &[2, 2]).unwrap()[0] + 1.9).abs() < 1e-6);
        assert!(targets_lead(&lp, &[1, 0], 0.0).unwrap());
        assert!(targets_lead(&lp, &[1, 0], 0.79).unwrap());
        assert!(!targets_lead(&lp, &[1, 0], 0.81).unwrap(), "the second row leads by 0.8 only");
        assert!(!targets_lead(&lp, &[2, 0], 0.0).unwrap());
        assert!(row_leads(&lp, &[1]).is_err());
        assert!(row_leads(&lp, &[1, 7]).is_err());
    }

    #[test]
    fn norm_control_rescales_to_the_original_norm_only_when_asked() {
        let orig = [3.0, 4.0];
        let mut v = vec![6.0, 8.0 + 6.0];
        control_norm(&mut v, &orig, ValueNorm::Free);
        assert_eq!(v, vec![6.0, 14.0]);
        control_norm(&mut v, &orig, ValueNorm::Original);
        let n = (v[0] * v[0] + v[1] * v[1]).sqrt();
        assert!((n - 5.0).abs() < 1e-12 && (v[1] / v[0] - 14.0 / 6.0).abs() < 1e-12);
        let mut zero = vec![0.0, 0.0];
        control_norm(&mut zero, &orig, ValueNorm::Original);
        assert_eq!(zero, vec![0.0, 0.0]);
    }
}
