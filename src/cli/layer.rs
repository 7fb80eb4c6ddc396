//! `--backend wgpu|cuda|auto`: which device layer a command computes on.

#[cfg(not(feature = "cuda"))]
use nabla::Error;
use nabla::Result;
use nabla::wan::pipeline::DitLayer;

/// The device layer asked for on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// CUDA where this binary has the `cuda` feature and an NVIDIA GPU opens; wgpu otherwise.
    Auto,
    /// wgpu: Vulkan, Metal or DX12 (any GPU).
    Wgpu,
    /// The CUDA layer (NVIDIA; needs a build with `--features cuda`).
    Cuda,
}

/// An open CUDA device, or nothing in builds without the `cuda` feature.
#[cfg(feature = "cuda")]
pub type CudaDev = nabla::cuda::Cuda;
/// An open CUDA device, or nothing in builds without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub enum CudaDev {}

/// Opens the CUDA device when `arg` asks for it (`cuda`: errors if it cannot; `auto`: quietly
/// falls back to wgpu, saying why on stderr when a CUDA build finds no device).
pub fn open(arg: BackendArg) -> Result<Option<CudaDev>> {
    #[cfg(feature = "cuda")]
    {
        match arg {
            BackendArg::Wgpu => Ok(None),
            BackendArg::Cuda => nabla::cuda::Cuda::new().map(Some),
            BackendArg::Auto => match nabla::cuda::Cuda::new() {
                Ok(c) => Ok(Some(c)),
                Err(e) => {
                    eprintln!("note: --backend auto uses wgpu: {e}");
                    Ok(None)
                }
            },
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        match arg {
            BackendArg::Cuda => Err(Error::Invalid(
                "--backend cuda: this nabla was built without the CUDA layer; rebuild with \
                 `cargo build --release --features cuda` (no CUDA toolkit needed to build), or \
                 use --backend wgpu"
                    .into(),
            )),
            _ => Ok(None),
        }
    }
}

/// The DiT's layer for an opened (or not) CUDA device.
pub fn dit_layer(cuda: &Option<CudaDev>) -> DitLayer<'_> {
    match cuda {
        #[cfg(feature = "cuda")]
        Some(c) => DitLayer::Cuda(c),
        #[cfg(not(feature = "cuda"))]
        Some(never) => match *never {},
        None => DitLayer::Wgpu,
    }
}
