//! One error type for everything the engine can refuse. Every message names the file or tensor at fault,
//! because the user's only recourse is to fix that input.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid model config: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("unsupported model_type {0:?}: bitnode runs only \"bitnet\" checkpoints")]
    UnknownModelType(String),
    #[error("{path}: corrupt or truncated safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    /// A GGUF file the strict reader or a decoder refuses, with the file it came from: the reader's
    /// message names the key or tensor at fault, the path says which file the user should fix or replace.
    /// (Not a `#[source]`: the message already holds it, and error chains would print it twice.)
    #[error("{path}: {error}")]
    Gguf {
        path: PathBuf,
        error: crate::gguf::GgufError,
    },
    #[error("tensor {name}: {msg}")]
    Tensor { name: String, msg: String },
    #[error("missing tensor {0} (checked every shard)")]
    MissingTensor(String),
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("prompt is {tokens} tokens but the model's context is {context} (with {reserve} reserved for generation)")]
    PromptTooLong {
        tokens: usize,
        context: usize,
        reserve: usize,
    },
    #[error("no usable GPU adapter: {0}")]
    NoAdapter(String),
    #[error("GPU error: {0}")]
    Gpu(String),
    #[error("{0}")]
    Invalid(String),
    /// The memory planner's verdict (before anything is allocated), or the device's own out-of-memory.
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;

impl EngineError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }
    pub fn gguf(path: impl Into<PathBuf>, source: crate::gguf::GgufError) -> Self {
        EngineError::Gguf {
            path: path.into(),
            error: source,
        }
    }
    pub fn tensor(name: &str, msg: impl Into<String>) -> Self {
        EngineError::Tensor {
            name: name.to_string(),
            msg: msg.into(),
        }
    }
}
