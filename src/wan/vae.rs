//! The Wan 2.1 VAE decoder (spec §7) on the GPU: latent `[16, T, h, w]` → video
//! `[3, 1 + 4(T − 1), 8h, 8w]`.
//!
//! Weights come from a safetensors file with the official key names (`conv2.*`, `decoder.*`)
//! or the diffusers `AutoencoderKLWan` names (translated, spec §3.5); encoder keys are ignored.
//! The configuration ([`VaeConfig`]) is inferred from the tensor shapes, and every missing or
//! misshaped tensor is reported in one error.
//!
//! # Decoding
//!
//! `z·std + mean` per channel (computed as the reference does, `z / (1/std) + mean` in f32),
//! the 1×1×1 `conv2`, then the decoder proper, streamed **one frame at a time at every
//! resolution**: each latent frame goes through `conv1` and the middle block (residual block,
//! per-frame single-head spatial attention, residual block), then each stage's residual
//! blocks and its resample; a temporal upsample turns every frame after the first latent
//! frame into two frames (channels `[0, C)` then `[C, 2C)` of its `time_conv`), and each
//! resulting frame continues through the next stage on its own, depth first, before its
//! successor. Every causal convolution keeps a cache of the last `kt − 1` frames it saw
//! (zeros at the start; the `time_conv` caches start at the second latent frame, which
//! matches the reference skipping it for the first chunk), so the result equals the
//! reference's whole-sequence decode (spec §7.4) while each activation is a single frame.
//! GPU memory is bounded by four frame-sized scratch buffers per resolution, the caches
//! (two frames per causal convolution) and the weights; nothing is allocated per layer.
//!
//! All arithmetic is f32 ([`crate::ops::conv`] documents the kernels). The norm of the VAE is
//! `x / max(‖x‖₂ over channels, 1e-12) · √C · γ`, not the DiT's RMSNorm.

use crate::error::{Error, Result};
use crate::gpu::{Batch, DType, Gpu, Tensor};
use crate::ops::conv::{
    ConvOptions, MAX_ATTENTION_CHANNELS, record_cache_update, record_channel_rms_norm,
    record_conv3d, record_spatial_attention,
};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Per-channel latent mean of Wan 2.1 (spec §7.1): the decode computes `z·std + mean`.
pub const WAN21_LATENT_MEAN: [f32; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
];

/// Per-channel latent standard deviation of Wan 2.1 (spec §7.1).
pub const WAN21_LATENT_STD: [f32; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.9160,
];

/// Hyper-parameters of the Wan VAE decoder (official `WanVAE_` arguments).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaeConfig {
    /// Base width (96 for Wan 2.1).
    pub dim: usize,
    /// Latent channels (16).
    pub z_dim: usize,
    /// Width multipliers of the encoder levels (`[1, 2, 4, 4]`); the decoder walks them in
    /// reverse.
    pub dim_mult: Vec<usize>,
    /// Residual blocks per level in the encoder (2); the decoder has one more per stage.
    pub num_res_blocks: usize,
    /// Per decoder resample (`dim_mult.len() − 1` of them, in decoding order): whether it also
    /// doubles the frames (`[true, true, false]` for Wan 2.1, the reverse of the encoder's
    /// `temperal_downsample`).
    pub temporal_upsample: Vec<bool>,
}

impl VaeConfig {
    /// The Wan 2.1 VAE: dim 96, z_dim 16, dim_mult `[1, 2, 4, 4]`, 2 residual blocks, temporal
    /// upsampling in the first two resamples.
    pub fn wan21() -> VaeConfig {
        VaeConfig {
            dim: 96,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            temporal_upsample: vec![true, true, false],
        }
    }

    /// Checks that the numbers describe a buildable decoder.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::Invalid(format!("VAE config {self:?}: {why}")));
        if self.dim == 0 || self.z_dim == 0 || self.dim_mult.is_empty() {
            return bad("dim, z_dim and dim_mult must be non-empty / positive".into());
        }
        if self.dim_mult.contains(&0) {
            return bad("dim_mult entries must be positive".into());
        }
        if self.temporal_upsample.len() + 1 != self.dim_mult.len() {
            return bad(format!(
                "temporal_upsample needs {} entries (one per resample)",
                self.dim_mult.len() - 1
            ));
        }
        let dims = self.decoder_dims();
        for (i, d) in dims
            .iter()
            .enumerate()
            .skip(1)
            .take(self.dim_mult.len() - 1)
        {
            if d % 2 != 0 {
                return bad(format!(
                    "stage {} width {d} must be even (its resample halves it)",
                    i - 1
                ));
            }
        }
        if dims[0] > MAX_ATTENTION_CHANNELS {
            return bad(format!(
                "middle width {} exceeds the attention kernel's {MAX_ATTENTION_CHANNELS}",
                dims[0]
            ));
        }
        Ok(())
    }

    /// Widths `[dim·m_last, dim·m_last, …, dim·m_0]` (the reference's `dims`): entry 0 is the
    /// middle block, entry `i + 1` the output of decoder stage `i`.
    pub fn decoder_dims(&self) -> Vec<usize> {
        let mut m = vec![*self.dim_mult.last().unwrap_or(&1)];
        m.extend(self.dim_mult.iter().rev());
        m.iter().map(|u| u * self.dim).collect()
    }

    /// Number of decoder stages (`dim_mult.len()`).
    pub fn stages(&self) -> usize {
        self.dim_mult.len()
    }

    /// Frames per latent frame after the first: `2^(temporal upsamples)` (4 for Wan 2.1).
    pub fn temporal_factor(&self) -> usize {
        1 << self.temporal_upsample.iter().filter(|&&t| t).count()
    }

    /// Spatial enlargement `2^(stages − 1)` (8 for Wan 2.1).
    pub fn spatial_factor(&self) -> usize {
        1 << (self.dim_mult.len() - 1)
    }

    /// The decoded video shape `[3, 1 + factor·(T − 1), 8h, 8w]` of a latent `(T, h, w)`.
    pub fn output_shape(&self, latent: (usize, usize, usize)) -> [usize; 4] {
        let (t, h, w) = latent;
        let s = self.spatial_factor();
        [
            3,
            1 + self.temporal_factor() * t.saturating_sub(1),
            h * s,
            w * s,
        ]
    }

    /// Every tensor the decoder reads, with its shape, under the official names.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = Vec::new();
        let z = self.z_dim;
        let dims = self.decoder_dims();
        let conv = |v: &mut Vec<(String, Vec<usize>)>, name: &str, shape: Vec<usize>| {
            v.push((format!("{name}.bias"), vec![shape[0]]));
            v.push((format!("{name}.weight"), shape));
        };
        let res = |v: &mut Vec<(String, Vec<usize>)>, p: &str, i: usize, o: usize| {
            v.push((format!("{p}.residual.0.gamma"), vec![i, 1, 1, 1]));
            conv(v, &format!("{p}.residual.2"), vec![o, i, 3, 3, 3]);
            v.push((format!("{p}.residual.3.gamma"), vec![o, 1, 1, 1]));
            conv(v, &format!("{p}.residual.6"), vec![o, o, 3, 3, 3]);
            if i != o {
                conv(v, &format!("{p}.shortcut"), vec![o, i, 1, 1, 1]);
            }
        };
        conv(&mut v, "conv2", vec![z, z, 1, 1, 1]);
        conv(&mut v, "decoder.conv1", vec![dims[0], z, 3, 3, 3]);
        let d0 = dims[0];
        res(&mut v, "decoder.middle.0", d0, d0);
        v.push(("decoder.middle.1.norm.gamma".into(), vec![d0, 1, 1]));
        conv(&mut v, "decoder.middle.1.to_qkv", vec![3 * d0, d0, 1, 1]);
        conv(&mut v, "decoder.middle.1.proj", vec![d0, d0, 1, 1]);
        res(&mut v, "decoder.middle.2", d0, d0);
        let mut k = 0;
        for s in 0..self.stages() {
            let mut cin = if s == 0 { dims[0] } else { dims[s] / 2 };
            let out = dims[s + 1];
            for _ in 0..=self.num_res_blocks {
                res(&mut v, &format!("decoder.upsamples.{k}"), cin, out);
                cin = out;
                k += 1;
            }
            if s + 1 < self.stages() {
                if self.temporal_upsample[s] {
                    conv(
                        &mut v,
                        &format!("decoder.upsamples.{k}.time_conv"),
                        vec![2 * out, out, 3, 1, 1],
                    );
                }
                conv(
                    &mut v,
                    &format!("decoder.upsamples.{k}.resample.1"),
                    vec![out / 2, out, 3, 3],
                );
                k += 1;
            }
        }
        let last = dims[self.stages()];
        v.push(("decoder.head.0.gamma".into(), vec![last, 1, 1, 1]));
        conv(&mut v, "decoder.head.2", vec![3, last, 3, 3, 3]);
        v
    }

    /// Infers the configuration from tensor shapes (official names). `dim` is taken as the
    /// greatest common divisor of the widths, so `dim_mult` is the smallest integer set.
    pub fn infer(shapes: &BTreeMap<String, Vec<usize>>) -> Result<VaeConfig> {
        // the first dimension `axis` of the first of `keys` present
        let first = |keys: &[String], axis: usize| -> Result<usize> {
            keys.iter()
                .find_map(|k| shapes.get(k).and_then(|s| s.get(axis).copied()))
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "VAE weights have none of {keys:?}, needed to infer the configuration \
                         (official or diffusers key names expected)"
                    ))
                })
        };
        let z_dim = shapes
            .get("conv2.weight")
            .and_then(|s| s.first().copied())
            .or_else(|| {
                shapes
                    .get("decoder.conv1.weight")
                    .and_then(|s| s.get(1).copied())
            })
            .ok_or_else(|| {
                Error::Invalid(
                    "VAE weights have neither conv2.weight nor decoder.conv1.weight (diffusers: \
                     post_quant_conv.weight, decoder.conv_in.weight), needed to infer z_dim"
                        .into(),
                )
            })?;
        let d0 = first(
            &[
                "decoder.conv1.weight".into(),
                "decoder.middle.0.residual.2.weight".into(),
            ],
            0,
        )?;
        let mut n_up = 0usize;
        for k in shapes.keys() {
            if let Some(rest) = k.strip_prefix("decoder.upsamples.")
                && let Some((i, _)) = rest.split_once('.')
                && let Ok(i) = i.parse::<usize>()
            {
                n_up = n_up.max(i + 1);
            }
        }
        let is_resample = |i: usize| {
            ["resample.1.weight", "resample.1.bias", "time_conv.weight"]
                .iter()
                .any(|t| shapes.contains_key(&format!("decoder.upsamples.{i}.{t}")))
        };
        let resamples: Vec<usize> = (0..n_up).filter(|&i| is_resample(i)).collect();
        let per_stage = match resamples.first() {
            Some(&r) => r,
            None => n_up,
        };
        let stages = resamples.len() + 1;
        let consistent = per_stage > 0
            && n_up == stages * per_stage + resamples.len()
            && resamples
                .iter()
                .enumerate()
                .all(|(i, &r)| r == (per_stage + 1) * i + per_stage);
        if !consistent {
            return Err(Error::Invalid(format!(
                "VAE weights: decoder.upsamples has {n_up} entries with resamples at {resamples:?}; \
                 expected stages of equally many residual blocks, each but the last followed by \
                 one resample"
            )));
        }
        let mut outs = Vec::with_capacity(stages);
        for s in 0..stages {
            let p = format!("decoder.upsamples.{}.residual", (per_stage + 1) * s);
            let keys = [
                format!("{p}.2.weight"),
                format!("{p}.6.weight"),
                format!("{p}.3.gamma"),
            ];
            outs.push(first(&keys, 0)?);
        }
        let temporal_upsample = resamples
            .iter()
            .map(|r| shapes.contains_key(&format!("decoder.upsamples.{r}.time_conv.weight")))
            .collect();
        let gcd = |mut a: usize, mut b: usize| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let dim = outs.iter().fold(d0, |g, &o| gcd(g, o));
        if dim == 0 || z_dim == 0 {
            return Err(Error::Invalid(
                "VAE weights: zero-sized conv2 or decoder tensors".into(),
            ));
        }
        let dim_mult = outs.iter().rev().map(|o| o / dim).collect();
        Ok(VaeConfig {
            dim,
            z_dim,
            dim_mult,
            num_res_blocks: per_stage - 1,
            temporal_upsample,
        })
    }
}

/// A convolution's weights on the GPU.
struct Conv {
    w: Tensor,
    b: Tensor,
    /// Index of its causal cache (kernels with kt > 1).
    cache: Option<usize>,
    /// Frames the cache holds (kt − 1).
    frames: usize,
}

/// A VAE RMS norm's γ (and β, when the weights have one), `[C]`.
struct Norm {
    gamma: Tensor,
    beta: Option<Tensor>,
}

struct ResBlock {
    cin: usize,
    cout: usize,
    norm1: Norm,
    conv1: Conv,
    norm2: Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

struct Attn {
    c: usize,
    norm: Norm,
    qkv: Conv,
    proj: Conv,
}

struct Resample {
    /// Channels in (the stage's width); the spatial conv gives half.
    c: usize,
    time_conv: Option<Conv>,
    conv: Conv,
}

struct Stage {
    blocks: Vec<ResBlock>,
    resample: Option<Resample>,
}

/// The Wan VAE decoder with its weights on the GPU.
pub struct VaeDecoder {
    config: VaeConfig,
    mean: Vec<f32>,
    std: Vec<f32>,
    conv2: Conv,
    conv1: Conv,
    mid0: ResBlock,
    attn: Attn,
    mid2: ResBlock,
    stages: Vec<Stage>,
    head_norm: Norm,
    head: Conv,
    caches: usize,
}

/// Reads the float tensors of a safetensors view as f32, by official name.
struct Source<'a> {
    st: SafeTensors<'a>,
    path: PathBuf,
    /// Official name → name stored in the file.
    names: BTreeMap<String, String>,
}

impl Source<'_> {
    fn view(&self, name: &str) -> Result<safetensors::tensor::TensorView<'_>> {
        let stored = self.names.get(name).map_or(name, String::as_str);
        self.st
            .tensor(stored)
            .map_err(|e| Error::file(&self.path, format!("tensor {stored:?}: {e}")))
    }

    fn has(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.view(name)?.shape().to_vec())
    }

    fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.view(name)?;
        let b = t.data();
        Ok(match crate::io::float_to_f32(t.dtype(), b) {
            Some(v) => v,
            None => {
                let d = t.dtype();
                return Err(Error::file(
                    &self.path,
                    format!("tensor {name:?} has dtype {d:?}; F32, F16, BF16 or F64 expected"),
                ));
            }
        })
    }
}

/// The official name of a VAE decoder key (spec §3.5): official names are returned as they
/// are, diffusers `AutoencoderKLWan` names (`post_quant_conv.*`, `decoder.conv_in.*`,
/// `decoder.mid_block.*`, `decoder.up_blocks.*`, `decoder.norm_out.*`, `decoder.conv_out.*`)
/// are translated, with `resnets` residual blocks per diffusers up block (3 for Wan 2.1).
/// Keys outside the decoder (the encoder, `quant_conv`/`conv1`) give `None`.
pub fn official_vae_name(key: &str, resnets: usize) -> Option<String> {
    const OFFICIAL: [&str; 5] = [
        "conv2.",
        "decoder.conv1.",
        "decoder.middle.",
        "decoder.upsamples.",
        "decoder.head.",
    ];
    if OFFICIAL.iter().any(|p| key.starts_with(p)) {
        return Some(key.to_string());
    }
    fn resnet(inner: &str) -> String {
        const MAP: [(&str, &str); 5] = [
            ("norm1.", "residual.0."),
            ("conv1.", "residual.2."),
            ("norm2.", "residual.3."),
            ("conv2.", "residual.6."),
            ("conv_shortcut.", "shortcut."),
        ];
        for (d, o) in MAP {
            if let Some(rest) = inner.strip_prefix(d) {
                return format!("{o}{rest}");
            }
        }
        inner.to_string()
    }
    let split = |s: &str| -> Option<(usize, String)> {
        let (i, rest) = s.split_once('.')?;
        Some((i.parse().ok()?, rest.to_string()))
    };
    if let Some(rest) = key.strip_prefix("post_quant_conv.") {
        return Some(format!("conv2.{rest}"));
    }
    let d = key.strip_prefix("decoder.")?;
    for (dp, op) in [
        ("conv_in.", "conv1."),
        ("norm_out.", "head.0."),
        ("conv_out.", "head.2."),
    ] {
        if let Some(rest) = d.strip_prefix(dp) {
            return Some(format!("decoder.{op}{rest}"));
        }
    }
    if let Some(r) = d.strip_prefix("mid_block.resnets.") {
        let (i, inner) = split(r)?;
        return Some(format!("decoder.middle.{}.{}", 2 * i, resnet(&inner)));
    }
    if let Some(r) = d.strip_prefix("mid_block.attentions.") {
        let (i, inner) = split(r)?;
        return Some(format!("decoder.middle.{}.{inner}", 2 * i + 1));
    }
    if let Some(r) = d.strip_prefix("up_blocks.") {
        let (i, inner) = split(r)?;
        let base = i * (resnets + 1);
        if let Some(r) = inner.strip_prefix("resnets.") {
            let (j, inner) = split(r)?;
            return Some(format!("decoder.upsamples.{}.{}", base + j, resnet(&inner)));
        }
        if let Some(r) = inner.strip_prefix("upsamplers.0.") {
            return Some(format!("decoder.upsamples.{}.{r}", base + resnets));
        }
        return Some(format!("decoder.upsamples.{base}.{inner}"));
    }
    None
}

/// Residual blocks per diffusers up block: the number of `decoder.up_blocks.0.resnets.{j}`.
fn diffusers_resnets<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    names
        .filter_map(|k| k.strip_prefix("decoder.up_blocks.0.resnets."))
        .filter_map(|r| r.split_once('.').and_then(|(j, _)| j.parse::<usize>().ok()))
        .map(|j| j + 1)
        .max()
        .unwrap_or(0)
}

/// Builds the GPU weights, numbering the causal caches.
struct Loader<'a, 'g> {
    gpu: &'g Gpu,
    src: &'a Source<'a>,
    caches: usize,
}

impl Loader<'_, '_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.gpu.upload_f32(&self.src.f32(name)?, shape)
    }

    fn conv(&mut self, name: &str) -> Result<Conv> {
        let shape = self.src.shape(&format!("{name}.weight"))?;
        let kt = if shape.len() == 5 { shape[2] } else { 1 };
        let cache = (kt > 1).then(|| {
            self.caches += 1;
            self.caches - 1
        });
        Ok(Conv {
            w: self.tensor(&format!("{name}.weight"), &shape)?,
            b: self.tensor(&format!("{name}.bias"), &[shape[0]])?,
            cache,
            frames: kt - 1,
        })
    }

    fn norm(&self, name: &str, c: usize) -> Result<Norm> {
        let bias = format!("{name}.bias");
        let beta = if self.src.has(&bias) {
            Some(self.tensor(&bias, &[c])?)
        } else {
            None
        };
        Ok(Norm {
            gamma: self.tensor(&format!("{name}.gamma"), &[c])?,
            beta,
        })
    }

    fn res(&mut self, p: &str, cin: usize, cout: usize) -> Result<ResBlock> {
        Ok(ResBlock {
            cin,
            cout,
            norm1: self.norm(&format!("{p}.residual.0"), cin)?,
            conv1: self.conv(&format!("{p}.residual.2"))?,
            norm2: self.norm(&format!("{p}.residual.3"), cout)?,
            conv2: self.conv(&format!("{p}.residual.6"))?,
            shortcut: if cin != cout {
                Some(self.conv(&format!("{p}.shortcut"))?)
            } else {
                None
            },
        })
    }
}

/// The optional norm biases a checkpoint may carry (`RMS_norm(bias=True)`), by gamma name.
fn norm_bias_names(cfg: &VaeConfig) -> Vec<(String, usize)> {
    cfg.expected_tensors()
        .into_iter()
        .filter_map(|(n, s)| {
            n.strip_suffix(".gamma")
                .map(|p| (format!("{p}.bias"), s[0]))
        })
        .collect()
}

/// Checks every expected tensor (presence, shape, float dtype) and lists all problems at once.
fn verify(
    path: &Path,
    cfg: &VaeConfig,
    shapes: &BTreeMap<String, Vec<usize>>,
    dtypes: &BTreeMap<String, Dtype>,
) -> Result<()> {
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    let mut bad_dtype = Vec::new();
    let expected = cfg.expected_tensors();
    for (name, shape) in &expected {
        match shapes.get(name) {
            None => missing.push(format!("{name} {shape:?}")),
            Some(s) if s != shape => misshaped.push(format!("{name} is {s:?}, expected {shape:?}")),
            Some(_) => {}
        }
    }
    let biases = norm_bias_names(cfg);
    for (name, c) in &biases {
        if let Some(s) = shapes.get(name)
            && s.iter().product::<usize>() != *c
        {
            misshaped.push(format!("{name} is {s:?}, expected {c} values"));
        }
    }
    let known: std::collections::HashSet<&str> = expected
        .iter()
        .map(|(n, _)| n.as_str())
        .chain(biases.iter().map(|(n, _)| n.as_str()))
        .collect();
    let unexpected: Vec<&str> = shapes
        .keys()
        .filter(|k| {
            (k.starts_with("decoder.") || k.starts_with("conv2.")) && !known.contains(k.as_str())
        })
        .map(String::as_str)
        .collect();
    for (name, dt) in dtypes {
        if known.contains(name.as_str()) && !matches!(dt, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            bad_dtype.push(format!("{name} ({dt:?})"));
        }
    }
    if missing.is_empty() && misshaped.is_empty() && unexpected.is_empty() && bad_dtype.is_empty() {
        return Ok(());
    }
    let mut msg = format!(
        "not a Wan VAE decoder with the inferred configuration {cfg:?} (names below in the \
         official scheme; diffusers names are translated):"
    );
    for (what, list) in [
        ("missing", missing),
        ("misshaped", misshaped),
        (
            "unexpected decoder tensors",
            unexpected.iter().map(|s| s.to_string()).collect(),
        ),
        ("not F32/F16/BF16", bad_dtype),
    ] {
        if !list.is_empty() {
            msg += &format!(" {what} ({}): {};", list.len(), list.join(", "));
        }
    }
    Err(Error::file(path, msg.trim_end_matches(';')))
}

/// Scratch buffers of one resolution: four frame-sized buffers of `cap` channels.
struct Level {
    h: usize,
    w: usize,
    bufs: Vec<Tensor>,
}

/// Per-decode state: scratch per resolution, the qkv buffer, the causal caches.
struct State<'g> {
    gpu: &'g Gpu,
    levels: Vec<Level>,
    qkv: Tensor,
    caches: Vec<Option<Tensor>>,
}

impl State<'_> {
    /// Buffer `i` of `level` seen as one frame `[c, 1, h, w]`.
    fn view(&self, level: usize, i: usize, c: usize) -> Tensor {
        let l = &self.levels[level];
        Tensor::new(l.bufs[i].buffer.clone(), vec![c, 1, l.h, l.w], DType::F32)
    }

    /// The cache of `conv` for input frames `[c, 1, h, w]`, created with zeros on first use
    /// (wgpu zero-initializes new buffers).
    fn cache(&mut self, conv: &Conv, c: usize, h: usize, w: usize) -> Result<Option<Tensor>> {
        let Some(id) = conv.cache else {
            return Ok(None);
        };
        if self.caches[id].is_none() {
            let t = self.gpu.empty(&[c, conv.frames, h, w], DType::F32)?;
            self.caches[id] = Some(t);
        }
        Ok(self.caches[id].clone())
    }
}

/// Buffers of a level other than `used`, in order.
fn free(used: &[usize]) -> Vec<usize> {
    (0..4).filter(|i| !used.contains(i)).collect()
}

impl VaeDecoder {
    /// Loads a decoder from a safetensors file and uploads its weights (as f32) to `gpu`. Keys
    /// are the official ones (`conv2.*`, `decoder.*`) or diffusers `AutoencoderKLWan` names
    /// ([`official_vae_name`]); other keys, such as the encoder's, are ignored. The configuration is inferred from the shapes; every missing,
    /// misshaped or unexpected decoder tensor is reported in one error. The latent statistics
    /// default to Wan 2.1's ([`WAN21_LATENT_MEAN`], [`WAN21_LATENT_STD`]) when `z_dim` is 16,
    /// else to mean 0, std 1 ([`VaeDecoder::set_latent_stats`] changes them).
    pub fn load(gpu: &Gpu, path: impl AsRef<Path>) -> Result<VaeDecoder> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
        // SAFETY: read-only mapping; a file changed underneath the process is outside what a
        // loader can defend against (as for the DiT checkpoints).
        let mm = unsafe { Mmap::map(&file) }.map_err(|e| Error::file(path, e))?;
        Self::parse(gpu, &mm, path)
    }

    /// [`VaeDecoder::load`] from the bytes of a safetensors file held in memory.
    pub fn from_bytes(gpu: &Gpu, bytes: &[u8]) -> Result<VaeDecoder> {
        Self::parse(gpu, bytes, Path::new("<safetensors bytes>"))
    }

    fn parse(gpu: &Gpu, bytes: &[u8], path: &Path) -> Result<VaeDecoder> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
        let resnets = diffusers_resnets(st.names().into_iter());
        let mut shapes = BTreeMap::new();
        let mut dtypes = BTreeMap::new();
        let mut names = BTreeMap::new();
        for (stored, view) in st.tensors() {
            let Some(name) = official_vae_name(&stored, resnets) else {
                continue;
            };
            shapes.insert(name.clone(), view.shape().to_vec());
            dtypes.insert(name.clone(), view.dtype());
            names.insert(name, stored);
        }
        let config = VaeConfig::infer(&shapes).map_err(|e| Error::file(path, e))?;
        config.validate().map_err(|e| Error::file(path, e))?;
        verify(path, &config, &shapes, &dtypes)?;
        let src = Source {
            st,
            path: path.to_path_buf(),
            names,
        };
        Self::build(gpu, config, &src)
    }

    fn build(gpu: &Gpu, config: VaeConfig, src: &Source<'_>) -> Result<VaeDecoder> {
        let mut ld = Loader {
            gpu,
            src,
            caches: 0,
        };
        let dims = config.decoder_dims();
        let d0 = dims[0];
        let conv2 = ld.conv("conv2")?;
        let conv1 = ld.conv("decoder.conv1")?;
        let mid0 = ld.res("decoder.middle.0", d0, d0)?;
        let attn = Attn {
            c: d0,
            norm: ld.norm("decoder.middle.1.norm", d0)?,
            qkv: ld.conv("decoder.middle.1.to_qkv")?,
            proj: ld.conv("decoder.middle.1.proj")?,
        };
        let mid2 = ld.res("decoder.middle.2", d0, d0)?;
        let mut stages = Vec::new();
        let mut k = 0;
        for s in 0..config.stages() {
            let mut cin = if s == 0 { d0 } else { dims[s] / 2 };
            let out = dims[s + 1];
            let mut blocks = Vec::new();
            for _ in 0..=config.num_res_blocks {
                blocks.push(ld.res(&format!("decoder.upsamples.{k}"), cin, out)?);
                cin = out;
                k += 1;
            }
            let resample = if s + 1 < config.stages() {
                let time_conv = if config.temporal_upsample[s] {
                    Some(ld.conv(&format!("decoder.upsamples.{k}.time_conv"))?)
                } else {
                    None
                };
                let conv = ld.conv(&format!("decoder.upsamples.{k}.resample.1"))?;
                k += 1;
                Some(Resample {
                    c: out,
                    time_conv,
                    conv,
                })
            } else {
                None
            };
            stages.push(Stage { blocks, resample });
        }
        let last = dims[config.stages()];
        let head_norm = ld.norm("decoder.head.0", last)?;
        let head = ld.conv("decoder.head.2")?;
        let caches = ld.caches;
        let (mean, std) = if config.z_dim == 16 {
            (WAN21_LATENT_MEAN.to_vec(), WAN21_LATENT_STD.to_vec())
        } else {
            (vec![0.0; config.z_dim], vec![1.0; config.z_dim])
        };
        Ok(VaeDecoder {
            config,
            mean,
            std,
            conv2,
            conv1,
            mid0,
            attn,
            mid2,
            stages,
            head_norm,
            head,
            caches,
        })
    }

    /// The configuration inferred from the weights.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The per-channel latent statistics `(mean, std)` the decode uses.
    pub fn latent_stats(&self) -> (&[f32], &[f32]) {
        (&self.mean, &self.std)
    }

    /// Sets the per-channel latent statistics (`z_dim` values each, std non-zero).
    pub fn set_latent_stats(&mut self, mean: &[f32], std: &[f32]) -> Result<()> {
        let z = self.config.z_dim;
        if mean.len() != z || std.len() != z {
            return Err(Error::shape(format!(
                "latent mean ({}) and std ({}) must have z_dim = {z} values",
                mean.len(),
                std.len()
            )));
        }
        if std.iter().any(|&s| s == 0.0 || !s.is_finite()) || mean.iter().any(|m| !m.is_finite()) {
            return Err(Error::Invalid(
                "latent std must be finite and non-zero, mean finite".into(),
            ));
        }
        self.mean = mean.to_vec();
        self.std = std.to_vec();
        Ok(())
    }

    /// The video shape `[3, F, H, W]` decoded from a latent `(T, h, w)`.
    pub fn output_shape(&self, latent: (usize, usize, usize)) -> [usize; 4] {
        self.config.output_shape(latent)
    }

    /// Decodes a normalized latent `z` `[z_dim, T, h, w]` (what the DiT produces; `latent` =
    /// `(T, h, w)`) into the video `[3, 1 + 4(T − 1), 8h, 8w]` clamped to `[−1, 1]` (what the
    /// pipeline returns). See [`VaeDecoder::decode_raw`] for the unclamped values.
    pub fn decode(&self, gpu: &Gpu, z: &[f32], latent: (usize, usize, usize)) -> Result<Vec<f32>> {
        let mut v = self.decode_raw(gpu, z, latent)?;
        clamp_video(&mut v);
        Ok(v)
    }

    /// Decodes `z` `[z_dim, T, h, w]` into the unclamped decoder output `[3, F, H, W]`.
    pub fn decode_raw(
        &self,
        gpu: &Gpu,
        z: &[f32],
        latent: (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let [c, f, h, w] = self.output_shape(latent);
        let plane = h * w;
        let mut video = vec![0f32; c * f * plane];
        self.decode_frames(gpu, z, latent, |i, frame| {
            for ch in 0..c {
                video[(ch * f + i) * plane..(ch * f + i + 1) * plane]
                    .copy_from_slice(&frame[ch * plane..(ch + 1) * plane]);
            }
            Ok(())
        })?;
        Ok(video)
    }

    /// Decodes `z` `[z_dim, T, h, w]` and hands each output frame `[3, H, W]` (unclamped) to
    /// `on_frame(index, frame)` as soon as it is read back, in order: the whole video never
    /// has to be held in memory.
    pub fn decode_frames(
        &self,
        gpu: &Gpu,
        z: &[f32],
        latent: (usize, usize, usize),
        mut on_frame: impl FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let (t, h, w) = latent;
        let zc = self.config.z_dim;
        if t == 0 || h == 0 || w == 0 {
            return Err(Error::shape(format!(
                "VAE decode: latent (T, h, w) = {latent:?} must be non-empty"
            )));
        }
        if z.len() != zc * t * h * w {
            return Err(Error::shape(format!(
                "VAE decode: z has {} values, expected [{zc}, {t}, {h}, {w}] = {}",
                z.len(),
                zc * t * h * w
            )));
        }
        let mut st = self.state(gpu, h, w)?;
        let inv: Vec<f32> = self.std.iter().map(|s| 1.0 / s).collect();
        let plane = h * w;
        let mut produced = 0usize;
        for i in 0..t {
            // z / (1/std) + mean, as the reference computes it, for latent frame i
            let mut frame = Vec::with_capacity(zc * plane);
            for c in 0..zc {
                let row = &z[(c * t + i) * plane..(c * t + i + 1) * plane];
                frame.extend(row.iter().map(|&v| v / inv[c] + self.mean[c]));
            }
            let x = gpu.upload_f32(&frame, &[zc, 1, h, w])?;
            let mut outs = Vec::new();
            let mut b = gpu.batch();
            self.latent_frame(&mut b, &mut st, &x, i == 0, &mut outs)?;
            b.submit()?;
            for o in outs {
                let data = gpu.read_f32(&o)?;
                on_frame(produced, &data)?;
                produced += 1;
            }
        }
        Ok(())
    }

    /// Allocates the scratch buffers for a latent of `h × w` pixels.
    fn state<'g>(&self, gpu: &'g Gpu, h: usize, w: usize) -> Result<State<'g>> {
        let dims = self.config.decoder_dims();
        let n = self.config.stages();
        let mut levels = Vec::with_capacity(n);
        for s in 0..n {
            let cin = if s == 0 { dims[0] } else { dims[s] / 2 };
            let mut cap = cin.max(dims[s + 1]);
            if s == 0 {
                cap = cap.max(self.config.z_dim);
            }
            let (lh, lw) = (h << s, w << s);
            // every op binds the whole scratch buffer, so it must fit one binding
            gpu.check_binding(
                &format!("VAE scratch frame [{cap}, 1, {lh}, {lw}]"),
                (cap * lh * lw * 4) as u64,
            )?;
            let bufs = (0..4)
                .map(|_| gpu.empty(&[cap * lh * lw], DType::F32))
                .collect::<Result<Vec<_>>>()?;
            levels.push(Level { h: lh, w: lw, bufs });
        }
        let qkv = gpu.empty(&[3 * dims[0], 1, h, w], DType::F32)?;
        Ok(State {
            gpu,
            levels,
            qkv,
            caches: vec![None; self.caches],
        })
    }

    /// Records `out = conv(x) (+ residual)` with the conv's cache (read, then updated with x).
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &self,
        b: &mut Batch<'_>,
        st: &mut State<'_>,
        conv: &Conv,
        x: &Tensor,
        out: &Tensor,
        residual: Option<&Tensor>,
        upsample: bool,
        out_channel_offset: usize,
    ) -> Result<()> {
        let s = x.shape();
        let cache = st.cache(conv, s[0], s[2], s[3])?;
        let opts = ConvOptions {
            cache: cache.as_ref(),
            bias: Some(&conv.b),
            residual,
            upsample,
            out_channel_offset,
        };
        record_conv3d(b, x, &conv.w, out, &opts)
    }

    /// Records the cache update of `conv` after it has seen `x`.
    fn update(&self, b: &mut Batch<'_>, st: &mut State<'_>, conv: &Conv, x: &Tensor) -> Result<()> {
        let s = x.shape();
        if let Some(c) = st.cache(conv, s[0], s[2], s[3])? {
            record_cache_update(b, &c, x)?;
        }
        Ok(())
    }

    fn norm(
        &self,
        b: &mut Batch<'_>,
        n: &Norm,
        x: &Tensor,
        silu: bool,
        out: &Tensor,
    ) -> Result<()> {
        record_channel_rms_norm(b, x, &n.gamma, n.beta.as_ref(), silu, out)
    }

    /// A residual block on the frame in buffer `x` of `level`; returns the output's buffer.
    fn res_block(
        &self,
        b: &mut Batch<'_>,
        st: &mut State<'_>,
        level: usize,
        blk: &ResBlock,
        x: usize,
    ) -> Result<usize> {
        let f = free(&[x]);
        let (ia, ib, ic) = (f[0], f[1], f[2]);
        let xin = st.view(level, x, blk.cin);
        let a = st.view(level, ia, blk.cin);
        self.norm(b, &blk.norm1, &xin, true, &a)?;
        let y = st.view(level, ib, blk.cout);
        self.conv(b, st, &blk.conv1, &a, &y, None, false, 0)?;
        self.update(b, st, &blk.conv1, &a)?;
        let a2 = st.view(level, ia, blk.cout);
        self.norm(b, &blk.norm2, &y, true, &a2)?;
        let h = match &blk.shortcut {
            Some(sc) => {
                let t = st.view(level, ic, blk.cout);
                self.conv(b, st, sc, &xin, &t, None, false, 0)?;
                t
            }
            None => xin,
        };
        self.conv(b, st, &blk.conv2, &a2, &y, Some(&h), false, 0)?;
        self.update(b, st, &blk.conv2, &a2)?;
        Ok(ib)
    }

    /// The middle attention block on buffer `x` of level 0; returns the output's buffer.
    fn attention(&self, b: &mut Batch<'_>, st: &mut State<'_>, x: usize) -> Result<usize> {
        let f = free(&[x]);
        let c = self.attn.c;
        let xin = st.view(0, x, c);
        let u = st.view(0, f[0], c);
        self.norm(b, &self.attn.norm, &xin, false, &u)?;
        let qkv = st.qkv.clone();
        self.conv(b, st, &self.attn.qkv, &u, &qkv, None, false, 0)?;
        record_spatial_attention(b, &qkv, &u)?;
        let out = st.view(0, f[1], c);
        self.conv(b, st, &self.attn.proj, &u, &out, Some(&xin), false, 0)?;
        Ok(f[1])
    }

    /// One latent frame (already de-normalized, `[z_dim, 1, h, w]`) through the decoder;
    /// the output frames' tensors are appended to `outs`.
    fn latent_frame(
        &self,
        b: &mut Batch<'_>,
        st: &mut State<'_>,
        z: &Tensor,
        first: bool,
        outs: &mut Vec<Tensor>,
    ) -> Result<()> {
        let zc = self.config.z_dim;
        let d0 = self.config.decoder_dims()[0];
        let x0 = st.view(0, 0, zc);
        self.conv(b, st, &self.conv2, z, &x0, None, false, 0)?;
        let x1 = st.view(0, 1, d0);
        self.conv(b, st, &self.conv1, &x0, &x1, None, false, 0)?;
        self.update(b, st, &self.conv1, &x0)?;
        let mut cur = self.res_block(b, st, 0, &self.mid0, 1)?;
        cur = self.attention(b, st, cur)?;
        cur = self.res_block(b, st, 0, &self.mid2, cur)?;
        self.stage(b, st, 0, cur, first, outs)
    }

    /// Stage `s` on the frame in buffer `x` of level `s`, then (recursively) the rest of the
    /// decoder on each frame its resample produces.
    fn stage(
        &self,
        b: &mut Batch<'_>,
        st: &mut State<'_>,
        s: usize,
        x: usize,
        first: bool,
        outs: &mut Vec<Tensor>,
    ) -> Result<()> {
        let stage = &self.stages[s];
        let mut cur = x;
        for blk in &stage.blocks {
            cur = self.res_block(b, st, s, blk, cur)?;
        }
        let Some(rs) = &stage.resample else {
            return self.head(b, st, s, cur, outs);
        };
        let c = rs.c;
        let frames = match &rs.time_conv {
            Some(tc) if !first => {
                let f = free(&[cur]);
                let xin = st.view(s, cur, c);
                for (k, &buf) in f[..2].iter().enumerate() {
                    let o = st.view(s, buf, c);
                    self.conv(b, st, tc, &xin, &o, None, false, k * c)?;
                }
                self.update(b, st, tc, &xin)?;
                vec![f[0], f[1]]
            }
            _ => vec![cur],
        };
        for fb in frames {
            let xin = st.view(s, fb, c);
            let up = st.view(s + 1, 0, c / 2);
            self.conv(b, st, &rs.conv, &xin, &up, None, true, 0)?;
            self.stage(b, st, s + 1, 0, first, outs)?;
        }
        Ok(())
    }

    /// The head on buffer `x` of the last level: norm, SiLU, conv to 3 channels into a new
    /// output frame.
    fn head(
        &self,
        b: &mut Batch<'_>,
        st: &mut State<'_>,
        level: usize,
        x: usize,
        outs: &mut Vec<Tensor>,
    ) -> Result<()> {
        let c = self.config.decoder_dims()[self.config.stages()];
        let f = free(&[x]);
        let xin = st.view(level, x, c);
        let a = st.view(level, f[0], c);
        self.norm(b, &self.head_norm, &xin, true, &a)?;
        let (h, w) = (st.levels[level].h, st.levels[level].w);
        let out = st.gpu.empty(&[3, 1, h, w], DType::F32)?;
        self.conv(b, st, &self.head, &a, &out, None, false, 0)?;
        self.update(b, st, &self.head, &a)?;
        outs.push(out);
        Ok(())
    }
}

/// Clamps decoded values to `[−1, 1]` in place (the pipeline's final step; NaN stays NaN).
pub fn clamp_video(v: &mut [f32]) {
    for x in v {
        *x = x.clamp(-1.0, 1.0);
    }
}
