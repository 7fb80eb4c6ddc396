//! CPU reference of [`crate::ops::linear`]: `y = act(x·Wᵀ + b)` and the fused gated residual
//! `res + gate·(x·Wᵀ + b)` in f64, and the activations
//! (shared with other references).

use crate::ops::linear::Activation;

/// GELU, tanh approximation: `0.5·v·(1 + tanh(√(2/π)·(v + 0.044715·v³)))`.
pub fn gelu_tanh(v: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
}

/// SiLU (swish): `v·sigmoid(v) = v / (1 + e^(−v))`.
pub fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// Applies an [`Activation`] in f64.
pub fn activate(v: f64, act: Activation) -> f64 {
    match act {
        Activation::None => v,
        Activation::GeluTanh => gelu_tanh(v),
        Activation::Silu => silu(v),
    }
}

/// `y[i, j] = act(Σ_c x[i, c]·w[j, c] + b[j])` for `x [m, k]`, `w [n, k]` (PyTorch layout),
/// `b [n]`; accumulation, bias and activation in f64, result rounded to f32. `w` holds the
/// weights as the GPU sees them (already rounded to f16/bf16 when stored that way).
///
/// Panics when a slice length does not match `m`, `n`, `k` (a bug in the caller).
pub fn linear(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
    act: Activation,
) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    pre_activation(x, w, b, m, n, k, |e, v| y[e] = activate(v, act) as f32);
    y
}

/// Calls `emit(i·n + j, Σ_c x[i, c]·w[j, c] + b[j])` (f64) for every output element, after
/// checking the slice lengths (panics on a mismatch: a bug in the caller).
fn pre_activation(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
    mut emit: impl FnMut(usize, f64),
) {
    assert_eq!(x.len(), m * k, "reference linear: x must be [m, k]");
    assert_eq!(w.len(), n * k, "reference linear: w must be [n, k]");
    if let Some(b) = b {
        assert_eq!(b.len(), n, "reference linear: b must be [n]");
    }
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            let dot: f64 = xr.iter().zip(wr).map(|(&a, &c)| a as f64 * c as f64).sum();
            emit(i * n + j, dot + b.map_or(0.0, |b| b[j] as f64));
        }
    }
}

/// The fused linear + gated residual of [`crate::ops::linear::record_linear_gated_residual`]:
/// `out[i, j] = res[i, j] + gate[j]·(Σ_c x[i, c]·w[j, c] + b[j])` (`gate` one row of `n`
/// values broadcast over the rows; `None`: a gate of ones), in f64, rounded once to f32.
///
/// Panics when a slice length does not match `m`, `n`, `k` (a bug in the caller).
#[allow(clippy::too_many_arguments)]
pub fn linear_gated_residual(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    res: &[f32],
    gate: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    assert_eq!(res.len(), m * n, "reference linear: res must be [m, n]");
    if let Some(g) = gate {
        assert_eq!(g.len(), n, "reference linear: gate must be [n]");
    }
    let mut y = vec![0f32; m * n];
    pre_activation(x, w, b, m, n, k, |e, v| {
        let g = gate.map_or(1.0, |g| g[e % n] as f64);
        y[e] = (res[e] as f64 + g * v) as f32;
    });
    y
}
