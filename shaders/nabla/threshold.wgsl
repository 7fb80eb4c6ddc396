// Row softmax + CDF threshold + STA union + compact per-row lists, one workgroup per row.
//
// logits [rows, Nb] f32 (rows = BH * Nb) are replaced in place by p = softmax(logits).
// Kept set of a row: every j with F(p_j) >= cut, where F(v) = sum of the row's p_k <= v and
// cut = f32(1 - thr). F is monotone in v, so a bisection over the bit pattern of v (which
// orders non-negative floats) finds the smallest kept value `lo` in <= 31 reduction passes;
// then keep_j = (p_j >= lo). Equal to the sort + cumsum rule except at exact ties on the cut
// (all tied entries are kept) and at thr = 0, where the row maximum is always kept.
// With STA on, keep_j |= (|t_i - t_j| <= rt && |y_i - y_j| <= rh && |x_i - x_j| <= rw).
// Output: counts[row] and indices[row, 0..count) in ascending key order.

struct Params {
    nb: u32,
    cut: f32,
    use_sta: u32,
    hb: u32,
    wb: u32,
    rt: u32,
    rh: u32,
    rw: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read_write> probs: array<f32>;
@group(0) @binding(2) var<storage, read_write> counts: array<u32>;
@group(0) @binding(3) var<storage, read_write> indices: array<u32>;

const WG: u32 = 256u;
var<workgroup> red: array<f32, WG>;
var<workgroup> scan: array<u32, WG>;
var<workgroup> bcast_f: f32;
var<workgroup> bcast_u: u32;

fn reduce_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = red[lid] + red[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        bcast_f = red[0];
    }
    return workgroupUniformLoad(&bcast_f);
}

fn reduce_max(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        bcast_f = red[0];
    }
    return workgroupUniformLoad(&bcast_f);
}

fn absdiff(a: u32, b: u32) -> u32 {
    return select(b - a, a - b, a > b);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let qi = wid.x;
    let row = wid.y * P.nb + qi;
    let base = row * P.nb;
    let n = P.nb;

    // 1. softmax, in place
    var m = -3.4e38;
    for (var j = lid; j < n; j += WG) {
        m = max(m, probs[base + j]);
    }
    m = reduce_max(lid, m);
    var s = 0.0;
    for (var j = lid; j < n; j += WG) {
        s += exp(probs[base + j] - m);
    }
    s = reduce_sum(lid, s);
    var pmax = 0.0;
    for (var j = lid; j < n; j += WG) {
        let p = exp(probs[base + j] - m) / s;
        probs[base + j] = p;
        pmax = max(pmax, p);
    }
    pmax = reduce_max(lid, pmax);

    // 2. bisection for the smallest bit pattern lo with F(lo) >= cut (lo <= bits(pmax))
    var lo = 0u;
    var hi = bitcast<u32>(pmax);
    for (var it = 0u; it < 32u; it++) {
        if (lo >= hi) {
            break;
        }
        let mid = lo + (hi - lo) / 2u;
        let v = bitcast<f32>(mid);
        var f = 0.0;
        for (var j = lid; j < n; j += WG) {
            let p = probs[base + j];
            f += select(0.0, p, p <= v);
        }
        f = reduce_sum(lid, f);
        if (f >= P.cut) {
            hi = mid;
        } else {
            lo = mid + 1u;
        }
    }
    let keep_from = lo;

    // 3. keep flags (+ STA) and compaction in ascending key order
    let hw = P.hb * P.wb;
    let ti = qi / hw;
    let yi = (qi % hw) / P.wb;
    let xi = qi % P.wb;
    var offset = 0u;
    for (var j0 = 0u; j0 < n; j0 += WG) {
        let j = j0 + lid;
        var keep = false;
        if (j < n) {
            keep = bitcast<u32>(probs[base + j]) >= keep_from;
            if (P.use_sta != 0u) {
                let tj = j / hw;
                let yj = (j % hw) / P.wb;
                let xj = j % P.wb;
                keep = keep || (absdiff(ti, tj) <= P.rt && absdiff(yi, yj) <= P.rh && absdiff(xi, xj) <= P.rw);
            }
        }
        let flag = select(0u, 1u, keep);
        // inclusive Hillis-Steele scan of the flags
        scan[lid] = flag;
        workgroupBarrier();
        for (var d = 1u; d < WG; d <<= 1u) {
            var add = 0u;
            if (lid >= d) {
                add = scan[lid - d];
            }
            workgroupBarrier();
            scan[lid] = scan[lid] + add;
            workgroupBarrier();
        }
        if (keep) {
            indices[base + offset + scan[lid] - 1u] = j;
        }
        if (lid == WG - 1u) {
            bcast_u = scan[WG - 1u];
        }
        offset += workgroupUniformLoad(&bcast_u);
    }
    if (lid == 0u) {
        counts[row] = offset;
    }
}
