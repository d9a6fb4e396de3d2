//! Per-record scores of the editing metrics, computed from teacher-forced answer scores.
//!
//! Definitions (ROME / MEMIT / EasyEdit), with NLL the length-normalised negative log-likelihood
//! of an answer after a prompt:
//! - efficacy: 1[NLL(target_new | edit prompt) < NLL(ground_truth | edit prompt)]; without a
//!   ground truth, 1[every target_new token is the argmax] (the landing check's criterion);
//!   efficacy_token_acc: fraction of target_new tokens that are the argmax (teacher forcing);
//! - generalization / generalization_token_acc: the same on the paraphrase prompts (averaged);
//! - locality: neighbourhood score 1[NLL(true | p) < NLL(target_new | p)] on neighbourhood prompts;
//!   locality_agreement: fraction of the locality answer's tokens whose argmax is unchanged
//!   from the unedited model.
//!
//! The generation metrics (gen_efficacy, gen_generalization, gen_locality) decode greedily
//! instead: see [`super::generation`].

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::data::EditRecord;
use crate::model::Llama;
use crate::scoring::{score_answers, AnswerScore};
use crate::tokenizer::Tok;

/// Metric names `--metrics` accepts (`gen` stands for the three generation metrics; `-` may
/// replace `_`).
pub const METRICS: &[&str] = &[
    "efficacy",
    "generalization",
    "locality",
    "fluency",
    "gen_efficacy",
    "gen_generalization",
    "gen_locality",
    "gen",
];

/// The scores of one record (None where the record lacks the prompts a metric needs).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RecordScores {
    pub efficacy: Option<f64>,
    pub efficacy_token_acc: Option<f64>,
    pub generalization: Option<f64>,
    pub generalization_token_acc: Option<f64>,
    pub locality: Option<f64>,
    /// Argmax tokens of each locality answer (compared across models for locality_agreement).
    #[serde(skip_serializing, default)]
    pub locality_argmax: Vec<Vec<u32>>,
    pub locality_agreement: Option<f64>,
    pub fluency: Option<f64>,
    /// Whether the greedy continuation of the edit prompt starts with target_new (generation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen_efficacy: Option<f64>,
    /// The same, averaged over the paraphrase prompts (generation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen_generalization: Option<f64>,
    /// Fraction of neighbourhood prompts whose greedy answer is the unedited model's (generation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen_locality: Option<f64>,
    /// Greedy answer tokens on each neighbourhood prompt (compared across models for
    /// gen_locality; a continuation that was stopped at its first difference from the unedited
    /// model's ends with the differing token).
    #[serde(skip_serializing, default)]
    pub locality_greedy: Vec<Vec<u32>>,
}

/// Which metric families to compute.
///
/// Serialised into the keys of the unedited-score cache; the generation metrics are left out
/// when off, so sets without them keep the keys they had before those metrics existed.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MetricSet {
    pub efficacy: bool,
    pub generalization: bool,
    pub locality: bool,
    pub fluency: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub gen_efficacy: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub gen_generalization: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub gen_locality: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl MetricSet {
    /// Parses `efficacy,generalization,...`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut m = MetricSet::default();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let key = name.replace('-', "_").replace("generalisation", "generalization");
            if key == "gen" {
                (m.gen_efficacy, m.gen_generalization, m.gen_locality) = (true, true, true);
                continue;
            }
            // A family's name, or a report column, which names the family that computes it.
            match family_of(&key).and_then(|f| m.flag(f)) {
                Some(on) => *on = true,
                None => return Err(format!("unknown metric `{name}` (known: {})", METRICS.join(", "))),
            }
        }
        if !(m.efficacy || m.generalization || m.locality || m.fluency || m.generation()) {
            return Err("no metric given".into());
        }
        Ok(m)
    }

    /// Whether any generation metric (gen_efficacy, gen_generalization, gen_locality) is on.
    pub fn generation(self) -> bool {
        self.gen_efficacy || self.gen_generalization || self.gen_locality
    }

    /// Whether the set computes report column `column` (a name of [`super::metric_columns`]).
    pub fn measures(mut self, column: &str) -> bool {
        family_of(column).and_then(|f| self.flag(f)).is_some_and(|on| *on)
    }

    /// Clears the scores of `scores` whose family the set leaves out (scores read from a log,
    /// which holds every family `oedit edit --eval-each` measures).
    pub fn keep_measured(self, scores: &mut RecordScores) {
        if !self.efficacy {
            (scores.efficacy, scores.efficacy_token_acc) = (None, None);
        }
        if !self.generalization {
            (scores.generalization, scores.generalization_token_acc) = (None, None);
        }
        if !self.locality {
            (scores.locality, scores.locality_agreement) = (None, None);
            scores.locality_argmax.clear();
        }
        if !self.fluency {
            scores.fluency = None;
        }
        if !self.gen_efficacy {
            scores.gen_efficacy = None;
        }
        if !self.gen_generalization {
            scores.gen_generalization = None;
        }
        if !self.gen_locality {
            scores.gen_locality = None;
            scores.locality_greedy.clear();
        }
    }

    /// The switch of metric family `family` (a name [`family_of`] returns).
    fn flag(&mut self, family: &str) -> Option<&mut bool> {
        Some(match family {
            "efficacy" => &mut self.efficacy,
            "generalization" => &mut self.generalization,
            "locality" => &mut self.locality,
            "fluency" => &mut self.fluency,
            "gen_efficacy" => &mut self.gen_efficacy,
            "gen_generalization" => &mut self.gen_generalization,
            "gen_locality" => &mut self.gen_locality,
            _ => return None,
        })
    }
}

/// The `--metrics` name whose computation gives report column `column` (`efficacy` for
/// `efficacy_token_acc`, `locality` for `locality_agreement`, ...).
pub fn family_of(column: &str) -> Option<&'static str> {
    Some(match column {
        "efficacy" | "efficacy_token_acc" => "efficacy",
        "generalization" | "generalization_token_acc" => "generalization",
        "locality" | "locality_agreement" => "locality",
        "fluency" => "fluency",
        "gen_efficacy" => "gen_efficacy",
        "gen_generalization" => "gen_generalization",
        "gen_locality" => "gen_locality",
        _ => return None,
    })
}

/// One scoring job: a (prompt, answer) pair and where its score goes.
enum Slot {
    EditNew,
    EditTrue,
    ParaNew(usize),
    ParaTrue(usize),
    LocTrue(usize),
    LocNew(usize),
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Fraction of prompts j where `preferred[j]` has a lower mean NLL than `other[j]` (the binary
/// preference of ROME's efficacy / paraphrase / neighbourhood scores).
fn preference_rate(preferred: &[(usize, AnswerScore)], other: &[(usize, AnswerScore)]) -> Option<f64> {
    let prefs: Vec<f64> = preferred
        .iter()
        .filter_map(|(j, p)| {
            let (_, o) = other.iter().find(|(k, _)| k == j)?;
            Some((p.mean_nll < o.mean_nll) as u8 as f64)
        })
        .collect();
    mean(&prefs)
}

/// 1 when every token of the answer is the argmax under teacher forcing (the binary efficacy of
/// a record without a ground truth to compare with).
fn greedy_correct(s: &AnswerScore) -> f64 {
    s.greedy_correct() as u8 as f64
}

/// Scores `records` (batched over records) on `model`: the teacher-forced metrics of `which`.
pub fn score_records(
    model: &Llama,
    tok: &Tok,
    records: &[EditRecord],
    which: MetricSet,
) -> Result<Vec<RecordScores>> {
    let plan = TeacherForcedPlan::new(records, which);
    // One call: score_answers computes each distinct prompt once and packs the rest.
    let scores = score_answers(model, tok, &plan.pairs)?;
    Ok(plan.fill(scores))
}

/// The (prompt, answer) pairs the teacher-forced metrics of some records need, and where each
/// pair's score goes.
pub struct TeacherForcedPlan<'a> {
    /// The pairs to score, for [`crate::scoring::score_answers`].
    pub pairs: Vec<(&'a str, &'a str)>,
    slots: Vec<(usize, Slot)>,
    records: usize,
}

impl<'a> TeacherForcedPlan<'a> {
    /// The pairs of the teacher-forced metrics of `which` on `records`.
    pub fn new(records: &'a [EditRecord], which: MetricSet) -> Self {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        let mut slots: Vec<(usize, Slot)> = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let new = r.target_new.as_str();
            let truth = r.ground_truth.as_deref();
            if which.efficacy {
                pairs.push((&r.prompt, new));
                slots.push((i, Slot::EditNew));
                if let Some(t) = truth {
                    pairs.push((&r.prompt, t));
                    slots.push((i, Slot::EditTrue));
                }
            }
            if which.generalization {
                for (j, p) in r.rephrase_prompts.iter().enumerate() {
                    pairs.push((p, new));
                    slots.push((i, Slot::ParaNew(j)));
                    if let Some(t) = truth {
                        pairs.push((p, t));
                        slots.push((i, Slot::ParaTrue(j)));
                    }
                }
            }
            if which.locality {
                for (j, l) in r.locality.iter().enumerate() {
                    pairs.push((&l.prompt, &l.answer));
                    slots.push((i, Slot::LocTrue(j)));
                    pairs.push((&l.prompt, new));
                    slots.push((i, Slot::LocNew(j)));
                }
            }
        }
        Self { pairs, slots, records: records.len() }
    }

    /// The records' scores from the scores of [`TeacherForcedPlan::pairs`], in order.
    pub fn fill(self, scores: Vec<AnswerScore>) -> Vec<RecordScores> {
        let (slots, n) = (self.slots, self.records);
        let mut out = vec![RecordScores::default(); n];
        // Gather per record.
        #[derive(Default, Clone)]
        struct Acc {
            edit_new: Option<AnswerScore>,
            edit_true: Option<AnswerScore>,
            para_new: Vec<(usize, AnswerScore)>,
            para_true: Vec<(usize, AnswerScore)>,
            loc_true: Vec<(usize, AnswerScore)>,
            loc_new: Vec<(usize, AnswerScore)>,
        }
        let mut acc = vec![Acc::default(); n];
        for ((i, slot), s) in slots.into_iter().zip(scores) {
            let a = &mut acc[i];
            match slot {
                Slot::EditNew => a.edit_new = Some(s),
                Slot::EditTrue => a.edit_true = Some(s),
                Slot::ParaNew(j) => a.para_new.push((j, s)),
                Slot::ParaTrue(j) => a.para_true.push((j, s)),
                Slot::LocTrue(j) => a.loc_true.push((j, s)),
                Slot::LocNew(j) => a.loc_new.push((j, s)),
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            if let Some(n) = &a.edit_new {
                o.efficacy_token_acc = Some(n.token_accuracy);
                o.efficacy = Some(match &a.edit_true {
                    Some(t) => (n.mean_nll < t.mean_nll) as u8 as f64,
                    None => greedy_correct(n),
                });
            }
            if !a.para_new.is_empty() {
                o.generalization_token_acc =
                    mean(&a.para_new.iter().map(|(_, s)| s.token_accuracy).collect::<Vec<_>>());
                o.generalization = if a.para_true.is_empty() {
                    mean(&a.para_new.iter().map(|(_, s)| greedy_correct(s)).collect::<Vec<_>>())
                } else {
                    preference_rate(&a.para_new, &a.para_true)
                };
            }
            if !a.loc_true.is_empty() {
                o.locality = preference_rate(&a.loc_true, &a.loc_new);
                o.locality_argmax = a.loc_true.iter().map(|(_, s)| s.argmax.clone()).collect();
            }
        }
        out
    }
}

/// Fills `locality_agreement` of `edited` by comparing its locality argmax tokens with `base`'s.
pub fn locality_agreement(edited: &mut [RecordScores], base: &[RecordScores]) {
    for (e, b) in edited.iter_mut().zip(base) {
        let mut same = 0usize;
        let mut total = 0usize;
        for (x, y) in e.locality_argmax.iter().zip(&b.locality_argmax) {
            total += x.len();
            same += x.iter().zip(y).filter(|(p, q)| p == q).count();
        }
        e.locality_agreement = (total > 0).then(|| same as f64 / total as f64);
    }
}

/// ROME's generation entropy of one text: the mean of (2/3)·H₂ and (4/3)·H₃, the entropies (bits)
/// of its word bigram and trigram distributions.
pub fn ngram_entropy(text: &str) -> f64 {
    let words: Vec<&str> = text.split_whitespace().collect();
    let ent = |n: usize| -> f64 {
        if words.len() < n {
            return 0.0;
        }
        let mut counts: std::collections::HashMap<&[&str], usize> = std::collections::HashMap::new();
        for w in words.windows(n) {
            *counts.entry(w).or_default() += 1;
        }
        let total: usize = counts.values().sum();
        counts
            .values()
            .map(|&c| {
                let p = c as f64 / total as f64;
                -p * p.log2()
            })
            .sum()
    };
    ((2.0 / 3.0) * ent(2) + (4.0 / 3.0) * ent(3)) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::RecordFormat;

    #[test]
    fn every_report_column_belongs_to_exactly_the_metric_that_computes_it() {
        let all = MetricSet::parse("efficacy,generalization,locality,fluency,gen").unwrap();
        for c in super::super::metric_columns() {
            assert!(all.measures(c.name), "{}", c.name);
            let family = family_of(c.name).unwrap();
            assert_eq!(family, c.name.trim_end_matches("_token_acc").trim_end_matches("_agreement"));
            for name in [family, c.name] {
                assert!(MetricSet::parse(name).unwrap().measures(c.name), "{name} {}", c.name);
            }
            let others = MetricSet::parse(if family == "fluency" { "efficacy" } else { "fluency" }).unwrap();
            assert!(!others.measures(c.name), "{}", c.name);
        }
    }

    fn score(mean_nll: f64, token_accuracy: f64) -> AnswerScore {
        AnswerScore { tokens: 2, sum_nll: 2.0 * mean_nll, mean_nll, token_accuracy, argmax: vec![1, 2] }
    }

    fn record(ground_truth: Option<&str>) -> EditRecord {
        EditRecord {
            case_id: None,
            prompt: "Q is".into(),
            subject: "Q".into(),
            target_new: "new".into(),
            ground_truth: ground_truth.map(Into::into),
            rephrase_prompts: vec!["Q, that is,".into(), "Q was".into()],
            locality: Vec::new(),
            generation_prompts: Vec::new(),
            format: RecordFormat::Minimal,
        }
    }

    fn which() -> MetricSet {
        MetricSet { efficacy: true, generalization: true, ..MetricSet::default() }
    }

    #[test]
    fn efficacy_compares_with_the_ground_truth_when_there_is_one() {
        let recs = [record(Some("old"))];
        let plan = TeacherForcedPlan::new(&recs, which());
        assert_eq!(
            plan.pairs,
            [
                ("Q is", "new"),
                ("Q is", "old"),
                ("Q, that is,", "new"),
                ("Q, that is,", "old"),
                ("Q was", "new"),
                ("Q was", "old")
            ]
        );
        // target_new is preferred on the edit prompt and the first paraphrase although no token
        // of it is the argmax: the comparison decides, not greedy correctness.
        let s = plan.fill(vec![
            score(1.0, 0.0),
            score(2.0, 1.0),
            score(1.0, 0.0),
            score(2.0, 1.0),
            score(3.0, 1.0),
            score(2.0, 0.0),
        ]);
        assert_eq!((s[0].efficacy, s[0].generalization), (Some(1.0), Some(0.5)));
        assert_eq!(s[0].efficacy_token_acc, Some(0.0));
    }

    #[test]
    fn without_a_ground_truth_efficacy_is_greedy_correctness() {
        let recs = [record(None)];
        let plan = TeacherForcedPlan::new(&recs, which());
        assert_eq!(plan.pairs, [("Q is", "new"), ("Q, that is,", "new"), ("Q was", "new")]);
        let s = plan.fill(vec![score(0.1, 1.0), score(0.1, 0.5), score(5.0, 1.0)]);
        assert_eq!((s[0].efficacy, s[0].generalization), (Some(1.0), Some(0.5)));
        let s = TeacherForcedPlan::new(&recs, which()).fill(vec![
            score(0.1, 0.5),
            score(0.1, 0.5),
            score(0.1, 0.5),
        ]);
        assert_eq!((s[0].efficacy, s[0].generalization), (Some(0.0), Some(0.0)));
    }
}
