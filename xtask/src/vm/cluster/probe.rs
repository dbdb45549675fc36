//! The probe: every second, through every host, an etcd write and read and
//! the service's page; who holds the lock; the tally of lost seconds.

use super::host::{name, Host};
use anyhow::bail;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The harness's client for its questions to the hosts (members, health,
/// holders, every few seconds): one for the run, so its TLS connections
/// are reused rather than a handshake per question. Made after
/// [`use_tls`], which the run calls before any question.
pub(super) fn http() -> reqwest::blocking::Client {
    static SHARED: OnceLock<reqwest::blocking::Client> = OnceLock::new();
    SHARED
        .get_or_init(|| http_within(Duration::from_secs(3)))
        .clone()
}

/// The cluster's CA and the operator's client identity, once the run made
/// them: every etcd request of the harness goes through them.
static TLS: OnceLock<(reqwest::Certificate, reqwest::Identity)> = OnceLock::new();

pub(super) fn use_tls(pki: &crate::cluster_config::Pki) -> anyhow::Result<()> {
    let ca = reqwest::Certificate::from_pem(pki.ca.cert.as_bytes())?;
    let id =
        reqwest::Identity::from_pem(format!("{}{}", pki.admin.cert, pki.admin.key).as_bytes())?;
    let _ = TLS.set((ca, id));
    Ok(())
}

pub(super) fn http_within(limit: Duration) -> reqwest::blocking::Client {
    let mut b = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(limit);
    if let Some((ca, id)) = TLS.get() {
        b = b
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca.clone())
            .identity(id.clone());
    }
    b.build()
        .unwrap_or_else(|_| reqwest::blocking::Client::new())
}

pub(super) fn etcd_post(
    c: &reqwest::blocking::Client,
    base: &str,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let r = c.post(format!("{base}{path}")).json(&body).send()?;
    if !r.status().is_success() {
        bail!("{base}{path}: HTTP {}", r.status());
    }
    Ok(r.json()?)
}

/// Why a probe request failed, in the probe's words: `refused` (nothing
/// listens: the host is down or its service stopped), `timed out after
/// N s` (it listens but did not answer in time: load, or an election),
/// `HTTP <status>`, or the error itself.
pub(super) fn probe_failure(e: &reqwest::Error, t: Instant) -> String {
    // The whole chain: hyper's reason sits under reqwest's.
    let mut chain = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        src = s.source();
    }
    let lower = chain.to_lowercase();
    if e.is_timeout() {
        format!("timed out after {:.1} s", t.elapsed().as_secs_f64())
    } else if let Some(st) = e.status() {
        format!("HTTP {}", st.as_u16())
    } else if e.is_connect()
        // QEMU's forwarded port accepts for a guest that does not listen
        // (rebooting), then closes: the same "nothing there" as a refusal.
        || ["refused", "reset", "closed before message completed", "broken pipe"]
            .iter()
            .any(|w| lower.contains(w))
    {
        "refused".to_string()
    } else {
        chain
    }
}

pub(super) fn probe_post(
    c: &reqwest::blocking::Client,
    url: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let t = Instant::now();
    let r = c
        .post(url)
        .json(&body)
        .send()
        .map_err(|e| probe_failure(&e, t))?;
    if !r.status().is_success() {
        return Err(format!("HTTP {}", r.status().as_u16()));
    }
    r.json().map_err(|e| probe_failure(&e, t))
}

/// A write and a linearizable read of this member's probe key; why not.
pub(super) fn probe_etcd(
    c: &reqwest::blocking::Client,
    base: &str,
    key: &str,
    val: &str,
) -> Result<(), String> {
    let k = B64.encode(key);
    let v = B64.encode(val);
    probe_post(
        c,
        &format!("{base}/v3/kv/put"),
        serde_json::json!({"key": k, "value": v}),
    )
    .map_err(|e| format!("put: {e}"))?;
    let r = probe_post(
        c,
        &format!("{base}/v3/kv/range"),
        serde_json::json!({"key": k}),
    )
    .map_err(|e| format!("range: {e}"))?;
    if r["kvs"][0]["value"].as_str() == Some(v.as_str()) {
        Ok(())
    } else {
        Err(format!(
            "range: read {} instead of the value written",
            r["kvs"][0]["value"]
        ))
    }
}

pub(super) fn probe_web(c: &reqwest::blocking::Client, port: u16) -> bool {
    probe_web_why(c, port).is_ok()
}

/// The service through this host's published port; why not.
pub(super) fn probe_web_why(c: &reqwest::blocking::Client, port: u16) -> Result<(), String> {
    let t = Instant::now();
    let r = c
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .map_err(|e| probe_failure(&e, t))?;
    if !r.status().is_success() {
        return Err(format!("HTTP {}", r.status().as_u16()));
    }
    let body = r.text().map_err(|e| probe_failure(&e, t))?;
    if body.contains("nimbus-web") {
        Ok(())
    } else {
        Err("an answer that is not the service's".into())
    }
}

/// Which hosts (by index) hold the reboot lock, through the first member
/// that answers; `None` when none did.
pub(super) fn lock_holder_indexes(
    c: &reqwest::blocking::Client,
    etcds: &[String],
    ids: &[String],
) -> Option<Vec<usize>> {
    for base in etcds {
        let Ok(r) = probe_post(
            c,
            &format!("{base}/v3/kv/range"),
            serde_json::json!({"key": B64.encode(super::look::lock_key())}),
        ) else {
            continue;
        };
        let Some(v) = r["kvs"][0]["value"].as_str() else {
            return Some(Vec::new());
        };
        let sem: serde_json::Value = serde_json::from_slice(&B64.decode(v).ok()?).ok()?;
        return Some(
            sem["holders"]
                .as_array()?
                .iter()
                .filter_map(|h| ids.iter().position(|id| Some(id.as_str()) == h.as_str()))
                .collect(),
        );
    }
    None
}

/// Per second since the probe started: (etcd ok, service ok) per host.
pub(super) type Samples = Arc<Mutex<BTreeMap<u64, Second>>>;

/// One second's probes: (etcd served, or why not; the service answered,
/// or why not) per host.
pub(super) type Second = Vec<(Result<(), String>, Result<(), String>)>;

/// Per second: the hosts (indexes) that held the reboot lock, as etcd
/// said then (absent when no member answered).
pub(super) type Holders = Arc<Mutex<BTreeMap<u64, Vec<usize>>>>;

pub(super) struct Probe {
    pub(super) samples: Samples,
    pub(super) holders: Holders,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
    pub(super) t0: Instant,
    /// t0 as Unix seconds, to find the probe's seconds in the guests'
    /// journals (their clocks are this machine's, through QEMU's RTC).
    pub(super) unix0: u64,
    /// Seconds [from, to] a fault owns: counted for the fault, not for the
    /// rolling update around it.
    pub(super) windows: Mutex<Vec<(u64, u64)>>,
}

/// What the probe saw: outside the fault windows and inside them.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Tally {
    pub(super) etcd_down: u64,
    pub(super) web_down: u64,
    pub(super) max_down: usize,
    pub(super) secs: u64,
    pub(super) fault_etcd_down: u64,
    pub(super) fault_web_down: u64,
    /// Unavailable seconds (etcd or the service) in which every failed
    /// request timed out: the members were up but slow (load), none
    /// refused or answered an error.
    pub(super) timeouts_only: u64,
}

impl Probe {
    /// `ids`: each host's lock id, to name the reboot lock's holders.
    pub(super) fn start(hosts: &[(String, u16)], ids: &[String]) -> Probe {
        // One client per host for the whole run, shared by that host's
        // probe threads: its connections stay open from one second to the
        // next. A client a second cost each guest a TLS handshake with
        // client-certificate checks every second (four a second across the
        // cluster): CPU the guests' etcd needed, spent on being watched.
        let clients: Vec<reqwest::blocking::Client> = hosts
            .iter()
            .map(|_| http_within(Duration::from_secs(5)))
            .collect();
        let lock_client = http_within(Duration::from_secs(2));
        let samples: Samples = Arc::default();
        let holders: Holders = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2, h2) = (samples.clone(), stop.clone(), holders.clone());
        let hosts = hosts.to_vec();
        let ids = ids.to_vec();
        let n = hosts.len();
        let t0 = Instant::now();
        let unix0 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let thread = std::thread::spawn(move || {
            let mut sec = 0u64;
            while !st2.load(Ordering::Relaxed) {
                // One thread per host and second: a slow answer never
                // delays the next second's probe.
                if let Ok(mut m) = s2.lock() {
                    let none = || Err("no answer yet".to_string());
                    m.insert(sec, vec![(none(), none()); n]);
                }
                {
                    let (etcds, ids, h3, c) = (
                        hosts.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>(),
                        ids.clone(),
                        h2.clone(),
                        lock_client.clone(),
                    );
                    std::thread::spawn(move || {
                        if let Some(v) = lock_holder_indexes(&c, &etcds, &ids) {
                            if let Ok(mut m) = h3.lock() {
                                m.insert(sec, v);
                            }
                        }
                    });
                }
                for (i, (etcd, web)) in hosts.iter().enumerate() {
                    let (etcd, web, s3, c) = (etcd.clone(), *web, s2.clone(), clients[i].clone());
                    std::thread::spawn(move || {
                        // Each request may take etcdctl's default command
                        // timeout (5 s): on a starved 1-vCPU guest a commit
                        // that needs two members' fsyncs has taken over 3 s
                        // while every member stayed healthy.
                        // A key per host and second (modulo a minute): a
                        // slow answer must not read a later probe's write.
                        let e = probe_etcd(
                            &c,
                            &etcd,
                            &format!("nimbus/probe/{i}/{}", sec % 64),
                            &sec.to_string(),
                        );
                        let w = probe_web_why(&c, web);
                        if let Ok(mut m) = s3.lock() {
                            if let Some(v) = m.get_mut(&sec) {
                                v[i] = (e, w);
                            }
                        }
                    });
                }
                sec += 1;
                let next = t0 + Duration::from_secs(sec);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            // Let the last probes land.
            std::thread::sleep(Duration::from_secs(4));
        });
        Probe {
            samples,
            holders,
            stop,
            thread: Some(thread),
            t0,
            unix0,
            windows: Mutex::new(Vec::new()),
        }
    }

    /// What etcd and update-engine on each host logged about leaders,
    /// slow requests and the update's steps around the seconds etcd was
    /// out: their account (the journals persist on ROOT, so it spans the
    /// hosts' reboots). The whole window of every service goes to
    /// `outage-journal.txt` beside each host's console, for the reader.
    pub(super) fn journals_if_etcd_was_down(&self, hosts: &[Host]) {
        // The first and last second without etcd: the journals are read
        // from two minutes before the first (what led up to it: an install,
        // a hand-over) to half a minute after the last, so the lines that
        // matter are not crowded out by a long window's slow-request noise.
        let down: Vec<u64> = self
            .samples
            .lock()
            .map(|m| {
                settled(&m)
                    .filter(|(_, v)| !v.iter().any(|(e, _)| e.is_ok()))
                    .map(|(s, _)| *s)
                    .collect()
            })
            .unwrap_or_default();
        let (Some(first), Some(last)) = (down.first(), down.last()) else {
            return;
        };
        const PICK: &str =
            "leader|election|candidate|overloaded|fdatasync|took too long|heartbeat|lost|slow|full payload|delta plan|written to partition|taken by|released by|hooks?: |Rebooting";
        let (since, until) = (
            (self.unix0 + first).saturating_sub(120),
            self.unix0 + last + 30,
        );
        eprintln!(
            "cluster: journal: probe second 0 is unix time {}; etcd was out from second {first} to {last}",
            self.unix0
        );
        for h in hosts {
            let all =
                format!("journalctl --no-pager -o short-unix --since @{since} --until @{until}");
            if let (Ok(o), Some(dir)) = (h.ssh.run(&all), h.console.parent()) {
                let _ = std::fs::write(dir.join("outage-journal.txt"), &o.stdout);
            }
            let cmd = format!(
                "journalctl --no-pager -o short-unix -u etcd -u update-engine --since @{since} --until @{until} | grep -E '{PICK}' | tail -120"
            );
            match h.ssh.run(&cmd) {
                Ok(o) => {
                    for l in String::from_utf8_lossy(&o.stdout).lines() {
                        eprintln!("cluster: journal {}: {l}", h.name);
                    }
                }
                Err(e) => eprintln!("cluster: journal {}: (no answer: {e})", h.name),
            }
        }
    }

    /// The second being probed now.
    pub(super) fn now(&self) -> u64 {
        self.t0.elapsed().as_secs()
    }

    /// Seconds `from..=now` belong to a fault.
    pub(super) fn fault_since(&self, from: u64) {
        let to = self.now();
        if let Ok(mut w) = self.windows.lock() {
            w.push((from, to));
        }
    }

    pub(super) fn finish(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let m = self.samples.lock().map(|m| m.clone()).unwrap_or_default();
        let w = self.windows.lock().map(|w| w.clone()).unwrap_or_default();
        let h = self.holders.lock().map(|h| h.clone()).unwrap_or_default();
        tally(&m, &w, &h)
    }
}

/// The probe seconds that count: all but the last 3, whose probes may not
/// have answered yet. The tally and the journal reader both use this, so a
/// journal is never fetched for an outage the tally does not count.
pub(super) fn settled(m: &BTreeMap<u64, Second>) -> impl Iterator<Item = (&u64, &Second)> {
    let last = m.keys().next_back().copied().unwrap_or(0).saturating_sub(3);
    m.range(..=last)
}

/// Count the unavailable seconds of `settled`. Each is explained on stderr: what every
/// host's requests got, and which host held the reboot lock (drained or
/// rebooting for the update).
pub(super) fn tally(
    m: &BTreeMap<u64, Second>,
    windows: &[(u64, u64)],
    holders: &BTreeMap<u64, Vec<usize>>,
) -> Tally {
    let mut t = Tally::default();
    for (s, v) in settled(m) {
        let etcd_out = !v.iter().any(|(e, _)| e.is_ok());
        let web_out = !v.iter().any(|(_, w)| w.is_ok());
        let fault = windows.iter().any(|(a, b)| (a..=b).contains(&s));
        if etcd_out || web_out {
            let lock = holders.get(s);
            let per_host: Vec<String> = v
                .iter()
                .enumerate()
                .map(|(i, (e, w))| {
                    let got = |r: &Result<(), String>| {
                        r.as_ref().err().cloned().unwrap_or_else(|| "ok".into())
                    };
                    format!(
                        "{}: etcd {}, service {}{}",
                        name(i),
                        got(e),
                        got(w),
                        match lock {
                            Some(l) if l.contains(&i) => " (holds the reboot lock)",
                            Some(_) => "",
                            None => " (lock holder unknown)",
                        }
                    )
                })
                .collect();
            let what = match (etcd_out, web_out) {
                (true, true) => "etcd and the service unavailable",
                (true, false) => "etcd unavailable",
                _ => "service unavailable through every host",
            };
            eprintln!(
                "cluster: probe second {s}{}: {what} ({})",
                if fault { " (fault window)" } else { "" },
                per_host.join("; ")
            );
        }
        if fault {
            t.fault_etcd_down += u64::from(etcd_out);
            t.fault_web_down += u64::from(web_out);
            continue;
        }
        t.secs += 1;
        t.etcd_down += u64::from(etcd_out);
        t.web_down += u64::from(web_out);
        let timed_out = |r: &Result<(), String>| r.as_ref().is_err_and(|e| e.contains("timed out"));
        // Every failed request of that kind timed out.
        let etcd_slow = v.iter().map(|x| &x.0).filter(|r| r.is_err()).all(timed_out);
        let web_slow = v.iter().map(|x| &x.1).filter(|r| r.is_err()).all(timed_out);
        if (etcd_out || web_out) && (!etcd_out || etcd_slow) && (!web_out || web_slow) {
            t.timeouts_only += 1;
        }
        // Down = neither etcd nor the service even listens (rebooting);
        // a slow host is not down.
        let refused = |r: &Result<(), String>| r.as_ref().is_err_and(|e| e.ends_with("refused"));
        t.max_down = t
            .max_down
            .max(v.iter().filter(|(e, w)| refused(e) && refused(w)).count());
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_fault_windows_apart() {
        let ok = (Ok(()), Ok(()));
        let down = (Err("put: refused".to_string()), Err("refused".to_string()));
        let slow = (
            Err("put: timed out after 5.0 s".to_string()),
            Err("timed out after 5.0 s".to_string()),
        );
        let mut m = BTreeMap::new();
        for s in 0..20u64 {
            let v = match s {
                // A host reboots: the others serve.
                3 => vec![down.clone(), ok.clone(), ok.clone()],
                // Nobody serves etcd, outside any window.
                5 => vec![(Err("put: HTTP 503".into()), Ok(())); 3],
                // Every member slow: lost to timeouts alone.
                6 => vec![slow.clone(); 3],
                // One down, the others slow: not timeouts alone.
                7 => vec![down.clone(), slow.clone(), slow.clone()],
                // The fault's seconds: etcd and the service out.
                10 | 11 => vec![down.clone(); 3],
                _ => vec![ok.clone(); 3],
            };
            m.insert(s, v);
        }
        let holders = BTreeMap::from([(3, vec![0]), (7, vec![0])]);
        let t = tally(&m, &[(9, 12)], &holders);
        assert_eq!(
            t,
            Tally {
                etcd_down: 3,
                web_down: 2,
                max_down: 1,
                // 0..=16 (the last 3 left out), 4 of them the fault's.
                secs: 13,
                fault_etcd_down: 2,
                fault_web_down: 2,
                timeouts_only: 1,
            }
        );
        let t = tally(&m, &[], &holders);
        assert_eq!((t.etcd_down, t.web_down, t.timeouts_only), (5, 4, 1));
    }
}
