//! Edit records: parsing and streaming of knowledge-edit requests from JSONL.
//!
//! Every non-blank input line is one JSON object in one of four formats, detected per line
//! from the keys present:
//!
//! | format | distinguishing key | example source |
//! |---|---|---|
//! | [`RecordFormat::CounterfactRome`] | `requested_rewrite` | original CounterFact (ROME) |
//! | [`RecordFormat::Zsre`] | `src` or `alt` | zsRE as released with MEND |
//! | [`RecordFormat::CounterfactFlat`] | `target_new` | CounterFact flattened by EasyEdit |
//! | [`RecordFormat::Minimal`] | `target` | hand-written `{"prompt", "subject", "target"}` |
//!
//! All formats are normalised into one [`EditRecord`]. Problems are reported per line with the
//! offending field named, so a caller can decide whether to skip a bad record or stop.

use std::fmt;
use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::iter::FusedIterator;
use std::ops::Range;
use std::path::Path;

use serde_json::{Map, Value};

use crate::errors::InputError;

/// One fact edit, normalised from any supported input format.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EditRecord {
    /// Case id from the input, when it has one.
    pub case_id: Option<u64>,
    /// The edit prompt with the subject filled in, e.g. "The mother tongue of Danielle Darrieux is".
    pub prompt: String,
    /// The edited subject; always occurs (exactly) in `prompt`.
    pub subject: String,
    /// The new answer, trimmed of surrounding whitespace; never empty.
    pub target_new: String,
    /// The old (true) answer when the input gives one.
    pub ground_truth: Option<String>,
    /// Paraphrases of the edit prompt (generalisation).
    pub rephrase_prompts: Vec<String>,
    /// Neighbourhood / locality prompts with their expected (true) answers.
    pub locality: Vec<LocalityPrompt>,
    /// Free-generation prompts (ROME form only; may be empty).
    pub generation_prompts: Vec<String>,
    /// The input format the record was read from.
    pub format: RecordFormat,
}

impl EditRecord {
    /// Byte range of the first occurrence of `subject` in `prompt`.
    ///
    /// Records produced by [`parse_record`] always have one.
    pub fn subject_span(&self) -> Option<Range<usize>> {
        self.prompt.find(&self.subject).map(|start| start..start + self.subject.len())
    }
}

/// A prompt whose answer must not change after an edit, with that expected answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LocalityPrompt {
    /// The prompt, as given in the input.
    pub prompt: String,
    /// The expected (true) answer, trimmed.
    pub answer: String,
}

/// The input format an [`EditRecord`] was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordFormat {
    /// CounterFact flattened as released by EasyEdit (`prompt`, `subject`, `target_new`, ...).
    CounterfactFlat,
    /// Original CounterFact schema from ROME (`requested_rewrite`, `paraphrase_prompts`, ...).
    CounterfactRome,
    /// zsRE in the MEND schema (`src`, `subject`, `alt`, `answers`, `rephrase`, `loc`, `loc_ans`).
    Zsre,
    /// Minimal hand-written form (`prompt`, `subject`, `target`).
    Minimal,
}

impl RecordFormat {
    /// The snake_case name used in serialised output (e.g. `counterfact_flat`).
    pub fn name(self) -> &'static str {
        match self {
            Self::CounterfactFlat => "counterfact_flat",
            Self::CounterfactRome => "counterfact_rome",
            Self::Zsre => "zsre",
            Self::Minimal => "minimal",
        }
    }

    /// The input's names of the fields a record of this format is built from.
    pub fn fields(self) -> &'static FieldNames {
        match self {
            Self::CounterfactFlat => &FLAT_FIELDS,
            Self::CounterfactRome => &ROME_FIELDS,
            Self::Zsre => &ZSRE_FIELDS,
            Self::Minimal => &MINIMAL_FIELDS,
        }
    }

    /// Whether the ground truth is the fact the edit replaces, so that a new target equal to it
    /// is an edit that changes nothing. Not for zsRE: its `answers` are the reference answers,
    /// and an `alt` equal to them is a real edit when the model answers otherwise (`pred`); 46 of
    /// the 2,037 records of the MEND zsRE set are such edits. They are read without a ground
    /// truth (target_new against itself is no contest).
    pub fn ground_truth_is_replaced(self) -> bool {
        !matches!(self, Self::Zsre)
    }
}

impl fmt::Display for RecordFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Typed error for one bad input line; callers branch on it (skip vs stop).
#[derive(Debug, Clone, PartialEq)]
pub struct RecordError {
    /// File name, or `<stdin>`.
    pub source: String,
    /// 1-based line number.
    pub line: usize,
    /// The offending field (dotted path for nested fields), when one applies.
    pub field: Option<String>,
    /// What is wrong.
    pub reason: String,
    /// The input could not be read (an I/O error, not a bad line): never skipped.
    pub io: bool,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.source, self.line)?;
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        f.write_str(&self.reason)
    }
}

impl std::error::Error for RecordError {}

/// A parse failure inside one record: `(field, reason)`. `field` is the input's own path of the
/// offending field (dotted for nested fields, `[i]` for list items); `None` when the problem is
/// not tied to one field (invalid JSON, not an object, unknown format, a line too long).
pub type FieldError = (Option<String>, String);

fn field_err(field: &str, reason: impl Into<String>) -> FieldError {
    (Some(field.to_owned()), reason.into())
}

/// The input's own names of the fields an [`EditRecord`] is built from, in one format (used to
/// name the offending field in errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldNames {
    /// The edit prompt (the template, for the ROME form).
    pub prompt: &'static str,
    /// The subject.
    pub subject: &'static str,
    /// The new target.
    pub target_new: &'static str,
    /// The old (true) answer.
    pub ground_truth: Option<&'static str>,
    /// The paraphrases of the edit prompt.
    pub rephrase: Option<&'static str>,
    /// The locality (neighbourhood) prompts.
    pub locality_prompt: Option<&'static str>,
    /// The answer of the locality prompts.
    pub locality_answer: Option<&'static str>,
    /// The generation prompts.
    pub generation: Option<&'static str>,
    /// Whether the list fields are always JSON arrays (then items are always named `field[i]`;
    /// otherwise a single string is allowed and only items of real lists are indexed).
    pub always_lists: bool,
}

impl FieldNames {
    /// Name of item `i` of a list field holding `n` items.
    pub fn item(&self, field: &str, i: usize, n: usize) -> String {
        if self.always_lists || n > 1 {
            format!("{field}[{i}]")
        } else {
            field.to_owned()
        }
    }
}

const FLAT_FIELDS: FieldNames = FieldNames {
    prompt: "prompt",
    subject: "subject",
    target_new: "target_new",
    ground_truth: Some("ground_truth"),
    rephrase: Some("rephrase_prompt"),
    locality_prompt: Some("locality_prompt"),
    locality_answer: Some("locality_ground_truth"),
    generation: None,
    always_lists: false,
};

const ROME_FIELDS: FieldNames = FieldNames {
    prompt: "requested_rewrite.prompt",
    subject: "requested_rewrite.subject",
    target_new: "requested_rewrite.target_new.str",
    ground_truth: Some("requested_rewrite.target_true.str"),
    rephrase: Some("paraphrase_prompts"),
    locality_prompt: Some("neighborhood_prompts"),
    // Neighbourhood prompts share the edited fact's relation and true object.
    locality_answer: Some("requested_rewrite.target_true.str"),
    generation: Some("generation_prompts"),
    always_lists: true,
};

const ZSRE_FIELDS: FieldNames = FieldNames {
    prompt: "src",
    subject: "subject",
    target_new: "alt",
    ground_truth: Some("answers"),
    rephrase: Some("rephrase"),
    locality_prompt: Some("loc"),
    locality_answer: Some("loc_ans"),
    generation: None,
    always_lists: false,
};

const MINIMAL_FIELDS: FieldNames = FieldNames {
    prompt: "prompt",
    subject: "subject",
    target_new: "target",
    ground_truth: Some("ground_truth"),
    rephrase: None,
    locality_prompt: None,
    locality_answer: None,
    generation: None,
    always_lists: false,
};

/// Description of the recognised formats, used in the "unknown format" message.
const KNOWN_FORMATS: &str = "counterfact_flat {prompt, subject, target_new, [case_id, ground_truth, \
     rephrase_prompt, locality_prompt, locality_ground_truth]}; \
     counterfact_rome {requested_rewrite {prompt with \"{}\", subject, target_new {str}, \
     [target_true {str}]}, [case_id, paraphrase_prompts, neighborhood_prompts, generation_prompts]}; \
     zsre {src, subject, alt, [case_id, answers, rephrase, loc, loc_ans]}; \
     minimal {prompt, subject, target, [case_id, ground_truth]}";

/// Parses one JSON line into an [`EditRecord`], detecting its format from the keys present.
///
/// On failure returns `(field, reason)`; `field` is `None` when the problem is not tied to
/// one field (invalid JSON, not an object, unknown format).
pub fn parse_record(json_line: &str) -> Result<EditRecord, FieldError> {
    let value: Value = serde_json::from_str(json_line).map_err(|e| (None, format!("invalid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err((None, format!("expected a JSON object, found {}", kind(&value))));
    };
    let draft = match detect_format(&obj) {
        Some(RecordFormat::CounterfactRome) => parse_rome(&obj)?,
        Some(RecordFormat::Zsre) => parse_zsre(&obj)?,
        Some(RecordFormat::CounterfactFlat) => parse_flat(&obj)?,
        Some(RecordFormat::Minimal) => parse_minimal(&obj)?,
        None => {
            let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            keys.sort_unstable();
            return Err((
                None,
                format!(
                    "unknown record format (keys: {}); recognised formats: {KNOWN_FORMATS}",
                    if keys.is_empty() { "none".to_owned() } else { keys.join(", ") }
                ),
            ));
        }
    };
    draft.finish()
}

fn detect_format(obj: &Map<String, Value>) -> Option<RecordFormat> {
    if obj.contains_key("requested_rewrite") {
        Some(RecordFormat::CounterfactRome)
    } else if obj.contains_key("src") || obj.contains_key("alt") {
        Some(RecordFormat::Zsre)
    } else if obj.contains_key("target_new") {
        Some(RecordFormat::CounterfactFlat)
    } else if obj.contains_key("target") {
        Some(RecordFormat::Minimal)
    } else {
        None
    }
}

/// What a format parser extracts; [`Draft::finish`] does the checks every format shares and
/// builds the [`EditRecord`].
struct Draft<'a> {
    format: RecordFormat,
    case_id: Option<u64>,
    /// The edit prompt with the subject filled in.
    prompt: String,
    subject: &'a str,
    /// The new target as given (untrimmed).
    target_new: &'a str,
    ground_truth: Option<String>,
    rephrase_prompts: Vec<String>,
    locality: Vec<LocalityPrompt>,
    generation_prompts: Vec<String>,
}

impl<'a> Draft<'a> {
    /// A draft with the four fields every format has, read under the format's names
    /// ([`FieldNames`]) from `obj` (top-level keys are the field names).
    fn top_level(format: RecordFormat, obj: &'a Map<String, Value>) -> Result<Self, FieldError> {
        let f = format.fields();
        Ok(Self {
            format,
            case_id: opt_case_id(obj)?,
            prompt: req_str(obj, f.prompt, f.prompt)?.to_owned(),
            subject: req_str(obj, f.subject, f.subject)?,
            target_new: req_str(obj, f.target_new, f.target_new)?,
            ground_truth: None,
            rephrase_prompts: Vec::new(),
            locality: Vec::new(),
            generation_prompts: Vec::new(),
        })
    }

    /// Checks the prompt, subject and target, and builds the record.
    fn finish(self) -> Result<EditRecord, FieldError> {
        let f = self.format.fields();
        check_prompt_subject(&self.prompt, f.prompt, self.subject, f.subject)?;
        let target_new = target(self.target_new, f.target_new)?;
        let mut ground_truth = self.ground_truth;
        if ground_truth.as_deref() == Some(target_new.as_str()) {
            if self.format.ground_truth_is_replaced() {
                return Err(field_err(
                    f.target_new,
                    format!(
                        "the new target {target_new:?} is the ground truth: the edit would change nothing"
                    ),
                ));
            }
            // zsRE: the edit asks for the reference answer, so there is nothing for target_new
            // to beat; such an edit is judged as one without a ground truth (greedy-correct).
            ground_truth = None;
        }
        Ok(EditRecord {
            case_id: self.case_id,
            prompt: self.prompt,
            subject: self.subject.to_owned(),
            target_new,
            ground_truth,
            rephrase_prompts: self.rephrase_prompts,
            locality: self.locality,
            generation_prompts: self.generation_prompts,
            format: self.format,
        })
    }
}

fn parse_flat(obj: &Map<String, Value>) -> Result<Draft<'_>, FieldError> {
    let head = Draft::top_level(RecordFormat::CounterfactFlat, obj)?;
    Ok(Draft {
        ground_truth: opt_answer(obj, "ground_truth", "ground_truth")?,
        rephrase_prompts: str_or_list(obj, "rephrase_prompt", "rephrase_prompt")?,
        locality: optional_locality(obj, "locality_prompt", "locality_ground_truth")?,
        ..head
    })
}

fn parse_zsre(obj: &Map<String, Value>) -> Result<Draft<'_>, FieldError> {
    let head = Draft::top_level(RecordFormat::Zsre, obj)?;
    Ok(Draft {
        ground_truth: first_answer(obj, "answers")?,
        rephrase_prompts: str_or_list(obj, "rephrase", "rephrase")?,
        locality: optional_locality(obj, "loc", "loc_ans")?,
        ..head
    })
}

fn parse_minimal(obj: &Map<String, Value>) -> Result<Draft<'_>, FieldError> {
    let head = Draft::top_level(RecordFormat::Minimal, obj)?;
    Ok(Draft { ground_truth: opt_answer(obj, "ground_truth", "ground_truth")?, ..head })
}

/// A locality prompt and its answer given as two optional fields that must come together.
fn optional_locality(
    obj: &Map<String, Value>,
    prompt_key: &str,
    answer_key: &str,
) -> Result<Vec<LocalityPrompt>, FieldError> {
    match (opt_str(obj, prompt_key, prompt_key)?, opt_str(obj, answer_key, answer_key)?) {
        (None, None) => Ok(Vec::new()),
        (Some(p), Some(a)) => Ok(vec![locality_prompt(p, prompt_key, a, answer_key)?]),
        (Some(_), None) => Err(field_err(answer_key, "missing")),
        (None, Some(_)) => Err(field_err(prompt_key, "missing")),
    }
}

fn parse_rome(obj: &Map<String, Value>) -> Result<Draft<'_>, FieldError> {
    let f = RecordFormat::CounterfactRome.fields();
    let rw = req_obj(obj, "requested_rewrite", "requested_rewrite")?;
    let template = req_str(rw, "prompt", f.prompt)?;
    let subject = req_str(rw, "subject", f.subject)?;
    let prompt = match template.matches("{}").count() {
        1 => template.replacen("{}", subject, 1),
        0 => {
            return Err(field_err(
                f.prompt,
                format!("template has no `{{}}` placeholder for the subject: {template:?}"),
            ))
        }
        n => {
            return Err(field_err(
                f.prompt,
                format!("template has {n} `{{}}` placeholders, expected exactly one: {template:?}"),
            ))
        }
    };
    let new = req_obj(rw, "target_new", "requested_rewrite.target_new")?;
    let target_new = req_str(new, "str", f.target_new)?;
    let ground_truth = match opt_obj(rw, "target_true", "requested_rewrite.target_true")? {
        Some(t) => opt_answer(t, "str", "requested_rewrite.target_true.str")?,
        None => None,
    };
    let neighbourhood = str_list(obj, "neighborhood_prompts", "neighborhood_prompts")?;
    let locality = if neighbourhood.is_empty() {
        Vec::new()
    } else {
        let answer = ground_truth.clone().ok_or_else(|| {
            field_err(
                "requested_rewrite.target_true.str",
                "missing (needed as the answer of the neighborhood prompts)",
            )
        })?;
        neighbourhood.into_iter().map(|prompt| LocalityPrompt { prompt, answer: answer.clone() }).collect()
    };
    Ok(Draft {
        format: RecordFormat::CounterfactRome,
        case_id: opt_case_id(obj)?,
        prompt,
        subject,
        target_new,
        ground_truth,
        rephrase_prompts: str_list(obj, "paraphrase_prompts", "paraphrase_prompts")?,
        locality,
        generation_prompts: str_list(obj, "generation_prompts", "generation_prompts")?,
    })
}

/// Human-readable JSON type of a value, for "expected X, found Y" messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn req_str<'a>(obj: &'a Map<String, Value>, key: &str, path: &str) -> Result<&'a str, FieldError> {
    opt_str(obj, key, path)?.ok_or_else(|| field_err(path, "missing"))
}

/// A string field that may be absent or null.
fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str, path: &str) -> Result<Option<&'a str>, FieldError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(field_err(path, format!("expected a string, found {}", kind(other)))),
    }
}

fn req_obj<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a Map<String, Value>, FieldError> {
    opt_obj(obj, key, path)?.ok_or_else(|| field_err(path, "missing"))
}

fn opt_obj<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a Map<String, Value>>, FieldError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => Err(field_err(path, format!("expected an object, found {}", kind(other)))),
    }
}

fn opt_case_id(obj: &Map<String, Value>) -> Result<Option<u64>, FieldError> {
    match obj.get("case_id") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| field_err("case_id", format!("expected a non-negative integer, found {v}"))),
    }
}

/// An array of strings that may be absent or null (then empty). Every element must be a
/// non-empty string.
fn str_list(obj: &Map<String, Value>, key: &str, path: &str) -> Result<Vec<String>, FieldError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => non_empty_prompt(s, &format!("{path}[{i}]")),
                other => Err(field_err(
                    &format!("{path}[{i}]"),
                    format!("expected a string, found {}", kind(other)),
                )),
            })
            .collect(),
        Some(other) => Err(field_err(path, format!("expected an array of strings, found {}", kind(other)))),
    }
}

/// Like [`str_list`], but a single string is accepted as a one-element list.
fn str_or_list(obj: &Map<String, Value>, key: &str, path: &str) -> Result<Vec<String>, FieldError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(vec![non_empty_prompt(s, path)?]),
        Some(Value::Array(_)) | None | Some(Value::Null) => str_list(obj, key, path),
        Some(other) => {
            Err(field_err(path, format!("expected a string or an array of strings, found {}", kind(other))))
        }
    }
}

fn non_empty_prompt(s: &str, path: &str) -> Result<String, FieldError> {
    if s.trim().is_empty() {
        Err(field_err(path, "empty prompt"))
    } else {
        Ok(s.to_owned())
    }
}

/// An optional answer string: trimmed; absent, null or blank gives `None`.
fn opt_answer(obj: &Map<String, Value>, key: &str, path: &str) -> Result<Option<String>, FieldError> {
    Ok(opt_str(obj, key, path)?.and_then(non_empty_answer))
}

/// The first of a string-or-list of reference answers, trimmed; absent, null, an empty list or
/// a blank first answer gives `None` (as a blank `ground_truth` does).
fn first_answer(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, FieldError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(non_empty_answer(s)),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                if !item.is_string() {
                    let found = kind(item);
                    return Err(field_err(
                        &format!("{key}[{i}]"),
                        format!("expected a string, found {found}"),
                    ));
                }
            }
            Ok(items.first().and_then(Value::as_str).and_then(non_empty_answer))
        }
        Some(other) => {
            Err(field_err(key, format!("expected a string or an array of strings, found {}", kind(other))))
        }
    }
}

/// A trimmed answer, or `None` when blank.
fn non_empty_answer(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

/// The new target: trimmed and non-empty.
fn target(s: &str, path: &str) -> Result<String, FieldError> {
    let t = s.trim();
    if t.is_empty() {
        Err(field_err(path, "empty target"))
    } else {
        Ok(t.to_owned())
    }
}

fn locality_prompt(
    prompt: &str,
    prompt_path: &str,
    answer: &str,
    answer_path: &str,
) -> Result<LocalityPrompt, FieldError> {
    let prompt = non_empty_prompt(prompt, prompt_path)?;
    let answer = answer.trim();
    if answer.is_empty() {
        return Err(field_err(answer_path, "empty answer"));
    }
    Ok(LocalityPrompt { prompt, answer: answer.to_owned() })
}

fn check_prompt_subject(
    prompt: &str,
    prompt_path: &str,
    subject: &str,
    subject_path: &str,
) -> Result<(), FieldError> {
    if prompt.trim().is_empty() {
        return Err(field_err(prompt_path, "empty prompt"));
    }
    if subject.trim().is_empty() {
        return Err(field_err(subject_path, "empty subject"));
    }
    if !prompt.contains(subject) {
        return Err(field_err(
            subject_path,
            format!("subject {subject:?} does not occur in the prompt {prompt:?}"),
        ));
    }
    Ok(())
}

/// A check run on every parsed record (e.g. token limits, see [`crate::limits`]); a failure
/// makes the line a bad line like a parse error.
pub type RecordCheck = Box<dyn Fn(&EditRecord) -> Result<(), FieldError> + Send>;

/// Default cap on the length of one input line, in bytes (see [`EditReader::with_max_line_bytes`]).
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 * 1024;

/// Streaming reader: yields one item per non-blank line, never loads the whole file.
///
/// Items are `Ok((line_number, record))` or `Err(RecordError)` for a bad line; iteration
/// continues after a bad line. An I/O error is reported once as a `RecordError` and ends the
/// iteration. Blank and whitespace-only lines are skipped but still counted. A line that is
/// not valid UTF-8, or longer than the line cap (read up to the cap and the rest skipped, never
/// held whole), is reported as a bad line.
pub struct EditReader {
    source: String,
    reader: Box<dyn BufRead + Send>,
    line: usize,
    buf: Vec<u8>,
    done: bool,
    max_line_bytes: usize,
    check: Option<RecordCheck>,
}

impl EditReader {
    /// Opens a JSONL file; the path `-` means standard input (named `<stdin>` in errors).
    ///
    /// A missing or unreadable file, or a directory, is bad input ([`InputError`], exit code 2).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if path.as_os_str() == "-" {
            return Ok(Self::from_reader("<stdin>", Box::new(BufReader::new(std::io::stdin()))));
        }
        let bad = |why: String| InputError(format!("{}: cannot open edit file: {why}", path.display()));
        let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        // Opening a directory succeeds on Unix; reading it then fails on the first line.
        if file.metadata().is_ok_and(|m| m.is_dir()) {
            return Err(bad("it is a directory, not a JSONL file".to_owned()).into());
        }
        Ok(Self::from_reader(&path.display().to_string(), Box::new(BufReader::new(file))))
    }

    /// Reads records from any buffered reader; `source_name` is used in error messages.
    pub fn from_reader(source_name: &str, r: Box<dyn BufRead + Send>) -> Self {
        Self {
            source: source_name.to_owned(),
            reader: r,
            line: 0,
            buf: Vec::new(),
            done: false,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            check: None,
        }
    }

    /// Sets the cap on one line's length in bytes (without its newline; at least 1).
    pub fn with_max_line_bytes(mut self, max: usize) -> Self {
        self.max_line_bytes = max.max(1);
        self
    }

    /// Runs `check` on every record parsed from now on; a failure is reported like a parse
    /// error of that line.
    pub fn set_check(&mut self, check: RecordCheck) {
        self.check = Some(check);
    }

    /// The name used for this input in errors (file name or `<stdin>`).
    pub fn source_name(&self) -> &str {
        &self.source
    }

    fn error(&self, line: usize, field: Option<String>, reason: String) -> RecordError {
        RecordError { source: self.source.clone(), line, field, reason, io: false }
    }

    /// Reads the next line into `buf`, at most `max_line_bytes` of it: `None` at the end of the
    /// input, `Some(false)` for a longer line (whose rest is skipped, not stored).
    fn read_line(&mut self) -> std::io::Result<Option<bool>> {
        self.buf.clear();
        let cap = self.max_line_bytes as u64 + 1;
        let n = (&mut self.reader).take(cap).read_until(b'\n', &mut self.buf)?;
        if n == 0 {
            return Ok(None);
        }
        if self.buf.last() == Some(&b'\n') || (n as u64) < cap {
            return Ok(Some(true));
        }
        self.buf.clear();
        self.reader.skip_until(b'\n')?;
        Ok(Some(false))
    }
}

impl fmt::Debug for EditReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EditReader")
            .field("source", &self.source)
            .field("line", &self.line)
            .field("done", &self.done)
            .field("max_line_bytes", &self.max_line_bytes)
            .finish_non_exhaustive()
    }
}

impl Iterator for EditReader {
    type Item = Result<(usize, EditRecord), RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            match self.read_line() {
                Ok(None) => self.done = true,
                Ok(Some(complete)) => {
                    self.line += 1;
                    if !complete {
                        let reason = format!(
                            "line is longer than {} bytes (--max-line-bytes); skipped unread",
                            self.max_line_bytes
                        );
                        return Some(Err(self.error(self.line, None, reason)));
                    }
                    let mut bytes = self.buf.as_slice();
                    if self.line == 1 {
                        bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
                    }
                    let text = match std::str::from_utf8(bytes) {
                        Ok(text) => text,
                        Err(e) => {
                            let reason = format!("line is not valid UTF-8: {e}");
                            return Some(Err(self.error(self.line, None, reason)));
                        }
                    };
                    if text.trim().is_empty() {
                        continue;
                    }
                    let checked = parse_record(text).and_then(|record| {
                        self.check.as_ref().map_or(Ok(()), |c| c(&record)).map(|()| record)
                    });
                    return Some(
                        checked.map(|r| (self.line, r)).map_err(|(f, why)| self.error(self.line, f, why)),
                    );
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.done = true;
                    let reason = format!("I/O error while reading: {e}");
                    return Some(Err(RecordError { io: true, ..self.error(self.line + 1, None, reason) }));
                }
            }
        }
        None
    }
}

impl FusedIterator for EditReader {}

/// Whether an edits path is read as a stream, once, as standard input is: `-`, a named pipe,
/// a process substitution or a character device. Such inputs cannot be read twice (a second
/// open would wait for another writer or see nothing), so they are not pre-read to the end or
/// counted.
pub fn is_stream(path: &Path) -> bool {
    path.as_os_str() == "-" || std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir())
}

/// Number of non-blank lines of a file (a progress total), read in blocks: memory does not grow
/// with the length of a line. 0 when the file cannot be read.
pub fn count_nonblank_lines(path: &Path) -> u64 {
    let Ok(file) = std::fs::File::open(path) else { return 0 };
    let mut r = BufReader::new(file);
    let (mut count, mut blank) = (0, true);
    loop {
        let block = match r.fill_buf() {
            Ok([]) => break,
            Ok(block) => block,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return 0,
        };
        for &b in block {
            if b == b'\n' {
                count += u64::from(!blank);
                blank = true;
            } else if !b.is_ascii_whitespace() {
                blank = false;
            }
        }
        let n = block.len();
        r.consume(n);
    }
    count + u64::from(!blank)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read};

    // Real records, copied verbatim from the benchmark files.
    const FLAT_CASE_2: &str = r##"{"case_id": 2, "prompt": "Toko Yasuda, the", "target_new": "piano", "subject": "Toko Yasuda", "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is incredible at", "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar", "_source": "Jometeorie/KnowledgeSpread@51d7402617c2:data/counterfact/counterfact-train.json"}"##;
    const ROME_CASE_0: &str = r##"{"case_id": 0, "pararel_idx": 2796, "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103", "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"}, "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native", "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language"], "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is", "François Bayrou, a native", "The native language of Raymond Barre is", "Michel Rocard is a native speaker of", "Jacques Chaban-Delmas is a native speaker of", "The native language of François Bayrou is", "Maurice Genevoix, speaker of", "The mother tongue of François Bayrou is", "Melchior de Vogüé, speaker of"], "attribute_prompts": ["J. R. R. Tolkien is a native speaker of", "The mother tongue of Douglas Adams is", "The mother tongue of Paul McCartney is", "Elvis Presley is a native speaker of", "Barack Obama, speaker of", "Douglas Adams, speaker of", "Meryl Streep, a native", "George Orwell spoke the language", "George Washington, a native", "Michael Jackson, a native"], "generation_prompts": ["Danielle Darrieux's mother tongue is", "Where Danielle Darrieux is from, people speak the language of", "Danielle Darrieux's mother tongue is", "Danielle Darrieux was born in", "Danielle Darrieux's mother tongue is", "Danielle Darrieux's mother tongue is", "Danielle Darrieux was born in", "Where Danielle Darrieux is from, people speak the language of", "Danielle Darrieux was born in", "Danielle Darrieux was born in"], "_source": "leo-liuzy/RLEdit@1822b1c79f90:data/dsets/counterfact/cf_preview.json"}"##;
    const ZSRE_CASE_26: &str = r##"{"case_id": 26, "subject": "MAT-49", "src": "What was the year MAT-49 entered service?", "pred": "1991", "rephrase": "What year was MAT-49 introduced?", "alt": " MAT-49", "answers": ["1949"], "loc": "nq question: who plays zoey in i love you man", "loc_ans": "Rashida Jones", "cond": "1991 >>  MAT-49 || What was the year MAT-49 entered service?", "portability": {"Recalled Relation": "(MAT-49, manufactured by, Manufacture Nationale d'Armes de Tulle)", "New Question": "Which company manufactured the MAT-49 when it entered service?", "New Answer": "Manufacture Nationale d'Armes de Tulle"}, "_source": "JasonForJoy/Model-Editing-Hurt@82614b0414cf:edited-data/zsre_mend_eval_portability_gpt4.json", "_split": "zsre_mend_eval (subset, with EasyEdit portability annotations)"}"##;
    const ZSRE_CASE_1571: &str = r##"{"case_id": 1571, "subject": "Michaela Staniford", "src": "What gender is Michaela Staniford?", "pred": "female", "rephrase": "Which sex is Michaela Staniford?", "alt": "", "answers": ["female"], "loc": "nq question: who plays the cat in the hat movie", "loc_ans": "Mike Myers", "cond": "female >>  || What gender is Michaela Staniford?", "_source": "Jometeorie/KnowledgeSpread@51d7402617c2:data/zsre/zsre_mend_train-1k.json", "_split": "zsre_mend_train (1k subset)"}"##;

    /// Parses a JSON value built in a test.
    fn parse(v: Value) -> Result<EditRecord, FieldError> {
        parse_record(&v.to_string())
    }

    /// Asserts that parsing fails on `field` with a reason containing `needle`.
    fn assert_field_err(v: Value, field: &str, needle: &str) {
        let text = v.to_string();
        match parse_record(&text) {
            Ok(r) => panic!("expected an error on `{field}` for {text}, got {r:?}"),
            Err((f, reason)) => {
                assert_eq!(f.as_deref(), Some(field), "wrong field for {text}: {reason}");
                assert!(reason.contains(needle), "reason {reason:?} lacks {needle:?} for {text}");
            }
        }
    }

    fn flat() -> Value {
        serde_json::from_str(FLAT_CASE_2).expect("test literal")
    }
    fn rome() -> Value {
        serde_json::from_str(ROME_CASE_0).expect("test literal")
    }
    fn zsre() -> Value {
        serde_json::from_str(ZSRE_CASE_26).expect("test literal")
    }
    fn minimal() -> Value {
        serde_json::json!({"prompt": "The capital of France is", "subject": "France", "target": "Lyon"})
    }

    fn reader(text: &str) -> EditReader {
        EditReader::from_reader("mem.jsonl", Box::new(Cursor::new(text.as_bytes().to_vec())))
    }

    #[test]
    fn parses_counterfact_flat() {
        let r = parse_record(FLAT_CASE_2).expect("valid record");
        assert_eq!(
            r,
            EditRecord {
                case_id: Some(2),
                prompt: "Toko Yasuda, the".into(),
                subject: "Toko Yasuda".into(),
                target_new: "piano".into(),
                ground_truth: Some("guitar".into()),
                rephrase_prompts: vec!["Toko Yasuda is incredible at".into()],
                locality: vec![LocalityPrompt {
                    prompt: "John Lennon performs on the".into(),
                    answer: "guitar".into()
                }],
                generation_prompts: vec![],
                format: RecordFormat::CounterfactFlat,
            }
        );
        assert_eq!(r.subject_span(), Some(0..11));
    }

    #[test]
    fn parses_counterfact_rome() {
        let r = parse_record(ROME_CASE_0).expect("valid record");
        assert_eq!(r.format, RecordFormat::CounterfactRome);
        assert_eq!(r.case_id, Some(0));
        assert_eq!(r.prompt, "The mother tongue of Danielle Darrieux is");
        assert_eq!(r.subject, "Danielle Darrieux");
        assert_eq!(r.target_new, "English");
        assert_eq!(r.ground_truth.as_deref(), Some("French"));
        assert_eq!(r.rephrase_prompts.len(), 2);
        assert!(r.rephrase_prompts[1].ends_with("Danielle Darrieux spoke the language"));
        assert_eq!(r.locality.len(), 10);
        assert_eq!(r.locality[0].prompt, "The mother tongue of Léon Blum is");
        assert!(r.locality.iter().all(|l| l.answer == "French"));
        assert_eq!(r.generation_prompts.len(), 10);
        assert_eq!(r.generation_prompts[0], "Danielle Darrieux's mother tongue is");
        assert_eq!(r.subject_span(), Some(21..38));
    }

    #[test]
    fn parses_zsre_and_trims_target() {
        let r = parse_record(ZSRE_CASE_26).expect("valid record");
        assert_eq!(
            r,
            EditRecord {
                case_id: Some(26),
                prompt: "What was the year MAT-49 entered service?".into(),
                subject: "MAT-49".into(),
                target_new: "MAT-49".into(), // " MAT-49" in the input
                ground_truth: Some("1949".into()),
                rephrase_prompts: vec!["What year was MAT-49 introduced?".into()],
                locality: vec![LocalityPrompt {
                    prompt: "nq question: who plays zoey in i love you man".into(),
                    answer: "Rashida Jones".into()
                }],
                generation_prompts: vec![],
                format: RecordFormat::Zsre,
            }
        );
    }

    #[test]
    fn parses_zsre_without_optional_fields() {
        let mut v = zsre();
        let o = v.as_object_mut().expect("object");
        for k in ["case_id", "answers", "rephrase", "loc", "loc_ans"] {
            o.remove(k);
        }
        let r = parse(v).expect("valid record");
        assert_eq!(r.case_id, None);
        assert_eq!(r.ground_truth, None);
        assert!(r.rephrase_prompts.is_empty() && r.locality.is_empty());
    }

    #[test]
    fn parses_minimal() {
        let r = parse(minimal()).expect("valid record");
        assert_eq!(
            r,
            EditRecord {
                case_id: None,
                prompt: "The capital of France is".into(),
                subject: "France".into(),
                target_new: "Lyon".into(),
                ground_truth: None,
                rephrase_prompts: vec![],
                locality: vec![],
                generation_prompts: vec![],
                format: RecordFormat::Minimal,
            }
        );
        let mut v = minimal();
        v["case_id"] = 7.into();
        v["ground_truth"] = " Paris ".into();
        v["target"] = "  Lyon\n".into();
        let r = parse(v).expect("valid record");
        assert_eq!(r.case_id, Some(7));
        assert_eq!(r.ground_truth.as_deref(), Some("Paris"));
        assert_eq!(r.target_new, "Lyon");
    }

    #[test]
    fn serialises_format_snake_case() {
        let r = parse_record(FLAT_CASE_2).expect("valid record");
        let json = serde_json::to_value(&r).expect("serialisable");
        assert_eq!(json["format"], "counterfact_flat");
        assert_eq!(json["locality"][0]["answer"], "guitar");
        assert_eq!(RecordFormat::CounterfactRome.to_string(), "counterfact_rome");
    }

    #[test]
    fn invalid_json_is_reported_without_field() {
        let (field, reason) = parse_record(&FLAT_CASE_2[..40]).expect_err("truncated");
        assert_eq!(field, None);
        assert!(reason.starts_with("invalid JSON: "), "{reason}");
        assert!(reason.contains("EOF while parsing"), "{reason}");
    }

    #[test]
    fn non_object_is_rejected() {
        for (line, found) in
            [("[1, 2]", "an array"), ("\"prompt\"", "a string"), ("3", "a number"), ("null", "null")]
        {
            let (field, reason) = parse_record(line).expect_err("not an object");
            assert_eq!(field, None);
            assert_eq!(reason, format!("expected a JSON object, found {found}"));
        }
    }

    #[test]
    fn unknown_format_lists_the_key_sets() {
        let (field, reason) =
            parse(serde_json::json!({"prompt": "a b", "subject": "a", "answer": "c"})).expect_err("unknown");
        assert_eq!(field, None);
        assert!(reason.contains("keys: answer, prompt, subject"), "{reason}");
        for needle in [
            "target_new",
            "requested_rewrite",
            "alt",
            "minimal {prompt, subject, target,",
            "counterfact_flat",
            "zsre",
            "minimal",
        ] {
            assert!(reason.contains(needle), "{reason} lacks {needle}");
        }
        let (_, reason) = parse_record("{}").expect_err("unknown");
        assert!(reason.contains("keys: none"), "{reason}");
    }

    #[test]
    fn missing_fields_are_named() {
        for (mut v, key, field) in [
            (flat(), "prompt", "prompt"),
            (flat(), "subject", "subject"),
            (zsre(), "src", "src"),
            (zsre(), "subject", "subject"),
            (minimal(), "subject", "subject"),
            (minimal(), "prompt", "prompt"),
        ] {
            v.as_object_mut().expect("object").remove(key);
            assert_field_err(v, field, "missing");
        }
        // zsRE is recognised by `src`, so a missing `alt` is a field error, not an unknown format.
        let mut v = zsre();
        v.as_object_mut().expect("object").remove("alt");
        assert_field_err(v, "alt", "missing");

        let mut v = rome();
        v["requested_rewrite"].as_object_mut().expect("object").remove("subject");
        assert_field_err(v, "requested_rewrite.subject", "missing");
        let mut v = rome();
        v["requested_rewrite"]["target_new"] = serde_json::json!({"id": "Q1860"});
        assert_field_err(v, "requested_rewrite.target_new.str", "missing");
        let mut v = rome();
        v["requested_rewrite"].as_object_mut().expect("object").remove("target_true");
        assert_field_err(v, "requested_rewrite.target_true.str", "missing");

        let mut v = flat();
        v.as_object_mut().expect("object").remove("locality_ground_truth");
        assert_field_err(v, "locality_ground_truth", "missing");
        let mut v = zsre();
        v.as_object_mut().expect("object").remove("loc");
        assert_field_err(v, "loc", "missing");
    }

    #[test]
    fn a_blank_zsre_reference_answer_means_no_ground_truth() {
        for answers in [serde_json::json!([""]), serde_json::json!("  "), serde_json::json!([])] {
            let mut v = zsre();
            v["answers"] = answers.clone();
            let r = parse_record(&v.to_string()).unwrap_or_else(|e| panic!("{answers}: {e:?}"));
            assert_eq!(r.ground_truth, None, "{answers}");
        }
        let mut v = zsre();
        v["answers"] = serde_json::json!([" 1949 ", "x"]);
        assert_eq!(parse_record(&v.to_string()).unwrap().ground_truth.as_deref(), Some("1949"));
        let mut v = zsre();
        v["answers"] = serde_json::json!(["1949", 3]);
        assert_field_err(v, "answers[1]", "expected a string, found a number");
    }

    #[test]
    fn wrong_types_are_named() {
        let mut v = flat();
        v["subject"] = 5.into();
        assert_field_err(v, "subject", "expected a string, found a number");
        let mut v = flat();
        v["case_id"] = (-1).into();
        assert_field_err(v, "case_id", "expected a non-negative integer");
        let mut v = flat();
        v["case_id"] = "2".into();
        assert_field_err(v, "case_id", "expected a non-negative integer");
        let mut v = zsre();
        v["answers"] = serde_json::json!({"a": 1});
        assert_field_err(v, "answers", "expected a string or an array of strings");
        let mut v = rome();
        v["requested_rewrite"]["target_new"] = "English".into();
        assert_field_err(v, "requested_rewrite.target_new", "expected an object, found a string");
        let mut v = rome();
        v["paraphrase_prompts"][1] = serde_json::json!(["nested"]);
        assert_field_err(v, "paraphrase_prompts[1]", "expected a string, found an array");
        let mut v = rome();
        v["generation_prompts"] = "one".into();
        assert_field_err(v, "generation_prompts", "expected an array of strings");
        let mut v = minimal();
        v["target"] = true.into();
        assert_field_err(v, "target", "expected a string, found a boolean");
    }

    #[test]
    fn subject_must_occur_exactly_in_prompt() {
        let mut v = flat();
        v["subject"] = "toko yasuda".into(); // case differs: rejected
        let (field, reason) = parse(v).expect_err("subject not in prompt");
        assert_eq!(field.as_deref(), Some("subject"));
        assert!(reason.contains("\"toko yasuda\"") && reason.contains("\"Toko Yasuda, the\""), "{reason}");
        let mut v = zsre();
        v["subject"] = "MAT-50".into();
        assert_field_err(v, "subject", "does not occur in the prompt");
        let mut v = minimal();
        v["subject"] = "  ".into();
        assert_field_err(v, "subject", "empty subject");
    }

    #[test]
    fn empty_targets_name_the_input_field() {
        for blank in ["", "  \t"] {
            let mut v = flat();
            v["target_new"] = blank.into();
            assert_field_err(v, "target_new", "empty target");
            let mut v = rome();
            v["requested_rewrite"]["target_new"]["str"] = blank.into();
            assert_field_err(v, "requested_rewrite.target_new.str", "empty target");
            let mut v = zsre();
            v["alt"] = blank.into();
            assert_field_err(v, "alt", "empty target");
            let mut v = minimal();
            v["target"] = blank.into();
            assert_field_err(v, "target", "empty target");
        }
        assert_eq!(parse_record(ZSRE_CASE_1571), Err((Some("alt".to_owned()), "empty target".to_owned())));
    }

    #[test]
    fn empty_prompts_are_rejected() {
        let mut v = flat();
        v["prompt"] = " ".into();
        assert_field_err(v, "prompt", "empty prompt");
        let mut v = zsre();
        v["src"] = "".into();
        assert_field_err(v, "src", "empty prompt");
        let mut v = minimal();
        v["prompt"] = "".into();
        assert_field_err(v, "prompt", "empty prompt");
        let mut v = flat();
        v["locality_prompt"] = "".into();
        assert_field_err(v, "locality_prompt", "empty prompt");
        let mut v = rome();
        v["neighborhood_prompts"][3] = "".into();
        assert_field_err(v, "neighborhood_prompts[3]", "empty prompt");
    }

    #[test]
    fn rome_template_needs_one_placeholder() {
        let mut v = rome();
        v["requested_rewrite"]["prompt"] = "The mother tongue of Danielle Darrieux is".into();
        assert_field_err(v, "requested_rewrite.prompt", "no `{}` placeholder");
        let mut v = rome();
        v["requested_rewrite"]["prompt"] = "{} and {} speak".into();
        assert_field_err(v, "requested_rewrite.prompt", "2 `{}` placeholders");
    }

    #[test]
    fn record_error_display() {
        let mut e = RecordError {
            source: "edits.jsonl".into(),
            line: 12,
            field: Some("alt".into()),
            reason: "empty target".into(),
            io: false,
        };
        assert_eq!(e.to_string(), "edits.jsonl:12: field `alt`: empty target");
        e.field = None;
        assert_eq!(e.to_string(), "edits.jsonl:12: empty target");
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(e);
        assert!(boxed.to_string().starts_with("edits.jsonl:12"));
    }

    #[test]
    fn reader_counts_blank_lines_and_continues_after_errors() {
        let text = format!(
            "\n{FLAT_CASE_2}\r\n   \n\t\n{ZSRE_CASE_1571}\nnot json\n{ROME_CASE_0}\n\n{ZSRE_CASE_26}"
        );
        let items: Vec<_> = reader(&text).collect();
        assert_eq!(items.len(), 5);
        let (line, r) = items[0].as_ref().expect("flat record");
        assert_eq!((*line, r.case_id, r.prompt.as_str()), (2, Some(2), "Toko Yasuda, the"));
        assert_eq!(
            items[1],
            Err(RecordError {
                source: "mem.jsonl".into(),
                line: 5,
                field: Some("alt".into()),
                reason: "empty target".into(),
                io: false,
            })
        );
        let e = items[2].as_ref().expect_err("bad JSON");
        assert_eq!((e.line, e.field.as_deref()), (6, None));
        assert!(e.to_string().starts_with("mem.jsonl:6: invalid JSON"), "{e}");
        let lines: Vec<usize> = items[3..].iter().map(|i| i.as_ref().expect("valid").0).collect();
        assert_eq!(lines, [7, 9]);
    }

    #[test]
    fn reader_handles_bom_invalid_utf8_and_empty_input() {
        assert_eq!(reader("").count(), 0);
        assert_eq!(reader("\n \n").count(), 0);
        let mut bytes = b"\xEF\xBB\xBF".to_vec();
        bytes.extend_from_slice(FLAT_CASE_2.as_bytes());
        bytes.extend_from_slice(b"\n\xFF\xFE\n");
        bytes.extend_from_slice(FLAT_CASE_2.as_bytes());
        let items: Vec<_> = EditReader::from_reader("b", Box::new(Cursor::new(bytes))).collect();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].as_ref().map(|(l, _)| *l), Ok(1));
        let e = items[1].as_ref().expect_err("invalid UTF-8");
        assert_eq!((e.line, e.field.is_none()), (2, true));
        assert!(e.reason.contains("not valid UTF-8"), "{e}");
        assert_eq!(items[2].as_ref().map(|(l, _)| *l), Ok(3));
    }

    #[test]
    fn target_equal_to_the_replaced_fact_is_rejected() {
        let mut v = flat();
        v["target_new"] = " guitar ".into();
        assert_field_err(v, "target_new", "is the ground truth");
        let mut v = rome();
        v["requested_rewrite"]["target_new"]["str"] = "French".into();
        assert_field_err(v, "requested_rewrite.target_new.str", "the edit would change nothing");
        let mut v = minimal();
        v["ground_truth"] = "Lyon".into();
        assert_field_err(v, "target", "is the ground truth");
        // zsRE's answers are reference answers, not the replaced fact: an equal `alt` is an edit.
        let mut v = zsre();
        v["alt"] = "1949".into();
        let r = parse(v).expect("valid record");
        assert_eq!(r.target_new, "1949");
        // ... with nothing to beat: it is judged as a record without a ground truth.
        assert_eq!(r.ground_truth, None);
        // Only an exact match (after trimming) is a no-op.
        let mut v = flat();
        v["target_new"] = "Guitar".into();
        assert!(parse(v).is_ok());
    }

    #[test]
    fn long_lines_are_bad_lines_and_reading_goes_on() {
        let long = format!("{{\"prompt\": \"{}\"}}", "x".repeat(5000));
        let text = format!("{FLAT_CASE_2}\n{long}\n{FLAT_CASE_2}\n{long}");
        let cap = FLAT_CASE_2.len();
        let items: Vec<_> = reader(&text).with_max_line_bytes(cap).collect();
        assert_eq!(items.len(), 4);
        assert_eq!(items[0].as_ref().map(|(l, _)| *l), Ok(1));
        for (item, line) in [(&items[1], 2), (&items[3], 4)] {
            let e = item.as_ref().expect_err("too long");
            assert_eq!((e.line, e.field.as_deref()), (line, None));
            assert!(e.reason.contains(&format!("longer than {cap} bytes")), "{e}");
        }
        assert_eq!(items[2].as_ref().map(|(l, _)| *l), Ok(3));
        // A line of exactly the cap passes, with or without its newline or a CR.
        for text in [FLAT_CASE_2.to_owned(), format!("{FLAT_CASE_2}\n"), format!("{FLAT_CASE_2}\r\n")] {
            let items: Vec<_> =
                reader(&text).with_max_line_bytes(text.trim_end_matches('\n').len()).collect();
            assert!(matches!(items[..], [Ok((1, _))]), "{items:?}");
        }
    }

    #[test]
    fn record_checks_make_bad_lines() {
        let text = format!("{FLAT_CASE_2}\n{ZSRE_CASE_26}\n");
        let mut r = reader(&text);
        r.set_check(Box::new(|rec: &EditRecord| {
            if rec.format == RecordFormat::Zsre {
                Err((Some(rec.format.fields().prompt.to_owned()), "too long".to_owned()))
            } else {
                Ok(())
            }
        }));
        let items: Vec<_> = r.collect();
        assert!(items[0].is_ok());
        let e = items[1].as_ref().expect_err("checked");
        assert_eq!(e.to_string(), "mem.jsonl:2: field `src`: too long");
    }

    #[test]
    fn counts_non_blank_lines_in_blocks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("e.jsonl");
        std::fs::write(&path, format!("a\n\n  \t\n{}\nb", "x".repeat(100_000))).expect("write");
        assert_eq!(count_nonblank_lines(&path), 3);
        std::fs::write(&path, "a\r\n \r\n").expect("write");
        assert_eq!(count_nonblank_lines(&path), 1);
        assert_eq!(count_nonblank_lines(&dir.path().join("missing")), 0);
    }

    #[test]
    fn a_directory_is_not_an_edit_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = EditReader::open(dir.path()).expect_err("a directory");
        assert!(e.is::<InputError>(), "{e:#}");
        assert!(e.to_string().contains("is a directory"), "{e:#}");
    }

    #[test]
    fn field_names_index_list_items() {
        let f = RecordFormat::CounterfactRome.fields();
        assert_eq!(f.item(f.rephrase.expect("rephrase"), 0, 1), "paraphrase_prompts[0]");
        let f = RecordFormat::CounterfactFlat.fields();
        assert_eq!(f.item(f.rephrase.expect("rephrase"), 0, 1), "rephrase_prompt");
        assert_eq!(f.item(f.rephrase.expect("rephrase"), 1, 2), "rephrase_prompt[1]");
        assert_eq!(RecordFormat::Zsre.fields().target_new, "alt");
    }

    /// Yields `good` and then fails.
    struct FailingReader {
        good: Cursor<Vec<u8>>,
    }
    impl Read for FailingReader {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.good.read(buf)? {
                0 => Err(std::io::Error::other("disk on fire")),
                n => Ok(n),
            }
        }
    }

    #[test]
    fn io_error_becomes_record_error_and_ends_iteration() {
        let good = format!("{FLAT_CASE_2}\n\n").into_bytes();
        let r = BufReader::new(FailingReader { good: Cursor::new(good) });
        let mut it = EditReader::from_reader("<stdin>", Box::new(r));
        assert_eq!(it.next().and_then(|i| i.ok()).map(|(l, _)| l), Some(1));
        let e = it.next().expect("an item").expect_err("I/O error");
        assert_eq!((e.source.as_str(), e.line, e.field.as_deref()), ("<stdin>", 3, None));
        assert!(e.reason.contains("I/O error") && e.reason.contains("disk on fire"), "{e}");
        assert!(e.to_string().starts_with("<stdin>:3: "), "{e}");
        assert!(it.next().is_none());
        assert!(it.next().is_none());
    }

    #[test]
    fn open_dash_is_stdin_and_missing_files_are_named() {
        let r = EditReader::open(Path::new("-")).expect("stdin");
        assert_eq!(r.source_name(), "<stdin>");
        let missing = Path::new("/nonexistent/oedit-no-such-file.jsonl");
        let e = EditReader::open(missing).expect_err("missing file");
        assert!(format!("{e:#}").contains("/nonexistent/oedit-no-such-file.jsonl"), "{e:#}");
    }

    #[test]
    fn open_reads_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("edits.jsonl");
        std::fs::write(&path, format!("{ROME_CASE_0}\n\n{ZSRE_CASE_1571}\n")).expect("write");
        let items: Vec<_> = EditReader::open(&path).expect("open").collect();
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        let e = items[1].as_ref().expect_err("empty alt");
        assert_eq!(e.source, path.display().to_string());
        assert_eq!(e.line, 3);
    }

    /// Reads a whole JSONL file; returns (records, errors).
    fn read_all(path: &Path) -> (Vec<EditRecord>, Vec<RecordError>) {
        let mut records = Vec::new();
        let mut errors = Vec::new();
        for item in EditReader::open(path).expect("open") {
            match item {
                Ok((_, r)) => records.push(r),
                Err(e) => errors.push(e),
            }
        }
        (records, errors)
    }

    /// Asserts that the only errors are empty `alt`s on the lines holding case_id 1571 and 1760.
    fn assert_zsre_errors(path: &Path, errors: &[RecordError]) {
        assert_eq!(errors.len(), 2, "{errors:?}");
        let text = std::fs::read_to_string(path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        for (e, id) in errors.iter().zip([1571, 1760]) {
            assert_eq!((e.field.as_deref(), e.reason.as_str()), (Some("alt"), "empty target"));
            let line = lines[e.line - 1];
            assert!(line.starts_with(&format!("{{\"case_id\": {id},")), "{e}: {line}");
        }
    }

    #[test]
    fn committed_samples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
        let (cf, errors) = read_all(&dir.join("counterfact-sample.jsonl"));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(cf.len(), 300);
        assert!(cf.iter().enumerate().all(|(i, r)| r.case_id == Some(i as u64)));
        assert!(cf.iter().all(|r| r.format == RecordFormat::CounterfactFlat));

        let (rome, errors) = read_all(&dir.join("counterfact-rome-sample.jsonl"));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(rome.len(), 27);
        assert!(rome.iter().all(|r| r.locality.len() == 10 && r.rephrase_prompts.len() == 2));

        let (zs, errors) = read_all(&dir.join("zsre-sample.jsonl"));
        assert_eq!(zs.len(), 200);
        assert!(zs.iter().all(|r| r.format == RecordFormat::Zsre));
        assert_zsre_errors(&dir.join("zsre-sample.jsonl"), &errors);
    }

    /// Parses every record of the full benchmark files (`../shared/data` beside the checkout, or
    /// `OEDIT_SHARED_DATA`). Ignored by default, since a fresh clone has no such folder;
    /// `scripts/test.sh` runs it whenever the folder exists, and it fails (never passes silently)
    /// when run without the data.
    #[test]
    #[ignore = "needs the benchmark data (../shared/data or OEDIT_SHARED_DATA); scripts/test.sh runs it when present"]
    fn all_shared_data_parses() {
        let dir = std::env::var_os("OEDIT_SHARED_DATA")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
        assert!(dir.is_dir(), "{} not found: set OEDIT_SHARED_DATA to the benchmark data", dir.display());
        let (cf, errors) = read_all(&dir.join("counterfact.jsonl"));
        assert!(errors.is_empty(), "{:?}", &errors[..errors.len().min(5)]);
        assert_eq!(cf.len(), 21_919);

        let (rome, errors) = read_all(&dir.join("counterfact_rome_format.jsonl"));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(rome.len(), 27);
        // The ROME-form records agree with the flattened records of the same case_id.
        for r in &rome {
            let id = r.case_id.expect("case_id");
            let f = &cf[usize::try_from(id).expect("small id")];
            assert_eq!(f.case_id, Some(id));
            assert_eq!((&f.prompt, &f.subject, &f.target_new), (&r.prompt, &r.subject, &r.target_new));
            assert_eq!(f.ground_truth, r.ground_truth);
        }

        let (zs, errors) = read_all(&dir.join("zsre.jsonl"));
        assert_eq!(zs.len(), 2_035);
        assert_zsre_errors(&dir.join("zsre.jsonl"), &errors);
        assert_eq!((errors[0].line, errors[1].line), (1572, 1761));
    }
}
