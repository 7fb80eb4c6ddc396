// The x binding with 16-byte loads for the tensor-core kernel, for K a multiple of 8 (the
// dispatcher checks): eight x values per load. `XSPAN` and `x8_values` come from the
// dispatcher (linear.rs, `Loads::source`): f16 x is read as an `H8` span (h8_unpack.wgsl: four
// u32 words, one 16-byte load, turned into f16 through unpack2x16float, exactly), f32 x as a
// mat2x4<f32> (two 16-byte loads). The f16 form as a mat2x4<f16> binding was two 8-byte loads
// on the H200; as words, 4096^3 went from 205 to 222 TFLOP/s and the 14B shapes gained 3-7 %
// (benches/RESULTS.md session 19); the 16-bit integer bitcasts of h8_words.wgsl, which won in
// the attention kernel, were 1-3 % slower here than unpack2x16float. The W binding comes from
// linear_loads_w8_words.wgsl (f32 / bf16 weights) or linear_loads_w8_f16.wgsl (f16 weights).
// Same contract as linear_loads_pair.wgsl. `fetch_x8` only loads: its address is clamped into
// the tensor (row to M - 1, k to K - 8), so the load needs no predicate and nothing consumes its
// value until `span_x8` stages it, after the products of the current k-step (the prefetch of
// linear_coop.wgsl). A clamped row past M only feeds outputs past M, which are never written;
// `span_x8` zeroes a span past K, which would enter the sums.

@group(0) @binding(1) var<storage, read> x: array<XSPAN>;

// x[min(row, M - 1), min(k, K - 8)..+8] as stored.
fn fetch_x8(row: u32, k: u32) -> XSPAN {
    return x[(min(row, P.m - 1u) * P.k + min(k, P.k - 8u)) / 8u];
}

// The fetched span of columns k..k+8 (columns: k..k+4 and k+4..k+8), zeros past K.
fn span_x8(v: XSPAN, k: u32) -> mat2x4<XE> {
    let live = k < P.k;
    let s = x8_values(v);
    return mat2x4<XE>(select(vec4<XE>(), s[0], live), select(vec4<XE>(), s[1], live));
}
