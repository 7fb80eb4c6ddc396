// The W binding of linear_loads_vec8.wgsl for f32 and bf16 weights: eight 16-bit weights per
// vec4<u32> (f32 weights: two of them), decoded to f32 (linear_common.wgsl's `unpack_w`) only
// by `span_w8`, after the products (see `fetch_x8`). Clamped like `fetch_x8` (a row past N only
// feeds outputs past N).

@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;

// What `fetch_w8` holds between its load and `span_w8`.
alias WSPAN = array<vec4<u32>, 2>;

// The words of w[min(row, N - 1), min(k, K - 8)..+8] (16-bit weights: the first vector only).
fn fetch_w8(row: u32, k: u32) -> WSPAN {
    let e = min(row, P.n - 1u) * P.k + min(k, P.k - 8u);
    if (WDT == 0u) {
        return array<vec4<u32>, 2>(w[e / 4u], w[e / 4u + 1u]);
    }
    return array<vec4<u32>, 2>(w[e / 8u], vec4<u32>());
}

// The fetched span of columns k..k+8 as f32, zeros past K.
fn span_w8(v: WSPAN, k: u32) -> mat2x4<f32> {
    if (k >= P.k) {
        return mat2x4<f32>();
    }
    if (WDT == 0u) {
        return mat2x4<f32>(bitcast<vec4<f32>>(v[0]), bitcast<vec4<f32>>(v[1]));
    }
    let u = v[0];
    return mat2x4<f32>(vec4<f32>(unpack_w(u.x), unpack_w(u.y)), vec4<f32>(unpack_w(u.z), unpack_w(u.w)));
}
