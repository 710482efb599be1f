//! The CPU reference: one plain, readable function per op, in the shapes of llm.c (outputs first, then
//! inputs, then sizes). It is the oracle every WGSL kernel is tested against, and the fallback backend when
//! no GPU adapter exists. Each function shares its name with its kernel file in `shaders/` and its launcher
//! in `gpu::`.
pub mod act_quant;
pub mod adamw;
pub mod attention;
pub mod embedding;
pub mod forward;
pub mod lm_head;
pub mod lora;
pub mod matmul_ternary;
pub mod nll;
pub mod relu2_mul;
pub mod rmsnorm;
pub mod rope;
pub mod sample;
pub mod silu_mul;

pub use act_quant::act_quant;
pub use adamw::{adamw, clip_coef, clip_grad_norm, grad_clip, grad_norm, grad_sq_sum, AdamW};
pub use attention::{attention, attention_backward, attention_rows};
pub use embedding::embedding;
pub use lm_head::{lm_head, lm_head_backward};
pub use lora::{lora, lora_backward};
pub use matmul_ternary::{matmul_ternary, matmul_ternary_backward};
pub use nll::{nll, nll_backward};
pub use relu2_mul::{relu2_mul, relu2_mul_backward};
pub use rmsnorm::{rmsnorm, rmsnorm_backward, rmsnorm_quant};
pub use rope::{rope, rope_backward, rope_rows, rope_table};
pub use sample::{sample, sample_rows, SampleParams, SampleRow};
pub use silu_mul::{sigmoid, silu_mul, silu_mul_backward};

use crate::config::Activation;

/// The gated MLP's `out = act(g) * u` for the model's activation (`relu2_mul` or `silu_mul`).
pub fn gated_mul(act: Activation, out: &mut [f32], g: &[f32], u: &[f32]) {
    match act {
        Activation::Relu2 => relu2_mul(out, g, u),
        Activation::Silu => silu_mul(out, g, u),
    }
}

/// Backward of [`gated_mul`] (`relu2_mul_backward` or `silu_mul_backward`).
pub fn gated_mul_backward(act: Activation, dg: &mut [f32], du: &mut [f32], dout: &[f32], g: &[f32], u: &[f32]) {
    match act {
        Activation::Relu2 => relu2_mul_backward(dg, du, dout, g, u),
        Activation::Silu => silu_mul_backward(dg, du, dout, g, u),
    }
}
