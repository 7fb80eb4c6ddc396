//! [`CudaBackend`]: the Wan DiT's device seam ([`Backend`]) on the CUDA layer, so
//! [`crate::wan::Dit`] runs unchanged on an NVIDIA GPU.
//!
//! Every op is enqueued on the [`Cuda`] stream as it is called (the stream keeps them in order,
//! so [`Backend::flush`] has nothing to do); [`Backend::download`] waits for the stream. The GEMMs
//! go through cuBLASLt ([`super::gemm`]), the other DiT ops through `kernels/ops.cu`
//! ([`super::ops`]), mask estimation and attention through [`super::nabla`] and
//! [`super::attention`].
//!
//! Cached per backend: the RoPE tables per `(grid, head_dim, fractal)`, the fractal row
//! permutations per `(grid, inverse)` and the STA masks per `(grid, window)` (uploads
//! synchronize, so they happen once per shape, not per layer).

use super::attention;
use super::nabla::{self, CudaMask, MaskScratch};
use super::{Cuda, CudaTensor, gemm, ops};
use crate::error::{Error, Result};
use crate::gpu::DType;
use crate::gpu::KernelTime;
use crate::nabla::{BlockGrid, QkSide, SparseAlgo, StaWindow};
use crate::ops::linear::Activation;
use crate::wan::backend::{Backend, Mask, Norm};
use cudarc::driver::CudaEvent;
use std::collections::{BTreeMap, HashMap};

type Grid = (usize, usize, usize);

/// The [`Backend`] of the CUDA layer on one [`Cuda`] device (see the module docs).
pub struct CudaBackend<'c> {
    cuda: &'c Cuda,
    rope: HashMap<(Grid, usize, bool), (CudaTensor, CudaTensor)>,
    perms: HashMap<(Grid, bool), CudaTensor>,
    sta: HashMap<(BlockGrid, StaWindow), CudaMask>,
    /// While profiling: each op's label and the events around it.
    prof: Option<Vec<(&'static str, CudaEvent, CudaEvent)>>,
}

impl std::fmt::Debug for CudaBackend<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend({:?})", self.cuda)
    }
}

impl<'c> CudaBackend<'c> {
    /// A backend on `cuda` with empty caches.
    pub fn new(cuda: &'c Cuda) -> Self {
        CudaBackend {
            cuda,
            rope: HashMap::new(),
            perms: HashMap::new(),
            sta: HashMap::new(),
            prof: None,
        }
    }

    /// Starts a per-op profile: every op from now on is bracketed by CUDA events (labels match
    /// the wgpu pipeline families, so `nabla bench dit` prints one breakdown for both layers).
    pub fn start_profile(&mut self) {
        self.prof = Some(Vec::new());
    }

    /// Ends the profile: waits for the stream and returns the GPU time per op label.
    pub fn stop_profile(&mut self) -> Result<BTreeMap<String, KernelTime>> {
        let mut out: BTreeMap<String, KernelTime> = BTreeMap::new();
        let Some(events) = self.prof.take() else {
            return Ok(out);
        };
        self.cuda.synchronize()?;
        for (label, a, b) in events {
            let ms = a
                .elapsed_ms(&b)
                .map_err(|e| super::cuda_err("reading profile events", e))?;
            let e = out.entry(label.to_string()).or_default();
            e.ms += ms as f64;
            e.count += 1;
        }
        Ok(out)
    }

    /// Runs `op`, bracketed by events while profiling.
    fn timed<R>(
        &mut self,
        label: &'static str,
        op: impl FnOnce(&'c Cuda) -> Result<R>,
    ) -> Result<R> {
        if self.prof.is_none() {
            return op(self.cuda);
        }
        let ctx = self.cuda.context();
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let ev = |what| super::cuda_err(what, "event");
        let a = ctx.new_event(flags).map_err(|_| ev("profile event"))?;
        a.record(self.cuda.stream())
            .map_err(|e| super::cuda_err("recording a profile event", e))?;
        let r = op(self.cuda)?;
        let b = ctx.new_event(flags).map_err(|_| ev("profile event"))?;
        b.record(self.cuda.stream())
            .map_err(|e| super::cuda_err("recording a profile event", e))?;
        if let Some(p) = self.prof.as_mut() {
            p.push((label, a, b));
        }
        Ok(r)
    }

    /// The device.
    pub fn cuda(&self) -> &'c Cuda {
        self.cuda
    }

    /// The cached fractal row permutation of `grid` (or its inverse).
    fn perm(&mut self, grid: Grid, inverse: bool) -> Result<CudaTensor> {
        if let Some(p) = self.perms.get(&(grid, inverse)) {
            return Ok(p.clone());
        }
        let p = ops::fractal_perm(self.cuda, grid, inverse)?;
        self.perms.insert((grid, inverse), p.clone());
        Ok(p)
    }

    /// The cached STA-only mask of (grid, window) (one shared head).
    fn sta_mask(&mut self, grid: BlockGrid, w: StaWindow) -> Result<CudaMask> {
        if let Some(m) = self.sta.get(&(grid, w)) {
            return Ok(m.clone());
        }
        let m = nabla::sta_mask(self.cuda, grid, w)?;
        self.sta.insert((grid, w), m.clone());
        Ok(m)
    }
}

/// Fails unless `out` is a heads tensor `[H, S, D]` or `[1, H, S, D]` of `heads` heads.
fn check_heads(op: &str, heads: usize, out: &CudaTensor) -> Result<()> {
    match *out.shape.as_slice() {
        [h, _, _] | [1, h, _, _] if h == heads => Ok(()),
        _ => Err(Error::shape(format!(
            "{op}: {heads} heads requested, but out {:?} is not [1, {heads}, S, D]",
            out.shape
        ))),
    }
}

/// A weight rounded to a 16-bit storage type on the host (nearest even, as
/// `half::{f16, bf16}::from_f32`), as little-endian bytes.
fn weight_bytes(data: &[f32], dtype: DType) -> Result<Vec<u8>> {
    Ok(match dtype {
        DType::F32 => bytemuck::cast_slice(data).to_vec(),
        DType::F16 => {
            let v: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::BF16 => {
            let v: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::U32 => {
            return Err(Error::shape(
                "weights are stored as F32, F16 or BF16, not U32 (pass one of those dtypes)",
            ));
        }
    })
}

impl Backend for CudaBackend<'_> {
    type T = CudaTensor;
    type M = CudaMask;
    type MaskScratch = MaskScratch;

    fn alloc(&mut self, shape: &[usize]) -> Result<CudaTensor> {
        self.cuda.empty(shape, DType::F32)
    }
    fn alloc_as(&mut self, shape: &[usize], dtype: DType) -> Result<CudaTensor> {
        self.cuda.empty(shape, dtype)
    }
    fn has_f16(&self) -> bool {
        true
    }
    fn memory_info(&self) -> Option<(u64, u64)> {
        self.cuda
            .memory()
            .ok()
            .map(|(free, total)| (free as u64, total as u64))
    }
    fn device_name(&self) -> String {
        self.cuda.name().to_string()
    }
    fn gemm_input_dtype(&self, weights: DType) -> DType {
        // 16-bit weights: cuBLASLt reads x and writes out in the weight's type (no conversion
        // pass, half the bytes); f32 weights (the parity path) keep f32 activations
        match weights {
            DType::BF16 | DType::F16 => weights,
            _ => DType::F32,
        }
    }
    fn upload(&mut self, data: &[f32], shape: &[usize]) -> Result<CudaTensor> {
        self.cuda.upload_f32(data, shape)
    }
    fn write(&mut self, t: &CudaTensor, data: &[f32]) -> Result<()> {
        if t.dtype != DType::F32 || t.numel() != data.len() {
            return Err(Error::shape(format!(
                "write of {} f32 values into a {:?} {:?} tensor (needs an f32 tensor of that \
                 many elements)",
                data.len(),
                t.shape,
                t.dtype
            )));
        }
        // in stream order: lands after the ops enqueued before, before those enqueued after
        self.cuda.write_bytes(t, bytemuck::cast_slice(data))
    }
    fn upload_weight(&mut self, data: &[f32], shape: &[usize], dtype: DType) -> Result<CudaTensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(format!(
                "weight upload of {} values for shape {shape:?} ({n} elements)",
                data.len()
            )));
        }
        self.cuda
            .upload_bytes(&weight_bytes(data, dtype)?, shape, dtype)
    }
    fn download(&mut self, t: &CudaTensor) -> Result<Vec<f32>> {
        self.cuda.download_f32(t)
    }
    fn flush(&mut self) -> Result<()> {
        // every op is already enqueued on the one in-order stream
        Ok(())
    }
    fn reshape(&self, t: &CudaTensor, shape: &[usize]) -> CudaTensor {
        t.reshape(shape).unwrap_or_else(|_| t.clone())
    }

    fn linear(
        &mut self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: Option<&CudaTensor>,
        act: Activation,
        out: &CudaTensor,
    ) -> Result<()> {
        self.timed("linalg/linear", |c| gemm::linear(c, x, w, b, act, out))
    }
    fn layer_norm(
        &mut self,
        x: &CudaTensor,
        out: &CudaTensor,
        eps: f32,
        mode: Norm<'_, CudaTensor>,
    ) -> Result<()> {
        self.timed("nn/norm[layer]", |c| ops::layer_norm(c, x, out, eps, &mode))
    }
    fn rms_norm(
        &mut self,
        x: &CudaTensor,
        weight: &CudaTensor,
        out: &CudaTensor,
        eps: f32,
    ) -> Result<()> {
        self.timed("nn/norm[rms]", |c| ops::rms_norm(c, x, weight, out, eps))
    }
    fn add(&mut self, a: &CudaTensor, b: &CudaTensor, out: &CudaTensor) -> Result<()> {
        self.timed("nn/add", |c| ops::add(c, a, b, out))
    }
    fn gated_residual(
        &mut self,
        x: &CudaTensor,
        y: &CudaTensor,
        gate: Option<(&CudaTensor, u32)>,
    ) -> Result<()> {
        self.timed("nn/gated_residual", |c| ops::gated_residual(c, x, y, gate))
    }
    fn activation(&mut self, x: &CudaTensor, act: Activation, out: &CudaTensor) -> Result<()> {
        self.timed("nn/activation", |c| ops::activation(c, x, act, out))
    }
    fn rope(
        &mut self,
        x: &CudaTensor,
        cos: &CudaTensor,
        sin: &CudaTensor,
        heads: usize,
    ) -> Result<()> {
        self.timed("nn/rope", |c| ops::rope(c, x, cos, sin, heads))
    }
    fn rope_tables(
        &mut self,
        grid: Grid,
        head_dim: usize,
        fractal: bool,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let key = (grid, head_dim, fractal);
        if let Some(t) = self.rope.get(&key) {
            return Ok(t.clone());
        }
        let t = ops::rope_tables(self.cuda, grid, head_dim, fractal)?;
        self.rope.insert(key, t.clone());
        Ok(t)
    }
    fn rope_split_heads(
        &mut self,
        x: &CudaTensor,
        cos: &CudaTensor,
        sin: &CudaTensor,
        heads: usize,
        out: &CudaTensor,
    ) -> Result<()> {
        // the fused kernel reads H from out; a mismatch with `heads` is a caller error
        check_heads("rope_split_heads", heads, out)?;
        self.timed("nn/rope", |c| ops::rope_split_heads(c, x, cos, sin, out))
    }
    fn split_heads(&mut self, x: &CudaTensor, out: &CudaTensor) -> Result<()> {
        self.timed("nn/heads[split]", |c| ops::split_heads(c, x, out))
    }
    fn merge_heads(&mut self, x: &CudaTensor, out: &CudaTensor) -> Result<()> {
        self.timed("nn/heads[merge]", |c| ops::merge_heads(c, x, out))
    }
    fn fractal(
        &mut self,
        src: &CudaTensor,
        dst: &CudaTensor,
        grid: Grid,
        inverse: bool,
    ) -> Result<()> {
        ops::check_fractal_rows(src, grid)?;
        let perm = self.perm(grid, inverse)?;
        self.timed("nabla/fractal", |c| ops::permute_rows(c, src, dst, &perm))
    }
    fn patchify(&mut self, z: &CudaTensor, tokens: &CudaTensor) -> Result<()> {
        self.timed("nn/patch", |c| ops::patchify(c, z, tokens))
    }
    fn unpatchify(&mut self, out: &CudaTensor, v: &CudaTensor) -> Result<()> {
        self.timed("nn/patch", |c| ops::unpatchify(c, out, v))
    }

    fn mask_scratch(&mut self, heads: usize, grid: BlockGrid, d: usize) -> Result<MaskScratch> {
        MaskScratch::alloc(self.cuda, heads, grid.blocks(), d)
    }
    fn estimate_mask(
        &mut self,
        q: &CudaTensor,
        k: &CudaTensor,
        grid: BlockGrid,
        algo: &SparseAlgo,
        scratch: &MaskScratch,
    ) -> Result<CudaMask> {
        if let SparseAlgo::Sta(w) = algo {
            return self.sta_mask(grid, *w);
        }
        self.timed("nabla/mask", |c| {
            nabla::estimate_mask(c, q, k, grid, algo, scratch)
        })
    }
    fn rope_split_heads_pooled(
        &mut self,
        x: &CudaTensor,
        cos: &CudaTensor,
        sin: &CudaTensor,
        heads: usize,
        out: &CudaTensor,
        scratch: &MaskScratch,
        side: QkSide,
    ) -> Result<bool> {
        check_heads("rope_split_heads_pooled", heads, out)?;
        self.timed("nn/rope+pool", |c| {
            nabla::rope_split_heads_pooled(c, x, cos, sin, out, scratch, side)
        })?;
        Ok(true)
    }
    fn estimate_mask_prepooled(
        &mut self,
        grid: BlockGrid,
        algo: &SparseAlgo,
        scratch: &MaskScratch,
    ) -> Result<CudaMask> {
        if let SparseAlgo::Sta(w) = algo {
            return self.sta_mask(grid, *w);
        }
        self.timed("nabla/mask", |c| {
            nabla::estimate_mask_prepooled(c, grid, algo, scratch)
        })
    }
    fn mask_dense(&mut self, m: &CudaMask) -> Result<Vec<u8>> {
        m.to_dense(self.cuda)
    }
    fn mask_density(&mut self, m: &CudaMask) -> Result<f64> {
        m.density(self.cuda)
    }
    fn attention(
        &mut self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        mask: &Mask<CudaMask>,
        out: &CudaTensor,
    ) -> Result<()> {
        match mask {
            Mask::Dense => self.timed("attention/flash", |c| {
                attention::attention(c, q, k, v, None, out)
            }),
            Mask::Sparse(m) => self.timed("attention/flash", |c| {
                attention::attention(c, q, k, v, Some(m), out)
            }),
        }
    }
}
