//! The OpenAI-compatible API's wire types: request bodies (checked into what a job needs), response
//! objects, stream chunks and errors, in the shapes the official `openai` client reads. The HTTP server
//! is `daemon/http.rs`.
//!
//! Choices where OpenAI's API says nothing for us, or asks for more than we do:
//! - `n` must be 1; `logprobs`, `echo`, `best_of`, `tools` and `response_format` are refused with a 400
//!   rather than ignored, so a client never gets an answer to a question it did not ask.
//! - `max_tokens` defaults to 16 for `/v1/completions` (as OpenAI's) and to 256 for chat;
//!   `max_completion_tokens` is read as `max_tokens` for chat.
//! - `temperature` defaults to 1.0 and `top_p` to 1.0, as OpenAI's; `temperature` 0 is greedy, which is
//!   what `bitnode infer` does by default.
//! - `stop` (a string or up to 4 strings) is applied to the text as it streams: the text ends before the
//!   first stop string, and the generation is cancelled on the device running it.
//! - `adapter` (an extension) names a LoRA adapter in the store by name or hash.
//! - `to` (an extension) pins the device that runs the request, as `bitnode chat --to` does: "auto" (the
//!   default: the scheduler picks), "local", or a paired peer's name or id.
use bitnode_protocol::ChatMessage;
use serde::{Deserialize, Serialize};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, with its HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub code: &'static str,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn bad(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            code: "invalid_value",
            param,
        }
    }
    pub fn new(status: u16, kind: &'static str, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            code,
            param: None,
        }
    }
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `prompt`: one string or a list of one (a batch of prompts is `n` requests; send them separately).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

/// A chat message's `content`: a string, or a list of parts of which the text ones are joined.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields `/v1/completions` and `/v1/chat/completions` share, plus each one's own.
#[derive(Debug, Clone, Deserialize)]
pub struct Body {
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Option<Prompt>,
    #[serde(default)]
    pub messages: Option<Vec<Message>>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub adapter: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub best_of: Option<i64>,
    #[serde(default)]
    pub tools: Option<serde_json::Value>,
    #[serde(default)]
    pub response_format: Option<serde_json::Value>,
}

/// What the request asks for, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Ask {
    pub model: String,
    pub adapter: Option<String>,
    /// The device pinned to run it ("local", a peer's name or id); None: the scheduler picks.
    pub to: Option<String>,
    /// `/v1/completions`: the prompt text.
    pub prompt: String,
    /// `/v1/chat/completions`: the conversation (rendered by the model's chat template on the worker).
    pub messages: Option<Vec<ChatMessage>>,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// The longest generation one request may ask for.
pub const MAX_TOKENS: i64 = 1 << 16;

impl Body {
    /// Checks the body of `/v1/completions` (`chat` false) or `/v1/chat/completions` (`chat` true).
    pub fn check(self, chat: bool) -> Result<Ask, ApiError> {
        let model = match self.model {
            Some(m) if !m.is_empty() => m,
            _ => return Err(ApiError::bad("\"model\" is required", Some("model"))),
        };
        if self.n.is_some_and(|n| n != 1) || self.best_of.is_some_and(|n| n != 1) {
            return Err(ApiError::bad("only n = 1 is supported", Some("n")));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !v.is_null() && *v != serde_json::Value::Bool(false))
        {
            return Err(ApiError::bad("logprobs are not supported", Some("logprobs")));
        }
        if self.echo == Some(true) {
            return Err(ApiError::bad("echo is not supported", Some("echo")));
        }
        if self.tools.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad("tools are not supported", Some("tools")));
        }
        if self
            .response_format
            .is_some_and(|v| !v.is_null() && v["type"] != "text")
        {
            return Err(ApiError::bad(
                "only the text response format is supported",
                Some("response_format"),
            ));
        }
        let max = if chat {
            self.max_completion_tokens.or(self.max_tokens).unwrap_or(256)
        } else {
            self.max_tokens.unwrap_or(16)
        };
        if !(1..=MAX_TOKENS).contains(&max) {
            return Err(ApiError::bad(
                format!("max_tokens must be between 1 and {MAX_TOKENS}, not {max}"),
                Some("max_tokens"),
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad(
                format!("temperature must be between 0 and 2, not {temperature}"),
                Some("temperature"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad(
                format!("top_p must be in (0, 1], not {top_p}"),
                Some("top_p"),
            ));
        }
        let seed = match self.seed {
            Some(s) => s as u64,
            None => rand::random(),
        };
        let stop = match self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stop.len() > 4 || stop.iter().any(|s| s.is_empty()) {
            return Err(ApiError::bad("stop takes at most 4 non-empty strings", Some("stop")));
        }
        let (prompt, messages) = if chat {
            if self.prompt.is_some() {
                return Err(ApiError::bad(
                    "a chat completion takes \"messages\", not \"prompt\"",
                    Some("prompt"),
                ));
            }
            let msgs = self
                .messages
                .ok_or_else(|| ApiError::bad("\"messages\" is required", Some("messages")))?;
            if msgs.is_empty() {
                return Err(ApiError::bad("\"messages\" is empty", Some("messages")));
            }
            let mut out = vec![];
            for m in msgs {
                if !["system", "developer", "user", "assistant"].contains(&m.role.as_str()) {
                    return Err(ApiError::bad(format!("unknown role {:?}", m.role), Some("messages")));
                }
                let content = match m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t,
                    Some(Content::Parts(p)) => {
                        if p.iter().any(|p| p.kind != "text") {
                            return Err(ApiError::bad("only text content parts are supported", Some("messages")));
                        }
                        p.into_iter().filter_map(|p| p.text).collect::<Vec<_>>().join("")
                    }
                };
                // "developer" is the newer name of "system"; chat templates know "system".
                let role = if m.role == "developer" { "system".into() } else { m.role };
                out.push(ChatMessage { role, content });
            }
            (String::new(), Some(out))
        } else {
            if self.messages.is_some() {
                return Err(ApiError::bad(
                    "a completion takes \"prompt\", not \"messages\"",
                    Some("messages"),
                ));
            }
            let prompt = match self.prompt {
                Some(Prompt::One(p)) => p,
                Some(Prompt::Many(mut v)) if v.len() == 1 => v.remove(0),
                Some(Prompt::Many(_)) => {
                    return Err(ApiError::bad("one prompt per request", Some("prompt")));
                }
                None => return Err(ApiError::bad("\"prompt\" is required", Some("prompt"))),
            };
            if prompt.is_empty() {
                return Err(ApiError::bad("\"prompt\" is empty", Some("prompt")));
            }
            (prompt, None)
        };
        let stream = self.stream.unwrap_or(false);
        Ok(Ask {
            model,
            adapter: self.adapter.filter(|a| !a.is_empty()),
            to: self.to.filter(|t| !t.is_empty()),
            prompt,
            messages,
            max_tokens: max as usize,
            temperature: temperature as f32,
            top_p: top_p as f32,
            seed,
            stop,
            stream,
            include_usage: stream && self.stream_options.is_some_and(|o| o.include_usage),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// Where the text ends: the stop strings cut it before the first one found. Returns the kept text and
/// whether a stop string was found.
pub fn cut_at_stop(text: &str, stop: &[String]) -> (usize, bool) {
    let first = stop.iter().filter_map(|s| text.find(s.as_str())).min();
    match first {
        Some(i) => (i, true),
        None => (text.len(), false),
    }
}

/// How much of `text` may be sent now: all of it but a tail that could be the start of a stop string
/// (held back until the next tokens show whether it is one).
pub fn safe_len(text: &str, stop: &[String]) -> usize {
    let mut keep = text.len();
    for s in stop {
        for k in (1..s.len()).rev() {
            if text.len() >= k
                && s.is_char_boundary(k)
                && text.is_char_boundary(text.len() - k)
                && text.ends_with(&s[..k])
            {
                keep = keep.min(text.len() - k);
                break;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: serde_json::Value) -> Body {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn bodies_are_checked_into_what_a_job_needs() {
        let a = body(serde_json::json!({"model": "m", "prompt": "hi", "temperature": 0, "seed": 3}))
            .check(false)
            .unwrap();
        assert_eq!(
            (a.prompt.as_str(), a.max_tokens, a.temperature, a.seed),
            ("hi", 16, 0.0, 3)
        );
        let c = body(serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ], "stream": true, "stream_options": {"include_usage": true}, "stop": "\n"}))
        .check(true)
        .unwrap();
        let m = c.messages.unwrap();
        assert_eq!((m[1].role.as_str(), m[1].content.as_str()), ("user", "ab"));
        assert!(c.stream && c.include_usage);
        assert_eq!((c.max_tokens, c.stop), (256, vec!["\n".to_string()]));
        for (v, chat, param) in [
            (serde_json::json!({"prompt": "x"}), false, "model"),
            (
                serde_json::json!({"model": "m", "prompt": "x", "max_tokens": -1}),
                false,
                "max_tokens",
            ),
            (
                serde_json::json!({"model": "m", "prompt": "x", "temperature": 3}),
                false,
                "temperature",
            ),
            (
                serde_json::json!({"model": "m", "prompt": "x", "top_p": 0}),
                false,
                "top_p",
            ),
            (serde_json::json!({"model": "m", "prompt": "x", "n": 2}), false, "n"),
            (serde_json::json!({"model": "m", "prompt": ["a", "b"]}), false, "prompt"),
            (serde_json::json!({"model": "m", "messages": []}), true, "messages"),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]}),
                true,
                "messages",
            ),
            (serde_json::json!({"model": "m", "prompt": "x"}), true, "prompt"),
            (
                serde_json::json!({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
                false,
                "stop",
            ),
        ] {
            let e = body(v.clone()).check(chat).unwrap_err();
            assert_eq!((e.status, e.param), (400, Some(param)), "{v}");
        }
    }

    #[test]
    fn stop_strings_cut_the_text_and_hold_back_a_possible_start() {
        let stop = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(cut_at_stop("abc END def", &stop), (4, true));
        assert_eq!(cut_at_stop("abc", &stop), (3, false));
        assert_eq!(safe_len("abc EN", &stop), 4);
        assert_eq!(safe_len("abc\n", &stop), 3);
        assert_eq!(safe_len("abc", &stop), 3);
        assert_eq!(safe_len("é", &["éa".to_string()]), 0);
    }
}
