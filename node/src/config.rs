//! `config.toml` in the bitnode home. Every key is documented, with its default, in
//! `configs/bitnode.example.toml`. Command-line flags override environment variables, which override
//! this file.
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: NodeSection,
    #[serde(default)]
    pub network: NetworkSection,
    #[serde(default)]
    pub relay: RelaySection,
    #[serde(default)]
    pub capabilities: CapabilitiesSection,
    #[serde(default)]
    pub engine: EngineSection,
    #[serde(default)]
    pub jobs: JobsSection,
    #[serde(default)]
    pub api: ApiSection,
    #[serde(default)]
    pub serve: ServeSection,
}

/// `[serve]`: the engines a device keeps warm for inference (`crate::host`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeSection {
    /// Run inference on warm engines in a long-lived engine host; false: a new process per job.
    pub warm_engines: bool,
    /// Bytes of models kept loaded at once; 0: half of the device memory this device advertises.
    pub memory_budget_bytes: u64,
    /// A warm engine unused this long is dropped (and the host exits with none left).
    pub idle_secs: u64,
    /// Most inferences a device runs at once on its warm engines; those for one model decode together,
    /// one token each per step (continuous batching). 0 counts as 1.
    pub max_batch: usize,
}

impl Default for ServeSection {
    fn default() -> Self {
        ServeSection {
            warm_engines: true,
            memory_budget_bytes: 0,
            idle_secs: 600,
            max_batch: 16,
        }
    }
}

/// `[api]`: the OpenAI-compatible HTTP API every daemon serves (`daemon/http.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// host:port to listen on; port 0 picks a free one (`bitnode status` shows it). "off": no API.
    pub listen: String,
    /// When set, every request needs `Authorization: Bearer <token>`. A listen address that is not
    /// loopback needs one.
    pub token: Option<String>,
    /// Web origins (such as "http://localhost:3000") whose pages may call the API (CORS). Requests from
    /// any other origin are refused.
    pub cors_origins: Vec<String>,
    /// Largest request body, bytes.
    pub max_request_bytes: u64,
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            listen: "127.0.0.1:7879".into(),
            token: None,
            cors_origins: vec![],
            max_request_bytes: 4 << 20,
        }
    }
}

/// `[jobs]`: what this node accepts from paired peers and how it watches the jobs it delegates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsSection {
    /// Run jobs from paired peers at all.
    pub accept_remote: bool,
    /// Largest dataset a job may carry, bytes.
    pub max_dataset_bytes: u64,
    /// Largest checkpoint or adapter that travels in one message (results, failover resumes), bytes.
    pub max_checkpoint_bytes: u64,
    /// Largest model (directory) this node downloads from a submitter, bytes.
    pub max_model_bytes: u64,
    /// Jobs waiting here (not yet started) at once; more are refused. Running jobs are bounded apart:
    /// up to `[serve] max_batch` inferences together, a fine-tune alone.
    pub max_queue: usize,
    /// Take jobs from other devices while running on battery.
    pub run_on_battery: bool,
    /// A worker sends a heartbeat this often while it holds a job.
    pub heartbeat_secs: u64,
    /// A delegated job whose worker is silent (or disconnected) this long moves to the next device.
    pub heartbeat_timeout_secs: u64,
    /// Delegated fine-tunes without --save-every checkpoint (and stream the checkpoint back) every N steps.
    pub checkpoint_every: usize,
    /// Devices tried for one job before it fails.
    pub max_attempts: u32,
    /// How long a worker holds a finished job's result for a submitter that went away (crashed,
    /// restarted, a phone that killed the app), resending it until the submitter is back.
    pub retention_secs: u64,
    /// Results a worker holds at once for absent submitters, bytes; beyond it the oldest are dropped.
    pub max_retained_bytes: u64,
    /// After a restart, how long a submitter waits for the worker of each of its jobs to reconnect before
    /// it places the job again from its last checkpoint.
    pub reattach_secs: u64,
}

impl JobsSection {
    /// Largest job envelope: a dataset and a resume checkpoint at their limits, plus 1 MiB of framing.
    pub fn max_job_message(&self) -> usize {
        (self.max_dataset_bytes.saturating_add(self.max_checkpoint_bytes) as usize).saturating_add(1 << 20)
    }

    /// Largest update envelope: a checkpoint or adapter at its limit, plus 1 MiB of framing.
    pub fn max_update_message(&self) -> usize {
        (self.max_checkpoint_bytes as usize).saturating_add(1 << 20)
    }
}

impl Default for JobsSection {
    fn default() -> Self {
        JobsSection {
            accept_remote: true,
            max_dataset_bytes: 16 << 20,
            max_checkpoint_bytes: 256 << 20,
            max_model_bytes: 16 << 30,
            max_queue: 32,
            run_on_battery: false,
            heartbeat_secs: 2,
            heartbeat_timeout_secs: 8,
            checkpoint_every: 10,
            max_attempts: 3,
            retention_secs: 3600,
            max_retained_bytes: 1 << 30,
            reattach_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Name shown to paired peers. Default: the host name.
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// Listen multiaddrs. `bitnode start --listen` replaces the whole list.
    pub listen: Vec<String>,
    /// Multiaddrs (ending in /p2p/<peer id>) of paired nodes to dial at start, besides the addresses the
    /// trust list remembers.
    pub bootstrap: Vec<String>,
    /// Find paired peers on the LAN by mDNS.
    pub mdns: bool,
    /// Pre-shared mesh key, 64 hex characters (32 bytes): a second lock, on top of pairing. Turns QUIC off.
    pub psk: Option<String>,
    /// Seconds between redial rounds for paired peers that are not connected (backs off up to 12x).
    pub reconnect_secs: u64,
}

impl Default for NetworkSection {
    fn default() -> Self {
        NetworkSection {
            listen: vec!["/ip4/0.0.0.0/tcp/7878".into(), "/ip4/0.0.0.0/udp/7878/quic-v1".into()],
            bootstrap: vec![],
            mdns: true,
            psk: None,
            reconnect_secs: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySection {
    /// Serve as the relay of the owner's mesh (for paired peers only). Same as `bitnode start --relay-server`.
    pub enabled: bool,
    /// Reserve a relayed address on every paired peer that runs a relay, so devices behind NAT stay
    /// reachable (DCUtR then upgrades relayed connections to direct ones).
    pub use_paired_relays: bool,
    /// Relays to use (multiaddrs ending in /p2p/<peer id>); each must be a paired node.
    pub addresses: Vec<String>,
    /// Longest life of one relayed connection, seconds (libp2p's default of 120 would cut jobs).
    pub max_circuit_duration_secs: u64,
    /// Most bytes one relayed connection may carry (libp2p's default is 128 KiB).
    pub max_circuit_bytes: u64,
    pub max_reservations: usize,
    pub max_circuits: usize,
}

impl Default for RelaySection {
    fn default() -> Self {
        RelaySection {
            enabled: false,
            use_paired_relays: true,
            addresses: vec![],
            max_circuit_duration_secs: 24 * 3600,
            max_circuit_bytes: 1 << 34,
            max_reservations: 128,
            max_circuits: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapabilitiesSection {
    /// Run the ternary matmul micro-benchmark at start (off: score from pins only, else 0).
    pub benchmark: bool,
    /// Milliseconds the benchmark may spend timing (all samples together).
    pub benchmark_ms: u64,
    /// Samples the benchmark splits `benchmark_ms` into; the advertised rate is their median.
    pub benchmark_samples: usize,
    /// Seconds between re-measurements while the daemon runs (each one `benchmark_ms` long; the score is the
    /// median of the last few); 0 = measure only at start.
    pub remeasure_secs: u64,
    /// Pins: any value set here replaces the measured one and marks the advert `pinned`.
    pub score: Option<f64>,
    pub ternary_gops: Option<f64>,
    pub device_memory_bytes: Option<u64>,
    pub system_memory_bytes: Option<u64>,
    pub device: Option<String>,
    /// Power pins (a "phone on battery" for tests and demos): battery percentage and mains power.
    pub battery_percent: Option<f32>,
    pub on_ac: Option<bool>,
}

impl Default for CapabilitiesSection {
    fn default() -> Self {
        CapabilitiesSection {
            benchmark: true,
            benchmark_ms: 300,
            benchmark_samples: 5,
            remeasure_secs: 600,
            score: None,
            ternary_gops: None,
            device_memory_bytes: None,
            system_memory_bytes: None,
            device: None,
            battery_percent: None,
            on_ac: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    /// "auto", "cpu", an index from `bitnode devices`, or a substring of the adapter name.
    pub adapter: Option<String>,
    /// Cap on any one buffer / binding, in bytes (forces tiling below the adapter's own limit).
    pub max_binding: Option<u64>,
    /// "auto", "f16" or "f32": storage of the embedding and lm_head on the device.
    pub embed_dtype: Option<String>,
}

/// `--home`, else `$BITNODE_HOME`, else the platform data directory.
pub fn home(flag: Option<&Path>) -> PathBuf {
    if let Some(h) = flag {
        return h.to_path_buf();
    }
    if let Some(h) = std::env::var_os("BITNODE_HOME") {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("bitnode");
    }
    if let Some(h) = std::env::var_os("HOME") {
        let h = PathBuf::from(h);
        if cfg!(target_os = "macos") {
            return h.join("Library/Application Support/bitnode");
        }
        return h.join(".local/share/bitnode");
    }
    PathBuf::from(".bitnode")
}

/// The `config.toml` that `bitnode init` writes: every key commented out at its default, so the file
/// documents itself and an upgrade that changes a default is not masked by a stale copy.
pub fn initial_config(name: &str) -> String {
    let example = include_str!("../../configs/bitnode.example.toml");
    let mut out = String::new();
    for line in example.lines() {
        if line.starts_with("# name = ") {
            out.push_str(&format!("name = {:?}\n", name));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The host name, for a default device name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "bitnode".into())
}

impl Config {
    /// Reads `<home>/config.toml`; a missing file is the default config, a malformed one is an error.
    pub fn load(home: &Path) -> anyhow::Result<Config> {
        let path = home.join("config.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }
}
