//! LoRA training on the CPU reference against PEFT + torch AdamW (tests/fixtures/lora, written by
//! tests/reference/make_lora_fixtures.py): first-step gradients of every LoRA tensor, per-step losses and
//! learning rates, and the final adapter; plus PEFT-format save/load round trips and bad adapters.
use bitnode_engine::cpu::AdamW;
use bitnode_engine::lora::{Adapter, LoraPair, TARGETS};
use bitnode_engine::model::Model;
use bitnode_engine::train::{lr_factor, CpuTrainer, Optimizer, Schedule};
use bitnode_tests::{fixtures, tempdir};
use serde_json::Value;

type Batch = Vec<(Vec<u32>, Vec<i32>)>;

fn micro_batches(e: &Value) -> Vec<Batch> {
    e["micro_batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|mb| {
            let ids = mb["ids"].as_array().unwrap();
            let labels = mb["labels"].as_array().unwrap();
            ids.iter()
                .zip(labels)
                .map(|(i, l)| {
                    (
                        i.as_array()
                            .unwrap()
                            .iter()
                            .map(|x| x.as_u64().unwrap() as u32)
                            .collect(),
                        l.as_array()
                            .unwrap()
                            .iter()
                            .map(|x| x.as_i64().unwrap() as i32)
                            .collect(),
                    )
                })
                .collect()
        })
        .collect()
}

/// Largest relative Frobenius error over the LoRA tensors, with its name.
fn worst(a: &Adapter, b: &[Vec<Option<LoraPair>>]) -> (f64, String) {
    let mut out = (0.0, String::new());
    for (l, (ra, rb)) in a.layers.iter().zip(b).enumerate() {
        for (t, (pa, pb)) in ra.iter().zip(rb).enumerate() {
            let (Some(pa), Some(pb)) = (pa, pb) else {
                assert_eq!(pa.is_some(), pb.is_some(), "layer {l} {}", TARGETS[t]);
                continue;
            };
            for (name, x, y) in [("A", &pa.a, &pb.a), ("B", &pa.b, &pb.b)] {
                let num: f64 = x
                    .iter()
                    .zip(y.iter())
                    .map(|(p, q)| ((p - q) as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let den: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum::<f64>().sqrt().max(1e-20);
                if num / den > out.0 {
                    out = (num / den, format!("layer {l} {} lora_{name}", TARGETS[t]));
                }
            }
        }
    }
    out
}

#[test]
fn cpu_lora_training_matches_peft_and_torch_adamw() {
    train_matches_peft("lora");
}

/// The same check on the gated SiLU FFN (the 1bitLLM family): PEFT's run on `online_tied_silu`
/// (online_tied's weights under `hidden_act: silu`).
#[test]
fn cpu_lora_training_of_a_silu_model_matches_peft() {
    train_matches_peft("lora_silu");
}

/// Trains from the fixture's initial adapter on its micro-batches and compares every step with PEFT + torch
/// AdamW: the first step's gradients, each step's loss, learning rate and gradient norm, the final adapter.
fn train_matches_peft(fixture: &str) {
    let dir = fixtures().join(fixture);
    let e: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let model = Model::load(&fixtures().join(e["base"].as_str().unwrap())).unwrap();
    let mut adapter = Adapter::load(&dir.join("init_adapter"), &model.config).unwrap();
    assert_eq!(adapter.rank, e["rank"].as_u64().unwrap() as usize);
    assert_eq!(adapter.targets().len(), 7);
    let trainer = CpuTrainer::new(&model);
    let mbs = micro_batches(&e);
    let accum = e["grad_accum"].as_u64().unwrap() as usize;
    let steps = e["steps"].as_u64().unwrap() as usize;
    let warmup = e["warmup"].as_u64().unwrap() as usize;
    let base_lr = e["lr"].as_f64().unwrap();
    let betas = e["betas"].as_array().unwrap();
    let mut opt = Optimizer::new(
        &adapter,
        AdamW {
            lr: base_lr,
            beta1: betas[0].as_f64().unwrap(),
            beta2: betas[1].as_f64().unwrap(),
            eps: e["eps"].as_f64().unwrap(),
            weight_decay: e["weight_decay"].as_f64().unwrap(),
        },
        Some(e["max_grad_norm"].as_f64().unwrap() as f32),
    );
    let grads1 = Adapter::read_tensors(&dir.join("grads_step1.safetensors"), &model.config, adapter.rank).unwrap();
    let mut worst_loss = 0f64;
    for step in 0..steps {
        let mut grad = adapter.zeros_like();
        let mut loss = 0.0;
        for a in 0..accum {
            loss += trainer
                .micro_batch(&mbs[step * accum + a], &adapter, &mut grad, accum, None)
                .unwrap()
                / accum as f64;
        }
        if step == 0 {
            let (err, at) = worst(&grad, &grads1);
            assert!(err < 1e-3, "first-step gradient differs from PEFT by {err:.2e} at {at}");
            eprintln!("{fixture}: first-step gradients: worst relative error {err:.2e} ({at})");
        }
        let want_loss = e["losses"][step].as_f64().unwrap();
        worst_loss = worst_loss.max((loss - want_loss).abs());
        assert!(
            (loss - want_loss).abs() < 2e-3,
            "step {step}: loss {loss} vs PEFT {want_loss}"
        );
        let lr = base_lr * lr_factor(Schedule::Cosine, step, warmup, steps);
        let want_lr = e["lrs"][step].as_f64().unwrap();
        assert!((lr - want_lr).abs() < 1e-12, "step {step}: lr {lr} vs {want_lr}");
        let norm = opt.apply(&mut adapter, &mut grad, lr);
        let want_norm = e["grad_norms"][step].as_f64().unwrap();
        assert!(
            ((norm as f64) - want_norm).abs() < 1e-3 * want_norm,
            "step {step}: grad norm {norm} vs {want_norm}"
        );
    }
    eprintln!("per-step losses: worst difference from PEFT {worst_loss:.2e}");
    let fin = Adapter::read_tensors(
        &dir.join("final_adapter").join("adapter_model.safetensors"),
        &model.config,
        adapter.rank,
    )
    .unwrap();
    let (err, at) = worst(&adapter, &fin);
    eprintln!("final adapter: worst relative error {err:.2e} ({at})");
    assert!(err < 0.02, "final adapter differs from PEFT by {err:.2e} at {at}");
}

#[test]
fn adapters_round_trip_in_peft_format_and_bad_ones_are_refused() {
    let dir = fixtures().join("lora");
    let model = Model::load(&fixtures().join("online_tied")).unwrap();
    let a = Adapter::load(&dir.join("final_adapter"), &model.config).unwrap();
    let out = tempdir("lora-save");
    a.save(&out, "online_tied").unwrap();
    assert_eq!(Adapter::load(&out, &model.config).unwrap(), a);
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    // A fresh adapter: PEFT's init (B zero, A within the kaiming-uniform bound), only the asked targets.
    let fresh = Adapter::init(&model.config, 8, 16.0, &["q_proj", "down_proj"], 3).unwrap();
    assert_eq!(fresh.targets(), vec!["q_proj", "down_proj"]);
    for p in fresh.pairs() {
        assert!(p.b.iter().all(|v| *v == 0.0));
        let bound = 1.0 / (p.inp as f32).sqrt();
        assert!(p.a.iter().all(|v| v.abs() <= bound) && p.a.iter().any(|v| v.abs() > bound / 2.0));
    }
    assert!(Adapter::init(&model.config, 8, 16.0, &["qproj"], 3).is_err());
    // Wrong model (other shapes), missing files, a non-LoRA config.
    let other = Model::load(&fixtures().join("online_untied")).unwrap();
    if other.config.hidden_size != model.config.hidden_size {
        assert!(Adapter::load(&dir.join("final_adapter"), &other.config).is_err());
    }
    assert!(Adapter::load(&tempdir("lora-empty"), &model.config).is_err());
    let bad = tempdir("lora-bad");
    std::fs::copy(
        out.join("adapter_model.safetensors"),
        bad.join("adapter_model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        bad.join("adapter_config.json"),
        r#"{"peft_type": "PREFIX_TUNING", "r": 4}"#,
    )
    .unwrap();
    let err = Adapter::load(&bad, &model.config).unwrap_err().to_string();
    assert!(err.contains("only LoRA"), "{err}");
    std::fs::write(bad.join("adapter_config.json"), r#"{"peft_type": "LORA", "r": 5}"#).unwrap();
    let err = Adapter::load(&bad, &model.config).unwrap_err().to_string();
    assert!(err.contains("shape"), "{err}");
}

/// An adapter applied at inference gives the NLL PEFT computes for it (`PeftModel.from_pretrained`, eval).
#[test]
fn scoring_with_the_peft_adapter_matches_peft() {
    use bitnode_engine::session::{Engine, EngineOptions};
    let dir = fixtures().join("lora");
    let e: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ids: Vec<u32> = e["held_out_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let model_dir = fixtures().join(e["base"].as_str().unwrap());
    let opts = EngineOptions {
        adapter: Some("cpu".into()),
        lora: Some(dir.join("final_adapter")),
        ..Default::default()
    };
    let mut eng = Engine::load(&model_dir, &opts).unwrap();
    let (n, total) = eng.score_ids(&ids).unwrap();
    let nll = total / n as f64;
    let want = e["held_out_nll_final"].as_f64().unwrap();
    assert!((nll - want).abs() < 1e-4, "bitnode {nll} vs PEFT {want}");
    // Without the adapter the number differs: the adapter is really applied.
    let mut base = Engine::load(
        &model_dir,
        &EngineOptions {
            adapter: Some("cpu".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let (n0, t0) = base.score_ids(&ids).unwrap();
    assert!((t0 / n0 as f64 - want).abs() > 1e-3);
    // The same adapter on the GPU backend (lavapipe here): the LoRA branch in WGSL, scoring and decoding.
    let gpu = EngineOptions {
        adapter: Some("gpu".into()),
        lora: Some(dir.join("final_adapter")),
        embed_dtype: bitnode_engine::EmbedDtype::F32,
        ..Default::default()
    };
    let mut geng = Engine::load(&model_dir, &gpu).unwrap();
    assert_ne!(geng.backend.device_name(), eng.backend.device_name());
    let (gn, gt) = geng.score_ids(&ids).unwrap();
    assert_eq!(gn, n);
    assert!(
        (gt / gn as f64 - want).abs() < 1e-4,
        "GPU with adapter {} vs PEFT {want}",
        gt / gn as f64
    );
    let greedy = bitnode_engine::cpu::SampleParams::default();
    let prompt = &ids[..8];
    let c = eng
        .generate_ids(prompt, 12, &greedy, 0, false, &mut |_| true)
        .unwrap()
        .tokens;
    let g = geng
        .generate_ids(prompt, 12, &greedy, 0, false, &mut |_| true)
        .unwrap()
        .tokens;
    assert_eq!(c, g, "greedy tokens with the adapter, CPU vs GPU");
}

/// LoRA dropout: the masked branch's gradient matches finite differences (on the last layer's down_proj,
/// where no activation quantizer sits downstream to make differences jump), masks are reproducible from
/// their seed, and p = 0 is exactly no dropout.
#[test]
fn lora_dropout_gradients_are_exact_and_reproducible() {
    let dir = fixtures().join("lora");
    let model = Model::load(&fixtures().join("online_tied")).unwrap();
    let mut adapter = Adapter::load(&dir.join("init_adapter"), &model.config).unwrap();
    let trainer = CpuTrainer::new(&model);
    let e: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let (ids, labels) = micro_batches(&e)[0][0].clone();
    let grad_of = |a: &Adapter, seed: Option<u64>| {
        let mut g = a.zeros_like();
        let loss = trainer.sequence(&ids, &labels, a, &mut g, 1.0, seed).unwrap();
        (loss, g)
    };
    let (l0, g0) = grad_of(&adapter, Some(7));
    let (l_none, g_none) = grad_of(&adapter, None);
    assert_eq!((l0, &g0), (l_none, &g_none), "dropout 0 is no dropout");
    adapter.dropout = 0.3;
    let (la, ga) = grad_of(&adapter, Some(7));
    let (lb, gb) = grad_of(&adapter, Some(7));
    assert_eq!((la, &ga), (lb, &gb), "same seed, same masks");
    let (lc, _) = grad_of(&adapter, Some(8));
    assert_ne!(la, lc, "another seed draws other masks");
    assert_ne!(la, l0, "the masks change the function");
    let last = model.config.num_layers - 1;
    let down = 6;
    for which in ['A', 'B'] {
        for idx in [0usize, 5, 17] {
            let bump = |d: f32| {
                let mut a = adapter.clone();
                let p = a.layers[last][down].as_mut().unwrap();
                let v = if which == 'A' { &mut p.a } else { &mut p.b };
                v[idx] += d;
                grad_of(&a, Some(7)).0
            };
            let h = 1e-2;
            let num = (bump(h) - bump(-h)) / (2.0 * h as f64);
            let p = ga.layers[last][down].as_ref().unwrap();
            let ana = if which == 'A' { p.a[idx] } else { p.b[idx] } as f64;
            assert!(
                (ana - num).abs() <= 2e-2 * num.abs().max(1e-2),
                "lora_{which}[{idx}]: analytic {ana} vs numeric {num}"
            );
        }
    }
}

/// The GPU trainer (every forward and backward op in WGSL) against the CPU reference trainer, which the
/// test above ties to PEFT: the loss and every LoRA gradient of a sequence with masked prompt labels.
#[test]
fn gpu_trainer_gradients_match_the_cpu_trainer() {
    gpu_grads_match_cpu("lora");
    // The gated SiLU FFN: silu_mul and silu_mul_backward in the GPU trainer.
    gpu_grads_match_cpu("lora_silu");
}

fn gpu_grads_match_cpu(fixture: &str) {
    use bitnode_engine::gpu::train::GpuTrainer;
    let dir = fixtures().join(fixture);
    let e: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let model = std::sync::Arc::new(Model::load(&fixtures().join(e["base"].as_str().unwrap())).unwrap());
    let adapter = Adapter::load(&dir.join("init_adapter"), &model.config).unwrap();
    let mbs = micro_batches(&e);
    let cpu_trainer = CpuTrainer::new(&model);
    let plan = bitnode_engine::gpu::train::plan(&model, &adapter, 64, 1, None).unwrap();
    assert!(
        !plan.checkpoint && !plan.embed_f16,
        "no budget: the fastest, exact settings"
    );
    let gpu_trainer = GpuTrainer::new(model.clone(), bitnode_tests::gpu(None), &adapter, plan).unwrap();
    let mut want = adapter.zeros_like();
    let (mut lc, mut lg) = (0.0, 0.0);
    // Two sequences, the second with masked prompt labels: gradients accumulate across them on both sides.
    for (ids, labels) in [mbs[0][0].clone(), mbs[1][1].clone()] {
        lc += cpu_trainer
            .sequence(&ids, &labels, &adapter, &mut want, 0.25, None)
            .unwrap();
        lg += gpu_trainer.sequence(&ids, &labels, 0.25).unwrap();
    }
    assert!((lc - lg).abs() < 1e-4 * lc.abs(), "loss: cpu {lc} vs gpu {lg}");
    let got = gpu_trainer.grads(&adapter).unwrap();
    let (err, at) = worst(&got, &want.layers);
    eprintln!("gpu trainer: worst relative gradient error {err:.2e} ({at})");
    assert!(
        err < 1e-3,
        "GPU gradients differ from the CPU trainer by {err:.2e} at {at}"
    );
}

/// A micro-batch of several sequences in one pass (every kernel over `n x bucket` rows, RoPE and attention
/// kept inside each sequence) gives the loss and the gradients of the same sequences run one by one, and
/// the planner sizes it: the whole batch in one pass without a budget, a smaller micro-batch under one,
/// and the device memory it predicts covers what the trainer allocates.
#[test]
fn gpu_trainer_micro_batch_equals_the_sequences_one_by_one() {
    use bitnode_engine::gpu::train::{estimate, plan, Embedding, GpuTrainer};
    let dir = fixtures().join("lora");
    let model = std::sync::Arc::new(Model::load(&fixtures().join("online_tied")).unwrap());
    let adapter = Adapter::load(&dir.join("init_adapter"), &model.config).unwrap();
    let mut rng = bitnode_engine::rng::Rng::new(9);
    let v = model.config.vocab_size as u64;
    // Different lengths in one bucket (64): the shorter ones are padded inside the batch.
    let seqs: Vec<(Vec<u32>, Vec<i32>)> = [45usize, 64, 20]
        .iter()
        .map(|&n| {
            let ids: Vec<u32> = (0..n).map(|_| (rng.next_u64() % v) as u32).collect();
            let mut labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
            labels[..5].fill(-100);
            (ids, labels)
        })
        .collect();
    let batched = plan(&model, &adapter, 64, 3, None).unwrap();
    assert_eq!((batched.micro_batch, batched.t, batched.checkpoint), (3, 64, false));
    let predicted = batched.total;
    let tr = GpuTrainer::new(model.clone(), bitnode_tests::gpu(None), &adapter, batched).unwrap();
    let refs: Vec<(&[u32], &[i32])> = seqs.iter().map(|(i, l)| (&i[..], &l[..])).collect();
    let lb = tr.sequences(&refs, 0.25).unwrap();
    let peak = tr.peak_bytes();
    assert!(
        predicted >= peak && predicted <= peak + peak / 20 + (64 << 10),
        "planner predicted {predicted} bytes for 3 x 64 rows, the trainer allocated {peak}"
    );
    let gb = tr.grads(&adapter).unwrap();
    let e = tr
        .sequences(&[refs[0], refs[1], refs[2], refs[0]], 0.25)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1..=3 sequences"), "{e}");

    let one = plan(&model, &adapter, 64, 1, None).unwrap();
    let tr1 = GpuTrainer::new(model.clone(), bitnode_tests::gpu(None), &adapter, one).unwrap();
    let mut l1 = 0.0;
    for (ids, labels) in &seqs {
        l1 += tr1.sequence(ids, labels, 0.25).unwrap();
    }
    let g1 = tr1.grads(&adapter).unwrap();
    assert!(
        (lb - l1).abs() < 1e-5 * l1.abs(),
        "loss: batched {lb} vs one by one {l1}"
    );
    let (err, at) = worst(&gb, &g1.layers);
    eprintln!("micro-batch of 3: worst relative gradient error {err:.2e} ({at})");
    assert!(err < 1e-3, "batched gradients differ by {err:.2e} at {at}");
    // The eval loss batches too.
    let le = tr.losses(&refs).unwrap();
    assert!((le - l1).abs() < 1e-5 * l1.abs(), "eval loss {le} vs {l1}");

    // Under a budget that holds two sequences per pass but not three, the planner halves the micro-batch
    // (down from 4) before it gives up the f32 embedding.
    let two = estimate(&model, &adapter, 64, 2, true, 16, Embedding::F32);
    let p = plan(&model, &adapter, 64, 4, Some(two.total)).unwrap();
    assert_eq!((p.micro_batch, p.embed_f16), (2, false), "{p:?}");
    let p = plan(&model, &adapter, 64, 4, None).unwrap();
    assert_eq!(p.micro_batch, 4, "{p:?}");
}

/// `finetune` on the GPU trainer (lavapipe here) follows the CPU reference trainer step by step: the same
/// losses and gradient norms, and the same final adapter; a GPU run resumed from its checkpoint ends where
/// the uninterrupted one does.
#[test]
fn gpu_finetune_follows_the_cpu_trainer_and_resumes() {
    use bitnode_engine::finetune::{finetune, FinetuneConfig, StepLog};
    let text = "The river runs past the old mill at the edge of the town. In the morning the water is cold and \
                clear, and the children walk along the bank on their way to school. They count the boats. "
        .repeat(4);
    let data = tempdir("gpu-ft-data").join("river.txt");
    std::fs::write(&data, text).unwrap();
    let cfg = |device: &str, out: &str, save_every: Option<usize>, resume: Option<std::path::PathBuf>| FinetuneConfig {
        activation: None,
        model: fixtures().join("online_tied"),
        data: data.clone(),
        out: tempdir(out),
        init_adapter: None,
        rank: 4,
        alpha: 8.0,
        lora_dropout: None,
        targets: bitnode_engine::lora::TARGETS.iter().map(|s| s.to_string()).collect(),
        lr: 1e-2,
        steps: Some(6),
        epochs: None,
        batch: 2,
        seq_len: 24,
        grad_accum: 2,
        weight_decay: 0.01,
        warmup: 1,
        schedule: Schedule::Cosine,
        max_grad_norm: Some(1.0),
        shuffle: true,
        seed: 3,
        val_split: 0.0,
        save_every,
        resume,
        device: device.into(),
        max_memory: None,
    };
    let run = |c: &FinetuneConfig| {
        let mut logs: Vec<StepLog> = vec![];
        let sum = finetune(c, &mut |l, _| logs.push(l.clone())).unwrap();
        let model = Model::load(&c.model).unwrap();
        (logs, Adapter::load(&sum.adapter, &model.config).unwrap(), sum.device)
    };
    let (cpu_logs, cpu_adapter, cpu_dev) = run(&cfg("cpu", "ft-cpu", None, None));
    let gpu_cfg = cfg("gpu", "ft-gpu", Some(3), None);
    let (gpu_logs, gpu_adapter, gpu_dev) = run(&gpu_cfg);
    assert_eq!(cpu_dev, "cpu reference");
    assert_ne!(gpu_dev, "cpu reference");
    // The first steps agree to float rounding, up to a few int8 quantizer flips: last-bit differences
    // between the devices' arithmetic (Vulkan's sqrt and division are not IEEE-exact: lavapipe and NVIDIA
    // both differ) can move an activation across a rounding boundary of the ternary projections'
    // quantizer, a discrete step of about 1e-4 nats per flip (on lavapipe the first steps agree to 1e-6;
    // on an H100, 8.6e-6 at step 1). Later steps compound them; the bounds are within PEFT parity's (loss
    // 2e-3, 2% on the final adapter), not bit-equality.
    for (c, g) in cpu_logs.iter().zip(&gpu_logs) {
        let tol = if c.step <= 3 { 5e-5 } else { 1e-3 };
        assert!(
            (c.loss - g.loss).abs() < tol * c.loss,
            "step {}: loss cpu {} gpu {}",
            c.step,
            c.loss,
            g.loss
        );
        assert!(
            // Gradient norms move more than losses under a flip (2% at step 5 on an H100 at this lr).
            (c.grad_norm - g.grad_norm).abs() < if c.step <= 3 { 1e-3 } else { 5e-2 } * c.grad_norm,
            "step {}: grad norm cpu {} gpu {}",
            c.step,
            c.grad_norm,
            g.grad_norm
        );
    }
    let (err, at) = worst(&gpu_adapter, &cpu_adapter.layers);
    assert!(err < 0.02, "final adapters differ by {err:.2e} at {at}");
    let (_, resumed, _) = run(&cfg(
        "gpu",
        "ft-gpu-resumed",
        None,
        Some(gpu_cfg.out.join("checkpoint-3")),
    ));
    let (err, at) = worst(&resumed, &gpu_adapter.layers);
    assert!(err < 1e-6, "resumed GPU run differs by {err:.2e} at {at}");
}

/// An adapter written by `bitnode finetune` loads in PEFT (`make_lora_fixtures.py --check-bitnode-adapter`)
/// and gives there the NLL bitnode computes with it.
#[test]
fn a_bitnode_adapter_gives_the_same_nll_in_peft() {
    use bitnode_engine::session::{Engine, EngineOptions};
    let dir = fixtures().join("lora");
    let e: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let peft: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bitnode_adapter_peft.json")).unwrap()).unwrap();
    let ids: Vec<u32> = e["held_out_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let opts = EngineOptions {
        adapter: Some("cpu".into()),
        lora: Some(dir.join("bitnode_adapter")),
        ..Default::default()
    };
    let mut eng = Engine::load(&fixtures().join("online_tied"), &opts).unwrap();
    let (n, total) = eng.score_ids(&ids).unwrap();
    let want = peft["held_out_nll"].as_f64().unwrap();
    // Measured: 5.5e-4 apart (the PEFT-trained adapter above agrees to 1e-4). The likely cause, not yet
    // pinned down: an activation at an int8 rounding boundary of the quantizer, which float rounding sends
    // to different levels in the two implementations. The bound is the PEFT training parity's loss
    // tolerance (2e-3).
    assert!(
        (total / n as f64 - want).abs() < 2e-3,
        "bitnode {} vs PEFT {want}",
        total / n as f64
    );
}

/// The memory planner: its prediction matches what the trainer allocates; a budget that only gradient
/// checkpointing with chunked head fits selects exactly that, and those settings give the same gradients as
/// keeping every activation; an impossible budget is refused before anything is allocated, with the numbers.
#[test]
fn memory_planner_checkpointing_and_impossible_budgets() {
    use bitnode_engine::gpu::train::{estimate, plan, Embedding, GpuTrainer};
    let dir = fixtures().join("lora");
    let model = std::sync::Arc::new(Model::load(&fixtures().join("online_tied")).unwrap());
    let adapter = Adapter::load(&dir.join("init_adapter"), &model.config).unwrap();
    let mut rng = bitnode_engine::rng::Rng::new(5);
    let v = model.config.vocab_size as u64;
    let seqs: Vec<(Vec<u32>, Vec<i32>)> = [60usize, 45]
        .iter()
        .map(|&n| {
            let ids: Vec<u32> = (0..n).map(|_| (rng.next_u64() % v) as u32).collect();
            let mut labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
            labels[..10].fill(-100);
            (ids, labels)
        })
        .collect();
    let full = plan(&model, &adapter, 60, 1, None).unwrap();
    assert_eq!(model.config.max_position_embeddings, 64, "the fixture's context");
    assert_eq!((full.t, full.checkpoint, full.head_chunk), (64, false, 64));
    let lean = estimate(&model, &adapter, 60, 1, true, 16, Embedding::F32);
    assert!(lean.total < full.total);
    let chosen = plan(&model, &adapter, 60, 1, Some(lean.total)).unwrap();
    assert!(
        chosen.checkpoint && chosen.head_chunk == 16 && !chosen.embed_f16,
        "{chosen:?}"
    );

    let train = |p: bitnode_engine::gpu::train::MemoryPlan| {
        let gpu = bitnode_tests::gpu(None);
        let predicted = p.total;
        let tr = GpuTrainer::new(model.clone(), gpu, &adapter, p).unwrap();
        let mut loss = 0.0;
        for (ids, labels) in &seqs {
            loss += tr.sequence(ids, labels, 0.5).unwrap();
        }
        let peak = tr.peak_bytes();
        eprintln!("predicted {predicted} bytes, allocated {peak}");
        assert!(
            predicted >= peak && predicted <= peak + peak / 20 + (64 << 10),
            "planner predicted {predicted} bytes, the trainer allocated {peak}"
        );
        (loss, tr.grads(&adapter).unwrap())
    };
    let (l_full, g_full) = train(full);
    let (l_lean, g_lean) = train(chosen);
    assert!(
        (l_full - l_lean).abs() < 1e-6 * l_full.abs(),
        "loss {l_full} vs {l_lean}"
    );
    let (err, at) = worst(&g_lean, &g_full.layers);
    assert!(err < 1e-6, "checkpointed gradients differ by {err:.2e} at {at}");

    // The embedding kept on the host (what the planner falls back to when even an f16 copy does not fit
    // a large vocabulary; this fixture's 400 rows fit one tile, so it is asked for here): its rows are
    // gathered there and the head streams through the device in tiles, 13 of 32 rows here to cross tile
    // edges. The fixture's embedding is bf16, so the f16 tiles are exact and the gradients match the f32
    // plan.
    let mut host = estimate(&model, &adapter, 60, 1, true, 16, Embedding::Host);
    assert!(
        host.embed_host && host.embed_f16 && host.host_tile_rows == 400,
        "{host:?}"
    );
    host.host_tile_rows = 32;
    let gpu = bitnode_tests::gpu(None);
    let tr = GpuTrainer::new(model.clone(), gpu, &adapter, host).unwrap();
    let mut l_host = 0.0;
    for (ids, labels) in &seqs {
        l_host += tr.sequence(ids, labels, 0.5).unwrap();
    }
    assert!(
        (l_full - l_host).abs() < 1e-5 * l_full.abs(),
        "loss {l_full} vs {l_host} (host embedding)"
    );
    let (err, at) = worst(&tr.grads(&adapter).unwrap(), &g_full.layers);
    eprintln!("host-resident embedding: worst relative gradient error {err:.2e} ({at})");
    assert!(err < 1e-5, "host-embedding gradients differ by {err:.2e} at {at}");
    let le = tr.loss(&seqs[0].0, &seqs[0].1).unwrap();
    assert!(le.is_finite() && le > 0.0);

    let e = plan(&model, &adapter, 60, 1, Some(100_000)).unwrap_err().to_string();
    assert!(
        e.contains("out of device memory") && e.contains("needs at least") && e.contains("--max-memory"),
        "{e}"
    );
}
