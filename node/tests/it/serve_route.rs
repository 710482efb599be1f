//! Serving by model: a request through the phone's API for a model only its peers hold goes to one of
//! them (the model itself does not move), the scheduler prefers the holder that has it warm, and a model
//! no connected device holds is a 404 (unknown) or a 503 (its holders are away). And `bitnode bench
//! serve` against a real daemon.
use crate::harness::*;
use crate::serve::{curl, greedy_infer, jobs};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const TOKEN: &str = "route-token-0123456789";

fn last_json(out: &str) -> Value {
    serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// A streamed completion with curl: (the response headers, the concatenated text of its events).
fn stream(url: &str, body: &str) -> (String, String) {
    let heads = std::env::temp_dir().join(format!("bitnode-route-heads-{}", std::process::id()));
    let out = Command::new("curl")
        .args(["-s", "-N", "-D"])
        .arg(&heads)
        .args([url, "-H", &format!("Authorization: Bearer {TOKEN}"), "-d", body])
        .output()
        .unwrap();
    let h = std::fs::read_to_string(&heads).unwrap_or_default();
    let _ = std::fs::remove_file(&heads);
    let mut text = String::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(d) = l.strip_prefix("data: ") else { continue };
        if d == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}"));
        assert!(v.get("error").is_none(), "the stream failed: {v}");
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
    }
    (h, text)
}

/// The model hashes (and warm engines) `peer` advertises, as `viewer` last heard them.
fn advert(viewer: &Node, peer: &Node) -> (Vec<String>, Vec<Value>) {
    let p = viewer.peer(&peer.id).unwrap_or(Value::Null);
    let models = p["capabilities"]["models"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let warm = p["capabilities"]["warm"].as_array().cloned().unwrap_or_default();
    (models, warm)
}

#[test]
fn a_model_only_peers_hold_is_served_by_them_preferring_a_warm_engine() {
    // The desktop and the laptop hold the model, the phone does not. The laptop scores a little higher:
    // only the desktop's warm engine can make it the better choice.
    let mut desktop = pinned_node("desktop-rt", 600.0, "");
    let mut laptop = pinned_node("laptop-rt", 650.0, "");
    let mut phone = pinned_node(
        "phone-rt",
        0.1,
        &format!("[api]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"),
    );
    for n in [&mut desktop, &mut laptop, &mut phone] {
        n.start();
    }
    desktop.join(&phone.invite());
    laptop.join(&phone.invite());
    phone.wait_connected(&desktop, T);
    phone.wait_connected(&laptop, T);

    // Added while the daemons run: `model add` tells the daemon, whose advert then lists it.
    let model = desktop.home.join("tiny-model");
    cli_ok(
        &desktop.home,
        &["model", "synth", "--preset", "tiny", "--out", model.to_str().unwrap()],
    );
    let mut hash = String::new();
    for n in [&desktop, &laptop] {
        let added = last_json(&cli_ok(
            &n.home,
            &["model", "add", model.to_str().unwrap(), "--name", "tiny", "--json"],
        ));
        hash = added["hash"].as_str().unwrap().to_string();
    }
    for n in [&desktop, &laptop] {
        wait_for(T, &format!("the phone to hear that {} holds the model", n.name), || {
            advert(&phone, n).0.contains(&hash).then_some(())
        });
    }
    let url = phone.status()["api_url"].as_str().expect("the API listens").to_string();
    let auth = format!("Authorization: Bearer {TOKEN}");
    let (s, b, _) = curl(&[&format!("{url}/models"), "-H", &auth]);
    assert_eq!(s, 200, "{b}");
    let entry = b["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == hash.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("the peers' model is not listed: {b}"));
    let mut holders: Vec<&str> = entry["bitnode"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d.as_str())
        .collect();
    holders.sort();
    assert_eq!(holders, ["desktop-rt", "laptop-rt"], "{entry}");

    // Pinned to the desktop (the API's `to` field, as `bitnode chat --to`): the desktop loads the model,
    // and its advert says the engine is warm.
    let pinned = serde_json::json!({"model": hash, "prompt": "warm up", "max_tokens": 2, "to": "desktop-rt"});
    let (s, b, h) = curl(&[&format!("{url}/completions"), "-H", &auth, "-d", &pinned.to_string()]);
    assert_eq!(s, 200, "{b}");
    assert!(h.contains("x-bitnode-device: desktop-rt"), "{h}");
    let warm = wait_for(T, "the desktop's advert to list its warm engine", || {
        let w = advert(&phone, &desktop).1;
        w.iter().any(|e| e["model"] == hash.as_str()).then_some(w)
    });
    assert_eq!(warm[0]["adapter"], Value::Null, "{warm:?}");
    assert!(advert(&phone, &laptop).1.is_empty(), "the laptop ran nothing");

    // Not pinned: the scheduler picks the desktop, whose engine is warm, over the faster laptop; the
    // answer is the desktop's model's greedy one.
    let prompt = "The mesh of my own devices";
    let n = 12;
    let want = greedy_infer(&desktop.home, &model, prompt, n);
    assert!(!want.is_empty(), "the comparison needs some text");
    let body = serde_json::json!({"model": hash, "prompt": prompt, "max_tokens": n, "temperature": 0});
    let (s, b, h) = curl(&[&format!("{url}/completions"), "-H", &auth, "-d", &body.to_string()]);
    assert_eq!((s, b["choices"][0]["text"].as_str()), (200, Some(want.as_str())), "{b}");
    assert!(h.contains("x-bitnode-device: desktop-rt"), "{h}");
    assert_eq!(b["bitnode"]["executed_by"], desktop.id.as_str(), "{b}");
    let job = jobs(&phone).into_iter().next().unwrap();
    let shown = last_json(&cli_ok(
        &phone.home,
        &["jobs", "show", job["job_id"].as_str().unwrap(), "--json"],
    ));
    let placement = shown["placement"].to_string();
    assert!(placement.contains("has the model warm"), "{placement}");
    assert!(placement.contains("does not hold model"), "{placement}");

    // Streamed, the same answer from the same device.
    let mut sbody = body.clone();
    sbody["stream"] = Value::Bool(true);
    let (h, text) = stream(&format!("{url}/completions"), &sbody.to_string());
    assert!(h.contains("x-bitnode-device: desktop-rt"), "{h}");
    assert_eq!(text, want);

    // `bitnode chat` takes the same path: a peer's model by its hash.
    let mut c = Command::new(bin_path())
        .arg("--home")
        .arg(&phone.home)
        .args(["chat", "--model", &hash, "--temperature", "0", "--max-tokens", "6"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut c.stdin.take().unwrap(), b"hello\n\n").unwrap();
    let out = c.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().any(|l| l.starts_with("desktop-rt> ")), "{text}");

    // The model never moved to the phone.
    assert!(!phone.home.join("models/by-hash").join(&hash).exists());

    // A hash nobody holds, and a name nobody has: 404.
    let nobody = "ab".repeat(32);
    for m in [nobody.as_str(), "no-such-model"] {
        let body = serde_json::json!({"model": m, "prompt": "x", "max_tokens": 2});
        let (s, b, _) = curl(&[&format!("{url}/completions"), "-H", &auth, "-d", &body.to_string()]);
        assert_eq!((s, b["error"]["code"].as_str()), (404, Some("model_not_found")), "{b}");
    }
    // Its holders away (their last adverts still say they hold it): 503.
    desktop.kill();
    laptop.kill();
    for n in [&desktop, &laptop] {
        wait_for(T, &format!("the phone to see {} gone", n.name), || {
            (phone.peer(&n.id)?["connected"] == false).then_some(())
        });
    }
    let (s, b, _) = curl(&[&format!("{url}/completions"), "-H", &auth, "-d", &body.to_string()]);
    assert_eq!((s, b["error"]["code"].as_str()), (503, Some("no_device")), "{b}");
    assert!(b["error"]["message"].as_str().unwrap().contains("not connected"), "{b}");
}

#[test]
fn bench_serve_measures_a_running_daemons_api_locally_and_delegated() {
    let mut phone = pinned_node(
        "phone-bs",
        100.0,
        &format!("[api]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"),
    );
    let mut desktop = pinned_node("desktop-bs", 600.0, "");
    phone.start();
    desktop.start();
    desktop.join(&phone.invite());
    phone.wait_connected(&desktop, T);
    // The built-in tiny model by default, the token from this home's config; here (`--to local`) and on
    // the desktop (`--to desktop-bs`, which pulls the model first).
    for to in ["local", "desktop-bs"] {
        let out = cli_ok(
            &phone.home,
            &[
                "bench",
                "serve",
                // 10 at once: more than a connection's job streams (4) and the old queue limit (8),
                // so a burst delegated together must wait its turn for a stream, not fail.
                "--concurrency",
                "1,10",
                "--prompt-tokens",
                "16",
                "--max-tokens",
                "8",
                "--to",
                to,
                "--json",
            ],
        );
        let r = last_json(&out);
        let device = if to == "local" { "phone-bs" } else { to };
        assert!(r["model"].as_str().is_some_and(|h| h.len() == 64), "{r}");
        assert_eq!(r["to"], to, "{r}");
        assert_eq!(r["first_request_device"], device, "{r}");
        assert!(r["first_request_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["prompt_tokens"].as_u64().unwrap() > 0, "{r}");
        let levels = r["levels"].as_array().unwrap();
        assert_eq!(levels.len(), 2, "{r}");
        for (l, c) in levels.iter().zip([1u64, 10]) {
            assert_eq!(l["concurrency"], c, "{l}");
            assert_eq!(l["errors"], serde_json::json!([]), "{l}");
            assert_eq!(l["devices"], serde_json::json!({device: c}), "{l}");
            // Tokens were produced by every stream (timings are not asserted: a shared CI machine).
            assert!(l["completion_tokens"].as_u64().unwrap() >= c, "{l}");
            for k in ["wall_s", "aggregate_tok_s", "ttft_median_s", "ttft_p90_s"] {
                assert!(l[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {l}");
            }
            // Null where every stream's tokens came in one piece (they are sent in 30 ms batches).
            assert!(l.get("decode_tok_s_median").is_some(), "{l}");
        }
    }
}
