// Occupancy probe: each invocation runs a dependent chain of P.iters integer multiply-adds (a
// linear congruential generator), so the time of a dispatch falls as more workgroups run at
// once on each compute unit. The workgroup array of N words is filled and read back, so no
// compiler can drop it: its size is what the probe varies. The prelude defines N (words of
// workgroup memory) and W (invocations per workgroup).
// out[g·W + l] = x ^ buf[x % N], x the chain's end value, buf[i] = x0(i % W) + i.

struct Params {
    iters: u32,
    seed: u32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;

var<workgroup> buf: array<u32, N>;

@compute @workgroup_size(W)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let g = wid.x + wid.y * nwg.x;
    var x = lid ^ (g * 2654435761u) ^ P.seed;
    for (var i = lid; i < N; i += W) {
        buf[i] = x + i;
    }
    workgroupBarrier();
    for (var i = 0u; i < P.iters; i++) {
        x = x * 1664525u + 1013904223u;
    }
    out[g * W + lid] = x ^ buf[x % N];
}
