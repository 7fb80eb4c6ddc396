//! `nabla bench attention`: mask estimation, sparse and dense attention timed with timestamp
//! queries on the chosen adapter; a table on stdout, optional JSON and the masks for PyTorch.

use super::{layer, median};
use nabla::attention::{Kernel, record_attention_with, record_dense_attention_with};
use nabla::io::write_safetensors;
use nabla::nabla::{
    BLOCK, MaskStages, QkSide, record_estimate_mask, record_mask_from_pooled,
    record_rope_split_heads_pooled, time_mask_stages,
};
use nabla::synth::{Role, structured};
use nabla::{BlockGrid, BlockMask, DType, Error, Gpu, Result, SparseAlgo, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// NABLA mask estimation + block-sparse attention vs dense attention.
    Attention(AttnArgs),
    /// The linear layer (GEMM) on 4096³ and every Wan DiT linear shape.
    Gemm(GemmArgs),
    /// One Wan DiT forward with random weights of the real shapes (no download needed).
    Dit(DitArgs),
    /// How many workgroups run at once per compute unit as their workgroup memory grows
    /// (what decides the tensor-core kernels' tile sizes; no API reports it).
    Occupancy(super::bench_occupancy::OccupancyArgs),
    /// Read bandwidth against the working set: L2 and device memory (the ceiling of the
    /// tensor-core kernels' tile loads).
    Bandwidth(super::bench_bandwidth::BandwidthArgs),
}

#[derive(clap::Args)]
pub struct DitArgs {
    /// 1.3b or 14b.
    #[arg(long, default_value = "1.3b")]
    model: String,
    /// Video size W*H as the reference writes it (sparse runs crop to multiples of 128 px).
    #[arg(long, default_value = "832*480")]
    size: String,
    /// Frames (4k+1).
    #[arg(long, default_value_t = 81)]
    frames: usize,
    /// Comma-separated algorithms; `none` is dense attention.
    #[arg(long, default_value = "none,nabla-0.7")]
    sparse_algo: String,
    /// Weight storage of the big GEMMs: bf16 (fast path) or f32 (parity path).
    #[arg(long, default_value = "bf16")]
    weights: String,
    /// Timed forwards per algorithm (after one warm-up).
    #[arg(long, default_value_t = 2)]
    reps: usize,
    /// How the random weights are drawn: `synthetic` (nabla's: every tensor non-zero) or
    /// `wan` (the reference's `init_weights()`, as the fork's benchmarks build the model). The
    /// NABLA mask densities, and so the sparse forwards' times, depend on it.
    #[arg(long, default_value = "synthetic")]
    init: nabla::wan::RandomInit,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Device layer: auto (CUDA where built with it and available), wgpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    backend: layer::BackendArg,
}

/// GPU time per kernel of a profiled run.
type Profile = std::collections::BTreeMap<String, nabla::KernelTime>;
/// Starts a per-op profile on a backend.
type StartProfile<'a, B> = Box<dyn Fn(&mut B) -> Result<()> + 'a>;
/// Stops it and returns the profile.
type StopProfile<'a, B> = Box<dyn Fn(&mut B) -> Result<Profile> + 'a>;

/// Starts and stops a per-op profile on a backend.
struct Profiler<'a, B> {
    start: StartProfile<'a, B>,
    stop: StopProfile<'a, B>,
}

/// One `bench dit` configuration, run on any backend.
struct DitRun<'a> {
    cfg: &'a nabla::wan::WanConfig,
    precision: nabla::wan::WeightPrecision,
    input: &'a nabla::wan::DitInput<'a>,
    algos: &'a [Option<SparseAlgo>],
    reps: usize,
    model: &'a str,
    init: nabla::wan::RandomInit,
}

impl DitRun<'_> {
    /// Random weights on `be`, then per algorithm: a warm-up forward, `reps` timed forwards
    /// and (wgpu, when `gpu` is given) one profiled forward for the per-op breakdown.
    fn rows<B: nabla::wan::Backend>(
        &self,
        be: &mut B,
        profiler: Option<&Profiler<B>>,
    ) -> Result<Vec<serde_json::Value>> {
        use nabla::wan::Dit;
        let cfg = self.cfg;
        let (t, lh, lw) = self.input.shape;
        eprintln!(
            "uploading random {} weights ({:?}, {:?} init) ...",
            self.model, self.precision, self.init
        );
        let t0 = std::time::Instant::now();
        let source = nabla::wan::RandomWeights::with_init(cfg, 0, self.init);
        let mut model = Dit::from_source(be, cfg, &source, self.precision)?;
        eprintln!(
            "  {:.1} s, {:.2} GB of weights",
            t0.elapsed().as_secs_f64(),
            model.weight_bytes() as f64 / 1e9
        );
        println!(
            "model    Wan 2.1 {} (dim {}, {} layers), {:?} weights ({:?} init) | latent {t}x{lh}x{lw}, {} tokens",
            self.model,
            cfg.dim,
            cfg.num_layers,
            self.precision,
            self.init,
            t * lh * lw / 4
        );
        let mut rows = Vec::new();
        for algo in self.algos {
            let name = algo
                .map(|x| x.to_string())
                .unwrap_or_else(|| "dense".into());
            let planned =
                model.weight_bytes() + model.activation_bytes((t, lh, lw), algo.is_some());
            // the warm-up forward also reads back each layer's mask density (counts only)
            let mut tr = nabla::wan::Trace::densities_only();
            model.forward(be, self.input, algo.as_ref(), Some(&mut tr))?;
            let density = tr.mean_density();
            let mut times = Vec::new();
            for _ in 0..self.reps.max(1) {
                let t0 = std::time::Instant::now();
                model.forward(be, self.input, algo.as_ref(), None)?;
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            let ms = median(&times);
            // the workspace is allocated once and reused: what is in use after a forward is
            // its peak (CUDA: the device's total - free; wgpu: the allocator's live
            // allocations, on Vulkan and DX12)
            let in_use = be.memory_in_use();
            println!(
                "{name:<24} forward {ms:>10.1} ms{}   planned memory {:.2} GB",
                density
                    .map(|d| format!("   mask density {d:.3} (mean of the layers)"))
                    .unwrap_or_default(),
                planned as f64 / 1e9,
            );
            println!(
                "{:<24} GPU memory in use after the forward (its peak: the workspace is reused): {}",
                "",
                in_use
                    .map(|u| format!("{:.2} GB", u as f64 / 1e9))
                    .unwrap_or_else(|| "unknown (this adapter reports no allocations)".into())
            );
            let breakdown = match profiler {
                Some(p) => {
                    (p.start)(be)?;
                    let r = model.forward(be, self.input, algo.as_ref(), None);
                    let prof = (p.stop)(be);
                    r?;
                    print_breakdown(&prof?)
                }
                None => {
                    println!("  (no per-op breakdown: this adapter has no timestamp queries)");
                    serde_json::Value::Null
                }
            };
            rows.push(json!({"algo": name, "forward_ms": ms, "samples_ms": times, "planned_bytes": planned, "device_bytes_in_use": in_use, "density": density, "layer_densities": tr.densities, "breakdown": breakdown}));
        }
        Ok(rows)
    }
}

fn dit(a: DitArgs) -> Result<()> {
    use nabla::wan::{DitInput, WanConfig, WeightPrecision, WgpuBackend};
    let cfg = match a.model.as_str() {
        "1.3b" | "1.3B" => WanConfig::t2v_1_3b(),
        "14b" | "14B" => WanConfig::t2v_14b(),
        o => return Err(Error::Invalid(format!("--model {o:?}: use 1.3b or 14b"))),
    };
    let precision = match a.weights.as_str() {
        "bf16" => WeightPrecision::BF16,
        "f16" => WeightPrecision::F16,
        "f32" => WeightPrecision::F32,
        o => {
            return Err(Error::Invalid(format!(
                "--weights {o:?}: use bf16, f16 or f32"
            )));
        }
    };
    let (w, h) = a
        .size
        .split_once('*')
        .and_then(|(w, h)| Some((w.parse::<usize>().ok()?, h.parse::<usize>().ok()?)))
        .ok_or_else(|| Error::Invalid(format!("--size {:?}: use W*H, e.g. 1280*720", a.size)))?;
    if a.frames == 0 || !(a.frames - 1).is_multiple_of(4) {
        return Err(Error::Invalid(format!(
            "--frames {}: the Wan VAE needs 4k+1 frames (e.g. 81)",
            a.frames
        )));
    }
    let algos: Vec<Option<SparseAlgo>> = a
        .sparse_algo
        .split(',')
        .map(SparseAlgo::parse_optional)
        .collect::<Result<_>>()?;
    let (mut lh, mut lw) = (h / 8, w / 8);
    if algos.iter().any(|x| x.is_some()) {
        let (ch, cw) = (lh / 16 * 16, lw / 16 * 16);
        if (ch, cw) != (lh, lw) {
            eprintln!(
                "note: sparse attention crops the video to {}x{} (multiples of 128 px), as the reference does",
                cw * 8,
                ch * 8
            );
        }
        (lh, lw) = (ch, cw);
    }
    let t = (a.frames - 1) / 4 + 1;
    let cuda = layer::open(a.backend)?;
    let latent = nabla::synth::noise(1, cfg.in_dim * t * lh * lw, 1.0);
    let context = nabla::synth::noise(2, cfg.text_len * cfg.text_dim, 0.5);
    let input = DitInput {
        latent: &latent,
        shape: (t, lh, lw),
        t: 999.0,
        context: &context,
    };
    let tokens = t * lh * lw / 4;
    let run = DitRun {
        cfg: &cfg,
        precision,
        input: &input,
        algos: &algos,
        reps: a.reps,
        model: &a.model,
        init: a.init,
    };
    let (device, rows) = match &cuda {
        #[cfg(feature = "cuda")]
        Some(c) => {
            let device = format!(
                "{} (CUDA, sm_{}{})",
                c.name(),
                c.compute_capability().0,
                c.compute_capability().1
            );
            println!("device   {device}");
            let mut be = nabla::cuda::CudaBackend::new(c);
            let prof = Profiler {
                start: Box::new(|b: &mut nabla::cuda::CudaBackend<'_>| {
                    b.start_profile();
                    Ok(())
                }),
                stop: Box::new(|b: &mut nabla::cuda::CudaBackend<'_>| b.stop_profile()),
            };
            (device, run.rows(&mut be, Some(&prof))?)
        }
        #[cfg(not(feature = "cuda"))]
        Some(never) => match *never {},
        None => {
            let gpu = Gpu::new()?;
            let device = format!(
                "{} ({} {})",
                gpu.caps().name,
                gpu.caps().driver,
                gpu.caps().driver_info
            );
            println!("adapter  {device}");
            let mut be = WgpuBackend::new(&gpu);
            let prof = Profiler {
                start: Box::new(|_: &mut WgpuBackend<'_>| gpu.start_profile()),
                stop: Box::new(|_: &mut WgpuBackend<'_>| Ok(gpu.stop_profile())),
            };
            let prof = gpu.caps().timestamps.then_some(&prof);
            (device, run.rows(&mut be, prof)?)
        }
    };
    if let Some(p) = &a.json {
        let doc = json!({"adapter": device, "backend": if cuda.is_some() { "cuda" } else { "wgpu" }, "model": a.model, "weights": a.weights, "init": format!("{:?}", a.init), "latent": [t, lh, lw], "tokens": tokens, "rows": rows});
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| Error::file(p.clone(), e))?;
    }
    Ok(())
}

/// The category of a kernel in a per-op breakdown, from its pipeline name.
fn op_category(kernel: &str) -> &'static str {
    let base = kernel.split('[').next().unwrap_or(kernel);
    match base {
        b if b.starts_with("linalg/") => "GEMM (linear)",
        b if b.starts_with("attention/") => "attention",
        "nabla/fractal" => "fractal reorder",
        b if b.starts_with("nabla/") => "NABLA mask",
        b if b.contains("rope") => "RoPE",
        b if b.contains("norm") => "norms + modulation",
        b if b.contains("patch") => "patch embed / unpatchify",
        _ => "elementwise + heads",
    }
}

/// Prints the GPU time of one profiled forward by category and by kernel; returns it as JSON.
fn print_breakdown(
    prof: &std::collections::BTreeMap<String, nabla::KernelTime>,
) -> serde_json::Value {
    let total: f64 = prof.values().map(|k| k.ms).sum();
    let mut cats: Vec<(&str, f64, usize)> = Vec::new();
    for (name, k) in prof {
        let c = op_category(name);
        match cats.iter_mut().find(|x| x.0 == c) {
            Some(x) => {
                x.1 += k.ms;
                x.2 += k.count;
            }
            None => cats.push((c, k.ms, k.count)),
        }
    }
    cats.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!(
        "  per-op GPU time of one profiled forward (each dispatch timed alone): {total:.1} ms"
    );
    for (c, ms, n) in &cats {
        println!(
            "    {c:<26} {ms:>10.1} ms  {:>5.1} %  {n:>6} dispatches",
            100.0 * ms / total.max(1e-9)
        );
    }
    let mut kernels: Vec<_> = prof.iter().collect();
    kernels.sort_by(|a, b| b.1.ms.total_cmp(&a.1.ms));
    println!("    top kernels:");
    for (name, k) in kernels.iter().take(6) {
        println!(
            "      {name:<48} {:>10.1} ms  {:>6} x {:>8.3} ms",
            k.ms,
            k.count,
            k.ms / k.count.max(1) as f64
        );
    }
    json!({
        "total_ms": total,
        "categories": cats.iter().map(|(c, ms, n)| json!({"category": c, "ms": ms, "dispatches": n})).collect::<Vec<_>>(),
        "kernels": kernels.iter().map(|(name, k)| json!({"kernel": name, "ms": k.ms, "dispatches": k.count})).collect::<Vec<_>>(),
    })
}

#[derive(clap::Args)]
pub struct GemmArgs {
    /// Kernels to time, comma separated: portable, coop (wgpu), coop-frag (wgpu, the weights
    /// as f16 in fragment order: W's B fragments built from storage), cublaslt (the CUDA layer,
    /// in a `--features cuda` build).
    #[arg(long, default_value = "portable,coop")]
    kernels: String,
    /// Weight storage: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Storage of x on the wgpu layer: f32, or f16 (what the Wan DiT feeds the tensor-core
    /// kernel, its GEMM-only activations).
    #[arg(long, default_value = "f32")]
    x_dtype: String,
    /// Time every tile configuration of the tensor-core kernel on each shape first (the
    /// adapter's auto-tune, stored in the tuning cache) and print them.
    #[arg(long)]
    tune: bool,
    /// Rows M of the DiT shapes (tokens): 67200 = 14B at 1280x640, 81 frames.
    #[arg(long, default_value_t = 67200)]
    tokens: usize,
    /// Timed samples per shape and kernel, taken right after a warm-up of at least 300 ms of
    /// GPU work and 3 runs (the median and the best are reported).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Only the shapes whose name contains one of these comma-separated words (any case):
    /// e.g. `square,14b` or `ffn.0`. Default: every shape.
    #[arg(long)]
    shapes: Option<String>,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The shapes whose name contains one of the comma-separated `filter` words (any case), or
/// all of them without a filter; an error naming the shapes when none matches.
fn filter_shapes<T: Copy>(
    shapes: &[(&'static str, T)],
    filter: Option<&str>,
) -> Result<Vec<(&'static str, T)>> {
    let Some(f) = filter else {
        return Ok(shapes.to_vec());
    };
    let words: Vec<String> = f
        .split(',')
        .map(|w| w.trim().to_lowercase())
        .filter(|w| !w.is_empty())
        .collect();
    let kept: Vec<_> = shapes
        .iter()
        .filter(|(name, _)| words.iter().any(|w| name.to_lowercase().contains(w)))
        .copied()
        .collect();
    if kept.is_empty() {
        let names: Vec<&str> = shapes.iter().map(|(n, _)| *n).collect();
        return Err(Error::Invalid(format!(
            "--shapes {f:?} matches none of the shapes: {}",
            names.join(", ")
        )));
    }
    Ok(kept)
}

/// GPU time a kernel's warm-up reaches before it is timed (`bench gemm`; the RoPE producer and
/// the DiT-form mask of `bench attention`): long enough for the clocks to climb back after the seconds the bench
/// spends on the CPU making and uploading the next inputs.
const WARM_MS: f64 = 300.0;
/// Runs a warm-up makes at least (pipeline creation, caches, first-call costs).
const WARM_RUNS: usize = 3;
/// Wall time after which a warm-up stops short of [`WARM_MS`] (a device whose timestamps
/// read zero would never get there).
const WARM_WALL: std::time::Duration = std::time::Duration::from_secs(20);
/// GPU time of one timed sample at least: a kernel shorter than this is recorded as several
/// back-to-back copies per sample (no idle gap between them, as inside a model).
const SAMPLE_MS: f64 = 2.0;
/// At most this many copies in one timed sample.
const SAMPLE_COPIES: usize = 64;
/// At most this many copies in one warm-up submission.
const WARM_CHUNK: usize = 1024;

/// How one kernel (a GEMM, a RoPE producer, a mask) was timed by [`time_warmed`].
struct WarmTiming {
    /// GPU ms of one run in each timed sample (a sample's time over its copies).
    samples: Vec<f64>,
    /// Back-to-back copies per timed sample.
    copies: usize,
    /// Runs of the warm-up.
    warm_runs: usize,
    /// GPU ms of the warm-up after its first run.
    warm_ms: f64,
}

impl WarmTiming {
    /// Median ms of one run.
    fn median(&self) -> f64 {
        median(&self.samples)
    }

    /// Best (smallest) ms of one run.
    fn best(&self) -> f64 {
        self.samples.iter().copied().fold(f64::NAN, f64::min)
    }
}

/// Warms one kernel up and times it, on either layer. `run(reps, copies)` runs `reps` timed
/// samples of `copies` back-to-back copies each and returns each sample's GPU ms per copy.
///
/// The warm-up runs right before the timing and lasts until it has made
/// [`WARM_RUNS`] runs and [`WARM_MS`] of GPU time after the first run (or
/// [`WARM_WALL`] passed),
/// submitting a few large batches so the GPU stays busy; then `reps` samples follow at once,
/// each of enough copies to last [`SAMPLE_MS`] at the warm speed.
fn time_warmed(
    reps: usize,
    mut run: impl FnMut(usize, usize) -> Result<Vec<f64>>,
) -> Result<WarmTiming> {
    let started = std::time::Instant::now();
    let (mut warm_runs, mut warm_ms, mut per) = (0usize, 0.0f64, f64::NAN);
    let mut chunk = 1usize;
    while warm_runs < WARM_RUNS || (warm_ms < WARM_MS && started.elapsed() < WARM_WALL) {
        per = run(1, chunk)?.first().copied().unwrap_or(f64::NAN);
        // the first run's time may include one-off setup inside its events (cuBLASLt's first
        // call on a shape): it counts as a run but not toward the GPU time
        if warm_runs > 0 && per.is_finite() && per > 0.0 {
            warm_ms += per * chunk as f64;
        }
        warm_runs += chunk;
        // the next chunk: what is left of the GPU time (or of the runs) in one submission
        let left = (WARM_MS - warm_ms) / per;
        let by_time = if left.is_finite() && left > 0.0 {
            left.ceil().min(WARM_CHUNK as f64) as usize
        } else {
            1
        };
        chunk = by_time
            .max(WARM_RUNS.saturating_sub(warm_runs))
            .clamp(1, WARM_CHUNK);
    }
    let copies = if per.is_finite() && per > 0.0 {
        ((SAMPLE_MS / per).ceil() as usize).clamp(1, SAMPLE_COPIES)
    } else {
        1
    };
    Ok(WarmTiming {
        samples: run(reps.max(1), copies)?,
        copies,
        warm_runs,
        warm_ms,
    })
}

/// Times cuBLASLt on the CUDA layer as the DiT's fast path calls it: x already in the weights'
/// type (f32 for f32 weights), f32 output with the bias fused, warmed up and timed by
/// [`time_warmed`] with CUDA events. Returns the timing and the output.
#[cfg(feature = "cuda")]
fn cublaslt_linear(
    c: &nabla::cuda::Cuda,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    (m, n, k): (usize, usize, usize),
    dtype: &str,
    reps: usize,
) -> Result<(WarmTiming, Vec<f32>)> {
    use nabla::ops::linear::Activation;
    let dt = match dtype {
        "f16" => DType::F16,
        "f32" => DType::F32,
        _ => DType::BF16,
    };
    let xt = c.upload_as(x, &[m, k], dt)?;
    let wt = c.upload_as(w, &[n, k], dt)?;
    let bt = c.upload_f32(b, &[n])?;
    let out = c.empty(&[m, n], DType::F32)?;
    let t = time_warmed(reps, |reps, copies| {
        let t = nabla::cuda::attention::time_ms(c, 0, reps, || {
            for _ in 0..copies {
                nabla::cuda::gemm::linear(c, &xt, &wt, Some(&bt), Activation::None, &out)?;
            }
            Ok(())
        })?;
        Ok(t.into_iter().map(|ms| ms / copies as f64).collect())
    })?;
    Ok((t, c.download_f32(&out)?))
}

fn gemm(a: GemmArgs) -> Result<()> {
    use nabla::ops::linear::{Activation, LinearKernel, record_linear_with};
    let gpu = Gpu::new()?;
    let caps = gpu.caps().clone();
    // None: cuBLASLt on the CUDA layer
    let kernels: Vec<(String, Option<LinearKernel>)> = a
        .kernels
        .split(',')
        .map(|k| match k.trim() {
            "portable" => Ok(("portable".to_string(), Some(LinearKernel::Portable))),
            "coop" => Ok(("coop".to_string(), Some(LinearKernel::Coop))),
            "coop-frag" => Ok(("coop-frag".to_string(), Some(LinearKernel::Coop))),
            "cublaslt" => Ok(("cublaslt".to_string(), None)),
            o => Err(Error::Invalid(format!(
                "--kernels: {o:?} is not portable, coop, coop-frag or cublaslt"
            ))),
        })
        .collect::<Result<_>>()?;
    let cuda = if kernels.iter().any(|k| k.1.is_none()) {
        layer::open(layer::BackendArg::Cuda)?
    } else {
        None
    };
    let x_dtype = match a.x_dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        o => {
            return Err(Error::Invalid(format!(
                "--x-dtype: {o:?} is not f32 or f16"
            )));
        }
    };
    let m = a.tokens;
    let shapes = filter_shapes(
        &[
            ("square 4096", (4096, 4096, 4096)),
            ("14B qkvo 5120->5120", (m, 5120, 5120)),
            ("14B ffn.0 5120->13824", (m, 13824, 5120)),
            ("14B ffn.2 13824->5120", (m, 5120, 13824)),
            ("1.3B qkvo 1536->1536", (m, 1536, 1536)),
            ("1.3B ffn.0 1536->8960", (m, 8960, 1536)),
            ("1.3B ffn.2 8960->1536", (m, 1536, 8960)),
            ("text 4096->5120 (512 rows)", (512, 5120, 4096)),
        ],
        a.shapes.as_deref(),
    )?;
    let mut rows = Vec::new();
    println!(
        "adapter  {} ({}, {} {}) | weights {} | x {}",
        caps.name, caps.backend, caps.driver, caps.driver_info, a.dtype, a.x_dtype
    );
    println!(
        "timing   per shape and kernel: a warm-up of >= {WARM_MS} ms of GPU work and >= \
         {WARM_RUNS} runs, then {} samples at once (GPU timestamps; a GEMM under \
         {SAMPLE_MS} ms is timed as back-to-back copies); median and best",
        a.reps.max(1)
    );
    println!(
        "{:<28} {:>7} {:>6} {:>6} {:<9} {:>10} {:>10} {:>9} {:>9} {:>10}",
        "shape", "M", "N", "K", "kernel", "ms med", "ms best", "TFLOP/s", "best", "rel err"
    );
    for (name, (m, n, k)) in shapes {
        let mut rng = 0x1234_5678u64 ^ (m * n * k) as u64;
        let mut rnd = |len: usize, scale: f32| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    ((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
                })
                .collect()
        };
        let xv = rnd(m * k, 2.0);
        let x = match x_dtype {
            DType::F16 => gpu.upload_f16(&xv, &[m, k])?,
            _ => gpu.upload_f32(&xv, &[m, k])?,
        };
        let wv = rnd(n * k, 0.1);
        let w = match a.dtype.as_str() {
            "f16" => gpu.upload_f16(&wv, &[n, k])?,
            "f32" => gpu.upload_f32(&wv, &[n, k])?,
            _ => gpu.upload_bf16(&wv, &[n, k])?,
        };
        // coop-frag: the same weights as f16 in fragment order (the values the coop kernel
        // stages: bf16 weights rounded to bf16 first), so its result matches coop's
        let w_frag = if kernels.iter().any(|k| k.0 == "coop-frag") && k % 32 == 0 {
            let vals: Vec<f32> = if a.dtype == "bf16" {
                wv.iter()
                    .map(|v| half::bf16::from_f32(*v).to_f32())
                    .collect()
            } else {
                wv.clone()
            };
            Some(gpu.upload_f16_frag(&vals, &[n, k])?)
        } else {
            None
        };
        drop(wv);
        let bv = rnd(n, 1.0);
        let b = gpu.upload_f32(&bv, &[n])?;
        if a.tune && kernels.iter().any(|k| k.1 == Some(LinearKernel::Coop)) {
            let wdt = w.dtype();
            for r in nabla::ops::linear::tune_linear(&gpu, &[(m, n, k)], wdt, x_dtype, true)? {
                let all: Vec<String> = r
                    .times
                    .iter()
                    .map(|(c, ms)| format!("{}x{} {ms:.3}", c.tile_rows, c.group))
                    .collect();
                println!(
                    "  tune {name}: chose tile rows {} group {} (ms by tile rows x group: {})",
                    r.chosen.tile_rows,
                    r.chosen.group,
                    all.join(", ")
                );
            }
        }
        let mut first: Option<Vec<f32>> = None;
        for (kn, kernel) in &kernels {
            let w = if kn == "coop-frag" {
                let Some(wf) = &w_frag else {
                    println!(
                        "{name:<28} {m:>7} {n:>6} {k:>6} {kn:<9} unavailable: K is not a multiple of 32"
                    );
                    continue;
                };
                wf
            } else {
                &w
            };
            let (t, y) = match kernel {
                Some(kernel) => {
                    let out = gpu.empty(&[m, n], DType::F32)?;
                    let timed = time_warmed(a.reps, |reps, copies| {
                        gpu.time_ms_inner(reps, copies, |bt| {
                            record_linear_with(bt, &x, w, Some(&b), Activation::None, &out, *kernel)
                        })
                    });
                    match timed {
                        Ok(t) => (t, gpu.read_f32(&out)?),
                        Err(e) => {
                            println!("{name:<28} {m:>7} {n:>6} {k:>6} {kn:<9} unavailable: {e}");
                            continue;
                        }
                    }
                }
                None => match &cuda {
                    #[cfg(feature = "cuda")]
                    Some(c) => cublaslt_linear(
                        c,
                        &xv,
                        &gpu.read_f32(w)?,
                        &bv,
                        (m, n, k),
                        &a.dtype,
                        a.reps,
                    )?,
                    #[cfg(not(feature = "cuda"))]
                    Some(never) => match *never {},
                    None => continue,
                },
            };
            let (ms, best) = (t.median(), t.best());
            let flop = 2.0 * (m * n * k) as f64;
            let (tf, tf_best) = (flop / (ms * 1e-3) / 1e12, flop / (best * 1e-3) / 1e12);
            let err = match &first {
                Some(f) => rel_err(&y, f),
                None => {
                    first = Some(y);
                    0.0
                }
            };
            println!(
                "{name:<28} {m:>7} {n:>6} {k:>6} {kn:<9} {ms:>10.3} {best:>10.3} {tf:>9.1} {tf_best:>9.1} {err:>10.2e}"
            );
            rows.push(json!({
                "shape": name, "m": m, "n": n, "k": k, "kernel": kn,
                "ms": ms, "ms_best": best, "tflops": tf, "tflops_best": tf_best,
                "rel_err_vs_first_kernel": err, "samples_ms": t.samples,
                "copies_per_sample": t.copies, "warmup_runs": t.warm_runs, "warmup_gpu_ms": t.warm_ms,
            }));
        }
    }
    if let Some(p) = &a.json {
        let doc = json!({"adapter": caps.name, "driver": format!("{} {}", caps.driver, caps.driver_info), "weights": a.dtype, "rows": rows});
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| Error::file(p.clone(), e))?;
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct AttnArgs {
    /// A preset (wan14b-720p, wan1.3b-480p, tiny) or B,H,S,D (grid then S/64 x 1 x 1 blocks).
    #[arg(long, default_value = "wan1.3b-480p")]
    pub(super) shape: String,
    /// One or more algorithms, comma separated (e.g. nabla-0.7,nabla-0.4,nabla-0.6_sta-11-3-3).
    #[arg(long, default_value = "nabla-0.7")]
    pub(super) sparse_algo: String,
    /// Storage of q/k/v: auto (f16 where the adapter has SHADER_F16), f16 or f32.
    #[arg(long, default_value = "auto")]
    pub(super) dtype: String,
    /// Timed repetitions for masks and sparse attention (median reported).
    #[arg(long, default_value_t = 10)]
    pub(super) reps: usize,
    /// Timed repetitions of dense attention (0 skips dense and the error column).
    #[arg(long, default_value_t = 3)]
    pub(super) dense_reps: usize,
    /// Attention kernel: auto (tensor cores where available), portable, coop, pairs (the
    /// tensor-core kernel with two query blocks per workgroup, also for the sparse masks) or
    /// regs (the tensor-core kernel with the softmax in registers, where it can run).
    #[arg(long, default_value = "auto")]
    pub(super) kernel: String,
    /// Write the results as JSON.
    #[arg(long)]
    pub(super) json: Option<PathBuf>,
    /// Write the masks used ([H, Nb, Nb] u8 per algorithm) for benches/torch_attention.py.
    #[arg(long)]
    pub(super) masks_out: Option<PathBuf>,
    /// Seed of the synthetic inputs.
    #[arg(long, default_value_t = 0)]
    pub(super) seed: u64,
    /// Device layer: wgpu (default) or cuda (the CUDA kernels; --dtype auto means f16 there,
    /// bf16 is accepted too).
    #[arg(long, value_enum, default_value = "wgpu")]
    pub(super) backend: layer::BackendArg,
}

pub(super) struct Shape {
    pub(super) name: String,
    pub(super) b: usize,
    pub(super) h: usize,
    pub(super) d: usize,
    pub(super) grid: BlockGrid,
    pub(super) token_grid: Option<(usize, usize, usize)>,
}

pub(super) fn parse_shape(s: &str) -> Result<Shape> {
    let preset = |name: &str, h, d, f, th, tw| -> Result<Shape> {
        Ok(Shape {
            name: name.into(),
            b: 1,
            h,
            d,
            grid: BlockGrid::from_tokens(f, th, tw)?,
            token_grid: Some((f, th, tw)),
        })
    };
    match s {
        "wan14b-720p" => preset(s, 40, 128, 21, 40, 80),
        "wan1.3b-480p" => preset(s, 12, 128, 21, 24, 48),
        "tiny" => preset(s, 2, 64, 2, 16, 16),
        _ => {
            let v: Vec<usize> = s
                .split(',')
                .map(|x| x.trim().parse())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| bad_shape(s))?;
            let [b, h, sq, d] = v.as_slice() else {
                return Err(bad_shape(s));
            };
            if *sq == 0 || sq % BLOCK != 0 {
                return Err(Error::Invalid(format!(
                    "--shape {s}: S = {sq} must be a positive multiple of 64"
                )));
            }
            Ok(Shape {
                name: s.into(),
                b: *b,
                h: *h,
                d: *d,
                grid: BlockGrid::new(sq / BLOCK, 1, 1)?,
                token_grid: None,
            })
        }
    }
}

fn bad_shape(s: &str) -> Error {
    Error::Invalid(format!(
        "--shape {s:?}: use wan14b-720p, wan1.3b-480p, tiny, or B,H,S,D"
    ))
}

fn upload(gpu: &Gpu, x: &[f32], shape: &[usize], dt: DType) -> Result<Tensor> {
    match dt {
        DType::F16 => gpu.upload_f16(x, shape),
        _ => gpu.upload_f32(x, shape),
    }
}

/// A mask dump of `bench attention` for `benches/torch_attention.py`: `[BH, Nb, Nb]` u8 masks
/// with the shape in the metadata.
pub(super) type MaskDump = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// Writes a mask dump (`(heads, head_dim, tokens)` and the block grid in the metadata).
pub(super) fn write_masks(
    p: &std::path::Path,
    masks: &MaskDump,
    (bh, d, s): (usize, usize, usize),
    grid: BlockGrid,
    preset: &str,
) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert("heads".to_string(), bh.to_string());
    meta.insert("head_dim".to_string(), d.to_string());
    meta.insert("tokens".to_string(), s.to_string());
    meta.insert(
        "grid".to_string(),
        format!("{},{},{}", grid.t, grid.hb, grid.wb),
    );
    meta.insert("preset".to_string(), preset.to_string());
    write_safetensors(p, masks, meta)?;
    eprintln!("masks written to {}", p.display());
    Ok(())
}

/// The per-algorithm table of `bench attention` (both layers).
pub(super) fn print_attention_rows(rows: &[serde_json::Value]) {
    println!(
        "{:<24} {:>8} {:>10} {:>11} {:>9} {:>12} {:>11} {:>10}",
        "algo",
        "density",
        "mask ms",
        "sparse ms",
        "speed-up",
        "eff TFLOP/s",
        "mask GB/s",
        "rel err"
    );
    for r in rows {
        println!(
            "{:<24} {:>8.4} {:>10.3} {:>11.3} {:>9.2} {:>12.1} {:>11.0} {:>10.2e}",
            r["algo"].as_str().unwrap_or(""),
            r["density"].as_f64().unwrap_or(f64::NAN),
            r["mask_ms"].as_f64().unwrap_or(f64::NAN),
            r["sparse_ms"].as_f64().unwrap_or(f64::NAN),
            r["speedup"].as_f64().unwrap_or(f64::NAN),
            r["effective_tflops"].as_f64().unwrap_or(f64::NAN),
            r["mask_read_gbs"].as_f64().unwrap_or(f64::NAN),
            r["rel_err_vs_dense"].as_f64().unwrap_or(f64::NAN),
        );
    }
}

pub(super) fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut n, mut d) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        n += (*x as f64 - *y as f64).powi(2);
        d += (*y as f64).powi(2);
    }
    (n / d.max(1e-300)).sqrt()
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    let a = match cmd {
        BenchCmd::Attention(a) => a,
        BenchCmd::Gemm(g) => return gemm(g),
        BenchCmd::Dit(d) => return dit(d),
        BenchCmd::Occupancy(o) => return super::bench_occupancy::run(o),
        BenchCmd::Bandwidth(b) => return super::bench_bandwidth::run(b),
    };
    let sh = parse_shape(&a.shape)?;
    let algos: Vec<SparseAlgo> = a
        .sparse_algo
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_>>()?;
    if let Some(_cuda) = layer::open(a.backend)? {
        #[cfg(feature = "cuda")]
        return super::bench_cuda::attention(&_cuda, &a, &sh, &algos);
    }
    let gpu = Gpu::new()?;
    let caps = gpu.caps().clone();
    let dt = match a.dtype.as_str() {
        "auto" => {
            if caps.f16 {
                DType::F16
            } else {
                DType::F32
            }
        }
        "f16" => DType::F16,
        "f32" => DType::F32,
        o => {
            return Err(Error::Invalid(format!(
                "--dtype {o:?}: use auto, f16 or f32"
            )));
        }
    };
    let kernel = match a.kernel.as_str() {
        "auto" => nabla::attention::resolve(&gpu, dt, sh.d, Kernel::Auto)?,
        "portable" => Kernel::Portable,
        "coop" => Kernel::Coop,
        "pairs" => Kernel::CoopPairs,
        "regs" => Kernel::CoopRegs,
        o => {
            return Err(Error::Invalid(format!(
                "--kernel {o:?}: use auto, portable, coop, pairs or regs"
            )));
        }
    };
    let (b, h, d, grid) = (sh.b, sh.h, sh.d, sh.grid);
    let (s, nb, bh) = (grid.tokens(), grid.blocks(), b * h);
    let shape = [b, h, s, d];
    eprintln!("generating inputs [{b}, {h}, {s}, {d}] ...");
    let heads_all = b * h;
    let q = structured(&grid, heads_all, d, Role::Query, a.seed);
    let k = structured(&grid, heads_all, d, Role::Key, a.seed);
    let v = structured(&grid, heads_all, d, Role::Value, a.seed);
    let (qt, kt, vt) = (
        upload(&gpu, &q, &shape, dt)?,
        upload(&gpu, &k, &shape, dt)?,
        upload(&gpu, &v, &shape, dt)?,
    );
    drop((q, k, v));
    let flop_dense = 4.0 * (s as f64).powi(2) * d as f64 * bh as f64;

    // dense reference once (also the baseline time)
    let mut dense_ms = f64::NAN;
    let mut dense_out = None;
    if a.dense_reps > 0 {
        eprintln!("dense attention ...");
        let out = gpu.empty(&shape, dt)?;
        let t = gpu.time_ms(a.dense_reps + 1, |bt| {
            record_dense_attention_with(bt, &qt, &kt, &vt, &out, kernel)
        })?;
        dense_ms = median(&t[1..]);
        dense_out = Some(gpu.read_f32(&out)?);
    }

    let stages = MaskStages::alloc(&gpu, bh, nb, d)?;
    // the DiT's q/k producer (batch 1) with and without the mask's pooling fused in; a custom
    // B,H,S,D shape takes the token grid of its S/64 x 1 x 1 blocks (8x8 patches per frame)
    let fused = match b {
        1 if algos.iter().any(|x| x.cut().is_some()) => {
            let tok = sh.token_grid.unwrap_or((grid.t, grid.hb * 8, grid.wb * 8));
            Some(time_rope_pool(
                &gpu, a.reps, a.seed, tok, h, d, dt, &stages,
            )?)
        }
        _ => None,
    };
    let mut fused_rows = Vec::new();
    let mut rows = Vec::new();
    let mut masks_dump = Vec::new();
    for algo in &algos {
        eprintln!("{algo} ...");
        let mut prepooled_ms = None;
        let (mask, mask_ms, mask_all) = match algo {
            SparseAlgo::Sta(w) => (
                BlockMask::sta(&gpu, grid, *w)?.as_ref().clone(),
                0.0,
                vec![],
            ),
            _ => {
                let m = BlockMask::alloc(&gpu, bh, nb)?;
                let t = gpu.time_ms_inner(a.reps + 2, 10, |bt| {
                    record_estimate_mask(bt, &qt, &kt, grid, algo, &stages, &m)
                })?;
                if fused.is_some() {
                    // the rest of the mask from the pooled q/k the estimate above left in
                    // `stages` (the same rows the fused producer would leave), in the DiT's
                    // form: the probabilities are not written back. Warmed up right before its
                    // samples: after the previous algorithm's attention, unwarmed samples of
                    // it read up to 3x the warm time on the H200 (benches/RESULTS.md, session 14)
                    let dit = MaskStages {
                        keep_probs: false,
                        ..stages.clone()
                    };
                    let tp = time_warmed(a.reps, |r, c| {
                        gpu.time_ms_inner(r, c, |bt| {
                            record_mask_from_pooled(bt, grid, algo, &dit, &m)
                        })
                    })?;
                    prepooled_ms = Some(tp.median());
                }
                (m, median(&t[2..]), t)
            }
        };
        let stages_ms = match algo {
            SparseAlgo::Sta(_) => vec![],
            _ => time_mask_stages(&gpu, &qt, &kt, grid, algo, a.reps)?.to_vec(),
        };
        if !stages_ms.is_empty() {
            eprintln!(
                "  mask stages: pool {:.3} ms, scores {:.3} ms, softmax+threshold+lists {:.3} ms",
                stages_ms[0], stages_ms[1], stages_ms[2]
            );
        }
        if let (Some(f), Some(rest_ms)) = (&fused, prepooled_ms) {
            fused_rows.push(f.report(algo, rest_ms));
        }
        let density = mask.density(&gpu)?;
        let out = gpu.empty(&shape, dt)?;
        let t = gpu.time_ms(a.reps + 1, |bt| {
            record_attention_with(bt, &qt, &kt, &vt, &mask, &out, kernel)
        })?;
        let sparse_ms = median(&t[1..]);
        let sparse_all = t.clone();
        let err = match &dense_out {
            Some(dref) => rel_err(&gpu.read_f32(&out)?, dref),
            None => f64::NAN,
        };
        let eff_tflops = flop_dense * density / (sparse_ms * 1e-3) / 1e12;
        let mask_gbs = (2 * bh * s * d) as f64 * dt.size() as f64 / (mask_ms * 1e-3) / 1e9;
        rows.push(json!({
            "algo": algo.to_string(), "density": density, "mask_ms": mask_ms, "sparse_ms": sparse_ms,
            "dense_ms": dense_ms, "speedup": dense_ms / sparse_ms, "effective_tflops": eff_tflops,
            "mask_read_gbs": mask_gbs, "rel_err_vs_dense": err,
            "mask_stage_ms": stages_ms, "mask_ms_samples": mask_all, "sparse_ms_samples": sparse_all,
        }));
        if a.masks_out.is_some() {
            let mut dense = mask.to_dense(&gpu)?;
            if mask.heads() == 1 {
                dense = dense.repeat(bh);
            }
            masks_dump.push((
                format!("mask_{algo}"),
                safetensors::Dtype::U8,
                vec![bh, nb, nb],
                dense,
            ));
        }
    }

    let dense_tflops = flop_dense / (dense_ms * 1e-3) / 1e12;
    println!();
    println!(
        "adapter  {} ({}, {} {})",
        caps.name, caps.backend, caps.driver, caps.driver_info
    );
    println!(
        "shape    {} : B={b} H={h} S={s} D={d}, {nb} blocks of 64{} | storage {dt:?}, kernel {kernel:?}",
        sh.name,
        sh.token_grid
            .map(|(f, y, x)| format!(", token grid {f}x{y}x{x}"))
            .unwrap_or_default()
    );
    println!(
        "dense    {dense_ms:.3} ms ({dense_tflops:.1} TFLOP/s, {:.1} TFLOP)",
        flop_dense / 1e12
    );
    println!();
    print_attention_rows(&rows);
    if let Some(p) = &a.json {
        let doc = json!({
            "adapter": caps.name, "backend": caps.backend, "driver": format!("{} {}", caps.driver, caps.driver_info),
            "shape": sh.name, "kernel": format!("{kernel:?}"), "b": b, "h": h, "s": s, "d": d, "blocks": nb, "dtype": format!("{dt:?}"),
            "dense_ms": dense_ms, "dense_tflops": dense_tflops, "rows": rows,
            "mask_fused_pooling": fused_rows,
        });
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| Error::file(p.clone(), e))?;
    }
    if let Some(p) = &a.masks_out {
        write_masks(p, &masks_dump, (bh, d, s), grid, &sh.name)?;
    }
    Ok(())
}

/// GPU times of the DiT's q/k producer at a bench shape, q and k together: RoPE + head split
/// alone, and with the mask's pooling fused in (which leaves the pooled q/k in the mask scratch
/// for the prepooled estimate). Shared by the wgpu and CUDA attention benches.
pub(super) struct RopePoolTimes {
    pub(super) rope_ms: f64,
    pub(super) rope_pool_ms: f64,
}

impl RopePoolTimes {
    /// Prints the mask's cost in the DiT's form (the pooling's cost inside the RoPE plus
    /// `prepooled_ms`, the rest of the estimate from the pooled q/k) and returns its JSON row.
    ///
    /// A producer with the pooling cannot cost less than without it: when the baseline reads
    /// slower, the pooling counts as free and the line says so. (On the H200 the unfused
    /// baseline runs 1.53 ms in most processes and 3.6 ms in some, two of six in session 14,
    /// warmed up or not, while the fused kernel holds at 1.52-1.53 ms: benches/RESULTS.md.)
    pub(super) fn report(&self, algo: &SparseAlgo, prepooled_ms: f64) -> serde_json::Value {
        let diff = self.rope_pool_ms - self.rope_ms;
        let pool_ms = diff.max(0.0);
        let note = if diff < 0.0 {
            format!(
                "; the baseline read {:.3} ms slower: none measurable",
                -diff
            )
        } else {
            String::new()
        };
        eprintln!(
            "  mask with pooling fused into RoPE: {:.3} ms = pooling's cost in RoPE {pool_ms:.3} \
             ms (rope {:.3} -> rope+pool {:.3} ms, q and k{note}) + scores, softmax, threshold, \
             lists {prepooled_ms:.3} ms",
            pool_ms + prepooled_ms,
            self.rope_ms,
            self.rope_pool_ms
        );
        json!({"algo": algo.to_string(), "rope_ms": self.rope_ms,
            "rope_pool_ms": self.rope_pool_ms, "prepooled_mask_ms": prepooled_ms,
            "pooling_ms": pool_ms, "mask_ms": pool_ms + prepooled_ms})
    }
}

/// Times the fused RoPE + head split of q and k without the pooling (the DiT's producer when
/// no mask is estimated, `WgpuBackend::rope_split_heads`) against the same kernel with it, on
/// synthetic `[S, H·D]` activations with the fractal RoPE tables of the token grid `tok`.
#[allow(clippy::too_many_arguments)]
fn time_rope_pool(
    gpu: &Gpu,
    reps: usize,
    seed: u64,
    tok: (usize, usize, usize),
    h: usize,
    d: usize,
    dt: DType,
    stages: &MaskStages,
) -> Result<RopePoolTimes> {
    use nabla::ops::rope;
    eprintln!("RoPE + pooling producer ...");
    let s = tok.0 * tok.1 * tok.2;
    let (cos, sin) = rope::upload_rope_tables(gpu, tok, d, true)?;
    let x = nabla::synth::noise(seed ^ 0x5eed, s * h * d, 1.0);
    let (xq, xk) = (
        gpu.upload_f32(&x, &[s, h * d])?,
        gpu.upload_f32(&x, &[s, h * d])?,
    );
    drop(x);
    let (oq, ok) = (gpu.empty(&[1, h, s, d], dt)?, gpu.empty(&[1, h, s, d], dt)?);
    // the baseline: the DiT's producer without a mask, the same kernel without the pooling.
    // Each is warmed up right before its samples, as the GEMMs of `bench gemm` are. The
    // baseline still reads 1.53 ms in most processes and 3.6 ms in some on the H200, warmed up
    // or not (benches/RESULTS.md, sessions 5 and 14): `RopePoolTimes::report` says so.
    let rope = time_warmed(reps, |r, c| {
        gpu.time_ms_inner(r, c, |b| {
            nabla::nabla::record_rope_split_heads(b, &xq, &cos, &sin, &oq)?;
            nabla::nabla::record_rope_split_heads(b, &xk, &cos, &sin, &ok)
        })
    })?;
    let rope_pool = time_warmed(reps, |r, c| {
        gpu.time_ms_inner(r, c, |b| {
            record_rope_split_heads_pooled(b, &xq, &cos, &sin, &oq, stages, QkSide::Q)?;
            record_rope_split_heads_pooled(b, &xk, &cos, &sin, &ok, stages, QkSide::K)
        })
    })?;
    Ok(RopePoolTimes {
        rope_ms: rope.median(),
        rope_pool_ms: rope_pool.median(),
    })
}
