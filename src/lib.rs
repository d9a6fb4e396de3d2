//! oedit: sequential knowledge editing of Llama-family language models with orthogonal
//! subspace updates (O-Edit), in Rust on candle.

pub mod data;
pub mod device;
pub mod hparams;

pub mod cli;
pub mod export;
pub mod fsutil;
pub mod infer;
pub mod loader;
pub mod model;
pub mod presets;
pub mod threads;
pub mod tokenizer;

/// Process exit code for an error: 2 for bad input or usage, 1 for anything else.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|e| e.is::<errors::InputError>()) {
        2
    } else {
        1
    }
}

pub mod errors;
