//! LoRA training on wgpu: the forward pass with the activations the backward needs, then the hand-written
//! backward, all in WGSL kernels (each checked against its CPU twin), with the LoRA gradients accumulated on
//! the device. Its oracle is the CPU reference trainer (`crate::train::CpuTrainer`), which is itself checked
//! against PEFT; a test compares the two on the PEFT fixture.
//!
//! Layout per layer follows the inference forward (fused q|k|v projection output, RoPE writing K/V into a
//! per-layer cache), except that gate and up stay separate: the LoRA branches add to them and the backward
//! reads them. [`plan`] predicts the device memory before anything is allocated and chooses between keeping
//! every layer's activations and gradient checkpointing (each layer recomputed from its saved input just
//! before its backward), the head's token chunk and the embedding's precision.
use super::kernels::{self as k, LoraShape, MatrixTile, Op, Step, TernaryTile};
use super::Gpu;
use crate::cpu;
use crate::error::{EngineError, Result};
use crate::lora::Adapter;
use crate::model::Model;
use std::sync::Arc;

struct LayerWeights {
    input_layernorm: wgpu::Buffer,
    post_attention_layernorm: wgpu::Buffer,
    attn_sub_norm: wgpu::Buffer,
    ffn_sub_norm: wgpu::Buffer,
    qkv: Vec<TernaryTile>,
    o: Vec<TernaryTile>,
    gate: Vec<TernaryTile>,
    up: Vec<TernaryTile>,
    down: Vec<TernaryTile>,
}

/// One adapted projection on the device: parameters and their accumulated gradients.
struct GpuLora {
    a: wgpu::Buffer,
    b: wgpu::Buffer,
    da: wgpu::Buffer,
    db: wgpu::Buffer,
    /// AdamW moments of a and b.
    ma: wgpu::Buffer,
    va: wgpu::Buffer,
    mb: wgpu::Buffer,
    vb: wgpu::Buffer,
    inp: usize,
    out: usize,
}

/// One step of a recorded sequence: a dispatch (with the token count of its head chunk), or a buffer copy
/// between dispatches. Items own their handles, so a bucket's recorded work is kept and replayed.
enum Item {
    Op(Op, u32),
    Copy(wgpu::Buffer, wgpu::Buffer, u64),
    /// Host head tile `i` goes into the device tile buffer before the items after it run (host-resident
    /// embedding: `MemoryPlan::embed_host`).
    Upload(usize),
}

/// The embedding (and head) kept in host memory, for devices where even an f16 copy does not fit: the
/// head's rows are converted to f16 once into host tiles, and each pass streams them through one device
/// buffer of a tile (the logits and the head's backward run tile by tile); the embedding's rows are
/// gathered on the host (exactly, from the checkpoint's dtype) and uploaded as the first layer's input.
struct HostHead {
    tiles: Vec<Vec<u16>>,
    /// Views of the device tile buffer, one per host tile (row0, rows), for the recorded head ops.
    views: Vec<MatrixTile>,
    buf: wgpu::Buffer,
}

/// Bytes of the device buffer the host-resident head streams through (also bounded by the binding limit).
/// Small enough to matter little next to the model, large enough that the head takes a few dozen
/// dispatches per pass; at most two uploads are queued at once (see `GpuTrainer::run`), because wgpu's
/// staging copies of queued uploads can occupy device memory too.
pub const HOST_TILE_BYTES: u64 = 32 << 20;

fn host_tile_rows(gpu_binding: u64, c: usize) -> usize {
    (HOST_TILE_BYTES.min(gpu_binding) / (2 * c as u64)).max(1) as usize
}

pub struct GpuTrainer {
    gpu: Arc<Gpu>,
    model: Arc<Model>,
    /// Empty when the embedding stays on the host (`host`).
    embed: Vec<MatrixTile>,
    host: Option<HostHead>,
    /// `None` when the embedding is tied: the head reads the embedding's tiles (one copy on the device).
    head: Option<Vec<MatrixTile>>,
    norm: wgpu::Buffer,
    layers: Vec<LayerWeights>,
    lora: Vec<Vec<Option<GpuLora>>>,
    rank: usize,
    scale: f32,
    plan: MemoryPlan,
    /// Buffers and recorded dispatches of the current sequence bucket.
    scratch: std::cell::RefCell<Option<Scratch>>,
    /// The optimizer's dispatches, built on the first step.
    adamw: std::cell::RefCell<Option<Optim>>,
}

/// The optimizer step's recorded dispatches: a sum of squares per LoRA tensor, the clipping coefficient,
/// and AdamW per tensor (with its element count).
struct Optim {
    sums: Vec<Op>,
    clip_op: Op,
    adamw: Vec<(Op, usize)>,
    /// [coef, norm], written by `grad_clip`.
    clip: wgpu::Buffer,
    tensors: usize,
    _keep: (wgpu::Buffer, wgpu::Buffer),
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

impl GpuTrainer {
    /// Uploads the model and the adapter as `plan` (from [`plan`]) says.
    pub fn new(model: Arc<Model>, gpu: Arc<Gpu>, adapter: &Adapter, plan: MemoryPlan) -> Result<GpuTrainer> {
        let g = &gpu;
        let f16 = plan.embed_f16;
        let (embed, head, host) = if plan.embed_host {
            let m = model.head();
            let rows = plan
                .host_tile_rows
                .min(host_tile_rows(g.max_binding, m.cols))
                .clamp(1, m.rows.max(1));
            let buf = g.storage("head_tile", (2 * rows * m.cols) as u64)?;
            let (mut tiles, mut views) = (vec![], vec![]);
            let mut r0 = 0;
            while r0 < m.rows {
                let r1 = (r0 + rows).min(m.rows);
                tiles.push(m.rows_f16(r0, r1));
                views.push(MatrixTile {
                    buf: buf.clone(),
                    row0: r0 as u32,
                    rows: (r1 - r0) as u32,
                });
                r0 = r1;
            }
            (vec![], None, Some(HostHead { tiles, views, buf }))
        } else {
            let embed = k::matrix_tiles(g, &model.embed, f16)?;
            let head = if model.tied() {
                None
            } else {
                Some(k::matrix_tiles(g, model.head(), f16)?)
            };
            (embed, head, None)
        };
        let mut layers = vec![];
        for l in model.layers()? {
            layers.push(LayerWeights {
                input_layernorm: g.storage_init("ln", f32_bytes(&l.input_layernorm))?,
                post_attention_layernorm: g.storage_init("ln", f32_bytes(&l.post_attention_layernorm))?,
                attn_sub_norm: g.storage_init("ln", f32_bytes(&l.attn_sub_norm))?,
                ffn_sub_norm: g.storage_init("ln", f32_bytes(&l.ffn_sub_norm))?,
                qkv: k::ternary_tiles(g, &[&l.q_proj, &l.k_proj, &l.v_proj], false)?,
                o: k::ternary_tiles(g, &[&l.o_proj], false)?,
                gate: k::ternary_tiles(g, &[&l.gate_proj], false)?,
                up: k::ternary_tiles(g, &[&l.up_proj], false)?,
                down: k::ternary_tiles(g, &[&l.down_proj], false)?,
            });
        }
        let mut lora = vec![];
        for row in &adapter.layers {
            let mut r = vec![];
            for p in row {
                r.push(match p {
                    Some(p) => Some(GpuLora {
                        a: g.storage_init("lora_a", f32_bytes(&p.a))?,
                        b: g.storage_init("lora_b", f32_bytes(&p.b))?,
                        da: g.storage("lora_da", (4 * p.a.len()) as u64)?,
                        db: g.storage("lora_db", (4 * p.b.len()) as u64)?,
                        ma: g.storage("adam_m", (4 * p.a.len()) as u64)?,
                        va: g.storage("adam_v", (4 * p.a.len()) as u64)?,
                        mb: g.storage("adam_m", (4 * p.b.len()) as u64)?,
                        vb: g.storage("adam_v", (4 * p.b.len()) as u64)?,
                        inp: p.inp,
                        out: p.out,
                    }),
                    None => None,
                });
            }
            lora.push(r);
        }
        let norm = g.storage_init("norm", f32_bytes(&model.norm))?;
        g.flush_uploads()?;
        Ok(GpuTrainer {
            gpu,
            model,
            embed,
            host,
            head,
            norm,
            layers,
            lora,
            rank: adapter.rank,
            scale: adapter.scale(),
            plan,
            scratch: std::cell::RefCell::new(None),
            adamw: std::cell::RefCell::new(None),
        })
    }

    pub fn device_name(&self) -> String {
        self.gpu.name()
    }

    /// The high-water mark of the device memory bitnode allocated (weights, adapter, activations).
    pub fn peak_bytes(&self) -> u64 {
        self.gpu.peak()
    }

    /// Downloads one of the per-tensor buffer pairs (parameters, gradients or a moment) in the adapter's
    /// layout.
    fn fetch(&self, like: &Adapter, pick: impl Fn(&GpuLora) -> (&wgpu::Buffer, &wgpu::Buffer)) -> Result<Adapter> {
        let mut out = like.zeros_like();
        for (row, grow) in out.layers.iter_mut().zip(&self.lora) {
            for (p, gp) in row.iter_mut().zip(grow) {
                if let (Some(p), Some(gp)) = (p.as_mut(), gp) {
                    let (ba, bb) = pick(gp);
                    p.a = bytemuck::pod_collect_to_vec(&self.gpu.download(ba, (4 * p.a.len()) as u64)?);
                    p.b = bytemuck::pod_collect_to_vec(&self.gpu.download(bb, (4 * p.b.len()) as u64)?);
                }
            }
        }
        Ok(out)
    }

    /// The accumulated LoRA gradients, in the adapter's layout.
    pub fn grads(&self, like: &Adapter) -> Result<Adapter> {
        self.fetch(like, |p| (&p.da, &p.db))
    }

    /// The current adapter parameters (dropout and scaling from `like`).
    pub fn params(&self, like: &Adapter) -> Result<Adapter> {
        self.fetch(like, |p| (&p.a, &p.b))
    }

    /// The AdamW moments (exp_avg, exp_avg_sq), for checkpoints.
    pub fn moments(&self, like: &Adapter) -> Result<(Adapter, Adapter)> {
        Ok((
            self.fetch(like, |p| (&p.ma, &p.mb))?,
            self.fetch(like, |p| (&p.va, &p.vb))?,
        ))
    }

    /// Restores AdamW moments (resuming from a checkpoint).
    pub fn set_moments(&self, m: &Adapter, v: &Adapter) -> Result<()> {
        for ((gr, mr), vr) in self.lora.iter().zip(&m.layers).zip(&v.layers) {
            for ((gp, mp), vp) in gr.iter().zip(mr).zip(vr) {
                if let (Some(gp), Some(mp), Some(vp)) = (gp, mp, vp) {
                    self.gpu.queue.write_buffer(&gp.ma, 0, f32_bytes(&mp.a));
                    self.gpu.queue.write_buffer(&gp.mb, 0, f32_bytes(&mp.b));
                    self.gpu.queue.write_buffer(&gp.va, 0, f32_bytes(&vp.a));
                    self.gpu.queue.write_buffer(&gp.vb, 0, f32_bytes(&vp.b));
                }
            }
        }
        self.gpu.check_error()
    }

    /// The optimizer step, all on the device: the global gradient norm (`grad_sq_sum` per tensor, then
    /// `grad_clip`) and its clipping coefficient, AdamW on every LoRA tensor with the clipped gradients,
    /// gradients cleared for the next step. Only the norm (4 bytes) comes back. Returns the gradient norm
    /// before clipping.
    pub fn apply(&self, o: &crate::cpu::AdamW, lr: f64, step: u64, max_norm: Option<f32>) -> Result<f32> {
        let g = &*self.gpu;
        // The dispatches are built on the first step and reused: each step only rewrites the parameter
        // blocks of AdamW (lr, bias corrections) and of the clipping (max_norm).
        let mut slot = self.adamw.borrow_mut();
        let opt = match slot.as_mut() {
            Some(opt) => opt,
            None => {
                let stepb = g.uniform("step", bytemuck::bytes_of(&Step::default()));
                let tensors = 2 * self.lora.iter().flatten().flatten().count();
                let sq = g.storage("grad_sq", (4 * tensors) as u64)?;
                let clip = g.storage("grad_clip", 16)?;
                let mut sums = vec![];
                let mut ops = vec![];
                for p in self.lora.iter().flatten().flatten() {
                    let (na, nb) = (self.rank * p.inp, p.out * self.rank);
                    sums.push(k::grad_sq_sum(g, na, sums.len(), &p.da, &sq, &stepb));
                    sums.push(k::grad_sq_sum(g, nb, sums.len(), &p.db, &sq, &stepb));
                    ops.push((
                        k::adamw(g, na, o, lr, step, &p.a, &p.ma, &p.va, &p.da, &clip, &stepb),
                        na,
                    ));
                    ops.push((
                        k::adamw(g, nb, o, lr, step, &p.b, &p.mb, &p.vb, &p.db, &clip, &stepb),
                        nb,
                    ));
                }
                let clip_op = k::grad_clip(g, tensors, max_norm, &sq, &clip, &stepb);
                slot.insert(Optim {
                    sums,
                    clip_op,
                    adamw: ops,
                    clip,
                    tensors,
                    _keep: (sq, stepb),
                })
            }
        };
        for (op, n) in opt.adamw.iter() {
            op.set_params(&g.queue, &k::adamw_params(*n, o, lr, step));
        }
        opt.clip_op
            .set_params(&g.queue, &k::grad_clip_params(opt.tensors, max_norm));
        let mut enc = g.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("adamw"),
                timestamp_writes: None,
            });
            for op in &opt.sums {
                op.record(&mut pass, 1, 1);
            }
            opt.clip_op.record(&mut pass, 1, 1);
            for (op, _) in opt.adamw.iter() {
                op.record(&mut pass, 1, 1);
            }
        }
        for p in self.lora.iter().flatten().flatten() {
            enc.clear_buffer(&p.da, 0, None);
            enc.clear_buffer(&p.db, 0, None);
        }
        g.queue.submit([enc.finish()]);
        let clip: Vec<f32> = bytemuck::pod_collect_to_vec(&g.download(&opt.clip, 8)?);
        g.check_error()?;
        Ok(clip.get(1).copied().unwrap_or(f32::NAN))
    }

    /// Records and submits the items: consecutive dispatches share one compute pass (wgpu orders them and
    /// makes writes visible), copies go between passes.
    fn run(&self, items: &[Item], t: u32) -> Result<()> {
        let g = &self.gpu;
        if std::env::var_os("BITNODE_TRAIN_PROFILE").is_some()
            && g.device.features().contains(wgpu::Features::TIMESTAMP_QUERY)
        {
            return self.run_profiled(items, t);
        }
        let mut enc = g.device.create_command_encoder(&Default::default());
        let mut i = 0;
        let mut queued: Option<wgpu::SubmissionIndex> = None;
        while i < items.len() {
            match &items[i] {
                Item::Copy(src, dst, n) => {
                    enc.copy_buffer_to_buffer(src, 0, dst, 0, *n);
                    i += 1;
                }
                Item::Upload(ti) => {
                    // The work so far reads the tile buffer's previous contents: submit it, then queue the
                    // next tile (wgpu runs the write before the next submission and after this one). Wait
                    // for the submission before last, so at most two tiles' staging copies exist.
                    let idx = g.queue.submit([enc.finish()]);
                    if let Some(prev) = queued.replace(idx) {
                        g.device
                            .poll(wgpu::PollType::Wait {
                                submission_index: Some(prev),
                                timeout: None,
                            })
                            .map_err(|e| EngineError::Gpu(format!("device lost while training: {e}")))?;
                    }
                    self.upload_tile(*ti)?;
                    enc = g.device.create_command_encoder(&Default::default());
                    i += 1;
                }
                Item::Op(..) => {
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("train"),
                        timestamp_writes: None,
                    });
                    while let Some(Item::Op(op, lm_t)) = items.get(i) {
                        op.record(&mut pass, t, *lm_t);
                        i += 1;
                    }
                }
            }
        }
        g.queue.submit([enc.finish()]);
        g.check_error()
    }

    /// Writes host head tile `i` into the device tile buffer (host-resident embedding).
    fn upload_tile(&self, i: usize) -> Result<()> {
        let h = self
            .host
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("a head tile upload without a host-resident head".into()))?;
        let tile = h
            .tiles
            .get(i)
            .ok_or_else(|| EngineError::Invalid(format!("no head tile {i}")))?;
        self.gpu.queue.write_buffer(&h.buf, 0, bytemuck::cast_slice(tile));
        Ok(())
    }

    /// `run` with every dispatch in its own timed pass; prints GPU time per kernel to stderr
    /// (`BITNODE_TRAIN_PROFILE=1`, for `bitnode bench finetune`). Separate passes serialise the work, so
    /// the total runs above the normal step time. Head tile uploads (host-resident embedding) split the
    /// items into segments timed one after another; the uploads themselves are not timed.
    fn run_profiled(&self, items: &[Item], t: u32) -> Result<()> {
        let mut by: Vec<k::KernelTime> = vec![];
        let mut dispatches = 0;
        // Times the dispatches since the last upload and adds them to the per-kernel totals.
        let mut time = |seg: &[k::Timed<'_>]| -> Result<()> {
            let (part, n) = k::time_dispatches(&self.gpu, seg)?;
            dispatches += n;
            for (name, count, us) in part {
                match by.iter_mut().find(|e| e.0 == name) {
                    Some(e) => {
                        e.1 += count;
                        e.2 += us;
                    }
                    None => by.push((name, count, us)),
                }
            }
            Ok(())
        };
        let mut seg: Vec<k::Timed<'_>> = vec![];
        for it in items {
            match it {
                Item::Op(op, lm_t) => seg.push(k::Timed::Op(op, t, *lm_t)),
                Item::Copy(src, dst, n) => seg.push(k::Timed::Copy(src, dst, *n)),
                Item::Upload(ti) => {
                    time(&seg)?;
                    seg.clear();
                    self.upload_tile(*ti)?;
                }
            }
        }
        time(&seg)?;
        by.sort_by(|a, b| b.2.total_cmp(&a.2));
        let total: f64 = by.iter().map(|e| e.2).sum();
        eprintln!(
            "training pass, T = {t}: {dispatches} dispatches, {:.1} ms of kernel time",
            total / 1e3
        );
        for (name, count, us) in by {
            eprintln!(
                "  {name:<28} {count:>5}  {:>9.1} ms  {:>5.1}%",
                us / 1e3,
                100.0 * us / total.max(1e-9)
            );
        }
        Ok(())
    }

    /// The memory plan the trainer was built with.
    pub fn plan(&self) -> &MemoryPlan {
        &self.plan
    }

    /// Forward and backward of one sequence, as `CpuTrainer::sequence` (same label convention and weight),
    /// accumulating `weight * dNLL/dLoRA` into the device gradients. Returns the sum of the NLLs of the
    /// predicted positions.
    ///
    /// The sequence is padded to a multiple of 64 tokens (its bucket) with positions the loss ignores:
    /// attention is causal, so padding at the end changes nothing before it and gets zero gradient, and
    /// every sequence of a bucket reuses one set of buffers and recorded dispatches.
    pub fn sequence(&self, ids: &[u32], labels: &[i32], weight: f32) -> Result<f64> {
        self.pass(&[(ids, labels)], weight, true)
    }

    /// Forward and backward of up to `plan().micro_batch` sequences in one pass: each is padded to the
    /// bucket of the longest and they run as one `n x bucket`-row batch through every kernel, with RoPE
    /// and attention kept inside each sequence (`Step::seq`). The gradients equal those of `sequence` on
    /// each in turn, up to float summation order. Returns the summed NLL of the predicted positions.
    pub fn sequences(&self, seqs: &[(&[u32], &[i32])], weight: f32) -> Result<f64> {
        self.pass(seqs, weight, true)
    }

    /// The summed NLL of the predicted positions, forward only (eval loss).
    pub fn loss(&self, ids: &[u32], labels: &[i32]) -> Result<f64> {
        self.pass(&[(ids, labels)], 0.0, false)
    }

    /// `loss` over up to `plan().micro_batch` sequences in one pass.
    pub fn losses(&self, seqs: &[(&[u32], &[i32])]) -> Result<f64> {
        self.pass(seqs, 0.0, false)
    }

    fn pass(&self, seqs: &[(&[u32], &[i32])], weight: f32, backward: bool) -> Result<f64> {
        let g = &*self.gpu;
        let cfg = &self.model.config;
        if seqs.is_empty() || seqs.len() > self.plan.micro_batch {
            return Err(EngineError::Invalid(format!(
                "a training pass takes 1..={} sequences (the memory plan's micro-batch), not {}",
                self.plan.micro_batch,
                seqs.len()
            )));
        }
        for (ids, labels) in seqs {
            let t = ids.len();
            if t == 0 || labels.len() != t || t > cfg.max_position_embeddings {
                return Err(EngineError::Invalid(
                    "a training sequence needs 1..=context ids and as many labels".into(),
                ));
            }
            if let Some(&bad) = ids.iter().find(|&&x| x as usize >= cfg.vocab_size) {
                return Err(EngineError::Invalid(format!(
                    "token id {bad} is outside the vocabulary"
                )));
            }
        }
        let longest = seqs.iter().map(|(ids, _)| ids.len()).max().unwrap_or(1);
        let tb = bucket(longest, cfg.max_position_embeddings);
        if tb > self.plan.t {
            return Err(EngineError::Invalid(format!(
                "a sequence of {longest} tokens is longer than the {} the memory plan was made for",
                self.plan.t
            )));
        }
        let n = seqs.len();
        // Sequence i fills rows [i*tb, (i+1)*tb); the loss targets are shifted within each sequence.
        let (mut ids_p, mut targets, mut dnll, mut predicted) = (vec![], vec![], vec![], vec![]);
        for (ids, labels) in seqs {
            let mut ip = ids.to_vec();
            ip.resize(tb, 0);
            let mut lp = labels.to_vec();
            lp.resize(tb, -100);
            let lt = crate::train::loss_targets(&lp, cfg.vocab_size, weight)?;
            ids_p.extend(ip);
            targets.extend(lt.targets);
            dnll.extend(lt.dnll);
            // Padding rows predict nothing (their labels are -100), so they never count.
            predicted.extend(lt.predicted);
        }
        let mut slot = self.scratch.borrow_mut();
        if slot.as_ref().map(|s| (s.t, s.n)) != Some((tb, n)) {
            // Free the previous bucket's buffers first (its bytes leave the tracker with it).
            *slot = None;
            *slot = Some(self.build(tb, n)?);
        }
        let sc = slot
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("training buffers missing".into()))?;
        g.queue.write_buffer(&sc.tokens, 0, bytemuck::cast_slice(&ids_p));
        if self.host.is_some() {
            // The embedding's rows, gathered on the host in f32 (exact: the device f32 path gives the same).
            let c = cfg.hidden_size;
            let mut x0 = vec![0f32; ids_p.len() * c];
            cpu::embedding(&mut x0, &ids_p, &self.model.embed);
            g.queue.write_buffer(&sc.x0, 0, f32_bytes(&x0));
        }
        g.queue.write_buffer(&sc.targets, 0, bytemuck::cast_slice(&targets));
        g.queue.write_buffer(&sc.dnll, 0, f32_bytes(&dnll));
        let rows = (n * tb) as u32;
        if backward {
            self.run(&sc.items, rows)?;
        } else {
            self.run(&sc.items[..sc.fwd_len], rows)?;
            self.run(&sc.eval_tail, rows)?;
        }
        let nll: Vec<f32> = bytemuck::pod_collect_to_vec(&g.download(&sc.nll, 4 * rows as u64)?);
        Ok((0..n * tb).filter(|&i| predicted[i]).map(|i| nll[i] as f64).sum())
    }

    /// Allocates the buffers of `n` sequences of a `tb`-token bucket and records their forward and
    /// backward: every kernel sees `n * tb` rows, and `Step::seq = tb` keeps RoPE positions and attention
    /// within each sequence (sequence i in KV slot i).
    fn build(&self, tb: usize, n: usize) -> Result<Scratch> {
        let g = &*self.gpu;
        let before = g.allocated();
        let cfg = &self.model.config;
        let d = Dims::new(cfg, self.rank);
        let (c, f, v) = (d.c, d.f, d.v);
        let (nh, hd, qd, kvd, w) = (d.nh, d.hd, d.qd, d.kvd, d.w);
        let eps = cfg.rms_norm_eps as f32;
        let r = self.rank;
        let nl = self.layers.len();
        let t = tb * n;
        let buf = |name: &str, n: usize| g.storage(name, (4 * n) as u64);
        let step = g.uniform(
            "step",
            bytemuck::bytes_of(&Step {
                t: t as u32,
                lm_t: t as u32,
                seq: tb as u32,
                ..Default::default()
            }),
        );
        let tokens = buf("tokens", t)?;
        let targets_b = buf("targets", t)?;
        let dnll_b = buf("dnll", t)?;
        let sampled = buf("sampled", 1)?;
        // Positions run 0..tb in every sequence.
        let (cos, sin) = cpu::rope_table(cfg.rope_theta, hd, tb);
        let (cos_b, sin_b) = (
            g.storage_init("cos", f32_bytes(&cos))?,
            g.storage_init("sin", f32_bytes(&sin))?,
        );
        // Layer inputs are kept for every layer; the per-layer activations for every layer, or (with
        // gradient checkpointing) for one layer, recomputed from its input just before its backward.
        let xs: Vec<wgpu::Buffer> = (0..=nl).map(|_| buf("x", t * c)).collect::<Result<_>>()?;
        let sets = if self.plan.checkpoint { 1 } else { nl };
        let mut acts = vec![];
        for _ in 0..sets {
            acts.push(Acts {
                n1: buf("n1", t * c)?,
                qkv: buf("qkv", t * w)?,
                kc: buf("kc", t * kvd)?,
                vc: buf("vc", t * kvd)?,
                att: buf("att", t * qd)?,
                a2: buf("a2", t * qd)?,
                h: buf("h", t * c)?,
                n2: buf("n2", t * c)?,
                g: buf("g", t * f)?,
                u: buf("u", t * f)?,
                m: buf("m", t * f)?,
                m2: buf("m2", t * f)?,
                lh: (0..7).map(|_| buf("lora_h", t * r.max(1))).collect::<Result<_>>()?,
            });
        }
        let xr = if self.plan.checkpoint {
            Some(buf("x_recompute", t * c)?)
        } else {
            None
        };
        let sh = Shared {
            xq: g.storage("xq", (t * d.widest()) as u64)?,
            xsc: buf("xs", t)?,
            qsum: buf("qsum", t)?,
            cos: cos_b,
            sin: sin_b,
        };
        let xf = buf("xf", t * c)?;
        let chunk = self.plan.head_chunk.min(t);
        let logits = buf("logits", chunk * v)?;
        let dlogits = buf("dlogits", chunk * v)?;
        let nll_b = buf("nll", t)?;
        let bw = Grads {
            dres: buf("dres", t * c)?,
            dh: buf("dh", t * c)?,
            dm2: buf("dm2", t * f)?,
            dm: buf("dm", t * f)?,
            dg: buf("dg", t * f)?,
            du: buf("du", t * f)?,
            dn2: buf("dn2", t * c)?,
            da2: buf("da2", t * qd)?,
            datt: buf("datt", t * qd)?,
            dqkv: buf("dqkv", t * w)?,
            dn1: buf("dn1", t * c)?,
            stats: buf("stats", t * nh * 4)?,
            dlh: buf("dlora_h", t * r.max(1))?,
        };
        let dxf = buf("dxf", t * c)?;

        let mut items: Vec<Item> = vec![];
        let op = |o: Op| Item::Op(o, t as u32);
        for tile in &self.embed {
            items.push(op(k::embedding(
                g,
                self.plan.embed_f16,
                c,
                tile,
                &tokens,
                &sampled,
                &xs[0],
                &step,
            )));
        }
        for li in 0..nl {
            let a = &acts[if self.plan.checkpoint { 0 } else { li }];
            items.extend(self.layer_forward(li, t, tb, &xs[li], &xs[li + 1], a, &sh, &step));
        }
        // The head in token chunks: logits, NLL, dlogits and dxf for `chunk` rows at a time.
        let xl = &xs[nl];
        items.push(op(k::rmsnorm(g, c, eps, &self.norm, xl, &xf, &step)));
        let head: &[MatrixTile] = match &self.host {
            Some(h) => &h.views,
            None => self.head.as_deref().unwrap_or(&self.embed),
        };
        // Host-resident head: each tile's ops follow the upload of its rows.
        let host = self.host.is_some();
        let f16 = self.plan.embed_f16;
        let fwd_len = items.len();
        let mut eval_tail = vec![];
        let mut c0 = 0;
        let mut chunk_steps = vec![];
        while c0 < t {
            let rows = chunk.min(t - c0);
            let cs = g.uniform(
                "step",
                bytemuck::bytes_of(&Step {
                    t: t as u32,
                    lm_t0: c0 as u32,
                    lm_t: rows as u32,
                    seq: tb as u32,
                    ..Default::default()
                }),
            );
            let hop = |o: Op| Item::Op(o, rows as u32);
            for (i, tile) in head.iter().enumerate() {
                if host {
                    items.push(Item::Upload(i));
                    eval_tail.push(Item::Upload(i));
                }
                items.push(hop(k::lm_head_tiled(g, f16, c, v, tile, &xf, &logits, &cs)));
                eval_tail.push(hop(k::lm_head_tiled(g, f16, c, v, tile, &xf, &logits, &cs)));
            }
            items.push(hop(k::nll(g, v, &logits, &targets_b, &nll_b, &cs)));
            eval_tail.push(hop(k::nll(g, v, &logits, &targets_b, &nll_b, &cs)));
            items.push(hop(k::nll_backward(g, v, &logits, &targets_b, &dnll_b, &dlogits, &cs)));
            for (i, tile) in head.iter().enumerate() {
                if host {
                    items.push(Item::Upload(i));
                }
                items.push(hop(k::lm_head_backward(g, f16, c, v, tile, i > 0, &dlogits, &dxf, &cs)));
            }
            chunk_steps.push(cs);
            c0 += rows;
        }
        items.push(op(k::rmsnorm_backward(
            g, c, eps, false, &self.norm, xl, &dxf, &bw.dres, &step,
        )));
        for li in (0..nl).rev() {
            let a = if self.plan.checkpoint {
                let (a, xr) = (&acts[0], xr.as_ref().unwrap_or(&xf));
                items.extend(self.layer_forward(li, t, tb, &xs[li], xr, a, &sh, &step));
                a
            } else {
                &acts[li]
            };
            items.extend(self.layer_backward(li, t, tb, &xs[li], a, &bw, &sh, &step));
        }
        let bytes = g.allocated().saturating_sub(before);
        Ok(Scratch {
            t: tb,
            n,
            x0: xs[0].clone(),
            tokens,
            targets: targets_b,
            dnll: dnll_b,
            nll: nll_b,
            items,
            fwd_len,
            eval_tail,
            bytes,
            gpu: self.gpu.clone(),
            _keep: (acts, xs, chunk_steps, step),
        })
    }

    fn shape(
        &self,
        li: usize,
        ti: usize,
        x_stride: usize,
        y_stride: usize,
        y_off: usize,
    ) -> Option<(&GpuLora, LoraShape)> {
        self.lora[li][ti].as_ref().map(|p| {
            (
                p,
                LoraShape {
                    inp: p.inp,
                    out: p.out,
                    rank: self.rank,
                    scale: self.scale,
                    x_stride,
                    y_stride,
                    y_off,
                },
            )
        })
    }

    /// One decoder layer forward, x -> xn, keeping what its backward reads in `a`: `t` rows, sequences of
    /// `tb` (the K/V buffers hold one slot of `tb` positions per sequence).
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        li: usize,
        t: usize,
        tb: usize,
        x: &wgpu::Buffer,
        xn: &wgpu::Buffer,
        a: &Acts,
        s: &Shared,
        step: &wgpu::Buffer,
    ) -> Vec<Item> {
        let g = &*self.gpu;
        let d = Dims::new(&self.model.config, self.rank);
        let (c, f, nh, nkv, hd, qd, kvd, w) = (d.c, d.f, d.nh, d.nkv, d.hd, d.qd, d.kvd, d.w);
        let eps = self.model.config.rms_norm_eps as f32;
        let act = self.model.config.activation;
        let lw = &self.layers[li];
        let tt = t as u32;
        // 128-token blocks once there are enough rows to fill the GPU with them (micro-batches), else 64.
        let tm = if t >= 1024 { 128 } else { 64 };
        let mut out: Vec<Item> = vec![];
        let mut ops: Vec<Op> = vec![];
        let quant = |n: usize, wt: &wgpu::Buffer, xin: &wgpu::Buffer| {
            k::rmsnorm_quant(g, n, eps, wt, xin, &s.xq, &s.xsc, &s.qsum, step)
        };
        ops.push(k::rmsnorm(g, c, eps, &lw.input_layernorm, x, &a.n1, step));
        ops.push(quant(c, &lw.input_layernorm, x));
        for tile in &lw.qkv {
            ops.push(k::matmul_ternary_tiled(
                g, tile, 0, 0, w, &s.xq, &s.xsc, &s.qsum, &a.qkv, step, tm,
            ));
        }
        for (ti, off) in [(0usize, 0usize), (1, qd), (2, qd + kvd)] {
            if let Some((p, sh)) = self.shape(li, ti, c, w, off) {
                ops.extend(k::lora(g, &sh, &a.n1, &p.a, &p.b, &a.lh[ti], &a.qkv, step));
            }
        }
        ops.push(k::rope(g, nh, nkv, hd, tb, &s.cos, &s.sin, &a.qkv, &a.kc, &a.vc, step));
        ops.push(k::attention(g, nh, nkv, hd, tb, &a.qkv, &a.kc, &a.vc, &a.att, step));
        ops.push(k::rmsnorm(g, qd, eps, &lw.attn_sub_norm, &a.att, &a.a2, step));
        ops.push(quant(qd, &lw.attn_sub_norm, &a.att));
        out.extend(ops.drain(..).map(|o| Item::Op(o, tt)));
        // h = x + o(a2): copy the residual, then the projection and its LoRA branch add onto it.
        out.push(Item::Copy(x.clone(), a.h.clone(), (4 * t * c) as u64));
        for tile in &lw.o {
            ops.push(k::matmul_ternary_tiled(
                g, tile, 1, 0, c, &s.xq, &s.xsc, &s.qsum, &a.h, step, tm,
            ));
        }
        if let Some((p, sh)) = self.shape(li, 3, qd, c, 0) {
            ops.extend(k::lora(g, &sh, &a.a2, &p.a, &p.b, &a.lh[3], &a.h, step));
        }
        ops.push(k::rmsnorm(g, c, eps, &lw.post_attention_layernorm, &a.h, &a.n2, step));
        ops.push(quant(c, &lw.post_attention_layernorm, &a.h));
        for tile in &lw.gate {
            ops.push(k::matmul_ternary_tiled(
                g, tile, 0, 0, f, &s.xq, &s.xsc, &s.qsum, &a.g, step, tm,
            ));
        }
        for tile in &lw.up {
            ops.push(k::matmul_ternary_tiled(
                g, tile, 0, 0, f, &s.xq, &s.xsc, &s.qsum, &a.u, step, tm,
            ));
        }
        if let Some((p, sh)) = self.shape(li, 4, c, f, 0) {
            ops.extend(k::lora(g, &sh, &a.n2, &p.a, &p.b, &a.lh[4], &a.g, step));
        }
        if let Some((p, sh)) = self.shape(li, 5, c, f, 0) {
            ops.extend(k::lora(g, &sh, &a.n2, &p.a, &p.b, &a.lh[5], &a.u, step));
        }
        ops.push(k::gated_mul(g, act, f, &a.g, &a.u, &a.m, step));
        ops.push(k::rmsnorm(g, f, eps, &lw.ffn_sub_norm, &a.m, &a.m2, step));
        ops.push(quant(f, &lw.ffn_sub_norm, &a.m));
        out.extend(ops.drain(..).map(|o| Item::Op(o, tt)));
        out.push(Item::Copy(a.h.clone(), xn.clone(), (4 * t * c) as u64));
        for tile in &lw.down {
            ops.push(k::matmul_ternary_tiled(
                g, tile, 1, 0, c, &s.xq, &s.xsc, &s.qsum, xn, step, tm,
            ));
        }
        if let Some((p, sh)) = self.shape(li, 6, f, c, 0) {
            ops.extend(k::lora(g, &sh, &a.m2, &p.a, &p.b, &a.lh[6], xn, step));
        }
        out.extend(ops.drain(..).map(|o| Item::Op(o, tt)));
        out
    }

    /// One decoder layer backward: reads the residual gradient in `bw.dres` (the layer's output gradient)
    /// and leaves its input gradient there; LoRA gradients accumulate into the adapter's buffers.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        li: usize,
        t: usize,
        tb: usize,
        x: &wgpu::Buffer,
        a: &Acts,
        bw: &Grads,
        s: &Shared,
        step: &wgpu::Buffer,
    ) -> Vec<Item> {
        let g = &*self.gpu;
        let d = Dims::new(&self.model.config, self.rank);
        let (c, f, nh, nkv, hd, qd, kvd, w) = (d.c, d.f, d.nh, d.nkv, d.hd, d.qd, d.kvd, d.w);
        let eps = self.model.config.rms_norm_eps as f32;
        let act = self.model.config.activation;
        let lw = &self.layers[li];
        let tt = t as u32;
        let mut out: Vec<Item> = vec![];
        let mut ops: Vec<Op> = vec![];
        let lora_bw = |ti: usize,
                       xin: &wgpu::Buffer,
                       x_stride: usize,
                       dy: &wgpu::Buffer,
                       y_stride: usize,
                       y_off: usize,
                       dx: &wgpu::Buffer|
         -> Vec<Op> {
            match self.shape(li, ti, x_stride, y_stride, y_off) {
                Some((p, sh)) => {
                    k::lora_backward(g, &sh, xin, &p.a, &p.b, &a.lh[ti], dy, &bw.dlh, &p.da, &p.db, dx, step).into()
                }
                None => vec![],
            }
        };
        // MLP: y = h + down(ffn_sub_norm(act(gate(n2)) * up(n2)))
        for (n, tile) in lw.down.iter().enumerate() {
            ops.push(k::matmul_ternary_backward(g, tile, c, n > 0, &bw.dres, &bw.dm2, step));
        }
        ops.extend(lora_bw(6, &a.m2, f, &bw.dres, c, 0, &bw.dm2));
        ops.push(k::rmsnorm_backward(
            g,
            f,
            eps,
            false,
            &lw.ffn_sub_norm,
            &a.m,
            &bw.dm2,
            &bw.dm,
            step,
        ));
        ops.push(k::gated_mul_backward(
            g, act, f, &bw.dm, &a.g, &a.u, &bw.dg, &bw.du, step,
        ));
        for (n, tile) in lw.gate.iter().enumerate() {
            ops.push(k::matmul_ternary_backward(g, tile, f, n > 0, &bw.dg, &bw.dn2, step));
        }
        for tile in &lw.up {
            ops.push(k::matmul_ternary_backward(g, tile, f, true, &bw.du, &bw.dn2, step));
        }
        ops.extend(lora_bw(4, &a.n2, c, &bw.dg, f, 0, &bw.dn2));
        ops.extend(lora_bw(5, &a.n2, c, &bw.du, f, 0, &bw.dn2));
        out.extend(ops.drain(..).map(|o| Item::Op(o, tt)));
        // dh = dres + rmsnorm_backward(...): copy the residual's gradient, then add onto it.
        out.push(Item::Copy(bw.dres.clone(), bw.dh.clone(), (4 * t * c) as u64));
        ops.push(k::rmsnorm_backward(
            g,
            c,
            eps,
            true,
            &lw.post_attention_layernorm,
            &a.h,
            &bw.dn2,
            &bw.dh,
            step,
        ));
        // Attention: h = x + o(attn_sub_norm(attention(rope(q(n1)), rope(k(n1)), v(n1))))
        for (n, tile) in lw.o.iter().enumerate() {
            ops.push(k::matmul_ternary_backward(g, tile, c, n > 0, &bw.dh, &bw.da2, step));
        }
        ops.extend(lora_bw(3, &a.a2, qd, &bw.dh, c, 0, &bw.da2));
        ops.push(k::rmsnorm_backward(
            g,
            qd,
            eps,
            false,
            &lw.attn_sub_norm,
            &a.att,
            &bw.da2,
            &bw.datt,
            step,
        ));
        ops.extend(k::attention_backward(
            g, nh, nkv, hd, tb, w, w, &a.qkv, &a.kc, &a.vc, &a.att, &bw.datt, &bw.stats, &bw.dqkv, step,
        ));
        ops.push(k::rope_backward(g, nh, hd, w, 0, &s.cos, &s.sin, &bw.dqkv, step));
        ops.push(k::rope_backward(g, nkv, hd, w, qd, &s.cos, &s.sin, &bw.dqkv, step));
        for (n, tile) in lw.qkv.iter().enumerate() {
            ops.push(k::matmul_ternary_backward(g, tile, w, n > 0, &bw.dqkv, &bw.dn1, step));
        }
        ops.extend(lora_bw(0, &a.n1, c, &bw.dqkv, w, 0, &bw.dn1));
        ops.extend(lora_bw(1, &a.n1, c, &bw.dqkv, w, qd, &bw.dn1));
        ops.extend(lora_bw(2, &a.n1, c, &bw.dqkv, w, qd + kvd, &bw.dn1));
        out.extend(ops.drain(..).map(|o| Item::Op(o, tt)));
        // dx = dh + rmsnorm_backward(...), which becomes the next (lower) layer's residual gradient.
        out.push(Item::Copy(bw.dh.clone(), bw.dres.clone(), (4 * t * c) as u64));
        out.push(Item::Op(
            k::rmsnorm_backward(g, c, eps, true, &lw.input_layernorm, x, &bw.dn1, &bw.dres, step),
            tt,
        ));
        out
    }
}

/// Activations of one layer that its backward reads.
struct Acts {
    n1: wgpu::Buffer,
    qkv: wgpu::Buffer,
    kc: wgpu::Buffer,
    vc: wgpu::Buffer,
    att: wgpu::Buffer,
    a2: wgpu::Buffer,
    h: wgpu::Buffer,
    n2: wgpu::Buffer,
    g: wgpu::Buffer,
    u: wgpu::Buffer,
    m: wgpu::Buffer,
    m2: wgpu::Buffer,
    lh: Vec<wgpu::Buffer>,
}

/// Scratch shared by every layer: the int8 activations of the current projection and the RoPE tables.
struct Shared {
    xq: wgpu::Buffer,
    xsc: wgpu::Buffer,
    qsum: wgpu::Buffer,
    cos: wgpu::Buffer,
    sin: wgpu::Buffer,
}

/// Gradient buffers of the backward, reused by every layer.
struct Grads {
    dres: wgpu::Buffer,
    dh: wgpu::Buffer,
    dm2: wgpu::Buffer,
    dm: wgpu::Buffer,
    dg: wgpu::Buffer,
    du: wgpu::Buffer,
    dn2: wgpu::Buffer,
    da2: wgpu::Buffer,
    datt: wgpu::Buffer,
    dqkv: wgpu::Buffer,
    dn1: wgpu::Buffer,
    stats: wgpu::Buffer,
    dlh: wgpu::Buffer,
}

/// The buffers and recorded work of one sequence bucket. Dropping it frees the buffers (wgpu frees them
/// when the last handle goes) and takes their bytes off the tracker.
struct Scratch {
    /// The bucket (rows per sequence) and the number of sequences.
    t: usize,
    n: usize,
    /// The first layer's input (written from the host when the embedding stays there).
    x0: wgpu::Buffer,
    tokens: wgpu::Buffer,
    targets: wgpu::Buffer,
    dnll: wgpu::Buffer,
    nll: wgpu::Buffer,
    items: Vec<Item>,
    /// `items[..fwd_len]` is the forward up to the final norm; with `eval_tail` it scores without a backward.
    fwd_len: usize,
    eval_tail: Vec<Item>,
    bytes: u64,
    gpu: Arc<Gpu>,
    _keep: (Vec<Acts>, Vec<wgpu::Buffer>, Vec<wgpu::Buffer>, wgpu::Buffer),
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.gpu.release(self.bytes);
    }
}

/// Model dimensions the trainer's buffers are sized by.
struct Dims {
    c: usize,
    f: usize,
    v: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    qd: usize,
    kvd: usize,
    w: usize,
    r: usize,
    nl: usize,
}

impl Dims {
    fn new(cfg: &crate::config::ModelConfig, rank: usize) -> Dims {
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        Dims {
            c: cfg.hidden_size,
            f: cfg.intermediate_size,
            v: cfg.vocab_size,
            nh,
            nkv,
            hd,
            qd: nh * hd,
            kvd: nkv * hd,
            w: nh * hd + 2 * nkv * hd,
            r: rank.max(1),
            nl: cfg.num_layers,
        }
    }

    fn widest(&self) -> usize {
        self.c.max(self.f).max(self.qd)
    }

    /// Bytes of the buffers `build` allocates for `n` sequences of a bucket of `tb` tokens (mirrors it line
    /// by line; a test holds the two together).
    fn activation_bytes(&self, tb: usize, n: usize, checkpoint: bool, chunk: usize) -> u64 {
        let f4 = |n: usize| (4 * n).max(16) as u64;
        let (c, f, w, qd, kvd, r, nl) = (self.c, self.f, self.w, self.qd, self.kvd, self.r, self.nl);
        let t = tb * n;
        let mut b = 3 * f4(t) + f4(1) + 2 * f4(tb * (self.hd / 2));
        b += (nl as u64 + 1) * f4(t * c);
        let per_layer = 3 * f4(t * c) + f4(t * w) + 2 * f4(t * kvd) + 2 * f4(t * qd) + 4 * f4(t * f) + 7 * f4(t * r);
        b += per_layer * if checkpoint { 1 } else { nl as u64 };
        if checkpoint {
            b += f4(t * c);
        }
        b += (t * self.widest()).max(16).div_ceil(4) as u64 * 4 + 2 * f4(t) + f4(t * c);
        let chunk = chunk.min(t);
        b += 2 * f4(chunk * self.v) + f4(t);
        b += 3 * f4(t * c) + 4 * f4(t * f) + 2 * f4(t * qd) + f4(t * w) + f4(t * c) + f4(t * self.nh * 4) + f4(t * r);
        b += f4(t * c);
        b
    }
}

/// `t` rounded up to the 64-token tiles of the GEMM kernels (and never past the context).
pub fn bucket(t: usize, ctx: usize) -> usize {
    (t.div_ceil(64) * 64).min(ctx).max(t)
}

/// What the planner chose and the device memory it predicts, in bytes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemoryPlan {
    /// Tokens per sequence the buffers are sized for (the longest sequence, rounded up to 64).
    pub t: usize,
    /// Sequences per pass: a micro-batch of this many runs as one batch of `micro_batch * t` rows.
    pub micro_batch: usize,
    /// Gradient checkpointing: keep only each layer's input and recompute the layer before its backward.
    pub checkpoint: bool,
    /// Tokens per head chunk (chunk x vocabulary logits live at once).
    pub head_chunk: usize,
    /// Embedding (and tied head) stored in f16 on the device.
    pub embed_f16: bool,
    /// The embedding and head stay in host memory (f16 head tiles streamed through the device; see
    /// `HostHead`): the last resort of small devices, since every pass uploads the head twice.
    pub embed_host: bool,
    /// Head rows per host tile (0 when the embedding is on the device).
    pub host_tile_rows: usize,
    pub weights: u64,
    /// LoRA parameters, their gradients and both AdamW moments.
    pub adapter: u64,
    pub activations: u64,
    /// Uniform buffers of the recorded dispatches (a few bytes each).
    pub other: u64,
    pub total: u64,
    /// The budget the plan was made against, if any.
    pub budget: Option<u64>,
}

/// Where the trainer keeps the embedding (and the head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Embedding {
    /// f32 on the device, as the float32 references compute (exact for bf16/f16 checkpoints too).
    F32,
    /// f16 on the device.
    F16,
    /// In host memory: rows gathered on the host, the head streamed through the device in f16 tiles.
    Host,
}

/// Predicts the trainer's device memory for micro-batches of `batch` sequences of up to `seq_len` tokens
/// and picks the fastest settings that fit `budget`, in this order of preference:
/// - the embedding in f32 on the device, else in f16, else in host memory (`Embedding`);
/// - all `batch` sequences in one pass, else the largest micro-batch that fits (halving down to 1): one
///   pass over 4 x 512 rows runs every dispatch once instead of four times, which is worth more than
///   skipping the recomputation, so a smaller micro-batch is taken only when checkpointing cannot save
///   the larger one;
/// - without gradient checkpointing if possible, else with it;
/// - the whole head at once if possible, else in halving token chunks down to 16.
///
/// Errors, before anything is allocated on the device, when even the leanest settings (one sequence per
/// pass) do not fit.
pub fn plan(model: &Model, adapter: &Adapter, seq_len: usize, batch: usize, budget: Option<u64>) -> Result<MemoryPlan> {
    let t = bucket(seq_len.max(1), model.config.max_position_embeddings);
    let mut micros = vec![batch.max(1)];
    while let Some(&m) = micros.last().filter(|&&m| m > 1) {
        micros.push(m / 2);
    }
    let mut leanest: Option<MemoryPlan> = None;
    // f32 first: the embedding is what the references use (exact for bf16/f16 checkpoints too).
    for embed in [Embedding::F32, Embedding::F16, Embedding::Host] {
        for &micro in &micros {
            let rows = micro * t;
            let mut chunks = vec![rows];
            let mut ch = rows;
            while ch > 16 {
                ch = ch.div_ceil(2);
                chunks.push(ch);
            }
            for checkpoint in [false, true] {
                for &chunk in &chunks {
                    let mut p = estimate(model, adapter, seq_len, micro, checkpoint, chunk, embed);
                    p.budget = budget;
                    if budget.is_none_or(|b| p.total <= b) {
                        return Ok(p);
                    }
                    if leanest.as_ref().is_none_or(|l| p.total < l.total) {
                        leanest = Some(p);
                    }
                }
            }
        }
    }
    let l = leanest.ok_or_else(|| EngineError::Invalid("no memory plan".into()))?;
    Err(EngineError::OutOfMemory(format!(
        "fine-tuning this model at --seq-len {seq_len} and rank {} needs at least {} of device memory \
         (weights {}, adapter and optimizer state {}, activations {} with gradient checkpointing, {}-token \
         head chunks, one sequence per pass and the embedding {}), but the budget is {}; lower --seq-len \
         or --rank, adapt fewer --targets, or raise --max-memory",
        adapter.rank,
        crate::util::human_bytes(l.total),
        crate::util::human_bytes(l.weights),
        crate::util::human_bytes(l.adapter),
        crate::util::human_bytes(l.activations),
        l.head_chunk,
        if l.embed_host { "in host memory" } else { "in f16" },
        crate::util::human_bytes(budget.unwrap_or(0)),
    )))
}

/// The device memory the trainer allocates for `micro_batch` sequences of up to `seq_len` tokens per
/// pass with the given settings (`budget` unset). [`plan`] chooses among these.
pub fn estimate(
    model: &Model,
    adapter: &Adapter,
    seq_len: usize,
    micro_batch: usize,
    checkpoint: bool,
    head_chunk: usize,
    embed: Embedding,
) -> MemoryPlan {
    let cfg = &model.config;
    let d = Dims::new(cfg, adapter.rank);
    let t = bucket(seq_len.max(1), cfg.max_position_embeddings);
    let f4 = |n: usize| (4 * n).max(16) as u64;
    let mut weights = 0u64;
    for _ in 0..cfg.num_layers {
        for (out, inp) in model.projection_shapes() {
            // Packed 2-bit rows plus one f32 scale per row (q|k|v share tiles; the sum is the same).
            weights += (out * inp / 4) as u64 + 4 * out as u64;
        }
        weights += 2 * f4(d.c) + f4(d.qd) + f4(d.f);
    }
    weights += f4(d.c);
    let embed_f16 = embed != Embedding::F32;
    let embed_host = embed == Embedding::Host;
    if !embed_host {
        let table = (d.v * d.c * if embed_f16 { 2 } else { 4 }) as u64;
        weights += table * if model.tied() { 1 } else { 2 };
    }
    let adapter_bytes: u64 = adapter.pairs().map(|p| 4 * (f4(p.a.len()) + f4(p.b.len()))).sum();
    // Uniforms: a 32-byte parameter block per recorded dispatch (about 150 per layer with recomputation).
    let other = (d.nl as u64 * 150 + 64) * 64;
    let micro_batch = micro_batch.max(1);
    let mut activations = d.activation_bytes(t, micro_batch, checkpoint, head_chunk);
    let mut tile_rows = 0;
    if embed_host {
        // The device buffer the head's tiles stream through (HOST_TILE_BYTES is below any binding limit
        // the trainer runs with).
        tile_rows = host_tile_rows(u64::MAX, d.c).min(d.v);
        activations += f4(2 * tile_rows * d.c);
    }
    MemoryPlan {
        t,
        micro_batch,
        checkpoint,
        head_chunk: head_chunk.min(t * micro_batch),
        embed_f16,
        embed_host,
        host_tile_rows: tile_rows,
        weights,
        adapter: adapter_bytes,
        activations,
        other,
        total: weights + adapter_bytes + activations + other,
        budget: None,
    }
}
