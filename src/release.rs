//! Signed release formats: the slot descriptor at the end of every USR
//! partition, and the channel manifest with its detached signatures
//! (byte layouts in docs/formats.md, "Slot descriptor" and "Channel
//! manifest").
//!
//! Signatures are checked over the exact bytes received, never over a
//! re-serialisation, with `verify_strict` (no malleable or small-order
//! signatures), before anything but a size check looks at the content.

use std::collections::BTreeSet;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chrono::{DateTime, Utc};
use ed25519_dalek::Signature;
use semver::Version;

use crate::keys::{KeyId, ReleaseKey, TrustStore};

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
pub const DESCRIPTOR_SIZE: usize = 4096;
pub const DESCRIPTOR_MAGIC: &[u8; 8] = b"NIMBUSSD";
pub const DESCRIPTOR_FORMAT: u32 = 2;
/// Bytes 0..SIGNED_END are signed; the signature table follows.
const SIGNED_END: usize = 2048;
/// One table entry: the signer's key id, then its ed25519 signature.
const SIG_ENTRY: usize = 8 + 64;
/// Room for 28 signatures, as many as a trust set may hold keys.
pub const MAX_DESCRIPTOR_SIGNATURES: usize = 28;
const COUNT_FIELD: usize = 12;
const VERSION_FIELD: std::ops::Range<usize> = 16..80;
const USED_END: usize = 192;
pub const VERITY_BLOCK: u32 = 4096;

/// The signed record in the last 4 KiB of a USR partition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlotDescriptor {
    pub version: Version,
    /// Bytes of filesystem at the start of the slot (whole verity blocks).
    pub data_size: u64,
    /// Where the verity hash tree starts, in bytes from the slot start.
    pub hash_offset: u64,
    pub hash_size: u64,
    #[serde(with = "hex_bytes")]
    pub verity_root: [u8; 32],
    #[serde(with = "hex_bytes")]
    pub verity_salt: [u8; 32],
    /// Unix seconds (SOURCE_DATE_EPOCH for reproducible builds).
    pub created: u64,
    /// Who signed, in table order; filled when a descriptor is read, ignored
    /// when one is signed (the keys passed to `sign` are the signers).
    #[serde(serialize_with = "display_all")]
    pub signers: Vec<KeyId>,
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(b: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }
}

fn display_all<S: serde::Serializer, T: std::fmt::Display>(
    v: &[T],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| x.to_string()))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("slot descriptor: no descriptor (magic is {0:?}, expected \"NIMBUSSD\"); the slot is empty or not a Nimbus USR")]
    BadMagic(String),
    #[error("slot descriptor: format version {0} is not supported (this build reads {DESCRIPTOR_FORMAT})")]
    UnsupportedFormat(u32),
    #[error("slot descriptor: reserved byte {offset} is {value:#04x}, must be zero")]
    NonZeroReserved { offset: usize, value: u8 },
    #[error("slot descriptor: field {field}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("slot descriptor: {0}")]
    Signature(#[from] VerifyError),
    #[error("slot descriptor: {0} bytes, expected {DESCRIPTOR_SIZE}")]
    Size(usize),
}

fn field(field: &'static str, reason: impl Into<String>) -> DescriptorError {
    DescriptorError::Field {
        field,
        reason: reason.into(),
    }
}

impl SlotDescriptor {
    fn check_fields(&self) -> Result<(), DescriptorError> {
        let b = u64::from(VERITY_BLOCK);
        if self.data_size == 0 || !self.data_size.is_multiple_of(b) {
            return Err(field(
                "data_size",
                format!("{} is not a positive multiple of 4096", self.data_size),
            ));
        }
        if self.hash_offset < self.data_size || !self.hash_offset.is_multiple_of(b) {
            return Err(field(
                "hash_offset",
                format!(
                    "{} must be 4096-aligned and not inside the data ({} bytes)",
                    self.hash_offset, self.data_size
                ),
            ));
        }
        if self.hash_size == 0 || !self.hash_size.is_multiple_of(b) {
            return Err(field(
                "hash_size",
                format!("{} is not a positive multiple of 4096", self.hash_size),
            ));
        }
        if self.version.to_string().len() > VERSION_FIELD.len() {
            return Err(field("version", "longer than 64 bytes"));
        }
        Ok(())
    }

    /// Bytes of the slot the descriptor covers, excluding itself: data and tree.
    pub fn payload_end(&self) -> u64 {
        self.hash_offset + self.hash_size
    }

    /// Encode and sign with every key (distinct keys, 1 to 28). Fails only
    /// if a field is out of range or the key list is.
    pub fn sign(&self, keys: &[&ReleaseKey]) -> Result<[u8; DESCRIPTOR_SIZE], DescriptorError> {
        self.check_fields()?;
        let ids: BTreeSet<KeyId> = keys.iter().map(|k| k.id).collect();
        if keys.is_empty() || keys.len() > MAX_DESCRIPTOR_SIGNATURES || ids.len() != keys.len() {
            return Err(field(
                "signatures",
                format!(
                    "{} keys given; a descriptor is signed by 1 to {MAX_DESCRIPTOR_SIGNATURES} distinct keys",
                    keys.len()
                ),
            ));
        }
        let d = self;
        let mut b = [0u8; DESCRIPTOR_SIZE];
        b[0..8].copy_from_slice(DESCRIPTOR_MAGIC);
        b[8..12].copy_from_slice(&DESCRIPTOR_FORMAT.to_le_bytes());
        // The count is signed, so a table cut short is caught as such.
        b[COUNT_FIELD..COUNT_FIELD + 4].copy_from_slice(&(keys.len() as u32).to_le_bytes());
        let v = d.version.to_string();
        b[VERSION_FIELD.start..VERSION_FIELD.start + v.len()].copy_from_slice(v.as_bytes());
        b[80..88].copy_from_slice(&d.data_size.to_le_bytes());
        b[88..96].copy_from_slice(&d.hash_offset.to_le_bytes());
        b[96..104].copy_from_slice(&d.hash_size.to_le_bytes());
        b[104..108].copy_from_slice(&VERITY_BLOCK.to_le_bytes());
        b[108..112].copy_from_slice(&VERITY_BLOCK.to_le_bytes());
        b[112..144].copy_from_slice(&d.verity_root);
        b[144..176].copy_from_slice(&d.verity_salt);
        b[184..192].copy_from_slice(&d.created.to_le_bytes());
        for (n, key) in keys.iter().enumerate() {
            let sig = key.sign(&b[..SIGNED_END]);
            let at = SIGNED_END + n * SIG_ENTRY;
            b[at..at + 8].copy_from_slice(&key.id.0);
            b[at + 8..at + SIG_ENTRY].copy_from_slice(&sig);
        }
        Ok(b)
    }

    /// The signature table: (key id, signature) for each of `count`
    /// entries, after checking that everything past them is zero.
    fn signature_table(b: &[u8]) -> Result<Vec<(KeyId, [u8; 64])>, DescriptorError> {
        let count = u32::from_le_bytes([
            b[COUNT_FIELD],
            b[COUNT_FIELD + 1],
            b[COUNT_FIELD + 2],
            b[COUNT_FIELD + 3],
        ]) as usize;
        if count == 0 || count > MAX_DESCRIPTOR_SIGNATURES {
            return Err(field(
                "signature_count",
                format!(
                    "{count} (a descriptor carries 1 to {MAX_DESCRIPTOR_SIGNATURES} signatures)"
                ),
            ));
        }
        let end = SIGNED_END + count * SIG_ENTRY;
        if let Some(off) = b[end..].iter().position(|&c| c != 0) {
            return Err(DescriptorError::NonZeroReserved {
                offset: end + off,
                value: b[end + off],
            });
        }
        Ok(b[SIGNED_END..end]
            .chunks_exact(SIG_ENTRY)
            .map(|e| {
                let mut id = [0u8; 8];
                id.copy_from_slice(&e[..8]);
                let mut sig = [0u8; 64];
                sig.copy_from_slice(&e[8..]);
                (KeyId(id), sig)
            })
            .collect())
    }

    /// Decode without checking the signature: for display only (`disk show`
    /// reports both the fields and whether they verify). Never act on this.
    pub fn parse_unverified(b: &[u8]) -> Result<SlotDescriptor, DescriptorError> {
        if b.len() != DESCRIPTOR_SIZE {
            return Err(DescriptorError::Size(b.len()));
        }
        if &b[0..8] != DESCRIPTOR_MAGIC {
            return Err(DescriptorError::BadMagic(
                String::from_utf8_lossy(&b[0..8]).into_owned(),
            ));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let fmt = u32_at(8);
        if fmt != DESCRIPTOR_FORMAT {
            return Err(DescriptorError::UnsupportedFormat(fmt));
        }
        let signers = SlotDescriptor::signature_table(b)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        for off in (176..184).chain(USED_END..SIGNED_END) {
            if b[off] != 0 {
                return Err(DescriptorError::NonZeroReserved {
                    offset: off,
                    value: b[off],
                });
            }
        }
        let vf = &b[VERSION_FIELD];
        let vlen = vf.iter().position(|&c| c == 0).unwrap_or(vf.len());
        if let Some(off) = vf[vlen..].iter().position(|&c| c != 0) {
            return Err(DescriptorError::NonZeroReserved {
                offset: VERSION_FIELD.start + vlen + off,
                value: vf[vlen + off],
            });
        }
        let vs = std::str::from_utf8(&vf[..vlen]).map_err(|_| field("version", "not UTF-8"))?;
        let version = Version::parse(vs).map_err(|e| field("version", format!("{vs:?}: {e}")))?;
        for (o, name) in [(104, "data_block_size"), (108, "hash_block_size")] {
            if u32_at(o) != VERITY_BLOCK {
                return Err(field(
                    name,
                    format!("{} (only 4096 is supported)", u32_at(o)),
                ));
            }
        }
        let mut verity_root = [0u8; 32];
        verity_root.copy_from_slice(&b[112..144]);
        let mut verity_salt = [0u8; 32];
        verity_salt.copy_from_slice(&b[144..176]);
        let d = SlotDescriptor {
            version,
            data_size: u64_at(80),
            hash_offset: u64_at(88),
            hash_size: u64_at(96),
            verity_root,
            verity_salt,
            created: u64_at(184),
            signers,
        };
        d.check_fields()?;
        Ok(d)
    }

    /// Verify the signatures over bytes 0..2048 against the trust store's
    /// threshold, then decode. Every byte is covered: the signed half by
    /// the signatures, the table by its signed count, each signature by
    /// ed25519's strict checks, and all bytes past the table must be zero.
    pub fn verify(b: &[u8], trust: &TrustStore) -> Result<SlotDescriptor, DescriptorError> {
        if b.len() != DESCRIPTOR_SIZE {
            return Err(DescriptorError::Size(b.len()));
        }
        if &b[0..8] != DESCRIPTOR_MAGIC {
            return Err(DescriptorError::BadMagic(
                String::from_utf8_lossy(&b[0..8]).into_owned(),
            ));
        }
        let fmt = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if fmt != DESCRIPTOR_FORMAT {
            return Err(DescriptorError::UnsupportedFormat(fmt));
        }
        let table = SlotDescriptor::signature_table(b)?;
        require_threshold(
            trust,
            &b[..SIGNED_END],
            table
                .into_iter()
                .map(|(id, sig)| (id.to_string(), Ok(sig.to_vec()))),
        )?;
        SlotDescriptor::parse_unverified(b)
    }
}

// ---------------------------------------------------------------------------
// Channel manifest

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

fn plain_relative(p: &str) -> bool {
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

fn is_hex64(s: &str) -> bool {
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
    use chrono::Duration;

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
