//! `oedit edit --batch-size B`: the joint batch updates solve each method's batch equations,
//! the stacked v* optimisation follows each record's own trajectory, batch size 1 is the
//! unbatched run byte for byte, and a batched run resumes to the same bytes.

use candle_core::DType;
use oedit::data::parse_record;
use oedit::edit::templates::context_templates;
use oedit::edit::{batch_value, prompts, target, AppliedUpdate, Editor, Method};
use oedit::hparams::Hparams;
use oedit::linalg::{sym_eigen, Mat};
use oedit::loader::LoadedModel;
use oedit::stats::{compute_many, Corpus, KeyStats};

use crate::common::*;

fn setup(method: &str, tweak: impl Fn(&mut Hparams)) -> (LoadedModel, Editor, Vec<KeyStats>) {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path(), TinyOpts::default());
    let lm = load(&model_dir);
    let method = Method::named(method).unwrap();
    let mut hp = tiny_hparams_struct();
    tweak(&mut hp);
    let corpus = Corpus::from_path(&corpus_file()).unwrap();
    let stats = compute_many(&lm.model, &lm.tok, &method.layers(&hp), hp.cov_tokens, &corpus).unwrap();
    let templates = context_templates(&lm.model, &lm.tok, hp.context_templates, hp.template_length).unwrap();
    let editor = Editor::new(method, hp, templates, &stats).unwrap();
    (lm, editor, stats)
}

fn records(range: std::ops::Range<usize>) -> Vec<oedit::data::EditRecord> {
    minimal_lines(10)[range].iter().map(|l| parse_record(l).unwrap()).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// C + 0.01·mean(diag C)·I, the regularised statistics of the tiny hyper-parameters.
fn c_reg(s: &KeyStats) -> Mat {
    let mut c = Mat::from_vec(s.dim, s.dim, s.second_moment.clone());
    let mean_diag = (0..s.dim).map(|i| c.get(i, i)).sum::<f64>() / s.dim as f64;
    c.add_diagonal(0.01 * mean_diag);
    c
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().map(|x| x.abs()).fold(0.0, f64::max)
}

/// Edits `recs` as one batch; returns each record's factors.
fn edit_batch(
    lm: &mut LoadedModel,
    editor: &mut Editor,
    recs: &[oedit::data::EditRecord],
) -> Vec<Vec<AppliedUpdate>> {
    let out = editor.edit_batch(&mut lm.model, &lm.tok, recs).unwrap();
    assert_eq!(out.len(), recs.len());
    out.into_iter().map(|(_, a)| a).collect()
}

/// The batch's updates of `layer`: keys and directions, one per record.
fn at_layer(applied: &[Vec<AppliedUpdate>], layer: usize) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let ups: Vec<&AppliedUpdate> = applied.iter().flatten().filter(|a| a.layer == layer).collect();
    (ups.iter().map(|a| f64s(&a.key)).collect(), ups.iter().map(|a| f64s(&a.u)).collect())
}

/// |u_jᵀk_i − δ_ij| at worst: every edit of the batch lands exactly (ΔW k_i = r_i).
fn worst_landing_error(keys: &[Vec<f64>], us: &[Vec<f64>]) -> f64 {
    let mut worst = 0.0f64;
    for (i, k) in keys.iter().enumerate() {
        for (j, u) in us.iter().enumerate() {
            worst = worst.max((dot64(u, k) - (i == j) as u8 as f64).abs());
        }
    }
    worst
}

/// Worst relative residual of the ridge normal equation P(Σ_m k_m k_mᵀ u_j) + A u_j = P k_j over
/// the batch (`keys`, `us`), relative to ‖k_j‖.
fn ridge_residual(
    keys: &[Vec<f64>],
    us: &[Vec<f64>],
    a: impl Fn(&[f64]) -> Vec<f64>,
    p: impl Fn(&[f64]) -> Vec<f64>,
) -> f64 {
    let mut worst = 0.0f64;
    for (j, u) in us.iter().enumerate() {
        let mut m = vec![0.0; u.len()];
        for k in keys {
            let c = dot64(k, u);
            m.iter_mut().zip(k).for_each(|(x, y)| *x += c * y);
        }
        let lhs: Vec<f64> = p(&m).iter().zip(a(u)).map(|(x, y)| x + y).collect();
        let rhs = p(&keys[j]);
        let err: Vec<f64> = lhs.iter().zip(&rhs).map(|(x, y)| x - y).collect();
        worst = worst.max(max_abs(&err) / max_abs(&keys[j]));
    }
    worst
}

#[test]
fn rome_and_hard_oedit_batches_land_every_edit_and_spare_stored_keys() {
    for method in ["rome", "oedit", "oedit-plus"] {
        let (mut lm, mut editor, _) = setup(method, |_| {});
        // Two single edits first: the O-Edit methods then hold their keys.
        let mut earlier = Vec::new();
        for rec in records(0..2) {
            let (_, a) = editor.edit(&mut lm.model, &lm.tok, &rec).unwrap();
            earlier.push(f64s(&a[0].key));
        }
        let w0 = lm.model.down_proj(1).to_dtype(DType::F64).unwrap();
        let applied = edit_batch(&mut lm, &mut editor, &records(2..5));
        let (keys, us) = at_layer(&applied, 1);
        assert_eq!(keys.len(), 3, "{method}");
        let worst = worst_landing_error(&keys, &us);
        assert!(worst < 1e-4, "{method}: u_jᵀk_i differs from δ_ij by {worst}");
        if method != "rome" {
            for (u, kp) in us.iter().flat_map(|u| earlier.iter().map(move |k| (u, k))) {
                let leak = dot64(u, kp).abs() / (norm64(u) * norm64(kp));
                assert!(leak < 1e-5, "{method}: the batch moves an earlier key ({leak})");
            }
        }
        // The applied change is Σ r_j u_jᵀ (record by record).
        let w1 = lm.model.down_proj(1).to_dtype(DType::F64).unwrap();
        let dw: Vec<Vec<f64>> = (w1 - &w0).unwrap().to_vec2().unwrap();
        let ups: Vec<&AppliedUpdate> = applied.iter().flatten().collect();
        let (i, j) = (3, 5);
        let want: f64 = ups.iter().map(|a| a.r[i] as f64 * a.u[j] as f64).sum();
        assert!((dw[i][j] - want).abs() < 1e-4 * want.abs() + 1e-6, "{method}: {} vs {want}", dw[i][j]);
        // A single record's own update would not land the others: the joint solve matters.
        let own = edit_batch(&mut lm, &mut editor, &records(5..6));
        let (k5, u5) = at_layer(&own, 1);
        assert!((dot64(&u5[0], &k5[0]) - 1.0).abs() < 1e-4);
    }
}

#[test]
fn memit_batch_solves_its_normal_equation_per_layer() {
    let lambda = 2.0;
    let (mut lm, mut editor, stats) = setup("memit", |hp| {
        hp.memit.layers = vec![0, 1];
        hp.memit.mom2_weight = lambda;
    });
    let applied = edit_batch(&mut lm, &mut editor, &records(0..3));
    assert!(applied.iter().all(|a| a.iter().map(|u| u.layer).collect::<Vec<_>>() == vec![0, 1]));
    for layer in [0, 1] {
        let c = c_reg(stats.iter().find(|s| s.layer == layer).unwrap());
        let (keys, us) = at_layer(&applied, layer);
        let a = |u: &[f64]| c.matvec(u).iter().map(|x| lambda * x).collect();
        let err = ridge_residual(&keys, &us, a, |x| x.to_vec());
        assert!(err < 1e-3, "layer {layer}: (λC + KKᵀ)U = K residual {err}");
        // The same directions given to the wrong records fail it (the check can fail).
        let swapped = vec![us[1].clone(), us[0].clone(), us[2].clone()];
        assert!(ridge_residual(&keys, &swapped, a, |x| x.to_vec()) > 1e-3);
    }
}

#[test]
fn soft_oedit_batch_solves_its_regularised_joint_form() {
    let lambda = 50.0;
    let (mut lm, mut editor, stats) = setup("oedit-soft", |hp| hp.oedit_soft.lambda = lambda);
    let mut past = Vec::new();
    for rec in records(0..2) {
        let (_, a) = editor.edit(&mut lm.model, &lm.tok, &rec).unwrap();
        past.push(f64s(&a[0].key));
    }
    let applied = edit_batch(&mut lm, &mut editor, &records(2..5));
    let (keys, us) = at_layer(&applied, 1);
    let c = c_reg(&stats[0]);
    // (λC + Σ past k kᵀ + K Kᵀ) U = K.
    let a = |u: &[f64]| {
        let mut out: Vec<f64> = c.matvec(u).iter().map(|x| lambda * x).collect();
        for k in &past {
            let s = dot64(k, u);
            out.iter_mut().zip(k).for_each(|(o, x)| *o += s * x);
        }
        out
    };
    let err = ridge_residual(&keys, &us, a, |x| x.to_vec());
    assert!(err < 1e-3, "soft joint normal equation residual {err}");
    // Without the memory of the earlier keys the equation fails (the check can fail).
    let forgetful = |u: &[f64]| c.matvec(u).iter().map(|x| lambda * x).collect();
    assert!(ridge_residual(&keys, &us, forgetful, |x| x.to_vec()) > 1e-3);
}

#[test]
fn alphaedit_batch_solves_its_null_space_normal_equation() {
    let (threshold, min_dim, l2) = (1e-2, 16, 1.0);
    let (mut lm, mut editor, stats) = setup("alphaedit-single", |hp| {
        hp.alphaedit.nullspace_threshold = threshold;
        hp.alphaedit.min_nullspace_dim = min_dim;
        hp.alphaedit.l2 = l2;
    });
    let s = &stats[0];
    let eig = sym_eigen(&Mat::from_vec(s.dim, s.dim, s.second_moment.clone()));
    let n0 = eig.values.iter().filter(|&&v| v < threshold).count().max(min_dim);
    let null: Vec<Vec<f64>> = (0..n0).map(|j| eig.vectors.col(j)).collect();
    let project = |x: &[f64]| {
        let mut out = vec![0.0; x.len()];
        for b in &null {
            let c = dot64(b, x);
            out.iter_mut().zip(b).for_each(|(o, y)| *o += c * y);
        }
        out
    };
    let mut past = Vec::new();
    for rec in records(0..2) {
        let (_, a) = editor.edit(&mut lm.model, &lm.tok, &rec).unwrap();
        past.push(f64s(&a[0].key));
    }
    let applied = edit_batch(&mut lm, &mut editor, &records(2..5));
    let (keys, us) = at_layer(&applied, 1);
    // (P(K Kᵀ + Σ past k kᵀ) + αI) x = P k, x in the null space.
    let a = |u: &[f64]| {
        let mut m = vec![0.0; u.len()];
        for k in &past {
            let s = dot64(k, u);
            m.iter_mut().zip(k).for_each(|(o, x)| *o += s * x);
        }
        project(&m).iter().zip(u).map(|(p, x)| p + l2 * x).collect()
    };
    let err = ridge_residual(&keys, &us, a, project);
    assert!(err < 1e-3, "AlphaEdit joint normal equation residual {err}");
    for u in &us {
        let off: Vec<f64> = u.iter().zip(project(u)).map(|(a, b)| a - b).collect();
        assert!(norm64(&off) < 1e-5 * norm64(u), "the batch update leaves the null space");
    }
}

/// MEMIT's form of the v\* objective (clamp and decay relative to the hidden state, its KL)
/// gives each record of a stack the trajectory it has alone.
#[test]
fn stacked_value_optimisation_in_memits_form_matches_single_records() {
    let (lm, editor, _) = setup("rome", |hp| {
        hp.v_steps = 8;
        hp.v_objective = oedit::hparams::VObjective::Memit;
        hp.clamp_norm_factor = 0.75;
        hp.weight_decay = 0.5;
    });
    let mut hp = editor.hparams.clone();
    hp.layer = 1;
    let recs = records(0..3);
    let ps: Vec<prompts::EditPrompts> =
        recs.iter().map(|r| prompts::build(&lm.tok, r, &editor.templates).unwrap()).collect();
    let refs: Vec<&prompts::EditPrompts> = ps.iter().collect();
    let batched = batch_value::compute_key_values(&lm.model, &refs, &hp).unwrap();
    let mut oedit_form = hp.clone();
    oedit_form.v_objective = oedit::hparams::VObjective::Oedit;
    for (p, b) in ps.iter().zip(&batched) {
        let single = target::compute_key_value(&lm.model, p, &hp).unwrap();
        assert_eq!(single.losses.len(), b.losses.len());
        for (s, x) in single.losses.iter().zip(&b.losses) {
            assert!((s - x).abs() <= 1e-4 * s.abs().max(1e-3), "loss {s} vs batched {x}");
        }
        let dv: f64 = single.v_star.iter().zip(&b.v_star).map(|(s, x)| (s - x).abs()).fold(0.0, f64::max);
        assert!(dv <= 1e-3 * max_abs(&single.v_star), "v* differs by {dv}");
        // The form is not ignored: oedit's gives other losses.
        let other = target::compute_key_value(&lm.model, p, &oedit_form).unwrap();
        assert!(other.losses.iter().zip(&single.losses).any(|(a, b)| (a - b).abs() > 1e-3 * b.abs()));
    }
}

#[test]
fn stacked_value_optimisation_follows_each_records_own_trajectory() {
    let (lm, editor, _) = setup("rome", |hp| {
        hp.v_steps = 25;
        // The tiny random model's target NLLs sit near 7.5–9.5: some records stop early, some never.
        hp.stop_loss = 8.0;
    });
    let mut hp = editor.hparams.clone();
    hp.layer = 1;
    let recs = records(0..4);
    let ps: Vec<prompts::EditPrompts> =
        recs.iter().map(|r| prompts::build(&lm.tok, r, &editor.templates).unwrap()).collect();
    let refs: Vec<&prompts::EditPrompts> = ps.iter().collect();
    let batched = batch_value::compute_key_values(&lm.model, &refs, &hp).unwrap();
    assert!(batched.iter().all(|kv| kv.stack == 0), "the tiny batch fits one stack");
    // Stacks of one record each (the memory bound) give the same results.
    let split = batch_value::compute_key_values_in(&lm.model, &refs, &hp, 1).unwrap();
    // One stack per record, numbered in the order they ran (records of equal suffix length
    // together).
    let mut stack_ids: Vec<usize> = split.iter().map(|kv| kv.stack).collect();
    stack_ids.sort_unstable();
    assert_eq!(stack_ids, vec![0, 1, 2, 3]);
    let mut steps = Vec::new();
    for ((p, b), one) in ps.iter().zip(&batched).zip(&split) {
        assert_eq!(b.losses.len(), one.losses.len());
        for (x, y) in b.losses.iter().zip(&one.losses) {
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1e-3));
        }
        let single = target::compute_key_value(&lm.model, p, &hp).unwrap();
        assert_eq!(single.steps, b.steps);
        assert_eq!(single.losses.len(), b.losses.len());
        for (s, x) in single.losses.iter().zip(&b.losses) {
            assert!((s - x).abs() <= 1e-4 * s.abs().max(1e-3), "loss {s} vs batched {x}");
        }
        for (s, x) in single.k_star.iter().zip(&b.k_star) {
            assert!((s - x).abs() <= 1e-4 * s.abs().max(1e-2));
        }
        let dv: f64 = single.v_star.iter().zip(&b.v_star).map(|(s, x)| (s - x).abs()).fold(0.0, f64::max);
        assert!(dv <= 1e-3 * max_abs(&single.v_star), "v* differs by {dv}");
        steps.push(b.steps);
    }
    // The early stops differ between records, so freezing is exercised.
    steps.sort_unstable();
    steps.dedup();
    assert!(steps.len() > 1, "every record stopped at the same step: {steps:?}");
    // Stopped records left the stack: later passes ran fewer rows than the first.
    let s = batched[0].shape;
    assert_eq!(s.rows, ps.iter().map(|p| p.batch.batch_size()).sum::<usize>());
    assert!(s.row_passes < s.rows * s.passes, "the stack never shrank: {s:?}");
}

// ---------------------------------------------------------------------------------------------
// The command line.

#[test]
fn batch_size_one_is_the_unbatched_run_byte_for_byte() {
    let fx = EditFx::new();
    let edits = fx.edits("e.jsonl", &minimal_lines(3));
    let (a, b) = (fx.path("plain"), fx.path("one"));
    fx.edit_ok(&edits, &a, &["--method", "oedit-plus"]);
    fx.edit_ok(&edits, &b, &["--method", "oedit-plus", "--batch-size", "1"]);
    assert_eq!(update_files(&a), update_files(&b));
    assert_eq!(
        std::fs::read(a.join("manifest.json")).unwrap(),
        std::fs::read(b.join("manifest.json")).unwrap()
    );
    let log = log_without_timings(&b);
    assert_eq!(log_without_timings(&a), log);
    assert!(log.iter().all(|l| l.get("batch").is_none()));
}

#[test]
fn batched_runs_log_per_record_and_resume_to_the_same_bytes() {
    let fx = EditFx::new();
    let edits = fx.edits("e.jsonl", &minimal_lines(7));
    // Also with closed-loop landing forced (a margin no edit reaches): every record of a batch
    // makes its further attempts after the joint update, in the checkpoint after the batch.
    let mut hp = tiny_hparams();
    hp["landing"] = serde_json::json!({ "max_attempts": 2, "min_margin": 1e6, "max_gain": 10.0 });
    let landing = write_json(&fx.path("landing.json"), &hp);
    let landing = landing.to_str().unwrap();
    for (method, land) in [
        ("oedit-plus", false),
        ("memit", false),
        ("alphaedit", false),
        ("alphaedit-single", false),
        ("oedit-spread", false),
        ("oedit-soft", false),
        ("rome", false),
        ("oedit", false),
        ("alphaedit", true),
        ("oedit-soft", true),
        ("oedit-plus", true),
        ("rome", true),
    ] {
        let name = format!("{method}{}", if land { "-landing" } else { "" });
        let mut args = vec!["--method", method, "--batch-size", "3"];
        if land {
            args.extend(["--hparams", landing]);
        }
        let with = |extra: &[&'static str]| [&args[..], extra].concat();
        let straight = fx.path(&format!("straight-{name}"));
        let s = fx.edit_ok(&edits, &straight, &args);
        assert_eq!(s["edits_total"], 7, "{name}");
        let log = log_without_timings(&straight);
        let batches: Vec<u64> = log.iter().map(|l| l["batch"].as_u64().unwrap()).collect();
        assert_eq!(batches, vec![0, 0, 0, 1, 1, 1, 2], "{name}");
        assert!(log.iter().all(|l| l["steps"].as_u64().is_some() && l["p_target_after"].is_number()));
        let attempts: Vec<u64> = log.iter().map(|l| l["attempts"].as_u64().unwrap()).collect();
        assert_eq!(attempts, vec![if land { 2 } else { 1 }; 7], "{name}");
        // Stopped after the first batch, then resumed.
        let resumed = fx.path(&format!("resumed-{name}"));
        let s = fx.edit_ok(&edits, &resumed, &with(&["--limit", "3"]));
        assert_eq!(s["edits_total"], 3);
        let s = fx.edit_ok(&edits, &resumed, &args);
        assert_eq!((s["edits_total"].as_u64(), s["resumed_from"].as_u64()), (Some(7), Some(3)));
        assert_eq!(update_files(&straight), update_files(&resumed), "{name}: checkpoint bytes differ");
        assert_eq!(log, log_without_timings(&resumed), "{name}");
        // The edited weights too.
        if method == "oedit-plus" || land {
            let (x, y) = (export_run(&straight, &fx.path("xs")), export_run(&resumed, &fx.path("xr")));
            assert!(
                std::fs::read(x.join("model.safetensors")).unwrap()
                    == std::fs::read(y.join("model.safetensors")).unwrap(),
                "{name}: exported weights differ"
            );
            std::fs::remove_dir_all(x).unwrap();
            std::fs::remove_dir_all(y).unwrap();
        }
    }
}

#[test]
fn resume_refuses_another_batch_size() {
    let fx = EditFx::new();
    let edits = fx.edits("e.jsonl", &minimal_lines(4));
    let run_dir = fx.path("run");
    fx.edit_ok(&edits, &run_dir, &["--method", "rome", "--batch-size", "2", "--limit", "2"]);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["batch_size"], 2);
    for other in [&["--batch-size", "3"][..], &[]] {
        let mut args = vec!["--method", "rome"];
        args.extend_from_slice(other);
        let o = fx.edit(&edits, &run_dir, &args);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("--batch-size 2"), "{}", stderr(&o));
    }
}

#[test]
fn a_bad_line_inside_a_batch() {
    let fx = EditFx::new();
    let mut lines = minimal_lines(5);
    // Over the prompt-token limit: a bad line found only once the tokenizer is loaded, inside
    // the session (a line bad in itself is refused before the model loads).
    let long = format!("Xavier {}", "went to the old town and then ".repeat(40));
    lines.insert(2, serde_json::json!({ "prompt": long, "subject": "Xavier", "target": "y" }).to_string());
    let edits = fx.edits("e.jsonl", &lines);
    // stop: the records before the bad line are applied as a smaller batch and checkpointed.
    let run_dir = fx.path("stop");
    let o = fx.edit(&edits, &run_dir, &["--method", "oedit-soft", "--batch-size", "3"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("e.jsonl:3"), "{}", stderr(&o));
    let log = log_without_timings(&run_dir);
    let got: Vec<(u64, u64)> =
        log.iter().map(|l| (l["line"].as_u64().unwrap(), l["batch"].as_u64().unwrap())).collect();
    assert_eq!(got, vec![(1, 0), (2, 0)]);
    // skip: the bad line is rejected and the batch filled from the lines after it.
    let run_dir = fx.path("skip");
    let s = fx.edit_ok(
        &edits,
        &run_dir,
        &["--method", "oedit-soft", "--batch-size", "3", "--on-invalid", "skip"],
    );
    assert_eq!((s["edits_total"].as_u64(), s["rejected"].as_u64()), (Some(5), Some(1)));
    let log = log_without_timings(&run_dir);
    let got: Vec<(u64, u64)> =
        log.iter().map(|l| (l["line"].as_u64().unwrap(), l["batch"].as_u64().unwrap())).collect();
    assert_eq!(got, vec![(1, 0), (2, 0), (4, 0), (5, 1), (6, 1)]);
    assert_eq!(read_jsonl(&run_dir.join("rejected.jsonl"))[0]["line"], 3);
}

#[test]
fn a_crash_after_a_batch_commit_loses_no_log_line() {
    let fx = EditFx::new();
    let edits = fx.edits("e.jsonl", &minimal_lines(5));
    let run_dir = fx.path("run");
    fx.edit_ok(&edits, &run_dir, &["--method", "rome", "--batch-size", "3", "--limit", "3"]);
    let full = log_without_timings(&run_dir);
    // As if the process died right after the commit point, before appending the lines.
    std::fs::write(run_dir.join("log.jsonl"), "").unwrap();
    let s = fx.edit_ok(&edits, &run_dir, &["--method", "rome", "--batch-size", "3"]);
    assert_eq!(s["edits_total"], 5);
    let log = log_without_timings(&run_dir);
    assert_eq!(&log[..3], &full[..]);
    assert_eq!(log.iter().map(|l| l["index"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
}

#[test]
fn a_batched_run_killed_mid_batch_resumes_to_the_same_weights() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let fx = EditFx::new();
    // Slow batches (30 steps, no early stop), so that the kill lands inside the second batch.
    let mut hp = tiny_hparams();
    hp["v_steps"] = serde_json::json!(30);
    hp["stop_loss"] = serde_json::json!(0.0);
    let hparams = write_json(&fx.path("slow.json"), &hp);
    let edits = fx.edits("e.jsonl", &minimal_lines(9));
    let args = ["--method", "oedit-plus", "--batch-size", "3"];
    let cmd = |run_dir: &std::path::Path| {
        let mut c = edit_cmd(&fx.model, &hparams, &edits, run_dir, &fx.cache);
        c.args(args);
        c
    };
    let straight = fx.path("straight");
    assert_ok(&run(cmd(&straight)));
    let killed = fx.path("killed");
    let mut child = cmd(&killed).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let lines = |d: &std::path::Path| {
        std::fs::read_to_string(d.join("log.jsonl")).map(|t| t.lines().count()).unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while lines(&killed) < 3 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its first batch was logged");
        assert!(Instant::now() < deadline, "no progress within 120 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success(), "the run finished before it was killed");
    let done = lines(&killed);
    assert!(done < 9 && done % 3 == 0, "killed with {done} logged edits");
    let o = run(cmd(&killed));
    assert_ok(&o);
    assert_eq!(edit_summary(&o)["resumed_from"].as_u64().unwrap() as usize % 3, 0);
    assert_eq!(update_files(&straight), update_files(&killed), "checkpoint records differ");
    assert_eq!(log_without_timings(&straight), log_without_timings(&killed));
    let (x, y) = (export_run(&straight, &fx.path("xs")), export_run(&killed, &fx.path("xk")));
    assert!(
        std::fs::read(x.join("model.safetensors")).unwrap()
            == std::fs::read(y.join("model.safetensors")).unwrap(),
        "exported weights differ"
    );
}
