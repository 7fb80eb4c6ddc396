//! Block-sparse flash attention on CUDA tensor cores (interface fixed; kernel being written).

use super::nabla::CudaMask;
use super::{Cuda, CudaTensor};
use crate::error::{Error, Result};

/// `out = softmax(q·kᵀ/√D)·v` over the listed key blocks of each 64-row query block (`mask`), or
/// over every key (`None`). q, out `[1, H, Sq, D]`; k, v `[1, H, Skv, D]`; f16, bf16 or f32.
pub fn attention(
    _cuda: &Cuda,
    _q: &CudaTensor,
    _k: &CudaTensor,
    _v: &CudaTensor,
    _mask: Option<&CudaMask>,
    _out: &CudaTensor,
) -> Result<()> {
    Err(Error::Cuda("attention on CUDA is not written yet".into()))
}
