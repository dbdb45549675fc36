//! REBOOT_STRATEGY=fleetlock against `nimbus-fleetlock` (its HTTP server,
//! in this process) on a real etcd: three hosts in host mode take turns
//! with one slot, a second group is independent of the first, a holder
//! that starts again gives its slot back first, and a request without the
//! protocol header is refused with a kind. The semaphore is airlock's
//! value under airlock's key, so a Zincati host could share it.

mod support;

use std::time::Duration;

use nimbus::layout::Slot;
use support::etcd::Etcd;
use support::reboot::{now_secs, wait_exit, wait_for, RebootHost};

struct Lock {
    _etcd: Etcd,
    etcd_url: String,
    server: Option<nimbus_fleetlock::http::Handle>,
    url: String,
    _tmp: tempfile::TempDir,
}

impl Lock {
    /// etcd and nimbus-fleetlock with the groups given.
    fn start(groups: &[(&str, u64)]) -> Lock {
        let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
        let etcd = Etcd::start(tmp.path().join("etcd"));
        let etcd_url = etcd.url();
        let mut text = format!(
            "[service]\naddress = \"127.0.0.1\"\nport = 0\n\n[etcd3]\nendpoints = [\"{etcd_url}\"]\n\n[lock]\ndefault_group_name = \"{}\"\ndefault_slots = {}\n",
            groups[0].0, groups[0].1
        );
        for (g, n) in &groups[1..] {
            text.push_str(&format!("\n[[lock.groups]]\nname = \"{g}\"\nslots = {n}\n"));
        }
        let cfg = nimbus_fleetlock::config::Config::parse(&text).expect("config");
        let server = nimbus_fleetlock::http::start(&cfg).expect("nimbus-fleetlock");
        let url = format!("http://{}", server.addr);
        Lock {
            _etcd: etcd,
            etcd_url,
            server: Some(server),
            url,
            _tmp: tmp,
        }
    }

    fn post(&self, op: &str, id: &str, group: &str, header: bool) -> (u16, serde_json::Value) {
        let c = reqwest::blocking::Client::new();
        let mut req = c
            .post(format!("{}/v1/{op}", self.url))
            .timeout(Duration::from_secs(10))
            .json(&serde_json::json!({"client_params": {"id": id, "group": group}}));
        if header {
            req = req.header("fleet-lock-protocol", "true");
        }
        let resp = req.send().expect("fleetlock answers");
        let status = resp.status().as_u16();
        let body = resp.json().unwrap_or(serde_json::Value::Null);
        (status, body)
    }

    /// The group's semaphore as etcd holds it.
    fn semaphore(&self, group: &str) -> serde_json::Value {
        let out = std::process::Command::new("etcdctl")
            .args([
                "--endpoints",
                &self.etcd_url,
                "get",
                &nimbus::fleetlock::semaphore_key(group),
                "--print-value-only",
            ])
            .output()
            .expect("etcdctl");
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
    }
}

/// A host of the fleet: its node id is what the server sees.
struct Host {
    h: RebootHost,
    node_id: String,
}

impl std::ops::Deref for Host {
    type Target = RebootHost;
    fn deref(&self) -> &RebootHost {
        &self.h
    }
}

impl Host {
    fn new(n: u8, lock: &Lock, group: &str) -> Host {
        let mid = format!("0123456789abcdef0123456789abcd{n:02x}");
        Host {
            h: RebootHost::new(
                &format!("h{n}"),
                &mid,
                &format!(
                    "REBOOT_STRATEGY=fleetlock\nFLEETLOCK_URL={}\nFLEETLOCK_GROUP={group}\n",
                    lock.url
                ),
            ),
            node_id: nimbus::fleetlock::node_id(&mid).expect("node id"),
        }
    }
}

/// Update, take a slot, "reboot", come back, mark good, report steady
/// state. Returns (reboot time, marked-good time).
fn lifecycle(h: &Host) -> (f64, f64) {
    let mut d = h.daemon("0");
    wait_exit(
        &mut d,
        Duration::from_secs(180),
        &format!("{}: reboot", h.name),
    );
    let rebooted = *h
        .reboot_times()
        .last()
        .unwrap_or_else(|| panic!("{}: exited without rebooting", h.name));
    let mut d = h.daemon("3600");
    h.wait_socket();
    std::thread::sleep(Duration::from_millis(300));
    let out = h.ctl(&["mark-good"]);
    assert!(
        out.status.success(),
        "{}: mark-good: {}",
        h.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let good = now_secs();
    wait_for(
        &format!("{}: lock released", h.name),
        Duration::from_secs(120),
        || !h.lock_taken(),
    );
    let _ = d.kill();
    let _ = d.wait();
    (rebooted, good)
}

#[test]
fn three_hosts_take_turns_through_nimbus_fleetlock() {
    let lock = Lock::start(&[("default", 1)]);
    let hosts: Vec<Host> = (1..=3).map(|n| Host::new(n, &lock, "default")).collect();
    let mut intervals: Vec<(String, f64, f64)> = std::thread::scope(|s| {
        let hs: Vec<_> = hosts
            .iter()
            .map(|h| s.spawn(move || (h.name.clone(), lifecycle(h))))
            .collect();
        hs.into_iter()
            .map(|j| {
                let (n, (r, g)) = j.join().expect("host thread");
                (n, r, g)
            })
            .collect()
    });
    intervals.sort_by(|a, b| a.1.total_cmp(&b.1));
    for w in intervals.windows(2) {
        assert!(
            w[0].2 < w[1].1,
            "{} was still rebooting ({:.3}..{:.3}) when {} rebooted at {:.3}",
            w[0].0,
            w[0].1,
            w[0].2,
            w[1].0,
            w[1].1
        );
    }
    for h in &hosts {
        assert_eq!(h.reboot_times().len(), 1, "{} rebooted once", h.name);
        assert_eq!(h.f.cgpt(Slot::B), (2, 0, 1), "{}: USR-B good", h.name);
    }
    assert_eq!(
        lock.semaphore("default"),
        serde_json::json!({"total_slots": 1, "holders": []})
    );
    // The ids in the lock were never the machine ids.
    for h in &hosts {
        assert!(!h.node_id.starts_with("0123456789abcdef"), "{}", h.node_id);
    }
}

#[test]
fn a_second_group_is_independent_and_a_full_group_waits() {
    let lock = Lock::start(&[("default", 1), ("canary", 1)]);
    // A Zincati host holds the default group's only slot.
    assert_eq!(
        lock.post("pre-reboot", "zincati-node", "default", true).0,
        200
    );
    let waiter = Host::new(1, &lock, "default");
    let canary = Host::new(2, &lock, "canary");
    let mut w = waiter.daemon("0");
    let mut c = canary.daemon("0");
    // The canary reboots while the default group is full.
    wait_exit(&mut c, Duration::from_secs(120), "canary: reboot");
    assert_eq!(canary.reboot_times().len(), 1);
    assert_eq!(
        lock.semaphore("canary")["holders"],
        serde_json::json!([canary.node_id])
    );
    // The other waits, saying why.
    waiter.wait_socket();
    wait_for("the waiter's note", Duration::from_secs(60), || {
        let st: serde_json::Value =
            serde_json::from_slice(&waiter.ctl(&["status", "--json"]).stdout)
                .unwrap_or(serde_json::Value::Null);
        st["note"]
            .as_str()
            // A 409 is "taken" (asked again every 10 s), not a failure
            // backed off from.
            .is_some_and(|n| n.contains("taken by other hosts"))
    });
    assert!(waiter.reboot_times().is_empty());
    let metrics = waiter
        .ctl(&[
            "metrics",
            "--metrics-socket",
            waiter
                .f
                .root
                .join(nimbus::paths::ENGINE_METRICS_SOCKET)
                .to_str()
                .expect("utf8"),
        ])
        .stdout;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains(
            "nimbus_update_engine_reboot_lock_requests_total{backend=\"fleetlock\",op=\"acquire\"}"
        ),
        "{metrics}"
    );
    // The Zincati host reports steady state: the waiter goes.
    assert_eq!(
        lock.post("steady-state", "zincati-node", "default", true).0,
        200
    );
    wait_exit(&mut w, Duration::from_secs(120), "waiter: reboot");
    assert_eq!(waiter.reboot_times().len(), 1);
}

#[test]
fn a_holder_that_starts_again_releases_first_and_bad_requests_are_refused() {
    let lock = Lock::start(&[("default", 1)]);
    let h = Host::new(7, &lock, "default");
    // A slot this host took before it lost its state (a reinstall).
    assert_eq!(lock.post("pre-reboot", &h.node_id, "default", true).0, 200);
    assert_eq!(
        lock.semaphore("default")["holders"],
        serde_json::json!([h.node_id])
    );
    let mut d = h.daemon("3600");
    wait_for("the steady-state report", Duration::from_secs(30), || {
        lock.semaphore("default")["holders"] == serde_json::json!([])
    });
    let _ = d.kill();
    let _ = d.wait();

    // Without the protocol header: 400 and a kind, nothing taken.
    let (status, body) = lock.post("pre-reboot", "someone", "default", false);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["kind"], "missing_header", "{body}");
    let (status, body) = lock.post("pre-reboot", "someone", "no-such-group", true);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["kind"], "unknown_group", "{body}");
    assert_eq!(lock.semaphore("default")["holders"], serde_json::json!([]));
}
