//! Pairing by invite code, as a state machine with no I/O: inputs are the daemon's requests, the peer's
//! messages and the clock; outputs are the answer to send and [`Effect`]s for the daemon to carry out
//! (trust a peer, send a request, end a join, drop a peer). Unit-tested below without sockets; the
//! daemon's network loop only routes messages in and effects out.
//!
//! The protocol (`/bitnode/pair/1`, two round trips): the joiner sends `Hello` with a fresh nonce; the
//! inviter answers `Challenge` with its own nonce and an HMAC proving it knows the invite's secret (the
//! inviter proves first, so a joiner never proves anything to an impostor); the joiner checks it and sends
//! `Prove` with its own HMAC; the inviter checks that, records the joiner, and answers `Welcome`. Both
//! HMACs bind the role, the invite id, both peer ids as Noise authenticated them and both nonces. A code
//! works once; three failed proofs burn it.
use bitnode_protocol::invite::{pair_mac, verify_pair_mac, Invite, Role};
use bitnode_protocol::mesh::{PairRequest, PairResponse};
use bitnode_protocol::wire::check_name;
use libp2p::{Multiaddr, PeerId};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a join may take end to end (dial, two round trips).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(45);
/// Failed proofs after which an invite is burned (a 256-bit secret cannot be guessed; this stops noise).
pub const MAX_INVITE_FAILURES: u32 = 3;
pub const MAX_OPEN_INVITES: usize = 16;

struct OpenInvite {
    secret: [u8; 32],
    expires: Instant,
    used: bool,
    failures: u32,
}

/// Inviter side, between `Hello` and `Prove`.
struct Session {
    invite_id: [u8; 16],
    joiner_nonce: [u8; 32],
    inviter_nonce: [u8; 32],
}

/// Joiner side, from `bitnode pair join` until `Welcome` or failure.
struct Join {
    invite: Invite,
    nonce: [u8; 32],
    addrs: Vec<Multiaddr>,
    deadline: Instant,
    /// The last failed dial to the inviter, for the error if the pairing request itself cannot be sent.
    /// A failed dial alone fails nothing: it may be DCUtR's hole-punch dial while the relayed connection
    /// carries the handshake (a router that answers with RST or ICMP fails that dial at once).
    last_dial_error: Option<String>,
}

/// What the daemon does for the state machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Record `peer` in the trust list under `name` (`via`: "invite" or "join"), reachable at `addrs`,
    /// and start treating it as paired.
    Trust {
        peer: PeerId,
        name: String,
        via: &'static str,
        addrs: Vec<Multiaddr>,
    },
    /// Send a pairing request to `peer` (dialing `addrs` if not connected).
    Send {
        peer: PeerId,
        req: PairRequest,
        addrs: Vec<Multiaddr>,
    },
    /// The join with `peer` ended: the `bitnode pair join` waiting on it gets this answer.
    JoinDone {
        peer: PeerId,
        result: Result<String, String>,
    },
    /// A failed join's inviter: drop its connection unless it is paired after all.
    Drop(PeerId),
}

pub struct Pairing {
    me: PeerId,
    name: String,
    invites: HashMap<[u8; 16], OpenInvite>,
    sessions: HashMap<PeerId, Session>,
    joins: HashMap<PeerId, Join>,
}

impl Pairing {
    pub fn new(me: PeerId, name: String) -> Pairing {
        Pairing {
            me,
            name,
            invites: HashMap::new(),
            sessions: HashMap::new(),
            joins: HashMap::new(),
        }
    }

    /// Invites that can still be used (not yet expired, used or burned).
    pub fn open_invites(&self) -> usize {
        self.invites.len()
    }

    /// Until when the connection gate must admit strangers (the latest unused invite's expiry).
    pub fn open_until(&self) -> Option<Instant> {
        self.invites.values().filter(|i| !i.used).map(|i| i.expires).max()
    }

    pub fn is_joining(&self, peer: &PeerId) -> bool {
        self.joins.contains_key(peer)
    }

    /// A new one-time invite valid for `ttl_secs`, carrying `addrs` (relayed ones first) for the joiner.
    pub fn invite(
        &mut self,
        ttl_secs: u64,
        addrs: Vec<String>,
        now: Instant,
        now_unix: u64,
        rand: impl FnOnce() -> ([u8; 16], [u8; 32]),
    ) -> Result<Invite, String> {
        if !(10..=7 * 24 * 3600).contains(&ttl_secs) {
            return Err("--ttl must be between 10s and 7d".into());
        }
        if self.invites.values().filter(|i| !i.used).count() >= MAX_OPEN_INVITES {
            return Err(format!(
                "{MAX_OPEN_INVITES} invites are already open; wait for them to expire"
            ));
        }
        let (id, secret) = rand();
        let inv = Invite::new(self.me.to_bytes(), addrs, id, secret, now_unix + ttl_secs);
        self.invites.insert(
            id,
            OpenInvite {
                secret,
                expires: now + Duration::from_secs(ttl_secs),
                used: false,
                failures: 0,
            },
        );
        Ok(inv)
    }

    /// Starts joining an invite (`bitnode pair join`): the inviter, and the `Hello` to send it.
    /// `connected`: whether we already hold a connection to that inviter (then the code may carry no
    /// address).
    pub fn join(
        &mut self,
        code: &str,
        now: Instant,
        now_unix: u64,
        nonce: [u8; 32],
        connected: impl Fn(&PeerId) -> bool,
    ) -> Result<(PeerId, Effect), String> {
        let inv = Invite::parse(code, now_unix).map_err(|e| format!("{e:#}"))?;
        let peer =
            PeerId::from_bytes(&inv.inviter).map_err(|_| "the invite code holds an invalid peer id".to_string())?;
        if peer == self.me {
            return Err("this invite was made by this node; run `bitnode pair join` on the other device".into());
        }
        if self.joins.contains_key(&peer) {
            return Err(format!("already joining {peer}"));
        }
        let mut addrs = vec![];
        for s in &inv.addrs {
            match s.parse::<Multiaddr>() {
                Ok(a) => addrs.push(crate::daemon::with_peer(&a, &peer)),
                Err(_) => return Err(format!("the invite code holds a malformed address {s:?}")),
            }
        }
        if addrs.is_empty() && !connected(&peer) {
            return Err("the invite code holds no address to reach the inviter at".into());
        }
        let send = Effect::Send {
            peer,
            req: PairRequest::Hello {
                invite_id: inv.id,
                nonce,
            },
            addrs: addrs.clone(),
        };
        self.joins.insert(
            peer,
            Join {
                invite: inv,
                nonce,
                addrs,
                deadline: now + JOIN_TIMEOUT,
                last_dial_error: None,
            },
        );
        Ok((peer, send))
    }

    /// A dial to `peer` failed; remembered for the message should the join fail for want of a route.
    pub fn dial_failed(&mut self, peer: &PeerId, error: String) {
        if let Some(j) = self.joins.get_mut(peer) {
            j.last_dial_error = Some(error);
        }
    }

    /// The pairing request to `peer` could not be sent at all (no connection could carry it).
    pub fn unreachable(&mut self, peer: &PeerId) -> Vec<Effect> {
        let why = self
            .joins
            .get(peer)
            .and_then(|j| j.last_dial_error.clone())
            .unwrap_or_else(|| "no address of the inviter answered".into());
        self.fail(peer, format!("could not reach the inviter: {why}"))
    }

    /// Ends the join with `peer`, if one runs, with `why`.
    pub fn fail(&mut self, peer: &PeerId, why: String) -> Vec<Effect> {
        if self.joins.remove(peer).is_none() {
            return vec![];
        }
        tracing::warn!(%peer, "join failed: {why}");
        vec![
            Effect::JoinDone {
                peer: *peer,
                result: Err(why),
            },
            Effect::Drop(*peer),
        ]
    }

    /// The clock: expired invites go (used ones stay until then, so a replay is told "already used"),
    /// and joins past their deadline fail.
    pub fn tick(&mut self, now: Instant) -> Vec<Effect> {
        self.invites.retain(|_, i| now < i.expires);
        let late: Vec<PeerId> = self
            .joins
            .iter()
            .filter(|(_, j)| now >= j.deadline)
            .map(|(p, _)| *p)
            .collect();
        let mut out = vec![];
        for p in late {
            out.extend(self.fail(
                &p,
                "timed out waiting for the inviter (is its daemon running and reachable?)".into(),
            ));
        }
        out
    }

    /// A stranger left (or its pairing window closed): forget its half-done handshake.
    pub fn forget(&mut self, peer: &PeerId) {
        self.sessions.remove(peer);
    }

    /// Inviter side: a request from `peer`, whose identify-reported listen addresses are `listen`.
    /// Returns the answer and what to do.
    pub fn on_request(
        &mut self,
        peer: PeerId,
        req: PairRequest,
        listen: &[Multiaddr],
        now: Instant,
        nonce: [u8; 32],
    ) -> (PairResponse, Vec<Effect>) {
        let refuse = |reason: &str| {
            tracing::warn!(%peer, "pairing refused: {reason}");
            (PairResponse::Refused { reason: reason.into() }, vec![])
        };
        match req {
            PairRequest::Hello {
                invite_id,
                nonce: joiner_nonce,
            } => {
                let Some(inv) = self.invites.get(&invite_id) else {
                    return refuse("unknown invite (it may have expired, been used, or been made by another node)");
                };
                if inv.used {
                    return refuse("this invite was already used");
                }
                if now >= inv.expires {
                    return refuse("this invite has expired");
                }
                let mac = pair_mac(
                    &inv.secret,
                    Role::Inviter,
                    &invite_id,
                    &self.me.to_bytes(),
                    &peer.to_bytes(),
                    &joiner_nonce,
                    &nonce,
                );
                self.sessions.insert(
                    peer,
                    Session {
                        invite_id,
                        joiner_nonce,
                        inviter_nonce: nonce,
                    },
                );
                (PairResponse::Challenge { nonce, mac }, vec![])
            }
            PairRequest::Prove { invite_id, mac, name } => {
                let Some(s) = self.sessions.remove(&peer) else {
                    return refuse("no pairing in progress with this peer (send Hello first)");
                };
                if s.invite_id != invite_id {
                    return refuse("the proof names a different invite");
                }
                let Some(inv) = self.invites.get_mut(&invite_id) else {
                    return refuse("unknown invite (it may have expired meanwhile)");
                };
                if inv.used {
                    return refuse("this invite was already used");
                }
                let ok = verify_pair_mac(
                    &mac,
                    &inv.secret,
                    Role::Joiner,
                    &invite_id,
                    &self.me.to_bytes(),
                    &peer.to_bytes(),
                    &s.joiner_nonce,
                    &s.inviter_nonce,
                );
                if !ok {
                    inv.failures += 1;
                    if inv.failures >= MAX_INVITE_FAILURES {
                        inv.used = true;
                    }
                    return refuse("the proof did not verify: wrong or tampered invite code");
                }
                inv.used = true;
                let name = match check_name(&name) {
                    Ok(()) => name,
                    Err(_) => crate::trust::default_name(&peer),
                };
                tracing::info!(%peer, %name, "paired (invite)");
                (
                    PairResponse::Welcome {
                        name: self.name.clone(),
                    },
                    // Inbound connections come from ephemeral ports; the listen addresses identify
                    // reported are what we can dial later.
                    vec![Effect::Trust {
                        peer,
                        name,
                        via: "invite",
                        addrs: listen.to_vec(),
                    }],
                )
            }
        }
    }

    /// Joiner side: the inviter's answer. `listen`: its identify-reported listen addresses.
    pub fn on_response(&mut self, peer: PeerId, resp: PairResponse, listen: &[Multiaddr]) -> Vec<Effect> {
        let Some(j) = self.joins.get(&peer) else {
            tracing::warn!(%peer, "unexpected pairing response ignored");
            return vec![];
        };
        match resp {
            PairResponse::Challenge { nonce, mac } => {
                let inv = &j.invite;
                let me = self.me.to_bytes();
                let ok = verify_pair_mac(
                    &mac,
                    &inv.secret,
                    Role::Inviter,
                    &inv.id,
                    &peer.to_bytes(),
                    &me,
                    &j.nonce,
                    &nonce,
                );
                if !ok {
                    return self.fail(
                        &peer,
                        "proof mismatch: the inviter's proof does not match this code's secret (wrong or tampered code?)"
                            .into(),
                    );
                }
                let mac = pair_mac(
                    &inv.secret,
                    Role::Joiner,
                    &inv.id,
                    &peer.to_bytes(),
                    &me,
                    &j.nonce,
                    &nonce,
                );
                vec![Effect::Send {
                    peer,
                    req: PairRequest::Prove {
                        invite_id: inv.id,
                        mac,
                        name: self.name.clone(),
                    },
                    addrs: vec![],
                }]
            }
            PairResponse::Welcome { name } => {
                let Some(j) = self.joins.remove(&peer) else {
                    return vec![];
                };
                let name = match check_name(&name) {
                    Ok(()) => name,
                    Err(_) => crate::trust::default_name(&peer),
                };
                let mut addrs: Vec<Multiaddr> = j.addrs.iter().map(crate::daemon::strip_peer).collect();
                addrs.extend(listen.iter().cloned());
                tracing::info!(%peer, %name, "paired (joined)");
                vec![
                    Effect::Trust {
                        peer,
                        name: name.clone(),
                        via: "join",
                        addrs,
                    },
                    Effect::JoinDone { peer, result: Ok(name) },
                ]
            }
            PairResponse::Refused { reason } => self.fail(&peer, format!("the inviter refused: {reason}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519().public().to_peer_id()
    }

    /// Drives one side's requests into the other and back, as the network would.
    fn handshake(inviter: &mut Pairing, joiner: &mut Pairing, code: &str, now: Instant) -> Vec<Effect> {
        let (ip, hello) = joiner.join(code, now, 1000, [7; 32], |_| false).expect("join starts");
        assert_eq!(ip, inviter.me);
        let Effect::Send { req, .. } = hello else {
            panic!("{hello:?}")
        };
        let (resp, fx) = inviter.on_request(joiner.me, req, &[], now, [9; 32]);
        assert!(fx.is_empty());
        let mut fx = joiner.on_response(ip, resp, &[]);
        if !matches!(fx.last(), Some(Effect::Send { .. })) {
            return fx;
        }
        let Some(Effect::Send { req, .. }) = fx.pop() else {
            unreachable!()
        };
        let (resp, mut ifx) = inviter.on_request(joiner.me, req, &[], now, [9; 32]);
        ifx.extend(joiner.on_response(ip, resp, &[]));
        ifx
    }

    fn code(p: &mut Pairing, now: Instant) -> String {
        p.invite(600, vec!["/ip4/127.0.0.1/tcp/1".into()], now, 1000, || {
            ([1; 16], [2; 32])
        })
        .expect("invite")
        .to_code()
    }

    #[test]
    fn a_code_pairs_both_sides_once() {
        let now = Instant::now();
        let (mut a, mut b) = (Pairing::new(peer(), "a".into()), Pairing::new(peer(), "b".into()));
        let c = code(&mut a, now);
        assert!(a.open_until().is_some());
        let fx = handshake(&mut a, &mut b, &c, now);
        assert!(fx.contains(&Effect::Trust {
            peer: b.me,
            name: "b".into(),
            via: "invite",
            addrs: vec![]
        }));
        assert!(fx
            .iter()
            .any(|e| matches!(e, Effect::Trust { peer, via: "join", .. } if *peer == a.me)));
        assert!(fx.contains(&Effect::JoinDone {
            peer: a.me,
            result: Ok("a".into())
        }));
        // Used: the gate closes, and a replay is refused by name.
        assert_eq!(a.open_until(), None);
        let mut c2 = Pairing::new(peer(), "c".into());
        let fx = handshake(&mut a, &mut c2, &c, now);
        assert!(
            matches!(&fx[..], [Effect::JoinDone { result: Err(e), .. }, Effect::Drop(_)] if e.contains("already used")),
            "{fx:?}"
        );
    }

    #[test]
    fn a_wrong_secret_fails_the_inviters_proof_and_three_failures_burn_the_code() {
        let now = Instant::now();
        let mut a = Pairing::new(peer(), "a".into());
        let good = code(&mut a, now);
        // The same invite id and inviter with another secret: the inviter's proof does not match.
        let forged = Invite::new(
            a.me.to_bytes(),
            vec!["/ip4/127.0.0.1/tcp/1".into()],
            [1; 16],
            [3; 32],
            1600,
        )
        .to_code();
        let mut b = Pairing::new(peer(), "b".into());
        let fx = handshake(&mut a, &mut b, &forged, now);
        assert!(
            matches!(&fx[..], [Effect::JoinDone { result: Err(e), .. }, _] if e.contains("proof mismatch")),
            "{fx:?}"
        );
        // A joiner that proves with the wrong secret three times burns the code.
        for _ in 0..MAX_INVITE_FAILURES {
            let j = peer();
            let (resp, _) = a.on_request(
                j,
                PairRequest::Hello {
                    invite_id: [1; 16],
                    nonce: [4; 32],
                },
                &[],
                now,
                [5; 32],
            );
            assert!(matches!(resp, PairResponse::Challenge { .. }));
            let (resp, fx) = a.on_request(
                j,
                PairRequest::Prove {
                    invite_id: [1; 16],
                    mac: [0; 32],
                    name: "x".into(),
                },
                &[],
                now,
                [5; 32],
            );
            assert!(matches!(resp, PairResponse::Refused { .. }) && fx.is_empty());
        }
        let fx = handshake(&mut a, &mut Pairing::new(peer(), "d".into()), &good, now);
        assert!(
            matches!(&fx[..], [Effect::JoinDone { result: Err(e), .. }, _] if e.contains("already used")),
            "{fx:?}"
        );
    }

    #[test]
    fn joins_time_out_and_a_failed_dial_alone_fails_nothing() {
        let now = Instant::now();
        let mut a = Pairing::new(peer(), "a".into());
        let c = code(&mut a, now);
        let mut b = Pairing::new(peer(), "b".into());
        let (ip, _) = b.join(&c, now, 1000, [7; 32], |_| false).expect("join");
        b.dial_failed(&ip, "Connection refused".into());
        assert!(b.is_joining(&ip), "a refused dial (a hole punch) must not end the join");
        assert!(b.tick(now + Duration::from_secs(1)).is_empty());
        let fx = b.unreachable(&ip);
        assert!(
            matches!(&fx[..], [Effect::JoinDone { result: Err(e), .. }, Effect::Drop(_)] if e.contains("Connection refused")),
            "{fx:?}"
        );
        let (ip, _) = b.join(&c, now, 1000, [7; 32], |_| false).expect("join again");
        let fx = b.tick(now + JOIN_TIMEOUT);
        assert!(matches!(&fx[..], [Effect::JoinDone { result: Err(e), .. }, _] if e.contains("timed out")));
        assert!(!b.is_joining(&ip));
        // Expired invites go at the tick.
        a.tick(now + Duration::from_secs(601));
        assert_eq!((a.open_invites(), a.open_until()), (0, None));
    }

    #[test]
    fn own_codes_bad_ttls_and_too_many_invites_are_refused() {
        let now = Instant::now();
        let mut a = Pairing::new(peer(), "a".into());
        let c = code(&mut a, now);
        assert!(a
            .join(&c, now, 1000, [0; 32], |_| false)
            .unwrap_err()
            .contains("made by this node"));
        assert!(a.invite(5, vec![], now, 1000, || ([0; 16], [0; 32])).is_err());
        for i in 1..MAX_OPEN_INVITES {
            a.invite(60, vec![], now, 1000, || ([i as u8 + 10; 16], [0; 32]))
                .expect("room");
        }
        assert!(a
            .invite(60, vec![], now, 1000, || ([99; 16], [0; 32]))
            .unwrap_err()
            .contains("already open"));
    }
}
