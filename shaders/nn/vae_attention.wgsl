// Single-head self-attention over the pixels of each frame, channel-first (the Wan VAE's
// middle AttentionBlock): qkv [3C, T, S] holds q = channels [0, C), k = [C, 2C), v = [2C, 3C)
// of T frames with S = H·W pixels each;
//   out[c, t, i] = sum_j softmax_j(q[:, t, i] · k[:, t, j] / sqrt(C)) · v[c, t, j].
// Flash-style (online softmax, f32): a workgroup of 256 threads owns BQ = 32 query pixels of
// one frame and walks the keys in blocks of BK = 32; the channel axis is consumed in chunks of
// DC = 32 through workgroup memory, so any C up to DC·MAXCH = 512 fits in 16 KiB of workgroup
// memory. Thread (row = lid / 8, lane = lid % 8) computes scores (row, 4·lane .. 4·lane + 3)
// and owns the outputs (row, chunk·32 + 4·lane .. + 3) of every channel chunk, kept in
// registers. Query rows past S are computed on zeros and not written; keys past S get
// probability 0. P.scale is log2(e)/sqrt(C): the softmax runs in base 2.

struct Params {
    c: u32,      // channels C (= head dim)
    t: u32,      // frames
    s: u32,      // pixels per frame
    chunks: u32, // ceil(C / DC)
    scale: f32,  // log2(e) / sqrt(C)
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

const BQ: u32 = 32u;
const BK: u32 = 32u;
const DC: u32 = 32u;
const MAXCH: u32 = 16u;
const NEG: f32 = -3.0e38;

var<workgroup> qs: array<f32, 1024>;  // [d][i] of the current channel chunk
var<workgroup> ks: array<f32, 1024>;  // [d][j]
var<workgroup> vs: array<f32, 1024>;  // [d][j]
var<workgroup> ps: array<f32, 1024>;  // [i][j] scores, then probabilities
var<workgroup> m_s: array<f32, BQ>;   // running row max (base-2 logits)
var<workgroup> l_s: array<f32, BQ>;   // running row sum
var<workgroup> a_s: array<f32, BQ>;   // rescale factor of this key block

// Flat index of channel ch (of the 3C or C channels), frame t, pixel p.
fn at(ch: u32, t: u32, p: u32) -> u32 {
    return (ch * P.t + t) * P.s + p;
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i0 = wid.x * BQ;
    let t = wid.y;
    if (i0 >= P.s || t >= P.t) {
        return;
    }
    let row = lid / 8u;
    let lane = (lid % 8u) * 4u;
    if (lid < BQ) {
        m_s[lid] = NEG;
        l_s[lid] = 0.0;
    }
    var o: array<vec4<f32>, MAXCH>;
    for (var ch = 0u; ch < MAXCH; ch++) {
        o[ch] = vec4<f32>(0.0);
    }
    workgroupBarrier();

    for (var kb = 0u; kb < P.s; kb += BK) {
        // scores of (row, lane .. lane + 3)
        var sc = vec4<f32>(0.0);
        for (var ch = 0u; ch < P.chunks; ch++) {
            let d0 = ch * DC;
            for (var r = 0u; r < 4u; r++) {
                let e = lid + r * 256u;
                let d = d0 + e / 32u;
                let j = e % 32u;
                var qv = 0.0;
                var kv = 0.0;
                if (d < P.c) {
                    if (i0 + j < P.s) {
                        qv = qkv[at(d, t, i0 + j)];
                    }
                    if (kb + j < P.s) {
                        kv = qkv[at(P.c + d, t, kb + j)];
                    }
                }
                qs[e] = qv;
                ks[e] = kv;
            }
            workgroupBarrier();
            for (var d = 0u; d < DC; d++) {
                let q = qs[d * BQ + row];
                let kbase = d * BK + lane;
                sc += q * vec4<f32>(ks[kbase], ks[kbase + 1u], ks[kbase + 2u], ks[kbase + 3u]);
            }
            workgroupBarrier();
        }
        for (var c = 0u; c < 4u; c++) {
            ps[row * BK + lane + c] = sc[c] * P.scale;
        }
        workgroupBarrier();

        // online softmax, one thread per row
        if (lid < BQ) {
            let valid = min(BK, P.s - kb);
            let old = m_s[lid];
            var mx = old;
            for (var j = 0u; j < valid; j++) {
                mx = max(mx, ps[lid * BK + j]);
            }
            var sum = 0.0;
            for (var j = 0u; j < BK; j++) {
                var p = 0.0;
                if (j < valid) {
                    p = exp2(ps[lid * BK + j] - mx);
                }
                ps[lid * BK + j] = p;
                sum += p;
            }
            let alpha = exp2(old - mx);
            a_s[lid] = alpha;
            l_s[lid] = l_s[lid] * alpha + sum;
            m_s[lid] = mx;
        }
        workgroupBarrier();

        // o = o·alpha + p·v, chunk by chunk
        let alpha = a_s[row];
        for (var ch = 0u; ch < P.chunks; ch++) {
            let d0 = ch * DC;
            for (var r = 0u; r < 4u; r++) {
                let e = lid + r * 256u;
                let d = d0 + e / 32u;
                let j = e % 32u;
                var vv = 0.0;
                if (d < P.c && kb + j < P.s) {
                    vv = qkv[at(2u * P.c + d, t, kb + j)];
                }
                vs[e] = vv;
            }
            workgroupBarrier();
            var acc = o[ch] * alpha;
            for (var j = 0u; j < BK; j++) {
                let p = ps[row * BK + j];
                acc += p * vec4<f32>(
                    vs[lane * BK + j],
                    vs[(lane + 1u) * BK + j],
                    vs[(lane + 2u) * BK + j],
                    vs[(lane + 3u) * BK + j],
                );
            }
            o[ch] = acc;
            workgroupBarrier();
        }
    }

    let i = i0 + row;
    if (i >= P.s) {
        return;
    }
    let inv = 1.0 / l_s[row];
    for (var ch = 0u; ch < P.chunks; ch++) {
        for (var c = 0u; c < 4u; c++) {
            let d = ch * DC + lane + c;
            if (d < P.c) {
                out[at(d, t, i)] = o[ch][c] * inv;
            }
        }
    }
}
