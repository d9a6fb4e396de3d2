//! Times the factor cache on a real statistics file, without loading a model: the session's
//! preconditioner (Cholesky of the regularised C) built three ways — without the cache, through
//! an empty cache (compute + write), and through the filled cache (read) — and checks that the
//! three factors are bit-identical.
//!
//! ```text
//! cargo run --release --example factor_cache_timing -- STATS.safetensors CACHE_DIR [REGULARIZATION]
//! ```
//!
//! STATS is a key-statistics cache file (`$OEDIT_CACHE/stats/*.safetensors`); REGULARIZATION is
//! `cov_regularization` (default 0.01, the presets'). Prints one JSON object.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use oedit::edit::update::{Metric, Preconditioner};
use oedit::factor_cache::FactorCache;
use oedit::linalg::with_factor_memo;
use oedit::loader::reader::TensorFiles;
use oedit::stats::KeyStats;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [stats, cache, rest @ ..] = &args[..] else {
        bail!("usage: factor_cache_timing STATS.safetensors CACHE_DIR [REGULARIZATION]");
    };
    let reg: f64 = rest.first().map(|r| r.parse()).transpose()?.unwrap_or(0.01);
    let t = Instant::now();
    let files = TensorFiles::open(&[stats.into()])?;
    let (shape, second_moment) = files.read_f64("second_moment").context("reading C")?;
    let dim = shape[0];
    let read_stats = t.elapsed().as_secs_f64();
    let s = KeyStats { layer: 0, tokens: 0, dim, second_moment };
    // A probe: the whitened image of a fixed vector, compared bit for bit across the three.
    let probe: Vec<f64> = (0..dim).map(|i| ((i * 7919) % 1000) as f64 / 1000.0 - 0.5).collect();
    let bits = |p: &Preconditioner| -> Vec<u64> {
        p.to_metric(&probe, Metric::Covariance).iter().map(|x| x.to_bits()).collect()
    };
    let time = |f: &dyn Fn() -> Result<Preconditioner>| -> Result<(f64, Vec<u64>)> {
        let t = Instant::now();
        let p = f()?;
        Ok((t.elapsed().as_secs_f64(), bits(&p)))
    };
    let dir = std::path::PathBuf::from(cache);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let (plain, b0) = time(&|| Preconditioner::new(&s, reg))?;
    let memo = || FactorCache::at(dir.clone()).into_memo();
    let (cold, b1) = time(&|| with_factor_memo(memo(), || Preconditioner::new(&s, reg)))?;
    let (warm, b2) = time(&|| with_factor_memo(memo(), || Preconditioner::new(&s, reg)))?;
    let bytes: u64 = std::fs::read_dir(&dir)?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
    println!(
        "{}",
        serde_json::json!({
            "dim": dim,
            "read_stats_s": read_stats,
            "cholesky_no_cache_s": plain,
            "cholesky_cold_cache_s": cold,
            "cholesky_warm_cache_s": warm,
            "cache_bytes": bytes,
            "identical": b0 == b1 && b1 == b2,
        })
    );
    Ok(())
}
