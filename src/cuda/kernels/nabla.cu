// NABLA block-mask estimation on CUDA (compiled by NVRTC; no headers).
//
// Pipeline (all kernels on one stream, no host round trip):
//   1. nabla_pool_{f32,f16,bf16}: block average pooling of q or k [BH, S, D] -> qa [BH, Nb, D] f32
//      (mean over the block's rows, summed in f32; a ragged last block averages its own rows).
//      The same CTA splits each pooled row for the tensor-core scores: with a per-row power of two
//      2^k (k = 13 - floor(log2 max|row|)), hi = f16(x 2^k), lo = f16(x 2^k - hi), so
//      x = (hi + lo) 2^-k to ~2^-22 relative, and inv[row] = 2^-k.
//      nabla_split does the split alone for already pooled rows; nabla_rope_pool_* fuses the
//      pooling (and the split) into the DiT's RoPE + head split, so q and k are read once.
//   2. nabla_scores128 (nabla_scores: 64 x 64 tiles where 96 KB of shared memory per block is not
//      available; the same logits bit for bit): logits[bh, i, j] = (qa_i . ka_j) / sqrt(D) on
//      tensor cores (mma.m16n8k16 f16 -> f32) as hi.hi + hi.lo + lo.hi (the "3-product split":
//      ~f32 accuracy); each k16 step is accumulated from zero (small products first) and added
//      to an f32 register total, so the tensor core's truncating accumulation only rounds at the
//      scale of one 16-long chunk.
//   3. nabla_sta_bits: the STA window as a bitmask [Nb, ceil(Nb/32)] u32 (bit l of word w of row i
//      = key block 32w + l allowed), built once per (grid, window).
//   4. nabla_threshold: ONE WARP PER ROW, the row in shared memory: softmax (f32, written back as
//      probabilities when asked), the CDF cut, STA union and the compact per-row list.
//
// The CDF rule (same as threshold.wgsl / reference::threshold_mask_ties): with F(v) = sum of the
// row's p <= v and cut = f32(1 - thr), keep j iff bits(p_j) >= lo where lo is the smallest bit
// pattern in [0, bits(pmax)] with F(lo) >= cut (bits(pmax) if none). Non-negative floats are
// ordered like their bit patterns, so ties are kept or dropped together, cut <= 0 keeps every
// block and the row maximum is always kept. lo is found in two levels instead of a 31-pass
// bisection over the whole row:
//   a. a 32-bucket histogram of the row mass by binade (bucket b = min(127 - exponent, 31), so
//      bucket 31 collects everything below 2^-30): each lane sums its own values into its own
//      shared-memory column (deterministic), lane b then sums bucket b, and a suffix scan over
//      the lanes gives F at every binade top. The cut falls in binade b* (the highest b whose
//      suffix mass reaches cut); Fbelow = mass of all smaller binades.
//   b. the values of binade b* are compacted into a candidate list; with <= 32 candidates each
//      lane evaluates F(x) = Fbelow + sum(candidates <= x) at its own candidate (32 shuffles) and
//      lo = the smallest candidate with F >= cut; with more, radix refinement (radix_search):
//      a 32-bucket histogram of the binade's mass by the next 5 bits of the bit pattern narrows
//      the range to one sub-range, whose values are compacted again, until <= 32 remain or the
//      sub-ranges are single values (<= 5 levels; 6 for the catch-all bucket). It replaced a
//      bisection over the binade (<= 23 passes over the candidates): threshold + lists 0.454 ->
//      0.385 ms at wan14b-720p, nabla-0.7, H200; counting each range's values before compacting
//      them (only <= 32 are ever compacted) -> 0.30-0.32 ms. A variant with the row in registers
//      (one kernel per row length class) measured no faster (0.36-0.43 ms) and was dropped.
// Entries of `indices` past a row's count are never written (unspecified).
// F is evaluated with another summation order than a single pass, so near-cut decisions can
// differ from the f64 reference within f32 rounding of the cumulative mass (the tests skip
// entries within 1e-5 of the cut, as for the wgpu kernels).


__device__ __forceinline__ float warp_sum(float v) {
    // xor butterfly: every lane ends with the bit-identical total
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}
__device__ __forceinline__ u32 lanemask_lt(u32 lane) {
    return (1u << lane) - 1u;
}

// ---------------------------------------------------------------------------------------------
// 1. pooling and the hi/lo split

// dtype codes: 0 = f32, 1 = f16, 2 = bf16
template <int DT>
__device__ __forceinline__ void acc16(float* a, uint4 v) {
    if constexpr (DT == 0) {
        a[0] += __uint_as_float(v.x);
        a[1] += __uint_as_float(v.y);
        a[2] += __uint_as_float(v.z);
        a[3] += __uint_as_float(v.w);
    } else {
        const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if constexpr (DT == 1) {
                a[2 * i] += f16_to_f32((u16)(w[i] & 0xffffu));
                a[2 * i + 1] += f16_to_f32((u16)(w[i] >> 16));
            } else {
                a[2 * i] += __uint_as_float(w[i] << 16);
                a[2 * i + 1] += __uint_as_float(w[i] & 0xffff0000u);
            }
        }
    }
}

// 2^k as a float, k in [-126, 127].
__device__ __forceinline__ float pow2i(int k) {
    return __int_as_float((k + 127) << 23);
}

// The split exponent k of a row with max |x| = mx: mx 2^k in [2^13, 2^14).
__device__ __forceinline__ int split_exp(float mx) {
    if (!(mx > 0.f)) return 0;
    const int e = (int)(__float_as_uint(mx) >> 23) - 127;  // floor(log2 mx) (-127: subnormal)
    return max(-120, min(120, 13 - e));
}

// Finishes one pooled row held as up to 4 values per thread (channel t = tid + 128 u): the
// block-wide max, the split into hi/lo f16 and inv = 2^-k. 128 threads, all must call it.
__device__ __forceinline__ void split_row(const float (&mv)[4], u32 D, size_t row, u16* __restrict__ hi,
                                          u16* __restrict__ lo, float* __restrict__ inv,
                                          float* red) {
    const u32 tid = threadIdx.x;
    float mx = 0.f;
#pragma unroll
    for (int u = 0; u < 4; ++u)
        if (tid + 128u * u < D) mx = fmaxf(mx, fabsf(mv[u]));
    mx = warp_max(mx);
    if ((tid & 31u) == 0) red[tid >> 5] = mx;
    __syncthreads();
    mx = fmaxf(fmaxf(red[0], red[1]), fmaxf(red[2], red[3]));
    const int k = split_exp(mx);
    const float sc = pow2i(k);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const u32 t = tid + 128u * u;
        if (t < D) {
            const float xs = mv[u] * sc;
            const u16 h = f32_to_f16(xs);
            const float r = xs - f16_to_f32(h);
            hi[row * D + t] = h;
            lo[row * D + t] = f32_to_f16(r);
        }
    }
    if (tid == 0) inv[row] = pow2i(-k);
}

// The end of a pooling CTA: part[g * D + t] holds group g's sum of channel t (G groups, `rows`
// rows in all, the caller's barrier passed); writes the mean row `orow` of out and, when hi is
// given, its split. 128 threads, all must call it.
__device__ __forceinline__ void finish_pool(const float* part, u32 G, u32 D, u32 rows, size_t orow,
                                            float* __restrict__ out, u16* __restrict__ hi,
                                            u16* __restrict__ lo, float* __restrict__ inv,
                                            float* red) {
    const u32 tid = threadIdx.x;
    float mv[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const u32 t = tid + 128u * u;
        mv[u] = 0.f;
        if (t < D) {
            float s = 0.f;
            for (u32 gg = 0; gg < G; ++gg) s += part[gg * D + t];
            mv[u] = s / (float)rows;
            out[orow * D + t] = mv[u];
        }
    }
    if (hi != nullptr) split_row(mv, D, orow, hi, lo, inv, red);  // uniform branch
}

// x [BH, S, D] (dtype DT) -> out [BH, Nb, D] f32, Nb = ceil(S / 64); hi, lo [BH, Nb, D] f16;
// inv [BH, Nb] f32 (hi == null: no split). Grid (Nb, BH), 128 threads. D * sizeof(elem) must be
// a multiple of 16 and D <= 512; x 16-byte aligned.
template <int DT>
__device__ __forceinline__ void pool_body(const unsigned char* __restrict__ x, float* __restrict__ out,
                                          u16* __restrict__ hi, u16* __restrict__ lo,
                                          float* __restrict__ inv, u32 S, u32 D, u32 nb) {
    constexpr u32 ES = DT == 0 ? 4u : 2u;  // bytes per element
    constexpr u32 E = 16u / ES;           // elements per 16-byte vector
    __shared__ float part[128 * E];
    __shared__ float red[4];
    const u32 tid = threadIdx.x;
    const u32 blk = blockIdx.x, bh = blockIdx.y;
    const u32 V = D / E;    // vectors per row
    const u32 G = 128u / V; // row groups (V <= 128)
    const u32 c = tid % V, g = tid / V;
    const u32 row0 = blk * 64u;
    const u32 rows = min(64u, S - row0);
    float a[E];
#pragma unroll
    for (u32 e = 0; e < E; ++e) a[e] = 0.f;
    if (g < G) {
        const uint4* p = reinterpret_cast<const uint4*>(x + ((size_t)bh * S + row0) * D * ES) + c;
#pragma unroll 8
        for (u32 r = g; r < rows; r += G) acc16<DT>(a, __ldg(p + (size_t)r * V));
#pragma unroll
        for (u32 e = 0; e < E; ++e) part[g * D + c * E + e] = a[e];
    }
    __syncthreads();
    finish_pool(part, G, D, rows, (size_t)bh * nb + blk, out, hi, lo, inv, red);
}

extern "C" __global__ void __launch_bounds__(128)
    nabla_pool_f32(const unsigned char* __restrict__ x, float* __restrict__ out, u16* __restrict__ hi,
                   u16* __restrict__ lo, float* __restrict__ inv, u32 S, u32 D, u32 nb) {
    pool_body<0>(x, out, hi, lo, inv, S, D, nb);
}
extern "C" __global__ void __launch_bounds__(128)
    nabla_pool_f16(const unsigned char* __restrict__ x, float* __restrict__ out, u16* __restrict__ hi,
                   u16* __restrict__ lo, float* __restrict__ inv, u32 S, u32 D, u32 nb) {
    pool_body<1>(x, out, hi, lo, inv, S, D, nb);
}
extern "C" __global__ void __launch_bounds__(128)
    nabla_pool_bf16(const unsigned char* __restrict__ x, float* __restrict__ out,
                    u16* __restrict__ hi, u16* __restrict__ lo, float* __restrict__ inv, u32 S,
                    u32 D, u32 nb) {
    pool_body<2>(x, out, hi, lo, inv, S, D, nb);
}

// RoPE + head split, optionally with the pooling, in one pass (the DiT's producer of the q / k
// heads; ops.rs's rope_split_heads launches the POOL = false form): x [S, H * D] f32 (not
// modified), cos / sin [S, D / 2] f32 ->
//   out [H, S, D] of storage DT: rope_rotate of each channel pair, rounded once (bit-identical
//       to ops.cu's rope_split_heads_any);
//   POOL: pooled [H, Nb, D] f32 = the mean of each 64-row block of the STORED (rounded) out
//       rows, as nabla_pool computes it from out, with the split hi, lo, inv (hi == null:
//       none); saves nabla_pool's second read of the heads (S % 64 == 0 then).
// D % 4 == 0, D <= 512; x, cos, sin and out aligned to their vector loads / stores. Grid
// (ceil(S / 64), H), 128 threads: thread t rotates channels 4c..4c+3 (c = t % V, V = D / 4) of
// rows g, g + G, ... of the block (g = t / V, G = 128 / V), loading 16 bytes of x and 8 of each
// table per row.
template <int DT, bool POOL>
__device__ __forceinline__ void rope_heads_body(const float* __restrict__ x,
                                                const float* __restrict__ cos_t,
                                                const float* __restrict__ sin_t, void* out,
                                                float* __restrict__ pooled, u16* __restrict__ hi,
                                                u16* __restrict__ lo, float* __restrict__ inv,
                                                u32 S, u32 H, u32 D) {
    __shared__ float part[POOL ? 512 : 1];  // G * D = (128 / V) * 4V <= 512
    __shared__ float red[4];
    const u32 tid = threadIdx.x, blk = blockIdx.x, h = blockIdx.y;
    const u32 V = D >> 2, G = 128u / V;
    const u32 c = tid % V, g = tid / V;
    const u32 half = D >> 1;
    const u32 rows = min(64u, S - blk * 64u);
    float a[4] = {0.f, 0.f, 0.f, 0.f};
    if (g < G) {
#pragma unroll 4
        for (u32 r = g; r < rows; r += G) {
            const size_t s = (size_t)blk * 64u + r;
            const float4 xv = __ldg(reinterpret_cast<const float4*>(x + (s * H + h) * D) + c);
            const float2 cv = __ldg(reinterpret_cast<const float2*>(cos_t + s * half) + c);
            const float2 sv = __ldg(reinterpret_cast<const float2*>(sin_t + s * half) + c);
            float y[4];
            rope_rotate(xv.x, xv.y, cv.x, sv.x, y[0], y[1]);
            rope_rotate(xv.z, xv.w, cv.y, sv.y, y[2], y[3]);
            const size_t o = ((size_t)h * S + s) * D + 4u * c;
            if constexpr (DT == 0) {
                *reinterpret_cast<float4*>((float*)out + o) = make_float4(y[0], y[1], y[2], y[3]);
            } else {
                u16 b[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    b[e] = DT == 1 ? f32_to_f16(y[e]) : f32_to_bf16(y[e]);
                    y[e] = DT == 1 ? f16_to_f32(b[e]) : bf16_to_f32(b[e]);  // pool what is stored
                }
                *reinterpret_cast<uint2*>((u16*)out + o) =
                    make_uint2((u32)b[0] | ((u32)b[1] << 16), (u32)b[2] | ((u32)b[3] << 16));
            }
            if constexpr (POOL) {
#pragma unroll
                for (int e = 0; e < 4; ++e) a[e] += y[e];
            }
        }
        if constexpr (POOL) {
#pragma unroll
            for (int e = 0; e < 4; ++e) part[g * D + 4u * c + e] = a[e];
        }
    }
    if constexpr (POOL) {
        __syncthreads();
        finish_pool(part, G, D, rows, (size_t)h * gridDim.x + blk, pooled, hi, lo, inv, red);
    }
}

#define ROPE_KERNELS(SUFFIX, DT)                                                                  \
    extern "C" __global__ void __launch_bounds__(128) nabla_rope_##SUFFIX(                        \
        const float* __restrict__ x, const float* __restrict__ cos_t,                            \
        const float* __restrict__ sin_t, void* out, u32 S, u32 H, u32 D) {                       \
        rope_heads_body<DT, false>(x, cos_t, sin_t, out, nullptr, nullptr, nullptr, nullptr, S, \
                                   H, D);                                                        \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(128) nabla_rope_pool_##SUFFIX(                   \
        const float* __restrict__ x, const float* __restrict__ cos_t,                            \
        const float* __restrict__ sin_t, void* out, float* __restrict__ pooled,                  \
        u16* __restrict__ hi, u16* __restrict__ lo, float* __restrict__ inv, u32 S, u32 H,       \
        u32 D) {                                                                                 \
        rope_heads_body<DT, true>(x, cos_t, sin_t, out, pooled, hi, lo, inv, S, H, D);           \
    }
ROPE_KERNELS(f32, 0)
ROPE_KERNELS(f16, 1)
ROPE_KERNELS(bf16, 2)

// Split already pooled rows: xa [BH, Nb, D] f32 -> hi, lo, inv. Grid (Nb, BH), 128 threads.
extern "C" __global__ void __launch_bounds__(128)
    nabla_split(const float* __restrict__ xa, u16* __restrict__ hi, u16* __restrict__ lo,
                float* __restrict__ inv, u32 D, u32 nb) {
    __shared__ float red[4];
    const size_t row = (size_t)blockIdx.y * nb + blockIdx.x;
    float mv[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const u32 t = threadIdx.x + 128u * u;
        mv[u] = t < D ? xa[row * D + t] : 0.f;
    }
    split_row(mv, D, row, hi, lo, inv, red);
}

// ---------------------------------------------------------------------------------------------
// 2. block scores on tensor cores
//
// One CTA = a 64 (query blocks) x 64 (key blocks) tile of one head, 4 warps as 2 x 2, each warp
// 32 x 32 = 2 m16 tiles x 4 n8 tiles. k (= D) is staged 64 at a time: four f16 arrays (q hi/lo,
// k hi/lo) of 64 rows x 64 halfs in shared memory (8 KB each, 32 KB), rows of 8 16-byte chunks
// with chunk c of row r stored at chunk (c ^ (r & 7)) so ldmatrix's 8 row reads hit 8 different
// bank groups. Columns >= D and rows >= Nb are zero-filled by cp.async.

__device__ __forceinline__ u32 swz64(u32 row, u32 chunk) {  // half index in a 64-half row tile
    return row * 64u + ((chunk ^ (row & 7u)) << 3);
}

extern "C" __global__ void __launch_bounds__(128)
    nabla_scores(const u16* __restrict__ qhi, const u16* __restrict__ qlo,
                 const u16* __restrict__ khi, const u16* __restrict__ klo,
                 const float* __restrict__ qinv, const float* __restrict__ kinv,
                 float* __restrict__ out, u32 nb, u32 D, float rsd) {
    __shared__ __align__(128) u16 sm[4][64 * 64];
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 bh = blockIdx.z, i0 = blockIdx.y * 64u, j0 = blockIdx.x * 64u;
    const u32 wr = warp >> 1, wc = warp & 1u;
    const u16* src[4] = {qhi, qlo, khi, klo};
    float acc[2][4][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

    for (u32 kc = 0; kc < D; kc += 64u) {
        // 4 arrays x 64 rows x 8 chunks = 2048 chunks, 16 per thread
#pragma unroll
        for (u32 it = 0; it < 16u; ++it) {
            const u32 arr = it >> 2;                  // 512 chunks per array
            const u32 rem = (it & 3u) * 128u + tid;   // chunk within the array
            const u32 row = rem >> 3, ch = rem & 7u;
            const u32 grow = (arr < 2u ? i0 : j0) + row;
            const u32 col = kc + ch * 8u;
            const bool ok = grow < nb && col < D;
            const u16* g = src[arr] + ((size_t)bh * nb + (ok ? grow : 0u)) * D + (ok ? col : 0u);
            cp_async16(&sm[arr][swz64(row, ch)], g, ok ? 16u : 0u);
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (u32 ks = 0; ks < 4u; ++ks) {
            u32 ahi[2][4], alo[2][4], bhi[2][4], blo[2][4];
#pragma unroll
            for (u32 mt = 0; mt < 2u; ++mt) {
                // A (16 x 16): lanes 0-15 rows 0-15 at k chunk 0, lanes 16-31 rows 0-15 at chunk 1
                const u32 r = wr * 32u + mt * 16u + (lane & 15u);
                const u32 c = ks * 2u + (lane >> 4);
                ldsm_x4(ahi[mt], &sm[0][swz64(r, c)]);
                ldsm_x4(alo[mt], &sm[1][swz64(r, c)]);
            }
#pragma unroll
            for (u32 np = 0; np < 2u; ++np) {
                // B for two n8 tiles: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
                // (n 8-15, k 8-15) -> b0, b1 of n tile 2np and b0, b1 of n tile 2np+1
                const u32 r = wc * 32u + np * 16u + (lane & 7u) + ((lane >> 4) << 3);
                const u32 c = ks * 2u + ((lane >> 3) & 1u);
                ldsm_x4(bhi[np], &sm[2][swz64(r, c)]);
                ldsm_x4(blo[np], &sm[3][swz64(r, c)]);
            }
#pragma unroll
            for (u32 mt = 0; mt < 2u; ++mt)
#pragma unroll
                for (u32 nt = 0; nt < 4u; ++nt) {
                    const u32 np = nt >> 1, h = (nt & 1u) * 2u;
                    float t[4] = {0.f, 0.f, 0.f, 0.f};
                    mma16816<1>(t, alo[mt], bhi[np][h], bhi[np][h + 1]);
                    mma16816<1>(t, ahi[mt], blo[np][h], blo[np][h + 1]);
                    mma16816<1>(t, ahi[mt], bhi[np][h], bhi[np][h + 1]);
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mt][nt][e] += t[e];
                }
        }
        __syncthreads();
    }

    // C fragment: c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, same cols)
    const u32 g = lane >> 2, tg = lane & 3u;
#pragma unroll
    for (u32 mt = 0; mt < 2u; ++mt)
#pragma unroll
        for (u32 hr = 0; hr < 2u; ++hr) {
            const u32 i = i0 + wr * 32u + mt * 16u + g + hr * 8u;
            if (i >= nb) continue;
            const float si = qinv[(size_t)bh * nb + i] * rsd;
            float* orow = out + ((size_t)bh * nb + i) * nb;
#pragma unroll
            for (u32 nt = 0; nt < 4u; ++nt)
#pragma unroll
                for (u32 e = 0; e < 2u; ++e) {
                    const u32 j = j0 + wc * 32u + nt * 8u + 2u * tg + e;
                    if (j < nb) orow[j] = acc[mt][nt][hr * 2u + e] * si * kinv[(size_t)bh * nb + j];
                }
        }
}

// The same logits with 128 x 128 tiles (the default; nabla_scores above stays for comparison,
// NABLA_CUDA_SCORES=64). nabla_scores is bound by its shared-memory fills from L2 (64 KB per
// 64 x 64 tile: 0.9 GB at wan14b-720p); a 128 x 128 tile halves the bytes per logit and a
// 3-stage cp.async ring overlaps them with the MMAs. 8 warps as 2 x 4, each 64 x 32 = 4 m16
// tiles x 4 n8 tiles; k staged 32 halfs at a time: per stage four f16 arrays (q hi/lo, k hi/lo)
// of 128 rows x 32 halfs (8 KB each, 32 KB; 96 KB for 3 stages, dynamic shared memory, 2 CTAs
// per SM), rows of 4 16-byte chunks with chunk c of row r stored at chunk c ^ ((r >> 1) & 3):
// the 8 rows an ldmatrix reads (two per 128-byte line) land in 8 different bank groups. Each
// k16 step is accumulated from zero and added to the f32 total, as in nabla_scores, in the same
// k16 order, so both kernels give the same logits bit for bit. Measured at wan14b-720p on the
// H200: 0.16-0.18 ms against nabla_scores' 0.20-0.22 (predicted -40 % for an L2-bound kernel:
// it is not only L2-bound). A variant keeping each CTA's q rows resident in shared memory while
// it walked 1-4 key tiles (q read once per row of tiles, the pipeline running across tiles) ran
// 0.17-0.20 ms, slower, and was dropped.
__device__ __forceinline__ u32 swz32(u32 row, u32 chunk) {  // half index in a 32-half row tile
    return row * 32u + ((chunk ^ ((row >> 1) & 3u)) << 3);
}

// One k16 step of a 128 x 128 score tile (8 warps as 2 x 4, each 64 x 32): B (k hi / lo) from a
// k-chunk stage of 128 rows x 32 halfs (swz32), A (q hi / lo) at the half index aidx(row, chunk)
// (chunk = the k16 step's 8-half chunk within the stage's 32 halfs). Each tile's three products
// are accumulated from zero and added to the f32 total (see nabla_scores).
template <class AIdx>
__device__ __forceinline__ void tile128_k16(float (&acc)[4][4][4], const u16* ahi_s,
                                            const u16* alo_s, AIdx aidx, const u16* bhi_s,
                                            const u16* blo_s, u32 ks) {
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 wr = warp >> 2, wc = warp & 3u;
    u32 bhi[2][4], blo[2][4];
#pragma unroll
    for (u32 np = 0; np < 2u; ++np) {
        // B for n tiles 2np, 2np+1 (as nabla_scores)
        const u32 r = wc * 32u + np * 16u + (lane & 7u) + ((lane >> 4) << 3);
        const u32 c = ks * 2u + ((lane >> 3) & 1u);
        ldsm_x4(bhi[np], bhi_s + swz32(r, c));
        ldsm_x4(blo[np], blo_s + swz32(r, c));
    }
#pragma unroll
    for (u32 mt = 0; mt < 4u; ++mt) {
        u32 ahi[4], alo[4];
        const u32 r = wr * 64u + mt * 16u + (lane & 15u);
        const u32 c = ks * 2u + (lane >> 4);
        ldsm_x4(ahi, ahi_s + aidx(r, c));
        ldsm_x4(alo, alo_s + aidx(r, c));
#pragma unroll
        for (u32 nt = 0; nt < 4u; ++nt) {
            const u32 np = nt >> 1, h = (nt & 1u) * 2u;
            float t[4] = {0.f, 0.f, 0.f, 0.f};
            mma16816<1>(t, alo, bhi[np][h], bhi[np][h + 1]);
            mma16816<1>(t, ahi, blo[np][h], blo[np][h + 1]);
            mma16816<1>(t, ahi, bhi[np][h], bhi[np][h + 1]);
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] += t[e];
        }
    }
}

// The logits of one 128 x 128 tile from the 8 warps' accumulators (warp (wr, wc) holds rows
// wr * 64 + 16 mt + {g, g + 8}, columns wc * 32 + 8 nt + 2 tg + {0, 1}), scaled by the rows' and
// columns' split factors and 1 / sqrt(D).
__device__ __forceinline__ void store_tile128(const float (&acc)[4][4][4],
                                              const float* __restrict__ qinv,
                                              const float* __restrict__ kinv,
                                              float* __restrict__ out, u32 nb, u32 bh, u32 i0,
                                              u32 j0, float rsd) {
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 wr = warp >> 2, wc = warp & 3u;
    // C fragment: c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, same cols); pairs of
    // adjacent logits are stored as one 8-byte write when the row start keeps them aligned
    const u32 g = lane >> 2, tg = lane & 3u;
    float kv[4][2];
#pragma unroll
    for (u32 nt = 0; nt < 4u; ++nt)
#pragma unroll
        for (u32 e = 0; e < 2u; ++e) {
            const u32 j = j0 + wc * 32u + nt * 8u + 2u * tg + e;
            kv[nt][e] = j < nb ? kinv[(size_t)bh * nb + j] : 0.f;
        }
#pragma unroll
    for (u32 mt = 0; mt < 4u; ++mt)
#pragma unroll
        for (u32 hr = 0; hr < 2u; ++hr) {
            const u32 i = i0 + wr * 64u + mt * 16u + g + hr * 8u;
            if (i >= nb) continue;
            const float si = qinv[(size_t)bh * nb + i] * rsd;
            float* orow = out + ((size_t)bh * nb + i) * nb;
#pragma unroll
            for (u32 nt = 0; nt < 4u; ++nt) {
                const u32 j = j0 + wc * 32u + nt * 8u + 2u * tg;
                const float v0 = acc[mt][nt][hr * 2u] * si * kv[nt][0];
                const float v1 = acc[mt][nt][hr * 2u + 1u] * si * kv[nt][1];
                if (j + 1u < nb && (nb & 1u) == 0u) {
                    *reinterpret_cast<float2*>(orow + j) = make_float2(v0, v1);
                } else {
                    if (j < nb) orow[j] = v0;
                    if (j + 1u < nb) orow[j + 1u] = v1;
                }
            }
        }
}

extern "C" __global__ void __launch_bounds__(256, 2)
    nabla_scores128(const u16* __restrict__ qhi, const u16* __restrict__ qlo,
                    const u16* __restrict__ khi, const u16* __restrict__ klo,
                    const float* __restrict__ qinv, const float* __restrict__ kinv,
                    float* __restrict__ out, u32 nb, u32 D, float rsd) {
    constexpr u32 ST = 3u, ARR = 128u * 32u, STAGE = 4u * ARR;  // halfs
    extern __shared__ __align__(128) u16 dsm[];
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 bh = blockIdx.z, i0 = blockIdx.y * 128u, j0 = blockIdx.x * 128u;
    const u32 wr = warp >> 2, wc = warp & 3u;
    const u16* src[4] = {qhi, qlo, khi, klo};
    const u32 nk = (D + 31u) >> 5;
    auto load = [&](u32 kc) {
        u16* st = dsm + (kc % ST) * STAGE;
#pragma unroll
        for (u32 it = 0; it < 8u; ++it) {
            // 2048 chunks: 4 arrays x 128 rows x 4; array it / 2 (a compile-time index: a
            // run-time one would put src[] in local memory)
            const u32 arr = it >> 1, rem = (it & 1u) * 256u + tid;
            const u32 row = rem >> 2, ch = rem & 3u;
            const u32 grow = (arr < 2u ? i0 : j0) + row;
            const u32 col = kc * 32u + ch * 8u;
            const bool ok = grow < nb && col < D;
            const u16* g = src[arr] + ((size_t)bh * nb + (ok ? grow : 0u)) * D + (ok ? col : 0u);
            cp_async16(st + arr * ARR + swz32(row, ch), g, ok ? 16u : 0u);
        }
    };
#pragma unroll
    for (u32 k = 0; k < ST - 1u; ++k) {
        if (k < nk) load(k);
        cp_async_commit();
    }
    float acc[4][4][4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

    for (u32 kc = 0; kc < nk; ++kc) {
        cp_async_wait<ST - 2>();
        __syncthreads();  // chunk kc landed for all; everyone is done with chunk kc - 1's stage
        if (kc + ST - 1u < nk) load(kc + ST - 1u);
        cp_async_commit();
        const u16* st = dsm + (kc % ST) * STAGE;
#pragma unroll
        for (u32 ks = 0; ks < 2u; ++ks)
            tile128_k16(acc, st, st + ARR, [](u32 r, u32 c) { return swz32(r, c); },
                        st + 2u * ARR, st + 3u * ARR, ks);
    }
    cp_async_wait<0>();

    store_tile128(acc, qinv, kinv, out, nb, bh, i0, j0, rsd);
}

// ---------------------------------------------------------------------------------------------
// 3. STA bitmask: out [Nb, W] u32, W = ceil(Nb / 32). One thread per word.

extern "C" __global__ void __launch_bounds__(256)
    nabla_sta_bits(u32* __restrict__ out, u32 nb, u32 W, u32 hb, u32 wb, u32 rt, u32 rh, u32 rw) {
    const u32 id = blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= nb * W) return;
    const u32 i = id / W, w = id % W;
    const u32 hw = hb * wb;
    const u32 ti = i / hw, yi = (i % hw) / wb, xi = i % wb;
    u32 bits = 0;
    for (u32 l = 0; l < 32u; ++l) {
        const u32 j = w * 32u + l;
        if (j >= nb) break;
        const u32 tj = j / hw, yj = (j % hw) / wb, xj = j % wb;
        const u32 dt = ti > tj ? ti - tj : tj - ti;
        const u32 dy = yi > yj ? yi - yj : yj - yi;
        const u32 dx = xi > xj ? xi - xj : xj - xi;
        if (dt <= rt && dy <= rh && dx <= rw) bits |= 1u << l;
    }
    out[id] = bits;
}

// ---------------------------------------------------------------------------------------------
// 4. softmax + CDF threshold + STA union + lists, one warp per row.
//
// logits [rows, Nb] f32 (rows = BH * Nb); probs (nullable; may be `logits`: a warp reads its whole
// row before writing it) receives the softmax; counts [rows],
// indices [rows, Nb]; sta (nullable) the bitmask of nabla_sta_bits. Dynamic shared memory per
// warp: the row (stride floats) and max(stride, 32 x 33) floats holding first the histogram, then
// the candidates. Block = 32 * warps threads; grid = ceil(rows / warps).

__device__ __forceinline__ u32 bucket_of(float p) {
    const int e = (int)(__float_as_uint(p) >> 23);
    return (u32)max(0, min(31, 127 - e));
}

// Compacts the row's values whose bit patterns lie in [lo, hi) into cand (ascending key order)
// and returns how many (the same count in every lane).
__device__ __forceinline__ u32 compact_range(const float* rowbuf, float* cand, u32 nb, u32 lane,
                                             u32 lo, u32 hi) {
    u32 n = 0;
    for (u32 j0 = 0; j0 < nb; j0 += 32u) {
        const u32 j = j0 + lane;
        float p = 0.f;
        bool c = false;
        if (j < nb) {
            p = rowbuf[j];
            const u32 b = __float_as_uint(p);
            c = b >= lo && b < hi;
        }
        const u32 bal = __ballot_sync(FULL_MASK, c);
        if (c) cand[n + __popc(bal & lanemask_lt(lane))] = p;
        n += __popc(bal);
    }
    __syncwarp();
    return n;
}

// With n <= 32 candidates (cand[0..n), all in the searched range, fb = the mass below it): the
// smallest candidate x with fb + sum(candidates <= x) >= cut, else z. F only steps at candidate
// values; each lane evaluates F at its own candidate, all lanes at once, the candidates <= x
// summed in lane order (a fixed order, so F is monotone in x).
__device__ __forceinline__ u32 direct_search(const float* cand, u32 n, u32 lane, float fb,
                                             float cut, u32 z) {
    const bool has = lane < n;
    const float x = has ? cand[lane] : 0.f;
    float f = 0.f;
#pragma unroll
    for (u32 l = 0; l < 32u; ++l) {
        const float y = __shfl_sync(FULL_MASK, x, l);
        f += (l < n && y <= x) ? y : 0.f;
    }
    u32 best = has && fb + f >= cut ? __float_as_uint(x) : z;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) best = min(best, __shfl_xor_sync(FULL_MASK, best, o));
    return best;
}

// Where the cut lies, from the binade histogram (per-lane columns hist[b * 33 + lane], filled):
// F at the top of each binade is a suffix scan of the binade masses over the lanes; the cut falls
// in binade bs (the highest bucket whose suffix mass reaches cut), searched over bit patterns
// [base, base + 2^wb) capped at hi (the row maximum's bits), fb = the mass of the smaller
// binades. done: the total mass stays below the cut, the answer is base = pmax (keep the
// maximum and its ties).
struct CutRange {
    u32 base, wb, hi;
    float fb;
    bool done;
};
__device__ __forceinline__ CutRange binade_range(const float* hist, u32 lane, float cut,
                                                 u32 pmax_bits) {
    float T = 0.f;  // mass of bucket `lane`
    for (u32 i = 0; i < 32u; ++i) T += hist[lane * 33u + i];
    // suffix sums: v = mass of buckets lane..31 = F at the top of binade `lane`
    float v = T;
#pragma unroll
    for (u32 off = 1; off < 32u; off <<= 1) {
        const float u = __shfl_down_sync(FULL_MASK, v, off);
        if (lane + off < 32u) v += u;
    }
    const u32 ball = __ballot_sync(FULL_MASK, v >= cut);
    if (ball == 0u) return CutRange{pmax_bits, 0u, pmax_bits, 0.f, true};
    const u32 bs = 31u - (u32)__clz(ball);
    float fb = __shfl_sync(FULL_MASK, v, min(bs + 1u, 31u));
    if (bs == 31u) fb = 0.f;
    // bucket 31 (everything below 2^-30): [0, 2^30) capped at 97 << 23
    const u32 hi = min(bs < 31u ? (128u - bs) << 23 : 97u << 23, pmax_bits);
    return CutRange{bs < 31u ? (127u - bs) << 23 : 0u, bs < 31u ? 23u : 30u, hi, fb, false};
}


// The cut inside binade bucket bs by radix refinement: the searched range [base, base + 2^wb)
// of bit patterns (first the binade: wb = 23; the catch-all bucket: [0, 2^30)), fb = the mass
// below it. Each level counts the range's values; with <= 32 they are compacted and the direct
// search ends it; otherwise a 32-bucket histogram of the range's mass by the next 5 bits
// (per-lane columns of `hist`, as the binade histogram: deterministic) and a scan over the lanes
// pick the sub-range where the cumulative mass reaches the cut, and the search descends into it
// (at most 5 levels; 6 for the catch-all). `end` caps every range at hi_b (the row maximum's
// bits): the answer when no value of the range qualifies. `hist` holds the histogram, then the
// candidates.
__device__ __forceinline__ u32 radix_search(const float* rowbuf, float* hist, u32 nb, u32 lane,
                                            u32 base, u32 wb, u32 hi_b, float fb, float cut) {
    for (;;) {
        const u32 end = min(base + (1u << wb), hi_b);
        // count first: only <= 32 candidates are ever compacted (a count pass has no ballot,
        // popcount or store per element)
        u32 cnt = 0;
        for (u32 j = lane; j < nb; j += 32u) {
            const u32 b = __float_as_uint(rowbuf[j]);
            cnt += (b >= base && b < end) ? 1u : 0u;
        }
        const u32 n = __reduce_add_sync(FULL_MASK, cnt);
        if (n <= 32u) {
            compact_range(rowbuf, hist, nb, lane, base, end);
            return direct_search(hist, n, lane, fb, cut, end);
        }
        if (wb == 0u) {  // every candidate is the value `base` (summed in row order)
            float f = 0.f;
            for (u32 j = lane; j < nb; j += 32u)
                if (__float_as_uint(rowbuf[j]) == base) f += rowbuf[j];
            f = warp_sum(f);
            return fb + f >= cut ? base : end;
        }
        const u32 sh = wb > 5u ? wb - 5u : 0u;
#pragma unroll
        for (u32 b = 0; b < 32u; ++b) hist[b * 33u + lane] = 0.f;  // the candidates are dead
        __syncwarp();
        for (u32 j = lane; j < nb; j += 32u) {
            const float p = rowbuf[j];
            const u32 u = __float_as_uint(p) - base;  // wraps for values below the range
            if (__float_as_uint(p) >= base && __float_as_uint(p) < end)
                hist[(u >> sh) * 33u + lane] += p;
        }
        __syncwarp();
        float t = 0.f;  // mass of sub-range `lane`
        for (u32 i = 0; i < 32u; ++i) t += hist[lane * 33u + i];
        float incl = t;  // inclusive prefix over the lanes: mass of sub-ranges 0..lane
#pragma unroll
        for (u32 off = 1; off < 32u; off <<= 1) {
            const float v = __shfl_up_sync(FULL_MASK, incl, off);
            if (lane >= off) incl += v;
        }
        const u32 ball = __ballot_sync(FULL_MASK, fb + incl >= cut);
        __syncwarp();  // every lane has read the histogram before the next compaction
        if (ball == 0u) return end;  // f32 rounding: the range's mass falls short of the cut
        const u32 bstar = (u32)(__ffs(ball) - 1);
        fb += __shfl_sync(FULL_MASK, incl - t, bstar);
        base += bstar << sh;
        wb = sh;
        if (sh == 0u) return base;  // sub-ranges of one value each: b* is the answer
    }
}

__device__ __forceinline__ void threshold_body(const float* logits, float* probs,
                                               u32* __restrict__ counts, u32* __restrict__ indices,
                                               const u32* __restrict__ sta, u32 rows, u32 nb,
                                               float cut, u32 stride) {
    extern __shared__ __align__(16) float tsm[];
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 nwarps = blockDim.x >> 5;
    const u32 r = blockIdx.x * nwarps + warp;
    if (r >= rows) return;  // whole warps only; no block-wide barrier in this kernel
    float* rowbuf = tsm + (size_t)warp * (stride + max(stride, 32u * 33u));
    float* hist = rowbuf + stride;  // the histogram, then (same memory) the candidates
    const u32 qi = r % nb;
    const size_t base = (size_t)r * nb;

    // softmax: max, exp, sum (every lane ends with the same totals)
    // the row is read TPB values per lane at a time, all loads issued before any is used (the
    // pass used to wait for one global load per 32 keys)
    constexpr u32 TPB = 12u;
    float m = -3.402823466e38f;
    for (u32 j0 = 0; j0 < nb; j0 += 32u * TPB) {
        float x[TPB];
#pragma unroll
        for (u32 u = 0; u < TPB; ++u) {
            const u32 j = j0 + 32u * u + lane;
            x[u] = j < nb ? logits[base + j] : -3.402823466e38f;
        }
#pragma unroll
        for (u32 u = 0; u < TPB; ++u) {
            const u32 j = j0 + 32u * u + lane;
            if (j < nb) rowbuf[j] = x[u];
            m = fmaxf(m, x[u]);
        }
    }
    m = warp_max(m);
    float s = 0.f;
    for (u32 j = lane; j < nb; j += 32u) {
        const float e = exp2f((rowbuf[j] - m) * 1.4426950408889634f);
        rowbuf[j] = e;
        s += e;
    }
    s = warp_sum(s);
    const float inv = 1.f / s;
    // the maximum has e = exp2(0) = 1 exactly, so pmax = inv
    const u32 pmax_bits = __float_as_uint(inv);

    // normalize, write probabilities, per-lane binade histogram (column `lane`)
#pragma unroll
    for (u32 b = 0; b < 32u; ++b) hist[b * 33u + lane] = 0.f;
    for (u32 j = lane; j < nb; j += 32u) {
        const float p = rowbuf[j] * inv;
        rowbuf[j] = p;
        if (probs) probs[base + j] = p;
        hist[bucket_of(p) * 33u + lane] += p;
    }
    __syncwarp();

    u32 lo = 0;  // keep j iff bits(p_j) >= lo
    if (cut > 0.f) {
        const CutRange cr = binade_range(hist, lane, cut, pmax_bits);
        __syncwarp();  // every lane has read the histogram: its memory takes the candidates
        lo = cr.done ? cr.base : radix_search(rowbuf, hist, nb, lane, cr.base, cr.wb, cr.hi, cr.fb, cut);
    }

    // keep flags (+ STA) and compaction in ascending key order
    const u32 W = (nb + 31u) >> 5;
    const u32* srow = sta ? sta + (size_t)qi * W : nullptr;
    u32 off = 0;
    for (u32 t0 = 0; t0 < W; t0 += 32u) {
        // lane l holds STA word t0 + l (one load per 32 words instead of one per word)
        const u32 myw = srow && t0 + lane < W ? srow[t0 + lane] : 0u;
        const u32 tn = min(32u, W - t0);
#pragma unroll 4
        for (u32 tt = 0; tt < tn; ++tt) {
            const u32 j = (t0 + tt) * 32u + lane;
            const u32 sw = __shfl_sync(FULL_MASK, myw, tt);
            const bool keep = j < nb && (__float_as_uint(rowbuf[j]) >= lo || ((sw >> lane) & 1u));
            const u32 bal = __ballot_sync(FULL_MASK, keep);
            if (keep) indices[base + off + __popc(bal & lanemask_lt(lane))] = j;
            off += __popc(bal);
        }
    }
    if (lane == 0) counts[r] = off;
}

extern "C" __global__ void __launch_bounds__(128)
    nabla_threshold(const float* logits, float* probs,  // may alias (in place): no __restrict__
                    u32* __restrict__ counts, u32* __restrict__ indices,
                    const u32* __restrict__ sta, u32 rows, u32 nb, float cut, u32 stride) {
    threshold_body(logits, probs, counts, indices, sta, rows, nb, cut, stride);
}
