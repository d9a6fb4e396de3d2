//! MEMIT with a batch of one: the change v\* − v at the last layer is spread over several
//! layers, each solving (λC + k kᵀ) Δᵀ = k residᵀ for its share of the remaining residual.

use std::collections::HashMap;

use anyhow::{bail, Result};

use super::{stats_of, EditContext, MethodSpec, RuleReport, UpdateRule};
use crate::edit::subspace::Subspace;
use crate::edit::target::subject_state;
use crate::edit::update::{Preconditioner, RankOne};
use crate::edit::AppliedUpdate;
use crate::hparams::Hparams;
use crate::linalg::dot;
use crate::stats::KeyStats;

/// Registry entry.
pub const SPEC: MethodSpec = MethodSpec {
    name: "memit",
    about: "MEMIT, batch of one: the residual spread over memit.layers",
    hparam_sections: &["memit"],
    layers: Hparams::memit_layers,
    build,
};

/// MEMIT's state: the factored key statistics of each edited layer.
pub struct Memit {
    layers: Vec<(usize, Preconditioner)>,
    /// λ, the weight of the preserved keys' statistics (`memit.mom2_weight`).
    lambda: f64,
}

fn build(hp: &Hparams, stats: &[KeyStats]) -> Result<Box<dyn UpdateRule>> {
    let layers = hp
        .memit_layers()
        .into_iter()
        .map(|l| Ok((l, Preconditioner::new(stats_of(stats, l)?, hp.cov_regularization)?)))
        .collect::<Result<_>>()?;
    Ok(Box::new(Memit { layers, lambda: hp.memit.mom2_weight }))
}

/// One layer's update for key `k`: u = C⁻¹k / (λ + kᵀC⁻¹k), so that ΔW = resid uᵀ solves
/// (λC + k kᵀ) Δᵀ = k residᵀ (Sherman–Morrison for a batch of one).
pub fn memit_rank_one(pre: &Preconditioner, k: &[f64], resid: &[f64], lambda: f64) -> Result<RankOne> {
    let z = pre.solve(k);
    let denom = lambda + dot(k, &z);
    if !(denom.is_finite() && denom > 0.0) {
        bail!("MEMIT solve is degenerate (λ + kᵀC⁻¹k = {denom})");
    }
    let u = z.iter().map(|x| x / denom).collect::<Vec<_>>();
    Ok(RankOne { r: resid.to_vec(), retained: dot(&u, k), u })
}

impl UpdateRule for Memit {
    fn edit(&mut self, ctx: &mut EditContext<'_>) -> Result<RuleReport> {
        let delta: Vec<f64> = ctx.kv.v_star.iter().zip(&ctx.kv.v_orig).map(|(a, b)| a - b).collect();
        let mut z_star: Option<Vec<f64>> = None;
        let n = self.layers.len();
        for (i, (l, pre)) in self.layers.iter().enumerate() {
            // Each layer sees the hidden state the updates of the layers below it left.
            let (k, z) = subject_state(ctx.model(), ctx.prompts, *l, ctx.target_layer)?;
            let z_star = z_star.get_or_insert_with(|| z.iter().zip(&delta).map(|(a, b)| a + b).collect());
            let remaining = (n - i) as f64;
            let resid: Vec<f64> = z_star.iter().zip(&z).map(|(a, b)| (a - b) / remaining).collect();
            let upd = memit_rank_one(pre, &k, &resid, self.lambda)?;
            ctx.apply(*l, &upd, &k)?;
        }
        Ok(RuleReport::default())
    }

    fn restore(&mut self, _: &HashMap<usize, Subspace>, _: &[AppliedUpdate]) -> Result<()> {
        Ok(())
    }
}
