//! Multi-layer rules: the change an edit asks of the residual stream at the target layer,
//! z\* − z, spread over several layers as MEMIT does (each layer, from the lowest, lands its share
//! (z\* − z)/(layers left) of what is still missing at its own key, read after the updates of the
//! layers below it), with each layer keeping its own memory of earlier edits' keys:
//!
//! - `alphaedit`: AlphaEdit as published (Fang et al., ICLR 2025): per layer, the update confined
//!   to the null space of that layer's key statistics, with the earlier edits' keys in its
//!   normal equation ([`NullSpaceMemory`]);
//! - `oedit-spread`: soft O-Edit at each layer ([`SoftMemory`]): earlier edits' key directions
//!   shrunk by their stored energy in C's metric;
//! - `memit` (its solver in [`super::memit`]): MEMIT's ridge solve per layer, no memory.
//!
//! A batch is solved jointly per layer (each layer's batch normal equation); a single edit is
//! the batch of one.

use std::collections::HashMap;

use anyhow::{Context, Result};

use super::alphaedit::NullSpaceMemory;
use super::oedit_soft::SoftMemory;
use super::{stats_of, BatchContext, EditContext, MethodSpec, RuleReport, UpdateRule};
use crate::edit::prompts::EditPrompts;
use crate::edit::subspace::Subspace;
use crate::edit::target::{subject_state, KeyValue};
use crate::edit::update::RankOne;
use crate::edit::{to_f32, AppliedUpdate};
use crate::hparams::Hparams;
use crate::linalg::dot;
use crate::model::Llama;
use crate::stats::KeyStats;

/// Registry entry of the faithful, multi-layer AlphaEdit.
pub const ALPHAEDIT: MethodSpec = MethodSpec {
    name: "alphaedit",
    about: "AlphaEdit: the residual spread over alphaedit.layers, each update in its layer's null space",
    hparam_sections: &["alphaedit"],
    layers: Hparams::alphaedit_layers,
    build: build_alphaedit,
};

/// Registry entry of spread soft O-Edit.
pub const OEDIT_SPREAD: MethodSpec = MethodSpec {
    name: "oedit-spread",
    about: "soft O-Edit at every layer of oedit_spread.layers, the residual spread as MEMIT does",
    hparam_sections: &["oedit_spread"],
    layers: Hparams::oedit_spread_layers,
    build: build_oedit_spread,
};

fn build_alphaedit(hp: &Hparams, stats: &[KeyStats]) -> Result<Box<dyn UpdateRule>> {
    let layers = hp
        .alphaedit_layers()
        .into_iter()
        .map(|l| Ok((l, NullSpaceMemory::new(stats_of(stats, l)?, &hp.alphaedit)?)))
        .collect::<Result<_>>()?;
    Ok(Box::new(Spread::new(layers)))
}

fn build_oedit_spread(hp: &Hparams, stats: &[KeyStats]) -> Result<Box<dyn UpdateRule>> {
    let lambda = hp.oedit_spread.lambda;
    let layers = hp
        .oedit_spread_layers()
        .into_iter()
        .map(|l| Ok((l, SoftMemory::new(stats_of(stats, l)?, hp.cov_regularization, lambda)?)))
        .collect::<Result<_>>()?;
    Ok(Box::new(Spread::new(layers)))
}

/// One layer's constrained least-squares solve and its memory of earlier edits' keys.
pub trait LayerSolver: Send {
    /// The update directions u_i of a batch of keys at this layer, solved jointly
    /// (ΔW = Σ r_i u_iᵀ); a single edit is a batch of one.
    fn directions(&self, keys: &[Vec<f64>]) -> Result<Vec<Vec<f64>>>;
    /// Adds an applied edit's key (f32, as the checkpoint stores it) to the memory.
    fn remember(&mut self, key32: &[f32]);
    /// Whether the target layer's share u·k is the rule's `retained` and the share closed-loop
    /// landing scales a further attempt by (else: `retained` 1, attempts unscaled).
    fn reports_share(&self) -> bool {
        true
    }
}

impl LayerSolver for NullSpaceMemory {
    fn directions(&self, keys: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
        NullSpaceMemory::directions(self, keys)
    }
    fn remember(&mut self, key32: &[f32]) {
        self.add_past(key32)
    }
}

impl LayerSolver for SoftMemory {
    fn directions(&self, keys: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
        SoftMemory::directions(self, keys)
    }
    fn remember(&mut self, key32: &[f32]) {
        self.add_past(key32)
    }
}

/// A multi-layer rule: one [`LayerSolver`] per edited layer (ascending; v\* is optimised at the
/// last).
pub struct Spread<S> {
    layers: Vec<(usize, S)>,
}

impl<S> Spread<S> {
    /// The rule of `layers` (ascending, with their solvers).
    pub fn new(layers: Vec<(usize, S)>) -> Self {
        Self { layers }
    }
}

/// The records of an edit or of a batch, as the spreading loop sees them.
trait Records {
    fn count(&self) -> usize;
    fn model(&self) -> &Llama;
    fn prompts(&self, i: usize) -> &EditPrompts;
    fn kv(&self, i: usize) -> &KeyValue;
    fn target_layer(&self) -> usize;
    fn apply(&mut self, i: usize, layer: usize, update: &RankOne, key: &[f64]) -> Result<()>;
}

impl Records for EditContext<'_> {
    fn count(&self) -> usize {
        1
    }
    fn model(&self) -> &Llama {
        EditContext::model(self)
    }
    fn prompts(&self, _: usize) -> &EditPrompts {
        self.prompts
    }
    fn kv(&self, _: usize) -> &KeyValue {
        self.kv
    }
    fn target_layer(&self) -> usize {
        self.target_layer
    }
    fn apply(&mut self, _: usize, layer: usize, update: &RankOne, key: &[f64]) -> Result<()> {
        EditContext::apply(self, layer, update, key)
    }
}

impl Records for BatchContext<'_> {
    fn count(&self) -> usize {
        self.len()
    }
    fn model(&self) -> &Llama {
        BatchContext::model(self)
    }
    fn prompts(&self, i: usize) -> &EditPrompts {
        BatchContext::prompts(self, i)
    }
    fn kv(&self, i: usize) -> &KeyValue {
        BatchContext::kv(self, i)
    }
    fn target_layer(&self) -> usize {
        self.target_layer
    }
    fn apply(&mut self, i: usize, layer: usize, update: &RankOne, key: &[f64]) -> Result<()> {
        BatchContext::apply(self, i, layer, update, key)
    }
}

impl<S: LayerSolver> Spread<S> {
    /// Spreads every record's z\* − z over the layers, lowest first, then adds each layer's keys
    /// to its memory (record by record, the order in which a resume replays them). `retained`
    /// in each report is the share u·k landed at the target layer.
    fn spread(&mut self, recs: &mut dyn Records) -> Result<Vec<RuleReport>> {
        let n = recs.count();
        let top = recs.target_layer();
        let mut z_star: Option<Vec<Vec<f64>>> = None;
        let mut layer_keys = Vec::with_capacity(self.layers.len());
        let mut retained = vec![1.0; n];
        let count = self.layers.len();
        for (li, (layer, solver)) in self.layers.iter().enumerate() {
            // Each layer sees the hidden states the updates of the layers below it left.
            let (keys, zs): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (0..n)
                .map(|i| subject_state(recs.model(), recs.prompts(i), *layer, top))
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("reading the keys of layer {layer}"))?
                .into_iter()
                .unzip();
            let z_star = z_star.get_or_insert_with(|| {
                (0..n)
                    .map(|i| {
                        let kv = recs.kv(i);
                        zs[i]
                            .iter()
                            .zip(kv.v_star.iter().zip(&kv.v_orig))
                            .map(|(z, (v, o))| z + (v - o))
                            .collect()
                    })
                    .collect()
            });
            let dirs = solver.directions(&keys).with_context(|| format!("the solve at layer {layer}"))?;
            let remaining = (count - li) as f64;
            for (i, (u, (k, z))) in dirs.into_iter().zip(keys.iter().zip(&zs)).enumerate() {
                let r: Vec<f64> = z_star[i].iter().zip(z).map(|(a, b)| (a - b) / remaining).collect();
                let share = dot(&u, k);
                if li + 1 == count && solver.reports_share() {
                    retained[i] = share;
                }
                recs.apply(i, *layer, &RankOne { r, u, retained: share }, k)?;
            }
            layer_keys.push(keys);
        }
        for ((_, solver), keys) in self.layers.iter_mut().zip(&layer_keys) {
            keys.iter().for_each(|k| solver.remember(&to_f32(k)));
        }
        Ok(retained.into_iter().map(|retained| RuleReport { retained, ..RuleReport::default() }).collect())
    }
}

impl<S: LayerSolver> UpdateRule for Spread<S> {
    fn edit(&mut self, ctx: &mut EditContext<'_>) -> Result<RuleReport> {
        Ok(self.spread(ctx)?.remove(0))
    }

    fn edit_batch(&mut self, ctx: &mut BatchContext<'_>) -> Result<Vec<RuleReport>> {
        self.spread(ctx)
    }

    /// The share the target layer's solve lands at `k` (its u·k for a batch of one).
    fn landed_share(&self, k: &[f64]) -> Result<f64> {
        match self.layers.last() {
            Some((_, solver)) if solver.reports_share() => Ok(dot(&solver.directions(&[k.to_vec()])?[0], k)),
            _ => Ok(1.0),
        }
    }

    fn restore(&mut self, _: &HashMap<usize, Subspace>, updates: &[AppliedUpdate]) -> Result<()> {
        for u in updates {
            if let Some((_, solver)) = self.layers.iter_mut().find(|(l, _)| *l == u.layer) {
                solver.remember(&u.key);
            }
        }
        Ok(())
    }
}
