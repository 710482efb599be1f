//! The daemon's view of its peers: connections (direct or through a relay), identify, ping, mDNS,
//! redials, relay reservations, hole-punch retries, and the capability exchange with paired peers.
use super::*;

impl Daemon {
    pub(super) fn redial(&mut self, now: Instant) {
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

    /// Listen through every paired relay we are connected to (and the configured ones), so that peers
    /// behind other NATs can reach us; DCUtR then replaces those relayed connections with direct ones.
    pub(super) fn ensure_relay_reservations(&mut self) {
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

    pub(super) fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
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
                        let _ = self.jobs.send(jobs::Internal::PeerUp(peer_id));
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
                        st.caps.on_disconnected();
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

    pub(super) fn on_behaviour(&mut self, ev: BehaviourEvent) {
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
            // The job protocols' answers go to the requests' reply channels, and what peers ask goes to the
            // job manager with the channel to answer on.
            BehaviourEvent::Job(e) => {
                let done = handle::answered(&e);
                if let Some((peer, req, ch)) = handle::route(&mut self.pending.job, e, "job") {
                    let _ = self.jobs.send(jobs::Internal::JobAsked { peer, req, ch });
                }
                if let Some((peer, next)) = done.and_then(|rid| self.pending.job_out.done(rid)) {
                    self.send_job(peer, next);
                }
            }
            BehaviourEvent::Update(e) => {
                let done = handle::answered(&e);
                if let Some((peer, req, ch)) = handle::route(&mut self.pending.update, e, "update") {
                    let _ = self.jobs.send(jobs::Internal::UpdateAsked { peer, req, ch });
                }
                if let Some((peer, next)) = done.and_then(|rid| self.pending.update_out.done(rid)) {
                    self.send_update(peer, next);
                }
            }
            BehaviourEvent::Model(e) => {
                if let Some((peer, req, ch)) = handle::route(&mut self.pending.model, e, "model") {
                    let _ = self.jobs.send(jobs::Internal::ModelAsked { peer, req, ch });
                }
            }
            _ => {}
        }
    }

    // ---- capabilities ----

    pub(super) fn advert(&self) -> CapsAdvert {
        CapsAdvert {
            name: self.name.clone(),
            caps: self.caps.clone(),
        }
    }

    pub(super) fn send_caps(&mut self, peer: PeerId) {
        let a = self.advert();
        self.swarm.behaviour_mut().caps.inner.send_request(&peer, Ok(a));
        self.peers.entry(peer).or_default().caps.sent();
    }

    /// Closes the relayed connections of peers whose hole punch failed and is due for another round; the
    /// redial loop then reconnects through the relay, and DCUtR tries again on the new relayed connection.
    pub(super) fn retry_hole_punches(&mut self, now: Instant) {
        let mut close = vec![];
        // Closing the relayed connection would cut the jobs it carries: a retry waits until none runs.
        let busy = &self.load.job_peers;
        for (id, st) in self.peers.iter_mut() {
            if st.punch_retry_at.is_some_and(|t| now >= t) {
                if busy.contains(id) {
                    st.punch_retry_at = Some(now + PUNCH_RETRY);
                    continue;
                }
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
    pub(super) fn retry_caps(&mut self) {
        let due: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(p, s)| s.caps.due() && s.conns.values().any(|c| c.identified) && self.trust.contains(p))
            .map(|(p, _)| *p)
            .collect();
        for p in due {
            self.send_caps(p);
        }
    }

    pub(super) fn push_caps_if_changed(&mut self) {
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
            self.peers.entry(p).or_default().caps.ours_changed();
            self.send_caps(p);
        }
    }

    pub(super) fn on_caps(&mut self, e: rr::Event<Inbound<CapsAdvert>, Inbound<CapsAck>>) {
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
                let score = request.caps.score;
                let trusted = self.is_trusted(&peer);
                // No entry is made for a stranger (the gate lets it in only for an open invite).
                let st = if trusted {
                    Some(self.peers.entry(peer).or_default())
                } else {
                    self.peers.get_mut(&peer)
                };
                let verdict = st.map_or(caps::OnAdvert::Ignore, |st| st.caps.on_advert(request.caps, trusted));
                match verdict {
                    caps::OnAdvert::Ignore => {
                        tracing::warn!(%peer, "capability advert from an unpaired peer ignored");
                    }
                    caps::OnAdvert::Ack { send_ours } => {
                        tracing::debug!(%peer, score, "capabilities received");
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .caps
                            .inner
                            .send_response(channel, Ok(CapsAck::Ok));
                        if send_ours {
                            self.send_caps(peer);
                        }
                    }
                }
            }
            rr::Event::Message {
                peer,
                message: rr::Message::Response { response, .. },
                ..
            } => {
                let trusted = self.is_trusted(&peer);
                if let Some(st) = self.peers.get_mut(&peer) {
                    st.caps.on_answer(matches!(response, Ok(CapsAck::Ok)), trusted);
                }
            }
            rr::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "capability exchange failed: {error}");
            }
            rr::Event::OutboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "capability advert not delivered: {error}");
                if let Some(st) = self.peers.get_mut(&peer) {
                    st.caps.on_failure();
                }
            }
            _ => {}
        }
    }

    // ---- pairing ----
}
