//! Streaming a payload into the passive slot:
//!
//! ```text
//! download thread: HTTP body -> 256 KiB chunks ----------------+ (bounded channel)
//! decode (caller's thread): sha256(compressed) -> zstd decode -+-> 1 MiB aligned buffers
//! writer thread: sha256(raw) -> O_DIRECT pwrite into the slot, checkpoints
//! ```
//!
//! Three stages on their own threads so the network, the decoder and the
//! disk overlap; bounded channels and a fixed pool of buffers keep memory
//! flat whatever the payload size. Payloads are made of independent zstd
//! frames (nimbus::repo::PAYLOAD_FRAME_RAW): at a frame boundary the
//! writer syncs and records a checkpoint with both hash states, and an
//! interrupted apply resumes there with an HTTP Range request after the
//! slot's prefix has been hashed again and found to match.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, Instant};

use nimbus::release::DESCRIPTOR_SIZE;
use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};

use crate::error::UpdateError;
use crate::fetch::Body;
use crate::writer::{SlotWriter, Stream};

/// Where payload bytes come from: the repository, or a file (air-gapped).
pub enum Source {
    Http(Box<Body>),
    File(std::fs::File),
}

impl Source {
    fn start(&self) -> u64 {
        match self {
            Source::Http(b) => b.start,
            Source::File(_) => 0,
        }
    }

    fn read_some(&mut self, url: &str, buf: &mut [u8]) -> Result<usize, UpdateError> {
        match self {
            Source::Http(b) => b.read_some(buf),
            Source::File(f) => {
                use std::io::Read;
                f.read(buf).map_err(|e| UpdateError::Io {
                    path: url.into(),
                    source: e,
                })
            }
        }
    }
}
use crate::sha::Sha256;
use crate::state::Checkpoint;
use crate::status::Progress;
use crate::target::AlignedBuf;

const NET_CHUNK: usize = 256 * 1024;
const NET_QUEUE: usize = 16;
const OUT_BUF: usize = 1 << 20;
const OUT_BUFS: usize = 4;

pub struct Job<'a> {
    pub stream: Stream<'a>,
    pub url: String,
    /// Read the payload from this file instead of `url` (air-gapped apply).
    pub file: Option<&'a std::path::Path>,
    pub resume: Option<Checkpoint>,
    pub checkpoint: &'a (dyn Fn(&Checkpoint) -> Result<(), UpdateError> + Sync),
}

#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Compressed bytes fetched in this run (less than the payload on a resume).
    pub downloaded: u64,
    pub resumed_from: u64,
    pub io_limit: String,
    pub direct_io: bool,
    /// Slot bytes written in this run, and how long the stream took.
    pub written: u64,
    pub seconds: f64,
}

struct FrameEnd {
    /// Bytes of this buffer that belong to finished frames.
    pos: usize,
    comp_off: u64,
    comp: Sha256,
}

struct Chunk {
    buf: AlignedBuf,
    len: usize,
    raw_off: u64,
    frame_ends: Vec<FrameEnd>,
}

/// Where to start: re-hash the slot's prefix that the checkpoint claims and
/// resume only if it matches.
fn validate_resume(job: &Job<'_>) -> Result<Option<(u64, u64, Sha256, Sha256)>, UpdateError> {
    let Some(cp) = &job.resume else {
        return Ok(None);
    };
    let r = job.stream.release;
    if cp.version != r.version.to_string()
        || cp.compressed_sha256 != r.compressed_sha256
        || cp.partition != job.stream.slot.partition
        || cp.raw_offset >= r.raw_size
        || cp.comp_offset >= r.compressed_size
        || cp.raw_offset % OUT_BUF as u64 != 0
    {
        tracing::info!("checkpoint is for another payload or slot; starting from the beginning");
        return Ok(None);
    }
    let (Some(comp), Some(raw_want)) = (
        Sha256::restore(&cp.comp_state),
        Sha256::restore(&cp.raw_state),
    ) else {
        tracing::warn!("checkpoint hash state is damaged; starting from the beginning");
        return Ok(None);
    };
    let mut raw = Sha256::new();
    let mut buf = AlignedBuf::new(OUT_BUF);
    let mut off = 0;
    while off < cp.raw_offset {
        let n = (cp.raw_offset - off).min(OUT_BUF as u64) as usize;
        job.stream
            .slot
            .read_raw(r.raw_size, off, &mut buf.as_mut_slice()[..n])?;
        raw.update(&buf.as_slice()[..n]);
        off += n as u64;
    }
    if raw.save() != raw_want.save() || comp.len() != cp.comp_offset {
        tracing::warn!(
            "the slot's first {} bytes do not match the checkpoint; starting from the beginning",
            cp.raw_offset
        );
        return Ok(None);
    }
    tracing::info!(
        "resuming at compressed byte {} (slot byte {}) after re-hashing the slot prefix",
        cp.comp_offset,
        cp.raw_offset
    );
    Ok(Some((cp.comp_offset, cp.raw_offset, comp, raw)))
}

pub fn run(job: &Job<'_>) -> Result<Outcome, UpdateError> {
    let r = job.stream.release;
    if r.raw_size > job.stream.slot.size() || r.raw_size < 2 * DESCRIPTOR_SIZE as u64 {
        return Err(UpdateError::TooLargeForSlot {
            version: r.version.to_string(),
            raw_size: r.raw_size,
            partition: job.stream.slot.partition,
            slot_size: job.stream.slot.size(),
        });
    }
    let mut start = validate_resume(job)?;
    let body = {
        let off = start.as_ref().map_or(0, |s| s.0);
        let b = match job.file {
            Some(p) => Source::File(std::fs::File::open(p).map_err(crate::error::io_at(p))?),
            None => Source::Http(Box::new(job.stream.http.get_from(&job.url, off)?)),
        };
        if b.start() != off {
            tracing::info!("server ignored the Range request; downloading the whole payload");
            start = None;
        }
        b
    };
    let (comp_off, raw_off, comp, raw) = start.unwrap_or((0, 0, Sha256::new(), Sha256::new()));
    let t0 = Instant::now();

    let (net_tx, net_rx) = sync_channel::<Result<Vec<u8>, UpdateError>>(NET_QUEUE);
    let (out_tx, out_rx) = sync_channel::<Chunk>(OUT_BUFS);
    let (pool_tx, pool_rx) = sync_channel::<AlignedBuf>(OUT_BUFS);
    for _ in 0..OUT_BUFS {
        // Cannot fail: the channel has room for every buffer.
        let _ = pool_tx.send(AlignedBuf::new(OUT_BUF));
    }

    std::thread::scope(|s| {
        let dl = s.spawn(|| download(job, body, comp_off, net_tx));
        let wr = s.spawn(|| write(job, raw, out_rx, pool_tx));
        let decoded = decode(job, comp, comp_off, raw_off, net_rx, out_tx, pool_rx);
        let downloaded = dl.join().unwrap_or(0);
        let written = wr
            .join()
            .unwrap_or_else(|_| Err(UpdateError::Refused("slot writer panicked".into())));
        // Whichever stage failed first is the root cause; the other only
        // saw its channel close.
        let (comp, (raw, io_limit)) = match (decoded, written) {
            (Ok(c), Ok(w)) => (c, w),
            (Err(UpdateError::WriterStopped), Err(w)) => return Err(w),
            (Err(d), _) => return Err(d),
            (Ok(_), Err(w)) => return Err(w),
        };
        if comp.len() != r.compressed_size {
            return Err(UpdateError::Truncated {
                url: job.url.clone(),
                got: comp.len(),
                expected: r.compressed_size,
            });
        }
        let got = comp.finalize_hex();
        if got != r.compressed_sha256 {
            return Err(UpdateError::CompressedHash {
                url: job.url.clone(),
                got,
                expected: r.compressed_sha256.clone(),
            });
        }
        let got = raw.finalize_hex();
        if got != r.raw_sha256 {
            return Err(UpdateError::RawHash {
                url: job.url.clone(),
                got,
                expected: r.raw_sha256.clone(),
            });
        }
        Ok(Outcome {
            downloaded,
            resumed_from: comp_off,
            io_limit,
            direct_io: job.stream.slot.direct,
            written: r.raw_size - raw_off,
            seconds: t0.elapsed().as_secs_f64(),
        })
    })
}

/// Returns the number of bytes received; errors travel down the channel.
fn download(
    job: &Job<'_>,
    mut body: Source,
    start: u64,
    tx: SyncSender<Result<Vec<u8>, UpdateError>>,
) -> u64 {
    let total = job.stream.release.compressed_size;
    let mut got = start;
    let t0 = Instant::now();
    let (mut last_t, mut last_n) = (t0, start);
    let mut pacer = crate::fetch::Pacer::new(job.stream.limits.download_bps);
    loop {
        if job.stream.cancel.load(Ordering::Relaxed) {
            let _ = tx.send(Err(UpdateError::Cancelled));
            break;
        }
        let mut buf = vec![0u8; NET_CHUNK];
        let n = match body.read_some(&job.url, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.send(Err(e));
                break;
            }
        };
        if n == 0 {
            break;
        }
        got += n as u64;
        pacer.account(n as u64);
        if got > total {
            let _ = tx.send(Err(UpdateError::PayloadTooLarge {
                url: job.url.clone(),
                expected: total,
            }));
            break;
        }
        buf.truncate(n);
        if tx.send(Ok(buf)).is_err() {
            break; // the decoder stopped; its error is the one to report
        }
        let now = Instant::now();
        if now.duration_since(last_t) >= Duration::from_millis(250) || got == total {
            let dt = now.duration_since(last_t).as_secs_f64().max(1e-3);
            let rate = ((got - last_n) as f64 / dt) as u64;
            (last_t, last_n) = (now, got);
            (job.stream.progress)(Progress {
                done: got,
                total,
                rate,
                resumed_from: start,
            });
        }
    }
    got - start
}

fn decode(
    job: &Job<'_>,
    mut comp: Sha256,
    comp_start: u64,
    raw_start: u64,
    rx: Receiver<Result<Vec<u8>, UpdateError>>,
    tx: SyncSender<Chunk>,
    pool: Receiver<AlignedBuf>,
) -> Result<Sha256, UpdateError> {
    let url = &job.url;
    let raw_size = job.stream.release.raw_size;
    let derr = |e: std::io::Error| UpdateError::Decode {
        url: url.clone(),
        reason: e.to_string(),
    };
    let mut dec = Decoder::new().map_err(derr)?;
    dec.set_parameter(DParameter::WindowLogMax(
        nimbus::repo::PAYLOAD_WINDOW_LOG_MAX,
    ))
    .map_err(derr)?;
    // A writer that died drops its end of the pool; report that as a
    // refusal and let the caller surface the writer's own error.
    let take = |pool: &Receiver<AlignedBuf>| pool.recv().map_err(|_| UpdateError::WriterStopped);
    let mut out = take(&pool)?;
    let mut out_len = 0usize;
    let mut out_raw_off = raw_start;
    let mut raw_total = raw_start;
    let mut frame_ends = Vec::new();
    let mut in_frame = false;
    let mut consumed = comp_start;
    for chunk in rx {
        let chunk = chunk?;
        let mut inb = InBuffer::around(&chunk);
        let mut hashed = 0;
        loop {
            let mut outb = OutBuffer::around(&mut out.as_mut_slice()[out_len..]);
            let hint = dec.run(&mut inb, &mut outb).map_err(derr)?;
            let produced = outb.pos();
            let room_left = produced < outb.capacity();
            out_len += produced;
            raw_total += produced as u64;
            comp.update(&chunk[hashed..inb.pos()]);
            consumed += (inb.pos() - hashed) as u64;
            hashed = inb.pos();
            if raw_total > raw_size {
                return Err(UpdateError::RawTooLarge {
                    url: url.clone(),
                    expected: raw_size,
                });
            }
            if hint == 0 {
                if in_frame || produced > 0 {
                    frame_ends.push(FrameEnd {
                        pos: out_len,
                        comp_off: consumed,
                        comp: comp.clone(),
                    });
                }
                in_frame = false;
            } else {
                in_frame = true;
            }
            if out_len == OUT_BUF {
                let full = std::mem::replace(&mut out, take(&pool)?);
                tx.send(Chunk {
                    buf: full,
                    len: out_len,
                    raw_off: out_raw_off,
                    frame_ends: std::mem::take(&mut frame_ends),
                })
                .map_err(|_| UpdateError::WriterStopped)?;
                out_raw_off += out_len as u64;
                out_len = 0;
                continue;
            }
            if inb.pos() == chunk.len() && (room_left || hint == 0) {
                break;
            }
        }
    }
    if consumed < job.stream.release.compressed_size {
        return Err(UpdateError::Truncated {
            url: url.clone(),
            got: consumed,
            expected: job.stream.release.compressed_size,
        });
    }
    if in_frame {
        // The stream ended inside a frame: the download was cut short, or
        // the payload itself is.
        return Err(UpdateError::Truncated {
            url: url.clone(),
            got: consumed,
            expected: job.stream.release.compressed_size,
        });
    }
    if raw_total != raw_size {
        return Err(UpdateError::RawTooShort {
            url: url.clone(),
            got: raw_total,
            expected: raw_size,
        });
    }
    if out_len > 0 {
        tx.send(Chunk {
            buf: out,
            len: out_len,
            raw_off: out_raw_off,
            frame_ends,
        })
        .map_err(|_| UpdateError::WriterStopped)?;
    }
    Ok(comp)
}

fn write(
    job: &Job<'_>,
    raw: Sha256,
    rx: Receiver<Chunk>,
    pool: SyncSender<AlignedBuf>,
) -> Result<(Sha256, String), UpdateError> {
    let r = job.stream.release;
    let mut w = SlotWriter::enter(&job.stream, raw, "full");
    for c in rx {
        let data = &c.buf.as_slice()[..c.len];
        let mut p = 0;
        let mut pending = None;
        for fe in &c.frame_ends {
            w.hash(&data[p..fe.pos]);
            p = fe.pos;
            pending = Some(Checkpoint {
                version: r.version.to_string(),
                compressed_sha256: r.compressed_sha256.clone(),
                partition: job.stream.slot.partition,
                comp_offset: fe.comp_off,
                raw_offset: c.raw_off + fe.pos as u64,
                comp_state: fe.comp.save(),
                raw_state: w.raw().save(),
            });
        }
        w.hash(&data[p..]);
        w.write_at(c.raw_off, data)?;
        if let Some(cp) = pending {
            // Only at a frame's end: a resume restarts the decoder there.
            if cp.raw_offset != r.raw_size && w.checkpoint_due() {
                w.checkpoint(|| (job.checkpoint)(&cp))?;
            }
        }
        let _ = pool.send(c.buf);
    }
    w.finish()
}
