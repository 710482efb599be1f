//! Mesh II with real daemons on loopback: jobs go to the strongest device or where they are pinned, stream
//! back, can be cancelled, survive the submitter's restart in its job history, and survive the worker being
//! killed in the middle of a fine-tune; hostile envelopes are refused with their reasons.
use crate::harness::*;
use bitnode_protocol::job::{Envelope, JobAck, JobPayload, JobSpec, Kind};
use bitnode_protocol::wire;
use libp2p::{identity, PeerId};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// A phone, a laptop and a desktop (scores 0.1, 60, 600; names ending in `tag`), started and all paired.
fn three(tag: &str, phone: &str, laptop: &str) -> (Node, Node, Node) {
    let mut p = pinned_node(&format!("phone{tag}"), 0.1, phone);
    let mut l = pinned_node(&format!("laptop{tag}"), 60.0, laptop);
    let mut d = pinned_node(&format!("desktop{tag}"), 600.0, "");
    for n in [&mut p, &mut l, &mut d] {
        n.start();
    }
    pair_all(&[&p, &l, &d]);
    (p, l, d)
}

fn pair_all(nodes: &[&Node]) {
    for (i, a) in nodes.iter().enumerate() {
        for b in &nodes[i + 1..] {
            b.join(&a.invite());
        }
    }
    for a in nodes {
        for b in nodes {
            if a.id != b.id {
                a.wait_connected(b, T);
            }
        }
    }
}

/// The last stdout line of a command, as JSON (the `--json` contract), with the exit status.
fn last_json(home: &Path, args: &[&str]) -> (bool, Value, String) {
    let (ok, out, err) = cli(home, args);
    let last = out.lines().last().unwrap_or("");
    let v: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("bitnode {args:?}: last line {last:?} is not JSON ({e}); stderr: {err}"));
    (ok, v, err)
}

fn show(n: &Node, id: &str) -> Value {
    serde_json::from_str(&cli_ok(&n.home, &["jobs", "show", id, "--json"])).unwrap()
}

fn synth(home: &Path) -> String {
    let m = home.join("tiny");
    cli_ok(
        home,
        &["model", "synth", "--preset", "tiny", "--out", m.to_str().unwrap()],
    );
    m.display().to_string()
}

/// `n` short {"text"} documents, packed into sequences by the data pipeline.
fn dataset(path: &Path, n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&format!(
            "{{\"text\": \"device {i} of the mesh trains a small adapter on its own data, step by step, line {i}.\"}}\n"
        ));
    }
    std::fs::write(path, s).unwrap();
    path.display().to_string()
}

/// SIGKILLs the `bitnode job-exec` processes running jobs for the daemon at `home`; returns how many.
fn kill_job_processes(home: &Path) -> usize {
    kill_processes("job-exec", &home.join("work").display().to_string())
}

#[test]
fn jobs_go_to_the_strongest_or_the_pinned_peer_stream_cancel_and_survive_a_restart() {
    let (mut phone, laptop, desktop) = three(
        "",
        "[jobs]\nheartbeat_timeout_secs = 3",
        "[jobs]\nmax_dataset_bytes = 3000",
    );
    let m = synth(&phone.home);

    // Delegation: the strongest of three takes it, and the result is what the local command prints.
    let args = ["--model", &m, "--prompt", "hello mesh", "--max-tokens", "12"];
    let mut sub = vec!["submit", "infer"];
    sub.extend(args);
    sub.push("--json");
    let (ok, v, err) = last_json(&phone.home, &sub);
    assert!(ok, "{v} {err}");
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["executed_by"], desktop.id.as_str(), "{v}");
    let mut local = vec!["infer"];
    local.extend(args);
    local.extend(["--device", "cpu", "--json"]);
    let (ok, l, _) = last_json(&phone.home, &local);
    assert!(ok);
    assert_eq!(v["result"]["tokens"], l["tokens"], "remote {v} local {l}");
    assert_eq!(v["result"]["text"], l["text"]);
    // Streaming: the text was printed before the JSON line, as the local command does.
    let (_, out, _) = cli(&phone.home, &sub);
    assert!(out.starts_with(l["text"].as_str().unwrap()), "{out:?}");
    // `jobs show` says why the desktop: every candidate with its verdict, the desktop first.
    let id = v["job_id"].as_str().unwrap().to_string();
    let s = show(&phone, &id);
    let placement: Vec<String> = s["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    assert!(
        placement[1].starts_with("desktop") && placement[1].contains("expected"),
        "{placement:?}"
    );
    assert!(placement.iter().any(|l| l.starts_with("laptop")), "{placement:?}");
    assert!(
        placement.iter().any(|l| l.starts_with("phone (this device)")),
        "{placement:?}"
    );
    // The worker keeps its own record of the job it ran.
    let w = show(&desktop, &id);
    assert_eq!(
        (w["state"].as_str(), w["submitter"].as_str()),
        (Some("succeeded"), Some(phone.id.as_str()))
    );

    // Pinned: goes where it is pinned even though the desktop is stronger; same NLL as a local run.
    let text = phone.home.join("t.txt");
    std::fs::write(&text, "the mesh of my own devices scores this text").unwrap();
    let t = text.to_str().unwrap();
    let (ok, v, err) = last_json(
        &phone.home,
        &[
            "submit",
            "score",
            "--model",
            &m,
            "--text-file",
            t,
            "--to",
            "laptop",
            "--json",
        ],
    );
    assert!(ok, "{v} {err}");
    assert_eq!(v["executed_by"], laptop.id.as_str(), "{v}");
    let (_, l, _) = last_json(
        &phone.home,
        &["score", "--model", &m, "--text-file", t, "--device", "cpu", "--json"],
    );
    assert_eq!(v["result"]["tokens"], l["tokens"]);
    assert!(
        (v["result"]["nll"].as_f64().unwrap() - l["nll"].as_f64().unwrap()).abs() < 1e-9,
        "{v} {l}"
    );
    // `--to local` runs here.
    let (ok, v, _) = last_json(
        &phone.home,
        &[
            "submit",
            "score",
            "--model",
            &m,
            "--text-file",
            t,
            "--to",
            "local",
            "--json",
        ],
    );
    assert!(ok && v["executed_by"] == phone.id.as_str(), "{v}");
    cli_err(
        &phone.home,
        &["submit", "score", "--model", &m, "--text-file", t, "--to", "nobody"],
        "not a paired peer",
    );

    // An oversized dataset is refused by the worker, with its reason, and nothing runs.
    let big = dataset(&phone.home.join("big.jsonl"), 60);
    assert!(std::fs::metadata(&big).unwrap().len() > 3000);
    let out = phone.home.join("never");
    let (ok, v, _) = last_json(
        &phone.home,
        &[
            "submit",
            "finetune",
            "--model",
            &m,
            "--data",
            &big,
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "2",
            "--seq-len",
            "32",
            "--to",
            "laptop",
            "--json",
        ],
    );
    assert!(!ok);
    assert_eq!(v["state"], "failed", "{v}");
    let reason = v["reason"].as_str().unwrap();
    assert!(
        reason.contains("refused") && reason.contains("max_dataset_bytes"),
        "{reason}"
    );
    assert!(!out.exists());

    // Failures, one after another, on one long fine-tune (it never ends by itself):
    // - the desktop hangs (SIGSTOP: its connections stay open, its heartbeats stop): the job moves on;
    // - the hung desktop comes back: it is told the job moved, and stops its copy;
    // - the job process dies on the laptop (a device fault): the job moves on again, here to the phone;
    // - cancel stops it where it runs.
    let data = dataset(&phone.home.join("d.jsonl"), 20);
    let out = phone.home.join("cancelled");
    let (ok, v, _) = last_json(
        &phone.home,
        &[
            "submit",
            "finetune",
            "--model",
            &m,
            "--data",
            &data,
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "100000",
            "--seq-len",
            "32",
            "--detach",
            "--json",
        ],
    );
    assert!(ok, "{v}");
    let id = v["job_id"].as_str().unwrap().to_string();
    let running_on = |who: &Node| {
        let s = show(&phone, &id);
        (s["executed_by"] == who.id.as_str() && s["progress"]["worker"] == who.id.as_str()).then_some(s)
    };
    wait_for(T, "progress from the desktop", || running_on(&desktop));
    desktop.signal(libc::SIGSTOP);
    let s = wait_for(T, "the job to leave the hung desktop", || running_on(&laptop));
    desktop.signal(libc::SIGCONT);
    let lost = s["attempts"][0].as_str().unwrap();
    assert!(lost.starts_with("desktop") && lost.contains("heartbeat"), "{s}");
    wait_for(T, "the desktop to stop its stale copy", || {
        let d = show(&desktop, &id);
        (d["state"] == "cancelled").then_some(d)
    });
    assert!(
        kill_job_processes(&laptop.home) > 0,
        "no job process found on the laptop"
    );
    let s = wait_for(T, "the job to move on from the laptop", || running_on(&phone));
    let lost = s["attempts"][1].as_str().unwrap();
    assert!(lost.starts_with("laptop") && lost.contains("job process died"), "{s}");
    assert_eq!(show(&laptop, &id)["state"], "failed");
    cli_ok(&phone.home, &["jobs", "cancel", &id[..8]]);
    assert_eq!(show(&phone, &id)["state"], "cancelled");
    wait_for(T, "the phone's queue to empty", || {
        (phone.status()["capabilities"]["queue_len"] == 0).then_some(())
    });
    assert_eq!(
        kill_job_processes(&phone.home),
        0,
        "a cancelled job process is still running"
    );
    assert!(!out.join("adapter_model.safetensors").exists());

    // The job history survives a restart of the submitter's daemon.
    let before: Value = serde_json::from_str(&cli_ok(&phone.home, &["jobs", "--json"])).unwrap();
    assert!(before.as_array().unwrap().len() >= 6, "{before}");
    phone.stop();
    // Readable without a daemon too.
    let offline: Value = serde_json::from_str(&cli_ok(&phone.home, &["jobs", "--json"])).unwrap();
    phone.start();
    let after: Value = serde_json::from_str(&cli_ok(&phone.home, &["jobs", "--json"])).unwrap();
    let key = |v: &Value| -> Vec<(String, String)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|j| {
                (
                    j["job_id"].as_str().unwrap().into(),
                    j["state"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    assert_eq!(key(&before), key(&after));
    assert_eq!(key(&before), key(&offline));
}

#[test]
fn a_fine_tune_finishes_on_another_peer_when_its_worker_is_killed() {
    let (phone, laptop, mut desktop) = three("-f", "[jobs]\nheartbeat_timeout_secs = 4", "");
    let m = synth(&phone.home);
    let data = dataset(&phone.home.join("d.jsonl"), 40);
    let common = [
        "--model",
        &m,
        "--data",
        &data,
        "--steps",
        "60",
        "--seq-len",
        "128",
        "--rank",
        "4",
        "--save-every",
        "3",
    ];

    // The uninterrupted run, locally, for comparison.
    let reference = phone.home.join("reference");
    let mut local = vec![
        "finetune",
        "--out",
        reference.to_str().unwrap(),
        "--device",
        "cpu",
        "--json",
    ];
    local.extend(common);
    cli_ok(&phone.home, &local);

    let got = phone.home.join("got");
    let mut sub = vec![
        "submit",
        "finetune",
        "--out",
        got.to_str().unwrap(),
        "--detach",
        "--json",
    ];
    sub.extend(common);
    let (ok, v, err) = last_json(&phone.home, &sub);
    assert!(ok, "{v} {err}");
    let id = v["job_id"].as_str().unwrap().to_string();
    // Kill the desktop once a checkpoint has come back (and before the job could finish).
    wait_for(T, "a checkpoint from the desktop", || {
        let s = show(&phone, &id);
        (s["executed_by"] == desktop.id.as_str() && s["checkpoint_step"].as_u64().is_some_and(|k| k >= 6)).then_some(())
    });
    let at = show(&phone, &id)["checkpoint_step"].as_u64().unwrap();
    desktop.kill();
    let s = wait_for(Duration::from_secs(180), "the job to end", || {
        let s = show(&phone, &id);
        (s["state"] != "running" && s["state"] != "queued").then_some(s)
    });
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_eq!(s["executed_by"], laptop.id.as_str(), "{s}");
    let attempts = s["attempts"].as_array().unwrap();
    assert!(attempts[0].as_str().unwrap().starts_with("desktop"), "{s}");
    assert!(at < 60, "the desktop had finished before it was killed");
    // The laptop resumed from the checkpoint: the adapter is the uninterrupted run's.
    let read = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    let worst = crate::adapter::max_abs_diff(&read(&got), &read(&reference));
    assert!(
        worst <= 1e-6,
        "final adapter differs from the uninterrupted run by {worst}"
    );
    eprintln!("failover: killed at checkpoint {at}, final adapter max |diff| {worst:e}");

    // `submit finetune --resume` sends a local checkpoint along: the worker continues from it.
    let again = phone.home.join("again");
    let ck = reference.join("checkpoint-30");
    let mut sub = vec![
        "submit",
        "finetune",
        "--out",
        again.to_str().unwrap(),
        "--resume",
        ck.to_str().unwrap(),
    ];
    sub.extend(["--json-log", "/dev/null", "--json"]);
    sub.extend(common);
    let (ok, v, err) = last_json(&phone.home, &sub);
    assert!(ok, "{v} {err}");
    assert_eq!(v["executed_by"], laptop.id.as_str(), "{v}");
    assert_eq!(
        std::fs::read(again.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(reference.join("adapter_model.safetensors")).unwrap()
    );
}

/// The worker's ed25519 key, from its peer id.
fn key_of(p: &PeerId) -> [u8; 32] {
    identity::PublicKey::try_decode_protobuf(p.as_ref().digest())
        .unwrap()
        .try_into_ed25519()
        .unwrap()
        .to_bytes()
}

fn signing(k: &identity::Keypair) -> ed25519_dalek::SigningKey {
    let b = k.clone().try_into_ed25519().unwrap().to_bytes();
    ed25519_dalek::SigningKey::from_bytes(&b[..32].try_into().unwrap())
}

fn ack(r: &Result<Vec<u8>, String>) -> JobAck {
    let bytes = r.as_ref().unwrap_or_else(|e| panic!("no answer: {e}"));
    wire::decode(bytes, 1 << 20).unwrap()
}

fn rejected(r: &Result<Vec<u8>, String>, needle: &str) {
    match ack(r) {
        JobAck::Rejected { reason } => assert!(reason.contains(needle), "expected {needle:?} in {reason:?}"),
        a => panic!("expected a refusal ({needle}), got {a:?}"),
    }
}

#[test]
fn replayed_tampered_foreign_and_unpaired_envelopes_are_refused_with_their_reasons() {
    let mut w = pinned_node("worker", 50.0, "");
    w.start();
    let target: PeerId = w.id.parse().unwrap();
    let me = key_of(&target);
    let addr = w.tcp_addr();
    // A paired client (the worker trusts its key) that speaks the job protocol by hand.
    let client = identity::Keypair::generate_ed25519();
    cli_ok(
        &w.home,
        &[
            "pair",
            "add",
            &client.public().to_peer_id().to_base58(),
            "--name",
            "client",
        ],
    );
    let sk = signing(&client);
    let now = bitnode::trust::now_unix();
    let spec = JobSpec::Score(bitnode_protocol::ScoreRequest {
        model: "ab".repeat(32),
        adapter: None,
        text: "hello".into(),
    });
    let payload = wire::encode(
        &JobPayload {
            spec,
            resume: None,
            attempt: 0,
        },
        1 << 20,
    )
    .unwrap();
    let seal = |k: &ed25519_dalek::SigningKey, id: u8, target: [u8; 32], at: u64, nonce: u8| {
        Envelope::seal(k, Kind::Job, [id; 16], target, at, 600, [nonce; 16], payload.clone())
    };
    let good = seal(&sk, 1, me, now, 1);
    let mut tampered = seal(&sk, 2, me, now, 2);
    tampered.payload[3] ^= 0x20;
    let other = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let foreign = seal(&other, 3, me, now, 3);
    let expired = seal(&sk, 4, me, now - 7200, 4);
    let elsewhere = seal(&sk, 5, other.verifying_key().to_bytes(), now, 5);
    let enc = |e: &Envelope| wire::encode(e, 1 << 24).unwrap();
    // At most 4 job streams at once per connection (each may buffer a large dataset before it is checked).
    let r = crate::hostile::send_raw(
        client.clone(),
        target,
        addr.clone(),
        wire::JOB_PROTOCOL,
        vec![enc(&good), enc(&tampered), enc(&foreign), enc(&expired)],
    );
    assert!(matches!(ack(&r[0]), JobAck::Accepted { .. }), "{:?}", ack(&r[0]));
    rejected(&r[1], "tampered");
    rejected(&r[2], "signed by another device");
    rejected(&r[3], "expired");
    // The same envelope again, on a new connection: a replay.
    let r = crate::hostile::send_raw(
        client.clone(),
        target,
        addr.clone(),
        wire::JOB_PROTOCOL,
        vec![enc(&elsewhere), enc(&good)],
    );
    rejected(&r[0], "addressed to another device");
    rejected(&r[1], "replayed");

    // The accepted job needs a model the client never serves: it ends failed with that reason, recorded.
    let id = "01".repeat(16);
    wait_for(T, "the accepted job to fail for want of its model", || {
        let s = show(&w, &id);
        (s["state"] == "failed").then_some(())
    });
    assert!(
        show(&w, &id)["reason"].as_str().unwrap().contains("model"),
        "{}",
        show(&w, &id)
    );

    // An unpaired device is let in only to pair while an invite is open: it may open the pairing protocol
    // and nothing else, so its job stream is refused during protocol negotiation, before a byte of the
    // envelope is read.
    w.invite();
    let stranger = identity::Keypair::generate_ed25519();
    let s = seal(&signing(&stranger), 6, me, now, 6);
    let r = crate::hostile::send_raw(stranger, target, addr, wire::JOB_PROTOCOL, vec![enc(&s)]);
    let e = r[0].as_ref().expect_err("a stranger's job stream must not be answered");
    assert!(e.contains("supports none of the requested protocols"), "{e}");
    assert!(w.running());
    assert!(w.log().contains("job refused"));
}
