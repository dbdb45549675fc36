//! The channel manifest and its detached signatures (docs/formats.md,
//! "Channel manifest"): releases, deltas, stage-1 files, rollouts, and the
//! policy a host checks them against.

use super::descriptor::DESCRIPTOR_SIZE;
use super::{verify_detached, VerifyError, MAX_INDEX_BYTES};
use crate::keys::{ReleaseKey, TrustStore};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chrono::{DateTime, Utc};
use semver::Version;
use std::collections::BTreeSet;

pub const MANIFEST_SCHEMA: u32 = 1;

/// A manifest larger than this is refused before parsing: a channel lists a
/// handful of releases, and a hostile server must not make a client buffer
/// gigabytes.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;

pub const MAX_SIGNATURES_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema: u32,
    pub channel: String,
    /// Monotonic per channel; clients refuse to go back.
    pub serial: u64,
    pub issued: DateTime<Utc>,
    pub expires: DateTime<Utc>,
    /// Kill switch: nothing above this is offered, whatever `releases` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_version: Option<Version>,
    pub releases: Vec<Release>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub version: Version,
    /// Relative to the repository root, e.g. `payloads/1.2.0/usr.img.zst`.
    pub payload: String,
    pub compressed_size: u64,
    pub compressed_sha256: String,
    pub raw_size: u64,
    pub raw_sha256: String,
    pub verity_root: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// The release's stage 1 (kernel and initramfs), installed into the
    /// ESP's other copy with the slot (docs/boot.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage1: Option<Box<Stage1Files>>,
    /// The delta index and frame pack (`nimbus::delta`): a host fetches
    /// only the frames its slots do not already hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<Box<DeltaFiles>>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaFiles {
    pub index: FileRef,
    pub pack: FileRef,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage1Files {
    pub kernel: FileRef,
    pub initramfs: FileRef,
}

/// A file of a release, by path inside the repository, size and hash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// The largest stage-1 file a client fetches (a kernel or an initramfs).
pub const MAX_STAGE1_FILE: u64 = 256 << 20;

pub(super) fn plain_relative(p: &str) -> bool {
    !(p.is_empty()
        || p.starts_with('/')
        || p.contains("://")
        || p.split('/').any(|c| c.is_empty() || c == "." || c == ".."))
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub start: DateTime<Utc>,
    /// Hosts start over this many seconds after `start`, each at its own
    /// persisted position.
    pub duration_secs: u64,
    #[serde(default)]
    pub paused: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureEntry {
    pub keyid: String,
    pub sig: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {size} bytes, larger than the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error(transparent)]
    Signature(#[from] VerifyError),
    #[error("manifest is not valid JSON for schema {MANIFEST_SCHEMA}: {0}")]
    Parse(String),
    #[error("manifest schema {0} is not supported (this build reads {MANIFEST_SCHEMA})")]
    Schema(u32),
    #[error("manifest is for channel {got:?}, expected {expected:?}")]
    ChannelMismatch { expected: String, got: String },
    #[error("manifest expired at {expires} (now {now})")]
    Expired {
        expires: DateTime<Utc>,
        now: DateTime<Utc>,
    },
    #[error("manifest serial {serial} is older than serial {last} already accepted for channel {channel:?} (replayed or rolled back)")]
    Rollback {
        channel: String,
        serial: u64,
        last: u64,
    },
    #[error("manifest: {0}")]
    Invalid(String),
}

/// The client-side facts a manifest is judged against.
#[derive(Debug, Clone)]
pub struct ManifestPolicy<'a> {
    pub channel: &'a str,
    pub now: DateTime<Utc>,
    /// The highest serial accepted before for this channel, if any.
    pub last_serial: Option<u64>,
}

pub fn valid_channel_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_' || c == b'.'
        })
        && !name.starts_with('.')
}

pub(super) fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// The longest staged rollout a manifest may ask for (90 days): beyond
/// it, date arithmetic on the clients could overflow, and no fleet waits
/// that long.
pub const MAX_ROLLOUT_SECS: u64 = 90 * 86400;

/// The longest a manifest may stay valid (366 days).
pub const MAX_MANIFEST_LIFETIME_SECS: i64 = 366 * 86400;

impl Manifest {
    /// Structural checks that do not depend on the client.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::Invalid(m));
        if self.schema != MANIFEST_SCHEMA {
            return Err(ManifestError::Schema(self.schema));
        }
        if !valid_channel_name(&self.channel) {
            return bad(format!(
                "channel name {:?} is not [a-z0-9._-]{{1,64}}",
                self.channel
            ));
        }
        if self.expires <= self.issued {
            return bad(format!(
                "expires {} is not after issued {}",
                self.expires, self.issued
            ));
        }
        if (self.expires - self.issued).num_seconds() > MAX_MANIFEST_LIFETIME_SECS {
            return bad(format!(
                "expires {} is more than {} days after issued {}",
                self.expires,
                MAX_MANIFEST_LIFETIME_SECS / 86400,
                self.issued
            ));
        }
        let mut seen = BTreeSet::new();
        for r in &self.releases {
            let v = &r.version;
            if !seen.insert(v.clone()) {
                return bad(format!("release {v} is listed twice"));
            }
            let p = &r.payload;
            if !plain_relative(p) {
                return bad(format!("release {v}: payload path {p:?} must be a plain relative path inside the repository"));
            }
            let mut files: Vec<(&str, &FileRef, u64)> = Vec::new();
            if let Some(s1) = &r.stage1 {
                files.push(("stage1 kernel", &s1.kernel, MAX_STAGE1_FILE));
                files.push(("stage1 initramfs", &s1.initramfs, MAX_STAGE1_FILE));
            }
            if let Some(d) = &r.delta {
                files.push(("delta index", &d.index, MAX_INDEX_BYTES));
                files.push(("delta pack", &d.pack, r.raw_size.saturating_mul(2)));
            }
            for (name, f, max) in files {
                if !plain_relative(&f.path) {
                    return bad(format!("release {v}: {name} path {:?} must be a plain relative path inside the repository", f.path));
                }
                if !is_hex64(&f.sha256) {
                    return bad(format!(
                        "release {v}: {name} sha256 is not 64 lowercase hex digits"
                    ));
                }
                if f.size == 0 || f.size > max {
                    return bad(format!(
                        "release {v}: {name} size {} is not between 1 byte and {} MiB",
                        f.size,
                        max >> 20
                    ));
                }
            }
            for (name, h) in [
                ("compressed_sha256", &r.compressed_sha256),
                ("raw_sha256", &r.raw_sha256),
                ("verity_root", &r.verity_root),
            ] {
                if !is_hex64(h) {
                    return bad(format!(
                        "release {v}: {name} is not 64 lowercase hex digits"
                    ));
                }
            }
            if let Some(ro) = &r.rollout {
                if ro.duration_secs > MAX_ROLLOUT_SECS {
                    return bad(format!(
                        "release {v}: rollout of {} s is longer than {} days",
                        ro.duration_secs,
                        MAX_ROLLOUT_SECS / 86400
                    ));
                }
            }
            if r.compressed_size == 0 || r.raw_size == 0 {
                return bad(format!("release {v}: sizes must be positive"));
            }
            if r.raw_size % DESCRIPTOR_SIZE as u64 != 0 {
                return bad(format!(
                    "release {v}: raw_size {} is not a multiple of 4096",
                    r.raw_size
                ));
            }
        }
        Ok(())
    }

    /// Sign these exact bytes with each key.
    pub fn sign_bytes(bytes: &[u8], keys: &[&ReleaseKey]) -> Vec<SignatureEntry> {
        keys.iter()
            .map(|k| SignatureEntry {
                keyid: k.id.to_string(),
                sig: B64.encode(k.sign(bytes)),
            })
            .collect()
    }

    /// Verify `bytes` against the detached `signatures` file, then parse and
    /// judge them. The order matters: nothing untrusted is parsed beyond the
    /// signature file.
    pub fn verify(
        bytes: &[u8],
        signatures: &[u8],
        trust: &TrustStore,
        policy: &ManifestPolicy<'_>,
    ) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                size: bytes.len(),
                limit: MAX_MANIFEST_BYTES,
            });
        }
        verify_detached(bytes, signatures, trust)?;
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Parse(e.to_string()))?;
        m.validate()?;
        if m.channel != policy.channel {
            return Err(ManifestError::ChannelMismatch {
                expected: policy.channel.to_string(),
                got: m.channel,
            });
        }
        if policy.now >= m.expires {
            return Err(ManifestError::Expired {
                expires: m.expires,
                now: policy.now,
            });
        }
        if let Some(last) = policy.last_serial {
            if m.serial < last {
                return Err(ManifestError::Rollback {
                    channel: m.channel,
                    serial: m.serial,
                    last,
                });
            }
        }
        Ok(m)
    }
}
