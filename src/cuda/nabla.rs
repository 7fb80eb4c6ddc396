//! NABLA block masks on CUDA: pooling, block scores, softmax + CDF threshold ∪ STA → per-row
//! KV block lists, in the same list format as the wgpu layer ([`crate::BlockMask`]).
//!
//! [`estimate_mask`] enqueues four kernels of `src/cuda/kernels/nabla.cu` on the [`Cuda`]
//! stream, with no host round trip (the DiT instead pools inside its RoPE + head split,
//! [`rope_split_heads_pooled`], then calls [`estimate_mask_prepooled`]: q and k are read once):
//!
//! 1. block average pooling of q and k (`[B, H, S, D]`, f32 / f16 / bf16, summed in f32) into
//!    `[B·H, Nb, D]` f32, each pooled row also split into an f16 pair `hi + lo` under a per-row
//!    power of two for the tensor cores;
//! 2. the block logits `qa·kaᵀ/√D` on tensor cores as `hi·hi + hi·lo + lo·hi` (f32 accuracy,
//!    ~1e-7 of `Σ|qa·ka|`);
//! 3. one warp per row: softmax (f32), the CDF cut of the reference (keep every key block whose
//!    cumulative mass, the sum of all entries `≤` it, reaches `f32(1 − thr)`: a binade histogram
//!    then radix refinement inside the cut's binade, no sort), the union with the STA window (a bitmask
//!    built once per grid and window), and the compact per-row list in ascending key order.
//!
//! The rule is the one of `threshold.wgsl` and [`crate::reference::threshold_mask_ties`]:
//! ties at the cut are kept together, `thr = 1` keeps every block, `thr = 0` keeps the row
//! maximum (and its ties) even when the f32 total falls short of 1. Decisions may differ from the
//! f64 reference only for entries whose cumulative mass lies within f32 rounding of the cut.
//!
//! STA-only algorithms need no kernel: [`sta_mask`] builds the lists on the host
//! ([`crate::nabla::sta_lists`]) and uploads them (one shared head).

use super::launch::{Arg, launch, max_shared_bytes};
use super::{Cuda, CudaTensor};
use crate::error::{Error, Result};
use crate::gpu::DType;
use crate::nabla::{BLOCK, BlockGrid, QkSide, SparseAlgo, StaWindow, sta_lists};
use cudarc::driver::LaunchConfig;
use std::sync::Mutex;

/// The NVRTC module of these kernels.
const MODULE: &str = "nabla";

/// Fails unless the device runs the kernels (mma.m16n8k16, cp.async, ldmatrix: sm_80+).
pub(super) fn check_arch(cuda: &Cuda, what: &str) -> Result<()> {
    if cuda.compute_capability().0 < 8 {
        return Err(Error::Unsupported {
            adapter: cuda.name().to_string(),
            feature: "compute capability 8.0 or newer (Ampere, Ada, Hopper, Blackwell)",
            what: what.into(),
        });
    }
    Ok(())
}

/// A size as the kernels' `u32`, or an error naming it.
pub(super) fn u32_of(op: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        Error::shape(format!(
            "{op}: {what} = {v} exceeds the kernels' 32-bit sizes (at most {})",
            u32::MAX
        ))
    })
}

/// A launch of `(x, y)` blocks of 128 threads, no dynamic shared memory.
pub(super) fn grid_128(x: u32, y: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x, y, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Fails unless the tensor's device address is 16-byte aligned (the kernels load 16 bytes at a
/// time).
pub(super) fn check_aligned(op: &str, what: &str, t: &CudaTensor) -> Result<()> {
    if !t.ptr().is_multiple_of(16) {
        return Err(Error::shape(format!(
            "{op}: {what} starts at a device address that is not 16-byte aligned (a row view at \
             an odd offset?); pass a tensor whose first element is 16-byte aligned"
        )));
    }
    Ok(())
}

/// Per-row KV block lists on the device: `counts [heads, nq]` u32 and `indices [heads, nq, nkv]`
/// u32 (the first `counts[h, i]` entries of row `(h, i)` are the listed key blocks).
#[derive(Clone, Debug)]
pub struct CudaMask {
    /// `[heads, nq]` u32.
    pub counts: CudaTensor,
    /// `[heads, nq, nkv]` u32.
    pub indices: CudaTensor,
    /// Mask heads (1 = shared by every attention head).
    pub heads: usize,
    /// Query blocks.
    pub nq: usize,
    /// Key blocks.
    pub nkv: usize,
}

impl CudaMask {
    /// Allocates (uninitialised) lists for `heads` heads of `nq × nkv` blocks.
    fn alloc(cuda: &Cuda, heads: usize, nq: usize, nkv: usize) -> Result<CudaMask> {
        Ok(CudaMask {
            counts: cuda.empty(&[heads, nq], DType::U32)?,
            indices: cuda.empty(&[heads, nq, nkv], DType::U32)?,
            heads,
            nq,
            nkv,
        })
    }

    /// Fails unless the tensors have the shapes and dtype the fields announce.
    pub fn check(&self) -> Result<()> {
        if self.heads == 0 || self.nq == 0 || self.nkv == 0 {
            return Err(Error::shape(format!(
                "block mask with {} heads of {}x{} blocks: every size must be at least 1",
                self.heads, self.nq, self.nkv
            )));
        }
        let want_c = [self.heads, self.nq];
        let want_i = [self.heads, self.nq, self.nkv];
        if self.counts.dtype != DType::U32 || self.counts.numel() != self.heads * self.nq {
            return Err(Error::shape(format!(
                "block mask counts are a {:?} {:?} tensor; expected {want_c:?} u32",
                self.counts.shape, self.counts.dtype
            )));
        }
        if self.indices.dtype != DType::U32
            || self.indices.numel() != self.heads * self.nq * self.nkv
        {
            return Err(Error::shape(format!(
                "block mask indices are a {:?} {:?} tensor; expected {want_i:?} u32",
                self.indices.shape, self.indices.dtype
            )));
        }
        Ok(())
    }

    /// Uploads lists built on the host: `counts [heads, nq]`, `indices [heads, nq, nkv]` (entries
    /// past a row's count are ignored). Counts above `nkv` or listed indices `≥ nkv` are errors.
    pub fn from_lists(
        cuda: &Cuda,
        counts: &[u32],
        indices: &[u32],
        heads: usize,
        nq: usize,
        nkv: usize,
    ) -> Result<CudaMask> {
        if heads == 0 || nq == 0 || nkv == 0 {
            return Err(Error::shape(format!(
                "block mask with {heads} heads of {nq}x{nkv} blocks: every size must be at least 1"
            )));
        }
        if counts.len() != heads * nq || indices.len() != heads * nq * nkv {
            return Err(Error::shape(format!(
                "block-mask lists for {heads} heads of {nq}x{nkv} blocks need {} counts and {} \
                 indices, got {} and {}",
                heads * nq,
                heads * nq * nkv,
                counts.len(),
                indices.len()
            )));
        }
        for (r, &c) in counts.iter().enumerate() {
            if c as usize > nkv {
                return Err(Error::shape(format!(
                    "block-mask row {r} has count {c}, more than the {nkv} key blocks"
                )));
            }
            let row = &indices[r * nkv..r * nkv + c as usize];
            if let Some(j) = row.iter().find(|&&j| j as usize >= nkv) {
                return Err(Error::shape(format!(
                    "block-mask row {r} lists key block {j}; indices must be < {nkv}"
                )));
            }
        }
        Ok(CudaMask {
            counts: cuda.upload_bytes(bytemuck::cast_slice(counts), &[heads, nq], DType::U32)?,
            indices: cuda.upload_bytes(
                bytemuck::cast_slice(indices),
                &[heads, nq, nkv],
                DType::U32,
            )?,
            heads,
            nq,
            nkv,
        })
    }

    /// Lists from a dense `[heads, nq, nkv]` 0/1 mask.
    pub fn from_dense(
        cuda: &Cuda,
        dense: &[u8],
        heads: usize,
        nq: usize,
        nkv: usize,
    ) -> Result<CudaMask> {
        if dense.len() != heads * nq * nkv {
            return Err(Error::shape(format!(
                "dense block mask has {} entries, expected heads·nq·nkv = {}",
                dense.len(),
                heads * nq * nkv
            )));
        }
        let mut counts = vec![0u32; heads * nq];
        let mut idx = vec![0u32; heads * nq * nkv];
        for (r, count) in counts.iter_mut().enumerate() {
            let mut c = 0;
            for j in 0..nkv {
                if dense[r * nkv + j] != 0 {
                    idx[r * nkv + c] = j as u32;
                    c += 1;
                }
            }
            *count = c as u32;
        }
        CudaMask::from_lists(cuda, &counts, &idx, heads, nq, nkv)
    }

    /// Every key block for every query block (one shared head).
    pub fn full(cuda: &Cuda, nq: usize, nkv: usize) -> Result<CudaMask> {
        let counts = vec![nkv as u32; nq];
        let idx: Vec<u32> = (0..nq * nkv).map(|e| (e % nkv.max(1)) as u32).collect();
        CudaMask::from_lists(cuda, &counts, &idx, 1, nq, nkv)
    }

    /// Reads the lists back: `(counts, indices)` (waits for the stream). Entries of `indices`
    /// past a row's count are unspecified (the kernels never write them: the device buffers
    /// come uninitialised from the allocator and are reused); compare masks with
    /// [`CudaMask::read_rows`] or [`CudaMask::to_dense`].
    pub fn read_lists(&self, cuda: &Cuda) -> Result<(Vec<u32>, Vec<u32>)> {
        self.check()?;
        let counts: Vec<u32> = bytemuck::pod_collect_to_vec(&cuda.download_bytes(&self.counts)?);
        let idx: Vec<u32> = bytemuck::pod_collect_to_vec(&cuda.download_bytes(&self.indices)?);
        Ok((counts, idx))
    }

    /// Each row's listed key blocks (the first `counts[r]` entries of row `r`, heads × nq rows):
    /// the content of the mask, without the unspecified entries past the counts (waits for the
    /// stream).
    pub fn read_rows(&self, cuda: &Cuda) -> Result<Vec<Vec<u32>>> {
        let (counts, idx) = self.read_lists(cuda)?;
        let nkv = self.nkv;
        counts
            .iter()
            .enumerate()
            .map(|(r, &c)| {
                let c = c as usize;
                if c > nkv {
                    return Err(Error::Cuda(format!(
                        "mask row {r} has count {c} > {nkv} key blocks"
                    )));
                }
                Ok(idx[r * nkv..r * nkv + c].to_vec())
            })
            .collect()
    }

    /// The dense `[heads, nq, nkv]` 0/1 form. Fails on a malformed list (a count above `nkv`, an
    /// index out of range or listed twice).
    pub fn to_dense(&self, cuda: &Cuda) -> Result<Vec<u8>> {
        let (counts, idx) = self.read_lists(cuda)?;
        let nkv = self.nkv;
        let mut dense = vec![0u8; self.heads * self.nq * nkv];
        for (r, &c) in counts.iter().enumerate() {
            let c = c as usize;
            if c > nkv {
                return Err(Error::Cuda(format!(
                    "mask row {r} has count {c} > {nkv} key blocks"
                )));
            }
            for &j in &idx[r * nkv..r * nkv + c] {
                let j = j as usize;
                if j >= nkv || dense[r * nkv + j] != 0 {
                    return Err(Error::Cuda(format!(
                        "mask row {r} lists key block {j} twice or out of range"
                    )));
                }
                dense[r * nkv + j] = 1;
            }
        }
        Ok(dense)
    }

    /// Fraction of (query block, key block) pairs listed, over all mask heads.
    pub fn density(&self, cuda: &Cuda) -> Result<f64> {
        self.check()?;
        let c: Vec<u32> = bytemuck::pod_collect_to_vec(&cuda.download_bytes(&self.counts)?);
        Ok(c.iter().map(|&x| x as f64).sum::<f64>() / (self.heads * self.nq * self.nkv) as f64)
    }
}

/// Scratch reused by [`estimate_mask`] between layers: pooled q/k (f32 and the f16 split), the
/// `[heads, Nb, Nb]` block logits (which hold the block map after [`estimate_mask_with_map`] or
/// [`mask_from_pooled`]), the STA bitmask and the output lists. One estimation at a time per
/// scratch (they share these buffers; stream order keeps consecutive calls apart).
///
/// The mask that [`estimate_mask`] / [`estimate_mask_with_map`] return is a view of the
/// scratch's lists (no allocation per call): it stays valid until the next estimation with the
/// same scratch, which overwrites it in stream order (work already enqueued on the stream, such
/// as an attention launch reading the previous mask, still sees the previous lists). Keep a copy
/// ([`CudaMask::read_rows`], or a second scratch) to hold two masks at once.
pub struct MaskScratch {
    heads: usize,
    nb: usize,
    d: usize,
    qa: CudaTensor,
    ka: CudaTensor,
    qhi: CudaTensor,
    qlo: CudaTensor,
    khi: CudaTensor,
    klo: CudaTensor,
    qinv: CudaTensor,
    kinv: CudaTensor,
    map: CudaTensor,
    sta_bits: CudaTensor,
    /// The lists the estimations write (returned as views).
    lists: CudaMask,
    /// The (grid, window) whose bitmask `sta_bits` holds (enqueued).
    sta_key: Mutex<Option<(BlockGrid, StaWindow)>>,
    /// The last STA-only mask (grid, window, lists).
    sta_mask: Mutex<Option<(BlockGrid, StaWindow, CudaMask)>>,
}

impl std::fmt::Debug for MaskScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MaskScratch(heads {}, Nb {}, D {})",
            self.heads, self.nb, self.d
        )
    }
}

/// Fails unless `d` is a head dim the pooling kernels take.
fn check_head_dim(op: &str, d: usize) -> Result<()> {
    if d == 0 || !d.is_multiple_of(16) || d > 512 {
        return Err(Error::shape(format!(
            "{op}: head_dim {d} must be a positive multiple of 16 up to 512 (64 and 128 are the \
             usual ones)"
        )));
    }
    Ok(())
}

impl MaskScratch {
    /// Scratch for `heads` heads (B·H) of `nb` blocks and head dim `d`.
    pub fn alloc(cuda: &Cuda, heads: usize, nb: usize, d: usize) -> Result<MaskScratch> {
        if heads == 0 || nb == 0 {
            return Err(Error::shape(format!(
                "mask scratch for {heads} heads of {nb} blocks: both must be at least 1"
            )));
        }
        check_head_dim("mask scratch", d)?;
        if heads > 65535 {
            return Err(Error::shape(format!(
                "mask estimation: {heads} heads (B·H) exceed the 65535 of one CUDA grid axis"
            )));
        }
        u32_of("mask estimation", "heads · Nb", heads * nb)?;
        let words = nb.div_ceil(32);
        Ok(MaskScratch {
            heads,
            nb,
            d,
            qa: cuda.empty(&[heads, nb, d], DType::F32)?,
            ka: cuda.empty(&[heads, nb, d], DType::F32)?,
            qhi: cuda.empty(&[heads, nb, d], DType::F16)?,
            qlo: cuda.empty(&[heads, nb, d], DType::F16)?,
            khi: cuda.empty(&[heads, nb, d], DType::F16)?,
            klo: cuda.empty(&[heads, nb, d], DType::F16)?,
            qinv: cuda.empty(&[heads, nb], DType::F32)?,
            kinv: cuda.empty(&[heads, nb], DType::F32)?,
            map: cuda.empty(&[heads, nb, nb], DType::F32)?,
            sta_bits: cuda.empty(&[nb, words], DType::U32)?,
            lists: CudaMask::alloc(cuda, heads, nb, nb)?,
            sta_key: Mutex::new(None),
            sta_mask: Mutex::new(None),
        })
    }

    /// Heads (B·H) the scratch serves.
    pub fn heads(&self) -> usize {
        self.heads
    }
    /// Blocks per head.
    pub fn nb(&self) -> usize {
        self.nb
    }
    /// Head dim.
    pub fn d(&self) -> usize {
        self.d
    }
    /// Pooled queries `[heads, Nb, D]` f32 of the last estimation from q/k.
    pub fn qa(&self) -> &CudaTensor {
        &self.qa
    }
    /// Pooled keys `[heads, Nb, D]` f32 of the last estimation from q/k.
    pub fn ka(&self) -> &CudaTensor {
        &self.ka
    }
    /// `[heads, Nb, Nb]` f32: the block map `softmax(qa·kaᵀ/√D)` after
    /// [`estimate_mask_with_map`] or [`mask_from_pooled`]; unspecified after [`estimate_mask`].
    pub fn map(&self) -> &CudaTensor {
        &self.map
    }
}

/// Checks `[B, H, S, D]` q and k against the grid and the scratch; returns (B·H, S, D).
fn check_qk(
    q: &CudaTensor,
    k: &CudaTensor,
    grid: &BlockGrid,
    scratch: &MaskScratch,
) -> Result<(usize, usize, usize)> {
    let op = "mask estimation";
    let qs = &q.shape;
    if qs.len() != 4 {
        return Err(Error::shape(format!(
            "{op}: q must be [B, H, S, D], got {qs:?}"
        )));
    }
    if &k.shape != qs {
        return Err(Error::shape(format!(
            "{op}: q {qs:?} and k {:?} must have the same shape",
            k.shape
        )));
    }
    if q.dtype != k.dtype || q.dtype == DType::U32 {
        return Err(Error::shape(format!(
            "{op}: q and k must both be f32, f16 or bf16, got {:?} and {:?}",
            q.dtype, k.dtype
        )));
    }
    let (s, d) = (qs[2], qs[3]);
    if !s.is_multiple_of(BLOCK) {
        return Err(Error::shape(format!(
            "{op}: sequence length {s} is not a multiple of the {BLOCK}-token block; crop the \
             video so height and width are multiples of 128 pixels"
        )));
    }
    if s != grid.tokens() {
        return Err(Error::shape(format!(
            "{op}: sequence length {s} does not match the block grid {}x{}x{} ({} tokens)",
            grid.t,
            grid.hb,
            grid.wb,
            grid.tokens()
        )));
    }
    check_head_dim(op, d)?;
    let bh = qs[0] * qs[1];
    if bh != scratch.heads || grid.blocks() != scratch.nb || d != scratch.d {
        return Err(Error::shape(format!(
            "{op}: the scratch serves {} heads of {} blocks with head_dim {}, q/k need {bh} heads \
             of {} blocks with head_dim {d}; allocate a MaskScratch for this shape",
            scratch.heads,
            scratch.nb,
            scratch.d,
            grid.blocks()
        )));
    }
    u32_of(op, "S", s)?;
    check_aligned(op, "q", q)?;
    check_aligned(op, "k", k)?;
    Ok((bh, s, d))
}

/// Fails unless `algo` has a NABLA threshold.
fn cut_of(algo: &SparseAlgo) -> Result<f32> {
    algo.cut().ok_or_else(|| {
        Error::Invalid(format!(
            "{algo} has no NABLA threshold: STA-only masks come from sta_mask"
        ))
    })
}

/// Enqueues the pooling of `x [B, H, S, D]` into `out [B·H, ceil(S/64), D]` f32 and, when given,
/// the split `(hi, lo, inv)`.
fn record_pool(
    cuda: &Cuda,
    x: &CudaTensor,
    out: &CudaTensor,
    split: Option<(&CudaTensor, &CudaTensor, &CudaTensor)>,
    bh: usize,
    s: usize,
    d: usize,
) -> Result<()> {
    let nb = s.div_ceil(BLOCK);
    let name = match x.dtype {
        DType::F32 => "nabla_pool_f32",
        DType::F16 => "nabla_pool_f16",
        DType::BF16 => "nabla_pool_bf16",
        DType::U32 => return Err(Error::shape("pooling: x must be f32, f16 or bf16, got u32")),
    };
    let (hi, lo, inv) = split.map_or((0, 0, 0), |(h, l, i)| (h.ptr(), l.ptr(), i.ptr()));
    launch(
        cuda,
        MODULE,
        super::sources::NABLA,
        name,
        grid_128(u32_of("pooling", "Nb", nb)?, bh as u32),
        &[
            Arg::U64(x.ptr()),
            Arg::U64(out.ptr()),
            Arg::U64(hi),
            Arg::U64(lo),
            Arg::U64(inv),
            Arg::U32(s as u32),
            Arg::U32(d as u32),
            Arg::U32(nb as u32),
        ],
    )
}

/// Enqueues the split of pooled rows `xa [heads, Nb, D]` f32 into `(hi, lo, inv)`.
fn record_split(
    cuda: &Cuda,
    xa: &CudaTensor,
    (hi, lo, inv): (&CudaTensor, &CudaTensor, &CudaTensor),
    heads: usize,
    nb: usize,
    d: usize,
) -> Result<()> {
    launch(
        cuda,
        MODULE,
        super::sources::NABLA,
        "nabla_split",
        grid_128(nb as u32, heads as u32),
        &[
            Arg::U64(xa.ptr()),
            Arg::U64(hi.ptr()),
            Arg::U64(lo.ptr()),
            Arg::U64(inv.ptr()),
            Arg::U32(d as u32),
            Arg::U32(nb as u32),
        ],
    )
}

/// Shared memory of `nabla_scores128` (3 stages of four 128 × 32 f16 arrays).
const SCORES128_SMEM: usize = 3 * 4 * 128 * 32 * 2;

/// Enqueues the block logits into `scratch.map`: `nabla_scores128` (128 × 128 tiles) where the
/// device gives a block its 96 KB of shared memory, else `nabla_scores` (64 × 64);
/// `NABLA_CUDA_SCORES=64|128` forces one (for comparison). Both give the same logits bit for
/// bit (the same k16 partial sums in the same order).
fn record_scores(cuda: &Cuda, sc: &MaskScratch) -> Result<()> {
    let kernel = match std::env::var("NABLA_CUDA_SCORES").as_deref() {
        Err(_) | Ok("") => ScoresKernel::Auto,
        Ok("128") => ScoresKernel::Tile128,
        Ok("64") => ScoresKernel::Tile64,
        Ok(o) => {
            return Err(Error::Invalid(format!(
                "NABLA_CUDA_SCORES={o:?}: use 128 (the default where it fits) or 64"
            )));
        }
    };
    record_scores_with(cuda, sc, kernel)
}

/// The block-score kernel of the mask estimation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoresKernel {
    /// 128 × 128 tiles where a block may have 96 KB of shared memory, else 64 × 64.
    Auto,
    /// `nabla_scores`: 64 × 64 tiles, 32 KB of shared memory.
    Tile64,
    /// `nabla_scores128`: 128 × 128 tiles, 96 KB of shared memory.
    Tile128,
}

/// Recomputes the block logits `qa·kaᵀ/√D` (before the softmax) of the q/k pooled in
/// `scratch` by its last estimation into [`MaskScratch::map`], with `kernel` (tests and
/// benchmarks: both kernels give the same logits bit for bit).
pub fn block_logits(cuda: &Cuda, scratch: &MaskScratch, kernel: ScoresKernel) -> Result<()> {
    check_arch(cuda, "NABLA block scores on CUDA")?;
    if kernel == ScoresKernel::Tile128 && max_shared_bytes(cuda)? < SCORES128_SMEM {
        return Err(Error::Unsupported {
            adapter: cuda.name().to_string(),
            feature: "96 KB of shared memory per block",
            what: "the 128 x 128 block-score kernel".into(),
        });
    }
    record_scores_with(cuda, scratch, kernel)
}

fn record_scores_with(cuda: &Cuda, sc: &MaskScratch, kernel: ScoresKernel) -> Result<()> {
    let rsd = (1.0 / (sc.d as f64).sqrt()) as f32;
    let wide = match kernel {
        ScoresKernel::Auto => max_shared_bytes(cuda)? >= SCORES128_SMEM,
        ScoresKernel::Tile128 => true,
        ScoresKernel::Tile64 => false,
    };
    let (name, tile, threads, smem) = if wide {
        ("nabla_scores128", 128, 256, SCORES128_SMEM)
    } else {
        ("nabla_scores", 64, 128, 0)
    };
    let t = sc.nb.div_ceil(tile) as u32;
    launch(
        cuda,
        MODULE,
        super::sources::NABLA,
        name,
        LaunchConfig {
            grid_dim: (t, t, sc.heads as u32),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        },
        &[
            Arg::U64(sc.qhi.ptr()),
            Arg::U64(sc.qlo.ptr()),
            Arg::U64(sc.khi.ptr()),
            Arg::U64(sc.klo.ptr()),
            Arg::U64(sc.qinv.ptr()),
            Arg::U64(sc.kinv.ptr()),
            Arg::U64(sc.map.ptr()),
            Arg::U32(sc.nb as u32),
            Arg::U32(sc.d as u32),
            Arg::F32(rsd),
        ],
    )
}

/// Enqueues the STA bitmask of (grid, w) into `scratch.sta_bits` unless it already holds it.
fn ensure_sta_bits(cuda: &Cuda, sc: &MaskScratch, grid: BlockGrid, w: StaWindow) -> Result<()> {
    let mut key = sc.sta_key.lock().unwrap_or_else(|p| p.into_inner());
    if *key == Some((grid, w)) {
        return Ok(());
    }
    let nb = sc.nb;
    let words = nb.div_ceil(32);
    let [rt, rh, rw] = w.radii();
    launch(
        cuda,
        MODULE,
        super::sources::NABLA,
        "nabla_sta_bits",
        LaunchConfig {
            grid_dim: ((nb * words).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            Arg::U64(sc.sta_bits.ptr()),
            Arg::U32(nb as u32),
            Arg::U32(words as u32),
            Arg::U32(grid.hb as u32),
            Arg::U32(grid.wb as u32),
            Arg::U32(rt),
            Arg::U32(rh),
            Arg::U32(rw),
        ],
    )?;
    *key = Some((grid, w));
    Ok(())
}

/// Enqueues softmax + threshold (+ STA) + lists from `scratch.map` (logits) into `out`; the
/// probabilities overwrite the logits when `write_map`.
fn record_threshold(
    cuda: &Cuda,
    sc: &MaskScratch,
    grid: BlockGrid,
    algo: &SparseAlgo,
    out: &CudaMask,
    write_map: bool,
) -> Result<()> {
    let cut = cut_of(algo)?;
    let sta = match algo.sta() {
        Some(w) => {
            ensure_sta_bits(cuda, sc, grid, w)?;
            sc.sta_bits.ptr()
        }
        None => 0,
    };
    let nb = sc.nb;
    let stride = nb.div_ceil(32) * 32;
    let per_warp = (stride + stride.max(32 * 33)) * 4;
    let warps = (max_shared_bytes(cuda)? / per_warp).min(4);
    if warps == 0 {
        return Err(Error::shape(format!(
            "mask estimation: rows of {nb} key blocks need {per_warp} bytes of shared memory per \
             row, more than this device allows one block; use a shorter video or smaller frames"
        )));
    }
    let rows = sc.heads * nb;
    launch(
        cuda,
        MODULE,
        super::sources::NABLA,
        "nabla_threshold",
        LaunchConfig {
            grid_dim: (rows.div_ceil(warps) as u32, 1, 1),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: (warps * per_warp) as u32,
        },
        &[
            Arg::U64(sc.map.ptr()),
            Arg::U64(if write_map { sc.map.ptr() } else { 0 }),
            Arg::U64(out.counts.ptr()),
            Arg::U64(out.indices.ptr()),
            Arg::U64(sta),
            Arg::U32(rows as u32),
            Arg::U32(nb as u32),
            Arg::F32(cut),
            Arg::U32(stride as u32),
        ],
    )
}

/// The STA-only mask of `algo`, cached in the scratch.
fn cached_sta(cuda: &Cuda, sc: &MaskScratch, grid: BlockGrid, w: StaWindow) -> Result<CudaMask> {
    let mut cache = sc.sta_mask.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((g, ww, m)) = cache.as_ref()
        && *g == grid
        && *ww == w
    {
        return Ok(m.clone());
    }
    let m = sta_mask(cuda, grid, w)?;
    *cache = Some((grid, w, m.clone()));
    Ok(m)
}

fn estimate(
    cuda: &Cuda,
    q: &CudaTensor,
    k: &CudaTensor,
    grid: BlockGrid,
    algo: &SparseAlgo,
    scratch: &MaskScratch,
    write_map: bool,
) -> Result<CudaMask> {
    check_arch(cuda, "NABLA mask estimation on CUDA")?;
    let (bh, s, d) = check_qk(q, k, &grid, scratch)?;
    if let SparseAlgo::Sta(w) = algo {
        return cached_sta(cuda, scratch, grid, *w);
    }
    cut_of(algo)?;
    let sc = scratch;
    record_pool(
        cuda,
        q,
        &sc.qa,
        Some((&sc.qhi, &sc.qlo, &sc.qinv)),
        bh,
        s,
        d,
    )?;
    record_pool(
        cuda,
        k,
        &sc.ka,
        Some((&sc.khi, &sc.klo, &sc.kinv)),
        bh,
        s,
        d,
    )?;
    record_scores(cuda, sc)?;
    debug_assert_eq!((sc.lists.heads, sc.lists.nq), (bh, sc.nb));
    record_threshold(cuda, sc, grid, algo, &sc.lists, write_map)?;
    Ok(sc.lists.clone())
}

/// Estimates the mask of `algo` from `q`, `k` `[B, H, S, D]` (f32, f16 or bf16, fractal order,
/// `S = grid.tokens()`): one mask head per attention head (B·H), Nb × Nb blocks. Everything is
/// enqueued on the stream (no synchronization). STA-only algorithms return the (cached) shared
/// STA mask. `scratch` must come from [`MaskScratch::alloc`] with (B·H, Nb, D).
///
/// The returned mask views the scratch's list buffers (nothing is allocated per call): it is
/// valid until the next `estimate_mask` / [`estimate_mask_with_map`] with the same `scratch`
/// (see [`MaskScratch`]).
pub fn estimate_mask(
    cuda: &Cuda,
    q: &CudaTensor,
    k: &CudaTensor,
    grid: BlockGrid,
    algo: &SparseAlgo,
    scratch: &MaskScratch,
) -> Result<CudaMask> {
    estimate(cuda, q, k, grid, algo, scratch, false)
}

/// [`estimate_mask`] that also leaves the block map `softmax(qa·kaᵀ/√D)` in
/// [`MaskScratch::map`] (and the pooled q/k in [`MaskScratch::qa`], [`MaskScratch::ka`]), for
/// inspection and tests.
pub fn estimate_mask_with_map(
    cuda: &Cuda,
    q: &CudaTensor,
    k: &CudaTensor,
    grid: BlockGrid,
    algo: &SparseAlgo,
    scratch: &MaskScratch,
) -> Result<CudaMask> {
    estimate(cuda, q, k, grid, algo, scratch, true)
}

/// The mask of a NABLA `algo` from already pooled `qa`, `ka` `[heads, Nb, D]` f32 (the golden
/// files' form): split, scores, softmax, threshold (∪ STA), lists. The block map is left in
/// [`MaskScratch::map`]. The lists are freshly allocated (not the scratch's: this path is for
/// tests and golden files, where several masks may be held at once).
pub fn mask_from_pooled(
    cuda: &Cuda,
    qa: &CudaTensor,
    ka: &CudaTensor,
    grid: BlockGrid,
    algo: &SparseAlgo,
    scratch: &MaskScratch,
) -> Result<CudaMask> {
    check_arch(cuda, "NABLA mask estimation on CUDA")?;
    let sh = &qa.shape;
    let nb = grid.blocks();
    if sh.len() != 3 || &ka.shape != sh || sh[1] != nb || qa.dtype != DType::F32 {
        return Err(Error::shape(format!(
            "pooled qa {sh:?} {:?} and ka {:?} {:?} must both be f32 [heads, {nb}, D]",
            qa.dtype, ka.shape, ka.dtype
        )));
    }
    if ka.dtype != DType::F32 {
        return Err(Error::shape(format!(
            "pooled ka must be f32, got {:?}",
            ka.dtype
        )));
    }
    let (heads, d) = (sh[0], sh[2]);
    check_head_dim("mask from pooled q/k", d)?;
    if heads != scratch.heads || nb != scratch.nb || d != scratch.d {
        return Err(Error::shape(format!(
            "mask from pooled q/k: the scratch serves {} heads of {} blocks with head_dim {}, \
             qa/ka have {heads} of {nb} with {d}",
            scratch.heads, scratch.nb, scratch.d
        )));
    }
    cut_of(algo)?;
    let sc = scratch;
    record_split(cuda, qa, (&sc.qhi, &sc.qlo, &sc.qinv), heads, nb, d)?;
    record_split(cuda, ka, (&sc.khi, &sc.klo, &sc.kinv), heads, nb, d)?;
    record_scores(cuda, sc)?;
    let out = CudaMask::alloc(cuda, heads, nb, nb)?;
    record_threshold(cuda, sc, grid, algo, &out, true)?;
    Ok(out)
}

/// RoPE + head split + block pooling in one pass: `out[h, s, :] = RoPE(x[s, h·D..(h+1)·D])`
/// exactly as [`super::ops::rope_split_heads`] writes it (bit-identical), and the pooled rows of
/// `out` (the mean of each 64-token block of the stored, rounded values, with the tensor-core
/// split) left in the scratch for `side`, as [`estimate_mask`]'s pooling of `out` would leave
/// them (up to f32 summation order). The DiT's q/k producer when the mask is estimated: the
/// heads are read once instead of twice. After both sides, [`estimate_mask_prepooled`] finishes
/// the mask.
///
/// `x` f32 `[S, H·D]`, `cos`/`sin` f32 `[S, D/2]`, `out` `[1, H, S, D]` f32/f16/bf16 with
/// `(H, S/64, D)` = the scratch's (heads, Nb, D) and S a multiple of 64.
pub fn rope_split_heads_pooled(
    cuda: &Cuda,
    x: &CudaTensor,
    cos: &CudaTensor,
    sin: &CudaTensor,
    out: &CudaTensor,
    scratch: &MaskScratch,
    side: QkSide,
) -> Result<()> {
    let op = "rope_split_heads_pooled";
    check_arch(cuda, "NABLA mask estimation on CUDA")?;
    let (h, s, d, _) = super::ops::check_rope_split_heads(op, x, cos, sin, out)?;
    if !s.is_multiple_of(BLOCK) {
        return Err(Error::shape(format!(
            "{op}: sequence length {s} is not a multiple of the {BLOCK}-token block; crop the \
             video so height and width are multiples of 128 pixels"
        )));
    }
    let nb = s / BLOCK;
    if (h, nb, d) != (scratch.heads, scratch.nb, scratch.d) {
        return Err(Error::shape(format!(
            "{op}: the scratch serves {} heads of {} blocks with head_dim {}, the heads {:?} are \
             {h} heads of {nb} blocks with head_dim {d}; allocate a MaskScratch for this shape",
            scratch.heads, scratch.nb, scratch.d, out.shape
        )));
    }
    check_head_dim(op, d)?;
    check_aligned(op, "x", x)?;
    check_aligned(op, "out", out)?;
    let name = match out.dtype {
        DType::F32 => "nabla_rope_pool_f32",
        DType::F16 => "nabla_rope_pool_f16",
        DType::BF16 => "nabla_rope_pool_bf16",
        DType::U32 => return Err(Error::shape(format!("{op}: out must be f32, f16 or bf16"))),
    };
    let sc = scratch;
    let (pooled, hi, lo, inv) = match side {
        QkSide::Q => (&sc.qa, &sc.qhi, &sc.qlo, &sc.qinv),
        QkSide::K => (&sc.ka, &sc.khi, &sc.klo, &sc.kinv),
    };
    launch(
        cuda,
        MODULE,
        super::sources::NABLA,
        name,
        grid_128(u32_of(op, "Nb", nb)?, h as u32),
        &[
            Arg::U64(x.ptr()),
            Arg::U64(cos.ptr()),
            Arg::U64(sin.ptr()),
            Arg::U64(out.ptr()),
            Arg::U64(pooled.ptr()),
            Arg::U64(hi.ptr()),
            Arg::U64(lo.ptr()),
            Arg::U64(inv.ptr()),
            Arg::U32(u32_of(op, "S", s)?),
            Arg::U32(h as u32),
            Arg::U32(d as u32),
        ],
    )
}

/// The mask of `algo` from q and k already pooled into `scratch` by
/// [`rope_split_heads_pooled`] (both sides, same grid): block scores, softmax, threshold (∪ STA)
/// and lists, as [`estimate_mask`] after its pooling. The returned mask views the scratch's
/// lists like [`estimate_mask`]'s. STA-only algorithms return the cached STA mask.
pub fn estimate_mask_prepooled(
    cuda: &Cuda,
    grid: BlockGrid,
    algo: &SparseAlgo,
    scratch: &MaskScratch,
) -> Result<CudaMask> {
    check_arch(cuda, "NABLA mask estimation on CUDA")?;
    if grid.blocks() != scratch.nb {
        return Err(Error::shape(format!(
            "mask from pooled q/k: the grid has {} blocks, the scratch {}",
            grid.blocks(),
            scratch.nb
        )));
    }
    if let SparseAlgo::Sta(w) = algo {
        return cached_sta(cuda, scratch, grid, *w);
    }
    cut_of(algo)?;
    record_scores(cuda, scratch)?;
    record_threshold(cuda, scratch, grid, algo, &scratch.lists, false)?;
    Ok(scratch.lists.clone())
}

/// Block average pooling: `x [B, H, S, D]` (f32, f16 or bf16) → `out [B·H, ceil(S/64), D]` f32,
/// summed in f32. A ragged last block (S not a multiple of 64) is the mean of its own rows.
/// (The mask estimation itself requires `S = grid.tokens()`, a multiple of 64, like the wgpu
/// layer.)
pub fn pool(cuda: &Cuda, x: &CudaTensor, out: &CudaTensor) -> Result<()> {
    check_arch(cuda, "pooling on CUDA")?;
    let xs = &x.shape;
    if xs.len() != 4 || x.dtype == DType::U32 {
        return Err(Error::shape(format!(
            "pooling: x must be an f32, f16 or bf16 [B, H, S, D] tensor, got {xs:?} {:?}",
            x.dtype
        )));
    }
    let (bh, s, d) = (xs[0] * xs[1], xs[2], xs[3]);
    check_head_dim("pooling", d)?;
    if s == 0 {
        return Err(Error::shape("pooling: the sequence is empty"));
    }
    let nb = s.div_ceil(BLOCK);
    if out.dtype != DType::F32 || out.numel() != bh * nb * d {
        return Err(Error::shape(format!(
            "pooling: out is {:?} {:?}; expected [{bh}, {nb}, {d}] f32",
            out.shape, out.dtype
        )));
    }
    if bh > 65535 {
        return Err(Error::shape(format!(
            "pooling: {bh} heads (B·H) exceed the 65535 of one CUDA grid axis"
        )));
    }
    u32_of("pooling", "S", s)?;
    check_aligned("pooling", "x", x)?;
    record_pool(cuda, x, out, None, bh, s, d)
}

/// The STA mask of a grid (one shared head): lists built on the host with
/// [`crate::nabla::sta_lists`] and uploaded (waits for the upload).
pub fn sta_mask(cuda: &Cuda, grid: BlockGrid, w: StaWindow) -> Result<CudaMask> {
    let (counts, idx) = sta_lists(&grid, &w);
    let nb = grid.blocks();
    CudaMask::from_lists(cuda, &counts, &idx, 1, nb, nb)
}

/// GPU time (median ms over `reps`, after one warm-up) of each stage of [`estimate_mask`] on its
/// own: pooling of q and k, block scores, and softmax + threshold + lists (the last without
/// writing the map, as in the fast path). For benchmarks. Overwrites the scratch's lists (a
/// mask returned by [`estimate_mask`] with this scratch then holds this run's lists).
pub fn time_mask_stages(
    cuda: &Cuda,
    q: &CudaTensor,
    k: &CudaTensor,
    grid: BlockGrid,
    algo: &SparseAlgo,
    scratch: &MaskScratch,
    reps: usize,
) -> Result<[f64; 3]> {
    check_arch(cuda, "NABLA mask estimation on CUDA")?;
    let (bh, s, d) = check_qk(q, k, &grid, scratch)?;
    cut_of(algo)?;
    let sc = scratch;
    let out = &sc.lists;
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let reps = reps.max(1);
    let pool = super::attention::time_ms(cuda, 1, reps, || {
        record_pool(
            cuda,
            q,
            &sc.qa,
            Some((&sc.qhi, &sc.qlo, &sc.qinv)),
            bh,
            s,
            d,
        )?;
        record_pool(
            cuda,
            k,
            &sc.ka,
            Some((&sc.khi, &sc.klo, &sc.kinv)),
            bh,
            s,
            d,
        )
    })?;
    let scores = super::attention::time_ms(cuda, 1, reps, || record_scores(cuda, sc))?;
    // without the map write the threshold kernel leaves the logits as they are: repeatable
    let thr = super::attention::time_ms(cuda, 1, reps, || {
        record_threshold(cuda, sc, grid, algo, out, false)
    })?;
    Ok([med(pool), med(scores), med(thr)])
}
