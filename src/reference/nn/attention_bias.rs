//! CPU reference of [`crate::ops::attention_bias`]: the umT5 self-attention with a relative
//! position bias and a key mask, in f64 on f32 inputs (rounded to f32 once), and the T5
//! bidirectional bucket function written as the original computes it (f32 logarithm).

/// The bucket of relative position `rel = key − query` as the original T5 computes it
/// (`_relative_position_bucket`, bidirectional): with `n = num_buckets / 2` and `e = n / 2`,
/// `(rel > 0 ? n : 0) + (a < e ? a : min(n − 1, e + trunc(ln(a/e)/ln(max_distance/e)·(n − e))))`
/// for `a = |rel|`, the logarithm and products in f32 (the constant `ln(max_distance/e)` in
/// f64, rounded to f32), as PyTorch evaluates it.
///
/// Panics unless `num_buckets ≥ 4` and `max_distance > num_buckets / 4`.
pub fn relative_position_bucket(rel: i64, num_buckets: usize, max_distance: usize) -> usize {
    let n = num_buckets / 2;
    let e = n / 2;
    assert!(
        num_buckets >= 4 && max_distance > e,
        "relative_position_bucket: bad num_buckets {num_buckets} / max_distance {max_distance}"
    );
    let base = if rel > 0 { n } else { 0 };
    let a = rel.unsigned_abs() as usize;
    if a < e {
        return base + a;
    }
    let span = (max_distance as f64 / e as f64).ln() as f32;
    let v = (a as f32 / e as f32).ln() / span * (n - e) as f32;
    base + (e + v as usize).min(n - 1)
}

/// The logit the reference gives a padded key: the lowest f32, which is what adding it to any
/// logit of magnitude below 1e31 rounds to in f32.
pub const MASKED_LOGIT: f64 = f32::MIN as f64;

/// `out[h, i] = Σ_j softmax_j(s[h, i, ·])·v[h, j]` with `s[h, i, j] = q[h, i]·k[h, j] +
/// table[buckets[j − i + L − 1] · heads + h]` (no scaling), and `s = MASKED_LOGIT` where
/// `mask[j] == 0`. `q`, `k`, `v`, out: row-major `[heads, len, dim]`; `table`: `[num_buckets,
/// heads]`; `buckets`: `[2·len − 1]` (entries past the table are clamped to its last row, as
/// the kernel does); `mask`: `[len]`. Logits, softmax and sums in f64.
///
/// Panics when a slice length does not match the sizes (a bug in the caller).
#[allow(clippy::too_many_arguments)]
pub fn attention_bias(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    len: usize,
    dim: usize,
    table: &[f32],
    buckets: &[u32],
    mask: &[u32],
) -> Vec<f32> {
    let n = heads * len * dim;
    assert!(
        q.len() == n && k.len() == n && v.len() == n,
        "attention_bias: q, k, v must be [heads, len, dim]"
    );
    assert!(
        !table.is_empty() && table.len().is_multiple_of(heads),
        "attention_bias: table must be [num_buckets, heads]"
    );
    assert_eq!(buckets.len(), (2 * len).saturating_sub(1), "buckets");
    assert_eq!(mask.len(), len, "mask");
    let nb = table.len() / heads;
    let mut out = vec![0f32; n];
    let mut s = vec![0f64; len];
    for h in 0..heads {
        let base = h * len * dim;
        for i in 0..len {
            let qi = &q[base + i * dim..base + (i + 1) * dim];
            for (j, sj) in s.iter_mut().enumerate() {
                *sj = if mask[j] == 0 {
                    MASKED_LOGIT
                } else {
                    let kj = &k[base + j * dim..base + (j + 1) * dim];
                    let dot: f64 = qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let b = (buckets[j + len - 1 - i] as usize).min(nb - 1);
                    dot + table[b * heads + h] as f64
                };
            }
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|&x| (x - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for c in 0..dim {
                let acc: f64 = w
                    .iter()
                    .enumerate()
                    .map(|(j, &wj)| wj * v[base + j * dim + c] as f64)
                    .sum();
                out[base + i * dim + c] = (acc / z) as f32;
            }
        }
    }
    out
}
