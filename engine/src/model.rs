//! The host-side model: validated shapes, ternary projections repacked to bitnode's 2-bit layout, and the
//! (large) embedding / lm_head left inside the memory map until a backend converts them.
use crate::config::{ModelConfig, WeightForm};
use crate::error::{EngineError, Result};
use crate::loader::{TensorRef, WeightFiles};
use crate::ternary;
use safetensors::tensor::Dtype;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One frozen ternary projection `y = (T . x_q) * scale / s_x`, `T` of shape [out, in].
#[derive(Debug, Clone)]
pub struct TernaryLinear {
    pub out: usize,
    pub inp: usize,
    /// [out][inp/16] words, layout in `ternary.rs`.
    pub words: Vec<u32>,
    /// The effective per-tensor scale: `m` (online), `weight_scale` (offline autobitlinear) or
    /// `1/weight_scale` (offline bitlinear).
    pub scale: f32,
}

impl TernaryLinear {
    pub fn row(&self, r: usize) -> &[u32] {
        let wpr = self.inp / 16;
        &self.words[r * wpr..(r + 1) * wpr]
    }
    pub fn bytes(&self) -> usize {
        self.words.len() * 4
    }
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub input_layernorm: Vec<f32>,          // [C]
    pub post_attention_layernorm: Vec<f32>, // [C]
    pub attn_sub_norm: Vec<f32>,            // [NH*HD]
    pub ffn_sub_norm: Vec<f32>,             // [F]
    pub q_proj: TernaryLinear,              // [NH*HD, C]
    pub k_proj: TernaryLinear,              // [NKV*HD, C]
    pub v_proj: TernaryLinear,              // [NKV*HD, C]
    pub o_proj: TernaryLinear,              // [C, NH*HD]
    pub gate_proj: TernaryLinear,           // [F, C]
    pub up_proj: TernaryLinear,             // [F, C]
    pub down_proj: TernaryLinear,           // [C, F]
}

/// A full-precision [rows, cols] matrix still inside the memory map (embedding, lm_head).
pub struct MappedMatrix {
    files: Arc<WeightFiles>,
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub dtype: Dtype,
}

impl MappedMatrix {
    fn tensor(&self) -> TensorRef<'_> {
        // Checked at load time, so the lookup cannot fail afterwards.
        match self.files.get(&self.name) {
            Ok(t) => t,
            Err(_) => unreachable!("tensor {} vanished from the index", self.name),
        }
    }
    /// Row `r` converted to f32.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let t = self.tensor();
        for (c, o) in out.iter_mut().enumerate().take(self.cols) {
            *o = t.float_at(r * self.cols + c);
        }
    }
    /// Rows [r0, r1) as f16 bits, row-major (the GPU f16 form; lossless for bf16 sources in f16 range).
    pub fn rows_f16(&self, r0: usize, r1: usize) -> Vec<u16> {
        let t = self.tensor();
        (r0 * self.cols..r1 * self.cols)
            .map(|i| half::f16::from_f32(t.float_at(i)).to_bits())
            .collect()
    }
    pub fn rows_f32(&self, r0: usize, r1: usize) -> Vec<f32> {
        let t = self.tensor();
        (r0 * self.cols..r1 * self.cols).map(|i| t.float_at(i)).collect()
    }
}

pub struct Model {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub embed: MappedMatrix,
    /// `None` when the embedding is tied.
    pub lm_head: Option<MappedMatrix>,
    pub norm: Vec<f32>,
    pub layers: Vec<Layer>,
    pub files: Arc<WeightFiles>,
}

impl Model {
    /// Loads `config.json` and the weights of a Hugging Face BitNet directory.
    pub fn load(dir: &Path) -> Result<Model> {
        let config = ModelConfig::load(&dir.join("config.json"))?;
        let files = Arc::new(WeightFiles::open(dir)?);
        Self::from_parts(dir, config, files)
    }

    pub fn from_parts(dir: &Path, config: ModelConfig, files: Arc<WeightFiles>) -> Result<Model> {
        let c = &config;
        let (cdim, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let qd = c.num_heads * c.head_dim;
        let kvd = c.num_kv_heads * c.head_dim;
        let mapped = |name: &str| -> Result<MappedMatrix> {
            let t = files.get(name)?;
            t.expect_shape(&[v, cdim])?;
            if !t.is_float() {
                return Err(EngineError::tensor(
                    name,
                    format!("has dtype {:?}, expected f32/f16/bf16", t.dtype),
                ));
            }
            Ok(MappedMatrix {
                files: files.clone(),
                name: name.to_string(),
                rows: v,
                cols: cdim,
                dtype: t.dtype,
            })
        };
        let embed = mapped("model.embed_tokens.weight")?;
        let has_head = files.has("lm_head.weight");
        let lm_head = match (c.tie_word_embeddings, has_head) {
            (Some(true), _) | (None, false) => None,
            (_, true) => Some(mapped("lm_head.weight")?),
            (Some(false), false) => {
                return Err(EngineError::MissingTensor(
                    "lm_head.weight (config says tie_word_embeddings: false)".into(),
                ))
            }
        };
        let vec_of = |name: &str, n: usize| -> Result<Vec<f32>> {
            let t = files.get(name)?;
            t.expect_shape(&[n])?;
            t.to_f32()
        };
        let norm = vec_of("model.norm.weight", cdim)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let lin = |n: &str, out: usize, inp: usize| load_linear(&files, c.form, &format!("{p}.{n}"), out, inp);
            layers.push(Layer {
                input_layernorm: vec_of(&format!("{p}.input_layernorm.weight"), cdim)?,
                post_attention_layernorm: vec_of(&format!("{p}.post_attention_layernorm.weight"), cdim)?,
                attn_sub_norm: vec_of(&format!("{p}.self_attn.attn_sub_norm.weight"), qd)?,
                ffn_sub_norm: vec_of(&format!("{p}.mlp.ffn_sub_norm.weight"), f)?,
                q_proj: lin("self_attn.q_proj", qd, cdim)?,
                k_proj: lin("self_attn.k_proj", kvd, cdim)?,
                v_proj: lin("self_attn.v_proj", kvd, cdim)?,
                o_proj: lin("self_attn.o_proj", cdim, qd)?,
                gate_proj: lin("mlp.gate_proj", f, cdim)?,
                up_proj: lin("mlp.up_proj", f, cdim)?,
                down_proj: lin("mlp.down_proj", cdim, f)?,
            });
        }
        Ok(Model {
            dir: dir.to_path_buf(),
            config,
            embed,
            lm_head,
            norm,
            layers,
            files,
        })
    }

    /// The matrix the logits are computed with.
    pub fn head(&self) -> &MappedMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    pub fn tied(&self) -> bool {
        self.lm_head.is_none()
    }

    /// Bytes of all ternary projections in bitnode's packed layout.
    pub fn ternary_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                [
                    &l.q_proj,
                    &l.k_proj,
                    &l.v_proj,
                    &l.o_proj,
                    &l.gate_proj,
                    &l.up_proj,
                    &l.down_proj,
                ]
                .iter()
                .map(|p| p.bytes())
                .sum::<usize>()
            })
            .sum()
    }

    /// Number of parameters as counted in the bf16 form (what model cards quote).
    pub fn num_params(&self) -> usize {
        let c = &self.config;
        let per_layer: usize = self.layers.first().map_or(0, |l| {
            [
                &l.q_proj,
                &l.k_proj,
                &l.v_proj,
                &l.o_proj,
                &l.gate_proj,
                &l.up_proj,
                &l.down_proj,
            ]
            .iter()
            .map(|p| p.out * p.inp)
            .sum::<usize>()
                + 2 * c.hidden_size
                + l.attn_sub_norm.len()
                + l.ffn_sub_norm.len()
        });
        c.vocab_size * c.hidden_size * if self.tied() { 1 } else { 2 } + c.num_layers * per_layer + c.hidden_size
    }
}

fn load_linear(files: &WeightFiles, form: WeightForm, prefix: &str, out: usize, inp: usize) -> Result<TernaryLinear> {
    let wname = format!("{prefix}.weight");
    let w = files.get(&wname)?;
    let mut t = vec![0i8; inp];
    let mut words = Vec::with_capacity(out * inp / 16);
    match form {
        WeightForm::Online => {
            w.expect_shape(&[out, inp])?;
            if !w.is_float() {
                return Err(EngineError::tensor(
                    &wname,
                    format!("has dtype {:?}; online checkpoints hold float latent weights", w.dtype),
                ));
            }
            // Mirrors transformers' WeightQuant: scale = 1 / mean(|W|).clamp(1e-5), T = round(W*scale).clamp(-1,1),
            // effective weight T / scale. The mean is accumulated in f64 and rounded once, the closest f32 to
            // torch's reduction.
            let n = out * inp;
            let mut sum = 0f64;
            for i in 0..n {
                sum += w.float_at(i).abs() as f64;
            }
            let m = ((sum / n as f64) as f32).max(1e-5);
            let s = 1.0f32 / m;
            for r in 0..out {
                for (c, tv) in t.iter_mut().enumerate() {
                    *tv = (w.float_at(r * inp + c) * s).round_ties_even().clamp(-1.0, 1.0) as i8;
                }
                ternary::pack_row(&t, &mut words);
            }
            Ok(TernaryLinear {
                out,
                inp,
                words,
                scale: 1.0 / s,
            })
        }
        WeightForm::OfflineAutoBitLinear | WeightForm::OfflineBitLinear => {
            if !out.is_multiple_of(4) {
                return Err(EngineError::tensor(
                    &wname,
                    format!("out dimension {out} is not a multiple of 4"),
                ));
            }
            w.expect_shape(&[out / 4, inp])?;
            if w.dtype != Dtype::U8 && w.dtype != Dtype::I8 {
                return Err(EngineError::tensor(
                    &wname,
                    format!("has dtype {:?}; offline checkpoints hold packed uint8", w.dtype),
                ));
            }
            let sname = format!("{prefix}.weight_scale");
            let st = files.get(&sname)?;
            if st.numel() != 1 {
                return Err(EngineError::tensor(
                    &sname,
                    format!("has shape {:?}, expected a single value", st.shape),
                ));
            }
            let ws = st.to_f32()?[0];
            if !ws.is_finite() || ws == 0.0 {
                return Err(EngineError::tensor(
                    &sname,
                    format!("is {ws}, expected a finite non-zero scale"),
                ));
            }
            for r in 0..out {
                for (c, tv) in t.iter_mut().enumerate() {
                    let v = ternary::hf_get(w.bytes, out, inp, r, c);
                    if v > 1 {
                        return Err(EngineError::tensor(
                            &wname,
                            format!("holds code 3 at row {r} col {c}; valid codes are 0,1,2"),
                        ));
                    }
                    *tv = v;
                }
                ternary::pack_row(&t, &mut words);
            }
            let scale = if form == WeightForm::OfflineAutoBitLinear {
                ws
            } else {
                1.0 / ws
            };
            Ok(TernaryLinear { out, inp, words, scale })
        }
    }
}
