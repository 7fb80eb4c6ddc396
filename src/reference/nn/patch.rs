//! CPU reference of [`crate::ops::patch`]: the patch gather, unpatchify and the Conv3d patch
//! embedding itself (spec §2.2, §2.9), patch size (1, 2, 2). Latent dims are `(C, F, H, W)`.

/// Patch gather: `z [C, F, H, W]` → `[F·(H/2)·(W/2), 4C]` with per-token order `(c, q, r)`:
/// `out[s, (c·2 + q)·2 + r] = z[c, f, 2h+q, 2w+r]`, `s = (f·H/2 + h)·W/2 + w`.
pub fn patchify<T: Copy + Default>(z: &[T], dims: (usize, usize, usize, usize)) -> Vec<T> {
    let (nc, nf, nh, nw) = dims;
    let (hp, wp) = (nh / 2, nw / 2);
    assert_eq!(z.len(), nc * nf * nh * nw, "patchify reference: z length");
    let mut out = vec![T::default(); nf * hp * wp * 4 * nc];
    for f in 0..nf {
        for h in 0..hp {
            for w in 0..wp {
                let s = (f * hp + h) * wp + w;
                for c in 0..nc {
                    for q in 0..2 {
                        for r in 0..2 {
                            out[s * 4 * nc + (c * 2 + q) * 2 + r] =
                                z[((c * nf + f) * nh + 2 * h + q) * nw + 2 * w + r];
                        }
                    }
                }
            }
        }
    }
    out
}

/// Unpatchify: `out [F·(H/2)·(W/2), 4C]` → `v [C, F, H, W]` with
/// `v[c, f, 2h+q, 2w+r] = out[s, q·2C + r·C + c]` (per-token layout `(q, r, c)`).
pub fn unpatchify<T: Copy + Default>(out: &[T], dims: (usize, usize, usize, usize)) -> Vec<T> {
    let (nc, nf, nh, nw) = dims;
    let (hp, wp) = (nh / 2, nw / 2);
    assert_eq!(
        out.len(),
        nf * hp * wp * 4 * nc,
        "unpatchify reference: length"
    );
    let mut v = vec![T::default(); nc * nf * nh * nw];
    for c in 0..nc {
        for f in 0..nf {
            for y in 0..nh {
                for x in 0..nw {
                    let (h, q, w, r) = (y / 2, y % 2, x / 2, x % 2);
                    let s = (f * hp + h) * wp + w;
                    v[((c * nf + f) * nh + y) * nw + x] = out[s * 4 * nc + q * 2 * nc + r * nc + c];
                }
            }
        }
    }
    v
}

/// The patch embedding as the Conv3d it is (kernel = stride = (1, 2, 2), no padding), in f64:
/// `X0[s, o] = b[o] + Σ_{c,q,r} weight[o, c, 0, q, r] · z[c, f, 2h+q, 2w+r]`, tokens in natural
/// order; `weight` is `[dim, C, 1, 2, 2]`, `bias` `[dim]`, the result `[F·(H/2)·(W/2), dim]`.
pub fn patch_embed(
    z: &[f32],
    dims: (usize, usize, usize, usize),
    weight: &[f32],
    bias: &[f32],
) -> Vec<f32> {
    let (nc, nf, nh, nw) = dims;
    let (hp, wp) = (nh / 2, nw / 2);
    let dim = bias.len();
    assert_eq!(
        weight.len(),
        dim * nc * 4,
        "patch_embed reference: weight length"
    );
    let mut out = vec![0f32; nf * hp * wp * dim];
    for f in 0..nf {
        for h in 0..hp {
            for w in 0..wp {
                let s = (f * hp + h) * wp + w;
                for o in 0..dim {
                    let mut acc = bias[o] as f64;
                    for c in 0..nc {
                        for q in 0..2 {
                            for r in 0..2 {
                                acc += weight[((o * nc + c) * 2 + q) * 2 + r] as f64
                                    * z[((c * nf + f) * nh + 2 * h + q) * nw + 2 * w + r] as f64;
                            }
                        }
                    }
                    out[s * dim + o] = acc as f32;
                }
            }
        }
    }
    out
}
