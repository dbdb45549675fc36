//! Release signing keys.
//!
//! Format (docs/formats.md): one JSON object per file.
//! - `release.key` (mode 0600): `{"keyid": "<16 hex>", "algorithm": "ed25519", "secret": "<base64 32 bytes>"}`
//! - `release.pub`: `{"keyid": "<16 hex>", "algorithm": "ed25519", "public": "<base64 32 bytes>"}`
//!
//! The key id is the first 8 bytes of SHA-256 over the 32-byte public key, in
//! hex. It is derived, never trusted: a file whose id does not match its key is
//! rejected, so a key cannot pose as another.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
pub use ed25519_dalek::VerifyingKey;
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

use crate::durable;

pub const SECRET_FILE: &str = "release.key";
pub const PUBLIC_FILE: &str = "release.pub";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> KeyId {
        let d = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::str::FromStr for KeyId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut id = [0u8; 8];
        hex::decode_to_slice(s, &mut id)
            .map_err(|_| format!("key id {s:?} is not 16 hex digits"))?;
        Ok(KeyId(id))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a Nimbus key file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: key id {claimed} does not match the key (its id is {actual})")]
    IdMismatch {
        path: PathBuf,
        claimed: String,
        actual: KeyId,
    },
    #[error("{path}: refusing to overwrite an existing key")]
    Exists { path: PathBuf },
    #[error("{dir}: no trusted keys (*.pub) found")]
    NoKeys { dir: PathBuf },
    #[error("cannot get random bytes for a key: {0}")]
    Random(String),
    #[error(transparent)]
    Durable(#[from] durable::DurableError),
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keyid: String,
    algorithm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    public: Option<String>,
}

/// A release signing key with its id.
pub struct ReleaseKey {
    pub id: KeyId,
    key: SigningKey,
}

impl ReleaseKey {
    pub fn generate() -> Result<ReleaseKey, KeyError> {
        let mut secret = [0u8; 32];
        getrandom::getrandom(&mut secret).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(ReleaseKey::from_secret(secret))
    }

    pub fn from_secret(secret: [u8; 32]) -> ReleaseKey {
        let key = SigningKey::from_bytes(&secret);
        ReleaseKey {
            id: KeyId::of(&key.verifying_key()),
            key,
        }
    }

    pub fn public(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }

    /// Write `release.key` (0600) and `release.pub` into `dir`, never over an
    /// existing key.
    pub fn write_to_dir(&self, dir: &Path) -> Result<(), KeyError> {
        std::fs::create_dir_all(dir).map_err(|source| KeyError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        for name in [SECRET_FILE, PUBLIC_FILE] {
            let p = dir.join(name);
            if p.exists() {
                return Err(KeyError::Exists { path: p });
            }
        }
        let secret = KeyFile {
            keyid: self.id.to_string(),
            algorithm: "ed25519".into(),
            secret: Some(B64.encode(self.key.to_bytes())),
            public: None,
        };
        let json = serde_json::to_vec_pretty(&secret).map_err(|e| KeyError::Format {
            path: dir.join(SECRET_FILE),
            reason: e.to_string(),
        })?;
        durable::write_atomic(&dir.join(SECRET_FILE), &json, 0o600)?;
        durable::write_atomic(
            &dir.join(PUBLIC_FILE),
            &public_key_json(&self.public()),
            0o644,
        )?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<ReleaseKey, KeyError> {
        let kf = read_key_file(path)?;
        let secret = kf.secret.as_deref().ok_or_else(|| KeyError::Format {
            path: path.to_path_buf(),
            reason: "no \"secret\" field (is this a .pub file?)".into(),
        })?;
        let bytes = decode32(path, "secret", secret)?;
        let key = ReleaseKey::from_secret(bytes);
        check_id(path, &kf.keyid, key.id)?;
        Ok(key)
    }

    /// Load `release.key` from a key directory.
    pub fn load_dir(dir: &Path) -> Result<ReleaseKey, KeyError> {
        ReleaseKey::load(&dir.join(SECRET_FILE))
    }
}

pub fn public_key_json(key: &VerifyingKey) -> Vec<u8> {
    let f = KeyFile {
        keyid: KeyId::of(key).to_string(),
        algorithm: "ed25519".into(),
        secret: None,
        public: Some(B64.encode(key.as_bytes())),
    };
    let mut v = serde_json::to_vec_pretty(&f).unwrap_or_default();
    v.push(b'\n');
    v
}

fn read_key_file(path: &Path) -> Result<KeyFile, KeyError> {
    let text = std::fs::read(path).map_err(|source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if text.len() > 64 * 1024 {
        return Err(KeyError::Format {
            path: path.to_path_buf(),
            reason: "file is larger than 64 KiB".into(),
        });
    }
    let kf: KeyFile = serde_json::from_slice(&text).map_err(|e| KeyError::Format {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if kf.algorithm != "ed25519" {
        return Err(KeyError::Format {
            path: path.to_path_buf(),
            reason: format!(
                "algorithm {:?} is not supported (only ed25519)",
                kf.algorithm
            ),
        });
    }
    Ok(kf)
}

fn decode32(path: &Path, field: &str, b64: &str) -> Result<[u8; 32], KeyError> {
    let v = B64.decode(b64).map_err(|e| KeyError::Format {
        path: path.to_path_buf(),
        reason: format!("{field}: {e}"),
    })?;
    v.try_into().map_err(|v: Vec<u8>| KeyError::Format {
        path: path.to_path_buf(),
        reason: format!("{field} is {} bytes, expected 32", v.len()),
    })
}

fn check_id(path: &Path, claimed: &str, actual: KeyId) -> Result<(), KeyError> {
    if claimed != actual.to_string() {
        return Err(KeyError::IdMismatch {
            path: path.to_path_buf(),
            claimed: claimed.to_string(),
            actual,
        });
    }
    Ok(())
}

pub fn load_public(path: &Path) -> Result<VerifyingKey, KeyError> {
    let kf = read_key_file(path)?;
    let public = kf.public.as_deref().ok_or_else(|| KeyError::Format {
        path: path.to_path_buf(),
        reason: "no \"public\" field".into(),
    })?;
    let bytes = decode32(path, "public", public)?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|e| KeyError::Format {
        path: path.to_path_buf(),
        reason: format!("public key is not a valid ed25519 point: {e}"),
    })?;
    // A weak (small-order) key would accept forged signatures under plain
    // verify; verify_strict rejects them, but refuse to trust one at all.
    if key.is_weak() {
        return Err(KeyError::Format {
            path: path.to_path_buf(),
            reason: "weak ed25519 public key".into(),
        });
    }
    check_id(path, &kf.keyid, KeyId::of(&key))?;
    Ok(key)
}

/// The keys a client trusts and how many distinct ones must sign.
/// On hosts it comes from a trust set file (`crate::trust`), whose
/// version it carries; 0 marks an ad-hoc store (tests, `disk show --keys`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustStore {
    pub keys: BTreeMap<KeyId, VerifyingKey>,
    pub threshold: usize,
    pub version: u64,
}

impl TrustStore {
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>, threshold: usize) -> TrustStore {
        TrustStore {
            keys: keys.into_iter().map(|k| (KeyId::of(&k), k)).collect(),
            threshold: threshold.max(1),
            version: 0,
        }
    }

    /// `version 3, 2 of 3 keys: 1f2e.., 55aa.., 9c0d..` for logs and status.
    pub fn summary(&self) -> String {
        let ids: Vec<String> = self.keys.keys().map(|k| k.to_string()).collect();
        format!(
            "version {}, {} of {} key(s): {}",
            self.version,
            self.threshold,
            self.keys.len(),
            ids.join(", ")
        )
    }

    /// Every `*.pub` in `dir` (e.g. /usr/share/nimbus/keys). One bad file fails
    /// the whole load: a trust root that half-loads is worse than none.
    pub fn load_dir(dir: &Path, threshold: usize) -> Result<TrustStore, KeyError> {
        let rd = std::fs::read_dir(dir).map_err(|source| KeyError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut paths = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|source| KeyError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            let p = ent.path();
            if p.extension().is_some_and(|e| e == "pub") {
                paths.push(p);
            }
        }
        paths.sort();
        let keys = paths
            .iter()
            .map(|p| load_public(p))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(KeyError::NoKeys {
                dir: dir.to_path_buf(),
            });
        }
        Ok(TrustStore::new(keys, threshold))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_write_load_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        let k = ReleaseKey::generate().unwrap();
        k.write_to_dir(d.path()).unwrap();
        let k2 = ReleaseKey::load_dir(d.path()).unwrap();
        assert_eq!(k.id, k2.id);
        let t = TrustStore::load_dir(d.path(), 1).unwrap();
        assert!(t.keys.contains_key(&k.id));
        assert!(matches!(
            k.write_to_dir(d.path()),
            Err(KeyError::Exists { .. })
        ));
    }

    #[test]
    fn id_mismatch_is_rejected() {
        let d = tempfile::tempdir().unwrap();
        let k = ReleaseKey::generate().unwrap();
        let other = ReleaseKey::generate().unwrap();
        let mut json: serde_json::Value =
            serde_json::from_slice(&public_key_json(&k.public())).unwrap();
        json["keyid"] = other.id.to_string().into();
        let p = d.path().join("x.pub");
        std::fs::write(&p, json.to_string()).unwrap();
        assert!(matches!(load_public(&p), Err(KeyError::IdMismatch { .. })));
    }

    #[test]
    fn empty_dir_has_no_keys() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            TrustStore::load_dir(d.path(), 1),
            Err(KeyError::NoKeys { .. })
        ));
    }
}
