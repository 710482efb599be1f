//! Mesh II: jobs submitted from any node, run on the strongest device that fits, streamed back, and moved
//! to the next device when a worker goes away.
//!
//! Two roles live in every daemon:
//! - **submitter** ([`Sub`]): a job from `bitnode submit` on this node. The scheduler ranks this node and the
//!   connected paired peers; the job travels to the winner in an envelope signed with this node's key; the
//!   worker's heartbeats, tokens, progress, checkpoints and result come back in envelopes signed with its
//!   key. A worker that disconnects or falls silent for `[jobs] heartbeat_timeout_secs` loses the job to the
//!   next best device (a fine-tune resumes from the last checkpoint it streamed back; inference restarts).
//! - **worker** ([`Task`]): a job this node runs, for a peer or for itself. Missing models are pulled from
//!   the submitter by content hash, chunk by verified chunk; jobs run one at a time, each in a child
//!   process (`bitnode job-exec`), so a cancel is a kill, and a crash in a GPU driver cannot take the
//!   daemon (and the mesh) down with it.
//!
//! A job that runs here for a local submission takes the same path without envelopes: its updates go
//! straight to the submitter half. Every change of a job's state is written to the job table at once.
use super::*;
use crate::exec::{ExecFile, ExecLine, JobPaths};
use crate::fsutil::write_private;
use crate::jobs::{Job, State};
use crate::models::{hex, Store};
use crate::schedule::{self, Candidate, Link, Need, Verdict};
use crate::transfer::Download;
use bitnode_protocol::job::{
    Bundle, BundleFile, Envelope, JobAck, JobPayload, JobSpec, Kind, ModelRequest, ModelResponse, NonceCache, Outcome,
    Update, UpdateAck,
};
use bitnode_protocol::mesh::MAX_ADVERTISED_MODELS;
use bitnode_protocol::wire;
use ed25519_dalek::SigningKey;
use libp2p::request_response::OutboundRequestId;
use std::collections::VecDeque;

/// Validity of the envelopes this node seals (the receiver allows 60 s of clock skew on top).
const ENVELOPE_TTL: u64 = 600;
/// Model chunks requested at once from a submitter.
const CHUNKS_IN_FLIGHT: usize = 4;
/// Failed chunk requests tolerated in one transfer (they are retried every second: a broken connection
/// has about this many seconds to come back before the job fails).
const MAX_CHUNK_FAILURES: u32 = 60;
/// Fine-tune progress goes back at most this often (the last step always).
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Marks a failed manifest request in a task's retry list.
const MANIFEST_RETRY: (u32, u32) = (u32::MAX, u32::MAX);
/// A worker that is disconnected (rather than silent) is given this long to come back.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

pub(super) enum Internal {
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
    /// A capability re-measurement ended (None: it failed, or the device disagreed with the CPU twin).
    Measured(Option<f64>),
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

/// A submission whose dataset and resume checkpoint were being read off the event loop.
pub(super) struct PendingSubmit {
    job_id: [u8; 16],
    spec: JobSpec,
    need: Need,
    target: Target,
    out: Option<PathBuf>,
    detach: bool,
    reply: oneshot::Sender<Response>,
    events: Option<mpsc::Sender<Event>>,
    /// The checkpoint to start from (`--resume`), or why the inputs could not be read.
    res: Result<Option<(u64, Bundle)>, String>,
}

/// Reads a submission's dataset into its spec and the checkpoint it resumes from, within the limits.
fn load_inputs(
    spec: &mut JobSpec,
    data_path: Option<&Path>,
    resume: Option<&Path>,
    max_data: u64,
    max_ckpt: u64,
) -> Result<Option<(u64, Bundle)>, String> {
    if let (JobSpec::Finetune(f), Some(p)) = (spec, data_path) {
        let len = std::fs::metadata(p)
            .map_err(|e| format!("reading {}: {e}", p.display()))?
            .len();
        if len > max_data {
            return Err(format!(
                "the dataset {} is {len} bytes, over the limit of {max_data} bytes ([jobs] max_dataset_bytes)",
                p.display()
            ));
        }
        f.data = std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))?;
        if f.data_name.is_empty() {
            f.data_name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "data.txt".into());
        }
    }
    // A checkpoint to start from travels with the job, as a failover's does.
    let Some(dir) = resume else { return Ok(None) };
    read_checkpoint(dir, max_ckpt).map(Some)
}

/// A checkpoint directory (adapter, optimizer moments, `trainer_state.json`) with its step.
fn read_checkpoint(dir: &Path, max: u64) -> Result<(u64, Bundle), String> {
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

/// A job this node submitted.
pub(super) struct Sub {
    job_id: [u8; 16],
    spec: JobSpec,
    need: Need,
    target: Target,
    out: Option<PathBuf>,
    /// The device running it now (this node's own id for a local run) and whether it accepted.
    worker: Option<PeerId>,
    accepted: bool,
    tried: Vec<PeerId>,
    attempt: u32,
    last_heard: Instant,
    disconnected_since: Option<Instant>,
    checkpoint: Option<(u64, Bundle)>,
    /// The result arrived and is being written to `out`; the worker owes nothing more.
    finishing: bool,
    /// Taken up again after this daemon restarted: until then, the worker is given time to reconnect
    /// (silence and absence are not held against it). Cleared by its first update.
    reattach_until: Option<Instant>,
    progress: Option<api::Progress>,
    /// Clients following the job (bounded channels; one that falls behind is dropped).
    watchers: Vec<mpsc::Sender<Event>>,
    finals: Vec<oneshot::Sender<Response>>,
}

enum TaskState {
    /// Pulling missing inputs from the submitter: which hashes are still missing, the download of the first.
    Fetching {
        missing: Vec<String>,
        download: Option<Download>,
        in_flight: HashSet<(u32, u32)>,
        failed: Vec<(u32, u32)>,
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
enum Sent {
    Result,
    Checkpoint,
    Other,
}

/// Asks the task that owns a job's child process to kill it (SIGKILL). The owner has not reaped the
/// child while this is deliverable, so the signal cannot reach a recycled pid.
pub(super) struct ChildKill(mpsc::Sender<()>);

impl ChildKill {
    fn kill(&self) {
        // Full: a kill is already pending; closed: the child has exited. Either way nothing to add.
        let _ = self.0.try_send(());
    }
}

/// Linux: the kernel kills the job process when the daemon dies (`PR_SET_PDEATHSIG`), so a killed
/// daemon leaves no orphan job running. Elsewhere (macOS has no such call; not built or tested here)
/// the orphan ends at its next write to the closed stdout pipe (SIGPIPE), which a running job makes at
/// least once per step or token.
fn die_with_parent(cmd: &mut tokio::process::Command) {
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

/// A job this node runs.
pub(super) struct Task {
    job_id: [u8; 16],
    /// None: submitted by this node itself.
    submitter: Option<PeerId>,
    payload: JobPayload,
    dir: PathBuf,
    state: TaskState,
    cancelled: Option<String>,
    result: Option<serde_json::Value>,
    error: Option<String>,
    /// When the last progress update went out (they are sent at most every 200 ms).
    last_progress: Option<Instant>,
    /// The newest checkpoint the job wrote (step, directory), and whether its delivery failed: it is
    /// read and sent again once the submitter answers (it was away: restarting, or a phone asleep).
    last_checkpoint: Option<(usize, String)>,
    checkpoint_unsent: bool,
}

pub(super) struct Work {
    pub(super) table: crate::jobs::JobTable,
    store: Store,
    signing: SigningKey,
    my_key: [u8; 32],
    nonces: NonceCache,
    subs: HashMap<String, Sub>,
    tasks: HashMap<String, Task>,
    order: VecDeque<String>,
    running: Option<String>,
    internal: mpsc::UnboundedSender<Internal>,
    job_requests: HashMap<OutboundRequestId, (String, PeerId)>,
    model_requests: HashMap<OutboundRequestId, (String, ModelRequest)>,
    /// Updates in flight: (task, whether it is the result).
    done_requests: HashMap<OutboundRequestId, (String, Sent)>,
    last_heartbeat: Instant,
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
            running: None,
            internal,
            job_requests: HashMap::new(),
            model_requests: HashMap::new(),
            done_requests: HashMap::new(),
            last_heartbeat: Instant::now(),
        })
    }

    /// A job process runs (or starts) here.
    pub(super) fn busy(&self) -> bool {
        self.running.is_some()
    }

    pub(super) fn internal(&self) -> mpsc::UnboundedSender<Internal> {
        self.internal.clone()
    }

    /// Jobs queued, fetching or running here (what the capability advert calls the queue).
    pub(super) fn queue_len(&self) -> u32 {
        self.tasks
            .values()
            .filter(|t| !matches!(t.state, TaskState::Done { .. }))
            .count() as u32
    }

    pub(super) fn models(&self) -> Vec<String> {
        let mut m = self.store.list();
        m.truncate(MAX_ADVERTISED_MODELS);
        m
    }
}

fn parse_job_id(s: &str) -> Option<[u8; 16]> {
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

fn key_peer(k: &[u8; 32]) -> Option<PeerId> {
    let pk = libp2p::identity::ed25519::PublicKey::try_from_bytes(k).ok()?;
    Some(PeerId::from_public_key(&libp2p::identity::PublicKey::from(pk)))
}

/// Reads a directory's regular files, and those one level down, into a bundle (a checkpoint holds the
/// adapter plus `exp_avg/` and `exp_avg_sq/`).
fn read_bundle(dir: &Path, recurse: bool, max: u64) -> anyhow::Result<Bundle> {
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
fn write_bundle(dir: &Path, b: &Bundle) -> anyhow::Result<()> {
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

/// Hands `ev` to every client following a job. A client whose backlog is full has stopped reading: it
/// is dropped here (its connection task then times out its write and closes), so a stalled terminal costs
/// the daemon at most [`control::MAX_EVENT_BACKLOG`] events. A closed one simply went away.
fn send_to_watchers(watchers: &mut Vec<mpsc::Sender<Event>>, ev: &Event) {
    watchers.retain(|w| match w.try_send(ev.clone()) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!(
                "a control client fell {} events behind; no longer streaming to it",
                control::MAX_EVENT_BACKLOG
            );
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    });
}

impl Daemon {
    fn peer_name(&self, p: &PeerId) -> String {
        if *p == self.me {
            return self.name.clone();
        }
        self.trust
            .get(p)
            .map(|t| t.name.clone())
            .unwrap_or_else(|| crate::trust::default_name(p))
    }

    pub(super) fn refresh_job_caps(&mut self) {
        self.caps.queue_len = self.work.queue_len();
        self.caps.models = self.work.models();
        self.caps.jobs_on_battery = self.cfg.jobs.run_on_battery;
        self.caps.accepts_jobs = self.cfg.jobs.accept_remote;
        self.caps.relay_max_circuit_bytes = self.relay_server.then_some(self.cfg.relay.max_circuit_bytes);
        self.push_caps_if_changed();
    }

    fn update_job(&mut self, id: &str, f: impl FnOnce(&mut Job)) {
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

    /// Whether a model of `bytes` can travel between us and `peer`: over a direct connection always; over
    /// a relayed one only when the relay advertises a per-connection limit that holds it.
    fn model_route(&self, peer: &PeerId, bytes: u64) -> Result<(), String> {
        let Some(st) = self.peers.get(peer) else {
            return Err("not connected".into());
        };
        if st.direct() {
            return Ok(());
        }
        // Any relayed connection whose relay holds the model will do; else say why the first cannot.
        let mut why = None;
        for c in st.conns.values().filter(|c| c.identified && c.relayed) {
            let relay = c.relay;
            let limit = relay
                .and_then(|r| self.peers.get(&r))
                .and_then(|s| s.caps.as_ref())
                .and_then(|c| c.relay_max_circuit_bytes);
            // Headroom for the framing of chunks and the job's other traffic.
            if limit.is_some_and(|l| l >= bytes.saturating_add(bytes / 16).saturating_add(4 << 20)) {
                return Ok(());
            }
            why.get_or_insert_with(|| {
                format!(
                    "only a relayed connection, and the relay {} carries at most {} per connection (the model is {})",
                    relay.map(|r| self.peer_name(&r)).unwrap_or_else(|| "?".into()),
                    limit.map_or(
                        "an unknown amount (libp2p's default is 128 KiB)".into(),
                        bitnode_engine::util::human_bytes
                    ),
                    bitnode_engine::util::human_bytes(bytes)
                )
            });
        }
        Err(why.unwrap_or_else(|| "no identified connection".into()))
    }

    // ---- submitter ----

    /// `bitnode submit`: records the job, places it, and either answers at once (`detach`) or keeps the
    /// reply until the job ends, streaming its events meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn submit(
        &mut self,
        mut spec: JobSpec,
        data_path: Option<PathBuf>,
        need: Need,
        to: &str,
        out: Option<PathBuf>,
        resume: Option<PathBuf>,
        detach: bool,
        reply: oneshot::Sender<Response>,
        events: Option<mpsc::Sender<Event>>,
    ) {
        let fail = |reply: oneshot::Sender<Response>, e: String| {
            let _ = reply.send(Response::err(e));
        };
        for h in spec.inputs() {
            match self.work.store.resolve(h) {
                Ok(Some(_)) => {}
                Ok(None) => return fail(reply, format!("model {h} is not in this node's store")),
                Err(e) => return fail(reply, format!("{e:#}")),
            }
        }
        let target = match to {
            "" | "auto" => Target::Auto,
            "local" => Target::Local,
            who => match self.trust.resolve(who) {
                Some(p) => Target::Peer(p),
                None if who == self.me.to_base58() || who == self.name => Target::Local,
                None => return fail(reply, format!("{who:?} is not a paired peer (see `bitnode peers`)")),
            },
        };
        if let JobSpec::Finetune(f) = &mut spec {
            if data_path.is_none() {
                return fail(reply, "a fine-tune needs its dataset".into());
            }
            if out.is_none() {
                return fail(reply, "a fine-tune needs --out".into());
            }
            // Checkpoints are what a failover resumes from; a delegated fine-tune always makes them.
            if f.save_every.is_none() && self.cfg.jobs.checkpoint_every > 0 {
                f.save_every = Some(self.cfg.jobs.checkpoint_every);
            }
        }
        // The dataset (up to 16 MiB) and a checkpoint to resume from (up to 256 MiB) are read off the
        // event loop; the job is recorded and placed when they are in memory.
        let max_data = self.cfg.jobs.max_dataset_bytes;
        let max_ckpt = self.cfg.jobs.max_checkpoint_bytes;
        let tx = self.work.internal.clone();
        let job_id = random::<16>();
        let home = self.home.clone();
        tokio::task::spawn_blocking(move || {
            let res =
                load_inputs(&mut spec, data_path.as_deref(), resume.as_deref(), max_data, max_ckpt).and_then(|c| {
                    // The record a restarted daemon takes the job up from, on disk before the job is placed.
                    let rec = crate::jobs::Submission {
                        job_id,
                        spec: spec.clone(),
                        need,
                        target: target.to_string(),
                        out: out.clone(),
                    };
                    rec.encode()
                        .and_then(|b| write_private(&crate::jobs::Submission::path(&home, &hex(&job_id)), &b))
                        .map_err(|e| format!("recording the job: {e:#}"))?;
                    Ok(c)
                });
            let _ = tx.send(Internal::SubmitLoaded(Box::new(PendingSubmit {
                job_id,
                spec,
                need,
                target,
                out,
                detach,
                reply,
                events,
                res,
            })));
        });
    }

    /// The second half of [`Daemon::submit`], once the job's inputs are read.
    fn submit_loaded(&mut self, p: PendingSubmit) {
        let PendingSubmit {
            job_id,
            spec,
            need,
            target,
            out,
            detach,
            reply,
            events,
            res,
        } = p;
        let checkpoint = match res {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Response::err(e));
                return;
            }
        };
        let id = hex(&job_id);
        let job = Job {
            id: id.clone(),
            kind: spec.kind().into(),
            submitter: self.me.to_base58(),
            executed_by: None,
            state: State::Queued,
            created_unix: now_unix(),
            updated_unix: now_unix(),
            placement: vec![],
            reason: None,
            result: None,
            attempts: vec![],
            executed_by_name: None,
            out: out.as_ref().map(|o| o.display().to_string()),
        };
        self.work.table.insert(job);
        self.persist_jobs();
        let mut sub = Sub {
            job_id,
            spec,
            need,
            target,
            out,
            worker: None,
            accepted: false,
            tried: vec![],
            attempt: 0,
            last_heard: Instant::now(),
            disconnected_since: None,
            checkpoint,
            finishing: false,
            reattach_until: None,
            progress: None,
            watchers: vec![],
            finals: vec![],
        };
        if let Some(e) = events.filter(|_| !detach) {
            sub.watchers.push(e);
        }
        let detached = if detach {
            Some(reply)
        } else {
            sub.finals.push(reply);
            None
        };
        self.work.subs.insert(id.clone(), sub);
        self.place(&id, None);
        if let Some(reply) = detached {
            let _ = reply.send(Response::ok(&self.job_view(&id)));
        }
    }

    /// At start: takes up the jobs this node submitted that had not ended when its daemon last stopped
    /// (a crash, a kill, a phone that closed the app). A job some peer was running is left to that peer,
    /// which kept running it: the worker gets `[jobs] reattach_secs` to reconnect and report before it is
    /// held to the usual heartbeat rules (and replaced from the last checkpoint kept here). A job that ran
    /// here, or was still being placed, is placed again at once, a fine-tune from its last checkpoint.
    /// Runs before the event loop, so its reads from disk block nothing.
    pub(super) fn resume_submissions(&mut self) {
        let me = self.me.to_base58();
        let live: Vec<Job> = self
            .work
            .table
            .jobs
            .iter()
            .filter(|j| !j.state.is_final() && j.submitter == me)
            .cloned()
            .collect();
        let now = Instant::now();
        let grace = Duration::from_secs(self.cfg.jobs.reattach_secs);
        for j in live {
            let rec = match crate::jobs::Submission::load(&self.home, &j.id) {
                Ok(Some(r)) if hex(&r.job_id) == j.id => r,
                Ok(_) => {
                    self.end_unresumable(&j.id, "the daemon stopped while the job was running".into());
                    continue;
                }
                Err(e) => {
                    self.end_unresumable(
                        &j.id,
                        format!("the daemon stopped, and the job's record is unreadable: {e:#}"),
                    );
                    continue;
                }
            };
            let target = match rec.target.parse::<Target>() {
                Ok(t) => t,
                Err(e) => {
                    self.end_unresumable(&j.id, format!("the job's record is unreadable: {e}"));
                    continue;
                }
            };
            let ckpt_dir = self.home.join("jobs").join(&j.id).join("checkpoint");
            let checkpoint = if ckpt_dir.is_dir() {
                match read_checkpoint(&ckpt_dir, self.cfg.jobs.max_checkpoint_bytes) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(job = %j.id, "the last checkpoint is unusable, starting over: {e}");
                        None
                    }
                }
            } else {
                None
            };
            let worker = j
                .executed_by
                .as_deref()
                .and_then(|w| w.parse::<PeerId>().ok())
                .filter(|w| *w != self.me);
            tracing::info!(
                job = %j.id,
                worker = worker.map(|w| w.to_base58()).unwrap_or_else(|| "this device".into()),
                checkpoint_step = checkpoint.as_ref().map(|(s, _)| *s),
                "taking up a job submitted before the restart"
            );
            let sub = Sub {
                job_id: rec.job_id,
                spec: rec.spec,
                need: rec.need,
                target,
                out: rec.out,
                worker,
                accepted: worker.is_some(),
                tried: worker.into_iter().collect(),
                attempt: j.attempts.len() as u32,
                last_heard: now,
                disconnected_since: None,
                checkpoint,
                finishing: false,
                reattach_until: worker.map(|_| now + grace),
                progress: None,
                watchers: vec![],
                finals: vec![],
            };
            self.work.subs.insert(j.id.clone(), sub);
            if worker.is_none() {
                self.update_job(&j.id, |x| x.state = State::Queued);
                self.place(&j.id, Some("this device restarted".into()));
            }
        }
    }

    /// A job left live by the last daemon that cannot be taken up: it ends failed, with the reason.
    fn end_unresumable(&mut self, id: &str, reason: String) {
        self.update_job(id, |j| {
            j.state = State::Failed;
            j.reason = Some(reason);
        });
    }

    fn candidates(&self, sub: &Sub) -> Vec<Candidate> {
        let mut out = vec![];
        let mut mine = self.caps.clone();
        mine.queue_len = self.work.queue_len();
        let local = Candidate {
            id: self.me.to_base58(),
            name: format!("{} (this device)", self.name),
            link: Link::Local,
            caps: mine,
            has_model: true,
            // The owner asked on this device: it may always run its own jobs.
            battery_allowed: true,
            no_model_route: None,
        };
        if sub.target != Target::Auto && sub.target != Target::Local {
            // Pinned to a peer: only that one.
        } else if !sub.tried.contains(&self.me) {
            out.push(local);
        }
        if sub.target == Target::Local {
            return out;
        }
        let inputs: Vec<String> = sub.spec.inputs().iter().map(|s| s.to_string()).collect();
        for (p, st) in &self.peers {
            if !self.trust.contains(p) || !st.connected() || sub.tried.contains(p) {
                continue;
            }
            if let Target::Peer(t) = sub.target {
                if t != *p {
                    continue;
                }
            }
            let Some(caps) = st.caps.clone() else { continue };
            let has_model = inputs.iter().all(|h| caps.models.contains(h));
            let no_model_route = if has_model {
                None
            } else {
                self.model_route(p, sub.need.model_bytes).err()
            };
            out.push(Candidate {
                id: p.to_base58(),
                name: self.peer_name(p),
                link: if st.direct() { Link::Direct } else { Link::Relayed },
                battery_allowed: caps.jobs_on_battery,
                caps,
                has_model,
                no_model_route,
            });
        }
        out
    }

    /// Ranks the candidates not yet tried and sends the job to the best; `why` is the reason of the move
    /// when this is a failover. Ends the job failed when nobody is left.
    fn place(&mut self, id: &str, why: Option<String>) {
        let Some(sub) = self.work.subs.get(id) else { return };
        let cands = self.candidates(sub);
        let ranked: Vec<Verdict> = schedule::rank(&cands, &sub.need);
        let lines: Vec<String> = ranked
            .iter()
            .map(|v| {
                format!(
                    "{} ({}): {}{}",
                    v.name,
                    v.id,
                    if v.eta_s.is_some() { "" } else { "dropped, " },
                    v.reason
                )
            })
            .collect();
        let pinned = matches!(sub.target, Target::Peer(_));
        let best = ranked
            .iter()
            .find(|v| v.eta_s.is_some())
            .and_then(|v| v.id.parse::<PeerId>().ok());
        let attempt = sub.attempt;
        let max_attempts = self.cfg.jobs.max_attempts.max(1);
        let tried = sub.tried.len();
        self.update_job(id, |j| {
            if !lines.is_empty() {
                let head = if attempt == 0 {
                    "placement:".to_string()
                } else {
                    format!("placement after attempt {attempt}:")
                };
                j.placement.push(head);
                j.placement.extend(lines.iter().cloned());
            }
        });
        let Some(best) = best else {
            let reason = match (&why, pinned, ranked.is_empty()) {
                (Some(w), _, _) => format!("{w}; no other device can run it"),
                (None, true, true) => "the pinned peer is not connected".to_string(),
                (None, _, _) => format!(
                    "no device can run this job: {}",
                    if lines.is_empty() {
                        "no candidates".into()
                    } else {
                        lines.join("; ")
                    }
                ),
            };
            return self.finish_sub(id, State::Failed, Some(reason), None);
        };
        if tried as u32 >= max_attempts {
            let reason = format!(
                "{}; gave up after {tried} devices ([jobs] max_attempts)",
                why.unwrap_or_else(|| "the job failed".into())
            );
            return self.finish_sub(id, State::Failed, Some(reason), None);
        }
        let name = self.peer_name(&best);
        let reason = ranked
            .iter()
            .find(|v| v.id == best.to_base58())
            .map(|v| v.reason.clone())
            .unwrap_or_default();
        self.emit(
            id,
            Event::Placed {
                executed_by: best.to_base58(),
                name: name.clone(),
                attempt,
                why: reason,
                after: why,
                placement: lines,
            },
        );
        let Some(sub) = self.work.subs.get_mut(id) else { return };
        sub.worker = Some(best);
        sub.accepted = false;
        sub.tried.push(best);
        sub.last_heard = Instant::now();
        sub.disconnected_since = None;
        let resume = sub.checkpoint.as_ref().map(|(_, b)| b.clone());
        let payload = JobPayload {
            spec: sub.spec.clone(),
            resume,
            attempt,
        };
        let job_id = sub.job_id;
        let me = self.me.to_base58();
        self.update_job(id, |j| {
            j.executed_by = Some(best.to_base58());
            j.executed_by_name = Some(name.clone());
        });
        if best == self.me {
            let _ = me;
            if let Some(s) = self.work.subs.get_mut(id) {
                s.accepted = true;
            }
            self.update_job(id, |j| j.state = State::Running);
            // May end the job at once (a start that fails): after the state above, never before.
            self.accept_task(id.to_string(), job_id, None, payload);
            return;
        }
        let Some(target_key) = peer_key(&best) else {
            return self.attempt_failed(id, best, "its peer id holds no ed25519 key".into());
        };
        let bytes = match wire::encode(&payload, self.job_message_max()) {
            Ok(b) => b,
            Err(e) => {
                return self.finish_sub(
                    id,
                    State::Failed,
                    Some(format!("the job does not fit a message: {e}")),
                    None,
                )
            }
        };
        let env = Envelope::seal(
            &self.work.signing,
            Kind::Job,
            job_id,
            target_key,
            now_unix(),
            ENVELOPE_TTL,
            random::<16>(),
            bytes,
        );
        let rid = self.swarm.behaviour_mut().job.inner.send_request(&best, Ok(env));
        self.work.job_requests.insert(rid, (id.to_string(), best));
    }

    pub(super) fn job_message_max(&self) -> usize {
        self.cfg.jobs.max_job_message()
    }

    pub(super) fn update_message_max(&self) -> usize {
        self.cfg.jobs.max_update_message()
    }

    /// The device running job `id` refused it, failed to take it, or went away.
    fn attempt_failed(&mut self, id: &str, worker: PeerId, reason: String) {
        let name = self.peer_name(&worker);
        let line = format!("{name} ({worker}): {reason}");
        tracing::warn!(job = %id, "attempt failed on {line}");
        self.update_job(id, |j| j.attempts.push(line.clone()));
        let Some(sub) = self.work.subs.get_mut(id) else { return };
        if sub.worker != Some(worker) {
            return;
        }
        sub.worker = None;
        sub.attempt += 1;
        let pinned = !matches!(sub.target, Target::Auto);
        self.emit(
            id,
            Event::AttemptFailed {
                worker: worker.to_base58(),
                name: name.clone(),
                reason: reason.clone(),
            },
        );
        if pinned {
            return self.finish_sub(id, State::Failed, Some(format!("{name}: {reason}")), None);
        }
        self.place(id, Some(format!("{name} {reason}")));
    }

    fn emit(&mut self, id: &str, ev: Event) {
        if let Some(s) = self.work.subs.get_mut(id) {
            send_to_watchers(&mut s.watchers, &ev);
        }
    }

    /// The job as `bitnode jobs show --json` and the final line of `bitnode submit --json` print it.
    pub(super) fn job_view(&self, id: &str) -> api::JobView {
        let Some(j) = self.work.table.jobs.iter().find(|j| j.id == id) else {
            // Every caller asks for a job it has just found or inserted; a placeholder rather than a panic.
            return api::JobView::of(&Job {
                id: id.to_string(),
                kind: String::new(),
                submitter: String::new(),
                executed_by: None,
                state: State::Failed,
                created_unix: 0,
                updated_unix: 0,
                placement: vec![],
                reason: Some("the job is not in the job table".into()),
                result: None,
                attempts: vec![],
                executed_by_name: None,
                out: None,
            });
        };
        let mut v = api::JobView::of(j);
        if let Some(s) = self.work.subs.get(id) {
            v.progress = s.progress.clone();
            v.checkpoint_step = s.checkpoint.as_ref().map(|(k, _)| *k);
        }
        v
    }

    /// Ends a submitted job: records it, answers the waiting `submit`s, forgets the live state.
    fn finish_sub(&mut self, id: &str, state: State, reason: Option<String>, result: Option<serde_json::Value>) {
        let worker = self.work.subs.get(id).and_then(|s| s.worker);
        let name = worker.map(|w| self.peer_name(&w));
        self.update_job(id, |j| {
            j.state = state;
            j.reason = reason.clone();
            j.result = result;
            if let Some(w) = worker {
                j.executed_by = Some(w.to_base58());
                j.executed_by_name = name;
            }
        });
        let v = self.job_view(id);
        tracing::info!(job = %id, state = ?state, reason = reason.as_deref().unwrap_or(""), "job ended");
        // The checkpoint kept for a failover is no longer needed once the job ended well.
        if state == State::Succeeded {
            let _ = std::fs::remove_dir_all(self.home.join("jobs").join(id));
        }
        if let Some(mut sub) = self.work.subs.remove(id) {
            send_to_watchers(&mut sub.watchers, &Event::Finished(Box::new(v.clone())));
            for f in sub.finals {
                let _ = f.send(Response::ok(&v));
            }
        }
    }

    /// An update for a job this node submitted, from its current worker (`worker` is this node itself for
    /// a local run). Returns the answer for the worker.
    fn on_sub_update(&mut self, worker: PeerId, job_id: [u8; 16], update: Update) -> UpdateAck {
        let id = hex(&job_id);
        let Some(sub) = self.work.subs.get_mut(&id) else {
            let done = self.work.table.jobs.iter().any(|j| j.id == id && j.state.is_final());
            if done && matches!(update, Update::Done(_)) {
                return UpdateAck::Ok;
            }
            return UpdateAck::Stop {
                reason: "this device is not waiting for that job (it ended, was cancelled or never existed)".into(),
            };
        };
        if sub.worker != Some(worker) {
            return UpdateAck::Stop {
                reason: "the job has moved to another device".into(),
            };
        }
        sub.last_heard = Instant::now();
        sub.accepted = true;
        if sub.reattach_until.take().is_some() {
            tracing::info!(job = %id, %worker, "the worker kept the job through this device's restart and reported back");
        }
        if sub.finishing {
            // A resent result (our acknowledgement was lost): it is already being written.
            return UpdateAck::Ok;
        }
        match update {
            Update::Heartbeat { .. } => {}
            Update::Tokens { ids, text } => {
                self.emit(&id, Event::Tokens { ids, text });
            }
            Update::Progress {
                step,
                total,
                loss,
                lr,
                tokens_per_second,
            } => {
                let p = api::Progress {
                    step,
                    total,
                    loss,
                    lr,
                    tokens_per_second,
                    worker: worker.to_base58(),
                };
                sub.progress = Some(p.clone());
                self.emit(&id, Event::Progress(p));
            }
            Update::Checkpoint { step, bundle } => {
                if let Err(e) = bundle.check() {
                    return UpdateAck::Rejected { reason: e };
                }
                // Kept on disk too, so the owner can resume by hand if every device fails; written off the
                // event loop (it can be hundreds of MiB), one at a time.
                let dir = self.home.join("jobs").join(&id).join("checkpoint");
                let tmp = self.home.join("jobs").join(&id).join(".checkpoint-tmp");
                let copy = bundle.clone();
                let job = id.clone();
                tokio::task::spawn_blocking(move || {
                    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
                    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = std::fs::remove_dir_all(&tmp);
                    if let Err(e) = write_bundle(&tmp, &copy).and_then(|_| {
                        let _ = std::fs::remove_dir_all(&dir);
                        std::fs::rename(&tmp, &dir).map_err(anyhow::Error::from)
                    }) {
                        tracing::warn!(job = %job, "saving a checkpoint: {e:#}");
                    }
                });
                sub.checkpoint = Some((step, bundle));
                self.emit(
                    &id,
                    Event::Checkpoint {
                        step,
                        worker: worker.to_base58(),
                    },
                );
            }
            Update::Done(outcome) => self.sub_done(&id, worker, outcome),
        }
        UpdateAck::Ok
    }

    fn sub_done(&mut self, id: &str, worker: PeerId, outcome: Outcome) {
        let name = self.peer_name(&worker);
        match outcome {
            Outcome::Succeeded { result_json, files } => {
                let mut result: serde_json::Value = match serde_json::from_str(&result_json) {
                    Ok(v) => v,
                    Err(e) => {
                        return self.finish_sub(
                            id,
                            State::Failed,
                            Some(format!("{name} sent a malformed result: {e}")),
                            None,
                        )
                    }
                };
                let Some(sub) = self.work.subs.get_mut(id) else { return };
                let Some(out) = sub.out.clone() else {
                    return self.finish_sub(id, State::Succeeded, None, Some(result));
                };
                // The summary names the directory on the worker; here it is --out.
                if result.get("adapter").is_some() {
                    result["adapter"] = serde_json::Value::String(out.display().to_string());
                }
                // Written off the event loop (an adapter can be hundreds of MiB); the job ends when it is
                // on disk. Meanwhile the worker is done with it: no heartbeats are expected.
                sub.finishing = true;
                let tx = self.work.internal.clone();
                let job = id.to_string();
                tokio::task::spawn_blocking(move || {
                    let res = write_bundle(&out, &files)
                        .map_err(|e| format!("writing the adapter to {}: {e:#}", out.display()));
                    let _ = tx.send(Internal::OutWritten { job, result, res });
                });
            }
            Outcome::Failed {
                reason,
                device_fault: true,
            } => self.attempt_failed(id, worker, reason),
            Outcome::Failed { reason, .. } => {
                // The job itself failed (bad data, bad settings): another device would fail the same way.
                self.finish_sub(id, State::Failed, Some(format!("on {name}: {reason}")), None)
            }
            Outcome::Cancelled { reason } => self.finish_sub(id, State::Cancelled, Some(reason), None),
        }
    }

    /// Attaches a client to a job's stream: a job still live here gets one more watcher, answered when
    /// it ends; one that already ended is answered at once.
    pub(super) fn follow_job(
        &mut self,
        id_prefix: &str,
        events: mpsc::Sender<Event>,
        reply: oneshot::Sender<Response>,
    ) {
        let id = match self.work.table.find(id_prefix) {
            Ok(j) => j.id.clone(),
            Err(e) => {
                let _ = reply.send(Response::err(format!("{e:#}")));
                return;
            }
        };
        match self.work.subs.get_mut(&id) {
            Some(sub) => {
                sub.watchers.push(events);
                sub.finals.push(reply);
            }
            None => {
                let v = self.job_view(&id);
                let _ = reply.send(if v.state.is_final() {
                    Response::ok(&v)
                } else {
                    Response::err(format!(
                        "job {id} runs here for another device; follow it on the device that submitted it"
                    ))
                });
            }
        }
    }

    pub(super) fn cancel_job(&mut self, id_prefix: &str) -> Response {
        let id = match self.work.table.find(id_prefix) {
            Ok(j) => j.id.clone(),
            Err(e) => return Response::err(format!("{e:#}")),
        };
        if let Some(sub) = self.work.subs.get(&id) {
            let worker = sub.worker;
            let job_id = sub.job_id;
            match worker {
                Some(w) if w == self.me => self.cancel_task(&id, "cancelled by its submitter"),
                Some(w) => self.send_cancel(w, job_id),
                None => {}
            }
            self.finish_sub(&id, State::Cancelled, Some("cancelled by the owner".into()), None);
            return Response::ok(&self.job_view(&id));
        }
        if self.work.tasks.contains_key(&id) {
            self.cancel_task(&id, "cancelled on the device running it");
            return Response::ok(&self.job_view(&id));
        }
        Response::err(format!(
            "job {id} already ended ({:?})",
            self.work.table.find(&id).map(|j| j.state).ok()
        ))
    }

    fn send_cancel(&mut self, worker: PeerId, job_id: [u8; 16]) {
        let Some(k) = peer_key(&worker) else { return };
        let env = Envelope::seal(
            &self.work.signing,
            Kind::Cancel,
            job_id,
            k,
            now_unix(),
            ENVELOPE_TTL,
            random::<16>(),
            vec![],
        );
        self.swarm.behaviour_mut().job.inner.send_request(&worker, Ok(env));
    }

    pub(super) fn jobs_list(&self) -> Vec<api::JobView> {
        let mut v: Vec<api::JobView> = self
            .work
            .table
            .jobs
            .iter()
            .rev()
            .take(200)
            .map(|j| self.job_view(&j.id))
            .collect();
        v.truncate(200);
        v
    }

    /// Heartbeat checks (submitter) and heartbeats, retries and resends (worker); every tick.
    pub(super) fn jobs_tick(&mut self) {
        let now = Instant::now();
        let timeout = Duration::from_secs(self.cfg.jobs.heartbeat_timeout_secs.max(1));
        let mut lost = vec![];
        for (id, sub) in self.work.subs.iter_mut() {
            let Some(w) = sub.worker else { continue };
            if w == self.me || sub.finishing || sub.reattach_until.is_some_and(|t| now < t) {
                continue;
            }
            let connected = self.peers.get(&w).is_some_and(|s| s.connected());
            if connected {
                sub.disconnected_since = None;
            } else if sub.disconnected_since.is_none() {
                sub.disconnected_since = Some(now);
            }
            if sub
                .disconnected_since
                .is_some_and(|t| now - t >= DISCONNECT_GRACE.min(timeout))
            {
                lost.push((id.clone(), w, "disconnected".to_string()));
            } else if sub.accepted && now - sub.last_heard >= timeout {
                // Before the ack, a large job may still be in transit: the request's own timeout covers it.
                lost.push((id.clone(), w, format!("sent no heartbeat for {} s", timeout.as_secs())));
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
                    for (f, i) in retry {
                        if (f, i) == MANIFEST_RETRY {
                            self.fetch_next(&id);
                        } else {
                            self.request_chunk(&id, f, i);
                        }
                    }
                }
                _ => {}
            }
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

    pub(super) fn on_job_event(&mut self, e: rr::Event<Inbound<Envelope>, Inbound<JobAck>>) {
        match e {
            rr::Event::Message {
                peer,
                message: rr::Message::Request { request, channel, .. },
                ..
            } => {
                let ack = match request {
                    Ok(env) => self.job_request(peer, env),
                    Err(why) => {
                        tracing::warn!(%peer, "malformed job message refused: {why}");
                        JobAck::Rejected { reason: why }
                    }
                };
                if let JobAck::Rejected { reason } = &ack {
                    tracing::warn!(%peer, "job refused: {reason}");
                }
                let _ = self.swarm.behaviour_mut().job.inner.send_response(channel, Ok(ack));
            }
            rr::Event::Message {
                peer,
                message: rr::Message::Response { request_id, response },
                ..
            } => {
                let Some((id, worker)) = self.work.job_requests.remove(&request_id) else {
                    return;
                };
                match response {
                    Ok(JobAck::Accepted { queue_position }) => {
                        // The job may have ended or moved while the answer was on its way.
                        let Some(s) = self.work.subs.get_mut(&id).filter(|s| s.worker == Some(worker)) else {
                            return;
                        };
                        s.accepted = true;
                        s.last_heard = Instant::now();
                        self.update_job(&id, |j| j.state = State::Running);
                        self.emit(
                            &id,
                            Event::Accepted {
                                worker: peer.to_base58(),
                                queue_position,
                            },
                        );
                    }
                    Ok(JobAck::Rejected { reason }) => {
                        self.attempt_failed(&id, worker, format!("refused the job: {reason}"))
                    }
                    Err(why) => self.attempt_failed(&id, worker, format!("sent a malformed answer: {why}")),
                }
            }
            rr::Event::OutboundFailure { request_id, error, .. } => {
                if let Some((id, worker)) = self.work.job_requests.remove(&request_id) {
                    self.attempt_failed(&id, worker, format!("could not be given the job: {error}"));
                }
            }
            rr::Event::InboundFailure { peer, error, .. } => {
                tracing::warn!(%peer, "job message failed: {error}");
            }
            _ => {}
        }
    }

    fn open_envelope<'a>(
        &mut self,
        peer: &PeerId,
        env: &'a Envelope,
        kind: Kind,
        max: usize,
    ) -> Result<&'a [u8], String> {
        if peer_key(peer) != Some(env.header.signer) {
            return Err("the envelope is signed by another device than the one that sent it".into());
        }
        let admission = self.admission.clone();
        let trusted = move |k: &[u8; 32]| key_peer(k).is_some_and(|p| lock(&admission).trusted.contains(&p));
        env.open(&self.work.my_key, kind, now_unix(), max, trusted, &mut self.work.nonces)
            .map_err(|e| e.to_string())
    }

    fn job_request(&mut self, peer: PeerId, env: Envelope) -> JobAck {
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
        if self.caps.on_ac == Some(false) && self.caps.battery_percent.is_some() && !self.cfg.jobs.run_on_battery {
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
        if self.work.queue_len() as usize >= self.cfg.jobs.max_queue {
            return rej(format!(
                "the queue is full ({} jobs, [jobs] max_queue)",
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
    fn check_payload(&self, p: &JobPayload) -> Result<(), String> {
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
    fn accept_task(&mut self, id: String, job_id: [u8; 16], submitter: Option<PeerId>, payload: JobPayload) {
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

    fn fetch_next(&mut self, id: &str) {
        let store = self.work.store.clone();
        let Some(t) = self.work.tasks.get_mut(id) else { return };
        let Some(sub) = t.submitter else { return };
        let TaskState::Fetching { missing, failed, .. } = &mut t.state else {
            return;
        };
        // Another job may have brought the model meanwhile.
        missing.retain(|h| !matches!(store.resolve(h), Ok(Some(_))));
        if let Some(h) = missing.first() {
            if crate::transfer::in_progress(&store, h) {
                // One download per model: wait for the other job's, then find it in the store.
                failed.push(MANIFEST_RETRY);
                return;
            }
        }
        match missing.first().cloned() {
            Some(h) => {
                tracing::info!(job = %id, model = %h, "fetching a model from the submitter");
                let req = ModelRequest::Manifest { hash: h };
                let rid = self
                    .swarm
                    .behaviour_mut()
                    .model
                    .inner
                    .send_request(&sub, Ok(req.clone()));
                self.work.model_requests.insert(rid, (id.to_string(), req));
            }
            None => {
                if let Some(t) = self.work.tasks.get_mut(id) {
                    t.state = TaskState::Queued;
                }
                self.work.order.push_back(id.to_string());
                self.refresh_job_caps();
                self.start_next();
            }
        }
    }

    fn request_chunk(&mut self, id: &str, file: u32, index: u32) {
        let Some(t) = self.work.tasks.get_mut(id) else { return };
        let Some(sub) = t.submitter else { return };
        let TaskState::Fetching { missing, in_flight, .. } = &mut t.state else {
            return;
        };
        let Some(hash) = missing.first().cloned() else { return };
        in_flight.insert((file, index));
        let req = ModelRequest::Chunk { hash, file, index };
        let rid = self
            .swarm
            .behaviour_mut()
            .model
            .inner
            .send_request(&sub, Ok(req.clone()));
        self.work.model_requests.insert(rid, (id.to_string(), req));
    }

    /// Keeps up to [`CHUNKS_IN_FLIGHT`] chunk requests going; finishes the download when all are in.
    fn pump_chunks(&mut self, id: &str) {
        let Some(t) = self.work.tasks.get_mut(id) else { return };
        let TaskState::Fetching {
            download,
            in_flight,
            failed,
            ..
        } = &mut t.state
        else {
            return;
        };
        let Some(dl) = download.as_ref() else { return };
        let busy: HashSet<(u32, u32)> = in_flight.iter().chain(failed.iter()).copied().collect();
        let want: Vec<(u32, u32)> = dl
            .needed(CHUNKS_IN_FLIGHT + busy.len())
            .into_iter()
            .filter(|c| !busy.contains(c))
            .take(CHUNKS_IN_FLIGHT.saturating_sub(in_flight.len()))
            .collect();
        if want.is_empty() && busy.is_empty() && dl.next_needed().is_none() {
            let Some(dl) = download.take() else { return };
            let tx = self.work.internal.clone();
            let task = id.to_string();
            tokio::task::spawn_blocking(move || {
                let res = dl.finish().map_err(|e| format!("{e:#}"));
                let _ = tx.send(Internal::Fetched { task, res });
            });
            return;
        }
        for (f, i) in want {
            self.request_chunk(id, f, i);
        }
    }

    pub(super) fn on_model_event(&mut self, e: rr::Event<Inbound<ModelRequest>, Inbound<ModelResponse>>) {
        match e {
            rr::Event::Message {
                peer,
                message: rr::Message::Request { request, channel, .. },
                ..
            } => {
                let resp = match request {
                    Ok(req) => self.serve_model(peer, &req),
                    Err(why) => ModelResponse::Refused { reason: why },
                };
                let _ = self.swarm.behaviour_mut().model.inner.send_response(channel, Ok(resp));
            }
            rr::Event::Message {
                message: rr::Message::Response { request_id, response },
                ..
            } => {
                let Some((id, req)) = self.work.model_requests.remove(&request_id) else {
                    return;
                };
                match response {
                    Ok(r) => self.model_response(&id, req, r),
                    Err(why) => self.fail_task(&id, format!("the submitter sent a malformed model message: {why}")),
                }
            }
            rr::Event::OutboundFailure { request_id, error, .. } => {
                let Some((id, req)) = self.work.model_requests.remove(&request_id) else {
                    return;
                };
                if matches!(error, rr::OutboundFailure::UnsupportedProtocols) {
                    return self.fail_task(&id, "the submitter does not serve models (/bitnode/model/1)".into());
                }
                tracing::info!(job = %id, "model request failed ({error}); retrying");
                let mut give_up = false;
                // A submitter gone for twice its own heartbeat timeout has moved the job elsewhere anyway.
                let gone = self
                    .work
                    .tasks
                    .get(&id)
                    .and_then(|t| t.submitter)
                    .is_some_and(|p| !self.peers.get(&p).is_some_and(|s| s.connected()));
                let patience = if gone {
                    (2 * self.cfg.jobs.heartbeat_timeout_secs).min(MAX_CHUNK_FAILURES as u64) as u32
                } else {
                    MAX_CHUNK_FAILURES
                };
                if let Some(t) = self.work.tasks.get_mut(&id) {
                    if let TaskState::Fetching {
                        in_flight,
                        failed,
                        failures,
                        ..
                    } = &mut t.state
                    {
                        *failures += 1;
                        give_up = *failures > patience;
                        match req {
                            ModelRequest::Chunk { file, index, .. } => {
                                in_flight.remove(&(file, index));
                                failed.push((file, index));
                            }
                            // The manifest is asked again by the next fetch round.
                            ModelRequest::Manifest { .. } => failed.push(MANIFEST_RETRY),
                        }
                    }
                }
                if give_up {
                    self.fail_task(&id, format!("the model transfer from the submitter broke off: {error}"));
                }
            }
            _ => {}
        }
    }

    /// The submitter side of a model transfer: only to a paired peer that holds one of our jobs that needs
    /// exactly this model.
    fn serve_model(&mut self, peer: PeerId, req: &ModelRequest) -> ModelResponse {
        let hash = match req {
            ModelRequest::Manifest { hash } | ModelRequest::Chunk { hash, .. } => hash,
        };
        let allowed = self.is_trusted(&peer)
            && self
                .work
                .subs
                .values()
                .any(|s| s.worker == Some(peer) && s.spec.inputs().contains(&hash.as_str()));
        if !allowed {
            tracing::warn!(%peer, "model request refused: no job of ours on that device needs {hash}");
            return ModelResponse::Refused {
                reason: "no job of this device that you run needs that model".into(),
            };
        }
        crate::transfer::serve(&self.work.store, req)
    }

    fn model_response(&mut self, id: &str, req: ModelRequest, resp: ModelResponse) {
        match (req, resp) {
            (ModelRequest::Manifest { hash }, ModelResponse::Manifest(m)) => {
                let total: u64 = m.files.iter().fold(0u64, |a, f| a.saturating_add(f.len));
                let Some(sub) = self.work.tasks.get(id).and_then(|t| t.submitter) else {
                    return;
                };
                if let Err(why) = self.model_route(&sub, total) {
                    return self.fail_task(id, format!("the model cannot travel to this device: {why}"));
                }
                let max = self.cfg.jobs.max_model_bytes;
                let home = self.home.clone();
                let tx = self.work.internal.clone();
                let task = id.to_string();
                tokio::task::spawn_blocking(move || {
                    let res = Download::begin(&Store::new(&home), &hash, m, max).map_err(|e| format!("{e:#}"));
                    let _ = tx.send(Internal::Began { task, res });
                });
            }
            (ModelRequest::Chunk { file, index, .. }, ModelResponse::Chunk { bytes }) => {
                let mut err = None;
                if let Some(t) = self.work.tasks.get_mut(id) {
                    if let TaskState::Fetching {
                        download: Some(dl),
                        in_flight,
                        ..
                    } = &mut t.state
                    {
                        in_flight.remove(&(file, index));
                        if let Err(e) = dl.accept(file, index, &bytes) {
                            err = Some(format!("{e:#}"));
                        }
                    }
                }
                match err {
                    Some(e) => self.fail_task(id, format!("a model chunk failed verification: {e}")),
                    None => self.pump_chunks(id),
                }
            }
            (_, ModelResponse::Refused { reason }) => {
                self.fail_task(id, format!("the submitter refused the model transfer: {reason}"))
            }
            _ => self.fail_task(
                id,
                "the submitter answered a model request with the wrong message".into(),
            ),
        }
    }

    pub(super) fn on_internal(&mut self, ev: Internal) {
        match ev {
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
                            failed.push(MANIFEST_RETRY);
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
            Internal::ChildExit { task, ok, stderr_tail } => self.on_child_exit(&task, ok, stderr_tail),
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
            Internal::Measured(g) => self.on_measured(g),
            Internal::Started { task, res } => self.on_started(&task, res),
            // Unless the owner cancelled it meanwhile.
            Internal::OutWritten { job, .. } if !self.work.subs.get(&job).is_some_and(|s| s.finishing) => {}
            Internal::OutWritten { job, result, res } => match res {
                Ok(()) => self.finish_sub(&job, State::Succeeded, None, Some(result)),
                Err(e) => self.finish_sub(&job, State::Failed, Some(e), None),
            },
        }
    }

    /// Starts the next queued job when nothing runs (one job at a time: they share one GPU).
    fn start_next(&mut self) {
        // A failed start ends that task, which calls back here: re-check before each one.
        while self.work.running.is_none() {
            let Some(id) = self.work.order.pop_front() else { break };
            match self.spawn_task(&id) {
                Ok(()) => {
                    if let Some(t) = self.work.tasks.get_mut(&id) {
                        t.state = TaskState::Starting;
                    }
                    self.work.running = Some(id.clone());
                    if self.work.tasks.get(&id).is_some_and(|t| t.submitter.is_some()) {
                        self.update_job(&id, |j| j.state = State::Running);
                    }
                    return;
                }
                Err(e) => self.fail_task(&id, format!("{e:#}")),
            }
        }
    }

    /// Lays out the job directory (dataset, resume checkpoint, output) and starts `bitnode job-exec` on it.
    /// Lays out the job directory (dataset, resume checkpoint, the exec file) off the event loop and
    /// starts `bitnode job-exec` on it; [`Internal::Started`] reports the outcome.
    fn spawn_task(&mut self, id: &str) -> anyhow::Result<()> {
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
            let started = match prepared {
                Ok(()) => start_child(&home, &dir, &task, tx.clone()),
                Err(e) => Err(e),
            };
            let _ = tx.send(Internal::Started {
                task,
                res: started.map_err(|e| format!("{e:#}")),
            });
        });
        Ok(())
    }
}

/// Starts `bitnode job-exec --dir DIR` and the task that owns it: it forwards the child's lines (tokens
/// batched for up to 30 ms) and then its exit to the daemon, and is the only one that ever kills it.
fn start_child(home: &Path, dir: &Path, id: &str, tx: mpsc::UnboundedSender<Internal>) -> anyhow::Result<ChildKill> {
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

/// Hands a job process's stdout lines to the daemon; tokens are batched for up to 30 ms, so fast decoding
/// does not become one envelope per token.
async fn forward_lines(stdout: tokio::process::ChildStdout, task: String, tx: mpsc::UnboundedSender<Internal>) {
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut pending: Option<(Vec<u32>, String)> = None;
    let flush = |pending: &mut Option<(Vec<u32>, String)>| {
        if let Some((ids, text)) = pending.take() {
            let _ = tx.send(Internal::Tokens {
                task: task.clone(),
                ids,
                text,
            });
        }
    };
    loop {
        let next = if pending.is_some() {
            match tokio::time::timeout(Duration::from_millis(30), lines.next_line()).await {
                Ok(l) => l,
                Err(_) => {
                    flush(&mut pending);
                    continue;
                }
            }
        } else {
            lines.next_line().await
        };
        let Ok(Some(l)) = next else { break };
        let Ok(line) = serde_json::from_str::<ExecLine>(&l) else {
            tracing::debug!("job output: {l}");
            continue;
        };
        if let ExecLine::Token { id, text } = &line {
            let p = pending.get_or_insert_with(|| (vec![], String::new()));
            p.0.push(*id);
            p.1.push_str(text);
            continue;
        }
        flush(&mut pending);
        let _ = tx.send(Internal::Child {
            task: task.clone(),
            line,
        });
    }
    flush(&mut pending);
}

impl Daemon {
    fn on_started(&mut self, id: &str, res: Result<ChildKill, String>) {
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
                if self.work.running.as_deref() == Some(id) {
                    self.work.running = None;
                }
                self.fail_task(id, format!("starting the job: {e}"));
                self.start_next();
            }
        }
    }

    fn on_child_line(&mut self, id: &str, line: ExecLine) {
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
        }
    }

    /// Reads a checkpoint the job wrote, off the event loop (the child has finished writing it:
    /// trainer_state.json comes last), to stream it back.
    fn read_checkpoint_for(&self, id: &str, step: usize, dir: String) {
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
    fn cap_retained(&mut self) {
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

    fn on_child_exit(&mut self, id: &str, ok: bool, stderr_tail: String) {
        if self.work.running.as_deref() == Some(id) {
            self.work.running = None;
        }
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
    fn end_task(&mut self, id: &str, outcome: Outcome) {
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
        if self.work.running.as_deref() == Some(id) {
            self.work.running = None;
        }
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
    fn fail_task(&mut self, id: &str, reason: String) {
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

    fn cancel_task(&mut self, id: &str, why: &str) {
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
    fn deliver(&mut self, id: &str, update: Update) {
        match self.work.tasks.get(id).map(|t| t.submitter) {
            Some(Some(_)) => self.send_update(id, update),
            Some(None) => self.deliver_local(id, update),
            None => {}
        }
    }

    fn deliver_local(&mut self, id: &str, update: Update) {
        let Some(job_id) = parse_job_id(id) else { return };
        let me = self.me;
        if let UpdateAck::Stop { .. } = self.on_sub_update(me, job_id, update) {
            self.cancel_task(id, "the submitter stopped waiting");
        }
    }

    fn send_update(&mut self, id: &str, update: Update) {
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
                        let env = Envelope::seal(
                            &self.work.signing,
                            kind,
                            t.job_id,
                            k,
                            now_unix(),
                            ENVELOPE_TTL,
                            random::<16>(),
                            b,
                        );
                        let rid = self.swarm.behaviour_mut().update.inner.send_request(&sub, Ok(env));
                        self.work.done_requests.insert(rid, (id.to_string(), Sent::Result));
                    }
                }
                return;
            }
        };
        let env = Envelope::seal(
            &self.work.signing,
            kind,
            t.job_id,
            k,
            now_unix(),
            ENVELOPE_TTL,
            random::<16>(),
            bytes,
        );
        let rid = self.swarm.behaviour_mut().update.inner.send_request(&sub, Ok(env));
        self.work.done_requests.insert(rid, (id.to_string(), sent));
    }

    /// A checkpoint whose delivery failed while the submitter was away: read again and resent (only the
    /// newest; the job may have written newer ones since, which supersede it).
    fn resend_unsent_checkpoint(&mut self, id: &str) {
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

    pub(super) fn on_update_event(&mut self, e: rr::Event<Inbound<Envelope>, Inbound<UpdateAck>>) {
        match e {
            rr::Event::Message {
                peer,
                message: rr::Message::Request { request, channel, .. },
                ..
            } => {
                let ack = match request {
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
                let _ = self.swarm.behaviour_mut().update.inner.send_response(channel, Ok(ack));
            }
            rr::Event::Message {
                message: rr::Message::Response { request_id, response },
                ..
            } => {
                let Some((id, sent)) = self.work.done_requests.remove(&request_id) else {
                    return;
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
            rr::Event::OutboundFailure { request_id, error, .. } => {
                if let Some((id, sent)) = self.work.done_requests.remove(&request_id) {
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
                }
            }
            _ => {}
        }
    }
}
