//! The forward pass and its editing taps on the tiny model: padding, layer ranges, key capture,
//! the delta hook, the differentiable mode, replacing a down-projection, and gradients.

use candle_core::{DType, Tensor, Var, D};
use oedit::model::{Batch, Captured, DeltaHook, LayerCtx, Llama, Mode, Padding, Taps};
use tempfile::TempDir;

use crate::common::*;

fn tiny(opts: TinyOpts) -> (TempDir, oedit::loader::LoadedModel) {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_model(&tmp.path().join("m"), opts);
    let lm = load(&dir);
    (tmp, lm)
}

fn tiny_dtype(dtype: DType) -> (TempDir, oedit::loader::LoadedModel) {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_model(&tmp.path().join("m"), TinyOpts::default());
    let lm = load_dtype(&dir, dtype);
    (tmp, lm)
}

/// Logits of `batch` computed layer by layer in `mode`, with `taps`.
fn forward_with(model: &Llama, batch: &Batch, mode: Mode, taps: &Taps) -> (Tensor, Captured) {
    let ctx = LayerCtx::new(model, batch, mode).unwrap();
    let mut cap = Captured::default();
    let h =
        model.run_layers(model.embed(batch).unwrap(), 0..model.num_layers(), &ctx, taps, &mut cap).unwrap();
    (model.logits(&h, mode).unwrap(), cap)
}

fn seqs() -> Vec<Vec<u32>> {
    vec![sample_ids(5, 1), sample_ids(9, 2), sample_ids(7, 3), sample_ids(1, 4)]
}

#[test]
fn logits_at_every_position() {
    let (_t, lm) = tiny(TinyOpts::default());
    let batch = Batch::new(seqs(), Padding::Right, 0).unwrap();
    let (l, cap) = lm.model.forward(&batch, &Taps::default()).unwrap();
    assert_eq!(l.dims(), &[4, 9, vocab_size()]);
    assert_eq!(l.dtype(), DType::F32);
    assert!(cap.keys.is_none() && cap.mlp_out.is_none());
    // Rows and positions really differ (no broadcast of one row).
    let a = l.get(1).unwrap().get(3).unwrap();
    let b = l.get(1).unwrap().get(4).unwrap();
    let c = l.get(2).unwrap().get(3).unwrap();
    assert!(max_abs_diff(&a, &b) > 1e-3 && max_abs_diff(&a, &c) > 1e-3);
    // logits_at picks the same rows as the full forward.
    let h = hidden_states(&lm.model, &batch);
    let rows =
        Tensor::new(&[batch.flat_index(1, 8) as u32, batch.flat_index(2, 0) as u32], lm.model.device())
            .unwrap();
    let picked = lm.model.logits_at(&h, &rows, Mode::Inference).unwrap();
    let expect =
        Tensor::stack(&[l.get(1).unwrap().get(8).unwrap(), l.get(2).unwrap().get(0).unwrap()], 0).unwrap();
    assert!(max_abs_diff(&picked, &expect) < 1e-6);
}

#[test]
fn padding_side_does_not_change_real_positions() {
    let (_t, lm) = tiny(TinyOpts::default());
    let seqs = seqs();
    let singles: Vec<Tensor> = seqs.iter().map(|s| logits(&lm.model, s).squeeze(0).unwrap()).collect();
    for padding in [Padding::Right, Padding::Left] {
        // A pad id that is a real token, so that masking (not the id) must hide it.
        let batch = Batch::new(seqs.clone(), padding, 42).unwrap();
        let (l, _) = lm.model.forward(&batch, &Taps::default()).unwrap();
        for (r, s) in seqs.iter().enumerate() {
            for i in 0..s.len() {
                let got = l.get(r).unwrap().get(batch.index_of(r, i)).unwrap();
                let want = singles[r].get(i).unwrap();
                let d = max_abs_diff(&got, &want);
                assert!(d < 1e-4, "{padding:?} row {r} token {i}: diff {d}");
            }
        }
    }
}

#[test]
fn split_layer_ranges_equal_full_forward() {
    let (_t, lm) = tiny(TinyOpts { tied: true, ..Default::default() });
    let batch = Batch::new(seqs(), Padding::Left, 0).unwrap();
    let (full, _) = lm.model.forward(&batch, &Taps::default()).unwrap();
    let ctx = LayerCtx::new(&lm.model, &batch, Mode::Inference).unwrap();
    for k in 0..=LAYERS {
        let mut cap = Captured::default();
        let h0 = lm.model.embed(&batch).unwrap();
        let h = lm.model.run_layers(h0, 0..k, &ctx, &Taps::default(), &mut cap).unwrap();
        let h = lm.model.run_layers(h, k..LAYERS, &ctx, &Taps::default(), &mut cap).unwrap();
        let l = lm.model.logits(&h, Mode::Inference).unwrap();
        assert!(max_abs_diff(&l, &full) < 1e-6, "split at {k}");
    }
    // An empty range is the identity.
    let h0 = lm.model.embed(&batch).unwrap();
    let h = lm.model.run_layers(h0.clone(), 1..1, &ctx, &Taps::default(), &mut Captured::default()).unwrap();
    assert_eq!(max_abs_diff(&h, &h0), 0.0);
}

#[test]
fn captured_keys_project_to_mlp_output() {
    let (_t, lm) = tiny(TinyOpts::default());
    let batch = Batch::new(seqs(), Padding::Right, 0).unwrap();
    let mut previous: Option<Tensor> = None;
    for l in 0..LAYERS {
        let taps = Taps { capture_keys: Some(l), ..Default::default() };
        let (logits_tapped, cap) = lm.model.forward(&batch, &taps).unwrap();
        let (plain, _) = lm.model.forward(&batch, &Taps::default()).unwrap();
        assert_eq!(max_abs_diff(&logits_tapped, &plain), 0.0, "capturing changed the logits");
        let key = cap.keys.expect("keys captured");
        let out = cap.mlp_out.expect("mlp_out captured");
        assert_eq!(key.dims(), &[4, 9, INTERMEDIATE]);
        assert_eq!(out.dims(), &[4, 9, HIDDEN]);
        let w = lm.model.down_proj(l);
        assert_eq!(w.dims(), &[HIDDEN, INTERMEDIATE]);
        let proj = key.broadcast_matmul(&w.t().unwrap()).unwrap();
        let d = max_abs_diff(&proj, &out);
        assert!(d < 1e-5, "layer {l}: W·key differs from mlp_out by {d}");
        let norm: f32 = out.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 1e-6);
        if let Some(p) = &previous {
            assert!(max_abs_diff(p, &key) > 1e-4, "layer {l} captured the same keys as layer {}", l - 1);
        }
        previous = Some(key);
    }
}

#[test]
fn delta_hook_adds_the_vector_at_masked_positions_only() {
    let (_t, lm) = tiny(TinyOpts::default());
    let m = &lm.model;
    let batch = Batch::new(vec![sample_ids(6, 9), sample_ids(8, 10)], Padding::Right, 0).unwrap();
    let layer = 1;
    let at = [(0usize, 2usize), (1, 5)];
    let mask = batch.position_mask(&at, m.dtype(), m.device()).unwrap();
    assert_eq!(mask.dims(), &[2, 8, 1]);
    let delta = Rng::new(99).tensor(&[HIDDEN], 0.0, 1.0);
    let ctx = LayerCtx::new(m, &batch, Mode::Inference).unwrap();
    let run = |taps: &Taps, upto: usize| {
        let mut cap = Captured::default();
        let h = m.run_layers(m.embed(&batch).unwrap(), 0..upto, &ctx, taps, &mut cap).unwrap();
        (h, cap)
    };
    let plain_taps = Taps { capture_keys: Some(layer), ..Default::default() };
    let hook_taps = Taps {
        capture_keys: Some(layer),
        add_delta: Some(DeltaHook { layer, mask: &mask, delta: &delta }),
        ..Default::default()
    };
    let expected = mask.broadcast_mul(&delta.reshape((1, 1, HIDDEN)).unwrap()).unwrap();

    // Right after the layer, the residual stream differs by exactly mask·delta.
    let (h0, c0) = run(&plain_taps, layer + 1);
    let (h1, c1) = run(&hook_taps, layer + 1);
    let diff_out = (c1.mlp_out.unwrap() - c0.mlp_out.unwrap()).unwrap();
    assert!(max_abs_diff(&diff_out, &expected) < 1e-6);
    assert!(max_abs_diff(&(h1 - h0).unwrap(), &expected) < 1e-5);
    // The keys (taken before the vector is added) are unchanged.
    assert_eq!(max_abs_diff(&c0.keys.unwrap(), &c1.keys.unwrap()), 0.0);

    // Layers before the hook are untouched.
    let (a, _) = run(&plain_taps, layer);
    let (b, _) = run(&hook_taps, layer);
    assert_eq!(max_abs_diff(&a, &b), 0.0);

    // At the end, positions before the first masked one of each row are untouched (causality)
    // and later ones change.
    let (l0, _) = forward_with(m, &batch, Mode::Inference, &Taps::default());
    let (l1, _) = forward_with(m, &batch, Mode::Inference, &hook_taps);
    for &(r, first) in &at {
        for i in 0..batch.len_of(r) {
            let d = max_abs_diff(&l0.get(r).unwrap().get(i).unwrap(), &l1.get(r).unwrap().get(i).unwrap());
            if i < first {
                assert!(d < 1e-6, "row {r} position {i} changed by {d}");
            } else {
                assert!(d > 1e-4, "row {r} position {i} did not change");
            }
        }
    }

    // A hook on another layer than the one being run does nothing.
    let other =
        Taps { add_delta: Some(DeltaHook { layer: 2, mask: &mask, delta: &delta }), ..Default::default() };
    let (x, _) = run(&other, 2);
    let (y, _) = run(&Taps::default(), 2);
    assert_eq!(max_abs_diff(&x, &y), 0.0);
}

#[test]
fn differentiable_mode_matches_inference() {
    let (_t, lm) = tiny(TinyOpts::default());
    for padding in [Padding::Right, Padding::Left] {
        let batch = Batch::new(seqs(), padding, 0).unwrap();
        let mask = batch.position_mask(&[(1, 3)], DType::F32, lm.model.device()).unwrap();
        let delta = Rng::new(5).tensor(&[HIDDEN], 0.0, 0.5);
        let taps = Taps {
            capture_keys: Some(0),
            add_delta: Some(DeltaHook { layer: 0, mask: &mask, delta: &delta }),
            ..Default::default()
        };
        let (a, ca) = forward_with(&lm.model, &batch, Mode::Inference, &taps);
        let (b, cb) = forward_with(&lm.model, &batch, Mode::Differentiable, &taps);
        let d = max_abs_diff(&a, &b);
        assert!(d < 1e-4, "{padding:?}: modes differ by {d}");
        assert!(max_abs_diff(&ca.keys.unwrap(), &cb.keys.unwrap()) < 1e-5);
        // with_mode keeps the tables.
        let ctx = LayerCtx::new(&lm.model, &batch, Mode::Inference).unwrap().with_mode(Mode::Differentiable);
        let h = lm
            .model
            .run_layers(lm.model.embed(&batch).unwrap(), 0..LAYERS, &ctx, &taps, &mut Captured::default())
            .unwrap();
        let c = lm.model.logits(&h, Mode::Differentiable).unwrap();
        assert_eq!(max_abs_diff(&b, &c), 0.0);
    }
}

#[test]
fn set_down_proj_changes_and_restores_logits() {
    let (_t, mut lm) = tiny(TinyOpts::default());
    let ids = sample_ids(10, 77);
    let before = logits(&lm.model, &ids);
    let original = lm.model.down_proj(1).clone();
    let others = [lm.model.down_proj(0).copy().unwrap(), lm.model.down_proj(2).copy().unwrap()];
    let noise = Rng::new(3).tensor(&[HIDDEN, INTERMEDIATE], 0.0, 0.2);
    lm.model.set_down_proj(1, (&original + noise).unwrap()).unwrap();
    let changed = logits(&lm.model, &ids);
    assert!(max_abs_diff(&before, &changed) > 1e-3);
    // Only layer 1 changed.
    assert_eq!(max_abs_diff(lm.model.down_proj(0), &others[0]), 0.0);
    assert_eq!(max_abs_diff(lm.model.down_proj(2), &others[1]), 0.0);
    assert!(max_abs_diff(lm.model.down_proj(1), &original) > 0.1);
    lm.model.set_down_proj(1, original.clone()).unwrap();
    assert_eq!(max_abs_diff(lm.model.down_proj(1), &original), 0.0);
    assert_eq!(max_abs_diff(&before, &logits(&lm.model, &ids)), 0.0, "restoring is not bit-exact");
    // A wrong shape is refused and leaves the weight alone.
    let wrong = Tensor::zeros((INTERMEDIATE, HIDDEN), DType::F32, lm.model.device()).unwrap();
    assert!(lm.model.set_down_proj(1, wrong).is_err());
    // Another dtype is converted to the model's.
    lm.model.set_down_proj(1, original.to_dtype(DType::F64).unwrap()).unwrap();
    assert_eq!(lm.model.down_proj(1).dtype(), DType::F32);
    assert_eq!(max_abs_diff(&before, &logits(&lm.model, &ids)), 0.0);
}

#[test]
fn model_loads_in_f64_and_bf16() {
    let (_t, f32m) = tiny(TinyOpts::default());
    let (_t2, f64m) = tiny_dtype(DType::F64);
    let (_t3, bf16m) = tiny_dtype(DType::BF16);
    assert_eq!((f64m.model.dtype(), bf16m.model.dtype()), (DType::F64, DType::BF16));
    let ids = sample_ids(7, 8);
    let batch = Batch::new(vec![ids.clone()], Padding::Right, 0).unwrap();
    let a = logits(&f32m.model, &ids);
    // f64 serves the gradient checks, through the differentiable ops (candle's fused rms_norm
    // has no f64 kernel, and the CLI only offers f32, bf16 and f16).
    let (b, _) = forward_with(&f64m.model, &batch, Mode::Differentiable, &Taps::default());
    let d = max_abs_diff(&a, &b);
    assert!(d < 1e-4, "f64 logits differ by {d}");
    let d = max_abs_diff(&a, &logits(&bf16m.model, &ids));
    assert!(d < 0.5, "bf16 logits differ by {d}");
}

/// Sum over `positions` of log p(target | prefix), from logits `[1, t, V]`, in f64.
fn target_logprob(logits: &Tensor, positions: &[usize], targets: &[u32]) -> Tensor {
    let l = logits.squeeze(0).unwrap().to_dtype(DType::F64).unwrap();
    let lse = l.log_sum_exp(D::Minus1).unwrap().unsqueeze(D::Minus1).unwrap();
    let lp = l.broadcast_sub(&lse).unwrap();
    let mut total: Option<Tensor> = None;
    for (&p, &t) in positions.iter().zip(targets) {
        let v = lp.get(p).unwrap().get(t as usize).unwrap();
        total = Some(match total {
            None => v,
            Some(acc) => (acc + v).unwrap(),
        });
    }
    total.unwrap()
}

fn grad_check(dtype: DType, eps: f64, tol: f64) {
    let (_t, lm) = tiny_dtype(dtype);
    let m = &lm.model;
    let ids = sample_ids(7, 31);
    let batch = Batch::new(vec![ids], Padding::Right, 0).unwrap();
    let mask = batch.position_mask(&[(0, 1), (0, 3)], dtype, m.device()).unwrap();
    let positions = [1usize, 3, 4, 6];
    let targets = [5u32, 100, 257, 40];
    let ctx = LayerCtx::new(m, &batch, Mode::Differentiable).unwrap();
    let loss_of = |delta: &Tensor| -> Tensor {
        let taps = Taps { add_delta: Some(DeltaHook { layer: 1, mask: &mask, delta }), ..Default::default() };
        let h =
            m.run_layers(m.embed(&batch).unwrap(), 0..LAYERS, &ctx, &taps, &mut Captured::default()).unwrap();
        target_logprob(&m.logits(&h, Mode::Differentiable).unwrap(), &positions, &targets)
    };
    let init = Rng::new(12).tensor(&[HIDDEN], 0.0, 0.3).to_dtype(dtype).unwrap();
    let var = Var::from_tensor(&init).unwrap();
    let loss = loss_of(var.as_tensor());
    let grads = loss.backward().unwrap();
    let g = grads.get(var.as_tensor()).expect("no gradient reached the delta").to_dtype(DType::F64).unwrap();
    let g: Vec<f64> = g.to_vec1().unwrap();
    let gmax = g.iter().fold(0f64, |a, x| a.max(x.abs()));
    assert!(gmax > 1e-3, "gradient is (nearly) zero: {gmax}");

    // Coordinates: the four largest plus a spread of others.
    let mut order: Vec<usize> = (0..HIDDEN).collect();
    order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    let mut coords: Vec<usize> = order[..4].to_vec();
    for c in [0usize, 7, 13, 22, 31] {
        if !coords.contains(&c) {
            coords.push(c);
        }
    }
    let base: Vec<f64> = init.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    for &i in &coords {
        let at = |s: f64| -> f64 {
            let mut v = base.clone();
            v[i] += s;
            let t = Tensor::new(v, m.device()).unwrap().to_dtype(dtype).unwrap();
            loss_of(&t).to_scalar::<f64>().unwrap()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        let err = (g[i] - fd).abs() / fd.abs().max(0.1 * gmax);
        assert!(err < tol, "{dtype:?} coord {i}: autograd {} vs finite differences {fd} (rel {err})", g[i]);
    }
}

#[test]
fn delta_gradient_matches_finite_differences_f64() {
    grad_check(DType::F64, 1e-2, 1e-2);
}

#[test]
fn delta_gradient_matches_finite_differences_f32() {
    grad_check(DType::F32, 1e-2, 1e-2);
}

#[test]
fn differentiable_mode_gives_a_gradient_from_the_first_layer() {
    let (_t, lm) = tiny(TinyOpts::default());
    let m = &lm.model;
    let batch = Batch::new(vec![sample_ids(5, 2)], Padding::Right, 0).unwrap();
    let mask = batch.position_mask(&[(0, 1)], DType::F32, m.device()).unwrap();
    let var = Var::zeros(HIDDEN, DType::F32, m.device()).unwrap();
    let taps = Taps {
        add_delta: Some(DeltaHook { layer: 0, mask: &mask, delta: var.as_tensor() }),
        ..Default::default()
    };
    let (l, _) = forward_with(m, &batch, Mode::Differentiable, &taps);
    let loss = target_logprob(&l, &[2, 4], &[3, 9]);
    let grads = loss.backward().unwrap();
    let g = grads.get(var.as_tensor()).expect("gradient");
    let n: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert!(n > 0.0);
}
