//! How much device memory there is, and how much is free, where wgpu lets us ask the driver.
//!
//! wgpu has no call for a device's memory size. On Vulkan (Windows, Linux, Android, FreeBSD) the
//! layer below it answers: [`device_memory`] reads the physical device's memory heaps through
//! wgpu's hal and, where the driver offers `VK_EXT_memory_budget` (wgpu enables it when it
//! exists), the budget this process may use and what it uses now. Elsewhere (Metal, DX12, GL,
//! WebGPU) the answer is `None` and callers fall back to failing at allocation, with the same
//! error type.

/// Device-local memory of `device`: `(free, total)` bytes, for the largest device-local heap.
///
/// `total` is the heap's size. `free` is the driver's budget for this process minus this
/// process's use of the heap, where the driver reports a budget (`VK_EXT_memory_budget`);
/// otherwise the heap size minus `in_use` (this device's own live allocations, from wgpu's
/// allocator report), which does not see other processes.
pub(crate) fn device_memory(device: &wgpu::Device, in_use: Option<u64>) -> Option<(u64, u64)> {
    #[cfg(any(
        windows,
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd"
    ))]
    {
        // SAFETY: the hal device is only borrowed for read-only queries of its physical device
        // (memory properties), which Vulkan allows at any time from any thread.
        let hal = unsafe { device.as_hal::<wgpu::hal::api::Vulkan>() }?;
        vulkan::memory(&hal, in_use)
    }
    #[cfg(not(any(
        windows,
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd"
    )))]
    {
        let _ = (device, in_use);
        None
    }
}

#[cfg(any(
    windows,
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd"
))]
mod vulkan {
    use ash::vk;

    /// The index of the largest device-local heap.
    fn main_heap(p: &vk::PhysicalDeviceMemoryProperties) -> Option<usize> {
        let n = (p.memory_heap_count as usize).min(p.memory_heaps.len());
        (0..n)
            .filter(|&i| {
                p.memory_heaps[i]
                    .flags
                    .contains(vk::MemoryHeapFlags::DEVICE_LOCAL)
            })
            .max_by_key(|&i| p.memory_heaps[i].size)
    }

    pub(super) fn memory(
        hal: &wgpu::hal::vulkan::Device,
        in_use: Option<u64>,
    ) -> Option<(u64, u64)> {
        let shared = hal.shared_instance();
        let instance = shared.raw_instance();
        let pd = hal.raw_physical_device();
        // the budget query is core Vulkan 1.1 (vkGetPhysicalDeviceMemoryProperties2)
        let budget_ext = hal
            .enabled_device_extensions()
            .contains(&ash::ext::memory_budget::NAME)
            && shared.instance_api_version() >= vk::API_VERSION_1_1;
        if budget_ext {
            let mut budget = vk::PhysicalDeviceMemoryBudgetPropertiesEXT::default();
            let mut props = vk::PhysicalDeviceMemoryProperties2::default().push_next(&mut budget);
            // SAFETY: `pd` is the device's physical device and `props` a valid output chain
            unsafe { instance.get_physical_device_memory_properties2(pd, &mut props) };
            let p = props.memory_properties;
            let i = main_heap(&p)?;
            let total = p.memory_heaps[i].size;
            let free = budget.heap_budget[i].saturating_sub(budget.heap_usage[i]);
            // a budget of 0 means the driver did not fill the structure in
            if budget.heap_budget[i] > 0 {
                return Some((free.min(total), total));
            }
            return Some((total.saturating_sub(in_use.unwrap_or(0)), total));
        }
        // SAFETY: as above
        let p = unsafe { instance.get_physical_device_memory_properties(pd) };
        let total = p.memory_heaps[main_heap(&p)?].size;
        Some((total.saturating_sub(in_use.unwrap_or(0)), total))
    }
}
