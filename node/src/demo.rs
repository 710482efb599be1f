//! `bitnode demo`: three real daemons on loopback — a "phone", a "laptop" and a "desktop" — paired by
//! invite codes; the phone delegates a fine-tune of the built-in tiny model to the desktop, gets the adapter
//! back, and runs inference with it (which also goes to the desktop, the strongest device). Every step is a
//! real `bitnode` command (printed as it runs), so the demo doubles as a tour of the CLI.
//!
//! On one machine the three devices would measure the same GPU, so their capabilities are pinned in their
//! configs (`[capabilities]`): the phone weak and on battery, the laptop middling, the desktop strong.
use crate::api::{ConnectionKind, InviteReply, JobView, Paired, PeerInfo};
use crate::control::{self, Request};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DATASET: &str = include_str!("../assets/demo-finetune.jsonl");

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

/// A POST to the API on loopback with std alone (the demo needs nothing more): (status, headers, body).
fn http_post(base: &str, path: &str, body: &str) -> anyhow::Result<(u16, String, String)> {
    use std::io::{Read, Write};
    let rest = base.strip_prefix("http://").context("the API URL is not http://")?;
    let (hostport, prefix) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
    let mut s = std::net::TcpStream::connect(hostport).with_context(|| format!("connecting to {hostport}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "POST /{prefix}{path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").context("a malformed HTTP answer")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status")?;
    Ok((status, head.to_ascii_lowercase(), body.to_string()))
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
    println!("\n  {}$ bitnode {}", dev.name, args.join(" "));
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

    say("\n2. The phone asks for a LoRA fine-tune of the built-in tiny BitNet on 10 Q&A pairs.");
    say("   The scheduler ranks every device by expected completion time (memory fit, battery, score, queue,");
    say("   link, model transfer); the desktop wins. The phone's daemon signs the job with its key; the desktop");
    say("   checks the signature, that the phone is paired, and that the job is fresh and new. The desktop does");
    say("   not have the model, so it pulls it from the phone by content hash, chunk by verified chunk.");
    let ft = run_json(
        phone,
        &[
            "submit",
            "finetune",
            "--model",
            &model_s,
            "--data",
            &data_s,
            "--out",
            &adapter_s,
            "--steps",
            "30",
            "--rank",
            "8",
            "--seq-len",
            "128",
            "--lr",
            "3e-3",
            "--device",
            "cpu",
            "--json",
        ],
    )?;
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

    say("\n3. The phone runs inference with its new adapter. The desktop cached the adapter it made, so only the");
    say("   prompt travels; tokens stream back as they are generated.");
    let inf = run_json(
        phone,
        &[
            "submit",
            "infer",
            "--model",
            &model_s,
            "--adapter",
            &adapter_s,
            "--prompt",
            "Q: What is bitnode?\nA:",
            "--max-tokens",
            "24",
            "--json",
        ],
    )?;
    let generated: bitnode_protocol::InferResult = serde_json::from_value(inf.result.clone().unwrap_or_default())
        .context("the inference's result is not an inference result")?;
    say(&format!(
        "   -> generated {} tokens on the {}",
        generated.tokens.len(),
        inf.executed_by_name.as_deref().unwrap_or("?")
    ));

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
        let (status, headers, reply) = http_post(&api, "/chat/completions", &body.to_string())?;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        if status != 200 {
            bail!("the API answered {status}: {reply}");
        }
        let v: serde_json::Value = serde_json::from_str(&reply).context("the API's answer is not JSON")?;
        let device = headers
            .lines()
            .find_map(|l| l.strip_prefix("x-bitnode-device: "))
            .unwrap_or("?")
            .trim()
            .to_string();
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
    say("  - the model moved once, by content hash, verified chunk by chunk; nothing left these three devices;");
    say("  - every job and result was signed by the device that sent it and checked by the device that received it;");
    say("  - the inference and the API's chat requests went to the strongest device, which kept the model warm;");
    say("  - when the desktop vanished mid-job, the phone noticed within seconds and the laptop finished the");
    say("    fine-tune from the desktop's last checkpoint: no work was lost beyond the last 10 steps.");
    say("(The built-in model has random weights, so its text is noise: the demo shows the mesh, not the model.)");
    Ok(())
}
