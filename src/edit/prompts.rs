//! Tokenised prompts of one edit: every templated rewrite prompt followed by the target tokens,
//! plus the "{subject} is a" essence prompt, with the subject's last-token position in each.

use anyhow::{bail, Context, Result};

use super::templates::fill;
use crate::data::EditRecord;
use crate::model::{Batch, Padding};
use crate::tokenizer::Tok;

/// The batch of one edit.
pub struct EditPrompts {
    /// Padded batch: `templates` rewrite rows, then the essence row.
    pub batch: Batch,
    /// Number of rewrite rows (one per template).
    pub rewrite_rows: usize,
    /// Index (real-token) of the subject's last token in each row.
    pub subject_last: Vec<usize>,
    /// Target tokens (the answer as it continues the prompt).
    pub target_ids: Vec<u32>,
    /// For each rewrite row, the index of the last prompt token (predicting the first target token).
    pub prompt_last: Vec<usize>,
}

/// Index of the last token of the text up to `upto` (a byte offset) inside `text`.
fn last_token_of_prefix(tok: &Tok, text: &str, upto: usize) -> Result<usize> {
    let n = tok.encode_prompt(&text[..upto])?.len();
    if n == 0 {
        bail!("the subject produces no tokens");
    }
    Ok(n - 1)
}

/// Builds the prompts of `rec` under `templates`.
pub fn build(tok: &Tok, rec: &EditRecord, templates: &[String]) -> Result<EditPrompts> {
    let span = rec.subject_span().context("subject not found in the prompt")?;
    let target_ids = tok.encode_continuation(&rec.prompt, &rec.target_new)?;
    if target_ids.is_empty() {
        bail!("target `{}` produces no tokens", rec.target_new);
    }
    let mut seqs = Vec::new();
    let mut subject_last = Vec::new();
    let mut prompt_last = Vec::new();
    for t in templates {
        let text = fill(t, &rec.prompt);
        let offset = t.find("{}").unwrap_or(0);
        let ids = tok.encode_prompt(&text)?;
        subject_last.push(last_token_of_prefix(tok, &text, offset + span.end)?.min(ids.len() - 1));
        prompt_last.push(ids.len() - 1);
        let mut row = ids;
        row.extend_from_slice(&target_ids[..target_ids.len() - 1]);
        seqs.push(row);
    }
    let essence = format!("{} is a", rec.subject);
    let ids = tok.encode_prompt(&essence)?;
    subject_last.push(last_token_of_prefix(tok, &essence, rec.subject.len())?.min(ids.len() - 1));
    seqs.push(ids);
    let rewrite_rows = templates.len();
    let batch = Batch::new(seqs, Padding::Right, tok.pad_id)?;
    Ok(EditPrompts { batch, rewrite_rows, subject_last, target_ids, prompt_last })
}
