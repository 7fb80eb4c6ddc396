//! Kernel launches shared by every module of the CUDA layer: typed arguments, the NVRTC module
//! lookup, the dynamic shared-memory opt-in.

use super::{Cuda, cuda_err};
use crate::error::Result;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// A kernel argument: device addresses, `u32` sizes, `f32` scalars, tensor maps.
pub(crate) enum Arg {
    /// A device address (0 = null).
    U64(u64),
    /// A 32-bit size.
    U32(u32),
    /// A scalar.
    F32(f32),
    /// A TMA tensor map, passed by value (a `const __grid_constant__` parameter).
    Map(TensorMap),
}

/// A `CUtensorMap` (128 opaque bytes, 64-byte aligned as the kernels declare it).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct TensorMap(pub(crate) [u64; 16]);

// SAFETY: plain bytes, laid out as the kernels' `TmaMap` parameter (128 bytes, 64-byte aligned).
unsafe impl cudarc::driver::DeviceRepr for TensorMap {}

/// A tensor map over a packed 3-D tensor of 16-bit elements `dims = (inner, rows, planes)`
/// (inner contiguous) at device address `ptr`, with `64 × 64 × 1` boxes in the 128-byte swizzle
/// (the layout of the `wgmma` kernels' shared-memory tiles); reads outside the tensor fill zeros.
/// `bf16` picks the element type (else f16). `what` names the tensor in errors.
pub(crate) fn tile_map_3d(
    what: &str,
    ptr: u64,
    dims: (usize, usize, usize),
    bf16: bool,
) -> Result<TensorMap> {
    use cudarc::driver::sys;
    let (d0, d1, d2) = (dims.0 as u64, dims.1 as u64, dims.2 as u64);
    if !ptr.is_multiple_of(16) || !(d0 * 2).is_multiple_of(16) || d0 < 64 {
        return Err(crate::error::Error::shape(format!(
            "tensor map of {what}: the address must be 16-byte aligned and rows at least 64 \
             elements of a multiple of 16 bytes (address {ptr:#x}, {d0} elements per row)"
        )));
    }
    let dim = [d0, d1, d2];
    let strides = [d0 * 2, d0 * d1 * 2]; // bytes, of dims 1 and 2
    let boxd = [64u32, 64, 1];
    let estr = [1u32, 1, 1];
    let mut m = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    let ty = if bf16 {
        sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
    } else {
        sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16
    };
    // SAFETY: every pointer is to a live local array of the rank's length; the map is written
    // by the driver before it is read.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            m.as_mut_ptr(),
            ty,
            3,
            ptr as *mut std::ffi::c_void,
            dim.as_ptr(),
            strides.as_ptr(),
            boxd.as_ptr(),
            estr.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(cuda_err(
            &format!("encoding the tensor map of {what} ({d0} x {d1} x {d2} elements)"),
            r,
        ));
    }
    // SAFETY: initialised by the successful call above.
    let m = unsafe { m.assume_init() };
    Ok(TensorMap(m.opaque))
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
            Arg::Map(v) => b.arg(v),
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
