//! What the driver's compiler made of a kernel: registers, spills, shared memory, instruction
//! counts — where the driver reports them (`VK_KHR_pipeline_executable_properties`).
//!
//! wgpu has no such query, and a kernel's register count decides how many workgroups share a
//! multiprocessor, which is what most WGSL tuning turns on. On Vulkan this module opens a second,
//! private device on the adapter's physical device with that extension, translates each kernel
//! to SPIR-V with naga the way wgpu's Vulkan layer does (same SPIR-V version, workgroup memory
//! zeroed by the driver, runtime checks on or off) and asks the driver for the statistics of
//! the compiled pipeline. The numbers are the driver's own; their names differ per vendor.

use crate::{Error, Gpu, Result};

/// One statistic of a compiled kernel, as the driver names it.
#[derive(Clone, Debug)]
pub struct Statistic {
    /// The driver's name for it (e.g. "Register Count").
    pub name: String,
    /// Its value, formatted.
    pub value: String,
}

/// The statistics of one kernel variant.
#[derive(Clone, Debug)]
pub struct KernelStatistics {
    /// The variant's name.
    pub kernel: String,
    /// Every statistic of every executable the driver compiled it into.
    pub stats: Vec<Statistic>,
    /// The driver's internal representations of the compiled kernel (name, text), when asked
    /// for and offered (textual ones only; what a driver shows here varies: none, its IR, or
    /// the machine code).
    pub internal: Vec<(String, String)>,
}

/// Workgroups of `threads` invocations at `registers` per thread that fit one NVIDIA
/// multiprocessor by registers alone: 65 536 registers per SM, allocated per warp of 32 in
/// units of 256, at most 64 warps and 32 workgroups per SM. Those caps are the data-centre
/// parts' (V100, A100, H100/H200); consumer Turing, Ampere and Ada allow 32 or 48 warps, and
/// shared memory may allow fewer workgroups anywhere, so it is an upper bound.
pub fn nvidia_workgroups_by_registers(registers: u32, threads: u32) -> u32 {
    if threads == 0 {
        return 0;
    }
    let warps = threads.div_ceil(32);
    let per_warp = (registers.max(1) * 32).div_ceil(256) * 256;
    (65_536 / (per_warp * warps)).min(64 / warps).min(32)
}

impl std::fmt::Display for KernelStatistics {
    /// The kernel's name, then its statistics as `name=value` on one indented line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stats: Vec<String> = self
            .stats
            .iter()
            .map(|s| format!("{}={}", s.name, s.value))
            .collect();
        write!(f, "{}\n    {}", self.kernel, stats.join(" | "))
    }
}

impl Gpu {
    /// The driver's statistics for each `(name, wgsl)` kernel, compiled with runtime bounds
    /// checks on or off (`checked`), and with `internal`, the driver's textual internal
    /// representations. Vulkan only, and only where the driver offers
    /// `VK_KHR_pipeline_executable_properties`; elsewhere an `Unsupported` error says so.
    pub fn kernel_statistics(
        &self,
        kernels: &[(String, String)],
        checked: bool,
        internal: bool,
    ) -> Result<Vec<KernelStatistics>> {
        #[cfg(any(
            windows,
            target_os = "linux",
            target_os = "android",
            target_os = "freebsd"
        ))]
        {
            // SAFETY: the hal device is borrowed only for its instance and physical device
            // handles, which outlive it; the private device made from them is destroyed before
            // this returns.
            let hal = unsafe { self.device().as_hal::<wgpu::hal::api::Vulkan>() };
            let Some(hal) = hal else {
                return Err(self.stats_unsupported("Vulkan"));
            };
            vulkan::statistics(self, &hal, kernels, checked, internal)
        }
        #[cfg(not(any(
            windows,
            target_os = "linux",
            target_os = "android",
            target_os = "freebsd"
        )))]
        {
            let _ = (kernels, checked, internal);
            Err(self.stats_unsupported("Vulkan"))
        }
    }

    fn stats_unsupported(&self, feature: &'static str) -> Error {
        Error::Unsupported {
            adapter: self.caps().name.clone(),
            feature,
            what: "the driver's compiler statistics of a kernel (nabla info --kernel-stats)".into(),
        }
    }
}

#[cfg(any(
    windows,
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd"
))]
mod vulkan {
    use super::{KernelStatistics, Statistic};
    use crate::{Error, Gpu, Result};
    use ash::vk;
    use std::collections::BTreeMap;

    /// A private device with pipeline statistics, destroyed on drop.
    struct StatsDevice {
        device: ash::Device,
        exe: ash::khr::pipeline_executable_properties::Device,
    }

    impl Drop for StatsDevice {
        fn drop(&mut self) {
            // SAFETY: every object made on this device was destroyed by `compile`.
            unsafe { self.device.destroy_device(None) };
        }
    }

    pub(super) fn statistics(
        gpu: &Gpu,
        hal: &wgpu::hal::vulkan::Device,
        kernels: &[(String, String)],
        checked: bool,
        internal: bool,
    ) -> Result<Vec<KernelStatistics>> {
        let shared = hal.shared_instance();
        let instance = shared.raw_instance();
        let pd = hal.raw_physical_device();
        let api = shared.instance_api_version();
        // SAFETY: `pd` is a valid physical device of `instance`.
        let exts = unsafe { instance.enumerate_device_extension_properties(pd) }
            .map_err(|e| Error::Gpu(format!("vkEnumerateDeviceExtensionProperties: {e}")))?;
        let has = |name: &std::ffi::CStr| {
            exts.iter()
                .any(|e| e.extension_name_as_c_str().ok() == Some(name))
        };
        let exe_name = ash::khr::pipeline_executable_properties::NAME;
        if !has(exe_name) || api < vk::API_VERSION_1_2 {
            return Err(
                gpu.stats_unsupported("VK_KHR_pipeline_executable_properties on Vulkan 1.2+")
            );
        }
        let coop_name = ash::khr::cooperative_matrix::NAME;
        let mut names = vec![exe_name.as_ptr()];
        if has(coop_name) {
            names.push(coop_name.as_ptr());
        }
        // enable whatever the driver offers of the features naga's SPIR-V may use
        let mut f11 = vk::PhysicalDeviceVulkan11Features::default();
        let mut f12 = vk::PhysicalDeviceVulkan12Features::default();
        let mut f13 = vk::PhysicalDeviceVulkan13Features::default();
        let mut coop = vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default();
        let mut pexe = vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default();
        let mut f2 = vk::PhysicalDeviceFeatures2::default()
            .push_next(&mut f11)
            .push_next(&mut f12)
            .push_next(&mut pexe);
        if api >= vk::API_VERSION_1_3 {
            f2 = f2.push_next(&mut f13);
        }
        if has(coop_name) {
            f2 = f2.push_next(&mut coop);
        }
        // SAFETY: `f2` is a valid output chain of feature structures.
        unsafe { instance.get_physical_device_features2(pd, &mut f2) };
        let prio = [1.0f32];
        let queues = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(0)
            .queue_priorities(&prio)];
        let info = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queues)
            .enabled_extension_names(&names)
            .push_next(&mut f2);
        // SAFETY: the extensions and features enabled are those the driver reports.
        let device = unsafe { instance.create_device(pd, &info, None) }
            .map_err(|e| Error::Gpu(format!("vkCreateDevice for kernel statistics: {e}")))?;
        let exe = ash::khr::pipeline_executable_properties::Device::new(instance, &device);
        let dev = StatsDevice { device, exe };
        // SAFETY: `pd` is a valid physical device of `instance`.
        let nvidia = unsafe { instance.get_physical_device_properties(pd) }.vendor_id == 0x10de;
        let lang = if api >= vk::API_VERSION_1_3 {
            (1, 6)
        } else {
            (1, 5)
        };
        kernels
            .iter()
            .map(|(name, src)| {
                let (words, res, threads) = spirv(name, src, lang, checked)?;
                let (mut stats, internal) = compile(&dev, name, &words, &res, internal)?;
                let regs = stats
                    .iter()
                    .find(|s| s.name == "Register Count")
                    .and_then(|s| s.value.parse::<u32>().ok());
                let mut extra = vec![Statistic {
                    name: "Workgroup Invocations".into(),
                    value: threads.to_string(),
                }];
                if let (true, Some(r)) = (nvidia, regs) {
                    extra.push(Statistic {
                        name: "Workgroups per SM by registers (estimate)".into(),
                        value: super::nvidia_workgroups_by_registers(r, threads).to_string(),
                    });
                }
                stats.splice(0..0, extra);
                Ok(KernelStatistics {
                    kernel: name.clone(),
                    stats,
                    internal,
                })
            })
            .collect()
    }

    /// `(group, binding) -> uniform?` of a kernel's resources.
    type Resources = BTreeMap<(u32, u32), bool>;

    /// SPIR-V words, the resources and the workgroup size of a WGSL kernel, written with the
    /// options wgpu's Vulkan layer uses (driver-zeroed workgroup memory; bounds checks and loop
    /// bounding only when `checked`).
    fn spirv(
        name: &str,
        src: &str,
        lang: (u8, u8),
        checked: bool,
    ) -> Result<(Vec<u32>, Resources, u32)> {
        // kernels with element stubs as Gpu::pipeline_spirv builds them, the others as wgpu's
        // Vulkan layer does
        let raw = crate::gpu::spirv::has_stubs(src);
        let (module, words, _) = crate::gpu::spirv::write(src, lang, raw, checked)
            .map_err(|e| Error::Gpu(format!("{name}: {e}")))?;
        let mut res = Resources::new();
        for (_, g) in module.global_variables.iter() {
            if let Some(b) = &g.binding {
                let uniform = matches!(g.space, naga::AddressSpace::Uniform);
                res.insert((b.group, b.binding), uniform);
            }
        }
        let threads = module
            .entry_points
            .iter()
            .find(|e| e.name == "main")
            .map_or(0, |e| e.workgroup_size.iter().product());
        Ok((words, res, threads))
    }

    type Compiled = (Vec<Statistic>, Vec<(String, String)>);

    /// Compiles one kernel with statistics capture (and internal representations if
    /// `internal`) and reads them; destroys what it made.
    fn compile(
        dev: &StatsDevice,
        name: &str,
        words: &[u32],
        res: &Resources,
        internal: bool,
    ) -> Result<Compiled> {
        let d = &dev.device;
        let err = |what: &str, e: vk::Result| Error::Gpu(format!("{name}: {what}: {e}"));
        let groups = res.keys().map(|&(g, _)| g + 1).max().unwrap_or(0);
        let mut layouts = Vec::new();
        let mut out = Ok((Vec::new(), Vec::new()));
        for g in 0..groups {
            let bindings: Vec<_> = res
                .iter()
                .filter(|((gg, _), _)| *gg == g)
                .map(|(&(_, b), &uniform)| {
                    vk::DescriptorSetLayoutBinding::default()
                        .binding(b)
                        .descriptor_type(if uniform {
                            vk::DescriptorType::UNIFORM_BUFFER
                        } else {
                            vk::DescriptorType::STORAGE_BUFFER
                        })
                        .descriptor_count(1)
                        .stage_flags(vk::ShaderStageFlags::COMPUTE)
                })
                .collect();
            let info = vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings);
            // SAFETY: valid create info on a live device.
            match unsafe { d.create_descriptor_set_layout(&info, None) } {
                Ok(l) => layouts.push(l),
                Err(e) => {
                    out = Err(err("descriptor set layout", e));
                    break;
                }
            }
        }
        let mut layout = vk::PipelineLayout::null();
        let mut module = vk::ShaderModule::null();
        let mut pipeline = vk::Pipeline::null();
        if out.is_ok() {
            out = (|| {
                let info = vk::PipelineLayoutCreateInfo::default().set_layouts(&layouts);
                // SAFETY: the set layouts are live objects of this device.
                layout = unsafe { d.create_pipeline_layout(&info, None) }
                    .map_err(|e| err("pipeline layout", e))?;
                let info = vk::ShaderModuleCreateInfo::default().code(words);
                // SAFETY: `words` is SPIR-V written by naga for the features enabled.
                module = unsafe { d.create_shader_module(&info, None) }
                    .map_err(|e| err("shader module", e))?;
                let stage = vk::PipelineShaderStageCreateInfo::default()
                    .stage(vk::ShaderStageFlags::COMPUTE)
                    .module(module)
                    .name(c"main");
                let mut flags = vk::PipelineCreateFlags::CAPTURE_STATISTICS_KHR;
                if internal {
                    flags |= vk::PipelineCreateFlags::CAPTURE_INTERNAL_REPRESENTATIONS_KHR;
                }
                let info = vk::ComputePipelineCreateInfo::default()
                    .flags(flags)
                    .stage(stage)
                    .layout(layout);
                // SAFETY: module and layout are live and match.
                pipeline =
                    unsafe { d.create_compute_pipelines(vk::PipelineCache::null(), &[info], None) }
                        .map_err(|(_, e)| err("compute pipeline", e))?[0];
                let stats = read(dev, pipeline).map_err(|e| err("pipeline statistics", e))?;
                let reps = if internal {
                    representations(dev, pipeline)
                        .map_err(|e| err("internal representations", e))?
                } else {
                    Vec::new()
                };
                Ok((stats, reps))
            })();
        }
        // SAFETY: nothing uses these objects any more (null handles are ignored).
        unsafe {
            d.destroy_pipeline(pipeline, None);
            d.destroy_shader_module(module, None);
            d.destroy_pipeline_layout(layout, None);
            for l in layouts {
                d.destroy_descriptor_set_layout(l, None);
            }
        }
        out
    }

    fn read(
        dev: &StatsDevice,
        pipeline: vk::Pipeline,
    ) -> std::result::Result<Vec<Statistic>, vk::Result> {
        let info = vk::PipelineInfoKHR::default().pipeline(pipeline);
        // SAFETY: the pipeline was created with CAPTURE_STATISTICS on this device.
        let exes = unsafe { dev.exe.get_pipeline_executable_properties(&info) }?;
        let mut out = Vec::new();
        for i in 0..exes.len() as u32 {
            let info = vk::PipelineExecutableInfoKHR::default()
                .pipeline(pipeline)
                .executable_index(i);
            // SAFETY: as above; `i` < the executable count.
            for s in unsafe { dev.exe.get_pipeline_executable_statistics(&info) }? {
                let name = s
                    .name_as_c_str()
                    .map(|c| c.to_string_lossy().into_owned())
                    .unwrap_or_default();
                // SAFETY: the union member read is the one `format` names.
                let value = unsafe {
                    match s.format {
                        vk::PipelineExecutableStatisticFormatKHR::BOOL32 => {
                            (s.value.b32 != 0).to_string()
                        }
                        vk::PipelineExecutableStatisticFormatKHR::INT64 => s.value.i64.to_string(),
                        vk::PipelineExecutableStatisticFormatKHR::UINT64 => s.value.u64.to_string(),
                        vk::PipelineExecutableStatisticFormatKHR::FLOAT64 => {
                            format!("{:.3}", s.value.f64)
                        }
                        _ => "?".into(),
                    }
                };
                out.push(Statistic { name, value });
            }
        }
        Ok(out)
    }

    /// The textual internal representations of every executable of `pipeline`.
    fn representations(
        dev: &StatsDevice,
        pipeline: vk::Pipeline,
    ) -> std::result::Result<Vec<(String, String)>, vk::Result> {
        let info = vk::PipelineInfoKHR::default().pipeline(pipeline);
        // SAFETY: the pipeline was created with both capture flags on this device.
        let exes = unsafe { dev.exe.get_pipeline_executable_properties(&info) }?.len() as u32;
        let get = dev
            .exe
            .fp()
            .get_pipeline_executable_internal_representations_khr;
        let handle = dev.device.handle();
        let mut out = Vec::new();
        for i in 0..exes {
            let info = vk::PipelineExecutableInfoKHR::default()
                .pipeline(pipeline)
                .executable_index(i);
            let mut n = 0u32;
            // SAFETY: the two-call idiom: count, then sizes, then the data into buffers of
            // those sizes, each call with valid pointers.
            unsafe {
                get(handle, &info, &mut n, std::ptr::null_mut()).result()?;
                let mut reps =
                    vec![vk::PipelineExecutableInternalRepresentationKHR::default(); n as usize];
                get(handle, &info, &mut n, reps.as_mut_ptr()).result()?;
                let mut bufs: Vec<Vec<u8>> = reps.iter().map(|r| vec![0u8; r.data_size]).collect();
                for (r, b) in reps.iter_mut().zip(bufs.iter_mut()) {
                    r.p_data = b.as_mut_ptr().cast();
                }
                get(handle, &info, &mut n, reps.as_mut_ptr()).result()?;
                for (r, b) in reps.iter().zip(bufs) {
                    if r.is_text == 0 {
                        continue;
                    }
                    let name = r
                        .name_as_c_str()
                        .map(|c| c.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let text = String::from_utf8_lossy(&b)
                        .trim_end_matches('\0')
                        .to_string();
                    out.push((format!("executable {i}: {name}"), text));
                }
            }
        }
        Ok(out)
    }
}
