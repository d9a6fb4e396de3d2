//! Benchmark binary (JSON on stdout): evaluation records/s on one model, as `oedit eval --no-cache`
//! scores it, on SmolLM2-135M in f32, for each metric set of BENCH_EVAL_SETS (`;`-separated
//! `--metrics` values; default: the teacher-forced `efficacy,generalization,locality`, the
//! generation metrics `gen`, and both). Records: the first BENCH_EVAL_N (default 300) of
//! BENCH_EVAL_FILE (default data/counterfact-sample.jsonl); threads: BENCH_THREADS (default 2);
//! passes: BENCH_EVAL_REPEAT (default 1, the median is reported).

mod common;

use std::path::PathBuf;
use std::time::Instant;

use oedit::data::EditReader;
use oedit::device::DeviceSpec;
use oedit::eval::{score_all, MetricSet};
use oedit::loader::load_model;
use serde_json::json;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let Some(path) = common::smollm2() else { return Ok(()) };
    let file = std::env::var_os("BENCH_EVAL_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/counterfact-sample.jsonl"));
    let n = env_usize("BENCH_EVAL_N", 300);
    let repeat = env_usize("BENCH_EVAL_REPEAT", 1).max(1);
    let pool = common::pool();
    pool.install(|| -> anyhow::Result<()> {
        let lm = load_model(path.to_str().unwrap_or_default(), &DeviceSpec::Cpu, None)?;
        let records: Vec<_> =
            EditReader::open(&file)?.filter_map(Result::ok).map(|(_, r)| r).take(n).collect();
        let sets = std::env::var("BENCH_EVAL_SETS").unwrap_or_else(|_| {
            "efficacy,generalization,locality;gen;efficacy,generalization,locality,gen".into()
        });
        let mut results = Vec::new();
        for set in sets.split(';').filter(|s| !s.trim().is_empty()) {
            let which = MetricSet::parse(set).map_err(anyhow::Error::msg)?;
            let mut secs = Vec::new();
            for _ in 0..repeat {
                let t = Instant::now();
                score_all(&lm.model, &lm.tok, &records, which, 0, "bench", None)?;
                secs.push(t.elapsed().as_secs_f64());
            }
            secs.sort_by(f64::total_cmp);
            let median = secs[secs.len() / 2];
            results.push(json!({
                "metrics": set,
                "seconds": secs,
                "records_per_second": records.len() as f64 / median,
            }));
        }
        let out = json!({
            "bench": "eval",
            "model": path.file_name().map(|f| f.to_string_lossy().into_owned()),
            "file": file.display().to_string(),
            "records": records.len(),
            "threads": common::threads(),
            "results": results,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        Ok(())
    })
}
