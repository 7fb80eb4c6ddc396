//! CPU reference of `crate::ops::linear` (to be written).
