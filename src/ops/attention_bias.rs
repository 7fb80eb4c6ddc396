//! Self-attention with a relative position bias and a key mask: the attention of the umT5 text
//! encoder (spec §6.2), kernel `shaders/nn/attention_bias.wgsl`, CPU reference
//! [`crate::reference::nn::attention_bias`].
//!
//! For `q`, `k`, `v` `[H, L, D]` f32 (heads already split, see
//! [`crate::ops::elementwise::record_split_heads`]):
//!
//! ```text
//! s[h, i, j] = q[h, i]·k[h, j] + table[bucket[j − i + L − 1], h]     (no 1/√D scaling)
//! s[h, i, j] = f32::MIN                                  where mask[j] == 0 (padded key)
//! out[h, i]  = Σ_j softmax_j(s[h, i, ·]) · v[h, j]
//! ```
//!
//! `table` is the layer's `pos_embedding.embedding.weight` `[num_buckets, H]`; `buckets` holds
//! the bucket of every relative distance `j − i ∈ [−(L−1), L−1]` as u32 `[2L − 1]` (index
//! `j − i + L − 1`), built once per length on the CPU by [`relative_position_buckets`] from the
//! integer thresholds of the bidirectional T5 bucket function (spec §6.3), so no float
//! logarithm runs on the GPU. `mask` is u32 `[L]`, 0 for padding.
//!
//! The reference adds the lowest f32 to the logits of padded keys; for any logit of magnitude
//! below 1e31 that sum rounds to `f32::MIN` itself, which is what the kernel uses: padded keys
//! get softmax weight exactly 0, and a row whose keys are all padded averages `v` uniformly
//! (as PyTorch does). Logits, softmax (online, max-subtracted) and the weighted sum are all f32.
//!
//! One workgroup of 64 threads per query row (a 2-D grid, so any `H·L` dispatches); keys go by
//! in chunks of 64, and the output row doubles as the accumulator, so L and D are unbounded.
//! The encoder runs this once per layer on `[64, 512, 64]` (umT5-XXL): about 2 GFLOP, well
//! below the cost of the layer's projections.

use crate::error::{Error, Result};
use crate::gpu::{Batch, DType, Gpu, Tensor, groups_2d};
use crate::ops::elementwise::{check_distinct, check_f32, check_size};

const BODY: &str = include_str!("../../shaders/nn/attention_bias.wgsl");

/// Name of the only variant (also its pipeline key).
const NAME: &str = "nn/attention_bias";

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    heads: u32,
    len: u32,
    dim: u32,
    buckets: u32,
    rows: u32,
    _pad: [u32; 3],
}

/// Kernel variants of this module: `(name, WGSL source)`; a single portable f32 kernel.
pub fn variants() -> Vec<(String, String)> {
    vec![(NAME.to_string(), BODY.to_string())]
}

/// The bucket of every relative distance `rel = j − i ∈ [−(len−1), len−1]` for the
/// bidirectional T5 relative position (spec §6.3), as `out[rel + len − 1]`.
///
/// With `n = num_buckets / 2` and `e = n / 2`: `bucket = (rel > 0 ? n : 0) + g(|rel|)` with
/// `g(a) = a` for `a < e`, else `min(n − 1, e + ⌊ln(a/e) / ln(max_distance/e) · (n − e)⌋)`.
/// The floor is taken of the exact value (thresholds `a ≥ e·(max_distance/e)^(t/(n−e))`), so
/// distances that sit exactly on a threshold (16, 32, 64 for 32 buckets and distance 128) fall
/// into the upper bucket, which is what the original's f32 logarithm gives on the CPU; for 32
/// buckets and distance 128 this reproduces the table of spec §6.3.
///
/// Fails unless `num_buckets ≥ 4` and `max_distance > num_buckets / 4` (the logarithmic range
/// must be non-empty).
pub fn relative_position_buckets(
    len: usize,
    num_buckets: usize,
    max_distance: usize,
) -> Result<Vec<u32>> {
    let n = num_buckets / 2;
    let e = n / 2;
    if num_buckets < 4 || max_distance <= e {
        return Err(Error::Invalid(format!(
            "T5 relative positions need num_buckets ≥ 4 and max_distance > num_buckets / 4, got \
             num_buckets {num_buckets}, max_distance {max_distance}"
        )));
    }
    if len == 0 {
        return Ok(Vec::new());
    }
    let steps = (n - e) as f64;
    let span = (max_distance as f64 / e as f64).ln();
    let g = |a: usize| -> usize {
        if a < e {
            return a;
        }
        // exact-math floor: values within 1e-9 below an integer are thresholds hit exactly
        // (a = e·(max_distance/e)^(t/(n−e)) with an integer result), rounded low in f64
        let v = (a as f64 / e as f64).ln() / span * steps;
        (e + (v + 1e-9).floor() as usize).min(n - 1)
    };
    Ok((0..2 * len - 1)
        .map(|r| {
            let rel = r as i64 - (len as i64 - 1);
            let base = if rel > 0 { n } else { 0 };
            (base + g(rel.unsigned_abs() as usize)) as u32
        })
        .collect())
}

/// `[H, L, D]` from `[H, L, D]` or `[1, H, L, D]`.
fn hld(shape: &[usize]) -> Option<(usize, usize, usize)> {
    match *shape {
        [h, l, d] | [1, h, l, d] => Some((h, l, d)),
        _ => None,
    }
}

/// Validates the operands; returns `(H, L, D, num_buckets)`.
#[allow(clippy::too_many_arguments)]
fn check(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    table: &Tensor,
    buckets: &Tensor,
    mask: &Tensor,
    out: Option<&Tensor>,
) -> Result<(usize, usize, usize, usize)> {
    let op = "attention_bias";
    for (name, t) in [("q", q), ("k", k), ("v", v), ("table", table)] {
        check_f32(&format!("{op}: {name}"), t)?;
    }
    let Some((h, l, d)) = hld(q.shape()) else {
        return Err(Error::shape(format!(
            "{op}: q must be [H, L, D] or [1, H, L, D] (heads split), got {:?}",
            q.shape()
        )));
    };
    for (name, t) in [("k", k), ("v", v)] {
        if hld(t.shape()) != Some((h, l, d)) {
            return Err(Error::shape(format!(
                "{op}: {name} {:?} must have the shape of q {:?} (self-attention: H = {h}, \
                 L = {l}, D = {d})",
                t.shape(),
                q.shape()
            )));
        }
    }
    let ts = table.shape();
    if ts.len() != 2 || ts[1] != h || ts[0] == 0 {
        return Err(Error::shape(format!(
            "{op}: table must be the [num_buckets, H] = [_, {h}] position embedding of the layer \
             (pos_embedding.embedding.weight), got {ts:?}"
        )));
    }
    let nb = ts[0];
    for (name, t) in [("buckets", buckets), ("mask", mask)] {
        if t.dtype() != DType::U32 {
            return Err(Error::shape(format!(
                "{op}: {name} must be u32, got {:?}",
                t.dtype()
            )));
        }
    }
    let want_b = (2 * l).saturating_sub(1);
    if buckets.shape() != [want_b] {
        return Err(Error::shape(format!(
            "{op}: buckets must be [2L − 1] = [{want_b}] (one bucket per relative distance, see \
             relative_position_buckets), got {:?}",
            buckets.shape()
        )));
    }
    if mask.shape() != [l] && mask.shape() != [1, l] {
        return Err(Error::shape(format!(
            "{op}: mask must be [L] = [{l}] (0 = padded key), got {:?}",
            mask.shape()
        )));
    }
    if let Some(out) = out {
        check_f32(&format!("{op}: out"), out)?;
        if hld(out.shape()) != Some((h, l, d)) {
            return Err(Error::shape(format!(
                "{op}: out {:?} must have the shape of q {:?}",
                out.shape(),
                q.shape()
            )));
        }
        for (name, t) in [
            ("q", q),
            ("k", k),
            ("v", v),
            ("table", table),
            ("buckets", buckets),
            ("mask", mask),
        ] {
            check_distinct(op, (name, t), ("out", out))?;
        }
    }
    if h * l * d > u32::MAX as usize - 64 || h * l > u32::MAX as usize {
        return Err(Error::shape(format!(
            "{op}: [H, L, D] = [{h}, {l}, {d}] has more elements than the kernel's 32-bit \
             indices reach"
        )));
    }
    for (name, t) in [
        ("q", q),
        ("k", k),
        ("v", v),
        ("table", table),
        ("buckets", buckets),
        ("mask", mask),
    ] {
        check_size(gpu, op, name, t)?;
    }
    Ok((h, l, d, nb))
}

/// Records `out = softmax(q·kᵀ + bias + mask)·v` per head into `batch` (no allocation, no
/// submission): the umT5 self-attention, see the module docs for the exact formula.
///
/// * `q`, `k`, `v`: f32 `[H, L, D]` (or `[1, H, L, D]`), all the same shape; any L, D.
/// * `table`: f32 `[num_buckets, H]`, the layer's relative position embedding.
/// * `buckets`: u32 `[2L − 1]`, the bucket of relative distance `j − i` at index
///   `j − i + L − 1` ([`relative_position_buckets`]); entries ≥ num_buckets are clamped to the
///   last row.
/// * `mask`: u32 `[L]` (or `[1, L]`), 0 for padded keys.
/// * `out`: f32 with q's shape, its own buffer.
///
/// Fails with [`Error::Shape`] on mismatched shapes or dtypes, shared buffers or sizes beyond
/// 32-bit indexing, and with [`Error::TooLarge`] beyond the storage-binding limit.
#[allow(clippy::too_many_arguments)]
pub fn record_attention_bias(
    batch: &mut Batch<'_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    table: &Tensor,
    buckets: &Tensor,
    mask: &Tensor,
    out: &Tensor,
) -> Result<()> {
    let gpu = batch.gpu();
    let (h, l, d, nb) = check(gpu, q, k, v, table, buckets, mask, Some(out))?;
    let rows = h * l;
    if rows == 0 || d == 0 {
        return Ok(());
    }
    let p = Params {
        heads: h as u32,
        len: l as u32,
        dim: d as u32,
        buckets: nb as u32,
        rows: rows as u32,
        _pad: [0; 3],
    };
    let pipe = gpu.pipeline(NAME, BODY, true)?;
    let groups = groups_2d(rows, gpu.caps().max_workgroups_per_dim);
    batch.dispatch(
        &pipe,
        bytemuck::bytes_of(&p),
        &[q, k, v, table, buckets, mask, out],
        groups,
    )
}

/// The biased, masked self-attention of [`record_attention_bias`] into a new f32 tensor of q's
/// shape (allocates, records, submits; does not wait).
pub fn attention_bias(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    table: &Tensor,
    buckets: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    check(gpu, q, k, v, table, buckets, mask, None)?;
    let out = gpu.empty(q.shape(), DType::F32)?;
    let mut batch = gpu.batch();
    record_attention_bias(&mut batch, q, k, v, table, buckets, mask, &out)?;
    batch.submit()?;
    Ok(out)
}
