//! A window onto part of a file or device: partition contents are written
//! through it, so a filesystem writer can never touch bytes outside its
//! partition.

use std::io::{self, Read, Seek, SeekFrom, Write};

pub struct Slice<'a, F> {
    inner: &'a mut F,
    start: u64,
    len: u64,
    pos: u64,
}

impl<'a, F: Seek> Slice<'a, F> {
    pub fn new(inner: &'a mut F, start: u64, len: u64) -> Slice<'a, F> {
        Slice {
            inner,
            start,
            len,
            pos: 0,
        }
    }

    fn room(&self, want: usize) -> usize {
        want.min(self.len.saturating_sub(self.pos) as usize)
    }
}

impl<F: Read + Seek> Read for Slice<'_, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.room(buf.len());
        if n == 0 {
            return Ok(0);
        }
        self.inner.seek(SeekFrom::Start(self.start + self.pos))?;
        let got = self.inner.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl<F: Write + Seek> Write for Slice<'_, F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.room(buf.len());
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the partition",
            ));
        }
        self.inner.seek(SeekFrom::Start(self.start + self.pos))?;
        let put = self.inner.write(&buf[..n])?;
        self.pos += put as u64;
        Ok(put)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<F: Seek> Seek for Slice<'_, F> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the partition start",
            )
        })?;
        Ok(self.pos)
    }
}
