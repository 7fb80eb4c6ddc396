// x and W bindings with 16-byte loads for the tensor-core kernel, for K a multiple of 8 (the
// dispatcher checks): eight x values per load (one 16-byte mat2x4<f16>, or two 16-byte halves of
// a mat2x4<f32>) and eight 16-bit weights per vec4<u32> (f32 weights: two of them). naga 30 has
// no bitcast from u32 words to f16 vectors, but a mat2x4<f16> element is one aligned 16-byte
// span, which the driver loads at once. Same contract as linear_loads_pair.wgsl: `load_x8`,
// `load_w8`, zeros past M, N or K.

@group(0) @binding(1) var<storage, read> x: array<mat2x4<XE>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;

// x[row, k..k+8] in its storage type (columns: k..k+4 and k+4..k+8), zeros past M or K.
fn load_x8(row: u32, k: u32) -> mat2x4<XE> {
    if (row >= P.m || k >= P.k) {
        return mat2x4<XE>();
    }
    return x[(row * P.k + k) / 8u];
}

// w[row, k..k+8] as f32, zeros past N or K.
fn load_w8(row: u32, k: u32) -> mat2x4<f32> {
    if (row >= P.n || k >= P.k) {
        return mat2x4<f32>();
    }
    let e = row * P.k + k;
    if (WDT == 0u) {
        return mat2x4<f32>(bitcast<vec4<f32>>(w[e / 4u]), bitcast<vec4<f32>>(w[e / 4u + 1u]));
    }
    let v = w[e / 8u];
    return mat2x4<f32>(vec4<f32>(unpack_w(v.x), unpack_w(v.y)), vec4<f32>(unpack_w(v.z), unpack_w(v.w)));
}
