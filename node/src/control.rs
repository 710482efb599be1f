//! The local control channel: the CLI talks to the running daemon over `<home>/bitnode.sock`, a Unix
//! socket only its owner can open (0600). One JSON request per line; for streamed requests, one line per
//! event; one JSON response line at the end. The types are in [`crate::api`].
pub use crate::api::{Event, Request, Response};
use serde::de::DeserializeOwned;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest request line the daemon reads (an invite code is a few KB).
pub const MAX_REQUEST: usize = 64 * 1024;
/// Events the daemon holds for one client that is not reading them. A client that falls this far behind
/// is dropped (its job goes on), so a stalled terminal cannot make the daemon buffer without bound.
pub const MAX_EVENT_BACKLOG: usize = 256;
/// How long one write to a client may block before the client is dropped.
pub const CLIENT_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest line the CLI reads from the daemon (a job's result, an adapter summary).
const MAX_REPLY_LINE: u64 = 16 * 1024 * 1024;

pub fn socket_path(home: &Path) -> PathBuf {
    home.join("bitnode.sock")
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
/// the daemon sends heartbeat events, so a dead daemon is still noticed). An event of a kind this build
/// does not know (a newer daemon) is skipped.
pub fn call_stream<T: DeserializeOwned>(
    home: &Path,
    req: &Request,
    idle: Duration,
    on_event: &mut dyn FnMut(Event),
) -> Result<T, ClientError> {
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
        (&mut r).take(MAX_REPLY_LINE).read_line(&mut out).map_err(io)?;
        if out.is_empty() {
            return Err(ClientError::Reply(
                "the daemon closed the connection without answering".into(),
            ));
        }
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| ClientError::Reply(e.to_string()))?;
        if v.get("event").is_some() {
            if let Ok(e) = serde_json::from_value::<Event>(v) {
                on_event(e);
            }
            continue;
        }
        let resp: Response = serde_json::from_value(v).map_err(|e| ClientError::Reply(e.to_string()))?;
        return resp.into_result().map_err(|e| match e {
            crate::api::ReplyError::Daemon(m) => ClientError::Daemon(m),
            crate::api::ReplyError::Malformed(m) => ClientError::Reply(m),
        });
    }
}

/// Whether a daemon answers on `home`'s socket.
pub fn is_running(home: &Path) -> bool {
    UnixStream::connect(socket_path(home)).is_ok()
}

/// Sends one request and waits for its answer. `timeout` bounds each read and write (pairing waits on
/// the network, so it gets longer than a status query).
pub fn call<T: DeserializeOwned>(home: &Path, req: &Request, timeout: Duration) -> Result<T, ClientError> {
    // A one-answer request is a stream without events.
    call_stream(home, req, timeout, &mut |_| {})
}
