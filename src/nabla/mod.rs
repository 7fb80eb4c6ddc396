//! NABLA: the `--sparse-algo` grammar, the block grid, STA windows, the fractal token order and
//! block-mask estimation on the GPU.

mod algo;
mod fractal;
mod grid;
mod mask;
mod rope_pool;
mod sta;

pub use algo::{SparseAlgo, StaWindow};
pub use fractal::{from_fractal, record_fractal, to_fractal};
pub use grid::BlockGrid;
pub use mask::{
    BlockMask, MaskKernels, MaskStages, Reduction, Scores, estimate_mask,
    estimate_mask_with_stages, map_stride, mask_from_pooled, mask_from_pooled_with,
    record_estimate_mask, record_mask_from_pooled, time_mask_stages,
};
pub(crate) use rope_pool::variants as rope_pool_variants;
pub use rope_pool::{
    record_rope_split_heads, record_rope_split_heads_pooled, rope_split_heads_pooled,
};
pub use sta::sta_lists;

/// Tokens per NABLA block (one 8×8 tile of one frame). Fixed by the reference.
pub const BLOCK: usize = 64;

/// Which operand of the mask estimation a fused producer pools: the DiT's RoPE + head split
/// can block-pool the rotated heads as it writes them (`Backend::rope_split_heads_pooled`), so
/// the mask estimation does not read q and k a second time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkSide {
    /// The queries (pooled into the scratch's `qa`).
    Q,
    /// The keys (pooled into the scratch's `ka`).
    K,
}
