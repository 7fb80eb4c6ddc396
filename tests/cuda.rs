#![cfg(feature = "cuda")]
//! The CUDA layer (`--features cuda`): every kernel source compiles with NVRTC (no GPU needed);
//! on a machine with an NVIDIA GPU, every op of `nabla::cuda::ops` and the cuBLASLt linear
//! against the CPU references (fresh random inputs, outputs poisoned with NaN first, relative L2
//! and elementwise bounds, NaN never passes), the backend's caches and conversions, bad shapes
//! as errors, and the tiny Wan DiT golden case on `Dit<CudaBackend>`.
//!
//! Without a driver or a device the GPU tests print "no CUDA device: skipped" and pass; the
//! NVRTC test fails where NVRTC is missing unless `NABLA_SKIP_NVRTC=1`.

mod common;

use common::cuda::{round_to, upload};

use common::golden::{check, config_of, golden_dir, manifest, tolerance};
use common::{POISON, Rng, assert_close, rel_l2};
use nabla::cuda::{Cuda, CudaBackend, CudaTensor, gemm, ops};
use nabla::io::TensorFile;
use nabla::ops::linear::Activation;
use nabla::reference::nn as rnn;
use nabla::wan::backend::{Backend, Norm};
use nabla::wan::{Checkpoint, Dit, DitInput, Trace, WeightPrecision};
use nabla::{DType, Error, SparseAlgo, reference};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// NVRTC (no device)
// ---------------------------------------------------------------------------------------------

/// Kernels `src/cuda/ops.rs` launches: each must be an entry of the compiled module.
const OPS_KERNELS: &[&str] = &[
    "norm_rows",
    "add_f32",
    "gated_residual_f32",
    "unary_f32",
    "bias_act_any",
    "convert_f32",
    "rope_any",
    "rope_split_heads_any",
    "split_heads_any",
    "merge_heads_any",
    "gather_rows_u32",
    "gather_rows_u16",
    "patchify_u32",
    "patchify_u16",
    "unpatchify_u32",
    "unpatchify_u16",
];

#[test]
fn every_source_compiles_with_nvrtc() {
    if !nabla::cuda::nvrtc_present() {
        if std::env::var("NABLA_SKIP_NVRTC").is_ok_and(|v| v == "1") {
            eprintln!("NVRTC missing and NABLA_SKIP_NVRTC=1: skipped");
            return;
        }
        panic!(
            "NVRTC (libnvrtc.so) is not installed or not on LD_LIBRARY_PATH: the CUDA kernel \
             sources cannot be checked. Install the CUDA 13 runtime compiler (nvidia-cuda-nvrtc) \
             or set NABLA_SKIP_NVRTC=1 to skip this test"
        );
    }
    let sources = nabla::cuda::sources::SOURCES;
    assert!(
        sources.iter().any(|(n, _)| *n == "ops"),
        "the ops module is registered"
    );
    for (name, src) in sources {
        for &arch in nabla::cuda::sources::archs(name) {
            let ptx = nabla::cuda::compile_ptx(name, src, arch)
                .unwrap_or_else(|e| panic!("{name}.cu for {arch}: {e}"));
            let text = ptx.to_src();
            if *name == "ops" {
                for k in OPS_KERNELS {
                    assert!(
                        text.contains(&format!(".entry {k}(")),
                        "ops.cu for {arch} has no kernel {k}"
                    );
                }
            }
            eprintln!("{name}.cu for {arch}: {} bytes of PTX", text.len());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

fn up(c: &Cuda, data: &[f32], shape: &[usize]) -> CudaTensor {
    c.upload_f32(data, shape).unwrap()
}

/// A new tensor filled with NaN (of its storage type), so unwritten elements fail.
fn poisoned(c: &Cuda, shape: &[usize], dtype: DType) -> CudaTensor {
    let t = c.empty(shape, dtype).unwrap();
    let n = t.numel();
    let bytes: Vec<u8> = match dtype {
        DType::F32 | DType::U32 => POISON.to_le_bytes().repeat(n),
        DType::F16 => 0x7e00u16.to_le_bytes().repeat(n),
        DType::BF16 => 0x7fc0u16.to_le_bytes().repeat(n),
    };
    c.write_bytes(&t, &bytes).unwrap();
    t
}

fn read(c: &Cuda, t: &CudaTensor) -> Vec<f32> {
    c.download_f32(t).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Asserts a shape error whose message contains every needle.
fn expect_shape_err<T: std::fmt::Debug>(what: &str, r: nabla::Result<T>, needles: &[&str]) {
    match r {
        Err(Error::Shape(msg)) => {
            for n in needles {
                assert!(msg.contains(n), "{what}: error {msg:?} lacks {n:?}");
            }
            eprintln!("{what}: {msg}");
        }
        other => panic!("{what}: expected a shape error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Norms
// ---------------------------------------------------------------------------------------------

const EPS: f32 = 1e-6;

fn check_norms(c: &Cuda, rng: &mut Rng, x: &[f32], m: usize, cols: usize, tol: f32) {
    let what = format!("[{m}, {cols}]");
    let xt = up(c, x, &[m, cols]);
    let eps = EPS as f64;
    let run = |mode: &Norm<'_, CudaTensor>| {
        let out = poisoned(c, &[m, cols], DType::F32);
        ops::layer_norm(c, &xt, &out, EPS, mode).unwrap();
        read(c, &out)
    };
    let l2 = 1e-6;
    assert_close(
        &format!("{what} plain"),
        &run(&Norm::Plain),
        &rnn::norm::layer_norm(x, cols, eps),
        tol,
        tol,
        l2,
    );
    let w = rng.normals(cols, 1.0);
    let b = rng.normals(cols, 1.0);
    let (wt, bt) = (up(c, &w, &[cols]), up(c, &b, &[cols]));
    assert_close(
        &format!("{what} affine"),
        &run(&Norm::Affine(&wt, &bt)),
        &rnn::norm::layer_norm_affine(x, cols, eps, &w, &b),
        tol,
        tol,
        l2,
    );
    let mods = rng.normals(6 * cols, 0.5);
    let mt = up(c, &mods, &[6, cols]);
    for (shift, scale) in [(0u32, 1u32), (3, 4), (5, 2)] {
        assert_close(
            &format!("{what} modulate({shift},{scale})"),
            &run(&Norm::Modulate {
                mods: &mt,
                shift,
                scale,
            }),
            &rnn::norm::layer_norm_modulate(x, cols, eps, &mods, shift as usize, scale as usize),
            tol,
            tol,
            l2,
        );
    }
    let out = poisoned(c, &[m, cols], DType::F32);
    ops::rms_norm(c, &xt, &wt, &out, EPS).unwrap();
    assert_close(
        &format!("{what} rms"),
        &read(c, &out),
        &rnn::norm::rms_norm(x, cols, &w, eps),
        tol,
        tol,
        l2,
    );
}

#[test]
fn norms_match_reference() {
    let c = device!();
    let mut rng = Rng::fresh(0xc1);
    for &m in &[1usize, 3, 67, 1030] {
        for &cols in &[1usize, 7, 45, 256, 1000, 5120] {
            if m * cols > 2_000_000 {
                continue;
            }
            let x = rng.normals(m * cols, 2.0);
            check_norms(c, &mut rng, &x, m, cols, 2e-5);
        }
    }
    // large offset, small spread (the pivot keeps it exact) and wide spread
    for &(m, cols) in &[(3, 7), (67, 100), (2, 5120)] {
        let off = 1e4 * (1.0 + rng.uniform() as f32);
        let x: Vec<f32> = rng.normals(m * cols, 1.0).iter().map(|v| v + off).collect();
        check_norms(c, &mut rng, &x, m, cols, 2e-5);
        let x = rng.normals(m * cols, 1e4);
        check_norms(c, &mut rng, &x, m, cols, 2e-5);
    }
}

#[test]
fn constant_rows_normalize_to_exactly_zero() {
    let c = device!();
    for cols in [1usize, 45, 1000] {
        let x = vec![3.25f32; 2 * cols];
        let xt = up(c, &x, &[2, cols]);
        let out = poisoned(c, &[2, cols], DType::F32);
        ops::layer_norm(c, &xt, &out, EPS, &Norm::Plain).unwrap();
        assert!(
            read(c, &out).iter().all(|&v| v == 0.0),
            "constant rows of width {cols} must give exactly 0"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise
// ---------------------------------------------------------------------------------------------

const SHAPES: [(usize, usize); 5] = [(1, 1), (3, 7), (67, 45), (129, 256), (1, 5121)];

#[test]
fn add_matches_reference_with_row_broadcast() {
    let c = device!();
    let mut rng = Rng::fresh(0xc2);
    for &(m, n) in &SHAPES {
        let a = rng.normals(m * n, 1.0);
        let b = rng.normals(m * n, 1.0);
        let out = poisoned(c, &[m, n], DType::F32);
        ops::add(c, &up(c, &a, &[m, n]), &up(c, &b, &[m, n]), &out).unwrap();
        assert_close(
            &format!("add [{m}, {n}]"),
            &read(c, &out),
            &rnn::elementwise::add(&a, &b),
            0.0,
            0.0,
            0.0,
        );
        // one row broadcast, given as [1, n] and as [n]
        let row = rng.normals(n, 1.0);
        let want: Vec<f32> = a.iter().enumerate().map(|(i, v)| v + row[i % n]).collect();
        for shape in [vec![1, n], vec![n]] {
            let out = poisoned(c, &[m, n], DType::F32);
            ops::add(c, &up(c, &a, &[m, n]), &up(c, &row, &shape), &out).unwrap();
            assert_close(
                &format!("add [{m}, {n}] + {shape:?}"),
                &read(c, &out),
                &want,
                0.0,
                0.0,
                0.0,
            );
        }
    }
}

#[test]
fn gated_residual_matches_reference() {
    let c = device!();
    let mut rng = Rng::fresh(0xc3);
    for &(m, n) in &SHAPES {
        let x = rng.normals(m * n, 1.0);
        let y = rng.normals(m * n, 1.0);
        let gate = rng.normals(6 * n, 0.5);
        let gt = up(c, &gate, &[6, n]);
        for row in [None, Some(0u32), Some(5)] {
            let xt = up(c, &x, &[m, n]);
            ops::gated_residual(c, &xt, &up(c, &y, &[m, n]), row.map(|r| (&gt, r))).unwrap();
            let g = row.map(|r| &gate[r as usize * n..(r as usize + 1) * n]);
            assert_close(
                &format!("gated_residual [{m}, {n}] row {row:?}"),
                &read(c, &xt),
                &rnn::elementwise::gated_residual(&x, &y, n, g),
                1e-6,
                1e-6,
                1e-6,
            );
        }
    }
}

/// Random values plus the extremes an activation must survive without NaN.
fn activation_inputs(rng: &mut Rng, n: usize) -> Vec<f32> {
    let special = [
        0.0f32, -0.0, 1e-30, -1e-30, 0.5, -0.5, 3.0, -3.0, 10.0, -10.0, 15.0, -15.0, 20.0, -20.0,
        88.0, -88.0, 100.0, -100.0, 1e4, -1e4, 3e38, -3e38,
    ];
    let mut v = rng.normals(n, 3.0);
    for (i, s) in special.iter().enumerate() {
        let j = (i * 7919) % n;
        v[j] = *s;
    }
    v
}

#[test]
fn activations_match_reference() {
    let c = device!();
    let mut rng = Rng::fresh(0xc4);
    for &(m, n) in &SHAPES {
        let x = activation_inputs(&mut rng, m * n);
        let xt = up(c, &x, &[m, n]);
        for (act, want) in [
            (Activation::GeluTanh, rnn::elementwise::gelu_tanh(&x)),
            (Activation::Silu, rnn::elementwise::silu(&x)),
        ] {
            let out = poisoned(c, &[m, n], DType::F32);
            ops::activation(c, &xt, act, &out).unwrap();
            assert_close(
                &format!("{act:?} [{m}, {n}]"),
                &read(c, &out),
                &want,
                1e-6,
                1e-5,
                1e-6,
            );
        }
    }
    expect_err_invalid(ops::activation(
        c,
        &up(c, &[1.0], &[1]),
        Activation::None,
        &c.empty(&[1], DType::F32).unwrap(),
    ));
}

fn expect_err_invalid(r: nabla::Result<()>) {
    assert!(
        matches!(r, Err(Error::Invalid(_))),
        "activation None must be refused, got {r:?}"
    );
}

#[test]
fn bias_activation_matches_the_linear_epilogue() {
    let c = device!();
    let mut rng = Rng::fresh(0xc5);
    for &(m, n) in &SHAPES {
        // the linear's SiLU clamps its exponent at 80 (as linear_common.wgsl): inputs below
        // about -1e30 would give v·e⁻⁸⁰ instead of 0, so the extremes stop at ±1e4 here
        let y: Vec<f32> = activation_inputs(&mut rng, m * n)
            .into_iter()
            .map(|v| v.clamp(-1e4, 1e4))
            .collect();
        let b = rng.normals(n, 0.5);
        for act in Activation::ALL {
            for bias in [false, true] {
                let yt = up(c, &y, &[m, n]);
                let bt = bias.then(|| up(c, &b, &[n]));
                ops::bias_activation(c, &yt, bt.as_ref(), act).unwrap();
                let want: Vec<f32> = y
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let v = v as f64 + if bias { b[i % n] as f64 } else { 0.0 };
                        rnn::linear::activate(v, act) as f32
                    })
                    .collect();
                assert_close(
                    &format!("bias_activation {act:?} bias={bias} [{m}, {n}]"),
                    &read(c, &yt),
                    &want,
                    1e-6,
                    1e-5,
                    1e-6,
                );
            }
        }
    }
}

#[test]
fn conversions_round_to_nearest_even_exactly() {
    let c = device!();
    let mut rng = Rng::fresh(0xc6);
    let mut x = rng.normals(10_007, 10.0);
    x.extend_from_slice(&[
        0.0,
        -0.0,
        1e-8,
        -6e-8,
        3e-5,
        65504.0,
        65519.0,
        65520.0,
        1e6,
        -1e6,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
        1.0 + f32::EPSILON,
        1.0 + 1.0 / 256.0, // a bf16 tie
    ]);
    let xt = up(c, &x, &[x.len()]);
    for dtype in [DType::F16, DType::BF16] {
        let out = poisoned(c, &[x.len()], dtype);
        ops::convert(c, &xt, &out).unwrap();
        let got = c.download_bytes(&out).unwrap();
        let want: Vec<u8> = match dtype {
            DType::F16 => x
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            _ => x
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        };
        assert_eq!(
            got, want,
            "{dtype:?} conversion differs from the half crate"
        );
    }
    // NaN stays NaN
    let nt = up(c, &[f32::NAN, -f32::NAN], &[2]);
    for dtype in [DType::F16, DType::BF16] {
        let out = c.empty(&[2], dtype).unwrap();
        ops::convert(c, &nt, &out).unwrap();
        assert!(read(c, &out).iter().all(|v| v.is_nan()), "{dtype:?} NaN");
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE, heads, fractal order, patches
// ---------------------------------------------------------------------------------------------

#[test]
fn rope_matches_reference_in_every_storage() {
    let c = device!();
    let mut rng = Rng::fresh(0xc7);
    for (grid, d, heads, fractal) in [
        ((2, 3, 5), 128, 3, false),
        ((3, 7, 9), 64, 1, false),
        ((2, 8, 16), 32, 2, true),
        ((1, 1, 1), 6, 1, false),
    ] {
        let s = grid.0 * grid.1 * grid.2;
        let (cos, sin) = nabla::ops::rope::rope_tables(grid, d, fractal);
        let (ct, st) = ops::rope_tables(c, grid, d, fractal).unwrap();
        assert_eq!(bits(&read(c, &ct)), bits(&cos), "uploaded cos table");
        assert_eq!(bits(&read(c, &st)), bits(&sin), "uploaded sin table");
        for (dtype, atol, rtol) in [
            (DType::F32, 2e-6f32, 1e-5f32),
            (DType::F16, 1e-4, 2e-3),
            (DType::BF16, 1e-6, 1e-2),
        ] {
            let x0 = rng.normals(s * heads * d, 1.0);
            let x = round_to(&x0, dtype);
            for shape in [vec![s, heads * d], vec![1, s, heads, d]] {
                let xt = upload(c, &x, &shape, dtype);
                ops::rope(c, &xt, &ct, &st, heads).unwrap();
                let want = round_to(&rnn::rope::rope(&x, &cos, &sin, heads, d), dtype);
                assert_close(
                    &format!("rope {dtype:?} {grid:?} d{d} h{heads} {shape:?}"),
                    &read(c, &xt),
                    &want,
                    atol,
                    rtol,
                    rtol as f64,
                );
            }
        }
    }
}

#[test]
fn split_and_merge_heads_match_reference() {
    let c = device!();
    let mut rng = Rng::fresh(0xc8);
    for &(s, h, d) in &[(1, 1, 1), (7, 3, 5), (67, 2, 64), (192, 12, 128)] {
        let x = rng.normals(s * h * d, 1.0);
        let xt = up(c, &x, &[s, h * d]);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let heads = poisoned(c, &[1, h, s, d], dtype);
            ops::split_heads(c, &xt, &heads).unwrap();
            let want = round_to(&rnn::elementwise::split_heads(&x, s, h, d), dtype);
            assert_eq!(
                bits(&read(c, &heads)),
                bits(&want),
                "split_heads {dtype:?} s{s} h{h} d{d}"
            );
            let back = poisoned(c, &[s, h * d], DType::F32);
            ops::merge_heads(c, &heads, &back).unwrap();
            assert_eq!(
                bits(&read(c, &back)),
                bits(&rnn::elementwise::merge_heads(&want, h, s, d)),
                "merge_heads {dtype:?} s{s} h{h} d{d}"
            );
        }
    }
}

#[test]
fn fractal_order_is_the_reference_permutation() {
    let c = device!();
    let mut be = CudaBackend::new(c);
    for grid in [(1, 8, 8), (3, 8, 16), (2, 16, 24)] {
        let n = grid.0 * grid.1 * grid.2;
        let perm = reference::fractal_perm(grid.0, grid.1, grid.2);
        let inv = reference::inverse_perm(&perm);
        // rows of 3 f32 values, and of 3 f16 values (the 16-bit gather)
        for (dtype, cols) in [(DType::F32, 3usize), (DType::F16, 3), (DType::BF16, 4)] {
            let ids: Vec<f32> = (0..n * cols).map(|i| (i % 2048) as f32).collect();
            let x = round_to(&ids, dtype);
            let xt = upload(c, &x, &[n, cols], dtype);
            for (inverse, p) in [(false, &perm), (true, &inv)] {
                let want: Vec<f32> = p
                    .iter()
                    .flat_map(|&r| x[r * cols..(r + 1) * cols].to_vec())
                    .collect();
                let out = poisoned(c, &[n, cols], dtype);
                ops::fractal(c, &xt, &out, grid, inverse).unwrap();
                assert_eq!(
                    read(c, &out),
                    want,
                    "ops::fractal {grid:?} {dtype:?} inverse={inverse}"
                );
                let out = poisoned(c, &[n, cols], dtype);
                be.fractal(&xt, &out, grid, inverse).unwrap();
                assert_eq!(
                    read(c, &out),
                    want,
                    "backend fractal {grid:?} {dtype:?} inverse={inverse}"
                );
            }
        }
    }
}

#[test]
fn patchify_and_unpatchify_match_reference() {
    let c = device!();
    let mut rng = Rng::fresh(0xc9);
    for dims in [(1, 1, 2, 2), (3, 2, 4, 6), (16, 3, 16, 16), (5, 1, 2, 10)] {
        let (nc, nf, nh, nw) = dims;
        let s = nf * (nh / 2) * (nw / 2);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let z = round_to(&rng.normals(nc * nf * nh * nw, 1.0), dtype);
            let zt = upload(c, &z, &[nc, nf, nh, nw], dtype);
            let tokens = poisoned(c, &[s, 4 * nc], dtype);
            ops::patchify(c, &zt, &tokens).unwrap();
            assert_eq!(
                bits(&read(c, &tokens)),
                bits(&rnn::patch::patchify(&z, dims)),
                "patchify {dims:?} {dtype:?}"
            );
            let o = round_to(&rng.normals(s * 4 * nc, 1.0), dtype);
            let ot = upload(c, &o, &[s, 4 * nc], dtype);
            let v = poisoned(c, &[nc, nf, nh, nw], dtype);
            ops::unpatchify(c, &ot, &v).unwrap();
            assert_eq!(
                bits(&read(c, &v)),
                bits(&rnn::patch::unpatchify(&o, dims)),
                "unpatchify {dims:?} {dtype:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Linear (cuBLASLt)
// ---------------------------------------------------------------------------------------------

/// x ~ N(0, 1), W ~ N(0, 1/K), b ~ N(0, 1/4): outputs O(1).
fn operands(rng: &mut Rng, m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        rng.normals(m * k, 1.0),
        rng.normals(n * k, 1.0 / (k.max(1) as f32).sqrt()),
        rng.normals(n, 0.5),
    )
}

const LINEAR_SHAPES: [(usize, usize, usize); 9] = [
    (67, 45, 40),
    (1, 45, 40),
    (1, 1, 1),
    (3, 5, 7),
    (1, 256, 5120),
    (130, 64, 256),
    (300, 256, 512),
    (1093, 130, 18),
    (2, 3, 0),
];

/// `(atol = rtol, relative L2)` of a linear against the f64 reference on the operands cuBLASLt
/// sees: f32 rounding of a K-term sum for f32 weights; for 16-bit weights the tensor cores'
/// accumulation (exact products, but sums aligned and normalized by truncation per MMA step, a
/// few f32 ulps over K = 5120) — still 40x below the 16-bit rounding of x this test removes.
fn tolerance_of(dtype: DType) -> (f32, f64) {
    if dtype == DType::F32 {
        (1e-5, 1e-5)
    } else {
        (1e-4, 5e-5)
    }
}

/// Runs the linear into a poisoned output; `fuse` = None takes `gemm::linear`'s default.
#[allow(clippy::too_many_arguments)]
fn run_linear(
    c: &Cuda,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (m, n, k): (usize, usize, usize),
    dtype: DType,
    act: Activation,
    fuse: Option<bool>,
) -> Vec<f32> {
    let xt = up(c, x, &[m, k]);
    let wt = upload(c, w, &[n, k], dtype);
    let bt = b.map(|b| up(c, b, &[n]));
    let out = poisoned(c, &[m, n], DType::F32);
    match fuse {
        None => gemm::linear(c, &xt, &wt, bt.as_ref(), act, &out),
        Some(f) => gemm::linear_with(c, &xt, &wt, bt.as_ref(), act, &out, f).map(|_| ()),
    }
    .unwrap_or_else(|e| panic!("linear {m}x{n}x{k} {dtype:?} {act:?}: {e}"));
    read(c, &out)
}

/// Every activation, with and without bias. The reference sees the operands as cuBLASLt does:
/// the weights rounded to their storage, and for 16-bit weights x rounded to the same type
/// (products exact in f32, f32 accumulation). GELU fused into cuBLASLt's epilogue
/// (`linear_with(.., true)`, not the default) gets a looser bound, since cuBLASLt does not
/// document its formula; the printout shows how close it is to the tanh form.
fn check_linear(tag: u64, dtype: DType) {
    let c = device!();
    let mut rng = Rng::fresh(tag);
    for &(m, n, k) in &LINEAR_SHAPES {
        if dtype != DType::F32 && k == 0 {
            continue;
        }
        let (x, w, b) = operands(&mut rng, m, n, k);
        let (xr, wr) = (round_to(&x, dtype), round_to(&w, dtype));
        let (tol, l2) = tolerance_of(dtype);
        for act in Activation::ALL {
            for bias in [false, true] {
                let bb = bias.then_some(b.as_slice());
                let want = rnn::linear::linear(&xr, &wr, bb, m, n, k, act);
                let what = format!("{dtype:?} {m}x{n}x{k} {act:?} bias={bias}");
                let got = run_linear(c, &x, &w, bb, (m, n, k), dtype, act, None);
                assert_close(&what, &got, &want, tol, tol, l2);
                if act == Activation::GeluTanh {
                    let got = run_linear(c, &x, &w, bb, (m, n, k), dtype, act, Some(true));
                    assert_close(
                        &format!("{what} (GELU fused by cuBLASLt)"),
                        &got,
                        &want,
                        1e-3,
                        1e-3,
                        1e-3,
                    );
                }
            }
        }
    }
}

#[test]
fn linear_f32_weights() {
    check_linear(0xd1, DType::F32);
}

#[test]
fn linear_bf16_weights() {
    check_linear(0xd2, DType::BF16);
}

#[test]
fn linear_f16_weights() {
    check_linear(0xd3, DType::F16);
}

#[test]
fn linear_on_row_views_and_leading_axes() {
    // operands at offsets that are not 256-byte aligned (the alignment cuBLASLt assumes by
    // default), and a 3-D input
    let c = device!();
    let mut rng = Rng::fresh(0xd4);
    let (m, n, k) = (37, 45, 40);
    let (x, w, b) = operands(&mut rng, m + 3, n, k);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let xall = up(c, &x, &[m + 3, k]);
        let xv = xall.rows(3, m).unwrap();
        let wt = upload(c, &w, &[n, k], dtype);
        let bt = up(c, &b, &[n]);
        let oall = poisoned(c, &[m + 1, n], DType::F32);
        let ov = oall.rows(1, m).unwrap();
        gemm::linear(c, &xv, &wt, Some(&bt), Activation::None, &ov).unwrap();
        let (xr, wr) = (round_to(&x[3 * k..], dtype), round_to(&w, dtype));
        let want = rnn::linear::linear(&xr, &wr, Some(&b), m, n, k, Activation::None);
        let got = read(c, &oall);
        assert!(
            got[..n].iter().all(|v| v.is_nan()),
            "row 0 must stay untouched"
        );
        let (tol, l2) = tolerance_of(dtype);
        assert_close(
            &format!("{dtype:?} row views"),
            &got[n..],
            &want,
            tol,
            tol,
            l2,
        );
        // [2, m, k] input
        let x3 = rng.normals(2 * m * k, 1.0);
        let out = poisoned(c, &[2, m, n], DType::F32);
        gemm::linear(
            c,
            &up(c, &x3, &[2, m, k]),
            &wt,
            Some(&bt),
            Activation::Silu,
            &out,
        )
        .unwrap();
        let want = rnn::linear::linear(
            &round_to(&x3, dtype),
            &wr,
            Some(&b),
            2 * m,
            n,
            k,
            Activation::Silu,
        );
        assert_close(
            &format!("{dtype:?} [2, m, k]"),
            &read(c, &out),
            &want,
            tol,
            tol,
            l2,
        );
    }
}

#[test]
fn linear_rejects_bad_operands() {
    let c = device!();
    let z = |shape: &[usize], dt: DType| c.empty(shape, dt).unwrap();
    let x = z(&[4, 8], DType::F32);
    let w = z(&[6, 8], DType::BF16);
    let out = z(&[4, 6], DType::F32);
    let none = Activation::None;
    expect_shape_err(
        "transposed weight",
        gemm::linear(c, &x, &z(&[8, 6], DType::BF16), None, none, &out),
        &["K = 6", "pass W, not Wᵀ"],
    );
    expect_shape_err(
        "f16 input",
        gemm::linear(c, &z(&[4, 8], DType::F16), &w, None, none, &out),
        &["input must be f32"],
    );
    expect_shape_err(
        "bias length",
        gemm::linear(c, &x, &w, Some(&z(&[5], DType::F32)), none, &out),
        &["bias", "[6]"],
    );
    expect_shape_err(
        "output shape",
        gemm::linear(c, &x, &w, None, none, &z(&[4, 5], DType::F32)),
        &["[4, 6]"],
    );
    expect_shape_err(
        "f16 output of bf16 weights",
        gemm::linear(c, &x, &w, None, none, &z(&[4, 6], DType::F16)),
        &["output must be", "weight's type"],
    );
    expect_shape_err(
        "bf16 input of f32 weights",
        gemm::linear(
            c,
            &z(&[4, 8], DType::BF16),
            &z(&[6, 8], DType::F32),
            None,
            none,
            &out,
        ),
        &["input must be f32"],
    );
    expect_shape_err(
        "u32 weight",
        gemm::linear(c, &x, &z(&[6, 8], DType::U32), None, none, &out),
        &["f32, f16 or bf16"],
    );
    let big = z(&[4, 8], DType::F32);
    expect_shape_err(
        "in place",
        gemm::linear(c, &big, &z(&[8, 8], DType::F32), None, none, &big),
        &["overlaps"],
    );
}

#[test]
fn ops_reject_bad_shapes() {
    let c = device!();
    let z = |shape: &[usize], dt: DType| c.empty(shape, dt).unwrap();
    let x = z(&[4, 8], DType::F32);
    expect_shape_err(
        "norm out shape",
        ops::layer_norm(c, &x, &z(&[4, 7], DType::F32), EPS, &Norm::Plain),
        &["out", "[4, 8]"],
    );
    expect_shape_err(
        "norm in place",
        ops::layer_norm(c, &x, &x, EPS, &Norm::Plain),
        &["overlap"],
    );
    let mods = z(&[6, 8], DType::F32);
    expect_shape_err(
        "modulation row",
        ops::layer_norm(
            c,
            &x,
            &z(&[4, 8], DType::F32),
            EPS,
            &Norm::Modulate {
                mods: &mods,
                shift: 6,
                scale: 1,
            },
        ),
        &["shift row 6"],
    );
    expect_shape_err(
        "rms weight",
        ops::rms_norm(c, &x, &z(&[7], DType::F32), &z(&[4, 8], DType::F32), EPS),
        &["weight", "[8]"],
    );
    expect_shape_err(
        "add",
        ops::add(c, &x, &z(&[4, 7], DType::F32), &z(&[4, 8], DType::F32)),
        &["same shape"],
    );
    expect_shape_err(
        "gate row",
        ops::gated_residual(c, &x, &z(&[4, 8], DType::F32), Some((&mods, 6))),
        &["gate row 6"],
    );
    expect_shape_err(
        "split heads",
        ops::split_heads(c, &x, &z(&[1, 3, 4, 2], DType::F16)),
        &["[S, H·D]"],
    );
    expect_shape_err(
        "rms norm 16-bit out",
        ops::rms_norm(c, &x, &z(&[8], DType::F32), &z(&[4, 8], DType::BF16), EPS),
        &["out must be f32"],
    );
    expect_shape_err(
        "rope split layout",
        ops::rope_split_heads(
            c,
            &z(&[4, 16], DType::F32),
            &z(&[4, 4], DType::F32),
            &z(&[4, 4], DType::F32),
            &z(&[1, 2, 4, 6], DType::F16),
        ),
        &["[S, H·D]"],
    );
    expect_shape_err(
        "rope split tables",
        ops::rope_split_heads(
            c,
            &z(&[4, 16], DType::F32),
            &z(&[4, 3], DType::F32),
            &z(&[4, 3], DType::F32),
            &z(&[1, 2, 4, 8], DType::F16),
        ),
        &["cos", "[4, 4]"],
    );
    expect_shape_err(
        "merge heads u32",
        ops::merge_heads(c, &z(&[1, 2, 4, 4], DType::U32), &x),
        &["f32, f16 or bf16"],
    );
    expect_shape_err(
        "fractal grid",
        ops::fractal(
            c,
            &z(&[60, 2], DType::F32),
            &z(&[60, 2], DType::F32),
            (1, 6, 10),
            false,
        ),
        &["multiples of 8"],
    );
    expect_shape_err(
        "patchify odd",
        ops::patchify(c, &z(&[2, 1, 3, 4], DType::F32), &z(&[2, 8], DType::F32)),
        &["even H and W"],
    );
    expect_shape_err(
        "rope layout",
        ops::rope(
            c,
            &z(&[5, 16], DType::F32),
            &z(&[4, 4], DType::F32),
            &z(&[4, 4], DType::F32),
            2,
        ),
        &["does not fit"],
    );
    expect_shape_err(
        "convert to f32",
        ops::convert(c, &x, &z(&[4, 8], DType::F32)),
        &["f16 or bf16"],
    );
    expect_shape_err(
        "rope tables",
        ops::rope_tables(c, (1, 4, 4), 7, false),
        &["even"],
    );
}

// ---------------------------------------------------------------------------------------------
// Backend
// ---------------------------------------------------------------------------------------------

#[test]
fn backend_uploads_and_caches() {
    let c = device!();
    let mut be = CudaBackend::new(c);
    assert!(be.has_f16());
    let mut rng = Rng::fresh(0xe1);
    let w = rng.normals(6 * 10, 3.0);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let t = be.upload_weight(&w, &[6, 10], dtype).unwrap();
        assert_eq!(t.dtype, dtype);
        assert_eq!(
            bits(&be.download(&t).unwrap()),
            bits(&round_to(&w, dtype)),
            "{dtype:?} weight rounding"
        );
    }
    assert!(be.upload_weight(&w, &[6, 9], DType::BF16).is_err());
    let t = be.alloc(&[3, 4]).unwrap();
    be.write(&t, &[1.5; 12]).unwrap();
    assert_eq!(be.download(&t).unwrap(), vec![1.5; 12]);
    expect_shape_err("write length", be.write(&t, &[1.0; 11]), &["11"]);
    let (c1, s1) = be.rope_tables((2, 8, 8), 16, true).unwrap();
    let (c2, s2) = be.rope_tables((2, 8, 8), 16, true).unwrap();
    assert_eq!(
        (c1.ptr(), s1.ptr()),
        (c2.ptr(), s2.ptr()),
        "RoPE tables cached"
    );
    let (c3, _) = be.rope_tables((2, 8, 8), 16, false).unwrap();
    assert_ne!(c1.ptr(), c3.ptr(), "natural and fractal tables differ");
    assert_eq!(be.reshape(&t, &[12]).shape, vec![12]);
    be.flush().unwrap();
}

// ---------------------------------------------------------------------------------------------
// DiT golden parity
// ---------------------------------------------------------------------------------------------

/// The `wan_dit` cases with their weights cases.
fn dit_cases() -> Vec<(Value, Value)> {
    let m = manifest();
    let all = m["cases"].as_array().expect("manifest: cases");
    all.iter()
        .filter(|c| c["kind"] == "wan_dit")
        .map(|case| {
            let wfile = &case["config"]["weights"];
            let w = all
                .iter()
                .find(|c| c["file"] == *wfile)
                .unwrap_or_else(|| panic!("weights case {wfile} of {}", case["name"]));
            (case.clone(), w.clone())
        })
        .collect()
}

/// The DiT of a case's weights on CUDA, its input file and (latent, shape, t, context).
struct DitCase {
    name: String,
    case: Value,
    f: TensorFile,
    x: Vec<f32>,
    shape: (usize, usize, usize),
    t: f64,
    ctx: Vec<f32>,
}

impl DitCase {
    fn load(case: &Value, wcase: &Value) -> (DitCase, Checkpoint) {
        let name = case["name"].as_str().unwrap().to_string();
        let wfile = case["config"]["weights"].as_str().unwrap();
        let ck = Checkpoint::open(golden_dir().join(wfile), &config_of(wcase)).unwrap();
        let f = TensorFile::open(golden_dir().join(case["file"].as_str().unwrap())).unwrap();
        let (x, xs) = f.f32("x").unwrap();
        let (t, _) = f.f32("t").unwrap();
        let (ctx, _) = f.f32("context").unwrap();
        let d = DitCase {
            name,
            case: case.clone(),
            f,
            x,
            shape: (xs[1], xs[2], xs[3]),
            t: t[0] as f64,
            ctx,
        };
        (d, ck)
    }

    fn input(&self) -> DitInput<'_> {
        DitInput {
            latent: &self.x,
            shape: self.shape,
            t: self.t,
            context: &self.ctx,
        }
    }

    fn entries(&self) -> Vec<Value> {
        self.case["tensors"].as_array().unwrap().clone()
    }
}

#[test]
fn golden_wan_dit_dense_parity_path() {
    let c = device!();
    for (case, wcase) in dit_cases() {
        let (d, ck) = DitCase::load(&case, &wcase);
        let name = &d.name;
        let mut be = CudaBackend::new(c);
        let mut dit = Dit::load(&mut be, &ck, WeightPrecision::F32).unwrap();
        let mut tr = Trace::default();
        let out = dit
            .forward(&mut be, &d.input(), None, Some(&mut tr))
            .unwrap_or_else(|e| panic!("{name}: dense DiT forward on CUDA failed: {e}"));
        for e in d.entries() {
            let n = e["name"].as_str().unwrap();
            if !e["params"].is_null()
                || matches!(
                    n,
                    "x" | "t" | "context" | "seq_len" | "grid_sizes" | "fractal_perm"
                )
            {
                continue;
            }
            let (want, _) = d.f.f32(n).unwrap();
            let got = if n == "out_dense" {
                out.clone()
            } else {
                tr.tensors
                    .get(n)
                    .unwrap_or_else(|| panic!("{name}: trace lacks {n}"))
                    .clone()
            };
            check(&format!("{name}/{n} (CUDA)"), &got, &want, tolerance(&e));
        }
    }
}

#[test]
fn golden_wan_dit_fast_path() {
    let c = device!();
    for (case, wcase) in dit_cases() {
        let (d, ck) = DitCase::load(&case, &wcase);
        let name = &d.name;
        let mut be = CudaBackend::new(c);
        let mut dit = Dit::load(&mut be, &ck, WeightPrecision::BF16).unwrap();
        let out = dit
            .forward(&mut be, &d.input(), None, None)
            .unwrap_or_else(|e| panic!("{name}: bf16 DiT forward on CUDA failed: {e}"));
        let (want, _) = d.f.f32("out_dense").unwrap();
        check(
            &format!("{name}/out_dense (CUDA bf16 fast path)"),
            &out,
            &want,
            (2e-2, 2e-2),
        );
        let e = rel_l2(&out, &want);
        assert!(e < 1e-2, "{name}: CUDA fast-path relative L2 {e}");
    }
}

/// Needs the CUDA NABLA mask estimation and block-sparse attention (src/cuda/nabla.rs,
/// attention.rs): until they land this fails with their "not written yet" error.
#[test]
fn golden_wan_dit_sparse() {
    let c = device!();
    for (case, wcase) in dit_cases() {
        let (d, ck) = DitCase::load(&case, &wcase);
        let name = &d.name;
        let mut be = CudaBackend::new(c);
        let mut dit = Dit::load(&mut be, &ck, WeightPrecision::F32).unwrap();
        let entries = d.entries();
        for a in case["config"]["sparse_algos"].as_array().unwrap() {
            let a = a.as_str().unwrap();
            let algo: SparseAlgo = a.parse().unwrap();
            let mut tr = Trace::default();
            let out = dit
                .forward(&mut be, &d.input(), Some(&algo), Some(&mut tr))
                .unwrap_or_else(|e| panic!("{name}: {a} DiT forward on CUDA failed: {e}"));
            for e in entries.iter().filter(|e| e["params"]["sparse_algo"] == a) {
                let n = e["name"].as_str().unwrap();
                if let Some(layer) = e["params"]["layer"].as_u64() {
                    let (want, _) = d.f.u8(n).unwrap();
                    assert_eq!(
                        tr.masks[&format!("layer{layer}")],
                        want,
                        "{name}/{n}: block mask of layer {layer} (CUDA)"
                    );
                } else if n.starts_with("out_") {
                    check(
                        &format!("{name}/{n} (CUDA)"),
                        &out,
                        &d.f.f32(n).unwrap().0,
                        tolerance(e),
                    );
                } else if n.starts_with("block0_self_attn_out") {
                    check(
                        &format!("{name}/{n} (CUDA)"),
                        &tr.tensors["block0_self_attn_out"],
                        &d.f.f32(n).unwrap().0,
                        tolerance(e),
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 16-bit GEMM-boundary activations (the CUDA fast path: Backend::gemm_input_dtype)
// ---------------------------------------------------------------------------------------------

/// `(atol, rtol)` of one rounding to `dtype` on top of an f32 result: one ulp (2⁻⁸ relative for
/// bf16, 2⁻¹¹ for f16, with headroom for a flip at a near-tie) plus the f32 error.
fn ulp_tol(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::BF16 => (1e-6, 8e-3),
        // 4 f16 subnormal ulps (2⁻²⁴ each): f32 math then one rounding lands 1–2 ulps from the
        // f64 reference there (2 measured on the H200)
        DType::F16 => (2.4e-7, 1e-3),
        _ => (1e-6, 1e-5),
    }
}

#[test]
fn backend_gemm_input_dtype_is_the_weights_16_bit_type() {
    let c = device!();
    let be = CudaBackend::new(c);
    assert_eq!(be.gemm_input_dtype(DType::BF16), DType::BF16);
    assert_eq!(be.gemm_input_dtype(DType::F16), DType::F16);
    assert_eq!(be.gemm_input_dtype(DType::F32), DType::F32);
}

#[test]
fn layer_norm_writes_16_bit_outputs_rounded_once() {
    // the 16-bit output is the f32 output rounded to nearest even, bit for bit (the f32 output is
    // checked against the CPU reference in norms_match_reference)
    let c = device!();
    let mut rng = Rng::fresh(0xe1);
    for &(m, cols) in &[(1, 1), (7, 5), (67, 1536), (3, 5120)] {
        let x = rng.normals(m * cols, 2.0);
        let xt = up(c, &x, &[m, cols]);
        let w = up(c, &rng.normals(cols, 1.0), &[cols]);
        let b = up(c, &rng.normals(cols, 0.5), &[cols]);
        let mods = up(c, &rng.normals(6 * cols, 0.5), &[6, cols]);
        let modes = [
            ("plain", Norm::Plain),
            ("affine", Norm::Affine(&w, &b)),
            (
                "modulate",
                Norm::Modulate {
                    mods: &mods,
                    shift: 3,
                    scale: 4,
                },
            ),
        ];
        for (name, mode) in &modes {
            let o32 = poisoned(c, &[m, cols], DType::F32);
            ops::layer_norm(c, &xt, &o32, EPS, mode).unwrap();
            let f = read(c, &o32);
            assert!(f.iter().all(|v| !v.is_nan()), "{name}: f32 output has NaN");
            for dtype in [DType::F16, DType::BF16] {
                let o16 = poisoned(c, &[m, cols], dtype);
                ops::layer_norm(c, &xt, &o16, EPS, mode).unwrap();
                assert_eq!(
                    bits(&read(c, &o16)),
                    bits(&round_to(&f, dtype)),
                    "layer_norm {name} [{m}, {cols}] into {dtype:?}"
                );
            }
        }
    }
}

#[test]
fn merge_heads_writes_every_storage() {
    let c = device!();
    let mut rng = Rng::fresh(0xe2);
    for &(s, h, d) in &[(1, 1, 1), (7, 3, 5), (67, 2, 64), (192, 12, 128)] {
        let x = rng.normals(s * h * d, 1.0);
        for hdt in [DType::F32, DType::F16, DType::BF16] {
            let xr = round_to(&x, hdt);
            let heads = upload(c, &xr, &[1, h, s, d], hdt);
            let merged = rnn::elementwise::merge_heads(&xr, h, s, d);
            for odt in [DType::F32, DType::F16, DType::BF16] {
                let out = poisoned(c, &[s, h * d], odt);
                ops::merge_heads(c, &heads, &out).unwrap();
                assert_eq!(
                    bits(&read(c, &out)),
                    bits(&round_to(&merged, odt)),
                    "merge_heads {hdt:?} -> {odt:?} s{s} h{h} d{d}"
                );
            }
        }
    }
}

#[test]
fn bias_activation_in_16_bit_storage() {
    let c = device!();
    let mut rng = Rng::fresh(0xe3);
    for &(m, n) in &SHAPES {
        let y: Vec<f32> = activation_inputs(&mut rng, m * n)
            .into_iter()
            .map(|v| v.clamp(-1e4, 1e4))
            .collect();
        let b = rng.normals(n, 0.5);
        for dtype in [DType::F16, DType::BF16] {
            let yr = round_to(&y, dtype);
            let (atol, rtol) = ulp_tol(dtype);
            for act in Activation::ALL {
                for bias in [false, true] {
                    let yt = upload(c, &yr, &[m, n], dtype);
                    let bt = bias.then(|| up(c, &b, &[n]));
                    ops::bias_activation(c, &yt, bt.as_ref(), act).unwrap();
                    let want: Vec<f32> = yr
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| {
                            let v = v as f64 + if bias { b[i % n] as f64 } else { 0.0 };
                            rnn::linear::activate(v, act) as f32
                        })
                        .collect();
                    assert_close(
                        &format!("bias_activation {dtype:?} {act:?} bias={bias} [{m}, {n}]"),
                        &read(c, &yt),
                        &round_to(&want, dtype),
                        atol,
                        rtol,
                        rtol as f64,
                    );
                }
            }
        }
    }
}

#[test]
fn rope_split_heads_matches_rope_then_split() {
    let c = device!();
    let mut rng = Rng::fresh(0xe4);
    for (grid, d, heads, fractal) in [
        ((2, 3, 5), 128, 3, false),
        ((3, 7, 9), 64, 1, false),
        ((2, 8, 16), 32, 2, true),
        ((1, 1, 1), 6, 1, false),
    ] {
        let s = grid.0 * grid.1 * grid.2;
        let (cos, sin) = nabla::ops::rope::rope_tables(grid, d, fractal);
        let (ct, st) = ops::rope_tables(c, grid, d, fractal).unwrap();
        let x = rng.normals(s * heads * d, 1.0);
        let roped = rnn::rope::rope(&x, &cos, &sin, heads, d);
        let split = rnn::elementwise::split_heads(&roped, s, heads, d);
        for (dtype, atol, rtol) in [
            (DType::F32, 2e-6f32, 1e-5f32),
            (DType::F16, 1e-4, 2e-3),
            (DType::BF16, 1e-6, 1e-2),
        ] {
            for xshape in [vec![s, heads * d], vec![1, s, heads * d]] {
                let xt = up(c, &x, &xshape);
                let out = poisoned(c, &[1, heads, s, d], dtype);
                ops::rope_split_heads(c, &xt, &ct, &st, &out).unwrap();
                assert_close(
                    &format!("rope_split_heads {dtype:?} {grid:?} d{d} h{heads} {xshape:?}"),
                    &read(c, &out),
                    &round_to(&split, dtype),
                    atol,
                    rtol,
                    rtol as f64,
                );
                assert_eq!(bits(&read(c, &xt)), bits(&x), "x must stay untouched");
            }
            // the backend method (what the DiT calls) is the fused kernel
            let mut be = CudaBackend::new(c);
            let xt = up(c, &x, &[s, heads * d]);
            let out = poisoned(c, &[1, heads, s, d], dtype);
            be.rope_split_heads(&xt, &ct, &st, heads, &out).unwrap();
            assert_close(
                &format!("CudaBackend::rope_split_heads {dtype:?} {grid:?}"),
                &be.download(&out).unwrap(),
                &round_to(&split, dtype),
                atol,
                rtol,
                rtol as f64,
            );
            assert!(
                be.rope_split_heads(&xt, &ct, &st, heads + 1, &out).is_err(),
                "a head count that does not match out must be refused"
            );
        }
    }
}

/// The linear with x already in the weights' 16-bit type (no conversion pass) and with a 16-bit
/// output (cuBLASLt D of the weights' type, then our activation kernel on the rounded result):
/// the reference rounds where the device does (x and W to the type; the pre-activation to the
/// type when the output is 16-bit and there is an activation; the result to the type).
fn check_linear_16bit_activations(tag: u64, dtype: DType) {
    let c = device!();
    let mut rng = Rng::fresh(tag);
    let (tol, l2) = tolerance_of(dtype);
    let (uatol, urtol) = ulp_tol(dtype);
    for &(m, n, k) in &LINEAR_SHAPES {
        if k == 0 {
            continue;
        }
        let (x, w, b) = operands(&mut rng, m, n, k);
        let (xr, wr) = (round_to(&x, dtype), round_to(&w, dtype));
        let xt = upload(c, &xr, &[m, k], dtype);
        let wt = upload(c, &wr, &[n, k], dtype);
        let bt = up(c, &b, &[n]);
        for act in Activation::ALL {
            for bias in [false, true] {
                let bb = bias.then_some(b.as_slice());
                let what = format!("{dtype:?} x {m}x{n}x{k} {act:?} bias={bias}");
                // f32 out
                let want = rnn::linear::linear(&xr, &wr, bb, m, n, k, act);
                let out = poisoned(c, &[m, n], DType::F32);
                gemm::linear(c, &xt, &wt, bias.then_some(&bt), act, &out)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_close(
                    &format!("{what} -> f32"),
                    &read(c, &out),
                    &want,
                    tol,
                    tol,
                    l2,
                );
                // 16-bit out. Measured on the H200: with a 16-bit D, cuBLASLt's bias epilogue rounds
                // the product to D's type, adds the bias rounded to that type and rounds again
                // (errors up to an ulp of the product, not of the result; the reference's
                // autocast casts the bias to bf16 too). Model: round(act(round(round(x·Wᵀ) +
                // round(b)))), with a bound of a few ulps of |x·Wᵀ| + |b| as well as of the result.
                let b16 = round_to(&b, dtype);
                let acc = rnn::linear::linear(&xr, &wr, None, m, n, k, Activation::None);
                let acc16 = round_to(&acc, dtype);
                let pre: Vec<f32> = acc16
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| if bias { v + b16[i % n] } else { v })
                    .collect();
                let scale: Vec<f32> = acc
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| v.abs() + if bias { b16[i % n].abs() } else { 0.0 })
                    .collect();
                let want16: Vec<f32> = round_to(&pre, dtype)
                    .iter()
                    .map(|&v| rnn::linear::activate(v as f64, act) as f32)
                    .collect();
                let want16 = round_to(&want16, dtype);
                for fuse in [false, true] {
                    if fuse && act != Activation::GeluTanh {
                        continue;
                    }
                    let out = poisoned(c, &[m, n], dtype);
                    let fused =
                        gemm::linear_with(c, &xt, &wt, bias.then_some(&bt), act, &out, fuse)
                            .unwrap_or_else(|e| panic!("{what} -> 16-bit: {e}"));
                    // one ulp of the output, one of the rounded pre-activation, the GEMM's
                    // accumulation; a fused GELU rounds once (no inner rounding) and may differ
                    // from the tanh form by cuBLASLt's formula (see the epilogue test)
                    let extra = if fused { 1e-3 } else { 0.0 };
                    let got = read(c, &out);
                    let what16 = format!("{what} -> {dtype:?} (fused GELU: {fused})");
                    for (i, (&g, &w)) in got.iter().zip(&want16).enumerate() {
                        let bound = uatol + 2.0 * tol + extra + 2.0 * urtol * (w.abs() + scale[i]);
                        assert!(
                            !g.is_nan() && (g - w).abs() <= bound,
                            "{what16}: element {i}: got {g}, expected {w} (bound {bound})"
                        );
                    }
                    let e = rel_l2(&got, &want16);
                    assert!(e <= 4.0 * urtol as f64, "{what16}: relative L2 {e:e}");
                }
            }
        }
    }
}

#[test]
fn linear_bf16_activations() {
    check_linear_16bit_activations(0xe5, DType::BF16);
}

#[test]
fn linear_f16_activations() {
    check_linear_16bit_activations(0xe6, DType::F16);
}

/// Whether cuBLASLt's GELU epilogue computes the tanh form of GELU (the DiT's) or the erf form,
/// which differ by up to 4.7e-4 at |x| ≈ 2.7 (4.4e-4 at 2.5, 4.1e-4 at 3). The pre-activations
/// are exact (f32 weights: one weight of 1 per output, zero bias, a K-term sum with a single
/// non-zero product), so the output is cuBLASLt's GELU of known f32 inputs. Passes when the
/// epilogue matches the tanh form to 5e-5 over [−4, 4] (only then may the fast path fuse GELU
/// into cuBLASLt: flip `fuse_gelu` in `gemm::linear`); fails, printing both distances, when it is
/// the erf form or a tanh approximation coarser than that; passes with a note when cuBLASLt
/// offers no GELU_BIAS epilogue here.
#[test]
fn cublaslt_gelu_epilogue_is_the_tanh_form() {
    let c = device!();
    let (m, n, k) = (1024usize, 16usize, 16usize);
    let mut rng = Rng::fresh(0xe7);
    let mut x = rng.normals(m * k, 1.0);
    let pre: Vec<f32> = (0..m).map(|i| -4.0 + 8.0 * i as f32 / m as f32).collect();
    for i in 0..m {
        x[i * k] = pre[i];
    }
    let mut w = vec![0f32; n * k];
    for j in 0..n {
        w[j * k] = 1.0;
    }
    let b = vec![0f32; n];
    let xt = up(c, &x, &[m, k]);
    let wt = up(c, &w, &[n, k]);
    let bt = up(c, &b, &[n]);
    let out = poisoned(c, &[m, n], DType::F32);
    let fused = gemm::linear_with(c, &xt, &wt, Some(&bt), Activation::GeluTanh, &out, true)
        .expect("linear with a fused GELU");
    let got = read(c, &out);
    if !fused {
        eprintln!(
            "cuBLASLt offers no GELU_BIAS epilogue for this configuration: nothing to decide, \
             the fast path keeps our GELU kernel"
        );
        return;
    }
    let tanh = |v: f64| {
        0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
    };
    let erf = |v: f64| 0.5 * v * (1.0 + libm_erf(v / std::f64::consts::SQRT_2));
    let (mut dt, mut de) = (0f64, 0f64);
    for i in 0..m {
        let v = pre[i] as f64;
        for j in 0..n {
            let g = got[i * n + j] as f64;
            assert!(!g.is_nan(), "NaN at ({i}, {j})");
            dt = dt.max((g - tanh(v)).abs());
            de = de.max((g - erf(v)).abs());
        }
    }
    eprintln!(
        "cuBLASLt GELU epilogue: max |got − GELU_tanh| = {dt:.3e}, max |got − GELU_erf| = {de:.3e}"
    );
    assert!(
        dt < 5e-5,
        "cuBLASLt's GELU epilogue is not the tanh form to 5e-5 (max |got − tanh| {dt:.3e}, \
         |got − erf| {de:.3e}): keep GELU in our kernel"
    );
}

/// erf in f64 to ~1e-13 (Maclaurin series below 2.5, the continued fraction of erfc above):
/// plenty to separate the two GELU forms, 4.7e-4 apart (Abramowitz–Stegun 7.1.26, 1.5e-7, would
/// do too, but this one is checked against exact values in `erf_helper_is_accurate`).
fn libm_erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 2.5 {
        // Maclaurin series: erf(a) = 2/√π Σ (−1)ⁿ a^(2n+1) / (n! (2n+1))
        let mut term = a;
        let mut sum = a;
        let mut n = 0f64;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -a * a / n;
            sum += term / (2.0 * n + 1.0);
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // continued fraction of erfc (Lentz), converges fast for a ≥ 2.5
        let mut f = a;
        let (mut cc, mut d) = (a, 0f64);
        for i in 1..200 {
            let an = i as f64 / 2.0;
            d = a + an * d;
            d = 1.0 / d;
            cc = a + an / cc;
            let delta = cc * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
    };
    r.copysign(x)
}

#[test]
fn erf_helper_is_accurate() {
    // no device needed: the helper that separates the two GELU forms above
    for (x, want) in [
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (2.0, 0.995_322_265_018_952_7),
        (2.7, 0.999_865_667_260_059_4),
        (3.0, 0.999_977_909_503_001_4),
        (-1.9, -0.992_790_429_235_257_5),
    ] {
        assert!(
            (libm_erf(x) - want).abs() < 1e-12,
            "erf({x}) = {}",
            libm_erf(x)
        );
    }
}

/// The CUDA fast path with f16 weights (f16 GEMM-boundary activations) against the f32 golden.
#[test]
fn golden_wan_dit_fast_path_f16() {
    let c = device!();
    for (case, wcase) in dit_cases() {
        let (d, ck) = DitCase::load(&case, &wcase);
        let name = &d.name;
        let mut be = CudaBackend::new(c);
        let mut dit = Dit::load(&mut be, &ck, WeightPrecision::F16).unwrap();
        let out = dit
            .forward(&mut be, &d.input(), None, None)
            .unwrap_or_else(|e| panic!("{name}: f16 DiT forward on CUDA failed: {e}"));
        let (want, _) = d.f.f32("out_dense").unwrap();
        let e = rel_l2(&out, &want);
        eprintln!("{name}: CUDA f16 fast-path relative L2 {e:.3e}");
        check(
            &format!("{name}/out_dense (CUDA f16 fast path)"),
            &out,
            &want,
            (2e-2, 2e-2),
        );
        assert!(e < 1e-2, "{name}: CUDA f16 fast-path relative L2 {e}");
    }
}

/// A forward whose activations cannot fit the device is refused before anything is allocated,
/// with an error that names what it needs and what the device has.
#[test]
fn forward_too_large_for_the_device_is_refused() {
    let c = device!();
    let cfg = nabla::wan::pipeline::demo_dit_config();
    let mut be = CudaBackend::new(c);
    let mut dit = Dit::random(&mut be, &cfg, WeightPrecision::BF16, 7).unwrap();
    // 5.3 M tokens, 82 944 blocks: ~200 GB of activations and block maps
    let lat = (81usize, 512usize, 512usize);
    let need = dit.activation_bytes(lat, true);
    let (free, _) = c.memory().unwrap();
    assert!(
        need > free as u64,
        "the test shape must exceed the device ({need} bytes)"
    );
    let n = cfg.in_dim * lat.0 * lat.1 * lat.2;
    let latent = vec![0.0f32; n];
    let context = vec![0.0f32; cfg.text_len * cfg.text_dim];
    let input = DitInput {
        latent: &latent,
        shape: lat,
        t: 500.0,
        context: &context,
    };
    let algo: SparseAlgo = "nabla-0.7".parse().unwrap();
    match dit.forward(&mut be, &input, Some(&algo), None) {
        Err(Error::OutOfMemory {
            needed, available, ..
        }) => {
            assert_eq!(needed, need);
            assert!(available.is_some_and(|a| a < need));
        }
        other => panic!("expected OutOfMemory, got {:?}", other.map(|v| v.len())),
    }
    // the backend still works afterwards
    let t = be.upload(&[1.0, 2.0], &[2]).unwrap();
    assert_eq!(be.download(&t).unwrap(), vec![1.0, 2.0]);
}
