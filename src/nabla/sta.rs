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
