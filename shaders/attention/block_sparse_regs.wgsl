// Block-sparse flash attention on cooperative matrices with the softmax in registers.
// Same contract and the same walk as the one-block form of block_sparse_coop.wgsl (one 64-row
// query block per workgroup of 4 subgroups of 32 invocations, each owning 16 rows; Q in A
// matrices, O in C matrices, each 64-key block as two 32-key chunks, K and V loaded one chunk
// ahead, lazy rescaling at 2^RESCALE, P stored as f16).
//
// The difference: S = Q·Kᵀ never goes through workgroup memory. The softmax reads the elements
// of the S matrices this invocation holds (cm_get{i}_c32, rewritten into OpCompositeExtract by
// src/gpu/spirv.rs), and P's A matrices are built from them element by element (cm_set{i}_a16).
// That needs to know which row and column each element is: src/gpu/coop_layout.rs measures it
// on the device and the dispatcher builds this kernel only for the layout family it describes
// (invocation l holds rows l/4 and l/4 + 8, columns 2·(l%4) + {0, 1, 8, 9}; element i lies in
// the upper row when RH{i} = 1, at column offset CL{i}), where an A matrix built from a C
// matrix's elements holds them at the same places. Each row's maximum and sum are reduced over
// the four invocations holding it by two shuffles, O is rescaled in registers, and K and V are
// staged together: two barriers per chunk instead of four, and no S, P or rescale factors in
// workgroup memory. The output is written from the registers as well.
//
// Three forms measured on the H200 (wan14b-720p, benches/RESULTS.md session 21), against the
// landed block_sparse_coop.wgsl (dense 424 ms, nabla-0.7 175 ms):
// - k and v are declared read_write although nothing writes them: with read-only bindings the
//   driver moved the next chunk's loads from the top of the chunk to after its last barrier,
//   so every chunk waited for them at its staging (dense 497 ms); read_write loads stay where
//   they are written (392 ms). (For block_sparse_coop.wgsl read_write was 2 % slower, its
//   loads were already in place.) The dispatcher binds k and v only when q, k, v and out are
//   four different buffers, so no buffer is bound both read-only and read-write.
// - O is rescaled by every chunk, by factors that are 1 unless a row's reference changed:
//   64 multiplications per invocation and chunk. A branch taken only when a rescale is due left
//   the driver copying O between registers on the path without it (36 moves), 1.5-2 % slower.
// - S in two product chains (keys 0-15 and 16-31): 199 registers where four chains take 231 and
//   ran 4-6 % slower.
// - The scale·log2(e) of the logits is applied to each row's maximum and inside exp2's fma, not
//   to every logit first (16 multiplications fewer per invocation and chunk): about 1 % faster.
// Result: dense 385 ms, nabla-0.4 64 ms, nabla-0.7 157 ms (run139).
//
// Since session 22 the walk is software-pipelined and the K/V addresses are flat (measured on
// the H200 against the form above in the same calls, benches/RESULTS.md session 22):
// - Iteration n runs the softmax of S(n), stages K(n+1) and V(n) (K one chunk ahead of V), then
//   issues S(n+1) = Q·K(n+1)ᵀ and O = O·a(n) + P(n)·V(n) together: the two product chains are
//   independent, and the driver interleaves them (S alone is four chains eight deep). The first
//   chunk's S is computed before the loop; the last iteration's S (of the first chunk again) is
//   never used. nabla-0.4 64.0 -> 62.9-63.3 ms, nabla-0.7 157-158 -> 154.4-156.2 ms, dense
//   unchanged.
// - A K/V span's index is the chunk's first element plus the span, clamped to the head's last
//   element (`ld_flat`; one add-and-min per span instead of a clamp of the row and a multiply):
//   with the pipelined walk, dense 386-390 -> 374-378 ms, nabla-0.4 -> 61.4-62.1 ms, nabla-0.7
//   -> 151.2-153.1 ms.
// - Tried, slower: the softmax of S(n+1) before P(n)·V(n) so that the products run through the
//   barriers (dense 392-396 ms); unclamped loads in a branch for chunks inside the keys (453 ms:
//   the driver moved the loads behind the last barrier again); a rescale skipped when no factor
//   of the subgroup differs from 1 (1 % slower); every prologue load (Q unrolled, K(0), K(1),
//   V(0)) issued at once (1-2 % slower).
//
// Workgroup memory: one chunk's K (rows 0-31) and V (rows 32-63) of KSV vec4<f16> each, 17 KB at
// head dim 128 (the 64 Q rows are staged there first). The prelude defines HD, SG (32), NSG
// (4), PROBE, KSTP and the layout constants RH0..RH7, CL0..CL7; the unroll blocks are NT
// (head-dim tiles), KSTH (16-byte spans per thread of K, and of V, per chunk) and E (8 elements
// per invocation). block_sparse_common.wgsl is appended.

@group(0) @binding(2) var<storage, read_write> k: array<H8>; // [BH, SKV, HD/8] spans of 8
@group(0) @binding(3) var<storage, read_write> v: array<H8>;
@group(0) @binding(6) var<storage, read_write> out: array<f16>;

var<workgroup> kvs: array<vec4<f16>, 64u * KSV>;  // K rows 0-31, V rows 32-63; Q at the start

// element stubs (src/gpu/spirv.rs)
//@unroll E
fn cm_get{t}_c32(m: coop_mat16x16<f32, C>) -> f32 { return 0.0; }
fn cm_set{t}_c32(m: coop_mat16x16<f32, C>, x: f32) -> coop_mat16x16<f32, C> { return m; }
fn cm_set{t}_a16(m: coop_mat16x16<f16, A>, x: f16) -> coop_mat16x16<f16, A> { return m; }
//@end

// o with the elements of the lower rows times a0, of the upper rows times a1 (in place)
fn rescale(o: ptr<function, coop_mat16x16<f32, C>>, a0: f32, a1: f32) {
    //@unroll E
    *o = cm_set{t}_c32(*o, cm_get{t}_c32(*o) * select(a0, a1, RH{t} == 1u));
    //@end
}

// head-dim tile ht of o, rows row0 (lower) and row0 + 8 (upper), times inv0 / inv1, into out
fn write_tile(o: coop_mat16x16<f32, C>, ht: u32, bh: u32, row0: u32, c0: u32, inv0: f32, inv1: f32) {
    //@unroll E
    let tok{t} = row0 + 8u * RH{t};
    if (tok{t} < P.sq) {
        out[(bh * P.sq + tok{t}) * HD + ht * 16u + c0 + CL{t}] = f16(cm_get{t}_c32(o) * select(inv0, inv1, RH{t} == 1u));
    }
    //@end
}

@compute @workgroup_size(WGS)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_id) sg: u32,
        @builtin(subgroup_invocation_id) lane: u32) {
    let tile = wid.x;           // this workgroup's query block
    let bh = wid.y;
    let c0 = 2u * (lane % 4u);  // this invocation's first column in each 16-column tile
    let mh = select(0u, bh, P.mask_heads > 1u);
    let ma = mh * P.nqb + tile;
    let cnt = counts[ma];

    // Q: the block's 64 rows into kvs (zeros past sq), each subgroup's 16 as A matrices
    for (var e = lid; e < 64u * QV; e += WGS) {
        let r = e / QV;
        let t = tile * 64u + r;
        var x = vec4<f16>(0.0h);
        if (t < P.sq) {
            x = q[(bh * P.sq + t) * QV + e % QV];
        }
        kvs[r * KSV + e % QV] = x;
    }
    workgroupBarrier();
    //@unroll NT
    let qa{t} = coopLoadT<coop_mat16x16<f16, A>>(&kvs[sg * 16u * KSV + {t}u * 4u], KSV);
    var o{t} = coop_mat16x16<f32, C>();
    //@end
    // per row: the reference maximum and the partial sum of this invocation's keys
    var m0 = -1.0e30;
    var m1 = -1.0e30;
    var l0 = 0.0;
    var l1 = 0.0;

    // the walk: around the list from a per-block offset (scrambled for full lists). Chunk c
    // (32 keys) lies in block indices[(sa + c/2) % cnt]; bA, bB, bC are the blocks of chunks
    // n+1, n+2, n+3 in iteration n, pos the list position of bC.
    var sa = 0u;
    if (cnt > 0u) {
        sa = select(tile, tile * 613u + bh * 97u, P.order != 0u) % cnt;
    }
    let lbase = ma * P.nkb;
    var pos = select(sa + 1u, 0u, sa + 1u >= cnt);   // position of chunk 3's block
    let b0 = indices[lbase + sa];
    var bA = b0;                          // block of chunk n+1
    var bB = indices[lbase + pos];        // of chunk n+2
    var bC = bB;                          // of chunk n+3
    // prologue: K(0) staged and S(0) = Q·K(0)ᵀ
    //@unroll KSTH
    var kr{t} = ld_flat(1u, bh, b0 * 64u, P.skv, span(lid, {t}u));
    var vr{t} = H8();
    //@end
    // (orders the Q reads above before the first staging)
    workgroupBarrier();
    //@unroll KSTH
    kvs[slot(span(lid, {t}u))] = h8_lo(kr{t});
    kvs[slot(span(lid, {t}u)) + 1u] = h8_hi(kr{t});
    //@end
    workgroupBarrier();
    //@unroll KSTH
    kr{t} = ld_flat(1u, bh, b0 * 64u + 32u, P.skv, span(lid, {t}u));
    vr{t} = ld_flat(2u, bh, b0 * 64u, P.skv, span(lid, {t}u));
    //@end
    var a0 = 1.0;
    var a1 = 1.0;
    var pa0 = coop_mat16x16<f16, A>();
    var pa1 = coop_mat16x16<f16, A>();
    var key0 = b0 * 64u;
    var s0r = coop_mat16x16<f32, C>();
    var s1r = coop_mat16x16<f32, C>();
    if ((PROBE & 4u) == 0u) {
        //@unroll NT
        s0r = coopMultiplyAdd(qa{t}, coopLoad<coop_mat16x16<f16, B>>(&kvs[{t}u * 4u], KSV), s0r);
        s1r = coopMultiplyAdd(qa{t}, coopLoad<coop_mat16x16<f16, B>>(&kvs[16u * KSV + {t}u * 4u], KSV), s1r);
        //@end
    }
    for (var n = 0u; n < 2u * cnt; n++) {
        // the softmax of S(n) (held in s0r, s1r; keys from key0): factors a0, a1 and P(n)
        //@unroll E
        var x{t} = cm_get{t}_c32(s0r);
        var y{t} = cm_get{t}_c32(s1r);
        //@end
        if (key0 + 32u > P.skv) {
            //@unroll E
            x{t} = select(-3.0e38, x{t}, key0 + c0 + CL{t} < P.skv);
            y{t} = select(-3.0e38, y{t}, key0 + 16u + c0 + CL{t} < P.skv);
            //@end
        }
        var g0 = -1.0e30;
        var g1 = -1.0e30;
        //@unroll E
        if (RH{t} == 0u) {
            g0 = max(g0, max(x{t}, y{t}));
        } else {
            g1 = max(g1, max(x{t}, y{t}));
        }
        //@end
        g0 = max(g0, subgroupShuffleXor(g0, 1u));
        g0 = max(g0, subgroupShuffleXor(g0, 2u));
        g1 = max(g1, subgroupShuffleXor(g1, 1u));
        g1 = max(g1, subgroupShuffleXor(g1, 2u));
        g0 *= P.scale_log2e;
        g1 *= P.scale_log2e;
        a0 = 1.0;
        a1 = 1.0;
        if (g0 > m0 + RESCALE) {
            a0 = exp2(m0 - g0);
            m0 = g0;
        }
        if (g1 > m1 + RESCALE) {
            a1 = exp2(m1 - g1);
            m1 = g1;
        }
        var sum0 = 0.0;
        var sum1 = 0.0;
        //@unroll E
        let px{t} = exp2(fma(x{t}, P.scale_log2e, -select(m0, m1, RH{t} == 1u)));
        let py{t} = exp2(fma(y{t}, P.scale_log2e, -select(m0, m1, RH{t} == 1u)));
        if (RH{t} == 0u) {
            sum0 += px{t} + py{t};
        } else {
            sum1 += px{t} + py{t};
        }
        pa0 = cm_set{t}_a16(pa0, f16(px{t}));
        pa1 = cm_set{t}_a16(pa1, f16(py{t}));
        //@end
        l0 = l0 * a0 + sum0;
        l1 = l1 * a1 + sum1;
        // (the reads of K(n) above are done before K(n+1) is staged over them)
        workgroupBarrier();
        //@unroll KSTH
        kvs[slot(span(lid, {t}u))] = h8_lo(kr{t});
        kvs[slot(span(lid, {t}u)) + 1u] = h8_hi(kr{t});
        kvs[32u * KSV + slot(span(lid, {t}u))] = h8_lo(vr{t});
        kvs[32u * KSV + slot(span(lid, {t}u)) + 1u] = h8_hi(vr{t});
        //@end
        workgroupBarrier();
        // K(n+2), V(n+1) (past the last chunk: clamped loads never used)
        //@unroll KSTH
        kr{t} = ld_flat(1u, bh, bB * 64u + (n % 2u) * 32u, P.skv, span(lid, {t}u));
        vr{t} = ld_flat(2u, bh, bA * 64u + ((n + 1u) % 2u) * 32u, P.skv, span(lid, {t}u));
        //@end
        key0 = bA * 64u + ((n + 1u) % 2u) * 32u;
        // S(n+1) = Q K(n+1)ᵀ and O = O·a(n) + P(n) V(n), independent chains (the last
        // iteration's S is never used)
        s0r = coop_mat16x16<f32, C>();
        s1r = coop_mat16x16<f32, C>();
        if ((PROBE & 4u) == 0u) {
            //@unroll NT
            s0r = coopMultiplyAdd(qa{t}, coopLoad<coop_mat16x16<f16, B>>(&kvs[{t}u * 4u], KSV), s0r);
            s1r = coopMultiplyAdd(qa{t}, coopLoad<coop_mat16x16<f16, B>>(&kvs[16u * KSV + {t}u * 4u], KSV), s1r);
            //@end
        }
        //@unroll NT
        rescale(&o{t}, a0, a1);
        //@end
        if ((PROBE & 4u) == 0u) {
            //@unroll NT
            o{t} = coopMultiplyAdd(pa0, coopLoadT<coop_mat16x16<f16, B>>(&kvs[32u * KSV + {t}u * 4u], KSV), o{t});
            o{t} = coopMultiplyAdd(pa1, coopLoadT<coop_mat16x16<f16, B>>(&kvs[48u * KSV + {t}u * 4u], KSV), o{t});
            //@end
        }
        bA = bB;
        bB = bC;
        pos = select(pos, select(pos + 1u, 0u, pos + 1u >= cnt), n % 2u == 0u);
        bC = indices[lbase + pos];
    }

    // out = O / l from the registers
    l0 += subgroupShuffleXor(l0, 1u);
    l0 += subgroupShuffleXor(l0, 2u);
    l1 += subgroupShuffleXor(l1, 1u);
    l1 += subgroupShuffleXor(l1, 2u);
    let inv0 = select(0.0, 1.0 / l0, l0 > 0.0);
    let inv1 = select(0.0, 1.0 / l1, l1 > 0.0);
    let row0 = tile * 64u + sg * 16u + lane / 4u;
    //@unroll NT
    write_tile(o{t}, {t}u, bh, row0, c0, inv0, inv1);
    //@end
}

// Span p (`span`) of K (which = 1) or V (2) rows [row0, row0+32) of head bh: the element index
// of the chunk's first span plus p, clamped to the head's last span. Spans past row len - 1 read
// that span (finite, inside the head; len > 0 is validated by the dispatcher): the softmax masks
// the logits of keys past len, so their P is exactly 0 (as with `ld` of
// block_sparse_common.wgsl, which clamps the row: more instructions per span, 2-3 % slower here).
fn ld_flat(which: u32, bh: u32, row0: u32, len: u32, p: u32) -> H8 {
    // PROBE (diagnostics of the bench, wrong results): bit 0 skips these loads
    if ((PROBE & 1u) != 0u) {
        return h8_filler(p);
    }
    let g = min((bh * len + row0) * (QV / 2u) + p, (bh * len + len) * (QV / 2u) - 1u);
    if (which == 1u) {
        return k[g];
    }
    return v[g];
}
