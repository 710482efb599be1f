//! `config.toml` in the bitnode home. Every key is documented, with its default, in
//! `configs/bitnode.example.toml`. Command-line flags override environment variables, which override
//! this file.
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub engine: EngineSection,
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
