//! What the hosts say: versions, the lock, swarm nodes, etcd members,
//! memory, and the waits built on them (each with its deadline).

use super::host::Host;
use super::probe::{etcd_post, http};
use super::{remaining, step};
use anyhow::bail;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use std::time::{Duration, Instant};

/// The version each host runs and the lock holders, once all are `want`,
/// nobody holds the lock and every swarm node is active; or a timeout.
pub(super) fn wait_converged(
    hosts: &[Host],
    want: &str,
    limit: Duration,
    t0: &Instant,
) -> anyhow::Result<Vec<String>> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        let mut versions = Vec::new();
        for h in hosts {
            let v = h
                .ssh
                .run("updatectl status --json")
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                .and_then(|s| s["running_version"].as_str().map(str::to_string))
                .unwrap_or_else(|| "?".into());
            versions.push(v);
        }
        let holders = lock_holders(hosts).unwrap_or(usize::MAX);
        let nodes = hosts
            .iter()
            .find_map(|h| node_ls(h).ok())
            .unwrap_or_default();
        let all_active =
            nodes.len() == hosts.len() && nodes.iter().all(|n| n.1 == "Ready" && n.2 == "Active");
        let now = format!("versions {versions:?}, lock holders {holders}, nodes {nodes:?}");
        if now != last {
            step(t0, &now);
            last = now;
        }
        if versions.iter().all(|v| v == want) && holders == 0 && all_active {
            return Ok(versions);
        }
        if start.elapsed() > limit {
            bail!(
                "not converged on {want} after {} s: {last}",
                limit.as_secs()
            );
        }
        // Each round starts updatectl on every host and the docker CLI on
        // one (a Go binary whose start alone is a second of a TCG guest's
        // CPU): every 10 s rather than 5, convergence is seen at most 5 s
        // later and the guests keep the difference.
        std::thread::sleep(Duration::from_secs(10));
    }
}

/// The reboot semaphore's holders, through any member that answers.
pub(super) fn lock_holders_list(hosts: &[Host]) -> anyhow::Result<Vec<String>> {
    let c = http();
    for h in hosts {
        if let Ok(r) = etcd_post(
            &c,
            &h.etcd(),
            "/v3/kv/range",
            serde_json::json!({"key": B64.encode(lock_key())}),
        ) {
            let Some(v) = r["kvs"][0]["value"].as_str() else {
                return Ok(Vec::new());
            };
            let sem: serde_json::Value = serde_json::from_slice(&B64.decode(v)?)?;
            return Ok(sem["holders"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|h| h.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default());
        }
    }
    bail!("no etcd member answered")
}

pub(super) fn lock_holders(hosts: &[Host]) -> anyhow::Result<usize> {
    Ok(lock_holders_list(hosts)?.len())
}

/// `docker node ls` from a manager: (hostname, status, availability).
pub(super) fn node_ls(h: &Host) -> anyhow::Result<Vec<(String, String, String)>> {
    let o = h
        .ssh
        .run("docker node ls --format '{{.Hostname}} {{.Status}} {{.Availability}}'")?;
    if !o.status.success() {
        bail!(
            "{}: docker node ls: {}",
            h.name,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let mut v: Vec<(String, String, String)> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [a, b, c] => Some((a.to_string(), b.to_string(), c.to_string())),
                _ => None,
            }
        })
        .collect();
    v.sort();
    Ok(v)
}

/// etcd's member list and each member's health, through any member.
pub(super) fn etcd_members(hosts: &[Host]) -> anyhow::Result<Vec<String>> {
    let c = http();
    let mut err = String::new();
    for h in hosts {
        match etcd_post(
            &c,
            &h.etcd(),
            "/v3/cluster/member/list",
            serde_json::json!({}),
        ) {
            Ok(r) => {
                let mut names: Vec<String> = r["members"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|m| m["name"].as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                names.sort();
                return Ok(names);
            }
            Err(e) => err = e.to_string(),
        }
    }
    bail!("no etcd member answered the member list: {err}")
}

pub(super) fn all_healthy(hosts: &[Host]) -> bool {
    let c = http();
    hosts.iter().all(|h| {
        c.get(format!("{}/health", h.etcd()))
            .send()
            .ok()
            .and_then(|r| r.json::<serde_json::Value>().ok())
            .is_some_and(|v| v["health"] == "true")
    })
}

pub(super) fn mem_used_mib(h: &Host) -> anyhow::Result<u64> {
    let m = h.sh("cat /proc/meminfo")?;
    let get = |k: &str| {
        m.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((get("MemTotal:") - get("MemAvailable:")) / 1024)
}

pub(super) fn wait_for(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let t = Instant::now();
    let overall = remaining() < limit;
    let limit = limit.min(remaining());
    let mut last = String::new();
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if t.elapsed() > limit {
            bail!(
                "{what}: not after {} s{} {last}",
                limit.as_secs(),
                if overall {
                    " (cut to what was left of the run's --deadline-minutes)"
                } else {
                    ""
                }
            );
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// The hostnames running a task of `svc` now.
pub(super) fn running_on(h: &Host, svc: &str) -> anyhow::Result<Vec<String>> {
    Ok(h
        .sh(&format!(
            "docker service ps {svc} --filter desired-state=running --format '{{{{.Node}}}} {{{{.CurrentState}}}}'"
        ))?
        .lines()
        .filter(|l| l.contains(" Running"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// Each host's name in the lock's holders.
pub(super) fn lock_ids(hosts: &[Host]) -> Vec<String> {
    hosts.iter().map(|h| h.lock_id.clone()).collect()
}

/// Which reboot lock the hosts use (`cargo xtask cluster --lock`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LockKind {
    /// REBOOT_STRATEGY=etcd-lock: locksmith's semaphore in the hosts' etcd.
    #[default]
    Etcd,
    /// REBOOT_STRATEGY=fleetlock against nimbus-fleetlock (run by the
    /// harness, keeping airlock's semaphore in the hosts' etcd).
    Fleetlock,
}

static LOCK: std::sync::OnceLock<LockKind> = std::sync::OnceLock::new();

pub(super) fn set_lock_kind(k: LockKind) {
    let _ = LOCK.set(k);
}

pub(super) fn lock_kind() -> LockKind {
    LOCK.get().copied().unwrap_or_default()
}

/// Where the semaphore lives in etcd.
pub(super) fn lock_key() -> String {
    match lock_kind() {
        LockKind::Etcd => nimbus::etcd_keys::REBOOT_LOCK.to_string(),
        LockKind::Fleetlock => nimbus::fleetlock::semaphore_key(nimbus::fleetlock::DEFAULT_GROUP),
    }
}

/// How a host with this machine-id appears among the holders: the
/// machine-id itself (locksmith), or the app-specific node id (FleetLock).
pub(super) fn lock_id(machine_id: &str) -> anyhow::Result<String> {
    Ok(match lock_kind() {
        LockKind::Etcd => machine_id.to_string(),
        LockKind::Fleetlock => {
            nimbus::fleetlock::node_id(machine_id).map_err(|e| anyhow::anyhow!(e))?
        }
    })
}

pub(super) fn probe_targets(hosts: &[Host]) -> Vec<(String, u16)> {
    hosts.iter().map(|h| (h.etcd(), h.web_port)).collect()
}

/// Boots on the console so far (stage 1's selection line, each boot once).
pub(super) fn boots(h: &Host) -> usize {
    let prev =
        std::fs::read_to_string(h.console.with_extension("console.prev")).unwrap_or_default();
    let now = std::fs::read_to_string(&h.console).unwrap_or_default();
    prev.matches("nimbus-init: selected").count() + now.matches("nimbus-init: selected").count()
}

pub(super) fn fmt_nodes(nodes: &[(String, String, String)]) -> String {
    nodes
        .iter()
        .map(|(h, s, av)| format!("{h}:{s}:{av}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The host holding the reboot lock (by its lock id), as an index.
pub(super) fn holder_index(hosts: &[Host]) -> anyhow::Result<Option<usize>> {
    let holders = lock_holders_list(hosts)?;
    let Some(id) = holders.first() else {
        return Ok(None);
    };
    match hosts.iter().position(|h| &h.lock_id == id) {
        Some(i) => Ok(Some(i)),
        None => bail!("lock held by {id}, which is none of the hosts"),
    }
}

/// A node's availability, asked of any manager but `skip`.
pub(super) fn availability(hosts: &[Host], skip: usize, of: &str) -> Option<String> {
    hosts
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != skip)
        .find_map(|(_, h)| node_ls(h).ok())
        .and_then(|nodes| nodes.into_iter().find(|n| n.0 == of).map(|n| n.2))
}

/// Tasks still running on `of` (or about to), asked of any manager but
/// `skip`.
pub(super) fn tasks_on(hosts: &[Host], skip: usize, of: &str) -> Option<usize> {
    hosts
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != skip)
        .find_map(|(_, h)| {
            h.ssh
                .run(&format!(
                    "docker node ps {of} --format '{{{{.CurrentState}}}}'"
                ))
                .ok()
                .filter(|o| o.status.success())
        })
        .map(|o| {
            // Running or about to: not yet a finished task.
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| {
                    let w = l.split_whitespace().next().unwrap_or("");
                    !w.is_empty()
                        && ![
                            "Shutdown", "Complete", "Failed", "Rejected", "Orphaned", "Remove",
                        ]
                        .contains(&w)
                })
                .count()
        })
}
