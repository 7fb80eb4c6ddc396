// Eight consecutive x and W values as two halves of four, from linear_loads.wgsl's or
// linear_loads_vec.wgsl's loads: the tensor-core kernel stages in spans of eight (see
// linear_loads_vec8.wgsl for the 16-byte form and the contract: `fetch_*8` loads a span,
// `span_*8` gives its values with zeros past K; a row past M or N may hold anything, its
// outputs are never written). Here the loads already zero everything outside the tensors, so
// the span is the fetched value: these forms (K not a multiple of 8) consume their loads when
// they fetch, without the prefetch the 16-byte form gets.

// What `fetch_x8` / `fetch_w8` hold between their loads and `span_x8` / `span_w8`.
alias XSPAN = mat2x4<XE>;
alias WSPAN = mat2x4<f32>;

fn fetch_x8(row: u32, k: u32) -> XSPAN {
    return mat2x4<XE>(load_xv(row, k), load_xv(row, k + 4u));
}

fn span_x8(v: XSPAN, k: u32) -> mat2x4<XE> {
    return v;
}

fn fetch_w8(row: u32, k: u32) -> mat2x4<f32> {
    return mat2x4<f32>(load_w4(row, k), load_w4(row, k + 4u));
}

fn span_w8(v: mat2x4<f32>, k: u32) -> mat2x4<f32> {
    return v;
}
