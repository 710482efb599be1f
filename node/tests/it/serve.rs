//! Serving: the OpenAI-compatible API of real daemons, driven by the official `openai` Python client
//! (installed by `./run-tests` into a private virtual environment) and by curl for the error cases. The
//! phone asks; the desktop, the stronger device, serves: every answer crosses the mesh.
use crate::harness::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const TOKEN: &str = "test-token-0123456789";

/// The Python with the `openai` package: `$BITNODE_TEST_PYTHON` (run-tests sets it), else one made here.
pub(crate) fn python() -> PathBuf {
    if let Ok(p) = std::env::var("BITNODE_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let py = venv.join("bin/python");
    let has = |py: &Path| {
        Command::new(py)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has(&py) {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "openai"])
                .status()
                .is_ok_and(|s| s.success());
        assert!(
            ok && has(&py),
            "could not make a virtual environment with the openai client"
        );
    }
    py
}

/// `curl` against the API: (status, body as JSON or Null, headers).
pub(crate) fn curl(args: &[&str]) -> (u16, Value, String) {
    // A directory per call: tests run in parallel threads of one process.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("bitnode-curl-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (body, heads) = (dir.join("body"), dir.join("headers"));
    let out = Command::new("curl")
        .args(["-s", "-o"])
        .arg(&body)
        .arg("-D")
        .arg(&heads)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let status: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    let b = std::fs::read(&body).unwrap_or_default();
    let h = std::fs::read_to_string(&heads).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (status, serde_json::from_slice(&b).unwrap_or(Value::Null), h)
}

/// `bitnode infer --json` of the same model, prompt and limit, greedy: its last line.
pub(crate) fn greedy_infer_json(home: &Path, model: &Path, prompt: &str, n: usize) -> Value {
    let out = cli_ok(
        home,
        &[
            "infer",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            prompt,
            "--max-tokens",
            &n.to_string(),
            "--device",
            "cpu",
            "--json",
        ],
    );
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

pub(crate) fn greedy_infer(home: &Path, model: &Path, prompt: &str, n: usize) -> String {
    greedy_infer_json(home, model, prompt, n)["text"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn the_openai_client_lists_completes_streams_and_is_served_across_the_mesh() {
    let mut desktop = pinned_node("desktop-api", 600.0, "");
    let mut phone = pinned_node(
        "phone-api",
        0.1,
        &format!(
            "[api]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\ncors_origins = [\"http://allowed.example\"]\nmax_request_bytes = 65536\n"
        ),
    );
    // Slow decoding a little on the workers, so a stream is still running when its client leaves.
    desktop = desktop.env("BITNODE_TEST_TOKEN_DELAY_MS", "20");
    desktop.start();
    phone.start();
    desktop.join(&phone.invite());
    phone.wait_connected(&desktop, T);
    desktop.wait_connected(&phone, T);

    let model = phone.home.join("tiny-model");
    cli_ok(
        &phone.home,
        &["model", "synth", "--preset", "tiny", "--out", model.to_str().unwrap()],
    );
    let added: Value = serde_json::from_str(&cli_ok(
        &phone.home,
        &["model", "add", model.to_str().unwrap(), "--name", "tiny", "--json"],
    ))
    .unwrap();
    let listed = cli_ok(&phone.home, &["model", "list"]);
    assert!(
        listed.contains("tiny") && listed.contains(added["hash"].as_str().unwrap()),
        "{listed}"
    );
    let url = phone.status()["api_url"].as_str().expect("the API listens").to_string();
    let base = url.trim_end_matches("/v1").to_string();
    // Wait until the phone's advert of the new model reached the desktop, so it is scheduled fairly.
    let prompt = "The mesh of my own devices";
    let n = 12;

    let out = Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/openai_client.py"))
        .args([&url, TOKEN, "tiny", prompt, &n.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the openai client failed: {}\n{stdout}\nphone log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        phone.log()
    );
    let r: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();

    assert!(
        r["models"].as_array().unwrap().iter().any(|m| m == "tiny"),
        "{}",
        r["models"]
    );
    // Greedy through the API equals `bitnode infer` for the same model, prompt and limit.
    let local = greedy_infer_json(&phone.home, &model, prompt, n);
    let want = local["text"].as_str().unwrap().to_string();
    let c = &r["completion"];
    assert_eq!(c["text"], want.as_str(), "{c}");
    assert_eq!(
        c["usage"]["completion_tokens"],
        local["tokens"].as_array().unwrap().len(),
        "{c}"
    );
    assert_eq!(c["usage"]["prompt_tokens"], local["prompt_tokens"], "{c}");
    let finish = if local["stop_reason"] == "max_tokens" {
        "length"
    } else {
        "stop"
    };
    assert_eq!(c["finish_reason"], finish, "{c} against {local}");
    // Served by the stronger peer, and it says so.
    assert_eq!(c["device_header"], "desktop-api", "{c}");
    assert_eq!(c["bitnode"]["executed_by"], desktop.id.as_str(), "{c}");
    assert_eq!(
        r["completion_stream"]["text"],
        want.as_str(),
        "{}",
        r["completion_stream"]
    );
    assert_eq!(r["completion_stream"]["finish_reason"], finish);
    // The chat, whole and streamed, agree; the stream ends with the usage.
    let chat = &r["chat"];
    assert_eq!(chat["role"], "assistant");
    assert!(chat["usage"]["prompt_tokens"].as_u64().unwrap() > 10, "{chat}");
    assert_eq!(r["chat_stream"]["text"], chat["text"], "{}", r["chat_stream"]);
    assert_eq!(r["chat_stream"]["usage"]["total_tokens"], chat["usage"]["total_tokens"]);
    assert_eq!(r["chat_stream"]["roles"], serde_json::json!(["assistant"]));
    // Eight at once: each equals its own greedy answer.
    let conc = &r["concurrent"];
    assert_eq!(conc["errors"], serde_json::json!([]), "{conc}");
    for (i, seq) in r["sequential"].as_array().unwrap().iter().enumerate() {
        assert_eq!(&conc["texts"][i], seq, "request {i} alone and among eight");
    }
    for (p, t) in conc["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(conc["texts"].as_array().unwrap())
        .skip(6)
    {
        assert_eq!(
            t.as_str().unwrap(),
            greedy_infer(&phone.home, &model, p.as_str().unwrap(), n)
        );
    }
    // ... and the eight shared decode steps on the desktop's warm engine (continuous batching): each
    // result says how many generations it decoded with in one step at most.
    let batches: Vec<u64> = jobs(&phone)
        .iter()
        .filter_map(|j| j["result"]["batch"].as_u64())
        .collect();
    assert!(
        batches.iter().filter(|&&b| b >= 2).count() >= 8 && batches.iter().max() == Some(&8),
        "the eight concurrent requests did not decode together: {batches:?}\ndesktop log:\n{}",
        desktop.log()
    );
    assert_eq!(
        r["unknown_model"],
        serde_json::json!({"status": 404, "code": "model_not_found"})
    );
    assert_eq!(
        r["bad_value"],
        serde_json::json!({"status": 400, "param": "max_tokens"})
    );

    // The error cases, with curl.
    let auth = format!("Authorization: Bearer {TOKEN}");
    let port = base.rsplit(':').next().unwrap().to_string();
    let completions = format!("{base}/v1/completions");
    let (s, b, _) = curl(&[&completions, "-H", &auth, "-d", "{not json"]);
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("invalid_json")), "{b}");
    let (s, b, _) = curl(&[&completions, "-d", r#"{"model":"tiny","prompt":"x"}"#]);
    assert_eq!((s, b["error"]["code"].as_str()), (401, Some("invalid_api_key")), "{b}");
    let (s, _, _) = curl(&[
        &completions,
        "-H",
        "Authorization: Bearer wrong",
        "-d",
        r#"{"model":"tiny","prompt":"x"}"#,
    ]);
    assert_eq!(s, 401);
    let big = format!(r#"{{"model":"tiny","prompt":"{}"}}"#, "x".repeat(70_000));
    let big_file = phone.home.join("big.json");
    std::fs::write(&big_file, big).unwrap();
    let (s, b, _) = curl(&[&completions, "-H", &auth, "-d", &format!("@{}", big_file.display())]);
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (413, Some("request_too_large")),
        "{b}"
    );
    // DNS rebinding: a page of another site that resolved to 127.0.0.1 sends its own host name.
    let (s, b, _) = curl(&[
        &format!("{base}/v1/models"),
        "-H",
        &auth,
        "-H",
        &format!("Host: attacker.example:{port}"),
    ]);
    assert_eq!((s, b["error"]["code"].as_str()), (403, Some("host_not_allowed")), "{b}");
    // A foreign page: refused even with the token; an allowed one gets CORS headers.
    let (s, b, h) = curl(&[
        &format!("{base}/v1/models"),
        "-H",
        &auth,
        "-H",
        "Origin: http://evil.example",
    ]);
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (403, Some("origin_not_allowed")),
        "{b}"
    );
    assert!(!h.to_ascii_lowercase().contains("access-control-allow-origin"), "{h}");
    let (s, _, h) = curl(&[
        &format!("{base}/v1/models"),
        "-H",
        &auth,
        "-H",
        "Origin: http://allowed.example",
    ]);
    assert_eq!(s, 200);
    assert!(
        h.to_ascii_lowercase()
            .contains("access-control-allow-origin: http://allowed.example"),
        "{h}"
    );
    let (s, _, h) = curl(&[
        "-X",
        "OPTIONS",
        &completions,
        "-H",
        "Origin: http://allowed.example",
        "-H",
        "Access-Control-Request-Method: POST",
    ]);
    assert_eq!(s, 204, "{h}");
    let (s, _, _) = curl(&[&format!("{base}/v2/nothing"), "-H", &auth]);
    assert_eq!(s, 404);

    // A client that disconnects cancels its generation on the device running it: curl gives up after
    // 2 s of a 200-token stream that takes at least 4 s.
    let before = jobs(&phone).len();
    let (s, _, _) = curl(&[
        "-N",
        "-m",
        "2",
        &completions,
        "-H",
        &auth,
        "-d",
        r#"{"model":"tiny","prompt":"a long story","max_tokens":200,"temperature":0,"stream":true}"#,
    ]);
    assert_eq!(s, 200, "the stream started");
    let job = wait_for(Duration::from_secs(10), "the abandoned stream's job to end", || {
        let list = jobs(&phone);
        let newest = list.first()?.clone();
        (list.len() > before && newest["state"] != "running" && newest["state"] != "queued").then_some(newest)
    });
    assert_eq!(job["state"], "cancelled", "{job}");
    let id = job["job_id"].as_str().unwrap().to_string();
    let on_worker = wait_for(Duration::from_secs(10), "the worker to stop the job", || {
        let j = jobs(&desktop).into_iter().find(|j| j["job_id"] == id.as_str())?;
        (j["state"] != "running" && j["state"] != "queued").then_some(j)
    });
    assert_eq!(on_worker["state"], "cancelled", "{on_worker}");

    // A crashed engine host is started again for the next request.
    let killed = kill_engine_hosts(&desktop.home);
    assert_eq!(killed, 1, "one engine host runs on the desktop");
    let (s, b, h) = curl(&[
        &completions,
        "-H",
        &auth,
        "-d",
        &format!(r#"{{"model":"tiny","prompt":"{prompt}","max_tokens":{n},"temperature":0}}"#),
    ]);
    assert_eq!((s, b["choices"][0]["text"].as_str()), (200, Some(want.as_str())), "{b}");
    assert!(h.contains("x-bitnode-device: desktop-api"), "{h}");
    assert_eq!(desktop.log().matches("engine host started").count(), 2);

    // `bitnode chat`: two turns through the mesh; the second carries the first, as the API's would.
    let mut c = Command::new(bin_path())
        .arg("--home")
        .arg(&phone.home)
        .args([
            "chat",
            "--model",
            "tiny",
            "--to",
            "desktop-api",
            "--temperature",
            "0",
            "--max-tokens",
            "6",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut c.stdin.take().unwrap(), b"hello\nand then?\n\n").unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let replies: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("desktop-api> ")).collect();
    assert_eq!(replies.len(), 2, "{text}");
    let body = serde_json::json!({"model": "tiny", "temperature": 0, "max_tokens": 6, "messages": [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": "and then?"},
    ]});
    let (s, b, _) = curl(&[
        &format!("{base}/v1/chat/completions"),
        "-H",
        &auth,
        "-d",
        &body.to_string(),
    ]);
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["choices"][0]["message"]["content"].as_str(),
        Some(replies[1]),
        "{text}"
    );

    // A non-loopback address without a token is refused at start, with the reason.
    let lone = home("api-no-token");
    cli_ok(&lone, &["init", "--name", "lone"]);
    let mut c = Command::new(bin_path())
        .arg("--home")
        .arg(&lone)
        .args(["start", "--listen", "/ip4/127.0.0.1/tcp/0", "--api-listen", "0.0.0.0:0"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let st = wait_for(Duration::from_secs(30), "the daemon to refuse its start", || {
        c.try_wait().ok().flatten()
    });
    let mut err = String::new();
    std::io::Read::read_to_string(&mut c.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!st.success());
    assert!(err.contains("[api] token"), "{err}");
}

/// SIGKILLs the engine hosts of the daemon at `home` (a GPU driver crash, as far as the daemon can tell).
fn kill_engine_hosts(home: &Path) -> usize {
    kill_processes("engine-host", &home.display().to_string())
}

pub(crate) fn jobs(n: &Node) -> Vec<Value> {
    let out = cli_ok(&n.home, &["jobs", "--json"]);
    serde_json::from_str(out.lines().last().unwrap_or("[]")).unwrap_or_default()
}
