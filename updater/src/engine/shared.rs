//! What the engine's owners use and none owns: the status board the API
//! threads read, the clock, the fetch options.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use chrono::Utc;

use crate::metrics::Metrics;
use crate::status::Status;

/// What API threads share with the engine.
pub struct Shared {
    pub status: Mutex<Status>,
    /// The counters behind the metrics socket; state changes are counted
    /// here in `update`, the rest by the owners that see them.
    pub metrics: Mutex<Metrics>,
    pub changed: Condvar,
    pub seq: AtomicU64,
    pub cancel: AtomicBool,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            status: Mutex::new(Status::new()),
            metrics: Mutex::new(Metrics {
                started: Some(Utc::now()),
                ..Metrics::default()
            }),
            changed: Condvar::new(),
            seq: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
        }
    }

    pub fn snapshot(&self) -> Status {
        match self.status.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut s = match self.status.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let before = s.state;
        f(&mut s);
        if s.state != before {
            self.metric(|m| {
                m.state_changes = m.state_changes.saturating_add(1);
                m.state_since = Some(Utc::now());
            });
        }
        self.seq.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Change the counters.
    pub fn metric(&self, f: impl FnOnce(&mut Metrics)) {
        let mut m = match self.metrics.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        f(&mut m);
    }

    /// The metrics text: the counters and the status now.
    pub fn render_metrics(&self) -> String {
        let status = self.snapshot();
        let m = match self.metrics.lock() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        };
        crate::metrics::render(&status, &m)
    }
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Options {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// Total time allowed for a manifest or signature fetch.
    pub fetch_deadline: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            fetch_deadline: Duration::from_secs(60),
        }
    }
}

/// The engine's idea of now: manifest expiry, rollouts, reports.
pub trait Clock: Send + Sync {
    fn now(&self) -> chrono::DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> chrono::DateTime<Utc> {
        Utc::now()
    }
}
