//! State on disk: identity and trust list are private (0600), survive crashes mid-write, and corrupt
//! files give a clear error instead of a panic or a silently empty trust list.
use crate::harness::*;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn identity_and_trust_list_are_private_atomic_and_validated() {
    let h = home("state");
    let out = cli_ok(&h, &["init", "--name", "desk"]);
    assert!(out.contains("peer id"), "{out}");
    let id = cli_ok(&h, &["id"]).trim().to_string();
    assert!(id.starts_with("12D3KooW"), "{id}");
    assert_eq!(mode(&h.join("identity.key")), 0o600);
    assert_eq!(mode(&h.join("config.toml")), 0o600);
    let cfg = std::fs::read_to_string(h.join("config.toml")).unwrap();
    assert!(
        cfg.contains("name = \"desk\"") && cfg.contains("# reconnect_secs = 5"),
        "{cfg}"
    );
    // init never replaces an identity.
    let again = cli_ok(&h, &["init", "--name", "other"]);
    assert!(again.contains("already initialized"), "{again}");
    assert_eq!(cli_ok(&h, &["id"]).trim(), id);
    cli_err(&h, &["init", "--name", "bad\nname"], "control characters");

    // Manual pairing with no daemon writes the trust list directly, 0600.
    let other = "12D3KooWGxwsKyTDbgwnjeW3318mP1BC7kf6ErRK4pv2hT62yrQh";
    cli_ok(
        &h,
        &[
            "pair",
            "add",
            other,
            "--name",
            "phone",
            "--addr",
            "/ip4/10.0.0.7/tcp/7878",
        ],
    );
    assert_eq!(mode(&h.join("trust.json")), 0o600);
    assert!(cli_ok(&h, &["pair", "list"]).contains("phone"));
    cli_err(&h, &["pair", "add", "not-a-peer-id"], "not a peer id");
    cli_err(&h, &["pair", "add", other, "--addr", "nonsense"], "address");

    // A crash mid-write leaves a temporary file beside the real one: readers ignore it.
    std::fs::write(h.join(".trust.json.tmp-4242"), b"{ half a json").unwrap();
    assert!(cli_ok(&h, &["pair", "list", "--json"]).contains(other));

    // A daemon starts on this state, lists the peer (offline), and keeps the file intact across stops.
    let mut n = Node::adopt(h.clone(), "desk");
    n.start();
    let p = n.peer(other).unwrap();
    assert_eq!(p["connected"], false);
    assert_eq!(p["name"], "phone");
    assert_eq!(mode(&h.join("bitnode.sock")), 0o600);
    // A malformed control request gets an error reply; the daemon keeps answering.
    {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(h.join("bitnode.sock")).unwrap();
        s.write_all(b"{\"cmd\":\"format_disk\"}\n").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        assert!(
            line.contains("\"ok\":false") && line.contains("malformed request"),
            "{line}"
        );
    }
    assert_eq!(n.status()["name"], "desk");
    cli_ok(&h, &["pair", "remove", "phone"]);
    assert!(n.peers().is_empty());
    n.stop();
    assert!(
        !h.join("bitnode.sock").exists(),
        "the socket is removed on a graceful stop"
    );
    cli_err(&h, &["status"], "no bitnode daemon is running");

    // `bitnode stop` ends it the same way.
    n.start();
    assert_eq!(cli_ok(&h, &["stop"]).trim(), "stopped");
    wait_for(
        Duration::from_secs(10),
        "the daemon to exit after `bitnode stop`",
        || (!n.running()).then_some(()),
    );
    cli_err(&h, &["stop"], "no bitnode daemon is running");
    // A daemon killed with SIGKILL leaves a stale socket; the next start replaces it.
    n.start();
    n.kill();
    assert!(h.join("bitnode.sock").exists());
    n.start();
    assert!(n.status()["id"] == id.as_str());
    n.stop();

    // Corrupt files: clear errors, nothing overwritten.
    std::fs::write(h.join("trust.json"), b"{ not json").unwrap();
    cli_err(&h, &["pair", "list"], "trust.json is corrupt");
    let (ok, _, err) = cli(&h, &["start", "--listen", "/ip4/127.0.0.1/tcp/0"]);
    assert!(!ok && err.contains("trust.json is corrupt"), "{err}");
    assert_eq!(std::fs::read(h.join("trust.json")).unwrap(), b"{ not json");
    std::fs::write(h.join("identity.key"), b"garbage").unwrap();
    cli_err(&h, &["id"], "not a valid bitnode identity");
}

#[test]
fn a_pre_shared_mesh_key_is_a_second_lock() {
    let key = "[network]\npsk = \"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"";
    let other = "[network]\npsk = \"ff112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"";
    let mut a = Node::init("psk-a", key).listen(&["/ip4/127.0.0.1/tcp/0"]);
    let mut b = Node::init("psk-b", key).listen(&["/ip4/127.0.0.1/tcp/0"]);
    let mut c = Node::init("psk-c", other).listen(&["/ip4/127.0.0.1/tcp/0"]);
    a.start();
    b.start();
    c.start();
    assert_eq!(a.status()["psk"], true);
    b.join(&a.invite());
    assert_eq!(a.wait_connected(&b, Duration::from_secs(60))["connection"], "direct");
    // Same invite flow, wrong mesh key: the connection fails in the pnet handshake, before Noise.
    let (ok, _, err) = cli(&c.home, &["pair", "join", &a.invite()]);
    assert!(!ok && err.contains("could not reach the inviter"), "{err}");
    assert!(a.peer(&c.id).is_none());
    // A bad key in the config is a clear start-up error.
    let d = Node::init("psk-d", "[network]\npsk = \"abc\"");
    let (ok, _, err) = cli(&d.home, &["start"]);
    assert!(!ok && err.contains("psk must be 64 hex characters"), "{err}");
}

#[test]
fn battery_and_ac_are_read_from_the_power_supply_class() {
    let d = home("power");
    let dev = |name: &str, files: &[(&str, &str)]| {
        let p = d.join(name);
        std::fs::create_dir_all(&p).unwrap();
        for (f, v) in files {
            std::fs::write(p.join(f), format!("{v}\n")).unwrap();
        }
    };
    assert_eq!(
        bitnode::caps::power(&d),
        (None, None),
        "no supplies: desktop without a battery"
    );
    dev("BAT0", &[("type", "Battery"), ("capacity", "57")]);
    dev("AC", &[("type", "Mains"), ("online", "0")]);
    assert_eq!(bitnode::caps::power(&d), (Some(57.0), Some(false)));
    dev("usb", &[("type", "USB"), ("online", "1")]);
    assert_eq!(
        bitnode::caps::power(&d),
        (Some(57.0), Some(true)),
        "any connected charger counts"
    );
    assert_eq!(bitnode::caps::power(&d.join("absent")), (None, None));
    let _ = std::fs::remove_dir_all(&d);
}
