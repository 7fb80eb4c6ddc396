// CPU emulation of attention_sm90a.cu's <wgmma-primitives> section (warpgroup MMA from their PTX
// ISA definitions). A wgmma runs synchronously when issued, so commit / wait / the fences are
// no-ops: the emulation checks descriptors, the 128-byte swizzle and the fragment layouts, not
// the asynchrony (a read of an accumulator before its wait is not caught here).

// Shared-memory matrix descriptor -> element: start address (bits 0-13, >> 4), leading byte
// offset (16-29), stride byte offset (32-45), 128-byte swizzle (mode 1, bits 62-63; the only
// mode the kernel uses): the 16-byte chunk bits 4-6 of an address are XORed with its bits 7-9.
inline uint16_t wg_elem(u64 desc, u32 off) {
    if ((desc >> 62) != 1u) { std::fprintf(stderr, "wgmma: only the 128-byte swizzle is emulated\n"); std::abort(); }
    u32 addr = (u32)((desc & 0x3FFFu) << 4) + off;
    addr ^= ((addr >> 7) & 7u) << 4;
    if (addr + 2 > sizeof(smem_raw)) { std::fprintf(stderr, "wgmma: address out of shared memory\n"); std::abort(); }
    uint16_t h;
    std::memcpy(&h, smem_raw + addr, 2);
    return h;
}
inline u32 wg_lbo(u64 desc) { return (u32)((desc >> 16) & 0x3FFFu) << 4; }
inline u32 wg_sbo(u64 desc) { return (u32)((desc >> 32) & 0x3FFFu) << 4; }
// K-major: row r (the M or N index) of 128-byte rows in 8-row groups SBO apart, element k of the
// 16-element k step.
inline uint16_t wg_kmajor(u64 desc, u32 r, u32 k) {
    return wg_elem(desc, (r / 8u) * wg_sbo(desc) + (r % 8u) * 128u + k * 2u);
}
// MN-major: element n of 64-element rows (64-element blocks LBO apart), k rows 128 bytes apart
// in 8-row groups SBO apart.
inline uint16_t wg_mnmajor(u64 desc, u32 k, u32 n) {
    return wg_elem(desc, (n / 64u) * wg_lbo(desc) + (k / 8u) * wg_sbo(desc) + (k % 8u) * 128u + (n % 64u) * 2u);
}

// D[64 x N] (scale_d ? D : 0) + A[64 x 16] B[16 x N]; this thread's accumulators d[4t + e] are
// row 16 w + g + 8 (e >> 1), column 8t + 2 tg + (e & 1) of warp w (the mma C layout per warp).
// A: from registers (`a`, the mma A fragment of the warp's 16 rows) or K-major in shared memory
// (`da`); B: K-major (tb = false) or MN-major (tb = true) in shared memory.
template <int DT, int N>
inline void wg_mma(float* d, const u32* a, u64 da, u64 db, bool tb, u32 scale_d) {
    unsigned w = warp_id(), l = lane_id();
    auto cv = [](uint16_t h) { return DT == 1 ? (double)h2f(h) : (double)bf2f(h); };
    double A[16][16];
    if (a != nullptr) {
        for (int i = 0; i < 4; ++i) emu.xch[w][l][i] = a[i];
        __syncwarp();
        for (int L = 0; L < 32; ++L) {
            int g = L >> 2, t = L & 3;
            for (int e = 0; e < 2; ++e) {
                auto h = [&](int reg) { return (uint16_t)((unsigned)emu.xch[w][L][reg] >> (16 * e)); };
                A[g][2 * t + e] = cv(h(0));
                A[g + 8][2 * t + e] = cv(h(1));
                A[g][2 * t + 8 + e] = cv(h(2));
                A[g + 8][2 * t + 8 + e] = cv(h(3));
            }
        }
        __syncwarp();
    } else {
        for (u32 r = 0; r < 16; ++r)
            for (u32 k = 0; k < 16; ++k) A[r][k] = cv(wg_kmajor(da, 16u * (w % 4u) + r, k));
    }
    unsigned g = l >> 2, tg = l & 3;
    for (int t = 0; t < N / 8; ++t)
        for (int e = 0; e < 4; ++e) {
            u32 r = g + 8u * (e >> 1), col = 8u * t + 2u * tg + (e & 1u);
            double s = scale_d ? d[4 * t + e] : 0.0;
            for (u32 k = 0; k < 16; ++k)
                s += A[r][k] * cv(tb ? wg_mnmajor(db, k, col) : wg_kmajor(db, col, k));
            d[4 * t + e] = (float)s;
        }
}

template <int DT> inline void wgmma_ss_n64(float (&d)[32], u64 da, u64 db, u32 scale_d) {
    wg_mma<DT, 64>(d, nullptr, da, db, false, scale_d);
}
template <int DT> inline void wgmma_ss_n128(float (&d)[64], u64 da, u64 db, u32 scale_d) {
    wg_mma<DT, 128>(d, nullptr, da, db, false, scale_d);
}
template <int DT> inline void wgmma_rs_n64_t(float (&d)[32], const u32 (&a)[4], u64 db) {
    wg_mma<DT, 64>(d, a, 0, db, true, 1u);
}
template <int DT> inline void wgmma_rs_n128_t(float (&d)[64], const u32 (&a)[4], u64 db) {
    wg_mma<DT, 128>(d, a, 0, db, true, 1u);
}
inline void wgmma_fence() {}
inline void wgmma_commit() {}
template <int N> inline void wgmma_wait() {}
template <int N> inline void fence_regs(float (&)[N]) {}
inline void fence_proxy_async() {}
