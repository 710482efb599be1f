//! Real daemons on loopback: pairing by invite, capability adverts, a refused stranger, unpairing,
//! reconnect after restart, and bad invite codes.
use crate::harness::*;
use bitnode_protocol::invite::Invite;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn now() -> u64 {
    bitnode::trust::now_unix()
}

#[test]
fn three_nodes_pair_refuse_a_stranger_unpair_and_reconnect() {
    let mut a = Node::init("alpha", "");
    let mut b = Node::init("bravo", "");
    // charlie pins its score: pins must reach the peers as advertised.
    let mut c = Node::init("charlie", "[capabilities]\nscore = 42.0");
    let mut d = Node::init("delta", "");
    for n in [&mut a, &mut b, &mut c, &mut d] {
        n.start();
    }

    // No daemon, no answer: the CLI says so.
    let idle = home("idle");
    cli_ok(&idle, &["init"]);
    cli_err(&idle, &["peers", "--json"], "no bitnode daemon is running");

    // Pair a-b, a-c, b-c through invites.
    b.join(&a.invite());
    let code_ac = a.invite();
    c.join(&code_ac);
    c.join(&b.invite());

    for (x, y) in [(&a, &b), (&a, &c), (&b, &a), (&b, &c), (&c, &a), (&c, &b)] {
        let p = x.wait_connected(y, T);
        assert_eq!(p["name"], y.name.as_str());
        assert_eq!(p["connection"], "direct", "{} -> {}: {p}", x.name, y.name);
        assert!(p["addresses"].as_array().is_some_and(|v| !v.is_empty()), "{p}");
        let caps = &p["capabilities"];
        assert!(caps["system_memory_bytes"].as_u64().unwrap_or(0) > 0, "{caps}");
        assert!(caps["backend"].is_string() && caps["device"].is_string(), "{caps}");
    }
    let cb = a.wait_connected(&c, T);
    assert_eq!(cb["capabilities"]["score"], 42.0);
    assert_eq!(cb["capabilities"]["pinned"], true);
    let ab = c.wait_connected(&a, T);
    assert!(
        ab["capabilities"]["ternary_gops"].as_f64().unwrap() > 0.0,
        "measured: {ab}"
    );
    assert_eq!(ab["capabilities"]["score"], ab["capabilities"]["ternary_gops"]);
    wait_for(T, "a round-trip time", || a.peer(&b.id)?["rtt_ms"].as_f64());

    // A used code is refused (replay), and the inviter keeps serving.
    cli_err(&c.home, &["pair", "join", &code_ac], "already used");
    b.join(&a.invite());

    // delta trusts alpha one-sidedly and dials it: alpha refuses the connection (no open invite), so
    // no bitnode protocol answers, and alpha never lists delta.
    let a_addr = a.status()["listen_addresses"][0].as_str().unwrap().to_string();
    cli_ok(&d.home, &["pair", "add", &a.id, "--name", "alpha", "--addr", &a_addr]);
    wait_for(T, "alpha to refuse delta", || {
        a.log()
            .contains("refused inbound connection from an unpaired peer")
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let pd = d.peer(&a.id).unwrap();
    assert_eq!(pd["connected"], false, "{pd}");
    assert!(pd["capabilities"].is_null(), "alpha must not answer delta: {pd}");
    assert!(a.peer(&d.id).is_none());
    assert!(a.peers().len() == 2 && b.peer(&d.id).is_none());
    assert!(!cli_ok(&a.home, &["pair", "list", "--json"]).contains(&d.id));

    // Bad codes: each gets a clear error, and the daemons keep serving.
    cli_err(&d.home, &["pair", "join", "hello"], "not a bitnode invite code");
    let good = a.invite();
    let mut inv = Invite::parse(&good, now()).unwrap();
    let mut damaged = good.clone();
    damaged.truncate(good.len() - 3);
    cli_err(&d.home, &["pair", "join", &damaged], "invite code");
    inv.expires = now() - 5;
    cli_err(&d.home, &["pair", "join", &inv.to_code()], "expired");
    // Right inviter, wrong secret: the handshake fails on both sides without revealing anything.
    let mut wrong = Invite::parse(&good, now()).unwrap();
    wrong.secret[0] ^= 1;
    cli_err(&d.home, &["pair", "join", &wrong.to_code()], "secret");
    // ...and the real code still works afterwards.
    d.join(&good);
    d.wait_connected(&a, T);
    a.wait_connected(&d, T);

    // pair remove cuts the connection at once and keeps it cut.
    cli_ok(&a.home, &["pair", "remove", "charlie"]);
    assert!(a.peer(&c.id).is_none());
    wait_for(T, "charlie to see alpha disconnect", || {
        (c.peer(&a.id)?["connected"] == false).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        c.peer(&a.id).unwrap()["connected"],
        false,
        "alpha must keep refusing charlie"
    );
    assert!(
        c.wait_connected(&b, T)["connected"] == true,
        "charlie keeps its other peers"
    );

    // A restarted node reconnects to its paired peers by itself (its listen port changes).
    b.stop();
    wait_for(T, "alpha to see bravo leave", || {
        (a.peer(&b.id)?["connected"] == false).then_some(())
    });
    b.start();
    b.wait_connected(&a, T);
    b.wait_connected(&c, T);
    a.wait_connected(&b, T);
    assert!(a.running() && c.running() && d.running());
}
