//! Closed-loop landing: after an edit's update, check that the edit took (target_new beats
//! ground_truth on the edit prompt by at least `landing.min_margin`); when it did not, measure
//! what is still missing on the updated weights and apply the method's rule again, at most
//! `landing.max_attempts` updates per edit. The maths is in docs/method.md ("Landing").
//!
//! Each further attempt
//! 1. re-optimises v\* on the current weights ([`target::compute_key_value`]): k\* is the same
//!    (a single-layer method's key is read before the layer it edits), v_orig is now W k\* with
//!    the earlier attempts in W, so the residual r = v\* − W k\* is exactly what is missing;
//! 2. rolls the rule's subspaces back to where they stood before the edit, so that a hard
//!    projection sees the same stored directions (and releases the same conflicting ones) as the
//!    first attempt: the same projected direction ũ lands r, earlier edits stay protected
//!    exactly, and the edit's own direction is appended once, not once per attempt. Nothing
//!    else is rolled back: the key memory of the soft rules is rebuilt on resume from every
//!    applied update, so it must (and does) count every attempt;
//! 3. scales r by min(1/s, `landing.max_gain`), s the share the rule lands at k\*
//!    ([`UpdateRule::landed_share`]): the soft rules (oedit-soft, alphaedit-single; the multi-layer rules at their target layer) land only part of a
//!    residual by design, and their update direction at a repeated key does not change, so the
//!    scaled step is their own least-disturbance direction landing the whole missing part;
//! 4. applies the rule through [`EditContext::apply`], so every factor of every attempt goes to
//!    the checkpoint and a resumed run replays them all.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::methods::{EditContext, RuleReport, UpdateRule};
use super::prompts::EditPrompts;
use super::subspace::Subspace;
use super::target::{self, KeyValue};
use super::update::RankOne;
use super::AppliedUpdate;
use crate::data::EditRecord;
use crate::hparams::Hparams;
pub use crate::hparams::LandingParams;
use crate::linalg::dot;
use crate::model::Llama;
use crate::scoring::score_answers;
use crate::tokenizer::Tok;

/// Where an edit stands on its edit prompt.
#[derive(Debug, Clone, Copy)]
pub struct Check {
    /// Probability of the whole target_new.
    pub p_target: f64,
    /// target_new has a lower mean NLL than ground_truth (greedy-correct without a ground truth).
    pub wins: bool,
    /// mean NLL(ground_truth) − mean NLL(target_new), nats per token (None without a ground
    /// truth).
    pub margin: Option<f64>,
}

impl Check {
    /// Whether the edit has landed: the target wins, by at least `min_margin` when there is a
    /// ground truth to compare with.
    pub fn landed(&self, min_margin: f64) -> bool {
        self.wins && self.margin.is_none_or(|m| m >= min_margin)
    }
}

/// Scores target_new (and ground_truth) on the record's edit prompt with the model as it stands.
pub fn check(model: &Llama, tok: &Tok, rec: &EditRecord) -> Result<Check> {
    Ok(checks(model, tok, std::slice::from_ref(rec))?.remove(0))
}

/// [`check`] of every record, scored together (one packed scoring pass).
pub fn checks(model: &Llama, tok: &Tok, recs: &[EditRecord]) -> Result<Vec<Check>> {
    let mut pairs = Vec::new();
    let mut at = Vec::with_capacity(recs.len());
    for rec in recs {
        at.push(pairs.len());
        pairs.push((rec.prompt.as_str(), rec.target_new.as_str()));
        if let Some(gt) = &rec.ground_truth {
            pairs.push((rec.prompt.as_str(), gt.as_str()));
        }
    }
    let s = score_answers(model, tok, &pairs).context("scoring the edit prompt")?;
    Ok(recs
        .iter()
        .zip(at)
        .map(|(rec, i)| {
            let (wins, margin) = match rec.ground_truth {
                Some(_) => (s[i].mean_nll < s[i + 1].mean_nll, Some(s[i + 1].mean_nll - s[i].mean_nll)),
                None => (s[i].greedy_correct(), None),
            };
            Check { p_target: (-s[i].sum_nll).exp(), wins, margin }
        })
        .collect())
}

/// One attempt as logged (the `landing` list of a log line: every attempt of an edit that took
/// more than one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptLog {
    /// v\* optimisation steps of this attempt.
    pub steps: usize,
    /// v\* loss at its last step.
    pub loss_last: Option<f64>,
    /// The factor the residual was scaled by (1 for rules that land exactly).
    pub gain: f64,
    /// The rule's `retained` for this attempt (see the log field of that name).
    pub retained: Option<f64>,
    /// ‖ΔW‖_F of this attempt.
    pub update_norm: Option<f64>,
    /// Probability of target_new after this attempt.
    pub p_target: Option<f64>,
    /// target_new beats ground_truth after this attempt.
    pub target_wins: bool,
    /// mean NLL(ground_truth) − mean NLL(target_new) after this attempt.
    pub margin: Option<f64>,
}

/// A finite number, or None (JSON has no NaN; written as null).
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

impl AttemptLog {
    /// The attempt that optimised `kv`, scaled its residual by `gain`, made `report` and a change
    /// of norm `update_norm`, and left the edit at `c`.
    pub fn new(kv: &KeyValue, gain: f64, report: &RuleReport, update_norm: f64, c: &Check) -> Self {
        Self {
            steps: kv.steps,
            loss_last: finite(kv.loss_last),
            gain,
            retained: finite(report.retained),
            update_norm: finite(update_norm),
            p_target: finite(c.p_target),
            target_wins: c.wins,
            margin: c.margin.and_then(finite),
        }
    }
}

/// The rule's subspaces as they stand (cloned), to roll later attempts back to; empty for rules
/// without one.
pub fn snapshot(rule: &dyn UpdateRule) -> HashMap<usize, Subspace> {
    rule.subspaces().into_iter().map(|(l, s)| (l, s.clone())).collect()
}

/// Everything one edit's landing loop needs besides the rule.
pub struct Attempt<'a> {
    pub prompts: &'a EditPrompts,
    /// The hyper-parameters v\* is optimised with (layer = the target layer).
    pub value_hparams: &'a Hparams,
    pub target_layer: usize,
    pub record: &'a EditRecord,
}

/// What the further attempts of one edit did.
pub struct Landed {
    /// The factors they applied, in order.
    pub applied: Vec<AppliedUpdate>,
    /// One entry per further attempt.
    pub attempts: Vec<AttemptLog>,
    /// The report of the last attempt (its subspace change is the edit's net change); None
    /// when the attempts went [`Step::Along`] (the subspace is the first update's).
    pub last_report: Option<RuleReport>,
    /// The check after the last attempt.
    pub check: Check,
    pub key_seconds: f64,
    pub value_seconds: f64,
    pub update_seconds: f64,
}

/// How a further attempt lands the residual still missing.
pub enum Step<'r> {
    /// The rule's own update (steps 2–4 of the module documentation): its subspaces rolled back
    /// to `before_edit` first (when it keeps any), its residual scaled by the share it lands.
    Rule { rule: &'r mut dyn UpdateRule, before_edit: &'r HashMap<usize, Subspace> },
    /// ΔW = r uᵀ at the target layer along a fixed direction u with uᵀk\* = 1: a record's own
    /// direction from a batch's exact joint update, which vanishes on the batch's other keys
    /// and on the stored subspace, so the whole residual lands at k\* and nothing the joint
    /// update protected moves. The rule's state does not change (the direction is already in
    /// its subspace).
    Along { u: Vec<f64> },
}

impl Landed {
    /// Appends `later`, further attempts of the same edit made after these.
    pub fn extend(&mut self, later: Landed) {
        self.applied.extend(later.applied);
        self.attempts.extend(later.attempts);
        if later.last_report.is_some() {
            self.last_report = later.last_report;
        }
        self.check = later.check;
        self.key_seconds += later.key_seconds;
        self.value_seconds += later.value_seconds;
        self.update_seconds += later.update_seconds;
    }
}

/// Makes further attempts after the first update, while the edit has not landed and fewer than
/// `params.max_attempts` updates were made (`first` is the check after the first update).
pub fn land(
    mut step: Step<'_>,
    model: &mut Llama,
    tok: &Tok,
    a: &Attempt<'_>,
    params: &LandingParams,
    first: Check,
) -> Result<Landed> {
    let mut out = Landed {
        applied: Vec::new(),
        attempts: Vec::new(),
        last_report: None,
        check: first,
        key_seconds: 0.0,
        value_seconds: 0.0,
        update_seconds: 0.0,
    };
    for n in 2..=params.max_attempts {
        if out.check.landed(params.min_margin) {
            break;
        }
        let mut kv = target::compute_key_value(model, a.prompts, a.value_hparams)
            .with_context(|| format!("landing attempt {n}: v* on the updated weights"))?;
        out.key_seconds += kv.key_seconds;
        out.value_seconds += kv.value_seconds;
        let t = Instant::now();
        let along = matches!(step, Step::Along { .. });
        let (report, gain, applied, norm) = match &mut step {
            Step::Rule { rule, before_edit } => {
                if !before_edit.is_empty() {
                    // Restoring subspaces with no updates sets them and leaves every rule's key
                    // memory as it is (see the module documentation).
                    rule.restore(before_edit, &[])
                        .context("rolling the subspace back for a landing attempt")?;
                }
                let gain = gain(rule.landed_share(&kv.k_star)?, params.max_gain);
                if gain != 1.0 {
                    let r = EditContext::new(model, a.prompts, &kv, a.target_layer).residual()?;
                    // v* − r = W k*; the rule's residual becomes gain · r.
                    kv.v_star = kv.v_star.iter().zip(&r).map(|(v, r)| v - r + gain * r).collect();
                }
                let mut ctx = EditContext::new(model, a.prompts, &kv, a.target_layer);
                let report = rule.edit(&mut ctx).with_context(|| format!("landing attempt {n}"))?;
                let (applied, norm) = ctx.finish();
                (report, gain, applied, norm)
            }
            Step::Along { u } => {
                let mut ctx = EditContext::new(model, a.prompts, &kv, a.target_layer);
                let r = ctx.residual()?;
                let retained = dot(u, &kv.k_star);
                ctx.apply(a.target_layer, &RankOne { r, u: u.clone(), retained }, &kv.k_star)
                    .with_context(|| format!("landing attempt {n}"))?;
                let (applied, norm) = ctx.finish();
                (RuleReport { retained, ..RuleReport::default() }, 1.0, applied, norm)
            }
        };
        out.update_seconds += t.elapsed().as_secs_f64();
        out.applied.extend(applied);
        out.check = check(model, tok, a.record)?;
        out.attempts.push(AttemptLog::new(&kv, gain, &report, norm, &out.check));
        // Along a fixed direction the rule's subspace does not change: the edit's report stays
        // that of its first update.
        out.last_report = (!along).then_some(report);
    }
    Ok(out)
}

/// min(1/share, max_gain), and 1 when the rule lands the whole residual (or reports no usable
/// share).
fn gain(share: f64, max_gain: f64) -> f64 {
    if share.is_finite() && share > 0.0 && share < 1.0 {
        (1.0 / share).min(max_gain).max(1.0)
    } else {
        1.0
    }
}

/// ‖Σ r uᵀ‖_F summed over layers (squared, then the root): the norm of an edit's whole change.
pub fn total_norm(applied: &[AppliedUpdate]) -> f64 {
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>();
    let mut sq = 0.0;
    for (i, a) in applied.iter().enumerate() {
        for b in applied[i..].iter().filter(|b| b.layer == a.layer) {
            let term = dot(&a.r, &b.r) * dot(&a.u, &b.u);
            sq += if std::ptr::eq(a, b) { term } else { 2.0 * term };
        }
    }
    sq.max(0.0).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upd(layer: usize, r: &[f32], u: &[f32]) -> AppliedUpdate {
        AppliedUpdate { layer, r: r.to_vec(), u: u.to_vec(), key: vec![0.0; u.len()] }
    }

    #[test]
    fn total_norm_is_the_frobenius_norm_of_the_summed_change() {
        // Same u: (r1 + r2) uᵀ.
        let a = [upd(1, &[1.0, 2.0], &[3.0, 0.0]), upd(1, &[1.0, -1.0], &[3.0, 0.0])];
        assert!((total_norm(&a) - (2.0f64.powi(2) + 1.0).sqrt() * 3.0).abs() < 1e-12);
        // Different layers add in squares.
        let b = [upd(0, &[1.0], &[1.0]), upd(2, &[2.0], &[1.0])];
        assert!((total_norm(&b) - 5.0f64.sqrt()).abs() < 1e-12);
        // Cancelling updates.
        let c = [upd(1, &[1.0], &[1.0, 1.0]), upd(1, &[-1.0], &[1.0, 1.0])];
        assert!(total_norm(&c) < 1e-12);
    }

    #[test]
    fn gain_lands_the_missing_share_within_its_bound() {
        assert_eq!(gain(1.0, 10.0), 1.0);
        assert_eq!(gain(0.5, 10.0), 2.0);
        assert_eq!(gain(0.01, 10.0), 10.0);
        assert_eq!(gain(0.5, 1.0), 1.0);
        assert_eq!(gain(f64::NAN, 10.0), 1.0);
        assert_eq!(gain(0.0, 10.0), 1.0);
    }

    #[test]
    fn landed_needs_the_margin_when_there_is_a_ground_truth() {
        let c = |wins, margin| Check { p_target: 0.5, wins, margin };
        assert!(c(true, Some(0.3)).landed(0.2));
        assert!(!c(true, Some(0.1)).landed(0.2));
        assert!(!c(false, Some(-0.1)).landed(0.0));
        assert!(c(true, None).landed(5.0));
        assert!(!c(false, None).landed(0.0));
    }
}
