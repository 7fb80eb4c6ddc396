//! The crate's one error type. Every message says what is wrong and what would be right.

use std::path::PathBuf;

/// Errors returned by every fallible operation of the crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No GPU adapter could be found (or none matched the `NABLA_ADAPTER` / `NABLA_BACKEND` filters).
    #[error(
        "no GPU adapter found{filter}. Install a Vulkan, Metal or DX12 driver; on Debian/Ubuntu the \
         software Vulkan driver comes with `apt-get install mesa-vulkan-drivers libvulkan1`"
    )]
    NoAdapter {
        /// A description of the active filters, empty when none.
        filter: String,
    },
    /// An environment variable holds a value we do not understand.
    #[error("environment variable {var}={value:?} is not valid: {expected}")]
    BadEnv {
        /// The variable name.
        var: &'static str,
        /// Its value.
        value: String,
        /// What would be accepted.
        expected: &'static str,
    },
    /// The device could not be created.
    #[error("could not open the GPU device {adapter:?}: {reason}")]
    Device {
        /// Adapter name.
        adapter: String,
        /// What the driver said.
        reason: String,
    },
    /// Input shapes that a kernel cannot process.
    #[error("bad shape: {0}")]
    Shape(String),
    /// A `--sparse-algo` string outside the grammar.
    #[error(
        "invalid sparse algorithm {input:?}: {reason}. Accepted forms: `nabla-<thr>` (0 ≤ thr ≤ 1, e.g. \
         nabla-0.7), `sta-<wT>-<wH>-<wW>` (positive integers, e.g. sta-11-3-3), \
         `nabla-<thr>_sta-<wT>-<wH>-<wW>` (e.g. nabla-0.6_sta-11-3-3); where a command allows dense \
         attention, `none`"
    )]
    SparseAlgo {
        /// The string given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor does not fit the device limits.
    #[error(
        "tensor {what} needs {bytes} bytes in one binding, but this device allows at most {limit} bytes \
         per storage binding ({adapter}); use a smaller shape or a GPU with larger limits"
    )]
    TooLarge {
        /// Which tensor.
        what: String,
        /// Its size in bytes.
        bytes: u64,
        /// The device limit.
        limit: u64,
        /// Adapter name.
        adapter: String,
    },
    /// The GPU reported an error (validation, out of memory, lost device).
    #[error("GPU error: {0}")]
    Gpu(String),
    /// A feature the kernel variant needs is missing on this adapter.
    #[error("this adapter ({adapter}) lacks {feature}, which {what} needs")]
    Unsupported {
        /// Adapter name.
        adapter: String,
        /// Missing feature.
        feature: &'static str,
        /// What needed it.
        what: String,
    },
    /// A file could not be read or has the wrong content.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Bad user input that is not a shape (CLI values and the like).
    #[error("{0}")]
    Invalid(String),
    /// A computation needs more device memory than the device has (or could allocate).
    #[error(
        "{what} needs {:.2} GB of GPU memory, but {device} {}; use a smaller --size or fewer \
         --frames, bf16 weights instead of f32, or a GPU with more memory",
        *needed as f64 / 1e9,
        match available { Some(a) => format!("has {:.2} GB free", *a as f64 / 1e9), None => "could not allocate it".to_string() }
    )]
    OutOfMemory {
        /// What was being set up.
        what: String,
        /// Bytes it needs.
        needed: u64,
        /// Bytes free on the device, when the layer can tell.
        available: Option<u64>,
        /// The device's name.
        device: String,
    },
    /// The CUDA layer failed (driver, NVRTC, cuBLASLt) or is not available.
    #[error("CUDA: {0}")]
    Cuda(String),
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A shape error.
    pub fn shape(msg: impl Into<String>) -> Self {
        Error::Shape(msg.into())
    }
    /// A file error with a reason.
    pub fn file(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
