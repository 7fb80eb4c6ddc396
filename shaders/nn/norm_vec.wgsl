// LayerNorm / RMSNorm with the row in registers, for rows of C columns with C % 4 == 0 and
// C <= 4·256·NV (every DiT and umT5 width): the same math and prelude contract as norm.wgsl
// (RMS, OE; Params and P from norm_common.wgsl), with the epilogue applied to four columns at once
// (`epilogue4`, whose weights / modulation rows are vec4 bindings). Each of the 256 threads
// loads its NV vec4 of the row once (norm.wgsl reads x two or three times, one f32 at a time),
// and the reductions (`reduce_sum` and the entry point: norm_vec_sg.wgsl with subgroups, else
// norm_vec_wg.wgsl) take two barriers with subgroups instead of nine.
// Measured on the H200 (Vulkan, benches/RESULTS.md session 20): the Wan 14B forward's norms
// and modulation took 157 ms instead of 309 ms (RMSNorm 0.90 -> 0.53 ms per 67 200 x 5120 rows).

@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<OE>>;

const WG: u32 = 256u;

// Row `row` (uniform across the workgroup), thread lid.
fn row_main(row: u32, lid: u32) {
    if (row >= P.rows) {
        return;
    }
    let n4 = P.cols / 4u;
    let base = row * n4;
    let fc = f32(P.cols);
    // x - pivot (pivot: the row's first value for LayerNorm, 0 for RMSNorm; see norm.wgsl);
    // vec4s past the row hold 0 and are left out of every sum
    var pivot = 0.0;
    if (!RMS) {
        pivot = x[base].x;
    }
    var s = 0.0;
    //@unroll NV
    let live{t} = lid + {t}u * WG < n4;
    var v{t} = vec4<f32>(0.0);
    if (live{t}) {
        v{t} = x[base + lid + {t}u * WG] - pivot;
    }
    s += (v{t}.x + v{t}.y) + (v{t}.z + v{t}.w);
    //@end
    var mu = 0.0;
    if (!RMS) {
        mu = reduce_sum(s, lid) / fc;
    }
    var q = 0.0;
    //@unroll NV
    if (live{t}) {
        let d = v{t} - mu;
        q += (d.x * d.x + d.y * d.y) + (d.z * d.z + d.w * d.w);
    }
    //@end
    let r = inverseSqrt(reduce_sum(q, lid) / fc + P.eps);
    //@unroll NV
    if (live{t}) {
        let c = lid + {t}u * WG;
        out[base + c] = vec4<OE>(epilogue4(c, (v{t} - mu) * r));
    }
    //@end
}
