//! CPU reference of `crate::ops::patch` (to be written).
