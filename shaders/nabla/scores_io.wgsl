// Bindings of both block-scores kernels (scores.wgsl, scores_coop.wgsl): pooled qa, ka
// [BH, Nb, D] f32 read as vec4 (D a multiple of 4; of 16 for the tensor-core kernel), logits
// out [BH, Nb, stride] f32 (rows of Nb logits, `stride` >= Nb floats apart).

struct Params {
    nb: u32,
    d: u32,
    sqrt_d: f32,
    stride: u32,
    inv_sqrt_d: f32,  // 1 / sqrt_d rounded to f32 (the tensor-core kernel multiplies by it)
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> qa: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> ka: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
