//! Limits on the input of `oedit edit`, so that the memory and time of one edit are bounded by
//! the limits and not by what an input line holds.
//!
//! Two limits apply to every input line: its length in bytes (checked while reading; a longer
//! line is skipped without being held whole, see [`crate::data::EditReader`]) and the length in
//! tokens of each prompt and answer of the record (checked with the model's tokenizer before
//! the edit, [`check_record_limits`]). A record over a limit is a bad line: `--on-invalid stop`
//! stops with exit code 2 after checkpointing, `--on-invalid skip` records it in
//! `rejected.jsonl`.

use anyhow::Result;

use crate::data::{EditRecord, FieldError, RecordCheck};
use crate::model::HfConfig;
use crate::tokenizer::Tok;

pub use crate::data::DEFAULT_MAX_LINE_BYTES;

/// Default cap on the tokens of the edit prompt and of each answer the edit scores.
///
/// An edit runs every context template with the prompt and the target (11 rows for SmolLM2's
/// preset) and optimises v* by backpropagating through them, so its memory and time grow faster
/// than the square of the prompt's length when the subject comes early. Measured on
/// SmolLM2-135M (2 threads, subject first, preset hyper-parameters): 10 tokens 9.9 s and 1.2 GB
/// peak, 64 tokens 176 s and 2.8 GB, 117 tokens 223 s and 4.7 GB, 497 tokens over 22 GB. Real
/// edit prompts are far shorter (CounterFact and zsRE: under 30 tokens; their targets under 20).
pub const DEFAULT_MAX_PROMPT_TOKENS: usize = 64;

/// Prompts and answers that are only scored (paraphrases, neighbourhood and generation
/// prompts, locality answers: forward passes, no optimisation) may have this many times the
/// cap (256 tokens by default; the longest in CounterFact and zsRE is about 80).
pub const SCORED_FACTOR: usize = 4;

/// The limits of one session (flags `--max-line-bytes`, `--max-prompt-tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// Longest input line, in bytes (without the newline).
    pub max_line_bytes: usize,
    /// Most tokens in one prompt or one answer of a record.
    pub max_prompt_tokens: usize,
}

impl Default for InputLimits {
    fn default() -> Self {
        Self { max_line_bytes: DEFAULT_MAX_LINE_BYTES, max_prompt_tokens: DEFAULT_MAX_PROMPT_TOKENS }
    }
}

/// The token limits of a run on one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLimits {
    /// Most tokens in the edit prompt, the new target and the ground truth.
    pub max_prompt_tokens: usize,
    /// Most tokens in a prompt or answer that is only scored.
    pub max_scored_tokens: usize,
    /// The model's context (`max_position_embeddings`), when it states one.
    pub context: Option<usize>,
    /// Tokens the longest context template puts before the edit prompt (BOS included).
    pub prefix_tokens: usize,
}

impl TokenLimits {
    /// The limits for a model with `context` positions whose edits run under `templates`.
    pub fn new(
        tok: &Tok,
        templates: &[String],
        context: Option<usize>,
        max_prompt_tokens: usize,
    ) -> Result<Self> {
        let mut prefix_tokens = 0;
        for t in templates {
            prefix_tokens = prefix_tokens.max(tok.encode_prompt(&t.replacen("{}", "", 1))?.len());
        }
        let max_scored_tokens = max_prompt_tokens.saturating_mul(SCORED_FACTOR);
        Ok(Self { max_prompt_tokens, max_scored_tokens, context, prefix_tokens })
    }
}

/// Checks the token lengths of `rec`: the edit prompt, the new target and the ground truth have
/// at most `max_prompt_tokens` tokens, and the edit prompt fits the model's context after the
/// longest context template and before the new target, and before the ground truth; the other
/// prompts (paraphrases, neighbourhood and generation prompts) and answers, only scored, have at
/// most `max_scored_tokens`. The error names the input's field (as
/// [`crate::data::RecordFormat::fields`] spells it).
pub fn check_record_limits(tok: &Tok, rec: &EditRecord, limits: &TokenLimits) -> Result<(), FieldError> {
    let f = rec.format.fields();
    let count = |text: &str, field: &str, answer: bool, edited: bool| -> Result<usize, FieldError> {
        let ids =
            if answer { tok.encode_plain(&format!(" {}", text.trim())) } else { tok.encode_prompt(text) };
        let n = ids.map_err(|e| (Some(field.to_owned()), format!("cannot tokenize: {e:#}")))?.len();
        let (max, which) = if edited {
            (limits.max_prompt_tokens, "(--max-prompt-tokens)".to_owned())
        } else {
            (
                limits.max_scored_tokens,
                format!("for prompts and answers only scored ({SCORED_FACTOR} × --max-prompt-tokens)"),
            )
        };
        if n > max {
            return Err((
                Some(field.to_owned()),
                format!("{n} tokens, more than the limit of {max} {which}"),
            ));
        }
        Ok(n)
    };
    let fits = |field: &str, prompt: usize, prefix: usize, answer: usize, answer_field: &str| {
        let (Some(context), total) = (limits.context, prefix + prompt + answer) else { return Ok(()) };
        if total <= context {
            return Ok(());
        }
        let before =
            if prefix > 0 { format!(" after a {prefix}-token context template") } else { String::new() };
        Err((
            Some(field.to_owned()),
            format!(
                "{prompt} tokens{before} and `{answer_field}` ({answer} tokens): {total} tokens, more than \
                 the model's context of {context} (max_position_embeddings)"
            ),
        ))
    };

    let target = count(&rec.target_new, f.target_new, true, true)?;
    let prompt = count(&rec.prompt, f.prompt, false, true)?;
    fits(f.prompt, prompt, limits.prefix_tokens, target, f.target_new)?;
    if let (Some(gt), Some(name)) = (&rec.ground_truth, f.ground_truth) {
        fits(f.prompt, prompt, 0, count(gt, name, true, true)?, name)?;
    }
    // The prompts and answers only scored are bounded by their cap alone: they are forward
    // passes, and the position encoding extends past the context without failing.
    if let Some(name) = f.rephrase {
        let n = rec.rephrase_prompts.len();
        for (i, p) in rec.rephrase_prompts.iter().enumerate() {
            count(p, &f.item(name, i, n), false, false)?;
        }
    }
    if let (Some(pname), Some(aname)) = (f.locality_prompt, f.locality_answer) {
        let n = rec.locality.len();
        for (i, l) in rec.locality.iter().enumerate() {
            count(&l.prompt, &f.item(pname, i, n), false, false)?;
            count(&l.answer, aname, true, false)?;
        }
    }
    if let Some(name) = f.generation {
        let n = rec.generation_prompts.len();
        for (i, p) in rec.generation_prompts.iter().enumerate() {
            count(p, &f.item(name, i, n), false, false)?;
        }
    }
    Ok(())
}

/// The check an [`crate::data::EditReader`] runs on every record of a run on this model: the
/// token limits of [`check_record_limits`], with the model's context from `config`.
pub fn record_check(
    tok: &Tok,
    config: &HfConfig,
    templates: &[String],
    limits: InputLimits,
) -> Result<RecordCheck> {
    let token_limits =
        TokenLimits::new(tok, templates, config.max_position_embeddings, limits.max_prompt_tokens)?;
    let tok = tok.clone();
    Ok(Box::new(move |rec: &EditRecord| check_record_limits(&tok, rec, &token_limits)))
}
