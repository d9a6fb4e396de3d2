//! AlphaEdit at one layer (`alphaedit-single`): the update confined to the null space of the
//! preserved keys' statistics, solving (P₀(k kᵀ + Σ past k kᵀ) + αI) x = P₀ k incrementally in
//! null-space coordinates. [`NullSpaceMemory`] is that solve for one layer; the faithful,
//! multi-layer AlphaEdit (`alphaedit`, [`super::spread`]) runs one per layer.

use std::collections::HashMap;

use anyhow::{bail, Result};

use super::{
    add_outer_to_inverse, single_layer, stats_of, BatchContext, EditContext, MethodSpec, RuleReport,
    UpdateRule,
};
use crate::edit::batch::ridge_joint;
use crate::edit::subspace::Subspace;
use crate::edit::update::RankOne;
use crate::edit::{to_f32, AppliedUpdate};
use crate::hparams::{AlphaEditParams, Hparams};
use crate::linalg::{dot, sym_eigen, Mat};
use crate::stats::KeyStats;

/// Registry entry.
pub const SPEC: MethodSpec = MethodSpec {
    name: "alphaedit-single",
    about: "AlphaEdit at one layer: the update confined to the null space of the key statistics",
    hparam_sections: &["alphaedit"],
    layers: single_layer,
    build,
};

/// One layer's AlphaEdit solve, kept in null-space coordinates: the basis U (n0×f) of the null
/// space of the key statistics, and A⁻¹ with A = αI + Σ (U k_p)(U k_p)ᵀ over the keys of
/// earlier edits.
///
/// Per edit this costs O(n0·f + n0²) time and no f×f memory: the normal equation
/// (U M Uᵀ + αI) y = U k with M = k kᵀ + Σ past k kᵀ is (A + (Uk)(Uk)ᵀ) y = Uk, solved by
/// Sherman–Morrison on A⁻¹, which is itself grown the same way after each edit.
pub struct NullSpaceMemory {
    /// Orthonormal basis (rows, n0×f) of the null space of the preserved keys' statistics.
    pub null_basis: Mat,
    /// A⁻¹ (n0×n0), A = αI + Σ (U k_p)(U k_p)ᵀ.
    pub inverse: Mat,
}

impl NullSpaceMemory {
    /// The null space of `stats`' second moment (eigenvalues below `p.nullspace_threshold`, at
    /// least `p.min_nullspace_dim` of them) and A = αI.
    pub fn new(stats: &KeyStats, p: &AlphaEditParams) -> Result<Self> {
        let f = stats.dim;
        let e = sym_eigen(&Mat::from_vec(f, f, stats.second_moment.clone()));
        let below = e.values.iter().filter(|&&v| v < p.nullspace_threshold).count();
        let n0 = below.max(p.min_nullspace_dim).min(f);
        if n0 == 0 {
            bail!(
                "AlphaEdit: the null space of layer {} is empty (raise alphaedit.nullspace_threshold \
                 or min_nullspace_dim)",
                stats.layer
            );
        }
        // Eigenvalues ascend: the first n0 eigenvectors span the null space.
        let null_basis = Mat::from_vec(n0, f, (0..n0).flat_map(|j| e.vectors.col(j)).collect());
        let mut inverse = Mat::identity(n0);
        inverse.data.iter_mut().for_each(|x| *x /= p.l2);
        Ok(Self { null_basis, inverse })
    }

    /// A ← A + (U k)(U k)ᵀ for an earlier edit's key (f32, as stored), by Sherman–Morrison.
    pub fn add_past(&mut self, key32: &[f32]) {
        let k: Vec<f64> = key32.iter().map(|&x| x as f64).collect();
        add_outer_to_inverse(&mut self.inverse, &self.null_basis.matvec(&k));
    }

    /// The direction for one key: x = Uᵀ (U M Uᵀ + αI)⁻¹ U k with M = k kᵀ + Σ past k kᵀ, i.e.
    /// the solution of (P₀M + αI) x = P₀k (it lies in range(P₀), where the two systems agree).
    /// Then ΔW = r xᵀ, and ΔW k₀ = 0 for every preserved key direction k₀ ⟂ the null space.
    pub fn direction(&self, k: &[f64]) -> Result<Vec<f64>> {
        let y = self.null_basis.matvec(k);
        let z = self.inverse.matvec(&y);
        let q = dot(&y, &z);
        if !(q.is_finite() && q >= 0.0) {
            bail!("AlphaEdit solve failed: (Uk)ᵀA⁻¹(Uk) = {q}");
        }
        let c: Vec<f64> = z.iter().map(|x| x / (1.0 + q)).collect();
        Ok(self.null_basis.matvec_t(&c))
    }

    /// The directions of a batch of keys solved jointly: X = Uᵀ (A + Y Yᵀ)⁻¹ Y with Y = U K,
    /// i.e. (P₀(K Kᵀ + Σ past k kᵀ) + αI) X = P₀ K.
    pub fn directions(&self, keys: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
        let y: Vec<Vec<f64>> = keys.iter().map(|k| self.null_basis.matvec(k)).collect();
        let z: Vec<Vec<f64>> = y.iter().map(|y| self.inverse.matvec(y)).collect();
        Ok(ridge_joint(&y, &z, 1.0)?.iter().map(|c| self.null_basis.matvec_t(c)).collect())
    }
}

/// AlphaEdit at one layer: its [`NullSpaceMemory`].
pub struct AlphaEdit {
    layer: usize,
    /// The layer's null space and key memory.
    pub memory: NullSpaceMemory,
}

fn build(hp: &Hparams, stats: &[KeyStats]) -> Result<Box<dyn UpdateRule>> {
    let memory = NullSpaceMemory::new(stats_of(stats, hp.layer)?, &hp.alphaedit)?;
    Ok(Box::new(AlphaEdit { layer: hp.layer, memory }))
}

impl UpdateRule for AlphaEdit {
    fn edit(&mut self, ctx: &mut EditContext<'_>) -> Result<RuleReport> {
        let r = ctx.residual()?;
        let kv = ctx.kv;
        let k = &kv.k_star;
        let u = self.memory.direction(k)?;
        let upd = RankOne { r, retained: dot(&u, k), u };
        ctx.apply(self.layer, &upd, k)?;
        self.memory.add_past(&to_f32(k));
        Ok(RuleReport { retained: upd.retained, ..RuleReport::default() })
    }

    /// The batch: (P₀(K Kᵀ + Σ past k kᵀ) + αI) X = P₀ K in null-space coordinates, i.e.
    /// X = Uᵀ (A + Y Yᵀ)⁻¹ Y with Y = U K, then every key added to the memory in order.
    fn edit_batch(&mut self, ctx: &mut BatchContext<'_>) -> Result<Vec<RuleReport>> {
        let keys = ctx.keys();
        let dirs = self.memory.directions(&keys)?;
        let r = ctx.residuals()?;
        let mut reports = Vec::with_capacity(keys.len());
        for (i, (r, u)) in r.into_iter().zip(dirs).enumerate() {
            let upd = RankOne { r, retained: dot(&u, &keys[i]), u };
            ctx.apply(i, self.layer, &upd, &keys[i])?;
            reports.push(RuleReport { retained: upd.retained, ..RuleReport::default() });
        }
        for k in &keys {
            self.memory.add_past(&to_f32(k));
        }
        Ok(reports)
    }

    fn landed_share(&self, k: &[f64]) -> Result<f64> {
        Ok(dot(&self.memory.direction(k)?, k))
    }

    fn restore(&mut self, _: &HashMap<usize, Subspace>, updates: &[AppliedUpdate]) -> Result<()> {
        let layer = self.layer;
        for u in updates.iter().filter(|u| u.layer == layer) {
            self.memory.add_past(&u.key);
        }
        Ok(())
    }
}
