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
