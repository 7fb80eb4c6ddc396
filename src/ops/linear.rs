//! The linear layer `y = act(x·Wᵀ + b)`: dispatchers for `shaders/linalg/linear.wgsl`, the
//! workhorse of the Wan DiT (q/k/v/o projections, FFN, modulation and embedding MLPs).
//!
//! Layout is PyTorch's `nn.Linear`: `x [.., K]` f32 or f16, `W [N, K]` row-major, `b [N]` f32,
//! `y [.., N]` f32 or f16 (see "16-bit activations" below). Weights stay in their checkpoint
//! dtype on the GPU — f32, f16 or bf16 — and are widened to f32 as they are loaded (bf16 with a
//! shift, f16 by an exact bit-level decode), so neither needs a shader feature: f16 weights work
//! on adapters without `SHADER_F16`, and not even the `SHADER_FLOAT16_IN_FLOAT32` capability of
//! `unpack2x16float` is needed. The decode costs a few integer ops per weight per workgroup,
//! against the 64 multiply-adds each loaded weight feeds.
//!
//! **Tile configurations.** The tensor-core kernel comes in tile configurations
//! ([`CoopConfig`]: 128 or 256 rows of x per workgroup, and the band height of the tile order)
//! that compute the same results bit for bit and differ in speed per adapter. [`tune_linear`]
//! times them on a shape and keeps the fastest per adapter and shape class in the tuning cache
//! ([`crate::gpu::tune`]); the Wan DiT calls it before a forward's first allocation. Untuned
//! shapes use [`CoopConfig::DEFAULT`], the fastest on the H200.
//!
//! All products and sums are f32: accumulating thousands of terms (K up to 13 824) in f16 would
//! lose the precision the reference comparison asks for (relative L2 error near 1e-6 against an
//! f64 reference).
//!
//! **16-bit activations.** `x` may be stored as f16 and the plain epilogue ([`record_linear`])
//! may store `y` as f16 (both need `SHADER_F16`): the Wan DiT's GEMM-only activations —
//! LayerNorm outputs, merged attention heads, FFN and text hidden — when
//! [`crate::wan::Backend::gemm_input_dtype`] says so (where the tensor-core kernel runs, see
//! [`auto_uses_coop`]).
//!
//! The tensor-core kernel rounds f32 x to f16 anyway when it stages it, so storing x as f16
//! (rounded once, to nearest even, by its producer) changes no result — bit for bit — and halves
//! the bytes of x that the kernel's storage loads move, the loads that bound it (~156 TFLOP/s
//! with f32 x at the Wan 14B shapes on the H200, against ~400 with the loads skipped). f16 x is
//! staged without any conversion: eight halves per 16-byte load when K % 8 == 0 (a
//! `mat2x4<f16>` element: naga 30 has no bitcast of `vec2<u32>` to `vec4<f16>`), four per
//! 8-byte load when K % 4 == 0, scalar loads otherwise.
//!
//! The portable kernel widens f16 x exactly to f32, so on f16 x it computes what it computes on
//! the f32 values of those halves. An f16 `y` is the f32 result (after bias and activation)
//! rounded once to f16. The gated-residual epilogue keeps `y` f32 (the residual stream), and
//! the bf16-autocast rounding below takes only f32 x and y (its rounding of x to bf16 must see
//! the f32 value). Each storage combination is a compile-time variant (`XDT`, `XE`, `YE` in the
//! prelude), never a run-time flag: one in the staging loop once cut the tensor-core kernel
//! from 156 to 55 TFLOP/s.
//!
//! The kernel computes a 64×64 tile of `y` per workgroup (256 threads, 4×4 outputs each) and
//! walks K in steps of 16 staged in workgroup memory; edges of any size are masked. Tiles are
//! visited in bands of 16 row tiles, so the workgroups in flight share their x and W tiles in
//! cache. Bias and the activation ([`Activation`]) are applied in the epilogue, so `y` is
//! written once.
//!
//! The epilogue can instead add the result into a residual stream:
//! [`record_linear_gated_residual`] computes `out = res + gate[row] ⊙ (x·Wᵀ + b)` — the Wan DiT's
//! `x += gate ⊙ o_proj(attn)` and `x += gate ⊙ ffn2(h)` in one kernel, with `out` the same
//! tensor as `res` for the in-place update (or a gate-less `res + x·Wᵀ + b`). It saves writing
//! `y` and the separate elementwise pass that reads `y` and `x` and writes `x` again. Each
//! element is rounded exactly as the unfused sequence ([`record_linear`] with no activation,
//! then [`crate::ops::elementwise::record_gated_residual`]) rounds it: the same f32 `v = acc +
//! b`, then `r + v·g` in f32 — equal up to a compiler contracting that into an fma, which WGSL
//! allows in either kernel.
//!
//! The fast path of the Wan DiT asks for the reference's rounding instead
//! ([`LinearRounding::Bf16`], spec §2.10: a Linear under bf16 autocast): x is rounded to bf16 as
//! the kernel loads it, the bias is rounded to bf16, the pre-activation `v = acc + b` is rounded
//! to bf16 and, with an activation, so is its output; products and sums stay f32. It costs no
//! extra pass over memory (a few integer ops per loaded x value and per output) and is a
//! compile-time variant of each kernel (`RB16` in the prelude): a runtime flag in the staging
//! loop, tried first, slowed the tensor-core kernel 2.8x on the H200 even when off. The default,
//! [`LinearRounding::None`], is the f32 behaviour above. The rounding needs f32 x and `y`.
//!
//! Every tensor is bound whole, so each must fit the device's storage-binding limit: a weight
//! larger than that (e.g. a 14B model's FFN weight, 13 824 × 5 120 bf16 = 135 MiB, on a driver
//! with a 128 MiB limit) is refused with [`Error::TooLarge`] for now; splitting such a weight
//! along N into several dispatches is future work.

use crate::error::{Error, Result};
use crate::gpu::coop_layout::Layout;
use crate::gpu::{Batch, DType, Gpu, KOrder, Tensor, groups_2d};

/// The kernel body; [`source`] prepends the two constants that select a variant.
const LINEAR: &str = include_str!("../../shaders/linalg/linear.wgsl");
const LINEAR_COMMON: &str = include_str!("../../shaders/linalg/linear_common.wgsl");
const LINEAR_COOP: &str = include_str!("../../shaders/linalg/linear_coop.wgsl");
const LINEAR_LOADS: &str = include_str!("../../shaders/linalg/linear_loads.wgsl");
const LINEAR_LOADS_VEC: &str = include_str!("../../shaders/linalg/linear_loads_vec.wgsl");
const LINEAR_LOADS_VEC8: &str = include_str!("../../shaders/linalg/linear_loads_vec8.wgsl");
const LINEAR_LOADS_W8_WORDS: &str = include_str!("../../shaders/linalg/linear_loads_w8_words.wgsl");
const LINEAR_LOADS_W8_F16: &str = include_str!("../../shaders/linalg/linear_loads_w8_f16.wgsl");
const LINEAR_LOADS_PAIR: &str = include_str!("../../shaders/linalg/linear_loads_pair.wgsl");
const LINEAR_LOADS_WFRAG: &str = include_str!("../../shaders/linalg/linear_loads_wfrag.wgsl");
const LINEAR_STORE: &str = include_str!("../../shaders/linalg/linear_store.wgsl");
const LINEAR_RESIDUAL: &str = include_str!("../../shaders/linalg/linear_residual.wgsl");

/// Compile-time choices of a tensor-core kernel variant besides the storage types and epilogue:
/// subgroup size, load width, tile rows, diagnostic probe (0 in real runs).
#[derive(Clone, Copy, Debug)]
struct CoopBuild {
    sg: u32,
    loads: Loads,
    tm: u32,
    probe: u32,
    /// W in fragment order ([`KOrder::Frag32`]), its B fragments built with this element order
    /// (f16 weights, 16-byte loads only); `None`: W staged through workgroup memory.
    wfrag: Option<Layout>,
}

/// Row tiles the tensor-core kernel is built for.
const COOP_TILE_ROWS: [u32; 2] = [128, 256];

/// The tuning-cache key of a GEMM shape class: rows rounded up to a power of two (the DiT's
/// token counts of nearby sizes share it), N, K, weight and x storage.
fn tune_key(m: usize, n: usize, k: usize, wdt: DType, x16: bool) -> String {
    format!(
        "linear/coop/m{}/n{n}/k{k}/{}/x{}",
        m.next_power_of_two(),
        format!("{wdt:?}").to_lowercase(),
        if x16 { "f16" } else { "f32" }
    )
}

/// The tuned configuration stored under `key`, if it parses and fits this adapter.
fn cached_config(gpu: &Gpu, sg: u32, key: &str) -> Option<CoopConfig> {
    gpu.tuned(key)
        .and_then(|v| serde_json::from_value::<CoopConfig>(v).ok())
        .filter(|c| c.fits(gpu.caps(), sg))
}

/// The tile configuration for this shape: the adapter's tuned one, else the default.
fn coop_config(
    gpu: &Gpu,
    sg: u32,
    m: usize,
    n: usize,
    k: usize,
    wdt: DType,
    x16: bool,
) -> CoopConfig {
    cached_config(gpu, sg, &tune_key(m, n, k, wdt, x16)).unwrap_or(CoopConfig::DEFAULT)
}

/// GPU milliseconds of warm-up before [`tune_linear`] times a shape's candidates.
const TUNE_WARM_MS: f64 = 200.0;
/// Timed rounds over all candidates (the median of each is compared).
const TUNE_ROUNDS: usize = 5;

/// One tuned GEMM shape ([`tune_linear`]).
#[derive(Clone, Debug)]
pub struct TuneResult {
    /// `(M, N, K)`.
    pub shape: (usize, usize, usize),
    /// The configuration chosen.
    pub chosen: CoopConfig,
    /// Median milliseconds of every candidate timed (empty: taken from the cache).
    pub times: Vec<(CoopConfig, f64)>,
}

/// Picks the tensor-core kernel's tile configuration for each GEMM shape `(M, N, K)` with
/// weights `wdt` and x stored as `x_dtype` by timing every fitting candidate
/// ([`CoopConfig::CANDIDATES`]) on this adapter, and stores the fastest in the tuning cache
/// ([`crate::gpu::tune`]), which [`LinearKernel::Coop`] and `Auto` consult. Shapes already in
/// the cache are not timed again unless `force`. Does nothing (empty result) where the
/// tensor-core kernel does not run: no cooperative matrices, or no GPU timestamps.
pub fn tune_linear(
    gpu: &Gpu,
    shapes: &[(usize, usize, usize)],
    wdt: DType,
    x_dtype: DType,
    force: bool,
) -> Result<Vec<TuneResult>> {
    let Some(sg) = gpu.caps().coop_subgroup() else {
        return Ok(Vec::new());
    };
    if !gpu.caps().timestamps || weight_code(wdt).is_none() {
        return Ok(Vec::new());
    }
    let x16 = x_dtype == DType::F16;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for &(m, n, k) in shapes {
        let key = tune_key(m, n, k, wdt, x16);
        if m == 0 || n == 0 || k == 0 || !seen.insert(key.clone()) {
            continue;
        }
        if !force && let Some(c) = cached_config(gpu, sg, &key) {
            out.push(TuneResult {
                shape: (m, n, k),
                chosen: c,
                times: Vec::new(),
            });
            continue;
        }
        // operands of the real shape (values do not change the timing of this kernel)
        let x = gpu.empty(&[m, k], x_dtype)?;
        let w = gpu.empty(&[n, k], wdt)?;
        let y = gpu.empty(&[m, n], DType::F32)?;
        gpu.fill_u32(&x, 0x3c00_3c00);
        gpu.fill_u32(&w, 0x3c00_3c00);
        let cands: Vec<CoopConfig> = CoopConfig::CANDIDATES
            .into_iter()
            .filter(|c| c.fits(gpu.caps(), sg))
            .collect();
        let run = |c: CoopConfig, b: &mut Batch<'_>| {
            let kernel = LinearKernel::CoopWith(c);
            record_linear_with(b, &x, &w, None, Activation::None, &y, kernel)
        };
        // every candidate once (pipelines), then the default until the GPU has worked
        // >= TUNE_WARM_MS (clocks up: a cold first candidate read 3-4x slow on the H200)
        for c in &cands {
            gpu.time_ms_inner(1, 1, |b| run(*c, b))?;
        }
        let mut warm = 0.0;
        let mut one = f64::INFINITY;
        let started = std::time::Instant::now();
        while warm < TUNE_WARM_MS && started.elapsed().as_secs_f64() < 5.0 {
            let t = gpu.time_ms_inner(1, 1, |b| run(CoopConfig::DEFAULT, b))?[0];
            warm += t;
            one = one.min(t);
        }
        // rounds over all candidates in turn, so drifting clocks hit each alike; short GEMMs
        // run as back-to-back copies of >= ~1 ms per sample (time per copy)
        let copies = ((1.0 / one.max(1e-3)).ceil() as usize).clamp(1, 64);
        let mut samples = vec![Vec::new(); cands.len()];
        for _ in 0..TUNE_ROUNDS {
            for (i, c) in cands.iter().enumerate() {
                let t = gpu.time_ms_inner(1, copies, |b| run(*c, b))?[0];
                samples[i].push(t);
            }
        }
        let times: Vec<(CoopConfig, f64)> = cands
            .iter()
            .zip(samples)
            .map(|(c, mut t)| {
                t.sort_by(f64::total_cmp);
                (*c, t[t.len() / 2])
            })
            .collect();
        let chosen = times
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(CoopConfig::DEFAULT, |t| t.0);
        gpu.store_tuned(
            &key,
            serde_json::to_value(chosen).map_err(|e| Error::Invalid(e.to_string()))?,
        );
        out.push(TuneResult {
            shape: (m, n, k),
            chosen,
            times,
        });
    }
    Ok(out)
}

/// How the tensor-core kernel loads x and W from storage (it stages spans of eight k).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loads {
    /// One element per load (any K).
    Scalar,
    /// Four elements per load (K % 4 == 0).
    Vec4,
    /// Eight elements (16 bytes of 16-bit values) per load (K % 8 == 0).
    Vec8,
}

impl Loads {
    const ALL: [Loads; 3] = [Loads::Scalar, Loads::Vec4, Loads::Vec8];

    /// The widest loads K allows; `NABLA_LINEAR_VEC=0|4` caps them (comparisons).
    fn for_k(k: usize) -> Loads {
        // K = 0 (y = bias): the 16-byte form clamps its addresses to K - 8, the others check K
        let widest = if k == 0 {
            Loads::Scalar
        } else if k.is_multiple_of(8) {
            Loads::Vec8
        } else if k.is_multiple_of(4) {
            Loads::Vec4
        } else {
            Loads::Scalar
        };
        match std::env::var("NABLA_LINEAR_VEC").ok().as_deref() {
            Some("0") => Loads::Scalar,
            Some("4") if widest == Loads::Vec8 => Loads::Vec4,
            _ => widest,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Loads::Scalar => "scalar",
            Loads::Vec4 => "vec4",
            Loads::Vec8 => "vec8",
        }
    }

    /// The binding and load functions of this form for weights stored as `wdt` and x as f16
    /// (`x16`) or f32 (the coop kernel's `fetch_x8` / `span_x8` and `fetch_w8` / `span_w8`).
    /// The 16-byte form reads f16 x and f16 weights as u32 words (`H8` of
    /// shaders/gpu/h8_unpack.wgsl, included by the caller) and stages them as f16, without
    /// decoding them to f32 first.
    fn source(self, wdt: DType, x16: bool) -> String {
        let w8 = if wdt == DType::F16 {
            LINEAR_LOADS_W8_F16
        } else {
            LINEAR_LOADS_W8_WORDS
        };
        // the x span type of linear_loads_vec8.wgsl and its eight values
        let x8 = if x16 {
            "alias XSPAN = H8;\n\
             fn x8_values(v: XSPAN) -> mat2x4<XE> { return mat2x4<XE>(h8_lo(v), h8_hi(v)); }\n"
        } else {
            "alias XSPAN = mat2x4<XE>;\nfn x8_values(v: XSPAN) -> mat2x4<XE> { return v; }\n"
        };
        match self {
            Loads::Scalar => format!("{LINEAR_LOADS}{LINEAR_LOADS_PAIR}"),
            Loads::Vec4 => format!("{LINEAR_LOADS_VEC}{LINEAR_LOADS_PAIR}"),
            Loads::Vec8 => format!("{x8}{LINEAR_LOADS_VEC8}{w8}"),
        }
    }
}

/// Which GEMM kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearKernel {
    /// The cooperative-matrix kernel for 16-bit weights where the adapter has 16×16 f16
    /// matrices (the fast path: operands rounded to f16, f32 accumulation), the portable f32
    /// kernel otherwise and always for f32 weights (the parity path). `NABLA_LINEAR=portable`
    /// forces the portable kernel.
    Auto,
    /// Portable f32 math.
    Portable,
    /// Tensor cores (f16 operands, f32 accumulation), with this adapter's tuned tile
    /// configuration for the shape ([`tune_linear`]) or [`CoopConfig::DEFAULT`].
    Coop,
    /// Tensor cores with an explicit tile configuration (tuning, tests).
    CoopWith(CoopConfig),
}

/// Tile configuration of the tensor-core kernel. Every configuration computes the same
/// results bit for bit (each output sums its k-steps in the same order); they differ in speed,
/// which depends on the adapter, so [`tune_linear`] times them per adapter and shape class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CoopConfig {
    /// Rows of x per workgroup: 128 (4 subgroups) or 256 (8 subgroups sharing each W tile).
    pub tile_rows: u32,
    /// Row tiles per band of the grouped tile order (neighbouring workgroups share W columns).
    pub group: u32,
}

impl CoopConfig {
    /// The configuration used where none was tuned (fastest on the H200).
    pub const DEFAULT: CoopConfig = CoopConfig {
        tile_rows: 128,
        group: 16,
    };

    /// The configurations [`tune_linear`] times.
    pub const CANDIDATES: [CoopConfig; 6] = [
        CoopConfig::DEFAULT,
        CoopConfig {
            tile_rows: 128,
            group: 4,
        },
        CoopConfig {
            tile_rows: 128,
            group: 64,
        },
        CoopConfig {
            tile_rows: 256,
            group: 16,
        },
        CoopConfig {
            tile_rows: 256,
            group: 4,
        },
        CoopConfig {
            tile_rows: 256,
            group: 64,
        },
    ];

    /// Whether the adapter's workgroup limits allow this configuration with subgroup size `sg`
    /// (workgroup memory: x and W tiles of 10 `vec4<f16>` per row, one 16×16 f32 scratch per
    /// subgroup; tile_rows / 32 subgroups).
    pub fn fits(&self, caps: &crate::gpu::Capabilities, sg: u32) -> bool {
        let subgroups = self.tile_rows / 32;
        let smem = (self.tile_rows + 128) * 10 * 8 + subgroups * 1024;
        COOP_TILE_ROWS.contains(&self.tile_rows)
            && self.group > 0
            && caps.max_workgroup_storage >= smem
            && caps.max_invocations >= subgroups * sg
    }
}

/// The activation applied after the bias, fused into the linear kernel's epilogue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Activation {
    /// Identity: `y = x·Wᵀ + b`.
    #[default]
    None,
    /// GELU, tanh approximation (PyTorch `approximate="tanh"`, used by the Wan FFN):
    /// `0.5·v·(1 + tanh(√(2/π)·(v + 0.044715·v³)))`.
    GeluTanh,
    /// SiLU (swish): `v·sigmoid(v)`, used by the time-embedding MLP.
    Silu,
}

impl Activation {
    /// Every activation, in the order of the shader's `ACT` constant.
    pub const ALL: [Activation; 3] = [Activation::None, Activation::GeluTanh, Activation::Silu];

    /// The shader's `ACT` constant.
    fn code(self) -> u32 {
        match self {
            Activation::None => 0,
            Activation::GeluTanh => 1,
            Activation::Silu => 2,
        }
    }

    /// Short name used in pipeline keys and variant names.
    pub fn name(self) -> &'static str {
        match self {
            Activation::None => "none",
            Activation::GeluTanh => "gelu_tanh",
            Activation::Silu => "silu",
        }
    }
}

/// How a linear dispatch rounds (spec §2.10). With [`LinearRounding::Bf16`] the kernel computes
/// what PyTorch's `nn.Linear` under bf16 autocast computes from f32 inputs:
///
/// * each element of `x` is rounded to bf16 (nearest even; NaN stays NaN) as it is loaded —
///   on the tensor-core kernel that bf16 value is then converted to f16 for the matrix units,
///   exactly for |x| in f16's normal range (≥ 2⁻¹⁴; smaller values lose low bits to f16
///   subnormals: an error ≤ 2⁻²⁵·|w| per product, or 2⁻¹⁴·|w| where a driver flushes f16
///   subnormals to zero);
/// * the weights are used as stored (bf16 weights are already bf16; f16 / f32 weights are not
///   rounded further);
/// * products accumulate in f32;
/// * the bias is rounded to bf16 and added in f32, and the pre-activation `v = acc + b` is rounded
///   to bf16 (the bf16 output of the Linear);
/// * with an activation (GELU-tanh, SiLU), it is computed in f32 on that bf16 `v` and its output
///   is rounded to bf16 again;
/// * the gated-residual epilogue adds the bf16-rounded `v` as `res + gate·v` in f32.
///
/// Outputs are still stored as f32 (holding bf16 values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LinearRounding {
    /// No rounding beyond f32 (the portable kernel is then f32 throughout; the tensor-core
    /// kernel rounds x and W to f16 when staging them).
    #[default]
    None,
    /// bf16 autocast: x, bias, pre-activation and activation output rounded to bf16 (see the
    /// type's docs).
    Bf16,
}

/// Storage of `x` and of the plain epilogue's output `y`: f32, or f16 (GEMM-only activations).
/// Each combination is a variant of its own (prelude constants and aliases), never a run-time
/// flag in the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Io {
    /// x stored as f16.
    x16: bool,
    /// y stored as f16 (plain epilogue only).
    y16: bool,
}

impl Io {
    /// Every combination, in the order of [`variants`].
    const ALL: [Io; 4] = [
        Io {
            x16: false,
            y16: false,
        },
        Io {
            x16: true,
            y16: false,
        },
        Io {
            x16: false,
            y16: true,
        },
        Io {
            x16: true,
            y16: true,
        },
    ];

    /// Whether a kernel exists for this storage with `epi` and the bf16 rounding `rb16`: the
    /// residual epilogue writes the f32 residual stream, and the bf16-autocast rounding needs
    /// f32 x (its rounding must see the f32 value) and writes f32.
    fn supported(self, epi: Epilogue, rb16: bool) -> bool {
        !(rb16 && (self.x16 || self.y16)) && !(self.y16 && matches!(epi, Epilogue::Residual { .. }))
    }

    /// Suffix of the variant name (empty for f32 x and y, the original kernels).
    fn name(self) -> &'static str {
        match (self.x16, self.y16) {
            (false, false) => "",
            (true, false) => ",x_f16",
            (false, true) => ",y_f16",
            (true, true) => ",x_f16,y_f16",
        }
    }

    /// Prelude lines: `XDT`, the element types `XE` / `YE`.
    fn prelude(self) -> String {
        let t = |h: bool| if h { "f16" } else { "f32" };
        format!(
            "const XDT: u32 = {}u;\nalias XE = {};\nalias YE = {};\n",
            self.x16 as u32,
            t(self.x16),
            t(self.y16)
        )
    }
}

/// What the kernel's epilogue does with `v = x·Wᵀ + b` (the shader's `write_out`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Epilogue {
    /// `y = act(v)` (`linear_store.wgsl`).
    Store(Activation),
    /// `y = r + gate·v` (`linear_residual.wgsl`): `r` read from `y` itself (`in_place`) or
    /// from a separate read-only residual binding.
    Residual { in_place: bool },
}

impl Epilogue {
    /// Every epilogue, in the order of [`variants`].
    const ALL: [Epilogue; 5] = [
        Epilogue::Store(Activation::None),
        Epilogue::Store(Activation::GeluTanh),
        Epilogue::Store(Activation::Silu),
        Epilogue::Residual { in_place: true },
        Epilogue::Residual { in_place: false },
    ];

    fn act(self) -> Activation {
        match self {
            Epilogue::Store(a) => a,
            Epilogue::Residual { .. } => Activation::None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Epilogue::Store(a) => a.name(),
            Epilogue::Residual { in_place: true } => "residual,in_place",
            Epilogue::Residual { in_place: false } => "residual,separate",
        }
    }

    /// The WGSL that defines `write_out` (and, for the residual, `residual_in` and its binding).
    fn source(self) -> String {
        match self {
            Epilogue::Store(_) => LINEAR_STORE.to_string(),
            Epilogue::Residual { in_place: true } => {
                format!("fn residual_in(i: u32) -> f32 {{ return y[i]; }}\n{LINEAR_RESIDUAL}")
            }
            Epilogue::Residual { in_place: false } => format!(
                "@group(0) @binding(6) var<storage, read> res: array<f32>;\n\
                 fn residual_in(i: u32) -> f32 {{ return res[i]; }}\n{LINEAR_RESIDUAL}"
            ),
        }
    }
}

/// The shader's `WDT` constant for a weight dtype (`None` for dtypes the kernel cannot read).
fn weight_code(dtype: DType) -> Option<u32> {
    match dtype {
        DType::F32 => Some(0),
        DType::F16 => Some(1),
        DType::BF16 => Some(2),
        DType::U32 => None,
    }
}

fn variant_name(wdt: DType, epi: Epilogue, rb16: bool, io: Io) -> String {
    format!(
        "linalg/linear[{},{}{}{}]",
        format!("{wdt:?}").to_lowercase(),
        epi.name(),
        if rb16 { ",bf16_autocast" } else { "" },
        io.name()
    )
}

/// WGSL source of the variant for weight storage `wdt`, epilogue `epi` and x / y storage `io`:
/// a short prelude of constants plus the kernel files (`None` for unsupported combinations).
fn source(wdt: DType, epi: Epilogue, rb16: bool, io: Io) -> Option<String> {
    let w = weight_code(wdt)?;
    if !io.supported(epi, rb16) {
        return None;
    }
    let enable = if io.x16 || io.y16 {
        "enable f16;\n"
    } else {
        ""
    };
    Some(format!(
        "{enable}const WDT: u32 = {w}u;\nconst ACT: u32 = {}u;\nconst RB16: u32 = {}u;\n{}\
         {LINEAR_COMMON}{LINEAR_LOADS}{}{LINEAR}",
        epi.act().code(),
        rb16 as u32,
        io.prelude(),
        epi.source()
    ))
}

/// WGSL source of the cooperative-matrix variant for subgroup size `sg` with `loads`; `probe`
/// is a diagnostic (0 in real runs).
fn coop_source(wdt: DType, epi: Epilogue, rb16: bool, io: Io, build: CoopBuild) -> Option<String> {
    let CoopBuild {
        sg,
        loads,
        tm,
        probe,
        wfrag,
    } = build;
    let w = weight_code(wdt)?;
    if !io.supported(epi, rb16) {
        return None;
    }
    if wfrag.is_some() && (wdt != DType::F16 || loads != Loads::Vec8 || sg != 32) {
        return None;
    }
    let mut loads = loads.source(wdt, io.x16);
    // element order of the B fragments built from W in fragment order
    let mut order = String::new();
    if let Some(l) = &wfrag {
        loads = loads.replace(LINEAR_LOADS_W8_F16, "")
            + &crate::shaders::expand_unroll(LINEAR_LOADS_WFRAG, &[("E", 8)]);
        for i in 0..8 {
            order += &format!(
                "const RH{i}: u32 = {}u;\nconst CL{i}: u32 = {}u;\n",
                l.hi[i], l.col[i]
            );
        }
    }
    // the f16 span loads through unpack2x16float, not 16-bit integer bitcasts: those were 1-3 %
    // slower here on the H200 (benches/RESULTS.md session 19), although they won in attention
    let h8 = crate::shaders::H8_UNPACK;
    // SPX / SPW: spans of eight x / W values each thread stages per k-step (tm or 128 rows × 4
    // spans over tm/32·sg threads)
    let threads = tm / 32 * sg;
    // WST / WFR: the lines of W staged through workgroup memory, of W in fragment order
    let frag = wfrag.is_some() as u32;
    let body = crate::shaders::expand_unroll(
        LINEAR_COOP,
        &[
            ("T4", 4),
            ("SPX", 4 * tm / threads),
            ("SPW", (1 - frag) * 512 / threads),
            ("WST", 1 - frag),
            ("WFR", frag),
        ],
    );
    Some(format!(
        "enable f16;\nenable wgpu_cooperative_matrix;\nconst WDT: u32 = {w}u;\n\
         const ACT: u32 = {}u;\nconst RB16: u32 = {}u;\nconst SG: u32 = {sg}u;\n\
         const TM: u32 = {tm}u;\nconst PROBE: u32 = {probe}u;\n{order}{}\
         {LINEAR_COMMON}{h8}{loads}{}{body}",
        epi.act().code(),
        rb16 as u32,
        io.prelude(),
        epi.source()
    ))
}

/// Kernel variants of this module: every weight dtype (f32, f16, bf16) × every epilogue (each
/// [`Activation`], and the residual in place or from a separate tensor) × the bf16-autocast
/// rounding × x stored as f32 or f16 × (plain epilogue) y stored as f32 or f16 — the f16
/// storage not with the rounding —, portable and cooperative (f16 weights also in fragment
/// order, [`KOrder::Frag32`]).
pub fn variants() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for wdt in [DType::F32, DType::F16, DType::BF16] {
        for epi in Epilogue::ALL {
            for rb16 in [false, true] {
                for io in Io::ALL {
                    if let Some(src) = source(wdt, epi, rb16, io) {
                        v.push((variant_name(wdt, epi, rb16, io), src));
                    }
                    for sg in crate::shaders::COOP_SUBGROUP_SIZES {
                        for loads in Loads::ALL {
                            for tm in COOP_TILE_ROWS {
                                let build = CoopBuild {
                                    sg,
                                    loads,
                                    tm,
                                    probe: 0,
                                    wfrag: None,
                                };
                                let Some(src) = coop_source(wdt, epi, rb16, io, build) else {
                                    continue;
                                };
                                let name = variant_name(wdt, epi, rb16, io);
                                let l = loads.name();
                                v.push((format!("{name}[coop,sg{sg},{l},tm{tm}]"), src));
                                // W in fragment order (the H200's element order)
                                let frag = CoopBuild {
                                    wfrag: Some(Layout::NVIDIA),
                                    ..build
                                };
                                if let Some(src) = coop_source(wdt, epi, rb16, io, frag) {
                                    v.push((format!("{name}[coop,sg{sg},{l},tm{tm},wfrag]"), src));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    v
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
    tiles_m: u32,
    tiles_n: u32,
    tiles: u32,
    group: u32,
    has_gate: u32,
    gate_off: u32,
    _p0: u32,
    _p1: u32,
}

/// Output tile edge of the kernel (rows and columns of `y` per workgroup).
const TILE: usize = 64;

/// Row tiles per band of the grouped tile order: the workgroups in flight then share a few
/// x tiles and a few dozen W tiles, which stay in L2. (Neutral on an H200 at ~20 TFLOP/s,
/// where this kernel is bound by workgroup memory, not DRAM; it matters once the tile math is
/// faster or L2 is smaller.)
const GROUP: u32 = 16;

/// Checks the operands; returns `(M, N, K)`.
fn check(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    out: Option<&Tensor>,
) -> Result<(usize, usize, usize)> {
    let ws = w.shape();
    if ws.len() != 2 {
        return Err(Error::shape(format!(
            "linear weight must be [N, K] (out_features, in_features, PyTorch layout), got {ws:?}"
        )));
    }
    let (n, k) = (ws[0], ws[1]);
    let xs = x.shape();
    if xs.is_empty() || xs[xs.len() - 1] != k {
        return Err(Error::shape(format!(
            "linear input {xs:?} must end in K = {k}, the in_features of the weight {ws:?} \
             (W is [N, K]; pass W, not Wᵀ)"
        )));
    }
    let lead = &xs[..xs.len() - 1];
    let m: usize = lead.iter().product();
    crate::ops::elementwise::check_f32_or_f16(gpu, "linear input", x)?;
    if weight_code(w.dtype()).is_none() {
        return Err(Error::shape(format!(
            "linear weight must be f32, f16 or bf16, got {:?}",
            w.dtype()
        )));
    }
    if w.k_order() == KOrder::Frag32 && (w.dtype() != DType::F16 || k % 32 != 0) {
        return Err(Error::shape(format!(
            "a linear weight in fragment order must be f16 with in_features K a multiple of 32 \
             (Gpu::upload_f16_frag), got {:?} {ws:?}",
            w.dtype()
        )));
    }
    if w.dtype() != DType::F32 && k % 2 != 0 {
        return Err(Error::shape(format!(
            "a {:?} linear weight needs an even in_features K (two values per 32-bit word), \
             got K = {k}; pad K to {} with zero columns in W and x, or store W as f32",
            w.dtype(),
            k + 1
        )));
    }
    if let Some(b) = b {
        if b.shape() != [n] {
            return Err(Error::shape(format!(
                "linear bias must be [N] = [{n}] (out_features of the weight {ws:?}), got {:?}",
                b.shape()
            )));
        }
        if b.dtype() != DType::F32 {
            return Err(Error::shape(format!(
                "linear bias must be f32, got {:?}",
                b.dtype()
            )));
        }
    }
    if let Some(out) = out {
        let mut want = lead.to_vec();
        want.push(n);
        if out.shape() != want.as_slice() {
            return Err(Error::shape(format!(
                "linear output must be {want:?} (input {xs:?} with K = {k} replaced by N = \
                 {n}), got {:?} {:?}",
                out.dtype(),
                out.shape()
            )));
        }
        crate::ops::elementwise::check_f32_or_f16(gpu, "linear output", out)?;
        let inputs = [Some(x), Some(w), b];
        if inputs.iter().flatten().any(|t| t.buffer() == out.buffer()) {
            return Err(Error::shape(
                "linear output shares a buffer with an input; in-place linear is not supported, \
                 write to a separate tensor",
            ));
        }
    }
    // 32-bit indexing in the shader: element offsets (plus a few past the end on edge loads)
    // must fit in u32.
    let limit = u32::MAX as usize - 16;
    for (what, count) in [("input", m * k), ("weight", n * k), ("output", m * n)] {
        if count > limit {
            return Err(Error::shape(format!(
                "linear {what} has {count} elements; the kernel indexes with 32 bits (at most \
                 {limit}); split the call along M or N"
            )));
        }
    }
    gpu.check_binding(&format!("linear input {xs:?}"), x.logical_bytes())?;
    gpu.check_binding(
        &format!("linear weight {ws:?} {:?}", w.dtype()),
        w.logical_bytes(),
    )?;
    if let Some(b) = b {
        gpu.check_binding("linear bias", b.logical_bytes())?;
    }
    let out_bytes = (m * n) as u64 * out.map_or(4, |o| o.dtype().size());
    gpu.check_binding(&format!("linear output [{m}, {n}]"), out_bytes)?;
    Ok((m, n, k))
}

/// Where [`KOrder::Frag32`] stores element `k` (0..32) of a run of 32: invocation
/// q = lane % 4 of a subgroup finds the eight k its B fragments hold for one weight row in a
/// 32-k step (2q, 2q + 1, 2q + 8, 2q + 9 and the same + 16) at positions 8q .. 8q + 8, so one
/// 16-byte load brings them (shaders/linalg/linear_loads_wfrag.wgsl).
pub fn frag_position(k: usize) -> usize {
    let (half, r) = (k / 16 % 2, k % 16);
    let (hi8, p) = (r / 8, r % 8);
    (p / 2) * 8 + half * 4 + hi8 * 2 + p % 2
}

/// The element order the tensor-core kernel builds B fragments in from weights in fragment
/// order: the layout probe's, where it also verified B matrices (subgroups of 32 only).
fn frag_layout(gpu: &Gpu) -> std::result::Result<Layout, String> {
    if gpu.caps().coop_subgroup() != Some(32) {
        return Err("needs 16x16 f16 cooperative matrices in subgroups of 32".into());
    }
    let l = crate::gpu::coop_layout::probe(gpu)?;
    if !l.b_ok {
        return Err(
            "the driver's B matrices do not hold their elements in the probed order".into(),
        );
    }
    Ok(l)
}

/// Whether weights uploaded in fragment order ([`Gpu::upload_f16_frag`]) run on this adapter:
/// the tensor-core kernel with B fragments built from storage needs cooperative matrices,
/// subgroups of 32, SPIR-V passthrough and an element order the layout probe verified.
pub fn frag_weights_usable(gpu: &Gpu) -> bool {
    frag_layout(gpu).is_ok()
}

/// Whether [`LinearKernel::Auto`] picks the tensor-core kernel for weights stored as `weights`
/// on this adapter (for inputs of at least 64 rows; smaller ones take the portable kernel):
/// 16-bit weights, 16×16 f16 cooperative matrices, and `NABLA_LINEAR` not `portable`.
pub fn auto_uses_coop(gpu: &Gpu, weights: DType) -> bool {
    weights != DType::F32
        && gpu.caps().coop_subgroup().is_some()
        && std::env::var("NABLA_LINEAR").map_or(true, |v| v != "portable")
}

/// Records `out = act(x·Wᵀ + b)` into `batch` (no allocation, no submission).
///
/// * `x`: `[.., K]` f32 or f16 (`SHADER_F16`) — any leading shape, flattened to `M` rows
///   (`[M, K]` in the DiT).
/// * `w`: `[N, K]` f32, f16 or bf16 (PyTorch `nn.Linear.weight`); 16-bit weights need an even K.
///   f16 weights are decoded with integer ops, so no `SHADER_F16` is needed.
/// * `b`: optional `[N]` f32 bias.
/// * `act`: activation fused after the bias.
/// * `out`: `[.., N]` f32 or f16 (`SHADER_F16`; the f32 result rounded once) with the leading
///   shape of `x`; must not share a buffer with an input.
///
/// Computes in f32 ([`LinearRounding::None`]; [`record_linear_rounded`] selects the bf16
/// autocast rounding, with f32 x and `out` only; see the module docs for 16-bit x). Fails with
/// [`Error::Shape`] on mismatched shapes or dtypes, with [`Error::Unsupported`] for f16 x or
/// `out` on an adapter without `SHADER_F16`, and with [`Error::TooLarge`] when a tensor exceeds
/// the device's storage-binding limit (large weights are not split yet; see the module docs).
pub fn record_linear(
    batch: &mut Batch<'_>,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    act: Activation,
    out: &Tensor,
) -> Result<()> {
    record_linear_with(batch, x, w, b, act, out, LinearKernel::Auto)
}

/// [`record_linear`] with an explicit kernel choice (benchmarks, self-tests).
pub fn record_linear_with(
    batch: &mut Batch<'_>,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    act: Activation,
    out: &Tensor,
    kernel: LinearKernel,
) -> Result<()> {
    record_linear_rounded(batch, x, w, b, act, out, kernel, LinearRounding::None)
}

/// [`record_linear_with`] with a rounding mode: [`LinearRounding::Bf16`] computes what a PyTorch
/// `nn.Linear` (+ activation) under bf16 autocast computes (x, bias, pre-activation and
/// activation output rounded to bf16, f32 accumulation; see [`LinearRounding`]), the Wan DiT's
/// fast path with bf16 weights. [`LinearRounding::None`] is [`record_linear_with`]. Operands and
/// errors as for [`record_linear`].
#[allow(clippy::too_many_arguments)]
pub fn record_linear_rounded(
    batch: &mut Batch<'_>,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    act: Activation,
    out: &Tensor,
    kernel: LinearKernel,
    rounding: LinearRounding,
) -> Result<()> {
    record(batch, x, w, b, Epi::Store(act), out, kernel, rounding)
}

/// Records the linear layer with a gated-residual epilogue into `batch`:
/// `out[.., n] = res[.., n] + gate[row, n] · (x·Wᵀ + b)[.., n]`, or `res + (x·Wᵀ + b)` without a
/// gate. With `out` the same tensor as `res` this is the DiT's in-place residual update
/// `x += gate ⊙ proj(h)` (self-attention output projection, FFN down projection; the
/// cross-attention one has no gate).
///
/// * `x`, `w`, `b`: as for [`record_linear`] (no activation here; x f32 or f16).
/// * `res`: f32 with the shape of `out`.
/// * `gate`: optional `([R, N]` f32 table, `row)`; row `row` (`< R`) is broadcast over all rows
///   of `out` — e.g. the `[6, dim]` modulation table and row 2 or 5.
/// * `out`: `[.., N]` f32 with the leading shape of `x`. It may be `res` itself (the same
///   tensor: bound once, read and written per element by one invocation) or a tensor in another
///   buffer; it must not share a buffer with `x`, `w`, `b` or the gate, nor be another view of
///   `res`'s buffer.
///
/// Computes in f32 and rounds each element exactly as [`record_linear`] followed by
/// [`crate::ops::elementwise::record_gated_residual`] does (`v = acc + b` in f32, then
/// `r + v·g`), so fused and unfused agree up to fma contraction. Fails with [`Error::Shape`] on
/// mismatched shapes, dtypes or aliasing and with [`Error::TooLarge`] past the device's
/// storage-binding limit; nothing is recorded then.
pub fn record_linear_gated_residual(
    batch: &mut Batch<'_>,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    res: &Tensor,
    gate: Option<(&Tensor, u32)>,
    out: &Tensor,
) -> Result<()> {
    record_linear_gated_residual_with(batch, x, w, b, res, gate, out, LinearKernel::Auto)
}

/// [`record_linear_gated_residual`] with an explicit kernel choice (tests, self-tests).
#[allow(clippy::too_many_arguments)]
pub fn record_linear_gated_residual_with(
    batch: &mut Batch<'_>,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    res: &Tensor,
    gate: Option<(&Tensor, u32)>,
    out: &Tensor,
    kernel: LinearKernel,
) -> Result<()> {
    let none = LinearRounding::None;
    record_linear_gated_residual_rounded(batch, x, w, b, res, gate, out, kernel, none)
}

/// [`record_linear_gated_residual_with`] with a rounding mode: with [`LinearRounding::Bf16`]
/// `v = x·Wᵀ + b` is computed as a bf16-autocast Linear (x and bias rounded to bf16, f32
/// accumulation, `v` rounded to bf16; see [`LinearRounding`]) and then `res + gate·v` in f32 —
/// the same values as [`record_linear_rounded`] (no activation) followed by
/// [`crate::ops::elementwise::record_gated_residual`]. [`LinearRounding::None`] is
/// [`record_linear_gated_residual_with`].
#[allow(clippy::too_many_arguments)]
pub fn record_linear_gated_residual_rounded(
    batch: &mut Batch<'_>,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    res: &Tensor,
    gate: Option<(&Tensor, u32)>,
    out: &Tensor,
    kernel: LinearKernel,
    rounding: LinearRounding,
) -> Result<()> {
    let epi = Epi::Residual { res, gate };
    record(batch, x, w, b, epi, out, kernel, rounding)
}

/// The epilogue of one call with its operands.
#[derive(Clone, Copy)]
enum Epi<'a> {
    Store(Activation),
    Residual {
        res: &'a Tensor,
        gate: Option<(&'a Tensor, u32)>,
    },
}

/// Shape/dtype/aliasing checks of the residual operands against `out` (`[.., N]`, already
/// checked); returns whether the update is in place and the gate's element offset.
fn check_residual(
    out: &Tensor,
    res: &Tensor,
    gate: Option<(&Tensor, u32)>,
    inputs: [Option<&Tensor>; 3],
) -> Result<(bool, u32)> {
    let op = "linear_gated_residual";
    if out.dtype() != DType::F32 {
        return Err(Error::shape(format!(
            "{op}: the output must be f32 (the residual stream), got {:?} {:?}; only the plain \
             linear writes f16",
            out.dtype(),
            out.shape()
        )));
    }
    if res.dtype() != DType::F32 || res.shape() != out.shape() {
        return Err(Error::shape(format!(
            "{op}: the residual must be f32 {:?}, the shape of the output, got {:?} {:?}",
            out.shape(),
            res.dtype(),
            res.shape()
        )));
    }
    let in_place = res.buffer() == out.buffer();
    if in_place && res.offset() != out.offset() {
        return Err(Error::shape(format!(
            "{op}: the residual and the output are different views of one buffer (at bytes {} \
             and {}); pass the same tensor for the in-place update, or tensors in separate \
             buffers",
            res.offset(),
            out.offset()
        )));
    }
    let n = out.shape().last().copied().unwrap_or(0);
    let mut gate_off = 0;
    if let Some((g, row)) = gate {
        let gs = g.shape();
        if g.dtype() != DType::F32 || gs.len() != 2 || gs[1] != n {
            return Err(Error::shape(format!(
                "{op}: the gate must be an f32 [R, {n}] table (one row of N = {n} values per \
                 entry, e.g. the [6, {n}] modulation table), got {:?} {gs:?}",
                g.dtype()
            )));
        }
        if row as usize >= gs[0] {
            return Err(Error::shape(format!(
                "{op}: gate row {row} is out of range for a gate table {gs:?} (rows 0..{})",
                gs[0]
            )));
        }
        if g.buffer() == out.buffer() {
            return Err(Error::shape(format!(
                "{op}: the gate table shares a buffer with the output{}; pass the gate in a \
                 tensor of its own",
                if in_place { " (the residual)" } else { "" }
            )));
        }
        gate_off = u32::try_from(row as usize * n).map_err(|_| {
            Error::shape(format!(
                "{op}: gate table {gs:?} has more than 2³² elements; the kernel indexes it with \
                 32 bits"
            ))
        })?;
    }
    if inputs.iter().flatten().any(|t| t.buffer() == out.buffer()) {
        return Err(Error::shape(format!(
            "{op}: the output shares a buffer with x, W or the bias; only the residual may be \
             the output (in place)"
        )));
    }
    Ok((in_place, gate_off))
}

/// Validates, splits oversized activations into row chunks, picks the kernel and dispatches.
#[allow(clippy::too_many_arguments)]
fn record(
    batch: &mut Batch<'_>,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    epi: Epi<'_>,
    out: &Tensor,
    kernel: LinearKernel,
    rounding: LinearRounding,
) -> Result<()> {
    let gpu = batch.gpu();
    if let Epi::Residual { res, gate } = epi {
        // shapes first, so a mismatch is reported as such and not as a failed row chunk (cheap:
        // repeated per chunk and before the dispatch below)
        check_residual(out, res, gate, [Some(x), Some(w), b])?;
    }
    let half = x.dtype() == DType::F16 || out.dtype() == DType::F16;
    if rounding == LinearRounding::Bf16 && half {
        return Err(Error::shape(format!(
            "linear: the bf16-autocast rounding takes f32 x and writes f32 (its rounding of x to \
             bf16 must see the f32 value), got x {:?} and output {:?}",
            x.dtype(),
            out.dtype()
        )));
    }
    // activations larger than one storage binding run in row chunks (views of the same
    // buffers): the 14B FFN at 720p has [67 200, 13 824] f32 = 3.7 GB of hidden activations
    let limit = gpu.caps().max_storage_binding;
    if x.logical_bytes() > limit || out.logical_bytes() > limit {
        let (m, n, k) = (
            x.numel() / x.shape().last().copied().unwrap_or(1).max(1),
            out.shape().last().copied().unwrap_or(1),
            x.shape().last().copied().unwrap_or(1),
        );
        let row_bytes = (n.max(k) * 4) as u64;
        // chunk starts are bound at byte offsets, which must be multiples of 256: 64 rows of
        // any f32 row are; 16-bit rows with an odd width need 128 rows
        let unit = if half { 128 } else { 64 };
        let chunk = ((limit / row_bytes) as usize / unit * unit).max(unit);
        let x2 = x
            .reshape(&[m, k])
            .ok_or_else(|| Error::shape("linear: x is not [M, K]"))?;
        let o2 = out
            .reshape(&[m, n])
            .ok_or_else(|| Error::shape("linear: out is not [M, N]"))?;
        let r2 = match epi {
            Epi::Residual { res, .. } => Some(
                res.reshape(&[m, n])
                    .ok_or_else(|| Error::shape("linear: the residual is not [M, N]"))?,
            ),
            Epi::Store(_) => None,
        };
        let mut r0 = 0;
        while r0 < m {
            let rc = chunk.min(m - r0);
            let (xc, oc) = (x2.rows(r0, rc), o2.rows(r0, rc));
            let (Some(xc), Some(oc)) = (xc, oc) else {
                return Err(Error::shape("linear: row chunk out of range"));
            };
            match (epi, &r2) {
                (Epi::Residual { gate, .. }, Some(r2)) => {
                    let rc = r2
                        .rows(r0, rc)
                        .ok_or_else(|| Error::shape("linear: row chunk out of range"))?;
                    let e = Epi::Residual { res: &rc, gate };
                    record(batch, &xc, w, b, e, &oc, kernel, rounding)?;
                }
                _ => record(batch, &xc, w, b, epi, &oc, kernel, rounding)?,
            }
            r0 += rc;
        }
        return Ok(());
    }
    let (m, n, k) = check(gpu, x, w, b, Some(out))?;
    let (shader_epi, has_gate, gate_off, extra) = match epi {
        Epi::Store(act) => (Epilogue::Store(act), false, 0, [None, None]),
        Epi::Residual { res, gate } => {
            let (in_place, gate_off) = check_residual(out, res, gate, [Some(x), Some(w), b])?;
            if !in_place {
                gpu.check_binding("linear residual", res.logical_bytes())?;
            }
            if let Some((g, _)) = gate {
                gpu.check_binding("linear gate table", g.logical_bytes())?;
            }
            // binding 5 is the gate (without one, `x` fills it, never read: `has_gate` is 0);
            // binding 6 the separate residual
            let g = gate.map_or(x, |(g, _)| g);
            let r = (!in_place).then_some(res);
            (
                Epilogue::Residual { in_place },
                gate.is_some(),
                gate_off,
                [Some(g), r],
            )
        }
    };
    if m == 0 || n == 0 {
        return Ok(());
    }
    let sg = gpu.caps().coop_subgroup();
    let frag = w.k_order() == KOrder::Frag32;
    let need_sg = || {
        sg.ok_or_else(|| Error::Unsupported {
            adapter: gpu.caps().name.clone(),
            feature: "cooperative matrices (16x16 f16, Vulkan, fixed subgroup size)",
            what: "the tensor-core linear kernel".into(),
        })
    };
    let coop = match kernel {
        LinearKernel::Portable => None,
        LinearKernel::Coop => Some(need_sg()?),
        LinearKernel::CoopWith(c) => {
            let sg = need_sg()?;
            if !c.fits(gpu.caps(), sg) {
                return Err(Error::Invalid(format!(
                    "linear: tile configuration {c:?} does not fit {}'s workgroup limits \
                     ({} bytes of workgroup memory, {} invocations); tile_rows must be one of \
                     {COOP_TILE_ROWS:?}",
                    gpu.caps().name,
                    gpu.caps().max_workgroup_storage,
                    gpu.caps().max_invocations
                )));
            }
            Some(sg)
        }
        LinearKernel::Auto if frag => sg,
        LinearKernel::Auto => sg.filter(|_| m >= 64 && auto_uses_coop(gpu, w.dtype())),
    };
    // weights in fragment order run only on the tensor-core kernel that reads them so
    let wfrag = match (frag, coop) {
        (false, _) => None,
        (true, None) => {
            return Err(Error::Invalid(
                "linear: weights in fragment order (Gpu::upload_f16_frag) run only on the \
                 tensor-core kernel; upload them with Gpu::upload_f16 for the portable one"
                    .into(),
            ));
        }
        (true, Some(_)) => Some(frag_layout(gpu).map_err(|why| Error::Unsupported {
            adapter: gpu.caps().name.clone(),
            feature: "cooperative matrix element access",
            what: format!("the linear kernel for weights in fragment order ({why})"),
        })?),
    };
    let cfg = match (kernel, coop) {
        (LinearKernel::CoopWith(c), _) => c,
        (_, Some(sg)) => coop_config(gpu, sg, m, n, k, w.dtype(), x.dtype() == DType::F16),
        _ => CoopConfig::DEFAULT,
    };
    let (tile_m, tile_n) = if coop.is_some() {
        (cfg.tile_rows as usize, 128)
    } else {
        (TILE, TILE)
    };
    let tiles_m = m.div_ceil(tile_m);
    let tiles_n = n.div_ceil(tile_n);
    let tiles = tiles_m * tiles_n;
    let p = Params {
        m: m as u32,
        n: n as u32,
        k: k as u32,
        has_bias: b.is_some() as u32,
        tiles_m: tiles_m as u32,
        tiles_n: tiles_n as u32,
        tiles: u32::try_from(tiles).map_err(|_| {
            Error::shape(format!(
                "linear [{m}, {k}]·[{n}, {k}]ᵀ needs {tiles} tiles, more than 2³² − 1"
            ))
        })?,
        group: if coop.is_some() { cfg.group } else { GROUP },
        has_gate: has_gate as u32,
        gate_off,
        _p0: 0,
        _p1: 0,
    };
    let rb16 = rounding == LinearRounding::Bf16;
    let io = Io {
        x16: x.dtype() == DType::F16,
        y16: out.dtype() == DType::F16,
    };
    let pipe = match coop {
        Some(sg) => {
            // vector loads: 8 values per load for K % 8 == 0 (every DiT shape), 4 for K % 4 == 0
            let loads = Loads::for_k(k);
            // diagnostics only (wrong results): NABLA_LINEAR_PROBE=1 skips the storage loads,
            // 2 the matrix products
            let probe: u32 = std::env::var("NABLA_LINEAR_PROBE")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let tm = cfg.tile_rows;
            let build = CoopBuild {
                sg,
                loads,
                tm,
                probe,
                wfrag,
            };
            let src = coop_source(w.dtype(), shader_epi, rb16, io, build)
                .ok_or_else(|| no_kernel(w, io))?;
            // indices are validated by `check`, then masked or clamped in the loads: no runtime
            // checks (NABLA_CHECKED=1 keeps them)
            let checked = crate::gpu::checked_override();
            let key = format!(
                "{}[coop,sg{sg},{},tm{tm},checked={checked}{}{}]",
                variant_name(w.dtype(), shader_epi, rb16, io),
                loads.name(),
                if probe != 0 {
                    format!(",probe={probe}")
                } else {
                    String::new()
                },
                wfrag.map_or(String::new(), |l| format!(",wfrag,{l:?}"))
            );
            if wfrag.is_some() {
                // element stubs: through the SPIR-V path
                gpu.pipeline_spirv(&key, &src, checked)?
            } else {
                gpu.pipeline(&key, &src, checked)?
            }
        }
        None => {
            let src = source(w.dtype(), shader_epi, rb16, io).ok_or_else(|| no_kernel(w, io))?;
            gpu.pipeline(&variant_name(w.dtype(), shader_epi, rb16, io), &src, true)?
        }
    };
    let groups = groups_2d(tiles, gpu.caps().max_workgroups_per_dim);
    // Without a bias, `x` fills the bias binding (never read: `has_bias` is 0).
    let bias = b.unwrap_or(x);
    let mut buffers = vec![x, w, bias, out];
    buffers.extend(extra.into_iter().flatten());
    batch.dispatch(&pipe, bytemuck::bytes_of(&p), &buffers, groups)
}

/// The error for a combination no kernel variant covers (checked before, so not expected).
fn no_kernel(w: &Tensor, io: Io) -> Error {
    Error::shape(format!(
        "no linear kernel for {:?} weights with {io:?} (f16 x / output)",
        w.dtype()
    ))
}

/// `act(x·Wᵀ + b)` in a new f32 tensor of shape `[.., N]` (allocates, records, submits; does
/// not wait). See [`record_linear`] for the operands, precision and limits.
pub fn linear(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    act: Activation,
) -> Result<Tensor> {
    let (_, n, _) = check(gpu, x, w, b, None)?;
    let xs = x.shape();
    let mut shape = xs[..xs.len() - 1].to_vec();
    shape.push(n);
    let out = gpu.empty(&shape, DType::F32)?;
    let mut batch = gpu.batch();
    record_linear(&mut batch, x, w, b, act, &out)?;
    batch.submit()?;
    Ok(out)
}

/// `res += gate[row] ⊙ (x·Wᵀ + b)` (or `res += x·Wᵀ + b`) in place, submitted (not waited for):
/// [`record_linear_gated_residual`] with `out = res`, where the operands, precision and errors
/// are described.
pub fn linear_gated_residual(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    res: &Tensor,
    gate: Option<(&Tensor, u32)>,
) -> Result<()> {
    let mut batch = gpu.batch();
    record_linear_gated_residual(&mut batch, x, w, b, res, gate, res)?;
    batch.submit()
}
