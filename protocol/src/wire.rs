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

// Bincode's own limit on what a length prefix may claim; our per-protocol limits are all below it.
const BINCODE_LIMIT: usize = 1 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<BINCODE_LIMIT>()
}

/// Encodes `value`, refusing to produce a message the peer would reject as too large.
pub fn encode<T: Serialize>(value: &T, max: usize) -> Result<Vec<u8>, WireError> {
    let bytes = bincode::serde::encode_to_vec(value, config()).map_err(|e| WireError::Malformed(e.to_string()))?;
    if bytes.len() > max {
        return Err(WireError::TooLarge { len: bytes.len(), max });
    }
    Ok(bytes)
}

/// Decodes exactly one value filling `bytes`; never panics, whatever the input.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, WireError> {
    if bytes.len() > max {
        return Err(WireError::TooLarge { len: bytes.len(), max });
    }
    let (v, used) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| WireError::Malformed(e.to_string()))?;
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
