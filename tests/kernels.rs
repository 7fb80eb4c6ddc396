//! GPU kernels against the CPU reference on fresh random inputs, outputs poisoned first.

mod common;

use common::{POISON, Rng, assert_close, check_mask_against_reference, gpu, structured_qk};
use nabla::nabla::{
    MaskKernels, Reduction, Scores, estimate_mask_with_stages, mask_from_pooled,
    mask_from_pooled_with,
};
use nabla::{BlockGrid, BlockMask, DType, SparseAlgo, reference};

/// Every pair of scores kernel and threshold reduction the adapter can run for rows of `nb`
/// keys and head dim `d`.
fn variants(nb: usize, d: usize) -> Vec<MaskKernels> {
    let c = gpu().caps();
    let mut reductions = vec![Reduction::Workgroup];
    if c.subgroups {
        reductions.push(Reduction::Subgroup);
        if c.subgroup_min == c.subgroup_max && nb <= 64 * c.subgroup_min as usize {
            reductions.push(Reduction::RowPerSubgroup);
        }
    } else {
        eprintln!("no subgroups: only the workgroup reduction is tested");
    }
    let mut scores = vec![Scores::Portable];
    if Scores::tensor_cores_run(gpu(), d) {
        scores.push(Scores::TensorCore);
    } else {
        eprintln!("no 16x16 cooperative matrices: only the portable scores kernel is tested");
    }
    scores
        .iter()
        .flat_map(|&s| {
            reductions.iter().map(move |&reduction| MaskKernels {
                scores: s,
                reduction,
            })
        })
        .collect()
}

fn run_mask_case(tag: u64, grid: BlockGrid, heads: usize, d: usize, algos: &[&str], f16: bool) {
    let g = gpu();
    if f16 && !g.caps().f16 {
        eprintln!("no SHADER_F16 on this adapter: f16 case skipped");
        return;
    }
    let mut rng = Rng::fresh(tag);
    let (q, k) = structured_qk(&mut rng, grid, heads, d);
    let s = grid.tokens();
    let nb = grid.blocks();
    let shape = [1, heads, s, d];
    let (qt, kt) = if f16 {
        (
            g.upload_f16(&q, &shape).unwrap(),
            g.upload_f16(&k, &shape).unwrap(),
        )
    } else {
        (
            g.upload_f32(&q, &shape).unwrap(),
            g.upload_f32(&k, &shape).unwrap(),
        )
    };
    // the reference pools what the GPU sees (f16-rounded inputs on the f16 path)
    let round = |x: &Vec<f32>| -> Vec<f32> {
        if f16 {
            x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
        } else {
            x.clone()
        }
    };
    let qa_ref = reference::pool(&round(&q), heads, s, d);
    let ka_ref = reference::pool(&round(&k), heads, s, d);
    for a in algos {
        let algo: SparseAlgo = a.parse().unwrap();
        let (mask, stages) = estimate_mask_with_stages(g, &qt, &kt, grid, &algo).unwrap();
        let dense = mask.to_dense(g).unwrap();
        if let Some(st) = stages {
            let qa = g.read_f32(&st.qa).unwrap();
            let ka = g.read_f32(&st.ka).unwrap();
            assert_close(&format!("{a} qa"), &qa, &qa_ref, 1e-5, 1e-5, 1e-6);
            assert_close(&format!("{a} ka"), &ka, &ka_ref, 1e-5, 1e-5, 1e-6);
            assert_eq!(st.probs.shape()[2], nabla::nabla::map_stride(nb));
            let map = st.read_map(g).unwrap();
            let map_ref = reference::block_map(&qa, &ka, heads, nb, d);
            assert_close(&format!("{a} map"), &map, &map_ref, 1e-6, 1e-4, 1e-5);
            check_mask_against_reference(a, &dense, &map, heads * nb, nb, &algo, &grid);
        } else {
            let w = algo.sta().unwrap();
            assert_eq!(mask.heads(), 1);
            assert_eq!(dense, reference::sta_mask(&grid, &w), "{a}: STA lists");
        }
    }
}

#[test]
fn mask_one_block() {
    run_mask_case(
        1,
        BlockGrid::new(1, 1, 1).unwrap(),
        2,
        64,
        &["nabla-0.0", "nabla-0.5", "nabla-1.0", "sta-1-1-1"],
        false,
    );
}

#[test]
fn mask_odd_grid_d128_all_thresholds() {
    run_mask_case(
        2,
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
        false,
    );
}

#[test]
fn mask_d64_f16_storage() {
    run_mask_case(
        3,
        BlockGrid::new(2, 3, 3).unwrap(),
        2,
        64,
        &["nabla-0.7", "nabla-0.4_sta-3-3-3"],
        true,
    );
}

/// Two 128-block tiles of the portable scores kernel and three 64-block tiles of the
/// tensor-core one (the last ragged: stored through its scratch, the others straight into the
/// padded map), over several 16-wide k-steps: head_dim 128 in f32 and 64 in f16 storage.
#[test]
fn mask_two_score_tiles() {
    let grid = BlockGrid::new(2, 9, 9).unwrap(); // 162 blocks
    run_mask_case(
        6,
        grid,
        2,
        128,
        &["nabla-0.7", "nabla-0.2_sta-1-3-3"],
        false,
    );
    run_mask_case(7, grid, 2, 64, &["nabla-0.5"], true);
}

/// Nb well above the workgroup size and not a power of two: exercises every loop stride.
#[test]
fn mask_from_pooled_large_nb() {
    let g = gpu();
    let mut rng = Rng::fresh(4);
    let grid = BlockGrid::new(7, 13, 47).unwrap(); // 4277 blocks
    let nb = grid.blocks();
    let (bh, d) = (1, 16);
    let qa = rng.normals(bh * nb * d, 0.8);
    let ka = rng.normals(bh * nb * d, 0.8);
    let qt = g.upload_f32(&qa, &[bh, nb, d]).unwrap();
    let kt = g.upload_f32(&ka, &[bh, nb, d]).unwrap();
    let algo: SparseAlgo = "nabla-0.5_sta-3-3-3".parse().unwrap();
    for red in variants(nb, d) {
        let (mask, probs) = mask_from_pooled_with(g, &qt, &kt, grid, &algo, red).unwrap();
        let map = g.read_f32(&probs).unwrap();
        let map_ref = reference::block_map(&qa, &ka, bh, nb, d);
        assert_close("large map", &map, &map_ref, 1e-6, 1e-3, 1e-4);
        let dense = mask.to_dense(g).unwrap();
        // a sample of rows against the reference (the full f64 check is O(Nb^3))
        for r in (0..nb).step_by(97) {
            let row = &map[r * nb..(r + 1) * nb];
            let (keep, mass) = reference::threshold_mask_ties(row, 1, nb, 0.5);
            let sta = reference::sta_mask(&grid, &algo.sta().unwrap());
            for j in 0..nb {
                if sta[r * nb + j] == 1 {
                    assert_eq!(dense[r * nb + j], 1);
                } else if (mass[j] - 0.5).abs() >= 1e-5 {
                    assert_eq!(dense[r * nb + j], keep[j], "row {r} col {j}");
                }
            }
        }
    }
}

/// The STA union through every reduction, two heads, rows of two and more 32-key words, and
/// rows of more than 32 subgroup-wide chunks (the row-per-subgroup kernel keeps a row's STA
/// words in two slots per lane: the second one serves chunks 32 and up), the last one ragged.
#[test]
fn mask_sta_union_every_reduction() {
    let g = gpu();
    let mut rng = Rng::fresh(8);
    let sg = if g.caps().subgroups {
        g.caps().subgroup_max as usize
    } else {
        8
    };
    for (grid, w) in [
        (BlockGrid::new(2, 3, 7).unwrap(), "nabla-0.4_sta-3-3-3"),
        (BlockGrid::new(3, 4, 6).unwrap(), "nabla-0.1_sta-1-3-5"),
        // 32·SG + 8 blocks
        (
            BlockGrid::new(2, 4, 4 * sg + 1).unwrap(),
            "nabla-0.5_sta-3-3-5",
        ),
    ] {
        let nb = grid.blocks();
        let d = 128;
        let qa = rng.normals(2 * nb * d, 0.8);
        let ka = rng.normals(2 * nb * d, 0.8);
        let qt = g.upload_f32(&qa, &[2, nb, d]).unwrap();
        let kt = g.upload_f32(&ka, &[2, nb, d]).unwrap();
        let algo: SparseAlgo = w.parse().unwrap();
        let sta = reference::sta_mask(&grid, &algo.sta().unwrap());
        for red in variants(nb, d) {
            let (mask, probs) = mask_from_pooled_with(g, &qt, &kt, grid, &algo, red).unwrap();
            let map = g.read_f32(&probs).unwrap();
            let dense = mask.to_dense(g).unwrap();
            let (keep, mass) =
                reference::threshold_mask_ties(&map, 2 * nb, nb, algo.threshold().unwrap());
            let cut = algo.cut().unwrap() as f64;
            for (e, &got) in dense.iter().enumerate() {
                let in_sta = sta[e % (nb * nb)] == 1;
                let want = if in_sta { 1 } else { keep[e] };
                assert!(
                    got == want || (mass[e] - cut).abs() < 1e-5,
                    "{w} {red:?} grid {grid:?}: head {} row {} key {}: got {got}, want {want} \
                     (STA {in_sta}, NABLA {})",
                    e / (nb * nb),
                    e / nb % nb,
                    e % nb,
                    keep[e]
                );
            }
        }
    }
}

/// Many exactly equal probabilities: the GPU keeps every entry tied at the cut.
#[test]
fn mask_ties_kept_together() {
    let g = gpu();
    let grid = BlockGrid::new(1, 4, 5).unwrap();
    let nb = grid.blocks();
    let d = 16;
    let mut rng = Rng::fresh(5);
    // qa identical rows, ka: half the blocks identical → equal logits per row
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
    let qt = g.upload_f32(&qa, &[1, nb, d]).unwrap();
    let kt = g.upload_f32(&ka, &[1, nb, d]).unwrap();
    for (thr, red) in [0.0, 0.3, 0.5, 0.8, 1.0]
        .into_iter()
        .flat_map(|t| variants(nb, d).into_iter().map(move |r| (t, r)))
    {
        let algo = SparseAlgo::Nabla { thr };
        let (mask, probs) = mask_from_pooled_with(g, &qt, &kt, grid, &algo, red).unwrap();
        let map = g.read_f32(&probs).unwrap();
        let dense = mask.to_dense(g).unwrap();
        check_mask_against_reference(
            &format!("ties thr {thr}"),
            &dense,
            &map,
            nb,
            nb,
            &algo,
            &grid,
        );
        // tied entries are all kept or all dropped
        for r in 0..nb {
            for a in 0..nb {
                for b in 0..nb {
                    if map[r * nb + a] == map[r * nb + b] {
                        assert_eq!(dense[r * nb + a], dense[r * nb + b], "tie split in row {r}");
                    }
                }
            }
        }
    }
}

/// A row whose mass sits in one block keeps exactly that block for thresholds below its mass.
#[test]
fn mask_mass_in_one_block() {
    let g = gpu();
    let grid = BlockGrid::new(2, 2, 3).unwrap();
    let nb = grid.blocks();
    let d = 32;
    let mut qa = vec![0f32; nb * d];
    let mut ka = vec![0f32; nb * d];
    for i in 0..nb {
        qa[i * d + i % d] = 40.0; // query i points at key block i
        ka[i * d + i % d] = 40.0;
    }
    let qt = g.upload_f32(&qa, &[1, nb, d]).unwrap();
    let kt = g.upload_f32(&ka, &[1, nb, d]).unwrap();
    let (mask, _) = mask_from_pooled(g, &qt, &kt, grid, &SparseAlgo::Nabla { thr: 0.9 }).unwrap();
    let (c, idx) = mask.read_lists(g).unwrap();
    for i in 0..nb {
        assert_eq!(c[i], 1, "row {i}");
        assert_eq!(idx[i * nb], i as u32);
    }
}

fn run_attention(
    tag: u64,
    heads: usize,
    s: usize,
    d: usize,
    f16: bool,
    density: f64,
    shared_mask: bool,
) {
    let g = gpu();
    if f16 && !g.caps().f16 {
        eprintln!("no SHADER_F16: f16 attention skipped");
        return;
    }
    let mut rng = Rng::fresh(tag);
    let nb = s / 64;
    let n = heads * s * d;
    let round = |x: Vec<f32>| -> Vec<f32> {
        if f16 {
            x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
        } else {
            x
        }
    };
    let q = round(rng.normals(n, 1.5));
    let k = round(rng.normals(n, 1.5));
    let v = round(rng.normals(n, 1.0));
    let mh = if shared_mask { 1 } else { heads };
    let mut dense: Vec<u8> = (0..mh * nb * nb)
        .map(|_| (rng.uniform() < density) as u8)
        .collect();
    if mh * nb > 1 {
        // one empty row to check the zero-output rule
        dense[..nb].fill(0);
    }
    let mask = BlockMask::from_dense(g, &dense, mh, nb).unwrap();
    let shape = [1, heads, s, d];
    let up = |x: &[f32]| {
        if f16 {
            g.upload_f16(x, &shape).unwrap()
        } else {
            g.upload_f32(x, &shape).unwrap()
        }
    };
    let (qt, kt, vt) = (up(&q), up(&k), up(&v));
    let out = g
        .empty(&shape, if f16 { DType::F16 } else { DType::F32 })
        .unwrap();
    g.fill_u32(&out, if f16 { 0x7e00_7e00 } else { POISON });
    let mut b = g.batch();
    nabla::attention::record_attention(&mut b, &qt, &kt, &vt, &mask, &out).unwrap();
    b.submit().unwrap();
    let got = g.read_f32(&out).unwrap();
    let want = reference::block_sparse_attention(&q, &k, &v, &dense, mh, (heads, s, s, d));
    let (atol, rtol, l2) = if f16 {
        (5e-3, 5e-3, 2e-3)
    } else {
        (2e-5, 1e-4, 1e-5)
    };
    assert_close(
        &format!("attention h{heads} s{s} d{d} f16={f16} p={density}"),
        &got,
        &want,
        atol,
        rtol,
        l2,
    );
}

#[test]
fn attention_d64_f32() {
    run_attention(10, 2, 256, 64, false, 0.4, false);
}

#[test]
fn attention_d128_f32_shared_mask() {
    run_attention(11, 2, 320, 128, false, 0.5, true);
}

#[test]
fn attention_one_block() {
    run_attention(12, 1, 64, 128, false, 1.0, false);
    run_attention(13, 3, 64, 64, false, 1.0, true);
}

#[test]
fn attention_f16_storage() {
    run_attention(14, 2, 192, 128, true, 0.5, false);
    run_attention(15, 1, 128, 64, true, 0.7, true);
}

#[test]
fn dense_attention_matches_reference() {
    let g = gpu();
    let mut rng = Rng::fresh(16);
    let (h, s, d) = (2, 192, 64);
    let q = rng.normals(h * s * d, 1.0);
    let k = rng.normals(h * s * d, 1.0);
    let v = rng.normals(h * s * d, 1.0);
    let sh = [1, h, s, d];
    let out = nabla::dense_attention(
        g,
        &g.upload_f32(&q, &sh).unwrap(),
        &g.upload_f32(&k, &sh).unwrap(),
        &g.upload_f32(&v, &sh).unwrap(),
    )
    .unwrap();
    let nb = s / 64;
    let want = reference::block_sparse_attention(&q, &k, &v, &vec![1u8; nb * nb], 1, (h, s, s, d));
    assert_close("dense", &g.read_f32(&out).unwrap(), &want, 2e-5, 1e-4, 1e-5);
}

#[test]
fn fractal_roundtrip_matches_reference() {
    let g = gpu();
    let mut rng = Rng::fresh(17);
    for (f, h, w, c) in [
        (2usize, 8usize, 16usize, 3usize),
        (3, 16, 8, 5),
        (1, 8, 8, 1),
    ] {
        let rows = f * h * w;
        let x = rng.normals(rows * c, 1.0);
        let t = g.upload_f32(&x, &[rows, c]).unwrap();
        let fr = nabla::to_fractal(g, &t, (f, h, w)).unwrap();
        let got = g.read_f32(&fr).unwrap();
        let perm = reference::fractal_perm(f, h, w);
        let want: Vec<f32> = perm
            .iter()
            .flat_map(|&n| x[n * c..(n + 1) * c].to_vec())
            .collect();
        assert_eq!(got, want, "to_fractal {f}x{h}x{w}");
        let back = g
            .read_f32(&nabla::from_fractal(g, &fr, (f, h, w)).unwrap())
            .unwrap();
        assert_eq!(back, x, "roundtrip {f}x{h}x{w}");
    }
}

/// Cross-attention shapes: ragged query and key lengths, sq != skv, f32 and f16.
#[test]
fn attention_ragged_rectangular() {
    let g = gpu();
    let mut rng = Rng::fresh(18);
    for (h, sq, skv, d, f16) in [
        (2usize, 100usize, 16usize, 128usize, false),
        (1, 64, 512, 64, false),
        (3, 130, 77, 64, false),
        (1, 1, 1, 128, false),
        (2, 70, 40, 128, true),
    ] {
        if f16 && !g.caps().f16 {
            continue;
        }
        let round = |x: Vec<f32>| -> Vec<f32> {
            if f16 {
                x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
            } else {
                x
            }
        };
        let q = round(rng.normals(h * sq * d, 1.2));
        let k = round(rng.normals(h * skv * d, 1.2));
        let v = round(rng.normals(h * skv * d, 1.0));
        let up = |x: &[f32], s: usize| {
            let sh = [1, h, s, d];
            if f16 {
                g.upload_f16(x, &sh).unwrap()
            } else {
                g.upload_f32(x, &sh).unwrap()
            }
        };
        let (qt, kt, vt) = (up(&q, sq), up(&k, skv), up(&v, skv));
        let out = g.empty(&[1, h, sq, d], qt.dtype()).unwrap();
        g.fill_u32(&out, if f16 { 0x7e00_7e00 } else { POISON });
        let mut b = g.batch();
        nabla::attention::record_dense_attention(&mut b, &qt, &kt, &vt, &out).unwrap();
        b.submit().unwrap();
        let (nq, nk) = (sq.div_ceil(64), skv.div_ceil(64));
        let want =
            reference::block_sparse_attention(&q, &k, &v, &vec![1u8; nq * nk], 1, (h, sq, skv, d));
        let (atol, rtol, l2) = if f16 {
            (5e-3, 5e-3, 2e-3)
        } else {
            (2e-5, 1e-4, 1e-5)
        };
        assert_close(
            &format!("ragged h{h} sq{sq} skv{skv} d{d} f16={f16}"),
            &g.read_f32(&out).unwrap(),
            &want,
            atol,
            rtol,
            l2,
        );
    }
}

/// The tensor-core kernel against the f64 reference: head dims 64/128, ragged lengths, shared
/// and per-head masks, empty rows, long lists, and a later key block with much larger logits
/// (forces the lazy O rescale). Runs where the adapter has 16×16 f16 cooperative matrices (a
/// real GPU); on the software driver it reports why it is skipped. Where the adapter has 16-bit
/// integers (K and V words split into f16 by bitcasts), again on a second device opened
/// without them (the `unpack2x16float` form other GPUs run).
#[test]
fn attention_coop_matches_reference() {
    let g = gpu();
    if let Some(why) = nabla::attention::coop_unavailable(g, DType::F16, 128) {
        eprintln!("cooperative attention not available here ({why}): skipped");
        return;
    }
    coop_attention_cases(g, nabla::attention::Kernel::Coop);
    if g.caps().int16 {
        let g2 = nabla::Gpu::new_without(wgpu::Features::SHADER_I16).unwrap();
        assert!(!g2.caps().int16);
        coop_attention_cases(&g2, nabla::attention::Kernel::Coop);
    }
}

/// The same cases for the tensor-core kernel with the softmax in registers, where it can run
/// (SPIR-V passthrough, subgroups of 32, a recognised element order: a real GPU).
#[test]
fn attention_coop_regs_matches_reference() {
    let g = gpu();
    match nabla::attention::coop_regs_unavailable(g, DType::F16, 128) {
        Some(why) => eprintln!("register-softmax attention not available here ({why}): skipped"),
        None => coop_attention_cases(g, nabla::attention::Kernel::CoopRegs),
    }
}

/// q, k and v as row ranges of one buffer: the register-softmax kernel (k and v bound
/// read-write) must not run on them; the choice falls back and the result stays right.
#[test]
fn attention_on_one_packed_buffer() {
    use nabla::attention::{Kernel, record_attention_with};
    let g = gpu();
    if nabla::attention::coop_unavailable(g, DType::F16, 64).is_some() {
        eprintln!("cooperative attention not available here: skipped");
        return;
    }
    let (h, s, d) = (2usize, 128usize, 64usize);
    let mut rng = Rng::fresh(23);
    let round =
        |x: Vec<f32>| -> Vec<f32> { x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect() };
    let qkv = round(rng.normals(3 * h * s * d, 1.0));
    let packed = g.upload_f16(&qkv, &[3, h, s, d]).unwrap();
    let part = |i: usize| packed.rows(i, 1).unwrap();
    let (qt, kt, vt) = (part(0), part(1), part(2));
    let dense = vec![1u8; 2 * 2];
    let mask = BlockMask::from_dense_rect(g, &dense, 1, 2, 2).unwrap();
    for kernel in [Kernel::Auto, Kernel::CoopRegs] {
        let out = g.empty(&[1, h, s, d], DType::F16).unwrap();
        g.fill_u32(&out, 0x7e00_7e00);
        let mut b = g.batch();
        record_attention_with(&mut b, &qt, &kt, &vt, &mask, &out, kernel).unwrap();
        b.submit().unwrap();
        g.check().unwrap();
        let n = h * s * d;
        let want = reference::block_sparse_attention(
            &qkv[..n],
            &qkv[n..2 * n],
            &qkv[2 * n..],
            &dense,
            1,
            (h, s, s, d),
        );
        assert_close(
            &format!("{kernel:?} on one packed buffer"),
            &g.read_f32(&out).unwrap(),
            &want,
            5e-3,
            5e-3,
            2e-3,
        );
    }
}

fn coop_attention_cases(g: &nabla::Gpu, kernel: nabla::attention::Kernel) {
    use nabla::attention::record_attention_with;
    let mut rng = Rng::fresh(19);
    for (h, sq, skv, d, density, shared, boost) in [
        (2usize, 256usize, 256usize, 128usize, 0.5f64, false, false),
        (3, 320, 320, 64, 0.4, true, false),
        (1, 100, 77, 128, 1.0, true, false),
        (2, 1024, 1024, 128, 0.7, false, true),
        (1, 64, 512, 64, 1.0, true, true),
    ] {
        let round = |x: Vec<f32>| -> Vec<f32> {
            x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
        };
        let q = round(rng.normals(h * sq * d, 1.5));
        let mut k = rng.normals(h * skv * d, 1.5);
        if boost {
            // keys of the last block align with every query: logits jump by far more than the
            // lazy-rescale threshold (2^15 in base 2)
            let start = (skv.saturating_sub(64)) * d;
            for hh in 0..h {
                for i in start..skv * d {
                    k[hh * skv * d + i] *= 4.0;
                }
            }
        }
        let k = round(k);
        let v = round(rng.normals(h * skv * d, 1.0));
        let (nq, nk) = (sq.div_ceil(64), skv.div_ceil(64));
        let mh = if shared { 1 } else { h };
        let mut dense: Vec<u8> = (0..mh * nq * nk)
            .map(|_| (rng.uniform() < density) as u8)
            .collect();
        if mh * nq > 2 {
            dense[nk..2 * nk].fill(0); // an empty row
        }
        let mask = BlockMask::from_dense_rect(g, &dense, mh, nq, nk).unwrap();
        let up = |x: &[f32], s: usize| g.upload_f16(x, &[1, h, s, d]).unwrap();
        let (qt, kt, vt) = (up(&q, sq), up(&k, skv), up(&v, skv));
        let out = g.empty(&[1, h, sq, d], DType::F16).unwrap();
        g.fill_u32(&out, 0x7e00_7e00);
        let mut b = g.batch();
        record_attention_with(&mut b, &qt, &kt, &vt, &mask, &out, kernel).unwrap();
        b.submit().unwrap();
        let want = reference::block_sparse_attention(&q, &k, &v, &dense, mh, (h, sq, skv, d));
        assert_close(
            &format!(
                "{kernel:?} h{h} sq{sq} skv{skv} d{d} p{density} boost={boost} i16={}",
                g.caps().int16
            ),
            &g.read_f32(&out).unwrap(),
            &want,
            5e-3,
            5e-3,
            2e-3,
        );
    }
}

/// x `[S, H·D]` (token-major, as the DiT's projections write it): a smooth field over the
/// blocks plus noise, so the block means and the masks carry structure.
fn tokens_field(rng: &mut Rng, s: usize, heads: usize, d: usize, shift: usize) -> Vec<f32> {
    let nb = s / 64;
    let centers = rng.normals(nb * heads * d, 1.0);
    let mut x = vec![0f32; s * heads * d];
    for t in 0..s {
        let b = (t / 64 + shift) % nb;
        for h in 0..heads {
            let sharp = 0.5 + 1.5 * h as f32;
            for c in 0..d {
                x[(t * heads + h) * d + c] =
                    centers[(b * heads + h) * d + c] * sharp + rng.normal() * 0.7;
            }
        }
    }
    x
}

/// The wgpu layer's fused RoPE + head split + pooling (`Backend::rope_split_heads_pooled`) and
/// the mask from its pooled rows (`Backend::estimate_mask_prepooled`) on random x with the real
/// fractal RoPE tables of a token grid: the heads bit-identical to `rope_split_heads`, the pooled
/// rows the block means of the f32 rotations (f16 heads: before their rounding), the masks the
/// reference rule on them.
fn run_rope_pool_case(
    tag: u64,
    tok: (usize, usize, usize),
    heads: usize,
    d: usize,
    f16: bool,
    algos: &[&str],
) {
    use nabla::wan::{Backend, WgpuBackend};
    let g = gpu();
    if f16 && !g.caps().f16 {
        eprintln!("no SHADER_F16: f16 RoPE + pooling case skipped");
        return;
    }
    let what = format!("rope+pool {tok:?} h{heads} d{d} f16={f16}");
    let mut rng = Rng::fresh(tag);
    let grid = BlockGrid::from_tokens(tok.0, tok.1, tok.2).unwrap();
    let (s, nb) = (grid.tokens(), grid.blocks());
    let dt = if f16 { DType::F16 } else { DType::F32 };
    let poison = if f16 { 0x7e00_7e00 } else { POISON };
    let (cos, sin) = nabla::ops::rope::rope_tables(tok, d, true);
    let (ct, st) = (
        g.upload_f32(&cos, &[s, d / 2]).unwrap(),
        g.upload_f32(&sin, &[s, d / 2]).unwrap(),
    );
    let xq = tokens_field(&mut rng, s, heads, d, 0);
    let xk = tokens_field(&mut rng, s, heads, d, 1);
    let mut be = WgpuBackend::new(g);
    let mut scratch = be.mask_scratch(heads, grid, d).unwrap();
    scratch.keep_probs(true);
    let stg = scratch.stages();
    for t in [&stg.qa, &stg.ka, &stg.probs] {
        g.fill_u32(t, POISON);
    }
    let heads_shape = [1, heads, s, d];
    let mut rotations = Vec::new();
    for (x, side) in [
        (&xq, nabla::nabla::QkSide::Q),
        (&xk, nabla::nabla::QkSide::K),
    ] {
        // the unfused path: RoPE in place, then the head split
        let xr = g.upload_f32(x, &[s, heads * d]).unwrap();
        let want = g.empty(&heads_shape, dt).unwrap();
        g.fill_u32(&want, poison);
        be.rope_split_heads(&xr, &ct, &st, heads, &want).unwrap();
        // the fused kernel
        let xf = g.upload_f32(x, &[s, heads * d]).unwrap();
        let got = g.empty(&heads_shape, dt).unwrap();
        g.fill_u32(&got, poison);
        let pooled = be
            .rope_split_heads_pooled(&xf, &ct, &st, heads, &got, &scratch, side)
            .unwrap();
        assert!(pooled, "{what}: the wgpu layer pools");
        be.flush().unwrap();
        let (gb, wb) = (g.read_bytes(&got).unwrap(), g.read_bytes(&want).unwrap());
        let vals = g.read_f32(&got).unwrap();
        assert!(
            vals.iter().all(|v| v.is_finite()),
            "{what} {side:?}: unwritten (NaN) heads"
        );
        let diff = gb.iter().zip(&wb).filter(|(a, b)| a != b).count();
        assert_eq!(
            diff, 0,
            "{what} {side:?}: {diff} bytes differ from rope_split_heads"
        );
        assert_eq!(
            g.read_f32(&xf).unwrap(),
            *x,
            "{what}: x must stay untouched"
        );
        // the pooled rows are means of the f32 rotations (before an f16 head's rounding)
        // (a fresh x: the unfused path rotates x in place)
        let x32 = g.upload_f32(x, &[s, heads * d]).unwrap();
        let rot = g.empty(&heads_shape, DType::F32).unwrap();
        g.fill_u32(&rot, POISON);
        be.rope_split_heads(&x32, &ct, &st, heads, &rot).unwrap();
        be.flush().unwrap();
        rotations.push(g.read_f32(&rot).unwrap());
    }
    let qa = g.read_f32(&stg.qa).unwrap();
    let ka = g.read_f32(&stg.ka).unwrap();
    let qa_ref = reference::pool(&rotations[0], heads, s, d);
    let ka_ref = reference::pool(&rotations[1], heads, s, d);
    assert_close(&format!("{what} qa"), &qa, &qa_ref, 1e-6, 1e-5, 1e-6);
    assert_close(&format!("{what} ka"), &ka, &ka_ref, 1e-6, 1e-5, 1e-6);
    for a in algos {
        let algo: SparseAlgo = a.parse().unwrap();
        g.fill_u32(&stg.probs, POISON);
        let m = be.estimate_mask_prepooled(grid, &algo, &scratch).unwrap();
        let dense = be.mask_dense(&m).unwrap();
        match algo.sta() {
            Some(w) if algo.threshold().is_none() => {
                assert_eq!(
                    dense,
                    reference::sta_mask(&grid, &w),
                    "{what} {a}: STA lists"
                );
            }
            _ => {
                let map = stg.read_map(g).unwrap();
                let map_ref = reference::block_map(&qa, &ka, heads, nb, d);
                assert_close(&format!("{what} {a} map"), &map, &map_ref, 1e-6, 1e-4, 1e-5);
                check_mask_against_reference(a, &dense, &map, heads * nb, nb, &algo, &grid);
            }
        }
    }
    // the pooled rows stay valid for another estimate (the scratch is reused, nothing pooled
    // again): the same algorithm gives the same lists
    if let Some(a) = algos.iter().find(|a| a.starts_with("nabla")) {
        let algo: SparseAlgo = a.parse().unwrap();
        let m1 = be.estimate_mask_prepooled(grid, &algo, &scratch).unwrap();
        let d1 = be.mask_dense(&m1).unwrap();
        let m2 = be.estimate_mask_prepooled(grid, &algo, &scratch).unwrap();
        assert_eq!(d1, be.mask_dense(&m2).unwrap(), "{what} {a}: repeatable");
        // the DiT's form does not write the probabilities back: the same lists
        scratch.keep_probs(false);
        let m3 = be.estimate_mask_prepooled(grid, &algo, &scratch).unwrap();
        assert_eq!(
            d1,
            be.mask_dense(&m3).unwrap(),
            "{what} {a}: without the probabilities"
        );
    }
}

#[test]
fn rope_pool_one_block_d64_f32() {
    run_rope_pool_case(
        40,
        (1, 8, 8),
        2,
        64,
        false,
        &["nabla-0.0", "nabla-0.5", "nabla-1.0", "sta-1-1-1"],
    );
}

#[test]
fn rope_pool_blocks_d128_f32() {
    run_rope_pool_case(
        41,
        (2, 16, 24),
        3,
        128,
        false,
        &[
            "nabla-0.0",
            "nabla-0.7",
            "nabla-1.0",
            "nabla-0.4_sta-1-1-3",
            "sta-1-3-3",
        ],
    );
}

#[test]
fn rope_pool_blocks_d64_f16() {
    run_rope_pool_case(
        42,
        (3, 8, 16),
        2,
        64,
        true,
        &["nabla-0.0", "nabla-0.6", "nabla-1.0", "nabla-0.3_sta-3-1-1"],
    );
}

#[test]
fn rope_pool_one_block_d128_f16() {
    run_rope_pool_case(43, (1, 8, 8), 2, 128, true, &["nabla-0.0", "nabla-1.0"]);
}

/// Bad inputs of the fused RoPE + pooling and of the mask from pooled rows are errors.
#[test]
fn rope_pool_bad_inputs() {
    use nabla::nabla::QkSide;
    use nabla::wan::{Backend, WgpuBackend};
    let g = gpu();
    let (heads, d) = (2, 64);
    let mut be = WgpuBackend::new(g);
    let msg = |e: nabla::Error| e.to_string();
    // S not a multiple of 64: a natural-order grid of 3x5 patches (15 tokens)
    let (cos, sin) = nabla::ops::rope::rope_tables((1, 3, 5), d, false);
    let (ct, st) = (
        g.upload_f32(&cos, &[15, d / 2]).unwrap(),
        g.upload_f32(&sin, &[15, d / 2]).unwrap(),
    );
    let x = g
        .upload_f32(&vec![0.5; 15 * heads * d], &[15, heads * d])
        .unwrap();
    let out = g.empty(&[1, heads, 15, d], DType::F32).unwrap();
    let grid1 = BlockGrid::new(1, 1, 1).unwrap();
    let scratch1 = be.mask_scratch(heads, grid1, d).unwrap();
    let e = be
        .rope_split_heads_pooled(&x, &ct, &st, heads, &out, &scratch1, QkSide::Q)
        .unwrap_err();
    assert!(msg(e).contains("multiple of the 64-token block"), "S = 15");

    // a scratch of another shape: 2 blocks of tokens, a scratch for 1 block, other heads, other D
    let tok = (2, 8, 8);
    let grid2 = BlockGrid::from_tokens(2, 8, 8).unwrap();
    let s = grid2.tokens();
    let (cos, sin) = nabla::ops::rope::rope_tables(tok, d, true);
    let (ct, st) = (
        g.upload_f32(&cos, &[s, d / 2]).unwrap(),
        g.upload_f32(&sin, &[s, d / 2]).unwrap(),
    );
    let x = g
        .upload_f32(&vec![0.5; s * heads * d], &[s, heads * d])
        .unwrap();
    let out = g.empty(&[1, heads, s, d], DType::F32).unwrap();
    let other_heads = be.mask_scratch(heads + 1, grid2, d).unwrap();
    let other_d = be.mask_scratch(heads, grid2, 128).unwrap();
    for (name, sc) in [
        ("fewer blocks", &scratch1),
        ("more heads", &other_heads),
        ("other head_dim", &other_d),
    ] {
        for side in [QkSide::Q, QkSide::K] {
            let e = be
                .rope_split_heads_pooled(&x, &ct, &st, heads, &out, sc, side)
                .unwrap_err();
            assert!(msg(e).contains("scratch"), "{name} {side:?}");
        }
    }
    // heads that disagree with the output, x of another width, tables of another length,
    // x aliasing out, u32 output
    let ok = be.mask_scratch(heads, grid2, d).unwrap();
    assert!(
        be.rope_split_heads_pooled(&x, &ct, &st, heads + 1, &out, &ok, QkSide::Q)
            .is_err()
    );
    let narrow = g.upload_f32(&vec![0.5; s * d], &[s, d]).unwrap();
    assert!(
        be.rope_split_heads_pooled(&narrow, &ct, &st, heads, &out, &ok, QkSide::Q)
            .is_err()
    );
    let short = g.upload_f32(&cos[..64 * d / 2], &[64, d / 2]).unwrap();
    assert!(
        be.rope_split_heads_pooled(&x, &short, &short, heads, &out, &ok, QkSide::Q)
            .is_err()
    );
    let alias = x.reshape(&[1, heads, s, d]).unwrap();
    assert!(
        be.rope_split_heads_pooled(&x, &ct, &st, heads, &alias, &ok, QkSide::Q)
            .is_err()
    );
    let u = g.empty(&[1, heads, s, d], DType::U32).unwrap();
    assert!(
        be.rope_split_heads_pooled(&x, &ct, &st, heads, &u, &ok, QkSide::Q)
            .is_err()
    );
    // the fused path works on the right scratch
    assert!(
        be.rope_split_heads_pooled(&x, &ct, &st, heads, &out, &ok, QkSide::Q)
            .unwrap()
    );
    // the mask from pooled rows of another grid
    let algo: SparseAlgo = "nabla-0.5".parse().unwrap();
    assert!(be.estimate_mask_prepooled(grid1, &algo, &ok).is_err());
    let grid3 = BlockGrid::new(1, 1, 2).unwrap(); // same block count, other grid: fine
    assert!(be.estimate_mask_prepooled(grid3, &algo, &ok).is_ok());
    be.flush().unwrap();
}

/// The fused RoPE + head split without pooling (the wgpu DiT's q/k producer when no mask is
/// estimated) gives the heads of RoPE in place followed by the split, bit for bit, on f32 and
/// f16 heads, S not a multiple of 64 (a ragged last block), head_dim 64 and 128; x stays
/// untouched; the outputs are poisoned first.
#[test]
fn rope_split_fused_matches_rope_then_split() {
    use nabla::ops::{elementwise::record_split_heads, rope};
    let g = gpu();
    let mut rng = Rng::fresh(0x5917);
    for (tok, heads, d, fractal, f16) in [
        ((1usize, 3usize, 5usize), 2usize, 64usize, false, false),
        ((2, 8, 8), 3, 128, true, false),
        ((1, 5, 7), 2, 64, false, true),
        ((3, 8, 16), 1, 128, true, true),
    ] {
        if f16 && !g.caps().f16 {
            eprintln!("no SHADER_F16: f16 case skipped");
            continue;
        }
        let s = tok.0 * tok.1 * tok.2;
        let (cos, sin) = rope::rope_tables(tok, d, fractal);
        let ct = g.upload_f32(&cos, &[s, d / 2]).unwrap();
        let st = g.upload_f32(&sin, &[s, d / 2]).unwrap();
        let x = rng.normals(s * heads * d, 1.0);
        let dt = if f16 { DType::F16 } else { DType::F32 };
        let poison = if f16 { 0x7e00_7e00 } else { POISON };
        // reference path: RoPE in place on a copy, then the split
        let xr = g.upload_f32(&x, &[s, heads * d]).unwrap();
        let want = g.empty(&[1, heads, s, d], dt).unwrap();
        g.fill_u32(&want, poison);
        let mut b = g.batch();
        rope::record_rope(&mut b, &xr, &ct, &st, heads).unwrap();
        record_split_heads(&mut b, &xr, &want).unwrap();
        b.submit().unwrap();
        // fused
        let xf = g.upload_f32(&x, &[s, heads * d]).unwrap();
        let got = g.empty(&[1, heads, s, d], dt).unwrap();
        g.fill_u32(&got, poison);
        let mut b = g.batch();
        nabla::nabla::record_rope_split_heads(&mut b, &xf, &ct, &st, &got).unwrap();
        b.submit().unwrap();
        let what = format!("rope_split {tok:?} h{heads} d{d} {dt:?}");
        // (f16 heads widen exactly to f32: equal bits there mean equal halves)
        let bits = |t: &nabla::Tensor| -> Vec<u32> {
            g.read_f32(t).unwrap().iter().map(|v| v.to_bits()).collect()
        };
        let (gw, ww) = (bits(&got), bits(&want));
        assert_eq!(gw.len(), ww.len(), "{what}");
        let diff = gw.iter().zip(&ww).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{what}: {diff} of {} words differ", gw.len());
        assert_eq!(g.read_f32(&xf).unwrap(), x, "{what}: x was modified");
        // the wgpu DiT layer takes this path
        use nabla::wan::{Backend, WgpuBackend};
        let mut be = WgpuBackend::new(g);
        let viab = g.empty(&[1, heads, s, d], dt).unwrap();
        g.fill_u32(&viab, poison);
        be.rope_split_heads(&xf, &ct, &st, heads, &viab).unwrap();
        be.flush().unwrap();
        assert_eq!(bits(&viab), ww, "{what}: through the backend");
    }
}

/// Bad inputs of the fused RoPE + split without pooling are errors naming what is wrong.
#[test]
fn rope_split_bad_inputs() {
    let g = gpu();
    let (tok, heads, d) = ((1usize, 3usize, 5usize), 2usize, 64usize);
    let s = tok.0 * tok.1 * tok.2;
    let (cos, sin) = nabla::ops::rope::rope_tables(tok, d, false);
    let ct = g.upload_f32(&cos, &[s, d / 2]).unwrap();
    let st = g.upload_f32(&sin, &[s, d / 2]).unwrap();
    let x = g
        .upload_f32(&vec![0.5; s * heads * d], &[s, heads * d])
        .unwrap();
    let run = |x: &nabla::Tensor, c: &nabla::Tensor, sn: &nabla::Tensor, out: &nabla::Tensor| {
        let mut b = g.batch();
        let r = nabla::nabla::record_rope_split_heads(&mut b, x, c, sn, out);
        drop(b);
        r.map(|_| ()).map_err(|e| e.to_string())
    };
    // heads of another width than x
    let out = g.empty(&[1, heads + 1, s, d], DType::F32).unwrap();
    let e = run(&x, &ct, &st, &out).unwrap_err();
    assert!(e.contains("x must be f32 [S, H·D]"), "{e}");
    // tables of another length
    let out = g.empty(&[1, heads, s, d], DType::F32).unwrap();
    let short = g
        .upload_f32(&cos[..(s - 1) * d / 2], &[s - 1, d / 2])
        .unwrap();
    let e = run(&x, &short, &short, &out).unwrap_err();
    assert!(e.contains("do not fit heads"), "{e}");
    // a head_dim that is not a multiple of 4
    let d6 = 6;
    let x6 = g
        .upload_f32(&vec![0.5; s * heads * d6], &[s, heads * d6])
        .unwrap();
    let t6 = g.upload_f32(&vec![1.0; s * d6 / 2], &[s, d6 / 2]).unwrap();
    let o6 = g.empty(&[1, heads, s, d6], DType::F32).unwrap();
    let e = run(&x6, &t6, &t6, &o6).unwrap_err();
    assert!(e.contains("multiple of 4"), "{e}");
    // x and out the same buffer
    let xs = g
        .upload_f32(&vec![0.5; s * heads * d], &[1, heads, s, d])
        .unwrap();
    let xv = xs.reshape(&[s, heads * d]).unwrap();
    let e = run(&xv, &ct, &st, &xs).unwrap_err();
    assert!(e.contains("x") && e.contains("out"), "{e}");
}

/// `Gpu::kernel_statistics` either reports the driver's statistics of a real kernel (every
/// statistic named, at least one) or refuses with `Unsupported` (lavapipe has no
/// VK_KHR_pipeline_executable_properties); a malformed kernel is an error naming it.
#[test]
fn kernel_statistics_report_or_refuse() {
    let g = gpu();
    let kernels: Vec<(String, String)> = nabla::shaders::all_variants()
        .into_iter()
        .filter(|(n, _)| n == "nabla/scores")
        .collect();
    assert_eq!(kernels.len(), 1);
    match g.kernel_statistics(&kernels, false, true) {
        Ok(stats) => {
            assert_eq!(stats.len(), 1);
            assert_eq!(stats[0].kernel, "nabla/scores");
            assert!(!stats[0].stats.is_empty(), "no statistics reported");
            assert!(stats[0].stats.iter().all(|s| !s.name.is_empty()));
            let bad = vec![("broken".to_string(), "fn main( {".to_string())];
            let e = g
                .kernel_statistics(&bad, false, false)
                .unwrap_err()
                .to_string();
            assert!(e.contains("broken"), "{e}");
        }
        Err(e) => {
            assert!(
                matches!(e, nabla::Error::Unsupported { .. }),
                "unexpected error: {e}"
            );
            assert!(
                e.to_string()
                    .contains("VK_KHR_pipeline_executable_properties")
                    || e.to_string().contains("Vulkan"),
                "{e}"
            );
        }
    }
}

/// The occupancy estimate printed next to NVIDIA's register counts, on the session-7
/// measurements (RESULTS.md): the tensor-core attention at 240 registers and the GEMM at 229
/// fit twice, 159 three times, the 256-thread GEMM form at 145 once; warp and workgroup caps.
#[test]
fn nvidia_occupancy_by_registers() {
    use nabla::gpu::nvidia_workgroups_by_registers as wg;
    assert_eq!(wg(240, 128), 2);
    assert_eq!(wg(229, 128), 2);
    assert_eq!(wg(213, 128), 2);
    assert_eq!(wg(168, 128), 3);
    assert_eq!(wg(159, 128), 3);
    assert_eq!(wg(145, 256), 1);
    assert_eq!(wg(128, 128), 4);
    assert_eq!(wg(32, 1024), 2); // 64 warps per SM
    assert_eq!(wg(16, 64), 32); // 32 workgroups per SM
    assert_eq!(wg(255, 0), 0);
}
