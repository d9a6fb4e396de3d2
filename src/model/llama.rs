//! Our Llama-family causal LM (Llama-2, Llama-3, Mistral, SmolLM2), shaped like a
//! candle-transformers model file, with the taps the editor needs:
//! reading the MLP down-projection input ("keys"), adding a trainable vector to an MLP output,
//! running a range of layers, and replacing a down-projection matrix in place.
//!
//! Weights use the Hugging Face layout (half-split rotary embeddings). Every op on the
//! differentiable path has a backward in candle.

use std::ops::Range;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::batch::Batch;
use super::config::HfConfig;
use super::linear::{linear, linear_const_grad, Linear};

/// How the forward pass is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Fused, no-backward ops: fastest, for inference.
    Inference,
    /// Ops with a backward only, weights treated as constants: for optimising an added vector.
    Differentiable,
}

/// A trainable vector added to the MLP output of one layer at selected positions.
pub struct DeltaHook<'a> {
    /// Layer whose MLP output receives the vector.
    pub layer: usize,
    /// `[batch, seq, 1]`, 1.0 where the vector is added, 0.0 elsewhere (model dtype).
    pub mask: &'a Tensor,
    /// `[hidden]`, the vector.
    pub delta: &'a Tensor,
}

/// What to tap during a forward pass.
#[derive(Default)]
pub struct Taps<'a> {
    /// Capture the down-projection input (the key) of this layer, `[batch, seq, intermediate]`.
    pub capture_keys: Option<usize>,
    /// Add a vector to the MLP output of one layer.
    pub add_delta: Option<DeltaHook<'a>>,
    /// Capture every run layer's attention keys/values (after rope, before head repetition).
    pub capture_kv: bool,
    /// Keys/values of the full sequences per layer (indexed by layer), for a suffix run
    /// (a [`LayerCtx::suffix`] context): only the suffix positions are recomputed; or the keys/values
    /// a decoding step ([`LayerCtx::step`]) attends to before its own token.
    pub kv_cache: Option<&'a [(Tensor, Tensor)]>,
}

/// What a forward pass captured.
#[derive(Default, Debug)]
pub struct Captured {
    /// Keys at the layer named in [`Taps::capture_keys`].
    pub keys: Option<Tensor>,
    /// MLP output at that same layer, `[batch, seq, hidden]`.
    pub mlp_out: Option<Tensor>,
    /// Attention keys/values `[batch, kv_heads, seq, head_dim]` of each run layer, in order
    /// (full length: for a suffix run, the cache with the suffix spliced in; for a decoding step,
    /// the cache with the step's token appended).
    pub kv: Vec<(Tensor, Tensor)>,
}

/// Where the recomputed suffix goes inside the cached full-length keys/values.
#[derive(Clone)]
struct Splice {
    /// `[b, 1, T, S]`: 1 where suffix position i lands at full position t.
    place: Tensor,
    /// `[b, 1, T, 1]`: 0 at replaced positions, 1 elsewhere.
    keep: Tensor,
}

/// Per-batch tensors shared by all layers: rotary tables and the attention bias.
pub struct LayerCtx {
    cos: Tensor,
    sin: Tensor,
    /// The first halves of `cos`/`sin` as `[b, t, head_dim / 2]`, for the fused rotary kernel.
    rope: (Tensor, Tensor),
    bias: Tensor,
    mode: Mode,
    splice: Option<Splice>,
    /// Attend to the cached keys/values followed by this pass's own (incremental decoding).
    append: bool,
}

/// The suffix of each row from a start position, padded to a common length.
pub struct Suffix {
    /// Context for running layers on the suffix against cached keys/values.
    pub ctx: LayerCtx,
    /// Common (padded) suffix length.
    pub len: usize,
    /// Start of each row's suffix (real-token index).
    pub starts: Vec<usize>,
    /// Flat indices into `batch * seq` gathering the suffix positions (`[b * len]`).
    pub gather: Tensor,
}

impl LayerCtx {
    /// Builds the rotary tables and the causal/padding bias for `batch`.
    pub fn new(model: &Llama, batch: &Batch, mode: Mode) -> Result<Self> {
        let (cos, sin) = model.rotary(batch)?;
        let bias = batch.attention_bias(model.cfg.sliding_window, model.device())?;
        let rope = rope_halves(&cos, &sin)?;
        Ok(Self { cos, sin, rope, bias, mode, splice: None, append: false })
    }

    /// The same tables for another mode.
    pub fn with_mode(&self, mode: Mode) -> Self {
        Self {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            rope: self.rope.clone(),
            bias: self.bias.clone(),
            mode,
            splice: self.splice.clone(),
            append: self.append,
        }
    }

    /// A context for rows whose rotary positions and attention pattern the caller chooses
    /// (several sequences packed into one row, or a shared prefix with several continuations):
    /// `positions[r][i]` is the rotary position of index `i` of row `r` (all rows of one length
    /// `t`) and `bias` the additive attention bias `[rows, 1, t, t]` (0 where visible, a large
    /// negative value where masked).
    pub fn custom(model: &Llama, positions: &[Vec<usize>], bias: Vec<f32>, mode: Mode) -> Result<Self> {
        let b = positions.len();
        let t = positions.first().map_or(0, Vec::len);
        if positions.iter().any(|p| p.len() != t) || bias.len() != b * t * t {
            candle_core::bail!("custom context: positions and bias do not match {b} rows of {t}");
        }
        let half = model.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(b * t * half * 2), Vec::with_capacity(b * t * half * 2));
        for &pos in positions.iter().flatten() {
            for _ in 0..2 {
                for f in &model.inv_freq {
                    let a = pos as f64 * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        let (dev, dt) = (model.device(), model.dtype());
        let cos = Tensor::from_vec(cos, (b, 1, t, half * 2), dev)?.to_dtype(dt)?;
        let sin = Tensor::from_vec(sin, (b, 1, t, half * 2), dev)?.to_dtype(dt)?;
        Ok(Self {
            rope: rope_halves(&cos, &sin)?,
            cos,
            sin,
            bias: Tensor::from_vec(bias, (b, 1, t, t), dev)?,
            mode,
            splice: None,
            append: false,
        })
    }

    /// A context for one decoding step: one new token per row at rotary position
    /// `positions[r]`, attending to `kv_len` cached keys/values (see [`Taps::kv_cache`]) followed
    /// by itself; `bias` is the additive bias `[rows, 1, 1, kv_len + 1]` over those (0 where
    /// visible, a large negative value where masked, e.g. a row's left padding).
    pub fn step(model: &Llama, positions: &[usize], bias: Vec<f32>, kv_len: usize) -> Result<Self> {
        let b = positions.len();
        if bias.len() != b * (kv_len + 1) {
            candle_core::bail!("decoding step: bias does not match {b} rows of {} keys", kv_len + 1);
        }
        let one: Vec<Vec<usize>> = positions.iter().map(|&p| vec![p]).collect();
        let mut ctx = Self::custom(model, &one, vec![0.0; b], Mode::Inference)?;
        ctx.bias = Tensor::from_vec(bias, (b, 1, 1, kv_len + 1), model.device())?;
        ctx.append = true;
        Ok(ctx)
    }

    /// This context restricted to the rows `rows` (a `[k]` u32 index, in the order given): what a
    /// stacked optimisation runs on once some of its records have stopped.
    pub fn select_rows(&self, rows: &Tensor) -> Result<LayerCtx> {
        let sel = |t: &Tensor| t.index_select(rows, 0);
        let splice = match &self.splice {
            Some(s) => Some(Splice { place: sel(&s.place)?, keep: sel(&s.keep)? }),
            None => None,
        };
        Ok(LayerCtx {
            cos: sel(&self.cos)?,
            sin: sel(&self.sin)?,
            rope: (sel(&self.rope.0)?, sel(&self.rope.1)?),
            bias: sel(&self.bias)?,
            mode: self.mode,
            splice,
            append: self.append,
        })
    }

    /// A context for recomputing only positions `starts[r]..` of each row of a right-padded
    /// `batch` against keys/values cached from a full pass (see [`Taps::kv_cache`]).
    pub fn suffix(model: &Llama, batch: &Batch, starts: &[usize], mode: Mode) -> Result<Suffix> {
        let (b, t) = (batch.batch_size(), batch.seq_len());
        let s = (0..b).map(|r| batch.len_of(r) - starts[r].min(batch.len_of(r) - 1)).max().unwrap_or(1);
        let half = model.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(b * s * half * 2), Vec::with_capacity(b * s * half * 2));
        let mut bias = vec![-1e9f32; b * s * t];
        let mut place = vec![0f32; b * t * s];
        let mut keep = vec![1f32; b * t];
        let mut gather = Vec::with_capacity(b * s);
        for r in 0..b {
            let len = batch.len_of(r);
            for i in 0..s {
                let j = starts[r] + i;
                let valid = j < len;
                let jj = if valid { j } else { len - 1 };
                gather.push(batch.flat_index(r, jj) as u32);
                let pos = batch.position(r, batch.index_of(r, jj)) as f64;
                for _ in 0..2 {
                    for f in &model.inv_freq {
                        cos.push((pos * f).cos() as f32);
                        sin.push((pos * f).sin() as f32);
                    }
                }
                let q = batch.index_of(r, jj);
                for k in 0..=q {
                    let in_window = model.cfg.sliding_window.is_none_or(|w| q - k < w);
                    if batch.is_real(r, k) && in_window {
                        bias[(r * s + i) * t + k] = 0.0;
                    }
                }
                if valid {
                    let full = batch.index_of(r, j);
                    place[(r * t + full) * s + i] = 1.0;
                    keep[r * t + full] = 0.0;
                }
            }
        }
        let dev = model.device();
        let dt = model.dtype();
        let cos = Tensor::from_vec(cos, (b, 1, s, half * 2), dev)?.to_dtype(dt)?;
        let sin = Tensor::from_vec(sin, (b, 1, s, half * 2), dev)?.to_dtype(dt)?;
        let ctx = LayerCtx {
            rope: rope_halves(&cos, &sin)?,
            cos,
            sin,
            bias: Tensor::from_vec(bias, (b, 1, s, t), dev)?,
            mode,
            append: false,
            splice: Some(Splice {
                place: Tensor::from_vec(place, (b, 1, t, s), dev)?.to_dtype(dt)?,
                keep: Tensor::from_vec(keep, (b, 1, t, 1), dev)?.to_dtype(dt)?,
            }),
        };
        Ok(Suffix { ctx, len: s, starts: starts.to_vec(), gather: Tensor::from_vec(gather, b * s, dev)? })
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Inference => candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32),
        Mode::Differentiable => candle_nn::ops::rms_norm_slow(x, w, eps as f32),
    }
}

fn proj(x: &Tensor, l: &Linear, mode: Mode) -> Result<Tensor> {
    l.forward(x, mode == Mode::Differentiable)
}

fn lin(x: &Tensor, w: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Inference => linear(x, w),
        Mode::Differentiable => linear_const_grad(x, w),
    }
}

/// The first halves of the rotary tables `[b, 1, t, hd]` (whose halves are equal) as
/// contiguous `[b, t, hd / 2]`, the layout of candle's fused rotary kernel.
fn rope_halves(cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor)> {
    let half = |x: &Tensor| -> Result<Tensor> {
        let hd = x.dim(D::Minus1)?;
        x.squeeze(1)?.narrow(D::Minus1, 0, hd / 2)?.contiguous()
    };
    Ok((half(cos)?, half(sin)?))
}

/// The rotary embedding of `x: [b, heads, t, hd]` (contiguous) for `ctx`: candle's fused kernel
/// in inference (the same products and sums, one pass, in parallel), [`apply_rotary`]'s ops
/// (which have a backward) otherwise.
fn rotary(x: &Tensor, ctx: &LayerCtx) -> Result<Tensor> {
    match ctx.mode {
        Mode::Inference => candle_nn::rotary_emb::rope(x, &ctx.rope.0, &ctx.rope.1),
        Mode::Differentiable => apply_rotary(x, &ctx.cos, &ctx.sin),
    }
}

/// Half-split rotary embedding: `x·cos + rotate_half(x)·sin`, with `cos/sin: [b, 1, t, hd]`.
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Self-attention with grouped-query heads.
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &HfConfig, t: bool) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.kv_heads());
        Ok(Self {
            q_proj: Linear::new(vb.get((nh * hd, d), "q_proj.weight")?, t)?,
            k_proj: Linear::new(vb.get((nkv * hd, d), "k_proj.weight")?, t)?,
            v_proj: Linear::new(vb.get((nkv * hd, d), "v_proj.weight")?, t)?,
            o_proj: Linear::new(vb.get((d, nh * hd), "o_proj.weight")?, t)?,
            n_head: nh,
            n_kv: nkv,
            head_dim: hd,
        })
    }

    /// Returns the output and the keys/values attended to (full length, after splicing a
    /// suffix into the cache; before head repetition).
    fn forward(
        &self,
        x: &Tensor,
        ctx: &LayerCtx,
        cache: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (b, t, _) = x.dims3()?;
        let mode = ctx.mode;
        let heads = |w: &Linear, n: usize| -> Result<Tensor> {
            proj(x, w, mode)?.reshape((b, t, n, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = rotary(&heads(&self.q_proj, self.n_head)?, ctx)?;
        let k = rotary(&heads(&self.k_proj, self.n_kv)?, ctx)?;
        let v = heads(&self.v_proj, self.n_kv)?;
        let (k, v) = match (&ctx.splice, cache) {
            (Some(sp), Some((kc, vc))) => {
                let splice = |c: &Tensor, new: &Tensor| -> Result<Tensor> {
                    c.broadcast_mul(&sp.keep)?.broadcast_add(&sp.place.broadcast_matmul(new)?)
                };
                (splice(kc, &k)?, splice(vc, &v)?)
            }
            (None, Some((kc, vc))) if ctx.append => (Tensor::cat(&[kc, &k], 2)?, Tensor::cat(&[vc, &v], 2)?),
            (None, None) if ctx.append => {
                candle_core::bail!("a decoding step needs the cached keys/values of every layer")
            }
            (Some(_), None) => candle_core::bail!("a suffix run needs the cached keys/values of every layer"),
            _ => (k, v),
        };
        // Grouped-query attention: key/value head j serves query heads j·rep … (j+1)·rep − 1, so
        // those query heads are stacked as the rows of one product with head j's keys and values
        // instead of copying every key/value head rep times (a decoding step's cache is most of
        // the bytes it moves).
        let (rep, kv_len, hd) = (self.n_head / self.n_kv, k.dim(2)?, self.head_dim);
        let dtype = q.dtype();
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let grouped = q.reshape((b, self.n_kv, rep * t, hd))?;
        let scores = (grouped.matmul(&k.t()?)? * scale)?
            .reshape((b, self.n_head, t, kv_len))?
            .to_dtype(DType::F32)?
            .broadcast_add(&ctx.bias)?;
        let probs = match mode {
            Mode::Inference => candle_nn::ops::softmax_last_dim(&scores)?,
            Mode::Differentiable => candle_nn::ops::softmax(&scores, D::Minus1)?,
        }
        .to_dtype(dtype)?;
        let out = probs
            .reshape((b, self.n_kv, rep * t, kv_len))?
            .matmul(&v)?
            .reshape((b, self.n_head, t, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, self.n_head * hd))?;
        Ok((proj(&out, &self.o_proj, mode)?, (k, v)))
    }
}

/// The gated MLP: `down(silu(gate(x)) * up(x))`.
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &HfConfig, t: bool) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::new(vb.get((f, d), "gate_proj.weight")?, t)?,
            up_proj: Linear::new(vb.get((f, d), "up_proj.weight")?, t)?,
            down_proj: Linear::new(vb.get((d, f), "down_proj.weight")?, t)?,
        })
    }

    /// Returns (key = down-projection input, output).
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        let key = (proj(x, &self.gate_proj, mode)?.silu()? * proj(x, &self.up_proj, mode)?)?;
        let out = proj(&key, &self.down_proj, mode)?;
        Ok((key, out))
    }
}

/// One decoder layer.
pub struct Block {
    input_layernorm: Tensor,
    attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &HfConfig, t: bool) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            input_layernorm: vb.get(d, "input_layernorm.weight")?,
            attn: Attention::load(vb.pp("self_attn"), cfg, t)?,
            post_attention_layernorm: vb.get(d, "post_attention_layernorm.weight")?,
            mlp: Mlp::load(vb.pp("mlp"), cfg, t)?,
        })
    }
}

/// A Llama-family causal LM.
pub struct Llama {
    cfg: HfConfig,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    inv_freq: Vec<f64>,
}

impl Llama {
    /// Loads the weights (Hugging Face names) from `vb`.
    pub fn load(vb: VarBuilder, cfg: &HfConfig) -> Result<Self> {
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let m = vb.pp("model");
        let embed_tokens = m.get((v, d), "embed_tokens.weight")?;
        // Transposed weight copies double the memory of the linear layers: only for small CPU models.
        let t = embed_tokens.device().is_cpu() && cfg.parameter_count() < 2_000_000_000;
        // Layers load in parallel: the transposed copies are most of a small model's start-up.
        let layers = (0..cfg.num_hidden_layers)
            .into_par_iter()
            .map(|i| Block::load(m.pp(format!("layers.{i}")), cfg, t))
            .collect::<Result<Vec<_>>>()?;
        let norm = m.get(d, "norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            None
        } else {
            Some(vb.get((v, d), "lm_head.weight")?)
        };
        Ok(Self { cfg: cfg.clone(), embed_tokens, layers, norm, lm_head, inv_freq: cfg.inv_freq() })
    }

    /// The model's configuration.
    pub fn config(&self) -> &HfConfig {
        &self.cfg
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Device holding the weights.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// The down-projection weight `[hidden, intermediate]` of `layer`.
    pub fn down_proj(&self, layer: usize) -> &Tensor {
        self.layers[layer].mlp.down_proj.weight()
    }

    /// Replaces the down-projection weight of `layer` (same shape and device).
    ///
    /// An f32 weight stays f32 whatever the model's dtype: it is the master copy of an edited
    /// layer, so that every update is added in f32 and never rounded to bf16/f16 (a dense rounding
    /// error would not be orthogonal to earlier edits' keys). The layer's product then runs in
    /// f32 and its output is cast back to the model's dtype. Other dtypes are converted to the
    /// current weight's.
    pub fn set_down_proj(&mut self, layer: usize, w: Tensor) -> Result<()> {
        let old = &self.layers[layer].mlp.down_proj;
        let ow = old.weight();
        if ow.dims() != w.dims() {
            candle_core::bail!("down_proj shape {:?} does not match {:?}", w.dims(), ow.dims());
        }
        let dtype = if w.dtype() == DType::F32 { DType::F32 } else { ow.dtype() };
        let w = w.to_dtype(dtype)?.to_device(ow.device())?;
        let transposed = old.has_transposed_copy();
        self.layers[layer].mlp.down_proj = Linear::new(w, transposed)?;
        Ok(())
    }

    /// All weights under their Hugging Face names (for export).
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.clone())];
        for (i, b) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let items = [
                ("input_layernorm.weight", &b.input_layernorm),
                ("self_attn.q_proj.weight", b.attn.q_proj.weight()),
                ("self_attn.k_proj.weight", b.attn.k_proj.weight()),
                ("self_attn.v_proj.weight", b.attn.v_proj.weight()),
                ("self_attn.o_proj.weight", b.attn.o_proj.weight()),
                ("post_attention_layernorm.weight", &b.post_attention_layernorm),
                ("mlp.gate_proj.weight", b.mlp.gate_proj.weight()),
                ("mlp.up_proj.weight", b.mlp.up_proj.weight()),
                ("mlp.down_proj.weight", b.mlp.down_proj.weight()),
            ];
            out.extend(items.into_iter().map(|(n, t)| (format!("{p}.{n}"), t.clone())));
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.clone()));
        }
        out
    }

    fn rotary(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        let (b, t) = (batch.batch_size(), batch.seq_len());
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(b * t * half * 2);
        let mut sin = Vec::with_capacity(b * t * half * 2);
        for r in 0..b {
            for i in 0..t {
                let pos = batch.position(r, i) as f64;
                for _ in 0..2 {
                    for f in &self.inv_freq {
                        let a = pos * f;
                        cos.push(a.cos() as f32);
                        sin.push(a.sin() as f32);
                    }
                }
            }
        }
        let shape = (b, 1, t, half * 2);
        let dev = self.device();
        let cos = Tensor::from_vec(cos, shape, dev)?.to_dtype(self.dtype())?;
        let sin = Tensor::from_vec(sin, shape, dev)?.to_dtype(self.dtype())?;
        Ok((cos, sin))
    }

    /// Token embeddings `[batch, seq, hidden]`.
    pub fn embed(&self, batch: &Batch) -> Result<Tensor> {
        let ids = batch.ids(self.device())?;
        let (b, t) = ids.dims2()?;
        self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.hidden_size))
    }

    /// Runs the layers in `layers` on the residual stream `h`.
    pub fn run_layers(
        &self,
        mut h: Tensor,
        layers: Range<usize>,
        ctx: &LayerCtx,
        taps: &Taps,
        captured: &mut Captured,
    ) -> Result<Tensor> {
        for l in layers {
            let block = &self.layers[l];
            let x = rms_norm(&h, &block.input_layernorm, self.cfg.rms_norm_eps, ctx.mode)?;
            let cache = match taps.kv_cache {
                Some(c) => Some(c.get(l).ok_or_else(|| {
                    candle_core::Error::Msg(format!("no cached keys/values for layer {l}"))
                })?),
                None => None,
            };
            let (attn, kv) = block.attn.forward(&x, ctx, cache)?;
            if taps.capture_kv {
                captured.kv.push(kv);
            }
            h = (h + attn)?;
            let x = rms_norm(&h, &block.post_attention_layernorm, self.cfg.rms_norm_eps, ctx.mode)?;
            let (key, mut out) = block.mlp.forward(&x, ctx.mode)?;
            if let Some(hook) = taps.add_delta.as_ref().filter(|hk| hk.layer == l) {
                out = out.broadcast_add(&hook.mask.broadcast_mul(&hook.delta.reshape((1, 1, ()))?)?)?;
            }
            if taps.capture_keys == Some(l) {
                captured.keys = Some(key);
                captured.mlp_out = Some(out.clone());
            }
            h = (h + out)?;
        }
        Ok(h)
    }

    /// Final norm and LM head on `h: [.., hidden]`, giving logits `[.., vocab]` in f32.
    pub fn logits(&self, h: &Tensor, mode: Mode) -> Result<Tensor> {
        let h = rms_norm(h, &self.norm, self.cfg.rms_norm_eps, mode)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        lin(&h, head, mode)?.to_dtype(DType::F32)
    }

    /// Logits `[n, vocab]` at the flat positions `rows` (indices into `batch * seq`) of `h`.
    pub fn logits_at(&self, h: &Tensor, rows: &Tensor, mode: Mode) -> Result<Tensor> {
        let d = self.cfg.hidden_size;
        let flat = h.reshape(((), d))?;
        self.logits(&flat.index_select(rows, 0)?, mode)
    }

    /// Full forward pass: logits at every position `[batch, seq, vocab]`.
    pub fn forward(&self, batch: &Batch, taps: &Taps) -> Result<(Tensor, Captured)> {
        let ctx = LayerCtx::new(self, batch, Mode::Inference)?;
        let mut captured = Captured::default();
        let h = self.run_layers(self.embed(batch)?, 0..self.layers.len(), &ctx, taps, &mut captured)?;
        Ok((self.logits(&h, Mode::Inference)?, captured))
    }
}
