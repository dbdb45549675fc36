//! `cloud-config apply --root DIR`: golden file tree, idempotency, hostile
//! input, and the boot sources, through the real binary.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{bin, s};

/// A minimal Debian-like root: the account databases and a shipped unit.
fn base_root() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    fs::create_dir_all(r.join("etc")).unwrap();
    fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
    fs::write(
        r.join("etc/group"),
        "root:x:0:\nsudo:x:27:\nusers:x:100:\ndocker:x:998:\nsystemd-journal:x:999:\n",
    )
    .unwrap();
    fs::write(r.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
    fs::create_dir_all(r.join("usr/lib/systemd/system")).unwrap();
    fs::write(
        r.join("usr/lib/systemd/system/etcd.service"),
        "[Service]\nExecStart=/usr/bin/etcd\n[Install]\nWantedBy=multi-user.target\n",
    )
    .unwrap();
    d
}

/// Every entry under `root`: type, mode, owner, and content or link target.
fn listing(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut ents: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        ents.sort();
        for p in ents {
            let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
            let m = fs::symlink_metadata(&p).unwrap();
            let own = format!("{}:{}", m.uid(), m.gid());
            if m.file_type().is_symlink() {
                out.insert(
                    rel,
                    format!("link -> {}", fs::read_link(&p).unwrap().display()),
                );
            } else if m.is_dir() {
                out.insert(
                    rel,
                    format!("dir {:o} {own}", m.permissions().mode() & 0o7777),
                );
                walk(root, &p, out);
            } else {
                let body = fs::read(&p).unwrap();
                out.insert(
                    rel,
                    format!(
                        "file {:o} {own} {:?}",
                        m.permissions().mode() & 0o7777,
                        String::from_utf8_lossy(&body)
                    ),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

const FULL: &str = r#"#cloud-config
hostname: node1
manage_etc_hosts: localhost
ssh_authorized_keys:
  - ssh-ed25519 AAAAC3Nza core@laptop
users:
  - name: alice
    passwd: $6$abc$def
    groups: [sudo]
    ssh_authorized_keys: [ssh-rsa AAAAB3 alice@laptop]
write_files:
  - path: /etc/motd
    content: "welcome\n"
  - path: /etc/app/secret
    owner: alice:users
    permissions: "0600"
    encoding: gz+b64
    content: H4sIAAAAAAAAA8tIzcnJ5wIAIDA6NgYAAAA=
coreos:
  update:
    reboot_strategy: etcd-lock
    group: beta
    server: https://updates.example.com/nimbus
  locksmith:
    window_start: Thu 04:00
    window_length: 1h30m
    endpoint: http://10.0.0.1:2379
  etcd2:
    name: node1
    initial-cluster: "node1=http://10.0.0.1:2380"
  oem:
    id: qemu
  units:
    - name: hello.service
      command: start
      enable: true
      content: |
        [Service]
        ExecStart=/bin/echo hello
        [Install]
        WantedBy=multi-user.target
      drop_ins:
        - name: 10-env.conf
          content: |
            [Service]
            Environment=GREETING=hi
    - name: etcd.service
      enable: true
    - name: docker.service
      mask: true
    - name: tmp.service
      runtime: true
      content: |
        [Service]
        ExecStart=/bin/true
    - name: 10-eth0.network
      content: |
        [Match]
        Name=eth0
        [Network]
        DHCP=yes
"#;

fn golden() -> Vec<(&'static str, String)> {
    vec![
        ("/etc/app", "dir 755 0:0".into()),
        ("/etc/app/secret", "file 600 1000:100 \"hello\\n\"".into()),
        ("/etc/group", format!("file 644 0:0 {:?}", "root:x:0:\nsudo:x:27:alice,core\nusers:x:100:\ndocker:x:998:core\nsystemd-journal:x:999:core\nalice:x:1000:\ncore:x:1001:\n")),
        ("/etc/hostname", "file 644 0:0 \"node1\\n\"".into()),
        ("/etc/hosts", format!("file 644 0:0 {:?}", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tnode1\n")),
        ("/etc/motd", "file 644 0:0 \"welcome\\n\"".into()),
        ("/etc/nimbus", "dir 755 0:0".into()),
        ("/etc/nimbus/update.conf", format!("file 644 0:0 {:?}", "ETCD_ENDPOINTS=http://10.0.0.1:2379\nGROUP=beta\nREBOOT_STRATEGY=etcd-lock\nREBOOT_WINDOW_LENGTH=1h30m\nREBOOT_WINDOW_START=\"Thu 04:00\"\nSERVER=https://updates.example.com/nimbus\n")),
        ("/etc/oem-release", "file 644 0:0 \"ID=\\\"qemu\\\"\\n\"".into()),
        ("/etc/passwd", format!("file 644 0:0 {:?}", "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/bash\ncore:x:1001:1001::/home/core:/bin/bash\n")),
        ("/etc/shadow", format!("file 640 0:0 {:?}", "root:*:19000:0:99999:7:::\nalice:$6$abc$def:20000:0:99999:7:::\ncore:*:20000:0:99999:7:::\n")),
        ("/etc/systemd", "dir 755 0:0".into()),
        ("/etc/systemd/network", "dir 755 0:0".into()),
        ("/etc/systemd/network/10-eth0.network", "file 644 0:0 \"[Match]\\nName=eth0\\n[Network]\\nDHCP=yes\\n\"".into()),
        ("/etc/systemd/system", "dir 755 0:0".into()),
        ("/etc/systemd/system/docker.service", "link -> /dev/null".into()),
        ("/etc/systemd/system/hello.service", "file 644 0:0 \"[Service]\\nExecStart=/bin/echo hello\\n[Install]\\nWantedBy=multi-user.target\\n\"".into()),
        ("/etc/systemd/system/hello.service.d", "dir 755 0:0".into()),
        ("/etc/systemd/system/hello.service.d/10-env.conf", "file 644 0:0 \"[Service]\\nEnvironment=GREETING=hi\\n\"".into()),
        ("/etc/systemd/system/multi-user.target.wants", "dir 755 0:0".into()),
        ("/etc/systemd/system/multi-user.target.wants/etcd.service", "link -> /usr/lib/systemd/system/etcd.service".into()),
        ("/etc/systemd/system/multi-user.target.wants/hello.service", "link -> /etc/systemd/system/hello.service".into()),
        ("/home", "dir 755 0:0".into()),
        ("/home/alice", "dir 700 1000:1000".into()),
        ("/home/alice/.ssh", "dir 700 1000:1000".into()),
        ("/home/alice/.ssh/authorized_keys", "file 600 1000:1000 \"# cloud-config\\nssh-rsa AAAAB3 alice@laptop\\n\"".into()),
        ("/home/alice/.ssh/authorized_keys.d", "dir 700 1000:1000".into()),
        ("/home/alice/.ssh/authorized_keys.d/cloud-config", "file 600 1000:1000 \"ssh-rsa AAAAB3 alice@laptop\\n\"".into()),
        ("/home/alice/.ssh/authorized_keys.d/.generated", "file 600 1000:1000 \"# cloud-config\\nssh-rsa AAAAB3 alice@laptop\\n\"".into()),
        ("/home/core", "dir 700 1001:1001".into()),
        ("/home/core/.ssh", "dir 700 1001:1001".into()),
        ("/home/core/.ssh/authorized_keys", "file 600 1001:1001 \"# cloud-config\\nssh-ed25519 AAAAC3Nza core@laptop\\n\"".into()),
        ("/home/core/.ssh/authorized_keys.d", "dir 700 1001:1001".into()),
        ("/home/core/.ssh/authorized_keys.d/cloud-config", "file 600 1001:1001 \"ssh-ed25519 AAAAC3Nza core@laptop\\n\"".into()),
        ("/home/core/.ssh/authorized_keys.d/.generated", "file 600 1001:1001 \"# cloud-config\\nssh-ed25519 AAAAC3Nza core@laptop\\n\"".into()),
        ("/run", "dir 755 0:0".into()),
        ("/run/systemd", "dir 755 0:0".into()),
        ("/run/systemd/system", "dir 755 0:0".into()),
        ("/run/systemd/system/etcd.service.d", "dir 755 0:0".into()),
        ("/run/systemd/system/etcd.service.d/20-cloudinit.conf", format!("file 644 0:0 {:?}", "[Service]\nEnvironment=\"ETCD_NAME=node1\"\nEnvironment=\"ETCD_INITIAL_CLUSTER=node1=http://10.0.0.1:2380\"\n")),
        // coreos.etcd2 is configured: etcd is wanted for this boot.
        ("/run/systemd/system/multi-user.target.wants", "dir 755 0:0".into()),
        ("/run/systemd/system/multi-user.target.wants/etcd.service", "link -> /usr/lib/systemd/system/etcd.service".into()),
        ("/run/systemd/system/tmp.service", "file 644 0:0 \"[Service]\\nExecStart=/bin/true\\n\"".into()),
    ]
}

fn apply(root: &Path, doc: &str) -> Output {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(doc.as_bytes()).unwrap();
    Command::new(env!("CARGO_BIN_EXE_cloud-config"))
        .args(["apply", "--root", s(root), s(f.path())])
        .env("SOURCE_DATE_EPOCH", "1728000000") // day 20000
        .output()
        .unwrap()
}

#[test]
fn golden_tree_and_idempotent() {
    let d = base_root();
    let root = d.path().join("root");
    fs::rename(d.path().join("etc"), d.path().join("etc.tmp")).unwrap();
    fs::create_dir(&root).unwrap();
    fs::rename(d.path().join("etc.tmp"), root.join("etc")).unwrap();
    fs::rename(d.path().join("usr"), root.join("usr")).unwrap();
    let before = listing(&root);

    let o = apply(&root, FULL);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout
            .contains("ran systemctl --no-block start hello.service (skipped: not a live system)")
            && stdout.contains(
                "ran systemctl start --no-block etcd.service (skipped: not a live system)"
            ),
        "{stdout}"
    );

    let after = listing(&root);
    let new: BTreeMap<String, String> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let want: BTreeMap<String, String> = golden()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    for (k, v) in &want {
        assert_eq!(new.get(k), Some(v), "golden mismatch at {k}");
    }
    for k in new.keys() {
        assert!(want.contains_key(k), "unexpected change at {k}: {}", new[k]);
    }

    // Applying again changes nothing.
    let o = apply(&root, FULL);
    assert!(o.status.success());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.lines().any(|l| l.starts_with("0 changed, ")),
        "{stdout}"
    );
    assert!(
        !stdout.contains("changed /"),
        "second apply changed files: {stdout}"
    );
    assert_eq!(listing(&root), after);
}

#[test]
fn errors_leave_the_root_untouched() {
    let d = base_root();
    let before = listing(d.path());
    let o = apply(
        d.path(),
        "#cloud-config\nhostname: ok\nwrite_files:\n  - path: /etc/x\n    permissions: 0999\n",
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 5: error: permissions"), "{err}");
    assert!(err.contains("not applied"), "{err}");
    assert_eq!(
        listing(d.path()),
        before,
        "nothing may be written when the document has errors"
    );
}

#[test]
fn symlink_out_of_the_root_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let d = base_root();
    // /etc/evil -> ../../<outside>: a relative link climbing out.
    let depth = d.path().components().count();
    let climb = "../".repeat(depth + 1);
    let target = format!(
        "{climb}{}",
        outside.path().display().to_string().trim_start_matches('/')
    );
    std::os::unix::fs::symlink(&target, d.path().join("etc/evil")).unwrap();
    let o = apply(
        d.path(),
        "#cloud-config\nwrite_files:\n  - path: /etc/evil/pwned\n    content: x\n",
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("outside the root"), "{err}");
    assert_eq!(
        fs::read_dir(outside.path()).unwrap().count(),
        0,
        "wrote outside the root"
    );

    // An absolute link is re-rooted, as in a chroot: the write lands inside.
    std::os::unix::fs::symlink(outside.path(), d.path().join("etc/abs")).unwrap();
    let o = apply(
        d.path(),
        "#cloud-config\nwrite_files:\n  - path: /etc/abs/file\n    content: x\n",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        fs::read_dir(outside.path()).unwrap().count(),
        0,
        "wrote outside the root"
    );
    let inside = d
        .path()
        .join(outside.path().strip_prefix("/").unwrap())
        .join("file");
    assert_eq!(fs::read(inside).unwrap(), b"x");
}

#[test]
fn hostile_documents_are_refused() {
    let d = base_root();
    let before = listing(d.path());
    let mut laughs =
        String::from("#cloud-config\na0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        laughs.push_str(&format!(
            "a{i}: &a{i} [{}]\n",
            vec![format!("*a{}", i - 1); 10].join(", ")
        ));
    }
    let deep = format!(
        "#cloud-config\nhostname: {}{}\n",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let dotdot =
        "#cloud-config\nwrite_files:\n  - path: /etc/../../tmp/x\n    content: x\n".to_string();
    for (doc, want) in [
        (laughs, "alias bomb"),
        (deep, "nesting deeper"),
        (dotdot, "`..`"),
    ] {
        let o = apply(d.path(), &doc);
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{want}: {err}");
    }
    // 100 MB of user-data: refused by size before it is read whole.
    let bigdir = tempfile::tempdir().unwrap();
    let big = bigdir.path().join("big");
    let f = fs::File::create(&big).unwrap();
    f.set_len(100 * 1024 * 1024).unwrap();
    drop(f);
    for cmd in ["validate", "apply"] {
        let mut args = vec![cmd];
        if cmd == "apply" {
            args.extend(["--root", s(d.path())]);
        }
        args.push(s(&big));
        let o = bin(&args);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("larger than"),
            "{cmd}"
        );
    }
    fs::remove_file(&big).unwrap();
    assert_eq!(listing(d.path()), before);
}

#[test]
fn validate_output_and_exit_codes() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("ud");
    fs::write(
        &f,
        "#cloud-config\nhostnme: a\ncoreos:\n  etcd:\n    name: x\n",
    )
    .unwrap();
    let o = bin(&["validate", s(&f)]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "line 2: error: unknown key `hostnme` in top level; did you mean `hostname`?",
            "line 4: warning: coreos.etcd configures etcd 0.4 and is deprecated; use coreos.etcd2 (Nimbus runs etcd 3 from Debian as etcd.service)",
        ]
    );
    let o = bin(&["validate", "--json", s(&f)]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["problems"][0]["line"], 2);
    assert_eq!(v["problems"][1]["severity"], "warning");

    fs::write(&f, "#cloud-config\ncoreos:\n  etcd:\n    name: x\n").unwrap();
    assert_eq!(
        bin(&["validate", s(&f)]).status.code(),
        Some(0),
        "warnings alone pass"
    );
    assert_eq!(bin(&["validate", "/nonexistent/ud"]).status.code(), Some(1));
    assert_eq!(bin(&["validate"]).status.code(), Some(2));
    assert!(bin(&["--help"]).status.success());
}

#[test]
fn script_is_stored_for_a_transient_unit() {
    let d = base_root();
    let o = apply(d.path(), "#!/bin/sh\necho hi\n");
    assert!(o.status.success());
    let p = d.path().join("var/lib/nimbus/cloud-config/user-script");
    assert_eq!(fs::read(&p).unwrap(), b"#!/bin/sh\necho hi\n");
    assert_eq!(
        fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("systemd-run --unit=cloud-config-script-"));
}

#[test]
fn enabling_a_unit_without_install_section_is_an_error() {
    let d = base_root();
    let o = apply(d.path(), "#cloud-config\ncoreos:\n  units:\n    - name: x.service\n      enable: true\n      content: \"[Service]\\nExecStart=/bin/true\\n\"\n");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no WantedBy"));
    assert!(
        d.path().join("etc/systemd/system/x.service").exists(),
        "the rest was still applied"
    );
}

/// One HTTP response per connection, on loopback.
fn serve_once(body: &'static str) -> (String, std::thread::JoinHandle<String>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/user-data", l.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut req = [0u8; 2048];
        let n = c.read(&mut req).unwrap();
        write!(
            c,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        String::from_utf8_lossy(&req[..n]).into_owned()
    });
    (url, h)
}

#[test]
fn boot_applies_every_source_in_order() {
    let d = base_root();
    let src = tempfile::tempdir().unwrap();
    let oem = src.path().join("oem");
    fs::create_dir(&oem).unwrap();
    fs::write(oem.join("user-data"), "#cloud-config\nhostname: from-oem\nwrite_files:\n  - path: /etc/oem-seen\n    content: yes\n").unwrap();
    let fwcfg = src.path().join("fwcfg-raw");
    fs::write(
        &fwcfg,
        "#cloud-config\nwrite_files:\n  - path: /etc/fwcfg-seen\n    content: yes\n",
    )
    .unwrap();
    let drive = src.path().join("drive");
    fs::create_dir_all(drive.join("openstack/latest")).unwrap();
    fs::write(
        drive.join("openstack/latest/user_data"),
        "#cloud-config\nhostname: from-drive\n",
    )
    .unwrap();
    let (url, server) =
        serve_once("#cloud-config\nwrite_files:\n  - path: /etc/url-seen\n    content: yes\n");
    let cmdline = src.path().join("cmdline");
    fs::write(
        &cmdline,
        format!("console=ttyS0 cloud-config-url={url} quiet\n"),
    )
    .unwrap();

    let o = bin(&[
        "boot",
        "--root",
        s(d.path()),
        "--oem-dir",
        s(&oem),
        "--fw-cfg",
        s(&fwcfg),
        "--config-drive",
        s(&drive),
        "--cmdline",
        s(&cmdline),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let req = server.join().unwrap();
    assert!(req.starts_with("GET /user-data HTTP/1.1"), "{req}");
    for f in ["oem-seen", "fwcfg-seen", "url-seen"] {
        assert!(d.path().join("etc").join(f).exists(), "{f}");
    }
    // The config-drive came after the OEM partition, so its hostname wins.
    assert_eq!(
        fs::read_to_string(d.path().join("etc/hostname")).unwrap(),
        "from-drive\n"
    );
}

#[test]
fn boot_with_a_bad_source_fails_loudly() {
    let d = base_root();
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("user-data"), "#cloud-config\nhostnam: x\n").unwrap();
    let none: PathBuf = src.path().join("none");
    let o = bin(&[
        "boot",
        "--root",
        s(d.path()),
        "--oem-dir",
        s(src.path()),
        "--fw-cfg",
        s(&none),
        "--config-drive",
        s(&none),
        "--cmdline",
        s(&none),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("oem: line 2: error: unknown key `hostnam`")
    );
}

/// A secret-holding update.conf keeps its mode when cloud-config rewrites it.
#[test]
fn update_conf_keeps_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    let d = base_root();
    let conf = d.path().join("etc/nimbus/update.conf");
    fs::create_dir_all(conf.parent().unwrap()).unwrap();
    fs::write(&conf, "ETCD_PASSWORD=hunter2\nGROUP=stable\n").unwrap();
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o600)).unwrap();
    let o = apply(
        d.path(),
        "#cloud-config\ncoreos:\n  update:\n    group: beta\n",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = fs::read_to_string(&conf).unwrap();
    assert!(
        text.contains("GROUP=beta") && text.contains("ETCD_PASSWORD=hunter2"),
        "{text}"
    );
    assert_eq!(
        fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// The local privilege escalation class: root applying user-data must not
/// follow, chown through or read through a symlink a user planted in a
/// directory the user owns.
#[test]
fn symlinks_planted_by_a_user_are_never_followed() {
    use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
    let d = base_root();
    let r = d.path();
    let doc = "#cloud-config\nssh_authorized_keys:\n  - ssh-ed25519 AAAA core@laptop\n";
    let o = apply(r, doc);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let home = r.join("home/core");
    let uid = fs::metadata(&home).unwrap().uid();
    assert_ne!(uid, 0);
    // Root-only things the user must not get.
    fs::create_dir_all(r.join("root/.ssh")).unwrap();
    fs::set_permissions(r.join("root/.ssh"), fs::Permissions::from_mode(0o700)).unwrap();
    let shadow_before = fs::read(r.join("etc/shadow")).unwrap();
    let plant = |link: &Path, target: &str| {
        let _ = fs::remove_file(link);
        let _ = fs::remove_dir_all(link);
        std::os::unix::fs::symlink(target, link).unwrap();
        lchown(link, Some(uid), Some(uid)).unwrap();
    };

    // 1. ~/.ssh pointed at root's: refused, root's directory not handed over.
    plant(&home.join(".ssh"), "/root/.ssh");
    let o = apply(r, doc);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("refusing"), "{err}");
    let m = fs::metadata(r.join("root/.ssh")).unwrap();
    assert_eq!(
        (m.uid(), m.mode() & 0o777),
        (0, 0o700),
        "root's .ssh was taken over"
    );
    assert_eq!(fs::read_dir(r.join("root/.ssh")).unwrap().count(), 0);

    // 2. A key file linked to /etc/shadow, and authorized_keys itself linked
    //    to it: never read into the user's file, shadow untouched.
    fs::remove_file(home.join(".ssh")).unwrap();
    let o = apply(r, doc);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    plant(&home.join(".ssh/authorized_keys.d/stolen"), "/etc/shadow");
    plant(&home.join(".ssh/authorized_keys"), "/etc/shadow");
    let o = apply(r, doc);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ak = home.join(".ssh/authorized_keys");
    assert!(!fs::symlink_metadata(&ak).unwrap().file_type().is_symlink());
    let text = fs::read_to_string(&ak).unwrap();
    assert!(
        !text.contains("root:"),
        "shadow read into authorized_keys: {text}"
    );
    assert!(text.contains("core@laptop"), "{text}");
    assert_eq!(fs::read(r.join("etc/shadow")).unwrap(), shadow_before);
    assert_eq!(fs::metadata(r.join("etc/shadow")).unwrap().uid(), 0);

    // 3. A directory on a write_files path, owned by the user, linked to /etc.
    plant(&home.join("notes"), "/etc");
    let o = apply(
        r,
        "#cloud-config\nwrite_files:\n  - path: /home/core/notes/sudoers.d-evil\n    content: x\n",
    );
    assert!(!o.status.success());
    assert!(
        !r.join("etc/sudoers.d-evil").exists(),
        "wrote through the user's symlink"
    );
}

#[test]
fn swarm_membership_and_hook_timeout_are_written() {
    use std::os::unix::fs::PermissionsExt;
    let d = base_root();
    let secret = "5a".repeat(32);
    let doc = format!("#cloud-config\nnimbus:\n  hook_timeout: 3m\n  swarm:\n    role: worker\n    advertise_addr: 10.10.0.13\n    join: [10.10.0.11:2377, 10.10.0.12:2377]\n    secret: {secret}\n    managers: [h1, h2]\n");
    let doc = doc.as_str();
    let o = apply(d.path(), doc);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("systemctl start --no-block nimbus-swarm.service (skipped"),
        "{out}"
    );
    let conf = d.path().join("etc/nimbus/swarm.conf");
    assert_eq!(
        fs::read_to_string(&conf).unwrap(),
        format!("# Written by cloud-config from nimbus.swarm; read by nimbus-swarm.\nROLE=worker\nINIT=no\nADVERTISE_ADDR=10.10.0.13\nJOIN=10.10.0.11:2377,10.10.0.12:2377\nSECRET={secret}\nMANAGERS=h1,h2\n")
    );
    assert_eq!(
        fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let uc = fs::read_to_string(d.path().join("etc/nimbus/update.conf")).unwrap();
    assert!(uc.contains("HOOK_TIMEOUT=3m"), "{uc}");
    // The same document again changes nothing and starts nothing.
    let o = apply(d.path(), doc);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("nimbus-swarm"), "{out}");
}
