//! ROME, applied sequentially: a rank-one update of one layer, u = C⁻¹k\* / (k\*ᵀC⁻¹k\*), with
//! nothing remembered between edits. A batch is solved as ROME's least-squares form at one layer
//! with C and no ridge: U = C⁻¹K (KᵀC⁻¹K)⁻¹, every edit of the batch landing exactly with the
//! least change over the corpus keys (one edit: ROME's update).

use std::collections::HashMap;

use anyhow::Result;

use super::{single_layer, stats_of, BatchContext, EditContext, MethodSpec, RuleReport, UpdateRule};
use crate::edit::subspace::Subspace;
use crate::edit::update::{joint_in, projected_rank_one, Metric, Preconditioner, RankOne};
use crate::edit::AppliedUpdate;
use crate::hparams::Hparams;
use crate::stats::KeyStats;

/// Registry entry.
pub const SPEC: MethodSpec = MethodSpec {
    name: "rome",
    about: "plain sequential ROME: rank-one update of one layer, no projection",
    hparam_sections: &[],
    layers: single_layer,
    build,
};

/// Below this share of a key left once the batch's other keys are taken out (the joint
/// `retained`), a ROME batch is applied one edit after another instead of jointly: the joint
/// update's size grows as 1/retained (the presets' O-Edit conflict floor, `subspace.min_retained`).
pub const MIN_JOINT_RETAINED: f64 = 0.1;

/// ROME's state: the factored key statistics of its layer.
pub struct Rome {
    layer: usize,
    pre: Preconditioner,
}

fn build(hp: &Hparams, stats: &[KeyStats]) -> Result<Box<dyn UpdateRule>> {
    let pre = Preconditioner::new(stats_of(stats, hp.layer)?, hp.cov_regularization)?;
    Ok(Box::new(Rome { layer: hp.layer, pre }))
}

impl UpdateRule for Rome {
    fn edit(&mut self, ctx: &mut EditContext<'_>) -> Result<RuleReport> {
        let r = ctx.residual()?;
        let kv = ctx.kv;
        let k = &kv.k_star;
        let upd = projected_rank_one(&self.pre, None, k, &r)?;
        ctx.apply(self.layer, &upd, k)?;
        Ok(RuleReport { retained: upd.retained, ..RuleReport::default() })
    }

    fn edit_batch(&mut self, ctx: &mut BatchContext<'_>) -> Result<Vec<RuleReport>> {
        let keys = ctx.keys();
        let joint = joint_in(Metric::Euclidean, &self.pre, None, &keys)
            .ok()
            .filter(|(_, retained)| retained.iter().all(|&x| x.is_finite() && x >= MIN_JOINT_RETAINED));
        let Some((u, retained)) = joint else {
            // Keys of the batch (almost) parallel, e.g. the same subject twice: no exact joint
            // update of sensible size exists; edit them one after another as ROME does.
            return ctx.edit_sequentially(self);
        };
        let r = ctx.residuals()?;
        for (i, ((r, u), k)) in r.into_iter().zip(u).zip(&keys).enumerate() {
            ctx.apply(i, self.layer, &RankOne { r, u, retained: retained[i] }, k)?;
        }
        Ok(retained.into_iter().map(|retained| RuleReport { retained, ..RuleReport::default() }).collect())
    }

    fn restore(&mut self, _: &HashMap<usize, Subspace>, _: &[AppliedUpdate]) -> Result<()> {
        Ok(())
    }

    fn lands_exactly(&self) -> bool {
        true
    }
}
