//! `bitnode start`: the daemon. One tokio task owns the libp2p swarm and all mesh state (the network actor
//! of rust-libp2p's file-sharing example); the control socket's connections send it commands over a bounded
//! channel and get their answers back on oneshot channels. Nothing else touches the swarm, so there are no
//! locks around it; the only shared state is the admission set the connection gate reads.
use crate::api::{self, ConnectionKind, Event, PeerInfo, Request, Response};
use crate::caps;
use crate::config::Config;
use crate::control;
use crate::net::{
    self, is_relayed, lock, Admission, BehaviourEvent, Inbound, NetOptions, RelayLimits, SharedAdmission,
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

mod delegate;

pub struct StartOptions {
    /// Replaces `[network] listen` when not empty.
    pub listen: Vec<String>,
    /// Forces `[relay] enabled`.
    pub relay_server: bool,
    /// Forces `[jobs] accept_remote = false` (a relay that should only relay).
    pub no_remote_jobs: bool,
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
    caps: Option<Capabilities>,
    /// Listen addresses the peer reported (identify); recorded in the trust list once it is paired.
    listen_addrs: Vec<Multiaddr>,
    /// The peer serves as a relay (identify lists the hop protocol).
    relay_hop: bool,
    /// The peer treats us as paired: it sent us its capabilities or accepted ours. A node that unpaired us
    /// may still hold a connection for a moment (or for the pairing window of an open invite), but it
    /// answers nothing, so it does not count as connected.
    mutual: bool,
    /// The peer acknowledged our current capabilities on this connection set.
    caps_delivered: bool,
    /// An advert is on its way (sent, no answer or failure yet).
    caps_in_flight: bool,
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
        self.mutual && self.conns.values().any(|c| c.identified)
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
    advertised: Option<Capabilities>,
    relay_listeners: HashMap<PeerId, ListenerId>,
    listen_addrs: Vec<Multiaddr>,
    relay_server: bool,
    pnet: bool,
    started: Instant,
    stop: bool,
    work: delegate::Work,
    /// Writes the job table and the trust list off the event loop.
    store: crate::store::StateWriter,
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
    let work = delegate::Work::new(home, &key, itx)?;
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
    let adapter = cfg.engine.adapter.clone().unwrap_or_else(|| "auto".into());
    let caps_cfg = cfg.capabilities.clone();
    // The probe blocks on the GPU for a few hundred milliseconds; keep it off the async workers.
    let caps = tokio::task::spawn_blocking(move || caps::probe(&adapter, &caps_cfg)).await?;
    tracing::info!(peer_id = %me, %name, score = caps.score, device = %caps.device, "bitnode daemon starting");

    let cfg_name = name.clone();
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
        caps,
        relay_listeners: HashMap::new(),
        listen_addrs: vec![],
        relay_server,
        pnet: psk.is_some(),
        started: Instant::now(),
        stop: false,
        work,
        store: crate::store::StateWriter::start().context("starting the store thread")?,
        scores: caps::ScoreWindow::default(),
        measured_at: Instant::now(),
        measuring: false,
    };
    if d.caps.ternary_gops > 0.0 && d.cfg.capabilities.ternary_gops.is_none() {
        d.scores.push(d.caps.ternary_gops);
    }
    d.refresh_job_caps();
    d.advertised = Some(d.caps.clone());
    d.resume_submissions();
    d.dial_bootstrap();
    let (tx, rx) = mpsc::channel::<Ctl>(64);
    let acceptor = tokio::spawn(accept_loop(listener, tx));
    let res = d.event_loop(rx, irx).await;
    // Everything handed to the store actor reaches the disk before the daemon says it stopped.
    let store = d.store.clone();
    let _ = tokio::task::spawn_blocking(move || store.flush()).await;
    // Let in-flight control replies (the answer to `bitnode stop` among them) reach their clients.
    tokio::time::sleep(Duration::from_millis(100)).await;
    acceptor.abort();
    let _ = std::fs::remove_file(&sock);
    tracing::info!("bitnode daemon stopped");
    res
}

async fn accept_loop(listener: tokio::net::UnixListener, tx: mpsc::Sender<Ctl>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_client(stream, tx.clone()));
            }
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_client(stream: tokio::net::UnixStream, tx: mpsc::Sender<Ctl>) {
    let (r, mut w) = stream.into_split();
    let mut r = tokio::io::BufReader::new(r.take(control::MAX_REQUEST as u64 + 1));
    let mut line = String::new();
    // A client that connects and never writes must not hold a task forever.
    let read = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line)).await;
    let resp = match read.unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no request within 10 s",
        ))
    }) {
        Ok(_) if line.len() > control::MAX_REQUEST => Response::err("request too large"),
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let (reply, mut rx) = oneshot::channel();
                let (etx, mut erx) = mpsc::channel::<Event>(control::MAX_EVENT_BACKLOG);
                if tx
                    .send(Ctl {
                        req,
                        reply,
                        events: etx,
                    })
                    .await
                    .is_err()
                {
                    Response::err("the daemon is shutting down")
                } else {
                    // Events go out as they come; the reply ends the exchange. A client that went away, or
                    // stopped reading for CLIENT_WRITE_TIMEOUT, is dropped: its job goes on, and the daemon,
                    // whose sends into the closed channel then fail, forgets this watcher.
                    loop {
                        tokio::select! {
                            r = &mut rx => break r.unwrap_or_else(|_| Response::err("the daemon dropped the request")),
                            Some(ev) = erx.recv() => {
                                let mut out = serde_json::to_vec(&ev).unwrap_or_default();
                                out.push(b'\n');
                                match tokio::time::timeout(control::CLIENT_WRITE_TIMEOUT, w.write_all(&out)).await {
                                    Ok(Ok(())) => {}
                                    Ok(Err(_)) => return,
                                    Err(_) => {
                                        tracing::warn!("dropping a control client that stopped reading its events");
                                        return;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => Response::err(format!("malformed request: {e}")),
        },
        Err(e) => Response::err(format!("reading request: {e}")),
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    let _ = tokio::time::timeout(control::CLIENT_WRITE_TIMEOUT, w.write_all(&out)).await;
}

enum Wake {
    Swarm(Box<SwarmEvent<BehaviourEvent>>),
    Ctl(Ctl),
    Internal(delegate::Internal),
    Tick,
    Stop(&'static str),
}

impl Daemon {
    async fn event_loop(
        &mut self,
        mut rx: mpsc::Receiver<Ctl>,
        mut irx: mpsc::UnboundedReceiver<delegate::Internal>,
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
                Some(i) = irx.recv() => Wake::Internal(i),
                _ = tick.tick() => Wake::Tick,
                _ = sigint.recv() => Wake::Stop("SIGINT"),
                _ = sigterm.recv() => Wake::Stop("SIGTERM"),
            };
            match w {
                Wake::Swarm(ev) => self.on_swarm(*ev),
                Wake::Ctl(c) => self.on_control(c),
                Wake::Internal(i) => self.on_internal(i),
                Wake::Tick => {
                    self.on_tick();
                    self.jobs_tick();
                    if last_caps.elapsed() >= CAPS_REFRESH {
                        last_caps = Instant::now();
                        caps::refresh(&mut self.caps, &self.cfg.capabilities, self.work.queue_len());
                        self.refresh_job_caps();
                    }
                    self.remeasure_if_due();
                }
                Wake::Stop(sig) => {
                    tracing::info!("{sig}: shutting down");
                    self.stop = true;
                }
            }
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
            || self.work.busy()
            || self.cfg.capabilities.ternary_gops.is_some()
        {
            return;
        }
        self.measuring = true;
        let adapter = self.cfg.engine.adapter.clone().unwrap_or_else(|| "auto".into());
        let cfg = self.cfg.capabilities.clone();
        let tx = self.work.internal();
        tokio::task::spawn_blocking(move || {
            let _ = tx.send(delegate::Internal::Measured(caps::measure(&adapter, &cfg)));
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
            caps::refresh(&mut self.caps, &self.cfg.capabilities, self.work.queue_len());
            self.refresh_job_caps();
        }
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

    /// Carries out what the pairing state machine asks for.
    fn apply(&mut self, effects: Vec<PairEffect>) {
        for e in effects {
            match e {
                PairEffect::Trust { peer, name, via, addrs } => {
                    self.trust.add(&peer, &name, via, &addrs);
                    self.save_trust();
                    self.set_trusted(peer, true);
                    self.send_caps(peer);
                }
                PairEffect::Send { peer, req, addrs } => {
                    let pair = &mut self.swarm.behaviour_mut().pair;
                    if addrs.is_empty() {
                        pair.send_request(&peer, Ok(req));
                    } else {
                        pair.send_request_with_addresses(&peer, Ok(req), addrs);
                    }
                }
                PairEffect::JoinDone { peer, result } => {
                    let resp = match result {
                        Ok(name) => Response::ok(&api::Paired {
                            peer_id: peer.to_base58(),
                            name,
                        }),
                        Err(why) => {
                            lock(&self.admission).joining.remove(&peer);
                            Response::err(why)
                        }
                    };
                    if let Some(r) = self.join_replies.remove(&peer) {
                        let _ = r.send(resp);
                    }
                }
                PairEffect::Drop(peer) => {
                    if !self.is_trusted(&peer) {
                        let _ = self.swarm.disconnect_peer_id(peer);
                    }
                }
            }
        }
        self.refresh_open_invites();
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

    fn redial(&mut self, now: Instant) {
        let base = Duration::from_secs(self.cfg.network.reconnect_secs.max(1));
        for id in self.trust.ids() {
            let st = self.peers.entry(id).or_default();
            if !st.conns.is_empty() || st.next_dial.is_some_and(|t| now < t) {
                continue;
            }
            st.backoff = (st.backoff * 2).clamp(1, 12);
            st.next_dial = Some(now + base * st.backoff);
            let addrs: Vec<Multiaddr> = self
                .trust
                .get(&id)
                .map(|t| t.addresses.iter().filter_map(|a| a.parse().ok()).collect())
                .unwrap_or_default();
            if addrs.is_empty() {
                continue;
            }
            let opts = DialOpts::peer_id(id)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .addresses(addrs)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(peer = %id, "redial: {e}");
            }
        }
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

    /// Listen through every paired relay we are connected to (and the configured ones), so that peers
    /// behind other NATs can reach us; DCUtR then replaces those relayed connections with direct ones.
    fn ensure_relay_reservations(&mut self) {
        if !self.cfg.relay.use_paired_relays && self.cfg.relay.addresses.is_empty() {
            return;
        }
        let configured: HashSet<PeerId> = self
            .cfg
            .relay
            .addresses
            .iter()
            .filter_map(|s| s.parse::<Multiaddr>().ok().as_ref().and_then(peer_of))
            .collect();
        let mut want = vec![];
        for (id, st) in &self.peers {
            if self.relay_listeners.contains_key(id) || !self.trust.contains(id) {
                continue;
            }
            let usable = (st.relay_hop && self.cfg.relay.use_paired_relays) || configured.contains(id);
            // Reserve through a direct connection to the relay (a circuit over a circuit is not allowed).
            if !usable || !st.conns.values().any(|c| !c.relayed && c.identified) {
                continue;
            }
            // The circuit address goes into invite codes, so it must name a port the relay listens on.
            let dialed = st
                .conns
                .values()
                .find(|c| c.dialer && !c.relayed)
                .map(|c| c.addr.clone());
            if let Some(addr) = dialed.or_else(|| st.listen_addrs.first().cloned()) {
                want.push((*id, addr));
            }
        }
        for (id, addr) in want {
            let a = with_peer(&strip_peer(&addr), &id).with(Protocol::P2pCircuit);
            match self.swarm.listen_on(a.clone()) {
                Ok(l) => {
                    tracing::info!(relay = %id, "reserving a relayed address at {a}");
                    self.relay_listeners.insert(id, l);
                }
                Err(e) => tracing::warn!(relay = %id, "cannot listen through the relay: {e}"),
            }
        }
    }

    fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("listening on {}", with_peer(&address, &self.me));
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ListenerClosed {
                listener_id, reason, ..
            } => {
                if let Some(relay) = self
                    .relay_listeners
                    .iter()
                    .find(|(_, l)| **l == listener_id)
                    .map(|(p, _)| *p)
                {
                    tracing::info!(%relay, "relayed listener closed: {reason:?}");
                    self.relay_listeners.remove(&relay);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let (addr, relayed) = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => (address.clone(), is_relayed(address)),
                    ConnectedPoint::Listener {
                        local_addr,
                        send_back_addr,
                    } => (
                        send_back_addr.clone(),
                        is_relayed(local_addr) || is_relayed(send_back_addr),
                    ),
                };
                tracing::info!(peer = %peer_id, %addr, relayed, "connected");
                let relay_of = |a: &Multiaddr| {
                    a.iter().find_map(|p| match p {
                        Protocol::P2p(r) if r != peer_id && r != self.me => Some(r),
                        _ => None,
                    })
                };
                let relay = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => relay_of(address),
                    ConnectedPoint::Listener {
                        local_addr,
                        send_back_addr,
                    } => relay_of(local_addr).or_else(|| relay_of(send_back_addr)),
                }
                .filter(|_| relayed);
                let trusted = self.is_trusted(&peer_id);
                let st = self.peers.entry(peer_id).or_default();
                st.conns.insert(
                    connection_id,
                    Conn {
                        addr: addr.clone(),
                        relayed,
                        relay,
                        rtt: None,
                        identified: false,
                        dialer: endpoint.is_dialer(),
                    },
                );
                st.backoff = 0;
                st.next_dial = None;
                if trusted {
                    if endpoint.is_dialer() && self.trust.note_addrs(&peer_id, &[strip_peer(&addr)]) {
                        self.save_trust();
                    }
                    if num_established.get() == 1 {
                        self.send_caps(peer_id);
                        self.resend_results_to(peer_id);
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                cause,
                ..
            } => {
                tracing::info!(peer = %peer_id, "connection closed: {cause:?}");
                if let Some(st) = self.peers.get_mut(&peer_id) {
                    st.conns.remove(&connection_id);
                    if st.conns.is_empty() {
                        st.mutual = false;
                        st.caps_delivered = false;
                        st.caps_in_flight = false;
                    }
                }
                if let Some(relay) = self.relay_listeners.keys().find(|r| **r == peer_id).copied() {
                    if !self.peers.get(&relay).is_some_and(|s| s.direct()) {
                        if let Some(l) = self.relay_listeners.remove(&relay) {
                            self.swarm.remove_listener(l);
                        }
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(p),
                error,
                ..
            } => {
                tracing::debug!(peer = %p, "dial failed: {error}");
                self.pairing.dial_failed(&p, error.to_string());
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr, error, ..
            } => {
                tracing::debug!(%send_back_addr, "incoming connection failed: {error}");
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!("external address confirmed: {address}");
            }
            SwarmEvent::Behaviour(b) => self.on_behaviour(b),
            _ => {}
        }
    }

    fn on_behaviour(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                connection_id,
                info,
            }) => {
                let hop = info.protocols.contains(&relay::HOP_PROTOCOL_NAME);
                let addrs: Vec<Multiaddr> = info
                    .listen_addrs
                    .iter()
                    .filter(|a| dialable(a))
                    .map(strip_peer)
                    .collect();
                let st = self.peers.entry(peer_id).or_default();
                let local = st.conns.get(&connection_id).is_some_and(|c| is_loopback(&c.addr));
                let addrs = drop_loopback_unless(addrs, local);
                st.relay_hop = hop;
                st.listen_addrs = addrs.clone();
                if let Some(c) = st.conns.get_mut(&connection_id) {
                    c.identified = true;
                }
                if self.is_trusted(&peer_id) && self.trust.note_addrs(&peer_id, &addrs) {
                    self.save_trust();
                }
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Ok(rtt),
            }) => {
                if let Some(c) = self.peers.get_mut(&peer).and_then(|s| s.conns.get_mut(&connection)) {
                    c.rtt = Some(rtt);
                }
            }
            BehaviourEvent::Mdns(libp2p::mdns::Event::Discovered(list)) => {
                for (peer, addr) in list {
                    // Strangers on the LAN are ignored: only paired peers are ever dialed.
                    if !self.is_trusted(&peer) {
                        continue;
                    }
                    // Remembered, so the redial loop retries it if this attempt fails.
                    if self.trust.note_addrs(&peer, &[strip_peer(&addr)]) {
                        self.save_trust();
                    }
                    if self.peers.get(&peer).is_some_and(|s| !s.conns.is_empty()) {
                        continue;
                    }
                    // Both sides hear each other's announcement at the same moment; if both dialed, the two
                    // TCP dials from the reused listen ports would meet as one simultaneous open and fail.
                    // The smaller peer id dials now, the other leaves it to its redial loop a moment later.
                    if self.me.to_bytes() < peer.to_bytes() {
                        let opts = DialOpts::peer_id(peer)
                            .condition(PeerCondition::DisconnectedAndNotDialing)
                            .addresses(vec![addr])
                            .build();
                        let _ = self.swarm.dial(opts);
                    } else {
                        let st = self.peers.entry(peer).or_default();
                        st.next_dial = Some(Instant::now() + Duration::from_secs(3));
                    }
                }
            }
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted { relay_peer_id, .. }) => {
                tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
            }
            BehaviourEvent::Dcutr(e) => match e.result {
                Ok(_) => {
                    tracing::info!(peer = %e.remote_peer_id, "hole punch succeeded: direct connection");
                    if let Some(st) = self.peers.get_mut(&e.remote_peer_id) {
                        st.punch_retry_at = None;
                        st.punch_rounds = 0;
                    }
                }
                Err(err) => {
                    tracing::info!(peer = %e.remote_peer_id, "hole punch failed: {err}");
                    // The side that ran the attempt (the one that hears of its failure) retries.
                    if let Some(st) = self.peers.get_mut(&e.remote_peer_id) {
                        if st.punch_rounds < MAX_PUNCH_ROUNDS {
                            st.punch_rounds += 1;
                            st.punch_retry_at = Some(Instant::now() + PUNCH_RETRY * st.punch_rounds);
                        }
                    }
                }
            },
            BehaviourEvent::Pair(e) => self.on_pair(e),
            BehaviourEvent::Caps(e) => self.on_caps(e),
            BehaviourEvent::Job(e) => self.on_job_event(e),
            BehaviourEvent::Update(e) => self.on_update_event(e),
            BehaviourEvent::Model(e) => self.on_model_event(e),
            _ => {}
        }
    }

    // ---- capabilities ----

    fn advert(&self) -> CapsAdvert {
        CapsAdvert {
            name: self.name.clone(),
            caps: self.caps.clone(),
        }
    }

    fn send_caps(&mut self, peer: PeerId) {
        let a = self.advert();
        self.swarm.behaviour_mut().caps.inner.send_request(&peer, Ok(a));
        self.peers.entry(peer).or_default().caps_in_flight = true;
    }

    /// Closes the relayed connections of peers whose hole punch failed and is due for another round; the
    /// redial loop then reconnects through the relay, and DCUtR tries again on the new relayed connection.
    fn retry_hole_punches(&mut self, now: Instant) {
        let mut close = vec![];
        for (id, st) in self.peers.iter_mut() {
            if st.punch_retry_at.is_some_and(|t| now >= t) {
                st.punch_retry_at = None;
                if !st.direct() {
                    close.extend(st.conns.iter().filter(|(_, c)| c.relayed).map(|(cid, _)| (*id, *cid)));
                    st.next_dial = None;
                }
            }
        }
        for (id, cid) in close {
            tracing::info!(peer = %id, "retrying the hole punch on a fresh relayed connection");
            self.swarm.close_connection(cid);
        }
    }

    /// Adverts can be lost: sent before the peer finished pairing, or on a duplicate connection that libp2p
    /// closed. Every tick, a paired peer we are connected to that has not acknowledged ours gets it again.
    fn retry_caps(&mut self) {
        let due: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(p, s)| {
                !s.caps_delivered
                    && !s.caps_in_flight
                    && s.conns.values().any(|c| c.identified)
                    && self.trust.contains(p)
            })
            .map(|(p, _)| *p)
            .collect();
        for p in due {
            self.send_caps(p);
        }
    }

    fn push_caps_if_changed(&mut self) {
        if self.advertised.as_ref() == Some(&self.caps) {
            return;
        }
        self.advertised = Some(self.caps.clone());
        let targets: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(p, s)| s.connected() && self.trust.contains(p))
            .map(|(p, _)| *p)
            .collect();
        for p in targets {
            self.send_caps(p);
        }
    }

    fn on_caps(&mut self, e: rr::Event<Inbound<CapsAdvert>, Inbound<CapsAck>>) {
        match e {
            rr::Event::Message {
                peer,
                message: rr::Message::Request { request, channel, .. },
                ..
            } => {
                let request = match request {
                    Ok(r) => r,
                    Err(why) => {
                        // No answer: the stream is dropped with the channel.
                        tracing::warn!(%peer, "bad capability message refused: {why}");
                        return;
                    }
                };
                if !self.is_trusted(&peer) {
                    // Not paired: no answer at all (the stream is dropped).
                    tracing::warn!(%peer, "capability advert from an unpaired peer ignored");
                    return;
                }
                tracing::debug!(%peer, score = request.caps.score, "capabilities received");
                let st = self.peers.entry(peer).or_default();
                st.caps = Some(request.caps);
                st.mutual = true;
                // Ours may have arrived before the peer trusted us (the two sides finish pairing a moment
                // apart) and been ignored: send them again now that it evidently does.
                let resend = !st.caps_delivered;
                // Optimistic, so two peers that both missed each other's advert do not bounce resends;
                // a failed delivery clears it again.
                st.caps_delivered = true;
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .caps
                    .inner
                    .send_response(channel, Ok(CapsAck::Ok));
                if resend {
                    self.send_caps(peer);
                }
            }
            rr::Event::Message {
                peer,
                message:
                    rr::Message::Response {
                        response: Ok(CapsAck::Ok),
                        ..
                    },
                ..
            } if self.is_trusted(&peer) => {
                let st = self.peers.entry(peer).or_default();
                st.mutual = true;
                st.caps_delivered = true;
                st.caps_in_flight = false;
            }
            rr::Event::Message {
                peer,
                message: rr::Message::Response { .. },
                ..
            } => {
                if let Some(st) = self.peers.get_mut(&peer) {
                    st.caps_in_flight = false;
                }
            }
            rr::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "capability exchange failed: {error}");
            }
            rr::Event::OutboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "capability advert not delivered: {error}");
                if let Some(st) = self.peers.get_mut(&peer) {
                    st.caps_delivered = false;
                    st.caps_in_flight = false;
                }
            }
            _ => {}
        }
    }

    // ---- pairing ----

    fn on_pair(&mut self, e: rr::Event<Inbound<PairRequest>, Inbound<PairResponse>>) {
        let listen = |d: &Daemon, p: &PeerId| d.peers.get(p).map(|s| s.listen_addrs.clone()).unwrap_or_default();
        match e {
            rr::Event::Message {
                peer,
                message: rr::Message::Request { request, channel, .. },
                ..
            } => match request {
                Ok(request) => {
                    let addrs = listen(self, &peer);
                    let (resp, fx) = self.pairing.on_request(peer, request, &addrs, Instant::now(), random());
                    let _ = self.swarm.behaviour_mut().pair.send_response(channel, Ok(resp));
                    self.apply(fx);
                }
                Err(why) => tracing::warn!(%peer, "bad pairing message refused: {why}"),
            },
            rr::Event::Message {
                peer,
                message: rr::Message::Response { response, .. },
                ..
            } => {
                let fx = match response {
                    Ok(r) => {
                        let addrs = listen(self, &peer);
                        self.pairing.on_response(peer, r, &addrs)
                    }
                    Err(why) => self
                        .pairing
                        .fail(&peer, format!("the inviter sent a malformed answer: {why}")),
                };
                self.apply(fx);
            }
            // The request-response behaviour reports a dial failure only when no connection could carry
            // the request (every address of every dial failed), so this is the one place a join fails for
            // want of a route.
            rr::Event::OutboundFailure {
                peer,
                error: rr::OutboundFailure::DialFailure,
                ..
            } => {
                let fx = self.pairing.unreachable(&peer);
                self.apply(fx);
            }
            rr::Event::OutboundFailure { peer, error, .. } => {
                let fx = self.pairing.fail(&peer, format!("pairing request failed: {error}"));
                self.apply(fx);
            }
            rr::Event::InboundFailure { peer, error, .. } => {
                tracing::warn!(%peer, "bad pairing message: {error}");
            }
            _ => {}
        }
    }

    // ---- control ----

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
            } => {
                self.submit(spec, data_path, need, &to, out, resume, detach, reply, Some(events));
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
            Request::JobFollow { id } => {
                // Answered now for a job that ended, else when it ends.
                self.follow_job(&id, events, reply);
                return;
            }
            Request::Status => Response::ok(&self.status()),
            Request::Peers => Response::ok(&self.peers()),
            Request::PairList => Response::ok(&self.trust.entries()),
            Request::PairInvite { ttl_secs } => self.invite(ttl_secs),
            Request::PairJoin { code } => {
                let peers = &self.peers;
                let started = self.pairing.join(&code, Instant::now(), now_unix(), random(), |p| {
                    peers.get(p).is_some_and(|s| s.connected())
                });
                match started {
                    Ok((peer, hello)) => {
                        lock(&self.admission).joining.insert(peer);
                        // Answered when the handshake ends.
                        self.join_replies.insert(peer, reply);
                        self.apply(vec![hello]);
                        return;
                    }
                    Err(e) => Response::err(e),
                }
            }
            Request::PairAdd { peer, name, addrs } => self.pair_add(&peer, name, &addrs),
            Request::PairRemove { peer } => self.pair_remove(&peer),
            Request::Shutdown => {
                self.stop = true;
                Response::ok(&"stopping")
            }
        };
        let _ = reply.send(resp);
    }

    fn status(&self) -> api::Status {
        let connected = self
            .peers
            .iter()
            .filter(|(p, s)| s.connected() && self.trust.contains(p))
            .count();
        let relayed: Vec<String> = self
            .listen_addrs
            .iter()
            .filter(|a| is_relayed(a))
            .map(|a| with_peer(a, &self.me).to_string())
            .collect();
        api::Status {
            id: self.me.to_base58(),
            name: self.name.clone(),
            listen_addresses: self
                .listen_addrs
                .iter()
                .map(|a| with_peer(a, &self.me).to_string())
                .collect(),
            relayed_addresses: relayed,
            external_addresses: self.swarm.external_addresses().map(|a| a.to_string()).collect(),
            relay_server: self.relay_server,
            psk: self.pnet,
            paired_peers: self.trust.peers.len(),
            connected_peers: connected,
            open_invites: self.pairing.open_invites(),
            uptime_secs: self.started.elapsed().as_secs(),
            capabilities: self.caps.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn peers(&self) -> Vec<PeerInfo> {
        let mut out = vec![];
        for (id, t) in &self.trust.peers {
            let pid: Option<PeerId> = id.parse().ok();
            let st = pid.and_then(|p| self.peers.get(&p));
            let connected = st.is_some_and(|s| s.connected());
            let connection = match st {
                Some(s) if s.direct() => Some(ConnectionKind::Direct),
                Some(s) if s.connected() => Some(ConnectionKind::Relayed),
                _ => None,
            };
            let mut addresses: Vec<String> = st
                .map(|s| s.conns.values().map(|c| c.addr.to_string()).collect())
                .unwrap_or_default();
            for a in &t.addresses {
                if !addresses.contains(a) {
                    addresses.push(a.clone());
                }
            }
            out.push(PeerInfo {
                id: id.clone(),
                name: t.name.clone(),
                connected,
                connection,
                addresses,
                rtt_ms: st.and_then(|s| s.rtt()).map(|d| d.as_secs_f64() * 1000.0),
                capabilities: st.and_then(|s| s.caps.clone()),
            });
        }
        out
    }

    fn invite(&mut self, ttl_secs: u64) -> Response {
        // Relayed addresses first: they work from behind any NAT; direct ones are tried alongside.
        let mut addrs: Vec<Multiaddr> = self.listen_addrs.iter().filter(|a| is_relayed(a)).cloned().collect();
        addrs.extend(self.swarm.external_addresses().cloned());
        addrs.extend(
            self.listen_addrs
                .iter()
                .filter(|a| !is_relayed(a) && dialable(a))
                .cloned(),
        );
        let mut seen = HashSet::new();
        addrs.retain(|a| seen.insert(a.clone()));
        let only_loopback = addrs.iter().all(is_loopback);
        let mut addrs = drop_loopback_unless(addrs, only_loopback);
        addrs.truncate(12);
        let addrs = addrs.iter().map(|a| a.to_string()).collect();
        let inv = match self
            .pairing
            .invite(ttl_secs, addrs, Instant::now(), now_unix(), || (random(), random()))
        {
            Ok(i) => i,
            Err(e) => return Response::err(e),
        };
        self.refresh_open_invites();
        tracing::info!(expires_unix = inv.expires, "invite created");
        Response::ok(&api::InviteReply {
            code: inv.to_code(),
            expires_unix: inv.expires,
            addresses: inv.addrs.clone(),
        })
    }

    fn pair_add(&mut self, peer: &str, name: Option<String>, addrs: &[String]) -> Response {
        let Ok(id) = peer.parse::<PeerId>() else {
            return Response::err(format!(
                "{peer:?} is not a peer id (see `bitnode id` on the other device)"
            ));
        };
        if id == self.me {
            return Response::err("that is this node's own peer id");
        }
        let name = name.unwrap_or_else(|| crate::trust::default_name(&id));
        if let Err(e) = check_name(&name) {
            return Response::err(e);
        }
        let mut parsed = vec![];
        for a in addrs {
            match a.parse::<Multiaddr>() {
                Ok(m) => parsed.push(strip_peer(&m)),
                Err(e) => return Response::err(format!("address {a:?}: {e}")),
            }
        }
        self.trust.add(&id, &name, "manual", &parsed);
        self.save_trust();
        self.set_trusted(id, true);
        if let Some(st) = self.peers.get_mut(&id) {
            st.next_dial = None;
        }
        tracing::info!(peer = %id, %name, "paired (manual)");
        Response::ok(&api::Paired {
            peer_id: id.to_base58(),
            name,
        })
    }

    fn pair_remove(&mut self, who: &str) -> Response {
        let Some(id) = self.trust.resolve(who) else {
            return Response::err(format!("no paired peer is called {who:?}"));
        };
        let Some(t) = self.trust.remove(&id) else {
            return Response::err(format!("{id} is not paired"));
        };
        self.save_trust();
        self.set_trusted(id, false);
        // Drop it at once: the gate refuses its reconnects from now on.
        let _ = self.swarm.disconnect_peer_id(id);
        if let Some(l) = self.relay_listeners.remove(&id) {
            self.swarm.remove_listener(l);
        }
        self.peers.remove(&id);
        tracing::info!(peer = %id, name = %t.name, "unpaired");
        Response::ok(&api::Paired {
            peer_id: id.to_base58(),
            name: t.name,
        })
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
