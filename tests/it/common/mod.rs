//! Fixtures: a tiny random Llama written as a Hugging Face folder (single file or shards), a
//! hub-style cache, a GGUF copy in llama.cpp's layout, the built binary, and the real SmolLM2 GGUF.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use oedit::device::DeviceSpec;
use oedit::loader::{load_model, LoadedModel};
use oedit::model::{Batch, Llama, Padding, Taps};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

pub const HIDDEN: usize = 32;
pub const INTERMEDIATE: usize = 64;
pub const LAYERS: usize = 3;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = HIDDEN / HEADS;
pub const ROPE_THETA: f64 = 10_000.0;
pub const RMS_EPS: f64 = 1e-5;

/// Merges of the tiny tokenizer (each result is in the vocabulary).
pub const MERGES: &[(&str, &str)] =
    &[("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n"), ("Ġ", "c"), ("a", "t")];
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";

/// Shape options of the tiny model.
#[derive(Debug, Clone, Copy)]
pub struct TinyOpts {
    /// Tie the LM head to the embeddings (no `lm_head.weight`).
    pub tied: bool,
    /// Write two shards plus `model.safetensors.index.json` instead of `model.safetensors`.
    pub sharded: bool,
    /// Seed of the weights.
    pub seed: u64,
}

impl Default for TinyOpts {
    fn default() -> Self {
        Self { tied: false, sharded: false, seed: 7 }
    }
}

/// splitmix64 with Box-Muller normals.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// A tensor of normals `mean + std·N(0,1)` (f32, CPU).
    pub fn tensor(&mut self, dims: &[usize], mean: f64, std: f64) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (mean + std * self.normal()) as f32).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }
}

/// The tiny tokenizer's tokens in id order: the 256 byte-level characters (sorted), the merge
/// results, then `<s>` and `</s>`.
pub fn tiny_tokens() -> Vec<String> {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    assert_eq!(alphabet.len(), 256);
    let mut tokens: Vec<String> = alphabet.into_iter().map(String::from).collect();
    tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push(BOS.into());
    tokens.push(EOS.into());
    tokens
}

pub fn vocab_size() -> usize {
    tiny_tokens().len()
}

pub fn bos_id() -> u32 {
    (vocab_size() - 2) as u32
}

pub fn eos_id() -> u32 {
    (vocab_size() - 1) as u32
}

/// The tiny byte-level BPE tokenizer.
pub fn tiny_tokenizer() -> Tokenizer {
    let vocab: Vocab = tiny_tokens().into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
    let merges = MERGES.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().unwrap();
    let mut tk = Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    tk.add_special_tokens([AddedToken::from(BOS, true), AddedToken::from(EOS, true)]).unwrap();
    tk
}

/// The `config.json` of the tiny model.
pub fn tiny_config(tied: bool) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_THETA,
        "max_position_embeddings": 128,
        "vocab_size": vocab_size(),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "bos_token_id": bos_id(),
        "eos_token_id": eos_id(),
        "torch_dtype": "float32"
    })
}

/// Random weights under their Hugging Face names, in a deterministic order.
pub fn tiny_weights(tied: bool, seed: u64) -> Vec<(String, Tensor)> {
    let mut rng = Rng::new(seed);
    let (d, f, v) = (HIDDEN, INTERMEDIATE, vocab_size());
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut w = vec![("model.embed_tokens.weight".to_string(), rng.tensor(&[v, d], 0.0, 0.5))];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let items: [(&str, Vec<usize>, f64, f64); 9] = [
            ("input_layernorm.weight", vec![d], 1.0, 0.1),
            ("self_attn.q_proj.weight", vec![q, d], 0.0, 0.3),
            ("self_attn.k_proj.weight", vec![kv, d], 0.0, 0.3),
            ("self_attn.v_proj.weight", vec![kv, d], 0.0, 0.1),
            ("self_attn.o_proj.weight", vec![d, q], 0.0, 0.1),
            ("post_attention_layernorm.weight", vec![d], 1.0, 0.1),
            ("mlp.gate_proj.weight", vec![f, d], 0.0, 0.1),
            ("mlp.up_proj.weight", vec![f, d], 0.0, 0.1),
            ("mlp.down_proj.weight", vec![d, f], 0.0, 0.1),
        ];
        for (name, dims, mean, std) in items {
            w.push((format!("{p}.{name}"), rng.tensor(&dims, mean, std)));
        }
    }
    w.push(("model.norm.weight".to_string(), rng.tensor(&[d], 1.0, 0.1)));
    if !tied {
        w.push(("lm_head.weight".to_string(), rng.tensor(&[v, d], 0.0, 0.5)));
    }
    w
}

/// Writes the tiny random Llama as a Hugging Face folder in `dir` (created) and returns `dir`.
pub fn tiny_model(dir: &Path, opts: TinyOpts) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = serde_json::to_string_pretty(&tiny_config(opts.tied)).unwrap();
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    tiny_tokenizer().save(dir.join("tokenizer.json"), false).unwrap();
    let weights = tiny_weights(opts.tied, opts.seed);
    if opts.sharded {
        let split = weights.len() / 2;
        let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
        let mut weight_map = serde_json::Map::new();
        let mut total = 0usize;
        for (shard, part) in [&weights[..split], &weights[split..]].into_iter().enumerate() {
            let map: HashMap<String, Tensor> = part.iter().cloned().collect();
            candle_core::safetensors::save(&map, dir.join(names[shard])).unwrap();
            for (n, t) in part {
                weight_map.insert(n.clone(), names[shard].into());
                total += t.elem_count() * 4;
            }
        }
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    } else {
        let map: HashMap<String, Tensor> = weights.into_iter().collect();
        candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
    }
    dir.to_path_buf()
}

/// A fake commit hash for the hub cache.
pub const FAKE_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Lays out a hub-style cache for `repo_id` under `root` holding copies of `model_dir`'s files.
pub fn hub_cache(root: &Path, repo_id: &str, model_dir: &Path) {
    let (owner, name) = repo_id.split_once('/').expect("repo id owner/name");
    let repo = root.join(format!("models--{owner}--{name}"));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), FAKE_COMMIT).unwrap();
    let snap = repo.join("snapshots").join(FAKE_COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    for entry in std::fs::read_dir(model_dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, snap.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// llama.cpp's Q/K row permutation (half-split rope rows → interleaved rope rows).
pub fn llama_cpp_permute(w: &Tensor, n_head: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    let hd = out / n_head;
    w.reshape((n_head, 2, hd / 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

/// llama.cpp's name for a Hugging Face tensor name.
pub fn gguf_name(hf: &str) -> String {
    match hf {
        "rope_freqs.weight" => return hf.into(),
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap_or_else(|| panic!("unexpected tensor {hf}"));
    let (layer, part) = rest.split_once('.').unwrap();
    let g = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("unexpected tensor part {other}"),
    };
    format!("blk.{layer}.{g}")
}

/// Writes the tiny model with these weights as an F32 GGUF file in llama.cpp's layout. With
/// `permute_qk` false the Q/K rows are left in the Hugging Face order (a wrong file, for
/// checking that the comparison notices).
pub fn write_tiny_gguf(path: &Path, weights: &[(String, Tensor)], permute_qk: bool) {
    write_tiny_gguf_with(path, weights, permute_qk, Vec::new());
}

/// [`write_tiny_gguf`] with metadata `overrides`: an entry replaces the tiny file's entry of the
/// same key (e.g. `tokenizer.ggml.tokens`) or is added (e.g. `tokenizer.ggml.pre`).
pub fn write_tiny_gguf_with(
    path: &Path,
    weights: &[(String, Tensor)],
    permute_qk: bool,
    overrides: Vec<(&str, gguf_file::Value)>,
) {
    write_tiny_gguf_without(path, weights, permute_qk, overrides, &[])
}

/// [`write_tiny_gguf_with`], then without the metadata keys in `remove` (e.g. the BPE merges of
/// a SentencePiece file).
pub fn write_tiny_gguf_without(
    path: &Path,
    weights: &[(String, Tensor)],
    permute_qk: bool,
    overrides: Vec<(&str, gguf_file::Value)>,
    remove: &[&str],
) {
    use gguf_file::Value;
    let tokens = tiny_tokens();
    let n = tokens.len();
    let token_type: Vec<Value> =
        (0..n).map(|i| Value::I32(if i as u32 >= bos_id() { 3 } else { 1 })).collect();
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("tiny".into())),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.context_length", Value::U32(128)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Value::U32(INTERMEDIATE as u32)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(RMS_EPS as f32)),
        ("llama.rope.freq_base", Value::F32(ROPE_THETA as f32)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens.into_iter().map(Value::String).collect())),
        (
            "tokenizer.ggml.merges",
            Value::Array(MERGES.iter().map(|(a, b)| Value::String(format!("{a} {b}"))).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(token_type)),
        ("tokenizer.ggml.bos_token_id", Value::U32(bos_id())),
        ("tokenizer.ggml.eos_token_id", Value::U32(eos_id())),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
    ];
    let mut md = md;
    for (k, v) in overrides {
        match md.iter_mut().find(|(key, _)| *key == k) {
            Some(slot) => slot.1 = v,
            None => md.push((k, v)),
        }
    }
    md.retain(|(k, _)| !remove.contains(k));
    let mut qts = Vec::new();
    for (name, t) in weights {
        let t = if permute_qk && name.ends_with("q_proj.weight") {
            llama_cpp_permute(t, HEADS)
        } else if permute_qk && name.ends_with("k_proj.weight") {
            llama_cpp_permute(t, KV_HEADS)
        } else {
            t.clone()
        };
        qts.push((gguf_name(name), QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

/// Loads a model (folder, GGUF, ...) on the CPU with the default dtype.
pub fn load(arg: &Path) -> LoadedModel {
    load_model(arg.to_str().unwrap(), &DeviceSpec::Cpu, None).unwrap()
}

/// Loads a model on the CPU with `dtype`.
pub fn load_dtype(arg: &Path, dtype: DType) -> LoadedModel {
    load_model(arg.to_str().unwrap(), &DeviceSpec::Cpu, Some(dtype)).unwrap()
}

/// Logits `[1, t, V]` of one unpadded sequence.
pub fn logits(model: &Llama, ids: &[u32]) -> Tensor {
    let batch = Batch::new(vec![ids.to_vec()], Padding::Right, 0).unwrap();
    model.forward(&batch, &Taps::default()).unwrap().0
}

/// Largest absolute difference between two tensors of the same shape (as f64).
/// Residual stream after all layers (inference mode), `[batch, seq, hidden]`.
pub fn hidden_states(model: &Llama, batch: &Batch) -> Tensor {
    let ctx = oedit::model::LayerCtx::new(model, batch, oedit::model::Mode::Inference).unwrap();
    model
        .run_layers(
            model.embed(batch).unwrap(),
            0..model.num_layers(),
            &ctx,
            &Taps::default(),
            &mut Default::default(),
        )
        .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// Some token ids of the tiny vocabulary (no specials).
pub fn sample_ids(len: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| (rng.next_u64() % (bos_id() as u64)) as u32).collect()
}

/// The built `oedit` binary, with a clean environment for hub and backtrace variables.
pub fn oedit_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_oedit"));
    for v in
        ["HF_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "RUST_BACKTRACE", "RUST_LIB_BACKTRACE", "OEDIT_MODELS"]
    {
        c.env_remove(v);
    }
    c.env("RAYON_NUM_THREADS", "1");
    c
}

/// Runs a command and returns its output.
pub fn run(mut cmd: Command) -> Output {
    cmd.output().expect("cannot start oedit")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a command succeeded, showing its stderr otherwise.
pub fn assert_ok(o: &Output) {
    assert!(o.status.success(), "oedit failed ({}): {}", o.status, stderr(o));
}

/// Asserts a failure with a single-line `error: ...` message (no panic) and returns the line.
pub fn assert_clean_failure(o: &Output) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "expected a failure, got success; stdout: {}", stdout(o));
    assert!(o.status.code().is_some(), "killed by a signal: {err}");
    assert!(!err.contains("panicked"), "oedit panicked: {err}");
    let lines: Vec<&str> = err.trim_end().lines().collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "unexpected error line: {err}");
    lines[0].to_string()
}

/// Path of the real SmolLM2-135M-Instruct GGUF, or None when it is absent and
/// `OEDIT_SKIP_REAL_MODEL=1` (panics with instructions when it is absent otherwise).
pub fn smollm2_gguf() -> Option<PathBuf> {
    let path =
        std::env::var_os("OEDIT_SMOLLM2").filter(|p| !p.is_empty()).map(PathBuf::from).unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("OEDIT_SKIP_REAL_MODEL").is_ok_and(|v| v == "1") {
        eprintln!(
            "note: {} is missing; skipping this real-model test (OEDIT_SKIP_REAL_MODEL=1)",
            path.display()
        );
        return None;
    }
    panic!(
        "the real model {} is missing: run scripts/fetch-model.sh (or set OEDIT_SMOLLM2 to the file, \
         or OEDIT_SKIP_REAL_MODEL=1 to skip the real-model tests)",
        path.display()
    );
}

// ---------------------------------------------------------------------------------------------
// Editing fixtures: hyper-parameters, edit records, `oedit edit` invocations, run-directory files.
// ---------------------------------------------------------------------------------------------

/// The crate root (for data/ and configs/).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The small statistics corpus shipped in data/corpus.
pub fn corpus_file() -> PathBuf {
    repo_root().join("data").join("corpus").join("frankenstein-part.txt")
}

/// Hyper-parameters for editing the tiny model (layer 1, few templates and steps).
pub fn tiny_hparams() -> serde_json::Value {
    serde_json::json!({
        "layer": 1,
        "context_templates": 3,
        "template_length": 4,
        "v_steps": 10,
        "v_lr": 0.5,
        "kl_weight": 0.0625,
        "weight_decay": 0.001,
        "clamp_norm_factor": 4.0,
        "stop_loss": 0.05,
        "cov_tokens": 2000,
        "cov_regularization": 0.01,
        "subspace": { "energy": 0.9, "max_directions_per_edit": 1, "max_fraction": 0.9, "tolerance": 0.01 }
    })
}

/// The tiny hyper-parameters as the library type.
pub fn tiny_hparams_struct() -> oedit::hparams::Hparams {
    serde_json::from_value(tiny_hparams()).unwrap()
}

/// Writes `v` as JSON to `path` and returns the path.
pub fn write_json(path: &Path, v: &serde_json::Value) -> PathBuf {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
    path.to_path_buf()
}

/// Writes lines (each followed by a newline) to `path` and returns the path.
pub fn write_lines(path: &Path, lines: &[String]) -> PathBuf {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// (prompt, subject, target) of short hand-written edits for the tiny model.
pub const MINIMAL_EDITS: &[(&str, &str, &str)] = &[
    ("The cat sat on the", "The cat", "mat"),
    ("A dog lives in the", "A dog", "house"),
    ("The capital of Tinland is", "Tinland", "Hatville"),
    ("Bob plays the", "Bob", "piano"),
    ("Ann was born in", "Ann", "Oslo"),
    ("The hat is made of", "The hat", "wool"),
    ("Cats like to eat", "Cats", "fish"),
    ("Tom works at", "Tom", "a bank"),
    ("The tin man loves", "The tin man", "oil"),
    ("Zed drives a", "Zed", "red car"),
];

/// Minimal-format JSON lines `{"prompt","subject","target"}` for the first `n` of [`MINIMAL_EDITS`].
pub fn minimal_lines(n: usize) -> Vec<String> {
    assert!(n <= MINIMAL_EDITS.len());
    MINIMAL_EDITS[..n]
        .iter()
        .map(|(p, s, t)| serde_json::json!({ "prompt": p, "subject": s, "target": t }).to_string())
        .collect()
}

/// The first `n` lines of a committed data sample (data/NAME).
pub fn sample_lines(name: &str, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join("data").join(name)).unwrap();
    text.lines().filter(|l| !l.trim().is_empty()).take(n).map(str::to_string).collect()
}

/// `oedit --threads 1 edit --model M --hparams H --edits E --run D --stats-corpus C --json`, with its
/// statistics cache in `cache` (OEDIT_CACHE).
pub fn edit_cmd(model: &Path, hparams: &Path, edits: &Path, run_dir: &Path, cache: &Path) -> Command {
    let mut c = oedit_cmd();
    // The run machinery's tests were written against O-Edit+ (a stored subspace, one update per
    // edit); a later `--method` in the test's own arguments overrides this one.
    c.env("OEDIT_CACHE", cache)
        .args(["--threads", "1", "edit", "--method", "oedit-plus", "--model"])
        .arg(model);
    c.arg("--hparams").arg(hparams).arg("--edits").arg(edits).arg("--run").arg(run_dir);
    c.arg("--stats-corpus").arg(corpus_file()).arg("--json");
    c
}

/// The `summary` object `oedit edit --json` prints last on standard output.
pub fn edit_summary(o: &Output) -> serde_json::Value {
    let out = stdout(o);
    let last = out.lines().last().unwrap_or_else(|| panic!("no output; stderr: {}", stderr(o)));
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    v["summary"].clone()
}

/// Parses a JSONL file (missing file: empty).
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    match std::fs::read_to_string(path) {
        Ok(t) => t.lines().map(|l| serde_json::from_str(l).unwrap()).collect(),
        Err(_) => Vec::new(),
    }
}

/// A run's `log.jsonl` without the fields that vary between identical runs (timings, memory).
pub fn log_without_timings(run_dir: &Path) -> Vec<serde_json::Value> {
    read_jsonl(&run_dir.join("log.jsonl"))
        .into_iter()
        .map(|mut v| {
            let o = v.as_object_mut().unwrap();
            for k in ["seconds", "phases", "peak_rss_mb"] {
                o.remove(k);
            }
            v
        })
        .collect()
}

/// The tensors of a safetensors file (CPU).
pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Header metadata of a safetensors file.
pub fn read_st_metadata(path: &Path) -> HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

/// Path of the first updates chunk of a run directory (written once 256 edits are committed).
pub fn chunk0(run_dir: &Path) -> PathBuf {
    run_dir.join("updates").join("chunk-00000.safetensors")
}

/// Path of the record file of edit `i` (0-based) while its chunk is not complete.
pub fn edit_file(run_dir: &Path, i: usize) -> PathBuf {
    run_dir.join("updates").join(format!("edit-{i:08}.safetensors"))
}

/// Every file under `DIR/updates` by name, with its bytes (sorted by name).
pub fn update_files(run_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(run_dir.join("updates")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

/// The run's stored rank-one factors, in order, as the tensors `r`, `u`, `key`, `layer` (every
/// record file under `DIR/updates` concatenated).
pub fn run_updates(run_dir: &Path) -> HashMap<String, Tensor> {
    let mut parts: HashMap<String, Vec<Tensor>> = HashMap::new();
    for (name, _) in update_files(run_dir) {
        let t = read_tensors(&run_dir.join("updates").join(name));
        for k in ["r", "u", "key", "layer"] {
            if let Some(x) = t.get(k) {
                parts.entry(k.to_string()).or_default().push(x.clone());
            }
        }
    }
    parts.into_iter().map(|(k, v)| (k, Tensor::cat(&v, 0).unwrap())).collect()
}

/// The committed O-Edit basis of `layer` (rows) and the energies, as the run directory rebuilds it.
pub fn run_basis(run_dir: &Path, layer: usize) -> Option<(Vec<Vec<f64>>, Vec<f64>)> {
    let state = oedit::run::RunDir::open(run_dir).unwrap().read_state(INTERMEDIATE).unwrap();
    state.subspaces.get(&layer).map(|s| (s.basis.rows().to_vec(), s.energy.clone()))
}

/// Rows of a 2-D tensor as f64 vectors.
pub fn rows_f64(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
}

pub fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn norm64(a: &[f64]) -> f64 {
    dot64(a, a).sqrt()
}

/// `oedit export --run D --out OUT`, asserting success; returns OUT.
pub fn export_run(run_dir: &Path, out: &Path) -> PathBuf {
    let mut c = oedit_cmd();
    c.args(["--threads", "1", "export", "--run"]).arg(run_dir).arg("--out").arg(out);
    assert_ok(&run(c));
    out.to_path_buf()
}

/// A temp folder with the tiny model, the tiny hyper-parameters and a statistics cache, and the
/// `oedit edit` / `oedit eval` invocations on it.
pub struct EditFx {
    pub tmp: tempfile::TempDir,
    pub model: PathBuf,
    pub hparams: PathBuf,
    pub cache: PathBuf,
}

impl EditFx {
    pub fn new() -> Self {
        let tmp = tempfile::TempDir::new().unwrap();
        let model = tiny_model(&tmp.path().join("model"), TinyOpts::default());
        let hparams = write_json(&tmp.path().join("hparams.json"), &tiny_hparams());
        let cache = tmp.path().join("cache");
        Self { tmp, model, hparams, cache }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn edits(&self, name: &str, lines: &[String]) -> PathBuf {
        write_lines(&self.path(name), lines)
    }

    /// `oedit edit` on `model` (not necessarily the fixture's) with the fixture's hyper-parameters.
    pub fn cmd(&self, model: &Path, edits: &Path, run_dir: &Path, extra: &[&str]) -> Command {
        let mut c = edit_cmd(model, &self.hparams, edits, run_dir, &self.cache);
        c.args(extra);
        c
    }

    pub fn edit(&self, edits: &Path, run_dir: &Path, extra: &[&str]) -> Output {
        run(self.cmd(&self.model, edits, run_dir, extra))
    }

    pub fn edit_ok(&self, edits: &Path, run_dir: &Path, extra: &[&str]) -> serde_json::Value {
        let o = self.edit(edits, run_dir, extra);
        assert_ok(&o);
        edit_summary(&o)
    }

    /// `oedit edit --edits -` with `lines` on standard input.
    pub fn edit_stdin(&self, model: &Path, lines: &[String], run_dir: &Path, extra: &[&str]) -> Output {
        use std::io::Write;
        let mut c = self.cmd(model, Path::new("-"), run_dir, extra);
        let mut child = c
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        {
            let mut stdin = child.stdin.take().unwrap();
            for l in lines {
                // The process may stop reading early (an error); a closed pipe is fine then.
                if writeln!(stdin, "{l}").is_err() {
                    break;
                }
            }
        }
        child.wait_with_output().unwrap()
    }

    /// `oedit eval --model M --edits E --run D` with the fixture's cache.
    pub fn eval(&self, edits: &Path, run_dir: &Path, extra: &[&str]) -> Output {
        let mut c = oedit_cmd();
        c.env("OEDIT_CACHE", &self.cache).args(["eval", "--model"]).arg(&self.model);
        c.arg("--edits").arg(edits).arg("--run").arg(run_dir).args(extra);
        run(c)
    }
}
