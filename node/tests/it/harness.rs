//! Starting real `bitnode start` daemons and driving them through the CLI, as a user would.
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn bin_path() -> &'static str {
    env!("CARGO_BIN_EXE_bitnode")
}

/// A short fresh directory: the control socket path must stay under the 108-byte Unix limit.
pub fn home(name: &str) -> PathBuf {
    let d = PathBuf::from(format!("/tmp/bn-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `bitnode --home H args…`; returns (success, stdout, stderr).
pub fn cli(home: &Path, args: &[&str]) -> (bool, String, String) {
    let o = Command::new(bin_path())
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

pub fn cli_ok(home: &Path, args: &[&str]) -> String {
    let (ok, out, err) = cli(home, args);
    assert!(ok, "bitnode {args:?} failed: {err}{out}");
    out
}

pub fn cli_err(home: &Path, args: &[&str], needle: &str) -> String {
    let (ok, out, err) = cli(home, args);
    assert!(!ok, "bitnode {args:?} should fail but printed {out}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "bitnode {args:?}: expected {needle:?} in the error, got: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    err
}

/// Polls `f` until it returns Some, or fails the test with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub struct Node {
    pub home: PathBuf,
    pub name: String,
    pub id: String,
    child: Option<Child>,
    /// Runs the daemon under this command prefix (e.g. `ip netns exec NS`).
    prefix: Vec<String>,
    listen: Vec<String>,
    extra: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Node {
    /// `bitnode init` plus a config for tests: no mDNS (tests must not find each other by multicast), a
    /// short benchmark, fast redials, and `extra_config` appended.
    pub fn init(name: &str, extra_config: &str) -> Node {
        let home = home(name);
        cli_ok(&home, &["init", "--name", name]);
        // Defaults for tests, unless `extra_config` sets the key itself (TOML forbids a key twice).
        let mdns = if extra_config.contains("mdns") {
            ""
        } else {
            "mdns = false\n"
        };
        // Each daemon's HTTP API on a port of its own (the default, 7879, is one per machine).
        let api = if extra_config.contains("[api]") {
            ""
        } else {
            "[api]\nlisten = \"127.0.0.1:0\"\n"
        };
        let cfg = format!(
            "[node]\nname = {name:?}\n[network]\n{mdns}reconnect_secs = 1\n{extra_config}\n[capabilities]\nbenchmark_ms = 30\n{api}"
        );
        let cfg = merge_sections(&cfg);
        std::fs::write(home.join("config.toml"), cfg).unwrap();
        let id = cli_ok(&home, &["id"]).trim().to_string();
        Node {
            home,
            name: name.into(),
            id,
            child: None,
            prefix: vec![],
            listen: vec!["/ip4/127.0.0.1/tcp/0".into(), "/ip4/127.0.0.1/udp/0/quic-v1".into()],
            extra: vec![],
            envs: vec![],
        }
    }

    /// A node over an existing, already initialized home (listening on loopback).
    pub fn adopt(home: PathBuf, name: &str) -> Node {
        let id = cli_ok(&home, &["id"]).trim().to_string();
        Node {
            home,
            name: name.into(),
            id,
            child: None,
            prefix: vec![],
            listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
            extra: vec![],
            envs: vec![],
        }
    }

    /// SIGKILL: a crash, as far as the daemon can tell.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `sig` to the daemon (SIGSTOP: a device that hangs without closing its connections).
    pub fn signal(&self, sig: i32) {
        if let Some(c) = self.child.as_ref() {
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    pub fn prefix(mut self, p: &[&str]) -> Node {
        self.prefix = p.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn listen(mut self, l: &[&str]) -> Node {
        self.listen = l.iter().map(|s| s.to_string()).collect();
        self
    }

    /// An environment variable for the daemon (test switches such as BITNODE_TEST_STORE_DELAY_MS).
    pub fn env(mut self, k: &str, v: &str) -> Node {
        self.envs.push((k.into(), v.into()));
        self
    }

    /// The daemon's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn args(mut self, a: &[&str]) -> Node {
        self.extra = a.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.home.join("daemon.log"))
            .unwrap();
        let mut c = if self.prefix.is_empty() {
            Command::new(bin_path())
        } else {
            let mut c = Command::new(&self.prefix[0]);
            c.args(&self.prefix[1..]).arg(bin_path());
            c
        };
        c.arg("--home").arg(&self.home).args(["--log-format", "json", "start"]);
        for l in &self.listen {
            c.args(["--listen", l]);
        }
        c.args(&self.extra);
        c.env("BITNODE_LOG", "info,libp2p_swarm=debug,libp2p_dcutr=debug");
        c.envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c.stdout(Stdio::null()).stderr(log);
        self.child = Some(c.spawn().unwrap());
        let home = self.home.clone();
        wait_for(
            Duration::from_secs(60),
            &format!("daemon {} to answer", self.name),
            || {
                let (ok, out, _) = cli(&home, &["status", "--json"]);
                if ok {
                    let v: Value = serde_json::from_str(&out).ok()?;
                    // Ready once it listens somewhere.
                    (!v["listen_addresses"].as_array()?.is_empty()).then_some(())
                } else {
                    self.check_alive();
                    None
                }
            },
        );
    }

    fn check_alive(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!("daemon {} exited ({st}); log:\n{}", self.name, self.log());
            }
        }
    }

    /// Graceful stop (SIGTERM), as a service manager would.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let start = Instant::now();
            loop {
                if let Ok(Some(st)) = c.try_wait() {
                    assert!(st.success(), "daemon {} exited with {st} on SIGTERM", self.name);
                    break;
                }
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    panic!("daemon {} ignored SIGTERM for 10 s", self.name);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("daemon.log")).unwrap_or_default()
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&cli_ok(&self.home, &["status", "--json"])).unwrap()
    }

    pub fn peers(&self) -> Vec<Value> {
        let v: Value = serde_json::from_str(&cli_ok(&self.home, &["peers", "--json"])).unwrap();
        v.as_array().unwrap().clone()
    }

    /// The daemon's first TCP listen address (to dial it from a hand-made client).
    pub fn tcp_addr(&self) -> libp2p::Multiaddr {
        self.status()["listen_addresses"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .find(|s| s.contains("/tcp/"))
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn peer(&self, id: &str) -> Option<Value> {
        self.peers().into_iter().find(|p| p["id"] == id)
    }

    pub fn invite(&self) -> String {
        let out = cli_ok(&self.home, &["pair", "invite", "--json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v["code"].as_str().unwrap().to_string()
    }

    pub fn join(&self, code: &str) {
        cli_ok(&self.home, &["pair", "join", code]);
    }

    /// Waits until `other` is listed as connected with capabilities; returns its entry.
    pub fn wait_connected(&self, other: &Node, timeout: Duration) -> Value {
        wait_for(
            timeout,
            &format!("{} to see {} connected with capabilities", self.name, other.name),
            || {
                let p = self.peer(&other.id)?;
                (p["connected"] == true && p["capabilities"]["score"].is_number()).then_some(p)
            },
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.home);
        } else {
            eprintln!("--- log of {} ({}) ---\n{}", self.name, self.id, self.log());
        }
    }
}

/// TOML forbids repeating a table; fold repeated `[section]` headers of the generated config together.
fn merge_sections(text: &str) -> String {
    let mut order: Vec<String> = vec![];
    let mut body: std::collections::HashMap<String, String> = Default::default();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            cur = t.to_string();
            if !order.contains(&cur) {
                order.push(cur.clone());
            }
            continue;
        }
        if !t.is_empty() {
            body.entry(cur.clone()).or_default().push_str(&format!("{line}\n"));
        }
    }
    let mut out = body.remove("").unwrap_or_default();
    for s in order {
        out.push_str(&format!("{s}\n{}", body.remove(&s).unwrap_or_default()));
    }
    out
}

/// SIGKILLs this machine's processes whose command line holds both `word` and `needle` (a daemon's job
/// processes or engine host, by its home); returns how many.
pub fn kill_processes(word: &str, needle: &str) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(word) && cmd.contains(needle) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            n += 1;
        }
    }
    n
}

/// A node with a pinned score (nodes on one machine would measure the same), jobs on the CPU reference
/// backend (deterministic, and what a 2-core CI machine runs fastest), and `extra` config.
pub fn pinned_node(name: &str, score: f64, extra: &str) -> Node {
    Node::init(
        name,
        &format!(
            "[capabilities]\nbenchmark = false\nscore = {score}\nternary_gops = {score}\ndevice_memory_bytes = 8589934592\n\
             [engine]\nadapter = \"cpu\"\n{extra}"
        ),
    )
}
