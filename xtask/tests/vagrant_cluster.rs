//! The CoreOS tutorial on Nimbus, as a new user runs it: the repository's
//! `vagrant/Vagrantfile` with `$num_instances = 3`, one user-data for all
//! three made by `cargo xtask cluster-config --shared`, etcd formed by
//! etcd's discovery protocol against an etcd run on the Vagrant host
//! (`--enable-v2`, as discovery.etcd.io served it), under real
//! vagrant-libvirt in a network namespace of its own (SeaBIOS, TCG).
//!
//! Then: three ready swarm nodes and three etcd members seen from core-01;
//! the agent forwarded by `vagrant ssh core-01 -- -A`; changed user-data
//! applied again by `vagrant provision`; a user-data that does not validate
//! refused by the provisioner with the node's own kept; `vagrant destroy
//! -f` leaving no domain, volume or network behind.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nimbus_testkit::libvirt::{ok, run, Libvirt, Scratch};

const NODES: usize = 3;
/// The Vagrantfile's private network (config.rb.sample's default): node i
/// at .100+i, the host at .1.
const PREFIX: &str = "172.17.8.";
/// The discovery etcd's client port on the host (etcd 0.4's, as the
/// tutorial's discovery URL had it).
const DISCOVERY_PORT: u16 = 4001;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A child process killed on drop.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Poll `f` every 5 s until it returns Some, for at most `limit`; the
/// panic names `what` and the last thing `f` saw.
fn until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let t = Instant::now();
    loop {
        match f() {
            Ok(v) => {
                eprintln!("{what}: {:.0} s", t.elapsed().as_secs_f64());
                return v;
            }
            Err(_) if t.elapsed() < limit => std::thread::sleep(Duration::from_secs(5)),
            Err(last) => panic!("{what}: not after {} s; last: {last}", limit.as_secs()),
        }
    }
}

#[test]
#[ignore = "vm tier: cargo xtask vmtest"]
fn three_nodes_from_one_vagrantfile_form_etcd_and_a_swarm() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sc = Scratch::new(
        env!("CARGO_BIN_EXE_xtask"),
        env!("CARGO_TARGET_TMPDIR"),
        "vagrant-cluster",
        "1.0.0",
    );
    let (tmp, boxfile, home, project) = (&sc.tmp, &sc.boxfile, &sc.home, &sc.project);
    // The repository's files, as a user copies them.
    std::fs::copy(
        repo.join("vagrant/Vagrantfile"),
        project.join("Vagrantfile"),
    )
    .unwrap();
    let sample = std::fs::read_to_string(repo.join("vagrant/config.rb.sample")).unwrap();
    assert!(sample.contains("$num_instances = 3"), "{sample}");
    // These machines' /dev/kvm opens but runs no guest: emulation.
    std::fs::write(
        project.join("config.rb"),
        format!("{sample}\n$libvirt_driver = \"qemu\"\n"),
    )
    .unwrap();

    let lv = Libvirt::start("vagrant-cluster");
    // The discovery service: an etcd on the host, in the namespace, on
    // every address (the private network's bridge comes up only with the
    // first `vagrant up`).
    let disco_dir = tmp.path().join("discovery");
    let _discovery = Killed(
        lv.exec("etcd")
            .args([
                "--name",
                "discovery",
                "--enable-v2",
                "--data-dir",
                s(&disco_dir),
                "--listen-client-urls",
                &format!("http://0.0.0.0:{DISCOVERY_PORT}"),
                "--advertise-client-urls",
                &format!("http://{PREFIX}1:{DISCOVERY_PORT}"),
                "--listen-peer-urls",
                "http://127.0.0.1:14002",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:14002",
                "--initial-cluster",
                "discovery=http://127.0.0.1:14002",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(tmp.path().join("discovery.log")).unwrap(),
            ))
            .spawn()
            .unwrap(),
    );
    let token = format!("nimbus-{}", std::process::id());
    until(
        "discovery etcd up, size set",
        Duration::from_secs(60),
        || {
            let o = run(lv.exec("curl").args([
                "-sSf",
                "-X",
                "PUT",
                &format!(
                    "http://127.0.0.1:{DISCOVERY_PORT}/v2/keys/discovery/{token}/_config/size"
                ),
                "-d",
                &format!("value={NODES}"),
            ]));
            o.status
                .success()
                .then_some(())
                .ok_or_else(|| String::from_utf8_lossy(&o.stderr).into_owned())
        },
    );

    // One user-data for every node.
    let hosts: Vec<String> = (1..=NODES)
        .map(|i| format!("core-{i:02}={PREFIX}{}", 100 + i))
        .collect();
    let cluster = tmp.path().join("cluster");
    let made = ok(Command::new(env!("CARGO_BIN_EXE_xtask")).args([
        "cluster-config",
        "--shared",
        "--hosts",
        &hosts.join(","),
        "--discovery",
        &format!("http://{PREFIX}1:{DISCOVERY_PORT}/v2/keys/discovery/{token}"),
        "--out",
        s(&cluster),
    ]));
    assert!(made.contains("one user-data for 3 host(s)"), "{made}");
    std::fs::copy(cluster.join("user-data"), project.join("user-data")).unwrap();

    let vp = lv.project(project, home);
    let vagrant = |args: &[&str]| vp.vagrant(args);
    ok(&mut vagrant(&[
        "box",
        "add",
        "--name",
        "nimbus-stable",
        s(boxfile),
    ]));

    let before = lv.holdings();
    let t = Instant::now();
    let up = ok(&mut vagrant(&["up", "--provider", "libvirt"]));
    eprintln!("vagrant up (3 nodes): {:.0} s", t.elapsed().as_secs_f64());
    assert!(
        up.matches("user-data installed").count() == NODES,
        "each node's user-data installed once:\n{up}"
    );
    let on = |node: &str, cmd: &str| -> (bool, String) {
        let o = run(&mut vagrant(&["ssh", node, "-c", cmd]));
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };

    // Vagrant's CoreOS guest wrote the private address; cloud-config put
    // it in for $private_ipv4.
    let (_, env) = on("core-02", "cat /etc/environment");
    assert!(
        env.contains(&format!("COREOS_PRIVATE_IPV4={PREFIX}102")),
        "{env}"
    );

    let nodes = until("docker node ls: 3 ready", Duration::from_secs(1200), || {
        let (good, out) = on(
            "core-01",
            "docker node ls --format '{{.Hostname}} {{.Status}} {{.ManagerStatus}}'",
        );
        let ready = out.lines().filter(|l| l.contains(" Ready")).count();
        if good && ready == NODES {
            Ok(out)
        } else {
            Err(out)
        }
    });
    for i in 1..=NODES {
        assert!(nodes.contains(&format!("core-{i:02} Ready")), "{nodes}");
    }
    let members = until("etcdctl member list: 3", Duration::from_secs(300), || {
        let (good, out) = on("core-01", "sudo -i etcdctl member list");
        if good && out.lines().filter(|l| l.contains("started")).count() == NODES {
            Ok(out)
        } else {
            Err(out)
        }
    });
    for i in 1..=NODES {
        assert!(
            members.contains(&format!("core-{i:02}, https://{PREFIX}{}:2380", 100 + i)),
            "{members}"
        );
    }
    // The discovery service saw exactly the three.
    let reg = ok(lv.exec("curl").args([
        "-sSf",
        &format!("http://127.0.0.1:{DISCOVERY_PORT}/v2/keys/discovery/{token}"),
    ]));
    let v: serde_json::Value = serde_json::from_str(&reg).unwrap();
    let registered = v["node"]["nodes"]
        .as_array()
        .map(|n| {
            n.iter()
                .filter(|m| !m["key"].as_str().unwrap_or("").ends_with("/_config"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(registered, NODES, "{reg}");

    // `vagrant ssh core-01 -- -A`: the host's agent answers on the node.
    let agent_dir = tmp.path().join("agent");
    std::fs::create_dir(&agent_dir).unwrap();
    let sock = agent_dir.join("sock");
    let _agent = Killed(
        Command::new("ssh-agent")
            .args(["-D", "-a", s(&sock)])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let key = agent_dir.join("id");
    ok(Command::new("ssh-keygen").args([
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "forwarded-key",
        "-f",
        s(&key),
    ]));
    until("ssh-agent up", Duration::from_secs(30), || {
        if sock.exists() {
            Ok(())
        } else {
            Err("no socket".into())
        }
    });
    ok(Command::new("ssh-add")
        .arg(s(&key))
        .env("SSH_AUTH_SOCK", &sock));
    let fwd =
        ok(vagrant(&["ssh", "core-01", "--", "-A", "ssh-add", "-l"]).env("SSH_AUTH_SOCK", &sock));
    assert!(fwd.contains("forwarded-key"), "agent not forwarded: {fwd}");

    // `vagrant provision` applies a changed user-data again.
    let ud = std::fs::read_to_string(project.join("user-data")).unwrap();
    let changed = ud.replacen(
        "write_files:\n",
        "write_files:\n  - path: /etc/nimbus-provisioned\n    permissions: '0644'\n    content: |\n      round two at $private_ipv4\n",
        1,
    );
    assert_ne!(changed, ud);
    std::fs::write(project.join("user-data"), &changed).unwrap();
    ok(&mut vagrant(&["provision", "core-02"]));
    until(
        "re-provisioned user-data applied",
        Duration::from_secs(180),
        || {
            let (good, out) = on("core-02", "cat /etc/nimbus-provisioned");
            if good && out.contains(&format!("round two at {PREFIX}102")) {
                Ok(())
            } else {
                Err(out)
            }
        },
    );
    // A document that does not validate is refused by the provisioner;
    // the node keeps applying the one it had.
    std::fs::write(
        project.join("user-data"),
        format!("{changed}coreos:\n  etcd2:\n    no-such-key: 1\n"),
    )
    .unwrap();
    let o = run(&mut vagrant(&["provision", "core-02"]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "{text}");
    assert!(text.contains("the user-data was not installed"), "{text}");
    let (_, kept) = on(
        "core-02",
        "sudo cat /var/lib/coreos-vagrant/vagrantfile-user-data",
    );
    assert!(
        kept.contains("/etc/nimbus-provisioned") && !kept.contains("no-such-key"),
        "{kept}"
    );

    let t = Instant::now();
    ok(&mut vagrant(&["destroy", "-f"]));
    eprintln!("vagrant destroy: {:.0} s", t.elapsed().as_secs_f64());
    let status = ok(&mut vagrant(&["status"]));
    assert_eq!(status.matches("not created").count(), NODES, "{status}");
    // vagrant-libvirt's management network may go with the last domain;
    // nothing else may stay that the `up` made.
    let left: Vec<String> = lv
        .holdings()
        .into_iter()
        .filter(|h| !before.contains(h) && h != "network vagrant-libvirt")
        .collect();
    assert!(
        left.is_empty(),
        "vagrant destroy left: {left:?} (before up: {before:?})"
    );
    let _ = run(&mut vagrant(&["box", "remove", "-f", "nimbus-stable"]));
}
