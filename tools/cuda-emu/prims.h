// shared-memory "addresses": offsets into the emulator's smem_raw (the kernels only use them
// for descriptors and alignment)
inline u32 smem_u32(const void* p) { return (u32)((const unsigned char*)p - smem_raw); }
inline float f16_to_f32(u16 h) { return h2f(h); }
inline u16 f32_to_f16(float f) { return f2h(f); }
inline void cp_async16(void* dst, const void* src, u32 b) { emu_cp_async16(dst, src, b); }
inline void cp_async_commit() { emu_cp_commit(); }
template <int N> inline void cp_async_wait() { emu_cp_wait(N); }
inline void ldsm_x4(u32 (&r)[4], const void* p) { emu_ldsm_x4(r, p, false); }
inline void ldsm_x4_trans(u32 (&r)[4], const void* p) { emu_ldsm_x4(r, p, true); }
template <int DT> inline void mma16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) { emu_mma(d, a, b0, b1, DT); }
template <int DT> inline u32 pack2(float lo, float hi) {
    if constexpr (DT == 1) return (u32)f2h(lo) | ((u32)f2h(hi) << 16);
    else return (u32)f2bf(lo) | ((u32)f2bf(hi) << 16);
}
inline float ex2(float x) { return exp2f(x); }
