//! CPU reference of [`crate::ops::elementwise`]: add, gated residual, GELU_tanh, SiLU and the
//! head layout moves. Math in f64 on f32 inputs, rounded to f32 once.

/// `a + b` elementwise.
pub fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "add: lengths");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 + y as f64) as f32)
        .collect()
}

/// The residual update `x + y·gate` of row-major `[rows, cols]` tensors, with `gate` one row of
/// `cols` values broadcast over all rows (`None`: `x + y`).
pub fn gated_residual(x: &[f32], y: &[f32], cols: usize, gate: Option<&[f32]>) -> Vec<f32> {
    assert_eq!(x.len(), y.len(), "gated_residual: lengths");
    if let Some(g) = gate {
        assert_eq!(g.len(), cols, "gated_residual: gate length");
    }
    x.iter()
        .zip(y)
        .enumerate()
        .map(|(i, (&a, &b))| {
            let g = gate.map_or(1.0, |g| g[i % cols] as f64);
            (a as f64 + b as f64 * g) as f32
        })
        .collect()
}

/// `GELU_tanh(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (PyTorch's `approximate="tanh"`).
pub fn gelu_tanh(x: &[f32]) -> Vec<f32> {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    x.iter()
        .map(|&v| {
            let v = v as f64;
            (0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh())) as f32
        })
        .collect()
}

/// `SiLU(x) = x / (1 + exp(−x))`.
pub fn silu(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| {
            let v = v as f64;
            (v / (1.0 + (-v).exp())) as f32
        })
        .collect()
}

/// Splits `x` `[seq, heads·head_dim]` into `[heads, seq, head_dim]`:
/// `out[h, s, d] = x[s, h·head_dim + d]`.
pub fn split_heads(x: &[f32], seq: usize, heads: usize, head_dim: usize) -> Vec<f32> {
    assert_eq!(x.len(), seq * heads * head_dim, "split_heads: length");
    let mut out = Vec::with_capacity(x.len());
    for h in 0..heads {
        for s in 0..seq {
            let start = (s * heads + h) * head_dim;
            out.extend_from_slice(&x[start..start + head_dim]);
        }
    }
    out
}

/// Merges `x` `[heads, seq, head_dim]` into `[seq, heads·head_dim]`:
/// `out[s, h·head_dim + d] = x[h, s, d]`.
pub fn merge_heads(x: &[f32], heads: usize, seq: usize, head_dim: usize) -> Vec<f32> {
    assert_eq!(x.len(), seq * heads * head_dim, "merge_heads: length");
    let mut out = Vec::with_capacity(x.len());
    for s in 0..seq {
        for h in 0..heads {
            let start = (h * seq + s) * head_dim;
            out.extend_from_slice(&x[start..start + head_dim]);
        }
    }
    out
}
