//! `nabla selftest`: every kernel variant of this adapter against the CPU reference.

use nabla::{Error, Gpu, Result};

pub fn run(seed: Option<u64>) -> Result<()> {
    let gpu = Gpu::new()?;
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!(
        "adapter {} ({}, {} {}) | seed {seed}",
        gpu.caps().name,
        gpu.caps().backend,
        gpu.caps().driver,
        gpu.caps().driver_info
    );
    let rows = nabla::selftest::run(&gpu, seed)?;
    println!(
        "{:<10} {:<24} {:<36} {:>10} {:>9}  result",
        "kernel", "variant", "shape", "rel err", "bound"
    );
    let mut failed = 0;
    for r in &rows {
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
            "{:<10} {:<24} {:<36} {:>10} {:>9.0e}  {result}",
            r.kernel, r.variant, r.shape, err, r.bound
        );
    }
    let ran = rows.iter().filter(|r| r.skipped.is_none()).count();
    println!(
        "{} passed, {failed} failed, {} skipped",
        ran - failed,
        rows.len() - ran
    );
    if failed > 0 {
        return Err(Error::Gpu(format!(
            "{failed} kernel variant(s) disagree with the CPU reference on this adapter"
        )));
    }
    Ok(())
}
