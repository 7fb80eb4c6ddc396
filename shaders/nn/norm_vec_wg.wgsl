// The reduction and entry point of norm_vec.wgsl on any adapter: the tree of norm_common.wgsl.

fn reduce_sum(v: f32, lid: u32) -> f32 {
    return tree_sum(v, lid);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    row_main(wid.x + wid.y * nwg.x, lid);
}
