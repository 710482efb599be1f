//! The WGSL kernels of bitnode, one file per op family. Each kernel has a CPU twin of the same name in
//! `bitnode_engine::cpu` and a launcher of the same name in `bitnode_engine::gpu`. WGSL has no includes,
//! so `common.wgsl` (the shared `Step` struct) is prepended to each at compile time.
//!
//! The two kernels with a subgroup path, `rmsnorm_quant.wgsl` and `matmul_ternary.wgsl` (its fused
//! `rmsnorm_matmul_ternary`), also get their reductions prepended: `reduce.wgsl` (workgroup barriers)
//! in the plain source, `reduce_subgroup.wgsl` (the same functions with subgroup operations) in the
//! `*_SUBGROUP` source, which a launcher picks only when the device has wgpu's SUBGROUP feature, so adapters
//! without it never compile subgroup code. (naga takes subgroup builtins without an `enable subgroups;`
//! directive, and rejects that directive as unimplemented.)
//!
//! The three f32 GEMMs (`matmul_ternary_backward`, `lm_head.wgsl`'s `lm_head_tiled`, `lm_head_backward`)
//! share one register-tiled body, `gemm_tile.wgsl`, prepended after `common.wgsl`: each kernel defines the
//! operand loads and the store it calls (see that file). The two head kernels also get `head_matrix.wgsl`,
//! their reads of the head matrix as f16 pairs or f32.
pub const EMBEDDING: &str = concat!(include_str!("../common.wgsl"), include_str!("../embedding.wgsl"));
pub const RMSNORM_QUANT: &str = concat!(
    include_str!("../common.wgsl"),
    include_str!("../reduce.wgsl"),
    include_str!("../rmsnorm_quant.wgsl")
);
pub const RMSNORM_QUANT_SUBGROUP: &str = concat!(
    include_str!("../common.wgsl"),
    include_str!("../reduce_subgroup.wgsl"),
    include_str!("../rmsnorm_quant.wgsl")
);
pub const MATMUL_TERNARY: &str = concat!(
    include_str!("../common.wgsl"),
    include_str!("../reduce.wgsl"),
    include_str!("../matmul_ternary.wgsl")
);
pub const MATMUL_TERNARY_SUBGROUP: &str = concat!(
    include_str!("../common.wgsl"),
    include_str!("../reduce_subgroup.wgsl"),
    include_str!("../matmul_ternary.wgsl")
);
pub const ROPE: &str = concat!(include_str!("../common.wgsl"), include_str!("../rope.wgsl"));
pub const ATTENTION: &str = concat!(
    include_str!("../common.wgsl"),
    include_str!("../reduce.wgsl"),
    include_str!("../attention.wgsl")
);
pub const ATTENTION_SUBGROUP: &str = concat!(
    include_str!("../common.wgsl"),
    include_str!("../reduce_subgroup.wgsl"),
    include_str!("../attention.wgsl")
);
pub const LM_HEAD: &str = concat!(
    include_str!("../common.wgsl"),
    include_str!("../gemm_tile.wgsl"),
    include_str!("../head_matrix.wgsl"),
    include_str!("../lm_head.wgsl")
);
pub const NLL: &str = concat!(include_str!("../common.wgsl"), include_str!("../nll.wgsl"));
pub const SAMPLE: &str = concat!(include_str!("../common.wgsl"), include_str!("../sample.wgsl"));
// Training (Engine II): backward passes, the LoRA branch and the optimizer.
pub const RELU2_MUL: &str = concat!(include_str!("../common.wgsl"), include_str!("../relu2_mul.wgsl"));
pub const SILU_MUL: &str = concat!(include_str!("../common.wgsl"), include_str!("../silu_mul.wgsl"));
pub const MATMUL_TERNARY_BACKWARD: &str = concat!(
    include_str!("../common.wgsl"),
    include_str!("../gemm_tile.wgsl"),
    include_str!("../matmul_ternary_backward.wgsl")
);
pub const LM_HEAD_BACKWARD: &str = concat!(
    include_str!("../common.wgsl"),
    include_str!("../gemm_tile.wgsl"),
    include_str!("../head_matrix.wgsl"),
    include_str!("../lm_head_backward.wgsl")
);
pub const ROPE_BACKWARD: &str = concat!(include_str!("../common.wgsl"), include_str!("../rope_backward.wgsl"));
pub const ATTENTION_BACKWARD: &str = concat!(
    include_str!("../common.wgsl"),
    include_str!("../attention_backward.wgsl")
);
pub const LORA: &str = concat!(include_str!("../common.wgsl"), include_str!("../lora.wgsl"));
pub const ADAMW: &str = concat!(include_str!("../common.wgsl"), include_str!("../adamw.wgsl"));

/// Every kernel, by name (for validation tests and the pipeline cache).
pub const ALL: &[(&str, &str)] = &[
    ("embedding", EMBEDDING),
    ("rmsnorm_quant", RMSNORM_QUANT),
    ("matmul_ternary", MATMUL_TERNARY),
    ("rope", ROPE),
    ("attention", ATTENTION),
    ("lm_head", LM_HEAD),
    ("nll", NLL),
    ("sample", SAMPLE),
    ("relu2_mul", RELU2_MUL),
    ("silu_mul", SILU_MUL),
    ("matmul_ternary_backward", MATMUL_TERNARY_BACKWARD),
    ("lm_head_backward", LM_HEAD_BACKWARD),
    ("rope_backward", ROPE_BACKWARD),
    ("attention_backward", ATTENTION_BACKWARD),
    ("lora", LORA),
    ("adamw", ADAMW),
];

/// The subgroup variants, by name; they compile only on a device with wgpu's SUBGROUP feature.
pub const ALL_SUBGROUP: &[(&str, &str)] = &[
    ("rmsnorm_quant", RMSNORM_QUANT_SUBGROUP),
    ("matmul_ternary", MATMUL_TERNARY_SUBGROUP),
    ("attention", ATTENTION_SUBGROUP),
];
