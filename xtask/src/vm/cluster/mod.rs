//! `cargo xtask cluster`: the CoreOS promise, measured. N hosts (QEMU TCG,
//! SeaBIOS + GRUB) boot one image, each given its own user-data through
//! fw_cfg; cloud-config alone forms an etcd cluster (`coreos.etcd2`) and a
//! Docker swarm (`nimbus.swarm`) over a virtual network that exists only on
//! this machine (a second NIC per VM, QEMU's UDP socket backend, and a
//! switch in this process). A replicated HTTP service (3 replicas of an
//! image built here from Debian's static busybox, placed on the OEM
//! partition and `docker load`ed at boot: nothing is pulled) runs on the swarm. N+1 is published; every
//! host updates itself with REBOOT_STRATEGY=etcd-lock (semaphore 1),
//! draining itself from the swarm before its reboot and rejoining after.
//!
//! A probe thread asks, every second and through every host, for an etcd
//! write and a linearizable read, and for the service's page. A second
//! counts as unavailable for etcd when no member served both, for the
//! service when no host answered; a host whose own probes all fail counts
//! as rebooting.
//!
//! Before the update, with the swarm formed: what the cluster keeps to
//! itself (`secrets.rs`, the `cluster-secrets:` line) and what a stranger
//! on the hosts' network and a container get (`intruder.rs`, the
//! `intruder:` line). The hosts' user-data is `cargo xtask
//! cluster-config`'s: etcd on TLS with client certificates.
//!
//! With `--faults`, three fault scenarios run on the same cluster, each
//! printing its own line (the test suite asserts each one):
//! - `drain-timeout`: before N+1 is published a service that cannot leave
//!   any host (one replica per node, one per host) is started; the first
//!   host to hold the lock cannot drain, its hook is stopped at
//!   HOOK_TIMEOUT, the status says why, the host is active again and the
//!   lock free; then that service is removed.
//! - `kill-holder`: the next host to hold the lock is killed (QEMU quit)
//!   once drained; the lock stays with it, the service with the others;
//!   started again, it boots N+1, reactivates and releases, and the rolling
//!   update finishes (the main line's figures include all of this).
//! - `bad-health`: N+2, whose health check fails, is published; the first
//!   host to reboot into it falls back by itself, is reactivated and
//!   releases the lock.

mod faults;
mod host;
mod intruder;
mod look;
mod probe;
mod secrets;

use crate::httpd;
use crate::vm::e2e;
use crate::vm::e2e::Ssh;
use anyhow::{bail, Context};
use faults::{fault_bad_health, fault_drain_timeout, fault_kill_holder, gathered_drain};
pub(crate) use host::web_image;
use host::{free_port, members, name, switch, user_data, Host};
use look::{
    all_healthy, boots, etcd_members, fmt_nodes, lock_holders, lock_ids, mem_used_mib, node_ls,
    probe_targets, wait_converged, wait_for, LockKind,
};
use probe::{http, probe_web, Probe, Tally};
use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Each drain and reactivation may take this long (update.conf HOOK_TIMEOUT):
/// on a slow 2-core machine a container has taken over 60 s to start, and a
/// drain cut short there only hands its tasks to the next host to drain.
const HOOK_TIMEOUT_S: u64 = 90;

const WEB_PORT: u16 = 8080;

const IMAGE_TAG: &str = "nimbus/web:1";

#[derive(clap::Args, Clone)]
pub struct ClusterArgs {
    /// How many hosts (3 or more keeps etcd's quorum while one reboots).
    #[arg(long, default_value_t = 3)]
    pub hosts: usize,
    /// Keep target/nimbus/cluster afterwards (images, consoles, repo).
    #[arg(long)]
    pub keep: bool,
    /// After the rolling update, run the fault scenarios on the same cluster.
    #[arg(long)]
    pub faults: bool,
    /// Guest memory per host, MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    /// Give up after this many minutes in all: every wait is cut to what
    /// is left, and past it (plus a minute's grace) the guests are killed
    /// and the command exits 1 with its diagnostics so far.
    #[arg(long, default_value_t = 40)]
    pub deadline_minutes: u64,
    /// The reboot lock: locksmith's etcd semaphore (REBOOT_STRATEGY=etcd-lock),
    /// or FleetLock against nimbus-fleetlock, which the harness runs on
    /// the hosts' etcd (REBOOT_STRATEGY=fleetlock).
    #[arg(long, value_enum, default_value_t = LockKind::Etcd)]
    pub lock: LockKind,
}

/// When the whole run must be over (`--deadline-minutes`).
static DEADLINE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn remaining() -> Duration {
    DEADLINE
        .get()
        .map(|d| d.saturating_duration_since(Instant::now()))
        .unwrap_or(Duration::MAX)
}

pub fn run(a: ClusterArgs) -> anyhow::Result<ExitCode> {
    look::set_lock_kind(a.lock);
    if a.hosts < 3 {
        bail!(
            "--hosts {}: at least 3 (etcd and the swarm managers keep quorum while one reboots)",
            a.hosts
        );
    }
    let root = crate::build_image::workspace_root();
    let work = root.join("target/nimbus/cluster");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let limit = Duration::from_secs(a.deadline_minutes.saturating_mul(60));
    let _ = DEADLINE.set(Instant::now() + limit);
    // The backstop: a step stuck outside any wait (a hung call with no
    // bound of its own) still ends the run. QEMU children are killed
    // first so no guest outlives the command.
    let minutes = a.deadline_minutes;
    std::thread::spawn(move || {
        std::thread::sleep(limit + Duration::from_secs(60));
        eprintln!("cluster: failed: the overall deadline of {minutes} min passed (plus 60 s of grace); killing the guests");
        let _ = Command::new("pkill")
            .args(["-KILL", "-P", &std::process::id().to_string()])
            .status();
        std::process::exit(1);
    });
    let r = story(&a, &work);
    if let Err(e) = &r {
        for i in 0..a.hosts {
            let log = work.join(name(i)).join("console.log");
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "--- {} console ({}), last lines:\n{}",
                name(i),
                log.display(),
                lines[lines.len().saturating_sub(25)..].join("\n")
            );
        }
        for i in 0..a.hosts {
            let said = std::fs::read_to_string(work.join(name(i)).join("diagnostics.txt"))
                .unwrap_or_else(|_| "(none: the host was not asked)".into());
            eprintln!("--- {} diagnostics ---\n{said}", name(i));
        }
        eprintln!("cluster: failed: {e:#}");
    }
    r?;
    if !a.keep {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(ExitCode::SUCCESS)
}

fn step(t0: &Instant, what: &str) {
    eprintln!("cluster: [{:6.1} s] {what}", t0.elapsed().as_secs_f64());
}

fn story(a: &ClusterArgs, work: &Path) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let n_hosts = a.hosts;
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the repository server")?;
    let repo_port = listener.local_addr()?.port();
    let key = work.join("id_ed25519");
    let st = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "nimbus-cluster",
            "-f",
        ])
        .arg(&key)
        .status()
        .context("ssh-keygen (openssh-client)")?;
    if !st.success() {
        bail!("ssh-keygen failed ({st})");
    }
    let pubkey = std::fs::read_to_string(key.with_extension("pub"))?;
    let image = web_image(work)?;

    // The web image rides on the OEM partition (/oem/web.tar), like a
    // platform's agents on Flatcar's: user-data through fw_cfg is read a
    // byte at a time and a megabyte there costs half a minute of boot.
    let (n, opts) = e2e::build(
        work,
        "1.0.0",
        &["--oem-file", image.to_str().context("utf8")?],
    )?;
    step(&t0, "built N (1.0.0)");
    let (n1, _) = e2e::build(work, "1.1.0", &[])?;
    step(&t0, "built N+1 (1.1.0)");
    let broken = if a.faults {
        // Its health check fails through the user-data's canary unit.
        let (b, _) = e2e::build(work, crate::vm::smoke::BROKEN_VERSION, &[])?;
        step(&t0, "built N+2 (1.2.0, fails its health check)");
        Some(b)
    } else {
        None
    };
    let repo = work.join("repo");
    let rkey = nimbus::keys::ReleaseKey::load_dir(&opts.key_dirs[0])?;
    let publish = |from: &Path| {
        nimbus_image::release::publish(&nimbus_image::release::PublishOptions::simple(
            from,
            &repo,
            "stable",
            &[&rkey],
        ))
    };
    // N is on the channel from the start: hosts check and find nothing new.
    publish(&n)?;
    let _srv = httpd::Httpd::start_on(listener, &repo);
    step(
        &t0,
        &format!("published 1.0.0; repository on 127.0.0.1:{repo_port}"),
    );

    // The operator's material, as `cargo xtask cluster-config` makes it.
    let members = members(n_hosts);
    let pki = crate::cluster_config::make_pki(&members, 30, false)?;
    probe::use_tls(&pki)?;
    let mut hosts = Vec::new();
    let mut locals = Vec::new();
    // FleetLock: the server's port is chosen now, for the user-data; it
    // starts once the hosts' etcd ports are known.
    let fleetlock_port = match a.lock {
        LockKind::Fleetlock => Some(free_port()?),
        LockKind::Etcd => None,
    };
    // The guests reach this machine's loopback as 10.0.2.2 (QEMU's user
    // network), like the repository server.
    let fleetlock_url = fleetlock_port.map(|p| format!("http://10.0.2.2:{p}"));
    for i in 0..n_hosts {
        let dir = work.join(name(i));
        std::fs::create_dir_all(&dir)?;
        let disk = dir.join("disk.raw");
        let st = Command::new("cp")
            .arg("--sparse=always")
            .arg(n.join("nimbus.raw"))
            .arg(&disk)
            .status()?;
        if !st.success() {
            bail!("cp {}", disk.display());
        }
        let ud = dir.join("user-data");
        std::fs::write(
            &ud,
            user_data(
                &members,
                i,
                &pki,
                repo_port,
                pubkey.trim(),
                fleetlock_url.as_deref(),
            )?,
        )?;
        let local = UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        locals.push(local);
        hosts.push(Host {
            name: name(i),
            disk,
            user_data: ud,
            console: dir.join("console.log"),
            // The harness asks every host something every few seconds.
            ssh: Ssh::multiplexed(free_port()?, key.clone(), dir.join("ssh.sock")),
            etcd_port: free_port()?,
            web_port: free_port()?,
            switch_local: local,
            switch_port: 0,
            lock_id: String::new(),
            vm: None,
        });
    }
    let _fleetlock = match fleetlock_port {
        Some(port) => Some(start_fleetlock(work, port, &pki, &hosts)?),
        None => None,
    };
    // A stranger on the hosts' network: one more port on the switch.
    let stranger = intruder::Intruder::new()?;
    locals.push(stranger.local);
    let stop = Arc::new(AtomicBool::new(false));
    let sw = switch(locals, stop.clone())?;
    stranger.wire(sw, stop.clone())?;
    for h in hosts.iter_mut() {
        h.spawn(sw, a.memory)?;
    }
    step(
        &t0,
        &format!("{n_hosts} hosts started (switch on udp 127.0.0.1:{sw})"),
    );
    let outsiders = Outsiders {
        pki: &pki,
        stranger: &stranger,
    };
    let r = cluster_life(
        a,
        &mut hosts,
        &outsiders,
        &publish,
        &n1,
        broken.as_deref(),
        &t0,
    );
    if r.is_err() {
        // What each host says of itself, before the VMs go.
        for h in &hosts {
            let said = h
                .ssh
                .run(DIAGNOSE)
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_else(|e| format!("(no answer: {e})"));
            // run() prints it after the consoles, where a test's tail sees it.
            let _ = std::fs::write(h.disk.with_file_name("diagnostics.txt"), &said);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in hosts.iter_mut() {
        h.kill();
    }
    r
}

/// nimbus-fleetlock, in this process, as an operator would run it beside
/// the cluster: airlock's semaphore in the hosts' etcd, reached through
/// their forwarded client ports with the operator's certificate.
fn start_fleetlock(
    work: &Path,
    port: u16,
    pki: &crate::cluster_config::Pki,
    hosts: &[Host],
) -> anyhow::Result<FleetlockServer> {
    let dir = work.join("fleetlock");
    std::fs::create_dir_all(&dir)?;
    let ca = dir.join("ca.pem");
    let cert = dir.join("admin.pem");
    let key = dir.join("admin-key.pem");
    std::fs::write(&ca, &pki.ca.cert)?;
    std::fs::write(&cert, &pki.admin.cert)?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .with_context(|| key.display().to_string())?;
        f.write_all(pki.admin.key.as_bytes())?;
    }
    let endpoints: Vec<String> = hosts.iter().map(|h| format!("\"{}\"", h.etcd())).collect();
    let text = format!(
        "[service]\naddress = \"127.0.0.1\"\nport = {port}\n\n[etcd3]\nendpoints = [{}]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n[lock]\ndefault_group_name = \"{}\"\ndefault_slots = 1\n",
        endpoints.join(", "),
        ca.display(),
        cert.display(),
        key.display(),
        nimbus::fleetlock::DEFAULT_GROUP,
    );
    let cfg = nimbus_fleetlock::config::Config::parse(&text)
        .map_err(|e| anyhow::anyhow!("nimbus-fleetlock's configuration: {e}"))?;
    let h = nimbus_fleetlock::http::start(&cfg)
        .map_err(|e| anyhow::anyhow!("nimbus-fleetlock: {e}"))?;
    eprintln!("cluster: nimbus-fleetlock on {}", h.addr);
    Ok(FleetlockServer(Some(h)))
}

/// Stops the server when the run ends.
struct FleetlockServer(Option<nimbus_fleetlock::http::Handle>);

impl Drop for FleetlockServer {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.stop();
        }
    }
}

/// What a host says of itself when the run fails: each daemon's own
/// journal (one shared tail would be all etcd chatter), what systemd still
/// waits on, what failed.
const DIAGNOSE: &str = "updatectl status; systemctl list-jobs --no-pager; systemctl --failed --no-pager; \
    for u in etcd nimbus-swarm update-engine docker; do echo \"== $u\"; journalctl -b --no-pager -o short-monotonic -n 25 -u $u; done";

type Publish<'a> = &'a dyn Fn(&Path) -> Result<nimbus::release::Manifest, nimbus_image::ImageError>;

/// Who stands outside the hosts: the operator (the CA and its client
/// identity) and the stranger on their network.
struct Outsiders<'a> {
    pki: &'a crate::cluster_config::Pki,
    stranger: &'a intruder::Intruder,
}

fn cluster_life(
    a: &ClusterArgs,
    hosts: &mut [Host],
    out: &Outsiders<'_>,
    publish: Publish<'_>,
    n1: &Path,
    broken: Option<&Path>,
    t0: &Instant,
) -> anyhow::Result<()> {
    let n_hosts = hosts.len();
    let long = Duration::from_secs(1200);
    wait_for("every host marked good", long, || {
        Ok(hosts.iter().all(|h| {
            std::fs::read_to_string(&h.console)
                .unwrap_or_default()
                .contains("marked good (version 1.0.0)")
        }))
    })?;
    step(t0, "every host booted 1.0.0 and marked it good");
    let want: Vec<String> = (0..n_hosts).map(name).collect();
    wait_for("the etcd cluster", long, || {
        Ok(etcd_members(hosts)? == want && all_healthy(hosts))
    })?;
    step(t0, "etcd: one cluster of every host, all healthy");
    wait_for("the swarm", long, || {
        let nodes = node_ls(&hosts[0])?;
        Ok(nodes.len() == n_hosts && nodes.iter().all(|n| n.1 == "Ready" && n.2 == "Active"))
    })?;
    step(
        t0,
        "swarm: every host a manager (two promoted), ready and active",
    );
    let secrets = secrets::check(hosts, out.pki)?;
    step(t0, "secrets looked at");
    for h in hosts.iter_mut() {
        h.lock_id = look::lock_id(h.sh("cat /etc/machine-id")?.trim())?;
    }
    for h in hosts.iter() {
        wait_for(&format!("{}: the web image", h.name), long, || {
            Ok(h.ssh
                .run(&format!("docker image inspect {IMAGE_TAG}"))?
                .status
                .success())
        })?;
    }
    hosts[0].sh(&format!(
        "docker service create --detach --name web --replicas 3 --publish published={WEB_PORT},target={WEB_PORT} --no-resolve-image {IMAGE_TAG}"
    ))?;
    let c = http();
    wait_for("the web service through every host", long, || {
        Ok(hosts.iter().all(|h| probe_web(&c, h.web_port)))
    })?;
    step(t0, "service web: 3 replicas, answering through every host");
    let intruded = intruder::attempt(out.stranger, hosts)?;
    step(
        t0,
        "the intruder tried etcd, the swarm, the peer port and dockerd",
    );
    // Before `pinned` exists: its replica on the drained host could not move.
    let gathered = gathered_drain(hosts, t0)?;
    if a.faults {
        // One replica per node, one per host: a drained host's replica has
        // nowhere to go, so the first drain cannot finish.
        hosts[0].sh(&format!(
            "docker service create --detach --name pinned --replicas {n_hosts} --replicas-max-per-node 1 --no-resolve-image {IMAGE_TAG}"
        ))?;
        wait_for("pinned at full strength", long, || {
            Ok(hosts[0]
                .sh("docker service ls --filter name=pinned --format '{{.Replicas}}'")?
                .trim()
                .starts_with(&format!("{n_hosts}/{n_hosts}")))
        })?;
        step(t0, "service pinned: one replica per host, none can move");
    }
    let before_nodes = node_ls(&hosts[0])?;
    let before_members = etcd_members(hosts)?;

    // The rolling update.
    let probe = Probe::start(&probe_targets(hosts), &lock_ids(hosts));
    let upd = Instant::now();
    publish(n1)?;
    step(t0, "published 1.1.0: hosts update themselves one at a time");
    let faults = if a.faults {
        let d = fault_drain_timeout(hosts, t0)?;
        let k = fault_kill_holder(a, hosts, &probe, t0)?;
        Some((d, k))
    } else {
        None
    };
    let finals = wait_converged(hosts, "1.1.0", Duration::from_secs(2400), t0);
    probe.journals_if_etcd_was_down(hosts);
    let Tally {
        etcd_down,
        web_down,
        max_down,
        secs,
        fault_etcd_down,
        fault_web_down,
        timeouts_only,
    } = probe.finish();
    let finals = finals?;
    let minutes = upd.elapsed().as_secs_f64() / 60.0;
    step(
        t0,
        &format!("rolling update done in {minutes:.1} min ({secs} s probed)"),
    );
    let after_nodes = node_ls(&hosts[0])?;
    let after_members = etcd_members(hosts)?;
    let mut errors = Vec::new();
    for h in hosts.iter() {
        let st: serde_json::Value = serde_json::from_str(&h.sh("updatectl status --json")?)?;
        if !st["last_error"].is_null() {
            errors.push(format!("{}: {}", h.name, st["last_error"]));
        }
    }
    // Idle: let the update's page cache and the rejoin settle.
    std::thread::sleep(Duration::from_secs(10));
    let mem: Vec<String> = hosts
        .iter()
        .map(|h| {
            mem_used_mib(h)
                .map(|m| m.to_string())
                .unwrap_or_else(|_| "?".into())
        })
        .collect();
    let reboots: Vec<usize> = hosts.iter().map(|h| boots(h).saturating_sub(1)).collect();
    println!(
        "cluster-before: etcd_members={} swarm_nodes={}",
        before_members.join(","),
        fmt_nodes(&before_nodes)
    );
    println!(
        "cluster-after: etcd_members={} swarm_nodes={} healthy={} reboots={} status_errors={}",
        after_members.join(","),
        fmt_nodes(&after_nodes),
        all_healthy(hosts),
        reboots
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(","),
        if errors.is_empty() {
            "none".to_string()
        } else {
            errors.join("; ")
        }
    );
    println!(
        "cluster: hosts={n_hosts} final={} max_rebooting={max_down} etcd_unavailable_s={etcd_down} service_unavailable_s={web_down} timeouts_only_s={timeouts_only} lock_holders_end={} mem_used_mib={} minutes={minutes:.1} lock={}",
        finals.join(","),
        lock_holders(hosts)?,
        mem.join(","),
        match a.lock {
            LockKind::Etcd => "etcd",
            LockKind::Fleetlock => "fleetlock",
        },
    );
    println!("{secrets}");
    println!("{intruded}");
    println!("{gathered}");
    if let Some((d, k)) = faults {
        println!("{d}");
        println!(
            "{k} service_unavailable_s={fault_web_down} etcd_unavailable_s={fault_etcd_down} final={} lock_holders_end={}",
            finals.join(","),
            lock_holders(hosts)?
        );
    }
    if let Some(b) = broken {
        fault_bad_health(hosts, publish, b, t0)?;
    }
    Ok(())
}
