//! Property tests of every decoder that reads bytes from the network or text from a user: none may panic
//! or allocate past its limit on any input, and each must round-trip what the encoder writes.
use bitnode_protocol::invite::{pair_mac, verify_pair_mac, Invite, InviteError, Role, PREFIX};
use bitnode_protocol::mesh::{Capabilities, CapsAck, CapsAdvert, PairRequest, PairResponse};
use bitnode_protocol::wire::{self, WireError, MAX_CAPS_MESSAGE, MAX_PAIR_MESSAGE};
use proptest::prelude::*;

fn arb_pair_request() -> impl Strategy<Value = PairRequest> {
    prop_oneof![
        (any::<[u8; 16]>(), any::<[u8; 32]>()).prop_map(|(invite_id, nonce)| PairRequest::Hello { invite_id, nonce }),
        (any::<[u8; 16]>(), any::<[u8; 32]>(), ".{0,64}").prop_map(|(invite_id, mac, name)| PairRequest::Prove {
            invite_id,
            mac,
            name
        }),
    ]
}

fn arb_invite() -> impl Strategy<Value = Invite> {
    (
        proptest::collection::vec(any::<u8>(), 1..60),
        proptest::collection::vec("/ip4/[0-9.]{7,15}/tcp/[0-9]{1,5}", 0..4),
        any::<[u8; 16]>(),
        any::<[u8; 32]>(),
        1000u64..u64::MAX / 2,
    )
        .prop_map(|(inviter, addrs, id, secret, expires)| Invite::new(inviter, addrs, id, secret, expires))
}

proptest! {
    #[test]
    fn pair_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = wire::decode::<PairRequest>(&bytes, MAX_PAIR_MESSAGE);
        let _ = wire::decode::<PairResponse>(&bytes, MAX_PAIR_MESSAGE);
        let _ = wire::decode::<CapsAdvert>(&bytes, MAX_CAPS_MESSAGE);
        let _ = wire::decode::<CapsAck>(&bytes, MAX_CAPS_MESSAGE);
    }

    #[test]
    fn pair_request_round_trips(req in arb_pair_request()) {
        let bytes = wire::encode(&req, MAX_PAIR_MESSAGE).expect("fits");
        prop_assert_eq!(wire::decode::<PairRequest>(&bytes, MAX_PAIR_MESSAGE).expect("decodes"), req);
    }

    #[test]
    fn truncated_or_extended_messages_are_rejected(req in arb_pair_request(), cut in 1usize..8, extra in 1u8..255) {
        let bytes = wire::encode(&req, MAX_PAIR_MESSAGE).expect("fits");
        let short = &bytes[..bytes.len().saturating_sub(cut)];
        prop_assert!(wire::decode::<PairRequest>(short, MAX_PAIR_MESSAGE).is_err());
        let mut long = bytes.clone();
        long.push(extra);
        prop_assert!(wire::decode::<PairRequest>(&long, MAX_PAIR_MESSAGE).is_err());
    }

    #[test]
    fn invite_parser_never_panics(s in ".{0,300}") {
        let _ = Invite::parse(&s, 0);
        let _ = Invite::parse(&format!("{PREFIX}{s}"), 0);
    }

    #[test]
    fn invite_codes_round_trip(inv in arb_invite()) {
        let code = inv.to_code();
        prop_assert_eq!(Invite::parse(&code, 0).expect("parses"), inv);
    }

    #[test]
    fn a_changed_character_is_detected(inv in arb_invite(), pos in any::<prop::sample::Index>(), c in "[1-9A-HJ-NP-Za-km-z]") {
        let code = inv.to_code();
        let body = &code[PREFIX.len()..];
        let i = pos.index(body.len());
        let mut chars: Vec<char> = body.chars().collect();
        let new = c.chars().next().expect("one char");
        prop_assume!(chars[i] != new);
        chars[i] = new;
        let bad = format!("{PREFIX}{}", chars.into_iter().collect::<String>());
        prop_assert!(Invite::parse(&bad, 0).is_err());
    }
}

#[test]
fn oversized_messages_are_refused_before_decoding() {
    let big = vec![0u8; MAX_PAIR_MESSAGE + 1];
    assert_eq!(
        wire::decode::<PairRequest>(&big, MAX_PAIR_MESSAGE),
        Err(WireError::TooLarge {
            len: MAX_PAIR_MESSAGE + 1,
            max: MAX_PAIR_MESSAGE
        })
    );
    // An encoder refuses to produce what the peer would refuse.
    let advert = CapsAdvert {
        name: "x".repeat(MAX_CAPS_MESSAGE),
        caps: Capabilities::default(),
    };
    assert!(matches!(
        wire::encode(&advert, MAX_CAPS_MESSAGE),
        Err(WireError::TooLarge { .. })
    ));
}

#[test]
fn a_length_prefix_claiming_gigabytes_is_an_error_not_an_allocation() {
    // Prove { invite_id, mac, name } with a name length varint of 2^40.
    let mut b = vec![1u8];
    b.extend_from_slice(&[0u8; 16]);
    b.extend_from_slice(&[0u8; 32]);
    b.push(253); // u64 varint marker
    b.extend_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(wire::decode::<PairRequest>(&b, MAX_PAIR_MESSAGE).is_err());
}

#[test]
fn expired_and_foreign_codes_get_clear_errors() {
    let inv = Invite::new(vec![1, 2, 3], vec![], [7; 16], [9; 32], 1000);
    assert_eq!(Invite::parse(&inv.to_code(), 1010), Err(InviteError::Expired(10)));
    assert_eq!(Invite::parse("hello", 0), Err(InviteError::Prefix));
    assert!(matches!(
        Invite::parse(&format!("{PREFIX}0OIl"), 0),
        Err(InviteError::Encoding(_))
    ));
    // Whitespace and line breaks from a wrapped terminal are ignored.
    let code = inv.to_code();
    let wrapped = format!("  {}\n{}  ", &code[..20], &code[20..]);
    assert!(Invite::parse(&wrapped, 0).is_ok());
}

#[test]
fn proofs_bind_secret_role_and_both_peers() {
    let (s, id, a, b, nj, ni) = (
        [1u8; 32],
        [2u8; 16],
        b"inviter".as_slice(),
        b"joiner".as_slice(),
        [3u8; 32],
        [4u8; 32],
    );
    let m = pair_mac(&s, Role::Joiner, &id, a, b, &nj, &ni);
    assert!(verify_pair_mac(&m, &s, Role::Joiner, &id, a, b, &nj, &ni));
    assert!(
        !verify_pair_mac(&m, &[5u8; 32], Role::Joiner, &id, a, b, &nj, &ni),
        "wrong secret"
    );
    assert!(
        !verify_pair_mac(&m, &s, Role::Inviter, &id, a, b, &nj, &ni),
        "role swap"
    );
    assert!(!verify_pair_mac(&m, &s, Role::Joiner, &id, b, a, &nj, &ni), "peer swap");
    assert!(
        !verify_pair_mac(&m, &s, Role::Joiner, &id, a, b"mallory", &nj, &ni),
        "other joiner"
    );
    assert!(
        !verify_pair_mac(&m, &s, Role::Joiner, &id, a, b, &ni, &nj),
        "replayed with other nonces"
    );
}

proptest! {
    /// Arbitrary bytes never panic the envelope decoder, and any single-byte change to a sealed envelope's
    /// wire form makes it either undecodable or refused.
    #[test]
    fn envelopes_survive_garbage_and_detect_any_flipped_byte(garbage in proptest::collection::vec(any::<u8>(), 0..512), at in any::<usize>(), bit in 0u8..8) {
        use bitnode_protocol::job::{Envelope, Kind, NonceCache};
        let _ = wire::decode::<Envelope>(&garbage, 1 << 16);
        let alice = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let me = ed25519_dalek::SigningKey::from_bytes(&[2; 32]).verifying_key().to_bytes();
        let env = Envelope::seal(&alice, Kind::Job, [3; 16], me, 1000, 60, [4; 16], b"payload".to_vec());
        let mut bytes = wire::encode(&env, 1 << 16).expect("a sealed envelope encodes");
        let i = at % bytes.len();
        bytes[i] ^= 1 << bit;
        if let Ok(e) = wire::decode::<Envelope>(&bytes, 1 << 16) {
            let mut nonces = NonceCache::new(8);
            let opened = e.open(&me, Kind::Job, 1000, 1 << 16, |_| true, &mut nonces).is_ok();
            prop_assert!(!opened || e == env, "a changed envelope opened");
        }
    }
}

// ---- Mesh II: jobs, updates and model transfer ----
use bitnode_protocol::job::{
    Bundle, BundleFile, Envelope, JobAck, JobPayload, JobSpec, ModelRequest, ModelResponse, Outcome, Update, UpdateAck,
};
use bitnode_protocol::wire::MAX_MODEL_MESSAGE;

fn arb_update() -> impl Strategy<Value = Update> {
    prop_oneof![
        any::<bool>().prop_map(|running| Update::Heartbeat { running }),
        (proptest::collection::vec(any::<u32>(), 0..8), ".{0,32}").prop_map(|(ids, text)| Update::Tokens { ids, text }),
        (any::<u64>(), any::<u64>(), -1e9f64..1e9).prop_map(|(step, total, loss)| Update::Progress {
            step,
            total,
            loss,
            lr: 1e-4,
            tokens_per_second: 10.0
        }),
        (
            "[a-z]{1,8}(/[a-z]{1,8})?",
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(path, bytes)| {
                Update::Checkpoint {
                    step: 3,
                    bundle: Bundle {
                        files: vec![BundleFile { path, bytes }],
                    },
                }
            }),
        (".{0,40}", any::<bool>())
            .prop_map(|(reason, device_fault)| Update::Done(Outcome::Failed { reason, device_fault })),
    ]
}

proptest! {
    #[test]
    fn job_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = wire::decode::<Envelope>(&bytes, 1 << 24);
        let _ = wire::decode::<JobPayload>(&bytes, 1 << 24);
        let _ = wire::decode::<JobAck>(&bytes, 1 << 20);
        let _ = wire::decode::<Update>(&bytes, 1 << 24);
        let _ = wire::decode::<UpdateAck>(&bytes, 1 << 20);
        let _ = wire::decode::<ModelRequest>(&bytes, MAX_MODEL_MESSAGE);
        let _ = wire::decode::<ModelResponse>(&bytes, MAX_MODEL_MESSAGE);
    }

    #[test]
    fn updates_round_trip(u in arb_update()) {
        let bytes = wire::encode(&u, 1 << 24).expect("fits");
        prop_assert_eq!(wire::decode::<Update>(&bytes, 1 << 24).expect("decodes"), u);
    }

    #[test]
    fn bundle_paths_never_escape(path in ".{0,40}") {
        let b = Bundle { files: vec![BundleFile { path: path.clone(), bytes: vec![] }] };
        if b.check().is_ok() {
            let parts: Vec<&str> = path.split('/').collect();
            prop_assert!(parts.len() <= 2);
            for p in parts {
                prop_assert!(!p.is_empty() && p != ".." && p != "." && !p.starts_with('.') && !p.contains('\\'));
            }
        }
    }
}

#[test]
fn a_huge_length_prefix_in_a_job_is_refused_without_allocating() {
    // A JobPayload whose dataset claims 2^40 bytes: bincode must refuse the claim, not reserve it.
    let spec = JobSpec::Score(bitnode_protocol::ScoreRequest {
        model: "m".into(),
        adapter: None,
        text: "t".into(),
    });
    let p = JobPayload {
        spec,
        resume: None,
        attempt: 0,
    };
    let mut bytes = wire::encode(&p, 1 << 20).expect("fits");
    assert!(wire::decode::<JobPayload>(&bytes, 1 << 20).is_ok());
    // Replace the text's length (1) with a varint claiming 2^40.
    let pos = bytes.iter().rposition(|&b| b == 1).expect("a length byte");
    bytes.splice(pos..pos + 1, [0xfd, 0, 0, 0, 0, 0, 1, 0, 0]);
    assert!(wire::decode::<JobPayload>(&bytes, 1 << 28).is_err());
}

#[test]
fn unsafe_bundles_are_refused() {
    for bad in ["../x", "/etc/passwd", "a/b/c", ".hidden", "a/..", "a\\b", "", "a//b"] {
        let b = Bundle {
            files: vec![BundleFile {
                path: bad.into(),
                bytes: vec![],
            }],
        };
        assert!(b.check().is_err(), "{bad:?} accepted");
    }
    let dup = Bundle {
        files: vec![
            BundleFile {
                path: "a".into(),
                bytes: vec![],
            },
            BundleFile {
                path: "a".into(),
                bytes: vec![1],
            },
        ],
    };
    assert!(dup.check().is_err());
    let ok = Bundle {
        files: vec![BundleFile {
            path: "exp_avg/adapter_model.safetensors".into(),
            bytes: vec![1],
        }],
    };
    assert!(ok.check().is_ok());
}
