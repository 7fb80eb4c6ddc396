// CPU emulation of attention_sm90a.cu's <tma-primitives> section: tensor-map tile copies
// (cp.async.bulk.tensor.3d with the 128-byte swizzle, zeros outside the tensor) completing on
// mbarriers with arrival and transaction counts, from their PTX ISA definitions. A copy lands
// only when a thread waits on its barrier (the latest legal moment), so a read of a tile
// before its barrier's wait sees stale shared memory; a wait on a phase that was never armed
// spins forever (the hang it would be on the GPU).
#include <map>
#include <mutex>

// The emulator's tensor map (the real one is opaque): base, dims (D, S, B*H), byte strides of
// dims 1 and 2, element size, box dims.
struct TmaMap {
    u64 v[16];
};
inline TmaMap emu_tma_map(const void* base, u64 d0, u64 d1, u64 d2, u64 box0, u64 box1) {
    TmaMap m{};
    m.v[0] = (u64)(uintptr_t)base;
    m.v[1] = d0; m.v[2] = d1; m.v[3] = d2;
    m.v[4] = d0 * 2; m.v[5] = d0 * d1 * 2;  // 16-bit elements, packed
    m.v[6] = 2; m.v[7] = box0; m.v[8] = box1;
    return m;
}

struct EmuCopy { u32 dst; TmaMap map; u32 c0, c1, c2; };
struct EmuBar { u32 count = 0, pending = 0, phase = 0; long long tx = 0; std::vector<EmuCopy> copies; };
inline std::mutex emu_bar_mu;
inline std::map<u32, EmuBar> emu_bars;

inline void emu_tma_exec(const EmuCopy& c) {
    const TmaMap& m = c.map;
    const unsigned char* base = (const unsigned char*)(uintptr_t)m.v[0];
    if (c.dst % 1024u) { std::fprintf(stderr, "tma: a 128-byte-swizzle box must start 1024-byte aligned\n"); std::abort(); }
    if (m.v[7] * m.v[6] != 128) { std::fprintf(stderr, "tma: the 128-byte swizzle needs 128-byte box rows\n"); std::abort(); }
    for (u32 r = 0; r < m.v[8]; ++r)
        for (u32 e = 0; e < m.v[7]; ++e) {
            u32 addr = c.dst + r * 128u + e * 2u;
            addr ^= ((addr >> 7) & 7u) << 4;  // bits 4-6 ^= bits 7-9
            if (addr + 2 > sizeof(smem_raw)) { std::fprintf(stderr, "tma: box past shared memory\n"); std::abort(); }
            uint16_t h = 0;
            const u64 x = c.c0 + e, y = c.c1 + r, z = c.c2;
            if (x < m.v[1] && y < m.v[2] && z < m.v[3])
                std::memcpy(&h, base + z * m.v[5] + y * m.v[4] + x * 2, 2);
            std::memcpy(smem_raw + addr, &h, 2);
        }
}
inline EmuBar& emu_bar(u32 bar) {
    auto it = emu_bars.find(bar);
    if (it == emu_bars.end()) { std::fprintf(stderr, "mbarrier at %u used before init\n", bar); std::abort(); }
    return it->second;
}
inline void mbar_init(u32 bar, u32 count) {
    std::lock_guard<std::mutex> g(emu_bar_mu);
    if (bar % 8u) { std::fprintf(stderr, "mbarrier misaligned\n"); std::abort(); }
    emu_bars[bar] = EmuBar{count, count, 0, 0, {}};
}
inline void mbar_init_fence() {}
template <u32 N> inline void setmaxnreg_dec() {}
template <u32 N> inline void setmaxnreg_inc() {}
// the phase completes at its last arrival once no transaction bytes are outstanding (copies
// land at a wait, so a barrier with copies completes there)
inline void emu_bar_try_complete(EmuBar& b) {
    if (b.pending == 0 && b.tx == 0 && b.copies.empty()) {
        b.phase ^= 1u;
        b.pending = b.count;
    }
}
inline void emu_bar_arrive(u32 bar, u32 bytes) {
    std::lock_guard<std::mutex> g(emu_bar_mu);
    EmuBar& b = emu_bar(bar);
    if (b.pending == 0) { std::fprintf(stderr, "mbarrier: more arrivals than its count\n"); std::abort(); }
    b.tx += bytes;
    b.pending -= 1;
    emu_bar_try_complete(b);
}
inline void mbar_arrive_expect_tx(u32 bar, u32 bytes) { emu_bar_arrive(bar, bytes); }
inline void mbar_arrive(u32 bar) { emu_bar_arrive(bar, 0); }

// named barriers: `count` threads arrive (bar.arrive) or arrive and wait (bar.sync)
#include <condition_variable>
struct EmuNamedBar { u32 arrived = 0; u64 gen = 0; };
inline std::mutex emu_nb_mu;
inline std::condition_variable emu_nb_cv;
inline EmuNamedBar emu_nb[16];
inline u64 emu_nb_arrive(u32 id, u32 count) {  // returns the generation arrived in
    if (id == 0 || id > 15) { std::fprintf(stderr, "named barrier %u: use 1..15\n", id); std::abort(); }
    EmuNamedBar& b = emu_nb[id];
    const u64 gen = b.gen;
    if (++b.arrived == count) { b.arrived = 0; b.gen++; emu_nb_cv.notify_all(); }
    return gen;
}
inline void bar_arrive_n(u32 id, u32 count) {
    std::lock_guard<std::mutex> g(emu_nb_mu);
    emu_nb_arrive(id, count);
}
inline void bar_sync_n(u32 id, u32 count) {
    std::unique_lock<std::mutex> g(emu_nb_mu);
    const u64 gen = emu_nb_arrive(id, count);
    emu_nb_cv.wait(g, [&] { return emu_nb[id].gen != gen; });
}
inline void tma_load_3d(u32 dst, const TmaMap& map, u32 bar, u32 c0, u32 c1, u32 c2) {
    std::lock_guard<std::mutex> g(emu_bar_mu);
    emu_bar(bar).copies.push_back({dst, map, c0, c1, c2});
}
inline void mbar_wait(u32 bar, u32 parity) {
    for (;;) {
        {
            std::lock_guard<std::mutex> g(emu_bar_mu);
            EmuBar& b = emu_bar(bar);
            if (b.pending == 0 && !b.copies.empty()) {  // the phase is armed: its copies land
                for (const EmuCopy& c : b.copies) {
                    emu_tma_exec(c);
                    b.tx -= (long long)(c.map.v[7] * c.map.v[8] * c.map.v[6]);
                }
                b.copies.clear();
            }
            emu_bar_try_complete(b);
            if (b.tx < 0) { std::fprintf(stderr, "mbarrier: more bytes landed than expected\n"); std::abort(); }
            if ((b.phase & 1u) != (parity & 1u)) return;  // the phase of this parity completed
        }
        std::this_thread::yield();
    }
}
