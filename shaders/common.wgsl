// Prepended to every kernel (shaders/src/lib.rs): the per-submission values each dispatch reads at
// binding 1. Mirrors `gpu::kernels::Step`.
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
    _p1: u32,
    _p2: u32,
}

