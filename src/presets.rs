//! Model presets: short names (`smollm2-135m`, `llama-2-7b`, ...) defined by the JSON files in
//! `configs/`, embedded in the binary so that an installed `oedit` knows them.

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::hparams::Hparams;

/// One model preset.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// The short name users pass to `--model`.
    pub name: String,
    /// What the model is.
    pub description: String,
    /// Hugging Face hub repository id.
    pub repo_id: String,
    /// File name of a GGUF copy searched for in `$OEDIT_MODELS` and `./models` before the hub.
    #[serde(default)]
    pub local_gguf: Option<String>,
    /// Default dtype (`f32`, `bf16`, `f16`).
    pub dtype: String,
    /// Default editing hyper-parameters.
    pub hparams: Hparams,
}

const EMBEDDED: &[(&str, &str)] = &[
    ("smollm2-135m", include_str!("../configs/smollm2-135m.json")),
    ("llama-2-7b", include_str!("../configs/llama-2-7b.json")),
    ("llama-3-8b", include_str!("../configs/llama-3-8b.json")),
    ("mistral-7b", include_str!("../configs/mistral-7b.json")),
];

/// The short names that exist.
pub fn names() -> Vec<&'static str> {
    EMBEDDED.iter().map(|(n, _)| *n).collect()
}

/// The preset called `name`, if there is one.
pub fn find(name: &str) -> Result<Option<Preset>> {
    let Some((_, text)) = EMBEDDED.iter().find(|(n, _)| *n == name) else {
        return Ok(None);
    };
    let p: Preset =
        serde_json::from_str(text).with_context(|| format!("configs/{name}.json: invalid preset"))?;
    Ok(Some(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every embedded preset parses and its hyper-parameters pass the checks a run makes.
    #[test]
    fn every_preset_is_valid() {
        for name in names() {
            let p = find(name).unwrap().unwrap();
            assert_eq!(p.name, name);
            p.hparams.validate(32).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    }

    /// The 7B presets edit the layers AlphaEdit's and MEMIT's published Llama settings edit
    /// (4–8) with AlphaEdit's published null-space threshold (2e-2); SmolLM2 keeps 1–5.
    #[test]
    fn seven_b_presets_use_the_published_multi_layer_settings() {
        for name in ["llama-2-7b", "llama-3-8b", "mistral-7b"] {
            let hp = find(name).unwrap().unwrap().hparams;
            assert_eq!(hp.alphaedit_layers(), vec![4, 5, 6, 7, 8], "{name}");
            assert_eq!(hp.memit_layers(), vec![4, 5, 6, 7, 8], "{name}");
            assert_eq!(hp.alphaedit.nullspace_threshold, 2e-2, "{name}");
        }
        let hp = find("smollm2-135m").unwrap().unwrap().hparams;
        assert_eq!(hp.alphaedit_layers(), vec![1, 2, 3, 4, 5]);
    }

    /// configs/hparams/: the `--hparams` variants shipped beside the presets.
    fn variants_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/hparams")
    }

    /// Every file in configs/hparams/ is a valid `--hparams` file for SmolLM2's 30 layers.
    #[test]
    fn hparams_variants_are_valid() {
        let mut n = 0;
        for entry in std::fs::read_dir(variants_dir()).unwrap() {
            let path = entry.unwrap().path();
            let hp = Hparams::from_file(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            hp.validate(30).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            n += 1;
        }
        assert!(n >= 2, "configs/hparams holds {n} files");
    }

    /// configs/hparams/smollm2-135m-sampled.json is the SmolLM2 preset with sampled templates
    /// and nothing else changed (the README points users to it).
    #[test]
    fn sampled_variant_is_the_preset_with_top_k_5() {
        let variant = Hparams::from_file(&variants_dir().join("smollm2-135m-sampled.json")).unwrap();
        let mut want = find("smollm2-135m").unwrap().unwrap().hparams;
        want.template_top_k = 5;
        assert_eq!(variant, want);
    }

    /// configs/hparams/smollm2-135m-locality-first.json is AlphaEdit's reference configuration
    /// (the file beside it) with the presets' closed-loop landing switched on, and nothing else
    /// changed: the row measured as `alphaedit-reference-land` in bench-results.
    #[test]
    fn locality_first_variant_is_the_reference_with_landing() {
        let dir = variants_dir();
        let variant = Hparams::from_file(&dir.join("smollm2-135m-locality-first.json")).unwrap();
        let mut want = Hparams::from_file(&dir.join("smollm2-135m-alphaedit-reference.json")).unwrap();
        assert_eq!(want.landing.max_attempts, 1, "the reference configuration lands nothing further");
        want.landing = find("smollm2-135m").unwrap().unwrap().hparams.landing;
        assert_eq!(variant, want);
    }
}
