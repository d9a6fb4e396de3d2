//! MEMIT: the change v\* − v at the last layer is spread over several layers, each solving
//! (λC + K Kᵀ) Δᵀ = K Residᵀ for its share of the remaining residual: a batch of one per edit
//! with `--batch-size 1`, MEMIT's own batch form with B records (ΔW = Resid Kᵀ (λC + K Kᵀ)⁻¹).
//! The spreading loop is [`Spread`]'s; MEMIT's layer solve keeps no memory of earlier edits.

use anyhow::{bail, Result};

use super::spread::{LayerSolver, Spread};
use super::{stats_of, MethodSpec, UpdateRule};
use crate::edit::batch::ridge_joint;
use crate::edit::update::Preconditioner;
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

/// One layer of MEMIT: its factored key statistics and λ, the weight of the preserved keys'
/// statistics (`memit.mom2_weight`).
pub struct MemitLayer {
    pre: Preconditioner,
    lambda: f64,
}

fn build(hp: &Hparams, stats: &[KeyStats]) -> Result<Box<dyn UpdateRule>> {
    let layers = hp
        .memit_layers()
        .into_iter()
        .map(|l| {
            let pre = Preconditioner::new(stats_of(stats, l)?, hp.cov_regularization)?;
            Ok((l, MemitLayer { pre, lambda: hp.memit.mom2_weight }))
        })
        .collect::<Result<_>>()?;
    Ok(Box::new(Spread::new(layers)))
}

impl LayerSolver for MemitLayer {
    /// U = (λC + K Kᵀ)⁻¹ K; for one key C⁻¹k / (λ + kᵀC⁻¹k), by Sherman–Morrison.
    fn directions(&self, keys: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
        let solved: Vec<Vec<f64>> = keys.iter().map(|k| self.pre.solve(k)).collect();
        if let ([k], [z]) = (keys, &solved[..]) {
            let denom = self.lambda + dot(k, z);
            if !(denom.is_finite() && denom > 0.0) {
                bail!("MEMIT solve is degenerate (λ + kᵀC⁻¹k = {denom})");
            }
            return Ok(vec![z.iter().map(|x| x / denom).collect()]);
        }
        ridge_joint(keys, &solved, self.lambda)
    }

    /// MEMIT keeps no memory of earlier edits.
    fn remember(&mut self, _: &[f32]) {}

    /// MEMIT reports `retained` 1 and lands further attempts unscaled (its presets' λ makes the
    /// target layer's share a poor measure of what the whole spread lands).
    fn reports_share(&self) -> bool {
        false
    }
}
