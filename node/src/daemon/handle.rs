//! The typed messages between the daemon's two actors, in the manner of rust-libp2p's file-sharing
//! example:
//! - the **network actor** (`daemon.rs`, `peers.rs`, `requests.rs`) alone owns the `Swarm`, the peers,
//!   pairing, the trust list and this node's capabilities;
//! - the **job manager** (`jobs.rs`, `submitter.rs`, `worker.rs`, `fetch.rs`) alone owns the jobs: the job
//!   table, submissions, tasks and their processes.
//!
//! The job manager holds a [`NetHandle`], a cloneable sender of [`NetCommand`]s: requests to peers (each
//! with a oneshot for its answer), answers to peers' requests (with the libp2p response channel it was
//! handed), and its load for the capability advert. The network actor hands the job manager what peers
//! ask of it ([`super::jobs::Internal`]'s inbound variants) and publishes a [`MeshView`] (who is connected,
//! how, with what capabilities) on a `watch` channel that the scheduler and the failover rules read.
//!
//! Both mailboxes are unbounded, and that is safe: every message is either one that a libp2p
//! request-response behaviour already admitted (its concurrent-stream limit per connection bounds those)
//! or a step of a job this node holds. Control clients, which anybody on the machine can open, come in
//! through the bounded control channels instead.
use super::jobs::Internal;
use super::*;
use libp2p::request_response::ResponseChannel;

/// What a request to a peer came to: its answer (or why the answer could not be decoded), or the reason
/// no answer came.
pub(super) type Answer<T> = Result<Inbound<T>, rr::OutboundFailure>;

pub(super) enum NetCommand {
    /// A job envelope for `peer`; its acknowledgement comes back on `reply`.
    SendJob {
        peer: PeerId,
        env: Envelope,
        reply: oneshot::Sender<Answer<JobAck>>,
    },
    /// An update or result envelope for the submitter `peer`.
    SendUpdate {
        peer: PeerId,
        env: Envelope,
        reply: oneshot::Sender<Answer<UpdateAck>>,
    },
    /// A model manifest or chunk asked of the submitter `peer`.
    RequestModel {
        peer: PeerId,
        req: ModelRequest,
        reply: oneshot::Sender<Answer<ModelResponse>>,
    },
    AnswerJob(ResponseChannel<Inbound<JobAck>>, JobAck),
    AnswerUpdate(ResponseChannel<Inbound<UpdateAck>>, UpdateAck),
    AnswerModel(ResponseChannel<Inbound<ModelResponse>>, ModelResponse),
    /// The job manager's load changed; it goes into the capability advert.
    Load(JobLoad),
    /// A capability re-measurement ended (None: it failed, or the device disagreed with the CPU twin).
    Measured(Option<f64>),
}

/// What the capability advert and the network's own decisions need to know of the jobs.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct JobLoad {
    /// Jobs queued, fetching or running here.
    pub(super) queue_len: u32,
    /// The models in the store (advertised, so the scheduler can prefer a device that has them).
    pub(super) models: Vec<String>,
    /// The engines the engine host holds loaded (advertised, so the scheduler can prefer a device that
    /// pays no load), most recently used first.
    pub(super) warm: Vec<WarmEngine>,
    /// A job process runs (or starts) here: no capability re-measurement now.
    pub(super) busy: bool,
    /// Peers a live job is exchanged with: a hole-punch retry, which closes the relayed connection,
    /// waits for them.
    pub(super) job_peers: HashSet<PeerId>,
    /// Bytes the warm engines hold: taken off the memory the advert offers.
    pub(super) warm_bytes: u64,
}

/// The cloneable handle through which the job manager reaches the network.
#[derive(Clone)]
pub(super) struct NetHandle {
    tx: mpsc::UnboundedSender<NetCommand>,
}

impl NetHandle {
    pub(super) fn new() -> (NetHandle, mpsc::UnboundedReceiver<NetCommand>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (NetHandle { tx }, rx)
    }

    /// Sends a command; after the network actor stopped (the daemon is shutting down) it goes nowhere,
    /// and every reply channel in it closes, which the waiting side reads as a failure.
    pub(super) fn send(&self, c: NetCommand) {
        let _ = self.tx.send(c);
    }

    /// Sends a request built around a reply channel, and hands its answer (None: the network actor went
    /// away first) to the job manager's mailbox as the message `then` makes of it. A task per request
    /// waits for the answer, so the job manager never blocks on the network.
    pub(super) fn request<T: Send + 'static>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> NetCommand,
        jobs: &mpsc::UnboundedSender<Internal>,
        then: impl FnOnce(Option<T>) -> Internal + Send + 'static,
    ) {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply));
        let jobs = jobs.clone();
        tokio::spawn(async move {
            let _ = jobs.send(then(rx.await.ok()));
        });
    }
}

/// One peer as the job manager sees it.
#[derive(Debug, Clone, Default)]
pub(super) struct PeerView {
    /// Paired, and mutually connected (see `PeerState::connected`).
    pub(super) connected: bool,
    /// Over at least one direct (not relayed) connection.
    pub(super) direct: bool,
    /// The capabilities it advertised.
    pub(super) caps: Option<Capabilities>,
    /// For each identified relayed connection: the relay, and the bytes per connection it advertises.
    pub(super) relays: Vec<(Option<PeerId>, Option<u64>)>,
}

/// The mesh as the network actor last saw it: this node's capabilities, its connected peers, and the
/// names of the paired ones.
#[derive(Debug, Clone, Default)]
pub(super) struct MeshView {
    pub(super) caps: Capabilities,
    pub(super) peers: HashMap<PeerId, PeerView>,
    pub(super) names: HashMap<PeerId, String>,
}

impl MeshView {
    pub(super) fn connected(&self, p: &PeerId) -> bool {
        self.peers.get(p).is_some_and(|s| s.connected)
    }

    /// Whether a connected paired peer advertises model (or adapter) `hash`.
    pub(super) fn held_by_a_peer(&self, hash: &str) -> bool {
        self.peers
            .values()
            .any(|p| p.connected && p.caps.as_ref().is_some_and(|c| c.models.iter().any(|m| m == hash)))
    }

    /// A peer id, or the name of exactly one paired peer (as `TrustList::resolve`).
    pub(super) fn resolve(&self, who: &str) -> Option<PeerId> {
        if let Ok(id) = who.parse::<PeerId>() {
            return Some(id);
        }
        let hits: Vec<&PeerId> = self.names.iter().filter(|(_, n)| *n == who).map(|(p, _)| p).collect();
        match hits.as_slice() {
            [one] => Some(**one),
            _ => None,
        }
    }
}

/// Routes a request-response event of a job protocol: an answer or a failure goes to the oneshot its
/// request was sent with; an inbound request is returned for the job manager.
pub(super) fn route<Req, Resp>(
    pending: &mut HashMap<OutboundRequestId, oneshot::Sender<Answer<Resp>>>,
    e: rr::Event<Inbound<Req>, Inbound<Resp>>,
    what: &str,
) -> Option<(PeerId, Inbound<Req>, ResponseChannel<Inbound<Resp>>)> {
    match e {
        rr::Event::Message {
            peer,
            message: rr::Message::Request { request, channel, .. },
            ..
        } => return Some((peer, request, channel)),
        rr::Event::Message {
            message: rr::Message::Response { request_id, response },
            ..
        } => {
            if let Some(r) = pending.remove(&request_id) {
                let _ = r.send(Ok(response));
            }
        }
        rr::Event::OutboundFailure { request_id, error, .. } => {
            if let Some(r) = pending.remove(&request_id) {
                let _ = r.send(Err(error));
            }
        }
        rr::Event::InboundFailure { peer, error, .. } => {
            tracing::debug!(%peer, "{what} message failed: {error}");
        }
        rr::Event::ResponseSent { .. } => {}
    }
    None
}

/// The reply channels of requests in flight, by protocol, and the job and update requests waiting for a
/// stream.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) job: HashMap<OutboundRequestId, oneshot::Sender<Answer<JobAck>>>,
    pub(super) update: HashMap<OutboundRequestId, oneshot::Sender<Answer<UpdateAck>>>,
    pub(super) model: HashMap<OutboundRequestId, oneshot::Sender<Answer<ModelResponse>>>,
    pub(super) job_out: Throttle<(Envelope, oneshot::Sender<Answer<JobAck>>)>,
    pub(super) update_out: Throttle<(Envelope, oneshot::Sender<Answer<UpdateAck>>)>,
}

/// The request a protocol event answers (a response, or the failure to get one), if it is one of ours.
pub(super) fn answered<Req, Resp>(e: &rr::Event<Req, Resp>) -> Option<OutboundRequestId> {
    match e {
        rr::Event::Message {
            message: rr::Message::Response { request_id, .. },
            ..
        }
        | rr::Event::OutboundFailure { request_id, .. } => Some(*request_id),
        _ => None,
    }
}

/// Requests of one protocol, at most `limit` in flight to each peer. A request-response handler fails
/// every stream past its `max_concurrent_streams` at once ("max sub-streams reached"), so a burst (16
/// chat requests delegated together, and their token updates) would lose most of its jobs; the excess
/// waits here in order instead, and goes as earlier answers come back.
pub(super) struct Throttle<T, K = OutboundRequestId> {
    /// The requests in flight, by id, and their peers (a few per peer: counted when needed).
    in_flight: HashMap<K, PeerId>,
    waiting: HashMap<PeerId, std::collections::VecDeque<T>>,
}

impl<T, K> Default for Throttle<T, K> {
    fn default() -> Self {
        Throttle {
            in_flight: HashMap::new(),
            waiting: HashMap::new(),
        }
    }
}

impl<T, K: std::hash::Hash + Eq> Throttle<T, K> {
    /// `item` for `peer`: back to send now (then [`Throttle::sent`]), or None when it waits its turn.
    pub(super) fn admit(&mut self, peer: PeerId, item: T, limit: usize) -> Option<T> {
        if self.in_flight.values().filter(|p| **p == peer).count() < limit {
            return Some(item);
        }
        self.waiting.entry(peer).or_default().push_back(item);
        None
    }

    pub(super) fn sent(&mut self, peer: PeerId, rid: K) {
        self.in_flight.insert(rid, peer);
    }

    /// Request `rid` was answered (or failed): the next waiting request to its peer, to send now.
    pub(super) fn done(&mut self, rid: K) -> Option<(PeerId, T)> {
        let peer = self.in_flight.remove(&rid)?;
        let q = self.waiting.get_mut(&peer)?;
        let next = q.pop_front();
        if q.is_empty() {
            self.waiting.remove(&peer);
        }
        next.map(|n| (peer, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_holds_the_excess_per_peer_and_releases_it_in_order() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut t: Throttle<&str, u32> = Throttle::default();
        // Two in flight to a: the third and fourth wait; b has its own allowance.
        assert_eq!(t.admit(a, "a1", 2), Some("a1"));
        t.sent(a, 1);
        assert_eq!(t.admit(a, "a2", 2), Some("a2"));
        t.sent(a, 2);
        assert_eq!(t.admit(a, "a3", 2), None);
        assert_eq!(t.admit(a, "a4", 2), None);
        assert_eq!(t.admit(b, "b1", 2), Some("b1"));
        t.sent(b, 3);
        // An answer to a releases a's next, in order; b's answer releases nothing (nothing waits).
        assert_eq!(t.done(2), Some((a, "a3")));
        t.sent(a, 4);
        assert_eq!(t.done(3), None);
        assert_eq!(t.done(1), Some((a, "a4")));
        t.sent(a, 5);
        // An unknown id changes nothing; once all are answered a new request goes at once.
        assert_eq!(t.done(99), None);
        assert_eq!(t.done(4), None);
        assert_eq!(t.done(5), None);
        assert_eq!(t.admit(a, "a5", 2), Some("a5"));
    }
}
