// Subgroup reductions for threshold.wgsl (adapters with SUBGROUP): a subgroup reduction,
// one partial per subgroup in workgroup memory, summed by one invocation (two barriers per
// reduction), and the entry point.

var<workgroup> red: array<f32, 256>;
var<workgroup> bcast_f: vec4<f32>;
var<private> n_subgroups: u32;

fn reduce_sum(v: f32, lid: u32, sg: u32, lane: u32) -> f32 {
    let s = subgroupAdd(v);
    if (lane == 0u) {
        red[sg] = s;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var t = 0.0;
        for (var i = 0u; i < n_subgroups; i++) {
            t += red[i];
        }
        bcast_f.x = t;
    }
    return workgroupUniformLoad(&bcast_f).x;
}

fn reduce_max(v: f32, lid: u32, sg: u32, lane: u32) -> f32 {
    let s = subgroupMax(v);
    if (lane == 0u) {
        red[sg] = s;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var t = -3.4e38;
        for (var i = 0u; i < n_subgroups; i++) {
            t = max(t, red[i]);
        }
        bcast_f.x = t;
    }
    return workgroupUniformLoad(&bcast_f).x;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32,
        @builtin(num_subgroups) nsg: u32) {
    n_subgroups = nsg;
    row_main(wid, lid, sg, lane);
}
