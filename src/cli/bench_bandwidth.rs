//! `nabla bench bandwidth`: read bandwidth against the working set (nabla::gpu::bandwidth), the
//! ceiling of the tensor-core kernels' 16-byte tile loads.

use nabla::Result;
use nabla::error::Error;
use nabla::gpu::Gpu;
use nabla::gpu::bandwidth;
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct BandwidthArgs {
    /// Working sets to time, comma separated, powers of two with an optional K, M or G suffix
    /// (binary units), e.g. `4M,32M,1G` (default: 1 MiB to 1 GiB, within the adapter's limits).
    #[arg(long)]
    sizes: Option<String>,
    /// Bytes each timed dispatch reads, GiB.
    #[arg(long, default_value_t = 4)]
    gib: u64,
    /// Invocations per workgroup.
    #[arg(long, default_value_t = 256)]
    invocations: u32,
    /// Workgroups per dispatch: enough for many waves on the largest GPU.
    #[arg(long, default_value_t = 4096)]
    groups: u32,
    /// Timed runs per size (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// `4M` → 4·2²⁰ bytes.
fn parse_size(t: &str) -> Result<u64> {
    let t = t.trim();
    let (num, mul) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let bad = || {
        Error::Invalid(format!(
            "--sizes: {t:?} is not a power of two of at least 16 bytes (e.g. --sizes 4M,32M,1G)"
        ))
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let b = n.checked_mul(mul).ok_or_else(bad)?;
    if b < 16 || !b.is_power_of_two() {
        return Err(bad());
    }
    Ok(b)
}

/// `b` as binary units.
fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

pub fn run(a: BandwidthArgs) -> Result<()> {
    let gpu = Gpu::new()?;
    let caps = gpu.caps().clone();
    let limit = caps.max_storage_binding.min(caps.max_buffer);
    let mut sizes: Vec<u64> = match &a.sizes {
        None => [
            1u64 << 20,
            4 << 20,
            16 << 20,
            32 << 20,
            64 << 20,
            256 << 20,
            1 << 30,
        ]
        .into_iter()
        .filter(|&b| b <= limit)
        .collect(),
        Some(s) => s.split(',').map(parse_size).collect::<Result<_>>()?,
    };
    sizes.sort_unstable();
    sizes.dedup();
    if let Some(&b) = sizes.iter().find(|&&b| b > limit) {
        return Err(Error::TooLarge {
            what: format!("a bandwidth working set of {}", human(b)),
            bytes: b,
            limit,
            adapter: caps.name.clone(),
        });
    }
    println!(
        "adapter  {} ({}, {} {})",
        caps.name, caps.backend, caps.driver, caps.driver_info
    );
    println!(
        "probe    {} workgroups of {} invocations, 16-byte loads, ~{} GiB read per dispatch\n",
        a.groups, a.invocations, a.gib
    );
    let rows = bandwidth::measure(&gpu, &sizes, a.gib << 30, a.invocations, a.groups, a.reps)?;
    println!("{:>12}  {:>10}  {:>10}", "working set", "ms", "GB/s");
    let mut out = Vec::new();
    for r in &rows {
        println!("{:>12}  {:>10.3}  {:>10.0}", human(r.bytes), r.ms, r.gbps);
        out.push(json!({"bytes": r.bytes, "ms": r.ms, "gbps": r.gbps}));
    }
    println!(
        "\nWorking sets below the L2 size read from L2 (the tiles of the tensor-core kernels do), \
         the largest from device memory."
    );
    if let Some(p) = &a.json {
        let doc = json!({"adapter": caps.name, "driver": format!("{} {}", caps.driver, caps.driver_info),
            "invocations": a.invocations, "groups": a.groups, "gib": a.gib, "rows": out});
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| Error::file(p.clone(), e))?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4M").unwrap(), 4 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("64").unwrap(), 64);
        for bad in ["3M", "8", "x", "", "0K"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }
}
