//! `$public_ipv4` and friends through the real binary: `validate` checks
//! their shape, `apply` fills them from the host's environment files (or
//! the default route) and refuses, naming the variable, when no address is
//! known; and the CoreOS tutorial's user-data is explained key by key.

use std::fs;
use std::path::PathBuf;
use std::process::Output;

mod common;
use common::{bin, s};

/// A member of a three-node etcd cluster, addressed by variable.
const MEMBER: &str = "#cloud-config
coreos:
  etcd2:
    name: core-01
    advertise-client-urls: http://$public_ipv4:2379
    initial-advertise-peer-urls: http://$private_ipv4:2380
    listen-client-urls: http://0.0.0.0:2379
    listen-peer-urls: http://$private_ipv4:2380
    initial-cluster: core-01=http://$private_ipv4:2380,core-02=http://172.17.8.102:2380
nimbus:
  etcd_insecure_plaintext: true
";

/// The user-data of the CoreOS tutorial (coreos-vagrant's sample).
const SEED: &str = "#cloud-config

coreos:
  etcd:
    # generate a new token for each unique cluster from https://discovery.etcd.io/new
    discovery: https://discovery.etcd.io/<token>
    # multi-region and multi-cloud deployments need to use $public_ipv4
    addr: $public_ipv4:4001
    peer-addr: $public_ipv4:7001
  fleet:
    public-ip: $public_ipv4
  units:
    - name: etcd.service
      command: start
    - name: fleet.service
      command: start
";

#[test]
fn validate_accepts_the_variables_and_explains_the_seed() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("user-data");
    fs::write(&f, MEMBER).unwrap();
    let o = bin(&["validate", s(&f)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // Warnings only: the plaintext that this document accepts.
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.lines()
            .all(|l| l.contains(": warning: ") && l.contains("plain HTTP")),
        "{out}"
    );

    fs::write(&f, SEED).unwrap();
    let o = bin(&["validate", s(&f)]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    for want in [
        "line 8: warning: coreos.etcd.addr is not read on Nimbus: use coreos.etcd2.advertise-client-urls",
        "line 9: warning: coreos.etcd.peer-addr is not read on Nimbus: use coreos.etcd2.initial-advertise-peer-urls",
        "line 11: warning: coreos.fleet.public-ip is not read on Nimbus: use nimbus.swarm.advertise_addr",
        "line 15: warning: unit fleet.service is not shipped with Nimbus",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
}

/// Apply `MEMBER` into a fresh root whose /etc/environment is `env`, with
/// an empty route table (no default route to fall back on).
fn apply_member(env: &str) -> (tempfile::TempDir, PathBuf, Output) {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/environment"), env).unwrap();
    let f = d.path().join("user-data");
    fs::write(&f, MEMBER).unwrap();
    let route = d.path().join("route");
    fs::write(
        &route,
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n",
    )
    .unwrap();
    let o = bin(&[
        "apply",
        "--root",
        s(&root),
        "--route-table",
        s(&route),
        s(&f),
    ]);
    (d, root, o)
}

#[test]
fn apply_fills_the_variables_from_the_environment_file() {
    // As Vagrant's CoreOS guest writes it.
    let (_d, root, o) =
        apply_member("COREOS_PUBLIC_IPV4=172.17.8.101\nCOREOS_PRIVATE_IPV4=10.9.8.7\n");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dropin =
        fs::read_to_string(root.join("run/systemd/system/etcd.service.d/20-cloudinit.conf"))
            .unwrap();
    for want in [
        "ETCD_ADVERTISE_CLIENT_URLS=http://172.17.8.101:2379",
        "ETCD_INITIAL_ADVERTISE_PEER_URLS=http://10.9.8.7:2380",
        "ETCD_INITIAL_CLUSTER=core-01=http://10.9.8.7:2380,core-02=http://172.17.8.102:2380",
    ] {
        assert!(dropin.contains(want), "{want:?} not in:\n{dropin}");
    }
    assert!(!dropin.contains('$'), "{dropin}");
}

#[test]
fn apply_without_a_known_address_names_the_variable_and_writes_nothing() {
    // Public known, private not, and no default route to fall back on.
    let (_d, root, o) = apply_member("COREOS_PUBLIC_IPV4=172.17.8.101\n");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "not applied: line 6: $private_ipv4 is used but this host's address is not known"
        ) && err.contains("COREOS_PUBLIC_IPV4/COREOS_PRIVATE_IPV4"),
        "{err}"
    );
    assert!(!root.join("run").exists());
    assert_eq!(fs::read_dir(root.join("etc")).unwrap().count(), 1);
}

#[test]
fn apply_reads_the_environment_inside_the_root_only() {
    // /etc/environment in the root links to a file outside it that would
    // give every address: it is resolved inside the root, where there is
    // no such file, so nothing is known and nothing is applied.
    let outside = tempfile::NamedTempFile::new().unwrap();
    fs::write(
        outside.path(),
        "COREOS_PUBLIC_IPV4=1.1.1.1\nCOREOS_PRIVATE_IPV4=1.1.1.2\n",
    )
    .unwrap();
    let (_d, root, o) = apply_member("");
    fs::remove_file(root.join("etc/environment")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("etc/environment")).unwrap();
    let f = root.parent().unwrap().join("user-data");
    let route = root.parent().unwrap().join("route");
    let o2 = bin(&[
        "apply",
        "--root",
        s(&root),
        "--route-table",
        s(&route),
        s(&f),
    ]);
    let err = String::from_utf8_lossy(&o2.stderr);
    assert_eq!(
        (o.status.code(), o2.status.code()),
        (Some(1), Some(1)),
        "{err}"
    );
    assert!(
        err.contains("$public_ipv4 is used but this host's address is not known"),
        "{err}"
    );
    assert!(!root.join("run").exists());
}
