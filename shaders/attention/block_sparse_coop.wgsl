// Block-sparse flash attention on cooperative matrices (tensor cores), f16 operands, f32
// accumulation. Same contract as block_sparse.wgsl: q, out [BH, SQ, HD]; k, v [BH, SKV, HD]
// (vec4<f16> storage); counts [MH, NQB], indices [MH, NQB, NKB]; ragged tails handled.
//
// One workgroup = 64 query rows of one head = 4 subgroups of 16 rows each. Every subgroup owns
// its rows end to end: its Q tile lives in registers as A matrices, S = Q·Kᵀ and the softmax of
// its rows go through its own slice of workgroup memory, O stays in C matrices. Each 64-key
// block of the list is walked as two 32-key chunks: K of a chunk is staged, then V in the same
// buffer (five barriers per chunk, two of them in the uniform load of the rescale flag). The
// chunks keep the workgroup memory at 23 KB (d = 128): NVIDIA's Vulkan driver gives all the
// workgroups on an SM 48 KB together (measured on the H200: `nabla bench occupancy`), and a
// whole 64-key block (44 KB) left room for one workgroup of 4 subgroups per SM; two fit now.
// Online softmax in base 2 with lazy rescaling: a row keeps its reference maximum until a
// chunk exceeds it by more than 2^8, and only then is O sent through workgroup memory to be
// rescaled (workgroup-wide decision, rare after the first blocks). The KV list is walked
// starting at a per-query-block offset so that neighbouring workgroups do not all read the same
// key block.
//
// Matrices and per-lane rows are named variables (qa0.., o0.., s0..), never arrays indexed in
// loops: the lines of each unroll block below are repeated with the t placeholders substituted
// by the dispatcher (shaders::expand_unroll), so no driver has to keep them in local memory.
//
// Every workgroup array is a multiple of 16 bytes and every cooperative load/store starts at a
// 16-byte boundary (row strides KSV, PSV (vec4 units), OS4 (vec4 units) and column offsets are
// multiples of 16 bytes): NVIDIA's cooperative loads round misaligned addresses down
// (GPU-NOTES.md). The prelude enables f16 and wgpu_cooperative_matrix and defines HD (64 or
// 128) and SG (the subgroup size; the workgroup has 4·SG threads).

const QV: u32 = HD / 4u;          // vec4s per row
const KSV: u32 = HD / 4u + 2u;    // vec4<f16> row stride of staged K / V / Q
const PSV: u32 = 10u;             // vec4<f16> row stride of P (32 keys + pad)
const OS4: u32 = 9u;              // vec4<f32> row stride of S (32 keys) and of two O tiles
const LPR: u32 = SG / 16u;        // lanes per row in the softmax
const KPL: u32 = 32u / LPR;       // keys per lane
const CPL: u32 = 32u / LPR;       // O columns per lane (two tiles)
const WGS: u32 = 4u * SG;

struct Params {
    sq: u32,
    skv: u32,
    nqb: u32,
    nkb: u32,
    mask_heads: u32,
    scale_log2e: f32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f16>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f16>>;
@group(0) @binding(4) var<storage, read> counts: array<u32>;
@group(0) @binding(5) var<storage, read> indices: array<u32>;
@group(0) @binding(6) var<storage, read_write> out: array<vec4<f16>>;

var<workgroup> kvs: array<vec4<f16>, 32u * KSV>;  // staged K or V chunk [32 keys][KSV]; Q at start
var<workgroup> pbuf: array<vec4<f16>, 64u * PSV>; // P rows [64][PSV]
var<workgroup> so: array<vec4<f32>, 64u * OS4>;   // per subgroup 16 rows: S, or two O tiles
var<workgroup> alpha: array<f32, 64>;             // per-row rescale factors
var<workgroup> wmeta: array<u32, 4>;              // [count, block, rescale flag, -]

// rows [row0, row0+32) of a [BH, len, HD] Q tensor into kvs, zero past len
fn stage_q(bh: u32, row0: u32, len: u32, lid: u32) {
    for (var e = lid; e < 32u * QV; e += WGS) {
        let r = e / QV;
        let c = e % QV;
        let t = row0 + r;
        var x = vec4<f16>(0.0h);
        if (t < len) {
            x = q[(bh * len + t) * QV + c];
        }
        kvs[r * KSV + c] = x;
    }
}

// The vec4 element of a 32-row K/V chunk that thread lid stages in unrolled slot t: slots 2j and
// 2j+1 take two adjacent elements (one 16-byte span), which the compiler can merge into one load
// (on the H200 this took 14B dense attention from 1 733 to 1 342 ms; one element per slot, at
// lid + t·WGS, leaves twice as many 8-byte loads).
fn el(lid: u32, t: u32) -> u32 {
    return ((lid + (t >> 1u) * WGS) << 1u) | (t & 1u);
}

// element e (vec4 index within a 32-row chunk) of K (which = 1) or V (2) rows [row0, row0+32),
// zero past len
fn ld(which: u32, bh: u32, row0: u32, len: u32, e: u32) -> vec4<f16> {
    // PROBE (diagnostics of the bench, wrong results): bit 0 skips these loads, bit 2 the MMAs
    if ((PROBE & 1u) != 0u) {
        return vec4<f16>(f16(e & 3u));
    }
    let t = row0 + e / QV;
    var x = vec4<f16>(0.0h);
    if (t < len) {
        let g = (bh * len + t) * QV + e % QV;
        if (which == 1u) {
            x = k[g];
        } else {
            x = v[g];
        }
    }
    return x;
}

@compute @workgroup_size(WGS)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_id) sg: u32,
        @builtin(subgroup_invocation_id) lane: u32) {
    let qb = wid.x;
    let bh = wid.y;
    let krow = (sg % 2u) * 16u * KSV; // this subgroup's Q rows in kvs (Q staged 32 rows at a time)
    let prow = sg * 16u * PSV;  // this subgroup's rows in pbuf
    let orow = sg * 16u * OS4;  // this subgroup's rows in so (vec4 units)
    let rl = lane / LPR;        // softmax: row within the subgroup
    let part = lane % LPR;
    let row = sg * 16u + rl;    // row within the 64-row tile

    // Q: rows 0..32 (subgroups 0 and 1), then rows 32..64 (subgroups 2 and 3)
    stage_q(bh, qb * 64u, P.sq, lid);
    let mh = select(0u, bh, P.mask_heads > 1u);
    let mrow = mh * P.nqb + qb;
    if (lid == 0u) {
        wmeta[0] = counts[mrow];
        wmeta[2] = 0u;
    }
    let cnt = workgroupUniformLoad(&wmeta[0]);
    //@unroll NT
    var qa{t} = coopLoadT<coop_mat16x16<f16, A>>(&kvs[krow + {t}u * 4u], KSV);
    var o{t} = coop_mat16x16<f32, C>();
    //@end
    workgroupBarrier();
    stage_q(bh, qb * 64u + 32u, P.sq, lid);
    workgroupBarrier();
    // (cooperative loads need workgroup-uniform control flow: each subgroup keeps the tile of
    // its half by weights 1 and 0, exact for finite f16 values. An inf or NaN in row i of Q
    // also turns row i ± 32 of this block's output to NaN, through 0·inf; the reference turns
    // row i alone to NaN. Either way such an input has no finite output.)
    let w1 = f16(sg / 2u);
    let w0 = 1.0h - w1;
    //@unroll NT
    qa{t} = qa{t} * w0 + coopLoadT<coop_mat16x16<f16, A>>(&kvs[krow + {t}u * 4u], KSV) * w1;
    //@end
    var m_ref = -1.0e30;
    var l_part = 0.0;
    var seen = false;
    let start = select(0u, qb % max(cnt, 1u), cnt > 0u);

    // Each chunk's K (then V) is loaded into registers right before it is staged: the next
    // chunk's loads issued during this chunk's work (a register prefetch) held 20 more
    // registers and measured 3.7 % slower on the H200. The staging is unrolled with a constant
    // trip count so all of a chunk's loads are in flight together; while one workgroup waits
    // for them, the other on the SM works.
    var kb = 0u;
    if (cnt > 0u) {
        kb = indices[mrow * P.nkb + start];
    }
    // (declared here and assigned in the loop: the form timed on the H200)
    //@unroll KST
    var kr{t} = vec4<f16>(0.0h);
    //@end
    // (this barrier also orders the Q reads above before the first K stage)
    workgroupBarrier();

    for (var n = 0u; n < 2u * cnt; n++) {
        let key0 = kb * 64u + (n % 2u) * 32u;
        //@unroll KST
        kr{t} = ld(1u, bh, key0, P.skv, el(lid, {t}u));
        //@end
        //@unroll KST
        kvs[(el(lid, {t}u) / QV) * KSV + el(lid, {t}u) % QV] = kr{t};
        //@end
        workgroupBarrier();
        // S = (Q Kᵀ) · scale·log2(e): 16 rows x 32 keys per subgroup
        for (var j = 0u; j < 2u; j++) {
            var acc = coop_mat16x16<f32, C>();
            if ((PROBE & 4u) != 0u) {
                coopStoreT(acc, &so[orow + j * 4u], OS4);
                continue;
            }
            //@unroll NT
            acc = coopMultiplyAdd(qa{t}, coopLoad<coop_mat16x16<f16, B>>(&kvs[j * 16u * KSV + {t}u * 4u], KSV), acc);
            //@end
            acc = acc * P.scale_log2e;
            coopStoreT(acc, &so[orow + j * 4u], OS4);
        }
        workgroupBarrier();
        //@unroll KST
        kr{t} = ld(2u, bh, key0, P.skv, el(lid, {t}u));
        //@end
        //@unroll KST
        kvs[(el(lid, {t}u) / QV) * KSV + el(lid, {t}u) % QV] = kr{t};
        //@end
        if (n + 1u < 2u * cnt && n % 2u == 1u) {
            var idx = (n + 1u) / 2u + start;
            if (idx >= cnt) {
                idx -= cnt;
            }
            kb = indices[mrow * P.nkb + idx];
        }
        // softmax of this subgroup's rows (LPR lanes per row, KPL keys each, 4 at a time)
        let sbase = orow + rl * OS4 + part * (KPL / 4u);
        let kbase = key0 + part * KPL;
        var bm = -1.0e30;
        //@unroll KPL4
        var s{t} = so[sbase + {t}u];
        s{t} = select(vec4<f32>(-3.0e38), s{t}, kbase + {t}u * 4u + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(P.skv));
        bm = max(bm, max(max(s{t}.x, s{t}.y), max(s{t}.z, s{t}.w)));
        //@end
        for (var x = 1u; x < LPR; x <<= 1u) {
            bm = max(bm, subgroupShuffleXor(bm, x));
        }
        var a = 1.0;
        if (bm > m_ref + 8.0) {
            a = exp2(m_ref - bm);
            m_ref = bm;
            if (seen) {
                wmeta[2] = 1u;
            }
        }
        var sum = 0.0;
        let pb = prow + rl * PSV + part * (KPL / 4u);
        //@unroll KPL4
        let p{t} = exp2(s{t} - m_ref);
        sum += p{t}.x + p{t}.y + p{t}.z + p{t}.w;
        pbuf[pb + {t}u] = vec4<f16>(p{t});
        //@end
        l_part = l_part * a + sum;
        if (part == 0u) {
            alpha[row] = a;
        }
        seen = true;
        // (workgroupUniformLoad is barrier, load, barrier: its first barrier also publishes P,
        // alpha and the flag to the PV step below)
        if (workgroupUniformLoad(&wmeta[2]) != 0u) {
            // rare: O rows *= alpha through workgroup memory, two tiles (t, t + NTH) at a time
            //@unroll NTH
            coopStoreT(o{t}, &so[orow], OS4);
            coopStoreT(o{t+NTH}, &so[orow + 4u], OS4);
            workgroupBarrier();
            scale_rows(orow, rl, part, alpha[row]);
            workgroupBarrier();
            o{t} = coopLoadT<coop_mat16x16<f32, C>>(&so[orow], OS4);
            o{t+NTH} = coopLoadT<coop_mat16x16<f32, C>>(&so[orow + 4u], OS4);
            workgroupBarrier();
            //@end
            if (lid == 0u) {
                wmeta[2] = 0u;
            }
        }
        // O += P V
        for (var j = 0u; j < 2u; j++) {
            if ((PROBE & 4u) != 0u) {
                break;
            }
            let pa = coopLoadT<coop_mat16x16<f16, A>>(&pbuf[prow + j * 4u], PSV);
            //@unroll NT
            o{t} = coopMultiplyAdd(pa, coopLoadT<coop_mat16x16<f16, B>>(&kvs[j * 16u * KSV + {t}u * 4u], KSV), o{t});
            //@end
        }
        workgroupBarrier();
    }

    // out = O / l, two tiles (t, t + NTH) at a time through workgroup memory
    var l = l_part;
    for (var x = 1u; x < LPR; x <<= 1u) {
        l += subgroupShuffleXor(l, x);
    }
    let inv = select(0.0, 1.0 / l, l > 0.0);
    let tok = qb * 64u + row;
    //@unroll NTH
    coopStoreT(o{t}, &so[orow], OS4);
    coopStoreT(o{t+NTH}, &so[orow + 4u], OS4);
    workgroupBarrier();
    write_rows(orow, rl, part, bh, tok, {t}u * 16u, {t+NTH}u * 16u, inv);
    workgroupBarrier();
    //@end
}

// this lane's part of its row of the two O tiles in so, times f
fn scale_rows(orow: u32, rl: u32, part: u32, f: f32) {
    for (var c = 0u; c < CPL / 4u; c++) {
        let ix = orow + rl * OS4 + part * (CPL / 4u) + c;
        so[ix] = so[ix] * f;
    }
}

// this lane's part of its row of the two O tiles in so (columns ca.. and cb.. of the head),
// times inv, into out
fn write_rows(orow: u32, rl: u32, part: u32, bh: u32, tok: u32, ca: u32, cb: u32, inv: f32) {
    if (tok >= P.sq) {
        return;
    }
    for (var c = 0u; c < CPL; c += 4u) {
        let col = part * CPL + c;
        let val = so[orow + rl * OS4 + col / 4u] * inv;
        let dst = select(cb + col - 16u, ca + col, col < 16u);
        out[(bh * P.sq + tok) * QV + dst / 4u] = vec4<f16>(val);
    }
}
