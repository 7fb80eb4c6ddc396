//! NABLA block masks on CUDA: pooling, block scores, softmax + CDF threshold ∪ STA → per-row
//! KV block lists, in the same list format as the wgpu layer ([`crate::BlockMask`]).
//! (Interface fixed; kernels being written.)

use super::{Cuda, CudaTensor};
use crate::error::{Error, Result};
use crate::nabla::{BlockGrid, SparseAlgo, StaWindow};

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

/// Scratch reused by [`estimate_mask`] between layers.
pub struct MaskScratch {
    _heads: usize,
}

impl MaskScratch {
    /// Scratch for `heads` heads of `nb` blocks and head dim `d`.
    pub fn alloc(_cuda: &Cuda, heads: usize, _nb: usize, _d: usize) -> Result<MaskScratch> {
        Ok(MaskScratch { _heads: heads })
    }
}

/// Estimates the mask of `algo` from `q`, `k` `[1, H, S, D]` (fractal order).
pub fn estimate_mask(
    _cuda: &Cuda,
    _q: &CudaTensor,
    _k: &CudaTensor,
    _grid: BlockGrid,
    _algo: &SparseAlgo,
    _scratch: &MaskScratch,
) -> Result<CudaMask> {
    Err(Error::Cuda(
        "NABLA mask estimation on CUDA is not written yet".into(),
    ))
}

/// The STA mask of a grid (one shared head).
pub fn sta_mask(_cuda: &Cuda, _grid: BlockGrid, _w: StaWindow) -> Result<CudaMask> {
    Err(Error::Cuda("STA masks on CUDA are not written yet".into()))
}

impl CudaMask {
    /// The dense `[heads, nq, nkv]` 0/1 form.
    pub fn to_dense(&self, cuda: &Cuda) -> Result<Vec<u8>> {
        let counts: Vec<u32> = bytemuck::pod_collect_to_vec(&cuda.download_bytes(&self.counts)?);
        let idx: Vec<u32> = bytemuck::pod_collect_to_vec(&cuda.download_bytes(&self.indices)?);
        let mut dense = vec![0u8; self.heads * self.nq * self.nkv];
        for r in 0..self.heads * self.nq {
            for &j in &idx[r * self.nkv..r * self.nkv + counts[r] as usize] {
                dense[r * self.nkv + j as usize] = 1;
            }
        }
        Ok(dense)
    }
}
