//! The report of `oedit eval` (README's report schema), its summaries and thresholds.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;

use super::generation::SLACK_TOKENS;
use super::{metric_columns, summarize, MetricSet, RecordScores, Summary};
use crate::data::RecordError;
use crate::errors::InputError;

/// When each record is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Timing {
    /// Every record on the model after all edits (the sequential-editing setting).
    AfterAll,
    /// Every record right after its own edit (read from the run's log; needs `oedit edit --eval-each`).
    AfterEach,
}

impl Timing {
    /// The name used in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Timing::AfterAll => "after-all",
            Timing::AfterEach => "after-each",
        }
    }
}

/// Metric summaries of one model, by metric name.
pub type Summaries = BTreeMap<String, Summary>;

/// The JSON report of `oedit eval`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The version of oedit that wrote the report.
    pub oedit_version: String,
    /// The evaluated model.
    pub model: ModelInfo,
    /// The evaluated run (null without `--run`).
    pub run: Option<RunInfo>,
    /// The edits file as given.
    pub edits_file: String,
    /// Records evaluated and skipped.
    pub records: RecordsInfo,
    /// The definitions used.
    pub protocol: Protocol,
    /// The summaries, edited and unedited side by side.
    pub metrics: Metrics,
    /// Wall time of the whole command.
    pub seconds: f64,
    /// With `--per-record`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_record: Option<Vec<PerRecord>>,
}

/// The evaluated model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The `--model` argument.
    pub arg: String,
    /// Fingerprint of its configuration and weights.
    pub fingerprint: String,
}

/// The evaluated run.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// The run directory as given.
    pub dir: String,
    /// Edits on the evaluated model (`--at`, else all committed; after-each: records evaluated).
    pub n_edits: Option<usize>,
    /// The run's method.
    pub method: Option<String>,
    /// The run's edited layer (hyper-parameter `layer`).
    pub layer: Option<usize>,
}

/// How many records were evaluated and which were skipped.
#[derive(Debug, Clone, Serialize)]
pub struct RecordsInfo {
    /// Records scored.
    pub evaluated: usize,
    /// Invalid input lines, not scored.
    pub skipped: Vec<Skipped>,
}

/// An input line that is not a valid record (e.g. an empty ZsRE target).
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// 1-based input line.
    pub line: usize,
    /// The offending field, when one applies.
    pub field: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl From<&RecordError> for Skipped {
    fn from(e: &RecordError) -> Self {
        Self { line: e.line, field: e.field.clone(), reason: e.reason.clone() }
    }
}

/// The definitions the metrics were computed with.
#[derive(Debug, Clone, Serialize)]
pub struct Protocol {
    /// `after-all` or `after-each`.
    pub timing: &'static str,
    /// Definition of `efficacy`.
    pub efficacy: &'static str,
    /// Definition of `efficacy_token_acc`.
    pub efficacy_token_acc: &'static str,
    /// Definition of `generalization`.
    pub generalization: &'static str,
    /// Definition of `generalization_token_acc`.
    pub generalization_token_acc: &'static str,
    /// Definition of `locality`.
    pub locality: &'static str,
    /// Definition of `locality_agreement`.
    pub locality_agreement: &'static str,
    /// Definition of `fluency` (with the generated token count).
    pub fluency: String,
    /// Definition of `gen_efficacy`.
    pub gen_efficacy: String,
    /// Definition of `gen_generalization`.
    pub gen_generalization: &'static str,
    /// Definition of `gen_locality`.
    pub gen_locality: &'static str,
    /// The protocol of each metric: `teacher-forced` (answers given, scored token by token) or
    /// `generation` (the model's own greedy continuation).
    pub metric_protocols: BTreeMap<&'static str, &'static str>,
    /// How prompts and answers are tokenised.
    pub prompt_form: PromptForm,
}

/// How prompts and answers are tokenised.
#[derive(Debug, Clone, Serialize)]
pub struct PromptForm {
    /// Whether prompts start with the model's BOS token.
    pub bos: bool,
    /// How answers are joined to prompts.
    pub answer_leading_space: &'static str,
}

impl Protocol {
    /// The protocol of this implementation, for `timing`, `gen_tokens` generated tokens and
    /// prompts with or without BOS.
    pub fn new(timing: Timing, gen_tokens: usize, bos: bool) -> Self {
        Self {
            timing: timing.name(),
            efficacy: "binary: mean NLL(target_new) < mean NLL(ground_truth) on the edit prompt (length-normalised log-probabilities, CounterFact efficacy score); for a record without a ground truth (or whose ground truth is target_new), every target_new token is the argmax under teacher forcing",
            efficacy_token_acc: "fraction of target_new tokens that are the argmax under teacher forcing (ZsRE/EasyEdit reliability)",
            generalization: "as efficacy, averaged over the paraphrase prompts",
            generalization_token_acc: "as efficacy_token_acc, averaged over the paraphrase prompts",
            locality: "binary: mean NLL(true answer) < mean NLL(target_new) on neighbourhood prompts (neighbourhood score)",
            locality_agreement: match timing {
                Timing::AfterAll => "fraction of the locality answer's tokens whose teacher-forced argmax is unchanged from the unedited model",
                Timing::AfterEach => "fraction of the locality answer's tokens whose teacher-forced argmax is unchanged from the model right before the record's edit (after-each)",
            },
            fluency: format!("generation entropy: mean of (2/3)H2 and (4/3)H3 of word n-grams (bits) of {gen_tokens} greedy tokens per generation prompt (edit prompt when none)"),
            gen_efficacy: format!("binary: the greedy continuation of the edit prompt (at most target_new's token count + {SLACK_TOKENS} tokens) starts with target_new, compared as text after dropping its leading whitespace, case-insensitively, ending at a word boundary (end of text or a non-alphanumeric character)"),
            gen_generalization: "as gen_efficacy, averaged over the paraphrase prompts",
            gen_locality: "fraction of neighbourhood prompts whose greedy answer (as many tokens as the true answer has) is token for token the unedited model's (1.0 for the unedited model by definition)",
            metric_protocols: metric_columns().iter().map(|c| (c.name, c.protocol)).collect(),
            prompt_form: PromptForm {
                bos,
                answer_leading_space: "a space is inserted between prompt and answer unless the prompt ends with whitespace; answer tokens are the suffix of the joint tokenisation",
            },
        }
    }
}

/// Metric summaries of the edited model and of the unedited one (null without one).
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    /// The edited model (without a run: the model as it stands).
    pub edited: Summaries,
    /// The unedited model, when there is one.
    pub unedited: Option<Summaries>,
}

/// One record's scores on both models.
#[derive(Debug, Clone, Serialize)]
pub struct PerRecord {
    /// 1-based input line.
    pub line: usize,
    /// The record's case id.
    pub case_id: Option<u64>,
    /// Scores on the edited model.
    pub edited: AskedScores,
    /// Scores on the unedited model, when there is one.
    pub unedited: Option<AskedScores>,
}

/// A record's scores as the report writes them: every generation metric asked for is present
/// (null where the record lacks its prompts), the others are left out.
#[derive(Debug, Clone, Serialize)]
pub struct AskedScores {
    #[serde(flatten)]
    scores: RecordScores,
    #[serde(flatten)]
    missing: MissingGeneration,
}

/// The generation metrics asked for that a record has no score for (serialised as null).
#[derive(Debug, Clone, Default, Serialize)]
struct MissingGeneration {
    #[serde(skip_serializing_if = "Option::is_none")]
    gen_efficacy: Option<Option<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gen_generalization: Option<Option<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gen_locality: Option<Option<f64>>,
}

impl AskedScores {
    /// `scores` as measured with the metric set `which`.
    pub fn new(scores: RecordScores, which: MetricSet) -> Self {
        let missing = |asked: bool, got: Option<f64>| (asked && got.is_none()).then_some(None);
        let missing = MissingGeneration {
            gen_efficacy: missing(which.gen_efficacy, scores.gen_efficacy),
            gen_generalization: missing(which.gen_generalization, scores.gen_generalization),
            gen_locality: missing(which.gen_locality, scores.gen_locality),
        };
        Self { scores, missing }
    }
}

/// The summary of every metric measured on `scores`.
pub fn summaries(scores: &[RecordScores]) -> Summaries {
    metric_columns()
        .into_iter()
        .filter_map(|c| summarize(scores.iter().map(c.get), c.protocol).map(|s| (c.name.to_string(), s)))
        .collect()
}

/// A `--fail-under` threshold: the edited model's `metric` must be at least `min`.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// A metric name of the report.
    pub metric: String,
    /// The smallest acceptable mean.
    pub min: f64,
}

/// Parses `efficacy=0.9,locality=0.5` (an [`InputError`] for an unknown metric or a bad value).
pub fn parse_thresholds(s: &str) -> Result<Vec<Threshold>> {
    let known: Vec<&str> = metric_columns().iter().map(|c| c.name).collect();
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| InputError(format!("--fail-under: `{p}` is not METRIC=VALUE")))?;
            // `-` may replace `_` and `generalisation` `generalization`, as in `--metrics`.
            let k = k.trim().replace('-', "_").replace("generalisation", "generalization");
            if !known.contains(&k.as_str()) {
                return Err(InputError(format!(
                    "--fail-under: unknown metric `{k}` (known: {})",
                    known.join(", ")
                ))
                .into());
            }
            let min = v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|m| m.is_finite())
                .ok_or_else(|| InputError(format!("--fail-under: `{v}` is not a finite number")))?;
            Ok(Threshold { metric: k, min })
        })
        .collect()
}

impl Report {
    /// The thresholds the edited model misses, described (`efficacy = 0.8000 < 0.9`).
    pub fn failures(&self, thresholds: &[Threshold]) -> Vec<String> {
        thresholds
            .iter()
            .filter_map(|t| match self.metrics.edited.get(&t.metric).map(|s| s.mean) {
                Some(g) if g >= t.min => None,
                Some(g) => Some(format!("{} = {g:.4} < {}", t.metric, t.min)),
                None => Some(format!("{} was not measured", t.metric)),
            })
            .collect()
    }
}
