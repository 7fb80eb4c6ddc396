//! Parity of the Wan VAE decoder with the reference tensors in `NABLA_GOLDEN_DIR` (default
//! `../shared/golden`), driven by `manifest.json`: every case of kind `vae_decode` is decoded
//! with the weights its config names, and `video_raw` and `video` are compared within the
//! manifest's tolerances. Shapes and the configuration come from the manifest and the files.

mod common;

use common::golden::*;

use common::gpu;
use nabla::io::TensorFile;
use nabla::wan::vae::{VaeConfig, VaeDecoder, WAN21_LATENT_MEAN, WAN21_LATENT_STD, clamp_video};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn shape_of(t: &Value) -> Vec<usize> {
    t["shape"]
        .as_array()
        .unwrap_or_else(|| panic!("manifest: shape of {}", t["name"]))
        .iter()
        .map(|d| d.as_u64().expect("manifest: shape entry") as usize)
        .collect()
}

fn usizes(v: &Value, what: &str) -> Vec<usize> {
    v.as_array()
        .unwrap_or_else(|| panic!("manifest: {what} is not a list: {v}"))
        .iter()
        .map(|d| {
            d.as_u64()
                .unwrap_or_else(|| panic!("manifest: {what}: {d}")) as usize
        })
        .collect()
}

/// Compares elementwise (`|got − want| ≤ atol + rtol·|want|`, no NaN) and reports the worst.
fn check(name: &str, got: &[f32], want: &[f32], tol: (f32, f32)) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut worst = (0f32, 0usize);
    let mut worst_ratio = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan(), "{name}: NaN at {i}");
        let err = (g - w).abs();
        let bound = tol.0 + tol.1 * w.abs();
        assert!(
            err <= bound,
            "{name}[{i}]: got {g}, expected {w}, tolerance {tol:?}"
        );
        if err > worst.0 {
            worst = (err, i);
        }
        worst_ratio = worst_ratio.max(err / bound);
    }
    eprintln!(
        "{name}: ok, max abs err {:.2e} at {} (tolerance {tol:?}, worst err/bound {worst_ratio:.3}, \
         rel L2 {:.2e})",
        worst.0,
        worst.1,
        common::rel_l2(got, want)
    );
}

/// The decoder configuration a manifest case describes.
fn manifest_config(cfg: &Value) -> VaeConfig {
    let dim_mult = usizes(&cfg["dim_mult"], "dim_mult");
    let down: Vec<bool> = cfg["temperal_downsample"]
        .as_array()
        .expect("manifest: temperal_downsample")
        .iter()
        .map(|b| b.as_bool().expect("manifest: temperal_downsample entry"))
        .collect();
    VaeConfig {
        dim: cfg["dim"].as_u64().expect("manifest: dim") as usize,
        z_dim: cfg["z_dim"].as_u64().expect("manifest: z_dim") as usize,
        dim_mult,
        num_res_blocks: cfg["num_res_blocks"]
            .as_u64()
            .expect("manifest: num_res_blocks") as usize,
        temporal_upsample: down.into_iter().rev().collect(),
    }
}

#[test]
fn golden_vae_decode() {
    let cs = cases("vae_decode");
    assert!(!cs.is_empty(), "manifest has no vae_decode case");
    let g = gpu();
    for case in cs {
        let name = case["name"].as_str().expect("case name");
        let cfg = &case["config"];
        let weights = golden_dir().join(cfg["weights"].as_str().expect("config.weights"));
        let mut dec = VaeDecoder::load(g, &weights)
            .unwrap_or_else(|e| panic!("{name}: loading {}: {e}", weights.display()));
        let want_cfg = manifest_config(cfg);
        assert_eq!(
            dec.config().decoder_dims(),
            want_cfg.decoder_dims(),
            "{name}: inferred widths"
        );
        assert_eq!(dec.config().z_dim, want_cfg.z_dim, "{name}: z_dim");
        assert_eq!(
            dec.config().num_res_blocks,
            want_cfg.num_res_blocks,
            "{name}: num_res_blocks"
        );
        assert_eq!(
            dec.config().temporal_upsample,
            want_cfg.temporal_upsample,
            "{name}: temporal upsampling"
        );
        if let Some(attn) = cfg["attn_scales"].as_array() {
            assert!(
                attn.is_empty(),
                "{name}: attention in the upsampling path is not supported"
            );
        }

        let f = TensorFile::open(golden_dir().join(case["file"].as_str().expect("file"))).unwrap();
        let entries = case["tensors"].as_array().expect("tensors").clone();
        let entry = |n: &str| {
            entries
                .iter()
                .find(|t| t["name"] == n)
                .unwrap_or_else(|| panic!("{name}: manifest lists no tensor {n}"))
                .clone()
        };
        let zs = shape_of(&entry("z"));
        let (z, zshape) = f.f32("z").unwrap();
        assert_eq!(zshape, zs, "{name}: z shape");
        assert_eq!(zs.len(), 4, "{name}: z must be [z_dim, T, h, w]");
        let (mean, _) = f.f32("mean").unwrap();
        let (std, _) = f.f32("std").unwrap();
        dec.set_latent_stats(&mean, &std).unwrap();
        let latent = (zs[1], zs[2], zs[3]);

        let t0 = std::time::Instant::now();
        let raw = dec.decode_raw(g, &z, latent).unwrap();
        eprintln!("{name}: decoded {latent:?} in {:.2?}", t0.elapsed());

        let raw_entry = entry("video_raw");
        let out_shape = shape_of(&raw_entry);
        assert_eq!(
            dec.output_shape(latent).to_vec(),
            out_shape,
            "{name}: output shape"
        );
        let (want_raw, s) = f.f32("video_raw").unwrap();
        assert_eq!(s, out_shape, "{name}: video_raw shape in the file");
        check(
            &format!("{name} video_raw"),
            &raw,
            &want_raw,
            tolerance(&raw_entry),
        );

        let video_entry = entry("video");
        let (want_video, s) = f.f32("video").unwrap();
        assert_eq!(s, shape_of(&video_entry), "{name}: video shape");
        let mut video = raw.clone();
        clamp_video(&mut video);
        check(
            &format!("{name} video"),
            &video,
            &want_video,
            tolerance(&video_entry),
        );

        // decode() is decode_raw() clamped
        let direct = dec.decode(g, &z, latent).unwrap();
        assert_eq!(
            direct, video,
            "{name}: decode() differs from clamp(decode_raw())"
        );
    }
}

/// The weights file of the first `vae_decode` case.
fn vae_weights_path() -> PathBuf {
    let cs = cases("vae_decode");
    let case = cs.first().expect("manifest has no vae_decode case");
    golden_dir().join(case["config"]["weights"].as_str().expect("config.weights"))
}

/// The reference decoder in its whole-sequence form (spec §7.4), on the CPU in f64 from the
/// ops references: every causal conv sees zeros before frame 0, and each temporal upsample
/// runs its time_conv over frames 1.. as an independent sequence (frame 0 bypasses it).
struct CpuVae {
    tensors: BTreeMap<String, (Vec<f32>, Vec<usize>)>,
    cfg: VaeConfig,
}

type Video = (Vec<f32>, (usize, usize, usize, usize));

impl CpuVae {
    fn from_file(f: &TensorFile, cfg: VaeConfig) -> CpuVae {
        let tensors = f
            .names()
            .unwrap()
            .into_iter()
            .map(|n| {
                let v = f.f32(&n).unwrap_or_else(|e| panic!("{n}: {e}"));
                (n, v)
            })
            .collect();
        CpuVae { tensors, cfg }
    }

    fn get(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
            .clone()
    }

    /// A conv by name on x (3-D weights causal with zero history, 2-D weights per frame).
    fn conv(&self, name: &str, x: &Video, upsample: bool) -> Video {
        use nabla::reference::nn::conv as r;
        let (w, s) = self.get(&format!("{name}.weight"));
        let (b, _) = self.get(&format!("{name}.bias"));
        let k = if s.len() == 5 {
            (s[0], s[1], s[2], s[3], s[4])
        } else {
            (s[0], s[1], 1, s[2], s[3])
        };
        let (_, t, h, wd) = x.1;
        let up = if upsample { 2 } else { 1 };
        let y = r::conv3d(&x.0, x.1, None, &w, k, Some(&b), upsample);
        (y, (k.0, t, h * up, wd * up))
    }

    fn norm(&self, name: &str, x: &Video, silu: bool) -> Video {
        let (g, _) = self.get(&format!("{name}.gamma"));
        let y = nabla::reference::nn::conv::channel_rms_norm(&x.0, x.1.0, &g, None, silu);
        (y, x.1)
    }

    fn add(a: &Video, b: &Video) -> Video {
        assert_eq!(a.1, b.1);
        (a.0.iter().zip(&b.0).map(|(x, y)| x + y).collect(), a.1)
    }

    fn res(&self, p: &str, x: &Video) -> Video {
        let y = self.norm(&format!("{p}.residual.0"), x, true);
        let y = self.conv(&format!("{p}.residual.2"), &y, false);
        let y = self.norm(&format!("{p}.residual.3"), &y, true);
        let y = self.conv(&format!("{p}.residual.6"), &y, false);
        let h = if y.1.0 != x.1.0 {
            self.conv(&format!("{p}.shortcut"), x, false)
        } else {
            x.clone()
        };
        Self::add(&y, &h)
    }

    fn attention(&self, x: &Video) -> Video {
        let (c, t, h, w) = x.1;
        let u = self.norm("decoder.middle.1.norm", x, false);
        let qkv = self.conv("decoder.middle.1.to_qkv", &u, false);
        let o = nabla::reference::nn::conv::spatial_attention(&qkv.0, c, t, h * w);
        let o = self.conv("decoder.middle.1.proj", &(o, x.1), false);
        Self::add(&o, x)
    }

    /// Frames `range` of x as their own video.
    fn frames(x: &Video, from: usize, to: usize) -> Video {
        let (c, t, h, w) = x.1;
        let hw = h * w;
        let mut v = Vec::new();
        for ch in 0..c {
            v.extend_from_slice(&x.0[(ch * t + from) * hw..(ch * t + to) * hw]);
        }
        (v, (c, to - from, h, w))
    }

    fn time_upsample(&self, name: &str, x: &Video) -> Video {
        let (c, t, h, w) = x.1;
        if t == 1 {
            return x.clone();
        }
        let rest = self.conv(name, &Self::frames(x, 1, t), false); // [2C, T-1, h, w]
        let hw = h * w;
        let t2 = 1 + 2 * (t - 1);
        let mut v = vec![0f32; c * t2 * hw];
        for ch in 0..c {
            v[ch * t2 * hw..(ch * t2 + 1) * hw]
                .copy_from_slice(&x.0[ch * t * hw..(ch * t + 1) * hw]);
            for j in 0..t - 1 {
                for half in 0..2 {
                    let src = ((half * c + ch) * (t - 1) + j) * hw;
                    let dst = (ch * t2 + 1 + 2 * j + half) * hw;
                    v[dst..dst + hw].copy_from_slice(&rest.0[src..src + hw]);
                }
            }
        }
        (v, (c, t2, h, w))
    }

    fn decode(&self, z: &[f32], latent: (usize, usize, usize), mean: &[f32], std: &[f32]) -> Video {
        let (t, h, w) = latent;
        let zc = self.cfg.z_dim;
        let hw = h * w;
        let mut zz = z.to_vec();
        for c in 0..zc {
            let inv = 1.0 / std[c];
            for v in &mut zz[c * t * hw..(c + 1) * t * hw] {
                *v = *v / inv + mean[c];
            }
        }
        let mut x = self.conv("conv2", &(zz, (zc, t, h, w)), false);
        x = self.conv("decoder.conv1", &x, false);
        x = self.res("decoder.middle.0", &x);
        x = self.attention(&x);
        x = self.res("decoder.middle.2", &x);
        let mut k = 0;
        for s in 0..self.cfg.stages() {
            for _ in 0..=self.cfg.num_res_blocks {
                x = self.res(&format!("decoder.upsamples.{k}"), &x);
                k += 1;
            }
            if s + 1 < self.cfg.stages() {
                if self.cfg.temporal_upsample[s] {
                    x = self.time_upsample(&format!("decoder.upsamples.{k}.time_conv"), &x);
                }
                x = self.conv(&format!("decoder.upsamples.{k}.resample.1"), &x, true);
                k += 1;
            }
        }
        x = self.norm("decoder.head.0", &x, true);
        self.conv("decoder.head.2", &x, false)
    }
}

/// The GPU decoder streams frame by frame with caches; on a non-square latent with several
/// frames it must equal the whole-sequence reference (CPU, f64) up to f32 rounding.
#[test]
fn streaming_decode_matches_whole_sequence_reference() {
    let g = gpu();
    let path = vae_weights_path();
    let mut dec = VaeDecoder::load(g, &path).unwrap();
    let f = TensorFile::open(&path).unwrap();
    let cpu = CpuVae::from_file(&f, dec.config().clone());
    let mut rng = common::Rng::fresh(0x7ae_0001);
    let zc = dec.config().z_dim;
    let mean = rng.normals(zc, 0.5);
    let std: Vec<f32> = (0..zc).map(|_| 0.5 + rng.uniform() as f32 * 2.0).collect();
    dec.set_latent_stats(&mean, &std).unwrap();
    for latent in [(2, 3, 5), (4, 2, 1), (1, 5, 3)] {
        let (t, h, w) = latent;
        let z = rng.normals(zc * t * h * w, 1.0);
        let got = dec.decode_raw(g, &z, latent).unwrap();
        let (want, shape) = cpu.decode(&z, latent, &mean, &std);
        assert_eq!(
            [shape.0, shape.1, shape.2, shape.3],
            dec.output_shape(latent),
            "{latent:?}: output shape"
        );
        common::assert_close(
            &format!("streamed decode {latent:?} vs whole-sequence reference"),
            &got,
            &want,
            1e-4,
            1e-3,
            1e-5,
        );
    }
}

/// A weights file with a tensor missing, one misshaped and one unknown decoder key is refused
/// with one error naming all three.
#[test]
fn bad_weights_are_reported_in_one_error() {
    use nabla::io::{OwnedTensor, write_safetensors};
    let g = gpu();
    let path = vae_weights_path();
    let f = TensorFile::open(&path).unwrap();
    let names = f.names().unwrap();
    let drop = "decoder.middle.0.residual.6.bias";
    let reshape = names
        .iter()
        .find(|n| n.ends_with(".resample.1.weight"))
        .expect("the weights have a spatial upsample")
        .clone();
    let reshape = reshape.as_str();
    assert!(names.iter().any(|n| n == drop));
    let mut tensors: Vec<OwnedTensor> = Vec::new();
    for n in &names {
        if n == drop {
            continue;
        }
        let r = f.raw(n).unwrap();
        let mut shape = r.shape.clone();
        if n == reshape {
            // same element count, other shape
            let last = shape.len() - 1;
            shape[last - 1] *= shape[last];
            shape[last] = 1;
        }
        tensors.push((n.clone(), r.dtype, shape, r.data.to_vec()));
    }
    tensors.push((
        "decoder.middle.1.extra".into(),
        safetensors::Dtype::F32,
        vec![1],
        vec![0; 4],
    ));
    let out =
        std::env::temp_dir().join(format!("nabla_vae_bad_{}.safetensors", std::process::id()));
    write_safetensors(&out, &tensors, Default::default()).unwrap();
    let err = match VaeDecoder::load(g, &out) {
        Ok(_) => panic!("a broken VAE file was accepted"),
        Err(e) => e.to_string(),
    };
    let _ = std::fs::remove_file(&out);
    eprintln!("{err}");
    for needle in [
        drop,
        reshape,
        "decoder.middle.1.extra",
        "missing",
        "misshaped",
    ] {
        assert!(
            err.contains(needle),
            "error does not mention {needle:?}: {err}"
        );
    }
}

/// The diffusers `AutoencoderKLWan` name of an official decoder key (spec §3.5), written out
/// independently of the loader's translation; `resnets` residual blocks per up block.
fn diffusers_name(k: &str, resnets: usize) -> String {
    let resnet = |inner: &str| -> String {
        for (o, d) in [
            ("residual.0.", "norm1."),
            ("residual.2.", "conv1."),
            ("residual.3.", "norm2."),
            ("residual.6.", "conv2."),
            ("shortcut.", "conv_shortcut."),
        ] {
            if let Some(rest) = inner.strip_prefix(o) {
                return format!("{d}{rest}");
            }
        }
        panic!("unknown residual key {inner}")
    };
    if let Some(r) = k.strip_prefix("conv2.") {
        return format!("post_quant_conv.{r}");
    }
    if let Some(r) = k.strip_prefix("decoder.conv1.") {
        return format!("decoder.conv_in.{r}");
    }
    if let Some(r) = k.strip_prefix("decoder.head.0.") {
        return format!("decoder.norm_out.{r}");
    }
    if let Some(r) = k.strip_prefix("decoder.head.2.") {
        return format!("decoder.conv_out.{r}");
    }
    if let Some(r) = k.strip_prefix("decoder.middle.") {
        let (i, inner) = r.split_once('.').unwrap();
        return match i {
            "0" => format!("decoder.mid_block.resnets.0.{}", resnet(inner)),
            "1" => format!("decoder.mid_block.attentions.0.{inner}"),
            "2" => format!("decoder.mid_block.resnets.1.{}", resnet(inner)),
            _ => panic!("unknown middle key {k}"),
        };
    }
    let r = k.strip_prefix("decoder.upsamples.").expect("decoder key");
    let (i, inner) = r.split_once('.').unwrap();
    let i: usize = i.parse().unwrap();
    let (block, j) = (i / (resnets + 1), i % (resnets + 1));
    if j == resnets {
        format!("decoder.up_blocks.{block}.upsamplers.0.{inner}")
    } else {
        format!("decoder.up_blocks.{block}.resnets.{j}.{}", resnet(inner))
    }
}

/// The same weights under diffusers names (plus encoder keys, which are ignored) decode
/// identically.
#[test]
fn diffusers_names_load_and_decode_identically() {
    use nabla::io::{OwnedTensor, write_safetensors};
    let g = gpu();
    let path = vae_weights_path();
    let dec = VaeDecoder::load(g, &path).unwrap();
    let resnets = dec.config().num_res_blocks + 1;
    let f = TensorFile::open(&path).unwrap();
    let mut tensors: Vec<OwnedTensor> = Vec::new();
    for n in f.names().unwrap() {
        let r = f.raw(&n).unwrap();
        tensors.push((
            diffusers_name(&n, resnets),
            r.dtype,
            r.shape.clone(),
            r.data.to_vec(),
        ));
    }
    for extra in ["encoder.conv_in.weight", "quant_conv.weight"] {
        tensors.push((extra.into(), safetensors::Dtype::F32, vec![2], vec![0; 8]));
    }
    let out = std::env::temp_dir().join(format!(
        "nabla_vae_diffusers_{}.safetensors",
        std::process::id()
    ));
    write_safetensors(&out, &tensors, Default::default()).unwrap();
    let loaded = VaeDecoder::load(g, &out);
    let _ = std::fs::remove_file(&out);
    let dd = loaded.unwrap_or_else(|e| panic!("diffusers-named weights: {e}"));
    assert_eq!(dd.config(), dec.config(), "inferred configuration");
    let mut rng = common::Rng::fresh(0x7ae_0002);
    let latent = (2, 2, 3);
    let z = rng.normals(dec.config().z_dim * 2 * 2 * 3, 1.0);
    let a = dec.decode_raw(g, &z, latent).unwrap();
    let b = dd.decode_raw(g, &z, latent).unwrap();
    assert_eq!(a, b, "official and diffusers names decode differently");
}

/// The decoder at the real Wan 2.1 widths (384-wide middle and attention, 768-channel
/// time_conv, 96-wide last stage) with random weights, loaded from memory, on a tiny latent:
/// streamed GPU decode = whole-sequence CPU reference.
#[test]
fn wan21_widths_match_whole_sequence_reference() {
    let g = gpu();
    let cfg = VaeConfig::wan21();
    let mut rng = common::Rng::fresh(0x7ae_0003);
    let mut tensors = BTreeMap::new();
    for (name, shape) in cfg.expected_tensors() {
        let n: usize = shape.iter().product();
        let v = if name.ends_with(".gamma") {
            rng.normals(n, 0.1).into_iter().map(|x| 1.0 + x).collect()
        } else if name.ends_with(".bias") {
            rng.normals(n, 0.1)
        } else {
            let fan_in: usize = shape[1..].iter().product();
            rng.normals(n, 1.0 / (fan_in as f32).sqrt())
        };
        tensors.insert(name, (v, shape));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (v, s))| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                s.clone(),
                bytemuck::cast_slice(v),
            )
            .unwrap();
            (n.clone(), view)
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    let dec = VaeDecoder::from_bytes(g, &bytes).unwrap();
    assert_eq!(dec.config(), &cfg, "inferred configuration");
    assert_eq!(
        dec.latent_stats(),
        (&WAN21_LATENT_MEAN[..], &WAN21_LATENT_STD[..]),
        "default latent statistics"
    );
    let cpu = CpuVae { tensors, cfg };
    let latent = (2, 1, 2);
    let z = rng.normals(16 * 2 * 2, 1.0);
    let t0 = std::time::Instant::now();
    let got = dec.decode_raw(g, &z, latent).unwrap();
    eprintln!("GPU decode {latent:?} at Wan widths: {:.2?}", t0.elapsed());
    let t0 = std::time::Instant::now();
    let (want, shape) = cpu.decode(&z, latent, &WAN21_LATENT_MEAN, &WAN21_LATENT_STD);
    eprintln!("CPU reference: {:.2?}", t0.elapsed());
    assert_eq!(
        [shape.0, shape.1, shape.2, shape.3],
        dec.output_shape(latent)
    );
    common::assert_close(
        "Wan-width decode vs whole-sequence reference",
        &got,
        &want,
        1e-4,
        1e-3,
        1e-5,
    );
}
