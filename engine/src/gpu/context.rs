//! The device, its queue, the pipeline cache and buffer helpers that enforce the adapter's size limits.
use crate::error::{EngineError, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wgpu::util::DeviceExt;

/// Bytes per `queue.write_buffer` call when uploading weights.
const UPLOAD_PIECE: usize = 32 << 20;

pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    /// The largest buffer / storage binding we create: the adapter's limit, optionally lowered (tests,
    /// `BITNODE_MAX_BINDING`) to exercise tiling.
    pub max_binding: u64,
    pub shader_f16: bool,
    /// Whether the device was created with wgpu's SUBGROUP feature, so launchers pick the subgroup
    /// variants of the kernels that have one ([`Gpu::subgroups`]).
    subgroups: bool,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    /// The first uncaptured wgpu error; reported by the next read instead of returning garbage.
    error: Arc<Mutex<Option<String>>>,
    allocated: AtomicU64,
    peak: AtomicU64,
    pending_upload: AtomicU64,
    /// Time spent writing buffer contents and waiting for the copies (the load report's upload seconds).
    upload_ns: AtomicU64,
}

/// Whether `BITNODE_SUBGROUPS` allows the subgroup kernels: anything but `0`, `false` or `off` (or unset)
/// does. The knob exists to compare the two paths on one device, and to fall back should a driver's
/// subgroup support misbehave.
pub fn subgroups_allowed() -> bool {
    !std::env::var("BITNODE_SUBGROUPS")
        .is_ok_and(|v| ["0", "false", "off"].contains(&v.trim().to_ascii_lowercase().as_str()))
}

impl Gpu {
    /// A device on `adapter`, with subgroups where the adapter has them unless `BITNODE_SUBGROUPS=0`.
    pub fn new(adapter: wgpu::Adapter, max_binding: Option<u64>) -> Result<Gpu> {
        Self::with_subgroups(adapter, max_binding, subgroups_allowed())
    }

    /// [`Gpu::new`] with the subgroup choice made by the caller (tests run both paths side by side in one
    /// process, where an environment variable would leak across threads): `subgroups` false always gives
    /// the fallback; true gives subgroups if the adapter has them.
    ///
    /// Why subgroups: at batch 1 a decode step is bound by per-dispatch latency (185 dispatches on the 2B
    /// model), and most of a dispatch of the fused projection `rmsnorm_matmul_ternary` went to workgroup
    /// barriers, ~24 per token in each workgroup; its subgroup variant passes 3 (shaders/reduce_subgroup.wgsl).
    pub fn with_subgroups(adapter: wgpu::Adapter, max_binding: Option<u64>, subgroups: bool) -> Result<Gpu> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let features = adapter.features();
        let shader_f16 = features.contains(wgpu::Features::SHADER_F16);
        // The subgroup kernels work with any power-of-two subgroup size from 4 to 128 (wgpu's own bounds,
        // checked again here) within their 256-thread workgroups.
        let subgroups = subgroups
            && features.contains(wgpu::Features::SUBGROUP)
            && info.subgroup_min_size >= 4
            && info.subgroup_max_size <= 128
            && info.subgroup_min_size.is_power_of_two()
            && info.subgroup_max_size.is_power_of_two();
        let mut required = features & wgpu::Features::TIMESTAMP_QUERY;
        if subgroups {
            required |= wgpu::Features::SUBGROUP;
        }
        let desc = wgpu::DeviceDescriptor {
            label: Some("bitnode"),
            // Timestamps only feed `bitnode bench infer --profile`; ask for them where they exist.
            required_features: required,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            // Small allocation blocks: the model is a few large buffers, and on a phone the memory an allocator
            // reserves ahead matters more than allocation speed.
            memory_hints: wgpu::MemoryHints::MemoryUsage,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| EngineError::NoAdapter(format!("{}: {e}", info.name)))?;
        let error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let sink = error.clone();
        device.on_uncaptured_error(Arc::new(move |e| {
            // Validation errors are bugs in bitnode and device loss is fatal for the job: keep the first
            // one and fail the next read with it rather than return wrong numbers.
            let mut slot = match sink.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            if slot.is_none() {
                tracing::error!("wgpu error: {e}");
                *slot = Some(e.to_string());
            }
        }));
        let hw = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let max_binding = max_binding.map_or(hw, |m| m.min(hw)).max(4096);
        Ok(Gpu {
            device,
            queue,
            info,
            limits,
            max_binding,
            shader_f16,
            subgroups,
            pipelines: Mutex::new(HashMap::new()),
            error,
            allocated: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            pending_upload: AtomicU64::new(0),
            upload_ns: AtomicU64::new(0),
        })
    }

    /// Whether the subgroup kernels run on this device (see [`Gpu::with_subgroups`]).
    pub fn subgroups(&self) -> bool {
        self.subgroups
    }

    /// The adapter's (smallest, largest) subgroup size, for reports.
    pub fn subgroup_sizes(&self) -> (u32, u32) {
        (self.info.subgroup_min_size, self.info.subgroup_max_size)
    }

    pub fn name(&self) -> String {
        format!(
            "{} ({:?}, {:?})",
            self.info.name, self.info.backend, self.info.device_type
        )
    }

    /// A compute pipeline from (kernel source, entry point, override constants), cached.
    pub fn pipeline(&self, src: &str, entry: &str, constants: &[(&str, f64)]) -> Arc<wgpu::ComputePipeline> {
        let key = format!("{:p}/{entry}/{constants:?}", src.as_ptr());
        let mut cache = match self.pipelines.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if let Some(p) = cache.get(&key) {
            return p.clone();
        }
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(entry),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        });
        let p = Arc::new(self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                // Every kernel writes its workgroup memory before reading it.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        }));
        cache.insert(key, p.clone());
        p
    }

    /// The first wgpu error since the device was created, as an engine error.
    pub fn check_error(&self) -> Result<()> {
        let slot = match self.error.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        match &*slot {
            Some(e) => Err(EngineError::Gpu(e.clone())),
            None => Ok(()),
        }
    }

    fn track(&self, size: u64) {
        let now = self.allocated.fetch_add(size, Ordering::Relaxed) + size;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    pub fn release(&self, size: u64) {
        self.allocated.fetch_sub(size, Ordering::Relaxed);
    }

    pub fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    fn check(&self, label: &str, size: u64) -> Result<()> {
        if size > self.max_binding {
            return Err(EngineError::Gpu(format!(
                "buffer {label} needs {size} bytes but the adapter allows {} per binding; this tensor should have been tiled",
                self.max_binding
            )));
        }
        Ok(())
    }

    /// A zeroed storage buffer (4-byte aligned, at least 16 bytes).
    pub fn storage(&self, label: &str, size: u64) -> Result<wgpu::Buffer> {
        let size = size.max(16).div_ceil(4) * 4;
        self.check(label, size)?;
        self.track(size);
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        }))
    }

    /// A storage buffer initialised with `data`. The bytes go through `queue.write_buffer` in 32 MiB
    /// pieces, and the queue is drained every 128 MiB: wgpu stages every upload in a host-visible copy,
    /// and staging a whole model at once would, on GPUs with resizable BAR, briefly double its footprint
    /// in device memory (seen on an H200: 2.4 GiB peak for a 1.3 GiB model before this).
    pub fn storage_init(&self, label: &str, data: &[u8]) -> Result<wgpu::Buffer> {
        let size = (data.len().max(16).div_ceil(4) * 4) as u64;
        let buf = self.storage(label, size)?;
        for (i, piece) in data.chunks(UPLOAD_PIECE).enumerate() {
            let off = (i * UPLOAD_PIECE) as u64;
            if piece.len() % 4 == 0 {
                self.write(&buf, off, piece)?;
            } else {
                let mut padded = piece.to_vec();
                padded.resize(piece.len().div_ceil(4) * 4, 0);
                self.write(&buf, off, &padded)?;
            }
        }
        Ok(buf)
    }

    /// A storage buffer of `len` bytes whose contents `fill(offset, piece)` writes, 32 MiB at a time, into
    /// one reused host buffer that is uploaded after each piece (as [`Gpu::storage_init`] does): a
    /// converted tensor never exists whole on the host. Offsets are multiples of 4; bytes past `len`
    /// (padding to 4) are zero.
    pub fn storage_with(
        &self,
        label: &str,
        len: usize,
        fill: &mut dyn FnMut(usize, &mut [u8]) -> Result<()>,
    ) -> Result<wgpu::Buffer> {
        let size = (len.max(16).div_ceil(4) * 4) as u64;
        let buf = self.storage(label, size)?;
        // u32 words: 4-byte alignment, so the filler can view its piece as f16 or f32.
        let mut host = vec![0u32; UPLOAD_PIECE.min(len).div_ceil(4)];
        for off in (0..len).step_by(UPLOAD_PIECE) {
            let n = UPLOAD_PIECE.min(len - off);
            let bytes: &mut [u8] = &mut bytemuck::cast_slice_mut(&mut host)[..n.div_ceil(4) * 4];
            bytes[n..].fill(0);
            fill(off, &mut bytes[..n])?;
            self.write(&buf, off as u64, bytes)?;
        }
        Ok(buf)
    }

    /// One upload piece: queued, and the queue drained once 128 MiB are pending.
    fn write(&self, buf: &wgpu::Buffer, off: u64, piece: &[u8]) -> Result<()> {
        let t0 = std::time::Instant::now();
        self.queue.write_buffer(buf, off, piece);
        self.upload_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let pending = self.pending_upload.fetch_add(piece.len() as u64, Ordering::Relaxed) + piece.len() as u64;
        if pending >= 128 << 20 {
            self.flush_uploads()?;
        }
        Ok(())
    }

    /// Submits pending uploads and waits, which frees their staging copies.
    pub fn flush_uploads(&self) -> Result<()> {
        let t0 = std::time::Instant::now();
        self.pending_upload.store(0, Ordering::Relaxed);
        self.queue.submit([]);
        let done = self
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| EngineError::Gpu(format!("device lost while uploading: {e}")));
        self.upload_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        done.map(|_| ())
    }

    /// Seconds spent in buffer uploads so far: writing into staging memory and waiting for the copies.
    pub fn upload_seconds(&self) -> f64 {
        self.upload_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }

    pub fn uniform(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        self.track(data.len() as u64);
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: data,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        })
    }

    pub fn readback_buffer(&self, size: u64) -> wgpu::Buffer {
        self.track(size);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Waits for all submitted work, then copies `size` bytes of a MAP_READ buffer out.
    pub fn read(&self, staging: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        self.read_after(staging, size, None)
    }

    /// Copies `size` bytes of a MAP_READ buffer out once submission `after` has finished (all work when
    /// `None`); later submissions keep running.
    pub fn read_after(
        &self,
        staging: &wgpu::Buffer,
        size: u64,
        after: Option<wgpu::SubmissionIndex>,
    ) -> Result<Vec<u8>> {
        let slice = staging.slice(..size);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: after,
                timeout: None,
            })
            .map_err(|e| EngineError::Gpu(format!("device lost while waiting: {e}")))?;
        rx.recv()
            .map_err(|_| EngineError::Gpu("map callback never ran".into()))?
            .map_err(|e| EngineError::Gpu(format!("map failed: {e}")))?;
        let data = slice.get_mapped_range().to_vec();
        staging.unmap();
        self.check_error()?;
        Ok(data)
    }

    /// Copies a storage buffer's first `size` bytes back to the host (tests, debugging).
    pub fn download(&self, buf: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("download"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buf, 0, &staging, 0, size);
        self.queue.submit([enc.finish()]);
        self.read(&staging, size)
    }
}
