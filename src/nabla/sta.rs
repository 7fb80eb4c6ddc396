//! Sliding Tile Attention on the block grid: fixed per (grid, window), so computed once on the
//! CPU and cached on the GPU as per-row lists.

use super::{BlockGrid, StaWindow};

/// Whether query block `i` may attend key block `j` under the window (clipped at borders).
pub fn sta_allows(grid: &BlockGrid, w: &StaWindow, i: usize, j: usize) -> bool {
    let [rt, rh, rw] = w.radii().map(|r| r as usize);
    let (ti, yi, xi) = grid.coords(i);
    let (tj, yj, xj) = grid.coords(j);
    ti.abs_diff(tj) <= rt && yi.abs_diff(yj) <= rh && xi.abs_diff(xj) <= rw
}

/// The STA mask as a bitmask `[Nb, ceil(Nb/32)]` u32: bit `l` of word `w` of row `i` is set
/// when query block `i` may attend key block `32·w + l`.
pub fn sta_bits(grid: &BlockGrid, w: &StaWindow) -> Vec<u32> {
    let nb = grid.blocks();
    let words = nb.div_ceil(32);
    let mut bits = vec![0u32; nb * words];
    for i in 0..nb {
        for j in 0..nb {
            if sta_allows(grid, w, i, j) {
                bits[i * words + j / 32] |= 1 << (j % 32);
            }
        }
    }
    bits
}

/// Per-row lists of the STA mask: `(counts [Nb], indices [Nb, Nb])`, ascending key order.
pub fn sta_lists(grid: &BlockGrid, w: &StaWindow) -> (Vec<u32>, Vec<u32>) {
    let nb = grid.blocks();
    let mut counts = vec![0u32; nb];
    let mut idx = vec![0u32; nb * nb];
    for i in 0..nb {
        let mut c = 0;
        for j in 0..nb {
            if sta_allows(grid, w, i, j) {
                idx[i * nb + c] = j as u32;
                c += 1;
            }
        }
        counts[i] = c as u32;
    }
    (counts, idx)
}
