//! The local API: JSON lines on a Unix socket under /run/nimbus. Any local
//! user may connect and read (status, watch); what changes the engine needs
//! root or the admin group, decided per request from the peer's
//! credentials (SO_PEERCRED, `crate::access`). One request per line;
//! `watch` keeps the connection and sends the status each time it changes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::Duration;

use crate::access::{self, Access};
use crate::engine::Shared;
use crate::status::Status;

/// Connections a user other than root may hold at once: each is a thread,
/// and a `watch` lasts as long as the client likes.
const MAX_UNPRIVILEGED_CONNECTIONS: usize = 32;
/// A request line longer than this is refused (requests are a few dozen
/// bytes; the socket is open to every local user).
const MAX_REQUEST_LINE: u64 = 64 * 1024;
/// EX_NOPERM from sysexits.h: the caller lacks the privilege.
pub const EXIT_NO_PERMISSION: u8 = 77;

pub const SOCKET_PATH: &str = nimbus::paths::ENGINE_SOCKET;
pub const METRICS_SOCKET_PATH: &str = nimbus::paths::ENGINE_METRICS_SOCKET;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Watch,
    Check,
    Apply {
        #[serde(default)]
        wait: bool,
    },
    SetChannel {
        name: String,
        #[serde(default)]
        allow_downgrade: bool,
    },
    Cancel,
    Rollback,
    MarkGood,
    /// Back to idle: clear a reported error or undo a staged update (D-Bus
    /// `ResetStatus`).
    ResetStatus,
}

impl Request {
    /// What a peer needs to make this request.
    pub fn needs(&self) -> Access {
        match self {
            Request::Status | Request::Watch => Access::Read,
            _ => Access::Change,
        }
    }

    /// The updatectl words for it, for messages.
    fn verb(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Watch => "watch",
            Request::Check => "check",
            Request::Apply { .. } => "update",
            Request::SetChannel { .. } => "channel NAME",
            Request::Cancel => "cancel",
            Request::Rollback => "rollback",
            Request::MarkGood => "mark-good",
            Request::ResetStatus => "reset-status",
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ApiError {
    pub kind: String,
    pub message: String,
    pub exit_code: u8,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Response {
    pub fn ok(message: impl Into<String>, status: Status) -> Response {
        Response {
            ok: true,
            message: Some(message.into()),
            error: None,
            status: Some(status),
        }
    }
    pub fn err(e: &crate::error::UpdateError, status: Status) -> Response {
        Response {
            ok: false,
            message: None,
            error: Some(ApiError {
                kind: e.kind().into(),
                message: e.to_string(),
                exit_code: e.exit_code(),
            }),
            status: Some(status),
        }
    }
    fn refused(kind: &str, message: String) -> Response {
        Response {
            ok: false,
            message: None,
            error: Some(ApiError {
                kind: kind.into(),
                message,
                exit_code: 2,
            }),
            status: None,
        }
    }
}

/// A request the engine's thread must carry out, with where to answer.
pub struct Command {
    pub request: Request,
    pub reply: Sender<Response>,
}

/// Write one answer. A reader who may not change things gets URLs without
/// their credentials (a SERVER with `user:password@`).
fn write_line(s: &mut UnixStream, r: &Response, access: Access) -> std::io::Result<()> {
    let mut b = if access == Access::Change {
        serde_json::to_vec(r).map_err(std::io::Error::other)?
    } else {
        let mut v = serde_json::to_value(r).map_err(std::io::Error::other)?;
        access::redact_json(&mut v);
        serde_json::to_vec(&v).map_err(std::io::Error::other)?
    };
    b.push(b'\n');
    s.write_all(&b)
}

/// Counts a non-root connection while it lives.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Bind the socket (replacing a stale one) and serve until the process
/// ends. `tx` reaches the engine thread.
pub fn serve(
    path: &Path,
    shared: Arc<Shared>,
    tx: Sender<Command>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // Every local user may connect; `access` decides per request.
    let listener = bind_public(path)?;
    let unprivileged = Arc::new(AtomicUsize::new(0));
    Ok(std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let shared = shared.clone();
            let tx = tx.clone();
            let unprivileged = unprivileged.clone();
            std::thread::spawn(move || {
                if let Err(e) = handle(conn, shared, tx, &unprivileged) {
                    tracing::debug!("api connection: {e}");
                }
            });
        }
    }))
}

/// Bind a socket at `path` that any local user may connect to, replacing
/// a stale one.
fn bind_public(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// The metrics socket: each connection gets the exposition text, then the
/// end of the stream. Nothing is read from the client. One connection at a
/// time, each bounded by a write timeout, so a client that never reads
/// cannot hold it.
pub fn serve_metrics(
    path: &Path,
    shared: Arc<Shared>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let listener = bind_public(path)?;
    Ok(std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let text = shared.render_metrics();
            let r = conn
                .set_write_timeout(Some(Duration::from_secs(5)))
                .and_then(|()| conn.write_all(text.as_bytes()));
            if let Err(e) = r {
                tracing::debug!("metrics connection: {e}");
            }
        }
    }))
}

/// Read the metrics text from the socket at `path` (`updatectl metrics`).
pub fn read_metrics(path: &Path) -> Result<String, ClientError> {
    let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let proto = |reason: String| ClientError::Protocol {
        path: path.to_path_buf(),
        reason,
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| proto(e.to_string()))?;
    let mut text = String::new();
    s.take(16 << 20)
        .read_to_string(&mut text)
        .map_err(|e| proto(e.to_string()))?;
    Ok(text)
}

/// One request line, at most `MAX_REQUEST_LINE` bytes. `None` at the end.
fn read_request(reader: &mut BufReader<UnixStream>) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = reader
        .by_ref()
        .take(MAX_REQUEST_LINE)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') && n as u64 >= MAX_REQUEST_LINE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("request line longer than {MAX_REQUEST_LINE} bytes"),
        ));
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn handle(
    mut conn: UnixStream,
    shared: Arc<Shared>,
    tx: Sender<Command>,
    unprivileged: &AtomicUsize,
) -> std::io::Result<()> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(&conn, PeerCredentials).map_err(std::io::Error::from)?;
    let (uid, gid) = (cred.uid(), cred.gid());
    let access = access::of_peer(uid, gid);
    let _slot = if uid == 0 {
        None
    } else {
        if unprivileged.fetch_add(1, Ordering::SeqCst) >= MAX_UNPRIVILEGED_CONNECTIONS {
            unprivileged.fetch_sub(1, Ordering::SeqCst);
            return write_line(
                &mut conn,
                &Response::refused(
                    "busy",
                    format!(
                        "update-engine already serves {MAX_UNPRIVILEGED_CONNECTIONS} connections \
                         of users other than root; try again later"
                    ),
                ),
                access,
            );
        }
        Some(Slot(unprivileged))
    };
    let mut reader = BufReader::new(conn.try_clone()?);
    while let Some(line) = read_request(&mut reader)? {
        if line.trim().is_empty() {
            continue;
        }
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                write_line(
                    &mut conn,
                    &Response::refused("bad-request", format!("cannot parse request: {e}")),
                    access,
                )?;
                continue;
            }
        };
        if req.needs() == Access::Change && access != Access::Change {
            let mut r = Response::refused(
                "permission",
                format!(
                    "`updatectl {}` changes what update-engine does and needs root or \
                     membership of the group {}; uid {uid} may read (status, slots, trust, \
                     metrics)",
                    req.verb(),
                    access::ADMIN_GROUP
                ),
            );
            if let Some(e) = r.error.as_mut() {
                e.exit_code = EXIT_NO_PERMISSION;
            }
            write_line(&mut conn, &r, access)?;
            continue;
        }
        match req {
            Request::Status => write_line(&mut conn, &Response::ok("", shared.snapshot()), access)?,
            Request::Watch => return watch(conn, &shared, access),
            Request::Cancel => {
                shared.cancel.store(true, Ordering::SeqCst);
                write_line(
                    &mut conn,
                    &Response::ok("cancel requested", shared.snapshot()),
                    access,
                )?
            }
            Request::Apply { wait: false } => {
                let (rtx, _rrx) = channel();
                let ok = tx
                    .send(Command {
                        request: Request::Apply { wait: false },
                        reply: rtx,
                    })
                    .is_ok();
                let r = if ok {
                    Response::ok("update started", shared.snapshot())
                } else {
                    Response::refused("stopping", "update-engine is shutting down".into())
                };
                write_line(&mut conn, &r, access)?
            }
            other => {
                let (rtx, rrx) = channel();
                let r = if tx
                    .send(Command {
                        request: other,
                        reply: rtx,
                    })
                    .is_ok()
                {
                    rrx.recv().unwrap_or_else(|_| {
                        Response::refused("stopping", "update-engine is shutting down".into())
                    })
                } else {
                    Response::refused("stopping", "update-engine is shutting down".into())
                };
                write_line(&mut conn, &r, access)?
            }
        }
    }
    Ok(())
}

fn watch(mut conn: UnixStream, shared: &Shared, access: Access) -> std::io::Result<()> {
    let mut seen = u64::MAX;
    let mut last = std::time::Instant::now();
    loop {
        let seq = shared.seq.load(Ordering::SeqCst);
        // A change, or a heartbeat each second so clients can stop waiting
        // on their own conditions and a closed client is noticed.
        if seq != seen || last.elapsed() >= Duration::from_secs(1) {
            last = std::time::Instant::now();
            seen = seq;
            write_line(&mut conn, &Response::ok("", shared.snapshot()), access)?;
        }
        let guard = match shared.status.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let _ = shared.changed.wait_timeout(guard, Duration::from_secs(1));
    }
}

/// The client side.
pub struct Client {
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach update-engine at {path}: {source} (is update-engine.service running?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("update-engine at {path}: {reason}")]
    Protocol { path: PathBuf, reason: String },
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Client {
        Client { path: path.into() }
    }

    fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
            path: self.path.clone(),
            source,
        })
    }

    fn proto(&self, reason: impl ToString) -> ClientError {
        ClientError::Protocol {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    pub fn call(&self, req: &Request) -> Result<Response, ClientError> {
        let mut s = self.connect()?;
        let mut b = serde_json::to_vec(req).map_err(|e| self.proto(e))?;
        b.push(b'\n');
        s.write_all(&b).map_err(|e| self.proto(e))?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| self.proto(e))?;
        serde_json::from_str(&line).map_err(|e| self.proto(format!("bad answer {line:?}: {e}")))
    }

    /// Call `f` with each status until it returns false.
    pub fn watch(&self, mut f: impl FnMut(&Status) -> bool) -> Result<(), ClientError> {
        let mut s = self.connect()?;
        s.write_all(b"{\"op\":\"watch\"}\n")
            .map_err(|e| self.proto(e))?;
        for line in BufReader::new(s).lines() {
            let line = line.map_err(|e| self.proto(e))?;
            let r: Response = serde_json::from_str(&line).map_err(|e| self.proto(e))?;
            if let Some(st) = r.status {
                if !f(&st) {
                    return Ok(());
                }
            }
        }
        Err(self.proto("update-engine closed the watch"))
    }
}
