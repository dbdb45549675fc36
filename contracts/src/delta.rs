//! The delta index of a release (docs/formats.md, "Delta index"): what a
//! host needs to rebuild a slot from blocks it already has plus byte ranges
//! of the release's frame pack.
//!
//! The pack (`usr.pack`) is the slot's data area cut into frames of
//! [`FRAME_BLOCKS`] blocks, each compressed on its own, so any frame can
//! be fetched with an HTTP Range request and decoded alone. The index
//! (`usr.index`) holds the slot descriptor, the compressed size of every
//! frame, and a short hash of every data block: the first [`HASH_LEN`]
//! bytes of the block's dm-verity level-0 hash (salted sha256). Because
//! every release uses the same salt, a host reads the same short hashes for
//! its booted slot straight from that slot's own tree.
//!
//! The index is authenticated by its sha256 in the signed manifest. The
//! short hashes only find candidate blocks: the updater still hashes every
//! byte it writes and compares the whole slot with the manifest's
//! `raw_sha256` and the descriptor's root before anything can boot it.

use crate::release::{SlotDescriptor, DESCRIPTOR_SIZE};
use crate::verity;

pub const INDEX_MAGIC: &[u8; 8] = b"NIMBUSDX";
pub const INDEX_FORMAT: u32 = 1;
/// Data blocks per frame: 64 KiB frames keep a one-block change to one
/// small request, while zstd still finds most of its redundancy.
pub const FRAME_BLOCKS: u32 = 16;
pub const BLOCK: usize = verity::BLOCK;
pub const FRAME_RAW: usize = FRAME_BLOCKS as usize * BLOCK;
/// Bytes of each block's hash kept in the index: enough that an accidental
/// match is out of the question (2^-64 per pair), and a quarter of a full
/// level 0. A wrong match could only make the final check fail.
pub const HASH_LEN: usize = 8;
/// The largest index a client reads ([`crate::release`] checks manifests
/// against it, so it lives there).
pub use crate::release::MAX_INDEX_BYTES;
/// A frame of 64 KiB never needs more than this compressed (zstd's bound
/// for incompressible data is a few hundred bytes over).
pub const MAX_FRAME_BYTES: u32 = FRAME_RAW as u32 + 4096;
const HEADER: usize = 24;

pub type ShortHash = [u8; HASH_LEN];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("delta index is {0} bytes, too short for its header and descriptor")]
    TooShort(usize),
    #[error("delta index magic is {0:?}, expected \"NIMBUSDX\"")]
    BadMagic(String),
    #[error("delta index format {0} is not supported (this build reads {INDEX_FORMAT})")]
    Format(u32),
    #[error("delta index says {field} = {value}, this build reads {expected}")]
    Parameter {
        field: &'static str,
        value: u32,
        expected: u32,
    },
    #[error("delta index descriptor: {0}")]
    Descriptor(String),
    #[error("delta index is {got} bytes, its descriptor and frame count need {expected}")]
    Length { got: usize, expected: usize },
    #[error(
        "delta index frame {frame} is {size} compressed bytes (1 to {MAX_FRAME_BYTES} allowed)"
    )]
    FrameSize { frame: usize, size: u32 },
}

/// A parsed index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub descriptor: Vec<u8>,
    pub fields: SlotDescriptor,
    /// Offset of each frame in the pack, and the pack's size last.
    pub frame_offsets: Vec<u64>,
    pub hashes: Vec<ShortHash>,
}

pub fn short_hash(salt: &[u8], block: &[u8]) -> ShortHash {
    short_of(&verity::block_hash(salt, block))
}

/// The short form of a full level-0 entry.
pub fn short_of(full: &[u8]) -> ShortHash {
    let mut h = [0u8; HASH_LEN];
    h.copy_from_slice(&full[..HASH_LEN]);
    h
}

/// The data blocks an index of `size` bytes describes (before fetching
/// it: the manifest lists its size).
pub fn blocks_for_index_size(size: u64) -> u64 {
    let per_frame = u64::from(FRAME_BLOCKS) * HASH_LEN as u64 + 4;
    let body = size.saturating_sub((HEADER + DESCRIPTOR_SIZE) as u64);
    // Whole frames, then the blocks of a last partial frame.
    let frames = body / per_frame;
    let rest = body % per_frame;
    frames * u64::from(FRAME_BLOCKS) + rest.saturating_sub(4) / HASH_LEN as u64
}

pub fn frames_for(data_blocks: u64) -> usize {
    data_blocks.div_ceil(u64::from(FRAME_BLOCKS)) as usize
}

impl Index {
    /// Build from the descriptor, each frame's compressed size and each
    /// block's short hash (the release side).
    pub fn new(
        descriptor: &[u8],
        frame_sizes: &[u32],
        hashes: Vec<ShortHash>,
    ) -> Result<Index, IndexError> {
        let fields = SlotDescriptor::parse_unverified(descriptor)
            .map_err(|e| IndexError::Descriptor(e.to_string()))?;
        let mut frame_offsets = Vec::with_capacity(frame_sizes.len() + 1);
        let mut at = 0u64;
        frame_offsets.push(0);
        for (frame, &size) in frame_sizes.iter().enumerate() {
            if size == 0 || size > MAX_FRAME_BYTES {
                return Err(IndexError::FrameSize { frame, size });
            }
            at += u64::from(size);
            frame_offsets.push(at);
        }
        let blocks = fields.data_size / BLOCK as u64;
        if hashes.len() as u64 != blocks || frame_sizes.len() != frames_for(blocks) {
            return Err(IndexError::Length {
                got: hashes.len(),
                expected: blocks as usize,
            });
        }
        Ok(Index {
            descriptor: descriptor.to_vec(),
            fields,
            frame_offsets,
            hashes,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let frames = self.frames();
        let mut b = Vec::with_capacity(
            HEADER + DESCRIPTOR_SIZE + 4 * frames + HASH_LEN * self.hashes.len(),
        );
        b.extend_from_slice(INDEX_MAGIC);
        b.extend_from_slice(&INDEX_FORMAT.to_le_bytes());
        b.extend_from_slice(&FRAME_BLOCKS.to_le_bytes());
        b.extend_from_slice(&(HASH_LEN as u32).to_le_bytes());
        b.extend_from_slice(&(frames as u32).to_le_bytes());
        b.extend_from_slice(&self.descriptor);
        for w in self.frame_offsets.windows(2) {
            b.extend_from_slice(&((w[1] - w[0]) as u32).to_le_bytes());
        }
        for h in &self.hashes {
            b.extend_from_slice(h);
        }
        b
    }

    pub fn parse(b: &[u8]) -> Result<Index, IndexError> {
        if b.len() < HEADER + DESCRIPTOR_SIZE {
            return Err(IndexError::TooShort(b.len()));
        }
        if &b[..8] != INDEX_MAGIC {
            return Err(IndexError::BadMagic(
                String::from_utf8_lossy(&b[..8]).into_owned(),
            ));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let format = u32_at(8);
        if format != INDEX_FORMAT {
            return Err(IndexError::Format(format));
        }
        for (field, at, expected) in [
            ("frame_blocks", 12, FRAME_BLOCKS),
            ("hash_len", 16, HASH_LEN as u32),
        ] {
            let value = u32_at(at);
            if value != expected {
                return Err(IndexError::Parameter {
                    field,
                    value,
                    expected,
                });
            }
        }
        let frames = u32_at(20) as usize;
        let descriptor = &b[HEADER..HEADER + DESCRIPTOR_SIZE];
        let fields = SlotDescriptor::parse_unverified(descriptor)
            .map_err(|e| IndexError::Descriptor(e.to_string()))?;
        let blocks = fields.data_size / BLOCK as u64;
        if frames != frames_for(blocks) {
            return Err(IndexError::Descriptor(format!(
                "{frames} frames listed, but {blocks} data blocks make {}",
                frames_for(blocks)
            )));
        }
        let expected = (blocks as usize)
            .checked_mul(HASH_LEN)
            .and_then(|h| h.checked_add(HEADER + DESCRIPTOR_SIZE + 4 * frames))
            .ok_or(IndexError::Length {
                got: b.len(),
                expected: usize::MAX,
            })?;
        if b.len() != expected {
            return Err(IndexError::Length {
                got: b.len(),
                expected,
            });
        }
        let sizes_at = HEADER + DESCRIPTOR_SIZE;
        let sizes: Vec<u32> = (0..frames).map(|f| u32_at(sizes_at + 4 * f)).collect();
        let hashes = b[sizes_at + 4 * frames..]
            .chunks_exact(HASH_LEN)
            .map(short_of)
            .collect();
        Index::new(descriptor, &sizes, hashes)
    }

    pub fn data_blocks(&self) -> u64 {
        self.hashes.len() as u64
    }

    pub fn frames(&self) -> usize {
        self.frame_offsets.len() - 1
    }

    pub fn pack_size(&self) -> u64 {
        self.frame_offsets.last().copied().unwrap_or(0)
    }

    /// The pack bytes of frame `f`: `[start, end)`.
    pub fn frame_bytes(&self, f: usize) -> (u64, u64) {
        (self.frame_offsets[f], self.frame_offsets[f + 1])
    }

    /// The data blocks frame `f` decodes to: `[first, end)`.
    pub fn frame_blocks(&self, f: usize) -> (u64, u64) {
        let first = f as u64 * u64::from(FRAME_BLOCKS);
        (
            first,
            (first + u64::from(FRAME_BLOCKS)).min(self.data_blocks()),
        )
    }

    pub fn frame_of(block: u64) -> usize {
        (block / u64::from(FRAME_BLOCKS)) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::ReleaseKey;

    fn descriptor(blocks: u64) -> Vec<u8> {
        let key = ReleaseKey::generate().unwrap();
        SlotDescriptor {
            version: "1.0.0".parse().unwrap(),
            data_size: blocks * BLOCK as u64,
            hash_offset: blocks * BLOCK as u64,
            hash_size: 8192,
            verity_root: [1; 32],
            verity_salt: [2; 32],
            created: 0,
            signers: vec![key.id],
        }
        .sign(&[&key])
        .unwrap()
        .to_vec()
    }

    fn sample(blocks: u64) -> Index {
        let hashes = (0..blocks)
            .map(|i| short_hash(b"s", &i.to_le_bytes()))
            .collect();
        let sizes: Vec<u32> = (0..frames_for(blocks)).map(|f| 100 + f as u32).collect();
        Index::new(&descriptor(blocks), &sizes, hashes).unwrap()
    }

    #[test]
    fn roundtrip_and_frame_geometry() {
        let ix = sample(40);
        let b = ix.to_bytes();
        let back = Index::parse(&b).unwrap();
        assert_eq!(back, ix);
        assert_eq!(ix.frames(), 3);
        assert_eq!(ix.frame_blocks(2), (32, 40));
        assert_eq!(ix.frame_bytes(1), (100, 201));
        assert_eq!(ix.pack_size(), 100 + 101 + 102);
        assert_eq!(Index::frame_of(31), 1);
    }

    #[test]
    fn block_count_follows_from_the_index_size() {
        for blocks in [1, 15, 16, 17, 40, 1000] {
            assert_eq!(
                blocks_for_index_size(sample(blocks).to_bytes().len() as u64),
                blocks
            );
        }
    }

    #[test]
    fn every_bad_index_has_its_own_error() {
        let good = sample(20).to_bytes();
        assert!(matches!(
            Index::parse(&good[..100]),
            Err(IndexError::TooShort(100))
        ));
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(Index::parse(&b), Err(IndexError::BadMagic(_))));
        let mut b = good.clone();
        b[8] = 9;
        assert!(matches!(Index::parse(&b), Err(IndexError::Format(9))));
        let mut b = good.clone();
        b[12] = 32;
        assert!(matches!(
            Index::parse(&b),
            Err(IndexError::Parameter {
                field: "frame_blocks",
                ..
            })
        ));
        // Truncated by one hash: the length no longer matches.
        assert!(matches!(
            Index::parse(&good[..good.len() - HASH_LEN]),
            Err(IndexError::Length { .. })
        ));
        let mut b = good.clone();
        b[20] = 7;
        assert!(matches!(Index::parse(&b), Err(IndexError::Descriptor(_))));
        let mut b = good.clone();
        let at = HEADER + DESCRIPTOR_SIZE;
        b[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            Index::parse(&b),
            Err(IndexError::FrameSize { frame: 0, size: 0 })
        ));
        let mut b = good;
        b[HEADER] = b'Y';
        assert!(matches!(Index::parse(&b), Err(IndexError::Descriptor(_))));
    }
}
