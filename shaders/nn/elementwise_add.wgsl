// out = a + b over n elements of type V (f32 or vec4<f32>; the prelude defines `alias V`).
// b has nb elements and repeats over a (nb = n, or one row broadcast over a's rows).
// Element i = (wid.x + wid.y * num_workgroups.x) * 256 + lid.

struct Params {
    n: u32,
    nb: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> a: array<V>;
@group(0) @binding(2) var<storage, read> b: array<V>;
@group(0) @binding(3) var<storage, read_write> out: array<V>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= P.n) {
        return;
    }
    out[i] = a[i] + b[i % P.nb];
}
