//! Apply a checked [`CloudConfig`] to a root directory.
//!
//! Every path is walked inside the root by directory descriptors with
//! chroot semantics (absolute symlink targets are re-rooted, `..` may not
//! climb out), so a hostile or careless symlink cannot make us write
//! outside it; and symlinks are followed only in directories only root can
//! write, so a user cannot point a path we write, chown or read as root at
//! anything of root's (see [`Root::walk`]). Every write is atomic
//! and skipped when the file already has the wanted bytes, mode and owner:
//! applying the same file twice changes nothing the second time.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nimbus::durable;
use nimbus::updateconf::UpdateConf;

use crate::schema::{CloudConfig, Unit, User, NETWORK_SUFFIXES};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path}: resolves outside the root {root} (through symlink {link}); refusing to write"
    )]
    Escapes {
        path: String,
        root: PathBuf,
        link: PathBuf,
    },
    #[error("{path}: too many levels of symbolic links")]
    Loop { path: String },
    #[error("{path}: not following symlink {link} (owned by uid {uid}, or in a directory others can write); refusing")]
    Untrusted {
        path: String,
        link: PathBuf,
        uid: u32,
    },
    #[error("{path}: {component} is not a directory")]
    NotADirectory { path: String, component: PathBuf },
    #[error(transparent)]
    Durable(#[from] durable::DurableError),
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ApplyError + '_ {
    move |source| ApplyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What apply did, for the log and for idempotency tests.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub changed: Vec<String>,
    pub unchanged: usize,
    /// Commands run on a live system, or that would have run.
    pub commands: Vec<String>,
    pub errors: Vec<String>,
}

/// Runs systemctl and friends on a live system; tests and `--root` use
/// [`NoCommands`], which records instead.
pub trait CommandRunner {
    fn run(&mut self, argv: &[&str]) -> Result<(), String>;
    fn live(&self) -> bool;
}

pub struct NoCommands;

impl CommandRunner for NoCommands {
    fn run(&mut self, _argv: &[&str]) -> Result<(), String> {
        Ok(())
    }
    fn live(&self) -> bool {
        false
    }
}

pub struct SystemCommands;

impl CommandRunner for SystemCommands {
    fn run(&mut self, argv: &[&str]) -> Result<(), String> {
        let status = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .status()
            .map_err(|e| format!("{}: {e}", argv[0]))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("`{}` failed: {status}", argv.join(" ")))
        }
    }
    fn live(&self) -> bool {
        true
    }
}

pub struct Root {
    root: PathBuf,
    fd: OwnedFd,
    pub report: Report,
}

/// An open directory inside the root and its host path (for messages and
/// the power-cut trace; never used to reach it again).
struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

fn openat(dir: BorrowedFd<'_>, name: &OsStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
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
fn lstatat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<libc::stat> {
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

fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: as in lstatat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, st outlives the call.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// mkdir relative to a directory; `Ok(false)` when the name already exists.
fn mkdirat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<bool> {
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

fn readlinkat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<PathBuf> {
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
fn root_only(dir: BorrowedFd<'_>) -> bool {
    fstat(dir).is_ok_and(|st| st.st_uid == 0 && st.st_mode & 0o022 == 0)
}

fn is_type(st: &libc::stat, t: libc::mode_t) -> bool {
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
    fn walk(
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
    fn open_file(&self, path: &str) -> Option<(fs::File, libc::stat)> {
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
    fn file_mode(&self, path: &str) -> Option<u32> {
        self.open_file(path).map(|(_, st)| st.st_mode & 0o7777)
    }

    /// Create directory `path` (or take the existing one) with `mode` and
    /// `owner`, set on its descriptor. A symlink in its place is refused:
    /// `core` pointing `~/.ssh` at /root/.ssh must not get it handed over.
    fn mkdir_owned(&mut self, path: &str, mode: u32, owner: (u32, u32)) -> Result<(), ApplyError> {
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
    fn read_dir_files(&self, path: &str) -> Result<Vec<(String, String)>, ApplyError> {
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

// ---------------------------------------------------------------------------
// passwd / group / shadow

#[derive(Debug, Clone)]
struct Db {
    path: &'static str,
    lines: Vec<Vec<String>>,
    fields: usize,
}

impl Db {
    fn load(root: &Root, path: &'static str, fields: usize) -> Db {
        let lines = root
            .read(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.split(':').map(str::to_string).collect())
            .collect();
        Db {
            path,
            lines,
            fields,
        }
    }
    fn find(&self, name: &str) -> Option<&Vec<String>> {
        self.lines
            .iter()
            .find(|l| l.first().map(String::as_str) == Some(name))
    }
    fn find_mut(&mut self, name: &str) -> Option<&mut Vec<String>> {
        self.lines
            .iter_mut()
            .find(|l| l.first().map(String::as_str) == Some(name))
    }
    fn ids(&self) -> Vec<u32> {
        self.lines
            .iter()
            .filter_map(|l| l.get(2)?.parse().ok())
            .collect()
    }
    fn render(&self) -> String {
        self.lines
            .iter()
            .map(|l| {
                let mut l = l.clone();
                l.resize(self.fields.max(l.len()), String::new());
                l.join(":") + "\n"
            })
            .collect()
    }
    fn save(&self, root: &mut Root, mode: u32) -> Result<(), ApplyError> {
        root.write(self.path, self.render().as_bytes(), mode, Some((0, 0)))
    }
}

struct Accounts {
    passwd: Db,
    group: Db,
    shadow: Db,
}

impl Accounts {
    fn load(root: &Root) -> Accounts {
        Accounts {
            passwd: Db::load(root, "/etc/passwd", 7),
            group: Db::load(root, "/etc/group", 4),
            shadow: Db::load(root, "/etc/shadow", 9),
        }
    }

    fn uid(&self, name: &str) -> Option<u32> {
        if let Ok(n) = name.parse() {
            return Some(n);
        }
        self.passwd.find(name)?.get(2)?.parse().ok()
    }

    fn gid(&self, name: &str) -> Option<u32> {
        if let Ok(n) = name.parse() {
            return Some(n);
        }
        self.group.find(name)?.get(2)?.parse().ok()
    }

    fn free_id(used: &[u32], system: bool) -> u32 {
        let range = if system { 100..1000 } else { 1000..60000 };
        range
            .clone()
            .find(|i| !used.contains(i))
            .unwrap_or(range.end)
    }

    fn add_member(&mut self, group: &str, user: &str) -> Result<(), String> {
        let g = self
            .group
            .find_mut(group)
            .ok_or_else(|| format!("group {group:?} does not exist"))?;
        g.resize(4, String::new());
        let mut members: Vec<String> = g[3]
            .split(',')
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect();
        if !members.iter().any(|m| m == user) {
            members.push(user.to_string());
            g[3] = members.join(",");
        }
        Ok(())
    }

    /// Create or update a user; returns (uid, gid, home).
    fn ensure(&mut self, u: &User, today: u64) -> Result<(u32, u32, String), String> {
        if let Some(existing) = self.passwd.find(&u.name).cloned() {
            if let Some(hash) = &u.passwd {
                if let Some(s) = self.shadow.find_mut(&u.name) {
                    s.resize(9, String::new());
                    s[1] = hash.clone();
                }
            }
            for g in &u.groups {
                self.add_member(g, &u.name)?;
            }
            let uid = existing.get(2).and_then(|x| x.parse().ok()).unwrap_or(0);
            let gid = existing.get(3).and_then(|x| x.parse().ok()).unwrap_or(0);
            return Ok((uid, gid, existing.get(5).cloned().unwrap_or_default()));
        }
        let uid = Self::free_id(&self.passwd.ids(), u.system);
        let gid = match (&u.primary_group, u.no_user_group) {
            (Some(g), _) => self
                .gid(g)
                .ok_or_else(|| format!("primary_group {g:?} does not exist"))?,
            (None, true) => self.gid("users").unwrap_or(100),
            (None, false) => {
                if self.group.find(&u.name).is_some() {
                    return Err(format!(
                        "a group named {:?} already exists; set primary_group or no_user_group",
                        u.name
                    ));
                }
                let gid = if self.group.ids().contains(&uid) {
                    Self::free_id(&self.group.ids(), u.system)
                } else {
                    uid
                };
                self.group.lines.push(vec![
                    u.name.clone(),
                    "x".into(),
                    gid.to_string(),
                    String::new(),
                ]);
                gid
            }
        };
        let home = u
            .homedir
            .clone()
            .unwrap_or_else(|| format!("/home/{}", u.name));
        let shell = u.shell.clone().unwrap_or_else(|| "/bin/bash".into());
        self.passwd.lines.push(vec![
            u.name.clone(),
            "x".into(),
            uid.to_string(),
            gid.to_string(),
            u.gecos.clone().unwrap_or_default(),
            home.clone(),
            shell,
        ]);
        self.shadow.lines.push(vec![
            u.name.clone(),
            u.passwd.clone().unwrap_or_else(|| "*".into()),
            today.to_string(),
            "0".into(),
            "99999".into(),
            "7".into(),
            String::new(),
            String::new(),
            String::new(),
        ]);
        for g in &u.groups {
            self.add_member(g, &u.name)?;
        }
        Ok((uid, gid, home))
    }

    fn save(&self, root: &mut Root) -> Result<(), ApplyError> {
        self.passwd.save(root, 0o644)?;
        self.group.save(root, 0o644)?;
        self.shadow.save(root, 0o640)
    }
}

fn days_since_epoch() -> u64 {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    secs / 86400
}

fn key_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// What `authorized_keys` becomes, from the files in `authorized_keys.d`
/// (name, text) and the user's own edits since cloud-config last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMerge {
    pub authorized_keys: String,
    /// Keys added to `authorized_keys` by hand (or by Vagrant, ssh-copy-id):
    /// kept, in `authorized_keys.d/local`.
    pub added: Vec<String>,
    /// Keys removed from `authorized_keys` by hand: never put back.
    pub removed: Vec<String>,
}

/// The user's edits win: a key added to `authorized_keys` by hand stays,
/// a key removed by hand stays removed (until it is added by hand again).
/// This is how Vagrant's insecure key, given by the OEM user-data on every
/// boot, is gone for good once Vagrant replaced it with its own.
/// `last` is what cloud-config wrote last time (`.generated`); without it,
/// every key in an existing file counts as the user's.
pub fn merge_keys(
    sources: &[(String, String)],
    current: Option<&str>,
    last: Option<&str>,
    removed_before: &str,
) -> KeyMerge {
    use std::collections::BTreeSet;
    let cur: Vec<&str> = current.map(|c| key_lines(c).collect()).unwrap_or_default();
    let gen: BTreeSet<&str> = last.map(|l| key_lines(l).collect()).unwrap_or_default();
    let added: Vec<String> = cur
        .iter()
        .filter(|k| !gen.contains(*k))
        .map(|k| k.to_string())
        .collect();
    let mut removed: Vec<String> = key_lines(removed_before)
        .filter(|k| !added.iter().any(|a| a == k))
        .map(str::to_string)
        .collect();
    if current.is_some() {
        for k in &gen {
            if !cur.contains(k) && !removed.iter().any(|r| r == k) {
                removed.push(k.to_string());
            }
        }
    }
    let mut seen: BTreeSet<String> = removed.iter().cloned().collect();
    let mut out = String::new();
    let local_text;
    let mut all: Vec<(&str, &str)> = sources
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    if !added.is_empty() {
        let existing = all.iter().position(|(n, _)| *n == "local");
        let mut t = existing.map(|i| all[i].1.to_string()).unwrap_or_default();
        for k in &added {
            t.push_str(k);
            t.push('\n');
        }
        local_text = t;
        match existing {
            Some(i) => all[i].1 = &local_text,
            None => {
                all.push(("local", &local_text));
                all.sort();
            }
        }
    }
    for (name, text) in all {
        out.push_str(&format!("# {name}\n"));
        for k in key_lines(text) {
            if seen.insert(k.to_string()) {
                out.push_str(k);
                out.push('\n');
            }
        }
    }
    KeyMerge {
        authorized_keys: out,
        added,
        removed,
    }
}

/// Flatcar's layout: each source of keys gets a file in authorized_keys.d,
/// and authorized_keys is their concatenation, with the user's own edits
/// kept (see [`merge_keys`]).
fn write_ssh_keys(
    root: &mut Root,
    home: &str,
    owner: (u32, u32),
    keys: &[String],
) -> Result<(), ApplyError> {
    root.mkdir_owned(&format!("{home}/.ssh"), 0o700, owner)?;
    let d = format!("{home}/.ssh/authorized_keys.d");
    root.mkdir_owned(&d, 0o700, owner)?;
    let mut body = keys.join("\n");
    body.push('\n');
    root.write(
        &format!("{d}/cloud-config"),
        body.as_bytes(),
        0o600,
        Some(owner),
    )?;
    // Regular files only: a symlink the user put there is skipped, never
    // read through (it could name a root-only file).
    let sources = root.read_dir_files(&d)?;
    let ak = format!("{home}/.ssh/authorized_keys");
    let current = root.read(&ak);
    let last = root.read(&format!("{d}/.generated"));
    let removed_before = root.read(&format!("{d}/.removed")).unwrap_or_default();
    let m = merge_keys(
        &sources,
        current.as_deref(),
        last.as_deref(),
        &removed_before,
    );
    if !m.added.is_empty() {
        let mut local = sources
            .iter()
            .find(|(n, _)| n == "local")
            .map(|(_, t)| t.clone())
            .unwrap_or_default();
        for k in &m.added {
            local.push_str(k);
            local.push('\n');
        }
        root.write(&format!("{d}/local"), local.as_bytes(), 0o600, Some(owner))?;
    }
    let mut removed = m.removed.join("\n");
    if !removed.is_empty() {
        removed.push('\n');
    }
    if removed != removed_before {
        root.write(
            &format!("{d}/.removed"),
            removed.as_bytes(),
            0o600,
            Some(owner),
        )?;
    }
    // authorized_keys before the record of it: a cut between the two makes
    // the next run see cloud-config's own keys as hand-added (kept), never
    // as hand-removed (lost).
    root.write(&ak, m.authorized_keys.as_bytes(), 0o600, Some(owner))?;
    root.write(
        &format!("{d}/.generated"),
        m.authorized_keys.as_bytes(),
        0o600,
        Some(owner),
    )
}

fn apply_users(root: &mut Root, cfg: &CloudConfig) -> Result<(), ApplyError> {
    if cfg.users.is_empty() && cfg.ssh_authorized_keys.is_empty() {
        return Ok(());
    }
    let mut acc = Accounts::load(root);
    let today = days_since_epoch();
    let mut homes: Vec<(User, (u32, u32, String))> = Vec::new();
    let mut users = cfg.users.clone();
    if !cfg.ssh_authorized_keys.is_empty() {
        // The top-level keys are the `core` user's, as on CoreOS.
        let mut core = users
            .iter()
            .find(|u| u.name == "core")
            .cloned()
            .unwrap_or_else(|| User {
                name: "core".into(),
                groups: ["sudo", "docker", "systemd-journal"]
                    .iter()
                    .filter(|g| acc.group.find(g).is_some())
                    .map(|g| g.to_string())
                    .collect(),
                ..User::default()
            });
        core.ssh_authorized_keys
            .extend(cfg.ssh_authorized_keys.iter().cloned());
        users.retain(|u| u.name != "core");
        users.push(core);
    }
    for u in &users {
        match acc.ensure(u, today) {
            Ok(ids) => homes.push((u.clone(), ids)),
            Err(e) => root.report.errors.push(format!("user {}: {e}", u.name)),
        }
    }
    acc.save(root)?;
    for (u, (uid, gid, home)) in homes {
        if !u.no_create_home && !u.system {
            root.mkdir_owned(&home, 0o700, (uid, gid))?;
        }
        if !u.ssh_authorized_keys.is_empty() {
            write_ssh_keys(root, &home, (uid, gid), &u.ssh_authorized_keys)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// units

fn unit_dirs(u: &Unit) -> &'static str {
    let network = NETWORK_SUFFIXES.iter().any(|s| u.name.ends_with(s));
    match (network, u.runtime) {
        (true, false) => "/etc/systemd/network",
        (true, true) => "/run/systemd/network",
        (false, false) => "/etc/systemd/system",
        (false, true) => "/run/systemd/system",
    }
}

/// `foo@bar.service` is installed from `foo@.service`.
fn template_of(name: &str) -> Option<String> {
    let (prefix, rest) = name.split_once('@')?;
    let dot = rest.rfind('.')?;
    if dot == 0 {
        return None;
    }
    Some(format!("{prefix}@{}", &rest[dot..]))
}

/// WantedBy=/RequiredBy= targets from a unit's [Install] section.
fn install_targets(content: &str) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    let mut in_install = false;
    for line in content.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_install = t == "[Install]";
            continue;
        }
        if !in_install {
            continue;
        }
        if let Some((k, v)) = t.split_once('=') {
            let kind = match k.trim() {
                "WantedBy" => ".wants",
                "RequiredBy" => ".requires",
                _ => continue,
            };
            for target in v.split_whitespace() {
                out.push((target.to_string(), kind));
            }
        }
    }
    out
}

fn find_unit_file(root: &Root, name: &str, dir: &str) -> Option<(String, String)> {
    let file = template_of(name).unwrap_or_else(|| name.to_string());
    for d in [
        dir,
        "/etc/systemd/system",
        "/run/systemd/system",
        "/usr/lib/systemd/system",
        "/lib/systemd/system",
    ] {
        let p = format!("{d}/{file}");
        if let Some(c) = root.read(&p) {
            return Some((p, c));
        }
    }
    None
}

fn apply_units(root: &mut Root, cfg: &CloudConfig) -> Result<bool, ApplyError> {
    let before = root.report.changed.len();
    for u in &cfg.units {
        let dir = unit_dirs(u);
        let path = format!("{dir}/{}", u.name);
        if u.mask {
            root.symlink(&path, "/dev/null")?;
        } else if let Some(content) = &u.content {
            root.write(&path, content.as_bytes(), 0o644, Some((0, 0)))?;
        }
        for (name, content) in &u.drop_ins {
            root.write(
                &format!("{dir}/{}.d/{name}", u.name),
                content.as_bytes(),
                0o644,
                Some((0, 0)),
            )?;
        }
        if u.enable && !u.mask {
            let Some((file_path, content)) = find_unit_file(root, &u.name, dir) else {
                root.report.errors.push(format!(
                    "unit {}: cannot enable: no unit file (give `content`)",
                    u.name
                ));
                continue;
            };
            let targets = install_targets(&content);
            if targets.is_empty() {
                root.report.errors.push(format!(
                    "unit {}: cannot enable: {file_path} has no WantedBy=/RequiredBy= in [Install]",
                    u.name
                ));
                continue;
            }
            let link_dir = if u.runtime {
                "/run/systemd/system"
            } else {
                "/etc/systemd/system"
            };
            for (target, kind) in targets {
                root.symlink(&format!("{link_dir}/{target}{kind}/{}", u.name), &file_path)?;
            }
        }
    }
    for d in &cfg.env_dropins {
        let mut body = String::from("[Service]\n");
        for (k, v) in &d.vars {
            let esc = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('%', "%%");
            body.push_str(&format!("Environment=\"{k}={esc}\"\n"));
        }
        root.write(
            &format!("/run/systemd/system/{}.d/20-cloudinit.conf", d.unit),
            body.as_bytes(),
            0o644,
            Some((0, 0)),
        )?;
    }
    Ok(root.report.changed.len() > before)
}

fn apply_update_conf(root: &mut Root, cfg: &CloudConfig) -> Result<(), ApplyError> {
    let mut set: BTreeMap<&str, String> = BTreeMap::new();
    if let Some(u) = &cfg.update {
        if let Some(v) = &u.group {
            set.insert("GROUP", v.clone());
        }
        if let Some(v) = &u.server {
            set.insert("SERVER", v.clone());
        }
        if let Some(v) = u.reboot_strategy {
            set.insert("REBOOT_STRATEGY", v.name().to_string());
        }
    }
    if let Some(t) = cfg.nimbus.as_ref().and_then(|n| n.hook_timeout.as_ref()) {
        set.insert("HOOK_TIMEOUT", t.clone());
    }
    if let Some(l) = &cfg.locksmith {
        for (k, v) in [
            ("REBOOT_WINDOW_START", &l.window_start),
            ("REBOOT_WINDOW_LENGTH", &l.window_length),
            ("ETCD_ENDPOINTS", &l.endpoint),
            ("ETCD_CAFILE", &l.etcd_cafile),
            ("ETCD_CERTFILE", &l.etcd_certfile),
            ("ETCD_KEYFILE", &l.etcd_keyfile),
            ("REBOOT_GROUP", &l.group),
        ] {
            if let Some(v) = v {
                set.insert(k, v.clone());
            }
        }
    }
    if set.is_empty() {
        return Ok(());
    }
    let path = format!("/{}", nimbus::updateconf::ETC_PATH);
    let mut conf = match root.read(&path) {
        Some(text) => UpdateConf::parse(&text).map_err(|e| ApplyError::Invalid {
            what: path.clone(),
            reason: e.to_string(),
        })?,
        None => UpdateConf::default(),
    };
    for (k, v) in set {
        // Quote values with spaces ("Thu 04:00") so the file stays
        // shell-sourceable, as Flatcar's is.
        let v = if v.contains(char::is_whitespace) {
            format!("\"{v}\"")
        } else {
            v
        };
        conf.set(k, &v);
    }
    // Keep the mode of the file replaced (0600 when it holds a password);
    // a new file holding a credential is 0600.
    let mode = root
        .file_mode(&path)
        .unwrap_or_else(|| conf.new_file_mode());
    root.write(&path, conf.render().as_bytes(), mode, Some((0, 0)))
}

/// Apply everything. Problems that concern one item (a group that does not
/// exist, a unit that cannot be enabled) are collected in the report and the
/// rest is still applied; I/O failures and escapes stop at once.
pub fn apply(
    root: &mut Root,
    cfg: &CloudConfig,
    cmds: &mut dyn CommandRunner,
) -> Result<(), ApplyError> {
    if let Some(h) = &cfg.hostname {
        root.write(
            "/etc/hostname",
            format!("{h}\n").as_bytes(),
            0o644,
            Some((0, 0)),
        )?;
        if cmds.live() {
            fs::write("/proc/sys/kernel/hostname", h)
                .map_err(io_err(Path::new("/proc/sys/kernel/hostname")))?;
        }
    }
    if cfg.manage_etc_hosts {
        let host = cfg
            .hostname
            .clone()
            .or_else(|| root.read("/etc/hostname").map(|s| s.trim().to_string()))
            .filter(|h| !h.is_empty());
        let mut hosts =
            String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        if let Some(h) = host {
            let short = h.split('.').next().unwrap_or(&h).to_string();
            let names = if short == h {
                h
            } else {
                format!("{h} {short}")
            };
            hosts.push_str(&format!("127.0.1.1\t{names}\n"));
        }
        root.write("/etc/hosts", hosts.as_bytes(), 0o644, Some((0, 0)))?;
    }
    apply_users(root, cfg)?;
    let acc = Accounts::load(root);
    for f in &cfg.write_files {
        let owner = match &f.owner {
            None => (0, 0),
            Some(o) => {
                let (u, g) = o.split_once(':').unwrap_or((o, ""));
                let uid = acc.uid(u);
                let gid = if g.is_empty() {
                    acc.passwd
                        .find(u)
                        .and_then(|l| l.get(3)?.parse().ok())
                        .or(uid)
                } else {
                    acc.gid(g)
                };
                match (uid, gid) {
                    (Some(uid), Some(gid)) => (uid, gid),
                    _ => {
                        root.report.errors.push(format!(
                            "write_files {}: owner {o:?} does not exist",
                            f.path
                        ));
                        continue;
                    }
                }
            }
        };
        root.write(&f.path, &f.content, f.permissions, Some(owner))?;
    }
    if !cfg.oem.is_empty() {
        let body: String = cfg
            .oem
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}=\"{}\"\n",
                    k.to_ascii_uppercase(),
                    v.replace('"', "\\\"")
                )
            })
            .collect();
        root.write("/etc/oem-release", body.as_bytes(), 0o644, Some((0, 0)))?;
    }
    apply_update_conf(root, cfg)?;
    let mut swarm_changed = false;
    if let Some(sw) = cfg.nimbus.as_ref().and_then(|n| n.swarm.as_ref()) {
        let before = root.report.changed.len();
        // 0600: it may hold a join token, which lets a machine into the swarm.
        root.write(
            &format!("/{}", nimbus::paths::SWARM_CONF),
            sw.render().as_bytes(),
            0o600,
            Some((0, 0)),
        )?;
        swarm_changed = root.report.changed.len() > before;
    }
    let units_changed = apply_units(root, cfg)?;

    let mut argvs: Vec<Vec<String>> = Vec::new();
    if units_changed {
        argvs.push(vec!["systemctl".into(), "daemon-reload".into()]);
    }
    if cfg
        .units
        .iter()
        .any(|u| NETWORK_SUFFIXES.iter().any(|s| u.name.ends_with(s)))
        && units_changed
    {
        argvs.push(vec![
            "systemctl".into(),
            "try-restart".into(),
            "systemd-networkd.service".into(),
        ]);
    }
    for u in &cfg.units {
        if let Some(c) = &u.command {
            // Queued, not waited for, as coreos-cloudinit's D-Bus StartUnit
            // did: at boot, cloud-config.service runs before the daemons a
            // unit may need (docker after containerd after cloud-config), and
            // waiting here would deadlock the boot until a timeout.
            argvs.push(vec![
                "systemctl".into(),
                "--no-block".into(),
                c.clone(),
                u.name.clone(),
            ]);
        }
    }
    if swarm_changed {
        // At boot it starts after cloud-config anyway; on a running host
        // the new membership takes effect now. --no-block: joining waits
        // for Docker and etcd, which may still be starting.
        argvs.push(vec![
            "systemctl".into(),
            "start".into(),
            "--no-block".into(),
            "nimbus-swarm.service".into(),
        ]);
    }
    for argv in argvs {
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let line = argv.join(" ");
        if cmds.live() {
            if let Err(e) = cmds.run(&refs) {
                root.report.errors.push(e);
            }
            root.report.commands.push(line);
        } else {
            root.report
                .commands
                .push(format!("{line} (skipped: not a live system)"));
        }
    }
    Ok(())
}

/// A `#!` user-data script: stored, then run once as a transient unit.
pub fn apply_script(
    root: &mut Root,
    script: &[u8],
    cmds: &mut dyn CommandRunner,
) -> Result<(), ApplyError> {
    use sha2::Digest;
    let id = hex::encode(&sha2::Sha256::digest(script)[..6]);
    let path = "/var/lib/nimbus/cloud-config/user-script";
    root.write(path, script, 0o700, Some((0, 0)))?;
    let unit = format!("--unit=cloud-config-script-{id}");
    let argv = [
        "systemd-run",
        &unit,
        "--collect",
        "--service-type=oneshot",
        "--wait",
        path,
    ];
    if cmds.live() {
        if let Err(e) = cmds.run(&argv) {
            root.report.errors.push(e);
        }
        root.report.commands.push(argv.join(" "));
    } else {
        root.report
            .commands
            .push(format!("{} (skipped: not a live system)", argv.join(" ")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::merge_keys;

    fn src(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn vagrant_replaces_the_insecure_key_for_good() {
        let s = src(&[("cloud-config", "ssh-rsa INSECURE vagrant\n")]);
        // First boot: nothing there yet.
        let m1 = merge_keys(&s, None, None, "");
        assert_eq!(
            m1.authorized_keys,
            "# cloud-config\nssh-rsa INSECURE vagrant\n"
        );
        // Vagrant appends its key and deletes the insecure one.
        let edited = "# cloud-config\nssh-ed25519 OWN vagrant\n";
        let m2 = merge_keys(&s, Some(edited), Some(&m1.authorized_keys), "");
        assert_eq!(m2.added, vec!["ssh-ed25519 OWN vagrant"]);
        assert_eq!(m2.removed, vec!["ssh-rsa INSECURE vagrant"]);
        assert_eq!(
            m2.authorized_keys,
            "# cloud-config\n# local\nssh-ed25519 OWN vagrant\n"
        );
        // Next boot: the OEM user-data still names the insecure key; it stays out.
        let s3 = src(&[
            ("cloud-config", "ssh-rsa INSECURE vagrant\n"),
            ("local", "ssh-ed25519 OWN vagrant\n"),
        ]);
        let removed = m2.removed.join("\n") + "\n";
        let m3 = merge_keys(
            &s3,
            Some(&m2.authorized_keys),
            Some(&m2.authorized_keys),
            &removed,
        );
        assert_eq!(m3.authorized_keys, m2.authorized_keys);
        assert!(m3.added.is_empty());
        assert_eq!(m3.removed, m2.removed);
    }

    #[test]
    fn a_key_added_back_by_hand_is_no_longer_removed_and_duplicates_collapse() {
        let s = src(&[("a", "k1\nk2\n"), ("b", "k2\n")]);
        let m = merge_keys(&s, Some("k1\nk2\n"), Some("k1\n"), "k2\n");
        assert!(m.removed.is_empty(), "{m:?}");
        assert_eq!(m.authorized_keys, "# a\nk1\nk2\n# b\n# local\n");
        // A file that existed before cloud-config managed it: all its keys are the user's.
        let m = merge_keys(&src(&[("cloud-config", "k1\n")]), Some("mine\n"), None, "");
        assert_eq!(m.added, vec!["mine"]);
        assert!(m.authorized_keys.contains("mine") && m.authorized_keys.contains("k1"));
    }
}
