//! The local control channel: the CLI talks to the running daemon over `<home>/bitnode.sock`, a Unix
//! socket only its owner can open (0600). One JSON request per line, one JSON response per line.
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest request line the daemon reads (an invite code is a few KB).
pub const MAX_REQUEST: usize = 64 * 1024;

pub fn socket_path(home: &Path) -> PathBuf {
    home.join("bitnode.sock")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Peers,
    PairInvite {
        ttl_secs: u64,
    },
    PairJoin {
        code: String,
    },
    PairAdd {
        peer: String,
        name: Option<String>,
        #[serde(default)]
        addrs: Vec<String>,
    },
    PairList,
    PairRemove {
        peer: String,
    },
    /// `bitnode submit`: the job (model and adapters already imported into the store, named by hash), where
    /// the dataset is (the daemon reads it: it can be far larger than a control line), what the job needs
    /// (for the scheduler), where to run it and where its adapter lands. Unless `detach`, the daemon
    /// streams events (`{"event": ...}` lines) until the final response.
    Submit {
        spec: bitnode_protocol::job::JobSpec,
        #[serde(default)]
        data_path: Option<PathBuf>,
        need: crate::schedule::Need,
        /// "auto", "local", or a paired peer (id or name).
        to: String,
        #[serde(default)]
        out: Option<PathBuf>,
        /// A fine-tune checkpoint directory to start from (`--resume`): it travels with the job.
        #[serde(default)]
        resume: Option<PathBuf>,
        #[serde(default)]
        detach: bool,
    },
    Jobs,
    JobShow {
        id: String,
    },
    JobCancel {
        id: String,
    },
    Shutdown,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub result: serde_json::Value,
    #[serde(default)]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(v: serde_json::Value) -> Response {
        Response {
            ok: true,
            result: v,
            error: None,
        }
    }
    pub fn err(e: impl std::fmt::Display) -> Response {
        Response {
            ok: false,
            result: serde_json::Value::Null,
            error: Some(e.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no bitnode daemon is running for {0} (start one with `bitnode start`)")]
    NotRunning(PathBuf),
    #[error("talking to the daemon at {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("the daemon sent a malformed reply: {0}")]
    Reply(String),
    #[error("{0}")]
    Daemon(String),
}

/// Sends one request and reads its answer: every `{"event": ...}` line before it (requests the daemon
/// answers with a stream, as `bitnode submit`) goes to `on_event`, and the final response line ends the
/// call. `idle` bounds each read and write, not the whole exchange (a fine-tune takes as long as it takes;
/// the daemon sends heartbeat events, so a dead daemon is still noticed).
pub fn call_stream(
    home: &Path,
    req: &Request,
    idle: Duration,
    on_event: &mut dyn FnMut(&serde_json::Value),
) -> Result<serde_json::Value, ClientError> {
    let path = socket_path(home);
    let mut s = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NotRunning(home.to_path_buf()))
        }
        Err(e) => return Err(ClientError::Io(path, e)),
    };
    let io = |e| ClientError::Io(path.clone(), e);
    s.set_read_timeout(Some(idle)).map_err(io)?;
    s.set_write_timeout(Some(idle)).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Reply(e.to_string()))?;
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut r = BufReader::new(s);
    loop {
        let mut out = String::new();
        r.read_line(&mut out).map_err(io)?;
        if out.is_empty() {
            return Err(ClientError::Reply(
                "the daemon closed the connection without answering".into(),
            ));
        }
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| ClientError::Reply(e.to_string()))?;
        if v.get("event").is_some() {
            on_event(&v);
            continue;
        }
        let resp: Response = serde_json::from_value(v).map_err(|e| ClientError::Reply(e.to_string()))?;
        return if resp.ok {
            Ok(resp.result)
        } else {
            Err(ClientError::Daemon(
                resp.error.unwrap_or_else(|| "unknown error".into()),
            ))
        };
    }
}

/// Whether a daemon answers on `home`'s socket.
pub fn is_running(home: &Path) -> bool {
    UnixStream::connect(socket_path(home)).is_ok()
}

/// Sends one request and waits for its answer. `timeout` bounds each read and write (pairing waits on
/// the network, so it gets longer than a status query).
pub fn call(home: &Path, req: &Request, timeout: Duration) -> Result<serde_json::Value, ClientError> {
    // A one-answer request is a stream without events.
    call_stream(home, req, timeout, &mut |_| {})
}
