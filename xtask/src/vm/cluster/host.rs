//! One cluster host: its addresses, user-data, QEMU and ssh; the virtual
//! switch between the hosts; the web image the service runs.

use super::{HOOK_TIMEOUT_S, IMAGE_TAG, WEB_PORT};
use crate::cluster_config::{self, Member, Pki, Site};
use crate::vm::e2e::Ssh;
use crate::vm::qemu;
use anyhow::{bail, Context};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub(super) fn addr_v4(i: usize) -> std::net::Ipv4Addr {
    // Hosts are few (`--hosts` is small): 11 + i stays within a byte.
    std::net::Ipv4Addr::new(
        10,
        10,
        0,
        11u8.saturating_add(u8::try_from(i).unwrap_or(u8::MAX)),
    )
}

pub(super) fn addr(i: usize) -> String {
    addr_v4(i).to_string()
}

pub(super) fn name(i: usize) -> String {
    format!("h{}", i + 1)
}

pub(super) fn mac(i: usize) -> String {
    format!("52:54:00:10:00:{:02x}", i + 1)
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The virtual switch: every datagram (an Ethernet frame from one VM's
/// second NIC) goes to every other VM. Broadcast-only is enough for a few
/// hosts and keeps it obviously correct.
pub(super) fn switch(ports: Vec<u16>, stop: Arc<AtomicBool>) -> anyhow::Result<u16> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let port = sock.local_addr()?.port();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            for p in &ports {
                if *p != from.port() {
                    let _ = sock.send_to(&buf[..n], ("127.0.0.1", *p));
                }
            }
        }
    });
    Ok(port)
}

/// A Docker image archive (`docker load` format) of a busybox httpd serving
/// one page, made here from Debian's busybox-static.
pub(crate) fn web_image(work: &Path) -> anyhow::Result<PathBuf> {
    use sha2::Digest;
    let d = work.join("web-image");
    let layer = d.join("layer");
    std::fs::create_dir_all(layer.join("bin"))?;
    std::fs::create_dir_all(layer.join("www"))?;
    std::fs::copy("/bin/busybox", layer.join("bin/busybox"))
        .context("/bin/busybox (Debian's busybox-static; `cargo xtask deps` installs it)")?;
    std::fs::write(layer.join("www/index.html"), "nimbus-web\n")?;
    let run = |cmd: &mut Command| -> anyhow::Result<()> {
        let st = cmd.status().context("tar")?;
        if !st.success() {
            bail!("{cmd:?} failed ({st})");
        }
        Ok(())
    };
    run(Command::new("tar")
        .args([
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--sort=name",
            "-C",
        ])
        .arg(&layer)
        .arg("-cf")
        .arg(d.join("layer.tar"))
        .arg("."))?;
    let diff = hex::encode(sha2::Sha256::digest(std::fs::read(d.join("layer.tar"))?));
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Cmd": ["/bin/busybox", "httpd", "-f", "-p", WEB_PORT.to_string(), "-h", "/www"],
            // httpd runs as PID 1 and has no SIGTERM handler, so the
            // kernel drops Docker's TERM and every task stop waited out
            // the 10 s grace before a KILL: 10 s on every drain.
            "StopSignal": "SIGKILL",
            "ExposedPorts": {format!("{WEB_PORT}/tcp"): {}},
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff}")]},
    });
    let config = serde_json::to_vec(&config)?;
    let cfg_name = format!("{}.json", hex::encode(sha2::Sha256::digest(&config)));
    std::fs::write(d.join(&cfg_name), &config)?;
    let manifest = serde_json::json!([{
        "Config": cfg_name,
        "RepoTags": [IMAGE_TAG],
        "Layers": ["layer.tar"],
    }]);
    std::fs::write(d.join("manifest.json"), serde_json::to_vec(&manifest)?)?;
    let out = work.join("web.tar");
    run(Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(&d)
        .arg("-cf")
        .arg(&out)
        .args(["manifest.json", &cfg_name, "layer.tar"]))?;
    Ok(out)
}

/// The cluster's members, as `cargo xtask cluster-config` takes them.
/// The witness script (see [`user_data`]); its tally is `/run/token-watch`.
pub(super) const TOKEN_WATCH: &str = "/etc/nimbus-test/token-watch";

pub(super) fn members(n: usize) -> Vec<Member> {
    (0..n)
        .map(|i| Member {
            name: name(i),
            addr: std::net::IpAddr::V4(addr_v4(i)),
        })
        .collect()
}

/// Host `i`'s user-data: what `cargo xtask cluster-config` makes for an
/// operator (etcd over TLS with client certificates, update-engine and
/// nimbus-swarm on the same certificate), plus the harness's own parts:
/// root's key, a short health delay and update interval, the canary, the
/// private network's address, the web image from the OEM partition.
pub(super) fn user_data(
    members: &[Member],
    i: usize,
    pki: &Pki,
    repo_port: u16,
    ssh_key: &str,
    fleetlock_url: Option<&str>,
) -> anyhow::Result<String> {
    let site = Site {
        fleetlock_url: fleetlock_url.map(str::to_string),
        ssh_keys: vec![ssh_key.to_string()],
        server: Some(format!("http://10.0.2.2:{repo_port}")),
        group: "stable".into(),
        write_files: format!(
            r#"  - path: /etc/nimbus/health.conf
    content: |
      NIMBUS_HEALTH_DELAY=2
      {health_units}
  - path: /etc/nimbus/update-engine.env
    content: |
      NIMBUS_ENGINE_ARGS="--first-check 5 --interval 20 --reboot-poll 4"
  - path: {TOKEN_WATCH}
    permissions: '0755'
    content: |
      #!/bin/sh
      # The harness's witness: once a second for the first five minutes,
      # is a swarm join token on any process's command line? Counts only;
      # never copies a command line. (The pattern's brackets keep grep's
      # own command line from matching.)
      # First boot only: that is when hosts join.
      [ -e /var/lib/token-watch.ran ] && exit 0
      touch /var/lib/token-watch.ran
      n=0; hits=0; end=$(( $(date +%s) + 300 ))
      while [ "$(date +%s)" -lt "$end" ]; do
        n=$((n + 1))
        if grep -l -a -s 'SWMTK[N]' /proc/[0-9]*/cmdline > /run/token-watch.last; then
          hits=$((hits + 1))
          for f in $(cat /run/token-watch.last); do cat "${{f%/cmdline}}/comm"; done >> /run/token-watch.who 2>/dev/null
        fi
        echo "samples=$n hits=$hits" > /run/token-watch.tmp && mv /run/token-watch.tmp /run/token-watch
        sleep 1
      done
"#,
            health_units = crate::vm::smoke::canary_health_units(),
        ),
        units: format!(
            r#"{canary}    - name: 10-cluster.network
      content: |
        [Match]
        MACAddress={mac}

        [Network]
        Address={me}/24
    - name: token-watch.service
      command: start
      content: |
        [Unit]
        Description=The cluster test's witness: no join token on a command line
        DefaultDependencies=no
        Before=docker.service nimbus-swarm.service

        [Service]
        ExecStart={TOKEN_WATCH}
    - name: web-image.service
      enable: true
      command: start
      content: |
        [Unit]
        Description=Load the cluster test's web image (built locally, never pulled)
        After=docker.service
        Requires=docker.service

        [Service]
        Type=oneshot
        RemainAfterExit=yes
        ExecStart=/usr/bin/docker load -i /oem/web.tar

        [Install]
        WantedBy=multi-user.target
"#,
            canary = crate::vm::smoke::canary_unit(),
            mac = mac(i),
            me = addr(i),
        ),
        nimbus: format!("  hook_timeout: {HOOK_TIMEOUT_S}s\n"),
    };
    cluster_config::user_data(members, i, pki, &site)
}

pub(super) struct Host {
    pub(super) name: String,
    pub(super) disk: PathBuf,
    pub(super) user_data: PathBuf,
    pub(super) console: PathBuf,
    pub(super) ssh: Ssh,
    pub(super) etcd_port: u16,
    pub(super) web_port: u16,
    pub(super) switch_local: u16,
    pub(super) switch_port: u16,
    /// /etc/machine-id: the host's name in the reboot lock.
    /// The host's name among the lock's holders (look::lock_id).
    pub(super) lock_id: String,
    pub(super) vm: Option<qemu::Vm>,
}

impl Host {
    pub(super) fn spawn(&mut self, switch_port: u16, memory: u32) -> anyhow::Result<()> {
        self.switch_port = switch_port;
        let a = qemu::Qemu {
            memory,
            // One vCPU each: three TCG guests share two cores.
            smp: 1,
            forward: vec![
                format!("{}:2379", self.etcd_port),
                format!("{}:{WEB_PORT}", self.web_port),
            ],
            switch: Some(format!(
                "{}:{switch_port}:{}",
                self.switch_local,
                mac_of(&self.name)
            )),
            user_data: Some(self.user_data.clone()),
            // Three servers here share one disk of this machine: with their
            // flushes passed through, one host's writeback (a payload, a
            // shutdown's sync) can hold the others' etcd fsyncs behind it,
            // which separate servers never do to each other. (It did not
            // explain the bad-health fault's stall: that stayed without
            // flushes; docs/cluster.md.) The raw disks' writes still reach
            // this machine's page cache, so the kill-holder fault (QEMU
            // killed) loses nothing the guest wrote.
            cache: qemu::Cache::Unsafe,
            ..qemu::Qemu::harness(&self.disk, &self.console, self.ssh.port)
        };
        // A restarted VM appends to its console log rather than losing it.
        if self.console.exists() {
            let old = std::fs::read(&self.console)?;
            let prev = self.console.with_extension("console.prev");
            let mut all = std::fs::read(&prev).unwrap_or_default();
            all.extend(old);
            std::fs::write(&prev, all)?;
        }
        self.vm = Some(qemu::Vm::spawn(&a)?);
        Ok(())
    }

    pub(super) fn kill(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            vm.stop();
        }
    }

    pub(super) fn sh(&self, cmd: &str) -> anyhow::Result<String> {
        self.ssh
            .run_ok(cmd, Duration::from_secs(600))
            .with_context(|| format!("{}: {cmd}", self.name))
    }

    /// etcd's client port, forwarded; https with the operator's client
    /// certificate (`probe::http`), as every client of this cluster.
    pub(super) fn etcd(&self) -> String {
        format!("https://127.0.0.1:{}", self.etcd_port)
    }
}

pub(super) fn mac_of(name: &str) -> String {
    let i: usize = name.trim_start_matches('h').parse().unwrap_or(1);
    mac(i - 1)
}
