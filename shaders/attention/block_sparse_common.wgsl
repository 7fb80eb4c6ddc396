// What the two tensor-core attention kernels share (appended to block_sparse_coop.wgsl and
// block_sparse_regs.wgsl): constants, the parameters and the bindings they declare alike, and the
// staging of K / V chunks. Each kernel declares k, v (spans of eight f16, `H8`) and out itself.

const QV: u32 = HD / 4u;          // vec4s per row
const KSV: u32 = HD / 4u + 2u;    // vec4<f16> row stride of staged K / V / Q
const WGS: u32 = NSG * SG;
// Lazy rescaling threshold (log2 units): a row keeps its reference maximum until a chunk
// exceeds it by more than this, so P = exp2(s - reference) <= 2^15 = 32768 < 65504, f16's
// largest (block_sparse_coop.wgsl says more).
const RESCALE: f32 = 15.0;

struct Params {
    sq: u32,
    skv: u32,
    nqb: u32,
    nkb: u32,
    mask_heads: u32,
    scale_log2e: f32,
    order: u32,     // 1: scrambled starting offsets (full lists), 0: by query block
    _p1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f16>>;
@group(0) @binding(4) var<storage, read> counts: array<u32>;
@group(0) @binding(5) var<storage, read> indices: array<u32>;

// The 16-byte span (two vec4: one H8 of the k / v bindings) of a 32-row K/V chunk that
// thread lid stages in unrolled slot t: span lid + t·WGS of the chunk's 16·QV. Spans, not
// single vec4, are the unit since session 4 (one vec4 per slot left twice as many 8-byte
// loads: 14B dense attention 1 733 -> 1 342 ms on the H200). A span is one register quad
// until it is staged: four u32 words, one 16-byte load (as one mat2x4<f16>, two 8-byte
// loads: nabla-0.7 215.0 ms on the H200 against 187.2, benches/RESULTS.md session 19). When
// the chunk has fewer spans than threads (KSTP = 0: 8 subgroups of 64 lanes at head dim 64),
// the second half of the threads stages the first half's spans again: the same values to the
// same places.
fn span(lid: u32, t: u32) -> u32 {
    let p = lid + t * WGS;
    if (KSTP == 0u) {
        return p % (16u * QV);
    }
    return p;
}

// Where span p is staged in kvs (vec4 units). The index is written as 2·h so that the
// compiler sees it even: the span's two 8-byte stores then merge into one 16-byte store
// (STS.128 in the H200's machine code; the same address computed from the element index
// stayed two STS.64). Measured on the H200 (wan14b-720p, benches/RESULTS.md session 18):
// nabla-0.7 221.9 -> 217.8 ms, dense 538.5 -> 530.7 ms. Writing the P stores of
// block_sparse_coop.wgsl the same way changed nothing (the same machine code).
fn slot(p: u32) -> u32 {
    return 2u * ((p / (QV / 2u)) * (KSV / 2u) + p % (QV / 2u));
}

// span p (16-byte index within a 32-row chunk, `span`) of K (which = 1) or V (2) rows
// [row0, row0+32).
// Rows past len read row len - 1 (len > 0 is validated by the dispatcher): the load is clamped,
// not predicated, so no select-to-zero consumes it before the staging store (the machine code
// showed those selects waiting for the V loads in the middle of the S products). The softmax
// masks the logits of keys past len to -inf whenever a chunk reaches past the keys, so their
// P is exactly 0 and the clamped rows' finite values add nothing. Measured on the H200
// (wan14b-720p, benches/RESULTS.md session 17): nabla-0.7 247.0 -> 244.3 ms.
fn ld(which: u32, bh: u32, row0: u32, len: u32, p: u32) -> H8 {
    // PROBE (diagnostics of the bench, wrong results): bit 0 skips these loads, bit 2 the MMAs
    if ((PROBE & 1u) != 0u) {
        return h8_filler(p);
    }
    let t = min(row0 + p / (QV / 2u), len - 1u);
    let g = (bh * len + t) * (QV / 2u) + p % (QV / 2u);
    if (which == 1u) {
        return k[g];
    }
    return v[g];
}
