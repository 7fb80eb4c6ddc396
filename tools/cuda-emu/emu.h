// CPU emulation of the CUDA execution model for testing kernels without a GPU.
// One OS thread per CUDA thread, one CTA at a time; std::barrier for __syncthreads and for
// warp-synchronous collectives (shuffles, ballots, ldmatrix, mma) with an exchange buffer.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

using std::max;
using std::min;

struct uint4 { unsigned x, y, z, w; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };

inline dim3 blockDim, gridDim;
inline thread_local dim3 threadIdx, blockIdx;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))

alignas(128) inline unsigned char smem_raw[256 * 1024];
alignas(128) inline float tsm[64 * 1024];
alignas(128) inline unsigned short dsm[64 * 1024];

struct Emu {
    std::unique_ptr<std::barrier<>> block;
    std::unique_ptr<std::barrier<>> warp[32];
    uint64_t xch[32][32][8];
};
inline Emu emu;

inline unsigned lane_id() { return threadIdx.x & 31; }
inline unsigned warp_id() { return threadIdx.x >> 5; }
inline void __syncthreads() { emu.block->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu.warp[warp_id()]->arrive_and_wait(); }

template <class T> inline uint64_t tobits(T v) { uint64_t b = 0; std::memcpy(&b, &v, sizeof(T)); return b; }
template <class T> inline T frombits(uint64_t b) { T v; std::memcpy(&v, &b, sizeof(T)); return v; }

template <class T> inline T shfl_from(T v, int (*src)(int, int), int arg) {
    unsigned w = warp_id(), l = lane_id();
    emu.xch[w][l][0] = tobits(v);
    __syncwarp();
    int s = src((int)l, arg);
    T r = (s < 0 || s > 31) ? v : frombits<T>(emu.xch[w][s][0]);
    __syncwarp();
    return r;
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int m) {
    return shfl_from<T>(v, [](int l, int a) { return l ^ a; }, m);
}
template <class T> inline T __shfl_down_sync(unsigned, T v, unsigned o) {
    return shfl_from<T>(v, [](int l, int a) { return l + a; }, (int)o);
}
template <class T> inline T __shfl_up_sync(unsigned, T v, unsigned o) {
    return shfl_from<T>(v, [](int l, int a) { return l - a; }, (int)o);
}
template <class T> inline T __shfl_sync(unsigned, T v, int s) {
    return shfl_from<T>(v, [](int, int a) { return a; }, s);
}
inline unsigned __ballot_sync(unsigned, int pred) {
    unsigned w = warp_id(), l = lane_id();
    emu.xch[w][l][0] = pred ? 1 : 0;
    __syncwarp();
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= (unsigned)emu.xch[w][i][0] << i;
    __syncwarp();
    return r;
}
inline bool __any_sync(unsigned m, int p) { return __ballot_sync(m, p) != 0; }
inline unsigned __reduce_add_sync(unsigned, unsigned v) {
    unsigned w = warp_id(), l = lane_id();
    emu.xch[w][l][0] = v;
    __syncwarp();
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r += (unsigned)emu.xch[w][i][0];
    __syncwarp();
    return r;
}

inline unsigned __float_as_uint(float f) { return frombits<unsigned>(tobits(f)); }
inline float __uint_as_float(unsigned u) { return frombits<float>(tobits(u)); }
inline float __int_as_float(int u) { return frombits<float>(tobits(u)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
template <class T> inline T __ldg(const T* p) { return *p; }
// correctly rounded f32 arithmetic (no contraction: -ffp-contract=off in run.sh)
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint2 { unsigned x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

// --- PTX primitive emulation -------------------------------------------------------------
inline float h2f(uint16_t h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline uint16_t f2h(float f) { _Float16 x = (_Float16)f; uint16_t h; std::memcpy(&h, &x, 2); return h; }
inline float bf2f(uint16_t h) { return __uint_as_float((unsigned)h << 16); }
inline uint16_t f2bf(float f) {
    unsigned b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    b += 0x7fffu + ((b >> 16) & 1u);
    return (uint16_t)(b >> 16);
}

struct CpCopy { void* dst; const void* src; unsigned bytes; };
inline thread_local std::vector<CpCopy> cp_cur;
inline thread_local std::vector<std::vector<CpCopy>> cp_groups;
inline void cp_exec(const std::vector<CpCopy>& g) {
    for (auto& c : g) {
        std::memset(c.dst, 0, 16);
        if (c.bytes) std::memcpy(c.dst, c.src, c.bytes);
    }
}
inline void emu_cp_async16(void* dst, const void* src, unsigned bytes) {
    if ((uintptr_t)dst % 16 || (uintptr_t)src % 16) { std::fprintf(stderr, "cp.async misaligned\n"); std::abort(); }
    cp_cur.push_back({dst, src, bytes});
}
inline void emu_cp_commit() { cp_groups.push_back(std::move(cp_cur)); cp_cur.clear(); }
inline void emu_cp_wait(size_t n) {
    // deferred completion: a group lands only when waited for (the latest legal moment)
    while (cp_groups.size() > n) { cp_exec(cp_groups.front()); cp_groups.erase(cp_groups.begin()); }
}
inline void emu_cp_flush() { emu_cp_wait(0); cp_exec(cp_cur); cp_cur.clear(); }

// ldmatrix .x4: lanes 8m..8m+7 give row addresses of matrix m.
inline void emu_ldsm_x4(unsigned (&r)[4], const void* p, bool trans) {
    unsigned w = warp_id(), l = lane_id();
    if ((uintptr_t)p % 16) { std::fprintf(stderr, "ldmatrix row misaligned\n"); std::abort(); }
    emu.xch[w][l][0] = (uint64_t)(uintptr_t)p;
    __syncwarp();
    unsigned g = l >> 2, t = l & 3;
    for (int m = 0; m < 4; ++m) {
        uint16_t e0, e1;
        if (!trans) {
            const uint16_t* row = (const uint16_t*)(uintptr_t)emu.xch[w][m * 8 + g][0];
            e0 = row[2 * t];
            e1 = row[2 * t + 1];
        } else {
            const uint16_t* r0 = (const uint16_t*)(uintptr_t)emu.xch[w][m * 8 + 2 * t][0];
            const uint16_t* r1 = (const uint16_t*)(uintptr_t)emu.xch[w][m * 8 + 2 * t + 1][0];
            e0 = r0[g];
            e1 = r1[g];
        }
        r[m] = (unsigned)e0 | ((unsigned)e1 << 16);
    }
    __syncwarp();
}

// mma.m16n8k16 row.col f32 += {f16|bf16}
inline void emu_mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1, int dt) {
    unsigned w = warp_id(), l = lane_id();
    uint64_t* x = emu.xch[w][l];
    for (int i = 0; i < 4; ++i) x[i] = a[i];
    x[4] = b0; x[5] = b1;
    for (int i = 0; i < 4; ++i) x[6 + i / 2] = 0;
    std::memcpy(&x[6], d, 16);
    __syncwarp();
    auto cv = [dt](unsigned v, int hi) { uint16_t h = hi ? (uint16_t)(v >> 16) : (uint16_t)(v & 0xffff); return dt == 1 ? h2f(h) : bf2f(h); };
    double A[16][16], B[16][8];
    for (int L = 0; L < 32; ++L) {
        int g = L >> 2, t = L & 3;
        uint64_t* y = emu.xch[w][L];
        for (int e = 0; e < 2; ++e) {
            A[g][2 * t + e] = cv((unsigned)y[0], e);
            A[g + 8][2 * t + e] = cv((unsigned)y[1], e);
            A[g][2 * t + 8 + e] = cv((unsigned)y[2], e);
            A[g + 8][2 * t + 8 + e] = cv((unsigned)y[3], e);
            B[2 * t + e][g] = cv((unsigned)y[4], e);
            B[2 * t + 8 + e][g] = cv((unsigned)y[5], e);
        }
    }
    unsigned g = l >> 2, t = l & 3;
    int rows[4] = {(int)g, (int)g, (int)g + 8, (int)g + 8};
    int cols[4] = {(int)(2 * t), (int)(2 * t + 1), (int)(2 * t), (int)(2 * t + 1)};
    float out[4];
    for (int i = 0; i < 4; ++i) {
        double s = d[i];
        for (int k = 0; k < 16; ++k) s += A[rows[i]][k] * B[k][cols[i]];
        out[i] = (float)s;
    }
    __syncwarp();
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// --- launching ---------------------------------------------------------------------------
inline void launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = block;
    unsigned nt = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                emu.block = std::make_unique<std::barrier<>>(nt);
                for (unsigned w = 0; w < (nt + 31) / 32; ++w)
                    emu.warp[w] = std::make_unique<std::barrier<>>(std::min(32u, nt - w * 32));
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < nt; ++t)
                    ts.emplace_back([&, t, bx, by, bz] {
                        threadIdx = dim3{t, 0, 0};
                        blockIdx = dim3{bx, by, bz};
                        cp_cur.clear();
                        cp_groups.clear();
                        kernel();
                        emu_cp_flush();
                        emu.warp[t >> 5]->arrive_and_drop();
                        emu.block->arrive_and_drop();
                    });
                for (auto& th : ts) th.join();
            }
}
