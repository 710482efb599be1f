//! `bitnode engine-host`: the long-lived process in which a device keeps its inference engines warm.
//!
//! The daemon starts it on the first inference it runs and hands it jobs, one at a time, as job
//! directories (the same `job.json` that `bitnode job-exec` reads). It answers with the same
//! [`ExecLine`]s, then [`ExecLine::End`]. Loading a model (reading, converting and uploading its weights) is
//! paid once per model, not per request. It is still a process of its own, so a GPU fault cannot take the
//! daemon down; the daemon starts a new one after a crash.
//!
//! Protocol on stdin, one JSON object per line:
//! - `{"run": "<job dir>"}`: run that job (an inference);
//! - `{"cancel": true}`: end the running generation at its next token (the engine stays loaded);
//! - `{"evict": true}`: drop every engine (a fine-tune is about to need the memory).
//!
//! Engines are kept by (model, adapter), least recently used first out, within `--budget` bytes (a
//! model's size on disk stands for its device memory: the weights dominate), and dropped after
//! `--idle-secs` unused. With no engine left and nothing to do, the process exits; the daemon starts it
//! again when needed.
use crate::exec::{self, ExecLine, JobEvent};
use bitnode_engine::session::{Engine, EngineOptions};
use bitnode_protocol::job::JobSpec;
use serde::Deserialize;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Debug, Deserialize)]
struct HostIn {
    #[serde(default)]
    run: Option<PathBuf>,
    #[serde(default)]
    cancel: bool,
    #[serde(default)]
    evict: bool,
}

enum Work {
    Run(PathBuf),
    Evict,
}

struct Warm {
    key: (PathBuf, Option<PathBuf>),
    engine: Engine,
    bytes: u64,
    used: Instant,
}

fn dir_bytes(d: &std::path::Path) -> u64 {
    std::fs::read_dir(d)
        .map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// Runs the host until stdin closes (the daemon went away) or it has been idle with nothing loaded.
pub fn run(opts: EngineOptions, budget: u64, idle: Duration) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<Work>();
    // A reader thread, so that a cancel arrives while a generation runs on this one.
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            let Ok(m) = serde_json::from_str::<HostIn>(&line) else {
                eprintln!("engine host: ignoring a malformed line");
                continue;
            };
            if m.cancel {
                exec::CANCEL.store(true, Ordering::Relaxed);
            }
            if m.evict && tx.send(Work::Evict).is_err() {
                break;
            }
            if let Some(d) = m.run {
                if tx.send(Work::Run(d)).is_err() {
                    break;
                }
            }
        }
    });
    let mut warm: Vec<Warm> = vec![];
    let mut out = std::io::stdout().lock();
    loop {
        let w = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(w) => w,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                warm.retain(|w| w.used.elapsed() < idle);
                if warm.is_empty() {
                    // Idle with nothing loaded: the daemon starts a new host when it needs one.
                    return Ok(());
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        };
        let dir = match w {
            Work::Evict => {
                warm.clear();
                continue;
            }
            Work::Run(d) => d,
        };
        // A cancel sent before this job started was for the one before.
        exec::CANCEL.store(false, Ordering::Relaxed);
        let res = run_one(&dir, &opts, budget, &mut warm, &mut out);
        let line = match res {
            Ok(result) => ExecLine::Result { result },
            Err(e) => ExecLine::Error {
                reason: format!("{e:#}"),
            },
        };
        exec::write_line(&mut out, &line)?;
        exec::write_line(&mut out, &ExecLine::End)?;
    }
}

fn run_one(
    dir: &std::path::Path,
    opts: &EngineOptions,
    budget: u64,
    warm: &mut Vec<Warm>,
    out: &mut dyn Write,
) -> anyhow::Result<serde_json::Value> {
    let f = exec::read_exec_file(dir)?;
    let JobSpec::Infer(req) = &f.spec else {
        anyhow::bail!("an engine host runs inference only");
    };
    exec::validate(&f.spec)?;
    let key = (f.paths.model.clone(), f.paths.adapter.clone());
    let i = match warm.iter().position(|w| w.key == key) {
        Some(i) => i,
        None => {
            let bytes = dir_bytes(&key.0) + key.1.as_deref().map(dir_bytes).unwrap_or(0);
            // Least recently used out until the new one fits (one engine is always allowed).
            warm.sort_by_key(|w| w.used);
            while !warm.is_empty() && warm.iter().map(|w| w.bytes).sum::<u64>() + bytes > budget {
                let gone = warm.remove(0);
                eprintln!("engine host: evicting {} to make room", gone.key.0.display());
            }
            let t0 = Instant::now();
            let engine = exec::load_engine(&key.0, &key.1, opts)?;
            eprintln!(
                "engine host: loaded {} in {:.2} s",
                key.0.display(),
                t0.elapsed().as_secs_f64()
            );
            warm.push(Warm {
                key,
                engine,
                bytes,
                used: Instant::now(),
            });
            warm.len() - 1
        }
    };
    let w = &mut warm[i];
    w.used = Instant::now();
    let model_dir = w.key.0.clone();
    let res = exec::infer_on(&mut w.engine, req, &model_dir, &mut |e: JobEvent<'_>| {
        let _ = exec::write_line(out, &ExecLine::from_event(&e));
    })?;
    Ok(serde_json::to_value(res)?)
}
