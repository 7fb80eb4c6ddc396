//! `nabla selftest`: every kernel variant of this adapter against the CPU reference.

use super::layer::{self, BackendArg};
use nabla::selftest::Row;
use nabla::{Error, Gpu, Result};

pub fn run(seed: Option<u64>, backend: BackendArg) -> Result<()> {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let mut failed = 0;
    if backend != BackendArg::Cuda {
        let gpu = Gpu::new()?;
        println!(
            "adapter {} ({}, {} {}) | seed {seed}",
            gpu.caps().name,
            gpu.caps().backend,
            gpu.caps().driver,
            gpu.caps().driver_info
        );
        failed += table(&nabla::selftest::run(&gpu, seed)?);
    }
    if backend != BackendArg::Wgpu {
        match layer::open(backend)? {
            #[cfg(feature = "cuda")]
            Some(c) => {
                println!(
                    "\nCUDA device {} (sm_{}{}) | seed {seed}",
                    c.name(),
                    c.compute_capability().0,
                    c.compute_capability().1
                );
                failed += table(&nabla::selftest::cuda::run(&c, seed)?);
            }
            #[cfg(not(feature = "cuda"))]
            Some(never) => match never {},
            None => {}
        }
    }
    if failed > 0 {
        return Err(Error::Gpu(format!(
            "{failed} kernel variant(s) disagree with the CPU reference on this device"
        )));
    }
    Ok(())
}

/// Prints the rows; returns how many failed.
fn table(rows: &[Row]) -> usize {
    // columns as wide as their longest entry
    let width =
        |f: fn(&Row) -> &str, min: usize| rows.iter().map(|r| f(r).len()).fold(min, usize::max);
    let wk = width(|r| &r.kernel, 10);
    let wv = width(|r| &r.variant, 24);
    let ws = width(|r| &r.shape, 36);
    println!(
        "{:<wk$} {:<wv$} {:<ws$} {:>10} {:>9}  result",
        "kernel", "variant", "shape", "rel err", "bound"
    );
    let mut failed = 0;
    for r in rows {
        let result = match &r.skipped {
            Some(why) => format!("skipped ({why})"),
            None if r.passed() => "pass".to_string(),
            None => {
                failed += 1;
                "FAIL".to_string()
            }
        };
        let err = if r.skipped.is_some() {
            "-".to_string()
        } else {
            format!("{:.2e}", r.rel_err)
        };
        println!(
            "{:<wk$} {:<wv$} {:<ws$} {:>10} {:>9.0e}  {result}",
            r.kernel, r.variant, r.shape, err, r.bound
        );
    }
    let ran = rows.iter().filter(|r| r.skipped.is_none()).count();
    println!(
        "{} passed, {failed} failed, {} skipped",
        ran - failed,
        rows.len() - ran
    );
    failed
}
