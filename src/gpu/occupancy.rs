//! How many workgroups share a compute unit, as a function of the workgroup memory each one
//! declares. No API reports it, and it decides the speed of the tensor-core kernels: NVIDIA's
//! Vulkan driver gives all the workgroups on an SM 48 KB together (the H200, driver 580:
//! benches/RESULTS.md, session 11), so a kernel of 24 KB + 16 B runs one workgroup per SM where
//! 24 KB runs two. This module measures it: a kernel whose invocations each run a long
//! dependent integer chain, timed at several workgroup-memory sizes. Its time steps up where
//! fewer workgroups fit at once.

use super::{Gpu, Tensor};
use crate::error::{Error, Result};

/// The probe kernel (shaders/gpu/occupancy.wgsl).
pub const SOURCE: &str = include_str!("../../shaders/gpu/occupancy.wgsl");

/// Source of the probe for `bytes` of workgroup memory (a multiple of 4) and `invocations`
/// per workgroup.
pub fn source(bytes: u32, invocations: u32) -> String {
    format!(
        "const N: u32 = {}u;\nconst W: u32 = {invocations}u;\n{SOURCE}",
        bytes / 4
    )
}

/// Seed of the probe's chains.
const SEED: u32 = 0x9e37_79b9;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    iters: u32,
    seed: u32,
    _p: [u32; 2],
}

/// One probe configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Workgroup memory of each workgroup, bytes (a positive multiple of 4).
    pub bytes: u32,
    /// Invocations per workgroup.
    pub invocations: u32,
    /// Multiply-adds each invocation chains.
    pub iters: u32,
    /// Workgroups dispatched.
    pub groups: u32,
}

impl Probe {
    fn check(&self, gpu: &Gpu) -> Result<()> {
        let caps = gpu.caps();
        let limit = gpu.device.limits();
        if self.bytes == 0 || !self.bytes.is_multiple_of(4) {
            return Err(Error::Invalid(format!(
                "occupancy probe: {} bytes of workgroup memory; use a positive multiple of 4",
                self.bytes
            )));
        }
        if self.bytes > limit.max_compute_workgroup_storage_size {
            return Err(Error::Invalid(format!(
                "occupancy probe: {} bytes of workgroup memory exceed {}'s limit of {}",
                self.bytes, caps.name, limit.max_compute_workgroup_storage_size
            )));
        }
        check_invocations(gpu, self.invocations, "occupancy probe")?;
        if self.groups == 0 {
            return Err(Error::Invalid(
                "occupancy probe: dispatch at least one workgroup".into(),
            ));
        }
        Ok(())
    }

    /// The probe's outputs ([groups · invocations] u32) computed on the CPU.
    pub fn reference(&self) -> Vec<u32> {
        let (n, w) = (self.bytes / 4, self.invocations);
        let x0 = |l: u32, g: u32| l ^ g.wrapping_mul(2_654_435_761) ^ SEED;
        let mut out = Vec::with_capacity((self.groups * w) as usize);
        for g in 0..self.groups {
            for l in 0..w {
                let mut x = x0(l, g);
                for _ in 0..self.iters {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                }
                let i = x % n;
                out.push(x ^ x0(i % w, g).wrapping_add(i));
            }
        }
        out
    }

    /// Records the probe's dispatch writing into `out` ([groups · invocations] u32).
    pub fn record(&self, batch: &mut super::Batch<'_>, out: &Tensor) -> Result<()> {
        let gpu = batch.gpu();
        self.check(gpu)?;
        let need = self.groups as usize * self.invocations as usize;
        if out.numel() != need || out.dtype() != crate::gpu::DType::U32 {
            return Err(Error::shape(format!(
                "occupancy probe output: {:?} {:?}, need {need} u32",
                out.shape(),
                out.dtype()
            )));
        }
        let key = format!("gpu/occupancy[{}B,w{}]", self.bytes, self.invocations);
        let pipe = gpu.pipeline(&key, &source(self.bytes, self.invocations), true)?;
        let grid = probe_grid(gpu, self.groups, "occupancy probe")?;
        let p = Params {
            iters: self.iters,
            seed: SEED,
            _p: [0; 2],
        };
        batch.dispatch(&pipe, bytemuck::bytes_of(&p), &[out], grid)
    }
}

/// Refuses a probe workgroup of `invocations` this adapter cannot run (one-dimensional).
pub(crate) fn check_invocations(gpu: &Gpu, invocations: u32, what: &str) -> Result<()> {
    let limit = gpu.device.limits();
    let max = limit
        .max_compute_invocations_per_workgroup
        .min(limit.max_compute_workgroup_size_x);
    if invocations == 0 || invocations > max {
        return Err(Error::Invalid(format!(
            "{what}: {invocations} invocations per workgroup; {} takes 1 to {max}",
            gpu.caps().name
        )));
    }
    Ok(())
}

/// The dispatch grid of a probe's `groups` workgroups (numbered x + y·width): one row up to the
/// adapter's per-dimension limit, then full rows of it (other counts are refused).
pub(crate) fn probe_grid(gpu: &Gpu, groups: u32, what: &str) -> Result<[u32; 3]> {
    let max = gpu.caps().max_workgroups_per_dim;
    let (x, y) = if groups <= max {
        (groups, 1)
    } else {
        (max, groups.div_ceil(max))
    };
    if x * y != groups {
        return Err(Error::Invalid(format!(
            "{what}: {groups} workgroups do not tile a grid of {max} per row; use a multiple of {max}"
        )));
    }
    Ok([x, y, 1])
}

/// One measured size.
#[derive(Clone, Debug)]
pub struct Row {
    /// Workgroup memory per workgroup, bytes.
    pub bytes: u32,
    /// Median GPU time of the dispatch, ms.
    pub ms: f64,
}

/// Times the probe at each size in `bytes` (median of `reps`), same invocations, chain length
/// and workgroup count for all. Needs TIMESTAMP_QUERY.
pub fn measure(
    gpu: &Gpu,
    bytes: &[u32],
    invocations: u32,
    iters: u32,
    groups: u32,
    reps: usize,
) -> Result<Vec<Row>> {
    let out = gpu.empty(
        &[groups as usize * invocations as usize],
        crate::gpu::DType::U32,
    )?;
    let mut rows = Vec::with_capacity(bytes.len());
    for &b in bytes {
        let probe = Probe {
            bytes: b,
            invocations,
            iters,
            groups,
        };
        // a warm-up run creates the pipeline and raises the clocks
        gpu.time_ms(1, |batch| probe.record(batch, &out))?;
        let mut t = gpu.time_ms(reps.max(1), |batch| probe.record(batch, &out))?;
        t.sort_by(f64::total_cmp);
        rows.push(Row {
            bytes: b,
            ms: t[t.len() / 2],
        });
    }
    Ok(rows)
}
