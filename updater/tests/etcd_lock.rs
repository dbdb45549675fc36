//! Reboot coordination with a real etcd: three hosts in host mode, each
//! with its own image, machine-id and a reboot hook that records when it
//! "rebooted". With max=1, at no moment are two hosts between reboot and
//! marked good; killing etcd makes hosts wait; the semaphore ends empty.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nimbus::layout::Slot;
use support::etcd::Etcd;
use support::reboot::{now_secs, wait_exit, RebootHost};
use support::UPDATECTL;

use nimbus::etcd_keys::REBOOT_LOCK as KEY;

/// A host under the etcd lock; its machine-id is its name.
fn host(name: &str, etcd: &str, extra_conf: &str) -> RebootHost {
    RebootHost::new(
        name,
        name,
        &format!("REBOOT_STRATEGY=etcd-lock\nETCD_ENDPOINTS={etcd}\n{extra_conf}"),
    )
}

/// Update, wait for the lock, "reboot", come back, pass the health check,
/// give the lock back. Returns (reboot time, marked-good time).
fn lifecycle(h: &RebootHost) -> (f64, f64) {
    let mut d = h.daemon("0");
    wait_exit(
        &mut d,
        Duration::from_secs(120),
        &format!("{}: reboot", h.name),
    );
    let rebooted = *h
        .reboot_times()
        .last()
        .unwrap_or_else(|| panic!("{}: exited without rebooting", h.name));
    // The "boot": host mode picks the slot the boot rule would, now USR-B.
    std::thread::sleep(Duration::from_millis(300));
    let mut d = h.daemon("0");
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
    let t0 = Instant::now();
    while h.lock_taken() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{}: lock never released",
            h.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = h.ctl(&["status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).expect("status json");
    assert_eq!(st["running_version"], "1.1.0", "{}", h.name);
    let _ = d.kill();
    let _ = d.wait();
    (rebooted, good)
}

#[test]
fn three_hosts_one_at_a_time_and_etcd_outage_makes_them_wait() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let etcd = Arc::new(Mutex::new(Etcd::start(tmp.path().join("etcd"))));
    let url = etcd.lock().expect("etcd").url();
    let hosts: Vec<RebootHost> = ["m1", "m2", "m3"]
        .iter()
        .map(|n| host(n, &url, ""))
        .collect();

    let outage: Arc<Mutex<Option<(f64, f64)>>> = Arc::default();
    let intervals: Vec<(String, f64, f64)> = std::thread::scope(|s| {
        // The outage: as soon as the first host reboots, stop etcd for 4 s.
        let (etcd2, outage2, hosts_ref) = (etcd.clone(), outage.clone(), &hosts);
        s.spawn(move || {
            let t0 = Instant::now();
            while hosts_ref.iter().all(|h| h.reboot_times().is_empty()) {
                assert!(t0.elapsed() < Duration::from_secs(120), "no host rebooted");
                std::thread::sleep(Duration::from_millis(10));
            }
            let down = now_secs();
            etcd2.lock().expect("etcd").stop();
            std::thread::sleep(Duration::from_secs(4));
            let up = now_secs();
            etcd2.lock().expect("etcd").resume();
            *outage2.lock().expect("outage") = Some((down, up));
        });
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

    eprintln!(
        "intervals {intervals:?} outage {:?}",
        outage.lock().expect("o")
    );
    // One at a time: no two [reboot, marked good] intervals overlap.
    let mut sorted = intervals.clone();
    sorted.sort_by(|a, b| a.1.total_cmp(&b.1));
    for w in sorted.windows(2) {
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
    // No reboot while etcd was down.
    let (down, up) = outage.lock().expect("outage").expect("the outage happened");
    for (n, r, _) in &intervals {
        assert!(
            !(*r > down && *r < up),
            "{n} rebooted at {r:.3} during the etcd outage {down:.3}..{up:.3}"
        );
    }
    for h in &hosts {
        assert_eq!(h.reboot_times().len(), 1, "{} rebooted once", h.name);
        assert_eq!(h.f.cgpt(Slot::B), (2, 0, 1), "{}: USR-B good", h.name);
    }
    let sem: serde_json::Value =
        serde_json::from_str(&etcd.lock().expect("etcd").get(KEY)).expect("semaphore json");
    assert_eq!(sem["holders"], serde_json::json!([]), "{sem}");
    assert_eq!(sem["semaphore"], 1);
}

#[test]
fn a_host_back_outside_its_window_still_releases_the_lock() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let etcd = Etcd::start(tmp.path().join("etcd"));
    // A window open now (it started a minute ago, lasts an hour).
    let open = (chrono::Local::now() - chrono::Duration::minutes(1))
        .format("%H:%M")
        .to_string();
    let h = host(
        "w1",
        &etcd.url(),
        &format!("REBOOT_WINDOW_START={open}\nREBOOT_WINDOW_LENGTH=1h\n"),
    );
    let mut d = h.daemon("0");
    wait_exit(&mut d, Duration::from_secs(120), "reboot inside the window");
    assert!(h.lock_taken());
    assert!(etcd.get(KEY).contains("w1"));
    // It comes back when the window is closed.
    let closed = (chrono::Local::now() + chrono::Duration::hours(6))
        .format("%H:%M")
        .to_string();
    let conf = h.f.root.join(nimbus::paths::UPDATE_CONF_ETC);
    let text = std::fs::read_to_string(&conf).expect("conf").replace(
        &format!("REBOOT_WINDOW_START={open}"),
        &format!("REBOOT_WINDOW_START={closed}"),
    );
    std::fs::write(&conf, text).expect("conf");
    let mut d = h.daemon("0");
    h.wait_socket();
    assert!(h.ctl(&["mark-good"]).status.success());
    let t0 = Instant::now();
    while h.lock_taken() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "lock not released outside the window"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = d.kill();
    let _ = d.wait();
    assert!(!etcd.get(KEY).contains("w1"), "{}", etcd.get(KEY));
}

fn status_note(h: &RebootHost) -> String {
    let st = h.ctl(&["status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_default();
    format!("{} {}", st["note"].as_str().unwrap_or(""), st["state"])
}

/// Run the daemon until its status note says `want`; assert it never rebooted.
fn waits_with(h: &RebootHost, want: &str) {
    let mut d = h.daemon("0");
    h.wait_socket();
    let t0 = Instant::now();
    let note = loop {
        let n = status_note(h);
        if n.contains(want) {
            break n;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{}: note never said {want:?}: {n}",
            h.name
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // A few more policy steps: still no reboot.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        d.try_wait().expect("wait").is_none(),
        "{}: daemon exited (rebooted?): {note}",
        h.name
    );
    let _ = d.kill();
    let _ = d.wait();
    assert!(
        h.reboot_times().is_empty(),
        "{}: rebooted without the lock",
        h.name
    );
    assert!(note.contains("UPDATED_NEED_REBOOT"), "{note}");
}

#[test]
fn bad_etcd_inputs_mean_no_reboot_and_no_lost_lock() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    // Unreachable etcd.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let h = host("u1", &format!("http://127.0.0.1:{port}"), "");
    waits_with(&h, "cannot reach etcd");

    // A malformed semaphore value: reported, never overwritten.
    let etcd = Etcd::start(tmp.path().join("etcd"));
    let junk = r#"{"semaphore":0,"max":1,"holders":["other-host"],"extra":"#;
    etcd.ctl(&["put", KEY, junk]);
    let h = host("b1", &etcd.url(), "");
    waits_with(&h, "malformed");
    assert_eq!(etcd.get(KEY), junk, "the value is left for a human");

    // Held by another host: waits, and says who holds it.
    etcd.ctl(&[
        "put",
        KEY,
        r#"{"semaphore":0,"max":1,"holders":["other-host"]}"#,
    ]);
    let h = host("b2", &etcd.url(), "");
    waits_with(&h, "held by other-host");
    assert!(etcd.get(KEY).contains("other-host"));

    // Bad credentials on an etcd with auth enabled.
    etcd.ctl(&["user", "add", "root:rootpw"]);
    etcd.ctl(&["auth", "enable"]);
    let h = host(
        "b3",
        &etcd.url(),
        "ETCD_USERNAME=root\nETCD_PASSWORD=wrong\n",
    );
    waits_with(&h, "authentication failed");
    // With the right password the same host gets through to the lock.
    let ok = host(
        "b4",
        &etcd.url(),
        "ETCD_USERNAME=root\nETCD_PASSWORD=rootpw\n",
    );
    waits_with(&ok, "held by other-host");
}

#[test]
fn updatectl_lock_commands() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let etcd = Etcd::start(tmp.path().join("etcd"));
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).expect("root");
    let ctl = |args: &[&str]| -> (std::process::Output, serde_json::Value) {
        let out = Command::new(UPDATECTL)
            .arg("--root")
            .arg(&root)
            .args(["--json", "lock"])
            .args(args)
            .args(["--endpoint", &etcd.url()])
            .output()
            .expect("updatectl");
        let v = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out, v)
    };
    let (out, v) = ctl(&["status"]);
    assert!(out.status.success());
    assert_eq!(v["max"], 1);
    assert_eq!(v["semaphore"], 1);
    let (_, v) = ctl(&["set-max", "2"]);
    assert_eq!(v["max"], 2);
    etcd.ctl(&[
        "put",
        KEY,
        r#"{"semaphore":1,"max":2,"holders":["gone-host"]}"#,
    ]);
    let (out, v) = ctl(&["unlock", "gone-host"]);
    assert!(out.status.success());
    assert_eq!(v["holders"], serde_json::json!([]));
    assert_eq!(v["semaphore"], 2);
    // Groups get their own key.
    let (_, v) = ctl(&["status", "--group", "db"]);
    assert_eq!(
        v["key"],
        "coreos.com/updateengine/rebootlock/groups/db/semaphore"
    );
    // Malformed value: exit 4, untouched.
    etcd.ctl(&["put", KEY, "nonsense"]);
    let (out, _) = ctl(&["unlock", "x"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(etcd.get(KEY), "nonsense");
    let _ = Path::new("");
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate.
fn certs(dir: &Path) {
    let p = |n: &str| dir.join(n).to_str().expect("utf8").to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    let (cakey, capem) = (p("ca.key"), p("ca.pem"));
    a.extend([
        "-days",
        "2",
        "-subj",
        "/CN=nimbus-test-ca",
        "-keyout",
        &cakey,
        "-out",
        &capem,
    ]);
    openssl(&a);
    for (name, ext) in [
        (
            "server",
            // etcd 3.4's JSON gateway dials its own gRPC port with the server
            // certificate, so it must be good for client auth too.
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        let (key, csr, pem, extf) = (
            p(&format!("{name}.key")),
            p(&format!("{name}.csr")),
            p(&format!("{name}.pem")),
            p(&format!("{name}.ext")),
        );
        std::fs::write(&extf, ext).expect("ext");
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend(["-subj", "/CN=127.0.0.1", "-keyout", &key, "-out", &csr]);
        openssl(&a);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &capem,
            "-CAkey",
            &cakey,
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &pem,
            "-extfile",
            &extf,
        ]);
    }
}

#[test]
fn etcd_over_tls_with_client_certificates() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let d = tmp.path();
    certs(d);
    let etcd = Etcd::start_tls(d.join("etcd"), d);
    let root = d.join("root");
    std::fs::create_dir_all(root.join("etc/nimbus")).expect("mkdir");
    let run = |conf: &str| -> std::process::Output {
        std::fs::write(root.join(nimbus::paths::UPDATE_CONF_ETC), conf).expect("conf");
        Command::new(UPDATECTL)
            .arg("--root")
            .arg(&root)
            .args(["--json", "lock", "set-max", "2"])
            .output()
            .expect("updatectl")
    };
    let base = format!(
        "ETCD_ENDPOINTS={}\nETCD_CAFILE={}\n",
        etcd.url(),
        d.join("ca.pem").display()
    );
    let with_cert = format!(
        "{base}ETCD_CERTFILE={}\nETCD_KEYFILE={}\n",
        d.join("client.pem").display(),
        d.join("client.key").display()
    );
    let out = run(&with_cert);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["max"], 2);
    // Without a client certificate, or trusting the wrong CA: refused.
    let out = run(&base);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wrong = format!(
        "ETCD_ENDPOINTS={}\nETCD_CAFILE={}\nETCD_CERTFILE={}\nETCD_KEYFILE={}\n",
        etcd.url(),
        d.join("client.pem").display(),
        d.join("client.pem").display(),
        d.join("client.key").display()
    );
    let out = run(&wrong);
    assert!(!out.status.success());
    // A key file that does not exist: a configuration error naming it.
    let out = run(&format!(
        "{base}ETCD_CERTFILE=/nonexistent.pem\nETCD_KEYFILE=/nonexistent.key\n"
    ));
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.pem"));
}
