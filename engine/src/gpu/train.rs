//! LoRA training on wgpu: the forward pass with the activations the backward needs, then the hand-written
//! backward, all in WGSL kernels (each checked against its CPU twin), with the LoRA gradients accumulated on
//! the device. Its oracle is the CPU reference trainer (`crate::train::CpuTrainer`), which is itself checked
//! against PEFT; a test compares the two on the PEFT fixture.
//!
//! Layout per layer follows the inference forward (fused q|k|v projection output, RoPE writing K/V into a
//! per-layer cache), except that gate and up stay separate: the LoRA branches add to them and the backward
//! reads them. This first version keeps every layer's activations for one sequence; gradient checkpointing
//! and the memory planner come next.
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

/// One step of a recorded sequence: a dispatch, or a buffer copy between dispatches.
enum Item<'a> {
    Op(Op),
    Copy(&'a wgpu::Buffer, &'a wgpu::Buffer, u64),
}

pub struct GpuTrainer {
    gpu: Arc<Gpu>,
    model: Arc<Model>,
    embed: Vec<MatrixTile>,
    /// `None` when the embedding is tied: the head reads the embedding's tiles (one copy on the device).
    head: Option<Vec<MatrixTile>>,
    norm: wgpu::Buffer,
    layers: Vec<LayerWeights>,
    lora: Vec<Vec<Option<GpuLora>>>,
    rank: usize,
    scale: f32,
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

impl GpuTrainer {
    pub fn new(model: Arc<Model>, gpu: Arc<Gpu>, adapter: &Adapter) -> Result<GpuTrainer> {
        let g = &gpu;
        // f32 tables: training compares against float32 references, and the embedding is read once per step.
        let embed = k::matrix_tiles(g, &model.embed, false)?;
        let head = if model.tied() {
            None
        } else {
            Some(k::matrix_tiles(g, model.head(), false)?)
        };
        let mut layers = vec![];
        for l in &model.layers {
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
            head,
            norm,
            layers,
            lora,
            rank: adapter.rank,
            scale: adapter.scale(),
        })
    }

    pub fn device_name(&self) -> String {
        self.gpu.name()
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

    /// The optimizer step: global-norm clipping (the norm is taken over the downloaded gradients; a device
    /// reduction comes with the performance work), AdamW on every LoRA tensor, gradients cleared for the
    /// next step. Returns the gradient norm before clipping.
    pub fn apply(
        &self,
        like: &Adapter,
        o: &crate::cpu::AdamW,
        lr: f64,
        step: u64,
        max_norm: Option<f32>,
    ) -> Result<f32> {
        let g = &*self.gpu;
        let grads = self.grads(like)?;
        let norm = cpu::grad_norm(grads.pairs().flat_map(|p| [&p.a[..], &p.b[..]]));
        let gscale = max_norm.map_or(1.0, |m| cpu::clip_coef(norm, m));
        let stepb = g.uniform("step", bytemuck::bytes_of(&Step::default()));
        let mut ops = vec![];
        for p in self.lora.iter().flatten().flatten() {
            let (na, nb) = (self.rank * p.inp, p.out * self.rank);
            ops.push(k::adamw(g, na, o, lr, step, gscale, &p.a, &p.ma, &p.va, &p.da, &stepb));
            ops.push(k::adamw(g, nb, o, lr, step, gscale, &p.b, &p.mb, &p.vb, &p.db, &stepb));
        }
        let mut enc = g.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("adamw"),
                timestamp_writes: None,
            });
            for op in &ops {
                op.record(&mut pass, 1, 1);
            }
        }
        for p in self.lora.iter().flatten().flatten() {
            enc.clear_buffer(&p.da, 0, None);
            enc.clear_buffer(&p.db, 0, None);
        }
        g.queue.submit([enc.finish()]);
        g.check_error()?;
        Ok(norm)
    }

    /// Records and submits the items; `t` sizes the token grids (the lm_head reads all T rows).
    fn run(&self, items: &[Item<'_>], t: u32) -> Result<()> {
        let g = &self.gpu;
        let mut enc = g.device.create_command_encoder(&Default::default());
        let mut i = 0;
        while i < items.len() {
            match &items[i] {
                Item::Copy(src, dst, n) => {
                    enc.copy_buffer_to_buffer(src, 0, dst, 0, *n);
                    i += 1;
                }
                Item::Op(_) => {
                    // Consecutive dispatches share one pass (wgpu orders them and makes writes visible).
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("train"),
                        timestamp_writes: None,
                    });
                    while let Some(Item::Op(op)) = items.get(i) {
                        op.record(&mut pass, t, t);
                        i += 1;
                    }
                }
            }
        }
        g.queue.submit([enc.finish()]);
        g.check_error()
    }

    /// Forward and backward of one sequence, as `CpuTrainer::sequence` (same label convention and weight),
    /// accumulating `weight * dNLL/dLoRA` into the device gradients. Returns the sum of the NLLs of the
    /// predicted positions.
    pub fn sequence(&self, ids: &[u32], labels: &[i32], weight: f32) -> Result<f64> {
        let g = &*self.gpu;
        let cfg = &self.model.config;
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
        let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let w = qd + 2 * kvd;
        let eps = cfg.rms_norm_eps as f32;
        let r = self.rank;
        let nl = self.layers.len();
        let buf = |name: &str, n: usize| g.storage(name, (4 * n) as u64);

        let crate::train::LossTargets {
            targets,
            dnll,
            predicted,
        } = crate::train::loss_targets(labels, v, weight)?;
        let step = g.uniform(
            "step",
            bytemuck::bytes_of(&Step {
                t: t as u32,
                lm_t: t as u32,
                ..Default::default()
            }),
        );
        let tokens = g.storage_init("tokens", bytemuck::cast_slice(ids))?;
        let targets_b = g.storage_init("targets", bytemuck::cast_slice(&targets))?;
        let dnll_b = g.storage_init("dnll", f32_bytes(&dnll))?;
        let sampled = buf("sampled", 1)?;
        let (cos, sin) = cpu::rope_table(cfg.rope_theta, hd, t);
        let (cos_b, sin_b) = (
            g.storage_init("cos", f32_bytes(&cos))?,
            g.storage_init("sin", f32_bytes(&sin))?,
        );

        // Saved activations, per layer.
        let xs: Vec<wgpu::Buffer> = (0..=nl).map(|_| buf("x", t * c)).collect::<Result<_>>()?;
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
        let mut acts = vec![];
        for _ in 0..nl {
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
        let widest = c.max(f).max(qd);
        let xq = g.storage("xq", (t * widest) as u64)?;
        let xsc = buf("xs", t)?;
        let qsum = buf("qsum", t)?;
        let xf = buf("xf", t * c)?;
        let logits = buf("logits", t * v)?;
        let nll_b = buf("nll", t)?;

        let mut items: Vec<Item<'_>> = vec![];
        // ---- forward ----
        for tile in &self.embed {
            items.push(Item::Op(k::embedding(
                g, false, c, tile, &tokens, &sampled, &xs[0], &step,
            )));
        }
        let shape = |li: usize, ti: usize, x_stride: usize, y_stride: usize, y_off: usize| {
            self.lora[li][ti].as_ref().map(|p| {
                (
                    p,
                    LoraShape {
                        inp: p.inp,
                        out: p.out,
                        rank: r,
                        scale: self.scale,
                        x_stride,
                        y_stride,
                        y_off,
                    },
                )
            })
        };
        let mut fwd: Vec<Item<'_>> = vec![];
        for (li, (lw, a)) in self.layers.iter().zip(&acts).enumerate() {
            let (x, xn) = (&xs[li], &xs[li + 1]);
            let mut ops: Vec<Op> = vec![];
            ops.push(k::rmsnorm(g, c, eps, &lw.input_layernorm, x, &a.n1, &step));
            ops.push(k::rmsnorm_quant(
                g,
                c,
                eps,
                &lw.input_layernorm,
                x,
                &xq,
                &xsc,
                &qsum,
                &step,
            ));
            for tile in &lw.qkv {
                ops.push(k::matmul_ternary(g, tile, 0, 0, w, &xq, &xsc, &qsum, &a.qkv, &step));
            }
            for (ti, off) in [(0usize, 0usize), (1, qd), (2, qd + kvd)] {
                if let Some((p, s)) = shape(li, ti, c, w, off) {
                    ops.extend(k::lora(g, &s, &a.n1, &p.a, &p.b, &a.lh[ti], &a.qkv, &step));
                }
            }
            ops.push(k::rope(g, nh, nkv, hd, t, &cos_b, &sin_b, &a.qkv, &a.kc, &a.vc, &step));
            ops.push(k::attention(g, nh, nkv, hd, t, &a.qkv, &a.kc, &a.vc, &a.att, &step));
            ops.push(k::rmsnorm(g, qd, eps, &lw.attn_sub_norm, &a.att, &a.a2, &step));
            ops.push(k::rmsnorm_quant(
                g,
                qd,
                eps,
                &lw.attn_sub_norm,
                &a.att,
                &xq,
                &xsc,
                &qsum,
                &step,
            ));
            fwd.extend(ops.drain(..).map(Item::Op));
            // h = x + o(a2): copy the residual, then the projection and its LoRA branch add onto it.
            fwd.push(Item::Copy(x, &a.h, (4 * t * c) as u64));
            for tile in &lw.o {
                ops.push(k::matmul_ternary(g, tile, 1, 0, c, &xq, &xsc, &qsum, &a.h, &step));
            }
            if let Some((p, s)) = shape(li, 3, qd, c, 0) {
                ops.extend(k::lora(g, &s, &a.a2, &p.a, &p.b, &a.lh[3], &a.h, &step));
            }
            ops.push(k::rmsnorm(g, c, eps, &lw.post_attention_layernorm, &a.h, &a.n2, &step));
            ops.push(k::rmsnorm_quant(
                g,
                c,
                eps,
                &lw.post_attention_layernorm,
                &a.h,
                &xq,
                &xsc,
                &qsum,
                &step,
            ));
            for tile in &lw.gate {
                ops.push(k::matmul_ternary(g, tile, 0, 0, f, &xq, &xsc, &qsum, &a.g, &step));
            }
            for tile in &lw.up {
                ops.push(k::matmul_ternary(g, tile, 0, 0, f, &xq, &xsc, &qsum, &a.u, &step));
            }
            if let Some((p, s)) = shape(li, 4, c, f, 0) {
                ops.extend(k::lora(g, &s, &a.n2, &p.a, &p.b, &a.lh[4], &a.g, &step));
            }
            if let Some((p, s)) = shape(li, 5, c, f, 0) {
                ops.extend(k::lora(g, &s, &a.n2, &p.a, &p.b, &a.lh[5], &a.u, &step));
            }
            ops.push(k::relu2_mul(g, f, &a.g, &a.u, &a.m, &step));
            ops.push(k::rmsnorm(g, f, eps, &lw.ffn_sub_norm, &a.m, &a.m2, &step));
            ops.push(k::rmsnorm_quant(
                g,
                f,
                eps,
                &lw.ffn_sub_norm,
                &a.m,
                &xq,
                &xsc,
                &qsum,
                &step,
            ));
            fwd.extend(ops.drain(..).map(Item::Op));
            fwd.push(Item::Copy(&a.h, xn, (4 * t * c) as u64));
            for tile in &lw.down {
                ops.push(k::matmul_ternary(g, tile, 1, 0, c, &xq, &xsc, &qsum, xn, &step));
            }
            if let Some((p, s)) = shape(li, 6, f, c, 0) {
                ops.extend(k::lora(g, &s, &a.m2, &p.a, &p.b, &a.lh[6], xn, &step));
            }
            fwd.extend(ops.drain(..).map(Item::Op));
        }
        items.extend(fwd);
        let xl = &xs[nl];
        let mut tail = vec![k::rmsnorm(g, c, eps, &self.norm, xl, &xf, &step)];
        let head = self.head.as_deref().unwrap_or(&self.embed);
        for tile in head {
            tail.push(k::lm_head(g, false, c, v, tile, &xf, &logits, &step));
        }
        tail.push(k::nll(g, v, &logits, &targets_b, &nll_b, &step));
        items.extend(tail.into_iter().map(Item::Op));

        // ---- backward ----
        let dlogits = buf("dlogits", t * v)?;
        let dxf = buf("dxf", t * c)?;
        let dres = buf("dres", t * c)?;
        let dh = buf("dh", t * c)?;
        let (dm2, dm, dg, du) = (
            buf("dm2", t * f)?,
            buf("dm", t * f)?,
            buf("dg", t * f)?,
            buf("du", t * f)?,
        );
        let dn2 = buf("dn2", t * c)?;
        let (da2, datt) = (buf("da2", t * qd)?, buf("datt", t * qd)?);
        let dqkv = buf("dqkv", t * w)?;
        let dn1 = buf("dn1", t * c)?;
        let stats = buf("stats", t * nh * 4)?;
        let dlh = buf("dlora_h", t * r.max(1))?;
        let mut bw: Vec<Op> = vec![k::nll_backward(g, v, &logits, &targets_b, &dnll_b, &dlogits, &step)];
        for (n, tile) in head.iter().enumerate() {
            bw.push(k::lm_head_backward(g, false, c, v, tile, n > 0, &dlogits, &dxf, &step));
        }
        bw.push(k::rmsnorm_backward(
            g, c, eps, false, &self.norm, xl, &dxf, &dres, &step,
        ));
        items.extend(bw.drain(..).map(Item::Op));
        let lora_bw = |li: usize,
                       ti: usize,
                       x: &wgpu::Buffer,
                       x_stride: usize,
                       dy: &wgpu::Buffer,
                       y_stride: usize,
                       y_off: usize,
                       dx: &wgpu::Buffer,
                       a: &Acts|
         -> Vec<Op> {
            match shape(li, ti, x_stride, y_stride, y_off) {
                Some((p, s)) => {
                    k::lora_backward(g, &s, x, &p.a, &p.b, &a.lh[ti], dy, &dlh, &p.da, &p.db, dx, &step).into()
                }
                None => vec![],
            }
        };
        for li in (0..nl).rev() {
            let (lw, a) = (&self.layers[li], &acts[li]);
            // MLP: y = h + down(ffn_sub_norm(relu2(gate(n2)) * up(n2)))
            for (n, tile) in lw.down.iter().enumerate() {
                bw.push(k::matmul_ternary_backward(g, tile, c, n > 0, &dres, &dm2, &step));
            }
            bw.extend(lora_bw(li, 6, &a.m2, f, &dres, c, 0, &dm2, a));
            bw.push(k::rmsnorm_backward(
                g,
                f,
                eps,
                false,
                &lw.ffn_sub_norm,
                &a.m,
                &dm2,
                &dm,
                &step,
            ));
            bw.push(k::relu2_mul_backward(g, f, &dm, &a.g, &a.u, &dg, &du, &step));
            for (n, tile) in lw.gate.iter().enumerate() {
                bw.push(k::matmul_ternary_backward(g, tile, f, n > 0, &dg, &dn2, &step));
            }
            for tile in &lw.up {
                bw.push(k::matmul_ternary_backward(g, tile, f, true, &du, &dn2, &step));
            }
            bw.extend(lora_bw(li, 4, &a.n2, c, &dg, f, 0, &dn2, a));
            bw.extend(lora_bw(li, 5, &a.n2, c, &du, f, 0, &dn2, a));
            items.extend(bw.drain(..).map(Item::Op));
            // dh = dres + rmsnorm_backward(...): copy the residual's gradient, then add onto it.
            items.push(Item::Copy(&dres, &dh, (4 * t * c) as u64));
            bw.push(k::rmsnorm_backward(
                g,
                c,
                eps,
                true,
                &lw.post_attention_layernorm,
                &a.h,
                &dn2,
                &dh,
                &step,
            ));
            // Attention: h = x + o(attn_sub_norm(attention(rope(q(n1)), rope(k(n1)), v(n1))))
            for (n, tile) in lw.o.iter().enumerate() {
                bw.push(k::matmul_ternary_backward(g, tile, c, n > 0, &dh, &da2, &step));
            }
            bw.extend(lora_bw(li, 3, &a.a2, qd, &dh, c, 0, &da2, a));
            bw.push(k::rmsnorm_backward(
                g,
                qd,
                eps,
                false,
                &lw.attn_sub_norm,
                &a.att,
                &da2,
                &datt,
                &step,
            ));
            bw.extend(k::attention_backward(
                g, nh, nkv, hd, t, w, w, &a.qkv, &a.kc, &a.vc, &datt, &stats, &dqkv, &step,
            ));
            bw.push(k::rope_backward(g, nh, hd, w, 0, &cos_b, &sin_b, &dqkv, &step));
            bw.push(k::rope_backward(g, nkv, hd, w, qd, &cos_b, &sin_b, &dqkv, &step));
            for (n, tile) in lw.qkv.iter().enumerate() {
                bw.push(k::matmul_ternary_backward(g, tile, w, n > 0, &dqkv, &dn1, &step));
            }
            bw.extend(lora_bw(li, 0, &a.n1, c, &dqkv, w, 0, &dn1, a));
            bw.extend(lora_bw(li, 1, &a.n1, c, &dqkv, w, qd, &dn1, a));
            bw.extend(lora_bw(li, 2, &a.n1, c, &dqkv, w, qd + kvd, &dn1, a));
            items.extend(bw.drain(..).map(Item::Op));
            // dx = dh + rmsnorm_backward(...), which becomes the next (lower) layer's residual gradient.
            items.push(Item::Copy(&dh, &dres, (4 * t * c) as u64));
            items.push(Item::Op(k::rmsnorm_backward(
                g,
                c,
                eps,
                true,
                &lw.input_layernorm,
                &xs[li],
                &dn1,
                &dres,
                &step,
            )));
        }
        self.run(&items, t as u32)?;
        let nll: Vec<f32> = bytemuck::pod_collect_to_vec(&g.download(&nll_b, (4 * t) as u64)?);
        Ok((0..t).filter(|&i| predicted[i]).map(|i| nll[i] as f64).sum())
    }
}
