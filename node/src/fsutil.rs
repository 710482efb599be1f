//! Crash-safe writes of the node's state (identity, trust list): write a temporary file in the same
//! directory, fsync it, rename it over the target, fsync the directory. A crash at any point leaves either
//! the old file or the new one, never a torn mix; a stale temporary file is ignored by readers.
use anyhow::Context;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `bytes` to `path` atomically, readable and writable by the owner only (0600).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_private_with(path, bytes, true)
}

/// As [`write_private`] (atomic, 0600) but without the fsyncs, for files that do not outlive what they
/// serve: a job's `job.json` is laid out again whenever the job starts, and a crash ends its process
/// anyway. Two fsyncs on every request's path measured as tens of milliseconds of time to first token
/// on some disks.
pub fn write_private_scratch(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_private_with(path, bytes, false)
}

fn write_private_with(path: &Path, bytes: &[u8], sync: bool) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", tmp.display()))?;
    if sync {
        f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    }
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if sync {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
