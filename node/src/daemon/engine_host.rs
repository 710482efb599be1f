//! The daemon's side of the engine host (`crate::host`, `bitnode engine-host`): one actor task that owns
//! the host process, starts it on the first inference, hands it one job at a time, routes its lines to the
//! job manager as a child's would be (tokens batched the same way), and reports each job's end as the
//! job's exit. A cancel asks the host to end the generation (the engine stays loaded); a host that dies
//! fails the job it ran as the device's fault (the submitter moves it) and is started again for the next.
use super::child::{die_with_parent, ChildKill, TokenBatch};
#[allow(unused_imports)]
use super::jobs::*;
use super::*;
use tokio::io::AsyncBufReadExt;

enum HostCmd {
    Run {
        task: String,
        dir: PathBuf,
        kill: mpsc::Receiver<()>,
    },
    /// Drop every warm engine (a fine-tune is about to start).
    Evict,
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

impl EngineHost {
    pub(super) fn start(home: &Path, budget: u64, idle_secs: u64, jobs: mpsc::UnboundedSender<Internal>) -> EngineHost {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(actor(home.to_path_buf(), budget, idle_secs, rx, jobs));
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

fn spawn(home: &Path, budget: u64, idle_secs: u64) -> anyhow::Result<Proc> {
    let exe = std::env::current_exe().context("locating the bitnode binary")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--home")
        .arg(home)
        .arg("engine-host")
        .arg("--budget")
        .arg(budget.to_string())
        .arg("--idle-secs")
        .arg(idle_secs.to_string())
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

async fn send(p: &mut Proc, v: serde_json::Value) -> std::io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    p.stdin.write_all(line.as_bytes()).await?;
    p.stdin.flush().await
}

async fn actor(
    home: PathBuf,
    budget: u64,
    idle_secs: u64,
    mut rx: mpsc::UnboundedReceiver<HostCmd>,
    jobs: mpsc::UnboundedSender<Internal>,
) {
    let mut host: Option<Proc> = None;
    while let Some(cmd) = rx.recv().await {
        let (task, dir, mut kill) = match cmd {
            HostCmd::Evict => {
                if let Some(p) = host.as_mut() {
                    let _ = send(p, serde_json::json!({"evict": true})).await;
                }
                continue;
            }
            HostCmd::Run { task, dir, kill } => (task, dir, kill),
        };
        // A host that exited (idle, or crashed between jobs) is replaced.
        if host.as_mut().is_some_and(|p| !matches!(p.child.try_wait(), Ok(None))) {
            host = None;
        }
        if host.is_none() {
            match spawn(&home, budget, idle_secs) {
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
        let Some(p) = host.as_mut() else { continue };
        let ok = run_one(p, &task, &dir, &mut kill, &jobs).await;
        if !ok {
            // It died (or its pipes broke) mid-job: the job fails as the device's fault.
            let tail = p
                .stderr_tail
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n");
            let _ = p.child.start_kill();
            host = None;
            let _ = jobs.send(Internal::ChildExit {
                task,
                ok: false,
                stderr_tail: if tail.is_empty() {
                    "the engine host died".into()
                } else {
                    tail
                },
            });
        }
    }
}

/// One job on the host: its lines go to the job manager (tokens batched as a child's are),
/// and its end as the job's exit. False: the host died first.
async fn run_one(
    p: &mut Proc,
    task: &str,
    dir: &Path,
    kill: &mut mpsc::Receiver<()>,
    jobs: &mpsc::UnboundedSender<Internal>,
) -> bool {
    if send(p, serde_json::json!({"run": dir})).await.is_err() {
        return false;
    }
    tracing::info!(job = %task, "job started on the warm engine host");
    let mut batch = TokenBatch::default();
    let mut cancelled = false;
    loop {
        let due = batch.due();
        let batch_due = async {
            match due {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            l = p.lines.next_line() => {
                let Ok(Some(l)) = l else { return false };
                let Ok(line) = serde_json::from_str::<ExecLine>(&l) else {
                    tracing::debug!("engine host output: {l}");
                    continue;
                };
                match line {
                    ExecLine::Token { id, text } => batch.push(id, &text),
                    ExecLine::End => {
                        batch.flush(task, jobs);
                        let _ = jobs.send(Internal::ChildExit { task: task.to_string(), ok: true, stderr_tail: String::new() });
                        return true;
                    }
                    line => {
                        batch.flush(task, jobs);
                        let _ = jobs.send(Internal::Child { task: task.to_string(), line });
                    }
                }
            }
            _ = batch_due => batch.flush(task, jobs),
            Some(()) = kill.recv(), if !cancelled => {
                cancelled = true;
                if send(p, serde_json::json!({"cancel": true})).await.is_err() {
                    return false;
                }
            }
        }
    }
}
