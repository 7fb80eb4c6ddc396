// Block average pooling: x [BH, S, D] (storage type S1, f32 or f16) -> out [BH, S/64, D] f32.
// out[bh, i, d] = (sum_{u<64} x[bh, 64 i + u, d]) / 64, summed in f32.
// One workgroup per (block, bh); threads walk the D columns so every load is coalesced.
// The prelude (added by the dispatcher) defines S1 / S4, the storage types.

struct Params {
    s: u32,
    d: u32,
    nb: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<S1>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let blk = wid.x;
    let bh = wid.y;
    for (var d = lid; d < P.d; d += 64u) {
        var acc = 0.0;
        let base = (bh * P.s + blk * 64u) * P.d + d;
        for (var u = 0u; u < 64u; u++) {
            acc += f32(x[base + u * P.d]);
        }
        out[(bh * P.nb + blk) * P.d + d] = acc / 64.0;
    }
}
