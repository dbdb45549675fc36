//! One cluster host: its addresses, user-data, QEMU and ssh; the virtual
//! switch between the hosts; the web image the service runs.

use super::{HOOK_TIMEOUT_S, IMAGE_TAG, WEB_PORT};
use crate::vm::e2e::Ssh;
use crate::vm::qemu;
use anyhow::{bail, Context};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub(super) fn addr(i: usize) -> String {
    format!("10.10.0.{}", 11 + i)
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
pub(super) fn web_image(work: &Path) -> anyhow::Result<PathBuf> {
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

pub(super) fn user_data(i: usize, n: usize, repo_port: u16, ssh_key: &str) -> String {
    let me = addr(i);
    let cluster: Vec<String> = (0..n)
        .map(|j| format!("{}=http://{}:2380", name(j), addr(j)))
        .collect();
    let endpoints: Vec<String> = (0..n).map(|j| format!("http://{}:2379", addr(j))).collect();
    let swarm = if i == 0 {
        format!("    role: manager\n    init: true\n    advertise_addr: {me}\n")
    } else {
        format!(
            "    role: manager\n    advertise_addr: {me}\n    join: [{}:2377]\n",
            addr(0)
        )
    };
    format!(
        r#"#cloud-config
hostname: {host}
users:
  - name: root
    ssh_authorized_keys:
      - {ssh_key}
write_files:
  - path: /etc/nimbus/health.conf
    content: |
      NIMBUS_HEALTH_DELAY=2
      {health_units}
  - path: /etc/nimbus/update-engine.env
    content: |
      NIMBUS_ENGINE_ARGS="--first-check 5 --interval 20 --reboot-poll 4"
coreos:
  etcd2:
    name: {host}
    initial-cluster: {cluster}
    initial-cluster-state: new
    initial-cluster-token: nimbus-cluster
    initial-advertise-peer-urls: http://{me}:2380
    listen-peer-urls: http://{me}:2380
    listen-client-urls: http://0.0.0.0:2379
    advertise-client-urls: http://{me}:2379
    heartbeat-interval: 500
    election-timeout: 5000
  update:
    group: stable
    server: http://10.0.2.2:{repo_port}
    reboot-strategy: etcd-lock
  locksmith:
    endpoint: {endpoints}
  units:
{canary}    - name: 10-cluster.network
      content: |
        [Match]
        MACAddress={mac}

        [Network]
        Address={me}/24
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
nimbus:
  # Plain-HTTP etcd on the harness's private switch, until the cluster
  # run brings its own certificates (issue 28): validate warns.
  etcd_insecure_plaintext: true
  hook_timeout: {HOOK_TIMEOUT_S}s
  swarm:
{swarm}"#,
        host = name(i),
        cluster = cluster.join(","),
        endpoints = endpoints.join(","),
        mac = mac(i),
        canary = crate::vm::smoke::canary_unit(),
        health_units = crate::vm::smoke::canary_health_units(),
    )
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
    pub(super) machine_id: String,
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

    pub(super) fn etcd(&self) -> String {
        format!("http://127.0.0.1:{}", self.etcd_port)
    }
}

pub(super) fn mac_of(name: &str) -> String {
    let i: usize = name.trim_start_matches('h').parse().unwrap_or(1);
    mac(i - 1)
}
