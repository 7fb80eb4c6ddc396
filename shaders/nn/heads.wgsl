// Head layout moves between [S, H*D] and [H, S, D], in elements of type V (f32, or vec4<f32>
// when D % 4 == 0; dv = D in units of V). One output element per thread, element
// i = (wid.x + wid.y * num_workgroups.x) * 256 + lid, so writes are fully coalesced and reads
// come in contiguous runs of D values.
//
// The prelude (src/ops/elementwise.rs) defines `alias VI` / `alias VO` (input and output element
// types: f32 both, or f16 on the heads side for the tensor-core attention, and for a merge also
// f16 on the tokens side, for a GEMM that reads f16; f32 -> f16 rounds to nearest even) and
// `const MERGE: bool`:
//   split (MERGE = false): out[h, s, d] = x[s, h*D + d]
//   merge (MERGE = true):  out[s, h*D + d] = x[h, s, d]

struct Params {
    n: u32,
    s: u32,
    h: u32,
    dv: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<VI>;
@group(0) @binding(2) var<storage, read_write> out: array<VO>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= P.n) {
        return;
    }
    let d = i % P.dv;
    let r = i / P.dv;
    var src: u32;
    if (MERGE) {
        // r = s * H + h
        let h = r % P.h;
        let s = r / P.h;
        src = (h * P.s + s) * P.dv + d;
    } else {
        // r = h * S + s
        let s = r % P.s;
        let h = r / P.s;
        src = (s * P.h + h) * P.dv + d;
    }
    out[i] = VO(x[src]);
}
