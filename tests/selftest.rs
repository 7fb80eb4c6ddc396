//! `nabla selftest` on this adapter: every variant that runs must agree with the reference, and
//! the portable variants must all run (the software driver in CI has no tensor cores).

use nabla::Gpu;

#[test]
fn selftest_passes_on_this_adapter() {
    let gpu = Gpu::new().expect("a GPU adapter");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(3);
    let rows = nabla::selftest::run(&gpu, seed).unwrap();
    for r in &rows {
        eprintln!(
            "{} {} {}: {:?} {:.2e}",
            r.kernel, r.variant, r.shape, r.skipped, r.rel_err
        );
        assert!(
            r.passed(),
            "{} {} {} (seed {seed}): rel err {:e} > {:e}",
            r.kernel,
            r.variant,
            r.shape,
            r.rel_err,
            r.bound
        );
    }
    for (kernel, variant) in [
        ("attention", "portable f32"),
        ("linear", "portable F32 weights"),
        ("linear gated residual", "portable BF16 weights"),
        ("linear", "portable BF16 weights, bf16 autocast"),
        (
            "linear gated residual",
            "portable BF16 weights, bf16 autocast",
        ),
        ("mask", "portable scores, workgroup tree"),
    ] {
        assert!(
            rows.iter()
                .any(|r| r.kernel == kernel && r.variant == variant && r.skipped.is_none()),
            "{kernel} {variant} did not run"
        );
    }
}

/// The self-test on a device opened without f16, 16-bit integers and subgroups (what a GPU
/// lacking them runs: f32 storage, workgroup-tree reductions, no tensor cores): every variant
/// that runs agrees with the reference, none of them needs a feature that is off, and the
/// portable kernels all run.
#[test]
fn selftest_passes_without_f16_subgroups_and_int16() {
    let off = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::SHADER_I16;
    let gpu = Gpu::new_without(off).expect("a GPU adapter");
    let caps = gpu.caps();
    assert!(!caps.f16 && !caps.subgroups && !caps.int16 && caps.coop_matrix.is_empty());
    let rows = nabla::selftest::run(&gpu, 11).unwrap();
    for r in &rows {
        assert!(
            r.passed(),
            "{} {} {} without f16/subgroups: rel err {:e} > {:e}",
            r.kernel,
            r.variant,
            r.shape,
            r.rel_err,
            r.bound
        );
    }
    let ran = rows.iter().filter(|r| r.skipped.is_none()).count();
    assert!(
        ran >= 20,
        "only {ran} variants ran without f16 and subgroups"
    );
    for (kernel, variant) in [
        ("attention", "portable f32"),
        ("mask", "portable scores, workgroup tree"),
    ] {
        assert!(
            rows.iter()
                .any(|r| r.kernel == kernel && r.variant == variant && r.skipped.is_none()),
            "{kernel} {variant} did not run"
        );
    }
}
