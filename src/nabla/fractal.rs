//! The fractal (8×8 tile) token order: dispatchers for `shaders/nabla/fractal.wgsl`.

use crate::error::{Error, Result};
use crate::gpu::{Batch, Gpu, Tensor};
use crate::shaders;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    h: u32,
    w: u32,
    rows: u32,
    words: u32,
    inverse: u32,
    _pad: [u32; 3],
}

/// Records the permutation of `src` `[F·H·W, C]` into `dst` (same shape): natural → fractal
/// order when `inverse` is false, fractal → natural when true.
pub fn record_fractal(
    batch: &mut Batch<'_>,
    src: &Tensor,
    dst: &Tensor,
    grid: (usize, usize, usize),
    inverse: bool,
) -> Result<()> {
    let (f, h, w) = grid;
    if h % 8 != 0 || w % 8 != 0 || h == 0 || w == 0 || f == 0 {
        return Err(Error::shape(format!(
            "fractal order needs F > 0 and H, W positive multiples of 8, got grid {f}x{h}x{w}"
        )));
    }
    let rows = f * h * w;
    let shape = src.shape();
    if shape.len() != 2 || shape[0] != rows {
        return Err(Error::shape(format!(
            "fractal order of grid {f}x{h}x{w} expects a [{rows}, C] tensor, got {shape:?}"
        )));
    }
    if dst.shape() != shape || dst.dtype() != src.dtype() {
        return Err(Error::shape(format!(
            "fractal output {:?} {:?} must match input {shape:?} {:?}",
            dst.shape(),
            dst.dtype(),
            src.dtype()
        )));
    }
    let row_bytes = shape[1] as u64 * src.dtype().size();
    if !row_bytes.is_multiple_of(4) {
        return Err(Error::shape(format!(
            "fractal order moves 32-bit words; a row of {} {:?} values is {row_bytes} bytes",
            shape[1],
            src.dtype()
        )));
    }
    let gpu = batch.gpu();
    gpu.check_binding("fractal input", src.logical_bytes())?;
    let p = Params {
        h: h as u32,
        w: w as u32,
        rows: rows as u32,
        words: (row_bytes / 4) as u32,
        inverse: inverse as u32,
        _pad: [0; 3],
    };
    let pipe = gpu.pipeline("nabla/fractal", shaders::FRACTAL, true)?;
    let groups = crate::gpu::groups_2d(rows, gpu.caps().max_workgroups_per_dim);
    batch.dispatch(&pipe, bytemuck::bytes_of(&p), &[src, dst], groups)
}

fn permute(gpu: &Gpu, x: &Tensor, grid: (usize, usize, usize), inverse: bool) -> Result<Tensor> {
    let out = gpu.empty(x.shape(), x.dtype())?;
    let mut b = gpu.batch();
    record_fractal(&mut b, x, &out, grid, inverse)?;
    b.submit()?;
    Ok(out)
}

/// Reorders the rows of `x` `[F·H·W, C]` from natural to fractal order.
pub fn to_fractal(gpu: &Gpu, x: &Tensor, grid: (usize, usize, usize)) -> Result<Tensor> {
    permute(gpu, x, grid, false)
}

/// Reorders the rows of `x` `[F·H·W, C]` from fractal back to natural order.
pub fn from_fractal(gpu: &Gpu, x: &Tensor, grid: (usize, usize, usize)) -> Result<Tensor> {
    permute(gpu, x, grid, true)
}
