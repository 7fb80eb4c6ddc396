// Compressed attention logits on cooperative matrices (tensor cores), f32-accurate:
// out[bh, i, j] = (qa[bh, i, :] . ka[bh, j, :]) · (1/sqrt(D)), qa, ka [BH, Nb, D] f32 (D a
// multiple of 16, |values| < 65504), out [BH, Nb, stride] f32.
// Each f32 x is split into hi = x with its mantissa cut to 10 bits (exact in f16) and
// lo = x - hi (exact in f32), stored as f16(lo · 2^11); the mask bits are cut with integer
// operations, so no compiler can fold f32(f16(x)) back into x. The logit is
// Σ hi_q·hi_k + 2^-11 · Σ (hi_q·lo_k + lo_q·hi_k): 21 significant bits per operand, the
// lo·lo term (2^-22 relative) dropped, every product exact in the f32 accumulation.
// One workgroup = a 64x64 output tile = 4 subgroups of 32x32 (2x2 accumulators for the hi·hi
// sum and 2x2 for the cross sums), K in steps of 16 through workgroup memory: each staged row
// holds its 16 hi halves, then its 16 lo halves, then 8 halves of padding (an 80-byte stride,
// which keeps the 16-byte rows of a cooperative load on distinct banks). The first step's f32
// rows are loaded before the loop, each later step's at the top of its step (loading the next
// step's rows during the current step's products measured 1.6 % slower on the H200, as in the
// GEMM). A tile that lies inside the rows and the row stride (a multiple of 4 floats) is
// stored straight from its matrices into `out`; the others (the last row of tiles, or any
// tile when the stride is not 16-byte aligned) go through a 16x16 scratch per subgroup,
// element by element, two barriers per matrix. The mask's scratch rows are padded to a
// multiple of 64 (`MaskStages`), so only the last row of tiles takes the scratch path there.
// 14 KB of workgroup memory and 130 registers on the H200: three workgroups share an SM's
// 48 KB on NVIDIA's Vulkan driver (tests/shaders.rs guards the budget). Measured there
// (benches/RESULTS.md, session 15): 0.295-0.300 ms at wan14b-720p, against 0.303 ms for 128x64
// tiles of 4 subgroups of 64x32 (215 registers, two workgroups per SM) and 0.304 ms for the
// same tiles with 8 subgroups of 32x32 (16 warps per SM): the number of warps in flight is
// not what bounds this kernel.
// Every cooperative load/store starts at a 16-byte boundary.
// The prelude enables f16 and wgpu_cooperative_matrix and defines SG (4·SG threads); the
// unroll counts are QV = 256 / (4·SG) and KV = 256 / (4·SG) vec4<f32> per thread and k-step.

// (Params and bindings: scores_io.wgsl, prepended by the dispatcher)

const TR: u32 = 64u;            // rows of the tile
const RS: u32 = 10u;            // vec4<f16> row stride: 16 hi + 16 lo + 8 pad halves
const NSG: u32 = 4u;            // 2 x 2 subgroups of 32x32
const WGS: u32 = NSG * SG;

var<workgroup> q_s: array<vec4<f16>, TR * RS>;
var<workgroup> k_s: array<vec4<f16>, 64u * RS>;
var<workgroup> c_s: array<f32, 256u * NSG>;

// element e of a [rows][16 k] slab: row e / 4, k quad e % 4 (k0 + 4·(e % 4)), zero past nb
fn ld(which: u32, bh: u32, row0: u32, k0: u32, e: u32) -> vec4<f32> {
    let r = row0 + e / 4u;
    if (r >= P.nb) {
        return vec4<f32>(0.0);
    }
    let g = (bh * P.nb + r) * (P.d / 4u) + k0 / 4u + e % 4u;
    if (which == 0u) {
        return qa[g];
    }
    return ka[g];
}

// hi: the mantissa cut to 10 bits; lo: the rest, scaled by 2^11
fn split(x: vec4<f32>) -> mat2x4<f16> {
    let hi = bitcast<vec4<f32>>(bitcast<vec4<u32>>(x) & vec4<u32>(0xffffe000u));
    return mat2x4<f16>(vec4<f16>(hi), vec4<f16>((x - hi) * 2048.0));
}

fn epilogue(hh: coop_mat16x16<f32, C>, x: coop_mat16x16<f32, C>, sg: u32, lane: u32, row0: u32, col0: u32, bh: u32) {
    let acc = (hh + x * (1.0 / 2048.0)) * P.inv_sqrt_d;
    coopStoreT(acc, &c_s[sg * 256u], 16u);
    workgroupBarrier();
    for (var e = lane; e < 256u; e += SG) {
        let r = row0 + e / 16u;
        let c = col0 + e % 16u;
        if (r < P.nb && c < P.nb) {
            out[(bh * P.nb + r) * P.stride + c] = c_s[sg * 256u + e];
        }
    }
    workgroupBarrier();
}

// the 16x16 logits at (row0, col0), all inside the rows and the stride, stored as they are
// (the stride comes in as an argument: naga 30's SPIR-V writer panics on a uniform's field
// as a cooperative store's stride)
fn store_direct(hh: coop_mat16x16<f32, C>, x: coop_mat16x16<f32, C>, row0: u32, col0: u32, bh: u32, stride: u32) {
    let acc = (hh + x * (1.0 / 2048.0)) * P.inv_sqrt_d;
    let ix = (bh * P.nb + row0) * stride + col0;
    coopStoreT(acc, &out[ix], stride);
}

@compute @workgroup_size(WGS)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_id) sg: u32,
        @builtin(subgroup_invocation_id) lane: u32) {
    let bh = wid.z;
    let i0 = wid.y * TR;
    let j0 = wid.x * 64u;
    let sy = sg / 2u;   // 32-row half of the tile
    let sx = sg % 2u;   // 32-column half
    var h00 = coop_mat16x16<f32, C>();
    var h01 = coop_mat16x16<f32, C>();
    var h10 = coop_mat16x16<f32, C>();
    var h11 = coop_mat16x16<f32, C>();
    var x00 = coop_mat16x16<f32, C>();
    var x01 = coop_mat16x16<f32, C>();
    var x10 = coop_mat16x16<f32, C>();
    var x11 = coop_mat16x16<f32, C>();
    //@unroll QV
    var qr{t} = ld(0u, bh, i0, 0u, lid + {t}u * WGS);
    //@end
    //@unroll KV
    var kr{t} = ld(1u, bh, j0, 0u, lid + {t}u * WGS);
    //@end
    for (var k0 = 0u; k0 < P.d; k0 += 16u) {
        if (k0 > 0u) {
            //@unroll QV
            qr{t} = ld(0u, bh, i0, k0, lid + {t}u * WGS);
            //@end
            //@unroll KV
            kr{t} = ld(1u, bh, j0, k0, lid + {t}u * WGS);
            //@end
        }
        //@unroll QV
        let qs{t} = split(qr{t});
        q_s[((lid + {t}u * WGS) / 4u) * RS + (lid + {t}u * WGS) % 4u] = qs{t}[0];
        q_s[((lid + {t}u * WGS) / 4u) * RS + 4u + (lid + {t}u * WGS) % 4u] = qs{t}[1];
        //@end
        //@unroll KV
        let ks{t} = split(kr{t});
        k_s[((lid + {t}u * WGS) / 4u) * RS + (lid + {t}u * WGS) % 4u] = ks{t}[0];
        k_s[((lid + {t}u * WGS) / 4u) * RS + 4u + (lid + {t}u * WGS) % 4u] = ks{t}[1];
        //@end
        workgroupBarrier();
        let bh0 = coopLoad<coop_mat16x16<f16, B>>(&k_s[(sx * 32u) * RS], RS);
        let bh1 = coopLoad<coop_mat16x16<f16, B>>(&k_s[(sx * 32u + 16u) * RS], RS);
        let bl0 = coopLoad<coop_mat16x16<f16, B>>(&k_s[(sx * 32u) * RS + 4u], RS);
        let bl1 = coopLoad<coop_mat16x16<f16, B>>(&k_s[(sx * 32u + 16u) * RS + 4u], RS);
        let ah0 = coopLoadT<coop_mat16x16<f16, A>>(&q_s[(sy * 32u) * RS], RS);
        let ah1 = coopLoadT<coop_mat16x16<f16, A>>(&q_s[(sy * 32u + 16u) * RS], RS);
        let al0 = coopLoadT<coop_mat16x16<f16, A>>(&q_s[(sy * 32u) * RS + 4u], RS);
        let al1 = coopLoadT<coop_mat16x16<f16, A>>(&q_s[(sy * 32u + 16u) * RS + 4u], RS);
        h00 = coopMultiplyAdd(ah0, bh0, h00);
        h01 = coopMultiplyAdd(ah0, bh1, h01);
        h10 = coopMultiplyAdd(ah1, bh0, h10);
        h11 = coopMultiplyAdd(ah1, bh1, h11);
        x00 = coopMultiplyAdd(ah0, bl0, x00);
        x01 = coopMultiplyAdd(ah0, bl1, x01);
        x10 = coopMultiplyAdd(ah1, bl0, x10);
        x11 = coopMultiplyAdd(ah1, bl1, x11);
        x00 = coopMultiplyAdd(al0, bh0, x00);
        x01 = coopMultiplyAdd(al0, bh1, x01);
        x10 = coopMultiplyAdd(al1, bh0, x10);
        x11 = coopMultiplyAdd(al1, bh1, x11);
        workgroupBarrier();
    }
    let r0 = i0 + sy * 32u;
    let c0 = j0 + sx * 32u;
    if (i0 + TR <= P.nb && j0 + 64u <= P.stride && P.stride % 4u == 0u) {
        store_direct(h00, x00, r0, c0, bh, P.stride);
        store_direct(h01, x01, r0, c0 + 16u, bh, P.stride);
        store_direct(h10, x10, r0 + 16u, c0, bh, P.stride);
        store_direct(h11, x11, r0 + 16u, c0 + 16u, bh, P.stride);
    } else {
        epilogue(h00, x00, sg, lane, r0, c0, bh);
        epilogue(h01, x01, sg, lane, r0, c0 + 16u, bh);
        epilogue(h10, x10, sg, lane, r0 + 16u, c0, bh);
        epilogue(h11, x11, sg, lane, r0 + 16u, c0 + 16u, bh);
    }
}
