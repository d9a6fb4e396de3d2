//! O-Edit+: the hard O-Edit projection done in whitened key space (w = L⁻¹k, C = L Lᵀ): earlier
//! keys map exactly as before and the edit lands exactly, with the least change over the corpus
//! keys; optionally also orthogonal to C's top eigenvectors (its core directions).

use anyhow::Result;

use super::oedit::HardProjection;
use super::{single_layer, stats_of, MethodSpec, UpdateRule};
use crate::edit::update::Metric;
use crate::hparams::Hparams;
use crate::linalg::{sym_eigen, Mat};
use crate::stats::KeyStats;

/// Registry entry.
pub const SPEC: MethodSpec = MethodSpec {
    name: "oedit-plus",
    about: "O-Edit in whitened key space: earlier keys kept exactly, least disturbance of the corpus keys",
    hparam_sections: &["subspace", "oedit_plus"],
    layers: single_layer,
    build,
};

fn build(hp: &Hparams, stats: &[KeyStats]) -> Result<Box<dyn UpdateRule>> {
    let s = stats_of(stats, hp.layer)?;
    let mut rule = HardProjection::new(hp, s, Metric::Covariance)?;
    seed_core_directions(&mut rule, hp, s);
    Ok(Box::new(rule))
}

/// Seeds the subspace with C's top eigenvectors holding `oedit_plus.core_energy` of its trace
/// (at most `oedit_plus.max_core_fraction` of the width); they are never compressed away.
fn seed_core_directions(rule: &mut HardProjection, hp: &Hparams, stats: &KeyStats) {
    let f = stats.dim;
    let target = hp.oedit_plus.core_energy;
    let cap = (hp.oedit_plus.max_core_fraction * f as f64).floor() as usize;
    if target <= 0.0 || cap == 0 {
        return;
    }
    let e = sym_eigen(&Mat::from_vec(f, f, stats.second_moment.clone()));
    let total: f64 = e.values.iter().map(|v| v.max(0.0)).sum();
    let mut acc = 0.0;
    for j in (0..f).rev() {
        if rule.subspace.len() >= cap || acc >= target * total {
            break;
        }
        acc += e.values[j].max(0.0);
        let v = rule.pre.to_metric(&e.vectors.col(j), rule.metric);
        rule.subspace.seed(&v);
    }
}
