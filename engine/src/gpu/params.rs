//! The parameter block of each kernel family (binding 0), one struct per `struct Params` in `shaders/`,
//! named after the shader file and with the WGSL struct's fields in its order (padding included), so the
//! two read side by side. Every field is a 4-byte scalar, so the layouts agree by order alone; each WGSL
//! struct is a whole number of 16 bytes (uniform buffers are bound in 16-byte units), padded with `_a`, `_b`,
//! .. fields. A test (tests/tests/kernels.rs, `params_match_wgsl`) checks every size against naga's layout.
//! Launchers build them with `..Default::default()` for the padding.
use super::kernels::{MatrixTile, TernaryTile};

/// embedding.wgsl's `Params`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct EmbeddingParams {
    /// C, hidden size.
    pub c: u32,
    /// First vocabulary row held by this tile.
    pub row0: u32,
    /// Rows in this tile.
    pub rows: u32,
    pub _pad: u32,
}

/// rmsnorm_quant.wgsl's `Params` (`rmsnorm_quant`, `rmsnorm`, `rmsnorm_backward`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RmsnormQuantParams {
    /// Row length.
    pub c: u32,
    pub eps: f32,
    /// `rmsnorm_backward`: 1 adds onto dx, 0 assigns.
    pub acc: u32,
    pub _b: u32,
}

impl RmsnormQuantParams {
    pub fn new(c: usize, eps: f32, acc: bool) -> Self {
        RmsnormQuantParams {
            c: c as u32,
            eps,
            acc: acc as u32,
            ..Default::default()
        }
    }
}

/// matmul_ternary.wgsl's `Params` (`matmul_ternary`, `matmul_ternary_tiled`, `rmsnorm_matmul_ternary`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MatmulTernaryParams {
    /// I / 16.
    pub words: u32,
    /// Output rows in this tile.
    pub rows: u32,
    /// Column of y that tile row 0 writes.
    pub y_off: u32,
    /// Row length of y.
    pub y_stride: u32,
    /// `rmsnorm_matmul_ternary` only.
    pub eps: f32,
    pub _a: u32,
    pub _b: u32,
    pub _c: u32,
}

impl MatmulTernaryParams {
    /// One weight tile whose row 0 lands in column `y_off + tile.row0` of y.
    pub fn new(tile: &TernaryTile, y_off: usize, y_stride: usize, eps: f32) -> Self {
        MatmulTernaryParams {
            words: tile.words,
            rows: tile.rows,
            y_off: y_off as u32 + tile.row0,
            y_stride: y_stride as u32,
            eps,
            ..Default::default()
        }
    }
}

/// rope.wgsl's `Params` (`rope`, `rope_rows`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RopeParams {
    pub nh: u32,
    pub nkv: u32,
    pub hd: u32,
    /// Row length of qkv = (NH + 2 NKV) * HD.
    pub stride: u32,
    /// Positions the cache holds.
    pub cap: u32,
    pub _a: u32,
    pub _b: u32,
    pub _c: u32,
}

impl RopeParams {
    /// Heads of the fused qkv buffer and a cache of `cap` positions.
    pub fn new(nh: usize, nkv: usize, hd: usize, cap: usize) -> Self {
        RopeParams {
            nh: nh as u32,
            nkv: nkv as u32,
            hd: hd as u32,
            stride: ((nh + 2 * nkv) * hd) as u32,
            cap: cap as u32,
            ..Default::default()
        }
    }
}

/// attention.wgsl's `Params` (`attention`, `attention_rows`, `attention_split_rope`, `attention_merge`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttentionParams {
    pub nh: u32,
    pub nkv: u32,
    pub hd: u32,
    /// Row length of qkv.
    pub stride: u32,
    /// Positions the cache holds.
    pub cap: u32,
    /// HD^-0.5.
    pub scale: f32,
    pub _a: u32,
    pub _b: u32,
}

impl AttentionParams {
    /// Heads of the fused qkv buffer and a cache of `cap` positions.
    pub fn new(nh: usize, nkv: usize, hd: usize, cap: usize) -> Self {
        AttentionParams {
            nh: nh as u32,
            nkv: nkv as u32,
            hd: hd as u32,
            stride: ((nh + 2 * nkv) * hd) as u32,
            cap: cap as u32,
            scale: (hd as f32).powf(-0.5),
            ..Default::default()
        }
    }
}

/// lm_head.wgsl's `Params` (`lm_head`, `lm_head_tiled`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LmHeadParams {
    /// C.
    pub c: u32,
    /// Rows in this tile.
    pub rows: u32,
    /// First vocabulary row of this tile.
    pub row0: u32,
    /// V, row length of logits.
    pub v: u32,
}

impl LmHeadParams {
    pub fn new(c: usize, v: usize, tile: &MatrixTile) -> Self {
        LmHeadParams {
            c: c as u32,
            rows: tile.rows,
            row0: tile.row0,
            v: v as u32,
        }
    }
}

/// nll.wgsl's `Params` (`nll`, `nll_backward`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NllParams {
    pub v: u32,
    pub _a: u32,
    pub _b: u32,
    pub _c: u32,
}

/// sample.wgsl's `Params` (`sample_partial`, `sample`, and their `_rows` forms). Not `SampleParams`: that
/// is the sampler's settings (`cpu::SampleParams`), which reach the kernel through `Step` or [`RowParams`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SamplerParams {
    pub v: u32,
    pub _a: u32,
    pub _b: u32,
    pub _c: u32,
}

/// Settings of one row of `sample_rows` (sample.wgsl's `RowParams`, an array in a storage buffer): the
/// row's sequence samples with its own settings and draw, against its own repetition set (row `slot` of
/// `seen`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RowParams {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub penalty: f32,
    pub u: f32,
    /// The sequence's row of `seen`.
    pub slot: u32,
    pub _a: u32,
    pub _b: u32,
}

/// relu2_mul.wgsl's and silu_mul.wgsl's `Params` (`relu2_mul`, `silu_mul` and their backwards).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Relu2MulParams {
    pub f: u32,
    pub _a: u32,
    pub _b: u32,
    pub _c: u32,
}

/// matmul_ternary_backward.wgsl's `Params`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MatmulTernaryBackwardParams {
    /// u32 words per row (I / 16).
    pub words: u32,
    /// Rows in this tile.
    pub rows: u32,
    /// First column of dy this tile covers.
    pub row0: u32,
    /// Columns of dy.
    pub dy_stride: u32,
    /// 0: dx = ..., 1: dx += ... (tiles after the first).
    pub accumulate: u32,
    pub _a: u32,
    pub _b: u32,
    pub _c: u32,
}

/// lm_head_backward.wgsl's `Params`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LmHeadBackwardParams {
    /// C.
    pub c: u32,
    /// Rows in this tile.
    pub rows: u32,
    /// First vocabulary row of this tile.
    pub row0: u32,
    /// V, row length of dlogits.
    pub v: u32,
    /// 0: dx = ..., 1: dx += ...
    pub accumulate: u32,
    pub _a: u32,
    pub _b: u32,
    pub _c: u32,
}

/// rope_backward.wgsl's `Params`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RopeBackwardParams {
    /// Heads to rotate.
    pub nh: u32,
    /// head_dim.
    pub hd: u32,
    /// Columns per token of dx.
    pub stride: u32,
    /// First column of these heads.
    pub off: u32,
}

/// attention_backward.wgsl's `Params` (`attention_backward_dq`, `attention_backward_dkv`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttentionBackwardParams {
    pub nh: u32,
    pub nkv: u32,
    pub hd: u32,
    /// Positions the K/V buffers hold.
    pub p: u32,
    /// Columns per token of q.
    pub q_stride: u32,
    /// Columns per token of the gradient buffer dqkv.
    pub g_stride: u32,
    pub _a: u32,
    pub _b: u32,
}

/// lora.wgsl's `Params` (every LoRA entry point, forward and backward).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LoraParams {
    /// I.
    pub inp: u32,
    /// O.
    pub out: u32,
    /// R.
    pub rank: u32,
    /// alpha / r.
    pub scale: f32,
    /// Columns of x (and dx).
    pub x_stride: u32,
    /// Columns of y (and dy).
    pub y_stride: u32,
    /// First column of y / dy this projection covers.
    pub y_off: u32,
    pub _a: u32,
}

/// adamw.wgsl's `Params` (`adamw`; `grad_sq_sum` and `grad_clip` reuse its slots, see
/// `kernels::grad_clip_params`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamwParams {
    pub n: u32,
    /// 1 - lr * weight_decay.
    pub decay: f32,
    /// lr / (1 - b1^step).
    pub step_size: f32,
    /// sqrt(1 - b2^step).
    pub bc2_sqrt: f32,
    /// 1 - b1.
    pub w1: f32,
    pub b2: f32,
    /// 1 - b2.
    pub w2: f32,
    pub eps: f32,
    pub _a: u32,
    pub _b: u32,
    pub _c: u32,
    pub _d: u32,
}
