//! The `bitnode` binary as a user runs it: real processes, real files. Bad input must give one clear
//! error line and a non-zero exit, never a panic.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bitnode"));
    c.env("BITNODE_HOME", tmp("home"));
    c
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitnode-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(c: &mut Command) -> (Output, String, String) {
    let o = c.output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    (o, out, err)
}

fn synth_tiny(name: &str) -> PathBuf {
    let d = tmp(name);
    let (o, _, err) = run(bin().args(["model", "synth", "--preset", "tiny", "--out"]).arg(&d));
    assert!(o.status.success(), "synth failed: {err}");
    d
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A copy of `model` named `name` whose config.json has `from` replaced by `to`.
fn with_config_edit(model: &Path, name: &str, from: &str, to: &str) -> PathBuf {
    let d = tmp(name);
    copy_dir(model, &d);
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    assert!(cfg.contains(from), "config.json has no {from:?}");
    std::fs::write(d.join("config.json"), cfg.replace(from, to)).unwrap();
    d
}

/// Expects failure with a message containing `needle`, and no panic.
fn fails_with(c: &mut Command, needle: &str) {
    let (o, _, err) = run(c);
    assert!(!o.status.success(), "expected failure mentioning {needle:?}");
    assert_eq!(o.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "stderr lacks {needle:?}: {err}"
    );
}

#[test]
fn infer_json_contract_on_cpu_and_gpu_agree() {
    let m = synth_tiny("contract");
    let mut results = vec![];
    for dev in ["cpu", "gpu"] {
        let (o, out, err) = run(bin()
            .args([
                "infer",
                "--prompt",
                "Hello there",
                "--max-tokens",
                "12",
                "--json",
                "--device",
                dev,
                "--model",
            ])
            .arg(&m));
        assert!(o.status.success(), "{err}");
        let last = out.lines().last().unwrap();
        let v: serde_json::Value = serde_json::from_str(last).unwrap();
        let tokens = v["tokens"].as_array().unwrap();
        assert!(!tokens.is_empty() && tokens.len() <= 12);
        assert!(v["prompt_tokens"].as_u64().unwrap() >= 3, "BOS + prompt");
        assert!(v["decode_tokens_per_second"].as_f64().is_some());
        assert!(v["text"].is_string());
        // The streamed text precedes the JSON line.
        assert!(out.starts_with(v["text"].as_str().unwrap()), "streamed text {out:?}");
        results.push(v["tokens"].clone());
    }
    assert_eq!(
        results[0], results[1],
        "CPU reference and GPU disagree on greedy tokens"
    );
}

#[test]
fn seeded_sampling_is_reproducible_and_score_prints_contract() {
    let m = synth_tiny("sampling");
    let args = |seed: &str| {
        let mut c = bin();
        c.args([
            "infer",
            "--prompt",
            "a b c",
            "--max-tokens",
            "16",
            "--temperature",
            "0.9",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--json",
            "--seed",
            seed,
            "--model",
        ])
        .arg(&m);
        c
    };
    let last = |c: &mut Command| {
        let (o, out, err) = run(c);
        assert!(o.status.success(), "{err}");
        serde_json::from_str::<serde_json::Value>(out.lines().last().unwrap()).unwrap()["tokens"].clone()
    };
    let a = last(&mut args("1"));
    assert_eq!(a, last(&mut args("1")), "same seed, same tokens");
    assert_ne!(a, last(&mut args("2")), "different seeds should differ");

    let f = tmp("score").join("t.txt");
    std::fs::write(&f, "the quick brown fox jumps over the lazy dog ".repeat(40)).unwrap();
    let (o, out, err) = run(bin()
        .args(["score", "--json", "--text-file"])
        .arg(&f)
        .arg("--model")
        .arg(&m));
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let (n, nll, ppl) = (
        v["tokens"].as_u64().unwrap(),
        v["nll"].as_f64().unwrap(),
        v["ppl"].as_f64().unwrap(),
    );
    assert!(
        n > 256,
        "text longer than the 256-token context is scored in windows: {n}"
    );
    assert!(nll > 0.0 && (ppl - nll.exp()).abs() < 1e-6 * ppl);
}

#[test]
fn bad_inputs_fail_cleanly() {
    let good = synth_tiny("bad-good");
    let infer = |m: &Path| {
        let mut c = bin();
        c.args(["infer", "--prompt", "hi", "--max-tokens", "2", "--model"])
            .arg(m);
        c
    };
    // Missing directory.
    fails_with(&mut infer(&tmp("nothing").join("absent")), "not found");
    // Truncated safetensors.
    let d = tmp("truncated");
    copy_dir(&good, &d);
    let st = d.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(&mut infer(&d), "safetensors");
    // Garbage header.
    std::fs::write(&st, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
    fails_with(&mut infer(&d), "safetensors");
    // Wrong shape: claim a larger hidden size than the tensors have.
    let d = with_config_edit(&good, "shape", "\"hidden_size\": 128", "\"hidden_size\": 256");
    fails_with(&mut infer(&d), "shape");
    // Wrong dtype: an online config over packed uint8 weights.
    let d = with_config_edit(&good, "dtype", "\"offline\"", "\"online\"");
    fails_with(&mut infer(&d), "dtype");
    // Missing tokenizer.
    let d = tmp("notok");
    copy_dir(&good, &d);
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    fails_with(&mut infer(&d), "tokenizer");
    // Unknown model_type.
    let d = with_config_edit(&good, "llama", "\"bitnet\"", "\"llama\"");
    fails_with(&mut infer(&d), "model_type");
    // Prompt longer than the 256-token context.
    let long = "word ".repeat(600);
    fails_with(
        bin()
            .args(["infer", "--max-tokens", "2", "--prompt", &long, "--model"])
            .arg(&good),
        "context",
    );
    // No usable adapter.
    fails_with(
        bin()
            .args(["infer", "--prompt", "hi", "--device", "no-such-gpu-xyz", "--model"])
            .arg(&good),
        "adapter",
    );
    // A missing or foreign LoRA adapter.
    fails_with(
        bin()
            .args([
                "infer",
                "--prompt",
                "hi",
                "--adapter",
                "/nonexistent-adapter",
                "--model",
            ])
            .arg(&good),
        "adapter_config.json",
    );
    let lora = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lora/final_adapter");
    fails_with(
        bin()
            .args(["infer", "--prompt", "hi", "--model"])
            .arg(&good)
            .arg("--adapter")
            .arg(&lora),
        "shape",
    );
    // Bad sampling settings.
    fails_with(
        bin()
            .args(["infer", "--prompt", "hi", "--top-p", "0", "--model"])
            .arg(&good),
        "top-p",
    );
}

/// `--adapter` applies a PEFT adapter: the scores with and without it differ, and infer runs with it.
#[test]
fn score_and_infer_apply_a_peft_adapter() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let text = tmp("lora-text").join("t.txt");
    std::fs::write(&text, "The river runs past the old mill at the edge of the town.").unwrap();
    let score = |adapter: Option<&Path>| {
        let mut c = bin();
        c.args(["score", "--json", "--device", "cpu", "--model"])
            .arg(fx.join("online_tied"))
            .arg("--text-file")
            .arg(&text);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        let (o, out, err) = run(&mut c);
        assert!(o.status.success(), "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["nll"].as_f64().unwrap()
    };
    let base = score(None);
    let tuned = score(Some(&fx.join("lora/final_adapter")));
    assert!((base - tuned).abs() > 1e-3, "{base} vs {tuned}");
    let (o, _, err) = run(bin()
        .args(["infer", "--prompt", "The river", "--max-tokens", "4", "--model"])
        .arg(fx.join("online_tied"))
        .arg("--adapter")
        .arg(fx.join("lora/final_adapter")));
    assert!(o.status.success(), "{err}");
}

#[test]
fn devices_lists_adapters() {
    let (o, out, err) = run(bin().args(["devices", "--json"]));
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let list = v.as_array().unwrap();
    assert!(
        !list.is_empty(),
        "CI installs lavapipe, so at least one adapter must be listed"
    );
    for a in list {
        assert!(a["max_storage_buffer_binding_size"].as_u64().unwrap() > 0);
        assert!(a["backend"].is_string() && a["device_type"].is_string());
    }
}
