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

/// `bitnode score --json --device cpu` of `text` under `model` (and `adapter`): the mean NLL.
fn score_nll(model: &Path, text: &Path, adapter: Option<&Path>) -> f64 {
    let mut c = bin();
    c.args(["score", "--json", "--device", "cpu", "--model"])
        .arg(model)
        .arg("--text-file")
        .arg(text);
    if let Some(a) = adapter {
        c.arg("--adapter").arg(a);
    }
    let (o, out, err) = run(&mut c);
    assert!(o.status.success(), "{err}");
    serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["nll"]
        .as_f64()
        .unwrap()
}

/// `--adapter` applies a PEFT adapter: the scores with and without it differ, and infer runs with it.
#[test]
fn score_and_infer_apply_a_peft_adapter() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let text = tmp("lora-text").join("t.txt");
    std::fs::write(&text, "The river runs past the old mill at the edge of the town.").unwrap();
    let score = |adapter: Option<&Path>| score_nll(&fx.join("online_tied"), &text, adapter);
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

/// `bitnode finetune` on a small real text: the loss falls, the adapter lowers the NLL of that text under
/// `score --adapter`, the JSON log has one object per step, a checkpointed run resumed half-way ends at the
/// same adapter as an uninterrupted one, and bad data fails with file and line.
#[test]
fn finetune_learns_resumes_exactly_and_refuses_bad_data() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let model = fx.join("online_tied");
    let text = "The river runs past the old mill at the edge of the town. In the morning the water is cold and \
                clear, and the children walk along the bank on their way to school. They count the boats, they \
                watch the birds, and they argue about whether the heron by the bridge is the same one they saw \
                yesterday. It usually is. ";
    let data = tmp("ft-data").join("river.txt");
    std::fs::write(&data, text.repeat(3)).unwrap();
    let out = tmp("ft-out");
    let log = tmp("ft-log").join("log.jsonl");
    let common = [
        "--seq-len",
        "32",
        "--lr",
        "1e-2",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--seed",
        "5",
    ];
    let (o, _, err) = run(bin()
        .args(["finetune", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args([
            "--steps",
            "24",
            "--save-every",
            "12",
            "--schedule",
            "cosine",
            "--warmup",
            "2",
            "--json-log",
        ])
        .arg(&log)
        .args(common));
    assert!(o.status.success(), "{err}");
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.len(), 24);
    for k in ["step", "loss", "lr", "tokens", "tokens_per_second", "elapsed_s"] {
        assert!(!steps[0][k].is_null(), "missing {k}");
    }
    let mean = |s: &[serde_json::Value]| s.iter().map(|v| v["loss"].as_f64().unwrap()).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&steps[..6]), mean(&steps[18..]));
    assert!(last < first - 0.5, "loss should fall: {first} -> {last}");
    assert!(out.join("loss.svg").exists() && out.join("adapter_config.json").exists());
    let score = |adapter: Option<&Path>| score_nll(&model, &data, adapter);
    assert!(score(Some(&out)) < score(None) - 0.5, "the adapter must fit the text");

    // Resume from the step-12 checkpoint into another directory: the same final adapter, bit for bit.
    let out2 = tmp("ft-out2");
    let (o, _, err) = run(bin()
        .args(["finetune", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out2)
        .args([
            "--steps",
            "24",
            "--schedule",
            "cosine",
            "--warmup",
            "2",
            "--json",
            "--resume",
        ])
        .arg(out.join("checkpoint-12"))
        .args(common));
    assert!(o.status.success(), "{err}");
    // --json: the summary as the last line (what a delegated job returns).
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let sum: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or("")).unwrap();
    assert_eq!(sum["steps"], 24);
    assert!(
        sum["last_loss"].as_f64().is_some() && sum["adapter"].as_str().is_some(),
        "{sum}"
    );
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(out2.join("adapter_model.safetensors")).unwrap()
    );

    // Bad data and settings.
    let bad = tmp("ft-bad").join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"text\": \"fine\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    )
    .unwrap();
    let ft = |d: &Path, extra: &[&str]| {
        let mut c = bin();
        c.args(["finetune", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(d)
            .arg("--out")
            .arg(tmp("ft-x"))
            .args(extra);
        c
    };
    fails_with(&mut ft(&bad, &["--seq-len", "32"]), "bad.jsonl:2: no assistant turn");
    fails_with(
        &mut ft(&data, &["--seq-len", "100000"]),
        "longer than the model's context",
    );
    fails_with(
        &mut ft(&data, &["--seq-len", "32", "--targets", "q_proj,wrong"]),
        "unknown LoRA target",
    );
    fails_with(&mut ft(&tmp("ft-none").join("missing.txt"), &[]), "missing.txt");
}
