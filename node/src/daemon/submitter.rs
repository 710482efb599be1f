//! The submitter's half of a job (see `jobs.rs`): submission, placement by the scheduler, failover (its
//! rules and the job's phase: `failover.rs`), the worker's updates, and the end of the job. Taking jobs up
//! again after a restart is `resume.rs`.
use super::failover::{Heard, Phase};
use super::*;
#[allow(unused_imports)]
use super::{child::*, fetch::*, jobs::*, worker::*};

/// A submission whose dataset and resume checkpoint were being read off the event loop.
pub(super) struct PendingSubmit {
    pub(super) job_id: [u8; 16],
    pub(super) spec: JobSpec,
    pub(super) absent: Vec<String>,
    pub(super) need: Need,
    pub(super) target: Target,
    pub(super) out: Option<PathBuf>,
    pub(super) detach: bool,
    pub(super) cancel_on_disconnect: bool,
    pub(super) reply: oneshot::Sender<Response>,
    pub(super) events: Option<mpsc::Sender<Event>>,
    /// The checkpoint to start from (`--resume`), or why the inputs could not be read.
    pub(super) res: Result<Option<(u64, Bundle)>, String>,
}

/// Reads a submission's dataset into its spec and the checkpoint it resumes from, within the limits.
pub(super) fn load_inputs(
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

/// The job's models and adapters that this device's store does not hold.
pub(super) fn absent_inputs(store: &Store, spec: &JobSpec) -> anyhow::Result<Vec<String>> {
    let mut absent = vec![];
    for h in spec.inputs() {
        if store.resolve(h)?.is_none() {
            absent.push(h.to_string());
        }
    }
    Ok(absent)
}

/// A job this node submitted.
pub(super) struct Sub {
    pub(super) job_id: [u8; 16],
    pub(super) spec: JobSpec,
    pub(super) need: Need,
    pub(super) target: Target,
    pub(super) out: Option<PathBuf>,
    /// Its models (or adapters) that this device does not hold: a peer advertised them. Only a device
    /// that holds them can run the job, since nobody can send them.
    pub(super) absent: Vec<String>,
    /// Where it stands, and with which device (this node's own id for a local run): `failover.rs`.
    pub(super) phase: Phase,
    pub(super) tried: Vec<PeerId>,
    pub(super) attempt: u32,
    pub(super) checkpoint: Option<(u64, Bundle)>,
    pub(super) progress: Option<api::Progress>,
    /// Clients following the job (bounded channels; one that falls behind is dropped).
    pub(super) watchers: Vec<mpsc::Sender<Event>>,
    /// An HTTP API request: cancelled once every client waiting for it has gone (a `bitnode submit`
    /// that goes away leaves its job running, to be followed again).
    pub(super) cancel_on_disconnect: bool,
    pub(super) finals: Vec<oneshot::Sender<Response>>,
}

/// Hands `ev` to every client following a job. A client whose backlog is full has stopped reading: it
/// is dropped here (its connection task then times out its write and closes), so a stalled terminal costs
/// the daemon at most [`control::MAX_EVENT_BACKLOG`] events. A closed one simply went away.
pub(super) fn send_to_watchers(watchers: &mut Vec<mpsc::Sender<Event>>, ev: &Event) {
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

impl JobManager {
    /// Whether a model of `bytes` can travel between us and `peer`: over a direct connection always; over
    /// a relayed one only when the relay advertises a per-connection limit that holds it.
    pub(super) fn model_route(&self, peer: &PeerId, bytes: u64) -> Result<(), String> {
        let mesh = self.mesh.borrow();
        let Some(st) = mesh.peers.get(peer) else {
            return Err("not connected".into());
        };
        if st.direct {
            return Ok(());
        }
        // Any relayed connection whose relay holds the model will do; else say why the first cannot.
        let mut why = None;
        for (relay, limit) in &st.relays {
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
        cancel_on_disconnect: bool,
        reply: oneshot::Sender<Response>,
        events: Option<mpsc::Sender<Event>>,
    ) {
        let fail = |reply: oneshot::Sender<Response>, e: String| {
            let _ = reply.send(Response::err(e));
        };
        let absent = match absent_inputs(&self.work.store, &spec) {
            Ok(a) => a,
            Err(e) => return fail(reply, format!("{e:#}")),
        };
        // A model this device lacks runs where a connected peer holds it (the scheduler sees which).
        if let Some(h) = absent.iter().find(|h| !self.mesh.borrow().held_by_a_peer(h)) {
            return fail(
                reply,
                format!("model {h} is not in this node's store, and no connected peer advertises it"),
            );
        }
        let target = match to {
            "" | "auto" => Target::Auto,
            "local" => Target::Local,
            who => match self.mesh.borrow().resolve(who) {
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
                    // A request that ends with its client has nobody to resume it for.
                    if cancel_on_disconnect {
                        return Ok(c);
                    }
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
                absent,
                need,
                target,
                out,
                detach,
                cancel_on_disconnect,
                reply,
                events,
                res,
            })));
        });
    }

    /// The second half of [`Daemon::submit`], once the job's inputs are read.
    pub(super) fn submit_loaded(&mut self, p: PendingSubmit) {
        let PendingSubmit {
            job_id,
            spec,
            absent,
            need,
            target,
            out,
            detach,
            cancel_on_disconnect,
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
            absent,
            phase: Phase::Unplaced,
            tried: vec![],
            attempt: 0,
            checkpoint,
            progress: None,
            watchers: vec![],
            cancel_on_disconnect,
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

    pub(super) fn candidates(&self, sub: &Sub) -> Vec<Candidate> {
        let mut out = vec![];
        let mesh = self.mesh.borrow().clone();
        let mut mine = mesh.caps.clone();
        mine.queue_len = self.work.queue_len();
        let local = Candidate {
            id: self.me.to_base58(),
            name: format!("{} (this device)", self.name),
            link: Link::Local,
            caps: mine,
            has_model: sub.absent.is_empty(),
            warm: self.work.is_warm(&sub.spec),
            // The owner asked on this device: it may always run its own jobs.
            battery_allowed: true,
            no_model_route: sub
                .absent
                .first()
                .map(|h| format!("it does not hold model {h} (a peer does)")),
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
        for (p, st) in &mesh.peers {
            if !st.connected || sub.tried.contains(p) {
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
            } else if let Some(h) = sub.absent.iter().find(|h| !caps.models.contains(h)) {
                Some(format!("neither it nor this device holds model {h}"))
            } else {
                self.model_route(p, sub.need.model_bytes).err()
            };
            let warm = match &sub.spec {
                JobSpec::Infer(r) => caps.warm.iter().any(|w| w.model == r.model && w.adapter == r.adapter),
                _ => false,
            };
            out.push(Candidate {
                id: p.to_base58(),
                name: self.peer_name(p),
                link: if st.direct { Link::Direct } else { Link::Relayed },
                battery_allowed: caps.jobs_on_battery,
                caps,
                has_model,
                warm,
                no_model_route,
            });
        }
        out
    }

    /// Ranks the candidates not yet tried and sends the job to the best; `why` is the reason of the move
    /// when this is a failover. Ends the job failed when nobody is left.
    pub(super) fn place(&mut self, id: &str, why: Option<String>) {
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
        sub.phase = Phase::Offered {
            worker: best,
            disconnected_since: None,
        };
        sub.tried.push(best);
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
                s.phase.accept(best, Instant::now());
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
        let env = self.seal(Kind::Job, job_id, target_key, bytes);
        let job = id.to_string();
        self.net.request(
            |reply| NetCommand::SendJob { peer: best, env, reply },
            &self.work.internal,
            move |answer| Internal::JobAnswered {
                job,
                worker: best,
                answer,
            },
        );
    }

    /// The device running job `id` refused it, failed to take it, or went away.
    pub(super) fn attempt_failed(&mut self, id: &str, worker: PeerId, reason: String) {
        let name = self.peer_name(&worker);
        let line = format!("{name} ({worker}): {reason}");
        tracing::warn!(job = %id, "attempt failed on {line}");
        self.update_job(id, |j| j.attempts.push(line.clone()));
        let Some(sub) = self.work.subs.get_mut(id) else { return };
        if sub.phase.worker() != Some(worker) {
            return;
        }
        sub.phase = Phase::Unplaced;
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

    pub(super) fn emit(&mut self, id: &str, ev: Event) {
        if let Some(s) = self.work.subs.get_mut(id) {
            send_to_watchers(&mut s.watchers, &ev);
        }
    }

    /// An API request whose clients have all gone (the HTTP client disconnected) is cancelled on whichever
    /// device runs it. Checked every tick rather than where an event finds a closed channel: cancelling
    /// ends the job, which the code that emitted the event may not expect.
    pub(super) fn cancel_if_abandoned(&mut self, id: &str) {
        let abandoned = self.work.subs.get(id).is_some_and(|s| {
            s.cancel_on_disconnect
                && !s.phase.finishing()
                && s.watchers.iter().all(|w| w.is_closed())
                && s.finals.iter().all(|f| f.is_closed())
        });
        if abandoned {
            tracing::info!(job = %id, "the API client went away: cancelling its request");
            self.cancel_job(id);
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
    pub(super) fn finish_sub(
        &mut self,
        id: &str,
        state: State,
        reason: Option<String>,
        result: Option<serde_json::Value>,
    ) {
        let worker = self.work.subs.get(id).and_then(|s| s.phase.worker());
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
            let dir = self.home.join("jobs").join(id);
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir));
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
    pub(super) fn on_sub_update(&mut self, worker: PeerId, job_id: [u8; 16], update: Update) -> UpdateAck {
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
        match sub.phase.heard(worker, Instant::now()) {
            Heard::Stranger => {
                return UpdateAck::Stop {
                    reason: "the job has moved to another device".into(),
                }
            }
            Heard::Reattached => {
                tracing::info!(job = %id, %worker, "the worker kept the job through this device's restart and reported back")
            }
            // A resent result (our acknowledgement was lost): it is already being written.
            Heard::Finishing => return UpdateAck::Ok,
            Heard::Live => {}
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

    pub(super) fn sub_done(&mut self, id: &str, worker: PeerId, outcome: Outcome) {
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
                sub.phase = Phase::Finishing { worker };
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
            let worker = sub.phase.worker();
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

    pub(super) fn send_cancel(&mut self, worker: PeerId, job_id: [u8; 16]) {
        let Some(k) = peer_key(&worker) else { return };
        let env = self.seal(Kind::Cancel, job_id, k, vec![]);
        // Its answer changes nothing: a cancel is best effort, and the job's state has already moved on.
        let (reply, _) = oneshot::channel();
        self.net.send(NetCommand::SendJob {
            peer: worker,
            env,
            reply,
        });
    }

    pub(super) fn jobs_list(&self) -> Vec<api::JobView> {
        self.work
            .table
            .jobs
            .iter()
            .rev()
            .take(200)
            .map(|j| self.job_view(&j.id))
            .collect()
    }
}
