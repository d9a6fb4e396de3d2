//! Reading safetensors weights one tensor at a time, with plain positioned reads instead of a
//! memory map.
//!
//! candle's memory-mapped loader copies each tensor out of the mapping, and the mapped pages it
//! touched stay resident (and count in the process RSS) until the mapping is dropped after the
//! whole model is built: a 13.5 GB bf16 checkpoint then peaks at about twice its size.
//! [`TensorFiles`] reads each tensor's bytes straight into the buffer the tensor is built from,
//! so the loader holds the model plus one tensor (and its dtype conversion) at most.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

/// Where one tensor lies: its file, dtype, shape and absolute byte range.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

/// The tensors of a set of safetensors files (one model, possibly sharded), indexed by name and
/// read on request.
pub struct TensorFiles {
    files: Vec<(PathBuf, File)>,
    entries: HashMap<String, Entry>,
}

fn parse_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "F32" => DType::F32,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

impl TensorFiles {
    /// Opens `paths` and indexes their headers. A name present in two files is an error.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
            for (name, e) in read_header(path, &file, i)? {
                if entries.insert(name.clone(), e).is_some() {
                    bail!("{}: tensor `{name}` is also in another weights file", path.display());
                }
            }
            files.push((path.clone(), file));
        }
        Ok(Self { files, entries })
    }

    /// The tensor `name` in its stored dtype, on `device`.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let e = self.entries.get(name).with_context(|| format!("no tensor `{name}` in the weights"))?;
        let (path, file) = &self.files[e.file];
        let mut bytes = vec![0u8; (e.end - e.start) as usize];
        file.read_exact_at(&mut bytes, e.start)
            .with_context(|| format!("{}: cannot read tensor `{name}`", path.display()))?;
        Tensor::from_raw_buffer(&bytes, e.dtype, &e.shape, device)
            .with_context(|| format!("{}: tensor `{name}` has a bad size", path.display()))
    }

    /// The f64 tensor `name` as its shape and row-major values, read straight into the returned
    /// vector (no intermediate copy of the bytes).
    pub fn read_f64(&self, name: &str) -> Result<(Vec<usize>, Vec<f64>)> {
        let mut out = Vec::new();
        let shape = self.visit_f64(name, |block| {
            out.extend_from_slice(block);
            Ok(())
        })?;
        Ok((shape, out))
    }

    /// Streams the f64 tensor `name`: `visit` gets its row-major values in order, a block of at
    /// most 1 Mi values at a time. Returns the tensor's shape.
    pub fn visit_f64(&self, name: &str, mut visit: impl FnMut(&[f64]) -> Result<()>) -> Result<Vec<usize>> {
        let e = self.entries.get(name).with_context(|| format!("no tensor `{name}` in the file"))?;
        let (path, file) = &self.files[e.file];
        if e.dtype != DType::F64 {
            bail!("{}: tensor `{name}` is {:?}, not F64", path.display(), e.dtype);
        }
        let mut buf = vec![0u8; 8 << 20];
        let mut values = Vec::with_capacity(1 << 20);
        let mut pos = e.start;
        while pos < e.end {
            let len = (buf.len() as u64).min(e.end - pos) as usize;
            file.read_exact_at(&mut buf[..len], pos)
                .with_context(|| format!("{}: cannot read tensor `{name}`", path.display()))?;
            values.clear();
            values.extend(
                buf[..len].chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))),
            );
            visit(&values)?;
            pos += len as u64;
        }
        Ok(e.shape.clone())
    }

    /// Whether a tensor called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

/// The tensors listed in one file's header, with absolute byte ranges checked against the file.
fn read_header(path: &Path, file: &File, index: usize) -> Result<Vec<(String, Entry)>> {
    let size = file.metadata()?.len();
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0)
        .with_context(|| format!("{}: shorter than its header", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > size.saturating_sub(8) || n > 100_000_000 {
        bail!("{}: corrupt safetensors (header length {n}, file size {size})", path.display());
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8)?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .with_context(|| format!("{}: corrupt safetensors (header is not JSON)", path.display()))?;
    let obj = v.as_object().with_context(|| format!("{}: header is not an object", path.display()))?;
    let base = 8 + n;
    let mut out = Vec::with_capacity(obj.len());
    for (name, t) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
        let bad = || format!("{}: bad header entry for `{name}`", path.display());
        let dtype_name = t.get("dtype").and_then(|d| d.as_str()).with_context(bad)?;
        let dtype = parse_dtype(dtype_name)
            .with_context(|| format!("{}: `{name}` has unsupported dtype {dtype_name}", path.display()))?;
        let shape: Vec<usize> = t
            .get("shape")
            .and_then(|s| s.as_array())
            .with_context(bad)?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .with_context(bad)?;
        let offs = t.get("data_offsets").and_then(|o| o.as_array()).with_context(bad)?;
        let (Some(a), Some(b)) =
            (offs.first().and_then(|x| x.as_u64()), offs.get(1).and_then(|x| x.as_u64()))
        else {
            bail!(bad());
        };
        // Checked: a corrupt shape or offset must not wrap around to a range that fits.
        let want = shape.iter().try_fold(dtype.size_in_bytes() as u64, |acc, &d| acc.checked_mul(d as u64));
        if b < a || Some(b - a) != want || base.checked_add(b).is_none_or(|end| end > size) {
            bail!("{}: `{name}` has a byte range that does not match its shape or the file", path.display());
        }
        out.push((name.clone(), Entry { file: index, dtype, shape, start: base + a, end: base + b }));
    }
    Ok(out)
}

impl SimpleBackend for TensorFiles {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        // Read on the host, move, then convert on the device (as candle's own loaders do).
        let t = self.load(name, &Device::Cpu).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        t.to_device(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_candle_wrote_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 12.0, &dev).unwrap().reshape((3, 4)).unwrap();
        let b = Tensor::arange(0f32, 5.0, &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let c = Tensor::new(&[7i64, -1], &dev).unwrap();
        let p1 = dir.path().join("a.safetensors");
        let p2 = dir.path().join("b.safetensors");
        candle_core::safetensors::save(&HashMap::from([("a".to_string(), a.clone())]), &p1).unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("b".to_string(), b.clone()), ("c".to_string(), c.clone())]),
            &p2,
        )
        .unwrap();
        let files = TensorFiles::open(&[p1.clone(), p2]).unwrap();
        assert!(files.contains("b") && !files.contains("d"));
        let got_a = files.get(Shape::from((3, 4)), "a", Default::default(), DType::F32, &dev).unwrap();
        assert_eq!(got_a.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        let got_b = files.get_unchecked("b", DType::F32, &dev).unwrap();
        assert_eq!(got_b.to_vec1::<f32>().unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(files.load("c", &dev).unwrap().to_vec1::<i64>().unwrap(), vec![7, -1]);
        assert!(files.get(Shape::from((4, 3)), "a", Default::default(), DType::F32, &dev).is_err());
        // The same name in two files is refused.
        assert!(TensorFiles::open(&[p1.clone(), p1]).is_err());
    }

    #[test]
    fn refuses_a_truncated_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let a = Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("a".to_string(), a)]), &p).unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 4).unwrap();
        assert!(TensorFiles::open(&[p]).is_err());
    }
}
