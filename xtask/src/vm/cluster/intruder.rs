//! Strangers at the cluster's door. A machine on the hosts' own network
//! with no credentials (a network namespace of this machine, 10.10.0.99,
//! wired into the virtual switch through a TAP device: its frames reach
//! the hosts exactly as another VM's would), and a container on the first
//! host (any image an operator runs: it reaches the host's address through
//! the bridge's NAT). Each tries to read etcd (the join tokens), write the
//! reboot lock, get into the swarm, talk to etcd's peer port and reach
//! dockerd; the line says what each attempt met:
//!
//! `intruder: etcd_read=refused etcd_write=refused swarm_join=refused peer=refused docker=refused`
//!
//! `swarm_join`: joining takes a token, and the only place one rests is
//! etcd, sealed; so the intruder tries every way to it (plain HTTP, TLS
//! without a certificate, from the network and from the container) and
//! then, were a value readable, whether it holds a token in the clear.
//! With no token there is no join (a forged one fails swarm's own check).

use std::fs::File;
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use super::host::{addr, Host};
use super::IMAGE_TAG;

pub(super) const ADDR: &str = "10.10.0.99";

/// The namespace and its TAP; the namespace goes with it.
pub(super) struct Intruder {
    ns: String,
    /// The switch port the TAP's frames come from (`host::switch`'s list).
    pub(super) local: u16,
    sock: UdpSocket,
    tap: File,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let o = nimbus_testkit::proc::output(Command::new("ip").args(args), Duration::from_secs(30))
        .map_err(|e| anyhow::anyhow!("ip {}: {e}", args.join(" ")))?;
    if !o.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// A TAP device named `name` in this namespace, its frames without the
/// packet-information header.
fn open_tap(name: &str) -> anyhow::Result<File> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    let n = name.as_bytes();
    if n.len() >= 16 {
        bail!("{name}: an interface name has at most 15 bytes");
    }
    req.name[..n.len()].copy_from_slice(n);
    // SAFETY: TUNSETIFF reads and writes one struct ifreq (40 bytes on
    // Linux, which IfReq is, name NUL-terminated), on a descriptor that
    // stays open across the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if r < 0 {
        bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    Ok(f)
}

impl Intruder {
    /// The namespace, with 10.10.0.99/24 on a TAP whose frames this
    /// process carries to and from the switch.
    pub(super) fn new() -> anyhow::Result<Intruder> {
        let ns = format!("nimbus-intruder-{}", std::process::id());
        let dev = format!("nimi{}", std::process::id() % 100_000);
        let _ = ip(&["netns", "del", &ns]);
        ip(&["netns", "add", &ns])?;
        let made = (|| -> anyhow::Result<(File, UdpSocket)> {
            let tap = open_tap(&dev)?;
            ip(&["link", "set", &dev, "netns", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{ADDR}/24"), "dev", &dev])?;
            ip(&["-n", &ns, "link", "set", &dev, "up"])?;
            let sock = UdpSocket::bind("127.0.0.1:0")?;
            Ok((tap, sock))
        })();
        match made {
            Ok((tap, sock)) => Ok(Intruder {
                local: sock.local_addr()?.port(),
                ns,
                sock,
                tap,
            }),
            Err(e) => {
                let _ = ip(&["netns", "del", &ns]);
                Err(e.context("setting up the intruder's network namespace"))
            }
        }
    }

    /// Carry frames between the TAP and the switch until `stop`.
    pub(super) fn wire(&self, switch_port: u16, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
        let (mut tap_r, mut tap_w) = (self.tap.try_clone()?, self.tap.try_clone()?);
        let (sock_r, sock_w) = (self.sock.try_clone()?, self.sock.try_clone()?);
        sock_r.set_read_timeout(Some(Duration::from_millis(200)))?;
        let s2 = stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            // A read blocks until a frame comes; the namespace's own
            // traffic (ARP, retries) keeps it moving, and the process's
            // end takes the thread.
            while !s2.load(Ordering::Relaxed) {
                let Ok(n) = tap_r.read(&mut buf) else { break };
                let _ = sock_w.send_to(&buf[..n], ("127.0.0.1", switch_port));
            }
        });
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = sock_r.recv(&mut buf) {
                    let _ = tap_w.write(&buf[..n]);
                }
            }
        });
        Ok(())
    }

    fn exec(&self, cmd: &str) -> (bool, String) {
        match nimbus_testkit::proc::output(
            Command::new("ip").args(["netns", "exec", &self.ns, "sh", "-c", cmd]),
            Duration::from_secs(30),
        ) {
            Ok(o) => (
                o.status.success(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
            ),
            Err(e) => (false, e.to_string()),
        }
    }
}

impl Drop for Intruder {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// `curl` from the namespace: `answered` when etcd gave data back (its
/// JSON header), else `refused`.
fn etcd_try(i: &Intruder, scheme: &str, host: &str, port: u16, path: &str, body: &str) -> bool {
    let (_, out) = i.exec(&format!(
        "curl -s -k --max-time 5 -X POST {scheme}://{host}:{port}{path} -d '{body}' || true"
    ));
    out.contains("\"header\"")
}

/// A TCP connection that opens: `open`, else `refused`.
fn tcp_open(i: &Intruder, host: &str, port: u16) -> bool {
    i.exec(&format!(
        "timeout 5 bash -c 'exec 3<>/dev/tcp/{host}/{port}' 2>/dev/null"
    ))
    .0
}

pub(super) fn attempt(i: &Intruder, hosts: &[Host]) -> anyhow::Result<String> {
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine;
    let prefix = B64.encode("nimbus/");
    let read = format!(
        r#"{{"key":"{prefix}","range_end":"{}"}}"#,
        B64.encode("nimbus0")
    );
    let lock = B64.encode(nimbus::etcd_keys::REBOOT_LOCK);
    let sem = B64.encode(r#"{"semaphore":99,"max":99,"holders":[]}"#);
    let write = format!(r#"{{"key":"{lock}","value":"{sem}"}}"#);
    // Up to a minute for the first frames (ARP through the switch): a
    // TCP connection to etcd's port must open, or nothing below means
    // anything.
    let h1 = addr(0);
    let mut reached = false;
    for _ in 0..12 {
        if tcp_open(i, &h1, 2379) {
            reached = true;
            break;
        }
    }
    if !reached {
        bail!("the intruder's namespace cannot reach {h1} through the switch: the test would prove nothing");
    }
    let mut etcd_read = false;
    let mut etcd_write = false;
    let mut peer = false;
    let mut docker = false;
    for n in 0..hosts.len() {
        let a = addr(n);
        for scheme in ["http", "https"] {
            etcd_read |= etcd_try(i, scheme, &a, 2379, "/v3/kv/range", &read);
            etcd_write |= etcd_try(i, scheme, &a, 2379, "/v3/kv/put", &write);
        }
        // The peer port speaks TLS and asks for the cluster's certificate.
        let (_, out) = i.exec(&format!(
            "curl -s -k --max-time 5 https://{a}:2380/members || true"
        ));
        peer |= out.contains("peerURLs") || out.contains("\"id\"");
        // dockerd's TCP ports (it listens only on its Unix socket).
        docker |= tcp_open(i, &a, 2375) || tcp_open(i, &a, 2376);
    }
    // A container on h1 (busybox): the host's etcd and dockerd from inside.
    let c = hosts[0].ssh.run_within(
        &format!(
            "docker run --rm --entrypoint /bin/busybox {IMAGE_TAG} sh -c '\
             for u in http://{h1}:2379/v3/kv/range https://{h1}:2379/v3/kv/range; do \
               wget -q -T 5 -O - --post-data '\\''{read}'\\'' $u 2>/dev/null | grep -q header && echo etcd-read; done; \
             for p in 2375 2376; do nc -w 3 {h1} $p </dev/null >/dev/null 2>&1 && echo docker-open; done; \
             echo done'"
        ),
        Duration::from_secs(120),
    )?;
    let said = String::from_utf8_lossy(&c.stdout).into_owned();
    if !said.contains("done") {
        bail!(
            "the container on {} did not run: {}",
            hosts[0].name,
            String::from_utf8_lossy(&c.stderr)
        );
    }
    etcd_read |= said.contains("etcd-read");
    docker |= said.contains("docker-open");
    let word = |got: bool| if got { "ANSWERED" } else { "refused" };
    // No token without etcd; and what etcd holds is sealed.
    let swarm_join = etcd_read;
    Ok(format!(
        "intruder: etcd_read={} etcd_write={} swarm_join={} peer={} docker={} from={ADDR},container@{}",
        word(etcd_read),
        word(etcd_write),
        word(swarm_join),
        word(peer),
        if docker { "OPEN" } else { "refused" },
        hosts[0].name
    ))
}
