// Shared by linear.wgsl (portable) and linear_coop.wgsl (cooperative matrices): parameters,
// bias/output bindings, weight decoding and the activation; the x/W bindings and their
// edge-masked loads come from linear_loads.wgsl (scalar) or linear_loads_vec.wgsl (vectors),
// and `write_out` (what the epilogue does with a finished output) from linear_store.wgsl
// (y = act(v)) or linear_residual.wgsl (y = residual + gate * v). The prelude defines
// WDT (weight storage: 0 = f32, 1 = f16, 2 = bf16), ACT (0 = none, 1 = GELU-tanh, 2 = SiLU),
// XDT (x storage: 0 = f32, 1 = f16) with `alias XE` its element type, and `alias YE`, the
// element type of y (f32, or f16 for the plain epilogue of GEMM-only activations: rounded once
// from the f32 result; the residual epilogue always has f32). Each storage type is a variant of
// its own, never a run-time flag: one in the staging loop once cut the tensor-core kernel from
// 156 to 55 TFLOP/s.
//
// RB16 = 1 (a constant of the prelude: a variant of its own, so the unrounded kernel carries no
// branch for it) is the bf16-autocast mode (spec §2.10: the reference's Linear under bf16
// autocast): each x element is rounded to bf16 as it is loaded (`round_x4`), the bias is rounded
// to bf16, the pre-activation v = acc + b is rounded to bf16 (`pre_act`), and with an
// activation its output is rounded to bf16 again (linear_store.wgsl). Products and the sum stay
// f32. The weights are used as stored (bf16 weights are already bf16). Off: all f32.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
    tiles_m: u32,
    tiles_n: u32,
    tiles: u32,
    group: u32,
    // residual epilogue only: whether a gate row is applied, and where it starts in `gate`
    has_gate: u32,
    gate_off: u32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<YE>;

// One f16 (low 16 bits of h) as f32, exactly, without the f16 shader feature or the
// SHADER_FLOAT16_IN_FLOAT32 capability `unpack2x16float` would need. Subnormals are scaled from an
// integer (never an f32 denormal, which a GPU may flush to zero); infinities and NaNs are kept.
fn f16_bits_to_f32(h: u32) -> f32 {
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    var v = bitcast<f32>(((e + 112u) << 23u) | (m << 13u));
    if (e == 0u) {
        v = f32(m) * 5.9604644775390625e-8; // m * 2^-24
    } else if (e == 31u) {
        v = bitcast<f32>(0x7f800000u | (m << 13u));
    }
    return select(v, -v, (h & 0x8000u) != 0u);
}

// Two 16-bit weights of one word as f32 (low half first).
fn unpack_w(v: u32) -> vec2<f32> {
    if (WDT == 1u) {
        return vec2<f32>(f16_bits_to_f32(v & 0xffffu), f16_bits_to_f32(v >> 16u));
    }
    // bf16 is the upper half of an f32
    return vec2<f32>(bitcast<f32>(v << 16u), bitcast<f32>(v & 0xffff0000u));
}

fn activate(v: f32) -> f32 {
    if (ACT == 1u) {
        // GELU, tanh approximation. tanh's argument is clamped: some drivers return NaN for
        // large |t|, and tanh(±15) is already ±1 in f32.
        let t = clamp(0.7978845608028654 * (v + 0.044715 * v * v * v), -15.0, 15.0);
        return 0.5 * v * (1.0 + tanh(t));
    }
    if (ACT == 2u) {
        // SiLU = v * sigmoid(v); exp's argument is clamped so it never overflows to inf.
        return v / (1.0 + exp(min(-v, 80.0)));
    }
    return v;
}


// v rounded to the nearest bf16 (ties to even), kept as an f32: NaN stays NaN (made quiet, sign
// kept), ±inf stays, values past the largest bf16 round to ±inf. Pure u32 arithmetic (no
// float rounding mode involved; bf16 subnormals come out of the same bit arithmetic).
fn bf16r(v: f32) -> f32 {
    let b = bitcast<u32>(v);
    if ((b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu) != 0u) {
        return bitcast<f32>((b | 0x00400000u) & 0xffff0000u);
    }
    return bitcast<f32>(((b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u) << 16u);
}

// Four x values as the GEMM takes them: rounded to bf16 in the bf16-autocast mode.
fn round_x4(v: vec4<f32>) -> vec4<f32> {
    if (RB16 != 0u) {
        return vec4<f32>(bf16r(v.x), bf16r(v.y), bf16r(v.z), bf16r(v.w));
    }
    return v;
}

// The pre-activation of output column `col` from its f32 accumulator: v = acc + b (f32), with
// the bias and the sum each rounded to bf16 in the bf16-autocast mode.
fn pre_act(acc: f32, col: u32) -> f32 {
    var v = acc;
    if (P.has_bias != 0u) {
        var b = bias[col];
        if (RB16 != 0u) {
            b = bf16r(b);
        }
        v += b;
    }
    if (RB16 != 0u) {
        v = bf16r(v);
    }
    return v;
}
