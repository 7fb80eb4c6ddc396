//! 3-D rotary position embedding (RoPE) of the Wan DiT and the sinusoidal timestep embedding
//! (spec §2.3, §2.6, §4.3).
//!
//! Per head, the `D` channels form `D/2` complex pairs `(x[2j], x[2j+1])` (adjacent channels).
//! The pairs are split into three parts of sizes [`pair_split`] `= [c − 2⌊c/3⌋, ⌊c/3⌋, ⌊c/3⌋]`
//! with `c = D/2`; part 0 rotates with the frame index `f`, part 1 with the patch-grid row `h`,
//! part 2 with the column `w`. Pair `k` of a part of size `n` has the angular frequency
//! `ω = 1 / θ^(2k / 2n)` with `θ =` [`ROPE_THETA`], and a token at position `pos` on that axis
//! rotates by `pos · ω`.
//!
//! The angles and their cos/sin are computed here on the CPU in f64 (as the reference does; f32
//! angles drift by about `pos × 6e-8` rad) and stored as f32 tables `[S, D/2]`, one row per
//! token, in natural or fractal token order ([`rope_tables`], uploaded once per grid by
//! [`upload_rope_tables`]). The kernel ([`record_rope`]) rotates in place in f32.
//! [`sinusoidal_embedding`] is CPU only: the DiT uploads its 256 numbers each step.

use crate::error::{Error, Result};
use crate::gpu::{Batch, DType, Gpu, Tensor};

/// The RoPE base `θ` of the Wan DiT (`rope_params(…, theta = 10000)`).
pub const ROPE_THETA: f64 = 10000.0;

/// The base of the sinusoidal timestep embedding (spec §2.3).
pub const SINUSOID_BASE: f64 = 10000.0;

const ROPE_WGSL: &str = include_str!("../../shaders/nn/rope.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    pairs: u32,
    pairs_per_token: u32,
    half_d: u32,
    _pad: u32,
}

/// Storage modes of the kernel: `(dtype, tag, MODE)`.
const MODES: [(DType, &str, u32); 3] = [
    (DType::F32, "f32", 0),
    (DType::F16, "f16", 1),
    (DType::BF16, "bf16", 2),
];

fn variant(tag: &str, mode: u32) -> (String, String) {
    (
        format!("nn/rope[{tag}]"),
        format!("const MODE: u32 = {mode}u;\n{ROPE_WGSL}"),
    )
}

/// Kernel variants of this module: `nn/rope[f32|f16|bf16]` (the storage type of `x`; the
/// 16-bit modes work on 32-bit words and need no shader feature).
pub fn variants() -> Vec<(String, String)> {
    MODES
        .iter()
        .map(|&(_, tag, mode)| variant(tag, mode))
        .collect()
}

/// The pair split `[c − 2⌊c/3⌋, ⌊c/3⌋, ⌊c/3⌋]` with `c = head_dim/2`: how many pairs rotate
/// with the frame, row and column index (`[22, 21, 21]` for `head_dim` 128).
pub fn pair_split(head_dim: usize) -> [usize; 3] {
    let c = head_dim / 2;
    [c - 2 * (c / 3), c / 3, c / 3]
}

/// `(axis, ω)` of every pair column: axis 0 = frame, 1 = row, 2 = column;
/// `ω = 1 / θ^(2k / d_part)` with `d_part = 2 · part size`, in f64 as `rope_params` computes it.
fn column_freqs(head_dim: usize) -> Vec<(usize, f64)> {
    let mut v = Vec::with_capacity(head_dim / 2);
    for (axis, &n) in pair_split(head_dim).iter().enumerate() {
        let d_part = (2 * n) as f64;
        for k in 0..n {
            v.push((axis, 1.0 / ROPE_THETA.powf((2 * k) as f64 / d_part)));
        }
    }
    v
}

fn check_head_dim(head_dim: usize) -> Result<()> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(Error::shape(format!(
            "RoPE head_dim must be a positive even number (channels form pairs), got {head_dim}"
        )));
    }
    Ok(())
}

/// Validates a RoPE patch grid (no empty axis; H and W multiples of 8 in fractal order).
pub(crate) fn check_grid(grid: (usize, usize, usize), fractal: bool) -> Result<()> {
    let (f, h, w) = grid;
    if f == 0 || h == 0 || w == 0 {
        return Err(Error::shape(format!(
            "RoPE grid {f}x{h}x{w} has an empty axis"
        )));
    }
    if fractal && (h % 8 != 0 || w % 8 != 0) {
        return Err(Error::shape(format!(
            "fractal RoPE tables need H and W multiples of 8, got grid {f}x{h}x{w}"
        )));
    }
    Ok(())
}

/// The angle table `[positions, head_dim/2]` (row = position `0..positions`, column = pair):
/// `cos(pos · ω_p)` and `sin(pos · ω_p)` with `ω_p` the frequency of pair `p` in its part,
/// computed in f64 and rounded to f32. Matches the golden `freq_table_cos` / `freq_table_sin`.
///
/// # Panics
/// When `head_dim` is zero or odd.
pub fn freq_table(positions: usize, head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    if let Err(e) = check_head_dim(head_dim) {
        panic!("{e}");
    }
    let freqs = column_freqs(head_dim);
    let half = head_dim / 2;
    let mut cos = vec![0f32; positions * half];
    let mut sin = vec![0f32; positions * half];
    for pos in 0..positions {
        for (p, &(_, w)) in freqs.iter().enumerate() {
            let a = pos as f64 * w;
            cos[pos * half + p] = a.cos() as f32;
            sin[pos * half + p] = a.sin() as f32;
        }
    }
    (cos, sin)
}

/// Per-token cos/sin tables `[S, head_dim/2]` (S = F·H·W) of a patch grid `(F, H, W)`: token
/// `(f, h, w)` takes its part-0 columns from angle-table row `f`, part 1 from row `h` and part 2
/// from row `w` ([`freq_table`], f64 angles). Rows are in natural token order
/// `s = (f·H + h)·W + w`, or with `fractal` in fractal order (row `s'` belongs to the token now
/// at fractal position `s'`, i.e. `table_fractal = table_natural[perm]`, spec §4.3).
///
/// # Panics
/// When `head_dim` is zero or odd, an axis of `grid` is empty, or `fractal` is set and H or W
/// is not a multiple of 8. [`upload_rope_tables`] reports these as errors instead.
pub fn rope_tables(
    grid: (usize, usize, usize),
    head_dim: usize,
    fractal: bool,
) -> (Vec<f32>, Vec<f32>) {
    if let Err(e) = check_head_dim(head_dim).and_then(|_| check_grid(grid, fractal)) {
        panic!("{e}");
    }
    let (nf, nh, nw) = grid;
    let half = head_dim / 2;
    let axes: Vec<usize> = column_freqs(head_dim).iter().map(|&(a, _)| a).collect();
    let (tc, ts) = freq_table(nf.max(nh).max(nw), head_dim);
    let s = nf * nh * nw;
    let mut cos = vec![0f32; s * half];
    let mut sin = vec![0f32; s * half];
    for f in 0..nf {
        for h in 0..nh {
            for w in 0..nw {
                let row = if fractal {
                    f * nh * nw + ((h / 8) * (nw / 8) + w / 8) * 64 + (h % 8) * 8 + w % 8
                } else {
                    (f * nh + h) * nw + w
                };
                let pos = [f, h, w];
                for (p, &axis) in axes.iter().enumerate() {
                    let src = pos[axis] * half + p;
                    cos[row * half + p] = tc[src];
                    sin[row * half + p] = ts[src];
                }
            }
        }
    }
    (cos, sin)
}

/// The per-token tables of [`rope_tables`] on the GPU, as f32 tensors `[S, head_dim/2]`
/// `(cos, sin)`. Built and uploaded once per `(grid, head_dim, fractal)` and kept by the
/// [`Gpu`] (the returned tensors share the cached buffers; do not write to them).
pub fn upload_rope_tables(
    gpu: &Gpu,
    grid: (usize, usize, usize),
    head_dim: usize,
    fractal: bool,
) -> Result<(Tensor, Tensor)> {
    check_head_dim(head_dim)?;
    check_grid(grid, fractal)?;
    let key = format!("ops/rope_tables/{grid:?}/{head_dim}/{fractal}");
    let t = gpu.cached(&key, || {
        let (cos, sin) = rope_tables(grid, head_dim, fractal);
        let shape = [grid.0 * grid.1 * grid.2, head_dim / 2];
        Ok((gpu.upload_f32(&cos, &shape)?, gpu.upload_f32(&sin, &shape)?))
    })?;
    Ok((t.0.clone(), t.1.clone()))
}

/// The sinusoidal timestep embedding of length `dim` (spec §2.3): with `half = dim/2` and
/// `ω_i = 10000^(−i/half)` (divided by `half`, not `half − 1`), the vector
/// `[cos(t·ω_0) … cos(t·ω_{half−1}), sin(t·ω_0) … sin(t·ω_{half−1})]` (cos block first),
/// computed in f64 and rounded to f32. CPU only: WGSL has no f64.
///
/// # Panics
/// When `dim` is zero or odd.
pub fn sinusoidal_embedding(t: f64, dim: usize) -> Vec<f32> {
    assert!(
        dim > 0 && dim.is_multiple_of(2),
        "sinusoidal embedding dim must be a positive even number, got {dim}"
    );
    let half = dim / 2;
    let phases: Vec<f64> = (0..half)
        .map(|i| t * SINUSOID_BASE.powf(-(i as f64 / half as f64)))
        .collect();
    phases
        .iter()
        .map(|p| p.cos() as f32)
        .chain(phases.iter().map(|p| p.sin() as f32))
        .collect()
}

/// Records RoPE of `x` in place with per-token tables `cos`, `sin` (f32 `[S, D/2]`, same angles
/// for every head):
/// `x[2j] ← x[2j]·cos − x[2j+1]·sin`, `x[2j+1] ← x[2j]·sin + x[2j+1]·cos`, in f32.
///
/// `x` is `[S, heads·D]`, `[S, heads, D]` or `[1, S, heads, D]` with head `h` owning channels
/// `h·D .. (h+1)·D` of a token; its storage may be f32, f16 or bf16 (16-bit results rounded to
/// nearest even; no shader feature needed). The tables' row order must match the token order of
/// `x` (natural or fractal, see [`rope_tables`]).
pub fn record_rope(
    batch: &mut Batch<'_>,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
) -> Result<()> {
    let cs = cos.shape();
    if cs.len() != 2 || cos.dtype() != DType::F32 {
        return Err(Error::shape(format!(
            "RoPE cos table must be f32 [S, D/2], got {cs:?} {:?}",
            cos.dtype()
        )));
    }
    if sin.shape() != cs || sin.dtype() != DType::F32 {
        return Err(Error::shape(format!(
            "RoPE sin table {:?} {:?} must match cos {cs:?} F32",
            sin.shape(),
            sin.dtype()
        )));
    }
    let (s, half) = (cs[0], cs[1]);
    if half == 0 {
        return Err(Error::shape("RoPE tables have no pair columns (D/2 = 0)"));
    }
    if heads == 0 {
        return Err(Error::shape("RoPE needs at least one head"));
    }
    let d = 2 * half;
    let xs = x.shape();
    let ok = match xs {
        [a, b] => *a == s && *b == heads * d,
        [a, b, c] => *a == s && *b == heads && *c == d,
        [1, a, b, c] => *a == s && *b == heads && *c == d,
        _ => false,
    };
    if !ok {
        return Err(Error::shape(format!(
            "RoPE input {xs:?} does not fit tables of {s} tokens x {half} pairs with {heads} \
             heads: expected [{s}, {}], [{s}, {heads}, {d}] or [1, {s}, {heads}, {d}]",
            heads * d
        )));
    }
    let mode = match MODES.iter().find(|m| m.0 == x.dtype()) {
        Some(m) => *m,
        None => {
            return Err(Error::shape(format!(
                "RoPE input must be f32, f16 or bf16, got {:?}",
                x.dtype()
            )));
        }
    };
    let n = x.numel();
    if n > u32::MAX as usize {
        return Err(Error::shape(format!(
            "RoPE input of {n} elements exceeds the kernel's 32-bit indexing"
        )));
    }
    let gpu = batch.gpu();
    gpu.check_binding(&format!("RoPE input {xs:?}"), x.logical_bytes())?;
    gpu.check_binding(&format!("RoPE table {cs:?}"), cos.logical_bytes())?;
    let p = Params {
        pairs: (n / 2) as u32,
        pairs_per_token: (heads * half) as u32,
        half_d: half as u32,
        _pad: 0,
    };
    let (name, src) = variant(mode.1, mode.2);
    let pipe = gpu.pipeline(&name, &src, true)?;
    let groups = crate::gpu::groups_2d((n / 2).div_ceil(256), gpu.caps().max_workgroups_per_dim);
    batch.dispatch(&pipe, bytemuck::bytes_of(&p), &[x, cos, sin], groups)
}

/// Applies RoPE to `x` in place (see [`record_rope`]) and submits.
pub fn rope(gpu: &Gpu, x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<()> {
    let mut b = gpu.batch();
    record_rope(&mut b, x, cos, sin, heads)?;
    b.submit()
}
