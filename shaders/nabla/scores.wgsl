// Compressed attention logits: out[bh, i, j] = (qa[bh, i, :] . ka[bh, j, :]) / sqrt(D)
// qa, ka [BH, Nb, D] f32 (D a multiple of 16), out [BH, Nb, Nb] f32.
// 64x64 output tile per workgroup, 256 threads with 4x4 outputs each, k-steps of 16 staged in
// workgroup memory. Edge tiles (Nb not a multiple of 64) are masked.

struct Params {
    nb: u32,
    d: u32,
    sqrt_d: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> qa: array<f32>;
@group(0) @binding(2) var<storage, read> ka: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// [k][row] layout so a thread reads its 4 consecutive rows at once.
var<workgroup> a_s: array<vec4<f32>, 256>;
var<workgroup> b_s: array<vec4<f32>, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let bh = wid.z;
    let i0 = wid.y * 64u;
    let j0 = wid.x * 64u;
    let ti = lid / 16u;
    let tj = lid % 16u;
    // four named accumulators (an array indexed in loops may live in local memory)
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    // Loader mapping: thread loads 4 consecutive k of one row.
    let lr = lid / 4u;          // row 0..63
    let lk = (lid % 4u) * 4u;   // k offset 0,4,8,12
    for (var k0 = 0u; k0 < P.d; k0 += 16u) {
        let gi = i0 + lr;
        let gj = j0 + lr;
        var va = vec4<f32>(0.0);
        var vb = vec4<f32>(0.0);
        if (gi < P.nb) {
            let base = (bh * P.nb + gi) * P.d + k0 + lk;
            va = vec4<f32>(qa[base], qa[base + 1u], qa[base + 2u], qa[base + 3u]);
        }
        if (gj < P.nb) {
            let base = (bh * P.nb + gj) * P.d + k0 + lk;
            vb = vec4<f32>(ka[base], ka[base + 1u], ka[base + 2u], ka[base + 3u]);
        }
        // element (k, row) lives in vec4 slot k*16 + row/4, lane row%4
        for (var e = 0u; e < 4u; e++) {
            let slot = (lk + e) * 16u + lr / 4u;
            a_s[slot][lr % 4u] = va[e];
            b_s[slot][lr % 4u] = vb[e];
        }
        workgroupBarrier();
        for (var c = 0u; c < 16u; c++) {
            let a = a_s[c * 16u + ti];
            let b = b_s[c * 16u + tj];
            acc0 += a.x * b;
            acc1 += a.y * b;
            acc2 += a.z * b;
            acc3 += a.w * b;
        }
        workgroupBarrier();
    }
    store_row(bh, i0 + ti * 4u, j0 + tj * 4u, acc0);
    store_row(bh, i0 + ti * 4u + 1u, j0 + tj * 4u, acc1);
    store_row(bh, i0 + ti * 4u + 2u, j0 + tj * 4u, acc2);
    store_row(bh, i0 + ti * 4u + 3u, j0 + tj * 4u, acc3);
}

fn store_row(bh: u32, gi: u32, gj: u32, v: vec4<f32>) {
    if (gi >= P.nb) {
        return;
    }
    let base = (bh * P.nb + gi) * P.nb;
    if (gj < P.nb) {
        out[base + gj] = v.x / P.sqrt_d;
    }
    if (gj + 1u < P.nb) {
        out[base + gj + 1u] = v.y / P.sqrt_d;
    }
    if (gj + 2u < P.nb) {
        out[base + gj + 2u] = v.z / P.sqrt_d;
    }
    if (gj + 3u < P.nb) {
        out[base + gj + 3u] = v.w / P.sqrt_d;
    }
}
