// The W binding of linear_loads_vec8.wgsl for f16 weights: eight of them per 16-byte
// mat2x4<f16>, staged as stored. Decoded to f32 first (as the other forms do, with integer
// code), the tensor-core kernel ran at 68.8 TFLOP/s at 4096^3 on the H200; staged as stored,
// 156 (bf16 weights: 166; benches/RESULTS.md session 12). Same values: an f16 is exact in f32.

@group(0) @binding(2) var<storage, read> w: array<mat2x4<f16>>;

// w[row, k..k+8] in f16, zeros past N or K.
fn load_w8(row: u32, k: u32) -> mat2x4<f16> {
    if (row >= P.n || k >= P.k) {
        return mat2x4<f16>();
    }
    return w[(row * P.k + k) / 8u];
}
