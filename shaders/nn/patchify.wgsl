// Patch gather of the Wan DiT patch embedding, patch size (1, 2, 2):
//   z [C, F, H, W] -> tokens [F * H/2 * W/2, 4 C],
//   tokens[s, (c * 2 + q) * 2 + r] = z[c, f, 2h + q, 2w + r],  s = (f * H/2 + h) * W/2 + w
// (per-token vector order (c, q, r), c slowest; a linear with the Conv3d weight reshaped to
// [dim, 4 C] then gives the patch embedding).
// Pure data movement on 32-bit words, so one body serves every element type. The prelude
// (added by the dispatcher) defines PACK: 1 = one 32-bit element per word, 2 = two 16-bit
// elements per word; for 16-bit types the pair r = 0, 1 is one word on both sides (W is even).
// One invocation per output word.

struct Params {
    c: u32,
    f: u32,
    h: u32,      // latent height H (even)
    w: u32,      // latent width W (even)
    words: u32,  // output words: S * 4 C / PACK
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> z: array<u32>;
@group(0) @binding(2) var<storage, read_write> tokens: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let o = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (o >= P.words) {
        return;
    }
    let hp = P.h / 2u;
    let wp = P.w / 2u;
    let per_token = 4u * P.c / PACK;
    let s = o / per_token;
    let k = o % per_token;
    let w = s % wp;
    let h = (s / wp) % hp;
    let f = s / (wp * hp);
    if (PACK == 1u) {
        let c = k / 4u;
        let q = (k / 2u) % 2u;
        let r = k % 2u;
        tokens[o] = z[((c * P.f + f) * P.h + 2u * h + q) * P.w + 2u * w + r];
    } else {
        let c = k / 2u;
        let q = k % 2u;
        tokens[o] = z[((c * P.f + f) * P.h + 2u * h + q) * wp + w];
    }
}
