//! The device seam of the Wan models: every op the DiT needs, behind one trait. The wgpu layer
//! ([`WgpuBackend`]) implements it today; a CUDA layer implements the same trait, so the model
//! code in [`super::Dit`] is written once.
//!
//! Ops are *recorded*: a backend may batch them and only runs them at [`Backend::flush`] or
//! when data is downloaded.

use crate::error::{Error, Result};
use crate::gpu::{Batch, DType, Gpu, Tensor};
use crate::nabla::{BlockGrid, BlockMask, MaskStages, QkSide, SparseAlgo};
use crate::ops::linear::{Activation, LinearKernel, LinearRounding};
use std::sync::Arc;

/// What a LayerNorm applies after normalizing (mirrors [`crate::ops::norm::NormMode`]).
pub enum Norm<'a, T> {
    /// No parameters.
    Plain,
    /// `y·weight + bias`.
    Affine(&'a T, &'a T),
    /// `y·(1 + mods[scale_row]) + mods[shift_row]`.
    Modulate {
        /// The `[R, C]` table.
        mods: &'a T,
        /// Shift row.
        shift: u32,
        /// Scale row.
        scale: u32,
    },
}

/// A block mask for self-attention, as the backend stores it.
pub enum Mask<M> {
    /// Every block (dense attention).
    Dense,
    /// The lists the backend estimated or built.
    Sparse(M),
}

/// Every operation of the Wan DiT on one device.
pub trait Backend {
    /// A device tensor (row-major, with its shape).
    type T: Clone;
    /// A block mask on the device.
    type M;
    /// Scratch the mask estimation reuses between layers.
    type MaskScratch;

    /// A new uninitialised f32 activation tensor.
    fn alloc(&mut self, shape: &[usize]) -> Result<Self::T>;
    /// A new uninitialised tensor of another storage type (f16 heads for the fast path).
    fn alloc_as(&mut self, shape: &[usize], dtype: DType) -> Result<Self::T>;
    /// Whether f16 storage is available for activations.
    fn has_f16(&self) -> bool;
    /// The storage type of activations that only feed GEMMs whose weights are stored as
    /// `weights` (norm outputs, merged attention heads, the FFN hidden): the backend's
    /// [`Backend::linear`] then takes `x`, and writes `out`, in that type, and its layer norm
    /// and head merge write it. The default is F32; the CUDA layer answers the weight's type for
    /// 16-bit weights, as the reference's bf16 autocast keeps GEMM activations in bf16 (spec
    /// §2.10). The wgpu layer answers F16 for 16-bit weights where its GEMM runs on tensor
    /// cores, which round x to f16 anyway (same results, half the bytes; F32 with its bf16
    /// autocast on and bf16 weights: that rounds x to bf16 inside the GEMM, from f32;
    /// [`WgpuBackend::set_f16_activations`]). The answer may change when a backend's settings
    /// do.
    fn gemm_input_dtype(&self, weights: DType) -> DType {
        let _ = weights;
        DType::F32
    }
    /// `(free, total)` device memory in bytes where the layer can tell (CUDA; wgpu on Vulkan,
    /// [`Gpu::memory_info`]), `None` where it cannot (wgpu on other backends): the DiT refuses
    /// weights or a forward workspace that cannot fit before allocating them.
    fn memory_info(&self) -> Option<(u64, u64)> {
        None
    }
    /// Prepares the GEMMs of shapes `(M, N, K)` with weights stored as `weights` (the DiT calls
    /// it before it allocates a forward's workspace). The wgpu layer times its tensor-core
    /// kernel's tile configurations there once per adapter and shape class
    /// ([`crate::ops::linear::tune_linear`], cached on disk; `NABLA_TUNE=0` skips it); others
    /// have nothing to prepare.
    fn tune_gemms(&mut self, shapes: &[(usize, usize, usize)], weights: DType) -> Result<()> {
        let _ = (shapes, weights);
        Ok(())
    }
    /// Bytes of device memory in use now, where the layer can tell. The default derives it
    /// from [`Backend::memory_info`] as `total - free` (on CUDA that is the whole device's use:
    /// this process's context and allocations, and any other process's). The wgpu layer
    /// answers its allocator's live allocations instead ([`Gpu::memory_in_use`]: Vulkan and
    /// DX12; `None` elsewhere). The DiT allocates its workspace once and reuses it, so after a
    /// forward this is the forward's peak.
    fn memory_in_use(&self) -> Option<u64> {
        self.memory_info()
            .map(|(free, total)| total.saturating_sub(free))
    }
    /// The device's name, for messages.
    fn device_name(&self) -> String {
        "the GPU".into()
    }
    /// Uploads f32 data.
    fn upload(&mut self, data: &[f32], shape: &[usize]) -> Result<Self::T>;
    /// Overwrites an f32 tensor with host data (same element count), ordered before the ops
    /// recorded after this call.
    fn write(&mut self, t: &Self::T, data: &[f32]) -> Result<()>;
    /// Uploads a weight in a storage type (`F32`, `F16`, `BF16`), converting from f32.
    fn upload_weight(&mut self, data: &[f32], shape: &[usize], dtype: DType) -> Result<Self::T>;
    /// Runs everything recorded and reads a tensor back as f32.
    fn download(&mut self, t: &Self::T) -> Result<Vec<f32>>;
    /// Runs everything recorded so far.
    fn flush(&mut self) -> Result<()>;
    /// The same tensor seen with another shape.
    /// (A different element count returns the tensor unchanged: the next op's shape check then
    /// reports the mismatch.)
    fn reshape(&self, t: &Self::T, shape: &[usize]) -> Self::T;

    /// `out = act(x·Wᵀ + b)`. With bf16 weights a backend computes the reference's bf16
    /// autocast Linear (spec §2.10): the wgpu layer rounds x, the bias, the pre-activation and
    /// the activation's output to bf16 inside the GEMM ([`LinearRounding::Bf16`]).
    fn linear(
        &mut self,
        x: &Self::T,
        w: &Self::T,
        b: Option<&Self::T>,
        act: Activation,
        out: &Self::T,
    ) -> Result<()>;
    /// LayerNorm over the last axis (+ affine or modulation).
    fn layer_norm(
        &mut self,
        x: &Self::T,
        out: &Self::T,
        eps: f32,
        mode: Norm<'_, Self::T>,
    ) -> Result<()>;
    /// RMSNorm over the last axis times `weight`.
    fn rms_norm(&mut self, x: &Self::T, weight: &Self::T, out: &Self::T, eps: f32) -> Result<()>;
    /// `out = a + b` (b may have one row, broadcast over a's rows).
    fn add(&mut self, a: &Self::T, b: &Self::T, out: &Self::T) -> Result<()>;
    /// `x += y · gate[row]` (or `x += y`).
    fn gated_residual(
        &mut self,
        x: &Self::T,
        y: &Self::T,
        gate: Option<(&Self::T, u32)>,
    ) -> Result<()>;
    /// The linear layer `y = h·Wᵀ + b` followed by the gated residual `x += y · gate[row]` (or
    /// `x += y`): the DiT's self-attention output projection and FFN down projection.
    /// `scratch` has the shape of `x` and may receive `y`; after this call its contents are
    /// unspecified (a fusing backend leaves it untouched), so callers that read `y` afterwards
    /// must call [`Backend::linear`] and [`Backend::gated_residual`] themselves.
    ///
    /// The default does exactly that, through `scratch`. The wgpu layer can instead use the
    /// GEMM's gated-residual epilogue
    /// ([`crate::ops::linear::record_linear_gated_residual_rounded`]), which rounds each element
    /// as the two separate ops do, when [`WgpuBackend::set_fused_residual`] is on (it measured
    /// no faster on the H200, so the two ops are its default too).
    #[allow(clippy::too_many_arguments)]
    fn linear_gated_residual(
        &mut self,
        h: &Self::T,
        w: &Self::T,
        b: Option<&Self::T>,
        x: &Self::T,
        gate: Option<(&Self::T, u32)>,
        scratch: &Self::T,
    ) -> Result<()> {
        self.linear(h, w, b, Activation::None, scratch)?;
        self.gated_residual(x, scratch, gate)
    }
    /// `out = act(x)` for GELU-tanh or SiLU.
    fn activation(&mut self, x: &Self::T, act: Activation, out: &Self::T) -> Result<()>;
    /// 3-D RoPE in place on `[S, heads·D]` with per-token tables.
    fn rope(&mut self, x: &Self::T, cos: &Self::T, sin: &Self::T, heads: usize) -> Result<()>;
    /// The per-token RoPE tables of a grid (cached by the backend).
    fn rope_tables(
        &mut self,
        grid: (usize, usize, usize),
        head_dim: usize,
        fractal: bool,
    ) -> Result<(Self::T, Self::T)>;
    /// `[S, H·D] → [1, H, S, D]` (the output may be f16: rounded).
    fn split_heads(&mut self, x: &Self::T, out: &Self::T) -> Result<()>;
    /// RoPE of `x` `[S, heads·D]` (f32) written as heads `out` `[1, H, S, D]` (may be 16-bit:
    /// rounded). `x` may be left rotated or untouched. The default is [`Backend::rope`] in place
    /// then [`Backend::split_heads`]; a backend may fuse the two.
    fn rope_split_heads(
        &mut self,
        x: &Self::T,
        cos: &Self::T,
        sin: &Self::T,
        heads: usize,
        out: &Self::T,
    ) -> Result<()> {
        self.rope(x, cos, sin, heads)?;
        self.split_heads(x, out)
    }
    /// `[1, H, S, D] → [S, H·D]` (the input may be f16).
    fn merge_heads(&mut self, x: &Self::T, out: &Self::T) -> Result<()>;
    /// Natural ↔ fractal token order of `[S, C]`.
    fn fractal(
        &mut self,
        src: &Self::T,
        dst: &Self::T,
        grid: (usize, usize, usize),
        inverse: bool,
    ) -> Result<()>;
    /// `z [C, F, H, W] → tokens [S, 4C]`.
    fn patchify(&mut self, z: &Self::T, tokens: &Self::T) -> Result<()>;
    /// `out [S, 4C] → v [C, F, H, W]`.
    fn unpatchify(&mut self, out: &Self::T, v: &Self::T) -> Result<()>;

    /// Scratch for masks of `heads` heads, `grid` blocks, head dim `d`.
    fn mask_scratch(
        &mut self,
        heads: usize,
        grid: BlockGrid,
        d: usize,
    ) -> Result<Self::MaskScratch>;
    /// Estimates the block mask of `algo` from `q`, `k` `[1, H, S, D]` (fractal order).
    fn estimate_mask(
        &mut self,
        q: &Self::T,
        k: &Self::T,
        grid: BlockGrid,
        algo: &SparseAlgo,
        scratch: &Self::MaskScratch,
    ) -> Result<Self::M>;
    /// [`Backend::rope_split_heads`] that may also block-pool the rotated heads into `scratch`
    /// as the `side` operand of the next mask estimation (one pass over the heads instead of
    /// two). Returns whether it pooled: only then may [`Backend::estimate_mask_prepooled`]
    /// follow (after both sides). The default only rotates and splits (`false`).
    #[allow(clippy::too_many_arguments)]
    fn rope_split_heads_pooled(
        &mut self,
        x: &Self::T,
        cos: &Self::T,
        sin: &Self::T,
        heads: usize,
        out: &Self::T,
        scratch: &Self::MaskScratch,
        side: QkSide,
    ) -> Result<bool> {
        let _ = (scratch, side);
        self.rope_split_heads(x, cos, sin, heads, out)?;
        Ok(false)
    }
    /// The mask of `algo` from the q and k that [`Backend::rope_split_heads_pooled`] pooled into
    /// `scratch` (it returned `true` for both). The default fails: a layer that pools must
    /// implement it.
    fn estimate_mask_prepooled(
        &mut self,
        grid: BlockGrid,
        algo: &SparseAlgo,
        scratch: &Self::MaskScratch,
    ) -> Result<Self::M> {
        let _ = (grid, scratch);
        Err(Error::Invalid(format!(
            "mask {algo} from pooled q/k: this device layer does not pool in \
             rope_split_heads_pooled; use estimate_mask"
        )))
    }
    /// The dense `[heads, Nb, Nb]` 0/1 form of a mask (for inspection).
    fn mask_dense(&mut self, m: &Self::M) -> Result<Vec<u8>>;
    /// The fraction of blocks a mask lists (reads back only its per-row counts).
    fn mask_density(&mut self, m: &Self::M) -> Result<f64>;
    /// Attention of `q` `[1, H, Sq, D]` over `k`, `v` `[1, H, Skv, D]` (dense or block-sparse).
    fn attention(
        &mut self,
        q: &Self::T,
        k: &Self::T,
        v: &Self::T,
        mask: &Mask<Self::M>,
        out: &Self::T,
    ) -> Result<()>;
}

/// The wgpu implementation: records every op into one [`Batch`] until a flush.
pub struct WgpuBackend<'g> {
    gpu: &'g Gpu,
    batch: Option<Batch<'g>>,
    fuse_residual: bool,
    bf16_autocast: bool,
    f16_activations: Option<bool>,
    frag_weights: bool,
    /// Whether bf16 weights were uploaded in fragment order (f16 storage of bf16 values: the
    /// bf16-autocast rounding still belongs to them).
    frag_bf16: bool,
}

impl<'g> WgpuBackend<'g> {
    /// A backend on `gpu`. [`Backend::linear_gated_residual`] runs as two ops unless
    /// `NABLA_FUSED_RESIDUAL=1` (see [`WgpuBackend::set_fused_residual`]); the bf16-autocast
    /// rounding of the GEMMs is off unless `NABLA_BF16_AUTOCAST=1`
    /// (see [`WgpuBackend::set_bf16_autocast`]); GEMM-only activations are f16 where the
    /// tensor-core GEMM runs, or as `NABLA_F16_ACTIVATIONS=1` / `0` forces (see
    /// [`WgpuBackend::set_f16_activations`]); 16-bit weights are uploaded in fragment order
    /// where the adapter runs that kernel, unless `NABLA_FRAG_WEIGHTS=0` (see
    /// [`WgpuBackend::set_frag_weights`]).
    pub fn new(gpu: &'g Gpu) -> Self {
        let on = |var: &str| std::env::var(var).is_ok_and(|v| v == "1");
        let f16_activations = match std::env::var("NABLA_F16_ACTIVATIONS").as_deref() {
            Ok("1") => Some(true),
            Ok("0") => Some(false),
            _ => None,
        };
        WgpuBackend {
            gpu,
            batch: None,
            fuse_residual: on("NABLA_FUSED_RESIDUAL"),
            bf16_autocast: on("NABLA_BF16_AUTOCAST"),
            f16_activations,
            frag_weights: std::env::var("NABLA_FRAG_WEIGHTS").map_or(true, |v| v != "0")
                && crate::ops::linear::frag_weights_usable(gpu),
            frag_bf16: false,
        }
    }

    /// Whether 16-bit linear weights (f16, bf16) with in_features a multiple of 32 are uploaded
    /// as f16 in fragment order ([`Gpu::upload_f16_frag`]), where the tensor-core GEMM builds
    /// W's fragments from storage instead of staging W through workgroup memory (+9-16 % on the
    /// H200's DiT shapes, benches/RESULTS.md session 23). The products are unchanged: that
    /// kernel rounds every weight to f16 anyway (bf16 weights are rounded to bf16 first, then
    /// to f16, exactly as it stages them). On by default where
    /// [`crate::ops::linear::frag_weights_usable`], for weights uploaded without the bf16-autocast
    /// rounding (turned on later, it still applies to bf16 weights stored this way); turning it
    /// on elsewhere has no effect. The tile configuration is the default one or the one tuned
    /// for f16 weights of the shape.
    pub fn set_frag_weights(&mut self, on: bool) {
        self.frag_weights = on && crate::ops::linear::frag_weights_usable(self.gpu);
    }

    /// Whether the activations that only feed block / text GEMMs (LayerNorm outputs, merged
    /// attention heads, FFN and text hidden: [`Backend::gemm_input_dtype`]) are stored as f16.
    /// `None` (the default) is the automatic rule: f16 where the adapter has `SHADER_F16` and
    /// the GEMM for those weights runs on tensor cores
    /// ([`crate::ops::linear::auto_uses_coop`]), which round x to f16 anyway, so the results are
    /// the same bit for bit and the GEMM loads half the bytes of x. `Some(true)` asks for f16
    /// wherever it can work (`SHADER_F16`, 16-bit weights): on the portable kernel that rounds
    /// x to f16, where it computed on f32 before (tests of the f16 path on software drivers).
    /// `Some(false)` keeps f32 (the A/B baseline). With the bf16 autocast on, bf16-weight GEMMs
    /// always take f32 x (its rounding of x to bf16 must see the f32 value). A
    /// [`super::Dit`] reallocates its workspace when this answer changes between forwards.
    pub fn set_f16_activations(&mut self, on: Option<bool>) {
        self.f16_activations = on;
    }

    /// Whether GEMMs with bf16 weights round as the reference's bf16 autocast (spec §2.10):
    /// x, the bias, the pre-activation and the activation's output rounded to bf16 inside the
    /// linear kernel ([`LinearRounding::Bf16`], a compile-time variant of the kernel); f32 and
    /// f16 weights are never rounded. Off by default until its speed on the tensor-core kernel
    /// is measured (a first form, a runtime flag, cost 2.8x: benches/RESULTS.md session 3).
    pub fn set_bf16_autocast(&mut self, on: bool) {
        self.bf16_autocast = on;
    }

    /// Whether a linear weight stored as `dtype` with in_features `k` is uploaded in fragment
    /// order (see [`WgpuBackend::set_frag_weights`]).
    fn stores_frag(&self, dtype: DType, k: usize) -> bool {
        self.frag_weights
            && !self.bf16_autocast
            && matches!(dtype, DType::F16 | DType::BF16)
            && k.is_multiple_of(32)
    }

    /// The rounding of a GEMM with weights `w` (see [`WgpuBackend::set_bf16_autocast`]).
    fn rounding(&self, w: &Tensor) -> LinearRounding {
        let frag_bf16 = self.frag_bf16 && w.k_order() == crate::gpu::KOrder::Frag32;
        self.rounding_for(if frag_bf16 { DType::BF16 } else { w.dtype() })
    }

    /// The rounding of a GEMM with weights stored as `weights`.
    fn rounding_for(&self, weights: DType) -> LinearRounding {
        if self.bf16_autocast && weights == DType::BF16 {
            LinearRounding::Bf16
        } else {
            LinearRounding::None
        }
    }

    /// Whether the DiT's output projections and FFN down projection use the GEMM's fused
    /// gated-residual epilogue (one pass, no `y` round trip) instead of a GEMM and then the
    /// elementwise residual. Both round every element alike. Off by default: on the H200 the
    /// fused form measured no faster (1.3B forward 2 741 vs 2 713 ms in one call,
    /// benches/RESULTS.md session 3).
    pub fn set_fused_residual(&mut self, on: bool) {
        self.fuse_residual = on;
    }

    /// The GPU.
    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    fn b(&mut self) -> &mut Batch<'g> {
        let gpu = self.gpu;
        self.batch.get_or_insert_with(|| gpu.batch())
    }
}

/// A mask of the wgpu layer: the lists in the layer's scratch (rewritten by the next estimate)
/// or the cached STA lists.
pub struct WgpuMask(Arc<BlockMask>);

/// Mask scratch of the wgpu layer: pooled Q/K, block map and the output lists, allocated once.
pub struct WgpuMaskScratch {
    stages: MaskStages,
    lists: Arc<BlockMask>,
}

impl WgpuMaskScratch {
    /// The intermediates of the last estimate: pooled q/k (written by
    /// [`Backend::rope_split_heads_pooled`] or [`Backend::estimate_mask`]) and the block map
    /// (its logits, unless [`WgpuMaskScratch::keep_probs`] asked for the probabilities).
    pub fn stages(&self) -> &MaskStages {
        &self.stages
    }

    /// Whether the estimates write the block map's probabilities into
    /// [`MaskStages::probs`] for inspection (off by default: the forward never reads them).
    pub fn keep_probs(&mut self, keep: bool) {
        self.stages.keep_probs = keep;
    }
}

impl<'g> Backend for WgpuBackend<'g> {
    type T = Tensor;
    type M = WgpuMask;
    type MaskScratch = WgpuMaskScratch;

    fn device_name(&self) -> String {
        self.gpu.caps().name.clone()
    }
    fn gemm_input_dtype(&self, weights: DType) -> DType {
        // f16 needs the shader feature, 16-bit weights (the parity path stays f32) and no
        // bf16-autocast rounding of x; then the automatic rule or the override decides
        let possible = self.gpu.caps().f16
            && weights != DType::F32
            && self.rounding_for(weights) == LinearRounding::None;
        let wanted = self
            .f16_activations
            .unwrap_or_else(|| crate::ops::linear::auto_uses_coop(self.gpu, weights));
        if possible && wanted {
            DType::F16
        } else {
            DType::F32
        }
    }
    fn memory_in_use(&self) -> Option<u64> {
        self.gpu.memory_in_use()
    }
    fn memory_info(&self) -> Option<(u64, u64)> {
        self.gpu.memory_info()
    }
    fn tune_gemms(&mut self, shapes: &[(usize, usize, usize)], weights: DType) -> Result<()> {
        if std::env::var("NABLA_TUNE").is_ok_and(|v| v == "0")
            || !crate::ops::linear::auto_uses_coop(self.gpu, weights)
        {
            return Ok(());
        }
        let x = self.gemm_input_dtype(weights);
        // the timing needs x, W and y of each shape at once: skip it (defaults stay) where
        // that would not fit next to what is already allocated
        let need = shapes
            .iter()
            .map(|&(m, n, k)| (m * k * x.size() as usize + n * k * 2 + m * n * 4) as u64)
            .max()
            .unwrap_or(0);
        if self
            .gpu
            .memory_info()
            .is_some_and(|(free, _)| need * 2 > free)
        {
            return Ok(());
        }
        // tuning only picks among equivalent kernels: where it cannot run (an allocation the
        // driver refuses on a backend without a memory query, a timing failure), the forward
        // goes on with the default configuration
        // weights stored in fragment order run a kernel the tuner does not time (it runs the
        // default tiles, or those tuned for natural f16 weights): tune only the shapes whose
        // weights stay staged
        let staged: Vec<_> = shapes
            .iter()
            .copied()
            .filter(|&(_, _, k)| !self.stores_frag(weights, k))
            .collect();
        let _ = crate::ops::linear::tune_linear(self.gpu, &staged, weights, x, false);
        Ok(())
    }
    fn alloc(&mut self, shape: &[usize]) -> Result<Tensor> {
        self.gpu.empty(shape, DType::F32)
    }
    fn alloc_as(&mut self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.gpu.empty(shape, dtype)
    }
    fn has_f16(&self) -> bool {
        self.gpu.caps().f16
    }
    fn upload(&mut self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        self.gpu.upload_f32(data, shape)
    }
    fn write(&mut self, t: &Tensor, data: &[f32]) -> Result<()> {
        if t.dtype() != DType::F32 || t.numel() != data.len() {
            return Err(crate::Error::shape(format!(
                "write of {} values into a {:?} {:?} tensor",
                data.len(),
                t.shape(),
                t.dtype()
            )));
        }
        // queue writes land before the next submission: submit what was recorded first
        self.flush()?;
        self.gpu
            .write_buffer(t.buffer(), 0, bytemuck::cast_slice(data))?;
        Ok(())
    }
    fn upload_weight(&mut self, data: &[f32], shape: &[usize], dtype: DType) -> Result<Tensor> {
        if matches!(shape, [_, k] if self.stores_frag(dtype, *k)) {
            return if dtype == DType::BF16 {
                self.frag_bf16 = true;
                self.gpu.upload_bf16_frag(data, shape)
            } else {
                self.gpu.upload_f16_frag(data, shape)
            };
        }
        match dtype {
            DType::F16 => self.gpu.upload_f16(data, shape),
            DType::BF16 => self.gpu.upload_bf16(data, shape),
            _ => self.gpu.upload_f32(data, shape),
        }
    }
    fn download(&mut self, t: &Tensor) -> Result<Vec<f32>> {
        self.flush()?;
        self.gpu.read_f32(t)
    }
    fn flush(&mut self) -> Result<()> {
        match self.batch.take() {
            Some(b) => b.submit(),
            None => Ok(()),
        }
    }
    fn reshape(&self, t: &Tensor, shape: &[usize]) -> Tensor {
        t.reshape(shape).unwrap_or_else(|| t.clone())
    }
    fn linear(
        &mut self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        act: Activation,
        out: &Tensor,
    ) -> Result<()> {
        let (kernel, rounding) = (LinearKernel::Auto, self.rounding(w));
        crate::ops::linear::record_linear_rounded(self.b(), x, w, b, act, out, kernel, rounding)
    }
    fn layer_norm(
        &mut self,
        x: &Tensor,
        out: &Tensor,
        eps: f32,
        mode: Norm<'_, Tensor>,
    ) -> Result<()> {
        use crate::ops::norm::NormMode;
        let m = match mode {
            Norm::Plain => NormMode::Plain,
            Norm::Affine(weight, bias) => NormMode::Affine { weight, bias },
            Norm::Modulate { mods, shift, scale } => NormMode::Modulate {
                mods,
                shift_row: shift,
                scale_row: scale,
            },
        };
        crate::ops::norm::record_layer_norm(self.b(), x, out, eps, &m)
    }
    fn rms_norm(&mut self, x: &Tensor, weight: &Tensor, out: &Tensor, eps: f32) -> Result<()> {
        crate::ops::norm::record_rms_norm(self.b(), x, weight, out, eps)
    }
    fn add(&mut self, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<()> {
        crate::ops::elementwise::record_add(self.b(), a, b, out)
    }
    fn gated_residual(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        gate: Option<(&Tensor, u32)>,
    ) -> Result<()> {
        crate::ops::elementwise::record_gated_residual(self.b(), x, y, gate)
    }
    fn linear_gated_residual(
        &mut self,
        h: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        x: &Tensor,
        gate: Option<(&Tensor, u32)>,
        scratch: &Tensor,
    ) -> Result<()> {
        if self.fuse_residual {
            let (kernel, rounding) = (LinearKernel::Auto, self.rounding(w));
            return crate::ops::linear::record_linear_gated_residual_rounded(
                self.b(),
                h,
                w,
                b,
                x,
                gate,
                x,
                kernel,
                rounding,
            );
        }
        self.linear(h, w, b, Activation::None, scratch)?;
        self.gated_residual(x, scratch, gate)
    }
    fn activation(&mut self, x: &Tensor, act: Activation, out: &Tensor) -> Result<()> {
        match act {
            Activation::GeluTanh => crate::ops::elementwise::record_gelu_tanh(self.b(), x, out),
            Activation::Silu => crate::ops::elementwise::record_silu(self.b(), x, out),
            Activation::None => Err(crate::Error::Invalid("activation None is not an op".into())),
        }
    }
    fn rope(&mut self, x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<()> {
        crate::ops::rope::record_rope(self.b(), x, cos, sin, heads)
    }
    fn rope_tables(
        &mut self,
        grid: (usize, usize, usize),
        head_dim: usize,
        fractal: bool,
    ) -> Result<(Tensor, Tensor)> {
        crate::ops::rope::upload_rope_tables(self.gpu, grid, head_dim, fractal)
    }
    fn split_heads(&mut self, x: &Tensor, out: &Tensor) -> Result<()> {
        crate::ops::elementwise::record_split_heads(self.b(), x, out)
    }
    fn rope_split_heads(
        &mut self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        heads: usize,
        out: &Tensor,
    ) -> Result<()> {
        // one pass (RoPE + split, nabla/rope_pool.wgsl without its pooling) where it applies:
        // f32 x and D a multiple of 4 up to 512; else RoPE in place, then the split
        let d = out.shape().last().copied().unwrap_or(0);
        if x.dtype() == DType::F32 && d % 4 == 0 && d > 0 && d <= 512 && out.shape().len() >= 3 {
            let h = out.shape()[out.shape().len() - 3];
            if h == heads {
                return crate::nabla::record_rope_split_heads(self.b(), x, cos, sin, out);
            }
        }
        self.rope(x, cos, sin, heads)?;
        self.split_heads(x, out)
    }
    fn merge_heads(&mut self, x: &Tensor, out: &Tensor) -> Result<()> {
        crate::ops::elementwise::record_merge_heads(self.b(), x, out)
    }
    fn fractal(
        &mut self,
        src: &Tensor,
        dst: &Tensor,
        grid: (usize, usize, usize),
        inverse: bool,
    ) -> Result<()> {
        crate::nabla::record_fractal(self.b(), src, dst, grid, inverse)
    }
    fn patchify(&mut self, z: &Tensor, tokens: &Tensor) -> Result<()> {
        crate::ops::patch::record_patchify(self.b(), z, tokens)
    }
    fn unpatchify(&mut self, out: &Tensor, v: &Tensor) -> Result<()> {
        crate::ops::patch::record_unpatchify(self.b(), out, v)
    }
    fn mask_scratch(&mut self, heads: usize, grid: BlockGrid, d: usize) -> Result<WgpuMaskScratch> {
        let mut stages = MaskStages::alloc(self.gpu, heads, grid.blocks(), d)?;
        stages.keep_probs = false;
        Ok(WgpuMaskScratch {
            stages,
            lists: Arc::new(BlockMask::alloc(self.gpu, heads, grid.blocks())?),
        })
    }
    fn estimate_mask(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        grid: BlockGrid,
        algo: &SparseAlgo,
        scratch: &WgpuMaskScratch,
    ) -> Result<WgpuMask> {
        if let SparseAlgo::Sta(w) = algo {
            return Ok(WgpuMask(BlockMask::sta(self.gpu, grid, *w)?));
        }
        crate::nabla::record_estimate_mask(
            self.b(),
            q,
            k,
            grid,
            algo,
            &scratch.stages,
            &scratch.lists,
        )?;
        Ok(WgpuMask(scratch.lists.clone()))
    }
    /// Rotates, splits and block-pools in one kernel
    /// ([`crate::nabla::record_rope_split_heads_pooled`]): the heads are bit-identical to
    /// [`Backend::rope_split_heads`]'s (`x` is left untouched instead of rotated), the pooled
    /// rows land in the scratch's pooled q or k. Always pools (`true`); errors where the mask
    /// estimation would refuse the shape (S not a multiple of 64, head dim not a multiple of 16)
    /// or the scratch serves another shape.
    fn rope_split_heads_pooled(
        &mut self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        heads: usize,
        out: &Tensor,
        scratch: &WgpuMaskScratch,
        side: QkSide,
    ) -> Result<bool> {
        let h = match *out.shape() {
            [h, _, _] | [1, h, _, _] => h,
            _ => 0,
        };
        if h != heads {
            return Err(Error::shape(format!(
                "rope_split_heads_pooled: {heads} heads asked, the output {:?} has {h}",
                out.shape()
            )));
        }
        crate::nabla::record_rope_split_heads_pooled(
            self.b(),
            x,
            cos,
            sin,
            out,
            &scratch.stages,
            side,
        )?;
        Ok(true)
    }
    /// Scores, softmax, threshold (∪ STA) and lists from the pooled q/k in the scratch
    /// ([`crate::nabla::record_mask_from_pooled`]), into the scratch's lists like
    /// [`Backend::estimate_mask`]; STA-only algorithms return the cached STA mask.
    fn estimate_mask_prepooled(
        &mut self,
        grid: BlockGrid,
        algo: &SparseAlgo,
        scratch: &WgpuMaskScratch,
    ) -> Result<WgpuMask> {
        if let SparseAlgo::Sta(w) = algo {
            return Ok(WgpuMask(BlockMask::sta(self.gpu, grid, *w)?));
        }
        crate::nabla::record_mask_from_pooled(
            self.b(),
            grid,
            algo,
            &scratch.stages,
            &scratch.lists,
        )?;
        Ok(WgpuMask(scratch.lists.clone()))
    }
    fn mask_dense(&mut self, m: &WgpuMask) -> Result<Vec<u8>> {
        self.flush()?;
        m.0.to_dense(self.gpu)
    }
    fn mask_density(&mut self, m: &WgpuMask) -> Result<f64> {
        self.flush()?;
        m.0.density(self.gpu)
    }
    fn attention(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Mask<WgpuMask>,
        out: &Tensor,
    ) -> Result<()> {
        match mask {
            Mask::Dense => crate::attention::record_dense_attention(self.b(), q, k, v, out),
            Mask::Sparse(m) => crate::attention::record_attention(self.b(), q, k, v, &m.0, out),
        }
    }
}
