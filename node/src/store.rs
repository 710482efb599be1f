//! The store actor: the daemon's state files (the job table, the trust list) are written on this thread,
//! never on the event loop, so a slow disk cannot hold up heartbeats, pings or pairing.
//!
//! Writes are coalesced per file: the event loop hands over the file's new contents and goes on; if the
//! thread is still busy with an earlier write, a later version of the same file replaces the pending one
//! (only the newest state matters, and each write is atomic: [`crate::fsutil::write_private`]). So a
//! burst of job updates costs one or two fsyncs, not one each. [`StateWriter::flush`] waits until
//! everything handed over is on disk (the daemon calls it before it exits).
//!
//! `BITNODE_TEST_STORE_DELAY_MS` delays every write by that much: the tests use it to show that a slow
//! disk does not delay the daemon's heartbeats. It is a real delay on the real write path, not a mock.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

#[derive(Default)]
struct Pending {
    files: BTreeMap<PathBuf, Vec<u8>>,
    /// A write is in progress (taken off `files`, not yet on disk).
    busy: bool,
    stop: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves plain data behind; keep going with it.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handle to the writer thread. Cloning shares the thread; it stops when the last handle is dropped.
#[derive(Clone)]
pub struct StateWriter {
    shared: Arc<Shared>,
    _thread: Arc<Stopper>,
}

/// Stops and joins the thread when the last handle goes, after writing what is pending.
struct Stopper {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl StateWriter {
    pub fn start() -> std::io::Result<StateWriter> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            changed: Condvar::new(),
        });
        let delay = std::env::var("BITNODE_TEST_STORE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("bitnode-store".into())
            .spawn(move || writer(&s, delay))?;
        Ok(StateWriter {
            _thread: Arc::new(Stopper {
                shared: shared.clone(),
                thread: Mutex::new(Some(thread)),
            }),
            shared,
        })
    }

    /// Schedules `bytes` as the new contents of `path` (replacing a version not yet written).
    pub fn save(&self, path: PathBuf, bytes: Vec<u8>) {
        self.shared.lock().files.insert(path, bytes);
        self.shared.changed.notify_all();
    }

    /// Blocks until everything scheduled so far is on disk.
    pub fn flush(&self) {
        let mut p = self.shared.lock();
        while !p.files.is_empty() || p.busy {
            p = self.shared.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn writer(s: &Shared, delay: Option<Duration>) {
    loop {
        let batch = {
            let mut p = s.lock();
            while p.files.is_empty() && !p.stop {
                p = s.changed.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            if p.files.is_empty() {
                return;
            }
            p.busy = true;
            std::mem::take(&mut p.files)
        };
        for (path, bytes) in batch {
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
            if let Err(e) = crate::fsutil::write_private(&path, &bytes) {
                tracing::error!("writing {}: {e:#}", path.display());
            }
        }
        s.lock().busy = false;
        s.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_version_of_each_file_lands_and_flush_waits_for_it() {
        let d = std::env::temp_dir().join(format!("bitnode-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let w = StateWriter::start().expect("thread");
        for i in 0..200u32 {
            w.save(d.join("a.json"), format!("a{i}").into_bytes());
            w.save(d.join("b.json"), format!("b{i}").into_bytes());
        }
        w.flush();
        assert_eq!(std::fs::read(d.join("a.json")).expect("a"), b"a199");
        assert_eq!(std::fs::read(d.join("b.json")).expect("b"), b"b199");
        // Pending writes survive the last handle going away.
        w.save(d.join("a.json"), b"last".to_vec());
        drop(w);
        assert_eq!(std::fs::read(d.join("a.json")).expect("a"), b"last");
        let _ = std::fs::remove_dir_all(&d);
    }
}
