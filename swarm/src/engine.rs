//! The few Docker Engine API calls that carry a secret, over dockerd's
//! Unix socket: a join token goes in a request body, never on a command
//! line (`/proc/<pid>/cmdline` is world-readable, and `docker swarm join
//! --token ...` would show it to every local user for as long as the join
//! takes).
//!
//! HTTP/1.1 with `Connection: close`, one request per connection, by hand:
//! the Docker API crates (bollard) bring an async runtime and hyper for two
//! calls a boot. Every read and write has a deadline.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::SwarmError;

pub const SOCKET: &str = "/run/docker.sock";
/// The largest answer read: a swarm or node document is a few KiB.
const MAX_RESPONSE: usize = 4 << 20;

/// `POST /swarm/join`'s body.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JoinRequest {
    #[serde(rename = "ListenAddr")]
    pub listen_addr: String,
    #[serde(rename = "AdvertiseAddr")]
    pub advertise_addr: String,
    #[serde(rename = "RemoteAddrs")]
    pub remote_addrs: Vec<String>,
    #[serde(rename = "JoinToken")]
    pub join_token: String,
}

pub struct Engine {
    socket: PathBuf,
    timeout: Duration,
}

/// Any join token in text that may be shown: replaced.
pub fn redact(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("SWMTKN-") {
        out.push_str(&rest[..i]);
        out.push_str("SWMTKN-…");
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

impl Engine {
    pub fn new(socket: &Path, timeout: Duration) -> Engine {
        Engine {
            socket: socket.to_path_buf(),
            timeout,
        }
    }

    /// One request; the status and the body.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), SwarmError> {
        let what = format!("{method} {path}");
        let fail = |reason: String| SwarmError::Docker {
            args: what.clone(),
            reason,
        };
        let mut s = UnixStream::connect(&self.socket)
            .map_err(|e| fail(format!("{}: {e}", self.socket.display())))?;
        s.set_read_timeout(Some(self.timeout))
            .and_then(|()| s.set_write_timeout(Some(self.timeout)))
            .map_err(|e| fail(e.to_string()))?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: nimbus-swarm\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())
            .and_then(|()| s.write_all(body))
            .map_err(|e| fail(format!("sending: {e}")))?;
        let mut raw = Vec::new();
        s.take(MAX_RESPONSE as u64 + 1)
            .read_to_end(&mut raw)
            .map_err(|e| fail(format!("reading the answer: {e}")))?;
        if raw.len() > MAX_RESPONSE {
            return Err(fail(format!("an answer over {MAX_RESPONSE} bytes")));
        }
        parse_response(&raw).map_err(fail)
    }

    /// Join a swarm; the token travels in the body only.
    pub fn join(&self, req: &JoinRequest) -> Result<(), SwarmError> {
        let body = serde_json::to_vec(req).map_err(|e| SwarmError::Docker {
            args: "POST /swarm/join".into(),
            reason: e.to_string(),
        })?;
        let (status, answer) = self.call("POST", "/swarm/join", Some(&body))?;
        if status == 200 {
            return Ok(());
        }
        Err(SwarmError::Docker {
            args: format!("POST /swarm/join (via {})", req.remote_addrs.join(",")),
            reason: format!("HTTP {status}: {}", message(&answer)),
        })
    }
}

/// Docker's error document `{"message": ...}`, or the body's start;
/// tokens redacted either way.
pub fn message(body: &[u8]) -> String {
    let m = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned());
    redact(m.trim())
}

/// Status and body of an HTTP/1.1 answer read to its end: a body of
/// `Content-Length` bytes, chunked, or up to the close.
pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("an answer without the end of its headers")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "headers that are not text")?;
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut f = status_line.split_whitespace();
    let (Some(proto), Some(code)) = (f.next(), f.next()) else {
        return Err(format!("a bad status line {status_line:?}"));
    };
    if !proto.starts_with("HTTP/1.") {
        return Err(format!("not HTTP/1: {status_line:?}"));
    }
    let status: u16 = code.parse().map_err(|_| format!("a bad status {code:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            return Err(format!("a bad header line {l:?}"));
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "content-length" {
            length = Some(
                v.parse::<usize>()
                    .map_err(|_| format!("a bad Content-Length {v:?}"))?,
            );
        } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
    }
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or_else(|| format!("a body of {} bytes, {n} announced", rest.len()))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk without its size line")?;
        let size_text =
            std::str::from_utf8(&b[..eol]).map_err(|_| "a chunk size that is not text")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("a bad chunk size {size_text:?}"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let end = size.checked_add(2).ok_or("a chunk size past memory")?;
        let chunk = b.get(..size).ok_or("a chunk cut short")?;
        out.extend_from_slice(chunk);
        b = b.get(end..).ok_or("a chunk without its line end")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_whole_chunked_or_to_the_close() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}extra").unwrap(),
            (200, b"{}".to_vec())
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3;x=y\r\n:1}\r\n0\r\n\r\n")
                .unwrap(),
            (503, b"{\"a\":1}".to_vec())
        );
        assert_eq!(
            parse_response(b"HTTP/1.0 200 OK\r\n\r\nall of it").unwrap(),
            (200, b"all of it".to_vec())
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"[..],
            b"HTTP/1.1 200 OK\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab",
        ] {
            assert!(
                parse_response(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn tokens_never_reach_a_message() {
        assert_eq!(
            redact("invalid join token SWMTKN-1-abc-def, try again"),
            "invalid join token SWMTKN-…, try again"
        );
        assert_eq!(
            message(br#"{"message":"rpc error: SWMTKN-1-x-y rejected"}"#),
            "rpc error: SWMTKN-… rejected"
        );
    }

    /// A real socket and a server that records what it was sent: the
    /// token is in the body, and a refusal comes back as Docker's message.
    #[test]
    fn a_join_sends_the_token_in_the_body() {
        use std::os::unix::net::UnixListener;
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("docker.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let mut got = Vec::new();
            let refusal = r#"{"message":"rpc error: token SWMTKN-1-aa-bb is not valid"}"#;
            for answer in [
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_string(),
                format!(
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{refusal}",
                    refusal.len()
                ),
            ] {
                let (mut c, _) = l.accept().unwrap();
                let mut buf = vec![0u8; 8192];
                let mut req = Vec::new();
                // Headers, then the announced body.
                loop {
                    let n = c.read(&mut buf).unwrap();
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).into_owned();
                    if let Some(i) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .unwrap()
                            .trim()
                            .parse()
                            .unwrap();
                        if req.len() >= i + 4 + len {
                            break;
                        }
                    }
                }
                c.write_all(answer.as_bytes()).unwrap();
                got.push(String::from_utf8(req).unwrap());
            }
            got
        });
        let e = Engine::new(&sock, Duration::from_secs(5));
        let req = JoinRequest {
            listen_addr: "0.0.0.0:2377".into(),
            advertise_addr: "10.0.0.2".into(),
            remote_addrs: vec!["10.0.0.1:2377".into()],
            join_token: "SWMTKN-1-aa-bb".into(),
        };
        e.join(&req).unwrap();
        let err = e.join(&req).unwrap_err().to_string();
        assert!(
            err.contains("HTTP 503") && err.contains("SWMTKN-…"),
            "{err}"
        );
        assert!(!err.contains("SWMTKN-1-aa-bb"), "{err}");
        let got = server.join().unwrap();
        assert!(
            got[0].starts_with("POST /swarm/join HTTP/1.1\r\n"),
            "{}",
            got[0]
        );
        let body = &got[0][got[0].find("\r\n\r\n").unwrap() + 4..];
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["JoinToken"], "SWMTKN-1-aa-bb");
        assert_eq!(v["RemoteAddrs"][0], "10.0.0.1:2377");
    }

    #[test]
    fn no_dockerd_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let e = Engine::new(&d.path().join("none.sock"), Duration::from_secs(1));
        let err = e.call("GET", "/info", None).unwrap_err().to_string();
        assert!(
            err.contains("GET /info") && err.contains("none.sock"),
            "{err}"
        );
    }
}
