//! ROME, applied sequentially: a rank-one update of one layer, u = C⁻¹k\* / (k\*ᵀC⁻¹k\*), with
//! nothing remembered between edits.

use std::collections::HashMap;

use anyhow::Result;

use super::{single_layer, stats_of, EditContext, MethodSpec, RuleReport, UpdateRule};
use crate::edit::subspace::Subspace;
use crate::edit::update::{projected_rank_one, Preconditioner};
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

    fn restore(&mut self, _: &HashMap<usize, Subspace>, _: &[AppliedUpdate]) -> Result<()> {
        Ok(())
    }
}
