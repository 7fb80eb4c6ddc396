//! The umT5 biased self-attention on the GPU against the f64 CPU reference: fresh random inputs,
//! ragged L and D, NaN-poisoned outputs, padded keys (trailing and scattered), a fully padded
//! row, large logits, the bucket function against spec §6.3, and errors for bad operands.

mod common;

use common::{POISON, Rng, assert_close, gpu};
use nabla::ops::attention_bias::{
    attention_bias, record_attention_bias, relative_position_buckets,
};
use nabla::reference::nn::attention_bias as reference;
use nabla::{DType, Error, Gpu, Tensor};

/// A fresh f32 output poisoned with NaN.
fn poisoned(g: &Gpu, shape: &[usize]) -> Tensor {
    let t = g.empty(shape, DType::F32).unwrap();
    g.fill_u32(&t, POISON);
    t
}

/// Inputs of one case (host side).
struct Case {
    h: usize,
    l: usize,
    d: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    table: Vec<f32>,
    buckets: Vec<u32>,
    mask: Vec<u32>,
}

impl Case {
    fn random(rng: &mut Rng, (h, l, d): (usize, usize, usize), qk_std: f32, real: usize) -> Case {
        let n = h * l * d;
        let nb = 32;
        let mut mask: Vec<u32> = (0..l).map(|j| u32::from(j < real)).collect();
        // a few scattered padded keys inside the real part too
        if real > 4 {
            for _ in 0..real / 8 {
                mask[rng.below(real)] = 0;
            }
        }
        Case {
            h,
            l,
            d,
            q: rng.normals(n, qk_std),
            k: rng.normals(n, qk_std),
            v: rng.normals(n, 1.0),
            table: rng.normals(nb * h, 1.0),
            buckets: relative_position_buckets(l, nb, 128).unwrap(),
            mask,
        }
    }

    fn run_gpu(&self, g: &Gpu) -> Vec<f32> {
        let shape = [self.h, self.l, self.d];
        let q = g.upload_f32(&self.q, &shape).unwrap();
        let k = g.upload_f32(&self.k, &shape).unwrap();
        let v = g.upload_f32(&self.v, &shape).unwrap();
        let nb = self.table.len() / self.h;
        let table = g.upload_f32(&self.table, &[nb, self.h]).unwrap();
        let buckets = g.upload_u32(&self.buckets, &[self.buckets.len()]).unwrap();
        let mask = g.upload_u32(&self.mask, &[self.l]).unwrap();
        let out = poisoned(g, &shape);
        let mut b = g.batch();
        record_attention_bias(&mut b, &q, &k, &v, &table, &buckets, &mask, &out).unwrap();
        b.submit().unwrap();
        g.read_f32(&out).unwrap()
    }

    fn run_ref(&self) -> Vec<f32> {
        reference::attention_bias(
            &self.q,
            &self.k,
            &self.v,
            self.h,
            self.l,
            self.d,
            &self.table,
            &self.buckets,
            &self.mask,
        )
    }
}

#[test]
fn matches_reference_on_ragged_shapes() {
    let g = gpu();
    let mut rng = Rng::fresh(0x0A77_B1A5);
    // (H, L, D, real keys): the tiny umT5 (4 heads of 8, 160 tokens, 150 real), umT5-XXL's head
    // size, D above the workgroup width, ragged everything, a single token
    let cases = [
        (4, 160, 8, 150),
        (3, 67, 64, 60),
        (2, 130, 5, 130),
        (1, 200, 70, 111),
        (5, 1, 3, 1),
        (2, 65, 1, 64),
        (1, 300, 16, 260),
    ];
    for (h, l, d, real) in cases {
        let c = Case::random(&mut rng, (h, l, d), 0.5, real);
        let got = c.run_gpu(g);
        let want = c.run_ref();
        assert_close(
            &format!("attention_bias H={h} L={l} D={d} real={real}"),
            &got,
            &want,
            2e-5,
            2e-4,
            1e-5,
        );
    }
}

#[test]
fn large_logits_and_four_axis_shapes() {
    let g = gpu();
    let mut rng = Rng::fresh(0xB16);
    // no scaling: with std 3 the logits of D = 64 reach a few hundred, so the softmax is nearly
    // one-hot and its max subtraction matters
    let c = Case::random(&mut rng, (2, 97, 64), 3.0, 90);
    let want = c.run_ref();
    let shape = [1, c.h, c.l, c.d];
    let q = g.upload_f32(&c.q, &shape).unwrap();
    let k = g.upload_f32(&c.k, &shape).unwrap();
    let v = g.upload_f32(&c.v, &shape).unwrap();
    let table = g.upload_f32(&c.table, &[32, c.h]).unwrap();
    let buckets = g.upload_u32(&c.buckets, &[2 * c.l - 1]).unwrap();
    let mask = g.upload_u32(&c.mask, &[1, c.l]).unwrap();
    let out = attention_bias(g, &q, &k, &v, &table, &buckets, &mask).unwrap();
    assert_eq!(out.shape(), &shape);
    let got = g.read_f32(&out).unwrap();
    // near-one-hot rows: the f32 logits (|s| ~ 300, ulp ~ 3e-5) decide the weights
    assert_close("attention_bias large logits", &got, &want, 1e-3, 1e-3, 1e-3);
}

#[test]
fn padded_keys_get_no_weight_and_all_padded_rows_average() {
    let g = gpu();
    let mut rng = Rng::fresh(0xDAD);
    let (h, l, d) = (3, 40, 8);
    let mut c = Case::random(&mut rng, (h, l, d), 0.5, 25);
    let before = c.run_gpu(g);
    // planting huge k and v at padded keys must change nothing
    for j in (0..l).filter(|&j| c.mask[j] == 0) {
        for hh in 0..h {
            for dd in 0..d {
                c.v[(hh * l + j) * d + dd] = 1e3;
                c.k[(hh * l + j) * d + dd] = 50.0;
            }
        }
    }
    let got = c.run_gpu(g);
    assert_eq!(got, before, "values at padded keys changed the output");
    assert_close("padded keys", &got, &c.run_ref(), 2e-5, 2e-4, 1e-5);

    // every key padded: uniform weights (PyTorch's result for a row of equal lowest logits)
    let mut c3 = Case::random(&mut rng, (h, l, d), 0.5, 0);
    c3.mask.iter_mut().for_each(|m| *m = 0);
    let got = c3.run_gpu(g);
    let want = c3.run_ref();
    assert_close("all keys padded", &got, &want, 1e-5, 1e-4, 1e-5);
    for hh in 0..h {
        for dd in 0..d {
            let mean: f64 = (0..l)
                .map(|j| c3.v[(hh * l + j) * d + dd] as f64)
                .sum::<f64>()
                / l as f64;
            let x = got[(hh * l) * d + dd] as f64;
            assert!(
                (x - mean).abs() < 1e-5,
                "row 0 of head {hh}: {x} vs mean {mean}"
            );
        }
    }
}

#[test]
fn bucket_indices_past_the_table_are_clamped() {
    let g = gpu();
    let mut rng = Rng::fresh(0xC1A);
    let (h, l, d) = (2, 33, 4);
    let mut c = Case::random(&mut rng, (h, l, d), 0.5, 33);
    let nb = 5;
    c.table = rng.normals(nb * h, 2.0);
    c.buckets = (0..2 * l - 1).map(|_| rng.below(9) as u32).collect();
    assert_close(
        "random buckets",
        &c.run_gpu(g),
        &c.run_ref(),
        2e-5,
        2e-4,
        1e-5,
    );
}

/// g(|rel|) of spec §6.3 (32 buckets, max distance 128).
fn spec_g(a: usize) -> usize {
    match a {
        0..=7 => a,
        8..=11 => 8,
        12..=15 => 9,
        16..=22 => 10,
        23..=31 => 11,
        32..=45 => 12,
        46..=63 => 13,
        64..=90 => 14,
        _ => 15,
    }
}

#[test]
fn buckets_match_the_spec_table_and_the_original_formula() {
    let len = 601;
    let b = relative_position_buckets(len, 32, 128).unwrap();
    assert_eq!(b.len(), 2 * len - 1);
    for (r, &bucket) in b.iter().enumerate() {
        let rel = r as i64 - (len as i64 - 1);
        let want = if rel > 0 { 16 } else { 0 } + spec_g(rel.unsigned_abs() as usize);
        assert_eq!(bucket as usize, want, "rel {rel}");
        assert_eq!(
            reference::relative_position_bucket(rel, 32, 128),
            want,
            "reference, rel {rel}"
        );
    }
    // other configurations: the integer thresholds agree with the original's f32 formula
    for (nb, md) in [
        (32, 256),
        (64, 128),
        (16, 64),
        (8, 20),
        (128, 512),
        (33, 100),
    ] {
        let b = relative_position_buckets(len, nb, md).unwrap();
        for (r, &bucket) in b.iter().enumerate() {
            let rel = r as i64 - (len as i64 - 1);
            assert_eq!(
                bucket as usize,
                reference::relative_position_bucket(rel, nb, md),
                "num_buckets {nb}, max_distance {md}, rel {rel}"
            );
            assert!((bucket as usize) < nb);
        }
    }
    assert!(relative_position_buckets(4, 2, 128).is_err());
    assert!(relative_position_buckets(4, 32, 8).is_err());
    assert!(relative_position_buckets(0, 32, 128).unwrap().is_empty());
}

#[test]
fn bad_operands_are_errors() {
    let g = gpu();
    let f = |s: &[usize]| g.empty(s, DType::F32).unwrap();
    let u = |s: &[usize]| g.empty(s, DType::U32).unwrap();
    let (h, l, d) = (2, 10, 4);
    let q = f(&[h, l, d]);
    let k = f(&[h, l, d]);
    let v = f(&[h, l, d]);
    let table = f(&[32, h]);
    let buckets = u(&[2 * l - 1]);
    let mask = u(&[l]);
    let out = f(&[h, l, d]);
    let run = |q: &Tensor,
               k: &Tensor,
               v: &Tensor,
               t: &Tensor,
               b: &Tensor,
               m: &Tensor,
               o: &Tensor|
     -> Result<(), Error> {
        let mut batch = g.batch();
        record_attention_bias(&mut batch, q, k, v, t, b, m, o)
    };
    let shape_err = |r: Result<(), Error>, what: &str| match r {
        Err(Error::Shape(msg)) => eprintln!("{what}: {msg}"),
        other => panic!("{what}: expected a shape error, got {other:?}"),
    };
    run(&q, &k, &v, &table, &buckets, &mask, &out).unwrap();
    shape_err(
        run(&q, &f(&[h, l + 1, d]), &v, &table, &buckets, &mask, &out),
        "k length",
    );
    shape_err(
        run(&q, &k, &f(&[h, l, d + 1]), &table, &buckets, &mask, &out),
        "v head dim",
    );
    shape_err(
        run(&f(&[l, h * d]), &k, &v, &table, &buckets, &mask, &out),
        "q not split",
    );
    shape_err(
        run(&q, &k, &v, &f(&[h, 32]), &buckets, &mask, &out),
        "table transposed",
    );
    shape_err(
        run(&q, &k, &v, &table, &u(&[l]), &mask, &out),
        "buckets length",
    );
    shape_err(
        run(&q, &k, &v, &table, &f(&[2 * l - 1]), &mask, &out),
        "buckets dtype",
    );
    shape_err(
        run(&q, &k, &v, &table, &buckets, &f(&[l]), &out),
        "mask dtype",
    );
    shape_err(
        run(&q, &k, &v, &table, &buckets, &u(&[l + 1]), &out),
        "mask length",
    );
    shape_err(
        run(&q, &k, &v, &table, &buckets, &mask, &f(&[h, l, d + 1])),
        "out shape",
    );
    shape_err(
        run(&q, &k, &v, &table, &buckets, &mask, &q),
        "out aliases q",
    );
    shape_err(
        run(&q, &k, &v, &table, &buckets, &mask, &u(&[h, l, d])),
        "out dtype",
    );
    assert!(attention_bias(g, &q, &k, &v, &f(&[32, h + 1]), &buckets, &mask).is_err());
}
