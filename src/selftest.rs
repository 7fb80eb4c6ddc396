//! `nabla selftest`: every kernel variant the current adapter offers, against the CPU reference,
//! on fresh random inputs (odd and even sizes), as a table of relative errors. The tensor-core
//! variants are only trustworthy on a GPU once this passes there; CI runs it on the software
//! driver (portable variants) through `tests/selftest.rs`.

use crate::attention::{
    Kernel, coop_pairs_unavailable, coop_regs_unavailable, coop_unavailable, record_attention_with,
    record_dense_attention_with,
};
use crate::error::Result;
use crate::gpu::{DType, Gpu, Tensor};
use crate::nabla::{
    BlockGrid, BlockMask, MaskKernels, Reduction, Scores, SparseAlgo, mask_from_pooled_with,
};
use crate::ops::linear::{
    Activation, LinearKernel, LinearRounding, record_linear_gated_residual_rounded,
    record_linear_rounded,
};
use crate::reference;

/// One checked variant.
#[derive(Clone, Debug)]
pub struct Row {
    /// Kernel family.
    pub kernel: String,
    /// Variant (storage, reduction, tensor cores, ...).
    pub variant: String,
    /// Shape checked.
    pub shape: String,
    /// Relative L2 error against the reference (masks, and linears in the bf16 autocast mode:
    /// fraction of differing entries).
    pub rel_err: f64,
    /// The bound it must stay under.
    pub bound: f64,
    /// `None` when run; `Some(reason)` when the adapter lacks the variant.
    pub skipped: Option<String>,
}

impl Row {
    /// A linear variant the adapter cannot run, and why.
    fn linear_skipped(variant: String, shape: String, bound: f64, why: String) -> Row {
        Row {
            kernel: "linear".into(),
            variant,
            shape,
            rel_err: 0.0,
            bound,
            skipped: Some(why),
        }
    }

    /// Whether the variant ran and met its bound (NaN never passes).
    pub fn passed(&self) -> bool {
        self.skipped.is_some() || self.rel_err <= self.bound
    }
}

struct Rng(u64);

impl Rng {
    fn normal(&mut self) -> f32 {
        let mut u = || {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        let (a, b) = (u().max(1e-300), u());
        ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
    }
    fn normals(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * std).collect()
    }
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().any(|x| !x.is_finite()) {
        return f64::NAN;
    }
    let n: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let d: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (n / d.max(1e-300)).sqrt()
}

fn round(dt: DType, x: &[f32]) -> Vec<f32> {
    match dt {
        DType::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
        DType::BF16 => x
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect(),
        _ => x.to_vec(),
    }
}

fn upload(gpu: &Gpu, dt: DType, x: &[f32], shape: &[usize]) -> Result<Tensor> {
    match dt {
        DType::F16 => gpu.upload_f16(x, shape),
        DType::BF16 => gpu.upload_bf16(x, shape),
        _ => gpu.upload_f32(x, shape),
    }
}

fn attention_rows(gpu: &Gpu, rng: &mut Rng, out: &mut Vec<Row>) -> Result<()> {
    let variants = [
        ("portable f32", DType::F32, Kernel::Portable),
        ("portable f16", DType::F16, Kernel::Portable),
        ("tensor cores f16", DType::F16, Kernel::Coop),
        (
            "tensor cores f16, block pairs",
            DType::F16,
            Kernel::CoopPairs,
        ),
        (
            "tensor cores f16, softmax in registers",
            DType::F16,
            Kernel::CoopRegs,
        ),
    ];
    for (name, dt, kernel) in variants {
        // (the last: the dense path, whose walks start at scrambled blocks)
        for (h, sq, skv, d, density, dense_path) in [
            (2usize, 192usize, 192usize, 128usize, 0.5f64, false),
            (3, 130, 77, 64, 1.0, false),
            (1, 320, 320, 64, 0.3, false),
            (2, 200, 333, 128, 1.0, true),
        ] {
            let shape = if dense_path {
                format!("h{h} sq{sq} skv{skv} d{d} dense")
            } else {
                format!("h{h} sq{sq} skv{skv} d{d} p{density}")
            };
            let skip = match (dt, kernel) {
                (DType::F16, _) if !gpu.caps().f16 => Some("no SHADER_F16".to_string()),
                (_, Kernel::Coop) => coop_unavailable(gpu, dt, d),
                (_, Kernel::CoopPairs) => coop_pairs_unavailable(gpu, dt, d),
                (_, Kernel::CoopRegs) => coop_regs_unavailable(gpu, dt, d),
                _ => None,
            };
            let bound = if dt == DType::F16 { 2e-3 } else { 1e-5 };
            if let Some(why) = skip {
                out.push(Row {
                    kernel: "attention".into(),
                    variant: name.into(),
                    shape,
                    rel_err: 0.0,
                    bound,
                    skipped: Some(why),
                });
                continue;
            }
            let q = round(dt, &rng.normals(h * sq * d, 1.5));
            let k = round(dt, &rng.normals(h * skv * d, 1.5));
            let v = round(dt, &rng.normals(h * skv * d, 1.0));
            let (nq, nk) = (sq.div_ceil(64), skv.div_ceil(64));
            let dense: Vec<u8> = (0..h * nq * nk)
                .map(|_| (dense_path || (rng.normal() as f64 * 0.5 + 0.5) < density) as u8)
                .collect();
            let mask = BlockMask::from_dense_rect(gpu, &dense, h, nq, nk)?;
            let (qt, kt, vt) = (
                upload(gpu, dt, &q, &[1, h, sq, d])?,
                upload(gpu, dt, &k, &[1, h, skv, d])?,
                upload(gpu, dt, &v, &[1, h, skv, d])?,
            );
            let o = gpu.empty(&[1, h, sq, d], dt)?;
            gpu.fill_u32(
                &o,
                if dt == DType::F16 {
                    0x7e00_7e00
                } else {
                    0x7fc0_0000
                },
            );
            let mut b = gpu.batch();
            if dense_path {
                record_dense_attention_with(&mut b, &qt, &kt, &vt, &o, kernel)?;
            } else {
                record_attention_with(&mut b, &qt, &kt, &vt, &mask, &o, kernel)?;
            }
            b.submit()?;
            let want = reference::block_sparse_attention(&q, &k, &v, &dense, h, (h, sq, skv, d));
            let e = rel_l2(&gpu.read_f32(&o)?, &want);
            out.push(Row {
                kernel: "attention".into(),
                variant: name.into(),
                shape,
                rel_err: e,
                bound,
                skipped: None,
            });
        }
    }
    Ok(())
}

/// The tensor-core linear kernel in every tile configuration the adapter's auto-tune may pick
/// ([`CoopConfig::CANDIDATES`] that fit), bf16 weights, against the reference on f16-rounded
/// operands (M = 300: ragged 256- and 128-row tiles).
fn coop_config_rows(gpu: &Gpu, rng: &mut Rng, out: &mut Vec<Row>) -> Result<()> {
    use crate::ops::linear::CoopConfig;
    let (m, n, k) = (300usize, 136usize, 72usize);
    for c in CoopConfig::CANDIDATES {
        let variant = format!("tensor cores, tile {}x128 group {}", c.tile_rows, c.group);
        let shape = format!("{m}x{n}x{k}");
        let bound = 1e-4;
        let skip = match gpu.caps().coop_subgroup() {
            None => Some("no 16x16 cooperative matrices".to_string()),
            Some(sg) if !c.fits(gpu.caps(), sg) => Some("exceeds the workgroup limits".into()),
            Some(_) => None,
        };
        if let Some(why) = skip {
            out.push(Row::linear_skipped(variant, shape, bound, why));
            continue;
        }
        let x = rng.normals(m * k, 1.0);
        let w = round(DType::BF16, &rng.normals(n * k, 0.1));
        let bias = rng.normals(n, 0.5);
        let xt = gpu.upload_f32(&x, &[m, k])?;
        let wt = upload(gpu, DType::BF16, &w, &[n, k])?;
        let bt = gpu.upload_f32(&bias, &[n])?;
        let y = gpu.empty(&[m, n], DType::F32)?;
        gpu.fill_u32(&y, 0x7fc0_0000);
        let mut b = gpu.batch();
        crate::ops::linear::record_linear_with(
            &mut b,
            &xt,
            &wt,
            Some(&bt),
            Activation::GeluTanh,
            &y,
            LinearKernel::CoopWith(c),
        )?;
        b.submit()?;
        let want = reference::nn::linear::linear(
            &round(DType::F16, &x),
            &round(DType::F16, &w),
            Some(&bias),
            m,
            n,
            k,
            Activation::GeluTanh,
        );
        out.push(Row {
            kernel: "linear".into(),
            variant,
            shape,
            rel_err: rel_l2(&gpu.read_f32(&y)?, &want),
            bound,
            skipped: None,
        });
    }
    Ok(())
}

/// Operands of one linear check: x, W and the bias on the GPU, and as the reference sees them.
struct LinearCase<'a> {
    xt: &'a Tensor,
    wt: &'a Tensor,
    bt: &'a Tensor,
    xr: &'a [f32],
    wr: &'a [f32],
    bias: &'a [f32],
    mnk: (usize, usize, usize),
}

/// Runs `res += gate[5] ⊙ (x·Wᵀ + b)` in place with a fresh residual and `[6, N]` gate table;
/// returns (GPU result, reference, the residual before).
fn gated_residual_check(
    gpu: &Gpu,
    rng: &mut Rng,
    c: &LinearCase<'_>,
    kernel: LinearKernel,
    rounding: LinearRounding,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (m, n, k) = c.mnk;
    let res = rng.normals(m * n, 1.0);
    let table = rng.normals(6 * n, 1.0);
    let rt = gpu.upload_f32(&res, &[m, n])?;
    let tt = gpu.upload_f32(&table, &[6, n])?;
    let mut b = gpu.batch();
    record_linear_gated_residual_rounded(
        &mut b,
        c.xt,
        c.wt,
        Some(c.bt),
        &rt,
        Some((&tt, 5)),
        &rt,
        kernel,
        rounding,
    )?;
    b.submit()?;
    let want = reference::nn::linear::linear_gated_residual_rounded(
        c.xr,
        c.wr,
        Some(c.bias),
        &res,
        Some(&table[5 * n..]),
        m,
        n,
        k,
        rounding,
    );
    Ok((gpu.read_f32(&rt)?, want, res))
}

/// The tensor-core linear kernel on f16 weights in fragment order ([`Gpu::upload_f16_frag`]:
/// W's B fragments built from storage), in both tile heights, with the GELU epilogue and the
/// DiT's gated residual in place, against the reference on f16-rounded operands. K a multiple of
/// 32 (the layout's requirement); ragged M and N, one row, one 32-k step.
fn frag_rows(gpu: &Gpu, rng: &mut Rng, out: &mut Vec<Row>) -> Result<()> {
    use crate::ops::linear::CoopConfig;
    let usable = crate::ops::linear::frag_weights_usable(gpu);
    let cases = [
        (65usize, 130usize, 32usize, 128u32, false),
        (300, 136, 96, 128, false),
        (300, 136, 96, 256, false),
        (1, 3, 64, 128, false),
        (300, 136, 96, 128, true),
    ];
    for (m, n, k, tile_rows, residual) in cases {
        let variant = format!(
            "tensor cores, f16 weights in fragment order, tile {tile_rows}x128{}",
            if residual { ", gated residual" } else { "" }
        );
        let shape = format!("{m}x{n}x{k}");
        let bound = 1e-4;
        let c = CoopConfig {
            tile_rows,
            group: CoopConfig::DEFAULT.group,
        };
        let skip = match gpu.caps().coop_subgroup() {
            _ if !usable => Some("needs cooperative matrices with a verified element order".into()),
            Some(sg) if !c.fits(gpu.caps(), sg) => Some("exceeds the workgroup limits".into()),
            _ => None,
        };
        if let Some(why) = skip {
            out.push(Row::linear_skipped(variant, shape, bound, why));
            continue;
        }
        let x = rng.normals(m * k, 1.0);
        let w = round(DType::F16, &rng.normals(n * k, 0.1));
        let bias = rng.normals(n, 0.5);
        let xt = gpu.upload_f32(&x, &[m, k])?;
        let wt = gpu.upload_f16_frag(&w, &[n, k])?;
        let bt = gpu.upload_f32(&bias, &[n])?;
        let xr = round(DType::F16, &x);
        let kernel = LinearKernel::CoopWith(c);
        let (got, want) = if residual {
            let case = LinearCase {
                xt: &xt,
                wt: &wt,
                bt: &bt,
                xr: &xr,
                wr: &w,
                bias: &bias,
                mnk: (m, n, k),
            };
            let (got, want, _) =
                gated_residual_check(gpu, rng, &case, kernel, LinearRounding::None)?;
            (got, want)
        } else {
            let mut b = gpu.batch();
            let y = gpu.empty(&[m, n], DType::F32)?;
            gpu.fill_u32(&y, 0x7fc0_0000);
            let act = Activation::GeluTanh;
            crate::ops::linear::record_linear_with(&mut b, &xt, &wt, Some(&bt), act, &y, kernel)?;
            b.submit()?;
            let want = reference::nn::linear::linear(&xr, &w, Some(&bias), m, n, k, act);
            (gpu.read_f32(&y)?, want)
        };
        out.push(Row {
            kernel: "linear".into(),
            variant,
            shape,
            rel_err: rel_l2(&got, &want),
            bound,
            skipped: None,
        });
    }
    Ok(())
}

/// The fraction of elements of `got` that differ from `want` by more than `slack(i)` (a bf16
/// autocast result against its reference: only a flipped bf16 rounding makes them differ).
fn flip_fraction(got: &[f32], want: &[f32], slack: impl Fn(usize) -> f64) -> f64 {
    if got.len() != want.len() || got.iter().any(|x| !x.is_finite()) {
        return f64::NAN;
    }
    let off = (0..got.len())
        .filter(|&i| (got[i] as f64 - want[i] as f64).abs() > slack(i))
        .count();
    off as f64 / got.len().max(1) as f64
}

/// The linear kernels with a GELU epilogue, and with the gated-residual epilogue in place as the
/// DiT uses it (`res += gate[5] ⊙ (x·Wᵀ + b)` with a `[6, N]` gate table); f32, f16 and bf16
/// weights, and bf16 weights in the bf16 autocast mode of the DiT's fast path
/// ([`LinearRounding::Bf16`]), whose error is the fraction of elements off the bf16 reference
/// (a flipped bf16 rounding, rare: ≤ 0.5 %, or one element; any missing rounding moves ≥ 15 %).
fn linear_rows(gpu: &Gpu, rng: &mut Rng, out: &mut Vec<Row>) -> Result<()> {
    for residual in [false, true] {
        let name = if residual {
            "linear gated residual"
        } else {
            "linear"
        };
        for (kname, kernel) in [
            ("portable", LinearKernel::Portable),
            ("tensor cores", LinearKernel::Coop),
        ] {
            for (wdt, rounding) in [
                (DType::F32, LinearRounding::None),
                (DType::F16, LinearRounding::None),
                (DType::BF16, LinearRounding::None),
                (DType::BF16, LinearRounding::Bf16),
            ] {
                for (m, n, k) in [(65usize, 130usize, 34usize), (300, 64, 256), (1, 3, 2)] {
                    let autocast = rounding == LinearRounding::Bf16;
                    let variant = format!(
                        "{kname} {wdt:?} weights{}",
                        if autocast { ", bf16 autocast" } else { "" }
                    );
                    let shape = format!("{m}x{n}x{k}");
                    let coop = kernel == LinearKernel::Coop;
                    let bound = if autocast {
                        (0.005f64).max(1.0 / (m * n) as f64)
                    } else if coop {
                        1e-4
                    } else {
                        1e-5
                    };
                    if coop && gpu.caps().coop_subgroup().is_none() {
                        out.push(Row {
                            kernel: name.into(),
                            variant,
                            shape,
                            rel_err: 0.0,
                            bound,
                            skipped: Some("no 16x16 cooperative matrices".into()),
                        });
                        continue;
                    }
                    let x = rng.normals(m * k, 1.0);
                    let w = round(wdt, &rng.normals(n * k, 0.1));
                    let bias = rng.normals(n, 0.5);
                    let (xt, wt, bt) = (
                        gpu.upload_f32(&x, &[m, k])?,
                        upload(gpu, wdt, &w, &[n, k])?,
                        gpu.upload_f32(&bias, &[n])?,
                    );
                    // the tensor-core kernel rounds operands to f16 when staging them (in the
                    // autocast mode x is bf16 first, then exactly f16, as are bf16 weights: the
                    // reference rounds x to bf16 itself)
                    let (xr, wr) = if coop && !autocast {
                        (round(DType::F16, &x), round(DType::F16, &w))
                    } else {
                        (x.clone(), w.clone())
                    };
                    let (got, want, res) = if residual {
                        let case = LinearCase {
                            xt: &xt,
                            wt: &wt,
                            bt: &bt,
                            xr: &xr,
                            wr: &wr,
                            bias: &bias,
                            mnk: (m, n, k),
                        };
                        gated_residual_check(gpu, rng, &case, kernel, rounding)?
                    } else {
                        let mut b = gpu.batch();
                        let o = gpu.empty(&[m, n], DType::F32)?;
                        gpu.fill_u32(&o, 0x7fc0_0000);
                        let act = Activation::GeluTanh;
                        record_linear_rounded(
                            &mut b,
                            &xt,
                            &wt,
                            Some(&bt),
                            act,
                            &o,
                            kernel,
                            rounding,
                        )?;
                        b.submit()?;
                        let want = reference::nn::linear::linear_rounded(
                            &xr,
                            &wr,
                            Some(&bias),
                            m,
                            n,
                            k,
                            act,
                            rounding,
                        );
                        (gpu.read_f32(&o)?, want, vec![0.0; m * n])
                    };
                    let rel_err = if autocast {
                        // bf16 outputs equal the reference's unless a rounding flipped; after
                        // the residual add, up to f32 rounding of r + g·v (|g·v| ≤ |r| + |out|);
                        // GELU's f32 tail (outputs ≪ 1) errs by ~1e-6 absolute
                        let slack = |i: usize| {
                            1e-6 * (2.0 * res[i].abs() + want[i].abs()) as f64
                                + if residual { 0.0 } else { 1e-5 }
                        };
                        flip_fraction(&got, &want, slack)
                    } else {
                        rel_l2(&got, &want)
                    };
                    out.push(Row {
                        kernel: name.into(),
                        variant,
                        shape,
                        rel_err,
                        bound,
                        skipped: None,
                    });
                }
            }
        }
    }
    coop_config_rows(gpu, rng, out)
}

fn mask_rows(gpu: &Gpu, rng: &mut Rng, out: &mut Vec<Row>) -> Result<()> {
    let reductions = [
        ("workgroup tree", Reduction::Workgroup),
        ("subgroup reductions", Reduction::Subgroup),
        ("subgroup per row", Reduction::RowPerSubgroup),
    ];
    let scores = [
        ("portable scores", Scores::Portable),
        ("tensor-core scores", Scores::TensorCore),
    ];
    for ((rname, red), (sname, sc)) in scores
        .iter()
        .flat_map(|&s| reductions.iter().map(move |&r| (r, s)))
    {
        let rname = format!("{sname}, {rname}");
        for (grid, d, algo) in [
            ((3usize, 2usize, 5usize), 64usize, "nabla-0.7"),
            ((2, 3, 7), 128, "nabla-0.4_sta-3-3-3"),
            ((5, 7, 9), 16, "nabla-0.9"),
        ] {
            let g = BlockGrid::new(grid.0, grid.1, grid.2)?;
            let nb = g.blocks();
            let shape = format!("grid {}x{}x{} d{d} {algo}", grid.0, grid.1, grid.2);
            let c = gpu.caps();
            let skip = match red {
                Reduction::Subgroup if !c.subgroups => Some("no subgroups".to_string()),
                Reduction::RowPerSubgroup
                    if !(c.subgroups
                        && c.subgroup_min == c.subgroup_max
                        && nb <= 64 * c.subgroup_min as usize) =>
                {
                    Some("no fixed subgroup size for this Nb".to_string())
                }
                _ if sc == Scores::TensorCore && !Scores::tensor_cores_run(gpu, d) => {
                    Some("no 16x16 cooperative matrices".to_string())
                }
                _ => None,
            };
            if let Some(why) = skip {
                out.push(Row {
                    kernel: "mask".into(),
                    variant: rname.clone(),
                    shape,
                    rel_err: 0.0,
                    bound: 0.0,
                    skipped: Some(why),
                });
                continue;
            }
            let alg: SparseAlgo = algo.parse()?;
            let qa = rng.normals(2 * nb * d, 0.8);
            let ka = rng.normals(2 * nb * d, 0.8);
            let (mask, probs) = mask_from_pooled_with(
                gpu,
                &gpu.upload_f32(&qa, &[2, nb, d])?,
                &gpu.upload_f32(&ka, &[2, nb, d])?,
                g,
                &alg,
                MaskKernels {
                    scores: sc,
                    reduction: red,
                },
            )?;
            let map = gpu.read_f32(&probs)?;
            let got = mask.to_dense(gpu)?;
            let (keep, mass) =
                reference::threshold_mask_ties(&map, 2 * nb, nb, alg.threshold().unwrap_or(1.0));
            let sta = alg.sta().map(|w| reference::sta_mask(&g, &w));
            let cut = alg.cut().unwrap_or(0.0) as f64;
            let mut wrong = 0usize;
            for (e, (&gv, &kv)) in got.iter().zip(&keep).enumerate() {
                let want = if sta.as_ref().is_some_and(|s| s[e % (nb * nb)] == 1) {
                    1
                } else {
                    kv
                };
                if gv != want && (mass[e] - cut).abs() >= 1e-5 {
                    wrong += 1;
                }
            }
            let map_ref = reference::block_map(&qa, &ka, 2, nb, d);
            let e = rel_l2(&map, &map_ref).max(wrong as f64 / got.len() as f64);
            out.push(Row {
                kernel: "mask".into(),
                variant: rname.clone(),
                shape,
                rel_err: e,
                bound: 1e-4,
                skipped: None,
            });
        }
    }
    Ok(())
}

/// The RoPE + head split + pooling cases: (token grid, heads, head dim).
const ROPE_POOL_CASES: [((usize, usize, usize), usize, usize); 2] =
    [((2, 8, 16), 2, 64), ((1, 16, 8), 3, 128)];

/// Inputs and the reference heads of one RoPE + pooling case: x `[S, H·D]`, the fractal RoPE
/// tables, the rotated heads `[H, S, D]` (f64 rotation rounded to f32) and S.
/// The bound of a RoPE + pooling row with heads stored as `dt`: the rotation is f32 on the GPU
/// and f64 in the reference, so a few values round to the neighbouring 16-bit value (one ulp:
/// 2^-11 of the value for f16, 2^-8 for bf16).
fn rope_pool_bound(dt: DType) -> f64 {
    match dt {
        DType::F16 => 1e-4,
        DType::BF16 => 1e-3,
        _ => 1e-6,
    }
}

fn rope_pool_case(
    rng: &mut Rng,
    tok: (usize, usize, usize),
    h: usize,
    d: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, usize) {
    let s = tok.0 * tok.1 * tok.2;
    let (cos, sin) = crate::ops::rope::rope_tables(tok, d, true);
    let x = rng.normals(s * h * d, 1.0);
    let roped = reference::nn::rope::rope(&x, &cos, &sin, h, d);
    let heads = reference::nn::elementwise::split_heads(&roped, s, h, d);
    (x, cos, sin, heads, s)
}

/// The wgpu layer's fused RoPE + head split + pooling (the DiT's q/k producer under a NABLA
/// mask): the heads against the f64 rotation rounded to the storage type, the pooled rows
/// against the reference pooling of the f32 rotations (what the kernel pools).
fn rope_pool_rows(gpu: &Gpu, rng: &mut Rng, out: &mut Vec<Row>) -> Result<()> {
    for dt in [DType::F32, DType::F16] {
        for (tok, h, d) in ROPE_POOL_CASES {
            let shape = format!("{}x{}x{} tokens, {h} heads, d{d}", tok.0, tok.1, tok.2);
            if dt == DType::F16 && !gpu.caps().f16 {
                for kernel in ["rope+pool", "rope+split"] {
                    out.push(Row {
                        kernel: kernel.into(),
                        variant: format!("{dt:?} heads"),
                        shape: shape.clone(),
                        rel_err: 0.0,
                        bound: 0.0,
                        skipped: Some("no SHADER_F16".into()),
                    });
                }
                continue;
            }
            let (x, cos, sin, heads, s) = rope_pool_case(rng, tok, h, d);
            let nb = s / crate::nabla::BLOCK;
            let stages = crate::nabla::MaskStages::alloc(gpu, h, nb, d)?;
            let o = gpu.empty(&[1, h, s, d], dt)?;
            gpu.fill_u32(
                &o,
                if dt == DType::F32 {
                    0x7fc0_0000
                } else {
                    0x7e00_7e00
                },
            );
            gpu.fill_u32(&stages.qa, 0x7fc0_0000);
            crate::nabla::rope_split_heads_pooled(
                gpu,
                &gpu.upload_f32(&x, &[s, h * d])?,
                &gpu.upload_f32(&cos, &[s, d / 2])?,
                &gpu.upload_f32(&sin, &[s, d / 2])?,
                &o,
                &stages,
                crate::nabla::QkSide::Q,
            )?;
            let e_heads = rel_l2(&gpu.read_f32(&o)?, &round(dt, &heads));
            let e_pool = rel_l2(
                &gpu.read_f32(&stages.qa)?,
                &reference::pool(&heads, h, s, d),
            );
            out.push(Row {
                kernel: "rope+pool".into(),
                variant: format!("{dt:?} heads"),
                shape: shape.clone(),
                rel_err: e_heads.max(e_pool),
                bound: rope_pool_bound(dt),
                skipped: None,
            });
            // the same kernel without the pooling (the DiT's producer without a mask)
            let o2 = gpu.empty(&[1, h, s, d], dt)?;
            gpu.fill_u32(
                &o2,
                if dt == DType::F32 {
                    0x7fc0_0000
                } else {
                    0x7e00_7e00
                },
            );
            let mut b = gpu.batch();
            crate::nabla::record_rope_split_heads(
                &mut b,
                &gpu.upload_f32(&x, &[s, h * d])?,
                &gpu.upload_f32(&cos, &[s, d / 2])?,
                &gpu.upload_f32(&sin, &[s, d / 2])?,
                &o2,
            )?;
            b.submit()?;
            out.push(Row {
                kernel: "rope+split".into(),
                variant: format!("{dt:?} heads"),
                shape,
                rel_err: rel_l2(&gpu.read_f32(&o2)?, &round(dt, &heads)),
                bound: rope_pool_bound(dt),
                skipped: None,
            });
        }
    }
    Ok(())
}

/// Runs every check on `gpu`; inputs are fresh for every `seed`.
pub fn run(gpu: &Gpu, seed: u64) -> Result<Vec<Row>> {
    let mut rng = Rng(seed);
    let mut rows = Vec::new();
    mask_rows(gpu, &mut rng, &mut rows)?;
    rope_pool_rows(gpu, &mut rng, &mut rows)?;
    attention_rows(gpu, &mut rng, &mut rows)?;
    linear_rows(gpu, &mut rng, &mut rows)?;
    frag_rows(gpu, &mut rng, &mut rows)?;
    Ok(rows)
}

/// The CUDA layer's kernels against the same CPU references (`nabla selftest --backend cuda`).
#[cfg(feature = "cuda")]
pub mod cuda {
    use super::{Rng, Row, rel_l2, round};
    use crate::cuda::{Cuda, CudaTensor, attention, gemm, nabla};
    use crate::error::Result;
    use crate::gpu::DType;
    use crate::nabla::{BlockGrid, SparseAlgo};
    use crate::ops::linear::Activation;
    use crate::reference;

    /// A NaN-poisoned output (an element the kernel does not write fails the check).
    fn poisoned(c: &Cuda, shape: &[usize], dt: DType) -> Result<CudaTensor> {
        let t = c.empty(shape, dt)?;
        let word: u32 = if dt == DType::F32 {
            0x7fc0_0000
        } else {
            0x7e00_7e00
        };
        let n = t.bytes().div_ceil(4);
        let bytes: Vec<u8> = std::iter::repeat_n(word.to_le_bytes(), n)
            .flatten()
            .collect();
        c.write_bytes(&t, &bytes[..t.bytes()])?;
        Ok(t)
    }

    fn linear_rows(c: &Cuda, rng: &mut Rng, out: &mut Vec<Row>) -> Result<()> {
        for wdt in [DType::F32, DType::F16, DType::BF16] {
            for (m, n, k) in [(65usize, 130usize, 40usize), (300, 64, 256), (1, 3, 8)] {
                for act in [Activation::None, Activation::GeluTanh, Activation::Silu] {
                    let x = rng.normals(m * k, 1.0);
                    let w = round(wdt, &rng.normals(n * k, 0.1));
                    let bias = rng.normals(n, 0.5);
                    let o = poisoned(c, &[m, n], DType::F32)?;
                    gemm::linear(
                        c,
                        &c.upload_f32(&x, &[m, k])?,
                        &c.upload_as(&w, &[n, k], wdt)?,
                        Some(&c.upload_f32(&bias, &[n])?),
                        act,
                        &o,
                    )?;
                    // 16-bit weights: cuBLASLt multiplies x rounded to the weight's type
                    let xr = if wdt == DType::F32 {
                        x.clone()
                    } else {
                        round(wdt, &x)
                    };
                    let want = reference::nn::linear::linear(&xr, &w, Some(&bias), m, n, k, act);
                    out.push(Row {
                        kernel: "cuda linear".into(),
                        variant: format!("cuBLASLt {wdt:?} {}", act.name()),
                        shape: format!("{m}x{n}x{k}"),
                        rel_err: rel_l2(&c.download_f32(&o)?, &want),
                        bound: if wdt == DType::F32 { 1e-5 } else { 1e-4 },
                        skipped: None,
                    });
                }
            }
        }
        Ok(())
    }

    fn attention_rows(c: &Cuda, rng: &mut Rng, out: &mut Vec<Row>) -> Result<()> {
        for dt in [DType::F16, DType::BF16, DType::F32] {
            for (h, sq, skv, d, density) in [
                (2usize, 192usize, 192usize, 128usize, 0.5f64),
                (3, 130, 77, 64, 1.0),
                (1, 320, 320, 64, 0.3),
                (2, 256, 512, 128, 2.0),
                (1, 200, 333, 128, 2.0),
            ] {
                let q = round(dt, &rng.normals(h * sq * d, 1.5));
                let k = round(dt, &rng.normals(h * skv * d, 1.5));
                let v = round(dt, &rng.normals(h * skv * d, 1.0));
                let (nq, nk) = (sq.div_ceil(64), skv.div_ceil(64));
                // density > 1: no mask (dense attention; the reference gets every block)
                let dense: Vec<u8> = (0..h * nq * nk)
                    .map(|_| (density > 1.0 || (rng.normal() as f64 * 0.5 + 0.5) < density) as u8)
                    .collect();
                let mask = (density <= 1.0)
                    .then(|| nabla::CudaMask::from_dense(c, &dense, h, nq, nk))
                    .transpose()?;
                let (qt, kt, vt) = (
                    c.upload_as(&q, &[1, h, sq, d], dt)?,
                    c.upload_as(&k, &[1, h, skv, d], dt)?,
                    c.upload_as(&v, &[1, h, skv, d], dt)?,
                );
                let want =
                    reference::block_sparse_attention(&q, &k, &v, &dense, h, (h, sq, skv, d));
                let bound = match dt {
                    DType::F16 => 2e-3,
                    DType::BF16 => 1e-2,
                    _ => 1e-5,
                };
                // every tensor-core kernel this device runs (f32 has one kernel)
                let kernels = match (dt, c.compute_capability()) {
                    (DType::F32, _) => vec![attention::AttnKernel::Auto],
                    (_, (9, 0)) => {
                        vec![
                            attention::AttnKernel::MmaSync,
                            attention::AttnKernel::Wgmma,
                            attention::AttnKernel::WgmmaTma,
                            attention::AttnKernel::WgmmaFa,
                        ]
                    }
                    _ => vec![attention::AttnKernel::MmaSync],
                };
                for kernel in kernels {
                    let o = poisoned(c, &[1, h, sq, d], dt)?;
                    let opts = attention::AttentionOptions {
                        kernel,
                        ..attention::AttentionOptions::from_env()?
                    };
                    attention::attention_with(c, &qt, &kt, &vt, mask.as_ref(), &o, opts)?;
                    out.push(Row {
                        kernel: "cuda attention".into(),
                        variant: format!(
                            "{dt:?}{}{}",
                            if mask.is_none() { " dense" } else { "" },
                            if dt == DType::F32 {
                                String::new()
                            } else {
                                format!(" {}", kernel.label())
                            }
                        ),
                        shape: format!("h{h} sq{sq} skv{skv} d{d} p{}", density.min(1.0)),
                        rel_err: rel_l2(&c.download_f32(&o)?, &want),
                        bound,
                        skipped: None,
                    });
                }
            }
        }
        Ok(())
    }

    fn mask_rows(c: &Cuda, rng: &mut Rng, out: &mut Vec<Row>) -> Result<()> {
        for (grid, d, algo) in [
            ((3usize, 2usize, 5usize), 64usize, "nabla-0.7"),
            ((2, 3, 7), 128, "nabla-0.4_sta-3-3-3"),
            ((5, 7, 9), 128, "nabla-0.9"),
            ((3, 4, 4), 64, "nabla-1"),
            ((3, 4, 4), 64, "nabla-0"),
        ] {
            let g = BlockGrid::new(grid.0, grid.1, grid.2)?;
            let (nb, h, s) = (g.blocks(), 2usize, g.tokens());
            let alg: SparseAlgo = algo.parse()?;
            let q = round(DType::F16, &rng.normals(h * s * d, 1.0));
            let k = round(DType::F16, &rng.normals(h * s * d, 1.0));
            let scratch = nabla::MaskScratch::alloc(c, h, nb, d)?;
            let mask = nabla::estimate_mask_with_map(
                c,
                &c.upload_as(&q, &[1, h, s, d], DType::F16)?,
                &c.upload_as(&k, &[1, h, s, d], DType::F16)?,
                g,
                &alg,
                &scratch,
            )?;
            let got = mask.to_dense(c)?;
            let gpu_map = c.download_f32(scratch.map())?;
            // 1. the block scores + softmax against the f64 reference
            let qa = reference::pool(&q, h, s, d);
            let ka = reference::pool(&k, h, s, d);
            let map = reference::block_map(&qa, &ka, h, nb, d);
            let shape = format!("grid {}x{}x{} d{d} {algo}", grid.0, grid.1, grid.2);
            out.push(Row {
                kernel: "cuda mask".into(),
                variant: "pool+scores+softmax".into(),
                shape: shape.clone(),
                rel_err: rel_l2(&gpu_map[..map.len().min(gpu_map.len())], &map),
                bound: 1e-5,
                skipped: None,
            });
            // 2. the CDF cut, STA union and lists: exact on the GPU's own map (near-equal
            // probabilities may order differently between f32 and f64 scores; entries whose
            // cumulative mass lies within 1e-5 of the cut are not judged)
            let (keep, mass) = reference::threshold_mask_ties(
                &gpu_map,
                h * nb,
                nb,
                alg.threshold().unwrap_or(1.0),
            );
            let sta = alg.sta().map(|w| reference::sta_mask(&g, &w));
            let cut = alg.cut().unwrap_or(0.0) as f64;
            let wrong = got
                .iter()
                .zip(&keep)
                .enumerate()
                .filter(|(e, (gv, kv))| {
                    let want = if sta.as_ref().is_some_and(|s| s[e % (nb * nb)] == 1) {
                        1
                    } else {
                        **kv
                    };
                    **gv != want && (mass[*e] - cut).abs() >= 1e-5
                })
                .count();
            out.push(Row {
                kernel: "cuda mask".into(),
                variant: "CDF+STA+lists".into(),
                shape,
                rel_err: if got.len() == keep.len() {
                    wrong as f64 / got.len() as f64
                } else {
                    f64::NAN
                },
                bound: 0.0,
                skipped: None,
            });
        }
        Ok(())
    }

    /// The CUDA layer's fused RoPE + head split + pooling: the heads against the f64 rotation
    /// rounded to the storage type, the pooled rows against the reference pooling of those
    /// stored heads (what the kernel pools).
    fn rope_pool_rows(c: &Cuda, rng: &mut Rng, out: &mut Vec<Row>) -> Result<()> {
        for dt in [DType::BF16, DType::F16] {
            for (tok, h, d) in super::ROPE_POOL_CASES {
                let (x, cos, sin, heads, s) = super::rope_pool_case(rng, tok, h, d);
                let nb = s / crate::nabla::BLOCK;
                let scratch = nabla::MaskScratch::alloc(c, h, nb, d)?;
                let o = poisoned(c, &[1, h, s, d], dt)?;
                nabla::rope_split_heads_pooled(
                    c,
                    &c.upload_f32(&x, &[s, h * d])?,
                    &c.upload_f32(&cos, &[s, d / 2])?,
                    &c.upload_f32(&sin, &[s, d / 2])?,
                    &o,
                    &scratch,
                    crate::nabla::QkSide::K,
                )?;
                let want = round(dt, &heads);
                let e_heads = rel_l2(&c.download_f32(&o)?, &want);
                let e_pool = rel_l2(
                    &c.download_f32(scratch.ka())?,
                    &reference::pool(&want, h, s, d),
                );
                out.push(Row {
                    kernel: "cuda rope+pool".into(),
                    variant: format!("{dt:?} heads"),
                    shape: format!("{}x{}x{} tokens, {h} heads, d{d}", tok.0, tok.1, tok.2),
                    rel_err: e_heads.max(e_pool),
                    bound: super::rope_pool_bound(dt),
                    skipped: None,
                });
            }
        }
        Ok(())
    }

    /// Runs every CUDA check; inputs are fresh for every `seed`.
    pub fn run(c: &Cuda, seed: u64) -> Result<Vec<Row>> {
        let mut rng = Rng(seed);
        let mut rows = Vec::new();
        mask_rows(c, &mut rng, &mut rows)?;
        rope_pool_rows(c, &mut rng, &mut rows)?;
        attention_rows(c, &mut rng, &mut rows)?;
        linear_rows(c, &mut rng, &mut rows)?;
        Ok(rows)
    }
}
