// In-place residual x += contrib(i) over n elements of type V (f32 or vec4<f32>) of x [rows, cols].
// The prelude (src/ops/elementwise.rs) defines `alias V` and `fn contrib(i: u32) -> V`:
// y[i] (no gate) or y[i] * gate[P.gate_off + i % P.cv] (one row of a [R, cols] gate table,
// offsets and cv = cols in units of V). Element i = (wid.x + wid.y * num_workgroups.x) * 256 + lid.

struct Params {
    n: u32,
    cv: u32,
    gate_off: u32,
    _p0: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read_write> x: array<V>;
@group(0) @binding(2) var<storage, read> y: array<V>;

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
    x[i] = x[i] + contrib(i);
}
