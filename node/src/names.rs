//! Named models: `bitnode model add DIR --name NAME` imports a model (or adapter) into the content-addressed
//! store and records NAME -> hash in `<home>/models/names.json`. Names are what the HTTP API's `model` and
//! `adapter` fields take; a content hash works too.
//!
//! The CLI edits the names with or without a running daemon, and the daemon reads them on every request,
//! so every change takes `<home>/models/names.lock` (an advisory `flock`, released when the file closes)
//! and is written atomically: two writers never interleave, and a reader sees the old or the new file.
use crate::fsutil::write_private;
use crate::models::{valid_hash, Store};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One named entry, as `bitnode model list --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedModel {
    pub name: String,
    pub hash: String,
    /// "model" or "adapter" (an `adapter_config.json` marks an adapter).
    pub kind: String,
    /// When it was added (Unix seconds).
    pub added_unix: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct NamesFile {
    #[serde(default)]
    models: BTreeMap<String, NamedModel>,
}

pub fn path(home: &Path) -> PathBuf {
    home.join("models").join("names.json")
}

/// A name: 1 to 64 characters of letters, digits and `.-_:`, not 64 hex digits (that reads as a hash).
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
        && !name.starts_with('.');
    if !ok {
        bail!("{name:?} is not a model name (1 to 64 of letters, digits and . _ - :, not starting with a dot)");
    }
    if valid_hash(name) {
        bail!("{name:?} looks like a content hash; pick another name");
    }
    Ok(())
}

fn read(home: &Path) -> anyhow::Result<NamesFile> {
    let p = path(home);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NamesFile::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Runs `f` on the names under the lock and writes them back when it returns Ok.
fn edit<T>(home: &Path, f: impl FnOnce(&mut NamesFile) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let dir = home.join("models");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("names.lock"))
        .context("opening the model names' lock")?;
    lock.lock().context("locking the model names")?;
    let mut names = read(home)?;
    let out = f(&mut names)?;
    write_private(&path(home), &serde_json::to_vec_pretty(&names)?)?;
    Ok(out)
}

/// Every named entry, sorted by name.
pub fn list(home: &Path) -> anyhow::Result<Vec<NamedModel>> {
    Ok(read(home)?.models.into_values().collect())
}

/// Imports `dir` into the store (a no-op when it is there already) and names it; an existing name is
/// pointed at the new content. The name defaults to the directory's name.
pub fn add(home: &Path, dir: &Path, name: Option<&str>) -> anyhow::Result<NamedModel> {
    let name = match name {
        Some(n) => n.to_string(),
        None => dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .context("the directory has no name; pass --name")?,
    };
    check_name(&name)?;
    let kind = if dir.join("adapter_config.json").is_file() {
        "adapter"
    } else if bitnode_engine::lora::is_gguf_adapter(dir) {
        // A llama.cpp LoRA GGUF: checked against a base model when a job applies it.
        "adapter"
    } else if dir.join("config.json").is_file() {
        "model"
    } else if bitnode_engine::model::is_gguf(dir) {
        // Read its header now: a file that is not a BitNet GGUF model is refused with the reader's reason
        // before it is copied into the store.
        bitnode_engine::model::load_config(dir).with_context(|| format!("reading {}", dir.display()))?;
        "model"
    } else {
        bail!(
            "{} is neither a model directory (config.json), a GGUF model file, an adapter directory \
             (adapter_config.json) nor a LoRA GGUF file",
            dir.display()
        );
    };
    // The import (copy and hash) runs outside the lock: it can take minutes for a large model.
    let hash = Store::new(home).import(dir)?;
    let entry = NamedModel {
        name: name.clone(),
        hash,
        kind: kind.into(),
        added_unix: crate::trust::now_unix(),
    };
    let e = entry.clone();
    edit(home, move |n| {
        n.models.insert(name, e);
        Ok(())
    })?;
    Ok(entry)
}

/// Forgets a name. The content stays in the store (another name, or a job, may use it).
pub fn remove(home: &Path, name: &str) -> anyhow::Result<NamedModel> {
    edit(home, |n| {
        n.models
            .remove(name)
            .with_context(|| format!("no model is named {name:?} (see `bitnode model list`)"))
    })
}

/// A name or a content hash -> the hash, when this device's store holds it (None: not here).
pub fn resolve(home: &Path, name_or_hash: &str) -> anyhow::Result<Option<NamedModel>> {
    if valid_hash(name_or_hash) {
        let dir = Store::new(home).resolve(name_or_hash)?;
        return Ok(dir.map(|d| NamedModel {
            name: name_or_hash.to_string(),
            hash: name_or_hash.to_string(),
            kind: if d.join("adapter_config.json").is_file() {
                "adapter".into()
            } else {
                "model".into()
            },
            added_unix: 0,
        }));
    }
    let Some(m) = read(home)?.models.remove(name_or_hash) else {
        return Ok(None);
    };
    // A name whose content was removed from the store by hand names nothing.
    Ok(Store::new(home).resolve(&m.hash)?.map(|_| m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_dir(root: &Path, name: &str, body: &str) -> PathBuf {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config.json"), body).unwrap();
        d
    }

    #[test]
    fn names_are_added_resolved_listed_and_removed_under_the_lock() {
        let t = std::env::temp_dir().join(format!("bitnode-names-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        let home = t.join("home");
        let a = model_dir(&t, "tiny-a", "{\"a\":1}");
        let b = model_dir(&t, "other", "{\"b\":2}");
        let e = add(&home, &a, None).unwrap();
        assert_eq!((e.name.as_str(), e.kind.as_str()), ("tiny-a", "model"));
        assert_eq!(resolve(&home, "tiny-a").unwrap().unwrap().hash, e.hash);
        assert_eq!(
            resolve(&home, &e.hash).unwrap().unwrap().hash,
            e.hash,
            "a hash works too"
        );
        // A name is re-pointed by a second add.
        let e2 = add(&home, &b, Some("tiny-a")).unwrap();
        assert_ne!(e2.hash, e.hash);
        assert_eq!(resolve(&home, "tiny-a").unwrap().unwrap().hash, e2.hash);
        assert_eq!(list(&home).unwrap().len(), 1);
        assert!(add(&home, &a, Some("bad name")).is_err());
        assert!(add(&home, &a, Some(&e.hash)).is_err(), "a hash is not a name");
        assert!(add(&home, &t.join("missing"), Some("x")).is_err());
        assert!(resolve(&home, "nope").unwrap().is_none());
        assert_eq!(remove(&home, "tiny-a").unwrap().hash, e2.hash);
        assert!(remove(&home, "tiny-a").is_err());
        assert!(list(&home).unwrap().is_empty());
        // A corrupt file is reported, never silently replaced.
        std::fs::write(path(&home), b"{not json").unwrap();
        assert!(list(&home).unwrap_err().to_string().contains("corrupt"));
        assert!(add(&home, &a, None).is_err());
        let _ = std::fs::remove_dir_all(&t);
    }
}
