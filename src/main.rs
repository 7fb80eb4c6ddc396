//! The `nabla` command line: adapter info, NABLA masks, benchmarks, text-to-video.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "nabla",
    version,
    about = "NABLA sparse attention on any GPU (wgpu + WGSL)"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print every GPU adapter and its capabilities (NABLA_ADAPTER / NABLA_BACKEND pick one).
    Info {
        /// Instead, print the driver compiler's statistics (registers, spills, shared memory...)
        /// of every kernel variant whose name contains FILTER, on the chosen adapter (Vulkan
        /// with VK_KHR_pipeline_executable_properties).
        #[arg(long, value_name = "FILTER")]
        kernel_stats: Option<String>,
        /// With --kernel-stats: compile with runtime bounds checks (default: without, as the
        /// validated kernels run).
        #[arg(long)]
        checked: bool,
        /// With --kernel-stats: also write the driver's textual internal representations of
        /// each kernel (where it offers any) into this directory.
        #[arg(long, value_name = "DIR")]
        ir_dir: Option<std::path::PathBuf>,
        /// With --kernel-stats: the WGSL kernels on the chosen adapter (wgpu, the default), or
        /// the CUDA layer's kernels as ptxas reports them (cuda: needs `--features cuda` and
        /// NVRTC, no GPU).
        #[arg(long, value_enum, default_value = "wgpu")]
        backend: cli::layer::BackendArg,
    },
    /// Estimate a NABLA / STA block mask, print its density per head and write a PNG heatmap.
    Mask(cli::mask::MaskArgs),
    /// Every kernel variant this adapter offers against the CPU reference (fresh random inputs).
    Selftest {
        /// Seed of the inputs (default: from the clock).
        #[arg(long)]
        seed: Option<u64>,
        /// Device layer: wgpu (this adapter's WGSL variants), cuda (the CUDA kernels), or auto
        /// (both where the CUDA layer is built in and a device opens).
        #[arg(long, value_enum, default_value = "auto")]
        backend: cli::layer::BackendArg,
    },
    /// Benchmarks (GPU time from timestamp queries).
    Bench {
        #[command(subcommand)]
        which: cli::bench::BenchCmd,
    },
    /// Text-to-video with a Wan 2.1 checkpoint (umT5, DiT with NABLA sparse attention, VAE)
    /// into an .mp4.
    Generate(Box<cli::generate::GenerateArgs>),
    /// The whole text-to-video pipeline on tiny random-weight models (no download; the video
    /// is noise-like) into nabla-demo.mp4.
    Demo(Box<cli::generate::DemoArgs>),
}

fn main() {
    let args = Args::parse();
    let r = match args.cmd {
        Cmd::Info {
            kernel_stats: Some(f),
            checked,
            ir_dir,
            backend,
        } => cli::info::kernel_stats(&f, checked, ir_dir.as_deref(), backend),
        Cmd::Info { .. } => cli::info::run(),
        Cmd::Mask(a) => cli::mask::run(a),
        Cmd::Bench { which } => cli::bench::run(which),
        Cmd::Selftest { seed, backend } => cli::selftest::run(seed, backend),
        Cmd::Generate(a) => cli::generate::run_generate(*a),
        Cmd::Demo(a) => cli::generate::run_demo(*a),
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
