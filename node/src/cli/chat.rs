//! `bitnode chat`: an interactive chat in the terminal over the same path as the HTTP API's chat
//! completions: each turn is an inference job with the whole conversation, placed by the scheduler (or
//! `--to`), rendered by the model's chat template on the device that runs it, and streamed back.
use super::args::ChatArgs;
use crate::api::{Event, JobView, Request};
use crate::control;
use crate::exec::ModelSizing;
use anyhow::{bail, Context};
use bitnode_protocol::job::JobSpec;
use bitnode_protocol::{ChatMessage, InferRequest, InferResult};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The model to chat with: a name or hash in the store, a model directory (imported, as `submit` does),
/// or the hash of a model only a connected peer holds (the turns then run there); by default the
/// built-in tiny model. With it, how to size each turn for the scheduler: read once from the model here
/// (it loads the model), None for a peer's model (a nominal estimate: only its holders can size it).
fn resolve_model(home: &Path, m: Option<&str>) -> anyhow::Result<(String, Option<ModelSizing>)> {
    use crate::submit::Input;
    let store = crate::models::Store::new(home);
    let given = super::local::model_or_builtin(m.map(PathBuf::from), home)?;
    let dir = match Input::of(home, &given)? {
        Input::Elsewhere(hash) => return Ok((hash, None)),
        Input::Stored { hash, dir } => {
            if dir.join("adapter_config.json").is_file()
                || dir.join(bitnode_engine::lora::GGUF_ADAPTER_IN_DIR).is_file()
            {
                bail!("{} is an adapter, not a model", given.display());
            }
            return Ok((hash, Some(ModelSizing::read(&dir)?)));
        }
        Input::Dir(dir) => dir,
    };
    if !dir.join("config.json").is_file() && !bitnode_engine::model::is_gguf(&dir) {
        bail!(
            "{} is neither a model name (see `bitnode model list`), a model's hash, a model directory nor a \
             GGUF model file",
            dir.display()
        );
    }
    let hash = store.import(&dir)?;
    let stored = store.resolve(&hash)?.context("the model left the store")?;
    Ok((hash, Some(ModelSizing::read(&stored)?)))
}

pub fn chat(home: &Path, a: ChatArgs) -> anyhow::Result<()> {
    let (hash, sizing) = resolve_model(home, a.model.as_deref())?;
    let mut history: Vec<ChatMessage> = vec![];
    if let Some(s) = &a.system {
        history.push(ChatMessage {
            role: "system".into(),
            content: s.clone(),
        });
    }
    eprintln!(
        "chatting with {} (an empty line or Ctrl-D ends it)",
        a.model.as_deref().unwrap_or("the built-in tiny model")
    );
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        eprint!("you> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        history.push(ChatMessage {
            role: "user".into(),
            content: line.trim_end().to_string(),
        });
        let infer = InferRequest {
            model: hash.clone(),
            adapter: None,
            prompt: String::new(),
            max_tokens: a.max_tokens,
            temperature: a.temperature,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: a.seed,
            messages: Some(history.clone()),
            stop: vec![],
        };
        let text_bytes = history.iter().map(|m| m.content.len() as u64 + 16).sum();
        let need = match &sizing {
            Some(s) => s.need(text_bytes, a.max_tokens as u64, 0),
            None => crate::schedule::Need::unsized_inference(text_bytes, a.max_tokens as u64),
        };
        let req = Request::Submit {
            spec: JobSpec::Infer(infer),
            data_path: None,
            need,
            to: a.to.clone(),
            out: None,
            resume: None,
            detach: false,
            // Ctrl-C ends the turn on the device running it, as an API client's disconnect does.
            cancel_on_disconnect: true,
        };
        let mut printed = String::new();
        let mut who = String::new();
        let v: JobView = control::call_stream(home, &req, Duration::from_secs(60), &mut |e| match e {
            Event::Placed { name, .. } => who = name,
            Event::AttemptFailed { .. } => {}
            Event::Tokens { text, .. } => {
                if printed.is_empty() {
                    let _ = write!(out, "{who}> ");
                }
                printed.push_str(&text);
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
            }
            _ => {}
        })?;
        let reply = match v
            .result
            .clone()
            .and_then(|r| serde_json::from_value::<InferResult>(r).ok())
        {
            Some(r) => r.text,
            None => {
                println!();
                eprintln!("the turn failed: {}", v.reason.as_deref().unwrap_or("no result"));
                history.pop();
                continue;
            }
        };
        // The streamed pieces add up to the reply; print any tail they did not carry.
        if let Some(rest) = reply.strip_prefix(printed.as_str()) {
            if printed.is_empty() {
                let _ = write!(out, "{who}> ");
            }
            let _ = out.write_all(rest.as_bytes());
        }
        println!();
        history.push(ChatMessage {
            role: "assistant".into(),
            content: reply,
        });
    }
}
