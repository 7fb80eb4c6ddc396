//! CPU references of the DiT operations (`crate::ops`), one file per ops module.

pub mod elementwise;
pub mod linear;
pub mod norm;
pub mod patch;
pub mod rope;
