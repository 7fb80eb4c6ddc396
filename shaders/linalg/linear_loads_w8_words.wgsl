// The W binding of linear_loads_vec8.wgsl for f32 and bf16 weights: eight 16-bit weights per
// vec4<u32> (f32 weights: two of them), decoded to f32 (linear_common.wgsl's `unpack_w`).

@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;

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
