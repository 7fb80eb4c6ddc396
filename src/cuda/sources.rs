//! Every CUDA C source of the layer, by module name (compiled by NVRTC at first use; the tests
//! compile each of them for several architectures wherever NVRTC is installed).

/// `(module name, CUDA C source)` of every kernel file under `src/cuda/kernels/`.
pub const SOURCES: &[(&str, &str)] = &[];
