//! RoPE + head split + block pooling in one kernel (`shaders/nabla/rope_pool.wgsl`): the DiT's
//! q/k producer when a NABLA mask is estimated. It writes the rotated heads exactly as
//! [`crate::ops::rope::record_rope`] followed by [`crate::ops::elementwise::record_split_heads`]
//! do (bit for bit), and the mean of each 64-token block of the f32 rotations (before an f16
//! head's rounding) into the pooled q or k of a [`MaskStages`], which
//! [`super::record_mask_from_pooled`] then turns into the mask: q and k are read once, not once
//! more by a separate pooling pass.

use super::{BLOCK, MaskStages, QkSide};
use crate::error::{Error, Result};
use crate::gpu::{Batch, DType, Gpu, Tensor};
use crate::ops::elementwise::{check_distinct, check_size};
use crate::shaders;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    s: u32,
    h: u32,
    d: u32,
    nb: u32,
}

/// The pipeline name of the kernel for heads stored as `dtype` (F32 or F16), with or without
/// the pooling.
fn key(dtype: DType, pool: bool) -> String {
    let name = if pool { "rope_pool" } else { "rope_split" };
    format!("nabla/{name}[{}]", format!("{dtype:?}").to_lowercase())
}

/// The kernel's source: the storage type's prelude, the body, then the POOL constant.
fn source(dtype: DType, pool: bool) -> String {
    format!(
        "{}\nconst POOL: bool = {pool};\n",
        shaders::source(shaders::ROPE_POOL, dtype, None)
    )
}

/// Kernel variants of this module: `nabla/rope_pool[f32|f16]` and `nabla/rope_split[f32|f16]`
/// (the storage type of the heads; with and without the pooling).
pub(crate) fn variants() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for pool in [true, false] {
        for dt in [DType::F32, DType::F16] {
            v.push((key(dt, pool), source(dt, pool)));
        }
    }
    v
}

/// Checks x, the tables and the heads of the fused RoPE + head split; returns `(H, S, D)`.
fn check_heads(
    op: &str,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    out: &Tensor,
    gpu: &Gpu,
) -> Result<(usize, usize, usize)> {
    let cs = cos.shape();
    if cs.len() != 2 || cos.dtype() != DType::F32 || cs[1] == 0 {
        return Err(Error::shape(format!(
            "{op}: the cos table must be f32 [S, D/2], got {cs:?} {:?}",
            cos.dtype()
        )));
    }
    if sin.shape() != cs || sin.dtype() != DType::F32 {
        return Err(Error::shape(format!(
            "{op}: the sin table {:?} {:?} must match cos {cs:?} F32",
            sin.shape(),
            sin.dtype()
        )));
    }
    let (h, s, d) = match *out.shape() {
        [h, s, d] | [1, h, s, d] => (h, s, d),
        ref o => {
            return Err(Error::shape(format!(
                "{op}: out must be [1, H, S, D] or [H, S, D], got {o:?}"
            )));
        }
    };
    crate::ops::elementwise::check_f32_or_f16(gpu, &format!("{op}: out"), out)?;
    if cs != [s, d / 2] || d % 2 != 0 {
        return Err(Error::shape(format!(
            "{op}: tables {cs:?} do not fit heads {:?}: expected [{s}, {}]",
            out.shape(),
            d / 2
        )));
    }
    let xs = x.shape();
    let x_ok = matches!(*xs, [a, b] | [1, a, b] if a == s && b == h * d);
    if x.dtype() != DType::F32 || !x_ok {
        return Err(Error::shape(format!(
            "{op}: x must be f32 [S, H·D] = [{s}, {}] for heads {:?}, got {xs:?} {:?}",
            h * d,
            out.shape(),
            x.dtype()
        )));
    }
    if h == 0 || s == 0 {
        return Err(Error::shape(format!(
            "{op}: heads {:?} are empty",
            out.shape()
        )));
    }
    Ok((h, s, d))
}

/// Records RoPE of `x` `[S, H·D]` (f32, or `[1, S, H·D]`) with the per-token tables `cos`, `sin`
/// (f32 `[S, D/2]`, [`crate::ops::rope::rope_tables`]) written as heads `out` `[1, H, S, D]`
/// (or `[H, S, D]`; f32, or f16 rounded to nearest even with `SHADER_F16`), plus the block
/// average of the f32 rotations into `stages.qa` (`side` Q) or `stages.ka` (K), `[H, S/64, D]` f32.
///
/// The heads are bit-identical to RoPE in place then the head split (the same f32 expressions,
/// the same rounding); the pooled rows are the mean over each 64-token block of the f32
/// rotations, summed in f32: with f32 heads what the mask's own pooling of `out` gives up to
/// summation order; with f16 heads the values before their rounding (pooling the rounded
/// values needs `f32(f16(v))`, which the H200's Vulkan compiler folds into `v`, so it would not
/// be portable; see `shaders/nabla/rope_pool.wgsl`). `x` is left untouched. `S` must be a
/// multiple of 64 and `D` a multiple of 16 up to 512 (what the mask estimation accepts);
/// `stages` must serve `H` heads of `S/64` blocks with head dim `D`.
pub fn record_rope_split_heads_pooled(
    batch: &mut Batch<'_>,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    out: &Tensor,
    stages: &MaskStages,
    side: QkSide,
) -> Result<()> {
    let op = "rope_split_heads_pooled";
    let gpu = batch.gpu();
    let (h, s, d) = check_heads(op, x, cos, sin, out, gpu)?;
    if !s.is_multiple_of(BLOCK) {
        return Err(Error::shape(format!(
            "{op}: sequence length {s} is not a multiple of the {BLOCK}-token block; crop the \
             video so height and width are multiples of 128 pixels"
        )));
    }
    if d == 0 || d % 16 != 0 || d > 512 {
        return Err(Error::shape(format!(
            "{op}: head_dim {d} must be a positive multiple of 16 up to 512 (64 and 128 are the \
             usual ones)"
        )));
    }
    let nb = s / BLOCK;
    let pooled = match side {
        QkSide::Q => &stages.qa,
        QkSide::K => &stages.ka,
    };
    if pooled.shape() != [h, nb, d] || pooled.dtype() != DType::F32 {
        return Err(Error::shape(format!(
            "{op}: the mask scratch holds pooled rows {:?} {:?}, the heads {:?} need f32 \
             [{h}, {nb}, {d}] ({h} heads of {nb} blocks, head_dim {d}); allocate the scratch \
             for this shape",
            pooled.shape(),
            pooled.dtype(),
            out.shape()
        )));
    }
    check_distinct(op, ("x", x), ("out", out))?;
    check_distinct(op, ("out", out), ("pooled rows", pooled))?;
    check_distinct(op, ("x", x), ("pooled rows", pooled))?;
    dispatch(batch, op, [x, cos, sin, out, pooled], true, (h, s, d))
}

/// Checks the binding sizes and records the kernel (with or without pooling) over
/// `ceil(S / 64)` blocks × `H` heads; `bufs` are x, cos, sin, out and the pooled rows.
fn dispatch(
    batch: &mut Batch<'_>,
    op: &str,
    bufs: [&Tensor; 5],
    pool: bool,
    (h, s, d): (usize, usize, usize),
) -> Result<()> {
    let gpu = batch.gpu();
    let [x, cos, _, out, _] = bufs;
    check_size(gpu, op, "x", x)?;
    check_size(gpu, op, "out", out)?;
    check_size(gpu, op, "cos", cos)?;
    let pipe = gpu.pipeline(&key(out.dtype(), pool), &source(out.dtype(), pool), true)?;
    let nb = s.div_ceil(BLOCK);
    let p = Params {
        s: s as u32,
        h: h as u32,
        d: d as u32,
        nb: nb as u32,
    };
    batch.dispatch(
        &pipe,
        bytemuck::bytes_of(&p),
        &bufs,
        [nb as u32, h as u32, 1],
    )
}

/// [`record_rope_split_heads_pooled`] in its own submission (not waited for).
pub fn rope_split_heads_pooled(
    gpu: &Gpu,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    out: &Tensor,
    stages: &MaskStages,
    side: QkSide,
) -> Result<()> {
    let mut b = gpu.batch();
    record_rope_split_heads_pooled(&mut b, x, cos, sin, out, stages, side)?;
    b.submit()
}

/// Records RoPE of `x` `[S, H·D]` (f32, or `[1, S, H·D]`) with the per-token tables `cos`, `sin`
/// (f32 `[S, D/2]`) written as heads `out` `[1, H, S, D]` (or `[H, S, D]`; f32, or f16 rounded to
/// nearest even with `SHADER_F16`): [`record_rope_split_heads_pooled`]'s kernel without the
/// pooling, one pass where [`crate::ops::rope::record_rope`] in place followed by
/// [`crate::ops::elementwise::record_split_heads`] take two (and write `x`). The heads are
/// bit-identical to those two ops'; `x` is left untouched. Any `S`; `D` a multiple of 4 up to
/// 512.
pub fn record_rope_split_heads(
    batch: &mut Batch<'_>,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    out: &Tensor,
) -> Result<()> {
    let op = "rope_split_heads";
    let gpu = batch.gpu();
    let (h, s, d) = check_heads(op, x, cos, sin, out, gpu)?;
    if d == 0 || d % 4 != 0 || d > 512 {
        return Err(Error::shape(format!(
            "{op}: head_dim {d} must be a positive multiple of 4 up to 512 (64 and 128 are the \
             usual ones)"
        )));
    }
    check_distinct(op, ("x", x), ("out", out))?;
    // binding 5 (the pooled rows) is not touched without pooling: a 16-byte stand-in
    let dummy = gpu.cached("nabla/rope_split/dummy", || gpu.empty(&[4], DType::F32))?;
    dispatch(batch, op, [x, cos, sin, out, &dummy], false, (h, s, d))
}
