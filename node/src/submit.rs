//! The client side of Mesh II: `bitnode submit` and `bitnode jobs`. The job is the same [`JobSpec`] the
//! local command builds; submitting imports its model and adapter into this node's content-addressed store
//! (so the spec names them by hash), asks the engine's planner what the job needs, and hands it to the
//! daemon, which places it, and streams back what happens.
use crate::control::{self, Request};
use crate::exec::JobPaths;
use crate::models::Store;
use anyhow::Context;
use bitnode_protocol::job::JobSpec;
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Where the submitting CLI stops waiting for a silent daemon (it sends a heartbeat every few seconds).
const DAEMON_SILENCE: Duration = Duration::from_secs(60);

pub struct SubmitOptions {
    /// "auto", "local", or a paired peer (id or name).
    pub to: String,
    pub detach: bool,
    pub json: bool,
}

/// Imports `dir` into the store and precomputes its transfer manifest (so the daemon never hashes a big
/// model inside its event loop).
fn import(store: &Store, dir: &Path) -> anyhow::Result<String> {
    let h = store
        .import(dir)
        .with_context(|| format!("importing {} into the model store", dir.display()))?;
    store.manifest(&h)?;
    Ok(h)
}

/// The daemon request for a job: model and adapter imported into the store and named by hash, the
/// planner's estimate of what the job needs, the dataset left at its path for the daemon to read.
pub fn prepare(home: &Path, mut spec: JobSpec, paths: &JobPaths, to: &str, detach: bool) -> anyhow::Result<Request> {
    let store = Store::new(home);
    let need = crate::exec::estimate(&spec, &paths.model, paths.adapter.as_deref(), paths.data.as_deref())?;
    let model = import(&store, &paths.model)?;
    let adapter = paths.adapter.as_deref().map(|a| import(&store, a)).transpose()?;
    match &mut spec {
        JobSpec::Infer(r) => {
            r.model = model;
            r.adapter = adapter;
        }
        JobSpec::Score(r) => {
            r.model = model;
            r.adapter = adapter;
        }
        JobSpec::Finetune(f) => {
            f.model = model;
            f.init_adapter = adapter;
            // The daemon reads the dataset from `data_path` (a control line is small).
            f.data = vec![];
        }
    }
    let out = paths
        .out
        .as_ref()
        .map(|o| std::path::absolute(o).unwrap_or_else(|_| o.clone()));
    let data_path = paths
        .data
        .as_ref()
        .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()));
    let resume = paths
        .resume
        .as_ref()
        .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()));
    Ok(Request::Submit {
        spec,
        data_path,
        need,
        to: to.into(),
        out,
        resume,
        detach,
    })
}

/// `bitnode submit infer|score|finetune ...`: `spec` and `paths` are what the local command would run.
pub fn submit(home: &Path, spec: JobSpec, paths: &JobPaths, opts: &SubmitOptions) -> anyhow::Result<()> {
    let kind = spec.kind();
    let req = prepare(home, spec, paths, &opts.to, opts.detach)?;
    let mut view = View::new(opts.json, kind);
    if let Some(p) = &paths.json_log {
        // The same per-step lines the local command writes, from the progress the worker streams back.
        view.log = Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?);
    }
    let v = if opts.detach {
        control::call(home, &req, Duration::from_secs(60))?
    } else {
        control::call_stream(home, &req, DAEMON_SILENCE, &mut |e| view.event(e))?
    };
    view.done();
    let line = serde_json::json!({
        "job_id": v["job_id"],
        "executed_by": v["executed_by"],
        "executed_by_name": v["executed_by_name"],
        "state": v["state"],
        "result": v["result"],
        "reason": v["reason"],
        "attempts": v["attempts"],
    });
    let state = v["state"].as_str().unwrap_or("?");
    if opts.json {
        println!("{line}");
    } else if opts.detach {
        println!(
            "job {} submitted: {} on {}; follow it with `bitnode jobs show {}`",
            v["job_id"].as_str().unwrap_or("?"),
            state,
            v["executed_by_name"].as_str().unwrap_or("?"),
            v["job_id"].as_str().unwrap_or("?"),
        );
    } else {
        print_result(kind, &v);
    }
    if !opts.detach && state != "succeeded" {
        anyhow::bail!(
            "job {} {state}: {}",
            v["job_id"].as_str().unwrap_or("?"),
            v["reason"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(())
}

fn print_result(kind: &str, v: &Value) {
    let who = v["executed_by_name"].as_str().unwrap_or("?");
    let r = &v["result"];
    match kind {
        "infer" => eprintln!(
            "[ran on {who}: {} prompt tokens, {} generated, {:.1} tok/s decode, stop: {}]",
            r["prompt_tokens"],
            r["tokens"].as_array().map_or(0, |t| t.len()),
            r["decode_tokens_per_second"].as_f64().unwrap_or(0.0),
            r["stop_reason"].as_str().unwrap_or("?")
        ),
        "score" => println!(
            "tokens: {}\nnll: {:.6} nats/token\nperplexity: {:.4}\n(ran on {who})",
            r["tokens"],
            r["nll"].as_f64().unwrap_or(f64::NAN),
            r["ppl"].as_f64().unwrap_or(f64::NAN)
        ),
        _ => println!(
            "wrote adapter to {} ({} steps on {who}; loss {} -> {})",
            r["adapter"].as_str().unwrap_or("?"),
            r["steps"],
            r["first_loss"].as_f64().map_or("-".into(), |l| format!("{l:.4}")),
            r["last_loss"].as_f64().map_or("-".into(), |l| format!("{l:.4}")),
        ),
    }
}

/// What the submitting terminal shows while the job runs: where it went and why, the text as it streams,
/// a progress bar for fine-tunes, failovers.
struct View {
    log: Option<std::fs::File>,
    json: bool,
    kind: &'static str,
    bar: Option<indicatif::ProgressBar>,
    printed_text: bool,
}

impl View {
    fn new(json: bool, kind: &'static str) -> View {
        View {
            log: None,
            json,
            kind,
            bar: None,
            printed_text: false,
        }
    }

    fn say(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }

    fn event(&mut self, e: &Value) {
        match e["event"].as_str().unwrap_or("") {
            "placed" => {
                let after = e["after"]
                    .as_str()
                    .map(|a| format!(" (moved: {a})"))
                    .unwrap_or_default();
                self.say(&format!(
                    "-> {} job goes to {}{after}: {}",
                    self.kind,
                    e["name"].as_str().unwrap_or("?"),
                    e["why"].as_str().unwrap_or("")
                ));
            }
            "attempt_failed" => self.say(&format!(
                "!! {} lost the job: {}",
                e["name"].as_str().unwrap_or("?"),
                e["reason"].as_str().unwrap_or("?")
            )),
            "tokens" => {
                let mut out = std::io::stdout();
                let _ = out.write_all(e["text"].as_str().unwrap_or("").as_bytes());
                let _ = out.flush();
                self.printed_text = true;
            }
            "progress" => {
                if let Some(f) = self.log.as_mut() {
                    let line = serde_json::json!({"step": e["step"], "loss": e["loss"], "lr": e["lr"],
                        "tokens_per_second": e["tokens_per_second"], "worker": e["worker"]});
                    let _ = writeln!(f, "{line}");
                }
                let total = e["total"].as_u64().unwrap_or(0);
                let bar = self.bar.get_or_insert_with(|| {
                    let b = indicatif::ProgressBar::new(total);
                    if let Ok(style) =
                        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
                    {
                        b.set_style(style);
                    }
                    b
                });
                bar.set_length(total);
                bar.set_position(e["step"].as_u64().unwrap_or(0));
                bar.set_message(format!(
                    "loss {:.4}  {:.0} tok/s",
                    e["loss"].as_f64().unwrap_or(f64::NAN),
                    e["tokens_per_second"].as_f64().unwrap_or(0.0)
                ));
            }
            "checkpoint" if !self.json => {
                if let Some(b) = &self.bar {
                    b.set_message(format!("checkpoint at step {} received", e["step"]));
                }
            }
            _ => {}
        }
    }

    fn done(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if self.printed_text {
            println!();
        }
    }
}

/// `bitnode jobs [--json]`: through the daemon, or from the job table when none runs.
pub fn list(home: &Path, json: bool) -> anyhow::Result<()> {
    let v = match control::call(home, &Request::Jobs, Duration::from_secs(10)) {
        Ok(v) => v,
        Err(control::ClientError::NotRunning(_)) => offline_table(home)?,
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{v}");
        return Ok(());
    }
    let list = v.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no jobs yet (submit one with `bitnode submit infer|score|finetune ...`)");
    }
    for j in list {
        println!(
            "{}  {:<8} {:<10} on {:<16} {}",
            j["job_id"].as_str().unwrap_or("?"),
            j["kind"].as_str().unwrap_or("?"),
            j["state"].as_str().unwrap_or("?"),
            j["executed_by_name"].as_str().unwrap_or("-"),
            j["reason"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

fn offline_table(home: &Path) -> anyhow::Result<Value> {
    let p = crate::jobs::path(home);
    let t: crate::jobs::JobTable = match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", p.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    Ok(Value::Array(
        t.jobs
            .iter()
            .rev()
            .map(|j| {
                serde_json::json!({
                    "job_id": j.id, "kind": j.kind, "state": j.state, "submitter": j.submitter,
                    "executed_by": j.executed_by, "executed_by_name": j.executed_by_name,
                    "created_unix": j.created_unix, "updated_unix": j.updated_unix, "placement": j.placement,
                    "attempts": j.attempts, "reason": j.reason, "result": j.result, "out": j.out,
                })
            })
            .collect(),
    ))
}

/// `bitnode jobs show ID [--json]`: state, where it ran and why, failovers, the result.
pub fn show(home: &Path, id: &str, json: bool) -> anyhow::Result<()> {
    let v = match control::call(home, &Request::JobShow { id: id.into() }, Duration::from_secs(10)) {
        Ok(v) => v,
        Err(control::ClientError::NotRunning(_)) => {
            let all = offline_table(home)?;
            let hits: Vec<Value> = all
                .as_array()
                .into_iter()
                .flatten()
                .filter(|j| id.len() >= 4 && j["job_id"].as_str().is_some_and(|s| s.starts_with(id)))
                .cloned()
                .collect();
            match hits.as_slice() {
                [j] => j.clone(),
                [] => anyhow::bail!("no job {id}"),
                _ => anyhow::bail!("{id} matches {} jobs; give more digits", hits.len()),
            }
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{v}");
        return Ok(());
    }
    println!(
        "job {}  ({})",
        v["job_id"].as_str().unwrap_or("?"),
        v["kind"].as_str().unwrap_or("?")
    );
    println!("state:       {}", v["state"].as_str().unwrap_or("?"));
    if let Some(r) = v["reason"].as_str() {
        println!("reason:      {r}");
    }
    println!(
        "executed by: {} ({})",
        v["executed_by_name"].as_str().unwrap_or("-"),
        v["executed_by"].as_str().unwrap_or("-")
    );
    println!("submitter:   {}", v["submitter"].as_str().unwrap_or("?"));
    if let Some(p) = v["progress"].as_object() {
        println!(
            "progress:    step {}/{}  loss {:.4}",
            p.get("step").unwrap_or(&Value::Null),
            p.get("total").unwrap_or(&Value::Null),
            p.get("loss").and_then(Value::as_f64).unwrap_or(f64::NAN)
        );
    }
    println!("why there:");
    for l in v["placement"].as_array().into_iter().flatten() {
        println!("  {}", l.as_str().unwrap_or(""));
    }
    let attempts = v["attempts"].as_array().cloned().unwrap_or_default();
    if !attempts.is_empty() {
        println!("earlier attempts:");
        for a in attempts {
            println!("  {}", a.as_str().unwrap_or(""));
        }
    }
    if !v["result"].is_null() {
        println!("result:      {}", v["result"]);
    }
    Ok(())
}

/// `bitnode jobs cancel ID`.
pub fn cancel(home: &Path, id: &str) -> anyhow::Result<()> {
    let v = control::call(home, &Request::JobCancel { id: id.into() }, Duration::from_secs(10))?;
    println!(
        "job {} {}",
        v["job_id"].as_str().unwrap_or(id),
        v["state"].as_str().unwrap_or("cancelled")
    );
    Ok(())
}
