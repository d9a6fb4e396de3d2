//! Integration tests of oedit's model core: loaders (HF folder, shards, hub cache, GGUF), the
//! forward pass and its editing taps, the command line, and the real SmolLM2-135M model.

mod common;

mod cli;
mod forward;
mod loaders;
mod smollm2;
