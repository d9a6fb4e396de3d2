//! Runs the work inside one rayon pool, so gemm and candle's kernels share its threads instead of
//! oversubscribing the cores (measured 10-15% faster per optimisation step on 2 cores).
//!
//! candle asks for the thread count on every matrix product (`RAYON_NUM_THREADS`, else it counts
//! physical cores by reading /proc/cpuinfo, ~270 times per forward pass); exporting the count
//! makes that a lookup, and with one thread gemm runs without any parallel dispatch. Measured on
//! SmolLM2 v* steps: 0.230 → 0.196 s with 2 threads, 0.272 → 0.245 s with 1.

use anyhow::Result;

use crate::errors::InputError;

/// Most worker threads per available core. The work is compute-bound, so threads beyond the
/// cores only add synchronisation; 4x leaves room for a core count that under-reports (a CPU
/// quota, hyper-threads) while refusing counts that would swamp the machine.
pub const MAX_THREADS_PER_CORE: usize = 4;

/// Cores available to this process (its CPU affinity and quota), at least 1.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Most worker threads accepted: [`MAX_THREADS_PER_CORE`] per available core.
pub fn max_threads() -> usize {
    MAX_THREADS_PER_CORE * available_cores()
}

/// The worker thread count: `requested` (`--threads`), else `RAYON_NUM_THREADS` when it is a
/// positive number, else the available cores. 0 or more than [`max_threads`] is bad input.
pub fn thread_count(requested: Option<usize>) -> Result<usize, InputError> {
    let max = max_threads();
    let check = |n: usize, what: &str| {
        if n == 0 {
            Err(InputError(format!("{what}0: the thread count must be at least 1")))
        } else if n > max {
            Err(InputError(format!(
                "{what}{n}: at most {max} threads ({MAX_THREADS_PER_CORE} per available core, {} cores)",
                available_cores()
            )))
        } else {
            Ok(n)
        }
    };
    if let Some(n) = requested {
        return check(n, "--threads ");
    }
    match std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.trim().parse::<usize>().ok()) {
        // 0 means "the default" to rayon.
        Some(n) if n > 0 => check(n, "RAYON_NUM_THREADS="),
        _ => Ok(available_cores()),
    }
}

/// How many times candle's element-wise worker threads spin before they sleep, unless
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` says otherwise (candle's own default: 25,000).
///
/// candle 0.11 runs element-wise ops on a pool of its own (`candle-bp-*`, threads − 1 workers)
/// beside the rayon threads that run the matrix products. With its default, a worker keeps
/// spinning through the products that follow each element-wise op and takes a core's time from
/// them: on 2 cores a stacked v\* optimisation (`--batch-size 30`) spent 22% of all CPU samples
/// spinning there. 1,000 spins park it after a few microseconds. Measured on SmolLM2 (2 threads,
/// alternating runs): stacked v\* 84–86 → 106 GFLOP/s (edits/s +22%), single edits +4%, a
/// 300-record evaluation 11.9 → 11.2 s.
pub const BARRIER_POOL_SPIN_LIMIT: u32 = 1_000;

/// Exports the thread settings candle and gemm read: `RAYON_NUM_THREADS` = `n`, and, unless
/// already set, `CANDLE_NUM_THREADS` = `n` and `CANDLE_BARRIER_POOL_SPIN_LIMIT` =
/// [`BARRIER_POOL_SPIN_LIMIT`].
///
/// # Safety
/// Call it before any other thread of the process reads or writes the environment (candle reads
/// these once, when its pools start).
pub unsafe fn export_kernel_settings(n: usize) {
    // SAFETY: the caller guarantees no other thread touches the environment yet.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        }
        if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
            std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", BARRIER_POOL_SPIN_LIMIT.to_string());
        }
    }
}

/// Runs `f` inside a rayon pool of [`thread_count`] workers, after
/// [`export_kernel_settings`]. A bad count fails before any thread starts.
pub fn in_pool<T: Send>(threads: Option<usize>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let n = thread_count(threads)?;
    // SAFETY: called before any other thread of this process reads the environment.
    unsafe { export_kernel_settings(n) };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build()?;
    pool.install(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_counts_are_bounded() {
        assert_eq!(thread_count(Some(1)).unwrap(), 1);
        assert_eq!(thread_count(Some(max_threads())).unwrap(), max_threads());
        let e = thread_count(Some(0)).unwrap_err();
        assert!(e.0.contains("--threads 0") && e.0.contains("at least 1"), "{e}");
        let e = thread_count(Some(100_000)).unwrap_err();
        assert!(
            e.0.contains("--threads 100000") && e.0.contains(&format!("at most {}", max_threads())),
            "{e}"
        );
    }
}
