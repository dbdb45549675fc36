//! Signed release formats: the slot descriptor at the end of every USR
//! partition, and the channel manifest with its detached signatures
//! (byte layouts in docs/formats.md, "Slot descriptor" and "Channel
//! manifest").
//!
//! Signatures are checked over the exact bytes received, never over a
//! re-serialisation, with `verify_strict` (no malleable or small-order
//! signatures), before anything but a size check looks at the content.

mod descriptor;
mod manifest;

pub use descriptor::*;
pub use manifest::*;

use crate::keys::{KeyId, TrustStore};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::Signature;
use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("signature by key {keyid} is {len} bytes, expected 64 (truncated or padded)")]
    SignatureLength { keyid: String, len: usize },
    #[error("signature by key {keyid}: key is not trusted (not in the trust store)")]
    UntrustedKey { keyid: String },
    #[error("signature by trusted key {keyid} does not match the content (altered or corrupted)")]
    BadSignature { keyid: String },
    #[error("signature claims key {claimed} but was made by trusted key {signer} (wrong key)")]
    WrongKey { claimed: String, signer: String },
    #[error("{valid} valid signature(s) from distinct trusted keys, {needed} required{}", duplicate_note(*duplicates))]
    Threshold {
        valid: usize,
        needed: usize,
        /// Further valid signatures by a key that had already signed.
        duplicates: usize,
    },
    #[error("signature file: {0}")]
    SignatureFile(String),
}

fn duplicate_note(n: usize) -> String {
    match n {
        0 => String::new(),
        n => format!(" ({n} more by a key that had already signed: one key counts once)"),
    }
}

/// Count the valid signatures by distinct trusted keys over `msg` and hold
/// them to the threshold. Signatures by keys the store does not know are
/// passed over (a release signed for a newer trust set as well), but with
/// nothing valid the first specific reason is the error.
fn require_threshold(
    trust: &TrustStore,
    msg: &[u8],
    entries: impl IntoIterator<Item = (String, Result<Vec<u8>, VerifyError>)>,
) -> Result<(), VerifyError> {
    let mut valid = BTreeSet::new();
    let mut duplicates = 0;
    let mut first_err = None;
    for (keyid, sig) in entries {
        match sig.and_then(|sig| verify_one(trust, &keyid, msg, &sig)) {
            Ok(id) => {
                if !valid.insert(id) {
                    duplicates += 1;
                }
            }
            Err(err) => {
                first_err.get_or_insert(err);
            }
        }
    }
    if valid.len() >= trust.threshold {
        return Ok(());
    }
    match first_err {
        Some(e) if valid.is_empty() => Err(e),
        _ => Err(VerifyError::Threshold {
            valid: valid.len(),
            needed: trust.threshold,
            duplicates,
        }),
    }
}

/// Check one signature against the trust store. A failure under the named
/// key is tried against the other trusted keys only to tell "signed by the
/// wrong key" from "content changed"; it never makes the signature count.
fn verify_one(
    trust: &TrustStore,
    keyid: &str,
    msg: &[u8],
    sig: &[u8],
) -> Result<KeyId, VerifyError> {
    let id: KeyId = keyid.parse().map_err(|_| VerifyError::UntrustedKey {
        keyid: keyid.to_string(),
    })?;
    let sig: [u8; 64] = sig.try_into().map_err(|_| VerifyError::SignatureLength {
        keyid: keyid.to_string(),
        len: sig.len(),
    })?;
    let key = trust
        .keys
        .get(&id)
        .ok_or_else(|| VerifyError::UntrustedKey {
            keyid: keyid.to_string(),
        })?;
    let sig = Signature::from_bytes(&sig);
    if key.verify_strict(msg, &sig).is_ok() {
        return Ok(id);
    }
    match trust
        .keys
        .iter()
        .find(|(other, k)| **other != id && k.verify_strict(msg, &sig).is_ok())
    {
        Some((signer, _)) => Err(VerifyError::WrongKey {
            claimed: keyid.to_string(),
            signer: signer.to_string(),
        }),
        None => Err(VerifyError::BadSignature {
            keyid: keyid.to_string(),
        }),
    }
}

// ---------------------------------------------------------------------------
// Slot descriptor

/// An index larger than this is refused before it is read (a 4 GiB slot
/// needs about 9 MiB).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;

/// Check a detached signature file (`[{"keyid", "sig"}]`) over `bytes`:
/// at least `trust.threshold` distinct trusted keys must have signed.
pub fn verify_detached(
    bytes: &[u8],
    signatures: &[u8],
    trust: &TrustStore,
) -> Result<(), VerifyError> {
    if signatures.len() > MAX_SIGNATURES_BYTES {
        return Err(VerifyError::SignatureFile(format!(
            "{} bytes, larger than the {MAX_SIGNATURES_BYTES}-byte limit",
            signatures.len()
        )));
    }
    let entries: Vec<SignatureEntry> = serde_json::from_slice(signatures)
        .map_err(|e| VerifyError::SignatureFile(e.to_string()))?;
    if entries.is_empty() {
        return Err(VerifyError::SignatureFile("no signatures".into()));
    }
    require_threshold(
        trust,
        bytes,
        entries.iter().map(|e| {
            let sig = B64.decode(&e.sig).map_err(|err| {
                VerifyError::SignatureFile(format!("key {}: sig is not base64: {err}", e.keyid))
            });
            (e.keyid.clone(), sig)
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::ReleaseKey;
    use chrono::Duration;
    use chrono::{DateTime, Utc};

    fn key(n: u8) -> ReleaseKey {
        ReleaseKey::from_secret([n; 32])
    }

    fn descriptor() -> SlotDescriptor {
        SlotDescriptor {
            version: "1.2.0".parse().unwrap(),
            data_size: 100 * 4096,
            hash_offset: 100 * 4096,
            hash_size: 2 * 4096,
            verity_root: [7; 32],
            verity_salt: [9; 32],
            created: 1_700_000_000,
            signers: vec![],
        }
    }

    #[test]
    fn descriptor_roundtrip() {
        let k = key(1);
        let b = descriptor().sign(&[&k]).unwrap();
        let trust = TrustStore::new([k.public()], 1);
        let d = SlotDescriptor::verify(&b, &trust).unwrap();
        assert_eq!(
            d,
            SlotDescriptor {
                signers: vec![k.id],
                ..descriptor()
            }
        );
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let k = key(1);
        let b = descriptor().sign(&[&k]).unwrap();
        let trust = TrustStore::new([k.public()], 1);
        for i in 0..DESCRIPTOR_SIZE {
            let mut c = b;
            c[i] ^= 0x01;
            assert!(
                SlotDescriptor::verify(&c, &trust).is_err(),
                "flip at byte {i} passed"
            );
        }
    }

    #[test]
    fn descriptor_errors_are_specific() {
        let (a, b) = (key(1), key(2));
        let trust_a = TrustStore::new([a.public()], 1);
        let trust_ab = TrustStore::new([a.public(), b.public()], 1);
        let good = descriptor().sign(&[&a]).unwrap();

        let mut flipped = good;
        flipped[90] ^= 0x10; // hash_offset
        assert!(matches!(
            SlotDescriptor::verify(&flipped, &trust_a),
            Err(DescriptorError::Signature(VerifyError::BadSignature { .. }))
        ));

        let by_b = descriptor().sign(&[&b]).unwrap();
        assert!(matches!(
            SlotDescriptor::verify(&by_b, &trust_a),
            Err(DescriptorError::Signature(VerifyError::UntrustedKey { .. }))
        ));

        // Signed by B, but the table says A.
        let mut wrong = by_b;
        wrong[SIGNED_END..SIGNED_END + 8].copy_from_slice(&a.id.0);
        assert!(matches!(
            SlotDescriptor::verify(&wrong, &trust_ab),
            Err(DescriptorError::Signature(VerifyError::WrongKey { .. }))
        ));

        let mut empty = [0u8; DESCRIPTOR_SIZE];
        assert!(matches!(
            SlotDescriptor::verify(&empty, &trust_a),
            Err(DescriptorError::BadMagic(_))
        ));
        empty.copy_from_slice(&good);
        assert!(matches!(
            SlotDescriptor::verify(&good[..100], &trust_a),
            Err(DescriptorError::Size(100))
        ));
    }

    #[test]
    fn descriptor_threshold_counts_distinct_trusted_signers() {
        let (a, b, c, d) = (key(1), key(2), key(3), key(4));
        let two_of_three = TrustStore::new([a.public(), b.public(), c.public()], 2);
        let one = descriptor().sign(&[&a]).unwrap();
        assert!(matches!(
            SlotDescriptor::verify(&one, &two_of_three),
            Err(DescriptorError::Signature(VerifyError::Threshold {
                valid: 1,
                needed: 2,
                duplicates: 0
            }))
        ));
        let two = descriptor().sign(&[&a, &c]).unwrap();
        let got = SlotDescriptor::verify(&two, &two_of_three).unwrap();
        assert_eq!(got.signers, vec![a.id, c.id]);
        // An extra signature by a key this store does not know is passed
        // over (signed for a newer trust set as well).
        let with_new = descriptor().sign(&[&d, &a, &b]).unwrap();
        SlotDescriptor::verify(&with_new, &two_of_three).unwrap();

        // One key's signature copied into the second entry counts once,
        // and the error says so.
        let mut dup = two;
        dup.copy_within(SIGNED_END..SIGNED_END + SIG_ENTRY, SIGNED_END + SIG_ENTRY);
        let e = SlotDescriptor::verify(&dup, &two_of_three).unwrap_err();
        assert!(
            matches!(
                e,
                DescriptorError::Signature(VerifyError::Threshold {
                    valid: 1,
                    needed: 2,
                    duplicates: 1
                })
            ),
            "{e}"
        );
        assert!(e.to_string().contains("one key counts once"), "{e}");

        // The count is signed: cutting the table changes the signed bytes.
        let mut cut = descriptor().sign(&[&a, &b]).unwrap();
        cut[COUNT_FIELD] = 1;
        cut[SIGNED_END + SIG_ENTRY..SIGNED_END + 2 * SIG_ENTRY].fill(0);
        assert!(SlotDescriptor::verify(&cut, &two_of_three).is_err());
        let mut none = descriptor().sign(&[&a]).unwrap();
        none[COUNT_FIELD] = 0;
        assert!(matches!(
            SlotDescriptor::verify(&none, &two_of_three),
            Err(DescriptorError::Field {
                field: "signature_count",
                ..
            })
        ));
        // Signing refuses a key twice.
        assert!(descriptor().sign(&[&a, &a]).is_err());
    }

    #[test]
    fn rollout_and_lifetime_are_bounded() {
        let now = Utc::now();
        let mut m = manifest(1, now);
        m.validate().unwrap();
        m.releases[0].rollout = Some(Rollout {
            start: now,
            duration_secs: MAX_ROLLOUT_SECS + 1,
            paused: false,
        });
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("longer than 90 days"));
        let mut m = manifest(1, now);
        m.expires = m.issued + Duration::days(400);
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("more than 366 days"));
    }

    fn manifest(serial: u64, now: DateTime<Utc>) -> Manifest {
        Manifest {
            schema: 1,
            channel: "stable".into(),
            serial,
            issued: now - Duration::hours(1),
            expires: now + Duration::days(14),
            max_version: None,
            releases: vec![Release {
                version: "1.2.0".parse().unwrap(),
                payload: "payloads/1.2.0/usr.img.zst".into(),
                compressed_size: 10,
                compressed_sha256: "a".repeat(64),
                raw_size: 8192,
                raw_sha256: "b".repeat(64),
                verity_root: "c".repeat(64),
                rollout: None,
                stage1: None,
                delta: None,
            }],
        }
    }

    fn signed(m: &Manifest, keys: &[&ReleaseKey]) -> (Vec<u8>, Vec<u8>) {
        let bytes = serde_json::to_vec_pretty(m).unwrap();
        let sigs = serde_json::to_vec(&Manifest::sign_bytes(&bytes, keys)).unwrap();
        (bytes, sigs)
    }

    #[test]
    fn manifest_errors_are_distinct() {
        let now = Utc::now();
        let (a, b, c) = (key(1), key(2), key(3));
        let trust = TrustStore::new([a.public(), b.public()], 1);
        let pol = ManifestPolicy {
            channel: "stable",
            now,
            last_serial: Some(5),
        };
        let m = manifest(5, now);
        let (bytes, sigs) = signed(&m, &[&a]);
        assert_eq!(Manifest::verify(&bytes, &sigs, &trust, &pol).unwrap(), m);

        // Flipped byte in the content.
        let mut flipped = bytes.clone();
        let i = flipped.iter().position(|&c| c == b'5').unwrap();
        flipped[i] = b'6';
        let e = Manifest::verify(&flipped, &sigs, &trust, &pol).unwrap_err();
        assert!(
            matches!(
                e,
                ManifestError::Signature(VerifyError::BadSignature { .. })
            ),
            "{e}"
        );

        // Signed by trusted B, labelled as A.
        let mut wrong: Vec<SignatureEntry> = Manifest::sign_bytes(&bytes, &[&b]);
        wrong[0].keyid = a.id.to_string();
        let e = Manifest::verify(&bytes, &serde_json::to_vec(&wrong).unwrap(), &trust, &pol)
            .unwrap_err();
        assert!(
            matches!(e, ManifestError::Signature(VerifyError::WrongKey { .. })),
            "{e}"
        );

        // Truncated signature.
        let mut trunc = Manifest::sign_bytes(&bytes, &[&a]);
        let raw = B64.decode(&trunc[0].sig).unwrap();
        trunc[0].sig = B64.encode(&raw[..40]);
        let e = Manifest::verify(&bytes, &serde_json::to_vec(&trunc).unwrap(), &trust, &pol)
            .unwrap_err();
        assert!(
            matches!(
                e,
                ManifestError::Signature(VerifyError::SignatureLength { len: 40, .. })
            ),
            "{e}"
        );

        // Untrusted key.
        let (_, sig_c) = signed(&m, &[&c]);
        let e = Manifest::verify(&bytes, &sig_c, &trust, &pol).unwrap_err();
        assert!(
            matches!(
                e,
                ManifestError::Signature(VerifyError::UntrustedKey { .. })
            ),
            "{e}"
        );

        // Expired.
        let pol_late = ManifestPolicy {
            now: now + Duration::days(15),
            ..pol.clone()
        };
        let e = Manifest::verify(&bytes, &sigs, &trust, &pol_late).unwrap_err();
        assert!(matches!(e, ManifestError::Expired { .. }), "{e}");

        // Replay of an older serial.
        let pol_newer = ManifestPolicy {
            last_serial: Some(6),
            ..pol.clone()
        };
        let e = Manifest::verify(&bytes, &sigs, &trust, &pol_newer).unwrap_err();
        assert!(
            matches!(
                e,
                ManifestError::Rollback {
                    serial: 5,
                    last: 6,
                    ..
                }
            ),
            "{e}"
        );

        // Wrong channel.
        let pol_beta = ManifestPolicy {
            channel: "beta",
            ..pol.clone()
        };
        let e = Manifest::verify(&bytes, &sigs, &trust, &pol_beta).unwrap_err();
        assert!(matches!(e, ManifestError::ChannelMismatch { .. }), "{e}");

        // Threshold of two with one signer.
        let trust2 = TrustStore::new([a.public(), b.public()], 2);
        let e = Manifest::verify(&bytes, &sigs, &trust2, &pol).unwrap_err();
        assert!(
            matches!(
                e,
                ManifestError::Signature(VerifyError::Threshold {
                    valid: 1,
                    needed: 2,
                    duplicates: 0
                })
            ),
            "{e}"
        );
        // Two signatures by the same key count once.
        let (_, twice) = signed(&m, &[&a, &a]);
        assert!(matches!(
            Manifest::verify(&bytes, &twice, &trust2, &pol),
            Err(ManifestError::Signature(VerifyError::Threshold {
                valid: 1,
                needed: 2,
                duplicates: 1
            }))
        ));
        let (_, both) = signed(&m, &[&a, &b]);
        Manifest::verify(&bytes, &both, &trust2, &pol).unwrap();

        // Oversized and malformed.
        let big = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(matches!(
            Manifest::verify(&big, &sigs, &trust, &pol),
            Err(ManifestError::TooLarge { .. })
        ));
        let junk = b"{not json".to_vec();
        let js = serde_json::to_vec(&Manifest::sign_bytes(&junk, &[&a])).unwrap();
        assert!(matches!(
            Manifest::verify(&junk, &js, &trust, &pol),
            Err(ManifestError::Parse(_))
        ));
        assert!(matches!(
            Manifest::verify(&bytes, b"not json", &trust, &pol),
            Err(ManifestError::Signature(VerifyError::SignatureFile(_)))
        ));
    }

    #[test]
    fn payload_paths_stay_inside_the_repo() {
        let now = Utc::now();
        for p in ["../x", "/etc/passwd", "a//b", "http://evil/x", "a/./b", ""] {
            let mut m = manifest(1, now);
            m.releases[0].payload = p.into();
            assert!(
                matches!(m.validate(), Err(ManifestError::Invalid(_))),
                "{p} passed"
            );
        }
    }

    #[test]
    fn stage1_files_are_checked_like_payloads() {
        let now = Utc::now();
        let good = FileRef {
            path: "payloads/1.2.0/stage1/vmlinuz".into(),
            size: 10,
            sha256: "d".repeat(64),
        };
        let mut m = manifest(1, now);
        m.releases[0].stage1 = Some(Box::new(Stage1Files {
            kernel: good.clone(),
            initramfs: good.clone(),
        }));
        m.validate().unwrap();
        for (f, want) in [
            (
                FileRef {
                    path: "../k".into(),
                    ..good.clone()
                },
                "plain relative",
            ),
            (
                FileRef {
                    sha256: "x".into(),
                    ..good.clone()
                },
                "sha256",
            ),
            (
                FileRef {
                    size: 0,
                    ..good.clone()
                },
                "size 0",
            ),
            (
                FileRef {
                    size: MAX_STAGE1_FILE + 1,
                    ..good.clone()
                },
                "MiB",
            ),
        ] {
            let mut m = m.clone();
            if let Some(s) = m.releases[0].stage1.as_mut() {
                s.initramfs = f;
            }
            let e = m.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let now = Utc::now();
        let mut v = serde_json::to_value(manifest(1, now)).unwrap();
        v["surprise"] = 1.into();
        assert!(serde_json::from_value::<Manifest>(v).is_err());
    }
}
