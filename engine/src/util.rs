//! Small shared helpers.
use crate::error::{EngineError, Result};
use std::io::Write;
use std::path::Path;

/// Writes a file atomically: a temporary file in the same directory, fsync, rename. A crash leaves either
/// the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| EngineError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| EngineError::io(&tmp, e))?;
    f.sync_all().map_err(|e| EngineError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| EngineError::io(path, e))?;
    Ok(())
}

/// Bytes as a short human figure in binary units ("2.61 GiB").
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Parses a byte count: a plain number, or one with a unit (K, M, G, T with optional "iB"/"B"; decimal
/// units KB/MB/GB are powers of 1000, the rest powers of 1024), e.g. `3GiB`, `1.5G`, `3000000000`.
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count (try 3GiB or 3000000000)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        u => {
            return Err(format!(
                "unknown unit {u:?} in {s:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB)"
            ))
        }
    };
    let v = n * mult;
    if !v.is_finite() || v < 1.0 || v > u64::MAX as f64 {
        return Err(format!("{s:?} is not a usable byte count"));
    }
    Ok(v as u64)
}

/// Threads for converting weights at load: the machine's (`available_parallelism`, which follows CPU
/// affinity and cgroup quotas), so a 16-core server and a 4-core phone each use what they have.
pub fn load_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `f` on every item on up to `threads` scoped threads, each taking the next item as it finishes
/// one (items of uneven cost balance themselves), and returns the results in the items' order.
pub fn parallel_map<T: Send, R: Send>(items: Vec<T>, threads: usize, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let n = items.len();
    let threads = threads.clamp(1, n.max(1));
    if threads == 1 {
        return items.into_iter().map(f).collect();
    }
    let queue = std::sync::Mutex::new(items.into_iter().enumerate());
    let next = || match queue.lock() {
        Ok(mut q) => q.next(),
        Err(p) => p.into_inner().next(),
    };
    let mut done: Vec<(usize, R)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = vec![];
                    while let Some((i, item)) = next() {
                        out.push((i, f(item)));
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| match w.join() {
                Ok(v) => v,
                // A worker panicked (a bug, not bad input): re-raise it on the caller's thread.
                Err(e) => std::panic::resume_unwind(e),
            })
            .collect()
    });
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// Splits `out` into pieces of at least `min` elements, one task per piece, and runs `f(first index,
/// piece)` on them in parallel: a bulk conversion over a large output.
pub fn parallel_fill<T: Send>(out: &mut [T], threads: usize, min: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let pieces = threads.max(1) * 4;
    let size = out.len().div_ceil(pieces).max(min).max(1);
    let items: Vec<(usize, &mut [T])> = out.chunks_mut(size).enumerate().map(|(i, c)| (i * size, c)).collect();
    parallel_map(items, threads, |(at, piece)| f(at, piece));
}

/// The process's peak resident memory (VmHWM) in bytes; None where /proc is missing (not Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// CPU time (user + system) this process has used so far, in seconds; beside a wall time it shows how
/// parallel a phase was. None where getrusage is missing.
pub fn cpu_seconds() -> Option<f64> {
    #[cfg(unix)]
    {
        // SAFETY: getrusage writes one plain struct that we own; a zeroed rusage is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
            return None;
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        Some(tv(ru.ru_utime) + tv(ru.ru_stime))
    }
    #[cfg(not(unix))]
    None
}
