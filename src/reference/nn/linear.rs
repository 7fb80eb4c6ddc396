//! CPU reference of [`crate::ops::linear`]: `y = act(x·Wᵀ + b)` and the fused gated residual
//! `res + gate·(x·Wᵀ + b)` in f64, unrounded or with the bf16 autocast roundings of
//! [`LinearRounding::Bf16`], and the activations (shared with other references).

use crate::ops::linear::{Activation, LinearRounding};

/// GELU, tanh approximation: `0.5·v·(1 + tanh(√(2/π)·(v + 0.044715·v³)))`.
pub fn gelu_tanh(v: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
}

/// SiLU (swish): `v·sigmoid(v) = v / (1 + e^(−v))`.
pub fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// `v` rounded to the nearest bf16 (ties to even, bf16 subnormals included) and widened back,
/// exactly, in f64: NaN and ±inf stay, finite values past the largest bf16 (rounding away from
/// it) become ±inf. A single rounding from f64 (no detour through f32).
pub fn bf16_round(v: f64) -> f64 {
    if !v.is_finite() || v == 0.0 {
        return v;
    }
    // the exponent of v, floored at bf16's smallest normal exponent (below it the step is fixed)
    let e = (((v.to_bits() >> 52) & 0x7ff) as i32 - 1023).max(-126);
    let ulp = 2f64.powi(e - 7); // 8 significant bits
    let r = (v / ulp).round_ties_even() * ulp; // both steps exact: a power-of-two scale
    let max = (2.0 - 2f64.powi(-7)) * 2f64.powi(127);
    if r.abs() > max {
        f64::INFINITY.copysign(v)
    } else {
        r
    }
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
    linear_rounded(x, w, b, m, n, k, act, LinearRounding::None)
}

/// [`linear`] with the rounding of [`crate::ops::linear::record_linear_rounded`]. With
/// [`LinearRounding::Bf16`] (a PyTorch `nn.Linear` + activation under bf16 autocast): `x` and `b`
/// rounded to bf16, `v = Σ_c x[i, c]·w[j, c] + b[j]` in f64 and rounded to bf16, the activation in
/// f64 on that value and, when there is one, its output rounded to bf16. `w` as the GPU sees it
/// (bf16 weights already rounded). [`LinearRounding::None`]: [`linear`].
///
/// Panics when a slice length does not match `m`, `n`, `k` (a bug in the caller).
#[allow(clippy::too_many_arguments)]
pub fn linear_rounded(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
    act: Activation,
    rounding: LinearRounding,
) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    match rounding {
        LinearRounding::None => {
            pre_activation(x, w, b, m, n, k, |e, v| y[e] = activate(v, act) as f32)
        }
        LinearRounding::Bf16 => {
            let (xr, br) = (round_slice(x), b.map(round_slice));
            pre_activation(&xr, w, br.as_deref(), m, n, k, |e, v| {
                let a = activate(bf16_round(v), act);
                y[e] = match act {
                    Activation::None => a,
                    _ => bf16_round(a),
                } as f32;
            });
        }
    }
    y
}

/// Every value rounded to bf16 (kept as f32, exactly).
fn round_slice(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&a| bf16_round(a as f64) as f32).collect()
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
    linear_gated_residual_rounded(x, w, b, res, gate, m, n, k, LinearRounding::None)
}

/// [`linear_gated_residual`] with the rounding of
/// [`crate::ops::linear::record_linear_gated_residual_rounded`]: with [`LinearRounding::Bf16`],
/// `v` is the bf16-autocast Linear output of [`linear_rounded`] (`x`, `b` and `v` rounded to
/// bf16), then `res + gate·v` in f64, rounded once to f32.
///
/// Panics when a slice length does not match `m`, `n`, `k` (a bug in the caller).
#[allow(clippy::too_many_arguments)]
pub fn linear_gated_residual_rounded(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    res: &[f32],
    gate: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
    rounding: LinearRounding,
) -> Vec<f32> {
    let bf16 = rounding == LinearRounding::Bf16;
    let (xr, br);
    let (x, b) = if bf16 {
        (xr, br) = (round_slice(x), b.map(round_slice));
        (xr.as_slice(), br.as_deref())
    } else {
        (x, b)
    };
    assert_eq!(res.len(), m * n, "reference linear: res must be [m, n]");
    if let Some(g) = gate {
        assert_eq!(g.len(), n, "reference linear: gate must be [n]");
    }
    let mut y = vec![0f32; m * n];
    pre_activation(x, w, b, m, n, k, |e, v| {
        let v = if bf16 { bf16_round(v) } else { v };
        let g = gate.map_or(1.0, |g| g[e % n] as f64);
        y[e] = (res[e] as f64 + g * v) as f32;
    });
    y
}
