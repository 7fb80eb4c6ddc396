//! LayerNorm (plain, affine, modulated) and RMSNorm on the GPU against the f64 CPU reference:
//! fresh random inputs, ragged sizes, outputs poisoned with NaN first; constant rows, large
//! magnitudes, the 2-D row grid, batching, a LayerNorm's f16 output, and errors for bad shapes.

mod common;

use common::{POISON, Rng, assert_close, gpu, gpu_with_f16};
use nabla::ops::norm::{NormMode, layer_norm, record_layer_norm, record_rms_norm, rms_norm};
use nabla::reference::nn::norm as reference;
use nabla::{Error, Gpu, Tensor};

const EPS: f32 = 1e-6;
const COLS: [usize; 6] = [1, 7, 100, 256, 1536, 1000];
const ROWS: [usize; 3] = [1, 3, 129];

/// A fresh f32 output poisoned with NaN.
fn poisoned(g: &Gpu, shape: &[usize]) -> Tensor {
    let t = g.empty(shape, nabla::DType::F32).unwrap();
    g.fill_u32(&t, POISON);
    t
}

/// Runs one LayerNorm through `record_layer_norm` into a poisoned output and reads it back.
fn run_ln(g: &Gpu, x: &Tensor, mode: &NormMode<'_>) -> Vec<f32> {
    let out = poisoned(g, x.shape());
    let mut b = g.batch();
    record_layer_norm(&mut b, x, &out, EPS, mode).unwrap();
    b.submit().unwrap();
    g.read_f32(&out).unwrap()
}

fn run_rms(g: &Gpu, x: &Tensor, w: &Tensor) -> Vec<f32> {
    let out = poisoned(g, x.shape());
    let mut b = g.batch();
    record_rms_norm(&mut b, x, w, &out, EPS).unwrap();
    b.submit().unwrap();
    g.read_f32(&out).unwrap()
}

/// Relative L2 bound of every comparison (f32 math gives ~1e-7).
const L2: f64 = 1e-6;

/// Checks all three LayerNorm modes and RMSNorm on `x` `[m, c]` (elementwise bound
/// `tol + tol·|want|`).
fn check_all_modes(what: &str, rng: &mut Rng, x: &[f32], m: usize, c: usize, tol: f32) {
    check_all_modes_on(gpu(), what, rng, x, m, c, tol);
}

/// [`check_all_modes`] on the device `g`.
fn check_all_modes_on(g: &Gpu, what: &str, rng: &mut Rng, x: &[f32], m: usize, c: usize, tol: f32) {
    let xt = g.upload_f32(x, &[m, c]).unwrap();
    let eps = EPS as f64;

    let got = run_ln(g, &xt, &NormMode::Plain);
    let want = reference::layer_norm(x, c, eps);
    assert_close(&format!("{what} plain"), &got, &want, tol, tol, L2);

    let w = rng.normals(c, 1.0);
    let bias = rng.normals(c, 1.0);
    let (wt, bt) = (
        g.upload_f32(&w, &[c]).unwrap(),
        g.upload_f32(&bias, &[c]).unwrap(),
    );
    let got = run_ln(
        g,
        &xt,
        &NormMode::Affine {
            weight: &wt,
            bias: &bt,
        },
    );
    let want = reference::layer_norm_affine(x, c, eps, &w, &bias);
    assert_close(&format!("{what} affine"), &got, &want, tol, tol, L2);

    let mods = rng.normals(6 * c, 0.5);
    let mt = g.upload_f32(&mods, &[6, c]).unwrap();
    for (shift, scale) in [(0, 1), (3, 4), (5, 2)] {
        let got = run_ln(
            g,
            &xt,
            &NormMode::Modulate {
                mods: &mt,
                shift_row: shift,
                scale_row: scale,
            },
        );
        let want = reference::layer_norm_modulate(x, c, eps, &mods, shift as usize, scale as usize);
        assert_close(
            &format!("{what} modulate({shift},{scale})"),
            &got,
            &want,
            tol,
            tol,
            L2,
        );
    }

    let got = run_rms(g, &xt, &wt);
    let want = reference::rms_norm(x, c, &w, eps);
    assert_close(&format!("{what} rms"), &got, &want, tol, tol, L2);
}

#[test]
fn all_modes_ragged_sizes() {
    let mut rng = Rng::fresh(0x11);
    for &m in &ROWS {
        for &c in &COLS {
            let x = rng.normals(m * c, 2.0);
            check_all_modes(&format!("[{m}, {c}]"), &mut rng, &x, m, c, 2e-5);
        }
    }
}

/// The row-in-registers kernel (C % 4 == 0 and C <= 8192) at its edges: one vec4 per row,
/// exactly 8192 columns, 8196 (past it: the scalar kernel), a DiT width; with subgroup
/// reductions where the adapter has them, and on a second device opened without subgroups
/// (the workgroup-tree reductions).
#[test]
fn row_in_registers_edges_with_and_without_subgroups() {
    let mut rng = Rng::fresh(0x18);
    let g = gpu();
    let no_sg = Gpu::new_without(wgpu::Features::SUBGROUP).unwrap();
    assert!(!no_sg.caps().subgroups);
    for (m, c) in [
        (3usize, 4usize),
        (2, 8192),
        (2, 8196),
        (129, 5120),
        (5, 1000),
    ] {
        let x = rng.normals(m * c, 2.0);
        check_all_modes_on(g, &format!("[{m}, {c}]"), &mut rng, &x, m, c, 2e-5);
        let what = format!("[{m}, {c}] without subgroups");
        check_all_modes_on(&no_sg, &what, &mut rng, &x, m, c, 2e-5);
    }
}

#[test]
fn offset_rows_and_large_magnitudes() {
    let mut rng = Rng::fresh(0x12);
    for &(m, c) in &[(3, 7), (129, 100), (3, 1536), (1, 5120)] {
        // wide spread, |x| ~ 1e4
        let x = rng.normals(m * c, 1e4);
        check_all_modes(&format!("[{m}, {c}] std 1e4"), &mut rng, &x, m, c, 2e-5);
        // large offset, small spread: where a one-pass E[x²] − E[x]² would cancel
        let off = 1e4 * (1.0 + rng.uniform() as f32);
        let x: Vec<f32> = rng.normals(m * c, 1.0).iter().map(|v| v + off).collect();
        check_all_modes(
            &format!("[{m}, {c}] 1e4 + N(0,1)"),
            &mut rng,
            &x,
            m,
            c,
            2e-5,
        );
    }
}

#[test]
fn constant_rows_normalize_to_exactly_zero() {
    let g = gpu();
    let mut rng = Rng::fresh(0x13);
    for &c in &[1usize, 7, 100, 1536] {
        // each row constant (its own value), including 0, a fraction and a large value
        let vals = [0.0f32, 0.1, -3.7, 12345.678, rng.normal() * 100.0];
        let m = vals.len();
        let x: Vec<f32> = vals.iter().flat_map(|&v| vec![v; c]).collect();
        let xt = g.upload_f32(&x, &[m, c]).unwrap();

        let got = run_ln(g, &xt, &NormMode::Plain);
        assert!(
            got.iter().all(|&v| v == 0.0),
            "c={c}: constant rows must give exactly 0, got {:?}",
            &got[..got.len().min(16)]
        );

        let mods = rng.normals(6 * c, 0.5);
        let mt = g.upload_f32(&mods, &[6, c]).unwrap();
        let got = run_ln(
            g,
            &xt,
            &NormMode::Modulate {
                mods: &mt,
                shift_row: 3,
                scale_row: 4,
            },
        );
        for r in 0..m {
            assert_eq!(
                &got[r * c..(r + 1) * c],
                &mods[3 * c..4 * c],
                "c={c} row {r}: a constant row must give exactly the shift row"
            );
        }

        let w = rng.normals(c, 1.0);
        let bias = rng.normals(c, 1.0);
        let (wt, bt) = (
            g.upload_f32(&w, &[c]).unwrap(),
            g.upload_f32(&bias, &[c]).unwrap(),
        );
        let got = run_ln(
            g,
            &xt,
            &NormMode::Affine {
                weight: &wt,
                bias: &bt,
            },
        );
        for r in 0..m {
            assert_eq!(
                &got[r * c..(r + 1) * c],
                &bias[..],
                "c={c} row {r}: a constant row must give exactly the bias"
            );
        }

        // RMSNorm of a constant row v: v/√(v² + eps)·w, and exactly 0 for v = 0
        let got = run_rms(g, &xt, &wt);
        let want = reference::rms_norm(&x, c, &w, EPS as f64);
        assert_close(&format!("rms constant c={c}"), &got, &want, 1e-5, 1e-5, L2);
        assert!(got[..c].iter().all(|&v| v == 0.0), "rms of a zero row");
    }
}

#[test]
fn many_rows_use_the_2d_grid() {
    let g = gpu();
    let mut rng = Rng::fresh(0x14);
    let m = g.caps().max_workgroups_per_dim as usize + 1234;
    let c = 7;
    let x = rng.normals(m * c, 1.0);
    let xt = g.upload_f32(&x, &[m, c]).unwrap();
    let mods = rng.normals(2 * c, 0.5);
    let mt = g.upload_f32(&mods, &[2, c]).unwrap();
    let got = run_ln(
        g,
        &xt,
        &NormMode::Modulate {
            mods: &mt,
            shift_row: 0,
            scale_row: 1,
        },
    );
    let want = reference::layer_norm_modulate(&x, c, EPS as f64, &mods, 0, 1);
    assert_close(&format!("[{m}, {c}] modulate"), &got, &want, 2e-5, 2e-5, L2);
    let w = rng.normals(c, 1.0);
    let wt = g.upload_f32(&w, &[c]).unwrap();
    let got = run_rms(g, &xt, &wt);
    let want = reference::rms_norm(&x, c, &w, EPS as f64);
    assert_close(&format!("[{m}, {c}] rms"), &got, &want, 2e-5, 2e-5, L2);
}

#[test]
fn higher_rank_and_convenience_functions() {
    let g = gpu();
    let mut rng = Rng::fresh(0x15);
    let (b, s, c) = (2, 5, 300);
    let x = rng.normals(b * s * c, 1.5);
    let xt = g.upload_f32(&x, &[b, s, c]).unwrap();
    let got = g
        .read_f32(&layer_norm(g, &xt, EPS, &NormMode::Plain).unwrap())
        .unwrap();
    assert_close(
        "[2, 5, 300] plain",
        &got,
        &reference::layer_norm(&x, c, EPS as f64),
        2e-5,
        2e-5,
        2e-5,
    );
    let w = rng.normals(c, 1.0);
    let wt = g.upload_f32(&w, &[c]).unwrap();
    let got = g.read_f32(&rms_norm(g, &xt, &wt, EPS).unwrap()).unwrap();
    assert_close(
        "[2, 5, 300] rms",
        &got,
        &reference::rms_norm(&x, c, &w, EPS as f64),
        2e-5,
        2e-5,
        2e-5,
    );
}

#[test]
fn several_norms_in_one_batch() {
    // norm → modulate, then RMS of the result, in one compute pass: later dispatches see
    // earlier outputs.
    let g = gpu();
    let mut rng = Rng::fresh(0x16);
    let (m, c) = (33, 1536);
    let x = rng.normals(m * c, 1.0);
    let mods = rng.normals(6 * c, 0.3);
    let w = rng.normals(c, 1.0);
    let xt = g.upload_f32(&x, &[m, c]).unwrap();
    let mt = g.upload_f32(&mods, &[6, c]).unwrap();
    let wt = g.upload_f32(&w, &[c]).unwrap();
    let a = poisoned(g, &[m, c]);
    let q = poisoned(g, &[m, c]);
    let mut b = g.batch();
    record_layer_norm(
        &mut b,
        &xt,
        &a,
        EPS,
        &NormMode::Modulate {
            mods: &mt,
            shift_row: 0,
            scale_row: 1,
        },
    )
    .unwrap();
    record_rms_norm(&mut b, &a, &wt, &q, EPS).unwrap();
    b.submit().unwrap();
    let a_ref = reference::layer_norm_modulate(&x, c, EPS as f64, &mods, 0, 1);
    let q_ref = reference::rms_norm(&a_ref, c, &w, EPS as f64);
    assert_close("batch a", &g.read_f32(&a).unwrap(), &a_ref, 2e-5, 2e-5, L2);
    assert_close("batch q", &g.read_f32(&q).unwrap(), &q_ref, 5e-5, 5e-5, L2);
}

/// Unwraps the error, checks its kind and that the message has every needle, and that nothing
/// invalid reached the GPU.
#[track_caller]
fn expect_err<T: std::fmt::Debug>(
    what: &str,
    r: nabla::Result<T>,
    is_kind: fn(&Error) -> bool,
    needles: &[&str],
) {
    let e = match r {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
        Err(e) => e,
    };
    assert!(is_kind(&e), "{what}: unexpected error kind {e:?}");
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "{what}: message {msg:?} lacks {n:?}");
    }
    if let Err(ge) = gpu().check() {
        panic!("{what}: a GPU error was raised although the input was rejected: {ge}");
    }
    eprintln!("{what}: {msg}");
}

fn shape(e: &Error) -> bool {
    matches!(e, Error::Shape(_))
}

fn invalid(e: &Error) -> bool {
    matches!(e, Error::Invalid(_))
}

fn zeros(g: &Gpu, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    g.upload_f32(&vec![0.0; n], shape).unwrap()
}

#[test]
fn bad_shapes_are_errors() {
    let g = gpu();
    let x = zeros(g, &[3, 8]);
    let ln = |x: &Tensor, out: &Tensor, eps: f32, mode: &NormMode<'_>| {
        let mut b = g.batch();
        record_layer_norm(&mut b, x, out, eps, mode)
    };
    expect_err(
        "out shape",
        ln(&x, &zeros(g, &[3, 7]), EPS, &NormMode::Plain),
        shape,
        &["out [3, 7]", "x [3, 8]"],
    );
    expect_err(
        "C = 0",
        ln(
            &zeros(g, &[3, 0]),
            &zeros(g, &[3, 0]),
            EPS,
            &NormMode::Plain,
        ),
        shape,
        &["C > 0", "[3, 0]"],
    );
    expect_err(
        "scalar x",
        ln(&zeros(g, &[]), &zeros(g, &[]), EPS, &NormMode::Plain),
        shape,
        &["[M, C]", "[]"],
    );
    expect_err(
        "in place",
        ln(&x, &x, EPS, &NormMode::Plain),
        shape,
        &["share one GPU buffer"],
    );
    expect_err(
        "eps NaN",
        ln(&x, &zeros(g, &[3, 8]), f32::NAN, &NormMode::Plain),
        invalid,
        &["eps"],
    );
    let f16 = g.upload_f16(&[0.0; 24], &[3, 8]).unwrap();
    expect_err(
        "f16 x",
        ln(&f16, &zeros(g, &[3, 8]), EPS, &NormMode::Plain),
        shape,
        &["must be f32", "F16"],
    );
    let (w8, w7) = (zeros(g, &[8]), zeros(g, &[7]));
    expect_err(
        "affine weight",
        ln(
            &x,
            &zeros(g, &[3, 8]),
            EPS,
            &NormMode::Affine {
                weight: &w7,
                bias: &w8,
            },
        ),
        shape,
        &["weight [7]", "[8]", "x [3, 8]"],
    );
    expect_err(
        "affine bias",
        ln(
            &x,
            &zeros(g, &[3, 8]),
            EPS,
            &NormMode::Affine {
                weight: &w8,
                bias: &zeros(g, &[1, 8]),
            },
        ),
        shape,
        &["bias [1, 8]", "[8]"],
    );
    let mods = zeros(g, &[6, 8]);
    expect_err(
        "mods width",
        ln(
            &x,
            &zeros(g, &[3, 8]),
            EPS,
            &NormMode::Modulate {
                mods: &zeros(g, &[6, 7]),
                shift_row: 0,
                scale_row: 1,
            },
        ),
        shape,
        &["mods [6, 7]", "[R, 8]", "x [3, 8]"],
    );
    expect_err(
        "mods row",
        ln(
            &x,
            &zeros(g, &[3, 8]),
            EPS,
            &NormMode::Modulate {
                mods: &mods,
                shift_row: 0,
                scale_row: 6,
            },
        ),
        shape,
        &["scale_row 6", "[6, 8]"],
    );
    expect_err(
        "rms weight",
        rms_norm(g, &x, &w7, EPS),
        shape,
        &["weight [7]", "[8]", "x [3, 8]"],
    );
    expect_err(
        "rms out",
        {
            let mut b = g.batch();
            record_rms_norm(&mut b, &x, &w8, &zeros(g, &[8, 3]), EPS)
        },
        shape,
        &["out [8, 3]", "x [3, 8]"],
    );
    let h38 = g.empty(&[3, 8], nabla::DType::F16).unwrap();
    expect_err(
        "rms f16 out",
        {
            let mut b = g.batch();
            record_rms_norm(&mut b, &x, &w8, &h38, EPS)
        },
        shape,
        &["rms_norm: out must be f32", "F16"],
    );
    expect_err(
        "bf16 out",
        ln(
            &x,
            &g.empty(&[3, 8], nabla::DType::BF16).unwrap(),
            EPS,
            &NormMode::Plain,
        ),
        shape,
        &["out must be f32", "BF16"],
    );
    expect_err(
        "layer_norm convenience",
        layer_norm(
            g,
            &x,
            EPS,
            &NormMode::Modulate {
                mods: &mods,
                shift_row: 9,
                scale_row: 1,
            },
        ),
        shape,
        &["shift_row 9"],
    );
}

/// Two f16 NaNs per 32-bit word: poisons every element of an f16 output.
const POISON16: u32 = 0x7e00_7e00;

/// A LayerNorm with an f16 output (the DiT's norm outputs that only feed 16-bit GEMMs): every
/// mode, ragged sizes, poisoned output. It must be the f32 kernel's result rounded once to f16
/// (bit for bit: lavapipe and NVIDIA convert f32 → f16 to nearest even), hence within half an
/// f16 step (2⁻¹¹ relative) of the f64 reference.
#[test]
fn layer_norm_f16_output() {
    let Some(g) = gpu_with_f16("f16 output") else {
        return;
    };
    let mut rng = Rng::fresh(0x17);
    let eps = EPS as f64;
    let r16 =
        |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect() };
    for &m in &ROWS {
        for &c in &COLS {
            let x = rng.normals(m * c, 2.0);
            let xt = g.upload_f32(&x, &[m, c]).unwrap();
            let (w, bias, mods) = (
                rng.normals(c, 1.0),
                rng.normals(c, 1.0),
                rng.normals(6 * c, 0.5),
            );
            let wt = g.upload_f32(&w, &[c]).unwrap();
            let bt = g.upload_f32(&bias, &[c]).unwrap();
            let mt = g.upload_f32(&mods, &[6, c]).unwrap();
            let cases = [
                ("plain", NormMode::Plain, reference::layer_norm(&x, c, eps)),
                (
                    "affine",
                    NormMode::Affine {
                        weight: &wt,
                        bias: &bt,
                    },
                    reference::layer_norm_affine(&x, c, eps, &w, &bias),
                ),
                (
                    "modulate(3,4)",
                    NormMode::Modulate {
                        mods: &mt,
                        shift_row: 3,
                        scale_row: 4,
                    },
                    reference::layer_norm_modulate(&x, c, eps, &mods, 3, 4),
                ),
            ];
            for (name, mode, want) in cases {
                let what = format!("[{m}, {c}] {name} f16 out");
                let out = g.empty(&[m, c], nabla::DType::F16).unwrap();
                g.fill_u32(&out, POISON16);
                let mut b = g.batch();
                record_layer_norm(&mut b, &xt, &out, EPS, &mode).unwrap();
                b.submit().unwrap();
                let got = g.read_f32(&out).unwrap();
                let full = run_ln(g, &xt, &mode);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&r16(&full)),
                    "{what}: not the f32 result rounded once"
                );
                assert_close(&what, &got, &want, 2e-5, 2e-5 + 4.9e-4, 5e-4);
            }
        }
    }
}
