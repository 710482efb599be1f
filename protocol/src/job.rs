//! Jobs between paired devices: what a job is (one serde type for the local commands and the wire) and the
//! signed envelope it travels in.
//!
//! An envelope binds a payload to its submitter's ed25519 key (the same key as the device's libp2p
//! identity), the one peer it is meant for, a validity window and a random nonce. A worker accepts it only
//! when all of these hold, checked in [`Envelope::open`], cheapest first:
//! - the header names this worker as the target and the window is current (60 s of clock skew allowed,
//!   at most one hour of validity, so replays need remembering for an hour at most);
//! - the submitter's key is in the worker's trust list;
//! - the payload hashes to the signed SHA-256, and the signature verifies (strict ed25519);
//! - the (submitter, nonce) pair has not been seen before ([`NonceCache`]).
//!
//! Results and progress travel back in envelopes of their own kind, signed by the worker and targeted at
//! the submitter, so a result cannot be forged or replayed into another job. Unlike a shared mesh token,
//! nothing here is a bearer secret: stealing traffic gives an attacker nothing to submit with.
use crate::{InferRequest, ScoreRequest};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// Domain separation: these signatures can never be confused with anything else signed by the same key.
const DOMAIN: &[u8] = b"bitnode/envelope/1\0";
/// Longest validity window an envelope may claim.
pub const MAX_LIFETIME_SECS: u64 = 3600;
/// Tolerated clock difference between devices.
pub const CLOCK_SKEW_SECS: u64 = 60;

/// `bitnode finetune` as a job: the same settings as the local command, with the dataset carried inline
/// (it travels with the job) and the model named by content hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneRequest {
    pub model: String,
    /// The dataset's file name (its extension selects the format) and bytes.
    pub data_name: String,
    pub data: Vec<u8>,
    pub init_adapter: Option<String>,
    pub rank: usize,
    pub alpha: f32,
    pub lora_dropout: Option<f32>,
    pub targets: Vec<String>,
    pub lr: f64,
    pub steps: Option<usize>,
    pub epochs: Option<f64>,
    pub batch: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub weight_decay: f64,
    pub warmup: usize,
    pub schedule: String,
    pub max_grad_norm: Option<f32>,
    pub shuffle: bool,
    pub seed: u64,
    pub val_split: f64,
    /// Checkpoint (and stream it back to the submitter) every N steps, so another device can resume.
    pub save_every: Option<usize>,
    pub max_memory: Option<u64>,
    /// `--activation`: the FFN activation, overriding what the model's files imply ("relu2" or "silu").
    #[serde(default)]
    pub activation: Option<String>,
}

/// Every kind of job a device can run for another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobSpec {
    Infer(InferRequest),
    Score(ScoreRequest),
    Finetune(Box<FinetuneRequest>),
}

impl JobSpec {
    /// "infer", "score" or "finetune": the local command this job is.
    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Infer(_) => "infer",
            JobSpec::Score(_) => "score",
            JobSpec::Finetune(_) => "finetune",
        }
    }

    /// The model the job runs on (a directory for a local run, a content hash on the wire).
    pub fn model(&self) -> &str {
        match self {
            JobSpec::Infer(r) => &r.model,
            JobSpec::Score(r) => &r.model,
            JobSpec::Finetune(r) => &r.model,
        }
    }

    /// Every content-addressed directory the job needs: the model, then any adapter it starts from.
    pub fn inputs(&self) -> Vec<&str> {
        let mut v = vec![self.model()];
        let extra = match self {
            JobSpec::Infer(r) => r.adapter.as_deref(),
            JobSpec::Score(r) => r.adapter.as_deref(),
            JobSpec::Finetune(r) => r.init_adapter.as_deref(),
        };
        v.extend(extra);
        v
    }
}

/// Files that travel inside a message: a fine-tune checkpoint (adapter, both AdamW moments, trainer
/// state) or a finished adapter. Paths are relative, `/`-separated, at most two components, each a plain
/// name (no `..`, no leading dot, no control characters), so unpacking can never write outside its
/// directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    pub files: Vec<BundleFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFile {
    pub path: String,
    pub bytes: Vec<u8>,
}

/// Most files one bundle may hold.
pub const MAX_BUNDLE_FILES: usize = 64;

/// Whether `name` is one plain path component a peer may name (a file in a bundle or a model manifest).
pub fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\\')
        && !name.chars().any(|c| c.is_control())
}

impl Bundle {
    pub fn total_bytes(&self) -> usize {
        self.files.iter().map(|f| f.bytes.len()).sum()
    }

    /// Refuses unsafe or duplicate paths and too many files.
    pub fn check(&self) -> Result<(), String> {
        if self.files.len() > MAX_BUNDLE_FILES {
            return Err(format!(
                "{} files in a bundle (at most {MAX_BUNDLE_FILES})",
                self.files.len()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.files {
            let parts: Vec<&str> = f.path.split('/').collect();
            if parts.len() > 2 || !parts.iter().all(|p| plain_name(p)) {
                return Err(format!("unsafe path {:?} in a bundle", f.path));
            }
            if !seen.insert(f.path.as_str()) {
                return Err(format!("duplicate path {:?} in a bundle", f.path));
            }
        }
        Ok(())
    }
}

/// The payload of a `Job` envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobPayload {
    /// Model and adapters named by content hash (64 lowercase hex digits), never by path.
    pub spec: JobSpec,
    /// A fine-tune checkpoint to resume from (failover: the last one the previous worker streamed back).
    pub resume: Option<Bundle>,
    /// 0 for the first device asked, 1 for the next, ...
    pub attempt: u32,
}

/// The worker's answer to a `Job` or `Cancel` envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobAck {
    /// Queued at this position (0 = running now).
    Accepted {
        queue_position: u32,
    },
    Rejected {
        reason: String,
    },
}

/// Worker to submitter, in an `Update` envelope (everything but `Done`) or a `Result` envelope (`Done`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Update {
    /// Sent every few seconds while the job is queued or running: silence means the worker is gone.
    Heartbeat {
        running: bool,
    },
    /// Generated text as it is made (one or more tokens).
    Tokens {
        ids: Vec<u32>,
        text: String,
    },
    /// A fine-tune step.
    Progress {
        step: u64,
        total: u64,
        loss: f64,
        lr: f64,
        tokens_per_second: f64,
    },
    /// A fine-tune checkpoint at `step`, for resuming elsewhere if this worker goes away.
    Checkpoint {
        step: u64,
        bundle: Bundle,
    },
    Done(Outcome),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// `result_json` is what the local command's `--json` prints; `files` the adapter of a fine-tune.
    Succeeded {
        result_json: String,
        files: Bundle,
    },
    /// `device_fault`: the device failed, not the job (it could not get the model, start the job, or the
    /// job process died without an error of its own), so another device may succeed: the submitter fails
    /// over. Otherwise (bad data, bad settings) every device would fail the same way.
    Failed {
        reason: String,
        device_fault: bool,
    },
    Cancelled {
        reason: String,
    },
}

/// The submitter's answer to an update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateAck {
    Ok,
    /// The submitter does not expect updates for this job from this worker (it was cancelled, moved to
    /// another device, or never existed): the worker should stop it.
    Stop {
        reason: String,
    },
    Rejected {
        reason: String,
    },
}

/// Worker to submitter: fetch a content-addressed model (or adapter) directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelRequest {
    Manifest { hash: String },
    Chunk { hash: String, file: u32, index: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelResponse {
    Manifest(Manifest),
    Chunk { bytes: Vec<u8> },
    Refused { reason: String },
}

/// What a model directory holds: each file with its length and the SHA-256 of each of its
/// [`crate::wire::MODEL_CHUNK`]-byte chunks, so every chunk is verified on arrival and a broken transfer
/// resumes from the verified prefix. The directory's content hash checks the whole at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub hash: String,
    pub files: Vec<ManifestFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub name: String,
    pub len: u64,
    pub chunks: Vec<[u8; 32]>,
}

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A job, submitter to worker.
    Job,
    /// Progress, tokens or a checkpoint, worker to submitter.
    Update,
    /// The final result, worker to submitter.
    Result,
    /// A cancellation, submitter to worker.
    Cancel,
}

/// The signed part of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub kind: Kind,
    pub job_id: [u8; 16],
    /// ed25519 public key of the signer.
    pub signer: [u8; 32],
    /// ed25519 public key of the one device meant to open it.
    pub target: [u8; 32],
    pub created_unix: u64,
    pub expires_unix: u64,
    pub nonce: [u8; 16],
    pub payload_sha256: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub header: Header,
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Why an envelope was refused. Each is logged with the sending peer and answered with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("the envelope is addressed to another device")]
    WrongTarget,
    #[error("the envelope is a {0:?}, not what this stream carries")]
    WrongKind(Kind),
    #[error("the envelope expired {0} s ago")]
    Expired(u64),
    #[error("the envelope is dated {0} s in the future (check the clocks)")]
    FromTheFuture(u64),
    #[error("the envelope claims a validity of {0} s (at most {MAX_LIFETIME_SECS})")]
    TooLong(u64),
    #[error("the submitter is not paired with this device")]
    NotPaired,
    #[error("the payload does not match its signed hash (tampered)")]
    PayloadMismatch,
    #[error("bad signature")]
    BadSignature,
    #[error("replayed envelope (nonce already used)")]
    Replay,
    #[error("payload of {0} bytes exceeds the limit of {1}")]
    Oversized(usize, usize),
    #[error("malformed payload: {0}")]
    Malformed(String),
}

fn signed_bytes(h: &Header) -> Vec<u8> {
    let mut v = DOMAIN.to_vec();
    // The header is fixed-size plain data; this encoding is stable across builds of the same protocol id.
    v.push(h.kind as u8);
    v.extend_from_slice(&h.job_id);
    v.extend_from_slice(&h.signer);
    v.extend_from_slice(&h.target);
    v.extend_from_slice(&h.created_unix.to_le_bytes());
    v.extend_from_slice(&h.expires_unix.to_le_bytes());
    v.extend_from_slice(&h.nonce);
    v.extend_from_slice(&h.payload_sha256);
    v
}

impl Envelope {
    /// Signs `payload` for `target`, valid from `now` for `ttl_secs` (capped at [`MAX_LIFETIME_SECS`]).
    #[allow(clippy::too_many_arguments)]
    pub fn seal(
        key: &SigningKey,
        kind: Kind,
        job_id: [u8; 16],
        target: [u8; 32],
        now: u64,
        ttl_secs: u64,
        nonce: [u8; 16],
        payload: Vec<u8>,
    ) -> Envelope {
        let header = Header {
            kind,
            job_id,
            signer: key.verifying_key().to_bytes(),
            target,
            created_unix: now,
            expires_unix: now + ttl_secs.min(MAX_LIFETIME_SECS),
            nonce,
            payload_sha256: Sha256::digest(&payload).into(),
        };
        let signature = key.sign(&signed_bytes(&header)).to_bytes().to_vec();
        Envelope {
            header,
            payload,
            signature,
        }
    }

    /// Checks everything listed in the module docs and returns the payload bytes. `trusted` says whether a
    /// public key is paired with this device; `nonces` remembers what was accepted.
    pub fn open<'a>(
        &'a self,
        me: &[u8; 32],
        kind: Kind,
        now: u64,
        max_payload: usize,
        trusted: impl Fn(&[u8; 32]) -> bool,
        nonces: &mut NonceCache,
    ) -> Result<&'a [u8], Reject> {
        let h = &self.header;
        if &h.target != me {
            return Err(Reject::WrongTarget);
        }
        if h.kind != kind {
            return Err(Reject::WrongKind(h.kind));
        }
        if h.expires_unix.saturating_sub(h.created_unix) > MAX_LIFETIME_SECS {
            return Err(Reject::TooLong(h.expires_unix.saturating_sub(h.created_unix)));
        }
        if h.created_unix > now + CLOCK_SKEW_SECS {
            return Err(Reject::FromTheFuture(h.created_unix - now));
        }
        if now > h.expires_unix + CLOCK_SKEW_SECS {
            return Err(Reject::Expired(now - h.expires_unix));
        }
        if self.payload.len() > max_payload {
            return Err(Reject::Oversized(self.payload.len(), max_payload));
        }
        if !trusted(&h.signer) {
            return Err(Reject::NotPaired);
        }
        let digest: [u8; 32] = Sha256::digest(&self.payload).into();
        if digest != h.payload_sha256 {
            return Err(Reject::PayloadMismatch);
        }
        let sig: [u8; 64] = self.signature.as_slice().try_into().map_err(|_| Reject::BadSignature)?;
        let vk = VerifyingKey::from_bytes(&h.signer).map_err(|_| Reject::BadSignature)?;
        vk.verify_strict(&signed_bytes(h), &Signature::from_bytes(&sig))
            .map_err(|_| Reject::BadSignature)?;
        // Only a fully valid envelope consumes its nonce (a forged copy cannot burn a real one).
        nonces.insert(h.signer, h.nonce, h.expires_unix + CLOCK_SKEW_SECS, now)?;
        Ok(&self.payload)
    }
}

/// The (signer, nonce) pairs of accepted envelopes until they expire. Bounded: an envelope lives at most
/// [`MAX_LIFETIME_SECS`], and when the cache is full the worker refuses new envelopes instead of forgetting
/// old nonces (forgetting would reopen replays). Each signer may hold at most a 16th of the cache, so one
/// paired device flooding envelopes cannot lock the others out.
#[derive(Debug, Default)]
pub struct NonceCache {
    seen: HashMap<([u8; 32], [u8; 16]), u64>,
    per_signer: HashMap<[u8; 32], usize>,
    cap: usize,
}

impl NonceCache {
    pub fn new(cap: usize) -> NonceCache {
        NonceCache {
            seen: HashMap::new(),
            per_signer: HashMap::new(),
            cap,
        }
    }

    fn purge(&mut self, now: u64) {
        self.seen.retain(|_, t| *t >= now);
        self.per_signer.clear();
        for (s, _) in self.seen.keys() {
            *self.per_signer.entry(*s).or_default() += 1;
        }
    }

    fn insert(&mut self, signer: [u8; 32], nonce: [u8; 16], until: u64, now: u64) -> Result<(), Reject> {
        if self.seen.contains_key(&(signer, nonce)) {
            return Err(Reject::Replay);
        }
        let quota = (self.cap / 16).max(1);
        let mine = self.per_signer.get(&signer).copied().unwrap_or(0);
        if self.seen.len() >= self.cap || mine >= quota {
            self.purge(now);
            let mine = self.per_signer.get(&signer).copied().unwrap_or(0);
            if self.seen.len() >= self.cap {
                return Err(Reject::Oversized(self.seen.len(), self.cap));
            }
            if mine >= quota {
                return Err(Reject::Oversized(mine, quota));
            }
        }
        self.seen.insert((signer, nonce), until);
        *self.per_signer.entry(signer).or_default() += 1;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32])
    }

    fn job() -> Vec<u8> {
        let spec = JobSpec::Score(ScoreRequest {
            model: "sha256:00".into(),
            adapter: None,
            text: "hello".into(),
        });
        crate::wire::encode(&spec, 1 << 20).expect("encodes")
    }

    #[test]
    fn a_sealed_job_opens_once_for_its_target_only() {
        let (alice, worker, other) = (key(1), key(2), key(3));
        let me = worker.verifying_key().to_bytes();
        let paired = |k: &[u8; 32]| *k == alice.verifying_key().to_bytes();
        let mut nonces = NonceCache::new(16);
        let env = Envelope::seal(&alice, Kind::Job, [7; 16], me, 1000, 600, [9; 16], job());
        let payload = env
            .open(&me, Kind::Job, 1001, 1 << 20, paired, &mut nonces)
            .expect("opens");
        let spec: JobSpec = crate::wire::decode(payload, 1 << 20).expect("decodes");
        assert!(matches!(spec, JobSpec::Score(_)));
        // The same envelope again: a replay.
        assert_eq!(
            env.open(&me, Kind::Job, 1002, 1 << 20, paired, &mut nonces),
            Err(Reject::Replay)
        );
        // Meant for someone else.
        let o = other.verifying_key().to_bytes();
        assert_eq!(
            env.open(&o, Kind::Job, 1001, 1 << 20, |_| true, &mut nonces),
            Err(Reject::WrongTarget)
        );
        // A job dressed as a result.
        let mut n2 = NonceCache::new(16);
        assert_eq!(
            env.open(&me, Kind::Result, 1001, 1 << 20, paired, &mut n2),
            Err(Reject::WrongKind(Kind::Job))
        );
    }

    #[test]
    fn tampering_unpaired_keys_and_stale_envelopes_are_refused() {
        let (alice, worker, mallory) = (key(1), key(2), key(4));
        let me = worker.verifying_key().to_bytes();
        let paired = |k: &[u8; 32]| *k == alice.verifying_key().to_bytes();
        let mut nonces = NonceCache::new(16);
        let env = Envelope::seal(&alice, Kind::Job, [7; 16], me, 1000, 600, [1; 16], job());
        let mut t = env.clone();
        t.payload.push(0);
        assert_eq!(
            t.open(&me, Kind::Job, 1000, 1 << 20, paired, &mut nonces),
            Err(Reject::PayloadMismatch)
        );
        let mut t = env.clone();
        t.header.expires_unix += 100;
        assert_eq!(
            t.open(&me, Kind::Job, 1000, 1 << 20, paired, &mut nonces),
            Err(Reject::BadSignature)
        );
        let mut t = env.clone();
        t.signature[5] ^= 1;
        assert_eq!(
            t.open(&me, Kind::Job, 1000, 1 << 20, paired, &mut nonces),
            Err(Reject::BadSignature)
        );
        // Mallory signs with her own key: not paired. Claiming Alice's key breaks the signature.
        let m = Envelope::seal(&mallory, Kind::Job, [7; 16], me, 1000, 600, [2; 16], job());
        assert_eq!(
            m.open(&me, Kind::Job, 1000, 1 << 20, paired, &mut nonces),
            Err(Reject::NotPaired)
        );
        let mut m2 = m.clone();
        m2.header.signer = alice.verifying_key().to_bytes();
        assert_eq!(
            m2.open(&me, Kind::Job, 1000, 1 << 20, paired, &mut nonces),
            Err(Reject::BadSignature)
        );
        assert_eq!(
            env.open(&me, Kind::Job, 1661, 1 << 20, paired, &mut nonces),
            Err(Reject::Expired(61))
        );
        assert_eq!(
            env.open(&me, Kind::Job, 900, 1 << 20, paired, &mut nonces),
            Err(Reject::FromTheFuture(100))
        );
        assert_eq!(
            env.open(&me, Kind::Job, 1000, 10, paired, &mut nonces),
            Err(Reject::Oversized(env.payload.len(), 10))
        );
        // None of the refusals consumed the real envelope's nonce.
        assert!(nonces.is_empty());
        assert!(env.open(&me, Kind::Job, 1000, 1 << 20, paired, &mut nonces).is_ok());
    }

    #[test]
    fn one_signer_cannot_fill_the_nonce_cache() {
        let mut c = NonceCache::new(32);
        c.insert([1; 32], [1; 16], 100, 0).expect("first");
        c.insert([1; 32], [2; 16], 100, 0).expect("second");
        // The quota is 32 / 16 = 2 per signer: the third is refused, another signer still gets in.
        assert!(c.insert([1; 32], [3; 16], 100, 0).is_err());
        c.insert([2; 32], [3; 16], 100, 0).expect("another signer");
        // Once its entries expire, the first signer has room again.
        c.insert([1; 32], [3; 16], 300, 150).expect("after expiry");
    }

    #[test]
    fn the_nonce_cache_forgets_only_expired_entries() {
        let mut c = NonceCache::new(32);
        c.insert([1; 32], [1; 16], 100, 0).expect("first");
        c.insert([1; 32], [2; 16], 200, 0).expect("second");
        // Full and nothing expired: refused rather than forgetting a live nonce.
        assert!(c.insert([1; 32], [3; 16], 300, 50).is_err());
        // At 150 the first has expired and makes room.
        c.insert([1; 32], [3; 16], 300, 150).expect("room after expiry");
        assert_eq!(c.insert([1; 32], [2; 16], 300, 150), Err(Reject::Replay));
    }
}
