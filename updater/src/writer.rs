//! The one slot writer: what a full payload (`apply`) and a delta (`delta`)
//! both do with the bytes they have made, on their writer thread.
//!
//! - Writes go out under the I/O limit (`iolimit`: the writer thread's own
//!   cgroup rule, or pacing in userspace), in the pieces the limit allows,
//!   and are accounted as they go.
//! - The whole slot is hashed in slot order (`raw_sha256` of the manifest).
//! - A checkpoint is recorded only after the data it vouches for is on disk:
//!   `checkpoint` syncs the slot first, then calls the caller's recorder.
//! - The last sync happens in `finish`, before the hash is handed back.
//!
//! What each caller still owns: where a checkpoint may fall (a payload's
//! frame boundary, a delta's block count) and what it records.
//!
//! [`Stream`] is what both jobs share: the release the bytes must match,
//! where they come from and go, the limits, cancel and progress.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use nimbus::release::Release;

use crate::error::UpdateError;
use crate::fetch::Transport;
use crate::iolimit;
use crate::sha::Sha256;
use crate::status::Progress;
use crate::target::SlotDevice;

/// The limits an install runs under (update.conf: IO_WRITE_BPS, IO_CLASS,
/// DOWNLOAD_RATE_MAX).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub write_bps: Option<u64>,
    /// The writer in the idle I/O class.
    pub io_idle: bool,
    pub download_bps: Option<u64>,
}

/// What a full payload's job (`apply::Job`) and a delta's (`delta::Job`)
/// share.
pub struct Stream<'a> {
    pub http: &'a dyn Transport,
    pub release: &'a Release,
    pub slot: &'a SlotDevice,
    pub limits: Limits,
    pub cancel: &'a AtomicBool,
    pub progress: &'a (dyn Fn(Progress) + Sync),
}

/// Checkpoint at the first boundary after this much time or data.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
pub const CHECKPOINT_BYTES: u64 = 256 << 20;

pub struct SlotWriter<'a> {
    slot: &'a SlotDevice,
    /// The release's `raw_size`: writes past it fail.
    raw_size: u64,
    guard: iolimit::Guard,
    raw: Sha256,
    last_cp: Instant,
    since_cp: u64,
}

impl<'a> SlotWriter<'a> {
    /// Enter the I/O limit on this thread (the limit follows the thread
    /// that calls this) and start hashing from `raw` (a resumed apply
    /// brings the state of the prefix already written).
    pub fn enter(stream: &Stream<'a>, raw: Sha256, what: &str) -> SlotWriter<'a> {
        let slot = stream.slot;
        let l = stream.limits;
        let guard = iolimit::enter(slot.path(), l.write_bps, l.io_idle);
        tracing::info!("slot writer ({what}): {}", guard.how);
        SlotWriter {
            slot,
            raw_size: stream.release.raw_size,
            guard,
            raw,
            last_cp: Instant::now(),
            since_cp: 0,
        }
    }

    /// Add bytes to the slot's running hash. Kept apart from `write_at`
    /// so a caller can take the hash state at a point inside a buffer (a
    /// payload frame's end) before writing the whole buffer.
    pub fn hash(&mut self, data: &[u8]) {
        self.raw.update(data);
    }

    /// The running hash (for a checkpoint's saved state).
    pub fn raw(&self) -> &Sha256 {
        &self.raw
    }

    /// Write `data` at `off` of the slot, in the pieces the I/O limit
    /// allows. `data` must be a block-aligned buffer (`AlignedBuf`) when
    /// the slot is open O_DIRECT.
    pub fn write_at(&mut self, off: u64, data: &[u8]) -> Result<(), UpdateError> {
        let piece = self.guard.write_size(data.len()).max(1);
        let mut at = off;
        for d in data.chunks(piece) {
            self.slot.write_raw(self.raw_size, at, d)?;
            self.guard.account(d.len() as u64);
            // Cannot overflow: write_raw refused anything past raw_size.
            at += d.len() as u64;
        }
        self.since_cp = self.since_cp.saturating_add(data.len() as u64);
        Ok(())
    }

    /// Whether enough time or data has passed since the last checkpoint.
    pub fn checkpoint_due(&self) -> bool {
        self.last_cp.elapsed() >= CHECKPOINT_EVERY || self.since_cp >= CHECKPOINT_BYTES
    }

    /// Make everything written so far durable, then record the checkpoint
    /// (a checkpoint must never vouch for data still in a cache).
    pub fn checkpoint(
        &mut self,
        record: impl FnOnce() -> Result<(), UpdateError>,
    ) -> Result<(), UpdateError> {
        self.slot.sync()?;
        record()?;
        self.last_cp = Instant::now();
        self.since_cp = 0;
        Ok(())
    }

    /// The last sync; returns the whole slot's hash and how writes were
    /// limited (for the outcome and the log).
    pub fn finish(self) -> Result<(Sha256, String), UpdateError> {
        self.slot.sync()?;
        Ok((self.raw, self.guard.how.clone()))
    }
}
