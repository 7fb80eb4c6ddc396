//! Every CUDA C source of the layer, by module name (compiled by NVRTC at first use; the tests
//! compile each of them for several architectures wherever NVRTC is installed). Each module is
//! `src/cuda/kernels/common.cuh` (types, the inline-PTX primitives, the attention kernels'
//! online softmax) followed by its own file.

/// The DiT ops (norms, elementwise, RoPE, head moves, row gathers, patches, conversions):
/// `src/cuda/kernels/ops.cu`, launched by [`super::ops`] and [`super::gemm`].
pub const OPS: &str = concat!(
    include_str!("kernels/common.cuh"),
    include_str!("kernels/ops.cu")
);

/// NABLA mask estimation (pooling, block scores, softmax + CDF threshold + STA, lists):
/// `src/cuda/kernels/nabla.cu`, launched by [`super::nabla`].
pub const NABLA: &str = concat!(
    include_str!("kernels/common.cuh"),
    include_str!("kernels/nabla.cu")
);

/// Block-sparse flash attention (tensor cores for f16 / bf16, an f32 fallback):
/// `src/cuda/kernels/attention.cu`, launched by [`super::attention`].
pub const ATTENTION: &str = concat!(
    include_str!("kernels/common.cuh"),
    include_str!("kernels/attention.cu")
);

/// Block-sparse flash attention on Hopper warpgroup MMA (`wgmma`, sm_90a only):
/// `src/cuda/kernels/attention_sm90a.cu`, launched by [`super::attention`].
pub const ATTENTION_SM90A: &str = concat!(
    include_str!("kernels/common.cuh"),
    include_str!("kernels/attention_sm90a.cu")
);

/// `(module name, CUDA C source)` of every kernel file under `src/cuda/kernels/`.
pub const SOURCES: &[(&str, &str)] = &[
    ("ops", OPS),
    ("nabla", NABLA),
    ("attention", ATTENTION),
    ("attention_sm90a", ATTENTION_SM90A),
];

/// The NVRTC targets module `module` is built for: a module whose name ends in `_sm90a` uses
/// Hopper-only instructions (`wgmma`) and exists for `sm_90a` only; the others compile for
/// every architecture from `sm_80` on (the tests check `sm_80` and `sm_90`).
pub fn archs(module: &str) -> &'static [&'static str] {
    if module.ends_with("_sm90a") {
        &["sm_90a"]
    } else {
        &["sm_80", "sm_90"]
    }
}
