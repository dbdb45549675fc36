//! A real Prometheus (Debian's `prometheus`) scrapes update-engine's
//! metrics socket during an update, through a small HTTP bridge (the
//! socket speaks the text format, as Zincati's does; Prometheus speaks
//! HTTP), and its query API shows the counters moving. `promtool check
//! metrics` accepts the text.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::httpd::Fault;
use support::Fixture;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serve GET on loopback with what the Unix socket at `sock` says.
fn bridge(sock: PathBuf) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            // The request head, up to its blank line (bounded).
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                match c.read(&mut b) {
                    Ok(1) => head.push(b[0]),
                    _ => break,
                }
            }
            let body = match std::os::unix::net::UnixStream::connect(&sock) {
                Ok(mut u) => {
                    let mut t = Vec::new();
                    let _ = u.read_to_end(&mut t);
                    t
                }
                Err(_) => Vec::new(),
            };
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = c.write_all(&body);
        }
    });
    port
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn get_json(url: &str) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", url])
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{url}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn query(prom: &str, q: &str) -> Vec<serde_json::Value> {
    let v = get_json(&format!("{prom}/api/v1/query?query={}", urlencode(q)));
    assert_eq!(v["status"], "success", "{q}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn scalar(prom: &str, q: &str) -> Option<f64> {
    query(prom, q)
        .first()
        .and_then(|r| r["value"][1].as_str()?.parse().ok())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn promtool_check(text: &str, dir: &Path) {
    let p = dir.join("metrics.txt");
    std::fs::write(&p, text).expect("write");
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&p).expect("open"))
        .output()
        .expect("promtool (Debian package prometheus)");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prometheus_scrapes_the_counters_moving_during_an_update() {
    let f = Fixture::new(24, 64);
    // The full payload alone, so its bytes are one counter.
    f.resign(&f.key, |m| {
        m.releases.iter_mut().for_each(|r| r.delta = None)
    });
    let r = support::release(&f.manifest(), "1.1.0");
    // About ten seconds of download: several scrapes land inside it.
    f.httpd.set_fault(Fault {
        suffix: "usr.img.zst".into(),
        throttle: Some((r.compressed_size / 10).max(1)),
        ..Fault::default()
    });
    let w = f.tmp.path();
    let sock = w.join("ue.sock");
    let msock = w.join("metrics.promsock");
    let _engine = Killed(
        f.engine(&[
            "--socket",
            sock.to_str().expect("utf8"),
            "--metrics-socket",
            msock.to_str().expect("utf8"),
            "--first-check",
            "3600",
        ])
        .stderr(Stdio::null())
        .spawn()
        .expect("update-engine"),
    );
    wait_for("the metrics socket", Duration::from_secs(20), || {
        msock.exists()
    });

    let ctl = |args: &[&str]| {
        let mut all: Vec<&std::ffi::OsStr> = vec!["--socket".as_ref(), sock.as_os_str()];
        all.extend(args.iter().map(std::ffi::OsStr::new));
        support::updatectl(&all)
    };
    let (out, text) = ctl(&["metrics", "--metrics-socket", msock.to_str().expect("utf8")]);
    assert!(out.status.success(), "{text}");
    promtool_check(&text, w);

    let bridge_port = bridge(msock.clone());
    let prom_port = free_port();
    let cfg = w.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: nimbus\n    static_configs:\n      - targets: ['127.0.0.1:{bridge_port}']\n"
        ),
    )
    .expect("prometheus.yml");
    let prom_log = std::fs::File::create(w.join("prometheus.log")).expect("log");
    let _prom = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", w.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(prom_log)
            .spawn()
            .expect("prometheus (Debian package prometheus)"),
    );
    let prom = format!("http://127.0.0.1:{prom_port}");
    let log = || std::fs::read_to_string(w.join("prometheus.log")).unwrap_or_default();
    wait_for(
        "prometheus scraping update-engine",
        Duration::from_secs(60),
        || {
            Command::new("curl")
                .args(["-sf", "--max-time", "2", &format!("{prom}/-/ready")])
                .output()
                .is_ok_and(|o| o.status.success())
                && scalar(&prom, "up{job=\"nimbus\"}") == Some(1.0)
        },
    );
    assert_eq!(
        scalar(&prom, "nimbus_update_engine_installs_total{mode=\"full\"}"),
        Some(0.0),
        "{}",
        log()
    );

    let t0 = chrono::Utc::now().timestamp();
    let (out, text) = ctl(&["update", "--wait"]);
    assert!(out.status.success(), "{text}");
    // Two more scrapes after the end.
    std::thread::sleep(Duration::from_secs(3));
    let t1 = chrono::Utc::now().timestamp();

    let full = "nimbus_update_engine_fetched_bytes_total{kind=\"full\"}";
    let v = get_json(&format!(
        "{prom}/api/v1/query_range?query={}&start={}&end={t1}&step=1",
        urlencode(full),
        t0 - 1
    ));
    let values: Vec<f64> = v["data"]["result"][0]["values"]
        .as_array()
        .unwrap_or_else(|| panic!("no series for {full}: {v}"))
        .iter()
        .filter_map(|p| p[1].as_str()?.parse().ok())
        .collect();
    let mut distinct = values.clone();
    distinct.dedup();
    assert!(
        distinct.len() >= 4 && distinct.windows(2).all(|p| p[0] <= p[1]),
        "the payload counter should climb through several scrapes: {values:?}"
    );
    assert_eq!(
        values.last().copied(),
        Some(r.compressed_size as f64),
        "{values:?}"
    );
    assert_eq!(
        scalar(&prom, "nimbus_update_engine_installs_total{mode=\"full\"}"),
        Some(1.0)
    );
    assert_eq!(
        scalar(&prom, "nimbus_update_engine_reboot_pending"),
        Some(1.0)
    );
    assert_eq!(
        scalar(
            &prom,
            "nimbus_update_engine_state{state=\"UPDATED_NEED_REBOOT\"}"
        ),
        Some(1.0)
    );
    assert!(
        scalar(&prom, "nimbus_update_engine_state_changes_total").unwrap_or(0.0) >= 3.0,
        "checking, downloading, verifying... each a change"
    );
    let (out, text) = ctl(&["metrics", "--metrics-socket", msock.to_str().expect("utf8")]);
    assert!(out.status.success(), "{text}");
    promtool_check(&text, w);
}
