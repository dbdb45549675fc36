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
    if data_blocks == 1 {
        // cryptsetup builds no levels for a single block: the root is the
        // block's own hash and the hash area is empty.
        let root: [u8; 32] = level[..32].try_into().unwrap_or([0; 32]);
        return Ok(Tree {
            bytes: Vec::new(),
            root,
            data_blocks,
        });
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
    Ok(Tree {
        bytes,
        root,
        data_blocks,
    })
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
    fn rejects_partial_blocks() {
        assert!(build(&[0u8; 100][..], 100, b"").is_err());
    }
}
