//! A job's child process (`bitnode job-exec`): started, watched and killed only by the one task that owns
//! it, so a kill can never reach a pid that was reaped and reused.
#[allow(unused_imports)]
use super::jobs::*;
use super::*;

/// Asks the task that owns a job's child process to kill it (SIGKILL). The owner has not reaped the
/// child while this is deliverable, so the signal cannot reach a recycled pid.
pub(super) struct ChildKill(mpsc::Sender<()>);

impl ChildKill {
    /// A handle whose kill goes to `tx`'s owner (a child's owning task, or the engine host's actor).
    pub(super) fn new(tx: mpsc::Sender<()>) -> ChildKill {
        ChildKill(tx)
    }

    pub(super) fn kill(&self) {
        // Full: a kill is already pending; closed: the child has exited. Either way nothing to add.
        let _ = self.0.try_send(());
    }
}

/// Linux: the kernel kills the job process when the daemon dies (`PR_SET_PDEATHSIG`), so a killed
/// daemon leaves no orphan job running. Elsewhere (macOS has no such call; not built or tested here)
/// the orphan ends at its next write to the closed stdout pipe (SIGPIPE), which a running job makes at
/// least once per step or token.
pub(super) fn die_with_parent(cmd: &mut tokio::process::Command) {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// Starts `bitnode job-exec --dir DIR` and the task that owns it: it forwards the child's lines (tokens
/// batched for up to 30 ms) and then its exit to the daemon, and is the only one that ever kills it.
pub(super) fn start_child(
    home: &Path,
    dir: &Path,
    id: &str,
    tx: mpsc::UnboundedSender<Internal>,
) -> anyhow::Result<ChildKill> {
    let exe = std::env::current_exe().context("locating the bitnode binary")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--home")
        .arg(home)
        .arg("job-exec")
        .arg("--dir")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().context("starting the job process")?;
    let pid = child.id().context("the job process has no pid")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let task = id.to_string();
    tracing::info!(job = %id, pid, "job started");
    let tail = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut tail: VecDeque<String> = VecDeque::new();
        while let Ok(Some(l)) = lines.next_line().await {
            tail.push_back(l);
            if tail.len() > 20 {
                tail.pop_front();
            }
        }
        tail.into_iter().collect::<Vec<_>>().join("\n")
    });
    let reader = tokio::spawn(forward_lines(stdout, task.clone(), tx.clone()));
    // Only the task that owns the `Child` ever signals it, and only before it has reaped it: a kill is a
    // message to that task, never a signal to a pid number that may since belong to another process.
    let (kill_tx, mut kill_rx) = mpsc::channel::<()>(1);
    tokio::spawn(async move {
        let status = loop {
            tokio::select! {
                s = child.wait() => break s,
                Some(()) = kill_rx.recv() => {
                    // tokio refuses to signal a child it has already reaped.
                    if let Err(e) = child.start_kill() {
                        tracing::debug!("killing the job process: {e}");
                    }
                }
            }
        };
        let ok = status.map(|s| s.success()).unwrap_or(false);
        // Every line the child wrote is handed on before its exit is.
        let _ = reader.await;
        let stderr_tail = tail.await.unwrap_or_default();
        let _ = tx.send(Internal::ChildExit { task, ok, stderr_tail });
    });
    Ok(ChildKill(kill_tx))
}

/// Tokens on their way to the job manager, batched so that fast decoding does not become one envelope
/// per token: a batch goes out at most every 30 ms, however fast the tokens come (a timeout per line
/// would hold every token of a fast generation back until its end). A token that finds nothing sent in
/// the last 30 ms goes out at once, and so does every token until the first one with text: a token can
/// carry no text of its own (part of a UTF-8 character, held back until the rest comes), and the time to
/// first token is the time to the first text a client sees.
#[derive(Default)]
pub(super) struct TokenBatch {
    pending: Option<(Vec<u32>, String, tokio::time::Instant)>,
    last: Option<tokio::time::Instant>,
    /// A batch with text has gone out.
    texted: bool,
}

const TOKEN_BATCH: Duration = Duration::from_millis(30);

impl TokenBatch {
    pub(super) fn push(&mut self, id: u32, text: &str) {
        let last = self.last.filter(|_| self.texted);
        let p = self.pending.get_or_insert_with(|| {
            let now = tokio::time::Instant::now();
            let due = last.map_or(now, |l| (l + TOKEN_BATCH).max(now));
            (vec![], String::new(), due)
        });
        p.0.push(id);
        p.1.push_str(text);
    }

    /// When the pending batch is due (None: nothing pending).
    pub(super) fn due(&self) -> Option<tokio::time::Instant> {
        self.pending.as_ref().map(|p| p.2)
    }

    /// Sends the pending batch, if any, as task `task`'s tokens.
    pub(super) fn flush(&mut self, task: &str, tx: &mpsc::UnboundedSender<Internal>) {
        if let Some((ids, text, _)) = self.pending.take() {
            self.last = Some(tokio::time::Instant::now());
            self.texted |= !text.is_empty();
            let _ = tx.send(Internal::Tokens {
                task: task.to_string(),
                ids,
                text,
            });
        }
    }
}

/// Hands a job process's stdout lines to the daemon, tokens batched ([`TokenBatch`]).
pub(super) async fn forward_lines(
    stdout: tokio::process::ChildStdout,
    task: String,
    tx: mpsc::UnboundedSender<Internal>,
) {
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut batch = TokenBatch::default();
    loop {
        let next = match batch.due() {
            Some(due) => match tokio::time::timeout_at(due, lines.next_line()).await {
                Ok(l) => l,
                Err(_) => {
                    batch.flush(&task, &tx);
                    continue;
                }
            },
            None => lines.next_line().await,
        };
        let Ok(Some(l)) = next else { break };
        let Ok(line) = serde_json::from_str::<ExecLine>(&l) else {
            tracing::debug!("job output: {l}");
            continue;
        };
        if let ExecLine::Token { id, text } = &line {
            batch.push(*id, text);
            continue;
        }
        batch.flush(&task, &tx);
        let _ = tx.send(Internal::Child {
            task: task.clone(),
            line,
        });
    }
    batch.flush(&task, &tx);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test]
    async fn tokens_go_at_once_until_the_first_text_then_at_most_every_30_ms() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut b = TokenBatch::default();
        assert!(b.due().is_none());
        // A token without text (half of a UTF-8 character): due at once, and so is the next.
        b.push(1, "");
        assert!(b.due().is_some_and(|d| d <= Instant::now()));
        b.flush("j", &tx);
        b.push(2, "hi");
        assert!(b.due().is_some_and(|d| d <= Instant::now()));
        let sent = Instant::now();
        b.flush("j", &tx);
        // Text has gone out: the next batch waits 30 ms from that flush, however many tokens join it.
        b.push(3, " a");
        b.push(4, " b");
        assert!(b.due().is_some_and(|d| d >= sent + TOKEN_BATCH));
        b.flush("j", &tx);
        assert!(b.due().is_none());
        let mut got = vec![];
        while let Ok(Internal::Tokens { ids, text, .. }) = rx.try_recv() {
            got.push((ids, text));
        }
        assert_eq!(
            got,
            vec![
                (vec![1], String::new()),
                (vec![2], "hi".to_string()),
                (vec![3, 4], " a b".to_string())
            ]
        );
    }
}
