//! The Wan 2.1 text-to-video models: configuration, checkpoint loading and the DiT.

pub mod backend;
mod checkpoint;
mod config;
mod dit;
pub mod pipeline;
pub mod pth;
pub mod sampler;
pub mod t5;
pub mod tokenizer;
pub mod vae;

pub use backend::{Backend, WgpuBackend};
pub use checkpoint::{Checkpoint, Layout, expected_tensors, official_name};
pub use config::WanConfig;
pub use dit::{
    Dit, DitInput, RandomInit, RandomWeights, Trace, WeightPrecision, WeightSource,
    planned_weight_bytes,
};
