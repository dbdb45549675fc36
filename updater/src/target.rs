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
        check_extent(disk, partition, offset, size)?;
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
}

/// A slot's byte range must be addressable and hold at least a descriptor
/// and one block; a GPT entry is checked before this, this is the last line.
fn check_extent(disk: &Path, partition: u32, offset: u64, size: u64) -> Result<(), UpdateError> {
    if size < 2 * DESCRIPTOR_SIZE as u64 || offset.checked_add(size).is_none() {
        return Err(UpdateError::Refused(format!(
            "{}: partition {partition} at byte {offset}, {size} bytes, cannot be a USR slot",
            disk.display()
        )));
    }
    Ok(())
}

impl SlotDevice {
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
    /// where the body ends and the descriptor begins. A range outside the
    /// payload, or a payload that does not fit the slot, is an error, never
    /// a wrapped offset somewhere else on the disk.
    fn map(
        &self,
        raw_size: u64,
        raw_off: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64, u64)>, UpdateError> {
        let d = DESCRIPTOR_SIZE as u64;
        let end = raw_off.checked_add(len);
        if raw_size < 2 * d || raw_size > self.size || end.is_none_or(|e| e > raw_size) {
            return Err(UpdateError::Refused(format!(
                "{}: payload bytes {raw_off}+{len} of {raw_size} do not fit partition {} ({} bytes)",
                self.path.display(),
                self.partition,
                self.size
            )));
        }
        let end = end.unwrap_or(raw_size);
        let body_end = raw_size - d;
        let desc_at = self.descriptor_at()?;
        let mut out = Vec::with_capacity(2);
        if raw_off < body_end {
            let e = end.min(body_end);
            out.push((raw_off, self.offset + raw_off, e - raw_off));
        }
        if end > body_end {
            let s = raw_off.max(body_end);
            out.push((s, desc_at + (s - body_end), end - s));
        }
        Ok(out)
    }

    /// Write payload bytes starting at payload offset `raw_off`.
    pub fn write_raw(&self, raw_size: u64, raw_off: u64, data: &[u8]) -> Result<(), UpdateError> {
        for (from, at, len) in self.map(raw_size, raw_off, data.len() as u64)? {
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
        for (from, at, len) in self.map(raw_size, raw_off, buf.len() as u64)? {
            let s = (from - base) as usize;
            self.file
                .read_exact_at(&mut buf[s..s + len as usize], at)
                .map_err(io_at(&self.path))?;
        }
        Ok(())
    }

    /// Disk offset of the slot's last 4 KiB.
    fn descriptor_at(&self) -> Result<u64, UpdateError> {
        check_extent(&self.path, self.partition, self.offset, self.size)?;
        Ok(self.offset + self.size - DESCRIPTOR_SIZE as u64)
    }

    pub fn read_descriptor(&self) -> Result<Vec<u8>, UpdateError> {
        let mut b = AlignedBuf::new(DESCRIPTOR_SIZE);
        let at = self.descriptor_at()?;
        self.file
            .read_exact_at(b.as_mut_slice(), at)
            .map_err(io_at(&self.path))?;
        Ok(b.as_slice().to_vec())
    }

    /// Read bytes of the partition at `off` (not payload-mapped): delta
    /// sources and the old tree. Unaligned requests bounce through an
    /// aligned buffer, as O_DIRECT needs.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), UpdateError> {
        let end = off.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(UpdateError::Refused(format!(
                "{}: bytes {off}+{} are outside partition {} ({} bytes)",
                self.path.display(),
                buf.len(),
                self.partition,
                self.size
            )));
        }
        let aligned = buf.as_ptr().align_offset(ALIGN) == 0
            && buf.len().is_multiple_of(ALIGN)
            && off.is_multiple_of(ALIGN as u64);
        if aligned || !self.direct {
            return self
                .file
                .read_exact_at(buf, self.offset + off)
                .map_err(io_at(&self.path));
        }
        let mut bounce = AlignedBuf::new(1 << 20);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let base = pos - pos % ALIGN as u64;
            let skip = (pos - base) as usize;
            let want = (buf.len() - done + skip).div_ceil(ALIGN) * ALIGN;
            let n = want.min(1 << 20).min((self.size - base) as usize);
            self.file
                .read_exact_at(&mut bounce.as_mut_slice()[..n], self.offset + base)
                .map_err(io_at(&self.path))?;
            let take = (n - skip).min(buf.len() - done);
            buf[done..done + take].copy_from_slice(&bounce.as_slice()[skip..skip + take]);
            done += take;
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<(), UpdateError> {
        self.file.sync_data().map_err(io_at(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records the highest byte written; reads return zeros.
    struct Mem(Mutex<u64>);
    impl SlotIo for Mem {
        fn write_all_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
            let mut m = self.0.lock().unwrap();
            *m = (*m).max(off + buf.len() as u64);
            Ok(())
        }
        fn read_exact_at(&self, buf: &mut [u8], _off: u64) -> std::io::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn sync_data(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn payload_ranges_and_slot_extents_never_wrap() {
        let d = DESCRIPTOR_SIZE as u64;
        let slot = |offset: u64, size: u64| {
            SlotDevice::with_io(
                Box::new(Mem(Mutex::new(0))),
                Path::new("mem"),
                4,
                offset,
                size,
            )
        };
        let s = slot(1 << 20, 64 * d);
        s.write_raw(8 * d, 0, &[1u8; 4096]).unwrap();
        // Past the payload's end, a payload larger than the slot, a payload
        // smaller than a descriptor, an offset that overflows: errors.
        assert!(s.write_raw(8 * d, 8 * d, &[1u8; 1]).is_err());
        assert!(s.write_raw(65 * d, 0, &[1u8; 1]).is_err());
        assert!(s.write_raw(d - 1, 0, &[1u8; 1]).is_err());
        assert!(s.write_raw(8 * d, u64::MAX, &[1u8; 2]).is_err());
        // Slots too small or at the end of the address space.
        assert!(slot(0, d).read_descriptor().is_err());
        assert!(slot(u64::MAX - d, 4 * d).read_descriptor().is_err());
        assert!(SlotDevice::open(Path::new("/dev/null"), 4, u64::MAX - 10, 2 * d).is_err());
        let mut buf = [0u8; 16];
        assert!(s.read_raw(8 * d, 8 * d - 8, &mut buf).is_err());
    }
}
