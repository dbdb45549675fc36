//! The Nimbus partition table as data (docs/architecture.md, "layout").
//!
//! Partition numbers have gaps on purpose (5, 7 and 8 are absent): they are the
//! CoreOS/Flatcar numbers, and tools on installed hosts find partitions by them.

use uuid::{uuid, Uuid};

pub const SECTOR: u64 = 512;
pub const MIB: u64 = 1024 * 1024;
/// Partitions start on 1 MiB boundaries.
pub const ALIGN: u64 = MIB;

/// The disk GUID every image is built with (Flatcar's convention): a disk
/// still carrying it has never booted. Stage 1 then gives the disk and
/// [`HOST_UNIQUE_PARTITIONS`] fresh random GUIDs, so two hosts made from one
/// image, or a host and a pristine copy attached to it, can be told apart.
pub const PRISTINE_DISK_GUID: Uuid = uuid!("00000000-0000-0000-0000-000000000001");

/// Partitions whose GUID becomes per-host at first boot: the ESP (its
/// PARTUUID is how the loaders name the boot disk to stage 1), OEM and
/// ROOT. The USR slots keep theirs: update payloads and the boot command
/// line refer to them, and `nimbus.disk=` disambiguates.
pub const HOST_UNIQUE_PARTITIONS: [u32; 3] = [1, 6, 9];

/// ROOT, the partition that grows to fill a larger disk.
pub const ROOT_PARTITION: u32 = 9;
/// The EFI system partition: stage 1, loader files, trust rotations.
pub const ESP_PARTITION: u32 = 1;
/// Sectors a GPT needs at each end: MBR + header + 32 sectors of entries at the
/// start, entries + header at the end.
pub const GPT_HEAD_SECTORS: u64 = 34;
pub const GPT_TAIL_SECTORS: u64 = 33;

pub const ESP_TYPE: Uuid = uuid!("C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
pub const BIOS_BOOT_TYPE: Uuid = uuid!("21686148-6449-6E6F-744E-656564454649");
pub const USR_TYPE: Uuid = uuid!("5DFBF5F4-2848-4BAC-AA5E-0D9A20B745A6");
pub const LINUX_DATA_TYPE: Uuid = uuid!("0FC63DAF-8483-4772-8E79-3D69D8477DE4");
pub const COREOS_ROOT_TYPE: Uuid = uuid!("3884DD41-8582-4404-B9A8-E9B84F2DF50E");

/// How big a partition is in a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeRule {
    /// Always this many bytes.
    Fixed(u64),
    /// The build's USR size parameter (both USR slots get the same size).
    Usr,
    /// Everything left at the end of the disk, at least this many bytes.
    Rest { min: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Fat32,
    BiosBoot,
    /// erofs + dm-verity tree + slot descriptor.
    UsrSlot,
    Ext4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionSpec {
    pub number: u32,
    pub label: &'static str,
    pub type_guid: Uuid,
    pub size: SizeRule,
    pub content: Content,
}

pub const DEFAULT_USR_SIZE: u64 = 1024 * MIB;
pub const MIN_ROOT_SIZE: u64 = 512 * MIB;

/// The table, in on-disk order (which is also partition-number order).
pub const PARTITIONS: [PartitionSpec; 6] = [
    PartitionSpec {
        number: 1,
        label: "EFI-SYSTEM",
        type_guid: ESP_TYPE,
        size: SizeRule::Fixed(128 * MIB),
        content: Content::Fat32,
    },
    PartitionSpec {
        number: 2,
        label: "BIOS-BOOT",
        type_guid: BIOS_BOOT_TYPE,
        size: SizeRule::Fixed(2 * MIB),
        content: Content::BiosBoot,
    },
    PartitionSpec {
        number: 3,
        label: "USR-A",
        type_guid: USR_TYPE,
        size: SizeRule::Usr,
        content: Content::UsrSlot,
    },
    PartitionSpec {
        number: 4,
        label: "USR-B",
        type_guid: USR_TYPE,
        size: SizeRule::Usr,
        content: Content::UsrSlot,
    },
    PartitionSpec {
        number: 6,
        label: "OEM",
        type_guid: LINUX_DATA_TYPE,
        size: SizeRule::Fixed(128 * MIB),
        content: Content::Ext4,
    },
    PartitionSpec {
        number: 9,
        label: "ROOT",
        type_guid: COREOS_ROOT_TYPE,
        size: SizeRule::Rest { min: MIN_ROOT_SIZE },
        content: Content::Ext4,
    },
];

/// The two USR slots by name. The protocol itself works on partition numbers;
/// this is the operator-facing name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    pub fn partition_number(self) -> u32 {
        match self {
            Slot::A => 3,
            Slot::B => 4,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Slot::A => "USR-A",
            Slot::B => "USR-B",
        }
    }

    pub fn from_partition_number(n: u32) -> Option<Slot> {
        match n {
            3 => Some(Slot::A),
            4 => Some(Slot::B),
            _ => None,
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl std::str::FromStr for Slot {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "A" | "USR-A" | "3" => Ok(Slot::A),
            "B" | "USR-B" | "4" => Ok(Slot::B),
            _ => Err(format!("unknown slot {s:?}: expected A or B")),
        }
    }
}

pub fn spec(number: u32) -> Option<&'static PartitionSpec> {
    PARTITIONS.iter().find(|p| p.number == number)
}

/// One partition placed on a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub spec: PartitionSpec,
    pub first_lba: u64,
    /// Inclusive, as in GPT.
    pub last_lba: u64,
}

impl Placed {
    pub fn size_bytes(&self) -> u64 {
        (self.last_lba - self.first_lba + 1) * SECTOR
    }
    pub fn offset_bytes(&self) -> u64 {
        self.first_lba * SECTOR
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("USR size {usr_size} bytes is not a positive multiple of 1 MiB")]
    UsrSize { usr_size: u64 },
    #[error(
        "disk of {disk_size} bytes is too small for the Nimbus layout: it needs at least {needed} bytes \
         ({} MiB) with USR slots of {usr_size} bytes",
        needed.div_ceil(MIB)
    )]
    DiskTooSmall {
        disk_size: u64,
        needed: u64,
        usr_size: u64,
    },
    #[error("disk size {disk_size} is not a multiple of the {SECTOR}-byte sector")]
    Unaligned { disk_size: u64 },
}

/// The smallest disk that holds the layout with this USR size.
pub fn min_disk_size(usr_size: u64) -> u64 {
    let fixed: u64 = PARTITIONS
        .iter()
        .map(|p| match p.size {
            SizeRule::Fixed(b) => b,
            SizeRule::Usr => usr_size,
            SizeRule::Rest { min } => min,
        })
        .sum();
    // The first partition starts at 1 MiB, and ROOT ends on a MiB boundary
    // before the backup GPT, which costs one more MiB at the tail.
    ALIGN + fixed + ALIGN
}

/// Place every partition on a disk of `disk_size` bytes.
pub fn plan(disk_size: u64, usr_size: u64) -> Result<Vec<Placed>, PlanError> {
    if usr_size == 0 || !usr_size.is_multiple_of(MIB) {
        return Err(PlanError::UsrSize { usr_size });
    }
    if !disk_size.is_multiple_of(SECTOR) {
        return Err(PlanError::Unaligned { disk_size });
    }
    let needed = min_disk_size(usr_size);
    if disk_size < needed {
        return Err(PlanError::DiskTooSmall {
            disk_size,
            needed,
            usr_size,
        });
    }
    let last_usable = disk_size / SECTOR - GPT_TAIL_SECTORS - 1;
    let mut next = ALIGN / SECTOR;
    let mut out = Vec::with_capacity(PARTITIONS.len());
    for spec in PARTITIONS {
        let first = next;
        let last = match spec.size {
            SizeRule::Fixed(b) => first + b / SECTOR - 1,
            SizeRule::Usr => first + usr_size / SECTOR - 1,
            // ROOT ends on the last whole MiB before the backup GPT so that a
            // later grow-to-disk keeps alignment.
            SizeRule::Rest { .. } => {
                let end_aligned = ((last_usable + 1) * SECTOR / ALIGN) * ALIGN / SECTOR;
                end_aligned - 1
            }
        };
        out.push(Placed {
            spec,
            first_lba: first,
            last_lba: last,
        });
        next = last + 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_their_gaps() {
        let n: Vec<u32> = PARTITIONS.iter().map(|p| p.number).collect();
        assert_eq!(n, [1, 2, 3, 4, 6, 9]);
    }

    #[test]
    fn plan_is_aligned_and_contiguous() {
        let disk = 3 * 1024 * MIB;
        let p = plan(disk, 256 * MIB).unwrap();
        for w in p.windows(2) {
            assert_eq!(w[0].last_lba + 1, w[1].first_lba);
        }
        for x in &p {
            assert_eq!(x.offset_bytes() % ALIGN, 0, "{} misaligned", x.spec.label);
            assert_eq!(x.size_bytes() % ALIGN, 0, "{} size", x.spec.label);
        }
        assert_eq!(p[2].size_bytes(), 256 * MIB);
        assert_eq!(p[3].size_bytes(), 256 * MIB);
        let root = p.last().unwrap();
        assert!(root.last_lba < disk / SECTOR - GPT_TAIL_SECTORS);
        assert!(root.size_bytes() >= MIN_ROOT_SIZE);
    }

    #[test]
    fn minimum_disk_fits_exactly() {
        let usr = 64 * MIB;
        let min = min_disk_size(usr);
        let p = plan(min, usr).unwrap();
        assert_eq!(p.last().unwrap().size_bytes(), MIN_ROOT_SIZE);
        assert!(matches!(
            plan(min - SECTOR, usr),
            Err(PlanError::DiskTooSmall { .. })
        ));
    }

    #[test]
    fn bad_usr_size() {
        assert_eq!(
            plan(4 << 30, 1000),
            Err(PlanError::UsrSize { usr_size: 1000 })
        );
    }
}
