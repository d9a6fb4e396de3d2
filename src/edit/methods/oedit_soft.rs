//! Soft O-Edit: the orthogonality made soft in C's metric, u = (λC + Σ past k kᵀ + k kᵀ)⁻¹ k.
//! A direction that earlier edits used is shrunk by the energy they stored there instead of
//! being projected out; λ → 0 gives O-Edit+ (without a floor).

use std::collections::HashMap;

use anyhow::{bail, Result};

use super::{
    add_outer_to_inverse, single_layer, stats_of, BatchContext, EditContext, MethodSpec, RuleReport,
    UpdateRule,
};
use crate::edit::batch::ridge_joint;
use crate::edit::subspace::Subspace;
use crate::edit::update::{Preconditioner, RankOne};
use crate::edit::{to_f32, AppliedUpdate};
use crate::hparams::Hparams;
use crate::linalg::{dot, Mat};
use crate::stats::KeyStats;

/// Registry entry.
pub const SPEC: MethodSpec = MethodSpec {
    name: "oedit-soft",
    about: "soft O-Edit: earlier edits' directions shrunk by their stored energy, not cut out",
    hparam_sections: &["oedit_soft"],
    layers: single_layer,
    build,
};

/// One layer's soft O-Edit solve: A⁻¹ with A = λ·C + Σ k_p k_pᵀ over the keys of earlier
/// edits.
///
/// The update u = (A + k kᵀ)⁻¹ k minimises λ·E‖ΔW k₀‖² over the corpus keys + Σ ‖ΔW k_p‖² +
/// ‖ΔW k − r‖²: it lands the share kᵀA⁻¹k / (1 + kᵀA⁻¹k) of the edit.
pub struct SoftMemory {
    /// A⁻¹ (row-major f×f), kept by Sherman–Morrison as keys are added.
    pub inverse: Mat,
}

impl SoftMemory {
    /// A = λ·C_reg before any edit (C regularised by `cov_regularization`).
    pub fn new(stats: &KeyStats, cov_regularization: f64, lambda: f64) -> Result<Self> {
        let pre = Preconditioner::new(stats, cov_regularization)?;
        let mut inverse = pre.inverse();
        inverse.data.iter_mut().for_each(|x| *x /= lambda);
        Ok(Self { inverse })
    }

    /// u = (A + k kᵀ)⁻¹ k = A⁻¹k / (1 + kᵀA⁻¹k), and the landed share kᵀu.
    pub fn direction(&self, k: &[f64]) -> Result<(Vec<f64>, f64)> {
        let z = self.inverse.matvec(k);
        let q = dot(k, &z);
        if !(q.is_finite() && q > 0.0) {
            bail!("soft O-Edit: kᵀA⁻¹k is not positive ({q}); the key statistics are degenerate");
        }
        let u: Vec<f64> = z.iter().map(|x| x / (1.0 + q)).collect();
        Ok((u, q / (1.0 + q)))
    }

    /// The directions of a batch of keys solved jointly: U = (A + K Kᵀ)⁻¹ K.
    pub fn directions(&self, keys: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
        let z: Vec<Vec<f64>> = keys.iter().map(|k| self.inverse.matvec(k)).collect();
        ridge_joint(keys, &z, 1.0)
    }

    /// A ← A + k kᵀ (of the f32 key, as stored), by Sherman–Morrison on A⁻¹.
    pub fn add_past(&mut self, key32: &[f32]) {
        let k: Vec<f64> = key32.iter().map(|&x| x as f64).collect();
        add_outer_to_inverse(&mut self.inverse, &k);
    }
}

/// Soft O-Edit at one layer: its [`SoftMemory`].
pub struct SoftOedit {
    layer: usize,
    /// The layer's key memory.
    pub memory: SoftMemory,
}

fn build(hp: &Hparams, stats: &[KeyStats]) -> Result<Box<dyn UpdateRule>> {
    let memory = SoftMemory::new(stats_of(stats, hp.layer)?, hp.cov_regularization, hp.oedit_soft.lambda)?;
    Ok(Box::new(SoftOedit { layer: hp.layer, memory }))
}

impl UpdateRule for SoftOedit {
    fn edit(&mut self, ctx: &mut EditContext<'_>) -> Result<RuleReport> {
        let r = ctx.residual()?;
        let kv = ctx.kv;
        let k = &kv.k_star;
        let (u, retained) = self.memory.direction(k)?;
        ctx.apply(self.layer, &RankOne { r, u, retained }, k)?;
        self.memory.add_past(&to_f32(k));
        Ok(RuleReport { retained, ..RuleReport::default() })
    }

    /// The batch, in its regularised joint form: U = (A + K Kᵀ)⁻¹ K, the minimiser of
    /// λ·E‖ΔW k₀‖² + Σ_p ‖ΔW k_p‖² + Σ_i ‖ΔW k_i − r_i‖²; then every key added in order.
    fn edit_batch(&mut self, ctx: &mut BatchContext<'_>) -> Result<Vec<RuleReport>> {
        let keys = ctx.keys();
        let u = self.memory.directions(&keys)?;
        let r = ctx.residuals()?;
        let mut reports = Vec::with_capacity(keys.len());
        for (i, (r, u)) in r.into_iter().zip(u).enumerate() {
            let retained = dot(&u, &keys[i]);
            ctx.apply(i, self.layer, &RankOne { r, u, retained }, &keys[i])?;
            reports.push(RuleReport { retained, ..RuleReport::default() });
        }
        for k in &keys {
            self.memory.add_past(&to_f32(k));
        }
        Ok(reports)
    }

    fn landed_share(&self, k: &[f64]) -> Result<f64> {
        Ok(self.memory.direction(k)?.1)
    }

    fn restore(&mut self, _: &HashMap<usize, Subspace>, updates: &[AppliedUpdate]) -> Result<()> {
        let layer = self.layer;
        for u in updates.iter().filter(|u| u.layer == layer) {
            self.memory.add_past(&u.key);
        }
        Ok(())
    }
}
