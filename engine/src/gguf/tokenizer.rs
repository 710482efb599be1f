//! A `tokenizers` tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` keys, so that a user holding only
//! the GGUF gets the same token ids as the model's own tokenizer files would give.
//!
//! The rebuild follows llama.cpp's `llama_vocab::impl::load` (how it reads the keys) and the shape of the
//! Hugging Face tokenizer.json files the converters started from (so that the `tokenizers` crate does the
//! encoding and ids match those files):
//! - `gpt2`: byte-level BPE, Llama-3 style (the 2B-4T family): vocab = the token list, merges split at the
//!   first space after position 0 with rank = index, the Llama-3 pre-tokenizer regex then ByteLevel
//!   without its own regex, `ignore_merges` (llama.cpp sets it for llama-bpe);
//! - `llama`: SentencePiece-style BPE (the 1bitLLM family): tokens with scores, `▁` for spaces, byte
//!   fallback through the `<0xXX>` tokens. SentencePiece's BPE merges the adjacent pair whose result has the
//!   highest score; the merges are therefore derived from the vocabulary ordered by score, as transformers'
//!   `LlamaConverter` does.
//!
//! Tokens of type CONTROL (and UNKNOWN) become special added tokens, USER_DEFINED ones plain added tokens,
//! as the converters' `SpecialVocab` recorded them. BOS is prepended when `tokenizer.ggml.add_bos_token`
//! says so (default: when the file names a BOS id, as llama.cpp does for both vocabularies bitnode reads).
use super::error::GgufError;
use super::reader::{Array, Gguf};
use serde_json::{json, Map, Value};

/// llama.cpp's token types (`tokenizer.ggml.token_type`, gguf-py `TokenType`).
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// The Llama-3 pre-tokenizer regex as Meta's tokenizer.json spells it (llama.cpp's
/// `LLAMA_VOCAB_PRE_TYPE_LLAMA3` is the same pattern with the case-insensitive group expanded).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` values whose pre-tokenizer is Llama-3's. An absent key (microsoft's own 2B-4T
/// file: bitnet.cpp's converter never writes it) and llama.cpp's fallback name `default` are taken as
/// Llama-3 too, since the only `gpt2` BitNet vocabulary is the 2B-4T's.
const LLAMA3_PRE: [&str; 3] = ["llama-bpe", "llama3", "default"];

/// What a GGUF says about its tokenizer beside the vocabulary: the data loader's chat template and the
/// BOS/EOS texts it renders with.
#[derive(Debug, Clone, Default)]
pub struct GgufSpecials {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

/// Why a tokenizer could not be rebuilt: a key of the wrong type or value, or the `tokenizers` crate
/// refusing what was built (with its message).
#[derive(Debug)]
pub enum Error {
    Gguf(GgufError),
    Build(String),
}

impl From<GgufError> for Error {
    fn from(e: GgufError) -> Self {
        Error::Gguf(e)
    }
}

fn bad(key: &str, msg: impl Into<String>) -> Error {
    Error::Gguf(GgufError::BadValue {
        key: key.into(),
        msg: msg.into(),
    })
}

fn strings<'a>(g: &'a Gguf, key: &str) -> Result<Option<&'a [String]>, Error> {
    match g.get_array(key)? {
        None => Ok(None),
        Some(Array::String(v)) => Ok(Some(v)),
        Some(a) => Err(Error::Gguf(GgufError::KeyType {
            key: key.into(),
            expected: "array of strings",
            found: a.elem_type_name(),
        })),
    }
}

/// An id key, checked against the vocabulary.
fn token_id(g: &Gguf, key: &str, n: usize) -> Result<Option<u32>, Error> {
    match g.get_uint(key)? {
        None => Ok(None),
        Some(v) if (v as usize) < n => Ok(Some(v as u32)),
        Some(v) => Err(bad(key, format!("token id {v} is outside the vocabulary of {n}"))),
    }
}

/// The tokenizer and its specials from `g`'s metadata.
pub fn build(g: &Gguf) -> Result<(tokenizers::Tokenizer, GgufSpecials), Error> {
    let model = g
        .get_str("tokenizer.ggml.model")?
        .ok_or_else(|| bad("tokenizer.ggml.model", "missing: the file has no tokenizer"))?;
    let tokens = strings(g, "tokenizer.ggml.tokens")?
        .ok_or_else(|| bad("tokenizer.ggml.tokens", "missing: the file has no vocabulary"))?;
    let n = tokens.len();
    if n == 0 {
        return Err(bad("tokenizer.ggml.tokens", "is empty"));
    }
    let types: Vec<i32> = match g.get_array("tokenizer.ggml.token_type")? {
        None => vec![1; n],
        Some(Array::I32(v)) if v.len() == n => v.clone(),
        Some(Array::U32(v)) if v.len() == n => v.iter().map(|&t| t as i32).collect(),
        Some(a) => {
            return Err(bad(
                "tokenizer.ggml.token_type",
                format!("{} {} values for {n} tokens", a.len(), a.elem_type_name()),
            ))
        }
    };
    let bos = token_id(g, "tokenizer.ggml.bos_token_id", n)?;
    let eos = token_id(g, "tokenizer.ggml.eos_token_id", n)?;
    let add_bos = g.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(bos.is_some());
    let add_eos = g.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    if add_bos && bos.is_none() {
        return Err(bad(
            "tokenizer.ggml.add_bos_token",
            "is true but there is no bos_token_id",
        ));
    }
    if add_eos && eos.is_none() {
        return Err(bad(
            "tokenizer.ggml.add_eos_token",
            "is true but there is no eos_token_id",
        ));
    }
    // The first id of a text wins when a converter wrote one twice (holes padded with the same name would
    // otherwise move an id).
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        if !vocab.contains_key(t) {
            vocab.insert(t.clone(), json!(i));
        }
    }
    let mut added = vec![];
    for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
        if matches!(ty, TOKEN_CONTROL | TOKEN_UNKNOWN | TOKEN_USER_DEFINED) {
            added.push(json!({
                "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty != TOKEN_USER_DEFINED,
            }));
        }
    }
    let (normalizer, pre_tokenizer, decoder, bpe) = match model {
        "gpt2" => {
            let pre = g.get_str("tokenizer.ggml.pre")?;
            if let Some(p) = pre {
                if !LLAMA3_PRE.contains(&p) {
                    // Another regex would split text differently and give other ids without any error.
                    return Err(bad(
                        "tokenizer.ggml.pre",
                        format!("{p:?}: only the Llama-3 pre-tokenizer ({LLAMA3_PRE:?}) is supported"),
                    ));
                }
            }
            let merges = strings(g, "tokenizer.ggml.merges")?
                .ok_or_else(|| bad("tokenizer.ggml.merges", "missing: a gpt2 (BPE) vocabulary needs merges"))?;
            let mut pairs = Vec::with_capacity(merges.len());
            for (i, m) in merges.iter().enumerate() {
                // llama.cpp splits at `find(' ', 1)`: a merge's left side may itself start with a space.
                let at = m.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(k, _)| k);
                match at {
                    Some(k) => pairs.push(json!([&m[..k], &m[k + 1..]])),
                    None => return Err(bad("tokenizer.ggml.merges", format!("merge {i} ({m:?}) has no space"))),
                }
            }
            let pre = json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            ]});
            let dec = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
            let bpe = json!({
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
                "vocab": vocab, "merges": pairs,
            });
            (Value::Null, pre, dec, bpe)
        }
        "llama" => {
            let scores: Vec<f32> = match g.get_array("tokenizer.ggml.scores")? {
                Some(Array::F32(v)) if v.len() == n => v.clone(),
                Some(a) => {
                    return Err(bad(
                        "tokenizer.ggml.scores",
                        format!("{} {} values for {n} tokens", a.len(), a.elem_type_name()),
                    ))
                }
                None => {
                    return Err(bad(
                        "tokenizer.ggml.scores",
                        "missing: a llama (SentencePiece) vocabulary needs scores",
                    ))
                }
            };
            let unk = token_id(g, "tokenizer.ggml.unknown_token_id", n)?.unwrap_or(0);
            let add_space = g.get_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            let merges = spm_merges(tokens, &types, &scores);
            let mut norm = vec![];
            if add_space {
                norm.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            norm.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
            let mut dec = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space {
                dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let bpe = json!({
                "type": "BPE", "dropout": null, "unk_token": tokens[unk as usize], "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            });
            (
                json!({"type": "Sequence", "normalizers": norm}),
                Value::Null,
                json!({"type": "Sequence", "decoders": dec}),
                bpe,
            )
        }
        other => {
            return Err(bad(
                "tokenizer.ggml.model",
                format!("{other:?} is not supported (gpt2 and llama are)"),
            ))
        }
    };
    let post = post_processor(tokens, bos.filter(|_| add_bos), eos.filter(|_| add_eos));
    let doc = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post,
        "decoder": decoder, "model": bpe,
    });
    let tok: tokenizers::Tokenizer =
        serde_json::from_value(doc).map_err(|e| Error::Build(format!("rebuilding the GGUF tokenizer: {e}")))?;
    let chat_template = g.get_str("tokenizer.chat_template")?.map(str::to_string);
    let name = |id: Option<u32>| id.map(|i| tokens[i as usize].clone());
    Ok((
        tok,
        GgufSpecials {
            chat_template,
            bos_token: name(bos),
            eos_token: name(eos),
        },
    ))
}

/// BOS before (and EOS after) the sequence, as the converters' tokenizer.json TemplateProcessing does.
fn post_processor(tokens: &[String], bos: Option<u32>, eos: Option<u32>) -> Value {
    if bos.is_none() && eos.is_none() {
        return Value::Null;
    }
    let mut special = Map::new();
    let piece = |id: u32, ty: u32, special: &mut Map<String, Value>| {
        let t = &tokens[id as usize];
        special.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
        json!({"SpecialToken": {"id": t, "type_id": ty}})
    };
    let seq = |name: &str, ty: u32| json!({"Sequence": {"id": name, "type_id": ty}});
    let mut single = vec![];
    let mut pair = vec![];
    if let Some(b) = bos {
        single.push(piece(b, 0, &mut special));
    }
    single.push(seq("A", 0));
    if let Some(e) = eos {
        single.push(piece(e, 0, &mut special));
    }
    for (name, ty) in [("A", 0), ("B", 1)] {
        if let Some(b) = bos {
            pair.push(piece(b, ty, &mut special));
        }
        pair.push(seq(name, ty));
        if let Some(e) = eos {
            pair.push(piece(e, ty, &mut special));
        }
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special})
}

/// SentencePiece BPE merges from a scored vocabulary: every split of a token into two tokens is a merge,
/// ranked by the merged token's score (highest first), ties by the pieces' ids; as transformers'
/// `SentencePieceExtractor` does for the Llama tokenizer.json files. Control, unknown and byte tokens take
/// part in no merge.
fn spm_merges(tokens: &[String], types: &[i32], scores: &[f32]) -> Vec<Value> {
    use std::collections::HashMap;
    const TOKEN_BYTE: i32 = 6;
    let mergeable = |i: usize| !matches!(types[i], TOKEN_CONTROL | TOKEN_UNKNOWN | TOKEN_BYTE);
    let mut id: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if mergeable(i) {
            id.entry(t.as_str()).or_insert(i);
        }
    }
    let mut merges: Vec<(f32, usize, usize, usize)> = vec![];
    for (i, t) in tokens.iter().enumerate() {
        if !mergeable(i) {
            continue;
        }
        for (k, _) in t.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (id.get(&t[..k]), id.get(&t[k..])) {
                merges.push((scores[i], i, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.2, a.3).cmp(&(b.2, b.3))));
    merges
        .into_iter()
        .map(|(_, _, l, r)| json!([tokens[l], tokens[r]]))
        .collect()
}
