// Plain epilogue of the linear kernels: y[i] = act(v), v = x·Wᵀ + b of output i.
fn write_out(i: u32, col: u32, v: f32) {
    y[i] = activate(v);
}
