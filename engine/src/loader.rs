//! Memory-mapped safetensors checkpoints, single file or sharded (`model.safetensors.index.json`).
//!
//! The files are mapped, never read into a Vec: a 2.4B checkpoint is only paged in as tensors are converted
//! to their device form, so the process never holds two copies of the model.
use crate::error::{EngineError, Result};
use memmap2::Mmap;
/// The tensor element types (re-exported so that users of [`TensorRef`] need no safetensors dependency).
pub use safetensors::tensor::Dtype;
use safetensors::tensor::{SafeTensors, TensorInfo};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
}

/// A memory-mapped GGUF file and its parsed header: tensor data stays in the map until a decoder reads it.
pub struct GgufWeights {
    pub path: PathBuf,
    map: Mmap,
    pub gguf: crate::gguf::Gguf,
}

impl GgufWeights {
    /// Maps and parses `path` (a GGUF file, or a store entry holding one: see [`crate::model::gguf_file`]);
    /// a corrupt or truncated file is refused here by the strict reader (which checks every count, offset
    /// and size against the file before allocating), with the path.
    pub fn open(path: &Path) -> Result<Self> {
        let inner = crate::model::gguf_file(path);
        let path = inner.as_deref().unwrap_or(path);
        let file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
        // SAFETY: as for safetensors shards: a read-only map, and a file truncated under us may fault.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
        let gguf = crate::gguf::Gguf::parse(&map).map_err(|e| EngineError::gguf(path, e))?;
        Ok(GgufWeights {
            path: path.to_path_buf(),
            map,
            gguf,
        })
    }
    /// The whole file's bytes (what the decoders' `tensor_data` slices).
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
    /// Tensor `name`'s header, or [`EngineError::MissingTensor`].
    pub fn info(&self, name: &str) -> Result<&crate::gguf::TensorInfo> {
        self.gguf
            .tensor(name)
            .ok_or_else(|| EngineError::MissingTensor(format!("{name} (in {})", self.path.display())))
    }
    /// Tensor `t`'s data bytes inside the map.
    pub fn data(&self, t: &crate::gguf::TensorInfo) -> Result<&[u8]> {
        self.gguf
            .tensor_data(t, &self.map)
            .map_err(|e| EngineError::gguf(&self.path, e))
    }
}

/// All tensors of a checkpoint, by name: safetensors shards, or one GGUF file.
pub struct WeightFiles {
    shards: Vec<Shard>,
    index: HashMap<String, (usize, TensorInfo)>,
    /// Set for a GGUF model (then `shards` is empty): its tensors are read through the GGUF decoders, not
    /// [`WeightFiles::get`].
    gguf: Option<GgufWeights>,
    /// Wall time spent reading and converting tensors (the load report's `convert_seconds`).
    convert_ns: AtomicU64,
}

/// A borrowed view of one tensor's raw little-endian bytes.
#[derive(Clone, Copy)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl WeightFiles {
    /// Opens `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| EngineError::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| EngineError::Safetensors {
                path: index_path.clone(),
                msg: format!("invalid index json: {e}"),
            })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| EngineError::Safetensors {
                    path: index_path.clone(),
                    msg: "no weight_map object".into(),
                })?;
            let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
            names.sort();
            names.dedup();
            let mut out = Vec::new();
            for n in names {
                // A hostile index must not make us open files outside the model directory.
                if n.contains('/') || n.contains('\\') || n.starts_with('.') {
                    return Err(EngineError::Safetensors {
                        path: index_path.clone(),
                        msg: format!("shard name {n:?} is not a plain file name"),
                    });
                }
                out.push(dir.join(n));
            }
            if out.is_empty() {
                return Err(EngineError::Safetensors {
                    path: index_path,
                    msg: "weight_map lists no shards".into(),
                });
            }
            out
        } else {
            return Err(EngineError::io(
                single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json",
                ),
            ));
        };
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = std::fs::File::open(&path).map_err(|e| EngineError::io(&path, e))?;
            // SAFETY: the map is read-only. If another process truncates the file while we run we may fault;
            // that is the usual contract of mmap-based loaders (safetensors, llama.cpp) and is documented.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(&path, e))?;
            let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| EngineError::Safetensors {
                path: path.clone(),
                msg: e.to_string(),
            })?;
            let shard_idx = shards.len();
            for (name, info) in meta.tensors() {
                index.insert(name, (shard_idx, info.clone()));
            }
            shards.push(Shard {
                path,
                map,
                data_start: 8 + n,
            });
        }
        Ok(WeightFiles {
            shards,
            index,
            gguf: None,
            convert_ns: AtomicU64::new(0),
        })
    }

    /// Maps one GGUF file (see [`GgufWeights::open`]).
    pub fn open_gguf(path: &Path) -> Result<Self> {
        Ok(WeightFiles {
            shards: vec![],
            index: HashMap::new(),
            gguf: Some(GgufWeights::open(path)?),
            convert_ns: AtomicU64::new(0),
        })
    }

    /// The GGUF file, for a GGUF model.
    pub fn gguf(&self) -> Option<&GgufWeights> {
        self.gguf.as_ref()
    }

    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name) || self.gguf.as_ref().is_some_and(|g| g.gguf.tensor(name).is_some())
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    /// A safetensors tensor. A GGUF model's tensors are not safetensors dtypes (TQ2_0, I2_S, ...): they are
    /// read through [`WeightFiles::gguf`] and the GGUF decoders instead.
    pub fn get(&self, name: &str) -> Result<TensorRef<'_>> {
        if let Some(g) = &self.gguf {
            return Err(EngineError::tensor(
                name,
                format!(
                    "is in the GGUF file {}, which has no safetensors tensors",
                    g.path.display()
                ),
            ));
        }
        let (name_ref, (shard, info)) = self
            .index
            .get_key_value(name)
            .ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
        let s = &self.shards[*shard];
        let (a, b) = info.data_offsets;
        let bytes = s
            .map
            .get(s.data_start + a..s.data_start + b)
            .ok_or_else(|| EngineError::Safetensors {
                path: s.path.clone(),
                msg: format!("tensor {name} lies outside the file"),
            })?;
        Ok(TensorRef {
            name: name_ref,
            dtype: info.dtype,
            shape: &info.shape,
            bytes,
        })
    }

    /// Bytes [start, end) of tensor `name`'s data as (map, offset in it, length), clamped to the tensor.
    fn span(&self, name: &str, start: usize, end: usize) -> Option<(&Mmap, usize, usize)> {
        let (map, base, a, b) = match &self.gguf {
            Some(g) => {
                let t = g.gguf.tensor(name)?;
                (&g.map, 0, t.offset, t.offset + t.nbytes)
            }
            None => {
                let (shard, info) = self.index.get(name)?;
                let s = self.shards.get(*shard)?;
                (&s.map, s.data_start, info.data_offsets.0, info.data_offsets.1)
            }
        };
        let (lo, hi) = (a.saturating_add(start).min(b), a.saturating_add(end).min(b));
        (hi > lo && base + hi <= map.len()).then_some((map, base + lo, hi - lo))
    }

    /// Lets go of the mapped pages of bytes [start, end) of tensor `name`: they stop counting in this
    /// process's resident memory (the kernel keeps them in its page cache, so a later read refaults them
    /// from there). Loaders call it once a tensor's bytes are converted, which bounds the resident part of
    /// the map to the tensors in flight instead of the whole checkpoint. A hint: errors are ignored.
    pub fn release(&self, name: &str, start: usize, end: usize) {
        #[cfg(unix)]
        if let Some((map, off, len)) = self.span(name, start, end) {
            // SAFETY: the map is a read-only shared file mapping that bitnode never writes, so MADV_DONTNEED
            // cannot lose data: a later access refaults the same bytes from the file. References into the map
            // stay valid (the range stays mapped); only its resident pages go. madvise rounds the start down
            // to a page, so a neighbouring tensor's first page may be dropped too, and is refaulted the same way.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, off, len) };
        }
        #[cfg(not(unix))]
        let _ = (name, start, end);
    }

    /// Asks the kernel to start reading tensor `name` from disk now (a cold page cache), so a converter that
    /// reaches it later finds it resident. A hint: errors are ignored.
    pub fn prefetch(&self, name: &str) {
        #[cfg(unix)]
        if let Some((map, off, len)) = self.span(name, 0, usize::MAX) {
            let _ = map.advise_range(memmap2::Advice::WillNeed, off, len);
        }
        #[cfg(not(unix))]
        let _ = name;
    }

    /// Adds `d` to the time spent reading and converting tensors.
    pub fn add_convert_time(&self, d: Duration) {
        self.convert_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Seconds spent reading and converting tensors so far (wall time of the conversion calls).
    pub fn convert_seconds(&self) -> f64 {
        self.convert_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// Total bytes of all mapped files (what a transfer of the model costs).
    pub fn file_bytes(&self) -> u64 {
        let gguf = self.gguf.as_ref().map_or(0, |g| g.map.len() as u64);
        gguf + self.shards.iter().map(|s| s.map.len() as u64).sum::<u64>()
    }
}

impl TensorRef<'_> {
    pub fn expect_shape(&self, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(EngineError::tensor(
                self.name,
                format!("has shape {:?}, expected {:?}", self.shape, shape),
            ));
        }
        Ok(())
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Element `i` as f32, for float dtypes. Used by streaming converters so no full f32 copy is made.
    pub fn float_at(&self, i: usize) -> f32 {
        let b = self.bytes;
        match self.dtype {
            Dtype::F32 => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
            Dtype::F16 => half::f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
            Dtype::BF16 => half::bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
            Dtype::F64 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b[8 * i..8 * i + 8]);
                f64::from_le_bytes(a) as f32
            }
            _ => f32::NAN,
        }
    }

    pub fn is_float(&self) -> bool {
        matches!(self.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
    }

    /// The whole tensor as f32 (small tensors: norms, scales).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        if !self.is_float() {
            return Err(EngineError::tensor(
                self.name,
                format!("has dtype {:?}, expected a float dtype", self.dtype),
            ));
        }
        let mut out = vec![0f32; self.numel()];
        self.read_f32(0, &mut out);
        Ok(out)
    }

    /// Elements [start, start + out.len()) as f32: `float_at` over a range, with the dtype matched once
    /// instead of per element. Bit-identical to `float_at` (tests/tests/load.rs checks every dtype).
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        let b = self.bytes;
        match self.dtype {
            Dtype::F32 => {
                for (o, c) in out.iter_mut().zip(b[4 * start..4 * (start + n)].chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Dtype::F16 => {
                for (o, c) in out.iter_mut().zip(b[2 * start..2 * (start + n)].chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            Dtype::BF16 => {
                for (o, c) in out.iter_mut().zip(b[2 * start..2 * (start + n)].chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            _ => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = self.float_at(start + i);
                }
            }
        }
    }

    /// Elements [start, start + out.len()) as f16 bits, each `f16::from_f32(float_at(i))` (the GPU's f16
    /// form of the embedding and lm_head). f16 sources are copied, bf16 and f32 ones go through half's
    /// slice conversion (the same rounding instruction as its per-element one) in blocks on the stack.
    pub fn read_f16(&self, start: usize, out: &mut [u16]) {
        let n = out.len();
        let b = self.bytes;
        match self.dtype {
            Dtype::F16 => {
                for (o, c) in out.iter_mut().zip(b[2 * start..2 * (start + n)].chunks_exact(2)) {
                    let h = u16::from_le_bytes([c[0], c[1]]);
                    // Through f32 and back every f16 is itself except a NaN, which may come back quieted
                    // (hardware conversion sets the quiet bit): those take the per-element path.
                    *o = if h & 0x7c00 == 0x7c00 && h & 0x03ff != 0 {
                        half::f16::from_f32(half::f16::from_bits(h).to_f32()).to_bits()
                    } else {
                        h
                    };
                }
            }
            Dtype::BF16 | Dtype::F32 => {
                use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
                let mut block = [0f32; 1024];
                for (k, o) in out.chunks_mut(block.len()).enumerate() {
                    let f = &mut block[..o.len()];
                    self.read_f32(start + k * 1024, f);
                    o.reinterpret_cast_mut::<half::f16>().convert_from_f32_slice(f);
                }
            }
            _ => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = half::f16::from_f32(self.float_at(start + i)).to_bits();
                }
            }
        }
    }
}
