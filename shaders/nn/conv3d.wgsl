// Causal 3-D convolution as an implicit GEMM (f32), channel-first layout:
//   out[co, t, y, x] = bias[co_off + co] + res[co, t, y, x]
//                    + sum_{ci, dt, dy, dx} w[co_off + co, ci, dt, dy, dx] · in[ci, t + dt, y + dy − kh/2, x + dx − kw/2]
// where `in` is the time axis [cache (kt − 1 frames), x (T frames)] (a missing cache reads
// zeros: the causal zero padding), spatial positions outside the image read zeros, and with
// the upsample flag the image is first enlarged 2× by nearest neighbour (in[.., y, x] reads
// source pixel (y / 2, x / 2)), so the output is 2H × 2W.
//
// GEMM view: M = output channels, N = T·H·W output pixels, K = C_in·kt·kh·kw (the weight's
// row-major [C_out, C_in, kt, kh, kw] order, so a weight row is contiguous in K). One workgroup
// computes a TM × TN tile (256 threads with 4×4 outputs each), K consumed in steps of 16 staged
// in workgroup memory: the weight tile is a plain load, the input tile is gathered (im2col on
// the fly, padding and the cache resolved per element). Every edge is masked.
//
// The prelude (src/ops/conv.rs) defines `const TM: u32` and `const TN: u32` (TM·TN = 4096,
// TN a divisor of 256·4): 64×64 for wide layers, 16×256 for narrow ones (few output channels).

struct Params {
    co: u32,      // output channels computed (rows of the GEMM)
    ci: u32,      // input channels
    t: u32,       // frames of x (= output frames)
    n: u32,       // output pixels T·H·W
    h: u32,       // output height (2·hin with upsampling)
    w: u32,       // output width
    hin: u32,     // input height
    win: u32,     // input width
    kt: u32,
    kh: u32,
    kw: u32,
    k: u32,       // ci·kt·kh·kw
    co_off: u32,  // first weight row / bias entry
    flags: u32,   // 1 bias, 2 cache, 4 residual, 8 upsample
    tiles_m: u32,
    tiles: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> cache: array<f32>;
@group(0) @binding(3) var<storage, read> wt: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> res: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

const KS: u32 = 16u;
const WG: u32 = 256u;
const F_BIAS: u32 = 1u;
const F_CACHE: u32 = 2u;
const F_RES: u32 = 4u;
const F_UP: u32 = 8u;

// [k][row / 4] and [k][pixel / 4]: a thread reads its 4 rows (4 pixels) as one vec4.
var<workgroup> ws: array<vec4<f32>, KS * TM / 4u>;
var<workgroup> xs: array<vec4<f32>, KS * TN / 4u>;

// Input value for GEMM row k at output pixel (t, y, x0) (zero outside the image / before
// the cache).
fn gather(k: u32, t: u32, y: u32, x0: u32) -> f32 {
    let dx = k % P.kw;
    let r1 = k / P.kw;
    let dy = r1 % P.kh;
    let r2 = r1 / P.kh;
    let dt = r2 % P.kt;
    let ci = r2 / P.kt;
    let yy = i32(y + dy) - i32(P.kh / 2u);
    let xx = i32(x0 + dx) - i32(P.kw / 2u);
    if (yy < 0 || yy >= i32(P.h) || xx < 0 || xx >= i32(P.w)) {
        return 0.0;
    }
    var sy = u32(yy);
    var sx = u32(xx);
    if ((P.flags & F_UP) != 0u) {
        sy = sy >> 1u;
        sx = sx >> 1u;
    }
    let plane = sy * P.win + sx;
    let hw = P.hin * P.win;
    let l = P.kt - 1u;
    let s = t + dt;
    if (s < l) {
        if ((P.flags & F_CACHE) == 0u) {
            return 0.0;
        }
        return cache[(ci * l + s) * hw + plane];
    }
    return x[(ci * P.t + (s - l)) * hw + plane];
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tile = wid.x + wid.y * nwg.x;
    if (tile >= P.tiles) {
        return;
    }
    // Row tiles vary fastest: workgroups in flight share the (large) input tile.
    let m0 = (tile % P.tiles_m) * TM;
    let n0 = (tile / P.tiles_m) * TN;

    // The pixel this thread gathers for the input tile (fixed over the K loop).
    let nn = lid % TN;
    let gn = n0 + nn;
    let nvalid = gn < P.n;
    let hw = P.h * P.w;
    let pt = gn / hw;
    let prem = gn % hw;
    let py = prem / P.w;
    let px = prem % P.w;

    // The 4×4 block this thread accumulates.
    let tm = lid / (TN / 4u);
    let tn = lid % (TN / 4u);
    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) {
        acc[i] = vec4<f32>(0.0);
    }

    for (var k0 = 0u; k0 < P.k; k0 += KS) {
        for (var r = 0u; r < KS * TM / WG; r++) {
            let e = lid + r * WG;
            let m = e / KS;
            let kk = e % KS;
            var v = 0.0;
            if (m0 + m < P.co && k0 + kk < P.k) {
                v = wt[(P.co_off + m0 + m) * P.k + k0 + kk];
            }
            ws[kk * (TM / 4u) + m / 4u][m % 4u] = v;
        }
        for (var r = 0u; r < KS * TN / WG; r++) {
            let kk = lid / TN + r * (WG / TN);
            var v = 0.0;
            if (nvalid && k0 + kk < P.k) {
                v = gather(k0 + kk, pt, py, px);
            }
            xs[kk * (TN / 4u) + nn / 4u][nn % 4u] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KS; kk++) {
            let a = ws[kk * (TM / 4u) + tm];
            let b = xs[kk * (TN / 4u) + tn];
            acc[0] += a.x * b;
            acc[1] += a.y * b;
            acc[2] += a.z * b;
            acc[3] += a.w * b;
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        let co = m0 + tm * 4u + i;
        if (co >= P.co) {
            continue;
        }
        var b = 0.0;
        if ((P.flags & F_BIAS) != 0u) {
            b = bias[P.co_off + co];
        }
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + tn * 4u + j;
            if (n >= P.n) {
                continue;
            }
            var v = acc[i][j] + b;
            if ((P.flags & F_RES) != 0u) {
                v += res[co * P.n + n];
            }
            out[co * P.n + n] = v;
        }
    }
}
