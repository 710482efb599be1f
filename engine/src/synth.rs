//! `bitnode model synth`: random BitNet checkpoints in the real Hugging Face file layout, with a byte-level
//! BPE tokenizer shaped like Llama-3's, so that every command, test and benchmark runs with no download.
//! The `2b4t` preset has exactly the shapes of microsoft/bitnet-b1.58-2B-4T.
use crate::error::{EngineError, Result};
use crate::rng::Rng;
use crate::ternary;
use std::io::Write;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthFormat {
    /// Latent bf16 weights, `autobitlinear` / `online` (like microsoft/bitnet-b1.58-2B-4T-bf16).
    Online,
    /// Packed uint8 + bf16 `weight_scale`, `autobitlinear` / `offline` (like microsoft/bitnet-b1.58-2B-4T).
    Packed,
}

#[derive(Debug, Clone)]
pub struct Preset {
    pub name: &'static str,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub ctx: usize,
    pub theta: f64,
}

pub const PRESETS: &[Preset] = &[
    Preset {
        name: "tiny",
        vocab: 512,
        hidden: 128,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        ffn: 352,
        ctx: 256,
        theta: 10000.0,
    },
    Preset {
        name: "125m",
        vocab: 32000,
        hidden: 768,
        layers: 12,
        heads: 12,
        kv_heads: 4,
        head_dim: 64,
        ffn: 2048,
        ctx: 2048,
        theta: 10000.0,
    },
    Preset {
        name: "1b",
        vocab: 32000,
        hidden: 2048,
        layers: 24,
        heads: 32,
        kv_heads: 8,
        head_dim: 64,
        ffn: 5504,
        ctx: 2048,
        theta: 500000.0,
    },
    Preset {
        name: "2b4t",
        vocab: 128256,
        hidden: 2560,
        layers: 30,
        heads: 20,
        kv_heads: 5,
        head_dim: 128,
        ffn: 6912,
        ctx: 4096,
        theta: 500000.0,
    },
];

pub fn preset(name: &str) -> Result<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        EngineError::Invalid(format!(
            "unknown preset {name:?}; choose one of {}",
            PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
        ))
    })
}

/// Special token ids: Llama-3's for a full 128256 vocabulary, the last two ids otherwise.
fn specials(vocab: usize) -> (usize, Vec<(usize, String)>) {
    if vocab >= 128256 {
        let mut v = vec![
            (128000, "<|begin_of_text|>".to_string()),
            (128001, "<|end_of_text|>".to_string()),
        ];
        for id in 128002..vocab {
            let name = match id {
                128006 => "<|start_header_id|>".to_string(),
                128007 => "<|end_header_id|>".to_string(),
                128009 => "<|eot_id|>".to_string(),
                _ => format!("<|reserved_special_token_{}|>", id - 128002),
            };
            v.push((id, name));
        }
        (128000, v)
    } else {
        (
            vocab - 2,
            vec![
                (vocab - 2, "<|begin_of_text|>".to_string()),
                (vocab - 1, "<|end_of_text|>".to_string()),
            ],
        )
    }
}

/// GPT-2's byte-to-unicode table used by byte-level BPE.
pub fn byte_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap_or('?');
    }
    table
}

/// Llama-3's pre-tokenizer split pattern.
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer.json with the structure of Llama-3's: byte-level BPE, BOS added by a TemplateProcessing
/// post-processor. Ids 0..256 are the bytes; the rest up to the specials are pseudo-words made of
/// syllables, with the merges that build them, so generated text reads as words.
pub fn tokenizer_json(vocab: usize) -> serde_json::Value {
    use serde_json::json;
    let b2u = byte_to_unicode();
    let (first_special, specials) = specials(vocab);
    let mut vocab_map = serde_json::Map::new();
    for (b, ch) in b2u.iter().enumerate() {
        vocab_map.insert(ch.to_string(), json!(b));
    }
    let cons = [
        "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "h",
    ];
    let vows = ["a", "e", "i", "o", "u"];
    let syl: Vec<String> = cons
        .iter()
        .flat_map(|c| vows.iter().map(move |v| format!("{c}{v}")))
        .collect();
    let mut merges: Vec<serde_json::Value> = vec![];
    let mut id = 256;
    let mut add = |tok: String,
                   left: String,
                   right: String,
                   map: &mut serde_json::Map<String, serde_json::Value>,
                   id: &mut usize| {
        if *id < first_special && !map.contains_key(&tok) {
            map.insert(tok, json!(*id));
            merges.push(json!([left, right]));
            *id += 1;
        }
    };
    // Two-letter syllables, then "Ġ"+syllable, then longer words built from those.
    for s in &syl {
        add(
            s.clone(),
            s[..1].to_string(),
            s[1..].to_string(),
            &mut vocab_map,
            &mut id,
        );
    }
    for s in &syl {
        add(format!("Ġ{s}"), "Ġ".into(), s.clone(), &mut vocab_map, &mut id);
    }
    'outer: for a in &syl {
        for b in &syl {
            if id >= first_special {
                break 'outer;
            }
            add(format!("Ġ{a}{b}"), format!("Ġ{a}"), b.clone(), &mut vocab_map, &mut id);
        }
    }
    'outer2: for a in &syl {
        for b in &syl {
            for c in &syl {
                if id >= first_special {
                    break 'outer2;
                }
                add(
                    format!("Ġ{a}{b}{c}"),
                    format!("Ġ{a}{b}"),
                    c.clone(),
                    &mut vocab_map,
                    &mut id,
                );
            }
        }
    }
    // Any ids still free are unreachable fillers, as in real vocabularies padded to a round size.
    while id < first_special {
        vocab_map.insert(format!("<|filler_{id}|>"), json!(id));
        id += 1;
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .map(|(id, s)| json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let bos = "<|begin_of_text|>";
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {bos: {"id": bos, "ids": [first_special], "tokens": [bos]}}}
        ]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
                  "vocab": vocab_map, "merges": merges}
    })
}

/// Streams a safetensors file: header first, then each tensor's bytes as `fill` produces them, so a 2.4B
/// model never sits in memory whole.
struct StWriter {
    entries: Vec<(String, &'static str, Vec<usize>, usize)>,
}

impl StWriter {
    fn header(&self) -> Vec<u8> {
        let mut m = serde_json::Map::new();
        m.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut off = 0;
        for (name, dt, shape, bytes) in &self.entries {
            m.insert(
                name.clone(),
                serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [off, off + bytes]}),
            );
            off += bytes;
        }
        let mut h = serde_json::to_vec(&serde_json::Value::Object(m)).unwrap_or_default();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        h
    }
}

pub fn synth(preset: &Preset, out: &Path, seed: u64, format: SynthFormat) -> Result<()> {
    let p = preset;
    std::fs::create_dir_all(out).map_err(|e| EngineError::io(out, e))?;
    let (bos, _) = specials(p.vocab);
    let eos = bos + 1;
    let qcfg = match format {
        SynthFormat::Online => {
            serde_json::json!({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"})
        }
        SynthFormat::Packed => {
            serde_json::json!({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"})
        }
    };
    let config = serde_json::json!({
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": p.vocab, "hidden_size": p.hidden, "intermediate_size": p.ffn,
        "num_hidden_layers": p.layers, "num_attention_heads": p.heads, "num_key_value_heads": p.kv_heads,
        "head_dim": p.head_dim, "max_position_embeddings": p.ctx, "rope_theta": p.theta, "rms_norm_eps": 1e-5,
        "hidden_act": "relu2", "tie_word_embeddings": true, "bos_token_id": bos, "eos_token_id": eos,
        "torch_dtype": "bfloat16", "attention_bias": false, "attention_dropout": 0.0,
        "quantization_config": qcfg,
        "bitnode_synth": {"preset": p.name, "seed": seed}
    });
    let write = |name: &str, v: &serde_json::Value| -> Result<()> {
        let path = out.join(name);
        let s = serde_json::to_string_pretty(v).map_err(|e| EngineError::Invalid(e.to_string()))?;
        crate::util::write_atomic(&path, s.as_bytes())
    };
    write("config.json", &config)?;
    write("tokenizer.json", &tokenizer_json(p.vocab))?;
    write(
        "tokenizer_config.json",
        &serde_json::json!({
            "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": true,
            "chat_template": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
            "model_max_length": p.ctx
        }),
    )?;

    // Tensor list in checkpoint order.
    let (c, f, qd, kvd) = (p.hidden, p.ffn, p.heads * p.head_dim, p.kv_heads * p.head_dim);
    let mut st = StWriter { entries: vec![] };
    st.entries.push((
        "model.embed_tokens.weight".into(),
        "BF16",
        vec![p.vocab, c],
        p.vocab * c * 2,
    ));
    let projs: [(&str, usize, usize); 7] = [
        ("self_attn.q_proj", qd, c),
        ("self_attn.k_proj", kvd, c),
        ("self_attn.v_proj", kvd, c),
        ("self_attn.o_proj", c, qd),
        ("mlp.gate_proj", f, c),
        ("mlp.up_proj", f, c),
        ("mlp.down_proj", c, f),
    ];
    for l in 0..p.layers {
        for (n, dim) in [
            ("input_layernorm", c),
            ("post_attention_layernorm", c),
            ("self_attn.attn_sub_norm", qd),
            ("mlp.ffn_sub_norm", f),
        ] {
            st.entries
                .push((format!("model.layers.{l}.{n}.weight"), "BF16", vec![dim], dim * 2));
        }
        for (n, o, i) in projs {
            match format {
                SynthFormat::Online => {
                    st.entries
                        .push((format!("model.layers.{l}.{n}.weight"), "BF16", vec![o, i], o * i * 2))
                }
                SynthFormat::Packed => {
                    st.entries
                        .push((format!("model.layers.{l}.{n}.weight"), "U8", vec![o / 4, i], o / 4 * i));
                    st.entries
                        .push((format!("model.layers.{l}.{n}.weight_scale"), "BF16", vec![1], 2));
                }
            }
        }
    }
    st.entries.push(("model.norm.weight".into(), "BF16", vec![c], c * 2));

    let path = out.join("model.safetensors");
    let tmp = out.join(".model.safetensors.tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| EngineError::io(&tmp, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
    let io = |e| EngineError::io(&tmp, e);
    let h = st.header();
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&h).map_err(io)?;
    let mut rng = Rng::new(seed);
    let bf16 = |x: f32| half::bf16::from_f32(x).to_le_bytes();
    for (name, _, shape, _) in &st.entries {
        if name.ends_with("embed_tokens.weight") {
            // Tied logits are x . E with x of unit RMS: this std gives logits of std ~3, a distribution that
            // is neither flat nor one-hot, so sampling settings visibly matter.
            let std = 3.0 / (shape[1] as f32).sqrt();
            for _ in 0..shape[0] * shape[1] {
                w.write_all(&bf16(std * rng.normal())).map_err(io)?;
            }
        } else if name.ends_with("norm.weight") {
            for _ in 0..shape[0] {
                w.write_all(&bf16(1.0 + 0.1 * rng.normal())).map_err(io)?;
            }
        } else if name.ends_with("weight_scale") {
            w.write_all(&bf16(0.5 + rng.uniform())).map_err(io)?;
        } else if shape.len() == 2 && format == SynthFormat::Online {
            for _ in 0..shape[0] * shape[1] {
                w.write_all(&bf16(0.02 * rng.normal())).map_err(io)?;
            }
        } else {
            // Packed: draw ternary values uniformly, pack in HF's layout.
            let (o, i) = (shape[0] * 4, shape[1]);
            let t: Vec<i8> = (0..o * i).map(|_| (rng.next_u64() % 3) as i8 - 1).collect();
            w.write_all(&ternary::hf_pack(&t, o, i)).map_err(io)?;
        }
    }
    let file = w.into_inner().map_err(|e| EngineError::io(&tmp, e.into_error()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(|e| EngineError::io(&path, e))?;
    Ok(())
}
