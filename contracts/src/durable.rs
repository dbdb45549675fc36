//! Crash-safe file replacement: write a temp file beside the target, fsync it,
//! rename it over the target, fsync the directory. After a power cut the file
//! holds either the old or the new bytes, never a mix.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {op}: {source}")]
pub struct DurableError {
    pub path: PathBuf,
    pub op: &'static str,
    #[source]
    pub source: io::Error,
}

/// One step of a crash-safe write, as a crash-consistency harness needs to
/// see it (`cargo xtask powercut` replays these and cuts between them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsEvent {
    /// A new file was written with these bytes (not durable before its sync).
    Write {
        path: PathBuf,
        data: Vec<u8>,
    },
    /// A new symlink (durable once its directory is synced).
    Symlink {
        path: PathBuf,
        target: PathBuf,
    },
    SyncFile {
        path: PathBuf,
    },
    Rename {
        from: PathBuf,
        to: PathBuf,
    },
    SyncDir {
        dir: PathBuf,
    },
    /// A name removed (durable once its directory is synced).
    Remove {
        path: PathBuf,
    },
    /// An existing file rewritten in place with as many bytes as it had
    /// (durable after its sync; before, each 512-byte sector is old or new).
    Overwrite {
        path: PathBuf,
        data: Vec<u8>,
    },
}

/// `Some` while a harness records. A process-wide switch rather than a
/// parameter: the writers are deep inside the engine and cloud-config, and
/// recording must see exactly the calls production makes.
static TRACE: std::sync::Mutex<Option<Vec<FsEvent>>> = std::sync::Mutex::new(None);

/// Start recording [`FsEvent`]s (testing and the power-cut harness only).
pub fn trace_start() {
    if let Ok(mut t) = TRACE.lock() {
        *t = Some(Vec::new());
    }
}

/// Stop recording and return what was recorded.
pub fn trace_take() -> Vec<FsEvent> {
    TRACE
        .lock()
        .ok()
        .and_then(|mut t| t.take())
        .unwrap_or_default()
}

fn emit(e: impl FnOnce() -> FsEvent) {
    if let Ok(mut t) = TRACE.lock() {
        if let Some(v) = t.as_mut() {
            v.push(e());
        }
    }
}

fn err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> DurableError + 'a {
    move |source| DurableError {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// A temp name beside the target that nobody can guess in advance:
/// `.NAME.<16 random hex>.tmp`.
fn temp_name(dir: &Path, name: &str) -> std::path::PathBuf {
    let mut r = [0u8; 8];
    // Without randomness (never on Linux >= 3.17) the pid and clock still
    // make collisions unlikely, and O_EXCL turns one into an error.
    if getrandom::getrandom(&mut r).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        r = (t ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    dir.join(format!(".{name}.{}.tmp", hex::encode(r)))
}

/// Replace `path` with `data`, keeping the mode and owner of the file it
/// replaces (an update.conf made 0600 because it holds a password stays
/// 0600); a new file gets `new_mode` and the caller's owner.
pub fn write_atomic_keep_mode(path: &Path, data: &[u8], new_mode: u32) -> Result<(), DurableError> {
    use std::os::unix::fs::MetadataExt;
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => {
            write_atomic_owned(path, data, m.mode() & 0o7777, Some((m.uid(), m.gid())))
        }
        _ => write_atomic_owned(path, data, new_mode, None),
    }
}

/// Replace `path` with `data`, created with `mode` (e.g. 0o600 for secrets).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), DurableError> {
    write_atomic_owned(path, data, mode, None)
}

/// As [`write_atomic`], and also set the owner (uid, gid). Mode and owner are
/// set on the temp file before the rename, so the file never appears with
/// the wrong ones, and the mode ignores the umask.
pub fn write_atomic_owned(
    path: &Path,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), DurableError> {
    let (dir, dir_path, name) = open_parent(path)?;
    write_atomic_at(dir.as_fd(), &dir_path, &name, data, mode, owner)
}

/// The directory holding `path` (opened, following symlinks: for paths the
/// caller controls) and the last component.
fn open_parent(path: &Path) -> Result<(File, PathBuf, OsString), DurableError> {
    let dir_path = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| DurableError {
        path: path.to_path_buf(),
        op: "name",
        source: io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
    })?;
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(&dir_path)
        .map_err(err(path, "open directory"))?;
    Ok((dir, dir_path, name.to_os_string()))
}

fn cstr(p: &Path, name: &OsStr) -> Result<CString, DurableError> {
    CString::new(name.as_bytes()).map_err(|_| DurableError {
        path: p.join(name),
        op: "name",
        source: io::Error::new(io::ErrorKind::InvalidInput, "NUL in a file name"),
    })
}

fn last_err(path: PathBuf, op: &'static str) -> DurableError {
    DurableError {
        path,
        op,
        source: io::Error::last_os_error(),
    }
}

/// [`write_atomic_owned`] of `name` in the directory `dir` (whose path,
/// `dir_path`, is for messages and the trace): the temp file is created
/// relative to the open directory with O_EXCL|O_NOFOLLOW and an
/// unpredictable name, owner and mode are set on its descriptor, and it is
/// renamed within the same directory. Nothing on the way is resolved by
/// path again, so a directory a user can write cannot redirect the write
/// with a symlink, before or during it.
pub fn write_atomic_at(
    dir: BorrowedFd<'_>,
    dir_path: &Path,
    name: &OsStr,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), DurableError> {
    use std::os::unix::fs::PermissionsExt;
    let tmp_path = temp_name(dir_path, &name.to_string_lossy());
    let tmp_name = tmp_path.file_name().unwrap_or_default().to_os_string();
    let c_tmp = cstr(dir_path, &tmp_name)?;
    let c_name = cstr(dir_path, name)?;
    let target = dir_path.join(name);
    // SAFETY: openat with a valid directory fd and NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c_tmp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(last_err(tmp_path, "create"));
    }
    // SAFETY: fd was just returned by openat and is owned here only.
    let mut f = unsafe { File::from_raw_fd(fd) };
    let result = (|| {
        f.write_all(data).map_err(err(&tmp_path, "write"))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(err(&tmp_path, "chown"))?;
        }
        // After chown: chown clears setuid/setgid bits.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(err(&tmp_path, "chmod"))?;
        emit(|| FsEvent::Write {
            path: tmp_path.clone(),
            data: data.to_vec(),
        });
        f.sync_all().map_err(err(&tmp_path, "fsync"))?;
        emit(|| FsEvent::SyncFile {
            path: tmp_path.clone(),
        });
        rename_into_place(dir, dir_path, (&c_tmp, &tmp_path), (&c_name, &target))
    })();
    if result.is_err() {
        // SAFETY: as above; a failed unlink leaves only a stray temp file.
        unsafe { libc::unlinkat(dir.as_raw_fd(), c_tmp.as_ptr(), 0) };
    }
    result
}

/// Rename `from` to `to` (same directory or not) and make it durable:
/// the target's directory is synced, then the source's if it differs.
pub fn rename_and_sync(from: &Path, to: &Path) -> Result<(), DurableError> {
    std::fs::rename(from, to).map_err(err(to, "rename"))?;
    emit(|| FsEvent::Rename {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
    });
    let (pf, pt) = (from.parent(), to.parent());
    if let Some(d) = pt {
        sync_dir(d)?;
    }
    if let Some(d) = pf.filter(|d| Some(*d) != pt) {
        sync_dir(d)?;
    }
    Ok(())
}

/// Write a file that nothing refers to yet straight at its name (create or
/// truncate, write, fsync the file, fsync the directory): for FAT, where a
/// rename is not atomic, and a half-written file that nobody reads is
/// harmless until the caller's own switch step.
pub fn write_new(path: &Path, data: &[u8]) -> Result<(), DurableError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(err(path, "create"))?;
    f.write_all(data).map_err(err(path, "write"))?;
    emit(|| FsEvent::Write {
        path: path.to_path_buf(),
        data: data.to_vec(),
    });
    f.sync_all().map_err(err(path, "fsync"))?;
    emit(|| FsEvent::SyncFile {
        path: path.to_path_buf(),
    });
    match path.parent() {
        Some(d) => sync_dir(d),
        None => Ok(()),
    }
}

/// Rewrite an existing file of exactly `data.len()` bytes in place and
/// fsync it: its clusters and directory entry do not change, so on FAT
/// each sector is old or new (GRUB's `save_env` writes its environment
/// block the same way).
pub fn overwrite_in_place(path: &Path, data: &[u8]) -> Result<(), DurableError> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(err(path, "open"))?;
    let len = f.metadata().map_err(err(path, "stat"))?.len();
    if len != data.len() as u64 {
        return Err(DurableError {
            path: path.to_path_buf(),
            op: "overwrite",
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes on disk, {} to write in place", data.len()),
            ),
        });
    }
    f.write_all_at(data, 0).map_err(err(path, "write"))?;
    emit(|| FsEvent::Overwrite {
        path: path.to_path_buf(),
        data: data.to_vec(),
    });
    f.sync_all().map_err(err(path, "fsync"))?;
    emit(|| FsEvent::SyncFile {
        path: path.to_path_buf(),
    });
    Ok(())
}

/// fsync a file that is already in place (by opening it again).
pub fn sync_file(path: &Path) -> Result<(), DurableError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(err(path, "fsync"))?;
    emit(|| FsEvent::SyncFile {
        path: path.to_path_buf(),
    });
    Ok(())
}

/// Remove `path` (a missing file is not an error) and make it durable.
pub fn remove_and_sync(path: &Path) -> Result<(), DurableError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(path, "remove")(e)),
    }
    emit(|| FsEvent::Remove {
        path: path.to_path_buf(),
    });
    match path.parent() {
        Some(d) => sync_dir(d),
        None => Ok(()),
    }
}

/// Make a rename or create in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    let d = File::open(dir).map_err(err(dir, "open directory"))?;
    sync_dir_fd(d.as_fd(), dir)
}

/// [`sync_dir`] on an open directory.
pub fn sync_dir_fd(dir: BorrowedFd<'_>, dir_path: &Path) -> Result<(), DurableError> {
    // SAFETY: fsync on a borrowed, open descriptor.
    if unsafe { libc::fsync(dir.as_raw_fd()) } != 0 {
        return Err(last_err(dir_path.to_path_buf(), "fsync directory"));
    }
    emit(|| FsEvent::SyncDir {
        dir: dir_path.to_path_buf(),
    });
    Ok(())
}

/// Replace `path` with a symlink to `target`: link beside it, rename over,
/// fsync the directory.
pub fn symlink_atomic(target: &Path, path: &Path) -> Result<(), DurableError> {
    let (dir, dir_path, name) = open_parent(path)?;
    symlink_atomic_at(dir.as_fd(), &dir_path, &name, target)
}

/// [`symlink_atomic`] of `name` in the open directory `dir`.
pub fn symlink_atomic_at(
    dir: BorrowedFd<'_>,
    dir_path: &Path,
    name: &OsStr,
    target: &Path,
) -> Result<(), DurableError> {
    let tmp_path = temp_name(dir_path, &name.to_string_lossy());
    let tmp_name = tmp_path.file_name().unwrap_or_default().to_os_string();
    let c_tmp = cstr(dir_path, &tmp_name)?;
    let c_name = cstr(dir_path, name)?;
    let c_target = CString::new(target.as_os_str().as_bytes()).map_err(|_| DurableError {
        path: dir_path.join(name),
        op: "symlink",
        source: io::Error::new(io::ErrorKind::InvalidInput, "NUL in the link target"),
    })?;
    let path = dir_path.join(name);
    // symlinkat never follows or replaces an existing name: it is O_EXCL.
    // SAFETY: NUL-terminated strings and a valid directory fd.
    if unsafe { libc::symlinkat(c_target.as_ptr(), dir.as_raw_fd(), c_tmp.as_ptr()) } != 0 {
        return Err(last_err(tmp_path, "symlink"));
    }
    emit(|| FsEvent::Symlink {
        path: tmp_path.clone(),
        target: target.to_path_buf(),
    });
    let r = rename_into_place(dir, dir_path, (&c_tmp, &tmp_path), (&c_name, &path));
    if r.is_err() {
        // SAFETY: as above; a failed unlink leaves only a stray temp link.
        unsafe { libc::unlinkat(dir.as_raw_fd(), c_tmp.as_ptr(), 0) };
    }
    r
}

/// Rename the temp name over the target within the open directory, then
/// fsync the directory: the step that makes a replacement visible and
/// durable, traced for the power-cut harness.
fn rename_into_place(
    dir: BorrowedFd<'_>,
    dir_path: &Path,
    (c_tmp, tmp_path): (&CString, &Path),
    (c_name, target): (&CString, &Path),
) -> Result<(), DurableError> {
    // SAFETY: both names are NUL-terminated; both fds are the directory.
    let rc = unsafe {
        libc::renameat(
            dir.as_raw_fd(),
            c_tmp.as_ptr(),
            dir.as_raw_fd(),
            c_name.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(last_err(target.to_path_buf(), "rename"));
    }
    emit(|| FsEvent::Rename {
        from: tmp_path.to_path_buf(),
        to: target.to_path_buf(),
    });
    sync_dir_fd(dir, dir_path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keep_mode_keeps_a_secret_file_secret() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("update.conf");
        write_atomic(&p, b"ETCD_PASSWORD=x\n", 0o600).unwrap();
        write_atomic_keep_mode(&p, b"GROUP=beta\nETCD_PASSWORD=x\n", 0o644).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let q = d.path().join("new.conf");
        write_atomic_keep_mode(&q, b"GROUP=beta\n", 0o644).unwrap();
        assert_eq!(
            fs::metadata(&q).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }

    #[test]
    fn temp_names_are_unpredictable_and_a_planted_link_is_replaced_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let a = temp_name(d.path(), "f");
        let b = temp_name(d.path(), "f");
        assert_ne!(a, b);
        assert!(a.file_name().unwrap().to_string_lossy().starts_with(".f."));
        // A symlink planted at the target is replaced, never written through.
        let victim = d.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let target = d.path().join("authorized_keys");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        write_atomic(&target, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert!(!fs::symlink_metadata(&target)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&target).unwrap(), b"new");
        symlink_atomic(Path::new("/dev/null"), &target).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn replaces_and_sets_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_atomic(&p, b"old", 0o600).unwrap();
        write_atomic(&p, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temp files left behind.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn trace_sees_write_sync_rename_syncdir_in_order() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        trace_start();
        write_atomic(&p, b"x", 0o644).unwrap();
        symlink_atomic(Path::new("/dev/null"), &d.path().join("l")).unwrap();
        // Other tests in this process may write meanwhile: keep ours.
        let mine = |q: &Path| q.starts_with(d.path());
        let kinds: Vec<&str> = trace_take()
            .iter()
            .filter_map(|e| match e {
                FsEvent::Write { path, .. } if mine(path) => Some("write"),
                FsEvent::Symlink { path, .. } if mine(path) => Some("symlink"),
                FsEvent::SyncFile { path } if mine(path) => Some("sync"),
                FsEvent::Rename { to, .. } if mine(to) => Some("rename"),
                FsEvent::SyncDir { dir } if mine(dir) => Some("syncdir"),
                _ => None,
            })
            .collect();
        assert_eq!(
            kinds,
            ["write", "sync", "rename", "syncdir", "symlink", "rename", "syncdir"]
        );
        assert_eq!(
            std::fs::read_link(d.path().join("l")).unwrap(),
            Path::new("/dev/null")
        );
        assert!(trace_take().is_empty(), "recording stopped");
    }

    #[test]
    fn missing_dir_names_the_path() {
        let e = write_atomic(Path::new("/nonexistent-nimbus/x"), b"", 0o644).unwrap_err();
        assert!(e.to_string().contains("/nonexistent-nimbus/"), "{e}");
    }
}
