// LayerNorm / RMSNorm over the last axis of x [rows, cols] (f32), one workgroup of 256 threads
// per row; rows are numbered wid.x + wid.y * num_workgroups.x (2-D grid for many rows).
//
// The prelude (src/ops/norm.rs) defines
//   const RMS: bool                         false: LayerNorm, true: RMSNorm
//   fn epilogue(c: u32, y: f32) -> f32      applied to the normalized value y of column c
//   alias OE                                the output's element type: f32, or f16 (LayerNorm
//                                           outputs that only feed a GEMM: the f32 result
//                                           rounded once as it is stored)
// and any extra bindings (3..) the epilogue reads (weight, bias, modulation table).
// norm_common.wgsl (appended by src/ops/norm.rs) holds the Params, P and `tree_sum`.
//
// LayerNorm: stable two-pass in f32, shifted by a pivot x0 (the row's first value) so the
// absolute mean is never rounded: mu = sum(x - x0) / C, d = (x - x0) - mu (= x - mean),
// var = sum(d^2) / C (biased), y = d * inverseSqrt(var + eps). x - x0 is exact for values
// within a factor 2 of each other (large offset, small spread), and a constant row gives
// d = 0 exactly, hence y = 0 exactly.
// RMSNorm: pivot and mu are 0, so d = x and y = x * inverseSqrt(sum(x^2) / C + eps).

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<OE>;

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= P.rows) {
        return;
    }
    let n = P.cols;
    let base = row * n;
    let fc = f32(n);

    var pivot = 0.0;
    var mu = 0.0;
    if (!RMS) {
        pivot = x[base];
        var s = 0.0;
        for (var c = lid; c < n; c += WG) {
            s += x[base + c] - pivot;
        }
        mu = tree_sum(s, lid) / fc;
    }
    var q = 0.0;
    for (var c = lid; c < n; c += WG) {
        let d = (x[base + c] - pivot) - mu;
        q += d * d;
    }
    let r = inverseSqrt(tree_sum(q, lid) / fc + P.eps);
    for (var c = lid; c < n; c += WG) {
        out[base + c] = OE(epilogue(c, ((x[base + c] - pivot) - mu) * r));
    }
}
