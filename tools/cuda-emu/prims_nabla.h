inline float f16_to_f32(u16 h) { return h2f(h); }
inline u16 f32_to_f16(float f) { return f2h(f); }
inline void cp_async16(void* dst, const void* src, u32 b) { emu_cp_async16(dst, src, b); }
inline void cp_async_commit() { emu_cp_commit(); }
inline void cp_async_wait_all() { emu_cp_wait(0); }
inline void ldsm_x4(u32 (&r)[4], const void* p) { emu_ldsm_x4(r, p, false); }
inline void mma_f16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) { emu_mma(d, a, b0, b1, 1); }
