//! Block-mask estimation on the GPU (pool → scores → softmax + CDF threshold ∪ STA → lists)
//! and the [`BlockMask`] it produces. The DiT skips the pooling pass: its RoPE + head split
//! pools q and k as it writes them ([`super::record_rope_split_heads_pooled`]), and
//! [`record_mask_from_pooled`] runs the stages after the pooling.

use super::{BLOCK, BlockGrid, SparseAlgo, sta_lists};
use crate::error::{Error, Result};
use crate::gpu::{Batch, DType, Gpu, Tensor};
use crate::shaders;
use std::sync::Arc;

/// A block mask as compact per-row lists, the layout FlexAttention's `BlockMask` uses:
/// for mask head `h` and query block `i`, key blocks `indices[h, i, 0..counts[h, i])`,
/// in ascending order. `heads` is 1 when one mask serves every head (STA, dense).
/// Self-attention masks are square (`nb` query blocks × `nb` key blocks); cross-attention
/// masks may be rectangular ([`BlockMask::full_rect`]).
#[derive(Clone, Debug)]
pub struct BlockMask {
    counts: Tensor,
    indices: Tensor,
    heads: usize,
    nb: usize,
    kv: usize,
}

/// Intermediate tensors of a mask estimation, kept for inspection and tests.
#[derive(Clone, Debug)]
pub struct MaskStages {
    /// Pooled queries `[BH, Nb, D]`.
    pub qa: Tensor,
    /// Pooled keys `[BH, Nb, D]`.
    pub ka: Tensor,
    /// Block attention map `softmax(qa·kaᵀ/√D)` `[BH, Nb, stride]` (row `i` in the first `Nb`
    /// of its `stride >= Nb` floats; [`MaskStages::read_map`] drops the rest) where
    /// `keep_probs`; otherwise scratch for the logits `qa·kaᵀ/√D` (the probabilities may not
    /// be written back).
    pub probs: Tensor,
    /// Whether the estimate writes the probabilities into `probs` (true from
    /// [`MaskStages::alloc`]; the DiT's scratch turns it off: a 4·BH·Nb² byte write saved).
    pub keep_probs: bool,
}

impl BlockMask {
    /// Allocates lists for `heads` mask heads of `nb` blocks.
    pub fn alloc(gpu: &Gpu, heads: usize, nb: usize) -> Result<BlockMask> {
        let bytes = (heads * nb * nb * 4) as u64;
        gpu.check_binding(&format!("block-mask lists [{heads}, {nb}, {nb}]"), bytes)?;
        Ok(BlockMask {
            counts: gpu.empty(&[heads, nb], DType::U32)?,
            indices: gpu.empty(&[heads, nb, nb], DType::U32)?,
            heads,
            nb,
            kv: nb,
        })
    }

    /// Uploads square lists built on the CPU.
    pub fn from_lists(
        gpu: &Gpu,
        counts: &[u32],
        indices: &[u32],
        heads: usize,
        nb: usize,
    ) -> Result<BlockMask> {
        BlockMask::from_lists_rect(gpu, counts, indices, heads, nb, nb)
    }

    /// Uploads lists of `nq` query blocks over `nkv` key blocks (`counts [heads, nq]`,
    /// `indices [heads, nq, nkv]`), in any order within a row (stored ascending); a count above
    /// `nkv`, an index `>= nkv` or a block listed twice in a row is an error.
    pub fn from_lists_rect(
        gpu: &Gpu,
        counts: &[u32],
        indices: &[u32],
        heads: usize,
        nq: usize,
        nkv: usize,
    ) -> Result<BlockMask> {
        let nb = nkv;
        if counts.len() != heads * nq || indices.len() != heads * nq * nkv {
            return Err(Error::shape(format!(
                "block-mask lists for {heads} heads of {nq}x{nkv} blocks need {} counts and {} indices, got {} and {}",
                heads * nq,
                heads * nq * nkv,
                counts.len(),
                indices.len()
            )));
        }
        // each row's list is stored ascending (the tensor-core kernel's pair form merges two
        // rows' lists); a block listed twice is an error
        let mut sorted = indices.to_vec();
        for (r, &c) in counts.iter().enumerate() {
            if c as usize > nb {
                return Err(Error::shape(format!(
                    "block-mask row {r} has count {c}, more than Nb = {nb} blocks"
                )));
            }
            let row = &mut sorted[r * nb..r * nb + c as usize];
            if let Some(j) = row.iter().find(|&&j| j as usize >= nb) {
                return Err(Error::shape(format!(
                    "block-mask row {r} lists key block {j}; indices must be < Nb = {nb}"
                )));
            }
            row.sort_unstable();
            if let Some(w) = row.windows(2).find(|w| w[0] == w[1]) {
                return Err(Error::shape(format!(
                    "block-mask row {r} lists key block {} twice; each block at most once",
                    w[0]
                )));
            }
        }
        gpu.check_binding("block-mask lists", (indices.len() * 4) as u64)?;
        Ok(BlockMask {
            counts: gpu.upload_u32(counts, &[heads, nq])?,
            indices: gpu.upload_u32(&sorted, &[heads, nq, nkv])?,
            heads,
            nb: nq,
            kv: nkv,
        })
    }

    /// Builds lists from a dense `[heads, Nb, Nb]` 0/1 mask.
    pub fn from_dense(gpu: &Gpu, dense: &[u8], heads: usize, nb: usize) -> Result<BlockMask> {
        BlockMask::from_dense_rect(gpu, dense, heads, nb, nb)
    }

    /// Builds lists from a dense `[heads, Nq, Nkv]` 0/1 mask.
    pub fn from_dense_rect(
        gpu: &Gpu,
        dense: &[u8],
        heads: usize,
        nq: usize,
        nkv: usize,
    ) -> Result<BlockMask> {
        if dense.len() != heads * nq * nkv {
            return Err(Error::shape(format!(
                "dense block mask has {} entries, expected heads·Nq·Nkv = {}",
                dense.len(),
                heads * nq * nkv
            )));
        }
        let mut counts = vec![0u32; heads * nq];
        let mut idx = vec![0u32; heads * nq * nkv];
        for r in 0..heads * nq {
            let mut c = 0;
            for j in 0..nkv {
                if dense[r * nkv + j] != 0 {
                    idx[r * nkv + c] = j as u32;
                    c += 1;
                }
            }
            counts[r] = c as u32;
        }
        BlockMask::from_lists_rect(gpu, &counts, &idx, heads, nq, nkv)
    }

    /// The mask that lists every block (dense attention), cached per `nb`.
    pub fn full(gpu: &Gpu, nb: usize) -> Result<Arc<BlockMask>> {
        BlockMask::full_rect(gpu, nb, nb)
    }

    /// Every key block for every query block, `nq × nkv` (dense cross-attention), cached.
    pub fn full_rect(gpu: &Gpu, nq: usize, nkv: usize) -> Result<Arc<BlockMask>> {
        gpu.cached(&format!("full-mask/{nq}x{nkv}"), || {
            let counts = vec![nkv as u32; nq];
            let idx: Vec<u32> = (0..nq * nkv).map(|e| (e % nkv) as u32).collect();
            BlockMask::from_lists_rect(gpu, &counts, &idx, 1, nq, nkv)
        })
    }

    /// The STA mask of a grid and window, cached per shape.
    pub fn sta(gpu: &Gpu, grid: BlockGrid, w: super::StaWindow) -> Result<Arc<BlockMask>> {
        gpu.cached(&format!("sta/{grid:?}/{w:?}"), || {
            let (c, i) = sta_lists(&grid, &w);
            BlockMask::from_lists(gpu, &c, &i, 1, grid.blocks())
        })
    }

    /// Mask heads (1 = broadcast to every attention head).
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Query blocks (rows of the mask).
    pub fn nb(&self) -> usize {
        self.nb
    }

    /// Key blocks (columns of the mask); equals [`BlockMask::nb`] for self-attention.
    pub fn kv_blocks(&self) -> usize {
        self.kv
    }

    /// Per-row counts `[heads, Nb]` (u32).
    pub fn counts(&self) -> &Tensor {
        &self.counts
    }

    /// Per-row key-block indices `[heads, Nb, Nb]` (u32; entries past the count are unspecified).
    pub fn indices(&self) -> &Tensor {
        &self.indices
    }

    /// Reads the lists back: `(counts, indices)`.
    pub fn read_lists(&self, gpu: &Gpu) -> Result<(Vec<u32>, Vec<u32>)> {
        Ok((gpu.read_u32(&self.counts)?, gpu.read_u32(&self.indices)?))
    }

    /// The dense `[heads, Nq, Nkv]` 0/1 mask. Fails if a list is malformed.
    pub fn to_dense(&self, gpu: &Gpu) -> Result<Vec<u8>> {
        let (c, idx) = self.read_lists(gpu)?;
        let nb = self.kv;
        let mut d = vec![0u8; self.heads * self.nb * nb];
        for r in 0..self.heads * self.nb {
            let n = c[r] as usize;
            if n > nb {
                return Err(Error::Gpu(format!(
                    "mask row {r} has count {n} > Nb = {nb}"
                )));
            }
            for &j in &idx[r * nb..r * nb + n] {
                let j = j as usize;
                if j >= nb || d[r * nb + j] != 0 {
                    return Err(Error::Gpu(format!(
                        "mask row {r} lists block {j} twice or out of range"
                    )));
                }
                d[r * nb + j] = 1;
            }
        }
        Ok(d)
    }

    /// Fraction of (query block, key block) pairs kept, over all mask heads.
    pub fn density(&self, gpu: &Gpu) -> Result<f64> {
        let c = gpu.read_u32(&self.counts)?;
        Ok(c.iter().map(|&x| x as f64).sum::<f64>() / (self.heads * self.nb * self.kv) as f64)
    }

    /// Density per mask head.
    pub fn density_per_head(&self, gpu: &Gpu) -> Result<Vec<f64>> {
        let c = gpu.read_u32(&self.counts)?;
        let (nb, kv) = (self.nb, self.kv);
        Ok(c.chunks(nb)
            .map(|h| h.iter().map(|&x| x as f64).sum::<f64>() / (nb * kv) as f64)
            .collect())
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct PoolParams {
    s: u32,
    d: u32,
    nb: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ScoreParams {
    nb: u32,
    d: u32,
    sqrt_d: f32,
    stride: u32,
    inv_sqrt_d: f32,
    _pad: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ThresholdParams {
    nb: u32,
    cut: f32,
    use_sta: u32,
    hb: u32,
    wb: u32,
    rt: u32,
    rh: u32,
    rw: u32,
    stride: u32,
    _pad: [u32; 3],
}

/// Checks `[B, H, S, D]` q/k against the grid; returns (BH, D).
fn check_qk(gpu: &Gpu, q: &Tensor, k: &Tensor, grid: &BlockGrid) -> Result<(usize, usize)> {
    let qs = q.shape();
    if qs.len() != 4 {
        return Err(Error::shape(format!("q must be [B, H, S, D], got {qs:?}")));
    }
    if k.shape() != qs {
        return Err(Error::shape(format!(
            "q {qs:?} and k {:?} must have the same shape",
            k.shape()
        )));
    }
    if q.dtype() != k.dtype() || !matches!(q.dtype(), DType::F32 | DType::F16) {
        return Err(Error::shape(format!(
            "q and k must both be f32 or both f16, got {:?} and {:?}",
            q.dtype(),
            k.dtype()
        )));
    }
    if q.dtype() == DType::F16 && !gpu.caps().f16 {
        return Err(Error::Unsupported {
            adapter: gpu.caps().name.clone(),
            feature: "SHADER_F16",
            what: "f16 q/k".into(),
        });
    }
    let (s, d) = (qs[2], qs[3]);
    if s % BLOCK != 0 {
        return Err(Error::shape(format!(
            "sequence length {s} is not a multiple of the {BLOCK}-token block; crop the video so \
             height and width are multiples of 128 pixels"
        )));
    }
    if s != grid.tokens() {
        return Err(Error::shape(format!(
            "sequence length {s} does not match the block grid {}x{}x{} ({} tokens)",
            grid.t,
            grid.hb,
            grid.wb,
            grid.tokens()
        )));
    }
    if d == 0 || d % 16 != 0 || d > 512 {
        return Err(Error::shape(format!(
            "head_dim {d} must be a positive multiple of 16 up to 512 (64 and 128 are the usual ones)"
        )));
    }
    gpu.check_binding("q", q.logical_bytes())?;
    let bh = qs[0] * qs[1];
    Ok((bh, d))
}

fn record_pool(
    batch: &mut Batch<'_>,
    x: &Tensor,
    out: &Tensor,
    bh: usize,
    s: usize,
    d: usize,
) -> Result<()> {
    let gpu = batch.gpu();
    let nb = s / BLOCK;
    let key = format!("nabla/pool[{:?}]", x.dtype());
    let pipe = gpu.pipeline(&key, &shaders::source(shaders::POOL, x.dtype(), None), true)?;
    let p = PoolParams {
        s: s as u32,
        d: d as u32,
        nb: nb as u32,
        _pad: 0,
    };
    batch.dispatch(
        &pipe,
        bytemuck::bytes_of(&p),
        &[x, out],
        [nb as u32, bh as u32, 1],
    )
}

/// Which kernel computes the block scores `qa·kaᵀ/√D`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scores {
    /// Tensor cores where the adapter has 16×16 f16 cooperative matrices and D is a multiple
    /// of 16, else the portable kernel. The tensor-core kernel needs pooled values below
    /// 65504 in magnitude (f16's largest; the DiT's pooled q/k, RMS-normalised, are O(10));
    /// larger ones would overflow to infinite logits: use [`Scores::Portable`] for them.
    #[default]
    Auto,
    /// The portable kernel: 128×128 tiles of f32 FMAs (any adapter).
    Portable,
    /// Cooperative matrices, f32-accurate by an f16 hi/lo split of each operand
    /// (shaders/nabla/scores_coop.wgsl): each product's error is at most ~2⁻²⁴ of |q|·|k|,
    /// for pooled values below 65504 in magnitude.
    TensorCore,
}

/// The kernels of a mask estimation: how the block scores are computed and how the threshold
/// kernel reduces over a row. `Default` (and [`From<Reduction>`]) picks the fastest the
/// adapter runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MaskKernels {
    /// The block-scores kernel.
    pub scores: Scores,
    /// The threshold kernel's reduction.
    pub reduction: Reduction,
}

impl From<Reduction> for MaskKernels {
    fn from(reduction: Reduction) -> MaskKernels {
        MaskKernels {
            reduction,
            ..MaskKernels::default()
        }
    }
}

impl Scores {
    /// Whether [`Scores::TensorCore`] runs on `gpu` for head dim `d`.
    pub fn tensor_cores_run(gpu: &Gpu, d: usize) -> bool {
        Scores::tensor_core_subgroup(gpu, d).is_some()
    }

    /// The subgroup size of the tensor-core kernel on `gpu` for head dim `d`, if it runs.
    fn tensor_core_subgroup(gpu: &Gpu, d: usize) -> Option<u32> {
        gpu.caps().coop_subgroup().filter(|_| d.is_multiple_of(16))
    }

    /// The subgroup size of the tensor-core kernel this choice runs on `gpu` for head dim `d`,
    /// `None` for the portable kernel; an error when [`Scores::TensorCore`] cannot run there.
    fn tensor_core(self, gpu: &Gpu, d: usize) -> Result<Option<u32>> {
        let sg = Scores::tensor_core_subgroup(gpu, d);
        match (self, sg) {
            (Scores::Portable, _) => Ok(None),
            (Scores::Auto, sg) => Ok(sg),
            (Scores::TensorCore, Some(sg)) => Ok(Some(sg)),
            (Scores::TensorCore, None) => Err(Error::Unsupported {
                adapter: gpu.caps().name.clone(),
                feature: "16x16 f16 cooperative matrices with a fixed subgroup size of 16, 32 or 64 (and a head dim that is a multiple of 16)",
                what: format!("the tensor-core block scores (head dim {d})"),
            }),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn record_scores(
    batch: &mut Batch<'_>,
    qa: &Tensor,
    ka: &Tensor,
    out: &Tensor,
    bh: usize,
    nb: usize,
    d: usize,
    scores: Scores,
) -> Result<()> {
    let gpu = batch.gpu();
    let sqrt_d = (d as f32).sqrt();
    let p = ScoreParams {
        nb: nb as u32,
        d: d as u32,
        sqrt_d,
        stride: map_row_stride(out, bh, nb)? as u32,
        inv_sqrt_d: 1.0 / sqrt_d,
        _pad: [0; 3],
    };
    if let Some(sg) = scores.tensor_core(gpu, d)? {
        let key = format!("nabla/scores_coop[sg{sg}]");
        let pipe = gpu.pipeline(&key, &shaders::scores_coop_source(sg), true)?;
        return batch.dispatch(
            &pipe,
            bytemuck::bytes_of(&p),
            &[qa, ka, out],
            [nb.div_ceil(64) as u32, nb.div_ceil(64) as u32, bh as u32],
        );
    }
    let pipe = gpu.pipeline("nabla/scores", shaders::SCORES, true)?;
    let t = nb.div_ceil(128) as u32;
    batch.dispatch(
        &pipe,
        bytemuck::bytes_of(&p),
        &[qa, ka, out],
        [t, t, bh as u32],
    )
}

/// How the threshold kernel reduces over a row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reduction {
    /// One subgroup per row where the adapter has a fixed subgroup size and the row fits
    /// (Nb ≤ 64·SG), else the workgroup kernel with subgroup reductions, else the tree.
    #[default]
    Auto,
    /// Workgroup-memory tree (any adapter).
    Workgroup,
    /// One workgroup per row, subgroup reductions (needs SUBGROUP).
    Subgroup,
    /// One subgroup per row, no workgroup barriers (needs SUBGROUP, Nb ≤ 64·SG).
    RowPerSubgroup,
}

/// The values per lane the row-per-subgroup kernel needs for `nb` keys and subgroup size
/// `sg` (exactly ceil(nb / sg): every bisection pass reads all of them, so a rounded-up count
/// costs time, 14 % of the stage at 33 → 40 on the H200), or `None` when the row does not fit.
fn rows_kl(nb: usize, sg: u32) -> Option<u32> {
    let need = nb.div_ceil(sg as usize).max(1) as u32;
    (need <= shaders::THRESHOLD_ROWS_KL_MAX).then_some(need)
}

/// `(probs, keep)`: the logits, overwritten with the probabilities where `keep` (the
/// row-per-subgroup kernel skips that write otherwise; the others always write them).
fn record_threshold(
    batch: &mut Batch<'_>,
    (probs, keep): (&Tensor, bool),
    grid: &BlockGrid,
    algo: &SparseAlgo,
    out: &BlockMask,
    bh: usize,
    reduction: Reduction,
) -> Result<()> {
    let gpu = batch.gpu();
    let nb = grid.blocks();
    let per_thread = match nb.div_ceil(256) as u32 {
        k @ 0..=8 => k.max(1),
        k => k.next_power_of_two(),
    };
    let kmax = *shaders::THRESHOLD_K.last().unwrap_or(&1);
    if per_thread > kmax {
        return Err(Error::shape(format!(
            "{nb} blocks per row exceed the threshold kernel's {} (256 × {kmax}); use a shorter video or smaller frames",
            256 * kmax
        )));
    }
    let caps = gpu.caps();
    let fixed_sg = (caps.subgroups
        && caps.subgroup_min == caps.subgroup_max
        && [8, 16, 32, 64].contains(&caps.subgroup_min))
    .then_some(caps.subgroup_min);
    let rows_variant = match reduction {
        Reduction::Auto | Reduction::RowPerSubgroup => {
            fixed_sg.and_then(|s| rows_kl(nb, s).map(|k| (k, s)))
        }
        _ => None,
    };
    if reduction == Reduction::RowPerSubgroup && rows_variant.is_none() {
        return Err(Error::Unsupported {
            adapter: caps.name.clone(),
            feature: "SUBGROUP with a fixed subgroup size (and Nb ≤ 64·subgroup size)",
            what: "the row-per-subgroup threshold kernel".into(),
        });
    }
    let cut = algo
        .cut()
        .ok_or_else(|| Error::Invalid("the CDF threshold needs a NABLA algorithm".into()))?;
    let [rt, rh, rw] = algo.sta().map(|w| w.radii()).unwrap_or([0; 3]);
    let p = ThresholdParams {
        nb: nb as u32,
        cut,
        use_sta: algo.sta().is_some() as u32,
        hb: grid.hb as u32,
        wb: grid.wb as u32,
        rt,
        rh,
        rw,
        stride: map_row_stride(probs, bh, nb)? as u32,
        _pad: [0; 3],
    };
    if let Some((kl, sgs)) = rows_variant {
        // the STA window's bitmask, built once per grid and window (one unread word without)
        let sta = match algo.sta() {
            Some(w) => gpu.cached(&format!("sta_bits/{grid:?}/{w:?}"), || {
                let bits = super::sta::sta_bits(grid, &w);
                gpu.upload_u32(&bits, &[bits.len()])
            })?,
            None => gpu.cached("sta_bits/none", || gpu.upload_u32(&[0], &[1]))?,
        };
        let key = format!("nabla/threshold_rows[kl{kl},sg{sgs},probs={keep}]");
        let pipe = gpu.pipeline(&key, &shaders::threshold_rows_source(kl, sgs, keep), true)?;
        return batch.dispatch(
            &pipe,
            bytemuck::bytes_of(&p),
            &[probs, &out.counts, &out.indices, &sta],
            [nb.div_ceil(4) as u32, bh as u32, 1],
        );
    }
    let sg = match reduction {
        Reduction::Auto => gpu.caps().subgroups,
        Reduction::RowPerSubgroup => true,
        Reduction::Workgroup => false,
        Reduction::Subgroup if gpu.caps().subgroups => true,
        Reduction::Subgroup => {
            return Err(Error::Unsupported {
                adapter: gpu.caps().name.clone(),
                feature: "SUBGROUP",
                what: "the subgroup threshold kernel".into(),
            });
        }
    };
    let key = format!(
        "nabla/threshold[k{per_thread},{}]",
        if sg { "sg" } else { "wg" }
    );
    let pipe = gpu.pipeline(&key, &shaders::threshold_source(per_thread, sg), true)?;
    batch.dispatch(
        &pipe,
        bytemuck::bytes_of(&p),
        &[probs, &out.counts, &out.indices],
        [nb as u32, bh as u32, 1],
    )
}

/// Records the whole mask pipeline for NABLA algorithms into `batch` (no readback), writing the
/// lists into `out` and the intermediates into `stages`. STA-only masks need no recording:
/// use [`BlockMask::sta`].
pub fn record_estimate_mask(
    batch: &mut Batch<'_>,
    q: &Tensor,
    k: &Tensor,
    grid: BlockGrid,
    algo: &SparseAlgo,
    stages: &MaskStages,
    out: &BlockMask,
) -> Result<()> {
    let gpu = batch.gpu();
    let (bh, d) = check_qk(gpu, q, k, &grid)?;
    let nb = grid.blocks();
    if stages.qa.shape() != [bh, nb, d] || map_row_stride(&stages.probs, bh, nb).is_err() {
        return Err(Error::shape("mask scratch tensors do not match q/k"));
    }
    if out.heads != bh || out.nb != nb || out.kv != nb {
        return Err(Error::shape(format!(
            "mask output has {} heads of {} blocks, q/k need {bh} of {nb}",
            out.heads, out.nb
        )));
    }
    let s = grid.tokens();
    record_pool(batch, q, &stages.qa, bh, s, d)?;
    record_pool(batch, k, &stages.ka, bh, s, d)?;
    record_scores_threshold(batch, stages, &grid, algo, out, (bh, nb, d))
}

/// The block scores from the pooled rows in `stages`, then softmax, threshold and lists into
/// `out` (shapes checked by the callers: `bh` heads, `nb` blocks, head dim `d`).
fn record_scores_threshold(
    batch: &mut Batch<'_>,
    stages: &MaskStages,
    grid: &BlockGrid,
    algo: &SparseAlgo,
    out: &BlockMask,
    (bh, nb, d): (usize, usize, usize),
) -> Result<()> {
    let (qa, ka) = (&stages.qa, &stages.ka);
    record_scores(batch, qa, ka, &stages.probs, bh, nb, d, Scores::Auto)?;
    record_threshold(
        batch,
        (&stages.probs, stages.keep_probs),
        grid,
        algo,
        out,
        bh,
        Reduction::Auto,
    )
}

/// The row stride of [`MaskStages::probs`] for `nb` blocks: `nb` rounded up to a multiple of
/// 64, so that the tensor-core scores kernel stores every full tile straight from its matrices
/// (16-byte aligned rows, no tile crossing a row's end). On the H200 that is 0.32 instead of
/// 0.37 ms at wan14b-720p (benches/RESULTS.md, session 14).
pub fn map_stride(nb: usize) -> usize {
    nb.next_multiple_of(64)
}

/// The row stride of a block map `[bh, nb, stride]` f32 with `stride >= nb`, else an error.
fn map_row_stride(map: &Tensor, bh: usize, nb: usize) -> Result<usize> {
    match *map.shape() {
        [b, n, s] if b == bh && n == nb && s >= nb && map.dtype() == DType::F32 => Ok(s),
        _ => Err(Error::shape(format!(
            "block map {:?} {:?}: expected [{bh}, {nb}, >= {nb}] f32",
            map.shape(),
            map.dtype()
        ))),
    }
}

impl MaskStages {
    /// Allocates scratch tensors for `bh` heads, `nb` blocks and head dim `d` (the block map's
    /// rows [`map_stride`] floats apart).
    pub fn alloc(gpu: &Gpu, bh: usize, nb: usize, d: usize) -> Result<MaskStages> {
        let stride = map_stride(nb);
        gpu.check_binding(
            &format!("block attention map [{bh}, {nb}, {stride}]"),
            (bh * nb * stride * 4) as u64,
        )?;
        Ok(MaskStages {
            qa: gpu.empty(&[bh, nb, d], DType::F32)?,
            ka: gpu.empty(&[bh, nb, d], DType::F32)?,
            probs: gpu.empty(&[bh, nb, stride], DType::F32)?,
            keep_probs: true,
        })
    }

    /// The block map `[BH, Nb, Nb]` read back from [`MaskStages::probs`] without its rows'
    /// padding (probabilities where `keep_probs`, else logits).
    pub fn read_map(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let &[_, nb, stride] = self.probs.shape() else {
            return Err(Error::shape("the block map is not [BH, Nb, stride]"));
        };
        let padded = gpu.read_f32(&self.probs)?;
        Ok(padded
            .chunks_exact(stride)
            .flat_map(|row| &row[..nb])
            .copied()
            .collect())
    }
}

/// Estimates the block mask of `algo` from `q`, `k` `[B, H, S, D]` (f32 or f16, fractal order)
/// on the block grid, in one submission. Returns the mask and, for NABLA algorithms, the stages.
pub fn estimate_mask_with_stages(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    grid: BlockGrid,
    algo: &SparseAlgo,
) -> Result<(BlockMask, Option<MaskStages>)> {
    let (bh, d) = check_qk(gpu, q, k, &grid)?;
    if let SparseAlgo::Sta(w) = algo {
        return Ok((BlockMask::sta(gpu, grid, *w)?.as_ref().clone(), None));
    }
    let nb = grid.blocks();
    let stages = MaskStages::alloc(gpu, bh, nb, d)?;
    let out = BlockMask::alloc(gpu, bh, nb)?;
    let mut b = gpu.batch();
    record_estimate_mask(&mut b, q, k, grid, algo, &stages, &out)?;
    b.submit()?;
    Ok((out, Some(stages)))
}

/// Estimates the block mask of `algo` (see [`estimate_mask_with_stages`]).
pub fn estimate_mask(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    grid: BlockGrid,
    algo: &SparseAlgo,
) -> Result<BlockMask> {
    Ok(estimate_mask_with_stages(gpu, q, k, grid, algo)?.0)
}

/// The mask from already pooled `qa`, `ka` `[BH, Nb, D]` (f32): scores, softmax, threshold.
/// Returns the mask and the block attention map.
pub fn mask_from_pooled(
    gpu: &Gpu,
    qa: &Tensor,
    ka: &Tensor,
    grid: BlockGrid,
    algo: &SparseAlgo,
) -> Result<(BlockMask, Tensor)> {
    mask_from_pooled_with(gpu, qa, ka, grid, algo, Reduction::Auto)
}

/// [`mask_from_pooled`] with explicit kernels: the scores kernel and the threshold kernel's
/// reduction (a [`Reduction`] alone leaves the scores kernel to [`Scores::Auto`]). For tests
/// and the selftest.
pub fn mask_from_pooled_with(
    gpu: &Gpu,
    qa: &Tensor,
    ka: &Tensor,
    grid: BlockGrid,
    algo: &SparseAlgo,
    kernels: impl Into<MaskKernels>,
) -> Result<(BlockMask, Tensor)> {
    let MaskKernels { scores, reduction } = kernels.into();
    let (bh, d) = check_pooled(qa, ka, &grid, algo)?;
    let nb = grid.blocks();
    gpu.check_binding("block attention map", (bh * nb * nb * 4) as u64)?;
    let probs = gpu.empty(&[bh, nb, nb], DType::F32)?;
    let out = BlockMask::alloc(gpu, bh, nb)?;
    let mut b = gpu.batch();
    record_scores(&mut b, qa, ka, &probs, bh, nb, d, scores)?;
    record_threshold(&mut b, (&probs, true), &grid, algo, &out, bh, reduction)?;
    b.submit()?;
    Ok((out, probs))
}

/// Checks pooled `qa`, `ka` `[BH, Nb, D]` (f32) against the grid and that `algo` has a NABLA
/// threshold; returns (BH, D).
fn check_pooled(
    qa: &Tensor,
    ka: &Tensor,
    grid: &BlockGrid,
    algo: &SparseAlgo,
) -> Result<(usize, usize)> {
    let sh = qa.shape();
    let nb = grid.blocks();
    if sh.len() != 3
        || ka.shape() != sh
        || sh[1] != nb
        || qa.dtype() != DType::F32
        || ka.dtype() != DType::F32
    {
        return Err(Error::shape(format!(
            "pooled qa {sh:?} and ka {:?} must both be f32 [BH, {nb}, D] for the block grid \
             {}x{}x{}",
            ka.shape(),
            grid.t,
            grid.hb,
            grid.wb
        )));
    }
    let (bh, d) = (sh[0], sh[2]);
    if d == 0 || d % 16 != 0 {
        return Err(Error::shape(format!(
            "head_dim {d} must be a positive multiple of 16"
        )));
    }
    if algo.threshold().is_none() {
        return Err(Error::Invalid(format!(
            "{algo} has no NABLA threshold; use BlockMask::sta"
        )));
    }
    Ok((bh, d))
}

/// Records the rest of the mask pipeline for a NABLA algorithm from q and k already pooled into
/// `stages.qa`, `stages.ka` (by [`super::record_rope_split_heads_pooled`], or any producer of
/// `[BH, Nb, D]` f32 block means): block scores and softmax into `stages.probs`, threshold
/// (∪ STA) and lists into `out`, exactly as [`record_estimate_mask`] after its pooling. No
/// allocation besides the kernels' parameters. STA-only algorithms have no threshold (an
/// error): use [`BlockMask::sta`].
pub fn record_mask_from_pooled(
    batch: &mut Batch<'_>,
    grid: BlockGrid,
    algo: &SparseAlgo,
    stages: &MaskStages,
    out: &BlockMask,
) -> Result<()> {
    let (bh, d) = check_pooled(&stages.qa, &stages.ka, &grid, algo)?;
    let nb = grid.blocks();
    if map_row_stride(&stages.probs, bh, nb).is_err() {
        return Err(Error::shape(format!(
            "mask scratch: the block map {:?} does not match the pooled q/k ({bh} heads of {nb} \
             blocks: [{bh}, {nb}, >= {nb}] f32)",
            stages.probs.shape()
        )));
    }
    if out.heads != bh || out.nb != nb || out.kv != nb {
        return Err(Error::shape(format!(
            "mask output has {} heads of {} blocks, the pooled q/k need {bh} of {nb}",
            out.heads, out.nb
        )));
    }
    record_scores_threshold(batch, stages, &grid, algo, out, (bh, nb, d))
}

/// GPU time (median ms over `reps`) of each mask stage on its own: pooling of q and k, block
/// scores, and softmax + threshold + lists. For benchmarks.
pub fn time_mask_stages(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    grid: BlockGrid,
    algo: &SparseAlgo,
    reps: usize,
) -> Result<[f64; 3]> {
    let (bh, d) = check_qk(gpu, q, k, &grid)?;
    let nb = grid.blocks();
    let st = MaskStages::alloc(gpu, bh, nb, d)?;
    let out = BlockMask::alloc(gpu, bh, nb)?;
    let s = grid.tokens();
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let reps = reps.max(1) + 1;
    let pool = gpu.time_ms_inner(reps, 10, |b| {
        record_pool(b, q, &st.qa, bh, s, d)?;
        record_pool(b, k, &st.ka, bh, s, d)
    })?;
    let scores = gpu.time_ms_inner(reps, 10, |b| {
        record_scores(b, &st.qa, &st.ka, &st.probs, bh, nb, d, Scores::Auto)
    })?;
    // (the probabilities are not written back, as in the DiT, so every run sees the logits;
    // the workgroup-reduction kernels, used where the row-per-subgroup one cannot run, always
    // write them back, and their later runs see probabilities)
    let thr = gpu.time_ms_inner(reps, 10, |b| {
        record_threshold(
            b,
            (&st.probs, false),
            &grid,
            algo,
            &out,
            bh,
            Reduction::Auto,
        )
    })?;
    Ok([
        med(pool[1..].to_vec()),
        med(scores[1..].to_vec()),
        med(thr[1..].to_vec()),
    ])
}
