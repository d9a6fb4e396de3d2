//! The on-disk store of the factorisations the methods build from the key statistics at every
//! session start: the Cholesky factor of the regularised C (every method but the AlphaEdits), and
//! the symmetric eigendecomposition (`alphaedit` per layer, `alphaedit-single`, and `oedit-plus` with `core_energy` > 0).
//!
//! At Llama-2-7B's width (f = 11,008) they take 20 s and 611 s on one thread; a resumed or
//! second session over the same statistics reads them back instead (about 1 GB each).
//!
//! Entries are keyed by the **content** of the factorised matrix ([`MatKey`]: shape and a
//! 128-bit hash of its values), not by a name: the statistics' fingerprint, the regularisation
//! and anything else that shapes the matrix are all covered, and a stale entry can never be
//! picked up. Files live beside the statistics cache (`<stats cache>/factors/`), are written
//! atomically, and an unreadable one is ignored with a warning (and rewritten). The stored values
//! are the computed ones bit for bit, so resume stays bit-exact.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{bail, Context, Result};

use crate::linalg::{FactorMemo, Mat, MatKey, SymEigen};
use crate::loader::reader::TensorFiles;
use crate::tensor_file::{self, Data};

/// Bumped when the factorisation code changes its output (another faer version, another
/// algorithm): older entries are then no longer found.
const ALGORITHM: &str = "faer0.24-seq1";

/// A directory of cached factorisations.
pub struct FactorCache {
    dir: PathBuf,
}

impl FactorCache {
    /// The cache beside the key statistics: `<stats cache dir>/factors`.
    pub fn beside_stats() -> Self {
        Self::at(crate::stats::cache_dir().join("factors"))
    }

    /// A cache in `dir` (created on the first write).
    pub fn at(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// This cache as the factor memo of [`crate::linalg::with_factor_memo`].
    pub fn into_memo(self) -> Rc<dyn FactorMemo> {
        Rc::new(self)
    }

    fn path(&self, kind: &str, key: &MatKey) -> PathBuf {
        self.dir.join(format!("{kind}-{}-{ALGORITHM}.safetensors", key.name()))
    }

    fn key_values(key: &MatKey) -> [i64; 4] {
        [key.rows as i64, key.cols as i64, key.hash[0] as i64, key.hash[1] as i64]
    }

    /// Opens an entry and checks that it was written for `key`.
    fn open(&self, kind: &str, key: &MatKey) -> Result<Option<(PathBuf, TensorFiles)>> {
        let path = self.path(kind, key);
        if !path.is_file() {
            return Ok(None);
        }
        crate::loader::hf::check_safetensors(&path)?;
        let files = TensorFiles::open(std::slice::from_ref(&path))?;
        let stored: Vec<i64> = files.load("key", &candle_core::Device::Cpu)?.to_vec1()?;
        if stored != Self::key_values(key) {
            bail!("{}: written for another matrix", path.display());
        }
        Ok(Some((path, files)))
    }

    fn read_cholesky(&self, key: &MatKey) -> Result<Option<Mat>> {
        let Some((path, files)) = self.open("cholesky", key)? else { return Ok(None) };
        let n = key.rows;
        // Unpacked row by row as the blocks arrive: no packed copy is held.
        let mut l = Mat::zeros(n, n);
        let (mut row, mut col) = (0usize, 0usize);
        let shape = files.visit_f64("lower", |block| {
            for &x in block {
                if row >= n {
                    bail!("more values than a {n}×{n} triangle holds");
                }
                l.row_mut(row)[col] = x;
                col += 1;
                if col > row {
                    row += 1;
                    col = 0;
                }
            }
            Ok(())
        })?;
        if shape != [n * (n + 1) / 2] || row != n {
            bail!("{}: `lower` has shape {shape:?}, not [{}]", path.display(), n * (n + 1) / 2);
        }
        Ok(Some(l))
    }

    fn write_cholesky(&self, key: &MatKey, l: &Mat) -> Result<()> {
        let n = l.rows;
        // The factor is lower-triangular (its upper triangle exactly zero): only the lower
        // triangle is stored, row by row.
        if (0..n).any(|i| l.row(i)[i + 1..].iter().any(|&x| x.to_bits() != 0)) {
            bail!("the Cholesky factor has a non-zero upper triangle");
        }
        let rows: Vec<&[f64]> = (0..n).map(|i| &l.row(i)[..=i]).collect();
        self.write("cholesky", key, &[Data::F64Parts("lower", vec![n * (n + 1) / 2], rows)])
    }

    fn read_eigen(&self, key: &MatKey) -> Result<Option<SymEigen>> {
        let Some((path, files)) = self.open("eigen", key)? else { return Ok(None) };
        let n = key.rows;
        let (vs, values) = files.read_f64("values")?;
        let (ms, vectors) = files.read_f64("vectors")?;
        if vs != [n] || ms != [n, n] {
            bail!("{}: shapes {vs:?} and {ms:?} do not fit a {n}×{n} matrix", path.display());
        }
        Ok(Some(SymEigen { values, vectors: Mat::from_vec(n, n, vectors) }))
    }

    fn write_eigen(&self, key: &MatKey, e: &SymEigen) -> Result<()> {
        let n = e.values.len();
        self.write(
            "eigen",
            key,
            &[Data::F64("values", vec![n], &e.values), Data::F64("vectors", vec![n, n], &e.vectors.data)],
        )
    }

    fn write(&self, kind: &str, key: &MatKey, tensors: &[Data<'_>]) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("{}: cannot create the factor cache", self.dir.display()))?;
        let kv = Self::key_values(key);
        let mut all = vec![Data::I64("key", vec![4], &kv)];
        all.extend(tensors.iter().map(|t| match t {
            Data::F64(n, s, v) => Data::F64(n, s.clone(), v),
            Data::I64(n, s, v) => Data::I64(n, s.clone(), v),
            Data::F64Parts(n, s, p) => Data::F64Parts(n, s.clone(), p.clone()),
        }));
        tensor_file::write(&self.path(kind, key), &all)
    }
}

fn warn(what: &str, path: &Path, e: anyhow::Error) {
    eprintln!("warning: {what} {}: {e:#}", path.display());
}

impl FactorMemo for FactorCache {
    fn cholesky(&self, key: &MatKey) -> Option<Mat> {
        self.read_cholesky(key).unwrap_or_else(|e| {
            warn("ignoring unreadable factor cache", &self.path("cholesky", key), e);
            None
        })
    }

    fn put_cholesky(&self, key: &MatKey, l: &Mat) {
        if let Err(e) = self.write_cholesky(key, l) {
            warn("could not cache the Cholesky factor in", &self.dir, e);
        }
    }

    fn sym_eigen(&self, key: &MatKey) -> Option<SymEigen> {
        self.read_eigen(key).unwrap_or_else(|e| {
            warn("ignoring unreadable factor cache", &self.path("eigen", key), e);
            None
        })
    }

    fn put_sym_eigen(&self, key: &MatKey, e: &SymEigen) {
        if let Err(err) = self.write_eigen(key, e) {
            warn("could not cache the eigendecomposition in", &self.dir, err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::{sym_eigen, with_factor_memo, Cholesky};

    /// A symmetric positive-definite matrix with distinct eigenvalues.
    fn spd(n: usize, seed: u64) -> Mat {
        let mut s = seed;
        let mut g = Mat::zeros(n, n + 3);
        for x in g.data.iter_mut() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *x = ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5;
        }
        let mut a = g.matmul(&g.transpose());
        a.add_diagonal(0.1);
        a
    }

    fn bits(m: &Mat) -> Vec<u64> {
        m.data.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn a_cached_cholesky_factor_is_bit_identical_to_a_fresh_one() {
        let dir = tempfile::tempdir().unwrap();
        let a = spd(150, 1);
        let fresh = Cholesky::new(&a).unwrap();
        let first =
            with_factor_memo(FactorCache::at(dir.path().into()).into_memo(), || Cholesky::new(&a).unwrap());
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 1, "one entry written");
        // The second call reads the entry: prove it by corrupting nothing but checking the
        // bytes, then by making the stored factor differ and seeing it come back.
        let cached =
            with_factor_memo(FactorCache::at(dir.path().into()).into_memo(), || Cholesky::new(&a).unwrap());
        assert_eq!(bits(first.factor()), bits(fresh.factor()));
        assert_eq!(bits(cached.factor()), bits(fresh.factor()));
        let key = MatKey::of(&a);
        let cache = FactorCache::at(dir.path().into());
        let mut planted = fresh.factor().clone();
        planted.set(3, 2, 42.0);
        cache.write_cholesky(&key, &planted).unwrap();
        let read = with_factor_memo(cache.into_memo(), || Cholesky::new(&a).unwrap());
        assert_eq!(read.factor().get(3, 2), 42.0, "the entry is read, not recomputed");
        // Another matrix (one value changed) has another key and is computed afresh.
        let mut b = a.clone();
        b.set(0, 0, a.get(0, 0) + 1e-9);
        let fresh_b = Cholesky::new(&b).unwrap();
        let cached_b =
            with_factor_memo(FactorCache::at(dir.path().into()).into_memo(), || Cholesky::new(&b).unwrap());
        assert_eq!(bits(cached_b.factor()), bits(fresh_b.factor()));
    }

    #[test]
    fn a_cached_eigendecomposition_is_bit_identical_and_bad_entries_are_recomputed() {
        let dir = tempfile::tempdir().unwrap();
        let a = spd(140, 7);
        let fresh = sym_eigen(&a);
        let memo = || FactorCache::at(dir.path().into()).into_memo();
        let first = with_factor_memo(memo(), || sym_eigen(&a));
        let again = with_factor_memo(memo(), || sym_eigen(&a));
        for e in [&first, &again] {
            assert_eq!(
                e.values.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                fresh.values.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(bits(&e.vectors), bits(&fresh.vectors));
        }
        // A truncated entry is ignored (and replaced by a fresh computation).
        let path = FactorCache::at(dir.path().into()).path("eigen", &MatKey::of(&a));
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len / 2).unwrap();
        let redone = with_factor_memo(memo(), || sym_eigen(&a));
        assert_eq!(bits(&redone.vectors), bits(&fresh.vectors));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len, "rewritten whole");
    }

    #[test]
    fn the_memo_is_scoped_to_the_closure() {
        let dir = tempfile::tempdir().unwrap();
        let a = spd(20, 3);
        with_factor_memo(FactorCache::at(dir.path().into()).into_memo(), || Cholesky::new(&a).unwrap());
        let n = std::fs::read_dir(dir.path()).unwrap().count();
        Cholesky::new(&spd(21, 3)).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), n, "no memo outside the closure");
    }
}
