//! Benchmark binary (JSON on stdout): seconds per O-Edit edit on SmolLM2-135M and its phases
//! (k*, v*, update, checkpoint-free), the v* step rate in GFLOP/s, key-statistics tokens/s and
//! evaluation records/s (efficacy, generalization, locality on one model). Threads: BENCH_THREADS
//! (default 2); edits: BENCH_EDITS (default 5); evaluated records: BENCH_EVAL_RECORDS (default 1000).

mod common;

use std::time::Instant;

use oedit::data::EditReader;
use oedit::device::DeviceSpec;
use oedit::edit::{prompts, templates::context_templates, Editor, Method};
use oedit::eval::{score_all, MetricSet};
use oedit::loader::load_model;
use oedit::model::{Batch, LayerCtx, Mode, Padding, Taps};
use oedit::presets;
use oedit::run::{RunDir, State};
use oedit::stats::{compute, Corpus};
use serde_json::json;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> anyhow::Result<()> {
    let Some(path) = common::smollm2() else { return Ok(()) };
    // `cargo bench` passes --bench; nothing to parse.
    let n_edits: usize = std::env::var("BENCH_EDITS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let pool = common::pool();
    pool.install(|| -> anyhow::Result<()> {
        let mut lm = load_model(path.to_str().unwrap_or_default(), &DeviceSpec::Cpu, None)?;
        let hp = presets::find("smollm2-135m")?.expect("preset").hparams;
        let cfg = lm.config().clone();

        // Forward, 11 x 20 tokens, logits at all positions.
        let seqs: Vec<Vec<u32>> =
            (0..11u32).map(|r| (0..20u32).map(|i| 1000 + (r * 37 + i * 101) % 40000).collect()).collect();
        let batch = Batch::new(seqs, Padding::Right, 0)?;
        lm.model.forward(&batch, &Taps::default())?;
        let mut fwd = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            lm.model.forward(&batch, &Taps::default())?;
            fwd.push(t.elapsed().as_secs_f64());
        }

        // Key statistics.
        let corpus = Corpus::builtin();
        let t = Instant::now();
        let stats = compute(&lm.model, &lm.tok, hp.layer, hp.cov_tokens, &corpus)?;
        let stats_s = t.elapsed().as_secs_f64();

        // Edits.
        let templates = context_templates(&lm.model, &lm.tok, hp.context_templates, hp.template_length)?;
        let mut editor = Editor::new(Method::named("oedit-plus").unwrap(), hp.clone(), templates.clone(), std::slice::from_ref(&stats))?;
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/counterfact-sample.jsonl");
        let records: Vec<_> = EditReader::open(&data)?.filter_map(Result::ok).map(|(_, r)| r).take(n_edits).collect();
        let (mut total, mut key, mut value, mut update, mut step, mut gflops, mut steps, mut ckpt) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        let run_tmp = std::env::temp_dir().join(format!("oedit-bench-{}", std::process::id()));
        let rd = RunDir::create(&run_tmp)?;
        let mut state = State::new();
        let per_layer = {
            let d = cfg.hidden_size as f64;
            let f = cfg.intermediate_size as f64;
            let hd = cfg.head_dim() as f64;
            d * cfg.num_attention_heads as f64 * hd * 2.0 + 2.0 * d * cfg.kv_heads() as f64 * hd + 3.0 * d * f
        };
        for rec in &records {
            let p = prompts::build(&lm.tok, rec, &templates)?;
            let suffix = LayerCtx::suffix(&lm.model, &p.batch, &p.subject_last, Mode::Differentiable)?;
            let suffix_tokens = (p.batch.batch_size() * suffix.len) as f64;
            let target_rows = (p.rewrite_rows * p.target_ids.len() + 1) as f64;
            let layers_after = (cfg.num_hidden_layers - hp.layer - 1) as f64;
            // forward + input-gradient backward (2x), matmuls only.
            let flops = 2.0
                * (2.0 * per_layer * layers_after * suffix_tokens
                    + 2.0 * target_rows * cfg.vocab_size as f64 * cfg.hidden_size as f64);
            let t = Instant::now();
            let (o, applied) = editor.edit(&mut lm.model, &lm.tok, rec)?;
            let tc = Instant::now();
            state.updates.extend(applied);
            state.n_edits += 1;
            rd.commit(&mut state, &editor.subspaces())?;
            ckpt.push(tc.elapsed().as_secs_f64());
            total.push(t.elapsed().as_secs_f64());
            key.push(o.key_seconds);
            value.push(o.value_seconds);
            update.push(o.update_seconds);
            steps.push(o.steps as f64);
            let calls = (o.steps + 1) as f64;
            step.push(o.value_seconds / calls);
            gflops.push(flops / (o.value_seconds / calls) / 1e9);
        }

        std::fs::remove_dir_all(&run_tmp).ok();

        // Evaluation.
        // 1,000 CounterFact records from ../shared/data when present, else the 300-record sample.
        let n_eval: usize = std::env::var("BENCH_EVAL_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
        let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/counterfact.jsonl");
        let eval_file = if shared.is_file() { shared } else { data.clone() };
        let eval_records: Vec<_> =
            EditReader::open(&eval_file)?.filter_map(Result::ok).map(|(_, r)| r).take(n_eval).collect();
        let which = MetricSet { efficacy: true, generalization: true, locality: true, ..MetricSet::default() };
        let t = Instant::now();
        score_all(&lm.model, &lm.tok, &eval_records, which, 0, "bench", None)?;
        let eval_s = t.elapsed().as_secs_f64();

        let report = json!({
            "model": "SmolLM2-135M-Instruct (f32)",
            "threads": common::threads(),
            "forward_11x20_seconds": median(fwd),
            "stats": { "tokens": stats.tokens, "seconds": stats_s, "tokens_per_second": stats.tokens as f64 / stats_s },
            "edit": {
                "edits": records.len(),
                "median_seconds": median(total),
                "median_phase_seconds": { "key": median(key), "value": median(value), "update": median(update), "checkpoint": median(ckpt) },
                "median_steps": median(steps),
                "median_step_seconds": median(step),
                "median_step_gflops": median(gflops),
            },
            "eval": { "records": eval_records.len(), "seconds": eval_s, "records_per_second": eval_records.len() as f64 / eval_s },
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        Ok(())
    })
}
