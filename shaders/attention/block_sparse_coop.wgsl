// Block-sparse flash attention on cooperative matrices (tensor cores), f16 operands, f32
// accumulation. Same contract as block_sparse.wgsl: q, out [BH, SQ, HD] (vec4<f16> storage);
// k, v [BH, SKV, HD] (read in 16-byte spans of eight: H8 of h8_words.wgsl or
// h8_unpack.wgsl); counts [MH, NQB], indices [MH, NQB, NKB] (each list ascending, as the mask
// kernels and BlockMask::upload write them); ragged tails handled.
//
// One workgroup = one 64-row query block of one head = 4 subgroups of 16 rows each (NSG = 4),
// or in the pair form (NSG = 8) two neighbouring blocks 2p, 2p+1 = 8 subgroups, 0-3 holding
// block 2p and 4-7 block 2p+1. Every subgroup owns its rows end to end: its Q tile lives in
// registers as A matrices, S = Q·Kᵀ and the softmax of its rows go through its own slice of
// workgroup memory, O stays in C matrices. The workgroup walks the union of its blocks' KV
// lists (merged on the fly by every thread; its length comes from one count of the common
// blocks at the start), so in the pair form each staged K/V chunk serves 128 rows, and a key
// block only one of the two lists holds is masked out of the other block's rows (-inf logits).
// The one-block form walks its single list with a plain index instead (no merge, no masking:
// 210 -> 202 registers, 0.4-1 % faster on the H200, benches/RESULTS.md session 14).
// Each 64-key block is walked as two 32-key chunks: K of a chunk is staged, then V in the same
// buffer (four barriers per chunk, one of them before the read of the rescale flag).
// Workgroup memory (d = 128): 23 KB, two workgroups per SM on NVIDIA's Vulkan driver (all the
// workgroups on an SM share 48 KB: `nabla bench occupancy`); the pair form 37 KB, one.
// Measured on the H200 (wan14b-720p, benches/RESULTS.md session 12): each chunk's products and
// softmax done twice on the same staged K/V took 1.35x the time (dense 823 -> 1117 ms), so
// the staging is ~2/3 of the one-block kernel; the pair form ran dense attention in 790 ms
// instead of 824 (one workgroup per SM hides less than the ideal 1117 / 2) and sparse masks
// 20-30 % slower (the union's extra blocks). Since the one-block form loaded V before S
// (session 13) it is faster for dense attention too (745 vs 806 ms then): the dispatcher no
// longer picks the pair form (`bench attention --kernel pairs` and the self-test run it).
// Both forms now load each chunk's K and V one chunk ahead (session 17: pair form dense 572 ms,
// nabla-0.7 271 ms; one-block form 539 and 222 ms).
// Online softmax in base 2 with lazy rescaling: a row keeps its reference maximum until a
// chunk exceeds it by more than RESCALE (log2 units), and only then is O sent through
// workgroup memory to be rescaled (a workgroup-wide decision). P = exp2(s - reference) is
// then at most 2^RESCALE; it is stored as f16, so RESCALE = 15 (P <= 32768 < 65504, f16's
// largest) is the laziest safe choice (8 before: 15 measured 1.1-1.6 % faster on the H200,
// benches/RESULTS.md session 13; the rescale's code is kept out of the chunk loop, see
// there). The KV list is walked starting at a per-query-block
// offset so that neighbouring workgroups do not all read the same key block (the union from
// the first key >= block 2p's starting key, then wrapped around): the query block's index
// for masks, or for full lists (P.order = 1, dense attention) a scramble of the query block
// and head (neighbouring blocks 613 entries apart, heads 97), measured 8 % faster on full
// lists and 2-3 % slower on NABLA masks of density 0.17-0.69.
//
// P·V is split over subgroup pairs: subgroups 2p and 2p+1 both hold O for the pair's 32 rows,
// each for one half of the head dim (o_t: rows 0-15, o_(t+NTH): rows 16-31 of the pair, at
// head-dim tile h·NTH + t), so each V tile a subgroup loads from workgroup memory feeds two
// products: V's shared-memory reads halve and P's double, with the same matrices in registers
// (H200, wan14b-720p, benches/RESULTS.md session 20: dense 452 -> 425 ms, nabla-0.7 186 -> 175
// ms, registers 219 -> 208).
//
// Matrices and per-lane rows are named variables (qa0.., o0.., s0..), never arrays indexed in
// loops: the lines of each unroll block below are repeated with the t placeholders substituted
// by the dispatcher (shaders::expand_unroll), so no driver has to keep them in local memory.
//
// Every workgroup array is a multiple of 16 bytes and every cooperative load/store starts at a
// 16-byte boundary (row strides KSV, PSV (vec4 units), OS4 (vec4 units) and column offsets are
// multiples of 16 bytes): NVIDIA's cooperative loads round misaligned addresses down
// (GPU-NOTES.md). The prelude enables f16 and wgpu_cooperative_matrix and defines HD (64 or
// 128), SG (the subgroup size), NSG (subgroups: 4, or 8 in the pair form), KSTP (1: every
// thread stages whole 16-byte K/V spans of its own, 0: fewer spans than threads, see `span`).
// The unroll block KSTH repeats once per span a thread stages. block_sparse_common.wgsl
// (appended) holds what this kernel shares with block_sparse_regs.wgsl: QV, KSV, WGS, RESCALE,
// the parameters, the q / counts / indices bindings and the K/V staging (`span`, `slot`, `ld`).

const PSV: u32 = 10u;             // vec4<f16> row stride of P (32 keys + pad)
const OS4: u32 = 9u;              // vec4<f32> row stride of S (32 keys) and of two O tiles
const LPR: u32 = SG / 16u;        // lanes per row in the softmax
const KPL: u32 = 32u / LPR;       // keys per lane
const CPL: u32 = 32u / LPR;       // O columns per lane (two tiles)
const BPW: u32 = NSG / 4u;         // query blocks per workgroup (1, or 2 in the pair form)
const ROWS: u32 = 16u * NSG;
const NONE: u32 = 0xffffffffu;     // past the end of a list

@group(0) @binding(2) var<storage, read> k: array<H8>; // [BH, SKV, HD/8] spans of 8
@group(0) @binding(3) var<storage, read> v: array<H8>;
@group(0) @binding(6) var<storage, read_write> out: array<vec4<f16>>;

var<workgroup> kvs: array<vec4<f16>, 32u * KSV>;  // staged K or V chunk [32 keys][KSV]; Q at start
var<workgroup> pbuf: array<vec4<f16>, ROWS * PSV>; // P rows [ROWS][PSV]
var<workgroup> so: array<vec4<f32>, ROWS * OS4>;   // per subgroup 16 rows: S, or two O tiles
var<workgroup> alpha: array<f32, ROWS>;            // per-row rescale factors
var<workgroup> wmeta: array<u32, 4>;               // [union length, -, rescale flag, -]
var<workgroup> wcommon: array<atomic<u32>, 4>;     // [0]: blocks both lists hold (16 bytes)

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

// entry i of list `mrow` if i < end, else NONE
fn entry(mrow: u32, i: u32, end: u32) -> u32 {
    if (i >= end) {
        return NONE;
    }
    return indices[mrow * P.nkb + i];
}

// the first position in list `mrow` (ascending, `n` entries) holding a key block >= key
fn lower_bound(mrow: u32, n: u32, key: u32) -> u32 {
    var lo = 0u;
    var hi = n;
    while (lo < hi) {
        let mid = (lo + hi) / 2u;
        if (indices[mrow * P.nkb + mid] < key) {
            lo = mid + 1u;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// The walk over the union of lists a and b: positions ia, ib in phase 0 (from the starting
// positions sa, sb to the ends), then phase 1 (from 0 to sa, sb); ca, cb the entries there.
struct Walk {
    ia: u32,
    ib: u32,
    ea: u32,
    eb: u32,
    ca: u32,
    cb: u32,
    phase: u32,
    sa: u32,
    sb: u32,
}

// the next key block of the union and whether list a / b holds it (x, y, z); the entries after
// it are loaded here, one block before they are needed
fn walk_next(w: ptr<function, Walk>, ma: u32, mb: u32) -> vec3<u32> {
    if ((*w).ca == NONE && (*w).cb == NONE && (*w).phase == 0u) {
        (*w).phase = 1u;
        (*w).ea = (*w).sa;
        (*w).eb = (*w).sb;
        (*w).ia = 0u;
        (*w).ib = 0u;
        (*w).ca = entry(ma, 0u, (*w).ea);
        (*w).cb = entry(mb, 0u, (*w).eb);
    }
    let kb = min((*w).ca, (*w).cb);
    let in_a = (*w).ca == kb;
    let in_b = (*w).cb == kb;
    if (in_a) {
        (*w).ia += 1u;
        (*w).ca = entry(ma, (*w).ia, (*w).ea);
    }
    if (in_b) {
        (*w).ib += 1u;
        (*w).cb = entry(mb, (*w).ib, (*w).eb);
    }
    return vec3<u32>(kb, u32(in_a), u32(in_b));
}

@compute @workgroup_size(WGS)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_id) sg: u32,
        @builtin(subgroup_invocation_id) lane: u32) {
    let tile = wid.x;           // this workgroup's ROWS query rows
    let bh = wid.y;
    let krow = (sg % 2u) * 16u * KSV; // this subgroup's Q rows in kvs (Q staged 32 rows at a time)
    let prow = sg * 16u * PSV;  // this subgroup's rows in pbuf
    let orow = sg * 16u * OS4;  // this subgroup's rows in so (vec4 units)
    let rl = lane / LPR;        // softmax: row within the subgroup
    let part = lane % LPR;
    let row = sg * 16u + rl;    // row within the tile of ROWS rows
    let pair_row = (sg / 2u) * 32u; // the subgroup pair's first row within the tile
    let pair_p = pair_row * PSV;    // the pair's 32 rows in pbuf
    let h = sg % 2u;            // this subgroup's half of the head dim in P·V
    let mine_b = sg >= 4u;      // this subgroup's rows belong to block 2p+1 (pair form)

    let mh = select(0u, bh, P.mask_heads > 1u);
    let qa_blk = BPW * tile;
    let ma = mh * P.nqb + qa_blk;
    let mb = ma + 1u;
    let cnt_a = counts[ma];
    var cnt_b = 0u;
    if (BPW == 2u && qa_blk + 1u < P.nqb) {
        cnt_b = counts[mb];
    }
    // the union's length: |a| + |b| - the blocks both hold (pair form: each thread looks its
    // share of a's entries up in b)
    if (lid == 0u) {
        atomicStore(&wcommon[0], 0u);
    }
    // Q: rows 32·r .. 32·r+32 in round r; subgroup sg keeps round sg/2, by weights 1 and 0
    // (cooperative loads need workgroup-uniform control flow; exact for finite f16 values. An
    // inf or NaN in a Q row also turns the rows 32, 64 or 96 away in this tile to NaN, through
    // 0·inf; the reference turns that row alone to NaN. Either way such an input has no finite
    // output.)
    stage_q(bh, tile * ROWS, P.sq, lid);
    workgroupBarrier();
    var shared_n = 0u;
    for (var i = lid; i < select(0u, cnt_a, cnt_b > 0u); i += WGS) {
        let key = indices[ma * P.nkb + i];
        let j = lower_bound(mb, cnt_b, key);
        if (j < cnt_b && indices[mb * P.nkb + j] == key) {
            shared_n += 1u;
        }
    }
    atomicAdd(&wcommon[0], shared_n);
    let w0 = select(0.0h, 1.0h, sg / 2u == 0u);
    //@unroll NT
    var qa{t} = coopLoadT<coop_mat16x16<f16, A>>(&kvs[krow + {t}u * 4u], KSV) * w0;
    var o{t} = coop_mat16x16<f32, C>();
    //@end
    for (var r = 1u; r < ROWS / 32u; r++) {
        workgroupBarrier();
        stage_q(bh, tile * ROWS + r * 32u, P.sq, lid);
        workgroupBarrier();
        let w = select(0.0h, 1.0h, sg / 2u == r);
        //@unroll NT
        qa{t} = qa{t} + coopLoadT<coop_mat16x16<f16, A>>(&kvs[krow + {t}u * 4u], KSV) * w;
        //@end
    }
    if (lid == 0u) {
        wmeta[0] = cnt_a + cnt_b - atomicLoad(&wcommon[0]);
        wmeta[2] = 0u;
    }
    let cnt = workgroupUniformLoad(&wmeta[0]);
    var m_ref = -1.0e30;
    var l_part = 0.0;
    var seen = false;

    // the union from the first block's entry at a per-block offset (or the second's, if the
    // first list is empty): phase 0 from there to the ends, phase 1 the keys before it
    var wk = Walk(0u, 0u, 0u, 0u, NONE, NONE, 1u, 0u, 0u);
    var cur = vec3<u32>(0u);
    var npos = 0u;
    var nxt = 0u;
    if (cnt > 0u) {
        var sa = 0u;
        var sb = 0u;
        let off = select(qa_blk, qa_blk * 613u + bh * 97u, P.order != 0u);
        if (cnt_a > 0u) {
            sa = off % cnt_a;
            sb = lower_bound(mb, cnt_b, indices[ma * P.nkb + sa]);
        } else {
            sb = off % cnt_b;
        }
        if (BPW == 1u) {
            // one-block form: a plain walk around the list from sa, the next entry loaded one
            // block before it is needed
            cur = vec3<u32>(indices[ma * P.nkb + sa], 1u, 0u);
            npos = select(sa + 1u, 0u, sa + 1u >= cnt_a);
            nxt = indices[ma * P.nkb + npos];
        } else {
            wk = Walk(sa, sb, cnt_a, cnt_b, entry(ma, sa, cnt_a), entry(mb, sb, cnt_b), 0u, sa, sb);
            cur = walk_next(&wk, ma, mb);
        }
    }
    var kb = cur.x;
    var member = select(cur.y, cur.z, mine_b) != 0u;
    // Each chunk's K and V are loaded into registers by the chunk before, right after that
    // chunk has staged its V, so the loads are in flight through its softmax and P·V (and, for
    // V, the next S = Q·Kᵀ) and are first used by the staging stores. The loads read clamped
    // rows without predicates (`ld`), so nothing consumes them before those stores. Measured on
    // the H200 (wan14b-720p, benches/RESULTS.md): V loaded before its chunk's S took nabla-0.7
    // from 280.8 to 274.1 ms (session 13); K one chunk ahead lost 3.5-4.5 % (sessions 13, 16)
    // while the loads carried select-to-zero moves, which the driver's machine code placed
    // right after the loads. With clamped loads (session 17), K one chunk ahead took nabla-0.7
    // from 240.6 to 236.0 ms (dense 603 -> 580 ms), and V one chunk ahead as well to 221.9 ms
    // (dense 538 ms; 232 registers). The staging is unrolled with a constant trip count so all
    // of a chunk's loads are in flight together.
    // (declared here and assigned in the loop: the form timed on the H200)
    //@unroll KSTH
    var kr{t} = H8();
    var vr{t} = H8();
    //@end
    // (this barrier also orders the Q reads above before the first K stage)
    workgroupBarrier();
    // the first chunk's K and V (each later chunk's are loaded by the chunk before)
    //@unroll KSTH
    kr{t} = ld(1u, bh, kb * 64u, P.skv, span(lid, {t}u));
    vr{t} = ld(2u, bh, kb * 64u, P.skv, span(lid, {t}u));
    //@end

    // The chunks run in an inner loop that leaves before the P·V of a chunk that needs a
    // rescale; the outer loop rescales O, does that P·V and goes on with the next chunk. So the
    // rescale code is not in the chunk loop's body: there it cost ~7 % of the kernel even
    // when no rescale happened (benches/RESULTS.md session 13).
    var n = 0u;
    loop {
    for (; n < 2u * cnt; n++) {
        let key0 = kb * 64u + (n % 2u) * 32u;
        let member_now = BPW == 1u || member;
        //@unroll KSTH
        kvs[slot(span(lid, {t}u))] = h8_lo(kr{t});
        kvs[slot(span(lid, {t}u)) + 1u] = h8_hi(kr{t});
        //@end
        workgroupBarrier();
        // S = (Q Kᵀ) · scale·log2(e): 16 rows x 32 keys per subgroup, as four independent
        // chains of products (keys 0-15 and 16-31, each over the first and the second half of
        // the head dim) so that no product waits on more than NT/2 - 1 others: the single chain
        // per 16 keys before was eight dependent HMMAs in the driver's machine code. Measured
        // on the H200 (benches/RESULTS.md, session 16): nabla-0.7 253.2 -> 248.9 ms, dense
        // 637 -> 625 ms.
        var s0a = coop_mat16x16<f32, C>();
        var s0b = coop_mat16x16<f32, C>();
        var s1a = coop_mat16x16<f32, C>();
        var s1b = coop_mat16x16<f32, C>();
        if ((PROBE & 4u) == 0u) {
            //@unroll NTH
            s0a = coopMultiplyAdd(qa{t}, coopLoad<coop_mat16x16<f16, B>>(&kvs[{t}u * 4u], KSV), s0a);
            s1a = coopMultiplyAdd(qa{t}, coopLoad<coop_mat16x16<f16, B>>(&kvs[16u * KSV + {t}u * 4u], KSV), s1a);
            s0b = coopMultiplyAdd(qa{t+NTH}, coopLoad<coop_mat16x16<f16, B>>(&kvs[{t+NTH}u * 4u], KSV), s0b);
            s1b = coopMultiplyAdd(qa{t+NTH}, coopLoad<coop_mat16x16<f16, B>>(&kvs[16u * KSV + {t+NTH}u * 4u], KSV), s1b);
            //@end
        }
        coopStoreT((s0a + s0b) * P.scale_log2e, &so[orow], OS4);
        coopStoreT((s1a + s1b) * P.scale_log2e, &so[orow + 4u], OS4);
        workgroupBarrier();
        //@unroll KSTH
        kvs[slot(span(lid, {t}u))] = h8_lo(vr{t});
        kvs[slot(span(lid, {t}u)) + 1u] = h8_hi(vr{t});
        //@end
        if (n + 1u < 2u * cnt && n % 2u == 1u) {
            if (BPW == 1u) {
                kb = nxt;
                npos = select(npos + 1u, 0u, npos + 1u >= cnt_a);
                nxt = indices[ma * P.nkb + npos];
            } else {
                cur = walk_next(&wk, ma, mb);
                kb = cur.x;
                member = select(cur.y, cur.z, mine_b) != 0u;
            }
        }
        // the next chunk's K and V (in flight through the softmax and P·V; past the last chunk
        // clamped loads that are never used)
        //@unroll KSTH
        kr{t} = ld(1u, bh, kb * 64u + ((n + 1u) % 2u) * 32u, P.skv, span(lid, {t}u));
        vr{t} = ld(2u, bh, kb * 64u + ((n + 1u) % 2u) * 32u, P.skv, span(lid, {t}u));
        //@end
        // softmax of this subgroup's rows (LPR lanes per row, KPL keys each, 4 at a time)
        let sbase = orow + rl * OS4 + part * (KPL / 4u);
        let kbase = key0 + part * KPL;
        var bm = -1.0e30;
        // the key masking only for chunks that need it (reaching past the keys, or a block this
        // subgroup's list does not hold); the condition is uniform per subgroup. Alone it took
        // nabla-0.7 from 247.0 to 243.4 ms on the H200, both together 240.6 (session 17)
        //@unroll KPL4
        var s{t} = so[sbase + {t}u];
        //@end
        if (key0 + 32u > P.skv || !member_now) {
            //@unroll KPL4
            s{t} = select(vec4<f32>(-3.0e38), s{t}, (kbase + {t}u * 4u + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(P.skv)) & vec4<bool>(member_now));
            //@end
        }
        //@unroll KPL4
        bm = max(bm, max(max(s{t}.x, s{t}.y), max(s{t}.z, s{t}.w)));
        //@end
        for (var x = 1u; x < LPR; x <<= 1u) {
            bm = max(bm, subgroupShuffleXor(bm, x));
        }
        var a = 1.0;
        if (bm > m_ref + RESCALE) {
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
        seen = seen || bm > -1.0e30;
        // This barrier publishes P, alpha and the flag to the PV step below. The flag is read
        // with a plain load, not workgroupUniformLoad (barrier, load, barrier): every thread
        // reads the same value, since the next write to it comes after two more barriers, so
        // the break is uniform at run time; naga cannot see that, which is why the module turns
        // off `derivative_uniformity` (shaders.rs, `source_coop`). One barrier fewer per chunk:
        // nabla-0.7 187.2 -> 185.5 ms, dense 456.6 -> 451.8 ms on the H200 (session 19).
        workgroupBarrier();
        if (wmeta[2] != 0u) {
            break;
        }
        // O += P V
        add_pv(pair_p, h,
            //@unroll NT
            &o{t},
            //@end
        );
        workgroupBarrier();
    }
    // (the flag is still set when the inner loop left for a rescale, clear at its end)
    if (workgroupUniformLoad(&wmeta[2]) == 0u) {
        break;
    }
    // rare: O rows *= alpha through workgroup memory, two tiles (t, t + NTH) at a time
    //@unroll NTH
    coopStoreT(o{t}, &so[orow], OS4);
    coopStoreT(o{t+NTH}, &so[orow + 4u], OS4);
    workgroupBarrier();
    scale_rows(orow, rl, part, alpha[pair_row + rl], alpha[pair_row + 16u + rl]);
    workgroupBarrier();
    o{t} = coopLoadT<coop_mat16x16<f32, C>>(&so[orow], OS4);
    o{t+NTH} = coopLoadT<coop_mat16x16<f32, C>>(&so[orow + 4u], OS4);
    workgroupBarrier();
    //@end
    if (lid == 0u) {
        wmeta[2] = 0u;
    }
    // the P·V of the chunk that needed it
    add_pv(pair_p, h,
        //@unroll NT
        &o{t},
        //@end
    );
    workgroupBarrier();
    n++;
    }

    // out = O / l, two tiles (t, t + NTH) at a time through workgroup memory
    var l = l_part;
    for (var x = 1u; x < LPR; x <<= 1u) {
        l += subgroupShuffleXor(l, x);
    }
    let inv = select(0.0, 1.0 / l, l > 0.0);
    // every row's 1/l for the pair's other subgroup (alpha is free after the last chunk)
    if (part == 0u) {
        alpha[row] = inv;
    }
    workgroupBarrier();
    let inv0 = alpha[pair_row + rl];
    let inv1 = alpha[pair_row + 16u + rl];
    let tok0 = tile * ROWS + pair_row + rl;
    //@unroll NTH
    coopStoreT(o{t}, &so[orow], OS4);
    coopStoreT(o{t+NTH}, &so[orow + 4u], OS4);
    workgroupBarrier();
    write_rows(orow, rl, part, bh, tok0, (h * (HD / 32u) + {t}u) * 16u, inv0, inv1);
    workgroupBarrier();
    //@end
}

// O += P·V for this subgroup pair's 32 rows (two A tiles of P) and this subgroup's half h of
// the head dim (NTH tiles of V, each used twice)
fn add_pv(pair_p: u32, h: u32,
    //@unroll NT
    o{t}: ptr<function, coop_mat16x16<f32, C>>,
    //@end
) {
    for (var j = 0u; j < 2u; j++) {
        if ((PROBE & 4u) != 0u) {
            break;
        }
        let pa0 = coopLoadT<coop_mat16x16<f16, A>>(&pbuf[pair_p + j * 4u], PSV);
        let pa1 = coopLoadT<coop_mat16x16<f16, A>>(&pbuf[pair_p + 16u * PSV + j * 4u], PSV);
        //@unroll NTH
        let vb{t} = coopLoadT<coop_mat16x16<f16, B>>(&kvs[j * 16u * KSV + (h * (HD / 32u) + {t}u) * 4u], KSV);
        *o{t} = coopMultiplyAdd(pa0, vb{t}, *o{t});
        *o{t+NTH} = coopMultiplyAdd(pa1, vb{t}, *o{t+NTH});
        //@end
    }
}

// row rl of this subgroup's slice of so holds row rl of the pair's first row tile in columns
// 0-15 and of its second in 16-31 (one head-dim tile): this lane's part of it, times f0 / f1
fn scale_rows(orow: u32, rl: u32, part: u32, f0: f32, f1: f32) {
    for (var c = 0u; c < CPL / 4u; c++) {
        let col = part * CPL + c * 4u;
        let ix = orow + rl * OS4 + col / 4u;
        so[ix] = so[ix] * select(f1, f0, col < 16u);
    }
}

// the same layout into out: columns 0-15 to token tok0 (times inv0), 16-31 to tok0 + 16
// (times inv1), at head-dim column hc
fn write_rows(orow: u32, rl: u32, part: u32, bh: u32, tok0: u32, hc: u32, inv0: f32, inv1: f32) {
    for (var c = 0u; c < CPL; c += 4u) {
        let col = part * CPL + c;
        let first = col < 16u;
        let tok = select(tok0 + 16u, tok0, first);
        if (tok < P.sq) {
            let val = so[orow + rl * OS4 + col / 4u] * select(inv1, inv0, first);
            out[(bh * P.sq + tok) * QV + (hc + col % 16u) / 4u] = vec4<f16>(val);
        }
    }
}
