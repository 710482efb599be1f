//! The worker's half of a job (see `jobs.rs`): accepting a signed job, running it (on the engine host's
//! warm engines, `engine_host.rs`, or in a child process, `child.rs`), streaming its updates back, and
//! holding its result for a submitter that went away.
use super::*;
#[allow(unused_imports)]
use super::{child::*, fetch::*, jobs::*, submitter::*};

/// Fine-tune progress goes back at most this often (the last step always).
pub(super) const PROGRESS_EVERY: Duration = Duration::from_millis(200);

pub(super) enum TaskState {
    /// Pulling missing inputs from the submitter: which hashes are still missing, the download of the first.
    Fetching {
        missing: Vec<String>,
        download: Option<Download>,
        in_flight: HashSet<(u32, u32)>,
        failed: Vec<Retry>,
        failures: u32,
    },
    Queued,
    /// Its directory is being laid out and its process started (off the event loop).
    Starting,
    Running {
        kill: ChildKill,
    },
    /// The process exited well; its adapter is being read off the event loop.
    Finishing,
    /// The result is waiting to be acknowledged by the submitter; `due` is when to resend it after a
    /// failed delivery (None while a delivery is in flight).
    Done {
        update: Update,
        tries: u32,
        due: Option<Instant>,
        /// Held for the submitter until then (`[jobs] retention_secs`), however long it is away.
        until: Instant,
        /// Bytes of the result (the adapter), counted against `[jobs] max_retained_bytes`.
        bytes: u64,
    },
}

/// What an update in flight to a submitter was.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Sent {
    Result,
    Checkpoint,
    Other,
}

/// How a job shares the device with the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    /// An inference on the engine host's warm engines, which decode such jobs together.
    Batched,
    /// A fine-tune, a score, or an inference in a process of its own: it has the device to itself.
    Alone,
}

/// Whether the first queued job, of kind `next`, may start beside the jobs `running` now. Jobs start in
/// arrival order: one that must wait holds up those behind it (so a fine-tune waiting for the inferences
/// to end is not overtaken by newer ones). Batched jobs run together up to `max_batch` (0 counts as 1);
/// a job that runs alone starts only on an idle device, and nothing starts beside it.
pub(super) fn may_start(next: Slot, running: &[Slot], max_batch: usize) -> bool {
    match next {
        Slot::Alone => running.is_empty(),
        Slot::Batched => running.iter().all(|r| *r == Slot::Batched) && running.len() < max_batch.max(1),
    }
}

/// A job this node runs.
pub(super) struct Task {
    pub(super) job_id: [u8; 16],
    /// None: submitted by this node itself.
    pub(super) submitter: Option<PeerId>,
    pub(super) payload: JobPayload,
    pub(super) dir: PathBuf,
    pub(super) state: TaskState,
    pub(super) cancelled: Option<String>,
    pub(super) result: Option<serde_json::Value>,
    pub(super) error: Option<String>,
    /// When the last progress update went out (they are sent at most every 200 ms).
    pub(super) last_progress: Option<Instant>,
    /// The newest checkpoint the job wrote (step, directory), and whether its delivery failed: it is
    /// read and sent again once the submitter answers (it was away: restarting, or a phone asleep).
    pub(super) last_checkpoint: Option<(usize, String)>,
    pub(super) checkpoint_unsent: bool,
}

impl JobManager {
    pub(super) fn job_request(&mut self, peer: PeerId, env: Envelope) -> JobAck {
        let rej = |r: String| JobAck::Rejected { reason: r };
        let kind = env.header.kind;
        if kind != Kind::Job && kind != Kind::Cancel {
            return rej(format!("a {kind:?} envelope is not a job"));
        }
        let max = self.job_message_max();
        let payload = match self.open_envelope(&peer, &env, kind, max) {
            Ok(p) => p.to_vec(),
            Err(e) => return rej(e),
        };
        let id = hex(&env.header.job_id);
        if kind == Kind::Cancel {
            return match self.work.tasks.get(&id) {
                Some(t) if t.submitter == Some(peer) => {
                    self.cancel_task(&id, "cancelled by its submitter");
                    JobAck::Accepted { queue_position: 0 }
                }
                _ => rej("no such job on this device".into()),
            };
        }
        if !self.cfg.jobs.accept_remote {
            return rej("this device does not take jobs from other devices ([jobs] accept_remote = false)".into());
        }
        let payload: JobPayload = match wire::decode(&payload, max) {
            Ok(p) => p,
            Err(e) => return rej(format!("malformed job: {e}")),
        };
        if let Err(e) = self.check_payload(&payload) {
            return rej(e);
        }
        let on_battery = {
            let m = self.mesh.borrow();
            m.caps.on_ac == Some(false) && m.caps.battery_percent.is_some()
        };
        if on_battery && !self.cfg.jobs.run_on_battery {
            return rej(
                "this device is on battery and does not take jobs from others then ([jobs] run_on_battery)".into(),
            );
        }
        if self.work.tasks.contains_key(&id) || self.work.subs.contains_key(&id) {
            return rej("this job is already here".into());
        }
        // A job id may come back from the same submitter (a failover back to this device); never may a
        // peer reuse the id of a job another device (or this one) submitted.
        if self
            .work
            .table
            .jobs
            .iter()
            .any(|j| j.id == id && j.submitter != peer.to_base58())
        {
            return rej("that job id belongs to another submitter".into());
        }
        if self.work.waiting_len() >= self.cfg.jobs.max_queue {
            return rej(format!(
                "the queue is full ({} jobs waiting, [jobs] max_queue)",
                self.cfg.jobs.max_queue
            ));
        }
        let job = Job {
            id: id.clone(),
            kind: payload.spec.kind().into(),
            submitter: peer.to_base58(),
            executed_by: Some(self.me.to_base58()),
            state: State::Queued,
            created_unix: now_unix(),
            updated_unix: now_unix(),
            placement: vec![format!(
                "sent here by {} (attempt {})",
                self.peer_name(&peer),
                payload.attempt
            )],
            reason: None,
            result: None,
            attempts: vec![],
            executed_by_name: Some(self.name.clone()),
            out: None,
        };
        // A job id seen before (a resubmission after a failover back to us) replaces the old record.
        self.work.table.jobs.retain(|j| j.id != id);
        self.work.table.insert(job);
        self.persist_jobs();
        tracing::info!(job = %id, submitter = %peer, kind = payload.spec.kind(), "job accepted");
        let pos = self.work.queue_len();
        self.accept_task(id, env.header.job_id, Some(peer), payload);
        JobAck::Accepted { queue_position: pos }
    }

    /// What a worker checks in a job before taking it: well-formed content hashes only (never a path), the
    /// dataset and a resume checkpoint within this device's limits.
    pub(super) fn check_payload(&self, p: &JobPayload) -> Result<(), String> {
        crate::exec::validate(&p.spec).map_err(|e| format!("{e:#}"))?;
        for h in p.spec.inputs() {
            if !crate::models::valid_hash(h) {
                return Err(format!(
                    "{h:?} is not a model hash: remote jobs name models by content hash only"
                ));
            }
        }
        if let JobSpec::Finetune(f) = &p.spec {
            let max = self.cfg.jobs.max_dataset_bytes;
            if f.data.len() as u64 > max {
                return Err(format!(
                    "the dataset is {} bytes, over this device's limit of {max} bytes ([jobs] max_dataset_bytes)",
                    f.data.len()
                ));
            }
            let ext = Path::new(&f.data_name)
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("");
            if !bitnode_protocol::job::plain_name(&f.data_name) || !matches!(ext, "txt" | "jsonl") {
                return Err(format!(
                    "the dataset name {:?} must be a plain .txt or .jsonl file name",
                    f.data_name
                ));
            }
        }
        if let Some(b) = &p.resume {
            b.check()?;
            if b.total_bytes() as u64 > self.cfg.jobs.max_checkpoint_bytes {
                return Err("the resume checkpoint is over [jobs] max_checkpoint_bytes".into());
            }
        }
        Ok(())
    }

    /// Takes a job to run here: fetches what is missing, then queues it.
    pub(super) fn accept_task(&mut self, id: String, job_id: [u8; 16], submitter: Option<PeerId>, payload: JobPayload) {
        let missing: Vec<String> = payload
            .spec
            .inputs()
            .iter()
            .filter(|h| !matches!(self.work.store.resolve(h), Ok(Some(_))))
            .map(|h| h.to_string())
            .collect();
        let dir = self.home.join("work").join(&id);
        let _ = std::fs::remove_dir_all(&dir);
        let t = Task {
            job_id,
            submitter,
            payload,
            dir,
            state: TaskState::Queued,
            cancelled: None,
            result: None,
            error: None,
            last_progress: None,
            last_checkpoint: None,
            checkpoint_unsent: false,
        };
        self.work.tasks.insert(id.clone(), t);
        if missing.is_empty() || submitter.is_none() {
            self.work.order.push_back(id);
            self.start_next();
        } else {
            if let Some(t) = self.work.tasks.get_mut(&id) {
                t.state = TaskState::Fetching {
                    missing,
                    download: None,
                    in_flight: HashSet::new(),
                    failed: vec![],
                    failures: 0,
                };
            }
            self.fetch_next(&id);
        }
        self.refresh_job_caps();
    }

    /// Starts the queued jobs, in arrival order, while [`may_start`] lets the next one start beside those
    /// running (they share one device).
    pub(super) fn start_next(&mut self) {
        let max_batch = self.cfg.serve.max_batch;
        // A failed start ends that task, which calls back here: re-check before each one.
        while let Some(next) = self.work.order.front().map(|id| self.work.slot(id)) {
            let running: Vec<Slot> = self.work.running.iter().map(|id| self.work.slot(id)).collect();
            if !may_start(next, &running, max_batch) {
                break;
            }
            let Some(id) = self.work.order.pop_front() else { break };
            match self.spawn_task(&id) {
                Ok(()) => {
                    if let Some(t) = self.work.tasks.get_mut(&id) {
                        t.state = TaskState::Starting;
                    }
                    self.work.running.insert(id.clone());
                    if self.work.tasks.get(&id).is_some_and(|t| t.submitter.is_some()) {
                        self.update_job(&id, |j| j.state = State::Running);
                    }
                }
                Err(e) => self.fail_task(&id, format!("{e:#}")),
            }
        }
    }

    /// Lays out the job directory (dataset, resume checkpoint, output) and starts `bitnode job-exec` on it.
    /// Lays out the job directory (dataset, resume checkpoint, the exec file) off the event loop and
    /// starts `bitnode job-exec` on it; [`Internal::Started`] reports the outcome.
    pub(super) fn spawn_task(&mut self, id: &str) -> anyhow::Result<()> {
        let t = self.work.tasks.get(id).context("the job vanished")?;
        let dir = t.dir.clone();
        let resolve = |h: &str| -> anyhow::Result<PathBuf> {
            self.work
                .store
                .resolve(h)?
                .with_context(|| format!("model {h} is not in this device's store"))
        };
        let mut spec = t.payload.spec.clone();
        let model = resolve(spec.model())?;
        let mut paths = JobPaths {
            model,
            adapter: None,
            data: None,
            out: None,
            resume: None,
            json_log: None,
        };
        let mut data = None;
        match &mut spec {
            JobSpec::Infer(r) => paths.adapter = r.adapter.as_deref().map(resolve).transpose()?,
            JobSpec::Score(r) => paths.adapter = r.adapter.as_deref().map(resolve).transpose()?,
            JobSpec::Finetune(f) => {
                paths.adapter = f.init_adapter.as_deref().map(resolve).transpose()?;
                // The child reads the dataset from a file; the exec file need not carry the bytes.
                data = Some((dir.join(&f.data_name), std::mem::take(&mut f.data)));
                paths.data = data.as_ref().map(|(p, _)| p.clone());
                paths.out = Some(dir.join("out"));
                if t.payload.resume.is_some() {
                    paths.resume = Some(dir.join("resume"));
                }
            }
        }
        let resume = t.payload.resume.clone();
        let home = self.home.clone();
        let tx = self.work.internal.clone();
        let task = id.to_string();
        // Inference runs on a warm engine; a fine-tune (or a score) in a process of its own, and a
        // fine-tune first takes the memory the warm engines hold.
        let host = match (&spec, &self.work.host) {
            (JobSpec::Infer(_), Some(h)) => Some(h.clone()),
            (JobSpec::Finetune(_), Some(h)) => {
                h.evict();
                None
            }
            _ => None,
        };
        tokio::spawn(async move {
            let d = dir.clone();
            let prepared = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                if let Some((p, bytes)) = &data {
                    std::fs::write(p, bytes).with_context(|| format!("writing {}", p.display()))?;
                }
                if let (Some(b), Some(r)) = (&resume, &paths.resume) {
                    write_bundle(r, b)?;
                }
                crate::exec::write_exec_file(&d, &ExecFile { spec, paths })
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r);
            let started = match (prepared, host) {
                (Ok(()), Some(h)) => Ok(h.run(&task, &dir)),
                (Ok(()), None) => start_child(&home, &dir, &task, tx.clone()),
                (Err(e), _) => Err(e),
            };
            let _ = tx.send(Internal::Started {
                task,
                res: started.map_err(|e| format!("{e:#}")),
            });
        });
        Ok(())
    }

    pub(super) fn on_started(&mut self, id: &str, res: Result<ChildKill, String>) {
        let Some(t) = self.work.tasks.get_mut(id) else {
            // Ended meanwhile: a process that did start is killed at once.
            if let Ok(k) = res {
                k.kill();
            }
            return;
        };
        if !matches!(t.state, TaskState::Starting) {
            if let Ok(k) = res {
                k.kill();
            }
            return;
        }
        match res {
            Ok(kill) => {
                // Cancelled while it started: the exit then ends it as cancelled.
                if t.cancelled.is_some() {
                    kill.kill();
                }
                t.state = TaskState::Running { kill };
            }
            Err(e) => {
                self.work.running.remove(id);
                self.fail_task(id, format!("starting the job: {e}"));
                self.start_next();
            }
        }
    }

    pub(super) fn on_child_line(&mut self, id: &str, line: ExecLine) {
        match line {
            ExecLine::Token { id: tok, text } => self.deliver(id, Update::Tokens { ids: vec![tok], text }),
            ExecLine::Step {
                step,
                total,
                loss,
                lr,
                tokens_per_second,
                ..
            } => {
                // A small model steps hundreds of times a second: a few updates a second are enough to watch.
                let Some(t) = self.work.tasks.get_mut(id) else { return };
                let now = Instant::now();
                if step < total && t.last_progress.is_some_and(|p| now - p < PROGRESS_EVERY) {
                    return;
                }
                t.last_progress = Some(now);
                self.deliver(
                    id,
                    Update::Progress {
                        step: step as u64,
                        total: total as u64,
                        loss,
                        lr,
                        tokens_per_second,
                    },
                );
            }
            ExecLine::Checkpoint { step, dir } => {
                if let Some(t) = self.work.tasks.get_mut(id) {
                    t.last_checkpoint = Some((step, dir.clone()));
                    t.checkpoint_unsent = false;
                }
                self.read_checkpoint_for(id, step, dir);
            }
            ExecLine::Result { result } => {
                if let Some(t) = self.work.tasks.get_mut(id) {
                    t.result = Some(result);
                }
            }
            ExecLine::Error { reason } => {
                if let Some(t) = self.work.tasks.get_mut(id) {
                    t.error = Some(reason);
                }
            }
            // The engine host's end of a job; its owner reports it as the job's exit.
            ExecLine::End => {}
        }
    }

    /// Reads a checkpoint the job wrote, off the event loop (the child has finished writing it:
    /// trainer_state.json comes last), to stream it back.
    pub(super) fn read_checkpoint_for(&self, id: &str, step: usize, dir: String) {
        let max = self.cfg.jobs.max_checkpoint_bytes;
        let tx = self.work.internal.clone();
        let task = id.to_string();
        tokio::task::spawn_blocking(move || {
            let res = read_bundle(Path::new(&dir), true, max).map_err(|e| format!("{e:#}"));
            let _ = tx.send(Internal::CheckpointRead { task, step, res });
        });
    }

    /// A submitter is back: the results held for it go now rather than at the next backed-off retry.
    pub(super) fn resend_results_to(&mut self, peer: PeerId) {
        let now = Instant::now();
        for t in self.work.tasks.values_mut() {
            if t.submitter == Some(peer) {
                if let TaskState::Done { due: Some(d), .. } = &mut t.state {
                    *d = now;
                }
            }
        }
    }

    /// Results held for absent submitters stay within `[jobs] max_retained_bytes`: the oldest go first.
    pub(super) fn cap_retained(&mut self) {
        let cap = self.cfg.jobs.max_retained_bytes;
        loop {
            let mut held: Vec<(Instant, u64, String)> = self
                .work
                .tasks
                .iter()
                .filter_map(|(id, t)| match &t.state {
                    TaskState::Done { until, bytes, .. } => Some((*until, *bytes, id.clone())),
                    _ => None,
                })
                .collect();
            let total: u64 = held.iter().map(|h| h.1).sum();
            if total <= cap || held.len() <= 1 {
                return;
            }
            held.sort();
            let (_, bytes, id) = held.remove(0);
            tracing::warn!(job = %id, bytes, "dropping a result held for an absent submitter ([jobs] max_retained_bytes)");
            self.work.tasks.remove(&id);
        }
    }

    pub(super) fn on_child_exit(&mut self, id: &str, ok: bool, stderr_tail: String) {
        self.work.running.remove(id);
        let Some(t) = self.work.tasks.get_mut(id) else {
            self.start_next();
            return;
        };
        // Already ended (failed or cancelled before the process was reaped).
        if !matches!(t.state, TaskState::Running { .. }) {
            self.start_next();
            return;
        }
        let outcome = if let Some(why) = t.cancelled.clone() {
            Outcome::Cancelled { reason: why }
        } else if ok && t.result.is_some() {
            let result = t.result.take().unwrap_or_default();
            if !matches!(t.payload.spec, JobSpec::Finetune(_)) {
                Outcome::Succeeded {
                    result_json: result.to_string(),
                    files: Bundle::default(),
                }
            } else {
                // The adapter can be hundreds of MiB: read and cached off the event loop.
                t.state = TaskState::Finishing;
                let out = t.dir.join("out");
                let max = self.cfg.jobs.max_checkpoint_bytes;
                let store = self.work.store.clone();
                let tx = self.work.internal.clone();
                let task = id.to_string();
                tokio::task::spawn_blocking(move || {
                    let res = read_bundle(&out, false, max).map_err(|e| format!("{e:#}"));
                    if let Ok(files) = &res {
                        // Cached here by content, so an inference with this adapter needs no transfer back.
                        let list: Vec<(String, Vec<u8>)> =
                            files.files.iter().map(|f| (f.path.clone(), f.bytes.clone())).collect();
                        if let Err(e) = store.import_files(&list) {
                            tracing::warn!(job = %task, "caching the adapter: {e:#}");
                        }
                    }
                    let _ = tx.send(Internal::AdapterRead { task, result, res });
                });
                self.start_next();
                return;
            }
        } else {
            // An error the job reported is the job's; a process that died without one (killed, out of
            // memory, a driver crash) is the device's.
            match t.error.clone() {
                Some(reason) => Outcome::Failed {
                    reason,
                    device_fault: false,
                },
                None => Outcome::Failed {
                    reason: format!(
                        "the job process died: {}",
                        stderr_tail.lines().last().unwrap_or("no output")
                    ),
                    device_fault: true,
                },
            }
        };
        self.end_task(id, outcome);
    }

    /// Records how a job run here ended and tells its submitter (retried until acknowledged).
    pub(super) fn end_task(&mut self, id: &str, outcome: Outcome) {
        let Some(t) = self.work.tasks.get(id) else { return };
        let dir = t.dir.clone();
        let remote = t.submitter.is_some();
        let (state, reason) = match &outcome {
            Outcome::Succeeded { .. } => (State::Succeeded, None),
            Outcome::Failed { reason, .. } => (State::Failed, Some(reason.clone())),
            Outcome::Cancelled { reason } => (State::Cancelled, Some(reason.clone())),
        };
        if remote {
            let result = match &outcome {
                Outcome::Succeeded { result_json, .. } => serde_json::from_str(result_json).ok(),
                _ => None,
            };
            self.update_job(id, |j| {
                j.state = state;
                j.reason = reason.clone();
                j.result = result;
            });
        }
        tracing::info!(job = %id, state = ?state, reason = reason.as_deref().unwrap_or(""), "job run here ended");
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir));
        self.work.running.remove(id);
        self.work.order.retain(|o| o != id);
        let update = Update::Done(outcome);
        if remote {
            if let Some(t) = self.work.tasks.get_mut(id) {
                let bytes = match &update {
                    Update::Done(Outcome::Succeeded { files, .. }) => {
                        files.files.iter().map(|f| f.bytes.len() as u64).sum()
                    }
                    _ => 0,
                };
                t.state = TaskState::Done {
                    update: update.clone(),
                    tries: 1,
                    due: None,
                    until: Instant::now() + Duration::from_secs(self.cfg.jobs.retention_secs),
                    bytes,
                };
            }
            self.send_update(id, update);
            self.cap_retained();
        } else {
            self.work.tasks.remove(id);
            self.deliver_local(id, update);
        }
        self.refresh_job_caps();
        self.start_next();
    }

    /// The device could not run the job (model transfer, job directory, process start): a device fault,
    /// which sends the job on to the next device.
    pub(super) fn fail_task(&mut self, id: &str, reason: String) {
        tracing::warn!(job = %id, "job failed here: {reason}");
        if let Some(TaskState::Running { kill }) = self.work.tasks.get(id).map(|t| &t.state) {
            kill.kill();
        }
        self.end_task(
            id,
            Outcome::Failed {
                reason,
                device_fault: true,
            },
        );
    }

    pub(super) fn cancel_task(&mut self, id: &str, why: &str) {
        let Some(t) = self.work.tasks.get_mut(id) else { return };
        t.cancelled = Some(why.to_string());
        match &t.state {
            TaskState::Running { kill } => {
                // The exit is reported by the child's owner and ends the task as cancelled.
                kill.kill();
            }
            TaskState::Done { .. } => {}
            _ => self.end_task(id, Outcome::Cancelled { reason: why.into() }),
        }
    }

    /// Routes an update of a job run here: to the submitter half of this node for a local submission,
    /// else signed to the submitting peer.
    pub(super) fn deliver(&mut self, id: &str, update: Update) {
        match self.work.tasks.get(id).map(|t| t.submitter) {
            Some(Some(_)) => self.send_update(id, update),
            Some(None) => self.deliver_local(id, update),
            None => {}
        }
    }

    pub(super) fn deliver_local(&mut self, id: &str, update: Update) {
        let Some(job_id) = parse_job_id(id) else { return };
        let me = self.me;
        if let UpdateAck::Stop { .. } = self.on_sub_update(me, job_id, update) {
            self.cancel_task(id, "the submitter stopped waiting");
        }
    }

    pub(super) fn send_update(&mut self, id: &str, update: Update) {
        let Some(t) = self.work.tasks.get(id) else { return };
        let Some(sub) = t.submitter else { return };
        let Some(k) = peer_key(&sub) else { return };
        let kind = if matches!(update, Update::Done(_)) {
            Kind::Result
        } else {
            Kind::Update
        };
        let sent = match &update {
            Update::Done(_) => Sent::Result,
            Update::Checkpoint { .. } => Sent::Checkpoint,
            _ => Sent::Other,
        };
        let bytes = match wire::encode(&update, self.update_message_max()) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(job = %id, "an update does not fit a message: {e}");
                if kind == Kind::Result {
                    let u = Update::Done(Outcome::Failed {
                        device_fault: false,
                        reason: format!("the result does not fit a message ({e}); raise [jobs] max_checkpoint_bytes"),
                    });
                    if let Ok(b) = wire::encode(&u, self.update_message_max()) {
                        let env = self.seal(kind, t.job_id, k, b);
                        self.send_update_env(id, sub, env, Sent::Result);
                    }
                }
                return;
            }
        };
        let env = self.seal(kind, t.job_id, k, bytes);
        self.send_update_env(id, sub, env, sent);
    }

    fn send_update_env(&self, id: &str, sub: PeerId, env: Envelope, sent: Sent) {
        let task = id.to_string();
        self.net.request(
            |reply| NetCommand::SendUpdate { peer: sub, env, reply },
            &self.work.internal,
            move |answer| Internal::UpdateAnswered { task, sent, answer },
        );
    }

    /// A checkpoint whose delivery failed while the submitter was away: read again and resent (only the
    /// newest; the job may have written newer ones since, which supersede it).
    pub(super) fn resend_unsent_checkpoint(&mut self, id: &str) {
        let Some(t) = self.work.tasks.get_mut(id) else { return };
        if !t.checkpoint_unsent || !matches!(t.state, TaskState::Running { .. }) {
            return;
        }
        t.checkpoint_unsent = false;
        if let Some((step, dir)) = t.last_checkpoint.clone() {
            tracing::info!(job = %id, step, "sending the submitter the checkpoint it missed");
            self.read_checkpoint_for(id, step, dir);
        }
    }

    /// A worker sends an update or the result of a job submitted here.
    pub(super) fn on_update_asked(
        &mut self,
        peer: PeerId,
        req: Inbound<Envelope>,
        ch: rr::ResponseChannel<Inbound<UpdateAck>>,
    ) {
        let ack = match req {
            Ok(env) => {
                let kind = env.header.kind;
                let max = self.update_message_max();
                match kind {
                    Kind::Update | Kind::Result => match self.open_envelope(&peer, &env, kind, max) {
                        Ok(p) => match wire::decode::<Update>(p, max) {
                            Ok(u) if (kind == Kind::Result) == matches!(u, Update::Done(_)) => {
                                self.on_sub_update(peer, env.header.job_id, u)
                            }
                            Ok(_) => UpdateAck::Rejected {
                                reason: "a result must come in a Result envelope, and only a result".into(),
                            },
                            Err(e) => UpdateAck::Rejected {
                                reason: format!("malformed update: {e}"),
                            },
                        },
                        Err(e) => UpdateAck::Rejected { reason: e },
                    },
                    other => UpdateAck::Rejected {
                        reason: format!("a {other:?} envelope is not an update"),
                    },
                }
            }
            Err(why) => UpdateAck::Rejected { reason: why },
        };
        if let UpdateAck::Rejected { reason } = &ack {
            tracing::warn!(%peer, "update refused: {reason}");
        }
        self.net.send(NetCommand::AnswerUpdate(ch, ack));
    }

    /// The submitter's answer to an update (or the result) of task `id`.
    pub(super) fn on_update_answered(&mut self, id: String, sent: Sent, answer: Option<Answer<UpdateAck>>) {
        let response = match answer {
            Some(Ok(r)) => r,
            Some(Err(error)) => {
                tracing::debug!(job = %id, "update not delivered: {error}");
                match (sent, self.work.tasks.get_mut(&id)) {
                    (Sent::Result, Some(t)) => {
                        if let TaskState::Done { due, tries, .. } = &mut t.state {
                            // Every 2 s at first, backing off to every 30 s while the submitter is away.
                            *due = Some(Instant::now() + Duration::from_secs(2 * u64::from((*tries).min(15))));
                        }
                    }
                    (Sent::Checkpoint, Some(t)) => t.checkpoint_unsent = true,
                    _ => {}
                }
                return;
            }
            None => return,
        };
        let is_result = sent == Sent::Result;
        // The submitter answers again: a checkpoint it missed while away goes to it now.
        if matches!(response, Ok(UpdateAck::Ok)) {
            self.resend_unsent_checkpoint(&id);
        }
        let done = self
            .work
            .tasks
            .get(&id)
            .is_some_and(|t| matches!(t.state, TaskState::Done { .. }));
        match response {
            // Only the result's own acknowledgement ends the delivery (a heartbeat's does not).
            Ok(UpdateAck::Ok) if done && is_result => {
                self.work.tasks.remove(&id);
            }
            Ok(UpdateAck::Stop { reason }) => {
                tracing::info!(job = %id, "the submitter no longer wants this job: {reason}");
                if done {
                    self.work.tasks.remove(&id);
                } else {
                    self.cancel_task(&id, &format!("stopped by the submitter: {reason}"));
                }
            }
            Ok(UpdateAck::Rejected { reason }) => {
                tracing::warn!(job = %id, "the submitter refused an update: {reason}");
                // A refused result would be refused again: stop resending it.
                if done && is_result {
                    self.work.tasks.remove(&id);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inferences_batch_up_to_max_batch_and_the_rest_runs_alone() {
        use Slot::{Alone, Batched};
        // An idle device takes anything.
        assert!(may_start(Batched, &[], 16));
        assert!(may_start(Alone, &[], 16));
        // Inferences join the running ones up to max_batch.
        assert!(may_start(Batched, &[Batched; 15], 16));
        assert!(!may_start(Batched, &[Batched; 16], 16));
        // 0 counts as 1: one at a time.
        assert!(may_start(Batched, &[], 0));
        assert!(!may_start(Batched, &[Batched], 0));
        // A fine-tune or score waits for the inferences to end, and nothing starts beside it.
        assert!(!may_start(Alone, &[Batched], 16));
        assert!(!may_start(Batched, &[Alone], 16));
        assert!(!may_start(Alone, &[Alone], 16));
        // In arrival order: a waiting fine-tune holds up the inferences behind it.
        let started = |queue: &[Slot], running: &[Slot], max: usize| {
            let mut r = running.to_vec();
            queue
                .iter()
                .take_while(|q| {
                    may_start(**q, &r, max) && {
                        r.push(**q);
                        true
                    }
                })
                .count()
        };
        assert_eq!(started(&[Batched, Batched, Alone, Batched], &[], 16), 2);
        assert_eq!(started(&[Batched; 5], &[Batched; 13], 16), 3);
        assert_eq!(started(&[Alone, Batched], &[], 16), 1);
    }
}
