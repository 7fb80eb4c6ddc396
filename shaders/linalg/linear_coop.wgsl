// Linear layer on cooperative matrices (tensor cores): y = act(x·Wᵀ + b) with x [M, K] f32 or
// f16, W [N, K] in f32, f16 or bf16 storage (linear_common.wgsl decodes it), y [M, N] f32 (or
// f16 with the plain epilogue).
// Operands are rounded to f16 when staged into workgroup memory (bf16 weights beyond the f16
// range would overflow: DiT weights are far inside it), products accumulate in f32. f16 x
// (XDT = 1) is staged as stored, without any conversion: eight halves per 16-byte load when
// K % 8 == 0 (linear_loads_vec8.wgsl), four per 8-byte load when K % 4 == 0, else 2-byte loads
// (linear_loads_vec.wgsl / linear_loads.wgsl, paired by linear_loads_pair.wgsl). An f16 x
// rounded to nearest even from an f32 x therefore gives the results of that f32 x bit for bit
// (the f32 path rounds to f16 the same way when staging).
// In the bf16-autocast mode (RB16 = 1, linear_common.wgsl) x is first rounded to bf16, then
// converted to f16: exact for |x| in f16's normal range [2^-14, 65504], so with bf16 weights the
// tensor cores see exactly the bf16 operands. Below 2^-14, f16 subnormals keep steps of 2^-24: a
// bf16 value is still exact down to 2^-17, loses low bits below that and becomes 0 under 2^-25
// (an error of at most 2^-25·|w| per product; 2^-14·|w| on a driver that flushes f16 subnormals
// to 0), negligible next to the products of normal-sized x. Above 65504 it overflows to ±inf,
// as without the mode.
// One workgroup = a TMx128 output tile (TM = 128 or 256 rows of x, a tuned choice) = TM/32
// subgroups of 64x64 (4x4 accumulators each; at TM = 256 twice as many share the W tile), K in
// steps of 32 through workgroup memory, each step's operands loaded one step ahead into
// registers. Edges are masked by the staging (past K) and the epilogue (past M, N); each
// accumulator goes through a 16x16 workgroup scratch for bias and `write_out` (activation and
// f32 store, or the gated residual; linear_store.wgsl / linear_residual.wgsl).
// W in fragment order (WFR blocks, `KOrder::Frag32`, f16 weights uploaded by
// `Gpu::upload_f16_frag` / `upload_bf16_frag`): W is not staged (the WST blocks and the SPW
// staging drop out, 14 KB of workgroup memory at TM = 128); each subgroup loads its 64 columns'
// words one step ahead, one 16-byte load per row and k-step, and builds its B fragments from
// them in registers (linear_loads_wfrag.wgsl), so W's staging stores and fragment loads leave
// the load/store path that bounds this kernel: +9-16 % at the 14B shapes on the H200, 255
// registers (benches/RESULTS.md session 23). x is staged as before.
// Every workgroup array is a multiple of 16 bytes and every cooperative load/store starts at a
// 16-byte boundary (GPU-NOTES.md). The three arrays are 24 KB at TM = 128: NVIDIA's Vulkan
// driver gives the workgroups on an SM 48 KB together, so 8 more bytes (or a fourth variable)
// leave one workgroup per SM instead of two and the kernel runs 1.8x slower on the H200
// (benches/RESULTS.md, sessions 8 and 11; tests/shaders.rs guards the budget).
// The prelude enables f16 and wgpu_cooperative_matrix and defines WDT, ACT, XDT, SG and TM
// (workgroup = TM/32·SG threads).

const KAV: u32 = 10u;          // vec4<f16> row stride of the staged tiles: 32 k + 8 pad halfs
const NSG: u32 = TM / 32u;      // subgroups: (TM / 64) rows x 2 columns of 64x64 tiles
const WGS: u32 = NSG * SG;

var<workgroup> a_s: array<vec4<f16>, TM * KAV>;     // x tile [TM rows][32 k]
//@unroll WST
var<workgroup> b_s: array<vec4<f16>, 128u * KAV>;   // W tile [128 rows of W][32 k]
//@end
var<workgroup> c_s: array<f32, 256u * NSG>;         // per subgroup one 16x16 f32 scratch

// PROBE (diagnostics for `nabla bench gemm`, wrong results): bit 0 skips the storage loads,
// bit 1 the matrix products; 0 in every real run.
// A fetched x span (`fetch_x8`) as staged: f16, zeros past K.
fn stage_x(v: XSPAN, row: u32, k: u32) -> mat2x4<f16> {
    if ((PROBE & 1u) != 0u) {
        return mat2x4<f16>(vec4<f16>(f16(row & 7u)), vec4<f16>(f16(row & 7u)));
    }
    let s = span_x8(v, k);
    if (XDT != 0u) {
        // f16 storage: as stored (a conversion of f16 to f16: none)
        return mat2x4<f16>(s);
    }
    return mat2x4<f16>(vec4<f16>(round_x4(vec4<f32>(s[0]))), vec4<f16>(round_x4(vec4<f32>(s[1]))));
}

//@unroll WST
// A fetched W span (`fetch_w8`) as staged: f16, zeros past K.
fn stage_w(v: WSPAN, k: u32) -> mat2x4<f16> {
    if ((PROBE & 1u) != 0u) {
        return mat2x4<f16>(vec4<f16>(f16(k & 7u)), vec4<f16>(f16(k & 7u)));
    }
    return mat2x4<f16>(span_w8(v, k));
}
//@end

fn epilogue(c: coop_mat16x16<f32, C>, sg: u32, lane: u32, row0: u32, col0: u32) {
    coopStoreT(c, &c_s[sg * 256u], 16u);
    workgroupBarrier();
    for (var e = lane; e < 256u; e += SG) {
        let r = row0 + e / 16u;
        let col = col0 + e % 16u;
        if (r < P.m && col < P.n) {
            write_out(r * P.n + col, col, pre_act(c_s[sg * 256u + e], col));
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(WGS)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_id) sg: u32,
        @builtin(subgroup_invocation_id) lane: u32) {
    let tile = wid.x + wid.y * nwg.x;
    if (tile >= P.tiles) {
        return;
    }
    // bands of `group` row tiles, so neighbouring workgroups share W columns in cache
    let band = tile / (P.group * P.tiles_n);
    let in_band = tile % (P.group * P.tiles_n);
    let rows_in_band = min(P.group, P.tiles_m - band * P.group);
    let tm = band * P.group + in_band % rows_in_band;
    let tn = in_band / rows_in_band;
    let m0 = tm * TM;
    let n0 = tn * 128u;
    let sy = sg / 2u;
    let sx = sg % 2u;
    //@unroll T4
    var c{t}0 = coop_mat16x16<f32, C>();
    var c{t}1 = coop_mat16x16<f32, C>();
    var c{t}2 = coop_mat16x16<f32, C>();
    var c{t}3 = coop_mat16x16<f32, C>();
    //@end
    // Each k-step's operands are fetched from storage into registers (SPX spans of eight x and
    // SPW of eight W values per thread, as stored) one step ahead: step k+32's loads are issued
    // before step k's products and only converted and stored into workgroup memory after them,
    // so their latency hides behind the products instead of stalling every subgroup at the top
    // of each step. Measured on the H200 (benches/RESULTS.md, session 16): 167 -> 205 TFLOP/s
    // at 4096^3, 174-186 -> 226-238 at the 14B shapes. A prefetch had been 3-5 % slower in
    // session 10, when the loads carried their bounds selects and decoding; the driver's machine
    // code (session 16) shows such consumers placed right after the loads. The fetch is now
    // unpredicated (clamped addresses) and all conversion happens in `stage_x` / `stage_w`.
    // The staging is unrolled with a constant trip count (a loop from `lid` with a run-time
    // bound kept every load in flight alone: ~6x slower). Four threads per row, eight k each:
    // with K % 8 == 0 each span is one 16-byte load (linear_loads_vec8.wgsl).
    let sr = lid / 4u;
    let sc = lid % 4u;
    //@unroll SPX
    var xr{t} = fetch_x8(m0 + sr + {t}u * (WGS / 4u), sc * 8u);
    //@end
    //@unroll SPW
    var wr{t} = fetch_w8(n0 + sr + {t}u * (WGS / 4u), sc * 8u);
    //@end
    // W in fragment order (linear_loads_wfrag.wgsl): this subgroup's 64 columns of W, rows
    // n = fn0 + 16·j (+ 8), invocation q's eight k of the step in one 16-byte load each
    //@unroll WFR
    let fq = lane % 4u;
    let fn0 = n0 + sx * 64u + lane / 4u;
    var wq00 = fetch_wf(fn0, fq * 8u);
    var wq01 = fetch_wf(fn0 + 8u, fq * 8u);
    var wq10 = fetch_wf(fn0 + 16u, fq * 8u);
    var wq11 = fetch_wf(fn0 + 24u, fq * 8u);
    var wq20 = fetch_wf(fn0 + 32u, fq * 8u);
    var wq21 = fetch_wf(fn0 + 40u, fq * 8u);
    var wq30 = fetch_wf(fn0 + 48u, fq * 8u);
    var wq31 = fetch_wf(fn0 + 56u, fq * 8u);
    //@end
    for (var k0 = 0u; k0 < P.k; k0 += 32u) {
        //@unroll SPX
        let xs{t} = stage_x(xr{t}, m0 + sr + {t}u * (WGS / 4u), k0 + sc * 8u);
        a_s[(sr + {t}u * (WGS / 4u)) * KAV + sc * 2u] = xs{t}[0];
        a_s[(sr + {t}u * (WGS / 4u)) * KAV + sc * 2u + 1u] = xs{t}[1];
        //@end
        //@unroll SPW
        let ws{t} = stage_w(wr{t}, k0 + sc * 8u);
        b_s[(sr + {t}u * (WGS / 4u)) * KAV + sc * 2u] = ws{t}[0];
        b_s[(sr + {t}u * (WGS / 4u)) * KAV + sc * 2u + 1u] = ws{t}[1];
        //@end
        workgroupBarrier();
        // the next step's operands (past K on the last step: clamped, never staged)
        //@unroll SPX
        xr{t} = fetch_x8(m0 + sr + {t}u * (WGS / 4u), k0 + 32u + sc * 8u);
        //@end
        //@unroll SPW
        wr{t} = fetch_w8(n0 + sr + {t}u * (WGS / 4u), k0 + 32u + sc * 8u);
        //@end
        //@unroll WFR
        let wn00 = fetch_wf(fn0, k0 + 32u + fq * 8u);
        let wn01 = fetch_wf(fn0 + 8u, k0 + 32u + fq * 8u);
        let wn10 = fetch_wf(fn0 + 16u, k0 + 32u + fq * 8u);
        let wn11 = fetch_wf(fn0 + 24u, k0 + 32u + fq * 8u);
        let wn20 = fetch_wf(fn0 + 32u, k0 + 32u + fq * 8u);
        let wn21 = fetch_wf(fn0 + 40u, k0 + 32u + fq * 8u);
        let wn30 = fetch_wf(fn0 + 48u, k0 + 32u + fq * 8u);
        let wn31 = fetch_wf(fn0 + 56u, k0 + 32u + fq * 8u);
        //@end
        for (var kk = 0u; kk < 2u; kk++) {
            if ((PROBE & 2u) != 0u) {
                break;
            }
            //@unroll WST
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&b_s[(sx * 64u) * KAV + kk * 4u], KAV);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&b_s[(sx * 64u + 16u) * KAV + kk * 4u], KAV);
            let b2 = coopLoad<coop_mat16x16<f16, B>>(&b_s[(sx * 64u + 32u) * KAV + kk * 4u], KAV);
            let b3 = coopLoad<coop_mat16x16<f16, B>>(&b_s[(sx * 64u + 48u) * KAV + kk * 4u], KAV);
            //@end
            //@unroll WFR
            let b0 = bfrag(wq00, wq01, kk);
            let b1 = bfrag(wq10, wq11, kk);
            let b2 = bfrag(wq20, wq21, kk);
            let b3 = bfrag(wq30, wq31, kk);
            //@end
            //@unroll T4
            let a{t} = coopLoadT<coop_mat16x16<f16, A>>(&a_s[(sy * 64u + {t}u * 16u) * KAV + kk * 4u], KAV);
            c{t}0 = coopMultiplyAdd(a{t}, b0, c{t}0);
            c{t}1 = coopMultiplyAdd(a{t}, b1, c{t}1);
            c{t}2 = coopMultiplyAdd(a{t}, b2, c{t}2);
            c{t}3 = coopMultiplyAdd(a{t}, b3, c{t}3);
            //@end
        }
        //@unroll WFR
        wq00 = wn00;
        wq01 = wn01;
        wq10 = wn10;
        wq11 = wn11;
        wq20 = wn20;
        wq21 = wn21;
        wq30 = wn30;
        wq31 = wn31;
        //@end
        workgroupBarrier();
    }
    //@unroll T4
    epilogue(c{t}0, sg, lane, m0 + sy * 64u + {t}u * 16u, n0 + sx * 64u);
    epilogue(c{t}1, sg, lane, m0 + sy * 64u + {t}u * 16u, n0 + sx * 64u + 16u);
    epilogue(c{t}2, sg, lane, m0 + sy * 64u + {t}u * 16u, n0 + sx * 64u + 32u);
    epilogue(c{t}3, sg, lane, m0 + sy * 64u + {t}u * 16u, n0 + sx * 64u + 48u);
    //@end
}
