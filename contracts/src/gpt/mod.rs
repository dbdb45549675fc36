//! GPT access for Nimbus disks: create the layout, read it back, and rewrite
//! entries' attribute words in place.
//!
//! Parsing and serialisation come from `gptman`, which indexes entries by their
//! slot in the entry array, so partition numbers (1,2,3,4,6,9) survive every
//! write. (The `gpt` crate's `GptDisk::write()` repacks entries into 1..n, which
//! would renumber USR-B and ROOT.) What gptman does not give us is the write
//! order a torn write needs, so its writes are captured in memory and applied
//! here: backup entries, backup header, sync, primary entries, primary header,
//! sync. A valid primary header therefore always means the whole write landed,
//! and a torn write leaves one valid copy, old or new.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use gptman::{GPTPartitionEntry, GPT};
use uuid::Uuid;

use crate::layout::{self, Placed, SECTOR};
use crate::slots;

mod device;
mod nimbus;

pub use device::{BlockDevice, MemDisk};

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: no valid GPT: primary: {primary}; backup: {backup}")]
    NoValidTable {
        path: PathBuf,
        primary: String,
        backup: String,
    },
    #[error("{path}: not a Nimbus disk: {reason}; refusing to write to it")]
    NotNimbus { path: PathBuf, reason: String },
    #[error("{path}: partition {number} does not exist")]
    NoPartition { path: PathBuf, number: u32 },
    #[error("{path}: {source}")]
    Layout {
        path: PathBuf,
        source: layout::PlanError,
    },
    #[error("{path}: GPT write refused: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Slot {
        path: PathBuf,
        source: slots::SlotError,
    },
}

/// The state of the two copies of the table when the disk was opened.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    /// `None` when the copy is valid, otherwise why not.
    pub primary_error: Option<String>,
    pub backup_error: Option<String>,
    /// Both valid but their entries differ (a write was cut between the two
    /// copies). The primary wins.
    pub copies_differ: bool,
}

impl Health {
    pub fn is_clean(&self) -> bool {
        self.primary_error.is_none() && self.backup_error.is_none() && !self.copies_differ
    }
}

/// What [`Disk::prepare_host`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prepared {
    /// The new disk GUID, when the disk was pristine.
    pub new_identity: Option<Uuid>,
    /// Backup header LBA before and after.
    pub backup_moved: Option<(u64, u64)>,
    /// ROOT's size in bytes before and after.
    pub root_grown: Option<(u64, u64)>,
}

/// One partition entry, decoded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionInfo {
    pub number: u32,
    pub label: String,
    pub type_guid: Uuid,
    pub uuid: Uuid,
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
}

impl PartitionInfo {
    pub fn offset_bytes(&self) -> u64 {
        self.first_lba.saturating_mul(SECTOR)
    }
    /// Saturates instead of wrapping on an entry whose end lies before its
    /// start; [`Disk::check_nimbus_layout`] refuses such a table first.
    pub fn size_bytes(&self) -> u64 {
        (self.last_lba.saturating_add(1))
            .saturating_sub(self.first_lba)
            .saturating_mul(SECTOR)
    }
    pub fn prio(&self) -> slots::Prio {
        slots::Prio::from_bits(self.attributes)
    }
}

pub struct Disk<D: BlockDevice> {
    dev: D,
    path: PathBuf,
    gpt: GPT,
    health: Health,
    len: u64,
}

fn guid_bytes(u: Uuid) -> [u8; 16] {
    u.to_bytes_le()
}

fn guid(b: [u8; 16]) -> Uuid {
    Uuid::from_bytes_le(b)
}

/// Records what gptman writes so it can be replayed in a crash-safe order.
struct Capture {
    pos: u64,
    len: u64,
    writes: Vec<(u64, Vec<u8>)>,
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.writes.last_mut() {
            Some((off, data)) if *off + data.len() as u64 == self.pos => {
                data.extend_from_slice(buf)
            }
            _ => self.writes.push((self.pos, buf.to_vec())),
        }
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Capture {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.pos = match pos {
            SeekFrom::Start(p) => p,
            SeekFrom::End(d) => self.len.saturating_add_signed(d),
            SeekFrom::Current(d) => self.pos.saturating_add_signed(d),
        };
        Ok(self.pos)
    }
}

/// Read one copy of the table: header at `lba`, then its entries. Also checks
/// that the header says it lives where we found it, which gptman does not.
fn read_copy<D: Read + Seek>(dev: &mut D, lba: u64) -> Result<GPT, String> {
    dev.seek(SeekFrom::Start(lba * SECTOR))
        .map_err(|e| e.to_string())?;
    let header = gptman::GPTHeader::read_from(dev).map_err(|e| e.to_string())?;
    if header.primary_lba != lba {
        return Err(format!(
            "header at LBA {lba} claims to live at LBA {}",
            header.primary_lba
        ));
    }
    // Every GPT tool we interoperate with (sgdisk, cgpt, systemd-repart)
    // writes 128 entries of 128 bytes; anything else is not our disk.
    if header.size_of_partition_entry != 128 || header.number_of_partition_entries != 128 {
        return Err(format!(
            "unsupported entry array: {} entries of {} bytes",
            header.number_of_partition_entries, header.size_of_partition_entry
        ));
    }
    let partitions = header
        .read_partitions(dev, SECTOR)
        .map_err(|e| e.to_string())?;
    // gptman has no constructor from parts: make an empty 128-entry table on
    // a scratch buffer and fill it.
    let mut gpt = GPT::new_from(&mut io::Cursor::new(vec![0u8; 64 * 1024]), SECTOR, [0; 16])
        .map_err(|e| e.to_string())?;
    gpt.header = header;
    for (i, e) in partitions.into_iter().enumerate() {
        gpt[i as u32 + 1] = e;
    }
    gpt.align = layout::ALIGN / SECTOR;
    Ok(gpt)
}

impl<D: BlockDevice> Disk<D> {
    fn io(&self, source: io::Error) -> GptError {
        GptError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Write a fresh Nimbus GPT (protective MBR, both tables) on `dev`, whose
    /// length is the disk size. Partition GUIDs come from `uuids`, indexed
    /// like [`layout::PARTITIONS`], so builds can be reproducible.
    pub fn create(
        mut dev: D,
        path: impl Into<PathBuf>,
        usr_size: u64,
        disk_guid: Uuid,
        part_guid: impl Fn(&layout::PartitionSpec) -> Uuid,
        attributes: impl Fn(&layout::PartitionSpec) -> u64,
    ) -> Result<Disk<D>, GptError> {
        let path = path.into();
        let io_err = |source| GptError::Io {
            path: path.clone(),
            source,
        };
        let len = dev.seek(SeekFrom::End(0)).map_err(io_err)?;
        let plan: Vec<Placed> = layout::plan(len, usr_size).map_err(|source| GptError::Layout {
            path: path.clone(),
            source,
        })?;
        let mut gpt = GPT::new_from(&mut dev, SECTOR, guid_bytes(disk_guid)).map_err(|e| {
            GptError::Write {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        gpt.align = layout::ALIGN / SECTOR;
        for p in &plan {
            gpt[p.spec.number] = GPTPartitionEntry {
                partition_type_guid: guid_bytes(p.spec.type_guid),
                unique_partition_guid: guid_bytes(part_guid(&p.spec)),
                starting_lba: p.first_lba,
                ending_lba: p.last_lba,
                attribute_bits: attributes(&p.spec),
                partition_name: p.spec.label.into(),
            };
        }
        GPT::write_protective_mbr_into(&mut dev, SECTOR).map_err(|e| GptError::Write {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut disk = Disk {
            dev,
            path,
            gpt,
            health: Health {
                primary_error: None,
                backup_error: None,
                copies_differ: false,
            },
            len,
        };
        disk.commit()?;
        Ok(disk)
    }

    /// Read the table from `dev`. A damaged primary is reported in
    /// [`Disk::health`] and the backup is used; the next [`Disk::commit`]
    /// (or [`Disk::repair`]) rewrites both copies.
    pub fn open(mut dev: D, path: impl Into<PathBuf>) -> Result<Disk<D>, GptError> {
        let path = path.into();
        let len = dev.seek(SeekFrom::End(0)).map_err(|source| GptError::Io {
            path: path.clone(),
            source,
        })?;
        if len < (layout::GPT_HEAD_SECTORS + layout::GPT_TAIL_SECTORS) * SECTOR {
            return Err(GptError::NoValidTable {
                path,
                primary: format!("device is only {len} bytes"),
                backup: "not read".into(),
            });
        }
        let primary = read_copy(&mut dev, 1);
        let end = len / SECTOR - 1;
        let mut backup = read_copy(&mut dev, end);
        // A disk grown after the table was written (a bigger cloud volume,
        // `qemu-img resize`) has its backup where the primary says, not at
        // the new end: look there too.
        if let (Ok(p), Err(_)) = (&primary, &backup) {
            let alt = p.header.backup_lba;
            if alt != end && alt > 1 && alt < end {
                if let Ok(b) = read_copy(&mut dev, alt) {
                    backup = Ok(b);
                }
            }
        }
        let (gpt, health) = match (primary, backup) {
            (Ok(p), Ok(b)) => {
                let differ = p.iter().ne(b.iter())
                    || p.header.disk_guid != b.header.disk_guid
                    || p.header.backup_lba != b.header.primary_lba;
                (
                    p,
                    Health {
                        primary_error: None,
                        backup_error: None,
                        copies_differ: differ,
                    },
                )
            }
            (Ok(p), Err(be)) => (
                p,
                Health {
                    primary_error: None,
                    backup_error: Some(be),
                    copies_differ: false,
                },
            ),
            (Err(pe), Ok(b)) => (
                b,
                Health {
                    primary_error: Some(pe),
                    backup_error: None,
                    copies_differ: false,
                },
            ),
            (Err(primary), Err(backup)) => {
                return Err(GptError::NoValidTable {
                    path,
                    primary,
                    backup,
                })
            }
        };
        Ok(Disk {
            dev,
            path,
            gpt,
            health,
            len,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    pub fn disk_guid(&self) -> Uuid {
        guid(self.gpt.header.disk_guid)
    }

    pub fn device(&mut self) -> &mut D {
        &mut self.dev
    }

    pub fn into_device(self) -> D {
        self.dev
    }

    pub fn partitions(&self) -> Vec<PartitionInfo> {
        self.gpt
            .iter()
            .filter(|(_, e)| e.is_used())
            .map(|(n, e)| PartitionInfo {
                number: n,
                label: e.partition_name.as_str().to_string(),
                type_guid: guid(e.partition_type_guid),
                uuid: guid(e.unique_partition_guid),
                first_lba: e.starting_lba,
                last_lba: e.ending_lba,
                attributes: e.attribute_bits,
            })
            .collect()
    }

    pub fn partition(&self, number: u32) -> Result<PartitionInfo, GptError> {
        self.partitions()
            .into_iter()
            .find(|p| p.number == number)
            .ok_or_else(|| GptError::NoPartition {
                path: self.path.clone(),
                number,
            })
    }

    /// Rewrite both copies from the one in memory (fixes a damaged copy).
    pub fn repair(&mut self) -> Result<(), GptError> {
        self.check_nimbus_layout()?;
        self.commit()
    }

    /// Write the table: backup entries + header, sync, primary entries +
    /// header, sync.
    pub fn commit(&mut self) -> Result<(), GptError> {
        // Always write from a primary header, recomputing locations from the
        // device size: the in-memory table may have come from the backup.
        let mut gpt = self.gpt.clone();
        if gpt.header.primary_lba != 1 {
            gpt.header.backup_lba = gpt.header.primary_lba;
            gpt.header.primary_lba = 1;
            gpt.header.partition_entry_lba = 2;
        }
        let mut cap = Capture {
            pos: 0,
            len: self.len,
            writes: Vec::new(),
        };
        gpt.write_into(&mut cap).map_err(|e| GptError::Write {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let head_end = layout::GPT_HEAD_SECTORS * SECTOR;
        let (mut primary, mut backup): (Vec<_>, Vec<_>) =
            cap.writes.into_iter().partition(|(off, _)| *off < head_end);
        // Entries sit after the primary header and before the backup header:
        // writing the backup in ascending and the primary in descending offset
        // order puts each header down after its entries.
        backup.sort_by_key(|(off, _)| *off);
        primary.sort_by_key(|(off, _)| std::cmp::Reverse(*off));
        for group in [backup, primary] {
            for (off, data) in group {
                self.dev
                    .seek(SeekFrom::Start(off))
                    .and_then(|_| self.dev.write_all(&data))
                    .map_err(|e| self.io(e))?;
            }
            self.dev.sync().map_err(|e| self.io(e))?;
        }
        self.gpt = gpt;
        self.health = Health {
            primary_error: None,
            backup_error: None,
            copies_differ: false,
        };
        Ok(())
    }
}

/// Take the exclusive BSD lock on an open disk, waiting up to `wait`. The
/// lock lasts as long as the open file. See [`Disk::open_path`].
pub fn lock_exclusive(
    f: &std::fs::File,
    path: &Path,
    wait: std::time::Duration,
) -> Result<(), GptError> {
    use std::os::fd::AsRawFd;
    let io_err = |source| GptError::Io {
        path: path.to_path_buf(),
        source,
    };
    let t0 = std::time::Instant::now();
    loop {
        // SAFETY: flock on a descriptor the caller keeps open.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err(io_err(e));
        }
        if t0.elapsed() >= wait {
            return Err(io_err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "another writer has held the disk's lock for {} s; not writing",
                    wait.as_secs_f64().round()
                ),
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// How long a writer waits for another to release the disk.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Disk<std::fs::File> {
    /// Open a disk (image file or whole-disk node). A writable open takes an
    /// exclusive BSD lock on it for the life of the `Disk`, waiting up to
    /// [`LOCK_WAIT`]: update-engine, mark-good and stage 1's first-boot
    /// growth each read, modify and write the table, and must not
    /// interleave. It is the convention udev and systemd-repart honour (udev
    /// does not re-probe a locked disk).
    pub fn open_path(path: &Path, writable: bool) -> Result<Self, GptError> {
        Self::open_path_waiting(path, writable, LOCK_WAIT)
    }

    /// [`Disk::open_path`] with its own wait for the lock.
    pub fn open_path_waiting(
        path: &Path,
        writable: bool,
        wait: std::time::Duration,
    ) -> Result<Self, GptError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| GptError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if writable {
            lock_exclusive(&f, path, wait)?;
        }
        Disk::open(f, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MIB;

    fn fresh(size: u64) -> Disk<MemDisk> {
        let dev = MemDisk::new(size);
        Disk::create(
            dev,
            "mem",
            8 * MIB,
            Uuid::from_u128(1),
            |s| Uuid::from_u128(100 + u128::from(s.number)),
            |s| {
                if s.number == 3 {
                    slots::Prio {
                        priority: 1,
                        tries: 0,
                        successful: true,
                    }
                    .apply_to(0)
                } else {
                    0
                }
            },
        )
        .unwrap()
    }

    const SIZE: u64 = 3 * 1024 * MIB;

    fn poke(dev: &mut MemDisk, off: u64, data: &[u8]) {
        dev.seek(SeekFrom::Start(off)).unwrap();
        dev.write_all(data).unwrap();
    }

    fn peek(dev: &mut MemDisk, off: u64) -> u8 {
        let mut b = [0u8];
        dev.seek(SeekFrom::Start(off)).unwrap();
        dev.read_exact(&mut b).unwrap();
        b[0]
    }

    #[test]
    fn numbers_survive_create_and_reopen() {
        let d = fresh(SIZE);
        let dev = d.into_device();
        let d = Disk::open(dev, "mem").unwrap();
        let n: Vec<u32> = d.partitions().iter().map(|p| p.number).collect();
        assert_eq!(n, [1, 2, 3, 4, 6, 9]);
        assert!(d.health().is_clean());
        d.check_nimbus_layout().unwrap();
    }

    #[test]
    fn zeroed_primary_falls_back_to_backup_and_repairs() {
        let mut dev = fresh(SIZE).into_device();
        poke(&mut dev, 512, &[0; 512]);
        let mut d = Disk::open(dev, "mem").unwrap();
        assert!(d.health().primary_error.is_some());
        assert_eq!(d.partitions().len(), 6);
        d.repair().unwrap();
        let d = Disk::open(d.into_device(), "mem").unwrap();
        assert!(d.health().is_clean());
    }

    #[test]
    fn bad_crc_in_primary_entries_is_detected() {
        let mut dev = fresh(SIZE).into_device();
        let off = 1024 + 2 * 128 + 56; // name of entry 3
        let b = peek(&mut dev, off);
        poke(&mut dev, off, &[b ^ 0xff]);
        let d = Disk::open(dev, "mem").unwrap();
        assert!(d.health().primary_error.as_deref().unwrap().contains("CRC"));
        assert_eq!(d.partition(3).unwrap().label, "USR-A");
    }

    #[test]
    fn both_copies_gone_is_an_error_naming_the_disk() {
        let mut dev = fresh(SIZE).into_device();
        poke(&mut dev, 512, &[0; 512]);
        poke(&mut dev, SIZE - 512, &[0; 512]);
        let err = Disk::open(dev, "/dev/fake").err().unwrap();
        assert!(
            err.to_string().starts_with("/dev/fake: no valid GPT"),
            "{err}"
        );
    }

    /// A device that loses power after `budget` bytes: the write that crosses
    /// the budget lands only partly (a torn sector), later ones not at all.
    struct PowerCut {
        inner: MemDisk,
        budget: usize,
    }

    impl Read for PowerCut {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.inner.read(buf)
        }
    }
    impl Seek for PowerCut {
        fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
            self.inner.seek(pos)
        }
    }
    impl Write for PowerCut {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.budget);
            self.inner.write_all(&buf[..n])?;
            self.budget -= n;
            // Report success either way: a power cut is not an error the
            // writer sees.
            self.inner.seek(SeekFrom::Current((buf.len() - n) as i64))?;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl BlockDevice for PowerCut {
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn grown_pristine() -> MemDisk {
        let dev = MemDisk::new(SIZE);
        let d = Disk::create(
            dev,
            "mem",
            8 * MIB,
            layout::PRISTINE_DISK_GUID,
            |s| Uuid::from_u128(100 + u128::from(s.number)),
            |_| 0,
        )
        .unwrap();
        let mut dev = d.into_device();
        dev.set_len(2 * SIZE);
        dev
    }

    #[test]
    fn backup_is_found_where_the_primary_says_on_a_grown_disk() {
        let dev = grown_pristine();
        let d = Disk::open(dev.clone(), "mem").unwrap();
        assert!(d.health().is_clean(), "{:?}", d.health());
        // The backup at the old end damaged: reported, not silently ignored.
        let mut dev = d.into_device();
        poke(&mut dev, SIZE - SECTOR + 8, &[0xff; 4]);
        let d = Disk::open(dev, "mem").unwrap();
        assert!(d.health().backup_error.is_some(), "{:?}", d.health());
    }

    #[test]
    fn first_boot_moves_the_backup_grows_root_and_makes_guids_unique_once() {
        let dev = grown_pristine();
        let mut d = Disk::open(dev, "mem").unwrap();
        let before = d.partitions();
        let mut n = 1000u128;
        let p = d
            .prepare_host(|| {
                n += 1;
                Uuid::from_u128(n)
            })
            .unwrap();
        assert_eq!(p.new_identity, Some(Uuid::from_u128(1001)));
        assert_eq!(
            p.backup_moved,
            Some((SIZE / SECTOR - 1, 2 * SIZE / SECTOR - 1))
        );
        let (old, new) = p.root_grown.unwrap();
        assert_eq!(new - old, SIZE);
        let d2 = Disk::open(d.into_device(), "mem").unwrap();
        assert!(d2.health().is_clean(), "{:?}", d2.health());
        assert_eq!(d2.disk_guid(), Uuid::from_u128(1001));
        let after = d2.partitions();
        for (b, a) in before.iter().zip(&after) {
            let unique = layout::HOST_UNIQUE_PARTITIONS.contains(&b.number);
            assert_eq!(b.uuid != a.uuid, unique, "partition {}", b.number);
            assert_eq!(b.first_lba, a.first_lba);
            assert_eq!(b.last_lba == a.last_lba, b.number != layout::ROOT_PARTITION);
        }
        let root = d2.partition(layout::ROOT_PARTITION).unwrap();
        assert_eq!((root.last_lba + 1) % (layout::ALIGN / SECTOR), 0);
        assert!(root.last_lba < 2 * SIZE / SECTOR - layout::GPT_TAIL_SECTORS);
        // Idempotent: nothing to do, nothing written.
        let mut d3 = d2;
        let image = d3.dev.clone();
        assert_eq!(
            d3.prepare_host(|| panic!("no new GUID")).unwrap(),
            Prepared::default()
        );
        assert!(d3.dev.blocks == image.blocks);
    }

    #[test]
    fn a_shrunken_disk_is_not_touched() {
        let mut dev = grown_pristine();
        dev.set_len(SIZE / 2);
        if let Ok(mut d) = Disk::open(dev, "mem") {
            assert!(d.prepare_host(Uuid::new_v4).is_err());
        }
    }

    #[test]
    fn every_cut_point_of_first_boot_leaves_old_or_new_table() {
        let base = grown_pristine();
        let old = Disk::open(base.clone(), "mem").unwrap().partitions();
        let mut nd = Disk::open(base.clone(), "mem").unwrap();
        let mut n = 0u128;
        let next = move || {
            n += 1;
            Uuid::from_u128(5000 + n)
        };
        nd.prepare_host(next).unwrap();
        let new = nd.partitions();
        let total = 2 * (16 * 1024 + 512);
        let mut outcomes = [0usize; 2];
        for budget in (0..=total).step_by(29) {
            let mut d = Disk::open(
                PowerCut {
                    inner: base.clone(),
                    budget,
                },
                "mem",
            )
            .unwrap();
            d.prepare_host(next).unwrap();
            let after = d.into_device().inner;
            let mut d = Disk::open(after, "mem")
                .unwrap_or_else(|e| panic!("cut at {budget}: unreadable: {e}"));
            d.check_nimbus_layout().unwrap();
            let t = d.partitions();
            if t == old {
                outcomes[0] += 1;
            } else if t == new {
                outcomes[1] += 1;
            } else {
                panic!("cut at {budget}: mixed table {t:?}");
            }
            // The next boot finishes the job.
            d.prepare_host(next).unwrap();
            d.update_slots(|_| Ok(())).unwrap();
            let d = Disk::open(d.into_device(), "mem").unwrap();
            assert!(d.health().is_clean(), "cut at {budget}: {:?}", d.health());
            let r = d.partition(layout::ROOT_PARTITION).unwrap();
            assert_eq!(
                r.last_lba,
                new.iter().find(|p| p.number == 9).unwrap().last_lba
            );
            assert_ne!(d.disk_guid(), layout::PRISTINE_DISK_GUID);
        }
        assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
    }

    /// Rewrite partition entry `n` (start, end) in both copies of the table
    /// with valid CRCs: what a hostile or buggy tool could leave.
    fn forge(dev: &mut MemDisk, n: usize, first: u64, last: u64) {
        let last_lba = dev.len() / SECTOR - 1;
        for (hdr, ent) in [(1, 2), (last_lba, last_lba - 32)] {
            let mut e = vec![0u8; 128 * 128];
            dev.seek(SeekFrom::Start(ent * SECTOR)).unwrap();
            dev.read_exact(&mut e).unwrap();
            let o = (n - 1) * 128;
            e[o + 32..o + 40].copy_from_slice(&first.to_le_bytes());
            e[o + 40..o + 48].copy_from_slice(&last.to_le_bytes());
            poke(dev, ent * SECTOR, &e);
            let mut h = [0u8; 92];
            dev.seek(SeekFrom::Start(hdr * SECTOR)).unwrap();
            dev.read_exact(&mut h).unwrap();
            h[88..92].copy_from_slice(&crc32fast::hash(&e).to_le_bytes());
            h[16..20].copy_from_slice(&[0; 4]);
            let crc = crc32fast::hash(&h);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            poke(dev, hdr * SECTOR, &h);
        }
    }

    #[test]
    fn extents_are_validated_before_any_write() {
        let base = fresh(SIZE);
        let p = |n| base.partition(n).unwrap();
        let (b, root, oem) = (p(4), p(9), p(6));
        let last_usable = base.gpt.header.last_usable_lba;
        let base = base.into_device();
        for (n, first, last, want) in [
            // USR-B reaching into ROOT: an update would write over ROOT.
            (4, b.first_lba, root.first_lba + 10, "overlap"),
            (4, b.first_lba, b.last_lba - 2048, "same size"),
            (9, root.first_lba, last_usable + 1, "outside the usable"),
            (6, oem.first_lba, oem.first_lba - 1, "outside the usable"),
        ] {
            let mut dev = base.clone();
            forge(&mut dev, n, first, last);
            let mut d = Disk::open(dev, "mem").unwrap();
            assert!(d.health().is_clean(), "the forged table is CRC-valid");
            let before = d.dev.clone();
            let e = d
                .update_slots(|t| slots::prioritize(t, 4))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{n}: {e}");
            assert!(d.dev.blocks == before.blocks, "written despite: {e}");
            assert!(d.prepare_host(Uuid::new_v4).is_err());
            // Sizes never wrap, even on such an entry.
            for p in d.partitions() {
                let _ = (p.offset_bytes(), p.size_bytes());
            }
        }
    }

    #[test]
    fn writers_take_turns_on_the_disk_lock() {
        use std::os::fd::AsRawFd;
        use std::time::Duration;
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&img)
            .unwrap();
        f.set_len(SIZE).unwrap();
        Disk::create(
            f,
            &img,
            8 * MIB,
            Uuid::from_u128(1),
            |_| Uuid::new_v4(),
            |_| 0,
        )
        .unwrap();
        let held = Disk::open_path(&img, true).unwrap();
        // A second writer waits, then gives up with a clear error.
        let e = Disk::open_path_waiting(&img, true, Duration::from_millis(200))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("lock"), "{e}");
        // Readers are not blocked.
        Disk::open_path(&img, false).unwrap();
        // Once the first lets go, the second gets in.
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
        });
        let d2 = Disk::open_path_waiting(&img, true, Duration::from_secs(10)).unwrap();
        t.join().unwrap();
        let probe = std::fs::File::open(&img).unwrap();
        // SAFETY: probing the lock on a fresh fd of the same file.
        let rc = unsafe { libc::flock(probe.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_ne!(rc, 0, "the second writer holds the lock");
        drop(d2);
    }

    #[test]
    fn every_cut_point_leaves_old_or_new_table() {
        let base = fresh(SIZE).into_device();
        let old = Disk::open(base.clone(), "mem").unwrap().slot_table();
        let mut new_disk = Disk::open(base.clone(), "mem").unwrap();
        new_disk.update_slots(|t| slots::prioritize(t, 4)).unwrap();
        let new = new_disk.slot_table();
        assert_ne!(old, new);
        // The whole write is 2 x (16 KiB entries + 512 B header); cut every
        // 37 bytes, which tears sectors and entries at many different offsets.
        let total = 2 * (16 * 1024 + 512);
        let mut outcomes = [0usize; 2];
        for budget in (0..=total).step_by(37) {
            let dev = PowerCut {
                inner: base.clone(),
                budget,
            };
            let mut d = Disk::open(dev, "mem").unwrap();
            d.update_slots(|t| slots::prioritize(t, 4)).unwrap();
            let after = d.into_device().inner;
            let d = Disk::open(after, "mem")
                .unwrap_or_else(|e| panic!("cut at {budget}: unreadable: {e}"));
            d.check_nimbus_layout().unwrap();
            let t = d.slot_table();
            if t == old {
                outcomes[0] += 1;
            } else if t == new {
                outcomes[1] += 1;
            } else {
                panic!("cut at {budget}: mixed table {t:?}");
            }
            // Whatever landed, the boot rule still finds a slot.
            assert!(slots::select_for_boot(&mut t.clone(), &[]).is_some());
        }
        assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
    }

    #[test]
    fn foreign_layout_is_not_written() {
        let mut d = fresh(SIZE);
        d.gpt[4].partition_name = "DATA".into();
        d.commit().unwrap();
        let before = d.into_device();
        let mut d = Disk::open(before.clone(), "mem").unwrap();
        let err = d.update_slots(|t| slots::prioritize(t, 4)).unwrap_err();
        assert!(matches!(err, GptError::NotNimbus { .. }), "{err}");
        assert!(d.into_device().blocks == before.blocks);
    }
}
