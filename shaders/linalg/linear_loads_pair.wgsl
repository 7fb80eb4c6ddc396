// Eight consecutive x and W values as two halves of four, from linear_loads.wgsl's or
// linear_loads_vec.wgsl's loads: the tensor-core kernel stages in spans of eight (see
// linear_loads_vec8.wgsl for the 16-byte form of the same functions).

fn load_x8(row: u32, k: u32) -> mat2x4<XE> {
    return mat2x4<XE>(load_xv(row, k), load_xv(row, k + 4u));
}

fn load_w8(row: u32, k: u32) -> mat2x4<f32> {
    return mat2x4<f32>(load_w4(row, k), load_w4(row, k + 4u));
}
