//! A minimal GGUF v3 writer: header, metadata, tensor infos and tensor data, laid out as the reader
//! (and llama.cpp's `gguf_init_from_file_impl`) requires: little-endian, tensors contiguous in info order,
//! each padded to the alignment (`general.alignment`, default 32), the data section starting at the end of
//! the tensor infos rounded up to the alignment.
//!
//! It refuses, when a key or tensor is added, what llama.cpp would refuse when reading: duplicate keys or
//! tensor names, names of 64 bytes or more, more than 4 dimensions, nested arrays, data whose size does
//! not match the shape and type. So whatever it writes, the strict reader and llama.cpp accept.
use super::error::{GgufError, Result};
use super::reader::{vt, Array, Value, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS, MAX_NAME_LEN};
use super::types::GgmlType;
use std::collections::HashSet;

/// The version written (`GGUF_VERSION`).
pub const VERSION: u32 = 3;

struct Tensor {
    name: String,
    ne: Vec<usize>,
    ty: GgmlType,
    data: Vec<u8>,
}

/// A GGUF file being assembled in memory; [`GgufWriter::to_bytes`] lays it out.
pub struct GgufWriter {
    alignment: u64,
    metadata: Vec<(String, Value)>,
    keys: HashSet<String>,
    tensors: Vec<Tensor>,
    names: HashSet<String>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => vt::U8,
        Value::I8(_) => vt::I8,
        Value::U16(_) => vt::U16,
        Value::I16(_) => vt::I16,
        Value::U32(_) => vt::U32,
        Value::I32(_) => vt::I32,
        Value::F32(_) => vt::F32,
        Value::Bool(_) => vt::BOOL,
        Value::String(_) => vt::STRING,
        Value::Array(_) => vt::ARRAY,
        Value::U64(_) => vt::U64,
        Value::I64(_) => vt::I64,
        Value::F64(_) => vt::F64,
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(a) => put_array(out, a),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// Element type, count, elements. Nested arrays were refused by [`GgufWriter::add`].
fn put_array(out: &mut Vec<u8>, a: &Array) {
    fn each<T>(out: &mut Vec<u8>, ty: u32, v: &[T], f: impl Fn(&mut Vec<u8>, &T)) {
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(v.len() as u64).to_le_bytes());
        for x in v {
            f(out, x);
        }
    }
    match a {
        Array::U8(v) => each(out, vt::U8, v, |o, x| o.push(*x)),
        Array::I8(v) => each(out, vt::I8, v, |o, x| o.push(*x as u8)),
        Array::U16(v) => each(out, vt::U16, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        Array::I16(v) => each(out, vt::I16, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        Array::U32(v) => each(out, vt::U32, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        Array::I32(v) => each(out, vt::I32, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        Array::F32(v) => each(out, vt::F32, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        Array::Bool(v) => each(out, vt::BOOL, v, |o, x| o.push(u8::from(*x))),
        Array::String(v) => each(out, vt::STRING, v, |o, x| put_string(o, x)),
        Array::U64(v) => each(out, vt::U64, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        Array::I64(v) => each(out, vt::I64, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        Array::F64(v) => each(out, vt::F64, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        Array::Array(v) => each(out, vt::ARRAY, v, put_array),
    }
}

fn pad_to(out: &mut Vec<u8>, alignment: u64) {
    let rem = out.len() as u64 % alignment;
    if rem != 0 {
        out.resize(out.len() + (alignment - rem) as usize, 0);
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter {
            alignment: DEFAULT_ALIGNMENT,
            metadata: vec![],
            keys: HashSet::new(),
            tensors: vec![],
            names: HashSet::new(),
        }
    }

    /// Adds a metadata key. `general.alignment` must be a u32 power of two; it then sets the alignment.
    pub fn add(&mut self, key: &str, value: Value) -> Result<&mut Self> {
        if self.keys.contains(key) {
            return Err(GgufError::DuplicateKey(key.to_string()));
        }
        let bad = |msg: &str| GgufError::BadValue {
            key: key.to_string(),
            msg: msg.to_string(),
        };
        if let Value::Array(Array::Array(_)) = value {
            return Err(bad("nested arrays are not written (llama.cpp refuses them)"));
        }
        if key == "general.alignment" {
            match value {
                Value::U32(a) if a.is_power_of_two() => self.alignment = u64::from(a),
                Value::U32(_) => return Err(bad("the alignment must be a power of two")),
                ref v => {
                    return Err(GgufError::KeyType {
                        key: key.to_string(),
                        expected: "u32",
                        found: v.type_name(),
                    })
                }
            }
        }
        self.keys.insert(key.to_string());
        self.metadata.push((key.to_string(), value));
        Ok(self)
    }

    /// Adds a string key.
    pub fn add_str(&mut self, key: &str, s: &str) -> Result<&mut Self> {
        self.add(key, Value::String(s.to_string()))
    }

    /// Adds a tensor of type `ty` whose data `data` is already encoded. `ne` is GGUF's order (the
    /// contiguous axis first: a PyTorch [out, in] weight has ne = [in, out]).
    pub fn add_tensor(&mut self, name: &str, ne: &[usize], ty: GgmlType, data: Vec<u8>) -> Result<&mut Self> {
        let index = self.tensors.len() as u64;
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(GgufError::BadTensorName {
                index,
                msg: format!("name {name:?} is {} bytes, must be 1 to {MAX_NAME_LEN}", name.len()),
            });
        }
        if self.names.contains(name) {
            return Err(GgufError::DuplicateTensor(name.to_string()));
        }
        if ne.len() > MAX_DIMS as usize {
            return Err(GgufError::TooManyDims {
                tensor: name.to_string(),
                n_dims: ne.len() as u32,
                max: MAX_DIMS,
            });
        }
        let bad = |msg: String| GgufError::BadShape {
            tensor: name.to_string(),
            msg,
        };
        let ne0 = ne.first().copied().unwrap_or(1) as u64;
        if !ne0.is_multiple_of(ty.block_size()) {
            return Err(bad(format!(
                "ne[0] = {ne0} is not a multiple of {ty}'s block size {}",
                ty.block_size()
            )));
        }
        let n = ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        let want = n.and_then(|n| ty.nbytes(n));
        if want != Some(data.len() as u64) {
            return Err(bad(format!(
                "{} data bytes given, ne = {ne:?} of {ty} takes {want:?}",
                data.len()
            )));
        }
        self.names.insert(name.to_string());
        self.tensors.push(Tensor {
            name: name.to_string(),
            ne: ne.to_vec(),
            ty,
            data,
        });
        Ok(self)
    }

    /// Adds an F32 tensor (`data` row-major in PyTorch order, i.e. ne[0] fastest).
    pub fn add_f32(&mut self, name: &str, ne: &[usize], data: &[f32]) -> Result<&mut Self> {
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.add_tensor(name, ne, GgmlType::F32, bytes)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let data_len: usize = self
            .tensors
            .iter()
            .map(|t| t.data.len().next_multiple_of(self.alignment as usize))
            .sum();
        let mut out = Vec::with_capacity(4096 + data_len);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as i64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as i64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut out, k);
            out.extend_from_slice(&value_type(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_string(&mut out, &t.name);
            out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for &d in &t.ne {
                out.extend_from_slice(&(d as i64).to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (t.data.len() as u64).next_multiple_of(self.alignment);
        }
        pad_to(&mut out, self.alignment);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            pad_to(&mut out, self.alignment);
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::reader::Gguf;
    use super::*;

    #[test]
    fn written_files_read_back() {
        for align in [None, Some(64u32)] {
            let mut w = GgufWriter::new();
            w.add_str("general.architecture", "bitnet").unwrap();
            if let Some(a) = align {
                w.add("general.alignment", Value::U32(a)).unwrap();
            }
            let values = [
                ("k.u8", Value::U8(7)),
                ("k.i8", Value::I8(-7)),
                ("k.u16", Value::U16(700)),
                ("k.i16", Value::I16(-700)),
                ("k.u32", Value::U32(70000)),
                ("k.i32", Value::I32(-70000)),
                ("k.f32", Value::F32(1.5)),
                ("k.bool", Value::Bool(true)),
                ("k.u64", Value::U64(1 << 40)),
                ("k.i64", Value::I64(-(1 << 40))),
                ("k.f64", Value::F64(-2.25)),
                (
                    "k.strs",
                    Value::Array(Array::String(vec!["a".into(), "".into(), "ü".into()])),
                ),
                ("k.f32s", Value::Array(Array::F32(vec![1.0, -2.0]))),
                ("k.bools", Value::Array(Array::Bool(vec![false, true]))),
            ];
            for (k, v) in &values {
                w.add(k, v.clone()).unwrap();
            }
            let a: Vec<f32> = (0..15).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..8).map(|i| -(i as f32)).collect();
            w.add_f32("a.weight", &[5, 3], &a).unwrap();
            w.add_f32("b", &[8], &b).unwrap();
            w.add_tensor("h", &[3], GgmlType::F16, vec![0, 60, 0, 188, 0, 0])
                .unwrap();
            let bytes = w.to_bytes();
            let g = Gguf::parse(&bytes).unwrap();
            assert_eq!(g.version, VERSION);
            assert_eq!(g.alignment, u64::from(align.unwrap_or(32)));
            assert_eq!(g.architecture().unwrap(), "bitnet");
            for (k, v) in &values {
                assert_eq!(g.get(k), Some(v), "{k}");
            }
            let t = g.tensor("a.weight").unwrap();
            assert_eq!((t.ne.clone(), t.ty), (vec![5, 3], GgmlType::F32));
            assert_eq!(t.shape(), vec![3, 5]);
            let back: Vec<f32> = g
                .tensor_data(t, &bytes)
                .unwrap()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(back, a);
            let t = g.tensor("b").unwrap();
            assert_eq!(t.offset % g.alignment as usize, 0);
            assert_eq!(g.tensor_data(t, &bytes).unwrap().len(), 32);
            let t = g.tensor("h").unwrap();
            assert_eq!(
                super::super::to_f32(t, g.tensor_data(t, &bytes).unwrap()).unwrap(),
                vec![1.0, -1.0, 0.0]
            );
        }
    }

    #[test]
    fn refuses_what_llama_cpp_would() {
        let mut w = GgufWriter::new();
        w.add("x", Value::U32(1)).unwrap();
        assert!(matches!(w.add("x", Value::U32(2)), Err(GgufError::DuplicateKey(_))));
        assert!(w.add("general.alignment", Value::U32(24)).is_err());
        assert!(w.add("general.alignment", Value::U64(32)).is_err());
        assert!(w.add("n", Value::Array(Array::Array(vec![]))).is_err());
        w.add_f32("t", &[2], &[1.0, 2.0]).unwrap();
        assert!(matches!(
            w.add_f32("t", &[2], &[1.0, 2.0]),
            Err(GgufError::DuplicateTensor(_))
        ));
        assert!(matches!(
            w.add_f32(&"n".repeat(64), &[1], &[1.0]),
            Err(GgufError::BadTensorName { .. })
        ));
        assert!(matches!(
            w.add_f32("d", &[1, 1, 1, 1, 1], &[1.0]),
            Err(GgufError::TooManyDims { .. })
        ));
        assert!(matches!(
            w.add_f32("s", &[3], &[1.0, 2.0]),
            Err(GgufError::BadShape { .. })
        ));
        assert!(matches!(
            w.add_tensor("q", &[100], GgmlType::TQ2_0, vec![0; 66]),
            Err(GgufError::BadShape { .. })
        ));
        // The refusals left nothing behind.
        assert!(Gguf::parse(&w.to_bytes()).unwrap().tensors().len() == 1);
    }
}
