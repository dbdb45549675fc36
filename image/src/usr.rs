//! The USR slot: an erofs filesystem, its dm-verity tree right after it,
//! and the signed descriptor in the last 4 KiB of the partition
//! (docs/formats.md, "Slot descriptor"). The update payload is the same bytes
//! without the free space: `[ fs | tree | descriptor ]`, zstd-compressed.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use nimbus::keys::ReleaseKey;
use nimbus::release::{SlotDescriptor, DESCRIPTOR_SIZE};
use semver::Version;
use sha2::{Digest, Sha256};

use crate::{verity, ImageError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Lz4,
    Lz4hc,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "lz4hc" => Ok(Compression::Lz4hc),
            _ => Err(format!(
                "unknown USR compression {s:?}: use none, lz4 or lz4hc"
            )),
        }
    }
}

pub struct UsrSlot {
    pub fs_path: PathBuf,
    pub data_size: u64,
    pub tree: Vec<u8>,
    pub descriptor: [u8; DESCRIPTOR_SIZE],
    pub fields: SlotDescriptor,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PayloadInfo {
    pub compressed_size: u64,
    pub compressed_sha256: String,
    pub raw_size: u64,
    pub raw_sha256: String,
}

fn io_at(p: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: p.to_path_buf(),
        source,
    }
}

/// The verity salt, the same for every version: equal blocks of two
/// releases then have equal level-0 hashes, so a delta update finds the
/// blocks the booted slot already has from its tree alone, without reading
/// the slot (docs/formats.md, "Delta index"). The salt adds nothing to
/// security here: the root it feeds is signed.
pub fn verity_salt() -> [u8; 32] {
    Sha256::digest(b"nimbus-verity-salt/1").into()
}

pub struct UsrInputs<'a> {
    pub usr_dir: &'a Path,
    pub out_fs: &'a Path,
    pub version: &'a Version,
    pub compression: Compression,
    pub epoch: u64,
    pub fs_uuid: uuid::Uuid,
    pub slot_size: u64,
    /// Every key signs the descriptor (as many as the trust set's threshold).
    pub keys: &'a [&'a ReleaseKey],
}

struct SealInputs<'a> {
    out_fs: &'a Path,
    version: &'a Version,
    epoch: u64,
    slot_size: u64,
    keys: &'a [&'a ReleaseKey],
}

/// Build the filesystem, its tree and descriptor. Fails with a clear error
/// when the result does not fit the slot, before anything is written to a
/// disk image.
pub fn build(i: &UsrInputs<'_>) -> Result<UsrSlot, ImageError> {
    let _ = std::fs::remove_file(i.out_fs);
    let mut cmd = Command::new("mkfs.erofs");
    match i.compression {
        Compression::None => {}
        Compression::Lz4 => {
            cmd.arg("-zlz4");
        }
        Compression::Lz4hc => {
            cmd.arg("-zlz4hc");
        }
    }
    cmd.arg(format!("-T{}", i.epoch))
        .arg(format!("-U{}", i.fs_uuid))
        .args(["--all-root", "--ignore-mtime", "--quiet"])
        // Every file's data in whole blocks of its own: inlined tails sit
        // next to their inode, so one added file shifts the tails of all
        // files after it and a delta would fetch most metadata blocks
        // (measured: 2065 frames for one added package with tails inline,
        // 212 without; the filesystem grows 3 %).
        .arg("-Enoinline_data")
        .arg(i.out_fs)
        .arg(i.usr_dir);
    let out = cmd.output().map_err(|e| ImageError::Tool {
        tool: "mkfs.erofs".into(),
        reason: format!("cannot run it ({e}); `cargo xtask deps` installs erofs-utils"),
    })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            tool: "mkfs.erofs".into(),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    seal(i.out_fs, i.version, i.epoch, i.slot_size, i.keys)
}

/// Compute the verity tree and the signed descriptor for a finished
/// filesystem image (padded to whole 4 KiB blocks). Fails when the result
/// does not fit a slot of `slot_size` bytes.
pub fn seal(
    fs_path: &Path,
    version: &Version,
    epoch: u64,
    slot_size: u64,
    keys: &[&ReleaseKey],
) -> Result<UsrSlot, ImageError> {
    let i = SealInputs {
        out_fs: fs_path,
        version,
        epoch,
        slot_size,
        keys,
    };
    let f = File::options()
        .read(true)
        .write(true)
        .open(i.out_fs)
        .map_err(io_at(i.out_fs))?;
    let mut data_size = f.metadata().map_err(io_at(i.out_fs))?.len();
    if data_size % verity::BLOCK as u64 != 0 {
        // erofs writes whole 4 KiB blocks; pad defensively so verity covers it.
        data_size = data_size.div_ceil(verity::BLOCK as u64) * verity::BLOCK as u64;
        f.set_len(data_size).map_err(io_at(i.out_fs))?;
    }
    let salt = verity_salt();
    let tree = verity::build(BufReader::with_capacity(1 << 20, &f), data_size, &salt)
        .map_err(io_at(i.out_fs))?;
    let needed = data_size + tree.bytes.len() as u64 + DESCRIPTOR_SIZE as u64;
    if needed > i.slot_size {
        return Err(ImageError::Invalid(format!(
            "USR needs {} MiB (filesystem {} MiB + verity tree + descriptor) but --usr-size is {} MiB; \
             raise --usr-size or choose --usr-compression lz4hc",
            needed.div_ceil(1 << 20),
            data_size >> 20,
            i.slot_size >> 20
        )));
    }
    let fields = SlotDescriptor {
        version: i.version.clone(),
        data_size,
        hash_offset: data_size,
        hash_size: tree.bytes.len() as u64,
        verity_root: tree.root,
        verity_salt: salt,
        created: i.epoch,
        signers: i.keys.iter().map(|k| k.id).collect(),
    };
    let descriptor = fields
        .sign(i.keys)
        .map_err(|e| ImageError::Invalid(e.to_string()))?;
    Ok(UsrSlot {
        fs_path: i.out_fs.to_path_buf(),
        data_size,
        tree: tree.bytes,
        descriptor,
        fields,
    })
}

pub use nimbus::repo::{PAYLOAD_FRAME_RAW, PAYLOAD_WINDOW_LOG};

/// A zstd writer that ends a frame every [`PAYLOAD_FRAME_RAW`] raw bytes,
/// each frame compressed on all cores and carrying its content size and
/// checksum. The concatenation is an ordinary zstd stream (`zstd -d` reads it).
pub struct FramedEncoder<W: Write> {
    enc: Option<zstd::stream::write::Encoder<'static, W>>,
    level: i32,
    in_frame: u64,
    left: Option<u64>,
}

impl<W: Write> FramedEncoder<W> {
    /// `total`, when known, lets every frame header carry its exact size.
    pub fn new(inner: W, level: i32, total: Option<u64>) -> io::Result<Self> {
        let mut me = FramedEncoder {
            enc: None,
            level,
            in_frame: 0,
            left: total,
        };
        me.enc = Some(me.frame(inner)?);
        Ok(me)
    }

    fn frame(&self, inner: W) -> io::Result<zstd::stream::write::Encoder<'static, W>> {
        let mut enc = zstd::stream::write::Encoder::new(inner, self.level)?;
        let threads = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        enc.multithread(threads)?;
        enc.include_checksum(true)?;
        enc.window_log(PAYLOAD_WINDOW_LOG)?;
        if let Some(left) = self.left {
            enc.set_pledged_src_size(Some(left.min(PAYLOAD_FRAME_RAW)))?;
        }
        Ok(enc)
    }

    fn encoder(&mut self) -> io::Result<&mut zstd::stream::write::Encoder<'static, W>> {
        self.enc
            .as_mut()
            .ok_or_else(|| io::Error::other("zstd encoder used after a failed frame switch"))
    }

    /// Finish the last frame and hand back the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        match self.enc.take() {
            Some(enc) => enc.finish(),
            None => Err(io::Error::other(
                "zstd encoder used after a failed frame switch",
            )),
        }
    }
}

impl<W: Write> Write for FramedEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.in_frame == PAYLOAD_FRAME_RAW {
            let enc = self
                .enc
                .take()
                .ok_or_else(|| io::Error::other("zstd encoder used after a failed frame switch"))?;
            let inner = enc.finish()?;
            self.in_frame = 0;
            self.enc = Some(self.frame(inner)?);
        }
        let room = (PAYLOAD_FRAME_RAW - self.in_frame) as usize;
        let n = self.encoder()?.write(&buf[..buf.len().min(room)])?;
        self.in_frame += n as u64;
        if let Some(left) = self.left.as_mut() {
            *left = left.saturating_sub(n as u64);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.encoder()?.flush()
    }
}

/// Counts and hashes what passes through to `inner`.
pub(crate) struct HashingWriter<W> {
    pub(crate) inner: W,
    pub(crate) hash: Sha256,
    pub(crate) n: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl UsrSlot {
    pub fn raw_size(&self) -> u64 {
        self.data_size + self.tree.len() as u64 + DESCRIPTOR_SIZE as u64
    }

    /// Stream `[ fs | tree | descriptor ]` through `f`, which reports its
    /// own errors with their own context.
    fn for_each_chunk(
        &self,
        mut f: impl FnMut(&[u8]) -> Result<(), ImageError>,
    ) -> Result<(), ImageError> {
        let mut fs = File::open(&self.fs_path).map_err(io_at(&self.fs_path))?;
        let file_len = fs.metadata().map_err(io_at(&self.fs_path))?.len();
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < self.data_size {
            let n = buf.len().min((self.data_size - done) as usize);
            // Bytes past the file's end (block padding) are zeros.
            let from_file = n.min(file_len.saturating_sub(done) as usize);
            fs.read_exact(&mut buf[..from_file])
                .map_err(io_at(&self.fs_path))?;
            buf[from_file..n].fill(0);
            f(&buf[..n])?;
            done += n as u64;
        }
        f(&self.tree)?;
        f(&self.descriptor)
    }

    /// Write the update payload (independent zstd frames, multithreaded)
    /// and return its sizes and hashes.
    pub fn write_payload(&self, out: &Path, level: i32) -> Result<PayloadInfo, ImageError> {
        let file = File::create(out).map_err(io_at(out))?;
        let hw = HashingWriter {
            inner: io::BufWriter::with_capacity(1 << 20, file),
            hash: Sha256::new(),
            n: 0,
        };
        let mut enc = FramedEncoder::new(hw, level, Some(self.raw_size())).map_err(io_at(out))?;
        let mut raw = Sha256::new();
        self.for_each_chunk(|c| {
            raw.update(c);
            enc.write_all(c).map_err(io_at(out))
        })?;
        let mut hw = enc.finish().map_err(io_at(out))?;
        hw.flush().map_err(io_at(out))?;
        hw.inner.get_ref().sync_all().map_err(io_at(out))?;
        Ok(PayloadInfo {
            compressed_size: hw.n,
            compressed_sha256: hex::encode(hw.hash.finalize()),
            raw_size: self.raw_size(),
            raw_sha256: hex::encode(raw.finalize()),
        })
    }

    /// Lay the slot out in a partition at `offset` of `size` bytes: fs and
    /// tree from the start, descriptor in the last 4 KiB. All-zero chunks are
    /// skipped so the image stays sparse. Returns the sha256 of the whole
    /// partition as written, free space included.
    pub fn write_to_partition(
        &self,
        dev: &mut File,
        dev_path: &Path,
        offset: u64,
        size: u64,
    ) -> Result<String, ImageError> {
        let body = self.data_size + self.tree.len() as u64;
        let mut hash = Sha256::new();
        let mut pos = offset;
        self.for_each_chunk(|c| {
            if pos - offset == body {
                // The descriptor: after the free space, at the partition end.
                let gap = size - body - DESCRIPTOR_SIZE as u64;
                let zeros = vec![0u8; 1 << 20];
                let mut left = gap;
                while left > 0 {
                    let n = zeros.len().min(left as usize);
                    hash.update(&zeros[..n]);
                    left -= n as u64;
                }
                pos += gap;
            }
            hash.update(c);
            if c.iter().any(|&b| b != 0) {
                dev.seek(SeekFrom::Start(pos))
                    .and_then(|_| dev.write_all(c))
                    .map_err(io_at(dev_path))?;
            }
            pos += c.len() as u64;
            Ok(())
        })?;
        Ok(hex::encode(hash.finalize()))
    }
}
