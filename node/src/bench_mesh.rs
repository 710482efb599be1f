//! `bitnode bench mesh`: what delegation costs. Two real daemons on loopback — "here" submits, "peer" works —
//! and the same jobs run both ways:
//! - model transfer: a score job sent to the peer while it lacks the model, then again once it holds it;
//!   the difference is the transfer (manifest, 1 MiB chunks each verified, the directory hash, the rename);
//! - submit-to-first-token and submit-to-result latency of an inference job, `--to local` against
//!   `--to peer` (median of `runs`). Both include what every job pays here: a child process that loads the
//!   model; the difference is what the mesh adds (signing, the round trips, streaming back).
use crate::api::{Event, JobView};
use crate::control::{self, Request};
use crate::demo::{start_mesh, Spec};
use crate::exec::JobPaths;
use anyhow::Context;
use bitnode_protocol::job::JobSpec;
use bitnode_protocol::{InferRequest, ScoreRequest};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, serde::Serialize)]
pub struct MeshBench {
    pub model: String,
    pub model_bytes: u64,
    /// The device the remote inference ran on (the worker's engine choice).
    pub remote_device: String,
    pub transfer_seconds: f64,
    pub transfer_bytes_per_second: f64,
    pub cold_remote_job_seconds: f64,
    pub warm_remote_job_seconds: f64,
    pub runs: usize,
    pub local_first_token_ms: f64,
    pub remote_first_token_ms: f64,
    pub local_total_ms: f64,
    pub remote_total_ms: f64,
    pub delegation_overhead_first_token_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Submits `req` and times it: (seconds to the first streamed token, seconds to the result, the result).
fn timed(home: &std::path::Path, req: &Request) -> anyhow::Result<(Option<f64>, f64, JobView)> {
    let t0 = Instant::now();
    let mut first = None;
    let v: JobView = control::call_stream(home, req, Duration::from_secs(120), &mut |e| {
        if first.is_none() && matches!(e, Event::Tokens { .. }) {
            first = Some(t0.elapsed().as_secs_f64());
        }
    })?;
    if v.state != crate::jobs::State::Succeeded {
        anyhow::bail!(
            "benchmark job {}: {}",
            v.state.as_str(),
            v.reason.as_deref().unwrap_or("no reason given")
        );
    }
    Ok((first, t0.elapsed().as_secs_f64(), v))
}

pub fn run(model: Option<PathBuf>, runs: usize, json: bool) -> anyhow::Result<()> {
    let base = PathBuf::from(format!("/tmp/bitnode-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let res = bench(&base, model, runs.max(1));
    let _ = std::fs::remove_dir_all(&base);
    let r = res?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "model:                  {} ({})",
            r.model,
            bitnode_engine::util::human_bytes(r.model_bytes)
        );
        println!("remote job device:      {}", r.remote_device);
        println!(
            "model transfer:         {:.3} s, {:.1} MB/s (cold remote job {:.3} s, warm {:.3} s)",
            r.transfer_seconds,
            r.transfer_bytes_per_second / 1e6,
            r.cold_remote_job_seconds,
            r.warm_remote_job_seconds
        );
        println!(
            "submit to first token:  local {:.1} ms, remote {:.1} ms (+{:.1} ms), median of {}",
            r.local_first_token_ms, r.remote_first_token_ms, r.delegation_overhead_first_token_ms, r.runs
        );
        println!(
            "submit to result:       local {:.1} ms, remote {:.1} ms",
            r.local_total_ms, r.remote_total_ms
        );
    }
    Ok(())
}

fn bench(base: &std::path::Path, model: Option<PathBuf>, runs: usize) -> anyhow::Result<MeshBench> {
    let specs = [
        Spec {
            name: "here",
            score: Some(1.0),
            mem_gib: 64,
            battery: false,
            extra: "",
        },
        Spec {
            name: "peer",
            score: Some(1000.0),
            mem_gib: 64,
            battery: false,
            extra: "",
        },
    ];
    let devs = start_mesh(base, &specs, false)?;
    let here = &devs[0].home;
    let model = match model {
        Some(m) => std::path::absolute(&m).unwrap_or(m),
        None => {
            let m = here.join("models").join("builtin-tiny");
            let p = bitnode_engine::synth::preset("tiny")?;
            bitnode_engine::synth::synth(p, &m, 0, bitnode_engine::synth::SynthFormat::Packed)?;
            m
        }
    };
    let paths = JobPaths::model(model.clone());
    let score = JobSpec::Score(ScoreRequest {
        model: model.display().to_string(),
        adapter: None,
        text: "the mesh of my own devices scores this short text".into(),
    });
    let req = crate::submit::prepare(here, score, &paths, "peer", false)?;
    let hash = match &req {
        Request::Submit { spec, .. } => spec.model().to_string(),
        _ => String::new(),
    };
    let model_bytes = crate::models::Store::new(here).bytes(&hash)?;
    let (_, cold, _) = timed(here, &req)?;
    let (_, warm, _) = timed(here, &req)?;
    let transfer = (cold - warm).max(1e-6);
    let infer = JobSpec::Infer(InferRequest {
        model: model.display().to_string(),
        adapter: None,
        prompt: "The mesh of my own devices".into(),
        max_tokens: 16,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        seed: 0,
        messages: None,
        stop: vec![],
    });
    let local = crate::submit::prepare(here, infer.clone(), &paths, "local", false)?;
    let remote = crate::submit::prepare(here, infer, &paths, "peer", false)?;
    let (mut lf, mut lt, mut rf, mut rt) = (vec![], vec![], vec![], vec![]);
    let mut remote_device = String::new();
    for _ in 0..runs {
        let (f, t, _) = timed(here, &local)?;
        lf.push(f.unwrap_or(t) * 1e3);
        lt.push(t * 1e3);
        let (f, t, v) = timed(here, &remote)?;
        rf.push(f.unwrap_or(t) * 1e3);
        rt.push(t * 1e3);
        remote_device = v
            .result
            .as_ref()
            .and_then(|r| r.get("device"))
            .and_then(|d| d.as_str())
            .unwrap_or("?")
            .to_string();
    }
    let (lf, rf) = (median(lf), median(rf));
    Ok(MeshBench {
        model: model.display().to_string(),
        model_bytes,
        remote_device,
        transfer_seconds: transfer,
        transfer_bytes_per_second: model_bytes as f64 / transfer,
        cold_remote_job_seconds: cold,
        warm_remote_job_seconds: warm,
        runs,
        local_first_token_ms: lf,
        remote_first_token_ms: rf,
        local_total_ms: median(lt),
        remote_total_ms: median(rt),
        delegation_overhead_first_token_ms: rf - lf,
    })
}
