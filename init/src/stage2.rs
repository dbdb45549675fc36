//! Stage 2: map the slot stage 1 chose again, mount ROOT (grown and
//! populated on first boot) and the verified USR, switch_root to systemd.

use crate::disk::{find_running_disk, partition_dev};
use crate::stage1::{mount_usr, open_slot, trust};
use crate::{emergency, say, R};
use nimbus::layout::{self};
use nix::mount::{mount, MsFlags};
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Grow the ext4 filesystem mounted at `mnt` (device `dev`) to the size of
/// its partition, online, as resize2fs does: EXT4_IOC_RESIZE_FS with the
/// new block count. The kernel journals each step, so a power cut leaves a
/// consistent, partly grown filesystem that the next boot finishes.
/// Returns the sizes before and after when it grew.
pub(crate) fn grow_ext4(dev: &Path, mnt: &Path) -> R<Option<(u64, u64)>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(dev).map_err(|e| format!("{}: {e}", dev.display()))?;
    let mut sb = [0u8; 1024];
    f.seek(SeekFrom::Start(1024))
        .and_then(|_| f.read_exact(&mut sb))
        .map_err(|e| format!("{}: superblock: {e}", dev.display()))?;
    let le32 = |o: usize| u64::from(u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]));
    if sb[0x38..0x3a] != [0x53, 0xef] {
        return Err(format!("{}: not ext4", dev.display()));
    }
    let block = 1024u64 << le32(0x18).min(6);
    let incompat_64bit = le32(0x60) & 0x80 != 0;
    let blocks = le32(0x04) | if incompat_64bit { le32(0x150) << 32 } else { 0 };
    let part_bytes = f
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("{}: size: {e}", dev.display()))?;
    let want = part_bytes / block;
    if want <= blocks {
        return Ok(None);
    }
    let dir = File::open(mnt).map_err(|e| format!("{}: {e}", mnt.display()))?;
    // EXT4_IOC_RESIZE_FS = _IOW('f', 16, __u64)
    const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;
    // SAFETY: the ioctl reads one u64 through the pointer, which outlives
    // the call.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_RESIZE_FS, &want as *const u64) };
    if rc != 0 {
        return Err(format!(
            "EXT4_IOC_RESIZE_FS to {want} blocks: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(Some((blocks * block, want * block)))
}

/// Copy a tree keeping modes, owners and symlinks (no `cp` here: USR's
/// binaries need a loader the initramfs does not have).
pub(crate) fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
    let m = fs::symlink_metadata(from)?;
    if m.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)?;
    } else if m.is_dir() {
        fs::create_dir_all(to)?;
        for e in fs::read_dir(from)? {
            let e = e?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        fs::set_permissions(to, fs::Permissions::from_mode(m.mode() & 0o7777))?;
    } else if m.is_file() {
        fs::copy(from, to)?;
        fs::set_permissions(to, fs::Permissions::from_mode(m.mode() & 0o7777))?;
    } else {
        return Ok(()); // device nodes and sockets are not part of a factory tree
    }
    lchown(to, Some(m.uid()), Some(m.gid()))
}

/// A blank ROOT (new disk, or wiped to reset a host) gets the merged-/usr
/// links, the base directories and the factory /etc and /var from USR.
pub(crate) fn populate_root(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        if fs::symlink_metadata(root.join(link)).is_err() {
            std::os::unix::fs::symlink(target, root.join(link))?;
        }
    }
    for (d, mode) in [
        ("tmp", 0o1777),
        ("home", 0o755),
        ("root", 0o700),
        ("srv", 0o755),
        ("mnt", 0o755),
        ("media", 0o755),
        ("opt", 0o755),
    ] {
        fs::create_dir_all(root.join(d))?;
        fs::set_permissions(root.join(d), fs::Permissions::from_mode(mode))?;
    }
    let factory = root.join("usr/share/factory");
    copy_tree(&factory.join("etc"), &root.join("etc"))?;
    if !root.join("var").exists() {
        copy_tree(&factory.join("var"), &root.join("var"))?;
    }
    Ok(())
}

pub(crate) fn stage2(args: nimbus::boot::Stage2Args) -> ! {
    let (disk_name, mut disk) = find_running_disk(&args, false).unwrap_or_else(|e| emergency(&e));
    // The slot's own initramfs, its built-in set advanced by the same
    // rotations stage 1 read: the descriptor stage 1 accepted verifies.
    let (trust, _) = trust(&disk_name, None);
    let slot = layout::Slot::ALL
        .into_iter()
        .find(|s| disk.partition(s.partition_number()).ok().map(|p| p.uuid) == Some(args.partuuid))
        .unwrap_or_else(|| emergency(&format!("no USR slot with PARTUUID {}", args.partuuid)));
    let (mapped, d) = open_slot(&mut disk, &disk_name, slot, &trust, "usr")
        .unwrap_or_else(|e| emergency(&format!("{slot}: {e}")));
    if hex::encode(d.verity_root) != args.root_hash {
        emergency(&format!(
            "{slot}: root hash differs from the one stage 1 verified"
        ));
    }
    let (_, root_dev) = partition_dev(&disk_name, 9).unwrap_or_else(|e| emergency(&e));
    let oem_dev = partition_dev(&disk_name, 6).map(|(_, p)| p);
    drop(disk);
    let _ = fs::create_dir_all("/sysroot");
    mount(
        Some(&root_dev),
        "/sysroot",
        Some("ext4"),
        MsFlags::empty(),
        None::<&str>,
    )
    .unwrap_or_else(|e| emergency(&format!("mount ROOT {}: {e}", root_dev.display())));
    match grow_ext4(&root_dev, Path::new("/sysroot")) {
        Ok(Some((from, to))) => say(&format!(
            "nimbus-init: ROOT filesystem grown online from {} MiB to {} MiB",
            from >> 20,
            to >> 20
        )),
        Ok(None) => {}
        // A full ROOT is better than no boot; the next boot tries again.
        Err(e) => say(&format!("nimbus-init: growing the ROOT filesystem: {e}")),
    }
    let _ = fs::create_dir_all("/sysroot/usr");
    mount_usr(&mapped, "/sysroot/usr").unwrap_or_else(|e| emergency(&format!("{slot}: {e}")));
    // The boot disk's OEM partition, mounted here rather than by label
    // (oem.mount finds /oem already mounted): with a second Nimbus disk
    // attached, /dev/disk/by-partlabel/OEM may be the other disk's, and its
    // user-data is not this host's.
    match oem_dev {
        Ok(dev) => {
            let _ = fs::create_dir_all("/sysroot/oem");
            if let Err(e) = mount(
                Some(&dev),
                "/sysroot/oem",
                Some("ext4"),
                MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                None::<&str>,
            ) {
                say(&format!(
                    "nimbus-init: OEM partition {}: {e}",
                    dev.display()
                ));
            }
        }
        Err(e) => say(&format!("nimbus-init: OEM partition: {e}")),
    }
    if !Path::new("/sysroot/etc").exists() {
        say("nimbus-init: ROOT is blank; populating it from the factory copy in USR");
        if let Err(e) = populate_root(Path::new("/sysroot")) {
            emergency(&format!("populating ROOT: {e}"));
        }
    }
    say(&format!(
        "nimbus-init: stage 2: {slot} version {} verified; switching to systemd",
        d.version
    ));
    // /run is a mount only when stage 1 went on as stage 2 in its own
    // kernel (the hand-over is on it); moving a plain directory fails,
    // harmlessly.
    for m in ["/dev", "/proc", "/sys", "/run"] {
        let to = format!("/sysroot{m}");
        let _ = fs::create_dir_all(&to);
        let _ = mount(
            Some(m),
            to.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        );
    }
    free_initramfs();
    let step = || -> nix::Result<()> {
        nix::unistd::chdir("/sysroot")?;
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
        nix::unistd::chroot(".")?;
        nix::unistd::chdir("/")
    };
    if let Err(e) = step() {
        emergency(&format!("switch_root: {e}"));
    }
    let init = c"/sbin/init";
    let e = nix::unistd::execv(init, &[init]);
    emergency(&format!("exec /sbin/init: {e:?}"))
}

/// Delete the initramfs's files before leaving it, as switch_root does:
/// the rootfs it was unpacked into cannot be unmounted, and what stays in
/// it (modules, this program) stays in memory for the host's whole life.
/// Only the rootfs's own files go: the walk never leaves its device, so
/// /sysroot and anything mounted stay untouched.
pub(crate) fn free_initramfs() {
    use std::os::unix::fs::MetadataExt;
    fn clear(dir: &Path, dev: u64) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            if m.dev() != dev || p == Path::new("/sysroot") {
                continue;
            }
            if m.is_dir() {
                clear(&p, dev);
                let _ = fs::remove_dir(&p);
            } else {
                let _ = fs::remove_file(&p);
            }
        }
    }
    match fs::symlink_metadata("/") {
        // A rootfs is ramfs or tmpfs; never clear anything else.
        Ok(m) if is_ram_fs("/") => clear(Path::new("/"), m.dev()),
        _ => say("nimbus-init: / is not the initramfs; nothing freed"),
    }
}

pub(crate) fn is_ram_fs(path: &str) -> bool {
    use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
    // linux/magic.h; neither libc nor nix names it.
    let ramfs = FsType(0x8584_58f6);
    statfs(path).is_ok_and(|s| [ramfs, TMPFS_MAGIC].contains(&s.filesystem_type()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// A blank ROOT gets the merged-/usr links, the base directories with
    /// their modes, and the factory /etc and /var.
    #[test]
    fn a_blank_root_is_populated_from_the_factory_copy() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let factory = root.join("usr/share/factory");
        fs::create_dir_all(factory.join("etc/ssh")).unwrap();
        fs::write(factory.join("etc/ssh/sshd_config"), "PermitRootLogin no\n").unwrap();
        fs::set_permissions(
            factory.join("etc/ssh/sshd_config"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink("../proc/self/mounts", factory.join("etc/mtab")).unwrap();
        fs::create_dir_all(factory.join("var/lib")).unwrap();
        fs::write(factory.join("var/lib/seed"), "1").unwrap();

        populate_root(root).unwrap();
        assert_eq!(
            fs::read_link(root.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        assert_eq!(mode(&root.join("tmp")), 0o1777);
        assert_eq!(mode(&root.join("root")), 0o700);
        assert_eq!(
            fs::read_to_string(root.join("etc/ssh/sshd_config")).unwrap(),
            "PermitRootLogin no\n"
        );
        assert_eq!(mode(&root.join("etc/ssh/sshd_config")), 0o600);
        assert_eq!(
            fs::read_link(root.join("etc/mtab")).unwrap(),
            Path::new("../proc/self/mounts"),
            "links are copied as links"
        );
        assert_eq!(fs::read_to_string(root.join("var/lib/seed")).unwrap(), "1");
    }

    /// A ROOT whose /var survived (only /etc was wiped to reset the host)
    /// keeps its own /var.
    #[test]
    fn an_existing_var_is_kept() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let factory = root.join("usr/share/factory");
        fs::create_dir_all(factory.join("etc")).unwrap();
        fs::create_dir_all(factory.join("var/lib")).unwrap();
        fs::write(factory.join("var/lib/seed"), "factory").unwrap();
        fs::create_dir_all(root.join("var/lib")).unwrap();
        fs::write(root.join("var/lib/seed"), "mine").unwrap();
        populate_root(root).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("var/lib/seed")).unwrap(),
            "mine"
        );
    }

    #[test]
    fn only_a_ram_filesystem_counts_as_the_initramfs() {
        assert!(is_ram_fs("/dev/shm"), "tmpfs");
        assert!(!is_ram_fs("/proc"));
        assert!(!is_ram_fs("/nonexistent"));
    }
}
