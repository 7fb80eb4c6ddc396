//! CPU reference of [`crate::ops::norm`]: LayerNorm (plain, affine, modulated) and RMSNorm over
//! the last axis, in f64 on f32 inputs, rounded to f32 once at the end.
//!
//! `x` is row-major `[rows, cols]`; `x.len()` must be a multiple of `cols`.

/// Each row normalized, `(x − mean)/√(var + eps)` with the biased variance, in f64.
fn normalized_rows(x: &[f32], cols: usize, eps: f64) -> Vec<f64> {
    assert!(
        cols > 0 && x.len().is_multiple_of(cols),
        "x is not [rows, {cols}]"
    );
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(cols) {
        let n = cols as f64;
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let r = 1.0 / (var + eps).sqrt();
        y.extend(row.iter().map(|&v| (v as f64 - mean) * r));
    }
    y
}

/// LayerNorm without parameters: `(x − mean)/√(var + eps)` per row of `cols` values (biased
/// variance), the DiT's `norm1` / `norm2` before modulation.
pub fn layer_norm(x: &[f32], cols: usize, eps: f64) -> Vec<f32> {
    normalized_rows(x, cols, eps)
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

/// Affine LayerNorm: `LN(x)·weight + bias` with `weight`, `bias` of length `cols` (`norm3`).
pub fn layer_norm_affine(
    x: &[f32],
    cols: usize,
    eps: f64,
    weight: &[f32],
    bias: &[f32],
) -> Vec<f32> {
    assert_eq!(weight.len(), cols, "weight length");
    assert_eq!(bias.len(), cols, "bias length");
    normalized_rows(x, cols, eps)
        .into_iter()
        .enumerate()
        .map(|(i, v)| (v * weight[i % cols] as f64 + bias[i % cols] as f64) as f32)
        .collect()
}

/// Modulated LayerNorm: `LN(x)·(1 + mods[scale_row]) + mods[shift_row]` with `mods` a row-major
/// `[R, cols]` table (the DiT's `m = modulation + e0`).
pub fn layer_norm_modulate(
    x: &[f32],
    cols: usize,
    eps: f64,
    mods: &[f32],
    shift_row: usize,
    scale_row: usize,
) -> Vec<f32> {
    let shift = &mods[shift_row * cols..(shift_row + 1) * cols];
    let scale = &mods[scale_row * cols..(scale_row + 1) * cols];
    normalized_rows(x, cols, eps)
        .into_iter()
        .enumerate()
        .map(|(i, v)| (v * (1.0 + scale[i % cols] as f64) + shift[i % cols] as f64) as f32)
        .collect()
}

/// RMSNorm over each full row: `x·(mean(x²) + eps)^(−1/2)·weight` with `weight` of length
/// `cols` (the DiT's q/k norms, over the whole width).
pub fn rms_norm(x: &[f32], cols: usize, weight: &[f32], eps: f64) -> Vec<f32> {
    assert!(
        cols > 0 && x.len().is_multiple_of(cols),
        "x is not [rows, {cols}]"
    );
    assert_eq!(weight.len(), cols, "weight length");
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(cols) {
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
        let r = 1.0 / (ms + eps).sqrt();
        y.extend(
            row.iter()
                .zip(weight)
                .map(|(&v, &w)| (v as f64 * r * w as f64) as f32),
        );
    }
    y
}
