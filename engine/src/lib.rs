//! bitnode's engine: BitNet b1.58 checkpoints on wgpu with hand-written ternary WGSL kernels, and a plain
//! CPU reference of every op that serves as test oracle and fallback backend.
pub mod backend;
pub mod batch;
pub mod config;
pub mod cpu;
pub mod data;
pub mod error;
pub mod fast;
pub mod finetune;
pub mod gguf;
pub mod gpu;
pub mod loader;
pub mod lora;
pub mod model;
pub mod model_export;
pub mod probe;
pub mod rng;
pub mod session;
pub mod synth;
pub mod ternary;
pub mod tokenizer;
pub mod train;
pub mod util;

pub use error::{EngineError, Result};
pub use session::{EmbedDtype, Engine, EngineOptions};
