// Row permutation between natural token order and fractal (8x8 tile) order for [S, C] tensors
// of an (F, H, W) grid, moving 32-bit words (works for any dtype whose row is a whole number of words).
// Fractal position j of token (f, y, x): j = f*H*W + ((y/8)*(W/8) + x/8)*64 + (y%8)*8 + x%8.
// to_fractal (inverse = 0): out[j] = in[perm(j)];  from_fractal (inverse = 1): out[n] = in[inv(n)].

struct Params {
    h: u32,
    w: u32,
    rows: u32,
    words: u32,
    inverse: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

// natural index of the token at fractal position j
fn natural_of(j: u32) -> u32 {
    let hw = P.h * P.w;
    let f = j / hw;
    let r = j % hw;
    let tile = r / 64u;
    let g = r % 64u;
    let wb = P.w / 8u;
    let y = (tile / wb) * 8u + g / 8u;
    let x = (tile % wb) * 8u + g % 8u;
    return f * hw + y * P.w + x;
}

// fractal position of the token at natural index n
fn fractal_of(n: u32) -> u32 {
    let hw = P.h * P.w;
    let f = n / hw;
    let r = n % hw;
    let y = r / P.w;
    let x = r % P.w;
    return f * hw + ((y / 8u) * (P.w / 8u) + x / 8u) * 64u + (y % 8u) * 8u + x % 8u;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let out_row = wid.x + wid.y * nwg.x;
    if (out_row >= P.rows) {
        return;
    }
    var in_row = 0u;
    if (P.inverse == 0u) {
        in_row = natural_of(out_row);
    } else {
        in_row = fractal_of(out_row);
    }
    for (var c = lid; c < P.words; c += 64u) {
        dst[out_row * P.words + c] = src[in_row * P.words + c];
    }
}
