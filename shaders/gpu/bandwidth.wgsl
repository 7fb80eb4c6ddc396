// Read-bandwidth probe: invocation i xors the 16-byte words src[(i + (4r + j)·S) & P.mask] for
// rounds r < P.rounds and j < 4 (four independent loads in flight per round; consecutive
// invocations on consecutive words, so every warp-wide load is one contiguous 512-byte run),
// folds its four accumulators and their four lanes into one word and writes it to out[i], so
// no compiler can drop a load. S = P.stride is the dispatch's invocation count plus a shift of
// whole 512-byte runs (src/gpu/bandwidth.rs): without the shift an invocation would read the
// same words every round of a window that divides the grid, from its own L1. The working set
// is the first P.mask + 1 words of src (a power of two): below the L2 size the loads hit L2,
// far above it they come from device memory. The prelude defines W (invocations per
// workgroup).

struct Params {
    mask: u32,
    rounds: u32,
    stride: u32,
    _p: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(W)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * W + lid;
    var a = vec4<u32>();
    var b = vec4<u32>();
    var c = vec4<u32>();
    var d = vec4<u32>();
    for (var r = 0u; r < P.rounds; r++) {
        let base = i + 4u * r * P.stride;
        a ^= src[base & P.mask];
        b ^= src[(base + P.stride) & P.mask];
        c ^= src[(base + 2u * P.stride) & P.mask];
        d ^= src[(base + 3u * P.stride) & P.mask];
    }
    let x = a ^ b ^ c ^ d;
    out[i] = x.x ^ x.y ^ x.z ^ x.w;
}
