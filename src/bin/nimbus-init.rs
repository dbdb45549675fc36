//! `/init` of the Nimbus initramfs, and `nimbus-init mark-good`.
//!
//! Stage 1 (no `nimbus.usr=` on the command line): load modules, find the
//! Nimbus disk, apply the boot rule (persisting the tries decrement), verify
//! the slot's descriptor, map it with dm-verity, mount it, and kexec the
//! slot's own kernel and initramfs. A slot that fails any check is reported
//! on the console and the next candidate is tried in the same boot.
//!
//! Stage 2 (`nimbus.usr=PARTUUID=... nimbus.usrhash=...`): map the same slot
//! again, mount ROOT at /sysroot and the verified USR at /sysroot/usr, and
//! switch_root into systemd.
//!
//! This runs as PID 1: it never returns; a fatal error prints why and halts.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nimbus::gpt::Disk;
use nimbus::keys::TrustStore;
use nimbus::layout::{self, Slot};
use nimbus::release::SlotDescriptor;
use nimbus::slots;
use nix::mount::{mount, umount, MsFlags};

const ESP_MNT: &str = "/esp";
const USR_MNT: &str = "/usr-stage1";

fn say(msg: &str) {
    // stdout is /dev/console for PID 1; one write per line keeps lines whole.
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{msg}\n").as_bytes());
    let _ = out.flush();
}

fn emergency(why: &str) -> ! {
    say(&format!("nimbus-init: EMERGENCY: {why}"));
    say("nimbus-init: no verified USR slot can be booted; halting (the disk was not changed further)");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

type R<T> = Result<T, String>;

fn mount_basics() {
    for (src, dst, fs) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        let _ = fs::create_dir_all(dst);
        let _ = mount(Some(src), dst, Some(fs), MsFlags::MS_NOSUID, None::<&str>);
    }
}

fn load_modules() {
    let Ok(list) = fs::read_to_string("/lib/modules/load.list") else {
        return;
    };
    let kver = fs::read_dir("/lib/modules")
        .ok()
        .and_then(|mut d| d.find_map(|e| e.ok().filter(|e| e.path().is_dir()).map(|e| e.path())));
    let Some(base) = kver else { return };
    for m in list.lines().filter(|l| !l.is_empty()) {
        let p = base.join(m);
        match File::open(&p) {
            Ok(f) => {
                if let Err(e) =
                    nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty())
                {
                    // ENODEV: efivarfs on a machine booted without UEFI.
                    if e != nix::errno::Errno::EEXIST && e != nix::errno::Errno::ENODEV {
                        say(&format!("nimbus-init: module {m}: {e}"));
                    }
                }
            }
            Err(e) => say(&format!("nimbus-init: module {m}: {e}")),
        }
    }
}

const LOADER_DEVICE_PARTUUID: &str =
    "/sys/firmware/efi/efivars/LoaderDevicePartUUID-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// The ESP the loader read stage 1 from: GRUB puts it on the command line
/// (`nimbus.esp=PARTUUID=`), systemd-boot in an EFI variable (4 bytes of
/// attributes, then the GUID as UTF-16LE text).
fn esp_hint() -> Option<uuid::Uuid> {
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
fn find_disk_by(
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
fn find_boot_disk() -> R<(String, Disk<File>)> {
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
fn find_running_disk(args: &nimbus::boot::Stage2Args, writable: bool) -> R<(String, Disk<File>)> {
    find_disk_by(
        "booted disk",
        |d| nimbus::boot::pick_running_disk(d, args).cloned(),
        writable,
    )
}

/// "major:minor" of partition `n` of `disk`.
fn partition_dev(disk: &str, n: u32) -> R<(String, PathBuf)> {
    nimbus::boot::partition_device(disk, n)
}

// --- device-mapper ioctls (linux/dm-ioctl.h, interface 4.x) ---------------

const DM_NAME_LEN: usize = 128;
const DM_UUID_LEN: usize = 129;

#[repr(C)]
struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; DM_NAME_LEN],
    uuid: [u8; DM_UUID_LEN],
    data: [u8; 7],
}

#[repr(C)]
struct DmTargetSpec {
    sector_start: u64,
    length: u64,
    status: i32,
    next: u32,
    target_type: [u8; 16],
}

const DM_READONLY_FLAG: u32 = 1;

fn dm_ioctl(cmd: u8, name: &str, flags: u32, payload: &[u8], target_count: u32) -> R<DmIoctl> {
    let ctl = File::options()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .map_err(|e| format!("/dev/mapper/control: {e}"))?;
    let hdr = std::mem::size_of::<DmIoctl>();
    let mut buf = vec![0u8; hdr + payload.len() + 8];
    let mut io = DmIoctl {
        version: [4, 0, 0],
        data_size: buf.len() as u32,
        data_start: hdr as u32,
        target_count,
        open_count: 0,
        flags,
        event_nr: 0,
        padding: 0,
        dev: 0,
        name: [0; DM_NAME_LEN],
        uuid: [0; DM_UUID_LEN],
        data: [0; 7],
    };
    io.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: DmIoctl is repr(C) plain data; we copy its bytes into a buffer
    // at least as large.
    unsafe {
        std::ptr::copy_nonoverlapping(&io as *const DmIoctl as *const u8, buf.as_mut_ptr(), hdr)
    };
    buf[hdr..hdr + payload.len()].copy_from_slice(payload);
    // _IOWR(0xfd, cmd, struct dm_ioctl)
    let req = (3u64 << 30) | ((hdr as u64) << 16) | (0xfd << 8) | u64::from(cmd);
    // SAFETY: the kernel reads and writes within data_size bytes of buf.
    let rc = unsafe { libc::ioctl(ctl.as_raw_fd(), req as _, buf.as_mut_ptr()) };
    if rc < 0 {
        return Err(format!(
            "device-mapper ioctl {cmd}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: buf holds at least hdr bytes written by us and the kernel.
    Ok(unsafe { std::ptr::read_unaligned(buf.as_ptr() as *const DmIoctl) })
}

const DM_DEV_CREATE: u8 = 3;
const DM_DEV_REMOVE: u8 = 4;
const DM_DEV_SUSPEND: u8 = 6;
const DM_TABLE_LOAD: u8 = 9;

/// Create a read-only dm-verity device; returns /dev/dm-N.
fn verity_open(name: &str, dev: &str, d: &SlotDescriptor) -> R<PathBuf> {
    let (sectors, params) = nimbus::boot::verity_table(d, dev);
    let created = dm_ioctl(DM_DEV_CREATE, name, 0, &[], 0)?;
    let mut spec = DmTargetSpec {
        sector_start: 0,
        length: sectors,
        status: 0,
        next: 0,
        target_type: [0; 16],
    };
    spec.target_type[..6].copy_from_slice(b"verity");
    let spec_len = std::mem::size_of::<DmTargetSpec>();
    let mut payload = vec![0u8; spec_len];
    // SAFETY: repr(C) plain data copied into a buffer of its exact size.
    unsafe {
        std::ptr::copy_nonoverlapping(
            &spec as *const DmTargetSpec as *const u8,
            payload.as_mut_ptr(),
            spec_len,
        )
    };
    payload.extend_from_slice(params.as_bytes());
    payload.push(0);
    while !payload.len().is_multiple_of(8) {
        payload.push(0);
    }
    if let Err(e) = dm_ioctl(DM_TABLE_LOAD, name, DM_READONLY_FLAG, &payload, 1)
        .and_then(|_| dm_ioctl(DM_DEV_SUSPEND, name, 0, &[], 0))
    {
        let _ = dm_ioctl(DM_DEV_REMOVE, name, 0, &[], 0);
        return Err(e);
    }
    let minor = ((created.dev & 0xff) | ((created.dev >> 12) & !0xff)) as u32;
    Ok(PathBuf::from(format!("/dev/dm-{minor}")))
}

fn verity_close(name: &str) {
    let _ = dm_ioctl(DM_DEV_REMOVE, name, 0, &[], 0);
}

/// The built-in set, advanced by the rotations update-engine left on the
/// boot disk's ESP (each checked against the one before; a set never goes
/// back below the built-in one); without the ESP, or past a link that does
/// not verify, the walk stops with what it reached and says why. When
/// `own` names the stage-1 copy the loader started, that copy's kernel and
/// initramfs are read too: one read-only mount of the ESP for both.
fn trust(disk_name: &str, own: Option<nimbus::esp::Copy>) -> (TrustStore, Option<OwnBoot>) {
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
struct OwnBoot {
    copy: nimbus::esp::Copy,
    kernel: Vec<u8>,
    initramfs: Vec<u8>,
}

impl OwnBoot {
    /// Whether the slot mounted at `usr` boots this very kernel and
    /// initramfs, so that kexec would start what already runs. A release's
    /// stage 2 is its stage-1 initramfs byte for byte (image/src/pipeline.rs),
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

fn builtin_trust() -> TrustStore {
    nimbus::trust::load(&Path::new("/").join(nimbus::paths::TRUST_STAGE1))
        .unwrap_or_else(|e| emergency(&format!("built-in trust set: {e}")))
}

fn read_esp(
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
fn open_slot(
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

fn mount_usr(dev: &Path, at: &str) -> R<()> {
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

fn kexec(kernel: &Path, initrd: &Path, cmdline: &str) -> R<()> {
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

fn console_args() -> String {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    cmdline
        .split_whitespace()
        .filter(|w| w.starts_with("console=") || *w == "quiet")
        .collect::<Vec<_>>()
        .join(" ")
}

/// A random GUID that never waits for the kernel's entropy pool: under
/// emulation with no RNG device it can take minutes to initialise, and
/// getrandom() would block the boot that long. GRND_INSECURE bytes (the
/// same generator, before it is credited as seeded) are hashed with the
/// clocks and interrupt counts; these GUIDs need to be unique, not secret.
fn fresh_guid() -> uuid::Uuid {
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
fn first_boot(name: &str, disk: &mut Disk<File>) -> bool {
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

/// How stage 1 hands the chosen slot over.
enum Next {
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
fn hand_over_in_place(cmdline: &str) -> ! {
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

fn stage1() -> ! {
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

/// Grow the ext4 filesystem mounted at `mnt` (device `dev`) to the size of
/// its partition, online, as resize2fs does: EXT4_IOC_RESIZE_FS with the
/// new block count. The kernel journals each step, so a power cut leaves a
/// consistent, partly grown filesystem that the next boot finishes.
/// Returns the sizes before and after when it grew.
fn grow_ext4(dev: &Path, mnt: &Path) -> R<Option<(u64, u64)>> {
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
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
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
fn populate_root(root: &Path) -> std::io::Result<()> {
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

fn stage2(args: nimbus::boot::Stage2Args) -> ! {
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
fn free_initramfs() {
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

fn is_ram_fs(path: &str) -> bool {
    use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
    // linux/magic.h; neither libc nor nix names it.
    let ramfs = FsType(0x8584_58f6);
    statfs(path).is_ok_and(|s| [ramfs, TMPFS_MAGIC].contains(&s.filesystem_type()))
}

/// Why `unit` does not count as healthy, or `None` when it is active.
fn unit_failure(unit: &str) -> Option<String> {
    let active = std::process::Command::new("systemctl")
        .args(["is-active", "--quiet", unit])
        .status()
        .is_ok_and(|s| s.success());
    if active {
        return None;
    }
    let out = std::process::Command::new("systemctl")
        .args(["show", "-p", "ActiveState", "-p", "Result", unit])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .unwrap_or("unknown")
            .to_string()
    };
    Some(format!(
        "required unit {unit} is {} (result: {})",
        field("ActiveState"),
        field("Result")
    ))
}

/// The health check failed on `slot`. An unproven slot is given up: the
/// reason goes to ROOT for update-engine to report after the fallback,
/// then the host reboots, and the boot rule (no tries left, not
/// successful) picks the previous slot. A proven slot, or one with nothing
/// to fall back to, stays up: rebooting would only come back to it.
fn health_failed<D: nimbus::gpt::BlockDevice>(
    disk: &Disk<D>,
    slot: Slot,
    partuuid: uuid::Uuid,
    version: &str,
    reason: &str,
) -> i32 {
    say(&format!(
        "nimbus-mark-good: health check failed on {slot} (version {version}): {reason}"
    ));
    let n = slot.partition_number();
    let target = match slots::on_health_failure(&disk.slot_table(), n) {
        slots::HealthFailureAction::StayProven => {
            say(&format!(
                "nimbus-mark-good: {slot} was proven good before; staying on it (no rollback)"
            ));
            return 1;
        }
        slots::HealthFailureAction::NoFallback => {
            say("nimbus-mark-good: no other bootable slot to fall back to; staying up");
            return 1;
        }
        slots::HealthFailureAction::FallBack(t) => t,
    };
    let record = nimbus::boot::HealthFailure {
        partition: n,
        partuuid,
        version: version.to_string(),
        reason: reason.to_string(),
        at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
    };
    let path = Path::new("/").join(nimbus::boot::HEALTH_FAILURE_PATH);
    if let Some(dir) = path.parent() {
        let _ = fs::create_dir_all(dir);
    }
    // Written durably before the reboot: the fallback boot must be able to
    // say why. Failing to record is reported but does not stop the fallback.
    if let Err(e) = nimbus::durable::write_atomic(&path, &record.to_json(), 0o644) {
        say(&format!("nimbus-mark-good: cannot record the failure: {e}"));
    }
    let target_label = Slot::from_partition_number(target)
        .map_or_else(|| format!("partition {target}"), |s| s.to_string());
    if std::env::var("NIMBUS_HEALTH_ON_FAILURE").as_deref() == Ok("none") {
        say(&format!(
            "nimbus-mark-good: {slot} has no tries left; the next boot falls back to {target_label} (NIMBUS_HEALTH_ON_FAILURE=none: not rebooting)"
        ));
        return 1;
    }
    say(&format!(
        "nimbus-mark-good: {slot} has no tries left: rebooting to fall back to {target_label}"
    ));
    match std::process::Command::new("systemctl")
        .arg("reboot")
        .status()
    {
        Ok(s) if s.success() => 1,
        r => {
            say(&format!(
                "nimbus-mark-good: systemctl reboot failed ({r:?})"
            ));
            1
        }
    }
}

/// `nimbus-init mark-good`: after the boot-health delay, if every required
/// unit is active, mark the booted slot good; otherwise give an unproven
/// slot up (see [`health_failed`]).
/// The stage 1 that booted a slot now marked good becomes the default of
/// both loaders (nimbus::esp::bless). Not fatal: the old copy stays the
/// default, which boots too; the reason is recorded for `updatectl
/// status` and update-engine retries at its next start. Returns whether
/// the copy is the default now.
fn bless_stage1(disk_name: &str, copy: nimbus::esp::Copy, mnt: &Path) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let out = match partition_dev(disk_name, layout::ESP_PARTITION) {
        Ok((_, dev)) => nimbus::esp::bless_recorded(
            &nimbus::esp::MountedEsp {
                dev,
                mnt: mnt.to_path_buf(),
            },
            copy,
            Path::new("/"),
            now,
        ),
        Err(e) => nimbus::esp::BlessOutcome {
            result: Err(nimbus::esp::EspError::Invalid(e)),
            record_error: None,
        },
    };
    if let Some(e) = &out.record_error {
        eprintln!(
            "nimbus-mark-good: recording the stage-1 bless in /{}: {e}",
            nimbus::paths::STAGE1_BLESS_FAILURE
        );
    }
    match out.result {
        Ok(true) => {
            say(&format!(
                "nimbus-mark-good: stage 1 copy {copy} is now the default of both loaders"
            ));
            true
        }
        Ok(false) => true,
        Err(e) => {
            say(&format!(
                "nimbus-mark-good: stage 1 copy {copy} not made the default: {e} (recorded; update-engine retries at its next start)"
            ));
            false
        }
    }
}

/// `nimbus-init bless-stage1 [--check]`: make the running stage 1 the
/// default of both loaders now, as mark-good does after marking the slot
/// good (the slot must be good already); `--check` only reads the ESP and
/// says whether it is. Exit 0 when it is the default, 1 when not.
fn bless_stage1_cmd(check: bool) -> i32 {
    let cmdline = nimbus::boot::booted_cmdline(Path::new("/")).unwrap_or_default();
    let Some(args) = nimbus::boot::parse_cmdline(&cmdline) else {
        eprintln!("nimbus-init bless-stage1: not booted through nimbus-init (no nimbus.usr=)");
        return 2;
    };
    let Some(copy) = nimbus::esp::running_copy(&cmdline) else {
        eprintln!("nimbus-init bless-stage1: the loader did not say which stage-1 copy it started (no nimbus.stage1=)");
        return 2;
    };
    let (disk_name, disk) = match find_running_disk(&args, false) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("nimbus-init bless-stage1: {e}");
            return 2;
        }
    };
    let mnt = Path::new("/run/nimbus/bless/esp");
    if check {
        let r = partition_dev(&disk_name, layout::ESP_PARTITION).and_then(|(_, dev)| {
            let mut blessed = false;
            nimbus::esp::with_mounted(&dev, mnt, false, &mut |fs| {
                blessed = nimbus::esp::is_blessed(fs, copy)?;
                Ok(())
            })
            .map_err(|e| e.to_string())?;
            Ok(blessed)
        });
        return match r {
            Ok(true) => {
                println!("stage 1 copy {copy} is the default of both loaders");
                0
            }
            Ok(false) => {
                println!("stage 1 copy {copy} is not the default of both loaders");
                1
            }
            Err(e) => {
                eprintln!("nimbus-init bless-stage1 --check: {e}");
                2
            }
        };
    }
    let good = Slot::ALL.into_iter().any(|s| {
        disk.partition(s.partition_number()).ok().map(|p| p.uuid) == Some(args.partuuid)
            && disk
                .slot_table()
                .iter()
                .any(|e| e.number == s.partition_number() && e.prio().successful)
    });
    if !good {
        eprintln!("nimbus-init bless-stage1: the booted slot is not marked good yet (mark-good blesses after it)");
        return 1;
    }
    if bless_stage1(&disk_name, copy, mnt) {
        println!("stage 1 copy {copy} is the default of both loaders");
        0
    } else {
        1
    }
}

fn mark_good() -> i32 {
    let delay: u64 = std::env::var("NIMBUS_HEALTH_DELAY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let units: Vec<String> = std::env::var("NIMBUS_HEALTH_UNITS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let cmdline = nimbus::boot::booted_cmdline(Path::new("/")).unwrap_or_default();
    let Some(args) = nimbus::boot::parse_cmdline(&cmdline) else {
        eprintln!(
            "nimbus-mark-good: not booted through nimbus-init (no nimbus.usr= on the command line)"
        );
        return 1;
    };
    std::thread::sleep(Duration::from_secs(delay));
    let failure = units.iter().find_map(|u| unit_failure(u));
    let (disk_name, mut disk) = match find_running_disk(&args, true) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("nimbus-mark-good: {e}");
            return 1;
        }
    };
    let Some(slot) = Slot::ALL
        .into_iter()
        .find(|s| disk.partition(s.partition_number()).ok().map(|p| p.uuid) == Some(args.partuuid))
    else {
        eprintln!(
            "nimbus-mark-good: no USR slot with PARTUUID {}",
            args.partuuid
        );
        return 1;
    };
    let version = disk
        .read_descriptor(slot)
        .ok()
        .and_then(|b| SlotDescriptor::parse_unverified(&b).ok())
        .map(|d| d.version.to_string())
        .unwrap_or_else(|| "unknown".into());
    if let Some(reason) = failure {
        return health_failed(&disk, slot, args.partuuid, &version, &reason);
    }
    match disk.update_slots(|t| slots::mark_good(t, slot.partition_number())) {
        Ok(()) => {
            say(&format!(
                "nimbus-mark-good: {slot} marked good (version {version})"
            ));
            if let Some(copy) = nimbus::esp::running_copy(&cmdline) {
                bless_stage1(&disk_name, copy, Path::new("/run/nimbus/mark-good/esp"));
            }
            0
        }
        Err(e) => {
            eprintln!("nimbus-mark-good: {e}");
            1
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("mark-good") => std::process::exit(mark_good()),
        Some("bless-stage1") => {
            let check = match args.get(2).map(String::as_str) {
                None => false,
                Some("--check") => true,
                Some(a) => {
                    eprintln!("nimbus-init bless-stage1: unknown argument {a:?} (only --check)");
                    std::process::exit(2);
                }
            };
            std::process::exit(bless_stage1_cmd(check));
        }
        _ => {}
    }
    if std::process::id() != 1 {
        eprintln!("usage: nimbus-init mark-good | nimbus-init bless-stage1 [--check]   (as /init it must run as PID 1)");
        std::process::exit(2);
    }
    mount_basics();
    load_modules();
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    match nimbus::boot::parse_cmdline(&cmdline) {
        Some(a) => stage2(a),
        None => stage1(),
    }
}
