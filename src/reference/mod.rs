//! CPU implementations of every kernel: the test oracle, written to read like the math.
//! Accumulations are in f64 unless a function says it mirrors an f32 reference step.

mod nabla;
pub mod nn;

pub use nabla::*;
