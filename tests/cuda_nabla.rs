#![cfg(feature = "cuda")]
//! The CUDA NABLA mask pipeline and block-sparse attention (`--features cuda`):
//!
//! * NVRTC (no device): `nabla.cu` and `attention.cu` compile for sm_80 and sm_90, and assemble
//!   to SASS (NVRTC's cubin path runs ptxas, so inline-PTX operand errors surface here) with no
//!   register spills in the tensor-core kernels;
//! * on a device: masks against the CPU reference (one block, Nb not a power of two, thresholds
//!   0 and 1, ties, mass in one block, a flat row, STA and the union, f32 / f16 / bf16 inputs,
//!   D 64 and 128, a large Nb, scratch reuse across grids) and the golden masks; attention
//!   against the f64 CPU reference (f16, bf16, f32; D 64 and 128; ragged Sq / Skv; dense and
//!   sparse lists; mask heads 1 and B·H; 2 and 3 stages; empty rows; a late block with much
//!   larger logits) and the golden attention cases, outputs poisoned with NaN first, fresh random
//!   inputs, relative L2 and elementwise bounds; bad inputs as errors; the timing helpers.
//!
//! Without a driver or a device the GPU tests print "no CUDA device: skipped" and pass; the
//! NVRTC tests fail where NVRTC is missing unless `NABLA_SKIP_NVRTC=1`.

mod common;

use common::cuda::{round_to, upload};

use common::golden::{cases, check, golden_dir, tolerance};
use common::{Rng, assert_close, check_mask_against_reference, structured_qk};
use nabla::cuda::attention::{
    AttentionOptions, AttnKernel, attention, attention_with, bench_attention,
};
use nabla::cuda::nabla::{
    CudaMask, MaskScratch, ScoresKernel, block_logits, estimate_mask, estimate_mask_prepooled,
    estimate_mask_with_map, mask_from_pooled, pool, rope_split_heads_pooled, sta_mask,
    time_mask_stages,
};
use nabla::cuda::{Cuda, CudaTensor};
use nabla::io::TensorFile;
use nabla::nabla::QkSide;
use nabla::{BlockGrid, DType, SparseAlgo, StaWindow, reference};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// NVRTC (no device)
// ---------------------------------------------------------------------------------------------

/// Kernels the launchers of `src/cuda/nabla.rs` and `src/cuda/attention.rs` use.
const KERNELS: &[(&str, &[&str])] = &[
    (
        "nabla",
        &[
            "nabla_pool_f32",
            "nabla_pool_f16",
            "nabla_pool_bf16",
            "nabla_rope_pool_f32",
            "nabla_rope_pool_f16",
            "nabla_rope_pool_bf16",
            "nabla_split",
            "nabla_scores",
            "nabla_scores128",
            "nabla_sta_bits",
            "nabla_threshold",
            "nabla_rope_f32",
            "nabla_rope_f16",
            "nabla_rope_bf16",
        ],
    ),
    (
        "attention",
        &[
            "attn_f16_d64_s2",
            "attn_f16_d64_s3",
            "attn_f16_d128_s2",
            "attn_f16_d128_s3",
            "attn_bf16_d64_s2",
            "attn_bf16_d64_s3",
            "attn_bf16_d128_s2",
            "attn_bf16_d128_s3",
            "attn2_f16_d64_s2",
            "attn2_f16_d128_s2",
            "attn2_bf16_d64_s2",
            "attn2_bf16_d128_s2",
            "attn_f32_d64",
            "attn_f32_d128",
        ],
    ),
    (
        "attention_sm90a",
        &[
            "attn_wg_f16_d64",
            "attn_wg_f16_d128",
            "attn_wg_bf16_d64",
            "attn_wg_bf16_d128",
        ],
    ),
];

/// Whether NVRTC tests should run; panics when NVRTC is missing and skipping was not asked for.
fn nvrtc_or_skip() -> bool {
    if nabla::cuda::nvrtc_present() {
        return true;
    }
    if std::env::var("NABLA_SKIP_NVRTC").is_ok_and(|v| v == "1") {
        eprintln!("NVRTC missing and NABLA_SKIP_NVRTC=1: skipped");
        return false;
    }
    panic!(
        "NVRTC (libnvrtc.so) is not installed or not on LD_LIBRARY_PATH: the CUDA kernel sources \
         cannot be checked. Install the CUDA 13 runtime compiler (nvidia-cuda-nvrtc) or set \
         NABLA_SKIP_NVRTC=1 to skip this test"
    );
}

fn source(name: &str) -> &'static str {
    nabla::cuda::sources::SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .unwrap_or_else(|| panic!("module {name} is not registered in cuda::sources::SOURCES"))
}

#[test]
fn nabla_and_attention_compile_with_nvrtc() {
    if !nvrtc_or_skip() {
        return;
    }
    for (name, kernels) in KERNELS {
        for &arch in nabla::cuda::sources::archs(name) {
            let ptx = nabla::cuda::compile_ptx(name, source(name), arch)
                .unwrap_or_else(|e| panic!("{name}.cu for {arch}: {e}"));
            let text = ptx.to_src();
            for k in *kernels {
                assert!(
                    text.contains(&format!(".entry {k}(")),
                    "{name}.cu for {arch} has no kernel {k}"
                );
            }
            eprintln!("{name}.cu for {arch}: {} bytes of PTX", text.len());
        }
    }
}

/// ptxas's `-v` log parsed per kernel: entries open at "Compiling entry function", numbers
/// become statistics named by their unit, warnings stay whole, lines before any entry are
/// dropped.
#[test]
fn ptxas_logs_parse_per_kernel() {
    let log = "ptxas info    : 0 bytes gmem\n\
        ptxas info    : Compiling entry function 'k_a' for 'sm_90a'\n\
        ptxas info    : Function properties for k_a\n\
        ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n\
        ptxas info    : Used 168 registers, used 16 barriers, 80 bytes smem\n\
        ptxas warning : wgmma serialized\n\
        ptxas info    : Compiling entry function 'k_b' for 'sm_90a'\n\
        ptxas info    : Used 40 registers\n";
    let got = nabla::cuda::parse_ptxas_log(log);
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["k_a", "k_b"]);
    let get = |i: usize, k: &str| {
        got[i]
            .1
            .iter()
            .find(|s| s.name == k)
            .map(|s| s.value.clone())
    };
    assert_eq!(get(0, "registers").as_deref(), Some("168"));
    assert_eq!(get(0, "barriers").as_deref(), Some("16"));
    assert_eq!(get(0, "bytes smem").as_deref(), Some("80"));
    assert_eq!(get(0, "bytes spill stores").as_deref(), Some("4"));
    assert_eq!(get(0, "bytes stack frame").as_deref(), Some("8"));
    assert!(get(0, "warning").is_some_and(|w| w.contains("serialized")));
    assert_eq!(get(1, "registers").as_deref(), Some("40"));
    assert_eq!(got[1].1.len(), 1);
    assert!(get(0, "bytes gmem").is_none());
}

/// `nabla info --kernel-stats --backend cuda` behind the scenes: every Hopper FlashAttention-3
/// kernel reports its registers (the 240/24 split leaves ptxas at 168 per thread) and no spills.
#[test]
fn kernel_statistics_cover_the_hopper_kernels() {
    if !nvrtc_or_skip() {
        return;
    }
    let stats = nabla::cuda::kernel_statistics("attention_sm90a/attn_fa_").unwrap();
    assert_eq!(stats.len(), 4, "{stats:?}");
    for k in &stats {
        assert!(k.kernel.ends_with("[sm_90a]"), "{}", k.kernel);
        let v = |name: &str| {
            k.stats
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.value.clone())
                .unwrap_or_else(|| panic!("{}: no {name} in {:?}", k.kernel, k.stats))
        };
        let regs: u32 = v("registers").parse().unwrap();
        assert!((1..=255).contains(&regs), "{}: {regs} registers", k.kernel);
        assert_eq!(v("bytes spill stores"), "0", "{}", k.kernel);
    }
    assert!(
        nabla::cuda::kernel_statistics("ops/no such kernel")
            .unwrap()
            .is_empty()
    );
}

#[test]
fn kernels_assemble_to_sass_without_spills() {
    if !nvrtc_or_skip() {
        return;
    }
    for (name, _) in KERNELS {
        for &arch in nabla::cuda::sources::archs(name) {
            let log = nabla::cuda::compile_cubin(name, source(name), arch)
                .unwrap_or_else(|e| panic!("ptxas on {name}.cu for {arch}: {e}"));
            // ptxas serializes wgmma it cannot keep in flight (a silent 2x); never accept it
            assert!(
                !log.contains("serialized"),
                "ptxas serialized wgmma in {name}.cu for {arch}:\n{log}"
            );
            // "Function properties for K" is followed by "... N bytes spill stores, ..."
            let mut current = String::new();
            for line in log.lines() {
                if let Some(f) = line.split("Function properties for ").nth(1) {
                    current = f.trim().to_string();
                }
                let checked = name.starts_with("attention") || current.starts_with("nabla_scores");
                if line.contains("spill stores") && checked && arch != "sm_80" {
                    assert!(
                        line.contains(" 0 bytes spill stores"),
                        "{name}.cu {current} spills registers on {arch}: {line}"
                    );
                }
                if line.contains("Used") && line.contains("registers") {
                    eprintln!("{name}.cu {arch} {current}: {}", line.trim());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

/// A tensor filled with NaN (every dtype's quiet-NaN pattern).
fn poisoned(c: &Cuda, shape: &[usize], dtype: DType) -> CudaTensor {
    let n: usize = shape.iter().product();
    let bytes: Vec<u8> = match dtype {
        DType::F32 | DType::U32 => bytemuck::cast_slice(&vec![0x7fc0_0000u32; n]).to_vec(),
        DType::F16 => bytemuck::cast_slice(&vec![0x7e00u16; n]).to_vec(),
        DType::BF16 => bytemuck::cast_slice(&vec![0x7fc0u16; n]).to_vec(),
    };
    c.upload_bytes(&bytes, shape, dtype).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Masks against the CPU reference
// ---------------------------------------------------------------------------------------------

fn run_mask_case(tag: u64, grid: BlockGrid, heads: usize, d: usize, algos: &[&str], dt: DType) {
    let c = device!();
    let mut rng = Rng::fresh(tag);
    let (q, k) = structured_qk(&mut rng, grid, heads, d);
    let (s, nb) = (grid.tokens(), grid.blocks());
    let shape = [1, heads, s, d];
    let (qt, kt) = (upload(c, &q, &shape, dt), upload(c, &k, &shape, dt));
    let qa_ref = reference::pool(&round_to(&q, dt), heads, s, d);
    let ka_ref = reference::pool(&round_to(&k, dt), heads, s, d);
    let scratch = MaskScratch::alloc(c, heads, nb, d).unwrap();
    for a in algos {
        let what = format!("{a} {grid:?} d{d} {dt:?}");
        let algo: SparseAlgo = a.parse().unwrap();
        let mask = estimate_mask_with_map(c, &qt, &kt, grid, &algo, &scratch).unwrap();
        let dense = mask.to_dense(c).unwrap();
        if algo.threshold().is_none() {
            let w = algo.sta().unwrap();
            assert_eq!(mask.heads, 1, "{what}: STA masks are shared");
            assert_eq!(dense, reference::sta_mask(&grid, &w), "{what}: STA lists");
            continue;
        }
        assert_eq!((mask.heads, mask.nq, mask.nkv), (heads, nb, nb));
        let qa = c.download_f32(scratch.qa()).unwrap();
        let ka = c.download_f32(scratch.ka()).unwrap();
        assert_close(&format!("{what} qa"), &qa, &qa_ref, 1e-5, 1e-5, 1e-6);
        assert_close(&format!("{what} ka"), &ka, &ka_ref, 1e-5, 1e-5, 1e-6);
        let map = c.download_f32(scratch.map()).unwrap();
        let map_ref = reference::block_map(&qa, &ka, heads, nb, d);
        assert_close(&format!("{what} map"), &map, &map_ref, 1e-6, 1e-4, 1e-5);
        check_mask_against_reference(&what, &dense, &map, heads * nb, nb, &algo, &grid);
        // the fast path (no map written) gives the same lists. Only the listed entries are
        // compared: entries past a row's count are never written (uninitialised device memory,
        // which is what made a whole-buffer comparison fail on the H200). The masks view the
        // scratch's lists, so the map path's rows are read before the fast path overwrites them.
        let with_map = mask.read_rows(c).unwrap();
        let fast = estimate_mask(c, &qt, &kt, grid, &algo, &scratch).unwrap();
        let fast = fast.read_rows(c).unwrap();
        if let Some(r) = (0..with_map.len()).find(|&r| fast[r] != with_map[r]) {
            panic!(
                "{what}: estimate_mask and estimate_mask_with_map differ in row {r} (of {}): {:?} vs \
                 {:?}",
                with_map.len(),
                fast[r],
                with_map[r]
            );
        }
        assert_eq!(fast.len(), with_map.len());
    }
}

#[test]
fn mask_one_block() {
    run_mask_case(
        101,
        BlockGrid::new(1, 1, 1).unwrap(),
        2,
        64,
        &[
            "nabla-0.0",
            "nabla-0.5",
            "nabla-1.0",
            "sta-1-1-1",
            "nabla-0.3_sta-1-1-1",
        ],
        DType::F32,
    );
}

#[test]
fn mask_odd_grid_d128_all_thresholds() {
    run_mask_case(
        102,
        BlockGrid::new(3, 2, 5).unwrap(),
        3,
        128,
        &[
            "nabla-0",
            "nabla-0.2",
            "nabla-0.7",
            "nabla-0.95",
            "nabla-1",
            "nabla-0.6_sta-3-3-3",
            "nabla-0.3_sta-2-1-4",
            "sta-11-3-3",
            "sta-1-1-1",
        ],
        DType::F32,
    );
}

#[test]
fn mask_d64_f16_storage() {
    run_mask_case(
        103,
        BlockGrid::new(2, 3, 3).unwrap(),
        2,
        64,
        &["nabla-0.7", "nabla-0.4_sta-3-3-3"],
        DType::F16,
    );
}

#[test]
fn mask_d128_bf16_storage() {
    run_mask_case(
        104,
        BlockGrid::new(2, 2, 5).unwrap(),
        3,
        128,
        &["nabla-0.7", "nabla-0.5_sta-3-1-1", "nabla-0.9"],
        DType::BF16,
    );
}

/// 105 blocks: more than 64 and not a power of two (several keys per lane, a partial last word).
#[test]
fn mask_nb_not_power_of_two() {
    run_mask_case(
        105,
        BlockGrid::new(3, 5, 7).unwrap(),
        2,
        64,
        &["nabla-0.9_sta-3-3-3", "nabla-0.4", "nabla-0"],
        DType::F16,
    );
}

/// Uploads pooled `[heads, nb, d]` q/k and runs `mask_from_pooled`; returns (mask, map).
fn from_pooled(
    c: &Cuda,
    qa: &[f32],
    ka: &[f32],
    heads: usize,
    grid: BlockGrid,
    d: usize,
    algo: &SparseAlgo,
) -> (Vec<u8>, Vec<f32>, CudaMask) {
    let nb = grid.blocks();
    let scratch = MaskScratch::alloc(c, heads, nb, d).unwrap();
    let qt = c.upload_f32(qa, &[heads, nb, d]).unwrap();
    let kt = c.upload_f32(ka, &[heads, nb, d]).unwrap();
    let mask = mask_from_pooled(c, &qt, &kt, grid, algo, &scratch).unwrap();
    let map = c.download_f32(scratch.map()).unwrap();
    (mask.to_dense(c).unwrap(), map, mask)
}

/// Nb far above a warp's 32 lanes (4277 blocks, ~134 keys per lane, > 48 KiB of shared memory
/// per block): a sample of rows against the reference.
#[test]
fn mask_from_pooled_large_nb() {
    let c = device!();
    let mut rng = Rng::fresh(106);
    let grid = BlockGrid::new(7, 13, 47).unwrap();
    let nb = grid.blocks();
    let d = 16;
    let qa = rng.normals(nb * d, 0.8);
    let ka = rng.normals(nb * d, 0.8);
    let algo: SparseAlgo = "nabla-0.5_sta-3-3-3".parse().unwrap();
    let (dense, map, _) = from_pooled(c, &qa, &ka, 1, grid, d, &algo);
    let sta = reference::sta_mask(&grid, &algo.sta().unwrap());
    for r in (0..nb).step_by(97) {
        let row = &map[r * nb..(r + 1) * nb];
        let logits: Vec<f64> = (0..nb)
            .map(|j| {
                (0..d)
                    .map(|x| qa[r * d + x] as f64 * ka[j * d + x] as f64)
                    .sum::<f64>()
                    / (d as f64).sqrt()
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
        let want: Vec<f32> = logits.iter().map(|l| ((l - m).exp() / z) as f32).collect();
        assert_close(&format!("large map row {r}"), row, &want, 1e-6, 1e-3, 1e-4);
        let (keep, mass) = reference::threshold_mask_ties(row, 1, nb, 0.5);
        for j in 0..nb {
            if sta[r * nb + j] == 1 {
                assert_eq!(dense[r * nb + j], 1, "row {r} col {j}: STA");
            } else if (mass[j] - 0.5).abs() >= 1e-5 {
                assert_eq!(dense[r * nb + j], keep[j], "row {r} col {j}");
            }
        }
    }
}

/// Many exactly equal probabilities: tied entries are kept or dropped together.
#[test]
fn mask_ties_kept_together() {
    let c = device!();
    let grid = BlockGrid::new(1, 4, 5).unwrap();
    let nb = grid.blocks();
    let d = 16;
    let mut rng = Rng::fresh(107);
    let qa: Vec<f32> = (0..nb)
        .flat_map(|_| (0..d).map(|c| (c % 3) as f32 * 0.25))
        .collect();
    let base: Vec<f32> = rng.normals(d, 1.0);
    let ka: Vec<f32> = (0..nb)
        .flat_map(|j| {
            let shift = if j % 2 == 0 {
                0.0
            } else {
                (j % 5) as f32 * 0.3
            };
            base.iter().map(move |&x| x + shift).collect::<Vec<_>>()
        })
        .collect();
    for thr in [0.0, 0.3, 0.5, 0.8, 1.0] {
        let algo = SparseAlgo::Nabla { thr };
        let (dense, map, _) = from_pooled(c, &qa, &ka, 1, grid, d, &algo);
        check_mask_against_reference(
            &format!("ties thr {thr}"),
            &dense,
            &map,
            nb,
            nb,
            &algo,
            &grid,
        );
    }
}

/// Every logit equal (one big tie) and flat rows (many candidates in the cut's binade).
#[test]
fn mask_flat_rows() {
    let c = device!();
    let grid = BlockGrid::new(1, 10, 20).unwrap();
    let nb = grid.blocks();
    let d = 16;
    let zeros = vec![0f32; nb * d];
    for thr in [0.0, 0.5, 1.0] {
        let algo = SparseAlgo::Nabla { thr };
        let (dense, map, _) = from_pooled(c, &zeros, &zeros, 1, grid, d, &algo);
        check_mask_against_reference(
            &format!("uniform thr {thr}"),
            &dense,
            &map,
            nb,
            nb,
            &algo,
            &grid,
        );
        assert!(
            dense.iter().all(|&x| x == 1),
            "uniform rows keep everything"
        );
    }
    let mut rng = Rng::fresh(108);
    let qa = rng.normals(nb * d, 0.05);
    let ka = rng.normals(nb * d, 0.05);
    for thr in [0.0, 0.5, 0.9] {
        let algo = SparseAlgo::Nabla { thr };
        let (dense, map, _) = from_pooled(c, &qa, &ka, 1, grid, d, &algo);
        check_mask_against_reference(
            &format!("flat thr {thr}"),
            &dense,
            &map,
            nb,
            nb,
            &algo,
            &grid,
        );
    }
}

/// A row whose mass sits in one block keeps exactly that block for thresholds below its mass.
#[test]
fn mask_mass_in_one_block() {
    let c = device!();
    let grid = BlockGrid::new(2, 2, 3).unwrap();
    let nb = grid.blocks();
    let d = 32;
    let mut qa = vec![0f32; nb * d];
    let mut ka = vec![0f32; nb * d];
    for i in 0..nb {
        qa[i * d + i % d] = 40.0;
        ka[i * d + i % d] = 40.0;
    }
    let (_, _, mask) = from_pooled(c, &qa, &ka, 1, grid, d, &SparseAlgo::Nabla { thr: 0.9 });
    let (counts, idx) = mask.read_lists(c).unwrap();
    for i in 0..nb {
        assert_eq!(counts[i], 1, "row {i}");
        assert_eq!(idx[i * nb], i as u32, "row {i}");
    }
}

/// Pooled values of very different magnitudes (the per-row split scale).
#[test]
fn mask_extreme_magnitudes() {
    let c = device!();
    let grid = BlockGrid::new(1, 2, 3).unwrap();
    let nb = grid.blocks();
    let d = 32;
    let mut rng = Rng::fresh(109);
    let qa = rng.normals(nb * d, 1e-6);
    let ka = rng.normals(nb * d, 1e5);
    let algo = SparseAlgo::Nabla { thr: 0.5 };
    let (dense, map, _) = from_pooled(c, &qa, &ka, 1, grid, d, &algo);
    let map_ref = reference::block_map(&qa, &ka, 1, nb, d);
    assert_close("extreme map", &map, &map_ref, 1e-6, 1e-4, 1e-5);
    check_mask_against_reference("extreme", &dense, &map, nb, nb, &algo, &grid);
}

/// One scratch, two grids with the same Nb: the cached STA bitmask follows the grid.
#[test]
fn mask_scratch_reuse_across_grids() {
    let c = device!();
    let mut rng = Rng::fresh(110);
    let d = 64;
    let g1 = BlockGrid::new(3, 2, 5).unwrap();
    let g2 = BlockGrid::new(5, 3, 2).unwrap();
    let nb = g1.blocks();
    let scratch = MaskScratch::alloc(c, 2, nb, d).unwrap();
    for (grid, a) in [
        (g1, "nabla-0.3_sta-3-3-3"),
        (g2, "nabla-0.3_sta-3-3-3"),
        (g2, "nabla-0.3_sta-1-1-5"),
        (g1, "sta-3-1-1"),
        (g2, "sta-3-1-1"),
    ] {
        let (q, k) = structured_qk(&mut rng, grid, 2, d);
        let shape = [1, 2, grid.tokens(), d];
        let (qt, kt) = (
            upload(c, &q, &shape, DType::F16),
            upload(c, &k, &shape, DType::F16),
        );
        let algo: SparseAlgo = a.parse().unwrap();
        let mask = estimate_mask_with_map(c, &qt, &kt, grid, &algo, &scratch).unwrap();
        let dense = mask.to_dense(c).unwrap();
        if algo.threshold().is_none() {
            assert_eq!(
                dense,
                reference::sta_mask(&grid, &algo.sta().unwrap()),
                "{a} {grid:?}"
            );
        } else {
            let map = c.download_f32(scratch.map()).unwrap();
            check_mask_against_reference(
                &format!("{a} {grid:?}"),
                &dense,
                &map,
                2 * nb,
                nb,
                &algo,
                &grid,
            );
        }
    }
}

/// `estimate_mask` returns views of the scratch's lists: the same buffers on every call, valid
/// until the next call; repeated calls give the same lists; unrelated algorithms in between
/// overwrite them and a later call restores them.
#[test]
fn mask_lists_live_in_the_scratch() {
    let c = device!();
    let mut rng = Rng::fresh(111);
    let (grid, h, d) = (BlockGrid::new(2, 3, 5).unwrap(), 2, 64);
    let (q, k) = structured_qk(&mut rng, grid, h, d);
    let shape = [1, h, grid.tokens(), d];
    let (qt, kt) = (
        upload(c, &q, &shape, DType::F16),
        upload(c, &k, &shape, DType::F16),
    );
    let scratch = MaskScratch::alloc(c, h, grid.blocks(), d).unwrap();
    let a7: SparseAlgo = "nabla-0.7".parse().unwrap();
    let a2: SparseAlgo = "nabla-0.2_sta-1-1-1".parse().unwrap();
    let m1 = estimate_mask(c, &qt, &kt, grid, &a7, &scratch).unwrap();
    let r1 = m1.read_rows(c).unwrap();
    let m2 = estimate_mask(c, &qt, &kt, grid, &a2, &scratch).unwrap();
    assert_eq!(m1.counts.ptr(), m2.counts.ptr(), "no allocation per call");
    assert_eq!(m1.indices.ptr(), m2.indices.ptr(), "no allocation per call");
    let r2 = m2.read_rows(c).unwrap();
    assert_ne!(r1, r2, "different thresholds, same lists?");
    let m3 = estimate_mask(c, &qt, &kt, grid, &a7, &scratch).unwrap();
    assert_eq!(m3.read_rows(c).unwrap(), r1, "repeatable");
    // the map path writes the same lists as the fast path
    let m4 = estimate_mask_with_map(c, &qt, &kt, grid, &a2, &scratch).unwrap();
    assert_eq!(m4.read_rows(c).unwrap(), r2, "map path");
    let m5 = estimate_mask(c, &qt, &kt, grid, &a2, &scratch).unwrap();
    assert_eq!(m5.read_rows(c).unwrap(), r2, "fast path after the map path");
}

#[test]
fn sta_mask_matches_reference() {
    let c = device!();
    for (grid, w) in [
        (
            BlockGrid::new(21, 5, 10).unwrap(),
            StaWindow { t: 11, h: 3, w: 3 },
        ),
        (
            BlockGrid::new(3, 2, 5).unwrap(),
            StaWindow { t: 2, h: 1, w: 4 },
        ),
        (
            BlockGrid::new(1, 1, 1).unwrap(),
            StaWindow { t: 1, h: 1, w: 1 },
        ),
    ] {
        let m = sta_mask(c, grid, w).unwrap();
        assert_eq!(m.heads, 1);
        assert_eq!(
            m.to_dense(c).unwrap(),
            reference::sta_mask(&grid, &w),
            "{grid:?} {w:?}"
        );
    }
}

/// Pooling alone, with a ragged last block (S not a multiple of 64): the mean of its rows.
#[test]
fn pool_ragged_last_block() {
    let c = device!();
    let mut rng = Rng::fresh(111);
    for (dt, s, d) in [
        (DType::F16, 100, 64),
        (DType::BF16, 64 * 3 + 1, 128),
        (DType::F32, 130, 16),
    ] {
        let h = 2;
        let x = round_to(&rng.normals(h * s * d, 1.0), dt);
        let xt = upload(c, &x, &[1, h, s, d], dt);
        let nb = s.div_ceil(64);
        let out = poisoned(c, &[h, nb, d], DType::F32);
        pool(c, &xt, &out).unwrap();
        let mut want = vec![0f32; h * nb * d];
        for hh in 0..h {
            for b in 0..nb {
                let rows = (s - b * 64).min(64);
                for ch in 0..d {
                    let sum: f64 = (0..rows)
                        .map(|u| x[(hh * s + b * 64 + u) * d + ch] as f64)
                        .sum();
                    want[(hh * nb + b) * d + ch] = (sum / rows as f64) as f32;
                }
            }
        }
        assert_close(
            &format!("pool {dt:?} s{s} d{d}"),
            &c.download_f32(&out).unwrap(),
            &want,
            1e-5,
            1e-5,
            1e-6,
        );
    }
}

/// The two block-score kernels (64 × 64 and 128 × 128 tiles) give the same logits bit for bit,
/// on shapes with ragged tiles for both (Nb not a multiple of 64 or 128, odd Nb, one block,
/// several tiles per row), and the logits match the f64 products of the pooled rows.
#[test]
fn block_scores_tile_kernels_agree() {
    let c = device!();
    let mut rng = Rng::fresh(0x5c);
    for (grid, heads, d) in [
        (BlockGrid::new(1, 1, 1).unwrap(), 2, 64),
        (BlockGrid::new(3, 5, 9).unwrap(), 2, 128),
        (BlockGrid::new(2, 9, 11).unwrap(), 1, 64),
        (BlockGrid::new(1, 13, 11).unwrap(), 1, 128),
        (BlockGrid::new(2, 19, 21).unwrap(), 1, 128),
    ] {
        let (s, nb) = (grid.tokens(), grid.blocks());
        let what = format!("scores {grid:?} h{heads} d{d}");
        let (q, k) = structured_qk(&mut rng, grid, heads, d);
        let shape = [1, heads, s, d];
        let (qt, kt) = (
            upload(c, &q, &shape, DType::BF16),
            upload(c, &k, &shape, DType::BF16),
        );
        let scratch = MaskScratch::alloc(c, heads, nb, d).unwrap();
        let algo: SparseAlgo = "nabla-0.7".parse().unwrap();
        estimate_mask_with_map(c, &qt, &kt, grid, &algo, &scratch).unwrap();
        let qa = c.download_f32(scratch.qa()).unwrap();
        let ka = c.download_f32(scratch.ka()).unwrap();
        let mut got = Vec::new();
        for kernel in [ScoresKernel::Tile64, ScoresKernel::Tile128] {
            // the map holds the probabilities of the estimation: every logit must be rewritten
            block_logits(c, &scratch, kernel).unwrap();
            got.push(c.download_f32(scratch.map()).unwrap());
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(&got[0]) == bits(&got[1]),
            "{what}: the 64 x 64 and 128 x 128 tile kernels differ"
        );
        let rsd = 1.0 / (d as f64).sqrt();
        let want: Vec<f32> = (0..heads * nb * nb)
            .map(|e| {
                let (h, i, j) = (e / (nb * nb), (e / nb) % nb, e % nb);
                let dot: f64 = (0..d)
                    .map(|t| qa[(h * nb + i) * d + t] as f64 * ka[(h * nb + j) * d + t] as f64)
                    .sum();
                (dot * rsd) as f32
            })
            .collect();
        assert_close(&what, &got[1], &want, 1e-5, 1e-4, 1e-5);
    }
}

/// The DiT's fused producer: RoPE + head split + pooling writes the same heads as the unfused
/// `rope_split_heads` (bit for bit), pools them as the reference pools the stored heads, and the
/// mask estimated from that pooling matches the reference. The scratch first holds another
/// input's pooling, so a row the fused kernel does not write fails.
#[test]
fn rope_pool_fused_with_the_heads() {
    let c = device!();
    let mut rng = Rng::fresh(0x7e);
    for (tok, heads, d, dt) in [
        ((1, 8, 8), 2, 64, DType::F16),
        ((2, 16, 24), 3, 128, DType::BF16),
        ((3, 8, 16), 1, 64, DType::F32),
        ((1, 24, 8), 2, 128, DType::F16),
    ] {
        let grid = BlockGrid::from_tokens(tok.0, tok.1, tok.2).unwrap();
        let (s, nb) = (grid.tokens(), grid.blocks());
        let what = format!("rope+pool {tok:?} h{heads} d{d} {dt:?}");
        let (ct, st) = nabla::cuda::ops::rope_tables(c, tok, d, true).unwrap();
        let scratch = MaskScratch::alloc(c, heads, nb, d).unwrap();
        // stale contents: another input's pooling and mask
        let (q0, k0) = structured_qk(&mut rng, grid, heads, d);
        let shape = [1, heads, s, d];
        let stale = (upload(c, &q0, &shape, dt), upload(c, &k0, &shape, dt));
        let algo: SparseAlgo = "nabla-0.7".parse().unwrap();
        estimate_mask(c, &stale.0, &stale.1, grid, &algo, &scratch).unwrap();

        let xq = rng.normals(s * heads * d, 1.0);
        let xk: Vec<f32> = rng.normals(s * heads * d, 1.0);
        let mut heads_out = Vec::new();
        for (x, side) in [(&xq, QkSide::Q), (&xk, QkSide::K)] {
            let xt = c.upload_f32(x, &[s, heads * d]).unwrap();
            let fused = poisoned(c, &shape, dt);
            rope_split_heads_pooled(c, &xt, &ct, &st, &fused, &scratch, side).unwrap();
            let plain = poisoned(c, &shape, dt);
            nabla::cuda::ops::rope_split_heads(c, &xt, &ct, &st, &plain).unwrap();
            let (f, p) = (
                c.download_f32(&fused).unwrap(),
                c.download_f32(&plain).unwrap(),
            );
            let fb: Vec<u32> = f.iter().map(|v| v.to_bits()).collect();
            let pb: Vec<u32> = p.iter().map(|v| v.to_bits()).collect();
            assert!(
                f.iter().all(|v| v.is_finite()),
                "{what} {side:?}: heads not all written"
            );
            assert!(
                fb == pb,
                "{what} {side:?}: fused heads differ from rope_split_heads"
            );
            heads_out.push(f);
        }
        let qa = c.download_f32(scratch.qa()).unwrap();
        let ka = c.download_f32(scratch.ka()).unwrap();
        assert_close(
            &format!("{what} qa"),
            &qa,
            &reference::pool(&heads_out[0], heads, s, d),
            1e-5,
            1e-5,
            1e-6,
        );
        assert_close(
            &format!("{what} ka"),
            &ka,
            &reference::pool(&heads_out[1], heads, s, d),
            1e-5,
            1e-5,
            1e-6,
        );
        let map = reference::block_map(&qa, &ka, heads, nb, d);
        for a in ["nabla-0.7", "nabla-0.0", "nabla-1.0", "nabla-0.5_sta-3-1-1"] {
            let algo: SparseAlgo = a.parse().unwrap();
            let m = estimate_mask_prepooled(c, grid, &algo, &scratch).unwrap();
            assert_eq!((m.heads, m.nq, m.nkv), (heads, nb, nb));
            let dense = m.to_dense(c).unwrap();
            check_mask_against_reference(
                &format!("{what} {a}"),
                &dense,
                &map,
                heads * nb,
                nb,
                &algo,
                &grid,
            );
        }
        // refused: a scratch of another shape, a grid of another size, a sequence that is not
        // whole blocks
        let xt = c.upload_f32(&xq, &[s, heads * d]).unwrap();
        let out = poisoned(c, &shape, dt);
        let other = MaskScratch::alloc(c, heads + 1, nb, d).unwrap();
        let e = rope_split_heads_pooled(c, &xt, &ct, &st, &out, &other, QkSide::Q).unwrap_err();
        assert!(e.to_string().contains("MaskScratch"), "{what}: {e}");
        let g2 = BlockGrid::new(grid.t + 1, grid.hb, grid.wb).unwrap();
        assert!(estimate_mask_prepooled(c, g2, &algo, &scratch).is_err());
    }
    let (ct, st) = nabla::cuda::ops::rope_tables(c, (1, 10, 10), 64, false).unwrap();
    let x = c.upload_f32(&vec![0.5; 100 * 64], &[100, 64]).unwrap();
    let out = poisoned(c, &[1, 1, 100, 64], DType::F16);
    let scratch = MaskScratch::alloc(c, 1, 2, 64).unwrap();
    let e = rope_split_heads_pooled(c, &x, &ct, &st, &out, &scratch, QkSide::K).unwrap_err();
    assert!(e.to_string().contains("multiple of the 64"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Golden masks
// ---------------------------------------------------------------------------------------------

fn usize_of(v: &Value, what: &str) -> usize {
    v.as_u64()
        .unwrap_or_else(|| panic!("manifest: {what} is not an integer: {v}")) as usize
}

fn sta_window(v: &Value) -> Option<StaWindow> {
    let a = v.as_array()?;
    let w: Vec<u32> = a
        .iter()
        .map(|x| x.as_u64().expect("sta window") as u32)
        .collect();
    Some(StaWindow {
        t: w[0],
        h: w[1],
        w: w[2],
    })
}

#[test]
fn golden_nabla_masks_cuda() {
    let c = device!();
    let cs = cases("nabla_mask");
    assert!(!cs.is_empty(), "manifest has no nabla_mask case");
    for case in cs {
        let name = case["name"].as_str().unwrap();
        let cfg = &case["config"];
        let grid = BlockGrid::new(
            usize_of(&cfg["grid_T"], "grid_T"),
            usize_of(&cfg["grid_Hb"], "grid_Hb"),
            usize_of(&cfg["grid_Wb"], "grid_Wb"),
        )
        .unwrap();
        let (b, h, d) = (
            usize_of(&cfg["batch"], "batch"),
            usize_of(&cfg["heads"], "heads"),
            usize_of(&cfg["head_dim"], "head_dim"),
        );
        let nb = grid.blocks();
        let f = TensorFile::open(golden_dir().join(case["file"].as_str().unwrap())).unwrap();
        let entries = case["tensors"].as_array().expect("tensors").clone();
        let entry = |n: &str| entries.iter().find(|t| t["name"] == n).cloned();
        let has_qk = cfg["full_qk_saved"].as_bool().unwrap_or(false) && entry("q").is_some();
        let (qa_g, _) = f.f32("qa").unwrap();
        let (ka_g, _) = f.f32("ka").unwrap();
        let (map_g, _) = f.f32("map").unwrap();
        let (cvals_g, _) = f.f32("cvals").unwrap();
        let qk = has_qk.then(|| {
            let (q, qs) = f.f32("q").unwrap();
            let (k, ks) = f.f32("k").unwrap();
            assert_eq!(qs, vec![b, h, grid.tokens(), d]);
            (
                c.upload_f32(&q, &qs).unwrap(),
                c.upload_f32(&k, &ks).unwrap(),
            )
        });
        let pooled = (
            c.upload_f32(&qa_g, &[b * h, nb, d]).unwrap(),
            c.upload_f32(&ka_g, &[b * h, nb, d]).unwrap(),
        );
        let scratch = MaskScratch::alloc(c, b * h, nb, d).unwrap();
        let mut checked_map = false;
        for t in &entries {
            let tname = t["name"].as_str().unwrap();
            let params = &t["params"];
            if tname.starts_with("sta_mask") {
                let w = sta_window(&params["sta_window"]).expect("sta_window param");
                let (want, _) = f.u8(tname).unwrap();
                let got = sta_mask(c, grid, w).unwrap().to_dense(c).unwrap();
                assert_eq!(got, want, "{name}/{tname}: STA mask");
                eprintln!("{name}/{tname}: exact");
                continue;
            }
            let Some(thr) = params["threshold"].as_f64() else {
                continue;
            };
            let algo = match sta_window(&params["sta_window"]) {
                Some(window) => SparseAlgo::NablaSta { thr, window },
                None => SparseAlgo::Nabla { thr },
            };
            let mask = match &qk {
                Some((q, k)) => {
                    let m = estimate_mask_with_map(c, q, k, grid, &algo, &scratch).unwrap();
                    if !checked_map {
                        check(
                            &format!("{name}/qa"),
                            &c.download_f32(scratch.qa()).unwrap(),
                            &qa_g,
                            tolerance(&entry("qa").unwrap()),
                        );
                        check(
                            &format!("{name}/ka"),
                            &c.download_f32(scratch.ka()).unwrap(),
                            &ka_g,
                            tolerance(&entry("ka").unwrap()),
                        );
                    }
                    m
                }
                None => mask_from_pooled(c, &pooled.0, &pooled.1, grid, &algo, &scratch).unwrap(),
            };
            if !checked_map {
                check(
                    &format!("{name}/map"),
                    &c.download_f32(scratch.map()).unwrap(),
                    &map_g,
                    tolerance(&entry("map").unwrap()),
                );
                checked_map = true;
            }
            let got = mask.to_dense(c).unwrap();
            let (want, shape) = f.u8(tname).unwrap();
            assert_eq!(shape, vec![b, h, nb, nb]);
            let cut = (1.0 - thr) as f32;
            let sta = algo.sta().map(|w| reference::sta_mask(&grid, &w));
            let mut near = 0;
            for (e, (&gv, &wv)) in got.iter().zip(&want).enumerate() {
                if sta.as_ref().is_some_and(|s| s[e % (nb * nb)] == 1) {
                    assert_eq!(gv, 1, "{name}/{tname}: entry {e} is in the STA window");
                    continue;
                }
                if (cvals_g[e] - cut).abs() < 1e-5 {
                    near += 1;
                    continue;
                }
                assert_eq!(
                    gv,
                    wv,
                    "{name}/{tname}: entry {e} (row {}, col {}), cvals {} vs cut {cut}",
                    e / nb,
                    e % nb,
                    cvals_g[e]
                );
            }
            eprintln!("{name}/{tname}: equal ({near} entries within 1e-5 of the cut tolerated)");
        }
        assert!(checked_map, "{name}: no threshold mask in the case");
    }
}

// ---------------------------------------------------------------------------------------------
// Attention against the CPU reference
// ---------------------------------------------------------------------------------------------

/// Options of the mma.sync kernel: `stages`, query rows per warp, rotated walk. `run_attention`
/// also runs every 16-row case through the wgmma kernels (cp.async loads, TMA loads, the
/// FlashAttention-3 forms) on a compute-capability-9.0 device.
fn o(stages: usize, rows_per_warp: usize, rotate: bool) -> AttentionOptions {
    AttentionOptions {
        kernel: AttnKernel::MmaSync,
        stages,
        rotate,
        rows_per_warp,
    }
}

/// (atol, rtol, relative L2) of the attention output per storage type: 16-bit P and output
/// rounding dominate (bf16 keeps 8 bits).
fn attn_tol(dt: DType) -> (f32, f32, f64) {
    match dt {
        DType::F32 => (2e-5, 1e-4, 1e-5),
        DType::F16 => (5e-3, 5e-3, 2e-3),
        _ => (2e-2, 2e-2, 8e-3),
    }
}

/// One attention case: `[b, h, sq, d]` queries over `skv` keys of dtype `dt`, a random mask of
/// `density` (shared head or one per head; one empty row) or `None` (dense), kernel options
/// `opts`; `boost` scales the last key block so its logits jump far above the earlier ones.
#[allow(clippy::too_many_arguments)]
fn run_attention(
    tag: u64,
    (b, h): (usize, usize),
    sq: usize,
    skv: usize,
    d: usize,
    dt: DType,
    mask: Option<(f64, bool)>,
    opts: AttentionOptions,
    boost: bool,
) {
    let c = device!();
    let mut rng = Rng::fresh(tag);
    let bh = b * h;
    let q = round_to(&rng.normals(bh * sq * d, 1.5), dt);
    let mut k = rng.normals(bh * skv * d, 1.5);
    if boost {
        let start = skv.saturating_sub(64) * d;
        for hh in 0..bh {
            for x in &mut k[hh * skv * d + start..(hh + 1) * skv * d] {
                *x *= 4.0;
            }
        }
    }
    let k = round_to(&k, dt);
    let v = round_to(&rng.normals(bh * skv * d, 1.0), dt);
    let (nq, nk) = (sq.div_ceil(64), skv.div_ceil(64));
    let (dense, mh, cm) = match mask {
        Some((density, shared)) => {
            let mh = if shared { 1 } else { bh };
            let mut dense: Vec<u8> = (0..mh * nq * nk)
                .map(|_| (rng.uniform() < density) as u8)
                .collect();
            if mh * nq > 2 {
                dense[nk..2 * nk].fill(0); // an empty row
            }
            let cm = CudaMask::from_dense(c, &dense, mh, nq, nk).unwrap();
            (dense, mh, Some(cm))
        }
        None => (vec![1u8; nq * nk], 1, None),
    };
    let qt = upload(c, &q, &[b, h, sq, d], dt);
    let kt = upload(c, &k, &[b, h, skv, d], dt);
    let vt = upload(c, &v, &[b, h, skv, d], dt);
    let want = reference::block_sparse_attention(&q, &k, &v, &dense, mh, (bh, sq, skv, d));
    let (atol, rtol, l2) = attn_tol(dt);
    let mut variants = vec![opts];
    if c.compute_capability() == (9, 0) && opts.rows_per_warp == 16 && dt != DType::F32 {
        for kernel in [AttnKernel::Wgmma, AttnKernel::WgmmaTma] {
            variants.push(AttentionOptions { kernel, ..opts });
        }
        // the FlashAttention-3 forms: dense head_dim 128 with both stage counts, else the
        // block-sparse form
        let stage_counts: &[usize] = if mask.is_none() && d == 128 {
            &[2, 3]
        } else {
            &[3]
        };
        for &stages in stage_counts {
            variants.push(AttentionOptions {
                kernel: AttnKernel::WgmmaFa,
                stages,
                ..opts
            });
        }
    }
    for opts in variants {
        let out = poisoned(c, &[b, h, sq, d], dt);
        attention_with(c, &qt, &kt, &vt, cm.as_ref(), &out, opts).unwrap();
        let got = c.download_f32(&out).unwrap();
        assert_close(
            &format!(
                "attention {dt:?} b{b} h{h} sq{sq} skv{skv} d{d} mask {mask:?} {opts:?} \
                 boost={boost}"
            ),
            &got,
            &want,
            atol,
            rtol,
            l2,
        );
    }
}

#[test]
fn attention_f16_d128_sparse() {
    let m = Some((0.5, false));
    run_attention(
        201,
        (1, 2),
        256,
        256,
        128,
        DType::F16,
        m,
        o(2, 16, false),
        false,
    );
    let m = Some((0.5, true));
    run_attention(
        202,
        (1, 2),
        256,
        256,
        128,
        DType::F16,
        m,
        o(3, 16, true),
        false,
    );
    run_attention(
        203,
        (1, 2),
        256,
        256,
        128,
        DType::F16,
        m,
        o(2, 32, true),
        false,
    );
}

#[test]
fn attention_bf16_d128_sparse() {
    let m = Some((0.4, true));
    run_attention(
        204,
        (1, 3),
        320,
        320,
        128,
        DType::BF16,
        m,
        o(2, 16, true),
        false,
    );
    let m = Some((0.6, false));
    run_attention(
        205,
        (1, 2),
        256,
        256,
        128,
        DType::BF16,
        m,
        o(3, 16, false),
        false,
    );
    run_attention(
        206,
        (1, 2),
        256,
        256,
        128,
        DType::BF16,
        m,
        o(2, 32, false),
        false,
    );
}

#[test]
fn attention_d64_both_types() {
    let m = Some((0.7, true));
    run_attention(
        207,
        (1, 2),
        192,
        192,
        64,
        DType::F16,
        m,
        o(3, 16, true),
        false,
    );
    run_attention(
        208,
        (1, 2),
        192,
        192,
        64,
        DType::F16,
        m,
        o(2, 32, false),
        false,
    );
    let m = Some((0.5, false));
    run_attention(
        209,
        (1, 2),
        192,
        192,
        64,
        DType::BF16,
        m,
        o(2, 16, false),
        false,
    );
    run_attention(
        210,
        (1, 2),
        192,
        192,
        64,
        DType::BF16,
        m,
        o(2, 32, true),
        false,
    );
}

#[test]
fn attention_dense_fa_shapes() {
    // attn_fa's edges: odd and even key-pair counts, a ragged last pair, an odd number of
    // 64-row query blocks (the second warpgroup of the last CTA has no rows), several heads
    for (tag, bh, sq, skv, dt) in [
        (230u64, (1usize, 3usize), 320usize, 700usize, DType::F16),
        (231, (2, 1), 192, 256, DType::BF16),
        (232, (1, 1), 64, 1, DType::F16),
        (233, (1, 2), 1000, 129, DType::BF16),
    ] {
        run_attention(tag, bh, sq, skv, 128, dt, None, o(3, 16, true), false);
    }
    run_attention(
        234,
        (1, 1),
        256,
        640,
        128,
        DType::BF16,
        None,
        o(2, 16, false),
        true,
    );
}

#[test]
fn attention_dense_none_mask() {
    run_attention(
        211,
        (1, 2),
        256,
        256,
        128,
        DType::F16,
        None,
        o(2, 16, true),
        false,
    );
    run_attention(
        212,
        (1, 1),
        128,
        512,
        64,
        DType::BF16,
        None,
        o(3, 16, false),
        false,
    );
    run_attention(
        213,
        (1, 2),
        256,
        256,
        128,
        DType::BF16,
        None,
        o(2, 32, true),
        false,
    );
}

#[test]
fn attention_ragged_lengths() {
    for opts in [o(2, 16, true), o(3, 16, false), o(2, 32, true)] {
        run_attention(214, (1, 1), 100, 77, 128, DType::F16, None, opts, false);
        let m = Some((0.6, false));
        run_attention(215, (1, 2), 130, 200, 64, DType::BF16, m, opts, false);
        let m = Some((1.0, true));
        run_attention(216, (1, 2), 70, 40, 128, DType::BF16, m, opts, false);
        run_attention(217, (1, 2), 1, 1, 64, DType::F16, None, opts, false);
        let m = Some((1.0, false));
        run_attention(218, (1, 1), 65, 129, 128, DType::F16, m, opts, false);
    }
}

/// B > 1: mask heads are B·H, attention heads run over (b, h).
#[test]
fn attention_batch_and_per_head_masks() {
    let m = Some((0.5, false));
    run_attention(
        219,
        (2, 3),
        192,
        192,
        64,
        DType::F16,
        m,
        o(2, 16, true),
        false,
    );
    run_attention(
        220,
        (2, 3),
        192,
        192,
        64,
        DType::F16,
        m,
        o(2, 32, true),
        false,
    );
    let m = Some((0.5, true));
    run_attention(
        221,
        (2, 2),
        128,
        128,
        128,
        DType::BF16,
        m,
        o(2, 16, false),
        false,
    );
}

/// A late key block with much larger logits (the lazy rescale path) and long lists.
#[test]
fn attention_rescale_and_long_lists() {
    let m = Some((0.7, false));
    run_attention(
        222,
        (1, 2),
        1024,
        1024,
        128,
        DType::BF16,
        m,
        o(2, 16, true),
        true,
    );
    run_attention(
        223,
        (1, 2),
        1024,
        1024,
        128,
        DType::F16,
        m,
        o(2, 32, false),
        true,
    );
    run_attention(
        224,
        (1, 1),
        64,
        4096,
        128,
        DType::F16,
        None,
        o(3, 16, false),
        true,
    );
    let m = Some((0.9, true));
    run_attention(
        225,
        (1, 1),
        256,
        2048,
        64,
        DType::F16,
        m,
        o(2, 16, true),
        true,
    );
}

#[test]
fn attention_f32_fallback() {
    let m = Some((0.4, false));
    run_attention(
        226,
        (1, 2),
        256,
        256,
        64,
        DType::F32,
        m,
        o(2, 16, false),
        false,
    );
    run_attention(
        227,
        (1, 2),
        100,
        77,
        128,
        DType::F32,
        None,
        o(2, 16, true),
        false,
    );
    let m = Some((0.5, true));
    run_attention(
        228,
        (1, 1),
        130,
        200,
        128,
        DType::F32,
        m,
        o(2, 16, true),
        false,
    );
}

/// The default entry point (options from the environment).
#[test]
fn attention_default_entry_point() {
    let c = device!();
    let mut rng = Rng::fresh(222);
    let (h, s, d) = (2, 128, 128);
    let q = round_to(&rng.normals(h * s * d, 1.0), DType::F16);
    let k = round_to(&rng.normals(h * s * d, 1.0), DType::F16);
    let v = round_to(&rng.normals(h * s * d, 1.0), DType::F16);
    let sh = [1, h, s, d];
    let (qt, kt, vt) = (
        upload(c, &q, &sh, DType::F16),
        upload(c, &k, &sh, DType::F16),
        upload(c, &v, &sh, DType::F16),
    );
    let out = poisoned(c, &sh, DType::F16);
    attention(c, &qt, &kt, &vt, None, &out).unwrap();
    let want = reference::block_sparse_attention(&q, &k, &v, &[1u8; 4], 1, (h, s, s, d));
    let (atol, rtol, l2) = attn_tol(DType::F16);
    assert_close(
        "attention default",
        &c.download_f32(&out).unwrap(),
        &want,
        atol,
        rtol,
        l2,
    );
}

// ---------------------------------------------------------------------------------------------
// Golden attention
// ---------------------------------------------------------------------------------------------

#[test]
fn golden_block_sparse_attention_cuda() {
    let c = device!();
    let cs = cases("block_sparse_attn");
    assert!(!cs.is_empty(), "manifest has no block_sparse_attn case");
    for case in cs {
        let name = case["name"].as_str().unwrap();
        let f = TensorFile::open(golden_dir().join(case["file"].as_str().unwrap())).unwrap();
        let entries = case["tensors"].as_array().expect("tensors").clone();
        let tol = |n: &str| tolerance(entries.iter().find(|t| t["name"] == n).unwrap());
        let (q, shape) = f.f32("q").unwrap();
        let (k, _) = f.f32("k").unwrap();
        let (v, _) = f.f32("v").unwrap();
        let (bm, mshape) = f.u8("block_mask").unwrap();
        let (bh, s, d) = (shape[0] * shape[1], shape[2], shape[3]);
        let nb = s / 64;
        assert_eq!(mshape, vec![shape[0], shape[1], nb, nb]);
        let mask = CudaMask::from_dense(c, &bm, bh, nb, nb).unwrap();
        let (want, _) = f.f32("out").unwrap();
        let (want_d, _) = f.f32("out_dense").unwrap();
        // f32: the golden tolerances
        let (qt, kt, vt) = (
            c.upload_f32(&q, &shape).unwrap(),
            c.upload_f32(&k, &shape).unwrap(),
            c.upload_f32(&v, &shape).unwrap(),
        );
        let out = poisoned(c, &shape, DType::F32);
        attention(c, &qt, &kt, &vt, Some(&mask), &out).unwrap();
        check(
            &format!("{name}/out f32"),
            &c.download_f32(&out).unwrap(),
            &want,
            tol("out"),
        );
        attention(c, &qt, &kt, &vt, None, &out).unwrap();
        check(
            &format!("{name}/out_dense f32"),
            &c.download_f32(&out).unwrap(),
            &want_d,
            tol("out_dense"),
        );
        // tensor cores: the golden inputs rounded to 16 bits, against the f64 reference of
        // exactly those inputs
        for dt in [DType::F16, DType::BF16] {
            let (qr, kr, vr) = (round_to(&q, dt), round_to(&k, dt), round_to(&v, dt));
            let (qt, kt, vt) = (
                upload(c, &qr, &shape, dt),
                upload(c, &kr, &shape, dt),
                upload(c, &vr, &shape, dt),
            );
            let (atol, rtol, l2) = attn_tol(dt);
            for (m, dense) in [(Some(&mask), bm.clone()), (None, vec![1u8; bh * nb * nb])] {
                let out = poisoned(c, &shape, dt);
                attention(c, &qt, &kt, &vt, m, &out).unwrap();
                let want =
                    reference::block_sparse_attention(&qr, &kr, &vr, &dense, bh, (bh, s, s, d));
                assert_close(
                    &format!("{name} {dt:?} sparse={}", m.is_some()),
                    &c.download_f32(&out).unwrap(),
                    &want,
                    atol,
                    rtol,
                    l2,
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors, timing
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_inputs_are_errors() {
    let c = device!();
    let t = |shape: &[usize], dt: DType| poisoned(c, shape, dt);
    let q = t(&[1, 2, 128, 64], DType::F16);
    let out = t(&[1, 2, 128, 64], DType::F16);
    // head dim 96
    let q96 = t(&[1, 2, 128, 96], DType::F16);
    assert!(attention(c, &q96, &q96, &q96, None, &q96).is_err());
    // dtype mismatch
    let kf = t(&[1, 2, 128, 64], DType::BF16);
    assert!(attention(c, &q, &kf, &kf, None, &out).is_err());
    // mask of the wrong size / heads
    let m = CudaMask::full(c, 3, 2).unwrap();
    assert!(attention(c, &q, &q, &q, Some(&m), &out).is_err());
    let m3 = CudaMask::from_dense(c, &[1u8; 12], 3, 2, 2).unwrap();
    assert!(attention(c, &q, &q, &q, Some(&m3), &out).is_err());
    // a hand-made mask with f32 counts
    let mut bad = CudaMask::full(c, 2, 2).unwrap();
    bad.counts = t(&[1, 2], DType::F32);
    assert!(attention(c, &q, &q, &q, Some(&bad), &out).is_err());
    assert!(attention_with(c, &q, &q, &q, None, &out, o(5, 16, true)).is_err());
    assert!(attention_with(c, &q, &q, &q, None, &out, o(3, 32, true)).is_err());
    assert!(attention_with(c, &q, &q, &q, None, &out, o(2, 8, true)).is_err());
    // lists out of range
    assert!(CudaMask::from_lists(c, &[3], &[0, 1], 1, 1, 2).is_err());
    assert!(CudaMask::from_lists(c, &[1], &[7, 0], 1, 1, 2).is_err());
    // masks: scratch of another shape, S not a multiple of 64, grid mismatch, u32 q
    let grid = BlockGrid::new(1, 1, 2).unwrap();
    let scratch = MaskScratch::alloc(c, 2, 2, 64).unwrap();
    let algo: SparseAlgo = "nabla-0.5".parse().unwrap();
    assert!(estimate_mask(c, &q, &q, grid, &algo, &scratch).is_ok());
    let other = MaskScratch::alloc(c, 3, 2, 64).unwrap();
    assert!(estimate_mask(c, &q, &q, grid, &algo, &other).is_err());
    let q100 = t(&[1, 2, 100, 64], DType::F16);
    assert!(estimate_mask(c, &q100, &q100, grid, &algo, &scratch).is_err());
    let g3 = BlockGrid::new(1, 1, 3).unwrap();
    assert!(estimate_mask(c, &q, &q, g3, &algo, &scratch).is_err());
    let qu = t(&[1, 2, 128, 64], DType::U32);
    assert!(estimate_mask(c, &qu, &qu, grid, &algo, &scratch).is_err());
    assert!(MaskScratch::alloc(c, 2, 2, 24).is_err());
    let pooled = t(&[2, 2, 64], DType::F32);
    let sta: SparseAlgo = "sta-3-3-3".parse().unwrap();
    assert!(mask_from_pooled(c, &pooled, &pooled, grid, &sta, &scratch).is_err());
}

#[test]
fn timing_helpers_report_positive_times() {
    let c = device!();
    let mut rng = Rng::fresh(230);
    let grid = BlockGrid::new(2, 2, 4).unwrap();
    let (h, d) = (4, 128);
    let (q, k) = structured_qk(&mut rng, grid, h, d);
    let sh = [1, h, grid.tokens(), d];
    let (qt, kt) = (
        upload(c, &q, &sh, DType::BF16),
        upload(c, &k, &sh, DType::BF16),
    );
    let vt = upload(c, &rng.normals(q.len(), 1.0), &sh, DType::BF16);
    let scratch = MaskScratch::alloc(c, h, grid.blocks(), d).unwrap();
    let algo: SparseAlgo = "nabla-0.7_sta-3-1-1".parse().unwrap();
    let stages = time_mask_stages(c, &qt, &kt, grid, &algo, &scratch, 3).unwrap();
    assert!(
        stages.iter().all(|t| t.is_finite() && *t > 0.0),
        "{stages:?}"
    );
    let mask = estimate_mask(c, &qt, &kt, grid, &algo, &scratch).unwrap();
    let out = poisoned(c, &sh, DType::BF16);
    for (stages, rows) in [(2, 16), (3, 16), (2, 32)] {
        for rotate in [false, true] {
            let opts = o(stages, rows, rotate);
            let t = bench_attention(c, &qt, &kt, &vt, Some(&mask), &out, opts, 3).unwrap();
            assert!(
                t.median_ms > 0.0 && t.tflops.is_finite() && t.density > 0.0,
                "{t:?}"
            );
            eprintln!("bench {opts:?}: {t:?}");
        }
    }
    assert!(mask.density(c).unwrap() > 0.0);
}

/// The kernel choice needs no GPU: `Auto` is wgmma (the FA3 form for dense, TMA loads) exactly
/// on compute capability 9.0, and asking for a wgmma kernel elsewhere is an error naming the
/// fallback.
#[test]
fn attention_kernel_choice_by_architecture() {
    for (cc, want) in [
        ((8, 0), AttnKernel::MmaSync),
        ((8, 9), AttnKernel::MmaSync),
        ((9, 0), AttnKernel::WgmmaFa),
        ((10, 0), AttnKernel::MmaSync),
    ] {
        assert_eq!(AttnKernel::Auto.resolve(cc, "gpu").unwrap(), want, "{cc:?}");
        assert_eq!(
            AttnKernel::MmaSync.resolve(cc, "gpu").unwrap(),
            AttnKernel::MmaSync
        );
    }
    assert_eq!(
        AttnKernel::Wgmma.resolve((9, 0), "H200").unwrap(),
        AttnKernel::Wgmma
    );
    for k in [AttnKernel::Wgmma, AttnKernel::WgmmaTma, AttnKernel::WgmmaFa] {
        let e = k.resolve((8, 6), "RTX 3090").unwrap_err().to_string();
        assert!(
            e.contains("RTX 3090") && e.contains("8.6") && e.contains("NABLA_CUDA_ATTN_KERNEL=mma"),
            "{e}"
        );
    }
    assert_eq!(
        AttnKernel::WgmmaTma.resolve((9, 0), "H200").unwrap(),
        AttnKernel::WgmmaTma
    );
}
