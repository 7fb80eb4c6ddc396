//! CPU references of the DiT operations (`crate::ops`), one file per ops module.

pub mod attention_bias;
pub mod conv;
pub mod elementwise;
pub mod linear;
pub mod norm;
pub mod patch;
pub mod rope;
