//! Training data: files to token sequences with per-token labels (`IGNORE` where no loss is taken).
//!
//! - `.txt`: one document: `encode(text)` with the tokenizer's special tokens (BOS), then EOS; the stream is
//!   cut into consecutive, non-overlapping `seq_len` chunks and the remainder is dropped.
//! - `.jsonl`, one JSON object per line, each line its own kind:
//!   - `{"text"}`: a document, encoded as above; all text documents are concatenated into one stream and
//!     packed into `seq_len` chunks the same way (no padding, no token wasted but the tail);
//!   - `{"prompt", "completion"}`: one example, `encode(prompt) ++ encode_plain(completion) ++ EOS`, with the
//!     loss on the completion and EOS only;
//!   - `{"messages": [{"role", "content"}]}`: one example rendered with the model's chat template
//!     (`chat_template` in `tokenizer_config.json`, through minijinja) or, without one, the built-in
//!     Llama-3 template; the loss is on the assistant turns (their content and end-of-turn token) only.
//!
//! Record examples longer than `seq_len` are an error (raise `--seq-len`, up to the model's context), never
//! silently truncated: a cut-off completion would teach the model to stop mid-answer.
use crate::error::{EngineError, Result};
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use crate::train::IGNORE;
use std::path::Path;

/// The Llama-3 chat template, used when the model ships none.
pub const LLAMA3_TEMPLATE: &str = "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<i32>,
}

impl Example {
    /// Tokens the loss is taken on (position t predicts `labels[t+1]`).
    pub fn predicted(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
    }
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What the data loader needs from the model.
pub struct DataSpec<'a> {
    pub tokenizer: &'a Tokenizer,
    pub eos: u32,
    pub bos_token: String,
    pub eos_token: String,
    pub chat_template: Option<String>,
    pub seq_len: usize,
}

impl<'a> DataSpec<'a> {
    /// Reads `bos_token` / `eos_token` / `chat_template` from the model's `tokenizer_config.json` when present,
    /// or, for a GGUF model, from what its tokenizer read from the file (`tokenizer.chat_template`).
    pub fn for_model(model_dir: &Path, tokenizer: &'a Tokenizer, eos: u32, seq_len: usize) -> DataSpec<'a> {
        if let Some(g) = &tokenizer.gguf {
            return DataSpec {
                tokenizer,
                eos,
                bos_token: g.bos_token.clone().unwrap_or_else(|| "<|begin_of_text|>".into()),
                eos_token: g
                    .eos_token
                    .clone()
                    .or_else(|| tokenizer.id_to_token(eos))
                    .unwrap_or_default(),
                chat_template: g.chat_template.clone(),
                seq_len,
            };
        }
        let cfg: serde_json::Value = std::fs::read_to_string(model_dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null);
        let tok_str = |k: &str| match &cfg[k] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
            _ => None,
        };
        DataSpec {
            tokenizer,
            eos,
            bos_token: tok_str("bos_token").unwrap_or_else(|| "<|begin_of_text|>".into()),
            eos_token: tok_str("eos_token")
                .or_else(|| tokenizer.id_to_token(eos))
                .unwrap_or_default(),
            chat_template: cfg["chat_template"].as_str().map(str::to_string),
            seq_len,
        }
    }
}

fn err(path: &Path, line: Option<usize>, msg: impl std::fmt::Display) -> EngineError {
    match line {
        Some(l) => EngineError::Invalid(format!("{}:{l}: {msg}", path.display())),
        None => EngineError::Invalid(format!("{}: {msg}", path.display())),
    }
}

/// Loads a dataset file into examples (in file order).
pub fn load(path: &Path, spec: &DataSpec<'_>) -> Result<Vec<Example>> {
    if spec.seq_len < 2 {
        return Err(EngineError::Invalid("--seq-len must be at least 2".into()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    if text.trim().is_empty() {
        return Err(err(path, None, "the file is empty"));
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut out = vec![];
    if ext == "jsonl" || ext == "json" {
        let mut stream: Vec<u32> = vec![];
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| err(path, Some(n), format!("not valid JSON: {e}")))?;
            if let Some(t) = v.get("text") {
                let t = t
                    .as_str()
                    .ok_or_else(|| err(path, Some(n), "\"text\" must be a string"))?;
                stream.extend(spec.tokenizer.encode(t)?);
                stream.push(spec.eos);
            } else if let (Some(p), Some(c)) = (v.get("prompt"), v.get("completion")) {
                let (Some(p), Some(c)) = (p.as_str(), c.as_str()) else {
                    return Err(err(path, Some(n), "\"prompt\" and \"completion\" must be strings"));
                };
                let ex = prompt_completion(spec, p, c)?;
                out.push(check_len(ex, spec, path, n)?);
            } else if let Some(m) = v.get("messages") {
                let msgs: Vec<Message> = serde_json::from_value(m.clone()).map_err(|e| {
                    err(
                        path,
                        Some(n),
                        format!("\"messages\" must be a list of {{\"role\", \"content\"}}: {e}"),
                    )
                })?;
                let ex = chat(spec, &msgs).map_err(|e| err(path, Some(n), e))?;
                out.push(check_len(ex, spec, path, n)?);
            } else {
                return Err(err(
                    path,
                    Some(n),
                    "expected {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"}",
                ));
            }
        }
        out.extend(pack(&stream, spec.seq_len));
        if out.is_empty() && !stream.is_empty() {
            return Err(err(
                path,
                None,
                format!(
                    "the text gives {} tokens, fewer than one sequence of {}",
                    stream.len(),
                    spec.seq_len
                ),
            ));
        }
    } else {
        let mut stream = spec.tokenizer.encode(&text)?;
        stream.push(spec.eos);
        out = pack(&stream, spec.seq_len);
        if out.is_empty() {
            return Err(err(
                path,
                None,
                format!(
                    "the text gives {} tokens, fewer than one sequence of {}",
                    stream.len(),
                    spec.seq_len
                ),
            ));
        }
    }
    if out.is_empty() {
        return Err(err(path, None, "no training examples"));
    }
    Ok(out)
}

fn pack(stream: &[u32], seq_len: usize) -> Vec<Example> {
    stream
        .chunks_exact(seq_len)
        .map(|c| Example {
            ids: c.to_vec(),
            labels: c.iter().map(|&x| x as i32).collect(),
        })
        .collect()
}

fn check_len(ex: Example, spec: &DataSpec<'_>, path: &Path, line: usize) -> Result<Example> {
    if ex.ids.len() > spec.seq_len {
        return Err(err(
            path,
            Some(line),
            format!(
                "the example is {} tokens, longer than --seq-len {} (raise it, up to the model's context)",
                ex.ids.len(),
                spec.seq_len
            ),
        ));
    }
    if ex.predicted() == 0 {
        return Err(err(
            path,
            Some(line),
            "nothing to learn: the example has no completion tokens",
        ));
    }
    Ok(ex)
}

fn prompt_completion(spec: &DataSpec<'_>, prompt: &str, completion: &str) -> Result<Example> {
    let p = spec.tokenizer.encode(prompt)?;
    let mut c = spec.tokenizer.encode_plain(completion)?;
    c.push(spec.eos);
    let labels = p.iter().map(|_| IGNORE).chain(c.iter().map(|&x| x as i32)).collect();
    Ok(Example {
        ids: p.into_iter().chain(c).collect(),
        labels,
    })
}

/// Renders `messages` with the chat template (minijinja), as transformers' `apply_chat_template` does.
pub fn render(spec: &DataSpec<'_>, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
    let template = spec.chat_template.as_deref().unwrap_or(LLAMA3_TEMPLATE);
    let mut env = minijinja::Environment::new();
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| EngineError::Invalid(format!("chat template: {e}")))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| EngineError::Invalid(format!("chat template: {e}")))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => spec.bos_token,
        eos_token => spec.eos_token,
    })
    .map_err(|e| EngineError::Invalid(format!("chat template: {e}")))
}

/// One chat example with the loss on assistant turns: for assistant message i, the labelled tokens run from
/// the end of `render(messages[..i], add_generation_prompt)` to the end of `render(messages[..=i])`.
pub fn chat(spec: &DataSpec<'_>, messages: &[Message]) -> Result<Example> {
    if messages.is_empty() {
        return Err(EngineError::Invalid("\"messages\" is empty".into()));
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err(EngineError::Invalid("no assistant turn to learn from".into()));
    }
    let ids = spec.tokenizer.encode_plain(&render(spec, messages, false)?)?;
    let mut labels = vec![IGNORE; ids.len()];
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let start = spec.tokenizer.encode_plain(&render(spec, &messages[..i], true)?)?;
        let end = spec.tokenizer.encode_plain(&render(spec, &messages[..=i], false)?)?;
        // Turn boundaries must tokenize the same way alone as inside the whole conversation.
        if ids.get(..end.len()) != Some(&end[..]) || end.get(..start.len()) != Some(&start[..]) {
            return Err(EngineError::Invalid(
                "the chat template does not tokenize turn by turn (a turn's tokens change with what follows)".into(),
            ));
        }
        for k in start.len()..end.len() {
            labels[k] = ids[k] as i32;
        }
    }
    Ok(Example { ids, labels })
}

/// A permutation of 0..n from `seed` (Fisher-Yates with bitnode's SplitMix64).
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed);
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Splits off the last `fraction` of `examples` (after any shuffling) as the validation set; at least one
/// example stays in each part when the fraction is positive.
pub fn split(mut examples: Vec<Example>, fraction: f64) -> Result<(Vec<Example>, Vec<Example>)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(EngineError::Invalid("--val-split must be in [0, 1)".into()));
    }
    if fraction == 0.0 {
        return Ok((examples, vec![]));
    }
    if examples.len() < 2 {
        return Err(EngineError::Invalid(
            "--val-split needs at least two examples (one to train on, one to evaluate)".into(),
        ));
    }
    let n_val = ((examples.len() as f64 * fraction).round() as usize).clamp(1, examples.len() - 1);
    let val = examples.split_off(examples.len() - n_val);
    Ok((examples, val))
}
