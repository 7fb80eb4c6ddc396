// What both norm kernels (norm.wgsl, norm_vec.wgsl) share: the parameters (src/ops/norm.rs,
// `Params`; shift_off / scale_off: the modulation rows' offsets, multiples of cols) and the
// 256-thread tree sum in workgroup memory (nine barriers) that norm.wgsl always uses and
// norm_vec.wgsl on adapters without subgroups (norm_vec_wg.wgsl).

struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
    shift_off: u32,
    scale_off: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;

var<workgroup> red: array<f32, 256>;
var<workgroup> total: f32;

fn tree_sum(v: f32, lid: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = red[lid] + red[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        total = red[0];
    }
    return workgroupUniformLoad(&total);
}
