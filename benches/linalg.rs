//! Benchmark binary (JSON on stdout): seconds taken by the dense linear algebra of `oedit::linalg`
//! on an `f × f` symmetric positive-definite matrix: the symmetric eigendecomposition, the
//! Cholesky factorisation, a vector solve (`A x = b`, both triangular halves), the whitening solve
//! (`L y = b`) and a 16-column matrix solve, plus an `f × f` matrix product at the smaller sizes.
//!
//! Uses only the public API, so the same file can time an older implementation of the module.
//! Threads: BENCH_THREADS (default 2) workers in a rayon pool. Sizes: BENCH_LINALG_SIZES
//! (comma-separated, default `1536,11008`); operations: BENCH_LINALG_OPS (comma-separated subset
//! of `eigen,cholesky,solve,solve_lower,solve_mat16,matmul`, default all). Label for the output:
//! BENCH_LINALG_LABEL (default `current`).

mod common;

use std::time::Instant;

use oedit::linalg::{sym_eigen, Cholesky, Mat};
use serde_json::json;

/// SplitMix64 stream mapped to [-1, 1).
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

/// A dense symmetric matrix with off-diagonal entries uniform in [-1, 1) and diagonal entries in
/// [n, n + 1): positive definite (diagonally dominant), with a Wigner-like spread of eigenvalues
/// and delocalised eigenvectors (no shortcut for the eigensolver), built in O(n²).
fn spd(n: usize, seed: u64) -> Mat {
    let mut rng = Rng(seed);
    let mut a = Mat::zeros(n, n);
    for i in 0..n {
        for j in 0..i {
            let v = rng.uniform();
            a.data[i * n + j] = v;
            a.data[j * n + i] = v;
        }
        a.data[i * n + i] = n as f64 + 0.5 * (rng.uniform() + 1.0);
    }
    a
}

/// Runs `f` `reps` times and returns the seconds of each call.
fn time(reps: usize, mut f: impl FnMut()) -> Vec<f64> {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect()
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect()
}

fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> =
        env_list("BENCH_LINALG_SIZES", "1536,11008").iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
    let ops = env_list("BENCH_LINALG_OPS", "eigen,cholesky,solve,solve_lower,solve_mat16,matmul");
    let label = std::env::var("BENCH_LINALG_LABEL").unwrap_or_else(|_| "current".to_string());
    let pool = common::pool();
    let rows = pool.install(|| -> anyhow::Result<Vec<serde_json::Value>> {
        let mut rows = Vec::new();
        let want = |op: &str| ops.iter().any(|o| o == op);
        for &n in &sizes {
            let a = spd(n, n as u64);
            // Heavy O(n³) operations once at large n, a few times otherwise.
            let heavy = if n > 4096 { 1 } else { 3 };
            let light = if n > 4096 { 5 } else { 20 };
            let mut record = |op: &str, secs: Vec<f64>| {
                let best = secs.iter().copied().fold(f64::INFINITY, f64::min);
                eprintln!("{label} n={n} {op}: best {best:.4} s over {}", secs.len());
                rows.push(json!({ "op": op, "n": n, "best_seconds": best, "seconds": secs }));
            };
            if want("eigen") {
                let mut check = 0.0;
                let secs = time(heavy, || check = sym_eigen(&a).values[0]);
                assert!(check > 0.0, "SPD matrix with eigenvalue {check}");
                record("eigen", secs);
            }
            let chol = Cholesky::new(&a).map_err(|e| anyhow::anyhow!("{e}"))?;
            if want("cholesky") {
                let secs = time(heavy, || {
                    Cholesky::new(&a).unwrap();
                });
                record("cholesky", secs);
            }
            let mut rng = Rng(7);
            let b: Vec<f64> = (0..n).map(|_| rng.uniform()).collect();
            if want("solve") {
                let secs = time(light, || {
                    std::hint::black_box(chol.solve(&b));
                });
                record("solve", secs);
            }
            if want("solve_lower") {
                let secs = time(light, || {
                    std::hint::black_box(chol.solve_lower(&b));
                });
                record("solve_lower", secs);
            }
            if want("solve_mat16") {
                let bm = Mat::from_vec(n, 16, (0..n * 16).map(|_| rng.uniform()).collect());
                let secs = time(light, || {
                    std::hint::black_box(chol.solve_mat(&bm));
                });
                record("solve_mat16", secs);
            }
            if want("matmul") && n <= 4096 {
                let secs = time(heavy, || {
                    std::hint::black_box(a.matmul(&a));
                });
                record("matmul", secs);
            }
        }
        Ok(rows)
    })?;
    let out = json!({ "implementation": label, "threads": common::threads(), "results": rows });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
