//! The GGUF container: header, metadata, tensor infos, alignment and data offsets, read strictly from a byte
//! slice (the caller memory-maps the file).
//!
//! Layout and rules follow llama.cpp's `gguf_init_from_file_impl` (see the module comment of `gguf`):
//! little-endian; version 2 or 3; duplicate keys and tensor names refused; at most 4 dimensions, names
//! shorter than 64 bytes; `general.alignment` a u32 power of two (default 32); each tensor's offset equal to
//! the running sum of the earlier tensors' sizes, each padded to the alignment, so that tensors are
//! contiguous, aligned and cannot overlap. Every count and length read from the file is checked against the
//! bytes that remain before anything is allocated for it, so a hostile header cannot make the reader
//! allocate more than a small multiple of the file's own size.
use super::error::{GgufError, Result};
use super::types::{GgmlType, FTYPE_I2_S, I2S_BLOCK};
use std::collections::HashMap;

pub const MAGIC: &[u8; 4] = b"GGUF";
/// `GGUF_DEFAULT_ALIGNMENT`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;
/// `GGML_MAX_NAME` is 64 including the C string's NUL.
pub const MAX_NAME_LEN: usize = 63;
/// The spec allows arrays of arrays (llama.cpp itself refuses them); the depth is bounded so that a file of
/// nested array headers cannot exhaust the stack.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// Metadata value type ids (`gguf_type`).
pub(super) mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array, held typed: a Vec of [`Value`] would cost 32 bytes per element of a u8 array, so a
/// hostile file could make the reader allocate 32 times its own size.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Value {
    /// The GGUF name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }
    /// Any integer type holding a non-negative value (converters disagree on u32 vs i32 for ids and sizes).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The element type's GGUF name, for messages.
    pub fn elem_type_name(&self) -> &'static str {
        match self {
            Array::U8(_) => "u8",
            Array::I8(_) => "i8",
            Array::U16(_) => "u16",
            Array::I16(_) => "i16",
            Array::U32(_) => "u32",
            Array::I32(_) => "i32",
            Array::F32(_) => "f32",
            Array::Bool(_) => "bool",
            Array::String(_) => "string",
            Array::Array(_) => "array",
            Array::U64(_) => "u64",
            Array::I64(_) => "i64",
            Array::F64(_) => "f64",
        }
    }
}

/// One tensor's header, checked: its data lies inside the file at `offset..offset + nbytes`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF's `ne`: the contiguous axis first, the reverse of a numpy/PyTorch shape (a Linear weight
    /// [out, in] is stored as ne = [in, out]).
    pub ne: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    pub nbytes: usize,
    /// The product of `ne` (fits in usize: checked at parse).
    pub n_elements: usize,
}

impl TensorInfo {
    /// Elements along the contiguous axis: the row length (`in` of a projection).
    pub fn row_len(&self) -> usize {
        self.ne.first().copied().unwrap_or(1)
    }
    /// The number of rows of `row_len` elements (`out` of a projection).
    pub fn n_rows(&self) -> usize {
        self.ne.iter().skip(1).product()
    }
    /// The shape in numpy/PyTorch order.
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().copied().collect()
    }
}

/// A parsed GGUF file: metadata owned, tensor data left in the caller's bytes (see [`Gguf::tensor_data`]).
#[derive(Debug, Clone)]
pub struct Gguf {
    pub version: u32,
    /// The data alignment (`general.alignment`, default 32).
    pub alignment: u64,
    /// Where the data section starts (the end of the tensor infos, rounded up to the alignment).
    pub data_start: usize,
    /// The length of the byte slice this was parsed from.
    pub file_len: usize,
    /// Whether the file comes from bitnet.cpp (`general.file_type` 40 or a `bitnet-*` architecture), the
    /// only files where tensor type 36 means I2_S.
    pub bitnet_cpp: bool,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// Reads from the file's bytes; every read is checked against the end.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                at: self.pos as u64,
                need: n,
                len: self.buf.len() as u64,
            });
        }
        // n <= remaining, which is a usize.
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn i64(&mut self, what: &dyn Fn() -> String) -> Result<i64> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }
    /// A GGUF string: u64 length, then UTF-8 bytes. The length is checked against the bytes left before
    /// anything is allocated.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::InvalidUtf8 { what: what() })
    }
    /// Refuses a count of items that cannot fit in what is left of the file at `min_each` bytes per item.
    fn check_count(&self, count: u64, min_each: u64, what: &dyn Fn() -> String) -> Result<()> {
        if count.saturating_mul(min_each) > self.remaining() {
            return Err(GgufError::CountTooLarge {
                what: what(),
                count,
                min_each,
                remaining: self.remaining(),
            });
        }
        Ok(())
    }
}

/// The fewest bytes one value of type `ty` takes (for count checks); `None` for an unknown type.
fn min_size(ty: u32) -> Option<u64> {
    Some(match ty {
        vt::U8 | vt::I8 | vt::BOOL => 1,
        vt::U16 | vt::I16 => 2,
        vt::U32 | vt::I32 | vt::F32 => 4,
        vt::U64 | vt::I64 | vt::F64 | vt::STRING => 8,
        // element type + count
        vt::ARRAY => 12,
        _ => return None,
    })
}

fn read_bool(b: u8, key: &str) -> Result<bool> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(GgufError::BadValue {
            key: key.to_string(),
            msg: format!("bool value {v} is neither 0 nor 1"),
        }),
    }
}

/// `n` fixed-size elements of `size` bytes each, converted by `f` (one bounds check for the whole array).
fn fixed<T, const N: usize>(c: &mut Cursor<'_>, n: u64, key: &str, f: impl Fn([u8; N]) -> T) -> Result<Vec<T>> {
    let bytes = c.take(n.saturating_mul(N as u64), &|| format!("array value of key {key:?}"))?;
    Ok(bytes
        .chunks_exact(N)
        .map(|ch| {
            let mut a = [0u8; N];
            a.copy_from_slice(ch);
            f(a)
        })
        .collect())
}

fn read_value(c: &mut Cursor<'_>, ty: u32, key: &str) -> Result<Value> {
    let what = || format!("value of key {key:?}");
    Ok(match ty {
        vt::U8 => Value::U8(c.array::<1>(&what)?[0]),
        vt::I8 => Value::I8(c.array::<1>(&what)?[0] as i8),
        vt::U16 => Value::U16(u16::from_le_bytes(c.array(&what)?)),
        vt::I16 => Value::I16(i16::from_le_bytes(c.array(&what)?)),
        vt::U32 => Value::U32(u32::from_le_bytes(c.array(&what)?)),
        vt::I32 => Value::I32(i32::from_le_bytes(c.array(&what)?)),
        vt::F32 => Value::F32(f32::from_le_bytes(c.array(&what)?)),
        vt::BOOL => Value::Bool(read_bool(c.array::<1>(&what)?[0], key)?),
        vt::STRING => Value::String(c.string(&what)?),
        vt::U64 => Value::U64(u64::from_le_bytes(c.array(&what)?)),
        vt::I64 => Value::I64(i64::from_le_bytes(c.array(&what)?)),
        vt::F64 => Value::F64(f64::from_le_bytes(c.array(&what)?)),
        vt::ARRAY => Value::Array(read_array(c, key, 1)?),
        ty => {
            return Err(GgufError::UnknownValueType {
                key: key.to_string(),
                ty,
            })
        }
    })
}

fn read_array(c: &mut Cursor<'_>, key: &str, depth: usize) -> Result<Array> {
    if depth > MAX_ARRAY_DEPTH {
        return Err(GgufError::NestedTooDeep {
            key: key.to_string(),
            max: MAX_ARRAY_DEPTH,
        });
    }
    let ty = c.u32(&|| format!("array element type of key {key:?}"))?;
    let n = c.u64(&|| format!("array length of key {key:?}"))?;
    let Some(min) = min_size(ty) else {
        return Err(GgufError::UnknownValueType {
            key: key.to_string(),
            ty,
        });
    };
    c.check_count(n, min, &|| format!("array length of key {key:?}"))?;
    // From here on n elements of at least `min` bytes fit in the file, so n bounds every allocation.
    Ok(match ty {
        vt::U8 => Array::U8(fixed(c, n, key, |[b]: [u8; 1]| b)?),
        vt::I8 => Array::I8(fixed(c, n, key, |[b]: [u8; 1]| b as i8)?),
        vt::U16 => Array::U16(fixed(c, n, key, u16::from_le_bytes)?),
        vt::I16 => Array::I16(fixed(c, n, key, i16::from_le_bytes)?),
        vt::U32 => Array::U32(fixed(c, n, key, u32::from_le_bytes)?),
        vt::I32 => Array::I32(fixed(c, n, key, i32::from_le_bytes)?),
        vt::F32 => Array::F32(fixed(c, n, key, f32::from_le_bytes)?),
        vt::U64 => Array::U64(fixed(c, n, key, u64::from_le_bytes)?),
        vt::I64 => Array::I64(fixed(c, n, key, i64::from_le_bytes)?),
        vt::F64 => Array::F64(fixed(c, n, key, f64::from_le_bytes)?),
        vt::BOOL => {
            let raw = fixed(c, n, key, |[b]: [u8; 1]| b)?;
            Array::Bool(raw.into_iter().map(|b| read_bool(b, key)).collect::<Result<_>>()?)
        }
        vt::STRING => {
            let mut v = Vec::with_capacity(n as usize);
            for i in 0..n {
                v.push(c.string(&|| format!("string #{i} of array key {key:?}"))?);
            }
            Array::String(v)
        }
        _ => {
            // vt::ARRAY (min_size refused every other type above)
            let mut v = Vec::with_capacity(n as usize);
            for _ in 0..n {
                v.push(read_array(c, key, depth + 1)?);
            }
            Array::Array(v)
        }
    })
}

fn align_up(x: u64, alignment: u64) -> Option<u64> {
    // alignment is a power of two
    Some(x.checked_add(alignment - 1)? & !(alignment - 1))
}

impl Gguf {
    /// Parses and checks the whole container; reads no tensor data beyond locating it.
    pub fn parse(bytes: &[u8]) -> Result<Gguf> {
        let mut c = Cursor { buf: bytes, pos: 0 };
        let magic: [u8; 4] = c.array(&|| "magic".into())?;
        if &magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = c.u32(&|| "version".into())?;
        if version != 2 && version != 3 {
            // A big-endian file (gguf-py can write one) has its small version number in the high bytes.
            if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
                return Err(GgufError::BigEndian);
            }
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = c.i64(&|| "tensor count".into())?;
        let n_kv = c.i64(&|| "metadata count".into())?;
        // Counts are i64 in the file; negative ones are as hostile as huge ones.
        let n_tensors = u64::try_from(n_tensors).unwrap_or(u64::MAX);
        let n_kv = u64::try_from(n_kv).unwrap_or(u64::MAX);
        // Smallest KV: key length (8) + value type (4) + a 1-byte value. Smallest tensor info: name length
        // (8) + n_dims (4) + type (4) + offset (8).
        c.check_count(n_kv, 13, &|| "metadata count".into())?;
        c.check_count(n_tensors, 24, &|| "tensor count".into())?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut key_index = HashMap::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = c.string(&|| format!("key of metadata #{i}"))?;
            let ty = c.u32(&|| format!("value type of key {key:?}"))?;
            let value = read_value(&mut c, ty, &key)?;
            if key_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::DuplicateKey(key));
            }
            metadata.push((key, value));
        }

        let get = |k: &str| key_index.get(k).map(|&i: &usize| &metadata[i].1);
        let alignment = match get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
            Some(Value::U32(a)) => {
                return Err(GgufError::BadValue {
                    key: "general.alignment".into(),
                    msg: format!("{a} is not a power of two"),
                })
            }
            Some(v) => {
                return Err(GgufError::KeyType {
                    key: "general.alignment".into(),
                    expected: "u32",
                    found: v.type_name(),
                })
            }
        };
        let bitnet_cpp = get("general.file_type").and_then(Value::as_u64) == Some(u64::from(FTYPE_I2_S))
            || get("general.architecture")
                .and_then(Value::as_str)
                .is_some_and(|a| a.starts_with("bitnet-"));

        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        // Offsets relative to the data section, checked once its start is known.
        let mut rel_offsets = Vec::with_capacity(n_tensors as usize);
        for index in 0..n_tensors {
            let name = c.string(&|| format!("name of tensor #{index}"))?;
            if name.is_empty() || name.len() > MAX_NAME_LEN {
                return Err(GgufError::BadTensorName {
                    index,
                    msg: format!("name {name:?} is {} bytes, must be 1 to {MAX_NAME_LEN}", name.len()),
                });
            }
            let n_dims = c.u32(&|| format!("dimension count of tensor {name:?}"))?;
            if n_dims > MAX_DIMS {
                return Err(GgufError::TooManyDims {
                    tensor: name,
                    n_dims,
                    max: MAX_DIMS,
                });
            }
            let mut raw = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                raw.push(c.i64(&|| format!("dimensions of tensor {name:?}"))?);
            }
            let ty_id = c.u32(&|| format!("type of tensor {name:?}"))?;
            let rel = c.u64(&|| format!("data offset of tensor {name:?}"))?;

            let mut ne = Vec::with_capacity(raw.len());
            for (dim, &v) in raw.iter().enumerate() {
                match u64::try_from(v) {
                    Ok(v) => ne.push(v),
                    Err(_) => {
                        return Err(GgufError::NegativeDim {
                            tensor: name,
                            dim,
                            value: v,
                        })
                    }
                }
            }
            let ty = GgmlType::from_id(ty_id, bitnet_cpp).map_err(|reason| match reason {
                Some(reason) => GgufError::UnsupportedType {
                    tensor: name.clone(),
                    ty: format!("id {ty_id}"),
                    reason,
                },
                None => GgufError::UnknownType {
                    tensor: name.clone(),
                    ty: ty_id,
                },
            })?;
            let overflow = || GgufError::DimsOverflow {
                tensor: name.clone(),
                dims: raw.clone(),
            };
            let n = ne
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(overflow)?;
            let ne0 = ne.first().copied().unwrap_or(1);
            if ne0 % ty.block_size() != 0 {
                return Err(GgufError::BadShape {
                    tensor: name,
                    msg: format!(
                        "ne[0] = {ne0} is not a multiple of {ty}'s block size {}",
                        ty.block_size()
                    ),
                });
            }
            if ty == GgmlType::I2S && n % I2S_BLOCK != 0 {
                return Err(GgufError::BadShape {
                    tensor: name,
                    msg: format!("{n} elements is not a multiple of I2_S's {I2S_BLOCK}-element packing block"),
                });
            }
            let nbytes = ty.nbytes(n).ok_or_else(overflow)?;
            let n_elements = usize::try_from(n).map_err(|_| overflow())?;
            let ne: Vec<usize> = ne.into_iter().map(|d| d as usize).collect(); // each <= n, which fits
                                                                               // Bounded by the file before it is narrowed to usize (which it then fits, on any host).
            if nbytes > bytes.len() as u64 {
                return Err(GgufError::BadShape {
                    tensor: name,
                    msg: format!(
                        "its data would take {nbytes} bytes, more than the whole file ({})",
                        bytes.len()
                    ),
                });
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::DuplicateTensor(name));
            }
            rel_offsets.push(rel);
            tensors.push(TensorInfo {
                name,
                ne,
                ty,
                offset: 0,
                nbytes: nbytes as usize,
                n_elements,
            });
        }

        let len = bytes.len() as u64;
        let data_start = align_up(c.pos as u64, alignment).unwrap_or(u64::MAX);
        let mut expected = 0u64;
        for (t, &rel) in tensors.iter_mut().zip(&rel_offsets) {
            if rel % alignment != 0 {
                return Err(GgufError::Misaligned {
                    tensor: t.name.clone(),
                    offset: rel,
                    alignment,
                });
            }
            let start = data_start.checked_add(rel);
            let end = start.and_then(|s| s.checked_add(t.nbytes as u64));
            match (start, end) {
                (Some(s), Some(e)) if e <= len => t.offset = s as usize,
                _ => {
                    return Err(GgufError::OutOfBounds {
                        tensor: t.name.clone(),
                        start: start.unwrap_or(u64::MAX),
                        end: end.unwrap_or(u64::MAX),
                        len,
                    })
                }
            }
            if rel != expected {
                return Err(GgufError::NotContiguous {
                    tensor: t.name.clone(),
                    offset: rel,
                    expected,
                });
            }
            // rel + nbytes <= len, so neither this sum nor its padding can overflow.
            expected = align_up(rel + t.nbytes as u64, alignment).unwrap_or(u64::MAX);
        }

        Ok(Gguf {
            version,
            alignment,
            // Past the end only when there are no tensors (each tensor's data lies inside the file).
            data_start: data_start.min(len) as usize,
            file_len: bytes.len(),
            bitnet_cpp,
            metadata,
            key_index,
            tensors,
            tensor_index,
        })
    }

    /// Every key and value, in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }
    fn typed<'s, T>(
        &'s self,
        key: &str,
        expected: &'static str,
        f: impl Fn(&'s Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => f(v).map(Some).ok_or_else(|| GgufError::KeyType {
                key: key.to_string(),
                expected,
                found: v.type_name(),
            }),
        }
    }
    /// A string value; an error if the key holds another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "string", Value::as_str)
    }
    /// A non-negative integer of any width; an error if the key holds another type or a negative value.
    pub fn get_uint(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "non-negative integer", Value::as_u64)
    }
    /// An f32 or f64 value.
    pub fn get_float(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "f32 or f64", Value::as_f64)
    }
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "bool", |v| match v {
            Value::Bool(b) => Some(*b),
            _ => None,
        })
    }
    pub fn get_array(&self, key: &str) -> Result<Option<&Array>> {
        self.typed(key, "array", |v| match v {
            Value::Array(a) => Some(a),
            _ => None,
        })
    }
    /// `general.architecture`, which every model and adapter file has (it prefixes the hyperparameter keys).
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")?
            .ok_or_else(|| GgufError::BadValue {
                key: "general.architecture".into(),
                msg: "missing".into(),
            })
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
    /// The data of `t` inside `file`, which must be the bytes this was parsed from (their length is checked,
    /// so that a wrong slice is an error rather than a panic).
    pub fn tensor_data<'a>(&self, t: &TensorInfo, file: &'a [u8]) -> Result<&'a [u8]> {
        if file.len() != self.file_len {
            return Err(GgufError::WrongFile {
                got: file.len(),
                expected: self.file_len,
            });
        }
        file.get(t.offset..t.offset + t.nbytes).ok_or(GgufError::OutOfBounds {
            tensor: t.name.clone(),
            start: t.offset as u64,
            end: (t.offset + t.nbytes) as u64,
            len: file.len() as u64,
        })
    }
}
