//! The Nimbus layout on a GPT: the layout check, the slot table and its
//! updates, the descriptor at a slot's end, and first boot's work.

use std::io::SeekFrom;

use uuid::Uuid;

use super::{guid, guid_bytes, BlockDevice, Capture, Disk, GptError, PartitionInfo, Prepared};
use crate::layout::{self, SECTOR};
use crate::slots;

impl<D: BlockDevice> Disk<D> {
    /// First boot's work on the table, in memory and then in one commit
    /// (backup first, so a cut leaves the old table or the new one):
    /// - a pristine disk ([`layout::PRISTINE_DISK_GUID`]) gets a fresh disk
    ///   GUID and fresh GUIDs for [`layout::HOST_UNIQUE_PARTITIONS`] from
    ///   `fresh`;
    /// - a disk larger than its table gets the backup table moved to its
    ///   end and ROOT grown to the last aligned sector before it, when ROOT
    ///   is the last partition.
    ///
    /// Idempotent: a second call changes nothing and writes nothing.
    pub fn prepare_host(&mut self, mut fresh: impl FnMut() -> Uuid) -> Result<Prepared, GptError> {
        self.check_nimbus_layout()?;
        let mut out = Prepared::default();
        let mut gpt = self.gpt.clone();
        if gpt.header.primary_lba != 1 {
            gpt.header.backup_lba = gpt.header.primary_lba;
            gpt.header.primary_lba = 1;
            gpt.header.partition_entry_lba = 2;
        }
        if guid(gpt.header.disk_guid) == layout::PRISTINE_DISK_GUID {
            gpt.header.disk_guid = guid_bytes(fresh());
            for n in layout::HOST_UNIQUE_PARTITIONS {
                if gpt[n].is_used() {
                    gpt[n].unique_partition_guid = guid_bytes(fresh());
                }
            }
            out.new_identity = Some(guid(gpt.header.disk_guid));
        }
        let end = self.len / SECTOR - 1;
        if gpt.header.backup_lba > end {
            return Err(GptError::Write {
                path: self.path.clone(),
                reason: format!(
                    "the table says the disk ends at LBA {}, the device at LBA {end}: it shrank; not touching it",
                    gpt.header.backup_lba
                ),
            });
        }
        if gpt.header.backup_lba < end {
            out.backup_moved = Some((gpt.header.backup_lba, end));
            let mut seek = Capture {
                pos: 0,
                len: self.len,
                writes: Vec::new(),
            };
            gpt.header
                .update_from(&mut seek, SECTOR)
                .map_err(|e| GptError::Write {
                    path: self.path.clone(),
                    reason: e.to_string(),
                })?;
        }
        let root = layout::ROOT_PARTITION;
        let last_of_all = gpt
            .iter()
            .filter(|(_, e)| e.is_used())
            .map(|(_, e)| e.ending_lba)
            .max()
            .unwrap_or(0);
        if gpt[root].is_used() && gpt[root].ending_lba == last_of_all {
            let align = layout::ALIGN / SECTOR;
            let want = (gpt.header.last_usable_lba + 1) / align * align - 1;
            if want > gpt[root].ending_lba {
                let first = gpt[root].starting_lba;
                out.root_grown = Some((
                    (gpt[root].ending_lba - first + 1) * SECTOR,
                    (want - first + 1) * SECTOR,
                ));
                gpt[root].ending_lba = want;
            }
        }
        if out.new_identity.is_some() || out.backup_moved.is_some() || out.root_grown.is_some() {
            self.gpt = gpt;
            self.commit()?;
        }
        Ok(out)
    }

    /// Is this the Nimbus layout? Every partition of `crate::layout`'s table must be
    /// at its number with its type and label (BIOS-BOOT is optional), and no
    /// other partition may carry the USR type.
    pub fn check_nimbus_layout(&self) -> Result<(), GptError> {
        let parts = self.partitions();
        let fail = |reason: String| GptError::NotNimbus {
            path: self.path.clone(),
            reason,
        };
        for spec in layout::PARTITIONS {
            let Some(p) = parts.iter().find(|p| p.number == spec.number) else {
                if spec.content == layout::Content::BiosBoot {
                    continue;
                }
                return Err(fail(format!(
                    "partition {} ({}) is missing",
                    spec.number, spec.label
                )));
            };
            if p.type_guid != spec.type_guid {
                return Err(fail(format!(
                    "partition {} has type {}, expected {} ({})",
                    spec.number, p.type_guid, spec.type_guid, spec.label
                )));
            }
            if p.label != spec.label {
                return Err(fail(format!(
                    "partition {} is labelled {:?}, expected {:?}",
                    spec.number, p.label, spec.label
                )));
            }
        }
        // Extents: a CRC-valid table can still say anything. Every entry
        // inside the usable LBAs, none overlapping another, both USR slots
        // the same size with room for a descriptor: otherwise a payload for
        // USR-B could land on ROOT.
        let (first_usable, last_usable) = (
            self.gpt.header.first_usable_lba,
            self.gpt.header.last_usable_lba,
        );
        for p in &parts {
            if p.first_lba > p.last_lba || p.first_lba < first_usable || p.last_lba > last_usable {
                return Err(fail(format!(
                    "partition {} spans LBA {}..={}, outside the usable LBAs {first_usable}..={last_usable}",
                    p.number, p.first_lba, p.last_lba
                )));
            }
        }
        let mut by_start: Vec<&PartitionInfo> = parts.iter().collect();
        by_start.sort_by_key(|p| p.first_lba);
        for w in by_start.windows(2) {
            if w[1].first_lba <= w[0].last_lba {
                return Err(fail(format!(
                    "partitions {} and {} overlap",
                    w[0].number, w[1].number
                )));
            }
        }
        let usr: Vec<&PartitionInfo> = parts
            .iter()
            .filter(|p| layout::Slot::from_partition_number(p.number).is_some())
            .collect();
        if let [a, b] = usr[..] {
            if a.size_bytes() != b.size_bytes() {
                return Err(fail(format!(
                    "USR-A is {} bytes and USR-B {}: the slots must be the same size",
                    a.size_bytes(),
                    b.size_bytes()
                )));
            }
        }
        if let Some(p) = usr
            .iter()
            .find(|p| p.size_bytes() < 2 * crate::release::DESCRIPTOR_SIZE as u64)
        {
            return Err(fail(format!(
                "partition {} is too small for a USR slot ({} bytes)",
                p.number,
                p.size_bytes()
            )));
        }
        if let Some(p) = parts.iter().find(|p| {
            p.type_guid == layout::USR_TYPE
                && layout::Slot::from_partition_number(p.number).is_none()
        }) {
            return Err(fail(format!(
                "partition {} has the USR type but is not USR-A or USR-B",
                p.number
            )));
        }
        Ok(())
    }

    /// The USR slots as a table for [`crate::slots`].
    pub fn slot_table(&self) -> Vec<slots::Entry> {
        layout::Slot::ALL
            .iter()
            .filter_map(|s| {
                let n = s.partition_number();
                let e = &self.gpt[n];
                e.is_used().then_some(slots::Entry {
                    number: n,
                    attributes: e.attribute_bits,
                })
            })
            .collect()
    }

    /// Read the last 4 KiB of a USR partition: its slot descriptor, if any.
    pub fn read_descriptor(
        &mut self,
        slot: layout::Slot,
    ) -> Result<[u8; crate::release::DESCRIPTOR_SIZE], GptError> {
        let p = self.partition(slot.partition_number())?;
        let mut buf = [0u8; crate::release::DESCRIPTOR_SIZE];
        let off = p
            .offset_bytes()
            .checked_add(p.size_bytes())
            .and_then(|end| end.checked_sub(buf.len() as u64))
            .filter(|_| p.size_bytes() >= buf.len() as u64)
            .ok_or_else(|| GptError::NotNimbus {
                path: self.path.clone(),
                reason: format!(
                    "partition {} ({} bytes) cannot hold a slot descriptor",
                    p.number,
                    p.size_bytes()
                ),
            })?;
        self.dev
            .seek(SeekFrom::Start(off))
            .and_then(|_| self.dev.read_exact(&mut buf))
            .map_err(|e| self.io(e))?;
        Ok(buf)
    }

    /// Set one entry's attribute word in memory; [`Disk::commit`] writes it.
    pub fn set_attributes(&mut self, number: u32, bits: u64) -> Result<(), GptError> {
        if !(1..=128).contains(&number) || !self.gpt[number].is_used() {
            return Err(GptError::NoPartition {
                path: self.path.clone(),
                number,
            });
        }
        self.gpt[number].attribute_bits = bits;
        Ok(())
    }

    /// Run a slot-protocol operation on the USR entries and commit it. Refuses
    /// disks that are not a Nimbus layout before anything is written.
    pub fn update_slots<T>(
        &mut self,
        op: impl FnOnce(&mut Vec<slots::Entry>) -> Result<T, slots::SlotError>,
    ) -> Result<T, GptError> {
        self.check_nimbus_layout()?;
        let mut table = self.slot_table();
        let before = table.clone();
        let out = op(&mut table).map_err(|source| GptError::Slot {
            path: self.path.clone(),
            source,
        })?;
        if table != before || !self.health.is_clean() {
            for e in &table {
                self.set_attributes(e.number, e.attributes)?;
            }
            self.commit()?;
        }
        Ok(out)
    }
}
