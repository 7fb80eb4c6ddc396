// Workgroup reductions for threshold.wgsl on any adapter: a tree in workgroup memory
// (8 barriers per reduction), and the entry point.

var<workgroup> red: array<f32, 256>;
var<workgroup> scan: array<u32, 256>;
var<workgroup> bcast_f: vec4<f32>;
var<workgroup> bcast_u: vec4<u32>;

fn reduce_sum(v: f32, lid: u32, sg: u32, lane: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = red[lid] + red[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        bcast_f.x = red[0];
    }
    return workgroupUniformLoad(&bcast_f).x;
}

fn reduce_max(v: f32, lid: u32, sg: u32, lane: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        bcast_f.x = red[0];
    }
    return workgroupUniformLoad(&bcast_f).x;
}

// Exclusive prefix count of `flag` over the workgroup (Hillis-Steele) and the total.
fn chunk_prefix(flag: u32, lid: u32, sg: u32, lane: u32) -> vec2<u32> {
    scan[lid] = flag;
    workgroupBarrier();
    for (var d = 1u; d < 256u; d <<= 1u) {
        var add = 0u;
        if (lid >= d) {
            add = scan[lid - d];
        }
        workgroupBarrier();
        scan[lid] = scan[lid] + add;
        workgroupBarrier();
    }
    if (lid == 255u) {
        bcast_u.x = scan[255];
    }
    let total = workgroupUniformLoad(&bcast_u).x;
    return vec2<u32>(scan[lid] - flag, total);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    row_main(wid, lid, 0u, 0u);
}
