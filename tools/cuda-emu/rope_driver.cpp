// nabla.cu's RoPE + head split kernels (with and without the pooling) on the CPU, for
// test_rope.py: reads params.txt "S H D DT", x.bin [S, H*D] f32, cos.bin / sin.bin [S, D/2] f32;
// writes out.bin (rope+pool heads), out2.bin (rope-only heads), pooled.bin, hi.bin, lo.bin,
// inv.bin.
#include "emu.h"
#include "nabla_emu.cpp"
#include <string>
template <class T> static std::vector<T> rd(const std::string& p, size_t n) {
    std::vector<T> v(n + 8);
    FILE* f = fopen(p.c_str(), "rb"); if (!f) { perror(p.c_str()); exit(1); }
    if (fread(v.data(), sizeof(T), n, f) != n) { fprintf(stderr, "short %s\n", p.c_str()); exit(1); }
    fclose(f); return v;
}
template <class T> static void wr(const std::string& p, const T* v, size_t n) {
    FILE* f = fopen(p.c_str(), "wb"); fwrite(v, sizeof(T), n, f); fclose(f);
}
int main(int argc, char** argv) {
    std::string d = argv[1];
    unsigned S, H, D, DT;
    FILE* f = fopen((d + "/params.txt").c_str(), "r");
    if (fscanf(f, "%u %u %u %u", &S, &H, &D, &DT) != 4) return 1;
    fclose(f);
    const size_t n = (size_t)S * H * D, nb = S / 64, es = DT == 0 ? 4 : 2;
    auto x = rd<float>(d + "/x.bin", n);
    auto c = rd<float>(d + "/cos.bin", (size_t)S * D / 2), s = rd<float>(d + "/sin.bin", (size_t)S * D / 2);
    std::vector<unsigned char> out(n * es + 16, 0xff), out2(n * es + 16, 0xff);
    std::vector<float> pooled(H * nb * D, NAN), inv(H * nb, NAN);
    std::vector<u16> hi(H * nb * D, 0x7e00), lo(H * nb * D, 0x7e00);
    launch(dim3{(unsigned)nb, H, 1}, dim3{128, 1, 1}, [&] {
        if (DT == 0) nabla_rope_pool_f32(x.data(), c.data(), s.data(), out.data(), pooled.data(), hi.data(), lo.data(), inv.data(), S, H, D);
        else if (DT == 1) nabla_rope_pool_f16(x.data(), c.data(), s.data(), out.data(), pooled.data(), hi.data(), lo.data(), inv.data(), S, H, D);
        else nabla_rope_pool_bf16(x.data(), c.data(), s.data(), out.data(), pooled.data(), hi.data(), lo.data(), inv.data(), S, H, D);
    });
    launch(dim3{(unsigned)nb, H, 1}, dim3{128, 1, 1}, [&] {
        if (DT == 0) nabla_rope_f32(x.data(), c.data(), s.data(), out2.data(), S, H, D);
        else if (DT == 1) nabla_rope_f16(x.data(), c.data(), s.data(), out2.data(), S, H, D);
        else nabla_rope_bf16(x.data(), c.data(), s.data(), out2.data(), S, H, D);
    });
    wr(d + "/out.bin", out.data(), n * es); wr(d + "/out2.bin", out2.data(), n * es);
    wr(d + "/pooled.bin", pooled.data(), pooled.size()); wr(d + "/inv.bin", inv.data(), inv.size());
    wr(d + "/hi.bin", hi.data(), hi.size()); wr(d + "/lo.bin", lo.data(), lo.size());
    return 0;
}
