//! Running a job: the one place where a [`JobSpec`] becomes engine work. `bitnode infer`, `score` and
//! `finetune` build a spec from their arguments and run it here, and the daemon runs jobs from other
//! devices through the same function (in a child process, `bitnode job-exec`, which speaks [`ExecLine`]s),
//! so a local run and a delegated one cannot drift apart.
//!
//! The spec says *what* to run; [`JobPaths`] says where its inputs live on this device (the user's paths
//! for a local run, the model store and the job directory for a worker). The model and adapter fields of
//! the spec are names (a path for a local run, a content hash on the wire); only the paths are opened.
//!
//! Over 800 lines because it is one pipeline per job kind (inference, scoring, fine-tuning with its
//! checkpoints and resume) plus the child-process protocol and their tests; each part is short.
use anyhow::{anyhow, bail, Context};
use bitnode_engine::cpu::SampleParams;
use bitnode_engine::finetune::{FinetuneConfig, StepLog, Summary};
use bitnode_engine::lora::Adapter;
use bitnode_engine::model::Model;
use bitnode_engine::session::{Engine, EngineOptions};
use bitnode_engine::train::Schedule;
use bitnode_protocol::job::{FinetuneRequest, JobSpec};
use bitnode_protocol::{InferRequest, InferResult, ScoreRequest, ScoreResult};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where a job's inputs live on this device (a local run: the user's paths; a worker: its model store and
/// job directory).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobPaths {
    pub model: PathBuf,
    /// infer/score: the LoRA adapter; finetune: the adapter to start from (--init-adapter).
    pub adapter: Option<PathBuf>,
    /// finetune: the dataset file (its extension picks the format). The spec's inline `data` bytes are only
    /// used on the wire; the runner reads this path.
    pub data: Option<PathBuf>,
    /// finetune: output directory (PEFT adapter, loss.svg, checkpoint-N/ subdirectories).
    pub out: Option<PathBuf>,
    /// finetune: a checkpoint directory to resume from (--resume).
    pub resume: Option<PathBuf>,
    /// finetune: --json-log FILE
    pub json_log: Option<PathBuf>,
}

impl JobPaths {
    /// Only the model: the start of every job's paths.
    pub fn model(model: impl Into<PathBuf>) -> JobPaths {
        JobPaths {
            model: model.into(),
            adapter: None,
            data: None,
            out: None,
            resume: None,
            json_log: None,
        }
    }
}

/// What a running job reports as it goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum JobEvent<'a> {
    /// A generated token and the text decoded so far that was not yet reported (may be empty when a UTF-8
    /// char is split across tokens).
    Token { id: u32, text: &'a str },
    Step {
        step: usize,
        total: usize,
        loss: f64,
        lr: f64,
        tokens_per_second: f64,
        elapsed_s: f64,
    },
    /// A checkpoint directory (adapter + exp_avg/ + exp_avg_sq/ + trainer_state.json) was completely
    /// written for `step`.
    Checkpoint { step: usize, dir: &'a Path },
}

/// A job's typed result: what the local command's `--json` prints as its last line.
#[derive(Debug, Clone)]
pub enum JobOutput {
    Infer(InferResult),
    Score(ScoreResult),
    Finetune(Box<Summary>),
}

impl JobOutput {
    /// The result as a JSON value (what [`run_job`] returns and `job-exec` sends back).
    pub fn to_value(&self) -> anyhow::Result<serde_json::Value> {
        Ok(match self {
            JobOutput::Infer(r) => serde_json::to_value(r)?,
            JobOutput::Score(r) => serde_json::to_value(r)?,
            JobOutput::Finetune(s) => serde_json::to_value(s)?,
        })
    }

    /// The result as one line of JSON with the fields in their declared order, byte for byte what the
    /// local commands have always printed. (A `serde_json::Value` sorts its keys, so this goes through
    /// the typed struct instead.)
    pub fn to_json_line(&self) -> anyhow::Result<String> {
        Ok(match self {
            JobOutput::Infer(r) => serde_json::to_string(r)?,
            JobOutput::Score(r) => serde_json::to_string(r)?,
            JobOutput::Finetune(s) => serde_json::to_string(s)?,
        })
    }
}

/// A score job whose text has fewer than two tokens. A typed error, so that `bitnode score` can name its
/// `--text-file` in the message, which the runner never sees.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the text has fewer than two tokens, nothing to score")]
pub struct NothingToScore;

/// Runs a job; returns the object the local command's `--json` prints as its last line
/// (InferResult / ScoreResult / the finetune Summary, serialized with serde_json).
///
/// `engine` picks and configures the device for infer and score (its `lora` is replaced by
/// `paths.adapter`); `device` is the fine-tune trainer's `--device` (auto, gpu, cpu, an index or part of a
/// name).
pub fn run_job(
    spec: &JobSpec,
    paths: &JobPaths,
    engine: &EngineOptions,
    device: &str,
    on_event: &mut dyn FnMut(JobEvent<'_>),
) -> anyhow::Result<serde_json::Value> {
    execute(spec, paths, engine, device, on_event)?.to_value()
}

/// [`run_job`] with the typed result: the local commands print it with the fields in declared order.
pub fn execute(
    spec: &JobSpec,
    paths: &JobPaths,
    engine: &EngineOptions,
    device: &str,
    on_event: &mut dyn FnMut(JobEvent<'_>),
) -> anyhow::Result<JobOutput> {
    validate(spec)?;
    Ok(match spec {
        JobSpec::Infer(r) => {
            same_adapter(r.adapter.as_deref(), paths.adapter.as_deref())?;
            JobOutput::Infer(infer(r, paths, engine, on_event)?)
        }
        JobSpec::Score(r) => {
            same_adapter(r.adapter.as_deref(), paths.adapter.as_deref())?;
            JobOutput::Score(score(r, paths, engine)?)
        }
        JobSpec::Finetune(r) => {
            same_adapter(r.init_adapter.as_deref(), paths.adapter.as_deref())?;
            JobOutput::Finetune(Box::new(finetune(r, paths, device, on_event)?))
        }
    })
}

/// Checks the fields of a spec that the engine would otherwise take on trust, with the local command's
/// wording where the engine has a message for the same mistake. Cheap (no files are opened), so a worker
/// can call it before it accepts a job; [`run_job`] and [`estimate`] call it first.
pub fn validate(spec: &JobSpec) -> anyhow::Result<()> {
    match spec {
        JobSpec::Infer(r) => {
            sample_params(r)?;
        }
        JobSpec::Score(_) => {}
        JobSpec::Finetune(r) => {
            schedule(r)?;
            // The same messages as the engine's own checks, which a local run met later.
            if r.batch == 0 || r.grad_accum == 0 {
                bail!("--batch and --grad-accum must be at least 1");
            }
            if !(r.lr > 0.0 && r.lr.is_finite()) {
                bail!("--lr must be a positive number");
            }
            if r.seq_len < 2 {
                bail!("--seq-len must be at least 2");
            }
            // The trainer indexes examples by step x grad_accum x batch: keep that (and the token count)
            // inside usize rather than let a job from elsewhere overflow it.
            let tokens = [r.steps.unwrap_or(1), r.batch, r.grad_accum, r.seq_len]
                .into_iter()
                .try_fold(1usize, usize::checked_mul);
            if tokens.is_none() {
                bail!("steps x batch x grad_accum x seq_len is too large");
            }
            if r.init_adapter.is_none() && r.rank == 0 {
                bail!("LoRA rank must be at least 1");
            }
            if !r.alpha.is_finite() {
                bail!("--alpha must be a finite number, got {}", r.alpha);
            }
            if let Some(p) = r.lora_dropout {
                if !(0.0..1.0).contains(&p) {
                    bail!("--lora-dropout must be in [0, 1)");
                }
            }
            if !(r.weight_decay >= 0.0 && r.weight_decay.is_finite()) {
                bail!("--weight-decay must be a number >= 0, got {}", r.weight_decay);
            }
            if let Some(e) = r.epochs {
                // An infinite epoch count would make a run of usize::MAX steps.
                if e.is_nan() || e <= 0.0 {
                    bail!("--epochs must be positive");
                }
                if !e.is_finite() {
                    bail!("--epochs must be finite");
                }
            }
            if let Some(g) = r.max_grad_norm {
                // The CLI maps 0 to None; a spec from elsewhere must do the same.
                if !(g > 0.0 && g.is_finite()) {
                    bail!("--max-grad-norm must be a positive number (None disables clipping), got {g}");
                }
            }
            if !(0.0..1.0).contains(&r.val_split) {
                bail!("--val-split must be in [0, 1)");
            }
            // Inline data (a job from the wire) is written to a file of this name in the job directory, so
            // the name must be one plain path component. A local run passes its dataset by path instead.
            if !r.data.is_empty() {
                let n = &r.data_name;
                if n.is_empty()
                    || n == "."
                    || n == ".."
                    || n.len() > 255
                    || n.contains(['/', '\\'])
                    || n.chars().any(char::is_control)
                {
                    bail!("the dataset name {n:?} is not a plain file name");
                }
            }
        }
    }
    Ok(())
}

/// The spec names an adapter exactly when the paths hold one: a mismatch is a bug in whoever built the
/// job, and running without the adapter it asked for would silently give another answer.
fn same_adapter(named: Option<&str>, path: Option<&Path>) -> anyhow::Result<()> {
    match (named, path) {
        (Some(n), None) => bail!("the job names the adapter {n:?}, but no adapter directory was provided"),
        (None, Some(p)) => bail!(
            "an adapter directory ({}) was provided for a job that names none",
            p.display()
        ),
        _ => Ok(()),
    }
}

fn sample_params(r: &InferRequest) -> anyhow::Result<SampleParams> {
    let params = SampleParams {
        temperature: r.temperature,
        top_k: r.top_k,
        top_p: r.top_p,
        repetition_penalty: r.repetition_penalty,
    };
    if !(params.top_p > 0.0 && params.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", params.top_p);
    }
    if params.temperature < 0.0 || !params.temperature.is_finite() {
        bail!("--temperature must be >= 0, got {}", params.temperature);
    }
    if params.repetition_penalty <= 0.0 || !params.repetition_penalty.is_finite() {
        bail!("--repetition-penalty must be > 0, got {}", params.repetition_penalty);
    }
    Ok(params)
}

fn schedule(r: &FinetuneRequest) -> anyhow::Result<Schedule> {
    r.schedule.parse().map_err(|e: String| anyhow!(e))
}

/// Loads the engine for a model (with a LoRA adapter applied, or none).
pub fn load_engine(model: &Path, adapter: &Option<PathBuf>, opts: &EngineOptions) -> anyhow::Result<Engine> {
    let mut opts = opts.clone();
    opts.lora = adapter.clone();
    Engine::load(model, &opts).with_context(|| match adapter {
        Some(a) => format!("loading model {} with adapter {}", model.display(), a.display()),
        None => format!("loading model {}", model.display()),
    })
}

/// The most tokens `session::generate` can return for a prompt of `prompt` tokens: `max_tokens`, or fewer
/// when the cache runs out of positions (the first token comes from the prefill, then at most one per
/// position left).
fn most_new_tokens(prompt: usize, max_tokens: usize, ctx: usize) -> usize {
    if max_tokens == 0 || prompt == 0 || prompt >= ctx {
        return 0;
    }
    let positions = prompt.saturating_add(max_tokens).min(ctx);
    1 + (max_tokens - 1).min(positions - prompt)
}

fn infer(
    req: &InferRequest,
    paths: &JobPaths,
    opts: &EngineOptions,
    on_event: &mut dyn FnMut(JobEvent<'_>),
) -> anyhow::Result<InferResult> {
    sample_params(req)?;
    let mut engine = load_engine(&paths.model, &paths.adapter, opts)?;
    infer_on(&mut engine, req, &paths.model, on_event)
}

/// An inference request made ready for an engine: what `session::generate` (or a sequence of an engine
/// host's batch) takes.
#[derive(Debug, Clone)]
pub struct PreparedInfer {
    /// The prompt's token ids: the conversation through the model's chat template, or the prompt encoded.
    pub ids: Vec<u32>,
    pub params: SampleParams,
    /// The request's `max_tokens`, clamped to one past the context.
    pub max_tokens: usize,
}

/// Checks the request's sampling values and turns its prompt (or conversation) into token ids for
/// `engine`. `model_dir` holds the chat template.
pub fn prepare_infer(engine: &Engine, req: &InferRequest, model_dir: &Path) -> anyhow::Result<PreparedInfer> {
    let params = sample_params(req)?;
    let ids = match &req.messages {
        // A conversation goes through the model's own chat template, which writes its special tokens
        // (BOS included) itself.
        Some(msgs) => {
            let eos = engine.eos.first().copied().unwrap_or(0);
            let spec = bitnode_engine::data::DataSpec::for_model(model_dir, &engine.tokenizer, eos, 0);
            let msgs: Vec<bitnode_engine::data::Message> = msgs
                .iter()
                .map(|m| bitnode_engine::data::Message {
                    role: m.role.clone(),
                    content: m.content.clone(),
                })
                .collect();
            let text = bitnode_engine::data::render(&spec, &msgs, true)?;
            engine.tokenizer.encode_plain(&text)?
        }
        None => engine.tokenizer.encode(&req.prompt)?,
    };
    // No run makes more tokens than the context holds, so clamping changes nothing for any request (one past
    // the context keeps a context-bounded run's stop reason "context"), but keeps a huge max_tokens from a
    // job from elsewhere from overflowing the engine's position arithmetic.
    let max_tokens = req.max_tokens.min(engine.model.config.max_position_embeddings + 1);
    Ok(PreparedInfer {
        ids,
        params,
        max_tokens,
    })
}

/// How long tests make every decode step take (`BITNODE_TEST_TOKEN_DELAY_MS`), so that a stream is still
/// running when its client leaves, or requests overlap: a delay of the real engine, not a stand-in for it.
pub fn test_step_delay() -> Option<std::time::Duration> {
    std::env::var("BITNODE_TEST_TOKEN_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(std::time::Duration::from_millis)
}

/// The text of one generation as its tokens arrive: each token is reported as a [`JobEvent::Token`] with
/// the text it completes, and the generation ends at the first stop string.
///
/// The whole continuation is decoded each time and the new suffix reported: byte-level tokens can split a
/// UTF-8 character, which then shows as U+FFFD until its last byte arrives, so such a tail is held back,
/// and so is a tail that may be the start of a stop string until the text shows whether it is. The last
/// token reports everything left (a dangling U+FFFD included), so the reported pieces add up to the final
/// text; it is known to be the last when it is an EOS or the most `generate` can return.
#[derive(Debug, Clone)]
pub struct TextStream {
    stop: Vec<String>,
    generated: Vec<u32>,
    /// Bytes of the decoded text already reported.
    reported: usize,
    /// The most tokens the generation can make.
    last_possible: usize,
}

impl TextStream {
    /// The stream of a generation of `p` for `req` on a model with a context of `ctx` positions.
    pub fn new(req: &InferRequest, p: &PreparedInfer, ctx: usize) -> TextStream {
        TextStream {
            stop: req.stop.clone(),
            generated: vec![],
            reported: 0,
            last_possible: most_new_tokens(p.ids.len(), p.max_tokens, ctx),
        }
    }

    /// Takes the next token: reports it through `on_event`, and returns false when a stop string ends the
    /// generation.
    pub fn push(
        &mut self,
        id: u32,
        tok: &bitnode_engine::tokenizer::Tokenizer,
        eos: &[u32],
        on_event: &mut dyn FnMut(JobEvent<'_>),
    ) -> bool {
        self.generated.push(id);
        let last = self.generated.len() >= self.last_possible || eos.contains(&id);
        let Ok(text) = tok.decode(&self.generated) else {
            on_event(JobEvent::Token { id, text: "" });
            return true;
        };
        let (cut, hit) = crate::openai::cut_at_stop(&text, &self.stop);
        let ready = if hit || last {
            cut
        } else if text.ends_with('\u{FFFD}') {
            self.reported
        } else {
            crate::openai::safe_len(&text, &self.stop)
        };
        let reported = self.reported;
        if ready > reported && text.is_char_boundary(reported) && text.is_char_boundary(ready) {
            on_event(JobEvent::Token {
                id,
                text: &text[reported..ready],
            });
            self.reported = ready;
        } else {
            on_event(JobEvent::Token { id, text: "" });
        }
        !hit
    }
}

/// The result of a generation: its text (ending before the first stop string), tokens and speeds.
/// `batch`: the most sequences it decoded with in one step (an engine host's batch; None for a lone run).
pub fn infer_result(
    g: bitnode_engine::session::Generation,
    tok: &bitnode_engine::tokenizer::Tokenizer,
    stop: &[String],
    device: String,
    batch: Option<usize>,
) -> anyhow::Result<InferResult> {
    let text = tok.decode(&g.tokens)?;
    let text = text[..crate::openai::cut_at_stop(&text, stop).0].to_string();
    let n = g.tokens.len();
    Ok(InferResult {
        text,
        tokens: g.tokens,
        prompt_tokens: g.prompt_tokens,
        decode_tokens_per_second: if n > 1 && g.decode_seconds > 0.0 {
            (n - 1) as f64 / g.decode_seconds
        } else {
            0.0
        },
        prefill_tokens_per_second: if g.prefill_seconds > 0.0 {
            g.prompt_tokens as f64 / g.prefill_seconds
        } else {
            0.0
        },
        stop_reason: g.stop_reason.to_string(),
        device,
        batch,
    })
}

/// One generation on an engine already loaded (`bitnode infer` and `job-exec` load one per run; an
/// engine host batches its sequences instead, from the same pieces). `model_dir` holds the chat template.
pub fn infer_on(
    engine: &mut Engine,
    req: &InferRequest,
    model_dir: &Path,
    on_event: &mut dyn FnMut(JobEvent<'_>),
) -> anyhow::Result<InferResult> {
    let p = prepare_infer(engine, req, model_dir)?;
    let mut stream = TextStream::new(req, &p, engine.model.config.max_position_embeddings);
    let delay = test_step_delay();
    let Engine {
        backend,
        model,
        eos,
        tokenizer,
    } = engine;
    let g = bitnode_engine::session::generate(
        backend.as_mut(),
        &model.config,
        eos,
        &p.ids,
        p.max_tokens,
        &p.params,
        req.seed,
        true,
        &mut |id| {
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
            stream.push(id, tokenizer, eos, on_event)
        },
    )?;
    infer_result(g, tokenizer, &req.stop, backend.device_name(), None)
}

fn score(req: &ScoreRequest, paths: &JobPaths, opts: &EngineOptions) -> anyhow::Result<ScoreResult> {
    let mut engine = load_engine(&paths.model, &paths.adapter, opts)?;
    let ids = engine.tokenizer.encode(&req.text)?;
    let (n, total) = engine.score_ids(&ids)?;
    if n == 0 {
        return Err(NothingToScore.into());
    }
    let nll = total / n as f64;
    Ok(ScoreResult {
        tokens: n,
        nll,
        ppl: nll.exp(),
    })
}

fn finetune(
    r: &FinetuneRequest,
    paths: &JobPaths,
    device: &str,
    on_event: &mut dyn FnMut(JobEvent<'_>),
) -> anyhow::Result<Summary> {
    let data = paths
        .data
        .clone()
        .ok_or_else(|| anyhow!("a fine-tune job needs its dataset file (no data path was given)"))?;
    let out = paths
        .out
        .clone()
        .ok_or_else(|| anyhow!("a fine-tune job needs an output directory (no out path was given)"))?;
    let activation = match r.activation.as_deref() {
        Some(a) => Some(
            a.parse::<bitnode_engine::config::Activation>()
                .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let cfg = FinetuneConfig {
        activation,
        model: paths.model.clone(),
        data,
        out,
        init_adapter: paths.adapter.clone(),
        rank: r.rank,
        alpha: r.alpha,
        lora_dropout: r.lora_dropout,
        targets: r.targets.clone(),
        lr: r.lr,
        steps: r.steps,
        epochs: r.epochs,
        batch: r.batch,
        seq_len: r.seq_len,
        grad_accum: r.grad_accum,
        weight_decay: r.weight_decay,
        warmup: r.warmup,
        schedule: schedule(r)?,
        max_grad_norm: r.max_grad_norm,
        shuffle: r.shuffle,
        seed: r.seed,
        val_split: r.val_split,
        save_every: r.save_every,
        resume: paths.resume.clone(),
        device: device.to_string(),
        max_memory: r.max_memory,
    };
    let mut log = match &paths.json_log {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    // Both hooks report through `on_event`; the engine calls them one at a time, never nested.
    let events = std::cell::RefCell::new(on_event);
    let mut on_step = |s: &StepLog, total: usize| {
        if let Some(w) = log.as_mut() {
            let v = serde_json::json!({"step": s.step, "loss": s.loss, "lr": s.lr, "tokens": s.tokens,
                "tokens_per_second": s.tokens_per_second, "elapsed_s": s.elapsed_s, "grad_norm": s.grad_norm});
            // The log is a convenience: a full disk must not end the run.
            let _ = writeln!(w, "{v}");
            let _ = w.flush();
        }
        (*events.borrow_mut())(JobEvent::Step {
            step: s.step,
            total,
            loss: s.loss,
            lr: s.lr,
            tokens_per_second: s.tokens_per_second,
            elapsed_s: s.elapsed_s,
        });
    };
    let mut on_checkpoint = |step: usize, dir: &Path| (*events.borrow_mut())(JobEvent::Checkpoint { step, dir });
    Ok(bitnode_engine::finetune::finetune_with(
        &cfg,
        &mut on_step,
        &mut on_checkpoint,
    )?)
}

/// Bytes per token assumed where a text's length stands in for its token count (Llama-3's BPE averages
/// about four bytes of English per token); [`estimate`] loads no tokenizer.
const BYTES_PER_TOKEN: u64 = 4;

/// Tokens per chunk of the GPU forward's activation buffers (its upper bound).
const FORWARD_CHUNK: u64 = 512;

/// What a job needs, for the scheduler.
///
/// - `model_bytes`: the total size of the model directory's regular files (what a transfer would move).
/// - `memory_bytes`:
///   - finetune: the GPU trainer's own planner (`gpu::train::plan`) for sequences of the spec's `seq_len`,
///     one per pass (the least a device must hold to run the job fast; a larger device batches them),
///     with no budget (every activation kept, the whole head at once, f32 embedding: the fastest plan),
///     over the adapter the run would start from (a fresh `Adapter::init` or the loaded init adapter);
///   - infer / score: the GPU forward's allocations, estimated from the model: ternary weights with their
///     row scales and the norms; the embedding and (untied) lm_head at f32 (the upper bound: `auto` picks
///     f16 on adapters with shader-f16); the KV cache (f32 K and V per layer) for prompt + max_tokens
///     positions (score: one context window), rounded up to 64 as the backend does; activation buffers
///     for a 512-token chunk and 32 rows of logits (plus their readback); and an adapter's parameters
///     at f32.
/// - `ops`: 2 x parameters x tokens (x3 for training: forward plus twice its cost for the backward), with
///   tokens = prompt + max_tokens (infer), the text's tokens (score), or steps x batch x grad_accum x
///   seq_len (finetune), else, without a step count, the dataset's tokens x epochs (default 1). Texts are
///   not tokenized: their tokens are taken as bytes / 4.
pub fn estimate(
    spec: &JobSpec,
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    data_path: Option<&Path>,
) -> anyhow::Result<crate::schedule::Need> {
    validate(spec)?;
    let sizing = ModelSizing::read(model_dir)?;
    let lora = sizing.lora_bytes(adapter_dir)?;
    match spec {
        JobSpec::Infer(r) => Ok(sizing.need(r.prompt.len() as u64, r.max_tokens as u64, lora)),
        JobSpec::Score(r) => Ok(sizing.need(r.text.len() as u64, 0, lora)),
        JobSpec::Finetune(r) => {
            let model_bytes = sizing.model_bytes;
            let model = Model::load(model_dir).with_context(|| format!("loading model {}", model_dir.display()))?;
            let cfg = &model.config;
            let params = model.num_params() as f64;
            let adapter = match (&r.init_adapter, adapter_dir) {
                (Some(_), Some(d)) => {
                    Adapter::load(d, cfg).with_context(|| format!("loading adapter {}", d.display()))?
                }
                (Some(n), None) => bail!("the job names the init adapter {n:?}, but no adapter directory was given"),
                (None, _) => {
                    let targets: Vec<&str> = r.targets.iter().map(String::as_str).collect();
                    Adapter::init(cfg, r.rank, r.alpha, &targets, r.seed)?
                }
            };
            let plan = bitnode_engine::gpu::train::plan(&model, &adapter, r.seq_len, 1, None)?;
            let tokens = match r.steps {
                Some(s) => s as f64 * r.batch as f64 * r.grad_accum as f64 * r.seq_len as f64,
                None => {
                    let bytes = match data_path {
                        Some(p) => std::fs::metadata(p)
                            .with_context(|| format!("reading {}", p.display()))?
                            .len(),
                        None => r.data.len() as u64,
                    };
                    (bytes / BYTES_PER_TOKEN) as f64 * r.epochs.unwrap_or(1.0)
                }
            };
            Ok(crate::schedule::Need {
                memory_bytes: plan.total,
                ops: 3.0 * 2.0 * params * tokens,
                model_bytes,
            })
        }
    }
}

/// What the scheduler's estimate of an inference or a score needs to know of a model. Reading it loads the
/// model (which converts every projection: seconds for the 2B-4T shape), so the HTTP API reads it once
/// per model and keeps it; `estimate` reads it each time.
#[derive(Debug, Clone)]
pub struct ModelSizing {
    pub model_bytes: u64,
    params: f64,
    config: bitnode_engine::config::ModelConfig,
    ternary_bytes: u64,
    tied: bool,
}

impl ModelSizing {
    pub fn read(model_dir: &Path) -> anyhow::Result<ModelSizing> {
        let model_bytes = dir_bytes(model_dir)?;
        let model = Model::load(model_dir).with_context(|| format!("loading model {}", model_dir.display()))?;
        Ok(ModelSizing {
            model_bytes,
            params: model.num_params() as f64,
            ternary_bytes: model.ternary_bytes() as u64,
            tied: model.tied(),
            config: model.config.clone(),
        })
    }

    /// The f32 bytes of a LoRA adapter's weights (0 without one).
    pub fn lora_bytes(&self, adapter_dir: Option<&Path>) -> anyhow::Result<u64> {
        Ok(match adapter_dir {
            Some(d) => {
                let a = Adapter::load(d, &self.config).with_context(|| format!("loading adapter {}", d.display()))?;
                4 * a.num_params() as u64
            }
            None => 0,
        })
    }

    /// An inference over `text_bytes` of prompt making `new_tokens` (a score: 0 new tokens).
    pub fn need(&self, text_bytes: u64, new_tokens: u64, lora_bytes: u64) -> crate::schedule::Need {
        let tokens = (text_bytes.div_ceil(BYTES_PER_TOKEN) + 1).saturating_add(new_tokens);
        let ctx = self.config.max_position_embeddings as u64;
        crate::schedule::Need {
            memory_bytes: self.forward_bytes(tokens.min(ctx)) + lora_bytes,
            ops: 2.0 * self.params * tokens as f64,
            model_bytes: self.model_bytes,
        }
    }

    /// The inference forward's device memory for a cache of `positions`.
    fn forward_bytes(&self, positions: u64) -> u64 {
        let c = &self.config;
        let (h, f, v) = (c.hidden_size as u64, c.intermediate_size as u64, c.vocab_size as u64);
        let qd = (c.num_heads * c.head_dim) as u64;
        let kvd = (c.num_kv_heads * c.head_dim) as u64;
        let layers = c.num_layers as u64;
        let scales: u64 = 4 * layers * (qd + 2 * kvd + h + 2 * f + h);
        let norms = 4 * (layers * (2 * h + qd + f) + h);
        let weights = self.ternary_bytes + scales + norms;
        let table = 4 * v * h;
        let tables = if self.tied { table } else { 2 * table };
        let cap = (positions.max(1).div_ceil(64) * 64).min((c.max_position_embeddings as u64).max(positions));
        let kv = 2 * layers * kvd * cap * 4;
        let t = FORWARD_CHUNK;
        // x and its copy, the quantized input, q|k|v, attention out, gate and up, and a few per-token scalars.
        let per_token = 4 * 2 * h + h.max(f).max(qd) + 4 * (qd + 2 * kvd) + 4 * qd + 4 * 2 * f + 4 * 8;
        // 32 rows of logits on the device and as many in the readback buffer.
        let logits = 2 * 32 * v * 4;
        weights + tables + kv + t * per_token + logits
    }
}

/// Total bytes of a directory's regular files (not hidden ones, as the model store counts them), or the
/// size of a single-file model (a GGUF).
fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    if dir.is_file() {
        return Ok(std::fs::metadata(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .len());
    }
    let mut total = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        // metadata() follows symlinks: a model linked in from elsewhere still counts its real size.
        let m = std::fs::metadata(e.path()).with_context(|| format!("reading {}", e.path().display()))?;
        if m.is_file() {
            total += m.len();
        }
    }
    Ok(total)
}

/// `DIR/job.json`: what `bitnode job-exec --dir DIR` runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecFile {
    pub spec: JobSpec,
    pub paths: JobPaths,
}

/// The file [`ExecFile`] lives in under a job directory.
pub const EXEC_FILE: &str = "job.json";

/// Writes `dir/job.json` (atomically, 0600: it may hold the user's prompt; not synced to disk: the job's
/// directory is laid out again whenever the job starts).
pub fn write_exec_file(dir: &Path, f: &ExecFile) -> anyhow::Result<()> {
    let text = serde_json::to_vec(f).context("encoding job.json")?;
    crate::fsutil::write_private_scratch(&dir.join(EXEC_FILE), &text)
}

/// Reads `dir/job.json`.
pub fn read_exec_file(dir: &Path) -> anyhow::Result<ExecFile> {
    let p = dir.join(EXEC_FILE);
    let text = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{}: not a job file", p.display()))
}

/// One line of `bitnode job-exec`'s stdout (one JSON object per line): the job's events as they happen,
/// then exactly one `result` (exit 0) or `error` (exit 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ExecLine {
    /// See [`JobEvent::Token`].
    Token { id: u32, text: String },
    Step {
        step: usize,
        total: usize,
        loss: f64,
        lr: f64,
        tokens_per_second: f64,
        elapsed_s: f64,
    },
    /// A complete checkpoint; `dir` is absolute.
    Checkpoint { step: usize, dir: String },
    /// What [`run_job`] returned.
    Result { result: serde_json::Value },
    /// The job failed: the error with its causes (`{:#}`).
    Error { reason: String },
    /// An engine host finished the job it was given (after its Result or Error) and takes the next.
    End,
}

impl ExecLine {
    /// The line for an event; a checkpoint's directory is made absolute, since the reader's working
    /// directory may differ.
    pub fn from_event(e: &JobEvent<'_>) -> ExecLine {
        match *e {
            JobEvent::Token { id, text } => ExecLine::Token {
                id,
                text: text.to_string(),
            },
            JobEvent::Step {
                step,
                total,
                loss,
                lr,
                tokens_per_second,
                elapsed_s,
            } => ExecLine::Step {
                step,
                total,
                loss,
                lr,
                tokens_per_second,
                elapsed_s,
            },
            JobEvent::Checkpoint { step, dir } => ExecLine::Checkpoint {
                step,
                dir: std::path::absolute(dir)
                    .unwrap_or_else(|_| dir.to_path_buf())
                    .to_string_lossy()
                    .into_owned(),
            },
        }
    }
}

/// Writes `line` as one line of JSON and flushes, so the reader sees it at once.
pub fn write_line(out: &mut dyn Write, line: &ExecLine) -> std::io::Result<()> {
    // An ExecLine is strings, numbers and a JSON value: it always encodes.
    let text = serde_json::to_string(line).map_err(std::io::Error::other)?;
    writeln!(out, "{text}")?;
    out.flush()
}

/// `bitnode job-exec --dir DIR`: runs `DIR/job.json` and writes [`ExecLine`]s to `out`, flushing after each,
/// so the daemon sees progress as it happens. Returns the job's error after reporting it as an `error` line.
pub fn exec_dir(dir: &Path, engine: &EngineOptions, device: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    let res = read_exec_file(dir).and_then(|f| {
        run_job(&f.spec, &f.paths, engine, device, &mut |e| {
            // A reader that went away is noticed at the result line; the job itself need not stop for it.
            let _ = write_line(&mut *out, &ExecLine::from_event(&e));
        })
    });
    match res {
        Ok(result) => {
            write_line(out, &ExecLine::Result { result }).context("writing the result")?;
            Ok(())
        }
        Err(e) => {
            let _ = write_line(
                out,
                &ExecLine::Error {
                    reason: format!("{e:#}"),
                },
            );
            Err(e)
        }
    }
}

/// Also the engine host's tests' (`crate::host`) helpers.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bitnode_engine::synth::{self, SynthFormat};

    /// A fresh directory for one test.
    pub(crate) fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bitnode-exec-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    pub(crate) fn tiny(name: &str) -> PathBuf {
        let d = tmp(name).join("model");
        synth::synth(synth::preset("tiny").expect("preset"), &d, 0, SynthFormat::Packed).expect("synth");
        d
    }

    pub(crate) fn cpu() -> EngineOptions {
        EngineOptions {
            adapter: Some("cpu".into()),
            ..Default::default()
        }
    }

    /// A greedy inference of `prompt` on `model`.
    pub(crate) fn infer_request(model: &Path, prompt: &str, max_tokens: usize) -> InferRequest {
        InferRequest {
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
        }
    }

    fn infer_spec(model: &Path) -> JobSpec {
        JobSpec::Infer(infer_request(model, "The mesh of my own devices", 8))
    }

    fn finetune_spec(model: &Path, steps: usize) -> FinetuneRequest {
        FinetuneRequest {
            model: model.display().to_string(),
            data_name: "d.jsonl".into(),
            data: vec![],
            init_adapter: None,
            rank: 4,
            alpha: 8.0,
            lora_dropout: None,
            targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
            lr: 1e-2,
            steps: Some(steps),
            epochs: None,
            batch: 1,
            seq_len: 32,
            grad_accum: 1,
            weight_decay: 0.0,
            warmup: 1,
            schedule: "cosine".into(),
            max_grad_norm: Some(1.0),
            shuffle: true,
            seed: 3,
            val_split: 0.0,
            save_every: Some(2),
            max_memory: None,
            activation: None,
        }
    }

    fn dataset(dir: &Path) -> PathBuf {
        let p = dir.join("d.jsonl");
        let lines: Vec<String> = (0..8)
            .map(|i| {
                serde_json::json!({"text": format!("Line {i}: the river runs past the old mill at the edge of town.")})
                    .to_string()
            })
            .collect();
        std::fs::write(&p, lines.join("\n")).expect("write data");
        p
    }

    #[test]
    fn infer_streams_tokens_that_add_up_to_the_result() {
        let m = tiny("infer");
        let mut ids = vec![];
        let mut streamed = String::new();
        let v = run_job(&infer_spec(&m), &JobPaths::model(&m), &cpu(), "cpu", &mut |e| {
            if let JobEvent::Token { id, text } = e {
                ids.push(id);
                streamed.push_str(text);
            }
        })
        .expect("infer");
        let res: InferResult = serde_json::from_value(v).expect("an InferResult");
        assert!(!res.tokens.is_empty() && res.tokens.len() <= 8, "{:?}", res.tokens);
        assert_eq!(res.tokens, ids, "one Token event per generated token");
        assert_eq!(streamed, res.text);
        assert!(res.prompt_tokens >= 2);
        // The fast CPU backend (`--device cpu`), named with its code path and threads.
        assert!(res.device.starts_with("cpu ("), "{}", res.device);

        // A max_tokens past any context (as a job from elsewhere may ask) runs until the context is full.
        let JobSpec::Infer(mut r) = infer_spec(&m) else {
            unreachable!("infer_spec makes an infer job")
        };
        r.max_tokens = usize::MAX;
        r.prompt = "a b c d e f g h i j k l m n o p q r s t u v w x y z ".repeat(4);
        let (mut n, mut streamed) = (0, String::new());
        let v = run_job(&JobSpec::Infer(r), &JobPaths::model(&m), &cpu(), "cpu", &mut |e| {
            if let JobEvent::Token { text, .. } = e {
                n += 1;
                streamed.push_str(text);
            }
        })
        .expect("infer to the context");
        if v["stop_reason"] == "context" {
            let prompt = v["prompt_tokens"].as_u64().expect("prompt_tokens") as usize;
            assert_eq!(n, 256 - prompt + 1, "the prefill's token, then one per free position");
        }
        assert_eq!(streamed, v["text"].as_str().expect("text"));
    }

    #[test]
    fn finetune_reports_steps_and_checkpoints_and_resumes_exactly() {
        let m = tiny("ft");
        let root = tmp("ft-run");
        let data = dataset(&root);
        let spec = JobSpec::Finetune(Box::new(finetune_spec(&m, 4)));
        let paths = |out: &str, resume: Option<PathBuf>| JobPaths {
            data: Some(data.clone()),
            out: Some(root.join(out)),
            resume,
            json_log: Some(root.join(format!("{out}.log"))),
            ..JobPaths::model(&m)
        };
        let mut steps = vec![];
        let mut checkpoints = vec![];
        let v = run_job(&spec, &paths("a", None), &cpu(), "cpu", &mut |e| match e {
            JobEvent::Step { step, total, loss, .. } => {
                assert_eq!(total, 4);
                assert!(loss.is_finite());
                steps.push(step);
            }
            JobEvent::Checkpoint { step, dir } => {
                assert!(dir.join("trainer_state.json").is_file(), "complete when reported");
                checkpoints.push((step, dir.to_path_buf()));
            }
            JobEvent::Token { .. } => panic!("a fine-tune made a token"),
        })
        .expect("finetune");
        assert_eq!(steps, vec![1, 2, 3, 4]);
        assert_eq!(checkpoints, vec![(2, root.join("a").join("checkpoint-2"))]);
        assert_eq!(v["steps"], 4);
        assert_eq!(v["device"], "cpu reference");
        let log = std::fs::read_to_string(root.join("a.log")).expect("json log");
        assert_eq!(log.lines().count(), 4);

        let mut resumed = vec![];
        run_job(
            &spec,
            &paths("b", Some(checkpoints[0].1.clone())),
            &cpu(),
            "cpu",
            &mut |e| {
                if let JobEvent::Step { step, .. } = e {
                    resumed.push(step);
                }
            },
        )
        .expect("resume");
        assert_eq!(resumed, vec![3, 4]);
        let read = |d: &str| std::fs::read(root.join(d).join("adapter_model.safetensors")).expect("adapter");
        assert_eq!(read("a"), read("b"), "a resumed run ends at the same adapter");
    }

    #[test]
    fn estimate_uses_the_planner_and_counts_the_model() {
        let m = tiny("estimate");
        let need = estimate(&infer_spec(&m), &m, None, None).expect("infer estimate");
        assert!(need.memory_bytes > 0 && need.ops > 0.0 && need.model_bytes > 0);
        let files: u64 = std::fs::read_dir(&m)
            .expect("model dir")
            .map(|e| e.expect("entry").metadata().expect("metadata").len())
            .sum();
        assert_eq!(need.model_bytes, files);

        let score = JobSpec::Score(ScoreRequest {
            model: "m".into(),
            adapter: None,
            text: "word ".repeat(100),
        });
        let s = estimate(&score, &m, None, None).expect("score estimate");
        assert!(s.memory_bytes > 0 && s.ops > 0.0);

        let r = finetune_spec(&m, 4);
        let need = estimate(&JobSpec::Finetune(Box::new(r.clone())), &m, None, None).expect("finetune estimate");
        let model = Model::load(&m).expect("model");
        let targets: Vec<&str> = r.targets.iter().map(String::as_str).collect();
        let adapter = Adapter::init(&model.config, r.rank, r.alpha, &targets, r.seed).expect("adapter");
        let plan = bitnode_engine::gpu::train::plan(&model, &adapter, r.seq_len, 1, None).expect("plan");
        assert_eq!(need.memory_bytes, plan.total);
        assert_eq!(need.ops, 6.0 * model.num_params() as f64 * (4 * 32) as f64);
        // Without a step count the dataset's size stands in for the tokens.
        let mut by_data = r;
        by_data.steps = None;
        let root = tmp("estimate-data");
        let d = dataset(&root);
        let n = estimate(&JobSpec::Finetune(Box::new(by_data)), &m, None, Some(&d)).expect("by data");
        assert!(n.ops > 0.0);
    }

    #[test]
    fn bad_specs_are_refused_with_clear_errors() {
        let m = Path::new("/nonexistent-model");
        let base = finetune_spec(m, 4);
        // Each case: a change to a good spec, and what the error must say.
        type Edit = fn(&mut FinetuneRequest);
        let cases: Vec<(Edit, &str)> = vec![
            (|r| r.schedule = "sawtooth".into(), "unknown schedule"),
            (|r| r.rank = 0, "rank must be at least 1"),
            (|r| r.seq_len = 0, "--seq-len must be at least 2"),
            (|r| r.batch = 0, "--batch and --grad-accum"),
            (|r| r.steps = Some(usize::MAX), "too large"),
            (|r| r.lr = f64::NAN, "--lr"),
            (|r| r.epochs = Some(f64::INFINITY), "--epochs must be finite"),
            (|r| r.max_grad_norm = Some(0.0), "--max-grad-norm"),
            (|r| r.lora_dropout = Some(1.0), "--lora-dropout"),
            (|r| r.val_split = -0.5, "--val-split"),
            (
                |r| {
                    r.data = b"x".to_vec();
                    r.data_name = "../../etc/passwd".into();
                },
                "not a plain file name",
            ),
        ];
        for (edit, needle) in cases {
            let mut r = base.clone();
            edit(&mut r);
            let spec = JobSpec::Finetune(Box::new(r));
            let e = run_job(&spec, &JobPaths::model(m), &cpu(), "cpu", &mut |_| {}).expect_err(needle);
            assert!(format!("{e:#}").contains(needle), "{e:#} lacks {needle:?}");
            assert!(estimate(&spec, m, None, None).is_err());
        }
        let JobSpec::Infer(mut r) = infer_spec(m) else {
            unreachable!("infer_spec makes an infer job")
        };
        r.top_p = 0.0;
        let e = run_job(&JobSpec::Infer(r), &JobPaths::model(m), &cpu(), "cpu", &mut |_| {}).expect_err("top-p");
        assert!(format!("{e}").contains("--top-p"), "{e}");
        // An adapter the spec names must be provided.
        let JobSpec::Infer(mut r) = infer_spec(m) else {
            unreachable!("infer_spec makes an infer job")
        };
        r.adapter = Some("sha256-of-an-adapter".into());
        let e = run_job(&JobSpec::Infer(r), &JobPaths::model(m), &cpu(), "cpu", &mut |_| {}).expect_err("adapter");
        assert!(format!("{e}").contains("no adapter directory"), "{e}");
    }

    #[test]
    fn job_exec_lines_and_files_round_trip() {
        let dir = tmp("exec-file");
        let f = ExecFile {
            spec: JobSpec::Score(ScoreRequest {
                model: "m".into(),
                adapter: None,
                text: "hello".into(),
            }),
            paths: JobPaths::model("/models/m"),
        };
        write_exec_file(&dir, &f).expect("write");
        let back = read_exec_file(&dir).expect("read");
        assert_eq!(back.spec, f.spec);
        assert_eq!(back.paths.model, f.paths.model);

        let line = |l: &ExecLine| serde_json::to_value(l).expect("encodes");
        assert_eq!(
            line(&ExecLine::Token {
                id: 5,
                text: "he".into()
            }),
            serde_json::json!({"event": "token", "id": 5, "text": "he"})
        );
        let step = ExecLine::Step {
            step: 3,
            total: 40,
            loss: 2.1,
            lr: 0.0002,
            tokens_per_second: 850.0,
            elapsed_s: 1.2,
        };
        assert_eq!(
            line(&step),
            serde_json::json!({"event": "step", "step": 3, "total": 40, "loss": 2.1, "lr": 0.0002,
                "tokens_per_second": 850.0, "elapsed_s": 1.2})
        );
        let ck = ExecLine::from_event(&JobEvent::Checkpoint {
            step: 10,
            dir: Path::new("rel/checkpoint-10"),
        });
        let ExecLine::Checkpoint { dir, .. } = &ck else {
            unreachable!("a checkpoint event makes a checkpoint line")
        };
        assert!(Path::new(dir).is_absolute(), "{dir}");
        assert_eq!(
            line(&ExecLine::Error { reason: "no".into() }),
            serde_json::json!({"event": "error", "reason": "no"})
        );
        for l in [
            step,
            ck,
            ExecLine::Result {
                result: serde_json::json!({"tokens": 3}),
            },
        ] {
            let text = serde_json::to_string(&l).expect("encodes");
            assert_eq!(serde_json::from_str::<ExecLine>(&text).expect("decodes"), l);
        }

        // A job directory without a job file: an error line, then the error.
        let mut out = vec![];
        let empty = tmp("exec-empty");
        assert!(exec_dir(&empty, &cpu(), "cpu", &mut out).is_err());
        let text = String::from_utf8(out).expect("utf-8");
        let l: ExecLine = serde_json::from_str(text.trim()).expect("one line");
        assert!(matches!(l, ExecLine::Error { reason } if reason.contains("job.json")));
    }

    #[test]
    fn a_gguf_file_runs_infer_score_and_finetune_like_its_twin_directory() {
        // The GGUF fixture and the safetensors directory holding the same weights (tests/fixtures/gguf_model).
        let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf_model");
        let (file, twin) = (fx.join("tq2_0.gguf"), fx.join("twin"));
        let infer = |m: &Path| {
            let spec = JobSpec::Infer(infer_request(m, "The quick brown fox", 6));
            run_job(&spec, &JobPaths::model(m), &cpu(), "cpu", &mut |_| {}).expect("infer")
        };
        assert_eq!(infer(&file)["tokens"], infer(&twin)["tokens"]);
        let score = |m: &Path| {
            let spec = JobSpec::Score(ScoreRequest {
                model: m.display().to_string(),
                adapter: None,
                text: "the quick brown fox jumps over the lazy dog".into(),
            });
            run_job(&spec, &JobPaths::model(m), &cpu(), "cpu", &mut |_| {}).expect("score")
        };
        assert_eq!(score(&file)["nll"], score(&twin)["nll"]);
        // The sizing the scheduler plans with counts the file itself.
        let sizing = ModelSizing::read(&file).expect("sizing");
        assert_eq!(sizing.model_bytes, std::fs::metadata(&file).expect("size").len());
        let root = tmp("gguf-ft");
        let data = dataset(&root);
        let spec = JobSpec::Finetune(Box::new(finetune_spec(&file, 2)));
        let paths = JobPaths {
            data: Some(data),
            out: Some(root.join("out")),
            ..JobPaths::model(&file)
        };
        run_job(&spec, &paths, &cpu(), "cpu", &mut |_| {}).expect("finetune on a GGUF file");
        assert!(root.join("out").join("adapter_model.safetensors").is_file());
    }

    #[test]
    fn job_exec_runs_a_score_job() {
        let m = tiny("exec-score");
        let dir = tmp("exec-score-job");
        let f = ExecFile {
            spec: JobSpec::Score(ScoreRequest {
                model: "tiny".into(),
                adapter: None,
                text: "the quick brown fox jumps over the lazy dog".into(),
            }),
            paths: JobPaths::model(&m),
        };
        write_exec_file(&dir, &f).expect("write");
        let mut out = vec![];
        exec_dir(&dir, &cpu(), "cpu", &mut out).expect("runs");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<ExecLine> = text.lines().map(|l| serde_json::from_str(l).expect("a line")).collect();
        let [ExecLine::Result { result }] = lines.as_slice() else {
            panic!("one result line: {text}")
        };
        assert!(result["tokens"].as_u64().is_some_and(|n| n > 1) && result["nll"].as_f64().is_some());
    }
}
