//! The model forward pass on wgpu. All weights are uploaded once (ternary projections packed at 2 bits,
//! embedding / lm_head in f16 or f32 row tiles); activations live in buffers sized for one chunk of tokens
//! so that no buffer exceeds the adapter's binding limit; the KV cache is sized per request. A chunk is one
//! compute pass of about 10 dispatches per layer with bind groups built in advance.
use super::kernels::{self, MatrixTile, Op, Step, TernaryTile};
use super::Gpu;
use crate::backend::{Backend, Got, MemoryReport, Want};
use crate::error::{EngineError, Result};
use crate::model::Model;
use crate::session::{EmbedDtype, EngineOptions};
use std::sync::Arc;

struct LayerBufs {
    input_layernorm: wgpu::Buffer,
    post_attention_layernorm: wgpu::Buffer,
    attn_sub_norm: wgpu::Buffer,
    ffn_sub_norm: wgpu::Buffer,
    qkv: Vec<TernaryTile>,
    o: Vec<TernaryTile>,
    gate_up: Vec<TernaryTile>,
    down: Vec<TernaryTile>,
}

struct Acts {
    step: wgpu::Buffer,
    tokens: wgpu::Buffer,
    x: wgpu::Buffer,
    xq: wgpu::Buffer,
    xs: wgpu::Buffer,
    qsum: wgpu::Buffer,
    qkv: wgpu::Buffer,
    att: wgpu::Buffer,
    h: wgpu::Buffer,
    xf: wgpu::Buffer,
    logits: wgpu::Buffer,
    targets: wgpu::Buffer,
    nll: wgpu::Buffer,
    seen: wgpu::Buffer,
    sampled: wgpu::Buffer,
    sample_partial: wgpu::Buffer,
    staging: wgpu::Buffer,
    /// Two 4-byte readback slots: decode keeps two steps in flight.
    ring: [wgpu::Buffer; 2],
    bytes: u64,
}

struct Ops {
    body: Vec<Op>,
    /// `body` with the register-tiled projections, for prompt chunks of at least `tiled_min_tokens()`.
    body_tiled: Option<Vec<Op>>,
    /// The layers for one decode token, with the norms fused into the projections (None when an input is
    /// wider than the fused kernel holds).
    decode_body: Option<Vec<Op>>,
    final_norm: Op,
    lm: Vec<Op>,
    nll: Op,
    sample: [Op; 2],
}

/// Prompt chunks of at least `BITNODE_TILED_MIN` tokens run the register-tiled projections
/// (`matmul_ternary_tiled`); by default none do. Measured on an H200 (BENCHMARKS.md), prompts ran faster
/// on `matmul_ternary` (16 tokens per workgroup) at every length: 7,348 against 6,041 tok/s at 512 and
/// 6,194 against 5,263 at 1,024 with 64-token blocks (5,706 with 128): a chunk of at most 512 tokens does
/// not give the tiled kernel enough blocks, while training's batches of thousands of rows do.
fn tiled_min_tokens() -> u32 {
    std::env::var("BITNODE_TILED_MIN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX)
}

/// Tokens per workgroup of the tiled prompt projections: 64 (chunks of at most 512 tokens give too few
/// 128-token blocks to fill a large GPU), or `BITNODE_TILED_TM=128` (a tuning knob).
fn tiled_tokens() -> u32 {
    match std::env::var("BITNODE_TILED_TM").ok().as_deref() {
        Some("128") => 128,
        _ => 64,
    }
}

impl Ops {
    /// The prompt body for a chunk of `t` tokens.
    fn prompt_body(&self, t: u32) -> &[Op] {
        match &self.body_tiled {
            Some(b) if t >= tiled_min_tokens() => b,
            _ => &self.body,
        }
    }

    /// Every dispatch of one decode step, in order.
    fn decode_step(&self) -> impl Iterator<Item = &Op> {
        self.decode_body
            .as_ref()
            .unwrap_or(&self.body)
            .iter()
            .chain(std::iter::once(&self.final_norm))
            .chain(self.lm.iter())
            .chain(self.sample.iter())
    }
}

pub struct GpuBackend {
    gpu: Arc<Gpu>,
    model: Arc<Model>,
    f16: bool,
    embed: Vec<MatrixTile>,
    head: Option<Vec<MatrixTile>>,
    norm: wgpu::Buffer,
    layers: Vec<LayerBufs>,
    acts: Acts,
    tmax: usize,
    lmax: usize,
    cap: usize,
    kv: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    /// Partial results of the split decode attention (None when they would exceed the binding limit).
    attn_part: Option<wgpu::Buffer>,
    rope: Option<(wgpu::Buffer, wgpu::Buffer)>,
    ops: Option<Ops>,
    seen: Vec<u32>,
    weight_bytes: (u64, u64, u64, u64),
    kv_bytes: u64,
    /// A LoRA adapter applied at runtime (`--adapter`).
    lora: Option<LoraOnDevice>,
    /// Continuous batching's caches and ops (`begin_slots`).
    slots: Option<SlotState>,
}

/// The KV cache slots of continuous batching (`crate::batch`) and the ops that run on them. The caches are
/// [slots, NKV, P, HD] per layer. A prompt chunk of one sequence runs the ordinary body with `Step::slot`
/// naming its slot, and so does a decode step of one sequence (the fused decode layers); a decode step of
/// several runs `rows_body`, whose rope and attention take each row's own (slot, position) from `rows`.
/// Every step samples with `sample_rows`, each row with its own settings from `rowp` and its own
/// repetition set (row `slot` of `seen`).
struct SlotState {
    n: usize,
    cap: usize,
    rows: wgpu::Buffer,
    rowp: wgpu::Buffer,
    seen: wgpu::Buffer,
    ops: Ops,
    rows_body: Vec<Op>,
    sample: [Op; 2],
    /// Readback slots for two steps in flight, one pick per row each.
    ring: [wgpu::Buffer; 2],
    inflight: std::collections::VecDeque<(wgpu::SubmissionIndex, usize, usize)>,
    next_ring: usize,
    /// Buffers to give back to the allocation count when the state is replaced.
    bytes: u64,
}

/// What `build_ops` needs of a cache besides its buffers.
#[derive(Clone, Copy)]
struct CacheBufs<'a> {
    cos: &'a wgpu::Buffer,
    sin: &'a wgpu::Buffer,
    /// The split decode attention's partials (None: over the binding limit; plain attention instead).
    part: Option<&'a wgpu::Buffer>,
    cap: usize,
    rows: Option<&'a wgpu::Buffer>,
}

/// A [R, I], B [O, R], I, O of one adapted projection.
type LoraPairOnDevice = (wgpu::Buffer, wgpu::Buffer, usize, usize);

/// A LoRA adapter on the device for inference: `y += (alpha/r) B A norm(x)` after each adapted projection,
/// with the training kernels (`lora_a`, `lora_b`) on the projection's normalised f32 input, as PEFT
/// computes it. With an adapter the decode step runs the unfused layer (the fused kernels normalise
/// inside the projection and keep no f32 input for the branch), and gate/up run as two projections when
/// either is adapted (the fused relu² epilogue leaves no place for the branch).
struct LoraOnDevice {
    rank: usize,
    scale: f32,
    /// `[layer][target]`.
    w: Vec<Vec<Option<LoraPairOnDevice>>>,
    /// Separate gate and up tiles per layer (empty when neither is adapted).
    gate: Vec<Vec<TernaryTile>>,
    up: Vec<Vec<TernaryTile>>,
    /// The normalised input of the current projection [tmax, widest], A x [tmax, R], gate and up outputs.
    ln: wgpu::Buffer,
    lh: wgpu::Buffer,
    g: wgpu::Buffer,
    u: wgpu::Buffer,
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

impl GpuBackend {
    pub fn new(model: Arc<Model>, adapter: wgpu::Adapter, opts: &EngineOptions) -> Result<Self> {
        let gpu = Arc::new(Gpu::new(adapter, opts.max_binding)?);
        Self::with_gpu(model, gpu, opts.embed_dtype)
    }

    pub fn with_gpu(model: Arc<Model>, gpu: Arc<Gpu>, embed: EmbedDtype) -> Result<Self> {
        let f16 = match embed {
            EmbedDtype::Auto => gpu.shader_f16,
            EmbedDtype::F16 => true,
            EmbedDtype::F32 => false,
        };
        let cfg = &model.config;
        let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let embed_tiles = kernels::matrix_tiles(&gpu, &model.embed, f16)?;
        let head = match &model.lm_head {
            Some(h) => Some(kernels::matrix_tiles(&gpu, h, f16)?),
            None => None,
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        let mut tern = 0u64;
        let mut other = 0u64;
        // Layer by layer: each is converted (a few ahead, on other threads) and dropped once uploaded.
        model.stream_layers(|_, l| {
            let qkv = kernels::ternary_tiles(&gpu, &[&l.q_proj, &l.k_proj, &l.v_proj], false)?;
            let o = kernels::ternary_tiles(&gpu, &[&l.o_proj], false)?;
            let gate_up = kernels::ternary_tiles(&gpu, &[&l.gate_proj, &l.up_proj], true)?;
            let down = kernels::ternary_tiles(&gpu, &[&l.down_proj], false)?;
            tern += [&qkv, &o, &gate_up, &down]
                .iter()
                .flat_map(|t| t.iter())
                .map(|t| t.bytes)
                .sum::<u64>();
            other += 4 * (2 * c + qd + f) as u64;
            layers.push(LayerBufs {
                input_layernorm: gpu.storage_init("input_layernorm", f32_bytes(&l.input_layernorm))?,
                post_attention_layernorm: gpu
                    .storage_init("post_attention_layernorm", f32_bytes(&l.post_attention_layernorm))?,
                attn_sub_norm: gpu.storage_init("attn_sub_norm", f32_bytes(&l.attn_sub_norm))?,
                ffn_sub_norm: gpu.storage_init("ffn_sub_norm", f32_bytes(&l.ffn_sub_norm))?,
                qkv,
                o,
                gate_up,
                down,
            });
            Ok(())
        })?;
        let norm = gpu.storage_init("norm", f32_bytes(&model.norm))?;
        // The last weights' copies finish here, inside the load, not in the first forward.
        gpu.flush_uploads()?;
        let ebytes: u64 = embed_tiles.iter().map(|t| t.buf.size()).sum();
        let hbytes: u64 = head.as_ref().map_or(0, |h| h.iter().map(|t| t.buf.size()).sum());

        // Chunk size: the widest activation row times T must fit one binding.
        let widest = (c.max(f).max(qd + 2 * kvd) * 4) as u64;
        let tmax = ((gpu.max_binding / widest) as usize).clamp(1, 512);
        if (v * 4) as u64 > gpu.max_binding {
            return Err(EngineError::Gpu(format!(
                "one row of logits ({} bytes) exceeds the binding limit {}",
                v * 4,
                gpu.max_binding
            )));
        }
        // Logit rows computed per lm_head pass. Decode needs one; scoring and parity tests loop over passes of
        // 32, which keeps the logits buffer (and its staging copy) at 16 MiB for a 128k vocabulary.
        let lmax = ((gpu.max_binding / (v * 4) as u64) as usize).clamp(1, tmax.min(32));
        let before = gpu.allocated();
        let s = |label: &str, bytes: usize| gpu.storage(label, bytes as u64);
        let acts = Acts {
            step: gpu.uniform("step", bytemuck::bytes_of(&Step::default())),
            tokens: s("tokens", tmax * 4)?,
            x: s("x", tmax * c * 4)?,
            xq: s("xq", tmax * c.max(f).max(qd))?,
            xs: s("xs", tmax * 4)?,
            qsum: s("qsum", tmax * 4)?,
            qkv: s("qkv", tmax * (qd + 2 * kvd) * 4)?,
            att: s("att", tmax * qd * 4)?,
            h: s("h", tmax * f * 4)?,
            xf: s("xf", tmax * c * 4)?,
            logits: s("logits", lmax * v * 4)?,
            targets: s("targets", tmax * 4)?,
            nll: s("nll", tmax * 4)?,
            seen: s("seen", v.div_ceil(32) * 4)?,
            // One pick per logits row: a batch step samples every row (`sample_rows`).
            sampled: s("sampled", lmax * 4)?,
            sample_partial: gpu.storage("sample_partial", kernels::sample_partial_bytes(v))?,
            staging: gpu.readback_buffer(((lmax * v * 4).max(tmax * 4).max(16)) as u64),
            ring: [gpu.readback_buffer(16), gpu.readback_buffer(16)],
            bytes: 0,
        };
        let acts = Acts {
            bytes: gpu.allocated() - before,
            ..acts
        };
        tracing::info!(
            device = %gpu.name(), embed_f16 = f16, ternary_mib = tern >> 20, embed_mib = ebytes >> 20,
            lm_head_mib = hbytes >> 20, embed_tiles = embed_tiles.len(), chunk = tmax, "model on device"
        );
        Ok(GpuBackend {
            gpu,
            f16,
            embed: embed_tiles,
            head,
            norm,
            layers,
            acts,
            tmax,
            lmax,
            cap: 0,
            kv: vec![],
            attn_part: None,
            rope: None,
            ops: None,
            seen: vec![0; v.div_ceil(32)],
            weight_bytes: (tern, ebytes, hbytes, other + 4 * c as u64),
            kv_bytes: 0,
            model,
            lora: None,
            slots: None,
        })
    }

    /// Applies a LoRA adapter at runtime (see [`LoraOnDevice`]).
    pub fn with_lora(mut self, adapter: &crate::lora::Adapter) -> Result<Self> {
        let g = self.gpu.clone();
        let cfg = &self.model.config;
        let (c, f, qd) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim);
        let before = g.allocated();
        let mut w = vec![];
        for row in &adapter.layers {
            let mut r = vec![];
            for p in row {
                r.push(match p {
                    Some(p) => Some((
                        g.storage_init("lora_a", f32_bytes(&p.a))?,
                        g.storage_init("lora_b", f32_bytes(&p.b))?,
                        p.inp,
                        p.out,
                    )),
                    None => None,
                });
            }
            w.push(r);
        }
        // Targets 4 and 5 are gate_proj and up_proj (lora::TARGETS order).
        let split = w.iter().any(|r| r[4].is_some() || r[5].is_some());
        let (mut gate, mut up) = (vec![], vec![]);
        if split {
            // The host layers were dropped after upload (unless the CPU side kept them): convert again.
            let model = self.model.clone();
            let dev = &mut self.layers;
            model.stream_layers(|li, l| {
                gate.push(kernels::ternary_tiles(&g, &[&l.gate_proj], false)?);
                up.push(kernels::ternary_tiles(&g, &[&l.up_proj], false)?);
                if let Some(lb) = dev.get_mut(li) {
                    for t in lb.gate_up.drain(..) {
                        g.release(t.w.size() + t.scales.size());
                    }
                }
                Ok(())
            })?;
        }
        let t = self.tmax;
        let widest = c.max(f).max(qd);
        let lora = LoraOnDevice {
            rank: adapter.rank,
            scale: adapter.scale(),
            w,
            gate,
            up,
            ln: g.storage("lora_in", (4 * t * widest) as u64)?,
            lh: g.storage("lora_h", (4 * t * adapter.rank.max(1)) as u64)?,
            g: g.storage("gate", if split { (4 * t * f) as u64 } else { 16 })?,
            u: g.storage("up", if split { (4 * t * f) as u64 } else { 16 })?,
        };
        g.flush_uploads()?;
        self.weight_bytes.3 += g.allocated().saturating_sub(before);
        self.lora = Some(lora);
        self.ops = None;
        self.cap = 0;
        self.slots = None;
        Ok(self)
    }

    pub fn embed_f16(&self) -> bool {
        self.f16
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Every op of the model over the caches `kv` of `cap` positions per sequence. With `rows`, rope and
    /// attention take each row's (slot, position) from it (a batch decode step), in the unfused body and
    /// in the fused decode body alike.
    fn build_ops(&self, kv: &[(wgpu::Buffer, wgpu::Buffer)], cache: CacheBufs<'_>) -> Result<Ops> {
        let CacheBufs {
            cos,
            sin,
            part,
            cap,
            rows,
        } = cache;
        let g = &self.gpu;
        let a = &self.acts;
        let cfg = &self.model.config;
        let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let eps = cfg.rms_norm_eps as f32;
        // The fused gate/up projection's MODE: it applies the model's FFN activation.
        let gm = kernels::gated_mode(cfg.activation);
        // The prompt body, with the projections as `matmul_ternary` (each weight word serves 16 tokens
        // per workgroup: prompt chunks and batch steps) or, where asked for, as the register-tiled GEMM
        // (see `tiled_min_tokens`).
        let make_body = |tiled: bool| -> Vec<Op> {
            let tm = tiled_tokens();
            #[allow(clippy::too_many_arguments)]
            let mt = |g: &Gpu,
                      t: &TernaryTile,
                      mode: u32,
                      y_off: usize,
                      y_stride: usize,
                      q: &wgpu::Buffer,
                      s: &wgpu::Buffer,
                      qsum: &wgpu::Buffer,
                      y: &wgpu::Buffer,
                      step: &wgpu::Buffer| {
                if tiled {
                    kernels::matmul_ternary_tiled(g, t, mode, y_off, y_stride, q, s, qsum, y, step, tm)
                } else {
                    kernels::matmul_ternary(g, t, mode, y_off, y_stride, q, s, qsum, y, step)
                }
            };
            let mut body = vec![];
            let mut body_layer = 0usize;
            for t in &self.embed {
                body.push(kernels::embedding(
                    g, self.f16, c, t, &a.tokens, &a.sampled, &a.x, &a.step,
                ));
            }
            for (l, (kc, vc)) in self.layers.iter().zip(kv) {
                body.push(kernels::rmsnorm_quant(
                    g,
                    c,
                    eps,
                    &l.input_layernorm,
                    &a.x,
                    &a.xq,
                    &a.xs,
                    &a.qsum,
                    &a.step,
                ));
                for t in &l.qkv {
                    body.push(mt(g, t, 0, 0, qd + 2 * kvd, &a.xq, &a.xs, &a.qsum, &a.qkv, &a.step));
                }
                let li = body_layer;
                if let Some(lo) = &self.lora {
                    let w = qd + 2 * kvd;
                    let mut normed = false;
                    for (ti, off) in [(0usize, 0usize), (1, qd), (2, qd + kvd)] {
                        if let Some(o) = lora_ops(g, lo, li, ti, c, w, off, &a.qkv, &a.step) {
                            if !normed {
                                body.push(kernels::rmsnorm(g, c, eps, &l.input_layernorm, &a.x, &lo.ln, &a.step));
                                normed = true;
                            }
                            body.extend(o);
                        }
                    }
                }
                match rows {
                    Some(r) => {
                        body.push(kernels::rope_rows(
                            g, nh, nkv, hd, cap, cos, sin, &a.qkv, kc, vc, r, &a.step,
                        ));
                        body.push(kernels::attention_rows(
                            g, nh, nkv, hd, cap, &a.qkv, kc, vc, &a.att, r, &a.step,
                        ));
                    }
                    None => {
                        body.push(kernels::rope(g, nh, nkv, hd, cap, cos, sin, &a.qkv, kc, vc, &a.step));
                        body.push(kernels::attention(g, nh, nkv, hd, cap, &a.qkv, kc, vc, &a.att, &a.step));
                    }
                }
                body.push(kernels::rmsnorm_quant(
                    g,
                    qd,
                    eps,
                    &l.attn_sub_norm,
                    &a.att,
                    &a.xq,
                    &a.xs,
                    &a.qsum,
                    &a.step,
                ));
                for t in &l.o {
                    body.push(mt(g, t, 1, 0, c, &a.xq, &a.xs, &a.qsum, &a.x, &a.step));
                }
                if let Some(lo) = &self.lora {
                    if let Some(o) = lora_ops(g, lo, li, 3, qd, c, 0, &a.x, &a.step) {
                        body.push(kernels::rmsnorm(g, qd, eps, &l.attn_sub_norm, &a.att, &lo.ln, &a.step));
                        body.extend(o);
                    }
                }
                body.push(kernels::rmsnorm_quant(
                    g,
                    c,
                    eps,
                    &l.post_attention_layernorm,
                    &a.x,
                    &a.xq,
                    &a.xs,
                    &a.qsum,
                    &a.step,
                ));
                for t in &l.gate_up {
                    body.push(mt(g, t, gm, 0, f, &a.xq, &a.xs, &a.qsum, &a.h, &a.step));
                }
                if let Some(lo) = self.lora.as_ref().filter(|lo| !lo.gate.is_empty()) {
                    // gate and up as two projections, each with its branch, then act(gate) * up.
                    for t in &lo.gate[li] {
                        body.push(mt(g, t, 0, 0, f, &a.xq, &a.xs, &a.qsum, &lo.g, &a.step));
                    }
                    for t in &lo.up[li] {
                        body.push(mt(g, t, 0, 0, f, &a.xq, &a.xs, &a.qsum, &lo.u, &a.step));
                    }
                    body.push(kernels::rmsnorm(
                        g,
                        c,
                        eps,
                        &l.post_attention_layernorm,
                        &a.x,
                        &lo.ln,
                        &a.step,
                    ));
                    body.extend(lora_ops(g, lo, li, 4, c, f, 0, &lo.g, &a.step).into_iter().flatten());
                    body.extend(lora_ops(g, lo, li, 5, c, f, 0, &lo.u, &a.step).into_iter().flatten());
                    body.push(kernels::gated_mul(g, cfg.activation, f, &lo.g, &lo.u, &a.h, &a.step));
                }
                body.push(kernels::rmsnorm_quant(
                    g,
                    f,
                    eps,
                    &l.ffn_sub_norm,
                    &a.h,
                    &a.xq,
                    &a.xs,
                    &a.qsum,
                    &a.step,
                ));
                for t in &l.down {
                    body.push(mt(g, t, 1, 0, c, &a.xq, &a.xs, &a.qsum, &a.x, &a.step));
                }
                if let Some(lo) = &self.lora {
                    if let Some(o) = lora_ops(g, lo, li, 6, f, c, 0, &a.x, &a.step) {
                        body.push(kernels::rmsnorm(g, f, eps, &l.ffn_sub_norm, &a.h, &lo.ln, &a.step));
                        body.extend(o);
                    }
                }
                body_layer += 1;
            }
            body
        };
        let body = make_body(false);
        // Batch steps (rows) have one row per sequence: never long enough for the tiled kernel.
        // Only built when asked for (`BITNODE_TILED_MIN`): its pipelines would cost load time for nothing.
        let body_tiled = (rows.is_none() && std::env::var_os("BITNODE_TILED_MIN").is_some()).then(|| make_body(true));

        let decode_body = if self.lora.is_none() && c.max(qd).max(f) <= kernels::FUSED_MAX_INPUT {
            let fused_rows = kernels::fused_rows();
            let mut d = vec![];
            for t in &self.embed {
                d.push(kernels::embedding(
                    g, self.f16, c, t, &a.tokens, &a.sampled, &a.x, &a.step,
                ));
            }
            for (l, (kc, vc)) in self.layers.iter().zip(kv) {
                for t in &l.qkv {
                    d.push(kernels::rmsnorm_matmul_ternary(
                        g,
                        t,
                        0,
                        fused_rows,
                        eps,
                        &a.x,
                        &l.input_layernorm,
                        &a.qkv,
                        qd + 2 * kvd,
                        &a.step,
                    ));
                }
                match (rows, part) {
                    (Some(r), _) => {
                        d.push(kernels::rope_rows(
                            g, nh, nkv, hd, cap, cos, sin, &a.qkv, kc, vc, r, &a.step,
                        ));
                        d.push(kernels::attention_rows(
                            g, nh, nkv, hd, cap, &a.qkv, kc, vc, &a.att, r, &a.step,
                        ));
                    }
                    (None, Some(part)) => d.extend(kernels::attention_split_rope(
                        g, nh, nkv, hd, cap, cos, sin, &a.qkv, kc, vc, part, &a.att, &a.step,
                    )),
                    (None, None) => {
                        d.push(kernels::rope(g, nh, nkv, hd, cap, cos, sin, &a.qkv, kc, vc, &a.step));
                        d.push(kernels::attention(g, nh, nkv, hd, cap, &a.qkv, kc, vc, &a.att, &a.step));
                    }
                }
                for t in &l.o {
                    d.push(kernels::rmsnorm_matmul_ternary(
                        g,
                        t,
                        1,
                        fused_rows,
                        eps,
                        &a.att,
                        &l.attn_sub_norm,
                        &a.x,
                        c,
                        &a.step,
                    ));
                }
                for t in &l.gate_up {
                    d.push(kernels::rmsnorm_matmul_ternary(
                        g,
                        t,
                        gm,
                        fused_rows,
                        eps,
                        &a.x,
                        &l.post_attention_layernorm,
                        &a.h,
                        f,
                        &a.step,
                    ));
                }
                for t in &l.down {
                    d.push(kernels::rmsnorm_matmul_ternary(
                        g,
                        t,
                        1,
                        fused_rows,
                        eps,
                        &a.h,
                        &l.ffn_sub_norm,
                        &a.x,
                        c,
                        &a.step,
                    ));
                }
            }
            Some(d)
        } else {
            None
        };
        let final_norm = kernels::rmsnorm(g, c, eps, &self.norm, &a.x, &a.xf, &a.step);
        let head = self.head.as_ref().unwrap_or(&self.embed);
        let lm = head
            .iter()
            .map(|t| kernels::lm_head(g, self.f16, c, v, t, &a.xf, &a.logits, &a.step))
            .collect();
        let nll = kernels::nll(g, v, &a.logits, &a.targets, &a.nll, &a.step);
        let sample = kernels::sample(g, v, &a.logits, &a.seen, &a.sample_partial, &a.sampled, &a.step);
        Ok(Ops {
            body,
            body_tiled,
            decode_body,
            final_norm,
            lm,
            nll,
            sample,
        })
    }

    /// The slot state, checked: `slot` exists and positions up to `end` fit it.
    fn slot_state(&self, slot: usize, end: usize) -> Result<&SlotState> {
        let st = self
            .slots
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("begin_slots() was not called".into()))?;
        if slot >= st.n || end > st.cap {
            return Err(EngineError::Invalid(format!(
                "slot {slot} position {end} outside the {} slots of {} positions",
                st.n, st.cap
            )));
        }
        Ok(st)
    }

    /// A chunk's size and token ids are within bounds.
    fn check_chunk(&self, tokens: &[u32]) -> Result<()> {
        let v = self.model.config.vocab_size;
        if tokens.is_empty() || tokens.len() > self.tmax {
            return Err(EngineError::Invalid(format!(
                "chunk of {} tokens (allowed 1..={})",
                tokens.len(),
                self.tmax
            )));
        }
        match tokens.iter().find(|&&x| x as usize >= v) {
            Some(bad) => Err(EngineError::Invalid(format!(
                "token id {bad} is outside the vocabulary of {v}"
            ))),
            None => Ok(()),
        }
    }

    fn write_step(&self, s: &Step) {
        self.gpu.queue.write_buffer(&self.acts.step, 0, bytemuck::bytes_of(s));
    }

    /// Reads a sampled token from `buf` once submission `after` has finished (all work when `None`).
    fn read_token(&self, buf: &wgpu::Buffer, after: Option<wgpu::SubmissionIndex>) -> Result<u32> {
        let b = self.gpu.read_after(buf, 4, after)?;
        let tok = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if tok as usize >= self.model.config.vocab_size {
            return Err(EngineError::Gpu(format!(
                "sampler returned token {tok} outside the vocabulary"
            )));
        }
        Ok(tok)
    }

    /// Records one compute pass, then copies `size` bytes of `src` into the readback buffer `dst`.
    fn submit(
        &self,
        f: impl FnOnce(&mut wgpu::ComputePass<'_>),
        copy: Option<(&wgpu::Buffer, &wgpu::Buffer, u64)>,
    ) -> wgpu::SubmissionIndex {
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: None,
            });
            f(&mut pass);
        }
        if let Some((src, dst, size)) = copy {
            enc.copy_buffer_to_buffer(src, 0, dst, 0, size);
        }
        self.gpu.queue.submit([enc.finish()])
    }
}

impl Backend for GpuBackend {
    fn device_name(&self) -> String {
        self.gpu.name()
    }

    fn subgroups(&self) -> bool {
        self.gpu.subgroups()
    }

    fn begin(&mut self, positions: usize) -> Result<()> {
        let cfg = &self.model.config;
        if positions > self.cap || self.ops.is_none() {
            let cap = positions.max(1).div_ceil(64) * 64;
            let cap = cap.min(cfg.max_position_embeddings.max(positions));
            let per = (cfg.num_kv_heads * cap * cfg.head_dim * 4) as u64;
            if per > self.gpu.max_binding {
                return Err(EngineError::Gpu(format!(
                    "a KV cache of {cap} positions needs {per} bytes per layer, over this adapter's binding limit of {}; use fewer tokens",
                    self.gpu.max_binding
                )));
            }
            for (k, v) in self.kv.drain(..) {
                self.gpu.release(k.size() + v.size());
            }
            if let Some((c, s)) = self.rope.take() {
                self.gpu.release(c.size() + s.size());
            }
            self.ops = None;
            for _ in 0..cfg.num_layers {
                self.kv
                    .push((self.gpu.storage("k_cache", per)?, self.gpu.storage("v_cache", per)?));
            }
            self.kv_bytes = per * 2 * cfg.num_layers as u64;
            if let Some(b) = self.attn_part.take() {
                self.gpu.release(b.size());
            }
            let pb = kernels::attention_part_bytes(cfg.num_heads, cfg.head_dim, cap);
            self.attn_part = if pb <= self.gpu.max_binding {
                Some(self.gpu.storage("attention_part", pb)?)
            } else {
                None
            };
            let (cos, sin) = crate::cpu::rope_table(cfg.rope_theta, cfg.head_dim, cap);
            self.rope = Some((
                self.gpu.storage_init("rope_cos", f32_bytes(&cos))?,
                self.gpu.storage_init("rope_sin", f32_bytes(&sin))?,
            ));
            self.cap = cap;
            let (cos, sin) = self
                .rope
                .as_ref()
                .ok_or_else(|| EngineError::Invalid("no rope table".into()))?;
            let cache = CacheBufs {
                cos,
                sin,
                part: self.attn_part.as_ref(),
                cap,
                rows: None,
            };
            self.ops = Some(self.build_ops(&self.kv, cache)?);
        }
        self.seen.fill(0);
        self.gpu
            .queue
            .write_buffer(&self.acts.seen, 0, bytemuck::cast_slice(&self.seen));
        Ok(())
    }

    fn mark_seen(&mut self, tokens: &[u32]) -> Result<()> {
        let mut changed = false;
        for &t in tokens {
            if let Some(w) = self.seen.get_mut(t as usize / 32) {
                *w |= 1 << (t % 32);
                changed = true;
            }
        }
        if changed {
            if tokens.len() == 1 {
                let i = tokens[0] as usize / 32;
                self.gpu.queue.write_buffer(
                    &self.acts.seen,
                    (i * 4) as u64,
                    bytemuck::cast_slice(&self.seen[i..i + 1]),
                );
            } else {
                self.gpu
                    .queue
                    .write_buffer(&self.acts.seen, 0, bytemuck::cast_slice(&self.seen));
            }
        }
        Ok(())
    }

    fn max_chunk(&self) -> usize {
        self.tmax
    }

    fn begin_slots(&mut self, slots: usize, positions: usize) -> Result<usize> {
        if let Some(old) = self.slots.take() {
            self.gpu.release(old.bytes);
        }
        let cfg = &self.model.config;
        let (nh, nkv, hd, v) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size);
        let cap = positions.max(1);
        // One step samples every row in one lm_head pass, and one binding holds every slot of a layer.
        let per_slot = (nkv * cap * hd * 4) as u64;
        let fit = (self.gpu.max_binding / per_slot.max(1)) as usize;
        let n = slots.min(self.lmax).min(self.tmax).min(fit);
        if n == 0 {
            return Err(EngineError::Gpu(format!(
                "a KV cache slot of {cap} positions needs {per_slot} bytes per layer, over this adapter's binding limit of {}",
                self.gpu.max_binding
            )));
        }
        let before = self.gpu.allocated();
        let g = self.gpu.clone();
        let mut kv = vec![];
        for _ in 0..cfg.num_layers {
            kv.push((
                g.storage("k_slots", per_slot * n as u64)?,
                g.storage("v_slots", per_slot * n as u64)?,
            ));
        }
        let (cos, sin) = crate::cpu::rope_table(cfg.rope_theta, hd, cap);
        let cos = g.storage_init("rope_cos", f32_bytes(&cos))?;
        let sin = g.storage_init("rope_sin", f32_bytes(&sin))?;
        let pb = kernels::attention_part_bytes(nh, hd, cap);
        let part = if pb <= g.max_binding {
            Some(g.storage("attention_part", pb)?)
        } else {
            None
        };
        let rows = g.storage("rows", (self.tmax * 8) as u64)?;
        let rowp = g.storage(
            "row_params",
            (self.lmax * std::mem::size_of::<kernels::RowParams>()) as u64,
        )?;
        let seen = g.storage("seen_slots", (n * v.div_ceil(32) * 4) as u64)?;
        let partial = g.storage(
            "sample_partial_rows",
            self.lmax as u64 * kernels::sample_partial_bytes(v),
        )?;
        let cache = CacheBufs {
            cos: &cos,
            sin: &sin,
            part: part.as_ref(),
            cap,
            rows: None,
        };
        let ops = self.build_ops(&kv, cache)?;
        let by_rows = self.build_ops(
            &kv,
            CacheBufs {
                rows: Some(&rows),
                ..cache
            },
        )?;
        // A batch step runs rmsnorm_quant and matmul_ternary over all rows (each weight word serves four
        // tokens per workgroup). The fused layers, which take the rows one after another in each
        // projection, measured slower from 4 rows up on an H200 (BENCHMARKS.md: 478 against 865 tok/s
        // at 16), so they are a tuning knob: `BITNODE_BATCH_FUSED=1`.
        let fused = std::env::var("BITNODE_BATCH_FUSED").is_ok_and(|v| v == "1");
        let rows_body = match by_rows.decode_body {
            Some(d) if fused => d,
            _ => by_rows.body,
        };
        let a = &self.acts;
        let sample = kernels::sample_rows(&g, v, &a.logits, &seen, &partial, &a.sampled, &rowp, &a.step);
        let ring_bytes = (self.lmax * 4).max(16) as u64;
        let ring = [g.readback_buffer(ring_bytes), g.readback_buffer(ring_bytes)];
        g.flush_uploads()?;
        self.kv_bytes = per_slot * n as u64 * 2 * cfg.num_layers as u64;
        self.slots = Some(SlotState {
            n,
            cap,
            rows,
            rowp,
            seen,
            ops,
            rows_body,
            sample,
            ring,
            inflight: Default::default(),
            next_ring: 0,
            bytes: g.allocated().saturating_sub(before),
        });
        // The caches, rope tables and partials stay alive through the ops' bind groups.
        drop((kv, cos, sin, part, partial));
        Ok(n)
    }

    fn reset_slot(&mut self, slot: usize, seen: &[u32]) -> Result<()> {
        let v = self.model.config.vocab_size;
        let st = self.slot_state(slot, 0)?;
        let mut words = vec![0u32; v.div_ceil(32)];
        for &t in seen {
            if let Some(w) = words.get_mut(t as usize / 32) {
                *w |= 1 << (t % 32);
            }
        }
        self.gpu
            .queue
            .write_buffer(&st.seen, (slot * words.len() * 4) as u64, bytemuck::cast_slice(&words));
        Ok(())
    }

    fn forward_slot(
        &mut self,
        slot: usize,
        tokens: &[u32],
        start: usize,
        sample: Option<(crate::cpu::SampleParams, f32)>,
    ) -> Result<Option<u32>> {
        let t = tokens.len();
        self.check_chunk(tokens)?;
        let st = self.slot_state(slot, start + t)?;
        let q = &self.gpu.queue;
        q.write_buffer(&self.acts.tokens, 0, bytemuck::cast_slice(tokens));
        let mut step = Step {
            t: t as u32,
            start: start as u32,
            slot: slot as u32,
            ..Default::default()
        };
        let tt = t as u32;
        let Some((params, u)) = sample else {
            self.write_step(&step);
            self.submit(|p| st.ops.prompt_body(tt).iter().for_each(|o| o.record(p, tt, 0)), None);
            return Ok(None);
        };
        step.lm_t0 = tt - 1;
        step.lm_t = 1;
        self.write_step(&step);
        q.write_buffer(&st.rowp, 0, bytemuck::bytes_of(&row_params(&params, u, slot)));
        self.submit(
            |p| {
                st.ops.prompt_body(tt).iter().for_each(|o| o.record(p, tt, 1));
                st.ops.final_norm.record(p, tt, 1);
                st.ops.lm.iter().for_each(|o| o.record(p, tt, 1));
                st.sample.iter().for_each(|o| o.record(p, tt, 1));
            },
            Some((&self.acts.sampled, &self.acts.staging, 4)),
        );
        Ok(Some(self.read_token(&self.acts.staging, None)?))
    }

    fn decode_rows_submit(&mut self, rows: &[crate::backend::SlotRow], feedback: bool) -> Result<()> {
        let b = rows.len();
        if b == 0 || b > self.lmax {
            return Err(EngineError::Invalid(format!(
                "a batch step of {b} rows (allowed 1..={})",
                self.lmax
            )));
        }
        for r in rows {
            self.slot_state(r.slot, r.pos + 1)?;
        }
        if !feedback {
            let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
            self.check_chunk(&tokens)?;
            self.gpu
                .queue
                .write_buffer(&self.acts.tokens, 0, bytemuck::cast_slice(&tokens));
        }
        let Some(st) = self.slots.as_ref() else {
            return Err(EngineError::Invalid("begin_slots() was not called".into()));
        };
        if st.inflight.len() >= 2 {
            return Err(EngineError::Invalid("two decode steps are already in flight".into()));
        }
        let at: Vec<[u32; 2]> = rows.iter().map(|r| [r.slot as u32, r.pos as u32]).collect();
        let params: Vec<kernels::RowParams> = rows.iter().map(|r| row_params(&r.params, r.u, r.slot)).collect();
        let q = &self.gpu.queue;
        q.write_buffer(&st.rows, 0, bytemuck::cast_slice(&at));
        q.write_buffer(&st.rowp, 0, bytemuck::cast_slice(&params));
        // One sequence: the fused decode layers at its slot; several: the rows body.
        let single = b == 1 && st.ops.decode_body.is_some();
        let step = Step {
            t: b as u32,
            start: if single { rows[0].pos as u32 } else { 0 },
            slot: if single { rows[0].slot as u32 } else { 0 },
            lm_t0: 0,
            lm_t: b as u32,
            feedback: feedback as u32,
            ..Default::default()
        };
        self.write_step(&step);
        let ring = st.next_ring;
        let bt = b as u32;
        let idx = self.submit(
            |p| {
                let body = match (&st.ops.decode_body, single) {
                    (Some(d), true) => d,
                    _ => &st.rows_body,
                };
                body.iter().for_each(|o| o.record(p, bt, bt));
                st.ops.final_norm.record(p, bt, bt);
                st.ops.lm.iter().for_each(|o| o.record(p, bt, bt));
                st.sample.iter().for_each(|o| o.record(p, bt, bt));
            },
            Some((&self.acts.sampled, &st.ring[ring], (b * 4) as u64)),
        );
        if let Some(st) = self.slots.as_mut() {
            st.inflight.push_back((idx, ring, b));
            st.next_ring = 1 - ring;
        }
        Ok(())
    }

    fn profile_rows(&mut self, rows: &[crate::backend::SlotRow]) -> Result<Option<crate::backend::Profile>> {
        if !self.gpu.device.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            return Ok(None);
        }
        // Queue and read one real step first, so the buffers hold this batch's rows and settings.
        self.decode_rows_submit(rows, false)?;
        self.decode_rows_wait()?;
        let Some(st) = self.slots.as_ref() else { return Ok(None) };
        let b = rows.len() as u32;
        let single = b == 1 && st.ops.decode_body.is_some();
        let body = match (&st.ops.decode_body, single) {
            (Some(d), true) => d,
            _ => &st.rows_body,
        };
        let timed: Vec<kernels::Timed<'_>> = body
            .iter()
            .chain(std::iter::once(&st.ops.final_norm))
            .chain(st.ops.lm.iter())
            .chain(st.sample.iter())
            .map(|o| kernels::Timed::Op(o, b, b))
            .collect();
        let (by, n) = kernels::time_dispatches(&self.gpu, &timed)?;
        let total = by.iter().map(|e| e.2).sum();
        Ok(Some(crate::backend::Profile {
            kernels: by,
            dispatches: n,
            gpu_us: total,
            record_us: 0.0,
        }))
    }

    fn decode_rows_wait(&mut self) -> Result<Vec<u32>> {
        let v = self.model.config.vocab_size;
        let Some((idx, ring, b)) = self.slots.as_mut().and_then(|s| s.inflight.pop_front()) else {
            return Err(EngineError::Invalid("no decode step is queued".into()));
        };
        let Some(st) = self.slots.as_ref() else {
            return Err(EngineError::Invalid("begin_slots() was not called".into()));
        };
        let bytes = self.gpu.read_after(&st.ring[ring], (b * 4) as u64, Some(idx))?;
        let toks: Vec<u32> = bytemuck::cast_slice::<u8, u32>(&bytes).to_vec();
        if let Some(bad) = toks.iter().find(|&&t| t as usize >= v) {
            return Err(EngineError::Gpu(format!(
                "sampler returned token {bad} outside the vocabulary"
            )));
        }
        Ok(toks)
    }

    fn profile_step(&mut self, pos: usize) -> Result<Option<crate::backend::Profile>> {
        if !self.gpu.device.features().contains(wgpu::Features::TIMESTAMP_QUERY) || pos >= self.cap {
            return Ok(None);
        }
        let ops = self
            .ops
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("begin() was not called".into()))?;
        let all: Vec<&Op> = ops.decode_step().collect();
        let step = Step {
            t: 1,
            start: pos as u32,
            lm_t: 1,
            feedback: 1,
            ..Default::default()
        };
        self.write_step(&step);
        // CPU cost of recording the step as decode does: one pass, every dispatch.
        let t0 = std::time::Instant::now();
        self.submit(|p| all.iter().for_each(|o| o.record(p, 1, 1)), None);
        let record_us = t0.elapsed().as_secs_f64() * 1e6;
        self.gpu
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| EngineError::Gpu(e.to_string()))?;
        // GPU cost: each dispatch in its own timed pass.
        let timed: Vec<kernels::Timed<'_>> = all.iter().map(|o| kernels::Timed::Op(o, 1, 1)).collect();
        let (by, _) = kernels::time_dispatches(&self.gpu, &timed)?;
        let total = by.iter().map(|e| e.2).sum();
        Ok(Some(crate::backend::Profile {
            kernels: by,
            dispatches: all.len(),
            gpu_us: total,
            record_us,
        }))
    }

    /// Pipelined decode: step n+1 is queued before step n's token is read back (the embedding kernel takes
    /// the token straight from the sampler's buffer and the sampler marks it seen), so the CPU records one
    /// step while the GPU runs the previous one. When the caller stops (EOS), at most one speculative step
    /// has run; its cache entry lies beyond the returned sequence and is never read.
    fn decode(
        &mut self,
        _first: u32,
        pos: usize,
        steps: usize,
        params: &crate::cpu::SampleParams,
        rng: &mut crate::rng::Rng,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<()> {
        if pos + steps > self.cap {
            return Err(EngineError::Invalid(format!(
                "positions up to {} exceed the cache of {}",
                pos + steps,
                self.cap
            )));
        }
        let ops = self
            .ops
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("begin() was not called".into()))?;
        let mut inflight: std::collections::VecDeque<(wgpu::SubmissionIndex, usize)> = Default::default();
        let mut stopped = false;
        let mut i = 0;
        while i < steps && !stopped {
            if inflight.len() == 2 {
                if let Some((idx, slot)) = inflight.pop_front() {
                    let tok = self.read_token(&self.acts.ring[slot], Some(idx))?;
                    if !on_token(tok) {
                        stopped = true;
                        break;
                    }
                }
            }
            let step = Step {
                t: 1,
                start: (pos + i) as u32,
                lm_t0: 0,
                lm_t: 1,
                temperature: params.temperature,
                top_k: params.top_k,
                top_p: params.top_p,
                penalty: params.repetition_penalty,
                u: rng.uniform(),
                feedback: 1,
                slot: 0,
                seq: 0,
            };
            self.write_step(&step);
            let slot = i % 2;
            let idx = self.submit(
                |p| ops.decode_step().for_each(|o| o.record(p, 1, 1)),
                Some((&self.acts.sampled, &self.acts.ring[slot], 4)),
            );
            inflight.push_back((idx, slot));
            i += 1;
        }
        while let Some((idx, slot)) = inflight.pop_front() {
            let tok = self.read_token(&self.acts.ring[slot], Some(idx))?;
            if !stopped && !on_token(tok) {
                stopped = true;
            }
        }
        // Keep the host copy of the penalty set in step with what the sampler marked on the device.
        let b = self.gpu.download(&self.acts.seen, (self.seen.len() * 4) as u64)?;
        self.seen.copy_from_slice(bytemuck::cast_slice(&b));
        Ok(())
    }

    fn memory(&self) -> MemoryReport {
        let (tern, e, h, other) = self.weight_bytes;
        MemoryReport {
            ternary_weights: tern,
            embedding: e,
            lm_head: h,
            other_weights: other,
            kv_cache: self.kv_bytes,
            activations: self.acts.bytes,
            total: self.gpu.allocated(),
            peak: self.gpu.peak(),
        }
    }

    fn forward(&mut self, tokens: &[u32], start: usize, want: Want<'_>) -> Result<Got> {
        let cfg = &self.model.config;
        let v = cfg.vocab_size;
        let t = tokens.len();
        if t == 0 || t > self.tmax {
            return Err(EngineError::Invalid(format!(
                "chunk of {t} tokens (allowed 1..={})",
                self.tmax
            )));
        }
        if start + t > self.cap {
            return Err(EngineError::Invalid(format!(
                "positions {start}..{} exceed the cache of {}",
                start + t,
                self.cap
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= v) {
            return Err(EngineError::Invalid(format!(
                "token id {bad} is outside the vocabulary of {v}"
            )));
        }
        let ops = self
            .ops
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("begin() was not called".into()))?;
        self.gpu
            .queue
            .write_buffer(&self.acts.tokens, 0, bytemuck::cast_slice(tokens));
        let mut step = Step {
            t: t as u32,
            start: start as u32,
            ..Default::default()
        };
        let tt = t as u32;
        match want {
            Want::Nothing => {
                self.write_step(&step);
                self.submit(|p| ops.prompt_body(tt).iter().for_each(|o| o.record(p, tt, 0)), None);
                Ok(Got::Nothing)
            }
            Want::Sample { params, u } => {
                step.lm_t0 = tt - 1;
                step.lm_t = 1;
                step.temperature = params.temperature;
                step.top_k = params.top_k;
                step.top_p = params.top_p;
                step.penalty = params.repetition_penalty;
                step.u = u;
                self.write_step(&step);
                self.submit(
                    |p| {
                        ops.prompt_body(tt).iter().for_each(|o| o.record(p, tt, 1));
                        ops.final_norm.record(p, tt, 1);
                        ops.lm.iter().for_each(|o| o.record(p, tt, 1));
                        ops.sample.iter().for_each(|o| o.record(p, tt, 1));
                    },
                    Some((&self.acts.sampled, &self.acts.staging, 4)),
                );
                let tok = self.read_token(&self.acts.staging, None)?;
                // The sampler marked it seen on the device; mirror that in the host copy.
                self.seen[tok as usize / 32] |= 1 << (tok % 32);
                Ok(Got::Token(tok))
            }
            Want::Nll(targets) => {
                let n = targets.len().min(t);
                if n == 0 {
                    self.write_step(&step);
                    self.submit(|p| ops.prompt_body(tt).iter().for_each(|o| o.record(p, tt, 0)), None);
                    return Ok(Got::Nll(vec![]));
                }
                self.gpu
                    .queue
                    .write_buffer(&self.acts.targets, 0, bytemuck::cast_slice(&targets[..n]));
                let mut first = true;
                let mut s0 = 0;
                while s0 < n {
                    let cnt = (n - s0).min(self.lmax);
                    step.lm_t0 = s0 as u32;
                    step.lm_t = cnt as u32;
                    self.write_step(&step);
                    let last = s0 + cnt == n;
                    let lt = cnt as u32;
                    self.submit(
                        |p| {
                            if first {
                                ops.prompt_body(tt).iter().for_each(|o| o.record(p, tt, lt));
                                ops.final_norm.record(p, tt, lt);
                            }
                            ops.lm.iter().for_each(|o| o.record(p, tt, lt));
                            ops.nll.record(p, tt, lt);
                        },
                        if last {
                            Some((&self.acts.nll, &self.acts.staging, (n * 4) as u64))
                        } else {
                            None
                        },
                    );
                    first = false;
                    s0 += cnt;
                }
                let b = self.gpu.read(&self.acts.staging, (n * 4) as u64)?;
                Ok(Got::Nll(bytemuck::cast_slice::<u8, f32>(&b).to_vec()))
            }
            Want::AllLogits => {
                let mut all = Vec::with_capacity(t * v);
                let mut first = true;
                let mut s0 = 0;
                while s0 < t {
                    let cnt = (t - s0).min(self.lmax);
                    step.lm_t0 = s0 as u32;
                    step.lm_t = cnt as u32;
                    self.write_step(&step);
                    let lt = cnt as u32;
                    self.submit(
                        |p| {
                            if first {
                                ops.prompt_body(tt).iter().for_each(|o| o.record(p, tt, lt));
                                ops.final_norm.record(p, tt, lt);
                            }
                            ops.lm.iter().for_each(|o| o.record(p, tt, lt));
                        },
                        Some((&self.acts.logits, &self.acts.staging, (cnt * v * 4) as u64)),
                    );
                    first = false;
                    let b = self.gpu.read(&self.acts.staging, (cnt * v * 4) as u64)?;
                    all.extend_from_slice(bytemuck::cast_slice::<u8, f32>(&b));
                    s0 += cnt;
                }
                Ok(Got::Logits(all))
            }
        }
    }
}

fn row_params(p: &crate::cpu::SampleParams, u: f32, slot: usize) -> kernels::RowParams {
    kernels::RowParams {
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        penalty: p.repetition_penalty,
        u,
        slot: slot as u32,
        ..Default::default()
    }
}

/// The two dispatches of one LoRA branch onto `y` (None where the target is not adapted); its input is the
/// normalised projection input in `lo.ln`.
#[allow(clippy::too_many_arguments)]
fn lora_ops(
    g: &Gpu,
    lo: &LoraOnDevice,
    layer: usize,
    target: usize,
    x_stride: usize,
    y_stride: usize,
    y_off: usize,
    y: &wgpu::Buffer,
    step: &wgpu::Buffer,
) -> Option<[Op; 2]> {
    let (a, b, inp, out) = lo.w.get(layer)?.get(target)?.as_ref()?;
    let shape = kernels::LoraShape {
        inp: *inp,
        out: *out,
        rank: lo.rank,
        scale: lo.scale,
        x_stride,
        y_stride,
        y_off,
    };
    Some(kernels::lora(g, &shape, &lo.ln, a, b, &lo.lh, y, step))
}
