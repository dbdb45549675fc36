//! The documents Vagrant 2.3's CoreOS guest support sends, byte for byte
//! as Ruby's YAML writes them (`plugins/guests/coreos/cap/`): it applies
//! them through `system-cloudinit@.service` once `command -v cloud-init`
//! finds the image's `cloud-init`. Both must apply: the private network's
//! networkd unit and `/etc/environment` with COREOS_PRIVATE_IPV4 (what
//! `$private_ipv4` is filled from), and the host name.

use std::fs;

mod common;
use common::{bin, s};

/// configure_networks_cloud_init for `private_network, ip: 172.17.8.101`:
/// `file.puts("#cloud-config\n")`, then `Hash#to_yaml` (a `---` line,
/// sequences not indented under their key, `'no'` quoted).
const NETWORKS: &str = "#cloud-config
---
write_files:
- path: \"/etc/environment\"
  content: |-
    COREOS_PUBLIC_IPV4=127.0.0.1
    COREOS_PRIVATE_IPV4=172.17.8.101
coreos:
  units:
  - name: 50-vagrant1.network
    runtime: 'no'
    content: |-
      [Match]
      Name=ens6
      [Network]
      Address=172.17.8.101/24
";

/// change_host_name.
const HOSTNAME: &str = "#cloud-config
---
hostname: core-01
";

#[test]
fn vagrants_network_and_hostname_documents_apply() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    fs::create_dir_all(root.join("etc")).unwrap();
    for (name, doc) in [("networks.yml", NETWORKS), ("hostname.yml", HOSTNAME)] {
        let f = d.path().join(name);
        fs::write(&f, doc).unwrap();
        let o = bin(&["validate", s(&f)]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{name}: {out}");
        assert!(
            out.lines().all(|l| l.contains(": warning: ")),
            "{name}: {out}"
        );
        let o = bin(&["apply", "--root", s(&root), s(&f)]);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let env = fs::read_to_string(root.join("etc/environment")).unwrap();
    assert!(env.contains("COREOS_PRIVATE_IPV4=172.17.8.101"), "{env}");
    let net = fs::read_to_string(root.join("etc/systemd/network/50-vagrant1.network")).unwrap();
    assert!(net.contains("Address=172.17.8.101/24"), "{net}");
    let host = fs::read_to_string(root.join("etc/hostname")).unwrap();
    assert_eq!(host.trim(), "core-01");
}
