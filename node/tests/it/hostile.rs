//! A hostile peer: a real libp2p client that sends raw bytes (oversized, malformed) to a running daemon's
//! `/bitnode/*` protocols. The daemon must answer nothing for them, log a clear error, and keep serving
//! its other peers.
use crate::harness::*;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::{identity, noise, request_response as rr, tcp, yamux, Multiaddr, PeerId, StreamProtocol};
use std::time::Duration;

/// Sends the request bytes as they are; reads whatever comes back (bounded).
#[derive(Clone, Default)]
struct Raw;

impl rr::Codec for Raw {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;
    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        read_all(io).await
    }
    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        let v = read_all(io).await?;
        if v.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no answer"));
        }
        Ok(v)
    }
    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        r: Vec<u8>,
    ) -> std::io::Result<()> {
        write_all(io, &r).await
    }
    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        r: Vec<u8>,
    ) -> std::io::Result<()> {
        write_all(io, &r).await
    }
}

async fn read_all<T: AsyncRead + Unpin + Send>(io: &mut T) -> std::io::Result<Vec<u8>> {
    let mut v = vec![];
    io.take(1 << 20).read_to_end(&mut v).await?;
    Ok(v)
}

async fn write_all<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8]) -> std::io::Result<()> {
    io.write_all(bytes).await?;
    io.close().await
}

/// Sends each payload on `protocol` to `target`; returns, per payload, whether any answer came back.
pub fn send_raw(
    key: identity::Keypair,
    target: PeerId,
    addr: Multiaddr,
    protocol: &'static str,
    payloads: Vec<Vec<u8>>,
) -> Vec<Result<Vec<u8>, String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
            .unwrap()
            .with_behaviour(|_| {
                rr::Behaviour::with_codec(
                    Raw,
                    [(StreamProtocol::new(protocol), rr::ProtocolSupport::Full)],
                    rr::Config::default().with_request_timeout(Duration::from_secs(10)),
                )
            })
            .unwrap()
            .build();
        let mut ids = vec![];
        for p in payloads {
            ids.push(
                swarm
                    .behaviour_mut()
                    .send_request_with_addresses(&target, p, vec![addr.clone()]),
            );
        }
        let mut results: Vec<Option<Result<Vec<u8>, String>>> = vec![None; ids.len()];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while results.iter().any(|r| r.is_none()) {
            let ev = tokio::select! {
                ev = swarm.select_next_some() => ev,
                _ = tokio::time::sleep_until(deadline) => break,
            };
            if let libp2p::swarm::SwarmEvent::Behaviour(e) = ev {
                let (id, r) = match e {
                    rr::Event::Message {
                        message: rr::Message::Response { request_id, response },
                        ..
                    } => (request_id, Ok(response)),
                    rr::Event::OutboundFailure { request_id, error, .. } => (request_id, Err(error.to_string())),
                    _ => continue,
                };
                if let Some(i) = ids.iter().position(|x| *x == id) {
                    results[i] = Some(r);
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err("no outcome".into())))
            .collect()
    })
}

#[test]
fn oversized_and_malformed_messages_are_refused_and_the_daemon_keeps_serving() {
    let mut a = Node::init("target", "");
    let mut b = Node::init("friend", "");
    a.start();
    b.start();
    b.join(&a.invite());
    a.wait_connected(&b, Duration::from_secs(60));

    // The hostile key is paired with the target, so its connection is admitted and the bytes reach the
    // protocol decoders.
    let key = identity::Keypair::generate_ed25519();
    let hostile = key.public().to_peer_id();
    cli_ok(&a.home, &["pair", "add", &hostile.to_base58(), "--name", "hostile"]);
    let target: PeerId = a.id.parse().unwrap();
    let addr = a.tcp_addr();
    let caps = send_raw(
        key.clone(),
        target,
        addr.clone(),
        bitnode_protocol::wire::CAPS_PROTOCOL,
        vec![
            vec![0xAB; 1 << 20],                   // 1 MiB: past the 16 KiB limit
            vec![0xFF; 40],                        // not bincode of anything
            vec![],                                // empty stream
            vec![3, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F], // a length prefix claiming 4 GiB
        ],
    );
    for (i, r) in caps.iter().enumerate() {
        assert!(r.is_err(), "caps payload {i} got an answer: {r:?}");
    }
    let pair = send_raw(
        key,
        target,
        addr,
        bitnode_protocol::wire::PAIR_PROTOCOL,
        vec![vec![0x00; 5000], vec![9, 9, 9]],
    );
    for (i, r) in pair.iter().enumerate() {
        assert!(r.is_err(), "pair payload {i} got an answer: {r:?}");
    }
    wait_for(Duration::from_secs(20), "the daemon to log the bad messages", || {
        let log = a.log();
        (log.contains("bad capability message") && log.contains("bad pairing message")).then_some(())
    });
    // Still serving: the control socket answers, the friend is still connected with fresh pings.
    assert!(a.running());
    assert_eq!(a.wait_connected(&b, Duration::from_secs(30))["connected"], true);
    assert_eq!(b.wait_connected(&a, Duration::from_secs(30))["connected"], true);
    let c2 = Node::init("latecomer", "");
    let mut c2 = c2;
    c2.start();
    c2.join(&a.invite());
    a.wait_connected(&c2, Duration::from_secs(60));
}
