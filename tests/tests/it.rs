//! One integration-test binary (fast to link), one module per concern.
#![allow(clippy::unwrap_used)]
mod backward;
mod batch;
mod data;
mod fast;
mod gguf;
mod kernels;
mod load;
mod lora;
mod lora_gguf;
mod parity;
mod tiling;
