//! The local API's requests (typed in `crate::api`), answered from the daemon's state, and the pairing
//! protocol's messages routed through the pairing state machine (`crate::pairing`) with its effects
//! carried out here.
use super::*;

impl Daemon {
    /// Carries out what the pairing state machine asks for.
    pub(super) fn apply(&mut self, effects: Vec<PairEffect>) {
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

    pub(super) fn on_pair(&mut self, e: rr::Event<Inbound<PairRequest>, Inbound<PairResponse>>) {
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

    pub(super) fn on_control(&mut self, c: Ctl) {
        let Ctl { req, reply, .. } = c;
        let resp = match req {
            // The control server sends the job requests to the job manager.
            Request::Submit { .. }
            | Request::Jobs
            | Request::JobShow { .. }
            | Request::JobCancel { .. }
            | Request::JobFollow { .. }
            | Request::ModelsChanged => Response::err("a job request reached the network actor"),
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

    pub(super) fn status(&self) -> api::Status {
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
            api_url: self.api_url.clone(),
        }
    }

    pub(super) fn peers(&self) -> Vec<PeerInfo> {
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
                capabilities: st.and_then(|s| s.caps.theirs().cloned()),
            });
        }
        out
    }

    pub(super) fn invite(&mut self, ttl_secs: u64) -> Response {
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

    pub(super) fn pair_add(&mut self, peer: &str, name: Option<String>, addrs: &[String]) -> Response {
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

    pub(super) fn pair_remove(&mut self, who: &str) -> Response {
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
