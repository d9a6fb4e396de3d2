//! Dense `f64` linear algebra in pure Rust: row-major matrices, blocked matrix products, a blocked
//! Cholesky factorisation with triangular solves, a symmetric eigendecomposition (Householder
//! tridiagonalisation + implicit QL), an incrementally grown orthonormal basis, and the dominant
//! singular directions of a small set of vectors.
//!
//! The O(n³) kernels are cache-blocked and parallelised with rayon. Hot inner loops are compiled
//! twice, once for the baseline target and once with AVX2 enabled, and the AVX2 version is picked at
//! run time when the CPU supports it. Both versions perform the same floating-point operations in
//! the same order (no fused multiply-add contraction), so results do not depend on the CPU, nor on
//! the number of threads.

use std::fmt;

use rayon::prelude::*;

// ---------------------------------------------------------------------------------------------
// Runtime SIMD dispatch
// ---------------------------------------------------------------------------------------------

/// Whether the running CPU supports AVX2 (cached by the standard library after the first query).
#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2() -> bool {
    std::is_x86_feature_detected!("avx2")
}

/// Defines `$name` as a function that runs `$body` compiled with AVX2 enabled when the CPU has it,
/// and the baseline compilation of `$body` otherwise. `$body` must be `#[inline(always)]` so that it
/// is compiled inside each wrapper with that wrapper's target features.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:expr;) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn with_avx2($($arg: $ty),*) $(-> $ret)? {
                    ($body)($($arg),*)
                }
                if has_avx2() {
                    // SAFETY: `with_avx2` only requires AVX2, which the running CPU was just
                    // checked to support.
                    return unsafe { with_avx2($($arg),*) };
                }
            }
            ($body)($($arg),*)
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Kernels (bodies)
// ---------------------------------------------------------------------------------------------

/// Number of independent accumulators in reductions (lets the compiler vectorise them).
const LANES: usize = 8;

#[inline(always)]
fn dot_body(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f64; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..LANES {
            acc[k] += x[k] * y[k];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    let s01 = (acc[0] + acc[4]) + (acc[1] + acc[5]);
    let s23 = (acc[2] + acc[6]) + (acc[3] + acc[7]);
    (s01 + s23) + tail
}

/// `y += alpha * x` over the common length.
#[inline(always)]
fn axpy_body(y: &mut [f64], alpha: f64, x: &[f64]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// `c[j] ±= Σ_p coef[p] · b[p·ldb + off + j]` for `j < c.len()` (subtracts when `NEG`).
///
/// `b` holds `coef.len()` rows of stride `ldb`; the rows are combined four at a time so that each
/// element of `c` is loaded and stored once per four rows.
#[inline(always)]
fn panel_body<const NEG: bool>(c: &mut [f64], coef: &[f64], b: &[f64], ldb: usize, off: usize) {
    let len = c.len();
    if len == 0 {
        return;
    }
    let row = |p: usize| &b[p * ldb + off..p * ldb + off + len];
    let np = coef.len();
    let mut p = 0;
    while p + 4 <= np {
        let (a0, a1, a2, a3) = (coef[p], coef[p + 1], coef[p + 2], coef[p + 3]);
        let (b0, b1, b2, b3) = (row(p), row(p + 1), row(p + 2), row(p + 3));
        for j in 0..len {
            let s = (a0 * b0[j] + a1 * b1[j]) + (a2 * b2[j] + a3 * b3[j]);
            if NEG {
                c[j] -= s;
            } else {
                c[j] += s;
            }
        }
        p += 4;
    }
    while p < np {
        let a0 = coef[p];
        let b0 = row(p);
        for j in 0..len {
            if NEG {
                c[j] -= a0 * b0[j];
            } else {
                c[j] += a0 * b0[j];
            }
        }
        p += 1;
    }
}

/// Width of the column panels of a packed `B` tile in [`Mat::matmul`].
const PACK_W: usize = 8;

/// Micro-kernel of [`Mat::matmul`]: `c_r[j] += Σ_p a[r·lda + p] · B[p][j]` for the four rows
/// `r < 4` of `c` (stride `ldc`) and `j < len`, `p < np`, where `(len, np) = dims` and `bt` holds
/// `B` packed as consecutive panels of [`PACK_W`] columns (`bt[panel·np·PACK_W + p·PACK_W + q]`,
/// zero-padded). A 4 × [`PACK_W`] tile of `c` is accumulated in registers over all `p`.
#[inline(always)]
fn packed4_body(c: &mut [f64], ldc: usize, a: &[f64], lda: usize, bt: &[f64], dims: (usize, usize)) {
    let (len, np) = dims;
    if np == 0 {
        return;
    }
    let a = [&a[..np], &a[lda..lda + np], &a[2 * lda..2 * lda + np], &a[3 * lda..3 * lda + np]];
    for (panel, bp) in bt.chunks_exact(np * PACK_W).enumerate() {
        let j0 = panel * PACK_W;
        if j0 >= len {
            break;
        }
        let mut acc = [[0.0f64; PACK_W]; 4];
        for (p, bq) in bp.chunks_exact(PACK_W).enumerate() {
            for r in 0..4 {
                let ar = a[r][p];
                for q in 0..PACK_W {
                    acc[r][q] += ar * bq[q];
                }
            }
        }
        let w = (len - j0).min(PACK_W);
        for (r, accr) in acc.iter().enumerate() {
            let cr = &mut c[r * ldc + j0..r * ldc + j0 + w];
            for q in 0..w {
                cr[q] += accr[q];
            }
        }
    }
}

/// One row of the fused tridiagonalisation pass: applies the pending symmetric rank-2 update
/// `row -= vi·wp + wi·vp` and returns `row · v` (with the updated row).
#[inline(always)]
fn fused_body(row: &mut [f64], vp: &[f64], wp: &[f64], vi: f64, wi: f64, v: &[f64]) -> f64 {
    let n = row.len();
    let (vp, wp, v) = (&vp[..n], &wp[..n], &v[..n]);
    let mut acc = [0.0f64; LANES];
    let full = n - n % LANES;
    let mut j = 0;
    while j < full {
        for k in 0..LANES {
            let r = row[j + k] - (vi * wp[j + k] + wi * vp[j + k]);
            row[j + k] = r;
            acc[k] += r * v[j + k];
        }
        j += LANES;
    }
    let mut tail = 0.0;
    for j in full..n {
        let r = row[j] - (vi * wp[j] + wi * vp[j]);
        row[j] = r;
        tail += r * v[j];
    }
    let s01 = (acc[0] + acc[4]) + (acc[1] + acc[5]);
    let s23 = (acc[2] + acc[6]) + (acc[3] + acc[7]);
    (s01 + s23) + tail
}

/// Width (in rows of the eigenvector matrix) of the blocks that plane rotations are applied to.
const ROT_W: usize = 32;

/// Applies recorded QL sweeps to a packed block `buf` (`n × ROT_W`, row `i` holds component `i` of
/// `ROT_W` rows of the eigenvector matrix). Each sweep `(top, len, start)` rotates the pairs
/// `(i, i+1)` for `i = top, top-1, …, top-len+1` with `cs[start..start+len]`; the value flowing
/// from one rotation to the next stays in registers.
#[inline(always)]
fn rot_body(buf: &mut [f64], cs: &[(f64, f64)], sweeps: &[(usize, usize, usize)]) {
    for &(top, len, start) in sweeps {
        let mut carry = [0.0f64; ROT_W];
        carry.copy_from_slice(&buf[(top + 1) * ROT_W..(top + 2) * ROT_W]);
        for t in 0..len {
            let i = top - t;
            let (c, s) = cs[start + t];
            let (lo, hi) = buf.split_at_mut((i + 1) * ROT_W);
            let zi = &lo[i * ROT_W..];
            let zn = &mut hi[..ROT_W];
            for r in 0..ROT_W {
                let old = zi[r];
                let f = carry[r];
                zn[r] = s * old + c * f;
                carry[r] = c * old - s * f;
            }
        }
        let last = top + 1 - len;
        buf[last * ROT_W..(last + 1) * ROT_W].copy_from_slice(&carry);
    }
}

/// Width (in right-hand sides) of the blocks handled by the triangular matrix solves.
const SOLVE_W: usize = 32;

/// Solves `L Y = B` in place for a packed block (`n × SOLVE_W`, row-major) with `L` lower
/// triangular (`n × n`, row-major).
#[inline(always)]
fn forward_block_body(buf: &mut [f64], l: &[f64], n: usize) {
    for i in 0..n {
        let (prev, cur) = buf.split_at_mut(i * SOLVE_W);
        let mut acc = [0.0f64; SOLVE_W];
        acc.copy_from_slice(&cur[..SOLVE_W]);
        let li = &l[i * n..i * n + i];
        for (k, &a) in li.iter().enumerate() {
            let xk = &prev[k * SOLVE_W..(k + 1) * SOLVE_W];
            for r in 0..SOLVE_W {
                acc[r] -= a * xk[r];
            }
        }
        let d = l[i * n + i];
        for r in 0..SOLVE_W {
            cur[r] = acc[r] / d;
        }
    }
}

/// Solves `Lᵀ X = Y` in place for a packed block (`n × SOLVE_W`) with `L` as in
/// [`forward_block_body`]; reads `L` by columns, which stay cache-resident across neighbouring `i`.
#[inline(always)]
fn backward_block_body(buf: &mut [f64], l: &[f64], n: usize) {
    for i in (0..n).rev() {
        let (cur, next) = buf.split_at_mut((i + 1) * SOLVE_W);
        let cur = &mut cur[i * SOLVE_W..];
        let mut acc = [0.0f64; SOLVE_W];
        acc.copy_from_slice(cur);
        for (t, xk) in next.chunks_exact(SOLVE_W).enumerate() {
            let a = l[(i + 1 + t) * n + i];
            for r in 0..SOLVE_W {
                acc[r] -= a * xk[r];
            }
        }
        let d = l[i * n + i];
        for r in 0..SOLVE_W {
            cur[r] = acc[r] / d;
        }
    }
}

multiversion! {
    /// Dispatching [`dot_body`].
    fn dot_kernel(a: &[f64], b: &[f64]) -> f64 = dot_body;
}
multiversion! {
    /// Dispatching [`axpy_body`].
    fn axpy(y: &mut [f64], alpha: f64, x: &[f64]) = axpy_body;
}
multiversion! {
    /// Dispatching [`panel_body`] (adding).
    fn panel_add(c: &mut [f64], coef: &[f64], b: &[f64], ldb: usize, off: usize) = panel_body::<false>;
}
multiversion! {
    /// Dispatching [`panel_body`] (subtracting).
    fn panel_sub(c: &mut [f64], coef: &[f64], b: &[f64], ldb: usize, off: usize) = panel_body::<true>;
}
multiversion! {
    /// Dispatching [`packed4_body`].
    fn packed_add4(c: &mut [f64], ldc: usize, a: &[f64], lda: usize, bt: &[f64], dims: (usize, usize)) = packed4_body;
}
multiversion! {
    /// Dispatching [`fused_body`].
    fn fused_row(row: &mut [f64], vp: &[f64], wp: &[f64], vi: f64, wi: f64, v: &[f64]) -> f64 = fused_body;
}
multiversion! {
    /// Dispatching [`rot_body`].
    fn apply_sweeps(buf: &mut [f64], cs: &[(f64, f64)], sweeps: &[(usize, usize, usize)]) = rot_body;
}
multiversion! {
    /// Dispatching [`forward_block_body`].
    fn forward_block(buf: &mut [f64], l: &[f64], n: usize) = forward_block_body;
}
multiversion! {
    /// Dispatching [`backward_block_body`].
    fn backward_block(buf: &mut [f64], l: &[f64], n: usize) = backward_block_body;
}

// ---------------------------------------------------------------------------------------------
// Vectors
// ---------------------------------------------------------------------------------------------

/// Inner product of two vectors of equal length.
///
/// # Panics
/// If the lengths differ.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot: length mismatch");
    dot_kernel(a, b)
}

/// Euclidean norm of a vector.
pub fn norm(a: &[f64]) -> f64 {
    dot_kernel(a, a).sqrt()
}

// ---------------------------------------------------------------------------------------------
// Mat
// ---------------------------------------------------------------------------------------------

/// Row-major dense f64 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Entries, row after row (`data[r * cols + c]`); `data.len() == rows * cols`.
    pub data: Vec<f64>,
}

/// Below this many multiply-adds, parallel loops are not worth rayon's overhead.
const PAR_THRESHOLD: usize = 1 << 15;

impl Mat {
    /// A `rows × cols` matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Mat { rows, cols, data: vec![0.0; rows * cols] }
    }

    /// The `n × n` identity matrix.
    pub fn identity(n: usize) -> Self {
        let mut m = Mat::zeros(n, n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    /// Wraps row-major `data` as a `rows × cols` matrix.
    ///
    /// # Panics
    /// If `data.len() != rows * cols`.
    pub fn from_vec(rows: usize, cols: usize, data: Vec<f64>) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "Mat::from_vec: {} values for a {rows}x{cols} matrix",
            data.len()
        );
        Mat { rows, cols, data }
    }

    /// Entry `(r, c)`.
    ///
    /// # Panics
    /// If the index is out of bounds.
    #[inline]
    pub fn get(&self, r: usize, c: usize) -> f64 {
        assert!(r < self.rows && c < self.cols, "Mat::get: index out of bounds");
        self.data[r * self.cols + c]
    }

    /// Sets entry `(r, c)` to `v`.
    ///
    /// # Panics
    /// If the index is out of bounds.
    #[inline]
    pub fn set(&mut self, r: usize, c: usize, v: f64) {
        assert!(r < self.rows && c < self.cols, "Mat::set: index out of bounds");
        self.data[r * self.cols + c] = v;
    }

    /// Row `r` as a slice.
    #[inline]
    pub fn row(&self, r: usize) -> &[f64] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Row `r` as a mutable slice.
    #[inline]
    pub fn row_mut(&mut self, r: usize) -> &mut [f64] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Column `c` copied into a vector.
    pub fn col(&self, c: usize) -> Vec<f64> {
        assert!(c < self.cols, "Mat::col: index out of bounds");
        (0..self.rows).map(|r| self.data[r * self.cols + c]).collect()
    }

    /// `self · x`.
    ///
    /// # Panics
    /// If `x.len() != self.cols`.
    pub fn matvec(&self, x: &[f64]) -> Vec<f64> {
        assert_eq!(x.len(), self.cols, "Mat::matvec: dimension mismatch");
        if self.cols == 0 {
            return vec![0.0; self.rows];
        }
        if self.rows * self.cols >= PAR_THRESHOLD {
            self.data.par_chunks(self.cols).with_min_len(16).map(|r| dot_kernel(r, x)).collect()
        } else {
            self.data.chunks(self.cols).map(|r| dot_kernel(r, x)).collect()
        }
    }

    /// `selfᵀ · x`.
    ///
    /// # Panics
    /// If `x.len() != self.rows`.
    pub fn matvec_t(&self, x: &[f64]) -> Vec<f64> {
        assert_eq!(x.len(), self.rows, "Mat::matvec_t: dimension mismatch");
        let mut y = vec![0.0; self.cols];
        if self.cols == 0 {
            return y;
        }
        for (r, &xr) in self.data.chunks(self.cols).zip(x) {
            axpy(&mut y, xr, r);
        }
        y
    }

    /// The transpose.
    pub fn transpose(&self) -> Mat {
        const B: usize = 32;
        let (m, n) = (self.rows, self.cols);
        let mut t = Mat::zeros(n, m);
        if m == 0 || n == 0 {
            return t;
        }
        let src = &self.data;
        let fill = |(bi, chunk): (usize, &mut [f64])| {
            // `chunk` holds rows j0..j0+B of the transpose (columns of `self`).
            let j0 = bi * B;
            let jn = chunk.len() / m;
            for i0 in (0..m).step_by(B) {
                let i1 = (i0 + B).min(m);
                for jj in 0..jn {
                    let j = j0 + jj;
                    let out = &mut chunk[jj * m..(jj + 1) * m];
                    for i in i0..i1 {
                        out[i] = src[i * n + j];
                    }
                }
            }
        };
        if m * n >= PAR_THRESHOLD {
            t.data.par_chunks_mut(B * m).enumerate().for_each(fill);
        } else {
            t.data.chunks_mut(B * m).enumerate().for_each(fill);
        }
        t
    }

    /// The product `self · other`.
    ///
    /// # Panics
    /// If `self.cols != other.rows`.
    pub fn matmul(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.rows, "Mat::matmul: dimension mismatch");
        let (m, k, n) = (self.rows, self.cols, other.cols);
        let mut c = Mat::zeros(m, n);
        if m == 0 || n == 0 || k == 0 {
            return c;
        }
        // Row blocks of C in parallel; inside, tiles of B small enough for the L2 cache, packed
        // into contiguous column panels (avoids cache-set conflicts between the rows of B).
        const KB: usize = 256;
        const NB: usize = 256;
        // Up to 64 rows per task, fewer when that leaves fewer than two tasks per thread.
        let mb = m.div_ceil(2 * rayon::current_num_threads()).next_multiple_of(4).clamp(4, 64);
        let (a, b) = (&self.data, &other.data);
        let block = |(bi, cc): (usize, &mut [f64])| {
            let i0 = bi * mb;
            let rows = cc.len() / n;
            let mut bt = vec![0.0; KB * NB];
            for j0 in (0..n).step_by(NB) {
                let j1 = (j0 + NB).min(n);
                for k0 in (0..k).step_by(KB) {
                    let k1 = (k0 + KB).min(k);
                    let kw = k1 - k0;
                    let panels = (j1 - j0).div_ceil(PACK_W);
                    for panel in 0..panels {
                        let jp = j0 + panel * PACK_W;
                        let w = (j1 - jp).min(PACK_W);
                        let dst = &mut bt[panel * kw * PACK_W..(panel + 1) * kw * PACK_W];
                        for (p, dq) in dst.chunks_exact_mut(PACK_W).enumerate() {
                            let src = &b[(k0 + p) * n + jp..(k0 + p) * n + jp + w];
                            dq[..w].copy_from_slice(src);
                            dq[w..].iter_mut().for_each(|x| *x = 0.0);
                        }
                    }
                    let packed = &bt[..panels * kw * PACK_W];
                    let mut r = 0;
                    while r + 4 <= rows {
                        packed_add4(
                            &mut cc[r * n + j0..],
                            n,
                            &a[(i0 + r) * k + k0..],
                            k,
                            packed,
                            (j1 - j0, kw),
                        );
                        r += 4;
                    }
                    for r in r..rows {
                        let ai = &a[(i0 + r) * k + k0..(i0 + r) * k + k1];
                        panel_add(&mut cc[r * n + j0..r * n + j1], ai, &b[k0 * n..], n, j0);
                    }
                }
            }
        };
        if m * n * k >= PAR_THRESHOLD {
            c.data.par_chunks_mut(mb * n).enumerate().for_each(block);
        } else {
            c.data.chunks_mut(mb * n).enumerate().for_each(block);
        }
        c
    }

    /// Adds `lambda` to every diagonal entry (`min(rows, cols)` of them).
    pub fn add_diagonal(&mut self, lambda: f64) {
        for i in 0..self.rows.min(self.cols) {
            self.data[i * self.cols + i] += lambda;
        }
    }

    /// Frobenius norm `sqrt(Σ a_ij²)`.
    pub fn frobenius_norm(&self) -> f64 {
        norm(&self.data)
    }

    /// Largest absolute entry (0 for an empty matrix).
    pub fn max_abs(&self) -> f64 {
        self.data.iter().fold(0.0f64, |m, x| m.max(x.abs()))
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Failures of the factorisations.
#[derive(Debug, Clone, PartialEq)]
pub enum LinalgError {
    /// The matrix is not (numerically) symmetric positive definite: the Schur complement pivot at
    /// index `pivot` was `value` (≤ 0, or not finite when the input holds non-finite entries).
    NotPositiveDefinite {
        /// Row/column where the factorisation broke down.
        pivot: usize,
        /// The offending pivot value.
        value: f64,
    },
    /// A square matrix was required.
    NotSquare {
        /// Rows of the given matrix.
        rows: usize,
        /// Columns of the given matrix.
        cols: usize,
    },
}

impl fmt::Display for LinalgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinalgError::NotPositiveDefinite { pivot, value } => {
                write!(f, "matrix is not positive definite (pivot {pivot} has value {value:e})")
            }
            LinalgError::NotSquare { rows, cols } => {
                write!(f, "expected a square matrix, got {rows}x{cols}")
            }
        }
    }
}

impl std::error::Error for LinalgError {}

// ---------------------------------------------------------------------------------------------
// Cholesky
// ---------------------------------------------------------------------------------------------

/// Cholesky factorisation `A = L Lᵀ` of a symmetric positive-definite matrix.
#[derive(Clone, Debug)]
pub struct Cholesky {
    /// The lower-triangular factor (upper triangle zero).
    l: Mat,
}

/// Block size of the Cholesky factorisation.
const CHOL_NB: usize = 64;

impl Cholesky {
    /// Factorises `a`, reading only its lower triangle (the matrix is assumed symmetric).
    ///
    /// Blocked right-looking algorithm: factor a diagonal block, solve the panel below it, and
    /// subtract the panel's outer product from the trailing lower triangle (in parallel).
    ///
    /// # Errors
    /// [`LinalgError::NotSquare`] for a non-square input and
    /// [`LinalgError::NotPositiveDefinite`] when a pivot is not positive (or not finite).
    pub fn new(a: &Mat) -> Result<Self, LinalgError> {
        if a.rows != a.cols {
            return Err(LinalgError::NotSquare { rows: a.rows, cols: a.cols });
        }
        let n = a.rows;
        let mut l = a.clone();
        if n == 0 {
            return Ok(Cholesky { l });
        }
        let data = &mut l.data;
        for k0 in (0..n).step_by(CHOL_NB) {
            let k1 = (k0 + CHOL_NB).min(n);
            let nb = k1 - k0;
            // 1. Diagonal block (unblocked, row by row).
            for j in k0..k1 {
                for i in j..k1 {
                    let (ri, rj) = (i * n, j * n);
                    let s = data[ri + j] - dot_kernel(&data[ri + k0..ri + j], &data[rj + k0..rj + j]);
                    if i == j {
                        if !(s > 0.0 && s.is_finite()) {
                            return Err(LinalgError::NotPositiveDefinite { pivot: j, value: s });
                        }
                        data[ri + j] = s.sqrt();
                    } else {
                        data[ri + j] = s / data[rj + j];
                    }
                }
            }
            if k1 == n {
                break;
            }
            let (head, tail) = data.split_at_mut(k1 * n);
            let diag = &head[k0 * n..];
            // 2. Panel: L21 = A21 L11⁻ᵀ, row by row.
            tail.par_chunks_mut(n).with_min_len(8).for_each(|row| {
                for j in k0..k1 {
                    let rj = (j - k0) * n;
                    let s = row[j] - dot_kernel(&row[k0..j], &diag[rj + k0..rj + j]);
                    row[j] = s / diag[rj + j];
                }
            });
            // 3. Trailing update A22 -= L21 L21ᵀ, four rows at a time with the matmul micro-kernel
            //    on -L21ᵀ packed in column panels. Only columns up to the last row of each group
            //    are updated; the few entries this writes above the diagonal are never read.
            let m = n - k1;
            let panels = m.div_ceil(PACK_W);
            let mut bt = vec![0.0; panels * nb * PACK_W];
            for (t, row) in tail.chunks(n).enumerate() {
                let base = (t / PACK_W) * nb * PACK_W + t % PACK_W;
                for p in 0..nb {
                    bt[base + p * PACK_W] = -row[k0 + p];
                }
            }
            tail.par_chunks_mut(4 * n).enumerate().for_each(|(g, rows4)| {
                let nr = rows4.len() / n;
                let len = (4 * g + nr).min(m);
                let mut coef = [0.0; 4 * CHOL_NB];
                for r in 0..nr {
                    coef[r * nb..(r + 1) * nb].copy_from_slice(&rows4[r * n + k0..r * n + k1]);
                }
                if nr == 4 {
                    packed_add4(&mut rows4[k1..], n, &coef, nb, &bt, (len, nb));
                } else {
                    let mut c = vec![0.0; 4 * len];
                    for r in 0..nr {
                        c[r * len..(r + 1) * len].copy_from_slice(&rows4[r * n + k1..r * n + k1 + len]);
                    }
                    packed_add4(&mut c, len, &coef, nb, &bt, (len, nb));
                    for r in 0..nr {
                        rows4[r * n + k1..r * n + k1 + len].copy_from_slice(&c[r * len..(r + 1) * len]);
                    }
                }
            });
        }
        // Clear the (untouched) upper triangle.
        data.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            row[i + 1..].iter_mut().for_each(|x| *x = 0.0);
        });
        Ok(Cholesky { l })
    }

    /// The lower-triangular factor `L`.
    pub fn factor(&self) -> &Mat {
        &self.l
    }

    /// Dimension `n` of the factorised `n × n` matrix.
    pub fn dim(&self) -> usize {
        self.l.rows
    }

    /// `log det A = 2 Σ log L_ii`.
    pub fn log_det(&self) -> f64 {
        let n = self.dim();
        2.0 * (0..n).map(|i| self.l.data[i * n + i].ln()).sum::<f64>()
    }

    /// Solves `A x = b`.
    ///
    /// # Panics
    /// If `b.len()` differs from the dimension.
    pub fn solve(&self, b: &[f64]) -> Vec<f64> {
        self.solve_upper_t(&self.solve_lower(b))
    }

    /// Solves `L y = b` (whitening: `yᵀy = bᵀA⁻¹b`).
    ///
    /// # Panics
    /// If `b.len()` differs from the dimension.
    pub fn solve_lower(&self, b: &[f64]) -> Vec<f64> {
        let n = self.dim();
        assert_eq!(b.len(), n, "Cholesky::solve_lower: dimension mismatch");
        let l = &self.l.data;
        let mut x = b.to_vec();
        for i in 0..n {
            let s = x[i] - dot_kernel(&l[i * n..i * n + i], &x[..i]);
            x[i] = s / l[i * n + i];
        }
        x
    }

    /// Solves `Lᵀ x = y`.
    ///
    /// # Panics
    /// If `y.len()` differs from the dimension.
    pub fn solve_upper_t(&self, y: &[f64]) -> Vec<f64> {
        let n = self.dim();
        assert_eq!(y.len(), n, "Cholesky::solve_upper_t: dimension mismatch");
        let l = &self.l.data;
        let mut x = y.to_vec();
        // Column-oriented: row i of L scatters into the earlier unknowns.
        for i in (0..n).rev() {
            x[i] /= l[i * n + i];
            let xi = x[i];
            let (head, _) = x.split_at_mut(i);
            axpy(head, -xi, &l[i * n..i * n + i]);
        }
        x
    }

    /// Solves `A X = B` for every column of `B`.
    ///
    /// # Panics
    /// If `b.rows` differs from the dimension.
    pub fn solve_mat(&self, b: &Mat) -> Mat {
        let n = self.dim();
        assert_eq!(b.rows, n, "Cholesky::solve_mat: dimension mismatch");
        let m = b.cols;
        if m == 0 || n == 0 {
            return b.clone();
        }
        if m == 1 {
            return Mat::from_vec(n, 1, self.solve(&b.data));
        }
        let l = &self.l.data;
        let nblocks = m.div_ceil(SOLVE_W);
        let blocks: Vec<Vec<f64>> = (0..nblocks)
            .into_par_iter()
            .map(|bi| {
                let j0 = bi * SOLVE_W;
                let w = (m - j0).min(SOLVE_W);
                let mut buf = vec![0.0; n * SOLVE_W];
                for i in 0..n {
                    buf[i * SOLVE_W..i * SOLVE_W + w].copy_from_slice(&b.data[i * m + j0..i * m + j0 + w]);
                }
                forward_block(&mut buf, l, n);
                backward_block(&mut buf, l, n);
                buf
            })
            .collect();
        let mut x = Mat::zeros(n, m);
        for (bi, buf) in blocks.iter().enumerate() {
            let j0 = bi * SOLVE_W;
            let w = (m - j0).min(SOLVE_W);
            for i in 0..n {
                x.data[i * m + j0..i * m + j0 + w].copy_from_slice(&buf[i * SOLVE_W..i * SOLVE_W + w]);
            }
        }
        x
    }
}

// ---------------------------------------------------------------------------------------------
// Symmetric eigendecomposition
// ---------------------------------------------------------------------------------------------

/// Symmetric eigendecomposition `A = V diag(values) Vᵀ`: eigenvalues in ascending order and the
/// orthonormal eigenvectors as the COLUMNS of `vectors` (column `j` belongs to `values[j]`).
#[derive(Clone, Debug)]
pub struct SymEigen {
    /// Eigenvalues, ascending.
    pub values: Vec<f64>,
    /// `n × n` matrix whose columns are the corresponding unit eigenvectors.
    pub vectors: Mat,
}

/// Number of Householder reflectors combined per blocked (WY) update when forming `Q`.
const WY_NB: usize = 32;
/// Rotations buffered before they are applied to the eigenvector matrix.
const ROT_BUFFER: usize = 1 << 21;
/// Iteration cap per eigenvalue in the QL algorithm (convergence normally takes 1-3).
const QL_MAX_ITER: usize = 64;

/// Eigendecomposition of the symmetric matrix `a` (the input is symmetrised as `(A + Aᵀ)/2`).
///
/// Householder tridiagonalisation `A = Q T Qᵀ` (one fused, parallel pass over the trailing matrix
/// per step), blocked accumulation of `Q`, and implicit QL with Wilkinson shifts on `T`; the QL
/// plane rotations are recorded and applied to `Q` in cache-sized blocks of rows, in parallel.
///
/// A matrix with a non-finite entry yields NaN eigenvalues and eigenvectors.
///
/// # Panics
/// If `a` is not square.
pub fn sym_eigen(a: &Mat) -> SymEigen {
    assert_eq!(a.rows, a.cols, "sym_eigen: matrix must be square");
    let n = a.rows;
    if n == 0 {
        return SymEigen { values: Vec::new(), vectors: Mat::zeros(0, 0) };
    }
    if !a.data.iter().all(|x| x.is_finite()) {
        return SymEigen { values: vec![f64::NAN; n], vectors: Mat::from_vec(n, n, vec![f64::NAN; n * n]) };
    }
    // Symmetrise, and scale by a power of two (exact) so that the largest entry is near 1: keeps
    // the Householder norms away from overflow and underflow.
    let amax = a.max_abs();
    let scale = if amax > 0.0 { 2f64.powi((amax.log2().round() as i32).clamp(-1000, 1000)) } else { 1.0 };
    let inv = 1.0 / scale;
    let mut w = Mat::zeros(n, n);
    for i in 0..n {
        for j in 0..=i {
            let s = (0.5 * (a.data[i * n + j] + a.data[j * n + i])) * inv;
            w.data[i * n + j] = s;
            w.data[j * n + i] = s;
        }
    }
    let (mut d, mut e, betas) = tridiagonalize(&mut w);
    form_q(&mut w, &betas);
    ql_implicit(&mut d, &mut e, &mut w);
    d.iter_mut().for_each(|x| *x *= scale);

    // Sort ascending and permute the columns accordingly.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| d[x].total_cmp(&d[y]));
    let values: Vec<f64> = order.iter().map(|&k| d[k]).collect();
    w.data.par_chunks_mut(n).for_each(|row| {
        let old = row.to_vec();
        for (dst, &src) in row.iter_mut().zip(&order) {
            *dst = old[src];
        }
    });
    SymEigen { values, vectors: w }
}

/// Reduces the symmetric matrix in `a` to tridiagonal form `T = Qᵀ A Q`, `Q = H_0 H_1 ⋯ H_{n-3}`
/// with `H_k = I - β_k v_k v_kᵀ` acting on indices `k+1..n`.
///
/// Returns `(diagonal, off-diagonal, betas)`; `off[k]` couples `k` and `k+1` (`off[n-1] = 0`).
/// On return, row `k` of `a` holds `v_k` in columns `k+1..n`; the rest of `a` is scratch.
///
/// Each step applies the previous step's pending rank-2 update `S -= v wᵀ + w vᵀ` to the trailing
/// rows and, in the same pass, computes `S v` for the new reflector.
fn tridiagonalize(a: &mut Mat) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = a.rows;
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n];
    let mut betas = vec![0.0; n];
    // Pending update (v, w) on indices `k..n` at the start of step k.
    let mut pending: Option<(Vec<f64>, Vec<f64>)> = None;
    let data = &mut a.data;
    for k in 0..n {
        // Bring row k up to date.
        if let Some((vp, wp)) = &pending {
            let row = &mut data[k * n + k..(k + 1) * n];
            let (v0, w0) = (vp[0], wp[0]);
            for j in 0..row.len() {
                row[j] -= v0 * wp[j] + w0 * vp[j];
            }
        }
        d[k] = data[k * n + k];
        if k + 1 == n {
            break;
        }
        // Householder reflector for x = A[k, k+1..n].
        let mut v = data[k * n + k + 1..(k + 1) * n].to_vec();
        let m = v.len();
        let tail_sq = if m > 1 { dot_kernel(&v[1..], &v[1..]) } else { 0.0 };
        let beta;
        if tail_sq == 0.0 {
            e[k] = v[0];
            v.iter_mut().for_each(|x| *x = 0.0);
            beta = 0.0;
        } else {
            let x0 = v[0];
            let xn = (x0 * x0 + tail_sq).sqrt();
            let alpha = if x0 >= 0.0 { -xn } else { xn };
            v[0] = x0 - alpha;
            beta = 1.0 / (-alpha * v[0]);
            e[k] = alpha;
        }
        betas[k] = beta;
        // Fused pass over rows k+1..n: apply the pending update, compute p = β S v.
        let (head, tail) = data.split_at_mut((k + 1) * n);
        let row_job = |(t, row): (usize, &mut [f64])| -> f64 {
            let seg = &mut row[k + 1..];
            match &pending {
                Some((vp, wp)) => fused_row(seg, &vp[1..], &wp[1..], vp[t + 1], wp[t + 1], &v),
                None => dot_kernel(seg, &v),
            }
        };
        let mut p: Vec<f64> = if m * m >= PAR_THRESHOLD {
            tail.par_chunks_mut(n).enumerate().with_min_len(8).map(row_job).collect()
        } else {
            tail.chunks_mut(n).enumerate().map(row_job).collect()
        };
        head[k * n + k + 1..(k + 1) * n].copy_from_slice(&v);
        if beta == 0.0 {
            pending = None;
            continue;
        }
        p.iter_mut().for_each(|x| *x *= beta);
        let kk = 0.5 * beta * dot_kernel(&v, &p);
        for (pj, vj) in p.iter_mut().zip(&v) {
            *pj -= kk * vj;
        }
        pending = Some((v, p));
    }
    (d, e, betas)
}

/// Overwrites `a` (as left by [`tridiagonalize`]) with `Q = H_0 ⋯ H_{n-3}`, accumulating the
/// reflectors backwards in blocks of [`WY_NB`] as `I - Y T Yᵀ`.
fn form_q(a: &mut Mat, betas: &[f64]) {
    let n = a.rows;
    let nr = n.saturating_sub(2);
    let data = &mut a.data;
    // Q is the identity on indices ≥ nr+1 before any reflector is applied.
    for i in nr + 1..n {
        for j in nr + 1..n {
            data[i * n + j] = if i == j { 1.0 } else { 0.0 };
        }
    }
    let nblocks = nr.div_ceil(WY_NB);
    for bi in (0..nblocks).rev() {
        let k0 = bi * WY_NB;
        let k1 = (k0 + WY_NB).min(nr);
        let nb = k1 - k0;
        let s = k0 + 1; // first row/column touched by this block
        let m = n - s;
        // Y (m × nb) and Yᵀ: column b is v_{k0+b}, which starts at sub-row b.
        let mut y = vec![0.0; m * nb];
        let mut yt = vec![0.0; nb * m];
        for b in 0..nb {
            let k = k0 + b;
            for r in b..m {
                let val = data[k * n + s + r];
                y[r * nb + b] = val;
                yt[b * m + r] = val;
            }
        }
        // T (nb × nb, upper triangular): T_new = [[T, -β T Yᵀv], [0, β]].
        let mut tmat = vec![0.0; nb * nb];
        for b in 0..nb {
            let beta = betas[k0 + b];
            let z: Vec<f64> =
                (0..b).map(|c| dot_kernel(&yt[c * m..(c + 1) * m], &yt[b * m..(b + 1) * m])).collect();
            for r in 0..b {
                let tz = dot_kernel(&tmat[r * nb + r..r * nb + b], &z[r..b]);
                tmat[r * nb + b] = -beta * tz;
            }
            tmat[b * nb + b] = beta;
        }
        // The current Q is the identity on rows s..=k1 and on columns s..=k1.
        for i in s..n {
            let row = &mut data[i * n..(i + 1) * n];
            if i <= k1 {
                row[s..].iter_mut().for_each(|x| *x = 0.0);
                row[i] = 1.0;
            } else {
                row[s..=k1].iter_mut().for_each(|x| *x = 0.0);
            }
        }
        // W = Yᵀ Q_sub (nb × m), by column chunks in parallel.
        const CW: usize = 128;
        const RB: usize = 64;
        let q: &[f64] = data;
        let chunks: Vec<Vec<f64>> = (0..m.div_ceil(CW))
            .into_par_iter()
            .map(|ci| {
                let j0 = ci * CW;
                let w = (m - j0).min(CW);
                let mut wc = vec![0.0; nb * w];
                for r0 in (0..m).step_by(RB) {
                    let r1 = (r0 + RB).min(m);
                    for b in 0..nb {
                        // Y[r][b] = 0 for r < b.
                        let lo = r0.max(b);
                        if lo >= r1 {
                            continue;
                        }
                        panel_add(
                            &mut wc[b * w..(b + 1) * w],
                            &yt[b * m + lo..b * m + r1],
                            &q[(s + lo) * n..],
                            n,
                            s + j0,
                        );
                    }
                }
                wc
            })
            .collect();
        let mut wm = vec![0.0; nb * m];
        for (ci, wc) in chunks.iter().enumerate() {
            let j0 = ci * CW;
            let w = (m - j0).min(CW);
            for b in 0..nb {
                wm[b * m + j0..b * m + j0 + w].copy_from_slice(&wc[b * w..(b + 1) * w]);
            }
        }
        // W ← T W (row b uses rows ≥ b, which are still unmodified when going upwards).
        let mut tmp = vec![0.0; m];
        for b in 0..nb {
            let tbb = tmat[b * nb + b];
            for (t, x) in tmp.iter_mut().zip(&wm[b * m..(b + 1) * m]) {
                *t = tbb * x;
            }
            panel_add(&mut tmp, &tmat[b * nb + b + 1..(b + 1) * nb], &wm[(b + 1) * m..], m, 0);
            wm[b * m..(b + 1) * m].copy_from_slice(&tmp);
        }
        // Q_sub -= Y W, by rows in parallel.
        data[s * n..].par_chunks_mut(n).enumerate().with_min_len(8).for_each(|(r, row)| {
            let nz = (r + 1).min(nb); // Y[r][b] = 0 for b > r
            panel_sub(&mut row[s..], &y[r * nb..r * nb + nz], &wm, m, 0);
        });
    }
    // Row and column 0 are untouched by every reflector.
    for j in 0..n {
        data[j] = if j == 0 { 1.0 } else { 0.0 };
        data[j * n] = if j == 0 { 1.0 } else { 0.0 };
    }
}

/// Buffered QL plane rotations: sweeps `(top, len, start)` into `cs` (see [`rot_body`]).
struct RotationLog {
    cs: Vec<(f64, f64)>,
    sweeps: Vec<(usize, usize, usize)>,
}

impl RotationLog {
    /// Applies the buffered rotations to the columns of `z` (`n × n`), then empties the buffer.
    fn flush(&mut self, z: &mut Mat) {
        if self.sweeps.is_empty() {
            return;
        }
        let n = z.cols;
        let (cs, sweeps) = (&self.cs, &self.sweeps);
        z.data.par_chunks_mut(ROT_W * n).for_each(|block| {
            let rows = block.len() / n;
            let mut buf = vec![0.0; n * ROT_W];
            for r in 0..rows {
                for i in 0..n {
                    buf[i * ROT_W + r] = block[r * n + i];
                }
            }
            apply_sweeps(&mut buf, cs, sweeps);
            for r in 0..rows {
                for i in 0..n {
                    block[r * n + i] = buf[i * ROT_W + r];
                }
            }
        });
        self.cs.clear();
        self.sweeps.clear();
    }
}

/// Implicit QL with Wilkinson shifts on the symmetric tridiagonal `(d, e)`; on return `d` holds the
/// (unsorted) eigenvalues and the columns of `z` have been rotated into the eigenvectors.
fn ql_implicit(d: &mut [f64], e: &mut [f64], z: &mut Mat) {
    let n = d.len();
    let mut log = RotationLog { cs: Vec::new(), sweeps: Vec::new() };
    for l in 0..n {
        let mut iter = 0;
        loop {
            // Find the end m of the unreduced block starting at l.
            let mut m = l;
            while m + 1 < n {
                let dd = d[m].abs() + d[m + 1].abs();
                if e[m].abs() <= f64::EPSILON * dd {
                    break;
                }
                m += 1;
            }
            if m == l {
                break;
            }
            iter += 1;
            if iter > QL_MAX_ITER {
                break;
            }
            // Wilkinson-type shift from the leading 2×2 block.
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let mut r = g.hypot(1.0);
            g = d[m] - d[l] + e[l] / (g + r.copysign(g));
            let (mut s, mut c, mut p) = (1.0f64, 1.0f64, 0.0f64);
            let start = log.cs.len();
            let mut underflow = false;
            let mut i = m;
            while i > l {
                i -= 1;
                let f = s * e[i];
                let b = c * e[i];
                r = f.hypot(g);
                e[i + 1] = r;
                if r == 0.0 {
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    underflow = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
                log.cs.push((c, s));
            }
            let len = log.cs.len() - start;
            if len > 0 {
                log.sweeps.push((m - 1, len, start));
            }
            if log.cs.len() >= ROT_BUFFER {
                log.flush(z);
            }
            if underflow {
                continue;
            }
            d[l] -= p;
            e[l] = g;
            e[m] = 0.0;
        }
    }
    log.flush(z);
}

// ---------------------------------------------------------------------------------------------
// OrthoBasis
// ---------------------------------------------------------------------------------------------

/// Orthonormal basis of row vectors (an m x n matrix B with orthonormal rows), grown one vector at a time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrthoBasis {
    dim: usize,
    rows: Vec<Vec<f64>>,
}

impl OrthoBasis {
    /// An empty basis of vectors of length `dim`.
    pub fn new(dim: usize) -> Self {
        OrthoBasis { dim, rows: Vec::new() }
    }

    /// Length of the basis vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of basis vectors.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the basis has no vectors.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The basis vectors (rows of `B`).
    pub fn rows(&self) -> &[Vec<f64>] {
        &self.rows
    }

    /// Wraps existing rows (e.g. loaded from a checkpoint); orthonormality is trusted, not checked.
    ///
    /// # Panics
    /// If a row's length differs from `dim`.
    pub fn from_rows(dim: usize, rows: Vec<Vec<f64>>) -> Self {
        assert!(
            rows.iter().all(|r| r.len() == dim),
            "OrthoBasis::from_rows: row length differs from dim {dim}"
        );
        OrthoBasis { dim, rows }
    }

    /// `x - Bᵀ B x` (projection onto the orthogonal complement), done as two passes of modified
    /// Gram-Schmidt for numerical safety.
    ///
    /// # Panics
    /// If `x.len() != self.dim()`.
    pub fn project_out(&self, x: &[f64]) -> Vec<f64> {
        assert_eq!(x.len(), self.dim, "OrthoBasis::project_out: dimension mismatch");
        let mut y = x.to_vec();
        for _ in 0..2 {
            for q in &self.rows {
                let c = dot_kernel(q, &y);
                axpy(&mut y, -c, q);
            }
        }
        y
    }

    /// Orthogonalises `v` against the basis (twice) and appends it, normalised, if its remaining
    /// norm relative to `‖v‖` exceeds `rel_tol`; returns whether it was appended. Zero or
    /// non-finite vectors are never appended, nor is anything once the basis has `dim` vectors.
    ///
    /// # Panics
    /// If `v.len() != self.dim()`.
    pub fn try_push(&mut self, v: &[f64], rel_tol: f64) -> bool {
        let nv = norm(v);
        if !(nv > 0.0 && nv.is_finite()) {
            return false;
        }
        let mut y = self.project_out(v);
        let ny = norm(&y);
        let significant = ny > rel_tol * nv;
        if !significant || self.rows.len() >= self.dim {
            return false;
        }
        let inv = 1.0 / ny;
        y.iter_mut().for_each(|x| *x *= inv);
        self.rows.push(y);
        true
    }

    /// max |B Bᵀ - I| entry (0 for an empty basis).
    pub fn orthonormality_error(&self) -> f64 {
        let k = self.rows.len();
        (0..k)
            .into_par_iter()
            .map(|i| {
                (i..k)
                    .map(|j| {
                        let target = if i == j { 1.0 } else { 0.0 };
                        (dot_kernel(&self.rows[i], &self.rows[j]) - target).abs()
                    })
                    .fold(0.0f64, f64::max)
            })
            .reduce(|| 0.0, f64::max)
    }
}

// ---------------------------------------------------------------------------------------------
// Core directions
// ---------------------------------------------------------------------------------------------

/// Squared singular values at or below this fraction of the largest are treated as zero.
const CORE_REL_EIG_TOL: f64 = 1e-12;

/// Top singular directions of a set of vectors (rows of `vectors`, k x n with k small, e.g. <= 32):
/// returns unit right-singular vectors (length n) ordered by singular value, keeping the fewest
/// whose energy (sum of squared singular values) reaches `energy_fraction` of the total, at most
/// `max_dirs`.
///
/// Computed from the eigendecomposition of the `k × k` Gram matrix `X Xᵀ = U Λ Uᵀ` as
/// `v_i = Xᵀ u_i / σ_i`, re-orthonormalised. Directions whose squared singular value is negligible
/// (≤ 1e-12 of the largest) are never returned, so the result may be shorter than requested; an
/// `energy_fraction ≤ 0`, `max_dirs == 0`, no vectors or all-zero vectors give an empty result.
///
/// # Panics
/// If the vectors do not all have the same length.
pub fn core_directions(vectors: &[Vec<f64>], energy_fraction: f64, max_dirs: usize) -> Vec<Vec<f64>> {
    let k = vectors.len();
    if k == 0 || max_dirs == 0 {
        return Vec::new();
    }
    let n = vectors[0].len();
    assert!(vectors.iter().all(|v| v.len() == n), "core_directions: vectors have different lengths");
    let mut gram = Mat::zeros(k, k);
    for i in 0..k {
        for j in 0..=i {
            let g = dot_kernel(&vectors[i], &vectors[j]);
            gram.data[i * k + j] = g;
            gram.data[j * k + i] = g;
        }
    }
    let eig = sym_eigen(&gram);
    let total: f64 = eig.values.iter().map(|&l| l.max(0.0)).sum();
    let lmax = eig.values[k - 1];
    if !(total > 0.0 && total.is_finite()) {
        return Vec::new();
    }
    let target = energy_fraction.min(1.0) * total;
    let mut out: Vec<Vec<f64>> = Vec::new();
    let mut energy = 0.0;
    for idx in (0..k).rev() {
        if out.len() >= max_dirs || energy >= target {
            break;
        }
        let lambda = eig.values[idx];
        if lambda.is_nan() || lambda <= CORE_REL_EIG_TOL * lmax {
            break;
        }
        let mut v = vec![0.0; n];
        for (r, x) in vectors.iter().enumerate() {
            axpy(&mut v, eig.vectors.data[r * k + idx], x);
        }
        // Re-orthogonalise against the directions already kept (they are nearly orthogonal).
        for _ in 0..2 {
            for q in &out {
                let c = dot_kernel(q, &v);
                axpy(&mut v, -c, q);
            }
        }
        let nv = norm(&v);
        if nv == 0.0 || !nv.is_finite() {
            break;
        }
        v.iter_mut().for_each(|x| *x /= nv);
        out.push(v);
        energy += lambda;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: small deterministic generator for test data.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in [-1, 1).
        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f64> {
            (0..n).map(|_| self.uniform()).collect()
        }
        fn mat(&mut self, r: usize, c: usize) -> Mat {
            Mat::from_vec(r, c, self.vec(r * c))
        }
    }

    /// A Aᵀ + n I for a random A: symmetric positive definite.
    fn random_spd(n: usize, seed: u64) -> Mat {
        let a = Rng(seed).mat(n, n);
        let mut s = a.matmul(&a.transpose());
        s.add_diagonal(n as f64);
        s
    }

    fn random_sym(n: usize, seed: u64) -> Mat {
        let a = Rng(seed).mat(n, n);
        let mut s = a.clone();
        for i in 0..n {
            for j in 0..n {
                s.data[i * n + j] = a.get(i, j) + a.get(j, i);
            }
        }
        s
    }

    fn naive_matmul(a: &Mat, b: &Mat) -> Mat {
        let mut c = Mat::zeros(a.rows, b.cols);
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0.0;
                for k in 0..a.cols {
                    s += a.get(i, k) * b.get(k, j);
                }
                c.set(i, j, s);
            }
        }
        c
    }

    fn max_abs_diff(a: &Mat, b: &Mat) -> f64 {
        assert_eq!((a.rows, a.cols), (b.rows, b.cols));
        a.data.iter().zip(&b.data).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
    }

    /// Checks `A V = V Λ`-reconstruction, orthonormality and ordering; returns nothing, panics.
    fn check_eigen(a: &Mat, eig: &SymEigen, tol: f64) {
        let n = a.rows;
        assert_eq!(eig.values.len(), n);
        assert_eq!((eig.vectors.rows, eig.vectors.cols), (n, n));
        for w in eig.values.windows(2) {
            assert!(w[0] <= w[1], "eigenvalues not ascending: {} > {}", w[0], w[1]);
        }
        let v = &eig.vectors;
        let mut vl = v.clone();
        for i in 0..n {
            for j in 0..n {
                vl.data[i * n + j] *= eig.values[j];
            }
        }
        let recon = vl.matmul(&v.transpose());
        let rel = max_abs_diff(&recon, a) / a.max_abs().max(1e-300);
        assert!(rel < tol, "reconstruction error {rel:e}");
        let vtv = v.transpose().matmul(v);
        let orth = max_abs_diff(&vtv, &Mat::identity(n));
        assert!(orth < tol, "VᵀV - I = {orth:e}");
    }

    #[test]
    fn mat_basics() {
        let mut m = Mat::zeros(2, 3);
        m.set(1, 2, 5.0);
        assert_eq!(m.get(1, 2), 5.0);
        assert_eq!(m.row(1), &[0.0, 0.0, 5.0]);
        assert_eq!(m.col(2), vec![0.0, 5.0]);
        let t = m.transpose();
        assert_eq!((t.rows, t.cols), (3, 2));
        assert_eq!(t.get(2, 1), 5.0);
        let a = Mat::from_vec(2, 2, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(a.matvec(&[1.0, 1.0]), vec![3.0, 7.0]);
        assert_eq!(a.matvec_t(&[1.0, 1.0]), vec![4.0, 6.0]);
        let mut i = Mat::identity(2);
        i.add_diagonal(2.0);
        assert_eq!(i.data, vec![3.0, 0.0, 0.0, 3.0]);
        assert_eq!(a.matmul(&Mat::identity(2)), a);
        assert!((dot(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]) - 32.0).abs() < 1e-15);
        assert!((norm(&[3.0, 4.0]) - 5.0).abs() < 1e-15);
    }

    #[test]
    #[should_panic]
    fn from_vec_checks_length() {
        let _ = Mat::from_vec(2, 2, vec![1.0; 3]);
    }

    #[test]
    fn matmul_and_transpose_match_naive() {
        let mut rng = Rng(7);
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 2), (37, 300, 45), (70, 33, 520), (17, 1, 9)] {
            let a = rng.mat(m, k);
            let b = rng.mat(k, n);
            let c = a.matmul(&b);
            let err = max_abs_diff(&c, &naive_matmul(&a, &b));
            assert!(err < 1e-12 * k as f64, "matmul {m}x{k}x{n}: {err:e}");
            let t = a.transpose();
            for i in 0..m {
                for j in 0..k {
                    assert_eq!(t.get(j, i), a.get(i, j));
                }
            }
            assert_eq!(t.transpose(), a);
        }
        let long = Rng(8).mat(300, 400);
        let x = Rng(9).vec(400);
        let y = long.matvec(&x);
        let naive: Vec<f64> = (0..300).map(|i| (0..400).map(|j| long.get(i, j) * x[j]).sum()).collect();
        for (a, b) in y.iter().zip(&naive) {
            assert!((a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn cholesky_solve_residual() {
        for &n in &[1usize, 5, 64, 150] {
            let a = random_spd(n, 11 + n as u64);
            let chol = Cholesky::new(&a).expect("SPD");
            let l = chol.factor();
            // L is lower triangular and L Lᵀ = A.
            for i in 0..n {
                for j in i + 1..n {
                    assert_eq!(l.get(i, j), 0.0);
                }
            }
            let llt = l.matmul(&l.transpose());
            let rel = max_abs_diff(&llt, &a) / a.max_abs();
            assert!(rel < 1e-13, "n={n}: |LLᵀ-A| = {rel:e}");
            let b = Rng(3).vec(n);
            let x = chol.solve(&b);
            let ax = a.matvec(&x);
            let res: Vec<f64> = ax.iter().zip(&b).map(|(p, q)| p - q).collect();
            let rel = norm(&res) / norm(&b);
            assert!(rel < 1e-12, "n={n}: solve residual {rel:e}");
        }
    }

    #[test]
    fn cholesky_solve_mat_residual() {
        let n = 130;
        let a = random_spd(n, 5);
        let chol = Cholesky::new(&a).unwrap();
        for &m in &[1usize, 3, 32, 70] {
            let b = Rng(m as u64).mat(n, m);
            let x = chol.solve_mat(&b);
            let res = max_abs_diff(&a.matmul(&x), &b) / b.max_abs();
            assert!(res < 1e-12, "m={m}: residual {res:e}");
            // Column 0 agrees with the vector solve.
            let x0 = chol.solve(&b.col(0));
            for (p, q) in x.col(0).iter().zip(&x0) {
                assert!((p - q).abs() < 1e-13);
            }
        }
        let logdet = chol.log_det();
        assert!(logdet.is_finite());
    }

    #[test]
    fn cholesky_detects_non_spd() {
        let a = Mat::from_vec(2, 2, vec![1.0, 2.0, 2.0, 1.0]);
        match Cholesky::new(&a) {
            Err(LinalgError::NotPositiveDefinite { pivot, value }) => {
                assert_eq!(pivot, 1);
                assert!((value + 3.0).abs() < 1e-12);
            }
            other => panic!("expected NotPositiveDefinite, got {other:?}"),
        }
        let z = Mat::zeros(3, 3);
        assert!(matches!(Cholesky::new(&z), Err(LinalgError::NotPositiveDefinite { pivot: 0, .. })));
        // An indefinite matrix whose breakdown happens beyond the first block.
        let n = 100;
        let mut a = random_spd(n, 21);
        a.data[90 * n + 90] = -1.0;
        match Cholesky::new(&a) {
            Err(LinalgError::NotPositiveDefinite { pivot, value }) => {
                assert_eq!(pivot, 90);
                assert!(value < 0.0);
            }
            other => panic!("expected NotPositiveDefinite, got {other:?}"),
        }
        let mut nan = Mat::identity(3);
        nan.set(2, 2, f64::NAN);
        assert!(matches!(Cholesky::new(&nan), Err(LinalgError::NotPositiveDefinite { pivot: 2, .. })));
        assert_eq!(
            Cholesky::new(&Mat::zeros(2, 3)).unwrap_err(),
            LinalgError::NotSquare { rows: 2, cols: 3 }
        );
        let msg = LinalgError::NotPositiveDefinite { pivot: 4, value: -1.0 }.to_string();
        assert!(msg.contains("pivot 4"), "{msg}");
    }

    #[test]
    fn sym_eigen_known_values() {
        let d = Mat::from_vec(3, 3, vec![3.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 2.0]);
        let eig = sym_eigen(&d);
        assert_eq!(eig.values, vec![1.0, 2.0, 3.0]);
        // Eigenvectors of a diagonal matrix are signed unit vectors.
        for (j, &k) in [1usize, 2, 0].iter().enumerate() {
            assert!((eig.vectors.get(k, j).abs() - 1.0).abs() < 1e-15);
        }
        check_eigen(&d, &eig, 1e-14);

        let two = Mat::from_vec(2, 2, vec![2.0, 1.0, 1.0, 2.0]);
        let eig = sym_eigen(&two);
        assert!((eig.values[0] - 1.0).abs() < 1e-14 && (eig.values[1] - 3.0).abs() < 1e-14);
        let s = std::f64::consts::FRAC_1_SQRT_2;
        assert!((eig.vectors.get(0, 1).abs() - s).abs() < 1e-14);
        assert!((eig.vectors.get(0, 1) - eig.vectors.get(1, 1)).abs() < 1e-14);
        check_eigen(&two, &eig, 1e-14);

        let one = Mat::from_vec(1, 1, vec![-4.0]);
        let eig = sym_eigen(&one);
        assert_eq!(eig.values, vec![-4.0]);
        assert_eq!(eig.vectors.data, vec![1.0]);
        assert!(sym_eigen(&Mat::zeros(0, 0)).values.is_empty());

        // All-ones matrix: eigenvalue n once, 0 with multiplicity n-1.
        let n = 30;
        let ones = Mat::from_vec(n, n, vec![1.0; n * n]);
        let eig = sym_eigen(&ones);
        assert!((eig.values[n - 1] - n as f64).abs() < 1e-12);
        assert!(eig.values[..n - 1].iter().all(|x| x.abs() < 1e-12));
        check_eigen(&ones, &eig, 1e-12);
    }

    #[test]
    fn sym_eigen_scale_invariant_and_non_finite() {
        let a = random_sym(40, 9);
        let base = sym_eigen(&a);
        for &f in &[1e200, 1e-200, 3.0] {
            let mut s = a.clone();
            s.data.iter_mut().for_each(|x| *x *= f);
            let eig = sym_eigen(&s);
            check_eigen(&s, &eig, 1e-11);
            for (x, y) in eig.values.iter().zip(&base.values) {
                assert!((x / f - y).abs() < 1e-12 * base.values[39].abs(), "{x} vs {y}·{f}");
            }
        }
        let zero = sym_eigen(&Mat::zeros(5, 5));
        assert_eq!(zero.values, vec![0.0; 5]);
        assert_eq!(zero.vectors, Mat::identity(5));
        let mut bad = Mat::identity(4);
        bad.set(1, 2, f64::INFINITY);
        assert!(sym_eigen(&bad).values.iter().all(|x| x.is_nan()));
    }

    #[test]
    fn sym_eigen_random_50_and_200() {
        for &(n, seed) in &[(50usize, 1u64), (200, 2)] {
            let a = random_sym(n, seed);
            let eig = sym_eigen(&a);
            check_eigen(&a, &eig, 1e-9);
            // The trace is preserved.
            let tr: f64 = (0..n).map(|i| a.get(i, i)).sum();
            let sum: f64 = eig.values.iter().sum();
            assert!((tr - sum).abs() < 1e-9 * n as f64);
        }
    }

    #[test]
    fn sym_eigen_clustered_and_spd() {
        // Repeated eigenvalues: Q diag(1,1,1,5,5,5,…) Qᵀ with Q from a random symmetric matrix.
        let n = 90;
        let q = sym_eigen(&random_sym(n, 77)).vectors;
        let mut qd = q.clone();
        for i in 0..n {
            for j in 0..n {
                qd.data[i * n + j] *= if j < n / 2 { 1.0 } else { 5.0 };
            }
        }
        let a = qd.matmul(&q.transpose());
        let eig = sym_eigen(&a);
        check_eigen(&a, &eig, 1e-10);
        assert!(eig.values[..n / 2].iter().all(|x| (x - 1.0).abs() < 1e-10));
        assert!(eig.values[n / 2..].iter().all(|x| (x - 5.0).abs() < 1e-10));
        let spd = random_spd(120, 4);
        let eig = sym_eigen(&spd);
        check_eigen(&spd, &eig, 1e-10);
        assert!(eig.values[0] >= 120.0 - 1e-9);
        // Already tridiagonal and diagonal-with-zero-columns inputs exercise the skipped reflectors.
        let mut t = Mat::zeros(40, 40);
        for i in 0..40 {
            t.set(i, i, (i % 7) as f64);
            if i + 1 < 40 && i % 5 != 0 {
                t.set(i, i + 1, 0.5);
                t.set(i + 1, i, 0.5);
            }
        }
        check_eigen(&t, &sym_eigen(&t), 1e-12);
    }

    #[test]
    #[ignore = "n = 1536 eigendecomposition takes a few seconds"]
    fn sym_eigen_large_1536() {
        let n = 1536;
        let a = random_sym(n, 1536);
        let eig = sym_eigen(&a);
        check_eigen(&a, &eig, 1e-9);
    }

    #[test]
    fn ortho_basis_stays_orthonormal() {
        let dim = 128;
        let mut rng = Rng(99);
        let mut basis = OrthoBasis::new(dim);
        assert!(basis.is_empty());
        assert_eq!(basis.dim(), dim);
        for _ in 0..100 {
            assert!(basis.try_push(&rng.vec(dim), 1e-10));
        }
        assert_eq!(basis.len(), 100);
        let err = basis.orthonormality_error();
        assert!(err < 1e-12, "orthonormality error {err:e}");
        // project_out is orthogonal to every row and idempotent.
        let x = rng.vec(dim);
        let y = basis.project_out(&x);
        for q in basis.rows() {
            assert!(dot(q, &y).abs() < 1e-13 * norm(&x));
        }
        let yy = basis.project_out(&y);
        for (a, b) in y.iter().zip(&yy) {
            assert!((a - b).abs() < 1e-13);
        }
        // x = (x - BᵀBx) + BᵀBx, and the projected part has norm ≤ ‖x‖.
        assert!(norm(&y) <= norm(&x));
        // A full basis accepts nothing more.
        let mut full = OrthoBasis::new(4);
        for _ in 0..4 {
            assert!(full.try_push(&rng.vec(4), 1e-8));
        }
        assert!(!full.try_push(&rng.vec(4), 1e-8));
        assert!(full.orthonormality_error() < 1e-14);
        let restored = OrthoBasis::from_rows(4, full.rows().to_vec());
        assert_eq!(restored, full);
    }

    #[test]
    fn ortho_basis_rejects_vectors_in_span() {
        let dim = 50;
        let mut rng = Rng(5);
        let mut basis = OrthoBasis::new(dim);
        let a = rng.vec(dim);
        let b = rng.vec(dim);
        assert!(basis.try_push(&a, 1e-8));
        assert!(basis.try_push(&b, 1e-8));
        let combo: Vec<f64> = a.iter().zip(&b).map(|(x, y)| 3.0 * x - 0.5 * y).collect();
        assert!(!basis.try_push(&combo, 1e-8));
        assert!(!basis.try_push(&vec![0.0; dim], 1e-8));
        assert_eq!(basis.len(), 2);
        // A vector just outside the span is accepted when the tolerance allows it.
        let mut tilted = combo.clone();
        tilted[0] += 1e-3;
        assert!(!basis.clone().try_push(&tilted, 1e-2));
        assert!(basis.try_push(&tilted, 1e-8));
        assert!(basis.orthonormality_error() < 1e-12);
    }

    #[test]
    fn core_directions_of_a_plane() {
        let n = 64;
        let mut rng = Rng(31);
        let p1 = rng.vec(n);
        let p2 = rng.vec(n);
        // Twenty vectors in span{p1, p2}, dominated by p1.
        let vecs: Vec<Vec<f64>> = (0..20)
            .map(|_| {
                let (a, b) = (5.0 * rng.uniform(), 0.5 * rng.uniform());
                p1.iter().zip(&p2).map(|(x, y)| a * x + b * y).collect()
            })
            .collect();
        let dirs = core_directions(&vecs, 1.0, 10);
        assert_eq!(dirs.len(), 2);
        let mut plane = OrthoBasis::new(n);
        assert!(plane.try_push(&p1, 1e-10) && plane.try_push(&p2, 1e-10));
        for (i, d) in dirs.iter().enumerate() {
            assert!((norm(d) - 1.0).abs() < 1e-12);
            // Inside the plane.
            assert!(norm(&plane.project_out(d)) < 1e-9);
            for e in &dirs[..i] {
                assert!(dot(d, e).abs() < 1e-12);
            }
        }
        // ... and spanning it.
        let both = OrthoBasis::from_rows(n, dirs.clone());
        assert!(norm(&both.project_out(&p1)) < 1e-9 * norm(&p1));
        assert!(norm(&both.project_out(&p2)) < 1e-9 * norm(&p2));
        // The first direction carries the dominant energy: projections of the data onto it.
        let e0: f64 = vecs.iter().map(|v| dot(v, &dirs[0]).powi(2)).sum();
        let e1: f64 = vecs.iter().map(|v| dot(v, &dirs[1]).powi(2)).sum();
        assert!(e0 > e1);
        let total: f64 = vecs.iter().map(|v| dot(v, v)).sum();
        assert!(((e0 + e1) - total).abs() < 1e-9 * total);
        // energy_fraction below the first direction's share keeps only one; max_dirs caps it.
        let frac0 = e0 / total;
        assert_eq!(core_directions(&vecs, frac0 * 0.99, 10).len(), 1);
        assert_eq!(core_directions(&vecs, (frac0 + 1.0) / 2.0, 10).len(), 2);
        assert_eq!(core_directions(&vecs, 1.0, 1).len(), 1);
        let one = &core_directions(&vecs, 1.0, 1)[0];
        assert!(dot(one, &dirs[0]).abs() > 1.0 - 1e-12);
        assert!(core_directions(&vecs, 1.0, 0).is_empty());
        assert!(core_directions(&[], 1.0, 3).is_empty());
        assert!(core_directions(&[vec![0.0; 5], vec![0.0; 5]], 1.0, 3).is_empty());
    }
}
