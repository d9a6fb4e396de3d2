//! Editing on the tiny model: the suffix-only forward used by the v* optimisation, the
//! orthogonality of O-Edit's updates (library and checkpoint), input formats, stdin streaming,
//! bad input (stop / skip), run-directory guards, and export of the edited model.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use candle_core::{DType, Tensor};
use oedit::data::parse_record;
use oedit::edit::subspace::Subspace;
use oedit::edit::templates::context_templates;
use oedit::edit::{prompts, target, Editor, Method};
use oedit::model::{Batch, Captured, LayerCtx, Llama, Mode, Padding, Taps};
use oedit::stats::{compute, Corpus};
use tempfile::TempDir;

use crate::common::EditFx as Fx;
use crate::common::*;

// ---------------------------------------------------------------------------------------------
// Suffix-only forward
// ---------------------------------------------------------------------------------------------

/// Runs every layer of `batch` once, returning the residual stream after layer `k`, the full
/// logits `[b, t, V]` and every layer's cached keys/values.
fn full_pass(model: &Llama, batch: &Batch, k: usize) -> (Tensor, Tensor, Vec<(Tensor, Tensor)>) {
    let ctx = LayerCtx::new(model, batch, Mode::Inference).unwrap();
    let taps = Taps { capture_kv: true, ..Default::default() };
    let mut cap = Captured::default();
    let h_k = model.run_layers(model.embed(batch).unwrap(), 0..k + 1, &ctx, &taps, &mut cap).unwrap();
    let h = model.run_layers(h_k.clone(), k + 1..model.num_layers(), &ctx, &taps, &mut cap).unwrap();
    assert_eq!(cap.kv.len(), model.num_layers());
    (h_k, model.logits(&h, Mode::Inference).unwrap(), cap.kv)
}

/// Max |suffix logits − full logits| over the real suffix positions of every row.
fn suffix_error(model: &Llama, batch: &Batch, k: usize, starts: &[usize], mode: Mode) -> f64 {
    let (h_k, full, kv) = full_pass(model, batch, k);
    let d = model.config().hidden_size;
    let b = batch.batch_size();
    let s = LayerCtx::suffix(model, batch, starts, mode).unwrap();
    let hs =
        h_k.reshape(((), d)).unwrap().index_select(&s.gather, 0).unwrap().reshape((b, s.len, d)).unwrap();
    let taps = Taps { kv_cache: Some(&kv), ..Default::default() };
    let h = model.run_layers(hs, k + 1..model.num_layers(), &s.ctx, &taps, &mut Captured::default()).unwrap();
    let got = model.logits(&h, mode).unwrap();
    let mut worst = 0.0f64;
    let mut compared = 0;
    for (r, &start) in starts.iter().enumerate() {
        for i in 0..s.len {
            let j = start + i;
            if j >= batch.len_of(r) {
                break;
            }
            let a = got.get(r).unwrap().get(i).unwrap();
            let e = full.get(r).unwrap().get(batch.index_of(r, j)).unwrap();
            worst = worst.max(max_abs_diff(&a, &e));
            compared += 1;
        }
    }
    let expected: usize = starts.iter().enumerate().map(|(r, &st)| batch.len_of(r) - st).sum();
    assert_eq!(compared, expected, "not every suffix position was compared");
    worst
}

#[test]
fn suffix_run_matches_full_forward() {
    let tmp = TempDir::new().unwrap();
    let lm = load(&tiny_model(&tmp.path().join("m"), TinyOpts::default()));
    let model = &lm.model;
    let rec = parse_record(&minimal_lines(3)[2]).unwrap();
    let templates: Vec<String> =
        ["{}", "The hat. {}", "In the tin at the cat, a man. {}"].iter().map(|s| s.to_string()).collect();
    let p = prompts::build(&lm.tok, &rec, &templates).unwrap();
    let edit_batch = p.batch.clone();
    assert!(edit_batch.seqs().iter().map(Vec::len).min() < edit_batch.seqs().iter().map(Vec::len).max());
    let other = Batch::new(
        vec![sample_ids(5, 1), sample_ids(12, 2), sample_ids(1, 3), sample_ids(8, 4)],
        Padding::Right,
        0,
    )
    .unwrap();
    for batch in [&edit_batch, &other] {
        let lens: Vec<usize> = (0..batch.batch_size()).map(|r| batch.len_of(r)).collect();
        let b = lens.len();
        let mut start_sets: Vec<Vec<usize>> = vec![
            vec![0; b],
            lens.iter().map(|l| l - 1).collect(),
            lens.iter().enumerate().map(|(r, l)| (r * 3 + 1).min(l - 1)).collect(),
            lens.iter().map(|l| l / 2).collect(),
        ];
        if std::ptr::eq(batch, &edit_batch) {
            start_sets.push(p.subject_last.clone());
        }
        for starts in &start_sets {
            for k in 0..model.num_layers() {
                for mode in [Mode::Differentiable, Mode::Inference] {
                    let err = suffix_error(model, batch, k, starts, mode);
                    assert!(err < 1e-4, "layer {k}, starts {starts:?}, {mode:?}: max diff {err}");
                }
            }
        }
    }
}

/// The v* loss at every step by the plainest route: every step runs all layers over the full
/// padded prompts with δ added at the subject's last token, full logits, no caches.
pub(crate) fn reference_losses(
    model: &Llama,
    p: &prompts::EditPrompts,
    hp: &oedit::hparams::Hparams,
) -> Vec<f64> {
    use candle_core::Var;
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};
    use oedit::infer::log_softmax;
    use oedit::model::DeltaHook;
    let batch = &p.batch;
    let (rows, seq) = (batch.batch_size(), batch.seq_len());
    let d = model.config().hidden_size;
    let ctx = LayerCtx::new(model, batch, Mode::Differentiable).unwrap();
    let full = |taps: &Taps| {
        let h = model.run_layers(
            model.embed(batch).unwrap(),
            0..model.num_layers(),
            &ctx,
            taps,
            &mut Captured::default(),
        );
        log_softmax(&model.logits(&h.unwrap(), Mode::Differentiable).unwrap())
            .unwrap()
            .reshape((rows * seq, ()))
            .unwrap()
    };
    let mut at = vec![0f32; rows * seq];
    for r in 0..rows {
        at[batch.flat_index(r, p.subject_last[r])] = 1.0;
    }
    let mask = Tensor::from_vec(at, (rows, seq, 1), model.device()).unwrap();
    let memit = hp.v_objective == oedit::hparams::VObjective::Memit;
    let kl_row = rows - 1;
    // oedit's KL sits at the essence prompt's last token, MEMIT's at its subject's last token.
    let kl_pos =
        batch.flat_index(kl_row, if memit { p.subject_last[kl_row] } else { batch.len_of(kl_row) - 1 });
    let lp0 = full(&Taps::default()).get(kl_pos).unwrap();
    let p0 = lp0.exp().unwrap();
    // The norm the decay and the clamp are relative to: the template-averaged MLP output at the
    // subject's last token (oedit), or the hidden state after the layer there in the bare
    // prompt, row 0 (MEMIT).
    let mut cap = Captured::default();
    let taps = Taps { capture_keys: Some(hp.layer), ..Default::default() };
    let h = model.run_layers(model.embed(batch).unwrap(), 0..hp.layer + 1, &ctx, &taps, &mut cap).unwrap();
    let outs = cap.mlp_out.unwrap().reshape((rows * seq, d)).unwrap();
    let mut v = vec![0f64; d];
    for r in 0..p.rewrite_rows {
        let row: Vec<f32> = outs.get(batch.flat_index(r, p.subject_last[r])).unwrap().to_vec1().unwrap();
        v.iter_mut().zip(row).for_each(|(a, b)| *a += b as f64 / p.rewrite_rows as f64);
    }
    if memit {
        let h = h.reshape((rows * seq, d)).unwrap();
        let row: Vec<f32> = h.get(batch.flat_index(0, p.subject_last[0])).unwrap().to_vec1().unwrap();
        v = row.into_iter().map(f64::from).collect();
    }
    let v_norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let delta = Var::zeros(d, DType::F32, model.device()).unwrap();
    let mut opt =
        AdamW::new(vec![delta.clone()], ParamsAdamW { lr: hp.v_lr, weight_decay: 0.0, ..Default::default() })
            .unwrap();
    let n_targets = (p.target_ids.len() * p.rewrite_rows) as f64;
    let mut losses = Vec::new();
    for _ in 0..hp.v_steps {
        let taps = Taps {
            add_delta: Some(DeltaHook { layer: hp.layer, mask: &mask, delta: delta.as_tensor() }),
            ..Default::default()
        };
        let lp = full(&taps);
        let mut nll = Tensor::zeros((), DType::F32, model.device()).unwrap();
        for r in 0..p.rewrite_rows {
            for (j, &t) in p.target_ids.iter().enumerate() {
                let pos = batch.flat_index(r, p.prompt_last[r] + j);
                nll = (nll - lp.get(pos).unwrap().get(t as usize).unwrap()).unwrap();
            }
        }
        let nll = (nll / n_targets).unwrap();
        let lp_kl = lp.get(kl_pos).unwrap();
        let kl = if memit {
            (lp_kl.exp().unwrap() * (&lp_kl - &lp0).unwrap()).unwrap().sum_all().unwrap()
        } else {
            (&p0 * (&lp0 - &lp_kl).unwrap()).unwrap().sum_all().unwrap()
        };
        let sq = delta.as_tensor().sqr().unwrap().sum_all().unwrap();
        let decay = if memit { (sq + 1e-24).unwrap().sqrt().unwrap() } else { sq };
        let wd = (decay * (hp.weight_decay / (v_norm * v_norm))).unwrap();
        let loss = ((&nll + (kl * hp.kl_weight).unwrap()).unwrap() + wd).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap() as f64);
        if (nll.to_scalar::<f32>().unwrap() as f64) < hp.stop_loss {
            break;
        }
        opt.step(&loss.backward().unwrap()).unwrap();
        let norm: f32 =
            delta.as_tensor().sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar().unwrap();
        let max_norm = hp.clamp_norm_factor * v_norm;
        if norm as f64 > max_norm {
            delta.set(&(delta.as_tensor() * (max_norm / norm as f64)).unwrap()).unwrap();
        }
    }
    losses
}

#[test]
fn optimised_v_star_loss_trajectory_matches_the_plain_full_forward() {
    let dir = TempDir::new().unwrap();
    let lm = load(&tiny_model(dir.path(), TinyOpts::default()));
    let templates: Vec<String> =
        ["{}", "The hat. {}", "In the tin at the cat, a man. {}"].iter().map(|s| s.to_string()).collect();
    let lines = minimal_lines(3);
    // The second round: MEMIT's and AlphaEdit's reference form, with their clamp factor and
    // decay weight (so the clamp binds and the decay weighs).
    for (round, (i, line)) in
        ["oedit", "memit"].iter().flat_map(|r| lines.iter().enumerate().map(move |x| (r, x)))
    {
        let mut hp = tiny_hparams_struct();
        // Without early stopping on one record, so every step is compared.
        if i == 0 {
            hp.stop_loss = 0.0;
        }
        if *round == "memit" {
            hp.v_objective = oedit::hparams::VObjective::Memit;
            hp.clamp_norm_factor = 0.75;
            hp.weight_decay = 0.5;
        }
        let rec = parse_record(line).unwrap();
        let p = prompts::build(&lm.tok, &rec, &templates).unwrap();
        let fast = target::compute_key_value(&lm.model, &p, &hp).unwrap().losses;
        let slow = reference_losses(&lm.model, &p, &hp);
        let i = format!("{i} ({round})");
        assert_eq!(fast.len(), slow.len(), "record {i}: steps differ: {fast:?} vs {slow:?}");
        assert!(fast.len() >= 2 && (hp.stop_loss > 0.0 || fast.len() == hp.v_steps), "record {i}: {fast:?}");
        assert!(fast.last() < fast.first(), "record {i}: the loss did not fall: {fast:?}");
        for (s, (a, b)) in fast.iter().zip(&slow).enumerate() {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "record {i}, step {s}: {a} vs {b}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Orthogonality (library)
// ---------------------------------------------------------------------------------------------

struct LibraryRun {
    /// k* of each edit (computed on the model as it was before that edit).
    keys: Vec<Vec<f64>>,
    /// v* of each edit.
    values: Vec<Vec<f64>>,
    /// u of each applied update.
    us: Vec<Vec<f64>>,
    /// The edited layer's weight after all edits, rows `[d][f]`.
    w_final: Vec<Vec<f64>>,
    subspace: Subspace,
    basis_sizes: Vec<usize>,
}

fn library_run(model_dir: &Path, method: Method, n: usize) -> LibraryRun {
    let mut lm = load(model_dir);
    let hp = tiny_hparams_struct();
    let corpus = Corpus::from_path(&corpus_file()).unwrap();
    let stats = compute(&lm.model, &lm.tok, hp.layer, hp.cov_tokens, &corpus).unwrap();
    let templates = context_templates(&lm.model, &lm.tok, hp.context_templates, hp.template_length).unwrap();
    assert_eq!(templates.len(), 3);
    let f = lm.config().intermediate_size;
    let mut editor = Editor::new(method, hp.clone(), templates.clone(), &[stats]).unwrap();
    let mut out = LibraryRun {
        keys: vec![],
        values: vec![],
        us: vec![],
        w_final: vec![],
        subspace: Subspace::new(f),
        basis_sizes: vec![],
    };
    for line in minimal_lines(n) {
        let rec = parse_record(&line).unwrap();
        let p = prompts::build(&lm.tok, &rec, &templates).unwrap();
        let kv = target::compute_key_value(&lm.model, &p, &hp).unwrap();
        let (outcome, applied) = editor.edit(&mut lm.model, &lm.tok, &rec).unwrap();
        assert_eq!(applied.len(), 1);
        let applied = &applied[0];
        assert_eq!(applied.layer, hp.layer);
        out.keys.push(kv.k_star);
        out.values.push(kv.v_star);
        out.us.push(applied.u.iter().map(|&x| x as f64).collect());
        out.basis_sizes.push(outcome.basis_size);
    }
    out.w_final = rows_f64(&lm.model.down_proj(hp.layer).to_dtype(DType::F64).unwrap());
    if let Some(s) = editor.subspace(hp.layer) {
        out.subspace = s.clone();
    }
    out
}

/// max over edits t and earlier edits s of |u_t · k*_s| / (|u_t| |k*_s|).
fn worst_overlap(us: &[Vec<f64>], dirs: &[Vec<f64>]) -> f64 {
    let mut worst = 0.0f64;
    for (t, u) in us.iter().enumerate() {
        for b in &dirs[..t.min(dirs.len())] {
            worst = worst.max(dot64(u, b).abs() / (norm64(u) * norm64(b)));
        }
    }
    worst
}

/// max over edits s of ‖W_final k*_s − v*_s‖ / ‖v*_s‖: whether every edit still holds at the end.
fn worst_retention(run: &LibraryRun) -> f64 {
    run.keys
        .iter()
        .zip(&run.values)
        .map(|(k, v)| {
            let wk: Vec<f64> = run.w_final.iter().map(|row| dot64(row, k)).collect();
            let diff: Vec<f64> = wk.iter().zip(v).map(|(a, b)| a - b).collect();
            norm64(&diff) / norm64(v)
        })
        .fold(0.0, f64::max)
}

#[test]
fn oedit_updates_are_orthogonal_to_earlier_edits_and_rome_are_not() {
    let tmp = TempDir::new().unwrap();
    let dir = tiny_model(&tmp.path().join("m"), TinyOpts::default());
    let n = 6;
    let o = library_run(&dir, Method::named("oedit").unwrap(), n);
    // One direction per edit, orthonormal.
    assert_eq!(o.basis_sizes, (1..=n).collect::<Vec<_>>());
    assert_eq!(o.subspace.len(), n);
    let err = o.subspace.basis.orthonormality_error();
    assert!(err < 1e-4, "basis not orthonormal: max |BBᵀ − I| = {err}");
    let basis = o.subspace.basis.rows().to_vec();
    // ΔW_t b = 0 for every direction stored before edit t (and so for every earlier key).
    let ob = worst_overlap(&o.us, &basis);
    let ok = worst_overlap(&o.us, &o.keys);
    assert!(
        ob < 1e-4 && ok < 1e-4,
        "O-Edit update touches earlier directions: {ob:e} (basis), {ok:e} (keys)"
    );
    for (t, (u, k)) in o.us.iter().zip(&o.keys).enumerate() {
        // ΔW_t k*_t = r_t, i.e. u_t · k*_t = 1.
        let uk = dot64(u, k);
        assert!((uk - 1.0).abs() < 1e-4, "edit {t}: u·k* = {uk}");
        // The direction appended at t is k*_t orthogonalised against the earlier basis.
        let cos = dot64(&basis[t], k) / norm64(k);
        assert!(cos > 0.01, "edit {t}: stored direction has cos {cos} with k*");
        let residual = o.subspace.basis.project_out(k);
        assert!(norm64(&residual) < 1e-9 * norm64(k), "k*_{t} is not inside the stored subspace");
    }
    // So every edit still maps its key to its value after all later edits.
    let keep = worst_retention(&o);
    assert!(keep < 1e-4, "O-Edit: an earlier edit was overwritten (relative error {keep:e})");

    // Plain ROME: no basis, updates overlap earlier keys, earlier edits drift.
    let r = library_run(&dir, Method::named("rome").unwrap(), n);
    assert!(r.subspace.is_empty());
    assert!(r.basis_sizes.iter().all(|&b| b == 0));
    // Identical first edit (empty subspace), different afterwards.
    assert_eq!(r.us[0], o.us[0]);
    let rk = worst_overlap(&r.us, &r.keys);
    assert!(
        rk > 1e-2,
        "ROME updates unexpectedly orthogonal to earlier keys ({rk:e}); the test could not fail"
    );
    let drift = worst_retention(&r);
    assert!(drift > 1e-3, "ROME kept every earlier edit exactly ({drift:e}); the test could not fail");
}

// ---------------------------------------------------------------------------------------------
// CLI fixtures
// ---------------------------------------------------------------------------------------------

fn log_indexes(run_dir: &Path) -> Vec<u64> {
    read_jsonl(&run_dir.join("log.jsonl")).iter().map(|v| v["index"].as_u64().unwrap()).collect()
}

// ---------------------------------------------------------------------------------------------
// Orthogonality (checkpoint files)
// ---------------------------------------------------------------------------------------------

#[test]
fn checkpoint_holds_an_orthonormal_basis_and_orthogonal_updates() {
    let fx = Fx::new();
    let edits = fx.edits("e.jsonl", &minimal_lines(6));
    let od = fx.path("oedit-run");
    // Euclidean O-Edit stores key directions themselves, so u · b = 0 is checked directly.
    let s = fx.edit_ok(&edits, &od, &["--method", "oedit"]);
    assert_eq!(s["edits_total"], 6);
    let basis = run_basis(&od, 1).unwrap().0;
    assert_eq!(basis.len(), 6);
    assert_eq!(basis[0].len(), INTERMEDIATE);
    let mut bbt = 0.0f64;
    for (i, a) in basis.iter().enumerate() {
        for (j, b) in basis.iter().enumerate() {
            bbt = bbt.max((dot64(a, b) - (i == j) as u8 as f64).abs());
        }
    }
    assert!(bbt < 1e-4, "stored basis not orthonormal: {bbt}");
    let chunk = run_updates(&od);
    let us = rows_f64(&chunk["u"]);
    let rs = rows_f64(&chunk["r"]);
    assert_eq!((us.len(), rs.len()), (6, 6));
    assert_eq!(chunk["layer"].to_vec1::<u32>().unwrap(), vec![1; 6]);
    let log = read_jsonl(&od.join("log.jsonl"));
    for (t, e) in log.iter().enumerate() {
        assert_eq!(e["basis_size"], t + 1, "{e}");
        assert_eq!(e["subspace_added"], 1, "{e}");
        // update_norm is ‖r uᵀ‖ = ‖r‖‖u‖.
        let want = norm64(&rs[t]) * norm64(&us[t]);
        let got = e["update_norm"].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-4 * want, "edit {t}: update_norm {got} vs {want}");
    }
    let worst = worst_overlap(&us, &basis);
    assert!(worst < 1e-4, "a stored update touches an earlier stored direction: {worst:e}");
    // u_t · b_t = 1/‖P k*_t‖ > 0: the update acts along its own stored direction.
    for (t, u) in us.iter().enumerate() {
        assert!(dot64(u, &basis[t]) > 0.0, "edit {t}");
    }

    // ROME stores no basis and its second update is not orthogonal to the first edit's key
    // (its first edit is the same as O-Edit's, so O-Edit's first stored direction is that key).
    let rd = fx.path("rome-run");
    fx.edit_ok(&edits, &rd, &["--method", "rome"]);
    assert!(run_basis(&rd, 1).is_none(), "ROME stored a basis");
    let r_us = rows_f64(&run_updates(&rd)["u"]);
    assert_eq!(r_us[0], us[0]);
    let rome_worst = worst_overlap(&r_us[..2], &basis);
    assert!(rome_worst > 1e-3, "ROME's update is orthogonal to the earlier key ({rome_worst:e})");
    assert!(read_jsonl(&rd.join("log.jsonl")).iter().all(|e| e["basis_size"] == 0));
}

// ---------------------------------------------------------------------------------------------
// Input formats, stdin, bad input
// ---------------------------------------------------------------------------------------------

const LOG_FIELDS: &[&str] = &[
    "index",
    "line",
    "case_id",
    "seconds",
    "phases",
    "steps",
    "loss_first",
    "loss_last",
    "basis_size",
    "update_norm",
    "p_target_before",
    "p_target_after",
];

#[test]
fn every_input_format_is_accepted() {
    let fx = Fx::new();
    let cases = [
        ("flat", sample_lines("counterfact-sample.jsonl", 2), Some(0)),
        ("rome", sample_lines("counterfact-rome-sample.jsonl", 2), Some(0)),
        ("zsre", sample_lines("zsre-sample.jsonl", 2), None),
        ("minimal", minimal_lines(2), None),
    ];
    for (name, lines, case_id) in cases {
        let edits = fx.edits(&format!("{name}.jsonl"), &lines);
        let dir = fx.path(&format!("run-{name}"));
        let o = fx.edit(&edits, &dir, &["--limit", "1"]);
        assert_ok(&o);
        let s = edit_summary(&o);
        assert_eq!(
            (s["edits_total"].as_u64(), s["edits_this_session"].as_u64()),
            (Some(1), Some(1)),
            "{name}"
        );
        let log = read_jsonl(&dir.join("log.jsonl"));
        assert_eq!(log.len(), 1, "{name}");
        let e = &log[0];
        for f in LOG_FIELDS {
            assert!(e.get(*f).is_some_and(|v| !v.is_null()) || *f == "case_id", "{name}: no `{f}` in {e}");
        }
        for p in ["key", "value", "update", "checkpoint"] {
            let v = e["phases"][p].as_f64().unwrap_or(-1.0);
            assert!(v >= 0.0 && v.is_finite(), "{name}: phases.{p} = {}", e["phases"][p]);
        }
        assert_eq!((e["index"].as_u64(), e["line"].as_u64()), (Some(0), Some(1)), "{name}");
        let zsre_id = serde_json::from_str::<serde_json::Value>(&lines[0]).unwrap()["case_id"].as_u64();
        assert_eq!(e["case_id"].as_u64(), case_id.or(zsre_id), "{name}");
        assert!(e["seconds"].as_f64().unwrap() > 0.0);
        let steps = e["steps"].as_u64().unwrap();
        assert!(steps <= 10, "{name}: {steps} steps with v_steps 10");
        for f in ["p_target_before", "p_target_after"] {
            let p = e[f].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&p), "{name}: {f} = {p}");
        }
        assert!(e["p_target_after"].as_f64() > e["p_target_before"].as_f64(), "{name}: {e}");
        assert!(e["loss_last"].as_f64() < e["loss_first"].as_f64(), "{name}: {e}");
        assert_eq!(e["basis_size"], 1);
        assert!(e["update_norm"].as_f64().unwrap() > 0.0);
        // The edit's line on standard output is its log line.
        let first: serde_json::Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
        assert_eq!(&first, e, "{name}");
    }
}

#[test]
fn stdin_stream_gives_the_same_run_as_the_file() {
    let fx = Fx::new();
    let lines = minimal_lines(3);
    let edits = fx.edits("e.jsonl", &lines);
    let from_file = fx.path("run-file");
    fx.edit_ok(&edits, &from_file, &[]);

    let from_stdin = fx.path("run-stdin");
    let mut c = edit_cmd(&fx.model, &fx.hparams, Path::new("-"), &from_stdin, &fx.cache);
    let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for l in &lines {
            writeln!(stdin, "{l}").unwrap();
        }
    }
    let o = child.wait_with_output().unwrap();
    assert_ok(&o);
    assert_eq!(edit_summary(&o)["edits_total"], 3);
    assert_eq!(log_indexes(&from_stdin), vec![0, 1, 2]);
    let a = update_files(&from_file);
    let b = update_files(&from_stdin);
    assert!(a == b, "updates differ between file and stdin input");
    let (ma, mb) = (export_run(&from_file, &fx.path("m-file")), export_run(&from_stdin, &fx.path("m-stdin")));
    let (wa, wb) = (
        std::fs::read(ma.join("model.safetensors")).unwrap(),
        std::fs::read(mb.join("model.safetensors")).unwrap(),
    );
    assert!(wa == wb, "exported weights differ between file and stdin input");
}

#[test]
fn methods_with_a_memory_of_past_keys_resume_to_the_same_bytes() {
    // AlphaEdit and soft O-Edit keep no subspace: their state is rebuilt from the stored keys
    // on resume, and must give the updates an uninterrupted run gives.
    let fx = Fx::new();
    let edits = fx.edits("e.jsonl", &minimal_lines(4));
    let mut hp = tiny_hparams();
    hp["alphaedit"] = serde_json::json!({ "nullspace_threshold": 0.01, "min_nullspace_dim": 16, "l2": 1.0 });
    hp["oedit_soft"] = serde_json::json!({ "lambda": 2.0 });
    let hparams = write_json(&fx.path("hparams-memory.json"), &hp);
    let edit = |dir: &Path, extra: &[&str]| {
        let mut c = edit_cmd(&fx.model, &hparams, &edits, dir, &fx.cache);
        c.args(extra);
        let o = run(c);
        assert_ok(&o);
        edit_summary(&o)
    };
    for method in ["alphaedit", "alphaedit-single", "oedit-spread", "oedit-soft"] {
        let whole = fx.path(&format!("{method}-whole"));
        edit(&whole, &["--method", method]);
        let split = fx.path(&format!("{method}-split"));
        edit(&split, &["--method", method, "--limit", "2"]);
        let s = edit(&split, &["--method", method]);
        assert_eq!((s["resumed_from"].as_u64(), s["edits_total"].as_u64()), (Some(2), Some(4)), "{method}");
        let (a, b) = (update_files(&whole), update_files(&split));
        assert!(a == b, "{method}: resumed updates differ from the uninterrupted run");
    }
}

/// (name, bad line, expected field in the message or None, text expected in the message).
fn bad_lines() -> Vec<(&'static str, String, Option<&'static str>, &'static str)> {
    let j = |v: serde_json::Value| v.to_string();
    vec![
        ("not-json", "{\"prompt\": \"Cats like\", ".to_string(), None, "invalid JSON"),
        (
            "missing-field",
            j(serde_json::json!({"prompt": "Bob plays the", "target": "harp"})),
            Some("subject"),
            "missing",
        ),
        (
            "subject-not-in-prompt",
            j(serde_json::json!({"prompt": "Bob plays the", "subject": "Alice", "target": "harp"})),
            Some("subject"),
            "does not occur",
        ),
        (
            "empty-target",
            j(serde_json::json!({"prompt": "Bob plays the", "subject": "Bob", "target": " "})),
            Some("target"),
            "empty target",
        ),
        (
            "unknown-format",
            j(serde_json::json!({"question": "Bob plays the", "subject": "Bob", "answer": "harp"})),
            None,
            "unknown record format",
        ),
    ]
}

#[test]
fn bad_input_stops_after_checkpointing_and_resumes_when_fixed() {
    let fx = Fx::new();
    let good = minimal_lines(4);
    for (name, bad, field, reason) in bad_lines() {
        let lines = vec![good[0].clone(), good[1].clone(), bad, good[3].clone()];
        let edits = fx.edits(&format!("{name}.jsonl"), &lines);
        let dir = fx.path(&format!("run-{name}"));
        // A bad line is found before the model loads (nothing edited, see runlog.rs); the good
        // lines before it are edited first here, with a limit that never reads the bad line.
        fx.edit_ok(&edits, &dir, &["--limit", "2"]);
        let o = fx.edit(&edits, &dir, &[]);
        let line = assert_clean_failure(&o);
        assert_eq!(o.status.code(), Some(2), "{name}: {line}");
        assert!(line.contains(&format!("{}:3", edits.display())), "{name}: no file:line in {line}");
        if let Some(f) = field {
            assert!(line.contains(&format!("`{f}`")), "{name}: field {f} not named in {line}");
        }
        assert!(line.contains(reason), "{name}: {line}");
        assert!(line.contains("2 edits are checkpointed"), "{name}: {line}");
        assert_eq!(log_indexes(&dir), vec![0, 1], "{name}");
        assert!(!dir.join("rejected.jsonl").exists());
        // Stopping again (same file) does not redo or lose anything.
        let o = fx.edit(&edits, &dir, &[]);
        assert_eq!(o.status.code(), Some(2));
        assert_eq!(log_indexes(&dir), vec![0, 1], "{name}");
        // Fixed file: resumes at line 3 rather than restarting.
        let fixed = fx.edits(&format!("{name}.jsonl"), &good);
        let s = fx.edit_ok(&fixed, &dir, &[]);
        assert_eq!(
            (s["resumed_from"].as_u64(), s["edits_this_session"].as_u64()),
            (Some(2), Some(2)),
            "{name}"
        );
        let log = read_jsonl(&dir.join("log.jsonl"));
        let idx: Vec<_> =
            log.iter().map(|e| (e["index"].as_u64().unwrap(), e["line"].as_u64().unwrap())).collect();
        assert_eq!(idx, vec![(0, 1), (1, 2), (2, 3), (3, 4)], "{name}");
    }
}

#[test]
fn bad_input_is_skipped_and_recorded_with_on_invalid_skip() {
    let fx = Fx::new();
    let good = minimal_lines(3);
    let bad = bad_lines();
    // good, 5 bad lines, good, good.
    let mut lines = vec![good[0].clone()];
    lines.extend(bad.iter().map(|b| b.1.clone()));
    lines.extend([good[1].clone(), good[2].clone()]);
    let edits = fx.edits("mixed.jsonl", &lines);
    let dir = fx.path("run");
    let s = fx.edit_ok(&edits, &dir, &["--on-invalid", "skip"]);
    assert_eq!((s["edits_total"].as_u64(), s["rejected"].as_u64()), (Some(3), Some(5)));
    let log = read_jsonl(&dir.join("log.jsonl"));
    let edited: Vec<u64> = log.iter().map(|e| e["line"].as_u64().unwrap()).collect();
    assert_eq!(edited, vec![1, 7, 8]);
    let rej = read_jsonl(&dir.join("rejected.jsonl"));
    assert_eq!(rej.len(), 5);
    for (i, (r, (name, _, field, reason))) in rej.iter().zip(bad).enumerate() {
        assert_eq!(r["line"].as_u64(), Some(i as u64 + 2), "{name}: {r}");
        assert_eq!(r["field"].as_str(), field, "{name}: {r}");
        assert!(r["reason"].as_str().unwrap().contains(reason), "{name}: {r}");
    }
    // A rerun has nothing left to do and does not duplicate rejections.
    let s = fx.edit_ok(&edits, &dir, &["--on-invalid", "skip"]);
    assert_eq!((s["edits_this_session"].as_u64(), s["rejected"].as_u64()), (Some(0), Some(0)));
    assert_eq!(read_jsonl(&dir.join("rejected.jsonl")).len(), 5);
    assert_eq!(log_indexes(&dir), vec![0, 1, 2]);
}

// ---------------------------------------------------------------------------------------------
// Run-directory guards
// ---------------------------------------------------------------------------------------------

#[test]
fn run_directory_refuses_another_model_or_changed_hparams() {
    let fx = Fx::new();
    let edits = fx.edits("e.jsonl", &minimal_lines(3));
    let dir = fx.path("run");
    fx.edit_ok(&edits, &dir, &["--limit", "1"]);
    let manifest = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let check_refused = |o: &std::process::Output, needles: &[&str]| {
        let line = assert_clean_failure(o);
        assert_eq!(o.status.code(), Some(2), "{line}");
        assert!(line.contains(dir.to_str().unwrap()) && line.contains("cannot be continued"), "{line}");
        for n in needles {
            assert!(line.contains(n), "`{n}` not in {line}");
        }
        // Nothing was changed.
        assert_eq!(log_indexes(&dir), vec![0]);
        assert_eq!(std::fs::read_to_string(dir.join("manifest.json")).unwrap(), manifest);
    };

    let other = tiny_model(&fx.path("other-model"), TinyOpts { seed: 8, ..Default::default() });
    let mut c = edit_cmd(&other, &fx.hparams, &edits, &dir, &fx.cache);
    c.args(["--limit", "2"]);
    check_refused(&run(c), &["fingerprint", other.to_str().unwrap(), fx.model.to_str().unwrap()]);

    let mut hp = tiny_hparams();
    hp["v_lr"] = serde_json::json!(0.25);
    let changed = write_json(&fx.path("hparams-2.json"), &hp);
    let mut c = edit_cmd(&fx.model, &changed, &edits, &dir, &fx.cache);
    c.args(["--limit", "2"]);
    check_refused(&run(c), &["hyper-parameters", "v_lr"]);

    let o = fx.edit(&edits, &dir, &["--limit", "2", "--method", "rome"]);
    check_refused(&o, &["rome"]);

    let o = fx.edit(&edits, &dir, &["--limit", "2", "--layer", "2"]);
    check_refused(&o, &["layer"]);

    let mut hp = tiny_hparams();
    hp["subspace"]["tolerance"] = serde_json::json!(0.2);
    let changed = write_json(&fx.path("hparams-3.json"), &hp);
    let mut c = edit_cmd(&fx.model, &changed, &edits, &dir, &fx.cache);
    c.args(["--limit", "2"]);
    check_refused(&run(c), &["hyper-parameters", "subspace"]);

    // The original invocation still continues.
    let s = fx.edit_ok(&edits, &dir, &["--limit", "2"]);
    assert_eq!(s["resumed_from"], 1);
    assert_eq!(log_indexes(&dir), vec![0, 1]);

    // Sections of methods the run does not use may change (oedit reads no AlphaEdit setting).
    let mut hp = tiny_hparams();
    hp["alphaedit"] = serde_json::json!({ "nullspace_threshold": 0.5, "min_nullspace_dim": 3, "l2": 1.0 });
    let other_method = write_json(&fx.path("hparams-4.json"), &hp);
    let mut c = edit_cmd(&fx.model, &other_method, &edits, &dir, &fx.cache);
    c.args(["--limit", "3"]);
    let o = run(c);
    assert_ok(&o);
    assert_eq!(edit_summary(&o)["resumed_from"], 2);
}

// ---------------------------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------------------------

#[test]
fn export_of_a_run_changes_only_the_edited_down_projection() {
    let fx = Fx::new();
    let edits = fx.edits("e.jsonl", &minimal_lines(3));
    let dir = fx.path("run");
    fx.edit_ok(&edits, &dir, &[]);
    let out = export_run(&dir, &fx.path("exported"));
    let base = load(&fx.model);
    let edited = load(&out);
    let bw: std::collections::HashMap<String, Tensor> = base.model.named_weights().into_iter().collect();
    let ew: std::collections::HashMap<String, Tensor> = edited.model.named_weights().into_iter().collect();
    assert_eq!(bw.len(), ew.len());
    let edited_name = "model.layers.1.mlp.down_proj.weight";
    for (name, b) in &bw {
        let e = &ew[name];
        let d = max_abs_diff(b, e);
        if name == edited_name {
            assert!(d > 1e-4, "{name} unchanged by 3 edits");
        } else {
            let (x, y): (Vec<f32>, Vec<f32>) =
                (b.flatten_all().unwrap().to_vec1().unwrap(), e.flatten_all().unwrap().to_vec1().unwrap());
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{name} changed (max diff {d})"
            );
        }
    }
    // The change is the sum of the stored rank-one updates.
    let chunk = run_updates(&dir);
    let dw = chunk["r"].t().unwrap().matmul(&chunk["u"]).unwrap();
    let want = (bw[edited_name].clone() + dw).unwrap();
    let d = max_abs_diff(&want, &ew[edited_name]);
    assert!(d < 1e-5, "edited weight is not W0 + Σ r uᵀ (max diff {d})");
    // The exported model is the base model with the run's updates replayed, and the last edit's
    // logged target probability is the exported model's.
    let mut replayed = load(&fx.model);
    let state = oedit::run::RunDir::open(&dir).unwrap().read_state(INTERMEDIATE).unwrap();
    oedit::run::replay(&mut replayed.model, &state.updates).unwrap();
    let ids = edited.tok.encode_prompt("The tin man loves the cat at the hat").unwrap();
    assert_eq!(max_abs_diff(&logits(&replayed.model, &ids), &logits(&edited.model, &ids)), 0.0);
    let log = read_jsonl(&dir.join("log.jsonl"));
    let (p, _, t) = MINIMAL_EDITS[2];
    let nll = oedit::scoring::score_answers(&edited.model, &edited.tok, &[(p, t)]).unwrap()[0].sum_nll;
    let logged = log[2]["p_target_after"].as_f64().unwrap();
    assert!(((-nll).exp() - logged).abs() <= 1e-4 * logged, "p = {} vs logged {logged}", (-nll).exp());
    let nll0 =
        oedit::scoring::score_answers(&base.model, &base.tok, &[(MINIMAL_EDITS[0].0, MINIMAL_EDITS[0].2)])
            .unwrap()[0]
            .sum_nll;
    let logged0 = log[0]["p_target_before"].as_f64().unwrap();
    assert!(((-nll0).exp() - logged0).abs() <= 1e-4 * logged0, "p = {} vs logged {logged0}", (-nll0).exp());
    // And it generates.
    let mut c = oedit_cmd();
    c.args(["generate", "--model"]).arg(&out).args([
        "--prompt",
        "The cat sat on the",
        "--max-tokens",
        "5",
        "--json",
    ]);
    let o = run(c);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["prompt"], "The cat sat on the");
    assert!(v["completion"].is_string());
}

#[test]
fn the_default_method_is_alphaedit_and_a_later_method_flag_wins() {
    let fx = Fx::new();
    let edits = fx.edits("e.jsonl", &minimal_lines(1));
    let manifest_method = |dir: &Path| -> String {
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
        m["method"].as_str().unwrap().to_string()
    };
    // No --method at all.
    let plain = fx.path("plain");
    let mut c = oedit_cmd();
    c.env("OEDIT_CACHE", &fx.cache).args(["--threads", "1", "edit", "--model"]).arg(&fx.model);
    c.arg("--hparams").arg(&fx.hparams).arg("--edits").arg(&edits).arg("--run").arg(&plain);
    c.arg("--stats-corpus").arg(corpus_file()).arg("--json");
    assert_ok(&run(c));
    assert_eq!(manifest_method(&plain), "alphaedit");
    let log = read_jsonl(&plain.join("log.jsonl"));
    assert_eq!(log[0]["layers"], serde_json::json!([0, 1]));
    // The fixture's command names oedit-plus; the test's own --method comes later and wins.
    let twice = fx.path("twice");
    fx.edit_ok(&edits, &twice, &["--method", "rome"]);
    assert_eq!(manifest_method(&twice), "rome");
}
