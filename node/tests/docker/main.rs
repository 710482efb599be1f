//! The multi-machine scenarios, in Docker, on the topology of libp2p's hole-punch test (docker/topology.sh):
//!
//! ```text
//!   "internet" 10.87.0.0/24:  relay .2 (relays only), intruder .66 (knows every address, paired with no one)
//!      router A wan .11 (NAT)                 router B wan .12 (NAT)
//!   LAN A 10.88.1.0/24                      LAN B 10.88.2.0/24
//!     phone .2 (0.3 CPU), laptop .3 (0.6 CPU)   desktop .2 (no CPU limit)
//! ```
//!
//! Real daemons in real containers with their own network namespaces; the routers masquerade (endpoint-
//! independent mapping, address-and-port-dependent filtering) and drop unsolicited inbound packets.
//! Capabilities are measured by each daemon's probe, not pinned: the desktop wins on merit.
//!
//! Each scenario brings up its own topology, has a time limit, collects every container's log, status,
//! peers and jobs (and the routers' counters) on failure, and removes its containers, networks and
//! volumes whether it passes or fails. They take turns (one topology at a time).
//!
//!   cargo test -p bitnode --test docker -- --nocapture
//!
//! Needs root and a running Docker engine (and debootstrap the first time: the base image is built from a
//! Debian rootfs, as no registry is reachable). Under `CI=true` a missing engine fails; elsewhere the
//! scenarios skip with a message. BITNODE_DOCKER_BIN picks the binary baked into the image (default: this
//! test build's; a release build gives the numbers in BENCHMARKS.md).
#![allow(clippy::unwrap_used)]
#[path = "../common/adapter.rs"]
mod adapter;
mod topo;

use serde_json::Value;
use std::time::{Duration, Instant};
use topo::*;

const T: Duration = Duration::from_secs(60);

/// What pairing took (for the scenarios that measure it).
struct Paired {
    /// From the desktop's `pair join` (the phone's code, through the relay) to its return.
    desktop_join: Duration,
    /// When the join started.
    desktop_join_at: Instant,
    /// A code that was used: it must never work again.
    used_code: String,
}

/// Scenario 1's steps, the base of the others. Each device pairs with the owner's relay, which every one of
/// them reaches outbound through its NAT. Once the phone holds a relayed address, it invites the laptop
/// (same LAN: the code's LAN address and mDNS both find the phone) and the desktop (across both NATs: the
/// code's relayed address is the only way to the phone).
fn pair(m: &Mesh) -> Paired {
    for d in ["phone", "laptop", "desktop"] {
        let code = m.invite("relay");
        m.join(d, &code);
    }
    for d in ["phone", "laptop", "desktop"] {
        m.wait_connected("relay", d, T);
    }
    wait_for(T, "the phone's relayed address", || {
        (!m.status("phone")["relayed_addresses"].as_array()?.is_empty()).then_some(())
    });
    let code = m.invite("phone");
    m.join("laptop", &code);
    let used_code = m.invite("phone");
    let at = Instant::now();
    m.join("desktop", &used_code);
    let desktop_join = at.elapsed();
    for (a, b) in [
        ("phone", "laptop"),
        ("laptop", "phone"),
        ("phone", "desktop"),
        ("desktop", "phone"),
    ] {
        m.wait_connected(a, b, T);
    }
    Paired {
        desktop_join,
        desktop_join_at: at,
        used_code,
    }
}

/// Waits until both the phone and the desktop hold a direct connection to each other (DCUtR's work);
/// returns (the phone's entry for the desktop, the desktop's entry for the phone).
fn wait_direct(m: &Mesh) -> (Value, Value) {
    wait_direct_within(m, Duration::from_secs(90))
}

fn wait_direct_within(m: &Mesh, limit: Duration) -> (Value, Value) {
    let pd = wait_for(limit, "the phone to hold a direct connection to the desktop", || {
        let p = m.peer("phone", "desktop")?;
        (p["connection"] == "direct").then_some(p)
    });
    let dp = wait_for(limit, "the desktop to hold a direct connection to the phone", || {
        let p = m.peer("desktop", "phone")?;
        (p["connection"] == "direct").then_some(p)
    });
    (pd, dp)
}

fn addresses(p: &Value) -> Vec<String> {
    p["addresses"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// `n` short {"text"} documents.
fn dataset(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"text\": \"device {i} of the mesh trains a small adapter on its own data, step by step, line {i}.\"}}\n"
            )
        })
        .collect()
}

/// The tiny BitNet at /data/tiny on `dev`: synthetic and deterministic, so every device that makes it holds
/// the same model (by content hash).
fn synth_tiny(m: &Mesh, dev: &str) {
    m.ok(dev, &["model", "synth", "--preset", "tiny", "--out", "/data/tiny"]);
}

/// The tiny BitNet and a dataset, on the phone (the submitter holds the model and the data).
fn phone_model_and_data(m: &Mesh, docs: usize) {
    synth_tiny(m, "phone");
    m.put("phone", "/data/d.jsonl", dataset(docs).as_bytes());
}

/// The fine-tune's arguments, shared by the delegated job and the reference run on the host.
fn finetune_args(steps: &str) -> Vec<&str> {
    vec!["--steps", steps, "--seq-len", "128", "--rank", "4", "--save-every", "3"]
}

/// The same fine-tune, uninterrupted, on the host with the same binary (the synthetic model is
/// deterministic, so it is the same model): the adapter a delegated job must reproduce bit for bit.
fn reference_adapter(steps: &'static str, docs: usize) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let dir = std::env::temp_dir().join(format!("bnit-ref-{}-{steps}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display().to_string();
        std::fs::write(dir.join("d.jsonl"), dataset(docs)).unwrap();
        let bin = env!("CARGO_BIN_EXE_bitnode");
        let tiny = format!("{d}/tiny");
        let (ok, out, err) = run(
            &[bin, "--home", &d, "model", "synth", "--preset", "tiny", "--out", &tiny],
            Duration::from_secs(60),
        );
        assert!(ok, "reference synth: {out}{err}");
        let (data, out_dir) = (format!("{d}/d.jsonl"), format!("{d}/ref"));
        let mut args = vec![
            bin, "--home", &d, "finetune", "--model", &tiny, "--data", &data, "--out", &out_dir, "--device", "cpu",
        ];
        args.extend(finetune_args(steps));
        let (ok, out, err) = run(&args, Duration::from_secs(400));
        assert!(ok, "reference fine-tune: {out}{err}");
        let a = std::fs::read(dir.join("ref/adapter_model.safetensors")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        a
    })
}

/// The fine-tune scenarios' start: the reference run begins on the host while the mesh pairs and goes
/// direct, and the phone gets the model and `docs` documents.
fn fine_tune_ready(m: &Mesh, steps: &'static str, docs: usize) -> std::thread::JoinHandle<Vec<u8>> {
    let reference = reference_adapter(steps, docs);
    pair(m);
    wait_direct(m);
    phone_model_and_data(m, docs);
    reference
}

/// The phone submits the fine-tune of `finetune_args(steps)` on its model and data, the adapter to
/// /data/adapter; returns the final JSON line (`--detach`: as soon as it is placed).
fn submit_finetune(m: &Mesh, steps: &str, detach: bool) -> Value {
    let mut sub = vec![
        "submit",
        "finetune",
        "--model",
        "/data/tiny",
        "--data",
        "/data/d.jsonl",
        "--out",
        "/data/adapter",
        "--json",
    ];
    if detach {
        sub.push("--detach");
    }
    sub.extend(finetune_args(steps));
    let (ok, v, err) = m.last_json("phone", &sub);
    assert!(ok, "{v} {err}");
    v
}

fn show(m: &Mesh, dev: &str, id: &str) -> Value {
    m.json(dev, &["jobs", "show", id, "--json"])
}

/// A short scoring job submitted on `dev` on its model at `model`, to `to` (`auto`, `local`, a peer name or
/// id); it must succeed. Returns its final JSON line.
fn score(m: &Mesh, dev: &str, model: &str, to: &str) -> Value {
    m.put(dev, "/data/t.txt", b"a job that crosses two NATs");
    let (ok, v, err) = m.last_json(
        dev,
        &[
            "submit",
            "score",
            "--model",
            model,
            "--text-file",
            "/data/t.txt",
            "--to",
            to,
            "--json",
        ],
    );
    assert!(ok, "score job: {v} {err}");
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(v["result"]["nll"].as_f64().is_some_and(f64::is_finite), "{v}");
    v
}

/// The peers `dev` trusts, as (peer id, name), sorted.
fn trusted(m: &Mesh, dev: &str) -> Vec<(String, String)> {
    let mut t: Vec<(String, String)> = m
        .json(dev, &["pair", "list", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap_or("").into(),
                p["name"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    t.sort();
    t
}

#[test]
fn s1_phone_pairs_with_the_laptop_on_its_lan_and_with_the_desktop_across_both_nats() {
    scenario(
        1,
        "pairing by invite code: mDNS on the LAN, the relay across NATs",
        Duration::from_secs(240),
        |m| {
            pair(m);
            let (phone, laptop, desktop, relay) = (m.id("phone"), m.id("laptop"), m.id("desktop"), m.id("relay"));
            // Every pairing is mutual and on disk.
            let trusts = |dev: &str, id: &str| trusted(m, dev).iter().any(|(t, _)| t == id);
            for id in [&laptop, &desktop, &relay] {
                assert!(
                    trusts("phone", id),
                    "the phone does not trust {id}: {:?}",
                    trusted(m, "phone")
                );
            }
            for d in ["laptop", "desktop"] {
                assert!(trusts(d, &phone), "{d} does not trust the phone");
            }
            // Same LAN: the laptop heard the phone's mDNS announcement and holds a direct connection to its
            // LAN address (no NAT in between).
            wait_for(T, "the laptop to discover the phone by mDNS", || {
                m.log("laptop")
                    .lines()
                    .any(|l| l.contains("discovered peer on address") && l.contains(&phone) && l.contains("10.88.1.2"))
                    .then_some(())
            });
            let lp = m.wait_connected("laptop", "phone", T);
            assert_eq!(lp["connection"], "direct", "{lp}");
            assert!(addresses(&lp).iter().any(|a| a.contains("10.88.1.2")), "{lp}");
            // Across the NATs the desktop reached the phone through the relay: its first connection to the
            // phone was a circuit through the relay (the phone's LAN address is unroutable from LAN B).
            let log = m.log("desktop");
            let first = log
                .lines()
                .find(|l| l.contains(" connected") && l.contains(&phone))
                .unwrap_or_else(|| panic!("no connection to the phone in the desktop's log"));
            assert!(
                first.contains("relayed=true") && first.contains(&relay) && first.contains("p2p-circuit"),
                "the desktop's first connection to the phone: {first}"
            );
            // The relay is paired with everyone but takes no jobs: the devices see that in its advert.
            let r = m.wait_connected("phone", "relay", T);
            assert_eq!(r["capabilities"]["accepts_jobs"], false, "{r}");
        },
    );
}

#[test]
fn s2_dcutr_upgrades_the_phone_desktop_connection_to_direct() {
    scenario(
        2,
        "DCUtR to a direct connection, and what it is worth",
        Duration::from_secs(360),
        |m| {
            let p = pair(m);
            let (pd, dp) = wait_direct(m);
            let direct = p.desktop_join_at.elapsed();
            // The direct connection goes to the other side's NAT (the router's wan address), which only a hole
            // punch opens: neither router lets in a flow its inside did not start.
            assert!(
                addresses(&pd).iter().any(|a| a.contains("10.87.0.12")),
                "the phone's view of the desktop: {pd}"
            );
            assert!(
                addresses(&dp).iter().any(|a| a.contains("10.87.0.11")),
                "the desktop's view of the phone: {dp}"
            );
            let punched = |d: &str, other: &str| {
                let id = m.id(other);
                m.log(d)
                    .lines()
                    .any(|l| l.contains("hole punch succeeded") && l.contains(&id))
            };
            assert!(
                punched("phone", "desktop") || punched("desktop", "phone"),
                "no successful hole punch in either log"
            );
            // Measured for BENCHMARKS.md (run with --nocapture).
            eprintln!(
            "bench: desktop joined through the relay in {:.0} ms; direct connection {:.0} ms after the join started",
            p.desktop_join.as_secs_f64() * 1e3,
            direct.as_secs_f64() * 1e3
        );

            // Delegation overhead: submit-to-first-token of the same inference, run on the desktop either from
            // the phone (over the punched connection) or from the desktop itself. Both go through
            // `docker exec`, whose cost cancels out in the difference. One warm-up run each pulls the model
            // and warms the page cache.
            synth_tiny(m, "phone");
            synth_tiny(m, "desktop");
            let infer = |dev: &str, to: &str| -> (f64, f64) {
                let c = m.c(dev);
                let (f, t, ok) = first_byte(&[
                    "docker",
                    "exec",
                    &c,
                    "bitnode",
                    "submit",
                    "infer",
                    "--model",
                    "/data/tiny",
                    "--prompt",
                    "The mesh of my own devices",
                    "--max-tokens",
                    "16",
                    "--to",
                    to,
                ]);
                assert!(ok, "{dev}: submit infer --to {to} failed");
                (f.as_secs_f64() * 1e3, t.as_secs_f64() * 1e3)
            };
            let desktop_id = m.id("desktop");
            infer("phone", &desktop_id);
            infer("desktop", "local");
            let (mut rf, mut lf) = (vec![], vec![]);
            for _ in 0..5 {
                rf.push(infer("phone", &desktop_id).0);
                lf.push(infer("desktop", "local").0);
            }
            let (rf, lf) = (median(rf), median(lf));
            eprintln!(
            "bench: submit-to-first-token on the desktop: {rf:.0} ms from the phone over the direct connection, {lf:.0} ms from the desktop itself: delegation overhead {:.0} ms (median of 5)",
            rf - lf
        );

            // Model transfer over the direct connection: a 125M-parameter model the desktop lacks, scored
            // twice from the phone; the first job pulls the model, the second finds it in the store.
            m.ok("phone", &["model", "synth", "--preset", "125m", "--out", "/data/m125"]);
            let bytes: f64 = m
                .sh_ok("phone", "du -sb /data/m125")
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap();
            let score = || {
                let t0 = Instant::now();
                score(m, "phone", "/data/m125", &desktop_id);
                t0.elapsed().as_secs_f64()
            };
            let (cold, warm) = (score(), score());
            let still_direct = m.peer("phone", "desktop").unwrap();
            assert_eq!(still_direct["connection"], "direct", "{still_direct}");
            eprintln!(
            "bench: model transfer over the direct connection: {:.1} MiB in {:.2} s = {:.1} MB/s (cold job {cold:.2} s, warm {warm:.2} s)",
            bytes / 1048576.0,
            cold - warm,
            bytes / (cold - warm).max(1e-3) / 1e6
        );
        },
    );
}

#[test]
fn s3_a_fine_tune_submitted_on_the_phone_runs_on_the_desktop() {
    scenario(
        3,
        "a fine-tune from the phone runs on the desktop",
        Duration::from_secs(480),
        |m| {
            let reference = fine_tune_ready(m, "30", 20);
            let v = submit_finetune(m, "30", false);
            assert_eq!(v["state"], "succeeded", "{v}");
            // The strongest device, by its measured score: the desktop.
            assert_eq!(v["executed_by"], m.id("desktop").as_str(), "{v}");
            let id = v["job_id"].as_str().unwrap();
            let s = show(m, "phone", id);
            let placement: Vec<&str> = s["placement"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert!(
                placement[1].starts_with("desktop") && placement[1].contains("expected"),
                "{placement:?}"
            );
            assert!(
                placement
                    .iter()
                    .any(|l| l.starts_with("laptop") && l.contains("expected")),
                "{placement:?}"
            );
            assert!(
                placement
                    .iter()
                    .any(|l| l.starts_with("relay") && l.contains("accept_remote")),
                "{placement:?}"
            );
            // The adapter arrived on the phone, and it is the uninterrupted local run's, bit for bit.
            let got = m.get("phone", "/data/adapter/adapter_model.safetensors");
            let cfg = m.get("phone", "/data/adapter/adapter_config.json");
            assert!(serde_json::from_slice::<Value>(&cfg).is_ok());
            let worst = adapter::max_abs_diff(&got, &reference.join().unwrap());
            assert_eq!(
                worst, 0.0,
                "the delegated adapter differs from the local run by {worst}"
            );
            // The phone uses it at once; the desktop ran the job on its CPU reference, and its image also
            // computes on lavapipe (Vulkan without a GPU) with the same tokens.
            m.ok(
                "phone",
                &[
                    "infer",
                    "--model",
                    "/data/tiny",
                    "--adapter",
                    "/data/adapter",
                    "--prompt",
                    "hi",
                    "--max-tokens",
                    "4",
                ],
            );
            let tokens = |dev: &str| {
                let (ok, v, err) = m.last_json(
                    "desktop",
                    &[
                        "infer",
                        "--model",
                        "/data/tiny",
                        "--prompt",
                        "The mesh",
                        "--max-tokens",
                        "6",
                        "--device",
                        dev,
                        "--json",
                    ],
                );
                assert!(ok, "{v} {err}");
                v["tokens"].clone()
            };
            synth_tiny(m, "desktop");
            assert_eq!(tokens("gpu"), tokens("cpu"), "lavapipe and the CPU reference disagree");
        },
    );
}

#[test]
fn s4_the_desktop_is_killed_mid_job_and_the_laptop_finishes_it() {
    scenario(
        4,
        "failover: the desktop dies mid-job, the laptop finishes",
        Duration::from_secs(600),
        |m| {
            let reference = fine_tune_ready(m, "60", 40);
            let v = submit_finetune(m, "60", true);
            let id = v["job_id"].as_str().unwrap().to_string();
            let desktop = m.id("desktop");
            wait_for(Duration::from_secs(240), "a checkpoint from the desktop", || {
                let s = show(m, "phone", &id);
                (s["executed_by"] == desktop.as_str() && s["checkpoint_step"].as_u64().is_some_and(|k| k >= 6))
                    .then_some(())
            });
            let s = show(m, "phone", &id);
            assert_eq!(
                s["state"], "running",
                "the job ended before the desktop could be killed: {s}"
            );
            let at = s["checkpoint_step"].as_u64().unwrap();
            m.docker_ok(&["kill", &m.c("desktop")]);
            let s = wait_for(Duration::from_secs(300), "the job to end", || {
                let s = show(m, "phone", &id);
                (s["state"] != "running" && s["state"] != "queued").then_some(s)
            });
            assert_eq!(s["state"], "succeeded", "{s}");
            assert_eq!(s["executed_by"], m.id("laptop").as_str(), "{s}");
            let attempts = s["attempts"].as_array().unwrap();
            assert!(attempts[0].as_str().unwrap().starts_with("desktop"), "{s}");
            // The laptop resumed from the desktop's checkpoint: the adapter is the uninterrupted run's.
            let got = m.get("phone", "/data/adapter/adapter_model.safetensors");
            let worst = adapter::max_abs_diff(&got, &reference.join().unwrap());
            assert_eq!(
                worst, 0.0,
                "the failed-over adapter differs from the uninterrupted run by {worst}"
            );
            eprintln!(
                "failover: desktop killed after checkpoint {at} of 60; the laptop finished; adapter max |diff| {worst}"
            );
            // The desktop comes back: its own record of the job it lost ends with a reason, not `running`.
            m.docker_ok(&["start", &m.c("desktop")]);
            m.wait_ready("desktop", T);
            let w = show(m, "desktop", &id);
            assert_eq!(w["state"], "failed", "{w}");
            assert!(w["reason"].as_str().is_some_and(|r| !r.is_empty()), "{w}");
            m.wait_connected("phone", "desktop", Duration::from_secs(90));
        },
    );
}

#[test]
fn s5_the_intruder_can_neither_connect_nor_submit() {
    scenario(
        5,
        "the intruder, who knows every address",
        Duration::from_secs(300),
        |m| {
            let p = pair(m);
            wait_direct(m);
            synth_tiny(m, "phone");
            let ids: Vec<(&str, String)> = ["relay", "phone", "laptop", "desktop"]
                .iter()
                .map(|d| (*d, m.id(d)))
                .collect();
            let intruder = m.id("intruder");
            // A rule on each router that counts (and drops, as the rule after it would) what the intruder sends.
            for r in ["router-a", "router-b"] {
                m.sh_ok(r, "iptables -I INPUT 2 -s 10.87.0.66 -j DROP");
            }
            // Every address there is: the relay's, the routers' (where the NATs map the devices' ports), the
            // LAN addresses, and the phone's relayed address.
            let relayed: Vec<String> = m.status("phone")["relayed_addresses"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|a| {
                    a.as_str()
                        .map(|s| s.rsplit_once("/p2p/").map(|(a, _)| a.to_string()).unwrap_or_default())
                })
                .collect();
            let base = |ip: &str| vec![format!("/ip4/{ip}/tcp/7878"), format!("/ip4/{ip}/udp/7878/quic-v1")];
            for (d, id) in &ids {
                let mut addrs = match *d {
                    "relay" => base("10.87.0.2"),
                    "desktop" => [base("10.87.0.12"), base("10.88.2.2")].concat(),
                    "phone" => [base("10.87.0.11"), base("10.88.1.2"), relayed.clone()].concat(),
                    _ => [base("10.87.0.11"), base("10.88.1.3")].concat(),
                };
                addrs.retain(|a| !a.is_empty());
                let mut args = vec!["pair", "add", id.as_str(), "--name", d];
                for a in &addrs {
                    args.extend(["--addr", a.as_str()]);
                }
                // Trusting them is one-sided: none of them trusts the intruder.
                m.ok("intruder", &args);
            }
            // A used invite code does not let it in either.
            let (ok, out, err) = m.bitnode("intruder", &["pair", "join", &p.used_code]);
            assert!(!ok, "a used invite code worked for the intruder: {out}");
            assert!(!err.contains("panicked") && !err.trim().is_empty(), "{err}");
            // Its daemon dials all of them for a while (its redial loop); the relay, the one it can reach,
            // refuses it at the connection gate; the routers drop its packets.
            wait_for(T, "the relay to refuse the intruder", || {
                m.log("relay")
                    .lines()
                    .any(|l| l.contains("refused inbound connection from an unpaired peer") && l.contains(&intruder))
                    .then_some(())
            });
            std::thread::sleep(Duration::from_secs(10));
            for p in m.peers("intruder") {
                assert_ne!(p["connected"], true, "the intruder got a connection: {p}");
            }
            let dropped = |r: &str| -> u64 {
                let out = m.sh_ok(r, "iptables -L INPUT -v -n -x");
                out.lines()
                    .filter(|l| l.contains("10.87.0.66"))
                    .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                    .sum()
            };
            assert!(
                dropped("router-a") > 0 && dropped("router-b") > 0,
                "the routers saw nothing of the intruder"
            );
            // It cannot submit: a pinned job has nowhere to go, and `auto` finds only the intruder itself.
            synth_tiny(m, "intruder");
            m.put("intruder", "/data/t.txt", b"let me in");
            for (d, id) in &ids {
                let (ok, out, err) = m.bitnode(
                    "intruder",
                    &[
                        "submit",
                        "score",
                        "--model",
                        "/data/tiny",
                        "--text-file",
                        "/data/t.txt",
                        "--to",
                        id,
                        "--json",
                    ],
                );
                assert!(
                    !ok && !out.contains("\"succeeded\""),
                    "the intruder's job ran on {d}: {out} {err}"
                );
                assert!(
                    !err.contains("panicked") && !err.trim().is_empty(),
                    "no clear error: {err}"
                );
            }
            let v = score(m, "intruder", "/data/tiny", "auto");
            assert_eq!(v["executed_by"], intruder.as_str(), "{v}");
            // Nothing of it reached the mesh: no device trusts it, lists it, or ran a job for it; and the mesh
            // still works.
            for (d, _) in &ids {
                let trust = m.ok(d, &["pair", "list", "--json"]);
                assert!(!trust.contains(&intruder), "{d} trusts the intruder: {trust}");
                assert!(m.peer(d, "intruder").is_none(), "{d} lists the intruder");
                let jobs = m.ok(d, &["jobs", "--json"]);
                assert!(!jobs.contains(&intruder), "{d} holds a job of the intruder: {jobs}");
            }
            score(m, "phone", "/data/tiny", &m.id("desktop"));
        },
    );
}

#[test]
fn s6_restarted_containers_keep_identity_trust_list_and_job_history() {
    scenario(
        6,
        "restarts keep identity, trust list and jobs",
        Duration::from_secs(540),
        |m| {
            pair(m);
            wait_direct(m);
            synth_tiny(m, "phone");
            let job = score(m, "phone", "/data/tiny", &m.id("desktop"));
            let job_id = job["job_id"].as_str().unwrap().to_string();
            let devices = ["relay", "phone", "laptop", "desktop"];
            // What must survive: the peer id, the trusted ids and names, and every job's id, state and worker.
            let snapshot = |d: &str| -> (String, Vec<(String, String)>, Vec<(String, String, String)>) {
                let id = m.ok(d, &["id"]).trim().to_string();
                let trust = trusted(m, d);
                let jobs = m
                    .json(d, &["jobs", "--json"])
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|j| {
                        (
                            j["job_id"].as_str().unwrap_or("").into(),
                            j["state"].as_str().unwrap_or("").into(),
                            j["executed_by"].as_str().unwrap_or("").into(),
                        )
                    })
                    .collect();
                (id, trust, jobs)
            };
            let before: Vec<_> = devices.iter().map(|d| snapshot(d)).collect();
            assert!(
                before[1].2.iter().any(|j| j.0 == job_id),
                "the phone's table lacks the job"
            );
            assert!(
                before[3].2.iter().any(|j| j.0 == job_id),
                "the desktop's table lacks the job"
            );
            // The relay, phone and laptop restart as Docker stops them (SIGTERM); the desktop crashes (SIGKILL).
            let (relay, phone, laptop, desktop) = (m.c("relay"), m.c("phone"), m.c("laptop"), m.c("desktop"));
            m.docker_ok(&["kill", &desktop]);
            m.docker_ok(&["restart", "-t", "10", &relay, &phone, &laptop]);
            m.docker_ok(&["start", &desktop]);
            for d in devices {
                m.wait_ready(d, T);
            }
            let after: Vec<_> = devices.iter().map(|d| snapshot(d)).collect();
            for (d, (b, a)) in devices.iter().zip(before.iter().zip(&after)) {
                assert_eq!(b, a, "{d} changed across its restart");
            }
            // The mesh forms again by itself: the LAN, the relay, and a direct connection across the NATs.
            m.wait_connected("phone", "laptop", Duration::from_secs(90));
            m.wait_connected("phone", "desktop", Duration::from_secs(120));
            // The routers did not restart: their conntrack still holds the old direct flow (same addresses and
            // ports) in TIME_WAIT for 120 s, and a TCP hole punch that meets it can fail. The devices stay
            // connected through the relay meanwhile, and DCUtR retries on a fresh relayed connection until
            // the punch gets through, as it does behind a home router that outlives a device's reboot.
            let (pd, _) = wait_direct_within(m, Duration::from_secs(240));
            assert_eq!(pd["connection"], "direct");
            // And it works: the desktop still holds the model by its hash, and a new job runs there.
            let again = score(m, "phone", "/data/tiny", "auto");
            assert_eq!(again["executed_by"], m.id("desktop").as_str(), "{again}");
        },
    );
}
