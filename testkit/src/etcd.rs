//! A real etcd (Debian's etcd-server) on loopback ports with a temporary
//! data directory; it can be stopped and started again on the same data.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    pub client_port: u16,
    peer_port: u16,
    data: PathBuf,
    child: Option<Child>,
    /// A directory with ca.pem, server.{pem,key} and client.{pem,key} when
    /// clients must use TLS with a certificate.
    tls: Option<PathBuf>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Etcd {
    pub fn start(data: PathBuf) -> Etcd {
        let mut e = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            data,
            child: None,
            tls: None,
        };
        e.resume();
        e
    }

    /// etcd serving clients over TLS and requiring client certificates.
    pub fn start_tls(data: PathBuf, certs: &std::path::Path) -> Etcd {
        let mut e = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            data,
            child: None,
            tls: Some(certs.to_path_buf()),
        };
        e.resume();
        e
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn resume(&mut self) {
        let c = self.url();
        let p = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("etcd");
        let mut health = Command::new("etcdctl");
        if let Some(d) = &self.tls {
            cmd.arg(format!("--cert-file={}", d.join("server.pem").display()))
                .arg(format!("--key-file={}", d.join("server.key").display()))
                .arg(format!("--trusted-ca-file={}", d.join("ca.pem").display()))
                .arg("--client-cert-auth");
            health
                .arg(format!("--cacert={}", d.join("ca.pem").display()))
                .arg(format!("--cert={}", d.join("client.pem").display()))
                .arg(format!("--key={}", d.join("client.key").display()));
        }
        let child = cmd
            .arg("--name=nimbus-test")
            .arg(format!("--data-dir={}", self.data.display()))
            .arg(format!("--listen-client-urls={c}"))
            .arg(format!("--advertise-client-urls={c}"))
            .arg(format!("--listen-peer-urls={p}"))
            .arg(format!("--initial-advertise-peer-urls={p}"))
            .arg(format!("--initial-cluster=nimbus-test={p}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd must be installed (etcd-server in .ci/packages.txt)");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            let ok = health
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &c, "endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "etcd did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.url()])
            .args(args)
            .output()
            .expect("etcdctl (etcd-client)");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    pub fn get(&self, key: &str) -> String {
        self.ctl(&["get", key, "--print-value-only"])
            .trim()
            .to_string()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real multi-member etcd cluster on loopback ports (members m1, m2, ...).
pub struct EtcdCluster {
    pub urls: Vec<String>,
    children: Vec<Child>,
}

impl EtcdCluster {
    pub fn start(dir: &std::path::Path, n: usize) -> EtcdCluster {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{}=http://127.0.0.1:{p}", i + 1))
            .collect();
        let mut children = Vec::new();
        let mut urls = Vec::new();
        for (i, (c, p)) in ports.iter().enumerate() {
            let c = format!("http://127.0.0.1:{c}");
            let p = format!("http://127.0.0.1:{p}");
            let child = Command::new("etcd")
                .arg(format!("--name=m{}", i + 1))
                .arg(format!(
                    "--data-dir={}",
                    dir.join(format!("m{}", i + 1)).display()
                ))
                .arg(format!("--listen-client-urls={c}"))
                .arg(format!("--advertise-client-urls={c}"))
                .arg(format!("--listen-peer-urls={p}"))
                .arg(format!("--initial-advertise-peer-urls={p}"))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg("--initial-cluster-state=new")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("etcd must be installed (etcd-server in .ci/packages.txt)");
            children.push(child);
            urls.push(c);
        }
        let cluster = EtcdCluster { urls, children };
        let t0 = Instant::now();
        while cluster.leader().is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the etcd cluster did not elect a leader"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        cluster
    }

    /// The index of the member that leads, as every member reports it
    /// (None while they do not agree, or one does not answer).
    pub fn leader(&self) -> Option<usize> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.urls.join(","), "endpoint", "status"])
            .output()
            .expect("etcdctl (etcd-client)");
        if !out.status.success() {
            return None;
        }
        // `URL, ID, VERSION, DB SIZE, IS LEADER, ...`, one line per member.
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() != self.urls.len() {
            return None;
        }
        let leaders: Vec<usize> = lines
            .iter()
            .filter(|l| l.split(", ").nth(4) == Some("true"))
            .filter_map(|l| self.urls.iter().position(|u| l.starts_with(u.as_str())))
            .collect();
        (leaders.len() == 1).then(|| leaders[0])
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
