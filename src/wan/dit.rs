//! The Wan 2.1 DiT forward pass (spec §2), written once against [`Backend`]: dense attention or
//! NABLA / STA / NABLA+STA block-sparse self-attention, the whole transformer in fractal order
//! when sparse (spec §4.2–4.4), masks recomputed in every layer as the reference does.
//!
//! Precision, by path:
//!
//! | op | parity path (`WeightPrecision::F32`) | fast path (`BF16` / `F16` weights), wgpu | fast path, CUDA |
//! |---|---|---|---|
//! | sinusoid | f64 on the CPU | same | same |
//! | time MLP, head, patch embedding | f32 weights, f32 math | same | same |
//! | block / text GEMMs | f32 weights, f32 math | 16-bit weights, f32 accumulation; tensor cores (operands converted to f16) where the adapter has them, else f32 math. With bf16 autocast on (`WgpuBackend::set_bf16_autocast`, `NABLA_BF16_AUTOCAST=1`; off by default) and bf16 weights: the reference's bf16 autocast Linear inside the kernel (`LinearRounding::Bf16`): x and the bias rounded to bf16 (bf16 → f16 for the tensor cores is exact for 2⁻¹⁴ ≤ \|x\| ≤ 65504); f16 weights: no rounding beyond the tensor cores' f16 x | cuBLASLt, 16-bit operands, f32 accumulation |
//! | GEMM-only activations: LN outputs (norm1/2/3), merged attention heads, FFN and text hidden, text embedding | f32 | where the GEMM runs on tensor cores (`Backend::gemm_input_dtype`: SHADER_F16 and cooperative matrices): stored f16, rounded once from f32 (nearest even) by the LayerNorm, the head merge or the GEMM epilogue that writes them — the values the tensor cores took before, when the GEMM rounded f32 x to f16 as it staged it, so every GEMM result is the same bit for bit and x's loads move half the bytes. Else stored f32 (the portable kernel's f32 math; `WgpuBackend::set_f16_activations` / `NABLA_F16_ACTIVATIONS=1` forces f16 there too). Autocast and bf16 weights: always f32, each element rounded to bf16 as the GEMM loads it (the same values the CUDA layer stores) | stored in the weights' type (bf16 / f16), rounded once from f32 (Backend::gemm_input_dtype), as the reference's bf16 autocast |
//! | FFN / text GELU | f32 | f32, in the GEMM epilogue (its output stored f16 with the f16 activations above: rounded once); autocast and bf16 weights, in the GEMM epilogue: `acc + bf16(b)` rounded to bf16, GELU-tanh in f32 on it, the output rounded to bf16 (stored f32) | cuBLASLt's bias epilogue writes the 16-bit pre-activation (measured on the H200: the product is rounded to 16 bits, the bias rounded to 16 bits is added, the sum rounded again), then our GELU-tanh kernel, rounded to 16 bits |
//! | q/k/v/o, FFN-down and text-out GEMM outputs | f32 | f32; autocast and bf16 weights: `acc + bf16(b)` rounded to bf16 (stored f32; o / FFN-down: that bf16 value enters `x + gate·v`, in f32) | f32 |
//! | norms, modulation, gates, residual stream | f32 | f32 | f32 |
//! | RoPE | f64 angles, f32 rotation | same | same, fused with the head split (one rounding to f16) |
//! | self/cross-attention | f32 q/k/v, f32 softmax/accumulation | q/k/v stored f16 (tensor cores where available), f32 softmax/accumulation | same |
//! | NABLA mask (pool, scores, softmax, CDF) | f32 (block scores on tensor cores where the adapter has them: each f32 operand split into two f16 parts, three products, f32 accumulation, ≈ f32) | f32 math on f16 q/k (scores as in the parity path) | same |
//!
//! The parity path matches the golden reference to ~1e-5; the fast paths to ~3e-3 relative L2
//! (~5e-3 on wgpu with the bf16 autocast on: the reference itself runs in bf16, the golden is
//! f32). On the CUDA fast path the GEMM inputs are exactly the values the GEMM used before (x
//! was rounded to the weights' type inside the linear); the only
//! new rounding is the FFN / text hidden's rounding before the GELU (≤ 1 bf16 ulp, 2⁻⁹ relative,
//! on the GELU input, which is what the reference does too), so the expected error vs the f32
//! golden stays ~3e-3 relative L2 (bound in tests/cuda.rs: 1e-2; the golden fast-path tests
//! passed on the H200).
//!
//! With the bf16 autocast on, the wgpu fast path with bf16 weights computes what the
//! reference's bf16 autocast computes (spec §2.10) inside the linear kernels, with no extra
//! pass over memory: the GEMM inputs are
//! those of the CUDA fast path, and every bf16-weight Linear's output (and GELU output) is a
//! bf16 value, as in the reference (the CUDA layer keeps the non-GELU GEMM outputs in f32).
//! Against the f32 golden this moves the output away, as expected of the reference's own
//! roundings: relative L2 of `out_dense` 3.0e-3 / 2.8e-3 before, 5.2e-3 / 4.9e-3 after
//! (`wan_dit_tiny` / `wan_dit_tiny_b`, lavapipe, portable kernel; bound in tests/golden.rs: 1e-2).
//! f16 weights keep the unrounded f32 path. The autocast is off by default until its speed on
//! the tensor-core GEMM is measured (a first, runtime-flag form cost 2.8x on the H200).
//!
//! The wgpu fast path's f16 GEMM-only activations change nothing but bytes where they are used:
//! on tensor cores, whose GEMM rounded its f32 x to f16 (nearest even) when staging it; the
//! producers now round the same f32 values the same way before storing them. Two places see
//! the difference: a GEMM of fewer than 64 rows (a latent of fewer than 64 tokens) runs on the
//! portable kernel, which then computes on the f16 values; and a trace reads `context_emb` as
//! f16 values. Forced onto the portable kernels (lavapipe), the f16 activations move
//! `out_dense` of the tiny golden models by 5.1e-4..5.5e-4 relative L2, and its error against
//! the f32 golden from 3.03e-3 / 2.76e-3 to 3.08e-3 / 2.77e-3 with bf16 weights (`wan_dit_tiny`
//! / `wan_dit_tiny_b`; 6.2e-4 / 5.7e-4 with f16 weights; bound in tests/golden.rs: the fast
//! path's 1e-2).

use super::backend::{Backend, Mask, Norm};
use super::{Checkpoint, WanConfig};
use crate::error::{Error, Result};
use crate::gpu::DType;
use crate::nabla::{BlockGrid, QkSide, SparseAlgo};
use crate::ops::linear::Activation;
use crate::ops::rope::sinusoidal_embedding;
use std::collections::BTreeMap;

/// Storage type of the big weights on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightPrecision {
    /// f32 (the parity path).
    F32,
    /// bf16, rounded to nearest even at load (half the memory; what the reference computes with).
    BF16,
    /// f16 (needs SHADER_F16).
    F16,
}

impl WeightPrecision {
    fn dtype(self) -> DType {
        match self {
            WeightPrecision::F32 => DType::F32,
            WeightPrecision::BF16 => DType::BF16,
            WeightPrecision::F16 => DType::F16,
        }
    }
}

struct Linear<T> {
    w: T,
    b: T,
}

impl<T> Linear<T> {
    /// Records `out = act(x·Wᵀ + b)`.
    fn run<B: Backend<T = T>>(&self, be: &mut B, x: &T, act: Activation, out: &T) -> Result<()> {
        be.linear(x, &self.w, Some(&self.b), act, out)
    }

    /// Records `y = x·Wᵀ + b` then `res += y · gate[row]` (or `res += y`), fused where the
    /// backend can (`scratch` then stays untouched; its contents are unspecified either way).
    fn run_gated_residual<B: Backend<T = T>>(
        &self,
        be: &mut B,
        x: &T,
        res: &T,
        gate: Option<(&T, u32)>,
        scratch: &T,
    ) -> Result<()> {
        be.linear_gated_residual(x, &self.w, Some(&self.b), res, gate, scratch)
    }
}

struct BlockWeights<T> {
    modulation: T,
    sa: [Linear<T>; 4],
    sa_norm_q: T,
    sa_norm_k: T,
    norm3_w: T,
    norm3_b: T,
    ca: [Linear<T>; 4],
    ca_norm_q: T,
    ca_norm_k: T,
    ffn0: Linear<T>,
    ffn2: Linear<T>,
}

struct Weights<T> {
    patch: Linear<T>,
    text0: Linear<T>,
    text2: Linear<T>,
    time0: Linear<T>,
    time2: Linear<T>,
    proj: Linear<T>,
    head_mod: T,
    head: Linear<T>,
    blocks: Vec<BlockWeights<T>>,
}

/// Intermediate tensors of one forward, read back for inspection and parity tests.
#[derive(Default, Debug)]
pub struct Trace {
    /// Named f32 tensors (`time_sinusoid`, `e`, `e0`, `context_emb`, `patch_embed_out`,
    /// `block0_self_attn_out`, `block0_cross_attn_out`, `block0_ffn_out`, `block0_out`,
    /// `last_block_out`, `head_out`), each in the token order the model ran in except `head_out`
    /// and `patch_embed_out`, which are in natural order.
    pub tensors: BTreeMap<String, Vec<f32>>,
    /// Block masks per layer (`layer{l}`), dense `[heads, Nb, Nb]` 0/1.
    pub masks: BTreeMap<String, Vec<u8>>,
    /// Mask density per layer (`layer{l}`): listed blocks over all blocks of all mask heads.
    pub densities: BTreeMap<String, f64>,
    /// Collect only [`Trace::densities`] (a count read-back per layer), no tensors or dense
    /// masks: cheap enough for benchmarks of the real shapes.
    pub densities_only: bool,
}

impl Trace {
    /// A trace that records only the mask density of every layer.
    pub fn densities_only() -> Trace {
        Trace {
            densities_only: true,
            ..Trace::default()
        }
    }

    /// The mean of the per-layer densities (`None` without sparse layers).
    pub fn mean_density(&self) -> Option<f64> {
        (!self.densities.is_empty())
            .then(|| self.densities.values().sum::<f64>() / self.densities.len() as f64)
    }
}

/// The inputs of one DiT forward.
#[derive(Clone, Copy, Debug)]
pub struct DitInput<'a> {
    /// Noisy latent `[in_dim, F, H, W]` (f32, row-major).
    pub latent: &'a [f32],
    /// `(F, H, W)` of the latent (H and W even; multiples of 16 for sparse attention).
    pub shape: (usize, usize, usize),
    /// The timestep as the scheduler gives it (integer-valued, 0..1000).
    pub t: f64,
    /// Text context `[L, text_dim]`, `L ≤ text_len`; padded with zero rows, which are attended
    /// as the reference does.
    pub context: &'a [f32],
}

/// Activations of one input shape, allocated once and reused by every forward of that shape.
struct Workspace<B: Backend> {
    key: (usize, usize, usize, bool),
    /// Storage of the GEMM-only activations (`a`, `o`, `hidden`, `ctxh`, `ctx`): the backend's
    /// [`Backend::gemm_input_dtype`] when allocated (a change reallocates).
    gdt: DType,
    x: B::T,
    x2: B::T,
    a: B::T,
    q: B::T,
    k: B::T,
    v: B::T,
    qh: B::T,
    kh: B::T,
    vh: B::T,
    oh: B::T,
    o: B::T,
    y: B::T,
    hidden: B::T,
    ctx0: B::T,
    ctx1: B::T,
    ctxh: B::T,
    sinus: B::T,
    z: B::T,
    ctx: B::T,
    kc: B::T,
    vc: B::T,
    kch: B::T,
    vch: B::T,
    t1: B::T,
    e: B::T,
    se: B::T,
    e0: B::T,
    mods: B::T,
    hmods: B::T,
    tokens: B::T,
    head_out: B::T,
    head_nat: B::T,
    out: B::T,
    scratch: Option<B::MaskScratch>,
}

/// The Wan 2.1 text-to-video transformer on a backend.
pub struct Dit<B: Backend> {
    cfg: WanConfig,
    precision: WeightPrecision,
    w: Weights<B::T>,
    ws: Option<Workspace<B>>,
    weight_bytes: u64,
}

/// Where the weights come from: a checkpoint, or random values of the real shapes.
pub trait WeightSource {
    /// The tensor `name` (official key) as f32 with its shape.
    fn get(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)>;
}

impl WeightSource for Checkpoint {
    fn get(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (_, shape, _) = self.raw(name)?;
        Ok((self.f32(name)?, shape))
    }
}

/// Random weights of a configuration's real shapes (benchmarks without a download): weights
/// ~ N(0, 1/fan_in), norms ~ 1, biases and modulation small; deterministic per seed.
pub struct RandomWeights {
    shapes: std::collections::HashMap<String, Vec<usize>>,
    seed: u64,
    init: RandomInit,
}

/// How [`RandomWeights`] draws its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RandomInit {
    /// Normal weights of standard deviation 1/√fan_in, norm scales 1 ± 0.1, biases and
    /// modulation non-zero: every tensor takes part (nabla's own benchmarks and demos).
    #[default]
    Synthetic,
    /// The reference's own `WanModel.init_weights()`, as a freshly built model of the fork has
    /// it: Xavier-uniform linears with zero biases, normal(0.02) text and time embeddings,
    /// Xavier-uniform patch embedding (its bias as PyTorch's Conv3d default), norm scales 1,
    /// modulation N(0, 1/dim), a zero output head.
    Wan,
}

impl std::str::FromStr for RandomInit {
    type Err = Error;
    fn from_str(s: &str) -> Result<RandomInit> {
        match s {
            "synthetic" => Ok(RandomInit::Synthetic),
            "wan" => Ok(RandomInit::Wan),
            o => Err(Error::Invalid(format!(
                "random weight init {o:?}: use synthetic (nabla's) or wan (the reference's init_weights)"
            ))),
        }
    }
}

impl RandomWeights {
    /// Random weights for `cfg` ([`RandomInit::Synthetic`]).
    pub fn new(cfg: &WanConfig, seed: u64) -> RandomWeights {
        RandomWeights::with_init(cfg, seed, RandomInit::Synthetic)
    }

    /// Random weights for `cfg`, drawn as `init` says.
    pub fn with_init(cfg: &WanConfig, seed: u64, init: RandomInit) -> RandomWeights {
        RandomWeights {
            shapes: super::expected_tensors(cfg).into_iter().collect(),
            seed,
            init,
        }
    }

    /// Synthetic init: (standard deviation, mean) of a normal draw.
    fn synthetic(name: &str, shape: &[usize]) -> (f32, f32) {
        if name.contains("norm") {
            (0.1, 1.0)
        } else if name.ends_with("modulation") {
            (0.1, 0.0)
        } else if name.ends_with("bias") {
            (0.02, 0.0)
        } else {
            let fan_in: usize = shape[1..].iter().product();
            (1.0 / (fan_in.max(1) as f32).sqrt(), 0.0)
        }
    }

    /// `WanModel.init_weights()` (and the constructors' defaults it leaves alone).
    fn wan(&self, name: &str, shape: &[usize], n: usize, salt: u64) -> Vec<f32> {
        let fans = |s: &[usize]| (s[1..].iter().product::<usize>().max(1), s[0].max(1));
        let xavier = |s: &[usize]| {
            let (fan_in, fan_out) = fans(s);
            crate::synth::uniform(salt, n, (6.0 / (fan_in + fan_out) as f32).sqrt())
        };
        if name.ends_with("modulation") {
            let dim = *shape.last().unwrap_or(&1);
            crate::synth::noise(salt, n, 1.0 / (dim.max(1) as f32).sqrt())
        } else if name.contains("norm") {
            vec![if name.ends_with("weight") { 1.0 } else { 0.0 }; n]
        } else if name == "patch_embedding.bias" {
            // nn.Conv3d's default bias: U(±1/√fan_in); init_weights leaves it
            let fan_in = self
                .shapes
                .get("patch_embedding.weight")
                .map_or(1, |w| fans(w).0);
            crate::synth::uniform(salt, n, 1.0 / (fan_in as f32).sqrt())
        } else if name.ends_with("bias") || name == "head.head.weight" {
            vec![0.0; n]
        } else if name.starts_with("text_embedding.") || name.starts_with("time_embedding.") {
            crate::synth::noise(salt, n, 0.02)
        } else {
            xavier(shape)
        }
    }
}

impl WeightSource for RandomWeights {
    fn get(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let shape = self
            .shapes
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("no tensor {name:?} in this configuration")))?
            .clone();
        let n: usize = shape.iter().product();
        let salt = name
            .bytes()
            .fold(self.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
        let v = match self.init {
            RandomInit::Synthetic => {
                let (std, mean) = RandomWeights::synthetic(name, &shape);
                let mut v = crate::synth::noise(salt, n, std);
                if mean != 0.0 {
                    v.iter_mut().for_each(|x| *x += mean);
                }
                v
            }
            RandomInit::Wan => self.wan(name, &shape, n, salt),
        };
        Ok((v, shape))
    }
}

/// Bytes the weights of `cfg` take on the device at `precision`: the 2-D weights of the blocks'
/// and the text embedding's linears in `precision`'s type, everything else f32 (what
/// [`Dit::from_source`] uploads; it counts the same as it goes, [`Dit::weight_bytes`]).
pub fn planned_weight_bytes(cfg: &WanConfig, precision: WeightPrecision) -> u64 {
    super::expected_tensors(cfg)
        .iter()
        .map(|(name, shape)| {
            let n = shape.iter().product::<usize>() as u64;
            let gemm = shape.len() == 2
                && name.ends_with(".weight")
                && (name.starts_with("blocks.") || name.starts_with("text_embedding."));
            n * if gemm { precision.dtype().size() } else { 4 }
        })
        .sum()
}

fn load_linear<B: Backend>(
    be: &mut B,
    ck: &dyn WeightSource,
    name: &str,
    dt: DType,
    bytes: &mut u64,
) -> Result<Linear<B::T>> {
    let (w, shape) = ck.get(&format!("{name}.weight"))?;
    let (n, k) = (shape[0], shape[1..].iter().product::<usize>());
    let (b, _) = ck.get(&format!("{name}.bias"))?;
    *bytes += (n * k) as u64 * dt.size() + n as u64 * 4;
    Ok(Linear {
        w: be.upload_weight(&w, &[n, k], dt)?,
        b: be.upload(&b, &[n])?,
    })
}

fn load_vec<B: Backend>(
    be: &mut B,
    ck: &dyn WeightSource,
    name: &str,
    shape: &[usize],
    bytes: &mut u64,
) -> Result<B::T> {
    let (v, _) = ck.get(name)?;
    *bytes += v.len() as u64 * 4;
    be.upload(&v, shape)
}

impl<B: Backend> Dit<B> {
    /// Uploads the weights of a checkpoint. Small tensors (biases, norms, modulation, the time
    /// MLP and the head, as the reference keeps them) stay f32; the block and text GEMM
    /// weights take `precision`.
    pub fn load(be: &mut B, ck: &Checkpoint, precision: WeightPrecision) -> Result<Dit<B>> {
        Dit::from_source(be, &ck.config.clone(), ck, precision)
    }

    /// A DiT of configuration `cfg` with random weights of the real shapes (benchmarks).
    pub fn random(
        be: &mut B,
        cfg: &WanConfig,
        precision: WeightPrecision,
        seed: u64,
    ) -> Result<Dit<B>> {
        Dit::from_source(be, cfg, &RandomWeights::new(cfg, seed), precision)
    }

    /// Uploads the weights of any [`WeightSource`] for configuration `cfg`.
    pub fn from_source(
        be: &mut B,
        cfg: &WanConfig,
        ck: &dyn WeightSource,
        precision: WeightPrecision,
    ) -> Result<Dit<B>> {
        let c = cfg.clone();
        c.validate()?;
        // refuse before uploading weights that cannot fit (where the layer can tell)
        let planned = planned_weight_bytes(&c, precision);
        if let Some((free, _)) = be.memory_info()
            && planned > free
        {
            return Err(Error::OutOfMemory {
                what: format!(
                    "the DiT weights ({} layers, dim {}, GEMM weights in {:?})",
                    c.num_layers,
                    c.dim,
                    precision.dtype()
                ),
                needed: planned,
                available: Some(free),
                device: be.device_name(),
            });
        }
        let big = precision.dtype();
        let f32d = DType::F32;
        let d = c.dim;
        let mut bytes = 0u64;
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = |s: &str| format!("blocks.{i}.{s}");
            let lin = |be: &mut B, s: &str, bytes: &mut u64| load_linear(be, ck, &p(s), big, bytes);
            let sa = [
                lin(be, "self_attn.q", &mut bytes)?,
                lin(be, "self_attn.k", &mut bytes)?,
                lin(be, "self_attn.v", &mut bytes)?,
                lin(be, "self_attn.o", &mut bytes)?,
            ];
            let ca = [
                lin(be, "cross_attn.q", &mut bytes)?,
                lin(be, "cross_attn.k", &mut bytes)?,
                lin(be, "cross_attn.v", &mut bytes)?,
                lin(be, "cross_attn.o", &mut bytes)?,
            ];
            let ffn0 = lin(be, "ffn.0", &mut bytes)?;
            let ffn2 = lin(be, "ffn.2", &mut bytes)?;
            blocks.push(BlockWeights {
                modulation: load_vec(be, ck, &p("modulation"), &[1, 6 * d], &mut bytes)?,
                sa,
                sa_norm_q: load_vec(be, ck, &p("self_attn.norm_q.weight"), &[d], &mut bytes)?,
                sa_norm_k: load_vec(be, ck, &p("self_attn.norm_k.weight"), &[d], &mut bytes)?,
                norm3_w: load_vec(be, ck, &p("norm3.weight"), &[d], &mut bytes)?,
                norm3_b: load_vec(be, ck, &p("norm3.bias"), &[d], &mut bytes)?,
                ca,
                ca_norm_q: load_vec(be, ck, &p("cross_attn.norm_q.weight"), &[d], &mut bytes)?,
                ca_norm_k: load_vec(be, ck, &p("cross_attn.norm_k.weight"), &[d], &mut bytes)?,
                ffn0,
                ffn2,
            });
        }
        let w = Weights {
            patch: load_linear(be, ck, "patch_embedding", f32d, &mut bytes)?,
            text0: load_linear(be, ck, "text_embedding.0", big, &mut bytes)?,
            text2: load_linear(be, ck, "text_embedding.2", big, &mut bytes)?,
            time0: load_linear(be, ck, "time_embedding.0", f32d, &mut bytes)?,
            time2: load_linear(be, ck, "time_embedding.2", f32d, &mut bytes)?,
            proj: load_linear(be, ck, "time_projection.1", f32d, &mut bytes)?,
            head_mod: load_vec(be, ck, "head.modulation", &[2, d], &mut bytes)?,
            head: load_linear(be, ck, "head.head", f32d, &mut bytes)?,
            blocks,
        };
        be.flush()?;
        Ok(Dit {
            cfg: c,
            precision,
            w,
            ws: None,
            weight_bytes: bytes,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &WanConfig {
        &self.cfg
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Bytes of activations a forward on a latent of `(F, H, W)` needs (the workspace).
    pub fn activation_bytes(&self, latent: (usize, usize, usize), sparse: bool) -> u64 {
        let c = &self.cfg;
        let s = (latent.0 * latent.1 * latent.2 / 4) as u64;
        let (d, f, l) = (c.dim as u64, c.ffn_dim as u64, c.text_len as u64);
        let mut n = s * d * 12 + s * f + s * 64 * 3 + l * (c.text_dim as u64 + 6 * d) + 16 * s * 4;
        if sparse {
            let nb = s / 64;
            n += c.num_heads as u64 * (nb * nb * 3 + nb * (c.head_dim() as u64) * 2);
        }
        n * 4
    }

    fn workspace(&mut self, be: &mut B, lat: (usize, usize, usize), sparse: bool) -> Result<()> {
        let key = (lat.0, lat.1, lat.2, sparse);
        let gdt = be.gemm_input_dtype(self.precision.dtype());
        if self
            .ws
            .as_ref()
            .is_some_and(|w| w.key == key && w.gdt == gdt)
        {
            return Ok(());
        }
        self.ws = None;
        // refuse before allocating what cannot fit (where the layer can tell its free memory)
        let need = self.activation_bytes(lat, sparse);
        let what = || {
            format!(
                "the DiT forward on a {}x{}x{} latent{} (its activations)",
                lat.0,
                lat.1,
                lat.2,
                if sparse { " with sparse attention" } else { "" }
            )
        };
        if let Some((free, _)) = be.memory_info()
            && need > free
        {
            return Err(Error::OutOfMemory {
                what: what(),
                needed: need,
                available: Some(free),
                device: be.device_name(),
            });
        }
        // the adapter's GEMM tile configurations for these shapes (timed once per adapter and
        // shape class, then cached; before the workspace exists, so the timing's own operands
        // come and go first)
        let c = &self.cfg;
        let s = lat.0 * lat.1 * lat.2 / 4;
        let (d, l) = (c.dim, c.text_len);
        let shapes = [
            (s, d, d),
            (s, c.ffn_dim, d),
            (s, d, c.ffn_dim),
            (l, d, d),
            (l, d, c.text_dim),
        ];
        be.tune_gemms(&shapes, self.precision.dtype())?;
        let r = self.alloc_workspace(be, lat, sparse, key);
        if let Err(e) = &r
            && e.to_string().contains("out of GPU memory")
        {
            return Err(Error::OutOfMemory {
                what: what(),
                needed: need,
                available: None,
                device: be.device_name(),
            });
        }
        r
    }

    fn alloc_workspace(
        &mut self,
        be: &mut B,
        lat: (usize, usize, usize),
        sparse: bool,
        key: (usize, usize, usize, bool),
    ) -> Result<()> {
        let c = &self.cfg;
        let (d, h, hd) = (c.dim, c.num_heads, c.head_dim());
        let s = lat.0 * (lat.1 / 2) * (lat.2 / 2);
        let l = c.text_len;
        let pt = 4 * c.in_dim;
        // fast path (16-bit weights): attention operands in f16, so the tensor-core attention
        // runs where the adapter has it; the parity path keeps them f32
        let hdt = if self.precision != WeightPrecision::F32 && be.has_f16() {
            DType::F16
        } else {
            DType::F32
        };
        // tensors that only feed block / text GEMMs: the backend's choice for the weights'
        // type (F32 on the parity path; bf16 / f16 on the CUDA fast path; f16 on the wgpu fast
        // path where its GEMM runs on tensor cores, else F32)
        let gdt = be.gemm_input_dtype(self.precision.dtype());
        let scratch = if sparse {
            let grid = BlockGrid::from_tokens(lat.0, lat.1 / 2, lat.2 / 2)?;
            Some(be.mask_scratch(h, grid, hd)?)
        } else {
            None
        };
        self.ws = Some(Workspace {
            key,
            gdt,
            x: be.alloc(&[s, d])?,
            x2: be.alloc(&[s, d])?,
            a: be.alloc_as(&[s, d], gdt)?,
            q: be.alloc(&[s, d])?,
            k: be.alloc(&[s, d])?,
            v: be.alloc(&[s, d])?,
            qh: be.alloc_as(&[1, h, s, hd], hdt)?,
            kh: be.alloc_as(&[1, h, s, hd], hdt)?,
            vh: be.alloc_as(&[1, h, s, hd], hdt)?,
            oh: be.alloc_as(&[1, h, s, hd], hdt)?,
            o: be.alloc_as(&[s, d], gdt)?,
            y: be.alloc(&[s, d])?,
            hidden: be.alloc_as(&[s, c.ffn_dim], gdt)?,
            ctx0: be.alloc(&[l, c.text_dim])?,
            ctx1: be.alloc(&[l, d])?,
            ctxh: be.alloc_as(&[l, d], gdt)?,
            sinus: be.alloc(&[1, c.freq_dim])?,
            z: be.alloc(&[c.in_dim, lat.0, lat.1, lat.2])?,
            ctx: be.alloc_as(&[l, d], gdt)?,
            kc: be.alloc(&[l, d])?,
            vc: be.alloc(&[l, d])?,
            kch: be.alloc_as(&[1, h, l, hd], hdt)?,
            vch: be.alloc_as(&[1, h, l, hd], hdt)?,
            t1: be.alloc(&[1, d])?,
            e: be.alloc(&[1, d])?,
            se: be.alloc(&[1, d])?,
            e0: be.alloc(&[1, 6 * d])?,
            mods: be.alloc(&[1, 6 * d])?,
            hmods: be.alloc(&[2, d])?,
            tokens: be.alloc(&[s, pt])?,
            head_out: be.alloc(&[s, pt])?,
            head_nat: be.alloc(&[s, pt])?,
            out: be.alloc(&[c.out_dim, lat.0, lat.1, lat.2])?,
            scratch,
        });
        Ok(())
    }

    /// One forward of `input` with the sparse algorithm (`None` = dense). Returns the velocity
    /// `[out_dim, F, H, W]`. With `trace`, intermediates and masks are read back into it.
    pub fn forward(
        &mut self,
        be: &mut B,
        input: &DitInput<'_>,
        sparse: Option<&SparseAlgo>,
        mut trace: Option<&mut Trace>,
    ) -> Result<Vec<f32>> {
        let DitInput {
            latent,
            shape: latent_shape,
            t,
            context,
        } = *input;
        let c = self.cfg.clone();
        let (f, hh, ww) = latent_shape;
        if hh % 2 != 0 || ww % 2 != 0 || f == 0 || hh == 0 || ww == 0 {
            return Err(Error::shape(format!(
                "latent {f}x{hh}x{ww}: height and width must be positive and even (patch 1x2x2)"
            )));
        }
        if latent.len() != c.in_dim * f * hh * ww {
            return Err(Error::shape(format!(
                "latent has {} values, expected in_dim·F·H·W = {}·{f}·{hh}·{ww}",
                latent.len(),
                c.in_dim
            )));
        }
        if context.len() % c.text_dim != 0 || context.len() / c.text_dim > c.text_len {
            return Err(Error::shape(format!(
                "context has {} values: expected L·{} with L ≤ text_len {}",
                context.len(),
                c.text_dim,
                c.text_len
            )));
        }
        let tok = (f, hh / 2, ww / 2);
        let grid = match sparse {
            Some(_) => Some(BlockGrid::from_tokens(tok.0, tok.1, tok.2).map_err(|_| {
                Error::shape(format!(
                    "sparse attention needs the latent height and width to be multiples of 16 \
                     (video multiples of 128 px); got latent {hh}x{ww}. The reference crops sizes \
                     (1280x720 -> 1280x640)"
                ))
            })?),
            None => None,
        };
        self.workspace(be, latent_shape, sparse.is_some())?;
        let ws = self
            .ws
            .as_ref()
            .ok_or_else(|| Error::Gpu("workspace missing".into()))?;
        let w = &self.w;
        let (d, heads, hd) = (c.dim, c.num_heads, c.head_dim());
        let eps = c.eps as f32;

        // time: the sinusoid in f64 on the CPU, the MLPs in f32
        let sin = sinusoidal_embedding(t, c.freq_dim);
        be.write(&ws.sinus, &sin)?;
        w.time0.run(be, &ws.sinus, Activation::Silu, &ws.t1)?;
        w.time2.run(be, &ws.t1, Activation::None, &ws.e)?;
        be.activation(&ws.e, Activation::Silu, &ws.se)?;
        w.proj.run(be, &ws.se, Activation::None, &ws.e0)?;
        be.add(&w.head_mod, &ws.e, &ws.hmods)?;
        if trace.as_ref().is_some_and(|t| !t.densities_only) {
            let e = be.download(&ws.e)?;
            let e0 = be.download(&ws.e0)?;
            let tr = trace
                .as_deref_mut()
                .ok_or_else(|| Error::Gpu("trace".into()))?;
            tr.tensors.insert("time_sinusoid".into(), sin.clone());
            tr.tensors.insert("e".into(), e);
            tr.tensors.insert("e0".into(), e0);
        }

        // text: zero-padded context through two linears with GELU between
        let mut ctx0 = vec![0f32; c.text_len * c.text_dim];
        ctx0[..context.len()].copy_from_slice(context);
        be.write(&ws.ctx0, &ctx0)?;
        w.text0.run(be, &ws.ctx0, Activation::GeluTanh, &ws.ctxh)?;
        w.text2.run(be, &ws.ctxh, Activation::None, &ws.ctx)?;
        keep(be, &mut trace, "context_emb", &ws.ctx)?;

        // patch embedding (natural order), then fractal order when sparse
        be.write(&ws.z, latent)?;
        be.patchify(&ws.z, &ws.tokens)?;
        let x_nat = if grid.is_some() { &ws.x2 } else { &ws.x };
        w.patch.run(be, &ws.tokens, Activation::None, x_nat)?;
        keep(be, &mut trace, "patch_embed_out", x_nat)?;
        if grid.is_some() {
            be.fractal(&ws.x2, &ws.x, tok, false)?;
        }
        let (cos, sinr) = be.rope_tables(tok, hd, grid.is_some())?;
        be.flush()?;

        let n_layers = w.blocks.len();
        let mods = be.reshape(&ws.mods, &[6, d]);
        for (li, bw) in w.blocks.iter().enumerate() {
            // the block-0 trace reads the projections' outputs (`y`) before their residuals:
            // there the linear and the residual stay separate ops; everywhere else `y` is dead
            // after the residual, so the backend may fuse them (Backend::linear_gated_residual)
            let trace_y = li == 0 && trace.as_ref().is_some_and(|t| !t.densities_only);
            // m = modulation + e0, the [6, dim] table of shifts, scales and gates
            be.add(&bw.modulation, &ws.e0, &ws.mods)?;

            // 1. self-attention
            be.layer_norm(
                &ws.x,
                &ws.a,
                eps,
                Norm::Modulate {
                    mods: &mods,
                    shift: 0,
                    scale: 1,
                },
            )?;
            bw.sa[0].run(be, &ws.a, Activation::None, &ws.y)?;
            be.rms_norm(&ws.y, &bw.sa_norm_q, &ws.q, eps)?;
            bw.sa[1].run(be, &ws.a, Activation::None, &ws.y)?;
            be.rms_norm(&ws.y, &bw.sa_norm_k, &ws.k, eps)?;
            bw.sa[2].run(be, &ws.a, Activation::None, &ws.v)?;
            // with a NABLA mask to estimate, the layer may pool q and k as it writes the heads
            let pool_scratch = match (sparse, ws.scratch.as_ref()) {
                (Some(algo), Some(scr)) if algo.cut().is_some() => Some(scr),
                _ => None,
            };
            let pooled = match pool_scratch {
                Some(scr) => {
                    let pq = be.rope_split_heads_pooled(
                        &ws.q,
                        &cos,
                        &sinr,
                        heads,
                        &ws.qh,
                        scr,
                        QkSide::Q,
                    )?;
                    let pk = be.rope_split_heads_pooled(
                        &ws.k,
                        &cos,
                        &sinr,
                        heads,
                        &ws.kh,
                        scr,
                        QkSide::K,
                    )?;
                    pq && pk
                }
                None => {
                    be.rope_split_heads(&ws.q, &cos, &sinr, heads, &ws.qh)?;
                    be.rope_split_heads(&ws.k, &cos, &sinr, heads, &ws.kh)?;
                    false
                }
            };
            be.split_heads(&ws.v, &ws.vh)?;
            let mask = match (sparse, grid, ws.scratch.as_ref()) {
                (Some(algo), Some(g), Some(scr)) => {
                    let m = if pooled {
                        be.estimate_mask_prepooled(g, algo, scr)?
                    } else {
                        be.estimate_mask(&ws.qh, &ws.kh, g, algo, scr)?
                    };
                    if let Some(tr) = trace.as_deref_mut() {
                        tr.densities
                            .insert(format!("layer{li}"), be.mask_density(&m)?);
                        if !tr.densities_only {
                            tr.masks.insert(format!("layer{li}"), be.mask_dense(&m)?);
                        }
                    }
                    Mask::Sparse(m)
                }
                _ => Mask::Dense,
            };
            be.attention(&ws.qh, &ws.kh, &ws.vh, &mask, &ws.oh)?;
            be.merge_heads(&ws.oh, &ws.o)?;
            if trace_y {
                bw.sa[3].run(be, &ws.o, Activation::None, &ws.y)?;
                keep(be, &mut trace, "block0_self_attn_out", &ws.y)?;
                be.gated_residual(&ws.x, &ws.y, Some((&mods, 2)))?;
            } else {
                bw.sa[3].run_gated_residual(be, &ws.o, &ws.x, Some((&mods, 2)), &ws.y)?;
            }

            // 2. cross-attention over the padded context (no mask, no RoPE, no gate)
            be.layer_norm(&ws.x, &ws.a, eps, Norm::Affine(&bw.norm3_w, &bw.norm3_b))?;
            bw.ca[0].run(be, &ws.a, Activation::None, &ws.y)?;
            be.rms_norm(&ws.y, &bw.ca_norm_q, &ws.q, eps)?;
            bw.ca[1].run(be, &ws.ctx, Activation::None, &ws.ctx1)?;
            be.rms_norm(&ws.ctx1, &bw.ca_norm_k, &ws.kc, eps)?;
            bw.ca[2].run(be, &ws.ctx, Activation::None, &ws.vc)?;
            be.split_heads(&ws.q, &ws.qh)?;
            be.split_heads(&ws.kc, &ws.kch)?;
            be.split_heads(&ws.vc, &ws.vch)?;
            be.attention(&ws.qh, &ws.kch, &ws.vch, &Mask::Dense, &ws.oh)?;
            be.merge_heads(&ws.oh, &ws.o)?;
            if trace_y {
                bw.ca[3].run(be, &ws.o, Activation::None, &ws.y)?;
                keep(be, &mut trace, "block0_cross_attn_out", &ws.y)?;
                be.gated_residual(&ws.x, &ws.y, None)?;
            } else {
                bw.ca[3].run_gated_residual(be, &ws.o, &ws.x, None, &ws.y)?;
            }

            // 3. feed-forward
            be.layer_norm(
                &ws.x,
                &ws.a,
                eps,
                Norm::Modulate {
                    mods: &mods,
                    shift: 3,
                    scale: 4,
                },
            )?;
            bw.ffn0.run(be, &ws.a, Activation::GeluTanh, &ws.hidden)?;
            if trace_y {
                bw.ffn2.run(be, &ws.hidden, Activation::None, &ws.y)?;
                keep(be, &mut trace, "block0_ffn_out", &ws.y)?;
                be.gated_residual(&ws.x, &ws.y, Some((&mods, 5)))?;
            } else {
                bw.ffn2
                    .run_gated_residual(be, &ws.hidden, &ws.x, Some((&mods, 5)), &ws.y)?;
            }
            if li == 0 {
                keep(be, &mut trace, "block0_out", &ws.x)?;
            }
            if li + 1 == n_layers {
                keep(be, &mut trace, "last_block_out", &ws.x)?;
            }
            be.flush()?;
        }

        // head: LN, modulation by head.modulation + e, linear (f32 weights: its input is the
        // free f32 `y`, not `a`, which may be 16-bit); back to natural order
        be.layer_norm(
            &ws.x,
            &ws.y,
            eps,
            Norm::Modulate {
                mods: &ws.hmods,
                shift: 0,
                scale: 1,
            },
        )?;
        w.head.run(be, &ws.y, Activation::None, &ws.head_out)?;
        let head_nat = if grid.is_some() {
            be.fractal(&ws.head_out, &ws.head_nat, tok, true)?;
            &ws.head_nat
        } else {
            &ws.head_out
        };
        keep(be, &mut trace, "head_out", head_nat)?;
        be.unpatchify(head_nat, &ws.out)?;
        be.download(&ws.out)
    }
}

/// Reads `t` back into the trace under `name` (no-op without a trace).
fn keep<B: Backend>(
    be: &mut B,
    trace: &mut Option<&mut Trace>,
    name: &str,
    t: &B::T,
) -> Result<()> {
    if let Some(tr) = trace.as_deref_mut()
        && !tr.densities_only
    {
        let v = be.download(t)?;
        tr.tensors.insert(name.to_string(), v);
    }
    Ok(())
}
