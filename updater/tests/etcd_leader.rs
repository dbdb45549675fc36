//! `updatectl etcd-step-down` (the pre-reboot hook 60-etcd-leader) against
//! a real three-member etcd on loopback: the leader hands leadership to
//! another member and the cluster keeps serving; a follower, a lone member
//! and an endpoint that is not etcd are each told apart.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::etcd::{Etcd, EtcdCluster};

fn step_down(root: &Path, endpoint: &str, json: bool) -> (Output, String) {
    let mut args = vec!["--root".as_ref(), root.as_os_str()];
    if json {
        args.push("--json".as_ref());
    }
    args.extend(["etcd-step-down", "--endpoint", endpoint].map(std::ffi::OsStr::new));
    support::updatectl(&args)
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("nimbus-leader")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tmp")
}

#[test]
fn the_leader_hands_over_and_a_follower_does_nothing() {
    let t = tmp();
    let root = t.path().join("root");
    std::fs::create_dir_all(&root).expect("mkdir");
    let c = EtcdCluster::start(&t.path().join("etcd"), 3);
    let lead = c.leader().expect("a leader");

    // A follower: nothing moves.
    let follower = (lead + 1) % 3;
    let (out, text) = step_down(&root, &c.urls[follower], false);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "etcd member m{} does not lead (m{} does); nothing to move",
            follower + 1,
            lead + 1
        )),
        "{text}"
    );
    assert_eq!(c.leader(), Some(lead));

    // The leader: another member leads afterwards, as every member says.
    let (out, text) = step_down(&root, &c.urls[lead], true);
    assert!(out.status.success(), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["outcome"], "moved", "{text}");
    assert_eq!(v["member"], format!("m{}", lead + 1), "{text}");
    let now = c.leader().expect("a leader after the move");
    assert_ne!(now, lead);
    assert_eq!(v["leader"], format!("m{}", now + 1), "{text}");
    // And the cluster still takes writes through the old leader.
    let put = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &c.urls[lead], "put", "k", "v"])
        .output()
        .expect("etcdctl");
    assert!(put.status.success());
}

#[test]
fn a_lone_member_or_no_etcd_is_said_plainly() {
    let t = tmp();
    let root = t.path().join("root");
    std::fs::create_dir_all(&root).expect("mkdir");
    let e = Etcd::start(t.path().join("etcd"));
    let (out, text) = step_down(&root, &e.url(), false);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(
            "etcd member nimbus-test leads and no other started voting member can take over"
        ),
        "{text}"
    );

    // Nothing listening: a network error (exit 3) naming the endpoint.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let (out, text) = step_down(&root, &url, false);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains(&url), "{text}");

    // An HTTP server that is not etcd: refused with what was wrong.
    let srv = support::httpd::Httpd::start(t.path());
    let (out, text) = step_down(&root, &srv.url(), false);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains(&srv.url()), "{text}");
    assert!(text.contains("not etcd's JSON"), "{text}");

    // Not an etcd URL: a usage error (exit 2).
    for bad in ["ftp://example", "127.0.0.1:2379"] {
        let (out, text) = step_down(&root, bad, false);
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(text.contains(&format!("--endpoint {bad}")), "{text}");
    }
}
