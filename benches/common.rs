//! Shared set-up for the benchmarks: the SmolLM2 model path and a rayon pool of N threads.

#![allow(dead_code)]

use std::path::PathBuf;

/// The SmolLM2 GGUF (fetched by scripts/fetch-model.sh), or None with a note.
pub fn smollm2() -> Option<PathBuf> {
    let p = std::env::var_os("OEDIT_SMOLLM2").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("benchmark skipped: {} is missing (run scripts/fetch-model.sh)", p.display());
        None
    }
}

/// Threads for the benchmark (BENCH_THREADS, default 2).
pub fn threads() -> usize {
    std::env::var("BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2)
}

/// A rayon pool of `threads()` workers (candle's own thread count follows it).
pub fn pool() -> rayon::ThreadPool {
    let n = threads();
    // SAFETY: set before any benchmark thread starts (candle reads RAYON_NUM_THREADS on every
    // matrix product, the others when its pools start).
    unsafe { oedit::threads::export_kernel_settings(n) };
    rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("thread pool")
}

/// The machine's measured peak f32 rate, GFLOP/s, for `threads()` threads running at once: each
/// runs independent chains of fused multiply-adds (AVX-512 where the CPU has it, else AVX2+FMA)
/// for about a tenth of a second. `None` on CPUs with neither. This, not a datasheet figure, is what a
/// "share of peak" is taken against (on this project's 2-vCPU AMD EPYC machine: ~117 per core,
/// double-pumped AVX-512, one 512-bit FMA per cycle).
///
/// Best of 5 rounds; call it before other threads start work (idle rayon workers still spin for
/// a moment after their last job, which takes cycles from these threads).
pub fn peak_gflops() -> Option<f64> {
    (0..5).filter_map(|_| peak_round()).reduce(f64::max)
}

fn peak_round() -> Option<f64> {
    let per_thread: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads()).map(|_| s.spawn(fma_gflops_one_thread)).collect();
        handles.into_iter().filter_map(|h| h.join().ok().flatten()).collect()
    });
    (per_thread.len() == threads()).then(|| per_thread.iter().sum())
}

#[cfg(target_arch = "x86_64")]
fn fma_gflops_one_thread() -> Option<f64> {
    use std::arch::x86_64::*;
    const CHAINS: usize = 12;
    const ROUNDS: usize = 20_000_000;

    #[target_feature(enable = "avx512f")]
    fn avx512() -> f32 {
        let (b, c) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..ROUNDS {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, b, c);
            }
        }
        acc.iter().map(|a| _mm512_reduce_add_ps(*a)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    fn avx2() -> f32 {
        let (b, c) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..ROUNDS {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, b, c);
            }
        }
        let mut out = [0f32; 8];
        let mut sum = 0.0;
        for a in acc {
            // SAFETY: `out` holds 8 f32, what one 256-bit store writes.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), a) };
            sum += out.iter().sum::<f32>();
        }
        sum
    }

    let t = std::time::Instant::now();
    let (sum, lanes) = if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        (unsafe { avx512() }, 16)
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        (unsafe { avx2() }, 8)
    } else {
        return None;
    };
    let seconds = t.elapsed().as_secs_f64();
    std::hint::black_box(sum);
    Some((ROUNDS * CHAINS * lanes * 2) as f64 / seconds / 1e9)
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_gflops_one_thread() -> Option<f64> {
    None
}
