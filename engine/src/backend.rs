//! What a backend (CPU reference or wgpu) must do for inference and scoring. The drivers in `session.rs`
//! use only this trait, so both backends run exactly the same generation and scoring logic.
use crate::cpu::SampleParams;
use crate::error::Result;
use crate::rng::Rng;

/// What to compute after running a chunk of tokens through the layers.
pub enum Want<'a> {
    /// Only fill the KV cache (a prompt chunk before the last one).
    Nothing,
    /// Logits at every position of the chunk, [T, V] (parity tests; small models only).
    AllLogits,
    /// NLL of `targets[i]` given positions ..=i of the chunk; `targets.len() <= T`.
    Nll(&'a [u32]),
    /// Sample the token following the last position.
    Sample { params: SampleParams, u: f32 },
}

/// One row of a batch decode step (continuous batching, `crate::batch`): the token at `pos` of the sequence
/// in `slot`, and how to sample the one after it.
#[derive(Debug, Clone, Copy)]
pub struct SlotRow {
    pub slot: usize,
    pub pos: usize,
    pub token: u32,
    pub params: SampleParams,
    pub u: f32,
}

fn no_slots() -> crate::error::EngineError {
    crate::error::EngineError::Invalid("this backend does not batch sequences".into())
}

pub enum Got {
    Nothing,
    Logits(Vec<f32>),
    Nll(Vec<f32>),
    Token(u32),
}

pub trait Backend {
    /// Human-readable name of the device, e.g. "NVIDIA H100 (Vulkan, DiscreteGpu)" or "cpu reference".
    fn device_name(&self) -> String;
    /// Whether the kernels run their subgroup variants (`Gpu::subgroups`); false on the CPU reference.
    fn subgroups(&self) -> bool {
        false
    }
    /// Clears the KV cache and the repetition-penalty history and sizes the cache for `positions`.
    fn begin(&mut self, positions: usize) -> Result<()>;
    /// Marks tokens for the repetition penalty.
    fn mark_seen(&mut self, tokens: &[u32]) -> Result<()>;
    /// Runs `tokens` at positions `start..start+T` (the cache must hold 0..start) and computes `want`.
    fn forward(&mut self, tokens: &[u32], start: usize, want: Want<'_>) -> Result<Got>;
    /// Decode: `first` (already sampled, at position `pos`) is fed back, and up to `steps` more tokens are
    /// sampled one at a time with a fresh uniform draw from `rng` each; `on_token` sees each new token and
    /// returns false to stop. The GPU backend overrides this to keep two steps in flight.
    fn decode(
        &mut self,
        first: u32,
        pos: usize,
        steps: usize,
        params: &SampleParams,
        rng: &mut Rng,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<()> {
        let mut tok = first;
        for i in 0..steps {
            self.mark_seen(&[tok])?;
            match self.forward(
                &[tok],
                pos + i,
                Want::Sample {
                    params: *params,
                    u: rng.uniform(),
                },
            )? {
                Got::Token(t) => {
                    tok = t;
                    if !on_token(t) {
                        break;
                    }
                }
                _ => return Err(crate::error::EngineError::Invalid("backend returned no token".into())),
            }
        }
        Ok(())
    }
    /// GPU time of each kernel for one decode step at position `pos`, in microseconds, summed by kernel
    /// name with the number of dispatches, plus the CPU time to record the step. `None` where the backend
    /// cannot time kernels.
    fn profile_step(&mut self, _pos: usize) -> Result<Option<Profile>> {
        Ok(None)
    }
    /// Most tokens one `forward` call accepts (chunking keeps activations under the adapter's limits).
    fn max_chunk(&self) -> usize;

    // ---- continuous batching (`crate::batch`): independent sequences in KV cache slots ----

    /// Sizes caches for `slots` sequences of up to `positions` each (whatever they held is dropped) and
    /// returns the slots granted, which may be fewer (the rows one step can sample, binding limits).
    fn begin_slots(&mut self, _slots: usize, _positions: usize) -> Result<usize> {
        Err(no_slots())
    }
    /// Starts a sequence in `slot`: its repetition-penalty set becomes `seen` (the prompt).
    fn reset_slot(&mut self, _slot: usize, _seen: &[u32]) -> Result<()> {
        Err(no_slots())
    }
    /// Runs a prompt chunk of the sequence in `slot` at positions `start..` (at most `max_chunk` tokens);
    /// with `sample`, returns the token following the last (and adds it to the slot's set).
    fn forward_slot(
        &mut self,
        _slot: usize,
        _tokens: &[u32],
        _start: usize,
        _sample: Option<(SampleParams, f32)>,
    ) -> Result<Option<u32>> {
        Err(no_slots())
    }
    /// Queues one decode step over `rows`, each row a different slot; every pick joins its slot's set.
    /// `feedback`: each row's token is the one the step before picked for the row at the same index (the
    /// rows are the same sequences in the same order), so this step may be queued before that one is read.
    fn decode_rows_submit(&mut self, _rows: &[SlotRow], _feedback: bool) -> Result<()> {
        Err(no_slots())
    }
    /// The picks of the oldest queued step, one per row.
    fn decode_rows_wait(&mut self) -> Result<Vec<u32>> {
        Err(no_slots())
    }
    /// `profile_step` for a batch decode step over `rows` (nothing is queued; the caches get written).
    fn profile_rows(&mut self, _rows: &[SlotRow]) -> Result<Option<Profile>> {
        Ok(None)
    }
    /// Bytes of device memory the backend allocated (weights, cache, activations), and its high-water mark.
    fn memory(&self) -> MemoryReport;
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Profile {
    /// (kernel, dispatches, total GPU microseconds) for one decode step.
    pub kernels: Vec<(String, usize, f64)>,
    pub dispatches: usize,
    pub gpu_us: f64,
    /// CPU time to record and submit the step's dispatches (one pass, as decode does).
    pub record_us: f64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MemoryReport {
    pub ternary_weights: u64,
    pub embedding: u64,
    pub lm_head: u64,
    pub other_weights: u64,
    pub kv_cache: u64,
    pub activations: u64,
    pub total: u64,
    pub peak: u64,
}
