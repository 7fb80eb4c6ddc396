// Block-sparse flash attention on Hopper warpgroup MMA (wgmma, sm_90a; compiled by NVRTC for
// sm_90a only, no headers). Same contract as attention.cu's tensor-core kernels:
//
// q, out [BH, Sq, D]; k, v [BH, Skv, D]; counts [MH, NQ] and indices [MH, NQ, NKV] u32
// (NQ = ceil(Sq/64), NKV = ceil(Skv/64), MH = 1 shared or BH): query block i of head bh attends
// in full to the key blocks indices[mh, i, 0..counts[mh, i]) (counts == null: every key block).
// Keys >= Skv are masked out, query rows >= Sq are not written, an empty list gives 0; rotate
// != 0 starts query block qb's walk at entry qb % count. Online softmax in base 2 with a lazy
// rescale (the running max moves only when a row maximum grows by more than 2^8), f32
// statistics and accumulators, P rounded to the operand type.
//
// Kernels attn_wg_{f16,bf16}_d{64,128} and attn_tma_{f16,bf16}_d{64,128} (STAGES = 2; the
// second loads Q, K and V through tensor maps instead of cp.async, see attn_wg's TMA flag):
//   * one CTA = one warpgroup (4 warps, 128 threads) = one 64-row query block of one head;
//   * Q, and a ring of STAGES (K tile, V tile) pairs, in shared memory, filled by cp.async
//     (16-byte chunks, zero-filled past Skv / Sq); block n + STAGES - 1 is loaded while block n
//     is computed;
//   * S = Q K^T: D/16 x wgmma.m64n64k16, both operands from shared memory (K-major);
//     O += P V: 4 x wgmma.m64n{D}k16 with P from registers (the S accumulators of keys
//     16j..16j+15 are exactly the A fragment of k step j, as for mma.m16n8k16) and V from shared
//     memory read transposed (MN-major: V's rows of D contiguous elements are the N dimension);
//   * per block: wait for the block's copies, fence.proxy.async (cp.async writes are generic-proxy
//     writes; wgmma reads through the async proxy), barrier, issue S, wait (this also retires the
//     previous block's P V), barrier (every warp is past that wait, so the previous stage is
//     free), issue the next copy, softmax, issue P V without waiting: P V of block n runs while
//     block n + 1's barrier and S are issued.
//
// Shared-memory tiles (64 rows x D, 16-bit) use the 128-byte swizzle of wgmma: the tile is split
// into D/64 column halves of 64 elements (128 bytes per row); half h, row r, 16-byte chunk c
// (0..7) lies at byte h * 8192 + r * 128 + ((c ^ (r & 7)) * 16). Every tile starts 1024-byte
// aligned (the swizzle acts on address bits 4-9), so the descriptors' base offset is 0.
// Descriptors (PTX ISA "matrix descriptor"): start address >> 4 (bits 0-13), leading byte offset
// >> 4 (16-29), stride byte offset >> 4 (32-45), swizzle mode 1 = 128 B (bits 62-63).
//   K-major (Q as A, K as B of S): 8-row groups 1024 B apart (SBO); the leading offset is unused
//   for swizzled K-major layouts (set to 16 B); k step kk starts at half kk / 4, byte
//   32 * (kk % 4) of the row (the hardware applies the swizzle to the computed addresses).
//   MN-major (V as B of O += P V): within a 128-byte row the 64 N-elements; the next 64 N-elements
//   (the other column half) are LBO = 8192 B away; the next 8 k-rows (keys) are SBO = 1024 B
//   away; k step j (keys 16j..16j+15) starts at byte 2048 j.
//   Shared memory: 1024 (alignment) + (1 + 2 STAGES) * 64 * D * 2 + 16 bytes
//   (D = 128: 81 KB -> 2 CTAs per SM; D = 64: 41 KB).
//
// Measured on the H200 at wan14b-720p (benches/RESULTS.md, session 3): this form ran fastest of
// those tried; session 6's TMA loads took it from 221-224 to 198 ms dense (23 % fewer issued
// instructions, 138 instead of 156 registers). 3 stages (113 KB, 1 CTA per SM) ran 20 % slower; issuing S(n) together with
// P(n-1) V(n-1) to overlap the softmax with P V (FlashAttention-3's intra-warpgroup overlap),
// Q in registers, and 128-row CTAs of two warpgroups sharing each K/V tile (half the L2
// traffic) all ran 0-15 % slower. The swapped V descriptor (LBO = 1024, SBO = 8192) fails
// the tests: the offsets above are the right ones.
// Accumulator layout of wgmma.m64nN (f32): warp w of the warpgroup holds rows 16w..16w+15 as
// mma.m16n8k16 C fragments of the N/8 column tiles: d[4t + e] = C[g + 8 (e >> 1)][8t + 2 tg + (e & 1)]
// with g = lane / 4, tg = lane % 4.

// <wgmma-primitives>  (tools/cuda-emu/prims_wgmma.h emulates this section on the CPU)
// Accumulator operand lists of wgmma.m64n64 (32 f32 per thread) and m64n128 (64).
#define WG_REGS32 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#define WG_REGS64 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"
#define WG_OUT32(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define WG_OUT64(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
// D[64 x 64] (+)= A[64 x 16] * B[16 x 64], A and B in shared memory, both K-major (rows of the
// 16-element k step contiguous); scale_d == 0 overwrites D. TY: "f16" or "bf16".
#define WGMMA_SS_N64(TY)                                                                          \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                     \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " WG_REGS32             \
                 ", %32, %33, p, 1, 1, 0, 0;\n}\n"                                                 \
                 : WG_OUT32(d)                                                                    \
                 : "l"(da), "l"(db), "r"(scale_d))
// D[64 x N] += A[64 x 16] * B[16 x N], A in registers (the mma.m16n8k16 A fragment of each warp's
// 16 rows), B in shared memory MN-major (transposed: rows of N elements contiguous).
#define WGMMA_RS_T(N, TY, REGS, OUT, AOPS, PRED)                                                \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\n"                                 \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " REGS ", " AOPS    \
                 ", p, 1, 1, 1;\n}\n"                                                              \
                 : OUT(d)                                                                         \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1u))
// operands after the accumulators: the A registers, B's descriptor, then the scale-d predicate
#define WG_A32 "{%32,%33,%34,%35}, %36"
#define WG_A64 "{%64,%65,%66,%67}, %68"

template <int DT>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], u64 da, u64 db, u32 scale_d) {
    if constexpr (DT == 1) {
        WGMMA_SS_N64("f16");
    } else {
        WGMMA_SS_N64("bf16");
    }
}
#define WGMMA_SS_N128(TY)                                                                         \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                     \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " WG_REGS64            \
                 ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                                 \
                 : WG_OUT64(d)                                                                    \
                 : "l"(da), "l"(db), "r"(scale_d))
template <int DT>
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], u64 da, u64 db, u32 scale_d) {
    if constexpr (DT == 1) {
        WGMMA_SS_N128("f16");
    } else {
        WGMMA_SS_N128("bf16");
    }
}
template <int DT>
__device__ __forceinline__ void wgmma_rs_n64_t(float (&d)[32], const u32 (&a)[4], u64 db) {
    if constexpr (DT == 1) {
        WGMMA_RS_T(64, "f16", WG_REGS32, WG_OUT32, WG_A32, "%37");
    } else {
        WGMMA_RS_T(64, "bf16", WG_REGS32, WG_OUT32, WG_A32, "%37");
    }
}
template <int DT>
__device__ __forceinline__ void wgmma_rs_n128_t(float (&d)[64], const u32 (&a)[4], u64 db) {
    if constexpr (DT == 1) {
        WGMMA_RS_T(128, "f16", WG_REGS64, WG_OUT64, WG_A64, "%69");
    } else {
        WGMMA_RS_T(128, "bf16", WG_REGS64, WG_OUT64, WG_A64, "%69");
    }
}
__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Orders later uses of the registers after the preceding asm (a wgmma wait): the compiler sees
// them rewritten here.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// cp.async (generic proxy) writes -> visible to wgmma (async proxy) reads after a barrier.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// </wgmma-primitives>

// <tma-primitives>  (tools/cuda-emu/prims_tma.h emulates this section on the CPU)
// A CUtensorMap (128 bytes, opaque), passed by value as a __grid_constant__ kernel parameter.
struct __align__(64) TmaMap {
    u64 v[16];
};
// mbarrier in shared memory (8 bytes): `count` arrivals per phase, plus a transaction count.
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// makes initialised barriers visible to the other threads and to the copy engine (then a
// barrier)
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// this thread's arrival, announcing `bytes` of copies that complete on the barrier
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
// waits until the phase of parity `parity` has completed (acquire: its copies are visible)
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done = 0;
    while (!done) {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    }
}
// a plain arrival (no transaction bytes)
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// this warpgroup's registers per thread, lowered or raised to N (a multiple of 8, 24..256); the
// kernel's register cap at entry comes from __launch_bounds__(threads, 1)
template <u32 N>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <u32 N>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
// named CTA barrier `id` (1..15; 0 is __syncthreads) of `count` threads: wait, or arrive only
__device__ __forceinline__ void bar_sync_n(u32 id, u32 count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_arrive_n(u32 id, u32 count) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
// the box of `map` at element coordinates (c0, c1, c2) into shared memory at `dst`, completing
// its bytes on `bar`; rows outside the tensor arrive as zeros
__device__ __forceinline__ void tma_load_3d(u32 dst, const TmaMap& map, u32 bar, u32 c0, u32 c1,
                                            u32 c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, "
        "{%2, %3, %4}], [%5];\n" ::"r"(dst),
        "l"(reinterpret_cast<u64>(&map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}
// </tma-primitives>

// A 128-byte-swizzle shared-memory matrix descriptor.
__device__ __forceinline__ u64 sw128_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)((lbo >> 4) & 0x3FFFu) << 16) |
           ((u64)((sbo >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}
// Byte offset of (row, 16-byte chunk) in a 64-row tile of 16-bit elements (see the header).
__device__ __forceinline__ u32 sw128_off(u32 row, u32 ch) {
    return (ch >> 3) * 8192u + row * 128u + (((ch & 7u) ^ (row & 7u)) << 4);
}

// TMA = false: every thread copies its share of each tile by cp.async (16-byte chunks, the
// swizzle computed per chunk). TMA = true: thread 0 loads each tile as D/64 boxes of 64 x 64
// through the tensor maps `mq`, `mk`, `mv` (128-byte swizzle, the layout above), completing on
// the stage's mbarrier, and the other threads only wait on it (no copy instructions, no proxy
// fence, one CTA barrier per block instead of two).
template <int D, int DT, int STAGES, bool TMA>
__device__ __forceinline__ void attn_wg(const u16* __restrict__ q, const u16* __restrict__ k,
                                        const u16* __restrict__ v, const TmaMap* mq,
                                        const TmaMap* mk, const TmaMap* mv, u16* __restrict__ out,
                                        const u32* __restrict__ counts,
                                        const u32* __restrict__ indices, u32 Sq, u32 Skv, u32 nq,
                                        u32 nkv, u32 mask_heads, float sl2, u32 rotate) {
    static_assert(D == 64 || D == 128, "head_dim 64 or 128");
    static_assert(STAGES >= 2 && STAGES <= 4, "2..4 stages");
    constexpr u32 CH = D / 8;              // 16-byte chunks per row
    constexpr u32 TILE = 64u * D * 2u;     // bytes per 64-row tile
    constexpr u32 STAGE = 2u * TILE;       // K tile, then V tile
    constexpr u32 LOADS = 64u * CH / 128u; // chunks per thread per tile
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const u32 raw = smem_u32(smem_raw);
    const u32 pad = ((raw + 1023u) & ~1023u) - raw;
    unsigned char* sm = smem_raw + pad;  // 1024-byte aligned: Q tile, then the stages
    const u32 sbase = raw + pad;
    // after the stages: the key block per stage (cp.async) or the stages' mbarriers (TMA)
    u32* skb = reinterpret_cast<u32*>(sm + TILE + STAGES * STAGE);
    const u32 bar0 = sbase + TILE + STAGES * STAGE;  // stage st's mbarrier: bar0 + 8 st

    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 g = lane >> 2, tg = lane & 3u;
    const u32 qb = blockIdx.x, bh = blockIdx.y;
    const u16* qh = q + (size_t)bh * Sq * D;
    const u16* kh = k + (size_t)bh * Skv * D;
    const u16* vh = v + (size_t)bh * Skv * D;

    const BlockWalk walk(counts, indices, mask_heads, bh, nq, qb, nkv, rotate);
    const u32 count = walk.count;
    // TMA (thread 0): block kb's K and V tiles into stage st, plus `extra` bytes already issued
    // on the same barrier phase (Q with the first block)
    auto tma_kv = [&](u32 kb, u32 st, u32 extra) {
        const u32 ks = sbase + TILE + st * STAGE, bar = bar0 + 8u * st;
        mbar_arrive_expect_tx(bar, STAGE + extra);
#pragma unroll
        for (u32 h = 0; h < D / 64u; ++h) {
            tma_load_3d(ks + h * 8192u, *mk, bar, h * 64u, kb * 64u, bh);
            tma_load_3d(ks + TILE + h * 8192u, *mv, bar, h * 64u, kb * 64u, bh);
        }
    };
    auto load_kv = [&](u32 kb, u32 st) {
        unsigned char* ks = sm + TILE + st * STAGE;
        unsigned char* vs = ks + TILE;
#pragma unroll
        for (u32 i = 0; i < LOADS; ++i) {
            const u32 c = tid + 128u * i;
            const u32 row = c / CH, ch = c % CH;
            const u32 key = kb * 64u + row;
            const bool ok = key < Skv;
            const size_t off = (size_t)(ok ? key : 0u) * D + ch * 8u;
            const u32 so = sw128_off(row, ch);
            cp_async16(ks + so, kh + off, ok ? 16u : 0u);
            cp_async16(vs + so, vh + off, ok ? 16u : 0u);
        }
        if (tid == 0) skb[st] = kb;
    };

    // prologue: Q, then K/V blocks 0..STAGES-2 into stages 0..STAGES-2 (one group or barrier
    // phase each; TMA: Q completes on stage 0's first phase)
    if constexpr (TMA) {
        if (tid == 0) {
#pragma unroll
            for (u32 s = 0; s < (u32)STAGES; ++s) mbar_init(bar0 + 8u * s, 1u);
            mbar_init_fence();
        }
        __syncthreads();
        if (tid == 0 && count > 0u) {
            tma_kv(walk.at(0), 0, TILE);
#pragma unroll
            for (u32 h = 0; h < D / 64u; ++h)
                tma_load_3d(sbase + h * 8192u, *mq, bar0, h * 64u, qb * 64u, bh);
#pragma unroll
            for (u32 s = 1; s + 1u < (u32)STAGES; ++s)
                if (s < count) tma_kv(walk.at(s), s, 0u);
        }
    } else {
#pragma unroll
        for (u32 i = 0; i < LOADS; ++i) {
            const u32 c = tid + 128u * i;
            const u32 row = c / CH, ch = c % CH;
            const u32 tok = qb * 64u + row;
            const bool ok = tok < Sq;
            cp_async16(sm + sw128_off(row, ch), qh + (size_t)(ok ? tok : 0u) * D + ch * 8u,
                       ok ? 16u : 0u);
        }
        cp_async_commit();
#pragma unroll
        for (u32 s = 0; s + 1u < (u32)STAGES; ++s) {
            if (s < count) load_kv(walk.at(s), s);
            cp_async_commit();
        }
    }
    u32 kb_next = (u32)(STAGES - 1) < count ? walk.at(STAGES - 1) : 0u;

    float o[D / 2];
#pragma unroll
    for (u32 i = 0; i < D / 2u; ++i) o[i] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    for (u32 n = 0; n < count; ++n) {
        const u32 st = n % STAGES;
        u32 kb;
        if constexpr (TMA) {
            kb = walk.at(n);
            mbar_wait(bar0 + 8u * st, (n / STAGES) & 1u);  // block n (and Q) landed
        } else {
            cp_async_wait<STAGES - 2>();  // block n (and Q) landed: this thread's copies
            fence_proxy_async();
            __syncthreads();  // ... everyone's
            kb = skb[st];
        }
        const u32 kaddr = sbase + TILE + st * STAGE, vaddr = kaddr + TILE;

        // S = Q K^T (64 x 64)
        float s[32];
        wgmma_fence();
#pragma unroll
        for (u32 kk = 0; kk < D / 16u; ++kk) {
            const u32 off = (kk >> 2) * 8192u + (kk & 3u) * 32u;
            wgmma_ss_n64<DT>(s, sw128_desc(sbase + off, 16u, 1024u),
                             sw128_desc(kaddr + off, 16u, 1024u), kk > 0u ? 1u : 0u);
        }
        wgmma_commit();
        wgmma_wait<0>();  // S done, and the previous block's O += P V
        fence_regs(s);
        fence_regs(o);
        __syncthreads();  // every warp is past its wait: stage (n - 1) % STAGES is free
        {
            const u32 nn = n + STAGES - 1;
            if constexpr (TMA) {
                if (tid == 0 && nn < count) tma_kv(kb_next, nn % STAGES, 0u);
                if (nn < count) kb_next = nn + 1u < count ? walk.at(nn + 1u) : 0u;
            } else {
                if (nn < count) {
                    load_kv(kb_next, nn % STAGES);
                    kb_next = nn + 1u < count ? walk.at(nn + 1u) : 0u;
                }
                cp_async_commit();  // possibly empty: keeps the group count uniform
            }
        }

        mask_ragged_keys(s, kb, Skv, tg);
        softmax_step<D>(s, o, sl2, m0, m1, l0, l1);

        // O += P V
        u32 p[4][4];
#pragma unroll
        for (u32 j = 0; j < 4u; ++j) p_fragment<DT>(s, j, p[j]);
        wgmma_fence();
#pragma unroll
        for (u32 j = 0; j < 4u; ++j) {
            const u64 dv = sw128_desc(vaddr + j * 2048u, 8192u, 1024u);
            if constexpr (D == 128) {
                wgmma_rs_n128_t<DT>(o, p[j], dv);
            } else {
                wgmma_rs_n64_t<DT>(o, p[j], dv);
            }
        }
        wgmma_commit();
    }
    wgmma_wait<0>();
    fence_regs(o);
    if constexpr (!TMA) cp_async_wait<0>();

    store_rows<D, DT>(o, l0, l1, out + (size_t)bh * Sq * D, qb * 64u + warp * 16u + g, Sq, tg);
}

// min blocks per SM: shared memory (D = 128: 81 KB -> 2) and registers (ptxas: D = 128 156,
// D = 64 110 per thread).
#define ATTN_WG(NAME, D, DT, MINB)                                                                \
    extern "C" __global__ void __launch_bounds__(128, MINB)                                       \
        NAME(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,     \
             u16* __restrict__ out, const u32* __restrict__ counts,                               \
             const u32* __restrict__ indices, u32 Sq, u32 Skv, u32 nq, u32 nkv, u32 mask_heads,   \
             float sl2, u32 rotate) {                                                             \
        attn_wg<D, DT, 2, false>(q, k, v, nullptr, nullptr, nullptr, out, counts, indices, Sq,     \
                                 Skv, nq, nkv, mask_heads, sl2, rotate);                          \
    }

ATTN_WG(attn_wg_f16_d64, 64, 1, 4)
ATTN_WG(attn_wg_f16_d128, 128, 1, 2)
ATTN_WG(attn_wg_bf16_d64, 64, 2, 4)
ATTN_WG(attn_wg_bf16_d128, 128, 2, 2)

// The TMA form: tensor maps of q, k, v as 3-D tensors (D, S, B*H) of 16-bit elements, boxes of
// 64 x 64 x 1 with the 128-byte swizzle (the host builds them: src/cuda/attention.rs).
#define ATTN_TMA(NAME, D, DT, MINB)                                                               \
    extern "C" __global__ void __launch_bounds__(128, MINB)                                       \
        NAME(const __grid_constant__ TmaMap tq, const __grid_constant__ TmaMap tk,               \
             const __grid_constant__ TmaMap tv, u16* __restrict__ out,                            \
             const u32* __restrict__ counts, const u32* __restrict__ indices, u32 Sq, u32 Skv,    \
             u32 nq, u32 nkv, u32 mask_heads, float sl2, u32 rotate) {                            \
        attn_wg<D, DT, 2, true>(nullptr, nullptr, nullptr, &tq, &tk, &tv, out, counts, indices,   \
                                Sq, Skv, nq, nkv, mask_heads, sl2, rotate);                       \
    }

ATTN_TMA(attn_tma_f16_d64, 64, 1, 4)
ATTN_TMA(attn_tma_f16_d128, 128, 1, 2)
ATTN_TMA(attn_tma_bf16_d64, 64, 2, 4)
ATTN_TMA(attn_tma_bf16_d128, 128, 2, 2)


// ---------------------------------------------------------------------------------------------
// Dense attention in the FlashAttention-3 form (head_dim 128; no mask): attn_fa_{f16,bf16}_s{NS}
//   * one CTA = 128 query rows = two consumer warpgroups (warps 0-3 rows 0-63, warps 4-7 rows
//     64-127, each its own Q tile) + a producer warpgroup (warps 8-11, one thread of which
//     works): 384 threads; setmaxnreg gives the consumers 240 registers and the producer 24 (at
//     the 168 of an even split, ptxas serialises the wgmma);
//   * the producer's lane 0 loads both Q tiles, then 128-key stages (the K and V tiles of two
//     64-key blocks, 64 KB) through tensor maps into a ring of NS stages: it waits for a stage's
//     "empty" mbarrier (one arrival per consumer warp once it has finished reading the stage),
//     then arms its "full" mbarrier with the stage's bytes;
//   * each consumer warpgroup, per pair n: S = Q K^T as 8 x wgmma.m64n128k16 (both operands in
//     shared memory), then pair n - 1's O += P V as 8 x wgmma.m64n128k16 (P from registers)
//     issued behind it; it waits for S only, runs the online softmax over 128 keys while that
//     P V runs (FA3's intra-warpgroup overlap), then waits for it, releases its stage, packs
//     P of pair n and applies the lazy rescale to O. The two warpgroups take turns at issuing
//     (named barriers 1 and 2, FA3's ping-pong), so one's softmax runs under the other's
//     matrix products;
//   * K stage layout: column half h (0, 1) of key block b (0, 1) at h * 16384 + b * 8192, so the
//     128 keys of a half are 16 consecutive 8-row groups 1024 bytes apart (one K-major
//     descriptor of N = 128); V stage: block b's tile (the layout of attn_wg) at 32768 +
//     b * 16384;
//   * the walk over key pairs starts at pair blockIdx.x mod pairs (rotate != 0), as attn_wg's.
// Shared memory: 1024 (alignment) + 2 * 16384 (Q) + NS * 65536 + 8 * (2 NS + 1) bytes.
// One consumer warpgroup of attn_fa / attn_fs (see above): `count` steps of NK keys (64: one key
// block, 128: two) from the stage ring at `ring` (NS stages of K then V, 2 NK/64 tiles each),
// its Q tile at `qaddr`, output rows row0.. of head bh. key_at(n): the first key of step n.
// PING: take turns with the other warpgroup at issuing (named barriers 1 and 2; both must run
// the same number of steps). Each warp arrives once per step on the stage's empty barrier.
template <int D, int DT, int NS, int NK, bool PING, class KeyAt>
__device__ __forceinline__ void fa_consumer(u16* __restrict__ oh, u32 row0, u32 Sq, u32 Skv,
                                            float sl2, u32 qaddr, u32 ring, u32 full0,
                                            u32 empty0, u32 qbar, u32 count, KeyAt key_at) {
    constexpr u32 TILE = 64u * D * 2u;             // 64 rows
    constexpr u32 KT = (NK / 64u) * TILE;          // the K (or V) part of a stage
    constexpr u32 STAGE = 2u * KT;
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, w = warp >> 2u;
    const u32 g = lane >> 2u, tg = lane & 3u;
    float o[D / 2];
#pragma unroll
    for (u32 i = 0; i < D / 2u; ++i) o[i] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    // P of step n - 1 as the A fragments of its NK/16 k16 steps, and its V tile: its P V is
    // issued behind step n's S. Before the first step it is a P V of zeros over that step's own
    // V tile, which keeps the wgmma issue free of branches (ptxas serialises wgmma in
    // conditional code).
    u32 pf[NK / 16][4];
#pragma unroll
    for (u32 j = 0; j < NK / 16u; ++j) pf[j][0] = pf[j][1] = pf[j][2] = pf[j][3] = 0u;
    u32 vprev = 0u;
    auto issue_pv = [&](u32 vs) {
        wgmma_fence();
#pragma unroll
        for (u32 j = 0; j < NK / 16u; ++j) {
            const u64 dv = sw128_desc(vs + (j >> 2) * TILE + (j & 3u) * 2048u, 8192u, 1024u);
            if constexpr (D == 128) {
                wgmma_rs_n128_t<DT>(o, pf[j], dv);
            } else {
                wgmma_rs_n64_t<DT>(o, pf[j], dv);
            }
        }
        wgmma_commit();
    };
    if (count > 0u) mbar_wait(qbar, 0u);
    if (PING && w == 1u) bar_arrive_n(1u, 256u);  // warpgroup 0 takes the first turn
    for (u32 n = 0; n < count; ++n) {
        const u32 st = n % NS;
        const u32 k0 = key_at(n);
        const u32 ks = ring + st * STAGE, vs = ks + KT;
        mbar_wait(full0 + 8u * st, (n / NS) & 1u);
        if (n == 0u) vprev = vs;

        // S = Q K^T (64 x NK), then the previous step's O += P V behind it
        float s[NK / 2];
        if constexpr (PING) bar_sync_n(1u + w, 256u);
        wgmma_fence();
#pragma unroll
        for (u32 kk = 0; kk < D / 16u; ++kk) {
            const u32 qo = (kk >> 2) * 8192u + (kk & 3u) * 32u;
            const u32 ko = (kk >> 2) * (NK / 64u) * 8192u + (kk & 3u) * 32u;
            const u64 da = sw128_desc(qaddr + qo, 16u, 1024u), db = sw128_desc(ks + ko, 16u, 1024u);
            if constexpr (NK == 128) {
                wgmma_ss_n128<DT>(s, da, db, kk > 0u ? 1u : 0u);
            } else {
                wgmma_ss_n64<DT>(s, da, db, kk > 0u ? 1u : 0u);
            }
        }
        wgmma_commit();
        issue_pv(vprev);
        if constexpr (PING) {
            if (w == 0u || n + 1u < count) bar_arrive_n(2u - w, 256u);  // the other's turn
        }
        wgmma_wait<1>();  // S; the previous step's P V may still run under the softmax
        fence_regs(s);

        if (k0 + NK > Skv) {  // keys past the end
#pragma unroll
            for (u32 t = 0; t < NK / 8u; ++t)
#pragma unroll
                for (u32 e = 0; e < 4u; ++e)
                    if (k0 + t * 8u + 2u * tg + (e & 1u) >= Skv) s[4 * t + e] = NEG_INF;
        }
        float a0, a1;
        const bool moved = softmax_p<NK>(s, sl2, m0, m1, l0, l1, a0, a1);
        wgmma_wait<0>();  // the previous step's P V: O, its P registers and its stage are free
        fence_regs(o);
        if (n > 0u && lane == 0u) mbar_arrive(empty0 + 8u * ((n - 1u) % NS));
#pragma unroll
        for (u32 j = 0; j < NK / 16u; ++j) p_fragment<DT, NK>(s, j, pf[j]);
        if (moved) rescale_o<D>(o, a0, a1);
        vprev = vs;
    }
    if (count > 0u) issue_pv(vprev);
    wgmma_wait<0>();
    fence_regs(o);
    if (count > 0u && lane == 0u) mbar_arrive(empty0 + 8u * ((count - 1u) % NS));
    store_rows<D, DT>(o, l0, l1, oh, row0 + (warp & 3u) * 16u + g, Sq, tg);
}

template <int DT, int NS>
__device__ __forceinline__ void attn_fa(const TmaMap& mq, const TmaMap& mk, const TmaMap& mv,
                                        u16* __restrict__ out, u32 Sq, u32 Skv, float sl2,
                                        u32 rotate) {
    constexpr u32 D = 128;
    constexpr u32 TILE = 64u * D * 2u;  // 64 rows: 16 KB
    constexpr u32 STAGE = 4u * TILE;    // K and V of 128 keys
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const u32 raw = smem_u32(smem_raw);
    const u32 sbase = (raw + 1023u) & ~1023u;  // Q tiles of warpgroups 0 and 1
    const u32 stages = sbase + 2u * TILE;
    const u32 full0 = stages + NS * STAGE;  // full[s] at full0 + 8 s, empty[s] after them
    const u32 empty0 = full0 + 8u * NS, qbar = full0 + 16u * NS;
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 bh = blockIdx.y;
    const u32 pairs = (Skv + 127u) / 128u;
    const u32 rot = rotate != 0u ? blockIdx.x % pairs : 0u;

    if (tid == 0) {
#pragma unroll
        for (u32 st = 0; st < (u32)NS; ++st) {
            mbar_init(full0 + 8u * st, 1u);
            mbar_init(empty0 + 8u * st, 8u);
        }
        mbar_init(qbar, 1u);
        mbar_init_fence();
    }
    __syncthreads();

    if (warp >= 8u) {  // the producer warpgroup: one thread issues every copy
        setmaxnreg_dec<24>();
        if (warp == 8u && lane == 0u) {
            mbar_arrive_expect_tx(qbar, 2u * TILE);
#pragma unroll
            for (u32 w = 0; w < 2u; ++w)
#pragma unroll
                for (u32 h = 0; h < 2u; ++h)
                    tma_load_3d(sbase + w * TILE + h * 8192u, mq, qbar, h * 64u,
                                (2u * blockIdx.x + w) * 64u, bh);
            for (u32 n = 0; n < pairs + NS; ++n) {
                const u32 st = n % NS;
                if (n >= (u32)NS) mbar_wait(empty0 + 8u * st, (n / NS - 1u) & 1u);
                if (n >= pairs) continue;  // the tail: every stage released before exit
                u32 p = n + rot;
                if (p >= pairs) p -= pairs;
                const u32 ks = stages + st * STAGE, vs = ks + 2u * TILE, bar = full0 + 8u * st;
                mbar_arrive_expect_tx(bar, STAGE);
#pragma unroll
                for (u32 b = 0; b < 2u; ++b)
#pragma unroll
                    for (u32 h = 0; h < 2u; ++h) {
                        const u32 row = (2u * p + b) * 64u;
                        tma_load_3d(ks + h * 16384u + b * 8192u, mk, bar, h * 64u, row, bh);
                        tma_load_3d(vs + b * 16384u + h * 8192u, mv, bar, h * 64u, row, bh);
                    }
            }
        }
    } else {
        setmaxnreg_inc<240>();
        const u32 w = warp >> 2u;
        fa_consumer<D, DT, NS, 128, true>(out + (size_t)bh * Sq * D, (2u * blockIdx.x + w) * 64u,
                                          Sq, Skv, sl2, sbase + w * TILE, stages, full0, empty0,
                                          qbar, pairs, [&](u32 n) {
                                              u32 p = n + rot;
                                              if (p >= pairs) p -= pairs;
                                              return p * 128u;
                                          });
    }
}

// ---------------------------------------------------------------------------------------------
// Block-sparse attention in the same form: attn_fs_{f16,bf16}_d{64,128}. One CTA = two 64-row
// query blocks (two mask rows, each with its own list of key blocks) = two consumer warpgroups,
// each with its own Q tile and its own ring of NS = 3 stages (K and V tiles of one key block),
// and a producer warpgroup of which lane 0 of warp 8 feeds warpgroup 0's ring and lane 0 of
// warp 9 warpgroup 1's (by TMA, full / empty mbarriers per stage). The consumers run
// fa_consumer with 64-key steps and no ping-pong (their lists differ in length); P V overlaps
// the next block's softmax as in attn_fa. A query block past the end, or an empty list, loads
// nothing and writes zeros (rows < Sq).
// Shared memory: 1024 + 2 (64 D 2 (1 + 2 NS)) + 16 (2 NS + 1) bytes (D = 128: 225 KiB).
template <int D, int DT, int NS>
__device__ __forceinline__ void attn_fs(const TmaMap& mq, const TmaMap& mk, const TmaMap& mv,
                                        u16* __restrict__ out, const u32* __restrict__ counts,
                                        const u32* __restrict__ indices, u32 Sq, u32 Skv, u32 nq,
                                        u32 nkv, u32 mask_heads, float sl2, u32 rotate) {
    constexpr u32 TILE = 64u * D * 2u;
    constexpr u32 STAGE = 2u * TILE;
    constexpr u32 REGION = TILE + NS * STAGE;  // one warpgroup's Q tile and ring
    constexpr u32 NB = 2u * NS + 1u;           // mbarriers per warpgroup: full, empty, Q
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const u32 raw = smem_u32(smem_raw);
    const u32 sbase = (raw + 1023u) & ~1023u;
    const u32 bars = sbase + 2u * REGION;
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 bh = blockIdx.y;
    if (tid == 0) {
#pragma unroll
        for (u32 w = 0; w < 2u; ++w) {
#pragma unroll
            for (u32 st = 0; st < (u32)NS; ++st) {
                mbar_init(bars + 8u * (w * NB + st), 1u);
                mbar_init(bars + 8u * (w * NB + NS + st), 4u);
            }
            mbar_init(bars + 8u * (w * NB + 2u * NS), 1u);
        }
        mbar_init_fence();
    }
    __syncthreads();
    // this thread's warpgroup: consumers 0, 1 (warps 0-7); the producer lanes serve warp - 8
    const u32 w = warp < 8u ? warp >> 2u : (warp - 8u) & 1u;
    const u32 qb = 2u * blockIdx.x + w;
    const BlockWalk walk(counts, indices, mask_heads, bh, nq, min(qb, nq - 1u), nkv, rotate);
    const u32 count = qb < nq ? walk.count : 0u;
    const u32 region = sbase + w * REGION, ring = region + TILE;
    const u32 full0 = bars + 8u * (w * NB), empty0 = full0 + 8u * NS, qbar = full0 + 16u * NS;
    if (warp >= 8u) {  // the producer warpgroup
        setmaxnreg_dec<24>();
        if (warp < 10u && lane == 0u && count > 0u) {
            mbar_arrive_expect_tx(qbar, TILE);
#pragma unroll
            for (u32 h = 0; h < D / 64u; ++h)
                tma_load_3d(region + h * 8192u, mq, qbar, h * 64u, qb * 64u, bh);
            for (u32 n = 0; n < count + NS; ++n) {
                const u32 st = n % NS;
                if (n >= (u32)NS) mbar_wait(empty0 + 8u * st, (n / NS - 1u) & 1u);
                if (n >= count) continue;  // the tail: every stage released before exit
                const u32 kb = walk.at(n);
                const u32 ks = ring + st * STAGE, bar = full0 + 8u * st;
                mbar_arrive_expect_tx(bar, STAGE);
#pragma unroll
                for (u32 h = 0; h < D / 64u; ++h) {
                    tma_load_3d(ks + h * 8192u, mk, bar, h * 64u, kb * 64u, bh);
                    tma_load_3d(ks + TILE + h * 8192u, mv, bar, h * 64u, kb * 64u, bh);
                }
            }
        }
    } else {
        setmaxnreg_inc<240>();
        fa_consumer<D, DT, NS, 64, false>(out + (size_t)bh * Sq * D, qb * 64u, Sq, Skv, sl2,
                                          region, ring, full0, empty0, qbar, count,
                                          [&](u32 n) { return walk.at(n) * 64u; });
    }
}

#define ATTN_FS(NAME, D, DT)                                                                      \
    extern "C" __global__ void __launch_bounds__(384, 1)                                          \
        NAME(const __grid_constant__ TmaMap tq, const __grid_constant__ TmaMap tk,               \
             const __grid_constant__ TmaMap tv, u16* __restrict__ out,                            \
             const u32* __restrict__ counts, const u32* __restrict__ indices, u32 Sq, u32 Skv,    \
             u32 nq, u32 nkv, u32 mask_heads, float sl2, u32 rotate) {                            \
        attn_fs<D, DT, 3>(tq, tk, tv, out, counts, indices, Sq, Skv, nq, nkv, mask_heads, sl2,    \
                          rotate);                                                                \
    }

ATTN_FS(attn_fs_f16_d64, 64, 1)
ATTN_FS(attn_fs_f16_d128, 128, 1)
ATTN_FS(attn_fs_bf16_d64, 64, 2)
ATTN_FS(attn_fs_bf16_d128, 128, 2)

#define ATTN_FA(NAME, DT, NS)                                                                     \
    extern "C" __global__ void __launch_bounds__(384, 1)                                          \
        NAME(const __grid_constant__ TmaMap tq, const __grid_constant__ TmaMap tk,               \
             const __grid_constant__ TmaMap tv, u16* __restrict__ out, u32 Sq, u32 Skv,          \
             float sl2, u32 rotate) {                                                             \
        attn_fa<DT, NS>(tq, tk, tv, out, Sq, Skv, sl2, rotate);                                   \
    }

ATTN_FA(attn_fa_f16_s2, 1, 2)
ATTN_FA(attn_fa_f16_s3, 1, 3)
ATTN_FA(attn_fa_bf16_s2, 2, 2)
ATTN_FA(attn_fa_bf16_s3, 2, 3)
