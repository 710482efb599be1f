//! `bitnode start`: the daemon, as a few actors with typed messages (see `daemon/handle.rs`):
//! - the network actor (this file, `peers.rs`, `requests.rs`): one tokio task that alone owns the libp2p
//!   swarm, the peers, pairing (a state machine without I/O, `crate::pairing`), the trust list and the
//!   capability advert (`crate::caps`);
//! - the job manager (`jobs.rs` and the files it names): one tokio task that alone owns the jobs;
//! - the store actor (`crate::store`): a thread that does the state files' writes;
//! - the control server (`control_server.rs`): a task per local client, which routes each request to the
//!   actor that owns its answer, over bounded channels, and gets the answer back on a oneshot.
//!
//! Nothing but the network actor touches the swarm, so there are no locks around it; the only shared state
//! is the admission set the connection gate reads (and the job manager checks envelope signers against).
use crate::api::{self, ConnectionKind, Event, PeerInfo, Request, Response};
use crate::caps;
use crate::config::Config;
use crate::control;
use crate::net::{
    self, is_relayed, lock, Admission, BehaviourEvent, Inbound, NetOptions, RelayLimits, SharedAdmission, JOB_STREAMS,
    UPDATE_STREAMS,
};
use crate::pairing::{Effect as PairEffect, Pairing};
use crate::trust::{now_unix, TrustList};
use anyhow::{bail, Context};
use bitnode_protocol::mesh::{Capabilities, CapsAck, CapsAdvert, PairRequest, PairResponse};
use bitnode_protocol::wire::check_name;
use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{identify, ping, relay, request_response as rr, Multiaddr, PeerId, Swarm};
use rand::RngCore;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
// What the job files (daemon/jobs.rs, submitter.rs, worker.rs, fetch.rs) use, through `use super::*`.
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
use bitnode_protocol::mesh::{WarmEngine, MAX_ADVERTISED_MODELS, MAX_ADVERTISED_WARM};
use bitnode_protocol::wire;
use ed25519_dalek::SigningKey;
#[allow(unused_imports)]
use engine_host::EngineHost;
#[allow(unused_imports)]
use handle::{Answer, JobLoad, MeshView, NetCommand, NetHandle, PeerView};
use libp2p::request_response::OutboundRequestId;
use std::collections::VecDeque;
use tokio::sync::watch;

mod child;
mod control_server;
mod engine_host;
mod failover;
mod fetch;
mod handle;
mod http;
mod jobs;
mod peers;
mod requests;
mod resume;
mod submitter;
mod warm;
mod worker;

pub struct StartOptions {
    /// Replaces `[network] listen` when not empty.
    pub listen: Vec<String>,
    /// Forces `[relay] enabled`.
    pub relay_server: bool,
    /// Forces `[jobs] accept_remote = false` (a relay that should only relay).
    pub no_remote_jobs: bool,
    /// Replaces `[api] listen`.
    pub api_listen: Option<String>,
}

/// Capability re-check period (battery, AC, queue); a change is pushed to connected peers.
const CAPS_REFRESH: Duration = Duration::from_secs(10);
/// Extra hole-punch rounds after a failed one, and the wait before each (times the round number).
const MAX_PUNCH_ROUNDS: u32 = 3;
const PUNCH_RETRY: Duration = Duration::from_secs(5);

struct Conn {
    addr: Multiaddr,
    relayed: bool,
    /// The relay a relayed connection goes through (from the circuit address on either end).
    relay: Option<PeerId>,
    rtt: Option<Duration>,
    /// The peer answered identify on this connection. A connection the other side's gate refuses is
    /// established for a moment and then closed; only an identified one counts as connected.
    identified: bool,
    /// We dialed it, so `addr` is where the peer listens (an inbound connection's address is an ephemeral
    /// port).
    dialer: bool,
}

#[derive(Default)]
struct PeerState {
    conns: HashMap<ConnectionId, Conn>,
    /// Listen addresses the peer reported (identify); recorded in the trust list once it is paired.
    listen_addrs: Vec<Multiaddr>,
    /// The peer serves as a relay (identify lists the hop protocol).
    relay_hop: bool,
    /// The capability exchange with it (a state machine without I/O: `crate::caps::Exchange`).
    caps: caps::Exchange,
    /// Redial schedule while disconnected.
    next_dial: Option<Instant>,
    /// A failed hole punch is tried again on a fresh relayed connection (hole punching is timing-sensitive;
    /// a second round often succeeds where the first did not): when, and how many rounds so far.
    punch_retry_at: Option<Instant>,
    punch_rounds: u32,
    backoff: u32,
}

impl PeerState {
    fn connected(&self) -> bool {
        self.caps.mutual() && self.conns.values().any(|c| c.identified)
    }
    fn direct(&self) -> bool {
        self.conns.values().any(|c| c.identified && !c.relayed)
    }
    fn rtt(&self) -> Option<Duration> {
        let d = self.direct();
        self.conns
            .values()
            .filter(|c| c.identified && c.relayed != d)
            .filter_map(|c| c.rtt)
            .min()
    }
}

struct Ctl {
    req: Request,
    reply: oneshot::Sender<Response>,
    /// Events streamed to the client before the reply (`bitnode submit` without --detach). Bounded: a
    /// client that stops reading is dropped once it is [`control::MAX_EVENT_BACKLOG`] events behind.
    events: mpsc::Sender<Event>,
}

pub struct Daemon {
    swarm: Swarm<net::Behaviour>,
    home: PathBuf,
    cfg: Config,
    name: String,
    me: PeerId,
    admission: SharedAdmission,
    trust: TrustList,
    peers: HashMap<PeerId, PeerState>,
    /// Invites, handshakes and joins (a state machine without I/O: crate::pairing).
    pairing: Pairing,
    /// `bitnode pair join`s waiting for their handshake to end.
    join_replies: HashMap<PeerId, oneshot::Sender<Response>>,
    caps: Capabilities,
    /// (device, system) memory as probed and pinned; the advert offers it less the warm engines' share.
    memory: (Option<u64>, u64),
    advertised: Option<Capabilities>,
    relay_listeners: HashMap<PeerId, ListenerId>,
    listen_addrs: Vec<Multiaddr>,
    relay_server: bool,
    pnet: bool,
    started: Instant,
    stop: bool,
    /// The job manager's mailbox (what peers ask of it, and peers coming back).
    jobs: mpsc::UnboundedSender<jobs::Internal>,
    /// The reply channels of the job manager's requests in flight.
    pending: handle::Pending,
    /// The job manager's load, as it last reported it.
    load: JobLoad,
    /// The mesh as the job manager reads it; published after every event.
    view: watch::Sender<MeshView>,
    /// This actor's own mailbox, for the tasks it starts.
    net: NetHandle,
    /// Writes the job table and the trust list off the event loop.
    store: crate::store::StateWriter,
    /// Where the HTTP API listens (None: off).
    api_url: Option<String>,
    /// The ternary matmul rates measured so far (at start, then every `remeasure_secs`); the median is
    /// advertised, so no single unlucky sample decides the rank.
    scores: caps::ScoreWindow,
    /// When the rate was last measured, and whether a measurement runs now.
    measured_at: Instant,
    measuring: bool,
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

fn parse_psk(s: &str) -> anyhow::Result<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        bail!("[network] psk must be 64 hex characters (32 bytes)");
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).context("[network] psk must be hex")?;
    }
    Ok(out)
}

/// Appends `/p2p/<peer>` unless the address already ends with a peer id.
pub(crate) fn with_peer(a: &Multiaddr, peer: &PeerId) -> Multiaddr {
    match a.iter().last() {
        Some(Protocol::P2p(_)) => a.clone(),
        _ => a.clone().with(Protocol::P2p(*peer)),
    }
}

/// The peer id an address ends with, if any.
fn peer_of(a: &Multiaddr) -> Option<PeerId> {
    match a.iter().last() {
        Some(Protocol::P2p(p)) => Some(p),
        _ => None,
    }
}

fn is_loopback(a: &Multiaddr) -> bool {
    a.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// Loopback addresses only make sense to a peer on the same host: elsewhere they reach the dialer itself,
/// and one such "wrong peer" answer fails the whole concurrent dial.
fn drop_loopback_unless(addrs: Vec<Multiaddr>, keep: bool) -> Vec<Multiaddr> {
    if keep {
        addrs
    } else {
        addrs.into_iter().filter(|a| !is_loopback(a)).collect()
    }
}

fn dialable(a: &Multiaddr) -> bool {
    !a.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// Runs the daemon until SIGINT/SIGTERM or a `shutdown` request.
pub async fn run(home: &Path, opts: StartOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
    if !crate::identity::exists(home) {
        crate::init(home, None)?;
    }
    let key = crate::identity::load(home)?;
    let mut cfg = Config::load(home)?;
    if opts.no_remote_jobs {
        cfg.jobs.accept_remote = false;
    }
    let trust = TrustList::load(home)?;
    let sock = control::socket_path(home);
    if control::is_running(home) {
        bail!("a bitnode daemon is already running for {}", home.display());
    }
    // A socket file nobody answers on is left from a daemon that died; replace it.
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("binding the control socket {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;

    let name = cfg.node.name.clone().unwrap_or_else(crate::config::hostname);
    check_name(&name).map_err(|e| anyhow::anyhow!("[node] name: {e}"))?;
    let me = key.public().to_peer_id();
    let admission: SharedAdmission = Arc::new(Mutex::new(Admission {
        trusted: trust.ids().into_iter().collect(),
        ..Default::default()
    }));
    let relay_server = opts.relay_server || cfg.relay.enabled;
    let psk = cfg
        .network
        .psk
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(parse_psk)
        .transpose()?;
    let netopts = NetOptions {
        mdns: cfg.network.mdns,
        relay_server: relay_server.then(|| RelayLimits {
            max_circuit_duration: Duration::from_secs(cfg.relay.max_circuit_duration_secs),
            max_circuit_bytes: cfg.relay.max_circuit_bytes,
            max_reservations: cfg.relay.max_reservations,
            max_circuits: cfg.relay.max_circuits,
        }),
        psk,
        agent: format!("bitnode/{}", env!("CARGO_PKG_VERSION")),
        max_job_message: cfg.jobs.max_job_message(),
        max_update_message: cfg.jobs.max_update_message(),
    };
    let (itx, irx) = mpsc::unbounded_channel();
    let mut work = jobs::Work::new(home, &key, itx.clone())?;
    let mut swarm = net::build_swarm(key, admission.clone(), &netopts)?;
    let listen = if opts.listen.is_empty() {
        cfg.network.listen.clone()
    } else {
        opts.listen.clone()
    };
    for l in &listen {
        let a: Multiaddr = l.parse().with_context(|| format!("listen address {l:?}"))?;
        if psk.is_some() && a.iter().any(|p| matches!(p, Protocol::QuicV1 | Protocol::Udp(_))) {
            tracing::warn!(%a, "skipping a QUIC listen address: the pre-shared mesh key works over TCP only");
            continue;
        }
        swarm
            .listen_on(a.clone())
            .with_context(|| format!("listening on {a}"))?;
    }
    // Refused before anything starts when it would expose the mesh (a non-loopback address without a
    // token); off, with the reason logged, when the address is taken.
    let api_listener = http::bind(&cfg.api, opts.api_listen.as_deref()).await?;
    let api_addr = api_listener.as_ref().and_then(|l| l.local_addr().ok());
    let adapter = cfg.engine.adapter.clone().unwrap_or_else(|| "auto".into());
    let caps_cfg = cfg.capabilities.clone();
    // The probe blocks on the GPU for a few hundred milliseconds; keep it off the async workers.
    let caps = tokio::task::spawn_blocking(move || caps::probe(&adapter, &caps_cfg)).await?;
    tracing::info!(peer_id = %me, %name, score = caps.score, device = %caps.device, "bitnode daemon starting");
    if cfg.serve.warm_engines {
        let budget = match cfg.serve.memory_budget_bytes {
            0 => (caps.device_memory_bytes.unwrap_or(caps.system_memory_bytes) / 2).max(1 << 30),
            b => b,
        };
        let args = engine_host::HostArgs {
            budget,
            idle_secs: cfg.serve.idle_secs,
            max_batch: cfg.serve.max_batch.max(1),
        };
        work.host = Some(EngineHost::start(home, args, itx.clone()));
        // The host's limits, so the advert's warm engines follow its evictions.
        work.warm = Some(warm::WarmSet::new(
            budget,
            Duration::from_secs(cfg.serve.idle_secs.max(1)),
        ));
    }

    let cfg_name = name.clone();
    let (net, cmds) = NetHandle::new();
    let (view, mesh) = watch::channel(MeshView::default());
    let store = crate::store::StateWriter::start().context("starting the store thread")?;
    // The first advert already lists the store's models and the jobs taken up again.
    let load = JobLoad {
        queue_len: work.queue_len(),
        models: work.models(),
        ..Default::default()
    };
    let manager = jobs::JobManager {
        work,
        net: net.clone(),
        mesh,
        cfg: cfg.clone(),
        home: home.to_path_buf(),
        me,
        name: name.clone(),
        store: store.clone(),
        admission: admission.clone(),
        reported: Some(load.clone()),
        models: load.models.clone(),
    };
    let mut d = Daemon {
        swarm,
        home: home.to_path_buf(),
        cfg,
        name,
        me,
        admission,
        trust,
        peers: HashMap::new(),
        pairing: Pairing::new(me, cfg_name.clone()),
        join_replies: HashMap::new(),
        advertised: Some(caps.clone()),
        memory: (caps.device_memory_bytes, caps.system_memory_bytes),
        caps,
        relay_listeners: HashMap::new(),
        listen_addrs: vec![],
        relay_server,
        pnet: psk.is_some(),
        started: Instant::now(),
        stop: false,
        jobs: itx,
        pending: Default::default(),
        load,
        view,
        net,
        store,
        api_url: api_addr.map(|a| format!("http://{a}/v1")),
        scores: caps::ScoreWindow::default(),
        measured_at: Instant::now(),
        measuring: false,
    };
    if d.caps.ternary_gops > 0.0 && d.cfg.capabilities.ternary_gops.is_none() {
        d.scores.push(d.caps.ternary_gops);
    }
    d.refresh_job_caps();
    d.advertised = Some(d.caps.clone());
    d.publish();
    d.dial_bootstrap();
    let (tx, rx) = mpsc::channel::<Ctl>(64);
    let (jtx, jrx) = mpsc::channel::<Ctl>(64);
    let (stop_jobs, jobs_stopped) = oneshot::channel();
    let job_manager = tokio::spawn(manager.run(jrx, irx, jobs_stopped));
    let api_server = match (api_listener, api_addr) {
        (Some(l), Some(addr)) => {
            tracing::info!("OpenAI-compatible API on http://{addr}/v1");
            let api = http::Api {
                home: home.to_path_buf(),
                device: d.name.clone(),
                token: d.cfg.api.token.clone().filter(|t| !t.is_empty()),
                cors: d.cfg.api.cors_origins.clone(),
                loopback: addr.ip().is_loopback(),
                port: addr.port(),
                max_body: d.cfg.api.max_request_bytes,
                jobs: jtx.clone(),
                net: tx.clone(),
                sizing: Default::default(),
            };
            Some(tokio::spawn(http::serve(l, Arc::new(api))))
        }
        _ => None,
    };
    let acceptor = tokio::spawn(control_server::accept_loop(listener, tx, jtx));
    let res = d.event_loop(rx, cmds).await;
    // The job manager stops with the network: its job processes die with the daemon, and the submissions
    // recorded on disk are taken up again at the next start.
    let _ = stop_jobs.send(());
    let _ = job_manager.await;
    // Everything handed to the store actor reaches the disk before the daemon says it stopped.
    let store = d.store.clone();
    let _ = tokio::task::spawn_blocking(move || store.flush()).await;
    // Let in-flight control replies (the answer to `bitnode stop` among them) reach their clients.
    tokio::time::sleep(Duration::from_millis(100)).await;
    acceptor.abort();
    if let Some(a) = api_server {
        a.abort();
    }
    let _ = std::fs::remove_file(&sock);
    tracing::info!("bitnode daemon stopped");
    res
}

enum Wake {
    Swarm(Box<SwarmEvent<BehaviourEvent>>),
    Ctl(Ctl),
    Cmd(NetCommand),
    Tick,
    Stop(&'static str),
}
impl Daemon {
    async fn event_loop(
        &mut self,
        mut rx: mpsc::Receiver<Ctl>,
        mut cmds: mpsc::UnboundedReceiver<NetCommand>,
    ) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_caps = Instant::now();
        while !self.stop {
            let w = tokio::select! {
                ev = self.swarm.select_next_some() => Wake::Swarm(Box::new(ev)),
                Some(c) = rx.recv() => Wake::Ctl(c),
                Some(c) = cmds.recv() => Wake::Cmd(c),
                _ = tick.tick() => Wake::Tick,
                _ = sigint.recv() => Wake::Stop("SIGINT"),
                _ = sigterm.recv() => Wake::Stop("SIGTERM"),
            };
            match w {
                Wake::Swarm(ev) => self.on_swarm(*ev),
                Wake::Ctl(c) => self.on_control(c),
                Wake::Cmd(c) => self.on_command(c),
                Wake::Tick => {
                    self.on_tick();
                    if last_caps.elapsed() >= CAPS_REFRESH {
                        last_caps = Instant::now();
                        caps::refresh(&mut self.caps, &self.cfg.capabilities, self.load.queue_len);
                        self.refresh_job_caps();
                    }
                    self.remeasure_if_due();
                }
                Wake::Stop(sig) => {
                    tracing::info!("{sig}: shutting down");
                    self.stop = true;
                }
            }
            self.publish();
        }
        // Close connections so peers see us leave now rather than at their ping timeout.
        for p in self.peers.keys().copied().collect::<Vec<_>>() {
            let _ = self.swarm.disconnect_peer_id(p);
        }
        Ok(())
    }

    /// Hands the trust list to the store actor (written off the event loop).
    /// Every `[capabilities] remeasure_secs`, while no job runs here (it would compete with the
    /// measurement, and the measurement with it), the rate is measured again off the event loop.
    fn remeasure_if_due(&mut self) {
        let every = self.cfg.capabilities.remeasure_secs;
        if every == 0
            || self.measuring
            || self.measured_at.elapsed() < Duration::from_secs(every)
            || self.load.busy
            || self.cfg.capabilities.ternary_gops.is_some()
        {
            return;
        }
        self.measuring = true;
        let adapter = self.cfg.engine.adapter.clone().unwrap_or_else(|| "auto".into());
        let cfg = self.cfg.capabilities.clone();
        let net = self.net.clone();
        tokio::task::spawn_blocking(move || {
            net.send(NetCommand::Measured(caps::measure(&adapter, &cfg)));
        });
    }

    fn on_measured(&mut self, gops: Option<f64>) {
        self.measuring = false;
        self.measured_at = Instant::now();
        let Some(g) = gops else { return };
        self.scores.push(g);
        if let Some(v) = self.scores.value() {
            tracing::info!(sample = g, advertised = v, "capability re-measured");
            self.caps.ternary_gops = v;
            caps::refresh(&mut self.caps, &self.cfg.capabilities, self.load.queue_len);
            self.refresh_job_caps();
        }
    }

    /// The capability advert's job-related fields, from the config and the job manager's last load.
    fn refresh_job_caps(&mut self) {
        self.caps.queue_len = self.load.queue_len;
        self.caps.models = self.load.models.clone();
        self.caps.models.truncate(MAX_ADVERTISED_MODELS);
        self.caps.warm = self.load.warm.clone();
        self.caps.warm.truncate(MAX_ADVERTISED_WARM);
        self.caps.jobs_on_battery = self.cfg.jobs.run_on_battery;
        self.caps.accepts_jobs = self.cfg.jobs.accept_remote;
        self.caps.relay_max_circuit_bytes = self.relay_server.then_some(self.cfg.relay.max_circuit_bytes);
        caps::offer_memory(&mut self.caps, self.memory, self.load.warm_bytes);
        self.push_caps_if_changed();
    }

    /// The job manager's requests: each goes out on its protocol with its reply channel remembered by
    /// request id (`handle::route` answers it); answers to peers go back on their response channels.
    fn send_job(&mut self, peer: PeerId, (env, reply): (Envelope, oneshot::Sender<Answer<JobAck>>)) {
        let rid = self.swarm.behaviour_mut().job.inner.send_request(&peer, Ok(env));
        self.pending.job_out.sent(peer, rid);
        self.pending.job.insert(rid, reply);
    }

    fn send_update(&mut self, peer: PeerId, (env, reply): (Envelope, oneshot::Sender<Answer<UpdateAck>>)) {
        let rid = self.swarm.behaviour_mut().update.inner.send_request(&peer, Ok(env));
        self.pending.update_out.sent(peer, rid);
        self.pending.update.insert(rid, reply);
    }

    fn on_command(&mut self, c: NetCommand) {
        let b = self.swarm.behaviour_mut();
        match c {
            NetCommand::SendJob { peer, env, reply } => {
                if let Some(item) = self.pending.job_out.admit(peer, (env, reply), JOB_STREAMS) {
                    self.send_job(peer, item);
                }
            }
            NetCommand::SendUpdate { peer, env, reply } => {
                if let Some(item) = self.pending.update_out.admit(peer, (env, reply), UPDATE_STREAMS) {
                    self.send_update(peer, item);
                }
            }
            NetCommand::RequestModel { peer, req, reply } => {
                let rid = b.model.inner.send_request(&peer, Ok(req));
                self.pending.model.insert(rid, reply);
            }
            // A response channel whose stream closed meanwhile refuses the answer; the peer saw a failure.
            NetCommand::AnswerJob(ch, ack) => {
                let _ = b.job.inner.send_response(ch, Ok(ack));
            }
            NetCommand::AnswerUpdate(ch, ack) => {
                let _ = b.update.inner.send_response(ch, Ok(ack));
            }
            NetCommand::AnswerModel(ch, resp) => {
                let _ = b.model.inner.send_response(ch, Ok(resp));
            }
            NetCommand::Load(load) => {
                self.load = load;
                self.refresh_job_caps();
            }
            NetCommand::Measured(g) => self.on_measured(g),
        }
    }

    /// Publishes the mesh for the job manager. Peers are few, so the view is rebuilt after every event
    /// rather than tracked change by change (which would be one more thing to forget).
    fn publish(&mut self) {
        let relay_limit = |r: &PeerId| {
            self.peers
                .get(r)
                .and_then(|s| s.caps.theirs())
                .and_then(|c| c.relay_max_circuit_bytes)
        };
        let peers = self
            .peers
            .iter()
            .map(|(id, st)| {
                let relays = st
                    .conns
                    .values()
                    .filter(|c| c.identified && c.relayed)
                    .map(|c| (c.relay, c.relay.as_ref().and_then(relay_limit)))
                    .collect();
                let v = PeerView {
                    connected: st.connected() && self.trust.contains(id),
                    direct: st.direct(),
                    caps: st.caps.theirs().cloned(),
                    relays,
                };
                (*id, v)
            })
            .collect();
        let names = self
            .trust
            .ids()
            .into_iter()
            .filter_map(|p| self.trust.get(&p).map(|t| (p, t.name.clone())))
            .collect();
        self.view.send_replace(MeshView {
            caps: self.caps.clone(),
            peers,
            names,
        });
    }

    fn save_trust(&self) {
        match self.trust.to_bytes() {
            Ok(b) => self.store.save(crate::trust::path(&self.home), b),
            Err(e) => tracing::error!("encoding the trust list: {e:#}"),
        }
    }

    fn set_trusted(&mut self, peer: PeerId, trusted: bool) {
        let mut a = lock(&self.admission);
        if trusted {
            a.trusted.insert(peer);
            a.pairing.remove(&peer);
        } else {
            a.trusted.remove(&peer);
        }
        a.joining.remove(&peer);
    }

    /// The gate admits strangers only while an unused invite is open: recomputed whenever an invite is
    /// created, used, burned or expires.
    fn refresh_open_invites(&mut self) {
        lock(&self.admission).open_invite_until = self.pairing.open_until();
    }

    fn is_trusted(&self, peer: &PeerId) -> bool {
        lock(&self.admission).trusted.contains(peer)
    }

    fn dial_bootstrap(&mut self) {
        let mut targets: Vec<Multiaddr> = vec![];
        for s in self.cfg.network.bootstrap.iter().chain(self.cfg.relay.addresses.iter()) {
            match s.parse::<Multiaddr>() {
                Ok(a) if peer_of(&a).is_some() => targets.push(a),
                _ => tracing::warn!("ignoring {s:?}: a bootstrap or relay address must end in /p2p/<peer id>"),
            }
        }
        for a in targets {
            let Some(p) = peer_of(&a) else { continue };
            if !self.is_trusted(&p) {
                tracing::warn!(%a, "configured address belongs to a peer that is not paired; pair with it first");
                continue;
            }
            self.trust.note_addrs(&p, std::slice::from_ref(&a));
        }
        // Every paired peer is dialed on the first tick.
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        // Invites expire and late joins fail; the gate admits strangers only while an invite is open.
        let fx = self.pairing.tick(now);
        self.apply(fx);
        let expired_pairing: Vec<PeerId> = {
            let mut a = lock(&self.admission);
            let gone: Vec<PeerId> = a.pairing.iter().filter(|(_, t)| now >= **t).map(|(p, _)| *p).collect();
            for p in &gone {
                a.pairing.remove(p);
            }
            gone.into_iter()
                .filter(|p| !a.trusted.contains(p) && !a.joining.contains(p))
                .collect()
        };
        for p in expired_pairing {
            tracing::info!(peer = %p, "dropping an unpaired peer whose pairing window closed");
            self.pairing.forget(&p);
            let _ = self.swarm.disconnect_peer_id(p);
            self.peers.remove(&p);
        }
        self.redial(now);
        self.retry_caps();
        self.retry_hole_punches(now);
        self.ensure_relay_reservations();
    }
}

/// The address without a trailing `/p2p/<id>` (the trust list keys addresses by peer already).
pub(crate) fn strip_peer(a: &Multiaddr) -> Multiaddr {
    let mut a = a.clone();
    if let Some(Protocol::P2p(_)) = a.iter().last() {
        a.pop();
    }
    a
}
