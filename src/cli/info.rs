//! `nabla info`: every adapter with its capability record.

use nabla::gpu::enumerate_adapters;
use nabla::{Error, Gpu, Result};

pub fn run() -> Result<()> {
    let adapters = enumerate_adapters()?;
    if adapters.is_empty() {
        return Err(Error::NoAdapter {
            filter: String::new(),
        });
    }
    let chosen = Gpu::new()
        .ok()
        .map(|g| (g.caps().name.clone(), g.caps().backend.clone()));
    for (i, a) in adapters.into_iter().enumerate() {
        let info = a.get_info();
        let name = info.name.clone();
        let this = (info.name, format!("{:?}", info.backend));
        let mark = if chosen.as_ref() == Some(&this) {
            "  (default choice)"
        } else {
            ""
        };
        println!("== adapter {i}{mark}");
        match Gpu::from_adapter(a) {
            Ok(g) => {
                println!("{}", g.caps());
                match nabla::gpu::coop_layout::probe(&g) {
                    Ok(l) => println!(
                        "  cooperative matrix element order: upper row {:?}, column {:?}",
                        l.hi, l.col
                    ),
                    Err(why) => println!("  cooperative matrix element order: none ({why})"),
                }
                match g.memory_info() {
                    Some((free, total)) => println!(
                        "  memory: {:.2} GB device-local, {:.2} GB free for this process",
                        total as f64 / 1e9,
                        free as f64 / 1e9
                    ),
                    None => println!("  memory: size not reported on this backend"),
                }
                let (path, problem) = g.tune_cache_status();
                let place = path.map_or("memory only".into(), |p| p.display().to_string());
                let note = problem.map(|p| format!(" ({p})")).unwrap_or_default();
                println!("  tuning cache: {place}{note}\n");
            }
            Err(e) => println!("{name}: cannot open: {e}\n"),
        }
    }
    println!("Choose with NABLA_ADAPTER=<name substring> and NABLA_BACKEND=vulkan|metal|dx12|gl.");
    cuda_info();
    Ok(())
}

/// `nabla info --kernel-stats FILTER`: the driver's statistics of each matching kernel variant.
pub fn kernel_stats(
    filter: &str,
    checked: bool,
    ir_dir: Option<&std::path::Path>,
    backend: super::layer::BackendArg,
) -> Result<()> {
    if backend == super::layer::BackendArg::Cuda {
        if checked || ir_dir.is_some() {
            return Err(Error::Invalid(
                "--checked and --ir-dir apply to the WGSL kernels (--backend wgpu); ptxas's \
                 statistics of the CUDA kernels have neither"
                    .into(),
            ));
        }
        return cuda_kernel_stats(filter);
    }
    let gpu = Gpu::new()?;
    let kernels: Vec<(String, String)> = nabla::shaders::all_variants()
        .into_iter()
        .filter(|(name, _)| name.contains(filter))
        .collect();
    if kernels.is_empty() {
        return Err(Error::Invalid(format!(
            "no kernel variant's name contains {filter:?} (names look like \
             attention/block_sparse_coop[d128,sg32] or linalg/linear[bf16,...][coop,...])"
        )));
    }
    println!(
        "{} ({}), {} kernel variant(s), runtime checks {}",
        gpu.caps().name,
        gpu.caps().driver_info,
        kernels.len(),
        if checked { "on" } else { "off" }
    );
    if let Some(d) = ir_dir {
        std::fs::create_dir_all(d).map_err(|e| Error::file(d.to_path_buf(), e))?;
    }
    for k in gpu.kernel_statistics(&kernels, checked, ir_dir.is_some())? {
        println!("{k}");
        if let Some(d) = ir_dir {
            if k.internal.is_empty() {
                println!("    (no textual internal representation offered)");
            }
            let stem: String = k
                .kernel
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            for (i, (name, text)) in k.internal.iter().enumerate() {
                let path = d.join(format!("{stem}.{i}.txt"));
                std::fs::write(&path, text).map_err(|e| Error::file(path.clone(), e))?;
                println!("    {name}: {} bytes -> {}", text.len(), path.display());
            }
        }
    }
    Ok(())
}

/// `nabla info --kernel-stats FILTER --backend cuda`: ptxas's statistics of the CUDA kernels.
#[cfg(feature = "cuda")]
fn cuda_kernel_stats(filter: &str) -> Result<()> {
    let stats = nabla::cuda::kernel_statistics(filter)?;
    if stats.is_empty() {
        return Err(Error::Invalid(format!(
            "no CUDA kernel's name contains {filter:?} (names look like \
             attention_sm90a/attn_fa_f16_s3 [sm_90a] or ops/layer_norm [sm_90])"
        )));
    }
    println!("ptxas (through NVRTC), {} kernel(s)", stats.len());
    for k in stats {
        println!("{k}");
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda_kernel_stats(_filter: &str) -> Result<()> {
    Err(Error::Invalid(
        "--backend cuda: this binary was built without the CUDA layer; build with \
         `cargo build --release --features cuda`"
            .into(),
    ))
}

/// The CUDA layer: libraries found, devices, memory.
#[cfg(feature = "cuda")]
fn cuda_info() {
    use nabla::cuda::{Cuda, cublaslt_present, driver_present, nvrtc_present};
    let yes = |b: bool| if b { "found" } else { "NOT found" };
    println!("\n== CUDA layer (built in)");
    println!(
        "libcuda {} | NVRTC {} | cuBLASLt {}",
        yes(driver_present()),
        yes(nvrtc_present()),
        yes(cublaslt_present())
    );
    match Cuda::new() {
        Ok(c) => {
            let (cc_major, cc_minor) = c.compute_capability();
            let mem = c
                .memory()
                .map(|(free, total)| {
                    format!(
                        "{:.1} GiB free of {:.1} GiB",
                        free as f64 / 1073741824.0,
                        total as f64 / 1073741824.0
                    )
                })
                .unwrap_or_else(|e| format!("memory unknown: {e}"));
            println!(
                "device: {} (sm_{cc_major}{cc_minor}), {mem}; kernels compiled by NVRTC for {}",
                c.name(),
                c.arch()
            );
            let attn = nabla::cuda::attention::AttentionOptions::from_env()
                .and_then(|o| o.kernel.resolve((cc_major, cc_minor), c.name()))
                .map(|k| k.label().to_string())
                .unwrap_or_else(|e| format!("unavailable: {e}"));
            println!(
                "attention kernel: {attn} (NABLA_CUDA_ATTN_KERNEL=auto|mma|wgmma; wgmma needs sm_90)"
            );
            println!(
                "`--backend auto` runs the DiT and the NABLA kernels here; `--backend wgpu` forces wgpu."
            );
        }
        Err(e) => println!("not usable: {e}\n`--backend auto` falls back to wgpu."),
    }
}

/// The CUDA layer is not in this build.
#[cfg(not(feature = "cuda"))]
fn cuda_info() {
    println!("\n== CUDA layer: not in this build (rebuild with `--features cuda` for NVIDIA GPUs)");
}
