//! The CoreOS cluster in QEMU: `cargo xtask cluster --faults` runs once
//! (three hosts formed from cloud-config alone, a rolling update under the
//! etcd reboot lock, then the fault scenarios on the same cluster), and
//! each test asserts the line its scenario printed.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::OnceLock;

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

static RUN: OnceLock<Run> = OnceLock::new();

fn run() -> &'static Run {
    RUN.get_or_init(|| {
        // Never panics here: every test reads the one outcome.
        // `cluster` has its own overall deadline (--deadline-minutes 40);
        // this is the backstop behind it.
        match nimbus_testkit::proc::output(
            Command::new(env!("CARGO_BIN_EXE_xtask"))
                .args(["cluster", "--faults"])
                // The epoch the other QEMU tests build with: one cached rootfs.
                .env("SOURCE_DATE_EPOCH", nimbus_testkit::ROOTFS_EPOCH),
            std::time::Duration::from_secs(45 * 60),
        ) {
            Ok(o) => Run {
                ok: o.status.success(),
                stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            },
            Err(e) => Run {
                ok: false,
                stdout: String::new(),
                stderr: format!("cannot run xtask: {e}"),
            },
        }
    })
}

/// `key=value` pairs of the line starting with `prefix `.
fn line(prefix: &str) -> BTreeMap<String, String> {
    let r = run();
    let Some(l) = r
        .stdout
        .lines()
        .find(|l| l.starts_with(&format!("{prefix} ")))
    else {
        let tail: Vec<&str> = r.stderr.lines().collect();
        panic!(
            "no `{prefix}` line (xtask {}):\n{}\n--- stderr (tail) ---\n{}",
            if r.ok { "succeeded" } else { "failed" },
            r.stdout,
            tail[tail.len().saturating_sub(400)..].join("\n")
        );
    };
    eprintln!("{l}");
    let mut out = BTreeMap::new();
    let mut rest = &l[prefix.len()..];
    // Values may be quoted ("...") and hold spaces.
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().to_string();
        let after = &rest[eq + 1..];
        let (val, next) = if let Some(q) = after.strip_prefix('"') {
            let mut end = 0;
            let b = q.as_bytes();
            while end < b.len() && !(b[end] == b'"' && (end == 0 || b[end - 1] != b'\\')) {
                end += 1;
            }
            (q[..end].to_string(), &q[(end + 1).min(q.len())..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        out.insert(key, val);
        rest = next;
    }
    out
}

fn get<'a>(m: &'a BTreeMap<String, String>, k: &str) -> &'a str {
    m.get(k)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("no {k} in {m:?}"))
}

/// The probe's account of each unavailable second (the reasons per host),
/// and what etcd and update-engine logged meanwhile.
fn probe_log() -> String {
    run()
        .stderr
        .lines()
        .filter(|l| l.contains("probe second") || l.starts_with("cluster: journal"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn rolling_update_keeps_etcd_quorum_and_the_service_up() {
    let c = line("cluster:");
    assert_eq!(get(&c, "hosts"), "3");
    assert_eq!(get(&c, "final"), "1.1.0,1.1.0,1.1.0");
    assert_eq!(get(&c, "max_rebooting"), "1", "one host at a time");
    assert_eq!(get(&c, "etcd_unavailable_s"), "0", "{}", probe_log());
    assert_eq!(get(&c, "service_unavailable_s"), "0", "{}", probe_log());
    assert_eq!(get(&c, "lock_holders_end"), "0");
    let mem: Vec<u64> = get(&c, "mem_used_mib")
        .split(',')
        .map(|m| m.parse().expect("mem_used_mib is numbers"))
        .collect();
    assert_eq!(mem.len(), 3);
    let healthy = "h1:Ready:Active,h2:Ready:Active,h3:Ready:Active";
    for l in ["cluster-before:", "cluster-after:"] {
        let m = line(l);
        assert_eq!(get(&m, "etcd_members"), "h1,h2,h3", "{l}");
        assert_eq!(get(&m, "swarm_nodes"), healthy, "{l}");
    }
    let after = line("cluster-after:");
    assert_eq!(get(&after, "healthy"), "true");
    assert_eq!(get(&after, "reboots"), "1,1,1", "each host rebooted once");
    assert_eq!(get(&after, "status_errors"), "none");
}

fn a_host_killed_while_drained_and_holding_the_lock_finishes_when_back() {
    let f = line("cluster-fault kill-holder:");
    assert_eq!(
        get(&f, "held_after_kill"),
        "yes",
        "the lock stays with the dead host"
    );
    assert_eq!(get(&f, "others_served"), "yes");
    assert_eq!(get(&f, "reactivated"), "yes");
    assert_eq!(
        get(&f, "final"),
        "1.1.0,1.1.0,1.1.0",
        "it came back and finished"
    );
    assert_eq!(get(&f, "service_unavailable_s"), "0", "{}", probe_log());
    // A hard kill of etcd's leader leaves the others leaderless for the
    // election timeout (5 s here) plus a probe's own timeout (5 s); more
    // than twice that would be a cluster that did not recover.
    let etcd: u64 = get(&f, "etcd_unavailable_s").parse().expect("a number");
    assert!(
        etcd <= 20,
        "etcd out {etcd} s after the kill\n{}",
        probe_log()
    );
    assert_eq!(get(&f, "lock_holders_end"), "0");
}

fn a_drain_that_cannot_finish_says_why_and_does_not_leak_the_lock() {
    let f = line("cluster-fault drain-timeout:");
    let why = get(&f, "reported");
    assert!(
        why.contains("pre-reboot hook 50-swarm-drain did not finish within 90 s"),
        "{why}"
    );
    assert!(
        why.contains("pinned 2/3"),
        "the hook's last words name the stuck service: {why}"
    );
    assert_eq!(get(&f, "reactivated"), "yes");
    assert_eq!(get(&f, "lock_released"), "yes");
    assert_eq!(get(&f, "rebooted"), "no");
}

fn a_release_that_fails_its_health_check_rolls_back_reactivates_and_releases() {
    let f = line("cluster-fault bad-health:");
    assert_eq!(get(&f, "running"), "1.1.0");
    assert_eq!(get(&f, "rolled_back"), "1.2.0");
    assert_eq!(
        get(&f, "status_says_why"),
        "yes",
        "`updatectl status` names the version given up and the failed unit"
    );
    assert_eq!(get(&f, "reactivated"), "yes");
    assert_eq!(get(&f, "lock_released"), "yes");
    assert_eq!(get(&f, "service_unavailable_s"), "0", "{}", probe_log());
    assert_eq!(get(&f, "etcd_unavailable_s"), "0", "{}", probe_log());
}

fn etcd_and_the_join_tokens_are_kept_from_strangers() {
    let s = line("cluster-secrets:");
    assert_eq!(
        get(&s, "no_cert"),
        "refused",
        "TLS without a client certificate"
    );
    assert_eq!(get(&s, "plain_http"), "refused");
    assert_eq!(get(&s, "manager_token_in_etcd"), "no");
    assert_eq!(get(&s, "worker_token_sealed"), "yes");
    assert_eq!(
        get(&s, "token_in_cmdline"),
        "0",
        "a join token on a command line: {:?}",
        s.get("seen_in")
    );
    // The witness ran on every host through the joins (once a second).
    for h in get(&s, "cmdline_samples").split(',') {
        let n: u64 = h
            .split(':')
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(n >= 20, "too few samples to have seen the join: {h}");
    }
    assert_eq!(get(&s, "etcdctl_on_host"), "yes");
}

fn a_stranger_on_the_network_and_a_container_get_nothing() {
    let i = line("intruder:");
    for k in ["etcd_read", "etcd_write", "swarm_join", "peer", "docker"] {
        assert_eq!(get(&i, k), "refused", "{k}: {i:?}");
    }
}

fn replicas_gathered_on_one_host_are_moved_before_its_drain() {
    let g = line("cluster-gathered:");
    assert_eq!(get(&g, "replicas_before"), "3");
    assert_eq!(get(&g, "moved_first"), "true");
    assert_eq!(get(&g, "service_unavailable_s"), "0", "{}", probe_log());
}

/// One run of `cargo xtask cluster --faults` (three guests, a quarter of an
/// hour), judged scenario by scenario: each check runs even when another
/// failed, and the failure lists every scenario that did not hold.
#[test]
#[ignore = "vm tier: cargo xtask vmtest"]
fn cluster_rolls_and_survives_its_faults() {
    let checks: [(&str, fn()); 7] = [
        ("secrets", etcd_and_the_join_tokens_are_kept_from_strangers),
        (
            "intruder",
            a_stranger_on_the_network_and_a_container_get_nothing,
        ),
        (
            "gathered replicas",
            replicas_gathered_on_one_host_are_moved_before_its_drain,
        ),
        (
            "rolling update",
            rolling_update_keeps_etcd_quorum_and_the_service_up,
        ),
        (
            "kill-holder",
            a_host_killed_while_drained_and_holding_the_lock_finishes_when_back,
        ),
        (
            "drain-timeout",
            a_drain_that_cannot_finish_says_why_and_does_not_leak_the_lock,
        ),
        (
            "bad-health",
            a_release_that_fails_its_health_check_rolls_back_reactivates_and_releases,
        ),
    ];
    let mut failed = Vec::new();
    for (what, check) in checks {
        if let Err(e) = std::panic::catch_unwind(check) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failed.push(format!("{what}: {msg}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}
