//! Commands with deadlines. A child that outlives its deadline is killed
//! (SIGKILL, and its process group where it has one of its own) and the
//! error names the command and the limit, with what it printed so far.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub enum Error {
    /// The command could not be started.
    Spawn { cmd: String, source: std::io::Error },
    /// The command ran past its deadline and was killed.
    Timeout {
        cmd: String,
        limit: Duration,
        stdout: String,
        stderr: String,
    },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Spawn { cmd, source } => write!(f, "{cmd}: cannot start: {source}"),
            Error::Timeout {
                cmd,
                limit,
                stdout,
                stderr,
            } => write!(
                f,
                "{cmd}: no answer within {} s; killed (SIGKILL)\n--- its stdout so far ---\n{}\n--- its stderr so far ---\n{}",
                limit.as_secs(),
                tail(stdout, 40),
                tail(stderr, 40)
            ),
        }
    }
}

impl std::error::Error for Error {}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// How a command is named in errors: program and arguments.
pub fn describe(cmd: &Command) -> String {
    let mut out = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        out.push(' ');
        out.push_str(&a.to_string_lossy());
    }
    out
}

fn reader<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

/// Kill `child` (SIGKILL) and reap it.
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Wait for `child` until `deadline`; kill it past that.
pub fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            kill(child);
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Like [`Command::output`], with stdin closed and a wall-clock limit.
///
/// A command that spawns children holding its stdout open (a daemon)
/// would keep the pipe open after its own exit: the readers are then
/// abandoned at the deadline rather than joined.
pub fn output(cmd: &mut Command, limit: Duration) -> Result<Output, Error> {
    output_from(cmd, Stdio::null(), limit)
}

/// [`output`], with `stdin` (a file to feed the command, say) as its input.
pub fn output_from(cmd: &mut Command, stdin: Stdio, limit: Duration) -> Result<Output, Error> {
    let name = describe(cmd);
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            cmd: name.clone(),
            source,
        })?;
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = wait_until(&mut child, deadline).map_err(|source| Error::Spawn {
        cmd: name.clone(),
        source,
    })?;
    // The pipes close when the child and anything it left holding them
    // (a daemon it started) are gone: the readers get two seconds after
    // the child's end, then are abandoned with what they had.
    let grace = Instant::now() + Duration::from_secs(2);
    let join = |h: std::thread::JoinHandle<Vec<u8>>| -> Vec<u8> {
        while !h.is_finished() && Instant::now() < grace {
            std::thread::sleep(Duration::from_millis(20));
        }
        if h.is_finished() {
            h.join().unwrap_or_default()
        } else {
            Vec::new()
        }
    };
    let (stdout, stderr) = (join(out), join(err));
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => Err(Error::Timeout {
            cmd: name,
            limit,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }),
    }
}

/// Like [`Command::status`] with inherited output, and a wall-clock limit.
pub fn status(cmd: &mut Command, limit: Duration) -> Result<ExitStatus, Error> {
    let name = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .spawn()
        .map_err(|source| Error::Spawn {
            cmd: name.clone(),
            source,
        })?;
    match wait_until(&mut child, Instant::now() + limit) {
        Ok(Some(st)) => Ok(st),
        Ok(None) => Err(Error::Timeout {
            cmd: name,
            limit,
            stdout: String::new(),
            stderr: String::new(),
        }),
        Err(source) => Err(Error::Spawn { cmd: name, source }),
    }
}

/// [`status`] for a command that starts processes of its own (a test
/// binary booting QEMU): it runs in a new process group, and past the
/// limit the whole group is killed, not just the command, so nothing it
/// started outlives it and nothing outside it is touched.
pub fn status_group(cmd: &mut Command, limit: Duration) -> Result<ExitStatus, Error> {
    use std::os::unix::process::CommandExt;
    let name = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|source| Error::Spawn {
            cmd: name.clone(),
            source,
        })?;
    // The child leads its group: its pid is the group id.
    let group = i32::try_from(child.id()).ok();
    let kill_group = || {
        if let Some(g) = group {
            // SAFETY: kill(2) with a negative pid signals the group; no memory is involved.
            unsafe {
                libc::kill(-g, libc::SIGKILL);
            }
        }
    };
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => {
                // What it left running in its group goes with it.
                kill_group();
                return Ok(st);
            }
            Ok(None) if Instant::now() >= deadline => {
                kill_group();
                let _ = child.wait();
                return Err(Error::Timeout {
                    cmd: name,
                    limit,
                    stdout: String::new(),
                    stderr: String::new(),
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(source) => return Err(Error::Spawn { cmd: name, source }),
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_group_past_its_limit_is_killed_whole() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("grandchild");
        let t0 = Instant::now();
        let e = status_group(
            Command::new("sh").args([
                "-c",
                &format!("sleep 600 & echo $! > {}; wait", pidfile.display()),
            ]),
            Duration::from_millis(800),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild went with the group (reaped by init, so poll).
        let gone = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        });
        assert!(gone, "sleep {pid} outlived its group");
    }
    use super::*;

    #[test]
    fn a_command_within_its_limit_gives_its_output() {
        let o = output(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(o.status.code(), Some(3));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
        assert_eq!(String::from_utf8_lossy(&o.stderr), "err\n");
    }

    #[test]
    fn a_hung_command_is_killed_at_its_deadline_and_named() {
        let t = Instant::now();
        let e = output(
            Command::new("sh").args(["-c", "echo started; exec sleep 600"]),
            Duration::from_millis(500),
        )
        .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let msg = e.to_string();
        assert!(
            msg.starts_with("sh -c echo started; exec sleep 600: no answer within 0 s"),
            "{msg}"
        );
        assert!(msg.contains("started"), "{msg}");
    }

    #[test]
    fn a_daemon_holding_the_pipe_does_not_hold_the_caller() {
        // The shell exits at once; its background child keeps stdout open.
        let t = Instant::now();
        let o = output(
            Command::new("sh").args(["-c", "sleep 600 & echo parent"]),
            Duration::from_secs(2),
        )
        .unwrap();
        assert!(o.status.success());
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let e = output(
            &mut Command::new("/nonexistent/prog"),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Spawn { .. }), "{e}");
    }
}
