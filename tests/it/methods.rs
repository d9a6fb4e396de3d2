//! Each editing method changes the weights the way its maths says (tiny model, library level).

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use oedit::data::parse_record;
use oedit::edit::templates::context_templates;
use oedit::edit::{Editor, Method};
use oedit::hparams::Hparams;
use oedit::linalg::{sym_eigen, Mat};
use oedit::loader::LoadedModel;
use oedit::stats::{compute_many, Corpus, KeyStats};

use crate::common::*;

fn setup(method: Method, tweak: impl Fn(&mut Hparams)) -> (LoadedModel, Editor, Vec<KeyStats>) {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path(), TinyOpts::default());
    let lm = load(&model_dir);
    let mut hp = tiny_hparams_struct();
    tweak(&mut hp);
    let corpus = Corpus::from_path(&corpus_file()).unwrap();
    let stats = compute_many(&lm.model, &lm.tok, &method.layers(&hp), hp.cov_tokens, &corpus).unwrap();
    let templates = context_templates(&lm.model, &lm.tok, hp.context_templates, hp.template_length).unwrap();
    let editor = Editor::new(method, hp, templates, &stats).unwrap();
    (lm, editor, stats)
}

fn weights(lm: &LoadedModel) -> HashMap<String, Vec<f32>> {
    lm.model
        .named_weights()
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn c_matrix(s: &KeyStats) -> Mat {
    Mat::from_vec(s.dim, s.dim, s.second_moment.clone())
}

/// C + 0.01·mean(diag C)·I: the regularised statistics of the tiny hyper-parameters.
fn c_reg_matrix(s: &KeyStats) -> Mat {
    let mut c = c_matrix(s);
    let mean_diag = (0..s.dim).map(|i| c.get(i, i)).sum::<f64>() / s.dim as f64;
    c.add_diagonal(0.01 * mean_diag);
    c
}

#[test]
fn memit_touches_only_its_layers_and_solves_its_normal_equation() {
    let (mut lm, mut editor, stats) = setup(Method::named("memit").unwrap(), |hp| {
        hp.memit.layers = vec![0, 1];
        hp.memit.mom2_weight = 2.0;
    });
    let before = weights(&lm);
    let rec = parse_record(&minimal_lines(1)[0]).unwrap();
    let (_, applied) = editor.edit(&mut lm.model, &lm.tok, &rec).unwrap();
    assert_eq!(applied.iter().map(|a| a.layer).collect::<Vec<_>>(), vec![0, 1]);
    let after = weights(&lm);
    for (name, w) in &before {
        let changed = w != &after[name];
        let edited =
            name == "model.layers.0.mlp.down_proj.weight" || name == "model.layers.1.mlp.down_proj.weight";
        assert_eq!(changed, edited, "{name}: changed = {changed}");
    }
    // u = (λC + k kᵀ)⁻¹ k for each layer: check (λC_reg + k kᵀ) u = k.
    for a in &applied {
        let c = c_reg_matrix(stats.iter().find(|s| s.layer == a.layer).unwrap());
        let (k, u) = (f64s(&a.key), f64s(&a.u));
        let cu = c.matvec(&u);
        let ku: f64 = k.iter().zip(&u).map(|(x, y)| x * y).sum();
        let lhs: Vec<f64> = cu.iter().zip(&k).map(|(cu, ki)| 2.0 * cu + ki * ku).collect();
        let err = lhs.iter().zip(&k).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        let scale = k.iter().map(|x| x.abs()).fold(0.0, f64::max);
        assert!(err < 1e-3 * scale, "layer {}: normal equation residual {err} (scale {scale})", a.layer);
    }
}

#[test]
fn alphaedit_update_annihilates_the_preserved_key_subspace() {
    let (mut lm, mut editor, stats) = setup(Method::named("alphaedit-single").unwrap(), |hp| {
        hp.alphaedit.min_nullspace_dim = 16;
        hp.alphaedit.l2 = 1.0;
    });
    let s = &stats[0];
    let eig = sym_eigen(&c_matrix(s));
    let n0 = eig.values.iter().filter(|&&v| v < 1e-2).count().max(16);
    assert!(n0 < s.dim, "test needs a non-trivial preserved subspace");
    let w0 = lm.model.down_proj(1).to_dtype(DType::F64).unwrap();
    for line in minimal_lines(3) {
        let rec = parse_record(&line).unwrap();
        let (_, applied) = editor.edit(&mut lm.model, &lm.tok, &rec).unwrap();
        let u = f64s(&applied[0].u);
        let un: f64 = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(un > 0.0);
        // Components along preserved directions (eigenvectors n0..f) vanish.
        let worst = (n0..s.dim)
            .map(|j| {
                let e = eig.vectors.col(j);
                e.iter().zip(&u).map(|(a, b)| a * b).sum::<f64>().abs() / un
            })
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "update leaks into the preserved subspace: {worst}");
    }
    // Hence ΔW k₀ = 0 for any preserved key k₀ (the top eigenvector of C).
    let top = eig.vectors.col(s.dim - 1);
    let k0 = Tensor::from_vec(top, (s.dim, 1), lm.model.device()).unwrap();
    let w1 = lm.model.down_proj(1).to_dtype(DType::F64).unwrap();
    let diff = (w1.matmul(&k0).unwrap() - w0.matmul(&k0).unwrap()).unwrap();
    let moved: f64 = diff.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    let scale: f64 = w0.matmul(&k0).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert!(moved < 1e-4 * scale.max(1e-3), "preserved key moved by {moved}");
}

#[test]
fn rome_lands_each_edit_exactly_at_its_key() {
    let (mut lm, mut editor, stats) = setup(Method::named("rome").unwrap(), |_| {});
    let c = c_reg_matrix(&stats[0]);
    for line in minimal_lines(3) {
        let rec = parse_record(&line).unwrap();
        let (_, applied) = editor.edit(&mut lm.model, &lm.tok, &rec).unwrap();
        let a = &applied[0];
        let (u, k) = (f64s(&a.u), f64s(&a.key));
        let uk: f64 = u.iter().zip(&k).map(|(x, y)| x * y).sum();
        assert!((uk - 1.0).abs() < 1e-4, "uᵀk = {uk}");
        // u is C⁻¹k scaled to uᵀk = 1: C_reg u = k / (kᵀC⁻¹k) = (uᵀC_reg u) k.
        let cu = c.matvec(&u);
        let scale: f64 = u.iter().zip(&cu).map(|(x, y)| x * y).sum();
        let err = cu.iter().zip(&k).map(|(a, b)| (a - scale * b).abs()).fold(0.0, f64::max);
        let kmax = k.iter().map(|x| x.abs()).fold(0.0, f64::max);
        assert!(err < 1e-4 * scale * kmax, "C u is not parallel to k: {err}");
        // A vector with uᵀk = 1 but not along C⁻¹k fails the same check (the check can fail).
        let mut v = u.clone();
        let j = (0..k.len()).max_by(|&a, &b| k[a].abs().total_cmp(&k[b].abs())).unwrap();
        let i = (j + 1) % k.len();
        v[i] += 0.1 * u.iter().map(|x| x.abs()).fold(0.0, f64::max);
        v[j] -= (v[i] - u[i]) * k[i] / k[j];
        let cv = c.matvec(&v);
        let sv: f64 = v.iter().zip(&cv).map(|(x, y)| x * y).sum();
        let errv = cv.iter().zip(&k).map(|(a, b)| (a - sv * b).abs()).fold(0.0, f64::max);
        assert!(errv > 1e-3 * sv * kmax, "perturbed direction passed: {errv}");
        assert!(editor.subspace(1).is_none_or(|s| s.is_empty()), "rome keeps no subspace");
    }
}

#[test]
fn alphaedit_solves_its_ridge_normal_equation_with_the_memory_of_earlier_keys() {
    let (threshold, min_dim, l2) = (1e-2, 16, 0.5);
    let (mut lm, mut editor, stats) = setup(Method::named("alphaedit-single").unwrap(), |hp| {
        hp.alphaedit.nullspace_threshold = threshold;
        hp.alphaedit.min_nullspace_dim = min_dim;
        hp.alphaedit.l2 = l2;
    });
    let s = &stats[0];
    let f = s.dim;
    let eig = sym_eigen(&c_matrix(s));
    let n0 = eig.values.iter().filter(|&&v| v < threshold).count().max(min_dim);
    let null: Vec<Vec<f64>> = (0..n0).map(|j| eig.vectors.col(j)).collect();
    let project = |x: &[f64]| -> Vec<f64> {
        let mut out = vec![0.0; f];
        for b in &null {
            let c: f64 = b.iter().zip(x).map(|(p, q)| p * q).sum();
            out.iter_mut().zip(b).for_each(|(o, bi)| *o += c * bi);
        }
        out
    };
    // (P₀ M P₀ + αI) u − P₀ k with M = k kᵀ + Σ past k_p k_pᵀ, relative to |P₀ k|.
    let residual = |past: &[Vec<f64>], k: &[f64], u: &[f64]| -> f64 {
        let pu = project(u);
        let mut m_pu = vec![0.0; f];
        for kp in past.iter().chain(std::iter::once(&k.to_vec())) {
            let c: f64 = kp.iter().zip(&pu).map(|(a, b)| a * b).sum();
            m_pu.iter_mut().zip(kp).for_each(|(o, x)| *o += c * x);
        }
        let lhs: Vec<f64> = project(&m_pu).iter().zip(u).map(|(a, b)| a + l2 * b).collect();
        let pk = project(k);
        let err = lhs.iter().zip(&pk).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        err / pk.iter().map(|x| x.abs()).fold(0.0, f64::max)
    };
    let mut past: Vec<Vec<f64>> = Vec::new();
    for line in minimal_lines(4) {
        let rec = parse_record(&line).unwrap();
        let (_, applied) = editor.edit(&mut lm.model, &lm.tok, &rec).unwrap();
        let (k, u) = (f64s(&applied[0].key), f64s(&applied[0].u));
        let err = residual(&past, &k, &u);
        assert!(err < 1e-5, "edit {}: normal equation residual {err}", past.len());
        // u lies in the null space.
        let out_of_null: Vec<f64> = u.iter().zip(project(&u)).map(|(a, b)| a - b).collect();
        let un = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(out_of_null.iter().map(|x| x * x).sum::<f64>().sqrt() < 1e-6 * un);
        if !past.is_empty() {
            let without = residual(&[], &k, &u);
            assert!(without > 1e-4, "edit {}: earlier keys made no difference ({without})", past.len());
        }
        past.push(k);
    }
}

#[test]
fn oedit_plus_spares_earlier_keys_and_seeded_core_directions() {
    let (mut lm, mut editor, stats) = setup(Method::named("oedit-plus").unwrap(), |hp| {
        hp.oedit_plus.core_energy = 0.5;
        hp.oedit_plus.max_core_fraction = 0.25;
    });
    let seeded = editor.subspace(1).unwrap().len();
    assert!(seeded > 0 && seeded <= 16, "seeded {seeded}");
    let eig = sym_eigen(&c_matrix(&stats[0]));
    let top = eig.vectors.col(stats[0].dim - 1);
    let mut earlier: Vec<Vec<f64>> = Vec::new();
    for line in minimal_lines(3) {
        let rec = parse_record(&line).unwrap();
        let (outcome, applied) = editor.edit(&mut lm.model, &lm.tok, &rec).unwrap();
        let u = f64s(&applied[0].u);
        let un: f64 = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        let along_top: f64 = top.iter().zip(&u).map(|(a, b)| a * b).sum::<f64>().abs() / un;
        assert!(along_top < 1e-5, "update has {along_top} along C's top direction");
        assert!(outcome.basis_size > seeded);
        // The projection lives in whitened space, but what it spares are the earlier edits'
        // keys themselves: ΔW k_j = r uᵀk_j = 0, while ΔW k* = r.
        let k = f64s(&applied[0].key);
        let kn: f64 = k.iter().map(|x| x * x).sum::<f64>().sqrt();
        let uk: f64 = u.iter().zip(&k).map(|(a, b)| a * b).sum();
        assert!((uk - 1.0).abs() < 1e-4, "uᵀk* = {uk}");
        for kj in &earlier {
            let c: f64 = u.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>();
            assert!(c.abs() < 1e-4 * un * kn, "uᵀk_j = {c}");
        }
        earlier.push(k);
    }
    // Seeds are never compressed away.
    let mut sub = editor.subspace(1).unwrap().clone();
    let n = sub.len();
    sub.compress(seeded);
    assert_eq!(sub.len(), seeded);
    assert!(sub.energy.iter().all(|e| e.is_infinite()), "a seeded direction was dropped (had {n})");
}

#[test]
fn re_editing_a_fact_releases_only_its_own_direction() {
    // The same record again: its key is already stored, so nothing of it survives the
    // projection; the conflict policy releases that one direction, whatever the floor, and the
    // edit stored before it stays exactly protected.
    for floor in [0.1, 1e-6] {
        let (mut lm, mut editor, _) =
            setup(Method::named("oedit-plus").unwrap(), |hp| hp.subspace.min_retained = floor);
        let lines = minimal_lines(2);
        let (first, other) = (parse_record(&lines[0]).unwrap(), parse_record(&lines[1]).unwrap());
        let (_, other_applied) = editor.edit(&mut lm.model, &lm.tok, &other).unwrap();
        editor.edit(&mut lm.model, &lm.tok, &first).unwrap();
        let (outcome, applied) = editor.edit(&mut lm.model, &lm.tok, &first).unwrap();
        let s = outcome.subspace;
        assert_eq!((s.released, s.compressed_away), (1, 0), "floor {floor}");
        assert!(outcome.retained >= 0.1, "floor {floor}: retained {}", outcome.retained);
        let u = f64s(&applied[0].u);
        let dot = |k: &[f32]| u.iter().zip(f64s(k)).map(|(a, b)| a * b).sum::<f64>();
        assert!((dot(&applied[0].key) - 1.0).abs() < 1e-4, "floor {floor}");
        let un = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        let kn = f64s(&other_applied[0].key).iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(
            dot(&other_applied[0].key).abs() < 1e-4 * un * kn,
            "floor {floor}: the other edit lost its protection"
        );
        assert_eq!(outcome.basis_size, 2, "floor {floor}");
    }
}

/// (λC_reg + Σ k_p k_pᵀ over `past` + k kᵀ) u − k, max-abs, relative to max |k|.
fn soft_normal_equation_error(c_reg: &Mat, lambda: f64, past: &[Vec<f64>], k: &[f64], u: &[f64]) -> f64 {
    let mut lhs: Vec<f64> = c_reg.matvec(u).iter().map(|x| lambda * x).collect();
    for kp in past.iter().chain(std::iter::once(&k.to_vec())) {
        let c: f64 = kp.iter().zip(u).map(|(a, b)| a * b).sum();
        lhs.iter_mut().zip(kp).for_each(|(l, x)| *l += c * x);
    }
    let err = lhs.iter().zip(k).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    err / k.iter().map(|x| x.abs()).fold(0.0, f64::max)
}

#[test]
fn oedit_soft_solves_its_normal_equation_with_the_memory_of_earlier_keys() {
    let lambda = 2.0;
    let (mut lm, mut editor, stats) =
        setup(Method::named("oedit-soft").unwrap(), |hp| hp.oedit_soft.lambda = lambda);
    let c = c_reg_matrix(&stats[0]);
    let mut past: Vec<Vec<f64>> = Vec::new();
    for line in minimal_lines(4) {
        let rec = parse_record(&line).unwrap();
        let (outcome, applied) = editor.edit(&mut lm.model, &lm.tok, &rec).unwrap();
        let (k, u) = (f64s(&applied[0].key), f64s(&applied[0].u));
        let err = soft_normal_equation_error(&c, lambda, &past, &k, &u);
        assert!(err < 1e-6, "edit {}: normal equation residual {err}", past.len());
        // Without the earlier keys the equation does not hold (the test can fail).
        if !past.is_empty() {
            let without = soft_normal_equation_error(&c, lambda, &[], &k, &u);
            assert!(without > 1e-5, "edit {}: earlier keys made no difference ({without})", past.len());
        }
        // It lands part of the edit: kᵀu = kᵀA⁻¹k / (1 + kᵀA⁻¹k), logged as `retained`.
        let uk: f64 = u.iter().zip(&k).map(|(a, b)| a * b).sum();
        assert!(uk > 0.0 && uk < 1.0, "landed share {uk}");
        assert!((outcome.retained - uk).abs() < 1e-4, "logged {} vs {uk}", outcome.retained);
        assert_eq!(outcome.basis_size, 0);
        past.push(k);
    }
}

#[test]
fn oedit_soft_with_a_vanishing_lambda_becomes_exact_orthogonal_editing() {
    // λ → 0: the edit lands whole (uᵀk* = 1) and earlier keys are left alone (uᵀk_p = 0), the
    // hard O-Edit limit; with a large λ the same edits land only partly and touch earlier keys.
    for (lambda, hard) in [(1e-4, true), (1e3, false)] {
        let (mut lm, mut editor, _) =
            setup(Method::named("oedit-soft").unwrap(), |hp| hp.oedit_soft.lambda = lambda);
        let mut earlier: Vec<Vec<f64>> = Vec::new();
        let (mut worst_land, mut worst_touch) = (0.0f64, 0.0f64);
        for line in minimal_lines(3) {
            let rec = parse_record(&line).unwrap();
            let (_, applied) = editor.edit(&mut lm.model, &lm.tok, &rec).unwrap();
            let (k, u) = (f64s(&applied[0].key), f64s(&applied[0].u));
            let uk: f64 = u.iter().zip(&k).map(|(a, b)| a * b).sum();
            worst_land = worst_land.max((1.0 - uk).abs());
            for kp in &earlier {
                let c: f64 = u.iter().zip(kp).map(|(a, b)| a * b).sum();
                worst_touch = worst_touch.max(c.abs());
            }
            earlier.push(k);
        }
        if hard {
            assert!(worst_land < 1e-3 && worst_touch < 1e-3, "λ={lambda}: {worst_land} {worst_touch}");
        } else {
            assert!(worst_land > 1e-2 && worst_touch > 1e-4, "λ={lambda}: {worst_land} {worst_touch}");
        }
    }
}

/// A method the registry does not know, defined in this one place: ΔW = r kᵀ / (kᵀk), the
/// Euclidean minimum-norm update that lands the edit. Nothing else in the crate changes for it.
mod toy {
    use std::collections::HashMap;

    use oedit::edit::methods::{single_layer, EditContext, MethodSpec, RuleReport, UpdateRule};
    use oedit::edit::subspace::Subspace;
    use oedit::edit::update::RankOne;
    use oedit::edit::AppliedUpdate;
    use oedit::hparams::Hparams;
    use oedit::stats::KeyStats;

    pub static SPEC: MethodSpec = MethodSpec {
        name: "toy-euclid",
        about: "a test method: the Euclidean minimum-norm rank-one update",
        hparam_sections: &[],
        layers: single_layer,
        build,
    };

    pub struct Toy {
        layer: usize,
        /// Edits made or restored (what this rule remembers).
        pub edits: usize,
    }

    fn build(hp: &Hparams, _: &[KeyStats]) -> anyhow::Result<Box<dyn UpdateRule>> {
        Ok(Box::new(Toy { layer: hp.layer, edits: 0 }))
    }

    impl UpdateRule for Toy {
        fn edit(&mut self, ctx: &mut EditContext<'_>) -> anyhow::Result<RuleReport> {
            let r = ctx.residual()?;
            let kv = ctx.kv;
            let k = &kv.k_star;
            let kk: f64 = k.iter().map(|x| x * x).sum();
            let u = k.iter().map(|x| x / kk).collect();
            ctx.apply(self.layer, &RankOne { r, u, retained: 1.0 }, k)?;
            self.edits += 1;
            Ok(RuleReport::default())
        }

        fn restore(&mut self, _: &HashMap<usize, Subspace>, updates: &[AppliedUpdate]) -> anyhow::Result<()> {
            self.edits = updates.len();
            Ok(())
        }
    }
}

#[test]
fn a_method_outside_the_registry_runs_through_the_editor() {
    let method = Method::from_spec(&toy::SPEC);
    assert_eq!(method.name(), "toy-euclid");
    assert!(Method::named("toy-euclid").is_none(), "the toy is not registered");
    let (mut lm, mut editor, _) = setup(method, |_| {});
    let w0 = lm.model.down_proj(1).to_dtype(DType::F64).unwrap();
    for line in minimal_lines(2) {
        let rec = parse_record(&line).unwrap();
        let (outcome, applied) = editor.edit(&mut lm.model, &lm.tok, &rec).unwrap();
        assert_eq!(applied.len(), 1);
        assert_eq!(applied[0].layer, 1);
        let (u, k) = (f64s(&applied[0].u), f64s(&applied[0].key));
        // u = k / kᵀk exactly as the toy says: parallel to k with uᵀk = 1.
        let kk: f64 = k.iter().map(|x| x * x).sum();
        let err = u.iter().zip(&k).map(|(a, b)| (a - b / kk).abs()).fold(0.0, f64::max);
        assert!(err < 1e-6 * k.iter().map(|x| x.abs()).fold(0.0, f64::max) / kk, "u is not k/kᵀk: {err}");
        assert_eq!(outcome.basis_size, 0);
        assert!(outcome.update_norm > 0.0);
    }
    // The weights changed only at the toy's layer, by the applied factors.
    let w1 = lm.model.down_proj(1).to_dtype(DType::F64).unwrap();
    assert!(max_abs_diff(&w0, &w1) > 0.0);
}

/// The target layer's hidden state at the subject (template mean) and z\* = z + (v\* − v) for
/// `rec` on the model as it stands, with the v\* the editor will compute.
fn z_and_z_star(lm: &LoadedModel, editor: &Editor, rec: &oedit::data::EditRecord) -> (Vec<f64>, Vec<f64>) {
    let prompts = oedit::edit::prompts::build(&lm.tok, rec, &editor.templates).unwrap();
    let top = *editor.layers().last().unwrap();
    let mut hp = editor.hparams.clone();
    hp.layer = top;
    let kv = oedit::edit::target::compute_key_value(&lm.model, &prompts, &hp).unwrap();
    let (_, z) = oedit::edit::target::subject_state(&lm.model, &prompts, top, top).unwrap();
    let z_star = z.iter().zip(kv.v_star.iter().zip(&kv.v_orig)).map(|(z, (v, o))| z + v - o).collect();
    (z, z_star)
}

fn diff_max(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn spread_layers_land_the_whole_residual_at_the_target_layer() {
    // With a vanishing weight on the preserved keys every layer lands its share exactly, so the
    // shares add up: after the edit the target layer's hidden state is z*, not just closer.
    let (mut lm, mut editor, _) = setup(Method::named("oedit-spread").unwrap(), |hp| {
        hp.oedit_spread.lambda = 1e-9;
    });
    assert_eq!(editor.layers(), vec![0, 1]);
    for line in minimal_lines(2) {
        let rec = parse_record(&line).unwrap();
        let (z, z_star) = z_and_z_star(&lm, &editor, &rec);
        let (_, applied) = editor.edit(&mut lm.model, &lm.tok, &rec).unwrap();
        assert_eq!(applied.iter().map(|a| a.layer).collect::<Vec<_>>(), vec![0, 1]);
        // Each layer's factor lands its residual at its own key (u·k = 1) ...
        for a in &applied {
            let share: f64 = f64s(&a.u).iter().zip(f64s(&a.key)).map(|(u, k)| u * k).sum();
            assert!((share - 1.0).abs() < 1e-6, "layer {}: share {share}", a.layer);
        }
        // ... the lowest layer half of z* − z (two layers), the top one what is left of it ...
        let half: Vec<f64> = z_star.iter().zip(&z).map(|(a, b)| (a - b) / 2.0).collect();
        let scale = half.iter().map(|x| x.abs()).fold(0.0, f64::max);
        assert!(scale > 1e-3, "the edit asks for no change");
        assert!(diff_max(&f64s(&applied[0].r), &half) < 1e-4 * scale.max(1.0));
        // ... so the hidden state the edit asked for is reached.
        let prompts = oedit::edit::prompts::build(&lm.tok, &rec, &editor.templates).unwrap();
        let (_, z_after) = oedit::edit::target::subject_state(&lm.model, &prompts, 1, 1).unwrap();
        let err = diff_max(&z_after, &z_star);
        assert!(err < 1e-3 * scale.max(1.0), "z after the edit is {err} from z* (change {scale})");
    }
}

#[test]
fn alphaedit_spreads_over_its_layers_each_in_its_null_space_with_its_own_memory() {
    let (threshold, min_dim, l2) = (1e-2, 16, 0.5);
    let (mut lm, mut editor, stats) = setup(Method::named("alphaedit").unwrap(), |hp| {
        hp.alphaedit.nullspace_threshold = threshold;
        hp.alphaedit.min_nullspace_dim = min_dim;
        hp.alphaedit.l2 = l2;
    });
    assert_eq!(editor.layers(), vec![0, 1]);
    // Per layer: the null-space basis of its own statistics.
    let nulls: HashMap<usize, Vec<Vec<f64>>> = stats
        .iter()
        .map(|s| {
            let eig = sym_eigen(&c_matrix(s));
            let n0 = eig.values.iter().filter(|&&v| v < threshold).count().max(min_dim);
            (s.layer, (0..n0).map(|j| eig.vectors.col(j)).collect())
        })
        .collect();
    let project = |layer: usize, x: &[f64]| -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        for b in &nulls[&layer] {
            let c: f64 = b.iter().zip(x).map(|(p, q)| p * q).sum();
            out.iter_mut().zip(b).for_each(|(o, bi)| *o += c * bi);
        }
        out
    };
    let mut past: HashMap<usize, Vec<Vec<f64>>> = HashMap::new();
    for line in minimal_lines(3) {
        let rec = parse_record(&line).unwrap();
        let (_, applied) = editor.edit(&mut lm.model, &lm.tok, &rec).unwrap();
        assert_eq!(applied.iter().map(|a| a.layer).collect::<Vec<_>>(), vec![0, 1]);
        for a in &applied {
            let (k, u) = (f64s(&a.key), f64s(&a.u));
            // u is in the layer's null space ...
            let pu = project(a.layer, &u);
            let un = u.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!(diff_max(&u, &pu) < 1e-6 * un, "layer {}: update leaves the null space", a.layer);
            // ... and solves (P₀(k kᵀ + Σ past k_p k_pᵀ) + αI) u = P₀ k with this layer's past keys.
            let layer_past = past.entry(a.layer).or_default();
            let mut m_pu = vec![0.0; u.len()];
            for kp in layer_past.iter().chain(std::iter::once(&k)) {
                let c: f64 = kp.iter().zip(&pu).map(|(x, y)| x * y).sum();
                m_pu.iter_mut().zip(kp).for_each(|(o, x)| *o += c * x);
            }
            let lhs: Vec<f64> = project(a.layer, &m_pu).iter().zip(&u).map(|(x, y)| x + l2 * y).collect();
            let pk = project(a.layer, &k);
            let scale = pk.iter().map(|x| x.abs()).fold(0.0, f64::max);
            let err = diff_max(&lhs, &pk) / scale;
            assert!(
                err < 1e-5,
                "layer {} edit {}: normal equation residual {err}",
                a.layer,
                layer_past.len()
            );
            layer_past.push(k);
        }
    }
}

#[test]
fn norm_control_keeps_v_star_at_the_original_norm() {
    use oedit::hparams::ValueNorm;
    let (lm, editor, _) = setup(Method::named("rome").unwrap(), |_| {});
    let rec = parse_record(&minimal_lines(1)[0]).unwrap();
    let prompts = oedit::edit::prompts::build(&lm.tok, &rec, &editor.templates).unwrap();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut hp = editor.hparams.clone();
    let free = oedit::edit::target::compute_key_value(&lm.model, &prompts, &hp).unwrap();
    hp.value_norm = ValueNorm::Original;
    let kept = oedit::edit::target::compute_key_value(&lm.model, &prompts, &hp).unwrap();
    let (nv, nfree, nkept) = (norm(&free.v_orig), norm(&free.v_star), norm(&kept.v_star));
    assert!((nfree - nv).abs() > 1e-3 * nv, "the free v* kept its norm anyway ({nfree} vs {nv})");
    assert!((nkept - nv).abs() < 1e-9 * nv, "‖v*‖ = {nkept}, ‖v‖ = {nv}");
    // The same optimisation, rescaled: the direction of the free v*.
    let cos: f64 = free.v_star.iter().zip(&kept.v_star).map(|(a, b)| a * b).sum::<f64>() / (nfree * nkept);
    assert!((cos - 1.0).abs() < 1e-9, "cosine {cos}");
    assert_eq!(free.losses, kept.losses);
}

#[test]
fn most_probable_early_stop_never_cuts_an_optimisation_whose_target_is_not_on_top() {
    // The tiny model never makes the hand-written targets its top answer: with the early stop
    // on, every optimisation runs the same trajectory to its last step (the stop itself is
    // checked on constructed log-probabilities in `edit::target`'s unit tests).
    let (lm, editor, _) = setup(Method::named("rome").unwrap(), |hp| {
        hp.v_steps = 12;
        hp.stop_loss = 0.0;
    });
    for line in minimal_lines(3) {
        let rec = parse_record(&line).unwrap();
        let prompts = oedit::edit::prompts::build(&lm.tok, &rec, &editor.templates).unwrap();
        let mut hp = editor.hparams.clone();
        let full = oedit::edit::target::compute_key_value(&lm.model, &prompts, &hp).unwrap();
        hp.stop_at_argmax = true;
        let early = oedit::edit::target::compute_key_value(&lm.model, &prompts, &hp).unwrap();
        assert_eq!(full.losses.len(), 12);
        assert_eq!(early.losses, full.losses, "{}", rec.target_new);
        assert_eq!(early.v_star, full.v_star);
    }
}

#[test]
fn sampled_context_templates_are_varied_reproducible_and_chosen_by_the_hyper_parameters() {
    use oedit::edit::templates::{sampled_context_templates, templates_for};
    let dir = tempfile::tempdir().unwrap();
    let lm = load(&tiny_model(dir.path(), TinyOpts::default()));
    let mut hp = tiny_hparams_struct();
    hp.context_templates = 6;
    hp.template_length = 5;
    let greedy = templates_for(&lm.model, &lm.tok, &hp).unwrap();
    assert_eq!(greedy, context_templates(&lm.model, &lm.tok, 6, 5).unwrap());
    hp.template_top_k = 5;
    let sampled = templates_for(&lm.model, &lm.tok, &hp).unwrap();
    assert_eq!(
        sampled,
        sampled_context_templates(&lm.model, &lm.tok, 6, 5, 5, oedit::hparams::DEFAULT_TEMPLATE_SEED)
            .unwrap(),
        "same seed, same text"
    );
    assert_eq!(sampled.len(), 6);
    assert_eq!(sampled[0], "{}");
    for t in &sampled {
        assert_eq!(t.matches("{}").count(), 1, "{t}");
    }
    assert_ne!(sampled, greedy, "sampling gave the greedy continuations");
    hp.template_seed = 7;
    let reseeded = templates_for(&lm.model, &lm.tok, &hp).unwrap();
    assert_eq!(reseeded, sampled_context_templates(&lm.model, &lm.tok, 6, 5, 5, 7).unwrap());
    assert_ne!(reseeded, sampled, "another seed drew the same templates");
    assert_eq!(reseeded[0], "{}");
}
