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
    /// An identity per direction (parallel to the rows), so that the checkpoint can tell which
    /// rows an edit removed and which it appended without comparing rows (see [`Self::ids`]).
    ids: Vec<u64>,
    next_id: u64,
}

/// What appending an edit's directions did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct AppendReport {
    /// Directions appended.
    pub added: usize,
    /// Directions dropped by a compression (0 when none happened).
    pub compressed_away: usize,
    /// Directions released by the conflict policy before the update (`subspace.min_retained`).
    pub released: usize,
}

impl Subspace {
    /// An empty subspace of key width `dim`.
    pub fn new(dim: usize) -> Self {
        Self { basis: OrthoBasis::new(dim), energy: Vec::new(), ids: Vec::new(), next_id: 0 }
    }

    /// A subspace holding `rows` (trusted orthonormal, e.g. read from a checkpoint) with their
    /// energies.
    pub fn from_parts(dim: usize, rows: Vec<Vec<f64>>, energy: Vec<f64>) -> Self {
        let n = rows.len() as u64;
        Self { basis: OrthoBasis::from_rows(dim, rows), energy, ids: (0..n).collect(), next_id: n }
    }

    /// The identity of each stored direction, in row order, or None when the rows were changed
    /// behind the subspace's back (the public `basis` replaced). Identities are never reused
    /// within a subspace: a direction's identity survives removals of others, and a new
    /// direction gets a fresh one.
    pub fn ids(&self) -> Option<&[u64]> {
        (self.ids.len() == self.basis.len() && self.energy.len() == self.basis.len()).then_some(&self.ids[..])
    }

    fn push_id(&mut self) {
        self.ids.push(self.next_id);
        self.next_id += 1;
    }

    /// Keeps the rows `keep` says to keep (order preserved).
    fn retain_rows(&mut self, keep: &[bool]) {
        let n = self.len();
        let rows = (0..n).filter(|&i| keep[i]).map(|i| self.basis.rows()[i].clone()).collect();
        self.energy = (0..n).filter(|&i| keep[i]).map(|i| self.energy[i]).collect();
        if self.ids.len() == n {
            self.ids = (0..n).filter(|&i| keep[i]).map(|i| self.ids[i]).collect();
        }
        self.basis = OrthoBasis::from_rows(self.basis.dim(), rows);
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

    /// Adds a direction that is never compressed away (O-Edit+'s core directions of C).
    pub fn seed(&mut self, v: &[f64]) {
        if self.basis.try_push(v, 1e-6) {
            self.energy.push(f64::INFINITY);
            self.push_id();
        }
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
        let mut kept = vec![false; n];
        for i in order {
            kept[i] = true;
        }
        self.retain_rows(&kept);
        n - keep
    }

    /// The conflict policy: while `retained` is below `floor`, drops the stored direction whose
    /// removal gives back the most (`gains[i]`: what dropping direction i adds to `retained`).
    /// A new edit of a key an earlier edit holds then overrides it instead of being squeezed
    /// into what is left, which would blow up its norm. Returns how many were dropped.
    pub fn release_conflicts(&mut self, gains: &[f64], mut retained: f64, floor: f64) -> usize {
        if retained >= floor {
            return 0;
        }
        let mut order: Vec<usize> = (0..gains.len().min(self.len())).filter(|&i| gains[i] > 0.0).collect();
        order.sort_by(|&a, &b| gains[b].total_cmp(&gains[a]).then(a.cmp(&b)));
        let mut drop = vec![false; self.len()];
        let mut dropped = 0;
        for i in order {
            if retained >= floor {
                break;
            }
            retained += gains[i];
            drop[i] = true;
            dropped += 1;
        }
        let keep: Vec<bool> = drop.iter().map(|d| !d).collect();
        self.retain_rows(&keep);
        dropped
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
                self.push_id();
                report.added += 1;
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_fraction: f64) -> SubspacePolicy {
        SubspacePolicy {
            energy: 0.9,
            max_directions_per_edit: 1,
            max_fraction,
            tolerance: 0.01,
            min_retained: 0.1,
        }
    }

    fn vector(seed: u64, n: usize) -> Vec<f64> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 2001) as f64 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn append_keeps_the_basis_orthonormal_and_stores_energy() {
        let mut s = Subspace::new(32);
        for i in 0..10 {
            let k = vector(i + 1, 32);
            let r = s.append(&k, std::slice::from_ref(&k), &policy(1.0));
            assert_eq!(r.added, 1);
        }
        assert_eq!(s.len(), 10);
        assert_eq!(s.energy.len(), 10);
        assert!(s.basis.orthonormality_error() < 1e-12);
        // Energies are the squared norms of the parts orthogonal to earlier directions.
        let first = vector(1, 32);
        assert!((s.energy[0] - first.iter().map(|x| x * x).sum::<f64>()).abs() < 1e-9);
    }

    #[test]
    fn saturation_compresses_to_half_the_cap_keeping_high_energy_directions() {
        let dim = 20;
        let p = policy(0.5); // cap 10
        let mut s = Subspace::new(dim);
        let mut compressed = 0;
        for i in 0..25 {
            // Alternate large and small keys so that energies differ.
            let scale = if i % 2 == 0 { 10.0 } else { 0.1 };
            let k: Vec<f64> = vector(i + 7, dim).iter().map(|x| x * scale).collect();
            let r = s.append(&k, &[], &p);
            compressed += r.compressed_away;
            assert!(s.len() <= 10, "basis exceeded its cap: {}", s.len());
            assert!(s.basis.orthonormality_error() < 1e-10);
        }
        assert!(compressed > 0, "the cap was never reached");
        // After a compression the kept directions are the highest-energy ones.
        let mut s2 = Subspace::new(dim);
        for i in 0..10 {
            let scale = if i % 2 == 0 { 10.0 } else { 0.1 };
            let k: Vec<f64> = vector(i + 100, dim).iter().map(|x| x * scale).collect();
            s2.append(&k, &[], &policy(1.0));
        }
        let min_kept_before = {
            let mut e = s2.energy.clone();
            e.sort_by(|a, b| b.total_cmp(a));
            e[4]
        };
        assert_eq!(s2.compress(5), 5);
        assert_eq!(s2.len(), 5);
        assert!(s2.energy.iter().all(|&e| e >= min_kept_before));
        assert!(s2.basis.orthonormality_error() < 1e-12);
    }

    #[test]
    fn a_key_inside_the_subspace_is_not_appended() {
        let mut s = Subspace::new(8);
        let a = vector(3, 8);
        s.append(&a, &[], &policy(1.0));
        let twice: Vec<f64> = a.iter().map(|x| 2.0 * x).collect();
        assert_eq!(s.append(&twice, &[], &policy(1.0)).added, 0);
        assert_eq!(s.len(), 1);
    }
}
