//! `oedit eval`: efficacy, generalization, locality and fluency of an edited model against the
//! unedited one, on the same records, with the protocol written into every report.

pub mod baseline_cache;
pub mod metrics;
pub mod report;
pub mod run_eval;

use anyhow::Result;
use serde::Serialize;

use crate::data::EditRecord;
use crate::infer::greedy_ids;
use crate::model::Llama;
use crate::progress::Progress;
use crate::tokenizer::Tok;
pub use baseline_cache::score_unedited;
pub use metrics::{locality_agreement, ngram_entropy, score_records, MetricSet, RecordScores};
pub use report::{parse_thresholds, summaries, Report, Threshold, Timing};
pub use run_eval::{evaluate, read_records, EvalOptions, EvalRecords, EvalRun};

/// Records per scoring batch: one call of [`score_records`], whose pairs are packed together
/// (prompts sharing their first tokens are computed once, so larger batches share more).
const RECORDS_PER_BATCH: usize = 256;

/// Records per fluency batch (greedy generation of all their prompts at once).
const RECORDS_PER_GENERATION: usize = 16;

/// Mean and count of one metric on one model.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    pub mean: f64,
    pub count: usize,
}

/// Summarises one metric over records.
pub fn summarize(values: impl Iterator<Item = Option<f64>>) -> Option<Summary> {
    let v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| Summary { mean: v.iter().sum::<f64>() / v.len() as f64, count: v.len() })
}

/// Reads one metric of a record's scores.
pub type MetricGetter = fn(&RecordScores) -> Option<f64>;

/// The names of the reported metrics, in report order, with an accessor.
pub fn metric_columns() -> Vec<(&'static str, MetricGetter)> {
    vec![
        ("efficacy", |r| r.efficacy),
        ("efficacy_token_acc", |r| r.efficacy_token_acc),
        ("generalization", |r| r.generalization),
        ("generalization_token_acc", |r| r.generalization_token_acc),
        ("locality", |r| r.locality),
        ("locality_agreement", |r| r.locality_agreement),
        ("fluency", |r| r.fluency),
    ]
}

/// Scores all `records` on `model` in batches, with a progress bar; fluency from greedy
/// generations of `gen_tokens` tokens on the generation prompts (else the edit prompt).
pub fn score_all(
    model: &Llama,
    tok: &Tok,
    records: &[EditRecord],
    which: MetricSet,
    gen_tokens: usize,
    label: &str,
) -> Result<Vec<RecordScores>> {
    let bar = Progress::new(records.len() as u64, label, "records");
    let mut out = Vec::with_capacity(records.len());
    for chunk in records.chunks(RECORDS_PER_BATCH) {
        let mut s = score_records(model, tok, chunk, which)?;
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
        out.extend(s);
    }
    bar.finish();
    Ok(out)
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
