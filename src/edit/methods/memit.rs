//! MEMIT: the change v\* − v at the last layer is spread over several layers, each solving
//! (λC + K Kᵀ) Δᵀ = K Residᵀ for its share of the remaining residual: a batch of one per edit
//! with `--batch-size 1`, MEMIT's own batch form with B records (ΔW = Resid Kᵀ (λC + K Kᵀ)⁻¹).

use std::collections::HashMap;

use anyhow::{bail, Result};

use super::{stats_of, BatchContext, EditContext, MethodSpec, RuleReport, UpdateRule};
use crate::edit::batch::ridge_joint;
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
    about: "MEMIT: the residual spread over memit.layers (its batch form with --batch-size)",
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

    fn edit_batch(&mut self, ctx: &mut BatchContext<'_>) -> Result<Vec<RuleReport>> {
        let n = ctx.len();
        let delta: Vec<Vec<f64>> = (0..n)
            .map(|i| ctx.kv(i).v_star.iter().zip(&ctx.kv(i).v_orig).map(|(a, b)| a - b).collect())
            .collect();
        let mut z_star: Option<Vec<Vec<f64>>> = None;
        let layers = self.layers.len();
        for (li, (l, pre)) in self.layers.iter().enumerate() {
            // Each layer sees the hidden states the updates of the layers below it left.
            let states = (0..n)
                .map(|i| subject_state(ctx.model(), ctx.prompts(i), *l, ctx.target_layer))
                .collect::<Result<Vec<_>>>()?;
            let z_star = z_star.get_or_insert_with(|| {
                states
                    .iter()
                    .zip(&delta)
                    .map(|((_, z), d)| z.iter().zip(d).map(|(a, b)| a + b).collect())
                    .collect()
            });
            let remaining = (layers - li) as f64;
            let keys: Vec<Vec<f64>> = states.iter().map(|(k, _)| k.clone()).collect();
            let solved: Vec<Vec<f64>> = keys.iter().map(|k| pre.solve(k)).collect();
            let u = ridge_joint(&keys, &solved, self.lambda)?;
            for (i, (u, (k, z))) in u.into_iter().zip(&states).enumerate() {
                let resid: Vec<f64> = z_star[i].iter().zip(z).map(|(a, b)| (a - b) / remaining).collect();
                let retained = dot(&u, k);
                ctx.apply(i, *l, &RankOne { r: resid, u, retained }, k)?;
            }
        }
        Ok(vec![RuleReport::default(); n])
    }

    fn restore(&mut self, _: &HashMap<usize, Subspace>, _: &[AppliedUpdate]) -> Result<()> {
        Ok(())
    }
}
