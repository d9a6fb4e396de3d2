//! Benchmark binary (JSON on stdout): GFLOP/s of candle's CPU matrix product (the gemm crate)
//! for the skinny shapes of one v* step on SmolLM2-135M (35 suffix rows against the 576/1536-wide
//! weights), with the weight stored transposed (x · Wᵀ as x · Wt, what oedit does on CPU) and as
//! the product's transpose (W · xᵀ), plus wider row counts for comparison. It bounds what any v*
//! step built on these products can reach. Threads: BENCH_THREADS (default 2).
//!
//! Each shape is timed twice with the transposed weight: once on one weight (it stays in cache:
//! the kernels' ceiling) and once cycling through distinct weights of ~256 MB in all (every call
//! reads its weight from memory, as a v* step does: its 24 layers' weights, ~340 MB, are each
//! read once per pass). The second is the ceiling that matters for a step at that row count.

mod common;

use std::cell::Cell;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde_json::json;

/// Bytes of distinct weights cycled through for the out-of-cache figure.
const COLD_BYTES: usize = 256 << 20;

/// Best mean seconds of one call over 7 rounds of 10 calls (after 3 warm-up calls).
fn best_seconds(f: &dyn Fn() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut best = f64::MAX;
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..10 {
            f()?;
        }
        best = best.min(t.elapsed().as_secs_f64() / 10.0);
    }
    Ok(best)
}

fn main() -> anyhow::Result<()> {
    let peak = common::peak_gflops();
    let pool = common::pool();
    pool.install(|| -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let mut rows = Vec::new();
        for (m, k, n) in [
            (35, 576, 1536),
            (35, 1536, 576),
            (35, 576, 576),
            (35, 576, 192),
            (140, 576, 1536),
            (1024, 576, 1536),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let wt = w.t()?.contiguous()?;
            let xt = x.t()?.contiguous()?;
            let flop = 2.0 * (m * k * n) as f64;
            let a = best_seconds(&|| x.matmul(&wt))?;
            let b = best_seconds(&|| w.matmul(&xt))?;
            let copies = (COLD_BYTES / (4 * k * n)).max(2);
            let cold: Vec<Tensor> = (0..copies)
                .map(|_| Tensor::randn(0f32, 1.0, (k, n), &dev))
                .collect::<candle_core::Result<_>>()?;
            let next = Cell::new(0usize);
            let c = best_seconds(&|| {
                let i = next.get();
                next.set((i + 1) % copies);
                x.matmul(&cold[i])
            })?;
            rows.push(json!({
                "m": m, "k": k, "n": n,
                "x_times_wt_gflops": flop / a / 1e9,
                "w_times_xt_gflops": flop / b / 1e9,
                "x_times_wt_cold_gflops": flop / c / 1e9,
                "cold_weight_gb_per_s": (4 * k * n) as f64 / c / 1e9,
            }));
        }
        let out = json!({ "threads": common::threads(), "peak_gflops_measured": peak, "shapes": rows });
        println!("{}", serde_json::to_string_pretty(&out)?);
        Ok(())
    })
}
