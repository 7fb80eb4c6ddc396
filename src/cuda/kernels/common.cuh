// Shared by every CUDA C file of the layer: src/cuda/sources.rs prepends this text to each
// kernel file before NVRTC compiles it (NVRTC has no include path here), and tools/cuda-emu
// swaps the marked PTX primitives for CPU emulations.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .f16/.bf16 operands and .f32 accumulators;
// lane L, g = L / 4, t = L % 4; a 32-bit register holds two 16-bit elements, the lower column
// index in the lower half):
//   A (16 x 16, row major): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1],
//                           a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
//   B (16 x 8, K x N, "col"): b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   C, D (16 x 8 f32):       c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
// ldmatrix.m8n8.x4 (.b16): lanes 8m..8m+7 give the addresses of rows 0..7 of matrix m; lane L
//   receives in r[m] the elements (row g, cols 2t, 2t+1) of matrix m; with .trans it receives
//   (rows 2t, 2t+1 ; col g) instead.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu
#define NEG_INF (-__int_as_float(0x7f800000))

// <ptx-primitives>
__device__ __forceinline__ u32 smem_u32(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
// 16-byte global -> shared copy (L2 only); bytes beyond `src_bytes` (0 or 16) are zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's committed groups are still pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
// d += A * B; DT 1 = f16, 2 = bf16 operands, f32 accumulators.
template <int DT>
__device__ __forceinline__ void mma16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if constexpr (DT == 1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}
// Two f32 -> one register of two 16-bit values (round to nearest even): `lo` in bits 0-15.
template <int DT>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    if constexpr (DT == 1) {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}
// 2^x (approximate, ~2 ulp; 2^-inf = 0).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
// </ptx-primitives>

// bf16 <-> f32 by bit manipulation (no header): round to nearest even; NaN stays a (quiet) NaN,
// overflow rounds to infinity. The same rounding as half::bf16::from_f32 and the WGSL kernels.
__device__ __forceinline__ float bf16_to_f32(u16 b) {
    return __uint_as_float(((u32)b) << 16);
}
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    const u32 b = __float_as_uint(f);
    if ((b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu) != 0u) {
        return (u16)((b >> 16) | 0x40u);
    }
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// The RoPE rotation of one channel pair (x0, x1) by angle (cos c, sin s), in f32 with every
// product and sum rounded separately (no fma contraction), so every kernel that rotates
// (ops.cu's rope kernels, nabla.cu's fused RoPE + pooling) gives bit-identical values:
// y0 = x0 c - x1 s, y1 = x0 s + x1 c.
__device__ __forceinline__ void rope_rotate(float x0, float x1, float c, float s, float& y0,
                                            float& y1) {
    y0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    y1 = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
}

// ---------------------------------------------------------------------------------------------
// The key-block walk of one query block qb of head bh: its mask row's list (counts[mrow] entries
// of indices[mrow], mrow = (mask_heads == 1 ? 0 : bh) * nq + qb; counts == null: every key
// block), started at entry qb % count when rotate != 0 (so the CTAs of a head do not all stream
// the same K/V block at once) and wrapped around. Corrupt entries are clamped to the last block.
struct BlockWalk {
    const u32* list;
    u32 count, rot, nkv;
    __device__ __forceinline__ BlockWalk(const u32* counts, const u32* indices, u32 mask_heads,
                                         u32 bh, u32 nq, u32 qb, u32 nkv_, u32 rotate)
        : list(nullptr), count(nkv_), rot(0u), nkv(nkv_) {
        if (counts != nullptr) {
            const size_t mrow = (size_t)(mask_heads == 1u ? 0u : bh) * nq + qb;
            count = min(counts[mrow], nkv);
            list = indices + mrow * nkv;
        }
        rot = (rotate != 0u && count > 0u) ? qb % count : 0u;
    }
    // key block of the n-th visited entry (n < count)
    __device__ __forceinline__ u32 at(u32 n) const {
        u32 p = n + rot;
        if (p >= count) p -= count;
        return list != nullptr ? min(list[p], nkv - 1u) : p;
    }
};

// ---------------------------------------------------------------------------------------------
// The online softmax of the attention kernels, on the S fragment of one warp's 16 query rows
// by one 64-key block: s[4t + e] = S[row g + 8 (e >> 1)][key 8t + 2 tg + (e & 1)] (the
// mma.m16n8k16 C layout over 8 key tiles, also wgmma.m64n64's per-warp layout), O likewise over
// D/8 column tiles (o[4t + e]). Base 2: sl2 = log2(e) / sqrt(D).

// Keys >= Skv of key block kb (a ragged last block) get -inf.
__device__ __forceinline__ void mask_ragged_keys(float (&s)[32], u32 kb, u32 Skv, u32 tg) {
    if (kb * 64u + 64u > Skv) {
#pragma unroll
        for (u32 t = 0; t < 8u; ++t)
#pragma unroll
            for (u32 e = 0; e < 4u; ++e)
                if (kb * 64u + t * 8u + 2u * tg + (e & 1u) >= Skv) s[4 * t + e] = NEG_INF;
    }
}

// One online-softmax step for the two rows (g, g + 8) this thread holds: s becomes
// P = 2^(s sl2 - m) and l accumulates its row sums. The running maxima m0, m1 (base-2, scaled)
// move only when a row maximum grows by more than 2^8 (lazy rescale: P <= 256, exact up to
// rounding); l is rescaled then, and the factors for O are returned in a0, a1 (1 for a row
// whose maximum stayed), the result saying whether any row of the warp moved. A row lives in a
// lane quad. NC: the keys of the step (64, or 128 for the 128-key tiles of attention_sm90a.cu's
// dense kernel).
template <int NC>
__device__ __forceinline__ bool softmax_p(float (&s)[NC / 2], float sl2, float& m0, float& m1,
                                          float& l0, float& l1, float& a0, float& a1) {
    float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
    for (u32 t = 0; t < NC / 8u; ++t) {
        mx0 = fmaxf(mx0, fmaxf(s[4 * t], s[4 * t + 1]));
        mx1 = fmaxf(mx1, fmaxf(s[4 * t + 2], s[4 * t + 3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 2));
    const float c0 = mx0 * sl2, c1 = mx1 * sl2;
    const bool up0 = c0 > m0 + 8.f, up1 = c1 > m1 + 8.f;
    a0 = 1.f;
    a1 = 1.f;
    const bool any = __any_sync(FULL_MASK, up0 || up1);
    if (any) {
        if (up0) {
            a0 = ex2(m0 - c0);
            m0 = c0;
        }
        if (up1) {
            a1 = ex2(m1 - c1);
            m1 = c1;
        }
        l0 *= a0;
        l1 *= a1;
    }
    const float mm0 = m0 == NEG_INF ? 0.f : m0, mm1 = m1 == NEG_INF ? 0.f : m1;
#pragma unroll
    for (u32 t = 0; t < NC / 8u; ++t) {
        s[4 * t] = ex2(fmaf(s[4 * t], sl2, -mm0));
        s[4 * t + 1] = ex2(fmaf(s[4 * t + 1], sl2, -mm0));
        s[4 * t + 2] = ex2(fmaf(s[4 * t + 2], sl2, -mm1));
        s[4 * t + 3] = ex2(fmaf(s[4 * t + 3], sl2, -mm1));
        l0 += s[4 * t] + s[4 * t + 1];
        l1 += s[4 * t + 2] + s[4 * t + 3];
    }
    return any;
}
// O rows g and g + 8 times a0 and a1.
template <int D>
__device__ __forceinline__ void rescale_o(float (&o)[D / 2], float a0, float a1) {
#pragma unroll
    for (u32 t = 0; t < D / 8u; ++t) {
        o[4 * t] *= a0;
        o[4 * t + 1] *= a0;
        o[4 * t + 2] *= a1;
        o[4 * t + 3] *= a1;
    }
}
// softmax_p, then O rescaled at once.
template <int D, int NC = 64>
__device__ __forceinline__ void softmax_step(float (&s)[NC / 2], float (&o)[D / 2], float sl2,
                                             float& m0, float& m1, float& l0, float& l1) {
    float a0, a1;
    if (softmax_p<NC>(s, sl2, m0, m1, l0, l1, a0, a1)) rescale_o<D>(o, a0, a1);
}

// P of keys 16j..16j+15 as the A fragment of a k16 step: S tiles 2j and 2j + 1 are exactly it.
template <int DT, int NC = 64>
__device__ __forceinline__ void p_fragment(const float (&s)[NC / 2], u32 j, u32 (&a)[4]) {
    a[0] = pack2<DT>(s[8 * j], s[8 * j + 1]);
    a[1] = pack2<DT>(s[8 * j + 2], s[8 * j + 3]);
    a[2] = pack2<DT>(s[8 * j + 4], s[8 * j + 5]);
    a[3] = pack2<DT>(s[8 * j + 6], s[8 * j + 7]);
}

// out rows r0 = g-row and r0 + 8 of this warp: O / l (rows >= Sq not written; l = 0 gives 0).
template <int D, int DT>
__device__ __forceinline__ void store_rows(const float (&o)[D / 2], float l0, float l1, u16* oh,
                                           u32 r0, u32 Sq, u32 tg) {
    l0 += __shfl_xor_sync(FULL_MASK, l0, 1);
    l0 += __shfl_xor_sync(FULL_MASK, l0, 2);
    l1 += __shfl_xor_sync(FULL_MASK, l1, 1);
    l1 += __shfl_xor_sync(FULL_MASK, l1, 2);
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
    const u32 r1 = r0 + 8u;
#pragma unroll
    for (u32 t = 0; t < D / 8u; ++t) {
        const u32 col = t * 8u + 2u * tg;
        if (r0 < Sq)
            *reinterpret_cast<u32*>(oh + (size_t)r0 * D + col) =
                pack2<DT>(o[4 * t] * i0, o[4 * t + 1] * i0);
        if (r1 < Sq)
            *reinterpret_cast<u32*>(oh + (size_t)r1 * D + col) =
                pack2<DT>(o[4 * t + 2] * i1, o[4 * t + 3] * i1);
    }
}
