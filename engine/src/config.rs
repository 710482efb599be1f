//! `config.json` of a Hugging Face BitNet checkpoint.
use crate::error::{EngineError, Result};
use serde::Deserialize;
use std::path::Path;

/// How the ternary projections are stored and how their output is scaled
/// (the table in bitnet-reference.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightForm {
    /// `autobitlinear` / `online`: latent float weights, ternarized at load with absmean.
    Online,
    /// `autobitlinear` / `offline`: packed uint8 + `weight_scale`, output multiplied by the scale.
    OfflineAutoBitLinear,
    /// `bitlinear` / `offline`: packed uint8 + `weight_scale`, output divided by the scale.
    OfflineBitLinear,
}

#[derive(Debug, Clone, Deserialize)]
struct RawQuant {
    #[serde(default)]
    quant_method: Option<String>,
    #[serde(default)]
    linear_class: Option<String>,
    #[serde(default)]
    quantization_mode: Option<String>,
    #[serde(default)]
    use_rms_norm: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_ctx")]
    max_position_embeddings: usize,
    #[serde(default)]
    rope_theta: Option<f64>,
    /// transformers 5 writes `rope_parameters: {rope_theta, rope_type}` instead of `rope_theta`.
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    quantization_config: Option<RawQuant>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
}
fn default_ctx() -> usize {
    2048
}
fn default_eps() -> f64 {
    // BitNetConfig's default.
    1e-5
}

/// The parsed, validated model shape. Letters as in llm.c: C = hidden, L = layers, NH / NKV heads, HD head dim,
/// F = FFN width, V = vocab.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// `None` means "look at the tensors": a checkpoint without `lm_head.weight` is tied.
    pub tie_word_embeddings: Option<bool>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub form: WeightForm,
}

fn ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let cerr = |msg: String| EngineError::Config {
            path: path.to_path_buf(),
            msg,
        };
        // Check model_type before the full parse so that a llama config gets the precise error.
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| cerr(e.to_string()))?;
        match v.get("model_type").and_then(|m| m.as_str()) {
            Some("bitnet") => {}
            Some(other) => return Err(EngineError::UnknownModelType(other.to_string())),
            None => return Err(cerr("no model_type field (expected \"bitnet\")".into())),
        }
        let raw: RawConfig = serde_json::from_value(v).map_err(|e| cerr(e.to_string()))?;
        let _ = &raw.model_type;
        if let Some(act) = &raw.hidden_act {
            if act != "relu2" {
                return Err(cerr(format!("hidden_act {act:?} is not supported (BitNet uses relu2)")));
            }
        }
        if let Some(rs) = &raw.rope_scaling {
            if !rs.is_null() {
                return Err(cerr("rope_scaling is not supported for bitnet models".into()));
            }
        }
        let mut rope_theta = raw.rope_theta;
        if let Some(rp) = &raw.rope_parameters {
            if let Some(t) = rp.get("rope_type").and_then(|t| t.as_str()) {
                if t != "default" {
                    return Err(cerr(format!("rope_type {t:?} is not supported (only \"default\")")));
                }
            }
            if rope_theta.is_none() {
                rope_theta = rp.get("rope_theta").and_then(|t| t.as_f64());
            }
        }
        // BitNetConfig's default theta.
        let rope_theta = rope_theta.unwrap_or(500000.0);
        let form = match &raw.quantization_config {
            None => WeightForm::Online,
            Some(q) => {
                if let Some(m) = &q.quant_method {
                    if m != "bitnet" {
                        return Err(cerr(format!(
                            "quant_method {m:?} is not supported (expected \"bitnet\")"
                        )));
                    }
                }
                if q.use_rms_norm == Some(true) {
                    return Err(cerr("quantization_config.use_rms_norm = true is not supported".into()));
                }
                match (
                    q.linear_class.as_deref().unwrap_or("bitlinear"),
                    q.quantization_mode.as_deref().unwrap_or("offline"),
                ) {
                    ("autobitlinear", "online") => WeightForm::Online,
                    ("autobitlinear", "offline") => WeightForm::OfflineAutoBitLinear,
                    ("bitlinear", "offline") => WeightForm::OfflineBitLinear,
                    (c, m) => return Err(cerr(format!("unsupported linear_class/quantization_mode {c:?}/{m:?}"))),
                }
            }
        };
        let nh = raw.num_attention_heads;
        let nkv = raw.num_key_value_heads.unwrap_or(nh);
        if nh == 0 || nkv == 0 || !nh.is_multiple_of(nkv) {
            return Err(cerr(format!(
                "num_attention_heads {nh} must be a positive multiple of num_key_value_heads {nkv}"
            )));
        }
        let hd = raw.head_dim.unwrap_or(raw.hidden_size.checked_div(nh).unwrap_or(0));
        if hd == 0 || !hd.is_multiple_of(4) || hd > 256 || 256 % hd != 0 {
            // The attention kernel reads keys as vec4 and splits its 256 threads into 256/HD groups.
            return Err(cerr(format!("head_dim {hd} must be one of 4, 8, 16, 32, 64, 128, 256")));
        }
        let c = raw.hidden_size;
        let f = raw.intermediate_size;
        for (name, dim) in [
            ("hidden_size", c),
            ("intermediate_size", f),
            ("q width", nh * hd),
            ("kv width", nkv * hd),
        ] {
            if dim == 0 || dim % 16 != 0 {
                // The packed GPU layout holds 16 ternary weights per u32 along the input dimension.
                return Err(cerr(format!("{name} = {dim} must be a positive multiple of 16")));
            }
        }
        if raw.vocab_size == 0 || raw.num_hidden_layers == 0 || raw.max_position_embeddings == 0 {
            return Err(cerr(
                "vocab_size, num_hidden_layers and max_position_embeddings must be positive".into(),
            ));
        }
        Ok(ModelConfig {
            vocab_size: raw.vocab_size,
            hidden_size: c,
            intermediate_size: f,
            num_layers: raw.num_hidden_layers,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            max_position_embeddings: raw.max_position_embeddings,
            rope_theta,
            rms_norm_eps: raw.rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings,
            bos_token_id: ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: ids(&raw.eos_token_id),
            form,
        })
    }
}
