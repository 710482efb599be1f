//! LoRA training on the CPU reference: the whole BitNet forward with its saved activations, the hand-written
//! backward of every op (`cpu::*_backward`, each checked against finite differences), and the optimizer
//! step. It is the oracle the GPU trainer is tested against, and it reproduces PEFT + torch AdamW
//! (tests/fixtures/lora, from tests/reference/make_lora_fixtures.py).
use crate::cpu::{self, AdamW};
use crate::error::{EngineError, Result};
use crate::lora::{Adapter, LoraPair};
use crate::model::{Model, TernaryLinear};

/// A label the loss ignores (transformers' -100): prompt tokens of a prompt/completion record.
pub const IGNORE: i32 = -100;

/// Learning-rate schedules, as transformers' `get_{constant,linear,cosine}_schedule_with_warmup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            _ => Err(format!("unknown schedule {s:?}: constant, linear or cosine")),
        }
    }
}

/// The multiplier of the base learning rate at optimizer step `k` (0-based) of `total`, with `warmup` steps of
/// linear warm-up (so step 0 of a warm-up runs at lr 0, as in transformers).
pub fn lr_factor(s: Schedule, k: usize, warmup: usize, total: usize) -> f64 {
    if k < warmup {
        return k as f64 / warmup.max(1) as f64;
    }
    let progress = (k - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match s {
        Schedule::Constant => 1.0,
        Schedule::Linear => ((total - k.min(total)) as f64 / (total.saturating_sub(warmup)).max(1) as f64).max(0.0),
        Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

/// What one layer's forward keeps for its backward. Shapes per sequence of T tokens.
struct LayerCache {
    x: Vec<f32>,         // [T, C] residual stream in
    n1: Vec<f32>,        // [T, C] input_layernorm(x)
    q: Vec<f32>,         // [T, NH, HD] rotated
    k: Vec<f32>,         // [NKV, T, HD] rotated (cache layout)
    v: Vec<f32>,         // [NKV, T, HD]
    att: Vec<f32>,       // [T, NH*HD]
    a2: Vec<f32>,        // [T, NH*HD] attn_sub_norm(att)
    h: Vec<f32>,         // [T, C] after the attention residual
    n2: Vec<f32>,        // [T, C] post_attention_layernorm(h)
    g: Vec<f32>,         // [T, F]
    u: Vec<f32>,         // [T, F]
    m: Vec<f32>,         // [T, F] relu2(g) * u
    m2: Vec<f32>,        // [T, F] ffn_sub_norm(m)
    lh: Vec<Vec<f32>>,   // per target: the LoRA hidden [T, R] (empty when not adapted)
    mask: Vec<Vec<f32>>, // per target: the LoRA dropout mask, 0 or 1/(1-p) [T, I] (empty: no dropout)
}

/// `x * mask` (the LoRA branch's dropout), or x itself without a mask.
fn dropped<'a>(x: &'a [f32], mask: &[f32], buf: &'a mut Vec<f32>) -> &'a [f32] {
    if mask.is_empty() {
        return x;
    }
    *buf = x.iter().zip(mask).map(|(a, m)| a * m).collect();
    buf
}

/// `y = ternary(x) (+ LoRA(x))`: the activation quantizer sees x, the LoRA branch sees it unquantized.
#[allow(clippy::too_many_arguments)]
fn project(
    y: &mut [f32],
    lh: &mut Vec<f32>,
    x: &[f32],
    w: &TernaryLinear,
    lora: Option<&LoraPair>,
    mask: &[f32],
    scale: f32,
    r: usize,
    t: usize,
) {
    let mut q = vec![0i8; t * w.inp];
    let mut s = vec![0f32; t];
    cpu::act_quant(&mut q, &mut s, x, t, w.inp);
    cpu::matmul_ternary(y, &q, &s, w, t);
    if let Some(p) = lora {
        lh.resize(t * r, 0.0);
        let mut buf = vec![];
        let xd = dropped(x, mask, &mut buf);
        cpu::lora(y, lh, xd, &p.a, &p.b, scale, t, p.inp, p.out, r);
    }
}

/// `dx (+)= W_eff^T dy (+ LoRA backward)`; parameter gradients accumulate into `grad`.
#[allow(clippy::too_many_arguments)]
fn project_backward(
    dx: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &TernaryLinear,
    lora: Option<&LoraPair>,
    grad: Option<&mut LoraPair>,
    lh: &[f32],
    mask: &[f32],
    scale: f32,
    r: usize,
    t: usize,
    accumulate: bool,
) {
    let mut tmp = vec![0f32; t * w.inp];
    cpu::matmul_ternary_backward(&mut tmp, dy, w, t);
    if accumulate {
        for (d, v) in dx.iter_mut().zip(&tmp) {
            *d += v;
        }
    } else {
        dx.copy_from_slice(&tmp);
    }
    if let (Some(p), Some(g)) = (lora, grad) {
        if mask.is_empty() {
            cpu::lora_backward(dx, &mut g.a, &mut g.b, dy, x, lh, &p.a, &p.b, scale, t, p.inp, p.out, r);
        } else {
            // Through the dropout: the branch saw x * mask, so its input gradient is masked the same way.
            let mut buf = vec![];
            let xd = dropped(x, mask, &mut buf);
            let mut dxl = vec![0f32; t * p.inp];
            cpu::lora_backward(
                &mut dxl, &mut g.a, &mut g.b, dy, xd, lh, &p.a, &p.b, scale, t, p.inp, p.out, r,
            );
            for ((d, v), m) in dx.iter_mut().zip(&dxl).zip(mask) {
                *d += v * m;
            }
        }
    }
}

fn norm(x: &[f32], w: &[f32], eps: f32, t: usize, c: usize) -> Vec<f32> {
    let mut y = vec![0f32; t * c];
    cpu::rmsnorm(&mut y, x, w, eps, t, c);
    y
}

/// The CPU reference trainer state: the model, its lm_head as f32 rows, RoPE tables.
pub struct CpuTrainer<'m> {
    pub model: &'m Model,
    head: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl<'m> CpuTrainer<'m> {
    pub fn new(model: &'m Model) -> CpuTrainer<'m> {
        let c = &model.config;
        let h = model.head();
        let (cos, sin) = cpu::rope_table(c.rope_theta, c.head_dim, c.max_position_embeddings);
        CpuTrainer {
            model,
            head: h.rows_f32(0, h.rows),
            cos,
            sin,
        }
    }

    /// Forward and backward of one sequence. `labels[t]` is the target of position t-1 (transformers'
    /// shift: position t predicts `labels[t+1]`); each predicted position's NLL is weighted by `weight`
    /// (1/N for a mean over N predicted positions of a micro-batch, divided by the accumulation steps).
    /// Adds `weight * dNLL/dparam` to `grad` and returns the sum of the NLLs of the predicted positions.
    /// `dropout`: the seed of this sequence's LoRA dropout masks (PEFT's `lora_dropout`, one independent
    /// mask per adapted projection, scaled by 1/(1-p)); `None` or `adapter.dropout == 0` disables it.
    pub fn sequence(
        &self,
        ids: &[u32],
        labels: &[i32],
        adapter: &Adapter,
        grad: &mut Adapter,
        weight: f32,
        dropout: Option<u64>,
    ) -> Result<f64> {
        let m = self.model;
        let cfg = &m.config;
        let t = ids.len();
        if t == 0 || labels.len() != t {
            return Err(EngineError::Invalid(
                "a training sequence needs ids and labels of the same length".into(),
            ));
        }
        if t > cfg.max_position_embeddings {
            return Err(EngineError::Invalid(format!(
                "sequence of {t} tokens exceeds the model's context {}",
                cfg.max_position_embeddings
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&x| x as usize >= cfg.vocab_size) {
            return Err(EngineError::Invalid(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let eps = cfg.rms_norm_eps as f32;
        let (r, scale) = (adapter.rank, adapter.scale());
        let pos: Vec<usize> = (0..t).collect();
        let lora = |l: usize, i: usize| {
            adapter
                .layers
                .get(l)
                .and_then(|row| row.get(i))
                .and_then(|p| p.as_ref())
        };

        let mask_for = |li: usize, target: usize, n: usize| -> Vec<f32> {
            let p = adapter.dropout;
            match dropout {
                Some(seed) if p > 0.0 && weight != 0.0 && lora(li, target).is_some() => {
                    let mut rng = crate::rng::Rng::new(
                        seed ^ (((li as u64) << 8 | target as u64) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    );
                    let keep = 1.0 / (1.0 - p);
                    (0..n).map(|_| if rng.uniform() < p { 0.0 } else { keep }).collect()
                }
                _ => vec![],
            }
        };

        // ---- forward ----
        let mut x = vec![0f32; t * c];
        cpu::embedding(&mut x, ids, &m.embed);
        let layers = m.layers()?;
        let mut caches = Vec::with_capacity(layers.len());
        for (li, layer) in layers.iter().enumerate() {
            let mut lh = vec![vec![]; 7];
            let ins = [c, c, c, qd, c, c, f];
            let mask: Vec<Vec<f32>> = (0..7).map(|i| mask_for(li, i, t * ins[i])).collect();
            let n1 = norm(&x, &layer.input_layernorm, eps, t, c);
            let mut q = vec![0f32; t * qd];
            let mut k = vec![0f32; t * kvd];
            let mut vv = vec![0f32; t * kvd];
            project(
                &mut q,
                &mut lh[0],
                &n1,
                &layer.q_proj,
                lora(li, 0),
                &mask[0],
                scale,
                r,
                t,
            );
            project(
                &mut k,
                &mut lh[1],
                &n1,
                &layer.k_proj,
                lora(li, 1),
                &mask[1],
                scale,
                r,
                t,
            );
            project(
                &mut vv,
                &mut lh[2],
                &n1,
                &layer.v_proj,
                lora(li, 2),
                &mask[2],
                scale,
                r,
                t,
            );
            cpu::rope(&mut q, &pos, &self.cos, &self.sin, nh, hd);
            cpu::rope(&mut k, &pos, &self.cos, &self.sin, nkv, hd);
            let (kc, vc) = (to_heads(&k, t, nkv, hd), to_heads(&vv, t, nkv, hd));
            let mut att = vec![0f32; t * qd];
            cpu::attention(&mut att, &q, &kc, &vc, 0, t, nh, nkv, hd, t);
            let a2 = norm(&att, &layer.attn_sub_norm, eps, t, qd);
            let mut o = vec![0f32; t * c];
            project(
                &mut o,
                &mut lh[3],
                &a2,
                &layer.o_proj,
                lora(li, 3),
                &mask[3],
                scale,
                r,
                t,
            );
            let h: Vec<f32> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
            let n2 = norm(&h, &layer.post_attention_layernorm, eps, t, c);
            let mut g = vec![0f32; t * f];
            let mut u = vec![0f32; t * f];
            project(
                &mut g,
                &mut lh[4],
                &n2,
                &layer.gate_proj,
                lora(li, 4),
                &mask[4],
                scale,
                r,
                t,
            );
            project(
                &mut u,
                &mut lh[5],
                &n2,
                &layer.up_proj,
                lora(li, 5),
                &mask[5],
                scale,
                r,
                t,
            );
            let mut mm = vec![0f32; t * f];
            cpu::gated_mul(cfg.activation, &mut mm, &g, &u);
            let m2 = norm(&mm, &layer.ffn_sub_norm, eps, t, f);
            let mut d = vec![0f32; t * c];
            project(
                &mut d,
                &mut lh[6],
                &m2,
                &layer.down_proj,
                lora(li, 6),
                &mask[6],
                scale,
                r,
                t,
            );
            let xn: Vec<f32> = h.iter().zip(&d).map(|(a, b)| a + b).collect();
            caches.push(LayerCache {
                x: std::mem::replace(&mut x, xn),
                n1,
                q,
                k: kc,
                v: vc,
                att,
                a2,
                h,
                n2,
                g,
                u,
                m: mm,
                m2,
                lh,
                mask,
            });
        }
        let xf = norm(&x, &m.norm, eps, t, c);
        let mut logits = vec![0f32; t * v];
        cpu::lm_head(&mut logits, &xf, &self.head, t, c, v);
        // Position i predicts labels[i+1]; the last position predicts nothing.
        let LossTargets {
            targets,
            dnll,
            predicted,
        } = loss_targets(labels, v, weight)?;
        let mut nll = vec![0f32; t];
        cpu::nll(&mut nll, &logits, &targets, v);
        let total: f64 = (0..t).filter(|&i| predicted[i]).map(|i| nll[i] as f64).sum();
        if weight == 0.0 {
            // Evaluation: the loss alone.
            return Ok(total);
        }

        // ---- backward ----
        let mut dlogits = vec![0f32; t * v];
        cpu::nll_backward(&mut dlogits, &logits, &targets, &dnll, v);
        let mut dxf = vec![0f32; t * c];
        cpu::lm_head_backward(&mut dxf, &dlogits, &self.head, t, c, v);
        let mut dx = vec![0f32; t * c];
        cpu::rmsnorm_backward(&mut dx, &dxf, &x, &m.norm, eps, t, c);
        for (li, layer) in layers.iter().enumerate().rev() {
            let cache = &caches[li];
            let gl = &mut grad.layers[li];
            // MLP: y = h + down(ffn_sub_norm(act(gate(n2)) * up(n2)))
            let mut dm2 = vec![0f32; t * f];
            project_backward(
                &mut dm2,
                &dx,
                &cache.m2,
                &layer.down_proj,
                lora(li, 6),
                gl[6].as_mut(),
                &cache.lh[6],
                &cache.mask[6],
                scale,
                r,
                t,
                false,
            );
            let mut dm = vec![0f32; t * f];
            cpu::rmsnorm_backward(&mut dm, &dm2, &cache.m, &layer.ffn_sub_norm, eps, t, f);
            let (mut dg, mut du) = (vec![0f32; t * f], vec![0f32; t * f]);
            cpu::gated_mul_backward(cfg.activation, &mut dg, &mut du, &dm, &cache.g, &cache.u);
            let mut dn2 = vec![0f32; t * c];
            project_backward(
                &mut dn2,
                &dg,
                &cache.n2,
                &layer.gate_proj,
                lora(li, 4),
                gl[4].as_mut(),
                &cache.lh[4],
                &cache.mask[4],
                scale,
                r,
                t,
                false,
            );
            project_backward(
                &mut dn2,
                &du,
                &cache.n2,
                &layer.up_proj,
                lora(li, 5),
                gl[5].as_mut(),
                &cache.lh[5],
                &cache.mask[5],
                scale,
                r,
                t,
                true,
            );
            let mut dh = vec![0f32; t * c];
            cpu::rmsnorm_backward(&mut dh, &dn2, &cache.h, &layer.post_attention_layernorm, eps, t, c);
            for (a, b) in dh.iter_mut().zip(&dx) {
                *a += b; // the residual
            }
            // Attention: h = x + o(attn_sub_norm(attention(rope(q(n1)), rope(k(n1)), v(n1))))
            let mut da2 = vec![0f32; t * qd];
            project_backward(
                &mut da2,
                &dh,
                &cache.a2,
                &layer.o_proj,
                lora(li, 3),
                gl[3].as_mut(),
                &cache.lh[3],
                &cache.mask[3],
                scale,
                r,
                t,
                false,
            );
            let mut datt = vec![0f32; t * qd];
            cpu::rmsnorm_backward(&mut datt, &da2, &cache.att, &layer.attn_sub_norm, eps, t, qd);
            let (mut dq, mut dkc, mut dvc) = (vec![0f32; t * qd], vec![0f32; t * kvd], vec![0f32; t * kvd]);
            cpu::attention_backward(
                &mut dq, &mut dkc, &mut dvc, &datt, &cache.q, &cache.k, &cache.v, t, nh, nkv, hd,
            );
            let mut dk = from_heads(&dkc, t, nkv, hd);
            let dv = from_heads(&dvc, t, nkv, hd);
            cpu::rope_backward(&mut dq, &pos, &self.cos, &self.sin, nh, hd);
            cpu::rope_backward(&mut dk, &pos, &self.cos, &self.sin, nkv, hd);
            let mut dn1 = vec![0f32; t * c];
            project_backward(
                &mut dn1,
                &dq,
                &cache.n1,
                &layer.q_proj,
                lora(li, 0),
                gl[0].as_mut(),
                &cache.lh[0],
                &cache.mask[0],
                scale,
                r,
                t,
                false,
            );
            project_backward(
                &mut dn1,
                &dk,
                &cache.n1,
                &layer.k_proj,
                lora(li, 1),
                gl[1].as_mut(),
                &cache.lh[1],
                &cache.mask[1],
                scale,
                r,
                t,
                true,
            );
            project_backward(
                &mut dn1,
                &dv,
                &cache.n1,
                &layer.v_proj,
                lora(li, 2),
                gl[2].as_mut(),
                &cache.lh[2],
                &cache.mask[2],
                scale,
                r,
                t,
                true,
            );
            let mut dxi = vec![0f32; t * c];
            cpu::rmsnorm_backward(&mut dxi, &dn1, &cache.x, &layer.input_layernorm, eps, t, c);
            for (a, b) in dxi.iter_mut().zip(&dh) {
                *a += b;
            }
            dx = dxi;
        }
        Ok(total)
    }

    /// One micro-batch: the mean NLL over its predicted, unmasked positions (transformers' causal-LM loss),
    /// with gradients scaled by `1/accum` added into `grad`. Returns the micro-batch loss. `dropout` seeds the
    /// LoRA dropout masks of its sequences (see [`CpuTrainer::sequence`]).
    pub fn micro_batch(
        &self,
        batch: &[(Vec<u32>, Vec<i32>)],
        adapter: &Adapter,
        grad: &mut Adapter,
        accum: usize,
        dropout: Option<u64>,
    ) -> Result<f64> {
        let (n, w) = micro_batch_weight(batch, accum)?;
        let mut total = 0f64;
        for (i, (ids, labels)) in batch.iter().enumerate() {
            let seed = dropout.map(|s| s.wrapping_mul(0x100_0000_01B3).wrapping_add(i as u64));
            total += self.sequence(ids, labels, adapter, grad, w, seed)?;
        }
        Ok(total / n as f64)
    }
}

/// Per-position loss targets of one sequence under transformers' shift (position i predicts
/// `labels[i+1]`; the last position predicts nothing): the target id (0 where none), the NLL's weight
/// (`weight`, 0 where none) and whether the position counts. Shared by the CPU and GPU trainers.
pub struct LossTargets {
    pub targets: Vec<u32>,
    pub dnll: Vec<f32>,
    pub predicted: Vec<bool>,
}

pub fn loss_targets(labels: &[i32], vocab: usize, weight: f32) -> Result<LossTargets> {
    let t = labels.len();
    let mut out = LossTargets {
        targets: vec![0; t],
        dnll: vec![0.0; t],
        predicted: vec![false; t],
    };
    for i in 0..t.saturating_sub(1) {
        let lab = labels[i + 1];
        if lab != IGNORE {
            if lab < 0 || lab as usize >= vocab {
                return Err(EngineError::Invalid(format!("label {lab} is outside the vocabulary")));
            }
            out.targets[i] = lab as u32;
            out.dnll[i] = weight;
            out.predicted[i] = true;
        }
    }
    Ok(out)
}

/// The loss positions of a micro-batch and the weight of each one's NLL: the mean over the micro-batch
/// (transformers' causal-LM loss), divided by the accumulation steps. Shared by both trainers.
pub fn micro_batch_weight(batch: &[(Vec<u32>, Vec<i32>)], accum: usize) -> Result<(usize, f32)> {
    let n: usize = batch
        .iter()
        .map(|(_, l)| l.iter().skip(1).filter(|&&x| x != IGNORE).count())
        .sum();
    if n == 0 {
        return Err(EngineError::Invalid(
            "a micro-batch has no token to predict (every label masked)".into(),
        ));
    }
    Ok((n, 1.0 / (n as f32 * accum as f32)))
}

/// [T, NKV, HD] -> [NKV, T, HD]
fn to_heads(x: &[f32], t: usize, nkv: usize, hd: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for ti in 0..t {
        for h in 0..nkv {
            out[(h * t + ti) * hd..(h * t + ti + 1) * hd]
                .copy_from_slice(&x[(ti * nkv + h) * hd..(ti * nkv + h + 1) * hd]);
        }
    }
    out
}

/// [NKV, T, HD] -> [T, NKV, HD]
fn from_heads(x: &[f32], t: usize, nkv: usize, hd: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for ti in 0..t {
        for h in 0..nkv {
            out[(ti * nkv + h) * hd..(ti * nkv + h + 1) * hd]
                .copy_from_slice(&x[(h * t + ti) * hd..(h * t + ti + 1) * hd]);
        }
    }
    out
}

/// The optimizer side of a run: AdamW moments per LoRA tensor, the step counter, clipping and schedule.
pub struct Optimizer {
    pub opt: AdamW,
    pub m: Adapter,
    pub v: Adapter,
    pub step: u64,
    pub max_grad_norm: Option<f32>,
}

impl Optimizer {
    pub fn new(adapter: &Adapter, opt: AdamW, max_grad_norm: Option<f32>) -> Optimizer {
        Optimizer {
            opt,
            m: adapter.zeros_like(),
            v: adapter.zeros_like(),
            step: 0,
            max_grad_norm,
        }
    }

    /// Clips `grad` (when configured), applies AdamW at learning rate `lr`, and returns the gradient norm
    /// before clipping.
    pub fn apply(&mut self, adapter: &mut Adapter, grad: &mut Adapter, lr: f64) -> f32 {
        let norm = {
            let mut gs: Vec<&mut [f32]> = grad.pairs_mut().flat_map(|p| [&mut p.a[..], &mut p.b[..]]).collect();
            match self.max_grad_norm {
                Some(max) => cpu::clip_grad_norm(&mut gs, max),
                None => cpu::grad_norm(gs.iter().map(|g| &**g)),
            }
        };
        self.step += 1;
        let tensors = adapter
            .pairs_mut()
            .zip(grad.pairs())
            .zip(self.m.pairs_mut().zip(self.v.pairs_mut()));
        for ((p, g), (m, v)) in tensors {
            cpu::adamw(&mut p.a, &mut m.a, &mut v.a, &g.a, &self.opt, lr, self.step);
            cpu::adamw(&mut p.b, &mut m.b, &mut v.b, &g.b, &self.opt, lr, self.step);
        }
        norm
    }
}
