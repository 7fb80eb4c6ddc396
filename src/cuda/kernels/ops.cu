// The DiT ops of the CUDA layer (launchers and shape checks: src/cuda/ops.rs). Each kernel
// mirrors the WGSL kernel of the same op (shaders/nn/, shaders/linalg/linear_common.wgsl) and is
// checked against the CPU references under src/reference/nn/.
//
// Conventions: every pointer argument is a device address passed as a 64-bit value; element
// counts that may exceed 2^32 are `u64`; flat kernels walk their elements with a grid-stride loop
// (any grid size is correct); row kernels take one block per row (blockIdx.x). All math is f32;
// 16-bit values are rounded to nearest even (the same rounding as the WGSL bit manipulation and
// half::{f16, bf16}::from_f32). No header is included: NVRTC installs without the toolkit's
// include folder do not resolve cuda_fp16.h, so f16 goes through the PTX `cvt` instructions and
// bf16 through bit manipulation.


// storage modes of the 16-bit-capable kernels (ops.rs: `storage_mode`)
#define MODE_F32 0u
#define MODE_F16 1u
#define MODE_BF16 2u

#define FOR_EACH(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

// f16 <-> f32: f16_to_f32 / f32_to_f16 of common.cuh (PTX cvt).

// bf16 <-> f32: bf16_to_f32 / f32_to_bf16 of common.cuh.

__device__ __forceinline__ float load_any(const void* p, u64 i, u32 mode) {
    if (mode == MODE_F16) {
        return f16_to_f32(((const u16*)p)[i]);
    }
    if (mode == MODE_BF16) {
        return bf16_to_f32(((const u16*)p)[i]);
    }
    return ((const float*)p)[i];
}

__device__ __forceinline__ void store_any(void* p, u64 i, float v, u32 mode) {
    if (mode == MODE_F16) {
        ((u16*)p)[i] = f32_to_f16(v);
    } else if (mode == MODE_BF16) {
        ((u16*)p)[i] = f32_to_bf16(v);
    } else {
        ((float*)p)[i] = v;
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm / RMSNorm over the last axis (shaders/nn/norm.wgsl), one block per row.
//
// LayerNorm: stable two-pass in f32, shifted by a pivot x0 (the row's first value):
// mu = sum(x - x0) / C, d = (x - x0) - mu, var = sum(d^2) / C (biased), y = d / sqrt(var + eps).
// A constant row gives d = 0 exactly, hence y = 0 exactly. RMSNorm: pivot and mu are 0.
// mode: 0 plain, 1 affine (p0 = weight, p1 = bias), 2 modulate (p0 = the [R, C] table, rows at
// element offsets shift_off / scale_off), 3 RMS (p0 = weight).
// ---------------------------------------------------------------------------------------------

#define NORM_PLAIN 0u
#define NORM_AFFINE 1u
#define NORM_MODULATE 2u
#define NORM_RMS 3u

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ float block_sum(float v) {
    __shared__ float red[32];
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    __syncthreads(); // red may still be read by a previous call
    if (lane == 0u) {
        red[warp] = v;
    }
    __syncthreads();
    if (warp == 0u) {
        float t = lane < (blockDim.x >> 5) ? red[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) {
            t += __shfl_xor_sync(0xffffffffu, t, o);
        }
        if (lane == 0u) {
            red[0] = t;
        }
    }
    __syncthreads();
    return red[0];
}

// out_mode: the output's storage (MODE_*); the f32 result is rounded to nearest even for 16-bit
// outputs (the GEMM-feeding norms of the CUDA fast path).
extern "C" __global__ void norm_rows(const float* x, void* out, const float* p0, const float* p1,
                                     u32 rows, u32 cols, float eps, u32 mode, u32 shift_off,
                                     u32 scale_off, u32 out_mode) {
    const u32 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float* xr = x + (u64)row * cols;
    const u64 yr = (u64)row * cols;
    const float fc = (float)cols;
    float pivot = 0.0f;
    float mu = 0.0f;
    if (mode != NORM_RMS) {
        pivot = xr[0];
        float s = 0.0f;
        for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
            s += xr[c] - pivot;
        }
        mu = block_sum(s) / fc;
    }
    float q = 0.0f;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = (xr[c] - pivot) - mu;
        q += d * d;
    }
    const float r = 1.0f / sqrtf(block_sum(q) / fc + eps);
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        const float y = ((xr[c] - pivot) - mu) * r;
        float o;
        if (mode == NORM_AFFINE) {
            o = y * p0[c] + p1[c];
        } else if (mode == NORM_MODULATE) {
            o = y * (1.0f + p0[scale_off + c]) + p0[shift_off + c];
        } else if (mode == NORM_RMS) {
            o = y * p0[c];
        } else {
            o = y;
        }
        store_any(out, yr + c, o, out_mode);
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise ops (shaders/nn/elementwise_*.wgsl)
// ---------------------------------------------------------------------------------------------

// out = a + b, b repeating every nb elements (same shape, or one row broadcast over a's rows).
extern "C" __global__ void add_f32(const float* a, const float* b, float* out, u64 n, u64 nb) {
    FOR_EACH(i, n) {
        out[i] = a[i] + b[i % nb];
    }
}

// x += y * gate[i % cols] (gate = one row of the gate table, or null for x += y).
extern "C" __global__ void gated_residual_f32(float* x, const float* y, const float* gate, u64 n,
                                              u32 cols) {
    FOR_EACH(i, n) {
        const float c = gate != nullptr ? y[i] * gate[i % cols] : y[i];
        x[i] = x[i] + c;
    }
}

// The standalone activations of shaders/nn/elementwise_unary.wgsl:
// GELU_tanh(x) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3) clamped to [-44, 15] and
// u <= -44 giving exactly 0; SiLU(x) = x / (1 + exp(-x)), the exponent clamped to <= 88 and
// x <= -88 giving 0. No |x| yields NaN or a spurious value.
__device__ __forceinline__ float gelu_tanh_unary(float v) {
    const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    const float e = expf(-2.0f * fminf(fmaxf(u, -44.0f), 15.0f));
    return u <= -44.0f ? 0.0f : v / (1.0f + e);
}

__device__ __forceinline__ float silu_unary(float v) {
    const float e = expf(fminf(-v, 88.0f));
    return v <= -88.0f ? 0.0f : v / (1.0f + e);
}

// op: 0 GELU_tanh, 1 SiLU
extern "C" __global__ void unary_f32(const float* x, float* out, u64 n, u32 op) {
    FOR_EACH(i, n) {
        out[i] = op == 0u ? gelu_tanh_unary(x[i]) : silu_unary(x[i]);
    }
}

// The linear layer's epilogue (shaders/linalg/linear_common.wgsl `activate`):
// GELU_tanh = 0.5 v (1 + tanh(t)), t clamped to [-15, 15]; SiLU = v / (1 + exp(min(-v, 80))).
__device__ __forceinline__ float activate_linear(float v, u32 act) {
    if (act == 1u) {
        const float t = fminf(fmaxf(0.7978845608028654f * (v + 0.044715f * v * v * v), -15.0f), 15.0f);
        return 0.5f * v * (1.0f + tanhf(t));
    }
    if (act == 2u) {
        return v / (1.0f + expf(fminf(-v, 80.0f)));
    }
    return v;
}

// In place on y [rows, cols] of storage `mode`: y = act(y + bias[col]) (bias f32, may be null;
// f32 math, 16-bit results rounded to nearest even). act: 0 none, 1 GELU_tanh, 2 SiLU (the
// linear epilogue when cuBLASLt does not fuse it).
extern "C" __global__ void bias_act_any(void* y, const float* bias, u64 n, u32 cols, u32 act,
                                        u32 mode) {
    FOR_EACH(i, n) {
        float v = load_any(y, i, mode);
        if (bias != nullptr) {
            v += bias[i % cols];
        }
        store_any(y, i, activate_linear(v, act), mode);
    }
}

// f32 -> 16-bit (round to nearest even), the GEMM input of 16-bit weights. mode: 1 f16, 2 bf16.
extern "C" __global__ void convert_f32(const float* x, void* y, u64 n, u32 mode) {
    FOR_EACH(i, n) {
        store_any(y, i, x[i], mode);
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE in place (shaders/nn/rope.wgsl): x [S, heads, D] of storage `mode`, cos / sin [S, D/2]
// f32, one thread per pair (x[2j], x[2j+1]):
//   x[2j] <- x[2j] cos - x[2j+1] sin,  x[2j+1] <- x[2j] sin + x[2j+1] cos   (f32 math)
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void rope_any(void* x, const float* cos_t, const float* sin_t, u64 pairs,
                                    u32 pairs_per_token, u32 half_d, u32 mode) {
    FOR_EACH(p, pairs) {
        const u64 token = p / pairs_per_token;
        const u32 j = (u32)(p % pairs_per_token) % half_d;
        const float c = cos_t[token * half_d + j];
        const float s = sin_t[token * half_d + j];
        float y0, y1;
        rope_rotate(load_any(x, 2 * p, mode), load_any(x, 2 * p + 1, mode), c, s, y0, y1);
        store_any(x, 2 * p, y0, mode);
        store_any(x, 2 * p + 1, y1, mode);
    }
}

// RoPE fused with the head split: x [S, H*D] f32 (not modified), out [H, S, D] of storage
// `mode`, one thread per output pair (h, s, j):
//   out[h, s, 2j] = x0 cos - x1 sin,  out[h, s, 2j+1] = x0 sin + x1 cos,
//   (x0, x1) = x[s, h*D + 2j], x[s, h*D + 2j + 1];  cos / sin = table[s, j]   (f32 math)
extern "C" __global__ void rope_split_heads_any(const float* x, const float* cos_t,
                                                const float* sin_t, void* out, u64 pairs, u32 s,
                                                u32 h, u32 half_d, u32 mode) {
    FOR_EACH(p, pairs) {
        const u64 j = p % half_d;
        const u64 r = p / half_d; // hi * S + si
        const u64 si = r % s;
        const u64 hi = r / s;
        const u64 src = (si * h + hi) * half_d + j; // pair index in x
        const float c = cos_t[si * half_d + j];
        const float sn = sin_t[si * half_d + j];
        float y0, y1;
        rope_rotate(x[2 * src], x[2 * src + 1], c, sn, y0, y1);
        store_any(out, 2 * p, y0, mode);
        store_any(out, 2 * p + 1, y1, mode);
    }
}

// ---------------------------------------------------------------------------------------------
// Head layout moves (shaders/nn/heads.wgsl), one output element per thread:
//   split: out[h, s, d] = x[s, h*D + d]  (x f32, out of storage `mode`, rounded)
//   merge: out[s, h*D + d] = x[h, s, d]  (x of storage `mode`, out of storage `out_mode`)
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void split_heads_any(const float* x, void* out, u64 n, u32 s, u32 h, u32 d,
                                           u32 mode) {
    FOR_EACH(i, n) {
        const u64 di = i % d;
        const u64 r = i / d; // h * S + s
        const u64 si = r % s;
        const u64 hi = r / s;
        store_any(out, i, x[(si * h + hi) * d + di], mode);
    }
}

extern "C" __global__ void merge_heads_any(const void* x, void* out, u64 n, u32 s, u32 h, u32 d,
                                           u32 mode, u32 out_mode) {
    FOR_EACH(i, n) {
        const u64 di = i % d;
        const u64 r = i / d; // s * H + h
        const u64 hi = r % h;
        const u64 si = r / h;
        store_any(out, i, load_any(x, (hi * s + si) * d + di, mode), out_mode);
    }
}

// ---------------------------------------------------------------------------------------------
// Row gather dst[r] = src[perm[r]] of rows of `words` units (the fractal token order and its
// inverse, with the permutation uploaded by the host). One block per row.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void gather_rows_u32(const u32* src, u32* dst, const u32* perm, u32 rows,
                                           u64 words) {
    const u32 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const u64 from = (u64)perm[row] * words;
    const u64 to = (u64)row * words;
    for (u64 c = threadIdx.x; c < words; c += blockDim.x) {
        dst[to + c] = src[from + c];
    }
}

extern "C" __global__ void gather_rows_u16(const u16* src, u16* dst, const u32* perm, u32 rows,
                                           u64 words) {
    const u32 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const u64 from = (u64)perm[row] * words;
    const u64 to = (u64)row * words;
    for (u64 c = threadIdx.x; c < words; c += blockDim.x) {
        dst[to + c] = src[from + c];
    }
}

// ---------------------------------------------------------------------------------------------
// Patch gather and unpatchify, patch size (1, 2, 2) (shaders/nn/patchify.wgsl,
// patch_unpatchify.wgsl); pure data movement of 4- or 2-byte elements:
//   patchify:   tokens[s, (c*2 + q)*2 + r] = z[c, f, 2h + q, 2w + r],  s = (f*H/2 + h)*W/2 + w
//   unpatchify: v[c, f, 2h + q, 2w + r] = out[s, q*2C + r*C + c]
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void patchify_body(const T* z, T* tokens, u32 nc, u32 nf, u32 nh, u32 nw) {
    const u64 hp = nh / 2, wp = nw / 2;
    const u64 per_token = 4ull * nc;
    const u64 n = (u64)nf * hp * wp * per_token;
    FOR_EACH(o, n) {
        const u64 s = o / per_token;
        const u64 k = o % per_token;
        const u64 c = k / 4, q = (k / 2) % 2, r = k % 2;
        const u64 w = s % wp, h = (s / wp) % hp, f = s / (wp * hp);
        tokens[o] = z[((c * nf + f) * nh + 2 * h + q) * nw + 2 * w + r];
    }
}

template <typename T>
__device__ __forceinline__ void unpatchify_body(const T* src, T* v, u32 nc, u32 nf, u32 nh, u32 nw) {
    const u64 hp = nh / 2, wp = nw / 2;
    const u64 n = (u64)nc * nf * nh * nw;
    FOR_EACH(o, n) {
        const u64 x = o % nw;
        const u64 y = (o / nw) % nh;
        const u64 f = (o / ((u64)nw * nh)) % nf;
        const u64 c = o / ((u64)nw * nh * nf);
        const u64 s = (f * hp + y / 2) * wp + x / 2;
        v[o] = src[s * 4 * nc + (y % 2) * 2 * nc + (x % 2) * nc + c];
    }
}

extern "C" __global__ void patchify_u32(const u32* z, u32* tokens, u32 nc, u32 nf, u32 nh, u32 nw) {
    patchify_body<u32>(z, tokens, nc, nf, nh, nw);
}

extern "C" __global__ void patchify_u16(const u16* z, u16* tokens, u32 nc, u32 nf, u32 nh, u32 nw) {
    patchify_body<u16>(z, tokens, nc, nf, nh, nw);
}

extern "C" __global__ void unpatchify_u32(const u32* src, u32* v, u32 nc, u32 nf, u32 nh, u32 nw) {
    unpatchify_body<u32>(src, v, nc, nf, nh, nw);
}

extern "C" __global__ void unpatchify_u16(const u16* src, u16* v, u32 nc, u32 nf, u32 nh, u32 nw) {
    unpatchify_body<u16>(src, v, nc, nf, nh, nw);
}
