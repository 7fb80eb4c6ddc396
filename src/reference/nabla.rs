//! NABLA kernels: pooling, block map, CDF threshold, STA, fractal order, block-sparse attention.

use crate::nabla::{BLOCK, BlockGrid, StaWindow};

/// Block average pooling: `x [BH, S, D]` → `[BH, S/64, D]`.
pub fn pool(x: &[f32], bh: usize, s: usize, d: usize) -> Vec<f32> {
    let nb = s / BLOCK;
    let mut out = vec![0f32; bh * nb * d];
    for h in 0..bh {
        for i in 0..nb {
            for c in 0..d {
                let sum: f64 = (0..BLOCK)
                    .map(|u| x[(h * s + i * BLOCK + u) * d + c] as f64)
                    .sum();
                out[(h * nb + i) * d + c] = (sum / BLOCK as f64) as f32;
            }
        }
    }
    out
}

/// Block attention map: `softmax_j(qa_i·ka_j / √D)` per head, `[BH, Nb, Nb]`.
pub fn block_map(qa: &[f32], ka: &[f32], bh: usize, nb: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; bh * nb * nb];
    let scale = 1.0 / (d as f64).sqrt();
    for h in 0..bh {
        for i in 0..nb {
            let logits: Vec<f64> = (0..nb)
                .map(|j| {
                    (0..d)
                        .map(|c| qa[(h * nb + i) * d + c] as f64 * ka[(h * nb + j) * d + c] as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            for j in 0..nb {
                out[(h * nb + i) * nb + j] = ((logits[j] - m).exp() / z) as f32;
            }
        }
    }
    out
}

/// Cumulative values of the reference: sort each row ascending, running sum in f32, scatter back.
pub fn cvals(map: &[f32], rows: usize, nb: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * nb];
    for r in 0..rows {
        let row = &map[r * nb..(r + 1) * nb];
        let mut order: Vec<usize> = (0..nb).collect();
        order.sort_by(|&a, &b| row[a].total_cmp(&row[b]));
        let mut acc = 0f32;
        for &j in &order {
            acc += row[j];
            out[r * nb + j] = acc;
        }
    }
    out
}

/// The reference threshold rule: keep `cvals >= f32(1 - thr)`.
pub fn threshold_mask(cvals: &[f32], thr: f64) -> Vec<u8> {
    let cut = (1.0 - thr) as f32;
    cvals.iter().map(|&c| (c >= cut) as u8).collect()
}

/// The tie-aware rule the GPU implements, in f64: keep `j` when the mass of all entries
/// `≤ p_j` reaches the cut, or when `p_j` is the row maximum. Also returns, per entry, that
/// mass (to tell which entries sit within rounding of the cut).
pub fn threshold_mask_ties(map: &[f32], rows: usize, nb: usize, thr: f64) -> (Vec<u8>, Vec<f64>) {
    let cut = (1.0 - thr) as f32 as f64;
    let mut keep = vec![0u8; rows * nb];
    let mut mass = vec![0f64; rows * nb];
    for r in 0..rows {
        let row = &map[r * nb..(r + 1) * nb];
        let max = row.iter().cloned().fold(f32::MIN, f32::max);
        for j in 0..nb {
            let f: f64 = row
                .iter()
                .filter(|&&p| p <= row[j])
                .map(|&p| p as f64)
                .sum();
            mass[r * nb + j] = f;
            keep[r * nb + j] = (f >= cut || row[j] == max) as u8;
        }
    }
    (keep, mass)
}

/// The STA mask `[Nb, Nb]` of a grid and window.
pub fn sta_mask(grid: &BlockGrid, w: &StaWindow) -> Vec<u8> {
    let nb = grid.blocks();
    let [rt, rh, rw] = w.radii().map(|r| r as i64);
    let mut m = vec![0u8; nb * nb];
    for i in 0..nb {
        for j in 0..nb {
            let (a, b) = (grid.coords(i), grid.coords(j));
            let ok = (a.0 as i64 - b.0 as i64).abs() <= rt
                && (a.1 as i64 - b.1 as i64).abs() <= rh
                && (a.2 as i64 - b.2 as i64).abs() <= rw;
            m[i * nb + j] = ok as u8;
        }
    }
    m
}

/// The fractal permutation of an `(F, H, W)` token grid: `x_fractal = x_normal[perm]`.
pub fn fractal_perm(f: usize, h: usize, w: usize) -> Vec<usize> {
    let mut perm = vec![0usize; f * h * w];
    for fi in 0..f {
        for y in 0..h {
            for x in 0..w {
                let n = fi * h * w + y * w + x;
                let j = fi * h * w + ((y / 8) * (w / 8) + x / 8) * 64 + (y % 8) * 8 + x % 8;
                perm[j] = n;
            }
        }
    }
    perm
}

/// Inverse of a permutation.
pub fn inverse_perm(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0usize; perm.len()];
    for (j, &n) in perm.iter().enumerate() {
        inv[n] = j;
    }
    inv
}

/// Attention of `q [BH, Sq, D]` over `k, v [BH, Skv, D]` restricted by a dense block mask
/// `[MH, ceil(Sq/64), ceil(Skv/64)]` (MH = 1 or BH), accumulated in f64. Rows without any
/// allowed key give 0.
pub fn block_sparse_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[u8],
    mask_heads: usize,
    (bh, sq, skv, d): (usize, usize, usize, usize),
) -> Vec<f32> {
    let (nq, nk) = (sq.div_ceil(BLOCK), skv.div_ceil(BLOCK));
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f32; bh * sq * d];
    let mut logits = vec![0f64; skv];
    for h in 0..bh {
        let mh = if mask_heads == 1 { 0 } else { h };
        for i in 0..sq {
            let qi = &q[(h * sq + i) * d..(h * sq + i + 1) * d];
            let allowed = |t: usize| mask[(mh * nq + i / BLOCK) * nk + t / BLOCK] != 0;
            let mut m = f64::NEG_INFINITY;
            for t in 0..skv {
                if allowed(t) {
                    let kt = &k[(h * skv + t) * d..(h * skv + t + 1) * d];
                    let l = qi
                        .iter()
                        .zip(kt)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale;
                    logits[t] = l;
                    m = m.max(l);
                }
            }
            if m == f64::NEG_INFINITY {
                continue;
            }
            let mut z = 0f64;
            let mut acc = vec![0f64; d];
            for t in 0..skv {
                if allowed(t) {
                    let p = (logits[t] - m).exp();
                    z += p;
                    for (c, a) in acc.iter_mut().enumerate() {
                        *a += p * v[(h * skv + t) * d + c] as f64;
                    }
                }
            }
            for c in 0..d {
                out[(h * sq + i) * d + c] = (acc[c] / z) as f32;
            }
        }
    }
    out
}
