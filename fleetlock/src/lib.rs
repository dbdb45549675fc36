//! `nimbus-fleetlock`: a FleetLock server (Zincati's reboot-lock protocol,
//! `nimbus::fleetlock`) keeping each group's semaphore in etcd v3 exactly
//! as airlock does, so Zincati hosts and Nimbus hosts share one lock.
//!
//! The protocol logic is here, over a narrow [`Store`] (a key's value and
//! revision; compare-and-swap); `main.rs` puts it behind HTTP and etcd.

pub mod config;
pub mod http;

use std::collections::BTreeMap;
use std::sync::Mutex;

use nimbus::fleetlock::{self, ErrorBody, Request, Semaphore};

/// What the server needs from etcd.
pub trait Store: Send + Sync {
    /// The value and its mod revision, `None` when the key is absent.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, String>;
    /// Write `value` if the key is still at `rev` (0: still absent).
    fn cas(&self, key: &str, value: &[u8], rev: i64) -> Result<bool, String>;
}

impl Store for nimbus_etcd::LockClient {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, String> {
        self.get_with_revision(key).map_err(|e| e.to_string())
    }
    fn cas(&self, key: &str, value: &[u8], rev: i64) -> Result<bool, String> {
        self.cas_value(key, value, rev).map_err(|e| e.to_string())
    }
}

/// An answer: HTTP status and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub content_type: &'static str,
}

fn ok() -> Answer {
    Answer {
        status: 200,
        body: "{}".into(),
        content_type: "application/json",
    }
}

pub(crate) fn fail(status: u16, kind: &str, value: impl Into<String>) -> Answer {
    let body = serde_json::to_string(&ErrorBody {
        kind: kind.into(),
        value: value.into(),
    })
    .unwrap_or_else(|_| "{}".into());
    Answer {
        status,
        body,
        content_type: "application/json",
    }
}

/// Counters for `GET /metrics`.
#[derive(Debug, Default)]
struct Counters {
    /// (operation, result) -> count.
    requests: BTreeMap<(&'static str, &'static str), u64>,
    /// group -> (slots, holders) as last seen.
    groups: BTreeMap<String, (u64, u64)>,
}

/// Lost compare-and-swap races are retried this often before the request
/// fails (the client retries later).
const CAS_ATTEMPTS: usize = 16;

pub struct Server<S> {
    store: S,
    groups: BTreeMap<String, u64>,
    counters: Mutex<Counters>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    PreReboot,
    SteadyState,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::PreReboot => "pre-reboot",
            Op::SteadyState => "steady-state",
        }
    }
}

impl<S: Store> Server<S> {
    pub fn new(store: S, groups: BTreeMap<String, u64>) -> Server<S> {
        Server {
            store,
            groups,
            counters: Mutex::new(Counters::default()),
        }
    }

    fn count(&self, op: &'static str, result: &'static str) {
        if let Ok(mut c) = self.counters.lock() {
            *c.requests.entry((op, result)).or_insert(0) += 1;
        }
    }

    fn seen(&self, group: &str, s: &Semaphore) {
        if let Ok(mut c) = self.counters.lock() {
            c.groups
                .insert(group.to_string(), (s.total_slots, s.holders.len() as u64));
        }
    }

    /// One request. `protocol_header` is whether `fleet-lock-protocol:
    /// true` was sent.
    pub fn handle(&self, method: &str, path: &str, protocol_header: bool, body: &[u8]) -> Answer {
        let path = path.split('?').next().unwrap_or("");
        let op = match path.trim_start_matches('/') {
            p if p == fleetlock::PRE_REBOOT => Op::PreReboot,
            p if p == fleetlock::STEADY_STATE => Op::SteadyState,
            "metrics" if method == "GET" => {
                return Answer {
                    status: 200,
                    body: self.metrics(),
                    content_type: "text/plain; version=0.0.4",
                }
            }
            _ => {
                self.count("other", "not_found");
                return fail(404, "not_found", format!("no such endpoint: {path}"));
            }
        };
        let name = op.name();
        if method != "POST" {
            self.count(name, "bad_request");
            return fail(
                405,
                "bad_method",
                format!("{path} takes POST, not {method}"),
            );
        }
        if !protocol_header {
            self.count(name, "bad_request");
            return fail(
                400,
                "missing_header",
                format!(
                    "the header `{}: {}` is required",
                    fleetlock::HEADER,
                    fleetlock::HEADER_VALUE
                ),
            );
        }
        let req = match Request::parse(body) {
            Ok(r) => r,
            Err(e) => {
                self.count(name, "bad_request");
                return fail(400, "bad_request", e);
            }
        };
        let group = req.client_params.group.as_str();
        let Some(&slots) = self.groups.get(group) else {
            self.count(name, "bad_request");
            return fail(
                400,
                "unknown_group",
                format!(
                    "group {group:?} is not configured (configured: {})",
                    self.groups.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            );
        };
        let id = req.client_params.id.as_str();
        match self.change(group, slots, |s| match op {
            Op::PreReboot => s.take(id),
            Op::SteadyState => Ok(s.give_back(id)),
        }) {
            Ok(()) => {
                self.count(name, "ok");
                tracing::info!(group, id, "{name}: granted");
                ok()
            }
            Err(Failure::Full(why)) => {
                self.count(name, "refused");
                tracing::info!(group, id, "{name}: {why}");
                fail(409, "failed_lock", why)
            }
            Err(Failure::Store(why)) => {
                self.count(name, "error");
                tracing::warn!(group, id, "{name}: {why}");
                fail(503, "failed_store", why)
            }
        }
    }

    /// Read, change and compare-and-swap a group's semaphore. A group not
    /// in etcd yet starts empty; the configured slot count wins over the
    /// stored one (airlock does the same), holders are kept.
    fn change(
        &self,
        group: &str,
        slots: u64,
        mut f: impl FnMut(&mut Semaphore) -> Result<bool, String>,
    ) -> Result<(), Failure> {
        let key = fleetlock::semaphore_key(group);
        for _ in 0..CAS_ATTEMPTS {
            let (mut s, rev) = match self.store.get(&key).map_err(Failure::Store)? {
                Some((raw, rev)) => (
                    Semaphore::parse(&raw).map_err(|e| {
                        Failure::Store(format!(
                            "etcd key {key}: malformed semaphore ({e}); fix or delete it by hand"
                        ))
                    })?,
                    rev,
                ),
                None => (
                    Semaphore {
                        total_slots: slots,
                        holders: Vec::new(),
                    },
                    0,
                ),
            };
            let resized = s.total_slots != slots;
            s.total_slots = slots;
            let changed = f(&mut s).map_err(Failure::Full)?;
            if !changed && !resized && rev != 0 {
                self.seen(group, &s);
                return Ok(());
            }
            let value = serde_json::to_vec(&s).map_err(|e| Failure::Store(e.to_string()))?;
            if self.store.cas(&key, &value, rev).map_err(Failure::Store)? {
                self.seen(group, &s);
                return Ok(());
            }
        }
        Err(Failure::Store(format!(
            "etcd key {key}: {CAS_ATTEMPTS} compare-and-swap attempts lost to other writers"
        )))
    }

    /// The server's own metrics (Prometheus text).
    pub fn metrics(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let Ok(c) = self.counters.lock() else {
            return o;
        };
        let _ = writeln!(
            o,
            "# HELP nimbus_fleetlock_requests_total FleetLock requests by operation and result."
        );
        let _ = writeln!(o, "# TYPE nimbus_fleetlock_requests_total counter");
        for ((op, result), n) in &c.requests {
            let _ = writeln!(
                o,
                "nimbus_fleetlock_requests_total{{op=\"{op}\",result=\"{result}\"}} {n}"
            );
        }
        let _ = writeln!(
            o,
            "# HELP nimbus_fleetlock_slots Slots of each configured group."
        );
        let _ = writeln!(o, "# TYPE nimbus_fleetlock_slots gauge");
        for (g, n) in &self.groups {
            let _ = writeln!(o, "nimbus_fleetlock_slots{{group=\"{g}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP nimbus_fleetlock_holders Hosts holding a slot, by group, as of the last request.");
        let _ = writeln!(o, "# TYPE nimbus_fleetlock_holders gauge");
        for (g, (_, h)) in &c.groups {
            let _ = writeln!(o, "nimbus_fleetlock_holders{{group=\"{g}\"}} {h}");
        }
        o
    }
}

enum Failure {
    /// No slot: the group is full (the message says who holds it).
    Full(String),
    /// etcd did not answer or holds something malformed.
    Store(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// etcd's semantics for one process: values with revisions.
    #[derive(Default)]
    struct Mem {
        kv: Mutex<BTreeMap<String, (Vec<u8>, i64)>>,
        rev: Mutex<i64>,
        down: std::sync::atomic::AtomicBool,
    }

    impl Store for Mem {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, String> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err("etcd unreachable".into());
            }
            Ok(self.kv.lock().unwrap().get(key).cloned())
        }
        fn cas(&self, key: &str, value: &[u8], rev: i64) -> Result<bool, String> {
            let mut kv = self.kv.lock().unwrap();
            let cur = kv.get(key).map_or(0, |(_, r)| *r);
            if cur != rev {
                return Ok(false);
            }
            let mut r = self.rev.lock().unwrap();
            *r += 1;
            kv.insert(key.to_string(), (value.to_vec(), *r));
            Ok(true)
        }
    }

    fn server(slots: u64) -> Server<Mem> {
        Server::new(
            Mem::default(),
            BTreeMap::from([("default".to_string(), slots), ("b".to_string(), 1)]),
        )
    }

    fn body(id: &str, group: &str) -> Vec<u8> {
        serde_json::to_vec(&Request::new(id, group)).unwrap()
    }

    fn pre(s: &Server<Mem>, id: &str, group: &str) -> u16 {
        s.handle("POST", "/v1/pre-reboot", true, &body(id, group))
            .status
    }

    fn steady(s: &Server<Mem>, id: &str, group: &str) -> u16 {
        s.handle("POST", "/v1/steady-state", true, &body(id, group))
            .status
    }

    #[test]
    fn slots_are_counted_per_group_and_stored_as_airlock_does() {
        let s = server(2);
        assert_eq!(pre(&s, "a", "default"), 200);
        assert_eq!(pre(&s, "a", "default"), 200, "a holder asking again");
        assert_eq!(pre(&s, "b", "default"), 200);
        let full = s.handle("POST", "/v1/pre-reboot", true, &body("c", "default"));
        assert_eq!(full.status, 409);
        let e: ErrorBody = serde_json::from_str(&full.body).unwrap();
        assert_eq!(e.kind, "failed_lock");
        assert!(e.value.contains("a, b"), "{}", e.value);
        // Another group is independent.
        assert_eq!(pre(&s, "c", "b"), 200);
        assert_eq!(pre(&s, "d", "b"), 409);
        assert_eq!(steady(&s, "a", "default"), 200);
        assert_eq!(steady(&s, "a", "default"), 200, "releasing twice is fine");
        assert_eq!(pre(&s, "c", "default"), 200);
        let (raw, _) = s
            .store
            .get("com.coreos.airlock/groups/default/v1/semaphore")
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"total_slots": 2, "holders": ["b", "c"]})
        );
        let m = s.metrics();
        assert!(
            m.contains("nimbus_fleetlock_requests_total{op=\"pre-reboot\",result=\"refused\"} 2"),
            "{m}"
        );
        assert!(
            m.contains("nimbus_fleetlock_holders{group=\"default\"} 2"),
            "{m}"
        );
    }

    #[test]
    fn bad_requests_get_400_with_a_kind() {
        let s = server(1);
        for (method, path, header, b, status, kind) in [
            (
                "POST",
                "/v1/pre-reboot",
                false,
                body("a", "default"),
                400,
                "missing_header",
            ),
            (
                "GET",
                "/v1/pre-reboot",
                true,
                body("a", "default"),
                405,
                "bad_method",
            ),
            (
                "POST",
                "/v1/pre-reboot",
                true,
                b"{".to_vec(),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/pre-reboot",
                true,
                body("a b", "default"),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/pre-reboot",
                true,
                body("a", "nosuch"),
                400,
                "unknown_group",
            ),
            (
                "POST",
                "/v2/pre-reboot",
                true,
                body("a", "default"),
                404,
                "not_found",
            ),
        ] {
            let a = s.handle(method, path, header, &b);
            assert_eq!(a.status, status, "{method} {path}: {}", a.body);
            let e: ErrorBody = serde_json::from_str(&a.body).unwrap();
            assert_eq!(e.kind, kind);
        }
        // Nothing was taken by any of them.
        assert_eq!(pre(&s, "z", "default"), 200);
    }

    #[test]
    fn a_malformed_value_or_a_down_store_is_an_error_and_never_overwritten() {
        let s = server(1);
        let key = fleetlock::semaphore_key("default");
        s.store
            .cas(&key, b"{\"total_slots\":1,\"holders\":[\"x\",\"x\"]}", 0)
            .unwrap();
        let a = s.handle("POST", "/v1/pre-reboot", true, &body("a", "default"));
        assert_eq!(a.status, 503, "{}", a.body);
        assert!(a.body.contains("malformed"), "{}", a.body);
        assert_eq!(
            s.store.get(&key).unwrap().unwrap().0,
            b"{\"total_slots\":1,\"holders\":[\"x\",\"x\"]}"
        );
        s.store
            .down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(pre(&s, "a", "b"), 503);
    }
}
