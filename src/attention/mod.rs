//! Block-sparse flash attention over per-row KV block lists. Dense attention is the same kernel
//! with every block listed, so one kernel is tuned, not two.

use crate::error::{Error, Result};
use crate::gpu::{Batch, DType, Gpu, Tensor};
use crate::nabla::{BLOCK, BlockMask};
use crate::shaders;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    sq: u32,
    skv: u32,
    nqb: u32,
    nkb: u32,
    mask_heads: u32,
    scale_log2e: f32,
    /// Where each workgroup starts its walk: 0 at its query block's index (masks), 1 at a
    /// scramble of the query block and head (full lists; block_sparse_coop.wgsl).
    order: u32,
    _pad: u32,
}

/// Validates q, k, v, out and the mask; returns (BH, Sq, Skv, D).
fn check(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    mask: &BlockMask,
) -> Result<(usize, usize, usize, usize)> {
    let sh = q.shape();
    if sh.len() != 4 {
        return Err(Error::shape(format!(
            "attention q must be [B, H, S, D], got {sh:?}"
        )));
    }
    let ks = k.shape();
    if ks.len() != 4 || ks[0] != sh[0] || ks[1] != sh[1] || ks[3] != sh[3] {
        return Err(Error::shape(format!(
            "attention k {ks:?} must be [B, H, Skv, D] with q's B, H and D ({sh:?})"
        )));
    }
    for (name, t, want) in [("k", k, ks), ("v", v, ks), ("out", out, sh)] {
        if t.shape() != want || t.dtype() != q.dtype() {
            return Err(Error::shape(format!(
                "attention {name} is {:?} {:?}, expected {want:?} {:?}",
                t.shape(),
                t.dtype(),
                q.dtype()
            )));
        }
    }
    let (b, h, s, d) = (sh[0], sh[1], sh[2], sh[3]);
    let skv = ks[2];
    if d != 64 && d != 128 {
        return Err(Error::shape(format!(
            "attention head_dim {d} is not supported; use 64 or 128"
        )));
    }
    if s == 0 || skv == 0 {
        return Err(Error::shape(format!(
            "attention needs at least one query and one key (got {s} and {skv})"
        )));
    }
    let (nb, nkb) = (s.div_ceil(BLOCK), skv.div_ceil(BLOCK));
    if mask.nb() != nb || mask.kv_blocks() != nkb {
        return Err(Error::shape(format!(
            "block mask is {}x{} blocks, but {s} queries and {skv} keys make {nb}x{nkb} blocks of {BLOCK}",
            mask.nb(),
            mask.kv_blocks()
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
    Ok((b * h, s, skv, d))
}

/// Which attention kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// The fastest kernel this adapter runs ([`resolve`]): the register-softmax tensor-core
    /// kernel, else the tensor-core kernel, else the portable one.
    /// `NABLA_ATTENTION=portable|coop|regs` overrides the choice.
    Auto,
    /// The portable f32-math kernel (any adapter, f32 or f16 storage).
    Portable,
    /// The tensor-core kernel (f16 storage, 16×16×16 f16→f32 cooperative matrices, uniform
    /// subgroup size of 16, 32 or 64), one 64-row query block per workgroup of 4 subgroups.
    Coop,
    /// The tensor-core kernel with two query blocks per workgroup of 8 subgroups, over the
    /// union of their lists: each staged K/V chunk serves 128 rows, but a block only one list
    /// holds is computed and masked for the other's rows, and one workgroup fits per SM where
    /// two of [`Kernel::Coop`] do. Never chosen by [`Kernel::Auto`]: on the H200 (wan14b-720p)
    /// it is slower than [`Kernel::Coop`] for dense attention too since session 13 (806 vs
    /// 745 ms) and 20–30 % slower on sparse masks. Falls back to [`Kernel::Coop`] where only the
    /// one-block form fits the adapter.
    CoopPairs,
    /// The tensor-core kernel with the softmax in registers (`block_sparse_regs.wgsl`): S and P
    /// never go through workgroup memory, two barriers per 32-key chunk instead of four, and the
    /// products of the next chunk's S and this chunk's P·V are issued together. Needs
    /// SPIR-V passthrough (Vulkan), subgroups of 32 and an element order of the cooperative
    /// matrices that [`crate::gpu::coop_layout`] recognises. k and v are bound read-write
    /// (a hint that keeps NVIDIA's compiler from delaying their loads; nothing writes them), so
    /// it runs only when q, k, v and out are four different buffers. Falls back to
    /// [`Kernel::Coop`] elsewhere. Chosen by [`Kernel::Auto`]: on the H200 (wan14b-720p,
    /// benches/RESULTS.md session 22) dense attention 374-378 ms against 424, NABLA masks
    /// 13-14 % faster.
    CoopRegs,
}

/// Why the cooperative kernel cannot run here, or `None` when it can.
pub fn coop_unavailable(gpu: &Gpu, dtype: DType, d: usize) -> Option<String> {
    let c = gpu.caps();
    if dtype != DType::F16 {
        return Some("needs f16 q/k/v".into());
    }
    if !c.has_coop_f16_16() {
        return Some("no 16x16x16 f16->f32 cooperative matrix".into());
    }
    if c.backend != "Vulkan" {
        return Some(format!(
            "16x16 cooperative matrices are used on Vulkan only (backend {})",
            c.backend
        ));
    }
    if !c.subgroups
        || c.subgroup_min != c.subgroup_max
        || !shaders::COOP_SUBGROUP_SIZES.contains(&c.subgroup_min)
    {
        return Some(format!(
            "needs one fixed subgroup size of 16, 32 or 64 (adapter: {}..{})",
            c.subgroup_min, c.subgroup_max
        ));
    }
    coop_form_unfit(c, d, false)
}

/// Why the pair form of the cooperative kernel ([`Kernel::CoopPairs`]) cannot run here, or
/// `None` when it can.
pub fn coop_pairs_unavailable(gpu: &Gpu, dtype: DType, d: usize) -> Option<String> {
    coop_unavailable(gpu, dtype, d).or_else(|| coop_form_unfit(gpu.caps(), d, true))
}

/// Why one form of the tensor-core kernel (`pairs`: two query blocks per workgroup) does not fit
/// this adapter's workgroup limits, or `None`.
fn coop_form_unfit(c: &crate::gpu::Capabilities, d: usize, pairs: bool) -> Option<String> {
    let nsg = if pairs { 8 } else { 4 };
    if nsg * c.subgroup_min > c.max_invocations {
        return Some(format!(
            "needs workgroups of {} invocations ({nsg} subgroups), the adapter allows {}",
            nsg * c.subgroup_min,
            c.max_invocations
        ));
    }
    // block_sparse_coop.wgsl: a 32-key K/V chunk, P and S for 16·NSG rows, alpha, wmeta,
    // wcommon
    let rows = 16 * nsg as usize;
    let smem = (32 * (d / 4 + 2) * 8 + rows * 10 * 8 + rows * 9 * 16 + rows * 4 + 16 + 16) as u32;
    if smem > c.max_workgroup_storage {
        return Some(format!(
            "needs {smem} bytes of workgroup memory, the adapter has {}",
            c.max_workgroup_storage
        ));
    }
    None
}

/// Why the register-softmax form ([`Kernel::CoopRegs`]) cannot run here, or `None` when it can
/// (the first call on a device runs the element-order probe).
pub fn coop_regs_unavailable(gpu: &Gpu, dtype: DType, d: usize) -> Option<String> {
    if let Some(why) = coop_unavailable(gpu, dtype, d) {
        return Some(why);
    }
    let c = gpu.caps();
    if !c.passthrough {
        return Some("needs SPIR-V passthrough (Vulkan)".into());
    }
    if c.subgroup_min != 32 {
        return Some(format!(
            "built for subgroups of 32 (adapter: {})",
            c.subgroup_min
        ));
    }
    // K and V of a 32-key chunk (Q staged there first)
    let smem = (64 * (d / 4 + 2) * 8) as u32;
    if smem > c.max_workgroup_storage {
        return Some(format!(
            "needs {smem} bytes of workgroup memory, the adapter has {}",
            c.max_workgroup_storage
        ));
    }
    crate::gpu::coop_layout::probe(gpu)
        .err()
        .map(|why| format!("cooperative matrix element order: {why}"))
}

/// The kernel that runs for `k` on this adapter, for q/k/v of `dtype` and head dim `d` in four
/// different buffers (see [`Kernel::CoopRegs`]): [`Kernel::Auto`] becomes the register-softmax
/// kernel where it can run, else the tensor-core kernel, else the portable one;
/// `NABLA_ATTENTION=portable|coop|regs` overrides the automatic choice.
pub fn resolve(gpu: &Gpu, dtype: DType, d: usize, k: Kernel) -> Result<Kernel> {
    choose(gpu, dtype, d, k, true)
}

/// [`resolve`]; `distinct`: q, k, v and out are four different buffers (the register-softmax
/// kernel binds k and v read-write, which wgpu refuses next to a read-only binding of the same
/// buffer; it is not used otherwise).
fn choose(gpu: &Gpu, dtype: DType, d: usize, k: Kernel, distinct: bool) -> Result<Kernel> {
    let want = match (k, std::env::var("NABLA_ATTENTION").ok().as_deref()) {
        (Kernel::Auto, Some("portable")) => Kernel::Portable,
        (Kernel::Auto, Some("coop")) => Kernel::Coop,
        (Kernel::Auto, Some("regs")) => Kernel::CoopRegs,
        (k, _) => k,
    };
    let regs = |gpu: &Gpu| distinct && coop_regs_unavailable(gpu, dtype, d).is_none();
    match want {
        Kernel::Portable => Ok(Kernel::Portable),
        // (falls back to the one-block form where it cannot run)
        Kernel::CoopRegs if regs(gpu) => Ok(want),
        // (the pair form falls back to the one-block form where only that fits)
        Kernel::CoopPairs if coop_pairs_unavailable(gpu, dtype, d).is_none() => Ok(want),
        Kernel::Coop | Kernel::CoopPairs | Kernel::CoopRegs => {
            match coop_unavailable(gpu, dtype, d) {
                None => Ok(Kernel::Coop),
                Some(why) => Err(Error::Unsupported {
                    adapter: gpu.caps().name.clone(),
                    feature: "cooperative matrices",
                    what: format!("the tensor-core attention kernel ({why})"),
                }),
            }
        }
        Kernel::Auto => Ok(if regs(gpu) {
            Kernel::CoopRegs
        } else if coop_unavailable(gpu, dtype, d).is_none() {
            Kernel::Coop
        } else {
            Kernel::Portable
        }),
    }
}

/// Records block-sparse attention of `q` `[B, H, Sq, D]` over `k`, `v` `[B, H, Skv, D]` under
/// `mask` (`ceil(Sq/64) × ceil(Skv/64)` blocks) into `out` (q's shape). Ragged tails are handled:
/// keys past `Skv` are masked, query rows past `Sq` are not written.
pub fn record_attention(
    batch: &mut Batch<'_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &BlockMask,
    out: &Tensor,
) -> Result<()> {
    record_attention_with(batch, q, k, v, mask, out, Kernel::Auto)
}

/// [`record_attention`] with an explicit kernel choice (benchmarks, self-tests).
pub fn record_attention_with(
    batch: &mut Batch<'_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &BlockMask,
    out: &Tensor,
    kernel: Kernel,
) -> Result<()> {
    record_walk(batch, q, k, v, mask, out, kernel, 0)
}

/// [`record_attention_with`] with the walk's starting `order` (see [`Params`]).
#[allow(clippy::too_many_arguments)]
fn record_walk(
    batch: &mut Batch<'_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &BlockMask,
    out: &Tensor,
    kernel: Kernel,
    order: u32,
) -> Result<()> {
    let gpu = batch.gpu();
    let (bh, s, skv, d) = check(gpu, q, k, v, out, mask)?;
    let bufs = [q.buffer(), k.buffer(), v.buffer(), out.buffer()];
    let distinct = (0..4).all(|i| (i + 1..4).all(|j| bufs[i] != bufs[j]));
    let chosen = choose(gpu, q.dtype(), d, kernel, distinct)?;
    let (pipe, groups_x) = match chosen {
        Kernel::CoopRegs => {
            let layout = crate::gpu::coop_layout::probe(gpu).map_err(|why| Error::Unsupported {
                adapter: gpu.caps().name.clone(),
                feature: "cooperative matrix element access",
                what: format!("the register-softmax attention kernel ({why})"),
            })?;
            let checked = crate::gpu::checked_override();
            let probe = attn_probe();
            let i16 = gpu.caps().int16;
            let key = format!(
                "attention/block_sparse_regs[d{d},i16={i16},checked={checked},probe={probe},\
                 {layout:?}]"
            );
            let src = shaders::source_regs(d as u32, i16, &layout, probe);
            (gpu.pipeline_spirv(&key, &src, checked)?, mask.nb() as u32)
        }
        Kernel::Coop | Kernel::CoopPairs => {
            let pairs = chosen == Kernel::CoopPairs;
            let sg = gpu.caps().subgroup_min;
            // `check` validated the shapes and the mask's dimensions, and mask lists hold only
            // indices < Nkb (checked at upload, by construction on the GPU): no runtime bounds
            // checks (NABLA_CHECKED=1 keeps them, for the checked variant's test)
            let checked = crate::gpu::checked_override();
            // diagnostics only (wrong results): NABLA_ATTN_PROBE=1 skips the K/V storage
            // loads, 4 the matrix products
            let probe = attn_probe();
            // K and V in 16-byte loads of u32 words where the device has 16-bit integers
            let i16 = gpu.caps().int16;
            let key = format!(
                "attention/block_sparse_coop[d{d},sg{sg},pairs={pairs},i16={i16},checked={checked},\
                 probe={probe}]"
            );
            let src =
                shaders::source_coop(shaders::BLOCK_SPARSE_COOP, d as u32, sg, pairs, i16, probe);
            let pipe = gpu.pipeline(&key, &src, checked)?;
            let per_group = if pairs { 2 } else { 1 };
            (pipe, mask.nb().div_ceil(per_group) as u32)
        }
        _ => {
            let key = format!("attention/block_sparse[{:?},d{d}]", q.dtype());
            let src = shaders::source(shaders::BLOCK_SPARSE, q.dtype(), Some(d as u32));
            (gpu.pipeline(&key, &src, true)?, mask.nb() as u32)
        }
    };
    let p = Params {
        sq: s as u32,
        skv: skv as u32,
        nqb: mask.nb() as u32,
        nkb: mask.kv_blocks() as u32,
        mask_heads: mask.heads() as u32,
        scale_log2e: (1.0 / (d as f64).sqrt() * std::f64::consts::LOG2_E) as f32,
        order,
        _pad: 0,
    };
    batch.dispatch(
        &pipe,
        bytemuck::bytes_of(&p),
        &[q, k, v, mask.counts(), mask.indices(), out],
        [groups_x, bh as u32, 1],
    )
}

/// `NABLA_ATTN_PROBE` (diagnostics of the benchmark, wrong results): 1 skips the K/V storage
/// loads, 4 the matrix products; 0 when unset.
fn attn_probe() -> u32 {
    std::env::var("NABLA_ATTN_PROBE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
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

/// The all-blocks mask for `sq` queries over `skv` keys (cached per shape).
pub fn full_mask(gpu: &Gpu, sq: usize, skv: usize) -> Result<std::sync::Arc<BlockMask>> {
    if sq == 0 || skv == 0 {
        return Err(Error::shape(format!(
            "attention needs at least one query and one key (got {sq} and {skv})"
        )));
    }
    BlockMask::full_rect(gpu, sq.div_ceil(BLOCK), skv.div_ceil(BLOCK))
}

/// Records dense attention (any lengths): the same kernel with every block listed.
pub fn record_dense_attention(
    batch: &mut Batch<'_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
) -> Result<()> {
    record_dense_attention_with(batch, q, k, v, out, Kernel::Auto)
}

/// [`record_dense_attention`] with an explicit kernel choice (benchmarks). The tensor-core
/// kernel walks full lists from scrambled starting blocks (measured 8 % faster than starting
/// at the query block on the H200, wan14b-720p).
pub fn record_dense_attention_with(
    batch: &mut Batch<'_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    kernel: Kernel,
) -> Result<()> {
    let (sq, skv) = (
        q.shape().get(2).copied().unwrap_or(0),
        k.shape().get(2).copied().unwrap_or(0),
    );
    let full = full_mask(batch.gpu(), sq, skv)?;
    record_walk(batch, q, k, v, &full, out, kernel, 1)
}

/// Dense attention of `q` `[B, H, Sq, D]` over `k`, `v` `[B, H, Skv, D]` (any lengths).
pub fn dense_attention(gpu: &Gpu, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let out = gpu.empty(q.shape(), q.dtype())?;
    let mut b = gpu.batch();
    record_dense_attention(&mut b, q, k, v, &out)?;
    b.submit()?;
    Ok(out)
}
