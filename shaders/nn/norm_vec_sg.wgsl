// The reduction and entry point of norm_vec.wgsl on adapters with subgroups: a subgroup sum,
// one partial per subgroup in workgroup memory (`red` of norm_common.wgsl), summed alike by
// every thread (two barriers).

var<private> sg_id: u32;
var<private> sg_lane: u32;
var<private> sg_count: u32;

fn reduce_sum(v: f32, lid: u32) -> f32 {
    let s = subgroupAdd(v);
    if (sg_lane == 0u) {
        red[sg_id] = s;
    }
    workgroupBarrier();
    var t = 0.0;
    for (var i = 0u; i < sg_count; i++) {
        t += red[i];
    }
    // (red is written again by the next reduction)
    workgroupBarrier();
    return t;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_id) sg: u32,
        @builtin(subgroup_invocation_id) lane: u32,
        @builtin(num_subgroups) nsg: u32) {
    sg_id = sg;
    sg_lane = lane;
    sg_count = nsg;
    row_main(wid.x + wid.y * nwg.x, lid);
}
