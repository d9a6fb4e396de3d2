//! Stable 64-bit FNV-1a hashing, and a model fingerprint that changes when the weights or the
//! configuration change (used to key caches and to guard run directories).

use anyhow::Result;
use candle_core::DType;

use crate::model::Llama;

/// FNV-1a, 64 bit.
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    /// Feeds bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    /// The hash.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// Hex fingerprint of a model: its configuration plus the first and last 4096 values of every
/// weight tensor (cheap, and different for any two real checkpoints).
pub fn model_fingerprint(model: &Llama) -> Result<String> {
    let mut h = Fnv::new();
    let mut cfg = model.config().clone();
    cfg.torch_dtype = None;
    h.write(serde_json::to_string(&cfg)?.as_bytes());
    for (name, t) in model.named_weights() {
        h.write(name.as_bytes());
        let flat = t.flatten_all()?;
        let n = flat.dim(0)?;
        let k = n.min(4096);
        for part in [flat.narrow(0, 0, k)?, flat.narrow(0, n - k, k)?] {
            let v: Vec<f32> = part.to_dtype(DType::F32)?.to_vec1()?;
            for x in v {
                h.write(&x.to_le_bytes());
            }
        }
    }
    Ok(format!("{:016x}", h.finish()))
}
