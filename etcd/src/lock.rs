//! The cluster reboot lock: a counting semaphore in etcd, in locksmith's
//! format so existing tooling reads it:
//! `{"semaphore": free, "max": N, "holders": ["machine-id", ...]}` under
//! `coreos.com/updateengine/rebootlock/semaphore` (or
//! `.../groups/<REBOOT_GROUP>/semaphore`). Every change is a compare-and-swap
//! on the key's mod_revision through etcd's v3 JSON gateway, so two hosts
//! can never both take the last slot and a lost race is simply retried.
//!
//! A value that does not parse is reported and never overwritten: guessing
//! would risk dropping another host's hold.

use std::path::PathBuf;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

pub use nimbus::etcd_keys::{reboot_lock as key_for, REBOOT_LOCK as KEY};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub group: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("etcd {endpoints}: unreachable: {reason}")]
    Unreachable { endpoints: String, reason: String },
    #[error("etcd {endpoint}: authentication failed: {reason}")]
    Auth { endpoint: String, reason: String },
    #[error("etcd {endpoint}: {reason}")]
    Protocol { endpoint: String, reason: String },
    #[error("etcd key {key}: the semaphore value is malformed ({reason}); fix or delete it by hand, it is never overwritten")]
    Malformed { key: String, reason: String },
    #[error("{path}: {reason}")]
    Tls { path: PathBuf, reason: String },
    #[error("etcd key {key}: {reason}")]
    Refused { key: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Semaphore {
    pub semaphore: i64,
    pub max: i64,
    pub holders: Vec<String>,
}

impl Default for Semaphore {
    fn default() -> Self {
        Semaphore {
            semaphore: 1,
            max: 1,
            holders: Vec::new(),
        }
    }
}

fn parse_value(key: &str, raw: &[u8]) -> Result<Semaphore, LockError> {
    let bad = |reason: String| LockError::Malformed {
        key: key.to_string(),
        reason,
    };
    let s: Semaphore = serde_json::from_slice(raw).map_err(|e| bad(e.to_string()))?;
    if s.max < 0 {
        return Err(bad(format!("max is {}", s.max)));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(h) = s
        .holders
        .iter()
        .find(|h| !seen.insert(h.as_str()) || h.is_empty())
    {
        return Err(bad(format!("holder {h:?} is empty or listed twice")));
    }
    if s.semaphore != s.max - s.holders.len() as i64 {
        return Err(bad(format!(
            "semaphore {} is not max {} minus {} holder(s)",
            s.semaphore,
            s.max,
            s.holders.len()
        )));
    }
    Ok(s)
}

/// Total time for one etcd call, answer included (reqwest's per-request
/// timeout is total); the client's own timeout only bounds each wait.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// The semaphore value and etcd's answers are small; a larger answer is
/// not etcd's, and is not read into memory.
const MAX_RESPONSE_BYTES: u64 = 1 << 20;

fn read_json(resp: reqwest::blocking::Response, ep: &str) -> Result<Value, LockError> {
    use std::io::Read;
    let mut body = Vec::new();
    resp.take(MAX_RESPONSE_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|e| LockError::Protocol {
            endpoint: ep.to_string(),
            reason: format!("reading the answer: {e}"),
        })?;
    if body.len() as u64 > MAX_RESPONSE_BYTES {
        return Err(LockError::Protocol {
            endpoint: ep.to_string(),
            reason: format!("answer larger than {MAX_RESPONSE_BYTES} bytes"),
        });
    }
    serde_json::from_slice(&body).map_err(|e| LockError::Protocol {
        endpoint: ep.to_string(),
        reason: format!("the answer is not etcd's JSON ({e})"),
    })
}

pub struct LockClient {
    http: reqwest::blocking::Client,
    opts: EtcdOptions,
    key: String,
    token: std::sync::Mutex<Option<String>>,
}

impl LockClient {
    pub fn new(opts: EtcdOptions) -> Result<LockClient, LockError> {
        let mut b = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(5))
            // etcd's gateway never redirects; one that does is not etcd,
            // and following it could carry the credentials elsewhere.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &opts.ca_file {
            let pem = std::fs::read(ca).map_err(|e| LockError::Tls {
                path: ca.clone(),
                reason: e.to_string(),
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| LockError::Tls {
                path: ca.clone(),
                reason: e.to_string(),
            })?;
            // The cluster's own CA, and only it: a public CA's certificate
            // for some name must not pass for a member.
            b = b.tls_built_in_root_certs(false).add_root_certificate(cert);
        }
        match (&opts.cert_file, &opts.key_file) {
            (Some(c), Some(k)) => {
                let mut pem = std::fs::read(c).map_err(|e| LockError::Tls {
                    path: c.clone(),
                    reason: e.to_string(),
                })?;
                pem.extend(std::fs::read(k).map_err(|e| LockError::Tls {
                    path: k.clone(),
                    reason: e.to_string(),
                })?);
                let id = reqwest::Identity::from_pem(&pem).map_err(|e| LockError::Tls {
                    path: c.clone(),
                    reason: e.to_string(),
                })?;
                b = b.identity(id);
            }
            (None, None) => {}
            (Some(p), None) | (None, Some(p)) => {
                return Err(LockError::Tls {
                    path: p.clone(),
                    reason: "ETCD_CERTFILE and ETCD_KEYFILE go together".into(),
                })
            }
        }
        if opts.endpoints.is_empty() {
            return Err(LockError::Unreachable {
                endpoints: String::new(),
                reason: "no ETCD_ENDPOINTS".into(),
            });
        }
        let http = b.build().map_err(|e| LockError::Protocol {
            endpoint: opts.endpoints.join(","),
            reason: e.to_string(),
        })?;
        let key = key_for(opts.group.as_deref());
        Ok(LockClient {
            http,
            opts,
            key,
            token: std::sync::Mutex::new(None),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    fn token(&self, ep: &str) -> Result<Option<String>, LockError> {
        let (Some(user), Some(pass)) = (&self.opts.username, &self.opts.password) else {
            return Ok(None);
        };
        if let Some(t) = self.token.lock().ok().and_then(|t| t.clone()) {
            return Ok(Some(t));
        }
        let url = format!("{}/v3/auth/authenticate", ep.trim_end_matches('/'));
        let resp = self
            .http
            .post(&url)
            .timeout(REQUEST_DEADLINE)
            .json(&json!({"name": user, "password": pass}))
            .send()
            .map_err(|e| LockError::Unreachable {
                endpoints: ep.to_string(),
                reason: e.to_string(),
            })?;
        let v = read_json(resp, ep)?;
        match v["token"].as_str() {
            Some(t) => {
                if let Ok(mut g) = self.token.lock() {
                    *g = Some(t.to_string());
                }
                Ok(Some(t.to_string()))
            }
            None => Err(LockError::Auth {
                endpoint: ep.to_string(),
                reason: v["error"]
                    .as_str()
                    .or(v["message"].as_str())
                    .unwrap_or("no token in the answer")
                    .to_string(),
            }),
        }
    }

    /// The endpoints, for error messages.
    pub(crate) fn endpoints(&self) -> String {
        self.opts.endpoints.join(",")
    }

    /// POST to the first endpoint that answers.
    pub(crate) fn post(&self, path: &str, body: &Value) -> Result<Value, LockError> {
        let mut last = String::new();
        for ep in &self.opts.endpoints {
            let token = match self.token(ep) {
                Ok(t) => t,
                Err(LockError::Unreachable { reason, .. }) => {
                    last = format!("{ep}: {reason}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let url = format!("{}{path}", ep.trim_end_matches('/'));
            let mut req = self.http.post(&url).timeout(REQUEST_DEADLINE).json(body);
            if let Some(t) = token {
                req = req.header("Authorization", t);
            }
            let resp = match req.send() {
                Ok(r) => r,
                Err(e) => {
                    last = format!("{ep}: {e}");
                    continue;
                }
            };
            let status = resp.status();
            let v = read_json(resp, ep).map_err(|e| match e {
                LockError::Protocol { endpoint, reason } => LockError::Protocol {
                    endpoint,
                    reason: format!("HTTP {status} to {path}: {reason}"),
                },
                e => e,
            })?;
            if !status.is_success() || v.get("error").is_some() {
                let msg = v["error"]
                    .as_str()
                    .or(v["message"].as_str())
                    .unwrap_or("")
                    .to_string();
                if msg.contains("auth")
                    || msg.contains("permission")
                    || msg.contains("token")
                    || status == 401
                {
                    if let Ok(mut g) = self.token.lock() {
                        *g = None;
                    }
                    return Err(LockError::Auth {
                        endpoint: ep.clone(),
                        reason: msg,
                    });
                }
                return Err(LockError::Protocol {
                    endpoint: ep.clone(),
                    reason: format!("HTTP {status}: {msg}"),
                });
            }
            return Ok(v);
        }
        Err(LockError::Unreachable {
            endpoints: self.opts.endpoints.join(","),
            reason: last,
        })
    }

    /// The semaphore and the key's mod_revision (0 when the key is absent:
    /// a fresh cluster starts with max 1 and no holders).
    pub fn get(&self) -> Result<(Semaphore, i64), LockError> {
        match self.get_with_revision(&self.key)? {
            Some((raw, rev)) => Ok((parse_value(&self.key, &raw)?, rev)),
            None => Ok((Semaphore::default(), 0)),
        }
    }

    /// Write `s` if the key is still at `rev`; false when someone else won.
    fn cas(&self, s: &Semaphore, rev: i64) -> Result<bool, LockError> {
        let value = serde_json::to_vec(s).map_err(|e| LockError::Protocol {
            endpoint: String::new(),
            reason: e.to_string(),
        })?;
        self.cas_value(&self.key, &value, rev)
    }

    /// Any key's value and its mod_revision (`None` when absent).
    pub fn get_with_revision(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, LockError> {
        let v = self.post("/v3/kv/range", &json!({"key": B64.encode(key)}))?;
        let Some(kv) = v["kvs"].as_array().and_then(|a| a.first()) else {
            return Ok(None);
        };
        let raw = B64
            .decode(kv["value"].as_str().unwrap_or(""))
            .map_err(|e| LockError::Malformed {
                key: key.to_string(),
                reason: format!("not base64 from etcd: {e}"),
            })?;
        let rev: i64 = kv["mod_revision"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok(Some((raw, rev)))
    }

    /// Write `value` to `key` if it is still at `rev` (0: if it does not
    /// exist); false when someone else won.
    pub fn cas_value(&self, key: &str, value: &[u8], rev: i64) -> Result<bool, LockError> {
        let key = B64.encode(key);
        let compare = if rev == 0 {
            json!({"target": "CREATE", "key": key, "create_revision": "0"})
        } else {
            json!({"target": "MOD", "key": key, "mod_revision": rev.to_string()})
        };
        let v = self.post(
            "/v3/kv/txn",
            &json!({"compare": [compare], "success": [{"request_put": {"key": key, "value": B64.encode(value)}}]}),
        )?;
        Ok(v["succeeded"].as_bool().unwrap_or(false))
    }

    /// Apply `f` with compare-and-swap, retrying lost races. `f` returns
    /// the new value, or `None` to leave the key as it is.
    fn update<T>(
        &self,
        mut f: impl FnMut(&Semaphore) -> Result<(Option<Semaphore>, T), LockError>,
    ) -> Result<T, LockError> {
        for _ in 0..32 {
            let (cur, rev) = self.get()?;
            let (new, out) = f(&cur)?;
            let Some(new) = new else {
                return Ok(out);
            };
            if self.cas(&new, rev)? {
                return Ok(out);
            }
        }
        Err(LockError::Refused {
            key: self.key.clone(),
            reason: "32 compare-and-swap attempts lost to other writers".into(),
        })
    }

    /// Take a slot for `id`: true if held (now or already).
    pub fn acquire(&self, id: &str) -> Result<bool, LockError> {
        self.update(|s| {
            if s.holders.iter().any(|h| h == id) {
                return Ok((None, true));
            }
            if s.semaphore <= 0 {
                return Ok((None, false));
            }
            let mut n = s.clone();
            n.holders.push(id.to_string());
            n.semaphore -= 1;
            Ok((Some(n), true))
        })
    }

    /// Give back `id`'s slot: true if it held one.
    pub fn release(&self, id: &str) -> Result<bool, LockError> {
        self.update(|s| {
            if !s.holders.iter().any(|h| h == id) {
                return Ok((None, false));
            }
            let mut n = s.clone();
            n.holders.retain(|h| h != id);
            n.semaphore += 1;
            Ok((Some(n), true))
        })
    }

    pub fn set_max(&self, max: i64) -> Result<Semaphore, LockError> {
        if max < 0 {
            return Err(LockError::Refused {
                key: self.key.clone(),
                reason: format!("max {max} is negative"),
            });
        }
        self.update(|s| {
            let mut n = s.clone();
            n.max = max;
            n.semaphore = max - n.holders.len() as i64;
            Ok((Some(n.clone()), n))
        })
    }

    pub fn holds(&self, id: &str) -> Result<bool, LockError> {
        Ok(self.get()?.0.holders.iter().any(|h| h == id))
    }

    /// Any other key's value, through the same endpoints and credentials
    /// (nimbus-swarm shares join tokens this way).
    pub fn get_value(&self, key: &str) -> Result<Option<Vec<u8>>, LockError> {
        let v = self.post("/v3/kv/range", &json!({"key": B64.encode(key)}))?;
        let Some(kv) = v["kvs"].as_array().and_then(|a| a.first()) else {
            return Ok(None);
        };
        B64.decode(kv["value"].as_str().unwrap_or(""))
            .map(Some)
            .map_err(|e| LockError::Malformed {
                key: key.to_string(),
                reason: format!("not base64 from etcd: {e}"),
            })
    }

    pub fn put_value(&self, key: &str, value: &[u8]) -> Result<(), LockError> {
        self.post(
            "/v3/kv/put",
            &json!({"key": B64.encode(key), "value": B64.encode(value)}),
        )
        .map(|_| ())
    }

    /// Remove a key (nothing to remove is no error).
    pub fn delete_value(&self, key: &str) -> Result<(), LockError> {
        self.post("/v3/kv/deleterange", &json!({"key": B64.encode(key)}))
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback server that answers every request with `body_len` bytes.
    fn huge_answer_server(body_len: usize) -> String {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for c in l.incoming().take(4) {
                let Ok(mut c) = c else { return };
                let mut req = [0u8; 4096];
                let _ = c.read(&mut req);
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {body_len}\r\n\r\n");
                let _ = c.write_all(head.as_bytes());
                let chunk = vec![b' '; 64 * 1024];
                let mut left = body_len;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if c.write_all(&chunk[..n]).is_err() {
                        break;
                    }
                    left -= n;
                }
            }
        });
        format!("http://{addr}")
    }

    #[test]
    fn an_oversized_etcd_answer_is_refused_not_read() {
        let c = LockClient::new(EtcdOptions {
            endpoints: vec![huge_answer_server(64 << 20)],
            ..EtcdOptions::default()
        })
        .expect("client");
        let e = c.get().expect_err("a 64 MiB answer");
        assert!(e.to_string().contains("larger than"), "{e}");
    }

    #[test]
    fn values() {
        assert_eq!(
            parse_value("k", br#"{"semaphore":0,"max":1,"holders":["a"]}"#)
                .expect("ok")
                .holders,
            ["a"]
        );
        for bad in [
            &br#"{"semaphore":1}"#[..],
            br#"not json"#,
            br#"{"semaphore":1,"max":1,"holders":["a"]}"#,
            br#"{"semaphore":-1,"max":1,"holders":["a","a"]}"#,
            br#"{"semaphore":0,"max":-1,"holders":[]}"#,
        ] {
            let e = parse_value("k", bad).expect_err("malformed");
            assert!(e.to_string().contains("malformed"), "{e}");
        }
        assert_eq!(
            key_for(Some("db")),
            "coreos.com/updateengine/rebootlock/groups/db/semaphore"
        );
        assert_eq!(key_for(None), KEY);
    }
}
