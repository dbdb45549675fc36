//! The trust set: which release keys a host trusts, how many of them must
//! sign, and how that changes over a host's life (docs/formats.md, "Trust
//! set"; docs/security.md, "Rotating keys").
//!
//! An image carries a trust set file in USR and in stage 1. It is trusted
//! because the image is. A release can carry a newer set: version n+1,
//! signed by a threshold of set n's keys (the old keys vouch for the new
//! set, as TUF's root rotation) and by a threshold of its own keys (the new
//! keys are held). A host keeps the rotations it learned as a chain of
//! signed files and re-checks the chain from its built-in set every time it
//! loads it, so a chain file is never trusted because of where it lies.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::VerifyingKey;

use crate::keys::{KeyId, TrustStore};
use crate::release::{verify_detached, VerifyError};

pub const TRUST_SCHEMA: u32 = 1;
/// A trust set file larger than this is refused before parsing.
pub const MAX_TRUST_BYTES: usize = 64 * 1024;
/// As many keys as a slot descriptor has signature entries.
pub const MAX_TRUST_KEYS: usize = crate::release::MAX_DESCRIPTOR_SIGNATURES;
/// The most rotation files a chain directory is read for.
pub const MAX_CHAIN: usize = 64;

// Where sets live: USR's built-in set at `crate::paths::TRUST_USR`, stage
// 1's at `crate::paths::TRUST_STAGE1`; rotations in the chain store
// (`crate::chain`).

/// `trust/<version>.json` in a release repository and in a chain directory;
/// its signatures are beside it with `.sig` appended.
pub fn chain_file(version: u64) -> String {
    format!("{version}.json")
}

pub fn repo_path(version: u64) -> String {
    format!("{}/{}", crate::repo::TRUST_DIR, chain_file(version))
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustDoc {
    pub schema: u32,
    /// Starts at 1; each rotation adds exactly one.
    pub version: u64,
    /// Distinct keys of this set that must sign a manifest, a slot
    /// descriptor, or the next trust set.
    pub threshold: usize,
    pub keys: Vec<TrustedKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    pub keyid: String,
    /// base64 of the 32-byte ed25519 public key.
    pub public: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("trust set is {size} bytes, larger than the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("trust set is not valid JSON for schema {TRUST_SCHEMA}: {0}")]
    Parse(String),
    #[error("trust set schema {0} is not supported (this build reads {TRUST_SCHEMA})")]
    Schema(u32),
    #[error("trust set: {0}")]
    Invalid(String),
    #[error("trust set version {got} is not newer than version {have} already trusted (an older or replayed trust set)")]
    Older { got: u64, have: u64 },
    #[error("trust set version {got} does not follow version {have}: each rotation is signed by the set just before it")]
    Gap { got: u64, have: u64 },
    #[error(
        "trust set version {version} is not vouched for by trust set version {have}: {source}"
    )]
    NotVouched {
        version: u64,
        have: u64,
        source: VerifyError,
    },
    #[error("trust set version {version} is not signed by its own keys (the new keys must sign too): {source}")]
    NotSelfSigned { version: u64, source: VerifyError },
}

impl TrustDoc {
    /// Version 1 of a set: what an image carries when no set is given.
    pub fn initial(keys: impl IntoIterator<Item = VerifyingKey>, threshold: usize) -> TrustDoc {
        let mut s = TrustStore::new(keys, threshold);
        s.version = 1;
        TrustDoc::from_store(&s)
    }

    pub fn from_store(store: &TrustStore) -> TrustDoc {
        TrustDoc {
            schema: TRUST_SCHEMA,
            version: store.version,
            threshold: store.threshold,
            keys: store
                .keys
                .iter()
                .map(|(id, k)| TrustedKey {
                    keyid: id.to_string(),
                    public: B64.encode(k.as_bytes()),
                })
                .collect(),
        }
    }

    /// Parse and check the whole set; nothing half-valid is returned.
    pub fn parse(bytes: &[u8]) -> Result<TrustDoc, TrustError> {
        if bytes.len() > MAX_TRUST_BYTES {
            return Err(TrustError::TooLarge {
                size: bytes.len(),
                limit: MAX_TRUST_BYTES,
            });
        }
        let d: TrustDoc =
            serde_json::from_slice(bytes).map_err(|e| TrustError::Parse(e.to_string()))?;
        d.store()?;
        Ok(d)
    }

    /// The checked store: schema, version, threshold within the keys, every
    /// key a strong ed25519 point whose id matches, no key twice.
    pub fn store(&self) -> Result<TrustStore, TrustError> {
        let bad = |m: String| Err(TrustError::Invalid(m));
        if self.schema != TRUST_SCHEMA {
            return Err(TrustError::Schema(self.schema));
        }
        if self.version == 0 {
            return bad("version must be 1 or more".into());
        }
        if self.keys.is_empty() || self.keys.len() > MAX_TRUST_KEYS {
            return bad(format!(
                "{} keys; a trust set holds 1 to {MAX_TRUST_KEYS}",
                self.keys.len()
            ));
        }
        if self.threshold == 0 || self.threshold > self.keys.len() {
            return bad(format!(
                "threshold {} must be between 1 and the number of keys ({})",
                self.threshold,
                self.keys.len()
            ));
        }
        let mut keys = Vec::new();
        for k in &self.keys {
            let raw = B64
                .decode(&k.public)
                .map_err(|e| TrustError::Invalid(format!("key {}: public: {e}", k.keyid)))?;
            let raw: [u8; 32] = raw.try_into().map_err(|v: Vec<u8>| {
                TrustError::Invalid(format!(
                    "key {}: public is {} bytes, expected 32",
                    k.keyid,
                    v.len()
                ))
            })?;
            let key = VerifyingKey::from_bytes(&raw).map_err(|e| {
                TrustError::Invalid(format!("key {}: not an ed25519 point: {e}", k.keyid))
            })?;
            if key.is_weak() {
                return bad(format!("key {}: weak ed25519 public key", k.keyid));
            }
            let id = KeyId::of(&key);
            if id.to_string() != k.keyid {
                return bad(format!(
                    "key {}: the key's id is {id} (ids are derived, never chosen)",
                    k.keyid
                ));
            }
            if keys.iter().any(|(other, _)| *other == id) {
                return bad(format!("key {id} is listed twice"));
            }
            keys.push((id, key));
        }
        let mut s = TrustStore::new(keys.into_iter().map(|(_, k)| k), self.threshold);
        s.version = self.version;
        Ok(s)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

/// Read a built-in trust set file.
pub fn load(path: &Path) -> Result<TrustStore, TrustError> {
    let b = read_bounded(path, MAX_TRUST_BYTES)?;
    TrustDoc::parse(&b)
        .and_then(|d| d.store())
        .map_err(|e| match e {
            TrustError::Io { .. } => e,
            other => TrustError::Invalid(format!("{}: {other}", path.display())),
        })
}

fn read_bounded(path: &Path, limit: usize) -> Result<Vec<u8>, TrustError> {
    use std::io::Read;
    let io = |source| TrustError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let mut b = Vec::new();
    f.take(limit as u64 + 1).read_to_end(&mut b).map_err(io)?;
    if b.len() > limit {
        return Err(TrustError::TooLarge {
            size: b.len(),
            limit,
        });
    }
    Ok(b)
}

/// Step from `current` to the set in `bytes`: signed by `current`'s
/// threshold (checked before anything in `bytes` is parsed), exactly one
/// version newer, and signed by its own threshold.
pub fn advance(current: &TrustStore, bytes: &[u8], sigs: &[u8]) -> Result<TrustStore, TrustError> {
    if bytes.len() > MAX_TRUST_BYTES {
        return Err(TrustError::TooLarge {
            size: bytes.len(),
            limit: MAX_TRUST_BYTES,
        });
    }
    verify_detached(bytes, sigs, current).map_err(|source| TrustError::NotVouched {
        version: current.version + 1,
        have: current.version,
        source,
    })?;
    let next = TrustDoc::parse(bytes)?.store()?;
    if next.version <= current.version {
        return Err(TrustError::Older {
            got: next.version,
            have: current.version,
        });
    }
    if next.version != current.version + 1 {
        return Err(TrustError::Gap {
            got: next.version,
            have: current.version,
        });
    }
    verify_detached(bytes, sigs, &next).map_err(|source| TrustError::NotSelfSigned {
        version: next.version,
        source,
    })?;
    Ok(next)
}

/// One rotation file with its signatures, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub version: u64,
    pub bytes: Vec<u8>,
    pub sigs: Vec<u8>,
}

/// Every set reachable from `base` through `links`, in order: the first is
/// `base`. Links at or below a version already reached are passed over
/// (a set never goes back); the walk stops at the first link that does not
/// verify, whose error is returned beside the sets it did reach.
pub fn walk(base: TrustStore, links: &[Link]) -> (Vec<TrustStore>, Option<TrustError>) {
    let mut links: Vec<&Link> = links.iter().collect();
    links.sort_by_key(|l| l.version);
    let mut sets = vec![base];
    for l in links {
        let cur = &sets[sets.len() - 1];
        if l.version <= cur.version {
            continue;
        }
        match advance(cur, &l.bytes, &l.sigs) {
            Ok(next) => sets.push(next),
            Err(e) => return (sets, Some(e)),
        }
    }
    (sets, None)
}

/// Make the next set from `current`: add and remove keys, maybe a new
/// threshold; version + 1. Signing is the caller's (see `sign`).
pub fn rotate(
    current: &TrustStore,
    add: &[VerifyingKey],
    remove: &[KeyId],
    threshold: Option<usize>,
) -> Result<TrustDoc, TrustError> {
    let mut keys = current.keys.clone();
    for id in remove {
        if keys.remove(id).is_none() {
            return Err(TrustError::Invalid(format!(
                "key {id} is not in trust set version {}",
                current.version
            )));
        }
    }
    for k in add {
        if keys.insert(KeyId::of(k), *k).is_some() {
            return Err(TrustError::Invalid(format!(
                "key {} is already in trust set version {}",
                KeyId::of(k),
                current.version
            )));
        }
    }
    let mut next = TrustStore::new(keys.into_values(), threshold.unwrap_or(current.threshold));
    next.version = current.version + 1;
    let doc = TrustDoc::from_store(&next);
    doc.store()?;
    Ok(doc)
}

/// The set stage 1 booted with, as it tells stage 2 on the kernel command
/// line (`nimbus.trust=<version>:<threshold>:<id>,<id>`), so the running
/// system can show it (`updatectl trust`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stage1Trust {
    pub version: u64,
    pub threshold: usize,
    pub keys: Vec<String>,
}

pub fn cmdline_arg(t: &TrustStore) -> String {
    let ids: Vec<String> = t.keys.keys().map(|k| k.to_string()).collect();
    format!(
        "nimbus.trust={}:{}:{}",
        t.version,
        t.threshold,
        ids.join(",")
    )
}

pub fn parse_cmdline_arg(cmdline: &str) -> Option<Stage1Trust> {
    let v = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("nimbus.trust="))?;
    let mut it = v.splitn(3, ':');
    let version = it.next()?.parse().ok()?;
    let threshold = it.next()?.parse().ok()?;
    let keys = it
        .next()?
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    Some(Stage1Trust {
        version,
        threshold,
        keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::ReleaseKey;
    use crate::release::Manifest;

    fn key(n: u8) -> ReleaseKey {
        ReleaseKey::from_secret([n; 32])
    }

    fn set(version: u64, threshold: usize, keys: &[&ReleaseKey]) -> TrustStore {
        let mut s = TrustStore::new(keys.iter().map(|k| k.public()), threshold);
        s.version = version;
        s
    }

    fn link(doc: &TrustDoc, signers: &[&ReleaseKey]) -> Link {
        let bytes = doc.to_bytes();
        let sigs = serde_json::to_vec(&Manifest::sign_bytes(&bytes, signers)).unwrap();
        Link {
            version: doc.version,
            bytes,
            sigs,
        }
    }

    #[test]
    fn add_then_remove_a_key() {
        let (k1, k2) = (key(1), key(2));
        let v1 = set(1, 1, &[&k1]);
        let d2 = rotate(&v1, &[k2.public()], &[], None).unwrap();
        let l2 = link(&d2, &[&k1, &k2]);
        let v2 = advance(&v1, &l2.bytes, &l2.sigs).unwrap();
        assert_eq!(v2.version, 2);
        assert_eq!(v2.keys.len(), 2);
        let d3 = rotate(&v2, &[], &[k1.id], None).unwrap();
        let l3 = link(&d3, &[&k2]);
        let (sets, err) = walk(v1.clone(), &[l3.clone(), l2.clone()]);
        assert!(err.is_none(), "{err:?}");
        let last = sets.last().unwrap();
        assert_eq!(last.version, 3);
        assert!(!last.keys.contains_key(&k1.id));
        // Stage 1 with a newer built-in set passes over the older links.
        let (sets, err) = walk(last.clone(), &[l2, l3]);
        assert!(err.is_none());
        assert_eq!(sets.len(), 1);
    }

    #[test]
    fn bad_rotations_are_refused_with_their_reason() {
        let (k1, k2, k3) = (key(1), key(2), key(3));
        let v2 = set(2, 1, &[&k2]); // k1 was removed in version 2
                                    // A set signed by the removed key.
        let d3 = rotate(&v2, &[k1.public()], &[], None).unwrap();
        let l = link(&d3, &[&k1]);
        let e = advance(&v2, &l.bytes, &l.sigs).unwrap_err();
        assert!(
            matches!(
                e,
                TrustError::NotVouched {
                    source: VerifyError::UntrustedKey { .. },
                    ..
                }
            ),
            "{e}"
        );
        // An older set, signed by a key that is still trusted.
        let mut old = TrustDoc::from_store(&set(1, 1, &[&k1, &k2]));
        old.version = 1;
        let l = link(&old, &[&k2]);
        assert!(matches!(
            advance(&v2, &l.bytes, &l.sigs),
            Err(TrustError::Older { got: 1, have: 2 })
        ));
        // Skipping a version.
        let mut skip = rotate(&v2, &[k3.public()], &[], None).unwrap();
        skip.version = 4;
        let l = link(&skip, &[&k2, &k3]);
        assert!(matches!(
            advance(&v2, &l.bytes, &l.sigs),
            Err(TrustError::Gap { got: 4, have: 2 })
        ));
        // The new key did not sign its own set.
        let d3 = rotate(&v2, &[k3.public()], &[k2.id], None).unwrap();
        let l = link(&d3, &[&k2]);
        assert!(matches!(
            advance(&v2, &l.bytes, &l.sigs),
            Err(TrustError::NotSelfSigned { .. })
        ));
        // Threshold 2 of 3: one signature of the current set is not enough,
        // and the same key twice is still one.
        let v5 = set(5, 2, &[&k1, &k2, &k3]);
        let d6 = rotate(&v5, &[], &[k3.id], Some(1)).unwrap();
        for (name, signers) in [("one", &[&k1][..]), ("one twice", &[&k1, &k1][..])] {
            let l = link(&d6, signers);
            assert!(
                matches!(
                    advance(&v5, &l.bytes, &l.sigs),
                    Err(TrustError::NotVouched {
                        source: VerifyError::Threshold {
                            valid: 1,
                            needed: 2,
                            ..
                        },
                        ..
                    })
                ),
                "{name}"
            );
        }
        let l = link(&d6, &[&k1, &k2]);
        assert_eq!(advance(&v5, &l.bytes, &l.sigs).unwrap().threshold, 1);
        // The walk stops at the first bad link and keeps what it reached.
        let good = link(
            &rotate(&v2, &[k3.public()], &[], None).unwrap(),
            &[&k2, &k3],
        );
        let mut bad = link(
            &rotate(&set(3, 1, &[&k2, &k3]), &[], &[k2.id], None).unwrap(),
            &[&k3],
        );
        bad.sigs = b"[]".to_vec();
        let (sets, err) = walk(v2.clone(), &[good, bad]);
        assert_eq!(sets.last().unwrap().version, 3);
        assert!(err.is_some());
    }

    #[test]
    fn stage1_tells_stage2_its_set() {
        let t = set(3, 1, &[&key(1), &key(2)]);
        let line = format!("console=ttyS0 {} panic=-1", cmdline_arg(&t));
        let got = parse_cmdline_arg(&line).unwrap();
        assert_eq!((got.version, got.threshold, got.keys.len()), (3, 1, 2));
        assert_eq!(parse_cmdline_arg("console=ttyS0"), None);
        assert_eq!(parse_cmdline_arg("nimbus.trust=x:1:a"), None);
    }

    #[test]
    fn malformed_sets_are_refused() {
        let k1 = key(1);
        let good = TrustDoc::from_store(&set(1, 1, &[&k1]));
        let mut cases: Vec<(TrustDoc, &str)> = Vec::new();
        let mut d = good.clone();
        d.threshold = 2;
        cases.push((d, "threshold 2"));
        let mut d = good.clone();
        d.threshold = 0;
        cases.push((d, "threshold 0"));
        let mut d = good.clone();
        d.version = 0;
        cases.push((d, "version must be"));
        let mut d = good.clone();
        d.keys.push(d.keys[0].clone());
        d.threshold = 1;
        cases.push((d, "listed twice"));
        let mut d = good.clone();
        d.keys[0].keyid = "0000000000000000".into();
        cases.push((d, "ids are derived"));
        let mut d = good.clone();
        d.keys[0].public = B64.encode([0u8; 32]);
        cases.push((d, "weak"));
        let mut d = good.clone();
        d.keys.clear();
        cases.push((d, "0 keys"));
        for (d, want) in cases {
            let e = TrustDoc::parse(&d.to_bytes()).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        assert!(matches!(
            TrustDoc::parse(b"{\"schema\":1,\"version\":1,\"threshold\":1,\"keys\":[],\"x\":1}"),
            Err(TrustError::Parse(_))
        ));
        assert!(matches!(
            TrustDoc::parse(&vec![b' '; MAX_TRUST_BYTES + 1]),
            Err(TrustError::TooLarge { .. })
        ));
        assert_eq!(TrustDoc::parse(&good.to_bytes()).unwrap(), good);
    }

    #[test]
    fn chain_dir_roundtrip_and_missing_signatures_end_it() {
        let (k1, k2) = (key(1), key(2));
        let v1 = set(1, 1, &[&k1]);
        let d = tempfile::tempdir().unwrap();
        let read = |p: &Path| crate::chain::read(&crate::esp::DirEsp(p.to_path_buf()), "").unwrap();
        assert!(read(&d.path().join("none")).is_empty());
        let l2 = link(
            &rotate(&v1, &[k2.public()], &[], None).unwrap(),
            &[&k1, &k2],
        );
        let v2 = advance(&v1, &l2.bytes, &l2.sigs).unwrap();
        let l3 = link(&rotate(&v2, &[], &[k1.id], None).unwrap(), &[&k2]);
        for l in [&l2, &l3] {
            std::fs::write(d.path().join(chain_file(l.version)), &l.bytes).unwrap();
        }
        std::fs::write(d.path().join("2.json.sig"), &l2.sigs).unwrap();
        std::fs::write(d.path().join("notes.txt"), b"x").unwrap();
        let links = read(d.path());
        assert_eq!(links, vec![l2.clone()]);
        std::fs::write(d.path().join("3.json.sig"), &l3.sigs).unwrap();
        let (sets, err) = walk(v1, &read(d.path()));
        assert!(err.is_none());
        assert_eq!(sets.last().unwrap().version, 3);
    }
}
