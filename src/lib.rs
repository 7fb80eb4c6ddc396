//! # nabla
//!
//! NABLA sparse attention (Neighborhood Adaptive Block-Level Attention, arXiv 2507.13546) and the
//! Wan 2.1 text-to-video models on any GPU through wgpu and WGSL compute shaders: block masks
//! estimated on the GPU ([`estimate_mask`]), Sliding Tile Attention windows, the fractal token
//! order, block-sparse flash attention ([`block_sparse_attention`]), the ops of the Wan models
//! ([`ops`]) and the models themselves ([`wan`]: DiT, umT5, samplers, VAE), and video output
//! ([`video`]). Every kernel has a CPU reference in
//! [`mod@reference`] that the tests compare against.
//!
//! ```no_run
//! use nabla::{Gpu, SparseAlgo, BlockGrid, estimate_mask, block_sparse_attention};
//! # fn main() -> nabla::Result<()> {
//! let gpu = Gpu::new()?;
//! let grid = BlockGrid::new(3, 2, 2)?;           // 12 blocks of 64 tokens
//! let s = grid.tokens();
//! let x = vec![0.5f32; 2 * s * 128];
//! let q = gpu.upload_f32(&x, &[1, 2, s, 128])?;
//! let k = gpu.upload_f32(&x, &[1, 2, s, 128])?;
//! let v = gpu.upload_f32(&x, &[1, 2, s, 128])?;
//! let mask = estimate_mask(&gpu, &q, &k, grid, &"nabla-0.7".parse::<SparseAlgo>()?)?;
//! let out = block_sparse_attention(&gpu, &q, &k, &v, &mask)?;
//! # Ok(()) }
//! ```

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod gpu;
pub mod io;
pub mod nabla;
pub mod ops;
mod par;
pub mod reference;
pub mod selftest;
pub mod shaders;
pub mod synth;
pub mod video;
pub mod wan;

pub use attention::{block_sparse_attention, dense_attention};
pub use error::{Error, Result};
pub use gpu::{Batch, Capabilities, DType, Gpu, KernelTime, Tensor};
pub use nabla::{
    BlockGrid, BlockMask, MaskStages, SparseAlgo, StaWindow, estimate_mask, from_fractal,
    to_fractal,
};
