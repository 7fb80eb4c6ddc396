//! Synthetic structured Q/K/V for demos and benchmarks: a smooth random field over the block
//! grid plus per-token noise, with a different peakedness per head, so NABLA masks are
//! non-trivial and differ per head (like the golden data). Deterministic for a seed, generated
//! on all CPU cores.

use crate::nabla::{BLOCK, BlockGrid};

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Cheap approximately normal value from a counter (sum of four uniforms, scaled to unit variance).
fn gauss(seed: u64, i: u64) -> f32 {
    let r = splitmix(seed ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let mut s = 0f32;
    for k in 0..4 {
        s += ((r >> (16 * k)) & 0xFFFF) as f32 / 65535.0;
    }
    (s - 2.0) * 1.732_050_8
}

/// The smooth field `[Nb, D]`: a few random low-frequency waves per channel over (t, y, x).
fn field(grid: &BlockGrid, d: usize, seed: u64) -> Vec<f32> {
    let nb = grid.blocks();
    let waves = 6;
    let mut out = vec![0f32; nb * d];
    for c in 0..d {
        let params: Vec<[f32; 5]> = (0..waves)
            .map(|w| {
                let g = |k: u64| gauss(seed ^ 0xF1E1D, (c * waves + w) as u64 * 8 + k);
                [g(0) * 0.35, g(1) * 0.6, g(2) * 0.6, g(3) * 3.0, g(4)]
            })
            .collect();
        for b in 0..nb {
            let (t, y, x) = grid.coords(b);
            let mut v = 0f32;
            for p in &params {
                v += (p[0] * t as f32 + p[1] * y as f32 + p[2] * x as f32 + p[3]).cos() * p[4];
            }
            out[b * d + c] = v / (waves as f32).sqrt();
        }
    }
    out
}

/// Which tensor to generate.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    /// Queries: field times the head's sharpness plus noise.
    Query,
    /// Keys: the same field plus independent noise.
    Key,
    /// Values: plain noise.
    Value,
}

/// A `[heads, S, D]` tensor in fractal (block-contiguous) order.
pub fn structured(grid: &BlockGrid, heads: usize, d: usize, role: Role, seed: u64) -> Vec<f32> {
    let s = grid.tokens();
    let f = field(grid, d, seed);
    let mut out = vec![0f32; heads * s * d];
    let salt = match role {
        Role::Query => 0x5151,
        Role::Key => 0xA7A7,
        Role::Value => 0x7777,
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let chunk = (s * d).div_ceil(threads.max(1)).max(d);
    for h in 0..heads {
        // sharper heads concentrate attention on fewer blocks
        let sharp = 0.3 + 0.9 * (h as f32 + 0.5) / heads as f32;
        let noise = 1.0;
        let head = &mut out[h * s * d..(h + 1) * s * d];
        std::thread::scope(|sc| {
            for (ci, part) in head.chunks_mut(chunk).enumerate() {
                let f = &f;
                sc.spawn(move || {
                    let base = ci * chunk;
                    for (o, v) in part.iter_mut().enumerate() {
                        let e = base + o;
                        let (tok, c) = (e / d, e % d);
                        let n = gauss(seed ^ salt ^ ((h as u64) << 40), e as u64) * noise;
                        *v = match role {
                            Role::Value => n,
                            _ => f[(tok / BLOCK) * d + c] * sharp + n,
                        };
                    }
                });
            }
        });
    }
    out
}

/// `n` approximately normal values of standard deviation `std`, deterministic for `seed`,
/// generated on all CPU cores.
pub fn noise(seed: u64, n: usize, std: f32) -> Vec<f32> {
    fill(n, |i| gauss(seed, i) * std)
}

/// `n` values uniform on `[-half_width, half_width)`, deterministic for `seed`, generated on
/// all CPU cores.
pub fn uniform(seed: u64, n: usize, half_width: f32) -> Vec<f32> {
    fill(n, |i| {
        let r = splitmix(seed ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        // 24 random bits: every value is exact in f32
        ((r >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * half_width
    })
}

/// `n` values `f(i)`, computed on all CPU cores.
fn fill(n: usize, f: impl Fn(u64) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; n];
    crate::par::for_chunks(&mut out, |first, part| {
        for (o, v) in part.iter_mut().enumerate() {
            *v = f((first + o) as u64);
        }
    });
    out
}
