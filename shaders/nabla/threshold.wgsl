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
// The row lives in registers (K named values per thread, unroll blocks expanded by the
// dispatcher; K = ceil(Nb/256), rounded up to a power of two above 8). reduce_sum / reduce_max and the entry point come from a
// reduction file prepended by the dispatcher: reduce_wg.wgsl (workgroup tree, any adapter) or
// reduce_sg.wgsl (subgroup operations, two barriers per reduction).

struct Params {
    nb: u32,
    cut: f32,
    use_sta: u32,
    hb: u32,
    wb: u32,
    rt: u32,
    rh: u32,
    rw: u32,
    stride: u32,    // floats between the rows of probs (>= nb)
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read_write> probs: array<f32>;
@group(0) @binding(2) var<storage, read_write> counts: array<u32>;
@group(0) @binding(3) var<storage, read_write> indices: array<u32>;

const WG: u32 = 256u;

fn absdiff(a: u32, b: u32) -> u32 {
    return select(b - a, a - b, a > b);
}

fn row_main(wid: vec3<u32>, lid: u32, sg: u32, lane: u32) {
    let qi = wid.x;
    let row = wid.y * P.nb + qi;
    let base = row * P.stride;  // the row in probs
    let n = P.nb;
    let lbase = row * n;        // the row in indices

    // 1. softmax, in registers (x0.., one per 256 keys), written back in place
    var m = -3.4e38;
    //@unroll K
    var x{t} = -3.4e38;
    if (lid + {t}u * WG < n) {
        x{t} = probs[base + lid + {t}u * WG];
    }
    m = max(m, x{t});
    //@end
    m = reduce_max(m, lid, sg, lane);
    var s = 0.0;
    //@unroll K
    x{t} = exp(x{t} - m);
    s += x{t};
    //@end
    s = reduce_sum(s, lid, sg, lane);
    var pmax = 0.0;
    //@unroll K
    x{t} = x{t} / s;
    if (lid + {t}u * WG < n) {
        probs[base + lid + {t}u * WG] = x{t};
    } else {
        x{t} = 0.0;
    }
    pmax = max(pmax, x{t});
    //@end
    pmax = reduce_max(pmax, lid, sg, lane);

    // 2. bisection for the smallest bit pattern lo with F(lo) >= cut (lo <= bits(pmax)).
    // (A radix-16 variant evaluating 15 cuts per reduction needed 4x fewer barriers but ran 2x
    // slower on the H200: benches/RESULTS.md.)
    var lo = 0u;
    var hi = bitcast<u32>(pmax);
    for (var it = 0u; it < 32u; it++) {
        if (lo >= hi) {
            break;
        }
        let mid = lo + (hi - lo) / 2u;
        let v = bitcast<f32>(mid);
        var f = 0.0;
        //@unroll K
        f += select(0.0, x{t}, x{t} <= v);
        //@end
        f = reduce_sum(f, lid, sg, lane);
        if (f >= P.cut) {
            hi = mid;
        } else {
            lo = mid + 1u;
        }
    }

    // 3. keep flags (+ STA) and compaction in ascending key order
    var offset = 0u;
    //@unroll K
    if ({t}u * WG < n) {
        offset += compact(qi, lbase, lid + {t}u * WG, x{t}, lo, offset, lid, sg, lane);
    }
    //@end
    if (lid == 0u) {
        counts[row] = offset;
    }
}

// Writes the kept keys of one 256-key chunk after `offset` and returns how many it kept.
fn compact(qi: u32, lbase: u32, j: u32, p: f32, keep_from: u32, offset: u32, lid: u32, sg: u32, lane: u32) -> u32 {
    let n = P.nb;
    let hw = P.hb * P.wb;
    var keep = false;
    if (j < n) {
        keep = bitcast<u32>(p) >= keep_from;
        if (P.use_sta != 0u) {
            let ti = qi / hw;
            let yi = (qi % hw) / P.wb;
            let xi = qi % P.wb;
            let tj = j / hw;
            let yj = (j % hw) / P.wb;
            let xj = j % P.wb;
            keep = keep || (absdiff(ti, tj) <= P.rt && absdiff(yi, yj) <= P.rh && absdiff(xi, xj) <= P.rw);
        }
    }
    let pre = chunk_prefix(select(0u, 1u, keep), lid, sg, lane);
    if (keep) {
        indices[lbase + offset + pre.x] = j;
    }
    return pre.y;
}
