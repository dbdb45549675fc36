//! Update hooks around a reboot, with a real etcd holding the reboot lock:
//! the pre-reboot hooks run with the lock held and before the reboot, the
//! post-good hooks once the booted slot is good (the new one, or the old
//! one after a rollback) and before the lock is given back; a pre-reboot
//! hook past HOOK_TIMEOUT is stopped, undone, reported, and the lock is not
//! leaked. REBOOT_STRATEGY=off touches /run/reboot-required.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nimbus::layout::Slot;
use support::etcd::Etcd;
use support::reboot::RebootHost;
use support::{boot_rule, UPDATECTL};

use nimbus::etcd_keys::REBOOT_LOCK as KEY;

/// The host, its hooks' and reboots' lines in one log, in order.
struct Host {
    h: RebootHost,
    log: PathBuf,
}

impl std::ops::Deref for Host {
    type Target = RebootHost;
    fn deref(&self) -> &RebootHost {
        &self.h
    }
}

/// A hook that appends one line to `log`: its kind, the versions, whether
/// it follows a rollback, and whether the engine's state holds the lock.
fn hook(root: &Path, kind: &str, name: &str, log: &Path, extra: &str) {
    let d = root.join("etc/nimbus/hooks").join(format!("{kind}.d"));
    std::fs::create_dir_all(&d).expect("hook dir");
    let p = d.join(name);
    let state = root.join("var/lib/nimbus/update-engine.json");
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\nlocked=$(grep -c '\"lock_taken\": \"' {state} || true)\necho \"$NIMBUS_HOOK new=$NIMBUS_NEW_VERSION running=$NIMBUS_RUNNING_VERSION rolled_back=$NIMBUS_ROLLED_BACK locked=$locked\" >> {log}\n{extra}\n",
            state = state.display(),
            log = log.display()
        ),
    )
    .expect("hook");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

impl Host {
    fn new(etcd: &str, extra_conf: &str) -> Host {
        let h = RebootHost::new(
            "hooked",
            "hooked",
            &format!("REBOOT_STRATEGY=etcd-lock\nETCD_ENDPOINTS={etcd}\n{extra_conf}"),
        );
        let log = h.f.tmp.path().join("hooks.log");
        Host { h, log }
    }

    fn daemon(&self) -> Child {
        self.h
            .daemon_rebooting_with("0", &format!("echo reboot >> {}", self.log.display()))
    }

    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn status(&self) -> serde_json::Value {
        let out = Command::new(UPDATECTL)
            .arg("--socket")
            .arg(&self.sock)
            .args(["status", "--json"])
            .output()
            .expect("updatectl");
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    fn ctl_ok(&self, args: &[&str]) -> String {
        let out = Command::new(UPDATECTL)
            .arg("--socket")
            .arg(&self.sock)
            .args(args)
            .output()
            .expect("updatectl");
        assert!(
            out.status.success(),
            "updatectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A drain that never finishes: a task with nowhere to go.
fn stuck_drain(h: &Host) {
    hook(
        &h.f.root,
        "pre-reboot",
        "50-drain",
        &h.log,
        "while :; do echo 'waiting for 1 task to leave this node: web.2'; sleep 1; done",
    );
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn holders(etcd: &Etcd) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&etcd.get(KEY)).expect("semaphore json");
    v["holders"].clone()
}

fn stop(mut d: Child) {
    let _ = d.kill();
    let _ = d.wait();
}

#[test]
fn hooks_wrap_the_reboot_and_the_lock_is_given_back_after_post_good() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let etcd = Etcd::start(tmp.path().join("etcd"));
    let h = Host::new(&etcd.url(), "");
    hook(&h.f.root, "pre-reboot", "50-drain", &h.log, "");
    hook(&h.f.root, "post-good", "50-activate", &h.log, "");

    let mut d = h.daemon();
    wait_until("the reboot", Duration::from_secs(120), || {
        d.try_wait().expect("wait").is_some()
    });
    assert_eq!(
        h.log(),
        [
            "pre-reboot new=1.1.0 running=1.0.0 rolled_back=0 locked=1",
            "reboot"
        ],
        "the drain runs with the lock held, before the reboot"
    );
    assert_eq!(holders(&etcd), serde_json::json!(["hooked"]));

    // The "boot" into USR-B: the lock stays held until the slot is good and
    // the post-good hooks ran.
    let d = h.daemon();
    h.wait_socket();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        h.log().len(),
        2,
        "no post-good hook before mark-good: {:?}",
        h.log()
    );
    assert!(h.lock_taken());
    h.ctl_ok(&["mark-good"]);
    wait_until("the lock's release", Duration::from_secs(60), || {
        !h.lock_taken()
    });
    assert_eq!(
        h.log()[2],
        "post-good new=1.1.0 running=1.1.0 rolled_back=0 locked=1",
        "reactivated before the release"
    );
    assert_eq!(h.log().len(), 3);
    assert_eq!(holders(&etcd), serde_json::json!([]));
    assert!(h.f.state()["post_good_pending"].is_null());
    let st = h.status();
    assert_eq!(st["running_version"], "1.1.0");
    assert!(st["last_error"].is_null(), "{st}");
    stop(d);
}

#[test]
fn a_drain_past_its_timeout_is_undone_reported_and_the_lock_not_leaked() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let etcd = Etcd::start(tmp.path().join("etcd"));
    let h = Host::new(&etcd.url(), "HOOK_TIMEOUT=4s\n");
    stuck_drain(&h);
    hook(&h.f.root, "post-good", "50-activate", &h.log, "");

    let d = h.daemon();
    h.wait_socket();
    // While it runs, `updatectl status` names the hook and what it waits for.
    let mut seen = String::new();
    wait_until("the hook in the status", Duration::from_secs(120), || {
        let st = h.status();
        seen = st["hook"].as_str().unwrap_or_default().to_string();
        seen.contains("pre-reboot hook 50-drain")
    });
    assert!(seen.contains("of 4 s"), "{seen}");
    let text = h.ctl_ok(&["status"]);
    assert!(text.contains("hook:"), "{text}");
    wait_until("the undo", Duration::from_secs(60), || h.log().len() >= 2);
    wait_until("the lock's release", Duration::from_secs(30), || {
        !h.lock_taken()
    });
    assert_eq!(
        h.log(),
        [
            "pre-reboot new=1.1.0 running=1.0.0 rolled_back=0 locked=1",
            "post-good new=1.1.0 running=1.0.0 rolled_back=0 locked=1",
        ],
        "no reboot; the drain is undone while the lock is still held"
    );
    assert_eq!(holders(&etcd), serde_json::json!([]));
    let note = h.status()["note"].as_str().unwrap_or_default().to_string();
    assert!(
        note.contains("did not finish within 4 s") && note.contains("waiting for 1 task"),
        "{note}"
    );
    assert!(note.contains("tried again in"), "{note}");
    let st = h.status();
    let failure = st["hook_failure"].as_str().unwrap_or_default();
    assert!(failure.contains("did not finish within 4 s"), "{st}");
    let text = h.ctl_ok(&["status"]);
    assert!(
        text.contains("hook failed: not rebooting: pre-reboot hook 50-drain"),
        "{text}"
    );
    assert!(h.status()["hook"].is_null());
    stop(d);
}

#[test]
fn a_failed_undo_keeps_the_lock_and_is_retried_before_another_drain() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let etcd = Etcd::start(tmp.path().join("etcd"));
    let h = Host::new(&etcd.url(), "HOOK_TIMEOUT=3s\n");
    stuck_drain(&h);
    // The undo fails twice (a swarm manager timing out), then succeeds.
    let count = tmp.path().join("activations");
    hook(
        &h.f.root,
        "post-good",
        "50-activate",
        &h.log,
        &format!(
            "n=$(cat {c} 2>/dev/null || echo 0); echo $((n+1)) > {c}\n[ \"$n\" -ge 2 ] || {{ echo 'rpc error: code = DeadlineExceeded'; exit 1; }}",
            c = count.display()
        ),
    );
    let d = h.daemon();
    h.wait_socket();
    wait_until("the first undo's failure", Duration::from_secs(120), || {
        h.log().len() >= 2
    });
    // Held while the host may still be drained.
    assert_eq!(holders(&etcd), serde_json::json!(["hooked"]));
    assert!(h.lock_taken());
    wait_until("the lock's release", Duration::from_secs(60), || {
        !h.lock_taken()
    });
    assert_eq!(holders(&etcd), serde_json::json!([]));
    let log = h.log();
    assert_eq!(
        log[..4],
        [
            "pre-reboot new=1.1.0 running=1.0.0 rolled_back=0 locked=1",
            "post-good new=1.1.0 running=1.0.0 rolled_back=0 locked=1",
            "post-good new=1.1.0 running=1.0.0 rolled_back=0 locked=1",
            "post-good new=1.1.0 running=1.0.0 rolled_back=0 locked=1",
        ],
        "the undo is retried before any second drain: {log:?}"
    );
    assert!(h.f.state()["post_good_pending"].is_null());
    stop(d);
}

#[test]
fn after_a_rollback_post_good_runs_on_the_old_slot_and_releases() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let etcd = Etcd::start(tmp.path().join("etcd"));
    let h = Host::new(&etcd.url(), "");
    hook(&h.f.root, "pre-reboot", "50-drain", &h.log, "");
    hook(&h.f.root, "post-good", "50-activate", &h.log, "");
    let mut d = h.daemon();
    wait_until("the reboot", Duration::from_secs(120), || {
        d.try_wait().expect("wait").is_some()
    });
    // USR-B is tried and never proven; the next boot falls back to USR-A.
    assert_eq!(boot_rule(&h.f), 4);
    assert_eq!(boot_rule(&h.f), 3);
    assert_eq!(h.f.cgpt(Slot::B).1, 0);
    let d = h.daemon();
    h.wait_socket();
    wait_until("the lock's release", Duration::from_secs(60), || {
        !h.lock_taken()
    });
    assert_eq!(
        h.log().last().map(String::as_str),
        Some("post-good new=1.1.0 running=1.0.0 rolled_back=1 locked=1")
    );
    assert_eq!(holders(&etcd), serde_json::json!([]));
    stop(d);
}

#[test]
fn strategy_off_touches_run_reboot_required_and_runs_no_hook() {
    let h = Host::new("http://127.0.0.1:9", "");
    std::fs::write(
        h.f.root.join(nimbus::paths::UPDATE_CONF_ETC),
        format!(
            "GROUP=stable\nSERVER={}\nIO_WRITE_BPS=unlimited\nREBOOT_STRATEGY=off\n",
            h.f.httpd.url()
        ),
    )
    .expect("conf");
    hook(&h.f.root, "pre-reboot", "50-drain", &h.log, "");
    std::fs::create_dir_all(h.f.root.join("run")).expect("run");
    let d = h.daemon();
    h.wait_socket();
    let flag = h.f.root.join("run/reboot-required");
    wait_until("/run/reboot-required", Duration::from_secs(120), || {
        flag.exists()
    });
    assert!(std::fs::read_to_string(&flag)
        .expect("flag")
        .contains("1.1.0 is staged"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(h.log().is_empty(), "{:?}", h.log());
    stop(d);
}
