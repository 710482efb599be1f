//! What this device can do: the engine's probe (device, backend, measured ternary matmul speed) plus what
//! the OS tells us (memory, battery, AC), overridden by `[capabilities]` pins.
//!
//! The speed is measured at start ([`probe`]) and again every `remeasure_secs` ([`measure`], pushed into a
//! [`ScoreWindow`] whose median is advertised), each time as the median of `benchmark_samples` samples timed
//! by CPU time where the work runs on the CPU (see `bitnode_engine::probe`).
use crate::config::CapabilitiesSection;
use bitnode_protocol::mesh::Capabilities;
use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

/// Measurements a [`ScoreWindow`] keeps by default: the start probe and the next re-measurements; with 5,
/// three unlucky measurements in a row are needed to move the advertised rate.
pub const SCORE_WINDOW: usize = 5;

fn run_probe(adapter: &str, cfg: &CapabilitiesSection) -> bitnode_engine::error::Result<bitnode_engine::probe::Probe> {
    let p = bitnode_engine::probe::probe_with(
        adapter,
        Duration::from_millis(cfg.benchmark_ms.max(1)),
        cfg.benchmark_samples.max(1),
    )?;
    tracing::debug!(
        device = %p.device,
        gops = p.ternary_gops,
        clock = %p.clock,
        cpus = ?p.cpus,
        samples = ?p.samples_gops,
        "measured the ternary matmul"
    );
    Ok(p)
}

/// The slow part, done once at start: which device, and how fast its ternary matmul is.
pub fn probe(adapter: &str, cfg: &CapabilitiesSection) -> Capabilities {
    let mut c = Capabilities {
        version: env!("CARGO_PKG_VERSION").into(),
        system_memory_bytes: system_memory(),
        ..Default::default()
    };
    if cfg.benchmark {
        match run_probe(adapter, cfg) {
            Ok(p) => {
                c.device = p.device;
                c.backend = p.backend;
                c.device_type = p.device_type.clone();
                c.vendor = vendor_name(p.vendor_id);
                c.max_binding_bytes = p.max_binding_bytes;
                c.ternary_gops = if p.verified { p.ternary_gops } else { 0.0 };
                if !p.verified {
                    tracing::error!(device = %c.device, "the ternary matmul on this device disagrees with the CPU reference; advertising score 0");
                }
                c.device_memory_bytes = device_memory(&c.vendor, &p.device_type, c.system_memory_bytes);
            }
            Err(e) => tracing::warn!("capability probe failed: {e}"),
        }
    }
    refresh(&mut c, cfg, 0);
    c
}

/// A fresh ternary matmul rate (GOPS) for the device `adapter` resolves to, measured like the start probe
/// (median of `benchmark_samples` samples over `benchmark_ms`), for the daemon's `remeasure_secs` schedule.
/// Blocking (it runs the kernel for `benchmark_ms`): call it from `spawn_blocking`. Memory, power and pins
/// are left alone. `None` when benchmarking is off, the probe failed, or the device's result no longer
/// matches the CPU twin (logged; the advertised rate then stays as it was).
pub fn measure(adapter: &str, cfg: &CapabilitiesSection) -> Option<f64> {
    if !cfg.benchmark {
        return None;
    }
    match run_probe(adapter, cfg) {
        Ok(p) if p.verified => Some(p.ternary_gops),
        Ok(p) => {
            tracing::error!(device = %p.device, "the ternary matmul on this device disagrees with the CPU reference; not using this measurement");
            None
        }
        Err(e) => {
            tracing::warn!("capability re-measurement failed: {e}");
            None
        }
    }
}

/// The last few rate measurements of this device; the advertised rate is their median, so one measurement
/// taken while something else hogged the device cannot move the rank on its own.
#[derive(Debug, Clone)]
pub struct ScoreWindow {
    cap: usize,
    last: VecDeque<f64>,
}

impl ScoreWindow {
    /// A window over the last `cap` measurements (at least 1).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        ScoreWindow {
            cap,
            last: VecDeque::with_capacity(cap),
        }
    }

    /// Adds a measurement, forgetting the oldest beyond the window. Values that are not finite are ignored.
    pub fn push(&mut self, gops: f64) {
        if !gops.is_finite() {
            return;
        }
        if self.last.len() == self.cap {
            self.last.pop_front();
        }
        self.last.push_back(gops);
    }

    /// The median of the measurements in the window; `None` before the first.
    pub fn value(&self) -> Option<f64> {
        let v: Vec<f64> = self.last.iter().copied().collect();
        bitnode_engine::probe::median(&v)
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

impl Default for ScoreWindow {
    fn default() -> Self {
        ScoreWindow::new(SCORE_WINDOW)
    }
}

/// The cheap part, redone periodically: power state, queue, pins and the score.
pub fn refresh(c: &mut Capabilities, cfg: &CapabilitiesSection, queue_len: u32) {
    let (battery, ac) = power(Path::new("/sys/class/power_supply"));
    c.battery_percent = battery;
    c.on_ac = ac;
    c.queue_len = queue_len;
    c.pinned = false;
    if let Some(v) = cfg.battery_percent {
        c.battery_percent = Some(v.clamp(0.0, 100.0));
        c.pinned = true;
    }
    if let Some(v) = cfg.on_ac {
        c.on_ac = Some(v);
        c.pinned = true;
    }
    if let Some(v) = cfg.ternary_gops {
        c.ternary_gops = v;
        c.pinned = true;
    }
    if let Some(v) = cfg.device_memory_bytes {
        c.device_memory_bytes = Some(v);
        c.pinned = true;
    }
    if let Some(v) = cfg.system_memory_bytes {
        c.system_memory_bytes = v;
        c.pinned = true;
    }
    if let Some(v) = &cfg.device {
        c.device = v.clone();
        c.pinned = true;
    }
    c.score = match cfg.score {
        Some(s) => {
            c.pinned = true;
            s
        }
        // A phone on battery should be asked only when nothing stronger is free.
        None if c.on_ac == Some(false) => c.ternary_gops * 0.5,
        None => c.ternary_gops,
    };
}

/// The memory the advert offers, less what the warm engines hold (they stay loaded between requests, so
/// the scheduler of another device must not count on it): the device memory where the device has its
/// own, else the system memory (where the engines then live). `total`: (device, system) memory as probed
/// and pinned.
pub fn offer_memory(c: &mut Capabilities, total: (Option<u64>, u64), warm_bytes: u64) {
    match total.0 {
        Some(d) => {
            c.device_memory_bytes = Some(d.saturating_sub(warm_bytes));
            c.system_memory_bytes = total.1;
        }
        None => {
            c.device_memory_bytes = None;
            c.system_memory_bytes = total.1.saturating_sub(warm_bytes);
        }
    }
}

fn vendor_name(id: u32) -> String {
    match id {
        0 => "cpu".into(),
        0x10de => "nvidia".into(),
        0x1002 | 0x1022 => "amd".into(),
        0x8086 => "intel".into(),
        0x106b => "apple".into(),
        0x13b5 => "arm".into(),
        0x5143 => "qualcomm".into(),
        0x10005 => "mesa".into(),
        other => format!("{other:#x}"),
    }
}

/// `MemTotal` from /proc/meminfo, in bytes (0 where unknown).
pub fn system_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// Device-local memory where the platform tells us: AMD's sysfs VRAM counter, NVIDIA's nvidia-smi; for a
/// software or CPU device the system RAM is its memory. Integrated GPUs share system RAM in amounts the
/// driver decides, so they report `None`.
fn device_memory(vendor: &str, device_type: &str, system: u64) -> Option<u64> {
    if device_type == "software" || device_type == "cpu" {
        return Some(system);
    }
    match vendor {
        "amd" => bitnode_engine::probe::device_memory(0x1002),
        "nvidia" => bitnode_engine::probe::device_memory(0x10de),
        _ => None,
    }
}

/// Battery percentage and AC state from `/sys/class/power_supply` (Linux and Android): `(None, None)`
/// when the directory or the values do not exist.
pub fn power(dir: &Path) -> (Option<f32>, Option<bool>) {
    let mut battery = None;
    let mut ac = None;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return (None, None);
    };
    for e in rd.flatten() {
        let p = e.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).ok().map(|s| s.trim().to_string());
        match read("type").as_deref() {
            Some("Battery") => {
                if let Some(v) = read("capacity").and_then(|s| s.parse::<f32>().ok()) {
                    battery = Some(v.clamp(0.0, 100.0));
                }
            }
            Some("Mains") | Some("USB") | Some("USB_C") | Some("USB_PD") => {
                if let Some(v) = read("online") {
                    ac = Some(ac.unwrap_or(false) || v == "1");
                }
            }
            _ => {}
        }
    }
    (battery, ac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_engines_are_taken_off_the_advertised_memory() {
        let mut c = Capabilities::default();
        // A GPU: its own memory shrinks, the system's stays.
        offer_memory(&mut c, (Some(8 << 30), 32 << 30), 1 << 30);
        assert_eq!(
            (c.device_memory_bytes, c.system_memory_bytes),
            (Some(7 << 30), 32 << 30)
        );
        // Recomputed from the totals each time, never from the last offer.
        offer_memory(&mut c, (Some(8 << 30), 32 << 30), 0);
        assert_eq!(c.device_memory_bytes, Some(8 << 30));
        // The CPU: the engines live in system memory.
        offer_memory(&mut c, (None, 32 << 30), 2 << 30);
        assert_eq!((c.device_memory_bytes, c.system_memory_bytes), (None, 30 << 30));
        // More warm than there is: nothing left, no wrap-around.
        offer_memory(&mut c, (Some(1 << 30), 32 << 30), 2 << 30);
        assert_eq!(c.device_memory_bytes, Some(0));
    }

    #[test]
    fn score_window_is_the_median_of_the_last_measurements() {
        let mut w = ScoreWindow::new(3);
        assert_eq!(w.value(), None);
        assert!(w.is_empty());
        w.push(1.0);
        assert_eq!(w.value(), Some(1.0));
        // One unlucky measurement cannot move the rate...
        w.push(0.26);
        w.push(1.1);
        assert_eq!(w.value(), Some(1.0));
        // ...but a lasting change does, once it is most of the window; the oldest value leaves first.
        w.push(0.3);
        assert_eq!(w.len(), 3);
        assert_eq!(w.value(), Some(0.3));
        w.push(f64::NAN);
        w.push(f64::INFINITY);
        assert_eq!(w.len(), 3);
        assert_eq!(w.value(), Some(0.3));
    }

    #[test]
    fn score_window_keeps_at_least_one() {
        let mut w = ScoreWindow::new(0);
        w.push(2.0);
        w.push(3.0);
        assert_eq!((w.len(), w.value()), (1, Some(3.0)));
        assert_eq!(ScoreWindow::default().cap, SCORE_WINDOW);
    }

    #[test]
    fn measure_is_off_with_the_benchmark() {
        let cfg = CapabilitiesSection {
            benchmark: false,
            ..Default::default()
        };
        assert_eq!(measure("cpu", &cfg), None);
        let cfg = CapabilitiesSection {
            benchmark_ms: 1,
            benchmark_samples: 2,
            ..Default::default()
        };
        assert!(measure("cpu", &cfg).is_some_and(|g| g > 0.0 && g.is_finite()));
    }
}

/// The capability exchange with one paired peer, as a state machine without I/O (like `crate::pairing`):
/// the network actor feeds it what happened on the capability protocol and carries out what it answers.
///
/// Adverts can be lost: sent before the peer finished pairing (it ignores them), or on a duplicate
/// connection that libp2p closed. So ours counts as delivered only once acknowledged (or once the peer
/// evidently trusts us), and one not delivered is sent again at the next tick ([`Exchange::due`]).
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    theirs: Option<Capabilities>,
    /// The peer treats us as paired: it sent us its capabilities or accepted ours. A node that unpaired
    /// us may still hold a connection for a moment, but it answers nothing, so it does not count as
    /// connected.
    mutual: bool,
    /// The peer acknowledged our current capabilities on this connection set.
    delivered: bool,
    /// An advert is on its way (sent, no answer or failure yet).
    in_flight: bool,
}

/// What to do with an advert the peer sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OnAdvert {
    /// Not paired: no answer at all (the stream is dropped).
    Ignore,
    /// Acknowledge it; and when `send_ours`, send ours again (ours may have arrived before the peer
    /// trusted us, the two sides finishing pairing a moment apart, and been ignored).
    Ack { send_ours: bool },
}

impl Exchange {
    /// The capabilities the peer advertised.
    pub fn theirs(&self) -> Option<&Capabilities> {
        self.theirs.as_ref()
    }

    pub fn mutual(&self) -> bool {
        self.mutual
    }

    /// Our advert went out.
    pub fn sent(&mut self) {
        self.in_flight = true;
    }

    /// Whether ours should go (again) now: not delivered and none on its way.
    pub fn due(&self) -> bool {
        !self.delivered && !self.in_flight
    }

    /// Ours changed: it has to be delivered again.
    pub fn ours_changed(&mut self) {
        self.delivered = false;
    }

    pub fn on_advert(&mut self, caps: Capabilities, trusted: bool) -> OnAdvert {
        if !trusted {
            return OnAdvert::Ignore;
        }
        self.theirs = Some(caps);
        self.mutual = true;
        let send_ours = !self.delivered;
        // Optimistic, so two peers that both missed each other's advert do not bounce resends; a failed
        // delivery clears it again.
        self.delivered = true;
        OnAdvert::Ack { send_ours }
    }

    /// The peer answered our advert: `ok` when it acknowledged it (a refusal leaves it undelivered).
    pub fn on_answer(&mut self, ok: bool, trusted: bool) {
        self.in_flight = false;
        if ok && trusted {
            self.mutual = true;
            self.delivered = true;
        }
    }

    /// Our advert did not arrive.
    pub fn on_failure(&mut self) {
        self.delivered = false;
        self.in_flight = false;
    }

    /// The peer's last connection closed: everything is exchanged again on the next one (what it
    /// advertised stays, for `bitnode peers`, until then).
    pub fn on_disconnected(&mut self) {
        self.mutual = false;
        self.delivered = false;
        self.in_flight = false;
    }
}

#[cfg(test)]
mod exchange_tests {
    use super::*;

    fn caps(score: f64) -> Capabilities {
        Capabilities {
            score,
            ..Default::default()
        }
    }

    #[test]
    fn an_advert_counts_once_acknowledged_and_is_resent_until_then() {
        let mut e = Exchange::default();
        assert!(e.due() && !e.mutual());
        e.sent();
        assert!(!e.due(), "one advert in flight at a time");
        // The peer had not finished pairing: it refused (or dropped) ours.
        e.on_answer(false, true);
        assert!(e.due() && !e.mutual());
        e.sent();
        e.on_failure();
        assert!(e.due());
        e.sent();
        e.on_answer(true, true);
        assert!(!e.due() && e.mutual());
        // Ours changed: delivered again.
        e.ours_changed();
        assert!(e.due());
        // Disconnected: the next connection starts over, but what they advertised stays.
        e.on_advert(caps(2.0), true);
        e.on_disconnected();
        assert!(e.due() && !e.mutual());
        assert_eq!(e.theirs().map(|c| c.score), Some(2.0));
    }

    #[test]
    fn their_advert_is_taken_only_from_a_paired_peer_and_asks_for_ours_once() {
        let mut e = Exchange::default();
        assert_eq!(e.on_advert(caps(1.0), false), OnAdvert::Ignore);
        assert!(e.theirs().is_none() && !e.mutual());
        // Paired, and ours never arrived: acknowledge and send ours again.
        assert_eq!(e.on_advert(caps(1.0), true), OnAdvert::Ack { send_ours: true });
        assert!(e.mutual());
        // Their next advert (a change on their side) does not bounce ours back.
        assert_eq!(e.on_advert(caps(3.0), true), OnAdvert::Ack { send_ours: false });
        assert_eq!(e.theirs().map(|c| c.score), Some(3.0));
        // An acknowledgement from a peer no longer paired does not count.
        let mut f = Exchange::default();
        f.sent();
        f.on_answer(true, false);
        assert!(f.due() && !f.mutual());
    }
}
