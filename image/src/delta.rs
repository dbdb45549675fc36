//! The delta files of a release (`nimbus::delta`): the frame pack and the
//! index, made from the payload the build wrote, so `xtask release` can
//! publish them for any build.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use nimbus::delta::{self, Index, ShortHash, FRAME_RAW};
use nimbus::release::{FileRef, SlotDescriptor, DESCRIPTOR_SIZE};
use sha2::{Digest, Sha256};

use crate::ImageError;

/// zstd level of the pack's frames: the payload's default, so a delta is
/// compared with a full payload compressed alike.
pub const PACK_LEVEL: i32 = 6;
/// Frames compressed per batch across the worker threads.
const BATCH: usize = 64;

fn io_at(p: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: p.to_path_buf(),
        source,
    }
}

fn decoder(payload: &Path) -> Result<impl Read, ImageError> {
    let f = File::open(payload).map_err(io_at(payload))?;
    zstd::stream::read::Decoder::new(f).map_err(io_at(payload))
}

/// The descriptor: the payload's last 4 KiB.
fn read_descriptor(payload: &Path, raw_size: u64) -> Result<Vec<u8>, ImageError> {
    let mut d = decoder(payload)?;
    let skip = raw_size
        .checked_sub(DESCRIPTOR_SIZE as u64)
        .ok_or_else(|| ImageError::Invalid(format!("payload of {raw_size} bytes")))?;
    io::copy(&mut (&mut d).take(skip), &mut io::sink()).map_err(io_at(payload))?;
    let mut b = vec![0u8; DESCRIPTOR_SIZE];
    d.read_exact(&mut b).map_err(io_at(payload))?;
    Ok(b)
}

/// Write `pack` and `index` for the payload (`raw_size` bytes once
/// decoded); returns their sizes and hashes as the manifest lists them,
/// with `pack_rel` and `index_rel` as paths.
pub fn write(
    payload: &Path,
    raw_size: u64,
    index: &Path,
    pack: &Path,
    rels: (&str, &str),
) -> Result<(FileRef, FileRef), ImageError> {
    let descriptor = read_descriptor(payload, raw_size)?;
    let fields = SlotDescriptor::parse_unverified(&descriptor)
        .map_err(|e| ImageError::Invalid(format!("{}: descriptor: {e}", payload.display())))?;
    let salt = fields.verity_salt;
    let mut data = decoder(payload)?.take(fields.data_size);
    let out = File::create(pack).map_err(io_at(pack))?;
    let mut out = crate::usr::HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, out),
        hash: Sha256::new(),
        n: 0,
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut sizes: Vec<u32> = Vec::new();
    let mut hashes: Vec<ShortHash> = Vec::new();
    let mut left = fields.data_size;
    while left > 0 {
        let n = (BATCH as u64 * FRAME_RAW as u64).min(left) as usize;
        let mut raw = vec![0u8; n];
        data.read_exact(&mut raw).map_err(io_at(payload))?;
        left -= n as u64;
        for b in raw.chunks(delta::BLOCK) {
            hashes.push(delta::short_hash(&salt, b));
        }
        let frames: Vec<&[u8]> = raw.chunks(FRAME_RAW).collect();
        let per = frames.len().div_ceil(threads);
        let compressed: Vec<io::Result<Vec<u8>>> = std::thread::scope(|s| {
            let workers: Vec<_> = frames
                .chunks(per.max(1))
                .map(|group| {
                    s.spawn(move || {
                        group
                            .iter()
                            .map(|f| zstd::bulk::compress(f, PACK_LEVEL))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| {
                    w.join()
                        .unwrap_or_else(|_| vec![Err(io::Error::other("compressor panicked"))])
                })
                .collect()
        });
        for c in compressed {
            let c = c.map_err(io_at(pack))?;
            sizes.push(c.len() as u32);
            out.write_all(&c).map_err(io_at(pack))?;
        }
    }
    out.flush().map_err(io_at(pack))?;
    out.inner.get_ref().sync_all().map_err(io_at(pack))?;
    let ix = Index::new(&descriptor, &sizes, hashes)
        .map_err(|e| ImageError::Invalid(format!("{}: {e}", index.display())))?;
    let bytes = ix.to_bytes();
    std::fs::write(index, &bytes).map_err(io_at(index))?;
    File::open(index)
        .and_then(|f| f.sync_all())
        .map_err(io_at(index))?;
    Ok((
        FileRef {
            path: rels.0.to_string(),
            size: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(&bytes)),
        },
        FileRef {
            path: rels.1.to_string(),
            size: out.n,
            sha256: hex::encode(out.hash.finalize()),
        },
    ))
}
