//! The slot descriptor: the signed 4 KiB at the end of every USR slot
//! (docs/formats.md, "Slot descriptor").

use super::{require_threshold, VerifyError};
use crate::keys::{KeyId, ReleaseKey, TrustStore};
use semver::Version;
use std::collections::BTreeSet;

pub const DESCRIPTOR_SIZE: usize = 4096;

pub const DESCRIPTOR_MAGIC: &[u8; 8] = b"NIMBUSSD";

pub const DESCRIPTOR_FORMAT: u32 = 2;

/// Bytes 0..SIGNED_END are signed; the signature table follows.
pub(super) const SIGNED_END: usize = 2048;

/// One table entry: the signer's key id, then its ed25519 signature.
pub(super) const SIG_ENTRY: usize = 8 + 64;

/// Room for 28 signatures, as many as a trust set may hold keys.
pub const MAX_DESCRIPTOR_SIGNATURES: usize = 28;

pub(super) const COUNT_FIELD: usize = 12;

pub(super) const VERSION_FIELD: std::ops::Range<usize> = 16..80;

pub(super) const USED_END: usize = 192;

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

pub(super) fn display_all<S: serde::Serializer, T: std::fmt::Display>(
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

pub(super) fn field(field: &'static str, reason: impl Into<String>) -> DescriptorError {
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
