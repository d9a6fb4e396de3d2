//! Writing f64/i64 tensors as a safetensors file without a second copy of the data: the header,
//! then each tensor's values encoded a block at a time. Used for the multi-gigabyte host
//! matrices of the caches (key statistics, factorisations); read back with
//! [`crate::loader::reader::TensorFiles::read_f64`].

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Result};
use serde_json::json;

use crate::fsutil::atomic_write_with;

/// One tensor to write: its name, shape and values.
pub enum Data<'a> {
    /// f64 values (row-major).
    F64(&'a str, Vec<usize>, &'a [f64]),
    /// i64 values (row-major).
    I64(&'a str, Vec<usize>, &'a [i64]),
    /// f64 values given as consecutive pieces (e.g. the rows of a triangle), written as one
    /// tensor without gathering them first.
    F64Parts(&'a str, Vec<usize>, Vec<&'a [f64]>),
}

impl Data<'_> {
    fn parts(&self) -> (&str, &'static str, &[usize], usize) {
        match self {
            Data::F64(n, s, v) => (n, "F64", s, v.len()),
            Data::I64(n, s, v) => (n, "I64", s, v.len()),
            Data::F64Parts(n, s, parts) => (n, "F64", s, parts.iter().map(|p| p.len()).sum()),
        }
    }
}

/// Values encoded per write.
const BLOCK: usize = 1 << 16;

/// Atomically writes `tensors` to `path` in the safetensors format (in the order given).
pub fn write(path: &Path, tensors: &[Data<'_>]) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for t in tensors {
        let (name, dtype, shape, len) = t.parts();
        if shape.iter().product::<usize>() != len {
            bail!("tensor `{name}`: shape {shape:?} does not hold {len} values");
        }
        header.insert(
            name.to_string(),
            json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len * 8] }),
        );
        offset += len * 8;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header))?;
    h.resize(h.len().next_multiple_of(8), b' ');
    atomic_write_with(path, |tmp| {
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(tmp)?);
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(&h)?;
        let mut buf = Vec::with_capacity(BLOCK * 8);
        for t in tensors {
            match t {
                Data::F64(_, _, v) => {
                    for block in v.chunks(BLOCK) {
                        buf.clear();
                        block.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                        f.write_all(&buf)?;
                    }
                }
                Data::I64(_, _, v) => {
                    for block in v.chunks(BLOCK) {
                        buf.clear();
                        block.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                        f.write_all(&buf)?;
                    }
                }
                Data::F64Parts(_, _, parts) => {
                    buf.clear();
                    for x in parts.iter().flat_map(|p| p.iter()) {
                        buf.extend_from_slice(&x.to_le_bytes());
                        if buf.len() >= BLOCK * 8 {
                            f.write_all(&buf)?;
                            buf.clear();
                        }
                    }
                    f.write_all(&buf)?;
                }
            }
        }
        f.flush()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::reader::TensorFiles;
    use candle_core::Device;

    #[test]
    fn round_trips_through_candle_and_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let a: Vec<f64> = (0..200_000).map(|i| (i as f64).sin() * 1e-300 + i as f64).collect();
        let parts: Vec<&[f64]> = a.chunks(333).collect();
        write(
            &p,
            &[
                Data::F64("a", vec![400, 500], &a),
                Data::I64("n", vec![2], &[-3, i64::MAX]),
                Data::F64Parts("parts", vec![200_000], parts),
            ],
        )
        .unwrap();
        let m = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
        assert_eq!(m["n"].to_vec1::<i64>().unwrap(), vec![-3, i64::MAX]);
        let files = TensorFiles::open(std::slice::from_ref(&p)).unwrap();
        let (shape, back) = files.read_f64("a").unwrap();
        assert_eq!(shape, vec![400, 500]);
        assert!(back.iter().zip(&a).all(|(x, y)| x.to_bits() == y.to_bits()));
        let (shape, joined) = files.read_f64("parts").unwrap();
        assert_eq!(shape, vec![200_000]);
        assert!(joined.iter().zip(&a).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(files.read_f64("n").is_err());
        assert!(write(&p, &[Data::F64("a", vec![3], &a[..2])]).is_err());
    }
}
