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

    /// C⁻¹ as a dense matrix (symmetrised).
    pub fn inverse(&self) -> Mat {
        let n = self.chol.dim();
        let mut inv = self.chol.solve_mat(&Mat::identity(n));
        for i in 0..n {
            for j in 0..i {
                let m = 0.5 * (inv.get(i, j) + inv.get(j, i));
                inv.set(i, j, m);
                inv.set(j, i, m);
            }
        }
        inv
    }

    /// `x` in the coordinates where `metric`'s inner product is the plain dot product
    /// (L⁻¹x for [`Metric::Covariance`], with C = L Lᵀ).
    pub fn to_metric(&self, x: &[f64], metric: Metric) -> Vec<f64> {
        match metric {
            Metric::Euclidean => x.to_vec(),
            Metric::Covariance => self.chol.solve_lower(x),
        }
    }

    /// [`Self::to_metric`] of several vectors, with one pass over the factor.
    pub fn to_metric_many(&self, xs: &[Vec<f64>], metric: Metric) -> Vec<Vec<f64>> {
        match metric {
            Metric::Euclidean => xs.to_vec(),
            Metric::Covariance => self.chol.solve_lower_many(xs),
        }
    }
}

/// The inner product in which an O-Edit subspace is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Plain key space: ũ = P C⁻¹k\* / (k\*ᵀ P C⁻¹ k\*) (O-Edit as published).
    Euclidean,
    /// Whitened key space w = L⁻¹k (C = L Lᵀ): ũ = L⁻ᵀ P w\* / ‖P w\*‖². Among all updates that
    /// land the edit exactly and leave every stored key direction unchanged, this one disturbs
    /// the statistics' keys least (it minimises E‖ΔW k‖² = ‖r‖² ũᵀCũ).
    Covariance,
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

/// k\*ᵀC⁻¹k\*, checked to be positive.
fn check_key_energy(full: f64) -> Result<f64> {
    if !(full.is_finite() && full > 0.0) {
        bail!("k*ᵀ C⁻¹ k* is not positive ({full}); the key statistics are degenerate");
    }
    Ok(full)
}

/// `retained` = denom / full, refused when the key lies (almost) inside the stored subspace.
fn checked_retained(denom: f64, full: f64) -> Result<f64> {
    let retained = denom / full;
    if !(denom.is_finite() && retained > 1e-6) {
        bail!("the key lies inside the stored subspace (retained {retained:.2e})");
    }
    Ok(retained)
}

/// A key as the projection maths needs it, computed once per edit (each image is a triangular
/// solve against the f × f Cholesky factor, the costly part of an update at 7B width).
pub struct KeyImage {
    metric: Metric,
    /// The key in key space.
    key: Vec<f64>,
    /// [`Metric::Euclidean`]: C⁻¹k; [`Metric::Covariance`]: the whitened key L⁻¹k.
    image: Vec<f64>,
}

impl KeyImage {
    /// The image of `key` under `metric`'s preconditioning.
    pub fn new(metric: Metric, pre: &Preconditioner, key: &[f64]) -> Self {
        let image = match metric {
            Metric::Euclidean => pre.solve(key),
            Metric::Covariance => pre.chol.solve_lower(key),
        };
        Self { metric, key: key.to_vec(), image }
    }

    /// The images of several keys, with one pass over the factor for all of them.
    pub fn many(metric: Metric, pre: &Preconditioner, keys: &[Vec<f64>]) -> Vec<Self> {
        let images = match metric {
            Metric::Euclidean => pre.chol.solve_many(keys),
            Metric::Covariance => pre.chol.solve_lower_many(keys),
        };
        keys.iter().zip(images).map(|(k, image)| Self { metric, key: k.clone(), image }).collect()
    }

    /// The key in the coordinates its subspace is kept in (see [`Preconditioner::to_metric`]).
    pub fn in_metric(&self) -> &[f64] {
        match self.metric {
            Metric::Euclidean => &self.key,
            Metric::Covariance => &self.image,
        }
    }

    /// kᵀC⁻¹k.
    fn energy(&self) -> f64 {
        match self.metric {
            Metric::Euclidean => dot(&self.key, &self.image),
            Metric::Covariance => dot(&self.image, &self.image),
        }
    }

    /// For each stored direction, how much `retained` would grow if it were dropped, and
    /// `retained` now (see [`retention_gains`]).
    pub fn retention_gains(&self, subspace: &Subspace) -> (Vec<f64>, f64) {
        let rows = subspace.basis.rows();
        let full = self.energy();
        if !(full.is_finite() && full > 0.0) {
            return (vec![0.0; rows.len()], 1.0);
        }
        let gain = |b: &Vec<f64>| match self.metric {
            Metric::Euclidean => dot(b, &self.key) * dot(b, &self.image),
            Metric::Covariance => dot(b, &self.image).powi(2),
        };
        let gains: Vec<f64> = rows.iter().map(|b| gain(b) / full).collect();
        let retained = 1.0 - gains.iter().sum::<f64>();
        (gains, retained)
    }

    /// The projected rank-one update landing residual `r` at this key (see [`rank_one_in`]).
    pub fn rank_one(&self, pre: &Preconditioner, subspace: Option<&Subspace>, r: &[f64]) -> Result<RankOne> {
        let full = check_key_energy(self.energy())?;
        let projected = match subspace {
            Some(s) if !s.is_empty() => s.basis.project_out(&self.image),
            _ => self.image.clone(),
        };
        let (denom, u) = match self.metric {
            // ũ = P C⁻¹k* / (k*ᵀ P C⁻¹ k*)
            Metric::Euclidean => {
                let denom = dot(&self.key, &projected);
                (denom, projected)
            }
            // ũ = L⁻ᵀ P w / ‖P w‖²
            Metric::Covariance => {
                let denom = dot(&projected, &projected);
                (denom, pre.chol.solve_upper_t(&projected))
            }
        };
        let retained = checked_retained(denom, full)?;
        let u = u.iter().map(|x| x / denom).collect();
        Ok(RankOne { r: r.to_vec(), u, retained })
    }
}

/// The projected rank-one update in `metric` (see [`Metric`]); ROME's update when the subspace
/// is empty, in either metric.
pub fn rank_one_in(
    metric: Metric,
    pre: &Preconditioner,
    subspace: Option<&Subspace>,
    k_star: &[f64],
    r: &[f64],
) -> Result<RankOne> {
    KeyImage::new(metric, pre, k_star).rank_one(pre, subspace, r)
}

/// The joint update of a batch in `metric`: for keys k_i (and residuals handled by the caller),
/// directions u_j with u_jᵀk_i = δ_ij (every edit of the batch lands exactly), zero on every
/// stored direction, and of all such the least change in the metric (O-Edit+: the C-minimum-norm
/// solution; O-Edit: P C⁻¹K (KᵀP C⁻¹K)⁻¹, its Euclidean projection). With an empty subspace this
/// is ROME's batch form U = C⁻¹K (KᵀC⁻¹K)⁻¹. `retained` of record j is 1 / ((G⁻¹)_jj · full_j):
/// the share of its key left once the stored subspace and the batch's other keys are taken out
/// (for one key, [`RankOne::retained`]).
pub fn joint_in(
    metric: Metric,
    pre: &Preconditioner,
    subspace: Option<&Subspace>,
    keys: &[Vec<f64>],
) -> Result<(Vec<Vec<f64>>, Vec<f64>)> {
    joint_of(&KeyImage::many(metric, pre, keys), pre, subspace)
}

/// [`joint_in`] for keys whose images are already computed.
pub fn joint_of(
    images: &[KeyImage],
    pre: &Preconditioner,
    subspace: Option<&Subspace>,
) -> Result<(Vec<Vec<f64>>, Vec<f64>)> {
    let project = |x: &[f64]| match subspace {
        Some(s) if !s.is_empty() => s.basis.project_out(x),
        _ => x.to_vec(),
    };
    let full = images.iter().map(|im| check_key_energy(im.energy())).collect::<Result<Vec<_>>>()?;
    let coords: Vec<Vec<f64>> = images.iter().map(|im| im.in_metric().to_vec()).collect();
    let dirs: Vec<Vec<f64>> = images.iter().map(|im| project(&im.image)).collect();
    let joint = super::batch::exact_joint(&coords, &dirs)?;
    let retained = joint.inverse_diagonal.iter().zip(&full).map(|(g, f)| 1.0 / (g * f)).collect();
    let u = match images.first().map(|im| im.metric) {
        Some(Metric::Covariance) => pre.chol.solve_upper_t_many(&joint.u),
        _ => joint.u,
    };
    Ok((u, retained))
}

/// For each stored direction, how much `retained` would grow if it were dropped, and `retained`
/// now (before the projection; see [`RankOne::retained`]). The basis is orthonormal, so the
/// gains add up: retained = 1 − Σ gains.
pub fn retention_gains(
    metric: Metric,
    pre: &Preconditioner,
    subspace: &Subspace,
    k: &[f64],
) -> (Vec<f64>, f64) {
    KeyImage::new(metric, pre, k).retention_gains(subspace)
}

/// Projection in whitened coordinates: w = L⁻¹k\*, ũ = L⁻ᵀ P w / ‖P w‖², so that ΔW k\* = r and
/// ΔW d = 0 for every key direction d whose whitened image L⁻¹d is stored.
pub fn whitened_rank_one(
    pre: &Preconditioner,
    subspace: Option<&Subspace>,
    k_star: &[f64],
    r: &[f64],
) -> Result<RankOne> {
    rank_one_in(Metric::Covariance, pre, subspace, k_star, r)
}

/// Projected rank-one update: ũ = P C⁻¹k* / (k*ᵀ P C⁻¹ k*), so that ΔW k* = r and ΔW b = 0
/// for every stored direction b. With an empty subspace this is ROME's update.
pub fn projected_rank_one(
    pre: &Preconditioner,
    subspace: Option<&Subspace>,
    k_star: &[f64],
    r: &[f64],
) -> Result<RankOne> {
    rank_one_in(Metric::Euclidean, pre, subspace, k_star, r)
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

    /// The default subspace policy without the size cap, with the given conflict floor.
    fn uncapped_policy(min_retained: f64) -> SubspacePolicy {
        SubspacePolicy { max_fraction: 1.0, min_retained, ..SubspacePolicy::default() }
    }

    fn key(seed: usize, f: usize) -> Vec<f64> {
        (0..f).map(|i| (((i + 1) * (seed + 3) * 2654435761usize) % 1000) as f64 / 500.0 - 1.0).collect()
    }

    #[test]
    fn projected_update_lands_the_edit_and_spares_stored_directions() {
        let f = 24;
        let pre = Preconditioner::new(&spd_stats(f), 0.01).unwrap();
        let mut sub = Subspace::new(f);
        let policy = uncapped_policy(1e-6);
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

    #[test]
    fn whitened_update_spares_earlier_keys_with_least_disturbance() {
        let f = 24;
        let stats = spd_stats(f);
        let c = Mat::from_vec(f, f, stats.second_moment.clone());
        let pre = Preconditioner::new(&stats, 0.01).unwrap();
        let mut c_reg = c.clone();
        let mean_diag = (0..f).map(|i| c.get(i, i)).sum::<f64>() / f as f64;
        c_reg.add_diagonal(0.01 * mean_diag);
        let c_norm = |u: &[f64]| dot(u, &c_reg.matvec(u));
        let policy = uncapped_policy(1e-6);
        let (mut white, mut plain) = (Subspace::new(f), Subspace::new(f));
        let mut earlier: Vec<Vec<f64>> = Vec::new();
        for t in 0..8 {
            let k = key(t, f);
            let r = vec![1.0, -2.0];
            let w = whitened_rank_one(&pre, Some(&white), &k, &r).unwrap();
            let e = projected_rank_one(&pre, Some(&plain), &k, &r).unwrap();
            if t == 0 {
                // With nothing stored both are ROME's update.
                for (a, b) in w.u.iter().zip(&e.u) {
                    assert!((a - b).abs() < 1e-9 * crate::linalg::norm(&e.u));
                }
            }
            assert!((dot(&w.u, &k) - 1.0).abs() < 1e-9);
            // Earlier edits' keys (in key space) map to what they mapped to before.
            for kp in &earlier {
                assert!(dot(&w.u, kp).abs() < 1e-9 * crate::linalg::norm(&w.u) * crate::linalg::norm(kp));
            }
            // Least disturbance under the same constraints: never more than the Euclidean form.
            assert!(c_norm(&w.u) <= c_norm(&e.u) * (1.0 + 1e-9), "step {t}");
            white.append(&pre.to_metric(&k, Metric::Covariance), &[], &policy);
            plain.append(&k, &[], &policy);
            earlier.push(k);
        }
        // The whitened update is the C-minimum-norm solution: any feasible perturbation of it
        // (still uᵀk = 1, still ⟂ earlier keys) has a larger C-norm.
        let k = key(50, f);
        let w = whitened_rank_one(&pre, Some(&white), &k, &[1.0]).unwrap();
        let mut all = earlier.clone();
        all.push(k.clone());
        let mut basis = crate::linalg::OrthoBasis::new(f);
        for v in &all {
            assert!(basis.try_push(v, 1e-9));
        }
        let d = basis.project_out(&key(77, f));
        let perturbed: Vec<f64> = w.u.iter().zip(&d).map(|(a, b)| a + 0.01 * b).collect();
        assert!((dot(&perturbed, &k) - 1.0).abs() < 1e-9);
        assert!(c_norm(&perturbed) > c_norm(&w.u));
    }

    #[test]
    fn conflicting_directions_are_released_down_to_the_floor() {
        let f = 24;
        let stats = spd_stats(f);
        let pre = Preconditioner::new(&stats, 0.01).unwrap();
        let policy = uncapped_policy(0.2);
        for metric in [Metric::Euclidean, Metric::Covariance] {
            let mut sub = Subspace::new(f);
            let keys: Vec<Vec<f64>> = (0..6).map(|t| key(t, f)).collect();
            for k in &keys {
                sub.append(&pre.to_metric(k, metric), &[], &policy);
            }
            // A new key almost equal to stored key 3 (the same subject edited again).
            let mut k = keys[3].clone();
            k.iter_mut().zip(key(40, f)).for_each(|(a, b)| *a += 0.01 * b);
            let (gains, retained) = retention_gains(metric, &pre, &sub, &k);
            assert!(retained < 0.01, "{metric:?}: retained {retained}");
            // (Euclidean retained can even be negative: P and C⁻¹ do not commute.)
            if let Ok(direct) = rank_one_in(metric, &pre, Some(&sub), &k, &[1.0]) {
                assert!((direct.retained - retained).abs() < 1e-9, "{metric:?}");
            }
            let released = sub.release_conflicts(&gains, retained, policy.min_retained);
            assert!(released >= 1 && sub.len() == 6 - released, "{metric:?}: released {released}");
            let upd = rank_one_in(metric, &pre, Some(&sub), &k, &[1.0]).unwrap();
            assert!(upd.retained >= policy.min_retained - 1e-9, "{metric:?}: {}", upd.retained);
            assert!((dot(&upd.u, &k) - 1.0).abs() < 1e-9);
            // The edits stored before the conflicting one are still spared exactly; the
            // conflicting edit's direction is the one released.
            let spared = |j: usize| dot(&upd.u, &keys[j]).abs() < 1e-9 * crate::linalg::norm(&upd.u);
            assert!((0..3).all(spared), "{metric:?}");
            assert!(!spared(3), "{metric:?}");
            // Nothing to release when enough is retained.
            let (g, r) = retention_gains(metric, &pre, &sub, &key(77, f));
            assert!(r >= policy.min_retained);
            assert_eq!(sub.release_conflicts(&g, r, policy.min_retained), 0);
        }
    }
}
