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
    // SAFETY: set before any benchmark thread starts. candle reads RAYON_NUM_THREADS on every
    // matrix product (and /proc/cpuinfo when it is unset).
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        }
    }
    rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("thread pool")
}
