//! Protocol ids and the wire encoding. Every bitnode protocol is `/bitnode/<name>/<version>`; one message is
//! one bincode 2 value (standard config) filling a stream up to its end. Decoding is bounded twice: the
//! reader stops at the protocol's byte limit, and bincode refuses length prefixes that claim more than the
//! bytes it was given, so a hostile peer can neither make us read nor allocate more than the limit.
use serde::{de::DeserializeOwned, Serialize};

/// Pairing: the invite handshake (see [`crate::mesh::PairRequest`]).
pub const PAIR_PROTOCOL: &str = "/bitnode/pair/1";
/// Capability adverts (see [`crate::mesh::Capabilities`]).
pub const CAPS_PROTOCOL: &str = "/bitnode/caps/1";

/// Largest pairing message in bytes (a request holds ids, a nonce, a MAC and a short name).
pub const MAX_PAIR_MESSAGE: usize = 4 * 1024;
/// Largest capability advert in bytes.
pub const MAX_CAPS_MESSAGE: usize = 16 * 1024;
/// Jobs: a signed [`crate::job::Envelope`] of kind `Job` or `Cancel`, answered by [`crate::job::JobAck`].
pub const JOB_PROTOCOL: &str = "/bitnode/job/1";
/// Worker to submitter: a signed [`crate::job::Envelope`] of kind `Update` or `Result`, answered by
/// [`crate::job::UpdateAck`].
pub const UPDATE_PROTOCOL: &str = "/bitnode/job-update/1";
/// Content-addressed model transfer: [`crate::job::ModelRequest`] / [`crate::job::ModelResponse`].
pub const MODEL_PROTOCOL: &str = "/bitnode/model/1";
/// Bytes of one model chunk on the wire.
pub const MODEL_CHUNK: usize = 1 << 20;
/// Largest model-transfer message: one chunk plus framing, or a manifest.
pub const MAX_MODEL_MESSAGE: usize = MODEL_CHUNK + 64 * 1024;

/// Longest device name, in bytes, accepted from a peer or a user.
pub const MAX_NAME_LEN: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("message of {len} bytes exceeds the {max}-byte limit of this protocol")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("malformed message: {0} trailing bytes after the value")]
    Trailing(usize),
    #[error("invalid message: {0}")]
    Invalid(String),
}

// Bincode's own limit on what length prefixes may claim in one message. It is a type parameter, so it comes
// in tiers: a message is decoded under the smallest tier that holds its protocol's limit, and a hostile
// prefix can never make bincode reserve more than that tier (at most 4x the protocol's limit).
const TIERS: [usize; 4] = [1 << 20, 1 << 24, 1 << 28, 1 << 30];

fn std_cfg() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value`, refusing to produce a message the peer would reject as too large.
pub fn encode<T: Serialize>(value: &T, max: usize) -> Result<Vec<u8>, WireError> {
    let bytes = match tier(max) {
        0 => bincode::serde::encode_to_vec(value, std_cfg().with_limit::<{ TIERS[0] }>()),
        1 => bincode::serde::encode_to_vec(value, std_cfg().with_limit::<{ TIERS[1] }>()),
        2 => bincode::serde::encode_to_vec(value, std_cfg().with_limit::<{ TIERS[2] }>()),
        _ => bincode::serde::encode_to_vec(value, std_cfg().with_limit::<{ TIERS[3] }>()),
    }
    .map_err(|e| WireError::Malformed(e.to_string()))?;
    if bytes.len() > max {
        return Err(WireError::TooLarge { len: bytes.len(), max });
    }
    Ok(bytes)
}

fn tier(max: usize) -> usize {
    TIERS.iter().position(|&t| max <= t).unwrap_or(TIERS.len() - 1)
}

/// Decodes exactly one value filling `bytes`; never panics, whatever the input.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, WireError> {
    if bytes.len() > max || bytes.len() > TIERS[TIERS.len() - 1] {
        return Err(WireError::TooLarge { len: bytes.len(), max });
    }
    let (v, used) = match tier(max) {
        0 => bincode::serde::decode_from_slice(bytes, std_cfg().with_limit::<{ TIERS[0] }>()),
        1 => bincode::serde::decode_from_slice(bytes, std_cfg().with_limit::<{ TIERS[1] }>()),
        2 => bincode::serde::decode_from_slice(bytes, std_cfg().with_limit::<{ TIERS[2] }>()),
        _ => bincode::serde::decode_from_slice(bytes, std_cfg().with_limit::<{ TIERS[3] }>()),
    }
    .map_err(|e| WireError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(WireError::Trailing(bytes.len() - used));
    }
    Ok(v)
}

/// A device name as shown in `bitnode peers`: 1 to [`MAX_NAME_LEN`] bytes, no control characters.
pub fn check_name(name: &str) -> Result<(), WireError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(WireError::Invalid(format!(
            "a device name must be 1 to {MAX_NAME_LEN} bytes, got {}",
            name.len()
        )));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(WireError::Invalid(
            "a device name must not contain control characters".into(),
        ));
    }
    Ok(())
}
