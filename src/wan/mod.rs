//! The Wan 2.1 text-to-video models: configuration, checkpoint loading and the DiT.

mod checkpoint;
mod config;

pub use checkpoint::{Checkpoint, Layout};
pub use config::WanConfig;
