//! `bitnode demo`: three real daemons on loopback — a "phone", a "laptop" and a "desktop" — paired by
//! invite codes; the phone delegates a fine-tune of the built-in tiny model to the desktop, gets the adapter
//! back, and runs inference with it (which also goes to the desktop, the strongest device). Every step is a
//! real `bitnode` command (printed as it runs), so the demo doubles as a tour of the CLI.
//!
//! On one machine the three devices would measure the same GPU, so their capabilities are pinned in their
//! configs (`[capabilities]`): the phone weak and on battery, the laptop middling, the desktop strong.
use crate::control::{self, Request};
use anyhow::{bail, Context};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DATASET: &str = include_str!("../assets/demo-finetune.jsonl");

struct Device {
    name: &'static str,
    home: PathBuf,
    child: Option<Child>,
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = control::call(&self.home, &Request::Shutdown, Duration::from_secs(5));
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

fn config(name: &str, score: f64, mem_gib: u64, battery: bool) -> String {
    let power = if battery {
        "battery_percent = 64.0\non_ac = false\n"
    } else {
        "on_ac = true\n"
    };
    format!(
        "[node]\nname = \"{name}\"\n\n[network]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\nreconnect_secs = 1\n\n\
         [capabilities]\nbenchmark = false\nscore = {score}\nternary_gops = {score}\ndevice = \"{name} GPU (pinned for the demo)\"\n\
         device_memory_bytes = {}\n{power}\n[jobs]\ncheckpoint_every = 5\n",
        mem_gib << 30
    )
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

/// Runs a `bitnode` command as the user would type it (printed first); returns its last stdout line parsed
/// as JSON. Its stderr (progress bars, streamed notes) goes straight to the terminal.
fn run_json(dev: &Device, args: &[&str]) -> anyhow::Result<Value> {
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
    let v: Value =
        serde_json::from_str(last).with_context(|| format!("bitnode {} printed {stdout:?}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "bitnode {} failed: {}",
            args.join(" "),
            v["reason"].as_str().unwrap_or(last)
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
        ("phone", 5.0, 4, true),
        ("laptop", 60.0, 16, false),
        ("desktop", 600.0, 24, false),
    ];
    let mut devs = vec![];
    for (name, score, mem, battery) in specs {
        let home = base.join(name);
        std::fs::create_dir_all(&home)?;
        crate::init(&home, Some(name))?;
        crate::fsutil::write_private(&home.join("config.toml"), config(name, score, mem, battery).as_bytes())?;
        let log = std::fs::File::create(home.join("daemon.log"))?;
        let child = bitnode(&home)
            .arg("start")
            .env("BITNODE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting a daemon")?;
        say(&format!(
            "  started the {name:<7} daemon: capability score {score} (pinned), {mem} GiB{}",
            if battery { ", on battery" } else { "" }
        ));
        devs.push(Device {
            name,
            home,
            child: Some(child),
        });
    }
    for d in &devs {
        wait_for(Duration::from_secs(30), "the daemons to start", || {
            control::is_running(&d.home).then_some(())
        })?;
    }
    let (phone, laptop, desktop) = (&devs[0], &devs[1], &devs[2]);

    say("\n1. Pairing. The phone prints a one-time invite code; the laptop joins with it. Then the same for the desktop.");
    say("   Each device now trusts the other's key, and only the other's key.");
    for other in [laptop, desktop] {
        let inv = control::call(
            &phone.home,
            &Request::PairInvite { ttl_secs: 120 },
            Duration::from_secs(10),
        )?;
        let code = inv["code"].as_str().context("no invite code")?.to_string();
        let v = control::call(
            &other.home,
            &Request::PairJoin { code: code.clone() },
            Duration::from_secs(60),
        )?;
        say(&format!(
            "   {}$ bitnode pair join {}...  -> paired with {}",
            other.name,
            &code[..code.len().min(28)],
            v["name"].as_str().unwrap_or("?")
        ));
    }
    // The laptop and the desktop pair too, so every device knows every other.
    let inv = control::call(
        &laptop.home,
        &Request::PairInvite { ttl_secs: 120 },
        Duration::from_secs(10),
    )?;
    let code = inv["code"].as_str().context("no invite code")?.to_string();
    control::call(&desktop.home, &Request::PairJoin { code }, Duration::from_secs(60))?;
    wait_for(
        Duration::from_secs(30),
        "the phone to see both peers' capabilities",
        || {
            let v = control::call(&phone.home, &Request::Peers, Duration::from_secs(5)).ok()?;
            let list = v.as_array()?;
            let ready = list
                .iter()
                .filter(|p| p["connected"] == true && !p["capabilities"].is_null())
                .count();
            (ready == 2).then_some(())
        },
    )?;
    say("\n   What the phone sees (`bitnode peers`):");
    let v = control::call(&phone.home, &Request::Peers, Duration::from_secs(5))?;
    for p in v.as_array().into_iter().flatten() {
        say(&format!(
            "     {:<8} {} score {:>5}  {:.2} ms",
            p["name"].as_str().unwrap_or("?"),
            p["connection"].as_str().unwrap_or("offline"),
            p["capabilities"]["score"],
            p["rtt_ms"].as_f64().unwrap_or(0.0)
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
    let by = ft["executed_by_name"].as_str().unwrap_or("?").to_string();
    say(&format!(
        "   -> ran on the {by}; loss {:.3} -> {:.3} in {} steps; the adapter landed on the phone in {}",
        ft["result"]["first_loss"].as_f64().unwrap_or(f64::NAN),
        ft["result"]["last_loss"].as_f64().unwrap_or(f64::NAN),
        ft["result"]["steps"],
        adapter.display()
    ));
    if by != "desktop" {
        bail!("the fine-tune ran on the {by}, not on the desktop (the strongest device)");
    }
    let show = run_json(phone, &["jobs", "show", ft["job_id"].as_str().unwrap_or(""), "--json"])?;
    say("   Why the desktop (`bitnode jobs show`):");
    for l in show["placement"].as_array().into_iter().flatten() {
        say(&format!("     {}", l.as_str().unwrap_or("")));
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
    say(&format!(
        "   -> generated {} tokens on the {}",
        inf["result"]["tokens"].as_array().map_or(0, |t| t.len()),
        inf["executed_by_name"].as_str().unwrap_or("?")
    ));

    say("\n4. A second inference request, without the adapter: again the strongest device, the desktop, takes it.");
    let inf2 = run_json(
        phone,
        &[
            "submit",
            "infer",
            "--model",
            &model_s,
            "--prompt",
            "The mesh of my own devices",
            "--max-tokens",
            "16",
            "--json",
        ],
    )?;
    say(&format!(
        "   -> ran on the {}",
        inf2["executed_by_name"].as_str().unwrap_or("?")
    ));

    say("\nWhat happened:");
    say(&format!(
        "  - the phone (weak, on battery) delegated a fine-tune to the desktop ({by}), watched its progress, and got the adapter;"
    ));
    say("  - the model moved once, by content hash, verified chunk by chunk; nothing left these three devices;");
    say("  - every job and result was signed by the device that sent it and checked by the device that received it;");
    say("  - both inference requests went to the strongest device, and its tokens streamed back to the phone.");
    Ok(())
}
