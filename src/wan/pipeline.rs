//! The whole text-to-video pipeline (spec §1, §5): tokenizer → umT5 encoder → flow-matching
//! sampler with classifier-free guidance over the DiT (dense or NABLA / STA sparse) → VAE
//! decoder, built once and run many times.
//!
//! ```text
//! prompt, negative prompt ─ T5Tokenizer ─ T5Encoder ─► ctx, ctx_null
//! noise z[16, T, h, w] (seeded) ─ for each step i: v = v_u + g·(v_c − v_u);  z = sampler.step(v)
//! z ─ VaeDecoder ─► video [3, 1 + 4(T − 1), 8h, 8w] in [−1, 1]
//! ```
//!
//! Two ways to build a [`Pipeline`]:
//!
//! * [`Pipeline::from_checkpoint_dir`]: a Wan 2.1 t2v checkpoint directory (spec §3.1);
//! * [`Pipeline::demo`]: tiny models with **random weights** generated deterministically by the
//!   crate (no download). The result is noise-like: the demo exercises every stage, it is not a
//!   trained model.
//!
//! [`Pipeline::generate`] reports [`Progress`] to a callback, which can cancel the run by
//! returning [`ControlFlow::Break`]; the run then ends with an error for which
//! [`is_cancelled`] is true.
//!
//! ```no_run
//! use nabla::Gpu;
//! use nabla::wan::pipeline::{GenerateOptions, Pipeline, Progress};
//! use std::ops::ControlFlow;
//! # fn main() -> nabla::Result<()> {
//! let gpu = Gpu::new()?;
//! let mut pipe = Pipeline::demo(&gpu)?;
//! let opts = GenerateOptions::demo("a cat walks on the grass");
//! let video = pipe.generate(&opts, |p| {
//!     if let Progress::Step { step, steps, .. } = p {
//!         eprintln!("step {step}/{steps}");
//!     }
//!     ControlFlow::Continue(())
//! })?;
//! video.write_mp4("demo.mp4")?;
//! # Ok(()) }
//! ```
//!
//! Differences from the reference: the initial noise comes from the crate's own seeded
//! generator (PyTorch's CUDA Philox stream is not reproduced, spec §5.1), and the umT5 encoder
//! computes in f32 where the reference uses bf16 (spec §6.4).

use super::sampler::{Sampler, Solver, guidance};
use super::t5::{T5Config, T5Encoder};
use super::tokenizer::{DEFAULT_NEGATIVE_PROMPT, T5Tokenizer, find_tokenizer_json};
use super::vae::{VaeConfig, VaeDecoder};
use super::{Checkpoint, Dit, DitInput, Trace, WanConfig, WeightPrecision, WgpuBackend};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::io::OwnedTensor;
use crate::nabla::SparseAlgo;
use safetensors::Dtype;
use std::collections::HashMap;
use std::fmt;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Latent channels of Wan 2.1 (`z_dim`).
pub const Z_DIM: usize = 16;

/// The message of the error [`Pipeline::generate`] returns when the progress callback cancels.
pub const CANCELLED: &str = "generation cancelled by the progress callback";

/// Whether `e` is the error of a run cancelled by its progress callback.
pub fn is_cancelled(e: &Error) -> bool {
    matches!(e, Error::Invalid(m) if m == CANCELLED)
}

/// File names of an official Wan 2.1 checkpoint directory (spec §3.1).
pub mod files {
    /// umT5-XXL encoder weights (PyTorch zip pickle, bf16).
    pub const T5_PTH: &str = "models_t5_umt5-xxl-enc-bf16.pth";
    /// The same converted once to safetensors (written next to the `.pth` on first use).
    pub const T5_SAFETENSORS: &str = "models_t5_umt5-xxl-enc-bf16.safetensors";
    /// VAE weights (PyTorch zip pickle, f32).
    pub const VAE_PTH: &str = "Wan2.1_VAE.pth";
    /// The VAE as safetensors (used instead of the `.pth` when present).
    pub const VAE_SAFETENSORS: &str = "Wan2.1_VAE.safetensors";
    /// The single-file DiT (1.3B).
    pub const DIT_SINGLE: &str = "diffusion_pytorch_model.safetensors";
    /// The index of a sharded DiT (14B).
    pub const DIT_INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";
    /// The HF tokenizer.
    pub const TOKENIZER: &str = "google/umt5-xxl/tokenizer.json";
}

/// Which model a pipeline runs (`--task`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Task {
    /// `t2v-14B`: Wan2.1-T2V-14B.
    T2v14B,
    /// `t2v-1.3B`: Wan2.1-T2V-1.3B.
    T2v1_3B,
    /// `demo`: the crate's tiny random-weight models ([`Pipeline::demo`], or a directory
    /// written by [`write_demo_checkpoint`]).
    Demo,
}

impl Task {
    /// The name as `--task` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Task::T2v14B => "t2v-14B",
            Task::T2v1_3B => "t2v-1.3B",
            Task::Demo => "demo",
        }
    }

    /// The DiT configuration of the task.
    pub fn config(self) -> WanConfig {
        match self {
            Task::T2v14B => WanConfig::t2v_14b(),
            Task::T2v1_3B => WanConfig::t2v_1_3b(),
            Task::Demo => demo_dit_config(),
        }
    }

    /// The sizes `(W, H)` in pixels the reference accepts for the task (`SUPPORTED_SIZES`);
    /// empty for the demo, which takes any.
    pub fn supported_sizes(self) -> &'static [(usize, usize)] {
        match self {
            Task::T2v14B => &[(720, 1280), (1280, 720), (480, 832), (832, 480)],
            Task::T2v1_3B => &[(480, 832), (832, 480)],
            Task::Demo => &[],
        }
    }

    /// The reference's default size `(W, H)` for the task (the first one it supports at the
    /// largest resolution; 256×256 for the demo).
    pub fn default_size(self) -> (usize, usize) {
        match self {
            Task::T2v14B => (1280, 720),
            Task::T2v1_3B => (832, 480),
            Task::Demo => (256, 256),
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = Error;

    /// Parses `t2v-14B` or `t2v-1.3B` (case-insensitive) or `demo`.
    fn from_str(s: &str) -> Result<Task> {
        match s.to_ascii_lowercase().as_str() {
            "t2v-14b" => Ok(Task::T2v14B),
            "t2v-1.3b" => Ok(Task::T2v1_3B),
            "demo" => Ok(Task::Demo),
            _ => Err(Error::Invalid(format!(
                "unknown task {s:?}: this pipeline runs text-to-video only; the accepted tasks \
                 are `t2v-14B` and `t2v-1.3B` (and `demo`, for a directory written by `nabla \
                 demo --write-checkpoint`); the i2v, flf2v, t2i and vace tasks of the reference \
                 are not implemented"
            ))),
        }
    }
}

/// Parses a size `W*H` (as the reference writes it; `WxH` is accepted too) into `(W, H)`.
pub fn parse_size(s: &str) -> Result<(usize, usize)> {
    let bad = || {
        Error::Invalid(format!(
            "size {s:?} is not of the form W*H in pixels (e.g. 1280*720 or 832*480)"
        ))
    };
    let (w, h) = s.split_once(['*', 'x', 'X']).ok_or_else(bad)?;
    let w: usize = w.trim().parse().map_err(|_| bad())?;
    let h: usize = h.trim().parse().map_err(|_| bad())?;
    if w == 0 || h == 0 {
        return Err(bad());
    }
    Ok((w, h))
}

/// Everything one generation takes. [`GenerateOptions::new`] gives the reference defaults,
/// [`GenerateOptions::demo`] the demo's.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt; `None` (or an empty string) means the reference's default
    /// ([`DEFAULT_NEGATIVE_PROMPT`]).
    pub negative_prompt: Option<String>,
    /// Requested size `(W, H)` in pixels; with sparse attention it is floored to multiples of
    /// 128 as the reference does ([`Plan`] says what is used).
    pub size: (usize, usize),
    /// Frames of the video, `4k + 1`.
    pub frame_num: usize,
    /// Sparse self-attention (`None`: dense at every step).
    pub sparse_algo: Option<SparseAlgo>,
    /// The solver.
    pub solver: Solver,
    /// Sampling steps.
    pub steps: usize,
    /// Sigma shift.
    pub shift: f64,
    /// Classifier-free guidance scale.
    pub guide_scale: f32,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Reads the block masks back at the first sparse step and the last step and reports their
    /// density per layer ([`Video::mask_stats`]); costs one extra readback per layer there.
    pub mask_stats: bool,
    /// With `mask_stats`, also keep the dense block masks themselves ([`MaskStats::masks`]):
    /// heads·Nb² bytes per layer (≈ 44 MB per layer for the 14B model at 720p).
    pub keep_masks: bool,
}

impl GenerateOptions {
    /// The reference defaults for `task`: its default size, 81 frames, `nabla-0.7`, UniPC, 50
    /// steps, shift 5, guide scale 5, seed 0.
    pub fn new(task: Task, prompt: impl Into<String>) -> GenerateOptions {
        GenerateOptions {
            prompt: prompt.into(),
            negative_prompt: None,
            size: task.default_size(),
            frame_num: 81,
            sparse_algo: Some(SparseAlgo::Nabla { thr: 0.7 }),
            solver: Solver::UniPc,
            steps: 50,
            shift: 5.0,
            guide_scale: 5.0,
            seed: 0,
            mask_stats: false,
            keep_masks: false,
        }
    }

    /// The demo defaults: 256×256, 17 frames, 10 steps, `nabla-0.7`, everything else as
    /// [`GenerateOptions::new`].
    pub fn demo(prompt: impl Into<String>) -> GenerateOptions {
        GenerateOptions {
            size: (256, 256),
            frame_num: 17,
            steps: 10,
            ..GenerateOptions::new(Task::Demo, prompt)
        }
    }
}

/// The shapes a generation will use, derived from [`GenerateOptions`] (spec §4.9, §5.1).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The size asked for `(W, H)`.
    pub requested: (usize, usize),
    /// The size of the video `(W, H)` after the reference's rounding.
    pub size: (usize, usize),
    /// Frames of the video.
    pub frames: usize,
    /// Latent `(T, h, w)`.
    pub latent: (usize, usize, usize),
    /// DiT tokens per forward.
    pub tokens: usize,
    /// 64-token blocks per forward when sparse (`None` when dense).
    pub blocks: Option<usize>,
    /// Notes for the user (size rounding, untrained sizes).
    pub notes: Vec<String>,
}

/// Checks the options and computes the shapes for `task` (frame count `4k + 1`, sizes that
/// give an even latent, the reference's crop to multiples of 128 px with sparse attention).
pub fn plan(task: Task, opts: &GenerateOptions) -> Result<Plan> {
    let f = opts.frame_num;
    if f == 0 || !(f - 1).is_multiple_of(4) {
        let lo = f.saturating_sub(1) / 4 * 4 + 1;
        return Err(Error::Invalid(format!(
            "frame count {f} is not of the form 4k+1 (the VAE makes 4 frames per latent frame \
             after the first); use {lo} or {} (the reference default is 81)",
            lo + 4
        )));
    }
    let (w, h) = opts.size;
    let mut notes = Vec::new();
    if !task.supported_sizes().is_empty() && !task.supported_sizes().contains(&(w, h)) {
        let list: Vec<String> = task
            .supported_sizes()
            .iter()
            .map(|(a, b)| format!("{a}*{b}"))
            .collect();
        notes.push(format!(
            "size {w}*{h} is not one {task} was trained at ({}); the reference refuses it, this \
             pipeline runs it anyway",
            list.join(", ")
        ));
    }
    let (mut lh, mut lw) = (h / 8, w / 8);
    if opts.sparse_algo.is_some() {
        let (ch, cw) = (lh / 16 * 16, lw / 16 * 16);
        if ch == 0 || cw == 0 {
            return Err(Error::Invalid(format!(
                "size {w}*{h} is too small for sparse attention: it needs at least 128 px in \
                 each direction (latent multiples of 16); use a larger size or --sparse-algo none"
            )));
        }
        if (ch, cw) != (lh, lw) || !h.is_multiple_of(8) || !w.is_multiple_of(8) {
            notes.push(format!(
                "sparse attention: size {w}*{h} rounded down to {}*{} (latent multiples of 16, \
                 as the reference does)",
                cw * 8,
                ch * 8
            ));
        }
        (lh, lw) = (ch, cw);
    } else if !w.is_multiple_of(16) || !h.is_multiple_of(16) {
        return Err(Error::Invalid(format!(
            "size {w}*{h}: width and height must be multiples of 16 px for dense attention (the \
             latent is 1/8 of the size and the DiT patches are 2x2)"
        )));
    }
    let t = (f - 1) / 4 + 1;
    let tokens = t * (lh / 2) * (lw / 2);
    Ok(Plan {
        requested: (w, h),
        size: (lw * 8, lh * 8),
        frames: f,
        latent: (t, lh, lw),
        tokens,
        blocks: opts.sparse_algo.map(|_| tokens / 64),
        notes,
    })
}

/// A stage of [`Pipeline::generate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Tokenizing and encoding both prompts.
    Encode,
    /// The sampling loop.
    Denoise,
    /// The VAE decode.
    Decode,
}

/// What [`Pipeline::generate`] reports to its callback.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// A note or warning for the user (size rounding, prompt truncation).
    Note(String),
    /// A stage starts.
    Stage(Stage),
    /// Sampling step `step` (1-based) of `steps` is done.
    Step {
        /// Steps done.
        step: usize,
        /// Steps in all.
        steps: usize,
        /// Whether this step used sparse attention.
        sparse: bool,
        /// Time of this step.
        took: Duration,
        /// Time since the sampling loop started.
        elapsed: Duration,
    },
}

/// Wall-clock time of each stage of one generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timings {
    /// Tokenizing both prompts.
    pub tokenize: Duration,
    /// umT5 encoding of both prompts.
    pub encode: Duration,
    /// The sampling loop (two DiT forwards per step).
    pub denoise: Duration,
    /// Each sampling step.
    pub steps: Vec<Duration>,
    /// The VAE decode.
    pub decode: Duration,
}

/// Block-mask density per layer at one sampling step (cond pass), from `--mask-stats`.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskStats {
    /// The 0-based sampling step.
    pub step: usize,
    /// Fraction of attended blocks per layer, averaged over heads.
    pub density: Vec<f64>,
    /// With [`GenerateOptions::keep_masks`]: per layer, the dense `[heads, Nb, Nb]` 0/1 mask.
    pub masks: Vec<Vec<u8>>,
    /// Blocks per side `Nb` of those masks.
    pub blocks: usize,
}

/// A generated video and how it was made.
#[derive(Clone, Debug)]
pub struct Video {
    /// Frames `[3, F, H, W]` f32 in `[−1, 1]`, channel-first.
    pub data: Vec<f32>,
    /// F.
    pub frames: usize,
    /// H.
    pub height: usize,
    /// W.
    pub width: usize,
    /// The shapes used.
    pub plan: Plan,
    /// Stage timings.
    pub timings: Timings,
    /// Whether the prompt was cut to the text length.
    pub prompt_truncated: bool,
    /// Mask densities (with [`GenerateOptions::mask_stats`] and sparse attention).
    pub mask_stats: Vec<MaskStats>,
}

impl Video {
    /// Writes the video as H.264 `.mp4` at 16 fps with the built-in encoder
    /// ([`crate::video::write_mp4`]).
    pub fn write_mp4(&self, path: impl AsRef<Path>) -> Result<crate::video::Mp4Info> {
        crate::video::write_mp4(
            path,
            &self.data,
            self.frames,
            self.height,
            self.width,
            crate::video::DEFAULT_FPS,
        )
    }
}

/// A directory removed when dropped (the demo's generated tokenizer and encoder files).
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The device layer the DiT runs on (the text encoder and the VAE run on wgpu).
#[derive(Clone, Copy, Debug)]
pub enum DitLayer<'g> {
    /// wgpu (Vulkan, Metal, DX12).
    Wgpu,
    /// The CUDA layer (cargo feature `cuda`).
    #[cfg(feature = "cuda")]
    Cuda(&'g crate::cuda::Cuda),
    #[doc(hidden)]
    #[cfg(not(feature = "cuda"))]
    _Phantom(std::marker::PhantomData<&'g ()>),
}

/// The DiT with its backend, on one layer: the model code is the same [`Dit`] on either.
/// (Built once per pipeline: the variants' size difference does not matter.)
#[allow(clippy::large_enum_variant)]
enum DitOn<'g> {
    Wgpu(WgpuBackend<'g>, Dit<WgpuBackend<'g>>),
    #[cfg(feature = "cuda")]
    Cuda(
        crate::cuda::CudaBackend<'g>,
        Dit<crate::cuda::CudaBackend<'g>>,
    ),
}

impl<'g> DitOn<'g> {
    /// Builds the DiT on `layer` with `make` (load or random weights).
    fn build(gpu: &'g Gpu, layer: DitLayer<'g>, load: impl DitSource) -> Result<DitOn<'g>> {
        match layer {
            DitLayer::Wgpu => {
                let mut be = WgpuBackend::new(gpu);
                let dit = load.build(&mut be)?;
                Ok(DitOn::Wgpu(be, dit))
            }
            #[cfg(feature = "cuda")]
            DitLayer::Cuda(cuda) => {
                let mut be = crate::cuda::CudaBackend::new(cuda);
                let dit = load.build(&mut be)?;
                Ok(DitOn::Cuda(be, dit))
            }
            #[cfg(not(feature = "cuda"))]
            DitLayer::_Phantom(_) => Err(Error::Invalid("no such device layer".into())),
        }
    }
    fn config(&self) -> &WanConfig {
        match self {
            DitOn::Wgpu(_, d) => d.config(),
            #[cfg(feature = "cuda")]
            DitOn::Cuda(_, d) => d.config(),
        }
    }
    fn weight_bytes(&self) -> u64 {
        match self {
            DitOn::Wgpu(_, d) => d.weight_bytes(),
            #[cfg(feature = "cuda")]
            DitOn::Cuda(_, d) => d.weight_bytes(),
        }
    }
    fn activation_bytes(&self, latent: (usize, usize, usize), sparse: bool) -> u64 {
        match self {
            DitOn::Wgpu(_, d) => d.activation_bytes(latent, sparse),
            #[cfg(feature = "cuda")]
            DitOn::Cuda(_, d) => d.activation_bytes(latent, sparse),
        }
    }
    fn forward(
        &mut self,
        input: &DitInput<'_>,
        sparse: Option<&SparseAlgo>,
        trace: Option<&mut Trace>,
    ) -> Result<Vec<f32>> {
        match self {
            DitOn::Wgpu(be, d) => d.forward(be, input, sparse, trace),
            #[cfg(feature = "cuda")]
            DitOn::Cuda(be, d) => d.forward(be, input, sparse, trace),
        }
    }
    fn layer_name(&self) -> &'static str {
        match self {
            DitOn::Wgpu(..) => "wgpu",
            #[cfg(feature = "cuda")]
            DitOn::Cuda(..) => "cuda",
        }
    }
}

/// Where a DiT's weights come from.
trait DitSource {
    fn build<B: super::Backend>(self, be: &mut B) -> Result<Dit<B>>;
}

struct FromCheckpoint<'a>(&'a Checkpoint, WeightPrecision);

impl DitSource for FromCheckpoint<'_> {
    fn build<B: super::Backend>(self, be: &mut B) -> Result<Dit<B>> {
        Dit::load(be, self.0, self.1)
    }
}

struct Random<'a>(&'a WanConfig, WeightPrecision, u64);

impl DitSource for Random<'_> {
    fn build<B: super::Backend>(self, be: &mut B) -> Result<Dit<B>> {
        Dit::random(be, self.0, self.1, self.2)
    }
}

/// The text-to-video pipeline with every model loaded.
pub struct Pipeline<'g> {
    gpu: &'g Gpu,
    dit: DitOn<'g>,
    t5: T5Encoder,
    tokenizer: T5Tokenizer,
    vae: VaeDecoder,
    task: Task,
    load_time: Duration,
    // last: removed after the encoder's mapping of the files is gone
    _scratch: Option<ScratchDir>,
}

/// The demo DiT: dim 128 (2 heads of 64), FFN 256, 2 layers, text width 64, text length 64.
pub fn demo_dit_config() -> WanConfig {
    WanConfig {
        dim: 128,
        ffn_dim: 256,
        freq_dim: 256,
        num_heads: 2,
        num_layers: 2,
        text_len: 64,
        text_dim: 64,
        in_dim: Z_DIM,
        out_dim: Z_DIM,
        eps: 1e-6,
        patch: (1, 2, 2),
    }
}

/// The demo umT5: vocabulary 64, width 64, 2 heads, FFN 128, 2 layers.
pub fn demo_t5_config() -> T5Config {
    T5Config {
        vocab: 64,
        dim: 64,
        dim_attn: 64,
        dim_ffn: 128,
        num_heads: 2,
        num_layers: 2,
        ..T5Config::umt5_xxl()
    }
}

/// The demo VAE decoder: Wan 2.1's structure (×8 spatial, ×4 temporal, middle attention) at
/// width 4 with one residual block per stage (Wan 2.1 has three).
pub fn demo_vae_config() -> VaeConfig {
    VaeConfig {
        dim: 4,
        z_dim: Z_DIM,
        dim_mult: vec![1, 2, 4, 4],
        num_res_blocks: 0,
        temporal_upsample: vec![true, true, false],
    }
}

/// The 64 pieces of the demo tokenizer (ids in order) with their Unigram log-probabilities:
/// specials, `▁`, the letters, some words, punctuation.
fn demo_pieces() -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = ["<pad>", "</s>", "<unk>"]
        .iter()
        .map(|s| (s.to_string(), 0.0))
        .collect();
    v.push(("▁".into(), -2.0));
    for c in 'a'..='z' {
        v.push((c.to_string(), -6.0));
    }
    for w in [
        "a", "the", "cat", "dog", "on", "in", "of", "and", "walks", "runs", "grass", "sea", "sky",
        "city", "night", "red", "blue", "green", "light", "water", "is", "with", "at", "sun",
        "tree", "man", "woman", "bird", "fish", "snow", "fire", "rain",
    ] {
        v.push((format!("▁{w}"), -3.0));
    }
    v.push((",".into(), -4.0));
    v.push((".".into(), -4.0));
    v
}

/// A HF `tokenizer.json` (SentencePiece Unigram, the layout of T5's) of [`demo_pieces`], with a
/// lowercasing normalizer.
fn demo_tokenizer_json() -> serde_json::Value {
    use serde_json::json;
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<pad>"), special(1, "</s>"), special(2, "<unk>")],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                          "split": true},
        "post_processor": null,
        "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                    "split": true},
        "model": {"type": "Unigram", "unk_id": 2, "byte_fallback": false,
                  "vocab": demo_pieces().iter().map(|(p, s)| json!([p, s])).collect::<Vec<_>>()}
    })
}

/// Random f32 tensors of the given shapes: norms and gammas ≈ 1, biases small, weights
/// N(0, 1/fan_in); deterministic per name and seed.
fn random_tensors(shapes: &[(String, Vec<usize>)], seed: u64) -> Vec<OwnedTensor> {
    shapes
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let salt = name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
            let is_norm = name.contains("norm") || name.ends_with("gamma");
            let (std, mean) = if is_norm {
                (0.05, 1.0)
            } else if name.ends_with("bias") {
                (0.02, 0.0)
            } else if name.contains("pos_embedding") {
                (0.5, 0.0)
            } else if name == "token_embedding.weight" {
                (1.0, 0.0)
            } else {
                let fan_in: usize = shape[1..].iter().product();
                (1.0 / (fan_in.max(1) as f32).sqrt(), 0.0)
            };
            let mut v = crate::synth::noise(salt, n, std);
            v.iter_mut().for_each(|x| *x += mean);
            let bytes = bytemuck::cast_slice::<f32, u8>(&v).to_vec();
            (name.clone(), Dtype::F32, shape.clone(), bytes)
        })
        .collect()
}

fn scratch_dir() -> Result<ScratchDir> {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("nabla-demo-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).map_err(|e| {
        Error::file(
            &d,
            format!("cannot create the demo's scratch directory: {e}"),
        )
    })?;
    Ok(ScratchDir(d))
}

/// Seeds of the demo's random weights (DiT, umT5, VAE).
const DEMO_SEEDS: (u64, u64, u64) = (0xd17, 0x75, 0x7ae);

/// The demo's tensors in safetensors bytes: umT5 and VAE.
fn demo_t5_tensors() -> Vec<OwnedTensor> {
    random_tensors(&demo_t5_config().expected_tensors(), DEMO_SEEDS.1)
}

fn demo_vae_tensors() -> Vec<OwnedTensor> {
    random_tensors(&demo_vae_config().expected_tensors(), DEMO_SEEDS.2)
}

/// Writes the demo's models (the random weights of [`Pipeline::demo`], bit for bit) as a
/// checkpoint directory in the official layout: `config.json`,
/// `diffusion_pytorch_model.safetensors`, `models_t5_umt5-xxl-enc-bf16.safetensors`,
/// `Wan2.1_VAE.safetensors` and `google/umt5-xxl/tokenizer.json`. Loading it with
/// [`Pipeline::from_checkpoint_dir_with`] and [`Task::Demo`] exercises the checkpoint path
/// without a download (`nabla demo --write-checkpoint DIR`, then `nabla generate --task demo`).
pub fn write_demo_checkpoint(dir: impl AsRef<Path>) -> Result<()> {
    use super::WeightSource;
    let dir = dir.as_ref();
    let tok_dir = dir.join("google/umt5-xxl");
    std::fs::create_dir_all(&tok_dir).map_err(|e| Error::file(&tok_dir, e))?;
    let c = demo_dit_config();
    let config = serde_json::json!({
        "model_type": "t2v", "dim": c.dim, "ffn_dim": c.ffn_dim, "freq_dim": c.freq_dim,
        "num_heads": c.num_heads, "num_layers": c.num_layers, "text_len": c.text_len,
        "text_dim": c.text_dim, "in_dim": c.in_dim, "out_dim": c.out_dim, "eps": c.eps,
        "patch_size": [c.patch.0, c.patch.1, c.patch.2],
    });
    let p = dir.join("config.json");
    std::fs::write(&p, config.to_string()).map_err(|e| Error::file(&p, e))?;
    let p = tok_dir.join("tokenizer.json");
    std::fs::write(&p, demo_tokenizer_json().to_string()).map_err(|e| Error::file(&p, e))?;
    let rw = super::RandomWeights::new(&c, DEMO_SEEDS.0);
    let mut dit = Vec::new();
    for (name, _) in super::expected_tensors(&c) {
        let (v, shape) = rw.get(&name)?;
        let bytes = bytemuck::cast_slice::<f32, u8>(&v).to_vec();
        dit.push((name, Dtype::F32, shape, bytes));
    }
    crate::io::write_safetensors(dir.join(files::DIT_SINGLE), &dit, HashMap::new())?;
    crate::io::write_safetensors(
        dir.join(files::T5_SAFETENSORS),
        &demo_t5_tensors(),
        HashMap::new(),
    )?;
    crate::io::write_safetensors(
        dir.join(files::VAE_SAFETENSORS),
        &demo_vae_tensors(),
        HashMap::new(),
    )?;
    Ok(())
}

/// The first of `names` under `dir` that exists.
fn first_existing(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.exists())
}

/// Checks that a checkpoint directory holds every file the pipeline needs; the error names
/// each missing file.
pub fn check_checkpoint_dir(dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        return Err(Error::file(
            dir,
            "is not a directory; --ckpt-dir must be a Wan 2.1 t2v checkpoint directory (e.g. \
             Wan2.1-T2V-1.3B downloaded from Wan-AI/Wan2.1-T2V-1.3B)",
        ));
    }
    let mut missing = Vec::new();
    let dit = [files::DIT_SINGLE, files::DIT_INDEX, "transformer"];
    if first_existing(dir, &dit).is_none() {
        missing.push(format!(
            "{} (or the sharded {} with its shards): the DiT",
            files::DIT_SINGLE,
            files::DIT_INDEX
        ));
    }
    if first_existing(dir, &[files::T5_SAFETENSORS, files::T5_PTH, "text_encoder"]).is_none() {
        missing.push(format!("{}: the umT5-XXL text encoder", files::T5_PTH));
    }
    if first_existing(
        dir,
        &[
            files::VAE_SAFETENSORS,
            files::VAE_PTH,
            "vae/diffusion_pytorch_model.safetensors",
        ],
    )
    .is_none()
    {
        missing.push(format!("{}: the VAE", files::VAE_PTH));
    }
    if find_tokenizer_json(dir).is_err() {
        missing.push(format!("{}: the umT5 tokenizer", files::TOKENIZER));
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::file(
        dir,
        format!(
            "the checkpoint directory lacks {}. Download the whole Wan-AI/Wan2.1-T2V-1.3B or \
             -14B repository (or a NABLA fine-tune with the same files) into it",
            missing.join("; ")
        ),
    ))
}

/// Opens the umT5 encoder of a checkpoint directory: the `.safetensors` conversion if present,
/// else converts the `.pth` once into it (about 11 GB next to it), or a diffusers
/// `text_encoder/`.
fn open_t5(dir: &Path) -> Result<T5Encoder> {
    let st = dir.join(files::T5_SAFETENSORS);
    if st.is_file() {
        return T5Encoder::open(&st);
    }
    let pth = dir.join(files::T5_PTH);
    if pth.is_file() {
        eprintln!(
            "note: converting {} once to {} (the encoder reader maps safetensors; later runs \
             use the converted file)",
            pth.display(),
            st.display()
        );
        super::pth::convert_to_safetensors(&pth, &st).map_err(|e| {
            Error::Invalid(format!(
                "{e}. The umT5 encoder is read from safetensors: convert it once in a writable \
                 place (e.g. a copy of the directory) or put {} next to the .pth",
                files::T5_SAFETENSORS
            ))
        })?;
        return T5Encoder::open(&st);
    }
    let te = dir.join("text_encoder");
    if te.is_dir() {
        return T5Encoder::open(&te);
    }
    Err(Error::file(
        &pth,
        "does not exist: the umT5-XXL text encoder weights are missing",
    ))
}

/// Opens the VAE of a checkpoint directory: `Wan2.1_VAE.safetensors`, else the `.pth` (read
/// into memory as safetensors, about 0.5 GB), else a diffusers `vae/`.
fn open_vae(gpu: &Gpu, dir: &Path) -> Result<VaeDecoder> {
    let st = dir.join(files::VAE_SAFETENSORS);
    if st.is_file() {
        return VaeDecoder::load(gpu, &st);
    }
    let pth = dir.join(files::VAE_PTH);
    if pth.is_file() {
        let f = super::pth::PthFile::open(&pth)?;
        let mut tensors: Vec<OwnedTensor> = Vec::new();
        for name in f.names() {
            // the decoder reads conv2.* and decoder.*: skip the encoder half
            if !(name.starts_with("decoder.") || name.starts_with("conv2.")) {
                continue;
            }
            let r = f.raw(&name)?;
            tensors.push((name.clone(), r.dtype, r.shape.clone(), r.data.to_vec()));
        }
        let views = tensors
            .iter()
            .map(|(n, dt, s, d)| {
                safetensors::tensor::TensorView::new(*dt, s.clone(), d)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::file(&pth, e))
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes =
            safetensors::serialize(views, None).map_err(|e| Error::file(&pth, e.to_string()))?;
        return VaeDecoder::from_bytes(gpu, &bytes).map_err(|e| Error::file(&pth, e));
    }
    let dv = dir.join("vae/diffusion_pytorch_model.safetensors");
    if dv.is_file() {
        return VaeDecoder::load(gpu, &dv);
    }
    Err(Error::file(
        &pth,
        "does not exist: the VAE weights are missing",
    ))
}

/// Seeded standard normal noise (SplitMix64 + Box–Muller).
fn gaussian_noise(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed ^ 0x6a09_e667_f3bc_c909;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1 = next().max(1e-300);
        let u2 = next();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

impl<'g> Pipeline<'g> {
    /// Loads a Wan 2.1 t2v checkpoint directory (spec §3.1) for `task`, the DiT's big weights
    /// in bf16 (see [`Pipeline::from_checkpoint_dir_with`]).
    pub fn from_checkpoint_dir(
        gpu: &'g Gpu,
        dir: impl AsRef<Path>,
        task: Task,
    ) -> Result<Pipeline<'g>> {
        Pipeline::from_checkpoint_dir_with(gpu, dir, task, WeightPrecision::BF16)
    }

    /// Loads a checkpoint directory with the DiT's block weights in `precision`:
    ///
    /// * DiT: `diffusion_pytorch_model*.safetensors` ([`Checkpoint::open`]), checked against
    ///   the task's configuration;
    /// * umT5: `models_t5_umt5-xxl-enc-bf16.safetensors`, or the `.pth`, converted once into
    ///   that file next to it on first use (the directory must be writable then);
    /// * VAE: `Wan2.1_VAE.safetensors` or `Wan2.1_VAE.pth` (read directly);
    /// * tokenizer: `google/umt5-xxl/tokenizer.json`.
    ///
    /// Missing files are reported together, each by name, before anything is loaded.
    /// [`Task::Demo`] loads a directory of the demo's shapes ([`write_demo_checkpoint`]).
    pub fn from_checkpoint_dir_with(
        gpu: &'g Gpu,
        dir: impl AsRef<Path>,
        task: Task,
        precision: WeightPrecision,
    ) -> Result<Pipeline<'g>> {
        Pipeline::from_checkpoint_dir_on(gpu, DitLayer::Wgpu, dir, task, precision)
    }

    /// [`Pipeline::from_checkpoint_dir_with`] with the DiT on `layer` (the umT5 encoder and
    /// the VAE stay on wgpu).
    pub fn from_checkpoint_dir_on(
        gpu: &'g Gpu,
        layer: DitLayer<'g>,
        dir: impl AsRef<Path>,
        task: Task,
        precision: WeightPrecision,
    ) -> Result<Pipeline<'g>> {
        let dir = dir.as_ref();
        check_checkpoint_dir(dir)?;
        let t0 = Instant::now();
        let tokenizer = T5Tokenizer::from_checkpoint_dir(dir)?;
        let want = task.config();
        let ck = Checkpoint::open(dir, &want)?;
        if ck.config.dim != want.dim || ck.config.num_layers != want.num_layers {
            return Err(Error::file(
                dir,
                format!(
                    "holds a DiT of dim {} with {} layers, but --task {task} is dim {} with {} \
                     layers; pass the --task that matches the checkpoint",
                    ck.config.dim, ck.config.num_layers, want.dim, want.num_layers
                ),
            ));
        }
        let dit = DitOn::build(gpu, layer, FromCheckpoint(&ck, precision))?;
        drop(ck);
        let t5 = open_t5(dir)?;
        if t5.config().dim != dit.config().text_dim {
            return Err(Error::Invalid(format!(
                "the text encoder's width {} differs from the DiT's text_dim {}",
                t5.config().dim,
                dit.config().text_dim
            )));
        }
        let vae = open_vae(gpu, dir)?;
        Pipeline::assemble(gpu, dit, t5, tokenizer, vae, task, t0, None)
    }

    /// The demo pipeline: a tiny DiT ([`demo_dit_config`]), umT5 ([`demo_t5_config`]), VAE
    /// ([`demo_vae_config`]) and tokenizer (64 pieces), all with **random weights** generated
    /// deterministically by the crate. It runs every stage of the real pipeline on any adapter
    /// (the software Vulkan driver included) in seconds to a minute; its videos are noise-like,
    /// since the weights are not a trained model. The tokenizer and encoder files live in a
    /// temporary directory removed when the pipeline is dropped.
    pub fn demo(gpu: &'g Gpu) -> Result<Pipeline<'g>> {
        Pipeline::demo_on(gpu, DitLayer::Wgpu)
    }

    /// [`Pipeline::demo`] with the DiT on `layer`.
    pub fn demo_on(gpu: &'g Gpu, layer: DitLayer<'g>) -> Result<Pipeline<'g>> {
        let t0 = Instant::now();
        let scratch = scratch_dir()?;
        let tok_path = scratch.0.join("tokenizer.json");
        let json = serde_json::to_string(&demo_tokenizer_json())
            .map_err(|e| Error::Invalid(format!("demo tokenizer: {e}")))?;
        std::fs::write(&tok_path, json).map_err(|e| Error::file(&tok_path, e))?;
        let cfg = demo_dit_config();
        let tokenizer = T5Tokenizer::from_file(&tok_path)?.with_text_len(cfg.text_len)?;

        let t5_path = scratch.0.join("t5.safetensors");
        crate::io::write_safetensors(&t5_path, &demo_t5_tensors(), HashMap::new())?;
        let t5 = T5Encoder::open(&t5_path)?;

        let vae_tensors = demo_vae_tensors();
        let views = vae_tensors
            .iter()
            .map(|(n, dt, s, d)| {
                safetensors::tensor::TensorView::new(*dt, s.clone(), d)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::Invalid(format!("demo VAE tensor {n}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(views, None)
            .map_err(|e| Error::Invalid(format!("demo VAE: {e}")))?;
        let vae = VaeDecoder::from_bytes(gpu, &bytes)?;

        let dit = DitOn::build(gpu, layer, Random(&cfg, WeightPrecision::F32, DEMO_SEEDS.0))?;
        Pipeline::assemble(gpu, dit, t5, tokenizer, vae, Task::Demo, t0, Some(scratch))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        gpu: &'g Gpu,
        dit: DitOn<'g>,
        t5: T5Encoder,
        tokenizer: T5Tokenizer,
        vae: VaeDecoder,
        task: Task,
        t0: Instant,
        scratch: Option<ScratchDir>,
    ) -> Result<Pipeline<'g>> {
        let tokenizer = tokenizer.with_text_len(dit.config().text_len)?;
        if vae.config().z_dim != dit.config().out_dim {
            return Err(Error::Invalid(format!(
                "the VAE's z_dim {} differs from the DiT's out_dim {}",
                vae.config().z_dim,
                dit.config().out_dim
            )));
        }
        gpu.check()?;
        Ok(Pipeline {
            gpu,
            dit,
            t5,
            tokenizer,
            vae,
            task,
            load_time: t0.elapsed(),
            _scratch: scratch,
        })
    }

    /// The task.
    pub fn task(&self) -> Task {
        self.task
    }

    /// How long building the pipeline took.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// The DiT configuration.
    pub fn dit_config(&self) -> &WanConfig {
        self.dit.config()
    }

    /// The device layer the DiT runs on: `"wgpu"` or `"cuda"`.
    pub fn dit_layer(&self) -> &'static str {
        self.dit.layer_name()
    }

    /// The shapes [`Pipeline::generate`] would use for `opts` (errors for bad options).
    pub fn plan(&self, opts: &GenerateOptions) -> Result<Plan> {
        plan(self.task, opts)
    }

    /// GPU memory the DiT needs for `opts`: `(weights, activations)` in bytes (the encoder
    /// holds one layer at a time and the VAE works frame by frame, both far smaller for the
    /// released models).
    pub fn planned_memory(&self, opts: &GenerateOptions) -> Result<(u64, u64)> {
        let p = self.plan(opts)?;
        Ok((
            self.dit.weight_bytes(),
            self.dit
                .activation_bytes(p.latent, opts.sparse_algo.is_some()),
        ))
    }

    /// Generates a video. `progress` sees every [`Progress`] event; returning
    /// [`ControlFlow::Break`] stops the run at the next check (before encoding, after each
    /// sampling step, before decoding) with an error for which [`is_cancelled`] is true.
    ///
    /// Steps: plan (errors for a frame count not `4k + 1` or unusable sizes), tokenize (a
    /// prompt longer than the text length is cut, with a [`Progress::Note`]), encode both
    /// prompts, draw the seeded noise, run the sampler with two DiT forwards per step
    /// (classifier-free guidance; STA-only algorithms dense for the first 12 steps, spec
    /// §4.9), decode with the VAE and clamp to `[−1, 1]`.
    pub fn generate(
        &mut self,
        opts: &GenerateOptions,
        mut progress: impl FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Video> {
        let mut tell = |p: Progress| match progress(p) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(()) => Err(Error::Invalid(CANCELLED.into())),
        };
        if !(opts.guide_scale.is_finite()) {
            return Err(Error::Invalid(format!(
                "guide scale {} is not a finite number (the reference default is 5.0)",
                opts.guide_scale
            )));
        }
        let plan = self.plan(opts)?;
        let mut sampler = Sampler::new(opts.solver, opts.steps, opts.shift)?;
        for n in &plan.notes {
            tell(Progress::Note(n.clone()))?;
        }
        let mut timings = Timings::default();

        // text
        tell(Progress::Stage(Stage::Encode))?;
        let t = Instant::now();
        let (ids, mask, prompt_truncated) = self.tokenizer.encode(&opts.prompt)?;
        let neg = match opts.negative_prompt.as_deref() {
            None | Some("") => DEFAULT_NEGATIVE_PROMPT,
            Some(s) => s,
        };
        let (nids, nmask, neg_truncated) = self.tokenizer.encode(neg)?;
        timings.tokenize = t.elapsed();
        let tl = self.tokenizer.text_len();
        if prompt_truncated {
            tell(Progress::Note(format!(
                "the prompt is longer than {} tokens; it was cut to {} tokens plus the end \
                 token (the rest has no effect)",
                tl,
                tl - 1
            )))?;
        }
        if neg_truncated {
            tell(Progress::Note(format!(
                "the negative prompt is longer than {tl} tokens; it was cut"
            )))?;
        }
        let t = Instant::now();
        let ctx = self.t5.context(self.gpu, &ids, &mask)?;
        let ctx_null = self.t5.context(self.gpu, &nids, &nmask)?;
        timings.encode = t.elapsed();

        // sampling
        tell(Progress::Stage(Stage::Denoise))?;
        let (lt, lh, lw) = plan.latent;
        let n = Z_DIM * lt * lh * lw;
        let mut z = gaussian_noise(opts.seed, n);
        let mut v = vec![0f32; n];
        let mut mask_stats = Vec::new();
        let first_sparse =
            (0..opts.steps).find(|&i| opts.sparse_algo.is_some_and(|a| a.sparse_at_step(i)));
        let t_loop = Instant::now();
        for i in 0..opts.steps {
            let ts = Instant::now();
            let sparse = opts.sparse_algo.filter(|a| a.sparse_at_step(i));
            let t_i = sampler.timesteps()[i] as f64;
            let want_stats = opts.mask_stats
                && sparse.is_some()
                && (Some(i) == first_sparse || i + 1 == opts.steps);
            let mut trace = want_stats.then(Trace::default);
            let cond = self.dit.forward(
                &DitInput {
                    latent: &z,
                    shape: plan.latent,
                    t: t_i,
                    context: &ctx,
                },
                sparse.as_ref(),
                trace.as_mut(),
            )?;
            let uncond = self.dit.forward(
                &DitInput {
                    latent: &z,
                    shape: plan.latent,
                    t: t_i,
                    context: &ctx_null,
                },
                sparse.as_ref(),
                None,
            )?;
            guidance(&uncond, &cond, opts.guide_scale, &mut v)?;
            sampler.step(i, &v, &mut z)?;
            if let Some(mut tr) = trace {
                let mut density = Vec::new();
                let mut masks = Vec::new();
                for l in 0..self.dit.config().num_layers {
                    if let Some(m) = tr.masks.remove(&format!("layer{l}")) {
                        let ones = m.iter().filter(|&&b| b != 0).count();
                        density.push(ones as f64 / m.len().max(1) as f64);
                        if opts.keep_masks {
                            masks.push(m);
                        }
                    }
                }
                let blocks = plan.blocks.unwrap_or(0);
                mask_stats.push(MaskStats {
                    step: i,
                    density,
                    masks,
                    blocks,
                });
            }
            let took = ts.elapsed();
            timings.steps.push(took);
            tell(Progress::Step {
                step: i + 1,
                steps: opts.steps,
                sparse: sparse.is_some(),
                took,
                elapsed: t_loop.elapsed(),
            })?;
        }
        timings.denoise = t_loop.elapsed();
        if z.iter().any(|x| !x.is_finite()) {
            return Err(Error::Gpu(
                "the denoised latent holds NaN or infinite values (a kernel or weight problem); \
                 try --precision f32"
                    .into(),
            ));
        }

        // decode
        tell(Progress::Stage(Stage::Decode))?;
        let t = Instant::now();
        let data = self.vae.decode(self.gpu, &z, plan.latent)?;
        timings.decode = t.elapsed();
        let [_, frames, height, width] = self.vae.output_shape(plan.latent);
        Ok(Video {
            data,
            frames,
            height,
            width,
            plan,
            timings,
            prompt_truncated,
            mask_stats,
        })
    }
}
