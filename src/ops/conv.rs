//! The operations of the Wan VAE decoder (spec §7) on channel-first f32 video tensors
//! `[C, T, H, W]`: causal 3-D convolution with a temporal cache, the per-frame 2-D convolution,
//! nearest 2× upsampling (alone or fused into the convolution that follows it), the VAE's
//! channel RMS norm (optionally fused with SiLU), the cache update, and the single-head spatial
//! attention of the decoder's middle block.
//!
//! Kernels (`shaders/nn/`):
//! * `conv3d.wgsl`: the convolution as an implicit GEMM, M = output channels, N = T·H·W output
//!   pixels, K = C_in·kt·kh·kw. A 64×64 output tile per workgroup (a 16×256 tile when there are
//!   at most 16 output channels, e.g. the 3-channel head), 256 threads with 4×4 outputs each,
//!   K in steps of 16 through workgroup memory (8 KiB). The input tile is gathered on the fly:
//!   spatial zero padding, the causal cache (or zeros) in front of the time axis and the
//!   optional nearest-2× upsampling are resolved per element, so none of them is materialized.
//!   Bias and a residual input are added in the epilogue. f32 products and sums.
//! * `conv_cache.wgsl`: the in-place cache update after a chunk.
//! * `conv_upsample.wgsl`: nearest 2× upsampling on its own.
//! * `vae_norm.wgsl`: `x / max(‖x‖₂ over C, 1e-12) · √C · γ (+ β)`, optionally SiLU.
//! * `vae_attention.wgsl`: flash-style attention over the H·W pixels of each frame, any
//!   C ≤ 512, q/k/v read straight from the channel-first output of the `to_qkv` 1×1 conv.
//!
//! CPU references (f64): [`crate::reference::nn::conv`]. Every tensor is bound whole, so each
//! must fit the device's storage-binding limit (checked, [`Error::TooLarge`] otherwise); the
//! decoder in [`crate::wan::vae`] streams one frame at a time to keep tensors small.
//!
//! Causal convolution and caches: a kernel of temporal size kt sees, in front of the chunk `x`
//! `[C_in, T, H, W]`, the `kt − 1` frames of `cache` `[C_in, kt − 1, H, W]` (zeros when no
//! cache is given: the causal padding of the first chunk). [`record_cache_update`] then makes
//! the cache the last `kt − 1` frames of `[cache, x]`, so decoding chunk by chunk gives exactly
//! the whole-sequence result.

use crate::error::{Error, Result};
use crate::gpu::{Batch, DType, Gpu, Tensor, groups_2d};
use crate::ops::elementwise::{check_distinct, check_f32, check_size};

const CONV3D: &str = include_str!("../../shaders/nn/conv3d.wgsl");
const CACHE: &str = include_str!("../../shaders/nn/conv_cache.wgsl");
const UPSAMPLE: &str = include_str!("../../shaders/nn/conv_upsample.wgsl");
const NORM: &str = include_str!("../../shaders/nn/vae_norm.wgsl");
const ATTENTION: &str = include_str!("../../shaders/nn/vae_attention.wgsl");

/// Largest channel count (head dimension) of [`record_spatial_attention`].
pub const MAX_ATTENTION_CHANNELS: usize = 512;

/// Output tile of the convolution kernel: `(rows = output channels, columns = pixels)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tile {
    /// 64 channels × 64 pixels (layers with more than 16 output channels).
    Wide,
    /// 16 channels × 256 pixels (narrow layers such as the 3-channel head).
    Narrow,
}

impl Tile {
    const ALL: [Tile; 2] = [Tile::Wide, Tile::Narrow];

    fn dims(self) -> (usize, usize) {
        match self {
            Tile::Wide => (64, 64),
            Tile::Narrow => (16, 256),
        }
    }

    fn variant(self) -> (String, String) {
        let (tm, tn) = self.dims();
        (
            format!("nn/conv3d[m{tm}n{tn}]"),
            format!("const TM: u32 = {tm}u;\nconst TN: u32 = {tn}u;\n{CONV3D}"),
        )
    }
}

/// Kernel variants of this module: the convolution for both tiles, the cache update, the
/// upsampling, the VAE norm and the spatial attention.
pub fn variants() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = Tile::ALL.iter().map(|t| t.variant()).collect();
    v.push(("nn/conv_cache".into(), CACHE.to_string()));
    v.push(("nn/conv_upsample".into(), UPSAMPLE.to_string()));
    v.push(("nn/vae_norm".into(), NORM.to_string()));
    v.push(("nn/vae_attention".into(), ATTENTION.to_string()));
    v
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ConvParams {
    co: u32,
    ci: u32,
    t: u32,
    n: u32,
    h: u32,
    w: u32,
    hin: u32,
    win: u32,
    kt: u32,
    kh: u32,
    kw: u32,
    k: u32,
    co_off: u32,
    flags: u32,
    tiles_m: u32,
    tiles: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params4 {
    a: u32,
    b: u32,
    c: u32,
    d: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    c: u32,
    p: u32,
    flags: u32,
    scale: f32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttnParams {
    c: u32,
    t: u32,
    s: u32,
    chunks: u32,
    scale: f32,
    _pad: [u32; 3],
}

const F_BIAS: u32 = 1;
const F_CACHE: u32 = 2;
const F_RES: u32 = 4;
const F_UP: u32 = 8;

/// Optional parts of a convolution ([`record_conv3d`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct ConvOptions<'a> {
    /// The `kt − 1` input frames before `x`, `[C_in, kt − 1, H_in, W_in]`; `None` reads zeros
    /// (the causal padding of a first chunk). Only for kernels with kt > 1.
    pub cache: Option<&'a Tensor>,
    /// Bias `[C_out_total]` (indexed like the weight's rows, so with `out_channel_offset`).
    pub bias: Option<&'a Tensor>,
    /// Added to the result, with the output's shape (residual connections).
    pub residual: Option<&'a Tensor>,
    /// Enlarge the input 2× by nearest neighbour before convolving (the cache too, if any);
    /// the output is then `2H_in × 2W_in`.
    pub upsample: bool,
    /// First weight row to compute: the output's `C_out` channels are weight rows
    /// `offset .. offset + C_out` (e.g. one of the two frames of the VAE's `time_conv`).
    pub out_channel_offset: usize,
}

/// `[a, b, c, d]` of a 4-D shape, or an error naming `what`.
fn dims4(op: &str, what: &str, t: &Tensor) -> Result<[usize; 4]> {
    match *t.shape() {
        [a, b, c, d] => Ok([a, b, c, d]),
        _ => Err(Error::shape(format!(
            "{op}: {what} must be [C, T, H, W] (channel-first video), got {:?}",
            t.shape()
        ))),
    }
}

/// `(C_out_total, C_in, kt, kh, kw)` of a conv weight `[C_out, C_in, kt, kh, kw]` or a 2-D
/// weight `[C_out, C_in, kh, kw]` (kt = 1).
fn weight_dims(op: &str, w: &Tensor) -> Result<(usize, usize, usize, usize, usize)> {
    match *w.shape() {
        [co, ci, kt, kh, kw] => Ok((co, ci, kt, kh, kw)),
        [co, ci, kh, kw] => Ok((co, ci, 1, kh, kw)),
        _ => Err(Error::shape(format!(
            "{op}: weight must be [C_out, C_in, kt, kh, kw] (Conv3d) or [C_out, C_in, kh, kw] \
             (Conv2d), got {:?}",
            w.shape()
        ))),
    }
}

fn to_u32(op: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        Error::shape(format!(
            "{op}: {what} = {v} does not fit the kernel's 32-bit indices"
        ))
    })
}

/// Records a causal 3-D convolution (any odd kh, kw; any kt ≥ 1) of `x` `[C_in, T, H_in, W_in]`
/// with `w` `[C_out_total, C_in, kt, kh, kw]` (or a 2-D weight `[C_out_total, C_in, kh, kw]`,
/// applied per frame) into `out` `[C_out, T, H, W]` (H, W = H_in, W_in, or twice that with
/// `opts.upsample`). Spatial zero padding kh/2, kw/2 keeps the size; in time the kernel sees
/// `opts.cache` (or kt − 1 zero frames) in front of `x`, so output frame t uses input frames
/// t − kt + 1 … t. See [`ConvOptions`] for bias, residual, upsampling and the weight-row
/// offset. f32 math; `out` must have its own buffer.
pub fn record_conv3d(
    batch: &mut Batch<'_>,
    x: &Tensor,
    w: &Tensor,
    out: &Tensor,
    opts: &ConvOptions<'_>,
) -> Result<()> {
    let op = "conv3d";
    check_f32("conv3d: x", x)?;
    check_f32("conv3d: weight", w)?;
    check_f32("conv3d: out", out)?;
    let [ci, t, hin, win] = dims4(op, "x", x)?;
    let [co, to, h, wo] = dims4(op, "out", out)?;
    let (co_total, wci, kt, kh, kw) = weight_dims(op, w)?;
    if wci != ci {
        return Err(Error::shape(format!(
            "{op}: weight {:?} expects {wci} input channels, x {:?} has {ci}",
            w.shape(),
            x.shape()
        )));
    }
    if kt == 0 || kh % 2 == 0 || kw % 2 == 0 {
        return Err(Error::shape(format!(
            "{op}: kernel ({kt}, {kh}, {kw}) of weight {:?} must have kt ≥ 1 and odd kh, kw \
             (symmetric spatial padding)",
            w.shape()
        )));
    }
    let up = if opts.upsample { 2 } else { 1 };
    let want = [co, t, hin * up, win * up];
    if [co, to, h, wo] != want || co == 0 {
        return Err(Error::shape(format!(
            "{op}: out {:?} must be [C_out > 0, {t}, {}, {}] for x {:?}{}",
            out.shape(),
            hin * up,
            win * up,
            x.shape(),
            if opts.upsample { " upsampled 2×" } else { "" }
        )));
    }
    if opts.out_channel_offset + co > co_total {
        return Err(Error::shape(format!(
            "{op}: output channels {}..{} exceed the weight's {co_total} rows ({:?})",
            opts.out_channel_offset,
            opts.out_channel_offset + co,
            w.shape()
        )));
    }
    let mut flags = 0;
    if opts.upsample {
        flags |= F_UP;
    }
    if let Some(c) = opts.cache {
        check_f32("conv3d: cache", c)?;
        if kt == 1 {
            return Err(Error::shape(format!(
                "{op}: a cache was given, but the kernel of weight {:?} has temporal size 1 and \
                 needs none",
                w.shape()
            )));
        }
        if c.shape() != [ci, kt - 1, hin, win] {
            return Err(Error::shape(format!(
                "{op}: cache {:?} must be [C_in, kt − 1, H_in, W_in] = [{ci}, {}, {hin}, {win}]",
                c.shape(),
                kt - 1
            )));
        }
        check_distinct(op, ("cache", c), ("out", out))?;
        check_size(batch.gpu(), op, "cache", c)?;
        flags |= F_CACHE;
    }
    if let Some(b) = opts.bias {
        check_f32("conv3d: bias", b)?;
        if b.shape() != [co_total] {
            return Err(Error::shape(format!(
                "{op}: bias {:?} must be [{co_total}] for weight {:?}",
                b.shape(),
                w.shape()
            )));
        }
        check_distinct(op, ("bias", b), ("out", out))?;
        flags |= F_BIAS;
    }
    if let Some(r) = opts.residual {
        check_f32("conv3d: residual", r)?;
        if r.shape() != out.shape() {
            return Err(Error::shape(format!(
                "{op}: residual {:?} must have the output's shape {:?}",
                r.shape(),
                out.shape()
            )));
        }
        check_distinct(op, ("residual", r), ("out", out))?;
        flags |= F_RES;
    }
    check_distinct(op, ("x", x), ("out", out))?;
    check_distinct(op, ("weight", w), ("out", out))?;
    let gpu = batch.gpu();
    for (name, tensor) in [("x", x), ("weight", w), ("out", out)] {
        check_size(gpu, op, name, tensor)?;
    }
    let n = t * h * wo;
    let k = ci * kt * kh * kw;
    if n == 0 || k == 0 {
        return Err(Error::shape(format!(
            "{op}: empty convolution (x {:?}, weight {:?})",
            x.shape(),
            w.shape()
        )));
    }
    // the gather computes y + kh and x + kw in 32 bits
    to_u32(op, "height + kernel", h + kh)?;
    to_u32(op, "width + kernel", wo + kw)?;
    let tile = if co <= 16 { Tile::Narrow } else { Tile::Wide };
    let (tm, tn) = tile.dims();
    let tiles_m = co.div_ceil(tm);
    let tiles = tiles_m * n.div_ceil(tn);
    let p = ConvParams {
        co: co as u32,
        ci: ci as u32,
        t: t as u32,
        n: to_u32(op, "T·H·W", n)?,
        h: h as u32,
        w: wo as u32,
        hin: hin as u32,
        win: win as u32,
        kt: kt as u32,
        kh: kh as u32,
        kw: kw as u32,
        k: to_u32(op, "C_in·kt·kh·kw", k)?,
        co_off: opts.out_channel_offset as u32,
        flags,
        tiles_m: tiles_m as u32,
        tiles: to_u32(op, "tile count", tiles)?,
    };
    let (key, src) = tile.variant();
    let pipe = gpu.pipeline(&key, &src, true)?;
    // Absent optional inputs are bound to x (read-only, never read: their flag is off).
    let cache = opts.cache.unwrap_or(x);
    let bias = opts.bias.unwrap_or(x);
    let res = opts.residual.unwrap_or(x);
    batch.dispatch(
        &pipe,
        bytemuck::bytes_of(&p),
        &[x, cache, w, bias, res, out],
        groups_2d(tiles, gpu.caps().max_workgroups_per_dim),
    )
}

/// Records the causal 3-D convolution `out = conv(x; cache) + b` (see [`record_conv3d`]):
/// `x` `[C_in, T, H, W]`, `cache` `[C_in, kt − 1, H, W]` or `None` (zeros), `w`
/// `[C_out, C_in, kt, kh, kw]`, `b` `[C_out]`, `out` `[C_out, T, H, W]`.
pub fn record_causal_conv3d(
    batch: &mut Batch<'_>,
    x: &Tensor,
    cache: Option<&Tensor>,
    w: &Tensor,
    b: Option<&Tensor>,
    out: &Tensor,
) -> Result<()> {
    let opts = ConvOptions {
        cache,
        bias: b,
        ..Default::default()
    };
    record_conv3d(batch, x, w, out, &opts)
}

/// Output shape `[C_out, T, H, W]` of a convolution of `x` with `w` (no offset, no upsampling).
fn conv_out_shape(op: &str, x: &Tensor, w: &Tensor, up: usize) -> Result<Vec<usize>> {
    let [_, t, h, wd] = dims4(op, "x", x)?;
    let (co, ..) = weight_dims(op, w)?;
    Ok(vec![co, t, h * up, wd * up])
}

/// The causal 3-D convolution of `x` (with `cache` in front, or zeros) into a new tensor
/// `[C_out, T, H, W]` (submitted, not waited for). See [`record_conv3d`].
pub fn causal_conv3d(
    gpu: &Gpu,
    x: &Tensor,
    cache: Option<&Tensor>,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Result<Tensor> {
    let out = gpu.empty(&conv_out_shape("conv3d", x, w, 1)?, DType::F32)?;
    let mut batch = gpu.batch();
    record_causal_conv3d(&mut batch, x, cache, w, b, &out)?;
    batch.submit()?;
    Ok(out)
}

/// Fails unless `w` is a 2-D conv weight `[C_out, C_in, kh, kw]`.
fn check_2d_weight(op: &str, w: &Tensor) -> Result<()> {
    if w.shape().len() != 4 {
        return Err(Error::shape(format!(
            "{op}: weight must be a Conv2d weight [C_out, C_in, kh, kw], got {:?}",
            w.shape()
        )));
    }
    Ok(())
}

/// Records a 2-D convolution applied to every frame of `x` `[C_in, T, H, W]`: `w`
/// `[C_out, C_in, kh, kw]` (odd kh, kw; zero padding kh/2, kw/2), bias `[C_out]`, `out`
/// `[C_out, T, H, W]`. (The kernel of [`record_conv3d`] with kt = 1.)
pub fn record_conv2d(
    batch: &mut Batch<'_>,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    out: &Tensor,
) -> Result<()> {
    check_2d_weight("conv2d", w)?;
    let opts = ConvOptions {
        bias: b,
        ..Default::default()
    };
    record_conv3d(batch, x, w, out, &opts)
}

/// The per-frame 2-D convolution of `x` into a new tensor (submitted, not waited for).
pub fn conv2d(gpu: &Gpu, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    check_2d_weight("conv2d", w)?;
    let out = gpu.empty(&conv_out_shape("conv2d", x, w, 1)?, DType::F32)?;
    let mut batch = gpu.batch();
    record_conv2d(&mut batch, x, w, b, &out)?;
    batch.submit()?;
    Ok(out)
}

/// Records nearest 2× upsampling followed by a per-frame 2-D convolution, fused (the VAE's
/// spatial upsample `Upsample(2, nearest-exact)` + `Conv2d 3×3`): `x` `[C_in, T, H, W]`, `w`
/// `[C_out, C_in, kh, kw]`, `out` `[C_out, T, 2H, 2W]`. The enlarged image is never stored.
pub fn record_upsample_conv2d(
    batch: &mut Batch<'_>,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    out: &Tensor,
) -> Result<()> {
    check_2d_weight("upsample_conv2d", w)?;
    let opts = ConvOptions {
        bias: b,
        upsample: true,
        ..Default::default()
    };
    record_conv3d(batch, x, w, out, &opts)
}

/// Nearest 2× upsampling + per-frame 2-D convolution into a new `[C_out, T, 2H, 2W]` tensor
/// (submitted, not waited for).
pub fn upsample_conv2d(gpu: &Gpu, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    check_2d_weight("upsample_conv2d", w)?;
    let out = gpu.empty(&conv_out_shape("upsample_conv2d", x, w, 2)?, DType::F32)?;
    let mut batch = gpu.batch();
    record_upsample_conv2d(&mut batch, x, w, b, &out)?;
    batch.submit()?;
    Ok(out)
}

/// 2-D grid of 256-thread workgroups for `n` threads.
fn flat_groups(gpu: &Gpu, n: usize) -> [u32; 3] {
    groups_2d(n.div_ceil(256), gpu.caps().max_workgroups_per_dim)
}

/// Records nearest 2× spatial upsampling: `out[c, t, y, x] = x[c, t, y/2, x/2]`, `x`
/// `[C, T, H, W]`, `out` `[C, T, 2H, 2W]` (its own buffer). Exact (data movement).
pub fn record_upsample_nearest2x(batch: &mut Batch<'_>, x: &Tensor, out: &Tensor) -> Result<()> {
    let op = "upsample_nearest2x";
    check_f32("upsample_nearest2x: x", x)?;
    check_f32("upsample_nearest2x: out", out)?;
    let [c, t, h, w] = dims4(op, "x", x)?;
    if out.shape() != [c, t, 2 * h, 2 * w] {
        return Err(Error::shape(format!(
            "{op}: out {:?} must be [{c}, {t}, {}, {}] for x {:?}",
            out.shape(),
            2 * h,
            2 * w,
            x.shape()
        )));
    }
    check_distinct(op, ("x", x), ("out", out))?;
    let gpu = batch.gpu();
    check_size(gpu, op, "x", x)?;
    check_size(gpu, op, "out", out)?;
    let n = out.numel();
    let p = Params4 {
        a: n as u32,
        b: h as u32,
        c: w as u32,
        d: 0,
    };
    let pipe = gpu.pipeline("nn/conv_upsample", UPSAMPLE, true)?;
    batch.dispatch(
        &pipe,
        bytemuck::bytes_of(&p),
        &[x, out],
        flat_groups(gpu, n),
    )
}

/// Nearest 2× upsampling of `x` `[C, T, H, W]` into a new `[C, T, 2H, 2W]` tensor (submitted,
/// not waited for).
pub fn upsample_nearest2x(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let [c, t, h, w] = dims4("upsample_nearest2x", "x", x)?;
    let out = gpu.empty(&[c, t, 2 * h, 2 * w], DType::F32)?;
    let mut batch = gpu.batch();
    record_upsample_nearest2x(&mut batch, x, &out)?;
    batch.submit()?;
    Ok(out)
}

/// Records the update of a causal cache after the chunk `x`: `cache` `[C, L, H, W]` becomes the
/// last L frames of the time axis `[cache, x]` (`x` `[C, T, H, W]`, any T ≥ 1), in place.
/// Record it after the convolution that read the cache and before `x` is overwritten.
pub fn record_cache_update(batch: &mut Batch<'_>, cache: &Tensor, x: &Tensor) -> Result<()> {
    let op = "cache_update";
    check_f32("cache_update: cache", cache)?;
    check_f32("cache_update: x", x)?;
    let [c, t, h, w] = dims4(op, "x", x)?;
    let [cc, l, ch, cw] = dims4(op, "cache", cache)?;
    if [cc, ch, cw] != [c, h, w] || l == 0 || t == 0 {
        return Err(Error::shape(format!(
            "{op}: cache {:?} must be [{c}, L ≥ 1, {h}, {w}] for x {:?} (T ≥ 1)",
            cache.shape(),
            x.shape()
        )));
    }
    check_distinct(op, ("x", x), ("cache", cache))?;
    let gpu = batch.gpu();
    check_size(gpu, op, "x", x)?;
    check_size(gpu, op, "cache", cache)?;
    let p = Params4 {
        a: c as u32,
        b: l as u32,
        c: t as u32,
        d: (h * w) as u32,
    };
    let pipe = gpu.pipeline("nn/conv_cache", CACHE, true)?;
    batch.dispatch(
        &pipe,
        bytemuck::bytes_of(&p),
        &[x, cache],
        flat_groups(gpu, c * h * w),
    )
}

/// Records the Wan VAE's RMS norm over the channel axis of `x` `[C, …]` (channel-first: C rows
/// of P = T·H·W positions): `out = x / max(‖x‖₂ over C, 1e-12) · √C · γ (+ β)`, then SiLU when
/// `silu` (the `norm → SiLU` of the residual blocks and the head). `gamma`, `beta` `[C]`; `out`
/// has x's shape and its own buffer. f32 math.
pub fn record_channel_rms_norm(
    batch: &mut Batch<'_>,
    x: &Tensor,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    silu: bool,
    out: &Tensor,
) -> Result<()> {
    let op = "channel_rms_norm";
    check_f32("channel_rms_norm: x", x)?;
    check_f32("channel_rms_norm: gamma", gamma)?;
    check_f32("channel_rms_norm: out", out)?;
    let c = match x.shape().first() {
        Some(&c) if c > 0 && x.numel() > 0 => c,
        _ => {
            return Err(Error::shape(format!(
                "{op}: x must be a non-empty [C, …] tensor, got {:?}",
                x.shape()
            )));
        }
    };
    if out.shape() != x.shape() {
        return Err(Error::shape(format!(
            "{op}: out {:?} must have the shape of x {:?}",
            out.shape(),
            x.shape()
        )));
    }
    for (name, t) in [("gamma", Some(gamma)), ("beta", beta)] {
        if let Some(t) = t {
            check_f32(&format!("{op}: {name}"), t)?;
            if t.shape() != [c] {
                return Err(Error::shape(format!(
                    "{op}: {name} {:?} must be [{c}] for x {:?}",
                    t.shape(),
                    x.shape()
                )));
            }
            check_distinct(op, (name, t), ("out", out))?;
        }
    }
    check_distinct(op, ("x", x), ("out", out))?;
    let gpu = batch.gpu();
    check_size(gpu, op, "x", x)?;
    let positions = x.numel() / c;
    let p = NormParams {
        c: c as u32,
        p: positions as u32,
        flags: u32::from(beta.is_some()) | (u32::from(silu) << 1),
        scale: (c as f64).sqrt() as f32,
    };
    let pipe = gpu.pipeline("nn/vae_norm", NORM, true)?;
    batch.dispatch(
        &pipe,
        bytemuck::bytes_of(&p),
        &[x, gamma, beta.unwrap_or(gamma), out],
        flat_groups(gpu, positions),
    )
}

/// The VAE channel RMS norm (optionally + SiLU) into a new tensor (submitted, not waited for).
pub fn channel_rms_norm(
    gpu: &Gpu,
    x: &Tensor,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    silu: bool,
) -> Result<Tensor> {
    let out = gpu.empty(x.shape(), DType::F32)?;
    let mut batch = gpu.batch();
    record_channel_rms_norm(&mut batch, x, gamma, beta, silu, &out)?;
    batch.submit()?;
    Ok(out)
}

/// Records the VAE middle block's attention: `qkv` `[3C, T, H, W]` (the `to_qkv` 1×1 conv
/// output: q = channels `[0, C)`, k = `[C, 2C)`, v = `[2C, 3C)`), single head over the H·W
/// pixels of each frame independently, scale `1/√C`, into `out` `[C, T, H, W]` (its own
/// buffer). C ≤ [`MAX_ATTENTION_CHANNELS`]. f32 math with an online softmax.
pub fn record_spatial_attention(batch: &mut Batch<'_>, qkv: &Tensor, out: &Tensor) -> Result<()> {
    let op = "spatial_attention";
    check_f32("spatial_attention: qkv", qkv)?;
    check_f32("spatial_attention: out", out)?;
    let [c3, t, h, w] = dims4(op, "qkv", qkv)?;
    if c3 == 0 || c3 % 3 != 0 || t == 0 || h * w == 0 {
        return Err(Error::shape(format!(
            "{op}: qkv {:?} must be a non-empty [3C, T, H, W]",
            qkv.shape()
        )));
    }
    let c = c3 / 3;
    if c > MAX_ATTENTION_CHANNELS {
        return Err(Error::shape(format!(
            "{op}: {c} channels exceed the kernel's maximum of {MAX_ATTENTION_CHANNELS}"
        )));
    }
    if out.shape() != [c, t, h, w] {
        return Err(Error::shape(format!(
            "{op}: out {:?} must be [{c}, {t}, {h}, {w}] for qkv {:?}",
            out.shape(),
            qkv.shape()
        )));
    }
    check_distinct(op, ("qkv", qkv), ("out", out))?;
    let gpu = batch.gpu();
    check_size(gpu, op, "qkv", qkv)?;
    let s = h * w;
    let blocks = s.div_ceil(32);
    let max = gpu.caps().max_workgroups_per_dim as usize;
    if blocks > max || t > max {
        return Err(Error::shape(format!(
            "{op}: {blocks} query blocks × {t} frames exceed the dispatch limit of {max}"
        )));
    }
    let p = AttnParams {
        c: c as u32,
        t: t as u32,
        s: s as u32,
        chunks: c.div_ceil(32) as u32,
        scale: (std::f64::consts::LOG2_E / (c as f64).sqrt()) as f32,
        _pad: [0; 3],
    };
    let pipe = gpu.pipeline("nn/vae_attention", ATTENTION, true)?;
    batch.dispatch(
        &pipe,
        bytemuck::bytes_of(&p),
        &[qkv, out],
        [blocks as u32, t as u32, 1],
    )
}

/// The VAE spatial attention of `qkv` `[3C, T, H, W]` into a new `[C, T, H, W]` tensor
/// (submitted, not waited for).
pub fn spatial_attention(gpu: &Gpu, qkv: &Tensor) -> Result<Tensor> {
    let [c3, t, h, w] = dims4("spatial_attention", "qkv", qkv)?;
    let out = gpu.empty(&[c3 / 3, t, h, w], DType::F32)?;
    let mut batch = gpu.batch();
    record_spatial_attention(&mut batch, qkv, &out)?;
    batch.submit()?;
    Ok(out)
}
