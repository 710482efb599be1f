//! Daemon II: the daemon neither stalls nor buffers without bound. Control clients that stop reading
//! cost it a bounded backlog; a slow disk (a real delay on the store actor's write path,
//! `BITNODE_TEST_STORE_DELAY_MS`) delays no heartbeat; state on disk stays parseable whenever the daemon
//! is killed. Real daemons, real sockets, the real CLI and the daemon's own client library.
use crate::harness::*;
use bitnode::api::{Event, JobView, Request};
use bitnode_protocol::job::{FinetuneRequest, JobSpec};
use bitnode_protocol::InferRequest;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(90);

fn solo(name: &str, extra: &str) -> Node {
    Node::init(
        name,
        &format!(
            "[capabilities]\nbenchmark = false\nscore = 100\nternary_gops = 100\ndevice_memory_bytes = 8589934592\n\
             [engine]\nadapter = \"cpu\"\n{extra}"
        ),
    )
}

fn synth(home: &Path) -> std::path::PathBuf {
    let m = home.join("tiny");
    cli_ok(
        home,
        &["model", "synth", "--preset", "tiny", "--out", m.to_str().unwrap()],
    );
    m
}

/// Resident memory of a process, in bytes (VmRSS).
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn infer_request(home: &Path, model: &Path, prompt: &str, max_tokens: usize) -> Request {
    let spec = JobSpec::Infer(InferRequest {
        model: model.display().to_string(),
        adapter: None,
        prompt: prompt.into(),
        max_tokens,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        seed: 0,
        messages: None,
        stop: vec![],
    });
    bitnode::submit::prepare(home, spec, &bitnode::exec::JobPaths::model(model), "local", false).unwrap()
}

/// A delegated fine-tune of the tiny model on `n` short documents (a few seconds on the CPU reference),
/// its adapter to `out`, pinned to `to`.
pub fn finetune_request(home: &Path, model: &Path, out: &Path, steps: usize, to: &str) -> Request {
    let data = home.join(format!("data-{}.jsonl", out.file_name().unwrap().to_string_lossy()));
    let mut s = String::new();
    for i in 0..24 {
        s.push_str(&format!(
            "{{\"text\": \"device {i} of the mesh trains a small adapter on its own data, step by step, line {i}.\"}}\n"
        ));
    }
    std::fs::write(&data, s).unwrap();
    let spec = JobSpec::Finetune(Box::new(FinetuneRequest {
        model: model.display().to_string(),
        data_name: String::new(),
        data: vec![],
        init_adapter: None,
        rank: 8,
        alpha: 16.0,
        lora_dropout: None,
        targets: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .map(String::from)
        .to_vec(),
        lr: 1e-3,
        steps: Some(steps),
        epochs: None,
        batch: 1,
        seq_len: 64,
        grad_accum: 1,
        weight_decay: 0.0,
        warmup: 0,
        schedule: "constant".into(),
        max_grad_norm: Some(1.0),
        shuffle: true,
        seed: 0,
        val_split: 0.0,
        save_every: Some(5),
        max_memory: None,
        activation: None,
    }));
    let paths = bitnode::exec::JobPaths {
        model: model.to_path_buf(),
        adapter: None,
        data: Some(data),
        out: Some(out.to_path_buf()),
        resume: None,
        json_log: None,
    };
    bitnode::submit::prepare(home, spec, &paths, to, false).unwrap()
}

#[test]
fn clients_that_stop_reading_cost_a_bounded_backlog_and_the_daemon_stays_flat() {
    let mut n = solo("stall", "");
    n.start();
    let m = synth(&n.home);
    let req = infer_request(&n.home, &m, "a terminal that stopped reading", 200);
    let mut line = serde_json::to_vec(&req).unwrap();
    line.push(b'\n');
    // One job first, so the daemon's memory is measured after it has done everything once.
    let warm: JobView = bitnode::control::call_stream(&n.home, &req, T, &mut |_| {}).unwrap();
    assert_eq!(warm.state.as_str(), "succeeded", "{warm:?}");
    let pid = n.pid().unwrap();
    let before = rss(pid);

    // 48 clients submit and never read: every one of them is streamed tokens and a heartbeat a second
    // while the jobs queue behind each other (thousands of events in all).
    const CLIENTS: usize = 48;
    let sock = n.home.join("bitnode.sock");
    let mut stalled: Vec<UnixStream> = (0..CLIENTS)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.write_all(&line).unwrap();
            s
        })
        .collect();
    let mut peak = before;
    let done = wait_for(Duration::from_secs(300), "every stalled client's job to end", || {
        peak = peak.max(rss(pid));
        let v: Value = serde_json::from_str(&cli_ok(&n.home, &["jobs", "--json"])).ok()?;
        let jobs = v.as_array()?.clone();
        let finished = jobs.iter().filter(|j| j["state"] == "succeeded").count();
        (jobs.len() == CLIENTS + 1 && jobs.iter().all(|j| j["state"] != "queued" && j["state"] != "running"))
            .then_some((finished, jobs.len()))
    });
    // A client that does not read does not cancel its job: every one ran to the end.
    assert_eq!(done.0, CLIENTS + 1, "{done:?}");
    let after = rss(pid);
    eprintln!(
        "daemon RSS: {} MiB before, {} MiB peak, {} MiB after {CLIENTS} stalled clients",
        before >> 20,
        peak >> 20,
        after >> 20
    );
    assert!(
        peak < before + (48 << 20),
        "the daemon grew from {before} to {peak} bytes with stalled clients"
    );
    // The daemon still answers, and what each stalled client can read is well-formed JSON lines.
    assert!(n.status()["id"].is_string());
    let mut events = 0;
    for s in stalled.iter_mut().take(4) {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let r = BufReader::new(&*s);
        for l in r.lines() {
            let Ok(l) = l else { break };
            let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            if v.get("event").is_some() {
                serde_json::from_value::<Event>(v).unwrap();
                events += 1;
            } else {
                assert_eq!(v["ok"], true, "{v}");
                break;
            }
        }
    }
    assert!(events > 0);
}

#[test]
fn a_slow_disk_delays_no_heartbeat() {
    // Every state-file write of both daemons takes 10 s, longer than the 8 s heartbeat timeout (heartbeats
    // every 2 s): were the writes on the event loop, each daemon would stall for 10 s at every job update.
    let slow = ("BITNODE_TEST_STORE_DELAY_MS", "10000");
    let mut phone = solo("slowp", "").env(slow.0, slow.1);
    let mut desk = Node::init(
        "slowd",
        "[capabilities]\nbenchmark = false\nscore = 600\nternary_gops = 600\ndevice_memory_bytes = 8589934592\n\
         [engine]\nadapter = \"cpu\"\n",
    )
    .env(slow.0, slow.1);
    phone.start();
    desk.start();
    desk.join(&phone.invite());
    phone.wait_connected(&desk, T);
    desk.wait_connected(&phone, T);
    let m = synth(&phone.home);
    // Three fine-tunes in a row (each writes the job table on both sides several times). Events arrive
    // all along: progress at up to 5/s from the worker, a heartbeat every 2 s from the submitter. A stall
    // of either daemon shows as a gap.
    let mut worst = Duration::ZERO;
    for k in 0..3 {
        let out = phone.home.join(format!("adapter{k}"));
        let req = finetune_request(&phone.home, &m, &out, 30, &desk.id);
        let mut last: Option<Instant> = None;
        let v: JobView = bitnode::control::call_stream(&phone.home, &req, T, &mut |_| {
            if let Some(l) = last {
                worst = worst.max(l.elapsed());
            }
            last = Some(Instant::now());
        })
        .unwrap();
        assert_eq!(v.state.as_str(), "succeeded", "{v:?}");
        assert_eq!(v.executed_by.as_deref(), Some(desk.id.as_str()), "{v:?}");
        assert!(v.attempts.is_empty(), "the job moved: {:?}", v.attempts);
        assert!(out.join("adapter_model.safetensors").is_file());
    }
    eprintln!("longest gap between a job's events with 10 s writes: {worst:?}");
    // Half the heartbeat timeout.
    assert!(worst < Duration::from_secs(4), "events paused for {worst:?}");
    // The table reaches the disk in the end: the last job is in it, state and all.
    wait_for(T, "the job table on disk", || {
        let t: Value = serde_json::from_slice(&std::fs::read(phone.home.join("jobs.json")).ok()?).ok()?;
        let jobs = t["jobs"].as_array()?;
        (jobs.len() == 3 && jobs.iter().all(|j| j["state"] == "succeeded")).then_some(())
    });
}

/// A free loopback TCP port (a restarted daemon must listen where its peers remember it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every state file in `home` parses: identity, trust list, job table, submission records.
fn state_parses(home: &Path, what: &str) {
    cli_ok(home, &["id"]);
    bitnode::trust::TrustList::load(home).unwrap_or_else(|e| panic!("{what}: trust list: {e:#}"));
    if let Ok(b) = std::fs::read(home.join("jobs.json")) {
        let t: bitnode::jobs::JobTable =
            serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{what}: jobs.json does not parse: {e}"));
        for j in &t.jobs {
            bitnode::jobs::Submission::load(home, &j.id).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        }
    }
}

#[test]
fn fine_tunes_survive_sigkills_of_submitter_and_worker_at_random_moments() {
    // 20 SIGKILLs at seeded random moments, alternately of the submitter (a phone whose app is killed)
    // and of the worker; each daemon starts again at once. Seven fine-tunes are submitted along the way.
    let seed = std::env::var("BITNODE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64);
    eprintln!("kill schedule seed {seed} (BITNODE_TEST_SEED)");
    let mut rng = seed;
    let mut next = |lo: u64, hi: u64| {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        lo + (rng >> 33) % (hi - lo)
    };
    let cfg = "[jobs]\nheartbeat_secs = 1\nheartbeat_timeout_secs = 3\nreattach_secs = 8\nmax_attempts = 100";
    let pp = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let dp = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let mut phone = Node::init(
        "crashp",
        &format!(
            "[capabilities]\nbenchmark = false\nscore = 1\nternary_gops = 1\ndevice_memory_bytes = 8589934592\n\
             [engine]\nadapter = \"cpu\"\n{cfg}"
        ),
    )
    .listen(&[&pp]);
    let mut desk = Node::init(
        "crashd",
        &format!(
            "[capabilities]\nbenchmark = false\nscore = 600\nternary_gops = 600\ndevice_memory_bytes = 8589934592\n\
             [engine]\nadapter = \"cpu\"\n{cfg}"
        ),
    )
    .listen(&[&dp]);
    phone.start();
    desk.start();
    desk.join(&phone.invite());
    phone.wait_connected(&desk, T);
    let m = synth(&phone.home);
    let mut outs = vec![];
    for k in 0..20 {
        if k % 3 == 0 {
            let out = phone.home.join(format!("adapter{}", outs.len()));
            let req = match finetune_request(&phone.home, &m, &out, 40, "auto") {
                Request::Submit {
                    spec,
                    data_path,
                    need,
                    to,
                    out,
                    resume,
                    ..
                } => Request::Submit {
                    spec,
                    data_path,
                    need,
                    to,
                    out,
                    resume,
                    detach: true,
                    cancel_on_disconnect: false,
                },
                other => other,
            };
            let v: JobView = bitnode::control::call(&phone.home, &req, T).unwrap();
            outs.push((v.job_id, out));
        }
        std::thread::sleep(Duration::from_millis(next(300, 3000)));
        let victim = if k % 2 == 0 { &mut phone } else { &mut desk };
        victim.kill();
        state_parses(&victim.home, &format!("after kill {k} of {}", victim.name));
        victim.start();
    }
    // Every fine-tune finishes, its adapter in its --out, wherever it ended up running.
    for (id, out) in &outs {
        let v = wait_for(Duration::from_secs(300), &format!("job {id} to end"), || {
            let v: Value = serde_json::from_str(&cli_ok(&phone.home, &["jobs", "show", id, "--json"])).ok()?;
            matches!(v["state"].as_str(), Some("succeeded" | "failed" | "cancelled")).then_some(v)
        });
        assert_eq!(v["state"], "succeeded", "{v}");
        eprintln!(
            "job {id}: succeeded on {}; lost: {}",
            v["executed_by_name"], v["attempts"]
        );
        assert!(
            out.join("adapter_model.safetensors").is_file(),
            "job {id}: no adapter in {}",
            out.display()
        );
    }
    state_parses(&phone.home, "at the end");
    state_parses(&desk.home, "at the end");
    // The kills did land on live jobs: the restarted phone took jobs up again.
    let took_up = phone
        .log()
        .matches("taking up a job submitted before the restart")
        .count();
    let reattached = phone
        .log()
        .matches("the worker kept the job through this device's restart")
        .count();
    eprintln!("the phone took up {took_up} job(s) after its restarts; {reattached} time(s) its worker had kept it");
    assert!(took_up > 0, "no kill of the phone met a live job");
}

#[test]
fn a_detached_job_is_followed_to_its_end_from_another_terminal() {
    let mut n = solo("follow", "");
    n.start();
    let m = synth(&n.home);
    let data = n.home.join("d.jsonl");
    std::fs::write(
        &data,
        (0..12)
            .map(|i| format!("{{\"text\": \"line {i} of a small dataset for a detached fine-tune\"}}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let out = n.home.join("adapter");
    let args = [
        "submit",
        "finetune",
        "--model",
        m.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "30",
        "--rank",
        "4",
        "--seq-len",
        "64",
        "--detach",
        "--json",
    ];
    let v: Value = serde_json::from_str(cli_ok(&n.home, &args).lines().last().unwrap()).unwrap();
    let id = v["job_id"].as_str().unwrap().to_string();
    // A second terminal re-attaches and sees the job to its end, exactly as `submit` would have shown it.
    let (ok, outp, err) = cli(&n.home, &["jobs", "follow", &id[..8], "--json"]);
    assert!(ok, "{err}{outp}");
    let end: Value = serde_json::from_str(outp.lines().last().unwrap()).unwrap();
    assert_eq!(
        (end["job_id"].as_str(), end["state"].as_str()),
        (Some(id.as_str()), Some("succeeded"))
    );
    assert!(out.join("adapter_model.safetensors").is_file());
    // Following a job that already ended answers at once with how it ended; an unknown one is an error.
    let again: Value = serde_json::from_str(
        cli_ok(&n.home, &["jobs", "follow", &id, "--json"])
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(again["state"], "succeeded");
    cli_err(&n.home, &["jobs", "follow", "ffffffff"], "no job");
}
