// Causal-cache update of a temporal convolution, in place: the cache [C, L, H·W] holds the L
// frames before the chunk x [C, T, H·W]; afterwards it holds the last L frames of the time
// axis [cache, x]. One thread per (channel, pixel), 256 per workgroup on a 2-D grid.
// Frame s of the new cache is frame T + s of [cache, x]; the frames are written in increasing
// s and read from T + s ≥ s, so every value is read before it is overwritten (the thread owns
// its (channel, pixel) column; no other thread touches it).

struct Params {
    c: u32,   // channels
    l: u32,   // cached frames L
    t: u32,   // frames of x
    hw: u32,  // pixels per frame
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> cache: array<f32>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= P.c * P.hw) {
        return;
    }
    let c = i / P.hw;
    let p = i % P.hw;
    for (var s = 0u; s < P.l; s++) {
        let src = P.t + s;
        var v: f32;
        if (src < P.l) {
            v = cache[(c * P.l + src) * P.hw + p];
        } else {
            v = x[(c * P.t + (src - P.l)) * P.hw + p];
        }
        cache[(c * P.l + s) * P.hw + p] = v;
    }
}
