//! Every WGSL kernel of the crate, and the one place where dtype/size variants are spelled out.
//!
//! Kernels are plain `.wgsl` files under `shaders/`. Variants differ only by a short prelude
//! ([`prelude`]) that names the storage type (`S1` scalar, `S4` vec4) and, for attention, the
//! head dimension `HD`. [`all_variants`] lists every variant the crate can create, so a test
//! validates each one with naga and translates it to MSL and HLSL.

use crate::gpu::DType;

/// NABLA block average pooling.
pub const POOL: &str = include_str!("../shaders/nabla/pool.wgsl");
/// RoPE + head split + block average pooling in one pass (the DiT's q/k producer).
pub const ROPE_POOL: &str = include_str!("../shaders/nabla/rope_pool.wgsl");
/// Compressed attention logits `qa·kaᵀ/√D`.
pub const SCORES: &str = concat!(
    include_str!("../shaders/nabla/scores_io.wgsl"),
    include_str!("../shaders/nabla/scores.wgsl")
);
/// Params and bindings shared by both block-scores kernels.
pub const SCORES_IO: &str = include_str!("../shaders/nabla/scores_io.wgsl");
/// NABLA block scores on cooperative matrices, f32-accurate by an f16 hi/lo split.
pub const SCORES_COOP: &str = include_str!("../shaders/nabla/scores_coop.wgsl");

/// Source of the cooperative-matrix scores kernel for subgroup size `subgroup`.
pub fn scores_coop_source(subgroup: u32) -> String {
    let wgs = 4 * subgroup;
    let body = expand_unroll(SCORES_COOP, &[("QV", 256 / wgs), ("KV", 256 / wgs)]);
    format!(
        "enable f16;\nenable wgpu_cooperative_matrix;\nconst SG: u32 = {subgroup}u;\n\
         {SCORES_IO}{body}"
    )
}
/// Softmax + CDF threshold + STA union + per-row lists.
pub const THRESHOLD: &str = include_str!("../shaders/nabla/threshold.wgsl");
/// Workgroup-tree reductions + entry point of the threshold kernel (any adapter).
pub const REDUCE_WG: &str = include_str!("../shaders/nabla/reduce_wg.wgsl");
/// Subgroup reductions + entry point of the threshold kernel (adapters with SUBGROUP).
pub const REDUCE_SG: &str = include_str!("../shaders/nabla/reduce_sg.wgsl");

/// The threshold kernel with one subgroup per row (no workgroup barriers).
pub const THRESHOLD_ROWS: &str = include_str!("../shaders/nabla/threshold_rows.wgsl");

/// Most values per lane of the row-per-subgroup threshold kernel (Nb ≤ KL·SG; the dispatcher
/// builds it for KL = ceil(Nb / SG) exactly).
pub const THRESHOLD_ROWS_KL_MAX: u32 = 64;

/// Source of the row-per-subgroup threshold kernel; `write_probs`: the row's probabilities
/// are written back over its logits.
pub fn threshold_rows_source(kl: u32, subgroup: u32, write_probs: bool) -> String {
    let body = expand_unroll(THRESHOLD_ROWS, &[("KL", kl)]);
    format!(
        "const KL: u32 = {kl}u;\nconst SG: u32 = {subgroup}u;\nconst WRITE_PROBS: u32 = {}u;\n{body}",
        write_probs as u32
    )
}

/// Values per thread of the threshold kernel: Nb ≤ 256·K (exact up to 8, then powers of two).
pub const THRESHOLD_K: [u32; 11] = [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64];

/// Source of the threshold kernel for `k` values per thread, with subgroup or workgroup
/// reductions.
pub fn threshold_source(k: u32, subgroups: bool) -> String {
    let reduce = if subgroups { REDUCE_SG } else { REDUCE_WG };
    let body = expand_unroll(THRESHOLD, &[("K", k)]);
    format!("{body}{reduce}")
}
/// Fractal (8×8 tile) token order and its inverse.
pub const FRACTAL: &str = include_str!("../shaders/nabla/fractal.wgsl");
/// Block-sparse flash attention (portable).
pub const BLOCK_SPARSE: &str = include_str!("../shaders/attention/block_sparse.wgsl");
/// Block-sparse flash attention on cooperative matrices (16×16×16 f16 → f32, Vulkan).
pub const BLOCK_SPARSE_COOP: &str = include_str!("../shaders/attention/block_sparse_coop.wgsl");

/// Spans of eight f16 values read as four u32 words (one 16-byte load), split into f16 by
/// 16-bit integer bitcasts (needs `wgpu::Features::SHADER_I16`).
pub const H8_WORDS: &str = include_str!("../shaders/gpu/h8_words.wgsl");
/// The same spans turned into f16 through `unpack2x16float` (devices without 16-bit integers).
pub const H8_UNPACK: &str = include_str!("../shaders/gpu/h8_unpack.wgsl");

/// The `enable` directive (if any; it must open the module) and the `H8` span helpers
/// (`h8_lo`, `h8_hi`, `h8_filler`): 16-bit integer bitcasts where the device has them
/// (`int16`), else `unpack2x16float`.
pub fn h8(int16: bool) -> (&'static str, &'static str) {
    if int16 {
        ("enable wgpu_int16;\n", H8_WORDS)
    } else {
        ("", H8_UNPACK)
    }
}

/// Subgroup sizes the cooperative kernels are built for (4 subgroups per workgroup).
pub const COOP_SUBGROUP_SIZES: [u32; 3] = [16, 32, 64];

/// Source of a cooperative-matrix variant: f16 storage, head dim and subgroup size; the
/// `//@unroll` blocks are expanded with `NT = HD/16`, `NTH = HD/32` and `KPL4` (vec4s of keys
/// per softmax lane: 32 keys over SG/16 lanes per row) and `KSTH` (16-byte spans of a 32-row
/// K/V chunk each of the NSG·SG threads stages, at least one); `KSTP` = 1 when the spans divide
/// evenly over the threads (else some are staged twice, `span` in block_sparse_coop.wgsl).
/// `pairs`: two query blocks per workgroup of NSG = 8 subgroups (else one block, 4 subgroups).
/// `int16`: K and V spans as u32 words ([`h8`]). `probe` is a diagnostic of
/// `nabla bench attention` (0 in real runs).
pub fn source_coop(
    body: &str,
    head_dim: u32,
    subgroup: u32,
    pairs: bool,
    int16: bool,
    probe: u32,
) -> String {
    let nsg = if pairs { 8 } else { 4 };
    let nt = head_dim / 16;
    let kpl4 = 32 / (subgroup / 16) / 4;
    // every thread stages the same whole number of vec4s of a 32-row K/V chunk
    let chunk = 32 * (head_dim / 4);
    assert!(
        chunk.is_multiple_of(nsg * subgroup) && chunk >= nsg * subgroup,
        "a {chunk}-vec4 K/V chunk does not split over {nsg} subgroups of {subgroup}"
    );
    let kst = chunk / (nsg * subgroup);
    let paired = kst.is_multiple_of(2) as u32;
    let body = expand_unroll(
        body,
        &[
            ("NT", nt),
            ("NTH", nt / 2),
            ("KPL4", kpl4),
            ("KSTH", kst.div_ceil(2)),
        ],
    );
    let (enable16, h8) = h8(int16);
    // The kernel's cooperative operations sit after a branch on a workgroup-memory flag that
    // every thread reads alike (block_sparse_coop.wgsl, the rescale flag); naga reports the
    // uniformity that cooperative operations need through this diagnostic, so it is turned off
    // for this module (nothing here takes derivatives).
    format!(
        "diagnostic(off, derivative_uniformity);\n{enable16}enable f16;\n\
         enable wgpu_cooperative_matrix;\nalias S1 = f16;\n\
         alias S4 = vec4<f16>;\nconst HD: u32 = {head_dim}u;\nconst SG: u32 = {subgroup}u;\n\
         const PROBE: u32 = {probe}u;\nconst KSTP: u32 = {paired}u;\nconst NSG: u32 = {nsg}u;\n\
         {h8}{body}{BLOCK_SPARSE_COMMON}"
    )
}

/// What the two tensor-core attention kernels share (appended to both).
pub const BLOCK_SPARSE_COMMON: &str = include_str!("../shaders/attention/block_sparse_common.wgsl");

/// Block-sparse flash attention on cooperative matrices with the softmax in registers (SPIR-V
/// element access, [`crate::gpu::spirv`]; subgroups of 32).
pub const BLOCK_SPARSE_REGS: &str = include_str!("../shaders/attention/block_sparse_regs.wgsl");

/// Source of [`BLOCK_SPARSE_REGS`] for a head dim (64 or 128) and the device's element order
/// ([`crate::gpu::coop_layout::Layout`]); `int16` and `probe` as in [`source_coop`]. Built for
/// 4 subgroups of 32.
pub fn source_regs(
    head_dim: u32,
    int16: bool,
    layout: &crate::gpu::coop_layout::Layout,
    probe: u32,
) -> String {
    let nt = head_dim / 16;
    // 16-byte spans of a 32-row chunk per thread (K, and V): 8 vec4s of 128 at head dim 128
    let kst = 32 * (head_dim / 4) / 128;
    let body = expand_unroll(
        BLOCK_SPARSE_REGS,
        &[("NT", nt), ("KSTH", kst.div_ceil(2)), ("E", 8)],
    );
    let (enable16, h8) = h8(int16);
    let mut consts = String::new();
    for i in 0..8 {
        consts += &format!(
            "const RH{i}: u32 = {}u;\nconst CL{i}: u32 = {}u;\n",
            layout.hi[i], layout.col[i]
        );
    }
    format!(
        "{enable16}enable f16;\n\
         enable wgpu_cooperative_matrix;\nconst HD: u32 = {head_dim}u;\nconst SG: u32 = 32u;\n\
         const NSG: u32 = 4u;\nconst PROBE: u32 = {probe}u;\nconst KSTP: u32 = {}u;\n{consts}{h8}{body}\
         {BLOCK_SPARSE_COMMON}",
        kst.is_multiple_of(2) as u32
    )
}

/// Repeats the lines between `//@unroll NAME` and `//@end` for `t = 0..NAME`, replacing `{t}`
/// by `t` and `{t+OTHER}` by `t + OTHER` (names from `vars`). Cooperative matrices are kept in
/// named variables this way: arrays of them indexed in loops may land in local memory.
pub fn expand_unroll(src: &str, vars: &[(&str, u32)]) -> String {
    let value = |name: &str| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    let mut out = String::with_capacity(src.len() * 2);
    let mut block: Option<(u32, Vec<&str>)> = None;
    for line in src.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("//@unroll ") {
            block = Some((value(name.trim()).unwrap_or(0), Vec::new()));
            continue;
        }
        if t == "//@end" {
            if let Some((n, lines)) = block.take() {
                for i in 0..n {
                    for l in &lines {
                        let mut l = l.replace("{t}", &i.to_string());
                        for (name, v) in vars {
                            l = l.replace(&format!("{{t+{name}}}"), &(i + v).to_string());
                        }
                        out.push_str(&l);
                        out.push('\n');
                    }
                }
            }
            continue;
        }
        match block.as_mut() {
            Some((_, lines)) => lines.push(line),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

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
    for hd in [64, 128] {
        for sg in COOP_SUBGROUP_SIZES {
            for pairs in [false, true] {
                for int16 in [false, true] {
                    v.push((
                        format!(
                            "attention/block_sparse_coop[d{hd},sg{sg},pairs={pairs},i16={int16}]"
                        ),
                        source_coop(BLOCK_SPARSE_COOP, hd, sg, pairs, int16, 0),
                    ));
                }
            }
        }
    }
    // (the element order the H200 reports; other orders only permute constants)
    let nv = crate::gpu::coop_layout::Layout::NVIDIA;
    for hd in [64, 128] {
        for int16 in [false, true] {
            v.push((
                format!("attention/block_sparse_regs[d{hd},i16={int16}]"),
                source_regs(hd, int16, &nv, 0),
            ));
        }
    }
    v.push(("gpu/coop_layout".into(), crate::gpu::coop_layout::source()));
    v.push((
        "gpu/occupancy[24592B,w128]".into(),
        crate::gpu::occupancy::source(24592, 128),
    ));
    v.push((
        "gpu/bandwidth[w256]".into(),
        crate::gpu::bandwidth::source(256),
    ));
    v.push(("nabla/scores".into(), SCORES.to_string()));
    for sg in COOP_SUBGROUP_SIZES {
        v.push((format!("nabla/scores_coop[sg{sg}]"), scores_coop_source(sg)));
    }
    for kl in 1..=THRESHOLD_ROWS_KL_MAX {
        for sg in [8, 16, 32, 64] {
            // both forms, named as the dispatcher keys its pipelines
            for probs in [true, false] {
                v.push((
                    format!("nabla/threshold_rows[kl{kl},sg{sg},probs={probs}]"),
                    threshold_rows_source(kl, sg, probs),
                ));
            }
        }
    }
    for k in THRESHOLD_K {
        for sg in [false, true] {
            let tag = if sg { "sg" } else { "wg" };
            v.push((
                format!("nabla/threshold[k{k},{tag}]"),
                threshold_source(k, sg),
            ));
        }
    }
    v.push(("nabla/fractal".into(), FRACTAL.to_string()));
    v.extend(crate::nabla::rope_pool_variants());
    v.extend(crate::ops::variants());
    v
}
