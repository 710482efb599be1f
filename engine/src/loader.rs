//! Memory-mapped safetensors checkpoints, single file or sharded (`model.safetensors.index.json`).
//!
//! The files are mapped, never read into a Vec: a 2.4B checkpoint is only paged in as tensors are converted
//! to their device form, so the process never holds two copies of the model.
use crate::error::{EngineError, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, TensorInfo};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
}

/// All tensors of a checkpoint, by name.
pub struct WeightFiles {
    shards: Vec<Shard>,
    index: HashMap<String, (usize, TensorInfo)>,
}

/// A borrowed view of one tensor's raw little-endian bytes.
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
        Ok(WeightFiles { shards, index })
    }

    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn get(&self, name: &str) -> Result<TensorRef<'_>> {
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

    /// Total bytes of all mapped files (what a transfer of the model costs).
    pub fn file_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.map.len() as u64).sum()
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
        Ok((0..self.numel()).map(|i| self.float_at(i)).collect())
    }
}
