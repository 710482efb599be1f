//! The bitnode node: configuration, identity, trust list, capability probe, the libp2p mesh and the daemon
//! with its control socket. The `bitnode` binary (main.rs) is a thin CLI over this library.
pub mod api;
pub mod bench_mesh;
pub mod bench_serve;
pub mod caps;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod exec;
pub mod fsutil;
pub mod host;
pub mod http_client;
pub mod identity;
pub mod jobs;
pub mod models;
pub mod names;
pub mod net;
pub mod openai;
pub mod paired_only;
pub mod pairing;
pub mod schedule;
pub mod store;
pub mod submit;
pub mod transfer;
pub mod trust;

use anyhow::Context;
use std::path::Path;

/// `bitnode init`: a new identity and a commented `config.toml` in `home`. An existing identity is never
/// replaced (it would silently unpair the device from every peer); returns whether anything was created.
pub fn init(home: &Path, name: Option<&str>) -> anyhow::Result<bool> {
    std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
    let _ = std::fs::set_permissions(home, std::os::unix::fs::PermissionsExt::from_mode(0o700));
    if let Some(n) = name {
        bitnode_protocol::wire::check_name(n).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    }
    if identity::exists(home) {
        return Ok(false);
    }
    identity::create(home)?;
    let cfg = home.join("config.toml");
    if !cfg.exists() {
        let name = name.map(str::to_string).unwrap_or_else(config::hostname);
        fsutil::write_private(&cfg, config::initial_config(&name).as_bytes())?;
    }
    Ok(true)
}
