//! The optional CUDA device layer (cargo feature `cuda`), beside the wgpu one.
//!
//! [`Cuda`] owns a context and one stream on an NVIDIA GPU; kernels are CUDA C sources under
//! `src/cuda/kernels/`, compiled at first use by NVRTC for the device's own architecture and
//! cached per module. Tensors ([`CudaTensor`]) are byte buffers with a dtype, a shape and a byte
//! offset (row views share the buffer). Everything runs in order on the one stream; host reads
//! synchronize it.
//!
//! cudarc loads `libcuda`, `libnvrtc` and `libcublasLt` at run time: a `cuda` build compiles
//! without a CUDA toolkit, and [`Cuda::open`] returns a clear error (never a panic) where a
//! library or a device is missing, so the caller can fall back to wgpu.

use crate::error::{Error, Result};
use crate::gpu::DType;
pub mod attention;
pub mod backend;
pub mod gemm;
pub(crate) mod launch;
pub mod nabla;
pub mod ops;
pub mod sources;

pub use backend::CudaBackend;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// A CUDA error as the crate's error.
pub(crate) fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

/// Whether the CUDA driver library can be loaded on this machine (no device is touched).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NVRTC can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether cuBLASLt can be loaded.
pub fn cublaslt_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::cublaslt::sys::is_culib_present() }
}

/// Compiles CUDA C `src` (module name `module`, for error messages) to PTX for `arch`
/// (`sm_90`, ...) with NVRTC. Needs only NVRTC, no GPU: the tests compile every kernel source
/// this way wherever NVRTC is installed.
pub fn compile_ptx(module: &str, src: &str, arch: &'static str) -> Result<cudarc::nvrtc::Ptx> {
    if !nvrtc_present() {
        return Err(Error::Cuda(
            "NVRTC (libnvrtc.so) was not found: install the CUDA runtime compiler (CUDA 13, e.g. the \
             nvidia-cuda-nvrtc package) and add its lib folder to LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        name: Some(format!("{module}.cu")),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => Error::Cuda(format!(
            "NVRTC could not compile {module}.cu for {arch}:\n{}",
            log.to_string_lossy()
        )),
        other => cuda_err(&format!("NVRTC on {module}.cu"), other),
    })
}

/// Compiles CUDA C `src` all the way to a cubin for `arch` (NVRTC runs ptxas), returning
/// ptxas's verbose log (registers, spills, and warnings such as serialized
/// `wgmma`). Needs only NVRTC, no GPU: lets the tests check what PTX alone cannot (operand
/// forms ptxas rejects, spills) wherever NVRTC is installed.
pub fn compile_cubin(module: &str, src: &str, arch: &str) -> Result<String> {
    use cudarc::nvrtc::{result, sys};
    if !nvrtc_present() {
        return Err(Error::Cuda(
            "NVRTC (libnvrtc.so) was not found: install the CUDA runtime compiler (CUDA 13, e.g. the \
             nvidia-cuda-nvrtc package) and add its lib folder to LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let csrc = std::ffi::CString::new(src)
        .map_err(|_| Error::Cuda(format!("{module}.cu contains a NUL byte")))?;
    let name = std::ffi::CString::new(format!("{module}.cu"))
        .map_err(|_| Error::Cuda(format!("module name {module:?} contains a NUL byte")))?;
    let prog = result::create_program(&csrc, Some(&name))
        .map_err(|e| cuda_err(&format!("NVRTC program for {module}.cu"), e))?;
    let opts = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
    ];
    // SAFETY: `prog` was created above and is destroyed once, at the end; the buffers passed to
    // NVRTC are sized by the sizes NVRTC reports.
    unsafe {
        let compiled = result::compile_program(prog, &opts);
        let log = result::get_program_log(prog)
            .map(|l| {
                let bytes: Vec<u8> = l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        let out = match compiled {
            Err(_) => Err(Error::Cuda(format!(
                "NVRTC could not compile {module}.cu to a cubin for {arch}:\n{log}"
            ))),
            Ok(()) => {
                let mut size = 0usize;
                match sys::nvrtcGetCUBINSize(prog, &mut size).result() {
                    Ok(()) if size > 0 => Ok(log),
                    Ok(()) => Err(Error::Cuda(format!(
                        "NVRTC produced no cubin for {module}.cu on {arch}:\n{log}"
                    ))),
                    Err(e) => Err(cuda_err("nvrtcGetCUBINSize", e)),
                }
            }
        };
        let _ = result::destroy_program(prog);
        out
    }
}

/// ptxas's statistics of every kernel of the layer whose `module/function` name contains
/// `filter`: each module of [`sources::SOURCES`] compiled to a cubin for each architecture it is
/// built for ([`sources::archs`]) by NVRTC with `--ptxas-options=-v` (no GPU needed). Each
/// entry is named `module/function [arch]` and carries what ptxas reported (`registers`,
/// `barriers`, `bytes smem`, `bytes stack frame`, `bytes spill stores`, ...; warnings as
/// `warning`): the counterpart of [`crate::Gpu::kernel_statistics`] for the WGSL kernels.
pub fn kernel_statistics(filter: &str) -> Result<Vec<crate::gpu::KernelStatistics>> {
    let mut out = Vec::new();
    for &(module, src) in sources::SOURCES {
        // "module/function" filters name their module: compile only that one
        if let Some((m, _)) = filter.split_once('/')
            && !module.ends_with(m)
        {
            continue;
        }
        for &arch in sources::archs(module) {
            let log = compile_cubin(module, src, arch)?;
            out.extend(
                parse_ptxas_log(&log)
                    .into_iter()
                    .map(|(f, stats)| crate::gpu::KernelStatistics {
                        kernel: format!("{module}/{f} [{arch}]"),
                        stats,
                        internal: Vec::new(),
                    })
                    .filter(|k| k.kernel.contains(filter)),
            );
        }
    }
    Ok(out)
}

/// `(function, statistics)` from a ptxas `-v` log: "Compiling entry function 'F'" opens an
/// entry; "N unit, N unit" items (with "Used" dropped) become statistics named by their unit;
/// warnings are kept whole.
pub fn parse_ptxas_log(log: &str) -> Vec<(String, Vec<crate::gpu::Statistic>)> {
    use crate::gpu::Statistic;
    let mut out: Vec<(String, Vec<Statistic>)> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.push((name, Vec::new()));
            continue;
        }
        let Some((_, stats)) = out.last_mut() else {
            continue;
        };
        if line.contains("warning") {
            stats.push(Statistic {
                name: "warning".into(),
                value: line.trim().to_string(),
            });
            continue;
        }
        let body = line
            .split_once(':')
            .filter(|_| line.starts_with("ptxas info"))
            .map_or(line, |(_, b)| b);
        let body = body
            .trim_start_matches("ptxas")
            .trim()
            .trim_start_matches('.');
        for item in body.split(',') {
            let item = item.trim();
            let item = item
                .strip_prefix("Used ")
                .or_else(|| item.strip_prefix("used "))
                .unwrap_or(item);
            if let Some((n, unit)) = item.split_once(' ')
                && n.parse::<u64>().is_ok()
            {
                stats.push(Statistic {
                    name: unit.trim().to_string(),
                    value: n.to_string(),
                });
            }
        }
    }
    out
}

/// One NVIDIA GPU: context, stream, NVRTC module cache.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    cc: (i32, i32),
    arch: &'static str,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// cuBLASLt handle, workspace and heuristic cache, created by the first linear.
    blas: OnceLock<gemm::Blas>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cuda({}, sm_{}{})", self.name, self.cc.0, self.cc.1)
    }
}

impl Cuda {
    /// Opens GPU `ordinal` (the `NABLA_CUDA_DEVICE` variable picks another than 0 by default).
    /// Errors name the missing library or device instead of panicking.
    pub fn open(ordinal: usize) -> Result<Cuda> {
        if !driver_present() {
            return Err(Error::Cuda(
                "the NVIDIA driver library (libcuda.so) was not found: install the NVIDIA driver, \
                 or use --backend wgpu"
                    .into(),
            ));
        }
        if !nvrtc_present() {
            return Err(Error::Cuda(
                "NVRTC (libnvrtc.so) was not found: install the CUDA runtime compiler (CUDA 13, \
                 e.g. the nvidia-cuda-nvrtc package) and add its lib folder to LD_LIBRARY_PATH, or \
                 use --backend wgpu"
                    .into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| cuda_err("cuDeviceGetCount", e))?;
        if ordinal as i32 >= count {
            return Err(Error::Cuda(format!(
                "no CUDA device {ordinal}: this machine has {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("creating the context", e))?;
        // One stream, in-order: no per-buffer event tracking needed.
        // SAFETY: every op of this layer runs on `stream`; nothing is shared across streams.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let name = ctx.name().map_err(|e| cuda_err("device name", e))?;
        let cc = ctx
            .compute_capability()
            .map_err(|e| cuda_err("compute capability", e))?;
        let arch: &'static str = Box::leak(format!("sm_{}{}", cc.0, cc.1).into_boxed_str());
        Ok(Cuda {
            ctx,
            stream,
            name,
            cc,
            arch,
            modules: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
        })
    }

    /// Opens the device named by `NABLA_CUDA_DEVICE` (default 0).
    pub fn new() -> Result<Cuda> {
        let ordinal = match std::env::var("NABLA_CUDA_DEVICE") {
            Ok(v) => v.parse().map_err(|_| Error::BadEnv {
                var: "NABLA_CUDA_DEVICE",
                value: v,
                expected: "a device index (0, 1, ...)",
            })?,
            Err(_) => 0,
        };
        Cuda::open(ordinal)
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }
    /// The NVRTC target, e.g. `sm_90`.
    pub fn arch(&self) -> &'static str {
        self.arch
    }
    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream every op runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| cuda_err("cuMemGetInfo", e))
    }
    /// Waits for every op recorded so far.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronizing the stream", e))
    }

    /// Kernel `function` of module `module` (CUDA C `src`), compiled by NVRTC at first use for
    /// this device's architecture (`sm_90a` for the Hopper-only `*_sm90a` modules) and cached.
    pub fn function(
        &self,
        module: &'static str,
        src: &str,
        function: &str,
    ) -> Result<CudaFunction> {
        let m = {
            let mut cache = self
                .modules
                .lock()
                .map_err(|_| Error::Cuda("the module cache was poisoned by a panic".into()))?;
            match cache.get(module) {
                Some(m) => m.clone(),
                None => {
                    let m = self.compile(module, src)?;
                    cache.insert(module, m.clone());
                    m
                }
            }
        };
        m.load_function(function)
            .map_err(|e| cuda_err(&format!("kernel {function} of {module}.cu"), e))
    }

    fn compile(&self, module: &'static str, src: &str) -> Result<Arc<CudaModule>> {
        // Hopper-only modules (`*_sm90a`, see sources::archs) target the arch-specific sm_90a.
        let arch = if module.ends_with("_sm90a") {
            "sm_90a"
        } else {
            self.arch
        };
        let ptx = compile_ptx(module, src, arch)?;
        self.ctx
            .load_module(ptx)
            .map_err(|e| cuda_err(&format!("loading {module}.cu"), e))
    }

    /// A new uninitialised tensor.
    pub fn empty(&self, shape: &[usize], dtype: DType) -> Result<CudaTensor> {
        let n: usize = shape.iter().product();
        let bytes = (n as u64 * dtype.size()).max(4) as usize;
        // SAFETY: the memory is written before it is read by every op of this layer.
        let buf = unsafe { self.stream.alloc::<u8>(bytes) }.map_err(|e| {
            Error::Cuda(format!(
                "out of GPU memory allocating {bytes} bytes for a {shape:?} {dtype:?} tensor \
                 ({e:?}); use a smaller shape, or free memory on the device"
            ))
        })?;
        Ok(CudaTensor {
            buf: Arc::new(buf),
            offset: 0,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// Uploads raw bytes of `dtype` elements.
    pub fn upload_bytes(&self, data: &[u8], shape: &[usize], dtype: DType) -> Result<CudaTensor> {
        let n: usize = shape.iter().product();
        if data.len() as u64 != n as u64 * dtype.size() {
            return Err(Error::shape(format!(
                "upload of {} bytes for a {shape:?} {dtype:?} tensor (needs {})",
                data.len(),
                n as u64 * dtype.size()
            )));
        }
        let t = self.empty(shape, dtype)?;
        self.write_bytes(&t, data)?;
        Ok(t)
    }

    /// Uploads f32 data.
    pub fn upload_f32(&self, data: &[f32], shape: &[usize]) -> Result<CudaTensor> {
        self.upload_bytes(bytemuck::cast_slice(data), shape, DType::F32)
    }

    /// Uploads f32 data stored as `dtype` (F32, or F16 / BF16 rounded to nearest even on the
    /// host).
    pub fn upload_as(&self, data: &[f32], shape: &[usize], dtype: DType) -> Result<CudaTensor> {
        match dtype {
            DType::F32 => self.upload_f32(data, shape),
            DType::F16 => {
                let v: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                self.upload_bytes(bytemuck::cast_slice(&v), shape, dtype)
            }
            DType::BF16 => {
                let v: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
                self.upload_bytes(bytemuck::cast_slice(&v), shape, dtype)
            }
            DType::U32 => Err(Error::shape("upload_as: u32 is not a float storage type")),
        }
    }

    /// Overwrites a tensor's bytes (same size), in stream order.
    pub fn write_bytes(&self, t: &CudaTensor, data: &[u8]) -> Result<()> {
        if data.len() != t.bytes() {
            return Err(Error::shape(format!(
                "write of {} bytes into a {:?} {:?} tensor of {} bytes",
                data.len(),
                t.shape,
                t.dtype,
                t.bytes()
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        // the raw copy needs the context current on this thread (a fresh thread has none)
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the context", e))?;
        // SAFETY: the destination range lies inside the buffer (checked above via bytes()).
        unsafe {
            cudarc::driver::result::memcpy_htod_async(t.ptr(), data, self.stream.cu_stream())
        }
        .map_err(|e| cuda_err("host-to-device copy", e))?;
        // the host slice may be dropped after return
        self.synchronize()
    }

    /// Reads a tensor's bytes back (waits for the stream).
    pub fn download_bytes(&self, t: &CudaTensor) -> Result<Vec<u8>> {
        let mut out = vec![0u8; t.bytes()];
        if out.is_empty() {
            return Ok(out);
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the context", e))?;
        // SAFETY: the source range lies inside the buffer.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut out, t.ptr(), self.stream.cu_stream())
        }
        .map_err(|e| cuda_err("device-to-host copy", e))?;
        self.synchronize()?;
        Ok(out)
    }

    /// Reads a tensor back as f32 (F32, F16 and BF16 tensors).
    pub fn download_f32(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        let bytes = self.download_bytes(t)?;
        Ok(match t.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec(&bytes),
            DType::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(&bytes)
                .into_iter()
                .map(f32::from)
                .collect(),
            DType::BF16 => bytemuck::pod_collect_to_vec::<u8, half::bf16>(&bytes)
                .into_iter()
                .map(f32::from)
                .collect(),
            DType::U32 => {
                return Err(Error::shape(
                    "download_f32 of a u32 tensor (use download_bytes)",
                ));
            }
        })
    }
}

/// A device tensor: a shared byte buffer, a byte offset, a shape and a dtype.
#[derive(Clone)]
pub struct CudaTensor {
    buf: Arc<CudaSlice<u8>>,
    offset: usize,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Storage type.
    pub dtype: DType,
}

impl std::fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaTensor({:?} {:?} +{})",
            self.shape, self.dtype, self.offset
        )
    }
}

impl CudaTensor {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size() as usize
    }
    /// The device address of the first element (for kernel arguments).
    pub fn ptr(&self) -> u64 {
        let stream = self.buf.stream().clone();
        let (p, _sync) = self.buf.device_ptr(&stream);
        p + self.offset as u64
    }
    /// The same storage seen with another shape of the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<CudaTensor> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(Error::shape(format!(
                "reshape of {:?} ({} elements) to {shape:?} ({n})",
                self.shape,
                self.numel()
            )));
        }
        Ok(CudaTensor {
            buf: self.buf.clone(),
            offset: self.offset,
            shape: shape.to_vec(),
            dtype: self.dtype,
        })
    }
    /// Rows `start..start+count` of the first axis, sharing the storage.
    pub fn rows(&self, start: usize, count: usize) -> Result<CudaTensor> {
        let rows = *self.shape.first().unwrap_or(&1);
        if start + count > rows {
            return Err(Error::shape(format!(
                "rows {start}..{} of a tensor with {rows}",
                start + count
            )));
        }
        let row_bytes = self.bytes() / rows.max(1);
        let mut shape = self.shape.clone();
        shape[0] = count;
        Ok(CudaTensor {
            buf: self.buf.clone(),
            offset: self.offset + start * row_bytes,
            shape,
            dtype: self.dtype,
        })
    }
}
