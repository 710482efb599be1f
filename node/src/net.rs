//! The libp2p side of the daemon: the composed behaviour, the connection gate that keeps the mesh private,
//! the size-bounded bincode codec of the `/bitnode/*` protocols, and the transport stack.
use crate::paired_only::PairedOnly;
use bitnode_protocol::job::{Envelope, JobAck, ModelRequest, ModelResponse, UpdateAck};
use bitnode_protocol::mesh::{CapsAck, CapsAdvert, PairRequest, PairResponse};
use bitnode_protocol::wire::{
    self, CAPS_PROTOCOL, JOB_PROTOCOL, MAX_CAPS_MESSAGE, MAX_MODEL_MESSAGE, MAX_PAIR_MESSAGE, MODEL_PROTOCOL,
    PAIR_PROTOCOL, UPDATE_PROTOCOL,
};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::core::{transport::PortUse, upgrade::Version, Endpoint, Multiaddr, Transport};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    behaviour::toggle::Toggle, dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{
    autonat, dcutr, identify, identity, mdns, noise, ping, pnet, relay, request_response, tcp, yamux, PeerId,
    StreamProtocol, Swarm,
};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Who may hold a connection to this node. Shared between the gate, the relay server's limiters and the
/// daemon's event loop (which is the only writer).
#[derive(Debug, Default)]
pub struct Admission {
    /// Paired peers.
    pub trusted: HashSet<PeerId>,
    /// Inviters we are joining right now (we dial them before they are in the trust list).
    pub joining: HashSet<PeerId>,
    /// While an invite is open, unknown peers may connect to run the pairing handshake, and only that:
    /// every other protocol handler checks `trusted`. The deadline is when the daemon drops them.
    pub open_invite_until: Option<Instant>,
    pub pairing: HashMap<PeerId, Instant>,
}

/// How many unknown peers may sit in the pairing handshake at once (a flood of strangers cannot starve it).
pub const MAX_PAIRING_PEERS: usize = 8;
/// How long an unknown peer may stay connected to finish pairing.
pub const PAIRING_WINDOW: Duration = Duration::from_secs(30);

/// Streams of the job protocol open at once on a connection (each may buffer up to the job limit before
/// it is checked). The daemon keeps its own outbound job requests within it per peer.
pub const JOB_STREAMS: usize = 4;

/// Streams of the update protocol open at once on a connection; outbound updates are kept within it per
/// peer, leaving room for the peer's own.
pub const UPDATE_STREAMS: usize = 16;

impl Admission {
    pub fn admit(&mut self, peer: &PeerId) -> Result<(), NotPaired> {
        if self.trusted.contains(peer) || self.joining.contains(peer) || self.pairing.contains_key(peer) {
            return Ok(());
        }
        let now = Instant::now();
        if self.open_invite_until.is_some_and(|t| now < t) && self.pairing.len() < MAX_PAIRING_PEERS {
            self.pairing.insert(*peer, now + PAIRING_WINDOW);
            return Ok(());
        }
        Err(NotPaired(*peer))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("peer {0} is not paired with this node")]
pub struct NotPaired(pub PeerId);

pub type SharedAdmission = Arc<Mutex<Admission>>;

pub fn lock(a: &SharedAdmission) -> MutexGuard<'_, Admission> {
    // A panic while holding the lock cannot leave the sets half-updated in a harmful way; keep serving.
    a.lock().unwrap_or_else(|p| p.into_inner())
}

/// Refuses every connection, inbound or outbound, with a peer that `Admission` does not admit. It runs
/// first in the composed behaviour, so a refused peer never reaches identify, relay or any bitnode
/// protocol: the connection is closed right after the Noise handshake that proved the peer's key.
pub struct Gate {
    pub state: SharedAdmission,
}

impl NetworkBehaviour for Gate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        lock(&self.state).admit(&peer).map_err(|e| {
            tracing::info!(%peer, %remote, "refused inbound connection from an unpaired peer");
            ConnectionDenied::new(e)
        })?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        lock(&self.state).admit(&peer).map_err(ConnectionDenied::new)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        libp2p::core::util::unreachable(event)
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// One request and one response per stream, each a bincode value filling the stream, bounded by `max`.
/// A message that is oversized or does not decode arrives as `Err(reason)` rather than as an I/O error, so
/// the daemon sees which peer sent it, logs it, and answers nothing; the stream is dropped.
pub struct WireCodec<Req, Resp> {
    max: usize,
    _p: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Clone for WireCodec<Req, Resp> {
    fn clone(&self) -> Self {
        WireCodec {
            max: self.max,
            _p: PhantomData,
        }
    }
}

impl<Req, Resp> WireCodec<Req, Resp> {
    pub fn new(max: usize) -> Self {
        WireCodec { max, _p: PhantomData }
    }
}

/// What a protocol message decodes to: the value, or why it was refused.
pub type Inbound<V> = Result<V, String>;

async fn read_bounded<T: AsyncRead + Unpin + Send, V: DeserializeOwned>(
    io: &mut T,
    max: usize,
) -> std::io::Result<Inbound<V>> {
    let mut buf = Vec::new();
    // Read one byte past the limit so an oversized message is detected without buffering all of it.
    io.take(max as u64 + 1).read_to_end(&mut buf).await?;
    Ok(wire::decode(&buf, max).map_err(|e| e.to_string()))
}

async fn write_value<T: AsyncWrite + Unpin + Send, V: Serialize + Send>(
    io: &mut T,
    v: Inbound<V>,
    max: usize,
) -> std::io::Result<()> {
    let v = v.map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let bytes = wire::encode(&v, max).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    io.write_all(&bytes).await?;
    io.close().await
}

impl<Req, Resp> request_response::Codec for WireCodec<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + 'static,
    Resp: Serialize + DeserializeOwned + Send + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Inbound<Req>;
    type Response = Inbound<Resp>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Inbound<Req>> {
        read_bounded(io, self.max).await
    }
    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Inbound<Resp>> {
        read_bounded(io, self.max).await
    }
    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Inbound<Req>,
    ) -> std::io::Result<()> {
        write_value(io, req, self.max).await
    }
    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: Inbound<Resp>,
    ) -> std::io::Result<()> {
        write_value(io, resp, self.max).await
    }
}

pub type PairBehaviour = request_response::Behaviour<WireCodec<PairRequest, PairResponse>>;
pub type CapsBehaviour = request_response::Behaviour<WireCodec<CapsAdvert, CapsAck>>;
/// Submitter to worker: signed job and cancel envelopes.
pub type JobBehaviour = request_response::Behaviour<WireCodec<Envelope, JobAck>>;
/// Worker to submitter: signed progress, checkpoints, heartbeats and the result.
pub type UpdateBehaviour = request_response::Behaviour<WireCodec<Envelope, UpdateAck>>;
/// Worker to submitter: content-addressed model chunks.
pub type ModelBehaviour = request_response::Behaviour<WireCodec<ModelRequest, ModelResponse>>;

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    // First: a refused peer must not reach any other behaviour.
    pub gate: Gate,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub relay_client: relay::client::Behaviour,
    pub relay: Toggle<relay::Behaviour>,
    /// Before `dcutr`: it adds the hole-punch address candidates of the transport identify did not see.
    pub candidates: TransportCandidates,
    pub dcutr: dcutr::Behaviour,
    pub autonat: autonat::Behaviour,
    pub pair: PairBehaviour,
    // Only paired peers may open these (crate::paired_only): a stranger let in by an open invite can
    // speak the pairing protocol and nothing else.
    pub caps: PairedOnly<CapsBehaviour>,
    pub job: PairedOnly<JobBehaviour>,
    pub update: PairedOnly<UpdateBehaviour>,
    pub model: PairedOnly<ModelBehaviour>,
}

/// Hole-punch candidates for both transports. DCUtR offers the peer only the external address candidates
/// that identify observed, and a node behind a NAT usually holds one connection to its relay, over TCP or
/// over QUIC, whichever its dial reached first: the other transport then has no candidate and is never
/// punched, so routers that pass only UDP (or only TCP) between two homes end relayed. An address observed
/// on one transport whose port is our listen port shows a NAT that keeps ports; this behaviour adds the same
/// public IP with our listen port on the other transport (what identify's own address translation does for
/// ephemeral ports), which the NAT maps the same way when the punch sends from that port. A NAT that does
/// not keep ports (symmetric) yields no such observation, and nothing is added.
#[derive(Default)]
pub struct TransportCandidates {
    listen: Vec<Multiaddr>,
    /// Addresses already handled (observed or added): each is added once, and our own additions, which come
    /// back as candidates, are not translated again.
    seen: HashSet<Multiaddr>,
    pending: std::collections::VecDeque<Multiaddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carrier {
    Tcp,
    Quic,
}

/// `/ip*/IP/tcp/PORT` or `/ip*/IP/udp/PORT/quic-v1`, with an optional trailing `/p2p/ID`; not a circuit.
fn ip_port(a: &Multiaddr) -> Option<(std::net::IpAddr, u16, Carrier)> {
    let mut ps: Vec<Protocol> = a.iter().collect();
    if matches!(ps.last(), Some(Protocol::P2p(_))) {
        ps.pop();
    }
    let ip = match ps.first()? {
        Protocol::Ip4(ip) => std::net::IpAddr::V4(*ip),
        Protocol::Ip6(ip) => std::net::IpAddr::V6(*ip),
        _ => return None,
    };
    match &ps[1..] {
        [Protocol::Tcp(port)] => Some((ip, *port, Carrier::Tcp)),
        [Protocol::Udp(port), Protocol::QuicV1] => Some((ip, *port, Carrier::Quic)),
        _ => None,
    }
}

impl TransportCandidates {
    /// The candidates on the other transport that an observed address `a` stands for (see the type).
    fn translate(&self, a: &Multiaddr) -> Vec<Multiaddr> {
        let Some((ip, port, carrier)) = ip_port(a) else {
            return vec![];
        };
        if ip.is_loopback() || ip.is_unspecified() {
            return vec![];
        }
        let ours: Vec<(std::net::IpAddr, u16, Carrier)> = self
            .listen
            .iter()
            .filter_map(ip_port)
            .filter(|(l, _, _)| l.is_ipv4() == ip.is_ipv4())
            .collect();
        if !ours.iter().any(|(_, p, c)| *p == port && *c == carrier) {
            return vec![];
        }
        let mut out: Vec<Multiaddr> = vec![];
        for (_, p, c) in ours {
            if c == carrier {
                continue;
            }
            let t = Multiaddr::empty().with(match ip {
                std::net::IpAddr::V4(v) => Protocol::Ip4(v),
                std::net::IpAddr::V6(v) => Protocol::Ip6(v),
            });
            let t = match c {
                Carrier::Tcp => t.with(Protocol::Tcp(p)),
                Carrier::Quic => t.with(Protocol::Udp(p)).with(Protocol::QuicV1),
            };
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }
}

impl NetworkBehaviour for TransportCandidates {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::NewListenAddr(e) if !self.listen.contains(e.addr) => self.listen.push(e.addr.clone()),
            FromSwarm::ExpiredListenAddr(e) => self.listen.retain(|a| a != e.addr),
            FromSwarm::NewExternalAddrCandidate(e) => {
                let mut a = e.addr.clone();
                if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
                    a.pop();
                }
                // Identify reports the same observation again and again; a bounded memory suffices.
                if self.seen.len() > 256 {
                    self.seen.clear();
                }
                if !self.seen.insert(a.clone()) {
                    return;
                }
                for t in self.translate(&a) {
                    if self.seen.insert(t.clone()) {
                        tracing::debug!(observed = %a, candidate = %t, "hole-punch candidate on the other transport");
                        self.pending.push_back(t);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        libp2p::core::util::unreachable(event)
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.pending.pop_front() {
            Some(a) => Poll::Ready(ToSwarm::NewExternalAddrCandidate(a)),
            None => Poll::Pending,
        }
    }
}

/// Limits of the relay this node runs for the owner's mesh (`[relay]`). libp2p's defaults (2 minutes and
/// 128 KiB per circuit) would cut a job's traffic mid-way.
#[derive(Debug, Clone)]
pub struct RelayLimits {
    pub max_circuit_duration: Duration,
    pub max_circuit_bytes: u64,
    pub max_reservations: usize,
    pub max_circuits: usize,
}

pub struct NetOptions {
    pub mdns: bool,
    pub relay_server: Option<RelayLimits>,
    /// Pre-shared mesh key: TCP with libp2p pnet, and no QUIC (pnet cannot wrap QUIC).
    pub psk: Option<[u8; 32]>,
    pub agent: String,
    /// Largest job envelope (dataset plus a resume checkpoint plus framing) and largest update envelope
    /// (a checkpoint or adapter plus framing), from `[jobs]`.
    pub max_job_message: usize,
    pub max_update_message: usize,
}

/// `true` for an address or endpoint that goes through a relay circuit.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

pub fn build_swarm(
    key: identity::Keypair,
    admission: SharedAdmission,
    opts: &NetOptions,
) -> anyhow::Result<Swarm<Behaviour>> {
    let make = |key: &identity::Keypair, relay_client: relay::client::Behaviour| -> anyhow::Result<Behaviour> {
        behaviour(key, relay_client, admission.clone(), opts)
    };
    // Connections between paired devices are meant to stay up; pairing-mode strangers are dropped by the
    // daemon's own deadline instead.
    let idle = Duration::from_secs(7 * 24 * 3600);
    let builder = libp2p::SwarmBuilder::with_existing_identity(key).with_tokio();
    let swarm = match opts.psk {
        None => builder
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_quic()
            .with_relay_client(noise::Config::new, yamux::Config::default)?
            .with_behaviour(|k, r| {
                make(k, r).map_err(|e| Box::<dyn std::error::Error + Send + Sync>::from(e.to_string()))
            })?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build(),
        Some(psk) => {
            let psk = pnet::PreSharedKey::new(psk);
            builder
                .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                    Ok(tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .and_then(move |socket, _| pnet::PnetConfig::new(psk).handshake(socket))
                        .upgrade(Version::V1Lazy)
                        .authenticate(noise::Config::new(key)?)
                        .multiplex(yamux::Config::default()))
                })?
                .with_relay_client(noise::Config::new, yamux::Config::default)?
                .with_behaviour(|k, r| {
                    make(k, r).map_err(|e| Box::<dyn std::error::Error + Send + Sync>::from(e.to_string()))
                })?
                .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
                .build()
        }
    };
    Ok(swarm)
}

fn behaviour(
    key: &identity::Keypair,
    relay_client: relay::client::Behaviour,
    admission: SharedAdmission,
    opts: &NetOptions,
) -> anyhow::Result<Behaviour> {
    let me = key.public().to_peer_id();
    let mdns = if opts.mdns {
        Some(mdns::tokio::Behaviour::new(mdns::Config::default(), me)?)
    } else {
        None
    };
    let relay = opts.relay_server.as_ref().map(|l| {
        // Reservations and circuits only for paired peers: a stranger cannot use the owner's relay.
        let paired =
            |a: SharedAdmission| move |peer: PeerId, _: &Multiaddr, _: Instant| lock(&a).trusted.contains(&peer);
        let cfg = relay::Config {
            max_reservations: l.max_reservations,
            max_circuits: l.max_circuits,
            max_circuit_duration: l.max_circuit_duration,
            max_circuit_bytes: l.max_circuit_bytes,
            reservation_rate_limiters: vec![Box::new(paired(admission.clone()))],
            circuit_src_rate_limiters: vec![Box::new(paired(admission.clone()))],
            ..Default::default()
        };
        relay::Behaviour::new(me, cfg)
    });
    let rr = request_response::Config::default().with_request_timeout(Duration::from_secs(30));
    let gate = Gate {
        state: admission.clone(),
    };
    Ok(Behaviour {
        gate,
        identify: identify::Behaviour::new(
            identify::Config::new("/bitnode/id/1".into(), key.public()).with_agent_version(opts.agent.clone()),
        ),
        ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
        mdns: mdns.into(),
        relay_client,
        relay: relay.into(),
        candidates: TransportCandidates::default(),
        dcutr: dcutr::Behaviour::new(me),
        autonat: autonat::Behaviour::new(
            me,
            autonat::Config {
                // Home meshes live on private ranges; let paired peers confirm those too.
                only_global_ips: false,
                // A relay often starts before the devices it serves: with the defaults (first probe after
                // 15 s, a retry 90 s after a probe that found no server) its hop protocol, which waits for
                // a confirmed external address, stays off for up to two minutes after its peers arrive.
                boot_delay: Duration::from_secs(5),
                retry_interval: Duration::from_secs(10),
                throttle_server_period: Duration::from_secs(15),
                ..Default::default()
            },
        ),
        // The handshake is two requests in turn: one stream at a time is all it needs.
        pair: request_response::Behaviour::with_codec(
            WireCodec::new(MAX_PAIR_MESSAGE),
            [(
                StreamProtocol::new(PAIR_PROTOCOL),
                request_response::ProtocolSupport::Full,
            )],
            rr.clone().with_max_concurrent_streams(1),
        ),
        caps: PairedOnly::new(
            request_response::Behaviour::with_codec(
                WireCodec::new(MAX_CAPS_MESSAGE),
                [(
                    StreamProtocol::new(CAPS_PROTOCOL),
                    request_response::ProtocolSupport::Full,
                )],
                rr.clone(),
            ),
            admission.clone(),
        ),
        // Jobs and updates may carry datasets and checkpoints of many MiB: give them time on slow links.
        job: PairedOnly::new(
            request_response::Behaviour::with_codec(
                WireCodec::new(opts.max_job_message),
                [(
                    StreamProtocol::new(JOB_PROTOCOL),
                    request_response::ProtocolSupport::Full,
                )],
                // Few at once: each may buffer up to the job limit before it is checked.
                rr.clone()
                    .with_request_timeout(Duration::from_secs(300))
                    .with_max_concurrent_streams(JOB_STREAMS),
            ),
            admission.clone(),
        ),
        update: PairedOnly::new(
            request_response::Behaviour::with_codec(
                WireCodec::new(opts.max_update_message),
                [(
                    StreamProtocol::new(UPDATE_PROTOCOL),
                    request_response::ProtocolSupport::Full,
                )],
                rr.clone()
                    .with_request_timeout(Duration::from_secs(300))
                    .with_max_concurrent_streams(UPDATE_STREAMS),
            ),
            admission.clone(),
        ),
        model: PairedOnly::new(
            request_response::Behaviour::with_codec(
                WireCodec::new(MAX_MODEL_MESSAGE),
                [(
                    StreamProtocol::new(MODEL_PROTOCOL),
                    request_response::ProtocolSupport::Full,
                )],
                rr.with_request_timeout(Duration::from_secs(60)),
            ),
            admission,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ma(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    fn listening() -> TransportCandidates {
        TransportCandidates {
            listen: [
                "/ip4/10.0.0.2/tcp/4001",
                "/ip4/10.0.0.2/udp/4002/quic-v1",
                "/ip4/127.0.0.1/tcp/4001",
            ]
            .map(ma)
            .to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn an_observation_with_our_port_stands_for_the_other_transport_too() {
        let t = listening();
        assert_eq!(
            t.translate(&ma("/ip4/1.2.3.4/tcp/4001")),
            vec![ma("/ip4/1.2.3.4/udp/4002/quic-v1")]
        );
        assert_eq!(
            t.translate(&ma("/ip4/1.2.3.4/udp/4002/quic-v1")),
            vec![ma("/ip4/1.2.3.4/tcp/4001")]
        );
    }

    #[test]
    fn no_candidate_from_a_changed_port_a_circuit_or_loopback() {
        let t = listening();
        // A NAT that changed the port (symmetric) says nothing about the other transport's mapping.
        assert!(t.translate(&ma("/ip4/1.2.3.4/tcp/51234")).is_empty());
        let circuit = ma("/ip4/1.2.3.4/tcp/4001")
            .with(Protocol::P2p(PeerId::random()))
            .with(Protocol::P2pCircuit);
        assert!(t.translate(&circuit).is_empty());
        assert!(t.translate(&ma("/ip4/127.0.0.1/tcp/4001")).is_empty());
        assert!(t.translate(&ma("/ip6/2001:db8::1/tcp/4001")).is_empty());
    }
}
