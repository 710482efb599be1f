//! `bitnode demo`: three real daemons on loopback — a "phone", a "laptop" and a "desktop" — paired by
//! invite codes; the phone delegates a fine-tune of the built-in tiny model to the desktop, gets the adapter
//! back, and asks a training question before and after (both on the desktop, the strongest device): with
//! the adapter, the random model gives the trained answer word for word. Every step is a real `bitnode`
//! command (printed as it runs), so the demo doubles as a tour of the CLI.
//!
//! On one machine the three devices would measure the same GPU, so their capabilities are pinned in their
//! configs (`[capabilities]`): the phone weak and on battery, the laptop middling, the desktop strong.
use crate::api::{ConnectionKind, InviteReply, JobView, Paired, PeerInfo};
use crate::control::{self, Request};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bundled pairs the demo fine-tunes on (`node/assets/demo-finetune.jsonl`).
pub const DATASET: &str = include_str!("../assets/demo-finetune.jsonl");

/// The demo's fine-tune of the built-in random tiny model on [`DATASET`]: long enough that the adapter
/// makes the model answer a training question with the trained answer, word for word (the demo checks it,
/// and so does its test, `node/tests/it/demo.rs`). Each step takes all 10 pairs (`--batch 10`); a rank-16
/// adapter on every projection at a constant 1e-2 learning rate brings the loss from 10.7 to about 0.1 in
/// 45 steps, which a random 2-layer model needs to memorise them: about 450 example passes, at the 0.13 s of
/// CPU each that the CPU reference trainer took per pass in a release build on the 2-core development
/// machine (0.24 s in the test build). Fewer steps, larger rates and larger scales were tried and memorise
/// less (README, "Demo").
pub const FINETUNE_ARGS: [&str; 10] = [
    "--steps",
    "45",
    "--batch",
    "10",
    "--rank",
    "16",
    "--seq-len",
    "128",
    "--lr",
    "1e-2",
];

/// The first training pair: the question the demo asks before and after the fine-tune, and the answer
/// it was trained on.
pub fn trained_pair() -> anyhow::Result<(String, String)> {
    #[derive(serde::Deserialize)]
    struct Pair {
        prompt: String,
        completion: String,
    }
    let first = DATASET.lines().next().context("the demo's dataset is empty")?;
    let p: Pair = serde_json::from_str(first).context("the demo's dataset's first line is not a pair")?;
    Ok((p.prompt, p.completion))
}

pub(crate) struct Device {
    pub(crate) name: &'static str,
    pub(crate) home: PathBuf,
    child: std::cell::RefCell<Option<Child>>,
}

impl Device {
    /// SIGKILL: the device vanishes, as far as its peers can tell.
    pub(crate) fn kill(&self) {
        if let Some(mut c) = self.child.borrow_mut().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.get_mut().take() {
            let _ = control::call::<String>(&self.home, &Request::Shutdown, Duration::from_secs(5));
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One device of a local mesh: its name, pinned score, device memory and power, and extra config.
pub(crate) struct Spec {
    pub(crate) name: &'static str,
    /// None: measure (the capability probe), else pinned.
    pub(crate) score: Option<f64>,
    pub(crate) mem_gib: u64,
    pub(crate) battery: bool,
    pub(crate) extra: &'static str,
}

fn config(s: &Spec) -> String {
    let power = if s.battery {
        "battery_percent = 64.0\non_ac = false\n"
    } else {
        "on_ac = true\n"
    };
    let caps = match s.score {
        Some(score) => format!(
            "benchmark = false\nscore = {score}\nternary_gops = {score}\ndevice = \"{} GPU (pinned for the demo)\"\n\
             device_memory_bytes = {}\n{power}",
            s.name,
            s.mem_gib << 30
        ),
        None => String::new(),
    };
    format!(
        "[node]\nname = \"{}\"\n\n[network]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\nreconnect_secs = 1\n\n\
         [api]\nlisten = \"127.0.0.1:0\"\n\n[capabilities]\n{caps}\n{}\n",
        s.name, s.extra
    )
}

/// Starts one daemon per spec under `base` and pairs every two of them by invite codes (as `pair invite`
/// and `pair join` do); returns once each sees all the others connected with capabilities.
pub(crate) fn start_mesh(base: &Path, specs: &[Spec], narrate: bool) -> anyhow::Result<Vec<Device>> {
    let mut devs = vec![];
    for s in specs {
        let home = base.join(s.name);
        std::fs::create_dir_all(&home)?;
        crate::init(&home, Some(s.name))?;
        crate::fsutil::write_private(&home.join("config.toml"), config(s).as_bytes())?;
        let log = std::fs::File::create(home.join("daemon.log"))?;
        let child = bitnode(&home)
            .arg("start")
            .env("BITNODE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting a daemon")?;
        if narrate {
            say(&format!(
                "  started the {:<7} daemon: capability score {} (pinned), {} GiB{}",
                s.name,
                s.score.unwrap_or(0.0),
                s.mem_gib,
                if s.battery { ", on battery" } else { "" }
            ));
        }
        devs.push(Device {
            name: s.name,
            home,
            child: std::cell::RefCell::new(Some(child)),
        });
    }
    for d in &devs {
        wait_for(Duration::from_secs(60), "the daemons to start", || {
            control::is_running(&d.home).then_some(())
        })?;
    }
    for (i, a) in devs.iter().enumerate() {
        for b in &devs[i + 1..] {
            let inv: InviteReply =
                control::call(&a.home, &Request::PairInvite { ttl_secs: 120 }, Duration::from_secs(10))?;
            let code = inv.code;
            let v: Paired = control::call(
                &b.home,
                &Request::PairJoin { code: code.clone() },
                Duration::from_secs(60),
            )?;
            if narrate {
                say(&format!(
                    "   {}$ bitnode pair join {}...  -> paired with {}",
                    b.name,
                    &code[..code.len().min(28)],
                    v.name
                ));
            }
        }
    }
    for d in &devs {
        wait_for(Duration::from_secs(60), "every device to see the others", || {
            let v: Vec<PeerInfo> = control::call(&d.home, &Request::Peers, Duration::from_secs(5)).ok()?;
            let ready = v.iter().filter(|p| p.connected && p.capabilities.is_some()).count();
            (ready == devs.len() - 1).then_some(())
        })?;
    }
    Ok(devs)
}

/// The fields of a fine-tune's summary the demo narrates.
#[derive(serde::Deserialize)]
struct FinetuneResult {
    steps: usize,
    first_loss: Option<f64>,
    last_loss: Option<f64>,
}

fn say(s: &str) {
    println!("{s}");
}

fn bitnode(home: &Path) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("bitnode"));
    let mut c = Command::new(exe);
    c.arg("--home").arg(home);
    c
}

/// Runs a `bitnode submit ... --json` or `jobs show --json` as the user would type it (printed first);
/// returns its last stdout line, the job. Its stderr (progress bars, streamed notes) goes straight to the
/// terminal.
fn run_json(dev: &Device, args: &[&str]) -> anyhow::Result<JobView> {
    // Quoted where a shell would need it (the demo's prompts hold spaces and a newline).
    let shown: Vec<String> = args
        .iter()
        .map(|a| {
            if a.is_empty() || a.chars().any(|c| c.is_whitespace() || "\"'$\\".contains(c)) {
                format!("{a:?}")
            } else {
                a.to_string()
            }
        })
        .collect();
    println!("\n  {}$ bitnode {}", dev.name, shown.join(" "));
    let out = bitnode(&dev.home)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running bitnode")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines: Vec<&str> = stdout.lines().collect();
    let last = lines.pop().unwrap_or("");
    for l in lines {
        println!("  | {l}");
    }
    let v: JobView =
        serde_json::from_str(last).with_context(|| format!("bitnode {} printed {stdout:?}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "bitnode {} failed: {}",
            args.join(" "),
            v.reason.as_deref().unwrap_or(last)
        );
    }
    Ok(v)
}

fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if t0.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the demo in a fresh directory (kept when `keep`, else removed at the end).
pub fn run(keep: bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    // Short: control socket paths must stay under the 108-byte Unix limit.
    let base = PathBuf::from(format!("/tmp/bitnode-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let res = demo(&base);
    if keep {
        say(&format!(
            "\nThe three devices' homes (logs, job tables, models) are in {}",
            base.display()
        ));
    } else {
        let _ = std::fs::remove_dir_all(&base);
    }
    res?;
    say(&format!("\nDemo finished in {:.0} s.", t0.elapsed().as_secs_f64()));
    Ok(())
}

fn demo(base: &Path) -> anyhow::Result<()> {
    say("bitnode demo: three devices of one owner, on this machine (loopback), as real daemons.\n");
    let specs = [
        Spec {
            name: "phone",
            score: Some(5.0),
            mem_gib: 4,
            battery: true,
            extra: "[jobs]\nheartbeat_timeout_secs = 4",
        },
        Spec {
            name: "laptop",
            score: Some(60.0),
            mem_gib: 16,
            battery: false,
            extra: "",
        },
        Spec {
            name: "desktop",
            score: Some(600.0),
            mem_gib: 24,
            battery: false,
            extra: "",
        },
    ];
    say("1. Pairing. One device prints a one-time invite code (`bitnode pair invite`); the other joins with it");
    say("   (`bitnode pair join CODE`). Each device then trusts the other's key, and only that key.");
    let devs = start_mesh(base, &specs, true)?;
    let (phone, laptop, desktop) = (&devs[0], &devs[1], &devs[2]);
    say("\n   What the phone sees (`bitnode peers`):");
    let v: Vec<PeerInfo> = control::call(&phone.home, &Request::Peers, Duration::from_secs(5))?;
    for p in v {
        say(&format!(
            "     {:<8} {} score {:>5}  {:.2} ms",
            p.name,
            match p.connection {
                Some(ConnectionKind::Direct) => "direct",
                Some(ConnectionKind::Relayed) => "relayed",
                None => "offline",
            },
            p.capabilities.map_or(0.0, |c| c.score),
            p.rtt_ms.unwrap_or(0.0)
        ));
    }

    let data = base.join("demo-finetune.jsonl");
    std::fs::write(&data, DATASET)?;
    let adapter = base.join("adapter");
    let model = phone.home.join("models").join("builtin-tiny");
    let p = bitnode_engine::synth::preset("tiny")?;
    bitnode_engine::synth::synth(p, &model, 0, bitnode_engine::synth::SynthFormat::Packed)?;
    let model_s = model.display().to_string();
    let (data_s, adapter_s) = (data.display().to_string(), adapter.display().to_string());

    say("\n2. The phone asks for a LoRA fine-tune of the built-in tiny BitNet on 10 Q&A pairs, 45 passes over them");
    say("   (a minute or so: the desktop here is this machine's CPU).");
    say("   The scheduler ranks every device by expected completion time (memory fit, battery, score, queue,");
    say("   link, model transfer); the desktop wins. The phone's daemon signs the job with its key; the desktop");
    say("   checks the signature, that the phone is paired, and that the job is fresh and new. The desktop does");
    say("   not have the model, so it pulls it from the phone by content hash, chunk by verified chunk.");
    let mut args = vec![
        "submit", "finetune", "--model", &model_s, "--data", &data_s, "--out", &adapter_s,
    ];
    args.extend(FINETUNE_ARGS);
    args.extend(["--device", "cpu", "--json"]);
    let ft = run_json(phone, &args)?;
    let by = ft.executed_by_name.clone().unwrap_or_else(|| "?".into());
    let sum: FinetuneResult = serde_json::from_value(ft.result.clone().unwrap_or_default())
        .context("the fine-tune's result is not a fine-tune summary")?;
    say(&format!(
        "   -> ran on the {by}; loss {:.3} -> {:.3} in {} steps; the adapter landed on the phone in {}",
        sum.first_loss.unwrap_or(f64::NAN),
        sum.last_loss.unwrap_or(f64::NAN),
        sum.steps,
        adapter.display()
    ));
    if by != "desktop" {
        bail!("the fine-tune ran on the {by}, not on the desktop (the strongest device)");
    }
    let show = run_json(phone, &["jobs", "show", &ft.job_id, "--json"])?;
    say("   Why the desktop (`bitnode jobs show`):");
    for l in &show.placement {
        say(&format!("     {l}"));
    }

    say("\n3. The fine-tune changed the model. The phone asks a question from the training pairs, before and after:");
    say("   the base model has random weights, so it answers with noise; with the adapter it gives the trained");
    say("   answer. Both run on the desktop, which cached the adapter it made: only the prompt travels, and the");
    say("   tokens stream back as they are generated.");
    let (question, trained) = trained_pair()?;
    let ask = |adapter: Option<&str>| -> anyhow::Result<(String, String)> {
        let mut args = vec!["submit", "infer", "--model", &model_s];
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        args.extend(["--prompt", &question, "--max-tokens", "96", "--json"]);
        let v = run_json(phone, &args)?;
        let r: bitnode_protocol::InferResult = serde_json::from_value(v.result.clone().unwrap_or_default())
            .context("the inference's result is not an inference result")?;
        Ok((r.text, v.executed_by_name.unwrap_or_else(|| "?".into())))
    };
    let (before, before_by) = ask(None)?;
    let (after, after_by) = ask(Some(&adapter_s))?;
    say(&format!("   question:           {question:?}"));
    say(&format!("   trained answer:     {trained:?}"));
    // The noise is cut at the trained answer's length: enough to see that it is noise.
    let cut: String = before.chars().take(trained.chars().count()).collect();
    let more = if cut.len() < before.len() { "..." } else { "" };
    say(&format!("   before (the {before_by}): {cut:?}{more}"));
    say(&format!("   after  (the {after_by}): {after:?}"));
    if after != trained {
        bail!("the fine-tuned model did not reproduce the trained answer: it answered {after:?}");
    }
    say("   -> with the adapter, the model reproduces the trained answer word for word");

    say("\n4. An app on the phone chats through the phone's OpenAI-compatible API (any OpenAI client works:");
    say("   base_url = the phone's api_url). The phone names its model (`bitnode model add DIR --name tiny`); the");
    say("   request becomes a job like any other, and the desktop serves it from a warm engine: the model is");
    say("   loaded once there, so the second request pays no load.");
    let named = crate::names::add(&phone.home, &model, Some("tiny"))?;
    let st: crate::api::Status = control::call(&phone.home, &Request::Status, Duration::from_secs(5))?;
    let api = st.api_url.context("the phone's API is off")?;
    say(&format!(
        "   the phone's API: {api}; model \"tiny\" = {}",
        &named.hash[..16]
    ));
    for question in ["What is bitnode?", "Where do my models live?"] {
        let body = serde_json::json!({"model": "tiny", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": question}]});
        let t0 = std::time::Instant::now();
        let answer = crate::http_client::post_json(
            &api,
            "/chat/completions",
            None,
            &body.to_string(),
            Duration::from_secs(120),
        )?;
        let (status, device) = (
            answer.status,
            answer.header("x-bitnode-device").unwrap_or("?").to_string(),
        );
        let reply = String::from_utf8_lossy(&answer.body()?).into_owned();
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        if status != 200 {
            bail!("the API answered {status}: {reply}");
        }
        let v: serde_json::Value = serde_json::from_str(&reply).context("the API's answer is not JSON")?;
        say(&format!(
            "     POST /v1/chat/completions {question:?} -> served by the {device} in {ms:.0} ms, {} tokens",
            v["usage"]["completion_tokens"]
        ));
        if device != "desktop" {
            bail!("the chat ran on the {device}, not on the desktop (the strongest device)");
        }
    }

    say("\n5. The desktop goes away in the middle of a job. The phone starts a longer fine-tune (detached, so the");
    say("   terminal is free); the desktop streams a checkpoint back every 10 steps; then its daemon is killed.");
    let adapter2 = base.join("adapter-2");
    let adapter2_s = adapter2.display().to_string();
    let v = run_json(
        phone,
        &[
            "submit",
            "finetune",
            "--model",
            &model_s,
            "--data",
            &data_s,
            "--out",
            &adapter2_s,
            "--steps",
            "150",
            "--rank",
            "8",
            "--seq-len",
            "128",
            "--lr",
            "3e-3",
            "--save-every",
            "10",
            "--detach",
            "--json",
        ],
    )?;
    let id = v.job_id;
    let show =
        |id: &str| control::call::<JobView>(&phone.home, &Request::JobShow { id: id.into() }, Duration::from_secs(5));
    let at = wait_for(Duration::from_secs(120), "a checkpoint from the desktop", || {
        let s = show(&id).ok()?;
        let step = s.checkpoint_step?;
        (s.executed_by_name.as_deref() == Some("desktop") && step >= 10).then_some(step)
    })?;
    say(&format!(
        "   the phone holds the desktop's checkpoint of step {at}; killing the desktop's daemon (SIGKILL) now"
    ));
    desktop.kill();
    let end = wait_for(Duration::from_secs(300), "the job to end", || {
        let s = show(&id).ok()?;
        s.state.is_final().then_some(s)
    })?;
    for a in &end.attempts {
        say(&format!("   lost: {a}"));
    }
    say(&format!(
        "   -> the job {} on the {}, resumed from step {at}; its adapter is in {}",
        end.state.as_str(),
        end.executed_by_name.as_deref().unwrap_or("?"),
        adapter2.display()
    ));
    if end.state != crate::jobs::State::Succeeded {
        bail!(
            "the job did not survive the desktop: {}",
            end.reason.as_deref().unwrap_or("no reason given")
        );
    }
    let _ = laptop;

    say("\nWhat happened:");
    say(&format!(
        "  - the phone (weak, on battery) delegated a fine-tune to the {by}, watched its progress, and got the adapter;"
    ));
    say("  - the fine-tune changed the model: asked a training question, it now gives the trained answer;");
    say("  - the model moved once, by content hash, verified chunk by chunk; nothing left these three devices;");
    say("  - every job and result was signed by the device that sent it and checked by the device that received it;");
    say("  - the inference and the API's chat requests went to the strongest device, which kept the model warm;");
    say("  - when the desktop vanished mid-job, the phone noticed within seconds and the laptop finished the");
    say("    fine-tune from the desktop's last checkpoint: no work was lost beyond the last 10 steps.");
    say("(The built-in model has random weights, so its text is noise until the fine-tune teaches it the pairs.)");
    Ok(())
}
