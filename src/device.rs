//! `--device` and `--dtype`: parsing, defaults, and a clear error for CUDA in a CPU-only build.

use std::str::FromStr;

use anyhow::{bail, Result};
use candle_core::{DType, Device};

use crate::errors::InputError;
use crate::model::HfConfig;

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => bail!("invalid device `{s}` (expected cpu, cuda or cuda:N)"),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device.
    pub fn to_device(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(InputError(format!(
                        "device cuda:{n} requested, but this oedit was built without CUDA; rebuild with \
                         `cargo build --release --features cuda`"
                    ))
                    .into());
                }
                Ok(Device::new_cuda(n)?)
            }
        }
    }
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => bail!("invalid dtype `{s}` (expected f32, bf16 or f16)"),
    }
}

/// Name of a dtype as `--dtype` spells it.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// f32 for models under 3B parameters on CPU, bf16 for larger ones and on GPUs.
pub fn default_dtype(cfg: &HfConfig, dev: &Device) -> DType {
    if dev.is_cpu() && cfg.parameter_count() < 3_000_000_000 {
        DType::F32
    } else {
        DType::BF16
    }
}
