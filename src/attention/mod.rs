//! Block-sparse flash attention over per-row KV block lists. Dense attention is the same kernel
//! with every block listed, so one kernel is tuned, not two.

use crate::error::{Error, Result};
use crate::gpu::{Batch, DType, Gpu, Tensor};
use crate::nabla::{BLOCK, BlockMask};
use crate::shaders;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    s: u32,
    nb: u32,
    mask_heads: u32,
    scale_log2e: f32,
}

/// Validates q, k, v, out and the mask; returns (BH, S, D).
fn check(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    mask: &BlockMask,
) -> Result<(usize, usize, usize)> {
    let sh = q.shape();
    if sh.len() != 4 {
        return Err(Error::shape(format!(
            "attention q must be [B, H, S, D], got {sh:?}"
        )));
    }
    for (name, t) in [("k", k), ("v", v), ("out", out)] {
        if t.shape() != sh || t.dtype() != q.dtype() {
            return Err(Error::shape(format!(
                "attention {name} is {:?} {:?}, expected q's {sh:?} {:?}",
                t.shape(),
                t.dtype(),
                q.dtype()
            )));
        }
    }
    let (b, h, s, d) = (sh[0], sh[1], sh[2], sh[3]);
    if d != 64 && d != 128 {
        return Err(Error::shape(format!(
            "attention head_dim {d} is not supported; use 64 or 128"
        )));
    }
    if s == 0 || s % BLOCK != 0 {
        return Err(Error::shape(format!(
            "attention sequence length {s} must be a positive multiple of {BLOCK}"
        )));
    }
    let nb = s / BLOCK;
    if mask.nb() != nb {
        return Err(Error::shape(format!(
            "block mask has {} blocks per side, the sequence of {s} tokens has {nb}",
            mask.nb()
        )));
    }
    if mask.heads() != 1 && mask.heads() != b * h {
        return Err(Error::shape(format!(
            "block mask has {} heads; expected 1 (shared) or B·H = {}",
            mask.heads(),
            b * h
        )));
    }
    match q.dtype() {
        DType::F32 => {}
        DType::F16 if gpu.caps().f16 => {}
        DType::F16 => {
            return Err(Error::Unsupported {
                adapter: gpu.caps().name.clone(),
                feature: "SHADER_F16",
                what: "f16 attention".into(),
            });
        }
        DType::U32 | DType::BF16 => {
            return Err(Error::shape("attention inputs must be f32 or f16"));
        }
    }
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        gpu.check_binding(&format!("attention {name} {sh:?}"), t.logical_bytes())?;
    }
    if b * h > gpu.caps().max_workgroups_per_dim as usize
        || nb > gpu.caps().max_workgroups_per_dim as usize
    {
        return Err(Error::shape(format!(
            "attention grid {nb} blocks × {} heads exceeds the device's dispatch limit",
            b * h
        )));
    }
    Ok((b * h, s, d))
}

/// Records block-sparse attention of `q`, `k`, `v` `[B, H, S, D]` under `mask` into `out`.
pub fn record_attention(
    batch: &mut Batch<'_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &BlockMask,
    out: &Tensor,
) -> Result<()> {
    let gpu = batch.gpu();
    let (bh, s, d) = check(gpu, q, k, v, out, mask)?;
    let key = format!("attention/block_sparse[{:?},d{d}]", q.dtype());
    let src = shaders::source(shaders::BLOCK_SPARSE, q.dtype(), Some(d as u32));
    let pipe = gpu.pipeline(&key, &src, true)?;
    let p = Params {
        s: s as u32,
        nb: (s / BLOCK) as u32,
        mask_heads: mask.heads() as u32,
        scale_log2e: (1.0 / (d as f64).sqrt() * std::f64::consts::LOG2_E) as f32,
    };
    batch.dispatch(
        &pipe,
        bytemuck::bytes_of(&p),
        &[q, k, v, mask.counts(), mask.indices(), out],
        [(s / BLOCK) as u32, bh as u32, 1],
    )
}

/// Block-sparse attention: every query row of block `i` attends in full to the key blocks the
/// mask lists for `i` (softmax scale 1/√D, f32 accumulation). Output has q's shape and dtype.
pub fn block_sparse_attention(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &BlockMask,
) -> Result<Tensor> {
    let out = gpu.empty(q.shape(), q.dtype())?;
    let mut b = gpu.batch();
    record_attention(&mut b, q, k, v, mask, &out)?;
    b.submit()?;
    Ok(out)
}

/// Dense attention: the same kernel with every block listed.
pub fn dense_attention(gpu: &Gpu, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let s = q.shape().get(2).copied().unwrap_or(0);
    if s == 0 || s % BLOCK != 0 {
        return Err(Error::shape(format!(
            "attention sequence length {s} must be a positive multiple of {BLOCK}"
        )));
    }
    let full = BlockMask::full(gpu, s / BLOCK)?;
    block_sparse_attention(gpu, q, k, v, &full)
}
