//! One-time pairing codes and the proofs that show knowledge of their secret.
//!
//! A code is `bitnode-invite-` followed by base58 of `bincode(Invite) ‖ sha256(…)[..4]`. The checksum turns a
//! mistyped or truncated code into a clear error instead of a confusing handshake failure. The code carries
//! the inviter's peer id (so the joiner knows which key it must reach), addresses to reach it (direct or
//! through a relay circuit), the invite id, a 256-bit secret and the expiry. The secret never crosses the
//! network: both sides send HMAC-SHA256 proofs keyed by it.
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const PREFIX: &str = "bitnode-invite-";
const VERSION: u8 = 1;
/// Codes longer than this are refused before decoding (a code with a dozen addresses is about 1 KB).
pub const MAX_CODE_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invite {
    pub version: u8,
    /// The inviter's libp2p peer id, as bytes (it embeds the ed25519 public key).
    pub inviter: Vec<u8>,
    /// Multiaddrs to dial the inviter at, relay circuits included.
    pub addrs: Vec<String>,
    pub id: [u8; 16],
    pub secret: [u8; 32],
    /// Unix seconds after which the inviter refuses the code.
    pub expires: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InviteError {
    #[error("not a bitnode invite code (it must start with `{PREFIX}`)")]
    Prefix,
    #[error("invite code is too long ({0} characters)")]
    TooLong(usize),
    #[error("invite code is not valid base58: {0}")]
    Encoding(String),
    #[error("invite code is damaged: checksum mismatch (was it copied completely?)")]
    Checksum,
    #[error("invite code is malformed: {0}")]
    Malformed(String),
    #[error("invite code version {0} is not supported by this bitnode")]
    Version(u8),
    #[error("invite code expired {0} s ago; ask for a new one")]
    Expired(u64),
}

impl Invite {
    pub fn new(inviter: Vec<u8>, addrs: Vec<String>, id: [u8; 16], secret: [u8; 32], expires: u64) -> Invite {
        Invite {
            version: VERSION,
            inviter,
            addrs,
            id,
            secret,
            expires,
        }
    }

    pub fn to_code(&self) -> String {
        let mut payload = bincode::serde::encode_to_vec(self, bincode::config::standard()).unwrap_or_default();
        let sum = Sha256::digest(&payload);
        payload.extend_from_slice(&sum[..4]);
        format!("{PREFIX}{}", bs58::encode(payload).into_string())
    }

    /// Parses a code and checks it has not expired at `now` (unix seconds). Whitespace around it and line
    /// breaks inside it (as terminals wrap long lines) are ignored.
    pub fn parse(code: &str, now: u64) -> Result<Invite, InviteError> {
        let code: String = code.chars().filter(|c| !c.is_whitespace()).collect();
        if code.len() > MAX_CODE_LEN {
            return Err(InviteError::TooLong(code.len()));
        }
        let body = code.strip_prefix(PREFIX).ok_or(InviteError::Prefix)?;
        let raw = bs58::decode(body)
            .into_vec()
            .map_err(|e| InviteError::Encoding(e.to_string()))?;
        if raw.len() < 5 {
            return Err(InviteError::Malformed("too short".into()));
        }
        let (payload, sum) = raw.split_at(raw.len() - 4);
        if Sha256::digest(payload)[..4] != *sum {
            return Err(InviteError::Checksum);
        }
        let cfg = bincode::config::standard().with_limit::<MAX_CODE_LEN>();
        let (inv, used): (Invite, usize) =
            bincode::serde::decode_from_slice(payload, cfg).map_err(|e| InviteError::Malformed(e.to_string()))?;
        if used != payload.len() {
            return Err(InviteError::Malformed("trailing bytes".into()));
        }
        if inv.version != VERSION {
            return Err(InviteError::Version(inv.version));
        }
        if inv.inviter.is_empty() || inv.inviter.len() > 128 {
            return Err(InviteError::Malformed("no inviter peer id".into()));
        }
        if now > inv.expires {
            return Err(InviteError::Expired(now - inv.expires));
        }
        Ok(inv)
    }
}

/// Which side a proof speaks for; the two proofs use different labels so one cannot be replayed as the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Inviter,
    Joiner,
}

/// HMAC-SHA256 keyed by the invite secret over the role, the invite id, both peer ids and both nonces.
/// Binding the peer ids (which Noise authenticated) means a proof seen by a man in the middle is useless on
/// any other connection; fresh nonces from both sides mean an old proof cannot be replayed.
pub fn pair_mac(
    secret: &[u8; 32],
    role: Role,
    invite_id: &[u8; 16],
    inviter: &[u8],
    joiner: &[u8],
    joiner_nonce: &[u8; 32],
    inviter_nonce: &[u8; 32],
) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(match role {
        Role::Inviter => b"bitnode-pair-v1-inviter",
        Role::Joiner => b"bitnode-pair-v1-joiner\0",
    });
    m.update(invite_id);
    for id in [inviter, joiner] {
        m.update(&(id.len() as u32).to_be_bytes());
        m.update(id);
    }
    m.update(joiner_nonce);
    m.update(inviter_nonce);
    m.finalize().into_bytes().into()
}

/// Constant-time comparison of a received proof against the expected one.
#[allow(clippy::too_many_arguments)]
pub fn verify_pair_mac(
    mac: &[u8; 32],
    secret: &[u8; 32],
    role: Role,
    invite_id: &[u8; 16],
    inviter: &[u8],
    joiner: &[u8],
    joiner_nonce: &[u8; 32],
    inviter_nonce: &[u8; 32],
) -> bool {
    let want = pair_mac(secret, role, invite_id, inviter, joiner, joiner_nonce, inviter_nonce);
    let mut diff = 0u8;
    for (a, b) in mac.iter().zip(want.iter()) {
        diff |= a ^ b;
    }
    diff == 0
}
