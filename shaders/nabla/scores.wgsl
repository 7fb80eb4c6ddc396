// Compressed attention logits: out[bh, i, j] = (qa[bh, i, :] . ka[bh, j, :]) / sqrt(D)
// qa, ka [BH, Nb, D] f32 (D a multiple of 16, read as vec4), out [BH, Nb, Nb] f32.
// 128x128 output tile per workgroup, 256 threads with 8x8 outputs each: rows ti*4 + r and
// 64 + ti*4 + r, columns tj*4 + c and 64 + tj*4 + c (two 4-wide groups each way, so the 16
// threads of a row read 16 consecutive vec4s of workgroup memory). K in steps of 16 through
// workgroup memory; the next step's operands are loaded into registers during the current
// step's products. Each output sums its D products in ascending k, one multiply-add at a time,
// then divides by sqrt(D). Edge tiles (Nb not a multiple of 128) are masked.

// (Params and bindings: scores_io.wgsl, prepended by the dispatcher)

// [k][row] layout: element (k, row) in vec4 slot k*32 + row/4, lane row%4
var<workgroup> a_s: array<vec4<f32>, 512>;
var<workgroup> b_s: array<vec4<f32>, 512>;

// rows [row0, row0+128) x k [k0, k0+16) of x: this thread's two vec4s (rows lid/4 and
// 64 + lid/4, k k0 + (lid%4)*4), zero past nb
fn load2(which: u32, bh: u32, row0: u32, k0: u32, lid: u32) -> mat2x4<f32> {
    let r = row0 + lid / 4u;
    let kv = (k0 + (lid % 4u) * 4u) / 4u;
    let dv = P.d / 4u;
    var v0 = vec4<f32>(0.0);
    var v1 = vec4<f32>(0.0);
    let g0 = (bh * P.nb + r) * dv + kv;
    let g1 = g0 + 64u * dv;
    if (which == 0u) {
        if (r < P.nb) {
            v0 = qa[g0];
        }
        if (r + 64u < P.nb) {
            v1 = qa[g1];
        }
    } else {
        if (r < P.nb) {
            v0 = ka[g0];
        }
        if (r + 64u < P.nb) {
            v1 = ka[g1];
        }
    }
    return mat2x4<f32>(v0, v1);
}

fn stage(which: u32, lid: u32, v: mat2x4<f32>) {
    let lr = lid / 4u;
    let lk = (lid % 4u) * 4u;
    for (var e = 0u; e < 4u; e++) {
        let slot = (lk + e) * 32u + lr / 4u;
        if (which == 0u) {
            a_s[slot][lr % 4u] = v[0][e];
            a_s[slot + 16u][lr % 4u] = v[1][e];
        } else {
            b_s[slot][lr % 4u] = v[0][e];
            b_s[slot + 16u][lr % 4u] = v[1][e];
        }
    }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let bh = wid.z;
    let i0 = wid.y * 128u;
    let j0 = wid.x * 128u;
    let ti = lid / 16u;
    let tj = lid % 16u;
    // named accumulators (an array indexed in loops may live in local memory):
    // a = rows ti*4.., b = rows 64+ti*4..; suffix 0 = columns tj*4.., 1 = columns 64+tj*4..
    var a00 = vec4<f32>(0.0);
    var a10 = vec4<f32>(0.0);
    var a20 = vec4<f32>(0.0);
    var a30 = vec4<f32>(0.0);
    var a01 = vec4<f32>(0.0);
    var a11 = vec4<f32>(0.0);
    var a21 = vec4<f32>(0.0);
    var a31 = vec4<f32>(0.0);
    var b00 = vec4<f32>(0.0);
    var b10 = vec4<f32>(0.0);
    var b20 = vec4<f32>(0.0);
    var b30 = vec4<f32>(0.0);
    var b01 = vec4<f32>(0.0);
    var b11 = vec4<f32>(0.0);
    var b21 = vec4<f32>(0.0);
    var b31 = vec4<f32>(0.0);
    var xq = load2(0u, bh, i0, 0u, lid);
    var xk = load2(1u, bh, j0, 0u, lid);
    for (var k0 = 0u; k0 < P.d; k0 += 16u) {
        stage(0u, lid, xq);
        stage(1u, lid, xk);
        workgroupBarrier();
        if (k0 + 16u < P.d) {
            xq = load2(0u, bh, i0, k0 + 16u, lid);
            xk = load2(1u, bh, j0, k0 + 16u, lid);
        }
        for (var c = 0u; c < 16u; c++) {
            let qa0 = a_s[c * 32u + ti];
            let qa1 = a_s[c * 32u + 16u + ti];
            let kb0 = b_s[c * 32u + tj];
            let kb1 = b_s[c * 32u + 16u + tj];
            a00 += qa0.x * kb0;
            a10 += qa0.y * kb0;
            a20 += qa0.z * kb0;
            a30 += qa0.w * kb0;
            a01 += qa0.x * kb1;
            a11 += qa0.y * kb1;
            a21 += qa0.z * kb1;
            a31 += qa0.w * kb1;
            b00 += qa1.x * kb0;
            b10 += qa1.y * kb0;
            b20 += qa1.z * kb0;
            b30 += qa1.w * kb0;
            b01 += qa1.x * kb1;
            b11 += qa1.y * kb1;
            b21 += qa1.z * kb1;
            b31 += qa1.w * kb1;
        }
        workgroupBarrier();
    }
    let r0 = i0 + ti * 4u;
    let r1 = i0 + 64u + ti * 4u;
    let c0 = j0 + tj * 4u;
    let c1 = j0 + 64u + tj * 4u;
    store4(bh, r0, c0, a00, a10, a20, a30);
    store4(bh, r0, c1, a01, a11, a21, a31);
    store4(bh, r1, c0, b00, b10, b20, b30);
    store4(bh, r1, c1, b01, b11, b21, b31);
}

// four consecutive rows from gi, four columns from gj each
fn store4(bh: u32, gi: u32, gj: u32, v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) {
    store_row(bh, gi, gj, v0);
    store_row(bh, gi + 1u, gj, v1);
    store_row(bh, gi + 2u, gj, v2);
    store_row(bh, gi + 3u, gj, v3);
}

fn store_row(bh: u32, gi: u32, gj: u32, v: vec4<f32>) {
    if (gi >= P.nb) {
        return;
    }
    let base = (bh * P.nb + gi) * P.stride;
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
