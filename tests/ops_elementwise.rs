//! Elementwise ops and head layout moves on the GPU against the CPU reference: fresh random
//! inputs, ragged sizes (scalar and vec4 variants), outputs poisoned with NaN first, the in-place
//! residual, extreme activation inputs, the 2-D grid, batching, and errors for bad shapes.

mod common;

use common::{POISON, Rng, assert_close, gpu, gpu_with_f16};
use nabla::ops::elementwise::{
    add, gated_residual, gelu_tanh, merge_heads, record_add, record_gated_residual,
    record_gelu_tanh, record_merge_heads, record_silu, record_split_heads, silu, split_heads,
};
use nabla::reference::nn::elementwise as reference;
use nabla::{DType, Error, Gpu, Tensor};

/// Row/width pairs: widths not a multiple of the workgroup (or of 4), and real DiT widths.
const SHAPES: [(usize, usize); 10] = [
    (1, 1),
    (1, 7),
    (3, 1),
    (3, 7),
    (3, 100),
    (129, 7),
    (129, 256),
    (3, 1536),
    (129, 1536),
    (2, 5120),
];

fn poisoned(g: &Gpu, shape: &[usize]) -> Tensor {
    let t = g.empty(shape, DType::F32).unwrap();
    g.fill_u32(&t, POISON);
    t
}

#[test]
fn add_matches_reference() {
    let g = gpu();
    let mut rng = Rng::fresh(0x21);
    for &(m, c) in &SHAPES {
        let a = rng.normals(m * c, 1.0);
        let b = rng.normals(m * c, 3.0);
        let (at, bt) = (
            g.upload_f32(&a, &[m, c]).unwrap(),
            g.upload_f32(&b, &[m, c]).unwrap(),
        );
        let out = poisoned(g, &[m, c]);
        let mut batch = g.batch();
        record_add(&mut batch, &at, &bt, &out).unwrap();
        batch.submit().unwrap();
        // one f32 rounding of an exact sum: bit-exact
        assert_close(
            &format!("add [{m}, {c}]"),
            &g.read_f32(&out).unwrap(),
            &reference::add(&a, &b),
            0.0,
            0.0,
            0.0,
        );
    }
    // convenience function, 3-D
    let a = rng.normals(2 * 3 * 5, 1.0);
    let b = rng.normals(2 * 3 * 5, 1.0);
    let at = g.upload_f32(&a, &[2, 3, 5]).unwrap();
    let bt = g.upload_f32(&b, &[2, 3, 5]).unwrap();
    let out = add(g, &at, &bt).unwrap();
    assert_eq!(out.shape(), &[2, 3, 5]);
    assert_close(
        "add [2, 3, 5]",
        &g.read_f32(&out).unwrap(),
        &reference::add(&a, &b),
        0.0,
        0.0,
        0.0,
    );
}

/// Normals rounded to multiples of 2⁻⁸: products of two such values (|v| < 2¹⁵) are exact in
/// f32, so `x + y·g` has one rounding on the GPU (fused or not) and in the reference.
fn coarse_normals(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    rng.normals(n, std)
        .iter()
        .map(|v| (v * 256.0).round() / 256.0)
        .collect()
}

#[test]
fn gated_residual_in_place() {
    let g = gpu();
    let mut rng = Rng::fresh(0x22);
    for &(m, c) in &SHAPES {
        let x = rng.normals(m * c, 1.0);
        let y = coarse_normals(&mut rng, m * c, 2.0);
        let table = coarse_normals(&mut rng, 6 * c, 0.5);
        let yt = g.upload_f32(&y, &[m, c]).unwrap();
        let tt = g.upload_f32(&table, &[6, c]).unwrap();
        for gate_row in [None, Some(0u32), Some(2), Some(5)] {
            let xt = g.upload_f32(&x, &[m, c]).unwrap();
            let mut batch = g.batch();
            record_gated_residual(&mut batch, &xt, &yt, gate_row.map(|r| (&tt, r))).unwrap();
            batch.submit().unwrap();
            let gate = gate_row.map(|r| &table[r as usize * c..(r as usize + 1) * c]);
            let want = reference::gated_residual(&x, &y, c, gate);
            // exact: y·g is representable, and x + y·g is rounded once on both sides
            assert_close(
                &format!("residual [{m}, {c}] gate {gate_row:?}"),
                &g.read_f32(&xt).unwrap(),
                &want,
                0.0,
                0.0,
                0.0,
            );
        }
    }
}

#[test]
fn residual_twice_in_one_batch_accumulates() {
    // x += y·m2 then x += y2 (no gate) in one pass: the second dispatch sees the first's write.
    let g = gpu();
    let mut rng = Rng::fresh(0x23);
    let (m, c) = (5, 1536);
    let x = rng.normals(m * c, 1.0);
    let y = rng.normals(m * c, 1.0);
    let y2 = rng.normals(m * c, 1.0);
    let modulation = rng.normals(6 * c, 0.1);
    let e0 = rng.normals(6 * c, 0.1);
    let xt = g.upload_f32(&x, &[m, c]).unwrap();
    let yt = g.upload_f32(&y, &[m, c]).unwrap();
    let y2t = g.upload_f32(&y2, &[m, c]).unwrap();
    let modt = g.upload_f32(&modulation, &[6, c]).unwrap();
    let e0t = g.upload_f32(&e0, &[6, c]).unwrap();
    let mt = poisoned(g, &[6, c]);
    let mut batch = g.batch();
    record_add(&mut batch, &modt, &e0t, &mt).unwrap();
    record_gated_residual(&mut batch, &xt, &yt, Some((&mt, 2))).unwrap();
    record_gated_residual(&mut batch, &xt, &y2t, None).unwrap();
    batch.submit().unwrap();
    let m_ref = reference::add(&modulation, &e0);
    let x1 = reference::gated_residual(&x, &y, c, Some(&m_ref[2 * c..3 * c]));
    let x2 = reference::gated_residual(&x1, &y2, c, None);
    assert_close(
        "x after two residuals",
        &g.read_f32(&xt).unwrap(),
        &x2,
        4e-6,
        2e-6,
        1e-6,
    );
    // convenience function
    gated_residual(g, &xt, &y2t, Some((&mt, 5))).unwrap();
    let x3 = reference::gated_residual(&x2, &y2, c, Some(&m_ref[5 * c..6 * c]));
    assert_close(
        "x after a third",
        &g.read_f32(&xt).unwrap(),
        &x3,
        6e-6,
        3e-6,
        1e-6,
    );
}

/// Random values plus the extremes an activation must survive without NaN.
fn activation_inputs(rng: &mut Rng, n: usize) -> Vec<f32> {
    let special = [
        0.0f32, -0.0, 1e-30, -1e-30, 0.5, -0.5, 3.0, -3.0, 10.0, -10.0, 15.0, -15.0, 20.0, -20.0,
        88.0, -88.0, 100.0, -100.0, 1e4, -1e4,
    ];
    let mut v = rng.normals(n, 3.0);
    for (i, s) in special.iter().enumerate() {
        if n > 0 {
            let j = (i * 7919) % n;
            v[j] = *s;
        }
    }
    v
}

#[test]
fn gelu_tanh_and_silu_match_reference() {
    let g = gpu();
    let mut rng = Rng::fresh(0x24);
    for &(m, c) in &SHAPES {
        let x = activation_inputs(&mut rng, m * c);
        let xt = g.upload_f32(&x, &[m, c]).unwrap();
        for (name, want) in [
            ("gelu_tanh", reference::gelu_tanh(&x)),
            ("silu", reference::silu(&x)),
        ] {
            let out = poisoned(g, &[m, c]);
            let mut batch = g.batch();
            if name == "silu" {
                record_silu(&mut batch, &xt, &out).unwrap();
            } else {
                record_gelu_tanh(&mut batch, &xt, &out).unwrap();
            }
            batch.submit().unwrap();
            assert_close(
                &format!("{name} [{m}, {c}]"),
                &g.read_f32(&out).unwrap(),
                &want,
                1e-6,
                1e-5,
                1e-6,
            );
        }
    }
}

#[test]
fn activations_of_extreme_inputs_are_finite() {
    let g = gpu();
    let x: Vec<f32> = vec![
        -3.0e38, -1e30, -1e10, -1e4, -100.0, -30.0, -15.0, -11.0, -10.0, 0.0, 10.0, 30.0, 1e4,
        1e10, 1e30, 3.0e38,
    ];
    let xt = g.upload_f32(&x, &[x.len()]).unwrap();
    for (name, got, want) in [
        (
            "gelu_tanh",
            g.read_f32(&gelu_tanh(g, &xt).unwrap()).unwrap(),
            reference::gelu_tanh(&x),
        ),
        (
            "silu",
            g.read_f32(&silu(g, &xt).unwrap()).unwrap(),
            reference::silu(&x),
        ),
    ] {
        for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
            assert!(a.is_finite(), "{name}({}) = {a}, expected {b}", x[i]);
            assert!(
                (a - b).abs() <= 1e-6 + 1e-5 * b.abs(),
                "{name}({}) = {a}, expected {b}",
                x[i]
            );
        }
        eprintln!("{name}: {got:?}");
    }
}

#[test]
fn split_and_merge_heads_match_reference() {
    let g = gpu();
    let mut rng = Rng::fresh(0x25);
    // (S, H, D): D = 1 and odd D take the scalar path, D % 4 == 0 the vec4 one
    for &(s, h, d) in &[
        (1, 1, 1),
        (3, 1, 7),
        (3, 5, 7),
        (129, 3, 1),
        (7, 2, 4),
        (3, 1, 6),
        (129, 3, 128),
        (129, 12, 64),
        (100, 40, 128),
    ] {
        let x = rng.normals(s * h * d, 1.0);
        let xt = g.upload_f32(&x, &[s, h * d]).unwrap();
        let heads = poisoned(g, &[h, s, d]);
        let mut batch = g.batch();
        record_split_heads(&mut batch, &xt, &heads).unwrap();
        batch.submit().unwrap();
        let want = reference::split_heads(&x, s, h, d);
        let got = g.read_f32(&heads).unwrap();
        assert_close(
            &format!("split S={s} H={h} D={d}"),
            &got,
            &want,
            0.0,
            0.0,
            0.0,
        );

        // merge back, from the 4-D attention layout into a 3-D [1, S, H·D]
        let heads4 = heads.reshape(&[1, h, s, d]).unwrap();
        let back = poisoned(g, &[1, s, h * d]);
        let mut batch = g.batch();
        record_merge_heads(&mut batch, &heads4, &back).unwrap();
        batch.submit().unwrap();
        let back = g.read_f32(&back).unwrap();
        assert_close(
            &format!("merge S={s} H={h} D={d}"),
            &back,
            &x,
            0.0,
            0.0,
            0.0,
        );

        // merge of fresh data against the reference, via the convenience function
        let y = rng.normals(s * h * d, 1.0);
        let yt = g.upload_f32(&y, &[h, s, d]).unwrap();
        let merged = merge_heads(g, &yt).unwrap();
        assert_eq!(merged.shape(), &[s, h * d]);
        let want = reference::merge_heads(&y, h, s, d);
        assert_close(
            &format!("merge fresh S={s} H={h} D={d}"),
            &g.read_f32(&merged).unwrap(),
            &want,
            0.0,
            0.0,
            0.0,
        );
        let split = split_heads(g, &xt, h).unwrap();
        assert_eq!(split.shape(), &[h, s, d]);
        assert_eq!(g.read_f32(&split).unwrap(), got, "split_heads convenience");
    }
}

#[test]
fn more_workgroups_than_one_grid_dimension() {
    // > max_workgroups_per_dim workgroups of 256: the 2-D grid must cover every element.
    let g = gpu();
    let mut rng = Rng::fresh(0x26);
    let n = 256 * g.caps().max_workgroups_per_dim as usize + 301; // odd: scalar path
    let x = rng.normals(n, 2.0);
    let xt = g.upload_f32(&x, &[n]).unwrap();
    let out = poisoned(g, &[n]);
    let mut batch = g.batch();
    record_silu(&mut batch, &xt, &out).unwrap();
    batch.submit().unwrap();
    assert_close(
        &format!("silu [{n}]"),
        &g.read_f32(&out).unwrap(),
        &reference::silu(&x),
        1e-6,
        1e-5,
        1e-6,
    );
    // split with D = 1 (scalar): S·H elements
    drop((xt, out));
    let (s, h) = (n / 3, 3);
    let x3 = &x[..s * h];
    let xs = g.upload_f32(x3, &[s, h]).unwrap();
    let heads = poisoned(g, &[h, s, 1]);
    let mut batch = g.batch();
    record_split_heads(&mut batch, &xs, &heads).unwrap();
    batch.submit().unwrap();
    assert_close(
        &format!("split S={s} H={h} D=1"),
        &g.read_f32(&heads).unwrap(),
        &reference::split_heads(x3, s, h, 1),
        0.0,
        0.0,
        0.0,
    );
}

/// Unwraps the error, checks it is a shape error whose message has every needle, and that
/// nothing invalid reached the GPU.
#[track_caller]
fn expect_shape_err<T: std::fmt::Debug>(what: &str, r: nabla::Result<T>, needles: &[&str]) {
    let e = match r {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
        Err(e) => e,
    };
    assert!(
        matches!(e, Error::Shape(_)),
        "{what}: unexpected error kind {e:?}"
    );
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "{what}: message {msg:?} lacks {n:?}");
    }
    if let Err(ge) = gpu().check() {
        panic!("{what}: a GPU error was raised although the input was rejected: {ge}");
    }
    eprintln!("{what}: {msg}");
}

fn zeros(g: &Gpu, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    g.upload_f32(&vec![0.0; n], shape).unwrap()
}

#[test]
fn bad_shapes_are_errors() {
    let g = gpu();
    let a = zeros(g, &[3, 8]);
    let rec = |f: &dyn Fn(&mut nabla::Batch<'_>) -> nabla::Result<()>| {
        let mut b = g.batch();
        f(&mut b)
    };
    expect_shape_err(
        "add b",
        add(g, &a, &zeros(g, &[3, 7])),
        &["a [3, 8]", "b [3, 7]"],
    );
    expect_shape_err(
        "add out",
        rec(&|b| record_add(b, &a, &a, &zeros(g, &[8, 3]))),
        &["out [8, 3]", "same shape"],
    );
    expect_shape_err(
        "add aliasing",
        rec(&|b| record_add(b, &a, &zeros(g, &[3, 8]), &a)),
        &["share one GPU buffer"],
    );
    let f16 = g.upload_f16(&[0.0; 24], &[3, 8]).unwrap();
    expect_shape_err("add f16", add(g, &f16, &a), &["must be f32", "F16"]);
    expect_shape_err(
        "gelu out",
        rec(&|b| record_gelu_tanh(b, &a, &zeros(g, &[24]))),
        &["out [24]", "x [3, 8]"],
    );
    expect_shape_err(
        "silu in place",
        rec(&|b| record_silu(b, &a, &a)),
        &["share one GPU buffer"],
    );
    expect_shape_err(
        "residual y",
        gated_residual(g, &a, &zeros(g, &[3, 9]), None),
        &["y [3, 9]", "x [3, 8]"],
    );
    expect_shape_err(
        "residual x = y",
        gated_residual(g, &a, &a, None),
        &["share one GPU buffer"],
    );
    let y = zeros(g, &[3, 8]);
    let table = zeros(g, &[6, 8]);
    expect_shape_err(
        "residual gate width",
        gated_residual(g, &a, &y, Some((&zeros(g, &[6, 7]), 0))),
        &["gate [6, 7]", "[R, 8]", "x [3, 8]"],
    );
    expect_shape_err(
        "residual gate row",
        gated_residual(g, &a, &y, Some((&table, 6))),
        &["gate row 6", "[6, 8]"],
    );
    expect_shape_err(
        "residual scalar",
        gated_residual(g, &zeros(g, &[]), &zeros(g, &[]), None),
        &["at least one axis"],
    );
    expect_shape_err(
        "split out",
        rec(&|b| record_split_heads(b, &zeros(g, &[5, 24]), &zeros(g, &[3, 5, 7]))),
        &["x [5, 24]", "[5, 21]", "out [3, 5, 7]"],
    );
    expect_shape_err(
        "split rank",
        rec(&|b| record_split_heads(b, &zeros(g, &[5, 24]), &zeros(g, &[15, 8]))),
        &["out must be [H, S, D]", "[15, 8]"],
    );
    expect_shape_err(
        "split heads count",
        split_heads(g, &zeros(g, &[5, 24]), 5),
        &["24", "5 heads"],
    );
    expect_shape_err(
        "merge out",
        rec(&|b| record_merge_heads(b, &zeros(g, &[3, 5, 8]), &zeros(g, &[5, 25]))),
        &["out [5, 25]", "[5, 24]", "x [3, 5, 8]"],
    );
    expect_shape_err(
        "merge batch 2",
        merge_heads(g, &zeros(g, &[2, 3, 5, 8])),
        &["x must be [H, S, D] or [1, H, S, D]", "[2, 3, 5, 8]"],
    );
}

/// `b` as one row broadcast over the rows of `a` (the head's `head.modulation + e`).
#[test]
fn add_broadcasts_one_row() {
    let g = gpu();
    let mut rng = Rng::fresh(0xadd);
    for (r, c) in [(2usize, 256usize), (3, 7), (5, 1)] {
        let a = rng.normals(r * c, 1.0);
        let b = rng.normals(c, 1.0);
        let at = g.upload_f32(&a, &[r, c]).unwrap();
        let bt = g.upload_f32(&b, &[1, c]).unwrap();
        let out = g.empty(&[r, c], nabla::DType::F32).unwrap();
        g.fill_u32(&out, common::POISON);
        let mut batch = g.batch();
        nabla::ops::elementwise::record_add(&mut batch, &at, &bt, &out).unwrap();
        batch.submit().unwrap();
        let want: Vec<f32> = a.iter().enumerate().map(|(i, x)| x + b[i % c]).collect();
        assert_eq!(g.read_f32(&out).unwrap(), want, "broadcast add {r}x{c}");
    }
    // a row of the wrong width is refused
    let at = g.upload_f32(&[0.0; 6], &[2, 3]).unwrap();
    let bt = g.upload_f32(&[0.0; 2], &[1, 2]).unwrap();
    assert!(nabla::ops::elementwise::add(g, &at, &bt).is_err());
}

/// Split into f16 heads (rounded) and merge back from f16: the fast path's attention operands.
#[test]
fn heads_in_f16_round_trip() {
    let Some(g) = gpu_with_f16("f16 heads") else {
        return;
    };
    let mut rng = Rng::fresh(0x4ead);
    for (s, h, d) in [(70usize, 3usize, 128usize), (5, 2, 6)] {
        let x = rng.normals(s * h * d, 1.0);
        let xt = g.upload_f32(&x, &[s, h * d]).unwrap();
        let heads = g.empty(&[1, h, s, d], DType::F16).unwrap();
        let back = g.empty(&[s, h * d], DType::F32).unwrap();
        g.fill_u32(&back, POISON);
        let mut b = g.batch();
        nabla::ops::elementwise::record_split_heads(&mut b, &xt, &heads).unwrap();
        nabla::ops::elementwise::record_merge_heads(&mut b, &heads, &back).unwrap();
        b.submit().unwrap();
        let want_heads: Vec<f32> = reference::split_heads(&x, s, h, d)
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        assert_eq!(
            g.read_f32(&heads).unwrap(),
            want_heads,
            "split to f16 {s}x{h}x{d}"
        );
        let want_back: Vec<f32> = x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        assert_eq!(
            g.read_f32(&back).unwrap(),
            want_back,
            "merge from f16 {s}x{h}x{d}"
        );
    }
}

/// Merge of heads into f16 tokens (the merged attention output, which only feeds a GEMM that
/// reads f16): from f16 heads (a copy) and from f32 heads (rounded to nearest even), scalar and
/// vec4 widths, odd sizes, output poisoned with f16 NaNs; the reference's merge rounded to f16,
/// bit for bit.
#[test]
fn merge_heads_into_f16_tokens() {
    let Some(g) = gpu_with_f16("f16 tokens") else {
        return;
    };
    let mut rng = Rng::fresh(0x4eae);
    let r16 =
        |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect() };
    for (s, h, d) in [
        (1usize, 1usize, 1usize),
        (3, 5, 7),
        (129, 3, 1),
        (7, 2, 4),
        (3, 1, 6),
        (70, 3, 128),
        (129, 12, 64),
    ] {
        let y = rng.normals(h * s * d, 1.0);
        let want = r16(&reference::merge_heads(&y, h, s, d));
        for heads_dt in [DType::F32, DType::F16] {
            let heads = match heads_dt {
                DType::F16 => g.upload_f16(&y, &[1, h, s, d]),
                _ => g.upload_f32(&y, &[1, h, s, d]),
            }
            .unwrap();
            let out = g.empty(&[s, h * d], DType::F16).unwrap();
            g.fill_u32(&out, 0x7e00_7e00);
            let mut b = g.batch();
            record_merge_heads(&mut b, &heads, &out).unwrap();
            b.submit().unwrap();
            let got = g.read_f32(&out).unwrap();
            assert!(got.iter().all(|v| !v.is_nan()), "unwritten element");
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "merge {heads_dt:?} heads into f16 tokens S={s} H={h} D={d}"
            );
        }
    }
    // split still takes f32 tokens only
    let xh = g.upload_f16(&[0.0; 8], &[2, 4]).unwrap();
    let heads = g.empty(&[2, 2, 2], DType::F16).unwrap();
    let mut b = g.batch();
    let r = record_split_heads(&mut b, &xh, &heads);
    assert!(
        matches!(&r, Err(Error::Shape(m)) if m.contains("must be f32")),
        "split of f16 tokens: {r:?}"
    );
    b.submit().unwrap();
}
