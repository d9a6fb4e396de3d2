//! `oedit generate`: continuation of a prompt, greedy or sampled.

use anyhow::Result;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use clap::Args;

use super::ModelArgs;
use crate::errors::InputError;
use crate::infer::{generate, generate_sampled};

/// Arguments of `oedit generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt to continue.
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 20)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 (the default) decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample only from the most probable tokens holding this much probability (nucleus sampling).
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Sample only from the K most probable tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed of the sampler (the same seed, model and prompt give the same text).
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
    /// Print a JSON object {"prompt", "completion"} instead of plain text.
    #[arg(long)]
    pub json: bool,
}

/// The sampling rule the flags ask for, or None for greedy decoding.
fn sampling(args: &GenerateArgs) -> Result<Option<Sampling>, InputError> {
    let t = args.temperature;
    // Below 10⁻⁴ the scaled logits overflow the sampler's weights: 0 is the greedy setting.
    if !(t.is_finite() && (t == 0.0 || t >= 1e-4)) {
        return Err(InputError(format!("--temperature must be 0 (greedy) or a number ≥ 0.0001, not {t}")));
    }
    if let Some(p) = args.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(InputError(format!("--top-p must be in (0, 1], not {p}")));
        }
    }
    if args.top_k == Some(0) {
        return Err(InputError("--top-k must be at least 1".into()));
    }
    if t == 0.0 {
        if args.top_p.is_some() || args.top_k.is_some() {
            return Err(InputError("--top-p and --top-k need a --temperature above 0".into()));
        }
        return Ok(None);
    }
    Ok(Some(match (args.top_k, args.top_p) {
        (None, None) => Sampling::All { temperature: t },
        (Some(k), None) => Sampling::TopK { k, temperature: t },
        (None, Some(p)) => Sampling::TopP { p, temperature: t },
        (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature: t },
    }))
}

/// Runs `oedit generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let sampling = sampling(&args)?;
    let lm = args.model.load()?;
    let completion = match sampling {
        None => generate(&lm.model, &lm.tok, &args.prompt, args.max_tokens)?,
        Some(s) => {
            let mut sampler = LogitsProcessor::from_sampling(args.seed, s);
            generate_sampled(&lm.model, &lm.tok, &args.prompt, args.max_tokens, &mut sampler)?
        }
    };
    let text = if args.json {
        serde_json::json!({ "prompt": args.prompt, "completion": completion }).to_string()
    } else {
        format!("{}{}", args.prompt, completion)
    };
    crate::output::print_line(&text)
}
