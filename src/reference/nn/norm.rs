//! CPU reference of `crate::ops::norm` (to be written).
