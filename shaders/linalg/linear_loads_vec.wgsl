// x and W bindings with vector loads, for K a multiple of 4 (the dispatcher checks): one
// 16-byte load for four f32 x values or one 8-byte load for four f16 ones, one 8-byte load for
// four 16-bit weights (f32 weights: 16 bytes), instead of four and two scalar loads. Same
// contract as linear_loads.wgsl.

@group(0) @binding(1) var<storage, read> x: array<vec4<XE>>;
@group(0) @binding(2) var<storage, read> w: array<vec2<u32>>;

// x[row, k..k+4] in its storage type, zeros past M or K (K % 4 == 0, k % 4 == 0).
fn load_xv(row: u32, k: u32) -> vec4<XE> {
    if (row >= P.m || k >= P.k) {
        return vec4<XE>(0.0);
    }
    return x[(row * P.k + k) / 4u];
}

// x[row, k..k+4] as f32 (f16 widened exactly).
fn load_x4(row: u32, k: u32) -> vec4<f32> {
    return vec4<f32>(load_xv(row, k));
}

// w[row, k..k+4] as f32, zeros past N or K.
fn load_w4(row: u32, k: u32) -> vec4<f32> {
    if (row >= P.n || k >= P.k) {
        return vec4<f32>(0.0);
    }
    let e = row * P.k + k;
    if (WDT == 0u) {
        // f32 weights: two 8-byte words per four values
        let a = w[e / 2u];
        let b = w[e / 2u + 1u];
        return vec4<f32>(bitcast<f32>(a.x), bitcast<f32>(a.y), bitcast<f32>(b.x), bitcast<f32>(b.y));
    }
    let v = w[e / 4u];
    let lo = unpack_w(v.x);
    let hi = unpack_w(v.y);
    return vec4<f32>(lo.x, lo.y, hi.x, hi.y);
}
