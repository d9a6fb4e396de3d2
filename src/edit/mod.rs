//! One edit, end to end: prompts → k*, v* → the method's update rule ([`methods`]) → applied to
//! the live weights. The sequential run and its checkpoints live in
//! [`crate::run`] and [`crate::session`].

pub mod batch;
pub mod batch_value;
pub mod landing;
pub mod methods;
pub mod prompts;
pub mod subspace;
pub mod target;
pub mod templates;
pub mod update;

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::data::EditRecord;
use crate::hparams::Hparams;
use crate::model::Llama;
use crate::stats::KeyStats;
use crate::tokenizer::Tok;
pub use methods::Method;
use methods::{BatchContext, EditContext, UpdateRule};
use subspace::{AppendReport, Subspace};

/// Adds ΔW = r uᵀ to the down-projection of `layer` in f32; the layer keeps the f32 sum as its
/// master weight whatever the model's dtype (see [`Llama::set_down_proj`]), so updates are never
/// rounded to bf16/f16. The same function is used live and when a run is replayed on resume, so
/// both give identical bytes.
pub fn apply_rank_one(model: &mut Llama, layer: usize, r: &[f32], u: &[f32]) -> Result<()> {
    let w = model.down_proj(layer);
    let dev = w.device().clone();
    let dw =
        Tensor::from_slice(r, (r.len(), 1), &dev)?.matmul(&Tensor::from_slice(u, (1, u.len()), &dev)?)?;
    let new = (w.to_dtype(DType::F32)? + dw)?;
    model.set_down_proj(layer, new)?;
    Ok(())
}

/// What one edit did (the per-edit fields of log.jsonl).
#[derive(Debug, Clone, Serialize)]
pub struct EditOutcome {
    pub steps: usize,
    pub loss_first: f64,
    pub loss_last: f64,
    pub basis_size: usize,
    pub update_norm: f64,
    pub retained: f64,
    pub p_target_before: f64,
    pub p_target_after: f64,
    /// Whether target_new now beats ground_truth (mean NLL), or is the greedy answer when the
    /// record has no ground truth.
    pub target_wins: bool,
    /// mean NLL(ground_truth) − mean NLL(target_new) on the edit prompt after the edit (None
    /// without a ground truth).
    pub margin: Option<f64>,
    /// Updates made for this edit: 1, plus the further attempts of closed-loop landing.
    pub attempts: usize,
    /// Every attempt, the first included, when there was more than one (else empty).
    pub landing: Vec<landing::AttemptLog>,
    pub subspace: AppendReport,
    pub key_seconds: f64,
    pub value_seconds: f64,
    pub update_seconds: f64,
    /// The shapes and passes of the v\* optimisation (for a batch: of its stack).
    pub value_shape: target::StepShape,
    /// For a batch: the v\* stack the record was optimised in (records of one stack share
    /// `value_shape`, and `value_seconds` but for a record's own landing attempts).
    pub value_stack: usize,
}

impl EditOutcome {
    /// The report of an edit made by one update: v\* from `kv`, the rule's `report`, a change of
    /// norm `update_norm`, p(target) `p_before` before it and `check` after; `basis_size` 0 (the
    /// caller sets it).
    fn of_update(
        kv: &target::KeyValue,
        report: &methods::RuleReport,
        update_norm: f64,
        p_before: f64,
        check: &landing::Check,
        update_seconds: f64,
    ) -> Self {
        Self {
            steps: kv.steps,
            loss_first: kv.loss_first,
            loss_last: kv.loss_last,
            basis_size: 0,
            update_norm,
            retained: report.retained,
            p_target_before: p_before,
            p_target_after: check.p_target,
            target_wins: check.wins,
            margin: check.margin,
            attempts: 1,
            landing: Vec::new(),
            subspace: report.subspace,
            key_seconds: kv.key_seconds,
            value_seconds: kv.value_seconds,
            update_seconds,
            value_shape: kv.shape,
            value_stack: kv.stack,
        }
    }

    /// Folds in the further attempts `more` of closed-loop landing after the first update
    /// (logged as `first`); `factors` are all the edit's own factors, the first update's
    /// included. The check fields stay the caller's (the state after everything).
    fn add_attempts(&mut self, first: landing::AttemptLog, more: landing::Landed, factors: &[AppliedUpdate]) {
        self.landing = std::iter::once(first).chain(more.attempts).collect();
        self.attempts = self.landing.len();
        self.update_norm = landing::total_norm(factors);
        self.key_seconds += more.key_seconds;
        self.value_seconds += more.value_seconds;
        self.update_seconds += more.update_seconds;
        if let Some(r) = more.last_report {
            self.subspace = r.subspace;
        }
    }
}

/// One rank-one factor pair applied by an edit, stored in the checkpoint.
#[derive(Debug, Clone)]
pub struct AppliedUpdate {
    pub layer: usize,
    pub r: Vec<f32>,
    pub u: Vec<f32>,
    /// The key the update was computed for (AlphaEdit and soft O-Edit accumulate k kᵀ of past
    /// edits).
    pub key: Vec<f32>,
}

/// Sequential editor: method, hyper-parameters, templates and the method's update rule.
pub struct Editor {
    pub method: Method,
    pub hparams: Hparams,
    pub templates: Vec<String>,
    rule: Box<dyn UpdateRule>,
}

pub(crate) fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

impl Editor {
    /// A fresh editor; `stats` holds the key statistics of every layer the method edits.
    pub fn new(method: Method, hparams: Hparams, templates: Vec<String>, stats: &[KeyStats]) -> Result<Self> {
        let rule = method.build(&hparams, stats)?;
        Ok(Self { method, hparams, templates, rule })
    }

    /// The layers the editor changes.
    pub fn layers(&self) -> Vec<usize> {
        self.method.layers(&self.hparams)
    }

    /// The hyper-parameters of the v\* optimisation: the run's, at the last edited layer (where
    /// the target value is optimised).
    fn value_hparams(&self) -> Result<Hparams> {
        let mut vhp = self.hparams.clone();
        vhp.layer = *self.layers().last().context("no edited layer")?;
        Ok(vhp)
    }

    /// The subspaces the method keeps, per layer (empty for methods without one).
    pub fn subspaces(&self) -> Vec<(usize, &Subspace)> {
        self.rule.subspaces()
    }

    /// The stored subspace of `layer`, if the method keeps one there.
    pub fn subspace(&self, layer: usize) -> Option<&Subspace> {
        self.subspaces().into_iter().find(|(l, _)| *l == layer).map(|(_, s)| s)
    }

    /// Number of stored subspace directions (summed over layers).
    pub fn basis_size(&self) -> usize {
        self.subspaces().iter().map(|(_, s)| s.len()).sum()
    }

    /// Brings the editor to a committed state (checkpointed subspaces and every stored update in
    /// order), as if it had made those edits itself.
    pub fn restore(&mut self, subspaces: &HashMap<usize, Subspace>, updates: &[AppliedUpdate]) -> Result<()> {
        self.rule.restore(subspaces, updates)
    }

    /// Applies one edit to `model`, returning its report and the applied factors.
    pub fn edit(
        &mut self,
        model: &mut Llama,
        tok: &Tok,
        rec: &EditRecord,
    ) -> Result<(EditOutcome, Vec<AppliedUpdate>)> {
        let p_before = landing::check(model, tok, rec)?.p_target;
        let prompts = prompts::build(tok, rec, &self.templates)?;
        let vhp = self.value_hparams()?;
        let target_layer = vhp.layer;
        let kv = target::compute_key_value(model, &prompts, &vhp)?;
        let t = Instant::now();
        let lp = self.hparams.landing.clone();
        let before_edit = if lp.enabled() { landing::snapshot(self.rule.as_ref()) } else { HashMap::new() };
        let mut ctx = EditContext::new(model, &prompts, &kv, target_layer);
        let report = self.rule.edit(&mut ctx)?;
        let (mut applied, update_norm) = ctx.finish();
        let update_seconds = t.elapsed().as_secs_f64();
        let first = landing::check(model, tok, rec)?;
        let attempt = landing::Attempt { prompts: &prompts, value_hparams: &vhp, target_layer, record: rec };
        let step = landing::Step::Rule { rule: self.rule.as_mut(), before_edit: &before_edit };
        let more = landing::land(step, model, tok, &attempt, &lp, first)?;
        let first_log = landing::AttemptLog::new(&kv, 1.0, &report, update_norm, &first);
        let mut outcome =
            EditOutcome::of_update(&kv, &report, update_norm, p_before, &more.check, update_seconds);
        outcome.basis_size = self.basis_size();
        if !more.attempts.is_empty() {
            let mut more = more;
            applied.append(&mut more.applied);
            outcome.add_attempts(first_log, more, &applied);
        }
        Ok((outcome, applied))
    }

    /// Applies a batch of edits to `model`: every record's k\* and v\* computed on the same
    /// weights (the v\* optimisations stacked, see [`batch_value`]), then one joint update in the
    /// method's batch form, then closed-loop landing per record ([`Self::land_batch`]). One
    /// report and the applied factors per record, in order; the further attempts' factors follow
    /// the last record's, in the order they were applied. A batch of one is [`Self::edit`], bit
    /// for bit.
    pub fn edit_batch(
        &mut self,
        model: &mut Llama,
        tok: &Tok,
        recs: &[EditRecord],
    ) -> Result<Vec<(EditOutcome, Vec<AppliedUpdate>)>> {
        if let [rec] = recs {
            return Ok(vec![self.edit(model, tok, rec)?]);
        }
        let before: Vec<f64> = landing::checks(model, tok, recs)?.into_iter().map(|c| c.p_target).collect();
        let prompts = recs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                prompts::build(tok, r, &self.templates).with_context(|| format!("record {i} of the batch"))
            })
            .collect::<Result<Vec<_>>>()?;
        let vhp = self.value_hparams()?;
        let target_layer = vhp.layer;
        let refs: Vec<&prompts::EditPrompts> = prompts.iter().collect();
        let kvs = batch_value::compute_key_values(model, &refs, &vhp)?;
        let t = Instant::now();
        let mut ctx = BatchContext::new(model, &prompts, &kvs, target_layer)?;
        let reports = self.rule.edit_batch(&mut ctx)?;
        let applied = ctx.finish();
        if reports.len() != recs.len() || applied.len() != recs.len() {
            anyhow::bail!("internal error: {} reports for a batch of {}", reports.len(), recs.len());
        }
        let update_seconds = t.elapsed().as_secs_f64();
        let first = landing::checks(model, tok, recs)?;
        let joint: Vec<&[AppliedUpdate]> = applied.iter().map(|(a, _)| a.as_slice()).collect();
        let (more, mut tail) = self.land_batch(model, tok, recs, &prompts, &first, &joint)?;
        let after =
            if more.iter().any(Option::is_some) { landing::checks(model, tok, recs)? } else { first.clone() };
        let basis_size = self.basis_size();
        let mut out = Vec::with_capacity(recs.len());
        for (i, ((kv, (report, (mut applied, update_norm))), landed)) in
            kvs.iter().zip(reports.into_iter().zip(applied)).zip(more).enumerate()
        {
            let mut outcome =
                EditOutcome::of_update(kv, &report, update_norm, before[i], &after[i], update_seconds);
            outcome.basis_size = basis_size;
            if let Some(mut more) = landed.filter(|m| !m.attempts.is_empty()) {
                let first_log = landing::AttemptLog::new(kv, 1.0, &report, update_norm, &first[i]);
                let own: Vec<AppliedUpdate> = applied.iter().cloned().chain(more.applied.drain(..)).collect();
                outcome.add_attempts(first_log, more, &own);
            }
            if i + 1 == recs.len() {
                // The further attempts were applied after the whole joint update, in this order;
                // the checkpoint keeps them after the batch's last record so that a resumed run
                // replays them in the same order (and `eval --at` a batch boundary includes them).
                applied.append(&mut tail);
            }
            out.push((outcome, applied));
        }
        Ok(out)
    }

    /// Closed-loop landing after a batch's joint update (`first`: each record's check after
    /// it; `joint`: each record's factors from it): every record that has not landed gets
    /// further attempts, one record after another, each on the weights its predecessors left
    /// (see [`landing::land`]); a record that the later records' attempts unlanded gets another
    /// turn in a further pass while it has attempts left (at most `landing.max_attempts`
    /// updates per record in all). A rule that lands exactly (ROME, the hard projections)
    /// lands along the record's own joint direction ([`landing::Step::Along`]): its single-edit
    /// update would roll its subspace back to before the edit and disturb the batch's other
    /// keys. The others apply their own rule. Returns each record's attempts (None: it made
    /// none) and all their factors in the order they were applied.
    fn land_batch(
        &mut self,
        model: &mut Llama,
        tok: &Tok,
        recs: &[EditRecord],
        prompts: &[prompts::EditPrompts],
        first: &[landing::Check],
        joint: &[&[AppliedUpdate]],
    ) -> Result<(Vec<Option<landing::Landed>>, Vec<AppliedUpdate>)> {
        let lp = self.hparams.landing.clone();
        let mut out: Vec<Option<landing::Landed>> = recs.iter().map(|_| None).collect();
        let mut order = Vec::new();
        if !lp.enabled() {
            return Ok((out, order));
        }
        let vhp = &self.value_hparams()?;
        let exact = self.rule.lands_exactly();
        let keeps_subspace = !self.rule.subspaces().is_empty();
        let none = HashMap::new();
        let mut used = vec![1; recs.len()];
        let mut moved = false;
        for _pass in 1..lp.max_attempts {
            let mut any = false;
            for (i, rec) in recs.iter().enumerate() {
                if used[i] >= lp.max_attempts {
                    continue;
                }
                // Earlier attempts may have landed (or unlanded) this record.
                let now = if moved { landing::check(model, tok, rec)? } else { first[i] };
                if now.landed(lp.min_margin) {
                    continue;
                }
                let along = if exact { joint_direction(joint, i, vhp.layer) } else { None };
                let step = match along {
                    Some(u) => landing::Step::Along { u },
                    // A rule that keeps a subspace would roll it back, dropping the batch's
                    // other directions: no further attempt for this record.
                    None if keeps_subspace => continue,
                    None => landing::Step::Rule { rule: self.rule.as_mut(), before_edit: &none },
                };
                let attempt = landing::Attempt {
                    prompts: &prompts[i],
                    value_hparams: vhp,
                    target_layer: vhp.layer,
                    record: rec,
                };
                let left =
                    landing::LandingParams { max_attempts: lp.max_attempts - used[i] + 1, ..lp.clone() };
                let landed = landing::land(step, model, tok, &attempt, &left, now)
                    .with_context(|| format!("record {i} of the batch"))?;
                if landed.attempts.is_empty() {
                    continue;
                }
                used[i] += landed.attempts.len();
                (moved, any) = (true, true);
                order.extend(landed.applied.iter().cloned());
                match &mut out[i] {
                    Some(earlier) => earlier.extend(landed),
                    slot => *slot = Some(landed),
                }
            }
            if !any {
                break;
            }
        }
        Ok((out, order))
    }
}

/// Record `i`'s direction at `layer` from a batch's exact joint update (uᵢᵀk_j = δ_ij), or None
/// when the batch was not solved jointly (a rule falls back to one record after another when
/// its joint system is ill-posed, e.g. one subject twice), i.e. when uᵢ does not vanish on the
/// batch's other keys (|uᵢᵀk_j| above 10⁻³ of uᵢᵀkᵢ).
fn joint_direction(joint: &[&[AppliedUpdate]], i: usize, layer: usize) -> Option<Vec<f64>> {
    let at = |j: usize| joint.get(j)?.iter().find(|a| a.layer == layer);
    let own = at(i)?;
    let u: Vec<f64> = own.u.iter().map(|&x| x as f64).collect();
    let on = |key: &[f32]| u.iter().zip(key).map(|(a, &b)| a * b as f64).sum::<f64>();
    let own_share = on(&own.key);
    let joint = (0..joint.len())
        .filter(|&j| j != i)
        .all(|j| at(j).is_some_and(|a| on(&a.key).abs() <= 1e-3 * own_share.abs()));
    (own_share.is_finite() && own_share != 0.0 && joint).then_some(u)
}
