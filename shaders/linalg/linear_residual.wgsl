// Gated-residual epilogue of the linear kernels (the Wan DiT's x += gate ⊙ (o·Wᵀ + b)):
//   y[i] = residual_in(i) + v * gate[P.gate_off + col]   (P.has_gate != 0)
//   y[i] = residual_in(i) + v                            (no gate)
// with v = x·Wᵀ + b of output i (column col) and no activation (ACT is 0). The prelude
// (src/ops/linear.rs) defines `residual_in`: y[i] itself for the in-place form (the residual
// stream bound once, read_write, and each element read then written by the same invocation, so
// no other invocation touches it), or res[i] from a separate read-only binding 6.
// Rounding is that of the unfused pair linear → elementwise_residual.wgsl: v is the same f32 the
// linear kernel would store (in the bf16-autocast mode rounded to bf16 by `pre_act`: the
// reference's Linear output is bf16), then r + v * g in f32 (the same expression; a compiler may
// contract it into an fma in either kernel).

@group(0) @binding(5) var<storage, read> gate: array<f32>;

fn write_out(i: u32, col: u32, v: f32) {
    let r = residual_in(i);
    if (P.has_gate != 0u) {
        y[i] = r + v * gate[P.gate_off + col];
    } else {
        y[i] = r + v;
    }
}
