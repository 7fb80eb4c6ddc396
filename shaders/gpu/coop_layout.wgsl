// Which elements of a 16x16 cooperative matrix each invocation holds, in the order that
// SPIR-V's OpCompositeExtract / OpCompositeInsert address them (cm_get{i} / cm_set{i}, see
// src/gpu/spirv.rs). One subgroup of SG = 32 invocations, 8 elements each:
// - out[lane·8 + i] = element i of an f32 C matrix loaded row-major from values r·16 + c, so it
//   names the row and column that element holds;
// - out[256 + r·16 + c] = (an f16 A matrix built element by element from that C matrix's
//   elements) · identity, stored row-major: r·16 + c again exactly when A's element i of each
//   invocation sits where C's does (what a softmax computed on C's elements and multiplied as A
//   needs);
// - out[512 + r·16 + c] = identity · (an f16 B matrix whose element i of each invocation is set
//   to the transposed index c·16 + r of C's element i, r·16 + c), stored row-major: r·16 + c
//   again exactly when B holds element i at row c, column r of C's (the k-pairs of NVIDIA's B
//   fragments: what the linear kernel building W's fragments from storage needs).

@group(0) @binding(0) var<storage, read_write> out: array<f32>;

var<workgroup> src: array<f32, 256>;
var<workgroup> ident: array<f16, 256>;
var<workgroup> dst: array<f32, 256>;
var<workgroup> dst_b: array<f32, 256>;

//@unroll E
fn cm_get{t}_c32(m: coop_mat16x16<f32, C>) -> f32 { return 0.0; }
fn cm_set{t}_a16(m: coop_mat16x16<f16, A>, x: f16) -> coop_mat16x16<f16, A> { return m; }
fn cm_set{t}_b16(m: coop_mat16x16<f16, B>, x: f16) -> coop_mat16x16<f16, B> { return m; }
//@end

@compute @workgroup_size(32)
fn main(@builtin(local_invocation_index) lid: u32) {
    for (var e = lid; e < 256u; e += 32u) {
        src[e] = f32(e);
        ident[e] = select(0.0h, 1.0h, e / 16u == e % 16u);
    }
    workgroupBarrier();
    let c = coopLoadT<coop_mat16x16<f32, C>>(&src[0], 16u);
    var a = coop_mat16x16<f16, A>();
    var b = coop_mat16x16<f16, B>();
    //@unroll E
    let x{t} = cm_get{t}_c32(c);
    out[lid * 8u + {t}u] = x{t};
    a = cm_set{t}_a16(a, f16(x{t}));
    let v{t} = u32(x{t});
    b = cm_set{t}_b16(b, f16((v{t} % 16u) * 16u + v{t} / 16u));
    //@end
    let id = coopLoadT<coop_mat16x16<f16, B>>(&ident[0], 16u);
    coopStoreT(coopMultiplyAdd(a, id, coop_mat16x16<f32, C>()), &dst[0], 16u);
    let ida = coopLoadT<coop_mat16x16<f16, A>>(&ident[0], 16u);
    coopStoreT(coopMultiplyAdd(ida, b, coop_mat16x16<f32, C>()), &dst_b[0], 16u);
    workgroupBarrier();
    for (var e = lid; e < 256u; e += 32u) {
        out[256u + e] = dst[e];
        out[512u + e] = dst_b[e];
    }
}
