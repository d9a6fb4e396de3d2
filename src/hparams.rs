//! Editing hyper-parameters: one struct shared by all methods, read from a model preset in
//! `configs/` or from `--hparams FILE`, validated against the model before any work starts.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// How the stored subspace of earlier edits grows and what happens when it fills up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SubspacePolicy {
    /// Keep an edit's core directions up to this fraction of their energy.
    pub energy: f64,
    /// At most this many new directions per edit.
    pub max_directions_per_edit: usize,
    /// Cap of the basis size as a fraction of the layer's key width; at the cap the basis is
    /// compressed to half the cap by keeping its highest-energy directions.
    pub max_fraction: f64,
    /// A direction is appended only if its norm after orthogonalisation is above this fraction.
    pub tolerance: f64,
    /// Conflict policy: when less than this fraction of a new key's energy survives the
    /// projection, the stored directions it conflicts with most are released (largest first)
    /// until it does, so the update's norm stays within 1/min_retained of ROME's. Omitted: 1e-6
    /// (runs made before the field existed resume with only exact conflicts released).
    #[serde(default = "legacy_min_retained")]
    pub min_retained: f64,
}

fn legacy_min_retained() -> f64 {
    1e-6
}

impl Default for SubspacePolicy {
    fn default() -> Self {
        Self {
            energy: 0.9,
            max_directions_per_edit: 1,
            max_fraction: 0.9,
            tolerance: 0.01,
            min_retained: 0.1,
        }
    }
}

/// MEMIT: the update spread over several layers (a batch of one per edit, or its batch form with `--batch-size`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemitParams {
    /// Edited layers, ascending; the target value is optimised at the last one. Empty: the
    /// five layers `layer-4 ..= layer`.
    #[serde(default)]
    pub layers: Vec<usize>,
    /// λ in u = (λ·C + k kᵀ)⁻¹ k (MEMIT's mom2_update_weight).
    pub mom2_weight: f64,
}

impl Default for MemitParams {
    fn default() -> Self {
        Self { layers: Vec::new(), mom2_weight: 15_000.0 }
    }
}

/// AlphaEdit: the update confined to the null space of the preserved-knowledge key statistics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlphaEditParams {
    /// Eigenvectors of C with eigenvalues below this span the null space (default 1e-2, the
    /// SmolLM2 runs' value; AlphaEdit's published settings use 2e-2, as the 7B presets do).
    pub nullspace_threshold: f64,
    /// At least this many of the smallest eigenvectors are used.
    pub min_nullspace_dim: usize,
    /// Ridge α of the solve (AlphaEdit's L2).
    pub l2: f64,
    /// Layers `alphaedit` edits, ascending (`alphaedit-single` edits `layer` alone); the target
    /// value is optimised at the last one. Empty: the five layers `layer-4 ..= layer`.
    #[serde(default)]
    pub layers: Vec<usize>,
}

impl Default for AlphaEditParams {
    fn default() -> Self {
        Self { nullspace_threshold: 1e-2, min_nullspace_dim: 0, l2: 10.0, layers: Vec::new() }
    }
}

/// O-Edit+: O-Edit in whitened key space, optionally seeded with the top-energy eigenvectors of
/// C ("original knowledge"; off by default).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OeditPlusParams {
    /// Seed with the fewest top eigenvectors of C holding this fraction of its trace.
    pub core_energy: f64,
    /// At most this fraction of the key width is seeded.
    pub max_core_fraction: f64,
}

impl Default for OeditPlusParams {
    fn default() -> Self {
        Self { core_energy: 0.0, max_core_fraction: 0.25 }
    }
}

/// Soft O-Edit: earlier edits' key directions are shrunk by their stored energy rather than
/// projected out, in C's metric.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OeditSoftParams {
    /// λ in u = (λ·C + Σ k_p k_pᵀ + k kᵀ)⁻¹ k: how many edits' keys the corpus statistics weigh
    /// (MEMIT's mom2_update_weight, with the keys of all earlier edits added).
    pub lambda: f64,
}

impl Default for OeditSoftParams {
    fn default() -> Self {
        Self { lambda: 3_000.0 }
    }
}

/// Spread soft O-Edit (`oedit-spread`): soft O-Edit's solve at each of several layers, the
/// residual spread over them as MEMIT does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OeditSpreadParams {
    /// Edited layers, ascending; the target value is optimised at the last one. Empty: the five
    /// layers `layer-4 ..= layer`.
    #[serde(default)]
    pub layers: Vec<usize>,
    /// λ in u = (λ·C + Σ k_p k_pᵀ + k kᵀ)⁻¹ k at each layer.
    pub lambda: f64,
}

impl Default for OeditSpreadParams {
    fn default() -> Self {
        Self { layers: Vec::new(), lambda: 15_000.0 }
    }
}

/// How the norm of the optimised value v\* is controlled.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ValueNorm {
    /// v\* = v + δ as optimised (‖δ‖ clamped by `clamp_norm_factor` only).
    #[default]
    Free,
    /// v\* rescaled to the norm of the value it replaces, ‖v\*‖ = ‖v‖ (norm growth of v\* is
    /// what the literature finds behind collapse in long edit sequences).
    Original,
}

/// The form of the v\* objective's regularisers (the target NLL is the same in both).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VObjective {
    /// oedit's: ‖δ‖ clamped to `clamp_norm_factor`·‖v‖ and weight decay
    /// `weight_decay`·‖δ‖²/‖v‖², v the template-averaged MLP output at the subject's last token;
    /// KL(initial ‖ current) at the last token of "{subject} is a".
    #[default]
    Oedit,
    /// MEMIT's and AlphaEdit's reference code (`compute_z`): ‖δ‖ clamped to
    /// `clamp_norm_factor`·‖h‖ and weight decay `weight_decay`·‖δ‖/‖h‖², h the hidden state
    /// after the layer at the subject's last token of the bare prompt; KL(current ‖ initial) at
    /// the subject's last token of "{subject} is a".
    Memit,
}

/// Closed-loop landing (see `src/edit/landing.rs`): after an edit's update, check on the edit
/// prompt that target_new beats ground_truth by at least `min_margin`; if not, re-optimise v\* on
/// the updated weights and apply the method's rule again to what is still missing, at most
/// `max_attempts` updates per edit in all.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LandingParams {
    /// Most updates (attempts) per edit; 1 turns landing off (one update, as before landing
    /// existed).
    pub max_attempts: usize,
    /// An edit has landed when mean NLL(ground_truth) − mean NLL(target_new) on the edit prompt
    /// is at least this (nats per token); without a ground truth, when target_new is the greedy
    /// answer.
    pub min_margin: f64,
    /// Bound on how much a later attempt scales up the rule's own step to land the whole
    /// missing residual (rules that land only a share s of it, e.g. oedit-soft and alphaedit-single,
    /// are given the residual × min(1/s, max_gain)); 1 means never scale.
    pub max_gain: f64,
}

impl LandingParams {
    /// Landing off: what hyper-parameter files without a `landing` section get, so that runs
    /// made before landing existed resume unchanged.
    pub fn off() -> Self {
        Self { max_attempts: 1, min_margin: 0.0, max_gain: 1.0 }
    }

    /// Whether more than one update per edit may be made.
    pub fn enabled(&self) -> bool {
        self.max_attempts > 1
    }
}

/// Most landing attempts per edit (each costs a v\* optimisation).
pub const MAX_LANDING_ATTEMPTS: usize = 16;

/// Seed of the sampled context templates when `template_seed` is omitted (fixed, so a run's
/// templates are drawn identically by every session on the same device).
pub const DEFAULT_TEMPLATE_SEED: u64 = 0x5EED;

fn default_template_seed() -> u64 {
    DEFAULT_TEMPLATE_SEED
}

/// Hyper-parameters of one editing run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Hparams {
    /// Edited layer (its MLP down-projection).
    pub layer: usize,
    /// Number of context templates, including the bare prompt.
    pub context_templates: usize,
    /// Tokens generated per context template.
    pub template_length: usize,
    /// Context template prefixes drawn by top-k sampling with this k (ROME and MEMIT use 5);
    /// 0: greedy continuations. Omitted: 0.
    #[serde(default)]
    pub template_top_k: usize,
    /// Seed of the top-k template sampler (with `template_top_k` > 0): another seed draws
    /// other templates. Omitted: [`DEFAULT_TEMPLATE_SEED`].
    #[serde(default = "default_template_seed")]
    pub template_seed: u64,
    /// Maximum optimisation steps for v*.
    pub v_steps: usize,
    /// Adam learning rate for v*.
    pub v_lr: f64,
    /// Weight of the KL term on the "{subject} is a" prompt.
    pub kl_weight: f64,
    /// Weight of the weight decay (on ‖δ‖²/‖v‖², or ‖δ‖/‖h‖² with `v_objective: "memit"`).
    pub weight_decay: f64,
    /// ‖δ‖ is clamped to this factor times ‖v‖ (‖h‖ with `v_objective: "memit"`).
    pub clamp_norm_factor: f64,
    /// The form of the v\* regularisers (see [`VObjective`]). Omitted: oedit's.
    #[serde(default)]
    pub v_objective: VObjective,
    /// Stop the v* optimisation once the target NLL is below this.
    pub stop_loss: f64,
    /// Also stop the v\* optimisation at the first step where every target token is the most
    /// probable one on every rewrite prompt (ENCORE's most-probable early stopping). Omitted: off.
    #[serde(default)]
    pub stop_at_argmax: bool,
    /// With `stop_at_argmax`: stop only once every target token also leads the next most
    /// probable token by at least this many nats, so the edit keeps a margin for greedy
    /// decoding. Omitted: 0 (stop as soon as the targets are on top).
    #[serde(default)]
    pub argmax_margin: f64,
    /// Norm control of v\* (see [`ValueNorm`]). Omitted: free.
    #[serde(default)]
    pub value_norm: ValueNorm,
    /// Corpus tokens used for the key statistics C.
    pub cov_tokens: usize,
    /// Ridge added to C, relative to its mean diagonal.
    pub cov_regularization: f64,
    /// Subspace growth and saturation policy (O-Edit).
    #[serde(default)]
    pub subspace: SubspacePolicy,
    /// MEMIT settings.
    #[serde(default)]
    pub memit: MemitParams,
    /// AlphaEdit settings.
    #[serde(default)]
    pub alphaedit: AlphaEditParams,
    /// O-Edit+ settings.
    #[serde(default)]
    pub oedit_plus: OeditPlusParams,
    /// Soft O-Edit settings.
    #[serde(default)]
    pub oedit_soft: OeditSoftParams,
    /// Spread soft O-Edit settings.
    #[serde(default)]
    pub oedit_spread: OeditSpreadParams,
    /// Closed-loop landing (all methods). Omitted: off.
    #[serde(default = "LandingParams::off")]
    pub landing: LandingParams,
}

/// A model preset file, of which only the hyper-parameters are read here.
#[derive(Deserialize)]
struct PresetHparams {
    hparams: Hparams,
}

/// Most context templates (rows of every edit's batch).
pub const MAX_CONTEXT_TEMPLATES: usize = 64;
/// Most generated tokens per context template.
pub const MAX_TEMPLATE_LENGTH: usize = 64;

impl Hparams {
    /// Reads a JSON file holding either the hyper-parameters or a model preset with an `hparams` key,
    /// and checks every value but the layer numbers (which need the model: [`Hparams::validate`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        // Parsed from the text (not the Value) so that errors carry line and column.
        let parsed = if v.get("hparams").is_some() {
            serde_json::from_str::<PresetHparams>(&text).map(|p| p.hparams)
        } else {
            serde_json::from_str::<Hparams>(&text)
        };
        let hp = parsed.with_context(|| format!("{}: invalid hyper-parameters", path.display()))?;
        // Every value but the layer numbers (checked against the model once it loads).
        hp.validate_values().with_context(|| format!("{}: invalid hyper-parameters", path.display()))?;
        Ok(hp)
    }

    /// Checks the values against a model with `num_layers` layers.
    pub fn validate(&self, num_layers: usize) -> Result<()> {
        self.check(Some(num_layers))
    }

    /// Checks every value but the layer numbers (which need the model's layer count).
    pub fn validate_values(&self) -> Result<()> {
        self.check(None)
    }

    fn check(&self, num_layers: Option<usize>) -> Result<()> {
        if let Some(n) = num_layers.filter(|&n| self.layer >= n) {
            bail!("layer {} out of range: the model has {n} layers (0..{})", self.layer, n.saturating_sub(1));
        }
        if self.context_templates == 0 {
            bail!("context_templates must be at least 1");
        }
        // Each template is a row of every edit's batch and a prefix of its prompt: bounded, so
        // one edit's memory and time are (ROME uses about 10 templates of up to 10 tokens).
        if self.context_templates > MAX_CONTEXT_TEMPLATES || self.template_length > MAX_TEMPLATE_LENGTH {
            bail!(
                "context_templates must be at most {MAX_CONTEXT_TEMPLATES} and template_length at most \
                 {MAX_TEMPLATE_LENGTH} (got {} and {})",
                self.context_templates,
                self.template_length
            );
        }
        if self.v_steps == 0 {
            bail!("v_steps must be at least 1");
        }
        let positive = [("v_lr", self.v_lr), ("clamp_norm_factor", self.clamp_norm_factor)];
        for (name, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                bail!("{name} must be a positive number, got {v}");
            }
        }
        let non_negative = [
            ("kl_weight", self.kl_weight),
            ("weight_decay", self.weight_decay),
            ("stop_loss", self.stop_loss),
            ("argmax_margin", self.argmax_margin),
            ("cov_regularization", self.cov_regularization),
        ];
        for (name, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{name} must be a non-negative number, got {v}");
            }
        }
        if self.cov_tokens == 0 {
            bail!("cov_tokens must be at least 1");
        }
        let s = &self.subspace;
        if !(s.energy > 0.0 && s.energy <= 1.0 && s.max_fraction > 0.0 && s.max_fraction <= 1.0) {
            bail!("subspace.energy and subspace.max_fraction must be in (0, 1]");
        }
        if !(s.tolerance > 0.0 && s.tolerance < 1.0) {
            bail!("subspace.tolerance must be in (0, 1), got {}", s.tolerance);
        }
        if !(s.min_retained > 0.0 && s.min_retained < 1.0) {
            bail!("subspace.min_retained must be in (0, 1)");
        }
        if s.max_directions_per_edit == 0 {
            bail!("subspace.max_directions_per_edit must be at least 1");
        }
        let spreads = [
            ("memit.layers", &self.memit.layers),
            ("alphaedit.layers", &self.alphaedit.layers),
            ("oedit_spread.layers", &self.oedit_spread.layers),
        ];
        for (name, layers) in spreads {
            for &l in &self.spread_layers(layers) {
                if let Some(n) = num_layers.filter(|&n| l >= n) {
                    bail!("{name}: layer {l} out of range: the model has {n} layers");
                }
            }
            if !layers.windows(2).all(|w| w[0] < w[1]) {
                bail!("{name} must be strictly ascending");
            }
        }
        if !(self.memit.mom2_weight.is_finite() && self.memit.mom2_weight >= 0.0) {
            bail!("memit.mom2_weight must be a non-negative number");
        }
        let t = self.alphaedit.nullspace_threshold;
        if !(t.is_finite() && t >= 0.0) {
            bail!("alphaedit.nullspace_threshold must be a non-negative number");
        }
        if t == 0.0 && self.alphaedit.min_nullspace_dim == 0 {
            bail!("alphaedit.nullspace_threshold 0 with min_nullspace_dim 0 leaves an empty null space");
        }
        if !(self.alphaedit.l2.is_finite() && self.alphaedit.l2 > 0.0) {
            bail!("alphaedit.l2 must be a positive number");
        }
        if !(self.oedit_soft.lambda.is_finite() && self.oedit_soft.lambda > 0.0) {
            bail!("oedit_soft.lambda must be a positive number");
        }
        if !(self.oedit_spread.lambda.is_finite() && self.oedit_spread.lambda > 0.0) {
            bail!("oedit_spread.lambda must be a positive number");
        }
        let l = &self.landing;
        if l.max_attempts == 0 || l.max_attempts > MAX_LANDING_ATTEMPTS {
            bail!("landing.max_attempts must be in 1..={MAX_LANDING_ATTEMPTS}, got {}", l.max_attempts);
        }
        if !(l.min_margin.is_finite() && l.min_margin >= 0.0) {
            bail!("landing.min_margin must be a non-negative number, got {}", l.min_margin);
        }
        if !(l.max_gain.is_finite() && l.max_gain >= 1.0) {
            bail!("landing.max_gain must be a number of at least 1, got {}", l.max_gain);
        }
        let op = &self.oedit_plus;
        if !(op.core_energy >= 0.0
            && op.core_energy <= 1.0
            && op.max_core_fraction >= 0.0
            && op.max_core_fraction < 1.0)
        {
            bail!("oedit_plus.core_energy must be in [0, 1] and oedit_plus.max_core_fraction in [0, 1)");
        }
        // A full basis is compressed to half its cap, the seeds always kept: they must leave room
        // there for the edits' own directions.
        if op.core_energy > 0.0 && op.max_core_fraction >= s.max_fraction / 2.0 {
            bail!(
                "oedit_plus.max_core_fraction ({}) must be below half of subspace.max_fraction ({})",
                op.max_core_fraction,
                s.max_fraction
            );
        }
        Ok(())
    }

    /// The layers MEMIT edits (ascending).
    pub fn memit_layers(&self) -> Vec<usize> {
        self.spread_layers(&self.memit.layers)
    }

    /// The layers the multi-layer AlphaEdit edits (ascending).
    pub fn alphaedit_layers(&self) -> Vec<usize> {
        self.spread_layers(&self.alphaedit.layers)
    }

    /// The layers spread soft O-Edit edits (ascending).
    pub fn oedit_spread_layers(&self) -> Vec<usize> {
        self.spread_layers(&self.oedit_spread.layers)
    }

    /// A multi-layer method's layers: `layers`, or the five layers `layer-4 ..= layer` when empty.
    fn spread_layers(&self, layers: &[usize]) -> Vec<usize> {
        if layers.is_empty() {
            (self.layer.saturating_sub(4)..=self.layer).collect()
        } else {
            layers.to_vec()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Hparams {
        serde_json::from_value(serde_json::json!({
            "layer": 1, "context_templates": 2, "template_length": 4, "v_steps": 5, "v_lr": 0.5,
            "kl_weight": 0.0625, "weight_decay": 0.001, "clamp_norm_factor": 4.0, "stop_loss": 0.05,
            "cov_tokens": 100, "cov_regularization": 0.01
        }))
        .unwrap()
    }

    /// A field the message must name, and the change that makes the value bad.
    type BadCase = (&'static str, fn(&mut Hparams));

    #[test]
    fn method_sections_default_and_bad_values_are_named() {
        let hp = base();
        assert_eq!(hp.oedit_soft.lambda, 3_000.0);
        hp.validate(4).unwrap();
        assert_eq!(hp.landing, LandingParams::off());
        let cases: [BadCase; 17] = [
            ("subspace.tolerance", |h| h.subspace.tolerance = 1.5),
            ("subspace.tolerance", |h| h.subspace.tolerance = -0.1),
            ("subspace.tolerance", |h| h.subspace.tolerance = 0.0),
            ("below half of subspace.max_fraction", |h| {
                h.oedit_plus.core_energy = 1.0;
                h.oedit_plus.max_core_fraction = 0.5;
            }),
            ("landing.max_attempts", |h| h.landing.max_attempts = 0),
            ("landing.min_margin", |h| h.landing.min_margin = f64::NAN),
            ("landing.max_gain", |h| h.landing.max_gain = 0.5),
            ("context_templates must be at most 64", |h| h.context_templates = 1_000_000),
            ("template_length at most 64", |h| h.template_length = 65),
            ("oedit_soft.lambda", |h| h.oedit_soft.lambda = 0.0),
            ("oedit_soft.lambda", |h| h.oedit_soft.lambda = f64::NAN),
            ("alphaedit.l2", |h| h.alphaedit.l2 = -1.0),
            ("alphaedit.nullspace_threshold", |h| h.alphaedit.nullspace_threshold = -1.0),
            ("alphaedit.nullspace_threshold", |h| h.alphaedit.nullspace_threshold = f64::NAN),
            ("empty null space", |h| h.alphaedit.nullspace_threshold = 0.0),
            ("argmax_margin", |h| h.argmax_margin = -0.5),
            ("layer 7 out of range", |h| h.layer = 7),
        ];
        for (want, tweak) in cases {
            let mut h = base();
            tweak(&mut h);
            let e = h.validate(4).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} does not name {want}");
        }
    }
}
