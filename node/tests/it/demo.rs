//! The demo's claim that its fine-tune visibly changes the model: the demo's own fine-tune
//! (`bitnode::demo::FINETUNE_ARGS` on its bundled pairs, the built-in tiny model) makes the greedy answer to
//! a training question the trained answer, word for word, where the base model answers with noise. The
//! demo delegates that fine-tune to its desktop and checks the same thing; here it runs with `bitnode
//! finetune` on the CPU reference trainer (deterministic, and what the desktop runs without a GPU), so the
//! claim is tested without three daemons and a second fine-tune.
use crate::harness::*;
use serde_json::Value;

fn ask(h: &std::path::Path, model: &str, adapter: Option<&str>, question: &str) -> String {
    let mut args = vec!["infer", "--model", model, "--prompt", question, "--max-tokens", "96"];
    if let Some(a) = adapter {
        args.extend(["--adapter", a]);
    }
    args.extend(["--device", "cpu", "--json"]);
    let out = cli_ok(h, &args);
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    v["text"].as_str().unwrap().to_string()
}

#[test]
fn the_demos_fine_tune_makes_the_model_give_the_trained_answer() {
    let h = home("demo-ft");
    // The demo's model: the built-in tiny preset, seed 0, packed.
    let model = h.join("tiny");
    let m = model.to_str().unwrap();
    cli_ok(&h, &["model", "synth", "--preset", "tiny", "--out", m]);
    let data = h.join("pairs.jsonl");
    std::fs::write(&data, bitnode::demo::DATASET).unwrap();
    let (question, trained) = bitnode::demo::trained_pair().unwrap();
    let before = ask(&h, m, None, &question);
    assert_ne!(before, trained, "the random model already knew the answer");

    let adapter = h.join("adapter");
    let mut args = vec![
        "finetune",
        "--model",
        m,
        "--data",
        data.to_str().unwrap(),
        "--out",
        adapter.to_str().unwrap(),
    ];
    args.extend(bitnode::demo::FINETUNE_ARGS);
    args.extend(["--device", "cpu", "--json"]);
    let out = cli_ok(&h, &args);
    let sum: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let after = ask(&h, m, Some(adapter.to_str().unwrap()), &question);
    assert_eq!(
        after, trained,
        "the fine-tuned model did not reproduce the trained answer (loss {} -> {})",
        sum["first_loss"], sum["last_loss"]
    );
    let _ = std::fs::remove_dir_all(&h);
}
