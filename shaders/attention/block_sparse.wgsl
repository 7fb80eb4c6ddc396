// Block-sparse flash attention over per-row KV block lists (portable variant, f32 math).
//
// q, out: [BH, SQ, HD]; k, v: [BH, SKV, HD]; storage type S4 (vec4 of f32 or f16).
// counts [MH, NQB], indices [MH, NQB, NKB] (NQB = ceil(SQ/64), NKB = ceil(SKV/64)): for query
// block i of mask head mh, the key blocks indices[mh, i, 0..counts[mh, i]) are attended in full
// (MH = 1 broadcasts one mask to all heads). Ragged tails: query rows >= SQ are not written, keys
// >= SKV are masked out.
// out[s] = sum_{t in K(s)} softmax_t(q_s . k_t * scale) v_t, online softmax in f32; rows with an
// empty list give 0.
// One workgroup = 64 query rows of one head; 2 threads per row, each owns HD/2 channels of q and o.
// Keys are staged KT at a time in workgroup memory; the two halves of a dot product meet there.
// The prelude defines S4 and HD (64 or 128).

const QV: u32 = HD / 4u;    // vec4s per row
const DV: u32 = HD / 8u;    // vec4s per thread (half a row)
const KT: u32 = 16u;        // keys per staged tile

struct Params {
    sq: u32,
    skv: u32,
    nqb: u32,
    nkb: u32,
    mask_heads: u32,
    scale_log2e: f32,
    _order: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> q: array<S4>;
@group(0) @binding(2) var<storage, read> k: array<S4>;
@group(0) @binding(3) var<storage, read> v: array<S4>;
@group(0) @binding(4) var<storage, read> counts: array<u32>;
@group(0) @binding(5) var<storage, read> indices: array<u32>;
@group(0) @binding(6) var<storage, read_write> out: array<S4>;

var<workgroup> ks: array<vec4<f32>, KT * QV>;
var<workgroup> vs: array<vec4<f32>, KT * QV>;
var<workgroup> part: array<f32, 128u * KT>;
var<workgroup> wcount: u32;
var<workgroup> wblock: u32;

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let qb = wid.x;
    let bh = wid.y;
    let row = lid >> 1u;
    let half = lid & 1u;
    let tok = qb * 64u + row;
    let live = tok < P.sq;
    let qbase = (bh * P.sq + min(tok, P.sq - 1u)) * QV + half * DV;

    var qr: array<vec4<f32>, DV>;
    var o: array<vec4<f32>, DV>;
    for (var i = 0u; i < DV; i++) {
        qr[i] = vec4<f32>(q[qbase + i]) * P.scale_log2e;
        o[i] = vec4<f32>(0.0);
    }
    var m = -1.0e30;
    var l = 0.0;

    let mh = select(0u, bh, P.mask_heads > 1u);
    let mrow = mh * P.nqb + qb;
    if (lid == 0u) {
        wcount = counts[mrow];
    }
    let cnt = workgroupUniformLoad(&wcount);

    for (var n = 0u; n < cnt; n++) {
        if (lid == 0u) {
            wblock = indices[mrow * P.nkb + n];
        }
        let kb = workgroupUniformLoad(&wblock);
        let kbase = bh * P.skv;
        for (var st = 0u; st < 64u; st += KT) {
            let key0 = kb * 64u + st;
            for (var e = lid; e < KT * QV; e += 128u) {
                let key = key0 + e / QV;
                if (key < P.skv) {
                    let g = (kbase + key) * QV + e % QV;
                    ks[e] = vec4<f32>(k[g]);
                    vs[e] = vec4<f32>(v[g]);
                } else {
                    ks[e] = vec4<f32>(0.0);
                    vs[e] = vec4<f32>(0.0);
                }
            }
            workgroupBarrier();
            for (var t = 0u; t < KT; t++) {
                var acc = 0.0;
                let kr = t * QV + half * DV;
                for (var i = 0u; i < DV; i++) {
                    acc += dot(qr[i], ks[kr + i]);
                }
                part[lid * KT + t] = acc;
            }
            workgroupBarrier();
            var sc: array<f32, KT>;
            var mx = m;
            let partner = lid ^ 1u;
            for (var t = 0u; t < KT; t++) {
                sc[t] = select(part[lid * KT + t] + part[partner * KT + t], -3.0e38, key0 + t >= P.skv);
                mx = max(mx, sc[t]);
            }
            let alpha = exp2(m - mx);
            l *= alpha;
            for (var i = 0u; i < DV; i++) {
                o[i] *= alpha;
            }
            for (var t = 0u; t < KT; t++) {
                let p = exp2(sc[t] - mx);
                l += p;
                let vr = t * QV + half * DV;
                for (var i = 0u; i < DV; i++) {
                    o[i] += p * vs[vr + i];
                }
            }
            m = mx;
            workgroupBarrier();
        }
    }
    let inv = select(0.0, 1.0 / l, l > 0.0);
    if (live) {
        for (var i = 0u; i < DV; i++) {
            out[qbase + i] = S4(o[i] * inv);
        }
    }
}
