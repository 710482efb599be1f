//! Where a job runs (Mesh II): the candidates are the connected paired peers plus this node; each is
//! either dropped with a reason or given an expected completion time, and the fastest wins. Pure logic over
//! the advertised capabilities, so `bitnode jobs show` can print exactly why a node was (not) chosen.
//!
//! Expected completion time = queue wait + model transfer + compute:
//! - compute = the job's work (ternary ops, from its token count and the model's size) / the advertised
//!   `score` (measured GOPS of the engine's own ternary kernel, halved on battery);
//! - queue wait = queue length x the same compute time (jobs in a queue are assumed alike);
//! - transfer = model bytes / link throughput when the peer does not hold the model (a relayed link is
//!   assumed 10x slower than a direct one: relays are limited and add a hop);
//! - a relayed link adds a fixed latency penalty, so between equals the direct peer wins;
//! - load = the model's bytes / an assumed load rate (at least [`LOAD_FLOOR_S`]) unless the device has the
//!   model warm (its advert lists the engine: an inference there pays no load), so between equals the
//!   device with the model warm wins.
//!
//! A job may name a model this node does not hold (a hash a peer advertises): then only the devices that
//! hold it are candidates (nobody can send it to the others), and its size is unknown here, so its need is
//! [`Need::unsized_inference`]'s nominal one.
use bitnode_protocol::mesh::Capabilities;
use serde::{Deserialize, Serialize};

/// How a candidate is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Link {
    Local,
    Direct,
    Relayed,
}

/// One candidate as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    pub name: String,
    pub link: Link,
    pub caps: Capabilities,
    /// Whether it already holds the job's model (by content hash).
    pub has_model: bool,
    /// Whether its engine host has the job's model (and adapter) loaded: an inference there pays no load.
    pub warm: bool,
    /// Whether it is a phone (or other battery device) the owner allows to work on battery.
    pub battery_allowed: bool,
    /// Why it could not get the model, when it lacks it and no link can carry it (a relay whose per-
    /// connection byte limit is below the model's size, and no direct connection).
    pub no_model_route: Option<String>,
}

/// What the job needs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Need {
    /// Device memory the engine's planner predicts for the job.
    pub memory_bytes: u64,
    /// Ternary operations the job performs (2 x parameters x tokens, x3 for training).
    pub ops: f64,
    pub model_bytes: u64,
}

/// The verdict on one candidate.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub id: String,
    pub name: String,
    /// Expected completion time in seconds, or why the candidate was dropped.
    pub eta_s: Option<f64>,
    pub reason: String,
}

impl Need {
    /// An inference of a model this node does not hold (only a peer does), so it cannot be sized here:
    /// memory is left to the device that holds it (it fails the job as its own fault when the model does
    /// not fit, and the next holder is tried), and the work is that of a nominal
    /// [`NOMINAL_PARAMS`]-parameter model over the prompt and the new tokens. The ranking between holders
    /// then rests on their speed, queues and links, as it does for a sized job.
    pub fn unsized_inference(text_bytes: u64, new_tokens: u64) -> Need {
        // About 4 bytes of text per token, as the sized estimate assumes.
        let tokens = text_bytes.div_ceil(4) + 1 + new_tokens;
        Need {
            memory_bytes: 0,
            ops: 2.0 * NOMINAL_PARAMS * tokens as f64,
            model_bytes: 0,
        }
    }
}

/// Assumed direct-link throughput for model transfers (bytes/s); relayed links get a tenth.
const DIRECT_BPS: f64 = 50e6;
const RELAY_PENALTY_S: f64 = 0.5;
/// Assumed rate of a cold model load (reading, converting and uploading the weights): the 2B-4T shape's
/// 1.2 GB took about 10 s on the H200 (BENCHMARKS.md, "Serving").
const LOAD_BPS: f64 = 120e6;
/// The least a cold load costs (the tiny model loads in about 0.2 s), so a warm device wins between
/// equals even where the model's size is unknown.
pub const LOAD_FLOOR_S: f64 = 0.2;
/// The parameters a model of unknown size is assumed to have (the 2B-4T shape's order of magnitude).
pub const NOMINAL_PARAMS: f64 = 2e9;

/// Ranks the candidates, best first; dropped ones come last with their reason.
pub fn rank(cands: &[Candidate], need: &Need) -> Vec<Verdict> {
    let mut out: Vec<Verdict> = cands
        .iter()
        .map(|c| {
            let v = |eta_s: Option<f64>, reason: String| Verdict {
                id: c.id.clone(),
                name: c.name.clone(),
                eta_s,
                reason,
            };
            let mem = c.caps.device_memory_bytes.unwrap_or(c.caps.system_memory_bytes);
            if mem < need.memory_bytes {
                return v(
                    None,
                    format!("needs {} B of device memory, has {mem} B", need.memory_bytes),
                );
            }
            if c.caps.on_ac == Some(false) && c.caps.battery_percent.is_some() && !c.battery_allowed {
                return v(None, "on battery, and the config does not allow jobs on battery".into());
            }
            if c.link != Link::Local && !c.caps.accepts_jobs {
                return v(None, "it does not take jobs from other devices ([jobs] accept_remote = false)".into());
            }
            if let Some(why) = &c.no_model_route {
                return v(None, format!("cannot get the model: {why}"));
            }
            if c.caps.score <= 0.0 {
                return v(None, "its engine failed the capability check (score 0)".into());
            }
            let compute = need.ops / (c.caps.score * 1e9);
            let queue = c.caps.queue_len as f64 * compute;
            let transfer = if c.has_model || c.link == Link::Local {
                0.0
            } else {
                let bps = if c.link == Link::Relayed { DIRECT_BPS / 10.0 } else { DIRECT_BPS };
                need.model_bytes as f64 / bps
            };
            let latency = if c.link == Link::Relayed { RELAY_PENALTY_S } else { 0.0 };
            let load = if c.warm {
                0.0
            } else {
                (need.model_bytes as f64 / LOAD_BPS).max(LOAD_FLOOR_S)
            };
            let eta = compute + queue + transfer + latency + load;
            v(
                Some(eta),
                format!(
                    "score {:.1}, queue {}, {:?}{}: expected {eta:.2} s (compute {compute:.2}, queue {queue:.2}, transfer {transfer:.2}, load {load:.2})",
                    c.caps.score,
                    c.caps.queue_len,
                    c.link,
                    if c.warm {
                        ", has the model warm"
                    } else if c.has_model {
                        ", has the model"
                    } else {
                        ""
                    },
                ),
            )
        })
        .collect();
    out.sort_by(|a, b| match (a.eta_s, b.eta_s) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(score: f64, mem: u64) -> Capabilities {
        Capabilities {
            score,
            device: "d".into(),
            backend: "vulkan".into(),
            device_type: "discrete".into(),
            vendor: "nvidia".into(),
            device_memory_bytes: Some(mem),
            system_memory_bytes: mem,
            max_binding_bytes: 1 << 30,
            ternary_gops: score,
            battery_percent: None,
            on_ac: None,
            queue_len: 0,
            pinned: false,
            version: "0".into(),
            accepts_jobs: true,
            ..Default::default()
        }
    }

    fn cand(id: &str, link: Link, c: Capabilities) -> Candidate {
        Candidate {
            id: id.into(),
            name: id.into(),
            link,
            caps: c,
            has_model: true,
            warm: false,
            battery_allowed: false,
            no_model_route: None,
        }
    }

    const NEED: Need = Need {
        memory_bytes: 1 << 30,
        ops: 1e12,
        model_bytes: 1 << 30,
    };

    #[test]
    fn the_strongest_fitting_device_wins_and_every_drop_has_a_reason() {
        let mut phone = caps(5.0, 8 << 30);
        phone.battery_percent = Some(40.0);
        phone.on_ac = Some(false);
        let r = rank(
            &[
                cand("phone", Link::Local, phone),
                cand("laptop", Link::Direct, caps(50.0, 16 << 30)),
                cand("desktop", Link::Direct, caps(500.0, 24 << 30)),
                cand("tiny", Link::Direct, caps(5000.0, 256 << 20)),
                cand(
                    "relay",
                    Link::Direct,
                    Capabilities {
                        accepts_jobs: false,
                        ..caps(9000.0, 64 << 30)
                    },
                ),
            ],
            &NEED,
        );
        let order: Vec<&str> = r.iter().map(|v| v.id.as_str()).collect();
        assert_eq!(order[..2], ["desktop", "laptop"]);
        assert!(r[2].eta_s.is_none() && r[3].eta_s.is_none());
        let why = |id: &str| {
            r.iter()
                .find(|v| v.id == id)
                .map(|v| v.reason.clone())
                .unwrap_or_default()
        };
        assert!(why("tiny").contains("device memory"), "{}", why("tiny"));
        assert!(why("phone").contains("battery"), "{}", why("phone"));
        assert!(why("relay").contains("accept_remote"), "{}", why("relay"));
    }

    #[test]
    fn queues_transfers_and_relays_count() {
        let mut busy = caps(500.0, 24 << 30);
        busy.queue_len = 20;
        let mut far = cand("far", Link::Relayed, caps(500.0, 24 << 30));
        far.has_model = false;
        let r = rank(
            &[
                cand("busy", Link::Direct, busy),
                far,
                cand("idle", Link::Direct, caps(200.0, 24 << 30)),
            ],
            &NEED,
        );
        // idle: 5 s; busy: 2 + 40 s; far: 2 s compute + 1 GiB at 5 MB/s.
        assert_eq!(r[0].id, "idle");
        assert!(r[0].eta_s.unwrap_or(f64::MAX) < r[1].eta_s.unwrap_or(0.0));
        // Between equals, the direct link beats the relayed one.
        let r = rank(
            &[
                cand("relayed", Link::Relayed, caps(100.0, 24 << 30)),
                cand("direct", Link::Direct, caps(100.0, 24 << 30)),
            ],
            &NEED,
        );
        assert_eq!(r[0].id, "direct");
    }

    #[test]
    fn a_warm_engine_wins_between_equals_but_not_against_a_much_faster_device() {
        let warm = |id: &str, score: f64| Candidate {
            warm: true,
            ..cand(id, Link::Direct, caps(score, 24 << 30))
        };
        // A 100 MB model: about 0.8 s to load cold.
        let need = Need {
            model_bytes: 100_000_000,
            ..NEED
        };
        let r = rank(
            &[cand("cold", Link::Direct, caps(500.0, 24 << 30)), warm("warm", 500.0)],
            &need,
        );
        assert_eq!(r[0].id, "warm", "{r:?}");
        assert!(r[0].reason.contains("warm"), "{}", r[0].reason);
        // 2 s of compute on the warm device against 0.2 s plus the load on one ten times faster.
        let r = rank(
            &[warm("warm", 500.0), cand("fast", Link::Direct, caps(5000.0, 24 << 30))],
            &need,
        );
        assert_eq!(r[0].id, "fast", "{r:?}");
        // Unknown size (a model only peers hold): the load floor still separates equals.
        let need = Need::unsized_inference(40, 16);
        assert_eq!(need.memory_bytes, 0);
        let r = rank(
            &[cand("cold", Link::Direct, caps(500.0, 24 << 30)), warm("warm", 500.0)],
            &need,
        );
        assert_eq!(r[0].id, "warm", "{r:?}");
    }
}
