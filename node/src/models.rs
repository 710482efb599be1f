//! The model store (Mesh II): models addressed by content hash, so a worker that already holds a model
//! skips the transfer, and a remote job can only ever name a model inside this store, never a path.
//!
//! The hash is SHA-256 over the model directory's regular files in name order, each as
//! `name \0 length(le u64) bytes`: renaming, truncating or changing any file changes it. Imported models
//! live in `<home>/models/by-hash/<64 hex digits>/`, written to a temporary directory and renamed into
//! place, so a half-copied model is never visible under its hash.
use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The files of a model directory that make up the model, in name order.
fn model_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = vec![];
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        if e.file_type()?.is_file() {
            let name = e.file_name();
            let n = name.to_string_lossy();
            if !n.starts_with('.') {
                files.push(e.path());
            }
        }
    }
    files.sort();
    if !files.iter().any(|f| f.file_name().is_some_and(|n| n == "config.json")) {
        bail!("{} has no config.json: not a model directory", dir.display());
    }
    Ok(files)
}

/// SHA-256 content hash of a model directory, as 64 lowercase hex digits.
pub fn content_hash(dir: &Path) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in model_files(dir)? {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut file = std::fs::File::open(&f).with_context(|| format!("opening {}", f.display()))?;
        let len = file.metadata()?.len();
        h.update(name.as_bytes());
        h.update([0u8]);
        h.update(len.to_le_bytes());
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

pub struct Store {
    root: PathBuf,
}

/// A well-formed hash: exactly 64 lowercase hex digits (nothing that could be a path).
pub fn valid_hash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Store {
    pub fn new(home: &Path) -> Store {
        Store {
            root: home.join("models").join("by-hash"),
        }
    }

    /// The directory of model `hash`, if the store holds it. Anything but a well-formed hash is refused.
    pub fn resolve(&self, hash: &str) -> anyhow::Result<Option<PathBuf>> {
        if !valid_hash(hash) {
            bail!("{hash:?} is not a model hash (64 lowercase hex digits)");
        }
        let d = self.root.join(hash);
        Ok(d.join("config.json").is_file().then_some(d))
    }

    /// Copies the model in `dir` into the store (unless already there) and returns its hash.
    pub fn import(&self, dir: &Path) -> anyhow::Result<String> {
        let hash = content_hash(dir)?;
        if self.resolve(&hash)?.is_some() {
            return Ok(hash);
        }
        std::fs::create_dir_all(&self.root).with_context(|| format!("creating {}", self.root.display()))?;
        let tmp = self.root.join(format!(".import-{hash}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        for f in model_files(dir)? {
            let name = f.file_name().context("file without a name")?;
            std::fs::copy(&f, tmp.join(name)).with_context(|| format!("copying {}", f.display()))?;
        }
        // The copy must still be the model we hashed (it could have changed while we copied).
        let check = content_hash(&tmp)?;
        if check != hash {
            let _ = std::fs::remove_dir_all(&tmp);
            bail!("{} changed while it was being imported", dir.display());
        }
        std::fs::rename(&tmp, self.root.join(&hash))?;
        Ok(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bitnode-models-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn models_are_found_by_content_and_only_by_hash() {
        let m = dir("model");
        std::fs::write(m.join("config.json"), b"{\"model_type\": \"bitnet\"}").expect("write");
        std::fs::write(m.join("model.safetensors"), vec![7u8; 3000]).expect("write");
        let h = content_hash(&m).expect("hash");
        assert!(valid_hash(&h));
        assert_eq!(content_hash(&m).expect("again"), h);
        let store = Store::new(&dir("home"));
        assert!(store.resolve(&h).expect("valid").is_none());
        assert_eq!(store.import(&m).expect("import"), h);
        let got = store.resolve(&h).expect("valid").expect("present");
        assert_eq!(content_hash(&got).expect("hash of the copy"), h);
        for bad in ["../../etc", "", &h[..63], &h.to_uppercase(), "/tmp/x"] {
            assert!(store.resolve(bad).is_err(), "{bad:?} accepted");
        }
        // Any change to any file changes the hash.
        std::fs::write(m.join("model.safetensors"), vec![7u8; 2999]).expect("write");
        assert_ne!(content_hash(&m).expect("hash"), h);
    }
}
