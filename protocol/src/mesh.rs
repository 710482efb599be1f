//! Messages of the mesh protocols: pairing (`/bitnode/pair/1`) and capability adverts (`/bitnode/caps/1`).
use serde::{Deserialize, Serialize};

/// Joiner to inviter. Two round trips prove knowledge of the invite secret in both directions without
/// sending it: `Hello` carries the joiner's nonce and gets back the inviter's nonce and proof; `Prove` carries
/// the joiner's proof. Both proofs bind the invite id, both peer ids (as authenticated by Noise) and both
/// nonces (see [`crate::invite::pair_mac`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PairRequest {
    Hello {
        invite_id: [u8; 16],
        nonce: [u8; 32],
    },
    Prove {
        invite_id: [u8; 16],
        mac: [u8; 32],
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PairResponse {
    /// The inviter's nonce and its proof over both nonces.
    Challenge { nonce: [u8; 32], mac: [u8; 32] },
    /// Pairing done: the joiner is in the inviter's trust list, under the name it sent.
    Welcome { name: String },
    /// Pairing refused, with the reason (unknown, expired or used invite; bad proof).
    Refused { reason: String },
}

/// What a device can do, as it advertises itself to paired peers on connect and whenever it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Capabilities {
    /// One number to rank devices by; higher is stronger. `ternary_gops`, halved on battery without AC,
    /// unless pinned in the config.
    pub score: f64,
    /// Adapter name ("NVIDIA H200", "llvmpipe (LLVM …)", or "cpu" for the CPU reference).
    pub device: String,
    /// "vulkan", "metal", "dx12" or "cpu".
    pub backend: String,
    /// "discrete", "integrated", "virtual", "software", "other" or "cpu".
    pub device_type: String,
    /// "nvidia", "amd", "intel", "apple", "arm", "qualcomm", "mesa" or a PCI id in hex.
    pub vendor: String,
    /// Device-local memory where the platform tells us; `None` when it cannot be known.
    pub device_memory_bytes: Option<u64>,
    pub system_memory_bytes: u64,
    /// Largest buffer one binding can hold (what decides tiling).
    pub max_binding_bytes: u64,
    /// Measured ternary matmul throughput of the engine on this device (2·rows·cols ops per product).
    pub ternary_gops: f64,
    /// 0..=100 when the device has a battery.
    pub battery_percent: Option<f32>,
    /// Whether mains power is connected, when the device reports it.
    pub on_ac: Option<bool>,
    /// Jobs queued or running here.
    pub queue_len: u32,
    /// True when the owner pinned these numbers in `[capabilities]`.
    pub pinned: bool,
    /// bitnode version of the advertising node.
    pub version: String,
    /// Content hashes of the models (and adapters) in this node's store, so a scheduler knows who can skip
    /// a transfer. At most [`MAX_ADVERTISED_MODELS`].
    pub models: Vec<String>,
    /// Whether this node takes jobs from paired peers at all (`[jobs] accept_remote`).
    pub accepts_jobs: bool,
    /// Whether this node takes jobs from paired peers while on battery (`[jobs] run_on_battery`).
    pub jobs_on_battery: bool,
    /// For a node that serves as the mesh's relay: the most bytes one relayed connection may carry, so a
    /// scheduler knows whether a model transfer fits through it.
    pub relay_max_circuit_bytes: Option<u64>,
    /// The engines this node's engine host keeps loaded now, most recently used first, so a scheduler can
    /// prefer a device that will not pay a model load for an inference. At most [`MAX_ADVERTISED_WARM`].
    pub warm: Vec<WarmEngine>,
}

/// A model (with a LoRA adapter, or none) loaded in a device's engine host, by content hashes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct WarmEngine {
    pub model: String,
    pub adapter: Option<String>,
}

/// Most model hashes one advert lists (the advert must fit its 16 KiB limit).
pub const MAX_ADVERTISED_MODELS: usize = 64;

/// Most warm engines one advert lists (each is up to two hashes: 64 of them and the models stay well
/// inside the 16 KiB limit).
pub const MAX_ADVERTISED_WARM: usize = 16;

/// `/bitnode/caps/1` request: the sender's current capabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapsAdvert {
    pub name: String,
    pub caps: Capabilities,
}

/// `/bitnode/caps/1` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CapsAck {
    Ok,
    Refused { reason: String },
}
