//! The capability probe a node runs at start: which device the engine would use, and how fast the engine's
//! own ternary matmul runs there. The number ranks devices for job placement, so it measures the kernel that
//! dominates BitNet work (`matmul_ternary`, the same launcher inference uses) rather than a generic FLOPS test.
use crate::cpu;
use crate::error::{EngineError, Result};
use crate::gpu::{self, kernels as k, Gpu};
use crate::model::TernaryLinear;
use crate::rng::Rng;
use crate::ternary;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    pub device: String,
    /// "vulkan", "metal", "dx12" or "cpu".
    pub backend: String,
    /// "discrete", "integrated", "virtual", "software", "other" or "cpu".
    pub device_type: String,
    /// PCI vendor id (0 for the CPU reference).
    pub vendor_id: u32,
    pub max_binding_bytes: u64,
    /// Ternary matmul throughput, 1e9 multiply-adds x2 per second.
    pub ternary_gops: f64,
    /// Whether the device's result matched the CPU twin (a device that computes wrong must not get jobs).
    pub verified: bool,
}

fn random_linear(rng: &mut Rng, out: usize, inp: usize) -> TernaryLinear {
    let mut words = Vec::with_capacity(out * inp / 16);
    for _ in 0..out {
        let t: Vec<i8> = (0..inp).map(|_| (rng.next_u64() % 3) as i8 - 1).collect();
        ternary::pack_row(&t, &mut words);
    }
    TernaryLinear {
        out,
        inp,
        words,
        scale: 1.0,
    }
}

/// Probes the device `want` resolves to (as `--device`: auto, gpu, cpu, an index or a name), spending about
/// `budget` on the timing loop.
pub fn probe(want: &str, budget: Duration) -> Result<Probe> {
    let adapter = if want.eq_ignore_ascii_case("cpu") {
        None
    } else {
        match gpu::pick_adapter(want)? {
            Some(a) => Some(a),
            None if want.is_empty() || want.eq_ignore_ascii_case("auto") => None,
            None => return Err(EngineError::NoAdapter(format!("no adapter matches {want:?}"))),
        }
    };
    match adapter {
        None => Ok(probe_cpu(budget)),
        Some(a) => probe_gpu(a, budget),
    }
}

fn probe_cpu(budget: Duration) -> Probe {
    // Small enough that one product takes tens of milliseconds even unoptimised.
    let (t, o, i) = (4usize, 1024usize, 2048usize);
    let mut rng = Rng::new(1);
    let w = random_linear(&mut rng, o, i);
    let q: Vec<i8> = (0..t * i).map(|_| (rng.next_u64() % 255) as i8).collect();
    let s = vec![1.0f32; t];
    let mut y = vec![0f32; t * o];
    let start = Instant::now();
    let mut n = 0u64;
    while n == 0 || start.elapsed() < budget {
        cpu::matmul_ternary(&mut y, &q, &s, &w, t);
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    Probe {
        device: "cpu".into(),
        backend: "cpu".into(),
        device_type: "cpu".into(),
        vendor_id: 0,
        max_binding_bytes: u64::MAX,
        ternary_gops: (2 * t * o * i) as f64 * n as f64 / secs / 1e9,
        verified: true,
    }
}

fn probe_gpu(adapter: wgpu::Adapter, budget: Duration) -> Result<Probe> {
    let info = adapter.get_info();
    let g = Gpu::new(adapter, None)?;
    // Prefill-shaped (16 tokens) so the number reflects arithmetic throughput, not dispatch latency.
    let (t, o, i) = (16usize, 2048usize, 2048usize);
    let mut rng = Rng::new(1);
    let w = random_linear(&mut rng, o, i);
    let q: Vec<i8> = (0..t * i).map(|_| (rng.next_u64() % 255) as i8).collect();
    let qw: Vec<u32> = q
        .chunks(4)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u32, |acc, (j, v)| acc | ((*v as u8 as u32) << (8 * j)))
        })
        .collect();
    let s = vec![1.0f32; t];
    let qsum: Vec<i32> = q.chunks(i).map(|r| r.iter().map(|v| *v as i32).sum()).collect();
    let step = g.uniform(
        "step",
        bytemuck::bytes_of(&k::Step {
            t: t as u32,
            ..Default::default()
        }),
    );
    let qb = g.storage_init("q", bytemuck::cast_slice(&qw))?;
    let sb = g.storage_init("s", bytemuck::cast_slice(&s))?;
    let sumb = g.storage_init("qsum", bytemuck::cast_slice(&qsum))?;
    let yb = g.storage("y", (4 * t * o) as u64)?;
    let tiles = k::ternary_tiles(&g, &[&w], false)?;
    let ops: Vec<_> = tiles
        .iter()
        .map(|tl| k::matmul_ternary(&g, tl, 0, 0, o, &qb, &sb, &sumb, &yb, &step))
        .collect();
    let refs: Vec<&k::Op> = ops.iter().collect();
    // Warm-up compiles the pipeline; its output is checked against the CPU twin.
    k::run(&g, &refs, t as u32, 0);
    let got: Vec<f32> = bytemuck::pod_collect_to_vec(&g.download(&yb, (4 * t * o) as u64)?);
    let mut want = vec![0f32; t * o];
    cpu::matmul_ternary(&mut want, &q, &s, &w, t);
    let verified = got
        .iter()
        .zip(&want)
        .all(|(a, b)| (a - b).abs() <= 1e-3 * b.abs().max(1.0));
    let start = Instant::now();
    let mut n = 0u64;
    let batch = 8;
    while n == 0 || start.elapsed() < budget {
        for _ in 0..batch {
            k::run(&g, &refs, t as u32, 0);
        }
        g.download(&yb, 4)?;
        n += batch;
    }
    let secs = start.elapsed().as_secs_f64();
    let device_type = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => "discrete",
        wgpu::DeviceType::IntegratedGpu => "integrated",
        wgpu::DeviceType::VirtualGpu => "virtual",
        wgpu::DeviceType::Cpu => "software",
        wgpu::DeviceType::Other => "other",
    };
    Ok(Probe {
        device: info.name.clone(),
        backend: format!("{:?}", info.backend).to_lowercase(),
        device_type: device_type.into(),
        vendor_id: info.vendor,
        max_binding_bytes: g.max_binding,
        ternary_gops: (2 * t * o * i) as f64 * n as f64 / secs / 1e9,
        verified,
    })
}

/// Dedicated memory of the GPU with this PCI vendor id, where the platform says: AMD's sysfs VRAM
/// counter, NVIDIA's `nvidia-smi` (first GPU). `None` elsewhere (integrated GPUs share system RAM in
/// amounts the driver decides). The daemon advertises it; the fine-tuning planner uses it as the default
/// `--max-memory`.
pub fn device_memory(vendor_id: u32) -> Option<u64> {
    match vendor_id {
        0x1002 => {
            let rd = std::fs::read_dir("/sys/class/drm").ok()?;
            for e in rd.flatten() {
                let p = e.path().join("device/mem_info_vram_total");
                if let Some(v) = std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse().ok()) {
                    return Some(v);
                }
            }
            None
        }
        0x10de => {
            let out = std::process::Command::new("nvidia-smi")
                .args(["--query-gpu=memory.total", "--format=csv,noheader,nounits"])
                .output()
                .ok()?;
            let mib: u64 = String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()?
                .trim()
                .parse()
                .ok()?;
            Some(mib * 1024 * 1024)
        }
        _ => None,
    }
}
