//! CPU reference of `crate::ops::elementwise` (to be written).
