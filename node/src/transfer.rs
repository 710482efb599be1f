//! Content-addressed model transfer over `/bitnode/model/1` (Mesh II): the serving side answers
//! [`ModelRequest`]s from the store, the receiving side ([`Download`]) fetches a directory chunk by chunk.
//!
//! Trust comes from the hash the job names, never from the peer: the manifest must carry that hash, plain
//! and unique file names, consistent chunk counts and a size within our limit; every chunk is checked
//! against the manifest's SHA-256 before it is written; and the finished directory must hash to the wanted
//! content hash before it is renamed into the store. A peer can therefore name no path (files land only in
//! `<store>/.partial-<hash>/`, under names we checked) and can slip in no content.
//!
//! Resuming: chunks are written in place at their offsets in `<store>/.partial-<hash>/<name>`, so after a
//! break (a lost connection, a restart) [`Download::begin`] re-reads what is on disk, keeps every chunk that
//! matches its hash and fetches only the rest. Everything after the last good chunk of a file is cut off;
//! a bad chunk before it is simply fetched again and overwritten.
//!
//! These functions do blocking file I/O (hashing a large partial download takes seconds): the daemon calls
//! them from `spawn_blocking`.
use crate::models::{chunk_count, hex, valid_hash, Store, MARKERS, MAX_MODEL_FILES};
use anyhow::{bail, Context};
use bitnode_protocol::job::{plain_name, Manifest, ModelRequest, ModelResponse};
use bitnode_protocol::wire::{MAX_MODEL_MESSAGE, MODEL_CHUNK};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashSet};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Partial directories a live [`Download`] writes to, in this process. Two downloads of one hash would
/// truncate and overwrite each other's files, so the second is refused until the first is dropped.
static ACTIVE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn active() -> std::sync::MutexGuard<'static, BTreeSet<PathBuf>> {
    // The set stays consistent even if a holder panicked (insert and remove are single operations).
    ACTIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Exclusive use of one partial directory for the life of a [`Download`].
struct Claim(PathBuf);

impl Claim {
    fn take(dir: &Path) -> anyhow::Result<Claim> {
        if !active().insert(dir.to_path_buf()) {
            bail!(
                "{} is already being received by another job of this device",
                dir.display()
            );
        }
        Ok(Claim(dir.to_path_buf()))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        active().remove(&self.0);
    }
}

fn partial_dir(store: &Store, hash: &str) -> PathBuf {
    store.root().join(format!(".partial-{hash}"))
}

/// Whether a [`Download`] of `hash` into `store` is live in this process (a second one would be refused).
pub fn in_progress(store: &Store, hash: &str) -> bool {
    active().contains(&partial_dir(store, hash))
}

/// Bytes of chunk `index` of a file of `len` bytes.
fn chunk_len(len: u64, index: u64) -> u64 {
    len.saturating_sub(index * MODEL_CHUNK as u64).min(MODEL_CHUNK as u64)
}

/// A hash or other peer-supplied text as shown in an error: bounded, so a hostile peer cannot make us log
/// or echo megabytes.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(80).collect();
    format!("{cut:?}")
}

/// Checks a peer's manifest against what we asked for and our limits; returns its total size.
fn check_manifest(want: &str, m: &Manifest, max_bytes: u64) -> anyhow::Result<u64> {
    if !valid_hash(want) {
        bail!("{} is not a model hash (64 lowercase hex digits)", shown(want));
    }
    if m.hash != want {
        bail!(
            "the manifest is for {}, not the model asked for ({want})",
            shown(&m.hash)
        );
    }
    if m.files.len() > MAX_MODEL_FILES {
        bail!("the manifest lists {} files (at most {MAX_MODEL_FILES})", m.files.len());
    }
    let mut seen = HashSet::new();
    let mut total = 0u64;
    for f in &m.files {
        if !plain_name(&f.name) {
            bail!("unsafe file name {} in the manifest", shown(&f.name));
        }
        // Lower-cased: on a case-insensitive file system two such names would be one file.
        if !seen.insert(f.name.to_lowercase()) {
            bail!("duplicate file name {} in the manifest", shown(&f.name));
        }
        let want_chunks = chunk_count(f.len);
        if f.chunks.len() as u64 != want_chunks || want_chunks > u64::from(u32::MAX) {
            bail!(
                "the manifest gives {} chunks for {} ({} bytes need {want_chunks})",
                f.chunks.len(),
                shown(&f.name),
                f.len
            );
        }
        total = total
            .checked_add(f.len)
            .filter(|t| *t <= max_bytes)
            .with_context(|| format!("the model is larger than this device accepts ({max_bytes} bytes)"))?;
    }
    if !m.files.iter().any(|f| MARKERS.contains(&f.name.as_str())) {
        bail!("the manifest has neither config.json nor adapter_config.json: not a model or adapter");
    }
    Ok(total)
}

/// Removes from `dir` everything that is not a regular file named in the manifest (a stray file, a
/// directory, a symlink someone planted), so only checked names are ever opened and hashed.
fn tidy(dir: &Path, m: &Manifest) -> anyhow::Result<()> {
    let names: HashSet<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let keep = e.file_type()?.is_file() && e.file_name().to_str().is_some_and(|n| names.contains(n));
        if !keep {
            let p = e.path();
            let res = if e.file_type()?.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            res.with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// Opens a file of the partial directory without following a symlink, so a write can never leave it.
fn open_part(path: &Path, create: bool) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// A resumable, verified download of one content-addressed directory into the store.
pub struct Download {
    store: Store,
    dir: PathBuf,
    manifest: Manifest,
    /// Per file, per chunk: whether the chunk on disk is verified.
    present: Vec<Vec<bool>>,
    missing: usize,
    done: u64,
    total: u64,
    _claim: Claim,
}

impl Download {
    /// Validates the manifest against what we asked for and our limits (hash well-formed and equal to
    /// `want`, names plain and unique, one of them a marker file, chunk count = ceil(len / MODEL_CHUNK),
    /// total bytes <= `max_bytes`, at most [`MAX_MODEL_FILES`] files), then creates or reuses
    /// `<store root>/.partial-<hash>/`, keeping every chunk already on disk that matches its hash (a resumed
    /// transfer) and cutting each file after its last good chunk. Nothing is created for a refused manifest.
    pub fn begin(store: &Store, want: &str, manifest: Manifest, max_bytes: u64) -> anyhow::Result<Download> {
        let total = check_manifest(want, &manifest, max_bytes)?;
        let dir = partial_dir(store, want);
        let claim = Claim::take(&dir)?;
        // Whatever sits at the partial path must be our own directory, not a link to somewhere else.
        if let Ok(md) = std::fs::symlink_metadata(&dir) {
            if !md.is_dir() {
                std::fs::remove_file(&dir).with_context(|| format!("removing {}", dir.display()))?;
            }
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        tidy(&dir, &manifest)?;
        let mut present = Vec::with_capacity(manifest.files.len());
        let mut done = 0u64;
        let mut buf = vec![0u8; MODEL_CHUNK];
        for f in &manifest.files {
            let path = dir.join(&f.name);
            let mut file = open_part(&path, true)?;
            let on_disk = file.metadata()?.len();
            let mut have = vec![false; f.chunks.len()];
            let mut good_end = 0u64;
            for (i, want_hash) in f.chunks.iter().enumerate() {
                let off = i as u64 * MODEL_CHUNK as u64;
                let len = chunk_len(f.len, i as u64);
                if off + len > on_disk {
                    break;
                }
                // Sequential reads: chunk i starts where chunk i-1 ended.
                let n = crate::models::read_full(&mut file, &mut buf[..len as usize])
                    .with_context(|| format!("reading {}", path.display()))?;
                if n as u64 == len && Sha256::digest(&buf[..n]).as_slice() == want_hash {
                    have[i] = true;
                    done += len;
                    good_end = off + len;
                }
            }
            if on_disk != good_end {
                file.set_len(good_end)
                    .with_context(|| format!("truncating {}", path.display()))?;
            }
            present.push(have);
        }
        let missing = present.iter().flatten().filter(|p| !**p).count();
        Ok(Download {
            store: store.clone(),
            dir,
            manifest,
            present,
            missing,
            done,
            total,
            _claim: claim,
        })
    }

    /// The hash being fetched.
    pub fn hash(&self) -> &str {
        &self.manifest.hash
    }

    /// The next (file, index) to fetch, or None when all are present.
    pub fn next_needed(&self) -> Option<(u32, u32)> {
        self.needed(1).into_iter().next()
    }

    /// Up to `n` distinct missing chunks in file and offset order (for a few requests in flight).
    pub fn needed(&self, n: usize) -> Vec<(u32, u32)> {
        self.present
            .iter()
            .enumerate()
            .flat_map(|(f, chunks)| {
                chunks
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| !**p)
                    .map(move |(i, _)| (f as u32, i as u32))
            })
            .take(n)
            .collect()
    }

    /// Verifies the chunk's length and SHA-256 against the manifest and writes it at its offset. A bad
    /// chunk is an error and is not written; a chunk already present is accepted again without a write.
    pub fn accept(&mut self, file: u32, index: u32, bytes: &[u8]) -> anyhow::Result<()> {
        let f = self.manifest.files.get(file as usize).with_context(|| {
            format!(
                "file {file} is not in the manifest ({} files)",
                self.manifest.files.len()
            )
        })?;
        let want_hash = f.chunks.get(index as usize).with_context(|| {
            format!(
                "chunk {index} is out of range for {} ({} chunks)",
                f.name,
                f.chunks.len()
            )
        })?;
        let len = chunk_len(f.len, u64::from(index));
        if bytes.len() as u64 != len {
            bail!(
                "chunk {index} of {} has {} bytes, the manifest says {len}",
                f.name,
                bytes.len()
            );
        }
        let got: [u8; 32] = Sha256::digest(bytes).into();
        if &got != want_hash {
            bail!(
                "chunk {index} of {} hashes to {}, the manifest says {}",
                f.name,
                hex(&got),
                hex(want_hash)
            );
        }
        if self.present[file as usize][index as usize] {
            return Ok(());
        }
        let path = self.dir.join(&f.name);
        // Not created here: a file that vanished since begin() would come back with holes.
        let mut out = open_part(&path, false)?;
        out.seek(SeekFrom::Start(u64::from(index) * MODEL_CHUNK as u64))?;
        out.write_all(bytes)
            .with_context(|| format!("writing {}", path.display()))?;
        self.present[file as usize][index as usize] = true;
        self.missing -= 1;
        self.done += len;
        Ok(())
    }

    /// Bytes verified so far (including chunks found on disk when resuming).
    pub fn done_bytes(&self) -> u64 {
        self.done
    }

    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// With all chunks present: checks that the directory's content hash equals the wanted hash, renames it
    /// into the store atomically (caching the manifest for serving it onward) and returns its directory.
    /// A directory that does not hash right is deleted (its manifest lied; resuming would not help) and
    /// nothing appears in the store. With chunks missing it is an error and the partial directory stays.
    pub fn finish(self) -> anyhow::Result<PathBuf> {
        if self.missing > 0 {
            bail!("{} chunks of {} are still missing", self.missing, self.manifest.hash);
        }
        tidy(&self.dir, &self.manifest)?;
        for f in &self.manifest.files {
            let path = self.dir.join(&f.name);
            let file = open_part(&path, false)?;
            if file.metadata()?.len() != f.len {
                bail!("{} changed on disk during the transfer", path.display());
            }
            // Durable before it becomes visible under its hash.
            file.sync_all().with_context(|| format!("syncing {}", path.display()))?;
        }
        let got = crate::models::content_hash(&self.dir)?;
        if got != self.manifest.hash {
            let _ = std::fs::remove_dir_all(&self.dir);
            bail!(
                "the received files hash to {got}, not {}: the manifest does not describe that model",
                self.manifest.hash
            );
        }
        // Stored manifests list files in name order, the order of the content hash and of read_chunk.
        let mut m = self.manifest.clone();
        m.files.sort_by(|a, b| a.name.cmp(&b.name));
        self.store.commit(&self.dir, &m)
    }
}

/// The serving side: answers a [`ModelRequest`] from the store. A malformed or unknown hash or an
/// out-of-range chunk gets `Refused` with a clear reason; local I/O errors are logged and answered with a
/// short reason that names no local path.
pub fn serve(store: &Store, req: &ModelRequest) -> ModelResponse {
    let refuse = |reason: String| ModelResponse::Refused { reason };
    let hash = match req {
        ModelRequest::Manifest { hash } | ModelRequest::Chunk { hash, .. } => hash,
    };
    if !valid_hash(hash) {
        return refuse(format!("{} is not a model hash (64 lowercase hex digits)", shown(hash)));
    }
    match store.resolve(hash) {
        Ok(Some(_)) => {}
        Ok(None) => return refuse(format!("model {hash} is not held by this device")),
        Err(e) => return refuse(format!("{e:#}")),
    }
    match req {
        ModelRequest::Manifest { .. } => match store.manifest(hash) {
            Ok(m) => {
                let resp = ModelResponse::Manifest(m);
                match bitnode_protocol::wire::encode(&resp, MAX_MODEL_MESSAGE) {
                    Ok(_) => resp,
                    Err(e) => refuse(format!("the manifest of model {hash} is too large to send: {e}")),
                }
            }
            Err(e) => {
                tracing::warn!("serving the manifest of {hash}: {e:#}");
                refuse(format!("model {hash} cannot be read on this device"))
            }
        },
        ModelRequest::Chunk { file, index, .. } => {
            let layout = match store.layout(hash) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("serving a chunk of {hash}: {e:#}");
                    return refuse(format!("model {hash} cannot be read on this device"));
                }
            };
            let Some((_, len)) = layout.get(*file as usize) else {
                return refuse(format!(
                    "file {file} is out of range: model {hash} has {} files",
                    layout.len()
                ));
            };
            let chunks = chunk_count(*len);
            if u64::from(*index) >= chunks {
                return refuse(format!(
                    "chunk {index} is out of range: file {file} of model {hash} has {chunks} chunks"
                ));
            }
            match store.read_chunk(hash, *file, *index) {
                Ok(bytes) => ModelResponse::Chunk { bytes },
                Err(e) => {
                    tracing::warn!("serving chunk {index} of file {file} of {hash}: {e:#}");
                    refuse(format!("model {hash} cannot be read on this device"))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::content_hash;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bitnode-transfer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    /// Chunks in the test model: config 1, empty 0, model.safetensors 3, tokenizer 1.
    const CHUNKS: usize = 5;
    /// Index of model.safetensors in the (name-ordered) manifest.
    const WEIGHTS: u32 = 2;

    /// A source store holding a model of several files (one over two chunks, one empty); its hash.
    fn source(tag: &str) -> (Store, String) {
        let m = tmp(&format!("{tag}-model"));
        std::fs::write(m.join("config.json"), b"{\"model_type\": \"bitnet\"}").expect("write");
        std::fs::write(m.join("empty.bin"), b"").expect("write");
        let w: Vec<u8> = (0..2 * MODEL_CHUNK + 1234).map(|i| (i * 7 % 253) as u8).collect();
        std::fs::write(m.join("model.safetensors"), w).expect("write");
        std::fs::write(m.join("tokenizer.json"), b"{\"vocab\": {}}").expect("write");
        let store = Store::new(&tmp(&format!("{tag}-src")));
        let h = store.import(&m).expect("import");
        (store, h)
    }

    fn manifest_of(src: &Store, h: &str) -> Manifest {
        match serve(src, &ModelRequest::Manifest { hash: h.to_string() }) {
            ModelResponse::Manifest(m) => m,
            other => panic!("no manifest: {other:?}"),
        }
    }

    fn chunk(src: &Store, h: &str, file: u32, index: u32) -> Vec<u8> {
        match serve(
            src,
            &ModelRequest::Chunk {
                hash: h.to_string(),
                file,
                index,
            },
        ) {
            ModelResponse::Chunk { bytes } => bytes,
            other => panic!("no chunk {file}/{index}: {other:?}"),
        }
    }

    /// Fetches every missing chunk from `src`; returns how many were fetched.
    fn fetch_rest(src: &Store, dl: &mut Download) -> usize {
        let mut n = 0;
        while let Some((f, i)) = dl.next_needed() {
            let bytes = chunk(src, dl.hash(), f, i);
            dl.accept(f, i, &bytes).expect("a served chunk verifies");
            n += 1;
        }
        n
    }

    fn partials(store: &Store) -> Vec<String> {
        std::fs::read_dir(store.root())
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".partial-"))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_model_travels_between_two_stores() {
        let (src, h) = source("full");
        let dst = Store::new(&tmp("full-dst"));
        let m = manifest_of(&src, &h);
        assert_eq!(m.files.len(), 4);
        let mut dl = Download::begin(&dst, &h, m.clone(), 64 << 20).expect("begins");
        assert_eq!(dl.total_bytes(), src.bytes(&h).expect("size"));
        assert_eq!(dl.done_bytes(), 0);
        assert!(in_progress(&dst, &h));
        assert!(
            Download::begin(&dst, &h, m.clone(), 64 << 20).is_err(),
            "a second download of one hash"
        );
        // A few in flight, answered out of order.
        let first = dl.needed(3);
        assert_eq!(
            first,
            [(0, 0), (WEIGHTS, 0), (WEIGHTS, 1)],
            "the empty file needs nothing"
        );
        for &(f, i) in first.iter().rev() {
            dl.accept(f, i, &chunk(&src, &h, f, i)).expect("accepts");
        }
        // A repeated answer is harmless.
        dl.accept(0, 0, &chunk(&src, &h, 0, 0)).expect("again");
        assert_eq!(fetch_rest(&src, &mut dl), CHUNKS - 3);
        assert_eq!(dl.done_bytes(), dl.total_bytes());
        assert!(dl.needed(10).is_empty());
        let got = dl.finish().expect("finishes");
        assert_eq!(got, dst.root().join(&h));
        assert_eq!(content_hash(&got).expect("hash"), h);
        assert_eq!(dst.list(), vec![h.clone()]);
        assert!(
            dst.root().join(format!("{h}.manifest.json")).is_file(),
            "cached for serving onward"
        );
        assert_eq!(dst.manifest(&h).expect("manifest"), m);
        assert!(partials(&dst).is_empty());
        assert!(!in_progress(&dst, &h));
    }

    #[test]
    fn an_interrupted_transfer_fetches_only_what_is_missing() {
        let (src, h) = source("resume");
        let dst = Store::new(&tmp("resume-dst"));
        let m = manifest_of(&src, &h);
        let mut dl = Download::begin(&dst, &h, m.clone(), 64 << 20).expect("begins");
        // Two chunks in order and the last one of the weights out of order, then the connection drops.
        for (f, i) in [(0, 0), (WEIGHTS, 0), (WEIGHTS, 2)] {
            dl.accept(f, i, &chunk(&src, &h, f, i)).expect("accepts");
        }
        let had = dl.done_bytes();
        drop(dl);
        assert_eq!(partials(&dst).len(), 1, "the partial directory survives the break");
        let mut dl = Download::begin(&dst, &h, m, 64 << 20).expect("resumes");
        assert_eq!(dl.done_bytes(), had, "every verified chunk on disk is kept");
        assert_eq!(dl.needed(10), [(WEIGHTS, 1), (3, 0)]);
        assert_eq!(fetch_rest(&src, &mut dl), CHUNKS - 3);
        let got = dl.finish().expect("finishes");
        assert_eq!(content_hash(&got).expect("hash"), h);
    }

    #[test]
    fn corrupt_chunks_are_refused_and_dropped_on_resume() {
        let (src, h) = source("corrupt");
        let dst = Store::new(&tmp("corrupt-dst"));
        let m = manifest_of(&src, &h);
        let mut dl = Download::begin(&dst, &h, m.clone(), 64 << 20).expect("begins");
        let good = chunk(&src, &h, WEIGHTS, 0);
        let mut bad = good.clone();
        bad[100] ^= 1;
        assert!(dl.accept(WEIGHTS, 0, &bad).is_err(), "a flipped bit");
        assert!(dl.accept(WEIGHTS, 0, &good[..good.len() - 1]).is_err(), "a short chunk");
        assert!(dl.accept(WEIGHTS, 1, &good).is_err(), "a good chunk in the wrong place");
        assert!(dl.accept(1, 0, &[]).is_err(), "a chunk of the empty file");
        assert!(dl.accept(WEIGHTS, 3, &[]).is_err(), "past the end");
        assert!(dl.accept(9, 0, &good).is_err(), "no such file");
        assert_eq!(dl.done_bytes(), 0);
        let part = dst.root().join(format!(".partial-{h}"));
        assert_eq!(
            std::fs::metadata(part.join("model.safetensors")).expect("file").len(),
            0,
            "nothing written"
        );
        assert_eq!(dl.next_needed(), Some((0, 0)));
        for i in 0..3 {
            dl.accept(WEIGHTS, i, &chunk(&src, &h, WEIGHTS, i)).expect("accepts");
        }
        dl.accept(0, 0, &chunk(&src, &h, 0, 0)).expect("accepts");
        drop(dl);
        // On disk, chunk 1 of the weights rots, the tail of chunk 2 is torn, and junk follows config.json.
        let w = part.join("model.safetensors");
        let mut bytes = std::fs::read(&w).expect("read");
        bytes[MODEL_CHUNK + 5] ^= 0xff;
        bytes.truncate(bytes.len() - 10);
        std::fs::write(&w, &bytes).expect("write");
        let cfg = part.join("config.json");
        let mut c = std::fs::read(&cfg).expect("read");
        c.extend_from_slice(b"junk");
        std::fs::write(&cfg, &c).expect("write");
        let mut dl = Download::begin(&dst, &h, m, 64 << 20).expect("resumes");
        assert_eq!(dl.needed(10), [(WEIGHTS, 1), (WEIGHTS, 2), (3, 0)]);
        assert_eq!(
            std::fs::metadata(&w).expect("file").len(),
            MODEL_CHUNK as u64,
            "cut after the last good chunk"
        );
        assert_eq!(
            std::fs::metadata(&cfg).expect("file").len() as usize,
            c.len() - 4,
            "junk cut off"
        );
        assert_eq!(fetch_rest(&src, &mut dl), 3);
        let got = dl.finish().expect("finishes");
        assert_eq!(content_hash(&got).expect("hash"), h);
    }

    #[test]
    fn hostile_manifests_are_refused_before_anything_is_written() {
        let (src, h) = source("hostile");
        let dst = Store::new(&tmp("hostile-dst"));
        let good = manifest_of(&src, &h);
        let total = src.bytes(&h).expect("size");
        let with = |edit: &dyn Fn(&mut Manifest)| {
            let mut m = good.clone();
            edit(&mut m);
            m
        };
        let mut cases: Vec<(&str, Manifest)> = vec![];
        for name in [
            "a/b",
            "../config.json",
            "..",
            ".hidden",
            "",
            "a\\b",
            "x\0y",
            "tab\tname",
        ] {
            cases.push((name, with(&|m| m.files[3].name = name.to_string())));
        }
        cases.push(("duplicate", with(&|m| m.files[3].name = "config.json".into())));
        cases.push((
            "duplicate but for case",
            with(&|m| m.files[3].name = "Config.JSON".into()),
        ));
        cases.push(("chunk missing", with(&|m| m.files[WEIGHTS as usize].chunks.truncate(2))));
        cases.push(("chunk extra", with(&|m| m.files[WEIGHTS as usize].chunks.push([0; 32]))));
        cases.push(("chunk for an empty file", with(&|m| m.files[1].chunks.push([0; 32]))));
        cases.push((
            "length past the chunks",
            with(&|m| m.files[WEIGHTS as usize].len += MODEL_CHUNK as u64),
        ));
        cases.push(("length overflow", with(&|m| m.files[0].len = u64::MAX)));
        cases.push(("other hash", with(&|m| m.hash = "0".repeat(64))));
        cases.push(("no marker", with(&|m| m.files[0].name = "conf.json".into())));
        let many = with(&|m| {
            for i in 0..MAX_MODEL_FILES {
                m.files.push(bitnode_protocol::job::ManifestFile {
                    name: format!("extra{i}"),
                    len: 0,
                    chunks: vec![],
                })
            }
        });
        cases.push(("too many files", many));
        for (what, m) in &cases {
            assert!(
                Download::begin(&dst, &h, m.clone(), 64 << 20).is_err(),
                "{what:?} accepted"
            );
        }
        assert!(
            Download::begin(&dst, &h, good.clone(), total - 1).is_err(),
            "over the byte limit"
        );
        for want in ["../../etc", "/tmp/x", "", &h.to_uppercase(), &h[..63]] {
            let m = with(&|m| m.hash = want.to_string());
            assert!(Download::begin(&dst, want, m, 64 << 20).is_err(), "{want:?} accepted");
        }
        assert!(partials(&dst).is_empty(), "a refused manifest creates nothing");
        assert!(
            Download::begin(&dst, &h, good, total).is_ok(),
            "exactly at the limit is fine"
        );
    }

    #[test]
    fn a_manifest_that_hashes_wrong_as_a_whole_is_refused_at_the_end() {
        let (src, h) = source("whole");
        let dst = Store::new(&tmp("whole-dst"));
        let good = manifest_of(&src, &h);
        // Every chunk hash is right, but the tokenizer is renamed: the directory is not model `h`.
        let mut renamed = good.clone();
        renamed.files[3].name = "tokenizer2.json".into();
        // Dropping a file also keeps every chunk right.
        let mut dropped = good.clone();
        dropped.files.remove(1);
        for (what, m) in [("renamed", renamed), ("dropped", dropped)] {
            let mut dl = Download::begin(&dst, &h, m.clone(), 64 << 20).expect("plausible manifest");
            while let Some((f, i)) = dl.next_needed() {
                // Chunks are fetched by the peer's own file indices, as its manifest lists them.
                let name = &m.files[f as usize].name;
                let sf = good.files.iter().position(|g| &g.name == name).unwrap_or(3) as u32;
                dl.accept(f, i, &chunk(&src, &h, sf, i)).expect("chunks verify");
            }
            assert!(dl.finish().is_err(), "{what} accepted");
            assert!(dst.resolve(&h).expect("valid").is_none(), "{what}: stored");
            assert!(dst.list().is_empty());
            assert!(partials(&dst).is_empty(), "{what}: the lying download is discarded");
        }
        // An unfinished download cannot be finished, and keeps its progress.
        let dl = Download::begin(&dst, &h, good.clone(), 64 << 20).expect("begins");
        assert!(dl.finish().is_err());
        assert_eq!(partials(&dst).len(), 1);
    }

    #[test]
    fn a_planted_symlink_is_never_followed() {
        let (src, h) = source("link");
        let dst = Store::new(&tmp("link-dst"));
        let outside = tmp("link-outside").join("victim");
        std::fs::write(&outside, b"precious").expect("write");
        let part = dst.root().join(format!(".partial-{h}"));
        std::fs::create_dir_all(&part).expect("mkdir");
        std::os::unix::fs::symlink(&outside, part.join("config.json")).expect("symlink");
        std::os::unix::fs::symlink(&outside, part.join("stray")).expect("symlink");
        let mut dl = Download::begin(&dst, &h, manifest_of(&src, &h), 64 << 20).expect("begins");
        assert_eq!(fetch_rest(&src, &mut dl), CHUNKS);
        dl.finish().expect("finishes");
        assert_eq!(std::fs::read(&outside).expect("read"), b"precious");
        let cfg = dst.root().join(&h).join("config.json");
        assert!(std::fs::symlink_metadata(&cfg).expect("stat").is_file());
        assert!(!dst.root().join(&h).join("stray").exists());
    }

    #[test]
    fn serve_refuses_path_like_unknown_and_out_of_range_requests() {
        let (src, h) = source("serve");
        let refused = |req: ModelRequest| match serve(&src, &req) {
            ModelResponse::Refused { reason } => reason,
            other => panic!("{req:?} answered with {other:?}"),
        };
        let long = "a".repeat(10_000);
        for bad in ["../../etc/passwd", "/tmp/x", "", &h.to_uppercase(), &h[..63], &long] {
            let r = refused(ModelRequest::Manifest { hash: bad.into() });
            assert!(r.contains("not a model hash"), "{r}");
            assert!(r.len() < 200, "the reason echoes the request unbounded");
            refused(ModelRequest::Chunk {
                hash: bad.into(),
                file: 0,
                index: 0,
            });
            assert!(src.resolve(bad).is_err());
        }
        let unknown = "0".repeat(64);
        let r = refused(ModelRequest::Manifest { hash: unknown.clone() });
        assert!(r.contains("not held"), "{r}");
        let chunk_req = |file, index| ModelRequest::Chunk {
            hash: h.clone(),
            file,
            index,
        };
        assert!(refused(chunk_req(4, 0)).contains("out of range"));
        assert!(refused(chunk_req(WEIGHTS, 3)).contains("out of range"));
        assert!(
            refused(chunk_req(1, 0)).contains("out of range"),
            "the empty file has no chunk 0"
        );
        assert!(refused(chunk_req(u32::MAX, u32::MAX)).contains("out of range"));
        let tail = chunk(&src, &h, WEIGHTS, 2);
        assert_eq!(tail.len(), 1234);
    }
}
