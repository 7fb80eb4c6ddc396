//! The operations of the Wan DiT (and later umT5 and the VAE) on the wgpu layer: each is a WGSL
//! kernel under `shaders/nn/` or `shaders/linalg/`, a dispatcher here that validates shapes and
//! records into a [`crate::Batch`], a CPU reference in [`crate::reference::nn`], and a test.
//!
//! Every op has two entry points: `record_*` (into a batch, output tensor given, no
//! allocation) and a convenience function that allocates the output and submits.

pub mod attention_bias;
pub mod conv;
pub mod elementwise;
pub mod linear;
pub mod norm;
pub mod patch;
pub mod rope;

/// Every kernel variant of the ops (validated by naga in `tests/shaders.rs`).
pub fn variants() -> Vec<(String, String)> {
    let mut v = Vec::new();
    v.extend(linear::variants());
    v.extend(attention_bias::variants());
    v.extend(conv::variants());
    v.extend(norm::variants());
    v.extend(elementwise::variants());
    v.extend(rope::variants());
    v.extend(patch::variants());
    v
}
