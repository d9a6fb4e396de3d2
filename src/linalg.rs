//! Dense `f64` linear algebra: a row-major matrix type, and thin wrappers over the `faer` crate for
//! matrix products, the Cholesky factorisation `A = L Lᵀ` with its triangular solves, and the
//! symmetric eigendecomposition; plus what faer does not offer: an incrementally grown orthonormal
//! basis ([`OrthoBasis`]) and the dominant singular directions of a few vectors
//! ([`core_directions`]).
//!
//! # Determinism
//!
//! Every faer call runs with [`Par::Seq`] (one thread). faer's kernels are chosen once per process
//! from the CPU's features and then perform the same operations in the same order on every call,
//! so the same input gives bit-identical output on the same machine whatever the rayon pool
//! holds — which is what resume relies on (a run is compared against itself). Parallel faer
//! (`Par::rayon`) was not used: its divide-and-conquer eigensolver and blocked factorisations
//! split work by thread count, and nothing in faer documents the reduction order as fixed, so
//! bit-exactness could not be shown. Results can differ in the last bits between CPUs with
//! different SIMD features (faer uses fused multiply-add where available).

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch, LltError};
use faer::linalg::evd::{self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors};
use faer::linalg::matmul::matmul;
use faer::linalg::triangular_solve::{solve_lower_triangular_in_place, solve_upper_triangular_in_place};
use faer::{Accum, ColMut, ColRef, MatMut, MatRef, Par, RowRef};
use rayon::prelude::*;

/// Parallelism of every faer call (see the module documentation).
const PAR: Par = Par::Seq;

// ---------------------------------------------------------------------------------------------
// Vectors
// ---------------------------------------------------------------------------------------------

/// Inner product of two vectors of equal length.
///
/// # Panics
/// If the lengths differ.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot: length mismatch");
    faer::linalg::matmul::dot::inner_prod(
        RowRef::from_slice(a),
        faer::Conj::No,
        ColRef::from_slice(b),
        faer::Conj::No,
    )
}

/// Euclidean norm of a vector.
pub fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// `y += alpha * x` (equal lengths).
fn axpy(y: &mut [f64], alpha: f64, x: &[f64]) {
    debug_assert_eq!(y.len(), x.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
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

    /// A faer view of this matrix.
    fn view(&self) -> MatRef<'_, f64> {
        MatRef::from_row_major_slice(&self.data, self.rows, self.cols)
    }

    /// A mutable faer view of this matrix.
    fn view_mut(&mut self) -> MatMut<'_, f64> {
        MatMut::from_row_major_slice_mut(&mut self.data, self.rows, self.cols)
    }

    /// Copies a faer matrix (any layout) into a new row-major matrix.
    fn from_faer(m: MatRef<'_, f64>) -> Mat {
        let mut out = Mat::zeros(m.nrows(), m.ncols());
        out.view_mut().copy_from(m);
        out
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
        let mut y = vec![0.0; self.rows];
        matmul(
            ColMut::from_slice_mut(&mut y).as_mat_mut(),
            Accum::Replace,
            self.view(),
            ColRef::from_slice(x).as_mat(),
            1.0,
            PAR,
        );
        y
    }

    /// `selfᵀ · x`.
    ///
    /// # Panics
    /// If `x.len() != self.rows`.
    pub fn matvec_t(&self, x: &[f64]) -> Vec<f64> {
        assert_eq!(x.len(), self.rows, "Mat::matvec_t: dimension mismatch");
        let mut y = vec![0.0; self.cols];
        matmul(
            ColMut::from_slice_mut(&mut y).as_mat_mut(),
            Accum::Replace,
            self.view().transpose(),
            ColRef::from_slice(x).as_mat(),
            1.0,
            PAR,
        );
        y
    }

    /// The transpose.
    pub fn transpose(&self) -> Mat {
        Mat::from_faer(self.view().transpose())
    }

    /// The product `self · other`.
    ///
    /// # Panics
    /// If `self.cols != other.rows`.
    pub fn matmul(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.rows, "Mat::matmul: dimension mismatch");
        let mut c = Mat::zeros(self.rows, other.cols);
        matmul(c.view_mut(), Accum::Replace, self.view(), other.view(), 1.0, PAR);
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
    /// The lower-triangular factor (upper triangle zero), row-major.
    l: Mat,
}

impl Cholesky {
    /// Factorises `a`, reading only its lower triangle (the matrix is assumed symmetric), with
    /// faer's blocked LLᵀ factorisation on a column-major copy.
    ///
    /// # Errors
    /// [`LinalgError::NotSquare`] for a non-square input and
    /// [`LinalgError::NotPositiveDefinite`] when a pivot is not positive (or not finite).
    ///
    /// Inside [`with_factor_memo`], a factor the memo holds for the same input bytes is returned
    /// instead of being recomputed, and a computed one is offered to the memo.
    pub fn new(a: &Mat) -> Result<Self, LinalgError> {
        if a.rows != a.cols {
            return Err(LinalgError::NotSquare { rows: a.rows, cols: a.cols });
        }
        let Some(memo) = current_memo() else {
            return Self::compute(a);
        };
        let key = MatKey::of(a);
        if let Some(l) = memo.cholesky(&key).filter(|l| l.rows == a.rows && l.cols == a.cols) {
            return Ok(Cholesky { l });
        }
        let c = Self::compute(a)?;
        memo.put_cholesky(&key, &c.l);
        Ok(c)
    }

    /// The factorisation itself (see [`Self::new`]).
    ///
    /// The factorisation runs in one n×n buffer, which then becomes the row-major factor: the
    /// work matrix is a column-major view of it, transposed in place at the end (n² f64 less
    /// at once than a separate work matrix: 0.97 GB at n = 11,008).
    fn compute(a: &Mat) -> Result<Self, LinalgError> {
        let n = a.rows;
        let mut data = vec![0f64; n * n];
        let mut w = MatMut::from_column_major_slice_mut(&mut data, n, n);
        w.copy_from_triangular_lower(a.view());
        let mut buf = MemBuffer::new(cholesky_in_place_scratch::<f64>(n, PAR, Default::default()));
        let res = cholesky_in_place(
            w.as_mut(),
            Default::default(),
            PAR,
            MemStack::new(&mut buf),
            Default::default(),
        );
        if let Err(LltError::NonPositivePivot { index }) = res {
            return Err(LinalgError::NotPositiveDefinite {
                pivot: index,
                value: schur_pivot(a, w.as_ref(), index),
            });
        }
        lower_col_major_to_row_major(&mut data, n);
        Ok(Cholesky { l: Mat::from_vec(n, n, data) })
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
        assert_eq!(b.len(), self.dim(), "Cholesky::solve: dimension mismatch");
        let mut x = b.to_vec();
        let mut xm = ColMut::from_slice_mut(&mut x).as_mat_mut();
        solve_lower_triangular_in_place(self.l.view(), xm.as_mut(), PAR);
        solve_upper_triangular_in_place(self.l.view().transpose(), xm, PAR);
        x
    }

    /// Solves `L y = b` (whitening: `yᵀy = bᵀA⁻¹b`).
    ///
    /// # Panics
    /// If `b.len()` differs from the dimension.
    pub fn solve_lower(&self, b: &[f64]) -> Vec<f64> {
        assert_eq!(b.len(), self.dim(), "Cholesky::solve_lower: dimension mismatch");
        let mut x = b.to_vec();
        solve_lower_triangular_in_place(self.l.view(), ColMut::from_slice_mut(&mut x).as_mat_mut(), PAR);
        x
    }

    /// Solves `L Y = B` for several right-hand sides at once (one pass over `L` instead of one
    /// per vector; the results may differ from [`Self::solve_lower`] in the last bits).
    ///
    /// # Panics
    /// If a vector's length differs from the dimension.
    pub fn solve_lower_many(&self, bs: &[Vec<f64>]) -> Vec<Vec<f64>> {
        self.solve_columns(bs, true, false)
    }

    /// Solves `A X = B` for several right-hand sides at once (see [`Self::solve_lower_many`]).
    ///
    /// # Panics
    /// If a vector's length differs from the dimension.
    pub fn solve_many(&self, bs: &[Vec<f64>]) -> Vec<Vec<f64>> {
        self.solve_columns(bs, true, true)
    }

    /// Solves `Lᵀ X = Y` for several right-hand sides at once.
    ///
    /// # Panics
    /// If a vector's length differs from the dimension.
    pub fn solve_upper_t_many(&self, ys: &[Vec<f64>]) -> Vec<Vec<f64>> {
        self.solve_columns(ys, false, true)
    }

    /// The triangular solves of `lower` then `upper` (Lᵀ) on the vectors as columns of one
    /// matrix; one vector goes through the single-vector path (the same bits as before).
    fn solve_columns(&self, bs: &[Vec<f64>], lower: bool, upper: bool) -> Vec<Vec<f64>> {
        let n = self.dim();
        if bs.len() == 1 {
            let b = &bs[0];
            return vec![match (lower, upper) {
                (true, true) => self.solve(b),
                (true, false) => self.solve_lower(b),
                _ => self.solve_upper_t(b),
            }];
        }
        let mut x = faer::Mat::<f64>::from_fn(n, bs.len(), |i, j| {
            assert_eq!(bs[j].len(), n, "Cholesky: dimension mismatch");
            bs[j][i]
        });
        if lower {
            solve_lower_triangular_in_place(self.l.view(), x.as_mut(), PAR);
        }
        if upper {
            solve_upper_triangular_in_place(self.l.view().transpose(), x.as_mut(), PAR);
        }
        (0..bs.len()).map(|j| x.col(j).iter().copied().collect()).collect()
    }

    /// Solves `Lᵀ x = y`.
    ///
    /// # Panics
    /// If `y.len()` differs from the dimension.
    pub fn solve_upper_t(&self, y: &[f64]) -> Vec<f64> {
        assert_eq!(y.len(), self.dim(), "Cholesky::solve_upper_t: dimension mismatch");
        let mut x = y.to_vec();
        solve_upper_triangular_in_place(
            self.l.view().transpose(),
            ColMut::from_slice_mut(&mut x).as_mat_mut(),
            PAR,
        );
        x
    }

    /// Solves `A X = B` for every column of `B` (on a column-major copy of `B`).
    ///
    /// # Panics
    /// If `b.rows` differs from the dimension.
    pub fn solve_mat(&self, b: &Mat) -> Mat {
        assert_eq!(b.rows, self.dim(), "Cholesky::solve_mat: dimension mismatch");
        if b.cols == 1 {
            return Mat::from_vec(b.rows, 1, self.solve(&b.data));
        }
        let mut x = faer::Mat::<f64>::zeros(b.rows, b.cols);
        x.as_mut().copy_from(b.view());
        solve_lower_triangular_in_place(self.l.view(), x.as_mut(), PAR);
        solve_upper_triangular_in_place(self.l.view().transpose(), x.as_mut(), PAR);
        Mat::from_faer(x.as_ref())
    }
}

/// The Schur complement pivot `a_pp - ‖y‖²` with `L₁₁ y = a[p, :p]`, from the leading `p × p`
/// factor `L₁₁` in `partial` (complete when the factorisation fails at pivot `p`).
fn schur_pivot(a: &Mat, partial: MatRef<'_, f64>, p: usize) -> f64 {
    let mut y = a.row(p)[..p].to_vec();
    solve_lower_triangular_in_place(
        partial.submatrix(0, 0, p, p),
        ColMut::from_slice_mut(&mut y).as_mat_mut(),
        PAR,
    );
    a.get(p, p) - dot(&y, &y)
}

/// Turns the lower triangle of the column-major n×n matrix in `m` into the row-major
/// lower-triangular matrix with a zero upper triangle, in place, tile by tile (faer leaves
/// working values in the upper triangle).
fn lower_col_major_to_row_major(m: &mut [f64], n: usize) {
    const T: usize = 64;
    for bi in (0..n).step_by(T) {
        for bj in (bi..n).step_by(T) {
            for i in bi..(bi + T).min(n) {
                let start = if bi == bj { i + 1 } else { bj };
                for j in start..(bj + T).min(n) {
                    // i < j: position i·n + j holds L(j, i) in column-major order; row-major wants
                    // it at j·n + i, and a zero at i·n + j.
                    m[j * n + i] = m[i * n + j];
                    m[i * n + j] = 0.0;
                }
            }
        }
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

impl SymEigen {
    /// All-NaN values and vectors of dimension `n`.
    fn nan(n: usize) -> Self {
        SymEigen { values: vec![f64::NAN; n], vectors: Mat::from_vec(n, n, vec![f64::NAN; n * n]) }
    }
}

/// Eigendecomposition of the symmetric matrix `a` (the input is symmetrised as `(A + Aᵀ)/2`).
///
/// faer's self-adjoint eigensolver (Householder tridiagonalisation, then the implicit QR algorithm
/// below 128 rows and divide and conquer above), on a column-major copy scaled by a power of two
/// (exact) so that the largest entry is near 1.
///
/// A matrix with a non-finite entry yields NaN eigenvalues and eigenvectors, and so does the
/// (never observed) failure of the QR iteration to converge.
///
/// # Panics
/// If `a` is not square.
///
/// Inside [`with_factor_memo`], a decomposition the memo holds for the same input bytes is
/// returned instead of being recomputed, and a computed (finite) one is offered to the memo.
pub fn sym_eigen(a: &Mat) -> SymEigen {
    assert_eq!(a.rows, a.cols, "sym_eigen: matrix must be square");
    let Some(memo) = current_memo() else {
        return compute_sym_eigen(a);
    };
    let key = MatKey::of(a);
    let n = a.rows;
    if let Some(e) =
        memo.sym_eigen(&key).filter(|e| e.values.len() == n && e.vectors.rows == n && e.vectors.cols == n)
    {
        return e;
    }
    let e = compute_sym_eigen(a);
    if e.values.iter().all(|v| v.is_finite()) {
        memo.put_sym_eigen(&key, &e);
    }
    e
}

/// The decomposition itself (see [`sym_eigen`]).
fn compute_sym_eigen(a: &Mat) -> SymEigen {
    let n = a.rows;
    if n == 0 {
        return SymEigen { values: Vec::new(), vectors: Mat::zeros(0, 0) };
    }
    if !a.data.iter().all(|x| x.is_finite()) {
        return SymEigen::nan(n);
    }
    let amax = a.max_abs();
    let scale = if amax > 0.0 { 2f64.powi((amax.log2().round() as i32).clamp(-1000, 1000)) } else { 1.0 };
    let inv = 1.0 / scale;
    // Lower triangle of (A + Aᵀ)/2 / scale, column by column (faer reads only the lower triangle).
    let w = faer::Mat::<f64>::from_fn(n, n, |i, j| {
        if i >= j {
            (0.5 * (a.data[i * n + j] + a.data[j * n + i])) * inv
        } else {
            0.0
        }
    });
    let mut s = faer::Col::<f64>::zeros(n);
    let mut u = faer::Mat::<f64>::zeros(n, n);
    let mut buf =
        MemBuffer::new(self_adjoint_evd_scratch::<f64>(n, ComputeEigenvectors::Yes, PAR, Default::default()));
    let res = self_adjoint_evd(
        w.as_ref(),
        s.as_diagonal_mut(),
        Some(u.as_mut()),
        PAR,
        MemStack::new(&mut buf),
        Default::default(),
    );
    drop(w);
    if res.is_err() {
        return SymEigen::nan(n);
    }
    // Ascending order is part of this function's contract; faer's order is not documented as such, so
    // sort (stable, and in practice a no-op that skips the column permutation below).
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| s[x].total_cmp(&s[y]));
    let values: Vec<f64> = order.iter().map(|&k| s[k] * scale).collect();
    let vectors = if order.iter().enumerate().all(|(i, &k)| i == k) {
        Mat::from_faer(u.as_ref())
    } else {
        let mut v = Mat::zeros(n, n);
        for (dst, &src) in order.iter().enumerate() {
            v.view_mut().col_mut(dst).copy_from(u.col(src));
        }
        v
    };
    SymEigen { values, vectors }
}

// ---------------------------------------------------------------------------------------------
// Factor memo
// ---------------------------------------------------------------------------------------------

/// The identity of a matrix's content: its shape and a 128-bit hash of its values' bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatKey {
    /// Rows of the matrix.
    pub rows: usize,
    /// Columns of the matrix.
    pub cols: usize,
    /// Two independent 64-bit hashes over the bits of the row-major values.
    pub hash: [u64; 2],
}

impl MatKey {
    /// The key of `a` (one pass over its values; about 0.1 s for a 11,008² matrix).
    pub fn of(a: &Mat) -> MatKey {
        // Two multiply-xorshift lanes over the 64-bit words, seeded differently, then finalised
        // with the length; not cryptographic, but any change of any value changes both lanes.
        let (mut h0, mut h1) = (0x9e37_79b9_7f4a_7c15u64, 0xc2b2_ae3d_27d4_eb4fu64);
        for x in &a.data {
            let w = x.to_bits();
            h0 = (h0 ^ w).wrapping_mul(0x0100_0000_01b3).rotate_left(29);
            h1 = (h1 ^ w.rotate_left(17)).wrapping_mul(0xff51_afd7_ed55_8ccd).rotate_left(31);
        }
        let fin = |mut z: u64| {
            z ^= a.data.len() as u64;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        MatKey { rows: a.rows, cols: a.cols, hash: [fin(h0), fin(h1)] }
    }

    /// A file-name-safe rendering: `RxC-<32 hex digits>`.
    pub fn name(&self) -> String {
        format!("{}x{}-{:016x}{:016x}", self.rows, self.cols, self.hash[0], self.hash[1])
    }
}

/// A store of factorisations keyed by their input's content ([`MatKey`]), consulted by
/// [`Cholesky::new`] and [`sym_eigen`] while installed with [`with_factor_memo`]. A store must
/// return exactly the values it was given for a key (so that a stored factor is bit-identical
/// to a fresh one); failing to find or keep one is not an error.
pub trait FactorMemo {
    /// The Cholesky factor L stored for `key`, if any.
    fn cholesky(&self, key: &MatKey) -> Option<Mat>;
    /// Offers the Cholesky factor L of the matrix `key` identifies.
    fn put_cholesky(&self, key: &MatKey, l: &Mat);
    /// The eigendecomposition stored for `key`, if any.
    fn sym_eigen(&self, key: &MatKey) -> Option<SymEigen>;
    /// Offers the eigendecomposition of the matrix `key` identifies.
    fn put_sym_eigen(&self, key: &MatKey, e: &SymEigen);
}

thread_local! {
    static MEMO: RefCell<Option<Rc<dyn FactorMemo>>> = const { RefCell::new(None) };
}

fn current_memo() -> Option<Rc<dyn FactorMemo>> {
    MEMO.with(|m| m.borrow().clone())
}

/// Runs `f` with `memo` consulted by every [`Cholesky::new`] and [`sym_eigen`] on this thread
/// (the previous memo, if any, is restored afterwards, also on panic).
pub fn with_factor_memo<T>(memo: Rc<dyn FactorMemo>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Rc<dyn FactorMemo>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            MEMO.with(|m| *m.borrow_mut() = prev);
        }
    }
    let _restore = Restore(MEMO.with(|m| m.borrow_mut().replace(memo)));
    f()
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
                let c = dot(q, &y);
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
                        (dot(&self.rows[i], &self.rows[j]) - target).abs()
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
            let g = dot(&vectors[i], &vectors[j]);
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
                let c = dot(q, &v);
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
    #[ignore = "n = 1536 eigendecompositions take several seconds"]
    fn sym_eigen_large_1536() {
        // Indefinite, and above faer's divide-and-conquer threshold (128).
        let n = 1536;
        let a = random_sym(n, 1536);
        let eig = sym_eigen(&a);
        check_eigen(&a, &eig, 1e-9);
        let tr: f64 = (0..n).map(|i| a.get(i, i)).sum();
        assert!((tr - eig.values.iter().sum::<f64>()).abs() < 1e-9 * n as f64);
        // SPD at the model's width: Σ log λ agrees with the Cholesky log-determinant.
        let spd = random_spd(n, 1537);
        let eig = sym_eigen(&spd);
        check_eigen(&spd, &eig, 1e-9);
        let logdet: f64 = eig.values.iter().map(|l| l.ln()).sum();
        let chol = Cholesky::new(&spd).unwrap();
        assert!((logdet - chol.log_det()).abs() < 1e-9 * logdet.abs(), "{logdet} vs {}", chol.log_det());
        // Bit-identical on a second call.
        let again = sym_eigen(&spd);
        assert_eq!(bits(&again.values), bits(&eig.values));
        assert_eq!(bits(&again.vectors.data), bits(&eig.vectors.data));
    }

    fn bits(x: &[f64]) -> Vec<u64> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn results_are_bit_identical_across_calls_and_pools() {
        // Resume compares a run against itself: the same input must give the same bytes, whatever
        // rayon pool the call runs in.
        let n = 300;
        let a = random_spd(n, 42);
        let b = Rng(43).mat(n, 16);
        let v = Rng(44).vec(n);
        let run = || {
            let eig = sym_eigen(&a);
            let chol = Cholesky::new(&a).unwrap();
            let mut out = eig.values.clone();
            out.extend(&eig.vectors.data);
            out.extend(&chol.factor().data);
            out.extend(chol.solve(&v));
            out.extend(chol.solve_lower(&v));
            out.extend(chol.solve_mat(&b).data);
            out.extend(a.matmul(&b).data);
            out.extend(a.matvec(&v));
            out.push(dot(&v, &v));
            bits(&out)
        };
        let first = run();
        assert_eq!(first, run());
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            assert_eq!(first, pool.install(run), "{threads} threads");
        }
    }

    #[test]
    fn triangular_solves_and_matvec_t() {
        let n = 97;
        let a = random_spd(n, 8);
        let chol = Cholesky::new(&a).unwrap();
        let l = chol.factor();
        let b = Rng(12).vec(n);
        // L y = b and Lᵀ x = y, checked through products with L.
        let y = chol.solve_lower(&b);
        let ly = l.matvec(&y);
        assert!(ly.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-12), "L y ≠ b");
        // Several right-hand sides at once: each column solves its own system.
        let bs: Vec<Vec<f64>> = (0..5).map(|s| Rng(40 + s).vec(n)).collect();
        for (b, y) in bs.iter().zip(chol.solve_lower_many(&bs)) {
            let ly = l.matvec(&y);
            assert!(ly.iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-12), "L Y ≠ B");
        }
        let x = chol.solve_upper_t(&y);
        let ltx = l.matvec_t(&x);
        assert!(ltx.iter().zip(&y).all(|(p, q)| (p - q).abs() < 1e-12), "Lᵀ x ≠ y");
        // Whitening: ‖L⁻¹b‖² = bᵀA⁻¹b.
        let quad = dot(&b, &chol.solve(&b));
        assert!((dot(&y, &y) - quad).abs() < 1e-12 * quad);
        // log det against the product of the pivots of a diagonal matrix.
        let d = Mat::from_vec(3, 3, vec![2.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 5.0]);
        assert!((Cholesky::new(&d).unwrap().log_det() - 30f64.ln()).abs() < 1e-14);
        // Only the lower triangle is read.
        let mut lower_only = a.clone();
        for i in 0..n {
            for j in i + 1..n {
                lower_only.data[i * n + j] = f64::NAN;
            }
        }
        assert_eq!(Cholesky::new(&lower_only).unwrap().factor(), l);
        // Empty systems.
        let empty = Cholesky::new(&Mat::zeros(0, 0)).unwrap();
        assert_eq!(empty.dim(), 0);
        assert!(empty.solve(&[]).is_empty());
        assert_eq!(empty.solve_mat(&Mat::zeros(0, 4)), Mat::zeros(0, 4));
        assert_eq!(Mat::zeros(0, 3).matmul(&Mat::zeros(3, 2)), Mat::zeros(0, 2));
        assert_eq!(Mat::zeros(2, 0).matmul(&Mat::zeros(0, 2)), Mat::zeros(2, 2));
        assert_eq!(Mat::zeros(2, 0).matvec(&[]), vec![0.0, 0.0]);
        // matvec_t against the transpose.
        let r = Rng(13).mat(40, 70);
        let z = Rng(14).vec(40);
        let via_t = r.transpose().matvec(&z);
        for (p, q) in r.matvec_t(&z).iter().zip(&via_t) {
            assert!((p - q).abs() < 1e-13);
        }
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
