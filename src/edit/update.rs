//! Closed-form weight updates: ROME's rank-one update and O-Edit's projected rank-one update.

use anyhow::{bail, Result};

use super::subspace::Subspace;
use crate::linalg::{dot, Cholesky, Mat};
use crate::stats::KeyStats;

/// The factored preconditioner: Cholesky of C + λ·mean(diag C)·I.
pub struct Preconditioner {
    chol: Cholesky,
}

impl Preconditioner {
    /// Factors the regularised second moment.
    pub fn new(stats: &KeyStats, regularization: f64) -> Result<Self> {
        let f = stats.dim;
        let mut c = Mat::from_vec(f, f, stats.second_moment.clone());
        let mean_diag = (0..f).map(|i| c.get(i, i)).sum::<f64>() / f as f64;
        c.add_diagonal(regularization * mean_diag.max(1e-12));
        let chol = Cholesky::new(&c)
            .map_err(|e| anyhow::anyhow!("key statistics are not positive definite: {e}"))?;
        Ok(Self { chol })
    }

    /// C⁻¹ x.
    pub fn solve(&self, x: &[f64]) -> Vec<f64> {
        self.chol.solve(x)
    }
}

/// A rank-one update ΔW = r uᵀ with diagnostics.
#[derive(Debug, Clone)]
pub struct RankOne {
    pub r: Vec<f64>,
    pub u: Vec<f64>,
    /// k*ᵀ P C⁻¹ k* / k*ᵀ C⁻¹ k*: how much of the key's C⁻¹ direction survives the projection.
    pub retained: f64,
}

impl RankOne {
    /// Frobenius norm of r uᵀ.
    pub fn norm(&self) -> f64 {
        (dot(&self.r, &self.r) * dot(&self.u, &self.u)).sqrt()
    }
}

/// Projected rank-one update: ũ = P C⁻¹k* / (k*ᵀ P C⁻¹ k*), so that ΔW k* = r and ΔW b = 0
/// for every stored direction b. With an empty subspace this is ROME's update.
pub fn projected_rank_one(
    pre: &Preconditioner,
    subspace: Option<&Subspace>,
    k_star: &[f64],
    r: &[f64],
) -> Result<RankOne> {
    let z = pre.solve(k_star);
    let full = dot(k_star, &z);
    if !(full.is_finite() && full > 0.0) {
        bail!("k*ᵀ C⁻¹ k* is not positive ({full}); the key statistics are degenerate");
    }
    let pz = match subspace {
        Some(s) if !s.is_empty() => s.basis.project_out(&z),
        _ => z,
    };
    let denom = dot(k_star, &pz);
    let retained = denom / full;
    if !(denom.is_finite() && retained > 1e-6) {
        bail!("the key lies inside the stored subspace (retained {retained:.2e})");
    }
    let u = pz.iter().map(|x| x / denom).collect();
    Ok(RankOne { r: r.to_vec(), u, retained })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hparams::SubspacePolicy;
    use crate::linalg::dot;

    fn spd_stats(f: usize) -> KeyStats {
        // C = A Aᵀ / f + diag, deterministic.
        let a: Vec<f64> = (0..f * f).map(|i| ((i * 7919 % 104729) as f64 / 104729.0) - 0.5).collect();
        let mut c = vec![0.0; f * f];
        for i in 0..f {
            for j in 0..f {
                c[i * f + j] = (0..f).map(|k| a[i * f + k] * a[j * f + k]).sum::<f64>() / f as f64;
            }
            c[i * f + i] += 0.1;
        }
        KeyStats { layer: 0, tokens: 1, dim: f, second_moment: c }
    }

    fn key(seed: usize, f: usize) -> Vec<f64> {
        (0..f).map(|i| (((i + 1) * (seed + 3) * 2654435761usize) % 1000) as f64 / 500.0 - 1.0).collect()
    }

    #[test]
    fn projected_update_lands_the_edit_and_spares_stored_directions() {
        let f = 24;
        let pre = Preconditioner::new(&spd_stats(f), 0.01).unwrap();
        let mut sub = Subspace::new(f);
        let policy =
            SubspacePolicy { energy: 0.9, max_directions_per_edit: 1, max_fraction: 1.0, tolerance: 0.01 };
        for t in 0..8 {
            let k = key(t, f);
            let r = vec![1.0, -2.0, 0.5];
            let upd = projected_rank_one(&pre, Some(&sub), &k, &r).unwrap();
            // ΔW k = r (uᵀ k = 1).
            assert!((dot(&upd.u, &k) - 1.0).abs() < 1e-9);
            // ΔW b = 0 for every stored direction.
            for b in sub.basis.rows() {
                assert!(dot(&upd.u, b).abs() < 1e-9 * crate::linalg::norm(&upd.u));
            }
            sub.append(&k, &[], &policy);
        }
        // Plain ROME (no subspace) does not spare them.
        let k = key(99, f);
        let rome = projected_rank_one(&pre, None, &k, &[1.0]).unwrap();
        let worst = sub.basis.rows().iter().map(|b| dot(&rome.u, b).abs()).fold(0.0, f64::max);
        assert!(worst > 1e-3);
    }
}
