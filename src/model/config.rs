//! Model configuration: the serde mirror of Hugging Face `config.json` and the runtime `Config`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Architectures whose weights and forward pass match our Llama implementation.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM"];

/// A token id or a list of them (Llama-3 lists several EOS ids).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    /// The first id.
    pub fn first(&self) -> Option<u32> {
        match self {
            TokenIds::One(id) => Some(*id),
            TokenIds::Many(ids) => ids.first().copied(),
        }
    }
}

/// Rope scaling as written in `config.json` (`rope_scaling`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_act() -> String {
    "silu".to_string()
}

/// The fields of a Hugging Face Llama/Mistral `config.json` that oedit reads (and writes on export).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    /// transformers ≥ 5 writes `rope_theta` and the scaling here; folded into `rope_theta` and
    /// `rope_scaling` when the config is read (never written back).
    #[serde(default, skip_serializing)]
    pub rope_parameters: Option<serde_json::Value>,
}

impl HfConfig {
    /// Parses `config.json` text; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let raw: serde_json::Value =
            serde_json::from_str(text).with_context(|| format!("{origin}: not valid JSON"))?;
        let has_theta = raw.get("rope_theta").is_some();
        let has_scaling = raw.get("rope_scaling").is_some_and(|v| !v.is_null());
        // Parsed from the text (not the Value) so that a wrong field type is reported with its
        // line and column.
        let mut cfg: HfConfig =
            serde_json::from_str(text).with_context(|| format!("{origin}: not a valid model config"))?;
        if let Some(rp) = cfg.rope_parameters.take() {
            if !has_theta {
                if let Some(theta) = rp.get("rope_theta").and_then(|v| v.as_f64()) {
                    cfg.rope_theta = theta;
                }
            }
            let kind = rp.get("rope_type").and_then(|v| v.as_str()).unwrap_or("default");
            if !has_scaling && kind != "default" {
                let scaling = serde_json::from_value(rp.clone()).with_context(|| {
                    format!("{origin}: field `rope_parameters` is not a valid rope scaling")
                })?;
                cfg.rope_scaling = Some(scaling);
            }
        }
        cfg.validate().with_context(|| format!("{origin}: unsupported model config"))?;
        Ok(cfg)
    }

    /// Checks the architecture and the shape fields.
    pub fn validate(&self) -> Result<()> {
        if let Some(arch) = self.architectures.first() {
            if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
                bail!(
                    "architecture `{arch}` is not supported (supported: {})",
                    SUPPORTED_ARCHITECTURES.join(", ")
                );
            }
        } else if let Some(mt) = &self.model_type {
            if mt != "llama" && mt != "mistral" {
                bail!("model_type `{mt}` is not supported (supported: llama, mistral)");
            }
        }
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("vocab_size", self.vocab_size),
        ];
        for (name, v) in sizes {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        for (name, ids) in [("bos_token_id", &self.bos_token_id), ("eos_token_id", &self.eos_token_id)] {
            let ids: &[u32] = match ids {
                None => &[],
                Some(TokenIds::One(id)) => std::slice::from_ref(id),
                Some(TokenIds::Many(v)) => v,
            };
            if let Some(id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
                bail!("{name} {id} is not below vocab_size {}", self.vocab_size);
            }
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!("rope_theta must be a positive number, got {}", self.rope_theta);
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            bail!("rms_norm_eps must be a positive number, got {}", self.rms_norm_eps);
        }
        if self.sliding_window == Some(0) || self.max_position_embeddings == Some(0) {
            bail!("sliding_window and max_position_embeddings must be at least 1 when given");
        }
        if self.hidden_act != "silu" {
            bail!("hidden_act `{}` is not supported (only silu)", self.hidden_act);
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads) && self.head_dim.is_none()
        {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        let kv = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("head_dim {} must be even for rotary embeddings", self.head_dim());
        }
        if let Some(rs) = &self.rope_scaling {
            let factors = [
                ("factor", rs.factor),
                ("low_freq_factor", rs.low_freq_factor),
                ("high_freq_factor", rs.high_freq_factor),
            ];
            for (name, v) in factors {
                if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                    bail!("rope_scaling.{name} must be a positive number, got {}", v.unwrap_or_default());
                }
            }
            match rs.rope_type.as_str() {
                "default" => {}
                "linear" => {
                    rs.factor.context("rope_scaling.factor is missing")?;
                }
                "llama3" => {
                    rs.factor.context("rope_scaling.factor is missing")?;
                    rs.low_freq_factor.context("rope_scaling.low_freq_factor is missing")?;
                    rs.high_freq_factor.context("rope_scaling.high_freq_factor is missing")?;
                    let orig = rs
                        .original_max_position_embeddings
                        .context("rope_scaling.original_max_position_embeddings is missing")?;
                    if orig == 0 || rs.high_freq_factor <= rs.low_freq_factor {
                        bail!(
                            "rope_scaling: original_max_position_embeddings must be at least 1 and \
                             high_freq_factor above low_freq_factor"
                        );
                    }
                }
                other => bail!("rope_scaling type `{other}` is not supported (default, linear, llama3)"),
            }
        }
        Ok(())
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Number of key/value heads (grouped-query attention).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Number of parameters (embeddings counted once when tied).
    pub fn parameter_count(&self) -> u64 {
        let d = self.hidden_size as u64;
        let f = self.intermediate_size as u64;
        let hd = self.head_dim() as u64;
        let q = self.num_attention_heads as u64 * hd;
        let kv = self.kv_heads() as u64 * hd;
        let per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d;
        let emb = self.vocab_size as u64 * d;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        per_layer * self.num_hidden_layers as u64 + emb + head + d
    }

    /// Inverse rotary frequencies (length head_dim/2), with rope scaling applied.
    pub fn inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim();
        let base: Vec<f64> =
            (0..hd / 2).map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / hd as f64)).collect();
        let Some(rs) = &self.rope_scaling else {
            return base;
        };
        match rs.rope_type.as_str() {
            "linear" => {
                let factor = rs.factor.unwrap_or(1.0);
                base.into_iter().map(|f| f / factor).collect()
            }
            "llama3" => {
                let factor = rs.factor.unwrap_or(1.0);
                let low = rs.low_freq_factor.unwrap_or(1.0);
                let high = rs.high_freq_factor.unwrap_or(4.0);
                let orig = rs.original_max_position_embeddings.unwrap_or(8192) as f64;
                let low_wavelen = orig / low;
                let high_wavelen = orig / high;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (orig / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            _ => base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama31_like() -> HfConfig {
        HfConfig::from_json(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"intermediate_size":14336,
                "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"vocab_size":128256,
                "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
                "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
            "test",
        )
        .unwrap()
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_and_divides_low_frequencies() {
        let cfg = llama31_like();
        let scaled = cfg.inv_freq();
        let mut plain_cfg = cfg.clone();
        plain_cfg.rope_scaling = None;
        let plain = plain_cfg.inv_freq();
        assert_eq!(scaled.len(), 64);
        // Wavelengths shorter than 8192/4 = 2048 tokens are untouched.
        assert_eq!(scaled[0], plain[0]);
        let two_pi = 2.0 * std::f64::consts::PI;
        for (s, p) in scaled.iter().zip(&plain) {
            let wavelen = two_pi / p;
            if wavelen < 2048.0 {
                assert_eq!(s, p);
            } else if wavelen > 8192.0 {
                assert!((s - p / 8.0).abs() < 1e-15, "long wavelengths are divided by the factor");
            } else {
                // Smoothly between the two.
                assert!(*s < *p && *s > p / 8.0);
            }
        }
        // The lowest frequency is divided by 8.
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-18);
    }

    /// Values that would give NaN frequencies or norms, or mask every position, are refused
    /// naming the field instead of loading a model that computes garbage.
    #[test]
    fn nonsensical_numbers_are_refused_naming_the_field() {
        let base = r#""hidden_size":8,"intermediate_size":8,"num_attention_heads":2,"vocab_size":10"#;
        let cases = [
            (r#""num_hidden_layers":0"#, "num_hidden_layers must be at least 1"),
            (r#""num_hidden_layers":1,"rope_theta":0"#, "rope_theta must be a positive number"),
            (r#""num_hidden_layers":1,"rms_norm_eps":-1e-5"#, "rms_norm_eps must be a positive number"),
            (r#""num_hidden_layers":1,"sliding_window":0"#, "sliding_window and max_position_embeddings"),
            (
                r#""num_hidden_layers":1,"rope_scaling":{"type":"linear","factor":0}"#,
                "rope_scaling.factor must be a positive number",
            ),
            (
                r#""num_hidden_layers":1,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":4.0,
                   "high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
                "high_freq_factor above low_freq_factor",
            ),
            (r#""num_hidden_layers":1,"eos_token_id":10"#, "eos_token_id 10 is not below vocab_size 10"),
            (r#""num_hidden_layers":1,"bos_token_id":[1,12]"#, "bos_token_id 12 is not below vocab_size 10"),
            (r#""num_hidden_layers":"thirty""#, "line 1 column"),
        ];
        for (fields, want) in cases {
            let e = HfConfig::from_json(&format!("{{{base},{fields}}}"), "c.json").unwrap_err();
            assert!(format!("{e:#}").contains(want), "{e:#} does not say {want}");
        }
        HfConfig::from_json(&format!("{{{base},\"num_hidden_layers\":1}}"), "c.json").unwrap();
    }

    #[test]
    fn unsupported_architecture_and_scaling_are_named() {
        let e = HfConfig::from_json(
            r#"{"architectures":["GPT2LMHeadModel"],"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
                "num_attention_heads":2,"vocab_size":10}"#,
            "c.json",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("GPT2LMHeadModel"));
        let e = HfConfig::from_json(
            r#"{"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"vocab_size":10,
                "rope_scaling":{"type":"yarn","factor":2.0}}"#,
            "c.json",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("yarn"));
    }

    #[test]
    fn transformers5_rope_parameters_are_read() {
        let cfg = HfConfig::from_json(
            r#"{"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"vocab_size":10,
                "rope_parameters":{"rope_theta":100000.0,"rope_type":"default"}}"#,
            "c.json",
        )
        .unwrap();
        assert_eq!(cfg.rope_theta, 100000.0);
        assert!(cfg.rope_scaling.is_none());
        let cfg = HfConfig::from_json(
            r#"{"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"vocab_size":10,
                "rope_parameters":{"rope_theta":500000.0,"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
                "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
            "c.json",
        )
        .unwrap();
        assert_eq!(cfg.rope_theta, 500000.0);
        assert_eq!(cfg.rope_scaling.as_ref().unwrap().rope_type, "llama3");
        // Not written back: exports keep the classic fields.
        assert!(serde_json::to_value(&cfg).unwrap().get("rope_parameters").is_none());
    }

    #[test]
    fn parameter_count_of_smollm2_shape() {
        let cfg = HfConfig::from_json(
            r#"{"hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
                "num_key_value_heads":3,"vocab_size":49152,"tie_word_embeddings":true}"#,
            "c.json",
        )
        .unwrap();
        // 134,515,008 elements in the GGUF (norms included).
        assert_eq!(cfg.parameter_count(), 134_515_008);
    }
}
