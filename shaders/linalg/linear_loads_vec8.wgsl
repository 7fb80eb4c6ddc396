// The x binding with 16-byte loads for the tensor-core kernel, for K a multiple of 8 (the
// dispatcher checks): eight x values per load (one 16-byte mat2x4<f16>, or two 16-byte halves of
// a mat2x4<f32>). naga 30 has no bitcast from u32 words to f16 vectors, but a mat2x4<f16>
// element is one aligned span the driver loads at once (two 8-byte loads on the H200). The W
// binding comes from linear_loads_w8_words.wgsl (f32 / bf16 weights) or
// linear_loads_w8_f16.wgsl (f16 weights).
// Same contract as linear_loads_pair.wgsl. `fetch_x8` only loads: its address is clamped into
// the tensor (row to M - 1, k to K - 8), so the load needs no predicate and nothing consumes its
// value until `span_x8` stages it, after the products of the current k-step (the prefetch of
// linear_coop.wgsl). A clamped row past M only feeds outputs past M, which are never written;
// `span_x8` zeroes a span past K, which would enter the sums.

@group(0) @binding(1) var<storage, read> x: array<mat2x4<XE>>;

// x[min(row, M - 1), min(k, K - 8)..+8] as stored.
fn fetch_x8(row: u32, k: u32) -> mat2x4<XE> {
    return x[(min(row, P.m - 1u) * P.k + min(k, P.k - 8u)) / 8u];
}

// The fetched span of columns k..k+8 (columns: k..k+4 and k+4..k+8), zeros past K.
fn span_x8(v: mat2x4<XE>, k: u32) -> mat2x4<XE> {
    let live = k < P.k;
    return mat2x4<XE>(select(vec4<XE>(), v[0], live), select(vec4<XE>(), v[1], live));
}
