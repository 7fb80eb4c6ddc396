//! Every WGSL kernel of the crate, and the one place where dtype/size variants are spelled out.
//!
//! Kernels are plain `.wgsl` files under `shaders/`. Variants differ only by a short prelude
//! ([`prelude`]) that names the storage type (`S1` scalar, `S4` vec4) and, for attention, the
//! head dimension `HD`. [`all_variants`] lists every variant the crate can create, so a test
//! validates each one with naga and translates it to MSL and HLSL.

use crate::gpu::DType;

/// NABLA block average pooling.
pub const POOL: &str = include_str!("../shaders/nabla/pool.wgsl");
/// Compressed attention logits `qa·kaᵀ/√D`.
pub const SCORES: &str = include_str!("../shaders/nabla/scores.wgsl");
/// Softmax + CDF threshold + STA union + per-row lists.
pub const THRESHOLD: &str = include_str!("../shaders/nabla/threshold.wgsl");
/// Fractal (8×8 tile) token order and its inverse.
pub const FRACTAL: &str = include_str!("../shaders/nabla/fractal.wgsl");
/// Block-sparse flash attention (portable).
pub const BLOCK_SPARSE: &str = include_str!("../shaders/attention/block_sparse.wgsl");

/// The prelude for a storage type and optional head dimension.
pub fn prelude(storage: DType, head_dim: Option<u32>) -> String {
    let mut s = match storage {
        DType::F16 => "enable f16;\nalias S1 = f16;\nalias S4 = vec4<f16>;\n".to_string(),
        _ => "alias S1 = f32;\nalias S4 = vec4<f32>;\n".to_string(),
    };
    if let Some(d) = head_dim {
        s += &format!("const HD: u32 = {d}u;\n");
    }
    s
}

/// Source of a kernel variant: prelude + file.
pub fn source(body: &str, storage: DType, head_dim: Option<u32>) -> String {
    prelude(storage, head_dim) + body
}

/// Every kernel variant the crate may create: `(name, source)`.
pub fn all_variants() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for st in [DType::F32, DType::F16] {
        let tag = format!("{st:?}").to_lowercase();
        v.push((format!("nabla/pool[{tag}]"), source(POOL, st, None)));
        for hd in [64, 128] {
            v.push((
                format!("attention/block_sparse[{tag},d{hd}]"),
                source(BLOCK_SPARSE, st, Some(hd)),
            ));
        }
    }
    v.push(("nabla/scores".into(), SCORES.to_string()));
    v.push(("nabla/threshold".into(), THRESHOLD.to_string()));
    v.push(("nabla/fractal".into(), FRACTAL.to_string()));
    v.extend(crate::ops::variants());
    v
}
