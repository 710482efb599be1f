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
        }
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
            self.head = Some(w);
        }
    }
}

impl Backend for CpuBackend {
    fn device_name(&self) -> String {
        "cpu reference".into()
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
        let (t, c, f) = (tokens.len(), cfg.hidden_size, cfg.intermediate_size);
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let eps = cfg.rms_norm_eps as f32;
        let p = self.positions;
        if start + t > p {
            return Err(EngineError::Invalid(format!(
                "positions {}..{} exceed the cache of {p}",
                start,
                start + t
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= cfg.vocab_size) {
            return Err(EngineError::Invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                cfg.vocab_size
            )));
        }
        let positions: Vec<usize> = (start..start + t).collect();
        let lora = self.lora.clone();
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
        for (li, layer) in model.layers.iter().enumerate() {
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
            relu2_mul(&mut h, &g, &u);
            rmsnorm_quant(&mut qx[..t * f], &mut s, &h, &layer.ffn_sub_norm, eps, t, f);
            matmul_ternary(&mut o, &qx[..t * f], &s, &layer.down_proj, t);
            add_lora(&mut [(&mut o, 6)], &h, &layer.ffn_sub_norm, li, f);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        let vsz = cfg.vocab_size;
        let mut xf = vec![0f32; t * c];
        rmsnorm(&mut xf, &x, &model.norm, eps, t, c);
        if !matches!(want, Want::Nothing) {
            self.ensure_head();
        }
        let w: &[f32] = self.head.as_deref().unwrap_or(&[]);
        match want {
            Want::Nothing => Ok(Got::Nothing),
            Want::AllLogits => {
                let mut logits = vec![0f32; t * vsz];
                lm_head(&mut logits, &xf, w, t, c, vsz);
                Ok(Got::Logits(logits))
            }
            Want::Nll(targets) => {
                let n = targets.len().min(t);
                let mut logits = vec![0f32; n * vsz];
                lm_head(&mut logits, &xf[..n * c], w, n, c, vsz);
                let mut out = vec![0f32; n];
                super::nll(&mut out, &logits, &targets[..n], vsz);
                Ok(Got::Nll(out))
            }
            Want::Sample { params, u } => {
                let mut logits = vec![0f32; vsz];
                lm_head(&mut logits, &xf[(t - 1) * c..], w, 1, c, vsz);
                Ok(Got::Token(sample(&logits, &self.seen, &params, u)))
            }
        }
    }
}
