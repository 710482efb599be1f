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

/// The FFN activation between the gate and up projections: `act(gate) * up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `relu(x)^2`: BitNet b1.58 2B-4T (HF `hidden_act: "relu2"`).
    Relu2,
    /// `silu(x) = x sigmoid(x)`: the 1bitLLM family (`bitnet_b1_58-*`), which QVAC's published TQ1_0/TQ2_0
    /// files come from (HF `hidden_act: "silu"`).
    Silu,
}

impl std::str::FromStr for Activation {
    type Err = String;
    /// `relu2` or `silu` (the names of `--activation` and of HF's `hidden_act`).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "relu2" => Ok(Activation::Relu2),
            "silu" => Ok(Activation::Silu),
            other => Err(format!("activation {other:?} is not one bitnode knows (relu2 or silu)")),
        }
    }
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu2 => "relu2",
            Activation::Silu => "silu",
        }
    }
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
    pub activation: Activation,
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
        let activation = match &raw.hidden_act {
            Some(act) => act
                .parse::<Activation>()
                .map_err(|_| cerr(format!("hidden_act {act:?} is not supported (relu2 or silu)")))?,
            None => Activation::Relu2,
        };
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
        let hd = raw.head_dim.unwrap_or(raw.hidden_size.checked_div(nh).unwrap_or(0));
        ModelConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
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
            activation,
        }
        .checked()
        .map_err(cerr)
    }

    /// Checks the shapes the kernels can run; the message names the field. Shared by `config.json` and GGUF
    /// metadata, so that both refuse the same models with the same reasons.
    pub fn checked(self) -> std::result::Result<Self, String> {
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        if nh == 0 || nkv == 0 || !nh.is_multiple_of(nkv) {
            return Err(format!(
                "num_attention_heads {nh} must be a positive multiple of num_key_value_heads {nkv}"
            ));
        }
        if hd == 0 || !hd.is_multiple_of(4) || hd > 256 || 256 % hd != 0 {
            // The attention kernel reads keys as vec4 and splits its 256 threads into 256/HD groups.
            return Err(format!("head_dim {hd} must be one of 4, 8, 16, 32, 64, 128, 256"));
        }
        for (name, dim) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("q width", nh * hd),
            ("kv width", nkv * hd),
        ] {
            if dim == 0 || dim % 16 != 0 {
                // The packed GPU layout holds 16 ternary weights per u32 along the input dimension.
                return Err(format!("{name} = {dim} must be a positive multiple of 16"));
            }
        }
        if self.vocab_size == 0 || self.num_layers == 0 || self.max_position_embeddings == 0 {
            return Err("vocab_size, num_hidden_layers and max_position_embeddings must be positive".into());
        }
        let finite = self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0;
        if !(finite && self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!(
                "rms_norm_eps {} and rope_theta {} must be finite, the theta positive",
                self.rms_norm_eps, self.rope_theta
            ));
        }
        Ok(self)
    }
}

/// The architectures whose GGUF files bitnode reads: llama.cpp's and QVAC's `bitnet`, and bitnet.cpp's
/// `bitnet-b1.58` (microsoft's published 2B-4T file) and `bitnet-25` (its first 2B-4T file).
pub const GGUF_ARCHITECTURES: [&str; 3] = ["bitnet", "bitnet-b1.58", "bitnet-25"];

/// The FFN activation of a GGUF model (the rule of issue 16, documented in the GGUF notes):
/// 1. `{arch}.hidden_activation` when the file has it (newest llama.cpp reads this key);
/// 2. otherwise ReLU² for bitnet.cpp's architectures, which only ever held the 2B-4T family;
/// 3. otherwise, for `bitnet`, the vocabulary tells the families apart: llama.cpp's converter writes the
///    2B-4T (Llama-3 tokenizer) as `gpt2` and the 1bitLLM models (SentencePiece) as `llama`. Upstream's
///    own default for `bitnet` is SiLU, so an unknown vocabulary gets SiLU too.
pub fn gguf_activation(g: &crate::gguf::Gguf, arch: &str) -> crate::gguf::Result<Activation> {
    let key = format!("{arch}.hidden_activation");
    if let Some(a) = g.get_str(&key)? {
        return match a {
            "relu2" | "relu_sqr" | "relu_squared" => Ok(Activation::Relu2),
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(crate::gguf::GgufError::BadValue {
                key,
                msg: format!("activation {other:?} is not one bitnode knows (relu2 or silu)"),
            }),
        };
    }
    if arch != "bitnet" {
        return Ok(Activation::Relu2);
    }
    Ok(match g.get_str("tokenizer.ggml.model")? {
        Some("gpt2") => Activation::Relu2,
        _ => Activation::Silu,
    })
}

impl ModelConfig {
    /// The config of a GGUF model from its `{arch}.*` hyperparameters (llama.cpp's `load_hparams` keys) and
    /// tokenizer ids. `path` is for messages. Checks the same shapes as `config.json`; refuses what the
    /// engine cannot run (another architecture, RoPE scaling, a partial rotary dimension) with the key at
    /// fault.
    pub fn from_gguf(g: &crate::gguf::Gguf, path: &Path) -> Result<Self> {
        use crate::gguf::GgufError;
        let gerr = |e: GgufError| EngineError::gguf(path, e);
        let bad = |key: &str, msg: String| EngineError::gguf(path, GgufError::BadValue { key: key.into(), msg });
        let arch = g.architecture().map_err(gerr)?;
        if !GGUF_ARCHITECTURES.contains(&arch) {
            return Err(bad(
                "general.architecture",
                format!("{arch:?} is not a BitNet architecture bitnode runs (expected one of {GGUF_ARCHITECTURES:?})"),
            ));
        }
        if let Some(t) = g.get_str("general.type").map_err(gerr)? {
            if t != "model" {
                return Err(bad(
                    "general.type",
                    format!("is {t:?}: this file is not a model (an adapter?)"),
                ));
            }
        }
        let key = |k: &str| format!("{arch}.{k}");
        let uint = |k: &str| -> Result<Option<usize>> {
            let name = key(k);
            match g.get_uint(&name).map_err(gerr)? {
                None => Ok(None),
                Some(v) => usize::try_from(v)
                    .ok()
                    .filter(|&v| v <= u32::MAX as usize)
                    .map(Some)
                    .ok_or_else(|| bad(&name, format!("{v} is too large"))),
            }
        };
        let need = |k: &str| -> Result<usize> { uint(k)?.ok_or_else(|| bad(&key(k), "missing".into())) };
        let float = |k: &str| g.get_float(&key(k)).map_err(gerr);
        let hidden = need("embedding_length")?;
        let layers = need("block_count")?;
        let ffn = need("feed_forward_length")?;
        let nh = need("attention.head_count")?;
        let nkv = uint("attention.head_count_kv")?.unwrap_or(nh);
        let hd = match uint("attention.key_length")? {
            Some(k) => k,
            None => hidden.checked_div(nh).unwrap_or(0),
        };
        if let Some(v) = uint("attention.value_length")? {
            if v != hd {
                return Err(bad(
                    &key("attention.value_length"),
                    format!("{v} differs from the key length {hd}"),
                ));
            }
        }
        if let Some(r) = uint("rope.dimension_count")? {
            // The engine rotates the whole head (HF's rotate-half over head_dim).
            if r != hd {
                return Err(bad(
                    &key("rope.dimension_count"),
                    format!("{r}: partial rotary embeddings are not supported (head dimension {hd})"),
                ));
            }
        }
        if let Some(t) = g.get_str(&key("rope.scaling.type")).map_err(gerr)? {
            // llama.cpp's BitNet converter writes `linear` with factor 1.0, which is no scaling at all.
            let factor = float("rope.scaling.factor")?.unwrap_or(1.0);
            if !(t == "none" || (t == "linear" && factor == 1.0)) {
                return Err(bad(
                    &key("rope.scaling.type"),
                    format!("RoPE scaling {t:?} (factor {factor}) is not supported"),
                ));
            }
        }
        let ctx = need("context_length")?;
        // llama.cpp's bitnet loader requires the epsilon; there is no default to fall back on.
        let eps = float("attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| bad(&key("attention.layer_norm_rms_epsilon"), "missing".into()))?;
        // llama.cpp's default when the key is absent.
        let theta = float("rope.freq_base")?.unwrap_or(10000.0);
        let tokens = g.get_array("tokenizer.ggml.tokens").map_err(gerr)?.map(|a| a.len());
        let vocab = match (uint("vocab_size")?, tokens) {
            (Some(v), _) => v,
            (None, Some(n)) => n,
            (None, None) => {
                return Err(bad(
                    &key("vocab_size"),
                    "missing, and there is no tokenizer.ggml.tokens to count".into(),
                ))
            }
        };
        let id = |k: &str| -> Result<Option<u32>> {
            match g.get_uint(k).map_err(gerr)? {
                None => Ok(None),
                Some(v) if (v as usize) < vocab => Ok(Some(v as u32)),
                Some(v) => Err(bad(k, format!("token id {v} is outside the vocabulary of {vocab}"))),
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let mut eos: Vec<u32> = id("tokenizer.ggml.eos_token_id")?.into_iter().collect();
        // Llama-3 style vocabularies end a chat turn with <|eot_id|>, which llama.cpp records here.
        if let Some(e) = id("tokenizer.ggml.eot_token_id")? {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
        let activation = gguf_activation(g, arch).map_err(gerr)?;
        ModelConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_layers: layers,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            max_position_embeddings: ctx,
            rope_theta: theta,
            rms_norm_eps: eps,
            // A GGUF file without `output.weight` is tied (llama.cpp falls back to token_embd).
            tie_word_embeddings: Some(g.tensor("output.weight").is_none()),
            bos_token_id: bos,
            eos_token_ids: eos,
            // GGUF projections carry their own scale, which multiplies the output (W = T * s): the offline
            // AutoBitLinear convention. The GGUF loader decodes them itself; the form only tells the rest
            // of the engine how `TernaryLinear::scale` is meant.
            form: WeightForm::OfflineAutoBitLinear,
            activation,
        }
        .checked()
        .map_err(|msg| EngineError::Config {
            path: path.to_path_buf(),
            msg: format!("GGUF hyperparameters ({arch}.*): {msg}"),
        })
    }
}
