//! The daemon's local API: one set of serde types for the requests the CLI sends over the control socket,
//! the reply each one gets, and the events a streamed request (`bitnode submit`, `bitnode jobs follow`)
//! receives before its reply. The daemon builds replies from these types and the CLI reads them back into
//! the same types, so the two ends cannot drift apart and nothing is looked up by string.
//!
//! On the wire (see [`crate::control`]) a request is one JSON line; every event is one line
//! `{"event": "<kind>", ...}`; the exchange ends with one [`Response`] line whose `result` is the reply
//! type named on each request below. The `--json` output of the CLI prints these same types, so they are
//! also the documented JSON contract of the commands.
use bitnode_protocol::mesh::Capabilities;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A request to the daemon. The reply type of each is named in its comment.
// One is built per control line and moved once: the size of its largest variant (a job) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// -> [`Status`]
    Status,
    /// -> `Vec<`[`PeerInfo`]`>`
    Peers,
    /// -> [`InviteReply`]
    PairInvite { ttl_secs: u64 },
    /// -> [`Paired`], once the handshake ends.
    PairJoin { code: String },
    /// -> [`Paired`]
    PairAdd {
        peer: String,
        name: Option<String>,
        #[serde(default)]
        addrs: Vec<String>,
    },
    /// -> `Vec<`[`TrustEntry`]`>`
    PairList,
    /// -> [`Paired`] (the peer that was removed)
    PairRemove { peer: String },
    /// `bitnode submit`: the job (model and adapters already imported into the store, named by hash), where
    /// the dataset is (the daemon reads it: it can be far larger than a control line), what the job needs
    /// (for the scheduler), where to run it and where its adapter lands. Unless `detach`, the daemon
    /// streams [`Event`]s until the reply. -> [`JobView`]
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
        /// Cancel the job once every client waiting for it has gone (the HTTP API's requests; a
        /// `bitnode submit` that goes away leaves its job running).
        #[serde(default)]
        cancel_on_disconnect: bool,
    },
    /// -> `Vec<`[`JobView`]`>`, newest first.
    Jobs,
    /// -> [`JobView`]
    JobShow { id: String },
    /// -> [`JobView`]
    JobCancel { id: String },
    /// `bitnode jobs follow`: streams the job's [`Event`]s from now on (a terminal re-attaching after a
    /// restart or a `--detach`) until it ends. -> [`JobView`] (at once, for a job that already ended)
    JobFollow { id: String },
    /// -> `String` ("stopping")
    Shutdown,
    /// The model store changed (`bitnode model add` or `remove`): the daemon lists it again, so its
    /// capability advert names what it holds now. -> `String` ("ok")
    ModelsChanged,
}

/// The final line of every exchange. `result` holds the request's reply type when `ok`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub result: serde_json::Value,
    #[serde(default)]
    pub error: Option<String>,
}

impl Response {
    /// A successful reply carrying `v` (one of this module's reply types).
    pub fn ok<T: Serialize>(v: &T) -> Response {
        match serde_json::to_value(v) {
            Ok(result) => Response {
                ok: true,
                result,
                error: None,
            },
            // Only a map with non-string keys fails to serialize; none of the reply types has one.
            Err(e) => Response::err(format!("encoding the reply: {e}")),
        }
    }

    pub fn err(e: impl std::fmt::Display) -> Response {
        Response {
            ok: false,
            result: serde_json::Value::Null,
            error: Some(e.to_string()),
        }
    }

    /// The reply as its type, or the daemon's error.
    pub fn into_result<T: DeserializeOwned>(self) -> Result<T, ReplyError> {
        if !self.ok {
            return Err(ReplyError::Daemon(self.error.unwrap_or_else(|| "unknown error".into())));
        }
        serde_json::from_value(self.result).map_err(|e| ReplyError::Malformed(e.to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("{0}")]
    Daemon(String),
    #[error("the daemon sent a malformed reply: {0}")]
    Malformed(String),
}

/// `bitnode status --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub id: String,
    pub name: String,
    pub listen_addresses: Vec<String>,
    pub relayed_addresses: Vec<String>,
    pub external_addresses: Vec<String>,
    pub relay_server: bool,
    /// A pre-shared mesh key is set (QUIC is then off).
    pub psk: bool,
    pub paired_peers: usize,
    pub connected_peers: usize,
    pub open_invites: usize,
    pub uptime_secs: u64,
    pub capabilities: Capabilities,
    pub version: String,
    /// The OpenAI-compatible API's base URL (`http://host:port/v1`); None when it is off.
    #[serde(default)]
    pub api_url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionKind {
    Direct,
    Relayed,
}

/// One paired peer, as `bitnode peers --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: String,
    pub name: String,
    pub connected: bool,
    /// None while not connected.
    pub connection: Option<ConnectionKind>,
    /// The addresses of its open connections first, then those the trust list remembers.
    pub addresses: Vec<String>,
    pub rtt_ms: Option<f64>,
    pub capabilities: Option<Capabilities>,
}

/// One entry of the trust list (`bitnode pair list --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrustEntry {
    pub id: String,
    pub name: String,
    /// Unix seconds.
    pub added: u64,
    /// "invite", "join" or "manual".
    pub via: String,
    pub addresses: Vec<String>,
}

/// `bitnode pair invite --json` (the CLI prints `code` and `expires_unix`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InviteReply {
    pub code: String,
    pub expires_unix: u64,
    /// The addresses the code carries, relayed ones first.
    pub addresses: Vec<String>,
}

/// A peer that was paired (join, add) or unpaired (remove).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Paired {
    pub peer_id: String,
    pub name: String,
}

/// The latest fine-tune progress of a job, as its worker streamed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub step: u64,
    pub total: u64,
    pub loss: f64,
    pub lr: f64,
    pub tokens_per_second: f64,
    /// Peer id of the worker that sent it.
    pub worker: String,
}

/// A job as `bitnode jobs show --json`, `bitnode jobs --json` and the last line of `bitnode submit --json`
/// print it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub job_id: String,
    #[serde(default)]
    pub kind: String,
    pub state: crate::jobs::State,
    #[serde(default)]
    pub submitter: String,
    #[serde(default)]
    pub executed_by: Option<String>,
    #[serde(default)]
    pub executed_by_name: Option<String>,
    #[serde(default)]
    pub created_unix: u64,
    #[serde(default)]
    pub updated_unix: u64,
    /// The scheduler's verdict on every candidate, best first.
    #[serde(default)]
    pub placement: Vec<String>,
    /// Devices tried before, oldest first.
    #[serde(default)]
    pub attempts: Vec<String>,
    #[serde(default)]
    pub reason: Option<String>,
    /// The object the local command's `--json` prints (its shape depends on the job's kind, and it is
    /// passed through as the worker produced it).
    #[serde(default)]
    pub result: Option<serde_json::Value>,
    /// Where a fine-tune's adapter lands on the submitter.
    #[serde(default)]
    pub out: Option<String>,
    /// Only while the job is live on this node (submitted here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_step: Option<u64>,
}

impl JobView {
    pub fn of(j: &crate::jobs::Job) -> JobView {
        JobView {
            job_id: j.id.clone(),
            kind: j.kind.clone(),
            state: j.state,
            submitter: j.submitter.clone(),
            executed_by: j.executed_by.clone(),
            executed_by_name: j.executed_by_name.clone(),
            created_unix: j.created_unix,
            updated_unix: j.updated_unix,
            placement: j.placement.clone(),
            attempts: j.attempts.clone(),
            reason: j.reason.clone(),
            result: j.result.clone(),
            out: j.out.clone(),
            progress: None,
            checkpoint_step: None,
        }
    }
}

/// What a streamed request receives before its reply: one JSON line each, tagged `"event"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The job went to a device (again, after a failover, when `after` says why).
    Placed {
        executed_by: String,
        name: String,
        attempt: u32,
        why: String,
        after: Option<String>,
        placement: Vec<String>,
    },
    /// The device accepted the job (it may queue it behind others).
    Accepted {
        worker: String,
        queue_position: u32,
    },
    /// The device running the job lost it; the job moves on unless it was pinned.
    AttemptFailed {
        worker: String,
        name: String,
        reason: String,
    },
    /// Generated text (batched).
    Tokens {
        ids: Vec<u32>,
        text: String,
    },
    Progress(Progress),
    /// A fine-tune checkpoint arrived here (a failover resumes from it).
    Checkpoint {
        step: u64,
        worker: String,
    },
    /// Sent every tick while the job lives, so a client notices a dead daemon.
    Heartbeat {},
    /// The job ended: the same view the reply carries.
    Finished(Box<JobView>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_tagged_lines_and_round_trip() {
        let e = Event::Tokens {
            ids: vec![1, 2],
            text: "hi".into(),
        };
        let s = serde_json::to_string(&e).unwrap();
        assert!(s.starts_with("{\"event\":\"tokens\""), "{s}");
        assert_eq!(serde_json::from_str::<Event>(&s).unwrap(), e);
        let p = Event::Progress(Progress {
            step: 3,
            total: 10,
            loss: 1.5,
            lr: 1e-3,
            tokens_per_second: 100.0,
            worker: "w".into(),
        });
        let s = serde_json::to_string(&p).unwrap();
        assert!(s.contains("\"event\":\"progress\"") && s.contains("\"step\":3"), "{s}");
        assert_eq!(serde_json::from_str::<Event>(&s).unwrap(), p);
        let h = serde_json::to_string(&Event::Heartbeat {}).unwrap();
        assert_eq!(h, "{\"event\":\"heartbeat\"}");
    }

    #[test]
    fn replies_carry_their_type_or_the_error() {
        let r = Response::ok(&Paired {
            peer_id: "p".into(),
            name: "n".into(),
        });
        let back: Paired = r.into_result().unwrap();
        assert_eq!(back.name, "n");
        let e = Response::err("nope").into_result::<Paired>().unwrap_err();
        assert_eq!(e.to_string(), "nope");
        let m = Response::ok(&"text").into_result::<Paired>().unwrap_err();
        assert!(matches!(m, ReplyError::Malformed(_)));
    }
}
