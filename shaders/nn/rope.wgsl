// 3-D rotary position embedding of the Wan DiT, in place:
//   x [S, heads, D] (storage mode MODE), cos / sin [S, D/2] f32 (one row per token, same for every head)
//   out[2j]   = x[2j] * cos[s, j] - x[2j+1] * sin[s, j]
//   out[2j+1] = x[2j] * sin[s, j] + x[2j+1] * cos[s, j]
// One invocation per pair (x[2j], x[2j+1]); the arithmetic is f32 in every mode.
// x is bound as 32-bit words so one body serves every storage type. The prelude (added by the
// dispatcher) defines MODE: 0 = f32 (a pair is two words), 1 = f16, 2 = bf16 (a pair is one word,
// low half = x[2j]); 16-bit results are rounded to nearest even. The f16 conversions are bit
// manipulation (no unpack2x16float / pack2x16float), so no variant needs a shader capability.

struct Params {
    pairs: u32,           // S * heads * D / 2
    pairs_per_token: u32, // heads * D / 2
    half_d: u32,          // D / 2
    _pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read_write> x: array<u32>;
@group(0) @binding(2) var<storage, read> cos_t: array<f32>;
@group(0) @binding(3) var<storage, read> sin_t: array<f32>;

fn bf16_round(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    if ((b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu) != 0u) {
        return (b >> 16u) | 0x40u; // quiet NaN
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

fn f16_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) { // zero or subnormal: m * 2^-24
        return bitcast<f32>(sign | bitcast<u32>(f32(m) * 5.9604644775390625e-8));
    }
    if (e == 31u) { // inf or NaN
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

fn f16_round(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if (a > 0x7f800000u) { // NaN: quiet
        return sign | 0x7e00u;
    }
    if (a >= 0x477ff000u) { // |v| >= 65520 (or inf) rounds to inf
        return sign | 0x7c00u;
    }
    if (a >= 0x38800000u) { // normal f16: rebias the exponent, round at bit 13
        return sign | ((a + 0xfffu + ((a >> 13u) & 1u) - 0x38000000u) >> 13u);
    }
    // subnormal f16 (or zero): round(|v| * 2^24), ties to even
    return sign | u32(round(bitcast<f32>(a) * 16777216.0));
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let p = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (p >= P.pairs) {
        return;
    }
    let token = p / P.pairs_per_token;
    let j = (p % P.pairs_per_token) % P.half_d;
    let c = cos_t[token * P.half_d + j];
    let s = sin_t[token * P.half_d + j];
    var a = 0.0;
    var b = 0.0;
    if (MODE == 0u) {
        a = bitcast<f32>(x[2u * p]);
        b = bitcast<f32>(x[2u * p + 1u]);
    } else if (MODE == 1u) {
        let w = x[p];
        a = f16_to_f32(w & 0xffffu);
        b = f16_to_f32(w >> 16u);
    } else {
        let w = x[p];
        a = bitcast<f32>(w << 16u);
        b = bitcast<f32>(w & 0xffff0000u);
    }
    let ra = a * c - b * s;
    let rb = a * s + b * c;
    if (MODE == 0u) {
        x[2u * p] = bitcast<u32>(ra);
        x[2u * p + 1u] = bitcast<u32>(rb);
    } else if (MODE == 1u) {
        x[p] = f16_round(ra) | (f16_round(rb) << 16u);
    } else {
        x[p] = bf16_round(ra) | (bf16_round(rb) << 16u);
    }
}
