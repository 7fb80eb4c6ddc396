//! Device and adapter choice, capabilities, tensors, pipelines, command batching and readback.
//!
//! [`Gpu`] owns the wgpu device. Kernels record their dispatches into a [`Batch`] (one compute
//! pass, one submission), so a whole pipeline such as mask estimation runs without readback.

pub mod bandwidth;
mod caps;
pub mod coop_layout;
mod memory;
pub mod occupancy;
pub mod spirv;
mod stats;
mod tensor;
pub mod tune;

pub use caps::{AdapterSummary, Capabilities, CoopMatrixShape};
pub use stats::{KernelStatistics, Statistic, nvidia_workgroups_by_registers};
pub use tensor::{DType, KOrder, Tensor};

use crate::error::{Error, Result};
use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use wgpu::util::DeviceExt;

/// The GPU context: device, queue, capabilities and caches of pipelines and per-shape data.
pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    caps: Capabilities,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    shape_cache: Mutex<HashMap<String, Arc<dyn Any + Send + Sync>>>,
    errors: Arc<Mutex<Vec<String>>>,
    /// Pipeline address → its cache key (the kernel's name in profiles).
    labels: Mutex<HashMap<usize, String>>,
    /// Per-kernel GPU time while profiling ([`Gpu::start_profile`]).
    profile: Mutex<Option<BTreeMap<String, KernelTime>>>,
    /// Tuned kernel configurations of this adapter ([`tune`]).
    tune: Mutex<tune::TuneCache>,
    /// Bytes written with `write_buffer` since its last wait ([`Gpu::write_buffer`]): staging
    /// copies are freed only once the GPU has run their submission and the device is polled.
    writes_since_wait: std::sync::atomic::AtomicU64,
}

/// `data` mapped through `f`, on all CPU cores (a Wan 14B checkpoint converts 14·10⁹ weights
/// to 16 bits on upload).
fn convert_par<T: Copy + Default + Send>(data: &[f32], f: impl Fn(f32) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::default(); data.len()];
    crate::par::for_chunks(&mut out, |first, part| {
        for (o, &x) in part.iter_mut().zip(&data[first..]) {
            *o = f(x);
        }
    });
    out
}

/// Bytes of `write_buffer` data after which [`Gpu::write_buffer`] submits and waits: wgpu keeps
/// each write's host staging copy until the next submission has run.
const WRITE_FLUSH_BYTES: u64 = 256 << 20;

/// Accumulated GPU time of one kernel variant in a profile.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelTime {
    /// Total milliseconds.
    pub ms: f64,
    /// Dispatches timed.
    pub count: usize,
}

/// Dispatches timed per batch while profiling (a DiT block records ~40; more go untimed).
const PROFILE_SLOTS: u32 = 2048;

/// The backends to search: `NABLA_BACKEND`, or `None` for "primary backends (Vulkan, Metal,
/// DX12) first, GL only when they find nothing".
fn backends_from_env() -> Result<Option<wgpu::Backends>> {
    match std::env::var("NABLA_BACKEND") {
        Err(_) => Ok(None),
        Ok(v) => match v.to_ascii_lowercase().as_str() {
            "" => Ok(None),
            "vulkan" => Ok(Some(wgpu::Backends::VULKAN)),
            "metal" => Ok(Some(wgpu::Backends::METAL)),
            "dx12" => Ok(Some(wgpu::Backends::DX12)),
            "gl" => Ok(Some(wgpu::Backends::GL)),
            _ => Err(Error::BadEnv {
                var: "NABLA_BACKEND",
                value: v,
                expected: "one of vulkan, metal, dx12, gl",
            }),
        },
    }
}

/// The features `NABLA_FEATURES_OFF` asks to leave off (a comma-separated list of `f16`, `i16`,
/// `subgroups`, `timestamps`, `coop`), so that the kernels a device without them would run can
/// be run and compared on one that has them. Without f16 there are no cooperative matrices
/// either (their operands are f16).
fn features_off_from_env() -> Result<wgpu::Features> {
    use wgpu::Features as F;
    let Ok(v) = std::env::var("NABLA_FEATURES_OFF") else {
        return Ok(F::empty());
    };
    let mut off = F::empty();
    for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        off |= match name.to_ascii_lowercase().as_str() {
            "f16" => F::SHADER_F16,
            "i16" => F::SHADER_I16,
            "subgroups" => F::SUBGROUP,
            "timestamps" => F::TIMESTAMP_QUERY | F::TIMESTAMP_QUERY_INSIDE_ENCODERS,
            "coop" => F::EXPERIMENTAL_COOPERATIVE_MATRIX,
            _ => {
                return Err(Error::BadEnv {
                    var: "NABLA_FEATURES_OFF",
                    value: v.clone(),
                    expected: "a comma-separated list of f16, i16, subgroups, timestamps, coop",
                });
            }
        };
    }
    Ok(off)
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

fn rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

/// All adapters visible with the `NABLA_BACKEND` filter, best first (discrete GPUs before
/// integrated, virtual and software ones). Without the filter, GL adapters are listed only
/// when no Vulkan, Metal or DX12 adapter exists.
pub fn enumerate_adapters() -> Result<Vec<wgpu::Adapter>> {
    let list = |b: wgpu::Backends| pollster::block_on(instance(b).enumerate_adapters(b));
    let mut adapters = match backends_from_env()? {
        Some(b) => list(b),
        None => {
            let primary = list(wgpu::Backends::PRIMARY);
            if primary.is_empty() {
                list(wgpu::Backends::GL)
            } else {
                primary
            }
        }
    };
    adapters.sort_by_key(|a| rank(a.get_info().device_type));
    Ok(adapters)
}

impl Gpu {
    /// Opens the best adapter, honouring `NABLA_BACKEND` (vulkan|metal|dx12|gl),
    /// `NABLA_ADAPTER` (a case-insensitive substring of the adapter name) and
    /// `NABLA_FEATURES_OFF`.
    pub fn new() -> Result<Gpu> {
        Gpu::new_without(wgpu::Features::empty())
    }

    /// [`Gpu::new`] with the features `off` left off as well (as `NABLA_FEATURES_OFF` does):
    /// the kernels a device without them runs, on one that has them (the fallback paths'
    /// tests). Only features the kernels use matter: f16 (with cooperative matrices), 16-bit
    /// integers, subgroups, timestamps, cooperative matrices.
    pub fn new_without(off: wgpu::Features) -> Result<Gpu> {
        let filter = std::env::var("NABLA_ADAPTER").unwrap_or_default();
        let adapters = enumerate_adapters()?;
        let wanted = filter.to_lowercase();
        let adapter = adapters
            .into_iter()
            .find(|a| wanted.is_empty() || a.get_info().name.to_lowercase().contains(&wanted));
        match adapter {
            Some(a) => Gpu::open(a, off),
            None => {
                let mut f = String::new();
                if let Ok(b) = std::env::var("NABLA_BACKEND") {
                    f += &format!(" with NABLA_BACKEND={b}");
                }
                if !filter.is_empty() {
                    f += &format!(
                        " matching NABLA_ADAPTER={filter:?} (`nabla info` lists the names)"
                    );
                }
                Err(Error::NoAdapter { filter: f })
            }
        }
    }

    /// Opens a device on the given adapter with the adapter's own limits and every feature the
    /// kernels can use (f16, 16-bit integers, subgroups, timestamps, cooperative matrices),
    /// less those `NABLA_FEATURES_OFF` names.
    pub fn from_adapter(adapter: wgpu::Adapter) -> Result<Gpu> {
        Gpu::open(adapter, wgpu::Features::empty())
    }

    fn open(adapter: wgpu::Adapter, off: wgpu::Features) -> Result<Gpu> {
        let info = adapter.get_info();
        let wanted = wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP
            | wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
            | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
            | wgpu::Features::SHADER_I16
            | wgpu::Features::PASSTHROUGH_SHADERS;
        let mut off = off | features_off_from_env()?;
        if off.contains(wgpu::Features::SHADER_F16) {
            // the cooperative kernels' operands are f16
            off |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let features = adapter.features() & wanted & !off;
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("nabla"),
            required_features: features,
            required_limits: limits,
            // SAFETY: experimental features are only used by kernels that the capability record
            // selects, and those are checked against the CPU reference by `nabla selftest`.
            experimental_features: if features
                .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
            {
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) =
            pollster::block_on(adapter.request_device(&desc)).map_err(|e| Error::Device {
                adapter: info.name.clone(),
                reason: e.to_string(),
            })?;
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let caps = Capabilities::read(&adapter, device.features());
        let adapter_key = format!(
            "{} | {} | {} {}",
            caps.name, caps.backend, caps.driver, caps.driver_info
        );
        Ok(Gpu {
            device,
            queue,
            caps,
            pipelines: Mutex::default(),
            shape_cache: Mutex::default(),
            labels: Mutex::default(),
            profile: Mutex::default(),
            errors,
            tune: Mutex::new(tune::TuneCache::new(tune::default_path(), adapter_key)),
            writes_since_wait: Default::default(),
        })
    }

    /// What this adapter offers; kernels consult it to pick a variant.
    pub fn caps(&self) -> &Capabilities {
        &self.caps
    }

    /// The wgpu device (for embedding applications that record their own work).
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Bytes of device memory held by live resources of this device (tensors, staging and
    /// uniform buffers), from wgpu's allocator report, or `None` where the backend writes no
    /// report (Vulkan and DX12 write one; Metal, GL and WebGPU do not).
    ///
    /// The figure is the report's `total_allocated_bytes`: the sum of the live allocations,
    /// sub-allocated or dedicated, each rounded up to the driver's size and alignment. Not
    /// `total_reserved_bytes`, the capacity of the memory blocks the allocator holds: that also
    /// counts the free parts of those blocks and moves in whole blocks (tens of MiB), and the
    /// allocator keeps one block per memory type even when it is empty (on lavapipe: 64 MiB
    /// reserved for 0.5 MiB allocated). Neither counts what the driver allocates for itself
    /// (pipelines, descriptor pools, the context).
    ///
    /// A dropped tensor is released once the GPU work that uses it has finished and the device
    /// has been polled; this call polls without waiting first, so what is released by then is
    /// not counted. (After a readback, which waits for all work, that is everything dropped.)
    pub fn memory_in_use(&self) -> Option<u64> {
        // a non-blocking poll only frees resources of finished work; an error here (a lost
        // device) leaves the report as it is, which is still the best answer
        let _ = self.device.poll(wgpu::PollType::Poll);
        self.device
            .generate_allocator_report()
            .map(|r| r.total_allocated_bytes)
    }

    /// Device-local memory: `(free, total)` bytes, where the driver tells (Vulkan: the largest
    /// device-local heap, and the driver's budget for this process where it has
    /// `VK_EXT_memory_budget`, else the heap minus [`Gpu::memory_in_use`]); `None` on other
    /// backends. The Wan DiT checks its weights and its workspace against `free` before
    /// allocating them.
    pub fn memory_info(&self) -> Option<(u64, u64)> {
        memory::device_memory(&self.device, self.memory_in_use())
    }

    /// The tuned configuration stored under `key` for this adapter ([`tune`]), if any.
    pub fn tuned(&self, key: &str) -> Option<serde_json::Value> {
        self.tune.lock().ok()?.get(key)
    }

    /// Stores a tuned configuration for this adapter (memory and the cache file).
    pub fn store_tuned(&self, key: &str, value: serde_json::Value) {
        if let Ok(mut t) = self.tune.lock() {
            t.put(key, value);
        }
    }

    /// The tuning cache's file (if kept in one) and its last problem (if any).
    pub fn tune_cache_status(&self) -> (Option<PathBuf>, Option<String>) {
        match self.tune.lock() {
            Ok(t) => (t.path().cloned(), t.status().map(str::to_string)),
            Err(_) => (None, Some("tuning cache lock poisoned".into())),
        }
    }

    /// Returns the first GPU error raised since the last check (validation, out of memory).
    pub fn check(&self) -> Result<()> {
        let mut errs = self
            .errors
            .lock()
            .map_err(|_| Error::Gpu("error sink poisoned".into()))?;
        if errs.is_empty() {
            Ok(())
        } else {
            let msg = errs.join("; ");
            errs.clear();
            Err(Error::Gpu(msg))
        }
    }

    /// Fails with a clear error when `bytes` exceed the device's storage-binding limit.
    pub fn check_binding(&self, what: &str, bytes: u64) -> Result<()> {
        let limit = self.caps.max_storage_binding;
        if bytes > limit {
            return Err(Error::TooLarge {
                what: what.to_string(),
                bytes,
                limit,
                adapter: self.caps.name.clone(),
            });
        }
        Ok(())
    }

    /// A compute pipeline from WGSL source, created once per `key` and cached.
    /// `checked = false` turns runtime bounds checks off: only for kernels whose every index
    /// the dispatcher validated.
    pub(crate) fn pipeline(
        &self,
        key: &str,
        source: &str,
        checked: bool,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(p) = self.cached_pipeline(key) {
            return Ok(p);
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(key),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        };
        let module = if checked {
            self.device.create_shader_module(desc)
        } else {
            // SAFETY: the dispatcher of every unchecked kernel validates all indices before dispatch.
            unsafe {
                self.device
                    .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
            }
        };
        self.finish_pipeline(key, scope, None, &module)
    }

    /// The pipeline created under `key`, if any.
    fn cached_pipeline(&self, key: &str) -> Option<Arc<wgpu::ComputePipeline>> {
        self.pipelines.lock().ok().and_then(|m| m.get(key).cloned())
    }

    /// The pipeline of `module`'s `main` (its bind group layout from `layout`, or derived from
    /// the module), the validation errors of `scope` (opened before the module was created)
    /// turned into an error, and the pipeline cached under `key`.
    fn finish_pipeline(
        &self,
        key: &str,
        scope: wgpu::ErrorScopeGuard,
        layout: Option<&wgpu::PipelineLayout>,
        module: &wgpu::ShaderModule,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key),
                layout,
                module,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions::default(),
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!("pipeline {key}: {e}")));
        }
        let p = Arc::new(pipeline);
        if let Ok(mut m) = self.pipelines.lock() {
            m.insert(key.to_string(), p.clone());
        }
        if let Ok(mut m) = self.labels.lock() {
            m.insert(Arc::as_ptr(&p) as usize, key.to_string());
        }
        Ok(p)
    }

    /// A compute pipeline from WGSL that may read and write single elements of cooperative
    /// matrices ([`spirv`]): compiled by naga here, its element stubs rewritten, and handed to
    /// the driver as SPIR-V (needs [`Capabilities::passthrough`]). Created once per `key`.
    pub(crate) fn pipeline_spirv(
        &self,
        key: &str,
        source: &str,
        checked: bool,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(p) = self.cached_pipeline(key) {
            return Ok(p);
        }
        if !self.caps.passthrough {
            return Err(Error::Unsupported {
                adapter: self.caps.name.clone(),
                feature: "PASSTHROUGH_SHADERS",
                what: format!("the SPIR-V kernel {key}"),
            });
        }
        let c = spirv::compile(source, checked)
            .map_err(|e| Error::Gpu(format!("pipeline {key}: {e}")))?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let bgl = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(key),
                entries: &c.entries,
            });
        let layout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(key),
                bind_group_layouts: &[Some(&bgl)],
                immediate_size: 0,
            });
        // SAFETY: the words are naga's own output for a validated module, changed only where a
        // stub call became the composite instruction it stands for (same types and operands);
        // kernels built this way are selected only after `coop_layout` measured the element
        // order on this device, and `nabla selftest` checks them against the CPU reference.
        let module = unsafe {
            self.device
                .create_shader_module_passthrough(wgpu::ShaderModuleDescriptorPassthrough {
                    label: Some(key),
                    entry_points: std::borrow::Cow::Owned(vec![
                        wgpu::PassthroughShaderEntryPoint {
                            name: "main".into(),
                            workgroup_size: (1, 1, 1),
                        },
                    ]),
                    spirv: Some(std::borrow::Cow::Owned(c.words)),
                    ..Default::default()
                })
        };
        self.finish_pipeline(key, scope, Some(&layout), &module)
    }

    /// Per-shape data (STA masks, full lists) computed once and kept.
    pub(crate) fn cached<T: Any + Send + Sync>(
        &self,
        key: &str,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<Arc<T>> {
        if let Some(v) = self
            .shape_cache
            .lock()
            .ok()
            .and_then(|m| m.get(key).cloned())
            && let Ok(t) = v.downcast::<T>()
        {
            return Ok(t);
        }
        let t = Arc::new(make()?);
        if let Ok(mut m) = self.shape_cache.lock() {
            m.insert(key.to_string(), t.clone());
        }
        Ok(t)
    }

    /// Allocates an uninitialised tensor.
    pub fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = Tensor::byte_len(shape, dtype);
        if bytes > self.caps.max_buffer {
            return Err(Error::TooLarge {
                what: format!("{shape:?} {dtype:?}"),
                bytes,
                limit: self.caps.max_buffer,
                adapter: self.caps.name.clone(),
            });
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes.max(4),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!(
                "out of GPU memory allocating {bytes} bytes for a {shape:?} tensor: {e}"
            )));
        }
        Ok(Tensor::new(Arc::new(buffer), shape.to_vec(), dtype))
    }

    /// Uploads raw bytes (already in `dtype`'s layout) into a new tensor.
    pub fn upload_bytes(&self, bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Tensor> {
        let need = Tensor::byte_len(shape, dtype);
        let mut padded;
        let data = if (bytes.len() as u64) == need {
            bytes
        } else if (bytes.len() as u64) < need && need - (bytes.len() as u64) < 4 {
            padded = bytes.to_vec();
            padded.resize(need as usize, 0);
            &padded[..]
        } else {
            return Err(Error::shape(format!(
                "{} bytes given for a {shape:?} {dtype:?} tensor of {need} bytes",
                bytes.len()
            )));
        };
        let t = self.empty(shape, dtype)?;
        if !data.is_empty() {
            self.write_buffer(&t.buffer, 0, data)?;
        }
        Ok(t)
    }

    /// `queue.write_buffer`, bounding the host memory it holds: wgpu keeps a staging copy of
    /// every write until the next submission, so a model uploaded tensor by tensor (29 GB of
    /// Wan 14B weights) would hold a second copy of all of it in host memory. After every
    /// [`WRITE_FLUSH_BYTES`] written this submits and waits, which releases those copies.
    pub(crate) fn write_buffer(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        use std::sync::atomic::Ordering;
        self.queue.write_buffer(buffer, offset, data);
        let pending = self
            .writes_since_wait
            .fetch_add(data.len() as u64, Ordering::Relaxed)
            + data.len() as u64;
        if pending >= WRITE_FLUSH_BYTES {
            self.writes_since_wait.store(0, Ordering::Relaxed);
            self.queue.submit([]);
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| Error::Gpu(format!("waiting for uploads: {e}")))?;
        }
        Ok(())
    }

    /// Uploads f32 data.
    pub fn upload_f32(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        self.upload_bytes(bytemuck::cast_slice(data), shape, DType::F32)
    }

    /// Uploads f32 data converted to f16 storage.
    pub fn upload_f16(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        let h = convert_par(data, half::f16::from_f32);
        self.upload_bytes(bytemuck::cast_slice(&h), shape, DType::F16)
    }

    /// Uploads a linear layer's weight `[N, K]` as f16 (round to nearest even) with each row's
    /// runs of 32 in [`KOrder::Frag32`] order, for the tensor-core linear kernel that builds its
    /// B fragments from storage ([`crate::ops::linear::frag_weights_usable`] says when it runs).
    /// The products are those of [`Gpu::upload_f16`]'s weights: that kernel rounds every weight
    /// to f16 when staging it anyway. K must be a multiple of 32.
    pub fn upload_f16_frag(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        self.upload_frag(data, shape, half::f16::from_f32)
    }

    /// [`Gpu::upload_f16_frag`] of the weights rounded to bf16 first (nearest even): the values
    /// [`Gpu::upload_bf16`] stores, as the tensor-core kernel stages them (bf16 to f16 is exact
    /// in f16's normal range; smaller magnitudes round to f16 subnormals, larger ones overflow,
    /// in the kernel's staging as here).
    pub fn upload_bf16_frag(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        self.upload_frag(data, shape, |v| {
            half::f16::from_f32(half::bf16::from_f32(v).to_f32())
        })
    }

    fn upload_frag(
        &self,
        data: &[f32],
        shape: &[usize],
        f: impl Fn(f32) -> half::f16 + Sync,
    ) -> Result<Tensor> {
        if !matches!(shape, [n, k] if k % 32 == 0 && n * k == data.len()) {
            return Err(Error::shape(format!(
                "a weight in fragment order must be [N, K] with K a multiple of 32 and N·K \
                 values, got shape {shape:?} with {} values",
                data.len()
            )));
        }
        // position j of a run of 32 holds element src[j]
        let mut src = [0usize; 32];
        for kk in 0..32 {
            src[crate::ops::linear::frag_position(kk)] = kk;
        }
        let mut p = vec![half::f16::ZERO; data.len()];
        crate::par::for_chunks(&mut p, |first, part| {
            for (i, o) in part.iter_mut().enumerate() {
                let e = first + i;
                *o = f(data[e - e % 32 + src[e % 32]]);
            }
        });
        Ok(self
            .upload_bytes(bytemuck::cast_slice(&p), shape, DType::F16)?
            .with_k_order(KOrder::Frag32))
    }

    /// Uploads f32 data converted to bf16 storage (round to nearest even).
    pub fn upload_bf16(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        let h = convert_par(data, half::bf16::from_f32);
        self.upload_bytes(bytemuck::cast_slice(&h), shape, DType::BF16)
    }

    /// Uploads u32 data.
    pub fn upload_u32(&self, data: &[u32], shape: &[usize]) -> Result<Tensor> {
        self.upload_bytes(bytemuck::cast_slice(data), shape, DType::U32)
    }

    /// Fills a tensor with a 32-bit pattern (NaN poisoning in tests: `0x7fc0_0000`).
    pub fn fill_u32(&self, t: &Tensor, pattern: u32) {
        let words = (t.buffer.size() / 4) as usize;
        let data = vec![pattern; words];
        // (a failed wait surfaces at the next submission or readback)
        let _ = self.write_buffer(&t.buffer, 0, bytemuck::cast_slice(&data));
    }

    /// Reads a tensor back as raw bytes (waits for all submitted work).
    pub fn read_bytes(&self, t: &Tensor) -> Result<Vec<u8>> {
        let size = t.logical_bytes().div_ceil(4).max(1) * 4;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&t.buffer, t.offset(), &staging, 0, size);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(e.to_string()))?;
        rx.recv()
            .map_err(|e| Error::Gpu(e.to_string()))?
            .map_err(|e| Error::Gpu(format!("readback failed: {e}")))?;
        self.check()?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Gpu(e.to_string()))?;
        let mut out = view.to_vec();
        drop(view);
        staging.unmap();
        out.truncate(t.logical_bytes() as usize);
        Ok(out)
    }

    /// Reads an f32 tensor (f16 tensors are widened).
    pub fn read_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        let b = self.read_bytes(t)?;
        Ok(match t.dtype() {
            DType::F32 => bytemuck::pod_collect_to_vec(&b),
            DType::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(&b)
                .iter()
                .map(|h| h.to_f32())
                .collect(),
            DType::BF16 => bytemuck::pod_collect_to_vec::<u8, half::bf16>(&b)
                .iter()
                .map(|h| h.to_f32())
                .collect(),
            DType::U32 => {
                return Err(Error::shape("read_f32 called on a u32 tensor"));
            }
        })
    }

    /// Reads a u32 tensor.
    pub fn read_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        if t.dtype() != DType::U32 {
            return Err(Error::shape("read_u32 called on a float tensor"));
        }
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(t)?))
    }

    /// Starts recording a batch of dispatches.
    pub fn batch(&self) -> Batch<'_> {
        Batch::new(self, None)
    }

    /// Runs `record` `reps` times inside timestamped batches and returns the GPU time of each
    /// run in milliseconds. Needs TIMESTAMP_QUERY.
    pub fn time_ms(
        &self,
        reps: usize,
        record: impl FnMut(&mut Batch<'_>) -> Result<()>,
    ) -> Result<Vec<f64>> {
        self.time_ms_inner(reps, 1, record)
    }

    /// Like [`Gpu::time_ms`], but each timed batch records `inner` back-to-back copies of the
    /// work and the time per copy is returned: short kernels then run with the GPU busy (no
    /// idle gap, no clock drop between copies), as they do inside a model.
    pub fn time_ms_inner(
        &self,
        reps: usize,
        inner: usize,
        mut record: impl FnMut(&mut Batch<'_>) -> Result<()>,
    ) -> Result<Vec<f64>> {
        let inner = inner.max(1);
        if !self.caps.timestamps {
            return Err(Error::Unsupported {
                adapter: self.caps.name.clone(),
                feature: "TIMESTAMP_QUERY",
                what: "GPU timing".into(),
            });
        }
        let qs = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("timing"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let ts = Tensor::new(
            Arc::new(self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamps-copy"),
                size: 16,
                usage: wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })),
            vec![4],
            DType::U32,
        );
        let period = self.queue.get_timestamp_period() as f64;
        let mut out = Vec::with_capacity(reps);
        for _ in 0..reps {
            let mut b = Batch::new(self, Some(&qs));
            for _ in 0..inner {
                record(&mut b)?;
            }
            let mut enc = b.finish();
            enc.resolve_query_set(&qs, 0..2, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, &ts.buffer, 0, 16);
            self.queue.submit([enc.finish()]);
            let v = self.read_u32(&ts)?;
            let t0 = v[0] as u64 | ((v[1] as u64) << 32);
            let t1 = v[2] as u64 | ((v[3] as u64) << 32);
            out.push(t1.saturating_sub(t0) as f64 * period / 1e6 / inner as f64);
        }
        Ok(out)
    }
}

impl Gpu {
    /// Starts a per-kernel profile: from now on every batch puts each dispatch in a pass of its
    /// own with timestamps, and waits for the GPU at submit to collect them (slower than a
    /// normal run: for breakdowns, not for headline timings). Needs TIMESTAMP_QUERY.
    pub fn start_profile(&self) -> Result<()> {
        if !self.caps.timestamps {
            return Err(Error::Unsupported {
                adapter: self.caps.name.clone(),
                feature: "TIMESTAMP_QUERY",
                what: "a per-kernel profile".into(),
            });
        }
        *self
            .profile
            .lock()
            .map_err(|_| Error::Gpu("profile lock poisoned".into()))? = Some(BTreeMap::new());
        Ok(())
    }

    /// Ends the profile and returns the GPU time per kernel variant (pipeline name); dispatches
    /// beyond the per-batch slots are counted under `(untimed)` with zero time.
    pub fn stop_profile(&self) -> BTreeMap<String, KernelTime> {
        self.profile
            .lock()
            .ok()
            .and_then(|mut p| p.take())
            .unwrap_or_default()
    }

    fn profiling(&self) -> bool {
        self.profile.lock().is_ok_and(|p| p.is_some())
    }

    fn label(&self, pipeline: &wgpu::ComputePipeline) -> String {
        self.labels
            .lock()
            .ok()
            .and_then(|m| m.get(&(pipeline as *const _ as usize)).cloned())
            .unwrap_or_else(|| "(unnamed)".into())
    }
}

/// Per-dispatch timestamps of a profiled batch.
struct BatchProfile {
    qs: wgpu::QuerySet,
    labels: Vec<String>,
}

/// `NABLA_CHECKED=1` keeps runtime bounds checks on in kernels that otherwise skip them
/// (those whose dispatcher validated every index): for testing the checked variants.
pub fn checked_override() -> bool {
    std::env::var("NABLA_CHECKED").is_ok_and(|v| v == "1")
}

/// Splits a count of workgroups into a 2-D dispatch within the per-dimension limit; shaders
/// recover the linear index as `wid.x + wid.y * num_workgroups.x` (and skip ids past the count).
pub(crate) fn groups_2d(groups: usize, max: u32) -> [u32; 3] {
    let x = groups.min(max as usize).max(1);
    [x as u32, groups.div_ceil(x) as u32, 1]
}

/// A batch of dispatches recorded into one compute pass and submitted together.
pub struct Batch<'g> {
    gpu: &'g Gpu,
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    prof: Option<BatchProfile>,
}

impl<'g> Batch<'g> {
    fn new(gpu: &'g Gpu, timing: Option<&wgpu::QuerySet>) -> Self {
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        let pass = encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("nabla"),
                timestamp_writes: timing.map(|qs| wgpu::ComputePassTimestampWrites {
                    query_set: qs,
                    beginning_of_pass_write_index: Some(0),
                    end_of_pass_write_index: Some(1),
                }),
            })
            .forget_lifetime();
        let prof = (timing.is_none() && gpu.profiling()).then(|| BatchProfile {
            qs: gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * PROFILE_SLOTS,
            }),
            labels: Vec::new(),
        });
        Batch {
            gpu,
            encoder: Some(encoder),
            pass: Some(pass),
            prof,
        }
    }

    /// While profiling: ends the current pass and opens one whose timestamps time the next
    /// dispatch (labelled), or returns false when the slots are used up.
    fn profiled_pass(&mut self, pipeline: &wgpu::ComputePipeline) -> bool {
        let label = match &self.prof {
            Some(p) if (p.labels.len() as u32) < PROFILE_SLOTS => self.gpu.label(pipeline),
            Some(_) => {
                if let Ok(mut m) = self.gpu.profile.lock()
                    && let Some(m) = m.as_mut()
                {
                    m.entry("(untimed)".into()).or_default().count += 1;
                }
                return false;
            }
            None => return false,
        };
        let Some(prof) = self.prof.as_mut() else {
            return false;
        };
        let i = prof.labels.len() as u32;
        prof.labels.push(label);
        drop(self.pass.take());
        if let Some(enc) = self.encoder.as_mut() {
            let pass = enc
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("nabla-profiled"),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &prof.qs,
                        beginning_of_pass_write_index: Some(2 * i),
                        end_of_pass_write_index: Some(2 * i + 1),
                    }),
                })
                .forget_lifetime();
            self.pass = Some(pass);
        }
        true
    }

    /// The GPU this batch records for.
    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    /// Records one dispatch: `params` goes to binding 0 as a uniform (skipped when empty),
    /// `buffers` to the following bindings in order.
    pub(crate) fn dispatch(
        &mut self,
        pipeline: &wgpu::ComputePipeline,
        params: &[u8],
        buffers: &[&Tensor],
        groups: [u32; 3],
    ) -> Result<()> {
        let max = self.gpu.caps.max_workgroups_per_dim;
        if groups.iter().any(|&g| g > max) {
            return Err(Error::shape(format!(
                "dispatch of {groups:?} workgroups exceeds this device's limit of {max} per dimension"
            )));
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let layout = pipeline.get_bind_group_layout(0);
        let uniform;
        let mut entries = Vec::with_capacity(buffers.len() + 1);
        let mut binding = 0;
        if !params.is_empty() {
            let mut p = params.to_vec();
            p.resize(p.len().div_ceil(16) * 16, 0);
            uniform = self
                .gpu
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("params"),
                    contents: &p,
                    usage: wgpu::BufferUsages::UNIFORM,
                });
            entries.push(wgpu::BindGroupEntry {
                binding,
                resource: uniform.as_entire_binding(),
            });
            binding += 1;
        }
        let align = self.gpu.device.limits().min_storage_buffer_offset_alignment as u64;
        for b in buffers {
            let resource = if b.offset() == 0
                && b.logical_bytes().div_ceil(4) * 4 == b.buffer.size()
            {
                b.buffer.as_entire_binding()
            } else {
                if b.offset() % align != 0 {
                    return Err(Error::shape(format!(
                        "a tensor view starts at byte {} of its buffer; this device binds ranges only at multiples of {align} bytes",
                        b.offset()
                    )));
                }
                wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &b.buffer,
                    offset: b.offset(),
                    size: std::num::NonZeroU64::new(b.logical_bytes().div_ceil(4) * 4),
                })
            };
            entries.push(wgpu::BindGroupEntry { binding, resource });
            binding += 1;
        }
        let bg = self
            .gpu
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &layout,
                entries: &entries,
            });
        self.profiled_pass(pipeline);
        let pass = self
            .pass
            .as_mut()
            .ok_or_else(|| Error::Gpu("batch already finished".into()))?;
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        Ok(())
    }

    fn finish(mut self) -> wgpu::CommandEncoder {
        drop(self.pass.take());
        self.encoder.take().expect("encoder present until finish")
    }

    /// Submits the recorded work (does not wait, except while profiling) and reports any GPU
    /// error raised so far.
    pub fn submit(mut self) -> Result<()> {
        let gpu = self.gpu;
        let prof = self.prof.take();
        let mut enc = self.finish();
        let Some(prof) = prof.filter(|p| !p.labels.is_empty()) else {
            gpu.queue.submit([enc.finish()]);
            return gpu.check();
        };
        let n = 2 * prof.labels.len() as u32;
        let bytes = n as u64 * 8;
        let resolve = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile-resolve"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let ts = Tensor::new(
            Arc::new(gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile-copy"),
                size: bytes,
                usage: wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })),
            vec![2 * n as usize],
            DType::U32,
        );
        enc.resolve_query_set(&prof.qs, 0..n, &resolve, 0);
        enc.copy_buffer_to_buffer(&resolve, 0, &ts.buffer, 0, bytes);
        gpu.queue.submit([enc.finish()]);
        let v = gpu.read_u32(&ts)?;
        let period = gpu.queue.get_timestamp_period() as f64;
        if let Ok(mut m) = gpu.profile.lock()
            && let Some(m) = m.as_mut()
        {
            for (i, label) in prof.labels.into_iter().enumerate() {
                let t0 = v[4 * i] as u64 | ((v[4 * i + 1] as u64) << 32);
                let t1 = v[4 * i + 2] as u64 | ((v[4 * i + 3] as u64) << 32);
                let e = m.entry(label).or_default();
                e.ms += t1.saturating_sub(t0) as f64 * period / 1e6;
                e.count += 1;
            }
        }
        gpu.check()
    }
}
