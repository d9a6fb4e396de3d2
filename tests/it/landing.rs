//! Closed-loop landing (tiny model): an edit that lands on its first update makes no further
//! attempt; one whose first update lands too little gets more attempts and ends with its target
//! winning, each further attempt scaled by at most `landing.max_gain`; a hard projection keeps
//! its subspace and its guarantee for earlier keys through the attempts; and a run of
//! multi-attempt edits resumes to the same bytes.

use candle_core::DType;
use oedit::data::{parse_record, EditRecord};
use oedit::edit::templates::context_templates;
use oedit::edit::{AppliedUpdate, EditOutcome, Editor, Method};
use oedit::hparams::{Hparams, LandingParams};
use oedit::loader::LoadedModel;
use oedit::stats::{compute_many, Corpus, KeyStats};
use tempfile::TempDir;

use crate::common::*;

/// Minimal-format edits with a ground truth (so that the margin is defined).
fn records(n: usize) -> Vec<EditRecord> {
    some_records(&(0..n).collect::<Vec<_>>())
}

/// Edits whose target loses to the ground truth on the unedited tiny model (0 and 4 win there)
/// and that v\* can reach (5 it cannot).
const LOSING: [usize; 3] = [1, 2, 3];

/// The edits of [`records`] at `which`.
fn some_records(which: &[usize]) -> Vec<EditRecord> {
    which
        .iter()
        .map(|&i| MINIMAL_EDITS[i])
        .map(|(p, s, t)| {
            let line = serde_json::json!({ "prompt": p, "subject": s, "target": t, "ground_truth": "moon" });
            parse_record(&line.to_string()).unwrap()
        })
        .collect()
}

struct Fx {
    dir: TempDir,
    stats: Vec<KeyStats>,
    templates: Vec<String>,
}

impl Fx {
    fn new(method: Method, hp: &Hparams) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let lm = load(&tiny_model(&dir.path().join("tiny"), TinyOpts::default()));
        let corpus = Corpus::from_path(&corpus_file()).unwrap();
        let stats = compute_many(&lm.model, &lm.tok, &method.layers(hp), hp.cov_tokens, &corpus).unwrap();
        let templates =
            context_templates(&lm.model, &lm.tok, hp.context_templates, hp.template_length).unwrap();
        Self { dir, stats, templates }
    }

    /// An editor for `hp` on a fresh copy of the model, after editing `recs`: the editor, each
    /// edit's outcome and factors, and the model.
    fn edit_all(
        &self,
        method: Method,
        hp: &Hparams,
        recs: &[EditRecord],
    ) -> (Editor, Vec<Edited>, LoadedModel) {
        let mut lm = load(&self.dir.path().join("tiny"));
        let mut editor = Editor::new(method, hp.clone(), self.templates.clone(), &self.stats).unwrap();
        let out = recs.iter().map(|r| editor.edit(&mut lm.model, &lm.tok, r).unwrap()).collect();
        (editor, out, lm)
    }
}

type Edited = (EditOutcome, Vec<AppliedUpdate>);

fn landing(max_attempts: usize, min_margin: f64, max_gain: f64) -> LandingParams {
    LandingParams { max_attempts, min_margin, max_gain }
}

fn hparams(tweak: impl Fn(&mut Hparams)) -> Hparams {
    let mut hp = tiny_hparams_struct();
    tweak(&mut hp);
    hp
}

/// The λ (oedit-soft) or α (alphaedit) that makes the first edit land about `share` of its
/// residual: both land q/(1+q) with q proportional to 1/λ, so one probe edit gives q at λ.
fn weight_for_share(method: Method, share: f64) -> f64 {
    let probe = hparams(|_| {});
    let fx = Fx::new(method, &probe);
    let (_, out, _) = fx.edit_all(method, &probe, &some_records(&LOSING[..1]));
    let r = out[0].0.retained;
    assert!(r > 0.0 && r < 1.0, "probe retained {r}");
    let weight = if method.name() == "oedit-soft" { probe.oedit_soft.lambda } else { probe.alphaedit.l2 };
    let q_at_one = weight * r / (1.0 - r);
    q_at_one / (share / (1.0 - share))
}

/// v\* optimisation that reaches the target on the tiny random model (its defaults do not).
fn steerable(hp: &mut Hparams) {
    hp.v_steps = 40;
    hp.clamp_norm_factor = 20.0;
}

fn set_weight(hp: &mut Hparams, method: Method, w: f64) {
    if method.name() == "oedit-soft" {
        hp.oedit_soft.lambda = w;
    } else {
        hp.alphaedit.l2 = w;
    }
}

/// Steerable hyper-parameters whose first update lands about `share` of an edit's change,
/// without landing and with landing (4 attempts, margin 0, gain up to 100).
fn landing_off_and_on(method: Method, share: f64) -> (Hparams, Hparams) {
    let w = weight_for_share(method, share);
    let off = hparams(|h| {
        steerable(h);
        set_weight(h, method, w);
    });
    let mut on = off.clone();
    on.landing = landing(4, 0.0, 100.0);
    (off, on)
}

#[test]
fn landing_stops_as_soon_as_the_target_wins() {
    for name in ["oedit-plus", "oedit-soft", "rome"] {
        let method = Method::named(name).unwrap();
        let hp = hparams(|h| h.landing = landing(3, 0.0, 10.0));
        let fx = Fx::new(method, &hp);
        let (_, out, _) = fx.edit_all(method, &hp, &records(6));
        let mut landed_first = 0;
        for (i, (o, applied)) in out.iter().enumerate() {
            let landed = o.target_wins && o.margin.is_some_and(|m| m >= 0.0);
            if o.attempts == 1 {
                // One attempt with three allowed: the first update landed.
                assert!(landed, "{name} edit {i}: stopped after one attempt without landing");
                assert!(o.landing.is_empty());
                landed_first += 1;
            } else {
                assert_eq!(o.landing.len(), o.attempts, "{name} edit {i}");
                assert!(o.attempts <= 3);
                // Every attempt but the last missed; the loop stopped at the first that landed.
                for a in &o.landing[..o.attempts - 1] {
                    assert!(!(a.target_wins && a.margin.is_some_and(|m| m >= 0.0)), "{name} edit {i}: {a:?}");
                }
            }
            assert_eq!(applied.len(), o.attempts, "{name} edit {i}: one factor per attempt");
        }
        assert!(landed_first > 0, "{name}: no edit landed on its first update");
    }
}

#[test]
fn a_first_update_that_lands_too_little_gets_more_attempts_and_lands() {
    for name in ["oedit-soft", "alphaedit-single"] {
        let method = Method::named(name).unwrap();
        // A weight on the preserved keys so heavy that the first update lands 3% of the change.
        let (off, on) = landing_off_and_on(method, 0.03);
        let fx = Fx::new(method, &off);
        let recs = some_records(&LOSING);
        let (_, without, _) = fx.edit_all(method, &off, &recs);
        // The first edit starts from the same weights with or without landing: its first
        // update misses.
        assert!(!without[0].0.target_wins, "{name}: the first update should miss");
        let (_, with, _) = fx.edit_all(method, &on, &recs);
        assert!(with[0].0.attempts > 1, "{name}: the first edit made one attempt");
        for (i, (o, _)) in with.iter().enumerate() {
            assert!(o.attempts <= 4, "{name} edit {i}: {} attempts", o.attempts);
            if name == "oedit-soft" {
                assert!(
                    o.target_wins,
                    "{name} edit {i}: not landed after {} attempts: {:?}",
                    o.attempts, o.landing
                );
            } else if o.attempts > 1 {
                // AlphaEdit's null-space update moves the bare prompt's key less than k*'s on
                // the tiny model, so its v* (which stalls there) may not be enough; each further
                // attempt still lands the whole residual and closes most of the gap.
                let m = |a: &oedit::edit::landing::AttemptLog| a.margin.unwrap();
                assert!(
                    m(&o.landing[o.attempts - 1]) > m(&o.landing[0]) + 0.5,
                    "{name} edit {i}: {:?}",
                    o.landing
                );
            }
            if o.attempts > 1 {
                assert!(!o.landing[0].target_wins, "{name} edit {i}: the first attempt landed");
                // Later attempts scale the rule's step up to land the whole missing residual.
                assert!(o.landing[1].gain > 1.0, "{name} edit {i}: {:?}", o.landing[1]);
            }
        }
    }
}

#[test]
fn further_attempts_are_scaled_at_most_max_gain() {
    let method = Method::named("oedit-soft").unwrap();
    // The first update lands 3% of the change: landing the rest needs a gain of about 30.
    let (off, free) = landing_off_and_on(method, 0.03);
    let mut capped = free.clone();
    capped.landing.max_gain = 3.0;
    let fx = Fx::new(method, &off);
    let recs = some_records(&LOSING[..1]);
    let (_, free_out, _) = fx.edit_all(method, &free, &recs);
    let (_, capped_out, _) = fx.edit_all(method, &capped, &recs);
    let (f, c) = (&free_out[0].0, &capped_out[0].0);
    assert!(f.attempts > 1 && c.attempts > 1, "{f:?} {c:?}");
    // The first attempt does not depend on the cap; from the second on, the cap holds.
    assert_eq!(f.landing[0].update_norm, c.landing[0].update_norm);
    assert!(f.landing[1].gain > 3.0, "uncapped gain {}", f.landing[1].gain);
    for a in &c.landing[1..] {
        assert!(a.gain > 1.0 && a.gain <= 3.0, "capped gain {}", a.gain);
    }
    assert_eq!(c.landing[1].gain, 3.0);
    // Both second attempts start from the same weights and residual: the capped one is the
    // same step scaled by 3 instead of the uncapped gain.
    let ratio = c.landing[1].update_norm.unwrap() / f.landing[1].update_norm.unwrap();
    let expected = 3.0 / f.landing[1].gain;
    assert!((ratio - expected).abs() < 1e-3 * expected, "ratio {ratio}, expected {expected}");
}

#[test]
fn hard_projection_keeps_its_subspace_and_guarantee_through_the_attempts() {
    let method = Method::named("oedit-plus").unwrap();
    let off = hparams(|_| {});
    // A margin no edit reaches: every edit makes all its attempts.
    let on = hparams(|h| h.landing = landing(3, 1e6, 10.0));
    let fx = Fx::new(method, &off);
    let recs = records(6);
    let (plain, _, _) = fx.edit_all(method, &off, &recs);
    let (landed, out, _) = fx.edit_all(method, &on, &recs);
    let mut earlier: Vec<Vec<f64>> = Vec::new();
    for (i, (o, applied)) in out.iter().enumerate() {
        assert_eq!(o.attempts, 3, "edit {i}");
        assert_eq!(o.subspace.released, 0, "edit {i}: the tiny edits do not conflict");
        assert_eq!(o.basis_size, i + 1, "edit {i}: one direction per edit, not one per attempt");
        // Every attempt's factor, and so their sum, leaves every earlier edit's key unchanged.
        for a in applied {
            let u: Vec<f64> = a.u.iter().map(|&x| x as f64).collect();
            let nu = u.iter().map(|x| x * x).sum::<f64>().sqrt();
            for k in &earlier {
                let nk = k.iter().map(|x| x * x).sum::<f64>().sqrt();
                let uk: f64 = u.iter().zip(k).map(|(a, b)| a * b).sum();
                assert!(uk.abs() < 1e-4 * nu * nk, "edit {i}: uᵀk = {uk} (‖u‖ {nu}, ‖k‖ {nk})");
            }
        }
        earlier.push(applied[0].key.iter().map(|&x| x as f64).collect());
    }
    // The subspace is the one single-update edits build, bit for bit: the keys do not depend on
    // the values landed, and each edit's direction is appended once.
    let bits = |e: &Editor| {
        let s = e.subspace(1).unwrap();
        assert!(s.basis.orthonormality_error() < 1e-10);
        let rows: Vec<u64> = s.basis.rows().iter().flatten().map(|x| x.to_bits()).collect();
        (rows, s.energy.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
    };
    assert!(bits(&landed) == bits(&plain), "the subspace differs from the single-update one");
}

#[test]
fn every_record_of_a_batch_that_misses_gets_its_own_further_attempts() {
    let method = Method::named("oedit-soft").unwrap();
    // The joint update lands about 10% of each record's change.
    let (off, on) = landing_off_and_on(method, 0.1);
    let fx = Fx::new(method, &off);
    let recs = some_records(&LOSING);
    let batch = |hp: &Hparams| {
        let mut lm = load(&fx.dir.path().join("tiny"));
        let mut editor = Editor::new(method, hp.clone(), fx.templates.clone(), &fx.stats).unwrap();
        let out = editor.edit_batch(&mut lm.model, &lm.tok, &recs).unwrap();
        (editor, out, lm)
    };
    let (_, without, _) = batch(&off);
    assert!(without.iter().all(|(o, a)| o.attempts == 1 && a.len() == 1 && o.landing.is_empty()));
    let missed = without.iter().filter(|(o, _)| !o.target_wins).count();
    assert!(missed > 0, "the joint update should leave some record not landed");
    let (_, with, lm) = batch(&on);
    let mut further = 0;
    for (i, ((o, applied), (o0, a0))) in with.iter().zip(&without).enumerate() {
        // The joint update is the same with landing on.
        assert!(applied[0].r == a0[0].r && applied[0].u == a0[0].u, "record {i}: joint update differs");
        assert!(o.target_wins, "record {i}: not landed after {} attempts: {:?}", o.attempts, o.landing);
        assert!(o.attempts <= 4);
        if o0.target_wins {
            assert_eq!(o.attempts, 1, "record {i} landed on the joint update");
        } else {
            assert!(o.attempts > 1, "record {i} missed and made no further attempt");
            assert_eq!(o.landing.len(), o.attempts);
            assert!(!o.landing[0].target_wins && o.landing[1].gain > 1.0, "record {i}: {:?}", o.landing);
        }
        further += o.attempts - 1;
        // Every record holds its joint factor; the further attempts follow the whole batch.
        let expect = if i + 1 == with.len() { 1 + further } else { 1 };
        assert_eq!(applied.len(), expect, "record {i}");
    }
    // The logged state is the model's after the whole batch and its landing.
    let now = oedit::edit::landing::checks(&lm.model, &lm.tok, &recs).unwrap();
    for ((o, _), c) in with.iter().zip(now) {
        assert_eq!((o.target_wins, o.p_target_after), (c.wins, c.p_target));
    }
}

#[test]
fn exact_rules_land_a_batch_along_each_records_joint_direction() {
    for name in ["oedit-plus", "rome"] {
        let method = Method::named(name).unwrap();
        let off = hparams(|_| {});
        // A margin no edit reaches: every record makes all its attempts.
        let on = hparams(|h| h.landing = landing(3, 1e6, 10.0));
        let fx = Fx::new(method, &off);
        let recs = records(4);
        let batch = |hp: &Hparams| {
            let mut lm = load(&fx.dir.path().join("tiny"));
            let mut editor = Editor::new(method, hp.clone(), fx.templates.clone(), &fx.stats).unwrap();
            let out = editor.edit_batch(&mut lm.model, &lm.tok, &recs).unwrap();
            (editor, out)
        };
        let (plain, without) = batch(&off);
        let (landed, with) = batch(&on);
        let keys: Vec<Vec<f64>> =
            with.iter().map(|(_, a)| a[0].key.iter().map(|&x| x as f64).collect()).collect();
        let joint: Vec<&AppliedUpdate> = with.iter().map(|(_, a)| &a[0]).collect();
        let tail: Vec<&AppliedUpdate> = with.last().unwrap().1[1..].iter().collect();
        assert_eq!(tail.len(), 2 * recs.len(), "{name}: two further attempts per record");
        for (i, ((o, a), (_, a0))) in with.iter().zip(&without).enumerate() {
            assert_eq!(o.attempts, 3, "{name} record {i}");
            assert!(a[0].r == a0[0].r && a[0].u == a0[0].u, "{name} record {i}: joint update differs");
            // Its attempts, in record order after the joint factors, repeat its joint direction:
            // they land at its key and leave the batch's other keys where the joint update put them.
            for t in &tail[2 * i..2 * i + 2] {
                assert!(t.u == joint[i].u, "{name} record {i}: not along its direction");
                let dk = t.key.iter().zip(&joint[i].key).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(dk < 1e-4, "{name} record {i}: k* moved by {dk}");
                let u: Vec<f64> = t.u.iter().map(|&x| x as f64).collect();
                let dot = |k: &[f64]| u.iter().zip(k).map(|(a, b)| a * b).sum::<f64>();
                assert!((dot(&keys[i]) - 1.0).abs() < 1e-3, "{name} record {i}: uᵀk = {}", dot(&keys[i]));
                for (j, k) in keys.iter().enumerate().filter(|(j, _)| *j != i) {
                    assert!(dot(k).abs() < 1e-3, "{name} record {i}: uᵀk_{j} = {}", dot(k));
                }
            }
        }
        // A batch holding one edit twice has no exact joint form: it is edited one record
        // after another, whose directions do not spare each other's keys. The hard projection
        // then makes no further attempt (its rollback would drop the batch's directions);
        // ROME lands with its own rule.
        let twice = [recs[0].clone(), recs[0].clone()];
        let mut lm = load(&fx.dir.path().join("tiny"));
        let mut editor = Editor::new(method, on.clone(), fx.templates.clone(), &fx.stats).unwrap();
        let out = editor.edit_batch(&mut lm.model, &lm.tok, &twice).unwrap();
        let attempts: Vec<usize> = out.iter().map(|(o, _)| o.attempts).collect();
        if name == "rome" {
            assert!(attempts.iter().all(|&a| a == 3), "{name}: {attempts:?}");
        } else {
            assert_eq!(attempts, vec![1, 1], "{name}");
        }
        // The subspace is the joint update's, bit for bit.
        if let (Some(a), Some(b)) = (plain.subspace(1), landed.subspace(1)) {
            assert!(a.basis.rows() == b.basis.rows() && a.energy == b.energy, "{name}: subspace changed");
        } else {
            assert_eq!(name, "rome");
        }
    }
}

#[test]
fn landing_off_is_the_single_update() {
    let method = Method::named("oedit-soft").unwrap();
    let off = hparams(|_| {});
    let one = hparams(|h| h.landing = landing(1, 5.0, 10.0));
    let fx = Fx::new(method, &off);
    let recs = records(3);
    let (_, a, lm_a) = fx.edit_all(method, &off, &recs);
    let (_, b, lm_b) = fx.edit_all(method, &one, &recs);
    for ((oa, fa), (ob, fb)) in a.iter().zip(&b) {
        assert_eq!((oa.attempts, ob.attempts), (1, 1));
        assert!(fa.iter().zip(fb).all(|(x, y)| x.r == y.r && x.u == y.u));
    }
    let w = |lm: &LoadedModel| -> Vec<f32> {
        lm.model.down_proj(1).to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    assert!(w(&lm_a) == w(&lm_b));
}

#[test]
fn a_run_of_multi_attempt_edits_resumes_to_the_same_bytes() {
    let method = Method::named("oedit-soft").unwrap();
    let lambda = weight_for_share(method, 0.03);
    let tmp = TempDir::new().unwrap();
    let model = tiny_model(&tmp.path().join("model"), TinyOpts::default());
    let mut hp = tiny_hparams();
    hp["oedit_soft"] = serde_json::json!({ "lambda": lambda });
    hp["v_steps"] = serde_json::json!(40);
    hp["clamp_norm_factor"] = serde_json::json!(20.0);
    hp["landing"] = serde_json::json!({ "max_attempts": 4, "min_margin": 0.0, "max_gain": 100.0 });
    let hparams = write_json(&tmp.path().join("hparams.json"), &hp);
    // The losing edits twice: two batches of three with --batch-size 3.
    let lines: Vec<String> = some_records(&[LOSING, LOSING].concat())
        .iter()
        .map(|r| {
            let v = serde_json::json!({ "prompt": r.prompt, "subject": r.subject, "target": r.target_new,
                "ground_truth": r.ground_truth });
            v.to_string()
        })
        .collect();
    let edits = write_lines(&tmp.path().join("edits.jsonl"), &lines);
    let cache = tmp.path().join("cache");
    for batch in ["1", "3"] {
        let cmd = |dir: &std::path::Path, limit: Option<usize>| {
            let mut c = edit_cmd(&model, &hparams, &edits, dir, &cache);
            c.args(["--method", "oedit-soft", "--batch-size", batch]);
            if let Some(l) = limit {
                c.args(["--limit", &l.to_string()]);
            }
            c
        };
        let reference = tmp.path().join(format!("reference-{batch}"));
        assert_ok(&run(cmd(&reference, None)));
        let split = tmp.path().join(format!("split-{batch}"));
        assert_ok(&run(cmd(&split, Some(3))));
        let o = run(cmd(&split, None));
        assert_ok(&o);
        assert_eq!(edit_summary(&o)["resumed_from"], 3);

        let log = log_without_timings(&reference);
        assert_eq!(log.len(), 6);
        // The first edit takes several attempts (in a batch: after the joint update), and the
        // resumed session starts after the edit or batch that made them.
        assert!(log[0]["attempts"].as_u64().unwrap() > 1, "batch size {batch}: {:?}", log[0]);
        // (At 3% per update the tiny model's edits pull hard on each other: the repeats of the
        // second half, and in a batch the records' attempts, unland others, and some do not
        // land within the bound. Resume must replay all of it alike.)
        if batch == "1" {
            assert!(log[..3].iter().all(|e| e["target_wins"] == true), "{log:?}");
        }
        assert_eq!(log_without_timings(&split), log);
        assert!(update_files(&split) == update_files(&reference), "batch size {batch}: updates differ");
        let ea = export_run(&reference, &tmp.path().join(format!("export-reference-{batch}")));
        let eb = export_run(&split, &tmp.path().join(format!("export-split-{batch}")));
        assert!(
            std::fs::read(ea.join("model.safetensors")).unwrap()
                == std::fs::read(eb.join("model.safetensors")).unwrap(),
            "batch size {batch}: exported weights differ"
        );
    }
}
