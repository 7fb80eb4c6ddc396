// x and W bindings with scalar loads (any K): used by the portable kernel and by the
// cooperative kernel when K is not a multiple of 4. x is stored as XE (f32 or f16).

@group(0) @binding(1) var<storage, read> x: array<XE>;
@group(0) @binding(2) var<storage, read> w: array<u32>;

// x[row, k..k+4] in its storage type, zeros past M or K.
fn load_xv(row: u32, k: u32) -> vec4<XE> {
    var v = vec4<XE>(0.0);
    if (row >= P.m) {
        return v;
    }
    let e = row * P.k + k;
    if (k + 3u < P.k) {
        v = vec4<XE>(x[e], x[e + 1u], x[e + 2u], x[e + 3u]);
    } else {
        // no dynamic component index: it can push a vector to local memory on some compilers
        if (k < P.k) {
            v.x = x[e];
        }
        if (k + 1u < P.k) {
            v.y = x[e + 1u];
        }
        if (k + 2u < P.k) {
            v.z = x[e + 2u];
        }
    }
    return v;
}

// x[row, k..k+4] as f32 (f16 widened exactly).
fn load_x4(row: u32, k: u32) -> vec4<f32> {
    return vec4<f32>(load_xv(row, k));
}

// w[row, k..k+4] as f32, zeros past N or K. k is a multiple of 4, so for 16-bit storage the
// four values are two whole words.
fn load_w4(row: u32, k: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (row >= P.n) {
        return v;
    }
    let e = row * P.k + k;
    if (WDT == 0u) {
        if (k + 3u < P.k) {
            v = vec4<f32>(bitcast<f32>(w[e]), bitcast<f32>(w[e + 1u]), bitcast<f32>(w[e + 2u]),
                          bitcast<f32>(w[e + 3u]));
        } else {
            if (k < P.k) {
                v.x = bitcast<f32>(w[e]);
            }
            if (k + 1u < P.k) {
                v.y = bitcast<f32>(w[e + 1u]);
            }
            if (k + 2u < P.k) {
                v.z = bitcast<f32>(w[e + 2u]);
            }
        }
    } else {
        let i = e / 2u;
        if (k < P.k) {
            let lo = unpack_w(w[i]);
            v.x = lo.x;
            v.y = lo.y;
        }
        if (k + 2u < P.k) {
            let hi = unpack_w(w[i + 1u]);
            v.z = hi.x;
            v.w = hi.y;
        }
    }
    return v;
}

