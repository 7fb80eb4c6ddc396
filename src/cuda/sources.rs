//! Every CUDA C source of the layer, by module name (compiled by NVRTC at first use; the tests
//! compile each of them for several architectures wherever NVRTC is installed).

/// The DiT ops (norms, elementwise, RoPE, head moves, row gathers, patches, conversions):
/// `src/cuda/kernels/ops.cu`, launched by [`super::ops`] and [`super::gemm`].
pub const OPS: &str = include_str!("kernels/ops.cu");

/// NABLA mask estimation (pooling, block scores, softmax + CDF threshold + STA, lists):
/// `src/cuda/kernels/nabla.cu`, launched by [`super::nabla`].
pub const NABLA: &str = include_str!("kernels/nabla.cu");

/// Block-sparse flash attention (tensor cores for f16 / bf16, an f32 fallback):
/// `src/cuda/kernels/attention.cu`, launched by [`super::attention`].
pub const ATTENTION: &str = include_str!("kernels/attention.cu");

/// `(module name, CUDA C source)` of every kernel file under `src/cuda/kernels/`.
pub const SOURCES: &[(&str, &str)] = &[("ops", OPS), ("nabla", NABLA), ("attention", ATTENTION)];
