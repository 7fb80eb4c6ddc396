// The W binding of linear_loads_vec8.wgsl for f16 weights: eight of them per 16-byte span
// (`H8` of h8_unpack.wgsl: four u32 words), staged as f16 as stored. Decoded to f32 first (as
// the other forms do, with integer code), the tensor-core kernel ran at 68.8 TFLOP/s at 4096^3
// on the H200; staged as stored from mat2x4<f16> spans (two 8-byte loads), 156 (bf16 weights:
// 166; benches/RESULTS.md session 12); from u32 words, 230 with f16 x (session 19: 14B shapes
// +16-17 %; the 16-bit integer bitcasts of h8_words.wgsl, 2 % less). Clamped like `fetch_x8`
// (a row past N only feeds outputs past N).

@group(0) @binding(2) var<storage, read> w: array<H8>;

// What `fetch_w8` holds between its load and `span_w8`.
alias WSPAN = H8;

// w[min(row, N - 1), min(k, K - 8)..+8] as stored.
fn fetch_w8(row: u32, k: u32) -> WSPAN {
    return w[(min(row, P.n - 1u) * P.k + min(k, P.k - 8u)) / 8u];
}

// The fetched span of columns k..k+8, zeros past K.
fn span_w8(v: WSPAN, k: u32) -> mat2x4<f16> {
    let live = k < P.k;
    return mat2x4<f16>(select(vec4<f16>(), h8_lo(v), live), select(vec4<f16>(), h8_hi(v), live));
}
