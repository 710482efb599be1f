//! The commands that run on this device alone: `infer`, `score`, `finetune`, `adapter`, `model synth`, `bench`,
//! `devices`, and `job-exec` (how the daemon runs a job in a child process).
use super::args::{AdapterCmd, BenchCmd, DeviceArgs, FinetuneArgs, InferArgs, ModelCmd, ScoreArgs};
use crate::config;
use crate::exec::{self, JobEvent, JobOutput, JobPaths};
use anyhow::{bail, Context};
use bitnode_engine::cpu::SampleParams;
use bitnode_engine::session::{EmbedDtype, Engine, EngineOptions};
use bitnode_engine::synth::{self, SynthFormat};
use bitnode_protocol::job::{FinetuneRequest, JobSpec};
use bitnode_protocol::{InferRequest, ScoreRequest};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `bitnode job-exec --dir DIR`: runs the job the daemon wrote there; events go to stdout as JSON lines.
pub fn job_exec(home: &Path, dir: &Path, dev: &DeviceArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match engine_options(home, dev) {
        Ok(opts) => exec::exec_dir(dir, &opts, trainer_device(&opts), &mut out),
        Err(e) => {
            // The daemon reads the reason from stdout, as for any other failed job.
            let reason = format!("{e:#}");
            let _ = exec::write_line(&mut out, &exec::ExecLine::Error { reason });
            Err(e)
        }
    }
}

/// `bitnode infer`: streams the text as it is generated.
pub fn infer(home: &Path, a: InferArgs) -> anyhow::Result<()> {
    let json = a.json;
    let (spec, paths, opts) = infer_job(a, home)?;
    // Stream the text as it is generated.
    let mut out = std::io::stdout();
    let mut printed = 0usize;
    let res = exec::execute(&spec, &paths, &opts, trainer_device(&opts), &mut |e| {
        if let JobEvent::Token { text, .. } = e {
            if !text.is_empty() {
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
                printed += text.len();
            }
        }
    })?;
    let JobOutput::Infer(res) = res else {
        bail!("an infer job returned another kind of result");
    };
    // The streamed pieces add up to the text; should any tail be left unreported, print it now.
    if res.text.len() > printed && res.text.is_char_boundary(printed) {
        let _ = out.write_all(&res.text.as_bytes()[printed..]);
    }
    if json {
        println!();
        println!("{}", serde_json::to_string(&res)?);
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, {} generated, {:.1} tok/s decode, stop: {}, device: {}]",
            res.prompt_tokens,
            res.tokens.len(),
            res.decode_tokens_per_second,
            res.stop_reason,
            res.device
        );
    }
    Ok(())
}

pub fn score(home: &Path, a: ScoreArgs) -> anyhow::Result<()> {
    let json = a.json;
    let text_file = a.text_file.clone();
    let (spec, paths, opts) = score_job(a, home)?;
    let out = match exec::execute(&spec, &paths, &opts, trainer_device(&opts), &mut |_| {}) {
        Ok(o) => o,
        // The runner never sees the file, so the message gets its name here.
        Err(e) if e.is::<exec::NothingToScore>() => bail!("{}: {e}", text_file.display()),
        Err(e) => return Err(e),
    };
    let JobOutput::Score(res) = &out else {
        bail!("a score job returned another kind of result");
    };
    if json {
        println!("{}", out.to_json_line()?);
    } else {
        println!(
            "tokens: {}\nnll: {:.6} nats/token\nperplexity: {:.4}",
            res.tokens, res.nll, res.ppl
        );
    }
    Ok(())
}

/// `bitnode adapter`.
pub fn adapter(cmd: AdapterCmd) -> anyhow::Result<()> {
    match cmd {
        AdapterCmd::Export {
            gguf,
            adapter,
            base,
            json,
        } => {
            let r = bitnode_engine::lora::export_gguf(&adapter, &base, &gguf)
                .with_context(|| format!("exporting {} as GGUF", adapter.display()))?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "wrote {} ({} LoRA tensors, rank {}, alpha {}, architecture {}, {})",
                    r.path.display(),
                    r.tensors,
                    r.rank,
                    r.alpha,
                    r.architecture,
                    bitnode_engine::util::human_bytes(r.bytes)
                );
            }
            Ok(())
        }
    }
}

/// Tells a running daemon that the store changed, so its advert lists what it holds now (peers route
/// requests for a model to the devices that advertise it). Best effort: without a daemon there is no advert.
fn models_changed(home: &Path) {
    if crate::control::is_running(home) {
        let r = crate::control::call::<String>(
            home,
            &crate::control::Request::ModelsChanged,
            std::time::Duration::from_secs(10),
        );
        if let Err(e) = r {
            eprintln!("note: the running daemon was not told of the change ({e:#}); it advertises it after a restart");
        }
    }
}

pub fn model(home: &Path, cmd: ModelCmd) -> anyhow::Result<()> {
    match cmd {
        ModelCmd::Synth {
            preset,
            out,
            seed,
            format,
        } => {
            let p = synth::preset(&preset)?;
            let fmt = if format == "online" {
                SynthFormat::Online
            } else {
                SynthFormat::Packed
            };
            synth::synth(p, &out, seed, fmt)?;
            println!("wrote {} ({} preset, {format}) to {}", p.name, p.name, out.display());
        }
        ModelCmd::Export { gguf, model, json } => {
            let r = bitnode_engine::model_export::export_model(&model, &gguf)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "wrote {} ({}, {} tensors, TQ2_0 projections, embedding {}{}; largest scale change from \
                     fp16 rounding {:.1e})",
                    r.path.display(),
                    bitnode_engine::util::human_bytes(r.bytes),
                    r.tensors,
                    r.embedding_type,
                    if r.tied { ", tied" } else { ", untied output" },
                    r.max_scale_rounding
                );
            }
        }
        ModelCmd::Add { dir, name, json } => {
            let m = crate::names::add(home, &dir, name.as_deref())?;
            if json {
                println!("{}", serde_json::to_string(&m)?);
            } else {
                println!("{} {} added as {:?} ({})", m.kind, m.hash, m.name, dir.display());
            }
            models_changed(home);
        }
        ModelCmd::List { json } => {
            let list = crate::names::list(home)?;
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("no named models (add one with `bitnode model add DIR --name NAME`)");
            } else {
                for m in &list {
                    println!("{:<24} {:<8} {}", m.name, m.kind, m.hash);
                }
            }
        }
        ModelCmd::Remove { name } => {
            let m = crate::names::remove(home, &name)?;
            println!("forgot {:?} ({})", m.name, m.hash);
            models_changed(home);
        }
    }
    Ok(())
}

pub fn devices(json: bool) -> anyhow::Result<()> {
    let list: Vec<_> = bitnode_engine::gpu::adapters()
        .iter()
        .enumerate()
        .map(|(i, a)| bitnode_engine::gpu::summarize(i, a))
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if list.is_empty() {
        println!("no wgpu adapters found; bitnode will use the CPU backend");
    } else {
        for a in &list {
            println!("[{}] {} ({}, {})", a.index, a.name, a.backend, a.device_type);
            println!("    driver: {} {}", a.driver, a.driver_info);
            println!(
                "    max_buffer_size: {}  max_storage_buffer_binding_size: {}  max_workgroups/dim: {}  workgroup storage: {}",
                a.max_buffer_size, a.max_storage_buffer_binding_size, a.max_compute_workgroups_per_dimension, a.max_compute_workgroup_storage_size
            );
            println!("    shader-f16: {}  features: {}", a.shader_f16, a.features.join(", "));
        }
        println!("auto prefers discrete > integrated > virtual > other, then the CPU reference (software Vulkan is slower than it);");
        println!("choose with --device auto|gpu|cpu|INDEX|NAME, BITNODE_ADAPTER or [engine] adapter");
    }
    Ok(())
}

pub fn bench(home: &Path, cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Mesh { model, runs, json } => crate::bench_mesh::run(model, runs, json),
        BenchCmd::Serve(a) => crate::bench_serve::run(home, a),
        BenchCmd::Probe { ms, samples, json, dev } => {
            let opts = engine_options(home, &dev)?;
            let want = opts.adapter.unwrap_or_else(|| "auto".into());
            let p = bitnode_engine::probe::probe_with(&want, std::time::Duration::from_millis(ms), samples)?;
            if json {
                println!("{}", serde_json::to_string(&p)?);
            } else {
                println!(
                    "{} ({}, {}): ternary matmul {:.2} GOPS (median of {} samples, {} clock{}), {}",
                    p.device,
                    p.backend,
                    p.device_type,
                    p.ternary_gops,
                    p.samples_gops.len(),
                    p.clock,
                    p.cpus.map(|n| format!(", x {n} CPUs")).unwrap_or_default(),
                    if p.verified {
                        "matches the CPU twin"
                    } else {
                        "DISAGREES with the CPU twin"
                    }
                );
            }
            Ok(())
        }
        BenchCmd::Finetune {
            model,
            batch,
            seq_len,
            rank,
            steps,
            max_memory,
            json,
            device,
        } => {
            let model = model_or_builtin(model, home)?;
            let r = bitnode_engine::finetune::bench(&model, batch, seq_len, rank, steps, &device, max_memory)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} on {}: batch {} x {} tokens, LoRA r{} on all projections: {:.0} tokens/s ({:.3} s/step), peak device memory {}",
                    r.model.display(),
                    r.device,
                    r.batch,
                    r.seq_len,
                    r.rank,
                    r.tokens_per_second,
                    r.seconds_per_step,
                    r.peak_device_memory_bytes
                        .map_or("n/a (CPU reference)".into(), bitnode_engine::util::human_bytes)
                );
                if let Some(p) = &r.plan {
                    println!(
                        "plan: {} sequence(s) per pass, gradient checkpointing {}, head chunk {} tokens, \
                         embedding {}; predicted {}",
                        p.micro_batch,
                        if p.checkpoint { "on" } else { "off" },
                        p.head_chunk,
                        if p.embed_host {
                            "in host memory (head streamed in f16 tiles)"
                        } else if p.embed_f16 {
                            "f16"
                        } else {
                            "f32"
                        },
                        bitnode_engine::util::human_bytes(p.total)
                    );
                }
            }
            Ok(())
        }
        BenchCmd::Infer {
            model,
            prompt_len,
            gen,
            profile,
            concurrency,
            json,
            dev,
        } => {
            let model = model_or_builtin(model, home)?;
            let opts = engine_options(home, &dev)?;
            bench_infer(&model, prompt_len, gen, profile, &concurrency, json, &opts)
        }
    }
}

pub fn engine_options(home: &std::path::Path, dev: &DeviceArgs) -> anyhow::Result<EngineOptions> {
    let cfg = config::Config::load(home)?;
    let embed_dtype = match (&dev.embed_dtype, &cfg.engine.embed_dtype) {
        (Some(d), _) => *d,
        (None, Some(s)) => s
            .parse()
            .map_err(|e: String| anyhow::anyhow!("config.toml [engine] embed_dtype: {e}"))?,
        (None, None) => EmbedDtype::Auto,
    };
    Ok(EngineOptions {
        adapter: dev.device.clone().or(cfg.engine.adapter),
        max_binding: dev.max_binding.or(cfg.engine.max_binding),
        embed_dtype,
        lora: None,
        activation: None,
    })
}

/// `bitnode infer`'s arguments as a job: the spec, where its files are, and the engine options.
pub fn infer_job(a: InferArgs, home: &std::path::Path) -> anyhow::Result<(JobSpec, JobPaths, EngineOptions)> {
    let model = model_or_builtin(a.model, home)?;
    let mut opts = engine_options(home, &a.dev)?;
    opts.activation = a.activation;
    let spec = JobSpec::Infer(InferRequest {
        model: model.display().to_string(),
        adapter: a.adapter.as_ref().map(|p| p.display().to_string()),
        prompt: a.prompt,
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        messages: None,
        stop: vec![],
    });
    let paths = JobPaths {
        adapter: a.adapter,
        ..JobPaths::model(model)
    };
    Ok((spec, paths, opts))
}

/// `bitnode score`'s arguments as a job (the text is read here: it travels in the spec).
pub fn score_job(a: ScoreArgs, home: &std::path::Path) -> anyhow::Result<(JobSpec, JobPaths, EngineOptions)> {
    let model = model_or_builtin(a.model, home)?;
    let mut opts = engine_options(home, &a.dev)?;
    opts.activation = a.activation;
    let text = std::fs::read_to_string(&a.text_file).with_context(|| format!("reading {}", a.text_file.display()))?;
    let spec = JobSpec::Score(ScoreRequest {
        model: model.display().to_string(),
        adapter: a.adapter.as_ref().map(|p| p.display().to_string()),
        text,
    });
    let paths = JobPaths {
        adapter: a.adapter,
        ..JobPaths::model(model)
    };
    Ok((spec, paths, opts))
}

pub fn finetune(a: FinetuneArgs) -> anyhow::Result<()> {
    let (device, json) = (a.device.clone(), a.json);
    let (spec, paths) = finetune_job(a)?;
    finetune_run(&spec, &paths, &device, json)
}

/// `bitnode finetune`'s arguments as a job (the dataset is read from its path locally; `submit` sends it).
pub fn finetune_job(a: FinetuneArgs) -> anyhow::Result<(JobSpec, JobPaths)> {
    // A directory's config.json, or a GGUF file's header.
    let ctx = bitnode_engine::model::load_config(&a.model)
        .with_context(|| format!("loading model {}", a.model.display()))?
        .max_position_embeddings;
    let spec = JobSpec::Finetune(Box::new(FinetuneRequest {
        model: a.model.display().to_string(),
        // A local run reads the dataset from its path; the name is what a remote run would store it as.
        data_name: a
            .data
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        data: vec![],
        init_adapter: a.init_adapter.as_ref().map(|p| p.display().to_string()),
        rank: a.rank,
        alpha: a.alpha,
        lora_dropout: a.lora_dropout,
        targets: a.targets,
        lr: a.lr,
        steps: a.steps,
        epochs: a.epochs,
        batch: a.batch,
        seq_len: a.seq_len.unwrap_or(512.min(ctx)),
        grad_accum: a.grad_accum,
        weight_decay: a.weight_decay,
        warmup: a.warmup,
        schedule: a.schedule,
        max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
        shuffle: !a.no_shuffle,
        seed: a.seed,
        val_split: a.val_split,
        save_every: a.save_every,
        max_memory: a.max_memory,
        activation: a.activation.map(|a| a.name().to_string()),
    }));
    let paths = JobPaths {
        model: a.model,
        adapter: a.init_adapter,
        data: Some(a.data),
        out: Some(a.out),
        resume: a.resume,
        json_log: a.json_log,
    };
    Ok((spec, paths))
}

fn finetune_run(spec: &JobSpec, paths: &JobPaths, device: &str, json: bool) -> anyhow::Result<()> {
    let mut on_event = |e: JobEvent<'_>| {
        if let JobEvent::Step {
            step,
            total,
            loss,
            lr,
            tokens_per_second,
            elapsed_s,
        } = e
        {
            let eta = elapsed_s / step as f64 * (total.saturating_sub(step)) as f64;
            eprint!(
                "\rstep {step}/{total}  loss {loss:.4}  lr {lr:.2e}  {tokens_per_second:.0} tok/s  ETA {eta:.0}s   "
            );
        }
    };
    // The engine options only matter to infer and score; the trainer takes --device.
    let out = exec::execute(spec, paths, &EngineOptions::default(), device, &mut on_event)?;
    eprintln!();
    let JobOutput::Finetune(sum) = &out else {
        bail!("a finetune job returned another kind of result");
    };
    if json {
        println!("{}", out.to_json_line()?);
        return Ok(());
    }
    println!(
        "wrote adapter to {} ({} steps on {}; loss {} -> {}{})",
        sum.adapter.display(),
        sum.steps,
        sum.device,
        sum.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
        sum.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        match (sum.val_loss_before, sum.val_loss_after) {
            (Some(b), Some(a)) => format!("; eval loss {b:.4} -> {a:.4}"),
            (None, Some(a)) => format!("; eval loss {a:.4}"),
            _ => String::new(),
        }
    );
    Ok(())
}

/// The trainer device a job runs on when the command has no `--device` of its own (infer, score,
/// job-exec): the engine's choice (`--device`, `BITNODE_ADAPTER`, `[engine] adapter`), else auto.
fn trainer_device(opts: &EngineOptions) -> &str {
    opts.adapter.as_deref().unwrap_or("auto")
}

/// The model a command runs when `--model` is omitted: a random `tiny` BitNet (seed 0) kept in
/// `<home>/models/builtin-tiny`, so a first run needs no download.
pub(crate) fn model_or_builtin(model: Option<PathBuf>, home: &std::path::Path) -> anyhow::Result<PathBuf> {
    if let Some(m) = model {
        return Ok(m);
    }
    let dir = home.join("models").join("builtin-tiny");
    if !dir.join("model.safetensors").exists() {
        eprintln!(
            "note: no --model given; writing the built-in random tiny BitNet to {}",
            dir.display()
        );
        let p = synth::preset("tiny")?;
        synth::synth(p, &dir, 0, SynthFormat::Packed).with_context(|| format!("writing {}", dir.display()))?;
    }
    Ok(dir)
}

fn bench_infer(
    model: &std::path::Path,
    prompt_len: usize,
    gen: usize,
    profile: bool,
    concurrency: &[usize],
    json: bool,
    opts: &EngineOptions,
) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let (mut engine, load) =
        Engine::load_reporting(model, opts).with_context(|| format!("loading model {}", model.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = engine.model.config.clone();
    if prompt_len == 0 || prompt_len + gen > cfg.max_position_embeddings {
        bail!(
            "--prompt-len {prompt_len} + --gen {gen} must be between 1 and the context {}",
            cfg.max_position_embeddings
        );
    }
    // A deterministic prompt of ordinary (non-special) ids, BOS first.
    let make_prompt = |seed: u64| {
        let bos = cfg.bos_token_id.unwrap_or(0);
        let span = (cfg.vocab_size.min(128000) - 1) as u64;
        let mut prompt = vec![bos];
        let mut r = bitnode_engine::rng::Rng::new(seed);
        while prompt.len() < prompt_len {
            prompt.push((r.next_u64() % span) as u32);
        }
        prompt
    };
    let prompt = make_prompt(7);
    let greedy = SampleParams::default();
    // Warm-up: compiles pipelines and touches every buffer once.
    engine.generate_ids(&prompt, gen.min(8), &greedy, 0, false, &mut |_| true)?;
    let g = engine.generate_ids(&prompt, gen, &greedy, 0, false, &mut |_| true)?;
    let n = g.tokens.len();
    let decode = if n > 1 { (n - 1) as f64 / g.decode_seconds } else { 0.0 };
    let prefill = prompt_len as f64 / g.prefill_seconds;
    let mem = engine.backend.memory();
    let device = engine.backend.device_name();
    // Whether the decode kernels ran their subgroup variants (BITNODE_SUBGROUPS=0 forces the fallback).
    let subgroups = engine.backend.subgroups();
    let prof = if profile {
        engine.backend.profile_step(prompt_len + n / 2)?
    } else {
        None
    };
    // Bytes one decode step must read: every ternary weight, the lm_head, the norms, and the KV cache so far.
    let batched = concurrency
        .iter()
        .map(|&c| bench_batch(&mut engine, c, gen, profile, &make_prompt))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let kv_read = (cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4 * (prompt_len + gen / 2)) as u64;
    let head_bytes = if mem.lm_head > 0 { mem.lm_head } else { mem.embedding };
    let bytes_per_token = mem.ternary_weights + head_bytes + mem.other_weights + kv_read;
    let bw = bandwidth_for(&device);
    let bound = bw.map(|b| b / bytes_per_token as f64);
    let v = serde_json::json!({
        "model": model.display().to_string(),
        "device": device,
        "subgroups": subgroups,
        "prompt_len": prompt_len,
        "gen": n,
        "load_seconds": load_s,
        "load_breakdown": load,
        "prefill_tokens_per_second": prefill,
        "decode_tokens_per_second": decode,
        "peak_device_memory_bytes": mem.peak,
        "memory": mem,
        "bytes_read_per_token": bytes_per_token,
        "memory_bandwidth_bytes_per_second": bw,
        "bandwidth_bound_tokens_per_second": bound,
        "fraction_of_bandwidth_bound": bound.map(|b| decode / b),
        "profile": prof,
        "batched": batched,
        // The whole run's peak, decode included; load_breakdown.peak_rss_bytes is the load's.
        "peak_rss_bytes": bitnode_engine::util::peak_rss_bytes(),
    });
    if json {
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "device:            {device}, subgroups {}",
            if subgroups { "on" } else { "off" }
        );
        let l = &load;
        println!(
            "load:              {load_s:.2} s (open {:.2}, tokenizer {:.2}, device {:.2}, convert {:.2}, upload {:.2} on {} threads; overlapping){}",
            l.open_seconds,
            l.tokenizer_seconds,
            l.device_seconds,
            l.convert_seconds,
            l.upload_seconds,
            l.threads,
            l.peak_rss_bytes
                .map_or(String::new(), |b| format!(", peak RSS {:.1} MiB", mib(b)))
        );
        println!("prefill:           {prefill:.1} tok/s ({prompt_len} tokens)");
        println!("decode:            {decode:.1} tok/s ({n} tokens)");
        println!(
            "peak device mem:   {:.1} MiB (ternary {:.1}, embedding {:.1}, lm_head {:.1}, kv {:.1}, activations {:.1})",
            mib(mem.peak),
            mib(mem.ternary_weights),
            mib(mem.embedding),
            mib(mem.lm_head),
            mib(mem.kv_cache),
            mib(mem.activations)
        );
        if let Some(b) = bound {
            println!(
                "bandwidth bound:   {b:.0} tok/s; decode reaches {:.1}% of it",
                100.0 * decode / b
            );
        }
        for b in &batched {
            println!(
                "batch of {:>3}:      {:.1} tok/s aggregate decode, {:.1} tok/s per stream, first token after {:.1} ms (median), {:.2} s wall",
                b.concurrency, b.aggregate_decode_tokens_per_second, b.per_stream_decode_tokens_per_second, b.ttft_ms_median, b.wall_seconds
            );
        }
        if let Some(p) = &prof {
            println!(
                "one decode step:   {} dispatches, {:.0} us of kernel time, {:.0} us to record and submit",
                p.dispatches, p.gpu_us, p.record_us
            );
            for (k, c, us) in &p.kernels {
                println!("    {k:<16} {c:>5} dispatches {us:>9.1} us");
            }
        }
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct BatchBench {
    concurrency: usize,
    tokens: usize,
    wall_seconds: f64,
    /// Tokens after each stream's first, over the time from the last first token to the end.
    aggregate_decode_tokens_per_second: f64,
    per_stream_decode_tokens_per_second: f64,
    ttft_ms_median: f64,
    ttft_ms_max: f64,
    largest_step: usize,
    /// Kernel times of one batched decode step (`--profile`).
    profile: Option<bitnode_engine::backend::Profile>,
}

/// `c` sequences joined at once into a continuous batch, each generating `gen` tokens (no EOS stop).
fn bench_batch(
    engine: &mut Engine,
    c: usize,
    gen: usize,
    profile: bool,
    prompt: &dyn Fn(u64) -> Vec<u32>,
) -> anyhow::Result<BatchBench> {
    use bitnode_engine::batch::{Batcher, SeqEvent, SeqRequest};
    let run = |engine: &mut Engine, gen: usize| -> anyhow::Result<(f64, Vec<f64>, usize, usize)> {
        let mut b = Batcher::new(c);
        for i in 0..c {
            b.join(SeqRequest {
                prompt: prompt(100 + i as u64),
                max_tokens: gen,
                params: SampleParams::default(),
                seed: i as u64,
                stop_at_eos: false,
            });
        }
        let t0 = std::time::Instant::now();
        let mut first: std::collections::HashMap<u64, f64> = Default::default();
        let mut tokens = 0usize;
        let mut failed = None;
        while !b.is_idle() {
            b.step(engine, &mut |id, ev| {
                match ev {
                    SeqEvent::Token(_) => {
                        tokens += 1;
                        first.entry(id).or_insert_with(|| t0.elapsed().as_secs_f64());
                    }
                    SeqEvent::Failed(e) => failed = Some(e.to_string()),
                    SeqEvent::Done(_) => {}
                }
                true
            })?;
        }
        if let Some(e) = failed {
            bail!("a batched sequence failed: {e}");
        }
        let mut ttft: Vec<f64> = first.values().copied().collect();
        ttft.sort_by(|a, b| a.total_cmp(b));
        Ok((t0.elapsed().as_secs_f64(), ttft, tokens, b.peak()))
    };
    // Warm-up: the batch kernels' pipelines and the slot caches.
    run(engine, gen.min(4))?;
    let (wall, ttft, tokens, peak) = run(engine, gen)?;
    let last_first = ttft.last().copied().unwrap_or(0.0);
    let prof = if profile {
        let rows: Vec<bitnode_engine::backend::SlotRow> = (0..peak)
            .map(|i| bitnode_engine::backend::SlotRow {
                slot: i,
                pos: prompt(0).len() + gen / 2,
                token: 1,
                params: SampleParams::default(),
                u: 0.5,
            })
            .collect();
        engine.backend.profile_rows(&rows)?
    } else {
        None
    };
    let decode_tokens = tokens.saturating_sub(c);
    let agg = decode_tokens as f64 / (wall - last_first).max(1e-9);
    Ok(BatchBench {
        concurrency: c,
        tokens,
        wall_seconds: wall,
        aggregate_decode_tokens_per_second: agg,
        per_stream_decode_tokens_per_second: agg / c.max(1) as f64,
        ttft_ms_median: 1e3 * ttft.get(ttft.len() / 2).copied().unwrap_or(0.0),
        ttft_ms_max: 1e3 * last_first,
        largest_step: peak,
        profile: prof,
    })
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Peak memory bandwidth of GPUs we know, in bytes/s, for the "fraction of the bound" figure.
fn bandwidth_for(device: &str) -> Option<f64> {
    let d = device.to_lowercase();
    let table: &[(&str, f64)] = &[
        ("h200", 4.8e12),
        ("h100 nvl", 3.9e12),
        ("h100 pcie", 2.0e12),
        ("h100", 3.35e12),
        ("a100", 2.0e12),
        ("rtx 4090", 1.008e12),
        ("rtx 4070 ti", 0.504e12),
        ("l40s", 0.864e12),
    ];
    table.iter().find(|(n, _)| d.contains(n)).map(|(_, b)| *b)
}
