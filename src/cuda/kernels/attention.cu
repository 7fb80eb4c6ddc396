// Block-sparse flash attention on CUDA tensor cores (compiled by NVRTC; no headers).
//
// q, out [BH, Sq, D]; k, v [BH, Skv, D]; counts [MH, NQ] and indices [MH, NQ, NKV] u32
// (NQ = ceil(Sq/64), NKV = ceil(Skv/64), MH = 1 shared or BH): query block i of head bh attends
// in full to the key blocks indices[mh, i, 0..counts[mh, i]) (counts == null: every key block).
// Keys >= Skv are masked out, query rows >= Sq are not written, an empty list gives 0.
// rotate != 0: query block qb walks its list starting at entry qb % count (wrapping around), so
// the CTAs of a head do not all stream the same K/V block at the same time (the result does not
// depend on the order up to rounding).
// out[s] = sum_t softmax_t(q_s . k_t / sqrt(D)) v_t, online softmax in base 2, f32 statistics and
// accumulators.
//
// Tensor-core kernels attn_{f16,bf16}_d{64,128}_s{2,3} (f16 or bf16 operands):
//   * one CTA = one 64-row query block (= one mask row) of one head; 4 warps x 16 query rows;
//   * Q goes global -> shared (cp.async) -> registers (ldmatrix) once;
//   * the listed 64-key blocks are streamed with cp.async into a ring of STAGES shared-memory
//     stages (K tile then V tile, 64 x D each); block n + STAGES - 1 is in flight while block n
//     is computed, one __syncthreads per block; the Q tile aliases the last stage until the first
//     K/V load overwrites it;
//   * S = Q K^T (16 x 64 per warp, mma.m16n8k16, B fragments by ldmatrix), online softmax in
//     registers with a lazy rescale (the running max only moves when a row maximum grows by more
//     than 2^8, so P <= 256 and O is rescaled rarely; exact up to rounding), P converted to the
//     operand type in registers and reused as the A fragment of O += P V (V fragments by
//     ldmatrix.trans);
//   * shared tiles are rows of D/8 16-byte chunks with chunk c of row r at c ^ (r & 7): the 8 row
//     addresses of every ldmatrix phase fall into 8 different bank groups.
//   Shared memory: STAGES * 2 * 64 * D * 2 bytes + 16 (D = 128: 64 KB for 2 stages, 96 KB for 3).
//
// Fragment layouts of mma.m16n8k16 and ldmatrix: common.cuh (prepended to this file).
// Hence: Q (rows x d, row major in shared memory) -> A by ldmatrix.x4 with matrices
//   (rows 0-7, d 0-7), (rows 8-15, d 0-7), (rows 0-7, d 8-15), (rows 8-15, d 8-15);
//   K (keys x d, row major) is B = K^T in "col" layout directly: matrices (keys 0-7, d 0-7),
//   (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15) give b0, b1 of key tile 0 and
//   b0, b1 of key tile 1;
//   V (keys x d, row major) needs .trans: matrices (keys 0-7, d 0-7), (keys 8-15, d 0-7),
//   (keys 0-7, d 8-15), (keys 8-15, d 8-15) give b0, b1 of d tile 0 and b0, b1 of d tile 1;
//   the S accumulators of key tiles 2j and 2j+1 are exactly the A fragment of keys 16j..16j+15:
//   a0 = (s[2j].c0, c1), a1 = (s[2j].c2, c3), a2 = (s[2j+1].c0, c1), a3 = (s[2j+1].c2, c3).
//
// attn2_{f16,bf16}_d{64,128}_s2: the same with 2 warps x 32 query rows (see attn_tc2).
//
// attn_f32_d{64,128}: f32 inputs, a plain f32 kernel (4 threads per query row, keys staged 16 at a
// time in shared memory) for parity work; not tuned.


// Half index of (row, 16-byte chunk) in a tile of rows of D halfs, XOR-swizzled.
template <int D>
__device__ __forceinline__ u32 swz(u32 row, u32 chunk) {
    return row * (u32)D + ((chunk ^ (row & 7u)) << 3);
}

template <int D, int DT, int STAGES>
__device__ __forceinline__ void attn_tc(const u16* __restrict__ q, const u16* __restrict__ k,
                                        const u16* __restrict__ v, u16* __restrict__ out,
                                        const u32* __restrict__ counts,
                                        const u32* __restrict__ indices, u32 Sq, u32 Skv, u32 nq,
                                        u32 nkv, u32 mask_heads, float sl2, u32 rotate) {
    static_assert(D == 64 || D == 128, "head_dim 64 or 128");
    static_assert(STAGES >= 2 && STAGES <= 4, "2..4 stages");
    constexpr u32 CH = D / 8;       // 16-byte chunks per row
    constexpr u32 TILE = 64u * D;   // halfs per 64-row tile
    constexpr u32 STAGE = 2u * TILE;// K tile, then V tile
    constexpr u32 LOADS = 64u * CH / 128u;  // chunks per thread per tile
    extern __shared__ __align__(128) unsigned char smem_raw[];
    u16* sm = reinterpret_cast<u16*>(smem_raw);
    u32* skb = reinterpret_cast<u32*>(smem_raw + (size_t)STAGES * STAGE * 2u);  // kb per stage

    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 g = lane >> 2, tg = lane & 3u;
    const u32 qb = blockIdx.x, bh = blockIdx.y;
    const u16* qh = q + (size_t)bh * Sq * D;
    const u16* kh = k + (size_t)bh * Skv * D;
    const u16* vh = v + (size_t)bh * Skv * D;

    const BlockWalk walk(counts, indices, mask_heads, bh, nq, qb, nkv, rotate);
    const u32 count = walk.count;
    auto load_kv = [&](u32 kb, u32 st) {
        u16* ks = sm + st * STAGE;
        u16* vs = ks + TILE;
#pragma unroll
        for (u32 i = 0; i < LOADS; ++i) {
            const u32 c = tid + 128u * i;
            const u32 row = c / CH, ch = c % CH;
            const u32 key = kb * 64u + row;
            const bool ok = key < Skv;
            const size_t off = (size_t)(ok ? key : 0u) * D + ch * 8u;
            const u32 so = swz<D>(row, ch);
            cp_async16(ks + so, kh + off, ok ? 16u : 0u);
            cp_async16(vs + so, vh + off, ok ? 16u : 0u);
        }
        if (tid == 0) skb[st] = kb;
    };

    // prologue: Q into the last stage, K/V blocks 0..STAGES-2 into stages 0..STAGES-2
    u16* qs = sm + (STAGES - 1) * STAGE;
#pragma unroll
    for (u32 i = 0; i < LOADS; ++i) {
        const u32 c = tid + 128u * i;
        const u32 row = c / CH, ch = c % CH;
        const u32 tok = qb * 64u + row;
        const bool ok = tok < Sq;
        cp_async16(qs + swz<D>(row, ch), qh + (size_t)(ok ? tok : 0u) * D + ch * 8u, ok ? 16u : 0u);
    }
    cp_async_commit();
#pragma unroll
    for (u32 s = 0; s + 1u < (u32)STAGES; ++s) {
        if (s < count) load_kv(walk.at(s), s);
        cp_async_commit();
    }
    u32 kb_next = (u32)(STAGES - 1) < count ? walk.at(STAGES - 1) : 0u;
    cp_async_wait<STAGES - 1>();  // the Q group is complete
    __syncthreads();

    u32 qf[D / 16][4];
    {
        const u32 row = warp * 16u + (lane & 15u);
#pragma unroll
        for (u32 kk = 0; kk < D / 16u; ++kk) ldsm_x4(qf[kk], qs + swz<D>(row, kk * 2u + (lane >> 4)));
    }

    float o[D / 8][4];
#pragma unroll
    for (u32 t = 0; t < D / 8u; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    // per-lane ldmatrix row offsets (row & 7 == lane & 7 in both patterns)
    const u32 krow = (lane & 7u) + ((lane >> 4) << 3);  // K: + 16 np
    const u32 kch = (lane >> 3) & 1u;                   // K: + 2 kk
    const u32 vrow = (lane & 7u) + (((lane >> 3) & 1u) << 3);  // V: + 16 j
    const u32 vch = lane >> 4;                                 // V: + 2 dp

    for (u32 n = 0; n < count; ++n) {
        cp_async_wait<STAGES - 2>();  // block n has landed (this thread's copies)
        __syncthreads();              // ... everyone's; and stage (n-1) % STAGES is free
        {
            const u32 nn = n + STAGES - 1;
            if (nn < count) {
                load_kv(kb_next, nn % STAGES);
                kb_next = nn + 1u < count ? walk.at(nn + 1u) : 0u;
            }
            cp_async_commit();  // possibly empty: keeps the group count uniform
        }
        const u32 st = n % STAGES;
        const u16* ks = sm + st * STAGE;
        const u16* vs = ks + TILE;
        const u32 kb = skb[st];

        // S = Q K^T: 16 rows x 64 keys, s[t] = keys 8t..8t+7
        float s[8][4];
#pragma unroll
        for (u32 t = 0; t < 8u; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
        for (u32 kk = 0; kk < D / 16u; ++kk) {
#pragma unroll
            for (u32 np = 0; np < 4u; ++np) {
                u32 b[4];
                ldsm_x4(b, ks + swz<D>(np * 16u + krow, kk * 2u + kch));
                mma16816<DT>(s[2 * np], qf[kk], b[0], b[1]);
                mma16816<DT>(s[2 * np + 1], qf[kk], b[2], b[3]);
            }
        }
        float(&s32)[32] = reinterpret_cast<float(&)[32]>(s);
        mask_ragged_keys(s32, kb, Skv, tg);
        softmax_step<D>(s32, reinterpret_cast<float(&)[D / 2]>(o), sl2, m0, m1, l0, l1);

        // O += P V
#pragma unroll
        for (u32 j = 0; j < 4u; ++j) {
            u32 a[4];
            p_fragment<DT>(s32, j, a);
#pragma unroll
            for (u32 dp = 0; dp < D / 16u; ++dp) {
                u32 b[4];
                ldsm_x4_trans(b, vs + swz<D>(j * 16u + vrow, dp * 2u + vch));
                mma16816<DT>(o[2 * dp], a, b[0], b[1]);
                mma16816<DT>(o[2 * dp + 1], a, b[2], b[3]);
            }
        }
    }

    store_rows<D, DT>(reinterpret_cast<float(&)[D / 2]>(o), l0, l1, out + (size_t)bh * Sq * D,
                      qb * 64u + warp * 16u + g, Sq, tg);
}

#define ATTN_TC(NAME, D, DT, ST, MINB)                                                            \
    extern "C" __global__ void __launch_bounds__(128, MINB)                                       \
        NAME(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,     \
             u16* __restrict__ out, const u32* __restrict__ counts,                               \
             const u32* __restrict__ indices, u32 Sq, u32 Skv, u32 nq, u32 nkv, u32 mask_heads,   \
             float sl2, u32 rotate) {                                                             \
        attn_tc<D, DT, ST>(q, k, v, out, counts, indices, Sq, Skv, nq, nkv, mask_heads, sl2,      \
                           rotate);                                                               \
    }

// min blocks per SM: registers (ptxas, sm_90) and shared memory both allow it without spills:
// d128 s2: <= 168 registers, 64 KB -> 3 CTAs; d128 s3: 96 KB -> 2; d64 s2: <= 128 registers -> 4;
// d64 s3 (4 would spill): 3.
ATTN_TC(attn_f16_d64_s2, 64, 1, 2, 4)
ATTN_TC(attn_f16_d64_s3, 64, 1, 3, 3)
ATTN_TC(attn_f16_d128_s2, 128, 1, 2, 3)
ATTN_TC(attn_f16_d128_s3, 128, 1, 3, 2)
ATTN_TC(attn_bf16_d64_s2, 64, 2, 2, 4)
ATTN_TC(attn_bf16_d64_s3, 64, 2, 3, 3)
ATTN_TC(attn_bf16_d128_s2, 128, 2, 2, 3)
ATTN_TC(attn_bf16_d128_s3, 128, 2, 3, 2)

// The same block-sparse attention with 2 warps x 32 query rows (2 m16 tiles per warp) per
// 64-row query block: every K/V fragment read from shared memory feeds two mma instead of one,
// halving shared-memory traffic per FLOP (the limit of the 16-row form on Hopper). Q stays in
// shared memory (its own region) and is re-read by ldmatrix for every key block.
// Shared memory: 64 * D * 2 (Q) + STAGES * 2 * 64 * D * 2 + 16 bytes. 64 threads.
template <int D, int DT, int STAGES>
__device__ __forceinline__ void attn_tc2(const u16* __restrict__ q, const u16* __restrict__ k,
                                         const u16* __restrict__ v, u16* __restrict__ out,
                                         const u32* __restrict__ counts,
                                         const u32* __restrict__ indices, u32 Sq, u32 Skv, u32 nq,
                                         u32 nkv, u32 mask_heads, float sl2, u32 rotate) {
    static_assert(D == 64 || D == 128, "head_dim 64 or 128");
    static_assert(STAGES >= 2 && STAGES <= 4, "2..4 stages");
    constexpr u32 NT = 64;          // threads
    constexpr u32 CH = D / 8;       // 16-byte chunks per row
    constexpr u32 TILE = 64u * D;   // halfs per 64-row tile
    constexpr u32 STAGE = 2u * TILE;// K tile, then V tile
    constexpr u32 LOADS = 64u * CH / NT;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    u16* qs = reinterpret_cast<u16*>(smem_raw);
    u16* sm = qs + TILE;
    u32* skb = reinterpret_cast<u32*>(smem_raw + ((size_t)STAGES * STAGE + TILE) * 2u);

    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 g = lane >> 2, tg = lane & 3u;
    const u32 qb = blockIdx.x, bh = blockIdx.y;
    const u16* qh = q + (size_t)bh * Sq * D;
    const u16* kh = k + (size_t)bh * Skv * D;
    const u16* vh = v + (size_t)bh * Skv * D;

    const BlockWalk walk(counts, indices, mask_heads, bh, nq, qb, nkv, rotate);
    const u32 count = walk.count;
    auto load_kv = [&](u32 kb, u32 st) {
        u16* ks = sm + st * STAGE;
        u16* vs = ks + TILE;
#pragma unroll
        for (u32 i = 0; i < LOADS; ++i) {
            const u32 c = tid + NT * i;
            const u32 row = c / CH, ch = c % CH;
            const u32 key = kb * 64u + row;
            const bool ok = key < Skv;
            const size_t off = (size_t)(ok ? key : 0u) * D + ch * 8u;
            const u32 so = swz<D>(row, ch);
            cp_async16(ks + so, kh + off, ok ? 16u : 0u);
            cp_async16(vs + so, vh + off, ok ? 16u : 0u);
        }
        if (tid == 0) skb[st] = kb;
    };

#pragma unroll
    for (u32 i = 0; i < LOADS; ++i) {
        const u32 c = tid + NT * i;
        const u32 row = c / CH, ch = c % CH;
        const u32 tok = qb * 64u + row;
        const bool ok = tok < Sq;
        cp_async16(qs + swz<D>(row, ch), qh + (size_t)(ok ? tok : 0u) * D + ch * 8u, ok ? 16u : 0u);
    }
    cp_async_commit();
#pragma unroll
    for (u32 s = 0; s + 1u < (u32)STAGES; ++s) {
        if (s < count) load_kv(walk.at(s), s);
        cp_async_commit();
    }
    u32 kb_next = (u32)(STAGES - 1) < count ? walk.at(STAGES - 1) : 0u;

    float o[2][D / 8][4];
#pragma unroll
    for (u32 mt = 0; mt < 2u; ++mt)
#pragma unroll
        for (u32 t = 0; t < D / 8u; ++t) o[mt][t][0] = o[mt][t][1] = o[mt][t][2] = o[mt][t][3] = 0.f;
    float mrun[2][2] = {{NEG_INF, NEG_INF}, {NEG_INF, NEG_INF}};
    float lsum[2][2] = {{0.f, 0.f}, {0.f, 0.f}};

    const u32 qrow = warp * 32u + (lane & 15u);             // + 16 mt
    const u32 qch = lane >> 4;                               // + 2 kk
    const u32 krow = (lane & 7u) + ((lane >> 4) << 3);       // + 16 np
    const u32 kch = (lane >> 3) & 1u;                        // + 2 kk
    const u32 vrow = (lane & 7u) + (((lane >> 3) & 1u) << 3);// + 16 j
    const u32 vch = lane >> 4;                               // + 2 dp

    for (u32 n = 0; n < count; ++n) {
        cp_async_wait<STAGES - 2>();  // block n (and Q) landed for this thread
        __syncthreads();
        {
            const u32 nn = n + STAGES - 1;
            if (nn < count) {
                load_kv(kb_next, nn % STAGES);
                kb_next = nn + 1u < count ? walk.at(nn + 1u) : 0u;
            }
            cp_async_commit();
        }
        const u32 st = n % STAGES;
        const u16* ks = sm + st * STAGE;
        const u16* vs = ks + TILE;
        const u32 kb = skb[st];

        float s[2][8][4];
#pragma unroll
        for (u32 mt = 0; mt < 2u; ++mt)
#pragma unroll
            for (u32 t = 0; t < 8u; ++t) s[mt][t][0] = s[mt][t][1] = s[mt][t][2] = s[mt][t][3] = 0.f;
#pragma unroll
        for (u32 kk = 0; kk < D / 16u; ++kk) {
            u32 a0[4], a1[4];
            ldsm_x4(a0, qs + swz<D>(qrow, kk * 2u + qch));
            ldsm_x4(a1, qs + swz<D>(qrow + 16u, kk * 2u + qch));
#pragma unroll
            for (u32 np = 0; np < 4u; ++np) {
                u32 b[4];
                ldsm_x4(b, ks + swz<D>(np * 16u + krow, kk * 2u + kch));
                mma16816<DT>(s[0][2 * np], a0, b[0], b[1]);
                mma16816<DT>(s[0][2 * np + 1], a0, b[2], b[3]);
                mma16816<DT>(s[1][2 * np], a1, b[0], b[1]);
                mma16816<DT>(s[1][2 * np + 1], a1, b[2], b[3]);
            }
        }
        // online softmax per m16 tile: rows warp*32 + 16 mt + g (+ 8)
#pragma unroll
        for (u32 mt = 0; mt < 2u; ++mt) {
            mask_ragged_keys(reinterpret_cast<float(&)[32]>(s[mt]), kb, Skv, tg);
            softmax_step<D>(reinterpret_cast<float(&)[32]>(s[mt]),
                            reinterpret_cast<float(&)[D / 2]>(o[mt]), sl2, mrun[mt][0],
                            mrun[mt][1], lsum[mt][0], lsum[mt][1]);
        }

        // O += P V
#pragma unroll
        for (u32 j = 0; j < 4u; ++j) {
            u32 a[2][4];
#pragma unroll
            for (u32 mt = 0; mt < 2u; ++mt)
                p_fragment<DT>(reinterpret_cast<const float(&)[32]>(s[mt]), j, a[mt]);
#pragma unroll
            for (u32 dp = 0; dp < D / 16u; ++dp) {
                u32 b[4];
                ldsm_x4_trans(b, vs + swz<D>(j * 16u + vrow, dp * 2u + vch));
                mma16816<DT>(o[0][2 * dp], a[0], b[0], b[1]);
                mma16816<DT>(o[0][2 * dp + 1], a[0], b[2], b[3]);
                mma16816<DT>(o[1][2 * dp], a[1], b[0], b[1]);
                mma16816<DT>(o[1][2 * dp + 1], a[1], b[2], b[3]);
            }
        }
    }
    cp_async_wait<0>();  // nothing may be in flight at exit (count == 0: the Q group)

#pragma unroll
    for (u32 mt = 0; mt < 2u; ++mt)
        store_rows<D, DT>(reinterpret_cast<float(&)[D / 2]>(o[mt]), lsum[mt][0], lsum[mt][1],
                          out + (size_t)bh * Sq * D, qb * 64u + warp * 32u + mt * 16u + g, Sq, tg);
}

#define ATTN_TC2(NAME, D, DT, ST, MINB)                                                           \
    extern "C" __global__ void __launch_bounds__(64, MINB)                                        \
        NAME(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,     \
             u16* __restrict__ out, const u32* __restrict__ counts,                               \
             const u32* __restrict__ indices, u32 Sq, u32 Skv, u32 nq, u32 nkv, u32 mask_heads,   \
             float sl2, u32 rotate) {                                                             \
        attn_tc2<D, DT, ST>(q, k, v, out, counts, indices, Sq, Skv, nq, nkv, mask_heads, sl2,     \
                            rotate);                                                              \
    }

ATTN_TC2(attn2_f16_d64_s2, 64, 1, 2, 4)
ATTN_TC2(attn2_f16_d128_s2, 128, 1, 2, 2)
ATTN_TC2(attn2_bf16_d64_s2, 64, 2, 2, 4)
ATTN_TC2(attn2_bf16_d128_s2, 128, 2, 2, 2)

// ---------------------------------------------------------------------------------------------
// f32 fallback: 256 threads = 64 query rows x 4; thread quarter qq owns channels 4i + qq.

template <int D>
__device__ __forceinline__ void attn_f32_body(const float* __restrict__ q, const float* __restrict__ k,
                                              const float* __restrict__ v, float* __restrict__ out,
                                              const u32* __restrict__ counts,
                                              const u32* __restrict__ indices, u32 Sq, u32 Skv,
                                              u32 nq, u32 nkv, u32 mask_heads, float sl2,
                                              u32 rotate) {
    constexpr u32 C = D / 4;  // channels per thread
    constexpr u32 KT = 16;    // keys per staged tile
    __shared__ float ks[KT * D];
    __shared__ float vs[KT * D];
    const u32 tid = threadIdx.x, row = tid >> 2, qq = tid & 3u;
    const u32 qb = blockIdx.x, bh = blockIdx.y;
    const u32 tok = qb * 64u + row;
    const bool live = tok < Sq;
    float qr[C], o[C];
#pragma unroll
    for (u32 i = 0; i < C; ++i) {
        qr[i] = live ? q[((size_t)bh * Sq + tok) * D + 4u * i + qq] * sl2 : 0.f;
        o[i] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    const BlockWalk walk(counts, indices, mask_heads, bh, nq, qb, nkv, rotate);
    const u32 count = walk.count;
    for (u32 n = 0; n < count; ++n) {
        const u32 kb = walk.at(n);
        for (u32 st = 0; st < 64u; st += KT) {
            const u32 key0 = kb * 64u + st;
            if (key0 >= Skv) break;  // uniform over the block
            for (u32 e = tid; e < KT * D; e += 256u) {
                const u32 key = key0 + e / D;
                const size_t gi = ((size_t)bh * Skv + key) * D + e % D;
                ks[e] = key < Skv ? k[gi] : 0.f;
                vs[e] = key < Skv ? v[gi] : 0.f;
            }
            __syncthreads();
            float sc[KT];
            float mx = m;
#pragma unroll
            for (u32 t = 0; t < KT; ++t) {
                float d = 0.f;
#pragma unroll
                for (u32 i = 0; i < C; ++i) d = fmaf(qr[i], ks[t * D + 4u * i + qq], d);
                d += __shfl_xor_sync(FULL_MASK, d, 1);
                d += __shfl_xor_sync(FULL_MASK, d, 2);
                sc[t] = key0 + t < Skv ? d : NEG_INF;
                mx = fmaxf(mx, sc[t]);
            }
            const float alpha = m == NEG_INF ? 0.f : exp2f(m - mx);
            l *= alpha;
#pragma unroll
            for (u32 i = 0; i < C; ++i) o[i] *= alpha;
#pragma unroll
            for (u32 t = 0; t < KT; ++t) {
                const float p = exp2f(sc[t] - mx);
                l += p;
#pragma unroll
                for (u32 i = 0; i < C; ++i) o[i] = fmaf(p, vs[t * D + 4u * i + qq], o[i]);
            }
            m = mx;
            __syncthreads();
        }
    }
    if (live) {
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (u32 i = 0; i < C; ++i) out[((size_t)bh * Sq + tok) * D + 4u * i + qq] = o[i] * inv;
    }
}

#define ATTN_F32(NAME, D)                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        NAME(const float* __restrict__ q, const float* __restrict__ k,                            \
             const float* __restrict__ v, float* __restrict__ out,                                \
             const u32* __restrict__ counts, const u32* __restrict__ indices, u32 Sq, u32 Skv,    \
             u32 nq, u32 nkv, u32 mask_heads, float sl2, u32 rotate) {                            \
        attn_f32_body<D>(q, k, v, out, counts, indices, Sq, Skv, nq, nkv, mask_heads, sl2,        \
                         rotate);                                                                 \
    }

ATTN_F32(attn_f32_d64, 64)
ATTN_F32(attn_f32_d128, 128)
