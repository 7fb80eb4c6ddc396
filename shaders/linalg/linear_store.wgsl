// Plain epilogue of the linear kernels: y[i] = act(v), v = x·Wᵀ + b of output i (already
// rounded to bf16 in the bf16-autocast mode, `pre_act`); there the activation's output is rounded
// to bf16 too (the bf16 output of an autocast Linear + GELU / SiLU; without an activation v is it).
// With f16 storage (YE = f16: the FFN / text hidden, which only feed another GEMM) the f32 value
// is rounded once to f16 as it is stored.
fn write_out(i: u32, col: u32, v: f32) {
    var a = activate(v);
    if (ACT != 0u && RB16 != 0u) {
        a = bf16r(a);
    }
    y[i] = YE(a);
}
