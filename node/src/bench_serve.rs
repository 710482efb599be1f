//! `bitnode bench serve`: what a running daemon's OpenAI-compatible API delivers to its clients. For each
//! concurrency level N, N streamed completions start at once (greedy, the same prompt of about
//! `--prompt-tokens` tokens, `--max-tokens` each); every stream is timed from its request to its first
//! text (time to first token) and from there to its last (decode rate), and the level from the first
//! request to the last answer (aggregate rate). One request before the levels pays the cold load of the
//! model, so the levels measure warm engines; its time is reported on its own.
//!
//! The requests are the API's own, so they take the path any client's take: the scheduler picks the
//! device (or `--to` pins one, as `bitnode chat --to` does: the request's `to` extension field), and the
//! answer names the device that served it (`x-bitnode-device`). The client is `crate::http_client`, one
//! thread per stream.
use crate::cli::ServeBenchArgs as Options;
use crate::http_client;
use anyhow::{bail, Context};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// One stream, as its client saw it.
#[derive(Debug, Clone, Default)]
struct Stream {
    ttft_s: Option<f64>,
    total_s: f64,
    completion_tokens: usize,
    prompt_tokens: usize,
    device: String,
}

#[derive(Debug, Serialize)]
pub struct Level {
    pub concurrency: usize,
    /// From the first request to the last answer.
    pub wall_s: f64,
    pub completion_tokens: usize,
    /// Completion tokens of every stream / wall time.
    pub aggregate_tok_s: f64,
    pub ttft_median_s: Option<f64>,
    pub ttft_p90_s: Option<f64>,
    /// Each stream's (tokens - 1) / (time of its last text - time of its first): the decode rate one
    /// client sees. Streams of one token have none.
    pub decode_tok_s_median: Option<f64>,
    pub decode_tok_s_p90_low: Option<f64>,
    /// How many streams each device served (by its name, from `x-bitnode-device`).
    pub devices: BTreeMap<String, usize>,
    /// Streams that failed, with why.
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ServeBench {
    pub api_url: String,
    pub model: String,
    pub to: String,
    pub prompt_tokens_asked: usize,
    /// The prompt's length in the model's tokens, as the server counted it.
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    /// The first request (a cold engine where the model was not loaded yet), whole.
    pub first_request_s: f64,
    pub first_request_device: String,
    pub levels: Vec<Level>,
}

/// Nearest-rank percentile `p` (0..=100) of `v`; None when empty.
fn percentile(v: &[f64], p: f64) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s.get(rank.min(s.len()) - 1).copied()
}

/// The request's text: a word the Llama-3 style tokenizers (and the built-in tiny model's) make one token
/// of, with its leading space, repeated.
fn prompt(tokens: usize) -> String {
    let mut s = String::from("mesh");
    for _ in 1..tokens.max(1) {
        s.push_str(" mesh");
    }
    s
}

/// One streamed completion, timed.
fn stream_one(url: &str, token: Option<&str>, body: &str) -> anyhow::Result<Stream> {
    let t0 = Instant::now();
    let a = http_client::post_json(url, "/completions", token, body, Duration::from_secs(600))?;
    let device = a.header("x-bitnode-device").unwrap_or("?").to_string();
    if a.status != 200 {
        let status = a.status;
        let b = a.body().unwrap_or_default();
        bail!("the API answered {status}: {}", String::from_utf8_lossy(&b));
    }
    let mut s = Stream {
        device,
        ..Default::default()
    };
    let mut last_text = None;
    let mut error = None;
    a.events(|data| {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
            error = Some(format!("a malformed event: {data}"));
            return false;
        };
        if let Some(e) = v.get("error") {
            error = Some(format!("the stream failed: {e}"));
            return false;
        }
        let text = v["choices"][0]["text"].as_str().unwrap_or("");
        if !text.is_empty() {
            let t = t0.elapsed().as_secs_f64();
            s.ttft_s.get_or_insert(t);
            last_text = Some(t);
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            s.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
            s.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
        }
        true
    })?;
    if let Some(e) = error {
        bail!(e);
    }
    s.total_s = last_text.unwrap_or_else(|| t0.elapsed().as_secs_f64());
    Ok(s)
}

fn level(url: &str, token: Option<&str>, body: &str, n: usize) -> Level {
    let t0 = Instant::now();
    let results: Vec<anyhow::Result<Stream>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n).map(|_| scope.spawn(|| stream_one(url, token, body))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a client thread panicked")))
            })
            .collect()
    });
    let wall_s = t0.elapsed().as_secs_f64();
    let mut ok = vec![];
    let mut errors = vec![];
    for r in results {
        match r {
            Ok(s) => ok.push(s),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let ttft: Vec<f64> = ok.iter().filter_map(|s| s.ttft_s).collect();
    let decode: Vec<f64> = ok
        .iter()
        .filter_map(|s| {
            let first = s.ttft_s?;
            let span = s.total_s - first;
            (s.completion_tokens > 1 && span > 0.0).then(|| (s.completion_tokens - 1) as f64 / span)
        })
        .collect();
    let completion_tokens: usize = ok.iter().map(|s| s.completion_tokens).sum();
    let mut devices = BTreeMap::new();
    for s in &ok {
        *devices.entry(s.device.clone()).or_insert(0) += 1;
    }
    Level {
        concurrency: n,
        wall_s,
        completion_tokens,
        aggregate_tok_s: completion_tokens as f64 / wall_s.max(1e-9),
        ttft_median_s: percentile(&ttft, 50.0),
        ttft_p90_s: percentile(&ttft, 90.0),
        decode_tok_s_median: percentile(&decode, 50.0),
        // The slowest tenth of the streams' rates: what a client among many sees at worst.
        decode_tok_s_p90_low: percentile(&decode, 10.0),
        devices,
        errors,
    }
}

/// The API's URL and token: given, else the running daemon's address and this home's `[api] token`.
fn endpoint(home: &Path, o: &Options) -> anyhow::Result<(String, Option<String>)> {
    let url = match &o.url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let st: crate::api::Status =
                crate::control::call(home, &crate::control::Request::Status, Duration::from_secs(10))
                    .context("asking the daemon where its API listens (or give --url)")?;
            st.api_url
                .context("the daemon's API is off ([api] listen, or bitnode start --api-listen)")?
        }
    };
    let token = match &o.token {
        Some(t) => Some(t.clone()),
        None => match std::env::var("BITNODE_API_TOKEN") {
            Ok(t) if !t.is_empty() => Some(t),
            _ => crate::config::Config::load(home)?.api.token.filter(|t| !t.is_empty()),
        },
    };
    Ok((url, token))
}

/// The `model` field: a name or hash as given; a directory (or, by default, the built-in tiny model)
/// imported into this home's store and named by its hash, which this home's daemon resolves.
fn model_field(home: &Path, m: Option<&str>) -> anyhow::Result<String> {
    if let Some(m) = m {
        if !Path::new(m).is_dir() && !Path::new(m).is_file() {
            return Ok(m.to_string());
        }
    }
    let dir = crate::cli::model_or_builtin(m.map(std::path::PathBuf::from), home)?;
    crate::models::Store::new(home)
        .import(&dir)
        .with_context(|| format!("importing {} into the model store", dir.display()))
}

pub fn run(home: &Path, o: Options) -> anyhow::Result<()> {
    if o.concurrency.is_empty() || o.concurrency.contains(&0) {
        bail!("--concurrency takes levels of 1 or more, such as 1,4,16");
    }
    let (url, token) = endpoint(home, &o)?;
    let model = model_field(home, o.model.as_deref())?;
    let mut req = serde_json::json!({
        "model": model, "prompt": prompt(o.prompt_tokens), "max_tokens": o.max_tokens, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true},
    });
    if o.to != "auto" {
        req["to"] = serde_json::Value::String(o.to.clone());
    }
    let mut body = req.to_string();
    if !o.json {
        eprintln!(
            "bench serve: {url}, model {model}, prompt of ~{} tokens, {} tokens per stream{}",
            o.prompt_tokens,
            o.max_tokens,
            if o.to == "auto" {
                String::new()
            } else {
                format!(", pinned to {}", o.to)
            }
        );
    }
    let first = stream_one(&url, token.as_deref(), &body).context("the first request")?;
    if !o.json {
        eprintln!(
            "first request (pays the model's load where it is cold): {:.3} s on {}",
            first.total_s, first.device
        );
    }
    // The word repeats into one token with the Llama-3 tokenizers, but into several with others (the
    // synthetic presets' byte-level vocabularies): scale it by what the first request counted, and count
    // again (one more request, not measured).
    let mut prompt_tokens = first.prompt_tokens;
    if prompt_tokens > 0 && prompt_tokens != o.prompt_tokens {
        let words = (o.prompt_tokens * o.prompt_tokens).div_ceil(prompt_tokens).max(1);
        req["prompt"] = serde_json::Value::String(prompt(words));
        body = req.to_string();
        prompt_tokens = stream_one(&url, token.as_deref(), &body)
            .context("the request that counts the scaled prompt")?
            .prompt_tokens;
    }
    let mut levels = vec![];
    for &n in &o.concurrency {
        let l = level(&url, token.as_deref(), &body, n);
        if !o.json {
            let f = |v: Option<f64>, scale: f64, digits: usize| {
                v.map_or("-".into(), |x| format!("{:.*}", digits, x * scale))
            };
            println!(
                "concurrency {n:>3}: wall {:.3} s, {} tokens, aggregate {:.1} tok/s; first token median {} ms, p90 {} ms; \
                 decode per stream median {} tok/s (slowest tenth {}); served by {}{}",
                l.wall_s,
                l.completion_tokens,
                l.aggregate_tok_s,
                f(l.ttft_median_s, 1000.0, 1),
                f(l.ttft_p90_s, 1000.0, 1),
                f(l.decode_tok_s_median, 1.0, 1),
                f(l.decode_tok_s_p90_low, 1.0, 1),
                l.devices
                    .iter()
                    .map(|(d, k)| format!("{d} x{k}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if l.errors.is_empty() {
                    String::new()
                } else {
                    format!("; {} failed: {}", l.errors.len(), l.errors.join("; "))
                }
            );
        }
        levels.push(l);
    }
    let failed = levels.iter().map(|l| l.errors.len()).sum::<usize>();
    let r = ServeBench {
        api_url: url,
        model,
        to: o.to,
        prompt_tokens_asked: o.prompt_tokens,
        prompt_tokens,
        max_tokens: o.max_tokens,
        first_request_s: first.total_s,
        first_request_device: first.device,
        levels,
    };
    if o.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    if failed > 0 {
        bail!("{failed} streams failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(percentile(&v, 50.0), Some(3.0));
        assert_eq!(percentile(&v, 90.0), Some(5.0));
        assert_eq!(percentile(&v, 10.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(prompt(3), "mesh mesh mesh");
    }
}
