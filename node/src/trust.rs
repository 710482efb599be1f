//! The trust list: the peers this node is paired with, `<home>/trust.json` (0600, written atomically).
//! A peer id embeds the peer's ed25519 public key, so recording the id is recording the key.
use anyhow::Context;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Last-known addresses kept per peer (for reconnecting after a restart).
const MAX_ADDRS: usize = 16;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrustedPeer {
    pub name: String,
    /// Unix seconds.
    pub added: u64,
    /// "invite" (we invited it), "join" (we joined its invite) or "manual" (`bitnode pair add`).
    pub via: String,
    /// Where we last reached it or where it said it listens; dialed to reconnect.
    #[serde(default)]
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrustList {
    pub version: u32,
    /// Keyed by peer id (base58).
    pub peers: BTreeMap<String, TrustedPeer>,
}

pub fn path(home: &Path) -> PathBuf {
    home.join("trust.json")
}

/// The name a peer gets when none was given or the one it sent is unusable: `peer-` and the start of its id.
pub fn default_name(id: &PeerId) -> String {
    let b58 = id.to_base58();
    format!("peer-{}", &b58[..8.min(b58.len())])
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TrustList {
    /// A missing file is an empty list; a corrupt one is an error (never silently forget pairings).
    pub fn load(home: &Path) -> anyhow::Result<TrustList> {
        let p = path(home);
        match std::fs::read(&p) {
            Ok(b) => {
                let t: TrustList = serde_json::from_slice(&b)
                    .with_context(|| format!("{} is corrupt; fix or remove it (it lists paired peers)", p.display()))?;
                for id in t.peers.keys() {
                    id.parse::<PeerId>()
                        .with_context(|| format!("{}: {id:?} is not a peer id", p.display()))?;
                }
                Ok(t)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TrustList {
                version: 1,
                ..Default::default()
            }),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    pub fn save(&self, home: &Path) -> anyhow::Result<()> {
        crate::fsutil::write_private(&path(home), &self.to_bytes()?)
    }

    /// The file's contents (for the daemon's store actor, which writes it off the event loop).
    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        Ok(serde_json::to_vec_pretty(self)?)
    }

    /// The list as `bitnode pair list --json` prints it.
    pub fn entries(&self) -> Vec<crate::api::TrustEntry> {
        self.peers
            .iter()
            .map(|(id, p)| crate::api::TrustEntry {
                id: id.clone(),
                name: p.name.clone(),
                added: p.added,
                via: p.via.clone(),
                addresses: p.addresses.clone(),
            })
            .collect()
    }

    pub fn ids(&self) -> Vec<PeerId> {
        self.peers.keys().filter_map(|k| k.parse().ok()).collect()
    }

    pub fn get(&self, id: &PeerId) -> Option<&TrustedPeer> {
        self.peers.get(&id.to_base58())
    }

    pub fn contains(&self, id: &PeerId) -> bool {
        self.peers.contains_key(&id.to_base58())
    }

    /// Adds or renames a peer; keeps known addresses. Returns whether anything changed.
    pub fn add(&mut self, id: &PeerId, name: &str, via: &str, addrs: &[Multiaddr]) -> bool {
        let key = id.to_base58();
        let before = self.peers.get(&key).cloned();
        let e = self.peers.entry(key).or_insert_with(|| TrustedPeer {
            name: name.to_string(),
            added: now_unix(),
            via: via.to_string(),
            addresses: vec![],
        });
        e.name = name.to_string();
        for a in addrs {
            merge_addr(&mut e.addresses, a);
        }
        before.as_ref() != Some(e)
    }

    pub fn remove(&mut self, id: &PeerId) -> Option<TrustedPeer> {
        self.peers.remove(&id.to_base58())
    }

    /// Records addresses a peer was seen at; returns whether the list changed.
    pub fn note_addrs(&mut self, id: &PeerId, addrs: &[Multiaddr]) -> bool {
        let Some(e) = self.peers.get_mut(&id.to_base58()) else {
            return false;
        };
        let before = e.addresses.clone();
        for a in addrs {
            merge_addr(&mut e.addresses, a);
        }
        before != e.addresses
    }

    /// Resolves a peer given as a peer id or as its name.
    pub fn resolve(&self, who: &str) -> Option<PeerId> {
        if let Ok(id) = who.parse::<PeerId>() {
            return Some(id);
        }
        let hits: Vec<&String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.name == who)
            .map(|(k, _)| k)
            .collect();
        match hits.as_slice() {
            [one] => one.parse().ok(),
            _ => None,
        }
    }
}

/// New addresses go first; the list is bounded, so the oldest fall off.
fn merge_addr(list: &mut Vec<String>, a: &Multiaddr) {
    let s = a.to_string();
    if !list.contains(&s) {
        list.insert(0, s);
        list.truncate(MAX_ADDRS);
    }
}
