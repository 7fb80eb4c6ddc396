// The Wan VAE's RMS norm over the channel axis of a channel-first tensor x [C, P] (P = T·H·W
// positions), optionally followed by SiLU:
//   y[c, p] = x[c, p] / max(||x[:, p]||_2, 1e-12) · sqrt(C) · gamma[c] (+ beta[c])
// (PyTorch F.normalize(x, dim=channels) · scale · gamma + bias). One thread per position, 256
// per workgroup on a 2-D grid; consecutive threads read consecutive positions of one channel
// (coalesced). f32 math: the sum of squares, then one pass that writes.

struct Params {
    c: u32,      // channels
    p: u32,      // positions
    flags: u32,  // 1: add beta, 2: SiLU after the norm
    scale: f32,  // sqrt(C)
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// SiLU as in shaders/nn/elementwise_unary.wgsl: exponent clamped, x <= -88 gives 0.
fn silu(v: f32) -> f32 {
    let e = exp(min(-v, 88.0));
    return select(v / (1.0 + e), 0.0, v <= -88.0);
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let p = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (p >= P.p) {
        return;
    }
    var ss = 0.0;
    for (var c = 0u; c < P.c; c++) {
        let v = x[c * P.p + p];
        ss += v * v;
    }
    let denom = max(sqrt(ss), 1e-12);
    for (var c = 0u; c < P.c; c++) {
        var y = x[c * P.p + p] / denom * P.scale * gamma[c];
        if ((P.flags & 1u) != 0u) {
            y += beta[c];
        }
        if ((P.flags & 2u) != 0u) {
            y = silu(y);
        }
        out[c * P.p + p] = y;
    }
}
