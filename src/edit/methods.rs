//! Per-layer state and closed-form updates of each method (ROME, MEMIT, AlphaEdit, O-Edit,
//! O-Edit+, soft O-Edit). The shared key/value machinery is in [`super::target`].

use anyhow::{bail, Result};

use super::subspace::{AppendReport, Subspace};
use super::update::{projected_rank_one, rank_one_in, retention_gains, Metric, Preconditioner, RankOne};
use super::Method;
use crate::hparams::Hparams;
use crate::linalg::{dot, sym_eigen, Cholesky, Mat};
use crate::stats::KeyStats;

/// AlphaEdit's state: the null-space projector P₀ of C and the sum of k kᵀ over past edits.
pub struct AlphaState {
    /// Orthonormal basis (rows) of the null space of the preserved keys' statistics.
    pub null_basis: Vec<Vec<f64>>,
    /// Σ k kᵀ over the keys of earlier edits (row-major f×f).
    pub past: Mat,
}

/// Soft O-Edit's state: A⁻¹ with A = λ·C + Σ k_p k_pᵀ over the keys of earlier edits.
///
/// The update u = (A + k kᵀ)⁻¹ k minimises λ·E‖ΔW k₀‖² over the corpus keys + Σ ‖ΔW k_p‖² +
/// ‖ΔW k − r‖²: it lands the share kᵀA⁻¹k / (1 + kᵀA⁻¹k) of the edit, and a direction that
/// earlier edits used is shrunk by the energy they stored there instead of being projected out.
/// As λ → 0 it becomes oedit-plus without a floor (earlier keys kept exactly, the edit landed).
pub struct SoftState {
    /// A⁻¹ (row-major f×f), kept by Sherman–Morrison as keys are added.
    pub inverse: Mat,
}

impl SoftState {
    /// A⁻¹ = (λ·C_reg)⁻¹ before any edit.
    fn new(pre: &Preconditioner, lambda: f64) -> Self {
        let mut inverse = pre.inverse();
        inverse.data.iter_mut().for_each(|x| *x /= lambda);
        Self { inverse }
    }

    /// u = (A + k kᵀ)⁻¹ k = A⁻¹k / (1 + kᵀA⁻¹k), and the landed share kᵀu.
    fn direction(&self, k: &[f64]) -> Result<(Vec<f64>, f64)> {
        let z = self.inverse.matvec(k);
        let q = dot(k, &z);
        if !(q.is_finite() && q > 0.0) {
            bail!("soft O-Edit: kᵀA⁻¹k is not positive ({q}); the key statistics are degenerate");
        }
        let u: Vec<f64> = z.iter().map(|x| x / (1.0 + q)).collect();
        Ok((u, q / (1.0 + q)))
    }

    /// A ← A + k kᵀ (of the f32 key, as stored), by Sherman–Morrison on A⁻¹.
    fn add_past(&mut self, key32: &[f32]) {
        let k: Vec<f64> = key32.iter().map(|&x| x as f64).collect();
        let z = self.inverse.matvec(&k);
        let s = 1.0 / (1.0 + dot(&k, &z));
        let f = k.len();
        for (i, &zi) in z.iter().enumerate() {
            let row = &mut self.inverse.data[i * f..(i + 1) * f];
            row.iter_mut().zip(&z).for_each(|(a, &zj)| *a -= s * zi * zj);
        }
    }
}

/// The state of one edited layer.
pub struct LayerState {
    /// Cholesky of the regularised C.
    pub pre: Preconditioner,
    /// O-Edit subspace of earlier edits (and, for O-Edit+, of C's core directions).
    pub subspace: Subspace,
    /// AlphaEdit state, for that method only.
    pub alpha: Option<AlphaState>,
    /// Soft O-Edit state, for that method only.
    pub soft: Option<SoftState>,
    /// The inner product the subspace is kept in (whitened for O-Edit+).
    pub metric: Metric,
    /// Directions the conflict policy released before the last update.
    pub released: usize,
    /// Directions the last update's saturation fallback compressed away.
    pub compressed: usize,
}

fn eigen_of(stats: &KeyStats) -> crate::linalg::SymEigen {
    sym_eigen(&Mat::from_vec(stats.dim, stats.dim, stats.second_moment.clone()))
}

impl LayerState {
    /// Builds the layer state for `method` from the layer's key statistics.
    pub fn new(method: Method, hp: &Hparams, stats: &KeyStats) -> Result<Self> {
        let f = stats.dim;
        let pre = Preconditioner::new(stats, hp.cov_regularization)?;
        let mut subspace = Subspace::new(f);
        let mut alpha = None;
        let mut soft = None;
        let metric = if method == Method::OeditPlus { Metric::Covariance } else { Metric::Euclidean };
        match method {
            Method::Alphaedit => {
                let e = eigen_of(stats);
                let below = e.values.iter().filter(|&&v| v < hp.alphaedit.nullspace_threshold).count();
                let n0 = below.max(hp.alphaedit.min_nullspace_dim).min(f);
                // Eigenvalues ascend: the first n0 eigenvectors span the null space.
                let null_basis = (0..n0).map(|j| e.vectors.col(j)).collect();
                alpha = Some(AlphaState { null_basis, past: Mat::zeros(f, f) });
            }
            Method::OeditPlus => {
                let e = eigen_of(stats);
                let total: f64 = e.values.iter().map(|v| v.max(0.0)).sum();
                let cap = (hp.oedit_plus.max_core_fraction * f as f64).floor() as usize;
                let mut acc = 0.0;
                for j in (0..f).rev() {
                    if subspace.len() >= cap || acc >= hp.oedit_plus.core_energy * total {
                        break;
                    }
                    acc += e.values[j].max(0.0);
                    subspace.seed(&pre.to_metric(&e.vectors.col(j), metric));
                }
            }
            Method::OeditSoft => soft = Some(SoftState::new(&pre, hp.oedit_soft.lambda)),
            _ => {}
        }
        Ok(Self { pre, subspace, alpha, soft, metric, released: 0, compressed: 0 })
    }

    /// The single-layer update of `method` for key `k` and residual `r`.
    pub fn update(
        &mut self,
        method: Method,
        hp: &Hparams,
        k: &[f64],
        key32: &[f32],
        r: &[f64],
    ) -> Result<RankOne> {
        match method {
            Method::Rome => projected_rank_one(&self.pre, None, k, r),
            Method::Oedit | Method::OeditPlus => {
                let (gains, retained) = retention_gains(self.metric, &self.pre, &self.subspace, k);
                self.released = self.subspace.release_conflicts(&gains, retained, hp.subspace.min_retained);
                self.compressed = 0;
                match rank_one_in(self.metric, &self.pre, Some(&self.subspace), k, r) {
                    Ok(u) => Ok(u),
                    Err(_) => {
                        // Saturation: the key lies inside the stored subspace; halve it and retry.
                        let keep = self.subspace.len() / 2;
                        self.compressed = self.subspace.compress(keep);
                        rank_one_in(self.metric, &self.pre, Some(&self.subspace), k, r)
                    }
                }
            }
            Method::Alphaedit => {
                let a = self.alpha.as_ref().ok_or_else(|| anyhow::anyhow!("AlphaEdit state missing"))?;
                let u = alphaedit_direction(a, k, hp.alphaedit.l2)?;
                self.remember_key(key32);
                Ok(RankOne { r: r.to_vec(), retained: dot(&u, k), u })
            }
            Method::OeditSoft => {
                let s = self.soft.as_ref().ok_or_else(|| anyhow::anyhow!("soft O-Edit state missing"))?;
                let (u, retained) = s.direction(k)?;
                self.remember_key(key32);
                Ok(RankOne { r: r.to_vec(), u, retained })
            }
            Method::Memit => bail!("MEMIT updates go through memit_update"),
        }
    }

    /// Adds an edit's key (f32, as stored) to the memory of past keys (AlphaEdit, soft O-Edit):
    /// after each live update, and for every stored edit in order when a run is resumed, so both
    /// paths build the same state.
    pub fn remember_key(&mut self, key32: &[f32]) {
        if let Some(a) = self.alpha.as_mut() {
            a.add_past(key32);
        }
        if let Some(s) = self.soft.as_mut() {
            s.add_past(key32);
        }
    }

    /// MEMIT's update of this layer for one key: u = C⁻¹k / (λ + kᵀC⁻¹k), so that
    /// ΔW = resid uᵀ solves (λC + k kᵀ) Δᵀ = k residᵀ (Sherman–Morrison for a batch of one).
    pub fn memit_update(&mut self, k: &[f64], resid: &[f64], lambda: f64) -> Result<RankOne> {
        let z = self.pre.solve(k);
        let denom = lambda + dot(k, &z);
        if !(denom.is_finite() && denom > 0.0) {
            bail!("MEMIT solve is degenerate (λ + kᵀC⁻¹k = {denom})");
        }
        let u = z.iter().map(|x| x / denom).collect::<Vec<_>>();
        Ok(RankOne { r: resid.to_vec(), retained: dot(&u, k), u })
    }

    /// Grows the O-Edit subspace after an update (no-op for the other methods).
    pub fn after_update(
        &mut self,
        method: Method,
        hp: &Hparams,
        k: &[f64],
        template_keys: &[Vec<f64>],
    ) -> AppendReport {
        match method {
            Method::Oedit | Method::OeditPlus => {
                let k = self.pre.to_metric(k, self.metric);
                let t: Vec<Vec<f64>> =
                    template_keys.iter().map(|x| self.pre.to_metric(x, self.metric)).collect();
                self.subspace.append(&k, &t, &hp.subspace)
            }
            _ => AppendReport::default(),
        }
    }
}

impl AlphaState {
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
    pub fn add_past(&mut self, key32: &[f32]) {
        let f = key32.len();
        for i in 0..f {
            let ki = key32[i] as f64;
            let row = &mut self.past.data[i * f..(i + 1) * f];
            row.iter_mut().zip(key32).for_each(|(p, &kj)| *p += ki * kj as f64);
        }
    }
}

/// AlphaEdit's direction for one key: x = (P₀ M P₀ + αI)⁻¹ P₀ k with M = k kᵀ + Σ past k kᵀ.
/// (The solution of (P₀M + αI) x = P₀k lies in range(P₀), where this symmetric system is
/// equivalent.) Then ΔW = r xᵀ, ΔW k₀ = 0 for every preserved key direction k₀ ⟂ null space.
fn alphaedit_direction(a: &AlphaState, k: &[f64], alpha: f64) -> Result<Vec<f64>> {
    let f = k.len();
    if a.null_basis.is_empty() {
        bail!(
            "AlphaEdit: the null space is empty (raise alphaedit.nullspace_threshold or min_nullspace_dim)"
        );
    }
    // Work in null-space coordinates: U (n0×f) rows; x = Uᵀ y with (U M Uᵀ + αI) y = U k.
    let u = &a.null_basis;
    let n0 = u.len();
    let mut m = a.past.clone();
    for i in 0..f {
        for j in 0..f {
            m.data[i * f + j] += k[i] * k[j];
        }
    }
    let um = Mat::from_vec(n0, f, u.iter().flatten().copied().collect());
    let umu = um.matmul(&m).matmul(&um.transpose());
    let mut sys = umu;
    sys.add_diagonal(alpha);
    let chol = Cholesky::new(&sys).map_err(|e| anyhow::anyhow!("AlphaEdit solve failed: {e}"))?;
    let uk: Vec<f64> = u.iter().map(|b| dot(b, k)).collect();
    let y = chol.solve(&uk);
    let mut x = vec![0.0; f];
    for (b, yi) in u.iter().zip(&y) {
        x.iter_mut().zip(b).for_each(|(xi, bi)| *xi += yi * bi);
    }
    Ok(x)
}
