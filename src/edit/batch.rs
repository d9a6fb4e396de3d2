//! The batch forms of the update rules: B edits (keys k_i, residuals r_i) solved jointly on the
//! same weights, ΔW = Σ_i r_i u_iᵀ. Every method's batch form is one of two solves, both done
//! here once:
//!
//! - the **ridge** form (MEMIT, AlphaEdit, soft O-Edit): for a symmetric positive-definite A kept
//!   as A⁻¹ and the keys' coordinates Y = [y_1 … y_B], the directions U = (A + Y Yᵀ)⁻¹ Y, i.e.
//!   ΔW = R Yᵀ(A + Y Yᵀ)⁻¹, the minimiser of ‖ΔW Y − R‖² + tr(ΔW A ΔWᵀ). By Woodbury,
//!   U = Z (I + YᵀZ)⁻¹ with Z = A⁻¹Y: one B×B solve, however wide the keys. With B = 1 this is
//!   A⁻¹y / (1 + yᵀA⁻¹y), the single-edit form.
//! - the **exact** form (ROME, O-Edit, O-Edit+): directions u_j in the span of given vectors v_m
//!   with u_jᵀa_i = δ_ij for the keys' coordinates a_i, i.e. U = V (AᵀV)⁻¹: every edit of the
//!   batch lands exactly (ΔW k_i = r_i) and whatever V avoids (the stored subspace) stays
//!   untouched. With B = 1 this is v / (aᵀv), the single-edit form.

use anyhow::{bail, Result};

use crate::linalg::{dot, Cholesky, Mat};

/// The inverse of a general square matrix, by Gauss–Jordan elimination with partial pivoting;
/// an error when it is singular (a pivot below 1e-300 or not finite).
pub fn invert(g: &Mat) -> Result<Mat> {
    let n = g.rows;
    if g.cols != n {
        bail!("cannot invert a {}×{} matrix", g.rows, g.cols);
    }
    let mut a = g.clone();
    let mut inv = Mat::identity(n);
    for c in 0..n {
        let p = (c..n).max_by(|&i, &j| a.get(i, c).abs().total_cmp(&a.get(j, c).abs())).unwrap_or(c);
        let pivot = a.get(p, c);
        if !(pivot.is_finite() && pivot.abs() > 1e-300) {
            bail!("the batch's joint system is singular (pivot {pivot:.3e} in column {c})");
        }
        if p != c {
            for m in [&mut a, &mut inv] {
                for j in 0..n {
                    let (x, y) = (m.get(c, j), m.get(p, j));
                    m.set(c, j, y);
                    m.set(p, j, x);
                }
            }
        }
        for m in [&mut a, &mut inv] {
            m.row_mut(c).iter_mut().for_each(|x| *x /= pivot);
        }
        for i in (0..n).filter(|&i| i != c) {
            let f = a.get(i, c);
            if f == 0.0 {
                continue;
            }
            for m in [&mut a, &mut inv] {
                let src = m.row(c).to_vec();
                m.row_mut(i).iter_mut().zip(&src).for_each(|(x, s)| *x -= f * s);
            }
        }
    }
    Ok(inv)
}

/// Σ_m v_m X[m][j] for every column j of X (B×B): the columns of V X.
fn combine(v: &[Vec<f64>], x: &Mat) -> Vec<Vec<f64>> {
    let width = v.first().map_or(0, Vec::len);
    (0..x.cols)
        .map(|j| {
            let mut u = vec![0.0; width];
            for (m, vm) in v.iter().enumerate() {
                let c = x.get(m, j);
                u.iter_mut().zip(vm).for_each(|(a, b)| *a += c * b);
            }
            u
        })
        .collect()
}

/// The ridge form: the columns Z (c·I + YᵀZ)⁻¹ from `y` (the keys' coordinates) and `z` = A⁻¹y
/// for each; with c = 1 they are (A + Y Yᵀ)⁻¹ Y (see the module documentation), and with
/// Z = C⁻¹Y and c = λ they are (λC + Y Yᵀ)⁻¹ Y (MEMIT). The B×B matrix is symmetric positive
/// definite when A is and c > 0; an error when it is not (degenerate statistics).
pub fn ridge_joint(y: &[Vec<f64>], z: &[Vec<f64>], c: f64) -> Result<Vec<Vec<f64>>> {
    let b = y.len();
    if z.len() != b {
        bail!("internal error: {b} keys, {} solved keys", z.len());
    }
    let mut g = Mat::identity(b);
    g.data.iter_mut().for_each(|x| *x *= c);
    for i in 0..b {
        for j in 0..=i {
            let s = 0.5 * (dot(&y[i], &z[j]) + dot(&y[j], &z[i]));
            g.set(i, j, g.get(i, j) + s);
            if i != j {
                g.set(j, i, g.get(j, i) + s);
            }
        }
    }
    let chol = Cholesky::new(&g)
        .map_err(|e| anyhow::anyhow!("the batch's joint system is not positive definite: {e}"))?;
    Ok(combine(z, &chol.solve_mat(&Mat::identity(b))))
}

/// The exact form's directions and, per record, its **retained** share.
#[derive(Debug, Clone)]
pub struct ExactJoint {
    /// u_j (in the coordinates of `v`), with u_jᵀ a_i = δ_ij.
    pub u: Vec<Vec<f64>>,
    /// (G⁻¹)_jj with G = AᵀV: 1 / (the part of key j's energy left once the stored subspace
    /// and the batch's other keys are taken out).
    pub inverse_diagonal: Vec<f64>,
}

/// The exact form: U = V (AᵀV)⁻¹ for keys' coordinates `a` and directions `v` (see the module
/// documentation); an error when AᵀV is singular.
pub fn exact_joint(a: &[Vec<f64>], v: &[Vec<f64>]) -> Result<ExactJoint> {
    let b = a.len();
    if v.len() != b {
        bail!("internal error: {b} keys, {} directions", v.len());
    }
    let mut g = Mat::zeros(b, b);
    for (i, ai) in a.iter().enumerate() {
        for (j, vj) in v.iter().enumerate() {
            g.set(i, j, dot(ai, vj));
        }
    }
    let inv = invert(&g)?;
    Ok(ExactJoint { u: combine(v, &inv), inverse_diagonal: (0..b).map(|j| inv.get(j, j)).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vecs(seed: usize, n: usize, f: usize) -> Vec<Vec<f64>> {
        (0..n)
            .map(|i| {
                (0..f).map(|j| (((i + seed) * 31 + j * 17 + i * j * 7) % 23) as f64 / 11.0 - 1.0).collect()
            })
            .collect()
    }

    #[test]
    fn invert_gives_the_inverse() {
        let g = Mat::from_vec(3, 3, vec![0.0, 2.0, 1.0, 1.0, 0.0, 3.0, 4.0, 1.0, 0.0]);
        let inv = invert(&g).unwrap();
        let p = g.matmul(&inv);
        for i in 0..3 {
            for j in 0..3 {
                assert!((p.get(i, j) - (i == j) as u8 as f64).abs() < 1e-12);
            }
        }
        assert!(invert(&Mat::from_vec(2, 2, vec![1.0, 2.0, 2.0, 4.0])).is_err());
    }

    #[test]
    fn ridge_joint_solves_the_normal_equation() {
        // A = diag(1..f) + 0.5: (A + Y Yᵀ) U = Y column by column.
        let f = 7;
        let y = vecs(1, 3, f);
        let a_diag: Vec<f64> = (0..f).map(|i| 1.5 + i as f64).collect();
        let z: Vec<Vec<f64>> =
            y.iter().map(|yi| yi.iter().zip(&a_diag).map(|(x, a)| x / a).collect()).collect();
        let u = ridge_joint(&y, &z, 1.0).unwrap();
        for (j, uj) in u.iter().enumerate() {
            for r in 0..f {
                let lhs = a_diag[r] * uj[r] + y.iter().map(|ym| ym[r] * dot(ym, uj)).sum::<f64>();
                assert!((lhs - y[j][r]).abs() < 1e-10, "column {j} row {r}");
            }
        }
        // B = 1 is the single-edit form A⁻¹y / (1 + yᵀA⁻¹y).
        let one = ridge_joint(&y[..1], &z[..1], 1.0).unwrap();
        let q = dot(&y[0], &z[0]);
        for (a, b) in one[0].iter().zip(&z[0]) {
            assert!((a - b / (1.0 + q)).abs() < 1e-12);
        }
    }

    #[test]
    fn exact_joint_lands_every_key() {
        let a = vecs(2, 4, 9);
        let v = vecs(5, 4, 9);
        let j = exact_joint(&a, &v).unwrap();
        for (i, ai) in a.iter().enumerate() {
            for (k, uk) in j.u.iter().enumerate() {
                assert!((dot(uk, ai) - (i == k) as u8 as f64).abs() < 1e-10);
            }
        }
    }
}
