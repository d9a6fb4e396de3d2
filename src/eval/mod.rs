//! `oedit eval`: efficacy, generalization, locality and fluency of an edited model against the
//! unedited one, on the same records, with the protocol written into every report: the
//! teacher-forced metrics ([`metrics`]) and the generation-based ones ([`generation`]).

pub mod baseline_cache;
pub mod generation;
pub mod metrics;
pub mod report;
pub mod run_eval;

use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::Serialize;

use crate::data::EditRecord;
use crate::infer::greedy_ids;
use crate::model::Llama;
use crate::progress::Progress;
use crate::scoring::{score_and_decode, score_answers};
use crate::tokenizer::Tok;
pub use baseline_cache::score_unedited;
pub use generation::{generation_locality, generation_scores, GenerationPlan};
pub use metrics::{
    locality_agreement, ngram_entropy, score_records, MetricSet, RecordScores, TeacherForcedPlan,
};
pub use report::{parse_thresholds, summaries, Report, Threshold, Timing};
pub use run_eval::{evaluate, read_records, EvalOptions, EvalRecords, EvalRun};

/// Records per scoring batch: one call of [`score_records`], whose pairs are packed together
/// (prompts sharing their first tokens are computed once, so larger batches share more).
const RECORDS_PER_BATCH: usize = 256;

/// Chunks of [`RECORDS_PER_BATCH`] records scored at once on the CPU (two keep two cores busy
/// and bound the activations and decoding caches held at once on larger machines and models).
const CONCURRENT_CHUNKS: usize = 2;

/// Records per fluency batch (greedy generation of all their prompts at once). Each decoding
/// step reads every weight once for all rows, so more rows amortise it: on SmolLM2, 300 records
/// took 93 s at 16, 64 s at 64, 56 s at 128 and 53 s at 256 (peak memory 2.1 GB at 128, 2.6 GB
/// at 256; the key/value cache grows with the rows).
const RECORDS_PER_GENERATION: usize = 128;

/// Mean and count of one metric on one model, with the protocol it was measured under.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    pub mean: f64,
    pub count: usize,
    /// [`TEACHER_FORCED`] or [`GENERATION`].
    pub protocol: &'static str,
}

/// Protocol label of a metric scored on given answers under teacher forcing.
pub const TEACHER_FORCED: &str = "teacher-forced";
/// Protocol label of a metric computed from the model's own greedy generations.
pub const GENERATION: &str = "generation";

/// Summarises one metric, measured under `protocol`, over records.
pub fn summarize(values: impl Iterator<Item = Option<f64>>, protocol: &'static str) -> Option<Summary> {
    let v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| Summary {
        mean: v.iter().sum::<f64>() / v.len() as f64,
        count: v.len(),
        protocol,
    })
}

/// Reads one metric of a record's scores.
pub type MetricGetter = fn(&RecordScores) -> Option<f64>;

/// One reported metric.
#[derive(Clone, Copy)]
pub struct MetricColumn {
    /// Its name in reports and `--fail-under`.
    pub name: &'static str,
    /// [`TEACHER_FORCED`] or [`GENERATION`].
    pub protocol: &'static str,
    /// Reads it from a record's scores.
    pub get: MetricGetter,
}

/// The reported metrics, in report order.
pub fn metric_columns() -> Vec<MetricColumn> {
    let col = |name, protocol, get| MetricColumn { name, protocol, get };
    vec![
        col("efficacy", TEACHER_FORCED, |r| r.efficacy),
        col("efficacy_token_acc", TEACHER_FORCED, |r| r.efficacy_token_acc),
        col("generalization", TEACHER_FORCED, |r| r.generalization),
        col("generalization_token_acc", TEACHER_FORCED, |r| r.generalization_token_acc),
        col("locality", TEACHER_FORCED, |r| r.locality),
        col("locality_agreement", TEACHER_FORCED, |r| r.locality_agreement),
        col("gen_efficacy", GENERATION, |r| r.gen_efficacy),
        col("gen_generalization", GENERATION, |r| r.gen_generalization),
        col("gen_locality", GENERATION, |r| r.gen_locality),
        col("fluency", GENERATION, |r| r.fluency),
    ]
}

/// Scores all `records` on `model` in batches, with a progress bar; fluency from greedy
/// generations of `gen_tokens` tokens on the generation prompts (else the edit prompt); the
/// generation metrics with `reference`, the unedited model's scores of the same records when
/// `model` is an edited one (see [`generation_scores`]).
pub fn score_all(
    model: &Llama,
    tok: &Tok,
    records: &[EditRecord],
    which: MetricSet,
    gen_tokens: usize,
    label: &str,
    reference: Option<&[RecordScores]>,
) -> Result<Vec<RecordScores>> {
    if let Some(r) = reference.filter(|r| r.len() != records.len()) {
        bail!("{} reference scores for {} records", r.len(), records.len());
    }
    let bar = Progress::new(records.len() as u64, label, "records");
    // On the CPU, CONCURRENT_CHUNKS chunks are scored at once: each chunk's passes also run
    // single-threaded work (tokenising, packing, the attention masks, candle's elementwise
    // kernels) that would leave other cores idle, and a worker waiting inside a matrix product
    // helps with the other chunk's products. The chunks are fixed by the record count only, so
    // the scores do not depend on the thread count.
    let in_flight = if model.device().is_cpu() { CONCURRENT_CHUNKS } else { 1 };
    let chunks: Vec<&[EditRecord]> = records.chunks(RECORDS_PER_BATCH).collect();
    let score = |c: usize, chunk: &[EditRecord]| -> Result<Vec<RecordScores>> {
        let at = c * RECORDS_PER_BATCH;
        let refs = reference.map(|r| &r[at..at + chunk.len()]);
        let mut s = score_chunk(model, tok, chunk, which, refs)?;
        if which.fluency {
            for (scores, recs) in
                s.chunks_mut(RECORDS_PER_GENERATION).zip(chunk.chunks(RECORDS_PER_GENERATION))
            {
                for (sc, f) in scores.iter_mut().zip(fluency_batch(model, tok, recs, gen_tokens)?) {
                    sc.fluency = Some(f);
                }
                bar.inc(recs.len() as u64);
            }
        } else {
            bar.inc(chunk.len() as u64);
        }
        Ok(s)
    };
    let mut scored: Vec<Result<Vec<RecordScores>>> = Vec::with_capacity(chunks.len());
    for (g, group) in chunks.chunks(in_flight).enumerate() {
        let first = g * in_flight;
        scored.par_extend(group.par_iter().enumerate().map(|(i, chunk)| score(first + i, chunk)));
        if scored.iter().any(|s| s.is_err()) {
            break;
        }
    }
    let mut out = Vec::with_capacity(records.len());
    for s in scored {
        out.extend(s?);
    }
    bar.finish();
    Ok(out)
}

/// The teacher-forced and generation metrics of `records`, in one set of packed passes (prompts
/// that are both scored and continued are computed once).
fn score_chunk(
    model: &Llama,
    tok: &Tok,
    records: &[EditRecord],
    which: MetricSet,
    reference: Option<&[RecordScores]>,
) -> Result<Vec<RecordScores>> {
    let tf = TeacherForcedPlan::new(records, which);
    if !which.generation() {
        let answers = score_answers(model, tok, &tf.pairs)?;
        return Ok(tf.fill(answers));
    }
    let plan = GenerationPlan::new(tok, records, which, reference)?;
    let (answers, gens) =
        score_and_decode(model, tok, &tf.pairs, plan.requests(), &mut |k, t| plan.stop(tok, k, t))?;
    let mut scores = tf.fill(answers);
    plan.fill(tok, gens, &mut scores)?;
    Ok(scores)
}

/// Generation entropy of the greedy continuations of each record's generation prompts (the
/// edit prompt when it has none), averaged per record; all prompts generated in one batch.
pub fn fluency_batch(
    model: &Llama,
    tok: &Tok,
    records: &[EditRecord],
    gen_tokens: usize,
) -> Result<Vec<f64>> {
    let mut prompts: Vec<(usize, &str)> = Vec::new();
    for (i, rec) in records.iter().enumerate() {
        if rec.generation_prompts.is_empty() {
            prompts.push((i, rec.prompt.as_str()));
        } else {
            prompts.extend(rec.generation_prompts.iter().map(|p| (i, p.as_str())));
        }
    }
    let ids = prompts.iter().map(|(_, p)| tok.encode_prompt(p)).collect::<Result<Vec<_>>>()?;
    let gens = greedy_ids(model, tok, &ids, gen_tokens)?;
    let mut sum = vec![0.0; records.len()];
    let mut count = vec![0usize; records.len()];
    for ((i, p), g) in prompts.iter().zip(&gens) {
        sum[*i] += ngram_entropy(&format!("{p}{}", tok.decode(g)?));
        count[*i] += 1;
    }
    Ok(sum.iter().zip(&count).map(|(s, &c)| s / c.max(1) as f64).collect())
}
