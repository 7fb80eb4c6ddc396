//! The DiT ops on CUDA: launchers for `src/cuda/kernels/ops.cu`, each mirroring the wgpu op of
//! the same name ([`crate::ops`]) and validated against the same CPU references
//! ([`crate::reference::nn`]).
//!
//! Every launcher checks shapes and dtypes first and returns [`Error::Shape`] naming what is
//! wrong and what would be right, then enqueues one kernel on the [`Cuda`] stream (no
//! synchronization; a download waits for it). Outputs must not overlap inputs except where an
//! op is documented as in place.
//!
//! | op | storage | math |
//! |---|---|---|
//! | [`layer_norm`], [`rms_norm`] | f32 | f32, two-pass with a pivot (as `shaders/nn/norm.wgsl`) |
//! | [`layer_norm`] output | f32 / f16 / bf16 (the fast path's GEMM inputs) | f32, rounded once at the store |
//! | [`add`], [`gated_residual`], [`activation`] | f32 | f32 |
//! | [`bias_activation`] | y f32 / f16 / bf16, bias f32 | f32, 16-bit results rounded to nearest even |
//! | [`rope`] | x f32 / f16 / bf16, tables f32 | f32, 16-bit results rounded to nearest even |
//! | [`rope_split_heads`] | x f32, heads f32 / f16 / bf16, tables f32 | f32, rounded once at the store |
//! | [`split_heads`], [`merge_heads`] | tokens f32 (merge: or f16 / bf16), heads f32 / f16 / bf16 | rounding only |
//! | [`permute_rows`], [`fractal`], [`patchify`], [`unpatchify`] | any 2- or 4-byte type | bit copies |
//! | [`convert`] | f32 → f16 / bf16 | round to nearest even |

use super::launch::Arg;
use super::{Cuda, CudaTensor};
use crate::error::{Error, Result};
use crate::gpu::DType;
use crate::ops::linear::Activation;
use crate::wan::backend::Norm;
use cudarc::driver::LaunchConfig;

/// The NVRTC module of these kernels.
const MODULE: &str = "ops";

/// Threads per block of every kernel here.
const THREADS: u32 = 256;

/// Upper bound on the blocks of a grid-stride launch (the kernels loop over the rest).
const MAX_BLOCKS: u64 = 1 << 22;

/// Launches `name` of `ops.cu` with `args` (in the kernel's parameter order) on the stream.
fn launch(cuda: &Cuda, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    super::launch::launch(cuda, MODULE, super::sources::OPS, name, cfg, args)
}

/// A grid-stride launch over `n` elements.
fn flat(n: u64) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as u64).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row (`rows` ≥ 1).
fn per_row(op: &str, rows: usize) -> Result<LaunchConfig> {
    if rows > i32::MAX as usize {
        return Err(Error::shape(format!(
            "{op}: {rows} rows exceed the {} blocks of one CUDA grid; split the call into row \
             ranges",
            i32::MAX
        )));
    }
    Ok(LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A size as the kernels' `u32`, or an error naming it.
fn u32_of(op: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        Error::shape(format!(
            "{op}: {what} = {v} exceeds the kernel's 32-bit sizes (at most {})",
            u32::MAX
        ))
    })
}

/// Fails unless `t` is f32.
fn check_f32(op: &str, what: &str, t: &CudaTensor) -> Result<()> {
    if t.dtype != DType::F32 {
        return Err(Error::shape(format!(
            "{op}: {what} must be f32, got a {:?} {:?} tensor",
            t.shape, t.dtype
        )));
    }
    Ok(())
}

/// The storage mode of the 16-bit-capable kernels (`MODE_*` in ops.cu).
fn storage_mode(op: &str, what: &str, t: &CudaTensor) -> Result<u32> {
    match t.dtype {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        DType::U32 => Err(Error::shape(format!(
            "{op}: {what} must be f32, f16 or bf16, got a {:?} u32 tensor",
            t.shape
        ))),
    }
}

/// Fails when the byte ranges of `a` and `b` overlap (an output would overwrite an input
/// another thread still reads).
fn check_distinct(op: &str, a: (&str, &CudaTensor), b: (&str, &CudaTensor)) -> Result<()> {
    let (a0, b0) = (a.1.ptr(), b.1.ptr());
    let (a1, b1) = (a0 + a.1.bytes() as u64, b0 + b.1.bytes() as u64);
    if a0 < b1 && b0 < a1 {
        return Err(Error::shape(format!(
            "{op}: {} {:?} and {} {:?} overlap in device memory; give the output its own tensor",
            a.0, a.1.shape, b.0, b.1.shape
        )));
    }
    Ok(())
}

/// Validates `x` `[…, C]` (f32) and `out` of a norm (f32, or with `any_out` also f16 / bf16);
/// returns `(rows, C, out's storage mode)`.
fn norm_rows(
    op: &str,
    x: &CudaTensor,
    out: &CudaTensor,
    eps: f32,
    any_out: bool,
) -> Result<(usize, usize, u32)> {
    check_f32(op, "x", x)?;
    let out_mode = if any_out {
        storage_mode(op, "out", out)?
    } else {
        check_f32(op, "out", out)?;
        0
    };
    let cols = match x.shape.last() {
        Some(&c) if c > 0 => c,
        _ => {
            return Err(Error::shape(format!(
                "{op}: x must be [M, C] with C > 0 (normalized over the last axis), got {:?}",
                x.shape
            )));
        }
    };
    if out.shape != x.shape {
        return Err(Error::shape(format!(
            "{op}: out {:?} must have the shape of x {:?}",
            out.shape, x.shape
        )));
    }
    check_distinct(op, ("x", x), ("out", out))?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::Invalid(format!(
            "{op}: eps must be finite and non-negative, got {eps}"
        )));
    }
    u32_of(op, "the row width C", cols)?;
    Ok((x.numel() / cols, cols, out_mode))
}

/// Fails unless `t` is an f32 `[cols]` vector.
fn check_vector(op: &str, what: &str, t: &CudaTensor, x: &CudaTensor, cols: usize) -> Result<()> {
    check_f32(op, what, t)?;
    if t.shape != [cols] {
        return Err(Error::shape(format!(
            "{op}: {what} {:?} must be [{cols}] for x {:?}",
            t.shape, x.shape
        )));
    }
    Ok(())
}

/// Checks a row of an `[R, cols]` f32 table; returns the table's row count.
fn check_table(op: &str, what: &str, t: &CudaTensor, x: &CudaTensor, cols: usize) -> Result<usize> {
    check_f32(op, what, t)?;
    match *t.shape.as_slice() {
        [r, c] if c == cols => Ok(r),
        _ => Err(Error::shape(format!(
            "{op}: {what} {:?} must be an [R, {cols}] table for x {:?}",
            t.shape, x.shape
        ))),
    }
}

/// LayerNorm of every row of `x` `[…, C]` (C > 0, biased variance, f32 two-pass shifted by the
/// row's first value, as `shaders/nn/norm.wgsl`) into `out` (x's shape, not overlapping x),
/// followed by `mode`'s affine (`weight`, `bias` f32 `[C]`) or modulation step
/// (`y·(1 + mods[scale]) + mods[shift]` with `mods` an f32 `[R, C]` table). `eps` must be finite
/// and non-negative. `out` is f32, or f16 / bf16 (the f32 result rounded to nearest even: the
/// GEMM inputs of the CUDA fast path).
pub fn layer_norm(
    cuda: &Cuda,
    x: &CudaTensor,
    out: &CudaTensor,
    eps: f32,
    mode: &Norm<'_, CudaTensor>,
) -> Result<()> {
    let op = "layer_norm";
    let (rows, cols, out_mode) = norm_rows(op, x, out, eps, true)?;
    let (kind, p0, p1, shift, scale) = match *mode {
        Norm::Plain => (0u32, 0u64, 0u64, 0u32, 0u32),
        Norm::Affine(w, b) => {
            check_vector(op, "weight", w, x, cols)?;
            check_vector(op, "bias", b, x, cols)?;
            (1, w.ptr(), b.ptr(), 0, 0)
        }
        Norm::Modulate { mods, shift, scale } => {
            let r = check_table(op, "mods", mods, x, cols)?;
            for (what, row) in [("shift row", shift), ("scale row", scale)] {
                if row as usize >= r {
                    return Err(Error::shape(format!(
                        "{op}: {what} {row} is out of range for mods {:?} (rows 0..{r})",
                        mods.shape
                    )));
                }
            }
            let off = |row: u32| u32_of(op, "the mods offset", row as usize * cols);
            (2, mods.ptr(), 0, off(shift)?, off(scale)?)
        }
    };
    if rows == 0 {
        return Ok(());
    }
    launch(
        cuda,
        "norm_rows",
        per_row(op, rows)?,
        &[
            Arg::U64(x.ptr()),
            Arg::U64(out.ptr()),
            Arg::U64(p0),
            Arg::U64(p1),
            Arg::U32(rows as u32),
            Arg::U32(cols as u32),
            Arg::F32(eps),
            Arg::U32(kind),
            Arg::U32(shift),
            Arg::U32(scale),
            Arg::U32(out_mode),
        ],
    )
}

/// RMSNorm of every row of `x` `[…, C]` over its full width: `out = x·rsqrt(mean(x²) + eps)·
/// weight` with `weight` f32 `[C]` (the DiT's q/k norms). f32 math; `out` has x's shape and does
/// not overlap x.
pub fn rms_norm(
    cuda: &Cuda,
    x: &CudaTensor,
    weight: &CudaTensor,
    out: &CudaTensor,
    eps: f32,
) -> Result<()> {
    let op = "rms_norm";
    let (rows, cols, _) = norm_rows(op, x, out, eps, false)?;
    check_vector(op, "weight", weight, x, cols)?;
    if rows == 0 {
        return Ok(());
    }
    launch(
        cuda,
        "norm_rows",
        per_row(op, rows)?,
        &[
            Arg::U64(x.ptr()),
            Arg::U64(out.ptr()),
            Arg::U64(weight.ptr()),
            Arg::U64(0),
            Arg::U32(rows as u32),
            Arg::U32(cols as u32),
            Arg::F32(eps),
            Arg::U32(3),
            Arg::U32(0),
            Arg::U32(0),
            Arg::U32(0),
        ],
    )
}

/// `out = a + b` elementwise (f32). `b` has `a`'s shape, or is one row `[1, C]` / `[C]`
/// broadcast over the rows of `a` `[.., C]`; `out` has `a`'s shape (it may be `a` itself, but
/// must not overlap `b` unless it is `b` with the same shape).
pub fn add(cuda: &Cuda, a: &CudaTensor, b: &CudaTensor, out: &CudaTensor) -> Result<()> {
    let op = "add";
    check_f32(op, "a", a)?;
    check_f32(op, "b", b)?;
    check_f32(op, "out", out)?;
    let c = a.shape.last().copied().unwrap_or(0);
    let row = b.numel() == c
        && b.shape.last() == Some(&c)
        && b.shape.iter().rev().skip(1).all(|&d| d == 1);
    if (b.shape != a.shape && !row) || out.shape != a.shape {
        return Err(Error::shape(format!(
            "{op}: a {:?}, b {:?} and out {:?} must have the same shape (or b one row of a's \
             width)",
            a.shape, b.shape, out.shape
        )));
    }
    let same = |t: &CudaTensor| t.ptr() == out.ptr() && t.shape == out.shape;
    if !same(a) {
        check_distinct(op, ("a", a), ("out", out))?;
    }
    if !same(b) {
        check_distinct(op, ("b", b), ("out", out))?;
    }
    let n = a.numel() as u64;
    if n == 0 {
        return Ok(());
    }
    launch(
        cuda,
        "add_f32",
        flat(n),
        &[
            Arg::U64(a.ptr()),
            Arg::U64(b.ptr()),
            Arg::U64(out.ptr()),
            Arg::U64(n),
            Arg::U64(b.numel().max(1) as u64),
        ],
    )
}

/// The residual update in place: `x += y · gate[row]` with `x`, `y` f32 of one shape `[…, C]`
/// and `gate`, when given, an f32 `[R, C]` table and the row to use (`row < R`), broadcast over
/// every row of `x`; `None` gives `x += y`. `x` must not overlap `y` or the gate.
pub fn gated_residual(
    cuda: &Cuda,
    x: &CudaTensor,
    y: &CudaTensor,
    gate: Option<(&CudaTensor, u32)>,
) -> Result<()> {
    let op = "gated_residual";
    check_f32(op, "x", x)?;
    check_f32(op, "y", y)?;
    if y.shape != x.shape {
        return Err(Error::shape(format!(
            "{op}: y {:?} must have the shape of x {:?}",
            y.shape, x.shape
        )));
    }
    let Some(&cols) = x.shape.last() else {
        return Err(Error::shape(format!(
            "{op}: x must have at least one axis [.., C], got {:?}",
            x.shape
        )));
    };
    check_distinct(op, ("x", x), ("y", y))?;
    let g = match gate {
        Some((g, row)) => {
            let r = check_table(op, "gate", g, x, cols)?;
            if row as usize >= r {
                return Err(Error::shape(format!(
                    "{op}: gate row {row} is out of range for a gate table {:?} (rows 0..{r})",
                    g.shape
                )));
            }
            check_distinct(op, ("x", x), ("gate", g))?;
            g.ptr() + (row as usize * cols * 4) as u64
        }
        None => 0,
    };
    let n = x.numel() as u64;
    if n == 0 {
        return Ok(());
    }
    launch(
        cuda,
        "gated_residual_f32",
        flat(n),
        &[
            Arg::U64(x.ptr()),
            Arg::U64(y.ptr()),
            Arg::U64(g),
            Arg::U64(n),
            Arg::U32(u32_of(op, "the row width C", cols.max(1))?),
        ],
    )
}

/// `out = act(x)` elementwise for GELU-tanh or SiLU (f32, same shapes, `out` may be `x`), as the
/// standalone kernel `shaders/nn/elementwise_unary.wgsl` computes them: GELU-tanh as
/// `x / (1 + exp(−2u))` with the tanh argument `u` clamped to `[−44, 15]` (exactly 0 for
/// `u ≤ −44`), SiLU as `x / (1 + exp(−x))` with the exponent clamped to 88 (exactly 0 for
/// `x ≤ −88`): no input gives NaN except NaN.
pub fn activation(cuda: &Cuda, x: &CudaTensor, act: Activation, out: &CudaTensor) -> Result<()> {
    let op = "activation";
    let code = match act {
        Activation::GeluTanh => 0u32,
        Activation::Silu => 1,
        Activation::None => {
            return Err(Error::Invalid(
                "activation None is not an op (use GeluTanh or Silu)".into(),
            ));
        }
    };
    check_f32(op, "x", x)?;
    check_f32(op, "out", out)?;
    if out.shape != x.shape {
        return Err(Error::shape(format!(
            "{op}: out {:?} must have the shape of x {:?}",
            out.shape, x.shape
        )));
    }
    if out.ptr() != x.ptr() {
        check_distinct(op, ("x", x), ("out", out))?;
    }
    let n = x.numel() as u64;
    if n == 0 {
        return Ok(());
    }
    launch(
        cuda,
        "unary_f32",
        flat(n),
        &[
            Arg::U64(x.ptr()),
            Arg::U64(out.ptr()),
            Arg::U64(n),
            Arg::U32(code),
        ],
    )
}

/// The linear layer's epilogue in place on `y` `[…, N]` (f32, f16 or bf16; f32 math, 16-bit
/// results rounded to nearest even): `y = act(y + bias)` with `bias` an optional f32 `[N]`, the activation as `shaders/linalg/linear_common.wgsl` computes it
/// (GELU-tanh `0.5·v·(1 + tanh(t))` with `t` clamped to `[−15, 15]`; SiLU
/// `v / (1 + exp(min(−v, 80)))`). Used by [`super::gemm::linear`] where cuBLASLt does not fuse
/// the step.
pub fn bias_activation(
    cuda: &Cuda,
    y: &CudaTensor,
    bias: Option<&CudaTensor>,
    act: Activation,
) -> Result<()> {
    let op = "bias_activation";
    let mode = storage_mode(op, "y", y)?;
    let cols = y.shape.last().copied().unwrap_or(1);
    if let Some(b) = bias {
        check_vector(op, "bias", b, y, cols)?;
        check_distinct(op, ("y", y), ("bias", b))?;
    }
    let code = match act {
        Activation::None => 0u32,
        Activation::GeluTanh => 1,
        Activation::Silu => 2,
    };
    let n = y.numel() as u64;
    if n == 0 || (bias.is_none() && act == Activation::None) {
        return Ok(());
    }
    launch(
        cuda,
        "bias_act_any",
        flat(n),
        &[
            Arg::U64(y.ptr()),
            Arg::U64(bias.map_or(0, |b| b.ptr())),
            Arg::U64(n),
            Arg::U32(u32_of(op, "the row width N", cols.max(1))?),
            Arg::U32(code),
            Arg::U32(mode),
        ],
    )
}

/// Converts f32 `x` into `out` of the same element count stored as f16 or bf16 (round to
/// nearest even, as `half::{f16, bf16}::from_f32`: f16 overflow gives ±inf, NaN stays NaN).
pub fn convert(cuda: &Cuda, x: &CudaTensor, out: &CudaTensor) -> Result<()> {
    let op = "convert";
    check_f32(op, "x", x)?;
    let mode = match out.dtype {
        DType::F16 => 1u32,
        DType::BF16 => 2,
        other => {
            return Err(Error::shape(format!(
                "{op}: out must be f16 or bf16 (the f32 input is rounded into it), got {other:?}"
            )));
        }
    };
    if out.numel() != x.numel() {
        return Err(Error::shape(format!(
            "{op}: out {:?} must have the element count of x {:?}",
            out.shape, x.shape
        )));
    }
    check_distinct(op, ("x", x), ("out", out))?;
    convert_raw(cuda, x.ptr(), out.ptr(), x.numel() as u64, mode)
}

/// [`convert`] on raw device addresses (the GEMM's reusable input workspace); `mode` 1 = f16,
/// 2 = bf16. The caller guarantees both ranges hold `n` elements.
pub(crate) fn convert_raw(cuda: &Cuda, x: u64, out: u64, n: u64, mode: u32) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    launch(
        cuda,
        "convert_f32",
        flat(n),
        &[Arg::U64(x), Arg::U64(out), Arg::U64(n), Arg::U32(mode)],
    )
}

/// Validates a RoPE head dimension and grid (the checks `crate::ops::rope::rope_tables` asserts).
fn check_rope_grid(head_dim: usize, grid: (usize, usize, usize), fractal: bool) -> Result<()> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(Error::shape(format!(
            "RoPE head_dim must be a positive even number (channels form pairs), got {head_dim}"
        )));
    }
    crate::ops::rope::check_grid(grid, fractal)
}

/// The per-token RoPE tables `(cos, sin)`, f32 `[S, head_dim/2]`, of a patch grid `(F, H, W)` in
/// natural or fractal token order: the host computation of the wgpu layer
/// ([`crate::ops::rope::rope_tables`], f64 angles), uploaded. Not cached here
/// ([`super::CudaBackend`] caches them per grid).
pub fn rope_tables(
    cuda: &Cuda,
    grid: (usize, usize, usize),
    head_dim: usize,
    fractal: bool,
) -> Result<(CudaTensor, CudaTensor)> {
    check_rope_grid(head_dim, grid, fractal)?;
    let (cos, sin) = crate::ops::rope::rope_tables(grid, head_dim, fractal);
    let shape = [grid.0 * grid.1 * grid.2, head_dim / 2];
    Ok((
        cuda.upload_f32(&cos, &shape)?,
        cuda.upload_f32(&sin, &shape)?,
    ))
}

/// RoPE of `x` in place with per-token tables `cos`, `sin` (f32 `[S, D/2]`, the same angles for
/// every head): `x[2j] ← x[2j]·cos − x[2j+1]·sin`, `x[2j+1] ← x[2j]·sin + x[2j+1]·cos` in f32.
/// `x` is `[S, heads·D]`, `[S, heads, D]` or `[1, S, heads, D]`, stored f32, f16 or bf16
/// (16-bit results rounded to nearest even); the tables' row order must match x's token order.
pub fn rope(
    cuda: &Cuda,
    x: &CudaTensor,
    cos: &CudaTensor,
    sin: &CudaTensor,
    heads: usize,
) -> Result<()> {
    let cs = cos.shape.as_slice();
    if cs.len() != 2 || cos.dtype != DType::F32 {
        return Err(Error::shape(format!(
            "RoPE cos table must be f32 [S, D/2], got {cs:?} {:?}",
            cos.dtype
        )));
    }
    if sin.shape != cs || sin.dtype != DType::F32 {
        return Err(Error::shape(format!(
            "RoPE sin table {:?} {:?} must match cos {cs:?} F32",
            sin.shape, sin.dtype
        )));
    }
    let (s, half) = (cs[0], cs[1]);
    if half == 0 {
        return Err(Error::shape("RoPE tables have no pair columns (D/2 = 0)"));
    }
    if heads == 0 {
        return Err(Error::shape("RoPE needs at least one head"));
    }
    let d = 2 * half;
    let ok = match *x.shape.as_slice() {
        [a, b] => a == s && b == heads * d,
        [a, b, c] => a == s && b == heads && c == d,
        [1, a, b, c] => a == s && b == heads && c == d,
        _ => false,
    };
    if !ok {
        return Err(Error::shape(format!(
            "RoPE input {:?} does not fit tables of {s} tokens x {half} pairs with {heads} \
             heads: expected [{s}, {}], [{s}, {heads}, {d}] or [1, {s}, {heads}, {d}]",
            x.shape,
            heads * d
        )));
    }
    let mode = storage_mode("RoPE", "the input", x)?;
    check_distinct("RoPE", ("x", x), ("cos", cos))?;
    check_distinct("RoPE", ("x", x), ("sin", sin))?;
    let pairs = (x.numel() / 2) as u64;
    if pairs == 0 {
        return Ok(());
    }
    launch(
        cuda,
        "rope_any",
        flat(pairs),
        &[
            Arg::U64(x.ptr()),
            Arg::U64(cos.ptr()),
            Arg::U64(sin.ptr()),
            Arg::U64(pairs),
            Arg::U32(u32_of("RoPE", "heads·D/2", heads * half)?),
            Arg::U32(half as u32),
            Arg::U32(mode),
        ],
    )
}

/// `[H, S, D]` from `[H, S, D]` or `[1, H, S, D]`.
fn heads_shape(op: &str, what: &str, shape: &[usize]) -> Result<(usize, usize, usize)> {
    match *shape {
        [h, s, d] | [1, h, s, d] => Ok((h, s, d)),
        _ => Err(Error::shape(format!(
            "{op}: {what} must be [H, S, D] or [1, H, S, D], got {shape:?}"
        ))),
    }
}

/// `[S, H·D]` from `[S, H·D]` or `[1, S, H·D]`.
fn tokens_shape(shape: &[usize]) -> Option<(usize, usize)> {
    match *shape {
        [s, c] | [1, s, c] => Some((s, c)),
        _ => None,
    }
}

fn heads_move(
    cuda: &Cuda,
    merge: bool,
    x: &CudaTensor,
    out: &CudaTensor,
    mode: u32,
    out_mode: u32,
    (h, s, d): (usize, usize, usize),
) -> Result<()> {
    let op = if merge { "merge_heads" } else { "split_heads" };
    check_distinct(op, ("x", x), ("out", out))?;
    let n = (h * s * d) as u64;
    if n == 0 {
        return Ok(());
    }
    let mut args = vec![
        Arg::U64(x.ptr()),
        Arg::U64(out.ptr()),
        Arg::U64(n),
        Arg::U32(u32_of(op, "S", s)?),
        Arg::U32(u32_of(op, "H", h)?),
        Arg::U32(u32_of(op, "D", d)?),
        Arg::U32(mode),
    ];
    let name = if merge {
        // merge_heads_any also takes the output's storage mode
        args.push(Arg::U32(out_mode));
        "merge_heads_any"
    } else {
        "split_heads_any"
    };
    launch(cuda, name, flat(n), &args)
}

/// RoPE fused with the head split: `out[h, s, :] = RoPE(x[s, h·D .. (h+1)·D])` with per-token
/// tables `cos`, `sin` (f32 `[S, D/2]`, the rotation of [`rope`], f32 math). `x` is f32
/// `[S, H·D]` (or `[1, S, H·D]`) and is not modified; `out` is `[H, S, D]` or `[1, H, S, D]`,
/// stored f32, f16 or bf16 (rounded once, to nearest even), not overlapping `x`. Equals
/// [`rope`] in f32 followed by [`split_heads`], in one pass.
pub fn rope_split_heads(
    cuda: &Cuda,
    x: &CudaTensor,
    cos: &CudaTensor,
    sin: &CudaTensor,
    out: &CudaTensor,
) -> Result<()> {
    let op = "rope_split_heads";
    let (h, s, d, mode) = check_rope_split_heads(op, x, cos, sin, out)?;
    let pairs = (h * s * d / 2) as u64;
    if pairs == 0 {
        return Ok(());
    }
    // the blocked kernel (nabla.cu, shared with the fused RoPE + pooling): 16-byte loads of x,
    // one CTA per (64 tokens, head); the grid-stride kernel below covers every other case
    let aligned = [x, cos, sin, out]
        .iter()
        .all(|t| t.ptr().is_multiple_of(16));
    if cuda.compute_capability().0 >= 8
        && d.is_multiple_of(4)
        && d <= 512
        && h <= 65535
        && aligned
        && u32::try_from(s).is_ok()
    {
        let name = match out.dtype {
            DType::F16 => "nabla_rope_f16",
            DType::BF16 => "nabla_rope_bf16",
            _ => "nabla_rope_f32",
        };
        return super::launch::launch(
            cuda,
            "nabla",
            super::sources::NABLA,
            name,
            super::nabla::grid_128(s.div_ceil(64) as u32, h as u32),
            &[
                Arg::U64(x.ptr()),
                Arg::U64(cos.ptr()),
                Arg::U64(sin.ptr()),
                Arg::U64(out.ptr()),
                Arg::U32(s as u32),
                Arg::U32(h as u32),
                Arg::U32(d as u32),
            ],
        );
    }
    launch(
        cuda,
        "rope_split_heads_any",
        flat(pairs),
        &[
            Arg::U64(x.ptr()),
            Arg::U64(cos.ptr()),
            Arg::U64(sin.ptr()),
            Arg::U64(out.ptr()),
            Arg::U64(pairs),
            Arg::U32(u32_of(op, "S", s)?),
            Arg::U32(u32_of(op, "H", h)?),
            Arg::U32((d / 2) as u32),
            Arg::U32(mode),
        ],
    )
}

/// The operand checks of [`rope_split_heads`] (also the fused RoPE + pooling of
/// [`super::nabla::rope_split_heads_pooled`]): returns (H, S, D, out's storage mode).
pub(super) fn check_rope_split_heads(
    op: &str,
    x: &CudaTensor,
    cos: &CudaTensor,
    sin: &CudaTensor,
    out: &CudaTensor,
) -> Result<(usize, usize, usize, u32)> {
    check_f32(op, "x", x)?;
    let mode = storage_mode(op, "out", out)?;
    let (h, s, d) = heads_shape(op, "out", &out.shape)?;
    if tokens_shape(&x.shape) != Some((s, h * d)) {
        return Err(Error::shape(format!(
            "{op}: x {:?} must be [S, H·D] = [{s}, {}] for out {:?} (H = {h}, S = {s}, D = {d})",
            x.shape,
            h * d,
            out.shape
        )));
    }
    if d == 0 || !d.is_multiple_of(2) {
        return Err(Error::shape(format!(
            "{op}: head dim D = {d} must be positive and even (channels form pairs)"
        )));
    }
    for (what, t) in [("cos", cos), ("sin", sin)] {
        if t.dtype != DType::F32 || t.shape != [s, d / 2] {
            return Err(Error::shape(format!(
                "{op}: RoPE {what} table must be f32 [S, D/2] = [{s}, {}], got {:?} {:?}",
                d / 2,
                t.shape,
                t.dtype
            )));
        }
        check_distinct(op, (what, t), ("out", out))?;
    }
    check_distinct(op, ("x", x), ("out", out))?;
    Ok((h, s, d, mode))
}

/// Splits `x` `[S, H·D]` (f32, optionally with a leading axis of 1) into heads:
/// `out[h, s, d] = x[s, h·D + d]`. H, S and D come from `out`, `[H, S, D]` or `[1, H, S, D]`,
/// stored f32, f16 or bf16 (rounded to nearest even); `out` must not overlap `x`.
pub fn split_heads(cuda: &Cuda, x: &CudaTensor, out: &CudaTensor) -> Result<()> {
    let op = "split_heads";
    check_f32(op, "x", x)?;
    let mode = storage_mode(op, "out", out)?;
    let (h, s, d) = heads_shape(op, "out", &out.shape)?;
    if tokens_shape(&x.shape) != Some((s, h * d)) {
        return Err(Error::shape(format!(
            "{op}: x {:?} must be [S, H·D] = [{s}, {}] for out {:?} (H = {h}, S = {s}, D = {d})",
            x.shape,
            h * d,
            out.shape
        )));
    }
    heads_move(cuda, false, x, out, mode, 0, (h, s, d))
}

/// Merges heads `x` `[H, S, D]` (or `[1, H, S, D]`; f32, f16 or bf16) into `out` `[S, H·D]` (or
/// `[1, S, H·D]`; f32, f16 or bf16, rounded to nearest even where narrower than x):
/// `out[s, h·D + d] = x[h, s, d]`; `out` must not overlap `x`.
pub fn merge_heads(cuda: &Cuda, x: &CudaTensor, out: &CudaTensor) -> Result<()> {
    let op = "merge_heads";
    let mode = storage_mode(op, "x", x)?;
    let out_mode = storage_mode(op, "out", out)?;
    let (h, s, d) = heads_shape(op, "x", &x.shape)?;
    if tokens_shape(&out.shape) != Some((s, h * d)) {
        return Err(Error::shape(format!(
            "{op}: out {:?} must be [S, H·D] = [{s}, {}] for x {:?} (H = {h}, S = {s}, D = {d})",
            out.shape,
            h * d,
            x.shape
        )));
    }
    heads_move(cuda, true, x, out, mode, out_mode, (h, s, d))
}

/// Validates a fractal grid `(F, H, W)` (H, W positive multiples of 8); returns `S = F·H·W`.
fn fractal_tokens(grid: (usize, usize, usize)) -> Result<usize> {
    let (f, h, w) = grid;
    if h % 8 != 0 || w % 8 != 0 || h == 0 || w == 0 || f == 0 {
        return Err(Error::shape(format!(
            "fractal order needs F > 0 and H, W positive multiples of 8, got grid {f}x{h}x{w}"
        )));
    }
    Ok(f * h * w)
}

/// The row permutation of the fractal token order of a grid `(F, H, W)` as a u32 `[S]` tensor
/// for [`permute_rows`]: `perm[j]` = natural index of the token at fractal position `j`
/// ([`crate::reference::fractal_perm`]), or with `inverse` the fractal position of natural
/// token `j` ([`crate::reference::inverse_perm`]). H and W must be multiples of 8.
pub fn fractal_perm(cuda: &Cuda, grid: (usize, usize, usize), inverse: bool) -> Result<CudaTensor> {
    let s = fractal_tokens(grid)?;
    u32_of("fractal order", "the token count S", s)?;
    let mut perm = crate::reference::fractal_perm(grid.0, grid.1, grid.2);
    if inverse {
        perm = crate::reference::inverse_perm(&perm);
    }
    let p: Vec<u32> = perm.into_iter().map(|v| v as u32).collect();
    cuda.upload_bytes(bytemuck::cast_slice(&p), &[s], DType::U32)
}

/// Gathers rows: `dst[r] = src[perm[r]]` for `src`, `dst` `[R, C]` of one dtype (rows of a
/// whole number of 16-bit units) and `perm` a u32 `[R]` permutation whose entries are `< R`
/// (not checked on the device: build it with [`fractal_perm`]). `dst` must not overlap `src`.
pub fn permute_rows(
    cuda: &Cuda,
    src: &CudaTensor,
    dst: &CudaTensor,
    perm: &CudaTensor,
) -> Result<()> {
    let op = "permute_rows";
    let shape = &src.shape;
    if shape.len() != 2 {
        return Err(Error::shape(format!(
            "{op}: src must be [R, C], got {shape:?}"
        )));
    }
    if dst.shape != *shape || dst.dtype != src.dtype {
        return Err(Error::shape(format!(
            "{op}: dst {:?} {:?} must match src {shape:?} {:?}",
            dst.shape, dst.dtype, src.dtype
        )));
    }
    let rows = shape[0];
    if perm.dtype != DType::U32 || perm.shape != [rows] {
        return Err(Error::shape(format!(
            "{op}: perm must be a u32 [{rows}] permutation for src {shape:?}, got {:?} {:?}",
            perm.shape, perm.dtype
        )));
    }
    check_distinct(op, ("src", src), ("dst", dst))?;
    let row_bytes = shape[1] as u64 * src.dtype.size();
    if rows == 0 || row_bytes == 0 {
        return Ok(());
    }
    let (kernel, words) = if row_bytes.is_multiple_of(4) {
        ("gather_rows_u32", row_bytes / 4)
    } else {
        ("gather_rows_u16", row_bytes / 2)
    };
    launch(
        cuda,
        kernel,
        per_row(op, rows)?,
        &[
            Arg::U64(src.ptr()),
            Arg::U64(dst.ptr()),
            Arg::U64(perm.ptr()),
            Arg::U32(rows as u32),
            Arg::U64(words),
        ],
    )
}

/// Reorders the rows of `src` `[F·H·W, C]` into `dst` (same shape and dtype): natural → fractal
/// order, or fractal → natural with `inverse`. Uploads the permutation on every call (a
/// synchronizing copy); [`super::CudaBackend`] caches it per grid and calls [`permute_rows`].
pub fn fractal(
    cuda: &Cuda,
    src: &CudaTensor,
    dst: &CudaTensor,
    grid: (usize, usize, usize),
    inverse: bool,
) -> Result<()> {
    check_fractal_rows(src, grid)?;
    let perm = fractal_perm(cuda, grid, inverse)?;
    permute_rows(cuda, src, dst, &perm)
}

/// Fails unless `src` is `[F·H·W, C]` for a valid fractal grid.
pub(crate) fn check_fractal_rows(src: &CudaTensor, grid: (usize, usize, usize)) -> Result<()> {
    let rows = fractal_tokens(grid)?;
    if src.shape.len() != 2 || src.shape[0] != rows {
        return Err(Error::shape(format!(
            "fractal order of grid {}x{}x{} expects a [{rows}, C] tensor, got {:?}",
            grid.0, grid.1, grid.2, src.shape
        )));
    }
    Ok(())
}

/// Checks a latent `[C, F, H, W]` (no empty axis, H and W even); returns its dims.
fn latent_dims(what: &str, shape: &[usize]) -> Result<(usize, usize, usize, usize)> {
    let [c, f, h, w] = *shape else {
        return Err(Error::shape(format!(
            "{what} must be a latent [C, F, H, W], got {shape:?}"
        )));
    };
    if c == 0 || f == 0 || h == 0 || w == 0 {
        return Err(Error::shape(format!("{what} {shape:?} has an empty axis")));
    }
    if h % 2 != 0 || w % 2 != 0 {
        return Err(Error::shape(format!(
            "{what} {shape:?}: patch size (1, 2, 2) needs even H and W, got H = {h}, W = {w}"
        )));
    }
    Ok((c, f, h, w))
}

/// Validates a latent / tokens pair and launches the patch kernel `base` (`_u32` / `_u16`).
fn patch_op(
    cuda: &Cuda,
    op: &str,
    latent: &CudaTensor,
    tokens: &CudaTensor,
    src: &CudaTensor,
    dst: &CudaTensor,
) -> Result<()> {
    let (c, f, h, w) = latent_dims(&format!("{op} latent"), &latent.shape)?;
    let s = f * (h / 2) * (w / 2);
    if tokens.shape != [s, 4 * c] {
        return Err(Error::shape(format!(
            "{op}: latent {:?} has {s} patches of {} values, so tokens must be [{s}, {}], got {:?}",
            latent.shape,
            4 * c,
            4 * c,
            tokens.shape
        )));
    }
    if tokens.dtype != latent.dtype {
        return Err(Error::shape(format!(
            "{op}: tokens {:?} and latent {:?} must have the same element type",
            tokens.dtype, latent.dtype
        )));
    }
    let suffix = match latent.dtype.size() {
        4 => "u32",
        2 => "u16",
        _ => {
            return Err(Error::shape(format!(
                "{op}: element type {:?} is not 2 or 4 bytes",
                latent.dtype
            )));
        }
    };
    check_distinct(op, ("input", src), ("output", dst))?;
    let mut dims = [0u32; 4];
    for (slot, (what, v)) in dims
        .iter_mut()
        .zip([("C", c), ("F", f), ("H", h), ("W", w)])
    {
        *slot = u32_of(op, what, v)?;
    }
    launch(
        cuda,
        &format!("{op}_{suffix}"),
        flat(latent.numel() as u64),
        &[
            Arg::U64(src.ptr()),
            Arg::U64(dst.ptr()),
            Arg::U32(dims[0]),
            Arg::U32(dims[1]),
            Arg::U32(dims[2]),
            Arg::U32(dims[3]),
        ],
    )
}

/// Patch gather `z [C, F, H, W]` → `tokens [F·(H/2)·(W/2), 4C]`:
/// `tokens[s, (c·2 + q)·2 + r] = z[c, f, 2h+q, 2w+r]` with `s = (f·H/2 + h)·W/2 + w`. H and W
/// even; `tokens` has `z`'s element type (any 2- or 4-byte type) and does not overlap it.
pub fn patchify(cuda: &Cuda, z: &CudaTensor, tokens: &CudaTensor) -> Result<()> {
    patch_op(cuda, "patchify", z, tokens, z, tokens)
}

/// Unpatchify `out [F·(H/2)·(W/2), 4C]` → `v [C, F, H, W]`:
/// `v[c, f, 2h+q, 2w+r] = out[s, q·2C + r·C + c]` (tokens in natural order). The shape of `v`
/// gives C, F, H, W (H and W even); `out` has `v`'s element type and does not overlap it.
pub fn unpatchify(cuda: &Cuda, out: &CudaTensor, v: &CudaTensor) -> Result<()> {
    patch_op(cuda, "unpatchify", v, out, out, v)
}
