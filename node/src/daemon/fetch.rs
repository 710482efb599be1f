//! A worker pulls the models and adapters a job needs from its submitter, by content hash, in verified
//! chunks over `/bitnode/model/1`; a submitter serves them only to the device running its job.
use super::*;
#[allow(unused_imports)]
use super::{child::*, jobs::*, submitter::*, worker::*};

/// Model chunks requested at once from a submitter.
pub(super) const CHUNKS_IN_FLIGHT: usize = 4;

/// Failed chunk requests tolerated in one transfer (they are retried every second: a broken connection
/// has about this many seconds to come back before the job fails).
pub(super) const MAX_CHUNK_FAILURES: u32 = 60;

/// A model request that failed, to be sent again at the next tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Retry {
    /// The manifest (or a wait for another job's download of the same model).
    Manifest,
    /// A chunk: file, index.
    Chunk(u32, u32),
}

impl JobManager {
    pub(super) fn fetch_next(&mut self, id: &str) {
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
                failed.push(Retry::Manifest);
                return;
            }
        }
        match missing.first().cloned() {
            Some(h) => {
                tracing::info!(job = %id, model = %h, "fetching a model from the submitter");
                self.ask_model(id, sub, ModelRequest::Manifest { hash: h });
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

    pub(super) fn request_chunk(&mut self, id: &str, file: u32, index: u32) {
        let Some(t) = self.work.tasks.get_mut(id) else { return };
        let Some(sub) = t.submitter else { return };
        let TaskState::Fetching { missing, in_flight, .. } = &mut t.state else {
            return;
        };
        let Some(hash) = missing.first().cloned() else { return };
        in_flight.insert((file, index));
        self.ask_model(id, sub, ModelRequest::Chunk { hash, file, index });
    }

    fn ask_model(&self, id: &str, sub: PeerId, req: ModelRequest) {
        let task = id.to_string();
        let sent = req.clone();
        self.net.request(
            |reply| NetCommand::RequestModel { peer: sub, req, reply },
            &self.work.internal,
            move |answer| Internal::ModelAnswered {
                task,
                req: sent,
                answer,
            },
        );
    }

    /// Keeps up to [`CHUNKS_IN_FLIGHT`] chunk requests going; finishes the download when all are in.
    pub(super) fn pump_chunks(&mut self, id: &str) {
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
        let retrying = failed.iter().filter_map(|r| match r {
            Retry::Chunk(f, i) => Some((*f, *i)),
            Retry::Manifest => None,
        });
        let busy: HashSet<(u32, u32)> = in_flight.iter().copied().chain(retrying).collect();
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

    /// The device running one of our jobs asks for a model.
    pub(super) fn on_model_asked(
        &mut self,
        peer: PeerId,
        req: Inbound<ModelRequest>,
        ch: rr::ResponseChannel<Inbound<ModelResponse>>,
    ) {
        let resp = match req {
            Ok(req) => self.serve_model(peer, &req),
            Err(why) => ModelResponse::Refused { reason: why },
        };
        self.net.send(NetCommand::AnswerModel(ch, resp));
    }

    /// The submitter's answer to a model request of task `id`.
    pub(super) fn on_model_answered(&mut self, id: String, req: ModelRequest, answer: Option<Answer<ModelResponse>>) {
        let error = match answer {
            Some(Ok(Ok(r))) => return self.model_response(&id, req, r),
            Some(Ok(Err(why))) => {
                return self.fail_task(&id, format!("the submitter sent a malformed model message: {why}"))
            }
            Some(Err(error)) => error,
            None => return,
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
            .is_some_and(|p| !self.connected(&p));
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
                        failed.push(Retry::Chunk(file, index));
                    }
                    // The manifest is asked again by the next fetch round.
                    ModelRequest::Manifest { .. } => failed.push(Retry::Manifest),
                }
            }
        }
        if give_up {
            self.fail_task(&id, format!("the model transfer from the submitter broke off: {error}"));
        }
    }

    /// The submitter side of a model transfer: only to a paired peer that holds one of our jobs that needs
    /// exactly this model.
    pub(super) fn serve_model(&mut self, peer: PeerId, req: &ModelRequest) -> ModelResponse {
        let hash = match req {
            ModelRequest::Manifest { hash } | ModelRequest::Chunk { hash, .. } => hash,
        };
        let allowed = self.is_trusted(&peer)
            && self
                .work
                .subs
                .values()
                .any(|s| s.phase.worker() == Some(peer) && s.spec.inputs().contains(&hash.as_str()));
        if !allowed {
            tracing::warn!(%peer, "model request refused: no job of ours on that device needs {hash}");
            return ModelResponse::Refused {
                reason: "no job of this device that you run needs that model".into(),
            };
        }
        crate::transfer::serve(&self.work.store, req)
    }

    pub(super) fn model_response(&mut self, id: &str, req: ModelRequest, resp: ModelResponse) {
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
}
