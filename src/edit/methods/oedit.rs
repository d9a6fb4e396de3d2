//! O-Edit as published: ROME's update projected onto the orthogonal complement of the stored
//! key directions of earlier edits (plain key space), the edit's key appended afterwards.
//! [`HardProjection`] is the state it shares with O-Edit+ (which keeps it in whitened space).

use std::collections::HashMap;

use anyhow::Result;

use super::{
    check_width, single_layer, stats_of, BatchContext, EditContext, MethodSpec, RuleReport, UpdateRule,
};
use crate::edit::subspace::Subspace;
use crate::edit::update::{joint_of, KeyImage, Metric, Preconditioner, RankOne};
use crate::edit::AppliedUpdate;
use crate::hparams::{Hparams, SubspacePolicy};
use crate::stats::KeyStats;

/// Registry entry.
pub const SPEC: MethodSpec = MethodSpec {
    name: "oedit",
    about: "O-Edit as published: ROME's update projected off earlier edits' key directions",
    hparam_sections: &["subspace"],
    layers: single_layer,
    build,
};

fn build(hp: &Hparams, stats: &[KeyStats]) -> Result<Box<dyn UpdateRule>> {
    Ok(Box::new(HardProjection::new(hp, stats_of(stats, hp.layer)?, Metric::Euclidean)?))
}

/// The hard O-Edit constraint on one layer: the update must vanish on every stored direction
/// (kept orthonormal in `metric`), and each edit's key is appended after its update.
pub struct HardProjection {
    layer: usize,
    /// Cholesky of the regularised C.
    pub pre: Preconditioner,
    /// The directions of earlier edits (and, for O-Edit+, of C's core directions).
    pub subspace: Subspace,
    /// The inner product the subspace is kept in.
    pub metric: Metric,
    policy: SubspacePolicy,
}

impl HardProjection {
    /// An empty subspace over the layer's key statistics.
    pub fn new(hp: &Hparams, stats: &KeyStats, metric: Metric) -> Result<Self> {
        Ok(Self {
            layer: hp.layer,
            pre: Preconditioner::new(stats, hp.cov_regularization)?,
            subspace: Subspace::new(stats.dim),
            metric,
            policy: hp.subspace.clone(),
        })
    }

    /// The template keys in the subspace's metric, when they feed extra directions
    /// (`max_directions_per_edit > 1`); else none (one multi-RHS solve when they do).
    fn template_directions(&self, template_keys: &[Vec<f64>]) -> Vec<Vec<f64>> {
        if self.policy.max_directions_per_edit > 1 {
            self.pre.to_metric_many(template_keys, self.metric)
        } else {
            Vec::new()
        }
    }
}

impl UpdateRule for HardProjection {
    fn edit(&mut self, ctx: &mut EditContext<'_>) -> Result<RuleReport> {
        let r = ctx.residual()?;
        let kv = ctx.kv;
        let k = &kv.k_star;
        // One triangular solve for the key, shared by the conflict check, the update and the
        // append.
        let image = KeyImage::new(self.metric, &self.pre, k);
        // The conflict policy first: a key mostly inside the subspace (the same fact edited
        // again) releases the directions that hold it instead of being squeezed.
        let (gains, retained) = image.retention_gains(&self.subspace);
        let released = self.subspace.release_conflicts(&gains, retained, self.policy.min_retained);
        let mut compressed = 0;
        let upd = match image.rank_one(&self.pre, Some(&self.subspace), &r) {
            Ok(u) => u,
            Err(_) => {
                // Saturation: the key lies inside the stored subspace; halve it and retry.
                let keep = self.subspace.len() / 2;
                compressed = self.subspace.compress(keep);
                image.rank_one(&self.pre, Some(&self.subspace), &r)?
            }
        };
        ctx.apply(self.layer, &upd, k)?;
        let templates = self.template_directions(&kv.template_keys);
        let mut report = self.subspace.append(image.in_metric(), &templates, &self.policy);
        report.released = released;
        report.compressed_away += compressed;
        Ok(RuleReport { retained: upd.retained, subspace: report })
    }

    /// The batch: each key's conflicts with the stored subspace released first (as its single
    /// edit would), then one joint update landing every edit exactly and vanishing on every
    /// stored direction ([`joint_in`]), then all keys appended in order. When a key of the batch
    /// keeps less than `subspace.min_retained` once the others are taken out (two records of
    /// one subject in a batch), the joint update would blow up: the batch is then edited one
    /// record after another, as sequential O-Edit would.
    fn edit_batch(&mut self, ctx: &mut BatchContext<'_>) -> Result<Vec<RuleReport>> {
        let keys = ctx.keys();
        // One multi-RHS triangular solve for all the batch's keys, shared by the conflict
        // checks, the joint update and the append.
        let images = KeyImage::many(self.metric, &self.pre, &keys);
        let mut released = Vec::with_capacity(keys.len());
        for image in &images {
            let (gains, retained) = image.retention_gains(&self.subspace);
            released.push(self.subspace.release_conflicts(&gains, retained, self.policy.min_retained));
        }
        let floor = self.policy.min_retained.max(1e-6);
        let joint = joint_of(&images, &self.pre, Some(&self.subspace))
            .ok()
            .filter(|(_, retained)| retained.iter().all(|&x| x.is_finite() && x >= floor));
        let Some((u, retained)) = joint else {
            let mut reports = ctx.edit_sequentially(self)?;
            for (r, n) in reports.iter_mut().zip(released) {
                r.subspace.released += n;
            }
            return Ok(reports);
        };
        let r = ctx.residuals()?;
        for (i, ((r, u), k)) in r.into_iter().zip(u).zip(&keys).enumerate() {
            ctx.apply(i, self.layer, &RankOne { r, u, retained: retained[i] }, k)?;
        }
        let mut reports = Vec::with_capacity(keys.len());
        for (i, image) in images.iter().enumerate() {
            let templates = self.template_directions(&ctx.kv(i).template_keys);
            let mut report = self.subspace.append(image.in_metric(), &templates, &self.policy);
            report.released = released[i];
            reports.push(RuleReport { retained: retained[i], subspace: report });
        }
        Ok(reports)
    }

    fn subspaces(&self) -> Vec<(usize, &Subspace)> {
        vec![(self.layer, &self.subspace)]
    }

    fn lands_exactly(&self) -> bool {
        true
    }

    fn restore(&mut self, subspaces: &HashMap<usize, Subspace>, _: &[AppliedUpdate]) -> Result<()> {
        if let Some(s) = subspaces.get(&self.layer) {
            check_width(self.layer, s, self.subspace.basis.dim())?;
            self.subspace = s.clone();
        }
        Ok(())
    }
}
