//! nimbus-swarm: a host's Docker swarm membership, as cloud-config's
//! `nimbus.swarm` describes it, and the update hooks that drain the host
//! before update-engine reboots it and make it active again after.
//!
//! Docker's swarm mode does the scheduling (fleet's job on CoreOS): this
//! crate only joins hosts and moves their tasks away around a reboot. The
//! logic runs over [`Docker`] (the `docker` CLI and, for what carries a
//! token, the Engine API socket on a host; a script in the tests) and
//! [`Shared`] (etcd on a host, a map in the tests), so it is tested
//! without either.
//!
//! Join tokens: the host with `init` starts the swarm and publishes the
//! **worker** token in etcd under [`TOKEN_KEY`]`/worker`, sealed with the
//! cluster secret ([`seal`]); the manager token never leaves a manager.
//! Every other host joins as a worker (the token in the API request's
//! body, never on a command line), and one that is to be a manager asks
//! under [`PROMOTE_KEY`]; a manager's `nimbus-swarm promote` promotes the
//! nodes its configuration names ([`promote_named`]).

pub mod engine;
pub mod seal;

use std::time::{Duration, Instant};

pub use nimbus::etcd_keys::SWARM_FOUNDER as FOUNDER_KEY;
pub use nimbus::etcd_keys::SWARM_JOIN_TOKEN as TOKEN_KEY;
pub use nimbus::etcd_keys::SWARM_PROMOTE as PROMOTE_KEY;

/// The worker token's key in etcd.
pub fn worker_token_key() -> String {
    format!("{TOKEN_KEY}/worker")
}

#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("{path}: line {line}: {reason}")]
    Conf {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    ConfMissing { path: String, reason: String },
    #[error("`docker {args}` failed: {reason}")]
    Docker { args: String, reason: String },
    #[error("`docker {args}`: unexpected output {output:?}")]
    DockerOutput { args: String, output: String },
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("{0}")]
    Gave(String),
}

/// `/etc/nimbus/swarm.conf` (written by cloud-config; the contract is
/// `nimbus::swarmconf`).
pub use nimbus::swarmconf::{Init, SwarmConf};

/// Parse swarm.conf, the error naming the file.
pub fn parse_conf(path: &str, text: &str) -> Result<SwarmConf, SwarmError> {
    SwarmConf::parse(text).map_err(|e| match e.line {
        Some(line) => SwarmError::Conf {
            path: path.into(),
            line,
            reason: e.reason,
        },
        None => SwarmError::ConfMissing {
            path: path.into(),
            reason: e.reason,
        },
    })
}

/// The narrow seam to Docker: run the CLI, get its standard output; and
/// the join, whose token must not be on a command line.
pub trait Docker {
    fn run(&mut self, args: &[&str]) -> Result<String, SwarmError>;
    fn join_swarm(&mut self, req: &engine::JoinRequest) -> Result<(), SwarmError>;
}

/// What hosts share through etcd: whole keys.
pub trait Shared {
    fn get(&mut self, key: &str) -> Result<Option<String>, SwarmError>;
    fn put(&mut self, key: &str, value: &str) -> Result<(), SwarmError>;
    /// Write `key` only if it does not exist (one transaction); false when
    /// it did.
    fn create(&mut self, key: &str, value: &str) -> Result<bool, SwarmError>;
    fn delete(&mut self, key: &str) -> Result<(), SwarmError>;
}

/// What `docker info` says of this node's swarm membership.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize)]
pub struct SwarmInfo {
    #[serde(rename = "NodeID", default)]
    pub node_id: String,
    /// inactive, pending, active, error, locked.
    #[serde(rename = "LocalNodeState", default)]
    pub state: String,
    #[serde(rename = "ControlAvailable", default)]
    pub manager: bool,
    #[serde(rename = "Error", default)]
    pub error: String,
}

pub fn info(d: &mut dyn Docker) -> Result<SwarmInfo, SwarmError> {
    let args = ["info", "--format", "{{json .Swarm}}"];
    let out = d.run(&args)?;
    serde_json::from_str(out.trim()).map_err(|_| SwarmError::DockerOutput {
        args: args.join(" "),
        output: out.chars().take(200).collect(),
    })
}

/// Time and output for the long waits: a real clock and stdout on a host,
/// a fake in the tests.
pub trait Waiter {
    fn sleep(&mut self, d: Duration);
    fn elapsed(&self) -> Duration;
    fn say(&mut self, line: &str);
}

pub struct RealWaiter {
    start: Instant,
}

impl RealWaiter {
    pub fn new() -> RealWaiter {
        RealWaiter {
            start: Instant::now(),
        }
    }
}

impl Default for RealWaiter {
    fn default() -> Self {
        Self::new()
    }
}

impl Waiter for RealWaiter {
    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d)
    }
    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
    fn say(&mut self, line: &str) {
        // The hook's output is update-engine's status line: one per line,
        // flushed at once.
        use std::io::Write;
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{line}");
        let _ = o.flush();
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    AlreadyMember,
    Initialised,
    Joined { via: String },
}

/// A manager's duty to etcd: the worker token there, sealed and current
/// (tokens can be rotated by hand), and no manager token there. One left
/// by an older release, readable by whoever could read etcd then, is
/// deleted and the manager token rotated, so the copy out there is void.
fn publish_tokens(
    conf: &SwarmConf,
    d: &mut dyn Docker,
    t: &mut dyn Shared,
    w: &mut dyn Waiter,
) -> Result<(), SwarmError> {
    let manager_key = format!("{TOKEN_KEY}/manager");
    if t.get(&manager_key)?.is_some() {
        d.run(&["swarm", "join-token", "--rotate", "-q", "manager"])?;
        t.delete(&manager_key)?;
        w.say("a manager join token was in etcd: rotated (the old one is void) and deleted");
    }
    let Some(secret) = &conf.secret else {
        return Ok(());
    };
    let tok = d.run(&["swarm", "join-token", "-q", "worker"])?;
    let tok = tok.trim();
    if !tok.starts_with("SWMTKN-") {
        return Err(SwarmError::DockerOutput {
            args: "swarm join-token -q worker".into(),
            output: engine::redact(tok),
        });
    }
    let key = worker_token_key();
    // Sealing draws a fresh nonce: compare what is there once opened, so
    // an unchanged token is not rewritten at every boot.
    let current = t.get(&key)?.and_then(|v| seal::open(secret, &key, &v).ok());
    if current.as_deref() != Some(tok) {
        let sealed = seal::seal(secret, &key, tok).map_err(|e| SwarmError::Gave(e.to_string()))?;
        t.put(&key, &sealed)?;
    }
    Ok(())
}

/// The worker token: the user-data's, else etcd's, opened.
fn worker_token(conf: &SwarmConf, t: &mut dyn Shared) -> Result<Option<String>, String> {
    if let Some(tok) = &conf.join_token {
        return Ok(Some(tok.clone()));
    }
    let key = worker_token_key();
    let Some(v) = t
        .get(&key)
        .map_err(|e| format!("reading the worker join token from etcd: {e}"))?
    else {
        return Ok(None);
    };
    let secret = conf
        .secret
        .as_ref()
        .ok_or("no cluster secret (nimbus.swarm.secret) to open the worker token in etcd")?;
    seal::open(secret, &key, &v)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Ask the managers to promote this node (its hostname and node ID).
fn request_promotion(d: &mut dyn Docker, t: &mut dyn Shared) -> Result<String, SwarmError> {
    let i = info(d)?;
    let host = d
        .run(&["info", "--format", "{{.Name}}"])?
        .trim()
        .to_string();
    t.put(&format!("{PROMOTE_KEY}/{host}"), &i.node_id)?;
    Ok(host)
}

/// This host's swarm address as others dial it: `ADVERTISE_ADDR` with
/// swarm's port when it names none.
pub fn swarm_addr(advertise: &str) -> String {
    match advertise.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(a)) => format!("[{a}]:2377"),
        Ok(a) => format!("{a}:2377"),
        Err(_) => advertise.to_string(),
    }
}

/// Who starts the swarm under `INIT=auto`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Founder {
    Me,
    Other(String),
}

/// `INIT=auto`: claim [`FOUNDER_KEY`] in etcd (created only if absent, so
/// of hosts racing with the same user-data exactly one wins), or learn who
/// did. Waits up to `limit` for etcd to answer.
fn founder(
    conf: &SwarmConf,
    t: &mut dyn Shared,
    w: &mut dyn Waiter,
    limit: Duration,
) -> Result<Founder, SwarmError> {
    let mine = swarm_addr(&conf.advertise_addr);
    loop {
        let step = (|| -> Result<Option<Founder>, SwarmError> {
            match t.get(FOUNDER_KEY)? {
                Some(v) if v == mine => {
                    // This host claimed it before: it crashed before its
                    // swarm was up (start it now), or it left a swarm that
                    // the others keep (joining nobody would split it).
                    if t.get(&worker_token_key())?.is_none() {
                        Ok(Some(Founder::Me))
                    } else if let Some(other) = conf.join.first() {
                        Ok(Some(Founder::Other(other.clone())))
                    } else {
                        Err(SwarmError::Gave(format!(
                            "this host ({mine}) started the swarm ({FOUNDER_KEY} in etcd) but is no longer in it, and no JOIN names another manager: give `join`, or delete {FOUNDER_KEY} to start a new swarm"
                        )))
                    }
                }
                Some(v) => Ok(Some(Founder::Other(v))),
                None => Ok(t.create(FOUNDER_KEY, &mine)?.then_some(Founder::Me)),
            }
        })();
        match step {
            Ok(Some(f)) => return Ok(f),
            // Lost the race: read the winner on the next round (bounded
            // too: a member that keeps answering "absent" to the read
            // and "present" to the create is not waited on forever).
            Ok(None) if w.elapsed() < limit => w.sleep(Duration::from_secs(1)),
            Ok(None) => {
                return Err(SwarmError::Gave(format!(
                "{FOUNDER_KEY}: the create lost to another host for {} s, but the key never showed",
                limit.as_secs()
            )))
            }
            Err(e @ SwarmError::Gave(_)) => return Err(e),
            Err(e) if w.elapsed() < limit => {
                w.say(&format!(
                    "waiting for etcd to learn who starts the swarm: {e}"
                ));
                w.sleep(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Make this host what `conf` says: start the swarm, or join it. Waits up
/// to `limit` for a token to appear in etcd and for a manager to answer.
pub fn join(
    conf: &SwarmConf,
    d: &mut dyn Docker,
    t: &mut dyn Shared,
    w: &mut dyn Waiter,
    limit: Duration,
) -> Result<Joined, SwarmError> {
    let i = info(d)?;
    if i.state == "active" {
        if i.manager {
            if let Err(e) = publish_tokens(conf, d, t, w) {
                w.say(&format!("cannot publish the worker token yet: {e}"));
            }
        } else if conf.manager() {
            // Joined as a worker before a manager promoted it: ask again.
            if let Err(e) = request_promotion(d, t) {
                w.say(&format!("cannot ask to be promoted yet: {e}"));
            }
        }
        return Ok(Joined::AlreadyMember);
    }
    let mut join_list = conf.join.clone();
    let init = match conf.init {
        Init::Yes => true,
        Init::No => false,
        Init::Auto => match founder(conf, t, w, limit)? {
            Founder::Me => {
                w.say("claimed the swarm's founding in etcd: starting it here");
                true
            }
            Founder::Other(addr) => {
                w.say(&format!("the swarm is started by {addr}: joining it"));
                if !join_list.contains(&addr) {
                    join_list.insert(0, addr);
                }
                false
            }
        },
    };
    if init {
        let mut args = vec![
            "swarm",
            "init",
            "--advertise-addr",
            conf.advertise_addr.as_str(),
        ];
        if let Some(l) = &conf.listen_addr {
            args.extend(["--listen-addr", l.as_str()]);
        }
        d.run(&args)?;
        if conf.secret.is_none() {
            w.say("swarm initialised; no cluster secret, so no worker token in etcd (other hosts need join_token)");
            return Ok(Joined::Initialised);
        }
        w.say("swarm initialised; publishing the worker token in etcd, sealed");
        loop {
            match publish_tokens(conf, d, t, w) {
                Ok(()) => return Ok(Joined::Initialised),
                Err(e) if w.elapsed() < limit => {
                    w.say(&format!(
                        "waiting for etcd to publish the worker token: {e}"
                    ));
                    w.sleep(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }
    let mut last = String::new();
    loop {
        let token = match worker_token(conf, t) {
            Ok(t) => t,
            Err(e) => {
                last = e;
                None
            }
        };
        if let Some(token) = token {
            for m in &join_list {
                let req = engine::JoinRequest {
                    listen_addr: conf
                        .listen_addr
                        .clone()
                        .unwrap_or_else(|| "0.0.0.0:2377".into()),
                    advertise_addr: conf.advertise_addr.clone(),
                    remote_addrs: vec![m.clone()],
                    join_token: token.clone(),
                };
                match d.join_swarm(&req) {
                    Ok(()) => {
                        if conf.manager() {
                            match request_promotion(d, t) {
                                Ok(h) => w.say(&format!(
                                    "joined as a worker via {m}; asked the managers to promote {h}"
                                )),
                                Err(e) => w.say(&format!(
                                    "joined as a worker via {m}; asking to be promoted failed (asked again at the next start): {e}"
                                )),
                            }
                        }
                        return Ok(Joined::Joined { via: m.clone() });
                    }
                    Err(e) => last = format!("joining via {m}: {e}"),
                }
            }
        } else if last.is_empty() {
            last = format!("no worker join token in etcd yet ({})", worker_token_key());
        }
        if w.elapsed() >= limit {
            return Err(SwarmError::Gave(format!(
                "not in the swarm after {} s: {last}",
                limit.as_secs()
            )));
        }
        w.say(&format!("waiting to join: {last}"));
        w.sleep(Duration::from_secs(2));
    }
}

/// One round of a manager's promotions: every worker whose hostname is in
/// `conf.managers` and who asked under [`PROMOTE_KEY`] with its own node
/// ID is promoted (a node that merely calls itself by a manager's name,
/// without having asked through the cluster's authenticated etcd, is
/// not). Returns the hostnames promoted; does nothing off a manager.
pub fn promote_named(
    conf: &SwarmConf,
    d: &mut dyn Docker,
    t: &mut dyn Shared,
) -> Result<Vec<String>, SwarmError> {
    if conf.managers.is_empty() {
        return Ok(Vec::new());
    }
    let i = info(d)?;
    if i.state != "active" || !i.manager {
        return Ok(Vec::new());
    }
    let nodes = d.run(&[
        "node",
        "ls",
        "--format",
        "{{.ID}}\t{{.Hostname}}\t{{.ManagerStatus}}",
    ])?;
    let mut done = Vec::new();
    for l in nodes.lines() {
        let f: Vec<&str> = l.split('\t').map(str::trim).collect();
        let [id, host, status] = f[..] else {
            continue;
        };
        if !status.is_empty() || !conf.managers.iter().any(|m| m == host) {
            continue;
        }
        let asked = t.get(&format!("{PROMOTE_KEY}/{host}"))?;
        if asked.as_deref().map(str::trim) != Some(id) {
            continue;
        }
        d.run(&["node", "promote", id])?;
        done.push(host.to_string());
    }
    Ok(done)
}

/// A replicated service's `Replicas` column: "2/3", "3/3 (max 1 per node)".
pub fn replicas(s: &str) -> Option<(u64, u64)> {
    let head = s.split_whitespace().next()?;
    let (a, b) = head.split_once('/')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Task states (`docker node ps` CurrentState, first word) of a task that
/// runs on the node or will: anything but a finished task.
const LIVE_STATES: &[&str] = &[
    "New",
    "Pending",
    "Assigned",
    "Accepted",
    "Preparing",
    "Ready",
    "Starting",
    "Running",
];

/// The services that have a task on `node` that should run: before the
/// drain, the ones it moves, and so the only ones it waits to see whole.
pub fn services_here(
    d: &mut dyn Docker,
    node: &str,
) -> Result<std::collections::BTreeSet<String>, SwarmError> {
    let tasks = d.run(&[
        "node",
        "ps",
        node,
        "--filter",
        "desired-state=running",
        "--format",
        "{{.Name}}",
    ])?;
    Ok(tasks
        .lines()
        .filter_map(|l| Some(l.trim().rsplit_once('.')?.0.to_string()))
        .filter(|s| !s.is_empty())
        .collect())
}

/// What still keeps a drain from being done, in words; `None` when done.
/// Only the services in `moved` (those that had tasks here; all when not
/// known) must be back at full strength: a service crash-looping on other
/// nodes is not this drain's to wait for, and waiting for it would hold
/// every host's update.
pub fn drain_pending(
    d: &mut dyn Docker,
    node: &str,
    moved: Option<&std::collections::BTreeSet<String>>,
) -> Result<Option<String>, SwarmError> {
    // Every task the node still runs or is about to, whatever the swarm
    // now wants of it: right after the drain is set, a task's desired
    // state is already "shutdown" while it still runs here.
    let tasks = d.run(&[
        "node",
        "ps",
        node,
        "--format",
        "{{.Name}}\t{{.CurrentState}}",
    ])?;
    let here: Vec<&str> = tasks
        .lines()
        .filter_map(|l| {
            let (name, state) = l.split_once('\t')?;
            let state = state.split_whitespace().next().unwrap_or("");
            LIVE_STATES.contains(&state).then_some(name.trim())
        })
        .collect();
    let services = d.run(&[
        "service",
        "ls",
        "--format",
        "{{.Name}}\t{{.Mode}}\t{{.Replicas}}",
    ])?;
    let mut short = Vec::new();
    for l in services.lines() {
        let f: Vec<&str> = l.split('\t').collect();
        if let [name, "replicated", reps] = f.as_slice() {
            if moved.is_some_and(|m| !m.contains(*name)) {
                continue;
            }
            match replicas(reps) {
                Some((a, b)) if a < b => short.push(format!("{name} {a}/{b}")),
                Some(_) => {}
                None => short.push(format!("{name} {reps:?}")),
            }
        }
    }
    if here.is_empty() && short.is_empty() {
        return Ok(None);
    }
    let mut why = Vec::new();
    if !here.is_empty() {
        why.push(format!(
            "{} task(s) still on this node ({})",
            here.len(),
            here.join(", ")
        ));
    }
    if !short.is_empty() {
        why.push(format!(
            "services not at full strength: {}",
            short.join(", ")
        ));
    }
    Ok(Some(why.join("; ")))
}

/// Services whose every running task is on node `node`, with how many
/// run here: draining the node now would stop their last running copies.
/// `host` is this node's hostname once known (asked of Docker when needed).
pub fn only_here(
    d: &mut dyn Docker,
    node: &str,
    host: &mut Option<String>,
) -> Result<Vec<(String, usize)>, SwarmError> {
    let tasks = d.run(&[
        "node",
        "ps",
        node,
        "--filter",
        "desired-state=running",
        "--format",
        "{{.Name}}",
    ])?;
    let mut services: Vec<&str> = tasks
        .lines()
        .filter_map(|l| Some(l.trim().rsplit_once('.')?.0))
        .filter(|s| !s.is_empty())
        .collect();
    services.sort_unstable();
    services.dedup();
    let mut out = Vec::new();
    for svc in services {
        let h = match host {
            Some(h) => h.clone(),
            None => {
                let h = d
                    .run(&[
                        "node",
                        "inspect",
                        node,
                        "--format",
                        "{{.Description.Hostname}}",
                    ])?
                    .trim()
                    .to_string();
                *host = Some(h.clone());
                h
            }
        };
        let nodes = running_nodes(d, svc)?;
        if !nodes.is_empty() && nodes.iter().all(|n| *n == h) {
            out.push((svc.to_string(), nodes.len()));
        }
    }
    Ok(out)
}

/// A service's desired replicas (`None` for a global one) and whether a
/// rolling update of it is under way.
fn service_state(d: &mut dyn Docker, svc: &str) -> Result<(Option<u64>, bool), SwarmError> {
    let args = [
        "service",
        "inspect",
        svc,
        "--format",
        "{{if .Spec.Mode.Replicated}}{{.Spec.Mode.Replicated.Replicas}}{{else}}global{{end}} {{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}",
    ];
    let out = d.run(&args)?;
    let mut f = out.split_whitespace();
    let want = match f.next() {
        Some("global") => None,
        Some(n) => Some(n.parse().map_err(|_| SwarmError::DockerOutput {
            args: args.join(" "),
            output: out.chars().take(200).collect(),
        })?),
        None => {
            return Err(SwarmError::DockerOutput {
                args: args.join(" "),
                output: out.chars().take(200).collect(),
            })
        }
    };
    Ok((want, f.next() == Some("updating")))
}

/// The hostnames of the nodes running a task of `svc` now (one per task).
fn running_nodes(d: &mut dyn Docker, svc: &str) -> Result<Vec<String>, SwarmError> {
    let out = d.run(&[
        "service",
        "ps",
        svc,
        "--filter",
        "desired-state=running",
        "--format",
        "{{.Node}}\t{{.CurrentState}}",
    ])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let (n, st) = l.split_once('\t')?;
            st.starts_with("Running").then(|| n.trim().to_string())
        })
        .collect())
}

/// Before a drain: no service may have its last running copies here.
/// Those that do are moved first: the node is paused (nothing new is
/// placed on it, what runs keeps running) and each such service gets a
/// forced rolling update under its own update settings, whose new tasks
/// can only start elsewhere; this waits until each has a copy running on
/// another node. (Docker never moves tasks back to a node that becomes
/// active again, so after a few drains a service's replicas can all sit on
/// one node, and draining that node would stop all of them at once.)
///
/// A forced update stops a copy before its replacement runs (Docker's
/// default `stop-first`), so it is only asked while at least two copies
/// run here, or of a one-replica service (which cannot move without a
/// gap), and never on top of an update already under way: with a single
/// running copy and the others still starting, the move would stop the
/// service (a cluster run lost it for 51 s that way).
fn move_last_copies(d: &mut dyn Docker, w: &mut dyn Waiter, node: &str) {
    let mut host: Option<String> = None;
    let mut forced: Vec<String> = Vec::new();
    let mut paused = false;
    let mut said = String::new();
    loop {
        let why = match only_here(d, node, &mut host) {
            Ok(v) if v.is_empty() => {
                if !forced.is_empty() {
                    w.say(&format!(
                        "moved first: {} now run(s) on another node too",
                        forced.join(", ")
                    ));
                }
                return;
            }
            Ok(v) => {
                let mut waits = Vec::new();
                for (svc, here) in &v {
                    if forced.contains(svc) {
                        waits.push(format!("{svc} (moving)"));
                        continue;
                    }
                    let ready = match service_state(d, svc) {
                        Ok((_, true)) => Err("an update of it is under way".to_string()),
                        Ok((want, false)) if *here >= 2 || want == Some(1) => Ok(()),
                        Ok(_) => Err(format!(
                            "{here} running copy, here; the others are not running yet"
                        )),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(e) = ready {
                        waits.push(format!("{svc}: {e}"));
                        continue;
                    }
                    if !paused {
                        match d.run(&["node", "update", "--availability", "pause", node]) {
                            Ok(_) => paused = true,
                            Err(e) => {
                                waits.push(format!("pausing this node: {e}"));
                                continue;
                            }
                        }
                    }
                    match d.run(&["service", "update", "--force", "--detach", svc]) {
                        Ok(_) => {
                            forced.push(svc.clone());
                            waits.push(format!("{svc} (moving)"));
                        }
                        Err(e) => waits.push(format!("moving {svc}: {e}")),
                    }
                }
                format!(
                    "waiting: the only running copies of {} are on this node; moving them first: {}",
                    v.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>().join(", "),
                    waits.join("; ")
                )
            }
            Err(e) => format!("asking the swarm, trying again: {e}"),
        };
        if why != said {
            w.say(&why);
            said = why;
        }
        w.sleep(Duration::from_secs(2));
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drained {
    NotInSwarm,
    /// Docker lets only managers change a node's availability.
    Worker,
    Drained {
        node: String,
    },
}

/// Set this node to drain and wait until its tasks run elsewhere.
/// update-engine stops the hook at HOOK_TIMEOUT; the line said last is why.
pub fn drain(d: &mut dyn Docker, w: &mut dyn Waiter) -> Result<Drained, SwarmError> {
    let i = info(d)?;
    if i.state != "active" {
        w.say(&format!("not in a swarm ({}): nothing to drain", i.state));
        return Ok(Drained::NotInSwarm);
    }
    if !i.manager {
        w.say("a worker node: not drained (only managers may change availability); its tasks move when it goes down");
        return Ok(Drained::Worker);
    }
    // A busy manager answers a control call with DeadlineExceeded when its
    // raft commit is slow, though the change may still land: every call
    // here is idempotent, so it is asked again; update-engine's
    // HOOK_TIMEOUT bounds the whole drain and shows the last line said.
    move_last_copies(d, w, &i.node_id);
    // Which services this drain moves (unknown: wait for all of them).
    let moved = services_here(d, &i.node_id).ok();
    while let Err(e) = d.run(&["node", "update", "--availability", "drain", &i.node_id]) {
        w.say(&format!("setting drain, trying again: {e}"));
        w.sleep(Duration::from_secs(2));
    }
    w.say(&format!("node {} set to drain", i.node_id));
    let mut said = String::new();
    loop {
        let why = match drain_pending(d, &i.node_id, moved.as_ref()) {
            Ok(None) => {
                w.say("drained: every task runs elsewhere");
                return Ok(Drained::Drained { node: i.node_id });
            }
            Ok(Some(why)) => format!("waiting: {why}"),
            Err(e) => format!("asking the swarm, trying again: {e}"),
        };
        if why != said {
            w.say(&why);
            said = why;
        }
        // Each look is two docker CLI runs: every 2 s keeps a small
        // host's CPU for the tasks that are starting.
        w.sleep(Duration::from_secs(2));
    }
}

/// After the reboot: wait for this node to be back in the swarm, then make
/// it active (a no-op if it already is). Gives up after `limit`.
pub fn activate(
    d: &mut dyn Docker,
    w: &mut dyn Waiter,
    limit: Duration,
) -> Result<Option<String>, SwarmError> {
    // Right after a boot dockerd may not answer yet, and a busy manager
    // may time out a control call (see drain): both are asked again until
    // `limit`.
    let retry = |w: &mut dyn Waiter, e: SwarmError| {
        if w.elapsed() >= limit {
            return Err(SwarmError::Gave(format!(
                "not activated after {} s: {e}",
                limit.as_secs()
            )));
        }
        w.say(&format!("trying again: {e}"));
        w.sleep(Duration::from_secs(2));
        Ok(())
    };
    loop {
        let i = match info(d) {
            Ok(i) => i,
            Err(e) => {
                retry(w, e)?;
                continue;
            }
        };
        match (i.state.as_str(), i.manager) {
            ("inactive", _) => {
                w.say("not in a swarm: nothing to activate");
                return Ok(None);
            }
            ("active", false) => {
                w.say("a worker node: its availability was not changed");
                return Ok(None);
            }
            ("active", true) => {
                match d.run(&["node", "update", "--availability", "active", &i.node_id]) {
                    Ok(_) => {
                        w.say(&format!("node {} is active again", i.node_id));
                        return Ok(Some(i.node_id));
                    }
                    Err(e) => retry(w, e)?,
                }
            }
            (state, _) => {
                if w.elapsed() >= limit {
                    return Err(SwarmError::Gave(format!(
                        "the node is {state} in the swarm after {} s{}",
                        limit.as_secs(),
                        if i.error.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", i.error)
                        }
                    )));
                }
                w.say(&format!("waiting for the swarm: node is {state}"));
                w.sleep(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Answers in order, per command prefix; records every call.
    #[derive(Default)]
    struct Script {
        answers: Vec<(String, VecDeque<Result<String, String>>)>,
        calls: Vec<String>,
    }

    impl Script {
        fn on(mut self, prefix: &str, outs: &[Result<&str, &str>]) -> Script {
            self.answers.push((
                prefix.into(),
                outs.iter()
                    .map(|r| r.map(str::to_string).map_err(str::to_string))
                    .collect(),
            ));
            self
        }
    }

    impl Script {
        /// Record `line` and give the next answer scripted for it (the
        /// last one repeats).
        fn answer(&mut self, line: String, args: &str) -> Result<String, SwarmError> {
            self.calls.push(line.clone());
            for (p, q) in &mut self.answers {
                if line.starts_with(p.as_str()) {
                    let a = if q.len() > 1 {
                        q.pop_front()
                    } else {
                        q.front().cloned()
                    };
                    return a
                        .unwrap_or(Ok(String::new()))
                        .map_err(|reason| SwarmError::Docker {
                            args: args.to_string(),
                            reason,
                        });
                }
            }
            panic!("unscripted {line}");
        }
    }

    impl Docker for Script {
        fn run(&mut self, args: &[&str]) -> Result<String, SwarmError> {
            let line = args.join(" ");
            self.answer(line.clone(), &line)
        }
        fn join_swarm(&mut self, req: &engine::JoinRequest) -> Result<(), SwarmError> {
            // Recorded as the API call it is, with the body's token.
            let line = format!(
                "API join {} token={}",
                req.remote_addrs.join(","),
                req.join_token
            );
            self.answer(line, "POST /swarm/join").map(|_| ())
        }
    }

    #[derive(Default)]
    struct Mem(std::collections::BTreeMap<String, String>, u32);
    impl Shared for Mem {
        fn get(&mut self, key: &str) -> Result<Option<String>, SwarmError> {
            if self.1 > 0 {
                self.1 -= 1;
                return Err(SwarmError::Etcd("connection refused".into()));
            }
            Ok(self.0.get(key).cloned())
        }
        fn put(&mut self, key: &str, value: &str) -> Result<(), SwarmError> {
            self.0.insert(key.into(), value.into());
            Ok(())
        }
        fn create(&mut self, key: &str, value: &str) -> Result<bool, SwarmError> {
            if self.0.contains_key(key) {
                return Ok(false);
            }
            self.0.insert(key.into(), value.into());
            Ok(true)
        }
        fn delete(&mut self, key: &str) -> Result<(), SwarmError> {
            self.0.remove(key);
            Ok(())
        }
    }

    const SECRET: &str =
        "SECRET=5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a\n";

    fn secret() -> nimbus::swarmconf::Secret {
        nimbus::swarmconf::Secret([0x5a; 32])
    }

    #[derive(Default)]
    struct Fake {
        t: Duration,
        said: Vec<String>,
    }
    impl Waiter for Fake {
        fn sleep(&mut self, d: Duration) {
            self.t += d;
        }
        fn elapsed(&self) -> Duration {
            self.t
        }
        fn say(&mut self, line: &str) {
            self.said.push(line.into());
        }
    }

    const INACTIVE: &str =
        r#"{"NodeID":"","LocalNodeState":"inactive","ControlAvailable":false,"Error":""}"#;
    const MANAGER: &str =
        r#"{"NodeID":"n1","LocalNodeState":"active","ControlAvailable":true,"Error":""}"#;
    const WORKER: &str =
        r#"{"NodeID":"w1","LocalNodeState":"active","ControlAvailable":false,"Error":""}"#;
    const TOKEN_M: &str = "SWMTKN-1-aaa-mmm";
    const TOKEN_W: &str = "SWMTKN-1-aaa-www";

    fn conf(text: &str) -> SwarmConf {
        parse_conf("swarm.conf", text).expect("conf")
    }

    #[test]
    fn conf_parses_and_bad_lines_name_their_line() {
        let c = conf("# x\nROLE=manager\nINIT=no\nADVERTISE_ADDR=10.0.0.2\nJOIN=10.0.0.1:2377, 10.0.0.3:2377\n");
        assert!(c.manager() && c.init == Init::No);
        assert_eq!(c.join, ["10.0.0.1:2377", "10.0.0.3:2377"]);
        for (text, frag) in [
            ("ROLE=boss\n", "line 1: ROLE=\"boss\""),
            (
                "ROLE=worker\nINIT=yes\nADVERTISE_ADDR=a\n",
                "INIT=yes needs ROLE=manager",
            ),
            ("ROLE=worker\nADVERTISE_ADDR=a\n", "JOIN is empty"),
            ("ROLE=worker\nJOIN=a\n", "ADVERTISE_ADDR is not set"),
            ("ROLE=worker\nnonsense\n", "line 2: expected KEY=value"),
            ("ROLE=worker\nCOLOUR=red\n", "line 2: unknown key COLOUR"),
        ] {
            let e = parse_conf("swarm.conf", text).unwrap_err().to_string();
            assert!(e.contains(frag), "{text:?}: {e}");
        }
    }

    #[test]
    fn init_publishes_the_worker_token_sealed_and_never_the_manager_token() {
        let mut d = Script::default()
            .on("info", &[Ok(INACTIVE)])
            .on("swarm init", &[Ok("Swarm initialized")])
            .on("swarm join-token -q worker", &[Ok(TOKEN_W)]);
        let mut t = Mem(Default::default(), 1);
        let mut w = Fake::default();
        let c = conf(&format!(
            "ROLE=manager\nINIT=yes\nADVERTISE_ADDR=10.0.0.1\n{SECRET}"
        ));
        assert_eq!(
            join(&c, &mut d, &mut t, &mut w, Duration::from_secs(60)).unwrap(),
            Joined::Initialised
        );
        assert!(d
            .calls
            .contains(&"swarm init --advertise-addr 10.0.0.1".to_string()));
        assert!(
            !d.calls.iter().any(|c| c.contains("-q manager")),
            "{:?}",
            d.calls
        );
        let key = worker_token_key();
        let sealed = t.0.get(&key).expect("published");
        assert!(!sealed.contains("SWMTKN"), "{sealed}");
        assert_eq!(seal::open(&secret(), &key, sealed).unwrap(), TOKEN_W);
        assert!(!t.0.keys().any(|k| k.ends_with("/manager")), "{:?}", t.0);
        assert!(
            w.said.iter().any(|s| s.contains("waiting for etcd")),
            "{:?}",
            w.said
        );
        // At the next boot, the same token is not written again.
        let before = sealed.clone();
        let mut d = Script::default()
            .on("info", &[Ok(MANAGER)])
            .on("swarm join-token -q worker", &[Ok(TOKEN_W)]);
        join(&c, &mut d, &mut t, &mut w, Duration::from_secs(1)).unwrap();
        assert_eq!(t.0.get(&key), Some(&before));
    }

    /// Three hosts with the same user-data: the first to claim the key
    /// starts the swarm, the others join the address it published.
    #[test]
    fn with_init_auto_one_host_starts_the_swarm_and_the_others_join_it() {
        let text = |addr: &str| {
            format!("ROLE=manager\nINIT=auto\nADVERTISE_ADDR={addr}\nMANAGERS=core-01,core-02\n{SECRET}")
        };
        let mut t = Mem(Default::default(), 2);
        let mut d1 = Script::default()
            .on("info --format {{json .Swarm}}", &[Ok(INACTIVE)])
            .on("swarm init", &[Ok("Swarm initialized")])
            .on("swarm join-token -q worker", &[Ok(TOKEN_W)]);
        let mut w = Fake::default();
        assert_eq!(
            join(
                &conf(&text("172.17.8.101")),
                &mut d1,
                &mut t,
                &mut w,
                Duration::from_secs(60)
            )
            .unwrap(),
            Joined::Initialised
        );
        assert!(
            w.said
                .iter()
                .any(|s| s.contains("waiting for etcd to learn who")),
            "{:?}",
            w.said
        );
        assert_eq!(
            t.0.get(FOUNDER_KEY).map(String::as_str),
            Some("172.17.8.101:2377")
        );
        assert!(d1
            .calls
            .contains(&"swarm init --advertise-addr 172.17.8.101".to_string()));

        let mut d2 = Script::default()
            .on("info --format {{json .Swarm}}", &[Ok(INACTIVE), Ok(WORKER)])
            .on("info --format {{.Name}}", &[Ok("core-02\n")])
            .on("API join 172.17.8.101:2377", &[Ok("")]);
        assert_eq!(
            join(
                &conf(&text("172.17.8.102")),
                &mut d2,
                &mut t,
                &mut Fake::default(),
                Duration::from_secs(60)
            )
            .unwrap(),
            Joined::Joined {
                via: "172.17.8.101:2377".into()
            }
        );
        assert!(
            !d2.calls.iter().any(|c| c.starts_with("swarm init")),
            "{:?}",
            d2.calls
        );
        assert_eq!(
            t.0.get(FOUNDER_KEY).map(String::as_str),
            Some("172.17.8.101:2377")
        );
        assert_eq!(
            t.0.get(&format!("{PROMOTE_KEY}/core-02"))
                .map(String::as_str),
            Some("w1")
        );

        // The founder, out of its swarm later (left by hand), does not
        // start a second one, and says what to do.
        let e = join(
            &conf(&text("172.17.8.101")),
            &mut Script::default().on("info", &[Ok(INACTIVE)]),
            &mut t,
            &mut Fake::default(),
            Duration::from_secs(4),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("started the swarm") && e.contains("delete nimbus/swarm/founder"),
            "{e}"
        );
    }

    /// A store that reads "absent" but refuses every create: the claim
    /// ends at its limit, naming the key, instead of spinning.
    #[test]
    fn a_founder_claim_that_never_settles_ends_at_its_limit() {
        struct Liar;
        impl Shared for Liar {
            fn get(&mut self, _: &str) -> Result<Option<String>, SwarmError> {
                Ok(None)
            }
            fn put(&mut self, _: &str, _: &str) -> Result<(), SwarmError> {
                Ok(())
            }
            fn create(&mut self, _: &str, _: &str) -> Result<bool, SwarmError> {
                Ok(false)
            }
            fn delete(&mut self, _: &str) -> Result<(), SwarmError> {
                Ok(())
            }
        }
        let c = conf(&format!(
            "ROLE=manager\nINIT=auto\nADVERTISE_ADDR=10.0.0.1\n{SECRET}"
        ));
        let e = join(
            &c,
            &mut Script::default().on("info", &[Ok(INACTIVE)]),
            &mut Liar,
            &mut Fake::default(),
            Duration::from_secs(5),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("nimbus/swarm/founder") && e.contains("never showed"),
            "{e}"
        );
    }

    #[test]
    fn swarm_addresses_carry_the_port() {
        assert_eq!(swarm_addr("10.0.0.1"), "10.0.0.1:2377");
        assert_eq!(swarm_addr("fd00::1"), "[fd00::1]:2377");
        assert_eq!(swarm_addr("10.0.0.1:4000"), "10.0.0.1:4000");
    }

    #[test]
    fn a_manager_token_found_in_etcd_is_rotated_and_deleted() {
        let mut d = Script::default()
            .on("info", &[Ok(MANAGER)])
            .on(
                "swarm join-token --rotate -q manager",
                &[Ok("SWMTKN-1-aaa-new")],
            )
            .on("swarm join-token -q worker", &[Ok(TOKEN_W)]);
        let mut t = Mem::default();
        t.0.insert(format!("{TOKEN_KEY}/manager"), TOKEN_M.into());
        let c = conf(&format!(
            "ROLE=manager\nINIT=yes\nADVERTISE_ADDR=10.0.0.1\n{SECRET}"
        ));
        let mut w = Fake::default();
        assert_eq!(
            join(&c, &mut d, &mut t, &mut w, Duration::from_secs(1)).unwrap(),
            Joined::AlreadyMember
        );
        assert!(d
            .calls
            .iter()
            .any(|c| c == "swarm join-token --rotate -q manager"));
        assert!(!t.0.contains_key(&format!("{TOKEN_KEY}/manager")));
        assert!(w.said.iter().any(|s| s.contains("rotated")), "{:?}", w.said);
    }

    #[test]
    fn a_joiner_opens_the_token_joins_by_the_api_and_asks_to_be_promoted() {
        let mut d = Script::default()
            .on(
                "info --format {{json .Swarm}}",
                &[Ok(INACTIVE), Ok(INACTIVE), Ok(INACTIVE), Ok(WORKER)],
            )
            .on("info --format {{.Name}}", &[Ok("h3\n")])
            .on("API join 10.0.0.1:2377", &[Err("connection refused")])
            .on("API join 10.0.0.2:2377", &[Ok("")]);
        let mut t = Mem(Default::default(), 0);
        let mut w = Fake::default();
        let c = conf(&format!(
            "ROLE=manager\nADVERTISE_ADDR=10.0.0.3\nJOIN=10.0.0.1:2377,10.0.0.2:2377\n{SECRET}"
        ));
        // No token for a while: it waits, then gives up with the reason.
        let e = join(&c, &mut d, &mut t, &mut w, Duration::from_secs(10)).unwrap_err();
        assert!(
            e.to_string().contains("no worker join token in etcd yet"),
            "{e}"
        );
        // A token in the clear (an older release's) is not used.
        t.0.insert(worker_token_key(), TOKEN_W.into());
        let e = join(
            &c,
            &mut d,
            &mut t,
            &mut Fake::default(),
            Duration::from_secs(4),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a sealed value"), "{e}");
        assert!(!e.to_string().contains("SWMTKN-1"), "{e}");
        let key = worker_token_key();
        t.0.insert(key.clone(), seal::seal(&secret(), &key, TOKEN_W).unwrap());
        let got = join(
            &c,
            &mut d,
            &mut t,
            &mut Fake::default(),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(
            got,
            Joined::Joined {
                via: "10.0.0.2:2377".into()
            }
        );
        assert!(
            d.calls
                .iter()
                .any(|c| c == &format!("API join 10.0.0.2:2377 token={TOKEN_W}")),
            "{:?}",
            d.calls
        );
        assert!(
            !d.calls
                .iter()
                .any(|c| !c.starts_with("API") && c.contains("SWMTKN")),
            "a token on a command line: {:?}",
            d.calls
        );
        assert_eq!(
            t.0.get(&format!("{PROMOTE_KEY}/h3")).map(String::as_str),
            Some("w1")
        );
        // Another cluster's secret does not open it.
        let other = conf(&format!(
            "ROLE=worker\nADVERTISE_ADDR=10.0.0.3\nJOIN=10.0.0.1:2377\nSECRET={}\n",
            "11".repeat(32)
        ));
        let e = join(
            &other,
            &mut Script::default().on("info", &[Ok(INACTIVE)]),
            &mut t,
            &mut Fake::default(),
            Duration::from_secs(2),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("does not open with this host's cluster secret"),
            "{e}"
        );
    }

    #[test]
    fn an_active_member_is_left_alone() {
        let mut d = Script::default().on("info", &[Ok(WORKER)]);
        let c = conf("ROLE=worker\nADVERTISE_ADDR=10.0.0.3\nJOIN=10.0.0.1\n");
        let got = join(
            &c,
            &mut d,
            &mut Mem::default(),
            &mut Fake::default(),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(got, Joined::AlreadyMember);
        assert_eq!(d.calls, ["info --format {{json .Swarm}}"]);
    }

    #[test]
    fn managers_promote_only_named_workers_that_asked_with_their_own_id() {
        let nodes = "m1\th1\tLeader\nw2\th2\t\nw3\th3\t\nw4\th4\t\nw5\th2\t\n";
        let mut d = Script::default()
            .on("info", &[Ok(MANAGER)])
            .on("node ls", &[Ok(nodes)])
            .on("node promote", &[Ok("")]);
        let mut t = Mem::default();
        t.0.insert(format!("{PROMOTE_KEY}/h2"), "w2".into());
        // h3 asked with another node's ID; h4 is not named.
        t.0.insert(format!("{PROMOTE_KEY}/h3"), "w9".into());
        t.0.insert(format!("{PROMOTE_KEY}/h4"), "w4".into());
        let c = conf(&format!(
            "ROLE=manager\nINIT=yes\nADVERTISE_ADDR=10.0.0.1\n{SECRET}MANAGERS=h1,h2,h3\n"
        ));
        assert_eq!(promote_named(&c, &mut d, &mut t).unwrap(), ["h2"]);
        let promoted: Vec<&String> = d
            .calls
            .iter()
            .filter(|c| c.starts_with("node promote"))
            .collect();
        assert_eq!(promoted, ["node promote w2"]);
        // Off a manager: nothing is asked of the swarm.
        let mut d = Script::default().on("info", &[Ok(WORKER)]);
        assert!(promote_named(&c, &mut d, &mut t).unwrap().is_empty());
        assert_eq!(d.calls.len(), 1);
    }

    #[test]
    fn drain_waits_until_tasks_moved_and_services_are_whole() {
        let mut d = Script::default()
            .on("info", &[Ok(MANAGER)])
            .on("node inspect n1", &[Ok("h1\n")])
            .on("node update --availability drain n1", &[Ok("n1")])
            .on("node ps n1 --filter", &[Ok("web.2\n")])
            .on("service ps web", &[Ok(SPREAD)])
            .on(
                "node ps n1",
                &[
                    Ok("web.2\tRunning 3 minutes ago\nweb.1\tShutdown 9 minutes ago\n"),
                    Ok("web.2\tShutdown 1 second ago\n"),
                    Ok("web.2\tShutdown 2 seconds ago\n"),
                ],
            )
            .on(
                "service ls",
                &[
                    Ok("web\treplicated\t3/3\n"),
                    Ok("web\treplicated\t2/3\n"),
                    Ok("web\treplicated\t3/3 (max 2 per node)\nlog\tglobal\t2/2\n"),
                ],
            );
        let mut w = Fake::default();
        assert_eq!(
            drain(&mut d, &mut w).unwrap(),
            Drained::Drained { node: "n1".into() }
        );
        assert_eq!(
            w.said,
            [
                "node n1 set to drain",
                "waiting: 1 task(s) still on this node (web.2)",
                "waiting: services not at full strength: web 2/3",
                "drained: every task runs elsewhere",
            ]
        );
        // A slow manager times out the drain call and a look at the tasks.
        let slow = "rpc error: code = DeadlineExceeded desc = context deadline exceeded";
        let mut d = Script::default()
            .on("info", &[Ok(MANAGER)])
            .on(
                "node update --availability drain n1",
                &[Err(slow), Ok("n1")],
            )
            .on("node ps n1 --filter", &[Ok("")])
            .on(
                "node ps n1",
                &[Err(slow), Ok("web.2\tShutdown 1 second ago\n")],
            )
            .on("service ls", &[Ok("web\treplicated\t3/3\n")]);
        let mut w = Fake::default();
        assert_eq!(
            drain(&mut d, &mut w).unwrap(),
            Drained::Drained { node: "n1".into() }
        );
        assert!(
            w.said[0].starts_with("setting drain, trying again:")
                && w.said[2].starts_with("asking the swarm, trying again:"),
            "{:?}",
            w.said
        );
    }

    const SPREAD: &str =
        "h1\tRunning 1 minute ago\nh2\tRunning 1 minute ago\nh3\tRunning 2 minutes ago\n";
    const ALL_ON_H1: &str =
        "h1\tRunning 1 minute ago\nh1\tRunning 1 minute ago\nh1\tRunning 2 minutes ago\n";

    #[test]
    fn a_service_failing_elsewhere_does_not_hold_the_drain() {
        // `flaky` never had a task here and crash-loops on other nodes
        // (0/3): this drain moved only `web`, so it waits for web alone.
        let mut d = Script::default()
            .on("info", &[Ok(MANAGER)])
            .on("node inspect n1", &[Ok("h1\n")])
            .on("node ps n1 --filter", &[Ok("web.2\n")])
            .on("service ps web", &[Ok(SPREAD)])
            .on("node update --availability drain n1", &[Ok("n1")])
            .on("node ps n1", &[Ok("web.2\tShutdown 1 second ago\n")])
            .on(
                "service ls",
                &[
                    Ok("web\treplicated\t2/3\nflaky\treplicated\t0/3\n"),
                    Ok("web\treplicated\t3/3\nflaky\treplicated\t0/3\n"),
                ],
            );
        let mut w = Fake::default();
        assert_eq!(
            drain(&mut d, &mut w).unwrap(),
            Drained::Drained { node: "n1".into() }
        );
        assert!(
            w.said
                .contains(&"waiting: services not at full strength: web 2/3".to_string()),
            "{:?}",
            w.said
        );
        assert!(!w.said.iter().any(|l| l.contains("flaky")), "{:?}", w.said);
    }

    #[test]
    fn a_drain_never_stops_the_last_running_copies() {
        // Every replica of web on this node (h1): it is paused, web gets a
        // forced rolling update, and the drain waits until a copy runs on
        // another node.
        let moving =
            "h2\tStarting 1 second ago\nh1\tRunning 1 minute ago\nh1\tRunning 2 minutes ago\n";
        let moved =
            "h2\tRunning 1 second ago\nh1\tRunning 1 minute ago\nh1\tRunning 2 minutes ago\n";
        let mut d = Script::default()
            .on("info", &[Ok(MANAGER)])
            .on("node inspect n1", &[Ok("h1\n")])
            .on(
                "node ps n1 --filter",
                &[Ok("web.1\nweb.2\nweb.3\nlog.n1\n")],
            )
            .on("service ps log", &[Ok(SPREAD)])
            .on("service ps web", &[Ok(ALL_ON_H1), Ok(moving), Ok(moved)])
            .on("service inspect web", &[Ok("3 completed\n")])
            .on("node update --availability pause n1", &[Ok("n1")])
            .on("service update --force --detach web", &[Ok("web")])
            .on("node update --availability drain n1", &[Ok("n1")])
            .on("node ps n1", &[Ok("web.2\tShutdown 1 second ago\n")])
            .on("service ls", &[Ok("web\treplicated\t3/3\n")]);
        let mut w = Fake::default();
        assert_eq!(
            drain(&mut d, &mut w).unwrap(),
            Drained::Drained { node: "n1".into() }
        );
        let order: Vec<&String> = d
            .calls
            .iter()
            .filter(|c| c.starts_with("node update") || c.starts_with("service update"))
            .collect();
        assert_eq!(
            order,
            [
                "node update --availability pause n1",
                "service update --force --detach web",
                "node update --availability drain n1"
            ]
        );
        assert_eq!(
            w.said[0],
            "waiting: the only running copies of web are on this node; moving them first: web (moving)"
        );
        assert!(w
            .said
            .contains(&"moved first: web now run(s) on another node too".to_string()));
        // Spread already: nothing is paused or forced.
        let mut d = Script::default()
            .on("info", &[Ok(MANAGER)])
            .on("node inspect n1", &[Ok("h1\n")])
            .on("node ps n1 --filter", &[Ok("web.1\n")])
            .on("service ps web", &[Ok(SPREAD)])
            .on("node update --availability drain n1", &[Ok("n1")])
            .on("node ps n1", &[Ok("")])
            .on("service ls", &[Ok("web\treplicated\t3/3\n")]);
        drain(&mut d, &mut Fake::default()).unwrap();
        assert!(!d
            .calls
            .iter()
            .any(|c| c.contains("pause") || c.starts_with("service update")));
    }

    #[test]
    fn a_single_running_copy_is_not_stopped_to_move_it() {
        // web wants 3, one runs (here), two are still starting elsewhere
        // after an earlier drain: a forced update would stop that copy.
        // Then an update already under way is left to finish. Then two
        // copies run here: it is moved.
        let one =
            "h1\tRunning 1 minute ago\nh2\tStarting 3 seconds ago\nh3\tPreparing 3 seconds ago\n";
        let two_here = "h1\tRunning 1 minute ago\nh1\tRunning 9 seconds ago\n";
        let moved = "h2\tRunning 1 second ago\nh1\tRunning 1 minute ago\n";
        let mut d = Script::default()
            .on("info", &[Ok(MANAGER)])
            .on("node inspect n1", &[Ok("h1\n")])
            .on("node ps n1 --filter", &[Ok("web.1\nweb.2\n")])
            .on(
                "service ps web",
                &[Ok(one), Ok(one), Ok(two_here), Ok(moved)],
            )
            .on(
                "service inspect web",
                &[Ok("3 completed\n"), Ok("3 updating\n"), Ok("3 completed\n")],
            )
            .on("node update --availability pause n1", &[Ok("n1")])
            .on("service update --force --detach web", &[Ok("web")])
            .on("node update --availability drain n1", &[Ok("n1")])
            .on("node ps n1", &[Ok("")])
            .on("service ls", &[Ok("web\treplicated\t3/3\n")]);
        let mut w = Fake::default();
        drain(&mut d, &mut w).unwrap();
        let forced_at = d
            .calls
            .iter()
            .position(|c| c.starts_with("service update --force"))
            .expect("moved once two copies ran here");
        let looks_before = d.calls[..forced_at]
            .iter()
            .filter(|c| c.starts_with("service ps web"))
            .count();
        assert_eq!(looks_before, 3, "{:?}", d.calls);
        assert!(
            w.said[0].ends_with("web: 1 running copy, here; the others are not running yet"),
            "{:?}",
            w.said
        );
        assert!(
            w.said[1].ends_with("web: an update of it is under way"),
            "{:?}",
            w.said
        );
        // A one-replica service is moved anyway: it cannot move without a gap.
        let mut d = Script::default()
            .on("info", &[Ok(MANAGER)])
            .on("node inspect n1", &[Ok("h1\n")])
            .on("node ps n1 --filter", &[Ok("solo.1\n")])
            .on(
                "service ps solo",
                &[
                    Ok("h1\tRunning 1 minute ago\n"),
                    Ok("h2\tRunning 1 second ago\n"),
                ],
            )
            .on("service inspect solo", &[Ok("1 completed\n")])
            .on("node update --availability pause n1", &[Ok("n1")])
            .on("service update --force --detach solo", &[Ok("solo")])
            .on("node update --availability drain n1", &[Ok("n1")])
            .on("node ps n1", &[Ok("")])
            .on("service ls", &[Ok("solo\treplicated\t1/1\n")]);
        drain(&mut d, &mut Fake::default()).unwrap();
        assert!(d
            .calls
            .contains(&"service update --force --detach solo".to_string()));
    }

    #[test]
    fn drain_on_a_worker_or_outside_a_swarm_does_nothing() {
        let mut d = Script::default().on("info", &[Ok(WORKER)]);
        assert_eq!(
            drain(&mut d, &mut Fake::default()).unwrap(),
            Drained::Worker
        );
        let mut d = Script::default().on("info", &[Ok(INACTIVE)]);
        assert_eq!(
            drain(&mut d, &mut Fake::default()).unwrap(),
            Drained::NotInSwarm
        );
        let mut d = Script::default().on("info", &[Ok("Cannot connect to the Docker daemon")]);
        let e = drain(&mut d, &mut Fake::default()).unwrap_err();
        assert!(e.to_string().contains("unexpected output"), "{e}");
    }

    #[test]
    fn activate_waits_for_the_swarm_then_sets_active() {
        let pending =
            r#"{"NodeID":"n1","LocalNodeState":"pending","ControlAvailable":false,"Error":""}"#;
        let mut d = Script::default()
            .on("info", &[Ok(pending), Ok(pending), Ok(MANAGER)])
            .on("node update --availability active n1", &[Ok("n1")])
            .on("service ls", &[Ok("web\treplicated\t3/3\n")])
            .on("service ps web", &[Ok(SPREAD)]);
        let mut w = Fake::default();
        assert_eq!(
            activate(&mut d, &mut w, Duration::from_secs(60)).unwrap(),
            Some("n1".into())
        );
        assert!(!d.calls.iter().any(|c| c.starts_with("service update")));
        // A slow manager: the update times out twice, then lands.
        let slow = "rpc error: code = DeadlineExceeded desc = context deadline exceeded";
        let mut d = Script::default()
            .on(
                "info",
                &[Ok("Cannot connect to the Docker daemon"), Ok(MANAGER)],
            )
            .on(
                "node update --availability active n1",
                &[Err(slow), Err(slow), Ok("n1")],
            )
            .on("service ls", &[Err("Cannot connect")]);
        let mut w = Fake::default();
        assert_eq!(
            activate(&mut d, &mut w, Duration::from_secs(60)).unwrap(),
            Some("n1".into())
        );
        assert_eq!(
            w.said
                .iter()
                .filter(|s| s.contains("DeadlineExceeded"))
                .count(),
            2,
            "{:?}",
            w.said
        );
        // ... but not forever.
        let mut d = Script::default()
            .on("info", &[Ok(MANAGER)])
            .on("node update --availability active n1", &[Err(slow)]);
        let e = activate(&mut d, &mut Fake::default(), Duration::from_secs(10)).unwrap_err();
        assert!(
            e.to_string().contains("not activated after 10 s")
                && e.to_string().contains("DeadlineExceeded"),
            "{e}"
        );
        let mut d = Script::default().on("info", &[Ok(pending)]);
        let e = activate(&mut d, &mut Fake::default(), Duration::from_secs(5)).unwrap_err();
        assert!(
            e.to_string().contains("pending in the swarm after 5 s"),
            "{e}"
        );
    }

    #[test]
    fn replicas_column() {
        assert_eq!(replicas("3/3"), Some((3, 3)));
        assert_eq!(replicas("2/3 (max 1 per node)"), Some((2, 3)));
        assert_eq!(replicas("x"), None);
    }
}
