//! Benchmark binary (JSON on stdout, also written to bench-results/batch/bench.json when
//! BENCH_WRITE=1): `oedit edit --batch-size B` on SmolLM2-135M, edits/s and the v* optimisation's
//! GFLOP/s for each batch size, against the machine's measured f32 peak (`value_share_of_peak`)
//! and the matrix-product ceiling of benches/matmul.rs.
//!
//! BENCH_BATCH_SIZES (default `1,10,100`), BENCH_BATCHES (batches per size, default `3,1,1`),
//! BENCH_METHOD (default `oedit-plus`), BENCH_THREADS (default 2), BENCH_V_STEPS (v* steps,
//! default the preset's), BENCH_NAME (the JSON file's name with BENCH_WRITE=1, default `bench`).
//! Each size starts from the unedited model; records are the first ones of
//! data/counterfact-sample.jsonl. Besides wall time it reports CPU time (user + system), which a
//! shared machine does not distort.

mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use oedit::data::EditReader;
use oedit::device::DeviceSpec;
use oedit::edit::{templates::context_templates, Editor, Method};
use oedit::fingerprint::model_fingerprint;
use oedit::loader::load_model;
use oedit::presets;
use oedit::stats::{load_or_compute, Corpus};
use serde_json::json;

fn list(var: &str, default: &str) -> Vec<usize> {
    std::env::var(var)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect()
}

/// CPU seconds (user + system) this process has used so far (Linux `/proc/self/stat`, in clock
/// ticks of 1/100 s). On a shared machine wall time depends on what else runs; CPU time does not.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return f64::NAN };
    // Fields after the command name (which ends with the last ')'), from `state` on: utime and
    // stime are the 12th and 13th of them (fields 14 and 15 of the line).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    match (f.get(11).and_then(|x| x.parse::<f64>().ok()), f.get(12).and_then(|x| x.parse::<f64>().ok())) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

/// Peak resident memory of the process so far, MiB (Linux).
fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let Some(path) = common::smollm2() else { return Ok(()) };
    let sizes = list("BENCH_BATCH_SIZES", "1,10,100");
    let batches = list("BENCH_BATCHES", "3,1,1");
    let method_name = std::env::var("BENCH_METHOD").unwrap_or_else(|_| "oedit-plus".to_string());
    let method =
        Method::named(&method_name).ok_or_else(|| anyhow::anyhow!("unknown method {method_name}"))?;
    let peak = common::peak_gflops();
    let pool = common::pool();
    pool.install(|| -> anyhow::Result<()> {
        let spec = path.to_str().unwrap_or_default();
        let lm0 = load_model(spec, &DeviceSpec::Cpu, None)?;
        let mut hp = presets::find("smollm2-135m")?.expect("preset").hparams;
        // The cost of the batch itself: closed-loop landing would add per-record v* runs to
        // the first records' timings and none to the stack's FLOP count.
        hp.landing = oedit::hparams::LandingParams::off();
        if let Some(steps) = std::env::var("BENCH_V_STEPS").ok().and_then(|v| v.parse().ok()) {
            hp.v_steps = steps;
        }
        let cfg = lm0.config().clone();
        let fingerprint = model_fingerprint(&lm0.model)?;
        let layers = method.layers(&hp);
        let stats = load_or_compute(&lm0.model, &lm0.tok, &fingerprint, &layers, hp.cov_tokens, &Corpus::builtin())?;
        let templates = context_templates(&lm0.model, &lm0.tok, hp.context_templates, hp.template_length)?;
        drop(lm0);
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/counterfact-sample.jsonl");
        let records: Vec<_> = EditReader::open(&data)?.filter_map(Result::ok).map(|(_, r)| r).collect();
        // Matrix-product parameters per layer, as benches/edit.rs counts them.
        let per_layer = {
            let d = cfg.hidden_size as f64;
            let f = cfg.intermediate_size as f64;
            let hd = cfg.head_dim() as f64;
            d * cfg.num_attention_heads as f64 * hd * 2.0 + 2.0 * d * cfg.kv_heads() as f64 * hd + 3.0 * d * f
        };
        let mut results = Vec::new();
        for (i, &b) in sizes.iter().enumerate() {
            let n_batches = batches.get(i).copied().unwrap_or(1);
            if b * n_batches > records.len() {
                anyhow::bail!("{} records needed, the sample has {}", b * n_batches, records.len());
            }
            let mut lm = load_model(spec, &DeviceSpec::Cpu, None)?;
            let mut editor = Editor::new(method, hp.clone(), templates.clone(), &stats)?;
            let mut runs = Vec::new();
            for chunk in records.chunks(b).take(n_batches) {
                let (t, cpu0) = (Instant::now(), cpu_seconds());
                let out = editor.edit_batch(&mut lm.model, &lm.tok, chunk)?;
                let seconds = t.elapsed().as_secs_f64();
                let cpu = cpu_seconds() - cpu0;
                let o = &out[0].0;
                // Per v* stack (records of one stack share its shape and time): the matrix
                // products of its forward passes; a backward pass (input gradients only) costs as
                // much as its forward pass.
                // Records come back in file order while stacks group them by suffix length, so
                // a stack's records need not be adjacent: one entry per stack number.
                let stacks: BTreeMap<usize, (oedit::edit::target::StepShape, f64)> =
                    out.iter().map(|(x, _)| (x.value_stack, (x.value_shape, x.value_seconds))).collect();
                let flops: f64 = stacks
                    .values()
                    .map(|(s, _)| {
                        // Rows summed over the passes: a stack shrinks as its records stop.
                        2.0 * per_layer * s.layers as f64 * ((s.row_passes + s.row_backwards) * s.suffix_len) as f64
                            + 2.0
                                * (s.logit_passes + s.logit_backwards) as f64
                                * cfg.vocab_size as f64
                                * cfg.hidden_size as f64
                    })
                    .sum();
                let value_seconds: f64 = stacks.values().map(|(_, t)| t).sum();
                let shapes: Vec<_> = stacks.values().map(|(s, _)| *s).collect();
                let wins = out.iter().filter(|(o, _)| o.target_wins).count();
                runs.push(json!({
                    "records": chunk.len(),
                    "seconds": seconds,
                    "edits_per_second": chunk.len() as f64 / seconds,
                    "cpu_seconds": cpu,
                    "edits_per_cpu_second": chunk.len() as f64 / cpu,
                    "phases": { "key": o.key_seconds, "value": value_seconds, "update": o.update_seconds },
                    "value_stacks": shapes,
                    "value_gflops": flops / value_seconds / 1e9,
                    "value_gflop": flops / 1e9,
                    "value_share_of_cpu": value_seconds / seconds,
                    "target_wins": wins,
                }));
                eprintln!(
                    "B={b}: {seconds:.1} s ({cpu:.1} CPU s), {:.3} edits/s, {:.3} edits per CPU s, v* {:.1} GFLOP/s, {:.1} GFLOP per CPU s",
                    chunk.len() as f64 / seconds,
                    chunk.len() as f64 / cpu,
                    flops / value_seconds / 1e9,
                    flops / 1e9 / (cpu * value_seconds / seconds)
                );
            }
            let total_s: f64 = runs.iter().map(|r| r["seconds"].as_f64().unwrap_or(0.0)).sum();
            let total_n: usize = runs.iter().map(|r| r["records"].as_u64().unwrap_or(0) as usize).sum();
            let flop: f64 = runs.iter().map(|r| r["value_gflop"].as_f64().unwrap_or(0.0)).sum();
            let value_s: f64 = runs.iter().map(|r| r["phases"]["value"].as_f64().unwrap_or(0.0)).sum();
            let cpu_s: f64 = runs.iter().map(|r| r["cpu_seconds"].as_f64().unwrap_or(0.0)).sum();
            // The v* phase's share of the CPU time, taken as its share of the wall time.
            let value_cpu: f64 = runs
                .iter()
                .map(|r| r["cpu_seconds"].as_f64().unwrap_or(0.0) * r["value_share_of_cpu"].as_f64().unwrap_or(0.0))
                .sum();
            results.push(json!({
                "batch_size": b,
                "batches": runs.len(),
                "edits_per_second": total_n as f64 / total_s,
                "value_gflops": flop / value_s,
                "cpu_seconds": cpu_s,
                "edits_per_cpu_second": total_n as f64 / cpu_s,
                "value_gflop_per_cpu_second": flop / value_cpu,
                "peak_rss_mb": peak_rss_mb(),
                "runs": runs,
            }));
        }
        let ceiling = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results/matmul.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        for r in &mut results {
            let share = peak.map(|p| r["value_gflops"].as_f64().unwrap_or(f64::NAN) / p);
            r["value_share_of_peak"] = json!(share);
        }
        let report = json!({
            "model": "SmolLM2-135M-Instruct (f32)",
            "method": method_name,
            "threads": common::threads(),
            "hparams": { "layer": hp.layer, "context_templates": hp.context_templates, "v_steps": hp.v_steps },
            "load_average": std::fs::read_to_string("/proc/loadavg").ok(),
            "results": results,
            "peak_gflops_measured": peak,
            "matmul_ceiling": ceiling,
        });
        let text = serde_json::to_string_pretty(&report)?;
        println!("{text}");
        if std::env::var("BENCH_WRITE").is_ok_and(|v| v == "1") {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results/batch");
            std::fs::create_dir_all(&dir)?;
            let name = std::env::var("BENCH_NAME").unwrap_or_else(|_| "bench".to_string());
            std::fs::write(dir.join(format!("{name}.json")), text + "\n")?;
        }
        Ok(())
    })
}
