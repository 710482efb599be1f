//! LoRA adapters in PEFT's on-disk format: `adapter_config.json` plus `adapter_model.safetensors` with
//! `base_model.model.model.layers.{L}.{self_attn|mlp}.{proj}.lora_A.weight` ([R, I]) and `...lora_B.weight`
//! ([O, R]), saved as F32. The same struct holds gradients and optimizer moments (same shapes).
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::rng::Rng;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// The projections LoRA can target, in bitnode's fixed order.
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn module(target: &str) -> &'static str {
    if matches!(target, "gate_proj" | "up_proj" | "down_proj") {
        "mlp"
    } else {
        "self_attn"
    }
}

/// (out, in) of a target projection.
pub fn shape(cfg: &ModelConfig, target: usize) -> (usize, usize) {
    let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
    let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    match target {
        0 => (qd, c),
        1 | 2 => (kvd, c),
        3 => (c, qd),
        4 | 5 => (f, c),
        _ => (c, f),
    }
}

pub fn key(layer: usize, target: usize, ab: char) -> String {
    let t = TARGETS[target];
    format!(
        "base_model.model.model.layers.{layer}.{}.{t}.lora_{ab}.weight",
        module(t)
    )
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    /// [R, I]
    pub a: Vec<f32>,
    /// [O, R]
    pub b: Vec<f32>,
    pub inp: usize,
    pub out: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    /// `layers[l][target]`, `None` where the target is not adapted.
    pub layers: Vec<Vec<Option<LoraPair>>>,
}

impl Adapter {
    /// PEFT's scaling `alpha / r`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    pub fn targets(&self) -> Vec<&'static str> {
        (0..TARGETS.len())
            .filter(|&t| self.layers.iter().any(|l| l[t].is_some()))
            .map(|t| TARGETS[t])
            .collect()
    }

    /// A fresh adapter initialised as PEFT does: A kaiming-uniform with a = sqrt(5), which is
    /// U(-1/sqrt(in), 1/sqrt(in)); B zero, so training starts from the base model's function.
    pub fn init(cfg: &ModelConfig, rank: usize, alpha: f32, targets: &[&str], seed: u64) -> Result<Adapter> {
        let idx = target_indices(targets)?;
        if rank == 0 {
            return Err(EngineError::Invalid("LoRA rank must be at least 1".into()));
        }
        let mut rng = Rng::new(seed);
        let layers = (0..cfg.num_layers)
            .map(|_| {
                (0..TARGETS.len())
                    .map(|t| {
                        idx.contains(&t).then(|| {
                            let (out, inp) = shape(cfg, t);
                            let bound = 1.0 / (inp as f32).sqrt();
                            LoraPair {
                                a: (0..rank * inp).map(|_| (2.0 * rng.uniform() - 1.0) * bound).collect(),
                                b: vec![0.0; out * rank],
                                inp,
                                out,
                            }
                        })
                    })
                    .collect()
            })
            .collect();
        Ok(Adapter {
            rank,
            alpha,
            dropout: 0.0,
            layers,
        })
    }

    /// Same shapes, all zeros (gradients, optimizer moments).
    pub fn zeros_like(&self) -> Adapter {
        let mut z = self.clone();
        for p in z.pairs_mut() {
            p.a.fill(0.0);
            p.b.fill(0.0);
        }
        z
    }

    pub fn pairs(&self) -> impl Iterator<Item = &LoraPair> {
        self.layers.iter().flatten().flatten()
    }

    pub fn pairs_mut(&mut self) -> impl Iterator<Item = &mut LoraPair> {
        self.layers.iter_mut().flatten().flatten()
    }

    pub fn num_params(&self) -> usize {
        self.pairs().map(|p| p.a.len() + p.b.len()).sum()
    }

    /// Reads a PEFT adapter directory and checks it against the model it will be applied to.
    pub fn load(dir: &Path, cfg: &ModelConfig) -> Result<Adapter> {
        let cpath = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cpath).map_err(|e| EngineError::io(&cpath, e))?;
        let bad = |msg: String| EngineError::Config {
            path: cpath.clone(),
            msg,
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if v.get("peft_type").and_then(|x| x.as_str()).is_some_and(|t| t != "LORA") {
            return Err(bad("only LoRA adapters (peft_type \"LORA\") are supported".into()));
        }
        let rank = v
            .get("r")
            .and_then(|x| x.as_u64())
            .ok_or_else(|| bad("missing \"r\"".into()))? as usize;
        let alpha = v.get("lora_alpha").and_then(|x| x.as_f64()).unwrap_or(8.0) as f32;
        let dropout = v.get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32;
        if v.get("fan_in_fan_out").and_then(|x| x.as_bool()) == Some(true) {
            return Err(bad("fan_in_fan_out adapters are not supported".into()));
        }
        if v.get("use_dora").and_then(|x| x.as_bool()) == Some(true) {
            return Err(bad("DoRA adapters are not supported".into()));
        }
        if rank == 0 {
            return Err(bad("\"r\" must be at least 1".into()));
        }
        let layers = Self::read_tensors(&dir.join("adapter_model.safetensors"), cfg, rank)?;
        Ok(Adapter {
            rank,
            alpha,
            dropout,
            layers,
        })
    }

    /// Reads LoRA tensors keyed as PEFT names them (an adapter's weights, or gradients saved the same way).
    pub fn read_tensors(wpath: &Path, cfg: &ModelConfig, rank: usize) -> Result<Vec<Vec<Option<LoraPair>>>> {
        let bytes = std::fs::read(wpath).map_err(|e| EngineError::io(wpath, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| EngineError::Safetensors {
            path: wpath.to_path_buf(),
            msg: e.to_string(),
        })?;
        let mut seen = 0usize;
        let mut layers = vec![vec![None; TARGETS.len()]; cfg.num_layers];
        for (l, row) in layers.iter_mut().enumerate() {
            for (t, slot) in row.iter_mut().enumerate() {
                let (ka, kb) = (key(l, t, 'A'), key(l, t, 'B'));
                let (a, b) = match (st.tensor(&ka), st.tensor(&kb)) {
                    (Ok(a), Ok(b)) => (a, b),
                    (Err(_), Err(_)) => continue,
                    _ => {
                        return Err(EngineError::MissingTensor(format!(
                            "{ka} / {kb} (only one of the pair)"
                        )))
                    }
                };
                let (out, inp) = shape(cfg, t);
                *slot = Some(LoraPair {
                    a: floats(&ka, &a, &[rank, inp])?,
                    b: floats(&kb, &b, &[out, rank])?,
                    inp,
                    out,
                });
                seen += 2;
            }
        }
        let lora_keys = st.names().iter().filter(|n| n.contains("lora_")).count();
        if seen == 0 {
            return Err(EngineError::Invalid(format!(
                "{}: no LoRA tensors for this model's layers (is it an adapter for another architecture?)",
                wpath.display()
            )));
        }
        if lora_keys != seen {
            return Err(EngineError::Invalid(format!(
                "{}: {} LoRA tensors do not match a layer/projection of this model",
                wpath.display(),
                lora_keys - seen
            )));
        }
        Ok(layers)
    }

    /// Writes a PEFT-loadable adapter directory (F32 tensors), atomically per file.
    pub fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
        let mut owned: Vec<(String, Vec<u8>, Vec<usize>)> = vec![];
        for (l, row) in self.layers.iter().enumerate() {
            for (t, p) in row.iter().enumerate() {
                if let Some(p) = p {
                    owned.push((
                        key(l, t, 'A'),
                        bytemuck::cast_slice(&p.a).to_vec(),
                        vec![self.rank, p.inp],
                    ));
                    owned.push((
                        key(l, t, 'B'),
                        bytemuck::cast_slice(&p.b).to_vec(),
                        vec![p.out, self.rank],
                    ));
                }
            }
        }
        let views: Vec<(String, TensorView<'_>)> = owned
            .iter()
            .map(|(k, b, s)| {
                TensorView::new(Dtype::F32, s.clone(), b)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| EngineError::Invalid(e.to_string()))
            })
            .collect::<Result<_>>()?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| EngineError::Invalid(e.to_string()))?;
        crate::util::write_atomic(&dir.join("adapter_model.safetensors"), &bytes)?;
        let cfg = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets(),
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "base_model_name_or_path": base_model,
        });
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| EngineError::Invalid(e.to_string()))?;
        crate::util::write_atomic(&dir.join("adapter_config.json"), text.as_bytes())
    }
}

fn target_indices(targets: &[&str]) -> Result<Vec<usize>> {
    targets
        .iter()
        .map(|t| {
            TARGETS.iter().position(|x| x == t).ok_or_else(|| {
                EngineError::Invalid(format!("unknown LoRA target {t:?}; choose from {}", TARGETS.join(",")))
            })
        })
        .collect()
}

fn floats(name: &str, t: &TensorView<'_>, want: &[usize]) -> Result<Vec<f32>> {
    if t.shape() != want {
        return Err(EngineError::Tensor {
            name: name.into(),
            msg: format!("shape {:?}, expected {want:?}", t.shape()),
        });
    }
    let d = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        other => {
            return Err(EngineError::Tensor {
                name: name.into(),
                msg: format!("dtype {other:?}; LoRA tensors must be F32, BF16 or F16"),
            })
        }
    })
}
