//! Benchmark binary (JSON on stdout, and to $BENCH_OUT when set): sequential edits of a model of
//! Llama-2-7B's width (hidden 4,096, MLP 11,008, 32 heads; 2 layers, a 258-token byte-level
//! vocabulary, random weights written to a temporary folder) with the default method
//! (`oedit-plus`) and few v* steps, committing a run directory after every edit through
//! [`RunDir::commit`], the session's commit. Per edit: seconds of the update phase and of the
//! checkpoint, bytes the commit wrote, basis size. Once: key statistics, the Cholesky
//! factorisation of C and (BENCH_EIGEN=1, the default) a symmetric eigendecomposition at f.
//!
//! BENCH_EDITS (200), BENCH_THREADS (2), BENCH_FORMAT (2; 1 commits in the format-1 layout, to
//! compare), BENCH_HIDDEN / BENCH_MLP (4096 / 11008), BENCH_COV_TOKENS (2000).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use oedit::data::EditReader;
use oedit::device::DeviceSpec;
use oedit::edit::templates::context_templates;
use oedit::edit::update::Preconditioner;
use oedit::edit::{Editor, Method};
use oedit::hparams::Hparams;
use oedit::linalg::{sym_eigen, Mat};
use oedit::loader::load_model;
use oedit::run::{RunDir, State};
use oedit::stats::{compute, Corpus};
use serde_json::{json, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// splitmix64 normals (Box-Muller).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn tensor(&mut self, dims: &[usize], mean: f32, std: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let (a, b) = (self.next().max(1e-300), self.next());
            let r = (-2.0 * a.ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * b;
            v.push(mean + std * (r * t.cos()) as f32);
            v.push(mean + std * (r * t.sin()) as f32);
        }
        v.truncate(n);
        Tensor::from_vec(v, dims, &Device::Cpu).expect("tensor")
    }
}

/// Writes a random Llama of the given width as a Hugging Face folder.
fn write_model(dir: &Path, d: usize, f: usize, heads: usize, layers: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    tokens.push("<s>".into());
    tokens.push("</s>".into());
    let v = tokens.len();
    let vocab: Vocab = tokens.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, vec![]).build().map_err(anyhow::Error::msg)?;
    let mut tk = Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    tk.add_special_tokens([AddedToken::from("<s>", true), AddedToken::from("</s>", true)])
        .map_err(anyhow::Error::msg)?;
    tk.save(dir.join("tokenizer.json"), false).map_err(anyhow::Error::msg)?;
    let cfg = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d,
        "intermediate_size": f,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "vocab_size": v,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "bos_token_id": v - 2,
        "eos_token_id": v - 1,
        "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let mut rng = Rng(0x5EED);
    let (sd, sf) = (1.0 / (d as f32).sqrt(), 1.0 / (f as f32).sqrt());
    let mut w: HashMap<String, Tensor> = HashMap::new();
    w.insert("model.embed_tokens.weight".into(), rng.tensor(&[v, d], 0.0, 1.0));
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (name, dims, mean, std) in [
            ("input_layernorm.weight", vec![d], 1.0, 0.1),
            ("self_attn.q_proj.weight", vec![d, d], 0.0, sd),
            ("self_attn.k_proj.weight", vec![d, d], 0.0, sd),
            ("self_attn.v_proj.weight", vec![d, d], 0.0, sd),
            ("self_attn.o_proj.weight", vec![d, d], 0.0, sd),
            ("post_attention_layernorm.weight", vec![d], 1.0, 0.1),
            ("mlp.gate_proj.weight", vec![f, d], 0.0, sd),
            ("mlp.up_proj.weight", vec![f, d], 0.0, sd),
            ("mlp.down_proj.weight", vec![d, f], 0.0, sf),
        ] {
            w.insert(format!("{p}.{name}"), rng.tensor(&dims, mean, std));
        }
    }
    w.insert("model.norm.weight".into(), rng.tensor(&[d], 1.0, 0.1));
    w.insert("lm_head.weight".into(), rng.tensor(&[v, d], 0.0, sd));
    candle_core::safetensors::save(&w, dir.join("model.safetensors"))?;
    Ok(())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn emit(out: &Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(out)?;
    if let Ok(p) = std::env::var("BENCH_OUT") {
        std::fs::write(&p, &text)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let n_edits = env_usize("BENCH_EDITS", 200);
    let format = env_usize("BENCH_FORMAT", 2) as u32;
    let (d, f) = (env_usize("BENCH_HIDDEN", 4096), env_usize("BENCH_MLP", 11008));
    let eigen = env_usize("BENCH_EIGEN", 1) == 1;
    let cov_tokens = env_usize("BENCH_COV_TOKENS", 2000);
    let pool = common::pool();
    pool.install(|| -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let t = Instant::now();
        write_model(&tmp.path().join("model"), d, f, 32, 2)?;
        let write_s = t.elapsed().as_secs_f64();
        let mut lm = load_model(tmp.path().join("model").to_str().unwrap_or_default(), &DeviceSpec::Cpu, None)?;
        // The tests' small v* settings (few steps and templates): the point is the update, the
        // subspace and the checkpoint at this width, not v*.
        let hp: Hparams = serde_json::from_value(json!({
            "layer": 1,
            "context_templates": 2,
            "template_length": 4,
            "v_steps": 3,
            "v_lr": 0.5,
            "kl_weight": 0.0625,
            "weight_decay": 0.001,
            "clamp_norm_factor": 4.0,
            "stop_loss": 0.0,
            "cov_tokens": cov_tokens,
            "cov_regularization": 0.01,
        }))?;

        // Statistics and the factorisations at f.
        let t = Instant::now();
        let stats = compute(&lm.model, &lm.tok, hp.layer, hp.cov_tokens, &Corpus::builtin())?;
        let stats_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        drop(Preconditioner::new(&stats, hp.cov_regularization)?);
        let cholesky_s = t.elapsed().as_secs_f64();

        let templates = context_templates(&lm.model, &lm.tok, hp.context_templates, hp.template_length)?;
        let method = Method::named("oedit-plus").expect("method");
        let t = Instant::now();
        let mut editor = Editor::new(method, hp.clone(), templates, std::slice::from_ref(&stats))?;
        let editor_s = t.elapsed().as_secs_f64();
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/counterfact-sample.jsonl");
        let records: Vec<_> =
            EditReader::open(&data)?.filter_map(Result::ok).map(|(_, r)| r).take(n_edits).collect();
        let rd = RunDir::create(&tmp.path().join("run"))?;
        let mut state = State::new();
        state.format = format;
        let mut per_edit = Vec::new();
        let (mut update, mut ckpt, mut bytes) = (vec![], vec![], vec![]);
        let started = Instant::now();
        for (i, rec) in records.iter().enumerate() {
            let t = Instant::now();
            let (o, applied) = editor.edit(&mut lm.model, &lm.tok, rec)?;
            let edit_s = t.elapsed().as_secs_f64();
            state.updates.extend(applied);
            state.n_edits += 1;
            state.last_line = i + 1;
            let tc = Instant::now();
            let c = rd.commit(&mut state, &editor.subspaces())?;
            let ckpt_s = tc.elapsed().as_secs_f64();
            update.push(o.update_seconds);
            ckpt.push(ckpt_s);
            bytes.push(c.bytes_written as f64);
            per_edit.push(json!({
                "index": i,
                "edit_seconds": edit_s,
                "update_seconds": o.update_seconds,
                "checkpoint_seconds": ckpt_s,
                "checkpoint_bytes": c.bytes_written,
                "basis_size": o.basis_size,
            }));
            eprintln!(
                "edit {i}: update {:.3} s, checkpoint {:.3} s, {} bytes, basis {}",
                o.update_seconds, ckpt_s, c.bytes_written, o.basis_size
            );
        }
        let edits_s = started.elapsed().as_secs_f64();
        let k = 20.min(update.len());
        let n = update.len();
        let window = |v: &[f64]| json!({ "first20_mean": mean(&v[..k]), "last20_mean": mean(&v[n - k..]) });
        let dir_bytes: u64 = std::fs::read_dir(rd.path.join("updates"))?
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        let mut out = json!({
            "bench": "width7b",
            "format": format,
            "threads": common::threads(),
            "hidden": d,
            "mlp_width": f,
            "heads": 32,
            "layers": 2,
            "edits": n,
            "method": "oedit-plus",
            "hparams": { "v_steps": hp.v_steps, "context_templates": hp.context_templates, "cov_tokens": hp.cov_tokens },
            "seconds": {
                "write_model": write_s,
                "statistics": stats_s,
                "cholesky": cholesky_s,
                "editor_build": editor_s,
                "edits_total": edits_s,
            },
            "update_seconds": window(&update),
            "checkpoint_seconds": window(&ckpt),
            "checkpoint_bytes": window(&bytes),
            "run_dir_updates_bytes": dir_bytes,
            "per_edit": per_edit,
        });
        emit(&out)?;
        drop(editor);
        if eigen {
            let t = Instant::now();
            let e = sym_eigen(&Mat::from_vec(f, f, stats.second_moment.clone()));
            out["seconds"]["sym_eigen"] = json!(t.elapsed().as_secs_f64());
            out["sym_eigen_top"] = json!(e.values.last());
            emit(&out)?;
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        Ok(())
    })
}
