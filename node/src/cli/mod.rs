//! The `bitnode` command line: argument parsing (`args.rs`), the commands that run on this device alone
//! (`local.rs`) and those that go through the daemon (`mesh.rs`). `main.rs` only calls [`main`]. Errors
//! reach the user as one clear line and a non-zero exit, never a panic.
mod args;
mod chat;
mod local;
mod mesh;

pub(crate) use args::ServeBenchArgs;
pub(crate) use local::model_or_builtin;

use args::{Cli, Cmd};
use clap::Parser;

pub fn main() {
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

fn run(cli: Cli) -> anyhow::Result<()> {
    let home = crate::config::home(cli.home.as_deref());
    match cli.cmd {
        Cmd::Infer(a) => local::infer(&home, a),
        Cmd::Score(a) => local::score(&home, a),
        Cmd::Finetune(a) => local::finetune(*a),
        Cmd::Adapter { cmd } => local::adapter(cmd),
        Cmd::Model { cmd } => local::model(&home, cmd),
        Cmd::Bench { cmd } => local::bench(&home, cmd),
        Cmd::Devices { json } => local::devices(json),
        Cmd::JobExec { dir, dev } => local::job_exec(&home, &dir, &dev),
        Cmd::EngineHost {
            budget,
            idle_secs,
            max_batch,
            dev,
        } => crate::host::run(crate::host::HostOptions {
            engine: local::engine_options(&home, &dev)?,
            budget,
            idle: std::time::Duration::from_secs(idle_secs.max(1)),
            max_batch: max_batch.max(1),
        }),
        Cmd::Init { name } => mesh::init(&home, name),
        Cmd::Id => mesh::id(&home),
        Cmd::Start {
            listen,
            relay_server,
            no_remote_jobs,
            api_listen,
        } => mesh::start(
            &home,
            crate::daemon::StartOptions {
                listen,
                relay_server,
                no_remote_jobs,
                api_listen,
            },
        ),
        Cmd::Stop => mesh::stop(&home),
        Cmd::Status { json } => mesh::status(&home, json),
        Cmd::Peers { json } => mesh::peers(&home, json),
        Cmd::Pair { cmd } => mesh::pair(&home, cmd),
        Cmd::Submit { cmd } => mesh::submit(&home, cmd),
        Cmd::Jobs { json, cmd } => mesh::jobs(&home, json, cmd),
        Cmd::Chat(a) => chat::chat(&home, a),
        Cmd::Demo { keep } => crate::demo::run(keep),
    }
}
