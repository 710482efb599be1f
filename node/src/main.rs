//! The `bitnode` command line. The engine does the work; this file parses arguments, picks the device and
//! prints results. Errors reach the user as one clear line and a non-zero exit, never a panic.
use anyhow::{bail, Context};
use bitnode::config;
use bitnode::control::{self, Request};
use bitnode::exec::{self, JobEvent, JobOutput, JobPaths};
use bitnode_engine::cpu::SampleParams;
use bitnode_engine::session::{EmbedDtype, Engine, EngineOptions};
use bitnode_engine::synth::{self, SynthFormat};
use bitnode_protocol::job::{FinetuneRequest, JobSpec};
use bitnode_protocol::{InferRequest, ScoreRequest};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "bitnode",
    version,
    about = "A private compute mesh of your own devices for 1.58-bit LLMs"
)]
struct Cli {
    /// bitnode home (identity, config, jobs). Default: $BITNODE_HOME, else the platform data directory.
    #[arg(long, global = true, env = "BITNODE_HOME")]
    home: Option<PathBuf>,
    /// Log format for stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone, Default)]
struct DeviceArgs {
    /// Compute device: auto (discrete, then integrated, then virtual GPU, then the CPU reference), gpu (the
    /// best wgpu adapter, software Vulkan such as lavapipe included), cpu, an index from `bitnode devices`,
    /// or part of an adapter name.
    #[arg(long = "device", env = "BITNODE_ADAPTER")]
    device: Option<String>,
    /// Largest buffer/binding to create, in bytes (lower than the adapter's limit to force tiling).
    #[arg(long, env = "BITNODE_MAX_BINDING")]
    max_binding: Option<u64>,
    /// Embedding / lm_head storage on the device: auto (f16 where the adapter has shader-f16), f16, f32.
    #[arg(long, env = "BITNODE_EMBED_DTYPE")]
    embed_dtype: Option<EmbedDtype>,
}

#[derive(Subcommand)]
enum Cmd {
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
}

#[derive(Args)]
struct InferArgs {
    /// Model directory. Default: a built-in random `tiny` model, synthesized into the bitnode home on first use.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A LoRA adapter directory (PEFT format).
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// 1.0 disables top-p.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 1.0 disables the penalty.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print a JSON object as the last line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args)]
struct ScoreArgs {
    /// Model directory. Default: the built-in `tiny` model.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long)]
    text_file: PathBuf,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    dev: DeviceArgs,
}

/// Where `bitnode submit` sends a job, and how it waits.
#[derive(Args, Clone)]
struct SubmitArgs {
    /// auto (the strongest device that fits), local (this device), or a paired peer's name or id.
    #[arg(long, default_value = "auto")]
    to: String,
    /// Return at once with the job id instead of streaming until the job ends.
    #[arg(long)]
    detach: bool,
}

#[derive(Subcommand)]
enum SubmitCmd {
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
enum JobsCmd {
    /// One job: state, where it ran and why, earlier attempts, the result.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running job (on whichever device runs it).
    Cancel { id: String },
}

#[derive(Args)]
struct FinetuneArgs {
    #[arg(long)]
    model: PathBuf,
    /// .txt (one document), or .jsonl with {"text"}, {"prompt","completion"} or {"messages"} per line.
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Start from this PEFT adapter instead of a fresh one.
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value_t = 32.0)]
    alpha: f32,
    /// Dropout on the LoRA branch's input (PEFT's lora_dropout), 0 to 1.
    #[arg(long)]
    lora_dropout: Option<f32>,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    targets: Vec<String>,
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Optimizer steps (default: one epoch).
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<usize>,
    #[arg(long)]
    epochs: Option<f64>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Tokens per sequence (default: 512, or the model's context if shorter).
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    #[arg(long, default_value = "constant", value_parser = ["constant", "linear", "cosine"])]
    schedule: String,
    /// Clip gradients to this global norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    #[arg(long)]
    no_shuffle: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fraction of the examples held out for an eval loss.
    #[arg(long, default_value_t = 0.0)]
    val_split: f64,
    /// Write a checkpoint (adapter, optimizer moments, step) every N steps to OUT/checkpoint-N.
    #[arg(long)]
    save_every: Option<usize>,
    /// Continue from a checkpoint directory.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Device-memory budget of the GPU trainer (bytes, or 3GiB, 1500MiB, 3GB): the planner picks gradient
    /// checkpointing and the head's token chunk to fit, and refuses before the first step if nothing does.
    /// Default: the GPU's memory where the platform reports it.
    #[arg(long, value_parser = parse_byte_count)]
    max_memory: Option<u64>,
    /// One JSON object per step: {step, loss, lr, tokens, tokens_per_second, elapsed_s}.
    #[arg(long)]
    json_log: Option<PathBuf>,
    /// Print the run's summary as one JSON object on the last line (steps, losses, eval losses, examples,
    /// adapter directory, device, memory plan and peak).
    #[arg(long)]
    json: bool,
    /// Where to train: auto (a hardware GPU, else the CPU reference), gpu (any wgpu adapter, lavapipe
    /// included), cpu, an index from `bitnode devices`, or part of an adapter name.
    #[arg(long = "device", env = "BITNODE_ADAPTER", default_value = "auto")]
    device: String,
}

#[derive(Subcommand)]
enum PairCmd {
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
enum ModelCmd {
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
}

#[derive(Subcommand)]
enum BenchCmd {
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
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dev: DeviceArgs,
    },
    /// LoRA training speed (tokens/s, optimizer included) and peak device memory on random tokens.
    Finetune {
        /// Model directory. Default: the built-in random `tiny` model.
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
    /// Prefill and decode speed and device memory at batch 1.
    Infer {
        /// Model directory. Default: a built-in random `tiny` model, synthesized into the bitnode home on first use.
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        #[arg(long, default_value_t = 128)]
        gen: usize,
        /// Also time every kernel of one decode step (GPU timestamp queries).
        #[arg(long)]
        profile: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dev: DeviceArgs,
    },
}

fn main() {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BITNODE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,wgpu_core=error,wgpu_hal=error,naga=error"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: logs kept by Docker, systemd or a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn engine_options(home: &std::path::Path, dev: &DeviceArgs) -> anyhow::Result<EngineOptions> {
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
    })
}

/// Parses durations such as `90s`, `10m`, `2h`, `1d` (a bare number is seconds).
fn parse_ttl(s: &str) -> anyhow::Result<u64> {
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
        _ => bail!("--ttl {s:?}: unknown unit {unit:?} (use s, m, h or d)"),
    };
    n.checked_mul(mult)
        .ok_or_else(|| anyhow::anyhow!("--ttl {s:?} is too long"))
}

fn call(home: &std::path::Path, req: Request) -> anyhow::Result<serde_json::Value> {
    Ok(control::call(home, &req, std::time::Duration::from_secs(60))?)
}

fn print_peers(v: &serde_json::Value) {
    let list = v.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no paired peers (pair with `bitnode pair invite` / `bitnode pair join`)");
    }
    for p in list {
        let conn = p["connection"].as_str().unwrap_or("offline");
        let rtt = p["rtt_ms"].as_f64().map(|r| format!(" {r:.1} ms")).unwrap_or_default();
        let score = p["capabilities"]["score"]
            .as_f64()
            .map(|s| format!(" score {s:.1}"))
            .unwrap_or_default();
        let dev = p["capabilities"]["device"]
            .as_str()
            .map(|d| format!(" on {d}"))
            .unwrap_or_default();
        println!(
            "{:<16} {} {conn}{rtt}{score}{dev}",
            p["name"].as_str().unwrap_or("?"),
            p["id"].as_str().unwrap_or("?")
        );
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let home = config::home(cli.home.as_deref());
    match cli.cmd {
        Cmd::Finetune(a) => finetune(*a)?,
        Cmd::Submit { cmd } => {
            let (spec, paths, submit, json) = match cmd {
                SubmitCmd::Infer { args, submit } => {
                    let json = args.json;
                    let (spec, paths, _) = infer_job(args, &home)?;
                    (spec, paths, submit, json)
                }
                SubmitCmd::Score { args, submit } => {
                    let json = args.json;
                    let (spec, paths, _) = score_job(args, &home)?;
                    (spec, paths, submit, json)
                }
                SubmitCmd::Finetune { args, submit } => {
                    let json = args.json;
                    let (spec, paths) = finetune_job(*args)?;
                    (spec, paths, submit, json)
                }
            };
            let opts = bitnode::submit::SubmitOptions {
                to: submit.to,
                detach: submit.detach,
                json,
            };
            bitnode::submit::submit(&home, spec, &paths, &opts)?;
        }
        Cmd::Jobs { json, cmd } => match cmd {
            None => bitnode::submit::list(&home, json)?,
            Some(JobsCmd::Show { id, json: j }) => bitnode::submit::show(&home, &id, json || j)?,
            Some(JobsCmd::Cancel { id }) => bitnode::submit::cancel(&home, &id)?,
        },
        Cmd::Demo { keep } => bitnode::demo::run(keep)?,
        Cmd::Init { name } => {
            if bitnode::init(&home, name.as_deref())? {
                let id = bitnode::identity::load(&home)?.public().to_peer_id();
                println!("initialized {}\npeer id: {id}", home.display());
            } else {
                let id = bitnode::identity::load(&home)?.public().to_peer_id();
                println!(
                    "{} is already initialized (peer id {id}); identity and config left untouched",
                    home.display()
                );
            }
        }
        Cmd::Id => {
            let id = bitnode::identity::load(&home)?.public().to_peer_id();
            println!("{id}");
        }
        Cmd::Start {
            listen,
            relay_server,
            no_remote_jobs,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(bitnode::daemon::run(
                &home,
                bitnode::daemon::StartOptions {
                    listen,
                    relay_server,
                    no_remote_jobs,
                },
            ))?;
        }
        Cmd::Stop => {
            call(&home, Request::Shutdown)?;
            // Wait for the socket to go away, so scripts can start a new daemon right after.
            let t0 = std::time::Instant::now();
            while control::is_running(&home) && t0.elapsed() < std::time::Duration::from_secs(10) {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            println!("stopped");
        }
        Cmd::Status { json } => {
            let v = call(&home, Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{} ({})",
                    v["name"].as_str().unwrap_or("?"),
                    v["id"].as_str().unwrap_or("?")
                );
                println!(
                    "peers: {} paired, {} connected; open invites: {}; relay server: {}",
                    v["paired_peers"], v["connected_peers"], v["open_invites"], v["relay_server"]
                );
                for a in v["listen_addresses"].as_array().into_iter().flatten() {
                    println!("listening: {}", a.as_str().unwrap_or(""));
                }
                let c = &v["capabilities"];
                println!(
                    "device: {} ({}, {}), ternary matmul {:.1} GOPS, score {:.1}",
                    c["device"].as_str().unwrap_or("?"),
                    c["backend"].as_str().unwrap_or("?"),
                    c["device_type"].as_str().unwrap_or("?"),
                    c["ternary_gops"].as_f64().unwrap_or(0.0),
                    c["score"].as_f64().unwrap_or(0.0)
                );
            }
        }
        Cmd::Peers { json } => {
            let v = call(&home, Request::Peers)?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                print_peers(&v);
            }
        }
        Cmd::Pair { cmd } => pair(&home, cmd)?,
        Cmd::JobExec { dir, dev } => {
            let mut out = std::io::stdout().lock();
            match engine_options(&home, &dev) {
                Ok(opts) => exec::exec_dir(&dir, &opts, trainer_device(&opts), &mut out)?,
                Err(e) => {
                    // The daemon reads the reason from stdout, as for any other failed job.
                    let reason = format!("{e:#}");
                    let _ = exec::write_line(&mut out, &exec::ExecLine::Error { reason });
                    return Err(e);
                }
            }
        }
        Cmd::Infer(a) => {
            let json = a.json;
            let (spec, paths, opts) = infer_job(a, &home)?;
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
        }
        Cmd::Score(a) => {
            let json = a.json;
            let text_file = a.text_file.clone();
            let (spec, paths, opts) = score_job(a, &home)?;
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
        }
        Cmd::Model {
            cmd:
                ModelCmd::Synth {
                    preset,
                    out,
                    seed,
                    format,
                },
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
        Cmd::Bench {
            cmd: BenchCmd::Mesh { model, runs, json },
        } => bitnode::bench_mesh::run(model, runs, json)?,
        Cmd::Bench {
            cmd: BenchCmd::Probe { ms, json, dev },
        } => {
            let opts = engine_options(&home, &dev)?;
            let want = opts.adapter.unwrap_or_else(|| "auto".into());
            let p = bitnode_engine::probe::probe(&want, std::time::Duration::from_millis(ms))?;
            if json {
                println!("{}", serde_json::to_string(&p)?);
            } else {
                println!(
                    "{} ({}, {}): ternary matmul {:.1} GOPS, {}",
                    p.device,
                    p.backend,
                    p.device_type,
                    p.ternary_gops,
                    if p.verified {
                        "matches the CPU twin"
                    } else {
                        "DISAGREES with the CPU twin"
                    }
                );
            }
        }
        Cmd::Bench {
            cmd:
                BenchCmd::Finetune {
                    model,
                    batch,
                    seq_len,
                    rank,
                    steps,
                    max_memory,
                    json,
                    device,
                },
        } => {
            let model = model_or_builtin(model, &home)?;
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
                        "plan: gradient checkpointing {}, head chunk {} tokens, embedding {}; predicted {}",
                        if p.checkpoint { "on" } else { "off" },
                        p.head_chunk,
                        if p.embed_f16 { "f16" } else { "f32" },
                        bitnode_engine::util::human_bytes(p.total)
                    );
                }
            }
        }
        Cmd::Bench {
            cmd:
                BenchCmd::Infer {
                    model,
                    prompt_len,
                    gen,
                    profile,
                    json,
                    dev,
                },
        } => {
            let model = model_or_builtin(model, &home)?;
            let opts = engine_options(&home, &dev)?;
            bench_infer(&model, prompt_len, gen, profile, json, &opts)?;
        }
        Cmd::Devices { json } => {
            let list: Vec<_> = bitnode_engine::gpu::adapters()
                .iter()
                .enumerate()
                .map(|(i, a)| bitnode_engine::gpu::summarize(i, a))
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no wgpu adapters found; bitnode will use the CPU reference backend (slow)");
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
        }
    }
    Ok(())
}

/// `bitnode infer`'s arguments as a job: the spec, where its files are, and the engine options.
fn infer_job(a: InferArgs, home: &std::path::Path) -> anyhow::Result<(JobSpec, JobPaths, EngineOptions)> {
    let model = model_or_builtin(a.model, home)?;
    let opts = engine_options(home, &a.dev)?;
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
    });
    let paths = JobPaths {
        adapter: a.adapter,
        ..JobPaths::model(model)
    };
    Ok((spec, paths, opts))
}

/// `bitnode score`'s arguments as a job (the text is read here: it travels in the spec).
fn score_job(a: ScoreArgs, home: &std::path::Path) -> anyhow::Result<(JobSpec, JobPaths, EngineOptions)> {
    let model = model_or_builtin(a.model, home)?;
    let opts = engine_options(home, &a.dev)?;
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

fn finetune(a: FinetuneArgs) -> anyhow::Result<()> {
    let (device, json) = (a.device.clone(), a.json);
    let (spec, paths) = finetune_job(a)?;
    finetune_run(&spec, &paths, &device, json)
}

/// `bitnode finetune`'s arguments as a job (the dataset is read from its path locally; `submit` sends it).
fn finetune_job(a: FinetuneArgs) -> anyhow::Result<(JobSpec, JobPaths)> {
    let ctx = bitnode_engine::config::ModelConfig::load(&a.model.join("config.json"))
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

fn pair(home: &std::path::Path, cmd: PairCmd) -> anyhow::Result<()> {
    match cmd {
        PairCmd::Invite { ttl, json } => {
            let ttl_secs = parse_ttl(&ttl)?;
            let v = call(home, Request::PairInvite { ttl_secs })?;
            let code = v["code"].as_str().unwrap_or_default().to_string();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"code": code, "expires_unix": v["expires_unix"]})
                );
            } else {
                println!("{code}");
                eprintln!();
                if let Ok(q) = qrcode::QrCode::new(code.as_bytes()) {
                    let img = q.render::<qrcode::render::unicode::Dense1x2>().quiet_zone(true).build();
                    eprintln!("{img}");
                }
                eprintln!("On the other device: bitnode pair join <code>   (one use, valid for {ttl})");
            }
        }
        PairCmd::Join { code, json } => {
            // Parse locally first: a malformed or expired code gets its error without a daemon round trip.
            bitnode_protocol::invite::Invite::parse(&code, bitnode::trust::now_unix())?;
            let v = call(home, Request::PairJoin { code })?;
            if json {
                println!("{v}");
            } else {
                println!(
                    "paired with {} ({})",
                    v["name"].as_str().unwrap_or("?"),
                    v["peer_id"].as_str().unwrap_or("?")
                );
            }
        }
        PairCmd::Add { peer_id, name, addr } => {
            let req = Request::PairAdd {
                peer: peer_id.clone(),
                name: name.clone(),
                addrs: addr.clone(),
            };
            match control::call(home, &req, std::time::Duration::from_secs(10)) {
                Ok(v) => println!("trusting {} as {}", peer_id, v["name"].as_str().unwrap_or("?")),
                // No daemon: edit the trust list directly; the next `bitnode start` uses it.
                Err(control::ClientError::NotRunning(_)) => {
                    let id: libp2p::PeerId = peer_id
                        .parse()
                        .map_err(|_| anyhow::anyhow!("{peer_id:?} is not a peer id"))?;
                    let name = name.unwrap_or_else(|| bitnode::trust::default_name(&id));
                    bitnode_protocol::wire::check_name(&name)?;
                    let addrs: Vec<libp2p::Multiaddr> = addr
                        .iter()
                        .map(|a| a.parse().map_err(|e| anyhow::anyhow!("address {a:?}: {e}")))
                        .collect::<anyhow::Result<_>>()?;
                    let mut t = bitnode::trust::TrustList::load(home)?;
                    t.add(&id, &name, "manual", &addrs);
                    t.save(home)?;
                    println!("trusting {peer_id} as {name} (the daemon is not running; it will use this at start)");
                }
                Err(e) => return Err(e.into()),
            }
        }
        PairCmd::List { json } => {
            let v = match control::call(home, &Request::PairList, std::time::Duration::from_secs(10)) {
                Ok(v) => v,
                Err(control::ClientError::NotRunning(_)) => bitnode::trust::TrustList::load(home)?.to_json(),
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{v}");
            } else if v.as_array().is_none_or(|a| a.is_empty()) {
                println!("no paired peers");
            } else {
                for p in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<16} {} (via {})",
                        p["name"].as_str().unwrap_or("?"),
                        p["id"].as_str().unwrap_or("?"),
                        p["via"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        PairCmd::Remove { peer } => match control::call(
            home,
            &Request::PairRemove { peer: peer.clone() },
            std::time::Duration::from_secs(10),
        ) {
            Ok(v) => println!(
                "removed {} ({})",
                v["name"].as_str().unwrap_or("?"),
                v["peer_id"].as_str().unwrap_or("?")
            ),
            Err(control::ClientError::NotRunning(_)) => {
                let mut t = bitnode::trust::TrustList::load(home)?;
                let id = t
                    .resolve(&peer)
                    .ok_or_else(|| anyhow::anyhow!("no paired peer is called {peer:?}"))?;
                let p = t.remove(&id).ok_or_else(|| anyhow::anyhow!("{id} is not paired"))?;
                t.save(home)?;
                println!("removed {} ({id})", p.name);
            }
            Err(e) => return Err(e.into()),
        },
    }
    Ok(())
}

/// The model a command runs when `--model` is omitted: a random `tiny` BitNet (seed 0) kept in
/// `<home>/models/builtin-tiny`, so a first run needs no download.
fn parse_byte_count(s: &str) -> Result<u64, String> {
    bitnode_engine::util::parse_bytes(s)
}

/// The trainer device a job runs on when the command has no `--device` of its own (infer, score,
/// job-exec): the engine's choice (`--device`, `BITNODE_ADAPTER`, `[engine] adapter`), else auto.
fn trainer_device(opts: &EngineOptions) -> &str {
    opts.adapter.as_deref().unwrap_or("auto")
}

fn model_or_builtin(model: Option<PathBuf>, home: &std::path::Path) -> anyhow::Result<PathBuf> {
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
    json: bool,
    opts: &EngineOptions,
) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let mut engine = Engine::load(model, opts).with_context(|| format!("loading model {}", model.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = engine.model.config.clone();
    if prompt_len == 0 || prompt_len + gen > cfg.max_position_embeddings {
        bail!(
            "--prompt-len {prompt_len} + --gen {gen} must be between 1 and the context {}",
            cfg.max_position_embeddings
        );
    }
    // A deterministic prompt of ordinary (non-special) ids, BOS first.
    let bos = cfg.bos_token_id.unwrap_or(0);
    let span = (cfg.vocab_size.min(128000) - 1) as u64;
    let mut prompt = vec![bos];
    let mut r = bitnode_engine::rng::Rng::new(7);
    while prompt.len() < prompt_len {
        prompt.push((r.next_u64() % span) as u32);
    }
    let greedy = SampleParams::default();
    // Warm-up: compiles pipelines and touches every buffer once.
    engine.generate_ids(&prompt, gen.min(8), &greedy, 0, false, &mut |_| {})?;
    let g = engine.generate_ids(&prompt, gen, &greedy, 0, false, &mut |_| {})?;
    let n = g.tokens.len();
    let decode = if n > 1 { (n - 1) as f64 / g.decode_seconds } else { 0.0 };
    let prefill = prompt_len as f64 / g.prefill_seconds;
    let mem = engine.backend.memory();
    let device = engine.backend.device_name();
    let prof = if profile {
        engine.backend.profile_step(prompt_len + n / 2)?
    } else {
        None
    };
    // Bytes one decode step must read: every ternary weight, the lm_head, the norms, and the KV cache so far.
    let kv_read = (cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4 * (prompt_len + gen / 2)) as u64;
    let head_bytes = if mem.lm_head > 0 { mem.lm_head } else { mem.embedding };
    let bytes_per_token = mem.ternary_weights + head_bytes + mem.other_weights + kv_read;
    let bw = bandwidth_for(&device);
    let bound = bw.map(|b| b / bytes_per_token as f64);
    let v = serde_json::json!({
        "model": model.display().to_string(),
        "device": device,
        "prompt_len": prompt_len,
        "gen": n,
        "load_seconds": load_s,
        "prefill_tokens_per_second": prefill,
        "decode_tokens_per_second": decode,
        "peak_device_memory_bytes": mem.peak,
        "memory": mem,
        "bytes_read_per_token": bytes_per_token,
        "memory_bandwidth_bytes_per_second": bw,
        "bandwidth_bound_tokens_per_second": bound,
        "fraction_of_bandwidth_bound": bound.map(|b| decode / b),
        "profile": prof,
    });
    if json {
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("device:            {device}");
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
