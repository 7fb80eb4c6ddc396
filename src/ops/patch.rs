//! Patch gather of the patch embedding and the unpatchify of the Wan DiT head output, patch
//! size (1, 2, 2) (spec §2.2, §2.9).
//!
//! * [`record_patchify`]: latent `z [C, F, H, W]` → tokens `[F·H'·W', 4C]` (`H' = H/2`,
//!   `W' = W/2`), per-token vector order `(c, q, r)` (c slowest, r fastest), tokens in natural
//!   order `s = (f·H' + h)·W' + w`. A linear with the Conv3d weight `[dim, C, 1, 2, 2]` seen as
//!   `[dim, 4C]` then gives the patch embedding.
//! * [`record_unpatchify`]: head output `[S, 4C]` → `v [C, F, H, W]` with
//!   `v[c, f, 2h+q, 2w+r] = out[s(f,h,w), q·2C + r·C + c]` (per-token layout `(q, r, c)`).
//!
//! Both are pure data movement on 32-bit words, so any element type of 2 or 4 bytes works
//! (f32, u32, f16, bf16; input and output of the same type) with bitwise-exact results.

use crate::error::{Error, Result};
use crate::gpu::{Batch, Gpu, Tensor};

const PATCHIFY_WGSL: &str = include_str!("../../shaders/nn/patchify.wgsl");
const UNPATCHIFY_WGSL: &str = include_str!("../../shaders/nn/patch_unpatchify.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    c: u32,
    f: u32,
    h: u32,
    w: u32,
    words: u32,
    _pad: [u32; 3],
}

/// `(kernel name, body)` of the two kernels.
const KERNELS: [(&str, &str); 2] = [
    ("nn/patchify", PATCHIFY_WGSL),
    ("nn/unpatchify", UNPATCHIFY_WGSL),
];

/// Elements per 32-bit word and the variant tag for an element size in bytes.
fn pack_of(size: u64) -> Option<(u32, &'static str)> {
    match size {
        4 => Some((1, "w32")),
        2 => Some((2, "w16")),
        _ => None,
    }
}

fn variant(kernel: (&str, &str), pack: u32, tag: &str) -> (String, String) {
    (
        format!("{}[{tag}]", kernel.0),
        format!("const PACK: u32 = {pack}u;\n{}", kernel.1),
    )
}

/// Kernel variants of this module: `nn/patchify[w32|w16]` and `nn/unpatchify[w32|w16]`
/// (32-bit elements, or two 16-bit elements per word).
pub fn variants() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for k in KERNELS {
        for size in [4, 2] {
            let (pack, tag) = pack_of(size).expect("known size");
            v.push(variant(k, pack, tag));
        }
    }
    v
}

/// Checks a latent shape `[C, F, H, W]` and returns `(C, F, H, W)`.
fn latent_dims(what: &str, shape: &[usize]) -> Result<(usize, usize, usize, usize)> {
    let [c, f, h, w] = shape else {
        return Err(Error::shape(format!(
            "{what} must be a latent [C, F, H, W], got {shape:?}"
        )));
    };
    if *c == 0 || *f == 0 || *h == 0 || *w == 0 {
        return Err(Error::shape(format!("{what} {shape:?} has an empty axis")));
    }
    if h % 2 != 0 || w % 2 != 0 {
        return Err(Error::shape(format!(
            "{what} {shape:?}: patch size (1, 2, 2) needs even H and W, got H = {h}, W = {w}"
        )));
    }
    Ok((*c, *f, *h, *w))
}

/// Validates the latent / token pair and records one kernel.
fn record(
    batch: &mut Batch<'_>,
    kernel: (&str, &str),
    latent: &Tensor,
    tokens: &Tensor,
    src: &Tensor,
    dst: &Tensor,
) -> Result<()> {
    let (c, f, h, w) = latent_dims(&format!("{} latent", kernel.0), latent.shape())?;
    let s = f * (h / 2) * (w / 2);
    if tokens.shape() != [s, 4 * c] {
        return Err(Error::shape(format!(
            "{}: latent {:?} has {s} patches of {} values, so tokens must be [{s}, {}], got {:?}",
            kernel.0,
            latent.shape(),
            4 * c,
            4 * c,
            tokens.shape()
        )));
    }
    if tokens.dtype() != latent.dtype() {
        return Err(Error::shape(format!(
            "{}: tokens {:?} and latent {:?} must have the same element type",
            kernel.0,
            tokens.dtype(),
            latent.dtype()
        )));
    }
    let Some((pack, tag)) = pack_of(latent.dtype().size()) else {
        return Err(Error::shape(format!(
            "{}: element type {:?} is not 2 or 4 bytes",
            kernel.0,
            latent.dtype()
        )));
    };
    let n = latent.numel();
    if n > u32::MAX as usize {
        return Err(Error::shape(format!(
            "{}: {n} elements exceed the kernel's 32-bit indexing",
            kernel.0
        )));
    }
    let gpu = batch.gpu();
    gpu.check_binding(
        &format!("{} latent {:?}", kernel.0, latent.shape()),
        latent.logical_bytes(),
    )?;
    let words = n / pack as usize;
    let p = Params {
        c: c as u32,
        f: f as u32,
        h: h as u32,
        w: w as u32,
        words: words as u32,
        _pad: [0; 3],
    };
    let (name, source) = variant(kernel, pack, tag);
    let pipe = gpu.pipeline(&name, &source, true)?;
    let groups = crate::gpu::groups_2d(words.div_ceil(256), gpu.caps().max_workgroups_per_dim);
    batch.dispatch(&pipe, bytemuck::bytes_of(&p), &[src, dst], groups)
}

/// Records the patch gather `z [C, F, H, W]` → `tokens [F·(H/2)·(W/2), 4C]`:
/// `tokens[s, (c·2 + q)·2 + r] = z[c, f, 2h+q, 2w+r]` with `s = (f·H/2 + h)·W/2 + w`.
/// H and W must be even; `tokens` has `z`'s element type (any 2- or 4-byte type).
pub fn record_patchify(batch: &mut Batch<'_>, z: &Tensor, tokens: &Tensor) -> Result<()> {
    record(batch, KERNELS[0], z, tokens, z, tokens)
}

/// Patch gather of `z [C, F, H, W]` into a new tensor `[F·(H/2)·(W/2), 4C]`
/// (see [`record_patchify`]), submitted.
pub fn patchify(gpu: &Gpu, z: &Tensor) -> Result<Tensor> {
    let (c, f, h, w) = latent_dims("patchify latent", z.shape())?;
    let tokens = gpu.empty(&[f * (h / 2) * (w / 2), 4 * c], z.dtype())?;
    let mut b = gpu.batch();
    record_patchify(&mut b, z, &tokens)?;
    b.submit()?;
    Ok(tokens)
}

/// Records the unpatchify `out [F·(H/2)·(W/2), 4C]` → `v [C, F, H, W]`:
/// `v[c, f, 2h+q, 2w+r] = out[s, q·2C + r·C + c]` with `s = (f·H/2 + h)·W/2 + w` (tokens in
/// natural order; reorder a fractal-order head output first). The shape of `v` gives C, F, H, W
/// (H and W even); `out` has `v`'s element type (any 2- or 4-byte type).
pub fn record_unpatchify(batch: &mut Batch<'_>, out: &Tensor, v: &Tensor) -> Result<()> {
    record(batch, KERNELS[1], v, out, out, v)
}

/// Unpatchify of `out [S, 4C]` into a new latent `[C, F, H, W]` where `latent = (F, H, W)`
/// are the latent (not patch-grid) sizes (see [`record_unpatchify`]), submitted.
pub fn unpatchify(gpu: &Gpu, out: &Tensor, latent: (usize, usize, usize)) -> Result<Tensor> {
    let (f, h, w) = latent;
    let sh = out.shape();
    let [_, cols] = sh else {
        return Err(Error::shape(format!(
            "unpatchify input must be [S, 4C], got {sh:?}"
        )));
    };
    if cols % 4 != 0 {
        return Err(Error::shape(format!(
            "unpatchify input {sh:?}: {cols} values per token is not 4·C"
        )));
    }
    let shape = [cols / 4, f, h, w];
    latent_dims("unpatchify output", &shape)?;
    let v = gpu.empty(&shape, out.dtype())?;
    let mut b = gpu.batch();
    record_unpatchify(&mut b, out, &v)?;
    b.submit()?;
    Ok(v)
}
