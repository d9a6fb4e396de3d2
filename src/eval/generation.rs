//! Generation-based metrics: what the model says when it decodes greedily, not how it scores a
//! given answer under teacher forcing (which leaks the answer's length and tokens and overstates
//! success; "The Mirage of Model Editing", 2025).
//!
//! - gen_efficacy: 1[the greedy continuation of the edit prompt starts with target_new];
//! - gen_generalization: the same on each paraphrase prompt, averaged per record;
//! - gen_locality: fraction of neighbourhood prompts whose greedy answer (as many tokens as the
//!   true answer has) is token for token the unedited model's.
//!
//! "Starts with" compares text: leading whitespace of the continuation is dropped, both sides
//! are lower-cased, and the target must end at a word boundary (the continuation ends there or
//! goes on with a character that is not alphanumeric: "Paris," and "Paris." count,
//! "Parisian" does not). At most target_new's token count plus [`SLACK_TOKENS`] tokens are
//! decoded, and decoding stops as soon as the text decides the outcome. All continuations of a
//! batch of records are decoded together ([`crate::decode`]); the teacher-forced answer is used
//! as the draft, so an edit that took costs no decoding step.

use anyhow::Result;

use super::{MetricSet, RecordScores};
use crate::data::EditRecord;
use crate::decode::{decode, greedy_pick, Request};
use crate::model::Llama;
use crate::tokenizer::Tok;

/// Tokens decoded beyond target_new's own count: room for a different tokenisation of the same
/// text and for the character after it.
pub const SLACK_TOKENS: usize = 3;

/// The outcome of comparing a continuation with the target, as far as it is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The continuation starts with the target, at a word boundary.
    Match,
    /// It does not.
    Miss,
    /// It could still go either way (it is a prefix of the target, or equals it with nothing
    /// after yet).
    Open,
}

fn normalise(s: &str) -> String {
    s.trim_start().to_lowercase()
}

/// Compares `generated` (the decoded continuation so far) with `target` (see the module doc);
/// with `ended`, nothing more will come, so an open comparison is decided.
pub fn verdict(generated: &str, target: &str, ended: bool) -> Verdict {
    let (g, t) = (normalise(generated), normalise(target));
    let v = match g.strip_prefix(t.as_str()) {
        Some(rest) => match rest.chars().next() {
            None => Verdict::Open,
            Some('\u{FFFD}') if !ended => Verdict::Open,
            Some(c) if c.is_alphanumeric() => Verdict::Miss,
            Some(_) => Verdict::Match,
        },
        // A continuation still short of the target, or ending in an incomplete UTF-8 sequence
        // (decoded as U+FFFD), may yet become it.
        None if t.starts_with(g.trim_end_matches('\u{FFFD}')) => Verdict::Open,
        None => Verdict::Miss,
    };
    match (v, ended) {
        (Verdict::Open, true) if g == t => Verdict::Match,
        (Verdict::Open, true) => Verdict::Miss,
        _ => v,
    }
}

/// Where a decoded continuation belongs.
enum Slot {
    /// Edit prompt (None) or paraphrase j: compared with target_new.
    Target(Option<usize>),
    /// A neighbourhood prompt (in order): its greedy answer is kept.
    Neighbour,
}

/// Computes the generation metrics `which` asks for into `scores` (one per record): gen_efficacy,
/// gen_generalization, and each neighbourhood prompt's greedy answer (`locality_greedy`;
/// gen_locality itself needs the unedited model's, see [`generation_locality`]).
///
/// `reference`, when given, holds the unedited model's scores of the same records: its greedy
/// neighbourhood answers serve as drafts, and a neighbourhood continuation stops at its first
/// token that differs from the reference's (which decides gen_locality).
pub fn generation_scores(
    model: &Llama,
    tok: &Tok,
    records: &[EditRecord],
    which: MetricSet,
    reference: Option<&[RecordScores]>,
    scores: &mut [RecordScores],
) -> Result<()> {
    let plan = GenerationPlan::new(tok, records, which, reference)?;
    let out = decode(model, tok, plan.requests(), &mut greedy_pick, &mut |k, t| plan.stop(tok, k, t))?;
    plan.fill(tok, out, scores)
}

/// The greedy continuations the generation metrics of some records need (see
/// [`generation_scores`]), when to stop each, and where each goes.
pub struct GenerationPlan<'a> {
    which: MetricSet,
    reqs: Vec<Request>,
    slots: Vec<(usize, Slot)>,
    /// The text each continuation is compared with (edit and paraphrase prompts).
    targets: Vec<Option<&'a str>>,
    /// The unedited model's answer a neighbourhood continuation is compared with.
    reference: Vec<Option<&'a [u32]>>,
}

impl<'a> GenerationPlan<'a> {
    /// The continuations of the generation metrics of `which` on `records` (`reference`: the
    /// unedited model's scores of the same records, if `records` are scored on an edited model).
    pub fn new(
        tok: &Tok,
        records: &'a [EditRecord],
        which: MetricSet,
        reference: Option<&'a [RecordScores]>,
    ) -> Result<Self> {
        let mut plan =
            Self { which, reqs: Vec::new(), slots: Vec::new(), targets: Vec::new(), reference: Vec::new() };
        for (i, r) in records.iter().enumerate() {
            let mut target_prompts: Vec<(Option<usize>, &str)> = Vec::new();
            if which.gen_efficacy {
                target_prompts.push((None, &r.prompt));
            }
            if which.gen_generalization {
                target_prompts
                    .extend(r.rephrase_prompts.iter().enumerate().map(|(j, p)| (Some(j), p.as_str())));
            }
            for (j, p) in target_prompts {
                let draft = tok.encode_continuation(p, &r.target_new)?;
                let max_new = draft.len() + SLACK_TOKENS;
                plan.reqs.push(Request { prompt: tok.encode_prompt(p)?, draft, max_new });
                plan.slots.push((i, Slot::Target(j)));
                plan.targets.push(Some(&r.target_new));
                plan.reference.push(None);
            }
            if which.gen_locality {
                for (j, l) in r.locality.iter().enumerate() {
                    let answer = tok.encode_continuation(&l.prompt, &l.answer)?;
                    let max_new = answer.len();
                    let refd = reference.and_then(|b| b.get(i)).and_then(|b| b.locality_greedy.get(j));
                    let draft = refd.cloned().unwrap_or(answer);
                    plan.reqs.push(Request { prompt: tok.encode_prompt(&l.prompt)?, draft, max_new });
                    plan.slots.push((i, Slot::Neighbour));
                    plan.targets.push(None);
                    plan.reference.push(refd.map(Vec::as_slice));
                }
            }
        }
        Ok(plan)
    }

    /// The decoding requests, in order.
    pub fn requests(&self) -> &[Request] {
        &self.reqs
    }

    /// Whether continuation `k`, at `tokens` so far, decides its outcome already.
    pub fn stop(&self, tok: &Tok, k: usize, tokens: &[u32]) -> bool {
        if let Some(t) = self.targets[k] {
            // A continuation that does not decode (it will at the end) is not decided yet.
            return tok.decode(tokens).is_ok_and(|g| verdict(&g, t, false) != Verdict::Open);
        }
        self.reference[k].is_some_and(|r| tokens.len() > r.len() || tokens.iter().zip(r).any(|(a, b)| a != b))
    }

    /// Fills the generation metrics of `scores` (one per record) from the decoded continuations.
    pub fn fill(self, tok: &Tok, out: Vec<Vec<u32>>, scores: &mut [RecordScores]) -> Result<()> {
        let mut para: Vec<Vec<f64>> = vec![Vec::new(); scores.len()];
        for s in scores.iter_mut() {
            s.locality_greedy.clear();
        }
        for (((i, slot), gen), target) in self.slots.into_iter().zip(out).zip(&self.targets) {
            match slot {
                Slot::Target(j) => {
                    let text = tok.decode(&gen)?;
                    let hit =
                        (verdict(&text, target.unwrap_or_default(), true) == Verdict::Match) as u8 as f64;
                    match j {
                        None => scores[i].gen_efficacy = Some(hit),
                        Some(_) => para[i].push(hit),
                    }
                }
                Slot::Neighbour => scores[i].locality_greedy.push(gen),
            }
        }
        if self.which.gen_generalization {
            for (s, p) in scores.iter_mut().zip(para) {
                s.gen_generalization = (!p.is_empty()).then(|| p.iter().sum::<f64>() / p.len() as f64);
            }
        }
        Ok(())
    }
}

/// Fills `gen_locality` of `edited`: the fraction of each record's neighbourhood prompts whose
/// greedy answer is `base`'s (the unedited model's) token for token.
pub fn generation_locality(edited: &mut [RecordScores], base: &[RecordScores]) {
    for (e, b) in edited.iter_mut().zip(base) {
        let n = e.locality_greedy.len().min(b.locality_greedy.len());
        let same = e.locality_greedy.iter().zip(&b.locality_greedy).filter(|(x, y)| x == y).count();
        e.gen_locality = (n > 0).then(|| same as f64 / n as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::*;

    #[test]
    fn verdicts_normalise_whitespace_and_case_and_need_a_word_boundary() {
        assert_eq!(verdict(" English", "English", true), Match);
        assert_eq!(verdict(" english.", "English", false), Match);
        assert_eq!(verdict("\n ENGLISH and", "English", false), Match);
        assert_eq!(verdict(" Englishman", "English", false), Miss);
        assert_eq!(verdict(" Eng", "English", false), Open);
        assert_eq!(verdict(" Eng", "English", true), Miss);
        assert_eq!(verdict(" English", "English", false), Open);
        assert_eq!(verdict(" French", "English", false), Miss);
        assert_eq!(verdict("", "English", false), Open);
        assert_eq!(verdict("", "English", true), Miss);
        assert_eq!(verdict(" Fran\u{FFFD}", "Français", false), Open);
        assert_eq!(verdict(" Français!", "Français", false), Match);
        assert_eq!(verdict(" New York City", "New York", false), Match);
    }
}
