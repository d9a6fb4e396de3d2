//! Editing a bf16 model keeps O-Edit's guarantee: the edited layer holds an f32 master weight,
//! so an update orthogonal to earlier keys leaves their outputs as they were (to f32 precision),
//! which rounding the whole layer back to bf16 after each edit would not.

use candle_core::{DType, Tensor};
use oedit::data::parse_record;
use oedit::edit::templates::context_templates;
use oedit::edit::{Editor, Method};
use oedit::stats::{compute, Corpus};

use crate::common::*;

/// W k for every key, as f64.
fn outputs(w: &Tensor, keys: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let w = rows_f64(&w.to_dtype(DType::F64).unwrap());
    keys.iter().map(|k| w.iter().map(|row| dot64(row, k)).collect()).collect()
}

fn max_rel_change(before: &[Vec<f64>], after: &[Vec<f64>]) -> f64 {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            let d: Vec<f64> = b.iter().zip(a).map(|(x, y)| x - y).collect();
            norm64(&d) / norm64(b).max(1e-12)
        })
        .fold(0.0, f64::max)
}

#[test]
fn bf16_edits_spare_earlier_keys_through_an_f32_master() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path(), TinyOpts::default());
    let mut lm = load_dtype(&model_dir, DType::BF16);
    assert_eq!(lm.model.dtype(), DType::BF16);
    let hp = tiny_hparams_struct();
    let layer = hp.layer;
    let corpus = Corpus::from_path(&corpus_file()).unwrap();
    let stats = compute(&lm.model, &lm.tok, layer, hp.cov_tokens, &corpus).unwrap();
    let templates = context_templates(&lm.model, &lm.tok, hp.context_templates, hp.template_length).unwrap();
    let method = Method::named("oedit-plus").unwrap();
    let mut editor = Editor::new(method, hp, templates, &[stats]).unwrap();
    let mut keys: Vec<Vec<f64>> = Vec::new();
    let (mut worst_master, mut worst_rounded) = (0.0f64, 0.0f64);
    for line in minimal_lines(4) {
        let rec = parse_record(&line).unwrap();
        let w_before = lm.model.down_proj(layer).clone();
        let (outcome, applied) = editor.edit(&mut lm.model, &lm.tok, &rec).unwrap();
        let w_after = lm.model.down_proj(layer).clone();
        assert_eq!(w_after.dtype(), DType::F32, "the edited layer keeps an f32 master");
        assert!(outcome.target_wins || outcome.p_target_after > outcome.p_target_before);
        if !keys.is_empty() {
            worst_master =
                worst_master.max(max_rel_change(&outputs(&w_before, &keys), &outputs(&w_after, &keys)));
            // What rounding the layer to bf16 after each edit would have done to the same keys.
            let round = |w: &Tensor| w.to_dtype(DType::BF16).unwrap();
            let rounded =
                max_rel_change(&outputs(&round(&w_before), &keys), &outputs(&round(&w_after), &keys));
            worst_rounded = worst_rounded.max(rounded);
        }
        keys.push(applied[0].key.iter().map(|&x| x as f64).collect());
    }
    assert!(worst_master < 1e-5, "earlier keys' outputs moved by {worst_master} (relative)");
    assert!(
        worst_rounded > 10.0 * worst_master.max(1e-7),
        "bf16 rounding would be as exact: {worst_rounded}"
    );
    // The rest of the model stays bf16, and the forward mixes the two.
    assert_eq!(lm.model.down_proj(0).dtype(), DType::BF16);
    let ids = sample_ids(6, 1);
    let l = logits(&lm.model, &ids);
    let v: Vec<f32> = l.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
}
