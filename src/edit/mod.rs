//! One edit, end to end: prompts → k*, v* → the method's weight update → applied to the live
//! weights → per-layer state grown. The sequential run and its checkpoints live in
//! [`crate::run`] and [`crate::session`].

pub mod methods;
pub mod prompts;
pub mod subspace;
pub mod target;
pub mod templates;
pub mod update;

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::EditRecord;
use crate::hparams::Hparams;
use crate::model::Llama;
use crate::scoring::score_answers;
use crate::stats::KeyStats;
use crate::tokenizer::Tok;
use methods::LayerState;
use subspace::AppendReport;

/// Editing method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Plain sequential ROME: rank-one update at one layer, no projection.
    Rome,
    /// MEMIT, batch of one: the residual spread over several layers.
    Memit,
    /// AlphaEdit: the update confined to the null space of the preserved keys' statistics.
    Alphaedit,
    /// O-Edit: the rank-one update projected onto the complement of earlier edits' key subspace.
    Oedit,
    /// O-Edit+: O-Edit in whitened key space (least disturbance of the preserved keys).
    OeditPlus,
    /// Soft O-Edit: earlier edits' directions shrunk by their stored energy, not cut out.
    OeditSoft,
}

impl Method {
    /// The name used on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Method::Rome => "rome",
            Method::Memit => "memit",
            Method::Alphaedit => "alphaedit",
            Method::Oedit => "oedit",
            Method::OeditPlus => "oedit-plus",
            Method::OeditSoft => "oedit-soft",
        }
    }

    /// The layers this method edits.
    pub fn layers(self, hp: &Hparams) -> Vec<usize> {
        match self {
            Method::Memit => hp.memit_layers(),
            _ => vec![hp.layer],
        }
    }
}

/// Adds ΔW = r uᵀ to the down-projection of `layer` (computed in f32). The same function is used
/// live and when a run is replayed on resume, so both give identical bytes.
pub fn apply_rank_one(model: &mut Llama, layer: usize, r: &[f32], u: &[f32]) -> Result<()> {
    let w = model.down_proj(layer);
    let dev = w.device().clone();
    let dw =
        Tensor::from_slice(r, (r.len(), 1), &dev)?.matmul(&Tensor::from_slice(u, (1, u.len()), &dev)?)?;
    let new = (w.to_dtype(DType::F32)? + dw)?;
    model.set_down_proj(layer, new)?;
    Ok(())
}

/// What one edit did (the per-edit fields of log.jsonl).
#[derive(Debug, Clone, Serialize)]
pub struct EditOutcome {
    pub steps: usize,
    pub loss_first: f64,
    pub loss_last: f64,
    pub basis_size: usize,
    pub update_norm: f64,
    pub retained: f64,
    pub p_target_before: f64,
    pub p_target_after: f64,
    /// Whether target_new now beats ground_truth (mean NLL), or is the greedy answer when the
    /// record has no ground truth.
    pub target_wins: bool,
    pub subspace: AppendReport,
    pub key_seconds: f64,
    pub value_seconds: f64,
    pub update_seconds: f64,
}

/// One rank-one factor pair applied by an edit, stored in the checkpoint.
#[derive(Debug, Clone)]
pub struct AppliedUpdate {
    pub layer: usize,
    pub r: Vec<f32>,
    pub u: Vec<f32>,
    /// The key the update was computed for (AlphaEdit and soft O-Edit accumulate k kᵀ of past
    /// edits).
    pub key: Vec<f32>,
}

/// Sequential editor: method, hyper-parameters, templates and the state of each edited layer.
pub struct Editor {
    pub method: Method,
    pub hparams: Hparams,
    pub templates: Vec<String>,
    pub layers: BTreeMap<usize, LayerState>,
}

pub(crate) fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn target_probability(model: &Llama, tok: &Tok, rec: &EditRecord) -> Result<(f64, bool)> {
    let mut pairs = vec![(rec.prompt.as_str(), rec.target_new.as_str())];
    if let Some(gt) = &rec.ground_truth {
        pairs.push((rec.prompt.as_str(), gt.as_str()));
    }
    let s = score_answers(model, tok, &pairs)?;
    let p = (-s[0].sum_nll).exp();
    let wins = match s.get(1) {
        Some(gt) => s[0].mean_nll < gt.mean_nll,
        None => s[0].token_accuracy == 1.0,
    };
    Ok((p, wins))
}

fn residual(model: &Llama, layer: usize, k: &[f64], v_star: &[f64]) -> Result<Vec<f64>> {
    let w = model.down_proj(layer).to_dtype(DType::F64)?;
    let kt = Tensor::from_slice(k, (k.len(), 1), w.device())?;
    let wk: Vec<f64> = w.matmul(&kt)?.flatten_all()?.to_vec1()?;
    Ok(v_star.iter().zip(&wk).map(|(a, b)| a - b).collect())
}

impl Editor {
    /// A fresh editor; `stats` holds the key statistics of every layer the method edits.
    pub fn new(method: Method, hparams: Hparams, templates: Vec<String>, stats: &[KeyStats]) -> Result<Self> {
        let mut layers = BTreeMap::new();
        for l in method.layers(&hparams) {
            let s = stats
                .iter()
                .find(|s| s.layer == l)
                .with_context(|| format!("no key statistics for layer {l}"))?;
            layers.insert(l, LayerState::new(method, &hparams, s)?);
        }
        Ok(Self { method, hparams, templates, layers })
    }

    /// Number of stored subspace directions (the edited layer's; summed for several layers).
    pub fn basis_size(&self) -> usize {
        self.layers.values().map(|s| s.subspace.len()).sum()
    }

    /// Applies one edit to `model`, returning its report and the applied factors.
    pub fn edit(
        &mut self,
        model: &mut Llama,
        tok: &Tok,
        rec: &EditRecord,
    ) -> Result<(EditOutcome, Vec<AppliedUpdate>)> {
        let hp = self.hparams.clone();
        let (p_before, _) = target_probability(model, tok, rec)?;
        let prompts = prompts::build(tok, rec, &self.templates)?;
        let target_layer = *self.method.layers(&hp).last().context("no edited layer")?;
        let mut vhp = hp.clone();
        vhp.layer = target_layer;
        let kv = target::compute_key_value(model, &prompts, &vhp)?;
        let t = Instant::now();
        let mut applied = Vec::new();
        let mut report = AppendReport::default();
        let (mut norm_sq, mut retained) = (0.0, 1.0);
        if self.method == Method::Memit {
            let layers = self.method.layers(&hp);
            let delta: Vec<f64> = kv.v_star.iter().zip(&kv.v_orig).map(|(a, b)| a - b).collect();
            let mut z_star: Option<Vec<f64>> = None;
            for (i, &l) in layers.iter().enumerate() {
                let (k, z) = target::subject_state(model, &prompts, l, target_layer)?;
                let z_star = z_star.get_or_insert_with(|| z.iter().zip(&delta).map(|(a, b)| a + b).collect());
                let remaining = (layers.len() - i) as f64;
                let resid: Vec<f64> = z_star.iter().zip(&z).map(|(a, b)| (a - b) / remaining).collect();
                let state = self.layers.get_mut(&l).context("missing layer state")?;
                let upd = state.memit_update(&k, &resid, hp.memit.mom2_weight)?;
                norm_sq += upd.norm().powi(2);
                let a = AppliedUpdate { layer: l, r: to_f32(&upd.r), u: to_f32(&upd.u), key: to_f32(&k) };
                apply_rank_one(model, l, &a.r, &a.u)?;
                applied.push(a);
            }
        } else {
            let l = hp.layer;
            let r = residual(model, l, &kv.k_star, &kv.v_star)?;
            let state = self.layers.get_mut(&l).context("missing layer state")?;
            let key32 = to_f32(&kv.k_star);
            let upd = state.update(self.method, &hp, &kv.k_star, &key32, &r)?;
            norm_sq = upd.norm().powi(2);
            retained = upd.retained;
            let a = AppliedUpdate { layer: l, r: to_f32(&upd.r), u: to_f32(&upd.u), key: key32 };
            apply_rank_one(model, l, &a.r, &a.u)?;
            applied.push(a);
            report = state.after_update(self.method, &hp, &kv.k_star, &kv.template_keys);
            report.released = state.released;
            report.compressed_away += state.compressed;
        }
        let update_seconds = t.elapsed().as_secs_f64();
        let (p_after, wins) = target_probability(model, tok, rec)?;
        let outcome = EditOutcome {
            steps: kv.steps,
            loss_first: kv.loss_first,
            loss_last: kv.loss_last,
            basis_size: self.basis_size(),
            update_norm: norm_sq.sqrt(),
            retained,
            p_target_before: p_before,
            p_target_after: p_after,
            target_wins: wins,
            subspace: report,
            key_seconds: kv.key_seconds,
            value_seconds: kv.value_seconds,
            update_seconds,
        };
        Ok((outcome, applied))
    }
}
