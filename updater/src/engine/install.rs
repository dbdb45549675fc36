//! The installer: a chosen release into the passive slot, by delta when
//! it pays (`crate::delta`) or from the full payload (`crate::apply`), then
//! verified and made bootable. It owns the checkpoints ([`InstallState`])
//! and changes nothing else but the passive slot and its GPT entry.

use std::path::Path;
use std::sync::atomic::Ordering;

use nimbus::layout::Slot;
use nimbus::release::{Release, SlotDescriptor};
use nimbus::slots;

use super::{Ctx, TrustView};
use crate::apply;
use crate::error::UpdateError;
use crate::state::{InstallState, Ledger};
use crate::status::{ApplyReport, State};
use crate::target::SlotDevice;

pub struct Installer<'a> {
    pub ctx: &'a Ctx,
    pub trust: &'a TrustView,
    pub ledger: &'a mut Ledger,
}

/// Called once the new slot is written and verified, before it is made
/// bootable (the stage-1 keeper installs stage 1 there).
pub type BeforeFlip<'f> = &'f mut dyn FnMut(&mut Ledger) -> Result<(), UpdateError>;

impl Installer<'_> {
    /// Write `r` (from `url`, or the local `file`) into the passive slot,
    /// verify it, run `before_flip`, and make it the next boot. Returns how
    /// it was written.
    pub fn install(
        &mut self,
        r: &Release,
        url: &str,
        file: Option<&Path>,
        before_flip: BeforeFlip<'_>,
    ) -> Result<ApplyReport, UpdateError> {
        let result = self.install_inner(r, url, file, before_flip);
        if let Err(e) = &result {
            if poisons_checkpoint(e) && self.ledger.get().install.checkpoint.is_some() {
                // The bytes behind the checkpoint (a stale mirror, a brief
                // man in the middle on http) did not make the payload the
                // manifest names: resuming from them would fail the same
                // way on every attempt until a new release.
                tracing::warn!(
                    "install of {} failed verification ({e}); dropping its checkpoint, the next attempt starts from the beginning",
                    r.version
                );
                self.ledger
                    .edit(|s: &mut InstallState| s.checkpoint = None)?;
            }
        }
        result
    }

    fn install_inner(
        &mut self,
        r: &Release,
        url: &str,
        file: Option<&Path>,
        before_flip: BeforeFlip<'_>,
    ) -> Result<ApplyReport, UpdateError> {
        let ctx = self.ctx;
        ctx.ensure_proven(self.trust)?;
        let passive = ctx.passive()?;
        if passive == ctx.host.booted {
            return Err(UpdateError::BootedSlot {
                disk: ctx.host.disk.clone(),
                partition: passive,
            });
        }
        let mut disk = ctx.host.storage.gpt(true)?;
        disk.check_nimbus_layout()?;
        let part = disk.partition(passive)?;
        let booted_part = {
            let b = disk.partition(ctx.host.booted)?;
            (b.offset_bytes(), b.size_bytes())
        };
        if r.raw_size > part.size_bytes() {
            return Err(UpdateError::TooLargeForSlot {
                version: r.version.to_string(),
                raw_size: r.raw_size,
                partition: passive,
                slot_size: part.size_bytes(),
            });
        }
        // A checkpoint is only worth anything if the slot stayed invalid
        // since it was written (nobody booted or prioritised it meanwhile).
        let invalid_now = part.prio() == slots::Prio::default();
        let resume = self
            .ledger
            .get()
            .install
            .checkpoint
            .clone()
            .filter(|_| invalid_now);
        if !invalid_now {
            disk.update_slots(|t| slots::invalidate(t, passive))?;
        }
        if resume.is_none() && self.ledger.get().install.checkpoint.is_some() {
            self.ledger
                .edit(|s: &mut InstallState| s.checkpoint = None)?;
        }
        drop(disk);
        ctx.shared.cancel.store(false, Ordering::SeqCst);
        let newv = r.version.to_string();
        ctx.shared.update(|s| {
            s.state = State::Downloading;
            s.new_version = Some(newv);
            s.progress = None;
        });
        let slot = ctx
            .host
            .storage
            .slot(passive, part.offset_bytes(), part.size_bytes())?;
        let mut delta_fallback = None;
        let mut delta_report = None;
        if let (Some(df), None) = (&r.delta, file) {
            // Blocks of the target already in the passive slot: a delta or
            // a full install of this release that was interrupted.
            let written = self.written_blocks(r, passive, resume.as_ref(), invalid_now);
            // What the full payload still needs: all of it, or the rest
            // after its checkpoint.
            let full_left = r.compressed_size - resume.as_ref().map_or(0, |c| c.comp_offset);
            match self.install_delta(r, df, &slot, &booted_part, written, full_left) {
                Ok(Ok(rep)) => delta_report = Some(rep),
                Ok(Err(why)) => {
                    tracing::info!("{}: full payload: {why}", r.version);
                    delta_fallback = Some(why);
                }
                Err(e) if delta_falls_back(&e) => {
                    tracing::warn!(
                        "{}: delta failed ({e}); applying the full payload",
                        r.version
                    );
                    delta_fallback = Some(e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        let report = match delta_report {
            Some(rep) => rep,
            None => {
                let mut rep = self.install_full(r, url, file, &slot, resume)?;
                rep.delta_fallback = delta_fallback;
                rep
            }
        };
        ctx.shared.update(|s| s.last_apply = Some(report.clone()));
        ctx.set_state(State::Verifying);
        let bytes = slot.read_descriptor()?;
        let desc_err = |reason: String| UpdateError::Descriptor {
            disk: ctx.host.disk.clone(),
            partition: passive,
            reason,
        };
        let d = SlotDescriptor::verify(&bytes, self.trust.newest())
            .map_err(|e| desc_err(e.to_string()))?;
        // Stage 1 checks the slot under the set on the ESP, which follows
        // the active set: a slot signed only by keys it does not trust yet
        // would never boot, so it is not staged (docs/security.md: sign
        // one release with old and new keys).
        if let Err(e) = SlotDescriptor::verify(&bytes, self.trust.active()) {
            return Err(desc_err(format!(
                "signed only by keys that stage 1 does not trust yet (it has trust set {}): {e}; \
                 the release that rotates keys must also be signed by the keys the host boots with",
                self.trust.active().summary()
            )));
        }
        if d.version != r.version {
            return Err(desc_err(format!(
                "descriptor says version {}, the manifest {}",
                d.version, r.version
            )));
        }
        if hex::encode(d.verity_root) != r.verity_root {
            return Err(desc_err(format!(
                "verity root {} differs from the manifest's {}",
                hex::encode(d.verity_root),
                r.verity_root
            )));
        }
        if d.payload_end() + nimbus::release::DESCRIPTOR_SIZE as u64 != r.raw_size {
            return Err(desc_err(format!(
                "descriptor covers {} bytes, the payload has {}",
                d.payload_end(),
                r.raw_size
            )));
        }

        // Stage 1 goes into the ESP's other copy before the slot becomes
        // bootable: whichever the next boot meets first, its files are
        // whole (nimbus::esp's write order).
        before_flip(self.ledger)?;

        ctx.set_state(State::Finalizing);
        let mut disk = ctx.host.storage.gpt(true)?;
        disk.update_slots(|t| slots::prioritize(t, passive))?;
        self.ledger.edit(|s: &mut InstallState| {
            s.checkpoint = None;
            s.delta_checkpoint = None;
        })?;
        Ok(report)
    }

    /// The full payload, streamed (`apply`), resuming from `resume`.
    fn install_full(
        &mut self,
        r: &Release,
        url: &str,
        file: Option<&Path>,
        slot: &SlotDevice,
        resume: Option<crate::state::Checkpoint>,
    ) -> Result<crate::status::ApplyReport, UpdateError> {
        let ctx = self.ctx;
        let shared = ctx.shared.clone();
        let progress = move |p: crate::status::Progress| shared.update(|s| s.progress = Some(p));
        // Checkpoints written during the attempt are kept even when it
        // fails: the daemon's next attempt resumes from them.
        let saver = crate::state::Saver::new(self.ledger);
        let result = {
            let checkpoint = |cp: &crate::state::Checkpoint| {
                saver.edit(|s: &mut InstallState| s.checkpoint = Some(cp.clone()))
            };
            let job = apply::Job {
                stream: ctx.stream(r, slot, &progress),
                url: url.to_string(),
                file,
                resume,
                checkpoint: &checkpoint,
            };
            apply::run(&job)
        };
        let out = result?;
        tracing::info!(
            downloaded = out.downloaded,
            resumed_from = out.resumed_from,
            direct_io = out.direct_io,
            "payload {} written to partition {} ({})",
            r.version,
            slot.partition,
            out.io_limit
        );
        Ok(ApplyReport {
            version: r.version.to_string(),
            written: out.written,
            downloaded: out.downloaded,
            resumed_from: out.resumed_from,
            seconds: (out.seconds * 1000.0).round() / 1000.0,
            io_limit: out.io_limit.clone(),
            direct_io: out.direct_io,
            mode: "full".into(),
            delta: None,
            delta_fallback: None,
        })
    }

    /// Rebuild the passive slot from local blocks and fetched frames.
    /// `Ok(Err(why))`: a delta is not worth it here; nothing was written.
    fn install_delta(
        &mut self,
        r: &Release,
        df: &nimbus::release::DeltaFiles,
        slot: &SlotDevice,
        booted_part: &(u64, u64),
        written: u64,
        full_left: u64,
    ) -> Result<Result<ApplyReport, String>, UpdateError> {
        let ctx = self.ctx;
        let server = ctx.server()?;
        let index_url = format!("{server}/{}", df.index.path);
        let pack_url = format!("{server}/{}", df.pack.path);
        let t0 = std::time::Instant::now();
        // Before fetching anything: can the slots here hold enough of the
        // release at all? (A host on a tiny or unrelated image cannot.)
        let target = nimbus::delta::blocks_for_index_size(df.index.size);
        let data_blocks = |b: Option<Vec<u8>>| {
            b.and_then(|b| SlotDescriptor::parse_unverified(&b).ok())
                .map_or(0, |d| d.data_size / nimbus::delta::BLOCK as u64)
        };
        let booted_slot = Slot::from_partition_number(ctx.host.booted);
        let booted_blocks = data_blocks(booted_slot.and_then(|s| {
            ctx.host
                .storage
                .gpt(false)
                .ok()
                .and_then(|mut d| d.read_descriptor(s).ok().map(|b| b.to_vec()))
        }));
        let passive_blocks = data_blocks(slot.read_descriptor().ok()).max(written);
        let local = booted_blocks + passive_blocks;
        if (local as f64) < (1.0 - crate::delta::MAX_SHARE) * target as f64 {
            return Ok(Err(format!(
                "the slots here hold at most {local} of the release's {target} blocks"
            )));
        }
        ctx.set_state(State::Downloading);
        let bytes = ctx.fetch_file(&df.index)?;
        let index = nimbus::delta::Index::parse(&bytes).map_err(|e| UpdateError::DeltaIndex {
            url: index_url.clone(),
            reason: e.to_string(),
        })?;
        let index_len = bytes.len() as u64;
        drop(bytes);
        if index.pack_size() != df.pack.size {
            return Err(UpdateError::DeltaIndex {
                url: index_url,
                reason: format!(
                    "its frames add up to {} bytes, the manifest lists a pack of {}",
                    index.pack_size(),
                    df.pack.size
                ),
            });
        }
        let booted = crate::delta::open_booted(
            &ctx.host.disk,
            booted_part.0,
            booted_part.1,
            ctx.host.host_mode,
        )?;
        let (booted_map, how) = crate::delta::booted_hashes(&booted, &index.fields.verity_salt)?;
        let passive_map = crate::delta::passive_sources(&index, &booted_map, slot, written)?;
        let plan = crate::delta::plan(&index, &booted_map, &passive_map);
        // Only the plan is needed from here on (memory: docs/bench-delta.md).
        drop(booted_map);
        drop(passive_map);
        let share = (plan.fetch_bytes + index_len) as f64 / r.compressed_size as f64;
        tracing::info!(
            "{}: delta plan: {} blocks from the booted slot (found by {how}), {} from the passive slot, {} frames ({} bytes, {:.1} % of the full payload) in {} request(s)",
            r.version,
            plan.booted_blocks,
            plan.passive_blocks,
            plan.frames.len(),
            plan.fetch_bytes,
            share * 100.0,
            plan.ranges.len()
        );
        if share > crate::delta::MAX_SHARE {
            return Ok(Err(format!(
                "the delta would fetch {:.0} % of the full payload (more than {:.0} %)",
                share * 100.0,
                crate::delta::MAX_SHARE * 100.0
            )));
        }
        if plan.fetch_bytes + index_len >= full_left {
            return Ok(Err(format!(
                "resuming the full payload fetches less ({full_left} bytes left, the delta needs {})",
                plan.fetch_bytes + index_len
            )));
        }
        let shared = ctx.shared.clone();
        let progress = move |p: crate::status::Progress| shared.update(|s| s.progress = Some(p));
        let saver = crate::state::Saver::new(self.ledger);
        let result = {
            let checkpoint = |blocks: u64| {
                saver.edit(|s: &mut InstallState| {
                    s.delta_checkpoint = Some(crate::state::DeltaCheckpoint {
                        version: r.version.to_string(),
                        raw_sha256: r.raw_sha256.clone(),
                        partition: slot.partition,
                        blocks,
                    })
                })
            };
            crate::delta::run(&crate::delta::Job {
                stream: ctx.stream(r, slot, &progress),
                pack_url,
                index: &index,
                plan: &plan,
                booted: &booted,
                checkpoint: &checkpoint,
            })
        };
        let out = result?;
        tracing::info!(
            fetched = out.fetched,
            requests = out.requests,
            "delta {} written to partition {} ({})",
            r.version,
            slot.partition,
            out.io_limit
        );
        Ok(Ok(ApplyReport {
            version: r.version.to_string(),
            written: out.written,
            downloaded: out.fetched + index_len,
            resumed_from: 0,
            seconds: (t0.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
            io_limit: out.io_limit,
            direct_io: slot.direct,
            mode: "delta".into(),
            delta: Some(crate::status::DeltaReport {
                blocks: index.data_blocks(),
                from_booted: plan.booted_blocks,
                from_passive: plan.passive_blocks,
                fetched_frames: plan.frames.len() as u64,
                fetched_bytes: out.fetched,
                index_bytes: index_len,
                requests: out.requests + 1,
                percent_of_full: ((out.fetched + index_len) as f64 * 1000.0
                    / r.compressed_size as f64)
                    .round()
                    / 10.0,
                booted_hashes: how.to_string(),
            }),
            delta_fallback: None,
        }))
    }

    /// Data blocks of `r` known to be in the passive slot already: from a
    /// delta or full checkpoint of the same release, while the slot has
    /// stayed invalid since.
    fn written_blocks(
        &self,
        r: &Release,
        passive: u32,
        full: Option<&crate::state::Checkpoint>,
        invalid_now: bool,
    ) -> u64 {
        if !invalid_now {
            return 0;
        }
        let from_delta = self
            .ledger
            .get()
            .install
            .delta_checkpoint
            .as_ref()
            .filter(|c| {
                c.version == r.version.to_string()
                    && c.raw_sha256 == r.raw_sha256
                    && c.partition == passive
            })
            .map_or(0, |c| c.blocks);
        let from_full = full
            .filter(|c| c.version == r.version.to_string() && c.partition == passive)
            .map_or(0, |c| c.raw_offset / nimbus::delta::BLOCK as u64);
        from_delta.max(from_full)
    }
}

/// Delta failures that the full payload may not share: the server, the
/// pack or the index. A cancel, or a slot that cannot be written, stops the
/// install instead.
fn delta_falls_back(e: &UpdateError) -> bool {
    !matches!(
        e,
        UpdateError::Cancelled
            | UpdateError::Io { .. }
            | UpdateError::Gpt(_)
            | UpdateError::WriterStopped
            | UpdateError::Disabled
    )
}

fn poisons_checkpoint(e: &UpdateError) -> bool {
    matches!(
        e,
        UpdateError::CompressedHash { .. }
            | UpdateError::RawHash { .. }
            | UpdateError::Decode { .. }
            | UpdateError::RawTooLarge { .. }
            | UpdateError::RawTooShort { .. }
            | UpdateError::PayloadTooLarge { .. }
            | UpdateError::Descriptor { .. }
    )
}
