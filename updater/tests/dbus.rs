//! Flatcar's D-Bus interface on a real bus: a private dbus-daemon with the
//! system bus's own default policy (this machine's
//! /usr/share/dbus-1/system.conf, its addresses and daemons taken out) and
//! the repository's policy file, the one the image installs. The clients
//! are the stock tools FLUO's users have: busctl, dbus-send, dbus-monitor.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nimbus::layout::Slot;
use support::Fixture;

const LIMIT: Duration = Duration::from_secs(30);
const DEST: &str = "com.coreos.update1";
const PATH: &str = "/com/coreos/update1";
const IFACE: &str = "com.coreos.update1.Manager";

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The system bus's configuration for a bus of the test's own: the same
/// default policy, our policy file, and one test-only rule (uid 1,
/// `daemon`, may send anything to update-engine: what update-engine itself
/// must then refuse).
fn bus_config(dir: &Path, socket: &Path) -> PathBuf {
    let system = std::fs::read_to_string("/usr/share/dbus-1/system.conf")
        .expect("/usr/share/dbus-1/system.conf (package dbus-daemon)");
    let mut out = String::new();
    let mut skipping_comment = false;
    for line in system.lines() {
        let t = line.trim();
        if skipping_comment {
            skipping_comment = !t.contains("-->");
            continue;
        }
        if t.starts_with("<!--") && !t.starts_with("<!DOCTYPE") {
            skipping_comment = !t.contains("-->");
            continue;
        }
        let dropped = [
            "<user>",
            "<fork/>",
            "<standard_system_servicedirs/>",
            "<servicehelper>",
            "<pidfile>",
            "<syslog/>",
            "<include",
            "<includedir>",
        ];
        if dropped.iter().any(|d| t.starts_with(d)) {
            continue;
        }
        if t.starts_with("<listen>") {
            out.push_str(&format!(
                "  <listen>unix:path={}</listen>\n",
                socket.display()
            ));
            continue;
        }
        if t == "</busconfig>" {
            let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("dbus/com.coreos.update1.conf");
            out.push_str(&format!("  <include>{}</include>\n", ours.display()));
            out.push_str(&format!(
                "  <policy user=\"daemon\"><allow send_destination=\"{DEST}\"/></policy>\n"
            ));
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(
        out.contains("<deny send_type=\"method_call\"/>"),
        "system.conf lost its default policy: {out}"
    );
    let p = dir.join("bus.conf");
    std::fs::write(&p, out).expect("bus.conf");
    p
}

fn run(cmd: &mut Command) -> Output {
    nimbus_testkit::proc::output(cmd, LIMIT).unwrap_or_else(|e| panic!("{e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `busctl call` as root: its output line.
fn busctl(addr: &str, args: &[&str]) -> Output {
    run(Command::new("busctl")
        .arg(format!("--address={addr}"))
        .args(args))
}

fn get_status(addr: &str) -> String {
    let o = busctl(addr, &["call", DEST, PATH, IFACE, "GetStatus"]);
    assert!(o.status.success(), "GetStatus: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// dbus-send as another user (a uid, its own group, nothing else).
fn send_as(uid: u32, addr: &str, member: &str) -> Output {
    run(Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "dbus-send",
        ])
        // --bus, not --address: a bus client (Hello first), not a peer.
        .arg(format!("--bus={addr}"))
        .args([
            "--print-reply",
            &format!("--dest={DEST}"),
            PATH,
            &format!("{IFACE}.{member}"),
        ]))
}

fn wait_status(addr: &str, want: &str, limit: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let s = get_status(addr);
        if s.contains(want) {
            return s;
        }
        assert!(t0.elapsed() < limit, "no {want} within {limit:?}: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn flatcars_interface_on_a_real_bus() {
    let f = Fixture::new(3, 32);
    let w = f.tmp.path();
    // Other users must reach the bus's socket.
    for d in [w, f.root.as_path()] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let bus_sock = w.join("bus");
    let conf = bus_config(w, &bus_sock);
    let _bus = Kill(
        Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .args(["--nofork", "--nopidfile"])
            .stdout(Stdio::null())
            .spawn()
            .expect("dbus-daemon (package dbus-daemon)"),
    );
    let addr = format!("unix:path={}", bus_sock.display());
    let t0 = Instant::now();
    while !bus_sock.exists() {
        assert!(
            t0.elapsed() < LIMIT,
            "dbus-daemon did not open {bus_sock:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = w.join("engine.log");
    let _engine = Kill(
        f.engine(&[
            "--socket",
            w.join("ue.sock").to_str().expect("utf8"),
            "--metrics-socket",
            w.join("metrics.sock").to_str().expect("utf8"),
            "--first-check",
            "3600",
            "--dbus",
            &addr,
        ])
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("update-engine"),
    );
    let t0 = Instant::now();
    loop {
        let o = busctl(&addr, &["status", DEST]);
        if o.status.success() {
            break;
        }
        assert!(
            t0.elapsed() < LIMIT,
            "update-engine never took {DEST}: {}\n{}",
            text(&o),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The shape FLUO's agent reads: five out arguments, Flatcar's strings.
    let o = busctl(&addr, &["introspect", DEST, PATH, IFACE]);
    let intro = text(&o);
    assert!(o.status.success(), "{intro}");
    for (member, sig) in [
        (".AttemptUpdate", "method    -"),
        (".GetStatus", "method    -         xdssx"),
        (".ResetStatus", "method    -"),
        (".StatusUpdate", "signal    xdssx"),
    ] {
        let line = intro
            .lines()
            .find(|l| l.starts_with(member))
            .unwrap_or_else(|| panic!("no {member}: {intro}"));
        let squeezed: Vec<&str> = line.split_whitespace().collect();
        let want: Vec<&str> = sig.split_whitespace().collect();
        assert_eq!(&squeezed[1..1 + want.len()], &want[..], "{line}");
    }
    assert_eq!(
        get_status(&addr),
        r#"xdssx 0 0 "UPDATE_STATUS_IDLE" "0.0.0" 0"#
    );

    // Anyone reads; a stranger changes nothing. `nobody` is stopped by the
    // bus's policy, `daemon` (let through by the test's rule) by
    // update-engine's own check.
    let engine_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let o = send_as(65534, &addr, "GetStatus");
    assert!(
        o.status.success(),
        "nobody's GetStatus: {}\n--- update-engine ---\n{}",
        text(&o),
        engine_log()
    );
    assert!(text(&o).contains("UPDATE_STATUS_IDLE"), "{}", text(&o));
    for member in ["AttemptUpdate", "ResetStatus"] {
        let o = send_as(65534, &addr, member);
        assert!(!o.status.success(), "nobody's {member} went through");
        assert!(
            text(&o).contains("AccessDenied"),
            "nobody's {member}: {}",
            text(&o)
        );
        let o = send_as(1, &addr, member);
        assert!(!o.status.success(), "daemon's {member} went through");
        assert!(
            text(&o).contains("AccessDenied")
                && text(&o).contains("needs root or membership of the group nimbus-admin"),
            "daemon's {member}: {}",
            text(&o)
        );
    }
    assert!(get_status(&addr).contains("UPDATE_STATUS_IDLE"));

    // Root's AttemptUpdate: it returns at once, then each change of the
    // five values is a StatusUpdate signal, through to the reboot wanted.
    let monitor_out = w.join("monitor.txt");
    let _monitor = Kill(
        Command::new("dbus-monitor")
            .args(["--address", &addr])
            .arg(format!("type='signal',interface='{IFACE}'"))
            .stdout(std::fs::File::create(&monitor_out).expect("monitor"))
            .stderr(std::fs::File::create(w.join("monitor.err")).expect("monitor"))
            .spawn()
            .expect("dbus-monitor"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let o = busctl(&addr, &["call", DEST, PATH, IFACE, "AttemptUpdate"]);
    assert!(o.status.success(), "AttemptUpdate: {}", text(&o));
    let done = wait_status(
        &addr,
        "UPDATE_STATUS_UPDATED_NEED_REBOOT",
        Duration::from_secs(120),
    );
    let fields: Vec<&str> = done.split_whitespace().collect();
    assert_eq!(fields[0], "xdssx", "{done}");
    assert!(
        fields[1].parse::<i64>().expect("time") > 1_600_000_000,
        "{done}"
    );
    assert_eq!(fields[2], "1", "{done}");
    assert_eq!(fields[4], r#""1.1.0""#, "{done}");
    assert!(fields[5].parse::<i64>().expect("size") > 0, "{done}");
    assert_eq!(f.cgpt(Slot::B), (2, 1, 0));
    std::thread::sleep(Duration::from_millis(500));
    let seen = std::fs::read_to_string(&monitor_out).expect("monitor");
    let ops: Vec<&str> = seen
        .lines()
        .filter_map(|l| l.trim().strip_prefix("string \"UPDATE_STATUS_"))
        .map(|s| s.trim_end_matches('"'))
        .collect();
    let mut order = ops.clone();
    order.dedup();
    for want in ["CHECKING_FOR_UPDATE", "DOWNLOADING", "UPDATED_NEED_REBOOT"] {
        assert!(
            order.contains(&want),
            "no StatusUpdate {want}: {order:?}\n{seen}\n--- update-engine ---\n{}",
            engine_log()
        );
    }
    let pos = |s: &str| order.iter().position(|o| *o == s).unwrap_or(usize::MAX);
    assert!(
        pos("CHECKING_FOR_UPDATE") < pos("DOWNLOADING")
            && pos("DOWNLOADING") < pos("UPDATED_NEED_REBOOT"),
        "{order:?}"
    );
    assert!(
        seen.contains("member=StatusUpdate") && seen.contains(&format!("path={PATH}")),
        "{seen}"
    );

    // ResetStatus undoes the staged update: idle, and USR-B will not boot.
    let o = busctl(&addr, &["call", DEST, PATH, IFACE, "ResetStatus"]);
    assert!(o.status.success(), "ResetStatus: {}", text(&o));
    assert!(get_status(&addr).contains("UPDATE_STATUS_IDLE"));
    assert_eq!(f.cgpt(Slot::B).0, 0, "USR-B still has a priority");
    assert_eq!(support::boot_rule(&f), Slot::A.partition_number());
    // And again from idle: nothing to do, no error.
    let o = busctl(&addr, &["call", DEST, PATH, IFACE, "ResetStatus"]);
    assert!(o.status.success(), "ResetStatus from idle: {}", text(&o));
}
