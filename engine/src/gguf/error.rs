//! What the GGUF reader and decoders refuse, each with the key or tensor at fault: a user holding a corrupt
//! or unsupported file can only act on a message that says where the problem is.

/// A GGUF file the reader or a decoder refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GgufError {
    #[error("truncated GGUF: {what} needs {need} bytes at offset {at}, but the file has {len}")]
    Truncated { what: String, at: u64, need: u64, len: u64 },
    #[error("not a GGUF file: magic is {0:02x?}, expected \"GGUF\"")]
    BadMagic([u8; 4]),
    #[error("big-endian GGUF files are not supported (only little-endian ones, which llama.cpp writes)")]
    BigEndian,
    #[error("GGUF version {0} is not supported (versions 2 and 3 are)")]
    UnsupportedVersion(u32),
    /// A count read from the file that the bytes left could not hold even at the smallest encoding per
    /// item; refused before anything is allocated for it.
    #[error("{what} = {count} cannot fit: each takes at least {min_each} bytes and {remaining} remain in the file")]
    CountTooLarge {
        what: String,
        count: u64,
        min_each: u64,
        remaining: u64,
    },
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 { what: String },
    #[error("duplicate metadata key {0:?}")]
    DuplicateKey(String),
    #[error("metadata key {key:?}: unknown value type {ty}")]
    UnknownValueType { key: String, ty: u32 },
    #[error("metadata key {key:?}: arrays nested deeper than {max}")]
    NestedTooDeep { key: String, max: usize },
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    KeyType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("metadata key {key:?}: {msg}")]
    BadValue { key: String, msg: String },
    #[error("tensor #{index}: {msg}")]
    BadTensorName { index: u64, msg: String },
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    #[error("tensor {tensor:?}: {n_dims} dimensions, at most {max} are allowed")]
    TooManyDims { tensor: String, n_dims: u32, max: u32 },
    #[error("tensor {tensor:?}: dimension {dim} is negative ({value})")]
    NegativeDim { tensor: String, dim: usize, value: i64 },
    #[error("tensor {tensor:?}: dimensions {dims:?} overflow (element count or byte size)")]
    DimsOverflow { tensor: String, dims: Vec<i64> },
    #[error("tensor {tensor:?}: unknown tensor type {ty}")]
    UnknownType { tensor: String, ty: u32 },
    #[error("tensor {tensor:?}: type {ty} is not supported: {reason}")]
    UnsupportedType {
        tensor: String,
        ty: String,
        reason: &'static str,
    },
    #[error("tensor {tensor:?}: {msg}")]
    BadShape { tensor: String, msg: String },
    #[error("tensor {tensor:?}: data offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error("tensor {tensor:?}: data [{start}, {end}) lies past the end of the file ({len} bytes)")]
    OutOfBounds {
        tensor: String,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error(
        "tensor {tensor:?}: data offset {offset} overlaps or leaves a gap: tensors are contiguous in info order, \
         padded to the alignment, so it must be {expected}"
    )]
    NotContiguous { tensor: String, offset: u64, expected: u64 },
    /// A decoder was asked for a type it does not produce that output from.
    #[error("tensor {tensor:?}: type {ty} cannot be decoded as {wanted}")]
    WrongDecoder {
        tensor: String,
        ty: String,
        wanted: &'static str,
    },
    /// The data of a well-formed tensor is not what its type allows (an unused code, a non-finite scale) or,
    /// for a projection stored as floats, not ternary times one scale.
    #[error("tensor {tensor:?}: {msg}")]
    BadData { tensor: String, msg: String },
    #[error("the byte slice given has {got} bytes, but the GGUF was parsed from one of {expected}")]
    WrongFile { got: usize, expected: usize },
}

pub type Result<T> = std::result::Result<T, GgufError>;
