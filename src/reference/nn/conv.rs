//! CPU reference of `crate::ops::conv` (to be written).
