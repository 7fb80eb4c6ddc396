//! Block-sparse flash attention on CUDA tensor cores (`src/cuda/kernels/attention.cu`, and
//! `attention_sm90a.cu` on Hopper).
//!
//! One CTA computes one 64-row query block (one mask row) of one head: the listed 64-key blocks
//! stream through shared memory by `cp.async`, `S = QKᵀ` and `O += PV` run on tensor cores (f16 or
//! bf16 operands, f32 accumulators), the softmax is online in base 2 with f32 statistics and a
//! lazy rescale. Ragged tails are handled (keys ≥ Skv masked, query rows ≥ Sq not written), a
//! mask may have one shared head or one per head (B·H), and an empty list gives 0. f32 inputs run
//! a plain f32 kernel (for parity work, not tuned).
//!
//! | dtype | head dim | kernel | shared memory |
//! |---|---|---|---|
//! | f16, bf16, dense | 128 | `wgmma` FlashAttention-3 form (sm_90a; default for dense attention on compute capability 9.0): 128 query rows per CTA in two consumer warpgroups taking turns (ping-pong), 128-key tiles, P·V of each pair under the next pair's softmax, a producer warpgroup loading by TMA into 3 stages | 1 KiB + 32 KiB + stages · 64 KiB (3 stages: 225 KiB) |
//! | f16, bf16 | 64, 128 | `wgmma` FlashAttention-3 form for block lists (sm_90a; default for masked attention, and dense head_dim 64, on compute capability 9.0): two query blocks per CTA, each consumer warpgroup with its own list and ring of 3 key-block stages, P·V under the next block's softmax, TMA loads | 1 KiB + 2 · 7 · 64 · D · 2 B (D = 128: 225 KiB) |
//! | f16, bf16 | 64, 128 | `wgmma` + TMA (sm_90a): one warpgroup, Q + 2 stages of K and V tiles in the 128-byte swizzle, loaded by the tensor memory accelerator onto mbarriers | 1 KiB + 5 · 64 · D · 2 B (D = 128: 81 KiB) |
//! | f16, bf16 | 64, 128 | `wgmma` (sm_90a): the same with every thread copying its share by `cp.async` | the same |
//! | f16, bf16 | 64, 128 | `mma.sync.m16n8k16` (default elsewhere), 4 warps × 16 rows, 3 stages (default) or 2 | stages · 2 · 64 · D · 2 B (D = 128: 96 / 64 KiB) |
//! | f16, bf16 | 64, 128 | `mma.sync`, 2 warps × 32 rows, 2 stages | (64 · D + 2 · 2 · 64 · D) · 2 B (D = 128: 80 KiB) |
//! | f32 | 64, 128 | f32 SIMT, 16-key tiles | 16 · D · 8 B |
//!
//! The `wgmma` kernel runs `S = QKᵀ` as `wgmma.m64n64k16` with Q and K from shared memory and
//! `O += PV` as `wgmma.m64n{D}k16` with P from registers and V read transposed from shared
//! memory; P·V of block n is left running while block n + 1's copies are waited for and its S
//! issued. On the H200 at wan14b-720p it runs 1.35–1.4× the `mma.sync` kernel (dense 226–236 ms,
//! sparse ~400 effective TFLOP/s, FlexAttention's rate); the other forms measured are listed in
//! `attention_sm90a.cu`. Loading the tiles by TMA (one thread issues 64 × 64 box copies through
//! tensor maps built per call) instead of 16 `cp.async` per thread and block took the dense
//! 14B case from 221–224 to 198 ms (467 TFLOP/s) and the sparse ones from ~415 to ~455
//! effective TFLOP/s: the kernel issues 23 % fewer instructions. The FlashAttention-3 forms run
//! the dense 14B case in 149.8–152.6 ms (606–617 TFLOP/s; cuDNN's SDPA in the same call:
//! 146.8 ms) and the 1.3B one in 5.38 ms, and the sparse cases 1.5–4 % faster than the TMA
//! kernel: 1.11–1.15× FlexAttention's speed on the same masks.
//!
//! The 32-row `mma.sync` form feeds every K/V fragment read from shared memory to two `mma` (the
//! 16-row form re-reads the whole K and V tiles per 16 rows) at the cost of 255 registers per
//! thread; it ran 20 % slower on the H200 (`NABLA_CUDA_ATTN_ROWS=32`).
//!
//! Each CTA walks its list starting at entry `query block mod count` (wrapping around), so the
//! CTAs of a head do not all stream the same K/V block at once (order does not change the result
//! beyond rounding).
//!
//! [`attention`] reads its [`AttentionOptions`] from the environment
//! (`NABLA_CUDA_ATTN_KERNEL=auto|mma|wgmma|tma|fa`, `NABLA_CUDA_ATTN_STAGES=2|3`,
//! `NABLA_CUDA_ATTN_ROTATE=0|1`, `NABLA_CUDA_ATTN_ROWS=16|32`); [`attention_with`] takes them as
//! an argument (benchmarks).

use super::launch::{Arg, launch, max_shared_bytes, tile_map_3d};
use super::nabla::{CudaMask, check_aligned, check_arch, u32_of};
use super::{Cuda, CudaTensor, cuda_err};
use crate::error::{Error, Result};
use crate::gpu::DType;
use crate::nabla::BLOCK;
use cudarc::driver::LaunchConfig;
use cudarc::driver::sys::CUevent_flags;

/// The NVRTC module of the mma.sync and f32 kernels.
const MODULE: &str = "attention";
/// The NVRTC module of the wgmma kernels (sm_90a).
const MODULE_SM90A: &str = "attention_sm90a";

/// Validates q, k, v, out and the mask; returns (B·H, Sq, Skv, D).
fn check(
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    mask: Option<&CudaMask>,
    out: &CudaTensor,
) -> Result<(usize, usize, usize, usize)> {
    let op = "attention";
    let sh = &q.shape;
    if sh.len() != 4 {
        return Err(Error::shape(format!(
            "{op}: q must be [B, H, Sq, D], got {sh:?}"
        )));
    }
    let ks = &k.shape;
    if ks.len() != 4 || ks[0] != sh[0] || ks[1] != sh[1] || ks[3] != sh[3] {
        return Err(Error::shape(format!(
            "{op}: k {ks:?} must be [B, H, Skv, D] with q's B, H and D ({sh:?})"
        )));
    }
    for (name, t, want) in [("k", k, ks), ("v", v, ks), ("out", out, sh)] {
        if &t.shape != want || t.dtype != q.dtype {
            return Err(Error::shape(format!(
                "{op}: {name} is {:?} {:?}, expected {want:?} {:?}",
                t.shape, t.dtype, q.dtype
            )));
        }
    }
    if q.dtype == DType::U32 {
        return Err(Error::shape(format!(
            "{op}: q, k, v must be f16, bf16 or f32, got u32"
        )));
    }
    let (b, h, sq, d) = (sh[0], sh[1], sh[2], sh[3]);
    let skv = ks[2];
    if d != 64 && d != 128 {
        return Err(Error::shape(format!(
            "{op}: head_dim {d} is not supported; use 64 or 128"
        )));
    }
    if b * h == 0 || sq == 0 || skv == 0 {
        return Err(Error::shape(format!(
            "{op}: needs at least one head, one query and one key (got {sh:?} and {ks:?})"
        )));
    }
    if b * h > 65535 {
        return Err(Error::shape(format!(
            "{op}: {} heads (B·H) exceed the 65535 of one CUDA grid axis; split the call",
            b * h
        )));
    }
    u32_of(op, "Sq", sq)?;
    u32_of(op, "Skv", skv)?;
    let (nq, nkv) = (sq.div_ceil(BLOCK), skv.div_ceil(BLOCK));
    if let Some(m) = mask {
        m.check()?;
        if m.nq != nq || m.nkv != nkv {
            return Err(Error::shape(format!(
                "{op}: block mask is {}x{} blocks, but {sq} queries and {skv} keys make {nq}x{nkv} \
                 blocks of {BLOCK}",
                m.nq, m.nkv
            )));
        }
        if m.heads != 1 && m.heads != b * h {
            return Err(Error::shape(format!(
                "{op}: block mask has {} heads; expected 1 (shared) or B·H = {}",
                m.heads,
                b * h
            )));
        }
    }
    for (name, t) in [("q", q), ("k", k), ("v", v), ("out", out)] {
        check_aligned(op, name, t)?;
    }
    Ok((b * h, sq, skv, d))
}

/// Which tensor-core attention kernel runs (f16 / bf16 inputs; f32 always runs the f32 kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// On Hopper (compute capability 9.0) [`AttnKernel::WgmmaFa`]: the FlashAttention-3 form
    /// for dense head_dim 128, the TMA-loaded `wgmma` kernel for the rest; `mma.sync`
    /// elsewhere.
    Auto,
    /// `mma.sync.m16n8k16` (`attention.cu`; every architecture from sm_80).
    MmaSync,
    /// Warpgroup MMA (`attention_sm90a.cu`; compute capability 9.0 only), tiles copied by
    /// every thread with `cp.async`.
    Wgmma,
    /// The same warpgroup-MMA kernel with its tiles loaded by the tensor memory accelerator
    /// (one thread issues 64 × 64 box copies through tensor maps, completing on mbarriers).
    WgmmaTma,
    /// The FlashAttention-3 forms of the wgmma kernel: a producer warpgroup loading by TMA,
    /// two consumer warpgroups with 240 registers, each block's P·V running under the next
    /// block's softmax. Dense attention at head_dim 128 (no mask): `attn_fa`, 128 query rows
    /// per CTA sharing 128-key tiles, the two warpgroups taking turns at the tensor cores
    /// (`stages` 2 or 3 of 64 KiB, 3 by default). Otherwise `attn_fs`: two query blocks per
    /// CTA, each with its own list and its own ring of 3 key-block stages.
    WgmmaFa,
}

impl AttnKernel {
    /// The kernel that runs on a device of compute capability `cc`, or an error when `Wgmma`
    /// is asked for elsewhere than 9.0.
    pub fn resolve(self, cc: (i32, i32), device: &str) -> Result<AttnKernel> {
        match self {
            AttnKernel::Auto if cc == (9, 0) => Ok(AttnKernel::WgmmaFa),
            AttnKernel::Auto => Ok(AttnKernel::MmaSync),
            AttnKernel::Wgmma | AttnKernel::WgmmaTma | AttnKernel::WgmmaFa if cc != (9, 0) => {
                Err(Error::Unsupported {
                    adapter: device.to_string(),
                    feature: "wgmma (compute capability 9.0)",
                    what: format!(
                        "the warpgroup-MMA attention kernel on compute capability {}.{}; use the \
                         mma.sync kernel (NABLA_CUDA_ATTN_KERNEL=mma or auto)",
                        cc.0, cc.1
                    ),
                })
            }
            k => Ok(k),
        }
    }

    /// Short name for tables: `mma.sync`, `wgmma`, `wgmma+tma` or the dense FA3 form's.
    pub fn label(self) -> &'static str {
        match self {
            AttnKernel::Auto => "auto",
            AttnKernel::MmaSync => "mma.sync",
            AttnKernel::Wgmma => "wgmma",
            AttnKernel::WgmmaTma => "wgmma+tma",
            AttnKernel::WgmmaFa => "wgmma-fa3",
        }
    }
}

/// Tuning knobs of the tensor-core attention kernels (`stages` and `rows_per_warp` apply to the
/// `mma.sync` kernel only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionOptions {
    /// Which tensor-core kernel (default [`AttnKernel::Auto`]).
    pub kernel: AttnKernel,
    /// K/V pipeline stages in shared memory: 3 (default; D = 128: 96 KiB, 2 CTAs per SM) or 2
    /// (64 KiB, 3 CTAs per SM). On the H200 at wan14b-720p, 3 stages ran 5 % faster (dense
    /// 316 vs 333 ms, nabla-0.4 53.4 vs 56.5 ms); 32 rows per warp ran 20 % slower.
    pub stages: usize,
    /// Start each query block's walk at entry `qb mod count` (default) instead of entry 0.
    pub rotate: bool,
    /// Query rows per warp of the `mma.sync` kernel: 16 (4 warps per 64-row block, default) or
    /// 32 (2 warps; 2 stages only). The `wgmma` kernel always runs one warpgroup per block.
    pub rows_per_warp: usize,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        AttentionOptions {
            kernel: AttnKernel::Auto,
            stages: 3,
            rotate: true,
            rows_per_warp: 16,
        }
    }
}

impl AttentionOptions {
    /// The defaults, overridden by `NABLA_CUDA_ATTN_KERNEL=auto|mma|wgmma|tma|fa`,
    /// `NABLA_CUDA_ATTN_STAGES=2|3`, `NABLA_CUDA_ATTN_ROTATE=0|1` and `NABLA_CUDA_ATTN_ROWS=16|32`.
    pub fn from_env() -> Result<AttentionOptions> {
        let mut o = AttentionOptions::default();
        if let Ok(v) = std::env::var("NABLA_CUDA_ATTN_KERNEL") {
            o.kernel = match v.trim() {
                "auto" => AttnKernel::Auto,
                "mma" => AttnKernel::MmaSync,
                "wgmma" => AttnKernel::Wgmma,
                "tma" => AttnKernel::WgmmaTma,
                "fa" => AttnKernel::WgmmaFa,
                _ => {
                    return Err(Error::BadEnv {
                        var: "NABLA_CUDA_ATTN_KERNEL",
                        value: v,
                        expected: "auto, mma, wgmma, tma or fa (the tensor-core attention kernel)",
                    });
                }
            };
        }
        if let Ok(v) = std::env::var("NABLA_CUDA_ATTN_STAGES") {
            o.stages = match v.trim() {
                "2" => 2,
                "3" => 3,
                _ => {
                    return Err(Error::BadEnv {
                        var: "NABLA_CUDA_ATTN_STAGES",
                        value: v,
                        expected: "2 or 3 (K/V pipeline stages of the tensor-core attention)",
                    });
                }
            };
        }
        if let Ok(v) = std::env::var("NABLA_CUDA_ATTN_ROTATE") {
            o.rotate = match v.trim() {
                "0" => false,
                "1" => true,
                _ => {
                    return Err(Error::BadEnv {
                        var: "NABLA_CUDA_ATTN_ROTATE",
                        value: v,
                        expected: "0 or 1 (rotate each query block's key-block walk)",
                    });
                }
            };
        }
        if let Ok(v) = std::env::var("NABLA_CUDA_ATTN_ROWS") {
            o.rows_per_warp = match v.trim() {
                "16" => 16,
                "32" => 32,
                _ => {
                    return Err(Error::BadEnv {
                        var: "NABLA_CUDA_ATTN_ROWS",
                        value: v,
                        expected: "16 or 32 (query rows per warp of the tensor-core attention)",
                    });
                }
            };
        }
        Ok(o)
    }
}

/// `out = softmax(q·kᵀ/√D)·v` over the listed key blocks of each 64-row query block (`mask`), or
/// over every key (`None`). q, out `[B, H, Sq, D]`; k, v `[B, H, Skv, D]`; f16, bf16 or f32
/// (all the same); D = 64 or 128; the mask has `ceil(Sq/64) × ceil(Skv/64)` blocks and 1 or
/// B·H heads. Enqueued on the stream; `out` must not overlap the inputs. Options from the
/// environment ([`AttentionOptions::from_env`]).
pub fn attention(
    cuda: &Cuda,
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    mask: Option<&CudaMask>,
    out: &CudaTensor,
) -> Result<()> {
    attention_with(cuda, q, k, v, mask, out, AttentionOptions::from_env()?)
}

/// [`attention`] with explicit [`AttentionOptions`].
pub fn attention_with(
    cuda: &Cuda,
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    mask: Option<&CudaMask>,
    out: &CudaTensor,
    opts: AttentionOptions,
) -> Result<()> {
    check_arch(cuda, "attention on CUDA")?;
    let (bh, sq, skv, d) = check(q, k, v, mask, out)?;
    let stages = opts.stages;
    if stages != 2 && stages != 3 {
        return Err(Error::Invalid(format!(
            "attention: {stages} pipeline stages; use 2 or 3"
        )));
    }
    let kernel = opts
        .kernel
        .resolve(cuda.compute_capability(), cuda.name())?;
    let sixteen = q.dtype != DType::F32;
    if kernel == AttnKernel::WgmmaFa && mask.is_none() && d == 128 && sixteen {
        return attention_fa(cuda, q, k, v, out, (bh, sq, skv), opts);
    }
    // the FA3 family's masked form (attn_fs: two query blocks per CTA, each its own ring)
    let fs = kernel == AttnKernel::WgmmaFa && sixteen;
    let tma = matches!(kernel, AttnKernel::WgmmaTma | AttnKernel::WgmmaFa) && sixteen;
    let wg = (kernel == AttnKernel::Wgmma && sixteen) || tma;
    let wide = match opts.rows_per_warp {
        _ if wg => false,
        16 => false,
        32 if stages == 2 => true,
        32 => {
            return Err(Error::Invalid(
                "attention: 32 query rows per warp run with 2 pipeline stages only".into(),
            ));
        }
        r => {
            return Err(Error::Invalid(format!(
                "attention: {r} query rows per warp; use 16 or 32"
            )));
        }
    };
    let (nq, nkv) = (sq.div_ceil(BLOCK), skv.div_ceil(BLOCK));
    let ty = match q.dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::U32 => return Err(Error::shape("attention: q, k, v must not be u32")),
    };
    let (name, threads, smem) = if q.dtype == DType::F32 {
        (format!("attn_f32_d{d}"), 256, 0usize)
    } else if fs {
        // alignment, then per query block: Q and 3 stages of K and V; 7 mbarriers each
        (
            format!("attn_fs_{ty}_d{d}"),
            384,
            1024 + 2 * 7 * 64 * d * 2 + 112,
        )
    } else if wg {
        // 1024 bytes to align the tiles for the 128-byte swizzle, Q, two K/V stages, the stage
        // table
        (
            format!("attn_{}_{ty}_d{d}", if tma { "tma" } else { "wg" }),
            128,
            1024 + 5 * 64 * d * 2 + 16,
        )
    } else if wide {
        (
            format!("attn2_{ty}_d{d}_s{stages}"),
            64,
            (64 * d + stages * 2 * 64 * d) * 2 + 16,
        )
    } else {
        (
            format!("attn_{ty}_d{d}_s{stages}"),
            128,
            stages * 2 * 64 * d * 2 + 16,
        )
    };
    let limit = max_shared_bytes(cuda)?;
    if smem > limit {
        return Err(Error::Unsupported {
            adapter: cuda.name().to_string(),
            feature: "enough shared memory per block",
            what: if fs {
                format!(
                    "the attention kernel {name} ({smem} bytes, the device allows {limit}); use \
                     NABLA_CUDA_ATTN_KERNEL=tma"
                )
            } else {
                format!(
                    "the {stages}-stage attention kernel for head_dim {d} ({smem} bytes, the \
                     device allows {limit}); use 2 stages"
                )
            },
        });
    }
    let (counts, indices, heads) =
        mask.map_or((0, 0, 1), |m| (m.counts.ptr(), m.indices.ptr(), m.heads));
    let sl2 = (1.0 / (d as f64).sqrt() * std::f64::consts::LOG2_E) as f32;
    let (module, src) = if wg {
        (MODULE_SM90A, super::sources::ATTENTION_SM90A)
    } else {
        (MODULE, super::sources::ATTENTION)
    };
    let inputs = if tma {
        tile_maps(q, k, v, (bh, sq, skv, d))?
    } else {
        [Arg::U64(q.ptr()), Arg::U64(k.ptr()), Arg::U64(v.ptr())]
    };
    let [a0, a1, a2] = inputs;
    let args = [
        a0,
        a1,
        a2,
        Arg::U64(out.ptr()),
        Arg::U64(counts),
        Arg::U64(indices),
        Arg::U32(sq as u32),
        Arg::U32(skv as u32),
        Arg::U32(nq as u32),
        Arg::U32(nkv as u32),
        Arg::U32(heads as u32),
        Arg::F32(sl2),
        Arg::U32(opts.rotate as u32),
    ];
    launch(
        cuda,
        module,
        src,
        &name,
        LaunchConfig {
            grid_dim: (
                u32_of(
                    "attention",
                    "query blocks",
                    if fs { nq.div_ceil(2) } else { nq },
                )?,
                bh as u32,
                1,
            ),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        },
        &args,
    )
}

/// Tensor maps of q, k, v as (D, S, B·H) tensors of 64 × 64 boxes, the TMA kernels' first
/// three arguments.
fn tile_maps(
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    (bh, sq, skv, d): (usize, usize, usize, usize),
) -> Result<[Arg; 3]> {
    let bf16 = q.dtype == DType::BF16;
    Ok([
        Arg::Map(tile_map_3d("q", q.ptr(), (d, sq, bh), bf16)?),
        Arg::Map(tile_map_3d("k", k.ptr(), (d, skv, bh), bf16)?),
        Arg::Map(tile_map_3d("v", v.ptr(), (d, skv, bh), bf16)?),
    ])
}

/// Dense attention at head_dim 128 through `attn_fa` (see [`AttnKernel::WgmmaFa`]); shapes
/// already checked.
fn attention_fa(
    cuda: &Cuda,
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    out: &CudaTensor,
    (bh, sq, skv): (usize, usize, usize),
    opts: AttentionOptions,
) -> Result<()> {
    let d = 128;
    let stages = opts.stages;
    // alignment, the two Q tiles, the stages of 64 KiB, 2 mbarriers per stage and Q's
    let smem = 1024 + 2 * 64 * d * 2 + stages * 4 * 64 * d * 2 + 8 * (2 * stages + 1);
    let limit = max_shared_bytes(cuda)?;
    if smem > limit {
        return Err(Error::Unsupported {
            adapter: cuda.name().to_string(),
            feature: "enough shared memory per block",
            what: format!(
                "the {stages}-stage dense attention kernel ({smem} bytes, the device allows \
                 {limit}); use 2 stages"
            ),
        });
    }
    let ty = if q.dtype == DType::BF16 {
        "bf16"
    } else {
        "f16"
    };
    let sl2 = (1.0 / (d as f64).sqrt() * std::f64::consts::LOG2_E) as f32;
    let [mq, mk, mv] = tile_maps(q, k, v, (bh, sq, skv, d))?;
    let args = [
        mq,
        mk,
        mv,
        Arg::U64(out.ptr()),
        Arg::U32(sq as u32),
        Arg::U32(skv as u32),
        Arg::F32(sl2),
        Arg::U32(opts.rotate as u32),
    ];
    launch(
        cuda,
        MODULE_SM90A,
        super::sources::ATTENTION_SM90A,
        &format!("attn_fa_{ty}_s{stages}"),
        LaunchConfig {
            grid_dim: (
                u32_of("attention", "query block pairs", sq.div_ceil(128))?,
                bh as u32,
                1,
            ),
            block_dim: (384, 1, 1),
            shared_mem_bytes: smem as u32,
        },
        &args,
    )
}

/// GPU time of `f` in milliseconds by CUDA events, `reps` times after `warmup` untimed calls:
/// one value per rep (each bracketed by its own pair of events on the stream). Waits for the
/// stream.
pub fn time_ms(
    cuda: &Cuda,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    let ctx = cuda.context();
    let ev = || {
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err("creating a CUDA event", e))
    };
    for _ in 0..warmup {
        f()?;
    }
    let mut pairs = Vec::with_capacity(reps);
    for _ in 0..reps {
        let (a, b) = (ev()?, ev()?);
        a.record(cuda.stream())
            .map_err(|e| cuda_err("recording an event", e))?;
        f()?;
        b.record(cuda.stream())
            .map_err(|e| cuda_err("recording an event", e))?;
        pairs.push((a, b));
    }
    cuda.synchronize()?;
    pairs
        .iter()
        .map(|(a, b)| {
            a.elapsed_ms(b)
                .map(|ms| ms as f64)
                .map_err(|e| cuda_err("reading event times", e))
        })
        .collect()
}

/// Timing of [`attention`] by [`bench_attention`].
#[derive(Clone, Debug)]
pub struct AttentionTiming {
    /// Median GPU time of one call, ms.
    pub median_ms: f64,
    /// Fastest call, ms.
    pub min_ms: f64,
    /// FLOPs of one call counting the listed 64 × 64 blocks: `4 · 64 · 64 · D` per (head, query
    /// block, listed key block) — the "effective" count FlexAttention benchmarks use.
    pub flops: f64,
    /// Fraction of (head, query block, key block) triples listed.
    pub density: f64,
    /// `flops / median`, TFLOP/s.
    pub tflops: f64,
}

/// Times [`attention_with`] (`reps` calls after 2 warm-ups, CUDA events) on the given tensors;
/// reads the mask's counts once (host sync) to count FLOPs.
#[allow(clippy::too_many_arguments)]
pub fn bench_attention(
    cuda: &Cuda,
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    mask: Option<&CudaMask>,
    out: &CudaTensor,
    opts: AttentionOptions,
    reps: usize,
) -> Result<AttentionTiming> {
    let (bh, sq, skv, d) = check(q, k, v, mask, out)?;
    let (nq, nkv) = (sq.div_ceil(BLOCK), skv.div_ceil(BLOCK));
    let listed: f64 = match mask {
        None => (bh * nq * nkv) as f64,
        Some(m) => {
            let c: Vec<u32> = bytemuck::pod_collect_to_vec(&cuda.download_bytes(&m.counts)?);
            let per_head = c.iter().map(|&x| x.min(nkv as u32) as f64).sum::<f64>();
            if m.heads == 1 {
                per_head * bh as f64
            } else {
                per_head
            }
        }
    };
    let mut t = time_ms(cuda, 2, reps.max(1), || {
        attention_with(cuda, q, k, v, mask, out, opts)
    })?;
    t.sort_by(|a, b| a.total_cmp(b));
    let median_ms = t[t.len() / 2];
    let flops = listed * 4.0 * (BLOCK * BLOCK * d) as f64;
    Ok(AttentionTiming {
        median_ms,
        min_ms: t[0],
        flops,
        density: listed / (bh * nq * nkv) as f64,
        tflops: flops / (median_ms * 1e-3) / 1e12,
    })
}
