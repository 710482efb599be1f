//! A LoRA fine-tuning run: data, adapter, optimizer, schedule, checkpoints and resume, driving the CPU
//! reference trainer. `bitnode finetune` and the daemon's jobs for other devices both run it through
//! `bitnode::exec`, which calls [`finetune_with`] to hear of each checkpoint as soon as it is complete.
//!
//! Determinism: the data order of epoch `e` is `data::shuffled(n, seed + e)` (or file order with
//! `shuffle = false`) and step `k` takes the micro-batches `k*G .. (k+1)*G`, each of `B` consecutive
//! examples of that order, so the data cursor is the step number alone. A checkpoint therefore holds the
//! adapter, both AdamW moments and the step; resuming from it ends at the same adapter as an uninterrupted
//! run (checked by a test).
use crate::cpu::AdamW;
use crate::data::{self, DataSpec, Example};
use crate::error::{EngineError, Result};
use crate::lora::Adapter;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::train::{lr_factor, CpuTrainer, Optimizer, Schedule};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct FinetuneConfig {
    pub model: PathBuf,
    /// Overrides the FFN activation the model's files imply (`--activation`).
    pub activation: Option<crate::config::Activation>,
    pub data: PathBuf,
    pub out: PathBuf,
    pub init_adapter: Option<PathBuf>,
    pub rank: usize,
    pub alpha: f32,
    /// PEFT's `lora_dropout` for a fresh adapter (an `--init-adapter` keeps its own unless this is set).
    pub lora_dropout: Option<f32>,
    pub targets: Vec<String>,
    pub lr: f64,
    pub steps: Option<usize>,
    pub epochs: Option<f64>,
    pub batch: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub weight_decay: f64,
    pub warmup: usize,
    pub schedule: Schedule,
    pub max_grad_norm: Option<f32>,
    pub shuffle: bool,
    pub seed: u64,
    pub val_split: f64,
    pub save_every: Option<usize>,
    pub resume: Option<PathBuf>,
    /// Where to train, as `--device`: "auto" (a hardware GPU, else the CPU reference; software Vulkan is
    /// skipped), "gpu" (any wgpu adapter, lavapipe included), "cpu", an index or part of a name.
    pub device: String,
    /// Device-memory budget of the GPU trainer in bytes (`--max-memory`); `None`: the GPU's own memory
    /// where the platform reports it, else no limit. The CPU reference trainer ignores it.
    pub max_memory: Option<u64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    /// Tokens the loss was taken on in this step.
    pub tokens: usize,
    pub tokens_per_second: f64,
    pub elapsed_s: f64,
    pub grad_norm: f32,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub steps: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub val_loss_before: Option<f64>,
    pub val_loss_after: Option<f64>,
    pub train_examples: usize,
    pub val_examples: usize,
    pub adapter: PathBuf,
    /// "cpu reference" or the wgpu adapter's name.
    pub device: String,
    /// The GPU trainer's memory plan (predicted bytes and the settings chosen), and the bytes it allocated.
    pub memory: Option<crate::gpu::train::MemoryPlan>,
    pub device_peak_bytes: Option<u64>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct TrainerState {
    step: usize,
    total_steps: usize,
    seed: u64,
    examples: usize,
}

/// The examples of micro-batch `i` (global index over the run).
fn micro_batch(
    order: &dyn Fn(usize) -> Vec<usize>,
    examples: &[Example],
    i: usize,
    b: usize,
) -> Vec<(Vec<u32>, Vec<i32>)> {
    let n = examples.len();
    (0..b)
        .map(|k| {
            let j = i * b + k;
            let ex = &examples[order(j / n)[j % n]];
            (ex.ids.clone(), ex.labels.clone())
        })
        .collect()
}

fn mean_loss(trainer: &CpuTrainer<'_>, adapter: &Adapter, examples: &[Example]) -> Result<Option<f64>> {
    if examples.is_empty() {
        return Ok(None);
    }
    let mut scratch = adapter.zeros_like();
    let (mut total, mut n) = (0.0, 0usize);
    for ex in examples {
        let k = ex.predicted();
        if k == 0 {
            continue;
        }
        total += trainer.sequence(&ex.ids, &ex.labels, adapter, &mut scratch, 0.0, None)?;
        n += k;
    }
    Ok((n > 0).then(|| total / n as f64))
}

/// The GPU trainer for micro-batches of `batch` sequences of up to `longest` tokens. The memory plan is
/// made before the device is touched, so an impossible budget fails here with the numbers; the budget
/// defaults to the GPU's memory where the platform reports it. The plan decides how many of a
/// micro-batch's sequences run in one pass (`MemoryPlan::micro_batch`).
fn gpu_trainer(
    a: wgpu::Adapter,
    model: &std::sync::Arc<Model>,
    adapter: &Adapter,
    longest: usize,
    batch: usize,
    max_memory: Option<u64>,
) -> Result<crate::gpu::train::GpuTrainer> {
    let budget = max_memory.or_else(|| crate::probe::device_memory(a.get_info().vendor));
    let plan = crate::gpu::train::plan(model, adapter, longest, batch, budget)?;
    let gpu = std::sync::Arc::new(crate::gpu::Gpu::new(a, None)?);
    crate::gpu::train::GpuTrainer::new(model.clone(), gpu, adapter, plan)
}

/// The wgpu adapter `--device` names, or None for the CPU reference trainer.
fn gpu_adapter(device: &str) -> Result<Option<wgpu::Adapter>> {
    if device.eq_ignore_ascii_case("cpu") || device.eq_ignore_ascii_case("cpu-reference") {
        return Ok(None);
    }
    match crate::gpu::pick_adapter(device)? {
        Some(a) => Ok(Some(a)),
        None if device.is_empty() || device.eq_ignore_ascii_case("auto") => Ok(None),
        None => Err(EngineError::NoAdapter(format!(
            "no adapter matches {device:?}; see `bitnode devices`"
        ))),
    }
}

/// Validation loss on the GPU trainer (weight 0: the backward adds nothing to the gradients).
fn mean_loss_gpu(gt: &crate::gpu::train::GpuTrainer, examples: &[Example]) -> Result<Option<f64>> {
    let scored: Vec<(&[u32], &[i32])> = examples
        .iter()
        .filter(|ex| ex.predicted() > 0)
        .map(|ex| (&ex.ids[..], &ex.labels[..]))
        .collect();
    let n: usize = examples.iter().map(|ex| ex.predicted()).sum();
    let mut total = 0.0;
    for group in scored.chunks(gt.plan().micro_batch) {
        total += gt.losses(group)?;
    }
    Ok((n > 0).then(|| total / n as f64))
}

/// Forward and backward of a micro-batch on the GPU trainer, in passes of the plan's micro-batch size.
/// Returns the summed NLL of the predicted positions.
fn gpu_micro_batch(gt: &crate::gpu::train::GpuTrainer, mb: &[(Vec<u32>, Vec<i32>)], weight: f32) -> Result<f64> {
    let seqs: Vec<(&[u32], &[i32])> = mb.iter().map(|(i, l)| (&i[..], &l[..])).collect();
    let mut sum = 0.0;
    for group in seqs.chunks(gt.plan().micro_batch) {
        sum += gt.sequences(group, weight)?;
    }
    Ok(sum)
}

fn save_moments(path: &Path, m: &Adapter, v: &Adapter) -> Result<()> {
    // Moments reuse the adapter layout: two adapter files side by side.
    m.save(&path.join("exp_avg"), "optimizer")?;
    v.save(&path.join("exp_avg_sq"), "optimizer")
}

fn load_moments(path: &Path, model: &Model, like: &Adapter) -> Result<(Adapter, Adapter)> {
    let load = |d: &str| -> Result<Adapter> {
        let layers = Adapter::read_tensors(
            &path.join(d).join("adapter_model.safetensors"),
            &model.config,
            like.rank,
        )?;
        let mut a = like.zeros_like();
        for (dst, src) in a.layers.iter_mut().flatten().zip(layers.into_iter().flatten()) {
            match (dst, src) {
                (Some(d), Some(s)) => *d = s,
                (None, None) => {}
                _ => {
                    return Err(EngineError::Invalid(
                        "checkpoint moments do not match the adapter's targets".into(),
                    ))
                }
            }
        }
        Ok(a)
    };
    Ok((load("exp_avg")?, load("exp_avg_sq")?))
}

/// An SVG line chart of the loss per step (no dependencies: a polyline and two axes).
pub fn loss_svg(losses: &[f64]) -> String {
    let (w, h, pad) = (640.0, 360.0, 40.0);
    let (lo, hi) = losses
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    let span = if hi > lo { hi - lo } else { 1.0 };
    let n = losses.len().max(2) - 1;
    let pts: Vec<String> = losses
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let x = pad + (w - 2.0 * pad) * i as f64 / n as f64;
            let y = h - pad - (h - 2.0 * pad) * (l - lo) / span;
            format!("{x:.1},{y:.1}")
        })
        .collect();
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">
<rect width="100%" height="100%" fill="white"/>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="black"/>
<text x="{pad}" y="20" font-family="sans-serif" font-size="14">training loss per step ({} steps): {hi:.4} max, {lo:.4} min</text>
<text x="4" y="{pad}" font-family="sans-serif" font-size="11">{hi:.3}</text><text x="4" y="{b}" font-family="sans-serif" font-size="11">{lo:.3}</text>
<polyline fill="none" stroke="#1f6feb" stroke-width="2" points="{}"/>
</svg>
"##,
        losses.len(),
        pts.join(" "),
        b = h - pad,
        r = w - pad,
    )
}

/// Runs (or resumes) a fine-tuning run; `on_step` sees every optimizer step.
pub fn finetune(cfg: &FinetuneConfig, on_step: &mut dyn FnMut(&StepLog, usize)) -> Result<Summary> {
    finetune_with(cfg, on_step, &mut |_, _| {})
}

/// [`finetune`], and `on_checkpoint(step, dir)` is called once the checkpoint of `step` is completely
/// written to `dir` (adapter, both moments and, last, `trainer_state.json`), so a caller may copy it away
/// at once: `on_step` for the same step runs before the checkpoint is written.
pub fn finetune_with(
    cfg: &FinetuneConfig,
    on_step: &mut dyn FnMut(&StepLog, usize),
    on_checkpoint: &mut dyn FnMut(usize, &Path),
) -> Result<Summary> {
    if cfg.batch == 0 || cfg.grad_accum == 0 {
        return Err(EngineError::Invalid(
            "--batch and --grad-accum must be at least 1".into(),
        ));
    }
    if !(cfg.lr > 0.0 && cfg.lr.is_finite()) {
        return Err(EngineError::Invalid("--lr must be a positive number".into()));
    }
    let mut model = Model::load(&cfg.model)?;
    if let Some(a) = cfg.activation {
        model.config.activation = a;
    }
    let model = std::sync::Arc::new(model);
    let context = model.config.max_position_embeddings;
    if cfg.seq_len > context {
        return Err(EngineError::Invalid(format!(
            "--seq-len {} is longer than the model's context {context}",
            cfg.seq_len
        )));
    }
    let tok = Tokenizer::load(&cfg.model)?;
    let eos = model.config.eos_token_ids.first().copied().ok_or_else(|| {
        EngineError::Invalid(
            "the model names no EOS token (config.json eos_token_id, or tokenizer.ggml.eos_token_id in a GGUF file)"
                .into(),
        )
    })?;
    let spec = DataSpec::for_model(&cfg.model, &tok, eos, cfg.seq_len);
    let mut examples = data::load(&cfg.data, &spec)?;
    if cfg.val_split > 0.0 {
        // The split is taken from a seeded shuffle so that validation covers the whole file.
        let order = data::shuffled(examples.len(), cfg.seed ^ 0x5eed);
        let mut reordered: Vec<Example> = order.iter().map(|&i| examples[i].clone()).collect();
        std::mem::swap(&mut examples, &mut reordered);
    }
    let (train, val) = data::split(examples, cfg.val_split)?;
    let n = train.len();
    let per_step = cfg.batch * cfg.grad_accum;
    let total = match (cfg.steps, cfg.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) if e > 0.0 => ((e * n as f64) / per_step as f64).ceil().max(1.0) as usize,
        (None, Some(_)) => return Err(EngineError::Invalid("--epochs must be positive".into())),
        (None, None) => (n / per_step).max(1),
    };
    let targets: Vec<&str> = cfg.targets.iter().map(String::as_str).collect();
    let opt_cfg = AdamW {
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        ..Default::default()
    };
    let (mut adapter, mut opt, start) = match &cfg.resume {
        Some(dir) => {
            let st: TrainerState = serde_json::from_str(
                &std::fs::read_to_string(dir.join("trainer_state.json")).map_err(|e| EngineError::io(dir, e))?,
            )
            .map_err(|e| EngineError::Invalid(format!("{}: bad trainer_state.json: {e}", dir.display())))?;
            if st.examples != n || st.seed != cfg.seed {
                return Err(EngineError::Invalid(format!(
                    "{}: the checkpoint was made with other data or another --seed ({} examples, seed {}); resume with the same settings",
                    dir.display(),
                    st.examples,
                    st.seed
                )));
            }
            let a = Adapter::load(dir, &model.config)?;
            let mut o = Optimizer::new(&a, opt_cfg, cfg.max_grad_norm);
            let (m, v) = load_moments(dir, &model, &a)?;
            o.m = m;
            o.v = v;
            o.step = st.step as u64;
            (a, o, st.step)
        }
        None => {
            let a = match &cfg.init_adapter {
                Some(d) => Adapter::load(d, &model.config)?,
                None => Adapter::init(&model.config, cfg.rank, cfg.alpha, &targets, cfg.seed)?,
            };
            let mut a = a;
            if let Some(p) = cfg.lora_dropout {
                if !(0.0..1.0).contains(&p) {
                    return Err(EngineError::Invalid("--lora-dropout must be in [0, 1)".into()));
                }
                a.dropout = p;
            }
            let o = Optimizer::new(&a, opt_cfg, cfg.max_grad_norm);
            (a, o, 0)
        }
    };
    let trainer = CpuTrainer::new(&model);
    let gpu_trainer = match gpu_adapter(&cfg.device)? {
        Some(a) => {
            if adapter.dropout > 0.0 {
                return Err(EngineError::Invalid(
                    "LoRA dropout runs on the CPU trainer in this build; use --device cpu or --lora-dropout 0".into(),
                ));
            }
            let longest = train.iter().chain(&val).map(|e| e.ids.len()).max().unwrap_or(1);
            let gt = gpu_trainer(a, &model, &adapter, longest, cfg.batch, cfg.max_memory)?;
            gt.set_moments(&opt.m, &opt.v)?;
            Some(gt)
        }
        None => None,
    };
    let order_cache = std::cell::RefCell::new(std::collections::HashMap::<usize, Vec<usize>>::new());
    let order = |epoch: usize| -> Vec<usize> {
        if !cfg.shuffle {
            return (0..n).collect();
        }
        order_cache
            .borrow_mut()
            .entry(epoch)
            .or_insert_with(|| data::shuffled(n, cfg.seed.wrapping_add(epoch as u64)))
            .clone()
    };
    let eval = |adapter: &Adapter| -> Result<Option<f64>> {
        match &gpu_trainer {
            Some(gt) => mean_loss_gpu(gt, &val),
            None => mean_loss(&trainer, adapter, &val),
        }
    };
    let val_before = if start == 0 { eval(&adapter)? } else { None };
    let t0 = Instant::now();
    let mut losses = vec![];
    for step in start..total {
        let ts = Instant::now();
        let mut grad = adapter.zeros_like();
        let (mut loss, mut tokens) = (0.0, 0usize);
        for a in 0..cfg.grad_accum {
            let mb = micro_batch(&order, &train, step * cfg.grad_accum + a, cfg.batch);
            let (predicted, wgt) = crate::train::micro_batch_weight(&mb, cfg.grad_accum)?;
            tokens += predicted;
            match &gpu_trainer {
                Some(gt) => {
                    // The same loss as CpuTrainer::micro_batch: the mean over the micro-batch, / accumulation.
                    let sum = gpu_micro_batch(gt, &mb, wgt)?;
                    loss += sum / predicted as f64 / cfg.grad_accum as f64;
                }
                None => {
                    // Dropout masks depend on (seed, step, micro-batch) only: a resumed run draws the same ones.
                    let drop_seed = cfg.seed ^ ((step * cfg.grad_accum + a) as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
                    loss += trainer.micro_batch(&mb, &adapter, &mut grad, cfg.grad_accum, Some(drop_seed))?
                        / cfg.grad_accum as f64;
                }
            }
        }
        if !loss.is_finite() {
            return Err(EngineError::Invalid(format!(
                "the loss became {loss} at step {step}; lower --lr"
            )));
        }
        let lr = cfg.lr * lr_factor(cfg.schedule, step, cfg.warmup, total);
        let grad_norm = match &gpu_trainer {
            Some(gt) => {
                opt.step += 1;
                gt.apply(&opt.opt, lr, opt.step, opt.max_grad_norm)?
            }
            None => opt.apply(&mut adapter, &mut grad, lr),
        };
        losses.push(loss);
        let log = StepLog {
            step: step + 1,
            loss,
            lr,
            tokens,
            tokens_per_second: tokens as f64 / ts.elapsed().as_secs_f64().max(1e-9),
            elapsed_s: t0.elapsed().as_secs_f64(),
            grad_norm,
        };
        on_step(&log, total);
        if let Some(every) = cfg.save_every.filter(|&e| e > 0) {
            if (step + 1) % every == 0 && step + 1 < total {
                let dir = cfg.out.join(format!("checkpoint-{}", step + 1));
                if let Some(gt) = &gpu_trainer {
                    adapter = gt.params(&adapter)?;
                    (opt.m, opt.v) = gt.moments(&adapter)?;
                }
                checkpoint(&dir, &adapter, &opt, step + 1, total, cfg.seed, n, &model)?;
                on_checkpoint(step + 1, &dir);
            }
        }
    }
    if let Some(gt) = &gpu_trainer {
        adapter = gt.params(&adapter)?;
    }
    adapter.save(&cfg.out, &model_name(&cfg.model))?;
    if !losses.is_empty() {
        crate::util::write_atomic(&cfg.out.join("loss.svg"), loss_svg(&losses).as_bytes())?;
    }
    let val_after = eval(&adapter)?;
    Ok(Summary {
        steps: total,
        first_loss: losses.first().copied(),
        last_loss: losses.last().copied(),
        val_loss_before: val_before,
        val_loss_after: val_after,
        train_examples: n,
        val_examples: val.len(),
        adapter: cfg.out.clone(),
        device: gpu_trainer.as_ref().map_or("cpu reference".into(), |g| g.device_name()),
        memory: gpu_trainer.as_ref().map(|g| g.plan().clone()),
        device_peak_bytes: gpu_trainer.as_ref().map(|g| g.peak_bytes()),
    })
}

fn model_name(p: &Path) -> String {
    p.file_name().and_then(|s| s.to_str()).unwrap_or("model").to_string()
}

#[allow(clippy::too_many_arguments)]
fn checkpoint(
    dir: &Path,
    adapter: &Adapter,
    opt: &Optimizer,
    step: usize,
    total: usize,
    seed: u64,
    examples: usize,
    model: &Model,
) -> Result<()> {
    adapter.save(dir, &model_name(&model.dir))?;
    save_moments(dir, &opt.m, &opt.v)?;
    let st = TrainerState {
        step,
        total_steps: total,
        seed,
        examples,
    };
    let text = serde_json::to_string_pretty(&st).map_err(|e| EngineError::Invalid(e.to_string()))?;
    // Written last: a checkpoint without its state file is incomplete and refused by --resume.
    crate::util::write_atomic(&dir.join("trainer_state.json"), text.as_bytes())
}

/// What `bitnode bench finetune` measures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub model: PathBuf,
    pub device: String,
    pub batch: usize,
    pub seq_len: usize,
    pub rank: usize,
    pub steps: usize,
    /// Trained tokens (predicted positions) per second over the timed steps, optimizer included.
    pub tokens_per_second: f64,
    pub seconds_per_step: f64,
    /// The high-water mark of the device memory bitnode allocated (GPU trainer only).
    pub peak_device_memory_bytes: Option<u64>,
    pub plan: Option<crate::gpu::train::MemoryPlan>,
}

/// Times LoRA training steps (forward, backward, AdamW) on random tokens: `batch` sequences of `seq_len`
/// per step, LoRA rank `rank` on all seven projections, one untimed warm-up step first (pipeline
/// compilation, buffer allocation), then `steps` timed ones.
pub fn bench(
    model_dir: &Path,
    batch: usize,
    seq_len: usize,
    rank: usize,
    steps: usize,
    device: &str,
    max_memory: Option<u64>,
) -> Result<BenchResult> {
    if batch == 0 || seq_len < 2 || rank == 0 || steps == 0 {
        return Err(EngineError::Invalid(
            "--batch, --rank and --steps must be at least 1 and --seq-len at least 2".into(),
        ));
    }
    let model = std::sync::Arc::new(Model::load(model_dir)?);
    let cfg = &model.config;
    if seq_len > cfg.max_position_embeddings {
        return Err(EngineError::Invalid(format!(
            "--seq-len {seq_len} is longer than the model's context {}",
            cfg.max_position_embeddings
        )));
    }
    let adapter = Adapter::init(cfg, rank, 2.0 * rank as f32, &crate::lora::TARGETS, 0)?;
    let mut rng = crate::rng::Rng::new(11);
    let span = cfg.vocab_size.min(128_000) as u64;
    let seqs: Vec<(Vec<u32>, Vec<i32>)> = (0..batch)
        .map(|_| {
            let ids: Vec<u32> = (0..seq_len).map(|_| (rng.next_u64() % span) as u32).collect();
            let labels = ids.iter().map(|&x| x as i32).collect();
            (ids, labels)
        })
        .collect();
    let (predicted, wgt) = crate::train::micro_batch_weight(&seqs, 1)?;
    let opt = AdamW::default();
    let gt = match gpu_adapter(device)? {
        Some(a) => Some(gpu_trainer(a, &model, &adapter, seq_len, batch, max_memory)?),
        None => None,
    };
    let trainer = CpuTrainer::new(&model);
    let mut cpu_adapter = adapter.clone();
    let mut cpu_opt = Optimizer::new(&adapter, opt, Some(1.0));
    let mut run_step = |step: u64| -> Result<()> {
        match &gt {
            Some(gt) => {
                gpu_micro_batch(gt, &seqs, wgt)?;
                gt.apply(&opt, 1e-4, step, Some(1.0))?;
            }
            None => {
                let mut grad = cpu_adapter.zeros_like();
                trainer.micro_batch(&seqs, &cpu_adapter, &mut grad, 1, None)?;
                cpu_opt.apply(&mut cpu_adapter, &mut grad, 1e-4);
            }
        }
        Ok(())
    };
    run_step(1)?;
    let t0 = Instant::now();
    for s in 0..steps {
        run_step(2 + s as u64)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(BenchResult {
        model: model_dir.to_path_buf(),
        device: gt.as_ref().map_or("cpu reference".into(), |g| g.device_name()),
        batch,
        seq_len,
        rank,
        steps,
        tokens_per_second: (predicted * steps) as f64 / secs.max(1e-9),
        seconds_per_step: secs / steps as f64,
        peak_device_memory_bytes: gt.as_ref().map(|g| g.peak_bytes()),
        plan: gt.as_ref().map(|g| g.plan().clone()),
    })
}
