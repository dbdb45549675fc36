//! The local API: JSON lines on a Unix socket under /run/nimbus, root only
//! (the socket is 0600 and every peer's uid is checked with SO_PEERCRED).
//! One request per line; `watch` keeps the connection and sends the status
//! each time it changes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::Duration;

use crate::engine::Shared;
use crate::status::Status;

pub const SOCKET_PATH: &str = nimbus::paths::ENGINE_SOCKET;

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

fn write_line(s: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut b = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    b.push(b'\n');
    s.write_all(&b)
}

/// Bind the socket (replacing a stale one) and serve until the process
/// ends. `tx` reaches the engine thread.
pub fn serve(
    path: &Path,
    shared: Arc<Shared>,
    tx: Sender<Command>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let shared = shared.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                if let Err(e) = handle(conn, shared, tx) {
                    tracing::debug!("api connection: {e}");
                }
            });
        }
    }))
}

fn handle(mut conn: UnixStream, shared: Arc<Shared>, tx: Sender<Command>) -> std::io::Result<()> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(&conn, PeerCredentials).map_err(std::io::Error::from)?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() != 0 && cred.uid() != me {
        return write_line(
            &mut conn,
            &Response::refused(
                "permission",
                format!("uid {} may not use update-engine (root only)", cred.uid()),
            ),
        );
    }
    let reader = BufReader::new(conn.try_clone()?);
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                write_line(
                    &mut conn,
                    &Response::refused("bad-request", format!("cannot parse request: {e}")),
                )?;
                continue;
            }
        };
        match req {
            Request::Status => write_line(&mut conn, &Response::ok("", shared.snapshot()))?,
            Request::Watch => return watch(conn, &shared),
            Request::Cancel => {
                shared.cancel.store(true, Ordering::SeqCst);
                write_line(
                    &mut conn,
                    &Response::ok("cancel requested", shared.snapshot()),
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
                write_line(&mut conn, &r)?
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
                write_line(&mut conn, &r)?
            }
        }
    }
    Ok(())
}

fn watch(mut conn: UnixStream, shared: &Shared) -> std::io::Result<()> {
    let mut seen = u64::MAX;
    let mut last = std::time::Instant::now();
    loop {
        let seq = shared.seq.load(Ordering::SeqCst);
        // A change, or a heartbeat each second so clients can stop waiting
        // on their own conditions and a closed client is noticed.
        if seq != seen || last.elapsed() >= Duration::from_secs(1) {
            last = std::time::Instant::now();
            seen = seq;
            write_line(&mut conn, &Response::ok("", shared.snapshot()))?;
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
