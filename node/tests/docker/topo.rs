//! The harness under the Docker scenarios: the image, one topology per scenario (docker/topology.sh, the
//! same script users run), `bitnode` driven inside the containers through `docker exec`, and the
//! scenario runner (time limit, logs on failure, clean-up whether it passes or fails).
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The image the scenarios run, built from this test build's own `bitnode` binary.
pub const IMAGE: &str = "bitnode:it";
/// Everything a scenario creates is named `bnit<N>-…`; leftovers of an aborted run are found by it.
const PREFIX: &str = "bnit";

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// `cmd` under coreutils `timeout` (so a wedged `docker exec` cannot hang the harness), with no stdin.
fn limited(cmd: &[&str], limit: Duration) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-k", "5", &limit.as_secs().max(1).to_string()])
        .args(cmd)
        .stdin(Stdio::null());
    c
}

/// Runs a prepared command: (success, stdout, stderr).
fn output(mut c: Command) -> (bool, String, String) {
    match c.output() {
        Ok(o) => (o.status.success(), lossy(&o.stdout), lossy(&o.stderr)),
        Err(e) => (false, String::new(), format!("{c:?}: {e}")),
    }
}

/// Runs a command with a time limit; returns (success, stdout, stderr).
pub fn run(cmd: &[&str], limit: Duration) -> (bool, String, String) {
    output(limited(cmd, limit))
}

fn available() -> Result<(), String> {
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (containers with NET_ADMIN, debootstrap)".into());
    }
    let (ok, _, err) = run(&["docker", "info"], Duration::from_secs(30));
    if !ok {
        return Err(format!(
            "needs a running Docker engine (apt-get install docker.io; dockerd --storage-driver=vfs &): {}",
            err.trim()
        ));
    }
    Ok(())
}

/// Under `CI=true` a missing Docker fails the scenario; elsewhere it is skipped with a message.
fn require_docker() -> bool {
    if let Err(why) = available() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("the Docker scenarios must run in CI but cannot: {why}");
        }
        eprintln!("skipping the Docker scenario: {why}");
        return false;
    }
    true
}

/// The binary baked into the image: this test build's own, or BITNODE_DOCKER_BIN (a release build, for
/// the benchmark numbers).
fn binary() -> String {
    std::env::var("BITNODE_DOCKER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_bitnode").to_string())
}

static IMAGE_BUILT: OnceLock<Result<(), String>> = OnceLock::new();

/// docker/image.sh once per test run: the debootstrap base the first time on a machine (about 90 s),
/// then the runtime image with the binary (about 30 s).
fn image() -> Result<(), String> {
    IMAGE_BUILT
        .get_or_init(|| {
            let t0 = Instant::now();
            let mut c = limited(&["bash", "docker/image.sh", IMAGE], Duration::from_secs(900));
            c.env("BITNODE_BIN", binary()).current_dir(repo());
            let (ok, out, err) = output(c);
            if !ok {
                return Err(format!("docker/image.sh failed: {out}{err}"));
            }
            // The runtime image carries lavapipe: a container without a GPU has a Vulkan device.
            let (ok, out, err) = run(&["docker", "run", "--rm", IMAGE, "devices"], Duration::from_secs(60));
            if !ok || !out.contains("llvmpipe") {
                return Err(format!("no lavapipe in the image: {out}{err}"));
            }
            eprintln!("image {IMAGE} built in {:.1?}", t0.elapsed());
            Ok(())
        })
        .clone()
}

/// Removes every container, network and volume of an earlier, aborted run of the harness.
fn sweep() {
    let list = |what: &[&str]| -> Vec<String> {
        let (_, out, _) = run(what, Duration::from_secs(30));
        out.split_whitespace().map(str::to_string).collect()
    };
    let f = format!("name=^{PREFIX}");
    let cs = list(&["docker", "ps", "-aq", "--filter", &f]);
    if !cs.is_empty() {
        let mut a = vec!["docker", "rm", "-f", "-v"];
        a.extend(cs.iter().map(String::as_str));
        run(&a, Duration::from_secs(120));
    }
    for n in list(&["docker", "network", "ls", "-q", "--filter", &f]) {
        run(&["docker", "network", "rm", &n], Duration::from_secs(30));
    }
    for v in list(&["docker", "volume", "ls", "-q", "--filter", &f]) {
        run(&["docker", "volume", "rm", &v], Duration::from_secs(30));
    }
}

/// One scenario's topology: relay, intruder, phone, laptop, desktop and two routers.
pub struct Mesh {
    pub prefix: String,
    ids: Mutex<HashMap<String, String>>,
}

/// How long one `docker exec bitnode …` may take (a fine-tune in the foreground is the longest).
const EXEC_LIMIT: Duration = Duration::from_secs(400);

impl Mesh {
    fn new(prefix: String) -> Mesh {
        Mesh {
            prefix,
            ids: Mutex::new(HashMap::new()),
        }
    }

    fn topology(&self, args: &[&str], limit: Duration) -> (bool, String, String) {
        let mut a = vec!["bash", "docker/topology.sh"];
        a.extend(args);
        let mut c = limited(&a, limit);
        c.env("BN_PREFIX", &self.prefix)
            .env("BITNODE_IMAGE", IMAGE)
            .env("BITNODE_LOG", "info")
            .current_dir(repo());
        output(c)
    }

    fn up(&self) {
        let t0 = Instant::now();
        let (ok, out, err) = self.topology(&["up"], Duration::from_secs(300));
        assert!(ok, "docker/topology.sh up failed: {out}{err}");
        eprintln!("{}: topology up in {:.1?}", self.prefix, t0.elapsed());
    }

    fn down(&self) {
        let (ok, out, err) = self.topology(&["down"], Duration::from_secs(180));
        if !ok {
            eprintln!("{}: docker/topology.sh down: {out}{err}", self.prefix);
        }
    }

    fn logs(&self, dir: &Path) {
        let d = dir.display().to_string();
        let (ok, out, err) = self.topology(&["logs", &d], Duration::from_secs(180));
        if !ok {
            eprintln!("{}: collecting logs failed: {out}{err}", self.prefix);
        }
    }

    /// The container of a device (or router).
    pub fn c(&self, dev: &str) -> String {
        format!("{}-{dev}", self.prefix)
    }

    pub fn docker(&self, args: &[&str]) -> (bool, String, String) {
        let mut a = vec!["docker"];
        a.extend(args);
        run(&a, Duration::from_secs(120))
    }

    pub fn docker_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.docker(args);
        assert!(ok, "docker {args:?}: {out}{err}");
        out
    }

    /// `bitnode args…` inside the device's container: (success, stdout, stderr).
    pub fn bitnode(&self, dev: &str, args: &[&str]) -> (bool, String, String) {
        let c = self.c(dev);
        let mut a = vec!["docker", "exec", c.as_str(), "bitnode"];
        a.extend(args);
        run(&a, EXEC_LIMIT)
    }

    pub fn ok(&self, dev: &str, args: &[&str]) -> String {
        let (ok, out, err) = self.bitnode(dev, args);
        assert!(ok, "{dev}: bitnode {args:?} failed: {err}{out}");
        assert!(!err.contains("panicked"), "{dev}: bitnode {args:?} panicked: {err}");
        out
    }

    /// The JSON of a command's last line (every `--json` command ends with one), and whether it succeeded.
    pub fn last_json(&self, dev: &str, args: &[&str]) -> (bool, Value, String) {
        let (ok, out, err) = self.bitnode(dev, args);
        let last = out.lines().last().unwrap_or("");
        let v = serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("{dev}: bitnode {args:?}: last line {last:?} is not JSON ({e}); stderr: {err}"));
        (ok, v, err)
    }

    pub fn json(&self, dev: &str, args: &[&str]) -> Value {
        let out = self.ok(dev, args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{dev}: bitnode {args:?}: not JSON ({e}): {out}"))
    }

    /// A shell command inside the container.
    pub fn sh(&self, dev: &str, script: &str) -> (bool, String, String) {
        let c = self.c(dev);
        run(&["docker", "exec", &c, "sh", "-c", script], EXEC_LIMIT)
    }

    pub fn sh_ok(&self, dev: &str, script: &str) -> String {
        let (ok, out, err) = self.sh(dev, script);
        assert!(ok, "{dev}: sh -c {script:?}: {out}{err}");
        out
    }

    /// Writes a file inside the container.
    pub fn put(&self, dev: &str, path: &str, bytes: &[u8]) {
        let mut child = Command::new("docker")
            .args(["exec", "-i", &self.c(dev), "sh", "-c", &format!("cat > '{path}'")])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(bytes).unwrap();
        assert!(child.wait().unwrap().success(), "{dev}: writing {path}");
    }

    /// Reads a file out of the container.
    pub fn get(&self, dev: &str, path: &str) -> Vec<u8> {
        let o = Command::new("docker")
            .args(["exec", &self.c(dev), "cat", path])
            .output()
            .unwrap();
        assert!(o.status.success(), "{dev}: reading {path}: {}", lossy(&o.stderr));
        o.stdout
    }

    /// The daemon's log (its stderr, as Docker keeps it).
    pub fn log(&self, dev: &str) -> String {
        let (_, out, err) = self.docker(&["logs", &self.c(dev)]);
        out + &err
    }

    pub fn status(&self, dev: &str) -> Value {
        self.json(dev, &["status", "--json"])
    }

    pub fn id(&self, dev: &str) -> String {
        if let Some(id) = self.ids.lock().unwrap().get(dev) {
            return id.clone();
        }
        let id = self.ok(dev, &["id"]).trim().to_string();
        self.ids.lock().unwrap().insert(dev.into(), id.clone());
        id
    }

    pub fn peers(&self, dev: &str) -> Vec<Value> {
        match self.bitnode(dev, &["peers", "--json"]) {
            (true, out, _) => match serde_json::from_str::<Value>(&out) {
                Ok(Value::Array(a)) => a,
                _ => vec![],
            },
            _ => vec![],
        }
    }

    pub fn peer(&self, dev: &str, other: &str) -> Option<Value> {
        let id = self.id(other);
        self.peers(dev).into_iter().find(|p| p["id"] == id.as_str())
    }

    pub fn invite(&self, dev: &str) -> String {
        let v = self.json(dev, &["pair", "invite", "--json"]);
        v["code"].as_str().unwrap().to_string()
    }

    pub fn join(&self, dev: &str, code: &str) {
        self.ok(dev, &["pair", "join", code]);
    }

    /// Waits until `dev` lists `other` as connected with capabilities; returns its entry.
    pub fn wait_connected(&self, dev: &str, other: &str, limit: Duration) -> Value {
        wait_for(limit, &format!("{dev} to see {other} connected"), || {
            let p = self.peer(dev, other)?;
            (p["connected"] == true && p["capabilities"]["score"].is_number()).then_some(p)
        })
    }

    /// Waits until the device's daemon answers again (after a restart).
    pub fn wait_ready(&self, dev: &str, limit: Duration) {
        wait_for(limit, &format!("{dev}'s daemon"), || {
            self.bitnode(dev, &["status"]).0.then_some(())
        });
    }
}

/// Polls `f` every 250 ms until it returns Some, or fails the scenario with `what` after `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if t0.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs a command and times its first byte on stdout and its end: (first byte, total, success).
pub fn first_byte(cmd: &[&str]) -> (Duration, Duration, bool) {
    let t0 = Instant::now();
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut b = [0u8; 1];
    let first = match out.read(&mut b) {
        Ok(1) => t0.elapsed(),
        _ => Duration::MAX,
    };
    let mut rest = vec![];
    let _ = out.read_to_end(&mut rest);
    let ok = child.wait().map(|s| s.success()).unwrap_or(false);
    (first, t0.elapsed(), ok)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Scenarios take turns: they share the topology's subnets, and the machine has two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs scenario `n`: a fresh topology, then `body`, within `limit` (the topology's start included). On
/// failure or timeout every container's log, status, peers and jobs, and the routers' counters, go to
/// `target/tmp/docker-logs/bnit<N>/` and the daemons' last lines to stderr. The topology (containers,
/// networks, volumes) is removed whether the scenario passes or fails.
pub fn scenario(n: u32, name: &str, limit: Duration, body: impl FnOnce(&Mesh) + Send + 'static) {
    if !require_docker() {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = image() {
        panic!("scenario {n} ({name}): {e}");
    }
    sweep();
    let mesh = Arc::new(Mesh::new(format!("{PREFIX}{n}")));
    let m = mesh.clone();
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    eprintln!("scenario {n} ({name}): starting");
    std::thread::spawn(move || {
        m.up();
        body(&m);
        let _ = tx.send(());
    });
    let failed = match rx.recv_timeout(limit) {
        Ok(()) => None,
        Err(mpsc::RecvTimeoutError::Timeout) => Some(format!("timed out after {limit:?}")),
        Err(mpsc::RecvTimeoutError::Disconnected) => Some("failed (the panic is printed above)".into()),
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("docker-logs")
        .join(&mesh.prefix);
    if failed.is_some() {
        let _ = std::fs::remove_dir_all(&dir);
        mesh.logs(&dir);
        for d in ["relay", "intruder", "phone", "laptop", "desktop"] {
            let log = std::fs::read_to_string(dir.join(format!("{d}.log"))).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- {}: last lines of its log ---", mesh.c(d));
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
    }
    mesh.down();
    match failed {
        None => eprintln!("scenario {n} ({name}): passed in {:.1?}", t0.elapsed()),
        Some(why) => panic!("scenario {n} ({name}) {why}; logs in {}", dir.display()),
    }
}
