//! The GPU backend: every primitive of [`crate::backend::Storage`] as a WGSL compute shader run
//! through `wgpu` (Vulkan, Metal, DX12).
//!
//! - [`GpuDevice`] (cheap to clone, an `Arc` inside) owns the wgpu adapter, device and queue,
//!   the pipeline cache (each kernel compiled once), the buffer pool and the open batch.
//! - Execution is recorded, not run: each op appends a compute pass to the open command
//!   encoder; the encoder is submitted every [`BATCH_PASSES`] passes and at sync points
//!   (`to_cpu`, [`GpuDevice::synchronize`]). Reading back is the only thing that waits.
//! - Every kernel takes binding 0 = `params`, a small read-only `array<u32>` with its scalars and
//!   layout records (`shaders/common.wgsl`), so one pipeline serves every shape and stride.
//! - Buffers come from a pool with size classes (4 per power of two, so at most 25% slack); live
//!   and peak bytes are counted ([`GpuDevice::memory_stats`]).
//! - f32 is the compute type. F16/BF16/U32/I32 are stored as packed bits and can be uploaded,
//!   downloaded, copied and cast; F64 is not supported on the GPU.
//!
//! One launcher file per shader family sits beside this one.
//!
//! Environment: `TINYTUNE_DEVICE` (`auto`, `cpu`, `gpu`, `gpu-software`) names the device for
//! [`crate::backend::Device::from_env`]; `TINYTUNE_MATMUL` (`tiled`, `registers`) overrides the
//! matmul kernel a new device starts with.

mod attention;
mod binary;
pub(crate) use attention::MAX_HEAD_DIM as ATTENTION_MAX_HEAD_DIM;
mod copy;
mod dequant;
mod gated;
mod index;
mod lora;
mod matmul;
pub use matmul::MatmulKernel;
mod norm;
mod optim;
mod rand;
mod reduce;
mod rope;
mod softmax;
mod unary;
mod xent;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::cpu::CpuStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;

/// Compute passes recorded before the encoder is submitted.
const BATCH_PASSES: usize = 64;
/// Smallest pool size class in bytes.
const MIN_CLASS: u64 = 256;
/// Free buffers kept for reuse, at most (bytes); beyond this, freed buffers are destroyed.
const POOL_CAP: u64 = 1 << 30;

/// Which kind of adapter to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdapterKind {
    /// A real GPU (discrete, integrated or virtual).
    Hardware,
    /// A CPU implementation of the API (lavapipe / llvmpipe / WARP).
    Software,
}

/// Memory held by a GPU device, in bytes, and how the pool served it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes of the buffers tensors hold now (rounded up to the pool's size classes).
    pub live_bytes: u64,
    /// The most `live_bytes` has been since the device was made (or since `reset_peak`).
    pub peak_bytes: u64,
    /// Bytes of freed buffers kept by the pool for reuse.
    pub pooled_bytes: u64,
    /// Buffers created on the device.
    pub allocations: u64,
    /// Requests served from the pool without a new buffer.
    pub reuses: u64,
    /// Compute dispatches recorded.
    pub dispatches: u64,
    /// Command buffers submitted.
    pub submits: u64,
    /// Bytes uploaded from the host.
    pub bytes_uploaded: u64,
    /// Bytes read back to the host.
    pub bytes_downloaded: u64,
}

/// Dispatches and bytes per kernel entry point, for traffic reports.
///
/// `bytes_read` / `bytes_written` are what the shader's loads and stores request from storage
/// buffers as written, re-reads across workgroups included (each launcher states the count;
/// a cache serves most re-reads). `unique_read` / `unique_written` count each buffer a launch
/// binds once, by the bytes it was allocated for — what a launch would move through DRAM if
/// every re-read hit a cache — and never more than the requested bytes. A launch that reads
/// only part of a buffer (a view) is charged the whole buffer up to that cap, so for views the
/// unique bytes are an upper estimate. Compare the unique bytes with an analytic floor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelCount {
    pub dispatches: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub unique_read: u64,
    pub unique_written: u64,
}

/// The bytes one launch reads and writes (see [`KernelCount`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Traffic {
    pub read: u64,
    pub written: u64,
}

impl Traffic {
    pub fn bytes(read: usize, written: usize) -> Traffic {
        Traffic { read: read as u64, written: written as u64 }
    }
    /// Counts of 4-byte elements.
    pub fn words(read: usize, written: usize) -> Traffic {
        Traffic::bytes(4 * read, 4 * written)
    }
}

#[derive(Default)]
struct Pool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    stats: MemoryStats,
}

struct Batch {
    encoder: Option<wgpu::CommandEncoder>,
    passes: usize,
}

/// Access of a kernel binding after `params`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Access {
    Read,
    Write,
}

/// A compute entry point of one shader family, and its bindings after `params` (binding
/// number, access), in the order the launcher passes the buffers.
pub(crate) struct Kernel {
    /// Family name (the file `shaders/<shader>.wgsl`).
    pub shader: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
    pub access: &'static [(u32, Access)],
}

struct Ctx {
    adapter_info: wgpu::AdapterInfo,
    features: wgpu::Features,
    limits: wgpu::Limits,
    device: wgpu::Device,
    queue: wgpu::Queue,
    /// Keyed by (family, entry, weight format code or [`NO_WEIGHT`]).
    pipelines: Mutex<HashMap<(&'static str, &'static str, u32), Arc<wgpu::ComputePipeline>>>,
    pool: Mutex<Pool>,
    batch: Mutex<Batch>,
    counts: Mutex<HashMap<&'static str, KernelCount>>,
    lost: Arc<AtomicBool>,
    lost_reason: Arc<Mutex<String>>,
    api_error: Arc<Mutex<Option<String>>>,
    /// 0 = tiled, 1 = registers (see [`MatmulKernel`]).
    matmul_kernel: std::sync::atomic::AtomicU8,
    id: u64,
}

/// A GPU: adapter, device, queue, pipeline cache, buffer pool. Clones share everything.
#[derive(Clone)]
pub struct GpuDevice(Arc<Ctx>);

impl PartialEq for GpuDevice {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for GpuDevice {}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuDevice({}, {:?}, {:?})", self.0.adapter_info.name, self.0.adapter_info.backend, self.0.adapter_info.device_type)
    }
}

impl std::fmt::Display for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gpu:{} ({}, {:?})", self.0.id, self.0.adapter_info.name, self.0.adapter_info.backend)
    }
}

static NEXT_DEVICE: AtomicU64 = AtomicU64::new(0);

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    // No GL: built without it, and not asked for, so a missing Vulkan driver is an error.
    desc.backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    wgpu::Instance::new(desc)
}

fn rank_hardware(t: wgpu::DeviceType) -> Option<u8> {
    match t {
        wgpu::DeviceType::DiscreteGpu => Some(0),
        wgpu::DeviceType::IntegratedGpu => Some(1),
        wgpu::DeviceType::VirtualGpu => Some(2),
        wgpu::DeviceType::Other => Some(3),
        wgpu::DeviceType::Cpu => None,
    }
}

impl GpuDevice {
    /// Open a new device on an adapter of `kind` (not shared; see [`GpuDevice::shared`]).
    pub fn new(kind: AdapterKind) -> Result<GpuDevice> {
        let inst = instance();
        let adapters = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()));
        let found: Vec<String> = adapters
            .iter()
            .map(|a| format!("{} ({:?}, {:?})", a.get_info().name, a.get_info().backend, a.get_info().device_type))
            .collect();
        let pick = match kind {
            AdapterKind::Hardware => adapters
                .into_iter()
                .filter_map(|a| rank_hardware(a.get_info().device_type).map(|r| (r, a)))
                .min_by_key(|(r, _)| *r)
                .map(|(_, a)| a),
            AdapterKind::Software => adapters.into_iter().find(|a| a.get_info().device_type == wgpu::DeviceType::Cpu),
        };
        let adapter = pick.ok_or_else(|| {
            let hint = if found.is_empty() {
                " (no Vulkan/Metal/DX12 driver; a software Vulkan driver is Debian's mesa-vulkan-drivers)"
            } else {
                ""
            };
            Error::NoAdapter(format!(
                "no {} adapter among [{}]{hint}",
                if kind == AdapterKind::Hardware { "hardware" } else { "software" },
                found.join(", ")
            ))
        })?;
        let info = adapter.get_info();
        let wanted = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::SUBGROUP_BARRIER;
        let features = adapter.features() & wanted;
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("tinytune"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) =
            pollster::block_on(adapter.request_device(&desc)).map_err(|e| Error::Gpu(format!("request_device on {}: {e}", info.name)))?;
        let lost = Arc::new(AtomicBool::new(false));
        let lost_reason = Arc::new(Mutex::new(String::new()));
        {
            let (lost, reason) = (lost.clone(), lost_reason.clone());
            device.set_device_lost_callback(move |r, msg| {
                *reason.lock().unwrap_or_else(|e| e.into_inner()) = format!("{r:?}: {msg}");
                lost.store(true, Ordering::SeqCst);
            });
        }
        let api_error = Arc::new(Mutex::new(None));
        {
            let slot = api_error.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
                if s.is_none() {
                    *s = Some(e.to_string());
                }
            }));
        }
        let id = NEXT_DEVICE.fetch_add(1, Ordering::Relaxed);
        crate::say!(
            "tinytune: gpu:{id} = {} ({:?}, {:?}, driver {} {}); shader-f16: {}, subgroups: {}",
            info.name,
            info.backend,
            info.device_type,
            info.driver,
            info.driver_info,
            features.contains(wgpu::Features::SHADER_F16),
            features.contains(wgpu::Features::SUBGROUP)
        );
        Ok(GpuDevice(Arc::new(Ctx {
            adapter_info: info.clone(),
            features,
            limits,
            device,
            queue,
            pipelines: Mutex::new(HashMap::new()),
            pool: Mutex::new(Pool::default()),
            batch: Mutex::new(Batch { encoder: None, passes: 0 }),
            counts: Mutex::new(HashMap::new()),
            lost,
            lost_reason,
            api_error,
            matmul_kernel: std::sync::atomic::AtomicU8::new(match std::env::var("TINYTUNE_MATMUL").as_deref() {
                Ok("registers") => 1,
                Ok("tiled") => 0,
                _ => (info.device_type == wgpu::DeviceType::Cpu) as u8,
            }),
            id,
        })))
    }

    /// The process-wide device of `kind`, opened on first use (so every `Device::gpu()` is
    /// the same device and tensors made through it can meet in one op).
    pub fn shared(kind: AdapterKind) -> Result<GpuDevice> {
        static HW: OnceLock<std::result::Result<GpuDevice, String>> = OnceLock::new();
        static SW: OnceLock<std::result::Result<GpuDevice, String>> = OnceLock::new();
        let cell = if kind == AdapterKind::Hardware { &HW } else { &SW };
        let opened = cell.get_or_init(|| {
            GpuDevice::new(kind).map_err(|e| match e {
                Error::NoAdapter(m) => m,
                e => e.to_string(),
            })
        });
        opened.clone().map_err(Error::NoAdapter)
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.0.adapter_info
    }

    pub fn features(&self) -> wgpu::Features {
        self.0.features
    }

    pub fn limits(&self) -> &wgpu::Limits {
        &self.0.limits
    }

    /// Whether the adapter is a software implementation (lavapipe, llvmpipe, WARP).
    pub fn is_software(&self) -> bool {
        self.0.adapter_info.device_type == wgpu::DeviceType::Cpu
    }

    /// The matmul kernel this device runs (default: registers on software adapters, tiled
    /// on GPUs, or `TINYTUNE_MATMUL`).
    pub fn matmul_kernel(&self) -> MatmulKernel {
        if self.0.matmul_kernel.load(Ordering::Relaxed) == 1 {
            MatmulKernel::Registers
        } else {
            MatmulKernel::Tiled
        }
    }

    pub fn set_matmul_kernel(&self, k: MatmulKernel) {
        self.0.matmul_kernel.store((k == MatmulKernel::Registers) as u8, Ordering::Relaxed);
    }

    pub fn memory_stats(&self) -> MemoryStats {
        self.0.pool.lock().expect("pool lock").stats
    }

    /// Start counting the peak from the current live bytes.
    pub fn reset_peak(&self) {
        let mut p = self.0.pool.lock().expect("pool lock");
        p.stats.peak_bytes = p.stats.live_bytes;
    }

    /// Destroy the pooled free buffers (live tensors are untouched).
    pub fn empty_cache(&self) {
        let mut p = self.0.pool.lock().expect("pool lock");
        p.free.clear();
        p.stats.pooled_bytes = 0;
    }

    /// Dispatches and bound bytes per kernel entry point since the device was made.
    pub fn kernel_counts(&self) -> Vec<(&'static str, KernelCount)> {
        let mut v: Vec<_> = self.0.counts.lock().expect("counts lock").iter().map(|(k, c)| (*k, *c)).collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// Submit everything recorded and wait for the GPU to finish it.
    pub fn synchronize(&self) -> Result<()> {
        self.flush()?;
        self.0.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::Gpu(format!("poll: {e}")))?;
        self.check()
    }

    /// Destroy the device (for tests of the device-lost path): every later op is an error.
    pub fn destroy(&self) {
        self.0.device.destroy();
        // Make the loss visible at once, whether or not the callback has run yet.
        *self.0.lost_reason.lock().unwrap_or_else(|e| e.into_inner()) = "destroyed".into();
        self.0.lost.store(true, Ordering::SeqCst);
    }

    fn dev_name(&self) -> String {
        self.to_string()
    }

    /// An error when the device is lost or the API reported an error since the last check.
    fn check(&self) -> Result<()> {
        if self.0.lost.load(Ordering::SeqCst) {
            return Err(Error::DeviceLost(format!(
                "{}: {}",
                self.dev_name(),
                self.0.lost_reason.lock().unwrap_or_else(|e| e.into_inner())
            )));
        }
        if let Some(msg) = self.0.api_error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(Error::Gpu(msg));
        }
        Ok(())
    }

    /// Submit the open encoder, if any.
    fn flush(&self) -> Result<()> {
        {
            // Submit while holding the batch lock: a thread that finds no open encoder must be
            // able to rely on everything recorded before being submitted already (a readback
            // maps its staging buffer, an upload queues a write, right after flushing).
            let mut b = self.0.batch.lock().expect("batch lock");
            b.passes = 0;
            if let Some(enc) = b.encoder.take() {
                self.0.queue.submit([enc.finish()]);
                self.0.pool.lock().expect("pool lock").stats.submits += 1;
            }
        }
        self.check()
    }

    // ----- buffers ------------------------------------------------------------------------

    /// Largest buffer a kernel can bind.
    fn max_binding(&self) -> u64 {
        self.0.limits.max_storage_buffer_binding_size.min(self.0.limits.max_buffer_size)
    }

    fn class_of(&self, bytes: u64) -> u64 {
        let b = bytes.max(MIN_CLASS);
        let step = 1u64 << (63 - b.leading_zeros()).saturating_sub(2);
        let class = b.div_ceil(step) * step;
        if class > self.max_binding() {
            b.div_ceil(4) * 4
        } else {
            class
        }
    }

    /// A storage buffer of at least `bytes` bytes, from the pool when one of its class is free.
    fn alloc(&self, bytes: u64, what: &'static str) -> Result<Arc<GpuBuffer>> {
        self.check()?;
        let limit = self.max_binding();
        if bytes > limit {
            return Err(Error::GpuAllocation {
                what,
                bytes,
                msg: format!(
                    "larger than the device's limit of {limit} bytes per buffer (max_storage_buffer_binding_size {}, max_buffer_size {}) on {}",
                    self.0.limits.max_storage_buffer_binding_size,
                    self.0.limits.max_buffer_size,
                    self.dev_name()
                ),
            });
        }
        let class = self.class_of(bytes);
        let reused = {
            let mut p = self.0.pool.lock().expect("pool lock");
            let b = p.free.get_mut(&class).and_then(|v| v.pop());
            if b.is_some() {
                p.stats.pooled_bytes -= class;
                p.stats.reuses += 1;
            }
            b
        };
        let buffer = match reused {
            Some(b) => b,
            None => {
                let create = || {
                    let scope = self.0.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
                    let b = self.0.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some(what),
                        size: class,
                        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    });
                    pollster::block_on(scope.pop()).map_or(Ok(b), Err)
                };
                let b = match create() {
                    Ok(b) => b,
                    Err(_) => {
                        // Out of memory: give the pooled free buffers back, let the device
                        // finish (and free) what it holds, and try once more.
                        self.empty_cache();
                        self.synchronize()?;
                        create().map_err(|e| Error::GpuAllocation { what, bytes: class, msg: e.to_string() })?
                    }
                };
                self.0.pool.lock().expect("pool lock").stats.allocations += 1;
                b
            }
        };
        let mut p = self.0.pool.lock().expect("pool lock");
        p.stats.live_bytes += class;
        p.stats.peak_bytes = p.stats.peak_bytes.max(p.stats.live_bytes);
        Ok(Arc::new(GpuBuffer { buffer: Some(buffer), class, len: bytes, dev: Some(self.clone()) }))
    }

    fn release(&self, buffer: wgpu::Buffer, class: u64) {
        let mut p = self.0.pool.lock().expect("pool lock");
        p.stats.live_bytes -= class;
        // Over the cap the buffer is dropped, not destroyed: recorded work may still use it,
        // and wgpu frees it once that work is done.
        if p.stats.pooled_bytes + class <= POOL_CAP && !self.0.lost.load(Ordering::SeqCst) {
            p.stats.pooled_bytes += class;
            p.free.entry(class).or_default().push(buffer);
        }
    }

    /// Write host bytes at the start of `buf`. Recorded work that may still read the buffer's
    /// previous contents (a pooled buffer) is submitted first: queue writes run before the
    /// command buffers of the next submission.
    fn upload(&self, buf: &GpuBuffer, bytes: &[u8]) -> Result<()> {
        self.flush()?;
        if bytes.len() % 4 == 0 {
            self.0.queue.write_buffer(buf.raw(), 0, bytes);
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4) * 4, 0);
            self.0.queue.write_buffer(buf.raw(), 0, &padded);
        }
        self.0.pool.lock().expect("pool lock").stats.bytes_uploaded += bytes.len() as u64;
        Ok(())
    }

    /// Read `len` bytes starting at byte `offset` (a multiple of 4) of `buf`: a sync point.
    fn download(&self, buf: &GpuBuffer, offset: u64, len: u64) -> Result<Vec<u8>> {
        let size = len.div_ceil(4) * 4;
        if size == 0 {
            return Ok(Vec::new());
        }
        let staging = self.0.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.with_encoder(|enc| enc.copy_buffer_to_buffer(buf.raw(), offset, &staging, 0, size))?;
        self.flush()?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        // Another thread's poll may be the one that runs our callback, a moment after our own
        // poll returned: wait for it, polling again, and give up (an error, not a hang) when
        // the device is lost or nothing arrives for a minute.
        let start = std::time::Instant::now();
        loop {
            self.0.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::Gpu(format!("poll: {e}")))?;
            self.check()?;
            match rx.recv_timeout(std::time::Duration::from_millis(2)) {
                Ok(Ok(())) => break,
                Ok(Err(e)) => return Err(Error::Gpu(format!("map_async: {e}"))),
                Err(_) if start.elapsed() > std::time::Duration::from_secs(60) => {
                    return Err(Error::Gpu("readback did not complete within 60 s".into()))
                }
                Err(_) => {}
            }
        }
        let out = {
            let view = staging.get_mapped_range(..).map_err(|e| Error::Gpu(format!("get_mapped_range: {e}")))?;
            view[..len as usize].to_vec()
        };
        staging.unmap();
        self.0.pool.lock().expect("pool lock").stats.bytes_downloaded += len;
        Ok(out)
    }

    fn with_encoder<R>(&self, f: impl FnOnce(&mut wgpu::CommandEncoder) -> R) -> Result<R> {
        self.check()?;
        let (r, full) = {
            let mut b = self.0.batch.lock().expect("batch lock");
            let enc = b
                .encoder
                .get_or_insert_with(|| self.0.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("tinytune") }));
            let r = f(enc);
            b.passes += 1;
            (r, b.passes >= BATCH_PASSES)
        };
        if full {
            self.flush()?;
        }
        Ok(r)
    }

    // ----- kernels ------------------------------------------------------------------------

    /// The pipeline of `k`; for a product kernel (`w_format` not [`NO_WEIGHT`]) built with
    /// `shaders/weights.wgsl` and `const W_FORMAT` set to the weight's format, so each format
    /// compiles to its own decoder (built the first time that format is used).
    fn pipeline(&self, k: &Kernel, w_format: u32) -> Result<Arc<wgpu::ComputePipeline>> {
        let key = (k.shader, k.entry, w_format);
        if let Some(p) = self.0.pipelines.lock().expect("pipeline lock").get(&key) {
            return Ok(p.clone());
        }
        let dev = &self.0.device;
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let common = include_str!("../../../shaders/common.wgsl");
        let source = if w_format == NO_WEIGHT {
            format!("{common}\n{}", k.source)
        } else {
            format!("{common}\nconst W_FORMAT: u32 = {w_format}u;\n{}\n{}", include_str!("../../../shaders/weights.wgsl"), k.source)
        };
        let module = dev
            .create_shader_module(wgpu::ShaderModuleDescriptor { label: Some(k.shader), source: wgpu::ShaderSource::Wgsl(source.into()) });
        let entry = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let mut entries = vec![entry(0, true)];
        entries.extend(k.access.iter().map(|&(b, a)| entry(b, a == Access::Read)));
        let bgl = dev.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(k.entry), entries: &entries });
        let layout = dev.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(k.entry),
            bind_group_layouts: &[Some(&bgl)],
            immediate_size: 0,
        });
        let pipeline = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(k.entry),
            layout: Some(&layout),
            module: &module,
            entry_point: Some(k.entry),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!("compiling {}.wgsl / {}: {e}", k.shader, k.entry)));
        }
        let p = Arc::new(pipeline);
        self.0.pipelines.lock().expect("pipeline lock").insert(key, p.clone());
        Ok(p)
    }

    /// Record one dispatch of `k` with `params` and the buffers for bindings 1.. .
    pub(crate) fn launch(&self, k: &Kernel, params: &Params, buffers: &[&GpuBuffer], groups: [u32; 3], traffic: Traffic) -> Result<()> {
        self.launch_weights(k, NO_WEIGHT, params, buffers, groups, traffic)
    }

    /// [`GpuDevice::launch`] of a kernel that reads a weight operand through `load_w`
    /// (`shaders/weights.wgsl`) in format `w_format` ([`weight_format`]).
    pub(crate) fn launch_weights(
        &self,
        k: &Kernel,
        w_format: u32,
        params: &Params,
        buffers: &[&GpuBuffer],
        groups: [u32; 3],
        traffic: Traffic,
    ) -> Result<()> {
        debug_assert_eq!(buffers.len(), k.access.len(), "{}: binding count", k.entry);
        if groups.contains(&0) {
            return Ok(());
        }
        let maxg = self.0.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > maxg) {
            return Err(Error::Unsupported {
                op: k.entry,
                device: self.dev_name(),
                msg: format!("launch of {groups:?} workgroups exceeds the limit {maxg} per dimension"),
            });
        }
        let pipeline = self.pipeline(k, w_format)?;
        let pbuf = self.temp_buffer(&params.0, "params")?;
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: pbuf.raw().as_entire_binding() }];
        entries.extend(
            buffers.iter().zip(k.access).map(|(b, &(binding, _))| wgpu::BindGroupEntry { binding, resource: b.raw().as_entire_binding() }),
        );
        let bg = self.0.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(k.entry),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        {
            // Each distinct buffer once per access (an absent optional operand is bound to
            // another operand's buffer as a placeholder; it is not read twice).
            let (mut read, mut written) = (0u64, 0u64);
            for (i, (b, &(_, access))) in buffers.iter().zip(k.access).enumerate() {
                let seen = buffers[..i].iter().zip(k.access).any(|(o, &(_, a))| a == access && std::ptr::eq(*o, *b));
                if !seen {
                    *if access == Access::Read { &mut read } else { &mut written } += b.len;
                }
            }
            let mut counts = self.0.counts.lock().expect("counts lock");
            let c = counts.entry(k.entry).or_default();
            c.dispatches += 1;
            c.bytes_read += traffic.read;
            c.bytes_written += traffic.written;
            c.unique_read += read.min(traffic.read);
            c.unique_written += written.min(traffic.written);
        }
        self.0.pool.lock().expect("pool lock").stats.dispatches += 1;
        self.with_encoder(|enc| {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(k.entry), timestamp_writes: None });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        })
    }

    /// A transient read-only storage buffer holding `words`, filled at creation (so, unlike a
    /// queue write, it is ordered with the recorded work without a flush). Not pooled.
    pub(crate) fn temp_buffer(&self, words: &[u32], what: &'static str) -> Result<GpuBuffer> {
        let bytes = (words.len().max(1) * 4) as u64;
        if bytes > self.max_binding() {
            return Err(Error::GpuAllocation {
                what,
                bytes,
                msg: format!("larger than the device's limit of {} bytes per buffer", self.max_binding()),
            });
        }
        let buf = self.0.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(what),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: true,
        });
        {
            let mut view = buf.get_mapped_range_mut(..).map_err(|e| Error::Gpu(format!("{what} map: {e}")))?;
            let data: &[u32] = if words.is_empty() { &[0] } else { words };
            view.copy_from_slice(bytemuck::cast_slice(data));
        }
        buf.unmap();
        Ok(GpuBuffer { buffer: Some(buf), class: bytes, len: 4 * words.len() as u64, dev: None })
    }

    /// Workgroup counts for `n` workgroups of a 1-d launch spread over x and y.
    pub(crate) fn groups_1d(&self, n: usize) -> [u32; 3] {
        if n == 0 {
            return [0, 1, 1];
        }
        let x = n.min(self.0.limits.max_compute_workgroups_per_dimension as usize).min(65535);
        [x as u32, n.div_ceil(x) as u32, 1]
    }

    fn unsupported(&self, op: &'static str, msg: impl Into<String>) -> Error {
        Error::Unsupported { op, device: self.dev_name(), msg: msg.into() }
    }
}

/// A pooled device buffer; returned to the pool when the last handle drops.
pub(crate) struct GpuBuffer {
    buffer: Option<wgpu::Buffer>,
    class: u64,
    /// The bytes asked for (the pool rounds them up to `class`).
    len: u64,
    /// The pool to return to; `None` for a transient buffer (dropped, not pooled).
    dev: Option<GpuDevice>,
}

impl GpuBuffer {
    fn raw(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("buffer present until drop")
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if let (Some(b), Some(dev)) = (self.buffer.take(), &self.dev) {
            dev.release(b, self.class);
        }
    }
}

/// The `params` words of one launch: scalars and layout records (see `shaders/common.wgsl`).
#[derive(Default)]
pub(crate) struct Params(Vec<u32>);

impl Params {
    /// Scalars first, in the order the shader reads them.
    pub fn new(scalars: &[u32]) -> Params {
        Params(scalars.to_vec())
    }
    /// Append a layout record and return its position, to be stored in a scalar slot.
    ///
    /// The record is coalesced first: size-1 axes are dropped and neighbouring axes that are
    /// contiguous relative to each other are merged, which keeps the map from a row-major
    /// element index to a storage index and shortens the shader's loop (a contiguous tensor
    /// becomes one axis of stride 1, a transposed matrix stays two).
    pub fn layout(&mut self, l: &Layout) -> Result<u32> {
        let mut dims: Vec<(usize, usize)> = Vec::with_capacity(l.rank());
        for (&d, &s) in l.shape().iter().zip(l.strides()) {
            if d == 1 {
                continue;
            }
            match dims.last_mut() {
                Some(last) if last.1 == s * d => *last = (last.0 * d, s),
                _ => dims.push((d, s)),
            }
        }
        let pos = self.0.len() as u32;
        self.0.push(dims.len() as u32);
        self.0.push(u32_of(l.offset())?);
        for &(d, _) in &dims {
            self.0.push(u32_of(d)?);
        }
        for &(_, s) in &dims {
            self.0.push(u32_of(s)?);
        }
        Ok(pos)
    }
    /// Set scalar slot `i` (reserved by `new`).
    pub fn set(&mut self, i: usize, v: u32) {
        self.0[i] = v;
    }
}

fn u32_of(v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Unsupported { op: "gpu", device: "gpu".into(), msg: format!("index {v} does not fit in 32 bits") })
}

/// f32 as params word.
pub(crate) fn fbits(v: f64) -> u32 {
    (v as f32).to_bits()
}

/// A flat buffer on a GPU: dtype, element count, the pooled buffer, and for index dtypes
/// uploaded from the host a host copy (so index ops validate their indices without a readback).
pub struct GpuStorage {
    dev: GpuDevice,
    buf: Arc<GpuBuffer>,
    dtype: DType,
    /// Elements (a quantised matrix: rows × cols).
    len: usize,
    /// Bytes of the buffer in use (a quantised matrix: its words of [`QMatrix::to_gpu_words`]).
    ///
    /// [`QMatrix::to_gpu_words`]: crate::quant::QMatrix::to_gpu_words
    bytes: usize,
    host: Option<Arc<CpuStorage>>,
}

impl std::fmt::Debug for GpuStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuStorage({:?}, {} elements on {})", self.dtype, self.len, self.dev)
    }
}

/// The pipeline key of a kernel that reads no weight operand.
const NO_WEIGHT: u32 = u32::MAX;

/// The `W_FORMAT` code of a weight operand of the product kernels (`shaders/weights.wgsl`):
/// 0 f32, 1 f16, 2 bf16, or a quantised format's code ([`crate::quant::QFormat::gpu_code`]).
pub(crate) fn weight_format(d: DType) -> Option<u32> {
    match d {
        DType::F32 => Some(0),
        DType::F16 => Some(1),
        DType::BF16 => Some(2),
        DType::Quant(f) => Some(f.gpu_code()),
        _ => None,
    }
}

/// Bytes of `n` elements of a weight in dtype `d` (quantised: the blocks' share, rounded up).
pub(crate) fn weight_bytes(d: DType, n: usize) -> usize {
    match d.quant_format() {
        Some(crate::quant::QFormat::Ggml(t)) => (n * t.type_size()).div_ceil(t.block_size()),
        Some(crate::quant::QFormat::Nf4) => n.div_ceil(2) + n / 64,
        Some(crate::quant::QFormat::Int8) => n,
        None => n * d.size_in_bytes(),
    }
}

/// Dtype codes shared with the shaders (`copy.wgsl`).
pub(crate) fn dtype_code(d: DType) -> u32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::U32 => 3,
        DType::I32 => 4,
        DType::F64 => 5,
        DType::Quant(_) => unreachable!("quantised storage never reaches the GPU (GpuStorage::alloc)"),
    }
}

impl GpuStorage {
    pub fn device(&self) -> &GpuDevice {
        &self.dev
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn buffer(&self) -> &GpuBuffer {
        &self.buf
    }

    /// A fresh uninitialised buffer of `n` elements.
    pub(crate) fn alloc(dev: &GpuDevice, dtype: DType, n: usize, what: &'static str) -> Result<GpuStorage> {
        if dtype == DType::F64 {
            return Err(dev.unsupported(what, "f64 has no GPU kernels (use f32; f64 is the CPU reference type)"));
        }
        if let DType::Quant(f) = dtype {
            return Err(dev.unsupported(
                what,
                &format!("a {f} buffer is only made from a whole quantised matrix (Tensor::quantize, Tensor::from_qmatrix)"),
            ));
        }
        let bytes = n * dtype.size_in_bytes();
        Ok(GpuStorage { dev: dev.clone(), buf: dev.alloc((bytes as u64).max(4), what)?, dtype, len: n, bytes, host: None })
    }

    /// Bytes the buffer holds (a quantised matrix: its blocks, side data and header).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A quantised matrix uploaded as stored (its words of `QMatrix::to_gpu_words`, which
    /// the product kernels and `dequant.wgsl` decode through `shaders/weights.wgsl`).
    fn from_qmatrix(dev: &GpuDevice, q: &crate::quant::QMatrix) -> Result<GpuStorage> {
        let words = q.to_gpu_words();
        let bytes = 4 * words.len();
        let buf = dev.alloc(bytes as u64, "upload")?;
        dev.upload(&buf, bytemuck::cast_slice(&words))?;
        Ok(GpuStorage { dev: dev.clone(), buf, dtype: DType::Quant(q.format()), len: q.rows() * q.cols(), bytes, host: None })
    }

    /// The quantised matrix this storage holds, read back (a sync point).
    fn to_qmatrix(&self) -> Result<crate::quant::QMatrix> {
        let bytes = self.dev.download(&self.buf, 0, self.bytes as u64)?;
        crate::quant::QMatrix::from_gpu_words(&bytemuck::pod_collect_to_vec::<u8, u32>(&bytes))
            .map_err(|msg| Error::Gpu(format!("reading back a {:?} weight: {msg}", self.dtype)))
    }

    /// An error unless `dtype` is f32 (the GPU compute type).
    pub(crate) fn need_f32(&self, op: &'static str) -> Result<()> {
        match self.dtype {
            DType::F32 => Ok(()),
            DType::F64 => Err(self.dev.unsupported(op, "f64 has no GPU kernels")),
            d => Err(Error::DType { op, expected: "f32 (GPU compute type)", got: d }),
        }
    }

    pub fn full(dev: &GpuDevice, dtype: DType, n: usize, v: f64) -> Result<GpuStorage> {
        let out = GpuStorage::alloc(dev, dtype, n, "full")?;
        copy::fill(&out, v)?;
        Ok(out)
    }

    pub fn from_cpu(dev: &GpuDevice, data: &CpuStorage) -> Result<GpuStorage> {
        if let CpuStorage::Quant(q) = data {
            return GpuStorage::from_qmatrix(dev, q);
        }
        let mut out = GpuStorage::alloc(dev, data.dtype(), data.len(), "upload")?;
        let bytes: &[u8] = match data {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::U32(v) => bytemuck::cast_slice(v),
            CpuStorage::I32(v) => bytemuck::cast_slice(v),
            CpuStorage::F64(_) | CpuStorage::Quant(_) => unreachable!("rejected by alloc"),
        };
        if !bytes.is_empty() {
            dev.upload(&out.buf, bytes)?;
        }
        if data.dtype().is_int() {
            out.host = Some(Arc::new(data.clone()));
        }
        Ok(out)
    }

    /// The elements of `layout`, contiguous, on the host.
    pub fn to_cpu(&self, layout: &Layout) -> Result<CpuStorage> {
        // Index tensors uploaded from the host keep their host copy (storages are immutable):
        // reading them back is not a sync point.
        if let Some(h) = &self.host {
            return h.copy_strided(layout);
        }
        if self.dtype.is_quant() {
            // Whole matrices only, as on the CPU (a view of part is refused there by name).
            return CpuStorage::Quant(Arc::new(self.to_qmatrix()?)).copy_strided(layout);
        }
        let n = layout.numel();
        let esz = self.dtype.size_in_bytes();
        let aligned = layout.is_contiguous() && (layout.offset() * esz) % 4 == 0;
        let bytes = if n == 0 {
            Vec::new()
        } else if aligned {
            self.dev.download(&self.buf, (layout.offset() * esz) as u64, (n * esz) as u64)?
        } else {
            let c = copy::cast(self, layout, self.dtype)?;
            self.dev.download(&c.buf, 0, (n * esz) as u64)?
        };
        Ok(match self.dtype {
            DType::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec(&bytes)),
            DType::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec(&bytes)),
            DType::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec(&bytes)),
            DType::U32 => CpuStorage::U32(bytemuck::pod_collect_to_vec(&bytes)),
            DType::I32 => CpuStorage::I32(bytemuck::pod_collect_to_vec(&bytes)),
            DType::F64 | DType::Quant(_) => unreachable!("no f64 or quantised storage on the GPU"),
        })
    }

    /// The index values selected by `layout` as i64, from the host copy when there is one
    /// (else a readback, a sync point).
    pub(crate) fn index_values(&self, layout: &Layout, op: &'static str) -> Result<Vec<i64>> {
        let host;
        let src = match &self.host {
            Some(h) => h.as_ref(),
            None => {
                host = self.to_cpu(layout)?;
                return Ok(match &host {
                    CpuStorage::U32(v) => v.iter().map(|&x| x as i64).collect(),
                    CpuStorage::I32(v) => v.iter().map(|&x| x as i64).collect(),
                    o => return Err(Error::DType { op, expected: "u32 or i32 indices", got: o.dtype() }),
                });
            }
        };
        Ok(match src {
            CpuStorage::U32(v) => layout.offsets().map(|o| v[o] as i64).collect(),
            CpuStorage::I32(v) => layout.offsets().map(|o| v[o] as i64).collect(),
            o => return Err(Error::DType { op, expected: "u32 or i32 indices", got: o.dtype() }),
        })
    }

    pub fn cast(&self, layout: &Layout, dtype: DType) -> Result<GpuStorage> {
        if self.dtype.is_quant() || dtype.is_quant() {
            return dequant::cast(self, layout, dtype);
        }
        copy::cast(self, layout, dtype)
    }

    pub fn unary(&self, op: super::UnaryOp, layout: &Layout) -> Result<GpuStorage> {
        unary::unary(self, op, layout)
    }

    pub fn binary(&self, op: super::BinaryOp, layout: &Layout, rhs: &GpuStorage, rhs_layout: &Layout) -> Result<GpuStorage> {
        binary::binary(self, op, layout, rhs, rhs_layout)
    }

    pub fn where_cond(&self, layout: &Layout, t: &GpuStorage, tl: &Layout, f: &GpuStorage, fl: &Layout) -> Result<GpuStorage> {
        binary::where_cond(self, layout, t, tl, f, fl)
    }

    pub fn reduce(&self, op: super::ReduceOp, layout: &Layout, axis: usize) -> Result<GpuStorage> {
        reduce::reduce(self, op, layout, axis)
    }

    pub fn matmul(&self, layout: &Layout, rhs: &GpuStorage, rhs_layout: &Layout) -> Result<GpuStorage> {
        matmul::matmul(self, layout, rhs, rhs_layout)
    }

    /// The fused LoRA linear `(x wᵀ + s·(xd aᵀ) bᵀ, xd aᵀ)` (see `lora.rs`).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_linear(
        &self,
        layout: &Layout,
        w: &GpuStorage,
        wl: &Layout,
        xd: &GpuStorage,
        xdl: &Layout,
        a: &GpuStorage,
        al: &Layout,
        b: &GpuStorage,
        bl: &Layout,
        scale: f64,
    ) -> Result<(GpuStorage, GpuStorage)> {
        lora::lora_linear(self, layout, w, wl, xd, xdl, a, al, b, bl, scale)
    }

    /// `((a ⊙ gc) b + bias) ⊙ gr` in one kernel, and the value before `gr` when asked (see `gated.rs`).
    #[allow(clippy::too_many_arguments)]
    pub fn gated_matmul(
        &self,
        layout: &Layout,
        b: &GpuStorage,
        bl: &Layout,
        gc: Option<&GpuStorage>,
        bias: Option<&GpuStorage>,
        gr: Option<&GpuStorage>,
        keep_pre: bool,
    ) -> Result<(GpuStorage, Option<GpuStorage>)> {
        gated::gated_matmul(self, layout, b, bl, gc, bias, gr, keep_pre)
    }

    pub fn softmax_last(&self, layout: &Layout, log: bool) -> Result<GpuStorage> {
        softmax::softmax_last(self, layout, log)
    }

    /// Fused attention forward of contiguous q, k, v (see `shaders/attention.wgsl`).
    pub fn flash_attention(
        &self,
        k: &GpuStorage,
        v: &GpuStorage,
        keep: Option<&GpuStorage>,
        dims: crate::backend::cpu::attention::Dims,
        spec: &crate::backend::cpu::attention::AttnSpec,
    ) -> Result<(GpuStorage, GpuStorage)> {
        attention::forward(self, k, v, keep, dims, spec)
    }

    /// Fused attention backward: `(dQ, dK, dV)`.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_backward(
        &self,
        k: &GpuStorage,
        v: &GpuStorage,
        o: &GpuStorage,
        lse: &GpuStorage,
        go: &GpuStorage,
        keep: Option<&GpuStorage>,
        dims: crate::backend::cpu::attention::Dims,
        spec: &crate::backend::cpu::attention::AttnSpec,
    ) -> Result<(GpuStorage, GpuStorage, GpuStorage)> {
        attention::backward(self, k, v, o, lse, go, keep, dims, spec)
    }

    pub fn norm_last(
        &self,
        layout: &Layout,
        w: Option<&GpuStorage>,
        b: Option<&GpuStorage>,
        eps: f64,
        rms: bool,
    ) -> Result<(GpuStorage, GpuStorage, GpuStorage)> {
        norm::norm_last(self, layout, w, b, eps, rms)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn norm_last_backward(
        &self,
        layout: &Layout,
        w: Option<&GpuStorage>,
        g: &GpuStorage,
        gl: &Layout,
        mean: &GpuStorage,
        rstd: &GpuStorage,
        rms: bool,
    ) -> Result<(GpuStorage, GpuStorage, GpuStorage)> {
        norm::norm_last_backward(self, layout, w, g, gl, mean, rstd, rms)
    }

    pub fn index_select(&self, layout: &Layout, axis: usize, idx: &GpuStorage, il: &Layout) -> Result<GpuStorage> {
        if self.dtype.is_quant() {
            return dequant::index_select(self, layout, axis, idx, il);
        }
        index::index_select(self, layout, axis, idx, il)
    }

    pub fn index_add(&self, layout: &Layout, shape: &[usize], axis: usize, idx: &GpuStorage, il: &Layout) -> Result<GpuStorage> {
        index::index_add(self, layout, shape, axis, idx, il)
    }

    pub fn gather(&self, layout: &Layout, axis: usize, idx: &GpuStorage, il: &Layout) -> Result<GpuStorage> {
        index::gather(self, layout, axis, idx, il)
    }

    pub fn scatter_add(&self, layout: &Layout, shape: &[usize], axis: usize, idx: &GpuStorage, il: &Layout) -> Result<GpuStorage> {
        index::scatter_add(self, layout, shape, axis, idx, il)
    }

    pub fn concat(parts: &[(&GpuStorage, &Layout)], axis: usize) -> Result<GpuStorage> {
        copy::concat(parts, axis)
    }

    pub fn rope(&self, layout: &Layout, cos: &GpuStorage, sin: &GpuStorage, interleaved: bool, inverse: bool) -> Result<GpuStorage> {
        rope::rope(self, layout, cos, sin, interleaved, inverse)
    }

    pub fn cross_entropy(&self, layout: &Layout, targets: &GpuStorage, tl: &Layout, ignore: i64) -> Result<GpuStorage> {
        xent::cross_entropy(self, layout, targets, tl, ignore)
    }

    pub fn cross_entropy_backward(
        &self,
        layout: &Layout,
        targets: &GpuStorage,
        tl: &Layout,
        g: &GpuStorage,
        gl: &Layout,
        ignore: i64,
    ) -> Result<GpuStorage> {
        xent::cross_entropy_backward(self, layout, targets, tl, g, gl, ignore)
    }

    pub fn adamw_step(
        &self,
        layout: &Layout,
        grad: &GpuStorage,
        gl: &Layout,
        m: &GpuStorage,
        v: &GpuStorage,
        h: &super::AdamWStep,
    ) -> Result<(GpuStorage, GpuStorage, GpuStorage)> {
        optim::adamw_step(self, layout, grad, gl, m, v, h)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rand(dev: &GpuDevice, dtype: DType, n: usize, seed: u64, offset: u64, normal: bool, a: f64, b: f64) -> Result<GpuStorage> {
        rand::rand(dev, dtype, n, seed, offset, normal, a, b)
    }
}
