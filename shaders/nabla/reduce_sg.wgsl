// Subgroup reductions for threshold.wgsl (adapters with SUBGROUP): a subgroup reduction,
// one partial per subgroup in workgroup memory, summed by one invocation (two barriers per
// reduction), and the entry point.

var<workgroup> red: array<f32, 256>;
var<workgroup> cnt: array<u32, 256>;
var<workgroup> bcast_f: vec4<f32>;
var<workgroup> bcast_u: vec4<u32>;
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

// Exclusive prefix count of `flag` over the workgroup and the total: subgroup scans, then the
// counts of the subgroups before this one (two barriers).
fn chunk_prefix(flag: u32, lid: u32, sg: u32, lane: u32) -> vec2<u32> {
    let incl = subgroupInclusiveAdd(flag);
    let tot = subgroupAdd(flag);
    if (lane == 0u) {
        cnt[sg] = tot;
    }
    workgroupBarrier();
    var before = 0u;
    var total = 0u;
    for (var i = 0u; i < n_subgroups; i++) {
        let c = cnt[i];
        total += c;
        before += select(0u, c, i < sg);
    }
    workgroupBarrier();
    return vec2<u32>(before + incl - flag, total);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32,
        @builtin(num_subgroups) nsg: u32) {
    n_subgroups = nsg;
    row_main(wid, lid, sg, lane);
}
