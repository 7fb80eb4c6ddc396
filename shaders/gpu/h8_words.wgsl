// Eight f16 values of storage as one 16-byte load of four u32 words (needs
// `enable wgpu_int16;` and wgpu::Features::SHADER_I16; h8_unpack.wgsl is the form without,
// with the same names). naga 30 has no bitcast from u32 words to f16 vectors, but it has one
// from u16 to f16: each word is split into its two 16-bit halves (low half first: the value at
// the lower address), reinterpreted as they are, never converted. A `mat2x4<f16>` binding
// element stays two 8-byte loads on the H200; a vec4<u32> one is one 16-byte load (LDG.E.128).
// Measured on the H200 (wan14b-720p, benches/RESULTS.md session 19): nabla-0.7 attention
// 215.0 ms (mat2x4<f16>) -> 187.2 ms (h8_unpack.wgsl: 203.0), dense 522.8 -> 457.3 ms.
alias H8 = vec4<u32>;

// Values 0-3 of the span.
fn h8_lo(w: H8) -> vec4<f16> {
    return bitcast<vec4<f16>>(vec4<u16>(vec4<u32>(w.x, w.x >> 16u, w.y, w.y >> 16u)));
}

// Values 4-7 of the span.
fn h8_hi(w: H8) -> vec4<f16> {
    return bitcast<vec4<f16>>(vec4<u16>(vec4<u32>(w.z, w.z >> 16u, w.w, w.w >> 16u)));
}

// A span of small values that depend on p (diagnostic filler for skipped loads; not 0 so that
// the products still see data).
fn h8_filler(p: u32) -> H8 {
    return vec4<u32>(p & 3u, p & 1u, 0u, 0x3c00u);
}
