//! Delta apply: rebuild the passive slot from blocks this host already has
//! and the frames of the release's pack it lacks (`nimbus::delta`).
//!
//! ```text
//! plan (pure):   target block t -> booted slot block | passive slot block | frame to fetch
//! fetch thread:  coalesced Range GETs of the pack -> frames decoded one by one
//! write thread:  blocks in slot order -> check short hash -> sha256 + level-0 hash
//!                -> 1 MiB O_DIRECT writes -> tree from level 0 -> descriptor
//! ```
//!
//! Blocks are written in slot order, and a block of the passive slot is
//! only a source when it lies at or after the block being written, so no
//! source is overwritten before it is read. Every byte written is hashed as
//! it goes: the tree built from those hashes must give the descriptor's
//! root, and the whole slot the manifest's `raw_sha256`, exactly as for a
//! full payload.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, Instant};

use nimbus::delta::{Index, ShortHash, BLOCK, FRAME_RAW};
use nimbus::release::{SlotDescriptor, DESCRIPTOR_SIZE};
use nimbus::verity;

use crate::error::UpdateError;
use crate::sha::Sha256;
use crate::status::Progress;
use crate::target::{AlignedBuf, SlotDevice};
use crate::writer::{SlotWriter, Stream};

/// Fall back to the full payload when the frames to fetch exceed this
/// share of it: past that, the full payload's better compression and
/// single stream win.
pub const MAX_SHARE: f64 = 0.7;
/// Frames this close (in pack bytes) are fetched in one request with the
/// gap: a request costs more than a few KiB.
const GAP_BYTES: u64 = 32 * 1024;
const OUT_BUF: usize = 1 << 20;
const FRAME_QUEUE: usize = 16;
const OUT_BUFS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// Block numbers are u32 (16 TiB of slot): the plan is one entry per
    /// block and is kept for the whole write.
    Booted(u32),
    Passive(u32),
    Fetch,
}

/// What to do for every block, and which pack bytes to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub from: Vec<From>,
    /// Frames to decode, ascending.
    pub frames: Vec<usize>,
    /// Pack byte ranges `[start, end)` to request, ascending; each covers
    /// whole frames.
    pub ranges: Vec<(u64, u64)>,
    pub fetch_bytes: u64,
    pub booted_blocks: u64,
    pub passive_blocks: u64,
}

/// Decide each block's source. `booted` maps short hashes to blocks of the
/// booted slot; `passive` maps target blocks to verified blocks of the
/// passive slot (at or after the target block).
pub fn plan(index: &Index, booted: &HashMap<ShortHash, u32>, passive: &HashMap<u64, u64>) -> Plan {
    let mut from = Vec::with_capacity(index.hashes.len());
    let mut frames: Vec<usize> = Vec::new();
    let (mut nb, mut np) = (0, 0);
    for (t, h) in index.hashes.iter().enumerate() {
        let t = t as u64;
        let f = if let Some(&s) = booted.get(h) {
            nb += 1;
            From::Booted(s)
        } else if let Some(&s) = passive
            .get(&t)
            .filter(|&&s| s >= t && s <= u64::from(u32::MAX))
        {
            np += 1;
            From::Passive(s as u32)
        } else {
            let fr = Index::frame_of(t);
            if frames.last() != Some(&fr) {
                frames.push(fr);
            }
            From::Fetch
        };
        from.push(f);
    }
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &fr in &frames {
        let (s, e) = index.frame_bytes(fr);
        match ranges.last_mut() {
            Some(last) if s <= last.1 + GAP_BYTES => last.1 = e,
            _ => ranges.push((s, e)),
        }
    }
    let fetch_bytes = ranges.iter().map(|(s, e)| e - s).sum();
    Plan {
        from,
        frames,
        ranges,
        fetch_bytes,
        booted_blocks: nb,
        passive_blocks: np,
    }
}

/// The booted slot, read-only: its data (O_DIRECT on a running host, see
/// `open_booted`) and the same disk buffered (for the tree and descriptor).
pub struct Booted {
    pub data: File,
    pub data_path: PathBuf,
    /// Byte offset of the slot's data area in `data`.
    pub data_offset: u64,
    pub raw: File,
    pub raw_path: PathBuf,
    pub part_offset: u64,
    pub part_size: u64,
}

impl Booted {
    fn descriptor(&self) -> Option<SlotDescriptor> {
        let mut b = vec![0u8; DESCRIPTOR_SIZE];
        let at = self.part_offset + self.part_size - DESCRIPTOR_SIZE as u64;
        self.raw.read_exact_at(&mut b, at).ok()?;
        SlotDescriptor::parse_unverified(&b).ok()
    }
}

/// A slot's level 0 from its own tree, if its root checks out and it uses
/// `salt`: the short hashes of its blocks, without reading the data.
fn level0_of(
    read: impl Fn(&mut [u8], u64) -> std::io::Result<()>,
    d: &SlotDescriptor,
    salt: &[u8; 32],
) -> Option<Vec<u8>> {
    if &d.verity_salt != salt {
        return None;
    }
    let blocks = d.data_size / BLOCK as u64;
    let (off, len) = verity::level0_extent(blocks, d.hash_size)?;
    if len > (64 << 20) {
        return None;
    }
    let mut l0 = vec![0u8; len as usize];
    read(&mut l0, d.hash_offset + off).ok()?;
    // The upper levels only (not a copy of level 0): memory stays at one
    // level 0 while planning.
    (verity::root_of_level0(&l0, salt) == d.verity_root).then_some(l0)
}

/// Short hashes of the booted slot's blocks: from its tree when it shares
/// the target's salt, else by hashing its data.
pub fn booted_hashes(
    b: &Booted,
    salt: &[u8; 32],
) -> Result<(HashMap<ShortHash, u32>, &'static str), UpdateError> {
    let Some(d) = b.descriptor() else {
        return Ok((HashMap::new(), "no readable descriptor"));
    };
    let mut map = HashMap::new();
    let read = |buf: &mut [u8], off: u64| b.raw.read_exact_at(buf, b.part_offset + off);
    let blocks = d.data_size / BLOCK as u64;
    if blocks > u64::from(u32::MAX) {
        return Ok((map, "too large to index"));
    }
    if let Some(l0) = level0_of(read, &d, salt) {
        for (i, e) in l0.chunks_exact(32).enumerate() {
            map.entry(nimbus::delta::short_of(e)).or_insert(i as u32);
        }
        return Ok((map, "its verity tree"));
    }
    // Aligned: `data` may be open O_DIRECT.
    let mut buf = AlignedBuf::new(OUT_BUF);
    let mut at = 0u64;
    while at < blocks {
        let n = (blocks - at).min((OUT_BUF / BLOCK) as u64) as usize;
        b.data
            .read_exact_at(
                &mut buf.as_mut_slice()[..n * BLOCK],
                b.data_offset + at * BLOCK as u64,
            )
            .map_err(|e| source_err(&b.data_path, e))?;
        for (i, blk) in buf.as_slice()[..n * BLOCK].chunks(BLOCK).enumerate() {
            map.entry(nimbus::delta::short_hash(salt, blk))
                .or_insert((at + i as u64) as u32);
        }
        at += n as u64;
    }
    Ok((map, "hashing its data"))
}

/// Blocks of the passive slot that already hold what target blocks need,
/// checked by reading them: the prefix an interrupted install wrote
/// (`written` blocks), and blocks of a whole earlier install found through
/// its tree. Only blocks not already in `booted` are looked for.
pub fn passive_sources(
    index: &Index,
    booted: &HashMap<ShortHash, u32>,
    slot: &SlotDevice,
    written: u64,
) -> Result<HashMap<u64, u64>, UpdateError> {
    let salt = index.fields.verity_salt;
    let old = slot
        .read_descriptor()
        .ok()
        .and_then(|b| SlotDescriptor::parse_unverified(&b).ok());
    let mut hints: HashMap<ShortHash, u64> = HashMap::new();
    if let Some(d) = old.filter(|d| d.payload_end() <= slot.size()) {
        let read = |buf: &mut [u8], off: u64| {
            slot.read_at(buf, off)
                .map_err(|e| std::io::Error::other(e.to_string()))
        };
        if let Some(l0) = level0_of(read, &d, &salt) {
            for (i, e) in l0.chunks_exact(32).enumerate() {
                hints.entry(nimbus::delta::short_of(e)).or_insert(i as u64);
            }
        }
    }
    let limit = (slot.size() - DESCRIPTOR_SIZE as u64) / BLOCK as u64;
    let mut out = HashMap::new();
    let mut buf = AlignedBuf::new(BLOCK);
    for (t, h) in index.hashes.iter().enumerate() {
        let t = t as u64;
        if booted.contains_key(h) {
            continue;
        }
        let mut cands = Vec::with_capacity(2);
        if t < written {
            cands.push(t);
        }
        if let Some(&s) = hints.get(h) {
            if s >= t && s < limit && !cands.contains(&s) {
                cands.push(s);
            }
        }
        for s in cands {
            slot.read_at(buf.as_mut_slice(), s * BLOCK as u64)?;
            if nimbus::delta::short_hash(&salt, buf.as_slice()) == *h {
                out.insert(t, s);
                break;
            }
        }
    }
    Ok(out)
}

pub struct Job<'a> {
    pub stream: Stream<'a>,
    pub pack_url: String,
    pub index: &'a Index,
    pub plan: &'a Plan,
    pub booted: &'a Booted,
    /// Called with the number of blocks written and synced.
    pub checkpoint: &'a (dyn Fn(u64) -> Result<(), UpdateError> + Sync),
}

#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub fetched: u64,
    pub requests: u64,
    pub written: u64,
    pub seconds: f64,
    pub io_limit: String,
}

struct Frame {
    no: usize,
    data: Vec<u8>,
}

pub fn run(job: &Job<'_>) -> Result<Outcome, UpdateError> {
    let ix = job.index;
    let r = job.stream.release;
    let d = &ix.fields;
    if d.hash_offset != d.data_size
        || d.payload_end() + DESCRIPTOR_SIZE as u64 != r.raw_size
        || hex::encode(d.verity_root) != r.verity_root
        || d.version != r.version
    {
        return Err(UpdateError::DeltaIndex {
            url: job.pack_url.clone(),
            reason: format!(
                "its descriptor (version {}, root {}, {} bytes) does not describe the release the manifest lists",
                d.version,
                hex::encode(d.verity_root),
                d.payload_end() + DESCRIPTOR_SIZE as u64
            ),
        });
    }
    let t0 = Instant::now();
    let (tx, rx) = sync_channel::<Result<Frame, UpdateError>>(FRAME_QUEUE);
    std::thread::scope(|s| {
        let dl = s.spawn(|| fetch(job, tx));
        let written = s.spawn(|| write(job, rx));
        let fetched = dl.join().unwrap_or((0, 0));
        let (written, io_limit) = written
            .join()
            .unwrap_or_else(|_| Err(UpdateError::Refused("slot writer panicked".into())))?;
        Ok(Outcome {
            fetched: fetched.0,
            requests: fetched.1,
            written,
            seconds: t0.elapsed().as_secs_f64(),
            io_limit,
        })
    })
}

/// Fetch the plan's ranges and send the needed frames, decoded, in order.
/// Returns (bytes received, requests made); errors travel down the channel.
fn fetch(job: &Job<'_>, tx: SyncSender<Result<Frame, UpdateError>>) -> (u64, u64) {
    let ix = job.index;
    let url = &job.pack_url;
    let total = job.plan.fetch_bytes;
    let (mut got, mut requests) = (0u64, 0u64);
    let mut needed = job.plan.frames.iter().peekable();
    let mut last = Instant::now();
    let mut pacer = crate::fetch::Pacer::new(job.stream.limits.download_bps);
    for &(start, end) in &job.plan.ranges {
        if job.stream.cancel.load(Ordering::Relaxed) {
            let _ = tx.send(Err(UpdateError::Cancelled));
            return (got, requests);
        }
        requests += 1;
        let mut body = match job.stream.http.get_range(url, start, end) {
            Ok(b) => b,
            Err(e) => {
                let _ = tx.send(Err(e));
                return (got, requests);
            }
        };
        // Frames inside this range, needed or in a gap.
        let first = ix.frame_offsets.partition_point(|&o| o < start);
        let mut f = first;
        while f < ix.frames() && ix.frame_bytes(f).1 <= end {
            let (fs, fe) = ix.frame_bytes(f);
            let mut comp = vec![0u8; (fe - fs) as usize];
            if let Err(e) = body.read_exact(&mut comp) {
                let _ = tx.send(Err(e));
                return (got, requests);
            }
            got += fe - fs;
            pacer.account(fe - fs);
            if needed.peek() == Some(&&f) {
                needed.next();
                let (b0, b1) = ix.frame_blocks(f);
                let want = ((b1 - b0) as usize) * BLOCK;
                let frame = match zstd::bulk::decompress(&comp, FRAME_RAW) {
                    Ok(data) if data.len() == want => Ok(Frame { no: f, data }),
                    Ok(data) => Err(UpdateError::DeltaFrame {
                        url: url.clone(),
                        frame: f,
                        reason: format!("decodes to {} bytes, {want} expected", data.len()),
                    }),
                    Err(e) => Err(UpdateError::DeltaFrame {
                        url: url.clone(),
                        frame: f,
                        reason: format!("does not decode: {e}"),
                    }),
                };
                let failed = frame.is_err();
                if tx.send(frame).is_err() || failed {
                    return (got, requests);
                }
            }
            f += 1;
        }
        if let Err(e) = body.expect_end() {
            let _ = tx.send(Err(e));
            return (got, requests);
        }
        if last.elapsed() >= Duration::from_millis(250) || got == total {
            last = Instant::now();
            (job.stream.progress)(Progress {
                done: got,
                total,
                rate: 0,
                resumed_from: 0,
            });
        }
    }
    (got, requests)
}

enum ToWriter {
    Blocks {
        buf: AlignedBuf,
        first: u64,
        n: u64,
    },
    /// Every data block was sent: build the tree from level 0 and finish.
    Finish(Vec<u8>),
}

/// The write pass on two threads: this one reads sources and frames in
/// slot order and checks each block's hash (level 0); a writer thread
/// hashes the raw stream and writes (under the I/O limit), then the tree
/// and the descriptor. Returns the bytes written and how writes were
/// limited.
fn write(
    job: &Job<'_>,
    rx: Receiver<Result<Frame, UpdateError>>,
) -> Result<(u64, String), UpdateError> {
    let (tx, wrx) = sync_channel::<ToWriter>(2);
    let (pool_tx, pool) = sync_channel::<AlignedBuf>(OUT_BUFS);
    for _ in 0..OUT_BUFS {
        // Cannot fail: the channel has room for every buffer.
        let _ = pool_tx.send(AlignedBuf::new(OUT_BUF));
    }
    std::thread::scope(|s| {
        let writer = s.spawn(|| write_slot(job, wrx, pool_tx));
        let assembled = assemble(job, rx, tx, pool);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(UpdateError::Refused("slot writer panicked".into())));
        match (assembled, written) {
            (Ok(()), w) => w,
            (Err(UpdateError::WriterStopped), Err(w)) => Err(w),
            (Err(a), _) => Err(a),
        }
    })
}

/// Read every block in slot order into buffers and check it.
fn assemble(
    job: &Job<'_>,
    rx: Receiver<Result<Frame, UpdateError>>,
    tx: SyncSender<ToWriter>,
    pool: Receiver<AlignedBuf>,
) -> Result<(), UpdateError> {
    let ix = job.index;
    let salt = ix.fields.verity_salt;
    let blocks = ix.data_blocks();
    let mut level0: Vec<u8> = Vec::with_capacity(blocks as usize * 32);
    let per_buf = (OUT_BUF / BLOCK) as u64;
    let mut frame: Option<Frame> = None;
    let mut t = 0u64;
    while t < blocks {
        if job.stream.cancel.load(Ordering::Relaxed) {
            return Err(UpdateError::Cancelled);
        }
        let mut buf = pool.recv().map_err(|_| UpdateError::WriterStopped)?;
        let n = (blocks - t).min(per_buf);
        let out = buf.as_mut_slice();
        let mut i = 0u64;
        while i < n {
            let at = t + i;
            // A run of consecutive source blocks is one read.
            let run = |mk: fn(u32) -> From, s: u32| {
                let mut k = 1u64;
                while i + k < n
                    && u64::from(s) + k <= u64::from(u32::MAX)
                    && job.plan.from[(at + k) as usize] == mk(s + k as u32)
                {
                    k += 1;
                }
                k
            };
            let dst = &mut out[(i as usize) * BLOCK..];
            let k = match job.plan.from[at as usize] {
                From::Booted(s) => {
                    let k = run(From::Booted, s);
                    let b = job.booted;
                    b.data
                        .read_exact_at(
                            &mut dst[..k as usize * BLOCK],
                            b.data_offset + u64::from(s) * BLOCK as u64,
                        )
                        .map_err(|e| source_err(&b.data_path, e))?;
                    k
                }
                From::Passive(s) => {
                    let k = run(From::Passive, s);
                    job.stream
                        .slot
                        .read_at(&mut dst[..k as usize * BLOCK], u64::from(s) * BLOCK as u64)?;
                    k
                }
                From::Fetch => {
                    let want = Index::frame_of(at);
                    while frame.as_ref().is_none_or(|f| f.no != want) {
                        frame = Some(match rx.recv() {
                            Ok(f) => f?,
                            Err(_) => {
                                return Err(UpdateError::Refused(
                                    "the pack download stopped early".into(),
                                ))
                            }
                        });
                    }
                    let f = frame.as_ref().map_or(&[][..], |f| &f.data[..]);
                    let o = ((at - ix.frame_blocks(want).0) as usize) * BLOCK;
                    dst[..BLOCK].copy_from_slice(&f[o..o + BLOCK]);
                    1
                }
            };
            for j in 0..k {
                let blk = &dst[(j as usize) * BLOCK..(j as usize + 1) * BLOCK];
                let full = verity::block_hash(&salt, blk);
                let b = at + j;
                if full[..nimbus::delta::HASH_LEN] != ix.hashes[b as usize] {
                    return Err(match job.plan.from[b as usize] {
                        From::Fetch => UpdateError::DeltaFrame {
                            url: job.pack_url.clone(),
                            frame: Index::frame_of(b),
                            reason: format!("block {b} does not match the index"),
                        },
                        // The booted slot is read without dm-verity
                        // (`open_booted`): a block that rotted or was
                        // changed on disk is caught here, and the full
                        // payload takes over as it would after an EIO.
                        From::Booted(_) => source_err(
                            &job.booted.data_path,
                            std::io::Error::other(format!(
                                "block {b} of the booted slot does not match the index \
                                 (changed on disk, or during the update)"
                            )),
                        ),
                        From::Passive(_) => UpdateError::Refused(format!(
                            "block {b} read from the passive slot no longer matches the index; \
                             the slot changed during the update"
                        )),
                    });
                }
                level0.extend_from_slice(&full);
            }
            i += k;
        }
        tx.send(ToWriter::Blocks { buf, first: t, n })
            .map_err(|_| UpdateError::WriterStopped)?;
        t += n;
    }
    tx.send(ToWriter::Finish(level0))
        .map_err(|_| UpdateError::WriterStopped)
}

/// Hash and write what `assemble` sends, checkpointing; then the tree
/// (which must give the signed root) and the descriptor; then the whole
/// slot's hash against the manifest.
fn write_slot(
    job: &Job<'_>,
    rx: Receiver<ToWriter>,
    pool: SyncSender<AlignedBuf>,
) -> Result<(u64, String), UpdateError> {
    let ix = job.index;
    let r = job.stream.release;
    let salt = ix.fields.verity_salt;
    let blocks = ix.data_blocks();
    let mut w = SlotWriter::enter(&job.stream, Sha256::new(), "delta");
    let mut level0 = None;
    for msg in rx {
        match msg {
            ToWriter::Blocks { buf, first, n } => {
                let len = n as usize * BLOCK;
                let data = &buf.as_slice()[..len];
                w.hash(data);
                w.write_at(first * BLOCK as u64, data)?;
                let done = first + n;
                if done < blocks && w.checkpoint_due() {
                    w.checkpoint(|| (job.checkpoint)(done))?;
                }
                // The assembler may have stopped; its error is the one to report.
                let _ = pool.send(buf);
            }
            ToWriter::Finish(l0) => {
                level0 = Some(l0);
                break;
            }
        }
    }
    let Some(level0) = level0 else {
        return Err(UpdateError::Refused(
            "the delta's block reader stopped early".into(),
        ));
    };
    let mut buf = AlignedBuf::new(OUT_BUF);
    // The tree from the hashes of what was written; it must give the root
    // the signed descriptor names before anything else is trusted.
    let tree = verity::from_level0(level0, &salt);
    if tree.root != ix.fields.verity_root || tree.bytes.len() as u64 != ix.fields.hash_size {
        return Err(UpdateError::RawHash {
            url: job.pack_url.clone(),
            got: format!("verity root {}", hex::encode(tree.root)),
            expected: format!("verity root {}", hex::encode(ix.fields.verity_root)),
        });
    }
    let mut off = ix.fields.hash_offset;
    for c in tree.bytes.chunks(OUT_BUF) {
        buf.as_mut_slice()[..c.len()].copy_from_slice(c);
        w.hash(c);
        w.write_at(off, &buf.as_slice()[..c.len()])?;
        off += c.len() as u64;
    }
    buf.as_mut_slice()[..DESCRIPTOR_SIZE].copy_from_slice(&ix.descriptor);
    w.hash(&ix.descriptor);
    w.write_at(
        r.raw_size - DESCRIPTOR_SIZE as u64,
        &buf.as_slice()[..DESCRIPTOR_SIZE],
    )?;
    let (raw, io_limit) = w.finish()?;
    let got = raw.finalize_hex();
    if got != r.raw_sha256 {
        return Err(UpdateError::RawHash {
            url: job.pack_url.clone(),
            got,
            expected: r.raw_sha256.clone(),
        });
    }
    Ok((r.raw_size, io_limit))
}

/// The booted slot for delta sources, read from its partition on the
/// disk, not through the dm-verity device stage 2 mapped.
///
/// Reading through dm-verity would have the kernel hash every block again
/// in `kverityd`, a WQ_HIGHPRI workqueue whose workers run at nice -20:
/// hundreds of megabytes of SHA-256 that no nice level, CPU weight or I/O
/// class of update-engine's reaches, and that starved a cluster host's
/// etcd (every member timing out for 24 s while the three hosts read their
/// booted slots; issue 33). Nothing is lost by skipping it: every block
/// this install takes is hashed here (at update-engine's own low
/// priority) and must match the signed index, the tree built from those
/// hashes must give the signed root, and the whole slot the manifest's
/// `raw_sha256`, so a tampered booted slot fails the install instead of
/// entering the new slot. On a block device the data is read with O_DIRECT
/// so the slot does not flood the host's page cache either.
pub fn open_booted(
    disk: &Path,
    part_offset: u64,
    part_size: u64,
    host_mode: bool,
) -> Result<Booted, UpdateError> {
    let raw = File::open(disk).map_err(|e| source_err(disk, e))?;
    let direct = !host_mode
        && std::fs::metadata(disk)
            .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
            .unwrap_or(false);
    let data = if direct {
        use std::os::unix::fs::OpenOptionsExt;
        // O_DIRECT needs aligned buffers, offsets and lengths: the reads
        // below are whole 4 KiB blocks into `AlignedBuf`s at block offsets
        // of a partition that starts on a 1 MiB boundary.
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(disk)
        {
            Ok(f) => f,
            Err(_) => raw.try_clone().map_err(|e| source_err(disk, e))?,
        }
    } else {
        raw.try_clone().map_err(|e| source_err(disk, e))?
    };
    Ok(Booted {
        data,
        data_path: disk.to_path_buf(),
        data_offset: part_offset,
        raw,
        raw_path: disk.to_path_buf(),
        part_offset,
        part_size,
    })
}

/// The booted slot could not be read (a device went away): the delta
/// gives way to the full payload.
fn source_err(p: &Path, e: std::io::Error) -> UpdateError {
    UpdateError::DeltaSource {
        path: p.to_path_buf(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus::keys::ReleaseKey;

    fn index(hashes: Vec<ShortHash>, frame_size: u32) -> Index {
        let key = ReleaseKey::generate().unwrap();
        let blocks = hashes.len() as u64;
        let desc = SlotDescriptor {
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
        .unwrap();
        let sizes = vec![frame_size; nimbus::delta::frames_for(blocks)];
        Index::new(&desc, &sizes, hashes).unwrap()
    }

    fn h(i: u64) -> ShortHash {
        i.to_le_bytes()
    }

    #[test]
    fn booted_first_then_passive_ahead_then_fetch() {
        // 64 blocks = 4 frames of 16.
        let ix = index((0..64).map(h).collect(), 10_000);
        let booted: HashMap<_, _> = (0..64)
            .filter(|i| i % 16 != 5)
            .map(|i| (h(i), i as u32 + 100))
            .collect();
        // Block 5 is in the passive slot ahead of it; block 21 only behind
        // it (already overwritten when 21 is written), so it is fetched.
        let passive: HashMap<u64, u64> = [(5, 9), (21, 3), (37, 37)].into();
        let p = plan(&ix, &booted, &passive);
        assert_eq!(p.from[0], From::Booted(100));
        assert_eq!(p.from[5], From::Passive(9));
        assert_eq!(p.from[21], From::Fetch);
        assert_eq!(p.from[37], From::Passive(37));
        assert_eq!(p.from[53], From::Fetch);
        assert_eq!(p.frames, vec![1, 3]);
        // Frames 1 and 3 are 10 000 bytes apart: under the gap, one request.
        assert_eq!(p.ranges, vec![(10_000, 40_000)]);
        assert_eq!(p.fetch_bytes, 30_000);
        assert_eq!((p.booted_blocks, p.passive_blocks), (60, 2));
    }

    #[test]
    fn distant_frames_are_separate_requests() {
        let ix = index((0..64).map(h).collect(), 40_000);
        let booted: HashMap<_, _> = (1..63).map(|i| (h(i), i as u32)).collect();
        let p = plan(&ix, &booted, &HashMap::new());
        assert_eq!(p.frames, vec![0, 3]);
        assert_eq!(p.ranges, vec![(0, 40_000), (120_000, 160_000)]);
    }

    #[test]
    fn nothing_to_fetch_when_everything_is_local() {
        let ix = index((0..20).map(h).collect(), 1000);
        let booted: HashMap<_, _> = (0..20).map(|i| (h(i), 19 - i as u32)).collect();
        let p = plan(&ix, &booted, &HashMap::new());
        assert!(p.ranges.is_empty() && p.frames.is_empty());
        assert_eq!(p.fetch_bytes, 0);
    }
}
