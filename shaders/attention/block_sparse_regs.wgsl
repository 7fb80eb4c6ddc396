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

    // the walk: around the list from a per-block offset (scrambled for full lists)
    var kb = 0u;
    var npos = 0u;
    var nxt = 0u;
    if (cnt > 0u) {
        let off = select(tile, tile * 613u + bh * 97u, P.order != 0u);
        let sa = off % cnt;
        kb = indices[ma * P.nkb + sa];
        npos = select(sa + 1u, 0u, sa + 1u >= cnt);
        nxt = indices[ma * P.nkb + npos];
    }
    //@unroll KSTH
    var kr{t} = H8();
    var vr{t} = H8();
    //@end
    // (orders the Q reads above before the first staging)
    workgroupBarrier();
    //@unroll KSTH
    kr{t} = ld(1u, bh, kb * 64u, P.skv, span(lid, {t}u));
    vr{t} = ld(2u, bh, kb * 64u, P.skv, span(lid, {t}u));
    //@end

    for (var n = 0u; n < 2u * cnt; n++) {
        let key0 = kb * 64u + (n % 2u) * 32u;
        //@unroll KSTH
        kvs[slot(span(lid, {t}u))] = h8_lo(kr{t});
        kvs[slot(span(lid, {t}u)) + 1u] = h8_hi(kr{t});
        kvs[32u * KSV + slot(span(lid, {t}u))] = h8_lo(vr{t});
        kvs[32u * KSV + slot(span(lid, {t}u)) + 1u] = h8_hi(vr{t});
        //@end
        workgroupBarrier();
        if (n + 1u < 2u * cnt && n % 2u == 1u) {
            kb = nxt;
            npos = select(npos + 1u, 0u, npos + 1u >= cnt);
            nxt = indices[ma * P.nkb + npos];
        }
        // the next chunk's K and V (past the last chunk: clamped loads never used)
        //@unroll KSTH
        kr{t} = ld(1u, bh, kb * 64u + ((n + 1u) % 2u) * 32u, P.skv, span(lid, {t}u));
        vr{t} = ld(2u, bh, kb * 64u + ((n + 1u) % 2u) * 32u, P.skv, span(lid, {t}u));
        //@end
        // S = Q Kᵀ for keys 0-15 (s0r) and 16-31 (s1r), one product chain each (the logits are
        // S · scale·log2(e): applied to the maxima and in exp2's argument below)
        var s0r = coop_mat16x16<f32, C>();
        var s1r = coop_mat16x16<f32, C>();
        if ((PROBE & 4u) == 0u) {
            //@unroll NT
            s0r = coopMultiplyAdd(qa{t}, coopLoad<coop_mat16x16<f16, B>>(&kvs[{t}u * 4u], KSV), s0r);
            s1r = coopMultiplyAdd(qa{t}, coopLoad<coop_mat16x16<f16, B>>(&kvs[16u * KSV + {t}u * 4u], KSV), s1r);
            //@end
        }
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
        // row maxima over the four invocations holding each row
        var b0 = -1.0e30;
        var b1 = -1.0e30;
        //@unroll E
        if (RH{t} == 0u) {
            b0 = max(b0, max(x{t}, y{t}));
        } else {
            b1 = max(b1, max(x{t}, y{t}));
        }
        //@end
        b0 = max(b0, subgroupShuffleXor(b0, 1u));
        b0 = max(b0, subgroupShuffleXor(b0, 2u));
        b1 = max(b1, subgroupShuffleXor(b1, 1u));
        b1 = max(b1, subgroupShuffleXor(b1, 2u));
        // (the scale is positive: the maximum of the scaled logits is the scaled maximum)
        b0 *= P.scale_log2e;
        b1 *= P.scale_log2e;
        var a0 = 1.0;
        var a1 = 1.0;
        if (b0 > m0 + RESCALE) {
            a0 = exp2(m0 - b0);
            m0 = b0;
        }
        if (b1 > m1 + RESCALE) {
            a1 = exp2(m1 - b1);
            m1 = b1;
        }
        // O's rows times their factors (1 unless the row's reference changed), in registers
        //@unroll NT
        rescale(&o{t}, a0, a1);
        //@end
        var sum0 = 0.0;
        var sum1 = 0.0;
        var pa0 = coop_mat16x16<f16, A>();
        var pa1 = coop_mat16x16<f16, A>();
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
        // O += P V
        if ((PROBE & 4u) == 0u) {
            //@unroll NT
            o{t} = coopMultiplyAdd(pa0, coopLoadT<coop_mat16x16<f16, B>>(&kvs[32u * KSV + {t}u * 4u], KSV), o{t});
            o{t} = coopMultiplyAdd(pa1, coopLoadT<coop_mat16x16<f16, B>>(&kvs[48u * KSV + {t}u * 4u], KSV), o{t});
            //@end
        }
        workgroupBarrier();
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
