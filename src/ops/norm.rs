//! LayerNorm (plain, affine, modulated) and RMSNorm over the last axis of f32 tensors.
//! A LayerNorm may write its output as f16 (the f32 result rounded once, to nearest even, as it
//! is stored; needs `SHADER_F16`): the Wan DiT's norm outputs only feed GEMMs, which on the
//! tensor-core path read them as f16 (see [`crate::ops::linear`], "16-bit activations").
//!
//! One workgroup of 256 threads per row (a 2-D grid of rows, so any row count within the binding
//! limits dispatches), f32 math with a stable two-pass reduction: the mean of `x − x₀` (x₀ = the
//! row's first value, so the absolute mean is never rounded), then the mean of squared
//! deviations. A constant row normalizes to exactly 0. Rows of C % 4 == 0 and C ≤ 8192 columns
//! (every DiT and umT5 width) run `shaders/nn/norm_vec.wgsl`: the row in registers, read once in
//! vec4s, subgroup reductions where the adapter has them; other rows `shaders/nn/norm.wgsl`,
//! which reads x one f32 at a time, two or three times. Variants differ by a prelude that picks
//! LayerNorm or RMSNorm and the epilogue ([`NormMode`]). CPU references:
//! [`crate::reference::nn::norm`].
//!
//! In the DiT (spec §2.7): `norm1`/`norm2` are [`NormMode::Modulate`] with the `[6, dim]` table
//! `m = modulation + e0` (rows 0/1 for self-attention, 3/4 for the FFN), `norm3` is
//! [`NormMode::Affine`], the head's norm is [`NormMode::Modulate`] with its own `[2, dim]` table,
//! and the q/k norms are [`record_rms_norm`] over the full width.

use crate::error::{Error, Result};
use crate::gpu::{Batch, DType, Gpu, Tensor, groups_2d};
use crate::ops::elementwise::{check_distinct, check_f32, check_size};

const BODY: &str = include_str!("../../shaders/nn/norm.wgsl");
const COMMON: &str = include_str!("../../shaders/nn/norm_common.wgsl");
const BODY_VEC: &str = include_str!("../../shaders/nn/norm_vec.wgsl");
const REDUCE_SG: &str = include_str!("../../shaders/nn/norm_vec_sg.wgsl");
const REDUCE_WG: &str = include_str!("../../shaders/nn/norm_vec_wg.wgsl");

/// vec4s of a row each thread of norm_vec.wgsl holds: rows up to 4·256·8 = 8192 columns.
const VEC_PER_THREAD: u32 = 8;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
    shift_off: u32,
    scale_off: u32,
    _pad: [u32; 3],
}

/// What a LayerNorm applies after normalizing `y = (x − mean)/√(var + eps)` of each row.
#[derive(Clone, Copy, Debug)]
pub enum NormMode<'a> {
    /// `y` (no parameters: the DiT's `norm1`, `norm2` and the head's norm before modulation).
    Plain,
    /// `y·weight + bias`, both f32 `[C]` (the DiT's `norm3`).
    Affine {
        /// Per-channel scale `[C]`.
        weight: &'a Tensor,
        /// Per-channel offset `[C]`.
        bias: &'a Tensor,
    },
    /// `y·(1 + mods[scale_row]) + mods[shift_row]` with `mods` an f32 `[R, C]` table (the DiT's
    /// modulation table `m = modulation + e0`, `[6, dim]`); rows are picked by index.
    Modulate {
        /// The modulation table `[R, C]`.
        mods: &'a Tensor,
        /// Row of `mods` added after scaling (`shift`).
        shift_row: u32,
        /// Row of `mods` used as `1 + scale`.
        scale_row: u32,
    },
}

/// A shader variant of the norm kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    Affine,
    Modulate,
    Rms,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Plain, Kind::Affine, Kind::Modulate, Kind::Rms];

    fn name(self) -> &'static str {
        match self {
            Kind::Plain => "layer",
            Kind::Affine => "layer,affine",
            Kind::Modulate => "layer,modulate",
            Kind::Rms => "rms",
        }
    }

    fn prelude(self) -> &'static str {
        match self {
            Kind::Plain => {
                "const RMS: bool = false;\n\
                 fn epilogue(c: u32, y: f32) -> f32 { return y; }\n"
            }
            Kind::Affine => {
                "const RMS: bool = false;\n\
                 @group(0) @binding(3) var<storage, read> weight: array<f32>;\n\
                 @group(0) @binding(4) var<storage, read> bias: array<f32>;\n\
                 fn epilogue(c: u32, y: f32) -> f32 { return y * weight[c] + bias[c]; }\n"
            }
            Kind::Modulate => {
                "const RMS: bool = false;\n\
                 @group(0) @binding(3) var<storage, read> mods: array<f32>;\n\
                 fn epilogue(c: u32, y: f32) -> f32 {\n    \
                 return y * (1.0 + mods[P.scale_off + c]) + mods[P.shift_off + c];\n}\n"
            }
            Kind::Rms => {
                "const RMS: bool = true;\n\
                 @group(0) @binding(3) var<storage, read> weight: array<f32>;\n\
                 fn epilogue(c: u32, y: f32) -> f32 { return y * weight[c]; }\n"
            }
        }
    }

    /// norm_vec.wgsl's epilogue over four columns `4·c4..`, with vec4 bindings.
    fn prelude_vec(self) -> &'static str {
        match self {
            Kind::Plain => {
                "const RMS: bool = false;\n\
                 fn epilogue4(c4: u32, y: vec4<f32>) -> vec4<f32> { return y; }\n"
            }
            Kind::Affine => {
                "const RMS: bool = false;\n\
                 @group(0) @binding(3) var<storage, read> weight: array<vec4<f32>>;\n\
                 @group(0) @binding(4) var<storage, read> bias: array<vec4<f32>>;\n\
                 fn epilogue4(c4: u32, y: vec4<f32>) -> vec4<f32> {\n    \
                 return y * weight[c4] + bias[c4];\n}\n"
            }
            Kind::Modulate => {
                "const RMS: bool = false;\n\
                 @group(0) @binding(3) var<storage, read> mods: array<vec4<f32>>;\n\
                 fn epilogue4(c4: u32, y: vec4<f32>) -> vec4<f32> {\n    \
                 return y * (1.0 + mods[P.scale_off / 4u + c4]) + mods[P.shift_off / 4u + c4];\n}\n"
            }
            Kind::Rms => {
                "const RMS: bool = true;\n\
                 @group(0) @binding(3) var<storage, read> weight: array<vec4<f32>>;\n\
                 fn epilogue4(c4: u32, y: vec4<f32>) -> vec4<f32> { return y * weight[c4]; }\n"
            }
        }
    }

    /// The row-in-registers variant (norm_vec.wgsl) with an f32 or (`half`) f16 output and
    /// subgroup or workgroup-tree reductions.
    fn variant_vec(self, half: bool, subgroups: bool) -> (String, String) {
        let out = if half {
            "enable f16;\nalias OE = f16;\n"
        } else {
            "alias OE = f32;\n"
        };
        let body = crate::shaders::expand_unroll(BODY_VEC, &[("NV", VEC_PER_THREAD)]);
        let reduce = if subgroups { REDUCE_SG } else { REDUCE_WG };
        (
            format!(
                "nn/norm[{}{},vec,{}]",
                self.name(),
                if half { ",f16_out" } else { "" },
                if subgroups { "sg" } else { "wg" }
            ),
            format!("{out}{}{COMMON}{body}{reduce}", self.prelude_vec()),
        )
    }

    /// The variant with an f32 or (`half`) f16 output.
    fn variant(self, half: bool) -> (String, String) {
        let out = if half {
            "enable f16;\nalias OE = f16;\n"
        } else {
            "alias OE = f32;\n"
        };
        (
            format!(
                "nn/norm[{}{}]",
                self.name(),
                if half { ",f16_out" } else { "" }
            ),
            format!("{out}{}{COMMON}{BODY}", self.prelude()),
        )
    }
}

/// Every shader variant of this module: `(name, WGSL source)`; the LayerNorms also with an f16
/// output; each also in the row-in-registers form, with subgroup or workgroup reductions.
pub fn variants() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for k in Kind::ALL {
        for half in [false, true] {
            if half && k == Kind::Rms {
                continue;
            }
            v.push(k.variant(half));
            for sg in [false, true] {
                v.push(k.variant_vec(half, sg));
            }
        }
    }
    v
}

/// Validates `x` `[…, C]` (f32) and `out` (x's shape, own buffer; f32, or f16 where `half_ok`
/// and the adapter has `SHADER_F16`); returns (rows, C).
fn check_rows(
    gpu: &Gpu,
    op: &str,
    x: &Tensor,
    out: &Tensor,
    eps: f32,
    half_ok: bool,
) -> Result<(usize, usize)> {
    check_f32(&format!("{op}: x"), x)?;
    if half_ok {
        crate::ops::elementwise::check_f32_or_f16(gpu, &format!("{op}: out"), out)?;
    } else {
        check_f32(&format!("{op}: out"), out)?;
    }
    let cols = match x.shape().last() {
        Some(&c) if c > 0 => c,
        _ => {
            return Err(Error::shape(format!(
                "{op}: x must be [M, C] with C > 0 (normalized over the last axis), got {:?}",
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
    check_distinct(op, ("x", x), ("out", out))?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::Invalid(format!(
            "{op}: eps must be finite and non-negative, got {eps}"
        )));
    }
    check_size(gpu, op, "x", x)?;
    Ok((x.numel() / cols, cols))
}

/// Fails unless `t` is an f32 `[cols]` vector.
fn check_vector(op: &str, name: &str, t: &Tensor, x: &Tensor, cols: usize) -> Result<()> {
    check_f32(&format!("{op}: {name}"), t)?;
    if t.shape() != [cols] {
        return Err(Error::shape(format!(
            "{op}: {name} {:?} must be [{cols}] for x {:?}",
            t.shape(),
            x.shape()
        )));
    }
    Ok(())
}

fn dispatch(
    batch: &mut Batch<'_>,
    kind: Kind,
    p: Params,
    buffers: &[&Tensor],
    rows: usize,
) -> Result<()> {
    let gpu = batch.gpu();
    // buffers[1] is the output
    let half = buffers.get(1).is_some_and(|o| o.dtype() == DType::F16);
    // the row in registers where it fits (C % 4 == 0, C <= 8192: every DiT and umT5 width)
    let vec = p.cols.is_multiple_of(4) && p.cols <= 4 * 256 * VEC_PER_THREAD;
    let (key, src) = if vec {
        kind.variant_vec(half, gpu.caps().subgroups)
    } else {
        kind.variant(half)
    };
    let pipe = gpu.pipeline(&key, &src, true)?;
    let groups = groups_2d(rows, gpu.caps().max_workgroups_per_dim);
    batch.dispatch(&pipe, bytemuck::bytes_of(&p), buffers, groups)
}

/// Records a LayerNorm of every row of `x` `[…, C]` (f32; last axis C > 0, biased variance, f32
/// two-pass) into `out` (x's shape, its own buffer), followed by `mode`'s affine or modulation
/// step. `out` is f32, or f16 (`SHADER_F16`): the f32 result rounded to nearest even as it is
/// stored (the DiT's norm outputs feeding 16-bit GEMMs). `eps` must be finite and non-negative
/// (the DiT uses 1e-6). Fails with [`Error::Shape`] on mismatched shapes or dtypes, with
/// [`Error::Unsupported`] for an f16 `out` without `SHADER_F16`.
pub fn record_layer_norm(
    batch: &mut Batch<'_>,
    x: &Tensor,
    out: &Tensor,
    eps: f32,
    mode: &NormMode<'_>,
) -> Result<()> {
    let op = "layer_norm";
    let gpu = batch.gpu();
    let (rows, cols) = check_rows(gpu, op, x, out, eps, true)?;
    let mut p = Params {
        rows: rows as u32,
        cols: cols as u32,
        eps,
        shift_off: 0,
        scale_off: 0,
        _pad: [0; 3],
    };
    match *mode {
        NormMode::Plain => dispatch(batch, Kind::Plain, p, &[x, out], rows),
        NormMode::Affine { weight, bias } => {
            check_vector(op, "weight", weight, x, cols)?;
            check_vector(op, "bias", bias, x, cols)?;
            check_distinct(op, ("weight", weight), ("out", out))?;
            check_distinct(op, ("bias", bias), ("out", out))?;
            dispatch(batch, Kind::Affine, p, &[x, out, weight, bias], rows)
        }
        NormMode::Modulate {
            mods,
            shift_row,
            scale_row,
        } => {
            check_f32(&format!("{op}: mods"), mods)?;
            let ms = mods.shape();
            if ms.len() != 2 || ms[1] != cols {
                return Err(Error::shape(format!(
                    "{op}: mods {ms:?} must be an [R, {cols}] table for x {:?}",
                    x.shape()
                )));
            }
            for (name, r) in [("shift_row", shift_row), ("scale_row", scale_row)] {
                if r as usize >= ms[0] {
                    return Err(Error::shape(format!(
                        "{op}: {name} {r} is out of range for mods {ms:?}"
                    )));
                }
            }
            check_distinct(op, ("mods", mods), ("out", out))?;
            check_size(gpu, op, "mods", mods)?;
            p.shift_off = (shift_row as usize * cols) as u32;
            p.scale_off = (scale_row as usize * cols) as u32;
            dispatch(batch, Kind::Modulate, p, &[x, out, mods], rows)
        }
    }
}

/// LayerNorm of `x` `[…, C]` with `mode` into a new tensor (submitted, not waited for).
pub fn layer_norm(gpu: &Gpu, x: &Tensor, eps: f32, mode: &NormMode<'_>) -> Result<Tensor> {
    let out = gpu.empty(x.shape(), DType::F32)?;
    let mut batch = gpu.batch();
    record_layer_norm(&mut batch, x, &out, eps, mode)?;
    batch.submit()?;
    Ok(out)
}

/// Records an RMSNorm of every row of `x` `[…, C]` over its full width C:
/// `out = x·rsqrt(mean(x²) + eps)·weight` with `weight` f32 `[C]` (the DiT's q/k norms, over all
/// `dim` channels, not per head). f32 math; `out` has x's shape and its own buffer. With
/// `eps = 0`, an all-zero row gives NaN (as in PyTorch).
pub fn record_rms_norm(
    batch: &mut Batch<'_>,
    x: &Tensor,
    weight: &Tensor,
    out: &Tensor,
    eps: f32,
) -> Result<()> {
    let op = "rms_norm";
    let gpu = batch.gpu();
    let (rows, cols) = check_rows(gpu, op, x, out, eps, false)?;
    check_vector(op, "weight", weight, x, cols)?;
    check_distinct(op, ("weight", weight), ("out", out))?;
    let p = Params {
        rows: rows as u32,
        cols: cols as u32,
        eps,
        shift_off: 0,
        scale_off: 0,
        _pad: [0; 3],
    };
    dispatch(batch, Kind::Rms, p, &[x, out, weight], rows)
}

/// RMSNorm of `x` `[…, C]` times `weight` `[C]` into a new tensor (submitted, not waited for).
pub fn rms_norm(gpu: &Gpu, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let out = gpu.empty(x.shape(), DType::F32)?;
    let mut batch = gpu.batch();
    record_rms_norm(&mut batch, x, weight, &out, eps)?;
    batch.submit()?;
    Ok(out)
}
