//! `PairedOnly<B>`: a protocol that only paired peers may open. The connection gate already refuses
//! every unpaired peer except during an open invite's pairing window, when strangers may connect to run
//! the pairing handshake. This wrapper makes that window as narrow on the wire as it is in the daemon:
//! an inbound stream of the wrapped protocol (capabilities, jobs, updates, model chunks) from a peer that
//! is not paired *at the moment the stream opens* is refused during protocol negotiation, before a single
//! byte of its message is read. A stranger in the window can therefore open only `/bitnode/pair/1`
//! (4 KiB messages, one stream at a time), and cannot make the daemon buffer a job envelope of hundreds
//! of MiB. Once the handshake has made it a paired peer, the same connection carries everything: the check
//! is per stream, not per connection.
//!
//! Outbound streams are not filtered: the daemon itself decides whom it talks to.
use crate::net::{lock, SharedAdmission};
use libp2p::core::upgrade::DeniedUpgrade;
use libp2p::core::{transport::PortUse, Endpoint, Multiaddr};
use libp2p::swarm::handler::{
    ConnectionEvent, ConnectionHandler, ConnectionHandlerEvent, FullyNegotiatedInbound, ListenUpgradeError,
    SendWrapper, SubstreamProtocol,
};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::PeerId;
use std::task::{Context, Poll};

pub struct PairedOnly<B> {
    pub inner: B,
    admission: SharedAdmission,
}

impl<B> PairedOnly<B> {
    pub fn new(inner: B, admission: SharedAdmission) -> Self {
        PairedOnly { inner, admission }
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for PairedOnly<B> {
    type ConnectionHandler = Handler<THandler<B>>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner.handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let inner = self
            .inner
            .handle_established_inbound_connection(id, peer, local, remote)?;
        Ok(Handler {
            inner,
            peer,
            admission: self.admission.clone(),
        })
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(id, peer, addresses, effective_role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let inner = self
            .inner
            .handle_established_outbound_connection(id, peer, addr, role_override, port_use)?;
        Ok(Handler {
            inner,
            peer,
            admission: self.admission.clone(),
        })
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.inner.on_swarm_event(event)
    }

    fn on_connection_handler_event(&mut self, peer: PeerId, id: ConnectionId, event: THandlerOutEvent<Self>) {
        self.inner.on_connection_handler_event(peer, id, event)
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}

/// The inner handler, with inbound streams offered only while the peer is paired.
pub struct Handler<H> {
    inner: H,
    peer: PeerId,
    admission: SharedAdmission,
}

impl<H: ConnectionHandler> ConnectionHandler for Handler<H> {
    type FromBehaviour = H::FromBehaviour;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = either::Either<SendWrapper<H::InboundProtocol>, SendWrapper<DeniedUpgrade>>;
    type OutboundProtocol = H::OutboundProtocol;
    type InboundOpenInfo = either::Either<H::InboundOpenInfo, ()>;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    /// Asked by the swarm for every inbound stream, so the trust list is read when the stream opens.
    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        let p = self.inner.listen_protocol();
        if lock(&self.admission).trusted.contains(&self.peer) {
            p.map_upgrade(|u| either::Either::Left(SendWrapper(u)))
                .map_info(either::Either::Left)
        } else {
            SubstreamProtocol::new(
                either::Either::Right(SendWrapper(DeniedUpgrade)),
                either::Either::Right(()),
            )
        }
    }

    fn connection_keep_alive(&self) -> bool {
        self.inner.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>> {
        self.inner.poll(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        self.inner.on_behaviour_event(event)
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        use either::Either::{Left, Right};
        use futures::future::Either as F;
        let inner = match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol, info }) => {
                match (protocol, info) {
                    (F::Left(protocol), Left(info)) => {
                        ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol, info })
                    }
                    // A denied stream never negotiates (its output type is uninhabited).
                    (F::Right(never), _) => match never {},
                    (F::Left(_), Right(())) => return,
                }
            }
            ConnectionEvent::ListenUpgradeError(ListenUpgradeError { error, info }) => match (error, info) {
                (Left(error), Left(info)) => ConnectionEvent::ListenUpgradeError(ListenUpgradeError { error, info }),
                (Right(never), _) => match never {},
                (Left(_), Right(())) => return,
            },
            ConnectionEvent::FullyNegotiatedOutbound(e) => ConnectionEvent::FullyNegotiatedOutbound(e),
            ConnectionEvent::DialUpgradeError(e) => ConnectionEvent::DialUpgradeError(e),
            ConnectionEvent::AddressChange(e) => ConnectionEvent::AddressChange(e),
            ConnectionEvent::LocalProtocolsChange(e) => ConnectionEvent::LocalProtocolsChange(e),
            ConnectionEvent::RemoteProtocolsChange(e) => ConnectionEvent::RemoteProtocolsChange(e),
            // A variant added by a later libp2p: nothing the inner handler needs from us.
            _ => return,
        };
        self.inner.on_connection_event(inner)
    }
}
