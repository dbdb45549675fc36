//! Stage 1: pick a slot by the boot rule, check its descriptor against
//! the trust chain, map and mount it, then kexec its kernel or go on as
//! its stage 2 in this process.

use crate::disk::{find_boot_disk, first_boot, partition_dev};
use crate::dm::{verity_close, verity_open};
use crate::stage2::stage2;
use crate::{emergency, say, R};
use nimbus::gpt::Disk;
use nimbus::keys::TrustStore;
use nimbus::layout::{self, Slot};
use nimbus::release::SlotDescriptor;
use nix::mount::{mount, umount, MsFlags};
use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub(crate) const ESP_MNT: &str = "/esp";

pub(crate) const USR_MNT: &str = "/usr-stage1";

/// The built-in set, advanced by the rotations update-engine left on the
/// boot disk's ESP (each checked against the one before; a set never goes
/// back below the built-in one); without the ESP, or past a link that does
/// not verify, the walk stops with what it reached and says why. When
/// `own` names the stage-1 copy the loader started, that copy's kernel and
/// initramfs are read too: one read-only mount of the ESP for both.
pub(crate) fn trust(
    disk_name: &str,
    own: Option<nimbus::esp::Copy>,
) -> (TrustStore, Option<OwnBoot>) {
    let builtin = builtin_trust();
    let (links, own) = match read_esp(disk_name, own) {
        Ok(r) => r,
        Err(e) => {
            say(&format!(
                "nimbus-init: trust rotations on the ESP not read: {e}"
            ));
            (Vec::new(), None)
        }
    };
    let (sets, err) = nimbus::trust::walk(builtin, &links);
    if let Some(e) = err {
        say(&format!(
            "nimbus-init: ignoring a trust rotation on the ESP: {e}"
        ));
    }
    // Invariant: walk returns at least the built-in set.
    let t = sets.last().cloned().unwrap_or_else(|| unreachable!());
    say(&format!("nimbus-init: trust set {}", t.summary()));
    (t, own)
}

/// The kernel and initramfs of the running stage-1 copy, read from the ESP.
pub(crate) struct OwnBoot {
    copy: nimbus::esp::Copy,
    kernel: Vec<u8>,
    initramfs: Vec<u8>,
}

impl OwnBoot {
    /// Whether the slot mounted at `usr` boots this very kernel and
    /// initramfs, so that kexec would start what already runs. A release's
    /// stage 2 is its stage-1 initramfs byte for byte (image/src/pipeline/),
    /// so equal files mean the slot's own stage 2 is this program.
    fn is_slot_boot(&self, usr: &Path) -> bool {
        let boot = usr.join("lib/nimbus/boot");
        let same = |f: &str, have: &[u8]| {
            fs::metadata(boot.join(f)).is_ok_and(|m| m.len() == have.len() as u64)
                && fs::read(boot.join(f)).is_ok_and(|b| b == have)
        };
        same("vmlinuz", &self.kernel) && same("initramfs.img", &self.initramfs)
    }
}

pub(crate) fn builtin_trust() -> TrustStore {
    nimbus::trust::load(&Path::new("/").join(nimbus::paths::TRUST_STAGE1))
        .unwrap_or_else(|e| emergency(&format!("built-in trust set: {e}")))
}

pub(crate) fn read_esp(
    disk_name: &str,
    own: Option<nimbus::esp::Copy>,
) -> R<(Vec<nimbus::trust::Link>, Option<OwnBoot>)> {
    let (_, dev) = partition_dev(disk_name, layout::ESP_PARTITION)?;
    let _ = fs::create_dir_all(ESP_MNT);
    mount(
        Some(&dev),
        ESP_MNT,
        Some("vfat"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("codepage=437,iocharset=ascii"),
    )
    .map_err(|e| format!("mount {} (vfat): {e}", dev.display()))?;
    let links = nimbus::chain::read(
        &nimbus::esp::DirEsp(PathBuf::from(ESP_MNT)),
        nimbus::esp::CHAIN_DIR,
    )
    .map_err(|e| e.to_string());
    // Unreadable boot files only cost the shortcut: kexec as before.
    let own = own.and_then(|copy| {
        let read = |f: String| fs::read(Path::new(ESP_MNT).join(f)).ok();
        Some(OwnBoot {
            copy,
            kernel: read(copy.kernel())?,
            initramfs: read(copy.initramfs())?,
        })
    });
    // A mount left here would outlive switch_root out of sight (under the
    // old root) and keep the partition's superblock read-only for the
    // whole boot: every read-write mount of it (mark-good's bless,
    // systemd's /boot) would then fail with EBUSY.
    if let Err(e) = umount(ESP_MNT) {
        say(&format!(
            "nimbus-init: unmounting the ESP ({}): {e}; detaching it",
            dev.display()
        ));
        let _ = nix::mount::umount2(ESP_MNT, nix::mount::MntFlags::MNT_DETACH);
    }
    Ok((links?, own))
}

/// Verify a slot and map it; the mapped device and the descriptor.
pub(crate) fn open_slot(
    disk: &mut Disk<File>,
    disk_name: &str,
    slot: Slot,
    trust: &TrustStore,
    dm_name: &str,
) -> R<(PathBuf, SlotDescriptor)> {
    let bytes = disk.read_descriptor(slot).map_err(|e| e.to_string())?;
    let d = SlotDescriptor::verify(&bytes, trust).map_err(|e| e.to_string())?;
    let (dev, _) = partition_dev(disk_name, slot.partition_number())?;
    let mapped = verity_open(dm_name, &dev, &d)?;
    Ok((mapped, d))
}

pub(crate) fn mount_usr(dev: &Path, at: &str) -> R<()> {
    let _ = fs::create_dir_all(at);
    mount(
        Some(dev),
        at,
        Some("erofs"),
        MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| format!("mount erofs {}: {e}", dev.display()))
}

pub(crate) fn kexec(kernel: &Path, initrd: &Path, cmdline: &str) -> R<()> {
    let k = File::open(kernel).map_err(|e| format!("{}: {e}", kernel.display()))?;
    let i = File::open(initrd).map_err(|e| format!("{}: {e}", initrd.display()))?;
    let c = CString::new(cmdline).map_err(|e| e.to_string())?;
    // SAFETY: kexec_file_load takes two fds, a NUL-terminated string and its
    // length including the NUL.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            k.as_raw_fd(),
            i.as_raw_fd(),
            c.as_bytes_with_nul().len(),
            c.as_ptr(),
            0,
        )
    };
    if rc != 0 {
        return Err(format!(
            "kexec_file_load: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

pub(crate) fn console_args() -> String {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    cmdline
        .split_whitespace()
        .filter(|w| w.starts_with("console=") || *w == "quiet")
        .collect::<Vec<_>>()
        .join(" ")
}

/// How stage 1 hands the chosen slot over.
pub(crate) enum Next {
    /// The slot's kernel was loaded; reboot into it.
    Kexec,
    /// The slot boots the running kernel and initramfs: go on as its stage 2
    /// with this command line.
    InPlace(String),
}

/// Continue as stage 2 in this kernel with the command line a kexec would
/// have given it. The hand-over goes to /run/nimbus/boot-cmdline on a
/// tmpfs /run that stage 2 moves into the new root and systemd keeps, so
/// every reader (`nimbus::boot::booted_cmdline`) finds what it would have
/// found on /proc/cmdline after a kexec.
pub(crate) fn hand_over_in_place(cmdline: &str) -> ! {
    let _ = fs::create_dir_all("/run");
    // systemd's own options for /run, so that it keeps this mount.
    mount(
        Some("tmpfs"),
        "/run",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_STRICTATIME,
        Some("mode=0755,size=20%,nr_inodes=800k"),
    )
    .unwrap_or_else(|e| emergency(&format!("mount tmpfs on /run: {e}")));
    let file = Path::new("/").join(nimbus::paths::BOOT_CMDLINE);
    let written = file
        .parent()
        .map_or(Ok(()), fs::create_dir_all)
        .and_then(|()| fs::write(&file, format!("{cmdline}\n")));
    if let Err(e) = written {
        emergency(&format!("{}: {e}", file.display()));
    }
    match nimbus::boot::parse_cmdline(cmdline) {
        Some(a) => stage2(a),
        None => emergency(&format!(
            "stage 1 made a hand-over stage 2 cannot read: {cmdline}"
        )),
    }
}

pub(crate) fn stage1() -> ! {
    let t0 = Instant::now();
    let (disk_name, mut disk) = find_boot_disk().unwrap_or_else(|e| emergency(&e));
    say(&format!(
        "nimbus-init: boot disk /dev/{disk_name} (GUID {})",
        disk.disk_guid()
    ));
    let table_changed = first_boot(&disk_name, &mut disk);
    let stage1_copy =
        nimbus::esp::running_copy(&fs::read_to_string("/proc/cmdline").unwrap_or_default());
    // The kernel's partitions are those of the old table until it is read
    // again, and a new kernel reads it: a boot that changed the table
    // (the first one, a grown disk) goes through kexec.
    let (trust, own) = trust(&disk_name, stage1_copy.filter(|_| !table_changed));
    let disk_guid = disk.disk_guid();
    let dm = "usr";
    // The loop itself (select, persist the tries decrement, try, exclude
    // what fails) is nimbus::boot::boot_loop, the one the power-cut
    // harness checks; trying a slot here means verify, map, mount, load.
    let t_sel = std::cell::Cell::new(Instant::now());
    let booted = nimbus::boot::boot_loop(
        &mut disk,
        |disk, choice| {
            let select_ms = t_sel.get().elapsed().as_secs_f64() * 1000.0;
            let slot = Slot::from_partition_number(choice.number)
                .ok_or_else(|| format!("partition {} is not a USR slot", choice.number))?;
            let (mapped, d) = open_slot(disk, &disk_name, slot, &trust, dm)?;
            let p = choice.before;
            say(&format!(
                "nimbus-init: selected {slot} priority={} tries={} successful={} version={} (selection {select_ms:.1} ms)",
                p.priority,
                if p.successful { p.tries } else { p.tries.saturating_sub(1) },
                u8::from(p.successful),
                d.version
            ));
            if let Err(e) = mount_usr(&mapped, USR_MNT) {
                verity_close(dm);
                return Err(format!("{e} (dm-verity rejected the data)"));
            }
            let uuid = match disk.partition(choice.number) {
                Ok(p) => p.uuid,
                Err(e) => {
                    let _ = umount(USR_MNT);
                    verity_close(dm);
                    return Err(e.to_string());
                }
            };
            let mut cmdline = format!(
                "{} panic=-1 nimbus.disk={disk_guid} nimbus.usr=PARTUUID={uuid} nimbus.usrhash={} {}",
                console_args(),
                hex::encode(d.verity_root),
                nimbus::trust::cmdline_arg(&trust)
            );
            // Which ESP copy this stage 1 is: mark-good blesses it.
            if let Some(c) = stage1_copy {
                cmdline.push_str(&format!(" nimbus.stage1={c}"));
            }
            if own
                .as_ref()
                .is_some_and(|o| o.is_slot_boot(Path::new(USR_MNT)))
            {
                return Ok((slot, Next::InPlace(cmdline)));
            }
            let boot = Path::new(USR_MNT).join("lib/nimbus/boot");
            if let Err(e) = kexec(&boot.join("vmlinuz"), &boot.join("initramfs.img"), &cmdline) {
                let _ = umount(USR_MNT);
                verity_close(dm);
                return Err(e);
            }
            Ok((slot, Next::Kexec))
        },
        |choice, why| {
            let label = Slot::from_partition_number(choice.number)
                .map_or_else(|| format!("partition {}", choice.number), |s| s.to_string());
            say(&format!("nimbus-init: refusing {label}: {why}"));
            t_sel.set(Instant::now());
        },
    );
    let (slot, next) = match booted {
        Ok((_, v, _)) => v,
        Err(e) => emergency(&e.to_string()),
    };
    let _ = umount(USR_MNT);
    verity_close(dm);
    drop(disk);
    if let Next::InPlace(cmdline) = next {
        let copy = own.as_ref().map_or("?", |o| o.copy.name());
        drop(own);
        say(&format!(
            "{} {} ms; {slot} boots this very kernel and initramfs (nimbus/{copy}/): {}",
            nimbus::boot::STAGE1_DONE,
            t0.elapsed().as_millis(),
            nimbus::boot::HANDED_IN_PLACE
        ));
        hand_over_in_place(&cmdline);
    }
    say(&format!(
        "{} {} ms; {} {slot}",
        nimbus::boot::STAGE1_DONE,
        t0.elapsed().as_millis(),
        nimbus::boot::HANDED_TO_KEXEC
    ));
    nix::unistd::sync();
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_KEXEC);
    emergency(&format!("kexec reboot: {e:?}"))
}
