//! Second-moment statistics of MLP keys, C = E[k kᵀ], at one layer over a text corpus.
//! Computed once and cached as safetensors, keyed by model fingerprint, layer, token count and
//! corpus hash, so that every input that changes C changes the cache file name.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use crate::fingerprint::Fnv;
use crate::loader::reader::TensorFiles;
use crate::model::{Batch, Captured, LayerCtx, Llama, Mode, Padding, Taps};
use crate::progress::Progress;
use crate::tensor_file::{self, Data};
use crate::tokenizer::Tok;

/// The public-domain corpus shipped with oedit (data/corpus), used when no corpus is given.
const DEFAULT_CORPUS: &[(&str, &str)] = &[
    ("pride-and-prejudice.txt", include_str!("../data/corpus/pride-and-prejudice.txt")),
    ("frankenstein-part.txt", include_str!("../data/corpus/frankenstein-part.txt")),
];

/// Tokens per corpus window.
const WINDOW: usize = 128;
/// Windows per forward batch.
const BATCH: usize = 8;

/// A text corpus for the statistics.
pub struct Corpus {
    /// Name recorded in reports ("builtin" or the path).
    pub name: String,
    texts: Vec<String>,
}

impl Corpus {
    /// The corpus shipped in the binary.
    pub fn builtin() -> Self {
        Self { name: "builtin".into(), texts: DEFAULT_CORPUS.iter().map(|(_, t)| t.to_string()).collect() }
    }

    /// A `.txt` file, or every `.txt` file of a folder (sorted by name).
    pub fn from_path(path: &Path) -> Result<Self> {
        let files = if path.is_dir() {
            let mut f: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("{}: cannot list", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "txt"))
                .collect();
            f.sort();
            f
        } else {
            vec![path.to_path_buf()]
        };
        if files.is_empty() {
            bail!("{}: no .txt files in the corpus folder", path.display());
        }
        let texts = files
            .iter()
            .map(|f| {
                std::fs::read_to_string(f)
                    .with_context(|| format!("{}: cannot read as UTF-8 text", f.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { name: path.display().to_string(), texts })
    }

    /// Hash of the corpus content.
    pub fn hash(&self) -> u64 {
        let mut h = Fnv::new();
        for t in &self.texts {
            h.write(t.as_bytes());
            h.write(&[0]);
        }
        h.finish()
    }

    /// Fixed-length token windows (paragraphs joined), at most `max_tokens` tokens in all.
    pub fn windows(&self, tok: &Tok, max_tokens: usize) -> Result<Vec<Vec<u32>>> {
        let mut windows = Vec::new();
        let mut total = 0;
        let mut current: Vec<u32> = Vec::new();
        let bos = tok.bos_id.filter(|_| tok.prompt_starts_with_bos());
        for text in &self.texts {
            for para in text.split("\n\n").map(str::trim).filter(|p| p.len() > 40) {
                let para = para.split_whitespace().collect::<Vec<_>>().join(" ");
                current.extend(tok.encode_plain(&format!(" {para}"))?);
                while current.len() >= WINDOW {
                    let rest = current.split_off(WINDOW);
                    let mut w = std::mem::replace(&mut current, rest);
                    if let Some(b) = bos {
                        w.insert(0, b);
                        w.pop();
                    }
                    total += w.len();
                    windows.push(w);
                    if total >= max_tokens {
                        return Ok(windows);
                    }
                }
            }
        }
        if windows.is_empty() || total < max_tokens / 2 {
            // Bad input (exit code 2): the hyper-parameters ask far more of the corpus than it
            // has. Short of that (at least half), C averages what there is, with a note.
            return Err(crate::errors::InputError(format!(
                "corpus `{}` has only {total} tokens; cov_tokens asks for {max_tokens} (lower cov_tokens or give a larger --stats-corpus)",
                self.name
            ))
            .into());
        }
        if total < max_tokens {
            eprintln!(
                "note: corpus `{}` has {total} tokens of the {max_tokens} cov_tokens asks for; the key \
                 statistics average those {total}",
                self.name
            );
        }
        Ok(windows)
    }
}

/// C = E[k kᵀ] at one layer, row-major f64 `[f, f]`, with the number of tokens it averages.
pub struct KeyStats {
    pub layer: usize,
    pub tokens: usize,
    pub dim: usize,
    pub second_moment: Vec<f64>,
}

/// Where the statistics cache lives: `$OEDIT_CACHE/stats`, else `~/.cache/oedit/stats`.
pub fn cache_dir() -> PathBuf {
    crate::fsutil::cache_root().join("stats")
}

/// Cache file name for the given inputs.
pub fn cache_path(model_fp: &str, layer: usize, tokens: usize, corpus: &Corpus) -> PathBuf {
    cache_dir().join(format!("{model_fp}-layer{layer}-{tokens}tok-corpus{:016x}.safetensors", corpus.hash()))
}

/// Computes C at `layer` from `corpus`.
pub fn compute(
    model: &Llama,
    tok: &Tok,
    layer: usize,
    max_tokens: usize,
    corpus: &Corpus,
) -> Result<KeyStats> {
    let mut all = compute_many(model, tok, &[layer], max_tokens, corpus)?;
    all.pop().context("no statistics computed")
}

/// Computes C at each of `layers` in one pass over the corpus (layers in the given order).
pub fn compute_many(
    model: &Llama,
    tok: &Tok,
    layers: &[usize],
    max_tokens: usize,
    corpus: &Corpus,
) -> Result<Vec<KeyStats>> {
    let windows = corpus.windows(tok, max_tokens)?;
    let f = model.config().intermediate_size;
    let dev = model.device();
    let last = *layers.iter().max().context("no layer given")?;
    let mut acc: Vec<Tensor> =
        layers.iter().map(|_| Tensor::zeros((f, f), DType::F32, dev)).collect::<candle_core::Result<_>>()?;
    let mut sums = vec![vec![0f64; f * f]; layers.len()];
    let mut tokens = 0usize;
    let bar = Progress::new(windows.len() as u64, "key statistics", "windows");
    for (i, chunk) in windows.chunks(BATCH).enumerate() {
        let batch = Batch::new(chunk.to_vec(), Padding::Right, tok.pad_id)?;
        let ctx = LayerCtx::new(model, &batch, Mode::Inference)?;
        let mut h = model.embed(&batch)?;
        for l in 0..=last {
            let mut cap = Captured::default();
            let taps = Taps { capture_keys: Some(l), ..Default::default() };
            h = model.run_layers(h, l..l + 1, &ctx, &taps, &mut cap)?;
            for (j, _) in layers.iter().enumerate().filter(|(_, &x)| x == l) {
                let keys = cap.keys.as_ref().context("key capture failed")?.to_dtype(DType::F32)?;
                let k = keys.reshape(((), f))?;
                acc[j] = (&acc[j] + k.t()?.matmul(&k)?)?;
            }
        }
        tokens += chunk.iter().map(Vec::len).sum::<usize>();
        // Flush the f32 accumulators into f64 every few batches to bound rounding error.
        if i % 16 == 15 {
            for (a, s) in acc.iter_mut().zip(sums.iter_mut()) {
                flush(a, s)?;
            }
        }
        bar.inc(1);
    }
    for (a, s) in acc.iter_mut().zip(sums.iter_mut()) {
        flush(a, s)?;
    }
    bar.finish();
    let n = tokens.max(1) as f64;
    Ok(layers
        .iter()
        .zip(sums)
        .map(|(&layer, mut sum)| {
            sum.iter_mut().for_each(|x| *x /= n);
            KeyStats { layer, tokens, dim: f, second_moment: sum }
        })
        .collect())
}

fn flush(acc: &mut Tensor, sum: &mut [f64]) -> Result<()> {
    let v: Vec<f32> = acc.flatten_all()?.to_vec1()?;
    for (s, x) in sum.iter_mut().zip(v) {
        *s += x as f64;
    }
    *acc = acc.zeros_like()?;
    Ok(())
}

/// Loads C of each layer from the cache, computing (in one pass) and caching the missing ones.
pub fn load_or_compute(
    model: &Llama,
    tok: &Tok,
    model_fp: &str,
    layers: &[usize],
    max_tokens: usize,
    corpus: &Corpus,
) -> Result<Vec<KeyStats>> {
    let mut found: Vec<Option<KeyStats>> = Vec::with_capacity(layers.len());
    for &layer in layers {
        let path = cache_path(model_fp, layer, max_tokens, corpus);
        let cached = if path.is_file() {
            match read(&path, layer) {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!("warning: ignoring unreadable statistics cache: {e:#}");
                    None
                }
            }
        } else {
            None
        };
        found.push(cached);
    }
    let missing: Vec<usize> =
        layers.iter().zip(&found).filter(|(_, f)| f.is_none()).map(|(l, _)| *l).collect();
    if !missing.is_empty() {
        let t = std::time::Instant::now();
        let computed = compute_many(model, tok, &missing, max_tokens, corpus)?;
        let secs = t.elapsed().as_secs_f64();
        if let Some(first) = computed.first().filter(|_| std::io::stderr().is_terminal()) {
            eprintln!(
                "key statistics: layers {missing:?}, {} tokens in {secs:.1} s ({:.0} tokens/s); cached in {}",
                first.tokens,
                first.tokens as f64 / secs.max(1e-9),
                cache_dir().display()
            );
        }
        for s in computed {
            let path = cache_path(model_fp, s.layer, max_tokens, corpus);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("{}: cannot create cache folder", dir.display()))?;
                // A process killed while writing left its temporary copy (f²·8 bytes) here.
                crate::fsutil::remove_stale_temps(dir);
            }
            write(&path, &s)?;
            if let Some(slot) = layers.iter().position(|&l| l == s.layer) {
                found[slot] = Some(s);
            }
        }
    }
    found.into_iter().map(|s| s.context("statistics missing")).collect()
}

/// Writes C (f64, streamed: no second copy of the f²·8 bytes) and its token count.
fn write(path: &Path, s: &KeyStats) -> Result<()> {
    let tokens = [s.tokens as i64];
    tensor_file::write(
        path,
        &[
            Data::F64("second_moment", vec![s.dim, s.dim], &s.second_moment),
            Data::I64("tokens", vec![1], &tokens),
        ],
    )
}

/// Reads C straight into its vector (no memory map, no intermediate tensor).
fn read(path: &Path, layer: usize) -> Result<KeyStats> {
    crate::loader::hf::check_safetensors(path)?;
    let files = TensorFiles::open(&[path.to_path_buf()])
        .with_context(|| format!("{}: cannot read statistics", path.display()))?;
    let (shape, second_moment) =
        files.read_f64("second_moment").with_context(|| format!("{}: no `second_moment`", path.display()))?;
    let tokens: Vec<i64> = files
        .load("tokens", &candle_core::Device::Cpu)
        .with_context(|| format!("{}: no `tokens`", path.display()))?
        .to_vec1()?;
    let [f, f2] = shape[..] else {
        bail!("{}: second moment is not a matrix", path.display());
    };
    if f != f2 {
        bail!("{}: second moment is not square", path.display());
    }
    Ok(KeyStats {
        layer,
        tokens: tokens.first().copied().unwrap_or(0).max(0) as usize,
        dim: f,
        second_moment,
    })
}
