//! Subcommands of the `nabla` binary.

pub mod bench;
pub mod bench_bandwidth;
#[cfg(feature = "cuda")]
pub mod bench_cuda;
pub mod bench_occupancy;
pub mod generate;
pub mod info;
pub mod layer;
pub mod mask;
pub mod selftest;

/// Median of a list of timings.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    }
}
