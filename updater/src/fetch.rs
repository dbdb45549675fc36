//! HTTP for the engine: connect and read timeouts for the payload rather
//! than one total deadline (a 1 GiB payload on a slow link is fine as long
//! as bytes keep coming); small files (manifest, signatures) get a size
//! cap and a total deadline as well, so a server trickling one byte every
//! few seconds cannot hold the engine. Proxies come from the environment
//! (reqwest honours HTTP_PROXY, HTTPS_PROXY, NO_PROXY).

use std::io::Read;
use std::time::Duration;

use crate::error::UpdateError;

/// Keeps a download at or under a rate: after each chunk, sleep until the
/// bytes so far are due. Measured from the first byte, so the average is
/// exact over any stretch longer than a chunk.
pub struct Pacer {
    bps: Option<u64>,
    start: std::time::Instant,
    bytes: u64,
}

impl Pacer {
    pub fn new(bps: Option<u64>) -> Pacer {
        Pacer {
            bps,
            start: std::time::Instant::now(),
            bytes: 0,
        }
    }

    pub fn account(&mut self, n: u64) {
        let Some(bps) = self.bps.filter(|&b| b > 0) else {
            return;
        };
        self.bytes += n;
        let due = Duration::from_secs_f64(self.bytes as f64 / bps as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

pub struct Http {
    client: reqwest::blocking::Client,
    read_timeout: Duration,
    small_deadline: Duration,
}

/// What the engine needs from HTTP: a small file whole (404 as `None`), a
/// body from an offset, a bounded range. [`Http`] is the real one (reqwest);
/// tests give the engine their own.
pub trait Transport: Send + Sync {
    fn get_small_opt(&self, url: &str, limit: usize) -> Result<Option<Vec<u8>>, UpdateError>;
    fn get_from(&self, url: &str, offset: u64) -> Result<Body, UpdateError>;
    fn get_range(&self, url: &str, start: u64, end: u64) -> Result<Body, UpdateError>;

    /// A whole file the signed manifest lists besides the payload (a delta
    /// index, a stage-1 file). The same request as `get_from(url, 0)`;
    /// apart so the metrics count it as metadata, not payload.
    fn get_listed(&self, url: &str) -> Result<Body, UpdateError> {
        self.get_from(url, 0)
    }

    /// As `get_small_opt`, with a 404 turned into the caller's error.
    fn get_small(
        &self,
        url: &str,
        limit: usize,
        not_found: &dyn Fn() -> UpdateError,
    ) -> Result<Vec<u8>, UpdateError> {
        self.get_small_opt(url, limit)?.ok_or_else(not_found)
    }
}

pub struct Body {
    pub url: String,
    pub resp: Box<dyn Read + Send>,
    /// The byte offset the body starts at (0 unless a Range was honoured).
    pub start: u64,
    read_timeout: Duration,
}

fn classify(url: &str, e: &reqwest::Error, read_timeout: Duration) -> UpdateError {
    if e.is_timeout() {
        UpdateError::Stalled {
            url: url.to_string(),
            secs: read_timeout.as_secs().max(1),
        }
    } else if e.is_connect() {
        // The root cause ("Connection refused") is what an operator needs.
        let mut reason = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            reason = s.to_string();
            src = s.source();
        }
        UpdateError::Connect {
            url: url.to_string(),
            reason,
        }
    } else if e.is_redirect() {
        // The policy's own words (`same_origin_redirects`), not reqwest's
        // wrapper around them.
        let mut reason = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            reason = s.to_string();
            src = s.source();
        }
        UpdateError::Redirect {
            url: url.to_string(),
            reason,
        }
    } else {
        UpdateError::Network {
            url: url.to_string(),
            reason: e.to_string(),
        }
    }
}

impl Http {
    pub fn new(
        connect_timeout: Duration,
        read_timeout: Duration,
        small_deadline: Duration,
    ) -> Result<Http, UpdateError> {
        // reqwest's blocking `timeout` bounds the wait for the response head
        // and each body read separately, which is a read timeout, not a
        // deadline on the whole transfer.
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(read_timeout)
            .user_agent(concat!("nimbus-update-engine/", env!("CARGO_PKG_VERSION")))
            .redirect(same_origin_redirects())
            .build()
            .map_err(|e| UpdateError::Network {
                url: String::new(),
                reason: format!("building the HTTP client: {e}"),
            })?;
        Ok(Http {
            client,
            read_timeout,
            small_deadline,
        })
    }
}

impl Transport for Http {
    /// A small file (manifest, signatures) with a hard size cap and a total
    /// deadline; a 404 is `None` (the next trust rotation may not exist).
    fn get_small_opt(&self, url: &str, limit: usize) -> Result<Option<Vec<u8>>, UpdateError> {
        let t0 = std::time::Instant::now();
        let deadline = self.small_deadline;
        let late = || UpdateError::Deadline {
            url: url.to_string(),
            secs: deadline.as_secs().max(1),
        };
        // A per-request timeout is total in reqwest (head and body); the
        // elapsed-time check below catches what slips between reads.
        let resp = self.client.get(url).timeout(deadline).send().map_err(|e| {
            if e.is_timeout() && t0.elapsed() >= deadline {
                late()
            } else {
                classify(url, &e, self.read_timeout)
            }
        })?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(UpdateError::Http {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(UpdateError::ResponseTooLarge {
                url: url.to_string(),
                limit,
            });
        }
        let mut out = Vec::new();
        let mut body = Body {
            url: url.to_string(),
            resp: Box::new(resp),
            start: 0,
            read_timeout: self.read_timeout,
        };
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match body.read_some(&mut buf) {
                Ok(n) => n,
                Err(_) if t0.elapsed() >= deadline => return Err(late()),
                Err(e) => return Err(e),
            };
            if t0.elapsed() >= deadline {
                return Err(late());
            }
            if n == 0 {
                break;
            }
            if out.len() + n > limit {
                return Err(UpdateError::ResponseTooLarge {
                    url: url.to_string(),
                    limit,
                });
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(Some(out))
    }

    /// GET from byte `offset` on. A server that ignores the Range header
    /// answers 200 with the whole file; `Body::start` says which happened.
    fn get_from(&self, url: &str, offset: u64) -> Result<Body, UpdateError> {
        let mut req = self.client.get(url);
        if offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let resp = req
            .send()
            .map_err(|e| classify(url, &e, self.read_timeout))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(UpdateError::PayloadMissing {
                url: url.to_string(),
            });
        }
        let start = if status == reqwest::StatusCode::PARTIAL_CONTENT && offset > 0 {
            let cr = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let got = cr
                .strip_prefix("bytes ")
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.parse::<u64>().ok());
            if got != Some(offset) {
                return Err(UpdateError::Network {
                    url: url.to_string(),
                    reason: format!(
                        "asked for bytes from {offset}, server sent Content-Range {cr:?}"
                    ),
                });
            }
            offset
        } else if status.is_success() {
            0
        } else {
            return Err(UpdateError::Http {
                url: url.to_string(),
                status: status.as_u16(),
            });
        };
        Ok(Body {
            url: url.to_string(),
            resp: Box::new(resp),
            start,
            read_timeout: self.read_timeout,
        })
    }

    /// GET pack bytes `[start, end)`: the server must answer 206 with
    /// exactly that range. A 200 (Range ignored) is its own error so the
    /// caller can fall back to the full payload.
    fn get_range(&self, url: &str, start: u64, end: u64) -> Result<Body, UpdateError> {
        let last = end.saturating_sub(1);
        let resp = self
            .client
            .get(url)
            .header(reqwest::header::RANGE, format!("bytes={start}-{last}"))
            .send()
            .map_err(|e| classify(url, &e, self.read_timeout))?;
        let status = resp.status();
        if status == reqwest::StatusCode::OK {
            return Err(UpdateError::RangeIgnored {
                url: url.to_string(),
            });
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(UpdateError::PayloadMissing {
                url: url.to_string(),
            });
        }
        if status != reqwest::StatusCode::PARTIAL_CONTENT {
            return Err(UpdateError::Http {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        let cr = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let range = cr
            .strip_prefix("bytes ")
            .and_then(|r| r.split('/').next())
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
        if range != Some((start, last)) {
            return Err(UpdateError::RangeMismatch {
                url: url.to_string(),
                start,
                end: last,
                got: format!("server sent Content-Range {cr:?}"),
            });
        }
        Ok(Body {
            url: url.to_string(),
            resp: Box::new(resp),
            start,
            read_timeout: self.read_timeout,
        })
    }
}

impl Body {
    /// A body over any reader that starts at byte `start` of `url`.
    pub fn from_reader(url: &str, resp: Box<dyn Read + Send>, start: u64) -> Body {
        Body {
            url: url.to_string(),
            resp,
            start,
            read_timeout: Duration::from_secs(60),
        }
    }

    /// Exactly `buf.len()` bytes, or a truncation error naming the offset.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), UpdateError> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_some(&mut buf[done..])?;
            if n == 0 {
                return Err(UpdateError::RangeMismatch {
                    url: self.url.clone(),
                    start: self.start,
                    end: self.start + buf.len() as u64,
                    got: format!("the body ended {} bytes short", buf.len() - done),
                });
            }
            done += n;
        }
        self.start += buf.len() as u64;
        Ok(())
    }

    /// The body must end here (a range answer with extra bytes is wrong).
    pub fn expect_end(&mut self) -> Result<(), UpdateError> {
        let mut b = [0u8; 1];
        match self.read_some(&mut b)? {
            0 => Ok(()),
            _ => Err(UpdateError::RangeMismatch {
                url: self.url.clone(),
                start: self.start,
                end: self.start,
                got: "the body is longer than the range".into(),
            }),
        }
    }

    /// Read what is there; 0 at the end. Errors say whether the server
    /// stalled or the connection broke.
    pub fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, UpdateError> {
        loop {
            match self.resp.read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let timed_out = e.kind() == std::io::ErrorKind::TimedOut
                        || e.get_ref()
                            .and_then(|i| i.downcast_ref::<reqwest::Error>())
                            .is_some_and(|r| r.is_timeout());
                    return Err(if timed_out {
                        UpdateError::Stalled {
                            url: self.url.clone(),
                            secs: self.read_timeout.as_secs().max(1),
                        }
                    } else {
                        UpdateError::Network {
                            url: self.url.clone(),
                            reason: format!("connection broke while reading: {e}"),
                        }
                    });
                }
            }
        }
    }
}

fn same_origin(a: &reqwest::Url, b: &reqwest::Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// Redirects stay on the origin the first URL named (scheme, host and
/// port), at most 5 of them: the signatures protect what a host installs,
/// not where it goes, and a repository that could send update-engine
/// anywhere could send it from https to plain http, to a host that learns
/// which version every machine runs, or to an address inside the network.
/// Mirrors that redirect to a CDN are configured as SERVER instead.
pub fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let Some(first) = attempt.previous().first().cloned() else {
            return attempt.follow();
        };
        if attempt.previous().len() > 5 {
            return attempt.error(format!("more than 5 redirects from {first}"));
        }
        let to = attempt.url();
        if same_origin(to, &first) {
            attempt.follow()
        } else {
            let why = format!("redirect from {first} to {to} leaves its origin: refused");
            attempt.error(why)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> reqwest::Url {
        reqwest::Url::parse(s).expect("url")
    }

    #[test]
    fn an_origin_is_scheme_host_and_port() {
        let repo = u("https://updates.example.com/channels/stable.json");
        for same in [
            "https://updates.example.com/mirror/stable.json",
            "https://updates.example.com:443/x",
        ] {
            assert!(same_origin(&u(same), &repo), "{same}");
        }
        for other in [
            "http://updates.example.com/channels/stable.json",
            "https://updates.example.com:8443/x",
            "https://cdn.example.com/x",
            "https://169.254.169.254/latest/meta-data",
        ] {
            assert!(!same_origin(&u(other), &repo), "{other}");
        }
    }
}
