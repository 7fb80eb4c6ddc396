//! CPU reference of [`crate::ops::conv`]: the Wan VAE's causal 3-D convolution (with cache,
//! per-frame 2-D convolution and fused nearest-2× upsampling), nearest upsampling, the cache
//! update, the channel RMS norm and the per-frame spatial attention. Channel-first row-major
//! tensors `[C, T, H, W]`; math in f64 on f32 inputs, rounded to f32 once at the end.

/// Shape `(C, T, H, W)` of a channel-first video tensor.
pub type Dims = (usize, usize, usize, usize);

/// Kernel shape `(C_out, C_in, kt, kh, kw)` of a convolution weight (row-major
/// `[C_out, C_in, kt, kh, kw]`; a 2-D weight is kt = 1).
pub type Kernel = (usize, usize, usize, usize, usize);

/// Causal 3-D convolution of `x` `[C_in, T, H, W]` with `w` (`k`), bias `b` `[C_out]`:
/// spatial zero padding kh/2, kw/2; in time the kt − 1 frames of `cache`
/// `[C_in, kt − 1, H, W]` (zeros when `None`) precede x. With `upsample`, x (and the cache) are
/// first enlarged 2× by nearest neighbour. Returns `[C_out, T, H', W']` (H' = H or 2H).
pub fn conv3d(
    x: &[f32],
    dims: Dims,
    cache: Option<&[f32]>,
    w: &[f32],
    k: Kernel,
    b: Option<&[f32]>,
    upsample: bool,
) -> Vec<f32> {
    let (ci, t, hin, win) = dims;
    let (co, wci, kt, kh, kw) = k;
    assert_eq!(ci, wci, "conv3d: input channels");
    assert_eq!(x.len(), ci * t * hin * win, "conv3d: x length");
    assert_eq!(w.len(), co * ci * kt * kh * kw, "conv3d: weight length");
    let l = kt - 1;
    if let Some(c) = cache {
        assert_eq!(c.len(), ci * l * hin * win, "conv3d: cache length");
    }
    if let Some(b) = b {
        assert_eq!(b.len(), co, "conv3d: bias length");
    }
    let up = if upsample { 2 } else { 1 };
    let (h, wd) = (hin * up, win * up);
    // input value at channel c, padded frame s (0..l+T), enlarged-image pixel (y, x)
    let at = |c: usize, s: usize, y: isize, xx: isize| -> f64 {
        if y < 0 || xx < 0 || y >= h as isize || xx >= wd as isize {
            return 0.0;
        }
        let (sy, sx) = (y as usize / up, xx as usize / up);
        if s < l {
            cache.map_or(0.0, |cv| cv[((c * l + s) * hin + sy) * win + sx] as f64)
        } else {
            x[((c * t + s - l) * hin + sy) * win + sx] as f64
        }
    };
    let mut out = vec![0f32; co * t * h * wd];
    for o in 0..co {
        for f in 0..t {
            for y in 0..h {
                for xx in 0..wd {
                    let mut acc = b.map_or(0.0, |b| b[o] as f64);
                    for c in 0..ci {
                        for dt in 0..kt {
                            for dy in 0..kh {
                                for dx in 0..kw {
                                    let wv = w[(((o * ci + c) * kt + dt) * kh + dy) * kw + dx];
                                    acc += wv as f64
                                        * at(
                                            c,
                                            f + dt,
                                            (y + dy) as isize - (kh / 2) as isize,
                                            (xx + dx) as isize - (kw / 2) as isize,
                                        );
                                }
                            }
                        }
                    }
                    out[((o * t + f) * h + y) * wd + xx] = acc as f32;
                }
            }
        }
    }
    out
}

/// Per-frame 2-D convolution of `x` `[C_in, T, H, W]` with `w` `[C_out, C_in, kh, kw]`
/// (`k = (C_out, C_in, kh, kw)`), zero padding kh/2, kw/2, optional bias.
pub fn conv2d(
    x: &[f32],
    dims: Dims,
    w: &[f32],
    k: (usize, usize, usize, usize),
    b: Option<&[f32]>,
) -> Vec<f32> {
    conv3d(x, dims, None, w, (k.0, k.1, 1, k.2, k.3), b, false)
}

/// Nearest 2× upsampling `[C, T, H, W] → [C, T, 2H, 2W]`: `out[.., y, x] = x[.., y/2, x/2]`.
pub fn upsample_nearest2x(x: &[f32], dims: Dims) -> Vec<f32> {
    let (c, t, h, w) = dims;
    assert_eq!(x.len(), c * t * h * w, "upsample: x length");
    let mut out = Vec::with_capacity(4 * x.len());
    for f in 0..c * t {
        for y in 0..2 * h {
            for xx in 0..2 * w {
                out.push(x[(f * h + y / 2) * w + xx / 2]);
            }
        }
    }
    out
}

/// The new causal cache after the chunk `x` `[C, T, H, W]`: the last L frames of the time axis
/// `[cache, x]`, with `cache` `[C, L, H, W]`.
pub fn cache_update(cache: &[f32], l: usize, x: &[f32], dims: Dims) -> Vec<f32> {
    let (c, t, h, w) = dims;
    let hw = h * w;
    assert_eq!(cache.len(), c * l * hw, "cache_update: cache length");
    assert_eq!(x.len(), c * t * hw, "cache_update: x length");
    let mut out = vec![0f32; cache.len()];
    for ch in 0..c {
        for s in 0..l {
            let src = t + s;
            for p in 0..hw {
                out[(ch * l + s) * hw + p] = if src < l {
                    cache[(ch * l + src) * hw + p]
                } else {
                    x[(ch * t + src - l) * hw + p]
                };
            }
        }
    }
    out
}

/// The VAE RMS norm over the channel axis of `x` `[C, P]` (P positions):
/// `x / max(‖x‖₂, 1e-12) · √C · γ (+ β)`, then SiLU when `silu`.
pub fn channel_rms_norm(
    x: &[f32],
    c: usize,
    gamma: &[f32],
    beta: Option<&[f32]>,
    silu: bool,
) -> Vec<f32> {
    assert!(
        c > 0 && x.len().is_multiple_of(c),
        "channel_rms_norm: x is not [{c}, P]"
    );
    assert_eq!(gamma.len(), c, "channel_rms_norm: gamma length");
    let p = x.len() / c;
    let scale = (c as f64).sqrt();
    let mut out = vec![0f32; x.len()];
    for pos in 0..p {
        let ss: f64 = (0..c).map(|ch| (x[ch * p + pos] as f64).powi(2)).sum();
        let denom = ss.sqrt().max(1e-12);
        for ch in 0..c {
            let mut y = x[ch * p + pos] as f64 / denom * scale * gamma[ch] as f64;
            if let Some(b) = beta {
                y += b[ch] as f64;
            }
            if silu {
                y /= 1.0 + (-y).exp();
            }
            out[ch * p + pos] = y as f32;
        }
    }
    out
}

/// Single-head attention over the S pixels of each of T frames: `qkv` `[3C, T, S]` (q, k, v =
/// channel blocks `[0, C)`, `[C, 2C)`, `[2C, 3C)`), scale `1/√C`; returns `[C, T, S]`.
pub fn spatial_attention(qkv: &[f32], c: usize, t: usize, s: usize) -> Vec<f32> {
    assert_eq!(qkv.len(), 3 * c * t * s, "spatial_attention: qkv length");
    let at = |ch: usize, f: usize, p: usize| qkv[(ch * t + f) * s + p] as f64;
    let scale = 1.0 / (c as f64).sqrt();
    let mut out = vec![0f32; c * t * s];
    let mut logits = vec![0f64; s];
    for f in 0..t {
        for i in 0..s {
            for (j, l) in logits.iter_mut().enumerate() {
                *l = (0..c).map(|d| at(d, f, i) * at(c + d, f, j)).sum::<f64>() * scale;
            }
            let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - mx).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..c {
                let v: f64 = e
                    .iter()
                    .enumerate()
                    .map(|(j, p)| p * at(2 * c + d, f, j))
                    .sum();
                out[(d * t + f) * s + i] = (v / sum) as f32;
            }
        }
    }
    out
}
