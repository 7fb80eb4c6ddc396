//! Kernel launches shared by every module of the CUDA layer: typed arguments, the NVRTC module
//! lookup, the dynamic shared-memory opt-in.

use super::{Cuda, cuda_err};
use crate::error::Result;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// A kernel argument: device addresses, `u32` sizes, `f32` scalars.
pub(crate) enum Arg {
    /// A device address (0 = null).
    U64(u64),
    /// A 32-bit size.
    U32(u32),
    /// A scalar.
    F32(f32),
}

/// Launches kernel `name` of `module` (CUDA C `src`) with `args` in the kernel's parameter
/// order, raising the function's dynamic shared-memory limit first when `cfg` asks for more
/// than the default 48 KiB.
pub(crate) fn launch(
    cuda: &Cuda,
    module: &'static str,
    src: &str,
    name: &str,
    cfg: LaunchConfig,
    args: &[Arg],
) -> Result<()> {
    let f = cuda.function(module, src, name)?;
    if cfg.shared_mem_bytes > 48 * 1024 {
        cuda.context()
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the context", e))?;
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            cfg.shared_mem_bytes as i32,
        )
        .map_err(|e| {
            cuda_err(
                &format!(
                    "allowing {} bytes of shared memory for kernel {name} of {module}.cu",
                    cfg.shared_mem_bytes
                ),
                e,
            )
        })?;
    }
    let stream = cuda.stream();
    let mut b = stream.launch_builder(&f);
    for a in args {
        match a {
            Arg::U64(v) => b.arg(v),
            Arg::U32(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
        };
    }
    // SAFETY: every call site passes the arguments in the order and with the types of the
    // kernel's signature, and has checked that each tensor covers the elements the kernel
    // touches for the grid it launches.
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(|e| cuda_err(&format!("launching kernel {name} of {module}.cu"), e))
}

/// The largest dynamic shared memory one block may use on this device (opt-in limit).
pub(crate) fn max_shared_bytes(cuda: &Cuda) -> Result<usize> {
    cuda.context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map(|v| v.max(48 * 1024) as usize)
        .map_err(|e| cuda_err("querying the shared-memory limit", e))
}
