//! The O-Edit subspace of one edited layer: an orthonormal basis of the key directions that
//! earlier edits used, with the energy of each, and its saturation policy.

use crate::hparams::SubspacePolicy;
use crate::linalg::{core_directions, norm, OrthoBasis};

/// The stored subspace of one layer.
#[derive(Debug, Clone)]
pub struct Subspace {
    pub basis: OrthoBasis,
    /// Energy (squared norm of the key component) each direction was appended with.
    pub energy: Vec<f64>,
}

/// What appending an edit's directions did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct AppendReport {
    /// Directions appended.
    pub added: usize,
    /// Directions dropped by a compression (0 when none happened).
    pub compressed_away: usize,
}

impl Subspace {
    /// An empty subspace of key width `dim`.
    pub fn new(dim: usize) -> Self {
        Self { basis: OrthoBasis::new(dim), energy: Vec::new() }
    }

    /// Number of stored directions.
    pub fn len(&self) -> usize {
        self.basis.len()
    }

    /// Whether no direction is stored.
    pub fn is_empty(&self) -> bool {
        self.basis.is_empty()
    }

    /// Largest basis the policy allows for this width.
    pub fn cap(&self, policy: &SubspacePolicy) -> usize {
        ((self.basis.dim() as f64 * policy.max_fraction).floor() as usize).max(1)
    }

    /// Keeps the `keep` highest-energy directions (the saturation policy); returns how many were dropped.
    pub fn compress(&mut self, keep: usize) -> usize {
        let n = self.len();
        if n <= keep {
            return 0;
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| self.energy[b].total_cmp(&self.energy[a]).then(a.cmp(&b)));
        order.truncate(keep);
        order.sort_unstable();
        let rows = order.iter().map(|&i| self.basis.rows()[i].clone()).collect();
        self.energy = order.iter().map(|&i| self.energy[i]).collect();
        self.basis = OrthoBasis::from_rows(self.basis.dim(), rows);
        n - keep
    }

    /// Appends the edit's key k* and, up to the policy's limit, the core directions of its
    /// template keys. Compresses first when the basis would exceed its cap.
    pub fn append(
        &mut self,
        k_star: &[f64],
        template_keys: &[Vec<f64>],
        policy: &SubspacePolicy,
    ) -> AppendReport {
        let mut report = AppendReport::default();
        let cap = self.cap(policy);
        if self.len() + policy.max_directions_per_edit > cap {
            report.compressed_away = self.compress(cap / 2);
        }
        let mut candidates = vec![k_star.to_vec()];
        if policy.max_directions_per_edit > 1 {
            let scale = norm(k_star);
            for d in core_directions(template_keys, policy.energy, policy.max_directions_per_edit - 1) {
                candidates.push(d.iter().map(|x| x * scale).collect());
            }
        }
        for c in candidates {
            if self.len() >= cap || report.added >= policy.max_directions_per_edit {
                break;
            }
            let residual = self.basis.project_out(&c);
            let e = residual.iter().map(|x| x * x).sum::<f64>();
            if self.basis.try_push(&c, policy.tolerance) {
                self.energy.push(e);
                report.added += 1;
            }
        }
        report
    }
}
