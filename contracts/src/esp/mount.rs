//! The ESP of a running host: mounted once per device under a lock
//! (`/run/nimbus/esp.lock`), read-only unless a change needs it, and
//! every way it can be busy told apart.

use super::{io_at, DirEsp, Esp, EspError, EspFs};
use std::path::{Path, PathBuf};

/// Every Nimbus process that mounts the ESP (update-engine, mark-good,
/// `nimbus-init esp-check`) holds this lock for the whole mount: two of
/// them never mount it with different read-only states at once (Linux
/// keeps one superblock per block device, so the second would get EBUSY).
pub const ESP_LOCK: &str = "/run/nimbus/esp.lock";

/// How long a mount waits for another Nimbus process's ESP work.
pub(super) const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Mount the vfat partition `dev` at `mnt` (a directory only root can
/// enter, made 0700 if missing) for the duration of `f`, then unmount.
/// Read-only unless `write`. Works whatever else has the partition
/// mounted, in this mount namespace or another, automount or not, as
/// long as that allows what is asked: a write needs the partition's
/// superblock writable, and when something holds it read-only (an
/// operator's `ro` mount, or the kernel after a FAT error) the error says
/// where and why, and nothing is written.
pub fn with_mounted(
    dev: &Path,
    mnt: &Path,
    write: bool,
    f: &mut dyn FnMut(&dyn EspFs) -> Result<(), EspError>,
) -> Result<(), EspError> {
    use std::os::unix::fs::DirBuilderExt;
    let _lock = EspLock::take(Path::new(ESP_LOCK), LOCK_WAIT)?;
    if let Some(parent) = mnt.parent() {
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent);
    }
    match std::fs::DirBuilder::new().mode(0o700).create(mnt) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_at(mnt)(e)),
    }
    // A mount of ours left by a process that died inside `f`: mounting
    // the same source on it again would be EBUSY too.
    if is_mount_point(mnt) {
        let _ = nix::mount::umount2(mnt, nix::mount::MntFlags::MNT_DETACH);
    }
    mount_esp(dev, mnt, write)?;
    let r = f(&DirEsp(mnt.to_path_buf()));
    // Every change was synced as it was made; a failed unmount loses nothing.
    let _ = nix::mount::umount2(mnt, nix::mount::MntFlags::empty());
    r
}

pub(super) fn mount_esp(dev: &Path, mnt: &Path, write: bool) -> Result<(), EspError> {
    use nix::errno::Errno;
    use nix::mount::{mount, MsFlags};
    const OPTS: &str = "umask=0077,codepage=437,iocharset=ascii";
    let base = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let failed = |e: Errno, what: &str| {
        EspError::Invalid(format!(
            "mount {} (vfat{what}) on {}: {e}",
            dev.display(),
            mnt.display()
        ))
    };
    let asked = if write {
        base
    } else {
        base | MsFlags::MS_RDONLY
    };
    match mount(Some(dev), mnt, Some("vfat"), asked, Some(OPTS)) {
        Ok(()) => return Ok(()),
        // EBUSY here means the superblock exists with the other read-only
        // state (a new mount cannot change it).
        Err(Errno::EBUSY) => {}
        Err(e) => return Err(failed(e, if write { "" } else { ", read-only" })),
    }
    if write {
        return Err(EspError::ReadOnly {
            dev: dev.to_path_buf(),
            why: read_only_holder(dev),
        });
    }
    // Something holds it read-write: share that superblock, and make our
    // own mount point read-only so this reader cannot write through it.
    mount(Some(dev), mnt, Some("vfat"), base, Some(OPTS))
        .map_err(|e| failed(e, ", sharing a writable mount"))?;
    if let Err(e) = mount(
        None::<&str>,
        mnt,
        None::<&str>,
        base | MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        let _ = nix::mount::umount2(mnt, nix::mount::MntFlags::empty());
        return Err(failed(e, ", bind-remounting read-only"));
    }
    Ok(())
}

/// Why the partition's superblock is read-only, from what this mount
/// namespace can see.
pub(super) fn read_only_holder(dev: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(dev) else {
        return "it is mounted read-only somewhere".into();
    };
    let rdev = md.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    describe_read_only(&mounts_of(&info, major, minor))
}

/// One line of /proc/self/mountinfo for the partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MountOf {
    pub(super) at: PathBuf,
    /// The mount point's own read-only flag.
    pub(super) mount_ro: bool,
    /// The superblock's (shared by every mount of the partition).
    pub(super) super_ro: bool,
}

pub(super) fn mounts_of(info: &str, major: u64, minor: u64) -> Vec<MountOf> {
    let want = format!("{major}:{minor}");
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            if f.get(2) != Some(&want.as_str()) {
                return None;
            }
            // Octal escapes (\040 for a space) in the mount point.
            let at = f.get(4)?.replace("\\040", " ");
            let mount_ro = f.get(5)?.split(',').any(|o| o == "ro");
            // Optional fields end at " - "; then type, source, super options.
            let dash = f.iter().position(|x| *x == "-")?;
            let super_ro = f.get(dash + 3)?.split(',').any(|o| o == "ro");
            Some(MountOf {
                at: PathBuf::from(at),
                mount_ro,
                super_ro,
            })
        })
        .collect()
}

pub(super) fn describe_read_only(mounts: &[MountOf]) -> String {
    if let Some(m) = mounts.iter().find(|m| m.super_ro && !m.mount_ro) {
        return format!(
            "the kernel made it read-only (mounted read-write at {}, its superblock is now read-only: \
             a FAT error under errors=remount-ro; see the kernel log and run fsck.fat)",
            m.at.display()
        );
    }
    match mounts.iter().find(|m| m.mount_ro) {
        Some(m) => format!(
            "it is mounted read-only at {} (remount that read-write, or unmount it, and Nimbus can write)",
            m.at.display()
        ),
        None => "it is mounted read-only in another mount namespace (not visible from here: \
                 a container or a service with its own mounts)"
            .into(),
    }
}

pub(super) fn is_mount_point(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::symlink_metadata(p),
        p.parent().map(std::fs::symlink_metadata),
    ) {
        (Ok(a), Some(Ok(b))) => a.dev() != b.dev(),
        _ => false,
    }
}

/// The exclusive lock on [`ESP_LOCK`], released on drop.
pub(super) struct EspLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

impl EspLock {
    pub(super) fn take(path: &Path, wait: std::time::Duration) -> Result<EspLock, EspError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        if let Some(parent) = path.parent() {
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent);
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io_at(path))?;
        let t0 = std::time::Instant::now();
        loop {
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(l) => return Ok(EspLock(l)),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) if t0.elapsed() < wait => {
                    file = f;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err((_, e)) => {
                    return Err(EspError::Invalid(format!(
                        "{}: {e} (another Nimbus process kept the ESP for {} s)",
                        path.display(),
                        wait.as_secs()
                    )))
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Stage-1 copies

/// A running host's ESP, by its partition device: mounted at `mnt` (under
/// /run, only root can enter) for the moment of each piece of work.
pub struct MountedEsp {
    pub dev: PathBuf,
    pub mnt: PathBuf,
}

impl Esp for MountedEsp {
    fn with(
        &self,
        write: bool,
        f: &mut dyn FnMut(&dyn EspFs) -> Result<(), EspError>,
    ) -> Result<(), EspError> {
        with_mounted(&self.dev, &self.mnt, write, f)
    }
}
