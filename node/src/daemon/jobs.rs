//! Mesh II: jobs submitted from any node, run on the strongest device that fits, streamed back, and moved
//! to the next device when a worker goes away. This file holds what both roles share: the messages from
//! the daemon's helper tasks ([`Internal`]), this node's job state ([`Work`]), the per-tick checks
//! (heartbeats, timeouts, resends), the job envelopes' entry point, and bundle I/O helpers.
//!
//! Two roles live in every daemon:
//! - **submitter** (`submitter.rs`): a job from `bitnode submit` on this node. The scheduler ranks this node
//!   and the connected paired peers; the job travels to the winner in an envelope signed with this node's
//!   key; the worker's heartbeats, tokens, progress, checkpoints and result come back in envelopes signed
//!   with its key. A worker that disconnects or falls silent for `[jobs] heartbeat_timeout_secs` loses the
//!   job to the next best device (a fine-tune resumes from the last checkpoint it streamed back; inference
//!   restarts). A submitted job's phase is one enum (`failover::Phase`), moved only by the failover rules
//!   there; jobs submitted before a restart are taken up by `resume.rs`.
//! - **worker** (`worker.rs`): a job this node runs, for a peer or for itself. Missing models are pulled
//!   from the submitter by content hash, chunk by verified chunk (`fetch.rs`); jobs start in arrival order.
//!   Inferences run together, up to `[serve] max_batch`, on the warm engines of the engine host
//!   (`engine_host.rs`), which batches them; a fine-tune or a score runs alone, in a child process
//!   (`bitnode job-exec`, `child.rs`). Either is a process of its own, so a crash in a GPU driver cannot
//!   take the daemon (and the mesh) down with it.
//!
//! A job that runs here for a local submission takes the same path without envelopes: its updates go
//! straight to the submitter half. Every change of a job's state is handed to the store thread at once.
//!
//! All of it is the job manager, an actor of its own ([`JobManager`]): it reaches peers only through its
//! [`NetHandle`], reads the mesh from the network actor's [`MeshView`], and takes everything else (what
//! peers ask, answers to its requests, its helper tasks' results, control requests) from its mailbox.
use super::*;
#[allow(unused_imports)]
use super::{child::*, fetch::*, submitter::*, worker::*};

/// Validity of the envelopes this node seals (the receiver allows 60 s of clock skew on top).
pub(super) const ENVELOPE_TTL: u64 = 600;

/// The job manager's mailbox: what the network actor hands it, and what its own helper tasks report.
pub(super) enum Internal {
    /// A peer asks this node to run a job.
    JobAsked {
        peer: PeerId,
        req: Inbound<Envelope>,
        ch: rr::ResponseChannel<Inbound<JobAck>>,
    },
    /// A worker sends an update or the result of a job submitted here.
    UpdateAsked {
        peer: PeerId,
        req: Inbound<Envelope>,
        ch: rr::ResponseChannel<Inbound<UpdateAck>>,
    },
    /// The device running one of our jobs asks for a model.
    ModelAsked {
        peer: PeerId,
        req: Inbound<ModelRequest>,
        ch: rr::ResponseChannel<Inbound<ModelResponse>>,
    },
    /// The answer to a job sent to `worker` (None: the network actor went away).
    JobAnswered {
        job: String,
        worker: PeerId,
        answer: Option<Answer<JobAck>>,
    },
    /// The answer to an update sent for task `task`.
    UpdateAnswered {
        task: String,
        sent: Sent,
        answer: Option<Answer<UpdateAck>>,
    },
    /// The answer to a model request of task `task`.
    ModelAnswered {
        task: String,
        req: ModelRequest,
        answer: Option<Answer<ModelResponse>>,
    },
    /// A paired peer connected: results held for it go now.
    PeerUp(PeerId),
    /// A line from a job's child process.
    Child {
        task: String,
        line: ExecLine,
    },
    /// A checkpoint the job wrote, read into a bundle to stream back.
    CheckpointRead {
        task: String,
        step: usize,
        res: Result<Bundle, String>,
    },
    /// Tokens from a job's child process, batched.
    Tokens {
        task: String,
        ids: Vec<u32>,
        text: String,
    },
    ChildExit {
        task: String,
        ok: bool,
        stderr_tail: String,
    },
    /// The engine host's warm engines hold this many bytes now (0: it exited).
    WarmBytes(u64),
    /// A finished fine-tune's adapter, read from its job directory and cached in the store.
    AdapterRead {
        task: String,
        result: serde_json::Value,
        res: Result<Bundle, String>,
    },
    /// A job's process started (or could not be).
    Started {
        task: String,
        res: Result<ChildKill, String>,
    },
    /// A submission's inputs were read (or could not be).
    SubmitLoaded(Box<PendingSubmit>),
    /// A submitted fine-tune's adapter, written to its `--out`.
    OutWritten {
        job: String,
        result: serde_json::Value,
        res: Result<(), String>,
    },
    /// A model download was begun (existing partial chunks verified) or finished (hash checked).
    Began {
        task: String,
        res: Result<Download, String>,
    },
    Fetched {
        task: String,
        res: Result<PathBuf, String>,
    },
    /// The store's models, listed again after `bitnode model add` or `remove`.
    ModelsListed(Vec<String>),
    /// An engine the host now holds (an inference succeeded there), with its size read off the event
    /// loop; `epoch` is the warm set's when the read began.
    Warmed {
        key: WarmEngine,
        bytes: u64,
        epoch: u64,
    },
}

/// Where a submitted job may run.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Target {
    Auto,
    Local,
    Peer(PeerId),
}

/// "auto", "local" or the peer id: how a submission record stores it.
impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Auto => f.write_str("auto"),
            Target::Local => f.write_str("local"),
            Target::Peer(p) => write!(f, "{p}"),
        }
    }
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Target, String> {
        match s {
            "auto" => Ok(Target::Auto),
            "local" => Ok(Target::Local),
            p => p
                .parse()
                .map(Target::Peer)
                .map_err(|_| format!("{p:?} is not a target")),
        }
    }
}

/// A checkpoint directory (adapter, optimizer moments, `trainer_state.json`) with its step.
pub(super) fn read_checkpoint(dir: &Path, max: u64) -> Result<(u64, Bundle), String> {
    #[derive(serde::Deserialize)]
    struct TrainerState {
        step: u64,
    }
    let step = std::fs::read(dir.join("trainer_state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<TrainerState>(&b).ok())
        .map(|t| t.step)
        .ok_or_else(|| {
            format!(
                "{} is not a checkpoint (no trainer_state.json with a step)",
                dir.display()
            )
        })?;
    let b = read_bundle(dir, true, max).map_err(|e| format!("{e:#}"))?;
    Ok((step, b))
}

pub(super) struct Work {
    pub(super) table: crate::jobs::JobTable,
    pub(super) store: Store,
    pub(super) signing: SigningKey,
    pub(super) my_key: [u8; 32],
    pub(super) nonces: NonceCache,
    pub(super) subs: HashMap<String, Sub>,
    pub(super) tasks: HashMap<String, Task>,
    pub(super) order: VecDeque<String>,
    /// The jobs running (or starting) here: one that runs alone, or inferences on the warm engines, which
    /// batch them (see [`may_start`]).
    pub(super) running: HashSet<String>,
    pub(super) internal: mpsc::UnboundedSender<Internal>,
    pub(super) last_heartbeat: Instant,
    /// Where inference runs on warm engines (`[serve] warm_engines`); None: a process per job.
    pub(super) host: Option<EngineHost>,
    /// Bytes the warm engines hold, as the engine host last reported: taken off the advertised memory.
    pub(super) warm_bytes: u64,
    /// The engines the host holds, as far as the job manager can tell (None without a host).
    pub(super) warm: Option<super::warm::WarmSet>,
}

impl Work {
    pub(super) fn new(
        home: &Path,
        key: &libp2p::identity::Keypair,
        internal: mpsc::UnboundedSender<Internal>,
    ) -> anyhow::Result<Work> {
        let kp = key
            .clone()
            .try_into_ed25519()
            .map_err(|_| anyhow::anyhow!("the identity is not an ed25519 key; job envelopes need one"))?;
        let bytes = kp.to_bytes();
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&bytes[..32]);
        let signing = SigningKey::from_bytes(&secret);
        // Jobs run here do not survive a restart (their process died with the daemon; their submitters
        // place them again): their directories are debris. Jobs submitted here do, where their record is
        // on disk: [`Daemon::resume_submissions`] takes them up again.
        let _ = std::fs::remove_dir_all(home.join("work"));
        let me = key.public().to_peer_id().to_base58();
        let resumable = |j: &Job| j.submitter == me && crate::jobs::Submission::path(home, &j.id).is_file();
        Ok(Work {
            table: crate::jobs::JobTable::load(home, now_unix(), resumable)?,
            store: Store::new(home),
            my_key: signing.verifying_key().to_bytes(),
            signing,
            nonces: NonceCache::new(1 << 20),
            subs: HashMap::new(),
            tasks: HashMap::new(),
            order: VecDeque::new(),
            running: HashSet::new(),
            internal,
            last_heartbeat: Instant::now(),
            host: None,
            warm_bytes: 0,
            warm: None,
        })
    }

    /// Peers a live job is exchanged with: the workers of jobs submitted here, the submitters of jobs
    /// running here.
    pub(super) fn job_peers(&self) -> HashSet<PeerId> {
        let workers = self.subs.values().filter_map(|s| s.phase.live_worker());
        let submitters = self.tasks.values().filter_map(|t| t.submitter);
        workers.chain(submitters).collect()
    }

    /// A job runs (or starts) here.
    pub(super) fn busy(&self) -> bool {
        !self.running.is_empty()
    }

    /// How task `id` runs: batched on the warm engines (an inference, with an engine host), or alone.
    pub(super) fn slot(&self, id: &str) -> Slot {
        match self.tasks.get(id).map(|t| &t.payload.spec) {
            Some(JobSpec::Infer(_)) if self.host.is_some() => Slot::Batched,
            _ => Slot::Alone,
        }
    }

    /// Jobs queued, fetching or running here (what the capability advert calls the queue).
    pub(super) fn queue_len(&self) -> u32 {
        self.tasks
            .values()
            .filter(|t| !matches!(t.state, TaskState::Done { .. }))
            .count() as u32
    }

    /// Jobs here that have not started: fetching their inputs or queued. `[jobs] max_queue` bounds these;
    /// the running ones are bounded by `[serve] max_batch` (inferences) or run alone (fine-tunes).
    pub(super) fn waiting_len(&self) -> usize {
        self.tasks
            .values()
            .filter(|t| matches!(t.state, TaskState::Fetching { .. } | TaskState::Queued))
            .count()
    }

    pub(super) fn models(&self) -> Vec<String> {
        let mut m = self.store.list();
        m.truncate(MAX_ADVERTISED_MODELS);
        m
    }

    /// The engines the host holds, most recently used first.
    pub(super) fn warm_engines(&self) -> Vec<WarmEngine> {
        self.warm
            .as_ref()
            .map(|w| w.list(MAX_ADVERTISED_WARM))
            .unwrap_or_default()
    }

    /// Whether the host holds the engine an inference job needs.
    pub(super) fn is_warm(&self, spec: &JobSpec) -> bool {
        match (spec, &self.warm) {
            (JobSpec::Infer(r), Some(w)) => w.contains(&WarmEngine {
                model: r.model.clone(),
                adapter: r.adapter.clone(),
            }),
            _ => false,
        }
    }
}

pub(super) fn parse_job_id(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The ed25519 public key inside an ed25519 peer id (libp2p inlines such keys in the id).
pub(super) fn peer_key(p: &PeerId) -> Option<[u8; 32]> {
    let pk = libp2p::identity::PublicKey::try_decode_protobuf(p.as_ref().digest()).ok()?;
    Some(pk.try_into_ed25519().ok()?.to_bytes())
}

pub(super) fn key_peer(k: &[u8; 32]) -> Option<PeerId> {
    let pk = libp2p::identity::ed25519::PublicKey::try_from_bytes(k).ok()?;
    Some(PeerId::from_public_key(&libp2p::identity::PublicKey::from(pk)))
}

/// Reads a directory's regular files, and those one level down, into a bundle (a checkpoint holds the
/// adapter plus `exp_avg/` and `exp_avg_sq/`).
pub(super) fn read_bundle(dir: &Path, recurse: bool, max: u64) -> anyhow::Result<Bundle> {
    let mut files = vec![];
    let mut total = 0u64;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let ft = e.file_type()?;
        if ft.is_file() && bitnode_protocol::job::plain_name(&name) {
            // Sized before it is read: an oversized checkpoint is refused without loading it.
            total = total.saturating_add(e.metadata()?.len());
            if total > max {
                bail!(
                    "{} holds more than {max} bytes ([jobs] max_checkpoint_bytes)",
                    dir.display()
                );
            }
            let bytes = std::fs::read(e.path())?;
            files.push(BundleFile { path: name, bytes });
        } else if ft.is_dir() && recurse && bitnode_protocol::job::plain_name(&name) {
            for f in read_bundle(&e.path(), false, max.saturating_sub(total))?.files {
                total = total.saturating_add(f.bytes.len() as u64);
                files.push(BundleFile {
                    path: format!("{name}/{}", f.path),
                    bytes: f.bytes,
                });
            }
        }
        if total > max {
            bail!(
                "{} holds more than {max} bytes ([jobs] max_checkpoint_bytes)",
                dir.display()
            );
        }
    }
    Ok(Bundle { files })
}

/// Writes a checked bundle under `dir` (each file to a temporary name, then renamed).
pub(super) fn write_bundle(dir: &Path, b: &Bundle) -> anyhow::Result<()> {
    b.check().map_err(|e| anyhow::anyhow!(e))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for f in &b.files {
        let p = dir.join(&f.path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = p.with_extension("bitnode-tmp");
        std::fs::write(&tmp, &f.bytes).with_context(|| format!("writing {}", p.display()))?;
        std::fs::rename(&tmp, &p)?;
    }
    Ok(())
}

/// The job manager actor: the only owner of this node's jobs.
pub(super) struct JobManager {
    pub(super) work: Work,
    pub(super) net: NetHandle,
    pub(super) mesh: watch::Receiver<MeshView>,
    pub(super) cfg: Config,
    pub(super) home: PathBuf,
    pub(super) me: PeerId,
    pub(super) name: String,
    pub(super) store: crate::store::StateWriter,
    /// The paired peers (the gate's set): envelopes and model requests are checked against it.
    pub(super) admission: SharedAdmission,
    /// The load last reported to the network actor.
    pub(super) reported: Option<JobLoad>,
    /// The store's models, as last listed (a directory read, so only when one may have arrived).
    pub(super) models: Vec<String>,
}

impl JobManager {
    /// Runs until `stop` fires (the network actor ended) or every sender is gone.
    pub(super) async fn run(
        mut self,
        mut ctl: mpsc::Receiver<Ctl>,
        mut inbox: mpsc::UnboundedReceiver<Internal>,
        mut stop: oneshot::Receiver<()>,
    ) {
        self.refresh_job_caps();
        self.resume_submissions();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                Some(c) = ctl.recv() => self.on_control(c),
                Some(i) = inbox.recv() => self.on_internal(i),
                _ = tick.tick() => self.jobs_tick(),
                _ = &mut stop => break,
                else => break,
            }
            self.report_load();
        }
    }

    /// The local API's job requests (the control server routes them here).
    fn on_control(&mut self, c: Ctl) {
        let Ctl { req, reply, events } = c;
        let resp = match req {
            Request::Submit {
                spec,
                data_path,
                need,
                to,
                out,
                resume,
                detach,
                cancel_on_disconnect,
            } => {
                self.submit(
                    spec,
                    data_path,
                    need,
                    &to,
                    out,
                    resume,
                    detach,
                    cancel_on_disconnect,
                    reply,
                    Some(events),
                );
                return;
            }
            Request::Jobs => Response::ok(&self.jobs_list()),
            Request::JobShow { id } => match self.work.table.find(&id) {
                Ok(j) => {
                    let id = j.id.clone();
                    Response::ok(&self.job_view(&id))
                }
                Err(e) => Response::err(format!("{e:#}")),
            },
            Request::JobCancel { id } => self.cancel_job(&id),
            Request::ModelsChanged => {
                // Listed off the event loop; the advert follows when the list is in.
                let store = self.work.store.clone();
                let tx = self.work.internal.clone();
                tokio::task::spawn_blocking(move || {
                    let mut m = store.list();
                    m.truncate(MAX_ADVERTISED_MODELS);
                    let _ = tx.send(Internal::ModelsListed(m));
                });
                Response::ok(&"ok")
            }
            Request::JobFollow { id } => {
                // Answered now for a job that ended, else when it ends.
                self.follow_job(&id, events, reply);
                return;
            }
            _ => Response::err("not a job request"),
        };
        let _ = reply.send(resp);
    }

    pub(super) fn is_trusted(&self, peer: &PeerId) -> bool {
        lock(&self.admission).trusted.contains(peer)
    }

    pub(super) fn connected(&self, peer: &PeerId) -> bool {
        self.mesh.borrow().connected(peer)
    }
}

impl JobManager {
    pub(super) fn peer_name(&self, p: &PeerId) -> String {
        if *p == self.me {
            return self.name.clone();
        }
        self.mesh
            .borrow()
            .names
            .get(p)
            .cloned()
            .unwrap_or_else(|| crate::trust::default_name(p))
    }

    /// Lists the store's models again (after a model arrived) and reports the load.
    pub(super) fn refresh_job_caps(&mut self) {
        self.models = self.work.models();
        self.report_load();
    }

    /// An inference's end on the engine host, for the warm set: one that produced a result (or was
    /// cancelled, which keeps the engine) left its engine loaded; a host that died (the only way its jobs
    /// exit not ok) lost them all. The entry's size (the host's measure: the files of the model and
    /// adapter directories) is read off the event loop.
    fn note_warm(&mut self, task: &str, ok: bool) {
        let Some(t) = self.work.tasks.get(task) else { return };
        let (JobSpec::Infer(r), Some(w)) = (&t.payload.spec, self.work.warm.as_mut()) else {
            return;
        };
        if !matches!(t.state, TaskState::Running { .. }) {
            return;
        }
        if !ok {
            w.clear();
            return;
        }
        if t.result.is_none() && t.cancelled.is_none() {
            // It failed (a model that does not load, say): nothing is known to be loaded.
            return;
        }
        let key = WarmEngine {
            model: r.model.clone(),
            adapter: r.adapter.clone(),
        };
        let epoch = w.epoch();
        let store = self.work.store.clone();
        let tx = self.work.internal.clone();
        tokio::task::spawn_blocking(move || {
            let size = |h: &str| -> u64 {
                let Ok(Some(d)) = store.resolve(h) else { return 0 };
                std::fs::read_dir(d)
                    .map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
                    .unwrap_or(0)
            };
            let bytes = size(&key.model) + key.adapter.as_deref().map(size).unwrap_or(0);
            let _ = tx.send(Internal::Warmed { key, bytes, epoch });
        });
    }

    /// Reports the load to the network actor (for the capability advert, and its own decisions) when it
    /// changed; called after every message the job manager handles, so it never lags a job's state.
    pub(super) fn report_load(&mut self) {
        let load = JobLoad {
            queue_len: self.work.queue_len(),
            models: vec![],
            warm: self.work.warm_engines(),
            busy: self.work.busy(),
            job_peers: self.work.job_peers(),
            warm_bytes: self.work.warm_bytes,
        };
        let same = self.reported.as_ref().is_some_and(|r| {
            r.queue_len == load.queue_len
                && r.busy == load.busy
                && r.warm_bytes == load.warm_bytes
                && r.job_peers == load.job_peers
                && r.warm == load.warm
                && r.models == self.models
        });
        if !same {
            let load = JobLoad {
                models: self.models.clone(),
                ..load
            };
            self.reported = Some(load.clone());
            self.net.send(NetCommand::Load(load));
        }
    }

    pub(super) fn update_job(&mut self, id: &str, f: impl FnOnce(&mut Job)) {
        if let Err(e) = self.work.table.update(id, now_unix(), f) {
            tracing::error!(job = %id, "updating the job table: {e:#}");
        }
        self.persist_jobs();
    }

    /// Hands the job table to the store actor (written off the event loop, coalesced).
    pub(super) fn persist_jobs(&self) {
        match self.work.table.to_bytes() {
            Ok(b) => self.store.save(crate::jobs::path(&self.home), b),
            Err(e) => tracing::error!("encoding the job table: {e:#}"),
        }
    }

    /// An envelope for job `job_id`, signed with this node's key for the peer whose key is `to`, valid
    /// for [`ENVELOPE_TTL`] from now, with a fresh nonce: the one way every job, cancel, update and
    /// result is sealed.
    pub(super) fn seal(&self, kind: Kind, job_id: [u8; 16], to: [u8; 32], payload: Vec<u8>) -> Envelope {
        Envelope::seal(
            &self.work.signing,
            kind,
            job_id,
            to,
            now_unix(),
            ENVELOPE_TTL,
            random::<16>(),
            payload,
        )
    }

    pub(super) fn job_message_max(&self) -> usize {
        self.cfg.jobs.max_job_message()
    }

    pub(super) fn update_message_max(&self) -> usize {
        self.cfg.jobs.max_update_message()
    }

    /// Heartbeat checks (submitter) and heartbeats, retries and resends (worker); every tick.
    pub(super) fn jobs_tick(&mut self) {
        let now = Instant::now();
        let timeout = Duration::from_secs(self.cfg.jobs.heartbeat_timeout_secs.max(1));
        let mut lost = vec![];
        for (id, sub) in self.work.subs.iter_mut() {
            let Some(w) = sub.phase.worker() else { continue };
            if w == self.me {
                continue;
            }
            let connected = self.mesh.borrow().connected(&w);
            if let Some(why) = failover::lost(&mut sub.phase, connected, now, timeout) {
                lost.push((id.clone(), w, why));
            }
        }
        for (id, w, why) in lost {
            if let Some(job_id) = self.work.subs.get(&id).map(|s| s.job_id) {
                // If it is merely slow, make sure it stops working on a job that has moved on.
                self.send_cancel(w, job_id);
            }
            self.attempt_failed(&id, w, why);
        }
        // Worker side.
        let beat =
            now.duration_since(self.work.last_heartbeat) >= Duration::from_secs(self.cfg.jobs.heartbeat_secs.max(1));
        if beat {
            self.work.last_heartbeat = now;
        }
        let ids: Vec<String> = self.work.tasks.keys().cloned().collect();
        for id in ids {
            let Some(t) = self.work.tasks.get_mut(&id) else {
                continue;
            };
            // Heartbeats go out in every state, the result's delivery included (a large adapter may take a
            // while to arrive, and silence would make the submitter move the job).
            if beat && t.submitter.is_some() {
                let running = matches!(
                    t.state,
                    TaskState::Starting | TaskState::Running { .. } | TaskState::Finishing
                );
                self.send_update(&id, Update::Heartbeat { running });
            }
            let Some(t) = self.work.tasks.get_mut(&id) else {
                continue;
            };
            match &mut t.state {
                // Resent only after a failed delivery (`due` is set then), never while one is in flight.
                TaskState::Done {
                    update,
                    tries,
                    due,
                    until,
                    ..
                } if due.is_some_and(|d| now >= d) => {
                    *tries += 1;
                    *due = None;
                    if now >= *until {
                        tracing::warn!(job = %id, "giving up delivering the result to the submitter ([jobs] retention_secs)");
                        self.work.tasks.remove(&id);
                        continue;
                    }
                    let u = update.clone();
                    self.send_update(&id, u);
                }
                TaskState::Fetching { failed, .. } if !failed.is_empty() => {
                    let retry = std::mem::take(failed);
                    for r in retry {
                        match r {
                            Retry::Manifest => self.fetch_next(&id),
                            Retry::Chunk(f, i) => self.request_chunk(&id, f, i),
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(w) = self.work.warm.as_mut() {
            // The host drops an engine unused for its idle timeout; the advert follows within a tick.
            w.expire(now);
        }
        // An API request whose client went away is cancelled within a tick.
        let ids: Vec<String> = self.work.subs.keys().cloned().collect();
        for id in ids {
            self.cancel_if_abandoned(&id);
        }
        // Streams of `submit` clients stay alive (and notice a dead daemon) by these.
        if beat {
            let ids: Vec<String> = self.work.subs.keys().cloned().collect();
            for id in ids {
                self.emit(&id, Event::Heartbeat {});
            }
        }
    }

    // ---- worker ----

    /// A peer asks this node to run a job.
    pub(super) fn on_job_asked(
        &mut self,
        peer: PeerId,
        req: Inbound<Envelope>,
        ch: rr::ResponseChannel<Inbound<JobAck>>,
    ) {
        let ack = match req {
            Ok(env) => self.job_request(peer, env),
            Err(why) => {
                tracing::warn!(%peer, "malformed job message refused: {why}");
                JobAck::Rejected { reason: why }
            }
        };
        if let JobAck::Rejected { reason } = &ack {
            tracing::warn!(%peer, "job refused: {reason}");
        }
        self.net.send(NetCommand::AnswerJob(ch, ack));
    }

    /// The worker's answer to the job sent to it.
    pub(super) fn on_job_answered(&mut self, id: String, worker: PeerId, answer: Option<Answer<JobAck>>) {
        match answer {
            Some(Ok(Ok(JobAck::Accepted { queue_position }))) => {
                // The job may have ended or moved while the answer was on its way.
                let Some(s) = self.work.subs.get_mut(&id) else { return };
                if !s.phase.accept(worker, Instant::now()) {
                    return;
                }
                self.update_job(&id, |j| j.state = State::Running);
                self.emit(
                    &id,
                    Event::Accepted {
                        worker: worker.to_base58(),
                        queue_position,
                    },
                );
            }
            Some(Ok(Ok(JobAck::Rejected { reason }))) => {
                self.attempt_failed(&id, worker, format!("refused the job: {reason}"))
            }
            Some(Ok(Err(why))) => self.attempt_failed(&id, worker, format!("sent a malformed answer: {why}")),
            Some(Err(error)) => self.attempt_failed(&id, worker, format!("could not be given the job: {error}")),
            None => {}
        }
    }

    pub(super) fn open_envelope<'a>(
        &mut self,
        peer: &PeerId,
        env: &'a Envelope,
        kind: Kind,
        max: usize,
    ) -> Result<&'a [u8], String> {
        if peer_key(peer) != Some(env.header.signer) {
            return Err("the envelope is signed by another device than the one that sent it".into());
        }
        let admission = &self.admission;
        let trusted = move |k: &[u8; 32]| key_peer(k).is_some_and(|p| lock(admission).trusted.contains(&p));
        env.open(&self.work.my_key, kind, now_unix(), max, trusted, &mut self.work.nonces)
            .map_err(|e| e.to_string())
    }

    pub(super) fn on_internal(&mut self, ev: Internal) {
        match ev {
            Internal::JobAsked { peer, req, ch } => self.on_job_asked(peer, req, ch),
            Internal::UpdateAsked { peer, req, ch } => self.on_update_asked(peer, req, ch),
            Internal::ModelAsked { peer, req, ch } => self.on_model_asked(peer, req, ch),
            Internal::JobAnswered { job, worker, answer } => self.on_job_answered(job, worker, answer),
            Internal::UpdateAnswered { task, sent, answer } => self.on_update_answered(task, sent, answer),
            Internal::ModelAnswered { task, req, answer } => self.on_model_answered(task, req, answer),
            Internal::PeerUp(peer) => self.resend_results_to(peer),
            Internal::Began { task, res } => match res {
                Ok(dl) => {
                    if let Some(t) = self.work.tasks.get_mut(&task) {
                        if let TaskState::Fetching { download, .. } = &mut t.state {
                            tracing::info!(job = %task, have = dl.done_bytes(), total = dl.total_bytes(), "model download");
                            *download = Some(dl);
                        }
                    }
                    self.pump_chunks(&task);
                }
                Err(e) => {
                    let busy = match self.work.tasks.get(&task).map(|t| &t.state) {
                        Some(TaskState::Fetching { missing, .. }) => missing
                            .first()
                            .is_some_and(|h| crate::transfer::in_progress(&self.work.store, h)),
                        _ => false,
                    };
                    if busy {
                        // Another job of this device is receiving the same model: wait for it.
                        if let Some(TaskState::Fetching { failed, .. }) =
                            self.work.tasks.get_mut(&task).map(|t| &mut t.state)
                        {
                            failed.push(Retry::Manifest);
                        }
                    } else {
                        self.fail_task(&task, format!("cannot receive the model: {e}"));
                    }
                }
            },
            Internal::Fetched { task, res } => match res {
                Ok(dir) => {
                    tracing::info!(job = %task, "model received into {}", dir.display());
                    if let Some(t) = self.work.tasks.get_mut(&task) {
                        if let TaskState::Fetching { missing, failures, .. } = &mut t.state {
                            if !missing.is_empty() {
                                missing.remove(0);
                            }
                            *failures = 0;
                        }
                    }
                    self.refresh_job_caps();
                    self.fetch_next(&task);
                }
                Err(e) => self.fail_task(&task, format!("the received model is not the one asked for: {e}")),
            },
            Internal::Child { task, line } => self.on_child_line(&task, line),
            Internal::CheckpointRead { task, step, res } => match res {
                // Only while the job runs: a checkpoint must never overtake its result.
                Ok(_)
                    if !self
                        .work
                        .tasks
                        .get(&task)
                        .is_some_and(|t| matches!(t.state, TaskState::Running { .. })) => {}
                Ok(bundle) => self.deliver(
                    &task,
                    Update::Checkpoint {
                        step: step as u64,
                        bundle,
                    },
                ),
                Err(e) => tracing::warn!(job = %task, "checkpoint not streamed back: {e}"),
            },
            Internal::Tokens { task, ids, text } => self.deliver(&task, Update::Tokens { ids, text }),
            Internal::ChildExit { task, ok, stderr_tail } => {
                self.note_warm(&task, ok);
                self.on_child_exit(&task, ok, stderr_tail)
            }
            Internal::ModelsListed(m) => self.models = m,
            Internal::Warmed { key, bytes, epoch } => {
                if let Some(w) = self.work.warm.as_mut() {
                    w.served(key, bytes, epoch, Instant::now());
                }
            }
            Internal::WarmBytes(b) => self.work.warm_bytes = b,
            Internal::AdapterRead { task, result, res } => {
                if !matches!(self.work.tasks.get(&task).map(|t| &t.state), Some(TaskState::Finishing)) {
                    return;
                }
                let outcome = match res {
                    Ok(files) => Outcome::Succeeded {
                        result_json: result.to_string(),
                        files,
                    },
                    Err(e) => Outcome::Failed {
                        reason: format!("reading the adapter: {e}"),
                        device_fault: true,
                    },
                };
                self.end_task(&task, outcome);
            }
            Internal::SubmitLoaded(p) => self.submit_loaded(*p),
            Internal::Started { task, res } => {
                // A fine-tune starting has made the host drop every engine (see `start_task`).
                let finetune = self
                    .work
                    .tasks
                    .get(&task)
                    .is_some_and(|t| matches!(t.payload.spec, JobSpec::Finetune(_)));
                if let (true, Some(w)) = (finetune, self.work.warm.as_mut()) {
                    w.clear();
                }
                self.on_started(&task, res)
            }
            // Unless the owner cancelled it meanwhile.
            Internal::OutWritten { job, .. } if !self.work.subs.get(&job).is_some_and(|s| s.phase.finishing()) => {}
            Internal::OutWritten { job, result, res } => match res {
                Ok(()) => self.finish_sub(&job, State::Succeeded, None, Some(result)),
                Err(e) => self.finish_sub(&job, State::Failed, Some(e), None),
            },
        }
    }
}
