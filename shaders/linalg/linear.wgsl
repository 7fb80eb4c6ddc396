// Linear layer with fused bias and activation: y[m, n] = act(sum_k x[m, k] * w[n, k] + b[n]).
// x [M, K] f32 or f16 (widened exactly as it is loaded), w [N, K] (PyTorch layout) stored as
// f32, f16 or bf16, b [N] f32, y [M, N] f32 (or f16, rounded once as it is stored).
// All arithmetic is f32; in the bf16-autocast mode (RB16 = 1, linear_common.wgsl) x, the
// bias, the pre-activation and the activation's output are rounded to bf16.
// The prelude (src/ops/linear.rs) defines the storage types (XDT, XE, YE: linear_common.wgsl)
// and two constants:
//   WDT: weight storage, 0 = f32 (one word per value), 1 = f16, 2 = bf16 (two values per word,
//        element 2i in the low half; K even, so a pair never straddles two rows);
//   ACT: activation, 0 = none, 1 = GELU (tanh approximation), 2 = SiLU.
// `write_out` (linear_store.wgsl or linear_residual.wgsl) finishes each output: y = act(v), or
// the gated residual y = residual + gate * v.
// One workgroup computes a 64x64 tile of y: 256 threads with a 4x4 block each, K consumed in
// steps of 16 staged through workgroup memory. Every edge (M, N, K not multiples of the tile)
// is masked: out-of-range loads read 0, out-of-range outputs are not written.
// Tiles are numbered linearly, dispatched as a 2-D grid (so M and N are limited only by 32-bit
// indexing) and visited in bands of `group` row tiles (see main).

// [k][row] layout so a thread reads its 4 consecutive rows (or columns) as one vec4.
var<workgroup> a_s: array<vec4<f32>, 256>;
var<workgroup> b_s: array<vec4<f32>, 256>;

// Bias and epilogue of one output (skipped past N).
fn store(gi: u32, gj: u32, acc: f32) {
    if (gj >= P.n) {
        return;
    }
    write_out(gi * P.n + gj, gj, pre_act(acc, gj));
}

// Four consecutive outputs of row gi starting at column gj (skipped past M).
fn store_row(gi: u32, gj: u32, acc: vec4<f32>) {
    if (gi >= P.m) {
        return;
    }
    store(gi, gj, acc.x);
    store(gi, gj + 1u, acc.y);
    store(gi, gj + 2u, acc.z);
    store(gi, gj + 3u, acc.w);
}

// The shared-memory slot of element (k, row) of a tile: vec4 k*16 + row/4, lane row%4.
fn stage(k: u32, row: u32, va: f32, vb: f32) {
    let slot = k * 16u + row / 4u;
    a_s[slot][row % 4u] = va;
    b_s[slot][row % 4u] = vb;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let tile = wid.x + wid.y * nwg.x;
    if (tile >= P.tiles) {
        return;
    }
    // Grouped tile order: consecutive workgroups walk down a band of GROUP row tiles before
    // moving one column tile right, so the workgroups in flight share x and W tiles in cache.
    let band = P.group * P.tiles_n;
    let first = (tile / band) * P.group;
    let rows = min(P.tiles_m - first, P.group);
    let r = tile % band;
    let m0 = (first + r % rows) * 64u;
    let n0 = (r / rows) * 64u;
    let ti = lid / 16u;
    let tj = lid % 16u;
    // One vec4 per output row, no arrays: dynamic indexing would move them to local memory.
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    // Loader mapping: thread loads 4 consecutive k of one row of x and one row of w.
    let lr = lid / 4u;          // row 0..63
    let lk = (lid % 4u) * 4u;   // k offset 0, 4, 8, 12
    for (var k0 = 0u; k0 < P.k; k0 += 16u) {
        let va = round_x4(load_x4(m0 + lr, k0 + lk));
        let vb = load_w4(n0 + lr, k0 + lk);
        stage(lk, lr, va.x, vb.x);
        stage(lk + 1u, lr, va.y, vb.y);
        stage(lk + 2u, lr, va.z, vb.z);
        stage(lk + 3u, lr, va.w, vb.w);
        workgroupBarrier();
        for (var c = 0u; c < 16u; c++) {
            let a = a_s[c * 16u + ti];
            let b = b_s[c * 16u + tj];
            acc0 += a.x * b;
            acc1 += a.y * b;
            acc2 += a.z * b;
            acc3 += a.w * b;
        }
        workgroupBarrier();
    }
    let gi = m0 + ti * 4u;
    let gj = n0 + tj * 4u;
    store_row(gi, gj, acc0);
    store_row(gi + 1u, gj, acc1);
    store_row(gi + 2u, gj, acc2);
    store_row(gi + 3u, gj, acc3);
}
