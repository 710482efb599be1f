//! The daemon's side of the engine host (`crate::host`, `bitnode engine-host`): one actor task that owns
//! the host process, starts it on the first inference, and hands it jobs as they come, several at once
//! (the host batches them). Each job in flight has a number; the host's lines carry it, and the actor
//! routes them to the job manager as a child's would be (tokens batched the same way, per job), and
//! reports each job's end as the job's exit. A cancel asks the host to end that job's generation (the
//! engine stays loaded); a host that dies fails every job in flight as the device's fault (the submitter
//! moves them) and is started again for the next. The host's reports of the memory its warm engines hold
//! go to the job manager, which takes them off the advertised memory.
use super::child::{die_with_parent, ChildKill, TokenBatch};
#[allow(unused_imports)]
use super::jobs::*;
use super::*;
use crate::host::{HostIn, HostOut};
use tokio::io::AsyncBufReadExt;

enum HostCmd {
    Run {
        task: String,
        dir: PathBuf,
        kill: mpsc::Receiver<()>,
    },
    /// The kill handle of this job (a host job number) fired.
    Cancel(u64),
    /// Drop every idle warm engine (a fine-tune is about to start).
    Evict,
}

/// How the daemon starts its engine host (`[serve]`).
#[derive(Debug, Clone, Copy)]
pub(super) struct HostArgs {
    pub(super) budget: u64,
    pub(super) idle_secs: u64,
    pub(super) max_batch: usize,
}

/// The handle the job manager holds.
#[derive(Clone)]
pub(super) struct EngineHost {
    tx: mpsc::UnboundedSender<HostCmd>,
}

struct Proc {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

/// A job the host runs now.
struct InFlight {
    task: String,
    batch: TokenBatch,
}

impl EngineHost {
    pub(super) fn start(home: &Path, args: HostArgs, jobs: mpsc::UnboundedSender<Internal>) -> EngineHost {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(actor(home.to_path_buf(), args, tx.clone(), rx, jobs));
        EngineHost { tx }
    }

    /// Runs the job laid out in `dir` on a warm engine; the returned handle cancels it.
    pub(super) fn run(&self, task: &str, dir: &Path) -> ChildKill {
        let (kill_tx, kill) = mpsc::channel(1);
        let _ = self.tx.send(HostCmd::Run {
            task: task.to_string(),
            dir: dir.to_path_buf(),
            kill,
        });
        ChildKill::new(kill_tx)
    }

    pub(super) fn evict(&self) {
        let _ = self.tx.send(HostCmd::Evict);
    }
}

fn spawn(home: &Path, args: HostArgs) -> anyhow::Result<Proc> {
    let exe = std::env::current_exe().context("locating the bitnode binary")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--home")
        .arg(home)
        .arg("engine-host")
        .arg("--budget")
        .arg(args.budget.to_string())
        .arg("--idle-secs")
        .arg(args.idle_secs.to_string())
        .arg("--max-batch")
        .arg(args.max_batch.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().context("starting the engine host")?;
    let stdin = child.stdin.take().context("no stdin")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
    let t = stderr_tail.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            tracing::info!("{l}");
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            t.push_back(l);
            if t.len() > 20 {
                t.pop_front();
            }
        }
    });
    tracing::info!(pid = child.id().unwrap_or(0), "engine host started");
    Ok(Proc {
        child,
        stdin,
        lines: tokio::io::BufReader::new(stdout).lines(),
        stderr_tail,
    })
}

async fn send(p: &mut Proc, m: &HostIn) -> std::io::Result<()> {
    let mut line = serde_json::to_string(m).map_err(std::io::Error::other)?;
    line.push('\n');
    p.stdin.write_all(line.as_bytes()).await?;
    p.stdin.flush().await
}

/// The host's next stdout line; never, without a host.
async fn next_line(host: &mut Option<Proc>) -> std::io::Result<Option<String>> {
    match host {
        Some(p) => p.lines.next_line().await,
        None => std::future::pending().await,
    }
}

/// The host is gone (it died, its pipes broke, or it exited idle): every job in flight fails as the
/// device's fault, and the memory its engines held is free again.
fn host_gone(host: &mut Option<Proc>, flight: &mut HashMap<u64, InFlight>, jobs: &mpsc::UnboundedSender<Internal>) {
    let Some(mut p) = host.take() else { return };
    let tail = p
        .stderr_tail
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    let _ = p.child.start_kill();
    let _ = jobs.send(Internal::WarmBytes(0));
    for (_, mut j) in flight.drain() {
        j.batch.flush(&j.task, jobs);
        let _ = jobs.send(Internal::ChildExit {
            task: j.task,
            ok: false,
            stderr_tail: if tail.is_empty() {
                "the engine host died".into()
            } else {
                tail.clone()
            },
        });
    }
}

async fn actor(
    home: PathBuf,
    args: HostArgs,
    me: mpsc::UnboundedSender<HostCmd>,
    mut rx: mpsc::UnboundedReceiver<HostCmd>,
    jobs: mpsc::UnboundedSender<Internal>,
) {
    let mut host: Option<Proc> = None;
    let mut flight: HashMap<u64, InFlight> = HashMap::new();
    let mut next_id = 0u64;
    loop {
        let due = flight.values().filter_map(|j| j.batch.due()).min();
        let batch_due = async {
            match due {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            cmd = rx.recv() => {
                // Every handle is gone: the daemon is shutting down (the host dies with its pipes).
                let Some(cmd) = cmd else { break };
                match cmd {
                    HostCmd::Run { task, dir, kill } => {
                        // A host that exited (idle, or crashed since its last line) is replaced.
                        if host.as_mut().is_some_and(|p| !matches!(p.child.try_wait(), Ok(None))) {
                            host_gone(&mut host, &mut flight, &jobs);
                        }
                        if host.is_none() {
                            match spawn(&home, args) {
                                Ok(p) => host = Some(p),
                                Err(e) => {
                                    let _ = jobs.send(Internal::ChildExit {
                                        task,
                                        ok: false,
                                        stderr_tail: format!("{e:#}"),
                                    });
                                    continue;
                                }
                            }
                        }
                        next_id += 1;
                        let id = next_id;
                        tracing::info!(job = %task, host_job = id, "job started on the warm engine host");
                        flight.insert(id, InFlight { task, batch: TokenBatch::default() });
                        // The kill handle lives as long as the job's task: a kill becomes a cancel of
                        // this job on the host.
                        let me = me.clone();
                        let mut kill = kill;
                        tokio::spawn(async move {
                            if kill.recv().await.is_some() {
                                let _ = me.send(HostCmd::Cancel(id));
                            }
                        });
                        let sent = match host.as_mut() {
                            Some(p) => send(p, &HostIn::Run { run: dir, id }).await.is_ok(),
                            None => false,
                        };
                        if !sent {
                            host_gone(&mut host, &mut flight, &jobs);
                        }
                    }
                    HostCmd::Cancel(id) => {
                        if flight.contains_key(&id) {
                            let sent = match host.as_mut() {
                                Some(p) => send(p, &HostIn::Cancel { cancel: id }).await.is_ok(),
                                None => false,
                            };
                            if !sent {
                                host_gone(&mut host, &mut flight, &jobs);
                            }
                        }
                    }
                    HostCmd::Evict => {
                        if let Some(p) = host.as_mut() {
                            let _ = send(p, &HostIn::Evict { evict: true }).await;
                        }
                    }
                }
            }
            l = next_line(&mut host) => {
                let Ok(Some(l)) = l else {
                    // Its stdout closed: it exited, idle (nothing in flight), or died.
                    host_gone(&mut host, &mut flight, &jobs);
                    continue;
                };
                match serde_json::from_str::<HostOut>(&l) {
                    Ok(HostOut::Warm { warm_bytes }) => {
                        let _ = jobs.send(Internal::WarmBytes(warm_bytes));
                    }
                    Ok(HostOut::Job { id, line }) => route(&mut flight, id, line, &jobs),
                    Err(_) => tracing::debug!("engine host output: {l}"),
                }
            }
            _ = batch_due => {
                let now = tokio::time::Instant::now();
                for j in flight.values_mut() {
                    if j.batch.due().is_some_and(|d| d <= now) {
                        j.batch.flush(&j.task, &jobs);
                    }
                }
            }
        }
    }
}

/// Hands one of job `id`'s lines to the job manager: tokens batched, its end as the job's exit.
fn route(flight: &mut HashMap<u64, InFlight>, id: u64, line: ExecLine, jobs: &mpsc::UnboundedSender<Internal>) {
    let Some(j) = flight.get_mut(&id) else {
        tracing::debug!(host_job = id, "a line of a job that is not in flight");
        return;
    };
    match line {
        ExecLine::Token { id: tok, text } => j.batch.push(tok, &text),
        ExecLine::End => {
            j.batch.flush(&j.task, jobs);
            if let Some(j) = flight.remove(&id) {
                let _ = jobs.send(Internal::ChildExit {
                    task: j.task,
                    ok: true,
                    stderr_tail: String::new(),
                });
            }
        }
        line => {
            j.batch.flush(&j.task, jobs);
            let _ = jobs.send(Internal::Child {
                task: j.task.clone(),
                line,
            });
        }
    }
}
