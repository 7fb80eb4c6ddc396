//! The linear layer `out = act(x·Wᵀ + b)` on CUDA through cuBLASLt.
//!
//! Layout is PyTorch's `nn.Linear`, row-major: `x [.., K]` f32 (or the weight's 16-bit type),
//! `W [N, K]` stored f32, bf16 or f16, `b [N]` f32, `out [.., N]` f32 (or the weight's 16-bit
//! type). cuBLAS is column-major, so the call computes
//! `outᵀ = W·xᵀ`: A = W seen as a column-major `[K, N]` matrix, transposed (`op(A) = N×K`);
//! B = x seen as a column-major `[K, M]` matrix (`xᵀ`), not transposed; D = `outᵀ`, a
//! column-major `[N, M]` matrix with leading dimension N — exactly `out` row-major. The bias is
//! then a vector over D's rows (the N output features), which is what cuBLASLt's bias epilogue
//! broadcasts.
//!
//! | weights | x fed to cuBLASLt | compute | output (D) | epilogue |
//! |---|---|---|---|---|
//! | f32 (parity path) | f32 | `CUBLAS_COMPUTE_32F` (no TF32) | f32 | bias fused (`CUBLASLT_EPILOGUE_BIAS`) |
//! | bf16 / f16, x f32 | rounded to the weight's type (nearest even) into a reusable workspace | `CUBLAS_COMPUTE_32F`: f32 accumulation | f32 | bias fused |
//! | bf16 / f16, x of the weight's type (the DiT fast path) | x itself, no conversion pass | same | f32, or the weight's type when `out` is (f32 accumulator + f32 bias, rounded to nearest even once) | bias fused (f32 bias: `CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE` = `CUDA_R_32F`) |
//!
//! With a 16-bit `out` and an activation, the activation kernel reads the rounded GEMM result and
//! writes the rounded activation (the two roundings of PyTorch's bf16 autocast: `Linear` output
//! in bf16, GELU of it rounded to bf16).
//!
//! GELU-tanh and SiLU run in our kernel ([`super::ops::bias_activation`]), which computes them
//! exactly as the wgpu linear does (`shaders/linalg/linear_common.wgsl`). cuBLASLt documents its
//! GELU epilogue only as "GELU", not which formula (PyTorch relies on it being the tanh form), so
//! [`linear`] does not fuse it; [`linear_with`] can (`CUBLASLT_EPILOGUE_GELU_BIAS`), and the tests
//! measure that path against the tanh reference. Whenever cuBLASLt offers no algorithm for a
//! fused epilogue (or refuses one), the matmul runs without it and the kernel applies bias and
//! activation.
//!
//! The cuBLASLt handle, its workspace (32 MiB on Hopper and later, 4 MiB before) and the x
//! conversion buffer are created once per [`Cuda`] at the first linear; heuristic choices are
//! cached per shape, dtype, epilogue and operand alignment.

use super::{Cuda, CudaTensor, cuda_err};
use crate::error::{Error, Result};
use crate::gpu::DType;
use crate::ops::linear::Activation;
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::CudaSlice;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

/// `CUBLAS_OP_N` / `CUBLAS_OP_T` (cublasOperation_t).
const OP_N: i32 = 0;
const OP_T: i32 = 1;

/// Heuristic cache key: (M, N, K, weight dtype, output dtype, epilogue, alignment of A, B, D,
/// bias).
type AlgoKey = (usize, usize, usize, u8, u8, u32, u32, u32, u32, u32);

struct BlasState {
    /// The 16-bit copy of x (grown as needed; reused by every linear in stream order).
    input: Option<CudaSlice<u8>>,
    /// Heuristic results; `None` = cuBLASLt has no algorithm for that configuration.
    algos: HashMap<AlgoKey, Option<sys::cublasLtMatmulAlgo_t>>,
}

/// The cuBLASLt state of one [`Cuda`]: handle, workspace, the x conversion buffer and the
/// heuristic cache. Created by the first [`linear`].
pub struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    state: Mutex<BlasState>,
}

// SAFETY: the handle and the workspace are only used while `state`'s lock is held (heuristics
// and matmul enqueues in `linear_with`) or in `Drop`, which has exclusive access.
unsafe impl Send for Blas {}
// SAFETY: as above.
unsafe impl Sync for Blas {}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blas(workspace {} bytes)", self.workspace.len())
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `Blas::new` and is destroyed once, here.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

impl Blas {
    fn new(cuda: &Cuda) -> Result<Blas> {
        if !super::cublaslt_present() {
            return Err(Error::Cuda(
                "cuBLASLt (libcublasLt.so) was not found: install the CUDA 13 cuBLAS library \
                 (e.g. the nvidia-cublas package) and add its lib folder to LD_LIBRARY_PATH, or \
                 use --backend wgpu"
                    .into(),
            ));
        }
        cuda.context()
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the context for cuBLASLt", e))?;
        let bytes = if cuda.compute_capability().0 >= 9 {
            32 << 20
        } else {
            4 << 20
        };
        // SAFETY: the workspace is scratch for cuBLASLt, never read before it writes it.
        let workspace = unsafe { cuda.stream().alloc::<u8>(bytes) }.map_err(|e| {
            Error::Cuda(format!(
                "out of GPU memory allocating the {bytes}-byte cuBLASLt workspace ({e:?})"
            ))
        })?;
        let handle = lt::create_handle().map_err(|e| cuda_err("cublasLtCreate", e))?;
        Ok(Blas {
            handle,
            workspace,
            state: Mutex::new(BlasState {
                input: None,
                algos: HashMap::new(),
            }),
        })
    }

    /// The cuBLASLt state of `cuda`, created at the first call.
    fn of(cuda: &Cuda) -> Result<&Blas> {
        if let Some(b) = cuda.blas.get() {
            return Ok(b);
        }
        let b = Blas::new(cuda)?;
        // a racing thread may have set it first: keep theirs, drop ours
        let _ = cuda.blas.set(b);
        cuda.blas
            .get()
            .ok_or_else(|| Error::Cuda("cuBLASLt state missing after creation".into()))
    }
}

/// Checks the operands; returns `(M, N, K)`.
fn check(
    x: &CudaTensor,
    w: &CudaTensor,
    b: Option<&CudaTensor>,
    out: &CudaTensor,
) -> Result<(usize, usize, usize)> {
    let ws = &w.shape;
    if ws.len() != 2 {
        return Err(Error::shape(format!(
            "linear weight must be [N, K] (out_features, in_features, PyTorch layout), got {ws:?}"
        )));
    }
    let (n, k) = (ws[0], ws[1]);
    let xs = &x.shape;
    if xs.is_empty() || xs[xs.len() - 1] != k {
        return Err(Error::shape(format!(
            "linear input {xs:?} must end in K = {k}, the in_features of the weight {ws:?} \
             (W is [N, K]; pass W, not Wᵀ)"
        )));
    }
    let lead = &xs[..xs.len() - 1];
    let m: usize = lead.iter().product();
    if w.dtype == DType::U32 {
        return Err(Error::shape(format!(
            "linear weight must be f32, f16 or bf16, got {:?}",
            w.dtype
        )));
    }
    if x.dtype != DType::F32 && x.dtype != w.dtype {
        return Err(Error::shape(format!(
            "linear input must be f32 or of the weight's type {:?}, got {:?}",
            w.dtype, x.dtype
        )));
    }
    if let Some(b) = b
        && (b.shape != [n] || b.dtype != DType::F32)
    {
        return Err(Error::shape(format!(
            "linear bias must be f32 [N] = [{n}] (out_features of the weight {ws:?}), got {:?} \
             {:?}",
            b.shape, b.dtype
        )));
    }
    let mut want = lead.to_vec();
    want.push(n);
    if out.shape != want || (out.dtype != DType::F32 && out.dtype != w.dtype) {
        return Err(Error::shape(format!(
            "linear output must be {want:?} (input {xs:?} with K = {k} replaced by N = {n}), \
             f32 or of the weight's type {:?}, got {:?} {:?}",
            w.dtype, out.dtype, out.shape
        )));
    }
    let (o0, o1) = (out.ptr(), out.ptr() + out.bytes() as u64);
    for (what, t) in [("input", Some(x)), ("weight", Some(w)), ("bias", b)] {
        if let Some(t) = t {
            let (t0, t1) = (t.ptr(), t.ptr() + t.bytes() as u64);
            if t0 < o1 && o0 < t1 {
                return Err(Error::shape(format!(
                    "linear output {:?} overlaps the {what} {:?} in device memory; in-place \
                     linear is not supported, write to a separate tensor",
                    out.shape, t.shape
                )));
            }
        }
    }
    for (what, v) in [("M", m), ("N", n), ("K", k)] {
        if v > i32::MAX as usize {
            return Err(Error::shape(format!(
                "linear {what} = {v} exceeds cuBLASLt's 32-bit dimensions; split the call"
            )));
        }
    }
    Ok((m, n, k))
}

/// The largest power of two (≤ 256) dividing a device address: the alignment cuBLASLt may
/// assume for an operand.
fn alignment(ptr: u64) -> u32 {
    1u32 << ptr.trailing_zeros().min(8)
}

/// RAII wrappers of the cuBLASLt descriptors.
struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// One matmul configuration: `D [N, M] (col-major) = op(A)·B (+ epilogue)`.
struct Plan {
    desc: Desc,
    a: Layout,
    b: Layout,
    d: Layout,
}

/// The epilogue constant for (bias fused, GELU fused).
fn epilogue(bias: bool, gelu: bool) -> sys::cublasLtEpilogue_t {
    use sys::cublasLtEpilogue_t as E;
    match (bias, gelu) {
        (false, false) => E::CUBLASLT_EPILOGUE_DEFAULT,
        (true, false) => E::CUBLASLT_EPILOGUE_BIAS,
        (false, true) => E::CUBLASLT_EPILOGUE_GELU,
        (true, true) => E::CUBLASLT_EPILOGUE_GELU_BIAS,
    }
}

/// Sets a matmul-descriptor attribute from a plain value.
///
/// # Safety
/// `T` must be the attribute's C type.
unsafe fn set_desc<T>(
    desc: &Desc,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> std::result::Result<(), lt::CublasError> {
    // SAFETY: `v` is a live value of the attribute's type and size.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc.0,
            attr,
            v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
}

/// Sets a preference attribute from a plain value.
///
/// # Safety
/// `T` must be the attribute's C type.
unsafe fn set_pref<T>(
    pref: &Pref,
    attr: sys::cublasLtMatmulPreferenceAttributes_t,
    v: &T,
) -> std::result::Result<(), lt::CublasError> {
    // SAFETY: `v` is a live value of the attribute's type and size.
    unsafe {
        lt::set_matmul_pref_attribute(
            pref.0,
            attr,
            v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
}

fn plan(
    (m, n, k): (usize, usize, usize),
    ab: sys::cudaDataType,
    dt: sys::cudaDataType,
    epi: sys::cublasLtEpilogue_t,
    bias: u64,
) -> std::result::Result<Plan, lt::CublasError> {
    use sys::cublasLtMatmulDescAttributes_t as A;
    let desc = Desc(lt::create_matmul_desc(
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        sys::cudaDataType_t::CUDA_R_32F,
    )?);
    // SAFETY: each value has the C type of its attribute (cublasOperation_t,
    // cublasLtEpilogue_t and cudaDataType_t are 32-bit enums, the bias pointer a CUdeviceptr).
    unsafe {
        set_desc(&desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &OP_T)?;
        set_desc(&desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &OP_N)?;
        set_desc(&desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &(epi as u32))?;
        if bias != 0 {
            set_desc(&desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?;
            // our biases are f32; unset, cuBLASLt would read them as D's type
            let bt = sys::cudaDataType_t::CUDA_R_32F as i32;
            set_desc(&desc, A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt)?;
        }
    }
    let (m, n, k) = (m as u64, n as u64, k as u64);
    Ok(Plan {
        // W row-major [N, K] = column-major [K, N], ld K; op(A) = its transpose, N×K
        a: Layout(lt::create_matrix_layout(ab, k, n, k as i64)?),
        // x row-major [M, K] = column-major [K, M] = xᵀ, ld K
        b: Layout(lt::create_matrix_layout(ab, k, m, k as i64)?),
        // out row-major [M, N] = column-major [N, M] = outᵀ, ld N (f32, or the weight's type)
        d: Layout(lt::create_matrix_layout(dt, n, m, n as i64)?),
        desc,
    })
}

/// The fastest algorithm cuBLASLt proposes for `p` within our workspace and the operands'
/// alignments, or `None` when it has none.
fn heuristic(
    blas: &Blas,
    p: &Plan,
    align: (u32, u32, u32),
) -> std::result::Result<Option<sys::cublasLtMatmulAlgo_t>, lt::CublasError> {
    use sys::cublasLtMatmulPreferenceAttributes_t as P;
    let pref = Pref(lt::create_matmul_pref()?);
    let ws = blas.workspace.len() as u64;
    // SAFETY: MAX_WORKSPACE_BYTES is a uint64_t, the MIN_ALIGNMENT_* are uint32_t.
    unsafe {
        set_pref(&pref, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws)?;
        set_pref(
            &pref,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            &align.0,
        )?;
        set_pref(
            &pref,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            &align.1,
        )?;
        set_pref(
            &pref,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            &align.2,
        )?;
        set_pref(
            &pref,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            &align.2,
        )?;
    }
    // SAFETY: every descriptor is alive for the call.
    match unsafe {
        lt::get_matmul_algo_heuristic(blas.handle, p.desc.0, p.a.0, p.b.0, p.d.0, p.d.0, pref.0)
    } {
        Ok(h) if h.workspaceSize <= blas.workspace.len() => Ok(Some(h.algo)),
        Ok(_) => Ok(None),
        Err(lt::CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `out = act(x·Wᵀ + b)` (see the module docs): x `[.., K]` f32 or of W's type, W `[N, K]` f32 /
/// bf16 / f16, b optional f32 `[N]`, out `[.., N]` f32 or of W's type, not overlapping an input.
/// 16-bit weights round an f32 x to their type (f32 accumulation; a 16-bit out is rounded once
/// from the f32 result, and cuBLASLt adds the bias rounded to the out type, as the reference's
/// autocast does); f32 weights compute in plain f32 (no TF32). The bias is fused into cuBLASLt's
/// epilogue, and so is GELU-tanh for 16-bit weights with an f32 output (cuBLASLt's GELU epilogue
/// is the tanh form there: within 5e-5 of it on the H200,
/// `cublaslt_gelu_epilogue_is_the_tanh_form`; with a 16-bit output it was not, and f32 weights
/// keep our kernel's exact form); SiLU runs in our kernel. Enqueued on the
/// stream, not waited for.
pub fn linear(
    cuda: &Cuda,
    x: &CudaTensor,
    w: &CudaTensor,
    b: Option<&CudaTensor>,
    act: Activation,
    out: &CudaTensor,
) -> Result<()> {
    // fused GELU on the fast path (16-bit weights, f32 outputs; see linear_with); the parity
    // path (f32 weights) keeps our kernel's exact tanh form
    let fuse = w.dtype != DType::F32;
    linear_with(cuda, x, w, b, act, out, fuse).map(|_| ())
}

/// [`linear`] choosing where GELU-tanh runs: `fuse_gelu` uses cuBLASLt's GELU epilogue (when it
/// offers one for the shape; its formula is cuBLASLt's), otherwise our kernel computes it as the
/// wgpu linear does. The bias is fused either way; SiLU always runs in our kernel. Returns whether
/// the activation ran in cuBLASLt's epilogue (false: our kernel, or no activation).
pub fn linear_with(
    cuda: &Cuda,
    x: &CudaTensor,
    w: &CudaTensor,
    b: Option<&CudaTensor>,
    act: Activation,
    out: &CudaTensor,
    fuse_gelu: bool,
) -> Result<bool> {
    let (m, n, k) = check(x, w, b, out)?;
    if m == 0 || n == 0 {
        return Ok(false);
    }
    let what = || {
        format!(
            "linear x [{m}, {k}] · W [{n}, {k}]ᵀ ({:?} weights, {})",
            w.dtype,
            act.name()
        )
    };
    cuda.context()
        .bind_to_thread()
        .map_err(|e| cuda_err("binding the context for cuBLASLt", e))?;
    if k == 0 {
        // an empty sum: out = act(b)
        // SAFETY: `out` covers `out.bytes()` bytes.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                out.ptr(),
                0,
                out.bytes(),
                cuda.stream().cu_stream(),
            )
        }
        .map_err(|e| cuda_err(&format!("clearing the output of {}", what()), e))?;
        return super::ops::bias_activation(cuda, out, b, act).map(|_| false);
    }
    let blas = Blas::of(cuda)?;
    let (ab, wcode, mode) = match w.dtype {
        DType::F32 => (sys::cudaDataType_t::CUDA_R_32F, 0u8, 0u32),
        DType::F16 => (sys::cudaDataType_t::CUDA_R_16F, 1, 1),
        _ => (sys::cudaDataType_t::CUDA_R_16BF, 2, 2),
    };
    let mut state = blas
        .state
        .lock()
        .map_err(|_| Error::Cuda("the cuBLASLt state lock is poisoned".into()))?;
    // B operand: x itself (f32 weights, or x already of the weight's type) or x rounded to the
    // weight's type in the workspace
    let xb = if mode == 0 || x.dtype == w.dtype {
        x.ptr()
    } else {
        let need = m * k * 2;
        if state.input.as_ref().is_none_or(|buf| buf.len() < need) {
            // the old buffer is freed in stream order, after the matmuls that read it
            state.input = None;
            // SAFETY: written by the conversion below before the matmul reads it.
            let buf = unsafe { cuda.stream().alloc::<u8>(need.max(256)) }.map_err(|e| {
                Error::Cuda(format!(
                    "out of GPU memory allocating {need} bytes for the 16-bit input of {} ({e:?})",
                    what()
                ))
            })?;
            state.input = Some(buf);
        }
        let buf = state
            .input
            .as_ref()
            .ok_or_else(|| Error::Cuda("cuBLASLt input buffer missing".into()))?;
        let p = {
            use cudarc::driver::DevicePtr;
            let (p, _sync) = buf.device_ptr(cuda.stream());
            p
        };
        super::ops::convert_raw(cuda, x.ptr(), p, (m * k) as u64, mode)?;
        p
    };
    // D: f32, or the weight's type (check() allows nothing else)
    let (dt, ocode) = if out.dtype == DType::F32 {
        (sys::cudaDataType_t::CUDA_R_32F, 0u8)
    } else {
        (ab, wcode)
    };
    let bias = b.map_or(0, |t| t.ptr());
    // cuBLASLt's GELU epilogue matches the tanh form with an f32 D (within 5e-5 on the H200),
    // but with a 16-bit D it was off by up to 10 % of the value (measured: 0.0243 for 0.0270):
    // a 16-bit output always takes our kernel
    let gelu_fused = fuse_gelu && act == Activation::GeluTanh && out.dtype == DType::F32;
    let align = (alignment(w.ptr()), alignment(xb), alignment(out.ptr()));
    // preferred epilogue first, then none (our kernel finishes the job)
    let mut tries = vec![(bias != 0 && alignment(bias) >= 16, gelu_fused)];
    if tries[0] != (false, false) {
        tries.push((false, false));
    }
    // a fused epilogue that cuBLASLt refuses (no algorithm, or an error) falls back to the plain
    // matmul and our epilogue kernel; only the plain matmul's errors are returned
    let mut refused = Vec::new();
    let last = tries.len() - 1;
    for (i, (fuse_bias, fuse_act)) in tries.into_iter().enumerate() {
        let op = Matmul {
            shape: (m, n, k),
            ab,
            dt,
            wcode,
            ocode,
            w: w.ptr(),
            x: xb,
            out: out.ptr(),
            bias: if fuse_bias { bias } else { 0 },
            epi: epilogue(fuse_bias, fuse_act),
            align,
        };
        match op.run(cuda, blas, &mut state) {
            Ok(true) => {
                drop(state);
                let rest_bias = if fuse_bias { None } else { b };
                let rest_act = if fuse_act { Activation::None } else { act };
                super::ops::bias_activation(cuda, out, rest_bias, rest_act)?;
                return Ok(fuse_act);
            }
            Ok(false) => refused.push(format!("{:?}: no algorithm", op.epi)),
            Err(e) if i < last => refused.push(format!("{:?}: {e:?}", op.epi)),
            Err(e) => {
                return Err(Error::Cuda(format!(
                    "cuBLASLt on {} failed: {e:?} (earlier attempts: {refused:?})",
                    what()
                )));
            }
        }
    }
    Err(Error::Cuda(format!(
        "cuBLASLt has no algorithm for {} (operand alignments {align:?} bytes; {refused:?})",
        what()
    )))
}

/// One cuBLASLt call: `out = x·Wᵀ (+ epilogue)` on device addresses.
struct Matmul {
    shape: (usize, usize, usize),
    ab: sys::cudaDataType,
    /// D's type (f32 or `ab`).
    dt: sys::cudaDataType,
    wcode: u8,
    /// D's dtype code (0 f32, else `wcode`).
    ocode: u8,
    w: u64,
    x: u64,
    out: u64,
    /// Fused bias (0 = none).
    bias: u64,
    epi: sys::cublasLtEpilogue_t,
    /// Alignments of W, the B operand and out.
    align: (u32, u32, u32),
}

impl Matmul {
    /// Enqueues the matmul; `Ok(false)` when cuBLASLt has no algorithm for it.
    fn run(
        &self,
        cuda: &Cuda,
        blas: &Blas,
        state: &mut BlasState,
    ) -> std::result::Result<bool, lt::CublasError> {
        let (m, n, k) = self.shape;
        let p = plan(self.shape, self.ab, self.dt, self.epi, self.bias)?;
        let key: AlgoKey = (
            m,
            n,
            k,
            self.wcode,
            self.ocode,
            self.epi as u32,
            self.align.0,
            self.align.1,
            self.align.2,
            if self.bias != 0 {
                alignment(self.bias)
            } else {
                0
            },
        );
        let algo = match state.algos.get(&key) {
            Some(a) => *a,
            None => {
                let a = heuristic(blas, &p, self.align)?;
                state.algos.insert(key, a);
                a
            }
        };
        let Some(algo) = algo else {
            return Ok(false);
        };
        let (alpha, beta) = (1f32, 0f32);
        let wsp = {
            use cudarc::driver::DevicePtr;
            let (p, _sync) = blas.workspace.device_ptr(cuda.stream());
            p
        };
        // SAFETY: the layouts describe exactly the operands the caller checked (W [N, K], the B
        // operand [M, K] of the weight's type, out [M, N] of D's type); C = D = out with
        // beta = 0 (C is not read); the workspace is ours and at least the algorithm's size.
        unsafe {
            lt::matmul(
                blas.handle,
                p.desc.0,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                self.w as *const c_void,
                p.a.0,
                self.x as *const c_void,
                p.b.0,
                self.out as *const c_void,
                p.d.0,
                self.out as *mut c_void,
                p.d.0,
                &algo,
                wsp as *mut c_void,
                blas.workspace.len(),
                cuda.stream().cu_stream() as sys::cudaStream_t,
            )
        }?;
        Ok(true)
    }
}
