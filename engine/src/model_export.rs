//! `bitnode model export --gguf OUT --model DIR`: a Hugging Face BitNet directory (any checkpoint form
//! bitnode loads) as the GGUF that llama.cpp and QVAC load: architecture `bitnet`, TQ2_0 projections, the
//! embedding (and an untied `output`) in its stored float type, F32 norms, the `{arch}.*` hyperparameters
//! with `bitnet.hidden_activation` written out (so no reader has to guess it from the vocabulary), and the
//! tokenizer as llama.cpp's converter writes a Llama-3 style BPE (`gpt2`, pre `llama-bpe`).
//!
//! TQ2_0 keeps one fp16 scale per 256-element block: every block gets the projection's scale rounded to
//! fp16. Packed checkpoints (microsoft's 2B-4T: bf16 `weight_scale`) hold scales that fp16 keeps exactly;
//! online (latent) checkpoints get `mean|W|` rounded to fp16, a relative change of at most 2^-11, which the
//! export reports. Everything else is copied exactly (bf16 stays bf16).
use crate::error::{EngineError, Result};
use crate::gguf::{Array, GgmlType, GgufWriter, Value};
use crate::model::{Model, TernaryLinear};
use std::path::Path;

/// What [`export_model`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelExport {
    pub path: std::path::PathBuf,
    pub bytes: u64,
    pub tensors: usize,
    /// The largest relative change of a projection scale when rounded to fp16 (0 when all are exact).
    pub max_scale_rounding: f64,
    pub embedding_type: String,
    pub tied: bool,
}

/// One projection as TQ2_0 blocks (ggml `block_tq2_0`: `qs[64]`, then fp16 `d`; element e of a block at
/// `qs[32 * (e / 128) + e % 32]`, bits `2 * ((e % 128) / 32)`, code = value + 1), the inverse of
/// `gguf::tq2_0_to_ternary`.
fn tq2_0_bytes(p: &TernaryLinear) -> (Vec<u8>, f64) {
    let d = half::f16::from_f32(p.scale);
    let rounding = if p.scale == 0.0 {
        0.0
    } else {
        ((d.to_f32() - p.scale) / p.scale).abs() as f64
    };
    let blocks_per_row = p.inp / 256;
    let mut out = vec![0u8; p.out * blocks_per_row * 66];
    for r in 0..p.out {
        let row = p.row(r);
        for b in 0..blocks_per_row {
            let blk = &mut out[(r * blocks_per_row + b) * 66..][..66];
            for e in 0..256 {
                let code = (crate::ternary::get(row, 256 * b + e) + 1) as u8;
                blk[32 * (e / 128) + e % 32] |= code << (2 * ((e % 128) / 32));
            }
            blk[64..66].copy_from_slice(&d.to_le_bytes());
        }
    }
    (out, rounding)
}

/// A float matrix [rows, cols] in its stored type where GGUF has it (BF16, F16), else F32.
fn matrix_tensor(m: &crate::model::MappedMatrix) -> (GgmlType, Vec<u8>) {
    let dtype = m.dtype_name();
    let mut out = Vec::new();
    let mut row = vec![0f32; m.cols];
    let (ty, width) = match dtype.as_str() {
        "BF16" => (GgmlType::BF16, 2),
        "F16" => (GgmlType::F16, 2),
        _ => (GgmlType::F32, 4),
    };
    out.reserve(m.rows * m.cols * width);
    for r in 0..m.rows {
        m.row_f32(r, &mut row);
        for &x in &row {
            match ty {
                GgmlType::BF16 => out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                GgmlType::F16 => out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                _ => out.extend_from_slice(&x.to_le_bytes()),
            }
        }
    }
    (ty, out)
}

fn invalid(msg: String) -> EngineError {
    EngineError::Invalid(msg)
}

/// The vocabulary of a `tokenizer.json` BPE as llama.cpp's `_set_vocab_gpt2` writes it: tokens by id,
/// their types (1 normal, 3 control for special added tokens, 4 user-defined for other added ones) and the
/// merges as "a b" strings.
fn bpe_vocab(dir: &Path, vocab_size: usize) -> Result<(Vec<String>, Vec<i32>, Vec<String>)> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
    let tok: serde_json::Value = serde_json::from_str(&text).map_err(|e| EngineError::Tokenizer {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let bad = |msg: &str| EngineError::Tokenizer {
        path: path.clone(),
        msg: msg.to_string(),
    };
    let model = &tok["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(
            "only a byte-level BPE tokenizer (Llama-3 style, as the 2B-4T has) can be written as GGUF",
        ));
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![1i32; vocab_size];
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object"))?;
    for (t, id) in vocab {
        let id = id.as_u64().ok_or_else(|| bad("a vocabulary id is not a number"))? as usize;
        let slot = tokens.get_mut(id).ok_or_else(|| {
            bad(&format!(
                "token id {id} is outside the model's vocabulary of {vocab_size}"
            ))
        })?;
        *slot = Some(t.clone());
    }
    for a in tok["added_tokens"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err(bad("an added token has no id or content"));
        };
        let id = id as usize;
        if id >= vocab_size {
            return Err(bad(&format!(
                "added token id {id} is outside the vocabulary of {vocab_size}"
            )));
        }
        tokens[id] = Some(content.to_string());
        types[id] = if a["special"].as_bool().unwrap_or(false) { 3 } else { 4 };
    }
    // Ids the tokenizer never produces (a model's vocabulary padded past the tokenizer's) get llama.cpp's
    // placeholder and the UNUSED type.
    let tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| bad("model.merges is missing"))?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(p) if p.len() == 2 => Ok(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            )),
            _ => Err(bad("a merge is neither \"a b\" nor [a, b]")),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((tokens, types, merges))
}

/// Writes the model in `dir` (a Hugging Face BitNet directory) to `out` as a `bitnet` GGUF with TQ2_0
/// projections, atomically (a temporary file, then a rename).
pub fn export_model(dir: &Path, out: &Path) -> Result<ModelExport> {
    if crate::model::is_gguf(dir) {
        return Err(invalid(format!("{} is already a GGUF model", dir.display())));
    }
    let model = Model::load(dir)?;
    let c = &model.config;
    if !c.hidden_size.is_multiple_of(256)
        || !c.intermediate_size.is_multiple_of(256)
        || !(c.num_heads * c.head_dim).is_multiple_of(256)
    {
        return Err(invalid(format!(
            "TQ2_0 needs every projection's input width to be a multiple of 256; this model has hidden {}, \
             intermediate {} and attention width {}",
            c.hidden_size,
            c.intermediate_size,
            c.num_heads * c.head_dim
        )));
    }
    let tokenizer = crate::tokenizer::Tokenizer::load(dir)?;
    let (tokens, types, merges) = bpe_vocab(dir, c.vocab_size)?;
    let g = |e: crate::gguf::GgufError| EngineError::gguf(out, e);
    let mut w = GgufWriter::new();
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bitnet".into());
    let u32v = |v: usize| Value::U32(v as u32);
    w.add_str("general.architecture", "bitnet").map_err(g)?;
    w.add_str("general.name", &name).map_err(g)?;
    // llama.cpp's LLAMA_FTYPE_MOSTLY_TQ2_0.
    w.add("general.file_type", Value::U32(37)).map_err(g)?;
    w.add("bitnet.vocab_size", u32v(c.vocab_size)).map_err(g)?;
    w.add("bitnet.context_length", u32v(c.max_position_embeddings))
        .map_err(g)?;
    w.add("bitnet.embedding_length", u32v(c.hidden_size)).map_err(g)?;
    w.add("bitnet.block_count", u32v(c.num_layers)).map_err(g)?;
    w.add("bitnet.feed_forward_length", u32v(c.intermediate_size))
        .map_err(g)?;
    w.add("bitnet.attention.head_count", u32v(c.num_heads)).map_err(g)?;
    w.add("bitnet.attention.head_count_kv", u32v(c.num_kv_heads))
        .map_err(g)?;
    w.add("bitnet.attention.key_length", u32v(c.head_dim)).map_err(g)?;
    w.add("bitnet.attention.value_length", u32v(c.head_dim)).map_err(g)?;
    w.add("bitnet.rope.dimension_count", u32v(c.head_dim)).map_err(g)?;
    w.add(
        "bitnet.attention.layer_norm_rms_epsilon",
        Value::F32(c.rms_norm_eps as f32),
    )
    .map_err(g)?;
    w.add("bitnet.rope.freq_base", Value::F32(c.rope_theta as f32))
        .map_err(g)?;
    w.add_str("bitnet.hidden_activation", c.activation.name()).map_err(g)?;
    w.add_str("tokenizer.ggml.model", "gpt2").map_err(g)?;
    w.add_str("tokenizer.ggml.pre", "llama-bpe").map_err(g)?;
    w.add("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)))
        .map_err(g)?;
    w.add("tokenizer.ggml.token_type", Value::Array(Array::I32(types)))
        .map_err(g)?;
    w.add("tokenizer.ggml.merges", Value::Array(Array::String(merges)))
        .map_err(g)?;
    if let Some(b) = c.bos_token_id {
        w.add("tokenizer.ggml.bos_token_id", Value::U32(b)).map_err(g)?;
        // Whether the tokenizer puts BOS first, as its post-processor does.
        let ids = tokenizer.encode("a")?;
        w.add("tokenizer.ggml.add_bos_token", Value::Bool(ids.first() == Some(&b)))
            .map_err(g)?;
    }
    if let Some(&e) = c.eos_token_ids.first() {
        w.add("tokenizer.ggml.eos_token_id", Value::U32(e)).map_err(g)?;
    }
    if let Some(&e) = c.eos_token_ids.get(1) {
        // Llama-3's <|eot_id|>: llama.cpp reads the end of a chat turn from here.
        w.add("tokenizer.ggml.eot_token_id", Value::U32(e)).map_err(g)?;
    }
    let tcfg = dir.join("tokenizer_config.json");
    if let Ok(text) = std::fs::read_to_string(&tcfg) {
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| EngineError::Tokenizer {
            path: tcfg.clone(),
            msg: e.to_string(),
        })?;
        if let Some(t) = v["chat_template"].as_str() {
            w.add_str("tokenizer.chat_template", t).map_err(g)?;
        }
    }

    let (ety, ebytes) = matrix_tensor(&model.embed);
    let embedding_type = ety.to_string();
    w.add_tensor("token_embd.weight", &[c.hidden_size, c.vocab_size], ety, ebytes)
        .map_err(g)?;
    let mut worst = 0f64;
    for (li, l) in model.layers()?.iter().enumerate() {
        let norms = [
            ("attn_norm", &l.input_layernorm),
            ("ffn_norm", &l.post_attention_layernorm),
            ("attn_sub_norm", &l.attn_sub_norm),
            ("ffn_sub_norm", &l.ffn_sub_norm),
        ];
        for (n, v) in norms {
            w.add_f32(&format!("blk.{li}.{n}.weight"), &[v.len()], v).map_err(g)?;
        }
        let projections = [
            &l.q_proj,
            &l.k_proj,
            &l.v_proj,
            &l.o_proj,
            &l.gate_proj,
            &l.up_proj,
            &l.down_proj,
        ];
        for (n, p) in crate::model::GGUF_PROJECTIONS.iter().zip(projections) {
            let (bytes, rounding) = tq2_0_bytes(p);
            worst = worst.max(rounding);
            w.add_tensor(&format!("blk.{li}.{n}.weight"), &[p.inp, p.out], GgmlType::TQ2_0, bytes)
                .map_err(g)?;
        }
    }
    w.add_f32("output_norm.weight", &[c.hidden_size], &model.norm)
        .map_err(g)?;
    if let Some(head) = &model.lm_head {
        let (ty, bytes) = matrix_tensor(head);
        w.add_tensor("output.weight", &[c.hidden_size, c.vocab_size], ty, bytes)
            .map_err(g)?;
    }
    let tensors = 2 + 11 * c.num_layers + usize::from(model.lm_head.is_some());
    let bytes = w.to_bytes();
    crate::util::write_atomic(out, &bytes)?;
    Ok(ModelExport {
        path: out.to_path_buf(),
        bytes: bytes.len() as u64,
        tensors,
        max_scale_rounding: worst,
        embedding_type,
        tied: model.lm_head.is_none(),
    })
}
