//! The client side of Mesh II: `bitnode submit` and `bitnode jobs`. The job is the same [`JobSpec`] the
//! local command builds; submitting imports its model and adapter into this node's content-addressed store
//! (so the spec names them by hash), asks the engine's planner what the job needs, and hands it to the
//! daemon, which places it, and streams back what happens.
use crate::api::{Event, JobView};
use crate::control::{self, Request};
use crate::exec::JobPaths;
use crate::models::Store;
use anyhow::Context;
use bitnode_protocol::job::JobSpec;
use std::io::Write;
use std::path::{Path, PathBuf};
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

/// What a job's `--model` or `--adapter` names.
pub(crate) enum Input {
    /// A directory, imported into the store.
    Dir(PathBuf),
    /// A name (`bitnode model add`) or content hash of an entry in this device's store.
    Stored { hash: String, dir: PathBuf },
    /// The content hash of an entry this device does not hold: a connected peer must (its advert says
    /// so; the daemon checks), and the job can run only there.
    Elsewhere(String),
}

impl Input {
    /// An existing directory (or GGUF file) is imported; else a name or hash in the store; else a
    /// well-formed hash is taken to be a peer's. Anything else is left a directory, whose import says it is
    /// missing.
    pub(crate) fn of(home: &Path, p: &Path) -> anyhow::Result<Input> {
        if p.is_dir() || p.is_file() {
            return Ok(Input::Dir(p.to_path_buf()));
        }
        let Some(s) = p.to_str() else {
            return Ok(Input::Dir(p.to_path_buf()));
        };
        if let Some(m) = crate::names::resolve(home, s)? {
            let dir = Store::new(home).resolve(&m.hash)?.context("the model left the store")?;
            return Ok(Input::Stored { hash: m.hash, dir });
        }
        if crate::models::valid_hash(s) {
            return Ok(Input::Elsewhere(s.to_string()));
        }
        Ok(Input::Dir(p.to_path_buf()))
    }

    /// Its hash, importing a directory (with its transfer manifest) into the store.
    fn hash(&self, store: &Store) -> anyhow::Result<String> {
        match self {
            Input::Dir(d) => import(store, d),
            Input::Stored { hash, .. } | Input::Elsewhere(hash) => Ok(hash.clone()),
        }
    }

    /// The directory to size it from, where this device has it.
    fn dir(&self) -> Option<&Path> {
        match self {
            Input::Dir(d) | Input::Stored { dir: d, .. } => Some(d),
            Input::Elsewhere(_) => None,
        }
    }
}

/// The daemon request for a job: model and adapter imported into the store and named by hash, the
/// planner's estimate of what the job needs, the dataset left at its path for the daemon to read.
/// `--model` and `--adapter` may also name entries of the store, or (inference and scoring) the hash of a
/// model only a connected peer holds: the job then runs there, sized by a nominal estimate
/// (`Need::unsized_inference`), since only its holders can size it.
pub fn prepare(home: &Path, mut spec: JobSpec, paths: &JobPaths, to: &str, detach: bool) -> anyhow::Result<Request> {
    let store = Store::new(home);
    let model_in = Input::of(home, &paths.model)?;
    let adapter_in = paths.adapter.as_deref().map(|a| Input::of(home, a)).transpose()?;
    let need = match (model_in.dir(), &spec) {
        (Some(m), _) => {
            let a = adapter_in.as_ref().and_then(Input::dir);
            crate::exec::estimate(&spec, m, a, paths.data.as_deref())?
        }
        (None, JobSpec::Infer(r)) => {
            crate::exec::validate(&spec)?;
            crate::schedule::Need::unsized_inference(r.prompt.len() as u64, r.max_tokens as u64)
        }
        (None, JobSpec::Score(r)) => {
            crate::exec::validate(&spec)?;
            crate::schedule::Need::unsized_inference(r.text.len() as u64, 0)
        }
        (None, JobSpec::Finetune(_)) => anyhow::bail!(
            "{} is not in this device's store: a fine-tune's memory is planned from its model, so it needs the \
             model here",
            paths.model.display()
        ),
    };
    let model = model_in.hash(&store)?;
    let adapter = adapter_in.as_ref().map(|a| a.hash(&store)).transpose()?;
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
        // A terminal that goes away leaves its job running (`bitnode jobs follow` re-attaches).
        cancel_on_disconnect: false,
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
    let v: JobView = if opts.detach {
        control::call(home, &req, Duration::from_secs(60))?
    } else {
        control::call_stream(home, &req, DAEMON_SILENCE, &mut |e| view.event(e))?
    };
    view.done(Some(&v));
    finish(kind, &v, opts.json, opts.detach)
}

/// Prints a job's outcome as `submit` does; an error unless it succeeded (or was only detached).
fn finish(kind: &str, v: &JobView, json: bool, detach: bool) -> anyhow::Result<()> {
    let state = v.state.as_str();
    if json {
        println!("{}", serde_json::to_string(&SubmitLine::of(v))?);
    } else if detach {
        println!(
            "job {} submitted: {} on {}; follow it with `bitnode jobs show {}`",
            v.job_id,
            state,
            v.executed_by_name.as_deref().unwrap_or("?"),
            v.job_id,
        );
    } else {
        print_result(kind, v);
    }
    if !detach && v.state != crate::jobs::State::Succeeded {
        anyhow::bail!(
            "job {} {state}: {}",
            v.job_id,
            v.reason.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(())
}

/// The last line of `bitnode submit --json`: the job's outcome without its placement history.
#[derive(serde::Serialize)]
struct SubmitLine<'a> {
    job_id: &'a str,
    executed_by: &'a Option<String>,
    executed_by_name: &'a Option<String>,
    state: crate::jobs::State,
    result: &'a Option<serde_json::Value>,
    reason: &'a Option<String>,
    attempts: &'a [String],
}

impl<'a> SubmitLine<'a> {
    fn of(v: &'a JobView) -> SubmitLine<'a> {
        SubmitLine {
            job_id: &v.job_id,
            executed_by: &v.executed_by,
            executed_by_name: &v.executed_by_name,
            state: v.state,
            result: &v.result,
            reason: &v.reason,
            attempts: &v.attempts,
        }
    }
}

/// The fields of a fine-tune's summary (engine `finetune::Summary`) the terminal shows.
#[derive(serde::Deserialize)]
struct FinetuneLine {
    adapter: String,
    steps: usize,
    first_loss: Option<f64>,
    last_loss: Option<f64>,
}

/// The result in the local command's words. It is the local command's own JSON object, passed through
/// the mesh as the worker produced it; one this build cannot read is printed as it is.
fn print_result(kind: &str, v: &JobView) {
    let who = v.executed_by_name.as_deref().unwrap_or("?");
    let Some(r) = v.result.clone() else { return };
    let loss = |l: Option<f64>| l.map_or("-".into(), |l| format!("{l:.4}"));
    let shown = match kind {
        "infer" => serde_json::from_value::<bitnode_protocol::InferResult>(r.clone()).map(|r| {
            eprintln!(
                "[ran on {who}: {} prompt tokens, {} generated, {:.1} tok/s decode, stop: {}]",
                r.prompt_tokens,
                r.tokens.len(),
                r.decode_tokens_per_second,
                r.stop_reason
            )
        }),
        "score" => serde_json::from_value::<bitnode_protocol::ScoreResult>(r.clone()).map(|r| {
            println!(
                "tokens: {}\nnll: {:.6} nats/token\nperplexity: {:.4}\n(ran on {who})",
                r.tokens, r.nll, r.ppl
            )
        }),
        _ => serde_json::from_value::<FinetuneLine>(r.clone()).map(|r| {
            println!(
                "wrote adapter to {} ({} steps on {who}; loss {} -> {})",
                r.adapter,
                r.steps,
                loss(r.first_loss),
                loss(r.last_loss)
            )
        }),
    };
    if shown.is_err() {
        println!("result (from {who}): {r}");
    }
}

/// One line of `--json-log`, as the local `finetune --json-log` writes it (plus the worker).
#[derive(serde::Serialize)]
struct LogLine<'a> {
    step: u64,
    loss: f64,
    lr: f64,
    tokens_per_second: f64,
    worker: &'a str,
}

/// What the submitting terminal shows while the job runs: where it went and why, the text as it streams,
/// a progress bar for fine-tunes, failovers.
struct View {
    log: Option<std::fs::File>,
    json: bool,
    kind: &'static str,
    bar: Option<indicatif::ProgressBar>,
    printed_text: bool,
    /// The generated text printed so far.
    printed: String,
}

impl View {
    fn new(json: bool, kind: &'static str) -> View {
        View {
            log: None,
            json,
            kind,
            bar: None,
            printed_text: false,
            printed: String::new(),
        }
    }

    fn say(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::Placed { name, why, after, .. } => {
                let after = after.map(|a| format!(" (moved: {a})")).unwrap_or_default();
                self.say(&format!("-> {} job goes to {name}{after}: {why}", self.kind));
            }
            Event::AttemptFailed { name, reason, .. } => self.say(&format!("!! {name} lost the job: {reason}")),
            Event::Tokens { text, .. } => {
                let mut out = std::io::stdout();
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
                self.printed_text = true;
                self.printed.push_str(&text);
            }
            Event::Progress(p) => {
                if let Some(f) = self.log.as_mut() {
                    if let Ok(line) = serde_json::to_string(&LogLine {
                        step: p.step,
                        loss: p.loss,
                        lr: p.lr,
                        tokens_per_second: p.tokens_per_second,
                        worker: &p.worker,
                    }) {
                        let _ = writeln!(f, "{line}");
                    }
                }
                let total = p.total;
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
                bar.set_position(p.step);
                bar.set_message(format!("loss {:.4}  {:.0} tok/s", p.loss, p.tokens_per_second));
            }
            Event::Checkpoint { step, .. } if !self.json => {
                if let Some(b) = &self.bar {
                    b.set_message(format!("checkpoint at step {step} received"));
                }
            }
            _ => {}
        }
    }

    /// `v`: the job's final view, whose text completes what was streamed (None when following a job from
    /// the middle, where the streamed part is not the start of the text).
    fn done(&mut self, v: Option<&JobView>) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        // The result can overtake the last tokens (they travel as separate messages), and the job then
        // ends before they arrive: the pieces streamed so far add up to the start of the text, and the
        // rest is printed from the result, as the local command does.
        let text = v
            .and_then(|v| v.result.as_ref())
            .and_then(|r| r.get("text"))
            .and_then(|t| t.as_str());
        if let Some(rest) = text.and_then(|t| t.strip_prefix(self.printed.as_str())) {
            if !rest.is_empty() && self.kind == "infer" {
                let mut out = std::io::stdout();
                let _ = out.write_all(rest.as_bytes());
                self.printed_text = true;
            }
        }
        if self.printed_text {
            println!();
        }
    }
}

/// `bitnode jobs [--json]`: through the daemon, or from the job table when none runs.
pub fn list(home: &Path, json: bool) -> anyhow::Result<()> {
    let list: Vec<JobView> = match control::call(home, &Request::Jobs, Duration::from_secs(10)) {
        Ok(v) => v,
        Err(control::ClientError::NotRunning(_)) => offline_table(home)?,
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{}", serde_json::to_string(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no jobs yet (submit one with `bitnode submit infer|score|finetune ...`)");
    }
    for j in list {
        println!(
            "{}  {:<8} {:<10} on {:<16} {}",
            j.job_id,
            j.kind,
            j.state.as_str(),
            j.executed_by_name.as_deref().unwrap_or("-"),
            j.reason.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

/// The job table read straight from disk (no daemon runs), newest first.
fn offline_table(home: &Path) -> anyhow::Result<Vec<JobView>> {
    let p = crate::jobs::path(home);
    let t: crate::jobs::JobTable = match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", p.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    Ok(t.jobs.iter().rev().map(JobView::of).collect())
}

/// `bitnode jobs show ID [--json]`: state, where it ran and why, failovers, the result.
pub fn show(home: &Path, id: &str, json: bool) -> anyhow::Result<()> {
    let v: JobView = match control::call(home, &Request::JobShow { id: id.into() }, Duration::from_secs(10)) {
        Ok(v) => v,
        Err(control::ClientError::NotRunning(_)) => {
            let mut hits: Vec<JobView> = offline_table(home)?
                .into_iter()
                .filter(|j| id.len() >= 4 && j.job_id.starts_with(id))
                .collect();
            match hits.len() {
                1 => hits.remove(0),
                0 => anyhow::bail!("no job {id}"),
                n => anyhow::bail!("{id} matches {n} jobs; give more digits"),
            }
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    println!("job {}  ({})", v.job_id, v.kind);
    println!("state:       {}", v.state.as_str());
    if let Some(r) = &v.reason {
        println!("reason:      {r}");
    }
    println!(
        "executed by: {} ({})",
        v.executed_by_name.as_deref().unwrap_or("-"),
        v.executed_by.as_deref().unwrap_or("-")
    );
    println!("submitter:   {}", v.submitter);
    if let Some(p) = &v.progress {
        println!("progress:    step {}/{}  loss {:.4}", p.step, p.total, p.loss);
    }
    println!("why there:");
    for l in &v.placement {
        println!("  {l}");
    }
    if !v.attempts.is_empty() {
        println!("earlier attempts:");
        for a in &v.attempts {
            println!("  {a}");
        }
    }
    if let Some(r) = &v.result {
        println!("result:      {r}");
    }
    Ok(())
}

/// `bitnode jobs follow ID [--json]`: the job's stream from now on, shown as `submit` shows it, and its
/// outcome (the exit code is 1 unless it succeeded).
pub fn follow(home: &Path, id: &str, json: bool) -> anyhow::Result<()> {
    // The kind decides how the result reads; ask for the job first.
    let first: JobView = control::call(home, &Request::JobShow { id: id.into() }, Duration::from_secs(10))?;
    let kind: &'static str = match first.kind.as_str() {
        "infer" => "infer",
        "score" => "score",
        _ => "finetune",
    };
    let mut view = View::new(json, kind);
    let v: JobView = control::call_stream(home, &Request::JobFollow { id: id.into() }, DAEMON_SILENCE, &mut |e| {
        view.event(e)
    })?;
    view.done(None);
    finish(kind, &v, json, false)
}

/// `bitnode jobs cancel ID`.
pub fn cancel(home: &Path, id: &str) -> anyhow::Result<()> {
    let v: JobView = control::call(home, &Request::JobCancel { id: id.into() }, Duration::from_secs(10))?;
    println!("job {} {}", v.job_id, v.state.as_str());
    Ok(())
}
