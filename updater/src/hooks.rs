//! Update hooks: executables update-engine runs around a reboot it causes.
//!
//! - `pre-reboot.d/`: once the reboot is decided (inside the window, the
//!   etcd lock held), before it happens. The shipped hook drains this host
//!   from Docker swarm. A hook that fails or overruns `HOOK_TIMEOUT` stops
//!   the reboot: the post-good hooks run to undo what was done, the lock
//!   is given back, and the reboot is tried again after another
//!   HOOK_TIMEOUT.
//! - `post-good.d/`: once the booted slot is good after that reboot (the new
//!   one, or the old one after a rollback), before the lock is given back.
//!   The shipped hook makes the host active in the swarm again.
//!
//! Hooks live in `/usr/lib/nimbus/hooks/<kind>.d/` (the image's) and
//! `/etc/nimbus/hooks/<kind>.d/` (the operator's); a name in /etc replaces
//! the same name in /usr, and a link to /dev/null there disables it, as for
//! systemd units. They run in name order, as root, so each one and its
//! directory must be owned by root and writable by nobody else.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Applied when update.conf sets no HOOK_TIMEOUT: long enough for a swarm
/// to move a host's tasks, short enough that a stuck drain is noticed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    PreReboot,
    PostGood,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::PreReboot => "pre-reboot",
            Kind::PostGood => "post-good",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{kind} hook {path}: not run: {reason}")]
    Unsafe {
        kind: Kind,
        path: PathBuf,
        reason: String,
    },
    #[error("{kind} hook {name} failed ({status}){}", last_words(.last))]
    Failed {
        kind: Kind,
        name: String,
        status: String,
        last: Option<String>,
    },
    #[error("{kind} hook {name} did not finish within {secs} s (HOOK_TIMEOUT) and was stopped{}", last_words(.last))]
    TimedOut {
        kind: Kind,
        name: String,
        secs: u64,
        last: Option<String>,
    },
}

fn last_words(last: &Option<String>) -> String {
    match last {
        Some(l) => format!("; its last words: {l:?}"),
        None => String::new(),
    }
}

/// Only root may be able to change what root runs.
fn check_owner(kind: Kind, path: &Path, md: &std::fs::Metadata) -> Result<(), HookError> {
    let reason = if md.uid() != 0 {
        Some(format!("owned by uid {}, not root", md.uid()))
    } else if md.mode() & 0o022 != 0 {
        Some(format!(
            "writable by group or others (mode {:o})",
            md.mode() & 0o7777
        ))
    } else {
        None
    };
    match reason {
        Some(reason) => Err(HookError::Unsafe {
            kind,
            path: path.to_path_buf(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Every directory from `/` down to `dir` and `dir` itself: no symbolic
/// link among them (none is followed), each root's and writable by nobody
/// else. A root-owned sticky directory (`/tmp`) passes: nobody else can
/// rename or remove root's entries in it.
fn check_path(kind: Kind, dir: &Path) -> Result<(), HookError> {
    use std::path::Component;
    let abs = std::path::absolute(dir).map_err(|source| HookError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let unsafe_at = |at: &Path, reason: String| HookError::Unsafe {
        kind,
        path: at.to_path_buf(),
        reason,
    };
    let mut at = PathBuf::from("/");
    for c in abs.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => at.push(n),
            other => {
                return Err(unsafe_at(
                    &abs,
                    format!("{:?} in the path", other.as_os_str()),
                ))
            }
        }
        let md = std::fs::symlink_metadata(&at).map_err(|source| HookError::Io {
            path: at.clone(),
            source,
        })?;
        if md.file_type().is_symlink() {
            return Err(unsafe_at(
                &at,
                "a symbolic link on the way to the hooks (never followed)".into(),
            ));
        }
        if !md.is_dir() {
            return Err(unsafe_at(&at, "not a directory".into()));
        }
        let sticky_root = md.uid() == 0 && md.mode() & 0o1000 != 0;
        if md.uid() != 0 || (md.mode() & 0o022 != 0 && !sticky_root) {
            check_owner(kind, &at, &md)?;
        }
    }
    Ok(())
}

/// The hooks of `kind` under `root`, in the order they run.
pub fn discover(root: &Path, kind: Kind) -> Result<Vec<Hook>, HookError> {
    let sub = format!("{}.d", kind.name());
    let mut by_name: std::collections::BTreeMap<String, Option<PathBuf>> = Default::default();
    for base in [nimbus::paths::HOOKS_USR, nimbus::paths::HOOKS_ETC] {
        let dir = root.join(base).join(&sub);
        let dmd = match std::fs::symlink_metadata(&dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(HookError::Io { path: dir, source }),
        };
        if !dmd.is_dir() {
            return Err(HookError::Unsafe {
                kind,
                path: dir,
                reason: "not a directory".into(),
            });
        }
        check_path(kind, &dir)?;
        let rd = std::fs::read_dir(&dir).map_err(|source| HookError::Io {
            path: dir.clone(),
            source,
        })?;
        for e in rd {
            let e = e.map_err(|source| HookError::Io {
                path: dir.clone(),
                source,
            })?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with('~') {
                continue;
            }
            let path = e.path();
            // A link to /dev/null masks the hook of that name.
            if std::fs::read_link(&path).is_ok_and(|t| t == Path::new("/dev/null")) {
                by_name.insert(name, None);
                continue;
            }
            by_name.insert(name, Some(path));
        }
    }
    let mut out = Vec::new();
    for (name, path) in by_name {
        let Some(path) = path else { continue };
        // The directory is root's alone (checked above), so a link in it was
        // put there by root; where it points is walked like the hooks'
        // directories (one link, no chains), and the file checked.
        let path = match std::fs::read_link(&path) {
            Ok(to) => {
                let to = path.parent().map_or(to.clone(), |d| d.join(&to));
                let to = std::path::absolute(&to).map_err(|source| HookError::Io {
                    path: to.clone(),
                    source,
                })?;
                if let Some(d) = to.parent() {
                    check_path(kind, d)?;
                }
                to
            }
            Err(_) => path,
        };
        let md = std::fs::symlink_metadata(&path).map_err(|source| HookError::Io {
            path: path.clone(),
            source,
        })?;
        if !md.is_file() {
            return Err(HookError::Unsafe {
                kind,
                path,
                reason: "not a regular file".into(),
            });
        }
        check_owner(kind, &path, &md)?;
        if md.permissions().mode() & 0o111 == 0 {
            tracing::warn!("{kind} hook {}: not executable, skipped", path.display());
            continue;
        }
        out.push(Hook { name, path });
    }
    Ok(out)
}

/// What a running hook is doing, for `updatectl status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running<'a> {
    pub kind: Kind,
    pub name: &'a str,
    pub elapsed: Duration,
    pub timeout: Duration,
    pub last: Option<&'a str>,
}

impl std::fmt::Display for Running<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} hook {} ({} s of {} s)",
            self.kind,
            self.name,
            self.elapsed.as_secs(),
            self.timeout.as_secs()
        )?;
        if let Some(l) = self.last {
            write!(f, ": {l}")?;
        }
        Ok(())
    }
}

/// Open a hook without following a link and check what was opened: a
/// regular file, root's, writable by nobody else, executable.
fn open_checked(kind: Kind, path: &Path) -> Result<std::os::fd::OwnedFd, HookError> {
    use nix::fcntl::OFlag;
    let io = |e: nix::errno::Errno| HookError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::from(e),
    };
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(io)?;
    let st = nix::sys::stat::fstat(&fd).map_err(io)?;
    let fail = |reason: String| HookError::Unsafe {
        kind,
        path: path.to_path_buf(),
        reason,
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(fail("not a regular file".into()));
    }
    if st.st_uid != 0 {
        return Err(fail(format!("owned by uid {}, not root", st.st_uid)));
    }
    if st.st_mode & 0o022 != 0 {
        return Err(fail(format!(
            "writable by group or others (mode {:o})",
            st.st_mode & 0o7777
        )));
    }
    if st.st_mode & 0o111 == 0 {
        return Err(fail("not executable".into()));
    }
    Ok(fd)
}

/// The longest hook output line kept (the rest of the line is dropped).
pub const MAX_LINE: usize = 4096;

/// One line of a hook's output, at most [`MAX_LINE`] bytes of it, decoded
/// lossily and with control characters escaped (a hook's words reach the
/// journal and `updatectl status`: no terminal escapes, no forged lines).
/// `None` at the end of the output.
fn read_line_capped(r: &mut impl BufRead) -> Option<String> {
    let mut kept: Vec<u8> = Vec::new();
    let mut any = false;
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if buf.is_empty() {
            break;
        }
        any = true;
        let (chunk, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = MAX_LINE.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = end.unwrap_or(buf.len());
        r.consume(used);
        if end.is_some() {
            break;
        }
    }
    if !any {
        return None;
    }
    Some(escape_controls(&String::from_utf8_lossy(&kept)))
}

/// Control characters as Rust escapes (`\u{1b}`), the rest unchanged.
pub fn escape_controls(s: &str) -> String {
    let s = s.strip_suffix('\r').unwrap_or(s);
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Run one hook with `env` added, at most `timeout`; its output lines go
/// to the log and, with the time spent, to `progress`. On timeout the
/// hook's whole process group is killed.
pub fn run(
    kind: Kind,
    hook: &Hook,
    env: &[(&str, String)],
    timeout: Duration,
    progress: &mut dyn FnMut(&Running<'_>),
) -> Result<(), HookError> {
    // Executed through the descriptor that was checked (fstat), not the
    // path again: what runs is the file that passed. The descriptor is
    // opened without close-on-exec so that the hook (and a script's
    // interpreter, handed `/proc/self/fd/N`) can open it.
    let fd = open_checked(kind, &hook.path)?;
    let mut cmd = Command::new(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    cmd.arg0(&hook.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NIMBUS_HOOK", kind.name())
        .env("NIMBUS_HOOK_TIMEOUT", timeout.as_secs().to_string())
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let spawned = cmd.spawn();
    // The child has its copy; later children must not inherit ours.
    drop(fd);
    let mut child = spawned.map_err(|source| HookError::Io {
        path: hook.path.clone(),
        source,
    })?;
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    let out: Option<Box<dyn std::io::Read + Send>> = child
        .stdout
        .take()
        .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>);
    let err: Option<Box<dyn std::io::Read + Send>> = child
        .stderr
        .take()
        .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>);
    for r in [out, err].into_iter().flatten() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            while let Some(line) = read_line_capped(&mut r) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let start = Instant::now();
    let mut last: Option<String> = None;
    let take = |line: String, last: &mut Option<String>| {
        let line = line.trim().to_string();
        if !line.is_empty() {
            tracing::info!("{kind} hook {}: {line}", hook.name);
            // Keep status lines short: a hook may print anything.
            *last = Some(line.chars().take(200).collect());
        }
    };
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(line) => take(line, &mut last),
            Err(mpsc::RecvTimeoutError::Timeout) | Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Some(st) = child.try_wait().map_err(|source| HookError::Io {
            path: hook.path.clone(),
            source,
        })? {
            break st;
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
                take(line, &mut last);
            }
            return Err(HookError::TimedOut {
                kind,
                name: hook.name.clone(),
                secs: timeout.as_secs(),
                last,
            });
        }
        progress(&Running {
            kind,
            name: &hook.name,
            elapsed,
            timeout,
            last: last.as_deref(),
        });
    };
    // The rest of its output; a child it left behind holding the pipe does
    // not hold us up.
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
        take(line, &mut last);
    }
    if status.success() {
        Ok(())
    } else {
        Err(HookError::Failed {
            kind,
            name: hook.name.clone(),
            status: status.to_string(),
            last,
        })
    }
}

/// Every hook of `kind`, in order; the first failure stops the rest.
pub fn run_all(
    root: &Path,
    kind: Kind,
    env: &[(&str, String)],
    timeout: Duration,
    progress: &mut dyn FnMut(&Running<'_>),
) -> Result<usize, HookError> {
    let hooks = discover(root, kind)?;
    for h in &hooks {
        tracing::info!("{kind} hook {}: running {}", h.name, h.path.display());
        run(kind, h, env, timeout, progress)?;
        tracing::info!("{kind} hook {}: done", h.name);
    }
    Ok(hooks.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn hook(root: &Path, base: &str, kind: Kind, name: &str, body: &str) -> PathBuf {
        let d = root.join(base).join(format!("{}.d", kind.name()));
        fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn quiet(_: &Running<'_>) {}

    #[test]
    fn etc_overrides_usr_by_name_and_dev_null_masks() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        hook(r, nimbus::paths::HOOKS_USR, Kind::PreReboot, "10-a", "true");
        hook(
            r,
            nimbus::paths::HOOKS_USR,
            Kind::PreReboot,
            "50-swarm",
            "true",
        );
        hook(r, nimbus::paths::HOOKS_USR, Kind::PreReboot, "60-b", "true");
        let mine = hook(r, nimbus::paths::HOOKS_ETC, Kind::PreReboot, "10-a", "true");
        let etc = r.join(nimbus::paths::HOOKS_ETC).join("pre-reboot.d");
        std::os::unix::fs::symlink("/dev/null", etc.join("60-b")).unwrap();
        hook(
            r,
            nimbus::paths::HOOKS_ETC,
            Kind::PreReboot,
            "20-mine",
            "true",
        );
        fs::write(etc.join("30-not-exec"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(etc.join("30-not-exec"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(etc.join(".hidden"), "").unwrap();
        let got = discover(r, Kind::PreReboot).unwrap();
        let names: Vec<&str> = got.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["10-a", "20-mine", "50-swarm"]);
        assert_eq!(got[0].path, mine);
        assert!(discover(r, Kind::PostGood).unwrap().is_empty());
    }

    #[test]
    fn a_hook_others_can_write_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = hook(
            t.path(),
            nimbus::paths::HOOKS_ETC,
            Kind::PostGood,
            "10-x",
            "true",
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o777)).unwrap();
        let e = discover(t.path(), Kind::PostGood).unwrap_err();
        assert!(e.to_string().contains("writable by group or others"), "{e}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        let d = p.parent().unwrap();
        fs::set_permissions(d, fs::Permissions::from_mode(0o777)).unwrap();
        let e = discover(t.path(), Kind::PostGood).unwrap_err();
        assert!(e.to_string().contains("post-good.d"), "{e}");
    }

    #[test]
    fn a_symlinked_or_foreign_ancestor_is_refused() {
        use std::os::unix::fs::{lchown, symlink};
        // /etc/nimbus a link planted to a tree that looks right.
        let t = tempfile::tempdir().unwrap();
        let elsewhere = t.path().join("elsewhere");
        hook(&elsewhere, "nimbus/hooks", Kind::PreReboot, "10-x", "true");
        fs::create_dir_all(t.path().join("etc")).unwrap();
        symlink(elsewhere.join("nimbus"), t.path().join("etc/nimbus")).unwrap();
        let e = discover(t.path(), Kind::PreReboot).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(e.to_string().contains("etc/nimbus"), "{e}");

        // A directory on the way that a user owns (who could swap what is
        // below it), even with root's hooks inside.
        let t = tempfile::tempdir().unwrap();
        hook(
            t.path(),
            nimbus::paths::HOOKS_ETC,
            Kind::PreReboot,
            "10-x",
            "true",
        );
        let nimbus_dir = t.path().join("etc/nimbus");
        lchown(&nimbus_dir, Some(1000), Some(1000)).unwrap();
        let e = discover(t.path(), Kind::PreReboot).unwrap_err();
        assert!(e.to_string().contains("owned by uid 1000"), "{e}");
        lchown(&nimbus_dir, Some(0), Some(0)).unwrap();
        assert_eq!(discover(t.path(), Kind::PreReboot).unwrap().len(), 1);

        // A hook that is a link to a file in a directory others may write.
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("etc/nimbus/hooks/pre-reboot.d");
        fs::create_dir_all(&d).unwrap();
        let open = t.path().join("open");
        fs::create_dir_all(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        fs::write(open.join("x"), "#!/bin/sh\ntrue\n").unwrap();
        fs::set_permissions(open.join("x"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink(open.join("x"), d.join("10-x")).unwrap();
        let e = discover(t.path(), Kind::PreReboot).unwrap_err();
        assert!(e.to_string().contains("writable by group or others"), "{e}");
    }

    #[test]
    fn hooks_see_their_env_and_failures_say_why() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        hook(
            t.path(),
            nimbus::paths::HOOKS_USR,
            Kind::PreReboot,
            "10-env",
            &format!(
                "echo \"$NIMBUS_HOOK $NIMBUS_NEW_VERSION $NIMBUS_HOOK_TIMEOUT\" > {}",
                out.display()
            ),
        );
        hook(
            t.path(),
            nimbus::paths::HOOKS_USR,
            Kind::PreReboot,
            "20-fail",
            "echo 'node has 2 tasks left' >&2; exit 3",
        );
        hook(
            t.path(),
            nimbus::paths::HOOKS_USR,
            Kind::PreReboot,
            "30-never",
            "touch never",
        );
        let e = run_all(
            t.path(),
            Kind::PreReboot,
            &[("NIMBUS_NEW_VERSION", "1.2.3".into())],
            Duration::from_secs(30),
            &mut quiet,
        )
        .unwrap_err();
        assert_eq!(fs::read_to_string(&out).unwrap(), "pre-reboot 1.2.3 30\n");
        let msg = e.to_string();
        assert!(msg.contains("pre-reboot hook 20-fail failed"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("node has 2 tasks left"), "{msg}");
        assert!(!t.path().join("never").exists());
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed_with_its_children() {
        let t = tempfile::tempdir().unwrap();
        let marker = t.path().join("survivor");
        hook(
            t.path(),
            nimbus::paths::HOOKS_USR,
            Kind::PreReboot,
            "50-slow",
            &format!(
                "echo waiting for 3 tasks; (sleep 3; touch {}) & sleep 60",
                marker.display()
            ),
        );
        let mut seen = Vec::new();
        let start = Instant::now();
        let e = run_all(
            t.path(),
            Kind::PreReboot,
            &[],
            Duration::from_secs(1),
            &mut |r| seen.push(r.to_string()),
        )
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(20));
        let msg = e.to_string();
        assert!(msg.contains("did not finish within 1 s"), "{msg}");
        assert!(msg.contains("waiting for 3 tasks"), "{msg}");
        assert!(
            seen.iter()
                .any(|s| s.starts_with("pre-reboot hook 50-slow (0 s of 1 s)")),
            "{seen:?}"
        );
        std::thread::sleep(Duration::from_secs(4));
        assert!(!marker.exists(), "the hook's background child outlived it");
    }

    #[test]
    fn output_lines_are_capped_decoded_lossily_and_escaped() {
        let mut long = vec![b'a'; 3 * MAX_LINE];
        long.push(b'\n');
        let mut input = b"ok\r\n\x1b[31mred\x07\n\xff\xfebytes\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"no newline at the end");
        let mut r = std::io::Cursor::new(input);
        let mut lines = Vec::new();
        while let Some(l) = read_line_capped(&mut r) {
            lines.push(l);
        }
        assert_eq!(lines[0], "ok");
        assert_eq!(lines[1], "\\u{1b}[31mred\\u{7}");
        assert_eq!(lines[2], "\u{fffd}\u{fffd}bytes");
        assert_eq!(lines[3].len(), MAX_LINE);
        assert_eq!(lines[4], "no newline at the end");
        assert_eq!(lines.len(), 5);
    }
}
