// Bindings of both block-scores kernels (scores.wgsl, scores_coop.wgsl): pooled qa, ka
// [BH, Nb, D] f32 read as vec4 (D a multiple of 4; of 16 for the tensor-core kernel), logits
// out [BH, Nb, Nb] f32.

struct Params {
    nb: u32,
    d: u32,
    sqrt_d: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> qa: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> ka: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
