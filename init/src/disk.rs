//! Finding the Nimbus disk (the ESP the loader named, else the first disk
//! with a Nimbus table) and its first boot (per-host GUIDs, a grown disk).

use crate::{say, R};
use nimbus::gpt::Disk;
use nix::mount::{mount, MsFlags};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub(crate) const LOADER_DEVICE_PARTUUID: &str =
    "/sys/firmware/efi/efivars/LoaderDevicePartUUID-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// The ESP the loader read stage 1 from: GRUB puts it on the command line
/// (`nimbus.esp=PARTUUID=`), systemd-boot in an EFI variable (4 bytes of
/// attributes, then the GUID as UTF-16LE text).
pub(crate) fn esp_hint() -> Option<uuid::Uuid> {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(u) = nimbus::boot::esp_hint(&cmdline) {
        return Some(u);
    }
    if Path::new("/sys/firmware/efi").exists() {
        let _ = mount(
            Some("efivarfs"),
            "/sys/firmware/efi/efivars",
            Some("efivarfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
            None::<&str>,
        );
    }
    let raw = fs::read(LOADER_DEVICE_PARTUUID).ok()?;
    let units: Vec<u16> = raw
        .get(4..)?
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&c| c != 0)
        .collect();
    String::from_utf16(&units).ok()?.trim().parse().ok()
}

/// Wait (device probing is slow under emulation) until `pick` accepts the
/// disks found, then open that disk.
pub(crate) fn find_disk_by(
    what: &str,
    pick: impl Fn(&[nimbus::boot::DiskId]) -> R<nimbus::boot::DiskId>,
    writable: bool,
) -> R<(String, Disk<File>)> {
    let t = Instant::now();
    loop {
        let found = nimbus::boot::scan_disks();
        match pick(&found) {
            Ok(d) => {
                let path = PathBuf::from(format!("/dev/{}", d.name));
                let disk = Disk::open_path(&path, writable).map_err(|e| e.to_string())?;
                return Ok((d.name, disk));
            }
            Err(e) if t.elapsed() > Duration::from_secs(20) => {
                return Err(format!("{what}: {e}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Stage 1: the disk the loader named, or the only Nimbus disk.
pub(crate) fn find_boot_disk() -> R<(String, Disk<File>)> {
    let hint = esp_hint();
    if let Some(h) = hint {
        say(&format!(
            "nimbus-init: the loader booted from the ESP with PARTUUID {h}"
        ));
    }
    find_disk_by(
        "boot disk",
        |d| nimbus::boot::pick_boot_disk(d, hint).cloned(),
        true,
    )
}

/// Stage 2 and mark-good: the disk stage 1 booted (`nimbus.disk=`) that
/// holds the booted USR partition.
pub(crate) fn find_running_disk(
    args: &nimbus::boot::Stage2Args,
    writable: bool,
) -> R<(String, Disk<File>)> {
    find_disk_by(
        "booted disk",
        |d| nimbus::boot::pick_running_disk(d, args).cloned(),
        writable,
    )
}

/// "major:minor" of partition `n` of `disk`.
pub(crate) fn partition_dev(disk: &str, n: u32) -> R<(String, PathBuf)> {
    nimbus::boot::partition_device(disk, n)
}

// --- device-mapper ioctls (linux/dm-ioctl.h, interface 4.x) ---------------

/// A random GUID that never waits for the kernel's entropy pool: under
/// emulation with no RNG device it can take minutes to initialise, and
/// getrandom() would block the boot that long. GRND_INSECURE bytes (the
/// same generator, before it is credited as seeded) are hashed with the
/// clocks and interrupt counts; these GUIDs need to be unique, not secret.
pub(crate) fn fresh_guid() -> uuid::Uuid {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = [0u8; 32];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let _ = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_INSECURE) };
    h.update(buf);
    for clock in [
        libc::CLOCK_REALTIME,
        libc::CLOCK_MONOTONIC,
        libc::CLOCK_BOOTTIME,
    ] {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime fills the timespec it is given.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        h.update(ts.tv_sec.to_le_bytes());
        h.update(ts.tv_nsec.to_le_bytes());
    }
    h.update(fs::read("/proc/interrupts").unwrap_or_default());
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

/// What CoreOS's disk-uuid and the first boot's growpart did, on the GPT
/// and before anything else uses it: fresh per-host GUIDs on a pristine
/// disk, the backup table at the end of a grown disk, ROOT filling it. One
/// crash-ordered commit; an interrupted one is redone on the next boot.
/// ROOT's filesystem follows in stage 2, whose kernel reads the new table.
pub(crate) fn first_boot(name: &str, disk: &mut Disk<File>) -> bool {
    match disk.prepare_host(fresh_guid) {
        Ok(p) => {
            let changed =
                p.new_identity.is_some() || p.backup_moved.is_some() || p.root_grown.is_some();
            if let Some(g) = p.new_identity {
                say(&format!(
                    "nimbus-init: first boot of /dev/{name}: new disk GUID {g}, new ESP/OEM/ROOT PARTUUIDs"
                ));
            }
            if let Some((from, to)) = p.backup_moved {
                say(&format!(
                    "nimbus-init: /dev/{name} grew: backup GPT moved from LBA {from} to {to}"
                ));
            }
            if let Some((from, to)) = p.root_grown {
                say(&format!(
                    "nimbus-init: ROOT partition grown from {} MiB to {} MiB",
                    from >> 20,
                    to >> 20
                ));
            }
            changed
        }
        // Booting the unchanged disk is better than not booting. A failed
        // commit may have written part of the table: count it as changed.
        Err(e) => {
            say(&format!("nimbus-init: first-boot disk setup skipped: {e}"));
            true
        }
    }
}
