// Unpatchify of the Wan DiT head output, patch size (1, 2, 2):
//   out [F * H/2 * W/2, 4 C] -> v [C, F, H, W],
//   v[c, f, 2h + q, 2w + r] = out[s, q * 2C + r * C + c],  s = (f * H/2 + h) * W/2 + w
// (per-token layout (q, r, c), c fastest).
// Pure data movement on 32-bit words, so one body serves every element type. The prelude
// (added by the dispatcher) defines PACK: 1 = one 32-bit element per word, 2 = two 16-bit
// elements per word (an output word holds v[.., 2w] in its low half and v[.., 2w + 1] in its
// high half; W is even). One invocation per output word.

struct Params {
    c: u32,
    f: u32,
    h: u32,      // latent height H (even)
    w: u32,      // latent width W (even)
    words: u32,  // output words: C * F * H * W / PACK
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> v: array<u32>;

// 16-bit element e of src (little endian: even elements in the low half)
fn half_of(e: u32) -> u32 {
    return (src[e / 2u] >> (16u * (e % 2u))) & 0xffffu;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let o = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (o >= P.words) {
        return;
    }
    let hp = P.h / 2u;
    let wp = P.w / 2u;
    let row_words = P.w / PACK;
    let xw = o % row_words;
    let y = (o / row_words) % P.h;
    let f = (o / (row_words * P.h)) % P.f;
    let c = o / (row_words * P.h * P.f);
    let h = y / 2u;
    let q = y % 2u;
    if (PACK == 1u) {
        let s = (f * hp + h) * wp + xw / 2u;
        v[o] = src[s * 4u * P.c + q * 2u * P.c + (xw % 2u) * P.c + c];
    } else {
        let s = (f * hp + h) * wp + xw;
        let e = s * 4u * P.c + q * 2u * P.c + c;
        v[o] = half_of(e) | (half_of(e + P.c) << 16u);
    }
}
