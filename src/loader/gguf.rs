//! Loading a `.gguf` file: metadata → `HfConfig`, tensors dequantised and renamed to the
//! Hugging Face layout (Q/K rows un-permuted for half-split rope), tokenizer from metadata.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::model::config::RopeScaling;
use crate::model::HfConfig;
use crate::tokenizer::{tokenizer_from_gguf, Tok};

/// Everything read from a GGUF file.
pub struct GgufModel {
    pub config: HfConfig,
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: Tok,
}

fn md_usize(ct: &gguf_file::Content, key: &str) -> Result<usize> {
    let v = ct.metadata.get(key).with_context(|| format!("GGUF metadata key `{key}` is missing"))?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .ok()
        .or_else(|| v.to_i32().ok().and_then(|x| usize::try_from(x).ok()))
        .with_context(|| format!("GGUF metadata `{key}` is not a non-negative integer"))
}

fn md_f64(ct: &gguf_file::Content, key: &str) -> Option<f64> {
    let v = ct.metadata.get(key)?;
    v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok()
}

/// Maps a GGUF tensor name to its Hugging Face name.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Inverse of llama.cpp's Q/K row permutation: interleaved-rope rows → half-split rows.
fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// Reads `path`, dequantises all tensors to `dtype` on `device`.
pub fn load_gguf(path: &Path, device: &Device, dtype: DType) -> Result<GgufModel> {
    // Buffered: the metadata is tens of thousands of small reads (the tokenizer's strings).
    let mut file =
        BufReader::new(File::open(path).with_context(|| format!("{}: cannot open", path.display()))?);
    let ct = gguf_file::Content::read(&mut file)
        .with_context(|| format!("{}: not a valid GGUF file", path.display()))?;
    let arch =
        ct.metadata.get("general.architecture").and_then(|v| v.to_string().ok().cloned()).unwrap_or_default();
    if arch != "llama" && arch != "mistral" {
        bail!("{}: GGUF architecture `{arch}` is not supported (llama, mistral)", path.display());
    }
    let cfg =
        config_from_gguf(&ct, &arch).with_context(|| format!("{}: bad GGUF metadata", path.display()))?;
    let tokenizer =
        tokenizer_from_gguf(&ct).with_context(|| format!("{}: bad GGUF tokenizer", path.display()))?;
    let mut quantized = Vec::new();
    for name in ct.tensor_infos.keys() {
        let Some(hf) = hf_name(name) else { continue };
        let qt = ct
            .tensor(&mut file, name, device)
            .with_context(|| format!("{}: reading tensor `{name}`", path.display()))?;
        quantized.push((hf, qt));
    }
    // Dequantised in parallel once read (the file is read in order).
    let tensors = quantized
        .into_par_iter()
        .map(|(hf, qt)| {
            let mut t = qt.dequantize(device)?;
            if hf.ends_with("q_proj.weight") {
                t = unpermute(&t, cfg.num_attention_heads)?;
            } else if hf.ends_with("k_proj.weight") {
                t = unpermute(&t, cfg.kv_heads())?;
            }
            Ok((hf, t.to_dtype(dtype)?))
        })
        .collect::<Result<HashMap<_, _>>>()?;
    let mut config = cfg;
    config.tie_word_embeddings = !tensors.contains_key("lm_head.weight");
    config.bos_token_id = tokenizer.bos_id.map(crate::model::config::TokenIds::One);
    config.eos_token_id = tokenizer.eos_id.map(crate::model::config::TokenIds::One);
    Ok(GgufModel { config, tensors, tokenizer })
}

fn config_from_gguf(ct: &gguf_file::Content, arch: &str) -> Result<HfConfig> {
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = md_usize(ct, &k("embedding_length"))?;
    let heads = md_usize(ct, &k("attention.head_count"))?;
    let vocab = match md_usize(ct, &k("vocab_size")) {
        Ok(v) => v,
        Err(_) => ct
            .metadata
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.len())
            .context("GGUF has neither vocab_size nor tokenizer tokens")?,
    };
    // llama.cpp stores Llama-3.1's `llama3` rope scaling as per-frequency factors in a tensor,
    // not as metadata; loading without them would give another model's logits.
    if ct.tensor_infos.contains_key("rope_freqs.weight") {
        bail!(
            "the file carries `rope_freqs.weight` (rope scaling stored as frequency factors, as \
             llama.cpp writes Llama-3.1 and later), which oedit does not read; load the model from \
             its Hugging Face folder or hub id instead"
        );
    }
    let rope_scaling = match ct.metadata.get(&k("rope.scaling.type")).and_then(|v| v.to_string().ok()) {
        Some(t) if t == "linear" => Some(RopeScaling {
            rope_type: "linear".into(),
            factor: md_f64(ct, &k("rope.scaling.factor")),
            low_freq_factor: None,
            high_freq_factor: None,
            original_max_position_embeddings: None,
        }),
        _ => None,
    };
    let cfg = HfConfig {
        architectures: vec![if arch == "mistral" { "MistralForCausalLM" } else { "LlamaForCausalLM" }.into()],
        model_type: Some(arch.to_string()),
        hidden_size: hidden,
        intermediate_size: md_usize(ct, &k("feed_forward_length"))?,
        num_hidden_layers: md_usize(ct, &k("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: Some(md_usize(ct, &k("attention.head_count_kv")).unwrap_or(heads)),
        // Set where it is not embedding_length / head_count (e.g. Mistral-Nemo).
        head_dim: md_usize(ct, &k("attention.key_length")).ok(),
        rms_norm_eps: md_f64(ct, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: md_f64(ct, &k("rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling,
        max_position_embeddings: md_usize(ct, &k("context_length")).ok(),
        vocab_size: vocab,
        tie_word_embeddings: false,
        sliding_window: None,
        hidden_act: "silu".into(),
        bos_token_id: None,
        eos_token_id: None,
        torch_dtype: Some("float32".into()),
        rope_parameters: None,
    };
    cfg.validate()?;
    if cfg.head_dim.is_none() && cfg.head_dim() * heads != hidden {
        bail!("head dimension does not divide the embedding length (and no attention.key_length is given)");
    }
    Ok(cfg)
}
