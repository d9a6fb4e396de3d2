//! AlphaEdit (single layer): the update confined to the null space of the preserved keys'
//! statistics, solving (P₀(k kᵀ + Σ past k kᵀ) + αI) x = P₀ k.

use std::collections::HashMap;

use anyhow::{bail, Result};

use super::{single_layer, stats_of, EditContext, MethodSpec, RuleReport, UpdateRule};
use crate::edit::subspace::Subspace;
use crate::edit::update::RankOne;
use crate::edit::{to_f32, AppliedUpdate};
use crate::hparams::Hparams;
use crate::linalg::{dot, sym_eigen, Cholesky, Mat};
use crate::stats::KeyStats;

/// Registry entry.
pub const SPEC: MethodSpec = MethodSpec {
    name: "alphaedit",
    about: "AlphaEdit (one layer): the update confined to the null space of the key statistics",
    hparam_sections: &["alphaedit"],
    layers: single_layer,
    build,
};

/// AlphaEdit's state: the null-space basis of C and the sum of k kᵀ over past edits.
pub struct AlphaEdit {
    layer: usize,
    /// Orthonormal basis (rows) of the null space of the preserved keys' statistics.
    pub null_basis: Vec<Vec<f64>>,
    /// Σ k kᵀ over the keys of earlier edits (row-major f×f).
    pub past: Mat,
    /// The ridge α (`alphaedit.l2`).
    l2: f64,
}

fn build(hp: &Hparams, stats: &[KeyStats]) -> Result<Box<dyn UpdateRule>> {
    let s = stats_of(stats, hp.layer)?;
    let f = s.dim;
    let e = sym_eigen(&Mat::from_vec(f, f, s.second_moment.clone()));
    let below = e.values.iter().filter(|&&v| v < hp.alphaedit.nullspace_threshold).count();
    let n0 = below.max(hp.alphaedit.min_nullspace_dim).min(f);
    // Eigenvalues ascend: the first n0 eigenvectors span the null space.
    let null_basis = (0..n0).map(|j| e.vectors.col(j)).collect();
    Ok(Box::new(AlphaEdit { layer: hp.layer, null_basis, past: Mat::zeros(f, f), l2: hp.alphaedit.l2 }))
}

impl AlphaEdit {
    /// Projects onto the null space: P₀ x.
    pub fn project(&self, x: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        for b in &self.null_basis {
            let c = dot(b, x);
            out.iter_mut().zip(b).for_each(|(o, bi)| *o += c * bi);
        }
        out
    }

    /// Adds k kᵀ (of the f32 key, as stored) to the memory of past edits.
    fn add_past(&mut self, key32: &[f32]) {
        let f = key32.len();
        for i in 0..f {
            let ki = key32[i] as f64;
            let row = &mut self.past.data[i * f..(i + 1) * f];
            row.iter_mut().zip(key32).for_each(|(p, &kj)| *p += ki * kj as f64);
        }
    }

    /// The direction for one key: x = (P₀ M P₀ + αI)⁻¹ P₀ k with M = k kᵀ + Σ past k kᵀ.
    /// (The solution of (P₀M + αI) x = P₀k lies in range(P₀), where this symmetric system is
    /// equivalent.) Then ΔW = r xᵀ, and ΔW k₀ = 0 for every preserved key direction k₀ ⟂ the
    /// null space.
    fn direction(&self, k: &[f64]) -> Result<Vec<f64>> {
        let f = k.len();
        if self.null_basis.is_empty() {
            bail!(
                "AlphaEdit: the null space is empty (raise alphaedit.nullspace_threshold or min_nullspace_dim)"
            );
        }
        // Null-space coordinates: U (n0×f) rows; x = Uᵀ y with (U M Uᵀ + αI) y = U k.
        let u = &self.null_basis;
        let n0 = u.len();
        let mut m = self.past.clone();
        for i in 0..f {
            for j in 0..f {
                m.data[i * f + j] += k[i] * k[j];
            }
        }
        let um = Mat::from_vec(n0, f, u.iter().flatten().copied().collect());
        let mut sys = um.matmul(&m).matmul(&um.transpose());
        sys.add_diagonal(self.l2);
        let chol = Cholesky::new(&sys).map_err(|e| anyhow::anyhow!("AlphaEdit solve failed: {e}"))?;
        let uk: Vec<f64> = u.iter().map(|b| dot(b, k)).collect();
        let y = chol.solve(&uk);
        let mut x = vec![0.0; f];
        for (b, yi) in u.iter().zip(&y) {
            x.iter_mut().zip(b).for_each(|(xi, bi)| *xi += yi * bi);
        }
        Ok(x)
    }
}

impl UpdateRule for AlphaEdit {
    fn edit(&mut self, ctx: &mut EditContext<'_>) -> Result<RuleReport> {
        let r = ctx.residual()?;
        let kv = ctx.kv;
        let k = &kv.k_star;
        let u = self.direction(k)?;
        let upd = RankOne { r, retained: dot(&u, k), u };
        ctx.apply(self.layer, &upd, k)?;
        self.add_past(&to_f32(k));
        Ok(RuleReport { retained: upd.retained, ..RuleReport::default() })
    }

    fn restore(&mut self, _: &HashMap<usize, Subspace>, updates: &[AppliedUpdate]) -> Result<()> {
        let layer = self.layer;
        for u in updates.iter().filter(|u| u.layer == layer) {
            self.add_past(&u.key);
        }
        Ok(())
    }
}
