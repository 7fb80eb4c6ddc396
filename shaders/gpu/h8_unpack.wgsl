// Eight f16 values of storage as one 16-byte load of four u32 words, for devices without
// 16-bit integers in shaders (h8_words.wgsl is the form with them; same names). Each word's two
// halves (low half first: the value at the lower address) go through unpack2x16float to f32
// and back to f16, which is exact (every f16 value is an f32 value). Needs the downlevel
// SHADER_F16_IN_F32, which wgpu's Vulkan backend always offers (the tensor-core kernels run
// on Vulkan only). On the H200 (wan14b-720p, benches/RESULTS.md session 19) this form ran
// nabla-0.7 attention in 203.0 ms, the words form in 187.2, a mat2x4<f16> binding (two 8-byte
// loads per span) in 215.0.
alias H8 = vec4<u32>;

// Values 0-3 of the span.
fn h8_lo(w: H8) -> vec4<f16> {
    return vec4<f16>(vec2<f16>(unpack2x16float(w.x)), vec2<f16>(unpack2x16float(w.y)));
}

// Values 4-7 of the span.
fn h8_hi(w: H8) -> vec4<f16> {
    return vec4<f16>(vec2<f16>(unpack2x16float(w.z)), vec2<f16>(unpack2x16float(w.w)));
}

// A span of small values that depend on p (diagnostic filler for skipped loads; not 0 so that
// the products still see data).
fn h8_filler(p: u32) -> H8 {
    return vec4<u32>(p & 3u, p & 1u, 0u, 0x3c00u);
}
