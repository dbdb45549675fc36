//! The root as a sandbox: every path walked by directory descriptors with
//! chroot semantics, symlinks followed only where only root can write,
//! every write atomic and skipped when nothing would change.

use super::*;

pub struct Root {
    root: PathBuf,
    fd: OwnedFd,
    pub report: Report,
}

/// An open directory inside the root and its host path (for messages and
/// the power-cut trace; never used to reach it again).
pub(super) struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

pub(super) fn openat(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<OwnedFd> {
    let c = CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
    // SAFETY: a valid directory fd and a NUL-terminated name; the returned
    // fd is owned by the OwnedFd.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// lstat relative to a directory.
pub(super) fn lstatat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<libc::stat> {
    let c = CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
    // SAFETY: zeroed stat is a valid out-parameter for fstatat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, NUL-terminated name, st outlives the call.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

pub(super) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: as in lstatat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, st outlives the call.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// mkdir relative to a directory; `Ok(false)` when the name already exists.
pub(super) fn mkdirat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<bool> {
    let c = CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
    // SAFETY: valid fd and NUL-terminated name.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::AlreadyExists {
        Ok(false)
    } else {
        Err(e)
    }
}

pub(super) fn readlinkat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<PathBuf> {
    let c = CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: buf is writable for its length.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            c.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(PathBuf::from(OsString::from_vec(buf)))
}

/// Only root can have put anything in this directory: owned by root and
/// writable by nobody else. Symlinks are followed only in such directories;
/// in a directory a user can write (a home, `~/.ssh`), a symlink is never
/// followed, read through, chowned or chmodded.
pub(super) fn root_only(dir: BorrowedFd<'_>) -> bool {
    fstat(dir).is_ok_and(|st| st.st_uid == 0 && st.st_mode & 0o022 == 0)
}

pub(super) fn is_type(st: &libc::stat, t: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == t
}

impl Root {
    pub fn new(root: &Path) -> Result<Root, ApplyError> {
        let root = fs::canonicalize(root).map_err(io_err(root))?;
        let fd = fs::File::open(&root)
            .map(OwnedFd::from)
            .map_err(io_err(&root))?;
        Ok(Root {
            root,
            fd,
            report: Report::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Walk an absolute in-root path by directory descriptors, with chroot
    /// semantics (an absolute symlink target starts again at the root, `..`
    /// never climbs out of it). Returns the directory holding the last
    /// component, and that component. With `follow_last`, a symlink there
    /// is resolved too (under the same rules). With `create`, missing
    /// directories are made (root-owned, 0755).
    ///
    /// A symlink is followed only when it sits in a directory only root can
    /// write (`root_only`): a user who owns a directory on the way cannot
    /// point it anywhere, and nothing is looked up by path twice, so it
    /// cannot be swapped under us either.
    pub(super) fn walk(
        &self,
        path: &str,
        create: bool,
        follow_last: bool,
    ) -> Result<(Dir, OsString), ApplyError> {
        let mut todo: Vec<OsString> = Path::new(path)
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s.to_os_string()),
                Component::ParentDir => Some(OsString::from("..")),
                _ => None,
            })
            .rev()
            .collect();
        if todo.first().is_none_or(|l| l == "..") {
            return Err(ApplyError::Invalid {
                what: path.into(),
                reason: "names no file (empty or ends in `..`)".into(),
            });
        }
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(io_err(&self.root));
        let mut stack: Vec<Dir> = vec![Dir {
            fd: dup(&self.fd)?,
            path: self.root.clone(),
        }];
        let mut hops = 0;
        let mut last_link: Option<PathBuf> = None;
        while let Some(c) = todo.pop() {
            let Some(cur) = stack.last() else {
                return Err(ApplyError::Invalid {
                    what: path.into(),
                    reason: "internal: empty directory stack".into(),
                });
            };
            if c == ".." {
                if stack.len() == 1 {
                    return Err(ApplyError::Escapes {
                        path: path.into(),
                        root: self.root.clone(),
                        link: last_link.unwrap_or_else(|| PathBuf::from("..")),
                    });
                }
                stack.pop();
                continue;
            }
            let here = cur.path.join(&c);
            let is_last = todo.is_empty();
            let st = match lstatat(cur.fd.as_fd(), &c) {
                Ok(st) => Some(st),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err(&here)(e)),
            };
            if let Some(st) = st.filter(|st| is_type(st, libc::S_IFLNK)) {
                if is_last && !follow_last {
                    return Ok((stack.pop().unwrap_or_else(|| unreachable!()), c));
                }
                if !root_only(cur.fd.as_fd()) || st.st_uid != 0 {
                    return Err(ApplyError::Untrusted {
                        path: path.into(),
                        link: here,
                        uid: st.st_uid,
                    });
                }
                hops += 1;
                if hops > 40 {
                    return Err(ApplyError::Loop { path: path.into() });
                }
                let target = readlinkat(cur.fd.as_fd(), &c).map_err(io_err(&here))?;
                if target.is_absolute() {
                    stack.truncate(1);
                }
                let before = todo.len();
                for tc in target.components().rev() {
                    match tc {
                        Component::Normal(s) => todo.push(s.to_os_string()),
                        Component::ParentDir => todo.push(OsString::from("..")),
                        _ => {}
                    }
                }
                if is_last && todo.len() == before {
                    return Err(ApplyError::Invalid {
                        what: path.into(),
                        reason: format!("symlink {} names no file", here.display()),
                    });
                }
                last_link = Some(here);
                continue;
            }
            if is_last {
                return Ok((stack.pop().unwrap_or_else(|| unreachable!()), c));
            }
            match st {
                Some(st) if !is_type(&st, libc::S_IFDIR) => {
                    return Err(ApplyError::NotADirectory {
                        path: path.into(),
                        component: here,
                    })
                }
                None if create => {
                    mkdirat(cur.fd.as_fd(), &c, 0o755).map_err(io_err(&here))?;
                }
                None => {
                    return Err(io_err(&here)(io::Error::from(io::ErrorKind::NotFound)));
                }
                Some(_) => {}
            }
            // O_NOFOLLOW: if it became a symlink since the lstat, this fails.
            let fd = openat(
                cur.fd.as_fd(),
                &c,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(io_err(&here))?;
            stack.push(Dir { fd, path: here });
        }
        Err(ApplyError::Invalid {
            what: path.into(),
            reason: "names no file".into(),
        })
    }

    /// The host path `path` resolves to (for messages and for tests).
    pub fn resolve(&self, path: &str) -> Result<PathBuf, ApplyError> {
        let (dir, name) = self.walk(path, false, false)?;
        Ok(dir.path.join(name))
    }

    /// Open the regular file `path` for reading, never through a symlink
    /// at its end unless root alone could have made it.
    pub(super) fn open_file(&self, path: &str) -> Option<(fs::File, libc::stat)> {
        let (dir, name) = self.walk(path, false, true).ok()?;
        let fd = openat(
            dir.fd.as_fd(),
            &name,
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            0,
        )
        .ok()?;
        let st = fstat(fd.as_fd()).ok()?;
        is_type(&st, libc::S_IFREG).then(|| (fs::File::from(fd), st))
    }

    /// Write `data` at in-root `path` unless it is already there exactly.
    pub fn write(
        &mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<(), ApplyError> {
        let (dir, name) = self.walk(path, true, false)?;
        if let Ok(st) = lstatat(dir.fd.as_fd(), &name) {
            if is_type(&st, libc::S_IFDIR) {
                return Err(ApplyError::Invalid {
                    what: path.into(),
                    reason: "is a directory".into(),
                });
            }
            let same_owner = owner.is_none_or(|(u, g)| st.st_uid == u && st.st_gid == g);
            // Same size first: a file the user grew (or made sparse and
            // huge) is not read into memory just to learn it differs.
            if is_type(&st, libc::S_IFREG)
                && st.st_mode & 0o7777 == mode
                && same_owner
                && st.st_size as u64 == data.len() as u64
            {
                let same = openat(
                    dir.fd.as_fd(),
                    &name,
                    libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                    0,
                )
                .ok()
                .map(fs::File::from)
                .and_then(|mut f| {
                    let mut b = Vec::new();
                    f.read_to_end(&mut b).ok().map(|_| b)
                })
                .is_some_and(|b| b == data);
                if same {
                    self.report.unchanged += 1;
                    return Ok(());
                }
            }
        }
        durable::write_atomic_at(dir.fd.as_fd(), &dir.path, &name, data, mode, owner)?;
        self.report.changed.push(path.to_string());
        Ok(())
    }

    /// Make in-root `path` a symlink to `target` (a path as seen by the host
    /// system once booted).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), ApplyError> {
        let (dir, name) = self.walk(path, true, false)?;
        if readlinkat(dir.fd.as_fd(), &name).ok().as_deref() == Some(Path::new(target)) {
            self.report.unchanged += 1;
            return Ok(());
        }
        durable::symlink_atomic_at(dir.fd.as_fd(), &dir.path, &name, Path::new(target))?;
        self.report.changed.push(path.to_string());
        Ok(())
    }

    pub fn read(&self, path: &str) -> Option<String> {
        let (f, _) = self.open_file(path)?;
        let mut s = String::new();
        // Bounded: some of these files are the user's (authorized_keys).
        f.take(crate::yaml::MAX_BYTES as u64)
            .read_to_string(&mut s)
            .ok()?;
        Some(s)
    }

    /// Mode bits of the regular file at `path`, if there is one.
    pub(super) fn file_mode(&self, path: &str) -> Option<u32> {
        self.open_file(path).map(|(_, st)| st.st_mode & 0o7777)
    }

    /// Create directory `path` (or take the existing one) with `mode` and
    /// `owner`, set on its descriptor. A symlink in its place is refused:
    /// `core` pointing `~/.ssh` at /root/.ssh must not get it handed over.
    pub(super) fn mkdir_owned(
        &mut self,
        path: &str,
        mode: u32,
        owner: (u32, u32),
    ) -> Result<(), ApplyError> {
        let (dir, name) = self.walk(path, true, false)?;
        let here = dir.path.join(&name);
        if mkdirat(dir.fd.as_fd(), &name, mode).map_err(io_err(&here))? {
            self.report.changed.push(format!("{path}/"));
        }
        let fd = openat(
            dir.fd.as_fd(),
            &name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => ApplyError::Invalid {
                what: here.display().to_string(),
                reason: "is not a directory (a symlink?); refusing to take it over".into(),
            },
            _ => io_err(&here)(e),
        })?;
        let f = fs::File::from(fd);
        let m = f.metadata().map_err(io_err(&here))?;
        if (m.uid(), m.gid()) != owner {
            std::os::unix::fs::fchown(&f, Some(owner.0), Some(owner.1)).map_err(io_err(&here))?;
        }
        if m.permissions().mode() & 0o7777 != mode {
            f.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(io_err(&here))?;
        }
        Ok(())
    }

    /// The regular files in directory `path` (name, text), hidden ones
    /// skipped; symlinks and anything else are never opened.
    pub(super) fn read_dir_files(&self, path: &str) -> Result<Vec<(String, String)>, ApplyError> {
        let (dir, name) = self.walk(path, false, false)?;
        let here = dir.path.join(&name);
        let fd = openat(
            dir.fd.as_fd(),
            &name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(io_err(&here))?;
        // Listing through /proc/self/fd keeps to this very directory.
        let listing =
            fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(io_err(&here))?;
        let mut out = Vec::new();
        for e in listing.flatten() {
            let n = e.file_name();
            if n.as_bytes().starts_with(b".") {
                continue;
            }
            let Ok(f) = openat(
                fd.as_fd(),
                &n,
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                0,
            ) else {
                continue;
            };
            if !fstat(f.as_fd()).is_ok_and(|st| is_type(&st, libc::S_IFREG)) {
                continue;
            }
            let mut text = String::new();
            if fs::File::from(f)
                .take(crate::yaml::MAX_BYTES as u64)
                .read_to_string(&mut text)
                .is_ok()
            {
                out.push((n.to_string_lossy().into_owned(), text));
            }
        }
        out.sort();
        Ok(out)
    }
}
