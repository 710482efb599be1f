//! GGUF files: a strict, bounded reader of the container and decoders of the weight types BitNet models
//! are shipped in (llama.cpp's TQ1_0/TQ2_0, bitnet.cpp's I2_S, floats, and the Q8_0/Q4_K/Q6_K that
//! `llama-quantize` writes for the embedding and output).
//!
//! The container follows llama.cpp's `gguf_init_from_file_impl`, which is stricter than the written spec
//! (contiguous tensors, names under 64 bytes): a file llama.cpp refuses is refused here too, so nothing
//! bitnode accepts is a file the rest of the ecosystem would not. The reader works on a byte slice so that
//! the caller can memory-map the file: tensor data is never copied until a decoder converts it.
//!
//! [`GgufWriter`] writes the container back (bitnode's LoRA adapters as llama.cpp LoRA GGUFs, `crate::lora`).
//!
//! `crate::model` maps a file's tensors onto the engine's layers (`Model::from_gguf`), `crate::config` reads
//! its hyperparameters and picks the FFN activation, and [`tokenizer`] rebuilds its tokenizer.
mod decode;
mod error;
mod reader;
pub mod tokenizer;
mod types;
mod writer;

pub use decode::{
    decodes_to_f32, float_to_ternary, i2s_to_ternary, rows_to_f32, to_f32, to_ternary, tq1_0_to_ternary,
    tq2_0_to_ternary, TernaryScale, TernaryTensor,
};
pub use error::{GgufError, Result};
pub use reader::{Array, Gguf, TensorInfo, Value, DEFAULT_ALIGNMENT, MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_NAME_LEN};
pub use types::{GgmlType, FTYPE_I2_S, I2S_BLOCK};
pub use writer::{GgufWriter, VERSION};

#[cfg(test)]
mod tests;
