// Block average pooling: x [BH, S, D] (storage S4 = vec4 of f32 or f16) -> out [BH, S/64, D] f32.
// out[bh, i, :] = (sum_{u<64} x[bh, 64 i + u, :]) / 64, summed in f32.
// One workgroup of 128 threads per (block, bh): D/4 vec4 columns x (128 / (D/4)) row groups,
// each thread sums a strided set of the 64 rows with 8- or 16-byte loads, then the row groups
// are added through workgroup memory. D must be a multiple of 4 and at most 512.
// The prelude (added by the dispatcher) defines S1 / S4, the storage types.

struct Params {
    s: u32,
    d: u32,
    nb: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<S4>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;

var<workgroup> part: array<vec4<f32>, 128>;

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let blk = wid.x;
    let bh = wid.y;
    let dv = P.d / 4u;
    let groups = 128u / dv;
    let c = lid % dv;
    let g = lid / dv;
    var acc = vec4<f32>(0.0);
    if (g < groups) {
        let base = (bh * P.s + blk * 64u) * dv + c;
        for (var r = g; r < 64u; r += groups) {
            acc += vec4<f32>(x[base + r * dv]);
        }
    }
    part[lid] = acc;
    workgroupBarrier();
    if (lid < dv) {
        var t = vec4<f32>(0.0);
        for (var gg = 0u; gg < groups; gg++) {
            t += part[gg * dv + lid];
        }
        out[(bh * P.nb + blk) * dv + lid] = t / 64.0;
    }
}
