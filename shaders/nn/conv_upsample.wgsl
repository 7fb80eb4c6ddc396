// Nearest 2× spatial upsampling of x [C·T, H, W] into out [C·T, 2H, 2W] (PyTorch
// "nearest-exact" with scale 2: out[y, x] = in[y / 2, x / 2]). One thread per output value,
// 256 per workgroup on a 2-D grid.

struct Params {
    n: u32,  // output values C·T·2H·2W
    h: u32,  // input height
    w: u32,  // input width
    _p0: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

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
    let w2 = 2u * P.w;
    let plane = 4u * P.h * P.w;
    let f = i / plane;
    let r = i % plane;
    let y = r / w2;
    let x0 = r % w2;
    out[i] = x[(f * P.h + y / 2u) * P.w + x0 / 2u];
}
