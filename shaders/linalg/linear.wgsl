// Linear layer with fused bias and activation: y[m, n] = act(sum_k x[m, k] * w[n, k] + b[n]).
// x [M, K] f32, w [N, K] (PyTorch layout) stored as f32, f16 or bf16, b [N] f32, y [M, N] f32.
// All arithmetic is f32. The prelude (src/ops/linear.rs) defines two constants:
//   WDT: weight storage, 0 = f32 (one word per value), 1 = f16, 2 = bf16 (two values per word,
//        element 2i in the low half; K even, so a pair never straddles two rows);
//   ACT: epilogue, 0 = none, 1 = GELU (tanh approximation), 2 = SiLU.
// One workgroup computes a 64x64 tile of y: 256 threads with a 4x4 block each, K consumed in
// steps of 16 staged through workgroup memory. Every edge (M, N, K not multiples of the tile)
// is masked: out-of-range loads read 0, out-of-range outputs are not written.
// Tiles are numbered linearly, dispatched as a 2-D grid (so M and N are limited only by 32-bit
// indexing) and visited in bands of `group` row tiles (see main).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
    tiles_m: u32,
    tiles_n: u32,
    tiles: u32,
    group: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

// [k][row] layout so a thread reads its 4 consecutive rows (or columns) as one vec4.
var<workgroup> a_s: array<vec4<f32>, 256>;
var<workgroup> b_s: array<vec4<f32>, 256>;

// One f16 (low 16 bits of h) as f32, exactly, without the f16 shader feature or the
// SHADER_FLOAT16_IN_FLOAT32 capability `unpack2x16float` would need. Subnormals are scaled from an
// integer (never an f32 denormal, which a GPU may flush to zero); infinities and NaNs are kept.
fn f16_bits_to_f32(h: u32) -> f32 {
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    var v = bitcast<f32>(((e + 112u) << 23u) | (m << 13u));
    if (e == 0u) {
        v = f32(m) * 5.9604644775390625e-8; // m * 2^-24
    } else if (e == 31u) {
        v = bitcast<f32>(0x7f800000u | (m << 13u));
    }
    return select(v, -v, (h & 0x8000u) != 0u);
}

// Two 16-bit weights of one word as f32 (low half first).
fn unpack_w(v: u32) -> vec2<f32> {
    if (WDT == 1u) {
        return vec2<f32>(f16_bits_to_f32(v & 0xffffu), f16_bits_to_f32(v >> 16u));
    }
    // bf16 is the upper half of an f32
    return vec2<f32>(bitcast<f32>(v << 16u), bitcast<f32>(v & 0xffff0000u));
}

// x[row, k..k+4], zeros past M or K.
fn load_x4(row: u32, k: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (row >= P.m) {
        return v;
    }
    let e = row * P.k + k;
    if (k + 3u < P.k) {
        v = vec4<f32>(x[e], x[e + 1u], x[e + 2u], x[e + 3u]);
    } else {
        // no dynamic component index: it can push a vector to local memory on some compilers
        if (k < P.k) {
            v.x = x[e];
        }
        if (k + 1u < P.k) {
            v.y = x[e + 1u];
        }
        if (k + 2u < P.k) {
            v.z = x[e + 2u];
        }
    }
    return v;
}

// w[row, k..k+4] as f32, zeros past N or K. k is a multiple of 4, so for 16-bit storage the
// four values are two whole words.
fn load_w4(row: u32, k: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (row >= P.n) {
        return v;
    }
    let e = row * P.k + k;
    if (WDT == 0u) {
        if (k + 3u < P.k) {
            v = vec4<f32>(bitcast<f32>(w[e]), bitcast<f32>(w[e + 1u]), bitcast<f32>(w[e + 2u]),
                          bitcast<f32>(w[e + 3u]));
        } else {
            if (k < P.k) {
                v.x = bitcast<f32>(w[e]);
            }
            if (k + 1u < P.k) {
                v.y = bitcast<f32>(w[e + 1u]);
            }
            if (k + 2u < P.k) {
                v.z = bitcast<f32>(w[e + 2u]);
            }
        }
    } else {
        let i = e / 2u;
        if (k < P.k) {
            let lo = unpack_w(w[i]);
            v.x = lo.x;
            v.y = lo.y;
        }
        if (k + 2u < P.k) {
            let hi = unpack_w(w[i + 1u]);
            v.z = hi.x;
            v.w = hi.y;
        }
    }
    return v;
}

fn activate(v: f32) -> f32 {
    if (ACT == 1u) {
        // GELU, tanh approximation. tanh's argument is clamped: some drivers return NaN for
        // large |t|, and tanh(±15) is already ±1 in f32.
        let t = clamp(0.7978845608028654 * (v + 0.044715 * v * v * v), -15.0, 15.0);
        return 0.5 * v * (1.0 + tanh(t));
    }
    if (ACT == 2u) {
        // SiLU = v * sigmoid(v); exp's argument is clamped so it never overflows to inf.
        return v / (1.0 + exp(min(-v, 80.0)));
    }
    return v;
}

// Bias, activation and store of one output (skipped past N).
fn store(gi: u32, gj: u32, acc: f32) {
    if (gj >= P.n) {
        return;
    }
    var v = acc;
    if (P.has_bias != 0u) {
        v += bias[gj];
    }
    y[gi * P.n + gj] = activate(v);
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
        let va = load_x4(m0 + lr, k0 + lk);
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
