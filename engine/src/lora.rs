//! LoRA adapters in PEFT's on-disk format: `adapter_config.json` plus `adapter_model.safetensors` with
//! `base_model.model.model.layers.{L}.{self_attn|mlp}.{proj}.lora_A.weight` ([R, I]) and `...lora_B.weight`
//! ([O, R]), saved as F32. The same struct holds gradients and optimizer moments (same shapes).
//!
//! Adapters also go out to, and come in from, llama.cpp's LoRA GGUF (`convert_lora_to_gguf.py`'s output,
//! which `llama_adapter_lora_init` loads and QVAC writes): `general.type = "adapter"`, `adapter.type =
//! "lora"`, `adapter.lora.alpha` (f32), `general.architecture` the base's, and tensors
//! `blk.{L}.{attn_q|..|ffn_down}.weight.lora_a` / `.lora_b` in PEFT's orientation: lora_A [R, I] is stored
//! with GGUF ne = [I, R] and lora_B [O, R] with ne = [R, O], the same row-major bytes
//! (see [`Adapter::to_gguf`], [`Adapter::load_gguf`]).
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

    /// Reads a PEFT adapter directory, or a llama.cpp LoRA GGUF file (any file: see
    /// [`Adapter::load_gguf`]; or a store entry holding one as [`GGUF_ADAPTER_IN_DIR`]), and checks it
    /// against the model it will be applied to.
    pub fn load(dir: &Path, cfg: &ModelConfig) -> Result<Adapter> {
        if dir.is_file() {
            return Self::load_gguf(dir, cfg);
        }
        let inner = dir.join(GGUF_ADAPTER_IN_DIR);
        if inner.is_file() && !dir.join("adapter_config.json").exists() {
            return Self::load_gguf(&inner, cfg);
        }
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

/// The GGUF name of a LoRA tensor: `blk.{layer}.{attn_q|..}.weight.lora_{a|b}` (`ab` is 'A' or 'B').
pub fn gguf_key(layer: usize, target: usize, ab: char) -> String {
    format!(
        "blk.{layer}.{}.weight.lora_{}",
        crate::model::GGUF_PROJECTIONS[target],
        ab.to_ascii_lowercase()
    )
}

/// (layer, target, 'A' or 'B') of a GGUF LoRA tensor name, or `None` when it is not one of the engine's.
fn parse_gguf_key(name: &str) -> Option<(usize, usize, char)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) || (layer.len() > 1 && layer.starts_with('0')) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let (proj, ab) = rest.split_once(".weight.lora_")?;
    let target = crate::model::GGUF_PROJECTIONS.iter().position(|p| *p == proj)?;
    let ab = match ab {
        "a" => 'A',
        "b" => 'B',
        _ => return None,
    };
    Some((layer, target, ab))
}

/// The `general.architecture` an adapter for the model at `base` must carry: a GGUF model's own, or
/// `bitnet` (llama.cpp's name for the architecture) for a Hugging Face BitNet directory.
pub fn gguf_architecture_of(base: &Path) -> Result<String> {
    if crate::model::is_gguf(base) {
        let g = crate::loader::GgufWeights::open(base)?;
        return Ok(g
            .gguf
            .architecture()
            .map_err(|e| EngineError::gguf(base, e))?
            .to_string());
    }
    Ok("bitnet".into())
}

/// What [`export_gguf`] wrote.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GgufExport {
    pub path: std::path::PathBuf,
    pub architecture: String,
    pub rank: usize,
    pub alpha: f32,
    pub tensors: usize,
    pub bytes: u64,
}

/// The file name of a LoRA GGUF inside a directory: the model store keeps a GGUF adapter as an entry
/// holding it under this name (as it keeps a GGUF model as `model.gguf`).
pub const GGUF_ADAPTER_IN_DIR: &str = "adapter.gguf";

/// Whether `path` is a GGUF file whose header says it is an adapter (`general.type = "adapter"`): how the
/// store and `bitnode model add` tell a LoRA GGUF from a model GGUF. Reads the header only.
pub fn is_gguf_adapter(path: &Path) -> bool {
    path.is_file()
        && crate::loader::GgufWeights::open(path)
            .ok()
            .and_then(|g| g.gguf.get_str("general.type").ok().flatten().map(|t| t == "adapter"))
            .unwrap_or(false)
}

/// `bitnode adapter export --gguf OUT --adapter DIR --base MODEL`: the adapter (checked against the base's
/// shapes) as a llama.cpp LoRA GGUF, written atomically. PEFT options llama.cpp's format cannot express
/// (rsLoRA's alpha/sqrt(r), per-module ranks or alphas) are refused rather than exported wrongly.
pub fn export_gguf(adapter: &Path, base: &Path, out: &Path) -> Result<GgufExport> {
    if adapter.is_dir() {
        let cpath = adapter.join("adapter_config.json");
        let text = std::fs::read_to_string(&cpath).map_err(|e| EngineError::io(&cpath, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| EngineError::Config {
            path: cpath.clone(),
            msg: e.to_string(),
        })?;
        let nonempty = |k: &str| v.get(k).and_then(|x| x.as_object()).is_some_and(|o| !o.is_empty());
        let why = if v.get("use_rslora").and_then(|x| x.as_bool()) == Some(true) {
            Some("use_rslora (scale alpha/sqrt(r))")
        } else if nonempty("rank_pattern") {
            Some("a rank_pattern (per-module ranks)")
        } else if nonempty("alpha_pattern") {
            Some("an alpha_pattern (per-module alphas)")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(EngineError::Config {
                path: cpath,
                msg: format!("the adapter uses {why}, which a llama.cpp LoRA GGUF cannot express"),
            });
        }
    }
    let cfg = crate::model::load_config(base)?;
    let a = Adapter::load(adapter, &cfg)?;
    let arch = gguf_architecture_of(base)?;
    let bytes = a.to_gguf(&arch)?;
    crate::util::write_atomic(out, &bytes)?;
    Ok(GgufExport {
        path: out.to_path_buf(),
        architecture: arch,
        rank: a.rank,
        alpha: a.alpha,
        tensors: 2 * a.pairs().count(),
        bytes: bytes.len() as u64,
    })
}

impl Adapter {
    /// The adapter as a llama.cpp LoRA GGUF for a base of architecture `arch` (F32 tensors, PEFT
    /// orientation; see the module comment).
    pub fn to_gguf(&self, arch: &str) -> Result<Vec<u8>> {
        use crate::gguf::{GgufWriter, Value};
        let ge = |e| EngineError::Invalid(format!("writing the adapter as GGUF: {e}"));
        let mut w = GgufWriter::new();
        w.add_str("general.architecture", arch).map_err(ge)?;
        w.add_str("general.type", "adapter").map_err(ge)?;
        w.add_str("general.name", "bitnode LoRA adapter").map_err(ge)?;
        w.add_str("adapter.type", "lora").map_err(ge)?;
        w.add("adapter.lora.alpha", Value::F32(self.alpha)).map_err(ge)?;
        for (l, row) in self.layers.iter().enumerate() {
            for (t, p) in row.iter().enumerate() {
                if let Some(p) = p {
                    w.add_f32(&gguf_key(l, t, 'A'), &[p.inp, self.rank], &p.a).map_err(ge)?;
                    w.add_f32(&gguf_key(l, t, 'B'), &[self.rank, p.out], &p.b).map_err(ge)?;
                }
            }
        }
        Ok(w.to_bytes())
    }

    /// Writes [`Adapter::to_gguf`] to `path` atomically (a temporary file, then a rename).
    pub fn save_gguf(&self, path: &Path, arch: &str) -> Result<()> {
        crate::util::write_atomic(path, &self.to_gguf(arch)?)
    }

    /// Reads a llama.cpp LoRA GGUF with the strict reader and checks it against the model: an adapter
    /// (`general.type`, `adapter.type = "lora"`) for a BitNet architecture, every tensor one of the
    /// engine's projections in a layer the model has, each pair present with the model's shapes and one
    /// rank throughout. `adapter.lora.alpha` missing or 0 means a scale of 1 (alpha = r), as llama.cpp
    /// takes it. Tensors may be F32, F16, BF16 or Q8_0 (what `convert_lora_to_gguf.py --outtype` writes).
    pub fn load_gguf(path: &Path, cfg: &ModelConfig) -> Result<Adapter> {
        use crate::gguf::GgufError;
        let g = crate::loader::GgufWeights::open(path)?;
        let gerr = |e: GgufError| EngineError::gguf(path, e);
        let bad = |key: &str, msg: String| EngineError::gguf(path, GgufError::BadValue { key: key.into(), msg });
        match g.gguf.get_str("general.type").map_err(gerr)? {
            Some("adapter") => {}
            Some(t) => {
                return Err(bad(
                    "general.type",
                    format!("is {t:?}, not \"adapter\": this file is not a LoRA adapter (a model goes to --model)"),
                ))
            }
            None => return Err(bad("general.type", "missing: this file is not a LoRA adapter".into())),
        }
        match g.gguf.get_str("adapter.type").map_err(gerr)? {
            Some("lora") => {}
            Some(t) => {
                return Err(bad(
                    "adapter.type",
                    format!("is {t:?}; only \"lora\" adapters are supported"),
                ))
            }
            None => return Err(bad("adapter.type", "missing (expected \"lora\")".into())),
        }
        let arch = g.gguf.architecture().map_err(gerr)?;
        if !crate::config::GGUF_ARCHITECTURES.contains(&arch) {
            return Err(bad(
                "general.architecture",
                format!(
                    "{arch:?}: an adapter for another architecture (bitnode runs {:?})",
                    crate::config::GGUF_ARCHITECTURES
                ),
            ));
        }
        let alpha = g.gguf.get_float("adapter.lora.alpha").map_err(gerr)?;
        if let Some(a) = alpha {
            if !a.is_finite() {
                return Err(bad("adapter.lora.alpha", format!("{a} is not finite")));
            }
        }
        let shape_err = |t: &crate::gguf::TensorInfo, want: [usize; 2]| {
            gerr(GgufError::BadShape {
                tensor: t.name.clone(),
                msg: format!("ne = {:?}, this model and the adapter's rank ask for {want:?}", t.ne),
            })
        };
        let mut rank: Option<usize> = None;
        let mut halves: Vec<Vec<[Option<Vec<f32>>; 2]>> = vec![vec![[None, None]; TARGETS.len()]; cfg.num_layers];
        for t in g.gguf.tensors() {
            let Some((l, target, ab)) = parse_gguf_key(&t.name) else {
                return Err(gerr(GgufError::BadShape {
                    tensor: t.name.clone(),
                    msg: format!(
                        "not a LoRA tensor of a projection bitnode adapts (blk.N.{{{}}}.weight.lora_a/lora_b)",
                        crate::model::GGUF_PROJECTIONS.join(",")
                    ),
                }));
            };
            if l >= cfg.num_layers {
                return Err(gerr(GgufError::BadShape {
                    tensor: t.name.clone(),
                    msg: format!("layer {l}, but the model has {} layers", cfg.num_layers),
                }));
            }
            if t.ne.len() != 2 {
                return Err(gerr(GgufError::BadShape {
                    tensor: t.name.clone(),
                    msg: format!("ne = {:?}: a LoRA tensor has 2 dimensions", t.ne),
                }));
            }
            // lora_a: ne = [in, r]; lora_b: ne = [r, out].
            let r = if ab == 'A' { t.ne[1] } else { t.ne[0] };
            let r = *rank.get_or_insert(r);
            let (out, inp) = shape(cfg, target);
            let want = if ab == 'A' { [inp, r] } else { [r, out] };
            if t.ne != want {
                return Err(shape_err(t, want));
            }
            if !crate::gguf::decodes_to_f32(t.ty) {
                return Err(gerr(GgufError::UnsupportedType {
                    tensor: t.name.clone(),
                    ty: t.ty.to_string(),
                    reason: "LoRA tensors must be F32, F16, BF16 or Q8_0",
                }));
            }
            let v = crate::gguf::to_f32(t, g.data(t)?).map_err(gerr)?;
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(gerr(GgufError::BadData {
                    tensor: t.name.clone(),
                    msg: format!("element {i} is {}", v[i]),
                }));
            }
            halves[l][target][usize::from(ab == 'B')] = Some(v);
        }
        let Some(rank) = rank else {
            return Err(EngineError::Invalid(format!(
                "{}: the adapter has no LoRA tensors",
                path.display()
            )));
        };
        if rank == 0 {
            return Err(EngineError::Invalid(format!(
                "{}: the adapter's rank is 0",
                path.display()
            )));
        }
        let mut layers = vec![vec![None; TARGETS.len()]; cfg.num_layers];
        for (l, row) in halves.into_iter().enumerate() {
            for (t, [a, b]) in row.into_iter().enumerate() {
                let (out, inp) = shape(cfg, t);
                layers[l][t] = match (a, b) {
                    (Some(a), Some(b)) => Some(LoraPair { a, b, inp, out }),
                    (None, None) => None,
                    (a, _) => {
                        let (have, miss) = if a.is_some() { ('a', 'b') } else { ('b', 'a') };
                        let name = gguf_key(l, t, 'A');
                        let base = name.trim_end_matches(".lora_a");
                        return Err(EngineError::Invalid(format!(
                            "{}: {base}.lora_{have} has no {base}.lora_{miss}",
                            path.display()
                        )));
                    }
                };
            }
        }
        let alpha = match alpha {
            Some(a) if a != 0.0 => a as f32,
            _ => rank as f32,
        };
        Ok(Adapter {
            rank,
            alpha,
            dropout: 0.0,
            layers,
        })
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
