//! The VAE ops of `nabla::ops::conv` on the GPU against the f64 CPU reference: causal 3-D
//! convolution (3×3×3, 1×1×1, 3×1×1, with and without cache, both tile shapes, ragged sizes),
//! chunked decoding with caches equal to one whole run, per-frame 2-D convolution, nearest
//! upsampling alone and fused, residual and weight-row offset, the cache update, the channel
//! RMS norm (+β, +SiLU) and the spatial attention. Fresh random inputs, outputs poisoned with
//! NaN first; bad shapes give errors.

mod common;

use common::{POISON, Rng, assert_close, gpu};
use nabla::ops::conv::{
    ConvOptions, MAX_ATTENTION_CHANNELS, causal_conv3d, channel_rms_norm, conv2d,
    record_cache_update, record_channel_rms_norm, record_conv3d, record_spatial_attention,
    record_upsample_nearest2x, spatial_attention, upsample_conv2d, upsample_nearest2x,
};
use nabla::reference::nn::conv as reference;
use nabla::{DType, Error, Gpu, Tensor};

/// A fresh f32 tensor poisoned with NaN.
fn poisoned(g: &Gpu, shape: &[usize]) -> Tensor {
    let t = g.empty(shape, DType::F32).unwrap();
    g.fill_u32(&t, POISON);
    t
}

fn up(g: &Gpu, data: &[f32], shape: &[usize]) -> Tensor {
    g.upload_f32(data, shape).unwrap()
}

/// Weights scaled by 1/√K so outputs stay O(1) for any fan-in.
fn weights(rng: &mut Rng, co: usize, k: usize) -> Vec<f32> {
    rng.normals(co * k, 1.0 / (k as f32).sqrt())
}

/// Tolerance of an f32 convolution with fan-in `k` against the f64 reference.
fn conv_tol(k: usize) -> f32 {
    2e-6 * (k as f32).sqrt().max(4.0)
}

/// `(C_in, C_out, T, H, W, kt, kh, kw)` of one convolution test.
type ConvCase = (usize, usize, usize, usize, usize, usize, usize, usize);

/// Ragged sizes, both tiles (≤ 16 and > 16 output channels), several row tiles, the three
/// kernel shapes of the VAE.
const CONVS: [ConvCase; 10] = [
    (1, 1, 1, 1, 1, 3, 3, 3),
    (3, 5, 2, 5, 7, 3, 3, 3),
    (16, 20, 3, 6, 5, 3, 3, 3),
    (7, 70, 1, 9, 11, 3, 3, 3),
    (17, 3, 4, 13, 6, 3, 3, 3),
    (24, 33, 3, 4, 4, 1, 1, 1),
    (10, 24, 5, 3, 7, 3, 1, 1),
    (96, 96, 1, 12, 20, 3, 3, 3),
    (5, 130, 2, 3, 3, 1, 1, 1),
    (384, 40, 1, 3, 5, 3, 3, 3),
];

#[test]
fn causal_conv3d_matches_reference() {
    let g = gpu();
    let mut rng = Rng::fresh(0xc0de_0001);
    for (ci, co, t, h, w, kt, kh, kw) in CONVS {
        let k = ci * kt * kh * kw;
        let x = rng.normals(ci * t * h * w, 1.0);
        let wv = weights(&mut rng, co, k);
        let b = rng.normals(co, 0.5);
        let xt = up(g, &x, &[ci, t, h, w]);
        let wt = up(g, &wv, &[co, ci, kt, kh, kw]);
        let bt = up(g, &b, &[co]);
        for with_cache in [false, true] {
            if with_cache && kt == 1 {
                continue;
            }
            let cache = rng.normals(ci * (kt - 1) * h * w, 1.0);
            let ct = with_cache.then(|| up(g, &cache, &[ci, kt - 1, h, w]));
            let out = poisoned(g, &[co, t, h, w]);
            let opts = ConvOptions {
                cache: ct.as_ref(),
                bias: Some(&bt),
                ..Default::default()
            };
            let mut batch = g.batch();
            record_conv3d(&mut batch, &xt, &wt, &out, &opts).unwrap();
            batch.submit().unwrap();
            let got = g.read_f32(&out).unwrap();
            let want = reference::conv3d(
                &x,
                (ci, t, h, w),
                with_cache.then_some(&cache[..]),
                &wv,
                (co, ci, kt, kh, kw),
                Some(&b),
                false,
            );
            let tol = conv_tol(k);
            assert_close(
                &format!("conv3d ci{ci} co{co} t{t} {h}x{w} k{kt}{kh}{kw} cache={with_cache}"),
                &got,
                &want,
                tol,
                tol,
                1e-5,
            );
        }
    }
}

#[test]
fn conv_without_bias_and_allocating_entry_point() {
    let g = gpu();
    let mut rng = Rng::fresh(0xc0de_0002);
    let (ci, co, t, h, w) = (6, 9, 2, 7, 5);
    let x = rng.normals(ci * t * h * w, 1.0);
    let wv = weights(&mut rng, co, ci * 27);
    let xt = up(g, &x, &[ci, t, h, w]);
    let wt = up(g, &wv, &[co, ci, 3, 3, 3]);
    let got = g
        .read_f32(&causal_conv3d(g, &xt, None, &wt, None).unwrap())
        .unwrap();
    let want = reference::conv3d(&x, (ci, t, h, w), None, &wv, (co, ci, 3, 3, 3), None, false);
    assert_close("conv3d no bias", &got, &want, 1e-5, 1e-5, 1e-5);
}

/// Decoding in chunks with a cache carried between them gives the whole-sequence result.
#[test]
fn chunked_with_cache_equals_whole_run() {
    let g = gpu();
    let mut rng = Rng::fresh(0xc0de_0003);
    // (C_in, C_out, H, W, kt, kh, kw, chunk lengths)
    type ChunkCase = (
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        &'static [usize],
    );
    let cases: [ChunkCase; 4] = [
        (5, 7, 6, 9, 3, 3, 3, &[2, 3]),
        (12, 30, 5, 4, 3, 3, 3, &[1, 1, 1, 2]),
        (9, 18, 3, 7, 3, 1, 1, &[1, 4]),
        (4, 3, 11, 6, 3, 3, 3, &[3, 1, 2]),
    ];
    for (ci, co, h, w, kt, kh, kw, chunks) in cases {
        let t: usize = chunks.iter().sum();
        let hw = h * w;
        let x = rng.normals(ci * t * hw, 1.0);
        let wv = weights(&mut rng, co, ci * kt * kh * kw);
        let b = rng.normals(co, 0.5);
        let wt = up(g, &wv, &[co, ci, kt, kh, kw]);
        let bt = up(g, &b, &[co]);
        let whole = {
            let xt = up(g, &x, &[ci, t, h, w]);
            g.read_f32(&causal_conv3d(g, &xt, None, &wt, Some(&bt)).unwrap())
                .unwrap()
        };
        let want = reference::conv3d(
            &x,
            (ci, t, h, w),
            None,
            &wv,
            (co, ci, kt, kh, kw),
            Some(&b),
            false,
        );
        let tol = conv_tol(ci * kt * kh * kw);
        assert_close(
            &format!("whole run ci{ci} co{co}"),
            &whole,
            &want,
            tol,
            tol,
            1e-5,
        );

        // chunk by chunk, the cache starting at zeros and updated after every chunk
        let cache = up(g, &vec![0.0; ci * (kt - 1) * hw], &[ci, kt - 1, h, w]);
        let mut chunked = vec![f32::NAN; co * t * hw];
        let mut start = 0;
        for &len in chunks {
            let mut xc = Vec::with_capacity(ci * len * hw);
            for c in 0..ci {
                xc.extend_from_slice(&x[(c * t + start) * hw..(c * t + start + len) * hw]);
            }
            let xt = up(g, &xc, &[ci, len, h, w]);
            let out = poisoned(g, &[co, len, h, w]);
            let mut batch = g.batch();
            let opts = ConvOptions {
                cache: Some(&cache),
                bias: Some(&bt),
                ..Default::default()
            };
            record_conv3d(&mut batch, &xt, &wt, &out, &opts).unwrap();
            record_cache_update(&mut batch, &cache, &xt).unwrap();
            batch.submit().unwrap();
            let o = g.read_f32(&out).unwrap();
            for c in 0..co {
                chunked[(c * t + start) * hw..(c * t + start + len) * hw]
                    .copy_from_slice(&o[c * len * hw..(c + 1) * len * hw]);
            }
            start += len;
        }
        let worst = chunked
            .iter()
            .zip(&whole)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            chunked.iter().all(|v| !v.is_nan()),
            "chunked ci{ci} co{co}: NaN"
        );
        assert!(
            worst <= 1e-6,
            "chunks {chunks:?} (ci{ci} co{co} k{kt}{kh}{kw}) differ from the whole run by {worst:e}"
        );
        eprintln!("chunks {chunks:?} vs whole run: max abs diff {worst:e}");
    }
}

#[test]
fn cache_update_matches_reference() {
    let g = gpu();
    let mut rng = Rng::fresh(0xc0de_0004);
    for (c, l, t, h, w) in [
        (3, 2, 1, 4, 5),
        (5, 2, 3, 3, 3),
        (2, 3, 2, 1, 7),
        (70, 2, 2, 5, 9),
    ] {
        let cache = rng.normals(c * l * h * w, 1.0);
        let x = rng.normals(c * t * h * w, 1.0);
        let ct = up(g, &cache, &[c, l, h, w]);
        let xt = up(g, &x, &[c, t, h, w]);
        let mut batch = g.batch();
        record_cache_update(&mut batch, &ct, &xt).unwrap();
        batch.submit().unwrap();
        let got = g.read_f32(&ct).unwrap();
        let want = reference::cache_update(&cache, l, &x, (c, t, h, w));
        assert_eq!(got, want, "cache update c{c} l{l} t{t}");
    }
}

#[test]
fn conv2d_per_frame_matches_reference() {
    let g = gpu();
    let mut rng = Rng::fresh(0xc0de_0005);
    for (ci, co, t, h, w) in [(4, 6, 3, 5, 8), (20, 10, 1, 9, 9), (33, 65, 2, 4, 3)] {
        let x = rng.normals(ci * t * h * w, 1.0);
        let wv = weights(&mut rng, co, ci * 9);
        let b = rng.normals(co, 0.5);
        let xt = up(g, &x, &[ci, t, h, w]);
        let wt = up(g, &wv, &[co, ci, 3, 3]);
        let bt = up(g, &b, &[co]);
        let got = g
            .read_f32(&conv2d(g, &xt, &wt, Some(&bt)).unwrap())
            .unwrap();
        let want = reference::conv2d(&x, (ci, t, h, w), &wv, (co, ci, 3, 3), Some(&b));
        let tol = conv_tol(ci * 9);
        assert_close(
            &format!("conv2d ci{ci} co{co} t{t}"),
            &got,
            &want,
            tol,
            tol,
            1e-5,
        );
    }
}

#[test]
fn upsampling_alone_and_fused() {
    let g = gpu();
    let mut rng = Rng::fresh(0xc0de_0006);
    for (ci, co, t, h, w) in [
        (4, 2, 1, 3, 5),
        (16, 8, 2, 4, 4),
        (40, 20, 1, 7, 3),
        (3, 17, 2, 1, 1),
    ] {
        let x = rng.normals(ci * t * h * w, 1.0);
        let xt = up(g, &x, &[ci, t, h, w]);
        let out = poisoned(g, &[ci, t, 2 * h, 2 * w]);
        let mut batch = g.batch();
        record_upsample_nearest2x(&mut batch, &xt, &out).unwrap();
        batch.submit().unwrap();
        let got = g.read_f32(&out).unwrap();
        let upsampled = reference::upsample_nearest2x(&x, (ci, t, h, w));
        assert_eq!(got, upsampled, "upsample c{ci} t{t} {h}x{w}");
        let again = g.read_f32(&upsample_nearest2x(g, &xt).unwrap()).unwrap();
        assert_eq!(again, upsampled, "upsample_nearest2x()");

        // fused = conv2d of the upsampled image
        let wv = weights(&mut rng, co, ci * 9);
        let b = rng.normals(co, 0.5);
        let wt = up(g, &wv, &[co, ci, 3, 3]);
        let bt = up(g, &b, &[co]);
        let got = g
            .read_f32(&upsample_conv2d(g, &xt, &wt, Some(&bt)).unwrap())
            .unwrap();
        let want = reference::conv2d(
            &upsampled,
            (ci, t, 2 * h, 2 * w),
            &wv,
            (co, ci, 3, 3),
            Some(&b),
        );
        let want2 = reference::conv3d(
            &x,
            (ci, t, h, w),
            None,
            &wv,
            (co, ci, 1, 3, 3),
            Some(&b),
            true,
        );
        assert_eq!(
            want, want2,
            "reference: fused upsampling = conv of the upsampled image"
        );
        let tol = conv_tol(ci * 9);
        assert_close(
            &format!("upsample+conv2d ci{ci} co{co}"),
            &got,
            &want,
            tol,
            tol,
            1e-5,
        );
    }
}

/// The VAE's time_conv: one weight [2C, C, 3, 1, 1] gives two frames through the row offset;
/// plus a residual input added in the epilogue.
#[test]
fn out_channel_offset_and_residual() {
    let g = gpu();
    let mut rng = Rng::fresh(0xc0de_0007);
    for (c, t, h, w) in [(8, 1, 4, 6), (24, 2, 3, 5)] {
        let x = rng.normals(c * t * h * w, 1.0);
        let cache = rng.normals(c * 2 * h * w, 1.0);
        let wv = weights(&mut rng, 2 * c, c * 3);
        let b = rng.normals(2 * c, 0.5);
        let r = rng.normals(c * t * h * w, 1.0);
        let (xt, ct) = (up(g, &x, &[c, t, h, w]), up(g, &cache, &[c, 2, h, w]));
        let (wt, bt, rt) = (
            up(g, &wv, &[2 * c, c, 3, 1, 1]),
            up(g, &b, &[2 * c]),
            up(g, &r, &[c, t, h, w]),
        );
        let full = reference::conv3d(
            &x,
            (c, t, h, w),
            Some(&cache),
            &wv,
            (2 * c, c, 3, 1, 1),
            Some(&b),
            false,
        );
        for half in 0..2 {
            let out = poisoned(g, &[c, t, h, w]);
            let opts = ConvOptions {
                cache: Some(&ct),
                bias: Some(&bt),
                residual: Some(&rt),
                upsample: false,
                out_channel_offset: half * c,
            };
            let mut batch = g.batch();
            record_conv3d(&mut batch, &xt, &wt, &out, &opts).unwrap();
            batch.submit().unwrap();
            let got = g.read_f32(&out).unwrap();
            let n = c * t * h * w;
            let want: Vec<f32> = full[half * n..(half + 1) * n]
                .iter()
                .zip(&r)
                .map(|(a, b)| a + b)
                .collect();
            let tol = conv_tol(c * 3);
            assert_close(
                &format!("time_conv half {half} c{c}"),
                &got,
                &want,
                tol,
                tol,
                1e-5,
            );
        }
    }
}

#[test]
fn channel_rms_norm_matches_reference() {
    let g = gpu();
    let mut rng = Rng::fresh(0xc0de_0008);
    for (c, p) in [(1, 7), (4, 300), (96, 257), (384, 33), (13, 1)] {
        let mut x = rng.normals(c * p, 2.0);
        // one all-zero position: the norm clamps at 1e-12 and gives exactly 0
        for ch in 0..c {
            x[ch * p] = 0.0;
        }
        let gamma = rng.normals(c, 1.0);
        let beta = rng.normals(c, 0.5);
        let xt = up(g, &x, &[c, 1, 1, p]);
        let gt = up(g, &gamma, &[c]);
        let bt = up(g, &beta, &[c]);
        for (with_beta, silu) in [(false, false), (false, true), (true, false), (true, true)] {
            let out = poisoned(g, &[c, 1, 1, p]);
            let mut batch = g.batch();
            record_channel_rms_norm(&mut batch, &xt, &gt, with_beta.then_some(&bt), silu, &out)
                .unwrap();
            batch.submit().unwrap();
            let got = g.read_f32(&out).unwrap();
            let want =
                reference::channel_rms_norm(&x, c, &gamma, with_beta.then_some(&beta[..]), silu);
            assert_close(
                &format!("channel_rms_norm c{c} p{p} beta={with_beta} silu={silu}"),
                &got,
                &want,
                2e-6,
                2e-6,
                1e-6,
            );
        }
        let got = g
            .read_f32(&channel_rms_norm(g, &xt, &gt, None, false).unwrap())
            .unwrap();
        for ch in 0..c {
            assert_eq!(got[ch * p], 0.0, "zero position c{c}");
        }
    }
}

#[test]
fn spatial_attention_matches_reference() {
    let g = gpu();
    let mut rng = Rng::fresh(0xc0de_0009);
    // (C, T, H, W): ragged pixel counts and channel chunks, several frames, C = 384 (Wan)
    for (c, t, h, w) in [
        (16, 1, 4, 4),
        (4, 2, 5, 7),
        (40, 1, 9, 7),
        (100, 3, 3, 11),
        (384, 1, 5, 8),
        (1, 1, 1, 1),
        (33, 2, 8, 8),
        (64, 1, 20, 23),
    ] {
        let s = h * w;
        // std 2: logits spread over tens of units, so the online softmax rescales often
        let qkv = rng.normals(3 * c * t * s, 2.0);
        let qt = up(g, &qkv, &[3 * c, t, h, w]);
        let out = poisoned(g, &[c, t, h, w]);
        let mut batch = g.batch();
        record_spatial_attention(&mut batch, &qt, &out).unwrap();
        batch.submit().unwrap();
        let got = g.read_f32(&out).unwrap();
        let want = reference::spatial_attention(&qkv, c, t, s);
        assert_close(
            &format!("attention c{c} t{t} {h}x{w}"),
            &got,
            &want,
            // logits of std ~4 summed over up to 384 channels carry ~1e-5 absolute f32
            // rounding, which the softmax passes on to outputs of magnitude ~2
            5e-5,
            1e-4,
            1e-5,
        );
        let again = g.read_f32(&spatial_attention(g, &qt).unwrap()).unwrap();
        assert_eq!(
            again, got,
            "spatial_attention() = record_spatial_attention()"
        );
    }
}

fn is_shape_err<T>(r: nabla::Result<T>, what: &str) {
    match r {
        Err(Error::Shape(m)) => eprintln!("{what}: {m}"),
        Err(e) => panic!("{what}: expected a shape error, got {e}"),
        Ok(_) => panic!("{what}: expected a shape error, got Ok"),
    }
}

#[test]
fn bad_shapes_are_errors() {
    let g = gpu();
    let x = g.empty(&[4, 2, 5, 5], DType::F32).unwrap();
    let w = g.empty(&[6, 4, 3, 3, 3], DType::F32).unwrap();
    let out = g.empty(&[6, 2, 5, 5], DType::F32).unwrap();
    let conv = |x: &Tensor, w: &Tensor, out: &Tensor, o: ConvOptions<'_>| {
        let mut b = g.batch();
        record_conv3d(&mut b, x, w, out, &o)
    };
    let d = ConvOptions::default;
    is_shape_err(
        conv(
            &x,
            &g.empty(&[6, 5, 3, 3, 3], DType::F32).unwrap(),
            &out,
            d(),
        ),
        "input channels",
    );
    is_shape_err(
        conv(
            &x,
            &g.empty(&[6, 4, 3, 2, 3], DType::F32).unwrap(),
            &out,
            d(),
        ),
        "even kernel",
    );
    is_shape_err(
        conv(&x, &w, &g.empty(&[6, 2, 5, 4], DType::F32).unwrap(), d()),
        "output size",
    );
    is_shape_err(
        conv(&x, &w, &g.empty(&[6, 2, 10, 10], DType::F32).unwrap(), d()),
        "output size without upsampling",
    );
    let bad_cache = g.empty(&[4, 1, 5, 5], DType::F32).unwrap();
    is_shape_err(
        conv(
            &x,
            &w,
            &out,
            ConvOptions {
                cache: Some(&bad_cache),
                ..d()
            },
        ),
        "cache frames",
    );
    let w1 = g.empty(&[6, 4, 1, 1, 1], DType::F32).unwrap();
    let cache2 = g.empty(&[4, 2, 5, 5], DType::F32).unwrap();
    is_shape_err(
        conv(
            &x,
            &w1,
            &out,
            ConvOptions {
                cache: Some(&cache2),
                ..d()
            },
        ),
        "cache for kt = 1",
    );
    let bias = g.empty(&[5], DType::F32).unwrap();
    is_shape_err(
        conv(
            &x,
            &w,
            &out,
            ConvOptions {
                bias: Some(&bias),
                ..d()
            },
        ),
        "bias",
    );
    let res = g.empty(&[6, 2, 5, 4], DType::F32).unwrap();
    is_shape_err(
        conv(
            &x,
            &w,
            &out,
            ConvOptions {
                residual: Some(&res),
                ..d()
            },
        ),
        "residual",
    );
    is_shape_err(
        conv(
            &x,
            &w,
            &out,
            ConvOptions {
                out_channel_offset: 1,
                ..d()
            },
        ),
        "row offset",
    );
    is_shape_err(conv(&x, &w, &x, d()), "out aliases x");
    let xu = g.empty(&[4, 2, 5, 5], DType::U32).unwrap();
    is_shape_err(conv(&xu, &w, &out, d()), "u32 input");

    let mut b = g.batch();
    is_shape_err(
        record_cache_update(&mut b, &g.empty(&[4, 2, 5, 6], DType::F32).unwrap(), &x),
        "cache update size",
    );
    is_shape_err(
        record_channel_rms_norm(
            &mut b,
            &x,
            &g.empty(&[5], DType::F32).unwrap(),
            None,
            false,
            &g.empty(&[4, 2, 5, 5], DType::F32).unwrap(),
        ),
        "norm gamma",
    );
    let c = MAX_ATTENTION_CHANNELS + 1;
    is_shape_err(
        record_spatial_attention(
            &mut b,
            &g.empty(&[3 * c, 1, 2, 2], DType::F32).unwrap(),
            &g.empty(&[c, 1, 2, 2], DType::F32).unwrap(),
        ),
        "attention width",
    );
    is_shape_err(
        record_spatial_attention(
            &mut b,
            &g.empty(&[10, 1, 2, 2], DType::F32).unwrap(),
            &g.empty(&[3, 1, 2, 2], DType::F32).unwrap(),
        ),
        "qkv not 3C",
    );
    is_shape_err(
        record_upsample_nearest2x(&mut b, &x, &g.empty(&[4, 2, 10, 9], DType::F32).unwrap()),
        "upsample size",
    );
    b.submit().unwrap();
}
