// The W binding of the tensor-core linear kernel for weights in fragment order (`KOrder::Frag32`,
// uploaded by `Gpu::upload_f16_frag`): f16 [N, K], K a multiple of 32, each run of 32 k stored
// so that invocation q = lane % 4 finds the eight k of one row that its B fragments hold in a
// 32-k step (2q, 2q+1, 2q+8, 2q+9, then the same +16) at positions 8q .. 8q+8: one 16-byte
// load. The B fragments are built in registers from these words (element stubs rewritten by
// src/gpu/spirv.rs, compiled through the SPIR-V path), so W never passes through workgroup
// memory. The element order comes from the prelude's RH0..RH7 / CL0..CL7 (src/gpu/coop_layout.rs:
// the order measured for A and C matrices; the probe also checks that a B matrix holds element
// i at k = 2·(lane % 4) + CL{i}, n = lane / 4 + 8·RH{i}, and the dispatcher uses this kernel
// only then). Measured on the H200 against the same kernel with W staged: +7-10 %
// (benches/RESULTS.md session 23).

@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;

// Invocation q's 16 bytes of row min(row, N - 1) in the 32-k step starting at k - 8q (k clamped
// so the prefetch past the last step stays inside W; never used then).
fn fetch_wf(row: u32, k: u32) -> vec4<u32> {
    return w[(min(row, P.n - 1u) * P.k + min(k, P.k - 8u)) / 8u];
}

// element stubs (src/gpu/spirv.rs)
//@unroll E
fn cm_set{t}_b16(m: coop_mat16x16<f16, B>, x: f16) -> coop_mat16x16<f16, B> { return m; }
//@end

// The B fragment of 16-k half `kk` for 16 columns: `lo` holds row n = lane / 4, `hi` row n + 8.
// Element i is k = 2q + CL{i} of row RH{i}: word 2·kk + CL{i} / 8, half CL{i} % 2 of it.
fn bfrag(lo: vec4<u32>, hi: vec4<u32>, kk: u32) -> coop_mat16x16<f16, B> {
    var m = coop_mat16x16<f16, B>();
    //@unroll E
    let wd{t} = select(lo, hi, RH{t} == 1u)[kk * 2u + CL{t} / 8u];
    m = cm_set{t}_b16(m, f16(unpack2x16float(wd{t})[CL{t} % 2u]));
    //@end
    return m;
}
