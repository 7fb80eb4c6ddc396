//! (to be written)

/// Kernel variants of this module.
pub fn variants() -> Vec<(String, String)> {
    Vec::new()
}
