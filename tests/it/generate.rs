//! `oedit generate` with sampling (candle-transformers' LogitsProcessor): seeded, reproducible,
//! greedy at temperature 0, and bad sampling flags refused before the model loads.

use std::path::Path;

use crate::common::*;

fn generate_json(model: &Path, extra: &[&str]) -> String {
    let mut c = oedit_cmd();
    c.args(["--threads", "1", "generate", "--model"]).arg(model);
    c.args(["--prompt", "Tom works at", "--max-tokens", "16", "--json"]).args(extra);
    let o = run(c);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    v["completion"].as_str().unwrap().to_string()
}

#[test]
fn sampling_is_seeded_and_temperature_zero_is_greedy() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), TinyOpts::default());
    let greedy = generate_json(&model, &[]);
    assert_eq!(generate_json(&model, &["--temperature", "0"]), greedy);
    // The same seed gives the same text; a high temperature over a random model's flat
    // distribution gives different texts for different seeds and departs from greedy.
    let hot = |seed: &str| generate_json(&model, &["--temperature", "5", "--seed", seed]);
    let (a, b, c) = (hot("1"), hot("1"), hot("2"));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, greedy);
    // top-k 1 is greedy whatever the temperature.
    assert_eq!(generate_json(&model, &["--temperature", "5", "--top-k", "1", "--seed", "3"]), greedy);
    // A tiny nucleus keeps only the most probable token: greedy again.
    assert_eq!(generate_json(&model, &["--temperature", "1", "--top-p", "1e-9", "--seed", "4"]), greedy);
}

#[test]
fn bad_sampling_flags_are_input_errors() {
    for (args, want) in [
        (vec!["--top-p", "0.9"], "need a --temperature"),
        (vec!["--temperature=-1"], "--temperature"),
        (vec!["--temperature", "1", "--top-p", "1.5"], "--top-p"),
        (vec!["--temperature", "1", "--top-k", "0"], "--top-k"),
    ] {
        let mut c = oedit_cmd();
        // The model does not exist: the flags are checked first.
        c.args(["generate", "--model", "/nonexistent/model", "--prompt", "x"]).args(&args);
        let o = run(c);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = assert_clean_failure(&o);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// The prompt and the new tokens must fit the model's context (128 positions for the tiny
/// model): one token more is refused with the largest `--max-tokens` that fits, which runs.
#[test]
fn generation_past_the_context_is_refused_naming_the_largest_max_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), TinyOpts::default());
    let gen = |max: &str| {
        let mut c = oedit_cmd();
        c.args(["--threads", "1", "generate", "--model"]).arg(&model);
        c.args(["--prompt", "Tom works at", "--max-tokens", max]);
        run(c)
    };
    let o = gen("1000");
    let line = assert_clean_failure(&o);
    assert_eq!(o.status.code(), Some(2), "{line}");
    assert!(line.contains("more than the model's context of 128"), "{line}");
    let fits: usize =
        line.split("give --max-tokens ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!((100..128).contains(&fits), "{line}");
    assert_ok(&gen(&fits.to_string()));
    assert_eq!(gen(&(fits + 1).to_string()).status.code(), Some(2));
}
