//! CPU reference of `crate::ops::attention_bias` (to be written).
