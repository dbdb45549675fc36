//! What a GPT is read from and written to: files, block devices, and the
//! in-memory disk of the tests and the power-cut harness.

use std::io::{self, Read, Seek, SeekFrom, Write};

/// What the GPT code needs from a disk: bytes, a size, and a durable flush.
/// Tests wrap it to inject faults.
pub trait BlockDevice: Read + Write + Seek {
    fn sync(&mut self) -> io::Result<()>;
}

impl BlockDevice for std::fs::File {
    fn sync(&mut self) -> io::Result<()> {
        self.sync_all()
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for &mut T {
    fn sync(&mut self) -> io::Result<()> {
        (**self).sync()
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for Box<T> {
    fn sync(&mut self) -> io::Result<()> {
        (**self).sync()
    }
}

impl BlockDevice for io::Cursor<Vec<u8>> {
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A sparse in-memory disk: only written 4 KiB blocks take memory, so tests
/// can model full-size layouts and clone them cheaply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemDisk {
    len: u64,
    pos: u64,
    pub(super) blocks: std::collections::BTreeMap<u64, Box<[u8; MemDisk::BLOCK]>>,
}

impl MemDisk {
    const BLOCK: usize = 4096;

    pub fn new(len: u64) -> MemDisk {
        MemDisk {
            len,
            pos: 0,
            blocks: Default::default(),
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Grow (or shrink) the device, as `qemu-img resize` does to an image.
    pub fn set_len(&mut self, len: u64) {
        self.len = len;
        let last = len.div_ceil(Self::BLOCK as u64);
        self.blocks.retain(|b, _| *b < last);
    }
}

impl Read for MemDisk {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len {
            return Ok(0);
        }
        let b = self.pos / Self::BLOCK as u64;
        let off = (self.pos % Self::BLOCK as u64) as usize;
        let n = buf
            .len()
            .min(Self::BLOCK - off)
            .min((self.len - self.pos) as usize);
        match self.blocks.get(&b) {
            Some(block) => buf[..n].copy_from_slice(&block[off..off + n]),
            None => buf[..n].fill(0),
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for MemDisk {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pos >= self.len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the disk",
            ));
        }
        let b = self.pos / Self::BLOCK as u64;
        let off = (self.pos % Self::BLOCK as u64) as usize;
        let n = buf
            .len()
            .min(Self::BLOCK - off)
            .min((self.len - self.pos) as usize);
        let block = self
            .blocks
            .entry(b)
            .or_insert_with(|| Box::new([0u8; Self::BLOCK]));
        block[off..off + n].copy_from_slice(&buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for MemDisk {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos =
            new.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before start"))?;
        Ok(self.pos)
    }
}

impl BlockDevice for MemDisk {
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}
