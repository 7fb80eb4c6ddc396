// T5 self-attention with a relative position bias and a key mask (src/ops/attention_bias.rs):
//
//   s[h, i, j] = q[h, i, :]·k[h, j, :] + table[bucket[j - i + L - 1], h]      (no 1/sqrt(D) scale)
//   s[h, i, j] = lowest f32 (-3.4028235e38)                    where mask[j] == 0 (padded key)
//   out[h, i, :] = sum_j softmax_j(s[h, i, :]) v[h, j, :]
//
// q, k, v, out: [H, L, D] f32 row-major; table: [NB, H] f32 (the layer's pos_embedding weight);
// bucket: [2L - 1] u32, the bucket of each relative distance j - i (values >= NB are clamped to
// the last row); mask: [L] u32, 0 = padding.
//
// One workgroup of 64 threads per query row (h, i); rows are numbered wid.x + wid.y *
// num_workgroups.x (2-D grid). Keys are visited in chunks of 64, one per thread: the thread
// computes its logit, the workgroup reduces the chunk maximum and sum (online softmax, all in
// f32), then each thread owns output channels d = lid, lid + 64, ... and accumulates
// p_j * v[j, d] over the chunk into out (which doubles as the accumulator, so D is unbounded).
// The padded-key logit is the lowest f32 (what adding it to a logit of |s| < 1e31 gives in f32,
// as the reference does): such keys get weight exactly 0 unless every key is padded, in which
// case the weights are uniform, as in PyTorch.

struct Params {
    heads: u32,
    len: u32,
    dim: u32,
    buckets: u32,
    rows: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> table: array<f32>;
@group(0) @binding(5) var<storage, read> bucket: array<u32>;
@group(0) @binding(6) var<storage, read> mask: array<u32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;

const WG: u32 = 64u;
const LOWEST: f32 = -3.4028234663852886e38;

var<workgroup> red: array<f32, WG>;
var<workgroup> prob: array<f32, WG>;
var<workgroup> total: f32;

fn reduce_max(lid: u32, x: f32) -> f32 {
    red[lid] = x;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        total = red[0];
    }
    return workgroupUniformLoad(&total);
}

fn reduce_sum(lid: u32, x: f32) -> f32 {
    red[lid] = x;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = red[lid] + red[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        total = red[0];
    }
    return workgroupUniformLoad(&total);
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= P.rows) {
        return;
    }
    let n = P.len;
    let d_len = P.dim;
    let h = row / n;
    let i = row % n;
    let qb = row * d_len;
    let kb = h * n * d_len;

    for (var d = lid; d < d_len; d += WG) {
        out[qb + d] = 0.0;
    }
    var m = LOWEST;
    var l = 0.0;
    for (var c0 = 0u; c0 < n; c0 += WG) {
        let j = c0 + lid;
        let valid = j < n;
        var s = LOWEST;
        if (valid && mask[j] != 0u) {
            var dot = 0.0;
            let kr = kb + j * d_len;
            for (var d = 0u; d < d_len; d++) {
                dot += q[qb + d] * k[kr + d];
            }
            let b = min(bucket[j + n - 1u - i], P.buckets - 1u);
            s = dot + table[b * P.heads + h];
        }
        let mn = max(m, reduce_max(lid, s));
        let alpha = exp(m - mn);
        var p = 0.0;
        if (valid) {
            p = exp(s - mn);
        }
        prob[lid] = p;
        // the barriers inside the reduction also publish prob[] to the whole workgroup
        l = l * alpha + reduce_sum(lid, p);
        let cn = min(WG, n - c0);
        for (var d = lid; d < d_len; d += WG) {
            var acc = out[qb + d] * alpha;
            var vr = kb + c0 * d_len + d;
            for (var t = 0u; t < cn; t++) {
                acc += prob[t] * v[vr];
                vr += d_len;
            }
            out[qb + d] = acc;
        }
        m = mn;
        // prob[] and red[] are rewritten by the next chunk
        workgroupBarrier();
    }
    let inv = 1.0 / l;
    for (var d = lid; d < d_len; d += WG) {
        out[qb + d] = out[qb + d] * inv;
    }
}
