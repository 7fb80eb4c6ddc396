// Workgroup reductions for threshold.wgsl on any adapter: a tree in workgroup memory
// (8 barriers per reduction), and the entry point.

var<workgroup> red: array<f32, 256>;
var<workgroup> red4: array<vec4<f32>, 1024>;
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

fn count_below(v: vec4<f32>, cut: f32) -> u32 {
    let b = select(vec4<u32>(0u), vec4<u32>(1u), v < vec4<f32>(cut));
    return b.x + b.y + b.z + b.w;
}

// Sums the 15 radix-candidate masses over the workgroup (tree on four vec4 lanes) and returns
// how many of them stay below the cut (the next radix digit).
fn radix_digit(f0: vec4<f32>, f1: vec4<f32>, f2: vec4<f32>, f3: vec4<f32>, cut: f32, lid: u32, sg: u32, lane: u32) -> u32 {
    red4[lid] = f0;
    red4[256u + lid] = f1;
    red4[512u + lid] = f2;
    red4[768u + lid] = f3;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red4[lid] += red4[lid + s];
            red4[256u + lid] += red4[256u + lid + s];
            red4[512u + lid] += red4[512u + lid + s];
            red4[768u + lid] += red4[768u + lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let below = count_below(red4[0], cut) + count_below(red4[256], cut) + count_below(red4[512], cut)
            + count_below(vec4<f32>(red4[768].xyz, 3.4e38), cut);
        bcast_u.x = below;
    }
    return workgroupUniformLoad(&bcast_u).x;
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
