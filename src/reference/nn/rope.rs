//! CPU reference of `crate::ops::rope` (to be written).
