//! RoPE tables and kernel, and the sinusoidal timestep embedding, against the CPU reference on
//! fresh random inputs.

mod common;

use common::{Rng, assert_close, gpu};
use nabla::ops::rope::{
    freq_table, pair_split, record_rope, rope, rope_tables, sinusoidal_embedding,
    upload_rope_tables,
};
use nabla::reference::nn::rope as reference_rope;
use nabla::{DType, Error, reference};

/// Grids in natural order: several are not multiples of 8 (and not of 256 tokens).
const NATURAL_GRIDS: [(usize, usize, usize); 5] =
    [(1, 1, 1), (2, 3, 5), (3, 7, 9), (1, 12, 10), (4, 5, 13)];
/// Grids in fractal order (H, W multiples of 8).
const FRACTAL_GRIDS: [(usize, usize, usize); 3] = [(1, 8, 8), (2, 8, 16), (3, 16, 8)];

fn natural_tables_vs_spec(grid: (usize, usize, usize), d: usize) {
    let (cos, sin) = rope_tables(grid, d, false);
    let angles = reference_rope::rope_angles(grid, d);
    let want_c: Vec<f32> = angles.iter().map(|a| a.cos() as f32).collect();
    let want_s: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
    // the two f64 formulas of ω differ in the last bits: at most one f32 ulp apart
    assert_close(
        &format!("cos {grid:?} d{d}"),
        &cos,
        &want_c,
        1.2e-7,
        0.0,
        1e-7,
    );
    assert_close(
        &format!("sin {grid:?} d{d}"),
        &sin,
        &want_s,
        1.2e-7,
        0.0,
        1e-7,
    );
}

#[test]
fn pair_split_matches_the_spec() {
    assert_eq!(pair_split(128), [22, 21, 21]);
    assert_eq!(pair_split(64), [12, 10, 10]);
    for d in (2..=256).step_by(2) {
        let s = pair_split(d);
        assert_eq!(s.iter().sum::<usize>(), d / 2, "d {d}");
        // rotary dims of the three tables: d − 4⌊d/6⌋, 2⌊d/6⌋, 2⌊d/6⌋
        assert_eq!(2 * s[0], d - 4 * (d / 6), "d {d}");
        assert_eq!(2 * s[1], 2 * (d / 6), "d {d}");
    }
}

#[test]
fn freq_table_reference_values() {
    // spec §2.6: ω of frame pair 1 and 21, of row/column pair k = 1 and 20 (head_dim 128)
    let (c, s) = freq_table(2, 128);
    for (col, w) in [
        (1, 0.657933224657568f64),
        (21, 1.519911082952933e-4),
        (23, 0.6449466771037624),
        (42, 1.5505157798326253e-4),
        (44, 0.6449466771037624),
        (63, 1.5505157798326253e-4),
    ] {
        assert_eq!(c[64 + col], w.cos() as f32, "cos column {col}");
        assert_eq!(s[64 + col], w.sin() as f32, "sin column {col}");
    }
    // position 0: no rotation
    assert!(c[..64].iter().all(|&v| v == 1.0) && s[..64].iter().all(|&v| v == 0.0));
}

#[test]
fn tables_match_the_spec_formula() {
    for d in [128, 64] {
        for grid in NATURAL_GRIDS.iter().chain(&FRACTAL_GRIDS) {
            natural_tables_vs_spec(*grid, d);
        }
    }
}

#[test]
fn fractal_tables_are_the_natural_ones_permuted() {
    for d in [128, 64] {
        for &(f, h, w) in &FRACTAL_GRIDS {
            let (cn, sn) = rope_tables((f, h, w), d, false);
            let (cf, sf) = rope_tables((f, h, w), d, true);
            let half = d / 2;
            for (j, &n) in reference::fractal_perm(f, h, w).iter().enumerate() {
                assert_eq!(cf[j * half..(j + 1) * half], cn[n * half..(n + 1) * half]);
                assert_eq!(sf[j * half..(j + 1) * half], sn[n * half..(n + 1) * half]);
            }
        }
    }
}

#[test]
fn uploaded_tables_equal_the_cpu_tables() {
    let g = gpu();
    for (grid, fractal) in [((2, 3, 5), false), ((2, 8, 16), true)] {
        let (cos, sin) = rope_tables(grid, 128, fractal);
        let (ct, st) = upload_rope_tables(g, grid, 128, fractal).unwrap();
        assert_eq!(ct.shape(), [grid.0 * grid.1 * grid.2, 64]);
        assert_eq!(g.read_f32(&ct).unwrap(), cos);
        assert_eq!(g.read_f32(&st).unwrap(), sin);
        // cached: the same buffers again
        let (ct2, _) = upload_rope_tables(g, grid, 128, fractal).unwrap();
        assert_eq!(ct.buffer(), ct2.buffer());
    }
}

fn gpu_rope_case(rng: &mut Rng, grid: (usize, usize, usize), d: usize, heads: usize, fr: bool) {
    let g = gpu();
    let s = grid.0 * grid.1 * grid.2;
    let (cos, sin) = rope_tables(grid, d, fr);
    let x = rng.normals(s * heads * d, 1.0);
    let want = reference_rope::rope(&x, &cos, &sin, heads, d);
    let xt = g.upload_f32(&x, &[s, heads * d]).unwrap();
    let ct = g.upload_f32(&cos, &[s, d / 2]).unwrap();
    let st = g.upload_f32(&sin, &[s, d / 2]).unwrap();
    rope(g, &xt, &ct, &st, heads).unwrap();
    let got = g.read_f32(&xt).unwrap();
    let what = format!("rope {grid:?} d{d} h{heads} fractal {fr}");
    assert_close(&what, &got, &want, 2e-6, 1e-5, 1e-6);
}

#[test]
fn rope_matches_reference_natural_order() {
    let mut rng = Rng::fresh(0x2013);
    for d in [128, 64] {
        for heads in [1, 3] {
            for grid in NATURAL_GRIDS {
                gpu_rope_case(&mut rng, grid, d, heads, false);
            }
        }
    }
}

#[test]
fn rope_matches_reference_fractal_order() {
    let mut rng = Rng::fresh(0x2014);
    for d in [128, 64] {
        for heads in [1, 3] {
            for grid in FRACTAL_GRIDS {
                gpu_rope_case(&mut rng, grid, d, heads, true);
            }
        }
    }
}

#[test]
fn rope_writes_every_element() {
    // zero tables send every rotated value to exactly 0: an unwritten element keeps its input
    let g = gpu();
    let mut rng = Rng::fresh(0x2015);
    for (s, heads, d) in [(1, 1, 64), (7, 3, 128), (300, 3, 64), (513, 1, 128)] {
        let x: Vec<f32> = rng
            .normals(s * heads * d, 1.0)
            .iter()
            .map(|v| v + 3.0)
            .collect();
        let xt = g.upload_f32(&x, &[s, heads * d]).unwrap();
        let zeros = g.upload_f32(&vec![0.0; s * d / 2], &[s, d / 2]).unwrap();
        rope(g, &xt, &zeros, &zeros, heads).unwrap();
        let got = g.read_f32(&xt).unwrap();
        assert!(
            got.iter().all(|&v| v == 0.0),
            "s {s} heads {heads} d {d}: an element was not rotated"
        );
    }
}

#[test]
fn rope_accepts_the_three_input_layouts() {
    let g = gpu();
    let mut rng = Rng::fresh(0x2016);
    let (grid, heads, d) = ((2, 3, 5), 3, 64);
    let s = 30;
    let x = rng.normals(s * heads * d, 1.0);
    let (ct, st) = upload_rope_tables(g, grid, d, false).unwrap();
    let mut outs = Vec::new();
    for shape in [vec![s, heads * d], vec![s, heads, d], vec![1, s, heads, d]] {
        let xt = g.upload_f32(&x, &shape).unwrap();
        let mut b = g.batch();
        record_rope(&mut b, &xt, &ct, &st, heads).unwrap();
        b.submit().unwrap();
        outs.push(g.read_f32(&xt).unwrap());
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], outs[2]);
}

#[test]
fn rope_in_16_bit_storage() {
    // f32 arithmetic, one rounding to the storage type at the end
    let g = gpu();
    let mut rng = Rng::fresh(0x2017);
    for (dtype, atol, rtol) in [(DType::F16, 1e-4f32, 2e-3f32), (DType::BF16, 1e-6, 1e-2)] {
        for (grid, d, heads) in [((2, 3, 5), 128, 3), ((3, 7, 9), 64, 1)] {
            let s = grid.0 * grid.1 * grid.2;
            let (cos, sin) = rope_tables(grid, d, false);
            let x0 = rng.normals(s * heads * d, 1.0);
            let shape = [s, heads * d];
            let xt = match dtype {
                DType::F16 => g.upload_f16(&x0, &shape).unwrap(),
                _ => g.upload_bf16(&x0, &shape).unwrap(),
            };
            // the kernel sees the rounded input
            let x = g.read_f32(&xt).unwrap();
            let round = |v: f32| match dtype {
                DType::F16 => half::f16::from_f32(v).to_f32(),
                _ => half::bf16::from_f32(v).to_f32(),
            };
            let want: Vec<f32> = reference_rope::rope(&x, &cos, &sin, heads, d)
                .into_iter()
                .map(round)
                .collect();
            let ct = g.upload_f32(&cos, &[s, d / 2]).unwrap();
            let st = g.upload_f32(&sin, &[s, d / 2]).unwrap();
            rope(g, &xt, &ct, &st, heads).unwrap();
            let got = g.read_f32(&xt).unwrap();
            let what = format!("rope {dtype:?} {grid:?} d{d} h{heads}");
            assert_close(&what, &got, &want, atol, rtol, rtol as f64);
            let exact = got.iter().zip(&want).filter(|(a, b)| a == b).count();
            assert!(
                exact * 100 >= got.len() * 95,
                "{what}: only {exact} of {} values equal the correctly rounded result",
                got.len()
            );
        }
    }
}

#[test]
fn rope_on_fractal_tokens_equals_rope_then_permute() {
    // spec §4.3: reorder the tokens, rotate with fractal-ordered tables (one batch on the GPU)
    let g = gpu();
    let mut rng = Rng::fresh(0x2018);
    let (grid, heads, d) = ((2, 8, 16), 3, 128);
    let s = 256;
    let x = rng.normals(s * heads * d, 1.0);
    let xt = g.upload_f32(&x, &[s, heads * d]).unwrap();
    let xf = g.empty(&[s, heads * d], DType::F32).unwrap();
    g.fill_u32(&xf, common::POISON);
    let (ct, st) = upload_rope_tables(g, grid, d, true).unwrap();
    let mut b = g.batch();
    nabla::nabla::record_fractal(&mut b, &xt, &xf, grid, false).unwrap();
    record_rope(&mut b, &xf, &ct, &st, heads).unwrap();
    b.submit().unwrap();
    let (cn, sn) = rope_tables(grid, d, false);
    let natural = reference_rope::rope(&x, &cn, &sn, heads, d);
    let row = heads * d;
    let want: Vec<f32> = reference::fractal_perm(grid.0, grid.1, grid.2)
        .iter()
        .flat_map(|&n| natural[n * row..(n + 1) * row].to_vec())
        .collect();
    assert_close(
        "rope in fractal order",
        &g.read_f32(&xf).unwrap(),
        &want,
        2e-6,
        1e-5,
        1e-6,
    );
}

#[test]
fn sinusoidal_embedding_matches_the_spec() {
    let w1 = 0.930572040929699f64;
    let w127 = 1.0746078283213175e-4f64;
    for t in [0.0, 1.0, 999.0, 437.5] {
        let e = sinusoidal_embedding(t, 256);
        assert_eq!(e.len(), 256);
        assert_eq!(e[0], t.cos() as f32, "t {t}: cos(t·ω_0)");
        assert_eq!(e[128], t.sin() as f32, "t {t}: sin(t·ω_0)");
        assert!((e[1] as f64 - (t * w1).cos()).abs() < 1e-7, "t {t}: ω_1");
        assert!(
            (e[128 + 1] as f64 - (t * w1).sin()).abs() < 1e-7,
            "t {t}: ω_1"
        );
        assert!(
            (e[127] as f64 - (t * w127).cos()).abs() < 1e-7,
            "t {t}: ω_127"
        );
        assert!(
            (e[255] as f64 - (t * w127).sin()).abs() < 1e-7,
            "t {t}: ω_127"
        );
    }
    let e = sinusoidal_embedding(5.0, 8);
    for i in 0..4 {
        let w = 10000f64.powf(-(i as f64) / 4.0);
        assert_eq!(e[i], (5.0 * w).cos() as f32);
        assert_eq!(e[4 + i], (5.0 * w).sin() as f32);
    }
}

fn expect_shape_err(what: &str, r: nabla::Result<()>) {
    match r {
        Err(Error::Shape(m)) => eprintln!("{what}: {m}"),
        other => panic!("{what}: expected a shape error, got {other:?}"),
    }
}

#[test]
fn rope_rejects_bad_inputs() {
    let g = gpu();
    let (s, heads, d) = (30, 2, 64);
    let x = g
        .upload_f32(&vec![1.0; s * heads * d], &[s, heads * d])
        .unwrap();
    let (ct, st) = upload_rope_tables(g, (2, 3, 5), d, false).unwrap();
    expect_shape_err("wrong heads", rope(g, &x, &ct, &st, 3));
    expect_shape_err("zero heads", rope(g, &x, &ct, &st, 0));
    let (c2, s2) = upload_rope_tables(g, (1, 5, 6), d, false).unwrap();
    let xs = g
        .upload_f32(&vec![1.0; 31 * heads * d], &[31, heads * d])
        .unwrap();
    expect_shape_err("token count", rope(g, &xs, &c2, &s2, heads));
    let (c128, s128) = upload_rope_tables(g, (2, 3, 5), 128, false).unwrap();
    expect_shape_err("head_dim vs tables", rope(g, &x, &c128, &s128, heads));
    expect_shape_err("sin shape", rope(g, &x, &ct, &s128, heads));
    let x4 = g
        .upload_f32(&vec![1.0; s * heads * d], &[2, s, heads, d / 2])
        .unwrap();
    expect_shape_err("4-D with batch 2", rope(g, &x4, &ct, &st, heads));
    let xu = g
        .upload_u32(&vec![1; s * heads * d], &[s, heads * d])
        .unwrap();
    expect_shape_err("u32 input", rope(g, &xu, &ct, &st, heads));
    let c16 = g.upload_f16(&vec![1.0; s * d / 2], &[s, d / 2]).unwrap();
    expect_shape_err("f16 table", rope(g, &x, &c16, &c16, heads));
    let c1 = g.upload_f32(&vec![1.0; s * d / 2], &[s * d / 2]).unwrap();
    expect_shape_err("1-D table", rope(g, &x, &c1, &c1, heads));
    assert!(matches!(
        upload_rope_tables(g, (2, 12, 16), 128, true),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        upload_rope_tables(g, (2, 8, 8), 127, false),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        upload_rope_tables(g, (0, 8, 8), 128, false),
        Err(Error::Shape(_))
    ));
    g.check().unwrap();
}

#[test]
#[should_panic(expected = "multiples of 8")]
fn fractal_tables_need_multiples_of_8() {
    let _ = rope_tables((1, 8, 12), 128, true);
}

#[test]
#[should_panic(expected = "even")]
fn tables_need_an_even_head_dim() {
    let _ = rope_tables((1, 2, 2), 63, false);
}

#[test]
fn rope_16_bit_rounding_is_exact() {
    // sin = 0 and one cos per token: each output is one f32 product x·cos (exact whether or not
    // the GPU fuses), so the stored value must be exactly its round-to-nearest-even 16-bit
    // rounding, through the subnormal, overflow and signed-zero cases of the conversions
    let g = gpu();
    let mut rng = Rng::fresh(0x2019);
    let scales = [1.0f32, 0.7, 1.5, 1e-3, 0.333_333_34, 3e-5];
    for dtype in [DType::F16, DType::BF16] {
        let mut x0 = vec![0.0, -0.0, 65504.0, -65504.0, 6e-8, -6e-8, 6.1e-5, 5e4, -5e4];
        for e in -24..16 {
            x0.extend(rng.normals(8, 2f32.powi(e)));
        }
        if x0.len() % 2 == 1 {
            x0.push(1.0);
        }
        let s = x0.len() / 2;
        let xt = match dtype {
            DType::F16 => g.upload_f16(&x0, &[s, 2]).unwrap(),
            _ => g.upload_bf16(&x0, &[s, 2]).unwrap(),
        };
        let x = g.read_f32(&xt).unwrap();
        let cos: Vec<f32> = (0..s).map(|t| scales[t % scales.len()]).collect();
        let want: Vec<u16> = x
            .iter()
            .enumerate()
            .map(|(i, _)| {
                // the kernel's formula with sin = 0 (signed zeros included)
                let (a, b, c) = (x[i & !1], x[i | 1], cos[i / 2]);
                let p = if i % 2 == 0 {
                    a * c - b * 0.0
                } else {
                    a * 0.0 + b * c
                };
                match dtype {
                    DType::F16 => half::f16::from_f32(p).to_bits(),
                    _ => half::bf16::from_f32(p).to_bits(),
                }
            })
            .collect();
        let ct = g.upload_f32(&cos, &[s, 1]).unwrap();
        let st = g.upload_f32(&vec![0.0; s], &[s, 1]).unwrap();
        rope(g, &xt, &ct, &st, 1).unwrap();
        let got: Vec<u16> = bytemuck::pod_collect_to_vec(&g.read_bytes(&xt).unwrap());
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                a,
                b,
                "{dtype:?} element {i}: {} · {} stored as {a:#06x}, expected {b:#06x}",
                x[i],
                cos[i / 2]
            );
        }
    }
}
