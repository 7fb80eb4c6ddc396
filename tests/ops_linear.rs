//! The linear op (`nabla::ops::linear`) against the f64 CPU reference: f32, f16 and bf16
//! weights, every activation, with and without bias, ragged shapes, outputs poisoned with NaN;
//! the same in the bf16 autocast mode (`LinearRounding::Bf16`); x and the output stored as f16
//! (16-bit activations: bit-identical to the f32 path where it must be).

mod common;

use common::{POISON, Rng, assert_close, gpu, gpu_with_f16, rel_l2};
use nabla::ops::linear::{
    Activation, LinearKernel, linear, linear_gated_residual, record_linear,
    record_linear_gated_residual, record_linear_gated_residual_with, record_linear_with,
};
use nabla::ops::linear::{
    LinearRounding, record_linear_gated_residual_rounded, record_linear_rounded,
};
use nabla::{DType, Error, Tensor, reference};
use reference::nn::linear::bf16_round;

/// Weights as the GPU sees them: rounded to the storage dtype.
fn rounded(w: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => w.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
        DType::BF16 => w
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect(),
        _ => w.to_vec(),
    }
}

fn upload_w(w: &[f32], n: usize, k: usize, dtype: DType) -> Tensor {
    let g = gpu();
    match dtype {
        DType::F32 => g.upload_f32(w, &[n, k]),
        DType::F16 => g.upload_f16(w, &[n, k]),
        DType::BF16 => g.upload_bf16(w, &[n, k]),
        DType::U32 => panic!("no u32 weights"),
    }
    .unwrap()
}

/// Runs `act(x·Wᵀ + b)` on the GPU into a NaN-poisoned output and returns it: the portable
/// f32-math kernel, which these tests hold to f32 tolerances (the tensor-core kernel, which
/// rounds x to f16, has its own test below).
fn run_gpu(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    mnk: (usize, usize, usize),
    dtype: DType,
    act: Activation,
) -> Vec<f32> {
    let (kernel, rounding) = (LinearKernel::Portable, LinearRounding::None);
    run_gpu_rounded(x, w, b, mnk, dtype, act, kernel, rounding)
}

/// [`run_gpu`] with an explicit kernel and rounding.
#[allow(clippy::too_many_arguments)]
fn run_gpu_rounded(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (m, n, k): (usize, usize, usize),
    dtype: DType,
    act: Activation,
    kernel: LinearKernel,
    rounding: LinearRounding,
) -> Vec<f32> {
    let g = gpu();
    let xt = g.upload_f32(x, &[m, k]).unwrap();
    let wt = upload_w(w, n, k, dtype);
    let bt = b.map(|b| g.upload_f32(b, &[n]).unwrap());
    let out = g.empty(&[m, n], DType::F32).unwrap();
    g.fill_u32(&out, POISON);
    let mut batch = g.batch();
    record_linear_rounded(
        &mut batch,
        &xt,
        &wt,
        bt.as_ref(),
        act,
        &out,
        kernel,
        rounding,
    )
    .unwrap();
    batch.submit().unwrap();
    g.read_f32(&out).unwrap()
}

/// Random operands scaled so that outputs are O(1): x ~ N(0, 1), W ~ N(0, 1/K), b ~ N(0, 1/4).
fn operands(rng: &mut Rng, m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let x = rng.normals(m * k, 1.0);
    let w = rng.normals(n * k, 1.0 / (k.max(1) as f32).sqrt());
    let b = rng.normals(n, 0.5);
    (x, w, b)
}

/// Every activation, with and without bias, for each shape; f32 math, so tolerances sit near f32
/// rounding of a K-term dot product.
fn check_shapes(tag: u64, dtype: DType, shapes: &[(usize, usize, usize)]) {
    let mut rng = Rng::fresh(tag);
    for &(m, n, k) in shapes {
        let (x, w, b) = operands(&mut rng, m, n, k);
        let wr = rounded(&w, dtype);
        for act in Activation::ALL {
            for bias in [false, true] {
                let bb = bias.then_some(b.as_slice());
                let got = run_gpu(&x, &w, bb, (m, n, k), dtype, act);
                let want = reference::nn::linear::linear(&x, &wr, bb, m, n, k, act);
                let what = format!("{dtype:?} {m}x{n}x{k} {act:?} bias={bias}");
                // f32 GELU / SiLU err by a few ulps of the pre-activation, not of the output:
                // in their negative tails (output ≪ input, e.g. GELU(−3.5) ≈ −8e-4) that is a
                // large relative error, so the relative L2 bound scales with ‖pre‖ / ‖out‖
                // (seen on CI: a single GELU output at 1.1e-5 relative)
                let pre = reference::nn::linear::linear(&x, &wr, bb, m, n, k, Activation::None);
                let norm = |v: &[f32]| v.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().sqrt();
                let l2 = 1e-5 * (norm(&pre) / norm(&want).max(1e-30)).max(1.0);
                assert_close(&what, &got, &want, 1e-5, 1e-5, l2);
            }
        }
    }
}

#[test]
fn f32_weights_ragged_shapes() {
    check_shapes(
        0x11,
        DType::F32,
        &[
            (1, 1, 1),
            (1, 64, 256),
            (3, 5, 7),
            (65, 130, 17),
            (17, 3, 65),
            (100, 64, 256),
            (300, 256, 512),
            // 18 row tiles: one full band of 16 in the grouped tile order and a partial one
            (1093, 130, 17),
        ],
    );
}

#[test]
fn f16_weights_ragged_shapes() {
    // 16-bit weights need K even; K = 18 and 130 leave half a vec4 at the K edge.
    check_shapes(
        0x12,
        DType::F16,
        &[
            (1, 1, 2),
            (1, 64, 256),
            (3, 5, 6),
            (65, 130, 18),
            (17, 65, 130),
            (100, 64, 256),
            (300, 256, 512),
        ],
    );
}

#[test]
fn bf16_weights_ragged_shapes() {
    check_shapes(
        0x13,
        DType::BF16,
        &[
            (1, 1, 2),
            (1, 64, 256),
            (3, 5, 6),
            (65, 130, 18),
            (17, 65, 130),
            (100, 64, 256),
            (300, 256, 512),
            (1093, 70, 18),
        ],
    );
}

#[test]
fn bf16_rounding_matches_the_reference_not_the_f32_weights() {
    // The kernel must read exactly the bf16 values: against the unrounded f32 weights the error
    // is far larger than against the rounded ones.
    let mut rng = Rng::fresh(0x14);
    let (m, n, k) = (33, 40, 96);
    let (x, w, b) = operands(&mut rng, m, n, k);
    let got = run_gpu(&x, &w, Some(&b), (m, n, k), DType::BF16, Activation::None);
    let exact = reference::nn::linear::linear(&x, &w, Some(&b), m, n, k, Activation::None);
    let wr = rounded(&w, DType::BF16);
    let want = reference::nn::linear::linear(&x, &wr, Some(&b), m, n, k, Activation::None);
    assert_close("bf16 vs rounded", &got, &want, 1e-5, 1e-5, 1e-5);
    let e = rel_l2(&got, &exact);
    assert!(
        e > 1e-4,
        "bf16 result too close to f32 weights ({e:e}): were they rounded?"
    );
}

#[test]
fn f16_subnormal_and_large_weights_are_exact() {
    // Weights below f16's smallest normal (6.1e-5) are subnormal in storage and must not be
    // flushed to zero; weights near f16's largest (65504) must keep their exponent.
    let mut rng = Rng::fresh(0x18);
    let (m, n, k) = (9, 70, 40);
    let x = rng.normals(m * k, 1.0);
    let mut w = rng.normals(n * k, 2e-5);
    for v in w.iter_mut().step_by(7) {
        *v = if *v > 0.0 { 6.0e4 } else { -3.0e4 };
    }
    let wr = rounded(&w, DType::F16);
    let subnormal = wr.iter().filter(|v| **v != 0.0 && v.abs() < 6.1e-5).count();
    assert!(subnormal > n * k / 2, "only {subnormal} subnormal weights");
    let got = run_gpu(&x, &w, None, (m, n, k), DType::F16, Activation::None);
    let want = reference::nn::linear::linear(&x, &wr, None, m, n, k, Activation::None);
    // f32 sums of terms up to 6e4·|x| may cancel to near 0: each element's bound is twice the
    // f32 accumulation's K·2^-24·Σ|x·w|, that is K·2^-23·Σ|x·w|, not a fraction of |y|
    let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<f32>>();
    let mag = reference::nn::linear::linear(&abs(&x), &abs(&wr), None, m, n, k, Activation::None);
    for (i, ((g, e), s)) in got.iter().zip(&want).zip(&mag).enumerate() {
        let bound = k as f32 * f32::EPSILON * s;
        assert!(
            (g - e).abs() <= bound,
            "f16 subnormal/large: element {i}: got {g}, expected {e} (bound {bound})"
        );
    }
    assert!(
        rel_l2(&got, &want) < 1e-5,
        "f16 subnormal/large: relative L2"
    );
    // the subnormal part alone (large weights zeroed): a flush to zero would lose all of it
    let small: Vec<f32> = w
        .iter()
        .map(|&v| if v.abs() > 1.0 { 0.0 } else { v })
        .collect();
    let got = run_gpu(&x, &small, None, (m, n, k), DType::F16, Activation::None);
    let sr = rounded(&small, DType::F16);
    let want = reference::nn::linear::linear(&x, &sr, None, m, n, k, Activation::None);
    assert_close("f16 subnormal only", &got, &want, 1e-10, 1e-5, 1e-5);
}

#[test]
fn activations_at_extreme_values() {
    // W = I (exact in every dtype), so y = x exactly and the epilogue sees chosen values,
    // including those where tanh/exp overflow or return NaN without the clamps.
    let vals: Vec<f32> = vec![
        0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, 5.0, -5.0, 8.0,
        -8.0, 10.0, -10.0, 20.0, -20.0, 50.0, -50.0, 87.0, -87.0, 89.0, -89.0, 100.0, -100.0, 1e4,
        -1e4, 1e15, -1e15, 1e20, -1e20,
    ];
    let k = 16;
    let m = vals.len().div_ceil(k);
    let mut x = vals.clone();
    x.resize(m * k, 0.25);
    let mut w = vec![0f32; k * k];
    for i in 0..k {
        w[i * k + i] = 1.0;
    }
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for act in Activation::ALL {
            let got = run_gpu(&x, &w, None, (m, k, k), dtype, act);
            let want = reference::nn::linear::linear(&x, &w, None, m, k, k, act);
            for (i, (a, e)) in got.iter().zip(&want).enumerate() {
                assert!(a.is_finite(), "{dtype:?} {act:?}: {a} at input {}", x[i]);
                let err = (a - e).abs();
                assert!(
                    err <= 1e-6 + 1e-5 * e.abs(),
                    "{dtype:?} {act:?}: act({}) = {a}, expected {e}",
                    x[i]
                );
            }
        }
    }
    // the expected values really span both saturated ends
    let gl = reference::nn::linear::gelu_tanh(-20.0);
    assert!(gl.abs() < 1e-30 && reference::nn::linear::gelu_tanh(20.0) == 20.0);
    assert!((reference::nn::linear::silu(-100.0)).abs() < 1e-40);
}

#[test]
fn leading_dims_and_convenience_entry() {
    // x [2, 3, K] → y [2, 3, N] through `linear`, which allocates and submits.
    let g = gpu();
    let mut rng = Rng::fresh(0x15);
    let (m, n, k) = (6, 20, 24);
    let (x, w, b) = operands(&mut rng, m, n, k);
    let xt = g.upload_f32(&x, &[2, 3, k]).unwrap();
    let wt = g.upload_bf16(&w, &[n, k]).unwrap();
    let bt = g.upload_f32(&b, &[n]).unwrap();
    let y = linear(g, &xt, &wt, Some(&bt), Activation::Silu).unwrap();
    assert_eq!(y.shape(), &[2, 3, n]);
    assert_eq!(y.dtype(), DType::F32);
    let got = g.read_f32(&y).unwrap();
    let wr = rounded(&w, DType::BF16);
    let want = reference::nn::linear::linear(&x, &wr, Some(&b), m, n, k, Activation::Silu);
    assert_close("leading dims", &got, &want, 1e-5, 1e-5, 1e-5);
}

#[test]
fn ffn_chain_in_one_batch() {
    // The Wan FFN: fc1 + GELU(tanh) then fc2, recorded in one batch (the second dispatch reads
    // what the first wrote).
    let g = gpu();
    let mut rng = Rng::fresh(0x16);
    let (m, d, h) = (70, 48, 136);
    let x = rng.normals(m * d, 1.0);
    let w1 = rng.normals(h * d, 1.0 / (d as f32).sqrt());
    let b1 = rng.normals(h, 0.5);
    let w2 = rng.normals(d * h, 1.0 / (h as f32).sqrt());
    let b2 = rng.normals(d, 0.5);
    let xt = g.upload_f32(&x, &[m, d]).unwrap();
    let w1t = g.upload_bf16(&w1, &[h, d]).unwrap();
    let b1t = g.upload_f32(&b1, &[h]).unwrap();
    let w2t = g.upload_bf16(&w2, &[d, h]).unwrap();
    let b2t = g.upload_f32(&b2, &[d]).unwrap();
    let hid = g.empty(&[m, h], DType::F32).unwrap();
    let out = g.empty(&[m, d], DType::F32).unwrap();
    g.fill_u32(&hid, POISON);
    g.fill_u32(&out, POISON);
    let mut batch = g.batch();
    let portable = LinearKernel::Portable;
    record_linear_with(
        &mut batch,
        &xt,
        &w1t,
        Some(&b1t),
        Activation::GeluTanh,
        &hid,
        portable,
    )
    .unwrap();
    record_linear_with(
        &mut batch,
        &hid,
        &w2t,
        Some(&b2t),
        Activation::None,
        &out,
        portable,
    )
    .unwrap();
    batch.submit().unwrap();
    let got = g.read_f32(&out).unwrap();
    let (w1r, w2r) = (rounded(&w1, DType::BF16), rounded(&w2, DType::BF16));
    let r1 = reference::nn::linear::linear(&x, &w1r, Some(&b1), m, h, d, Activation::GeluTanh);
    let r2 = reference::nn::linear::linear(&r1, &w2r, Some(&b2), m, d, h, Activation::None);
    assert_close("ffn", &got, &r2, 2e-5, 2e-5, 1e-5);
}

#[test]
fn mismatches_are_detected() {
    // The comparison is not a tautology: dropping the bias, changing the activation or
    // transposing W each moves the result far outside the tolerance.
    let mut rng = Rng::fresh(0x17);
    let (m, n, k) = (40, 32, 32);
    let (x, w, b) = operands(&mut rng, m, n, k);
    let got = run_gpu(
        &x,
        &w,
        Some(&b),
        (m, n, k),
        DType::F32,
        Activation::GeluTanh,
    );
    let lin =
        |b: Option<&[f32]>, w: &[f32], act| reference::nn::linear::linear(&x, w, b, m, n, k, act);
    let right = lin(Some(&b), &w, Activation::GeluTanh);
    assert!(rel_l2(&got, &right) < 1e-5);
    let no_bias = lin(None, &w, Activation::GeluTanh);
    let other_act = lin(Some(&b), &w, Activation::Silu);
    let mut wt = vec![0f32; n * k];
    for i in 0..n {
        for j in 0..k {
            wt[j * k + i] = w[i * k + j];
        }
    }
    let transposed = lin(Some(&b), &wt, Activation::GeluTanh);
    for (what, r) in [
        ("without bias", no_bias),
        ("with SiLU", other_act),
        ("with Wᵀ", transposed),
    ] {
        let e = rel_l2(&got, &r);
        assert!(e > 1e-2, "GPU result matches the reference {what} ({e:e})");
    }
    // and poisoning works: an output that is never written reads back as NaN
    let g = gpu();
    let t = g.empty(&[3, 5], DType::F32).unwrap();
    g.fill_u32(&t, POISON);
    assert!(g.read_f32(&t).unwrap().iter().all(|v| v.is_nan()));
}

fn shape_err(r: nabla::Result<Tensor>, needle: &str) {
    match r {
        Err(Error::Shape(msg)) => {
            assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
            eprintln!("{msg}");
        }
        Err(e) => panic!("expected a shape error mentioning {needle:?}, got {e}"),
        Ok(t) => panic!("expected a shape error, got a {:?} tensor", t.shape()),
    }
}

#[test]
fn bad_operands_are_refused() {
    let g = gpu();
    let x = g.upload_f32(&[0.5; 4 * 8], &[4, 8]).unwrap();
    let w9 = g.upload_f32(&[0.5; 5 * 9], &[5, 9]).unwrap();
    shape_err(linear(g, &x, &w9, None, Activation::None), "K = 9");
    let w = g.upload_f32(&[0.5; 5 * 8], &[5, 8]).unwrap();
    let w3d = g.upload_f32(&[0.5; 5 * 8], &[1, 5, 8]).unwrap();
    shape_err(linear(g, &x, &w3d, None, Activation::None), "[N, K]");
    let b4 = g.upload_f32(&[0.5; 4], &[4]).unwrap();
    shape_err(
        linear(g, &x, &w, Some(&b4), Activation::None),
        "bias must be [N] = [5]",
    );
    let b16 = g.upload_f16(&[0.5; 5], &[5]).unwrap();
    shape_err(
        linear(g, &x, &w, Some(&b16), Activation::None),
        "bias must be f32",
    );
    let x7 = g.upload_f32(&[0.5; 4 * 7], &[4, 7]).unwrap();
    let w7 = g.upload_bf16(&[0.5; 5 * 7], &[5, 7]).unwrap();
    shape_err(
        linear(g, &x7, &w7, None, Activation::None),
        "even in_features",
    );
    let w7h = g.upload_f16(&[0.5; 5 * 7], &[5, 7]).unwrap();
    shape_err(
        linear(g, &x7, &w7h, None, Activation::None),
        "even in_features",
    );
    let wu = g.upload_u32(&[1; 5 * 8], &[5, 8]).unwrap();
    shape_err(
        linear(g, &x, &wu, None, Activation::None),
        "f32, f16 or bf16",
    );
    // x and the output: f32 or f16 (16-bit activations; see the tests at the end), not bf16
    let xb = g.upload_bf16(&[0.5; 4 * 8], &[4, 8]).unwrap();
    shape_err(
        linear(g, &xb, &w, None, Activation::None),
        "input must be f32 or f16",
    );

    // record_linear: wrong output shape, output aliasing an input
    let check_record = |out: &Tensor, needle: &str| {
        let mut batch = g.batch();
        match record_linear(&mut batch, &x, &w, None, Activation::None, out) {
            Err(Error::Shape(msg)) => {
                assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
                eprintln!("{msg}");
            }
            r => panic!("expected a shape error mentioning {needle:?}, got {r:?}"),
        }
        batch.submit().unwrap();
    };
    check_record(&g.empty(&[4, 6], DType::F32).unwrap(), "[4, 5]");
    check_record(&g.empty(&[4, 5], DType::BF16).unwrap(), "f32 or f16");
    let x45 = g.upload_f32(&[0.5; 4 * 5], &[4, 5]).unwrap();
    let w55 = g.upload_f32(&[0.5; 25], &[5, 5]).unwrap();
    let mut batch = g.batch();
    let r = record_linear(&mut batch, &x45, &w55, None, Activation::None, &x45);
    assert!(
        matches!(&r, Err(Error::Shape(m)) if m.contains("shares a buffer")),
        "in-place: {r:?}"
    );
    batch.submit().unwrap();
}

#[test]
fn weight_over_the_binding_limit_is_refused() {
    // A weight one element larger than the storage-binding limit must fail before dispatch with
    // TooLarge (the error a 14B FFN weight gets on a 128 MiB-limit driver). Only checked when the
    // device can allocate such a buffer at all.
    let g = gpu();
    let caps = g.caps();
    let limit = caps.max_storage_binding;
    if caps.max_buffer <= limit || limit > 1 << 30 {
        eprintln!(
            "binding limit {limit} B, buffer limit {} B: cannot allocate a weight past the \
             binding limit cheaply; skipped",
            caps.max_buffer
        );
        return;
    }
    let k = 1024;
    let n = (limit as usize / 4).div_ceil(k) + 1;
    let w = g.empty(&[n, k], DType::F32).unwrap();
    let x = g.upload_f32(&[0.0; 1024], &[1, k]).unwrap();
    match linear(g, &x, &w, None, Activation::None) {
        Err(Error::TooLarge { what, .. }) => assert!(what.contains("weight"), "{what}"),
        r => panic!("expected TooLarge, got {:?}", r.map(|t| t.shape().to_vec())),
    }
}

#[test]
fn every_variant_is_registered() {
    let v = nabla::ops::linear::variants();
    // portable: 3 weight dtypes × (5 epilogues (3 activations, the residual in place or from a
    // separate tensor) with the bf16-autocast rounding, and without it × x f32 / f16 × (3
    // activations × y f32 / f16 + 2 residuals)); cooperative: the same × 3 subgroup sizes ×
    // scalar, 8-byte or 16-byte loads × 2 tile heights; plus f16 weights in fragment order
    // (subgroups of 32, 16-byte loads) × 2 tile heights
    let per_weight = 5 + 2 * (3 * 2 + 2);
    assert_eq!(
        v.len(),
        3 * per_weight * (1 + 3 * 3 * 2) + per_weight * 2,
        "3 weight dtypes × 21 epilogue / rounding / storage combinations (+ coop × 3 subgroup \
         sizes × 3 load widths × 2 tile heights, + f16 fragment order × 2 tile heights)"
    );
    for dt in ["f32", "f16", "bf16"] {
        for act in [
            "none",
            "gelu_tanh",
            "silu",
            "residual,in_place",
            "residual,separate",
        ] {
            for rounding in ["", ",bf16_autocast"] {
                let name = format!("linalg/linear[{dt},{act}{rounding}]");
                assert!(v.iter().any(|(n, _)| *n == name), "{name} missing");
            }
            let mut io = vec![",x_f16"];
            if !act.starts_with("residual") {
                io.extend([",y_f16", ",x_f16,y_f16"]);
            }
            for io in io {
                let name = format!("linalg/linear[{dt},{act}{io}]");
                assert!(v.iter().any(|(n, _)| *n == name), "{name} missing");
                for l in ["scalar", "vec4", "vec8"] {
                    for tm in [128, 256] {
                        let coop = format!("{name}[coop,sg32,{l},tm{tm}]");
                        assert!(v.iter().any(|(n, _)| *n == coop), "{coop} missing");
                        let frag = format!("{name}[coop,sg32,{l},tm{tm},wfrag]");
                        let want = dt == "f16" && l == "vec8";
                        assert_eq!(v.iter().any(|(n, _)| *n == frag), want, "{frag}");
                    }
                }
            }
        }
    }
    // the unrounded kernels carry no trace of the rounding but a constant 0 (the first, runtime
    // form of it slowed the tensor-core kernel 2.8x on the H200 even when off)
    for (name, src) in &v {
        let on = name.contains("bf16_autocast");
        let want = if on {
            "const RB16: u32 = 1u;"
        } else {
            "const RB16: u32 = 0u;"
        };
        assert!(src.contains(want), "{name}: expected {want}");
        assert!(
            !src.contains("round_bf16"),
            "{name}: a runtime rounding flag is back"
        );
        // the storage of x and y is a constant / alias of the prelude too, never a flag
        let x16 = name.contains("x_f16");
        let y16 = name.contains("y_f16");
        let want = format!("const XDT: u32 = {}u;", x16 as u32);
        assert!(src.contains(&want), "{name}: expected {want}");
        let want = format!("alias YE = {};", if y16 { "f16" } else { "f32" });
        assert!(src.contains(&want), "{name}: expected {want}");
        assert!(
            !(on && (x16 || y16)),
            "{name}: the bf16 rounding takes f32 x and y"
        );
    }
    let all = nabla::shaders::all_variants();
    assert!(
        all.iter()
            .any(|(n, _)| n == "linalg/linear[bf16,gelu_tanh]")
    );
}

#[test]
#[ignore = "DiT-sized shapes: minutes on a software driver; run on a real GPU with --ignored"]
fn dit_shapes_on_a_real_gpu() {
    // Wan 14B projections at 720p-like token counts (75 600 tokens: 1 182 row tiles × 80 column
    // tiles = 94 560 workgroups, past 65 535, so the 2-D grid is exercised) and the 14B FFN at a
    // 480p-like count; bf16 weights. Sampled rows (first, last, random) against the reference,
    // then GPU time when timestamps exist.
    let g = gpu();
    eprintln!("{}", g.caps());
    let mut rng = Rng::fresh(0x19);
    for &(m, n, k, act) in &[
        (75_600usize, 5120usize, 5120usize, Activation::None),
        (32_760, 13_824, 5120, Activation::GeluTanh),
        (32_760, 5120, 13_824, Activation::None),
        (1, 30_720, 5120, Activation::Silu),
    ] {
        let (x, w, b) = operands(&mut rng, m, n, k);
        let xt = g.upload_f32(&x, &[m, k]).unwrap();
        let wt = g.upload_bf16(&w, &[n, k]).unwrap();
        let bt = g.upload_f32(&b, &[n]).unwrap();
        let out = g.empty(&[m, n], DType::F32).unwrap();
        g.fill_u32(&out, POISON);
        let mut batch = g.batch();
        record_linear(&mut batch, &xt, &wt, Some(&bt), act, &out).unwrap();
        batch.submit().unwrap();
        let y = g.read_f32(&out).unwrap();
        assert!(
            y.iter().all(|v| v.is_finite()),
            "{m}x{n}x{k}: non-finite output"
        );
        // Auto picks the tensor-core kernel for 16-bit weights and m >= 64 where the adapter has
        // cooperative matrices: it stages x and W as f16, so the reference rounds them too and
        // the bounds are the tensor-core test's
        let coop = g.caps().coop_subgroup().is_some() && m >= 64;
        let r16 = |v: &[f32]| -> Vec<f32> {
            v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
        };
        let wr = rounded(&w, DType::BF16);
        let wr = if coop { r16(&wr) } else { wr };
        let (rtol, l2) = if coop { (1e-3, 1e-4) } else { (1e-4, 1e-5) };
        let mut rows = vec![0, m - 1, m / 2];
        rows.extend((0..5).map(|_| rng.below(m)));
        for r in rows {
            let xr = &x[r * k..(r + 1) * k];
            let xr = if coop { r16(xr) } else { xr.to_vec() };
            let want = reference::nn::linear::linear(&xr, &wr, Some(&b), 1, n, k, act);
            let what = format!("{m}x{n}x{k} {act:?} row {r} (tensor cores: {coop})");
            assert_close(&what, &y[r * n..(r + 1) * n], &want, 1e-4, rtol, l2);
        }
        if !g.caps().timestamps {
            continue;
        }
        for act in Activation::ALL {
            let t = g
                .time_ms(7, |batch| {
                    record_linear(batch, &xt, &wt, Some(&bt), act, &out)
                })
                .unwrap();
            let mut t = t[2..].to_vec();
            t.sort_by(f64::total_cmp);
            let ms = t[t.len() / 2];
            let flops = 2.0 * (m * n * k) as f64;
            eprintln!(
                "TIME linear {m}x{n}x{k} bf16 {act:?}: {ms:.3} ms, {:.2} TFLOP/s, {:.1} GB/s of W",
                flops / ms / 1e9,
                (n * k * 2) as f64 / ms / 1e6
            );
        }
    }
}

/// The tensor-core kernel (real GPUs with 16×16 f16 cooperative matrices): operands are rounded
/// to f16 when staged, so the reference uses f16-rounded x and W; accumulation is f32.
#[test]
fn coop_kernel_matches_reference_on_f16_rounded_operands() {
    use nabla::ops::linear::{LinearKernel, record_linear_with};
    let g = gpu();
    if g.caps().coop_subgroup().is_none() {
        eprintln!(
            "no 16x16 cooperative matrices on {}: coop linear skipped",
            g.caps().name
        );
        return;
    }
    let mut rng = Rng::fresh(0xc00b);
    let r16 =
        |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect() };
    for (m, n, k, wdt) in [
        (128usize, 128usize, 64usize, DType::F16),
        (300, 200, 130, DType::BF16),
        (65, 17, 34, DType::F32),
        (96, 40, 48, DType::F32),
        (1000, 640, 1536, DType::BF16),
        (1, 3, 2, DType::F16),
        // K % 4 == 0 but not % 8: the 8-byte loads; K % 8 == 0 with f32 W: 16-byte pairs
        (72, 50, 36, DType::BF16),
        (40, 24, 20, DType::F16),
        (33, 130, 24, DType::F32),
    ] {
        for act in [Activation::None, Activation::GeluTanh, Activation::Silu] {
            let x = rng.normals(m * k, 1.0);
            let w = rng.normals(n * k, 0.05);
            let b = rng.normals(n, 0.5);
            let (wt, w_stored) = match wdt {
                DType::F16 => (g.upload_f16(&w, &[n, k]).unwrap(), r16(&w)),
                DType::BF16 => {
                    let wb: Vec<f32> = w
                        .iter()
                        .map(|&v| half::bf16::from_f32(v).to_f32())
                        .collect();
                    (g.upload_bf16(&w, &[n, k]).unwrap(), wb)
                }
                _ => (g.upload_f32(&w, &[n, k]).unwrap(), w.clone()),
            };
            let xt = g.upload_f32(&x, &[m, k]).unwrap();
            let bt = g.upload_f32(&b, &[n]).unwrap();
            let out = g.empty(&[m, n], DType::F32).unwrap();
            g.fill_u32(&out, POISON);
            let mut batch = g.batch();
            record_linear_with(
                &mut batch,
                &xt,
                &wt,
                Some(&bt),
                act,
                &out,
                LinearKernel::Coop,
            )
            .unwrap();
            batch.submit().unwrap();
            let want =
                reference::nn::linear::linear(&r16(&x), &r16(&w_stored), Some(&b), m, n, k, act);
            assert_close(
                &format!("coop linear {m}x{n}x{k} {wdt:?} {act:?}"),
                &g.read_f32(&out).unwrap(),
                &want,
                1e-4,
                1e-3,
                1e-4,
            );
        }
    }
    // the bf16 autocast mode (the DiT's fast path): x rounded to bf16, then exactly to f16 for
    // the tensor cores, so with bf16 weights the products are the reference's; same bounds as
    // on the portable kernel
    check_bf16_shapes(
        0xc00d,
        DType::BF16,
        LinearKernel::Coop,
        &[(300, 200, 130), (65, 17, 34), (1000, 640, 1536), (1, 3, 2)],
    );
}

/// Activations larger than one storage binding run in row chunks (views of the same buffers):
/// here x is ~137 MiB on a 128 MiB-binding driver (on GPUs with larger limits it simply runs
/// in one piece); the result must equal the reference on every checked row, including the rows
/// at chunk borders.
#[test]
fn activations_over_the_binding_limit_run_in_row_chunks() {
    let g = gpu();
    let limit = g.caps().max_storage_binding;
    let k = 512usize;
    let m = ((limit as usize / (k * 4)) + 3000).min(80_000);
    let n = 8usize;
    let mut rng = Rng::fresh(0xc4c4);
    let x = rng.normals(m * k, 1.0);
    let w = rng.normals(n * k, 0.1);
    let b = rng.normals(n, 0.5);
    let xt = g.upload_f32(&x, &[m, k]).unwrap();
    let wt = g.upload_f32(&w, &[n, k]).unwrap();
    let bt = g.upload_f32(&b, &[n]).unwrap();
    let out = g.empty(&[m, n], DType::F32).unwrap();
    g.fill_u32(&out, POISON);
    let mut batch = g.batch();
    record_linear(&mut batch, &xt, &wt, Some(&bt), Activation::Silu, &out).unwrap();
    batch.submit().unwrap();
    let got = g.read_f32(&out).unwrap();
    assert!(got.iter().all(|v| !v.is_nan()), "unwritten rows");
    let chunk = (limit as usize / (k * 4)) / 64 * 64;
    let rows: Vec<usize> = [
        0,
        1,
        chunk.saturating_sub(1),
        chunk,
        chunk + 1,
        m / 2,
        m - 1,
    ]
    .into_iter()
    .filter(|&r| r < m)
    .collect();
    for &r in &rows {
        let want = reference::nn::linear::linear(
            &x[r * k..(r + 1) * k],
            &w,
            Some(&b),
            1,
            n,
            k,
            Activation::Silu,
        );
        assert_close(
            &format!("row {r}"),
            &got[r * n..(r + 1) * n],
            &want,
            1e-5,
            1e-5,
            1e-5,
        );
    }
    // the gated-residual epilogue chunks the residual with the rows (in place)
    let res = rng.normals(m * n, 1.0);
    let table = rng.normals(2 * n, 1.0);
    let rt = g.upload_f32(&res, &[m, n]).unwrap();
    let tt = g.upload_f32(&table, &[2, n]).unwrap();
    let mut batch = g.batch();
    record_linear_gated_residual(&mut batch, &xt, &wt, Some(&bt), &rt, Some((&tt, 1)), &rt)
        .unwrap();
    batch.submit().unwrap();
    let got = g.read_f32(&rt).unwrap();
    for &r in &rows {
        let want = reference::nn::linear::linear_gated_residual(
            &x[r * k..(r + 1) * k],
            &w,
            Some(&b),
            &res[r * n..(r + 1) * n],
            Some(&table[n..]),
            1,
            n,
            k,
        );
        assert_close(
            &format!("residual row {r}"),
            &got[r * n..(r + 1) * n],
            &want,
            3e-5,
            1e-5,
            1e-5,
        );
    }
}

/// A profile names each dispatch by its kernel and times it; results stay correct while
/// profiling (each dispatch in its own pass), and profiling stops cleanly.
#[test]
fn profile_times_each_dispatch_by_kernel() {
    // a device of its own: a profile collects every dispatch of its Gpu, and the shared one is
    // busy with the other tests of this file
    let g = &nabla::Gpu::new().unwrap();
    if !g.caps().timestamps {
        eprintln!("no timestamp queries on this adapter: skipped");
        return;
    }
    let (m, n, k) = (33, 20, 24);
    let mut rng = Rng::fresh(91);
    let x = rng.normals(m * k, 1.0);
    let w = rng.normals(n * k, 0.3);
    let xt = g.upload_f32(&x, &[m, k]).unwrap();
    let wt = g.upload_f32(&w, &[n, k]).unwrap();
    let out = g
        .upload_f32(&vec![f32::from_bits(POISON); m * n], &[m, n])
        .unwrap();
    g.start_profile().unwrap();
    let mut batch = g.batch();
    record_linear(&mut batch, &xt, &wt, None, Activation::None, &out).unwrap();
    record_linear(&mut batch, &xt, &wt, None, Activation::Silu, &out).unwrap();
    batch.submit().unwrap();
    let prof = g.stop_profile();
    let got = g.read_f32(&out).unwrap();
    let want = reference::nn::linear::linear(&x, &w, None, m, n, k, Activation::Silu);
    assert!(rel_l2(&got, &want) < 1e-5, "result wrong while profiling");
    assert_eq!(prof.len(), 2, "one entry per kernel variant: {prof:?}");
    for (name, t) in &prof {
        assert!(name.starts_with("linalg/linear["), "kernel named {name}");
        assert_eq!(t.count, 1, "{name} timed once");
        assert!(t.ms.is_finite() && t.ms >= 0.0, "{name}: {} ms", t.ms);
    }
    assert!(
        prof.values().any(|t| t.ms > 0.0),
        "no time measured: {prof:?}"
    );
    // not profiling any more: nothing collected
    let mut batch = g.batch();
    record_linear(&mut batch, &xt, &wt, None, Activation::None, &out).unwrap();
    batch.submit().unwrap();
    assert!(g.stop_profile().is_empty());
}

// ---- the gated-residual epilogue: out = res + gate[row] ⊙ (x·Wᵀ + b) ----

/// Operands of one fused call: x, W, b as in [`operands`], a residual ~ N(0, 1) and a [3, N]
/// gate table ~ N(0, 1) of which row 1 is used (so the row offset matters).
struct ResidualCase {
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    res: Vec<f32>,
    table: Vec<f32>,
}

const GATE_ROWS: usize = 3;
const GATE_ROW: u32 = 1;

impl ResidualCase {
    fn new(rng: &mut Rng, m: usize, n: usize, k: usize) -> Self {
        let (x, w, b) = operands(rng, m, n, k);
        ResidualCase {
            x,
            w,
            b,
            res: rng.normals(m * n, 1.0),
            table: rng.normals(GATE_ROWS * n, 1.0),
        }
    }
    fn gate_row(&self, n: usize, row: u32) -> &[f32] {
        &self.table[row as usize * n..(row as usize + 1) * n]
    }
}

/// Runs the fused epilogue on the GPU with `rounding` and returns the output. `in_place`: `out`
/// is the residual tensor itself; otherwise a separate, NaN-poisoned output (the residual must
/// stay unchanged: checked here).
#[allow(clippy::too_many_arguments)]
fn run_gpu_residual(
    c: &ResidualCase,
    (m, n, k): (usize, usize, usize),
    dtype: DType,
    bias: bool,
    gate: bool,
    in_place: bool,
    kernel: LinearKernel,
    rounding: LinearRounding,
) -> Vec<f32> {
    let g = gpu();
    let xt = g.upload_f32(&c.x, &[m, k]).unwrap();
    let wt = upload_w(&c.w, n, k, dtype);
    let bt = bias.then(|| g.upload_f32(&c.b, &[n]).unwrap());
    let rt = g.upload_f32(&c.res, &[m, n]).unwrap();
    let tt = g.upload_f32(&c.table, &[GATE_ROWS, n]).unwrap();
    let gate = gate.then_some((&tt, GATE_ROW));
    let out = if in_place {
        rt.clone()
    } else {
        let o = g.empty(&[m, n], DType::F32).unwrap();
        g.fill_u32(&o, POISON);
        o
    };
    let mut batch = g.batch();
    record_linear_gated_residual_rounded(
        &mut batch,
        &xt,
        &wt,
        bt.as_ref(),
        &rt,
        gate,
        &out,
        kernel,
        rounding,
    )
    .unwrap();
    batch.submit().unwrap();
    if !in_place {
        assert_eq!(
            g.read_f32(&rt).unwrap(),
            c.res,
            "the residual input was modified by an out-of-place call"
        );
    }
    g.read_f32(&out).unwrap()
}

/// f32 errs at the scale of the terms `r` and `g·v`, not of their sum: where they cancel (one
/// element of a 1×1 case near 0) a relative L2 bound must grow by `‖|r| + |g·v|‖ / ‖out‖`
/// (≥ 1), as the activation tests scale theirs; this returns that factor.
#[allow(clippy::too_many_arguments)]
fn cancellation(
    c: &ResidualCase,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    gate: Option<&[f32]>,
    want: &[f32],
    (m, n, k): (usize, usize, usize),
) -> f64 {
    let pre = reference::nn::linear::linear(x, w, b, m, n, k, Activation::None);
    let terms: Vec<f32> = (0..m * n)
        .map(|i| c.res[i].abs() + (gate.map_or(1.0, |g| g[i % n]) * pre[i]).abs())
        .collect();
    let norm = |v: &[f32]| v.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().sqrt();
    (norm(&terms) / norm(want).max(1e-30)).max(1.0)
}

/// With and without gate and bias, in place and out of place, for each shape; f32 math.
fn check_residual_shapes(tag: u64, dtype: DType, shapes: &[(usize, usize, usize)]) {
    let mut rng = Rng::fresh(tag);
    for &(m, n, k) in shapes {
        let c = ResidualCase::new(&mut rng, m, n, k);
        let wr = rounded(&c.w, dtype);
        for bias in [false, true] {
            for gate in [false, true] {
                for in_place in [true, false] {
                    let mnk = (m, n, k);
                    let kern = LinearKernel::Portable;
                    let none = LinearRounding::None;
                    let got = run_gpu_residual(&c, mnk, dtype, bias, gate, in_place, kern, none);
                    let bb = bias.then_some(c.b.as_slice());
                    let gr = gate.then(|| c.gate_row(n, GATE_ROW));
                    let want = reference::nn::linear::linear_gated_residual(
                        &c.x, &wr, bb, &c.res, gr, m, n, k,
                    );
                    let what = format!(
                        "residual {dtype:?} {m}x{n}x{k} bias={bias} gate={gate} in_place={in_place}"
                    );
                    // |gate| ~ N(0, 1) scales the GEMM's f32 error: a slightly wider atol
                    let l2 = 1e-5 * cancellation(&c, &c.x, &wr, bb, gr, &want, (m, n, k));
                    assert_close(&what, &got, &want, 3e-5, 1e-5, l2);
                    if gate && m * n >= 64 {
                        // not a tautology: another gate row, or no gate, is far off (on enough
                        // elements that random gate rows cannot nearly coincide)
                        let other = c.gate_row(n, 0);
                        let wrong = reference::nn::linear::linear_gated_residual(
                            &c.x,
                            &wr,
                            bb,
                            &c.res,
                            Some(other),
                            m,
                            n,
                            k,
                        );
                        let e = rel_l2(&got, &wrong);
                        assert!(e > 1e-2, "{what}: matches gate row 0 ({e:e})");
                        let ungated = reference::nn::linear::linear_gated_residual(
                            &c.x, &wr, bb, &c.res, None, m, n, k,
                        );
                        let e = rel_l2(&got, &ungated);
                        assert!(e > 1e-2, "{what}: matches the ungated result ({e:e})");
                    }
                }
            }
        }
    }
}

#[test]
fn residual_epilogue_f32_weights_ragged_shapes() {
    check_residual_shapes(
        0x21,
        DType::F32,
        &[
            (1, 1, 1),
            (3, 5, 7),
            (65, 130, 17),
            (17, 3, 65),
            (100, 64, 256),
            (1093, 130, 17),
        ],
    );
}

#[test]
fn residual_epilogue_f16_weights_ragged_shapes() {
    check_residual_shapes(
        0x22,
        DType::F16,
        &[
            (1, 1, 2),
            (3, 5, 6),
            (65, 130, 18),
            (17, 65, 130),
            (300, 256, 512),
        ],
    );
}

#[test]
fn residual_epilogue_bf16_weights_ragged_shapes() {
    check_residual_shapes(
        0x23,
        DType::BF16,
        &[
            (1, 1, 2),
            (3, 5, 6),
            (65, 130, 18),
            (17, 65, 130),
            (1093, 70, 18),
        ],
    );
}

/// The fused epilogue rounds as the unfused pair does: `record_linear` into `y`, then the
/// elementwise `x += y·gate`. Both compute `r + v·g` from the same f32 `v` (in the bf16-autocast
/// mode the same bf16(v)), so they agree to the last bit unless a compiler contracts one of them
/// into an fma (≤ 1 rounding of the sum apart).
#[test]
fn residual_epilogue_matches_the_unfused_ops() {
    let g = gpu();
    let mut rng = Rng::fresh(0x24);
    for (m, n, k, dtype, rounding) in [
        (
            130usize,
            96usize,
            64usize,
            DType::BF16,
            LinearRounding::None,
        ),
        (77, 33, 40, DType::F32, LinearRounding::None),
        (64, 128, 258, DType::F16, LinearRounding::None),
        (130, 96, 64, DType::BF16, BF16),
        (77, 33, 40, DType::F32, BF16),
    ] {
        let c = ResidualCase::new(&mut rng, m, n, k);
        for gate in [false, true] {
            let fused = run_gpu_residual(
                &c,
                (m, n, k),
                dtype,
                true,
                gate,
                true,
                LinearKernel::Portable,
                rounding,
            );
            let xt = g.upload_f32(&c.x, &[m, k]).unwrap();
            let wt = upload_w(&c.w, n, k, dtype);
            let bt = g.upload_f32(&c.b, &[n]).unwrap();
            let rt = g.upload_f32(&c.res, &[m, n]).unwrap();
            let tt = g.upload_f32(&c.table, &[GATE_ROWS, n]).unwrap();
            let y = g.empty(&[m, n], DType::F32).unwrap();
            g.fill_u32(&y, POISON);
            let mut batch = g.batch();
            record_linear_rounded(
                &mut batch,
                &xt,
                &wt,
                Some(&bt),
                Activation::None,
                &y,
                LinearKernel::Portable,
                rounding,
            )
            .unwrap();
            let gt = gate.then_some((&tt, GATE_ROW));
            nabla::ops::elementwise::record_gated_residual(&mut batch, &rt, &y, gt).unwrap();
            batch.submit().unwrap();
            let unfused = g.read_f32(&rt).unwrap();
            let yv = g.read_f32(&y).unwrap();
            let mut exact = 0;
            for i in 0..m * n {
                let (a, b) = (fused[i], unfused[i]);
                assert!(!a.is_nan() && !b.is_nan(), "NaN at {i}");
                // one rounding of the sum r + v·g, at the scale of its terms
                let gv = if gate {
                    c.gate_row(n, GATE_ROW)[i % n]
                } else {
                    1.0
                };
                let scale = c.res[i].abs() + (yv[i] * gv).abs();
                assert!(
                    (a - b).abs() <= scale * f32::EPSILON,
                    "{dtype:?} {rounding:?} {m}x{n}x{k} gate={gate}: element {i}: fused {a} vs \
                     unfused {b}"
                );
                exact += (a.to_bits() == b.to_bits()) as usize;
            }
            eprintln!(
                "{dtype:?} {rounding:?} {m}x{n}x{k} gate={gate}: {exact} of {} bit-identical",
                m * n
            );
        }
    }
}

#[test]
fn residual_epilogue_leading_dims_and_convenience_entry() {
    // x [2, 3, K], res [2, 3, N] updated in place through `linear_gated_residual`
    let g = gpu();
    let mut rng = Rng::fresh(0x25);
    let (m, n, k) = (6, 20, 24);
    let c = ResidualCase::new(&mut rng, m, n, k);
    let xt = g.upload_f32(&c.x, &[2, 3, k]).unwrap();
    let wt = g.upload_bf16(&c.w, &[n, k]).unwrap();
    let bt = g.upload_f32(&c.b, &[n]).unwrap();
    let rt = g.upload_f32(&c.res, &[2, 3, n]).unwrap();
    let tt = g.upload_f32(&c.table, &[GATE_ROWS, n]).unwrap();
    linear_gated_residual(g, &xt, &wt, Some(&bt), &rt, Some((&tt, GATE_ROW))).unwrap();
    let got = g.read_f32(&rt).unwrap();
    let wr = rounded(&c.w, DType::BF16);
    let want = reference::nn::linear::linear_gated_residual(
        &c.x,
        &wr,
        Some(&c.b),
        &c.res,
        Some(c.gate_row(n, GATE_ROW)),
        m,
        n,
        k,
    );
    assert_close("residual leading dims", &got, &want, 3e-5, 1e-5, 1e-5);
}

/// Every malformed call is refused with a shape error naming the problem, before anything is
/// recorded: the residual is unchanged afterwards.
#[test]
fn residual_epilogue_bad_operands_are_refused() {
    let g = gpu();
    let (m, n, k) = (4usize, 5usize, 8usize);
    let x = g.upload_f32(&[0.5; 4 * 8], &[m, k]).unwrap();
    let w = g.upload_f32(&[0.5; 5 * 8], &[n, k]).unwrap();
    let res_data: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
    let res = g.upload_f32(&res_data, &[m, n]).unwrap();
    let table = g.upload_f32(&[1.0; 6 * 5], &[6, n]).unwrap();
    let expect = |r: nabla::Result<()>, needle: &str| match r {
        Err(Error::Shape(msg)) => {
            assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
            eprintln!("{msg}");
        }
        r => panic!("expected a shape error mentioning {needle:?}, got {r:?}"),
    };
    let call = |res: &Tensor, gate: Option<(&Tensor, u32)>, out: &Tensor| {
        let mut batch = g.batch();
        let r = record_linear_gated_residual(&mut batch, &x, &w, None, res, gate, out);
        batch.submit().unwrap();
        r
    };
    // residual of the wrong shape or dtype
    let r46 = g.upload_f32(&[0.0; 24], &[4, 6]).unwrap();
    expect(call(&r46, None, &res), "residual must be f32 [4, 5]");
    let rh = g.upload_f16(&[0.0; 20], &[m, n]).unwrap();
    expect(call(&rh, None, &res), "residual must be f32 [4, 5]");
    // output of the wrong shape (residual matching it): the linear's own check
    expect(call(&r46, None, &r46), "[4, 5]");
    // gate: not [R, N], wrong dtype, row out of range, aliasing the output
    let t4 = g.upload_f32(&[1.0; 24], &[6, 4]).unwrap();
    expect(
        call(&res, Some((&t4, 0)), &res),
        "gate must be an f32 [R, 5]",
    );
    let t1d = g.upload_f32(&[1.0; 5], &[5]).unwrap();
    expect(
        call(&res, Some((&t1d, 0)), &res),
        "gate must be an f32 [R, 5]",
    );
    let th = g.upload_f16(&[1.0; 30], &[6, n]).unwrap();
    expect(
        call(&res, Some((&th, 0)), &res),
        "gate must be an f32 [R, 5]",
    );
    expect(
        call(&res, Some((&table, 6)), &res),
        "gate row 6 is out of range",
    );
    expect(
        call(&res, Some((&res, 0)), &res),
        "gate table shares a buffer",
    );
    // out aliasing: another view of the residual's buffer, or x
    let big = g.upload_f32(&[0.0; 2 * 4 * 5], &[8, n]).unwrap();
    let (v0, v1) = (big.rows(0, 4).unwrap(), big.rows(4, 4).unwrap());
    expect(call(&v0, None, &v1), "different views of one buffer");
    let x45 = g.upload_f32(&[0.5; 20], &[4, 5]).unwrap();
    let w55 = g.upload_f32(&[0.5; 25], &[5, 5]).unwrap();
    let mut batch = g.batch();
    let r = record_linear_gated_residual(&mut batch, &x45, &w55, None, &res, None, &x45);
    batch.submit().unwrap();
    expect(r, "shares a buffer with x, W or the bias");
    // bad linear operands still get the linear's messages
    let w9 = g.upload_f32(&[0.5; 5 * 9], &[5, 9]).unwrap();
    let mut batch = g.batch();
    let r = record_linear_gated_residual(&mut batch, &x, &w9, None, &res, None, &res);
    batch.submit().unwrap();
    expect(r, "K = 9");
    // nothing ran
    assert_eq!(g.read_f32(&res).unwrap(), res_data, "a refused call wrote");
}

/// The tensor-core kernel's residual epilogue (real GPUs only): operands rounded to f16, f32
/// accumulation, then the same gated residual in f32.
#[test]
fn coop_residual_epilogue_matches_reference_on_f16_rounded_operands() {
    let g = gpu();
    if g.caps().coop_subgroup().is_none() {
        eprintln!(
            "no 16x16 cooperative matrices on {}: coop residual epilogue skipped",
            g.caps().name
        );
        return;
    }
    let mut rng = Rng::fresh(0xc00c);
    let r16 =
        |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect() };
    for (m, n, k, wdt) in [
        (128usize, 128usize, 64usize, DType::F16),
        (300, 200, 130, DType::BF16),
        (65, 17, 34, DType::F32),
        (1000, 640, 1536, DType::BF16),
        (1, 3, 2, DType::F16),
    ] {
        let c = ResidualCase::new(&mut rng, m, n, k);
        for (gate, in_place) in [(true, true), (false, true), (true, false)] {
            let got = run_gpu_residual(
                &c,
                (m, n, k),
                wdt,
                true,
                gate,
                in_place,
                LinearKernel::Coop,
                LinearRounding::None,
            );
            let (xr, wr) = (r16(&c.x), r16(&rounded(&c.w, wdt)));
            let gr = gate.then(|| c.gate_row(n, GATE_ROW));
            let mnk = (m, n, k);
            let want = reference::nn::linear::linear_gated_residual(
                &xr,
                &wr,
                Some(&c.b),
                &c.res,
                gr,
                m,
                n,
                k,
            );
            let l2 = 1e-4 * cancellation(&c, &xr, &wr, Some(&c.b), gr, &want, mnk);
            assert_close(
                &format!("coop residual {m}x{n}x{k} {wdt:?} gate={gate} in_place={in_place}"),
                &got,
                &want,
                3e-4,
                1e-3,
                l2,
            );
        }
    }
    // the bf16 autocast mode, as on the portable kernel
    check_bf16_residual_shapes(
        0xc00e,
        DType::BF16,
        LinearKernel::Coop,
        &[(300, 200, 130), (1000, 640, 1536), (1, 3, 2)],
    );
}

// ---- bf16 autocast rounding (LinearRounding::Bf16, spec §2.10) ----
//
// x, the bias, the pre-activation v = acc + b and the activation's output are rounded to bf16.
// The GPU's f32 accumulation differs from the f64 reference by ~1e-7 relative, so its bf16 `v`
// equals the reference's bf16 `v` except where the sum lies that close to a rounding boundary:
// rarely (≪ 1 % of the elements), and then by one bf16 step. The checks below hold the kernel
// to that: every element bit-equal to the reference (GELU / SiLU outputs in their f32 tails:
// within 1e-5), or (at most `MAX_FLIPS` of them) one flipped rounding away. Leaving out any one
// of the roundings flips far more (checked against references that leave each one out, on x,
// W ~ N(·) with full 24-bit mantissas).

/// Largest fraction of elements allowed to differ from the bf16 reference (by one flipped
/// rounding): the tight bound of these tests. Seen on lavapipe: ≤ 0.05 %; each left-out rounding
/// moves ≥ 16 % of the elements (the unrounded reference: ~100 %). (A relative L2 bound would be
/// loose here: a few flips of one bf16 step, 2⁻⁸..2⁻⁷ relative, dominate it.)
const MAX_FLIPS: f64 = 0.005;

/// The bf16 autocast linear with each rounding switchable, built on the unrounded f64
/// reference: the oracle's "what if this rounding were missing" variants.
#[derive(Clone, Copy)]
struct Roundings {
    x: bool,
    b: bool,
    v: bool,
    out: bool,
}

const ALL_ROUNDINGS: Roundings = Roundings {
    x: true,
    b: true,
    v: true,
    out: true,
};

/// Every rounding but one (named), and none: the references the kernel must NOT match.
fn wrong_roundings(act: Activation, bias: bool) -> Vec<(&'static str, Roundings)> {
    let mut v = vec![
        (
            "no rounding",
            Roundings {
                x: false,
                b: false,
                v: false,
                out: false,
            },
        ),
        (
            "x unrounded",
            Roundings {
                x: false,
                ..ALL_ROUNDINGS
            },
        ),
    ];
    if bias {
        v.push((
            "bias unrounded",
            Roundings {
                b: false,
                ..ALL_ROUNDINGS
            },
        ));
    }
    if act != Activation::None {
        v.push((
            "pre-activation unrounded",
            Roundings {
                v: false,
                ..ALL_ROUNDINGS
            },
        ));
        v.push((
            "activation output unrounded",
            Roundings {
                out: false,
                ..ALL_ROUNDINGS
            },
        ));
    }
    v
}

/// The bf16-autocast rounding of the tests below.
const BF16: LinearRounding = LinearRounding::Bf16;

fn bf16_slice(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&a| bf16_round(a as f64) as f32).collect()
}

/// `act(v)` per element with the roundings `r` (f64 math; `v` from the unrounded reference).
fn autocast_variant(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (m, n, k): (usize, usize, usize),
    act: Activation,
    r: Roundings,
) -> Vec<f32> {
    let xr = if r.x { bf16_slice(x) } else { x.to_vec() };
    let br = b.map(|b| if r.b { bf16_slice(b) } else { b.to_vec() });
    let pre = reference::nn::linear::linear(&xr, w, br.as_deref(), m, n, k, Activation::None);
    pre.iter()
        .map(|&v| {
            let v = if r.v { bf16_round(v as f64) } else { v as f64 };
            let a = reference::nn::linear::activate(v, act);
            (if r.out { bf16_round(a) } else { a }) as f32
        })
        .collect()
}

/// Checks `got` against the bf16 reference `want`: no NaN; element i bit-equal up to `slack(i)`
/// (f32 rounding after the bf16 value), or one flipped bf16 rounding away, at most `flip(i)`
/// more, on at most `MAX_FLIPS` of the elements. On arrays large enough for the statistics
/// (≥ 500 elements) each wrong reference (a rounding left out) must miss by far more: ≥ 10×
/// `MAX_FLIPS` of the elements off, and, over the elements not off by a flip, a relative L2
/// error ≥ 5× that against `want`.
fn check_bf16(
    what: &str,
    got: &[f32],
    want: &[f32],
    slack: impl Fn(usize) -> f64,
    flip: impl Fn(usize) -> f64,
    wrongs: &[(&str, Vec<f32>)],
) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let off = |other: &[f32]| {
        (0..got.len())
            .filter(|&i| (got[i] as f64 - other[i] as f64).abs() > slack(i))
            .count()
    };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan(), "{what}: NaN at {i} (unwritten or invalid)");
        let err = (g as f64 - w as f64).abs();
        let bound = slack(i) + flip(i);
        assert!(
            err <= bound,
            "{what}: element {i}: got {g}, expected {w} (|err| {err:e} > {bound:e})"
        );
    }
    let flips = off(want);
    let allowed = (MAX_FLIPS * got.len() as f64).ceil() as usize;
    let e = rel_l2(got, want);
    eprintln!(
        "{what}: {flips} of {} off by a flipped rounding, rel L2 {e:.2e}",
        got.len()
    );
    assert!(
        flips <= allowed,
        "{what}: {flips} of {} elements differ from the bf16 reference (at most {allowed})",
        got.len()
    );
    if got.len() < 500 {
        return;
    }
    // the L2 comparison leaves out the (allowed) flipped elements: one flip moves a value by a
    // bf16 step, which alone can bring the error against `want` within 5x of a wrong reference's
    let agree: Vec<usize> = (0..got.len())
        .filter(|&i| (got[i] as f64 - want[i] as f64).abs() <= slack(i))
        .collect();
    let pick = |v: &[f32]| agree.iter().map(|&i| v[i]).collect::<Vec<f32>>();
    let got_a = pick(got);
    let e = rel_l2(&got_a, &pick(want));
    for (name, wrong) in wrongs {
        let n = off(wrong);
        let ew = rel_l2(&got_a, &pick(wrong));
        eprintln!(
            "  vs {name}: {n} of {} off ({:.1} %), rel L2 {ew:.2e}",
            got.len(),
            100.0 * n as f64 / got.len() as f64
        );
        assert!(
            n as f64 >= 10.0 * MAX_FLIPS * got.len() as f64,
            "{what}: only {n} of {} elements differ from the reference with {name}: is that \
             rounding applied?",
            got.len()
        );
        assert!(
            ew >= 5.0 * e,
            "{what}: relative L2 {ew:e} against the reference with {name}, {e:e} against the \
             bf16 reference (elements off by a flip left out of both): too close"
        );
    }
}

/// Every activation, with and without bias, per shape, against the bf16 reference; outputs must
/// be bf16 values.
fn check_bf16_shapes(
    tag: u64,
    dtype: DType,
    kernel: LinearKernel,
    shapes: &[(usize, usize, usize)],
) {
    let mut rng = Rng::fresh(tag);
    for &(m, n, k) in shapes {
        let (x, w, b) = operands(&mut rng, m, n, k);
        let wr = rounded(&w, dtype);
        for act in Activation::ALL {
            for bias in [false, true] {
                let bb = bias.then_some(b.as_slice());
                let got = run_gpu_rounded(&x, &w, bb, (m, n, k), dtype, act, kernel, BF16);
                let what =
                    format!("bf16 autocast {kernel:?} {dtype:?} {m}x{n}x{k} {act:?} bias={bias}");
                for (i, &v) in got.iter().enumerate() {
                    assert!(
                        v.is_nan() || v.to_bits() & 0xffff == 0,
                        "{what}: element {i} = {v} is not a bf16 value"
                    );
                }
                let want = reference::nn::linear::linear_rounded(
                    &x,
                    &wr,
                    bb,
                    m,
                    n,
                    k,
                    act,
                    LinearRounding::Bf16,
                );
                // the oracle of the wrong variants agrees with the reference when complete
                let mnk = (m, n, k);
                let all = autocast_variant(&x, &wr, bb, mnk, act, ALL_ROUNDINGS);
                let same = all.iter().zip(&want).filter(|(a, b)| a == b).count();
                assert!(
                    same as f64 >= 0.99 * want.len() as f64,
                    "{what}: test oracle"
                );
                let wrongs: Vec<(&str, Vec<f32>)> = wrong_roundings(act, bias)
                    .into_iter()
                    .map(|(name, r)| (name, autocast_variant(&x, &wr, bb, mnk, act, r)))
                    .collect();
                // a flipped rounding of v moves the output by ≤ ~1.2 steps of v (|act'| ≤ 1.13)
                // plus one of the output; below ~1e-4 the f32 sum's own error dominates
                let pre = reference::nn::linear::linear(&x, &wr, bb, m, n, k, Activation::None);
                let pre_abs = |i: usize| match act {
                    Activation::None => 0.0,
                    _ => (pre[i] as f64).abs(),
                };
                // f32 GELU / SiLU err by ~1e-6 absolute in their negative tails (cancellation in
                // 1 + tanh; GELU is 0 past the clamp), where outputs are ≪ 1: there, within
                // 1e-5, an output counts as equal; anywhere else a bf16 output must be bit-equal
                let slack = if act == Activation::None { 0.0 } else { 1e-5 };
                check_bf16(
                    &what,
                    &got,
                    &want,
                    |_| slack,
                    |i| 2f64.powi(-6) * ((want[i] as f64).abs() + pre_abs(i)) + 1e-5,
                    &wrongs,
                );
            }
        }
    }
}

#[test]
fn bf16_autocast_reference_rounding_matches_half() {
    // the reference's f64 → bf16 rounding, on f32 inputs, is half's f32 → bf16 (RNE)
    let mut rng = Rng::fresh(0x30);
    let mut vals: Vec<f32> = rng.normals(20_000, 3.0);
    vals.extend((0..20_000).map(|_| f32::from_bits(rng.next_u64() as u32)));
    vals.extend([
        0.0,
        -0.0,
        1.0,
        f32::MAX,
        -f32::MAX,
        f32::MIN_POSITIVE,
        1e-40,
        -3e-39,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::from_bits(0x3f80_8000), // a tie: rounds to even (1.0)
        f32::from_bits(0x3f81_8000), // a tie: rounds to even (up)
        f32::from_bits(0x7f7f_8000), // rounds past the largest bf16: inf
    ]);
    for v in vals {
        let want = half::bf16::from_f32(v).to_f32();
        let got = bf16_round(v as f64) as f32;
        if v.is_nan() {
            assert!(got.is_nan(), "{v:e} ({:#x}): NaN lost", v.to_bits());
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{v:e} ({:#x})", v.to_bits());
        }
    }
}

#[test]
fn bf16_autocast_bf16_weights_ragged_shapes() {
    check_bf16_shapes(
        0x31,
        DType::BF16,
        LinearKernel::Portable,
        &[
            (1, 1, 2),
            (3, 5, 6),
            (65, 130, 18),
            (17, 65, 130),
            (100, 64, 256),
            (300, 256, 512),
            (1093, 70, 18),
        ],
    );
}

#[test]
fn bf16_autocast_f32_and_f16_weights_are_used_as_stored() {
    // the mode rounds x, b, v and the output, never the weights beyond their storage
    check_bf16_shapes(
        0x32,
        DType::F32,
        LinearKernel::Portable,
        &[(65, 130, 17), (40, 96, 200)],
    );
    check_bf16_shapes(0x33, DType::F16, LinearKernel::Portable, &[(66, 129, 34)]);
}

#[test]
fn bf16_autocast_keeps_nan_and_inf() {
    // A naive round-to-nearest-even on the bits turns the NaN 0x7fffffff into -0.0: the kernel
    // must keep NaN (its row then is NaN) and round values past the largest bf16 to inf.
    let (m, n, k) = (4, 8, 6);
    let mut rng = Rng::fresh(0x34);
    let (mut x, w, b) = operands(&mut rng, m, n, k);
    x[k + 2] = f32::from_bits(0x7fff_ffff); // row 1: NaN
    for v in &mut x[2 * k..3 * k] {
        *v = 0.0;
    }
    x[2 * k] = f32::MAX; // row 2: rounds to inf in bf16 → ±inf outputs
    let w = rounded(&w, DType::BF16);
    let got = run_gpu_rounded(
        &x,
        &w,
        Some(&b),
        (m, n, k),
        DType::BF16,
        Activation::None,
        LinearKernel::Portable,
        BF16,
    );
    for j in 0..n {
        assert!(
            got[n + j].is_nan(),
            "row 1 col {j}: {} from a NaN x",
            got[n + j]
        );
        let want = f32::INFINITY.copysign(w[j * k]);
        assert_eq!(got[2 * n + j], want, "row 2 col {j}: bf16(f32::MAX)·w");
        assert!(
            got[j].is_finite() && got[3 * n + j].is_finite(),
            "rows 0, 3 finite"
        );
    }
    // a NaN bias poisons its column only
    let mut bn = b.clone();
    bn[3] = f32::NAN;
    let (x, _, _) = operands(&mut rng, m, n, k);
    let got = run_gpu_rounded(
        &x,
        &w,
        Some(&bn),
        (m, n, k),
        DType::BF16,
        Activation::GeluTanh,
        LinearKernel::Portable,
        BF16,
    );
    for (i, v) in got.iter().enumerate() {
        assert_eq!(v.is_nan(), i % n == 3, "element {i} = {v}");
    }
}

/// The residual epilogue in the bf16 mode against the reference, per shape, with and without
/// bias and gate, in place and not.
fn check_bf16_residual_shapes(
    tag: u64,
    dtype: DType,
    kernel: LinearKernel,
    shapes: &[(usize, usize, usize)],
) {
    let mut rng = Rng::fresh(tag);
    for &(m, n, k) in shapes {
        let c = ResidualCase::new(&mut rng, m, n, k);
        let wr = rounded(&c.w, dtype);
        let mnk = (m, n, k);
        for bias in [false, true] {
            for gate in [false, true] {
                for in_place in [true, false] {
                    let got = run_gpu_residual(&c, mnk, dtype, bias, gate, in_place, kernel, BF16);
                    let bb = bias.then_some(c.b.as_slice());
                    let gr = gate.then(|| c.gate_row(n, GATE_ROW));
                    let want = reference::nn::linear::linear_gated_residual_rounded(
                        &c.x,
                        &wr,
                        bb,
                        &c.res,
                        gr,
                        m,
                        n,
                        k,
                        LinearRounding::Bf16,
                    );
                    let gi = |i: usize| gr.map_or(1.0, |g| g[i % n] as f64);
                    // the wrong variants of v, through the same residual
                    let wrongs: Vec<(&str, Vec<f32>)> = wrong_roundings(Activation::None, bias)
                        .into_iter()
                        .map(|(name, r)| {
                            let v = autocast_variant(&c.x, &wr, bb, mnk, Activation::None, r);
                            let out = (0..m * n)
                                .map(|i| (c.res[i] as f64 + gi(i) * v[i] as f64) as f32)
                                .collect();
                            (name, out)
                        })
                        .collect();
                    let vr = autocast_variant(&c.x, &wr, bb, mnk, Activation::None, ALL_ROUNDINGS);
                    let what = format!(
                        "bf16 autocast residual {kernel:?} {dtype:?} {m}x{n}x{k} bias={bias} \
                         gate={gate} in_place={in_place}"
                    );
                    // f32 rounding of r + g·v (an fma or not): ~1 ulp of the terms; a flipped
                    // bf16 v moves the output by |g|·(one step of v) ≤ |g|·2⁻⁷·|v|
                    let terms = |i: usize| c.res[i].abs() as f64 + (gi(i) * vr[i] as f64).abs();
                    check_bf16(
                        &what,
                        &got,
                        &want,
                        |i| 2.5e-7 * terms(i) + 1e-30,
                        |i| gi(i).abs() * (2f64.powi(-6) * (vr[i] as f64).abs() + 1e-5),
                        &wrongs,
                    );
                }
            }
        }
    }
}

#[test]
fn bf16_autocast_residual_epilogue_ragged_shapes() {
    check_bf16_residual_shapes(
        0x35,
        DType::BF16,
        LinearKernel::Portable,
        &[
            (1, 1, 2),
            (3, 5, 6),
            (65, 130, 18),
            (17, 65, 130),
            (300, 256, 512),
            (1093, 70, 18),
        ],
    );
}

// ---- 16-bit activations: x stored as f16, the plain epilogue's y stored as f16 ----
//
// An f16 x holds f32 values rounded to f16 (nearest even, as `upload_f16` and the GPU producers
// round): the portable kernel widens them exactly, so it must give, bit for bit, what it gives
// for an f32 x holding the same rounded values; the tensor-core kernel rounds f32 x to f16 when
// staging it anyway, so there an f16 x must give what the unrounded f32 x gives. An f16 y is
// the f32 result rounded once.

/// Two f16 NaNs per 32-bit word: poisons every element of an f16 output (`POISON` would leave
/// the even elements 0.0).
const POISON16: u32 = 0x7e00_7e00;

/// f32 values as an f16 tensor holds them (rounded to nearest even).
fn f16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// Uploads `v` as f32 or f16 (rounded).
fn upload_as(v: &[f32], shape: &[usize], dtype: DType) -> Tensor {
    let g = gpu();
    match dtype {
        DType::F16 => g.upload_f16(v, shape),
        _ => g.upload_f32(v, shape),
    }
    .unwrap()
}

/// A NaN-poisoned output of `dtype` (f32 or f16).
fn poisoned_as(shape: &[usize], dtype: DType) -> Tensor {
    let g = gpu();
    let t = g.empty(shape, dtype).unwrap();
    g.fill_u32(
        &t,
        if dtype == DType::F16 {
            POISON16
        } else {
            POISON
        },
    );
    t
}

/// `act(x·Wᵀ + b)` with x stored as `xdt` and y as `ydt` (f32 or f16), on `kernel`.
#[allow(clippy::too_many_arguments)]
fn run_io(
    x: &[f32],
    w: &Tensor,
    b: Option<&[f32]>,
    (m, n, k): (usize, usize, usize),
    act: Activation,
    xdt: DType,
    ydt: DType,
    kernel: LinearKernel,
) -> Vec<f32> {
    let g = gpu();
    let xt = upload_as(x, &[m, k], xdt);
    let bt = b.map(|b| g.upload_f32(b, &[n]).unwrap());
    let out = poisoned_as(&[m, n], ydt);
    let mut batch = g.batch();
    record_linear_with(&mut batch, &xt, w, bt.as_ref(), act, &out, kernel).unwrap();
    batch.submit().unwrap();
    g.read_f32(&out).unwrap()
}

/// The residual epilogue (gate row 1, bias) with x stored as `xdt`, in place, on `kernel`.
fn run_residual_io(
    c: &ResidualCase,
    w: &Tensor,
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    xdt: DType,
    kernel: LinearKernel,
) -> Vec<f32> {
    let g = gpu();
    let xt = upload_as(x, &[m, k], xdt);
    let bt = g.upload_f32(&c.b, &[n]).unwrap();
    let rt = g.upload_f32(&c.res, &[m, n]).unwrap();
    let tt = g.upload_f32(&c.table, &[GATE_ROWS, n]).unwrap();
    let mut batch = g.batch();
    let gate = Some((&tt, GATE_ROW));
    record_linear_gated_residual_with(&mut batch, &xt, w, Some(&bt), &rt, gate, &rt, kernel)
        .unwrap();
    batch.submit().unwrap();
    g.read_f32(&rt).unwrap()
}

/// Asserts `a` and `b` are the same f32 bit patterns (no NaN), naming the first difference.
fn assert_bits(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let diff: Vec<usize> = (0..a.len())
        .filter(|&i| a[i].to_bits() != b[i].to_bits())
        .collect();
    if let Some(&i) = diff.first() {
        panic!(
            "{what}: {} of {} elements differ; first at {i}: {} vs {}",
            diff.len(),
            a.len(),
            a[i],
            b[i]
        );
    }
    assert!(a.iter().all(|v| !v.is_nan()), "{what}: NaN (unwritten)");
    eprintln!("{what}: {} elements bit-identical", a.len());
}

/// The portable kernel with f16 x and / or f16 y, every activation, with and without bias: f16
/// x gives the f32-x kernel's bits on the rounded values (and the f64 reference on them to f32
/// rounding); f16 y is that f32 result rounded once to f16 (bit for bit: lavapipe and NVIDIA
/// round f32 → f16 to nearest even; and within half an f16 step of the reference).
fn check_f16_io_shapes(tag: u64, wdt: DType, shapes: &[(usize, usize, usize)]) {
    let mut rng = Rng::fresh(tag);
    for &(m, n, k) in shapes {
        let (x, w, b) = operands(&mut rng, m, n, k);
        let (xr, wr) = (f16_round(&x), rounded(&w, wdt));
        let wt = upload_w(&w, n, k, wdt);
        let port = LinearKernel::Portable;
        for act in Activation::ALL {
            for bias in [false, true] {
                let bb = bias.then_some(b.as_slice());
                let mnk = (m, n, k);
                let what = format!("{wdt:?} {m}x{n}x{k} {act:?} bias={bias}");
                let (f32d, f16d) = (DType::F32, DType::F16);
                // f16 x against the f32 x holding the same values, then the reference
                let base = run_io(&xr, &wt, bb, mnk, act, f32d, f32d, port);
                let got = run_io(&x, &wt, bb, mnk, act, f16d, f32d, port);
                assert_bits(
                    &format!("{what}: f16 x vs f32 x of its values"),
                    &got,
                    &base,
                );
                let want = reference::nn::linear::linear(&xr, &wr, bb, m, n, k, act);
                let pre = reference::nn::linear::linear(&xr, &wr, bb, m, n, k, Activation::None);
                let norm = |v: &[f32]| v.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().sqrt();
                let l2 = 1e-5 * (norm(&pre) / norm(&want).max(1e-30)).max(1.0);
                assert_close(&format!("{what}: f16 x"), &got, &want, 1e-5, 1e-5, l2);
                // f16 y, from f16 x and from f32 x: the f32 result rounded once
                let got = run_io(&x, &wt, bb, mnk, act, f16d, f16d, port);
                assert_bits(&format!("{what}: f16 x, f16 y"), &got, &f16_round(&base));
                // half an f16 step (2⁻¹¹ relative, so also in relative L2 (one element: all of
                // it); 2⁻²⁵ absolute among subnormals) on top of the f32 bounds
                assert_close(
                    &format!("{what}: f16 y"),
                    &got,
                    &want,
                    1e-5,
                    5e-4,
                    5e-4 + l2,
                );
                let full = run_io(&x, &wt, bb, mnk, act, f32d, f32d, port);
                let got = run_io(&x, &wt, bb, mnk, act, f32d, f16d, port);
                assert_bits(&format!("{what}: f32 x, f16 y"), &got, &f16_round(&full));
            }
        }
        // the residual epilogue (f32 y, the residual stream) with f16 x
        let c = ResidualCase {
            x: x.clone(),
            w: w.clone(),
            b: b.clone(),
            res: rng.normals(m * n, 1.0),
            table: rng.normals(GATE_ROWS * n, 1.0),
        };
        let base = run_residual_io(&c, &wt, (m, n, k), &xr, DType::F32, port);
        let got = run_residual_io(&c, &wt, (m, n, k), &x, DType::F16, port);
        let what = format!("residual {wdt:?} {m}x{n}x{k}: f16 x vs f32 x of its values");
        assert_bits(&what, &got, &base);
    }
}

#[test]
fn f16_activations_portable_ragged_shapes() {
    let Some(_) = gpu_with_f16("f16 activations") else {
        return;
    };
    // K odd (f32 weights) and K % 4 != 0: f16 x elements at every alignment; 18 row tiles: a
    // full band of 16 in the grouped tile order and a partial one
    check_f16_io_shapes(
        0x41,
        DType::F32,
        &[
            (1, 1, 1),
            (3, 5, 7),
            (65, 130, 17),
            (17, 3, 65),
            (1093, 130, 17),
        ],
    );
    check_f16_io_shapes(
        0x42,
        DType::F16,
        &[(1, 1, 2), (3, 5, 6), (65, 130, 18), (100, 64, 256)],
    );
    check_f16_io_shapes(
        0x43,
        DType::BF16,
        &[(1, 1, 2), (3, 5, 6), (17, 65, 130), (300, 256, 512)],
    );
}

/// What 16-bit activations cannot be combined with: the bf16-autocast rounding (its rounding
/// of x to bf16 must see the f32 value; it writes f32) and an f16 residual stream.
#[test]
fn f16_activations_refused_combinations() {
    let Some(g) = gpu_with_f16("f16 activations") else {
        return;
    };
    let (m, n, k) = (4usize, 5usize, 8usize);
    let x32 = g.upload_f32(&[0.5; 32], &[m, k]).unwrap();
    let x16 = g.upload_f16(&[0.5; 32], &[m, k]).unwrap();
    let w = g.upload_bf16(&[0.5; 40], &[n, k]).unwrap();
    let y32 = g.empty(&[m, n], DType::F32).unwrap();
    let y16 = g.empty(&[m, n], DType::F16).unwrap();
    let expect = |r: nabla::Result<()>, needle: &str| match r {
        Err(Error::Shape(msg)) => {
            assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
            eprintln!("{msg}");
        }
        r => panic!("expected a shape error mentioning {needle:?}, got {r:?}"),
    };
    let (act, port, bf16) = (
        Activation::None,
        LinearKernel::Portable,
        LinearRounding::Bf16,
    );
    for (x, y) in [(&x16, &y32), (&x32, &y16), (&x16, &y16)] {
        let mut batch = g.batch();
        let r = record_linear_rounded(&mut batch, x, &w, None, act, y, port, bf16);
        expect(r, "bf16-autocast rounding takes f32 x");
        batch.submit().unwrap();
    }
    let mut batch = g.batch();
    let r = record_linear_gated_residual(&mut batch, &x16, &w, None, &y16, None, &y16);
    expect(r, "must be f32 (the residual stream)");
    batch.submit().unwrap();
    // without the rounding, both are fine
    let mut batch = g.batch();
    record_linear_rounded(
        &mut batch,
        &x16,
        &w,
        None,
        act,
        &y16,
        port,
        LinearRounding::None,
    )
    .unwrap();
    batch.submit().unwrap();
    assert!(g.read_f32(&y16).unwrap().iter().all(|&v| v == 2.0));
}

/// The tensor-core kernel (real GPUs with 16×16 f16 cooperative matrices; skipped elsewhere):
/// f16 x (rounded to nearest even on the CPU) gives exactly what the unrounded f32 x gives,
/// since the kernel rounds f32 x to f16 as it stages it; f16 y is its f32 result rounded once.
/// 16-byte loads (K % 8 == 0), 8-byte ones (K % 4 == 0) and scalar ones, every weight type and activation, the residual
/// epilogue. A failure here with everything else passing means the GPU's f32 → f16 conversion
/// does not round to nearest even, or the f16 staging path reads the wrong elements.
#[test]
fn coop_f16_activations_are_bit_identical() {
    let g = gpu();
    if g.caps().coop_subgroup().is_none() || !g.caps().f16 {
        eprintln!(
            "no 16x16 cooperative matrices on {}: coop f16 activations skipped",
            g.caps().name
        );
        return;
    }
    let mut rng = Rng::fresh(0xc0f16);
    let coop = LinearKernel::Coop;
    let (f32d, f16d) = (DType::F32, DType::F16);
    for (m, n, k, wdt) in [
        (128usize, 128usize, 64usize, DType::F16),
        (300, 200, 130, DType::BF16),
        (65, 17, 34, DType::F32),
        (96, 40, 48, DType::F32),
        (1000, 640, 1536, DType::BF16),
        (257, 384, 1000, DType::BF16),
        (1, 3, 2, DType::F16),
        (72, 50, 36, DType::BF16),
    ] {
        let x = rng.normals(m * k, 1.0);
        let w = rng.normals(n * k, 0.05);
        let b = rng.normals(n, 0.5);
        let wt = upload_w(&w, n, k, wdt);
        let mnk = (m, n, k);
        // f32 x values in f16's subnormal range: a driver that flushes f16 subnormals when it
        // converts f32 → f16 (in the kernel's staging) would differ from the CPU's rounding there
        let tiny = x.iter().filter(|v| v.abs() < 6.103_515_6e-5).count();
        let hint = format!("x has {tiny} values under 2⁻¹⁴ (f16 subnormals)");
        // f16 x rounded on the GPU, as the DiT's producers round it: a head merge of [1, M, K]
        // into f16 tokens is an f32 → f16 copy
        let xg = g.empty(&[m, k], f16d).unwrap();
        let x32 = g.upload_f32(&x, &[1, m, k]).unwrap();
        let mut batch = g.batch();
        nabla::ops::elementwise::record_merge_heads(&mut batch, &x32, &xg).unwrap();
        batch.submit().unwrap();
        for act in Activation::ALL {
            let what = format!("coop {m}x{n}x{k} {wdt:?} {act:?}");
            let base = run_io(&x, &wt, Some(&b), mnk, act, f32d, f32d, coop);
            let got = run_io(&x, &wt, Some(&b), mnk, act, f16d, f32d, coop);
            assert_bits(&format!("{what}: f16 x vs f32 x ({hint})"), &got, &base);
            let got = run_io(&x, &wt, Some(&b), mnk, act, f16d, f16d, coop);
            assert_bits(&format!("{what}: f16 x, f16 y"), &got, &f16_round(&base));
            let out = poisoned_as(&[m, n], f32d);
            let bt = g.upload_f32(&b, &[n]).unwrap();
            let mut batch = g.batch();
            record_linear_with(&mut batch, &xg, &wt, Some(&bt), act, &out, coop).unwrap();
            batch.submit().unwrap();
            let got = g.read_f32(&out).unwrap();
            assert_bits(&format!("{what}: f16 x rounded on the GPU"), &got, &base);
        }
        let c = ResidualCase {
            x: x.clone(),
            w,
            b,
            res: rng.normals(m * n, 1.0),
            table: rng.normals(GATE_ROWS * n, 1.0),
        };
        let base = run_residual_io(&c, &wt, mnk, &x, f32d, coop);
        let got = run_residual_io(&c, &wt, mnk, &x, f16d, coop);
        assert_bits(
            &format!("coop residual {m}x{n}x{k} {wdt:?}: f16 x vs f32 x"),
            &got,
            &base,
        );
    }
}

/// The Wan 14B GEMMs with f32 and with f16 activations, bf16 weights (real GPU; run with
/// `--ignored`): sampled rows must agree bit for bit where the tensor-core kernel runs (and
/// within f16 rounding of x elsewhere), then GPU time of both when timestamps exist. The
/// FFN-up GEMM writes its hidden as f16 in the f16 case, as the DiT does.
#[test]
#[ignore = "DiT-sized shapes: minutes on a software driver; run on a real GPU with --ignored"]
fn f16_activations_dit_shapes_on_a_real_gpu() {
    let g = gpu();
    eprintln!("{}", g.caps());
    if !g.caps().f16 {
        eprintln!("no SHADER_F16: skipped");
        return;
    }
    let mut rng = Rng::fresh(0x1a);
    // (M, N, K, activation, f16 y in the f16 case): q/k/v/o, FFN up (+ GELU), FFN down, the
    // text GEMM at 512 tokens
    for &(m, n, k, act, y16) in &[
        (75_600usize, 5120usize, 5120usize, Activation::None, false),
        (32_760, 13_824, 5120, Activation::GeluTanh, true),
        (32_760, 5120, 13_824, Activation::None, false),
        (512, 5120, 4096, Activation::GeluTanh, true),
    ] {
        let (x, w, b) = operands(&mut rng, m, n, k);
        let x32 = g.upload_f32(&x, &[m, k]).unwrap();
        let x16 = g.upload_f16(&x, &[m, k]).unwrap();
        let wt = g.upload_bf16(&w, &[n, k]).unwrap();
        let bt = g.upload_f32(&b, &[n]).unwrap();
        let o32 = poisoned_as(&[m, n], DType::F32);
        let o16 = poisoned_as(&[m, n], if y16 { DType::F16 } else { DType::F32 });
        let mut batch = g.batch();
        record_linear(&mut batch, &x32, &wt, Some(&bt), act, &o32).unwrap();
        record_linear(&mut batch, &x16, &wt, Some(&bt), act, &o16).unwrap();
        batch.submit().unwrap();
        let (a, h) = (g.read_f32(&o32).unwrap(), g.read_f32(&o16).unwrap());
        let a = if y16 { f16_round(&a) } else { a };
        let coop = nabla::ops::linear::auto_uses_coop(g, DType::BF16) && m >= 64;
        let mut rows = vec![0, m - 1, m / 2];
        rows.extend((0..5).map(|_| rng.below(m)));
        for r in rows {
            let (ar, hr) = (&a[r * n..(r + 1) * n], &h[r * n..(r + 1) * n]);
            let what = format!("{m}x{n}x{k} {act:?} row {r} (tensor cores: {coop})");
            if coop {
                assert_bits(&what, hr, ar);
            } else {
                assert_close(&what, hr, ar, 1e-3, 2e-3, 2e-3);
            }
        }
        if !g.caps().timestamps {
            continue;
        }
        let flops = 2.0 * (m * n * k) as f64;
        let mut ms = [0.0; 2];
        for (i, (xt, ot)) in [(&x32, &o32), (&x16, &o16)].into_iter().enumerate() {
            let t = g
                .time_ms(9, |batch| record_linear(batch, xt, &wt, Some(&bt), act, ot))
                .unwrap();
            let mut t = t[2..].to_vec();
            t.sort_by(f64::total_cmp);
            ms[i] = t[t.len() / 2];
        }
        eprintln!(
            "TIME linear {m}x{n}x{k} bf16 {act:?}: x f32 {:.3} ms ({:.1} TFLOP/s), x f16{} {:.3} \
             ms ({:.1} TFLOP/s): {:.2}x",
            ms[0],
            flops / ms[0] / 1e9,
            if y16 { " y f16" } else { "" },
            ms[1],
            flops / ms[1] / 1e9,
            ms[0] / ms[1]
        );
    }
}

/// Every tile configuration of the tensor-core kernel (the candidates of the adapter's
/// auto-tune) gives the default configuration's results bit for bit: ragged M, N and K, every
/// load width (K % 8, K % 4, other), x stored f32 and f16. Real GPUs with 16×16 f16
/// cooperative matrices; skipped elsewhere.
#[test]
fn coop_tile_configurations_agree_bit_for_bit() {
    use nabla::ops::linear::CoopConfig;
    let g = gpu();
    let Some(sg) = g.caps().coop_subgroup() else {
        eprintln!(
            "no 16x16 cooperative matrices on {}: skipped",
            g.caps().name
        );
        return;
    };
    let mut rng = Rng::fresh(0x711e);
    let base = LinearKernel::CoopWith(CoopConfig::DEFAULT);
    for (m, n, k, wdt) in [
        (300usize, 200usize, 130usize, DType::BF16),
        (2049, 40, 36, DType::F16),
        (513, 136, 64, DType::BF16),
        (257, 72, 48, DType::F32),
    ] {
        let x = rng.normals(m * k, 1.0);
        let w = rng.normals(n * k, 0.05);
        let b = rng.normals(n, 0.5);
        let wt = upload_w(&w, n, k, wdt);
        let mnk = (m, n, k);
        for xdt in [DType::F32, DType::F16] {
            if xdt == DType::F16 && !g.caps().f16 {
                continue;
            }
            let want = run_io(
                &x,
                &wt,
                Some(&b),
                mnk,
                Activation::GeluTanh,
                xdt,
                DType::F32,
                base,
            );
            for c in CoopConfig::CANDIDATES
                .iter()
                .filter(|c| c.fits(g.caps(), sg))
            {
                let kc = LinearKernel::CoopWith(*c);
                let got = run_io(
                    &x,
                    &wt,
                    Some(&b),
                    mnk,
                    Activation::GeluTanh,
                    xdt,
                    DType::F32,
                    kc,
                );
                assert_bits(&format!("{m}x{n}x{k} {wdt:?} x {xdt:?} {c:?}"), &got, &want);
            }
        }
    }
}

/// K = 0 (an empty input row): y = act(b), or act(0) without bias, on every kernel the adapter
/// has and for every weight storage; the tensor-core kernel then takes its checked scalar loads
/// (its 16-byte form clamps addresses to K - 8). Outputs are poisoned first.
#[test]
fn empty_inner_dimension_gives_the_bias() {
    let g = gpu();
    let mut kernels = vec![LinearKernel::Portable];
    if g.caps().coop_subgroup().is_some() {
        kernels.push(LinearKernel::Coop);
    }
    let mut rng = Rng::fresh(0x0c0);
    let (m, n) = (37, 21);
    let b = rng.normals(n, 0.5);
    for kernel in kernels {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for act in Activation::ALL {
                for bias in [false, true] {
                    let bb = bias.then_some(b.as_slice());
                    let got = run_gpu_rounded(
                        &[],
                        &[],
                        bb,
                        (m, n, 0),
                        dtype,
                        act,
                        kernel,
                        LinearRounding::None,
                    );
                    let want = reference::nn::linear::linear(&[], &[], bb, m, n, 0, act);
                    let what = format!("K = 0 {kernel:?} {dtype:?} {act:?} bias={bias}");
                    assert_close(&what, &got, &want, 1e-6, 1e-6, 1e-6);
                }
            }
        }
    }
}

/// `KOrder::Frag32`: each run of 32 is a permutation that puts invocation q's eight k of a
/// 32-k step (2q, 2q + 1, 2q + 8, 2q + 9 and the same + 16, the k its B fragments hold) at
/// positions 8q .. 8q + 8, in that order (the kernel's `bfrag` reads them so).
#[test]
fn fragment_order_is_the_kernels_permutation() {
    use nabla::ops::linear::frag_position;
    let mut seen = [false; 32];
    for k in 0..32 {
        let p = frag_position(k);
        assert!(p < 32 && !seen[p], "k {k} -> {p}");
        seen[p] = true;
    }
    for q in 0..4 {
        let want = [2 * q, 2 * q + 1, 2 * q + 8, 2 * q + 9];
        for (j, k) in want.iter().chain(want.map(|k| k + 16).iter()).enumerate() {
            assert_eq!(frag_position(*k), 8 * q + j, "q {q} j {j}");
        }
    }
}

/// `Gpu::upload_f16_frag` stores each row's f16 values (rounded to nearest even) in fragment
/// order and marks the tensor so; shapes it cannot hold are refused with what is needed.
#[test]
fn fragment_order_upload_and_refusals() {
    let g = gpu();
    let mut rng = Rng::fresh(0xf7a9);
    let (n, k) = (3, 64);
    let w = rng.normals(n * k, 1.0);
    let t = g.upload_f16_frag(&w, &[n, k]).unwrap();
    assert_eq!(t.k_order(), nabla::gpu::KOrder::Frag32);
    assert_eq!((t.shape(), t.dtype()), (&[n, k][..], DType::F16));
    let bytes = g.read_bytes(&t).unwrap();
    let got: Vec<half::f16> = bytemuck::cast_slice(&bytes[..n * k * 2]).to_vec();
    for r in 0..n {
        for kk in 0..k {
            let pos = r * k + kk / 32 * 32 + nabla::ops::linear::frag_position(kk % 32);
            assert_eq!(
                got[pos],
                half::f16::from_f32(w[r * k + kk]),
                "row {r} k {kk}"
            );
        }
    }
    // bf16 weights: rounded to bf16, then stored as f16 (what the tensor-core kernel stages)
    let tb = g.upload_bf16_frag(&w, &[n, k]).unwrap();
    let bytes = g.read_bytes(&tb).unwrap();
    let got: Vec<half::f16> = bytemuck::cast_slice(&bytes[..n * k * 2]).to_vec();
    for (e, v) in w.iter().enumerate() {
        let pos = e / 32 * 32 + nabla::ops::linear::frag_position(e % 32);
        assert_eq!(
            got[pos],
            half::f16::from_f32(half::bf16::from_f32(*v).to_f32())
        );
    }
    // views keep the order
    assert_eq!(t.rows(1, 2).unwrap().k_order(), nabla::gpu::KOrder::Frag32);
    for (shape, len) in [(vec![2, 48], 96), (vec![2, 2, 32], 128), (vec![2, 32], 63)] {
        let e = g
            .upload_f16_frag(&vec![0.0; len], &shape)
            .unwrap_err()
            .to_string();
        assert!(e.contains("multiple of 32"), "{shape:?}: {e}");
    }
}

/// Weights in fragment order give the reference's result on an adapter whose tensor-core kernel
/// builds W's fragments from storage (f16-rounded operands), and a clear refusal elsewhere (the
/// portable kernel does not read that order), never a silently wrong result.
#[test]
fn fragment_order_weights_match_the_reference_or_are_refused() {
    let g = gpu();
    let mut rng = Rng::fresh(0xf7aa);
    let (m, n, k) = (70, 40, 96);
    let (x, w, b) = operands(&mut rng, m, n, k);
    let w16 = rounded(&w, DType::F16);
    let xt = g.upload_f32(&x, &[m, k]).unwrap();
    let wt = g.upload_f16_frag(&w16, &[n, k]).unwrap();
    let bt = g.upload_f32(&b, &[n]).unwrap();
    let portable = g.empty(&[m, n], DType::F32).unwrap();
    let mut batch = g.batch();
    let e = record_linear_with(
        &mut batch,
        &xt,
        &wt,
        Some(&bt),
        Activation::None,
        &portable,
        LinearKernel::Portable,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("fragment order"), "{e}");
    drop(batch);
    let usable = nabla::ops::linear::frag_weights_usable(g);
    match linear(g, &xt, &wt, Some(&bt), Activation::GeluTanh) {
        Ok(y) => {
            assert!(usable, "ran without a usable fragment order");
            let want = reference::nn::linear::linear(
                &rounded(&x, DType::F16),
                &w16,
                Some(&b),
                m,
                n,
                k,
                Activation::GeluTanh,
            );
            assert_close(
                "fragment order",
                &g.read_f32(&y).unwrap(),
                &want,
                1e-3,
                1e-3,
                1e-4,
            );
        }
        Err(e) => {
            assert!(!usable, "refused although usable: {e}");
            let e = e.to_string();
            assert!(e.contains("fragment order"), "{e}");
        }
    }
}
