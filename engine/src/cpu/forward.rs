//! The whole-model forward pass on the CPU, written op by op from the reference functions. It is the
//! backend when no GPU adapter exists, and the oracle the GPU backend is compared with.
use super::*;
use crate::backend::{Backend, Got, MemoryReport, Want};
use crate::error::{EngineError, Result};
use crate::model::Model;
use std::sync::Arc;

pub struct CpuBackend {
    model: Arc<Model>,
    /// Round the embedding and lm_head through f16, to mirror a GPU that stores them in f16.
    embed_f16: bool,
    head: Option<Vec<f32>>,
    positions: usize,
    k_cache: Vec<Vec<f32>>, // per layer [NKV, P, HD]
    v_cache: Vec<Vec<f32>>,
    seen: Vec<bool>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// A LoRA adapter applied at runtime: each targeted projection adds `scale * B . A . x` on the
    /// unquantized normed input, as PEFT does.
    lora: Option<Arc<crate::lora::Adapter>>,
    slots: Slots,
    /// Threads for the fast ternary projections (`crate::fast`); 0: the reference `matmul_ternary`.
    fast_threads: usize,
}

/// The caches of continuous batching: per layer [slots, NKV, P, HD], one repetition set per slot, and the
/// picks of decode steps not yet collected (this backend computes a step when it is queued).
#[derive(Default)]
struct Slots {
    n: usize,
    cap: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    seen: Vec<Vec<bool>>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    done: std::collections::VecDeque<Vec<u32>>,
}

/// Where a chunk's rows read and write their keys and values.
#[derive(Clone, Copy)]
enum Kv<'a> {
    /// The lone sequence of `begin`, at positions start..start+T.
    Seq(usize),
    /// Each row at its own (slot, position) of the slot caches.
    Rows(&'a [(usize, usize)]),
}

impl CpuBackend {
    pub fn new(model: Arc<Model>, embed_f16: bool) -> Self {
        let v = model.config.vocab_size;
        CpuBackend {
            model,
            embed_f16,
            head: None,
            positions: 0,
            k_cache: vec![],
            v_cache: vec![],
            seen: vec![false; v],
            cos: vec![],
            sin: vec![],
            lora: None,
            slots: Slots::default(),
            fast_threads: 0,
        }
    }

    /// The same backend with the fast ternary projections of `crate::fast` (SIMD, on `threads` threads):
    /// `--device cpu`. They give the reference's bits, so every output is the reference's.
    pub fn fast(mut self, threads: usize) -> Self {
        self.fast_threads = threads.max(1);
        self
    }

    pub fn with_lora(mut self, a: crate::lora::Adapter) -> Self {
        self.lora = Some(Arc::new(a));
        self
    }

    fn round(&self, x: &mut [f32]) {
        if self.embed_f16 {
            for v in x {
                *v = half::f16::from_f32(*v).to_f32();
            }
        }
    }

    fn ensure_head(&mut self) {
        if self.head.is_none() {
            let h = self.model.head();
            let mut w = h.rows_f32(0, h.rows);
            self.round(&mut w);
            if self.fast_threads > 0 {
                // The fast lm_head reads the head transposed ([C, V]); it replaces the [V, C] copy.
                w = crate::fast::lm_head::transpose(&w, h.rows, h.cols);
            }
            self.head = Some(w);
        }
    }

    /// The head's logits for `t` rows of `x` ([T, C]) into `logits` ([T, V]): the reference `lm_head`, or
    /// the fast one (the same bits) on the transposed head. `ensure_head` first.
    fn head_logits(&self, logits: &mut [f32], x: &[f32], t: usize) {
        let (c, v) = (self.model.config.hidden_size, self.model.config.vocab_size);
        let w: &[f32] = self.head.as_deref().unwrap_or(&[]);
        if self.fast_threads == 0 {
            lm_head(logits, x, w, t, c, v);
        } else {
            crate::fast::lm_head(logits, x, w, t, c, v, self.fast_threads);
        }
    }
}

impl CpuBackend {
    /// The layers and the final norm over a chunk of `tokens`: returns the normed hidden states [T, C].
    fn run_layers(&mut self, tokens: &[u32], kv: Kv<'_>) -> Result<Vec<f32>> {
        let model = self.model.clone();
        let cfg = &model.config;
        let (t, c, f) = (tokens.len(), cfg.hidden_size, cfg.intermediate_size);
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let eps = cfg.rms_norm_eps as f32;
        let lora = self.lora.clone();
        let threads = self.fast_threads;
        let matmul_ternary = |y: &mut [f32], q: &[i8], s: &[f32], w: &crate::model::TernaryLinear, t: usize| {
            if threads == 0 {
                matmul_ternary(y, q, s, w, t)
            } else {
                crate::fast::matmul_ternary_threads(y, q, s, w, t, threads)
            }
        };
        // y += LoRA(target) of the normed input `n`, for every projection that reads it (q, k and v share
        // one). The fused rmsnorm_quant keeps only the quantized form, so `n` is computed here, once per
        // input; `rmsnorm_quant` is rmsnorm followed by act_quant, so the base path is unchanged.
        let add_lora = |outs: &mut [(&mut [f32], usize)], x: &[f32], w: &[f32], li: usize, cols: usize| {
            let Some(a) = &lora else { return };
            let pair = |target: usize| a.layers.get(li).and_then(|r| r[target].as_ref());
            if outs.iter().all(|(_, target)| pair(*target).is_none()) {
                return;
            }
            let mut n = vec![0f32; t * cols];
            rmsnorm(&mut n, x, w, eps, t, cols);
            let mut hbuf = vec![0f32; t * a.rank];
            for (y, target) in outs.iter_mut() {
                if let Some(p) = pair(*target) {
                    super::lora(y, &mut hbuf, &n, &p.a, &p.b, a.scale(), t, p.inp, p.out, a.rank);
                }
            }
        };

        let mut x = vec![0f32; t * c];
        embedding(&mut x, tokens, &model.embed);
        self.round(&mut x);
        let mut qx = vec![0i8; t * c.max(f).max(qd)];
        let mut s = vec![0f32; t];
        let mut q = vec![0f32; t * qd];
        let mut k = vec![0f32; t * kvd];
        let mut v = vec![0f32; t * kvd];
        let mut att = vec![0f32; t * qd];
        let mut o = vec![0f32; t * c];
        let mut g = vec![0f32; t * f];
        let mut u = vec![0f32; t * f];
        let mut h = vec![0f32; t * f];
        for (li, layer) in model.layers()?.iter().enumerate() {
            // attention block
            rmsnorm_quant(&mut qx[..t * c], &mut s, &x, &layer.input_layernorm, eps, t, c);
            matmul_ternary(&mut q, &qx[..t * c], &s, &layer.q_proj, t);
            matmul_ternary(&mut k, &qx[..t * c], &s, &layer.k_proj, t);
            matmul_ternary(&mut v, &qx[..t * c], &s, &layer.v_proj, t);
            add_lora(
                &mut [(&mut q, 0), (&mut k, 1), (&mut v, 2)],
                &x,
                &layer.input_layernorm,
                li,
                c,
            );
            match kv {
                Kv::Seq(start) => {
                    let p = self.positions;
                    let positions: Vec<usize> = (start..start + t).collect();
                    rope(&mut q, &positions, &self.cos, &self.sin, nh, hd);
                    rope(&mut k, &positions, &self.cos, &self.sin, nkv, hd);
                    let (kc, vc) = (&mut self.k_cache[li], &mut self.v_cache[li]);
                    for ti in 0..t {
                        for kh in 0..nkv {
                            let dst = (kh * p + start + ti) * hd;
                            let src = (ti * nkv + kh) * hd;
                            kc[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                            vc[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
                        }
                    }
                    attention(&mut att, &q, kc, vc, start, t, nh, nkv, hd, p);
                }
                Kv::Rows(rows) => {
                    let sl = &mut self.slots;
                    let (p, kc, vc) = (sl.cap, &mut sl.k[li], &mut sl.v[li]);
                    rope_rows(&mut q, &mut k, &v, kc, vc, rows, &sl.cos, &sl.sin, nh, nkv, hd, p);
                    attention_rows(&mut att, &q, kc, vc, rows, nh, nkv, hd, p);
                }
            }
            rmsnorm_quant(&mut qx[..t * qd], &mut s, &att, &layer.attn_sub_norm, eps, t, qd);
            matmul_ternary(&mut o, &qx[..t * qd], &s, &layer.o_proj, t);
            add_lora(&mut [(&mut o, 3)], &att, &layer.attn_sub_norm, li, qd);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            // MLP block
            rmsnorm_quant(&mut qx[..t * c], &mut s, &x, &layer.post_attention_layernorm, eps, t, c);
            matmul_ternary(&mut g, &qx[..t * c], &s, &layer.gate_proj, t);
            matmul_ternary(&mut u, &qx[..t * c], &s, &layer.up_proj, t);
            add_lora(
                &mut [(&mut g, 4), (&mut u, 5)],
                &x,
                &layer.post_attention_layernorm,
                li,
                c,
            );
            crate::cpu::gated_mul(cfg.activation, &mut h, &g, &u);
            rmsnorm_quant(&mut qx[..t * f], &mut s, &h, &layer.ffn_sub_norm, eps, t, f);
            matmul_ternary(&mut o, &qx[..t * f], &s, &layer.down_proj, t);
            add_lora(&mut [(&mut o, 6)], &h, &layer.ffn_sub_norm, li, f);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        let mut xf = vec![0f32; t * c];
        rmsnorm(&mut xf, &x, &model.norm, eps, t, c);
        Ok(xf)
    }

    /// Logits of the last row of `xf` [T, C].
    fn last_logits(&mut self, xf: &[f32]) -> Vec<f32> {
        let (c, v) = (self.model.config.hidden_size, self.model.config.vocab_size);
        self.ensure_head();
        let t = xf.len() / c;
        let mut logits = vec![0f32; v];
        self.head_logits(&mut logits, &xf[(t - 1) * c..], 1);
        logits
    }

    fn check_slot(&self, slot: usize, end: usize) -> Result<()> {
        if slot >= self.slots.n || end > self.slots.cap {
            return Err(EngineError::Invalid(format!(
                "slot {slot} position {end} outside the {} slots of {} positions",
                self.slots.n, self.slots.cap
            )));
        }
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn device_name(&self) -> String {
        if self.fast_threads == 0 {
            "cpu reference".into()
        } else {
            format!(
                "cpu ({}, {} threads)",
                match crate::fast::matmul_ternary::path() {
                    crate::fast::Path::Avx2 => "AVX2",
                    crate::fast::Path::Portable => "portable",
                },
                self.fast_threads
            )
        }
    }

    fn begin(&mut self, positions: usize) -> Result<()> {
        let c = &self.model.config;
        let per = c.num_kv_heads * positions * c.head_dim;
        self.positions = positions;
        self.k_cache = vec![vec![0f32; per]; c.num_layers];
        self.v_cache = vec![vec![0f32; per]; c.num_layers];
        self.seen.fill(false);
        let (cos, sin) = rope_table(c.rope_theta, c.head_dim, positions);
        self.cos = cos;
        self.sin = sin;
        Ok(())
    }

    fn mark_seen(&mut self, tokens: &[u32]) -> Result<()> {
        for &t in tokens {
            if let Some(s) = self.seen.get_mut(t as usize) {
                *s = true;
            }
        }
        Ok(())
    }

    fn max_chunk(&self) -> usize {
        usize::MAX
    }

    fn begin_slots(&mut self, slots: usize, positions: usize) -> Result<usize> {
        let c = &self.model.config;
        let per = slots * c.num_kv_heads * positions * c.head_dim;
        let (cos, sin) = rope_table(c.rope_theta, c.head_dim, positions);
        self.slots = Slots {
            n: slots,
            cap: positions,
            k: vec![vec![0f32; per]; c.num_layers],
            v: vec![vec![0f32; per]; c.num_layers],
            seen: vec![vec![false; c.vocab_size]; slots],
            cos,
            sin,
            done: Default::default(),
        };
        Ok(slots)
    }

    fn reset_slot(&mut self, slot: usize, seen: &[u32]) -> Result<()> {
        self.check_slot(slot, 0)?;
        let set = &mut self.slots.seen[slot];
        set.fill(false);
        for &t in seen {
            if let Some(s) = set.get_mut(t as usize) {
                *s = true;
            }
        }
        Ok(())
    }

    fn forward_slot(
        &mut self,
        slot: usize,
        tokens: &[u32],
        start: usize,
        sample: Option<(SampleParams, f32)>,
    ) -> Result<Option<u32>> {
        self.check_slot(slot, start + tokens.len())?;
        check_tokens(tokens, self.model.config.vocab_size)?;
        let rows: Vec<(usize, usize)> = (start..start + tokens.len()).map(|p| (slot, p)).collect();
        let xf = self.run_layers(tokens, Kv::Rows(&rows))?;
        let Some((params, u)) = sample else { return Ok(None) };
        let logits = self.last_logits(&xf);
        let mut out = [0u32];
        let row = SampleRow { params, u, slot };
        sample_rows(&mut out, &logits, &mut self.slots.seen, &[row], logits.len());
        Ok(Some(out[0]))
    }

    fn decode_rows_submit(&mut self, rows: &[crate::backend::SlotRow], feedback: bool) -> Result<()> {
        let tokens: Vec<u32> = match (feedback, self.slots.done.back()) {
            (true, Some(prev)) if prev.len() == rows.len() => prev.clone(),
            (true, _) => return Err(EngineError::Invalid("feedback without the step before".into())),
            (false, _) => rows.iter().map(|r| r.token).collect(),
        };
        for r in rows {
            self.check_slot(r.slot, r.pos + 1)?;
        }
        check_tokens(&tokens, self.model.config.vocab_size)?;
        let at: Vec<(usize, usize)> = rows.iter().map(|r| (r.slot, r.pos)).collect();
        let xf = self.run_layers(&tokens, Kv::Rows(&at))?;
        let v = self.model.config.vocab_size;
        self.ensure_head();
        let mut logits = vec![0f32; rows.len() * v];
        self.head_logits(&mut logits, &xf, rows.len());
        let picks: Vec<SampleRow> = rows
            .iter()
            .map(|r| SampleRow {
                params: r.params,
                u: r.u,
                slot: r.slot,
            })
            .collect();
        let mut out = vec![0u32; rows.len()];
        sample_rows(&mut out, &logits, &mut self.slots.seen, &picks, v);
        self.slots.done.push_back(out);
        Ok(())
    }

    fn decode_rows_wait(&mut self) -> Result<Vec<u32>> {
        self.slots
            .done
            .pop_front()
            .ok_or_else(|| EngineError::Invalid("no decode step is queued".into()))
    }

    fn memory(&self) -> MemoryReport {
        let kv = (self.k_cache.iter().map(Vec::len).sum::<usize>() * 8) as u64;
        let m = &self.model;
        let tern = m.ternary_bytes() as u64;
        MemoryReport {
            ternary_weights: tern,
            kv_cache: kv,
            total: tern + kv,
            peak: tern + kv,
            ..Default::default()
        }
    }

    fn forward(&mut self, tokens: &[u32], start: usize, want: Want<'_>) -> Result<Got> {
        let model = self.model.clone();
        let cfg = &model.config;
        let (t, c) = (tokens.len(), cfg.hidden_size);
        let p = self.positions;
        if start + t > p {
            return Err(EngineError::Invalid(format!(
                "positions {}..{} exceed the cache of {p}",
                start,
                start + t
            )));
        }
        check_tokens(tokens, cfg.vocab_size)?;
        let xf = self.run_layers(tokens, Kv::Seq(start))?;
        let vsz = cfg.vocab_size;
        if !matches!(want, Want::Nothing) {
            self.ensure_head();
        }
        match want {
            Want::Nothing => Ok(Got::Nothing),
            Want::AllLogits => {
                let mut logits = vec![0f32; t * vsz];
                self.head_logits(&mut logits, &xf, t);
                Ok(Got::Logits(logits))
            }
            Want::Nll(targets) => {
                let n = targets.len().min(t);
                let mut logits = vec![0f32; n * vsz];
                self.head_logits(&mut logits, &xf[..n * c], n);
                let mut out = vec![0f32; n];
                super::nll(&mut out, &logits, &targets[..n], vsz);
                Ok(Got::Nll(out))
            }
            Want::Sample { params, u } => {
                let mut logits = vec![0f32; vsz];
                self.head_logits(&mut logits, &xf[(t - 1) * c..], 1);
                Ok(Got::Token(sample(&logits, &self.seen, &params, u)))
            }
        }
    }
}

fn check_tokens(tokens: &[u32], v: usize) -> Result<()> {
    match tokens.iter().find(|&&x| x as usize >= v) {
        Some(bad) => Err(EngineError::Invalid(format!(
            "token id {bad} is outside the vocabulary of {v}"
        ))),
        None => Ok(()),
    }
}
