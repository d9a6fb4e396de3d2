//! Integration tests of oedit: loaders (HF folder, shards, hub cache, GGUF), the forward pass and
//! its editing taps, the command line, the real SmolLM2-135M model, and editing: O-Edit's
//! orthogonality, run directories (resume, corruption, guards), export and evaluation.

mod common;

mod batch;
mod bf16;
mod checkpoint;
mod chunks;
mod cli;
mod edit;
mod eval;
mod fluency;
mod forward;
mod generate;
mod geneval;
mod gguf_tokenizer;
mod landing;
mod limits;
mod loaders;
mod methods;
mod resume;
mod rundir;
mod runlog;
mod scoring;
mod smollm2;
