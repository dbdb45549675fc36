//! The daemon and updatectl over the local socket: status, check, update
//! with progress, channel switches (atomic GROUP edit, refused downgrade).

mod support;

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use nimbus::layout::Slot;
use support::{Fixture, UPDATECTL};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ctl(sock: &Path, args: &[&str]) -> (Output, String) {
    let mut all = vec!["--socket".as_ref(), sock.as_os_str()];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    support::updatectl(&all)
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn updatectl_drives_the_daemon() {
    let f = Fixture::new(3, 32);
    let w = f.tmp.path();
    let beta = support::build_version(w, "1.2.0", 3, f.usr_size, &f.key);
    support::publish(&f.repo, &beta.dir, "beta", &f.key, 86400);
    let old = support::build_version(w, "0.9.0", 3, f.usr_size, &f.key);
    support::publish(&f.repo, &old.dir, "old", &f.key, 86400);
    let conf_path = f.root.join(nimbus::paths::UPDATE_CONF_ETC);
    std::fs::write(
        &conf_path,
        format!(
            "# operator's comment\nGROUP=stable\nSERVER={}\nIO_WRITE_BPS=unlimited\n",
            f.httpd.url()
        ),
    )
    .expect("conf");

    // Other users must reach the sockets (the test also runs as nobody).
    for d in [w, f.root.as_path()] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let sock = w.join("ue.sock");
    let _d = Daemon(
        f.engine(&[
            "--socket",
            sock.to_str().expect("utf8"),
            "--first-check",
            "3600",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("daemon"),
    );
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "daemon did not open its socket"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let (out, text) = ctl(&sock, &["status", "--json"]);
    assert!(out.status.success(), "{text}");
    let st = json(&out);
    assert_eq!(st["state"], "IDLE");
    assert_eq!(st["running_version"], "1.0.0");
    assert_eq!(st["channel"], "stable");

    let (out, text) = ctl(&sock, &["channel"]);
    assert_eq!(text.trim(), "stable", "{out:?}");

    // Switch to a channel that is ahead.
    let (out, text) = ctl(&sock, &["channel", "beta"]);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1.2.0"), "{text}");
    let conf = std::fs::read_to_string(&conf_path).expect("conf");
    assert!(
        conf.contains("GROUP=beta")
            && conf.contains("# operator's comment")
            && !conf.contains("GROUP=stable"),
        "{conf}"
    );

    let (out, text) = ctl(&sock, &["check", "--json"]);
    assert!(out.status.success(), "{text}");
    assert_eq!(json(&out)["message"], "1.2.0 is available");

    // A channel that is behind: refused without --allow-downgrade, GROUP kept.
    let (out, text) = ctl(&sock, &["channel", "old"]);
    assert_eq!(out.status.code(), Some(6), "{text}");
    assert!(
        text.contains("0.9.0") && text.contains("--allow-downgrade"),
        "{text}"
    );
    assert!(std::fs::read_to_string(&conf_path)
        .expect("conf")
        .contains("GROUP=beta"));
    // An unknown channel changes nothing either.
    let (out, text) = ctl(&sock, &["channel", "nosuch"]);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(std::fs::read_to_string(&conf_path)
        .expect("conf")
        .contains("GROUP=beta"));

    let (out, text) = ctl(&sock, &["update", "--wait"]);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("UPDATED_NEED_REBOOT"), "{text}");
    let r = support::release(
        &serde_json::from_slice(&std::fs::read(f.repo.join("channels/beta.json")).expect("m"))
            .expect("parse"),
        "1.2.0",
    );
    assert_eq!(f.slot_payload_sha(Slot::B, r.raw_size), r.raw_sha256);
    assert_eq!(f.cgpt(Slot::B), (2, 1, 0));

    let (out, _) = ctl(&sock, &["slots", "--json"]);
    let slots = json(&out);
    assert_eq!(slots[0]["label"], "USR-A");
    assert_eq!(slots[0]["booted"], true);
    assert_eq!(slots[1]["version"], "1.2.0");
    assert_eq!(slots[1]["tries"], 1);

    // With the operator's say-so the older channel is taken.
    let (out, text) = ctl(&sock, &["channel", "old", "--allow-downgrade"]);
    assert!(out.status.success(), "{text}");
    assert!(std::fs::read_to_string(&conf_path)
        .expect("conf")
        .contains("GROUP=old"));
    let (out, text) = ctl(&sock, &["check", "--json"]);
    assert_eq!(json(&out)["message"], "0.9.0 is available", "{text}");

    // A reader that stops early (`updatectl status | head -1`): no panic.
    let mut child = Command::new(UPDATECTL)
        .arg("--socket")
        .arg(&sock)
        .arg("status")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("updatectl");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("updatectl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");

    // Another user reads status (as Flatcar's GetStatus) but changes
    // nothing: the socket is open, the request is judged by SO_PEERCRED.
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                UPDATECTL,
                "--socket",
            ])
            .arg(&sock)
            .args(args)
            .output()
            .expect("setpriv (util-linux)")
    };
    let out = as_nobody(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&out)["running_version"], "1.0.0");
    for args in [
        &["check"][..],
        &["update"],
        &["channel", "beta"],
        &["rollback"],
        &["mark-good"],
        &["cancel"],
    ] {
        let out = as_nobody(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{args:?}: {err}");
        assert!(
            err.contains(&format!("updatectl {}", args[0]))
                && err.contains("needs root or membership of the group nimbus-admin"),
            "{args:?}: {err}"
        );
    }
    // Nothing changed for the refused requests.
    assert!(std::fs::read_to_string(&conf_path)
        .expect("conf")
        .contains("GROUP=old"));
    // The metrics: any user, and the bytes the update fetched are there.
    let metrics_sock = f.root.join(nimbus::paths::ENGINE_METRICS_SOCKET);
    let out = as_nobody(&[
        "metrics",
        "--metrics-socket",
        metrics_sock.to_str().expect("utf8"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sample = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    let payload = sample("nimbus_update_engine_fetched_bytes_total{kind=\"full\"}")
        + sample("nimbus_update_engine_fetched_bytes_total{kind=\"delta\"}");
    assert!(payload > 0.0, "{text}");
    assert!(sample("nimbus_update_engine_fetched_bytes_total{kind=\"metadata\"}") > 0.0);
    assert_eq!(
        sample("nimbus_update_engine_installs_total{mode=\"full\"}")
            + sample("nimbus_update_engine_installs_total{mode=\"delta\"}"),
        1.0,
        "{text}"
    );
    assert!(
        text.contains("nimbus_os_info{version=\"1.0.0\",channel=\"old\",slot=\"USR-A\"} 1\n"),
        "{text}"
    );
    // A request line without an end is cut off, not buffered without bound.
    {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        let _ = s.write_all(&vec![b'x'; 200 * 1024]);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }
    let (out, text) = ctl(&sock, &["status", "--json"]);
    assert!(
        out.status.success(),
        "the daemon survives a long line: {text}"
    );

    // No daemon: a clear error and its own exit code.
    let (out, text) = ctl(&w.join("nothing.sock"), &["status"]);
    assert_eq!(out.status.code(), Some(69), "{text}");
    assert!(text.contains("cannot reach update-engine"), "{text}");
}
