//! `nabla generate` (a Wan 2.1 checkpoint) and `nabla demo` (tiny random-weight models): the
//! whole text-to-video pipeline with a progress line, stage timings and memory at the end.

use nabla::wan::WeightPrecision;
use nabla::wan::pipeline::{
    GenerateOptions, Pipeline, Progress, Stage, Task, Video, is_cancelled, parse_size,
};
use nabla::wan::sampler::Solver;
use nabla::{Error, Gpu, Result, SparseAlgo};
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How the video is written (shown by `--help`).
const VIDEO_HELP: &str = "The video is written as an H.264 .mp4 (Constrained Baseline, yuv420p, \
16 fps, fast start) by the encoder built into this binary (OpenH264 compiled from source); no \
ffmpeg or other program is needed.";

/// Sampling flags shared by `generate` and `demo` (the reference's names, in kebab case).
#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// Video size W*H in pixels [generate: 1280*720 for t2v-14B, 832*480 for t2v-1.3B;
    /// demo: 256*256]. With sparse attention it is rounded down to multiples of 128 as the
    /// reference does (1280*720 -> 1280*640), with a note.
    #[arg(long)]
    size: Option<String>,
    /// Frames, 4k+1 [generate: 81; demo: 17].
    #[arg(long)]
    frame_num: Option<usize>,
    /// The prompt; longer than the text length (512 tokens) is cut with a warning [required
    /// for generate; demo: "a cat walks on the grass at night"].
    #[arg(long)]
    prompt: Option<String>,
    /// The negative prompt [default: the reference's Chinese default negative prompt].
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Sparse self-attention: nabla-<thr>, sta-<wT>-<wH>-<wW>, nabla-<thr>_sta-<wT>-<wH>-<wW>,
    /// or `none` for dense attention. STA-only runs dense for the first 12 steps.
    #[arg(long, default_value = "nabla-0.7")]
    sparse_algo: String,
    /// Solver: unipc or dpm++.
    #[arg(long, default_value = "unipc")]
    sample_solver: String,
    /// Sampling steps [generate: 50; demo: 10].
    #[arg(long)]
    sample_steps: Option<usize>,
    /// Sigma shift.
    #[arg(long, default_value_t = 5.0)]
    sample_shift: f64,
    /// Device layer of the DiT: auto (CUDA where this binary has it and an NVIDIA GPU opens),
    /// wgpu or cuda. The text encoder and the VAE run on wgpu.
    #[arg(long, value_enum, default_value = "auto")]
    backend: super::layer::BackendArg,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 5.0)]
    sample_guide_scale: f32,
    /// Seed of the initial noise; negative picks a random one (printed) [generate: -1; demo: 0].
    #[arg(long, allow_hyphen_values = true)]
    base_seed: Option<i64>,
    /// Output .mp4 [generate: <task>_<W>x<H>_<seed>.mp4; demo: nabla-demo.mp4].
    #[arg(long)]
    save_file: Option<PathBuf>,
    /// Print the block-mask density per layer at the first sparse step and the last step (reads
    /// the masks and some activations back at those two steps).
    #[arg(long)]
    mask_stats: bool,
    /// Also write PNG heatmaps of those block masks (one panel per head, white = attended) into
    /// DIR as mask_step<S>_layer<L>.png (implies --mask-stats).
    #[arg(long, value_name = "DIR")]
    mask_heatmaps: Option<PathBuf>,
    /// Also write every frame as PNG into DIR (frame_0000.png, ...).
    #[arg(long, value_name = "DIR")]
    png_frames: Option<PathBuf>,
    /// No progress line (stage lines and the summary are still printed).
    #[arg(long)]
    quiet: bool,
}

/// `nabla generate`.
#[derive(clap::Args, Debug)]
#[command(after_help = VIDEO_HELP)]
pub struct GenerateArgs {
    /// t2v-14B or t2v-1.3B.
    #[arg(long, default_value = "t2v-14B")]
    task: String,
    /// The checkpoint directory (Wan-AI/Wan2.1-T2V-1.3B or -14B layout: the DiT safetensors,
    /// models_t5_umt5-xxl-enc-bf16.pth, Wan2.1_VAE.pth, google/umt5-xxl/tokenizer.json). The
    /// umT5 .pth is converted once into models_t5_umt5-xxl-enc-bf16.safetensors next to it
    /// (about 11 GB; the directory must be writable for that first run).
    #[arg(long)]
    ckpt_dir: PathBuf,
    /// Storage of the DiT's big weights: bf16 (half the memory), f16 or f32 (the parity path).
    #[arg(long, default_value = "bf16")]
    precision: String,
    #[command(flatten)]
    sample: SampleArgs,
}

/// `nabla demo`.
#[derive(clap::Args, Debug)]
#[command(after_help = VIDEO_HELP)]
pub struct DemoArgs {
    /// Instead of generating, write the demo's models (random weights) as a checkpoint
    /// directory in the official layout, for `nabla generate --task demo --ckpt-dir DIR`.
    #[arg(long, value_name = "DIR")]
    write_checkpoint: Option<PathBuf>,
    #[command(flatten)]
    sample: SampleArgs,
}

fn options(task: Task, a: &SampleArgs, demo: bool) -> Result<(GenerateOptions, u64)> {
    let prompt = match &a.prompt {
        Some(p) => p.clone(),
        None if demo => "a cat walks on the grass at night".to_string(),
        None => {
            return Err(Error::Invalid(
                "--prompt is required (the text the video should show)".into(),
            ));
        }
    };
    let mut o = if demo {
        GenerateOptions::demo(prompt)
    } else {
        GenerateOptions::new(task, prompt)
    };
    if let Some(s) = &a.size {
        o.size = parse_size(s)?;
    }
    if let Some(f) = a.frame_num {
        o.frame_num = f;
    }
    if let Some(n) = a.sample_steps {
        o.steps = n;
    }
    o.negative_prompt = a.negative_prompt.clone();
    o.sparse_algo = SparseAlgo::parse_optional(&a.sparse_algo)?;
    o.solver = a.sample_solver.parse::<Solver>()?;
    o.shift = a.sample_shift;
    o.guide_scale = a.sample_guide_scale;
    let seed = a.base_seed.unwrap_or(if demo { 0 } else { -1 });
    o.seed = if seed >= 0 {
        seed as u64
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        (t ^ (u64::from(std::process::id()) << 32)) & (i64::MAX as u64)
    };
    o.mask_stats = a.mask_stats || a.mask_heatmaps.is_some();
    o.keep_masks = a.mask_heatmaps.is_some();
    let seed = o.seed;
    Ok((o, seed))
}

fn precision(s: &str) -> Result<WeightPrecision> {
    match s.to_ascii_lowercase().as_str() {
        "bf16" => Ok(WeightPrecision::BF16),
        "f16" => Ok(WeightPrecision::F16),
        "f32" => Ok(WeightPrecision::F32),
        _ => Err(Error::Invalid(format!(
            "--precision {s:?}: expected bf16, f16 or f32"
        ))),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Peak resident memory of this process (Linux `VmHWM`), if known.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A progress line on stderr: bar, step, seconds per step and ETA.
fn progress_line(step: usize, steps: usize, sparse: bool, elapsed: Duration) -> String {
    let width = 30;
    let filled = step * width / steps.max(1);
    let per = elapsed.as_secs_f64() / step.max(1) as f64;
    let eta = per * (steps - step) as f64;
    format!(
        "\r  [{}{}] step {step}/{steps} ({}) {per:.2} s/step, ETA {eta:.0} s ",
        "#".repeat(filled),
        ".".repeat(width - filled),
        if sparse { "sparse" } else { "dense" }
    )
}

fn run_pipeline(
    pipe: &mut Pipeline<'_>,
    opts: &GenerateOptions,
    save: &Path,
    sample: &SampleArgs,
) -> Result<()> {
    let quiet = sample.quiet;
    let plan = pipe.plan(opts)?;
    let (w, h) = plan.size;
    let (lt, lh, lw) = plan.latent;
    eprintln!(
        "video {w}x{h}, {} frames; latent 16x{lt}x{lh}x{lw}; {} tokens{}; {} steps of {} \
         (shift {}, guide scale {}), seed {}",
        plan.frames,
        plan.tokens,
        plan.blocks
            .map(|b| format!(
                ", {b} blocks, {}",
                opts.sparse_algo.map(|a| a.to_string()).unwrap_or_default()
            ))
            .unwrap_or_else(|| ", dense attention".into()),
        opts.steps,
        opts.solver,
        opts.shift,
        opts.guide_scale,
        opts.seed
    );
    let (wb, ab) = pipe.planned_memory(opts)?;
    let started = Instant::now();
    let mut on_line = false;
    let result = pipe.generate(opts, |p| {
        match p {
            Progress::Note(n) => {
                if on_line {
                    eprintln!();
                    on_line = false;
                }
                eprintln!("note: {n}");
            }
            Progress::Stage(s) => {
                if on_line {
                    eprintln!();
                    on_line = false;
                }
                let what = match s {
                    Stage::Encode => "encoding the prompts (umT5)",
                    Stage::Denoise => "denoising (DiT)",
                    Stage::Decode => "decoding (VAE)",
                };
                eprintln!("{what} ...");
            }
            Progress::Step {
                step,
                steps,
                sparse,
                elapsed,
                ..
            } => {
                if !quiet {
                    eprint!("{}", progress_line(step, steps, sparse, elapsed));
                    let _ = std::io::stderr().flush();
                    on_line = true;
                }
            }
        }
        ControlFlow::Continue(())
    });
    if on_line {
        eprintln!();
    }
    let video: Video = result.map_err(|e| {
        if is_cancelled(&e) {
            Error::Invalid("cancelled".into())
        } else {
            e
        }
    })?;
    let tw = Instant::now();
    let info = video.write_mp4(save)?;
    if let Some(dir) = &sample.png_frames {
        let files = nabla::video::write_png_frames(
            dir,
            &video.data,
            video.frames,
            video.height,
            video.width,
        )?;
        eprintln!("wrote {} PNG frames to {}", files.len(), dir.display());
    }
    if let Some(dir) = &sample.mask_heatmaps {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir.clone(), e))?;
        let mut n = 0;
        for m in &video.mask_stats {
            for (l, mask) in m.masks.iter().enumerate() {
                let nb = m.blocks.max(1);
                let heads = mask.len() / (nb * nb).max(1);
                let path = dir.join(format!("mask_step{}_layer{l}.png", m.step + 1));
                crate::cli::mask::write_heatmap(&path, mask, heads, nb)?;
                n += 1;
            }
        }
        eprintln!("wrote {n} mask heatmaps to {}", dir.display());
    }
    let write = tw.elapsed();
    for m in &video.mask_stats {
        let d: Vec<String> = m.density.iter().map(|x| format!("{x:.3}")).collect();
        let mean = m.density.iter().sum::<f64>() / m.density.len().max(1) as f64;
        eprintln!(
            "mask density at step {} (per layer, mean over heads; mean {mean:.3}): {}",
            m.step + 1,
            d.join(" ")
        );
    }
    let t = &video.timings;
    let per_step = t.denoise.as_secs_f64() / t.steps.len().max(1) as f64;
    eprintln!(
        "timings: load {}, tokenize {}, encode {}, denoise {} ({per_step:.2} s/step), decode {}, \
         write {}; total {}",
        secs(pipe.load_time()),
        secs(t.tokenize),
        secs(t.encode),
        secs(t.denoise),
        secs(t.decode),
        secs(write),
        secs(pipe.load_time() + started.elapsed()),
    );
    eprintln!(
        "memory: DiT weights {} + activations {} on the GPU (planned){}",
        mib(wb),
        mib(ab),
        peak_rss()
            .map(|b| format!("; peak host RSS {}", mib(b)))
            .unwrap_or_default()
    );
    println!(
        "wrote {} ({}x{}, {} frames at {} fps, {} bytes)",
        info.path.display(),
        info.width,
        info.height,
        info.frames,
        info.fps,
        info.bytes
    );
    Ok(())
}

/// ", DiT on CUDA (<device>)" when the DiT runs on the CUDA layer.
fn dit_on(cuda: &Option<super::layer::CudaDev>) -> String {
    match cuda {
        #[cfg(feature = "cuda")]
        Some(c) => format!(", DiT on CUDA ({})", c.name()),
        #[cfg(not(feature = "cuda"))]
        Some(never) => match *never {},
        None => String::new(),
    }
}

/// Runs `nabla generate`.
pub fn run_generate(a: GenerateArgs) -> Result<()> {
    let task: Task = a.task.parse()?;
    let prec = precision(&a.precision)?;
    let (opts, seed) = options(task, &a.sample, false)?;
    // validate everything cheap before loading tens of gigabytes
    nabla::wan::pipeline::plan(task, &opts)?;
    nabla::wan::pipeline::check_checkpoint_dir(&a.ckpt_dir)?;
    let save = a.sample.save_file.clone().unwrap_or_else(|| {
        let p = nabla::wan::pipeline::plan(task, &opts).map(|p| p.size);
        let (w, h) = p.unwrap_or(opts.size);
        PathBuf::from(format!("{task}_{w}x{h}_{seed}.mp4"))
    });
    let gpu = Gpu::new()?;
    let cuda = super::layer::open(a.sample.backend)?;
    eprintln!(
        "adapter: {} ({}){}; loading {task} from {} ...",
        gpu.caps().name,
        gpu.caps().backend,
        dit_on(&cuda),
        a.ckpt_dir.display()
    );
    let layer = super::layer::dit_layer(&cuda);
    let mut pipe = Pipeline::from_checkpoint_dir_on(&gpu, layer, &a.ckpt_dir, task, prec)?;
    run_pipeline(&mut pipe, &opts, &save, &a.sample)
}

/// Runs `nabla demo`.
pub fn run_demo(a: DemoArgs) -> Result<()> {
    if let Some(dir) = &a.write_checkpoint {
        nabla::wan::pipeline::write_demo_checkpoint(dir)?;
        println!(
            "wrote the demo models (random weights, not a trained model) to {}; run them with \
             `nabla generate --task demo --ckpt-dir {}`",
            dir.display(),
            dir.display()
        );
        return Ok(());
    }
    let (opts, _) = options(Task::Demo, &a.sample, true)?;
    nabla::wan::pipeline::plan(Task::Demo, &opts)?;
    let save = a
        .sample
        .save_file
        .clone()
        .unwrap_or_else(|| PathBuf::from("nabla-demo.mp4"));
    let gpu = Gpu::new()?;
    eprintln!(
        "nabla demo: the whole pipeline (tokenizer, umT5 encoder, sampler with NABLA, VAE, \
         mp4) on TINY MODELS WITH RANDOM WEIGHTS generated by the crate. They are not a \
         trained model: the video will look like noise. For real videos use `nabla generate \
         --ckpt-dir <Wan2.1 checkpoint>`."
    );
    let cuda = super::layer::open(a.sample.backend)?;
    eprintln!(
        "adapter: {} ({}){}; building the demo models ...",
        gpu.caps().name,
        gpu.caps().backend,
        dit_on(&cuda)
    );
    let mut pipe = Pipeline::demo_on(&gpu, super::layer::dit_layer(&cuda))?;
    run_pipeline(&mut pipe, &opts, &save, &a.sample)
}
