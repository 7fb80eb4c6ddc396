// The x binding with 16-byte loads for the tensor-core kernel, for K a multiple of 8 (the
// dispatcher checks): eight x values per load (one 16-byte mat2x4<f16>, or two 16-byte halves of
// a mat2x4<f32>). naga 30 has no bitcast from u32 words to f16 vectors, but a mat2x4<f16>
// element is one aligned 16-byte span, which the driver loads at once. The W binding comes from
// linear_loads_w8_words.wgsl (f32 / bf16 weights) or linear_loads_w8_f16.wgsl (f16 weights).
// Same contract as linear_loads_pair.wgsl: `load_x8`, `load_w8`, zeros past M, N or K.

@group(0) @binding(1) var<storage, read> x: array<mat2x4<XE>>;

// x[row, k..k+8] in its storage type (columns: k..k+4 and k+4..k+8), zeros past M or K.
fn load_x8(row: u32, k: u32) -> mat2x4<XE> {
    if (row >= P.m || k >= P.k) {
        return mat2x4<XE>();
    }
    return x[(row * P.k + k) / 8u];
}
