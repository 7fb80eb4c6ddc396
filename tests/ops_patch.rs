//! Patch gather and unpatchify against the CPU reference on fresh random inputs, outputs
//! poisoned first. Both are data movement, so results must be bitwise equal.

mod common;

use common::{POISON, Rng, assert_close, gpu};
use nabla::ops::patch::{patchify, record_patchify, record_unpatchify, unpatchify};
use nabla::reference::nn::patch as reference_patch;
use nabla::{DType, Error, Gpu, Tensor};

/// Latent dims `(C, F, H, W)`: H, W even, the patch grid mostly not a multiple of 8.
const DIMS: [(usize, usize, usize, usize); 5] = [
    (1, 1, 2, 2),
    (16, 1, 2, 2),
    (3, 2, 6, 10),
    (16, 3, 14, 18),
    (5, 2, 34, 4),
];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn upload(g: &Gpu, data: &[f32], shape: &[usize], dtype: DType) -> Tensor {
    match dtype {
        DType::F32 => g.upload_f32(data, shape),
        DType::F16 => g.upload_f16(data, shape),
        DType::BF16 => g.upload_bf16(data, shape),
        DType::U32 => unreachable!(),
    }
    .unwrap()
}

fn tokens_of(d: (usize, usize, usize, usize)) -> usize {
    d.1 * (d.2 / 2) * (d.3 / 2)
}

#[test]
fn patchify_matches_reference() {
    let g = gpu();
    let mut rng = Rng::fresh(0x3001);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for d in DIMS {
            let (c, f, h, w) = d;
            let z0 = rng.normals(c * f * h * w, 1.0);
            let zt = upload(g, &z0, &[c, f, h, w], dtype);
            let z = g.read_f32(&zt).unwrap(); // as stored
            let tokens = g.empty(&[tokens_of(d), 4 * c], dtype).unwrap();
            g.fill_u32(&tokens, POISON);
            let mut b = g.batch();
            record_patchify(&mut b, &zt, &tokens).unwrap();
            b.submit().unwrap();
            let got = g.read_f32(&tokens).unwrap();
            let want = reference_patch::patchify(&z, d);
            assert!(
                got.iter().all(|v| !v.is_nan()),
                "{dtype:?} {d:?}: unwritten"
            );
            assert_eq!(bits(&got), bits(&want), "patchify {dtype:?} {d:?}");
        }
    }
}

#[test]
fn unpatchify_matches_reference() {
    let g = gpu();
    let mut rng = Rng::fresh(0x3002);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for d in DIMS {
            let (c, f, h, w) = d;
            let o0 = rng.normals(tokens_of(d) * 4 * c, 1.0);
            let ot = upload(g, &o0, &[tokens_of(d), 4 * c], dtype);
            let out = g.read_f32(&ot).unwrap();
            let v = g.empty(&[c, f, h, w], dtype).unwrap();
            g.fill_u32(&v, POISON);
            let mut b = g.batch();
            record_unpatchify(&mut b, &ot, &v).unwrap();
            b.submit().unwrap();
            let got = g.read_f32(&v).unwrap();
            let want = reference_patch::unpatchify(&out, d);
            assert!(
                got.iter().all(|v| !v.is_nan()),
                "{dtype:?} {d:?}: unwritten"
            );
            assert_eq!(bits(&got), bits(&want), "unpatchify {dtype:?} {d:?}");
        }
    }
}

#[test]
fn index_maps_follow_the_spec() {
    // u32 element ids: the kernels move exactly the elements the spec formulas name
    let g = gpu();
    let d = (3, 2, 6, 10);
    let (c, f, h, w) = d;
    let (hp, wp) = (h / 2, w / 2);
    let ids: Vec<u32> = (0..(c * f * h * w) as u32).collect();
    let zt = g.upload_u32(&ids, &[c, f, h, w]).unwrap();
    let tokens = g.empty(&[tokens_of(d), 4 * c], DType::U32).unwrap();
    g.fill_u32(&tokens, POISON);
    let mut b = g.batch();
    record_patchify(&mut b, &zt, &tokens).unwrap();
    b.submit().unwrap();
    let t = g.read_u32(&tokens).unwrap();
    let v = unpatchify(g, &tokens, (f, h, w)).unwrap();
    let back = g.read_u32(&v).unwrap();
    for fi in 0..f {
        for hi in 0..hp {
            for wi in 0..wp {
                let s = (fi * hp + hi) * wp + wi;
                for ci in 0..c {
                    for q in 0..2 {
                        for r in 0..2 {
                            let z_at = ((ci * f + fi) * h + 2 * hi + q) * w + 2 * wi + r;
                            // spec §2.2: (c, q, r), c slowest
                            assert_eq!(t[s * 4 * c + (ci * 2 + q) * 2 + r] as usize, z_at);
                            // spec §2.9: v[c, f, 2h+q, 2w+r] = out[s, q·2C + r·C + c]
                            let o_at = s * 4 * c + q * 2 * c + r * c + ci;
                            assert_eq!(back[z_at], t[o_at]);
                        }
                    }
                }
            }
        }
    }
}

/// Reorders per-token columns from (c, q, r) (patchify) to (q, r, c) (head output layout).
fn crq_to_qrc(tokens: &[f32], c: usize) -> Vec<f32> {
    let mut out = vec![0f32; tokens.len()];
    for (s, row) in tokens.chunks(4 * c).enumerate() {
        for ci in 0..c {
            for q in 0..2 {
                for r in 0..2 {
                    out[s * 4 * c + q * 2 * c + r * c + ci] = row[(ci * 2 + q) * 2 + r];
                }
            }
        }
    }
    out
}

#[test]
fn patchify_unpatchify_round_trip() {
    let g = gpu();
    let mut rng = Rng::fresh(0x3003);
    for d in DIMS {
        let (c, f, h, w) = d;
        let s = tokens_of(d);
        // latent → tokens → (columns to the head layout) → latent is the identity
        let z = rng.normals(c * f * h * w, 1.0);
        let zt = g.upload_f32(&z, &[c, f, h, w]).unwrap();
        let tokens = patchify(g, &zt).unwrap();
        let head = crq_to_qrc(&g.read_f32(&tokens).unwrap(), c);
        let ht = g.upload_f32(&head, &[s, 4 * c]).unwrap();
        let back = unpatchify(g, &ht, (f, h, w)).unwrap();
        assert_eq!(
            bits(&g.read_f32(&back).unwrap()),
            bits(&z),
            "{d:?}: z round trip"
        );
        // head output → latent → tokens, one batch: the columns come back as (c, q, r)
        let out = rng.normals(s * 4 * c, 1.0);
        let ot = g.upload_f32(&out, &[s, 4 * c]).unwrap();
        let v = g.empty(&[c, f, h, w], DType::F32).unwrap();
        let t2 = g.empty(&[s, 4 * c], DType::F32).unwrap();
        g.fill_u32(&v, POISON);
        g.fill_u32(&t2, POISON);
        let mut b = g.batch();
        record_unpatchify(&mut b, &ot, &v).unwrap();
        record_patchify(&mut b, &v, &t2).unwrap();
        b.submit().unwrap();
        let got = crq_to_qrc(&g.read_f32(&t2).unwrap(), c);
        assert_eq!(bits(&got), bits(&out), "{d:?}: head output round trip");
    }
}

#[test]
fn patchify_then_linear_is_the_conv3d() {
    // the gather order matches the Conv3d weight [dim, C, 1, 2, 2] read as [dim, 4C]
    let g = gpu();
    let mut rng = Rng::fresh(0x3004);
    let d = (16, 2, 6, 10);
    let (c, f, h, w) = d;
    let dim = 24;
    let z = rng.normals(c * f * h * w, 1.0);
    let weight = rng.normals(dim * c * 4, 0.2);
    let bias = rng.normals(dim, 0.5);
    let tokens = patchify(g, &g.upload_f32(&z, &[c, f, h, w]).unwrap()).unwrap();
    let t = g.read_f32(&tokens).unwrap();
    let k = 4 * c;
    let mut got = Vec::with_capacity(tokens_of(d) * dim);
    for row in t.chunks(k) {
        for o in 0..dim {
            let acc: f64 = (0..k)
                .map(|i| row[i] as f64 * weight[o * k + i] as f64)
                .sum::<f64>()
                + bias[o] as f64;
            got.push(acc as f32);
        }
    }
    let want = reference_patch::patch_embed(&z, d, &weight, &bias);
    assert_close("patch embedding", &got, &want, 1e-6, 1e-6, 1e-7);
}

fn expect_shape_err<T: std::fmt::Debug>(what: &str, r: nabla::Result<T>) {
    match r {
        Err(Error::Shape(m)) => eprintln!("{what}: {m}"),
        other => panic!("{what}: expected a shape error, got {other:?}"),
    }
}

#[test]
fn patch_ops_reject_bad_shapes() {
    let g = gpu();
    let z = |shape: &[usize]| {
        g.upload_f32(&vec![0.0; shape.iter().product()], shape)
            .unwrap()
    };
    expect_shape_err("odd H", patchify(g, &z(&[4, 1, 5, 4])));
    expect_shape_err("odd W", patchify(g, &z(&[4, 1, 4, 7])));
    expect_shape_err("3-D latent", patchify(g, &z(&[4, 4, 4])));
    expect_shape_err("empty axis", patchify(g, &z(&[0, 1, 4, 4])));
    let zt = z(&[4, 2, 4, 6]);
    let mut b = g.batch();
    expect_shape_err("tokens rows", record_patchify(&mut b, &zt, &z(&[11, 16])));
    expect_shape_err("tokens cols", record_patchify(&mut b, &zt, &z(&[12, 15])));
    let t16 = g.upload_f16(&vec![0.0; 12 * 16], &[12, 16]).unwrap();
    expect_shape_err("dtype mismatch", record_patchify(&mut b, &zt, &t16));
    expect_shape_err(
        "unpatchify v rows",
        record_unpatchify(&mut b, &z(&[12, 16]), &z(&[4, 2, 6, 6])),
    );
    expect_shape_err(
        "unpatchify odd W",
        record_unpatchify(&mut b, &z(&[12, 16]), &z(&[4, 2, 4, 5])),
    );
    expect_shape_err("unpatchify dtype", record_unpatchify(&mut b, &t16, &zt));
    b.submit().unwrap();
    expect_shape_err("cols not 4C", unpatchify(g, &z(&[12, 15]), (2, 4, 6)));
    expect_shape_err("1-D output", unpatchify(g, &z(&[192]), (2, 4, 6)));
    expect_shape_err("latent mismatch", unpatchify(g, &z(&[12, 16]), (2, 4, 8)));
    expect_shape_err("odd latent H", unpatchify(g, &z(&[12, 16]), (2, 3, 8)));
    g.check().unwrap();
}
