//! The worker join token as it rests in etcd: sealed with a key derived
//! from the cluster secret that every host's user-data carries
//! (`nimbus.swarm.secret`). Whoever reads etcd without the secret (a
//! neighbour on a network where etcd was left open, a backup of its data
//! directory) learns nothing that lets a machine into the swarm, and
//! cannot plant a token of its own swarm either: opening checks the tag.
//!
//! XChaCha20-Poly1305: its 24-byte nonces can be drawn at random by any
//! manager without a counter they would have to share. The etcd key is
//! the associated data, so a sealed value moved to another key does not
//! open. Format: `nimbus-sealed-v1:` + base64(nonce ‖ ciphertext ‖ tag).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use nimbus::swarmconf::Secret;
use sha2::{Digest, Sha256};

pub const PREFIX: &str = "nimbus-sealed-v1:";
const NONCE: usize = 24;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("{key}: not a sealed value (no {PREFIX} prefix): a token left in the clear, or not Nimbus's")]
    NotSealed { key: String },
    #[error("{key}: the sealed value is damaged ({reason})")]
    Damaged { key: String, reason: String },
    #[error("{key}: the sealed value does not open with this host's cluster secret (another cluster's, or changed)")]
    WrongSecret { key: String },
    #[error("no randomness for a nonce: {0}")]
    Random(String),
}

/// The sealing key: the secret through SHA-256 with a purpose label, so
/// the secret itself is never used as a key for anything else.
fn cipher(secret: &Secret) -> XChaCha20Poly1305 {
    let mut h = Sha256::new();
    h.update(b"nimbus swarm token seal v1\0");
    h.update(secret.0);
    XChaCha20Poly1305::new(&h.finalize())
}

pub fn seal(secret: &Secret, key: &str, token: &str) -> Result<String, SealError> {
    let mut nonce = [0u8; NONCE];
    getrandom::getrandom(&mut nonce).map_err(|e| SealError::Random(e.to_string()))?;
    let ct = cipher(secret)
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: token.as_bytes(),
                aad: key.as_bytes(),
            },
        )
        // Encryption fails only for messages beyond 2^38 bytes.
        .map_err(|_| SealError::Damaged {
            key: key.into(),
            reason: "too long to seal".into(),
        })?;
    let mut all = nonce.to_vec();
    all.extend(ct);
    Ok(format!("{PREFIX}{}", B64.encode(all)))
}

pub fn open(secret: &Secret, key: &str, sealed: &str) -> Result<String, SealError> {
    let body = sealed
        .trim()
        .strip_prefix(PREFIX)
        .ok_or_else(|| SealError::NotSealed { key: key.into() })?;
    let all = B64.decode(body).map_err(|e| SealError::Damaged {
        key: key.into(),
        reason: format!("base64: {e}"),
    })?;
    if all.len() <= NONCE {
        return Err(SealError::Damaged {
            key: key.into(),
            reason: format!("{} bytes, shorter than a nonce and a tag", all.len()),
        });
    }
    let (nonce, ct) = all.split_at(NONCE);
    let plain = cipher(secret)
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ct,
                aad: key.as_bytes(),
            },
        )
        .map_err(|_| SealError::WrongSecret { key: key.into() })?;
    String::from_utf8(plain).map_err(|_| SealError::Damaged {
        key: key.into(),
        reason: "not text".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: &str = "nimbus/swarm/join-token/worker";

    #[test]
    fn a_sealed_token_opens_only_with_its_secret_and_key() {
        let s = Secret([7; 32]);
        let t = "SWMTKN-1-abc-def";
        let a = seal(&s, K, t).unwrap();
        let b = seal(&s, K, t).unwrap();
        assert_ne!(a, b, "a fresh nonce each time");
        assert!(!a.contains("SWMTKN"), "{a}");
        assert_eq!(open(&s, K, &a).unwrap(), t);
        assert_eq!(
            open(&Secret([8; 32]), K, &a),
            Err(SealError::WrongSecret { key: K.into() })
        );
        assert_eq!(
            open(&s, "nimbus/other", &a),
            Err(SealError::WrongSecret {
                key: "nimbus/other".into()
            })
        );
        assert_eq!(open(&s, K, t), Err(SealError::NotSealed { key: K.into() }));
        let mut flipped = a.into_bytes();
        let i = flipped.len() - 3;
        flipped[i] = if flipped[i] == b'A' { b'B' } else { b'A' };
        assert!(matches!(
            open(&s, K, std::str::from_utf8(&flipped).unwrap()),
            Err(SealError::WrongSecret { .. }) | Err(SealError::Damaged { .. })
        ));
        assert!(matches!(
            open(&s, K, &format!("{PREFIX}AAAA")),
            Err(SealError::Damaged { .. })
        ));
        assert!(matches!(
            open(&s, K, &format!("{PREFIX}!!")),
            Err(SealError::Damaged { .. })
        ));
    }
}
