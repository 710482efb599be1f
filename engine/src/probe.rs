//! The capability probe a node runs at start (and again on a schedule): which device the engine would use,
//! and how fast the engine's own ternary matmul runs there. The number ranks devices for job placement, so it
//! measures the kernel that dominates BitNet work (`matmul_ternary`, the same launcher inference uses) rather
//! than a generic FLOPS test.
//!
//! One wall-clock sample taken while neighbours compete for the CPU ranks a device by its luck at start-up
//! (issue 13: a desktop measured 0.26 while containers restarted, a 0.6-CPU laptop 0.39). So:
//! - Work that runs on the CPU is timed by CPU time, not wall time: the CPU reference by the calling thread's
//!   own CPU time, software Vulkan (lavapipe, whose shaders run on its CPU worker threads) by the process's
//!   CPU time. A busy neighbour then takes turns on the core without making the kernel look slower. The rate
//!   per CPU-second is multiplied by the CPUs this process may use ([`usable_cpus`]: the affinity mask, capped
//!   by the cgroup CPU quota, fractions kept), so a container limited to 0.6 CPU scores 0.6 of a core.
//! - A hardware GPU keeps wall-clock timing: its work does not run on our CPU time, and wall time is what a
//!   job on it will take.
//! - The budget is split into several samples and the reported rate is their median, so one interrupted
//!   sample cannot decide the rank.
use crate::cpu;
use crate::error::{EngineError, Result};
use crate::gpu::{self, kernels as k, Gpu};
use crate::model::TernaryLinear;
use crate::rng::Rng;
use crate::ternary;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Samples [`probe`] takes when not told otherwise.
pub const DEFAULT_SAMPLES: usize = 5;

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
    /// Ternary matmul throughput, 1e9 multiply-adds x2 per second: the median of `samples_gops`.
    pub ternary_gops: f64,
    /// Whether the device's result matched the CPU twin (a device that computes wrong must not get jobs).
    pub verified: bool,
    /// What the samples were timed by: "thread-cpu" (the CPU reference), "process-cpu" (software Vulkan) or
    /// "wall" (hardware GPUs, and CPU work where the platform has no CPU-time clock).
    pub clock: String,
    /// The CPUs a per-CPU-second rate was multiplied by ([`usable_cpus`]); `None` where the rate was not
    /// scaled (hardware GPUs, and software Vulkan timed by wall clock, which already spans all its threads).
    pub cpus: Option<f64>,
    /// Each sample's rate in GOPS (scaled like `ternary_gops`), in the order taken.
    pub samples_gops: Vec<f64>,
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
/// `budget` on [`DEFAULT_SAMPLES`] timing samples. See [`probe_with`].
pub fn probe(want: &str, budget: Duration) -> Result<Probe> {
    probe_with(want, budget, DEFAULT_SAMPLES)
}

/// Probes the device `want` resolves to, splitting `budget` of timing into `samples` samples (at least one;
/// each runs the kernel at least once, so a tiny budget still yields a number) and reporting their median.
///
/// This is also the way to re-measure later: it holds nothing between calls (no device, pipeline or buffers
/// stay allocated in a long-running daemon), and rebuilding the small benchmark costs far less than the
/// timing itself. A re-measurement re-checks the result against the CPU twin on purpose: a device that
/// starts computing wrong must lose its jobs.
pub fn probe_with(want: &str, budget: Duration, samples: usize) -> Result<Probe> {
    let samples = samples.clamp(1, 1000);
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
        None => Ok(probe_cpu(budget, samples)),
        Some(a) => probe_gpu(a, budget, samples),
    }
}

fn probe_cpu(budget: Duration, samples: usize) -> Probe {
    // Small enough that one product takes tens of milliseconds even unoptimised.
    let (t, o, i) = (4usize, 1024usize, 2048usize);
    let mut rng = Rng::new(1);
    let w = random_linear(&mut rng, o, i);
    let q: Vec<i8> = (0..t * i).map(|_| (rng.next_u64() % 255) as i8).collect();
    let s = vec![1.0f32; t];
    let mut y = vec![0f32; t * o];
    // The kernel runs on this thread only, so this thread's CPU time is exactly the time it took,
    // however many other threads or processes shared the core meanwhile. That gives the rate per core;
    // the device offers it on every CPU this process may use.
    let clock = Clock::ThreadCpu.usable();
    // The kernel the CPU backend runs (`--device cpu`: crate::fast, here on this one thread).
    let per_sec = time_samples(clock, budget, samples, || {
        crate::fast::matmul_ternary(&mut y, &q, &s, &w, t);
        Ok(1)
    })
    .unwrap_or_default();
    let cpus = usable_cpus();
    let samples_gops: Vec<f64> = per_sec
        .iter()
        .map(|r| (2 * t * o * i) as f64 * r * cpus / 1e9)
        .collect();
    Probe {
        device: "cpu".into(),
        backend: "cpu".into(),
        device_type: "cpu".into(),
        vendor_id: 0,
        max_binding_bytes: u64::MAX,
        ternary_gops: median(&samples_gops).unwrap_or(0.0),
        verified: true,
        clock: clock.name().into(),
        cpus: Some(cpus),
        samples_gops,
    }
}

fn probe_gpu(adapter: wgpu::Adapter, budget: Duration, samples: usize) -> Result<Probe> {
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
    let software = info.device_type == wgpu::DeviceType::Cpu;
    // Software Vulkan (lavapipe) runs the shaders on its own CPU worker threads, so it suffers from busy
    // neighbours and CPU quotas exactly like the CPU reference: time it by the CPU time of the whole process
    // (those workers included) and scale by the CPUs we may use. The daemon's other threads are mostly idle
    // meanwhile; what they spend makes the number slightly low, never high. A hardware GPU computes off our
    // CPU time: its wall time is the honest number.
    let clock = if software {
        Clock::ProcessCpu.usable()
    } else {
        Clock::Wall
    };
    let batch = 8;
    let per_sec = time_samples(clock, budget, samples, || {
        for _ in 0..batch {
            k::run(&g, &refs, t as u32, 0);
        }
        g.download(&yb, 4)?;
        Ok(batch)
    })?;
    // Wall time of lavapipe (no CPU-time clock here) already spans all its threads: no scaling then.
    let cpus = (clock != Clock::Wall).then(usable_cpus);
    let samples_gops: Vec<f64> = per_sec
        .iter()
        .map(|r| (2 * t * o * i) as f64 * r * cpus.unwrap_or(1.0) / 1e9)
        .collect();
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
        ternary_gops: median(&samples_gops).unwrap_or(0.0),
        verified,
        clock: clock.name().into(),
        cpus,
        samples_gops,
    })
}

/// Runs `step` (which reports how many products it computed) for `samples` slices of `budget`, at least once
/// per slice, and returns each slice's products per second of `clock`. The slices are bounded by wall time
/// so that the budget means the same under a CPU quota; only the rate is measured on `clock`.
fn time_samples(
    clock: Clock,
    budget: Duration,
    samples: usize,
    mut step: impl FnMut() -> Result<u64>,
) -> Result<Vec<f64>> {
    let share = budget / samples.max(1) as u32;
    let mut rates = Vec::with_capacity(samples);
    for _ in 0..samples.max(1) {
        let wall = Instant::now();
        let c0 = clock.now();
        let mut n = 0u64;
        while n == 0 || wall.elapsed() < share {
            n += step()?;
        }
        // A CPU-time clock has nanosecond resolution on Linux, but a coarse one must not divide by zero.
        let secs = (clock.now() - c0).max(1e-9);
        rates.push(n as f64 / secs);
    }
    Ok(rates)
}

/// The median of `v` (the mean of the middle two for an even count); `None` for an empty slice. NaNs sort
/// last, so they only win when most values are NaN.
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    Wall,
    /// CPU time of the calling thread.
    ThreadCpu,
    /// CPU time of all threads of this process.
    ProcessCpu,
}

impl Clock {
    fn name(self) -> &'static str {
        match self {
            Clock::Wall => "wall",
            Clock::ThreadCpu => "thread-cpu",
            Clock::ProcessCpu => "process-cpu",
        }
    }

    /// This clock where the platform has it, else the wall clock.
    fn usable(self) -> Clock {
        if self == Clock::Wall || cpu_time(self).is_some() {
            self
        } else {
            Clock::Wall
        }
    }

    /// Seconds since an arbitrary origin that stays fixed for this clock within the process.
    fn now(self) -> f64 {
        match self {
            Clock::Wall => {
                static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
                ORIGIN.get_or_init(Instant::now).elapsed().as_secs_f64()
            }
            _ => cpu_time(self).unwrap_or(0.0),
        }
    }
}

/// `clock_gettime` on a CPU-time clock. POSIX clocks: Linux and Android (tested), macOS and the BSDs (they
/// have both clocks, but this code has not been run there).
#[cfg(unix)]
fn cpu_time(clock: Clock) -> Option<f64> {
    let id = match clock {
        Clock::ThreadCpu => libc::CLOCK_THREAD_CPUTIME_ID,
        Clock::ProcessCpu => libc::CLOCK_PROCESS_CPUTIME_ID,
        Clock::Wall => return None,
    };
    // SAFETY: timespec is plain integers, for which all-zero is a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime only writes the timespec we own; an unknown clock id returns -1.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    (rc == 0).then_some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

/// Elsewhere (Windows) there is no portable CPU-time clock here: the probe falls back to wall time.
#[cfg(not(unix))]
fn cpu_time(_: Clock) -> Option<f64> {
    None
}

/// The CPUs this process may use: the CPUs in its affinity mask, capped by the cgroup CPU quota (v2
/// `cpu.max`, else v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, the tightest one from the process's cgroup
/// up to the root). Fractional quotas count: a container started with `--cpus 0.3` gets 0.3.
pub fn usable_cpus() -> f64 {
    let n = affinity_cpus() as f64;
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    match cgroup_quota(Path::new("/sys/fs/cgroup"), &own) {
        Some(q) => n.min(q),
        None => n,
    }
}

/// CPUs in the affinity mask. Linux and Android ask the kernel directly: `available_parallelism` would also apply the
/// cgroup quota, rounded down to a whole CPU (and at least 1), losing the fraction we want.
fn affinity_cpus() -> usize {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // SAFETY: cpu_set_t is a plain bit array, all-zero is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into the set we own.
        let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if rc == 0 {
            // SAFETY: counts the bits of the set the kernel filled in.
            let n = unsafe { libc::CPU_COUNT(&set) };
            if n > 0 {
                return n as usize;
            }
        }
    }
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The tightest CPU quota (in CPUs) on the way from this process's cgroup up to the root, under the cgroup
/// file system mounted at `root`; `proc_self_cgroup` is the text of /proc/self/cgroup. Both hierarchies are
/// tried: v2 (`cpu.max` beside the unified hierarchy's root), then v1 (the `cpu` controller's mount). In a
/// container with its own cgroup namespace the container's cgroup is the root, which the walk reaches too.
fn cgroup_quota(root: &Path, proc_self_cgroup: &str) -> Option<f64> {
    let read = |p: PathBuf| std::fs::read_to_string(p).ok();
    let mut best: Option<f64> = None;
    let mut take = |q: Option<f64>| {
        if let Some(q) = q {
            best = Some(best.map_or(q, |b: f64| b.min(q)));
        }
    };
    let v2 = cgroup_path(proc_self_cgroup, None).unwrap_or("/");
    for dir in ancestors(root, v2) {
        take(read(dir.join("cpu.max")).as_deref().and_then(parse_cpu_max));
    }
    let v1 = cgroup_path(proc_self_cgroup, Some("cpu")).unwrap_or("/");
    for mount in ["cpu", "cpu,cpuacct", "cpuacct,cpu"] {
        for dir in ancestors(&root.join(mount), v1) {
            if let (Some(q), Some(p)) = (read(dir.join("cpu.cfs_quota_us")), read(dir.join("cpu.cfs_period_us"))) {
                take(parse_cfs_quota(&q, &p));
            }
        }
    }
    best
}

/// A process's cgroup path from /proc/self/cgroup: the v2 line (`0::/path`) for `controller == None`, else
/// the v1 line whose controller list names `controller` (`4:cpu,cpuacct:/path`).
fn cgroup_path<'a>(proc_self_cgroup: &'a str, controller: Option<&str>) -> Option<&'a str> {
    proc_self_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (id, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let hit = match controller {
            None => id == "0" && ctrls.is_empty(),
            Some(c) => ctrls.split(',').any(|x| x == c),
        };
        hit.then_some(path.trim())
    })
}

/// `root/a/b`, `root/a`, `root` for the cgroup path `/a/b`. Components that would leave `root` (`..`, which
/// /proc shows for cgroups outside our namespace) are dropped.
fn ancestors(root: &Path, cgroup: &str) -> Vec<PathBuf> {
    let parts: Vec<&str> = cgroup
        .split('/')
        .filter(|c| !c.is_empty() && *c != "." && *c != "..")
        .collect();
    (0..=parts.len())
        .rev()
        .map(|n| parts[..n].iter().fold(root.to_path_buf(), |p, c| p.join(c)))
        .collect()
}

/// cgroup v2 `cpu.max`: "max 100000" is no limit, "60000 100000" is 0.6 CPU. `None` for no limit or text
/// that does not parse.
fn parse_cpu_max(s: &str) -> Option<f64> {
    let mut f = s.split_whitespace();
    let quota = f.next()?;
    if quota == "max" {
        return None;
    }
    let quota: f64 = quota.parse().ok()?;
    // The period is optional when written; the kernel's default is 100 ms.
    let period: f64 = match f.next() {
        Some(p) => p.parse().ok()?,
        None => 100_000.0,
    };
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// cgroup v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`: a quota of -1 is no limit.
fn parse_cfs_quota(quota: &str, period: &str) -> Option<f64> {
    let quota: f64 = quota.trim().parse().ok()?;
    let period: f64 = period.trim().parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_robust_to_one_outlier() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[1.0, 0.26, 1.1, 0.98, 1.02]), Some(1.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[1.0, f64::NAN, 2.0]), Some(2.0));
    }

    #[test]
    fn cpu_max_is_parsed() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("max"), None);
        assert_eq!(parse_cpu_max("60000 100000\n"), Some(0.6));
        assert_eq!(parse_cpu_max("30000 100000"), Some(0.3));
        assert_eq!(parse_cpu_max("200000 100000"), Some(2.0));
        assert_eq!(parse_cpu_max("50000"), Some(0.5));
        assert_eq!(parse_cpu_max(""), None);
        assert_eq!(parse_cpu_max("garbage 100000"), None);
        assert_eq!(parse_cpu_max("0 100000"), None);
    }

    #[test]
    fn cfs_quota_is_parsed() {
        assert_eq!(parse_cfs_quota("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs_quota("60000\n", "100000\n"), Some(0.6));
        assert_eq!(parse_cfs_quota("150000", "100000"), Some(1.5));
        assert_eq!(parse_cfs_quota("60000", "0"), None);
        assert_eq!(parse_cfs_quota("x", "100000"), None);
    }

    #[test]
    fn proc_self_cgroup_is_parsed() {
        let v2 = "0::/system.slice/bitnode.service\n";
        assert_eq!(cgroup_path(v2, None), Some("/system.slice/bitnode.service"));
        assert_eq!(cgroup_path(v2, Some("cpu")), None);
        let v1 = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n";
        assert_eq!(cgroup_path(v1, Some("cpu")), Some("/docker/abc"));
        assert_eq!(cgroup_path(v1, Some("cpuset")), None);
        assert_eq!(cgroup_path(v1, None), None);
        assert_eq!(cgroup_path("", None), None);
    }

    #[test]
    fn ancestors_walk_up_to_the_root_and_stay_inside() {
        let r = Path::new("/cg");
        assert_eq!(
            ancestors(r, "/a/b"),
            vec![PathBuf::from("/cg/a/b"), PathBuf::from("/cg/a"), PathBuf::from("/cg")]
        );
        assert_eq!(ancestors(r, "/"), vec![PathBuf::from("/cg")]);
        assert_eq!(
            ancestors(r, "/../../x"),
            vec![PathBuf::from("/cg/x"), PathBuf::from("/cg")]
        );
    }

    /// A fake cgroup tree: the tightest quota on the way up wins, in either hierarchy.
    #[test]
    fn cgroup_quota_takes_the_tightest_limit_on_the_way_up() {
        let root = std::env::temp_dir().join(format!("bitnode-cgroup-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let leaf = root.join("system.slice/bitnode.service");
        std::fs::create_dir_all(&leaf).unwrap();
        let proc = "0::/system.slice/bitnode.service\n";
        assert_eq!(cgroup_quota(&root, proc), None);
        std::fs::write(root.join("system.slice/cpu.max"), "150000 100000\n").unwrap();
        std::fs::write(leaf.join("cpu.max"), "max 100000\n").unwrap();
        assert_eq!(cgroup_quota(&root, proc), Some(1.5));
        std::fs::write(leaf.join("cpu.max"), "60000 100000\n").unwrap();
        assert_eq!(cgroup_quota(&root, proc), Some(0.6));
        // A container with its own cgroup namespace: its limit sits at the root.
        std::fs::write(root.join("cpu.max"), "30000 100000\n").unwrap();
        assert_eq!(cgroup_quota(&root, "0::/\n"), Some(0.3));

        // cgroup v1 in a container without a cgroup namespace: /proc names a path the mount does not have,
        // and the container's own limit sits at the mount's root.
        let v1 = root.join("v1");
        let cpu = v1.join("cpu,cpuacct");
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::write(cpu.join("cpu.cfs_quota_us"), "-1\n").unwrap();
        std::fs::write(cpu.join("cpu.cfs_period_us"), "100000\n").unwrap();
        let proc = "4:cpu,cpuacct:/docker/abc\n";
        assert_eq!(cgroup_quota(&v1, proc), None);
        std::fs::write(cpu.join("cpu.cfs_quota_us"), "60000\n").unwrap();
        assert_eq!(cgroup_quota(&v1, proc), Some(0.6));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn usable_cpus_is_positive_and_at_most_the_affinity_mask() {
        let n = usable_cpus();
        assert!(n > 0.0 && n <= affinity_cpus() as f64, "{n}");
    }

    #[test]
    fn cpu_probe_takes_the_median_of_its_samples() {
        let p = probe_with("cpu", Duration::ZERO, 3).unwrap();
        assert_eq!(p.samples_gops.len(), 3);
        assert!(
            p.verified && p.ternary_gops > 0.0 && p.ternary_gops.is_finite(),
            "{p:?}"
        );
        assert_eq!(Some(p.ternary_gops), median(&p.samples_gops));
        assert_eq!(p.cpus, Some(usable_cpus()));
        #[cfg(unix)]
        assert_eq!(p.clock, "thread-cpu");
    }

    #[cfg(unix)]
    #[test]
    fn cpu_time_clocks_advance_with_work() {
        let (t0, p0) = (Clock::ThreadCpu.now(), Clock::ProcessCpu.now());
        let mut x = 0u64;
        for _ in 0..5_000_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        assert!(Clock::ThreadCpu.now() > t0 && Clock::ProcessCpu.now() > p0);
    }
}
