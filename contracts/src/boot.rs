//! Boot-time helpers shared by the stage-1/stage-2 `/init` and the
//! mark-good command: finding the Nimbus disk, the verity table of a slot,
//! and the kernel command line contract between the two stages.

use std::path::PathBuf;

/// The command line every loader gives stage 1 (GRUB, systemd-boot's
/// entries, `xtask qemu --firmware direct`), before the loader's own
/// `nimbus.esp=` / `nimbus.stage1=`: VGA and serial consoles, and a panic
/// resets the machine (so a stage 1 that cannot start falls back).
pub const KERNEL_CMDLINE: &str = "console=tty0 console=ttyS0,115200 panic=-1";

use crate::release::{SlotDescriptor, VERITY_BLOCK};

/// Stage 1's last console line starts with this, then the milliseconds it
/// took and [`HANDED_TO_KEXEC`] or [`HANDED_IN_PLACE`]; the smoke and
/// `xtask bench boot` match these to tell which way a boot went.
pub const STAGE1_DONE: &str = "nimbus-init: stage 1 done in";
/// Stage 1 kexecs the chosen slot's kernel; followed by the slot's name.
pub const HANDED_TO_KEXEC: &str = "starting the kernel of";
/// Stage 1 goes on as the slot's stage 2 in its own kernel: the slot ships
/// the very kernel and initramfs the loader started.
pub const HANDED_IN_PLACE: &str = "stage 2 goes on here, no kexec";

/// The command line of the running system as the stages agreed it: stage
/// 1's hand-over (`nimbus.usr=`, `nimbus.usrhash=`, `nimbus.disk=`,
/// `nimbus.trust=`, `nimbus.stage1=`) is the kexec'd kernel's own command
/// line, or, when stage 1 continued as stage 2 in its own kernel,
/// [`crate::paths::BOOT_CMDLINE`] under `root`. Every reader of the
/// hand-over (update-engine, mark-good, updatectl's status) goes through
/// this, so neither way of booting is special anywhere else.
pub fn booted_cmdline(root: &std::path::Path) -> std::io::Result<String> {
    match std::fs::read_to_string(root.join(crate::paths::BOOT_CMDLINE)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::read_to_string("/proc/cmdline")
        }
        r => r,
    }
}

/// `nimbus.usr=PARTUUID=<uuid>` and `nimbus.usrhash=<root>` from a command
/// line: what stage-1 hands to stage-2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage2Args {
    pub partuuid: uuid::Uuid,
    pub root_hash: String,
    /// `nimbus.disk=<disk GUID>`: the disk stage 1 booted from. Several
    /// disks can hold a USR partition with the same PARTUUID (a pristine
    /// copy of the image attached for rescue), never with the same disk
    /// GUID once the first boot gave the boot disk its own.
    pub disk: Option<uuid::Uuid>,
}

pub fn parse_cmdline(cmdline: &str) -> Option<Stage2Args> {
    let mut partuuid = None;
    let mut root_hash = None;
    let mut disk = None;
    for w in cmdline.split_whitespace() {
        if let Some(v) = w.strip_prefix("nimbus.usr=PARTUUID=") {
            partuuid = v.parse().ok();
        } else if let Some(v) = w.strip_prefix("nimbus.usrhash=") {
            root_hash = Some(v.to_string());
        } else if let Some(v) = w.strip_prefix("nimbus.disk=") {
            disk = v.parse().ok();
        }
    }
    Some(Stage2Args {
        partuuid: partuuid?,
        root_hash: root_hash?,
        disk,
    })
}

/// Why [`boot_loop`] found nothing to boot.
#[derive(Debug, thiserror::Error)]
pub enum BootLoopError {
    #[error("no bootable USR slot left (refused in this boot: {refused:?})")]
    NoSlot { refused: Vec<u32> },
    #[error("slot selection: {0}")]
    Gpt(#[from] crate::gpt::GptError),
}

/// The boot rule as stage 1 runs it, shared with the power-cut harness so
/// that the harness checks the very loop that boots hosts: select the slot
/// (persisting the tries decrement), try it (`try_slot`: verify the
/// descriptor, map and mount it, load its kernel); a slot that fails is
/// reported to `refused` and excluded, and the next one is selected in the
/// same boot. Returns the choice, what `try_slot` made of it, and the
/// partitions refused on the way.
pub fn boot_loop<D: crate::gpt::BlockDevice, V>(
    disk: &mut crate::gpt::Disk<D>,
    mut try_slot: impl FnMut(&mut crate::gpt::Disk<D>, &crate::slots::Choice) -> Result<V, String>,
    mut refused: impl FnMut(&crate::slots::Choice, &str),
) -> Result<(crate::slots::Choice, V, Vec<u32>), BootLoopError> {
    let mut excluded: Vec<u32> = Vec::new();
    loop {
        let choice = disk
            .update_slots(|t| Ok(crate::slots::select_for_boot(t, &excluded)))?
            .ok_or_else(|| BootLoopError::NoSlot {
                refused: excluded.clone(),
            })?;
        match try_slot(disk, &choice) {
            Ok(v) => return Ok((choice, v, excluded)),
            Err(why) => {
                refused(&choice, &why);
                excluded.push(choice.number);
            }
        }
    }
}

/// `nimbus.esp=PARTUUID=<uuid>`: the ESP the boot loader read stage 1 from
/// (GRUB's `probe --part-uuid` under BIOS; systemd-boot's
/// LoaderDevicePartUUID under UEFI is read from efivarfs instead).
pub fn esp_hint(cmdline: &str) -> Option<uuid::Uuid> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("nimbus.esp=PARTUUID="))
        .and_then(|v| v.parse().ok())
}

/// One disk with a Nimbus layout, as the boot-disk choice sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskId {
    /// Kernel name ("vda").
    pub name: String,
    pub disk_guid: uuid::Uuid,
    /// PARTUUID of partition 1 (the ESP).
    pub esp: Option<uuid::Uuid>,
    /// PARTUUIDs of the USR partitions.
    pub usr: Vec<uuid::Uuid>,
}

fn one<'a>(found: Vec<&'a DiskId>, what: &str) -> Result<&'a DiskId, String> {
    match found.as_slice() {
        [d] => Ok(d),
        [] => Err(format!("no disk {what}")),
        many => Err(format!(
            "{} disks {what} ({}): identical copies of one disk; refusing to guess",
            many.len(),
            many.iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Stage 1: the disk the loader read us from. With a hint (the ESP's
/// PARTUUID) only that disk; without one (direct kernel boot), the only
/// Nimbus disk. A hint that matches nothing falls back to the only disk:
/// a power cut in the first boot's GUID change can leave the loader and
/// us reading different copies of the table. Never by name order.
pub fn pick_boot_disk(disks: &[DiskId], esp_hint: Option<uuid::Uuid>) -> Result<&DiskId, String> {
    if let Some(h) = esp_hint {
        let m: Vec<&DiskId> = disks.iter().filter(|d| d.esp == Some(h)).collect();
        if !m.is_empty() || disks.len() != 1 {
            return one(m, &format!("with an ESP of PARTUUID {h}"));
        }
    }
    one(disks.iter().collect(), "with a Nimbus layout")
}

/// Stage 2, mark-good and update-engine: the disk holding the booted USR
/// partition, and when stage 1 said which disk it was, that disk only.
pub fn pick_running_disk<'a>(disks: &'a [DiskId], args: &Stage2Args) -> Result<&'a DiskId, String> {
    let m: Vec<&DiskId> = disks
        .iter()
        .filter(|d| d.usr.contains(&args.partuuid) && args.disk.is_none_or(|g| g == d.disk_guid))
        .collect();
    let what = match args.disk {
        Some(g) => format!("with GUID {g} and a USR partition {}", args.partuuid),
        None => format!("with a USR partition {}", args.partuuid),
    };
    one(m, &what)
}

/// Every whole disk under `/sys/block` with a Nimbus layout, opened
/// read-only. Loop, RAM, device-mapper and optical devices are skipped.
/// Partition `n` of block device `disk` (a name under /sys/block): its
/// `major:minor` and its /dev node, found through sysfs, so it works for
/// vda1, nvme0n1p1 and loop0p1 alike.
pub fn partition_device(disk: &str, n: u32) -> Result<(String, PathBuf), String> {
    let dir = format!("/sys/block/{disk}");
    for e in std::fs::read_dir(&dir)
        .map_err(|e| format!("{dir}: {e}"))?
        .flatten()
    {
        let p = e.path();
        if std::fs::read_to_string(p.join("partition"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            == Some(n)
        {
            let dev = std::fs::read_to_string(p.join("dev"))
                .map_err(|e| format!("{}: {e}", p.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            return Ok((
                dev.trim().to_string(),
                PathBuf::from(format!("/dev/{name}")),
            ));
        }
    }
    Err(format!("{disk} has no partition {n} in sysfs"))
}

pub fn scan_disks() -> Vec<DiskId> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if ["loop", "ram", "dm-", "zram", "sr"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let path = std::path::PathBuf::from(format!("/dev/{name}"));
        let Ok(d) = crate::gpt::Disk::open_path(&path, false) else {
            continue;
        };
        if d.check_nimbus_layout().is_err() {
            continue;
        }
        out.push(DiskId {
            esp: d.partition(1).ok().map(|p| p.uuid),
            usr: crate::layout::Slot::ALL
                .iter()
                .filter_map(|s| d.partition(s.partition_number()).ok().map(|p| p.uuid))
                .collect(),
            disk_guid: d.disk_guid(),
            name,
        });
    }
    out
}

/// Where `nimbus-init mark-good` records a failed health check, relative to
/// the root: on ROOT, so the slot that boots next (the fallback) can read
/// why the one before it was given up. update-engine consumes it.
pub const HEALTH_FAILURE_PATH: &str = crate::paths::HEALTH_FAILURE;

/// A failed boot-health check on an unproven slot: the contract between
/// mark-good, which writes it before rebooting, and update-engine, which
/// reports it as the reason for the rollback.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthFailure {
    /// GPT partition number of the slot that failed.
    pub partition: u32,
    pub partuuid: uuid::Uuid,
    /// The version its descriptor named ("unknown" when unreadable).
    pub version: String,
    /// What failed, in words: "required unit foo.service is failed (exit-code)".
    pub reason: String,
    /// Unix seconds.
    pub at: i64,
}

impl HealthFailure {
    pub fn to_json(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).unwrap_or_default();
        b.push(b'\n');
        b
    }

    pub fn parse(b: &[u8]) -> Result<HealthFailure, serde_json::Error> {
        serde_json::from_slice(b)
    }
}

/// The device-mapper table line for a slot whose data and hash tree share
/// one device (`dev` as "major:minor").
pub fn verity_table(d: &SlotDescriptor, dev: &str) -> (u64, String) {
    let block = u64::from(VERITY_BLOCK);
    let data_blocks = d.data_size / block;
    let sectors = d.data_size / 512;
    let table = format!(
        "1 {dev} {dev} {block} {block} {data_blocks} {} sha256 {} {}",
        d.hash_offset / block,
        hex::encode(d.verity_root),
        hex::encode(d.verity_salt)
    );
    (sectors, table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hand_over_file_stands_for_the_command_line_when_stage_2_ran_in_place() {
        let t = tempfile::tempdir().unwrap();
        let proc = std::fs::read_to_string("/proc/cmdline").unwrap();
        assert_eq!(booted_cmdline(t.path()).unwrap(), proc);
        let f = t.path().join(crate::paths::BOOT_CMDLINE);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        let g = uuid::Uuid::from_u128(9);
        std::fs::write(
            &f,
            format!("console=ttyS0 nimbus.disk={g} nimbus.usr=PARTUUID={g} nimbus.usrhash=ab nimbus.stage1=b\n"),
        )
        .unwrap();
        let c = booted_cmdline(t.path()).unwrap();
        let a = parse_cmdline(&c).unwrap();
        assert_eq!((a.partuuid, a.disk), (g, Some(g)));
        assert_eq!(crate::esp::running_copy(&c), Some(crate::esp::Copy::B));
        // Unreadable (a directory in its place): an error, not /proc/cmdline.
        std::fs::remove_file(&f).unwrap();
        std::fs::create_dir(&f).unwrap();
        assert!(booted_cmdline(t.path()).is_err());
    }

    #[test]
    fn cmdline_roundtrip() {
        let a = parse_cmdline("console=ttyS0 nimbus.usr=PARTUUID=6052f078-ef0c-5bb9-b832-df3670f381a3 nimbus.usrhash=ab quiet").unwrap();
        assert_eq!(a.root_hash, "ab");
        assert_eq!(
            a.partuuid.to_string(),
            "6052f078-ef0c-5bb9-b832-df3670f381a3"
        );
        assert_eq!(parse_cmdline("console=ttyS0"), None);
        assert_eq!(a.disk, None);
        let g = "0f0e0d0c-0b0a-4908-8706-050403020100";
        let b = parse_cmdline(&format!(
            "nimbus.usr=PARTUUID=6052f078-ef0c-5bb9-b832-df3670f381a3 nimbus.usrhash=ab nimbus.disk={g}"
        ))
        .unwrap();
        assert_eq!(b.disk.unwrap().to_string(), g);
        assert_eq!(
            esp_hint(&format!("x nimbus.esp=PARTUUID={g}"))
                .unwrap()
                .to_string(),
            g
        );
        assert_eq!(esp_hint("nimbus.esp=PARTUUID=nonsense"), None);
    }

    fn disk(name: &str, guid: u128, esp: u128, usr: u128) -> DiskId {
        DiskId {
            name: name.into(),
            disk_guid: uuid::Uuid::from_u128(guid),
            esp: Some(uuid::Uuid::from_u128(esp)),
            usr: vec![uuid::Uuid::from_u128(usr), uuid::Uuid::from_u128(usr + 1)],
        }
    }

    #[test]
    fn boot_loop_moves_on_from_a_refused_slot_and_spends_its_try() {
        use crate::gpt::{Disk, MemDisk};
        use crate::slots::Prio;
        let mut d = Disk::create(
            MemDisk::new(3 << 30),
            "mem",
            8 << 20,
            uuid::Uuid::from_u128(1),
            |s| uuid::Uuid::from_u128(10 + u128::from(s.number)),
            |s| match s.number {
                3 => Prio {
                    priority: 1,
                    tries: 0,
                    successful: true,
                }
                .apply_to(0),
                4 => Prio {
                    priority: 2,
                    tries: 1,
                    successful: false,
                }
                .apply_to(0),
                _ => 0,
            },
        )
        .unwrap();
        let mut seen = Vec::new();
        let (c, v, refused) = boot_loop(
            &mut d,
            |_, c| {
                if c.number == 4 {
                    Err("bad signature".into())
                } else {
                    Ok(c.number * 10)
                }
            },
            |c, why| seen.push((c.number, why.to_string())),
        )
        .unwrap();
        assert_eq!((c.number, v, refused), (3, 30, vec![4]));
        assert_eq!(seen, vec![(4, "bad signature".to_string())]);
        // B's try was spent and written before it was tried.
        let t = d.slot_table();
        assert_eq!(t.iter().find(|e| e.number == 4).unwrap().prio().tries, 0);
        // Nothing verifies: the error lists what was refused.
        let e = boot_loop(&mut d, |_, _| Err::<(), _>("no".into()), |_, _| {}).unwrap_err();
        assert!(
            matches!(e, BootLoopError::NoSlot { ref refused } if refused == &vec![3]),
            "{e}"
        );
    }

    #[test]
    fn boot_disk_is_the_one_the_loader_named_never_the_first_by_name() {
        let pristine = disk("vda", 1, 10, 100);
        let own = disk("vdb", 7, 70, 100);
        let both = [pristine.clone(), own.clone()];
        let u = uuid::Uuid::from_u128;
        assert_eq!(pick_boot_disk(&both, Some(u(70))).unwrap().name, "vdb");
        assert_eq!(pick_boot_disk(&both, Some(u(10))).unwrap().name, "vda");
        // No hint, several disks: refuse rather than take vda.
        assert!(pick_boot_disk(&both, None)
            .unwrap_err()
            .contains("vda, vdb"));
        // A hint that matches nothing with several disks: refuse.
        assert!(pick_boot_disk(&both, Some(u(5))).is_err());
        // One disk: it, whatever the hint (torn first-boot GUID change).
        assert_eq!(
            pick_boot_disk(std::slice::from_ref(&own), Some(u(5)))
                .unwrap()
                .name,
            "vdb"
        );
        assert_eq!(
            pick_boot_disk(std::slice::from_ref(&own), None)
                .unwrap()
                .name,
            "vdb"
        );
        // Two pristine copies: ambiguous.
        let copy = disk("vdc", 1, 10, 100);
        assert!(pick_boot_disk(&[pristine.clone(), copy], Some(u(10))).is_err());
        assert!(pick_boot_disk(&[], None).is_err());
    }

    #[test]
    fn running_disk_needs_the_usr_partuuid_and_the_disk_guid() {
        let pristine = disk("vda", 1, 10, 100);
        let own = disk("vdb", 7, 70, 100);
        let both = [pristine, own];
        let mut a = Stage2Args {
            partuuid: uuid::Uuid::from_u128(101),
            root_hash: String::new(),
            disk: Some(uuid::Uuid::from_u128(7)),
        };
        assert_eq!(pick_running_disk(&both, &a).unwrap().name, "vdb");
        a.disk = None;
        assert!(
            pick_running_disk(&both, &a).is_err(),
            "same USR PARTUUID on both"
        );
        a.disk = Some(uuid::Uuid::from_u128(8));
        assert!(pick_running_disk(&both, &a).is_err());
        a.disk = Some(uuid::Uuid::from_u128(7));
        a.partuuid = uuid::Uuid::from_u128(5);
        assert!(pick_running_disk(&both, &a).is_err());
    }

    #[test]
    fn health_failure_roundtrip() {
        let h = HealthFailure {
            partition: 3,
            partuuid: uuid::Uuid::nil(),
            version: "1.2.0".into(),
            reason: "required unit x.service is failed".into(),
            at: 7,
        };
        assert_eq!(HealthFailure::parse(&h.to_json()).unwrap(), h);
        assert!(HealthFailure::parse(b"{}").is_err());
    }

    #[test]
    fn table_matches_veritysetup_semantics() {
        let d = SlotDescriptor {
            version: "1.0.0".parse().unwrap(),
            data_size: 100 * 4096,
            hash_offset: 100 * 4096,
            hash_size: 4096,
            verity_root: [0xab; 32],
            verity_salt: [0xcd; 32],
            created: 0,
            signers: vec![],
        };
        let (sectors, t) = verity_table(&d, "254:3");
        assert_eq!(sectors, 800);
        assert_eq!(
            t,
            format!(
                "1 254:3 254:3 4096 4096 100 100 sha256 {} {}",
                "ab".repeat(32),
                "cd".repeat(32)
            )
        );
    }
}
