//! GGUF models as a service: a TQ2_0 file (and the SiLU one) goes into the model store under a name, is
//! submitted to the mesh by path, crosses to the stronger peer (the store keeps it as a directory holding
//! `model.gguf`, which transfers like any model), and is served by the OpenAI-compatible API to the official
//! `openai` client; every answer equals what the local commands print for the file.
use crate::harness::*;
use crate::serve::{greedy_infer_json, python};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const TOKEN: &str = "gguf-token-0123456789";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/gguf_model")
        .join(name)
}

fn last(out: &str) -> Value {
    serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn gguf_models_are_stored_submitted_and_served() {
    let mut desktop = pinned_node("desktop-gguf", 600.0, "");
    let mut phone = pinned_node(
        "phone-gguf",
        0.1,
        &format!("[api]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"),
    );
    desktop.start();
    phone.start();
    desktop.join(&phone.invite());
    phone.wait_connected(&desktop, T);
    desktop.wait_connected(&phone, T);
    let (tq, silu) = (fixture("tq2_0.gguf"), fixture("tq2_0_silu.gguf"));
    let (tq_s, silu_s) = (tq.to_str().unwrap(), silu.to_str().unwrap());

    // The store: a GGUF file is added under a name; a file that is not a GGUF model is refused.
    let added = last(&cli_ok(&phone.home, &["model", "add", tq_s, "--name", "tq", "--json"]));
    assert_eq!(added["kind"], "model", "{added}");
    cli_ok(&phone.home, &["model", "add", silu_s, "--name", "tq-silu"]);
    let junk = phone.home.join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\0\0\0 not really").unwrap();
    cli_err(
        &phone.home,
        &["model", "add", junk.to_str().unwrap(), "--name", "junk"],
        "junk.gguf",
    );
    let listed = cli_ok(&phone.home, &["model", "list"]);
    assert!(listed.contains("tq-silu") && !listed.contains("junk"), "{listed}");

    // submit by path: delegated to the desktop, which fetches the file from the phone's store; the NLL is
    // the local command's.
    let text = phone.home.join("t.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog, twice: the quick brown fox.",
    )
    .unwrap();
    let t = text.to_str().unwrap();
    for (model, name) in [(tq_s, "tq"), (silu_s, "tq-silu")] {
        let remote = last(&cli_ok(
            &phone.home,
            &["submit", "score", "--model", model, "--text-file", t, "--json"],
        ));
        assert_eq!(remote["state"], "succeeded", "{remote}");
        assert_eq!(remote["executed_by"], desktop.id.as_str(), "{remote}");
        let local = last(&cli_ok(
            &phone.home,
            &["score", "--model", model, "--text-file", t, "--device", "cpu", "--json"],
        ));
        assert_eq!(
            remote["result"]["nll"], local["nll"],
            "{name}: remote {remote} local {local}"
        );
        // By its store name too.
        let named = last(&cli_ok(
            &phone.home,
            &[
                "submit",
                "score",
                "--model",
                name,
                "--text-file",
                t,
                "--to",
                "local",
                "--json",
            ],
        ));
        assert_eq!(named["result"]["nll"], local["nll"], "{name}: {named}");
    }

    // A LoRA GGUF (trained here, exported by `bitnode adapter export`) goes into the store as an adapter and
    // travels with a submitted job; the NLL is the local command's with the same file.
    let peft = phone.home.join("lora-peft");
    let lora = phone.home.join("lora.gguf");
    cli_ok(
        &phone.home,
        &[
            "finetune",
            "--model",
            tq_s,
            "--data",
            t,
            "--out",
            peft.to_str().unwrap(),
            "--steps",
            "2",
            "--seq-len",
            "16",
            "--rank",
            "4",
            "--lr",
            "1e-2",
            "--device",
            "cpu",
        ],
    );
    cli_ok(
        &phone.home,
        &[
            "adapter",
            "export",
            "--gguf",
            lora.to_str().unwrap(),
            "--adapter",
            peft.to_str().unwrap(),
            "--base",
            tq_s,
        ],
    );
    let l = lora.to_str().unwrap();
    let added = last(&cli_ok(&phone.home, &["model", "add", l, "--name", "lora", "--json"]));
    assert_eq!(added["kind"], "adapter", "{added}");
    let remote = last(&cli_ok(
        &phone.home,
        &[
            "submit",
            "score",
            "--model",
            tq_s,
            "--adapter",
            l,
            "--text-file",
            t,
            "--json",
        ],
    ));
    assert_eq!(remote["executed_by"], desktop.id.as_str(), "{remote}");
    let local = last(&cli_ok(
        &phone.home,
        &[
            "score",
            "--model",
            tq_s,
            "--adapter",
            l,
            "--text-file",
            t,
            "--device",
            "cpu",
            "--json",
        ],
    ));
    let plain = last(&cli_ok(
        &phone.home,
        &["score", "--model", tq_s, "--text-file", t, "--device", "cpu", "--json"],
    ));
    assert_eq!(remote["result"]["nll"], local["nll"], "remote {remote} local {local}");
    assert_ne!(local["nll"], plain["nll"], "the adapter changes the model");

    // The API: the official client lists the GGUF models and completes with them (and with the GGUF
    // adapter); greedy equals `bitnode infer` on the file.
    let url = phone.status()["api_url"].as_str().expect("the API listens").to_string();
    let (prompt, n) = ("The quick brown fox", 8);
    let script = r#"
import json, sys, openai
url, key, prompt, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
c = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)
out = {"models": [m.id for m in c.models.list().data]}
for m in ["tq", "tq-silu"]:
    r = c.completions.create(model=m, prompt=prompt, max_tokens=n, temperature=0)
    out[m] = r.choices[0].text
    ch = c.chat.completions.create(model=m, messages=[{"role": "user", "content": prompt}], max_tokens=n, temperature=0)
    out[m + "-chat"] = ch.usage.prompt_tokens
r = c.completions.create(model="tq", prompt=prompt, max_tokens=n, temperature=0, extra_body={"adapter": "lora"})
out["tq-lora"] = r.choices[0].text
print(json.dumps(out))
"#;
    let out = Command::new(python())
        .args(["-c", script, &url, TOKEN, prompt, &n.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the openai client failed: {}\n{stdout}\nphone log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        phone.log()
    );
    let r = last(&stdout);
    for name in ["tq", "tq-silu"] {
        assert!(r["models"].as_array().unwrap().iter().any(|m| m == name), "{r}");
    }
    for (model, name) in [(tq_s, "tq"), (silu_s, "tq-silu")] {
        let local = greedy_infer_json(&phone.home, Path::new(model), prompt, n);
        assert_eq!(r[name], local["text"], "{name}: API {r} local {local}");
        if name == "tq" {
            let with = last(&cli_ok(
                &phone.home,
                &[
                    "infer",
                    "--model",
                    model,
                    "--adapter",
                    l,
                    "--prompt",
                    prompt,
                    "--max-tokens",
                    &n.to_string(),
                    "--device",
                    "cpu",
                    "--json",
                ],
            ));
            assert_eq!(r["tq-lora"], with["text"], "API with the GGUF adapter {r} local {with}");
        }
        // The chat template came from the file (tokenizer.chat_template): more tokens than the bare prompt.
        assert!(
            r[format!("{name}-chat")].as_u64().unwrap() > local["prompt_tokens"].as_u64().unwrap(),
            "{r}"
        );
    }
    desktop.stop();
    phone.stop();
}
