// RoPE + head split + block average pooling in one pass (the DiT's q/k producer when a NABLA mask
// is estimated):
//   x [S, H, D] f32, cos / sin [S, D/2] f32 (one row per token, same for every head)
//   out[h, s, 2j]   = S1(x[s, h, 2j] * cos[s, j] - x[s, h, 2j+1] * sin[s, j])
//   out[h, s, 2j+1] = S1(x[s, h, 2j] * sin[s, j] + x[s, h, 2j+1] * cos[s, j])
//   pooled[h, i, :] = (sum_{u<64} rot[h, 64 i + u, :]) / 64, summed in f32
// The rotation is written exactly as shaders/nn/rope.wgsl writes it (f32, same expressions) and
// the rounding to the storage type is the same conversion as shaders/nn/heads.wgsl's split, so
// out is bit-identical to RoPE in place followed by the head split. The pooled rows are the mean
// of the f32 rotations, before an f16 out's rounding: the mean of the stored f16 values would
// need f32(f16(v)), which the H200's Vulkan compiler folds into v (measured: the pooled rows
// then differed from the mean of the stored values by up to 5e-5), so it would not be portable.
// (The CUDA layer pools its stored bf16 values, which are the reference's pooled values; no f16
// rounding reproduces those, and the f32 rotations are as close to them.)
// One workgroup of 128 threads per (64-token block, head): D/4 vec4 columns x (128 / (D/4)) row
// groups, each thread rotates 4 channels (2 pairs) of a strided set of the block's 64 rows and
// sums what it stores, then the row groups are added through workgroup memory. D must be a
// multiple of 4 and at most 512 (the dispatcher asks for a multiple of 16, as the mask does), S a
// multiple of 64. The prelude (added by the dispatcher) defines S4, the storage type of out, and
// the source ends with POOL: false builds the same kernel without the pooling (the DiT's q/k
// producer when no mask is estimated: one pass instead of RoPE in place and then the split), for
// any S (the last block's rows past S are skipped) and D a multiple of 4 up to 512; `pooled` is
// then bound to a dummy buffer and never touched.

struct Params {
    s: u32,  // tokens
    h: u32,  // heads
    d: u32,  // head dim
    nb: u32, // S / 64
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> cos_t: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> sin_t: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read_write> out: array<S4>;
@group(0) @binding(5) var<storage, read_write> pooled: array<vec4<f32>>;

var<workgroup> part: array<vec4<f32>, 128>;

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let blk = wid.x;
    let h = wid.y;
    let dv = P.d / 4u; // vec4 columns per head; also vec2 columns per table row (D/2 / 2)
    let groups = 128u / dv;
    let c = lid % dv;
    let g = lid / dv;
    var acc = vec4<f32>(0.0);
    if (g < groups) {
        for (var r = g; r < 64u; r += groups) {
            let s = blk * 64u + r;
            if (!POOL && s >= P.s) {
                break;
            }
            let xv = x[(s * P.h + h) * dv + c];
            let cv = cos_t[s * dv + c];
            let sv = sin_t[s * dv + c];
            // pair 2c: (xv.x, xv.y) with cv.x / sv.x; pair 2c + 1: (xv.z, xv.w) with cv.y / sv.y
            let a0 = xv.x;
            let b0 = xv.y;
            let c0 = cv.x;
            let s0 = sv.x;
            let a1 = xv.z;
            let b1 = xv.w;
            let c1 = cv.y;
            let s1 = sv.y;
            let ra0 = a0 * c0 - b0 * s0;
            let rb0 = a0 * s0 + b0 * c0;
            let ra1 = a1 * c1 - b1 * s1;
            let rb1 = a1 * s1 + b1 * c1;
            let rot = vec4<f32>(ra0, rb0, ra1, rb1);
            out[(h * P.s + s) * dv + c] = S4(rot);
            acc += rot;
        }
    }
    if (!POOL) {
        return;
    }
    part[lid] = acc;
    workgroupBarrier();
    if (lid < dv) {
        var t = vec4<f32>(0.0);
        for (var gg = 0u; gg < groups; gg++) {
            t += part[gg * dv + lid];
        }
        pooled[(h * P.nb + blk) * dv + lid] = t / 64.0;
    }
}
