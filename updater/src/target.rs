//! The passive USR slot as the writer sees it: a byte range of the disk,
//! written with O_DIRECT where the file system allows it, with the payload's
//! last 4 KiB (the descriptor) mapped to the partition's last 4 KiB.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nimbus::release::DESCRIPTOR_SIZE;

use crate::error::{io_at, UpdateError};

pub const ALIGN: usize = 4096;

/// A heap buffer whose usable part starts on a 4 KiB boundary, as O_DIRECT
/// needs, without unsafe code: over-allocate and start at the aligned offset.
pub struct AlignedBuf {
    v: Vec<u8>,
    off: usize,
    cap: usize,
}

impl AlignedBuf {
    pub fn new(cap: usize) -> AlignedBuf {
        let v = vec![0u8; cap + ALIGN];
        let off = v.as_ptr().align_offset(ALIGN);
        AlignedBuf { v, off, cap }
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.v[self.off..self.off + self.cap]
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.cap]
    }
}

/// Positioned I/O on the disk that holds the slot: a file or block device
/// in production, a fault-injecting recorder in the power-cut harness.
pub trait SlotIo: Send + Sync {
    fn write_all_at(&self, buf: &[u8], off: u64) -> std::io::Result<()>;
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()>;
    /// Make everything written so far durable.
    fn sync_data(&self) -> std::io::Result<()>;
}

impl SlotIo for File {
    fn write_all_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        FileExt::write_all_at(self, buf, off)
    }
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, off)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        File::sync_data(self)
    }
}

pub struct SlotDevice {
    file: Box<dyn SlotIo>,
    path: PathBuf,
    pub partition: u32,
    offset: u64,
    size: u64,
    pub direct: bool,
}

impl SlotDevice {
    pub fn open(
        disk: &Path,
        partition: u32,
        offset: u64,
        size: u64,
    ) -> Result<SlotDevice, UpdateError> {
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(disk);
        let (file, direct) = match direct {
            Ok(f) => (f, true),
            // tmpfs and some overlays refuse O_DIRECT: write through the
            // page cache and rely on fdatasync.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(disk)
                    .map_err(io_at(disk))?,
                false,
            ),
            Err(e) => return Err(io_at(disk)(e)),
        };
        Ok(SlotDevice {
            file: Box::new(file),
            path: disk.to_path_buf(),
            partition,
            offset,
            size,
            direct,
        })
    }

    /// A slot on any [`SlotIo`] (the power-cut harness's recorder).
    pub fn with_io(
        io: Box<dyn SlotIo>,
        disk: &Path,
        partition: u32,
        offset: u64,
        size: u64,
    ) -> SlotDevice {
        SlotDevice {
            file: io,
            path: disk.to_path_buf(),
            partition,
            offset,
            size,
            direct: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Disk byte offsets of payload bytes `[raw_off, raw_off + len)` split
    /// where the body ends and the descriptor begins.
    fn map(&self, raw_size: u64, raw_off: u64, len: u64) -> Vec<(u64, u64, u64)> {
        let body_end = raw_size - DESCRIPTOR_SIZE as u64;
        let desc_at = self.offset + self.size - DESCRIPTOR_SIZE as u64;
        let mut out = Vec::with_capacity(2);
        let end = raw_off + len;
        if raw_off < body_end {
            let e = end.min(body_end);
            out.push((raw_off, self.offset + raw_off, e - raw_off));
        }
        if end > body_end {
            let s = raw_off.max(body_end);
            out.push((s, desc_at + (s - body_end), end - s));
        }
        out
    }

    /// Write payload bytes starting at payload offset `raw_off`.
    pub fn write_raw(&self, raw_size: u64, raw_off: u64, data: &[u8]) -> Result<(), UpdateError> {
        for (from, at, len) in self.map(raw_size, raw_off, data.len() as u64) {
            let s = (from - raw_off) as usize;
            self.file
                .write_all_at(&data[s..s + len as usize], at)
                .map_err(io_at(&self.path))?;
        }
        Ok(())
    }

    /// Read payload bytes back (for re-hashing on resume).
    pub fn read_raw(&self, raw_size: u64, raw_off: u64, buf: &mut [u8]) -> Result<(), UpdateError> {
        let base = raw_off;
        for (from, at, len) in self.map(raw_size, raw_off, buf.len() as u64) {
            let s = (from - base) as usize;
            self.file
                .read_exact_at(&mut buf[s..s + len as usize], at)
                .map_err(io_at(&self.path))?;
        }
        Ok(())
    }

    pub fn read_descriptor(&self) -> Result<Vec<u8>, UpdateError> {
        let mut b = AlignedBuf::new(DESCRIPTOR_SIZE);
        self.file
            .read_exact_at(
                b.as_mut_slice(),
                self.offset + self.size - DESCRIPTOR_SIZE as u64,
            )
            .map_err(io_at(&self.path))?;
        Ok(b.as_slice().to_vec())
    }

    pub fn sync(&self) -> Result<(), UpdateError> {
        self.file.sync_data().map_err(io_at(&self.path))
    }
}
