//! Writes a Llama-shaped model folder with random bf16 weights, laid out like a Hugging Face hub
//! checkpoint: `config.json`, safetensors shards `model-0000i-of-0000n.safetensors` with
//! `model.safetensors.index.json`, and a `tokenizer.json` whose vocabulary fits the model's.
//!
//! The weights are streamed: each tensor is drawn when the safetensors writer asks for its bytes
//! and dropped once written, so the generator holds one tensor at a time (at most the 0.26 GB
//! embedding of a Llama-2-7B shape), whatever the model size.
//!
//! ```text
//! cargo run --release --example random_llama -- OUT --tokenizer SRC/tokenizer.json \
//!     [--hidden 4096 --layers 32 --heads 32 --kv-heads 32 --mlp 11008 --vocab 32000] \
//!     [--shard-gb 10] [--seed 0] [--bos 1 --eos 2]
//! ```
//!
//! Defaults: Llama-2-7B's shape. The tokenizer (a byte-level BPE `tokenizer.json`, e.g. the one
//! `oedit export` writes for SmolLM2) is cut to the ids below `--vocab`: its vocabulary, its
//! added tokens and the merges whose parts and result all survive. Every id it can produce is
//! then a row of the embedding.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, View};
use serde_json::{json, Value};

/// The model shape and file layout to write.
struct Shape {
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    mlp: usize,
    vocab: usize,
}

/// A bf16 tensor drawn when its bytes are requested: ones for norms, else uniform with
/// standard deviation 0.02 (the usual initialiser range), from a seed derived from its name.
struct LazyTensor {
    shape: Vec<usize>,
    seed: u64,
    ones: bool,
}

impl LazyTensor {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

impl View for LazyTensor {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let n = self.len();
        let mut out = Vec::with_capacity(n * 2);
        if self.ones {
            for _ in 0..n {
                out.extend_from_slice(&bf16_bits(1.0).to_le_bytes());
            }
            return Cow::Owned(out);
        }
        // Uniform on [-a, a] has standard deviation a/√3.
        let a = 0.02f32 * 3f32.sqrt();
        let mut state = self.seed;
        while out.len() < n * 2 {
            let r = splitmix64(&mut state);
            for half in [r as u32, (r >> 32) as u32] {
                if out.len() < n * 2 {
                    let u = (half >> 8) as f32 / (1u32 << 24) as f32; // [0, 1)
                    out.extend_from_slice(&bf16_bits((2.0 * u - 1.0) * a).to_le_bytes());
                }
            }
        }
        Cow::Owned(out)
    }
    fn data_len(&self) -> usize {
        self.len() * 2
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// f32 → bf16 bits, rounding to nearest even (finite inputs).
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let round = ((b >> 16) & 1) + 0x7fff;
    ((b + round) >> 16) as u16
}

fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The tensors of the model in checkpoint order (embedding, layers, final norm, LM head).
fn tensors(s: &Shape) -> Vec<(String, Vec<usize>)> {
    let (h, f) = (s.hidden, s.mlp);
    let kv = s.kv_heads * (h / s.heads);
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![s.vocab, h])];
    for i in 0..s.layers {
        let p = format!("model.layers.{i}.");
        for (n, shape) in [
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![f, h]),
            ("mlp.up_proj.weight", vec![f, h]),
            ("mlp.down_proj.weight", vec![h, f]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            t.push((format!("{p}{n}"), shape));
        }
    }
    t.push(("model.norm.weight".to_string(), vec![h]));
    t.push(("lm_head.weight".to_string(), vec![s.vocab, h]));
    t
}

/// Splits the tensors, in order, into shards of at most `max_bytes` (a tensor never splits).
fn shard(tensors: Vec<(String, Vec<usize>)>, max_bytes: u64) -> Vec<Vec<(String, Vec<usize>)>> {
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut size = 0u64;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() as u64 * 2;
        if size + bytes > max_bytes && !shards.last().is_some_and(Vec::is_empty) {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("one shard at least").push((name, shape));
    }
    shards
}

fn write_weights(out: &Path, s: &Shape, shard_bytes: u64, seed: u64) -> Result<u64> {
    let shards = shard(tensors(s), shard_bytes);
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (i, tensors) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let views: Vec<(String, LazyTensor)> = tensors
            .into_iter()
            .map(|(name, shape)| {
                let ones = shape.len() == 1;
                let t = LazyTensor { seed: name_seed(seed, &name), shape, ones };
                total += t.data_len() as u64;
                weight_map.insert(name.clone(), file.clone());
                (name, t)
            })
            .collect();
        let path = out.join(&file);
        let t = std::time::Instant::now();
        safetensors::tensor::serialize_to_file(views, None, &path)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        eprintln!("{file}: written in {:.1} s", t.elapsed().as_secs_f64());
    }
    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    write_json(&out.join("model.safetensors.index.json"), &index)?;
    Ok(total)
}

fn write_config(out: &Path, s: &Shape, bos: u32, eos: u32) -> Result<()> {
    // Llama-2-7b-hf's config.json, with the shape given (its defaults) and the tokenizer's ids.
    let cfg = json!({
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": bos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "initializer_range": 0.02,
        "intermediate_size": s.mlp,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": null,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "vocab_size": s.vocab,
    });
    write_json(&out.join("config.json"), &cfg)
}

/// Cuts a byte-level BPE tokenizer to the ids below `vocab`; returns how many tokens it keeps.
fn cut_tokenizer(src: &Path, dst: &Path, vocab: usize) -> Result<usize> {
    let text = std::fs::read_to_string(src).with_context(|| format!("{}: cannot read", src.display()))?;
    let mut tok: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", src.display()))?;
    let model = tok.get_mut("model").context("tokenizer.json has no `model`")?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        bail!("{}: only BPE tokenizers can be cut", src.display());
    }
    let kept: HashMap<String, u64> = model["vocab"]
        .as_object()
        .context("tokenizer.json: `model.vocab` is not an object")?
        .iter()
        .filter_map(|(t, id)| id.as_u64().filter(|&i| (i as usize) < vocab).map(|i| (t.clone(), i)))
        .collect();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .context("tokenizer.json: `model.merges` is not an array")?
        .iter()
        .filter(|m| {
            let (a, b) = match m {
                Value::String(s) => match s.split_once(' ') {
                    Some((a, b)) => (a.to_string(), b.to_string()),
                    None => return false,
                },
                Value::Array(p) if p.len() == 2 => (
                    p[0].as_str().unwrap_or_default().to_string(),
                    p[1].as_str().unwrap_or_default().to_string(),
                ),
                _ => return false,
            };
            kept.contains_key(&a) && kept.contains_key(&b) && kept.contains_key(&format!("{a}{b}"))
        })
        .cloned()
        .collect();
    let n = kept.len();
    model["vocab"] = Value::Object(kept.into_iter().map(|(t, i)| (t, Value::from(i))).collect());
    model["merges"] = Value::Array(merges);
    if let Some(added) = tok.get_mut("added_tokens").and_then(Value::as_array_mut) {
        added.retain(|a| a.get("id").and_then(Value::as_u64).is_some_and(|i| (i as usize) < vocab));
    }
    write_json(dst, &tok)?;
    Ok(n)
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("{}: cannot write", path.display()))
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut out: Option<PathBuf> = None;
    let mut tokenizer: Option<PathBuf> = None;
    let mut s = Shape { hidden: 4096, layers: 32, heads: 32, kv_heads: 32, mlp: 11008, vocab: 32000 };
    let (mut shard_gb, mut seed, mut bos, mut eos) = (10.0f64, 0u64, 1u32, 2u32);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--tokenizer" => tokenizer = Some(PathBuf::from(val()?)),
            "--hidden" => s.hidden = val()?.parse()?,
            "--layers" => s.layers = val()?.parse()?,
            "--heads" => s.heads = val()?.parse()?,
            "--kv-heads" => s.kv_heads = val()?.parse()?,
            "--mlp" => s.mlp = val()?.parse()?,
            "--vocab" => s.vocab = val()?.parse()?,
            "--shard-gb" => shard_gb = val()?.parse()?,
            "--seed" => seed = val()?.parse()?,
            "--bos" => bos = val()?.parse()?,
            "--eos" => eos = val()?.parse()?,
            _ if a.starts_with("--") => bail!("unknown option {a}"),
            _ => out = Some(PathBuf::from(&a)),
        }
    }
    let out = out.context("usage: random_llama OUT --tokenizer tokenizer.json [options]")?;
    let tokenizer = tokenizer.context("--tokenizer tokenizer.json is required")?;
    if !s.hidden.is_multiple_of(s.heads) || !s.heads.is_multiple_of(s.kv_heads) {
        bail!("hidden must divide into heads, and heads into kv-heads");
    }
    if bos as usize >= s.vocab || eos as usize >= s.vocab {
        bail!("--bos and --eos must be below --vocab");
    }
    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;
    let kept = cut_tokenizer(&tokenizer, &out.join("tokenizer.json"), s.vocab)?;
    write_config(&out, &s, bos, eos)?;
    let total = write_weights(&out, &s, (shard_gb * 1e9) as u64, seed)?;
    println!("{}: {:.2} GB of bf16 weights, tokenizer with {kept} tokens", out.display(), total as f64 / 1e9);
    Ok(())
}
