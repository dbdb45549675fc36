//! Table tests: every key of the schema accepted, every listed mistake
//! rejected with the line it names.

use nimbus_cloud_config::schema::{check, CloudConfig, Severity, UserData};

fn ok(doc: &str) -> CloudConfig {
    let (data, problems) = check(doc);
    let errors: Vec<_> = problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .collect();
    assert!(
        errors.is_empty(),
        "unexpected errors in\n{doc}\n{errors:#?}"
    );
    match data {
        Some(UserData::CloudConfig(c)) => *c,
        other => panic!("not a cloud-config: {other:?}"),
    }
}

/// (document, line, severity, fragment of the message)
fn expect(doc: &str, line: usize, sev: Severity, fragment: &str) {
    let (data, problems) = check(doc);
    assert!(
        problems
            .iter()
            .any(|p| p.line == line && p.severity == sev && p.message.contains(fragment)),
        "expected line {line} {sev:?} containing {fragment:?} in\n{doc}\ngot {problems:#?}"
    );
    if sev == Severity::Error {
        assert!(data.is_none(), "a document with errors must not be applied");
    }
}

#[test]
fn every_top_level_key() {
    let c = ok("#cloud-config
hostname: node1.example.com
manage_etc_hosts: localhost
ssh_authorized_keys:
  - ssh-ed25519 AAAA one
users:
  - name: alice
    passwd: $6$salt$hash
    gecos: Alice
    homedir: /home/alice
    no_create_home: no
    primary_group: users
    groups: [sudo, docker]
    no_user_group: yes
    ssh_authorized_keys: [ssh-rsa AAAA two]
    system: false
    no_log_init: on
    shell: /bin/sh
write_files:
  - path: /etc/motd
    content: hi
    owner: root:root
    permissions: '0600'
");
    assert_eq!(c.hostname.as_deref(), Some("node1.example.com"));
    assert!(c.manage_etc_hosts);
    assert_eq!(c.ssh_authorized_keys, ["ssh-ed25519 AAAA one"]);
    let u = &c.users[0];
    assert_eq!(u.name, "alice");
    assert_eq!(u.passwd.as_deref(), Some("$6$salt$hash"));
    assert_eq!(u.groups, ["sudo", "docker"]);
    assert!(u.no_user_group && !u.system && !u.no_create_home);
    assert_eq!(u.shell.as_deref(), Some("/bin/sh"));
    assert_eq!(c.write_files[0].permissions, 0o600);
    assert_eq!(c.write_files[0].content, b"hi");
}

#[test]
fn every_coreos_key() {
    let c = ok("#cloud-config
coreos:
  etcd2:
    name: node1
    advertise-client-urls: http://10.0.0.1:2379
    initial_cluster_state: new
    debug: yes
  fleet:
    public-ip: 10.0.0.1
  flannel:
    etcd_prefix: /coreos.com/network
  locksmith:
    endpoint: http://10.0.0.1:2379,http://10.0.0.2:2379
    group: web
    window_start: Thu 04:00
    window_length: 1h30m
    etcd_cafile: /etc/ssl/ca.pem
  update:
    reboot-strategy: etcd-lock
    server: https://updates.example.com/nimbus
    group: beta
  oem:
    id: qemu
    name: QEMU
    version_id: 1.0
    home_url: https://example.com
    bug_report_url: https://example.com/bugs
  units:
    - name: hello.service
      command: start
      enable: true
      runtime: false
      content: |
        [Service]
        ExecStart=/bin/true
      drop_ins:
        - name: 10-env.conf
          content: |
            [Service]
            Environment=A=1
    - name: docker.service
      mask: true
    - name: 10-eth.network
      content: |
        [Match]
        Name=eth0
nimbus:
  # advertise-client-urls above is plain HTTP on a network address.
  etcd_insecure_plaintext: true
");
    let etcd = c
        .env_dropins
        .iter()
        .find(|d| d.unit == "etcd.service")
        .unwrap();
    assert_eq!(
        etcd.vars,
        [
            ("ETCD_NAME".to_string(), "node1".to_string()),
            (
                "ETCD_ADVERTISE_CLIENT_URLS".into(),
                "http://10.0.0.1:2379".into()
            ),
            ("ETCD_INITIAL_CLUSTER_STATE".into(), "new".into()),
            ("ETCD_DEBUG".into(), "true".into()),
        ]
    );
    assert!(c
        .env_dropins
        .iter()
        .any(|d| d.unit == "fleet.service" && d.vars[0].0 == "FLEET_PUBLIC_IP"));
    assert!(c
        .env_dropins
        .iter()
        .any(|d| d.unit == "flanneld.service" && d.vars[0].0 == "FLANNELD_ETCD_PREFIX"));
    let l = c.locksmith.unwrap();
    assert_eq!(l.window_start.as_deref(), Some("Thu 04:00"));
    assert_eq!(l.group.as_deref(), Some("web"));
    let u = c.update.unwrap();
    assert_eq!(
        u.reboot_strategy,
        Some(nimbus::updateconf::RebootStrategy::EtcdLock)
    );
    assert_eq!(u.group.as_deref(), Some("beta"));
    assert_eq!(c.oem.len(), 5);
    assert_eq!(c.units.len(), 3);
    assert_eq!(c.units[0].drop_ins[0].0, "10-env.conf");
    assert!(c.units[1].mask);
    assert_eq!(c.units[0].command.as_deref(), Some("start"));
}

#[test]
fn encodings_decode() {
    // "hello\n" in each encoding.
    for (enc, content) in [
        ("", "hello\n"),
        ("b64", "aGVsbG8K"),
        ("base64", "aGVsbG8K"),
        ("gz+b64", "H4sIAAAAAAAAA8tIzcnJ5wIAIDA6NgYAAAA="),
        ("gzip+base64", "H4sIAAAAAAAAA8tIzcnJ5wIAIDA6NgYAAAA="),
        ("gz+base64", "H4sIAAAAAAAAA8tIzcnJ5wIAIDA6NgYAAAA="),
        ("gzip+b64", "H4sIAAAAAAAAA8tIzcnJ5wIAIDA6NgYAAAA="),
    ] {
        let doc = format!("#cloud-config\nwrite_files:\n  - path: /etc/x\n    encoding: \"{enc}\"\n    content: \"{}\"\n", content.replace('\n', "\\n"));
        assert_eq!(
            ok(&doc).write_files[0].content,
            b"hello\n",
            "encoding {enc:?}"
        );
    }
}

#[test]
fn scripts_and_empty() {
    assert!(matches!(
        check("#!/bin/sh\necho hi\n").0,
        Some(UserData::Script(_))
    ));
    assert!(matches!(check("\n  \n").0, Some(UserData::Empty)));
}

#[test]
fn listed_errors_name_their_line() {
    use Severity::*;
    let cases: &[(&str, usize, Severity, &str)] = &[
        ("hostname: x\n", 1, Error, "missing `#cloud-config` header"),
        ("#cloud-config\nhostnme: x\n", 2, Error, "did you mean `hostname`"),
        ("#cloud-config\nunits:\n  - name: a.service\n", 2, Error, "belongs under `coreos`"),
        ("#cloud-config\ncoreos:\n  write_files: []\n", 3, Error, "belongs under the top level"),
        ("#cloud-config\ncoreos:\n  update:\n    reboot_strategy: sometimes\n", 4, Error, "reboot_strategy \"sometimes\""),
        ("#cloud-config\ncoreos:\n  units:\n    - name: a.service\n      command: begin\n", 5, Error, "unit command \"begin\""),
        ("#cloud-config\ncoreos:\n  units:\n    - name: nosuffix\n", 4, Error, "not a valid unit name"),
        ("#cloud-config\ncoreos:\n  units:\n    - content: x\n", 4, Error, "no `name`"),
        ("#cloud-config\nwrite_files:\n  - path: /etc/a\n    permissions: 0888\n", 4, Error, "octal mode"),
        ("#cloud-config\nwrite_files:\n  - path: /etc/a\n    permissions: rw-r--r--\n", 4, Error, "octal mode"),
        ("#cloud-config\nwrite_files:\n  - path: /etc/a\n    encoding: base64\n    content: '%%%'\n", 5, Error, "not valid base64"),
        ("#cloud-config\nwrite_files:\n  - path: /etc/a\n    encoding: gzip\n    content: notgzip\n", 5, Error, "not valid gzip"),
        ("#cloud-config\nwrite_files:\n  - path: /etc/a\n    encoding: rot13\n", 4, Error, "unknown encoding"),
        ("#cloud-config\nwrite_files:\n  - path: /usr/lib/x\n", 3, Error, "read-only"),
        ("#cloud-config\nwrite_files:\n  - path: /etc/../usr/x\n", 3, Error, "`..`"),
        ("#cloud-config\nwrite_files:\n  - path: etc/x\n", 3, Error, "absolute"),
        ("#cloud-config\nwrite_files:\n  - content: x\n", 3, Error, "no `path`"),
        ("#cloud-config\nwrite_files:\n  - path: /etc/a\n    owner: 'root;rm'\n", 4, Error, "owner"),
        ("#cloud-config\nhostname: -bad-\n", 2, Error, "not a valid host name"),
        ("#cloud-config\nhostname: [a]\n", 2, Error, "must be a string, found a list"),
        ("#cloud-config\nusers: alice\n", 2, Error, "must be a list"),
        ("#cloud-config\nusers:\n  - name: Alice\n", 3, Error, "user name \"Alice\""),
        ("#cloud-config\nusers:\n  - name: a\n    system: maybe\n", 4, Error, "true or false"),
        ("#cloud-config\nnimbus:\n  swarm:\n    role: manager\n    advertise_addr: 10.0.0.1\n    init: maybe\n", 6, Error, "nimbus.swarm.init (or `auto`) must be true or false"),
        ("#cloud-config\nnimbus:\n  swarm:\n    role: manager\n    advertise_addr: 10.0.0.1\n    init: auto\n", 3, Error, "`init: auto` needs `secret`"),
        ("#cloud-config\nnimbus:\n  swarm:\n    role: manager\n    advertise_addr: eth1\n    init: auto\n    secret: 5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a\n", 3, Error, "must be an address ($private_ipv4)"),
        ("#cloud-config\nnimbus:\n  swarm:\n    role: worker\n    advertise_addr: 10.0.0.1\n    init: auto\n    secret: 5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a\n", 3, Error, "only a manager can `init`"),
        ("#cloud-config\nusers:\n  - name: a\n    system: 'yes'\n", 4, Warning, "the quoted \"yes\" is read as true"),
        ("#cloud-config\ncoreos:\n  locksmith:\n    window_start: Funday 04:00\n    window_length: 1h\n", 4, Error, "window_start"),
        ("#cloud-config\ncoreos:\n  locksmith:\n    window_start: '04:00'\n    window_length: forever\n", 5, Error, "window_length"),
        ("#cloud-config\ncoreos:\n  locksmith:\n    window_start: '04:00'\n", 3, Error, "go together"),
        ("#cloud-config\ncoreos:\n  locksmith:\n    fleetlock_url: ftp://lock\n", 4, Error, "fleetlock_url"),
        ("#cloud-config\ncoreos:\n  locksmith:\n    fleetlock_url: http://lock:3333\n    fleetlock_group: a/b\n", 5, Error, "fleetlock_group"),
        ("#cloud-config\ncoreos:\n  update:\n    server: ftp://x\n", 4, Error, "not an http(s) URL"),
        ("#cloud-config\ncoreos:\n  update:\n    group: Not A Channel\n", 4, Error, "channel name"),
        ("#cloud-config\ncoreos:\n  etcd2:\n    nmae: x\n", 4, Error, "did you mean `name`"),
        ("#cloud-config\ncoreos:\n  etcd2:\n    name: [x]\n", 4, Error, "must be a scalar"),
        ("#cloud-config\ncoreos:\n  etcd2: {name: a}\n  etcd: {name: b}\n", 4, Error, "both configure etcd.service"),
        ("#cloud-config\ncoreos:\n  units:\n    - name: a.service\n      drop_ins:\n        - name: x.txt\n", 6, Error, "ending in .conf"),
        ("#cloud-config\nmanage_etc_hosts: true\n", 2, Error, "manage_etc_hosts"),
        ("#cloud-config\nhostname: a\nhostname: b\n", 3, Error, "duplicate key"),
        ("#cloud-config\ncoreos:\n  units:\n    - name: e.network\n      command: start\n", 4, Error, "network units"),
        ("#cloud-config\nhostname: [a\n", 3, Error, "YAML syntax error"),
        // Deprecated keys and soft problems are warnings.
        ("#cloud-config\ncoreos:\n  etcd:\n    name: a\n", 3, Warning, "deprecated"),
        ("#cloud-config\ncoreos:\n  fleet:\n    public_ip: 1.2.3.4\n", 3, Warning, "deprecated"),
        ("#cloud-config\ncoreos:\n  update:\n    reboot_strategy: best-effort\n", 4, Warning, "deprecated"),
        ("#cloud-config\nssh_authorized_keys:\n  - not a key\n", 3, Warning, "does not look like"),
        ("#cloud-config\nusers:\n  - name: a\n    passwd: hunter2\n", 3, Warning, "clear-text"),
        ("#cloud-config\nusers:\n  - name: a\n    coreos_ssh_import_github: a\n", 4, Warning, "not supported"),
    ];
    for (doc, line, sev, frag) in cases {
        expect(doc, *line, *sev, frag);
    }
}

#[test]
fn warnings_alone_still_apply() {
    let (data, problems) = check("#cloud-config\ncoreos:\n  etcd:\n    name: a\n");
    assert!(problems.iter().all(|p| p.severity == Severity::Warning));
    assert!(data.is_some());
}

#[test]
fn all_problems_are_reported_not_just_the_first() {
    let (_, problems) =
        check("#cloud-config\nhostnme: a\nusers: 3\nwrite_files:\n  - path: /usr/x\n");
    let lines: Vec<usize> = problems.iter().map(|p| p.line).collect();
    assert_eq!(lines, [2, 3, 5]);
}

#[test]
fn account_fields_cannot_inject_lines_or_fields() {
    for (key, value) in [
        ("gecos", "\"x\\nroot2::0:0::/root:/bin/sh\""),
        ("gecos", "\"a:b\""),
        ("shell", "\"/bin/sh:x\""),
        ("homedir", "\"/home/a:0\""),
        ("passwd", "\"$6$x\\nroot::0\""),
        ("primary_group", "\"users:x\""),
    ] {
        let doc = format!("#cloud-config\nusers:\n  - name: alice\n    {key}: {value}\n");
        expect(&doc, 4, Severity::Error, &format!("users.{key}"));
    }
    expect(
        "#cloud-config\nusers:\n  - name: alice\n    groups: [\"sudo,root\"]\n",
        4,
        Severity::Error,
        "not a valid group name",
    );
}

const ETCD2_OK: &str = "#cloud-config
coreos:
  etcd2:
    name: n1
    initial-cluster: n1=http://10.10.0.11:2380,n2=http://10.10.0.12:2380,n3=http://10.10.0.13:2380
    initial-cluster-state: new
    initial-cluster-token: nimbus-test
    initial-advertise-peer-urls: http://10.10.0.11:2380
    listen-peer-urls: http://10.10.0.11:2380
    listen-client-urls: http://0.0.0.0:2379
    advertise-client-urls: http://10.10.0.11:2379
nimbus:
  etcd_insecure_plaintext: true
";

/// The same member secured: TLS with client certificates for clients and
/// peers (what `validate` asks for when etcd is reachable from others).
const ETCD2_TLS: &str = "#cloud-config
coreos:
  etcd2:
    name: n1
    initial-cluster: n1=https://10.10.0.11:2380,n2=https://10.10.0.12:2380,n3=https://10.10.0.13:2380
    initial-cluster-state: new
    initial-advertise-peer-urls: https://10.10.0.11:2380
    listen-peer-urls: https://10.10.0.11:2380
    listen-client-urls: https://0.0.0.0:2379
    advertise-client-urls: https://10.10.0.11:2379
    cert-file: /etc/nimbus/etcd/client.pem
    key-file: /etc/nimbus/etcd/client.key
    trusted-ca-file: /etc/nimbus/etcd/ca.pem
    client-cert-auth: true
    peer-cert-file: /etc/nimbus/etcd/peer.pem
    peer-key-file: /etc/nimbus/etcd/peer.key
    peer-trusted-ca-file: /etc/nimbus/etcd/ca.pem
    peer-client-cert-auth: true
";

#[test]
fn etcd_reachable_from_others_needs_tls_with_client_certificates() {
    let c = ok(ETCD2_TLS);
    let d = &c.env_dropins[0];
    let get = |k: &str| d.vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("ETCD_CLIENT_CERT_AUTH"), Some("true"));
    assert_eq!(
        get("ETCD_PEER_TRUSTED_CA_FILE"),
        Some("/etc/nimbus/etcd/ca.pem")
    );

    // The plain-HTTP member without the opt-out: refused, each URL with
    // its line (the example docs/cluster.md used to show).
    let plain = ETCD2_OK.replace("nimbus:\n  etcd_insecure_plaintext: true\n", "");
    for (line, frag) in [
        (
            8,
            "initial_advertise_peer_urls: http://10.10.0.11:2380 serves etcd's peers in plain HTTP",
        ),
        (
            9,
            "listen_peer_urls: http://10.10.0.11:2380 serves etcd's peers in plain HTTP",
        ),
        (
            10,
            "listen_client_urls: http://0.0.0.0:2379 serves etcd's clients in plain HTTP",
        ),
        (
            11,
            "advertise_client_urls: http://10.10.0.11:2379 serves etcd's clients in plain HTTP",
        ),
    ] {
        expect(&plain, line, Severity::Error, frag);
    }
    expect(
        &plain,
        10,
        Severity::Error,
        "nimbus.etcd_insecure_plaintext",
    );
    // The opt-out turns each into a warning that says what it risks.
    expect(
        ETCD2_OK,
        10,
        Severity::Warning,
        "anyone who reaches it can read the cluster's keys",
    );
    // TLS that lets any client in is refused the same way.
    expect(
        &ETCD2_TLS.replace("    client-cert-auth: true\n", ""),
        9,
        Severity::Error,
        "over TLS but without client_cert_auth: true",
    );
    expect(
        &ETCD2_TLS.replace("    peer-trusted-ca-file: /etc/nimbus/etcd/ca.pem\n", ""),
        17,
        Severity::Error,
        "peer_client_cert_auth: true without peer_trusted_ca_file",
    );
    // etcd on this host alone needs neither.
    ok("#cloud-config
coreos:
  etcd2:
    listen-client-urls: http://127.0.0.1:2379,http://[::1]:2379,http://localhost:2379
    advertise-client-urls: http://127.0.0.1:2379
");
}

#[test]
fn an_etcd2_cluster_member_is_accepted_and_becomes_etcd_environment() {
    let c = ok(ETCD2_OK);
    let d = &c.env_dropins[0];
    assert_eq!(d.unit, "etcd.service");
    let get = |k: &str| d.vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("ETCD_NAME"), Some("n1"));
    assert_eq!(get("ETCD_INITIAL_CLUSTER_STATE"), Some("new"));
    assert_eq!(
        get("ETCD_INITIAL_ADVERTISE_PEER_URLS"),
        Some("http://10.10.0.11:2380")
    );
}

#[test]
fn etcd2_mistakes_etcd_would_die_on_are_caught_with_their_line() {
    let cases: &[(&str, &str, usize, &str)] = &[
        (
            "name: n1",
            "name: n9",
            4,
            "\"n9\" is not a member of initial_cluster",
        ),
        (
            "initial-cluster-state: new",
            "initial-cluster-state: fresh",
            6,
            "not new or existing",
        ),
        (
            "initial-advertise-peer-urls: http://10.10.0.11:2380",
            "initial-advertise-peer-urls: http://10.10.0.99:2380",
            8,
            "is not listed for n1 in initial_cluster",
        ),
        (
            "listen-client-urls: http://0.0.0.0:2379",
            "listen-client-urls: 0.0.0.0:2379",
            10,
            "is not an http(s) URL",
        ),
        (
            "initial-cluster: n1=http://10.10.0.11:2380,",
            "initial-cluster: n1,",
            5,
            "\"n1\" is not NAME=URL",
        ),
    ];
    for (from, to, line, frag) in cases {
        assert!(ETCD2_OK.contains(from), "{from}");
        expect(&ETCD2_OK.replace(from, to), *line, Severity::Error, frag);
    }
    // Without `name`, etcd is named after the host: one user-data for
    // every member (a Vagrant cluster) is accepted.
    ok(&ETCD2_OK.replace("    name: n1\n", ""));
}

#[test]
fn a_swarm_section_is_checked_and_rendered() {
    let c = ok("#cloud-config
nimbus:
  hook_timeout: 5m
  swarm:
    role: manager
    advertise_addr: 10.10.0.12
    join: [10.10.0.11:2377]
    join_token: SWMTKN-1-3pu6hszjas19xyp7ghgosyx9k8atbfcr8p2is99znpy26u2lkl-1awxwuwd3z9j1z3puu7rcgdbx
");
    let n = c.nimbus.expect("nimbus section");
    assert_eq!(n.hook_timeout.as_deref(), Some("5m"));
    let sw = n.swarm.expect("swarm");
    assert_eq!(
        sw.render(),
        "# Written by cloud-config from nimbus.swarm; read by nimbus-swarm.\nROLE=manager\nINIT=no\nADVERTISE_ADDR=10.10.0.12\nJOIN=10.10.0.11:2377\nJOIN_TOKEN=SWMTKN-1-3pu6hszjas19xyp7ghgosyx9k8atbfcr8p2is99znpy26u2lkl-1awxwuwd3z9j1z3puu7rcgdbx\n"
    );
    let init = ok("#cloud-config\nnimbus:\n  swarm:\n    role: manager\n    init: true\n    advertise_addr: eth1\n");
    assert!(init
        .nimbus
        .and_then(|n| n.swarm)
        .is_some_and(|s| s.init == nimbus::swarmconf::Init::Yes));
    // Without the secret nothing is published: said, not refused.
    expect(
        "#cloud-config\nnimbus:\n  swarm:\n    role: manager\n    init: true\n    advertise_addr: eth1\n",
        3,
        Severity::Warning,
        "the worker token is not published",
    );

    let base = "#cloud-config\nnimbus:\n  swarm:\n";
    let cases: &[(&str, usize, &str)] = &[
        ("    role: boss\n    init: true\n    advertise_addr: 10.0.0.1\n", 4, "\"boss\" is not manager or worker"),
        ("    role: worker\n    init: true\n    advertise_addr: 10.0.0.1\n", 3, "only a manager can `init`"),
        ("    role: manager\n    join: [10.0.0.1:2377]\n", 3, "needs `advertise_addr`"),
        ("    role: manager\n    advertise_addr: 10.0.0.2\n", 3, "give `join`"),
        ("    role: manager\n    init: true\n    join: [10.0.0.1]\n    advertise_addr: 10.0.0.2\n", 3, "does not go with `join`"),
        ("    role: worker\n    advertise_addr: 10.0.0.2\n    join: ['10.0.0.1:99999']\n", 6, "is not a manager address"),
        ("    role: worker\n    advertise_addr: 10.0.0.2/24\n    join: [10.0.0.1]\n", 5, "is not an IP address"),
        ("    role: worker\n    advertise_addr: 10.0.0.2\n    join: [10.0.0.1]\n    join_token: letmein\n", 7, "is not a swarm join token"),
        ("    roles: worker\n", 4, "unknown key `roles` in nimbus.swarm; did you mean `role`?"),
        ("    role: worker\n    advertise_addr: 10.0.0.2\n    join: [10.0.0.1]\n", 3, "needs `secret`"),
        ("    role: worker\n    advertise_addr: 10.0.0.2\n    join: [10.0.0.1]\n    secret: 00ff\n", 7, "nimbus.swarm.secret must be 64 hex digits"),
        ("    role: manager\n    init: true\n    advertise_addr: 10.0.0.2\n    managers: [h1, 'no way']\n", 7, "\"no way\" is not a host name"),
    ];
    for (body, line, frag) in cases {
        expect(&format!("{base}{body}"), *line, Severity::Error, frag);
    }
    expect(
        "#cloud-config\nnimbus:\n  hook_timeout: soon\n",
        3,
        Severity::Error,
        "nimbus.hook_timeout",
    );
}
