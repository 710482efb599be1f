// Prepended to every kernel (shaders/src/lib.rs): the per-submission values each dispatch reads at
// binding 1 (mirrors `gpu::kernels::Step`), and the workgroup-wide reductions the kernels share.
struct Step {
    t: u32,            // tokens in this chunk
    start: u32,        // position of the first token
    lm_t0: u32,        // first chunk row the lm_head reads
    lm_t: u32,         // rows the lm_head reads
    temperature: f32,  // 0: greedy
    top_k: u32,        // 0: off
    top_p: f32,        // 1: off
    penalty: f32,      // repetition penalty, 1: off
    u: f32,            // the seeded uniform draw
    feedback: u32,     // 1: decode step, the token is the one the previous sampler left in `sampled`
    slot: u32,         // KV cache slot of this chunk's sequence (continuous batching; 0 otherwise)
    seq: u32,          // rows per sequence of a training micro-batch (0: the chunk is one sequence)
}

// Scratch for wg_sum / wg_max. Kernels may also use it directly between reductions; every reduction
// starts by writing it and ends with a barrier.
var<workgroup> wg_f32: array<f32, 256>;

// Sum of `v` over a 256-thread workgroup, as a tree (the same order everywhere, so kernels that repeat a
// reduction get the same bits). Must be called in uniform control flow.
fn wg_sum(v: f32, lid: u32) -> f32 {
    wg_f32[lid] = v;
    workgroupBarrier();
    for (var off = 128u; off > 0u; off >>= 1u) {
        if lid < off {
            wg_f32[lid] += wg_f32[lid + off];
        }
        workgroupBarrier();
    }
    let r = wg_f32[0];
    workgroupBarrier();
    return r;
}

// Maximum of `v` over a 256-thread workgroup. Must be called in uniform control flow.
fn wg_max(v: f32, lid: u32) -> f32 {
    wg_f32[lid] = v;
    workgroupBarrier();
    for (var off = 128u; off > 0u; off >>= 1u) {
        if lid < off {
            wg_f32[lid] = max(wg_f32[lid], wg_f32[lid + off]);
        }
        workgroupBarrier();
    }
    let r = wg_f32[0];
    workgroupBarrier();
    return r;
}

// Where chunk row `t` sits in the KV cache. Inference: the chunk is one sequence, in slot step.slot from
// position step.start. A training micro-batch (step.seq > 0) packs sequences of step.seq rows each (padded
// to one length), sequence i in slot i from position 0: every per-row kernel then runs on the whole batch
// unchanged, and only RoPE and attention (which must not look across sequences) ask where a row belongs.
fn row_slot(t: u32) -> u32 {
    if step.seq == 0u {
        return step.slot;
    }
    return t / step.seq;
}

fn row_pos(t: u32) -> u32 {
    if step.seq == 0u {
        return step.start + t;
    }
    return t % step.seq;
}

// The logistic function, computed from exp(-|x|) so that no exp overflows (CPU twin: cpu::sigmoid); the
// gated SiLU FFN (MODE 3 of matmul_ternary, silu_mul.wgsl) uses it.
fn sigmoid(x: f32) -> f32 {
    let e = exp(-abs(x));
    return select(e / (1.0 + e), 1.0 / (1.0 + e), x >= 0.0);
}
