//! Read bandwidth as a function of the working set: the ceiling the tensor-core kernels' loads
//! run against. Their tiles are staged from storage buffers with 16-byte loads; a GEMM tile of
//! 128×128 outputs reads 16 KB per k-step of 32 (64 FLOP per byte), and the attention's 64-row
//! query block reads 16 KB of K and V per 32-key chunk (64 FLOP per byte too), almost all of
//! it from L2. This probe reads a buffer window of a chosen size (a power of two) with the same
//! 16-byte coalesced loads, many in flight, and reports bytes per second: windows below the L2
//! size measure L2 → SM bandwidth, windows far above it device-memory bandwidth.

use super::{DType, Gpu, Tensor};
use crate::error::{Error, Result};

/// The probe kernel (shaders/gpu/bandwidth.wgsl).
pub const SOURCE: &str = include_str!("../../shaders/gpu/bandwidth.wgsl");

/// Source of the probe for `invocations` per workgroup.
pub fn source(invocations: u32) -> String {
    format!("const W: u32 = {invocations}u;\n{SOURCE}")
}

/// How far (16-byte words) an invocation's window position moves per load beyond the grid: a
/// multiple of 32 words, so each warp-wide load stays one aligned 512-byte run, and not a power
/// of two, so the positions cycle through the window. Measured on the H200 (run149), a stride of
/// exactly the grid read 30 TB/s from windows up to 64 MiB: each invocation re-read the same
/// words, from its SM's L1.
pub const SHIFT: u32 = 32 * 129;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    mask: u32,
    rounds: u32,
    stride: u32,
    _p: u32,
}

/// One probe configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Working set in 16-byte words: a power of two, at most the source's length.
    pub words: u32,
    /// Invocations per workgroup.
    pub invocations: u32,
    /// Workgroups dispatched.
    pub groups: u32,
    /// Rounds of four loads per invocation.
    pub rounds: u32,
}

impl Probe {
    /// Invocations in the dispatch.
    pub fn threads(&self) -> u64 {
        self.groups as u64 * self.invocations as u64
    }

    /// Words between an invocation's successive loads: the invocation count plus [`SHIFT`]
    /// (before the window's mask, wrapping at 2³²).
    pub fn stride(&self) -> u32 {
        (self.threads() as u32).wrapping_add(SHIFT)
    }

    /// Bytes the dispatch reads.
    pub fn bytes_read(&self) -> u64 {
        self.threads() * self.rounds as u64 * 4 * 16
    }

    fn check(&self, gpu: &Gpu, src: &Tensor, out: &Tensor) -> Result<()> {
        if self.words == 0 || !self.words.is_power_of_two() {
            return Err(Error::Invalid(format!(
                "bandwidth probe: a working set of {} 16-byte words; use a power of two",
                self.words
            )));
        }
        let have = src.logical_bytes() / 16;
        if src.dtype() != DType::U32 || (self.words as u64) > have {
            return Err(Error::shape(format!(
                "bandwidth probe source: {:?} {:?} holds {have} 16-byte words, need {} u32 words \
                 ({} 16-byte words)",
                src.shape(),
                src.dtype(),
                self.words as u64 * 4,
                self.words
            )));
        }
        gpu.check_binding("bandwidth probe source", src.logical_bytes())?;
        super::occupancy::check_invocations(gpu, self.invocations, "bandwidth probe")?;
        if self.groups == 0 || self.threads() > u32::MAX as u64 {
            return Err(Error::Invalid(format!(
                "bandwidth probe: {} workgroups of {}; dispatch at least one and fewer than 2³² \
                 invocations",
                self.groups, self.invocations
            )));
        }
        if out.numel() as u64 != self.threads() || out.dtype() != DType::U32 {
            return Err(Error::shape(format!(
                "bandwidth probe output: {:?} {:?}, need {} u32",
                out.shape(),
                out.dtype(),
                self.threads()
            )));
        }
        Ok(())
    }

    /// The probe's outputs ([groups · invocations] u32) computed on the CPU from the source's
    /// u32 words.
    pub fn reference(&self, src: &[u32]) -> Vec<u32> {
        let t = self.threads() as u32;
        let s = self.stride();
        let mask = self.words - 1;
        (0..t)
            .map(|i| {
                let mut x = 0u32;
                for r in 0..self.rounds {
                    for j in 0..4u32 {
                        let w = (i
                            .wrapping_add(4u32.wrapping_mul(r).wrapping_mul(s))
                            .wrapping_add(j.wrapping_mul(s))
                            & mask) as usize;
                        x ^= src[4 * w] ^ src[4 * w + 1] ^ src[4 * w + 2] ^ src[4 * w + 3];
                    }
                }
                x
            })
            .collect()
    }

    /// Records the probe's dispatch reading `src` (u32) into `out` ([groups · invocations] u32).
    pub fn record(&self, batch: &mut super::Batch<'_>, src: &Tensor, out: &Tensor) -> Result<()> {
        let gpu = batch.gpu();
        self.check(gpu, src, out)?;
        let key = format!("gpu/bandwidth[w{}]", self.invocations);
        let pipe = gpu.pipeline(&key, &source(self.invocations), true)?;
        let grid = super::occupancy::probe_grid(gpu, self.groups, "bandwidth probe")?;
        let p = Params {
            mask: self.words - 1,
            rounds: self.rounds,
            stride: self.stride(),
            _p: 0,
        };
        batch.dispatch(&pipe, bytemuck::bytes_of(&p), &[src, out], grid)
    }
}

/// One measured working set.
#[derive(Clone, Debug)]
pub struct Row {
    /// Working set, bytes.
    pub bytes: u64,
    /// Median GPU time of the dispatch, ms.
    pub ms: f64,
    /// Bytes read per second, GB/s (10⁹).
    pub gbps: f64,
}

/// Times the probe at each working set in `bytes` (powers of two, at least 16; median of
/// `reps`), each dispatch reading about `total` bytes with `groups` workgroups of `invocations`.
/// Needs TIMESTAMP_QUERY.
pub fn measure(
    gpu: &Gpu,
    bytes: &[u64],
    total: u64,
    invocations: u32,
    groups: u32,
    reps: usize,
) -> Result<Vec<Row>> {
    // every size and the dispatch are checked before anything is allocated or divided
    if let Some(&b) = bytes
        .iter()
        .find(|&&b| b < 16 || !b.is_power_of_two() || b / 16 > u32::MAX as u64)
    {
        return Err(Error::Invalid(format!(
            "bandwidth probe: a working set of {b} bytes; use a power of two from 16 bytes to \
             64 GiB"
        )));
    }
    let threads = groups as u64 * invocations as u64;
    if threads == 0 || threads > u32::MAX as u64 {
        return Err(Error::Invalid(format!(
            "bandwidth probe: {groups} workgroups of {invocations}; dispatch at least one \
             invocation and fewer than 2³²"
        )));
    }
    let largest = bytes.iter().copied().max().unwrap_or(16);
    let src = gpu.empty(&[(largest / 4) as usize], DType::U32)?;
    gpu.fill_u32(&src, 0x9e37_79b9);
    let out = gpu.empty(&[threads as usize], DType::U32)?;
    let rounds = (total / (threads * 64)).clamp(1, u32::MAX as u64) as u32;
    let mut rows = Vec::with_capacity(bytes.len());
    for &b in bytes {
        let probe = Probe {
            words: (b / 16) as u32,
            invocations,
            groups,
            rounds,
        };
        // a warm-up run creates the pipeline, raises the clocks and fills the caches
        gpu.time_ms(1, |batch| probe.record(batch, &src, &out))?;
        let mut t = gpu.time_ms(reps.max(1), |batch| probe.record(batch, &src, &out))?;
        t.sort_by(f64::total_cmp);
        let ms = t[t.len() / 2];
        rows.push(Row {
            bytes: b,
            ms,
            gbps: probe.bytes_read() as f64 / (ms * 1e6),
        });
    }
    Ok(rows)
}
