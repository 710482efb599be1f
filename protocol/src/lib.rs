//! Types shared by the bitnode CLI, daemon and engine. A job is one serde type, used by the local commands
//! and (in the mesh) on the wire, so a local run and a delegated run cannot drift apart.
//! No tokio, no wgpu here.
//!
//! - [`wire`]: protocol ids and the size-bounded bincode framing every mesh message goes through;
//! - [`mesh`]: the pairing and capability messages;
//! - [`invite`]: one-time pairing codes and the proofs that show knowledge of their secret;
//! - [`job`]: jobs for other devices and the signed envelopes they travel in.
pub mod invite;
pub mod job;
pub mod mesh;
pub mod wire;

use serde::{Deserialize, Serialize};

/// `bitnode infer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferRequest {
    pub model: String,
    pub adapter: Option<String>,
    pub prompt: String,
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: u32,
    /// 1.0 = off.
    pub top_p: f32,
    /// 1.0 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
    /// A conversation (the HTTP API's chat completions): rendered by the model's own chat template on the
    /// device that runs the job, and then used instead of `prompt`.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    /// Strings that end the generation (the text ends before the first one; stop reason "stop").
    #[serde(default)]
    pub stop: Vec<String>,
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// What `bitnode infer --json` prints as its last line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferResult {
    pub text: String,
    /// Generated token ids, prompt excluded.
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub decode_tokens_per_second: f64,
    pub prefill_tokens_per_second: f64,
    /// "eos", "max_tokens", "stop" or "context".
    pub stop_reason: String,
    pub device: String,
    /// Continuous batching: the most sequences this one decoded together with in one step of an engine
    /// host (itself included). Absent from a run of its own (`bitnode infer`, a job process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
}

/// `bitnode score`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRequest {
    pub model: String,
    pub adapter: Option<String>,
    pub text: String,
}

/// What `bitnode score --json` prints as its last line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreResult {
    /// Predicted tokens.
    pub tokens: usize,
    /// Mean negative log-likelihood, nats per predicted token.
    pub nll: f64,
    pub ppl: f64,
}
