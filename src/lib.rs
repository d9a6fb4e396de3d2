//! oedit: sequential knowledge editing of Llama-family language models with orthogonal
//! subspace updates (O-Edit), in Rust on candle.

pub mod cli;
pub mod data;
pub mod decode;
pub mod device;
pub mod edit;
pub mod eval;
pub mod export;
pub mod factor_cache;
pub mod fingerprint;
pub mod fsutil;
pub mod hparams;
pub mod infer;
pub mod limits;
pub mod linalg;
pub mod loader;
pub mod model;
pub mod output;
pub mod packing;
pub mod presets;
pub mod progress;
pub mod run;
pub mod scoring;
pub mod session;
pub mod stats;
pub mod tensor_file;
pub mod threads;
pub mod tokenizer;

/// Process exit code for an error: 141 when standard output was closed by its reader, 3 for a
/// metric below its threshold, 2 for bad input or usage, 1 for anything else.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|e| e.is::<output::OutputClosed>()) {
        141
    } else if err.chain().any(|e| e.is::<errors::ThresholdError>()) {
        3
    } else if err.chain().any(|e| e.is::<errors::InputError>()) {
        2
    } else {
        1
    }
}

pub mod errors;
