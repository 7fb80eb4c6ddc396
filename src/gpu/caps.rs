//! The capability record kernels consult to pick a variant.

use std::fmt;

/// One cooperative-matrix configuration the adapter offers (M×N×K, operand and accumulator types).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoopMatrixShape {
    /// Rows of A and C.
    pub m: u32,
    /// Columns of B and C.
    pub n: u32,
    /// Inner dimension.
    pub k: u32,
    /// Operand scalar type, e.g. `F16`.
    pub ab: String,
    /// Accumulator scalar type, e.g. `F32`.
    pub cr: String,
}

/// What the opened device offers. Filled from the adapter and the features actually enabled.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// Adapter name.
    pub name: String,
    /// Backend (Vulkan, Metal, Dx12, Gl).
    pub backend: String,
    /// Discrete, integrated, virtual or CPU.
    pub device_type: String,
    /// Driver name.
    pub driver: String,
    /// Driver version string.
    pub driver_info: String,
    /// `SHADER_F16`: f16 storage and arithmetic in shaders.
    pub f16: bool,
    /// `SHADER_I16`: 16-bit integers in shaders (the 16-byte f16 span loads, `shaders::h8`).
    pub int16: bool,
    /// `SUBGROUP` operations.
    pub subgroups: bool,
    /// Smallest subgroup size.
    pub subgroup_min: u32,
    /// Largest subgroup size.
    pub subgroup_max: u32,
    /// Timestamp queries (GPU timing in benchmarks).
    pub timestamps: bool,
    /// Cooperative-matrix (tensor core) shapes; empty when the feature is missing.
    pub coop_matrix: Vec<CoopMatrixShape>,
    /// Largest storage-buffer binding in bytes.
    pub max_storage_binding: u64,
    /// Largest buffer in bytes.
    pub max_buffer: u64,
    /// Workgroup memory per workgroup in bytes.
    pub max_workgroup_storage: u32,
    /// Invocations per workgroup.
    pub max_invocations: u32,
    /// Workgroups per dispatch dimension.
    pub max_workgroups_per_dim: u32,
    /// Storage buffers per shader stage.
    pub max_storage_buffers: u32,
    /// `PASSTHROUGH_SHADERS` on Vulkan: SPIR-V modules built here ([`crate::gpu::spirv`]).
    pub passthrough: bool,
}

impl Capabilities {
    pub(crate) fn read(adapter: &wgpu::Adapter, enabled: wgpu::Features) -> Capabilities {
        let info = adapter.get_info();
        let l = adapter.limits();
        let coop = if enabled.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            adapter
                .cooperative_matrix_properties()
                .into_iter()
                .map(|p| CoopMatrixShape {
                    m: p.m_size,
                    n: p.n_size,
                    k: p.k_size,
                    ab: format!("{:?}", p.ab_type),
                    cr: format!("{:?}", p.cr_type),
                })
                .collect()
        } else {
            Vec::new()
        };
        Capabilities {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
            f16: enabled.contains(wgpu::Features::SHADER_F16),
            int16: enabled.contains(wgpu::Features::SHADER_I16),
            subgroups: enabled.contains(wgpu::Features::SUBGROUP),
            subgroup_min: info.subgroup_min_size,
            subgroup_max: info.subgroup_max_size,
            timestamps: enabled.contains(wgpu::Features::TIMESTAMP_QUERY),
            coop_matrix: coop,
            max_storage_binding: l.max_storage_buffer_binding_size,
            max_buffer: l.max_buffer_size,
            max_workgroup_storage: l.max_compute_workgroup_storage_size,
            max_invocations: l.max_compute_invocations_per_workgroup,
            max_workgroups_per_dim: l.max_compute_workgroups_per_dimension,
            max_storage_buffers: l.max_storage_buffers_per_shader_stage,
            passthrough: enabled.contains(wgpu::Features::PASSTHROUGH_SHADERS)
                && info.backend == wgpu::Backend::Vulkan,
        }
    }

    /// The subgroup size the 16×16 cooperative kernels can be built for on this adapter
    /// (Vulkan, 16×16×16 f16→f32 matrices, one fixed subgroup size of 16, 32 or 64), or `None`.
    pub fn coop_subgroup(&self) -> Option<u32> {
        let sg = self.subgroup_min;
        (self.has_coop_f16_16()
            && self.backend == "Vulkan"
            && self.subgroups
            && sg == self.subgroup_max
            && matches!(sg, 16 | 32 | 64)
            && 4 * sg <= self.max_invocations)
            .then_some(sg)
    }

    /// Whether a 16×16×16 f16 → f32 cooperative matrix is available.
    pub fn has_coop_f16_16(&self) -> bool {
        self.coop_matrix
            .iter()
            .any(|c| c.m == 16 && c.n == 16 && c.k == 16 && c.ab == "F16" && c.cr == "F32")
    }
}

fn yn(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "adapter            {}", self.name)?;
        writeln!(
            f,
            "backend            {} ({})",
            self.backend, self.device_type
        )?;
        writeln!(f, "driver             {} {}", self.driver, self.driver_info)?;
        writeln!(f, "shader f16         {}", yn(self.f16))?;
        writeln!(f, "shader i16         {}", yn(self.int16))?;
        writeln!(
            f,
            "subgroups          {} (size {}..{})",
            yn(self.subgroups),
            self.subgroup_min,
            self.subgroup_max
        )?;
        writeln!(f, "timestamp queries  {}", yn(self.timestamps))?;
        writeln!(f, "SPIR-V passthrough {}", yn(self.passthrough))?;
        if self.coop_matrix.is_empty() {
            writeln!(f, "cooperative matrix no")?;
        } else {
            let shapes: Vec<String> = self
                .coop_matrix
                .iter()
                .map(|c| format!("{}x{}x{} {}->{}", c.m, c.n, c.k, c.ab, c.cr))
                .collect();
            writeln!(f, "cooperative matrix {}", shapes.join(", "))?;
        }
        writeln!(f, "max storage binding {} bytes", self.max_storage_binding)?;
        writeln!(f, "max buffer         {} bytes", self.max_buffer)?;
        writeln!(f, "workgroup memory   {} bytes", self.max_workgroup_storage)?;
        writeln!(f, "invocations/group  {}", self.max_invocations)?;
        writeln!(f, "workgroups/dim     {}", self.max_workgroups_per_dim)?;
        write!(
            f,
            "storage buffers    {} per stage",
            self.max_storage_buffers
        )
    }
}

/// A one-line description of an adapter, for listings.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    /// Adapter name.
    pub name: String,
    /// Backend.
    pub backend: String,
    /// Device type.
    pub device_type: String,
}
