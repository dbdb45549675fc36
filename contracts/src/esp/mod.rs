//! The Nimbus files on the EFI system partition and every change made to
//! them after the build (docs/boot.md, "Stage 1 updates itself"):
//!
//! ```text
//! EFI/BOOT/BOOTX64.EFI                  systemd-boot (UEFI)
//! loader/loader.conf                    default nimbus-*
//! loader/entries/nimbus-<gen>-<copy>[+<left>[-<done>]].conf
//! nimbus/a/{vmlinuz,stage1.img}         stage 1, copy a
//! nimbus/b/{vmlinuz,stage1.img}         stage 1, copy b
//! nimbus/grubenv                        GRUB's choice (BIOS): default copy, copy on trial
//! nimbus/trust/<n>.json(.sig)           trust rotations (CHAIN_DIR; crate::chain)
//! ```
//!
//! Two loaders read the same ESP, each with its own try counter. systemd-boot
//! counts tries in entry file names (the Boot Loader Specification's boot
//! counting: it renames `+1` to `+0-1` before starting the entry, sorts an
//! entry with no tries left last, and takes the newest generation matching
//! `nimbus-*` otherwise). GRUB's embedded script does the same with
//! `nimbus/grubenv`: a copy on trial with one try is booted once (the try
//! is written back first), after that the default copy again.
//!
//! A new stage 1 goes into the copy that is not running, in an order where a
//! cut anywhere leaves a loader choice whose files are complete: first no
//! entry may name that copy, then its files, then its entry with one try,
//! then GRUB's trial, each step durable. The old copy stays until the new
//! one has booted a slot that was marked good (`bless`), and is only
//! overwritten by the stage-1 update after that.

mod loaders;
mod mount;

pub use loaders::*;
pub use mount::*;

use std::path::{Path, PathBuf};

/// The trust rotations stage 1 reads ([`crate::chain`]).
pub const CHAIN_DIR: &str = "nimbus/trust";

pub const GRUBENV: &str = "nimbus/grubenv";

/// systemd-boot, where UEFI firmware looks on removable media.
pub const EFI_LOADER: &str = "EFI/BOOT/BOOTX64.EFI";

/// GRUB's script (the core image in BIOS-BOOT only finds the ESP and runs it).
pub const GRUB_SCRIPT: &str = "nimbus/grub.cfg";

pub const ENTRIES: &str = "loader/entries";

pub const KERNEL: &str = "vmlinuz";

pub const INITRAMFS: &str = "stage1.img";

#[derive(Debug, thiserror::Error)]
pub enum EspError {
    #[error("ESP {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ESP: {0}")]
    Invalid(String),
    /// A write was asked and the partition's superblock is read-only.
    #[error("ESP {dev} cannot be written: {why}")]
    ReadOnly { dev: PathBuf, why: String },
}

fn io_at(p: &Path) -> impl FnOnce(std::io::Error) -> EspError + '_ {
    move |source| EspError::Io {
        path: p.to_path_buf(),
        source,
    }
}

/// The file operations the ESP needs, paths relative to its root. Every
/// change is durable when it returns (a mounted ESP: temp file, fsync,
/// rename, directory fsync).
pub trait EspFs {
    /// A file's bytes, `None` when it does not exist; refused above `limit`.
    fn read(&self, rel: &str, limit: usize) -> Result<Option<Vec<u8>>, EspError>;
    /// Names in a directory (none when it does not exist).
    fn list(&self, rel_dir: &str) -> Result<Vec<String>, EspError>;
    /// Replace (or create) a file, making its directory if needed: a new
    /// file, then a rename over the old one.
    fn replace(&self, rel: &str, data: &[u8]) -> Result<(), EspError>;
    /// Write a file nothing refers to yet, in place (no rename: on FAT a
    /// rename is not atomic). Makes its directory if needed.
    fn write_new(&self, rel: &str, data: &[u8]) -> Result<(), EspError> {
        self.replace(rel, data)
    }
    /// Rewrite a file of the same size in place (GRUB's environment
    /// block); a missing file or another size falls back to `replace`.
    fn overwrite(&self, rel: &str, data: &[u8]) -> Result<(), EspError> {
        self.replace(rel, data)
    }
    fn rename(&self, from: &str, to: &str) -> Result<(), EspError>;
    /// Remove a file; a missing file is not an error.
    fn remove(&self, rel: &str) -> Result<(), EspError>;
}

/// How a program reaches the ESP: mounted for the duration of `with`
/// (a running host), a directory (tests, the power-cut harness), or the
/// partition inside an image file (host mode).
pub trait Esp: Send + Sync {
    fn with(
        &self,
        write: bool,
        f: &mut dyn FnMut(&dyn EspFs) -> Result<(), EspError>,
    ) -> Result<(), EspError>;
}

/// An ESP already mounted at a directory.
pub struct DirEsp(pub PathBuf);

impl EspFs for DirEsp {
    fn read(&self, rel: &str, limit: usize) -> Result<Option<Vec<u8>>, EspError> {
        use std::io::Read;
        let p = self.0.join(rel);
        let f = match std::fs::File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_at(&p)(e)),
        };
        let mut b = Vec::new();
        f.take(limit as u64 + 1)
            .read_to_end(&mut b)
            .map_err(io_at(&p))?;
        if b.len() > limit {
            return Err(EspError::Invalid(format!(
                "{rel} is larger than {limit} bytes"
            )));
        }
        Ok(Some(b))
    }

    fn list(&self, rel_dir: &str) -> Result<Vec<String>, EspError> {
        let p = self.0.join(rel_dir);
        let rd = match std::fs::read_dir(&p) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_at(&p)(e)),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(io_at(&p))?;
            out.push(e.file_name().to_string_lossy().into_owned());
        }
        out.sort();
        Ok(out)
    }

    fn replace(&self, rel: &str, data: &[u8]) -> Result<(), EspError> {
        let p = self.0.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(io_at(d))?;
        }
        crate::durable::write_atomic(&p, data, 0o644)
            .and_then(|()| vfat_settle(&p))
            .map_err(|e| EspError::Invalid(format!("{rel}: {e}")))
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), EspError> {
        let (f, t) = (self.0.join(from), self.0.join(to));
        crate::durable::rename_and_sync(&f, &t)
            .and_then(|()| vfat_settle(&t))
            .map_err(|e| EspError::Invalid(format!("rename {from} to {to}: {e}")))
    }

    fn write_new(&self, rel: &str, data: &[u8]) -> Result<(), EspError> {
        let p = self.0.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(io_at(d))?;
        }
        crate::durable::write_new(&p, data).map_err(|e| EspError::Invalid(format!("{rel}: {e}")))
    }

    fn overwrite(&self, rel: &str, data: &[u8]) -> Result<(), EspError> {
        let p = self.0.join(rel);
        match std::fs::metadata(&p) {
            Ok(m) if m.len() == data.len() as u64 => crate::durable::overwrite_in_place(&p, data)
                .map_err(|e| EspError::Invalid(format!("{rel}: {e}"))),
            _ => self.replace(rel, data),
        }
    }

    fn remove(&self, rel: &str) -> Result<(), EspError> {
        crate::durable::remove_and_sync(&self.0.join(rel))
            .map_err(|e| EspError::Invalid(format!("{rel}: {e}")))
    }
}

/// Linux's vfat writes a renamed file's new directory entry with size 0
/// and no first cluster; the real values reach the disk only when the
/// inode is written back. So the file is fsynced again at its new name,
/// then the directory (found by a QEMU guest killed after a "durable"
/// write: 0-byte files on the ESP). Between the rename and that fsync the
/// name can stand for an empty file: renames are used on the ESP only
/// where an empty file is safe or nothing better exists (see docs/boot.md).
fn vfat_settle(p: &Path) -> Result<(), crate::durable::DurableError> {
    crate::durable::sync_file(p)?;
    match p.parent() {
        Some(d) => crate::durable::sync_dir(d),
        None => Ok(()),
    }
}

impl Esp for DirEsp {
    fn with(
        &self,
        _write: bool,
        f: &mut dyn FnMut(&dyn EspFs) -> Result<(), EspError>,
    ) -> Result<(), EspError> {
        f(self)
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Copy {
    A,
    B,
}

impl Copy {
    pub fn other(self) -> Copy {
        match self {
            Copy::A => Copy::B,
            Copy::B => Copy::A,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Copy::A => "a",
            Copy::B => "b",
        }
    }

    pub fn parse(s: &str) -> Option<Copy> {
        match s {
            "a" => Some(Copy::A),
            "b" => Some(Copy::B),
            _ => None,
        }
    }

    pub fn dir(self) -> String {
        format!("nimbus/{}", self.name())
    }

    pub fn kernel(self) -> String {
        format!("{}/{KERNEL}", self.dir())
    }

    pub fn initramfs(self) -> String {
        format!("{}/{INITRAMFS}", self.dir())
    }
}

impl std::fmt::Display for Copy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The copy the running stage 1 came from (`nimbus.stage1=` on the kernel
/// command line, put there by the loader and handed on by stage 1).
pub fn running_copy(cmdline: &str) -> Option<Copy> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("nimbus.stage1="))
        .and_then(Copy::parse)
}

/// The files an image starts with for copy a: its entry (generation 1, no
/// counter) and GRUB's environment. Used by the image build.
pub fn initial_files(label: &str, cmdline: &str) -> Result<Vec<(String, Vec<u8>)>, EspError> {
    let mut env = Grubenv::default();
    env.set(Copy::A, None, 0);
    Ok(vec![
        (
            "loader/loader.conf".into(),
            b"default nimbus-*\ntimeout 0\nconsole-mode keep\n".to_vec(),
        ),
        (
            format!("{ENTRIES}/{}", Entry::name(1, Copy::A, None)),
            Entry::text(Copy::A, label, cmdline).into_bytes(),
        ),
        (GRUBENV.into(), env.to_bytes()?),
    ])
}

/// Install a new stage 1 into the copy that is not `running`. Returns the
/// copy written and its generation. See the module comment for the order.
pub fn install_stage1(
    fs: &dyn EspFs,
    running: Copy,
    kernel: &[u8],
    initramfs: &[u8],
    label: &str,
    cmdline: &str,
) -> Result<(Copy, u64), EspError> {
    let target = running.other();
    let all = entries(fs)?;
    // The generation is read from file names anyone with the ESP could
    // write: checked, so `nimbus-18446744073709551615-a.conf` is an error,
    // not a panic or a wrap to 0 that sorts below every entry.
    let gen = all
        .iter()
        .map(|e| e.gen)
        .max()
        .unwrap_or(0)
        .checked_add(1)
        .ok_or_else(|| {
            EspError::Invalid(format!(
                "{ENTRIES}: an entry has generation {}; no newer one can be written",
                u64::MAX
            ))
        })?;
    // 1. Nothing may lead a loader into the copy while it is rewritten.
    let mut env = grubenv(fs)?;
    if env.trial() == Some(target) || env.default_copy() == target {
        env.set(running, None, 0);
        fs.overwrite(GRUBENV, &env.to_bytes()?)?;
    }
    for e in all.iter().filter(|e| e.copy == target) {
        fs.remove(&format!("{ENTRIES}/{}", e.file))?;
    }
    // 2. The files, in place: nothing refers to them now.
    fs.write_new(&target.kernel(), kernel)?;
    fs.write_new(&target.initramfs(), initramfs)?;
    // 3. The switch, for each loader: one try. A new entry file (a torn
    // one is a bad entry, skipped, or fails its one try), then GRUB's
    // block rewritten in place (its variables sit in the first sector).
    fs.write_new(
        &format!("{ENTRIES}/{}", Entry::name(gen, target, Some(1))),
        Entry::text(target, label, cmdline).as_bytes(),
    )?;
    env.set(running, Some(target), 1);
    fs.overwrite(GRUBENV, &env.to_bytes()?)?;
    Ok((target, gen))
}

/// After the slot booted by stage-1 copy `running` was marked good: make
/// that copy the default for both loaders. Idempotent; returns whether it
/// changed anything.
pub fn bless(fs: &dyn EspFs, running: Copy) -> Result<bool, EspError> {
    let mut changed = false;
    for e in entries(fs)?
        .into_iter()
        .filter(|e| e.copy == running && e.tries_left.is_some())
    {
        fs.rename(
            &format!("{ENTRIES}/{}", e.file),
            &format!("{ENTRIES}/{}", Entry::name(e.gen, e.copy, None)),
        )?;
        changed = true;
    }
    let mut env = grubenv(fs)?;
    if env.trial() == Some(running) || env.default_copy() != running {
        env.set(running, None, 0);
        fs.overwrite(GRUBENV, &env.to_bytes()?)?;
        changed = true;
    }
    Ok(changed)
}

/// Whether `running` is already the default of both loaders (what
/// [`bless`] would leave).
pub fn is_blessed(fs: &dyn EspFs, running: Copy) -> Result<bool, EspError> {
    let on_trial = entries(fs)?
        .iter()
        .any(|e| e.copy == running && e.tries_left.is_some());
    let env = grubenv(fs)?;
    Ok(!on_trial && env.trial() != Some(running) && env.default_copy() == running)
}

/// A stage 1 that booted a slot now marked good but could not be made the
/// loaders' default: written by whoever tried (mark-good, update-engine's
/// retry at start), removed once it is the default, reported by
/// `updatectl status`. The contract is [`crate::paths::STAGE1_BLESS_FAILURE`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlessFailure {
    pub copy: Copy,
    pub reason: String,
    /// Unix seconds.
    pub at: i64,
}

impl BlessFailure {
    pub fn read(root: &Path) -> Option<BlessFailure> {
        let b = std::fs::read(root.join(crate::paths::STAGE1_BLESS_FAILURE)).ok()?;
        serde_json::from_slice(&b).ok()
    }
}

/// What [`bless_recorded`] did.
#[derive(Debug)]
pub struct BlessOutcome {
    /// Whether the ESP changed; the error when `running` could not be
    /// made the default.
    pub result: Result<bool, EspError>,
    /// Keeping the record in step failed (the bless itself is what counts).
    pub record_error: Option<String>,
}

/// Make `running` the default of both loaders through `esp` (a read
/// first: nothing is mounted read-write when it already is), and keep the
/// [`BlessFailure`] record under `root` true either way.
pub fn bless_recorded(esp: &dyn Esp, running: Copy, root: &Path, now: i64) -> BlessOutcome {
    let mut done = false;
    let mut result = esp
        .with(false, &mut |fs| {
            done = is_blessed(fs, running)?;
            Ok(())
        })
        .map(|()| false);
    if result.is_ok() && !done {
        let mut changed = false;
        result = esp
            .with(true, &mut |fs| {
                changed = bless(fs, running)?;
                Ok(())
            })
            .map(|()| changed);
    }
    let path = root.join(crate::paths::STAGE1_BLESS_FAILURE);
    let record = match &result {
        Ok(_) => crate::durable::remove_and_sync(&path),
        Err(e) => {
            let f = BlessFailure {
                copy: running,
                reason: e.to_string(),
                at: now,
            };
            let mut b = serde_json::to_vec_pretty(&f).unwrap_or_default();
            b.push(b'\n');
            if let Some(d) = path.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            crate::durable::write_atomic(&path, &b, 0o644)
        }
    };
    BlessOutcome {
        result,
        record_error: record.err().map(|e| e.to_string()),
    }
}

/// A stage-1 trial that did not come up: the other copy was on trial, its
/// try is spent, and the loader came back to `running`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FailedTrial {
    pub copy: Copy,
    pub gen: Option<u64>,
}

pub fn failed_trial(fs: &dyn EspFs, running: Copy) -> Result<Option<FailedTrial>, EspError> {
    let other = running.other();
    let bad = entries(fs)?
        .into_iter()
        .find(|e| e.copy == other && e.bad());
    let env = grubenv(fs)?;
    let grub_failed = env.trial() == Some(other) && env.tries() == 0;
    Ok(match (bad, grub_failed) {
        (Some(e), _) => Some(FailedTrial {
            copy: other,
            gen: Some(e.gen),
        }),
        (None, true) => Some(FailedTrial {
            copy: other,
            gen: None,
        }),
        (None, false) => None,
    })
}

/// Forget a failed trial: its entry goes, GRUB's trial is cleared. The
/// copy's files stay until the next stage-1 update overwrites them.
pub fn clear_trial(fs: &dyn EspFs, running: Copy) -> Result<(), EspError> {
    for e in entries(fs)?
        .into_iter()
        .filter(|e| e.copy == running.other())
    {
        fs.remove(&format!("{ENTRIES}/{}", e.file))?;
    }
    let mut env = grubenv(fs)?;
    if env.trial().is_some() || env.default_copy() != running {
        env.set(running, None, 0);
        fs.overwrite(GRUBENV, &env.to_bytes()?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esp() -> (tempfile::TempDir, DirEsp) {
        let d = tempfile::tempdir().unwrap();
        let e = DirEsp(d.path().to_path_buf());
        for (p, b) in initial_files("1.0.0", "console=ttyS0").unwrap() {
            e.replace(&p, &b).unwrap();
        }
        e.replace(&Copy::A.kernel(), b"kernel 1").unwrap();
        e.replace(&Copy::A.initramfs(), b"initrd 1").unwrap();
        (d, e)
    }

    /// Boot with systemd-boot: spend the try as it does; the copy started.
    fn sd(e: &DirEsp) -> Copy {
        let (entry, renamed) = sdboot_boot(&entries(e).unwrap()).unwrap();
        if let Some(r) = renamed {
            e.rename(
                &format!("{ENTRIES}/{}", entry.file),
                &format!("{ENTRIES}/{}", r.file),
            )
            .unwrap();
        }
        entry.copy
    }

    /// Boot with GRUB's script.
    fn grub(e: &DirEsp) -> Copy {
        let (c, next) = grubenv(e).unwrap().grub_boot();
        e.replace(GRUBENV, &next.to_bytes().unwrap()).unwrap();
        c
    }

    #[test]
    fn grubenv_is_a_1024_byte_block_grub_can_read() {
        let mut g = Grubenv::default();
        g.set(Copy::B, Some(Copy::A), 1);
        let b = g.to_bytes().unwrap();
        assert_eq!(b.len(), 1024);
        assert!(b.starts_with(b"# GRUB Environment Block\nnimbus_s1=b\n"));
        assert_eq!(Grubenv::parse(&b).unwrap(), g);
        assert!(Grubenv::parse(b"junk").is_err());
    }

    #[test]
    fn the_mounts_of_a_partition_are_found_by_device_number() {
        let info = "22 1 254:9 / / rw,relatime - ext4 /dev/vda9 rw\n\
                    42 22 0:35 / /boot rw,relatime shared:25 - autofs systemd-1 rw,fd=45\n\
                    281 42 254:1 / /boot rw,nosuid,relatime shared:75 - vfat /dev/vda1 rw,fmask=0077\n\
                    300 22 254:1 / /mnt/esp\\040copy ro,relatime - vfat /dev/vda1 ro\n";
        let m = mounts_of(info, 254, 1);
        assert_eq!(
            m,
            vec![
                MountOf {
                    at: PathBuf::from("/boot"),
                    mount_ro: false,
                    super_ro: false
                },
                MountOf {
                    at: PathBuf::from("/mnt/esp copy"),
                    mount_ro: true,
                    super_ro: true
                }
            ]
        );
        assert!(mounts_of(info, 254, 2).is_empty());
        assert!(mounts_of("garbage\n\n254:1\n", 254, 1).is_empty());
    }

    #[test]
    fn a_read_only_partition_is_explained() {
        let ro_at = |at: &str, mount_ro, super_ro| MountOf {
            at: PathBuf::from(at),
            mount_ro,
            super_ro,
        };
        let why = describe_read_only(&[ro_at("/boot", true, true)]);
        assert!(why.contains("mounted read-only at /boot"), "{why}");
        // Mount point rw, superblock ro: the kernel's errors=remount-ro.
        let why = describe_read_only(&[ro_at("/boot", false, true)]);
        assert!(why.contains("the kernel made it read-only"), "{why}");
        assert!(why.contains("/boot"), "{why}");
        let why = describe_read_only(&[]);
        assert!(why.contains("another mount namespace"), "{why}");
    }

    #[test]
    fn the_esp_lock_is_exclusive_and_bounded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("esp.lock");
        let held = EspLock::take(&p, std::time::Duration::from_secs(1)).unwrap();
        let t0 = std::time::Instant::now();
        let e = EspLock::take(&p, std::time::Duration::from_millis(300))
            .err()
            .expect("a second holder");
        assert!(t0.elapsed() >= std::time::Duration::from_millis(300));
        assert!(
            e.to_string()
                .contains("another Nimbus process kept the ESP"),
            "{e}"
        );
        drop(held);
        EspLock::take(&p, std::time::Duration::from_secs(1)).unwrap();
        // Never through a symlink (O_NOFOLLOW).
        let q = d.path().join("link.lock");
        std::os::unix::fs::symlink(&p, &q).unwrap();
        assert!(EspLock::take(&q, std::time::Duration::from_millis(100)).is_err());
    }

    #[test]
    fn entry_names_round_trip() {
        let e = Entry::parse("nimbus-12-b+0-1.conf").unwrap();
        assert_eq!((e.gen, e.copy, e.tries_left), (12, Copy::B, Some(0)));
        assert!(e.bad());
        assert_eq!(Entry::parse("nimbus-3-a.conf").unwrap().tries_left, None);
        assert_eq!(Entry::parse("other.conf"), None);
        assert_eq!(Entry::parse("nimbus-x-a.conf"), None);
        assert_eq!(running_copy("console=ttyS0 nimbus.stage1=b"), Some(Copy::B));
    }

    #[test]
    fn the_largest_generation_is_an_error_not_a_panic() {
        let (_d, e) = esp();
        e.write_new(
            &format!("{ENTRIES}/{}", Entry::name(u64::MAX, Copy::A, None)),
            b"title x\n",
        )
        .unwrap();
        let before = e.list(ENTRIES).unwrap();
        let err = install_stage1(&e, Copy::A, b"k", b"i", "1.1.0", "x").unwrap_err();
        assert!(err.to_string().contains("no newer one"), "{err}");
        assert_eq!(e.list(ENTRIES).unwrap(), before, "nothing was written");
    }

    #[test]
    fn a_good_update_switches_both_loaders_after_bless() {
        for loader in [sd as fn(&DirEsp) -> Copy, grub] {
            let (_d, e) = esp();
            assert_eq!(loader(&e), Copy::A);
            let (c, gen) =
                install_stage1(&e, Copy::A, b"kernel 2", b"initrd 2", "1.1.0", "x").unwrap();
            assert_eq!((c, gen), (Copy::B, 2));
            assert_eq!(loader(&e), Copy::B, "the trial boots the new copy");
            assert!(bless(&e, Copy::B).unwrap());
            assert!(!bless(&e, Copy::B).unwrap(), "idempotent");
            assert_eq!(failed_trial(&e, Copy::B).unwrap(), None);
            assert_eq!(loader(&e), Copy::B);
            assert_eq!(loader(&e), Copy::B);
            assert_eq!(
                e.read("nimbus/a/vmlinuz", 64).unwrap().unwrap(),
                b"kernel 1",
                "old copy kept"
            );
            // The next update goes into a, and the entry of a is gone first.
            install_stage1(&e, Copy::B, b"kernel 3", b"initrd 3", "1.2.0", "x").unwrap();
            let names: Vec<String> = entries(&e).unwrap().into_iter().map(|x| x.file).collect();
            assert_eq!(names, vec!["nimbus-2-b.conf", "nimbus-3-a+1.conf"]);
        }
    }

    /// An ESP that can be read but not written, as when something holds
    /// the partition read-only.
    struct ReadOnlyEsp<'a>(&'a DirEsp, std::sync::atomic::AtomicBool);
    impl Esp for ReadOnlyEsp<'_> {
        fn with(
            &self,
            write: bool,
            f: &mut dyn FnMut(&dyn EspFs) -> Result<(), EspError>,
        ) -> Result<(), EspError> {
            if write && self.1.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(EspError::ReadOnly {
                    dev: PathBuf::from("/dev/vda1"),
                    why: "it is mounted read-only at /boot".into(),
                });
            }
            f(self.0)
        }
    }

    #[test]
    fn a_bless_that_cannot_write_is_recorded_then_retried() {
        let (_d, e) = esp();
        let root = tempfile::tempdir().unwrap();
        install_stage1(&e, Copy::A, b"kernel 2", b"initrd 2", "1.1.0", "x").unwrap();
        assert_eq!(grub(&e), Copy::B);
        assert!(!is_blessed(&e, Copy::B).unwrap());
        let ro = ReadOnlyEsp(&e, std::sync::atomic::AtomicBool::new(true));
        let out = bless_recorded(&ro, Copy::B, root.path(), 7);
        assert!(out.record_error.is_none());
        let err = out.result.unwrap_err().to_string();
        assert!(
            err.contains("/dev/vda1 cannot be written: it is mounted read-only at /boot"),
            "{err}"
        );
        let rec = BlessFailure::read(root.path()).expect("recorded");
        assert_eq!((rec.copy, rec.at), (Copy::B, 7));
        assert!(rec.reason.contains("read-only at /boot"));
        assert!(!is_blessed(&e, Copy::B).unwrap(), "nothing written");
        // Writable again: the retry blesses and the record goes.
        ro.1.store(false, std::sync::atomic::Ordering::Relaxed);
        let out = bless_recorded(&ro, Copy::B, root.path(), 8);
        assert!(out.result.unwrap());
        assert!(BlessFailure::read(root.path()).is_none());
        assert!(is_blessed(&e, Copy::B).unwrap());
        assert_eq!(grub(&e), Copy::B);
        // Already blessed: only a read, even where writes would fail.
        ro.1.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(!bless_recorded(&ro, Copy::B, root.path(), 9).result.unwrap());
    }

    #[test]
    fn a_trial_that_never_comes_up_falls_back_and_is_reported() {
        for loader in [sd as fn(&DirEsp) -> Copy, grub] {
            let (_d, e) = esp();
            install_stage1(&e, Copy::A, b"bad kernel", b"initrd 2", "1.1.0", "x").unwrap();
            assert_eq!(loader(&e), Copy::B);
            // It panicked; the machine reset; no bless.
            assert_eq!(loader(&e), Copy::A, "the loader goes back to the old copy");
            assert_eq!(loader(&e), Copy::A);
            let f = failed_trial(&e, Copy::A).unwrap().expect("failure seen");
            assert_eq!(f.copy, Copy::B);
            clear_trial(&e, Copy::A).unwrap();
            assert_eq!(failed_trial(&e, Copy::A).unwrap(), None);
            assert_eq!(loader(&e), Copy::A);
        }
    }
}
