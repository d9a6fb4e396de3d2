//! The update rules, one module each, behind one trait ([`UpdateRule`]) and one registry
//! ([`REGISTRY`]).
//!
//! An update rule turns an edit's key k\* and target value v\* (computed by the shared
//! machinery in [`super::target`]) into weight updates, and keeps whatever it must remember
//! between edits (an O-Edit subspace, the keys of earlier edits). The editor, the session, the
//! run directory and the evaluation only see a [`Method`] (a registry entry) and a boxed
//! [`UpdateRule`]; none of them names a method. A new method is one new module here plus one
//! line in [`REGISTRY`].

pub mod alphaedit;
pub mod memit;
pub mod oedit;
pub mod oedit_plus;
pub mod oedit_soft;
pub mod rome;
pub mod spread;

use std::collections::HashMap;
use std::fmt;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use super::prompts::EditPrompts;
use super::subspace::{AppendReport, Subspace};
use super::target::KeyValue;
use super::update::RankOne;
use super::{apply_rank_one, to_f32, AppliedUpdate};
use crate::hparams::Hparams;
use crate::linalg::{dot, Mat};
use crate::model::Llama;
use crate::stats::KeyStats;

/// Every method oedit knows, in the order `--help` lists them. One line per method.
pub static REGISTRY: &[Method] = &[
    Method(&oedit_plus::SPEC),
    Method(&oedit_soft::SPEC),
    Method(&oedit::SPEC),
    Method(&rome::SPEC),
    Method(&memit::SPEC),
    Method(&spread::ALPHAEDIT),
    Method(&spread::OEDIT_SPREAD),
    Method(&alphaedit::SPEC),
];

/// What the registry knows about one method: its name, the hyper-parameter sections it reads,
/// the layers it edits and how to build its state.
pub struct MethodSpec {
    /// The name used on the command line and in manifests (`--method NAME`).
    pub name: &'static str,
    /// One line for `--help`.
    pub about: &'static str,
    /// The sections of the hyper-parameters the method reads besides the common fields; a run
    /// directory refuses a change in these and ignores changes in the others.
    pub hparam_sections: &'static [&'static str],
    /// The layers the method edits (ascending; v\* is optimised at the last one).
    pub layers: fn(&Hparams) -> Vec<usize>,
    /// Builds the method's state before the first edit from the key statistics of its layers.
    pub build: BuildRule,
}

/// Builds a method's update rule from the hyper-parameters and the key statistics.
pub type BuildRule = fn(&Hparams, &[KeyStats]) -> Result<Box<dyn UpdateRule>>;

/// An editing method: a handle on a registry entry (compared, printed and serialised by name).
#[derive(Clone, Copy)]
pub struct Method(&'static MethodSpec);

impl Method {
    /// The registered method called `name`.
    pub fn named(name: &str) -> Option<Method> {
        REGISTRY.iter().copied().find(|m| m.0.name == name)
    }

    /// A method from a specification outside the registry (a method under test).
    pub fn from_spec(spec: &'static MethodSpec) -> Method {
        Method(spec)
    }

    /// The name used on the command line and in manifests.
    pub fn name(self) -> &'static str {
        self.0.name
    }

    /// The layers this method edits (ascending).
    pub fn layers(self, hp: &Hparams) -> Vec<usize> {
        (self.0.layers)(hp)
    }

    /// The hyper-parameter sections this method reads.
    pub fn hparam_sections(self) -> &'static [&'static str] {
        self.0.hparam_sections
    }

    /// The method's fresh state, from the key statistics of (at least) its layers.
    pub fn build(self, hp: &Hparams, stats: &[KeyStats]) -> Result<Box<dyn UpdateRule>> {
        (self.0.build)(hp, stats)
    }
}

impl PartialEq for Method {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}
impl Eq for Method {}

impl fmt::Debug for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name)
    }
}

fn known_names() -> String {
    REGISTRY.iter().map(|m| m.name()).collect::<Vec<_>>().join(", ")
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Method::named(s).ok_or_else(|| format!("unknown method `{s}` (known: {})", known_names()))
    }
}

impl serde::Serialize for Method {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name)
    }
}

impl<'de> serde::Deserialize<'de> for Method {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl clap::ValueEnum for Method {
    fn value_variants<'a>() -> &'a [Self] {
        REGISTRY
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.0.name).help(self.0.about))
    }
}

/// What an update rule reports about one edit (besides the factors it applied).
#[derive(Debug, Clone, Copy)]
pub struct RuleReport {
    /// How much of the key's update direction survived the method's constraints (see the
    /// `retained` log field; 1 when the method has none).
    pub retained: f64,
    /// What the edit did to the stored subspace (O-Edit family).
    pub subspace: AppendReport,
}

impl Default for RuleReport {
    fn default() -> Self {
        Self { retained: 1.0, subspace: AppendReport::default() }
    }
}

/// The update rule of a method: its state across edits, and the update of each edit.
pub trait UpdateRule: Send {
    /// Computes this edit's update(s) from `ctx` (k\*, v\*, the prompts, the live model),
    /// applies each through [`EditContext::apply`] and updates the rule's own memory.
    fn edit(&mut self, ctx: &mut EditContext<'_>) -> Result<RuleReport>;

    /// Computes the joint update of a batch of edits whose k\* and v\* were all computed on the
    /// same weights (`ctx`), applies it through [`BatchContext::apply`] (record by record, in
    /// order) and updates the rule's memory as if the batch were one edit: one report per
    /// record. Rules without a batch form refuse.
    fn edit_batch(&mut self, ctx: &mut BatchContext<'_>) -> Result<Vec<RuleReport>> {
        bail!("this method has no batch form ({} records given); use --batch-size 1", ctx.len())
    }

    /// The subspaces the rule keeps per layer, written to the checkpoint after every edit.
    fn subspaces(&self) -> Vec<(usize, &Subspace)> {
        Vec::new()
    }

    /// Brings a fresh rule to a committed state on resume: the checkpointed subspaces, and the
    /// stored updates of every earlier edit in order (from which a rule that remembers past
    /// keys rebuilds that memory, exactly as the live edits built it).
    fn restore(&mut self, subspaces: &HashMap<usize, Subspace>, updates: &[AppliedUpdate]) -> Result<()>;

    /// The share uᵀk of a residual that the rule's next update at key `k` would land there
    /// (ΔW = r uᵀ), from its current state, changing nothing: 1 (the default) for rules that
    /// land the whole residual. Closed-loop landing ([`crate::edit::landing`]) scales a further
    /// attempt's residual by its inverse.
    fn landed_share(&self, _k: &[f64]) -> Result<f64> {
        Ok(1.0)
    }

    /// Whether every update lands its whole residual exactly at its key (ΔW k\* = r: ROME and
    /// the hard projections). Closed-loop landing inside a batch then repeats a record's own
    /// joint direction instead of the rule's single-edit update.
    fn lands_exactly(&self) -> bool {
        false
    }
}

/// Everything an update rule may use for one edit, and the record of what it applied.
pub struct EditContext<'a> {
    model: &'a mut Llama,
    /// The edit's prompts (rewrite rows and KL rows), for rules that re-read hidden states.
    pub prompts: &'a EditPrompts,
    /// k\*, v\* and the template keys, computed at [`Self::target_layer`].
    pub kv: &'a KeyValue,
    /// The layer v\* was optimised at (the last layer the method edits).
    pub target_layer: usize,
    applied: Vec<AppliedUpdate>,
    norm_sq: f64,
}

impl<'a> EditContext<'a> {
    /// A context for one edit.
    pub fn new(
        model: &'a mut Llama,
        prompts: &'a EditPrompts,
        kv: &'a KeyValue,
        target_layer: usize,
    ) -> Self {
        Self { model, prompts, kv, target_layer, applied: Vec::new(), norm_sq: 0.0 }
    }

    /// The model as it stands (with this edit's updates applied so far).
    pub fn model(&self) -> &Llama {
        self.model
    }

    /// v\* − W k\* at the target layer: what the target layer's update must add at k\*.
    ///
    /// W k\* is formed in f64 a block of rows at a time ([`matvec_f64`]), so the edit never holds
    /// a full f64 copy of W (d·f·8 bytes: 0.36 GB at Llama-2-7B's width).
    pub fn residual(&self) -> Result<Vec<f64>> {
        let wk = matvec_f64(self.model.down_proj(self.target_layer), &self.kv.k_star, RESIDUAL_BLOCK_BYTES)?;
        Ok(self.kv.v_star.iter().zip(&wk).map(|(a, b)| a - b).collect())
    }

    /// Applies ΔW = r uᵀ to `layer` and records it (with the key it was computed for) for the
    /// checkpoint.
    pub fn apply(&mut self, layer: usize, update: &RankOne, key: &[f64]) -> Result<()> {
        let a = AppliedUpdate { layer, r: to_f32(&update.r), u: to_f32(&update.u), key: to_f32(key) };
        ensure_finite(&a)?;
        apply_rank_one(self.model, layer, &a.r, &a.u)?;
        self.norm_sq += update.norm().powi(2);
        self.applied.push(a);
        Ok(())
    }

    /// The updates applied so far and ‖ΔW‖_F over all of them.
    pub fn finish(self) -> (Vec<AppliedUpdate>, f64) {
        (self.applied, self.norm_sq.sqrt())
    }
}

/// Refuses an update with a NaN or infinite entry (in f32, as it would be applied): a diverged
/// v\* optimisation or solve must reach neither the weights nor the checkpoint.
fn ensure_finite(a: &AppliedUpdate) -> Result<()> {
    if a.r.iter().chain(&a.u).all(|x| x.is_finite()) {
        return Ok(());
    }
    bail!(
        "the update of layer {} has NaN or infinite entries (the v* optimisation or the solve \
         diverged); this edit is not applied to the checkpoint: lower v_lr or clamp_norm_factor in \
         the hyper-parameters",
        a.layer
    )
}

/// Everything an update rule may use for a batch of edits, and the record of what it applied
/// for each of them.
pub struct BatchContext<'a> {
    model: &'a mut Llama,
    prompts: &'a [EditPrompts],
    kvs: &'a [KeyValue],
    /// The layer v\* was optimised at (the last layer the method edits).
    pub target_layer: usize,
    applied: Vec<Vec<AppliedUpdate>>,
    norm_sq: Vec<f64>,
}

impl<'a> BatchContext<'a> {
    /// A context for the batch of `prompts` with their k\*/v\* `kvs` (same order).
    pub fn new(
        model: &'a mut Llama,
        prompts: &'a [EditPrompts],
        kvs: &'a [KeyValue],
        target_layer: usize,
    ) -> Result<Self> {
        if prompts.len() != kvs.len() || prompts.is_empty() {
            bail!("internal error: a batch of {} prompts and {} key/values", prompts.len(), kvs.len());
        }
        let n = prompts.len();
        Ok(Self { model, prompts, kvs, target_layer, applied: vec![Vec::new(); n], norm_sq: vec![0.0; n] })
    }

    /// Records in the batch.
    pub fn len(&self) -> usize {
        self.kvs.len()
    }

    /// Whether the batch is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.kvs.is_empty()
    }

    /// The model as it stands (with the updates applied so far).
    pub fn model(&self) -> &Llama {
        self.model
    }

    /// The prompts of record `i`.
    pub fn prompts(&self, i: usize) -> &EditPrompts {
        &self.prompts[i]
    }

    /// k\*, v\* and the template keys of record `i`.
    pub fn kv(&self, i: usize) -> &KeyValue {
        &self.kvs[i]
    }

    /// k\* of every record.
    pub fn keys(&self) -> Vec<Vec<f64>> {
        self.kvs.iter().map(|kv| kv.k_star.clone()).collect()
    }

    /// v\*_i − W k\*_i at the target layer for every record, against the current W.
    pub fn residuals(&self) -> Result<Vec<Vec<f64>>> {
        let w = self.model.down_proj(self.target_layer);
        let keys: Vec<&[f64]> = self.kvs.iter().map(|kv| kv.k_star.as_slice()).collect();
        let wks = matvecs_f64(w, &keys, RESIDUAL_BLOCK_BYTES)?;
        Ok(self
            .kvs
            .iter()
            .zip(wks)
            .map(|(kv, wk)| kv.v_star.iter().zip(&wk).map(|(a, b)| a - b).collect())
            .collect())
    }

    /// Applies record `record`'s share ΔW = r uᵀ to `layer` and records it (with its key).
    pub fn apply(&mut self, record: usize, layer: usize, update: &RankOne, key: &[f64]) -> Result<()> {
        let a = AppliedUpdate { layer, r: to_f32(&update.r), u: to_f32(&update.u), key: to_f32(key) };
        ensure_finite(&a)?;
        apply_rank_one(self.model, layer, &a.r, &a.u)?;
        self.norm_sq[record] += update.norm().powi(2);
        self.applied[record].push(a);
        Ok(())
    }

    /// Runs `rule`'s single edit for each record in turn (each against the weights the previous
    /// ones left, with the v\* computed for the batch): the fallback of rules whose joint solve
    /// is ill-posed for this batch.
    pub fn edit_sequentially(&mut self, rule: &mut dyn UpdateRule) -> Result<Vec<RuleReport>> {
        let mut reports = Vec::with_capacity(self.len());
        for i in 0..self.len() {
            let mut ctx =
                EditContext::new(&mut *self.model, &self.prompts[i], &self.kvs[i], self.target_layer);
            reports.push(rule.edit(&mut ctx)?);
            let (applied, norm) = ctx.finish();
            self.applied[i].extend(applied);
            self.norm_sq[i] += norm * norm;
        }
        Ok(reports)
    }

    /// Per record, the updates applied and ‖ΔW‖_F over them.
    pub fn finish(self) -> Vec<(Vec<AppliedUpdate>, f64)> {
        self.applied.into_iter().zip(self.norm_sq).map(|(a, n)| (a, n.sqrt())).collect()
    }
}

/// The working set of [`EditContext::residual`]: bytes of W (as f64) handled at a time.
const RESIDUAL_BLOCK_BYTES: usize = 32 << 20;

/// W x in f64 for a `[rows, cols]` weight of any float dtype, a block of at most `block_bytes`
/// (as f64; at least one row) at a time: each block is read as f32 (exact for bf16, f16 and f32
/// weights) onto the host, and each row's product is [`dot`] of the row widened to f64 with x.
/// The result does not depend on the block size or the device.
pub fn matvec_f64(w: &Tensor, x: &[f64], block_bytes: usize) -> Result<Vec<f64>> {
    Ok(matvecs_f64(w, &[x], block_bytes)?.pop().unwrap_or_default())
}

/// [`matvec_f64`] of several vectors with one pass over W (each product the same bits as
/// [`matvec_f64`] gives it alone).
pub fn matvecs_f64(w: &Tensor, xs: &[&[f64]], block_bytes: usize) -> Result<Vec<Vec<f64>>> {
    let (rows, cols) = w.dims2()?;
    if let Some(x) = xs.iter().find(|x| x.len() != cols) {
        bail!("matvec: the weight has {cols} columns, the vector {} entries", x.len());
    }
    if w.dtype() == DType::F64 {
        bail!("matvec: f64 weights are not supported (the model is kept in f32, bf16 or f16)");
    }
    // On a GPU, one transfer of W (as f32) to the host: a narrowed device tensor is read back
    // with its whole buffer, so reading block by block would move W once per block.
    let host;
    let w = if w.device().is_cpu() {
        w
    } else {
        host = w.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?;
        &host
    };
    let block = (block_bytes / (cols.max(1) * 8)).clamp(1, rows.max(1));
    let mut out = vec![Vec::with_capacity(rows); xs.len()];
    let mut row = vec![0f64; cols];
    let mut start = 0;
    while start < rows {
        let n = block.min(rows - start);
        let part: Vec<f32> = w.narrow(0, start, n)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        for r in part.chunks_exact(cols) {
            row.iter_mut().zip(r).for_each(|(a, &b)| *a = b as f64);
            for (o, x) in out.iter_mut().zip(xs) {
                o.push(dot(&row, x));
            }
        }
        start += n;
    }
    Ok(out)
}

/// The layer this single-layer method edits: `hp.layer`.
pub fn single_layer(hp: &Hparams) -> Vec<usize> {
    vec![hp.layer]
}

/// The key statistics of `layer` among `stats`.
pub fn stats_of(stats: &[KeyStats], layer: usize) -> Result<&KeyStats> {
    stats.iter().find(|s| s.layer == layer).with_context(|| format!("no key statistics for layer {layer}"))
}

/// A⁻¹ ← (A + y yᵀ)⁻¹ by Sherman–Morrison, for a symmetric positive-definite A kept as its
/// inverse (row-major n×n): O(n²), and the same bytes every time for the same inputs.
pub fn add_outer_to_inverse(inverse: &mut Mat, y: &[f64]) {
    let z = inverse.matvec(y);
    let s = 1.0 / (1.0 + dot(y, &z));
    let n = z.len();
    for (i, &zi) in z.iter().enumerate() {
        let row = &mut inverse.data[i * n..(i + 1) * n];
        row.iter_mut().zip(&z).for_each(|(a, &zj)| *a -= s * zi * zj);
    }
}

/// Checks that a checkpointed subspace fits a layer of width `dim`.
pub fn check_width(layer: usize, saved: &Subspace, dim: usize) -> Result<()> {
    if saved.basis.dim() != dim {
        bail!("checkpoint subspace of layer {layer} has width {}, the layer has {dim}", saved.basis.dim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// The blocked product does not depend on the block size, and each entry is the f64 dot
    /// product of the row (widened exactly) with x, for f32 and bf16 weights.
    #[test]
    fn blocked_matvec_is_the_f64_product_whatever_the_block() {
        for (rows, cols) in [(7, 5), (300, 777), (576, 1536)] {
            let w32 = Tensor::from_vec(pseudo(rows * cols, rows as u64), (rows, cols), &Device::Cpu).unwrap();
            let x: Vec<f64> = pseudo(cols, 3).into_iter().map(|v| v as f64 * 1.7).collect();
            for w in [w32.clone(), w32.to_dtype(DType::BF16).unwrap()] {
                let full: Vec<Vec<f64>> = w.to_dtype(DType::F64).unwrap().to_vec2().unwrap();
                let want: Vec<f64> = full.iter().map(|r| dot(r, &x)).collect();
                // Against a plain left-to-right sum: the same up to rounding.
                for (r, &v) in full.iter().zip(&want) {
                    let naive: f64 = r.iter().zip(&x).map(|(a, b)| a * b).sum();
                    assert!((naive - v).abs() <= 1e-12 * (1.0 + v.abs()));
                }
                for block_rows in [1, 3, 64, rows] {
                    let got = matvec_f64(&w, &x, block_rows * cols * 8).unwrap();
                    let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{rows}x{cols}, {block_rows} rows a block");
                }
            }
        }
        let w = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(matvec_f64(&w, &[1.0, 2.0], 64).is_err());
    }
}
