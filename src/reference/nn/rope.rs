//! CPU reference of [`crate::ops::rope`]: RoPE written like the spec (§2.6), in f64.

/// Per-token rotation angles `[F·H·W, head_dim/2]` (natural token order) of a patch grid
/// `(F, H, W)`, straight from the spec's table: with `c = head_dim/2`, `n1 = ⌊c/3⌋` and
/// `n0 = c − 2·n1`, pair `j < n0` turns by `f · 10000^(−j/n0)`, pair `n0 ≤ j < n0 + n1` by
/// `h · 10000^(−(j−n0)/n1)` and the last `n1` pairs by `w · 10000^(−(j−n0−n1)/n1)`.
pub fn rope_angles(grid: (usize, usize, usize), head_dim: usize) -> Vec<f64> {
    let (nf, nh, nw) = grid;
    let c = head_dim / 2;
    let n1 = c / 3;
    let n0 = c - 2 * n1;
    let mut out = Vec::with_capacity(nf * nh * nw * c);
    for f in 0..nf {
        for h in 0..nh {
            for w in 0..nw {
                for j in 0..c {
                    let (pos, k, n) = if j < n0 {
                        (f, j, n0)
                    } else if j < n0 + n1 {
                        (h, j - n0, n1)
                    } else {
                        (w, j - n0 - n1, n1)
                    };
                    out.push(pos as f64 * 10000f64.powf(-(k as f64) / n as f64));
                }
            }
        }
    }
    out
}

/// RoPE of `x` `[S, heads, head_dim]` with per-token tables `cos`, `sin` `[S, head_dim/2]`
/// (same for every head): `out[2j] = x[2j]·cos − x[2j+1]·sin`,
/// `out[2j+1] = x[2j]·sin + x[2j+1]·cos`, computed in f64 and rounded to f32.
pub fn rope(x: &[f32], cos: &[f32], sin: &[f32], heads: usize, head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let s = cos.len() / half;
    assert_eq!(x.len(), s * heads * head_dim, "rope reference: x length");
    let mut out = vec![0f32; x.len()];
    for t in 0..s {
        for h in 0..heads {
            let base = (t * heads + h) * head_dim;
            for j in 0..half {
                let (c, sn) = (cos[t * half + j] as f64, sin[t * half + j] as f64);
                let (a, b) = (x[base + 2 * j] as f64, x[base + 2 * j + 1] as f64);
                out[base + 2 * j] = (a * c - b * sn) as f32;
                out[base + 2 * j + 1] = (a * sn + b * c) as f32;
            }
        }
    }
    out
}
