//! Elementwise ops of the DiT on f32 tensors: `add` (the modulation table `m = modulation + e0`),
//! the gated residual `x += y·gate` (in place), the GELU_tanh and SiLU activations, and the
//! head layout moves `[S, H·D] ↔ [H, S, D]` that the attention kernels need.
//!
//! Kernels: `shaders/nn/elementwise_{add,residual,unary}.wgsl` and `shaders/nn/heads.wgsl`. Each
//! has a scalar and a `vec4` variant; the dispatcher picks `vec4` whenever the sizes allow it
//! (element count, row width or head dimension a multiple of 4). One thread per element, 256
//! per workgroup, on a 2-D grid (`groups_2d`) so any size within the binding
//! limits dispatches. CPU references: [`crate::reference::nn::elementwise`].

use crate::error::{Error, Result};
use crate::gpu::{Batch, DType, Gpu, Tensor, groups_2d};

const ADD: &str = include_str!("../../shaders/nn/elementwise_add.wgsl");
const RESIDUAL: &str = include_str!("../../shaders/nn/elementwise_residual.wgsl");
const UNARY: &str = include_str!("../../shaders/nn/elementwise_unary.wgsl");
const HEADS: &str = include_str!("../../shaders/nn/heads.wgsl");

/// Threads per workgroup of every kernel here.
const WG: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    a: u32,
    b: u32,
    c: u32,
    d: u32,
}

/// The `V` alias of a variant: `vec4<f32>` (4 lanes) or `f32` (1 lane).
fn width_prelude(vec4: bool) -> &'static str {
    if vec4 {
        "alias V = vec4<f32>;\n"
    } else {
        "alias V = f32;\n"
    }
}

fn width_tag(vec4: bool) -> &'static str {
    if vec4 { "vec4" } else { "f32" }
}

/// An activation applied elementwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unary {
    GeluTanh,
    Silu,
}

impl Unary {
    fn name(self) -> &'static str {
        match self {
            Unary::GeluTanh => "gelu_tanh",
            Unary::Silu => "silu",
        }
    }
    fn code(self) -> u32 {
        match self {
            Unary::GeluTanh => 0,
            Unary::Silu => 1,
        }
    }
}

fn add_variant(vec4: bool) -> (String, String) {
    (
        format!("nn/elementwise_add[{}]", width_tag(vec4)),
        format!("{}{ADD}", width_prelude(vec4)),
    )
}

fn residual_variant(vec4: bool, gated: bool) -> (String, String) {
    let contrib = if gated {
        "@group(0) @binding(3) var<storage, read> gate: array<V>;\n\
         fn contrib(i: u32) -> V { return y[i] * gate[P.gate_off + i % P.cv]; }\n"
    } else {
        "fn contrib(i: u32) -> V { return y[i]; }\n"
    };
    (
        format!(
            "nn/elementwise_residual[{},{}]",
            if gated { "gated" } else { "plain" },
            width_tag(vec4)
        ),
        format!("{}{contrib}{RESIDUAL}", width_prelude(vec4)),
    )
}

fn unary_variant(op: Unary, vec4: bool) -> (String, String) {
    (
        format!("nn/elementwise_unary[{},{}]", op.name(), width_tag(vec4)),
        format!(
            "{}const OP: u32 = {}u;\n{UNARY}",
            width_prelude(vec4),
            op.code()
        ),
    )
}

/// `half`: the heads side (split output, merge input) is f16 storage; `tokens_half`: the
/// tokens side (merge output: the merged heads that only feed a GEMM) is.
fn heads_variant(merge: bool, vec4: bool, half: bool, tokens_half: bool) -> (String, String) {
    let (f, h) = if vec4 {
        ("vec4<f32>", "vec4<f16>")
    } else {
        ("f32", "f16")
    };
    let (heads, tokens) = (if half { h } else { f }, if tokens_half { h } else { f });
    let (vi, vo) = if merge {
        (heads, tokens)
    } else {
        (tokens, heads)
    };
    let enable = if half || tokens_half {
        "enable f16;\n"
    } else {
        ""
    };
    (
        format!(
            "nn/heads[{},{}{}{}]",
            if merge { "merge" } else { "split" },
            width_tag(vec4),
            if half { ",f16" } else { "" },
            if tokens_half { ",tokens_f16" } else { "" }
        ),
        format!(
            "{enable}alias VI = {vi};\nalias VO = {vo};\nconst MERGE: bool = {merge};\n{HEADS}"
        ),
    )
}

/// Every shader variant of this module: `(name, WGSL source)`.
pub fn variants() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for vec4 in [false, true] {
        v.push(add_variant(vec4));
        for gated in [false, true] {
            v.push(residual_variant(vec4, gated));
        }
        for op in [Unary::GeluTanh, Unary::Silu] {
            v.push(unary_variant(op, vec4));
        }
        for merge in [false, true] {
            v.push(heads_variant(merge, vec4, false, false));
            v.push(heads_variant(merge, vec4, true, false));
        }
        // merge into f16 tokens (from f16 or f32 heads)
        v.push(heads_variant(true, vec4, true, true));
        v.push(heads_variant(true, vec4, false, true));
    }
    v
}

/// Fails unless `t` is an f32 tensor (`what` names it in the message).
pub(crate) fn check_f32(what: &str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(Error::shape(format!(
            "{what} must be f32, got a {:?} {:?} tensor",
            t.shape(),
            t.dtype()
        )));
    }
    Ok(())
}

/// Fails unless `t` is f32, or f16 on an adapter with `SHADER_F16` (the storage types the
/// half-capable kernels take: GEMM inputs and outputs, heads, norm outputs).
pub(crate) fn check_f32_or_f16(gpu: &Gpu, what: &str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 => Ok(()),
        DType::F16 if gpu.caps().f16 => Ok(()),
        DType::F16 => Err(Error::Unsupported {
            adapter: gpu.caps().name.clone(),
            feature: "SHADER_F16",
            what: format!("{what} stored as f16"),
        }),
        d => Err(Error::shape(format!(
            "{what} must be f32 or f16, got a {:?} {d:?} tensor",
            t.shape()
        ))),
    }
}

/// Fails when `a` and `b` share a buffer: a kernel cannot read one binding while writing
/// another view of the same buffer (wgpu rejects it).
pub(crate) fn check_distinct(op: &str, a: (&str, &Tensor), b: (&str, &Tensor)) -> Result<()> {
    if std::sync::Arc::ptr_eq(&a.1.buffer, &b.1.buffer) {
        return Err(Error::shape(format!(
            "{op}: {} {:?} and {} {:?} share one GPU buffer; give the output its own tensor",
            a.0,
            a.1.shape(),
            b.0,
            b.1.shape()
        )));
    }
    Ok(())
}

/// Fails when an element count does not fit the kernels' 32-bit indices, or a tensor exceeds
/// the device's storage-binding limit.
pub(crate) fn check_size(gpu: &Gpu, op: &str, name: &str, t: &Tensor) -> Result<()> {
    if t.numel() > u32::MAX as usize {
        return Err(Error::shape(format!(
            "{op}: {name} {:?} has {} elements; the kernels index with 32 bits (at most {})",
            t.shape(),
            t.numel(),
            u32::MAX
        )));
    }
    gpu.check_binding(&format!("{op} {name} {:?}", t.shape()), t.logical_bytes())
}

/// The 2-D grid for `n` elements, one per thread.
fn flat_groups(gpu: &Gpu, n: usize) -> [u32; 3] {
    groups_2d(n.div_ceil(WG), gpu.caps().max_workgroups_per_dim)
}

/// Records `out = a + b` elementwise (f32, `out` its own buffer with `a`'s shape). `b` has
/// `a`'s shape, or is one row `[1, C]` / `[C]` broadcast over the rows of `a` `[.., C]`.
/// Used for the DiT's modulation tables `m = modulation + e0` and `head.modulation + e`.
pub fn record_add(batch: &mut Batch<'_>, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<()> {
    check_f32("add: a", a)?;
    check_f32("add: b", b)?;
    check_f32("add: out", out)?;
    let c = a.shape().last().copied().unwrap_or(0);
    let row = b.numel() == c
        && b.shape().last() == Some(&c)
        && b.shape().iter().rev().skip(1).all(|&d| d == 1);
    if (b.shape() != a.shape() && !row) || out.shape() != a.shape() {
        return Err(Error::shape(format!(
            "add: a {:?}, b {:?} and out {:?} must have the same shape (or b one row of a's width)",
            a.shape(),
            b.shape(),
            out.shape()
        )));
    }
    check_distinct("add", ("a", a), ("out", out))?;
    check_distinct("add", ("b", b), ("out", out))?;
    let gpu = batch.gpu();
    check_size(gpu, "add", "a", a)?;
    let n = a.numel();
    let vec4 = n.is_multiple_of(4) && b.numel().is_multiple_of(4);
    let nv = if vec4 { n / 4 } else { n };
    let nbv = if vec4 { b.numel() / 4 } else { b.numel() };
    let (key, src) = add_variant(vec4);
    let pipe = gpu.pipeline(&key, &src, true)?;
    let p = Params {
        a: nv as u32,
        b: nbv.max(1) as u32,
        c: 0,
        d: 0,
    };
    batch.dispatch(
        &pipe,
        bytemuck::bytes_of(&p),
        &[a, b, out],
        flat_groups(gpu, nv),
    )
}

/// `a + b` elementwise into a new tensor (submitted, not waited for).
pub fn add(gpu: &Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let out = gpu.empty(a.shape(), DType::F32)?;
    let mut batch = gpu.batch();
    record_add(&mut batch, a, b, &out)?;
    batch.submit()?;
    Ok(out)
}

/// Records the residual update `x += y · gate[row]` in place: `x` and `y` are f32 with the same
/// shape `[…, C]` (last axis C), and `gate`, when given, is a `[R, C]` table and the row to use
/// (`row < R`), broadcast over every row of `x` — the DiT's `x = x + y·m2` and `x = x + ffn·m5`
/// with `m` the `[6, dim]` modulation table. `None` gives the plain `x += y` (cross-attention).
/// `x` must not share `y`'s or the gate's buffer.
pub fn record_gated_residual(
    batch: &mut Batch<'_>,
    x: &Tensor,
    y: &Tensor,
    gate: Option<(&Tensor, u32)>,
) -> Result<()> {
    let op = "gated_residual";
    check_f32("gated_residual: x", x)?;
    check_f32("gated_residual: y", y)?;
    if y.shape() != x.shape() {
        return Err(Error::shape(format!(
            "{op}: y {:?} must have the shape of x {:?}",
            y.shape(),
            x.shape()
        )));
    }
    let Some(&cols) = x.shape().last() else {
        return Err(Error::shape(format!(
            "{op}: x must have at least one axis [.., C], got {:?}",
            x.shape()
        )));
    };
    check_distinct(op, ("x", x), ("y", y))?;
    let gpu = batch.gpu();
    check_size(gpu, op, "x", x)?;
    let n = x.numel();
    let vec4 = cols % 4 == 0;
    let w = if vec4 { 4 } else { 1 };
    let mut p = Params {
        a: (n / w) as u32,
        b: (cols / w).max(1) as u32,
        c: 0,
        d: 0,
    };
    let mut buffers = vec![x, y];
    if let Some((g, row)) = gate {
        check_f32("gated_residual: gate", g)?;
        let gs = g.shape();
        if gs.len() != 2 || gs[1] != cols {
            return Err(Error::shape(format!(
                "{op}: gate {gs:?} must be a [R, {cols}] table for x {:?}",
                x.shape()
            )));
        }
        if row as usize >= gs[0] {
            return Err(Error::shape(format!(
                "{op}: gate row {row} is out of range for a gate table {gs:?}"
            )));
        }
        check_distinct(op, ("x", x), ("gate", g))?;
        check_size(gpu, op, "gate", g)?;
        p.c = (row as usize * cols / w) as u32;
        buffers.push(g);
    }
    let (key, src) = residual_variant(vec4, gate.is_some());
    let pipe = gpu.pipeline(&key, &src, true)?;
    batch.dispatch(
        &pipe,
        bytemuck::bytes_of(&p),
        &buffers,
        flat_groups(gpu, n / w),
    )
}

/// `x += y · gate[row]` (or `x += y`) in place, submitted (not waited for).
pub fn gated_residual(
    gpu: &Gpu,
    x: &Tensor,
    y: &Tensor,
    gate: Option<(&Tensor, u32)>,
) -> Result<()> {
    let mut batch = gpu.batch();
    record_gated_residual(&mut batch, x, y, gate)?;
    batch.submit()
}

fn record_unary(batch: &mut Batch<'_>, op: Unary, x: &Tensor, out: &Tensor) -> Result<()> {
    let name = op.name();
    check_f32(&format!("{name}: x"), x)?;
    check_f32(&format!("{name}: out"), out)?;
    if out.shape() != x.shape() {
        return Err(Error::shape(format!(
            "{name}: out {:?} must have the shape of x {:?}",
            out.shape(),
            x.shape()
        )));
    }
    check_distinct(name, ("x", x), ("out", out))?;
    let gpu = batch.gpu();
    check_size(gpu, name, "x", x)?;
    let n = x.numel();
    let vec4 = n.is_multiple_of(4);
    let nv = if vec4 { n / 4 } else { n };
    let (key, src) = unary_variant(op, vec4);
    let pipe = gpu.pipeline(&key, &src, true)?;
    let p = Params {
        a: nv as u32,
        b: 0,
        c: 0,
        d: 0,
    };
    batch.dispatch(
        &pipe,
        bytemuck::bytes_of(&p),
        &[x, out],
        flat_groups(gpu, nv),
    )
}

/// Records `out = GELU_tanh(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` elementwise (f32,
/// same shapes, `out` its own buffer). Evaluated as `x / (1 + exp(−2u))` (the same function)
/// with the tanh argument `u` clamped to `[−44, 15]` (exp cannot overflow) and exactly 0 for
/// `u ≤ −44`, so no |x| gives NaN or a spurious value.
pub fn record_gelu_tanh(batch: &mut Batch<'_>, x: &Tensor, out: &Tensor) -> Result<()> {
    record_unary(batch, Unary::GeluTanh, x, out)
}

/// `GELU_tanh(x)` into a new tensor (submitted, not waited for).
pub fn gelu_tanh(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let out = gpu.empty(x.shape(), DType::F32)?;
    let mut batch = gpu.batch();
    record_gelu_tanh(&mut batch, x, &out)?;
    batch.submit()?;
    Ok(out)
}

/// Records `out = SiLU(x) = x / (1 + exp(−x))` elementwise (f32, same shapes, `out` its own
/// buffer; the exponent is clamped to at most 88 and `x ≤ −88` gives exactly 0, so no |x| gives
/// NaN or a spurious value).
pub fn record_silu(batch: &mut Batch<'_>, x: &Tensor, out: &Tensor) -> Result<()> {
    record_unary(batch, Unary::Silu, x, out)
}

/// `SiLU(x)` into a new tensor (submitted, not waited for).
pub fn silu(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let out = gpu.empty(x.shape(), DType::F32)?;
    let mut batch = gpu.batch();
    record_silu(&mut batch, x, &out)?;
    batch.submit()?;
    Ok(out)
}

/// `[H, S, D]` from `[H, S, D]` or `[1, H, S, D]`, or an error naming `what` and the shape.
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

fn record_heads(
    batch: &mut Batch<'_>,
    merge: bool,
    x: &Tensor,
    out: &Tensor,
    (h, s, d): (usize, usize, usize),
) -> Result<()> {
    let op = if merge { "merge_heads" } else { "split_heads" };
    check_distinct(op, ("x", x), ("out", out))?;
    let gpu = batch.gpu();
    check_size(gpu, op, "x", x)?;
    let vec4 = d % 4 == 0;
    let w = if vec4 { 4 } else { 1 };
    let n = h * s * d / w;
    let (heads_side, tokens_side) = if merge { (x, out) } else { (out, x) };
    let (key, src) = heads_variant(
        merge,
        vec4,
        heads_side.dtype() == DType::F16,
        tokens_side.dtype() == DType::F16,
    );
    let pipe = gpu.pipeline(&key, &src, true)?;
    let p = Params {
        a: n as u32,
        b: s as u32,
        c: h as u32,
        d: (d / w).max(1) as u32,
    };
    batch.dispatch(
        &pipe,
        bytemuck::bytes_of(&p),
        &[x, out],
        flat_groups(gpu, n),
    )
}

/// Records the split of `x` `[S, H·D]` into heads: `out[h, s, d] = x[s, h·D + d]`. H, S and D
/// come from `out`, which is `[H, S, D]` or `[1, H, S, D]` (the attention kernels' layout); `x`
/// may carry a leading batch axis of 1 too. `x` f32; `out` f32 or f16 (rounded, for the
/// tensor-core attention), its own buffer. Vectorized by 4
/// when D is a multiple of 4.
pub fn record_split_heads(batch: &mut Batch<'_>, x: &Tensor, out: &Tensor) -> Result<()> {
    let op = "split_heads";
    check_f32("split_heads: x", x)?;
    check_f32_or_f16(batch.gpu(), "split_heads: out", out)?;
    let (h, s, d) = heads_shape(op, "out", out.shape())?;
    if tokens_shape(x.shape()) != Some((s, h * d)) {
        return Err(Error::shape(format!(
            "{op}: x {:?} must be [S, H·D] = [{s}, {}] for out {:?} (H = {h}, S = {s}, D = {d})",
            x.shape(),
            h * d,
            out.shape()
        )));
    }
    record_heads(batch, false, x, out, (h, s, d))
}

/// Splits `x` `[S, H·D]` into a new `[H, S, D]` tensor (`reshape` adds a batch axis if needed;
/// submitted, not waited for).
pub fn split_heads(gpu: &Gpu, x: &Tensor, heads: usize) -> Result<Tensor> {
    let Some((s, c)) = tokens_shape(x.shape()) else {
        return Err(Error::shape(format!(
            "split_heads: x must be [S, H·D], got {:?}",
            x.shape()
        )));
    };
    if heads == 0 || c % heads != 0 {
        return Err(Error::shape(format!(
            "split_heads: width {c} of x {:?} is not a multiple of {heads} heads",
            x.shape()
        )));
    }
    let out = gpu.empty(&[heads, s, c / heads], DType::F32)?;
    let mut batch = gpu.batch();
    record_split_heads(&mut batch, x, &out)?;
    batch.submit()?;
    Ok(out)
}

/// Records the merge of heads `x` `[H, S, D]` (or `[1, H, S, D]`) into `out` `[S, H·D]` (or
/// `[1, S, H·D]`): `out[s, h·D + d] = x[h, s, d]`. `x` f32 or f16; `out` f32 or f16 (f32 values
/// rounded to nearest even: the merged attention output feeding a 16-bit GEMM), its own buffer;
/// f16 on either side needs `SHADER_F16`. Vectorized by 4 when D is a multiple of 4.
pub fn record_merge_heads(batch: &mut Batch<'_>, x: &Tensor, out: &Tensor) -> Result<()> {
    let op = "merge_heads";
    check_f32_or_f16(batch.gpu(), "merge_heads: x", x)?;
    check_f32_or_f16(batch.gpu(), "merge_heads: out", out)?;
    let (h, s, d) = heads_shape(op, "x", x.shape())?;
    if tokens_shape(out.shape()) != Some((s, h * d)) {
        return Err(Error::shape(format!(
            "{op}: out {:?} must be [S, H·D] = [{s}, {}] for x {:?} (H = {h}, S = {s}, D = {d})",
            out.shape(),
            h * d,
            x.shape()
        )));
    }
    record_heads(batch, true, x, out, (h, s, d))
}

/// Merges heads `x` `[H, S, D]` (or `[1, H, S, D]`) into a new `[S, H·D]` tensor (submitted,
/// not waited for).
pub fn merge_heads(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let (h, s, d) = heads_shape("merge_heads", "x", x.shape())?;
    let out = gpu.empty(&[s, h * d], DType::F32)?;
    let mut batch = gpu.batch();
    record_merge_heads(&mut batch, x, &out)?;
    batch.submit()?;
    Ok(out)
}
