// Row softmax + CDF threshold + STA union + compact per-row lists: the same contract and the
// same rule as threshold.wgsl, with ONE SUBGROUP PER ROW (4 rows per workgroup): the row lives in
// the subgroup's registers (KL values per lane, key j = lane + t·SG), every reduction and the
// list compaction are subgroup operations, and there is no workgroup barrier at all. Chosen
// when the adapter has subgroups and Nb ≤ 64·SG; threshold.wgsl covers the rest.
// The prelude defines KL, SG and WRITE_PROBS (0: the probabilities are not written back, the
// DiT's form); the unroll blocks are expanded by the dispatcher.

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
// the STA window as a bitmask [Nb, ceil(Nb/32)]: bit l of word w of row i = key block 32w + l
// allowed (built once per grid and window on the host; one unread word without STA)
@group(0) @binding(4) var<storage, read> sta_bits: array<u32>;

@compute @workgroup_size(4 * SG)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(subgroup_id) sg: u32,
        @builtin(subgroup_invocation_id) lane: u32) {
    let n = P.nb;
    // rows past Nb (last workgroup) recompute row Nb-1 and write nothing
    let qi_raw = wid.x * 4u + sg;
    let live = qi_raw < n;
    let qi = min(qi_raw, n - 1u);
    let row = wid.y * n + qi;
    let base = row * P.stride;  // the row in probs
    let lbase = row * n;        // the row in indices

    var m = -3.4e38;
    //@unroll KL
    var x{t} = -3.4e38;
    if (lane + {t}u * SG < n) {
        x{t} = probs[base + lane + {t}u * SG];
    }
    m = max(m, x{t});
    //@end
    m = subgroupMax(m);
    var s = 0.0;
    //@unroll KL
    x{t} = exp(x{t} - m);
    s += x{t};
    //@end
    s = subgroupAdd(s);
    var pmax = 0.0;
    //@unroll KL
    x{t} = x{t} / s;
    if (lane + {t}u * SG < n) {
        if (live && WRITE_PROBS != 0u) {
            probs[base + lane + {t}u * SG] = x{t};
        }
    } else {
        x{t} = 0.0;
    }
    pmax = max(pmax, x{t});
    //@end
    pmax = subgroupMax(pmax);

    // The cut: the smallest bit pattern lo with F(lo) >= cut, F(v) = sum of the x <= v (the
    // kept blocks are those with bits(x) >= lo). The answer lies in [lo, hi], kept
    // subgroup-uniform: hi starts at pmax (F = 1), lo at a bound from F(v) <= n·v (so no v
    // below cut / n qualifies; 1 % margin for the rounding of F, far above n·2^-24), 0 when
    // cut <= 0 (every block kept).
    var hi = bitcast<u32>(pmax);
    var lo = min(bitcast<u32>(P.cut / f32(n) * 0.99), hi);
    if (P.cut <= 0.0) {
        hi = 0u;
        lo = 0u;
    }
    // Bisection. Each pass also counts the values at or below the midpoint, so the counts at
    // both ends of the bracket are known: n_hi values have bits <= hi, n_lo have bits < lo.
    // Once at most one value lies in [lo, hi] the search stops, exactly: F only steps at
    // values, so that value is the cut and the kept set {bits >= lo} is final. Rows of 1 050
    // softmax blocks then take 4-12 passes instead of ~26 (a numpy model of the search).
    // (A finish by successive minima after counting every 3 passes measured slower on the
    // H200: benches/RESULTS.md, session 10.)
    var n_hi = f32(KL * SG);
    var n_lo = -1.0;
    for (var it = 0u; it < 32u; it++) {
        if (lo >= hi || n_hi - n_lo <= 1.0) {
            break;
        }
        let mid = lo + (hi - lo) / 2u;
        let v = bitcast<f32>(mid);
        // each lane's sum and count of its values at or below v, added under the comparison
        // (a balanced tree of selects instead: the stage 0.258 instead of 0.209 ms at
        // wan14b-720p on the H200, benches/RESULTS.md session 15)
        var fs = 0.0;
        var fn_ = 0.0;
        //@unroll KL
        if (x{t} <= v) {
            fs += x{t};
            fn_ += 1.0;
        }
        //@end
        let fc = subgroupAdd(vec2<f32>(fs, fn_));
        if (fc.x >= P.cut) {
            hi = mid;
            n_hi = fc.y;
        } else {
            lo = mid + 1u;
            n_lo = fc.y;
        }
    }

    // keep flags (+ STA) and compaction in ascending key order, SG keys at a time. The row's
    // STA words (ceil(Nb/32) <= 2·SG of them) are loaded once, lane l holding words l and
    // l + SG; key j's word (j / 32) then comes by a shuffle. With a load per chunk instead
    // the stage ran 10-18 % slower on the H200 (session 15), without STA too (not explained).
    var offset = 0u;
    let nw = (n + 31u) / 32u;
    var w0 = 0u;
    var w1 = 0u;
    if (P.use_sta != 0u) {
        w0 = sta_bits[qi * nw + min(lane, nw - 1u)];
        w1 = sta_bits[qi * nw + min(lane + SG, nw - 1u)];
    }
    //@unroll KL
    if ({t}u * SG < n) {
        let j = lane + {t}u * SG;
        var keep = j < n && bitcast<u32>(x{t}) >= lo;
        // (the words of chunk t sit in slot t / 32 for every subgroup size: the shuffle runs
        // in subgroup-uniform control flow)
        if (P.use_sta != 0u) {
            let word = subgroupShuffle(select(w0, w1, {t}u >= 32u), ((lane + {t}u * SG) / 32u) % SG);
            keep = keep | (j < n && ((word >> (j % 32u)) & 1u) != 0u);
        }
        // rank among the kept lanes: the ballot's bits below this lane (two subgroup scans
        // instead measured 0.1 ms slower at wan14b-720p on the H200)
        let b = subgroupBallot(keep);
        if (SG <= 32u) {
            let before = countOneBits(b.x & ((1u << lane) - 1u));
            if (keep && live) {
                indices[lbase + offset + before] = j;
            }
            offset += countOneBits(b.x);
        } else {
            let below = select(b.x & ((1u << lane) - 1u), b.x, lane >= 32u);
            let below_hi = select(0u, b.y & ((1u << (lane - 32u)) - 1u), lane >= 32u);
            let before = countOneBits(below) + countOneBits(below_hi);
            if (keep && live) {
                indices[lbase + offset + before] = j;
            }
            offset += countOneBits(b.x) + countOneBits(b.y);
        }
    }
    //@end
    if (lane == 0u && live) {
        counts[row] = offset;
    }
}
