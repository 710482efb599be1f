//! The model store (Mesh II): models and adapters addressed by content hash, so a worker that already holds
//! one skips the transfer, and a remote job can only ever name a directory inside this store, never a path.
//!
//! The hash is SHA-256 over the directory's regular files in name order, each as
//! `name \0 length(le u64) bytes`: renaming, truncating or changing any file changes it. A directory is
//! content-addressable when it holds `config.json` (a model) or `adapter_config.json` (a PEFT adapter), or
//! `model.gguf` / `adapter.gguf` (a GGUF model / LoRA adapter). A GGUF file is imported as a directory
//! holding it under that name, and hashes as that directory would, so the file and its entry have one hash.
//!
//! Layout under `<home>/models/by-hash/`:
//! - `<64 hex digits>/`: a stored directory, written to a temporary directory and renamed into place, so a
//!   half-copied model is never visible under its hash;
//! - `<hash>.manifest.json`: the cached [`Manifest`] (file lengths and per-chunk SHA-256s) of that entry, so
//!   a large model is hashed once, not on every transfer; it is checked against the directory before use
//!   and rebuilt when stale;
//! - `.import-*` and `.partial-<hash>/` (see [`crate::transfer`]): work in progress, never listed or
//!   resolved.
use anyhow::{bail, Context};
use bitnode_protocol::job::{plain_name, Manifest, ManifestFile, MAX_BUNDLE_FILES};
use bitnode_protocol::wire::MODEL_CHUNK;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The files whose presence makes a directory content-addressable: a model, a PEFT adapter, or a GGUF
/// model or adapter ([`bitnode_engine::model::GGUF_IN_DIR`], [`bitnode_engine::lora::GGUF_ADAPTER_IN_DIR`]).
pub const MARKERS: [&str; 4] = [
    "config.json",
    "adapter_config.json",
    bitnode_engine::model::GGUF_IN_DIR,
    bitnode_engine::lora::GGUF_ADAPTER_IN_DIR,
];

/// Most files one stored directory may hold (the same bound as a bundle: models have a handful).
pub const MAX_MODEL_FILES: usize = MAX_BUNDLE_FILES;

/// Distinguishes temporary directories of concurrent imports within one process.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// The files of a model or adapter directory that make up its content, in name order, with the names they
/// have in the store: a GGUF file stands for a directory holding it as `model.gguf` (or `adapter.gguf`,
/// for a LoRA GGUF).
fn model_files(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    if dir.is_file() {
        let mut magic = [0u8; 4];
        let n = std::fs::File::open(dir)
            .and_then(|mut f| read_full(&mut f, &mut magic))
            .with_context(|| format!("reading {}", dir.display()))?;
        if n < 4 || &magic != b"GGUF" {
            bail!(
                "{} is a file but not a GGUF model (no GGUF magic); a Hugging Face model is a directory",
                dir.display()
            );
        }
        let name = if bitnode_engine::lora::is_gguf_adapter(dir) {
            bitnode_engine::lora::GGUF_ADAPTER_IN_DIR
        } else {
            bitnode_engine::model::GGUF_IN_DIR
        };
        return Ok(vec![(name.to_string(), dir.to_path_buf())]);
    }
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
    let has_marker = files
        .iter()
        .any(|f| f.file_name().is_some_and(|n| MARKERS.iter().any(|m| n == *m)));
    if !has_marker {
        bail!(
            "{} has neither config.json, adapter_config.json, model.gguf nor adapter.gguf: not a model or adapter \
             directory",
            dir.display()
        );
    }
    Ok(files.into_iter().map(|f| (name_of(&f), f)).collect())
}

fn name_of(f: &Path) -> String {
    f.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads until `buf` is full or the file ends; returns how many bytes were read.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Number of [`MODEL_CHUNK`]-byte chunks a file of `len` bytes is sent in (0 for an empty file).
pub fn chunk_count(len: u64) -> u64 {
    len.div_ceil(MODEL_CHUNK as u64)
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One pass over a directory: its content hash and, when `chunks` is set, each file's chunk hashes (the
/// manifest), so importing or serving a model reads it once rather than twice.
fn scan(dir: &Path, chunks: bool) -> anyhow::Result<(String, Vec<ManifestFile>)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MODEL_CHUNK];
    let mut out = vec![];
    for (name, f) in model_files(dir)? {
        let mut file = std::fs::File::open(&f).with_context(|| format!("opening {}", f.display()))?;
        let len = file.metadata()?.len();
        h.update(name.as_bytes());
        h.update([0u8]);
        h.update(len.to_le_bytes());
        let mut hashes = vec![];
        let mut left = len;
        while left > 0 {
            let want = left.min(MODEL_CHUNK as u64) as usize;
            let n = read_full(&mut file, &mut buf[..want]).with_context(|| format!("reading {}", f.display()))?;
            // A file that shrinks while we read would otherwise hash as something it never was.
            if n != want {
                bail!("{} changed while it was being read", f.display());
            }
            h.update(&buf[..n]);
            if chunks {
                hashes.push(Sha256::digest(&buf[..n]).into());
            }
            left -= n as u64;
        }
        out.push(ManifestFile {
            name,
            len,
            chunks: hashes,
        });
    }
    Ok((hex(&h.finalize()), out))
}

/// SHA-256 content hash of a model or adapter directory, as 64 lowercase hex digits.
pub fn content_hash(dir: &Path) -> anyhow::Result<String> {
    Ok(scan(dir, false)?.0)
}

/// A handle on `<home>/models/by-hash`; cheap to clone (it is only the path).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A well-formed hash: exactly 64 lowercase hex digits (nothing that could be a path).
pub fn valid_hash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_hash(hash: &str) -> anyhow::Result<()> {
    if !valid_hash(hash) {
        bail!("{hash:?} is not a model hash (64 lowercase hex digits)");
    }
    Ok(())
}

impl Store {
    pub fn new(home: &Path) -> Store {
        Store {
            root: home.join("models").join("by-hash"),
        }
    }

    /// `<home>/models/by-hash`: where entries, manifests and partial downloads live.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of model or adapter `hash`, if the store holds it. Anything but a well-formed hash is
    /// refused.
    pub fn resolve(&self, hash: &str) -> anyhow::Result<Option<PathBuf>> {
        check_hash(hash)?;
        let d = self.root.join(hash);
        Ok(MARKERS.iter().any(|m| d.join(m).is_file()).then_some(d))
    }

    /// Like [`Store::resolve`], but a missing entry is an error.
    fn require(&self, hash: &str) -> anyhow::Result<PathBuf> {
        self.resolve(hash)?
            .with_context(|| format!("model {hash} is not in this device's store"))
    }

    /// The hashes the store holds, sorted. Temporary and partial entries and manifests are not listed.
    pub fn list(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return vec![];
        };
        let mut v: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| matches!(self.resolve(n), Ok(Some(_))))
            .collect();
        v.sort();
        v
    }

    fn manifest_path(&self, hash: &str) -> PathBuf {
        self.root.join(format!("{hash}.manifest.json"))
    }

    /// The files of a stored entry in manifest order, with their lengths (a cheap listing, no hashing).
    pub(crate) fn layout(&self, hash: &str) -> anyhow::Result<Vec<(PathBuf, u64)>> {
        let dir = self.require(hash)?;
        let mut v = vec![];
        for (_, f) in model_files(&dir)? {
            let len = std::fs::metadata(&f)
                .with_context(|| format!("reading {}", f.display()))?
                .len();
            v.push((f, len));
        }
        Ok(v)
    }

    /// The manifest of stored entry `hash`: each file's length and chunk hashes. Read from the cached
    /// sidecar when it still describes the directory (same names and lengths), else computed (which also
    /// re-checks the content hash) and cached.
    pub fn manifest(&self, hash: &str) -> anyhow::Result<Manifest> {
        let layout = self.layout(hash)?;
        let path = self.manifest_path(hash);
        if let Ok(text) = std::fs::read(&path) {
            if let Ok(m) = serde_json::from_slice::<Manifest>(&text) {
                let fits = m.hash == hash
                    && m.files.len() == layout.len()
                    && m.files.iter().zip(&layout).all(|(mf, (p, len))| {
                        mf.name == name_of(p) && mf.len == *len && mf.chunks.len() as u64 == chunk_count(*len)
                    });
                if fits {
                    return Ok(m);
                }
            }
            tracing::warn!("{} is stale or corrupt; rebuilding it", path.display());
        }
        let dir = self.require(hash)?;
        let (got, files) = scan(&dir, true)?;
        if got != hash {
            bail!(
                "the store entry {} does not hash to its name (got {got}): it is corrupt",
                dir.display()
            );
        }
        let m = Manifest {
            hash: hash.to_string(),
            files,
        };
        self.save_manifest(&m);
        Ok(m)
    }

    /// Caches a manifest next to its entry. Best effort: a missing cache only costs a rehash later.
    pub(crate) fn save_manifest(&self, m: &Manifest) {
        let res = serde_json::to_vec(m)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| crate::fsutil::write_private(&self.manifest_path(&m.hash), &bytes));
        if let Err(e) = res {
            tracing::warn!("caching the manifest of {}: {e:#}", m.hash);
        }
    }

    /// Chunk `index` of file `file` (in manifest order) of stored entry `hash`; bounds-checked.
    pub fn read_chunk(&self, hash: &str, file: u32, index: u32) -> anyhow::Result<Vec<u8>> {
        let layout = self.layout(hash)?;
        let (path, len) = layout
            .get(file as usize)
            .with_context(|| format!("file {file} is out of range: model {hash} has {} files", layout.len()))?;
        let chunks = chunk_count(*len);
        if u64::from(index) >= chunks {
            bail!("chunk {index} is out of range: file {file} of model {hash} has {chunks} chunks");
        }
        let off = u64::from(index) * MODEL_CHUNK as u64;
        let want = (len - off).min(MODEL_CHUNK as u64) as usize;
        let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        f.seek(SeekFrom::Start(off))?;
        let mut buf = vec![0u8; want];
        let n = read_full(&mut f, &mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n != want {
            bail!("{} is shorter than it was a moment ago", path.display());
        }
        Ok(buf)
    }

    /// Total size in bytes of stored entry `hash`.
    pub fn bytes(&self, hash: &str) -> anyhow::Result<u64> {
        Ok(self.layout(hash)?.iter().map(|(_, len)| len).sum())
    }

    /// A fresh temporary directory inside the store (same file system, so it can be renamed into place).
    fn temp_dir(&self, tag: &str) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(&self.root).with_context(|| format!("creating {}", self.root.display()))?;
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join(format!(".import-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(tmp)
    }

    /// Moves the complete directory `tmp` (which hashes to `manifest.hash`) into the store under its hash
    /// and caches its manifest. Someone else storing the same content first is success, not an error.
    pub(crate) fn commit(&self, tmp: &Path, manifest: &Manifest) -> anyhow::Result<PathBuf> {
        check_hash(&manifest.hash)?;
        let dst = self.root.join(&manifest.hash);
        // A directory under a valid hash without a marker file is debris (nothing ever creates one); it
        // would block the rename, and resolve() already treats it as absent.
        if dst.is_dir() && matches!(self.resolve(&manifest.hash), Ok(None)) {
            let _ = std::fs::remove_dir_all(&dst);
        }
        if let Err(e) = std::fs::rename(tmp, &dst) {
            if let Ok(Some(d)) = self.resolve(&manifest.hash) {
                let _ = std::fs::remove_dir_all(tmp);
                return Ok(d);
            }
            let _ = std::fs::remove_dir_all(tmp);
            return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()));
        }
        if let Ok(d) = std::fs::File::open(&self.root) {
            let _ = d.sync_all();
        }
        self.save_manifest(manifest);
        Ok(dst)
    }

    /// Hashes the temporary directory `tmp` (with its manifest) and commits it unless the store already
    /// holds it; `expect` is the hash it must have, if known.
    fn store_temp(&self, tmp: &Path, expect: Option<&str>) -> anyhow::Result<String> {
        let (hash, files) = match scan(tmp, true) {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_dir_all(tmp);
                return Err(e);
            }
        };
        if expect.is_some_and(|h| h != hash) {
            let _ = std::fs::remove_dir_all(tmp);
            bail!("the directory changed while it was being imported");
        }
        if self.resolve(&hash)?.is_some() {
            let _ = std::fs::remove_dir_all(tmp);
            return Ok(hash);
        }
        self.commit(
            tmp,
            &Manifest {
                hash: hash.clone(),
                files,
            },
        )?;
        Ok(hash)
    }

    /// Copies the model or adapter in `dir` into the store (unless already there) and returns its hash.
    /// Its manifest is computed while the copy is checked, so serving it later needs no extra pass.
    pub fn import(&self, dir: &Path) -> anyhow::Result<String> {
        let hash = content_hash(dir)?;
        if self.resolve(&hash)?.is_some() {
            return Ok(hash);
        }
        let tmp = self.temp_dir(&hash)?;
        for (name, f) in model_files(dir)? {
            if let Err(e) = std::fs::copy(&f, tmp.join(&name)) {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e).with_context(|| format!("copying {}", f.display()));
            }
        }
        // The copy must still be the model we hashed (it could have changed while we copied).
        self.store_temp(&tmp, Some(&hash))
            .with_context(|| format!("importing {}", dir.display()))
    }

    /// Stores a directory given as (file name, bytes) pairs, e.g. an adapter that came back from a
    /// fine-tune, and returns its hash. Names must be plain and unique; one must be a marker file.
    pub fn import_files(&self, files: &[(String, Vec<u8>)]) -> anyhow::Result<String> {
        if files.len() > MAX_MODEL_FILES {
            bail!("{} files (at most {MAX_MODEL_FILES})", files.len());
        }
        let mut seen = std::collections::HashSet::new();
        for (name, _) in files {
            if !plain_name(name) {
                bail!("unsafe file name {name:?}");
            }
            // Lower-cased: on a case-insensitive file system two such names would be one file.
            if !seen.insert(name.to_lowercase()) {
                bail!("duplicate file name {name:?}");
            }
        }
        if !files.iter().any(|(n, _)| MARKERS.contains(&n.as_str())) {
            bail!("no config.json, adapter_config.json, model.gguf or adapter.gguf among the files: not a model or adapter");
        }
        let tmp = self.temp_dir("files")?;
        for (name, bytes) in files {
            let p = tmp.join(name);
            if let Err(e) = std::fs::write(&p, bytes) {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e).with_context(|| format!("writing {}", p.display()));
            }
        }
        self.store_temp(&tmp, None)
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
        // Debris under the hash (a directory without config.json) is not the model and does not block it.
        std::fs::create_dir_all(store.root().join(&h).join("junk")).expect("mkdir");
        assert!(store.resolve(&h).expect("valid").is_none());
        assert_eq!(store.import(&m).expect("import"), h);
        assert!(!store.root().join(&h).join("junk").exists());
        let got = store.resolve(&h).expect("valid").expect("present");
        assert_eq!(content_hash(&got).expect("hash of the copy"), h);
        for bad in ["../../etc", "", &h[..63], &h.to_uppercase(), "/tmp/x"] {
            assert!(store.resolve(bad).is_err(), "{bad:?} accepted");
            assert!(store.manifest(bad).is_err(), "{bad:?} accepted");
            assert!(store.read_chunk(bad, 0, 0).is_err(), "{bad:?} accepted");
            assert!(store.bytes(bad).is_err(), "{bad:?} accepted");
        }
        // Any change to any file changes the hash.
        std::fs::write(m.join("model.safetensors"), vec![7u8; 2999]).expect("write");
        assert_ne!(content_hash(&m).expect("hash"), h);
    }

    #[test]
    fn adapters_are_stored_and_listed_alongside_models() {
        let home = dir("list-home");
        let store = Store::new(&home);
        assert!(store.list().is_empty(), "no store directory yet: nothing listed");
        let a = dir("adapter");
        std::fs::write(a.join("adapter_config.json"), b"{\"r\": 8}").expect("write");
        std::fs::write(a.join("adapter_model.safetensors"), vec![1u8; 500]).expect("write");
        let ha = store.import(&a).expect("an adapter imports");
        assert!(store.resolve(&ha).expect("valid").is_some());
        let m = dir("list-model");
        std::fs::write(m.join("config.json"), b"{}").expect("write");
        let hm = store.import(&m).expect("import");
        // Work in progress and manifests are never listed.
        std::fs::create_dir_all(store.root().join(format!(".partial-{}", "0".repeat(64)))).expect("mkdir");
        std::fs::create_dir_all(store.root().join(".import-x-1-2")).expect("mkdir");
        std::fs::create_dir_all(store.root().join("1".repeat(64))).expect("an entry without a marker file");
        let mut want = vec![ha.clone(), hm];
        want.sort();
        assert_eq!(store.list(), want);
        assert_eq!(store.bytes(&ha).expect("size"), 8 + 500);
        // A directory with neither marker is not a model.
        let x = dir("neither");
        std::fs::write(x.join("weights.bin"), b"x").expect("write");
        assert!(store.import(&x).is_err());
    }

    #[test]
    fn import_files_stores_what_import_would() {
        let store = Store::new(&dir("files-home"));
        let files = vec![
            ("adapter_config.json".to_string(), b"{\"r\": 4}".to_vec()),
            ("adapter_model.safetensors".to_string(), vec![3u8; MODEL_CHUNK + 10]),
        ];
        let h = store.import_files(&files).expect("stores");
        let a = dir("files-src");
        for (n, b) in &files {
            std::fs::write(a.join(n), b).expect("write");
        }
        assert_eq!(content_hash(&a).expect("hash"), h);
        assert_eq!(store.import_files(&files).expect("again"), h, "storing twice is fine");
        assert_eq!(store.list(), vec![h.clone()]);
        for bad in ["../x", "a/b", ".hidden", "", "a\\b", "a\nb"] {
            let mut f = files.clone();
            f.push((bad.to_string(), vec![]));
            assert!(store.import_files(&f).is_err(), "{bad:?} accepted");
        }
        let mut dup = files.clone();
        dup.push(("Adapter_Config.json".to_string(), vec![]));
        assert!(store.import_files(&dup).is_err(), "names equal but for case accepted");
        assert!(store.import_files(&files[1..]).is_err(), "no marker file accepted");
        let many: Vec<(String, Vec<u8>)> = (0..=MAX_MODEL_FILES).map(|i| (format!("f{i}"), vec![])).collect();
        assert!(store.import_files(&many).is_err());
        // No temporary directory is left behind.
        let left: Vec<_> = std::fs::read_dir(store.root())
            .expect("root")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".import"))
            .collect();
        assert!(left.is_empty());
    }

    #[test]
    fn manifests_are_cached_checked_and_rebuilt() {
        let m = dir("manifest-src");
        std::fs::write(m.join("config.json"), b"{}").expect("write");
        let big: Vec<u8> = (0..2 * MODEL_CHUNK + 5).map(|i| (i % 251) as u8).collect();
        std::fs::write(m.join("model.safetensors"), &big).expect("write");
        std::fs::write(m.join("empty.txt"), b"").expect("write");
        let store = Store::new(&dir("manifest-home"));
        let h = store.import(&m).expect("import");
        let side = store.root().join(format!("{h}.manifest.json"));
        assert!(side.is_file(), "import precomputes the manifest");
        let man = store.manifest(&h).expect("manifest");
        assert_eq!(man.hash, h);
        let names: Vec<&str> = man.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["config.json", "empty.txt", "model.safetensors"]);
        let (e, w) = (&man.files[1], &man.files[2]);
        assert_eq!((e.len, e.chunks.len()), (0, 0));
        assert_eq!((w.len, w.chunks.len()), (big.len() as u64, 3));
        let third: [u8; 32] = Sha256::digest(&big[2 * MODEL_CHUNK..]).into();
        assert_eq!(w.chunks[2], third);
        assert_eq!(store.read_chunk(&h, 2, 2).expect("last chunk"), &big[2 * MODEL_CHUNK..]);
        assert_eq!(store.read_chunk(&h, 2, 0).expect("first chunk"), &big[..MODEL_CHUNK]);
        assert!(store.read_chunk(&h, 2, 3).is_err());
        assert!(store.read_chunk(&h, 1, 0).is_err(), "an empty file has no chunks");
        assert!(store.read_chunk(&h, 3, 0).is_err());
        assert!(store.read_chunk(&"0".repeat(64), 0, 0).is_err(), "unknown hash");
        // A corrupt or lying sidecar is noticed and rebuilt.
        std::fs::write(&side, b"garbage").expect("write");
        assert_eq!(store.manifest(&h).expect("rebuilt"), man);
        let mut lie = man.clone();
        lie.files[2].len += 1;
        std::fs::write(&side, serde_json::to_vec(&lie).expect("json")).expect("write");
        assert_eq!(store.manifest(&h).expect("rebuilt"), man);
        // Without any sidecar it is computed again.
        std::fs::remove_file(&side).expect("rm");
        assert_eq!(store.manifest(&h).expect("computed"), man);
        assert!(side.is_file());
    }
}
