//! Prometheus metrics: the counters the engine's owners bump, and the text
//! exposition format (version 0.0.4) rendered from them and the status.
//! Served on a Unix socket any local user may read (as Zincati's
//! `metrics.promsock`; no TCP listener): connect, read to the end.
//!
//! Every label value comes from a small closed set (error kinds, hook file
//! names, the lock backend and operation), so a series never multiplies
//! with versions, URLs or hosts. Counters start at zero with each start of
//! update-engine, as Prometheus expects of a process's counters.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use crate::status::{State, Status};

/// Where the bytes of an update came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FetchKind {
    /// The full payload.
    Full,
    /// Range requests into a delta pack.
    Delta,
    /// Manifests, signatures, trust sets, delta indexes, stage-1 files.
    Metadata,
}

impl FetchKind {
    fn label(self) -> &'static str {
        match self {
            FetchKind::Full => "full",
            FetchKind::Delta => "delta",
            FetchKind::Metadata => "metadata",
        }
    }
}

/// Why a staged update is not rebooting yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WaitReason {
    /// The reboot lock (full, or its backend unreachable).
    Lock,
    /// Outside the maintenance window.
    Window,
    /// A pre-reboot hook failed and its retry time has not come.
    Hook,
    /// Anything else (strategy off, the post-good hooks of the last boot).
    Other,
}

impl WaitReason {
    fn label(self) -> &'static str {
        match self {
            WaitReason::Lock => "lock",
            WaitReason::Window => "window",
            WaitReason::Hook => "hook",
            WaitReason::Other => "other",
        }
    }
}

/// The counters. One instance lives in [`crate::engine::Shared`].
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub started: Option<DateTime<Utc>>,
    pub checks_ok: u64,
    pub checks_failed: u64,
    pub last_check_ok: Option<bool>,
    pub state_changes: u64,
    pub state_since: Option<DateTime<Utc>>,
    pub fetched: BTreeMap<FetchKind, u64>,
    /// Installs by mode ("full", "delta").
    pub installs: BTreeMap<&'static str, u64>,
    pub last_install_seconds: Option<f64>,
    /// The last delta install's fetched bytes over the full payload's.
    pub last_delta_ratio: Option<f64>,
    pub rollbacks: u64,
    /// Failures by the error's kind (`UpdateError::kind`).
    pub failures: BTreeMap<&'static str, u64>,
    /// Reboot-lock calls and errors by (backend, operation).
    pub lock_requests: BTreeMap<(&'static str, &'static str), u64>,
    pub lock_errors: BTreeMap<(&'static str, &'static str), u64>,
    pub wait_seconds: BTreeMap<WaitReason, f64>,
    /// Hook runs and failures by (kind, hook name).
    pub hook_runs: BTreeMap<(&'static str, String), u64>,
    pub hook_failures: BTreeMap<(&'static str, String), u64>,
}

fn bump<K: Ord>(m: &mut BTreeMap<K, u64>, k: K, by: u64) {
    let e = m.entry(k).or_insert(0);
    *e = e.saturating_add(by);
}

impl Metrics {
    pub fn fetched(&mut self, kind: FetchKind, n: u64) {
        bump(&mut self.fetched, kind, n);
    }
    pub fn check(&mut self, ok: bool) {
        if ok {
            self.checks_ok = self.checks_ok.saturating_add(1);
        } else {
            self.checks_failed = self.checks_failed.saturating_add(1);
        }
        self.last_check_ok = Some(ok);
    }
    pub fn failure(&mut self, kind: &'static str) {
        bump(&mut self.failures, kind, 1);
    }
    pub fn installed(&mut self, report: &crate::status::ApplyReport) {
        let mode = if report.delta.is_some() {
            "delta"
        } else {
            "full"
        };
        bump(&mut self.installs, mode, 1);
        self.last_install_seconds = Some(report.seconds);
        if let Some(d) = &report.delta {
            self.last_delta_ratio = Some(d.percent_of_full / 100.0);
        }
    }
    pub fn lock_request(&mut self, backend: &'static str, op: &'static str, ok: bool) {
        bump(&mut self.lock_requests, (backend, op), 1);
        if !ok {
            bump(&mut self.lock_errors, (backend, op), 1);
        }
    }
    pub fn waited(&mut self, why: WaitReason, secs: f64) {
        if secs.is_finite() && secs > 0.0 {
            *self.wait_seconds.entry(why).or_insert(0.0) += secs;
        }
    }
    pub fn hook(&mut self, kind: &'static str, name: &str, ok: bool) {
        bump(&mut self.hook_runs, (kind, name.to_string()), 1);
        if !ok {
            bump(&mut self.hook_failures, (kind, name.to_string()), 1);
        }
    }
}

/// A label value escaped as the text format wants (backslash, quote,
/// newline).
fn esc(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

const STATES: [State; 8] = [
    State::Idle,
    State::CheckingForUpdate,
    State::UpdateAvailable,
    State::Downloading,
    State::Verifying,
    State::Finalizing,
    State::UpdatedNeedReboot,
    State::ReportingErrorEvent,
];

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", esc(val));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {v}");
    }
}

fn ts(t: &DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// The exposition: everything the counters hold, and what the status says
/// now (identity, state, trust, a pending reboot).
pub fn render(status: &Status, m: &Metrics) -> String {
    let mut o = Out(String::new());
    let p = "nimbus_update_engine";

    o.head(
        "nimbus_os_info",
        "gauge",
        "The running Nimbus: version, channel and booted slot (always 1).",
    );
    o.sample(
        "nimbus_os_info",
        &[
            ("version", &status.running_version),
            ("channel", &status.channel),
            ("slot", &status.booted_slot),
        ],
        1.0,
    );

    if let Some(t) = &m.started {
        let n = format!("{p}_start_time_seconds");
        o.head(&n, "gauge", "When update-engine started (Unix time).");
        o.sample(&n, &[], ts(t));
    }

    let n = format!("{p}_state");
    o.head(
        &n,
        "gauge",
        "The engine's state (Flatcar's names): 1 for the current one.",
    );
    for s in STATES {
        let name = s.to_string();
        o.sample(
            &n,
            &[("state", &name)],
            if s == status.state { 1.0 } else { 0.0 },
        );
    }
    let n = format!("{p}_state_changes_total");
    o.head(&n, "counter", "State changes since update-engine started.");
    o.sample(&n, &[], m.state_changes as f64);
    if let Some(t) = &m.state_since {
        let n = format!("{p}_state_change_time_seconds");
        o.head(&n, "gauge", "When the state last changed (Unix time).");
        o.sample(&n, &[], ts(t));
    }

    let n = format!("{p}_checks_total");
    o.head(&n, "counter", "Channel checks by result.");
    o.sample(&n, &[("result", "ok")], m.checks_ok as f64);
    o.sample(&n, &[("result", "error")], m.checks_failed as f64);
    if let Some(t) = &status.last_check {
        let n = format!("{p}_last_check_time_seconds");
        o.head(
            &n,
            "gauge",
            "When the channel was last checked (Unix time).",
        );
        o.sample(&n, &[], ts(t));
    }
    if let Some(ok) = m.last_check_ok {
        let n = format!("{p}_last_check_success");
        o.head(
            &n,
            "gauge",
            "Whether the last check succeeded (1) or failed (0).",
        );
        o.sample(&n, &[], if ok { 1.0 } else { 0.0 });
    }

    let n = format!("{p}_fetched_bytes_total");
    o.head(
        &n,
        "counter",
        "Bytes received from the update server by kind: the full payload, delta pack ranges, metadata.",
    );
    for k in [FetchKind::Full, FetchKind::Delta, FetchKind::Metadata] {
        o.sample(
            &n,
            &[("kind", k.label())],
            m.fetched.get(&k).copied().unwrap_or(0) as f64,
        );
    }

    let n = format!("{p}_installs_total");
    o.head(
        &n,
        "counter",
        "Releases written into the passive slot, by mode.",
    );
    for mode in ["full", "delta"] {
        o.sample(
            &n,
            &[("mode", mode)],
            m.installs.get(mode).copied().unwrap_or(0) as f64,
        );
    }
    if let Some(s) = m.last_install_seconds {
        let n = format!("{p}_last_install_duration_seconds");
        o.head(
            &n,
            "gauge",
            "How long the last install took, download to flip.",
        );
        o.sample(&n, &[], s);
    }
    if let Some(r) = m.last_delta_ratio {
        let n = format!("{p}_last_delta_ratio");
        o.head(
            &n,
            "gauge",
            "The last delta install's download as a share of the full payload (0 to 1).",
        );
        o.sample(&n, &[], r);
    }

    let n = format!("{p}_rollbacks_total");
    o.head(
        &n,
        "counter",
        "Automatic rollbacks found at start (a new slot that never became good).",
    );
    o.sample(&n, &[], m.rollbacks as f64);

    let n = format!("{p}_failures_total");
    o.head(&n, "counter", "Failed checks and installs by reason.");
    for (k, v) in &m.failures {
        o.sample(&n, &[("reason", k)], *v as f64);
    }

    let n = format!("{p}_reboot_lock_requests_total");
    o.head(
        &n,
        "counter",
        "Calls to the reboot lock by backend and operation.",
    );
    for ((b, op), v) in &m.lock_requests {
        o.sample(&n, &[("backend", b), ("op", op)], *v as f64);
    }
    let n = format!("{p}_reboot_lock_errors_total");
    o.head(
        &n,
        "counter",
        "Calls to the reboot lock that failed, by backend and operation.",
    );
    for ((b, op), v) in &m.lock_errors {
        o.sample(&n, &[("backend", b), ("op", op)], *v as f64);
    }
    let n = format!("{p}_reboot_wait_seconds_total");
    o.head(
        &n,
        "counter",
        "Time a staged update waited to reboot, by reason (lock, window, hook, other).",
    );
    for r in [
        WaitReason::Lock,
        WaitReason::Window,
        WaitReason::Hook,
        WaitReason::Other,
    ] {
        o.sample(
            &n,
            &[("reason", r.label())],
            m.wait_seconds.get(&r).copied().unwrap_or(0.0),
        );
    }

    let n = format!("{p}_hook_runs_total");
    o.head(&n, "counter", "Update hooks run, by kind and hook.");
    for ((k, h), v) in &m.hook_runs {
        o.sample(&n, &[("kind", k), ("hook", h)], *v as f64);
    }
    let n = format!("{p}_hook_failures_total");
    o.head(&n, "counter", "Update hooks that failed, by kind and hook.");
    for ((k, h), v) in &m.hook_failures {
        o.sample(&n, &[("kind", k), ("hook", h)], *v as f64);
    }

    if let Some(t) = &status.trust {
        let n = format!("{p}_trust_set_version");
        o.head(
            &n,
            "gauge",
            "The newest trust set update-engine checks releases against.",
        );
        o.sample(&n, &[], t.usr.version as f64);
    }
    let n = format!("{p}_reboot_pending");
    o.head(
        &n,
        "gauge",
        "1 when a new version is staged and waits for a reboot.",
    );
    o.sample(
        &n,
        &[],
        if status.state == State::UpdatedNeedReboot {
            1.0
        } else {
            0.0
        },
    );
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_has_help_and_type_before_samples_and_escaped_labels() {
        let mut st = Status::new();
        st.running_version = "1.0.0".into();
        st.channel = "sta\"ble\\x\n".into();
        st.booted_slot = "USR-A".into();
        st.state = State::UpdatedNeedReboot;
        let mut m = Metrics::default();
        m.fetched(FetchKind::Full, 100);
        m.fetched(FetchKind::Full, 23);
        m.check(true);
        m.check(false);
        m.failure("connect");
        m.lock_request("etcd", "acquire", false);
        m.hook("pre-reboot", "50-swarm", true);
        m.waited(WaitReason::Window, 1.5);
        m.waited(WaitReason::Window, f64::NAN);
        let t = render(&st, &m);
        assert!(t.contains(
            "nimbus_os_info{version=\"1.0.0\",channel=\"sta\\\"ble\\\\x\\n\",slot=\"USR-A\"} 1\n"
        ));
        assert!(t.contains("nimbus_update_engine_fetched_bytes_total{kind=\"full\"} 123\n"));
        assert!(t.contains("nimbus_update_engine_fetched_bytes_total{kind=\"delta\"} 0\n"));
        assert!(t.contains("nimbus_update_engine_checks_total{result=\"error\"} 1\n"));
        assert!(t.contains("nimbus_update_engine_last_check_success 0\n"));
        assert!(t.contains("nimbus_update_engine_failures_total{reason=\"connect\"} 1\n"));
        assert!(t.contains(
            "nimbus_update_engine_reboot_lock_errors_total{backend=\"etcd\",op=\"acquire\"} 1\n"
        ));
        assert!(t.contains(
            "nimbus_update_engine_hook_runs_total{kind=\"pre-reboot\",hook=\"50-swarm\"} 1\n"
        ));
        assert!(
            t.contains("nimbus_update_engine_reboot_wait_seconds_total{reason=\"window\"} 1.5\n")
        );
        assert!(t.contains("nimbus_update_engine_state{state=\"UPDATED_NEED_REBOOT\"} 1\n"));
        assert!(t.contains("nimbus_update_engine_state{state=\"IDLE\"} 0\n"));
        assert!(t.contains("nimbus_update_engine_reboot_pending 1\n"));
        // Each family: HELP and TYPE once, before its samples.
        let mut seen = std::collections::HashSet::new();
        let mut current = String::new();
        for line in t.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(seen.insert(name.clone()), "{name} twice");
                current = name;
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(name, current, "{line}");
            }
        }
    }
}
