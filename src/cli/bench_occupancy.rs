//! `nabla bench occupancy`: how many workgroups share a compute unit as their workgroup memory
//! grows (nabla::gpu::occupancy).

use nabla::Result;
use nabla::error::Error;
use nabla::gpu::Gpu;
use nabla::gpu::occupancy;
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct OccupancyArgs {
    /// Workgroup memory sizes to time, bytes, comma separated, timed in ascending order
    /// (default: 4 KB to the adapter's limit, with 16 bytes over 16 and 24 KB).
    #[arg(long)]
    bytes: Option<String>,
    /// Invocations per workgroup.
    #[arg(long, default_value_t = 128)]
    invocations: u32,
    /// Multiply-adds each invocation chains (the H200 takes 15-65 ms per size at 100000).
    #[arg(long, default_value_t = 100_000)]
    iters: u32,
    /// Workgroups per dispatch: enough for several waves on the largest GPU.
    #[arg(long, default_value_t = 4096)]
    groups: u32,
    /// Timed runs per size (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The default sizes up to `limit`: steps of 4 KB, plus 16 bytes past 16 and 24 KB (where
/// 48 KB per compute unit goes from three workgroups to two, and from two to one).
fn default_sizes(limit: u32) -> Vec<u32> {
    let mut v: Vec<u32> = (1..=12).map(|k| k * 4096).collect();
    v.extend([16 * 1024 + 16, 24 * 1024 + 16]);
    v.retain(|&b| b <= limit);
    v.sort_unstable();
    v
}

pub fn run(a: OccupancyArgs) -> Result<()> {
    let gpu = Gpu::new()?;
    let caps = gpu.caps().clone();
    let limit = gpu.device().limits().max_compute_workgroup_storage_size;
    let mut sizes: Vec<u32> = match &a.bytes {
        None => default_sizes(limit),
        Some(s) => s
            .split(',')
            .map(|t| {
                t.trim().parse::<u32>().map_err(|_| {
                    Error::Invalid(format!(
                        "--bytes: {t:?} is not a byte count (e.g. --bytes 8192,24576,24592)"
                    ))
                })
            })
            .collect::<Result<_>>()?,
    };
    // ascending, so that a step marks where fewer workgroups start to fit
    sizes.sort_unstable();
    sizes.dedup();
    println!(
        "adapter  {} ({}, {} {}), workgroup memory limit {} bytes",
        caps.name, caps.backend, caps.driver, caps.driver_info, limit
    );
    println!(
        "probe    {} workgroups of {} invocations, {} chained multiply-adds each\n",
        a.groups, a.invocations, a.iters
    );
    let rows = occupancy::measure(&gpu, &sizes, a.invocations, a.iters, a.groups, a.reps)?;
    let base = rows.first().map(|r| r.ms).unwrap_or(1.0);
    println!("{:>9}  {:>10}  {:>10}  step", "bytes", "ms", "x smallest");
    let mut prev = f64::NAN;
    let mut out = Vec::new();
    for r in &rows {
        // a jump of 20 % over the previous size: fewer workgroups fit at once from here on
        let step = r.ms > prev * 1.2;
        println!(
            "{:>9}  {:>10.3}  {:>10.2}  {}",
            r.bytes,
            r.ms,
            r.ms / base,
            if step {
                "<- slower: fewer resident"
            } else {
                ""
            }
        );
        out.push(json!({"bytes": r.bytes, "ms": r.ms, "relative": r.ms / base, "step": step}));
        prev = r.ms;
    }
    println!(
        "\nA step means fewer workgroups run at once from that size on. On NVIDIA's Vulkan \
         driver all the workgroups on an SM share 48 KB: floor(49152 / bytes) run together."
    );
    if let Some(p) = &a.json {
        let doc = json!({"adapter": caps.name, "driver": format!("{} {}", caps.driver, caps.driver_info),
            "limit_bytes": limit, "invocations": a.invocations, "iters": a.iters, "groups": a.groups, "rows": out});
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| Error::file(p.clone(), e))?;
        println!("wrote {}", p.display());
    }
    Ok(())
}
