//! The causal LM: configuration, batching, the forward pass with editing taps.

pub mod batch;
pub mod config;
pub mod linear;
pub mod llama;

pub use batch::{Batch, Padding};
pub use config::HfConfig;
pub use llama::{Captured, DeltaHook, LayerCtx, Llama, Mode, Taps};
