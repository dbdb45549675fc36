//! A small static HTTP/1.1 server on loopback for the updater's tests and
//! benchmark: serves a directory with Range support, logs every request,
//! and can misbehave on purpose (status codes, stalls, truncation,
//! throttling, ignoring Range). Real TCP, real HTTP: the client under test
//! is the production reqwest stack.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Default)]
pub struct Fault {
    /// Applies to request paths ending with this (e.g. "usr.img.zst").
    pub suffix: String,
    /// Answer with this status and an empty body.
    pub status: Option<u16>,
    /// Send this many body bytes, then stop sending but keep the socket open.
    pub stall_after: Option<u64>,
    /// Declare the full length but close after this many body bytes.
    pub cut_after: Option<u64>,
    /// Bytes per second for the body.
    pub throttle: Option<u64>,
    /// Answer 200 with the whole file even when a Range was asked.
    pub ignore_range: bool,
    /// Answer a bounded Range with this many bytes fewer than asked (and
    /// a Content-Range that says so).
    pub range_short: Option<u64>,
    /// Send the body one byte at a time, this many ms apart (a server
    /// that never stalls long enough for a read timeout).
    pub trickle_ms: Option<u64>,
    /// Answer 302 with this `Location`; `{path}` in it becomes the path
    /// asked for (a redirect to the same file elsewhere).
    pub redirect_to: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Logged {
    /// Unique per request: a connection still sending after `clear_log`
    /// must not update someone else's entry.
    pub id: u64,
    pub path: String,
    pub range_start: Option<u64>,
    /// The last byte asked for (inclusive), when the range was bounded.
    pub range_end: Option<u64>,
    pub status: u16,
    pub body_bytes: u64,
    /// Seconds from the response head to the last body byte sent.
    pub secs: f64,
}

#[derive(Clone)]
pub struct Httpd {
    pub addr: SocketAddr,
    pub root: PathBuf,
    pub log: Arc<Mutex<Vec<Logged>>>,
    pub fault: Arc<Mutex<Fault>>,
}

impl Httpd {
    pub fn start(root: impl Into<PathBuf>) -> Httpd {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        Httpd::start_on(listener, root)
    }

    /// Serve on a listener the caller bound (its port may already be
    /// written into an image).
    pub fn start_on(listener: TcpListener, root: impl Into<PathBuf>) -> Httpd {
        let h = Httpd {
            addr: listener.local_addr().expect("addr"),
            root: root.into(),
            log: Arc::default(),
            fault: Arc::default(),
        };
        let me = h.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let me = me.clone();
                std::thread::spawn(move || me.serve(conn));
            }
        });
        h
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_fault(&self, f: Fault) {
        *self.fault.lock().expect("fault") = f;
    }

    fn lock_log(&self) -> std::sync::MutexGuard<'_, Vec<Logged>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.lock_log().clone()
    }

    pub fn clear_log(&self) {
        self.lock_log().clear();
    }

    fn serve(&self, mut conn: TcpStream) {
        let mut reader = BufReader::new(conn.try_clone().expect("clone"));
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut range_start = None;
        let mut range_end = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("range:") {
                let spec = v.trim().strip_prefix("bytes=").unwrap_or("");
                let mut parts = spec.splitn(2, '-');
                range_start = parts.next().and_then(|s| s.parse::<u64>().ok());
                range_end = parts.next().and_then(|s| s.trim().parse::<u64>().ok());
            }
        }
        let fault = self.fault.lock().expect("fault").clone();
        let applies = !fault.suffix.is_empty() && path.ends_with(&fault.suffix);
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut logged = Logged {
            id,
            path: path.clone(),
            range_start,
            range_end,
            status: 200,
            body_bytes: 0,
            secs: 0.0,
        };
        let rel = path.trim_start_matches('/');
        let file = self.root.join(rel);
        if let (true, Some(to)) = (applies, &fault.redirect_to) {
            logged.status = 302;
            let to = to.replace("{path}", &path);
            let _ = write!(
                conn,
                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            self.lock_log().push(logged);
            return;
        }
        if let (true, Some(code)) = (applies, fault.status) {
            logged.status = code;
            let _ = write!(
                conn,
                "HTTP/1.1 {code} Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            self.lock_log().push(logged);
            return;
        }
        // Only the bytes asked for are read: a delta asks for hundreds of
        // ranges of one large pack.
        let opened = if rel.contains("..") {
            None
        } else {
            std::fs::File::open(&file).ok().and_then(|f| {
                f.metadata()
                    .ok()
                    .filter(|m| m.is_file())
                    .map(|m| (f, m.len()))
            })
        };
        let Some((mut fh, len)) = opened else {
            logged.status = 404;
            let _ = write!(
                conn,
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            self.lock_log().push(logged);
            return;
        };
        let len = len as usize;
        let ranged =
            range_start.is_some_and(|s| (s as usize) < len) && !(applies && fault.ignore_range);
        let start = if ranged {
            range_start.unwrap_or(0) as usize
        } else {
            0
        };
        let mut end = match range_end {
            Some(e) if ranged => (e as usize + 1).min(len),
            _ => len,
        };
        if let (true, true, Some(n)) = (ranged, applies, fault.range_short) {
            end = end.saturating_sub(n as usize).max(start + 1);
        }
        let mut body = vec![0u8; end - start];
        {
            use std::io::{Seek, SeekFrom};
            if fh.seek(SeekFrom::Start(start as u64)).is_err() || fh.read_exact(&mut body).is_err()
            {
                return;
            }
        }
        let body = &body[..];
        let head = if ranged {
            logged.status = 206;
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\nConnection: close\r\n\r\n",
                body.len(),
                start,
                end - 1,
                len
            )
        } else {
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n", body.len())
        };
        if conn.write_all(head.as_bytes()).is_err() {
            return;
        }
        self.lock_log().push(logged);
        let limit = if applies {
            fault.stall_after.or(fault.cut_after).unwrap_or(u64::MAX)
        } else {
            u64::MAX
        };
        let t0 = Instant::now();
        let mut sent = 0u64;
        let chunk_size = match (applies, fault.trickle_ms) {
            (true, Some(_)) => 1,
            _ => 64 * 1024,
        };
        for chunk in body.chunks(chunk_size) {
            if let (true, Some(ms)) = (applies, fault.trickle_ms) {
                std::thread::sleep(Duration::from_millis(ms));
            }
            let n = (chunk.len() as u64).min(limit - sent) as usize;
            if n > 0 && conn.write_all(&chunk[..n]).is_err() {
                break;
            }
            sent += n as u64;
            if let Some(e) = self.lock_log().iter_mut().find(|l| l.id == id) {
                e.body_bytes = sent;
                e.secs = t0.elapsed().as_secs_f64();
            }
            if sent >= limit {
                break;
            }
            if let (true, Some(bps)) = (applies, fault.throttle) {
                let due = Duration::from_secs_f64(sent as f64 / bps as f64);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        if applies && fault.stall_after.is_some() {
            // Hold the connection open, sending nothing.
            let mut sink = [0u8; 1];
            let _ = conn.set_read_timeout(Some(Duration::from_secs(120)));
            let _ = conn.read(&mut sink);
        }
    }
}
