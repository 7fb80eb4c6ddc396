//! `nabla bench attention --backend cuda`: the CUDA layer's NABLA masks and block-sparse
//! attention on the same synthetic inputs as the wgpu bench, with the same table, JSON and
//! mask dump (for `benches/torch_attention.py`).

use super::bench::{AttnArgs, RopePoolTimes, Shape, print_attention_rows, rel_err, write_masks};
use super::median;
use nabla::cuda::{Cuda, attention, nabla as cnabla};
use nabla::synth::{Role, structured};
use nabla::{DType, Error, Result, SparseAlgo};
use serde_json::json;

/// Runs the attention bench on the CUDA layer.
pub(super) fn attention(c: &Cuda, a: &AttnArgs, sh: &Shape, algos: &[SparseAlgo]) -> Result<()> {
    let dt = match a.dtype.as_str() {
        "auto" | "f16" => DType::F16,
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        o => {
            return Err(Error::Invalid(format!(
                "--dtype {o:?}: use auto, f16, bf16 or f32"
            )));
        }
    };
    let opts = attention::AttentionOptions::from_env()?;
    let (b, h, d, grid) = (sh.b, sh.h, sh.d, sh.grid);
    let (s, nb, bh) = (grid.tokens(), grid.blocks(), b * h);
    let shape = [b, h, s, d];
    eprintln!("generating inputs [{b}, {h}, {s}, {d}] ...");
    let q = structured(&grid, bh, d, Role::Query, a.seed);
    let k = structured(&grid, bh, d, Role::Key, a.seed);
    let v = structured(&grid, bh, d, Role::Value, a.seed);
    let (qt, kt, vt) = (
        c.upload_as(&q, &shape, dt)?,
        c.upload_as(&k, &shape, dt)?,
        c.upload_as(&v, &shape, dt)?,
    );
    drop((q, k, v));
    let flop_dense = 4.0 * (s as f64).powi(2) * d as f64 * bh as f64;
    let mut dense_ms = f64::NAN;
    let mut dense_out = None;
    if a.dense_reps > 0 {
        eprintln!("dense attention ...");
        let out = c.empty(&shape, dt)?;
        let t = attention::bench_attention(c, &qt, &kt, &vt, None, &out, opts, a.dense_reps)?;
        dense_ms = t.median_ms;
        dense_out = Some(c.download_f32(&out)?);
    }
    let scratch = cnabla::MaskScratch::alloc(c, bh, nb, d)?;
    let fused = match (b, sh.token_grid) {
        (1, Some(tok)) if algos.iter().any(|x| x.cut().is_some()) && dt != DType::F32 => {
            Some(time_rope_pool(c, a, tok, h, d, dt, &scratch)?)
        }
        _ => None,
    };
    let mut fused_rows = Vec::new();
    let mut rows = Vec::new();
    let mut masks_dump: super::bench::MaskDump = Vec::new();
    for algo in algos {
        eprintln!("{algo} ...");
        let (mask, mask_ms, stages_ms) = match algo {
            SparseAlgo::Sta(w) => (cnabla::sta_mask(c, grid, *w)?, 0.0, vec![]),
            _ => {
                let mut m = None;
                let t = attention::time_ms(c, 2, a.reps.max(1), || {
                    m = Some(cnabla::estimate_mask(c, &qt, &kt, grid, algo, &scratch)?);
                    Ok(())
                })?;
                let st = cnabla::time_mask_stages(c, &qt, &kt, grid, algo, &scratch, a.reps)?;
                eprintln!(
                    "  mask stages: pool {:.3} ms, scores {:.3} ms, softmax+threshold+lists {:.3} ms",
                    st[0], st[1], st[2]
                );
                if let Some(f) = &fused {
                    let t = attention::time_ms(c, 1, a.reps.max(1), || {
                        cnabla::estimate_mask_prepooled(c, grid, algo, &scratch).map(|_| ())
                    })?;
                    fused_rows.push(f.report(algo, median(&t)));
                }
                let m = m.ok_or_else(|| Error::Invalid("no mask estimated".into()))?;
                (m, median(&t), st.to_vec())
            }
        };
        let out = c.empty(&shape, dt)?;
        let t = attention::bench_attention(c, &qt, &kt, &vt, Some(&mask), &out, opts, a.reps)?;
        let err = match &dense_out {
            Some(dref) => rel_err(&c.download_f32(&out)?, dref),
            None => f64::NAN,
        };
        let mask_gbs = (2 * bh * s * d) as f64 * dt.size() as f64 / (mask_ms * 1e-3) / 1e9;
        rows.push(json!({
            "algo": algo.to_string(), "density": t.density, "mask_ms": mask_ms, "sparse_ms": t.median_ms,
            "dense_ms": dense_ms, "speedup": dense_ms / t.median_ms, "effective_tflops": t.tflops,
            "mask_read_gbs": mask_gbs, "rel_err_vs_dense": err, "mask_stage_ms": stages_ms,
        }));
        if a.masks_out.is_some() {
            let mut dense = mask.to_dense(c)?;
            if mask.heads == 1 {
                dense = dense.repeat(bh);
            }
            masks_dump.push((
                format!("mask_{algo}"),
                safetensors::Dtype::U8,
                vec![bh, nb, nb],
                dense,
            ));
        }
    }
    let dense_tflops = flop_dense / (dense_ms * 1e-3) / 1e12;
    let (ccmaj, ccmin) = c.compute_capability();
    let kernel = opts.kernel.resolve(c.compute_capability(), c.name())?;
    println!();
    println!("device   {} (CUDA, sm_{ccmaj}{ccmin})", c.name());
    println!(
        "shape    {} : B={b} H={h} S={s} D={d}, {nb} blocks of 64 | storage {dt:?}, kernel {} ({} stages)",
        sh.name,
        kernel.label(),
        if matches!(
            kernel,
            attention::AttnKernel::Wgmma | attention::AttnKernel::WgmmaTma
        ) {
            2
        } else {
            opts.stages
        }
    );
    println!(
        "dense    {dense_ms:.3} ms ({dense_tflops:.1} TFLOP/s, {:.1} TFLOP)",
        flop_dense / 1e12
    );
    println!();
    print_attention_rows(&rows);
    if let Some(p) = &a.json {
        let doc = json!({
            "adapter": c.name(), "backend": "cuda", "shape": sh.name, "kernel": "mma.sync",
            "b": b, "h": h, "s": s, "d": d, "blocks": nb, "dtype": format!("{dt:?}"),
            "dense_ms": dense_ms, "dense_tflops": dense_tflops, "rows": rows,
            "mask_fused_pooling": fused_rows,
        });
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| Error::file(p.clone(), e))?;
    }
    if let Some(p) = &a.masks_out {
        write_masks(p, &masks_dump, (bh, d, s), grid, &sh.name)?;
    }
    Ok(())
}

fn time_rope_pool(
    c: &Cuda,
    a: &AttnArgs,
    tok: (usize, usize, usize),
    h: usize,
    d: usize,
    dt: DType,
    scratch: &cnabla::MaskScratch,
) -> Result<RopePoolTimes> {
    use nabla::cuda::ops;
    use nabla::nabla::QkSide;
    eprintln!("RoPE + pooling producer ...");
    let s = tok.0 * tok.1 * tok.2;
    let (cos, sin) = ops::rope_tables(c, tok, d, true)?;
    let x = nabla::synth::noise(a.seed ^ 0x5eed, s * h * d, 1.0);
    let (xq, xk) = (
        c.upload_f32(&x, &[s, h * d])?,
        c.upload_f32(&x, &[s, h * d])?,
    );
    drop(x);
    let (oq, ok) = (c.empty(&[1, h, s, d], dt)?, c.empty(&[1, h, s, d], dt)?);
    let reps = a.reps.max(1);
    let rope = attention::time_ms(c, 1, reps, || {
        ops::rope_split_heads(c, &xq, &cos, &sin, &oq)?;
        ops::rope_split_heads(c, &xk, &cos, &sin, &ok)
    })?;
    let rope_pool = attention::time_ms(c, 1, reps, || {
        cnabla::rope_split_heads_pooled(c, &xq, &cos, &sin, &oq, scratch, QkSide::Q)?;
        cnabla::rope_split_heads_pooled(c, &xk, &cos, &sin, &ok, scratch, QkSide::K)
    })?;
    Ok(RopePoolTimes {
        rope_ms: median(&rope),
        rope_pool_ms: median(&rope_pool),
    })
}
