//! dm-verity hash tree (format 1, sha256, 4 KiB data and hash blocks, salt
//! hashed first), byte-compatible with `veritysetup format --no-superblock`
//! so that `veritysetup verify` and the kernel accept it.
//!
//! Layout of the tree: the top level (a single block) first, level 0 (the
//! hashes of the data blocks) last, each level padded to whole blocks with
//! zeros. The root hash is the hash of the top block.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

pub const BLOCK: usize = 4096;
const HASHES_PER_BLOCK: usize = BLOCK / 32;

pub struct Tree {
    /// The hash area, ready to write at `hash_offset`.
    pub bytes: Vec<u8>,
    pub root: [u8; 32],
    pub data_blocks: u64,
}

fn hash_blocks(salted: &Sha256, data: &[u8], out: &mut Vec<u8>) {
    for block in data.chunks(BLOCK) {
        let mut h = salted.clone();
        h.update(block);
        out.extend_from_slice(&h.finalize());
    }
}

fn pad_to_block(v: &mut Vec<u8>) {
    v.resize(v.len().div_ceil(BLOCK).max(1) * BLOCK, 0);
}

/// The salted hash of one block (a data block, or a block of a level).
pub fn block_hash(salt: &[u8], block: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// Hash `data_len` bytes (a multiple of 4096) from `data`.
pub fn build(mut data: impl Read, data_len: u64, salt: &[u8]) -> io::Result<Tree> {
    if data_len == 0 || !data_len.is_multiple_of(BLOCK as u64) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("verity data size {data_len} is not a positive multiple of {BLOCK}"),
        ));
    }
    let mut salted = Sha256::new();
    salted.update(salt);
    let data_blocks = data_len / BLOCK as u64;

    // Level 0 streams the data in large reads.
    let mut level: Vec<u8> = Vec::with_capacity(data_blocks as usize * 32);
    let mut buf = vec![0u8; 256 * BLOCK];
    let mut left = data_len;
    while left > 0 {
        let n = buf.len().min(left as usize);
        data.read_exact(&mut buf[..n])?;
        hash_blocks(&salted, &buf[..n], &mut level);
        left -= n as u64;
    }
    Ok(from_level0(level, salt))
}

/// The whole tree from level 0 (the 32-byte salted hashes of the data
/// blocks, in order): what an updater that hashed each block as it wrote
/// it needs to finish the slot without reading it back.
pub fn from_level0(mut level: Vec<u8>, salt: &[u8]) -> Tree {
    let data_blocks = (level.len() / 32) as u64;
    let mut salted = Sha256::new();
    salted.update(salt);
    if data_blocks == 1 {
        // cryptsetup builds no levels for a single block: the root is the
        // block's own hash and the hash area is empty.
        let root: [u8; 32] = level[..32].try_into().unwrap_or([0; 32]);
        return Tree {
            bytes: Vec::new(),
            root,
            data_blocks,
        };
    }
    pad_to_block(&mut level);

    // Each higher level hashes the blocks of the one below until one block is left.
    let mut levels = vec![level];
    while levels.last().map_or(0, Vec::len) > BLOCK {
        let below = levels.last().map(Vec::as_slice).unwrap_or_default();
        let mut up = Vec::with_capacity(below.len() / HASHES_PER_BLOCK);
        hash_blocks(&salted, below, &mut up);
        pad_to_block(&mut up);
        levels.push(up);
    }
    let top = levels.last().map(Vec::as_slice).unwrap_or_default();
    let mut h = salted.clone();
    h.update(top);
    let root: [u8; 32] = h.finalize().into();

    let mut bytes = Vec::with_capacity(levels.iter().map(Vec::len).sum());
    for l in levels.iter().rev() {
        bytes.extend_from_slice(l);
    }
    Tree {
        bytes,
        root,
        data_blocks,
    }
}

/// The root hash from level 0 (borrowed): the levels above it are built,
/// level 0 is not copied.
pub fn root_of_level0(level0: &[u8], salt: &[u8]) -> [u8; 32] {
    let mut salted = Sha256::new();
    salted.update(salt);
    if level0.len() <= 32 {
        return level0
            .get(..32)
            .and_then(|r| r.try_into().ok())
            .unwrap_or([0; 32]);
    }
    // Level 1 from level 0's blocks, the last one padded with zeros.
    let mut up = Vec::with_capacity(level0.len() / HASHES_PER_BLOCK + 32);
    for block in level0.chunks(BLOCK) {
        let mut h = salted.clone();
        h.update(block);
        if block.len() < BLOCK {
            h.update(&[0u8; BLOCK][..BLOCK - block.len()]);
        }
        up.extend_from_slice(&h.finalize());
    }
    if level0.len() <= BLOCK {
        // Level 0 was the top block.
        let mut out = [0u8; 32];
        out.copy_from_slice(&up[..32]);
        return out;
    }
    from_level0_above(up, salt)
}

/// The root of a tree whose level 1 is `level1` (unpadded).
fn from_level0_above(level1: Vec<u8>, salt: &[u8]) -> [u8; 32] {
    let mut salted = Sha256::new();
    salted.update(salt);
    let mut level = level1;
    pad_to_block(&mut level);
    while level.len() > BLOCK {
        let mut up = Vec::with_capacity(level.len() / HASHES_PER_BLOCK);
        hash_blocks(&salted, &level, &mut up);
        pad_to_block(&mut up);
        level = up;
    }
    let mut h = salted.clone();
    h.update(&level);
    h.finalize().into()
}

/// Where level 0 sits in a hash area of `hash_size` bytes for
/// `data_blocks` blocks (it is the last level): its byte offset inside the
/// area and its length without padding. `None` for a one-block tree, which
/// has no levels.
pub fn level0_extent(data_blocks: u64, hash_size: u64) -> Option<(u64, u64)> {
    if data_blocks < 2 {
        return None;
    }
    let len = data_blocks.checked_mul(32)?;
    let padded = len.div_ceil(BLOCK as u64) * BLOCK as u64;
    Some((hash_size.checked_sub(padded)?, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_block_tree() {
        let data = vec![7u8; BLOCK];
        let t = build(&data[..], BLOCK as u64, b"salt").unwrap();
        assert!(t.bytes.is_empty());
        let mut h = Sha256::new();
        h.update(b"salt");
        h.update(&data);
        assert_eq!(t.root, <[u8; 32]>::from(h.finalize()));
    }

    #[test]
    fn one_level() {
        let data = vec![3u8; 128 * BLOCK];
        let t = build(&data[..], data.len() as u64, b"").unwrap();
        assert_eq!(t.bytes.len(), BLOCK);
    }

    #[test]
    fn two_levels() {
        // 129 data blocks need two level-0 blocks, so one level-1 block on top.
        let data = vec![1u8; 129 * BLOCK];
        let t = build(&data[..], data.len() as u64, b"").unwrap();
        assert_eq!(t.bytes.len(), 3 * BLOCK);
    }

    #[test]
    fn level0_is_the_tail_of_the_hash_area_and_rebuilds_the_root() {
        let data: Vec<u8> = (0..300 * BLOCK).map(|i| (i / BLOCK) as u8).collect();
        let t = build(&data[..], data.len() as u64, b"s").unwrap();
        let (off, len) = level0_extent(300, t.bytes.len() as u64).unwrap();
        let l0 = t.bytes[off as usize..(off + len) as usize].to_vec();
        assert_eq!(&l0[..32], &block_hash(b"s", &data[..BLOCK]));
        assert_eq!(root_of_level0(&l0, b"s"), t.root);
        let small: Vec<u8> = (0..50 * BLOCK).map(|i| (i % 7) as u8).collect();
        let ts = build(&small[..], small.len() as u64, b"s").unwrap();
        let (o, n) = level0_extent(50, ts.bytes.len() as u64).unwrap();
        assert_eq!(
            root_of_level0(&ts.bytes[o as usize..(o + n) as usize], b"s"),
            ts.root
        );
        let again = from_level0(l0, b"s");
        assert_eq!(again.root, t.root);
        assert_eq!(again.bytes, t.bytes);
        assert_eq!(level0_extent(1, 0), None);
    }

    #[test]
    fn rejects_partial_blocks() {
        assert!(build(&[0u8; 100][..], 100, b"").is_err());
    }
}
