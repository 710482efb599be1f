//! The node's ed25519 identity: `<home>/identity.key`, libp2p's protobuf encoding of the keypair, mode 0600.
//! The peer id derived from it is the device's name on the mesh; pairing records peer ids, so losing this
//! file means pairing again.
use anyhow::{bail, Context};
use libp2p::identity::Keypair;
use std::path::{Path, PathBuf};

pub fn path(home: &Path) -> PathBuf {
    home.join("identity.key")
}

pub fn exists(home: &Path) -> bool {
    path(home).exists()
}

pub fn load(home: &Path) -> anyhow::Result<Keypair> {
    let p = path(home);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{} does not exist: run `bitnode init` first", p.display())
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    Keypair::from_protobuf_encoding(&bytes)
        .with_context(|| format!("{} is not a valid bitnode identity (corrupt?)", p.display()))
}

/// Creates a new identity; refuses to replace an existing one.
pub fn create(home: &Path) -> anyhow::Result<Keypair> {
    let p = path(home);
    if p.exists() {
        bail!("{} already exists", p.display());
    }
    let kp = Keypair::generate_ed25519();
    let bytes = kp.to_protobuf_encoding().context("encoding the new identity")?;
    crate::fsutil::write_private(&p, &bytes)?;
    Ok(kp)
}
