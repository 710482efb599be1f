//! The command line's arguments (clap). Each command's handler is in `local.rs` (this device alone) or
//! `mesh.rs` (through the daemon).
use bitnode_engine::session::EmbedDtype;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "bitnode",
    version,
    about = "A private compute mesh of your own devices for 1.58-bit LLMs"
)]
pub struct Cli {
    /// bitnode home (identity, config, jobs). Default: $BITNODE_HOME, else the platform data directory.
    #[arg(long, global = true, env = "BITNODE_HOME")]
    pub home: Option<PathBuf>,
    /// Log format for stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Args, Clone, Default)]
pub struct DeviceArgs {
    /// Compute device: auto (discrete, then integrated, then virtual GPU, then the CPU reference), gpu (the
    /// best wgpu adapter, software Vulkan such as lavapipe included), cpu, an index from `bitnode devices`,
    /// or part of an adapter name.
    #[arg(long = "device", env = "BITNODE_ADAPTER")]
    pub device: Option<String>,
    /// Largest buffer/binding to create, in bytes (lower than the adapter's limit to force tiling).
    #[arg(long, env = "BITNODE_MAX_BINDING")]
    pub max_binding: Option<u64>,
    /// Embedding / lm_head storage on the device: auto (f16 where the adapter has shader-f16), f16, f32.
    #[arg(long, env = "BITNODE_EMBED_DTYPE")]
    pub embed_dtype: Option<EmbedDtype>,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Generate text from a prompt, streaming it as it is produced.
    Infer(InferArgs),
    /// Mean negative log-likelihood (nats/token) and perplexity of a text file.
    Score(ScoreArgs),
    /// Model utilities.
    Model {
        #[command(subcommand)]
        cmd: ModelCmd,
    },
    /// Benchmarks (results go to BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
    /// List compute adapters with backend, type, limits and features.
    Devices {
        #[arg(long)]
        json: bool,
    },
    /// LoRA adapter utilities.
    Adapter {
        #[command(subcommand)]
        cmd: AdapterCmd,
    },
    /// LoRA fine-tuning; writes a PEFT-compatible adapter directory (and loss.svg) to --out.
    Finetune(Box<FinetuneArgs>),
    /// Create this device's identity (ed25519, stored 0600) and a commented config.toml.
    Init {
        /// Name shown to paired peers (default: the host name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Print this device's peer id.
    Id,
    /// Run the daemon: join the private mesh, advertise capabilities, serve the control socket.
    Start {
        /// Listen multiaddr (repeatable); replaces `[network] listen`.
        #[arg(long)]
        listen: Vec<String>,
        /// Serve as the relay of the owner's mesh (paired peers only); same as `[relay] enabled = true`.
        #[arg(long)]
        relay_server: bool,
        /// Take no jobs from other devices; same as `[jobs] accept_remote = false` (for a relay that
        /// should only relay: it advertises this, and schedulers pass it over).
        #[arg(long)]
        no_remote_jobs: bool,
        /// Where the OpenAI-compatible HTTP API listens (host:port, port 0 for any, or "off"); replaces
        /// `[api] listen`.
        #[arg(long)]
        api_listen: Option<String>,
    },
    /// Stop the running daemon (as SIGTERM does: connections closed, socket removed).
    Stop,
    /// The running daemon's state.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Paired peers: connection, round trip and capabilities.
    Peers {
        #[arg(long)]
        json: bool,
    },
    /// Pair devices: invite codes, manual pairing by peer id, and the trust list.
    Pair {
        #[command(subcommand)]
        cmd: PairCmd,
    },
    /// Run an infer, score or finetune job on the mesh: the strongest paired device that fits (or --to).
    Submit {
        #[command(subcommand)]
        cmd: SubmitCmd,
    },
    /// Chat in the terminal with a model, through the mesh: each turn goes to the best device (or --to),
    /// streamed, and the conversation is kept.
    Chat(ChatArgs),
    /// This node's jobs (submitted here or run here), newest first.
    Jobs {
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        cmd: Option<JobsCmd>,
    },
    /// Three real daemons on loopback (phone, laptop, desktop): pairing, a delegated fine-tune, inference.
    Demo {
        /// Keep the devices' homes (logs, job tables) instead of removing them.
        #[arg(long)]
        keep: bool,
    },
    /// Run DIR/job.json (written by the daemon) and print its events as JSON lines: the daemon runs each
    /// job in a child process this way.
    #[command(hide = true)]
    JobExec {
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        dev: DeviceArgs,
    },
    /// Keep inference engines warm and run the daemon's inference jobs on them (`crate::host`): job
    /// directories in on stdin, their events out on stdout.
    #[command(hide = true)]
    EngineHost {
        /// Bytes of models kept loaded at once (least recently used out first).
        #[arg(long)]
        budget: u64,
        /// An engine unused this long is dropped.
        #[arg(long)]
        idle_secs: u64,
        /// Most generations one engine decodes together in a step (continuous batching).
        #[arg(long, default_value_t = 16)]
        max_batch: usize,
        #[command(flatten)]
        dev: DeviceArgs,
    },
}

#[derive(Args)]
pub struct InferArgs {
    /// Model directory, or a BitNet GGUF file (TQ1_0, TQ2_0, I2_S). Default: a built-in random `tiny` model, synthesized into the bitnode home on first use.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The FFN activation, overriding the one the model's files imply: relu2 or silu (README, "GGUF
    /// models"; for a GGUF file whose vocabulary misleads the rule).
    #[arg(long)]
    pub activation: Option<bitnode_engine::config::Activation>,
    /// A LoRA adapter: a PEFT directory, or a llama.cpp LoRA GGUF file (`bitnode adapter export`).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    /// 1.0 disables top-p.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 1.0 disables the penalty.
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print a JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

#[derive(Args)]
pub struct ScoreArgs {
    /// Model directory, or a BitNet GGUF file (TQ1_0, TQ2_0, I2_S). Default: the built-in `tiny` model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The FFN activation, overriding the one the model's files imply: relu2 or silu (README, "GGUF
    /// models"; for a GGUF file whose vocabulary misleads the rule).
    #[arg(long)]
    pub activation: Option<bitnode_engine::config::Activation>,
    /// A LoRA adapter: a PEFT directory, or a llama.cpp LoRA GGUF file.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub text_file: PathBuf,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

/// Where `bitnode submit` sends a job, and how it waits.
#[derive(Args, Clone)]
pub struct SubmitArgs {
    /// auto (the strongest device that fits), local (this device), or a paired peer's name or id.
    #[arg(long, default_value = "auto")]
    pub to: String,
    /// Return at once with the job id instead of streaming until the job ends.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Subcommand)]
pub enum SubmitCmd {
    /// `bitnode infer` on the mesh.
    Infer {
        #[command(flatten)]
        args: InferArgs,
        #[command(flatten)]
        submit: SubmitArgs,
    },
    /// `bitnode score` on the mesh.
    Score {
        #[command(flatten)]
        args: ScoreArgs,
        #[command(flatten)]
        submit: SubmitArgs,
    },
    /// `bitnode finetune` on the mesh; the adapter lands in --out on this device.
    Finetune {
        #[command(flatten)]
        args: Box<FinetuneArgs>,
        #[command(flatten)]
        submit: SubmitArgs,
    },
}

#[derive(Subcommand)]
pub enum JobsCmd {
    /// One job: state, where it ran and why, earlier attempts, the result.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running job (on whichever device runs it).
    Cancel { id: String },
    /// Re-attach this terminal to a job's stream (after a restart or a `--detach`) until it ends.
    Follow {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct FinetuneArgs {
    /// Model directory, or a BitNet GGUF file (TQ1_0, TQ2_0, I2_S).
    #[arg(long)]
    pub model: PathBuf,
    /// The FFN activation, overriding the one the model's files imply: relu2 or silu (README, "GGUF
    /// models"; for a GGUF file whose vocabulary misleads the rule).
    #[arg(long)]
    pub activation: Option<bitnode_engine::config::Activation>,
    /// .txt (one document), or .jsonl with {"text"}, {"prompt","completion"} or {"messages"} per line.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Start from this adapter (a PEFT directory or a llama.cpp LoRA GGUF file) instead of a fresh one.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f32,
    /// Dropout on the LoRA branch's input (PEFT's lora_dropout), 0 to 1.
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub targets: Vec<String>,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Optimizer steps (default: one epoch).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    #[arg(long)]
    pub epochs: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Tokens per sequence (default: 512, or the model's context if shorter).
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    #[arg(long, default_value = "constant", value_parser = ["constant", "linear", "cosine"])]
    pub schedule: String,
    /// Clip gradients to this global norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    #[arg(long)]
    pub no_shuffle: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fraction of the examples held out for an eval loss.
    #[arg(long, default_value_t = 0.0)]
    pub val_split: f64,
    /// Write a checkpoint (adapter, optimizer moments, step) every N steps to OUT/checkpoint-N.
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Continue from a checkpoint directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Device-memory budget of the GPU trainer (bytes, or 3GiB, 1500MiB, 3GB): the planner picks how many
    /// of a batch's sequences run in one pass, gradient checkpointing and the head's token chunk to fit,
    /// and refuses before the first step if nothing does.
    /// Default: the GPU's memory where the platform reports it.
    #[arg(long, value_parser = parse_byte_count)]
    pub max_memory: Option<u64>,
    /// One JSON object per step: {step, loss, lr, tokens, tokens_per_second, elapsed_s}.
    #[arg(long)]
    pub json_log: Option<PathBuf>,
    /// Print the run's summary as one JSON object on the last line (steps, losses, eval losses, examples,
    /// adapter directory, device, memory plan and peak).
    #[arg(long)]
    pub json: bool,
    /// Where to train: auto (a hardware GPU, else the CPU reference), gpu (any wgpu adapter, lavapipe
    /// included), cpu, an index from `bitnode devices`, or part of an adapter name.
    #[arg(long = "device", env = "BITNODE_ADAPTER", default_value = "auto")]
    pub device: String,
}

#[derive(Subcommand)]
pub enum PairCmd {
    /// Print a one-time invite code (and a QR code) for another device to join.
    Invite {
        /// How long the code stays valid: 90s, 10m, 2h, 1d.
        #[arg(long, default_value = "10m")]
        ttl: String,
        #[arg(long)]
        json: bool,
    },
    /// Pair with the device that printed CODE.
    Join {
        code: String,
        #[arg(long)]
        json: bool,
    },
    /// Trust PEER_ID directly (run it on both devices).
    Add {
        peer_id: String,
        #[arg(long)]
        name: Option<String>,
        /// A multiaddr to reach it at (repeatable).
        #[arg(long)]
        addr: Vec<String>,
    },
    /// List paired peers.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Unpair a peer (by peer id or name) and drop its connections at once.
    Remove { peer: String },
}

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Write a random BitNet model in the real file layout, with a tokenizer.
    Synth {
        #[arg(long, value_parser = ["tiny", "125m", "1b", "2b4t"])]
        preset: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// online: latent bf16 weights; packed: uint8 + weight_scale (as microsoft/bitnet-b1.58-2B-4T).
        #[arg(long, default_value = "packed", value_parser = ["online", "packed"])]
        format: String,
    },
    /// Import a model (or LoRA adapter) directory into this device's store under a name: the name the
    /// HTTP API's `model` (or `adapter`) field takes. Works with or without a running daemon.
    Add {
        dir: PathBuf,
        /// Default: the directory's name.
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Write a Hugging Face BitNet directory as a GGUF file that llama.cpp and QVAC load: architecture
    /// `bitnet`, TQ2_0 projections, the embedding in its stored float type, the tokenizer and chat template.
    Export {
        /// The GGUF file to write.
        #[arg(long)]
        gguf: PathBuf,
        /// The model directory.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The named models and adapters in this device's store.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Forget a name (the content stays in the store while jobs or other names use it).
    Remove { name: String },
}

#[derive(Subcommand)]
pub enum AdapterCmd {
    /// Write a PEFT adapter directory as a llama.cpp LoRA GGUF (F32), which llama.cpp (`--lora`) and QVAC
    /// load; `--adapter` of infer, score and finetune's `--init-adapter` take such a file too.
    Export {
        /// The GGUF file to write (atomically: a temporary file, then a rename).
        #[arg(long)]
        gguf: PathBuf,
        /// The PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// The base model the adapter was trained on: a model directory or a GGUF file. Its shapes are
        /// checked and its architecture (`general.architecture`; `bitnet` for a directory) goes in the file.
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// What delegation costs: model-transfer throughput and submit-to-first-token latency, local against
    /// remote, between two daemons on loopback.
    Mesh {
        /// Model directory. Default: the built-in random `tiny` model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Inference jobs timed each way (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long)]
        json: bool,
    },
    /// The capability probe the daemon runs at start: the engine's ternary matmul on the chosen device,
    /// checked against the CPU twin (GOPS = 2 x multiply-adds per second).
    Probe {
        /// Milliseconds of timing.
        #[arg(long, default_value_t = 1000)]
        ms: u64,
        /// Samples the timing is split into (the median is reported).
        #[arg(long, default_value_t = bitnode_engine::probe::DEFAULT_SAMPLES)]
        samples: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dev: DeviceArgs,
    },
    /// LoRA training speed (tokens/s, optimizer included) and peak device memory on random tokens.
    Finetune {
        /// Model directory or GGUF file. Default: the built-in random `tiny` model.
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// Timed optimizer steps (after one warm-up step).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, value_parser = parse_byte_count)]
        max_memory: Option<u64>,
        #[arg(long)]
        json: bool,
        #[arg(long = "device", env = "BITNODE_ADAPTER", default_value = "auto")]
        device: String,
    },
    /// A running daemon's OpenAI-compatible API under load: for each concurrency level, that many
    /// streamed completions at once; time to first token, per-stream decode rate, aggregate rate, wall
    /// time, and the device that served.
    Serve(ServeBenchArgs),
    /// Prefill and decode speed and device memory at batch 1.
    Infer {
        /// Model directory or GGUF file. Default: a built-in random `tiny` model, synthesized into the bitnode home on first use.
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        #[arg(long, default_value_t = 128)]
        gen: usize,
        /// Also time every kernel of one decode step (GPU timestamp queries).
        #[arg(long)]
        profile: bool,
        /// Also run this many sequences at once through continuous batching, e.g. `1,4,16`: aggregate and
        /// per-stream decode speed, time to first token.
        #[arg(long, value_delimiter = ',')]
        concurrency: Vec<usize>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dev: DeviceArgs,
    },
}

/// Parses durations such as `90s`, `10m`, `2h`, `1d` (a bare number is seconds).
pub fn parse_ttl(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("--ttl {s:?}: expected e.g. 90s, 10m, 2h or 1d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => anyhow::bail!("--ttl {s:?}: unknown unit {unit:?} (use s, m, h or d)"),
    };
    n.checked_mul(mult)
        .ok_or_else(|| anyhow::anyhow!("--ttl {s:?} is too long"))
}

pub fn parse_byte_count(s: &str) -> Result<u64, String> {
    bitnode_engine::util::parse_bytes(s)
}

/// `bitnode bench serve`.
#[derive(Args)]
pub struct ServeBenchArgs {
    /// A model name or hash the daemon knows, or a model directory (imported into this home's store).
    /// Default: the built-in random `tiny` model.
    #[arg(long)]
    pub model: Option<String>,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub concurrency: Vec<usize>,
    /// About this many prompt tokens per request.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens generated per request (fewer where the model ends its text first).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// "auto" (the scheduler picks), "local", or a paired peer (name or id), as `bitnode chat --to`.
    #[arg(long, default_value = "auto")]
    pub to: String,
    /// The API's base URL (http://HOST:PORT/v1). Default: the running daemon's (`bitnode status`).
    #[arg(long)]
    pub url: Option<String>,
    /// The API token. Default: $BITNODE_API_TOKEN, else this home's [api] token.
    #[arg(long)]
    pub token: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// `bitnode chat`.
#[derive(Args)]
pub struct ChatArgs {
    /// A model name or hash (`bitnode model list`), or a model directory. Default: the built-in tiny.
    #[arg(long)]
    pub model: Option<String>,
    /// "auto", "local", or a paired peer (id or name).
    #[arg(long, default_value = "auto")]
    pub to: String,
    /// A system message that opens the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}
