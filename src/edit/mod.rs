//! One edit, end to end: prompts → k*, v* → (projected) rank-one update → applied to the live
//! weights → subspace grown. The sequential run and its checkpoints live in [`crate::run`].

pub mod prompts;
pub mod subspace;
pub mod target;
pub mod templates;
pub mod update;

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::EditRecord;
use crate::hparams::Hparams;
use crate::model::Llama;
use crate::scoring::score_answers;
use crate::tokenizer::Tok;
use subspace::{AppendReport, Subspace};
use update::{projected_rank_one, Preconditioner, RankOne};

/// Editing method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Plain sequential ROME: rank-one update, no projection.
    Rome,
    /// O-Edit: the rank-one update projected onto the complement of earlier edits' key subspace.
    Oedit,
}

impl Method {
    /// The name used on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Method::Rome => "rome",
            Method::Oedit => "oedit",
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

/// The factors applied by one edit, stored in the checkpoint.
#[derive(Debug, Clone)]
pub struct AppliedUpdate {
    pub layer: usize,
    pub r: Vec<f32>,
    pub u: Vec<f32>,
}

/// Sequential editor state for one layer: method, hyper-parameters, templates, C⁻¹, subspace.
pub struct Editor {
    pub method: Method,
    pub hparams: Hparams,
    pub templates: Vec<String>,
    pub pre: Preconditioner,
    pub subspace: Subspace,
}

fn to_f32(v: &[f64]) -> Vec<f32> {
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

impl Editor {
    /// Applies one edit to `model`, returning its report and the applied factors.
    pub fn edit(
        &mut self,
        model: &mut Llama,
        tok: &Tok,
        rec: &EditRecord,
    ) -> Result<(EditOutcome, AppliedUpdate)> {
        let hp = self.hparams.clone();
        let (p_before, _) = target_probability(model, tok, rec)?;
        let prompts = prompts::build(tok, rec, &self.templates)?;
        let kv = target::compute_key_value(model, &prompts, &hp)?;
        let t = Instant::now();
        let w = model.down_proj(hp.layer).to_dtype(DType::F64)?;
        let k = Tensor::from_slice(&kv.k_star, (kv.k_star.len(), 1), w.device())?;
        let wk: Vec<f64> = w.matmul(&k)?.flatten_all()?.to_vec1()?;
        let r: Vec<f64> = kv.v_star.iter().zip(&wk).map(|(a, b)| a - b).collect();
        let upd = self.rank_one(&kv.k_star, &r)?;
        let applied = AppliedUpdate { layer: hp.layer, r: to_f32(&upd.r), u: to_f32(&upd.u) };
        apply_rank_one(model, hp.layer, &applied.r, &applied.u)?;
        let report = match self.method {
            Method::Oedit => self.subspace.append(&kv.k_star, &kv.template_keys, &hp.subspace),
            Method::Rome => AppendReport::default(),
        };
        let update_seconds = t.elapsed().as_secs_f64();
        let (p_after, wins) = target_probability(model, tok, rec)?;
        let outcome = EditOutcome {
            steps: kv.steps,
            loss_first: kv.loss_first,
            loss_last: kv.loss_last,
            basis_size: self.subspace.len(),
            update_norm: upd.norm(),
            retained: upd.retained,
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

    /// The rank-one factors for this method; O-Edit compresses a saturated subspace and retries.
    fn rank_one(&mut self, k_star: &[f64], r: &[f64]) -> Result<RankOne> {
        match self.method {
            Method::Rome => projected_rank_one(&self.pre, None, k_star, r),
            Method::Oedit => match projected_rank_one(&self.pre, Some(&self.subspace), k_star, r) {
                Ok(u) => Ok(u),
                Err(_) => {
                    let keep = self.subspace.len() / 2;
                    self.subspace.compress(keep);
                    projected_rank_one(&self.pre, Some(&self.subspace), k_star, r)
                        .context("projected update failed even after compressing the subspace")
                }
            },
        }
    }
}
